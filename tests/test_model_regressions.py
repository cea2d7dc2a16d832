"""Counterexamples found by the model-based test (``tests/test_model.py``), shrunk, kept as plain
tests so that they run the same way every time.

Each says which run found it and what the shrunk program was.
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient

from shared.domain.exchange import FLIGHT_PREFIX
from shared.domain.planning import FencedOut
from shared.domain.sharding import ShardMap
from shared.leadership.elections import Election, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.term import LeaderTerm
from shared.leadership.view import ReadyView
from shared.storage.parking import ParkedKind
from tests.helpers import (
    ManualClock,
    Namespace,
    balance,
    lease_blob,
    record,
    send,
    status,
    step,
    wait_until,
)


def _parked_late_steps(app: LedgerApp) -> list[dict[str, Any]]:
    """The late steps parked as contradicting their request's outcome, as messages."""
    return [json.loads(m.body) for m in app.parking.list()
            if m.kind is ParkedKind.LATE_CONTRADICTION]


def test_a_second_content_after_a_commit_is_parked_not_dropped(ns: Namespace) -> None:
    """test_late_steps_that_contradict_a_commit_are_parked, before late contradicting steps
    were parked, shrunk to: deliver r0-0 (add 5.00, the only step), which commits; deliver r0-0
    again with 6.00.
    The second content was deleted as a late duplicate: upstream believed 6.00 was added."""
    app = ns.app()
    send(app, step("r0", "r0-0", "add_funds", "acct-a", "5.00", 1))
    assert status(app, "r0") == "committed"
    send(app, step("r0", "r0-0", "add_funds", "acct-a", "6.00", 1))
    run_election(app)
    assert status(app, "r0") == "committed"
    assert balance(app, "acct-a") == Decimal("5.00")
    assert app.completions.count() == 0
    parked = _parked_late_steps(app)
    assert [(p["operationId"], p["amount"]) for p in parked] == [("r0-0", "6.00")]


def test_a_step_recorded_while_a_paused_leader_holds_its_scan_is_parked_after_its_commit(
        ns: Namespace) -> None:
    """The model's "step delivered as a leader began a commit": a leader scans r0 (complete,
    one step), pauses; meanwhile another instance records a second content of that step (its
    election is refused); the leader wakes and commits what it scanned. The row it never saw
    contradicts the commit: it must reach an operator, not be dropped as late."""
    leader, other = ns.app("leader"), ns.app("other")
    record(leader, step("r0", "r0-0", "add_funds", "acct-a", "5.00", 1))
    lease = leader.elector.try_acquire()
    assert lease is not None
    ready = ReadyView(leader).read()
    term = LeaderTerm.begin(leader, lease)
    send(other, step("r0", "r0-0", "add_funds", "acct-a", "7.00", 1))  # a follower: 409
    assert status(other, "r0") is None
    term.commit_ready(leader.clock.monotonic() + 60, ready)
    lease.release()
    assert status(leader, "r0") == "committed"
    assert balance(leader, "acct-a") == Decimal("5.00")
    assert leader.completions.count() == 0
    parked = _parked_late_steps(leader)
    assert [(p["operationId"], p["amount"]) for p in parked] == [("r0-0", "7.00")]


def test_a_deposed_leader_resuming_on_its_old_scan_writes_nothing(ns: Namespace) -> None:
    """The model's deposed-leader rule, smallest form: the old leader's scan says commit r0;
    another instance takes over and commits r0 and a withdrawal that empties the account; the
    old leader's commit of its scan must be refused as a whole (no double credit)."""
    clock = ManualClock()
    old, new = ns.app("old", wallclock=clock), ns.app("new", wallclock=clock)
    record(old, step("r0", "r0-0", "add_funds", "acct-a", "5.00", 1))
    lease = old.elector.try_acquire()
    assert lease is not None
    ready = ReadyView(old).read()
    term = LeaderTerm.begin(old, lease)
    BlobLeaseClient(lease_blob(old)).break_lease(lease_break_period=0)
    run_election(new)
    send(new, step("r1", "r1-0", "withdraw_funds", "acct-a", "5.00", 1))
    assert [status(new, r) for r in ("r0", "r1")] == ["committed", "committed"]
    with pytest.raises(FencedOut):
        term.commit_ready(old.clock.monotonic() + 60, ready)
    assert balance(new, "acct-a") == Decimal("0.00")
    assert {d.outcome.request_id: d.epoch for d in new.ledger.list_outcomes()}["r0"] \
        > term.fence.epoch


