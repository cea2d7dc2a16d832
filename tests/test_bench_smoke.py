"""The benchmark harness runs end to end (tiny sizes: the figures themselves live in bench/)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main
from bench.probe import StorageProbe
from simulator.azurite import Azurite


def test_a_tiny_benchmark_run_commits_everything_and_writes_its_report(
        azurite: Azurite, tmp_path: Path) -> None:
    code = main(["--quick", "--instances", "2", "--requests", "12", "--backlog", "30",
                 "--no-waiting", "--no-overload",
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
