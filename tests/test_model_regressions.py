"""Counterexamples found by the model-based test (``tests/test_model.py``), shrunk, kept as plain
tests so that they run the same way every time.

Each says which run found it and what the shrunk program was.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient

from shared.domain.planning import FencedOut
from shared.leadership.elections import run_election
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
