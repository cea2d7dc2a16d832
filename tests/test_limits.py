"""Issue 10: every request built from valid messages ends with exactly one outcome, whatever its
size, and everything the app writes fits Azure Table limits (against a real Azurite)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from azure.storage.blob import BlobLeaseClient

from shared.domain.model import MAX_REASON_CHARS, Outcome, OutcomeStatus
from shared.domain.planning import (
    MAX_TRANSACTION_OPERATIONS,
    LedgerWriteError,
    OutcomeExists,
    plan_transaction,
)
from shared.leadership.elections import run_election
from shared.web import api
from tests.helpers import (
    Namespace,
    balance,
    decided,
    deposit,
    lease_blob,
    reason,
    record,
    send,
    status,
    step,
)

ID = "x" * 120  # ids at the contract's edge: 128 characters with the suffixes below


def long_id(prefix: str, index: int) -> str:
    return f"{prefix}{index:04d}-{ID}"[:128]


def test_hundreds_of_conflicting_steps_recorded_behind_a_lease_end_rejected_with_a_short_reason(
        ns: Namespace) -> None:
    """The issue's scenario: 260 distinct 128-character operationIds, each delivered twice with
    different content, recorded while another instance held the lease."""
    app = ns.app()
    holder = BlobLeaseClient(lease_blob(app))
    holder.acquire(lease_duration=60)
    request_id = long_id("big", 0)
    for i in range(260):
        operation_id = long_id("op", i)
        record(app, step(request_id, operation_id, "add_funds", long_id("acct", i), "1.00", 50))
        record(app, step(request_id, operation_id, "add_funds", long_id("acct", i), "2.00", 50))
    rows = app.completions.steps_of(request_id)
    assert len(rows) == 520, "one row and one conflict row per operationId"
    holder.release()

    run_election(app)

    assert status(app, request_id) == "rejected"
    text = reason(app, request_id)
    assert len(text) <= MAX_REASON_CHARS
    assert "different content" in text
    assert "and 255 more (260 in all)" in text
    assert long_id("op", 0) in text
    reply = api.request(app, request_id)
    assert reply.status == 200
    assert reply.body["status"] == "rejected"
    assert app.completions.count() == 0, "every row of the decided request is gone"
    assert app.ledger.list_balances() == {}


def test_more_conflicting_deliveries_of_one_step_add_one_row_only(ns: Namespace) -> None:
    app = ns.app()
    holder = BlobLeaseClient(lease_blob(app))
    holder.acquire(lease_duration=60)
    for cents in range(1, 301):
        record(app, step("r1", "r1-a", "add_funds", "alice", f"{cents / 100:.2f}", 1))
    assert len(app.completions.steps_of("r1")) == 2
    holder.release()
    run_election(app)
    assert status(app, "r1") == "rejected"
    assert balance(app, "alice") == Decimal("0.00")


def test_fifty_steps_with_128_character_ids_commit_with_every_leg(ns: Namespace) -> None:
    app = ns.app()
    request_id = long_id("req", 1)
    bodies = [step(request_id, long_id("op", i), "add_funds", long_id("acct", i),
                   "1000000000000.00", 50) for i in range(50)]
    send(app, *bodies)
    outcome = decided(app, request_id)
    assert outcome.outcome.status == "committed"
    assert len(outcome.outcome.legs) == 50
    assert len(outcome.step_contents) == 50
    assert outcome.steps_complete
    assert balance(app, long_id("acct", 49)) == Decimal("1000000000000.00")
    assert app.completions.count() == 0


def test_too_many_distinct_steps_are_rejected_at_once_and_later_ones_settle_as_late(
        ns: Namespace) -> None:
    app = ns.app()
    holder = BlobLeaseClient(lease_blob(app))
    holder.acquire(lease_duration=60)
    for i in range(60):
        record(app, step("r1", long_id("op", i), "add_funds", "alice", "1.00", 50))
    holder.release()
    run_election(app)
    assert status(app, "r1") == "rejected"
    assert "60 distinct steps arrived, expectedOperations is 50" in reason(app, "r1")
    send(app, step("r1", long_id("op", 99), "add_funds", "alice", "1.00", 50))
    assert app.completions.count() == 0, "a late step of a rejected request is dropped"
    assert balance(app, "alice") == Decimal("0.00")


def test_a_full_transaction_of_100_entities_with_the_largest_legs_commits(ns: Namespace) -> None:
    """33 two-leg transfers of 1e12 between 128-character accounts: 1 fence + 33 outcomes +
    66 accounts = 100 operations, the most one transaction holds (outcome events off: with
    them the outbox row takes one operation, tests/test_outbox.py)."""
    app = ns.app(OUTCOME_EVENTS="false")
    sources = [long_id("src", i) for i in range(33)]
    targets = [long_id("dst", i) for i in range(33)]
    for i, source in enumerate(sources):
        send(app, *deposit(long_id("dep", i)[:124], source, "1000000000000.00"))
    holder = BlobLeaseClient(lease_blob(app))
    holder.acquire(lease_duration=60)
    for i in range(33):
        request_id = long_id("tx", i)
        record(app,
               step(request_id, long_id("w", i), "withdraw_funds", sources[i],
                    "1000000000000.00", 2),
               step(request_id, long_id("a", i), "add_funds", targets[i],
                    "1000000000000.00", 2))
    holder.release()
    election = run_election(app)
    assert [term.transactions for term in election.terms] == [1]
    assert MAX_TRANSACTION_OPERATIONS == 1 + 33 + 66
    for i in range(33):
        assert status(app, long_id("tx", i)) == "committed"
        assert balance(app, sources[i]) == Decimal("0.00")
        assert balance(app, targets[i]) == Decimal("1000000000000.00")


def test_a_refusal_that_is_not_already_exists_is_a_write_error_not_a_late_request(
        ns: Namespace) -> None:
    """A value too large for storage names the outcome row, but it is not 'decided before'."""
    app = ns.app()
    fence, _ = app.ledger.claim_epoch("test/lease", datetime.now(UTC))
    huge = Outcome("r1", OutcomeStatus.COMMITTED, "",
                   tuple((f"a{i}", Decimal("1.00")) for i in range(3000)))
    with pytest.raises(LedgerWriteError) as refused:
        app.ledger.commit(fence, [huge], {}, datetime.now(UTC))
    assert "PropertyValueTooLarge" in str(refused.value)
    assert "request row 'r1'" in str(refused.value)
    assert app.ledger.read_outcome("r1") is None
    # The same row refused because it exists is the one case that means "decided before".
    fence = app.ledger.commit(fence, [Outcome("r2", OutcomeStatus.ABORTED, "step failed")], {},
                              datetime.now(UTC)).fence  # a commit returns the fence's new version
    with pytest.raises(OutcomeExists):
        app.ledger.commit(fence, [Outcome("r2", OutcomeStatus.ABORTED, "again")], {},
                          datetime.now(UTC))


def test_the_largest_outcome_rows_fit_a_property_and_a_full_transaction_fits_4_mib(
        ns: Namespace) -> None:
    app = ns.app()
    fence, _ = app.ledger.claim_epoch("test/lease", datetime.now(UTC))
    widest = [Outcome(long_id("r", i), OutcomeStatus.REJECTED, "r" * 50_000, (),
                      operations=10_000, expected_operations=50,
                      steps=tuple((long_id("op", j), "f" * 32) for j in range(500)))
              for i in range(MAX_TRANSACTION_OPERATIONS - 1)]
    app.ledger.commit(fence, widest, {}, datetime.now(UTC))  # Azurite checks the 64 KiB limit
    stored = decided(app, long_id("r", 0))
    assert len(stored.outcome.reason) == MAX_REASON_CHARS
    assert len(stored.step_contents) == 50
    assert not stored.steps_complete
    plan = plan_transaction("ledger", fence, widest, {}, "2026-01-01T00:00:00+00:00")
    entities = [write.entity for write in plan.writes]
    assert len(json.dumps(entities).encode()) < 4 * 1024 * 1024
    assert all(len(entity) < 255 for entity in entities)
