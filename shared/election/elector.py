"""Leader election over an Azure blob lease, in the manner of client-go's ``leaderelection``.

One ``LeaderElectionConfig`` whose timings are validated up front, a ``LeaseElector`` that makes
exactly one acquire attempt per call, and a ``HeldLease`` that renews itself and says, from a
monotonic clock, whether a piece of work may still start.

What this guarantees, and what it does not:

- While a lease is held, Azure Storage refuses every other acquire (409): at most one process
  *believes* it holds a valid lease at a time, up to clock drift and pauses.
- It does **not** guarantee that a holder which was paused (GC, SIGSTOP, a slow network) past its
  lease stops acting: it only finds out at its next storage call. That is why every ledger write
  is also fenced by an epoch checked by storage itself (see ``shared/storage/ledger.py``); the
  lease gives
  liveness and saves wasted work, the fence gives safety.
- The commit deadline is ``last successful renew *sent* + lease - margin`` on the monotonic clock,
  so a slow renew response cannot extend it.
- A renewal or release, retries included, ends before the lease would expire
  (``shared.storage.retries.fit_retries``): a transient error costs a sub-second retry, never a
  stall
  past the lease.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobLeaseClient, ContainerClient

from shared.config.timings import ElectionConfigError, LeaderElectionConfig
from shared.errors import TermEnded
from shared.storage.retries import fit_retries, worst_case_seconds

__all__ = ["ElectionConfigError", "LeaderElectionConfig", "TermEnded"]  # re-exported

logger = logging.getLogger(__name__)

MonotonicClock = Callable[[], float]


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
    state)`` when it is released or lost; ``on_refused(instance_id)`` after a 409 (another leader).
    """

    on_started_leading: Callable[[str], None] = lambda holder_id: None
    before_release: Callable[[str], None] = lambda holder_id: None
    on_stopped_leading: Callable[[str, LeaseState], None] = lambda holder_id, state: None
    on_refused: Callable[[str], None] = lambda instance_id: None


@dataclass
class HeldLease:
    """A lease this process holds: renews itself, knows its deadline, releases once.

    Renewal happens at the leader's checkpoints (``ensure_can_start``) and, once
    ``keep_renewing`` is called, also on a background thread every ``renew_interval_seconds``,
    so that one long storage step does not starve it. A lock serialises the two.
    """

    lease: BlobLeaseClient
    config: LeaderElectionConfig
    clock: MonotonicClock
    last_renew_sent: float
    callbacks: ElectionCallbacks = field(default_factory=ElectionCallbacks)
    call_timeout_seconds: float = 5  # one try of a lease call (STORAGE_TIMEOUT_SECONDS)
    state: LeaseState = LeaseState.LEADING
    # Called after each successful renewal (the wake-up alarm follows the lease's expiry).
    on_renewed: Callable[[], None] | None = None
    _id: str = field(default="", repr=False)  # the SDK clears its own copy at release
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)

    def keep_renewing(self) -> None:
        """Renew in the background every renew interval until released or lost."""
        threading.Thread(target=self._renew_loop, name=f"renew-{self.lease_id[:8]}",
                         daemon=True).start()

    def _renew_loop(self) -> None:
        while not self._ended.wait(self.config.renew_interval_seconds):
            try:
                self.renew_if_due()
            except LeadershipLost as exc:
                logger.warning("background renewal stopped: %s", exc)
                return

    def __post_init__(self) -> None:
        self._id = str(self.lease.id)

    @property
    def lease_id(self) -> str:
        """The lease id storage knows this holder by (the same after the release)."""
        return self._id

    def deadline(self) -> float:
        """Monotonic time after which no work may still be running under this lease."""
        return self.last_renew_sent + self.config.renew_deadline_seconds

    def remaining(self) -> float:
        """Seconds left before ``deadline``."""
        return self.deadline() - self.clock()

    def _call_options(self) -> dict[str, Any]:
        """Retries and per-try timeouts that end a lease call before the lease would expire."""
        left = self.last_renew_sent + self.config.lease_seconds - self.clock()
        budget = min(left, worst_case_seconds(self.call_timeout_seconds))
        return fit_retries(budget, self.call_timeout_seconds)

    def ensure_can_start(self, work_seconds: float) -> None:
        """Renew if due, then raise ``LeadershipLost`` unless work of this length ends in time."""
        self.renew_if_due()
        if self.clock() + work_seconds > self.deadline():
            left = self.remaining()
            self.release()  # best effort: frees it for the next leader before it expires
            raise LeadershipLost(
                f"lease {self.lease_id} had {left:.1f} s left, less than the "
                f"{work_seconds:g} s the next step may take; stopped before it"
            )

    def renew_if_due(self) -> None:
        """Renew when ``renew_interval_seconds`` have passed; a failed renew stops leadership."""
        with self._lock:
            if self.state is not LeaseState.LEADING:
                raise LeadershipLost(f"lease {self.lease_id} is {self.state.value}")
            if self.clock() - self.last_renew_sent < self.config.renew_interval_seconds:
                return
            self.renew()

    def renew(self) -> None:
        """Renew now; on any failure mark the lease lost and raise ``LeadershipLost``."""
        with self._lock:
            sent = self.clock()
            try:
                self.lease.renew(**self._call_options())
            except AzureError as exc:  # refused (409: lost) or unreachable: both end leadership
                self._stop(LeaseState.LOST)
                raise LeadershipLost(
                    f"renewing lease {self.lease_id} failed: {_why(exc)}") from exc
            self.last_renew_sent = sent
            logger.debug("renewed lease %s", self.lease_id)
        if self.on_renewed is not None:
            self.on_renewed()

    def release(self) -> None:
        """Give the lease back so the next candidate need not wait for it to expire."""
        with self._lock:
            if self.state is not LeaseState.LEADING:
                return
            self.callbacks.before_release(self.lease_id)
            try:
                self.lease.release(**self._call_options())
            except AzureError as exc:
                # Already expired or taken over (or unreachable): it expires by itself.
                logger.info("lease %s was not released (%s)", self.lease_id, _why(exc))
                self._stop(LeaseState.LOST)
                return
            self._stop(LeaseState.RELEASED)

    def _stop(self, state: LeaseState) -> None:
        self._ended.set()
        if self.state is LeaseState.LEADING:
            self.state = state
            self.callbacks.on_stopped_leading(self.lease_id, state)


