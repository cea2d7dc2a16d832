"""The independent checker of the sharded ledger (``simulator/checker.py``) against real storage.

Each test has the app write a small K = 4 ledger on Azurite (deposits, a cross-shard transfer,
a request on one shard, a three-shard request rejected for funds), checks that the checker
accepts it, then breaks one thing with the SDK, the way a protocol bug would leave it (a leg
applied twice, a negative balance, a stray escrow, a request decided on two shards, a shard
that never applied, a marker that disagrees with its outcome, a lost outcome), and asserts
that the checker reports exactly that. A checker that cannot fail proves nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
from azure.data.tables import TableClient, UpdateMode

from shared.domain.exchange import FLIGHT_PREFIX
from shared.domain.sharding import ShardMap
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from simulator.checker import (
    LedgerReader,
    Sent,
    account_shard,
    check_final,
    check_invariants,
    partition_of,
    slot,
)
from tests.helpers import Namespace, deposit, send, step, transfer, wait_until

SHARDS = 4
MAP = ShardMap(SHARDS)


def on_shard(shard: int, prefix: str) -> str:
    return next(f"{prefix}-{i}" for i in itertools.count()
                if MAP.account_shard(f"{prefix}-{i}") == shard)


def homed_on(shard: int, prefix: str) -> str:
    return next(f"{prefix}-{i}" for i in itertools.count()
                if MAP.home_of(f"{prefix}-{i}", 2, "") == shard)


@dataclass
class Built:
    """A settled K = 4 ledger the app wrote, what was sent, and a raw client to break it."""

    app: LedgerApp
    reader: LedgerReader
    raw: TableClient
    sent: dict[str, Sent]
    alice: str  # shard 1, funded 100.00
    bob: str  # shard 2
    carol: str  # shard 3, funded 5.00
    cross: str  # alice -> bob 30.00, home 0: committed across shards
    local: str  # alice -> alice2 (both shard 1), home 1: committed in one transaction
    refused: str  # three shards, carol short: rejected

    def merge(self, shard: int, row_key: str, **properties: object) -> None:
        self.raw.upsert_entity({"PartitionKey": partition_of(shard), "RowKey": row_key,
                                **properties}, mode=UpdateMode.MERGE)

    def row(self, shard: int, row_key: str) -> dict[str, object]:
        return dict(self.raw.get_entity(partition_of(shard), row_key))


def _settle(app: LedgerApp, request_ids: list[str]) -> None:
    def final() -> bool:
        for shard in app.each_shard():
            run_election(shard)
        outcomes = [next((d for s in app.each_shard()
                          if (d := s.ledger.read_outcome(r)) is not None), None)
                    for r in request_ids]
        return all(o is not None and o.settled for o in outcomes) and not any(
            s.ledger.list_rows(FLIGHT_PREFIX) for s in app.each_shard())
    wait_until(final, 60, f"{request_ids} settled")


@pytest.fixture
def built(ns: Namespace) -> Iterator[Built]:
    app = ns.app(LEDGER_SHARDS=str(SHARDS))
    alice, bob, carol, dave = (on_shard(1, "alice"), on_shard(2, "bob"), on_shard(3, "carol"),
                               on_shard(0, "dave"))
    alice2 = on_shard(1, "alice2")
    cross, refused = homed_on(0, "cross"), homed_on(0, "refused")
    local = homed_on(1, "local")
    send(app, *deposit("fund-a", alice, "100.00"), *deposit("fund-c", carol, "5.00"))
    send(app, *transfer(cross, alice, bob, "30.00"), *transfer(local, alice, alice2, "10.00"))
    send(app, step(refused, "w1", "withdraw_funds", alice, "20.00", 3),
         step(refused, "w2", "withdraw_funds", carol, "10.00", 3),
         step(refused, "add", "add_funds", dave, "30.00", 3))
    _settle(app, ["fund-a", "fund-c", cross, local, refused])
    money = Decimal
    sent = {
        "fund-a": Sent("fund-a", ((alice, money("100.00")),)),
        "fund-c": Sent("fund-c", ((carol, money("5.00")),)),
        cross: Sent(cross, ((alice, money("-30.00")), (bob, money("30.00")))),
        local: Sent(local, ((alice, money("-10.00")), (alice2, money("10.00")))),
        refused: Sent(refused, ((alice, money("-20.00")), (carol, money("-10.00")),
                                (dave, money("30.00"))), may_reject=True),
    }
    table = app.config.ledger_table
    reader = LedgerReader(ns.connection_string, table, SHARDS)
    raw = TableClient.from_connection_string(ns.connection_string, table)
    try:
        yield Built(app, reader, raw, sent, alice, bob, carol, cross, local, refused)
    finally:
        reader.close()
        raw.close()


def test_the_shard_map_is_the_documented_one() -> None:
    ids = [f"x-{i}" for i in range(300)]
    assert [account_shard(i, SHARDS) for i in ids] == [MAP.account_shard(i) for i in ids]
    assert {slot(i) for i in ids} <= set(range(64))
    assert Sent("r", (("a", Decimal("1.00")),)).home(SHARDS) == MAP.home_of("r", 1, "a")
    assert Sent("r", (("a", Decimal("-1.00")), ("b", Decimal("1.00")))).home(SHARDS) == \
        MAP.home_of("r", 2, "a")


def test_the_checker_accepts_what_the_app_wrote(built: Built) -> None:
    assert check_invariants(built.reader, built.sent) == []
    verdict = check_final(built.reader, built.sent)
    assert verdict.problems == []
    assert verdict.ok
    assert verdict.line() == "0 lost, 0 double-applied, 0 partial requests, 0 drift"
    assert verdict.outcomes == {"committed": 4, "rejected": 1}
    assert verdict.total == Decimal("105.00")


def test_a_leg_applied_twice_is_double_applied(built: Built) -> None:
    built.merge(2, f"account:{built.bob}", balance="60.00")  # the credit of 30.00 twice
    verdict = check_final(built.reader, built.sent)
    assert verdict.double_applied == {built.cross}
    assert verdict.drift == Decimal("30.00")
    assert verdict.line() == "0 lost, 1 double-applied, 0 partial requests, 30.00 drift"
    assert any("money not conserved" in p for p in verdict.problems)


def test_a_negative_balance_is_reported_at_any_time(built: Built) -> None:
    built.merge(3, f"account:{built.carol}", balance="-1.00")
    problems = check_invariants(built.reader, built.sent)
    assert problems == [f"negative balance: {built.carol} on shard 3 is -1.00"]
    assert not check_final(built.reader, built.sent).ok


def test_a_stray_escrow_is_reported_at_any_time_and_counted_once_quiet(built: Built) -> None:
    ghost = homed_on(0, "ghost")
    sent = {**built.sent, ghost: Sent(ghost, ((built.alice, Decimal("-5.00")),
                                              (built.bob, Decimal("5.00"))))}
    built.raw.create_entity({"PartitionKey": partition_of(1),
                             "RowKey": f"flight:escrow:{ghost}|{built.alice}",
                             "requestId": ghost, "accountId": built.alice, "amount": "5.00",
                             "home": 0})
    problems = check_invariants(built.reader, sent)
    assert any(f"names request {ghost}, which has neither a coordination nor an outcome" in p
               for p in problems), problems
    assert any(f"{built.alice} on shard 1: reserved 0.00, its escrow rows hold 5.00" in p
               for p in problems), problems
    verdict = check_final(built.reader, sent)
    assert verdict.lost == {ghost}
    assert any("left in flight on shard 1" in p for p in verdict.problems)


def test_an_escrow_that_holds_twice_the_debit_is_reported(built: Built) -> None:
    built.merge(1, f"account:{built.alice}", balance="0.00", reserved="80.00")
    built.raw.create_entity({"PartitionKey": partition_of(1),
                             "RowKey": f"flight:escrow:{built.cross}|{built.alice}",
                             "requestId": built.cross, "accountId": built.alice,
                             "amount": "60.00", "home": 0})
    built.raw.create_entity({"PartitionKey": partition_of(1),
                             "RowKey": f"flight:escrow:{built.refused}|{built.alice}",
                             "requestId": built.refused, "accountId": built.alice,
                             "amount": "20.00", "home": 0})
    problems = check_invariants(built.reader, built.sent)
    assert any("holds 60.00, the request debits" in p and "by 30.00" in p for p in problems)
    assert not any("reserved" in p for p in problems), "reserved matches its escrow rows"
    verdict = check_final(built.reader, built.sent)
    assert {built.cross, built.refused} <= verdict.partial


def test_a_request_decided_on_two_shards_is_double_applied(built: Built) -> None:
    outcome = built.row(0, f"request:{built.cross}")
    built.raw.create_entity({**outcome, "PartitionKey": partition_of(2)})
    problems = check_invariants(built.reader, built.sent)
    assert any(f"outcome request:{built.cross} on shard 2, its home is 0" in p
               for p in problems)
    verdict = check_final(built.reader, built.sent)
    assert verdict.double_applied == {built.cross}


def test_a_shard_that_never_applied_its_legs_is_a_partial_request(built: Built) -> None:
    built.raw.delete_entity(partition_of(2), f"applied:{built.cross}")
    built.merge(2, f"account:{built.bob}", balance="0.00")
    verdict = check_final(built.reader, built.sent)
    assert verdict.partial == {built.cross}
    assert verdict.drift == Decimal("30.00")
    assert verdict.line() == "0 lost, 0 double-applied, 1 partial requests, 30.00 drift"


def test_a_marker_that_disagrees_with_its_outcome_is_reported(built: Built) -> None:
    built.merge(2, f"applied:{built.refused}", status="committed",
                legs='[["x", "1.00"]]')
    problems = check_invariants(built.reader, built.sent)
    assert any(f"applied marker of {built.refused} on shard 2 says committed, its outcome "
               "says rejected" in p for p in problems), problems
    assert built.refused in check_final(built.reader, built.sent).partial


def test_an_outcome_that_is_gone_or_not_final_is_counted(built: Built) -> None:
    built.raw.delete_entity(partition_of(1), f"request:{built.local}")
    built.merge(0, f"request:{built.cross}", settled=False)
    verdict = check_final(built.reader, built.sent)
    assert verdict.lost == {built.local}
    assert verdict.partial == {built.cross}
    assert any(f"{built.cross} is committed but not settled" in p for p in verdict.problems)
    assert check_invariants(built.reader, built.sent) == [], \
        "neither breaks an invariant that holds at any time"
