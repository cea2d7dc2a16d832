"""The benchmark harness runs end to end (tiny sizes: the figures themselves live in bench/)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from bench.__main__ import main
from bench.limiter import Charge, PartitionLimiter, charge_of, entities_in
from bench.probe import StorageProbe
from simulator.azurite import Azurite


def test_a_tiny_benchmark_run_commits_everything_and_writes_its_report(
        azurite: Azurite, tmp_path: Path) -> None:
    # --seconds 20: a cell ends when its work is done; the window only bounds a loaded machine
    # (at 3 s, a CI run with every core busy committed 8 of 12 transfers in time).
    code = main(["--quick", "--instances", "2", "--requests", "12", "--backlog", "30",
                 "--seconds", "20",
                 "--no-waiting", "--no-overload", "--no-shards", "--no-hot",
                 "--connection-string", azurite.connection_string, "--out", str(tmp_path),
                 "--name", "smoke"])
    assert code == 0
    run = json.loads((tmp_path / "smoke.json").read_text())
    measured = [c for c in run["cells"] if not c["skipped"]]
    assert {(c["strategy"], c["workload"]) for c in measured} == {
        ("leader", "hot"), ("leader", "spread"), ("leader", "transfers"),
        ("naive", "hot"), ("naive", "spread"), ("single", "hot"), ("single", "spread")}
    for cell in measured:
        assert cell["committed"] == cell["sent"] == 12, cell
        assert cell["errors"] == 0, cell
        assert cell["rate"] > 0, cell
        assert cell["p99_ms"] >= cell["p50_ms"] > 0, cell
    by = {(c["strategy"], c["workload"]): c for c in measured if c["offered_rate"] is None}
    # What each strategy spends its calls on, as classified from the requests themselves.
    assert set(by["naive", "spread"]["calls"]) == {"read", "commit"}
    assert set(by["single", "hot"]["calls"]) == {"lease", "read", "commit"}
    leader = by["leader", "transfers"]["calls"]
    # First leg: its row and the request's row in one transaction. Second leg: that transaction
    # (refused: the request row exists), its insert alone, the read of the request's rows, and
    # the marker that announces the request.
    assert leader["record"] == 12 * 5, leader
    assert {"ready", "lease", "alarm", "commit", "delete"} <= set(leader)
    assert "scan" not in leader, "no full scan on the hot path"
    skipped = [c for c in run["cells"] if c["skipped"]]
    assert {(c["strategy"], c["workload"]) for c in skipped} == {
        ("naive", "transfers"), ("single", "transfers")}
    assert [(d["backlog"], d["decided"]) for d in run["drain"]] == [(30, 30)]
    assert run["failover"][0]["seconds"] is not None
    table = (tmp_path / "smoke.md").read_text()
    assert "| spread | 0 | naive | 2 | backlog | 12/12 |" in table
    assert (tmp_path / "smoke.png").stat().st_size > 10_000


def test_a_tiny_run_of_the_backlog_and_overload_benchmarks_reports_them_side_by_side(
        azurite: Azurite, tmp_path: Path) -> None:
    code = main(["--quick", "--only", "waiting", "overload", "--waiting", "40",
                 "--requests", "12", "--sequential", "3", "--overload-deposits", "12",
                 "--connection-string", azurite.connection_string, "--out", str(tmp_path),
                 "--name", "side"])
    assert code == 0
    run = json.loads((tmp_path / "side.json").read_text())
    assert run["cells"] == run["drain"] == run["failover"] == []
    assert run["shards"] is None
    backlog = run["backlog"]
    assert [(c["kind"], c["waiting"]) for c in backlog["cells"]] == [
        ("hot", 0), ("hot", 40), ("sequential", 0), ("sequential", 40)]
    for cell in backlog["cells"]:
        assert cell["scans"] == 0, cell
        assert cell["committed"] == (12 if cell["kind"] == "hot" else 3), cell
        assert cell["record_seconds"] > 0 if cell["waiting"] else cell["record_seconds"] == 0
    assert backlog["hot_ratio"] > 0
    assert backlog["mean_ratio"] > 0
    assert backlog["worst_ratio"] > 0
    scan = backlog["full_scan"]
    assert (scan["rows"], scan["requests"], scan["announced"]) == (40, 40, 0), scan
    assert scan["calls"] == {"scan": 1, "ready": 1}, (
        "one page of the waiting rows and one of the (empty) ready index, nothing else")
    overload = run["overload"]
    assert [c["kind"] for c in overload["cells"]] == ["clean", "overloaded"]
    for cell in overload["cells"]:
        assert cell["decided"] == cell["deposits"] == 12, cell
        assert cell["terms"]
        assert all(t["held_s"] > 0 and t["committed"] for t in cell["terms"])
    assert overload["ratio"] > 0
    assert overload["long_terms_idle"] == 0
    table = (tmp_path / "side.md").read_text()
    assert "## Requests waiting for their steps: 40 vs none" in table
    assert "## Overload: 12 deposits over 4 accounts" in table


def test_the_probe_classifies_storage_requests_by_kind() -> None:
    probe = StorageProbe("bcompletions", ("bledger",), ("b-leases",), wakeup_queue="b-wake")

    class Request:
        def __init__(self, method: str, url: str, body: bytes = b"") -> None:
            self.method, self.url, self.body = method, url, body

    base = "http://127.0.0.1:1/devstoreaccount1"
    table = f"{base}/bcompletions()?$filter="
    cases = {
        ("POST", f"{base}/bcompletions"): "record",
        ("GET", f"{base}/bcompletions(PartitionKey='b01',RowKey='r%7Co')"): "record",
        # the recorder's read of its request's rows: one key range
        ("GET", f"{table}PartitionKey%20eq%20%27b01%27%20and%20RowKey%20ge%20%27r%7C%27"
                "%20and%20RowKey%20lt%20%27r%7D%27"): "record",
        # a marker merged into the ready index (PATCH, or MERGE through a tunnelling proxy)
        ("PATCH", f"{base}/bcompletions(PartitionKey='~ready',RowKey='r')"): "record",
        ("MERGE", f"{base}/bcompletions(PartitionKey='%7Eready',RowKey='r')"): "record",
        ("GET", f"{table}PartitionKey%20eq%20%27~ready%27"): "ready",
        ("GET", f"{table}PartitionKey%20lt%20%27~%27"): "scan",
        ("GET", f"{table}(%20PartitionKey%20eq%20%27b03%27%20and%20RowKey%20ge%20%27r%27%20)"
                "%20or%20(%20PartitionKey%20gt%20%27b03%27%20and%20PartitionKey%20lt%20%27~%27"
                "%20)"): "scan",
        ("GET", f"{base}/bcompletions()"): "scan",
        ("GET", f"{base}/bcompletions(PartitionKey='~meta',RowKey='fullscan')"): "scan",
        ("PUT", f"{base}/bcompletions(PartitionKey='~meta',RowKey='fullscan')"): "scan",
        ("DELETE", f"{base}/bcompletions(PartitionKey='~ready',RowKey='r')"): "delete",
        ("PUT", f"{base}/b-leases/ledger-leader?comp=lease"): "lease",
        ("POST", f"{base}/b-wake/messages?visibilitytimeout=58"): "alarm",
        ("PUT", f"{base}/b-wake/messages/m1?popreceipt=p&visibilitytimeout=58"): "alarm",
        ("DELETE", f"{base}/b-wake/messages/m1?popreceipt=p"): "alarm",
        ("GET", f"{base}/b-q/messages?numofmessages=1"): "other",
        ("GET", f"{base}/bledger(PartitionKey='ledger',RowKey='account%3Aa')"): "read",
        ("PUT", f"{base}/bledger(PartitionKey='ledger',RowKey='fence')"): "commit",
        ("POST", f"{base}/Tables"): "other",
    }
    for (method, url), kind in cases.items():
        assert probe.classify(Request(method, url)) == kind, url
    delete = b"DELETE http://127.0.0.1:1/devstoreaccount1/bcompletions(PartitionKey='r') HTTP/1.1"
    assert probe.classify(Request("POST", f"{base}/$batch", delete)) == "delete"
    commit = b"PUT http://127.0.0.1:1/devstoreaccount1/bledger(PartitionKey='ledger') HTTP/1.1"
    assert probe.classify(Request("POST", f"{base}/$batch", commit)) == "commit"
    # a request's first step, created with the request's row in one transaction
    first = b"POST http://127.0.0.1:1/devstoreaccount1/bcompletions HTTP/1.1"
    assert probe.classify(Request("POST", f"{base}/$batch", first)) == "record"


def test_a_tiny_sharding_run_settles_every_request_across_processes_and_reports_it(
        azurite: Azurite, tmp_path: Path) -> None:
    code = main(["--quick", "--only", "shards", "--shards", "2", "--cross-shards", "2",
                 "--shard-requests", "12", "--hot-requests", "12", "--hot-instances", "3",
                 "--shard-processes", "2", "--scaled-rate", "0",
                 "--connection-string", azurite.connection_string, "--out", str(tmp_path),
                 "--name", "shards"])
    assert code == 0
    run = json.loads((tmp_path / "shards.json").read_text())
    shards = run["shards"]
    cells = {c["kind"]: c for c in shards["cells"]}
    assert list(cells) == ["deposits", "transfers", "same", "cross", "intake", "hot"]
    for kind in ("deposits", "transfers", "same", "cross", "hot"):
        cell = cells[kind]
        # every request reads final, committed, in a ledger of two shards
        assert cell["committed"] == cell["final"] == cell["requests"], cell
        assert cell["rate"] > 0, cell
        assert cell["seconds"] > 0, cell
        assert cell["load"]["handled"] == cell["load"]["deliveries"], cell
        assert cell["load"]["failures"] == 0, cell
        assert cell["cpu"]["bench_cpu_s"] > 0, cell
    assert [cells[k]["requests"] for k in ("deposits", "transfers", "same", "cross")] == [
        12, 6, 6, 6], "as many deliveries in each: a transfer is two"
    assert cells["cross"]["crossed"] == 6, "every cross-shard transfer crossed"
    assert cells["same"]["crossed"] == 0, "no same-shard transfer crossed"
    assert cells["deposits"]["crossed"] == 0, "a deposit is homed on its account's shard"
    # the generator ran in two processes, and both delivered
    assert [p["handled"] > 0 for p in cells["transfers"]["load"]["per_process"]] == [True, True]
    # the intake floor records and announces, and commits nothing
    assert cells["intake"]["announced"] == 12 == cells["intake"]["deliveries"]
    assert cells["intake"]["committed"] == 0
    assert cells["intake"]["load"]["calls"] == {"record": 24}, "its row and its marker"
    # every table request went through the partition buckets
    tokens = cells["hot"]["load"]["throttling"]["tokens"]
    assert {"ledger", "ready", "steps"} <= set(tokens), tokens
    assert tokens["ready"] >= 12 * 2, "each deposit's marker, then at least its read or delete"
    assert shards["cross_ratio"] is not None
    assert shards["hot_ratio"] is not None
    table = (tmp_path / "shards.md").read_text()
    assert "## Shards" in table
    assert "| cross | 2 | 2,000 | 4 | 2 | 6/6 | 6 |" in table


def test_the_partition_limiter_charges_each_request_to_its_partition() -> None:
    base = "http://127.0.0.1:1/devstoreaccount1"
    assert charge_of("GET", f"{base}/bledger(PartitionKey='ledger-2',RowKey='account%3Aa')",
                     None) == Charge("bledger", "ledger-2")
    assert charge_of("POST", f"{base}/bcompletionsshard1",
                     b'{"PartitionKey": "b07", "RowKey": "r|o"}') == Charge(
        "bcompletionsshard1", "b07")
    # queries are charged once their answer is counted
    assert charge_of("GET", f"{base}/bcompletions()?$top=1000&$filter=PartitionKey%20eq"
                            "%20%27~ready%27", None) == Charge("bcompletions", "~ready",
                                                               after=True)
    assert charge_of("GET", f"{base}/bledger()?$filter=PartitionKey%20eq%20%27ledger-1%27"
                            "%20and%20RowKey%20ge%20%27flight%3A%27", None) == Charge(
        "bledger", "ledger-1", after=True, label="flight")
    assert charge_of("GET", f"{base}/bcompletions()", None) == Charge(
        "bcompletions", "*", after=True), "a query of several partitions: the whole table"
    batch = "\r\n".join(
        f"DELETE {base}/bcompletions(PartitionKey='~ready',RowKey='r{n}') HTTP/1.1"
        for n in range(3)).encode()
    assert charge_of("POST", f"{base}/$batch", batch) == Charge("bcompletions", "~ready", 3)
    assert charge_of("POST", f"{base}/Tables", b"{}") is None
    assert entities_in(b'{"value":[{"odata.etag":"a"},{"odata.etag":"b"}]}') == 2
    assert entities_in(b'{"value":[]}') == 1, "an empty answer is a call too"


def test_partition_buckets_are_shared_by_forked_processes_and_kept_apart_by_partition() -> None:
    limiter = PartitionLimiter(rate=1.0, burst_seconds=1.0)  # one token a second, one held

    def spend() -> None:  # another process runs the bucket 49 tokens into debt
        assert limiter.take("t", "p", 50, wait=False) == 49.0

    child = multiprocessing.get_context("fork").Process(target=spend)
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    owed = limiter.take("t", "p", 1, wait=False)
    assert 45 < owed <= 50, "this process waits for the debt the other one left"
    assert limiter.take("t", "q", 1, wait=False) == 0.0, "another partition has its own bucket"
    assert limiter.take("u", "p", 1, wait=False) == 0.0, "so does the same key in another table"
