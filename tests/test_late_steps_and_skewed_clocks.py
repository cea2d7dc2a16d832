"""Issue 11: one clock for expiry, late steps that contradict a decision, strict parsing.

Against a real Azurite; each test fails on the code before the fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from shared.storage.completions import Tombstone
from shared.storage.parking import ParkedKind
from shared.web import api
from tests.helpers import (
    ManualClock,
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


def skewed(by: timedelta) -> Callable[[], datetime]:
    """An instance wall clock that is off by ``by``."""
    return lambda: datetime.now(UTC) + by


# --- 1. expiry on one clock ---------------------------------------------------------------------
@pytest.mark.parametrize("skew", [timedelta(hours=-1), timedelta(days=1)],
                         ids=["recorder-one-hour-slow", "recorder-one-day-fast"])
def test_a_skewed_recording_instance_neither_expires_a_fresh_request_nor_keeps_an_old_one(
        ns: Namespace, skew: timedelta) -> None:
    recorder = ns.app("skewed", wallclock=skewed(skew), REQUEST_TIMEOUT_SECONDS="3")
    leader = ns.app("leader", wallclock=skewed(-skew), REQUEST_TIMEOUT_SECONDS="3")
    send(leader, *deposit("d1", "alice", "10.00"))
    w, a = transfer("t1", "alice", "bob", "4.00")
    send(recorder, w)
    run_election(leader)
    assert status(leader, "t1") is None, "a fresh request does not expire at once"
    send(recorder, a)
    assert status(leader, "t1") == "committed", "its completing step is not dropped as late"

    w2, _ = transfer("t2", "alice", "bob", "1.00")
    send(recorder, w2)
    # Storage's clock decides: the request expires about 3 s after it was recorded, however
    # far the recorder's and the leader's clocks are off.
    wait_until(lambda: bool(sweep_now(leader)) and status(leader, "t2") == "expired",
               timeout=15, what="t2 to expire on storage's clock", interval=0.5)
    assert balance(leader, "alice") == Decimal("6.00")


def test_the_time_of_record_is_storages_not_the_recorders(ns: Namespace) -> None:
    app = ns.app(wallclock=skewed(timedelta(days=-3)))
    before = datetime.now(UTC)
    send(app, *transfer("t1", "alice", "bob", "1.00")[:1])
    (recorded,) = app.completions.steps_of("t1")
    assert abs(recorded.recorded_at - before) < timedelta(seconds=30)


# --- 2. late steps that contradict the outcome ------------------------------------------
def parked_late(app: LedgerApp) -> list[str]:
    """The reasons of the late steps parked for contradicting their request's outcome."""
    return [m.error for m in app.parking.list() if m.kind is ParkedKind.LATE_CONTRADICTION]


def test_a_late_leg_with_other_expected_operations_is_parked_not_dropped(ns: Namespace) -> None:
    """The issue's case: a withdraw saying expectedOperations 1 commits alone; the add leg that
    says 2 arrives later. Money left one account and arrived nowhere: an operator must see it."""
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, step("t1", "t1-w", "withdraw_funds", "alice", "4.00", 1))
    assert status(app, "t1") == "committed"
    send(app, step("t1", "t1-a", "add_funds", "bob", "4.00", 2))
    errors = parked_late(app)
    assert len(errors) == 1
    assert "expectedOperations 2" in errors[0]
    assert "never applied" in errors[0]
    assert app.completions.count() == 0
    assert balance(app, "bob") == Decimal("0.00")
    view = api.leader(app).body
    assert view["parkedMessages"]["late-contradiction"] == 1
    (parked,) = [m for m in app.parking.list() if m.kind is ParkedKind.LATE_CONTRADICTION]
    assert json.loads(parked.body)["operationId"] == "t1-a", "replayable as the v1 message"