def _why(exc: AzureError) -> str:
    return str(getattr(exc, "reason", None) or type(exc).__name__)


# After a refused acquire (409: a leader holds the lease) an instance makes no further attempt
# for this long: its completions are covered by that leader's final look, which comes this long
# after its release (``shared.leadership.pipeline.run_election``). It keeps the lease blob's load
# at most
# one attempt per instance per window, whatever the message rate.
FOLLOWER_SKIP_SECONDS = 0.25


class LeaseElector:
    """Makes one acquire attempt per ``try_acquire`` on one blob's lease.

    After a refusal it skips attempts (returns ``None`` without a call) for ``skip_seconds``,
    measured on ``time.monotonic`` from before the refused request was sent.
    """

    def __init__(
        self,
        container: ContainerClient,
        blob_name: str,
        config: LeaderElectionConfig,
        instance_id: str,
        clock: MonotonicClock = time.monotonic,
        callbacks: ElectionCallbacks | None = None,
        call_timeout_seconds: float = 5,
    ) -> None:
        self.container = container
        self.call_timeout_seconds = call_timeout_seconds
        self.blob = container.get_blob_client(blob_name)
        self.config = config
        self.instance_id = instance_id
        self.clock = clock
        self.callbacks = callbacks or ElectionCallbacks()
        self.skip_seconds = FOLLOWER_SKIP_SECONDS
        self.skipped = 0  # attempts skipped because a leader was seen within the window
        self.window_opened_at = float("-inf")  # time.monotonic() of the last refusal that did
        self._leader_seen_until = float("-inf")

    def ensure_blob(self) -> None:
        """Create the lease blob (and its container) if missing; idempotent."""
        with contextlib.suppress(ResourceExistsError):
            self.container.create_container()
        with contextlib.suppress(ResourceExistsError):  # exists, possibly leased: both fine
            self.blob.upload_blob(b"", overwrite=False)

    def try_acquire(self, after_recording: bool = False) -> HeldLease | None:
        """One attempt. ``None`` when another holder has it (a normal outcome, not an error).

        ``after_recording``: this attempt follows a row this invocation wrote. Then, within
        ``skip_seconds`` of an earlier such refusal, ``None`` without asking storage (a leader
        was active then, and its final look covers the window); and a refusal opens the window.
        """
        seen = time.monotonic()
        if after_recording and seen < self._leader_seen_until:
            self.skipped += 1
            return None
        lease = BlobLeaseClient(self.blob, lease_id=str(uuid.uuid4()))
        sent = self.clock()
        try:
            try:
                lease.acquire(lease_duration=int(self.config.lease_seconds))
            except ResourceNotFoundError:
                self.ensure_blob()  # first run against this account: make the blob, try once more
                sent = self.clock()
                lease.acquire(lease_duration=int(self.config.lease_seconds))
        except HttpResponseError as exc:
            if exc.status_code == 409:
                if after_recording:
                    self._leader_seen_until = seen + self.skip_seconds
                    self.window_opened_at = seen
                logger.debug("%s: lease held by another instance; exiting early", self.instance_id)
                self.callbacks.on_refused(self.instance_id)
                return None
            raise
        held = HeldLease(lease, self.config, self.clock, last_renew_sent=sent,
                         callbacks=self.callbacks, call_timeout_seconds=self.call_timeout_seconds)
        # DEBUG: between terms each message can win a lease that finds nothing ready; the INFO
        # line of a term that claims an epoch says who leads.
        logger.debug("%s acquired lease %s", self.instance_id, held.lease_id)
        self.callbacks.on_started_leading(held.lease_id)
        return held
