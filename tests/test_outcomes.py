"""Each request outcome, against a real Azurite, through the queue handler of one instance."""

from __future__ import annotations

from decimal import Decimal

from shared.leadership.elections import run_election
from shared.storage.completions import RecordResult, Tombstone
from tests.helpers import (
    ManualClock,
    Namespace,
    balance,
    deposit,
    reason,
    record,
    send,
    status,
    step,
    sweep_now,
    transfer,
)


def test_deposit_then_transfer_commits_exact_balances(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "100.10"))
    send(app, *transfer("t1", "alice", "bob", "40.05"))
    assert status(app, "d1") == "committed"
    assert status(app, "t1") == "committed"
    assert balance(app, "alice") == Decimal("60.05")
    assert balance(app, "bob") == Decimal("40.05")
    assert app.completions.count() == 0, "committed requests leave nothing behind"


def test_failed_step_aborts_and_applies_nothing(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "50.00"))
    send(app, *transfer("t1", "alice", "bob", "20.00", fail="add"))
    assert status(app, "t1") == "aborted"
    assert "t1-a" in reason(app, "t1")
    assert balance(app, "alice") == Decimal("50.00")
    assert balance(app, "bob") == Decimal("0.00")


def test_failed_step_aborts_before_all_steps_arrive(ns: Namespace) -> None:
    app = ns.app()
    send(app, step("r1", "r1-a", "add_funds", "alice", "5.00", 3, status="failed"))
    assert status(app, "r1") == "aborted"


def test_insufficient_funds_rejects_the_whole_request(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, *transfer("t1", "alice", "bob", "10.01"))
    assert status(app, "t1") == "rejected"
    assert "insufficient funds" in reason(app, "t1")
    assert balance(app, "alice") == Decimal("10.00")
    assert balance(app, "bob") == Decimal("0.00")


def test_draining_an_account_to_exactly_zero_is_allowed(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, *transfer("t1", "alice", "bob", "10.00"))
    assert status(app, "t1") == "committed"
    assert balance(app, "alice") == Decimal("0.00")


def test_steps_disagreeing_on_expected_operations_are_rejected(ns: Namespace) -> None:
    app = ns.app()
    send(app, step("r1", "a", "add_funds", "alice", "1.00", 2),
         step("r1", "b", "add_funds", "alice", "1.00", 3))
    assert status(app, "r1") == "rejected"
    assert "expectedOperations" in reason(app, "r1")
    assert balance(app, "alice") == Decimal("0.00")


def test_more_distinct_steps_than_expected_are_rejected(ns: Namespace) -> None:
    app = ns.app()
    # Record all three before anyone leads, so the leader sees them together.
    record(app, step("r1", "a", "add_funds", "alice", "1.00", 2),
           step("r1", "b", "add_funds", "alice", "1.00", 2),
           step("r1", "c", "add_funds", "alice", "1.00", 2))
    send(app, step("r1", "c", "add_funds", "alice", "1.00", 2))
    assert status(app, "r1") == "rejected"
    assert "3 distinct steps" in reason(app, "r1")
    assert balance(app, "alice") == Decimal("0.00")


def test_same_operation_id_with_different_content_is_rejected(ns: Namespace) -> None:
    app = ns.app()
    results = send(app, step("r1", "a", "add_funds", "alice", "1.00", 2),
                   step("r1", "a", "add_funds", "alice", "9.00", 2),
                   step("r1", "b", "add_funds", "bob", "1.00", 2))
    assert results[1].recorded is RecordResult.CONFLICT
    assert status(app, "r1") == "rejected"
    assert "different content" in reason(app, "r1")
    assert balance(app, "alice") == Decimal("0.00")
    assert balance(app, "bob") == Decimal("0.00")


def test_duplicate_deliveries_change_nothing(ns: Namespace) -> None:
    app = ns.app()
    w, a = transfer("t1", "alice", "bob", "30.00")
    send(app, *deposit("d1", "alice", "100.00"))
    results = send(app, w, w, a, a, w)
    assert [r.recorded for r in results[:2]] == [RecordResult.RECORDED, RecordResult.DUPLICATE]
    assert status(app, "t1") == "committed"
    assert balance(app, "alice") == Decimal("70.00")
    assert balance(app, "bob") == Decimal("30.00")


