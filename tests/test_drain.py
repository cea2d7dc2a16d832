"""The batched drain: deletes off the commit's path, incremental reads, follower skips."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest

from bench.probe import CallCounter, StorageProbe
from shared.election.elector import ElectionCallbacks, LeaseState
from shared.leadership.elections import Role, run_election
from shared.leadership.intake import handle_completion
from shared.storage.completions import BUCKETS, bucket_of
from tests.helpers import Namespace, balance, deposit, ready, record, send, status, transfer


def test_rows_of_many_requests_are_deleted_in_one_transaction_per_bucket(ns: Namespace) -> None:
    counter = CallCounter()
    app = ns.app(request_hook=counter)
    requests = [f"d{i}" for i in range(60)]
    for request_id in requests:
        record(app, *deposit(request_id, f"acct{int(request_id[1:]) % 5}", "1.00"))
    counter.calls.clear()
    assert run_election(app).role is Role.LEADER
    assert all(status(app, r) == "committed" for r in requests)
    assert app.completions.count() == 0
    buckets = {bucket_of(r) for r in requests}
    assert len(buckets) <= BUCKETS
    # 60 rows: one delete transaction per bucket they fall in (not one per request), one for
    # the 60 markers, plus one commit and the lease alarm's send (POSTs), and one send per
    # outcome event (60: docs/design.md 3.10); the fence claim, 5 account reads, the reads of
    # the ready index, the lease calls and the outbox row's delete are other methods.
    assert counter.calls["POST"] <= len(buckets) + 1 + 1 + 1 + len(requests)


def test_a_commit_whose_rows_were_never_deleted_is_not_applied_again(ns: Namespace) -> None:
    crashed = ns.app("crashed")

    def die(*_rows: object) -> None:
        raise RuntimeError("the process died right after the commit")

    crashed.cleaner.delete = die  # type: ignore[method-assign,assignment]
    send(crashed, *deposit("d1", "alice", "10.00"))
    assert status(crashed, "d1") == "committed"
    assert crashed.completions.count() > 0, "the rows outlived their commit"
    other = ns.app("other")
    assert run_election(other).role is Role.LEADER
    assert balance(other, "alice") == Decimal("10.00"), "not applied a second time"
    assert other.completions.count() == 0, "the next leader removed them as late"


def test_a_follower_that_saw_a_leader_skips_its_attempt_and_the_final_look_commits_its_work(
        ns: Namespace) -> None:
    counter = CallCounter()
    follower = ns.app("follower", request_hook=counter)
    calls: list[int] = []
    roles: list[Role | None] = []

    def deliver(body: bytes) -> None:
        before = counter.total
        result = handle_completion(follower, body, message_id=body.decode()[:40])
        calls.append(counter.total - before)
        roles.append(result.election.role if result.election else None)

    released: list[bool] = []
    leader = ns.app("leader", callbacks=ElectionCallbacks(
        # While the leader holds the lease, before its first scan: the follower is refused.
        on_started_leading=lambda _id: None if calls else deliver(deposit("f1", "bob", "1.00")[0]),
        on_stopped_leading=lambda _id, state: released.append(state is LeaseState.RELEASED)))
    for app in (leader, follower):  # every instance runs with one window; 2 s keeps this exact
        app.elector.skip_seconds = 2.0
    scan = leader.completions.ready

    def scan_then_deliver(*args: Any, **kwargs: Any) -> Any:
        answer = scan(*args, **kwargs)
        if released and len(calls) == 1:
            # The worst case: after the leader released and looked once, inside the window.
            deliver(deposit("f2", "bob", "2.00")[0])
        return answer

    leader.completions.ready = scan_then_deliver  # type: ignore[method-assign]
    send(leader, *deposit("d1", "alice", "1.00"))
    assert calls == [3, 2], "insert, announce, refused attempt; then insert and announce alone"
    assert roles == [Role.FOLLOWER, Role.FOLLOWER]
    assert follower.elector.skipped == 1
    # No further message and no sweeper: the leader's last look, skip_seconds after its
    # release, found f2 and committed it (f1 was committed in its term).
    assert status(leader, "f1") == "committed"
    assert status(leader, "f2") == "committed"
    assert balance(leader, "bob") == Decimal("3.00")


def test_a_lone_instance_does_not_wait_for_skippers_that_cannot_exist(ns: Namespace) -> None:
    app = ns.app()
    app.elector.skip_seconds = 30.0  # a wait would show
    started = time.monotonic()
    send(app, *deposit("d1", "alice", "1.00"), *transfer("t1", "alice", "bob", "1.00"))
    assert time.monotonic() - started < 15, "no other instance recorded: no final wait"
    assert status(app, "t1") == "committed"


def test_the_leader_reads_only_announced_requests_and_skips_rows_being_deleted(
        ns: Namespace) -> None:
    app = ns.app()
    record(app, *deposit("d1", "alice", "1.00"))
    assert [r.request_id for r in ready(app).decidable] == ["d1"]
    record(app, *deposit("d2", "alice", "2.00"), *transfer("t1", "alice", "bob", "1.00")[:1])
    found = ready(app)
    assert [r.request_id for r in found.decidable] == ["d1", "d2"], \
        "t1 has one of two legs: not announced, so never read by the leader"
    assert not found.unconfirmed
    d2 = found.decidable[1]
    app.cleaner.delete(d2.consumed)  # queued for deletion: the step row and the marker
    assert [r.request_id for r in ready(app).decidable] == ["d1"]
    assert app.cleaner.wait_until_done(timeout=10)
    assert app.completions.steps_of("d2") == []
    assert [r.request_id for r in ready(app).decidable] == ["d1"]
    assert len(app.completions.steps_of("t1")) == 1, "the waiting leg stays recorded"


def test_a_crash_that_left_many_committed_rows_costs_the_next_leader_one_failed_transaction(
        ns: Namespace) -> None:
    crashed = ns.app("crashed")

    def die(*_rows: object) -> None:
        raise RuntimeError("the process died right after the commit")

    crashed.cleaner.delete = die  # type: ignore[method-assign,assignment]
    record(crashed, *[body for i in range(30) for body in deposit(f"d{i}", "alice", "1.00")])
    with pytest.raises(RuntimeError, match="died"):
        run_election(crashed)
    assert balance(crashed, "alice") == Decimal("30.00")
    env = ns.env()
    probe = StorageProbe(env["COMPLETIONS_TABLE_NAME"], (env["LEDGER_TABLE_NAME"],),
                         (env["LEASE_CONTAINER_NAME"],))
    other = ns.app("other", request_hook=probe)
    run_election(other)
    assert balance(other, "alice") == Decimal("30.00"), "nothing applied twice"
    assert other.completions.count() == 0, "all 30 settled as late"
    # The claim, the takeover's record (the crashed leader never released its lease), then one
    # transaction refused at its first outcome; the other 29 outcomes were read at once instead
    # of being found one refused transaction at a time.
    assert probe.counts["commit"] <= 3, probe.counts
