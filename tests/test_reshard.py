"""Resharding against a real Azurite: 1 -> 4 -> 2 shards with every balance and status intact.

Each test drives the app through its queue trigger's handler, reshards with the same function
the CLI and the admin function call (``shared.leadership.reshard.reshard``), and reads the
result through the read API from a *new* instance (whose ``LEDGER_SHARDS`` still says 1: the
stored map is authoritative) and straight from storage.
"""

from __future__ import annotations

import io
import itertools
import json
from decimal import Decimal

import pytest

from operator_cli import cli
from shared.config.names import ledger_partition
from shared.domain.contract import parse_completion
from shared.domain.exchange import FLIGHT_PREFIX
from shared.domain.planning import ACCOUNT_PREFIX
from shared.domain.sharding import ShardMap
from shared.leadership import intake
from shared.leadership.elections import Election, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import announce_if_ready, record_completion
from shared.leadership.reconcile import reconcile_ledger
from shared.leadership.reshard import Interrupted, ReshardRefused, reshard
from shared.storage.ledger import MapMoved
from shared.web import api
from tests.helpers import Namespace, deposit, record, send, transfer, wait_until

FINAL = {"committed", "aborted", "rejected", "expired"}


def status(app: LedgerApp, request_id: str) -> str:
    reply = api.request(app, request_id)
    return str(reply.body.get("status", reply.status))


def balance(app: LedgerApp, account: str) -> Decimal:
    body = api.account(app, account).body
    return Decimal(body.get("balance", "0.00"))


def rows_by_shard(app: LedgerApp, shards: int) -> dict[int, set[str]]:
    """Account rows in each partition 0..shards-1 (whatever the map says)."""
    return {k: {str(r["RowKey"]).removeprefix(ACCOUNT_PREFIX)
                for r in app.topology.ledger_of(k).list_rows(ACCOUNT_PREFIX)}
            for k in range(shards)}


def settle(app: LedgerApp, request_ids: list[str], timeout: float = 40) -> None:
    def final() -> bool:
        for shard in app.each_shard():
            run_election(shard)
        return all(status(app, r) in FINAL for r in request_ids)
    wait_until(final, timeout, f"{request_ids} to read final")


def ids_on(shard_map: ShardMap, shard: int, prefix: str, steps: int = 2) -> str:
    return next(f"{prefix}-{i}" for i in itertools.count()
                if shard_map.home_of(f"{prefix}-{i}", steps, f"{prefix}-{i}") == shard)


def accounts_on(shard_map: ShardMap, shard: int, count: int, prefix: str) -> list[str]:
    return list(itertools.islice((f"{prefix}-{i}" for i in itertools.count()
                                  if shard_map.account_shard(f"{prefix}-{i}") == shard), count))


