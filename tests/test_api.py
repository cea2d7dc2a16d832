"""The read API's replies (``shared.web.api``), against a real Azurite."""

from __future__ import annotations

import pytest

from shared.leadership.instance import LedgerApp
from shared.storage.completions import bucket_of
from shared.web import api
from tests.helpers import Namespace, deposit, send, step, transfer


@pytest.fixture
def app(ns: Namespace) -> LedgerApp:
    return ns.app()


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 129, "caf\u00e9", "a~b", "a?b",
                                 "abc\n"])
def test_invalid_identifiers_are_400(app: LedgerApp, bad: str) -> None:
    for reply, kind in ((api.account(app, bad), "accountId"), (api.request(app, bad), "requestId")):
        assert reply.status == 400
        assert kind in reply.body["error"]


def test_the_longest_valid_identifier_is_accepted(app: LedgerApp) -> None:
    longest = "A-z_0.9:" * 16
    assert len(longest) == 128
    assert api.account(app, longest).status == 404
    assert api.request(app, longest).status == 404


def test_unknown_account_and_request_are_404(app: LedgerApp) -> None:
    reply = api.account(app, "nobody")
    assert reply.status == 404
    assert "nobody" in reply.body["error"]
    reply = api.request(app, "nothing")
    assert reply.status == 404
    assert "nothing" in reply.body["error"]


def test_a_request_named_like_a_bucket_is_404_not_built_from_other_requests_rows(
        app: LedgerApp) -> None:
    """Step rows live in 16 buckets (b00-b15). A query that also matched ``PartitionKey eq
    requestId`` answered ``GET /api/requests/b00`` with other requests' rows."""
    in_b00 = [f"t{i}" for i in range(400) if bucket_of(f"t{i}") == "b00"][:3]
    for request_id in in_b00:
        send(app, transfer(request_id, "alice", "bob", "1.00")[0])  # one leg of two: pending
    assert api.request(app, in_b00[0]).body["status"] == "pending"
    reply = api.request(app, "b00")
    assert reply.status == 404, reply.body


def test_committed_balances_are_two_decimal_strings(app: LedgerApp) -> None:
    send(app, *deposit("d1", "alice", "100"))
    send(app, *transfer("t1", "alice", "bob", "100.00"))
    assert api.account(app, "alice") == api.Reply(200, {"accountId": "alice",
                                                        "balance": "0.00"})
    assert api.account(app, "bob").body["balance"] == "100.00"


def test_committed_request_has_no_reason_and_names_its_epoch(app: LedgerApp) -> None:
    send(app, *deposit("d1", "alice", "1.50"))
    reply = api.request(app, "d1")
    assert reply.status == 200
    assert reply.body["requestId"] == "d1"
    assert reply.body["status"] == "committed"
    assert reply.body["reason"] is None
    assert reply.body["epoch"] >= 1
    assert reply.body["decidedAt"]


def test_pending_request_says_how_many_steps_arrived(app: LedgerApp) -> None:
    withdraw, _ = transfer("t1", "alice", "bob", "5.00")
    send(app, withdraw)
    assert api.request(app, "t1") == api.Reply(200, {"requestId": "t1", "status": "pending",
                                                     "reason": "1 of 2 steps arrived"})


def test_a_duplicate_step_is_not_counted_twice_while_pending(app: LedgerApp) -> None:
    first = step("r1", "a", "add_funds", "alice", "1.00", 3)
    send(app, first, first, step("r1", "b", "add_funds", "alice", "1.00", 3))
    assert api.request(app, "r1").body["reason"] == "2 of 3 steps arrived"


def test_aborted_request_names_the_failed_step(app: LedgerApp) -> None:
    send(app, *deposit("d1", "alice", "10.00"))
    send(app, *transfer("t1", "alice", "bob", "5.00", fail="withdraw"))
    reply = api.request(app, "t1")
    assert reply.status == 200
    assert reply.body["status"] == "aborted"
    assert "t1-w" in reply.body["reason"]
    assert reply.body["epoch"] >= 1
    assert api.account(app, "alice").body["balance"] == "10.00"
    assert api.account(app, "bob").status == 404, "an aborted request creates no account"


def test_rejected_request_gives_the_reason(app: LedgerApp) -> None:
    send(app, *transfer("t1", "alice", "bob", "0.01"))
    reply = api.request(app, "t1")
    assert reply.status == 200
    assert reply.body["status"] == "rejected"
    assert "insufficient funds" in reply.body["reason"]
    assert "alice" in reply.body["reason"]
    assert api.account(app, "alice").status == 404


def test_leader_view_before_and_after_a_leader(app: LedgerApp) -> None:
    before = api.leader(app)
    assert before.status == 200
    assert before.body["epoch"] == 0
    assert before.body["holder"] is None
    assert before.body["lastHolder"] is None
    assert before.body["lastCommitAt"] is None
    assert before.body["lease"]["state"] == "available"
    assert before.body["pendingCompletions"] == 0

    send(app, *deposit("d1", "alice", "1.00"))
    send(app, step("r2", "a", "add_funds", "bob", "1.00", 2))
    after = api.leader(app).body
    assert after["epoch"] >= 1
    assert app.config.instance_id in after["lastHolder"]
    assert after["lastCommitAt"]
    assert after["pendingCompletions"] == 1


def test_leader_view_shows_the_fence_holder_while_the_lease_is_held(app: LedgerApp) -> None:
    send(app, *deposit("d1", "alice", "1.00"))  # a leader claimed an epoch, then released
    fence = app.ledger.read_fence()
    assert fence is not None
    held = app.elector.try_acquire()
    assert held is not None
    try:
        view = api.leader(app).body
        assert view["lease"] == {"state": "leased", "status": "locked"}
        assert view["holder"] == fence.holder
        assert view["epoch"] == fence.epoch
    finally:
        held.release()
    assert api.leader(app).body["holder"] is None