# --- shards (tests/test_model.py ShardedMachine) -------------------------------------------------
def _on_shard(shard_map: ShardMap, shard: int, prefix: str, steps: int) -> str:
    """The first id ``{prefix}{i}`` of an account (``steps`` = 1) or of a multi-step request
    (``steps`` > 1) homed on ``shard``."""
    return next(f"{prefix}{i}" for i in itertools.count()
                if shard_map.home_of(f"{prefix}{i}", steps, f"{prefix}{i}") == shard)


def test_steps_that_disagree_on_expected_operations_are_decided_once_across_shards(
        ns: Namespace) -> None:
    """ShardedMachine with MODEL_SPLIT_HOMES=1 (the variant "expects one step" on a transfer's
    withdraw leg), shrunk to: fund alice (100.00); deliver the withdraw leg of t (30.00) saying
    expectedOperations 1, then its add leg and the withdraw leg again, both saying 2.

    With one shard the first delivery is a one-step request: committed (alice 70.00), and the
    other steps are late, parked as contradicting it. With three shards the first delivery is
    recorded and committed on alice's shard, the other two on t's home, where they complete a
    transfer that commits again: two outcome rows for t, and alice pays twice (40.00)."""
    shard_map = ShardMap(3)
    app = ns.app(LEDGER_SHARDS="3")
    alice, bob = _on_shard(shard_map, 1, "alice-", 1), _on_shard(shard_map, 2, "bob-", 1)
    rid = _on_shard(shard_map, 0, "t-", 2)
    send(app, step("fund", "fund-0", "add_funds", alice, "100.00", 1))
    send(app, step(rid, f"{rid}-w", "withdraw_funds", alice, "30.00", 1))  # "I am alone"
    send(app, step(rid, f"{rid}-a", "add_funds", bob, "30.00", 2),
         step(rid, f"{rid}-w", "withdraw_funds", alice, "30.00", 2))
    for shard in app.each_shard():
        run_election(shard)
    outcomes = [(shard.current, shard.ledger.read_outcome(rid)) for shard in app.each_shard()]
    decided = [(k, found.outcome.status) for k, found in outcomes if found is not None]
    assert len(decided) == 1, f"{rid} decided on more than one shard: {decided}"
    assert balance(app, alice) == Decimal("70.00")
    assert balance(app, bob) == Decimal("0.00")