def test_one_to_four_to_two_keeps_every_balance_and_status(ns: Namespace) -> None:
    app = ns.app()
    four, two = ShardMap(4), ShardMap(2)
    # Accounts spread over what will be four shards, then two.
    accounts = [a for k in range(4) for a in accounts_on(four, k, 3, "acct")]
    expected: dict[str, Decimal] = {}
    for i, account in enumerate(accounts):
        send(app, *deposit(f"dep-{i}", account, f"{100 + i}.25"))
        expected[account] = Decimal(f"{100 + i}.25")
    statuses = {f"dep-{i}": "committed" for i in range(len(accounts))}
    for i in range(6):  # transfers between accounts of different future shards
        source, target = accounts[i], accounts[-1 - i]
        send(app, *transfer(f"tx-{i}", source, target, "10.10"))
        expected[source] -= Decimal("10.10")
        expected[target] += Decimal("10.10")
        statuses[f"tx-{i}"] = "committed"
    send(app, *transfer("short", accounts[0], accounts[1], "100000.00"))
    statuses["short"] = "rejected"
    # Pending at the reshard: one step of two, completed after it.
    withdraw, add = transfer("pending-1", accounts[2], accounts[9], "5.00")
    send(app, withdraw)
    before = sum(expected.values())

    report = reshard(app, 4)
    assert (report.from_shards, report.to_shards, report.generation) == (1, 4, 2)
    assert report.verified == "exact"
    assert report.total_before == report.total_after == before
    assert report.accounts == len(accounts)
    assert report.steps_moved >= 1 or ShardMap(4).home_of("pending-1", 2, "") == 0

    later = ns.app()  # LEDGER_SHARDS is still 1: the stored map wins
    assert later.shard_map.shards == 4
    assert later.shard_map.generation == 2
    assert {a: balance(later, a) for a in accounts} == expected
    assert {r: status(later, r) for r in statuses} == statuses
    placed = rows_by_shard(later, 4)
    assert all(four.account_shard(a) == k for k, found in placed.items() for a in found)
    assert sorted(a for found in placed.values() for a in found) == sorted(accounts)

    # The pending request completes on its new home; cross-shard work commits under K = 4.
    send(later, add)
    statuses["pending-1"] = "committed"
    expected[accounts[2]] -= Decimal("5.00")
    expected[accounts[9]] += Decimal("5.00")
    # In flight at the next reshard: a cross-shard transfer its home coordinated, whose voter
    # has not voted yet (its PREPARE waits in the voter's inbox).
    payer, payee = accounts_on(four, 1, 1, "acct")[0], accounts_on(four, 3, 1, "acct")[0]
    rid = ids_on(four, 0, "cross")
    record(later, *transfer(rid, payer, payee, "7.00"))
    Election(later.on(0)).run(False)
    assert later.on(1).ledger.list_rows(FLIGHT_PREFIX), "the PREPARE waits for shard 1"
    statuses[rid] = "committed"
    expected[payer] -= Decimal("7.00")
    expected[payee] += Decimal("7.00")
    # And one step of a request still incomplete at the second reshard.
    withdraw2, add2 = transfer("pending-2", accounts[4], accounts[7], "1.00")
    send(later, withdraw2)
    settle(later, ["pending-1"])

    report = reshard(later, 2)
    assert (report.from_shards, report.to_shards, report.generation) == (4, 2, 3)
    assert report.verified == "exact"
    assert report.total_after == before
    last = ns.app()
    assert last.shard_map.shards == 2
    assert len(last.earlier_maps) == 2
    send(last, add2)
    statuses["pending-2"] = "committed"
    expected[accounts[4]] -= Decimal("1.00")
    expected[accounts[7]] += Decimal("1.00")
    settle(last, ["pending-2"])
    assert {a: balance(last, a) for a in accounts} == expected
    assert {r: status(last, r) for r in statuses} == statuses
    placed = rows_by_shard(last, 4)
    assert (placed[2], placed[3]) == (set(), set()), "removed shards keep no account"
    assert all(two.account_shard(a) == k for k, found in placed.items() for a in found)
    assert not any(last.topology.ledger_of(k).list_rows(FLIGHT_PREFIX) for k in range(4))
    assert sum(expected.values()) == before


@pytest.mark.parametrize("crash_after", ["copied", "published"])
def test_a_run_stopped_halfway_resumes_with_totals_intact(ns: Namespace,
                                                          crash_after: str) -> None:
    app = ns.app()
    accounts = [f"acct-{i}" for i in range(10)]
    for i, account in enumerate(accounts):
        send(app, *deposit(f"dep-{i}", account, "50.00"))
    send(app, *transfer("tx", accounts[0], accounts[1], "20.00"))
    with pytest.raises(Interrupted):
        reshard(app, 4, stop_after=crash_after)
    # A leader of the old map cannot write meanwhile: the fences carry the new generation.
    other = ns.app()
    with pytest.raises(ReshardRefused):
        reshard(other, 2)  # another target while one is open
    # Reconciliation (and so its alert) names a reshard left open: leaders wait for it.
    kinds = {f.kind for f in reconcile_ledger(other, max_flight_seconds=0).problems}
    assert "reshard-open" in kinds
    report = reshard(other, 4, resume=True)
    assert report.resumed
    assert report.to_shards == 4
    assert report.total_after == Decimal("500.00")
    fresh = ns.app()
    assert fresh.shard_map.shards == 4
    assert balance(fresh, accounts[0]) == Decimal("30.00")
    assert balance(fresh, accounts[1]) == Decimal("70.00")
    assert sum(balance(fresh, a) for a in accounts) == Decimal("500.00")
    assert status(fresh, "tx") == "committed"
    with pytest.raises(ReshardRefused):
        reshard(fresh, 4, resume=True)  # nothing open any more
    after = reconcile_ledger(fresh, max_flight_seconds=0)
    assert after.ok, [f.view() for f in after.findings]