def test_out_of_order_steps_commit_once_complete(ns: Namespace) -> None:
    app = ns.app()
    w, a = transfer("t1", "alice", "bob", "25.00")
    send(app, a)  # the add leg arrives first
    assert status(app, "t1") is None
    send(app, *deposit("d1", "alice", "25.00"))
    send(app, w)
    assert status(app, "t1") == "committed"
    assert balance(app, "alice") == Decimal("0.00")
    assert balance(app, "bob") == Decimal("25.00")


def test_incomplete_request_expires_after_the_timeout(ns: Namespace) -> None:
    clock = ManualClock()
    app = ns.app(time_shift=clock.shift, REQUEST_TIMEOUT_SECONDS="900")
    w, _ = transfer("t1", "alice", "bob", "5.00")
    send(app, *deposit("d1", "alice", "5.00"))
    send(app, w)
    clock.advance(899)
    run_election(app)
    assert status(app, "t1") is None, "not yet expired at 899 s"
    # Expiry waits 1 s past the deadline (EXPIRY_GRACE) and storage's Date has whole seconds.
    clock.advance(3)
    sweep_now(app)  # the sweeper's full scan finds it
    assert status(app, "t1") == "expired"
    assert balance(app, "alice") == Decimal("5.00")


def test_step_after_its_request_ended_changes_nothing(ns: Namespace) -> None:
    app = ns.app()
    w, a = transfer("t1", "alice", "bob", "5.00")
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, w, a)
    assert status(app, "t1") == "committed"
    # Both legs replayed after the commit: a complete-looking request that already ended.
    results = send(app, w, a)
    assert results[-1].election is not None
    assert any("t1" in term.late_requests for term in results[-1].election.terms)
    assert balance(app, "alice") == Decimal("5.00")
    assert balance(app, "bob") == Decimal("5.00")
    assert app.completions.count() == 0


def test_a_single_late_duplicate_is_dropped_at_once_by_the_instance_that_decided(
        ns: Namespace) -> None:
    app = ns.app()
    w, a = transfer("t1", "alice", "bob", "5.00")
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, w, a)
    results = send(app, a)  # one leg again: on its own it looks like a pending request
    election = results[0].election
    assert election is not None
    assert any("t1" in term.late_requests for term in election.terms)
    assert app.completions.count() == 0
    assert status(app, "t1") == "committed"
    assert balance(app, "bob") == Decimal("5.00")


def test_a_late_duplicate_decided_elsewhere_is_settled_at_once_by_its_tombstone(
        ns: Namespace) -> None:
    first, other = ns.app("first"), ns.app("other")
    w, a = transfer("t1", "alice", "bob", "5.00")
    send(first, *deposit("d1", "alice", "10.00"))
    send(first, w, a)
    results = send(other, a)  # `other` never saw t1 decided; the tombstone tells it
    assert results[0].announced
    assert other.completions.count() == 0
    assert status(other, "t1") == "committed"
    assert balance(other, "bob") == Decimal("5.00")


def test_a_late_duplicate_after_the_tombstone_went_waits_for_expiry_and_changes_nothing(
        ns: Namespace) -> None:
    clock = ManualClock()
    first = ns.app("first", time_shift=clock.shift)
    other = ns.app("other", time_shift=clock.shift)
    w, a = transfer("t1", "alice", "bob", "5.00")
    send(first, *deposit("d1", "alice", "10.00"))
    send(first, w, a)
    first.completions.delete([Tombstone("t1", "committed").ref])  # TOMBSTONE_SECONDS later
    send(other, a)  # nothing tells `other` that t1 was decided: the row waits
    assert other.completions.count() == 1
    clock.advance(902)
    election = sweep_now(other)  # the sweeper, after the timeout
    assert any("t1" in term.late_requests for term in election.terms)
    assert other.completions.count() == 0
    assert status(other, "t1") == "committed", "not turned into expired"
    assert balance(other, "bob") == Decimal("5.00")
