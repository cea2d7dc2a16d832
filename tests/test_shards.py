"""Shards against a real Azurite: K = 4 leases and ledger partitions, atomic cross-shard requests.

Every test drives the app through its queue trigger's handler (``handle_completion``) and reads
what it did through the read API or straight from storage: balances to the cent on each
account's own shard, request statuses, and the work in flight left in every partition.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient

from shared.config.names import completions_table_name, lease_blob_name, ledger_partition
from shared.domain.exchange import APPLIED_PREFIX, FLIGHT_PREFIX, VOTE_PREFIX
from shared.domain.model import OutcomeStatus
from shared.domain.planning import FencedOut
from shared.domain.sharding import ShardMap
from shared.election.elector import ElectionCallbacks
from shared.leadership.elections import Election, run_election
from shared.leadership.exchange import deliver
from shared.leadership.instance import LedgerApp
from shared.leadership.term import LeaderTerm
from shared.leadership.view import ReadyView
from shared.web import api
from tests.helpers import (
    Namespace,
    balance,
    deposit,
    ready,
    record,
    send,
    step,
    take_alarms,
    transfer,
    wait_until,
)

SHARDS = 4
MAP = ShardMap(SHARDS)


def accounts_on(shard: int, count: int, prefix: str = "acct") -> list[str]:
    """``count`` account ids whose balances live on ``shard``."""
    return list(itertools.islice((f"{prefix}-{i}" for i in itertools.count()
                                  if MAP.account_shard(f"{prefix}-{i}") == shard), count))


def request_on(shard: int, prefix: str) -> str:
    """A multi-step request id homed on ``shard``."""
    return next(f"{prefix}-{i}" for i in itertools.count()
                if MAP.home_of(f"{prefix}-{i}", 2, "") == shard)


def sharded(ns: Namespace, instance_id: str | None = None, **overrides: str) -> LedgerApp:
    settings: dict[str, Any] = {"LEDGER_SHARDS": str(SHARDS), **overrides}
    return ns.app(instance_id, **settings)


def status(app: LedgerApp, request_id: str) -> str:
    reply = api.request(app, request_id)
    return str(reply.body.get("status", reply.status))


def in_flight(app: LedgerApp) -> dict[int, list[str]]:
    """Rows of work in flight (coordinations, messages, escrows) left in each shard."""
    found = {k: [str(r["RowKey"]) for r in s.ledger.list_rows(FLIGHT_PREFIX)]
             for k, s in enumerate(app.each_shard())}
    return {k: rows for k, rows in found.items() if rows}


def reserved(app: LedgerApp) -> dict[str, Decimal]:
    return {account: row.reserved for s in app.each_shard()
            for account, row in s.ledger.list_accounts().items() if row.reserved}


def total(app: LedgerApp) -> Decimal:
    return sum((b for s in app.each_shard() for b in s.ledger.list_balances().values()),
               Decimal("0.00"))


def settle(app: LedgerApp, request_ids: list[str], timeout: float = 30) -> None:
    """Run elections on every shard until each request reads final (no sleep-and-hope)."""
    def final() -> bool:
        for shard in app.each_shard():
            run_election(shard)
        return all(status(app, r) in {"committed", "aborted", "rejected", "expired"}
                   for r in request_ids)
    wait_until(final, timeout, f"{request_ids} to read final")


def test_one_shard_keeps_every_name_of_an_unsharded_deployment(ns: Namespace) -> None:
    app = ns.app()
    assert len(app.shards) == 1
    assert app.elector.lock.blob.blob_name == app.config.lease_blob  # type: ignore[attr-defined]
    assert app.ledger.partition == "ledger"
    send(app, *deposit("d1", "alice", "5.00"))
    assert app.ledger.table.get("ledger", "account:alice")["balance"] == "5.00"
    assert [lease_blob_name("x", 0), ledger_partition(0), completions_table_name("c", 0)] == \
        ["x", "ledger", "c"]


def test_names_and_homes_of_four_shards(ns: Namespace) -> None:
    app = sharded(ns)
    assert [s.ledger.partition for s in app.shards] == ["ledger", "ledger-1", "ledger-2",
                                                        "ledger-3"]
    [alice] = accounts_on(2, 1)
    results = send(app, *deposit("dep-1", alice, "7.25"))
    assert results[0].election is not None
    assert results[0].election.shard == 2
    assert app.on(2).ledger.read_account(alice).balance == Decimal("7.25")
    assert app.on(0).ledger.read_account(alice).etag is None  # nowhere else
    assert status(app, "dep-1") == "committed"
    assert api.account(app, alice).body == {"accountId": alice, "balance": "7.25"}


def test_a_cross_shard_transfer_commits_all_legs_exactly_once(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(3, 1)
    send(app, *deposit("fund", alice, "100.00"))
    rid = request_on(0, "t")  # home 0: neither account's shard
    send(app, *transfer(rid, alice, bob, "30.00"))
    settle(app, [rid])
    assert status(app, rid) == "committed"
    assert (balance(app, alice), balance(app, bob)) == (Decimal("70.00"), Decimal("30.00"))
    assert in_flight(app) == {}
    assert reserved(app) == {}
    # Every shard with a leg has its applied marker; the voter its vote.
    assert [r["RowKey"] for r in app.on(1).ledger.list_rows(APPLIED_PREFIX)] == \
        [f"applied:{rid}"]
    assert [r["RowKey"] for r in app.on(3).ledger.list_rows(APPLIED_PREFIX)] == \
        [f"applied:{rid}"]
    assert app.on(1).ledger.list_rows(VOTE_PREFIX)[0]["vote"] == "yes"


def test_the_home_holding_the_debit_decides_in_one_transaction(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(2, 1), accounts_on(0, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(2, "t")  # home = the debit's shard: no vote
    results = send(app, *transfer(rid, alice, bob, "4.00"))
    election = results[-1].election
    assert election is not None
    assert sum(t.messages.get("vote", 0) for v in [election, *election.visits]
               for t in v.terms) == 0
    settle(app, [rid])
    assert (balance(app, alice), balance(app, bob)) == (Decimal("6.00"), Decimal("4.00"))
    assert in_flight(app) == {}


def test_a_three_shard_request_with_one_account_short_is_rejected_with_nothing_applied(
        ns: Namespace) -> None:
    app = sharded(ns)
    [a], [b], [c] = accounts_on(1, 1), accounts_on(2, 1), accounts_on(3, 1)
    send(app, *deposit("fa", a, "50.00"), *deposit("fb", b, "5.00"))
    rid = request_on(0, "multi")
    bodies = [step(rid, "w1", "withdraw_funds", a, "20.00", 3),
              step(rid, "w2", "withdraw_funds", b, "10.00", 3),  # b has 5.00
              step(rid, "add", "add_funds", c, "30.00", 3)]
    send(app, *bodies)
    settle(app, [rid])
    reply = api.request(app, rid).body
    assert reply["status"] == "rejected"
    assert "insufficient funds" in reply["reason"]
    assert (balance(app, a), balance(app, b), balance(app, c)) == \
        (Decimal("50.00"), Decimal("5.00"), Decimal("0.00"))
    assert in_flight(app) == {}
    assert reserved(app) == {}


def test_a_failed_step_aborts_a_cross_shard_transfer(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(3, "t")
    send(app, *transfer(rid, alice, bob, "10.00", fail="add"))
    settle(app, [rid])
    assert status(app, rid) == "aborted"
    assert (balance(app, alice), balance(app, bob)) == (Decimal("10.00"), Decimal("0.00"))
    assert in_flight(app) == {}


def test_reads_say_committing_and_reserved_until_every_shard_applied(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    # Another instance holds shard 2's lease: the credit cannot land yet.
    holder = BlobLeaseClient(app.clients.blob.get_blob_client(
        app.config.lease_container, lease_blob_name(app.config.lease_blob, 2)))
    holder.acquire(lease_duration=60)
    try:
        send(app, *transfer(rid, alice, bob, "3.00"))
        wait_until(lambda: run_election(app.on(0)) is not None and
                   status(app, rid) == "committing" and
                   app.on(0).ledger.read_outcome(rid) is not None, 15, "the decision")
        assert api.request(app, rid).body["status"] == "committing"
        assert api.account(app, alice).body == {"accountId": alice, "balance": "7.00"}
        assert balance(app, bob) == Decimal("0.00")
    finally:
        holder.release()
    settle(app, [rid])
    assert api.account(app, bob).body == {"accountId": bob, "balance": "3.00"}


def test_concurrent_cross_shard_transfers_with_duplicates_and_out_of_order_legs(
        ns: Namespace) -> None:
    """Three instances, shuffled legs delivered twice each: exact to the cent, once each."""
    rng = random.Random(16)
    instances = [sharded(ns, f"i{n}") for n in range(3)]
    app = instances[0]
    accounts = [a for k in range(SHARDS) for a in accounts_on(k, 2)]
    for account in accounts:
        send(app, *deposit(f"fund-{account}", account, "20.00"))
    expected = {a: Decimal("20.00") for a in accounts}
    bodies: list[bytes] = []
    ids = []
    for n in range(24):
        source, target = rng.sample(accounts, 2)
        amount = Decimal(rng.randint(1, 900)) / 100
        rid = f"x{n}"
        ids.append(rid)
        bodies += transfer(rid, source, target, str(amount)) * 2
    rng.shuffle(bodies)
    chunks = [bodies[i::3] for i in range(3)]
    threads = [threading.Thread(target=send, args=(instance, *chunk))
               for instance, chunk in zip(instances, chunks, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    settle(app, ids, timeout=60)
    # Replay the decisions in order of nothing: each committed transfer moved its amount once.
    for rid in ids:
        outcome = next(s.ledger.read_outcome(rid) for s in app.each_shard()
                       if s.ledger.read_outcome(rid) is not None)
        assert outcome is not None
        if outcome.outcome.status is OutcomeStatus.COMMITTED:
            for account, amount in outcome.outcome.legs:
                expected[account] += amount
    assert {a: balance(app, a) for a in accounts} == expected
    assert all(b >= 0 for b in expected.values())
    assert total(app) == Decimal("20.00") * len(accounts)
    assert in_flight(app) == {}
    assert reserved(app) == {}


def test_two_idle_shards_decide_and_apply_in_seconds_without_the_sweeper(
        ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(3, "t")
    started = time.monotonic()
    send(app, *transfer(rid, alice, bob, "1.50"))  # the queue trigger alone: no sweep
    elapsed = time.monotonic() - started
    assert status(app, rid) == "committed", in_flight(app)
    assert elapsed < 10
    assert (balance(app, alice), balance(app, bob)) == (Decimal("8.50"), Decimal("1.50"))


@pytest.mark.parametrize("seed", [1, 2])
def test_lease_breaks_on_every_shard_during_transfers_lose_nothing(ns: Namespace,
                                                                   seed: int) -> None:
    rng = random.Random(seed)
    instances = [sharded(ns, f"i{n}", LEASE_SECONDS="15") for n in range(2)]
    app = instances[0]
    accounts = [a for k in range(SHARDS) for a in accounts_on(k, 2)]
    for account in accounts:
        send(app, *deposit(f"fund-{account}", account, "5.00"))
    bodies: list[bytes] = []
    ids = []
    for n in range(30):
        source, target = rng.sample(accounts, 2)
        ids.append(f"b{n}")
        bodies += transfer(f"b{n}", source, target, str(Decimal(rng.randint(100, 400)) / 100))
    rng.shuffle(bodies)
    stop = threading.Event()

    def breaker() -> None:
        blobs = [app.clients.blob.get_blob_client(app.config.lease_container,
                                                  lease_blob_name(app.config.lease_blob, k))
                 for k in range(SHARDS)]
        while not stop.is_set():
            for blob in blobs:
                with contextlib.suppress(Exception):
                    BlobLeaseClient(blob).break_lease(lease_break_period=0)
            stop.wait(0.05)

    thread = threading.Thread(target=breaker)
    thread.start()
    try:
        workers = [threading.Thread(target=send, args=(inst, *bodies[i::2]))
                   for i, inst in enumerate(instances)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        stop.set()
        thread.join()
    settle(app, ids, timeout=90)
    committed: dict[str, Decimal] = {a: Decimal("5.00") for a in accounts}
    for rid in ids:
        found = [s.ledger.read_outcome(rid) for s in app.each_shard()]
        decided = [d for d in found if d is not None]
        assert len(decided) == 1, rid  # one decision row, one shard
        if decided[0].outcome.status is OutcomeStatus.COMMITTED:
            for account, amount in decided[0].outcome.legs:
                committed[account] += amount
    assert {a: balance(app, a) for a in accounts} == committed
    assert min(committed.values()) >= 0
    assert in_flight(app) == {}
    assert reserved(app) == {}


def elect_only(app: LedgerApp, shard: int) -> None:
    """One election of ``shard`` alone (the shards it messages are not driven)."""
    Election(app.on(shard)).run(False)


def test_money_held_for_a_vote_shows_as_reserved_and_nowhere_else(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    record(app, *transfer(rid, alice, bob, "3.00"))
    elect_only(app, 0)  # the home coordinates: PREPARE to shard 1
    assert status(app, rid) == "committing"
    elect_only(app, 1)  # the voter reserves
    assert api.account(app, alice).body == {"accountId": alice, "balance": "7.00",
                                            "reserved": "3.00"}
    assert total(app) + sum(reserved(app).values()) == Decimal("10.00")
    elect_only(app, 0)  # decides, DECISION to 1 and 2
    assert app.on(0).ledger.read_outcome(rid) is not None
    assert status(app, rid) == "committing"  # decided, not applied everywhere yet
    elect_only(app, 1)
    elect_only(app, 2)
    assert status(app, rid) == "committing"  # the home has not heard every ACK yet
    elect_only(app, 0)
    assert status(app, rid) == "committed"
    assert api.account(app, alice).body == {"accountId": alice, "balance": "7.00"}
    assert in_flight(app) == {}


def test_messages_acted_on_twice_change_nothing(ns: Namespace) -> None:
    """A PREPARE and a DECISION sent again (a lost answer) are answered again, not re-applied."""
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    record(app, *transfer(rid, alice, bob, "4.00"))
    elect_only(app, 0)
    prepare = app.on(1).ledger.read_flight()[0].inbox[0]
    elect_only(app, 1)  # reserved 4.00 and voted
    deliver(app.on(1), [prepare])  # the PREPARE again
    elect_only(app, 1)
    assert app.on(1).ledger.read_account(alice).reserved == Decimal("4.00")  # not 8.00
    elect_only(app, 0)  # decides (the second VOTE is ignored)
    decision = next(m for m in app.on(2).ledger.read_flight()[0].inbox)
    elect_only(app, 2)
    deliver(app.on(2), [decision])  # the DECISION again
    elect_only(app, 2)
    settle(app, [rid])
    assert (balance(app, alice), balance(app, bob)) == (Decimal("6.00"), Decimal("4.00"))
    assert in_flight(app) == {}
    assert reserved(app) == {}


def test_a_deposed_participant_leader_cannot_apply(ns: Namespace) -> None:
    """The voter's leader is paused after reading its inbox; a newer leader acts; the old
    one's transaction is refused by the fence and changes nothing."""
    old, new = sharded(ns, "old"), sharded(ns, "new")
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(old, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    record(old, *transfer(rid, alice, bob, "10.00"))
    elect_only(old, 0)
    voter = old.on(1)
    lease = voter.elector.try_acquire()
    assert lease is not None
    term = LeaderTerm.begin(voter, lease)
    stale_round = ReadyView(voter).read()  # the PREPARE, read by the old leader
    BlobLeaseClient(voter.clients.blob.get_blob_client(
        voter.config.lease_container, lease_blob_name(voter.config.lease_blob, 1))
    ).break_lease(lease_break_period=0)
    elect_only(new, 1)  # the new leader reserves and votes
    with pytest.raises(FencedOut):
        term.commit_ready(time.monotonic() + 30, stale_round)
    assert new.on(1).ledger.read_account(alice).reserved == Decimal("10.00")  # once
    settle(new, [rid])
    assert (balance(new, alice), balance(new, bob)) == (Decimal("0.00"), Decimal("10.00"))
    assert in_flight(new) == {}


def test_late_steps_of_a_request_in_flight_wait_for_its_decision(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    legs = transfer(rid, alice, bob, "2.00")
    record(app, *legs)
    elect_only(app, 0)  # coordinating: the steps' rows are consumed
    record(app, legs[0])  # a duplicate arrives while the shards vote
    elect_only(app, 0)  # held: not decided again, not coordinated twice
    assert len(app.on(0).ledger.list_rows("claim:")) == 1
    settle(app, [rid])
    assert (balance(app, alice), balance(app, bob)) == (Decimal("8.00"), Decimal("2.00"))
    wait_until(lambda: run_election(app.on(0)) is not None and not ready(app.on(0)), 30,
               "the late duplicate to be settled")
    assert in_flight(app) == {}


def test_a_request_sent_again_after_it_settled_is_not_coordinated_twice(ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    legs = transfer(rid, alice, bob, "2.00")
    send(app, *legs)
    settle(app, [rid])
    app.on(0).recently_decided._ids.clear()  # another process: it never saw the request
    for row in app.on(0).completions.table.query("PartitionKey ne @x", parameters={"x": "~"}):
        app.on(0).completions.table.delete(row["PartitionKey"], row["RowKey"])  # tombstones gone
    send(app, *legs)  # upstream sends the whole request again, minutes later
    settle(app, [rid])
    assert (balance(app, alice), balance(app, bob)) == (Decimal("8.00"), Decimal("2.00"))
    assert in_flight(app) == {}
    assert reserved(app) == {}


@pytest.mark.slow
def test_a_participant_whose_holder_stops_acts_by_its_lease_expiry_plus_a_few_seconds(
        ns: Namespace) -> None:
    """The voter's leader acquires its shard's lease and stops before it reads anything. No
    sweeper and no further message: the lease alarm it armed comes due as its lease runs out,
    and the instance that takes it votes; the answers drive the rest."""
    acquired: list[float] = []
    paused, stop = threading.Event(), threading.Event()
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    holder = sharded(ns, "H", LEASE_SECONDS="15")
    send(holder, *deposit("fund", alice, "10.00"))
    holder.on(1).elector.callbacks = ElectionCallbacks(
        on_started_leading=lambda _id: acquired.append(time.monotonic()))
    ready_of_voter = holder.shards[1].completions.ready

    def stop_forever(*args: Any, **kwargs: Any) -> Any:
        paused.set()
        stop.wait(60)  # stopped: no read, no renewal, no release
        return ready_of_voter(*args, **kwargs)

    holder.shards[1].completions.ready = stop_forever  # type: ignore[method-assign]
    h_thread = threading.Thread(target=lambda: run_election(holder.on(1)), daemon=True)
    h_thread.start()
    assert paused.wait(10), "the voter's holder did not acquire"
    b = sharded(ns, "B", LEASE_SECONDS="15")
    rid = request_on(0, "t")
    send(b, *transfer(rid, alice, bob, "2.50"))  # B coordinates; shard 1's holder is stopped
    assert status(b, rid) == "committing"
    woken = sharded(ns, "W", LEASE_SECONDS="15")
    listener = threading.Thread(target=take_alarms, args=(woken, stop), daemon=True)
    listener.start()
    try:
        expiry = acquired[0] + 15
        wait_until(lambda: status(b, rid) == "committed",
                   timeout=expiry + 5.0 - time.monotonic(),
                   what="the transfer committed by the voter's lease expiry + 5 s", interval=0.1)
        print(f"committed {time.monotonic() - acquired[0]:.2f} s after the voter's acquire")
    finally:
        stop.set()
        listener.join(10)
        h_thread.join(10)
    assert (balance(b, alice), balance(b, bob)) == (Decimal("7.50"), Decimal("2.50"))
    assert in_flight(b) == {}



def test_steps_that_disagree_on_their_home_are_decided_by_one_shard_only(ns: Namespace) -> None:
    """A transfer, and a copy of its add step that says expectedOperations 1: the copy is
    homed on its account's shard, the transfer on its requestId's. Exactly one of them decides
    the request (the claim); the other's steps are settled against that outcome and parked."""
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    rid = request_on(0, "t")
    legs = transfer(rid, alice, bob, "4.00")
    rogue = step(rid, f"{rid}-a", "add_funds", bob, "4.00", 1)
    send(app, *legs, rogue)
    settle(app, [rid])
    outcomes = [s.ledger.read_outcome(rid) for s in app.each_shard()]
    assert [o is not None for o in outcomes] == [True, False, False, False]
    assert (balance(app, alice), balance(app, bob)) == (Decimal("6.00"), Decimal("4.00"))
    assert app.parking.count_by_kind()["late-contradiction"] == 1  # the copy, with the reason
    assert in_flight(app) == {}


def test_a_one_step_request_with_two_contents_on_two_shards_moves_money_once(
        ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    rid = request_on(3, "d")
    send(app, step(rid, "add", "add_funds", alice, "5.00", 1),
         step(rid, "add", "add_funds", bob, "5.00", 1))  # one operationId, two accounts
    settle(app, [rid])
    assert balance(app, alice) + balance(app, bob) == Decimal("5.00")
    assert sum(s.ledger.read_outcome(rid) is not None for s in app.each_shard()) == 1
    assert [r["home"] for r in app.on(3).ledger.list_rows("claim:")] in ([1], [2])


def test_many_cross_shard_requests_at_once_fit_transactions_of_100_operations(
        ns: Namespace) -> None:
    """Forty transfers ready at once on each path (one transaction; votes): every transaction
    stays within 100 operations, so nothing stalls."""
    app = sharded(ns)
    [alice, carol], [bob] = accounts_on(1, 2), accounts_on(2, 1)
    send(app, *deposit("fa", alice, "100.00"), *deposit("fc", carol, "100.00"))
    voting = list(itertools.islice((f"v{n}" for n in itertools.count()
                                    if MAP.home_of(f"v{n}", 2, "") == 0), 40))
    direct = list(itertools.islice((f"o{n}" for n in itertools.count()
                                    if MAP.home_of(f"o{n}", 2, "") == 1), 40))
    for rid in voting:
        record(app, *transfer(rid, alice, bob, "1.00"))
    for rid in direct:
        record(app, *transfer(rid, carol, bob, "1.00"))
    settle(app, voting + direct, timeout=60)
    assert (balance(app, alice), balance(app, carol), balance(app, bob)) == \
        (Decimal("60.00"), Decimal("60.00"), Decimal("80.00"))
    assert in_flight(app) == {}


def test_a_request_too_wide_for_one_shard_transaction_is_rejected_with_the_reason(
        ns: Namespace) -> None:
    app = sharded(ns)
    many = accounts_on(1, 48, "w")
    [bob] = accounts_on(2, 1)
    for account in many:
        send(app, *deposit(f"f-{account}", account, "1.00"))
    rid = request_on(0, "wide")
    bodies = [step(rid, f"w{i}", "withdraw_funds", a, "1.00", 49) for i, a in enumerate(many)]
    bodies.append(step(rid, "add", "add_funds", bob, "48.00", 49))
    record(app, *bodies)
    settle(app, [rid])
    reply = api.request(app, rid).body
    assert reply["status"] == "rejected"
    assert "would not fit one transaction" in reply["reason"]
    assert balance(app, bob) == Decimal("0.00")
    assert {balance(app, a) for a in many} == {Decimal("1.00")}
