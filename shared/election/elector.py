"""Leader election over a lease, in the manner of client-go's ``leaderelection``.

One ``LeaderElectionConfig`` whose timings are validated up front (``shared.config.timings``), a
``LeaseElector`` that makes exactly one acquire attempt per ``attempt`` and says how it went
(``Attempt``), and a ``HeldLease`` that renews itself and says, from the injected ``Clock``'s
monotonic time, whether a piece of work may still start.

The elector knows the lease only through the ``LeaseLock`` port (``shared.election.lock``): an
Azure blob lease in production (``shared.storage.azure_leases.AzureBlobLease``), an in-memory
one in tests. It imports no Azure SDK; every time it reads or waits is the injected clock's.

What this guarantees, and what it does not:

- While a lease is held, Azure Storage refuses every other acquire (409): at most one process
  *believes* it holds a valid lease at a time, up to clock drift and pauses.
- It does **not** guarantee that a holder which was paused (GC, SIGSTOP, a slow network) past its
  lease stops acting: it only finds out at its next storage call. That is why every ledger write
  is also fenced by an epoch checked by storage itself (see ``shared/storage/ledger.py``); the
  lease gives liveness and saves wasted work, the fence gives safety.
- The commit deadline is ``last successful renew *sent* + lease - margin`` on the monotonic clock,
  so a slow renew response cannot extend it.
- A renewal or release, retries included, ends before the lease would expire: the elector passes
  the time left (``within_s``) and the lock fits its retries to it
  (``shared.storage.retries.fit_retries``); a transient error costs a sub-second retry, never a
  stall past the lease.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import cast

from shared.config.timings import ElectionConfigError, LeaderElectionConfig
from shared.domain.clock import SYSTEM_CLOCK, Clock, ComposedClock
from shared.election.lock import LeaseLock, LeaseStatus
from shared.errors import ConditionFailed, NotFound, StorageError, TermEnded

__all__ = [
    "FOLLOWER_SKIP_SECONDS",
    "Attempt",
    "AttemptOutcome",
    "ElectionCallbacks",
    "ElectionConfigError",
    "HeldLease",
    "LeaderElectionConfig",
    "LeadershipLost",
    "LeaseElector",
    "LeaseState",
    "MonotonicClock",
    "TermEnded",
    "as_clock",
]

logger = logging.getLogger(__name__)

MonotonicClock = Callable[[], float]  # the bare monotonic clock callers passed before ``Clock``


def as_clock(clock: Clock | MonotonicClock) -> Clock:
    """``clock`` as a ``Clock``: a bare monotonic function is wrapped (sleeps and wall time are
    then the system's)."""
    if getattr(clock, "monotonic", None) is None:
        return ComposedClock(monotonic=cast(MonotonicClock, clock))
    return cast(Clock, clock)


class LeaseState(StrEnum):
    """Where one holder's lease stands."""

    LEADING = "leading"
    RELEASED = "released"
    LOST = "lost"


class LeadershipLost(TermEnded):
    """The lease is gone or too close to expiry: stop leading at once and start nothing new."""


@dataclass
class ElectionCallbacks:
    """Hooks called as leadership changes (for metrics, tests and the simulator).

    ``on_started_leading(holder_id)`` after the lease is acquired; ``before_release(holder_id)``
    just before it is given back (the leader has stopped working); ``on_stopped_leading(holder_id,
    state)`` when it is released or lost; ``on_refused(instance_id)`` after a refusal (another
    leader).
    """

    on_started_leading: Callable[[str], None] = lambda holder_id: None
    before_release: Callable[[str], None] = lambda holder_id: None
    on_stopped_leading: Callable[[str, LeaseState], None] = lambda holder_id, state: None
    on_refused: Callable[[str], None] = lambda instance_id: None


@dataclass
class HeldLease:
    """A lease this process holds: renews itself, knows its deadline, releases once.

    Renewal happens at the leader's checkpoints (``ensure_can_start``) and, once
    ``keep_renewing`` is called, also on a background thread that sleeps (on the clock) until the
    next renewal is due, so that one long storage step does not starve it. A lock serialises the
    two.
    """

    lock: LeaseLock
    lease_id: str  # the id storage knows this holder by (the same after the release)
    config: LeaderElectionConfig
    clock: Clock
    last_renew_sent: float
    callbacks: ElectionCallbacks = field(default_factory=ElectionCallbacks)
    state: LeaseState = LeaseState.LEADING
    # Called after each successful renewal (the wake-up alarm follows the lease's expiry).
    on_renewed: Callable[[], None] | None = None
    _mutex: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)

    def keep_renewing(self) -> None:
        """Renew in the background every renew interval until released or lost."""
        threading.Thread(target=self._renew_loop, name=f"renew-{self.lease_id[:8]}",
                         daemon=True).start()

    def _renew_loop(self) -> None:
        while not self._ended.is_set():
            self.clock.sleep(max(self.next_renewal() - self.clock.monotonic(), _MIN_WAIT_SECONDS))
            if self._ended.is_set():
                return
            try:
                self.renew_if_due()
            except LeadershipLost as exc:
                logger.warning("background renewal stopped: %s", exc)
                return

    def next_renewal(self) -> float:
        """Monotonic time at which the next renewal is due."""
        return self.last_renew_sent + self.config.renew_interval_seconds

    def deadline(self) -> float:
        """Monotonic time after which no work may still be running under this lease."""
        return self.last_renew_sent + self.config.renew_deadline_seconds

    def remaining(self) -> float:
        """Seconds left before ``deadline``."""
        return self.deadline() - self.clock.monotonic()

    def _time_left(self) -> float:
        """Seconds before the lease itself would expire: a lease call must end within them."""
        return self.last_renew_sent + self.config.lease_seconds - self.clock.monotonic()

    def ensure_can_start(self, work_seconds: float) -> None:
        """Renew if due, then raise ``LeadershipLost`` unless work of this length ends in time."""
        self.renew_if_due()
        if self.clock.monotonic() + work_seconds > self.deadline():
            left = self.remaining()
            self.release()  # best effort: frees it for the next leader before it expires
            raise LeadershipLost(
                f"lease {self.lease_id} had {left:.1f} s left, less than the "
                f"{work_seconds:g} s the next step may take; stopped before it"
            )

    def renew_if_due(self) -> None:
        """Renew when ``renew_interval_seconds`` have passed; a failed renew stops leadership."""
        with self._mutex:
            if self.state is not LeaseState.LEADING:
                raise LeadershipLost(f"lease {self.lease_id} is {self.state.value}")
            if self.clock.monotonic() < self.next_renewal():
                return
            self.renew()

    def renew(self) -> None:
        """Renew now; on any failure mark the lease lost and raise ``LeadershipLost``."""
        with self._mutex:
            sent = self.clock.monotonic()
            try:
                self.lock.renew(self.lease_id, within_s=self._time_left())
            except StorageError as exc:  # refused (lost) or unreachable: both end leadership
                self._stop(LeaseState.LOST)
                raise LeadershipLost(f"renewing lease {self.lease_id} failed: {exc}") from exc
            self.last_renew_sent = sent
            logger.debug("renewed lease %s", self.lease_id)
        if self.on_renewed is not None:
            self.on_renewed()

    def release(self) -> None:
        """Give the lease back so the next candidate need not wait for it to expire."""
        with self._mutex:
            if self.state is not LeaseState.LEADING:
                return
            self.callbacks.before_release(self.lease_id)
            try:
                self.lock.release(self.lease_id, within_s=self._time_left())
            except StorageError as exc:
                # Already expired or taken over (or unreachable): it expires by itself.
                logger.info("lease %s was not released (%s)", self.lease_id, exc)
                self._stop(LeaseState.LOST)
                return
            self._stop(LeaseState.RELEASED)

    def _stop(self, state: LeaseState) -> None:
        self._ended.set()
        if self.state is LeaseState.LEADING:
            self.state = state
            self.callbacks.on_stopped_leading(self.lease_id, state)


