"""Operators see each shard: ``/api/leader`` and ``/api/metrics`` rows per shard, against Azurite.

K = 4: each shard's holder, epoch, lease, pending completions, work in flight between shards
with the oldest item's age, last commit, and a takeover on the one shard whose leader changed.
K = 1: the top-level fields are what they always were, and ``shards`` has shard 0 only.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.storage.blob import BlobLeaseClient

from bench.probe import CallCounter
from operator_cli import cli
from operator_cli import shards as shard_cli
from shared.config.names import lease_blob_name
from shared.domain.contract import Operation
from shared.leadership.instance import LedgerApp
from shared.leadership.term import LeaderTerm
from shared.storage.ledger import Takeover
from shared.web import api, shards, status
from tests.helpers import Namespace, deposit, record, send, step, transfer, wait_until
from tests.test_parking_cli import Run
from tests.test_shards import accounts_on, elect_only, request_on, settle, sharded

TOP_LEVEL = {"holder", "lastHolder", "epoch", "lease", "lastCommitAt", "pendingCompletions",
             "parkedMessages", "shards", "reshard"}
SHARD_FIELDS = {"shard", "holder", "lastHolder", "epoch", "lease", "lastCommitAt", "claimedAt",
                "pendingCompletions", "pendingTruncated", "oldestPendingAgeSeconds", "inFlight",
                "inFlightRequests", "inFlightByKind", "oldestInFlightAgeSeconds",
                "inFlightTruncated"}


def by_shard(rows: list[dict[str, object]]) -> dict[int, dict[str, object]]:
    return {int(str(row["shard"])): row for row in rows}


def test_one_shard_keeps_the_top_level_fields_and_lists_shard_zero(ns: Namespace) -> None:
    app = ns.app()
    empty = api.leader(app).body
    assert set(empty) == TOP_LEVEL
    assert (empty["epoch"], empty["holder"], empty["lastCommitAt"]) == (0, None, None)
    send(app, *deposit("d1", "alice", "5.00"))
    record(app, transfer("t1", "alice", "bob", "1.00")[0])  # one step of two: it waits
    body = api.leader(app).body
    assert set(body) == TOP_LEVEL
    assert body["epoch"] == 1
    assert body["pendingCompletions"] == 1
    [row] = body["shards"]
    assert set(row) == SHARD_FIELDS
    assert row["shard"] == 0
    for name in ("holder", "lastHolder", "epoch", "lease", "lastCommitAt", "pendingCompletions"):
        assert row[name] == body[name], name
    assert (row["inFlight"], row["oldestInFlightAgeSeconds"]) == (0, None)
    assert row["oldestPendingAgeSeconds"] is not None
    metrics = status.snapshot(app)
    [page_row] = metrics["shards"]
    assert page_row["epoch"] == metrics["leader"]["epoch"] == 1
    assert page_row["pendingCompletions"] == metrics["pending"]["completions"] == 1
    assert page_row["takeover"] is None


def test_four_shards_each_show_their_own_leader_pending_and_work_in_flight(
        ns: Namespace) -> None:
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))  # shard 1 commits: epoch 1 there only
    waiting = request_on(3, "w")
    # One step of two homed on shard 3: it waits there.
    record(app, step(waiting, "op-1", Operation.WITHDRAW_FUNDS, alice, "1.00", expected=2))
    rid = request_on(0, "t")
    record(app, *transfer(rid, alice, bob, "3.00"))
    elect_only(app, 0)  # the home coordinates: its coordination, and PREPARE in shard 1's inbox

    body = api.leader(app).body
    rows = body["shards"]
    assert [row["shard"] for row in rows] == [0, 1, 2, 3]
    assert all(set(row) == SHARD_FIELDS for row in rows)
    for name in ("holder", "lastHolder", "epoch", "lease", "lastCommitAt", "pendingCompletions"):
        assert rows[0][name] == body[name], f"the top level is shard 0's {name}"
    assert [row["epoch"] for row in rows] == [1, 1, 0, 0]
    assert rows[1]["lastCommitAt"] is not None
    assert rows[2]["lastCommitAt"] is None
    assert [row["pendingCompletions"] for row in rows] == [0, 0, 0, 1]
    assert rows[3]["oldestPendingAgeSeconds"] is not None
    assert rows[0]["inFlightByKind"] == {"coordinations": 1}
    assert rows[1]["inFlightByKind"] == {"messages": 1}
    assert [row["inFlightRequests"] for row in rows] == [1, 1, 0, 0]
    for row in rows[:2]:
        age = row["oldestInFlightAgeSeconds"]
        assert isinstance(age, float), row
        assert 0 <= age < 60, row
    assert rows[2]["oldestInFlightAgeSeconds"] is None
    assert all(row["lease"]["state"] in {"available", "expired", "broken"} for row in rows)

    elect_only(app, 1)  # the voter holds the money in escrow and votes
    flight = by_shard(api.leader(app).body["shards"])
    assert flight[1]["inFlightByKind"] == {"escrows": 1}
    assert flight[0]["inFlightByKind"] == {"coordinations": 1, "messages": 1}

    settle(app, [rid])
    after = api.leader(app).body["shards"]
    assert [row["inFlight"] for row in after] == [0, 0, 0, 0]
    assert all(row["oldestInFlightAgeSeconds"] is None for row in after)
    # The page's JSON has the same rows, and counts every shard's outcomes.
    metrics = status.snapshot(app)
    assert [row["shard"] for row in metrics["shards"]] == [0, 1, 2, 3]
    for mine, theirs in zip(metrics["shards"], after, strict=True):
        for name in SHARD_FIELDS - {"oldestPendingAgeSeconds"}:
            assert mine[name] == theirs[name], name
    assert metrics["outcomes"]["byStatus"] == {"committed": 2}  # fund on 1, rid on 0
    assert sum(metrics["throughput"]["committed"]) == 2


def lead(app: LedgerApp) -> LeaderTerm:
    held = app.elector.try_acquire()
    assert held is not None
    return LeaderTerm.begin(app, held)


def test_a_takeover_shows_on_the_shard_whose_leader_changed_only(ns: Namespace) -> None:
    app = sharded(ns, instance_id="first")
    accounts = {k: accounts_on(k, 1)[0] for k in range(4)}
    send(app, *(body for k, account in accounts.items()
                for body in deposit(f"d{k}", account, "5.00")))
    assert all(row["takeover"] is None for row in status.snapshot(app)["shards"])
    # Another instance takes shard 2 while "first" held it: its lease is broken under it.
    first_2 = app.on(2)
    term_a = lead(first_2)
    record(first_2, *deposit("before", accounts[2], "1.00"))
    term_a.commit_ready(first_2.clock.monotonic() + 30)
    BlobLeaseClient(first_2.clients.blob.get_blob_client(
        app.config.lease_container, lease_blob_name(app.config.lease_blob, 2))).break_lease(
        lease_break_period=0)
    other = sharded(ns, instance_id="second").on(2)
    term_b = lead(other)
    record(other, *deposit("after", accounts[2], "1.00"))
    term_b.commit_ready(other.clock.monotonic() + 30)
    rows = status.snapshot(app)["shards"]
    marked = {row["shard"]: row["takeover"] for row in rows if row["takeover"]}
    assert list(marked) == [2]
    assert marked[2]["from"] == "first"
    assert marked[2]["to"] == "second"
    assert (marked[2]["fromEpoch"], marked[2]["toEpoch"]) == (term_a.fence.epoch,
                                                              term_b.fence.epoch)
    assert 0 <= marked[2]["secondsAgo"] < 60
    assert rows[2]["holder"] == term_b.fence.holder
    term_b.lease.release()
    wait_until(lambda: api.leader(app).body["shards"][2]["holder"] is None, 10, "released")


def test_a_takeover_shows_for_the_window_after_the_claim() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def taken(seconds_ago: float) -> Takeover:
        return Takeover(5, (now - timedelta(seconds=seconds_ago)).isoformat(), 4, "a/lease-1",
                        "b/lease-2")

    found = shards.takeover(taken(40), now, 300)
    assert found is not None
    assert (found["fromEpoch"], found["toEpoch"], found["from"], found["to"]) == (4, 5, "a", "b")
    assert found["secondsAgo"] == 40
    assert shards.takeover(taken(301), now, 300) is None, "older than the window"
    assert shards.takeover(None, now, 300) is None, "never taken over"


def test_a_hand_over_is_not_a_takeover_but_a_lease_lost_under_a_term_is(ns: Namespace) -> None:
    # Short terms hand the lease over all the time: a holder that released marks its epoch on
    # the fence, and the next claim (another instance's) records nothing. A term whose lease
    # was broken under it did not: the next claim records the takeover.
    first, second = ns.app(instance_id="first"), ns.app(instance_id="second")
    send(first, *deposit("d1", "alice", "5.00"))
    send(second, *deposit("d2", "alice", "5.00"))
    assert first.ledger.read_fence().epoch == 2  # type: ignore[union-attr]
    assert first.ledger.read_takeover() is None, "two hand-overs, no takeover"
    term = lead(first)
    record(first, *deposit("d3", "alice", "1.00"))
    term.commit_ready(first.clock.monotonic() + 30)
    BlobLeaseClient(first.clients.blob.get_blob_client(
        first.config.lease_container, first.config.lease_blob)).break_lease(lease_break_period=0)
    send(second, *deposit("d4", "alice", "1.00"))
    found = second.ledger.read_takeover()
    assert found is not None
    assert (found.from_epoch, found.epoch) == (term.fence.epoch, term.fence.epoch + 1)
    assert (found.from_holder.split("/")[0], found.to_holder.split("/")[0]) == ("first",
                                                                                 "second")
    assert status.snapshot(first)["shards"][0]["takeover"]["toEpoch"] == term.fence.epoch + 1


def test_a_snapshot_of_four_shards_reads_each_store_of_each_shard_once(ns: Namespace) -> None:
    counter = CallCounter()
    observed = ns.app(request_hook=counter, LEDGER_SHARDS="4")
    counter.calls.clear()
    status.snapshot(observed)
    # Per shard: fence, lease, completions, flight, outcomes in the window, all outcomes, the
    # takeover row, the outbox; then
    # the parked table (the poison queue's client is not counted).
    assert counter.total == 4 * 8 + 1, counter.calls


def test_cli_status_prints_one_line_per_shard(ns: Namespace, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "LOCAL_SETTINGS", tmp_path / "absent.json")
    app = sharded(ns)
    [alice], [bob] = accounts_on(1, 1), accounts_on(2, 1)
    send(app, *deposit("fund", alice, "10.00"))
    record(app, *transfer(request_on(0, "t"), alice, bob, "3.00"))
    elect_only(app, 0)  # a coordination on 0, a message on 1
    run = Run(ns.env(LEDGER_SHARDS="4"))
    assert run("status") == 0, run.err
    table = [re.split(r"\s{2,}", line.strip()) for line in run.out.splitlines()]
    header = table.index(list(shard_cli.HEADERS))
    rows = {int(row[0]): dict(zip(shard_cli.HEADERS, row, strict=True))
            for row in table[header + 1:header + 5]}
    assert sorted(rows) == [0, 1, 2, 3]
    assert [rows[k]["EPOCH"] for k in range(4)] == ["1", "1", "0", "0"]
    assert [rows[k]["IN FLIGHT"] for k in range(4)] == ["1", "1", "0", "0"]
    assert rows[0]["OLDEST"].endswith(" s")
    assert rows[2]["OLDEST"] == "-"
    assert rows[2]["LAST COMMIT"] == "never"
    assert run("--json", "status") == 0
    assert [row["inFlight"] for row in run.json()["shards"]] == [1, 1, 0, 0]
