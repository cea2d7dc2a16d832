"""No announced work is stranded: the bounds of docs/design.md 3.5, driven with hooks.

- Every holder alive and not paused, sweeper off: work announced at t_w is committed by
  t_w + the skip window + well under a second.
- A holder that dies (or is paused) while it holds the lease: the work is committed by its
  lease's expiry + 1 s, by whichever instance takes the lease alarm it armed.

Each interleaving is forced with the election's callbacks and events; nothing here sleeps to
let a race happen.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from shared.election.elector import ElectionCallbacks
from shared.leadership.elections import Role, run_election
from shared.leadership.intake import handle_completion
from tests.helpers import Namespace, balance, deposit, record, status, take_alarms, wait_until

SKIP = 1.0  # every instance runs with the same window (a constant in production: 0.25 s)
WAIT = 10.0  # an event that does not come within this fails the test


def _wait(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), f"{what} did not happen within {WAIT} s"


def test_a_step_announced_in_a_skip_window_is_committed_when_the_last_holder_was_refused(
        ns: Namespace) -> None:
    """The review's interleaving. A commits X and is about to release; C records a step and
    takes the lease right after the release; A's look finds C's work and A's attempt is
    refused by C; C saw only its own work and was refused by nobody; B, inside the window A's
    term opened, records W and makes no attempt. Before, W waited for the sweeper."""
    a_holds, b_refused, a_released = threading.Event(), threading.Event(), threading.Event()
    c_holds, a_refused = threading.Event(), threading.Event()
    b = ns.app("B")

    def c_started(_id: str) -> None:  # C holds the lease until A has been refused
        c_holds.set()
        _wait(a_refused, "A's refusal")

    c = ns.app("C", callbacks=ElectionCallbacks(on_started_leading=c_started))

    def a_started(_id: str) -> None:
        if not a_holds.is_set():  # A's first term: B is refused while A holds the lease
            a_holds.set()
            _wait(b_refused, "B's refusal")

    def a_stopped(_id: str, _state: object) -> None:
        if not a_released.is_set():
            a_released.set()
            _wait(c_holds, "C's acquire")

    a = ns.app("A", callbacks=ElectionCallbacks(
        on_started_leading=a_started,
        before_release=lambda _id: None if a_released.is_set() else record(
            c, *deposit("c1", "carol", "1.00")),
        on_stopped_leading=a_stopped,
        on_refused=lambda _id: a_refused.set()))
    for app in (a, b, c):
        app.elector.skip_seconds = SKIP

    a_thread = threading.Thread(target=lambda: handle_completion(
        a, deposit("x1", "alice", "1.00")[0], "x1"), name="A")
    a_thread.start()
    _wait(a_holds, "A's acquire")
    refused = handle_completion(b, deposit("f1", "bob", "1.00")[0], "f1")
    assert refused.election is not None
    assert refused.election.role is Role.FOLLOWER
    b_refused.set()
    _wait(a_released, "A's release")
    c_thread = threading.Thread(target=lambda: run_election(c), name="C")
    c_thread.start()
    c_thread.join(WAIT)
    assert not c_thread.is_alive()
    assert status(c, "c1") == "committed"

    skipped_before = b.elector.skipped
    w = handle_completion(b, deposit("w1", "bob", "2.00")[0], "w1")
    announced_at = time.monotonic()
    assert w.announced
    assert b.elector.skipped == skipped_before + 1, "B made no attempt"
    wait_until(lambda: status(a, "w1") == "committed", timeout=SKIP + 1.0,
               what="W committed with no further message and no sweeper")
    committed_after = time.monotonic() - announced_at
    a_thread.join(WAIT)
    assert [status(a, r) for r in ("x1", "f1", "c1", "w1")] == ["committed"] * 4
    assert balance(a, "bob") == Decimal("3.00")
    assert committed_after <= SKIP + 1.0


@pytest.mark.slow
def test_work_handed_to_a_holder_that_stops_is_committed_by_its_lease_expiry_plus_1_s(
        ns: Namespace) -> None:
    """H acquires the lease and stops (a crash, a pause) before it reads anything; B's work
    waits for H. No sweeper and no further message: H's lease alarm comes due as its lease
    runs out, and the instance that takes it commits B's work."""
    acquired: list[float] = []
    paused, stop = threading.Event(), threading.Event()
    holder = ns.app("H", LEASE_SECONDS="15", callbacks=ElectionCallbacks(
        on_started_leading=lambda _id: acquired.append(time.monotonic())))
    ready = holder.completions.ready

    def stop_forever(*args: Any, **kwargs: Any) -> Any:
        paused.set()
        stop.wait(60)  # stopped: no read, no renewal, no release
        return ready(*args, **kwargs)

    holder.completions.ready = stop_forever  # type: ignore[method-assign]
    h_thread = threading.Thread(target=lambda: run_election(holder), daemon=True, name="H")
    h_thread.start()
    _wait(paused, "H's acquire")
    b = ns.app("B", LEASE_SECONDS="15")
    result = handle_completion(b, deposit("w1", "bob", "2.00")[0], "w1")
    assert result.election is not None
    assert result.election.role is Role.FOLLOWER
    listener = threading.Thread(target=take_alarms, args=(ns.app("W", LEASE_SECONDS="15"),
                                                           stop), daemon=True, name="listener")
    listener.start()
    try:
        expiry = acquired[0] + 15
        wait_until(lambda: status(b, "w1") == "committed",
                   timeout=expiry + 1.0 - time.monotonic(),
                   what="the work committed by the lease's expiry + 1 s", interval=0.1)
        committed = time.monotonic()
        print(f"committed {committed - acquired[0]:.2f} s after the holder's acquire")
        assert committed <= expiry + 1.0
    finally:
        stop.set()
        listener.join(WAIT)
        h_thread.join(WAIT)
    assert balance(b, "bob") == Decimal("2.00")
