"""The leader protocol under contention and faults, against a real Azurite."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from azure.storage.blob import BlobLeaseClient

from bench.probe import CallCounter
from shared.domain.clock import ComposedClock
from shared.domain.planning import FencedOut
from shared.election.elector import ElectionCallbacks, LeadershipLost, LeaseState
from shared.leadership.elections import Role, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import CompletionResult, handle_completion
from shared.leadership.term import LeaderTerm
from tests.helpers import (
    Namespace,
    balance,
    decided,
    deposit,
    fence_epoch,
    lease_blob,
    record,
    send,
    status,
    transfer,
    wait_until,
)


class FakeMonotonic:
    """A monotonic clock the test moves by hand (to reach renew points without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _external_lease(app: LedgerApp) -> BlobLeaseClient:
    """A lease client on the election blob that is not any instance's (an operator, a test)."""
    return BlobLeaseClient(lease_blob(app))


def _lead(app: LedgerApp) -> LeaderTerm:
    lease = app.elector.try_acquire()
    assert lease is not None
    return LeaderTerm.begin(app, lease)


def test_non_leaders_record_and_exit_without_touching_balances(ns: Namespace) -> None:
    app = ns.app()
    holder = _external_lease(app)
    holder.acquire(lease_duration=60)
    results = send(app, *deposit("d1", "alice", "10.00"))
    election = results[0].election
    assert election is not None
    assert election.role is Role.FOLLOWER
    assert election.terms == []
    assert app.completions.count() == 1, "the completion is recorded"
    assert status(app, "d1") is None
    assert app.ledger.read_account("alice").etag is None, "no balance row was written"
    holder.release()
    assert run_election(app).role is Role.LEADER
    assert balance(app, "alice") == Decimal("10.00")


def test_what_a_follower_spends_per_delivery(ns: Namespace) -> None:
    counter = CallCounter()
    app = ns.app(request_hook=counter)
    app.elector.skip_seconds = 0  # every announcing delivery attempts (no skip window here)
    holder = _external_lease(app)
    holder.acquire(lease_duration=60)
    counter.calls.clear()
    send(app, *deposit("d1", "alice", "10.00"))
    assert counter.calls == {"POST": 1, "PATCH": 1, "PUT": 1}, \
        "one transaction (its row and the request's row), announce it, try the lease"
    w, a = transfer("t1", "alice", "bob", "1.00")
    counter.calls.clear()
    send(app, w)
    assert counter.calls == {"POST": 1}, \
        "the first leg: one transaction, and no read (it is the request's only row) or attempt"
    counter.calls.clear()
    send(app, a)
    assert counter.calls == {"POST": 2, "GET": 1, "PATCH": 1, "PUT": 1}, \
        "the last leg: the transaction refused (the request has its row), its row alone, " \
        "read the request's rows (one key range), announce it, try the lease"
    holder.release()


def test_a_deposed_leader_commits_nothing(ns: Namespace) -> None:
    old, new = ns.app("old"), ns.app("new")
    send(new, *deposit("d0", "alice", "100.00"))
    stale = _lead(old)  # old leads with epoch 2 ...
    # ... then pauses past its lease; an operator (or expiry) breaks it and `new` takes over.
    _external_lease(old).break_lease(lease_break_period=0)
    send(new, *transfer("t1", "alice", "bob", "30.00"))
    assert status(new, "t1") == "committed"
    epoch_after_new = fence_epoch(new)
    assert epoch_after_new > stale.fence.epoch
    # Work that the old leader would commit when it resumes:
    record(new, *transfer("t2", "alice", "bob", "50.00"))
    with pytest.raises(FencedOut):
        stale.commit_ready(budget_deadline=old.clock.monotonic() + 60)
    assert status(new, "t2") is None, "the stale leader wrote no outcome"
    assert balance(new, "alice") == Decimal("70.00")
    assert balance(new, "bob") == Decimal("30.00")
    assert fence_epoch(new) == epoch_after_new
    # The work is not lost: the next leader commits it.
    run_election(new)
    assert status(new, "t2") == "committed"
    assert balance(new, "alice") == Decimal("20.00")
    assert balance(new, "bob") == Decimal("80.00")


def test_a_failed_renewal_stops_the_leader_before_its_next_commit(ns: Namespace) -> None:
    clock = FakeMonotonic()
    stopped: list[LeaseState] = []
    callbacks = ElectionCallbacks(on_stopped_leading=lambda _id, state: stopped.append(state))
    old = ns.app("old", callbacks=callbacks)
    old.clock = ComposedClock(monotonic=clock)
    old.elector.clock = clock
    term = _lead(old)
    _external_lease(old).break_lease(lease_break_period=0)
    record(old, *deposit("d1", "alice", "5.00"))
    clock.now += old.config.election.renew_interval_seconds  # renew is due
    with pytest.raises(LeadershipLost, match="renewing lease"):
        term.commit_ready(budget_deadline=clock.now + 60)
    assert stopped == [LeaseState.LOST]
    assert status(old, "d1") is None


def test_no_commit_starts_past_the_renew_deadline(ns: Namespace) -> None:
    clock = FakeMonotonic()
    app = ns.app()
    app.clock = ComposedClock(monotonic=clock)
    app.elector.clock = clock
    term = _lead(app)
    record(app, *deposit("d1", "alice", "5.00"))
    # Pretend renewals were not sent for longer than lease - margin (e.g. a long GC pause that
    # froze the renewer but not the clock): the lease may have expired, so nothing may start.
    term.lease.last_renew_sent = clock.now
    term.lease.renew_if_due = lambda: None  # type: ignore[method-assign]
    clock.now += app.config.election.renew_deadline_seconds - 1
    with pytest.raises(LeadershipLost, match="less than"):
        term.commit_ready(budget_deadline=clock.now + 600)
    assert status(app, "d1") is None


def test_completion_recorded_while_leader_holds_the_lease_is_committed_without_new_traffic(
        ns: Namespace) -> None:
    late_results: list[CompletionResult] = []

    def record_from_another_instance(_holder: str) -> None:
        if not late_results:  # once: the leader has drained and is about to release
            late_results.append(handle_completion(other, deposit("late", "bob", "7.00")[0],
                                                  message_id="m-late"))

    leader = ns.app("leader", callbacks=ElectionCallbacks(
        before_release=record_from_another_instance))
    other = ns.app("other")
    send(leader, *deposit("d1", "alice", "1.00"))
    assert late_results, "the hook ran"
    election = late_results[0].election
    assert election is not None
    assert election.role is Role.FOLLOWER, "the other instance exited early"
    # No further message, no sweeper: the leader looked again after releasing.
    assert status(leader, "late") == "committed"
    assert balance(leader, "bob") == Decimal("7.00")


def test_sixteen_concurrent_invocations_on_one_hot_account(ns: Namespace) -> None:
    leaders_now = 0
    most_at_once = 0
    guard = threading.Lock()

    def started(_holder: str) -> None:
        nonlocal leaders_now, most_at_once
        with guard:
            leaders_now += 1
            most_at_once = max(most_at_once, leaders_now)

    def stopping(_holder: str) -> None:
        nonlocal leaders_now
        with guard:
            leaders_now -= 1

    callbacks = ElectionCallbacks(on_started_leading=started, before_release=stopping)
    apps = [ns.app(f"i{i}", callbacks=callbacks) for i in range(16)]
    send(apps[0], *deposit("fund", "hot", "1000.00"))
    amounts = [Decimal(f"{i + 1}.{i:02d}") for i in range(16)]  # 1.00, 2.01, ... 16.15
    bodies = [body for i, amount in enumerate(amounts)
              for body in transfer(f"t{i}", "hot", f"cold{i}", str(amount))]
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def invoke(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            for body in bodies[index * 2:index * 2 + 2]:
                handle_completion(apps[index], body, message_id=f"m{index}-{len(body)}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=invoke, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert most_at_once == 1, "never two leaders at once"
    assert leaders_now == 0
    assert [status(apps[0], f"t{i}") for i in range(16)] == ["committed"] * 16
    assert balance(apps[0], "hot") == Decimal("1000.00") - sum(amounts)
    for i, amount in enumerate(amounts):
        assert balance(apps[0], f"cold{i}") == amount
    assert apps[0].completions.count() == 0


def test_each_leadership_claims_a_strictly_higher_epoch(ns: Namespace) -> None:
    app = ns.app()
    epochs = []
    for i in range(3):
        send(app, *deposit(f"d{i}", "alice", "1.00"))
        epochs.append(decided(app, f"d{i}").epoch)
    assert epochs == sorted(set(epochs))
    assert len(epochs) == 3


def test_a_leader_reuses_its_balances_only_while_nobody_else_wrote(ns: Namespace) -> None:
    a, b = ns.app("a"), ns.app("b")
    send(a, *deposit("d1", "alice", "10.00"))
    assert a.snapshot is not None
    known_etag = a.snapshot.etag
    fence, continued = a.ledger.claim_epoch("a/test", a.clock.now(), a.snapshot)
    assert continued, "nothing was written since a's commit: one-call claim"
    assert fence.etag != known_etag
    send(b, *deposit("d2", "alice", "5.00"))  # b claims and writes: a's snapshot is stale now
    _, continued = a.ledger.claim_epoch("a/test", a.clock.now(), a.snapshot)
    assert not continued
    send(a, *transfer("t1", "alice", "bob", "15.00"))  # needs b's 5.00 to be seen
    assert status(a, "t1") == "committed"
    assert balance(a, "alice") == Decimal("0.00")
    assert balance(a, "bob") == Decimal("15.00")


def test_a_balance_edited_outside_the_leader_is_read_again_not_overwritten(
        ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"))
    # An operator corrects the row by hand (the fence is untouched, so the leader's snapshot
    # still looks current): the account's own ETag must catch it.
    row = app.ledger.table.get("ledger", "account:alice")
    row["balance"] = "100.00"
    app.ledger.table.update(row)
    send(app, *deposit("d2", "alice", "5.00"))
    assert status(app, "d2") == "committed"
    assert balance(app, "alice") == Decimal("105.00")


def test_the_lease_renews_in_the_background_and_a_lost_lease_stops_the_leader(
        ns: Namespace) -> None:
    stopped: list[LeaseState] = []
    app = ns.app(callbacks=ElectionCallbacks(
        on_stopped_leading=lambda _id, state: stopped.append(state)),
        LEASE_SECONDS="15", RENEW_INTERVAL_SECONDS="1", LEASE_SAFETY_MARGIN_SECONDS="5")
    lease = app.elector.try_acquire()
    assert lease is not None
    first = lease.last_renew_sent
    lease.keep_renewing()
    wait_until(lambda: lease.last_renew_sent > first, 10, "a background renewal")
    _external_lease(app).break_lease(lease_break_period=0)
    wait_until(lambda: lease.state is LeaseState.LOST, 10, "the failed renewal to be noticed")
    assert stopped == [LeaseState.LOST]
    with pytest.raises(LeadershipLost):
        lease.ensure_can_start(1)
