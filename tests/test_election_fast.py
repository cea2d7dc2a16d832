"""The elector's timing on the in-memory lease and a fake clock: milliseconds, no sleeping.

Acquire outcomes and the skip window, the renew interval and the commit deadline (measured from
the renewal *sent*), what a lost or refused lease does (``LeadershipLost``, a ``TermEnded``), the
release, and the background renewer, all driven by moving a fake clock. ``MemoryLease`` behaves as
Azure documents blob leases (``tests/contract/test_leases.py`` holds it to that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from shared import errors
from shared.config.timings import ElectionConfigError, LeaderElectionConfig
from shared.domain.leases import LeaseStatus
from shared.election import elector as elector_module
from shared.election.elector import (
    Attempt,
    AttemptOutcome,
    ElectionCallbacks,
    HeldLease,
    LeadershipLost,
    LeaseElector,
    LeaseState,
)
from shared.election.lock import LeaseLock
from shared.errors import ConditionFailed, StorageUnavailable, TermEnded
from tests.fakes.leases import MemoryLease

CONFIG = LeaderElectionConfig.build(lease_seconds=60)  # renew every 20 s, deadline 50 s
REAL_TIMEOUT = 5.0  # seconds of real time a test waits for the renew thread, at most


class FakeClock:
    """Monotonic time moved by ``advance``; ``sleep`` waits (really, briefly) until it has been
    moved that far, so that a background thread sleeps on the test's time."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._cond = threading.Condition()
        self._closed = False
        self.sleepers = 0

    def monotonic(self) -> float:
        with self._cond:
            return self._now

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.monotonic())

    def advance(self, seconds: float) -> None:
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        with self._cond:
            target = self._now + seconds
            self.sleepers += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._now >= target or self._closed, REAL_TIMEOUT)
            finally:
                self.sleepers -= 1

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (real time, bounded) for another thread to bring ``condition`` about: woken by
        the clock's changes, and looking again every millisecond for the others."""
        deadline = time.monotonic() + REAL_TIMEOUT
        with self._cond:
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                self._cond.wait(0.001)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Events:
    """What the callbacks saw."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def callbacks(self) -> ElectionCallbacks:
        return ElectionCallbacks(
            on_started_leading=lambda holder: self.log.append(("started", holder)),
            before_release=lambda holder: self.log.append(("releasing", holder)),
            on_stopped_leading=lambda holder, state: self.log.append((state.value, holder)),
            on_refused=lambda instance: self.log.append(("refused", instance)),
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lock(clock: FakeClock) -> MemoryLease:
    return MemoryLease(clock)


def make_elector(lock: LeaseLock, clock: FakeClock, events: Events | None = None,
                 name: str = "me") -> LeaseElector:
    return LeaseElector(lock, CONFIG, name, clock,
                        events.callbacks() if events else None)


def lead(lock: MemoryLease, clock: FakeClock, events: Events | None = None) -> HeldLease:
    attempt = make_elector(lock, clock, events).attempt()
    assert attempt.lease is not None
    return attempt.lease


def other_holder_takes(lock: MemoryLease) -> str:
    """Another instance holds the lease (the elector's own is broken first if it has one)."""
    if lock.state().status == "locked":
        lock.break_lease(0)
    return lock.acquire(60, "someone-else")


# --- the config --------------------------------------------------------------------------------
def test_timings_are_validated_up_front_with_a_config_error() -> None:
    assert (CONFIG.lease_seconds, CONFIG.renew_interval_seconds,
            CONFIG.renew_deadline_seconds) == (60, 20, 50)
    with pytest.raises(ElectionConfigError, match="renew_interval_seconds") as caught:
        LeaderElectionConfig.build(lease_seconds=15, renew_interval_seconds=12)
    assert isinstance(caught.value, errors.ConfigError)
    with pytest.raises(ElectionConfigError, match="between 15 and 60"):
        LeaderElectionConfig.build(lease_seconds=90)


# --- attempts ----------------------------------------------------------------------------------
def test_an_attempt_on_a_free_lease_acquires_it_and_starts_the_deadline(
        lock: MemoryLease, clock: FakeClock) -> None:
    events = Events()
    attempt = make_elector(lock, clock, events).attempt()
    assert attempt.outcome is AttemptOutcome.ACQUIRED
    assert attempt.acquired
    assert not attempt.skipped
    assert not attempt.refused
    held = attempt.lease
    assert held is not None
    assert held.state is LeaseState.LEADING
    assert held.last_renew_sent == clock.monotonic()
    assert held.deadline() == clock.monotonic() + 50
    assert held.remaining() == 50
    assert lock.state() == LeaseStatus("leased", "locked", "fixed")
    assert events.log == [("started", held.lease_id)]
    assert lock.calls == ["acquire"]


def test_an_attempt_while_another_holds_the_lease_is_refused_not_an_error(
        lock: MemoryLease, clock: FakeClock) -> None:
    other_holder_takes(lock)
    events = Events()
    elector = make_elector(lock, clock, events)
    assert elector.attempt() == Attempt(AttemptOutcome.REFUSED)
    assert events.log == [("refused", "me")]
    # Not after a recording: no skip window; the next attempt asks storage again.
    assert elector.attempt().refused
    assert lock.calls == ["acquire", "acquire", "acquire"]
    assert elector.window_opened_at == float("-inf")


def test_a_refusal_after_recording_skips_such_attempts_for_the_skip_window(
        lock: MemoryLease, clock: FakeClock) -> None:
    other_holder_takes(lock)
    elector = make_elector(lock, clock)
    opened = clock.monotonic()
    assert elector.attempt(after_recording=True).refused
    assert elector.window_opened_at == opened
    calls = len(lock.calls)

    clock.advance(elector.skip_seconds - 0.01)
    skipped = elector.attempt(after_recording=True)
    assert skipped == Attempt(AttemptOutcome.SKIPPED)
    assert skipped.skipped
    assert skipped.lease is None
    assert elector.skipped == 1  # the counter callers used before ``Attempt``
    assert len(lock.calls) == calls, "a skipped attempt makes no storage call"
    assert elector.attempt().refused, "an attempt not after a recording is never skipped"

    clock.advance(0.01)  # the window has closed
    lock.release("someone-else")
    assert elector.attempt(after_recording=True).acquired
    assert elector.skipped == 1


def test_the_compat_try_acquire_returns_the_lease_or_none(
        lock: MemoryLease, clock: FakeClock) -> None:
    elector = make_elector(lock, clock)
    held = elector.try_acquire()
    assert isinstance(held, HeldLease)
    assert make_elector(lock, clock, name="other").try_acquire() is None


def test_the_first_attempt_on_a_missing_lease_creates_it(clock: FakeClock) -> None:
    lock = MemoryLease(clock, exists=False)
    assert lock.state() == LeaseStatus()
    assert make_elector(lock, clock).attempt().acquired
    assert lock.calls == ["acquire", "ensure_exists", "acquire"]


def test_a_storage_failure_while_acquiring_propagates(
        lock: MemoryLease, clock: FakeClock) -> None:
    lock.faults["acquire"] = StorageUnavailable("injected", status=503)
    events = Events()
    with pytest.raises(StorageUnavailable):
        make_elector(lock, clock, events).attempt(after_recording=True)
    assert events.log == []


def test_the_lease_view_is_the_locks_state(lock: MemoryLease, clock: FakeClock) -> None:
    elector = make_elector(lock, clock)
    assert elector.lease_view() == LeaseStatus()
    elector.attempt()
    assert elector.lease_view().as_dict() == {"state": "leased", "status": "locked",
                                              "duration": "fixed"}


# --- renewing and the deadline -----------------------------------------------------------------
def test_renewals_happen_at_the_renew_interval_and_move_the_deadline(
        lock: MemoryLease, clock: FakeClock) -> None:
    renewed: list[float] = []
    held = lead(lock, clock)
    held.on_renewed = lambda: renewed.append(clock.monotonic())
    clock.advance(19.9)
    held.ensure_can_start(5)
    assert lock.calls.count("renew") == 0, "not due before the renew interval"
    clock.advance(0.1)
    held.ensure_can_start(5)
    assert lock.calls.count("renew") == 1
    assert renewed == [clock.monotonic()]
    assert held.deadline() == clock.monotonic() + 50
    # The call is given what is left of the lease itself, retries included.
    assert lock.budgets == [pytest.approx(60 - 20)]


def test_the_deadline_counts_from_when_the_renewal_was_sent(clock: FakeClock) -> None:
    class SlowLease(MemoryLease):
        def renew(self, lease_id: str, *, within_s: float | None = None) -> None:
            clock.advance(4)  # the response takes 4 s
            super().renew(lease_id, within_s=within_s)

    lock = SlowLease(clock)
    held = lead(lock, clock)
    clock.advance(20)
    sent = clock.monotonic()
    held.renew_if_due()
    assert held.last_renew_sent == sent
    assert held.remaining() == 50 - 4, "a slow response does not extend the deadline"


def test_no_work_starts_that_could_end_past_the_deadline(
        lock: MemoryLease, clock: FakeClock) -> None:
    events = Events()
    held = lead(lock, clock, events)
    held.renew_if_due = lambda: None  # type: ignore[method-assign]  # a renewer that stalled
    clock.advance(45)
    held.ensure_can_start(5)  # ends exactly at the deadline: allowed
    with pytest.raises(LeadershipLost, match=r"less than the 5\.1 s") as caught:
        held.ensure_can_start(5.1)
    assert isinstance(caught.value, TermEnded)
    assert held.state is LeaseState.RELEASED, "it gives the lease back before stopping"
    assert lock.state().state == "available"
    assert events.log[-2:] == [("releasing", held.lease_id), ("released", held.lease_id)]


def test_a_refused_renewal_loses_the_lease_and_ends_the_term(
        lock: MemoryLease, clock: FakeClock) -> None:
    events = Events()
    held = lead(lock, clock, events)
    other_holder_takes(lock)
    clock.advance(20)
    with pytest.raises(LeadershipLost, match="renewing lease") as caught:
        held.ensure_can_start(1)
    assert isinstance(caught.value.__cause__, ConditionFailed)
    assert held.state is LeaseState.LOST
    assert events.log[-1] == ("lost", held.lease_id)
    with pytest.raises(LeadershipLost, match="is lost"):  # and nothing more starts
        held.ensure_can_start(0)
    calls = len(lock.calls)
    held.release()  # nothing to give back
    assert len(lock.calls) == calls


def test_an_unreachable_store_at_renewal_also_ends_the_term(
        lock: MemoryLease, clock: FakeClock) -> None:
    held = lead(lock, clock)
    lock.faults["renew"] = StorageUnavailable("injected timeout")
    clock.advance(20)
    with pytest.raises(LeadershipLost):
        held.renew_if_due()
    assert held.state is LeaseState.LOST


def test_a_holder_paused_past_its_lease_keeps_it_only_if_nobody_took_it(
        clock: FakeClock) -> None:
    lock = MemoryLease(clock)
    held = lead(lock, clock)
    clock.advance(61)  # paused: the lease expired, but nobody else wanted it
    assert lock.state().state == "expired"
    with pytest.raises(LeadershipLost, match="less than"):
        held.ensure_can_start(60)  # renewed, but nothing that long fits any lease
    taken = MemoryLease(clock)
    late = lead(taken, clock)
    clock.advance(61)
    taken.acquire(60, "successor")  # another instance took it over
    with pytest.raises(LeadershipLost, match="renewing lease"):
        late.ensure_can_start(1)
    assert late.state is LeaseState.LOST


def test_a_release_happens_once_and_a_refused_one_counts_as_lost(
        lock: MemoryLease, clock: FakeClock) -> None:
    held = lead(lock, clock)
    clock.advance(3)
    held.release()
    assert held.state is LeaseState.RELEASED
    assert lock.budgets == [pytest.approx(57)]
    held.release()
    assert lock.calls.count("release") == 1
    again = lead(lock, clock)
    other_holder_takes(lock)
    again.release()
    assert again.state is LeaseState.LOST


# --- the background renewer --------------------------------------------------------------------
def test_the_background_renewer_renews_on_the_clock_until_the_lease_is_lost(
        lock: MemoryLease, clock: FakeClock) -> None:
    held = lead(lock, clock)
    try:
        held.keep_renewing()
        for round_ in range(1, 3):
            clock.wait_until(lambda: clock.sleepers == 1, "the renewer to sleep")
            clock.advance(20)
            clock.wait_until(lambda n=round_: lock.calls.count("renew") == n,  # type: ignore[misc]
                             f"renewal {round_}")
            assert held.state is LeaseState.LEADING
        clock.wait_until(lambda: clock.sleepers == 1, "the renewer to sleep")
        other_holder_takes(lock)
        clock.advance(20)

        clock.wait_until(lambda: held.state is LeaseState.LOST and clock.sleepers == 0,
                         "the renewer to find the lease lost")
    finally:
        held.release()
        clock.close()


def test_the_background_renewer_stops_after_the_release(
        lock: MemoryLease, clock: FakeClock) -> None:
    held = lead(lock, clock)
    held.keep_renewing()
    clock.wait_until(lambda: clock.sleepers == 1, "the renewer to sleep")
    held.release()
    clock.advance(20)
    clock.wait_until(lambda: clock.sleepers == 0, "the renewer to wake")
    assert lock.calls.count("renew") == 0
    renewers = [t for t in threading.enumerate() if t.name == f"renew-{held.lease_id[:8]}"]
    for thread in renewers:
        thread.join(REAL_TIMEOUT)
        assert not thread.is_alive()


# --- names kept for callers --------------------------------------------------------------------
def test_the_elector_takes_a_bare_monotonic_function_and_keeps_its_old_names(
        lock: MemoryLease) -> None:
    now = [500.0]
    elector = LeaseElector(lock, CONFIG, "legacy", lambda: now[0])
    held = elector.try_acquire()
    assert held is not None
    assert held.last_renew_sent == 500.0
    now[0] += 20
    held.renew_if_due()
    assert held.last_renew_sent == 520.0
    clock = FakeClock()
    elector.clock = clock  # tests swap the clock after the app is built
    assert elector.clock is clock
    assert elector_module.TermEnded is errors.TermEnded
    assert issubclass(LeadershipLost, errors.TermEnded)
    assert elector_module.LeaderElectionConfig is LeaderElectionConfig
