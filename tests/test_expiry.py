"""Whether a request expired depends only on storage's timestamps of its steps.

A request's deadline is its first step's storage ``Timestamp`` plus ``REQUEST_TIMEOUT_SECONDS``.
Steps stamped at or after it are late: they never change the decision, whenever a leader happens
to look. These tests let storage's own clock pass the deadline (a 2 s timeout), then deliver the
step that would have completed the request.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from shared.domain.rules import EXPIRY_GRACE
from shared.leadership.instance import LedgerApp
from shared.leadership.sweeper import sweep
from shared.storage.parking import ParkedKind
from tests.helpers import (
    Namespace,
    balance,
    deposit,
    send,
    status,
    step,
    sweep_now,
    transfer,
    wait_until,
)

TIMEOUT = "2"


def storage_now(app: LedgerApp) -> datetime:
    """Storage's time (the Date of its answer to a read)."""
    return app.completions.ready(fallback_now=app.clock.now()).storage_time


def wait_past_the_deadline(app: LedgerApp, request_id: str) -> None:
    """Until storage's clock is past the request's deadline (and the grace after it)."""
    first = min(s.recorded_at for s in app.completions.steps_of(request_id))
    deadline = first + timedelta(seconds=float(TIMEOUT)) + EXPIRY_GRACE
    wait_until(lambda: storage_now(app) >= deadline + timedelta(seconds=1), timeout=15,
               what="storage's clock to pass the deadline", interval=0.2)


def test_a_last_step_stamped_past_the_deadline_cannot_commit_its_request(ns: Namespace) -> None:
    """The issue's case: step 1 at t = 0, step 2 after the timeout, and no election between.
    Before, the request committed (complete was checked before expiry) and money moved."""
    app = ns.app(REQUEST_TIMEOUT_SECONDS=TIMEOUT)
    send(app, *deposit("d1", "alice", "10.00"))
    w, a = transfer("t1", "alice", "bob", "4.00")
    send(app, w)
    wait_past_the_deadline(app, "t1")
    send(app, a)  # announced at once: its own read shows the deadline passed
    assert status(app, "t1") == "expired"
    assert balance(app, "alice") == Decimal("10.00")
    assert balance(app, "bob") == Decimal("0.00")
    assert app.completions.count() == 0, "the late step was settled, not left waiting"
    assert not app.parking.list(), "a late step that agrees with nothing moved is dropped"


def test_the_same_steps_expire_whether_or_not_a_sweep_looked_in_between(ns: Namespace) -> None:
    app = ns.app(REQUEST_TIMEOUT_SECONDS=TIMEOUT)
    send(app, *deposit("d1", "alice", "10.00"))
    for request_id, look_between in (("t1", True), ("t2", False)):
        w, a = transfer(request_id, "alice", "bob", "4.00")
        send(app, w)
        wait_past_the_deadline(app, request_id)
        if look_between:
            sweep_now(app)
            assert status(app, request_id) == "expired"
        send(app, a)
        sweep(app)
    assert status(app, "t1") == status(app, "t2") == "expired"
    assert balance(app, "alice") == Decimal("10.00")


def test_a_failed_or_conflicting_step_past_the_deadline_changes_nothing(ns: Namespace) -> None:
    app = ns.app(REQUEST_TIMEOUT_SECONDS=TIMEOUT)
    send(app, *deposit("d1", "alice", "10.00"))
    w, _ = transfer("t1", "alice", "bob", "4.00")
    send(app, w)
    wait_past_the_deadline(app, "t1")
    send(app, transfer("t1", "alice", "bob", "4.00", fail="add")[1])  # would have aborted it
    send(app, step("t1", "t1-w", "withdraw_funds", "alice", "9.00", 2))  # a second content
    assert status(app, "t1") == "expired"
    decided = app.ledger.read_outcome("t1")
    assert decided is not None
    assert "1 of 2 steps" in decided.outcome.reason
    parked = [m for m in app.parking.list() if m.kind is ParkedKind.LATE_CONTRADICTION]
    assert len(parked) == 1, "the second content of a decided step contradicts it: parked"
    assert balance(app, "alice") == Decimal("10.00")
    assert app.completions.count() == 0


def test_a_request_complete_before_its_deadline_commits_however_late_the_look(
        ns: Namespace) -> None:
    app = ns.app(REQUEST_TIMEOUT_SECONDS=TIMEOUT)
    holder = ns.app("holder", REQUEST_TIMEOUT_SECONDS=TIMEOUT)
    lease = holder.elector.try_acquire()  # nobody else can lead until it is released
    assert lease is not None
    send(app, *deposit("d1", "alice", "10.00"), *transfer("t1", "alice", "bob", "4.00"))
    assert status(app, "t1") is None
    wait_past_the_deadline(app, "t1")
    lease.release()
    sweep_now(app)
    assert status(app, "t1") == "committed"
    assert balance(app, "bob") == Decimal("4.00")