# The renew thread never waits less than this between two looks at the lease (no busy loop).
_MIN_WAIT_SECONDS = 0.05

# After a refused acquire (409: a leader holds the lease) an instance makes no further attempt
# for this long: its completions are covered by that leader's final look, which comes this long
# after its release (``shared.leadership.elections.run_election``). It keeps the lease blob's load
# at most one attempt per instance per window, whatever the message rate.
FOLLOWER_SKIP_SECONDS = 0.25


class AttemptOutcome(StrEnum):
    """How one acquire attempt went (the values are telemetry's ``result``)."""

    ACQUIRED = "acquired"
    REFUSED = "refused"  # another holder has the lease: a normal outcome, not an error
    SKIPPED = "skipped"  # no call made: a leader was seen within the skip window


@dataclass(frozen=True)
class Attempt:
    """The outcome of ``LeaseElector.attempt``: the lease when acquired, else why not."""

    outcome: AttemptOutcome
    lease: HeldLease | None = None

    @property
    def acquired(self) -> bool:
        return self.outcome is AttemptOutcome.ACQUIRED

    @property
    def skipped(self) -> bool:
        """No call was made: a leader was seen within the skip window."""
        return self.outcome is AttemptOutcome.SKIPPED

    @property
    def refused(self) -> bool:
        return self.outcome is AttemptOutcome.REFUSED