def test_late_steps_that_complete_a_decided_request_are_not_coordinated_again(
        ns: Namespace) -> None:
    """ShardedMachine, seed 20260101 (CI's) once lost table responses were injected again,
    shrunk by hand to: r's withdraw leg (on shard 1) and its add leg (on r's home, shard 0)
    disagree on expectedOperations, so the first leader rejects r on the plain path. The same
    two steps, sent again by upstream with expectedOperations agreeing, are recorded by
    another instance (which did not decide r itself) before any leader looks: together they
    look like a complete cross-shard transfer. (With one shard the same late steps reach the
    plain commit, whose create of the outcome row is refused: they are settled as late.)

    Expected: they are late (r is rejected, for good): dropped or parked, nothing reserved,
    nothing left in flight. Found: r is coordinated, its payer's 25.00 is held in escrow for
    good, and every term of shard 0 stops on r's VOTE."""
    shard_map = ShardMap(3)
    first, other = ns.app("first", LEDGER_SHARDS="3"), ns.app("other", LEDGER_SHARDS="3")
    payer, payee = _on_shard(shard_map, 1, "payer-", 1), _on_shard(shard_map, 0, "payee-", 1)
    rid = _on_shard(shard_map, 0, "r-", 2)
    send(first, step("fund", "fund-0", "add_funds", payer, "50.00", 1))
    send(first, step(rid, f"{rid}-w", "withdraw_funds", payer, "25.00", 2),
         step(rid, f"{rid}-a", "add_funds", payee, "25.00", 3))
    assert first.ledger.read_outcome(rid) is not None
    assert first.ledger.read_outcome(rid).outcome.status == "rejected"  # type: ignore[union-attr]
    first.cleaner.wait_until_done(timeout=5)
    record(other, step(rid, f"{rid}-w", "withdraw_funds", payer, "25.00", 2),
           step(rid, f"{rid}-a", "add_funds", payee, "25.00", 2))
    for _ in range(3):
        for shard in other.each_shard():
            run_election(shard)
    assert other.ledger.read_outcome(rid).outcome.status == "rejected"  # type: ignore[union-attr]
    left = {s.current: [str(r["RowKey"]) for r in s.ledger.list_rows(FLIGHT_PREFIX)]
            for s in other.each_shard()}
    assert left == {0: [], 1: [], 2: []}, f"work in flight left: {left}"
    payer_row = other.on(1).ledger.read_account(payer)
    assert (payer_row.balance, payer_row.reserved) == (Decimal("50.00"), Decimal("0.00"))
    assert balance(other, payee) == Decimal("0.00")


def test_a_prepare_sent_again_after_its_vote_was_lost_is_answered_again(ns: Namespace) -> None:
    """ShardedMachine (a lost response on a voter's exchange transaction: its VOTE is never
    sent; then the home sends PREPARE again), shrunk by hand: the voter's transaction lands,
    its process stops before it sends the VOTE; RESEND_SECONDS later the home sends PREPARE
    again. The voter must answer again from its vote row, and the transfer commit."""
    shard_map = ShardMap(3)
    app = ns.app(LEDGER_SHARDS="3")
    payer, payee = _on_shard(shard_map, 1, "payer-", 1), _on_shard(shard_map, 2, "payee-", 1)
    rid = _on_shard(shard_map, 0, "t-", 2)
    send(app, step("fund", "fund-0", "add_funds", payer, "50.00", 1))
    record(app, step(rid, f"{rid}-w", "withdraw_funds", payer, "20.00", 2),
           step(rid, f"{rid}-a", "add_funds", payee, "20.00", 2))
    home, voter = app.on(0), app.on(1)
    Election(home).run(False)  # coordinates: PREPARE to shard 1
    assert [str(r["RowKey"]) for r in voter.ledger.list_rows(FLIGHT_PREFIX)] == \
        [f"flight:inbox:{rid}|prepare|0"]
    deliver = home.ledger.deliver
    home.ledger.deliver = lambda messages: None  # type: ignore[method-assign]  # voter stops
    try:
        Election(voter).run(False)  # votes yes: 20.00 in escrow; its VOTE is lost
    finally:
        home.ledger.deliver = deliver  # type: ignore[method-assign]
    assert voter.ledger.read_account(payer).reserved == Decimal("20.00")

    def prepare_sent_again() -> bool:
        Election(home).run(False)
        return any(str(r["RowKey"]).endswith("|prepare|0")
                   for r in voter.ledger.list_rows(FLIGHT_PREFIX))

    wait_until(prepare_sent_again, 40, "the home to send PREPARE again", interval=0.5)

    def settled() -> bool:
        for shard in app.each_shard():
            run_election(shard)
        return not any(s.ledger.list_rows(FLIGHT_PREFIX) for s in app.each_shard())

    wait_until(settled, 40, "the transfer to settle", interval=0.5)
    assert status(app, rid) == "committed"
    assert (balance(app, payer), balance(app, payee)) == (Decimal("30.00"), Decimal("20.00"))
    assert voter.ledger.read_account(payer).reserved == Decimal("0.00")