def test_an_old_map_leader_cannot_claim_after_the_fences_moved(ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "5.00"))
    with pytest.raises(Interrupted):
        reshard(app, 2, stop_after="leased")
    # The reshard's leases lapse with its renewals; the old map's process still cannot claim.
    with pytest.raises(MapMoved):
        app.ledger.claim_epoch("someone/else", app.clock.now())
    reshard(app, 2, resume=True)
    assert app.topology.reload().current.shards == 2


def test_steps_sent_again_after_a_reshard_are_not_applied_twice(ns: Namespace) -> None:
    app = ns.app()
    bodies = deposit("fund", "alice", "100.00") + transfer("pay", "alice", "bob", "40.00")
    send(app, *bodies)
    assert (balance(app, "alice"), balance(app, "bob")) == (Decimal("60.00"), Decimal("40.00"))
    reshard(app, 4)
    later = ns.app()
    four = later.shard_map
    # The homes moved (else this test would test nothing): the outcomes are on shard 0.
    assert four.home_of("fund", 1, "alice") != 0 or four.home_of("pay", 2, "") != 0
    record(later, *bodies)  # the duplicates land on the new homes, which have no outcome
    assert (status(later, "fund"), status(later, "pay")) == ("committed", "committed")
    send(later, *bodies)
    for shard in later.each_shard():
        run_election(shard)
    assert (balance(later, "alice"), balance(later, "bob")) == (Decimal("60.00"),
                                                                Decimal("40.00"))
    assert (status(later, "fund"), status(later, "pay")) == ("committed", "committed")
    for shard in later.each_shard():  # settled as late steps: nothing waits anywhere
        assert not shard.completions.steps_of("fund")
        assert not shard.completions.steps_of("pay")
    # Outcomes stay where they were decided: nothing was copied.
    assert later.topology.ledger_of(0).read_outcome("pay") is not None
    assert all(later.on(k).ledger.read_outcome("pay") is None for k in range(1, 4)
               if later.on(k).ledger.partition != ledger_partition(0))


def test_a_step_recorded_under_the_old_map_after_the_reshard_is_not_lost(ns: Namespace) -> None:
    stale = ns.app()
    send(stale, *deposit("seed", "alice", "1.00"))  # the stale process has read the map
    assert stale.shard_map.generation == 1
    reshard(ns.app(), 4)
    four = ShardMap(4)
    [carol] = accounts_on(four, 2, 1, "carol")
    # A recorder that read the map before the reshard, paused, then wrote: shard 0's table.
    [body] = deposit("late-dep", carol, "9.99")
    completion = parse_completion(body)
    old_home = stale.on(0)
    assert announce_if_ready(old_home, completion, record_completion(old_home, completion))
    result = run_election(old_home)  # its claim meets the new generation on the fence
    assert not result.terms or not result.terms[0].outcomes
    assert stale.shard_map.generation == 2, "the stale process read the map again"
    current = ns.app()
    result = run_election(current.on(0))  # shard 0's leader forwards the step to shard 2
    wait_until(lambda: (run_election(current.on(2)) is not None
                        and status(current, "late-dep") == "committed"), 20,
               "the forwarded deposit to commit")
    assert balance(current, carol) == Decimal("9.99")
    assert not current.on(0).completions.steps_of("late-dep")