class LeaseElector:
    """Makes one acquire attempt per ``attempt`` on one lease (``LeaseLock``).

    After a refusal that followed a recording, it skips such attempts (no call) for
    ``skip_seconds``, measured on the clock from before the refused request was sent.
    """

    def __init__(
        self,
        lock: LeaseLock,
        config: LeaderElectionConfig,
        instance_id: str,
        clock: Clock | MonotonicClock = SYSTEM_CLOCK,
        callbacks: ElectionCallbacks | None = None,
    ) -> None:
        self.lock = lock
        self.config = config
        self.instance_id = instance_id
        self._clock = as_clock(clock)
        self.callbacks = callbacks or ElectionCallbacks()
        self.skip_seconds = FOLLOWER_SKIP_SECONDS
        self.skipped = 0  # attempts skipped because a leader was seen within the window
        self.window_opened_at = float("-inf")  # clock time of the last refusal that opened one
        self._leader_seen_until = float("-inf")

    @property
    def clock(self) -> Clock:
        """The clock of every timing decision (the held leases' too)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Clock | MonotonicClock) -> None:
        self._clock = as_clock(clock)

    def ensure_exists(self) -> None:
        """Create the lease (its blob and container) if missing; idempotent."""
        self.lock.ensure_exists()

    ensure_blob = ensure_exists  # the name callers used before the lock port

    def lease_view(self) -> LeaseStatus:
        """The lease as storage reports it, for the read API and the status page."""
        return self.lock.state()

    def attempt(self, after_recording: bool = False) -> Attempt:
        """One attempt: acquired, refused (another holder has it) or skipped (no call made).

        ``after_recording``: this attempt follows a row this invocation wrote. Then, within
        ``skip_seconds`` of an earlier such refusal, it is skipped (a leader was active then, and
        its final look covers the window); and a refusal opens the window. Storage errors other
        than a refusal propagate (``StorageError``).
        """
        seen = self._clock.monotonic()
        if after_recording and seen < self._leader_seen_until:
            self.skipped += 1
            return Attempt(AttemptOutcome.SKIPPED)
        proposed = str(uuid.uuid4())
        duration = int(self.config.lease_seconds)
        sent = self._clock.monotonic()
        try:
            try:
                lease_id = self.lock.acquire(duration, proposed)
            except NotFound:
                self.lock.ensure_exists()  # first run against this account: make it, try again
                sent = self._clock.monotonic()
                lease_id = self.lock.acquire(duration, proposed)
        except ConditionFailed:
            if after_recording:
                self._leader_seen_until = seen + self.skip_seconds
                self.window_opened_at = seen
            logger.debug("%s: lease held by another instance; exiting early", self.instance_id)
            self.callbacks.on_refused(self.instance_id)
            return Attempt(AttemptOutcome.REFUSED)
        held = HeldLease(self.lock, lease_id, self.config, self._clock, last_renew_sent=sent,
                         callbacks=self.callbacks)
        # DEBUG: between terms each message can win a lease that finds nothing ready; the INFO
        # line of a term that claims an epoch says who leads.
        logger.debug("%s acquired lease %s", self.instance_id, held.lease_id)
        self.callbacks.on_started_leading(held.lease_id)
        return Attempt(AttemptOutcome.ACQUIRED, held)

    def try_acquire(self, after_recording: bool = False) -> HeldLease | None:
        """``attempt(...).lease``: the lease, or ``None`` when refused or skipped (the API before
        ``Attempt``; a skip shows only as ``skipped`` growing)."""
        return self.attempt(after_recording).lease