def test_a_late_contradicting_step_decided_elsewhere_is_parked_at_once(ns: Namespace) -> None:
    first, other = ns.app("first"), ns.app("other")
    send(first, *deposit("d1", "alice", "10.00"))
    send(first, step("t1", "t1-w", "withdraw_funds", "alice", "4.00", 1))
    send(other, step("t1", "t1-a", "add_funds", "bob", "4.00", 2))  # t1's tombstone says late
    assert len(parked_late(other)) == 1
    assert other.completions.count() == 0
    assert status(other, "t1") == "committed"


def test_a_late_contradicting_step_decided_elsewhere_long_ago_is_parked_at_expiry(
        ns: Namespace) -> None:
    clock = ManualClock()
    first = ns.app("first", time_shift=clock.shift)
    other = ns.app("other", time_shift=clock.shift)
    send(first, *deposit("d1", "alice", "10.00"))
    send(first, step("t1", "t1-w", "withdraw_funds", "alice", "4.00", 1))
    first.completions.delete([Tombstone("t1", "committed").ref])  # TOMBSTONE_SECONDS later
    send(other, step("t1", "t1-a", "add_funds", "bob", "4.00", 2))
    assert other.completions.count() == 1, "other never saw t1 decided: it waits"
    clock.advance(902)
    sweep_now(other)
    assert len(parked_late(other)) == 1
    assert other.completions.count() == 0
    assert status(other, "t1") == "committed"


def test_a_late_second_content_for_a_committed_step_is_parked(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    assert status(app, "d1") == "committed"
    send(app, step("d1", "d1-add", "add_funds", "alice", "99.00", 1))
    errors = parked_late(app)
    assert len(errors) == 1
    assert "content different" in errors[0]
    assert balance(app, "alice") == Decimal("10.00")


def test_a_late_extra_leg_of_a_committed_request_is_parked(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, *transfer("t1", "alice", "bob", "4.00"))
    send(app, step("t1", "t1-x", "add_funds", "carol", "4.00", 2))
    errors = parked_late(app)
    assert len(errors) == 1
    assert "not one of the 2 steps" in errors[0]
    assert balance(app, "carol") == Decimal("0.00")


def test_plain_duplicates_and_late_steps_of_requests_that_moved_no_money_are_dropped(
        ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    w, a = transfer("t1", "alice", "bob", "4.00")
    send(app, w, a, w, a)  # plain duplicates after the commit
    send(app, *transfer("t2", "alice", "bob", "1.00", fail="withdraw")[:1])  # aborted at once
    assert status(app, "t2") == "aborted"
    send(app, transfer("t2", "alice", "bob", "1.00")[1])  # its add leg, late
    assert parked_late(app) == []
    assert app.completions.count() == 0
    assert balance(app, "bob") == Decimal("4.00")


# --- 4. strict parsing ------------------------------------------------------------------------
VALID = {"requestId": "r1", "operationId": "r1-a", "operation": "add_funds",
         "accountId": "alice", "amount": "5.00", "expectedOperations": 1,
         "status": "succeeded"}


def _with(extra: str) -> bytes:
    return (json.dumps(VALID)[:-1] + ", " + extra + "}").encode()


@pytest.mark.parametrize(("body", "why"), [
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (_with('"note": ' + "[" * 5_000 + "]" * 5_000), "nested too deeply"),
    (_with('"note": ' + "9" * 5_000), "integer string conversion"),
    (_with('"amount": "500.00"'), "appears twice"),
    (json.dumps({**{k: v for k, v in VALID.items() if k != "requestId"},
                 "request_id": "r1"}).encode(), "the v1 name is 'requestId'"),
    (json.dumps({**VALID, "expected_operations": 2}).encode(),
     "the v1 name is 'expectedOperations'"),
], ids=["deep-array", "deep-ignored-field", "huge-int-in-ignored-field", "duplicate-key",
        "snake-case-id", "snake-case-alongside-camel"])
def test_bodies_the_strict_parser_refuses_are_parked_never_raised(
        ns: Namespace, body: bytes, why: str) -> None:
    app = ns.app()
    result = handle_completion(app, body, message_id="m1")
    assert result.parked
    (parked,) = app.parking.list()
    assert why in parked.error
    assert parked.body == body
    assert app.completions.count() == 0
    assert balance(app, "alice") == Decimal("0.00")