def test_a_stale_recorder_on_a_shard_the_reshard_removed_moves_its_row_home(
        ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 -> 1 shards: a recorder that read the old map and wrote after the reshard's last move
    # of stragglers leaves its row on shard 1, whose table no leader reads any more. Its own
    # check after the write (its map was asked for more than MAP_TTL_SECONDS before the write
    # ended: 0 here, as if it had been paused) moves the row home, and the transfer commits.
    stale = ns.app(LEDGER_SHARDS="2")
    request = ids_on(stale.shard_map, 1, "moved")
    assert stale.shard_map.generation == 1
    removed = stale.on(1)
    reshard(ns.app(LEDGER_SHARDS="2"), 1)
    current = ns.app(LEDGER_SHARDS="2")
    send(current, *deposit("fund", "payer", "10.00"))
    withdraw, add = transfer(request, "payer", "payee", "4.00")
    # Paused since it read the map: its cache is not read again before the write.
    monkeypatch.setattr(stale.topology, "fresh", lambda max_age=0.0: stale.topology.current)
    monkeypatch.setattr(intake, "MAP_TTL_SECONDS", 0.0)
    send(stale, withdraw)  # recorded on shard 1 by the old map, then moved to shard 0
    assert stale.shard_map.shards == 1, "the stale process read the map again"
    assert not removed.completions.steps_of(request)
    monkeypatch.undo()
    send(current, add)
    settle(current, [request])
    assert status(current, request) == "committed"
    assert balance(current, "payer") == Decimal("6.00")
    assert balance(current, "payee") == Decimal("4.00")


def test_the_cli_reshards_and_the_leader_view_names_a_setting_that_disagrees(
        ns: Namespace) -> None:
    app = ns.app()
    send(app, *deposit("d1", "alice", "12.34"))
    assert api.leader(app).body["reshard"] is None
    out = io.StringIO()
    code = cli.main(["reshard", "--to", "2", "--json"], environ=ns.env(), stdout=out,
                    stderr=io.StringIO())
    assert code == 0
    report = json.loads(out.getvalue())
    assert (report["from"], report["to"], report["generation"]) == (1, 2, 2)
    assert report["totalBefore"] == report["totalAfter"] == "12.34"
    assert report["verified"] == "exact"
    # LEDGER_SHARDS still says 1: the app warns and uses the stored map; /api/leader says so.
    later = ns.app()
    assert api.leader(later).body["reshard"] == {"needed": True, "setting": 1, "stored": 2,
                                                 "generation": 2}
    assert api.leader(ns.app(LEDGER_SHARDS="2")).body["reshard"] is None
    out = io.StringIO()
    assert cli.main(["reshard", "--to", "2"], environ=ns.env(), stdout=out) == 0
    assert "nothing to do" in out.getvalue()
    err = io.StringIO()
    assert cli.main(["reshard", "--to", "3", "--resume"], environ=ns.env(),
                    stdout=io.StringIO(), stderr=err) == 1
    assert "nothing to resume" in err.getvalue()


def test_a_worker_that_only_reads_follows_the_new_map(ns: Namespace) -> None:
    # A long-lived worker that records nothing (it serves reads, sweeps, alarms) reads the map
    # again once its copy is MAP_TTL_SECONDS old: its reads of a moved account follow it.
    reader = ns.app()
    send(reader, *deposit("d1", "alice", "3.00"))
    send(reader, *deposit("d2", "bob", "4.00"))
    assert balance(reader, "alice") == Decimal("3.00")
    reshard(ns.app(), 4)
    moved = [a for a in ("alice", "bob") if ShardMap(4).account_shard(a) != 0]
    assert moved, "one of the two moves off shard 0 (the test's premise)"
    wait_until(lambda: reader.shard_map.generation == 2, 15, "the reader's map to move on")
    assert balance(reader, "alice") == Decimal("3.00")
    assert balance(reader, "bob") == Decimal("4.00")
    assert status(reader, "d1") == "committed"
