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
    assert leader["record"] == 24, "one insert per leg"
    assert {"lease", "scan", "commit", "delete"} <= set(leader)
    skipped = [c for c in run["cells"] if c["skipped"]]
    assert {(c["strategy"], c["workload"]) for c in skipped} == {
        ("naive", "transfers"), ("single", "transfers")}
    assert [(d["backlog"], d["decided"]) for d in run["drain"]] == [(30, 30)]
    assert run["failover"][0]["seconds"] is not None
    table = (tmp_path / "smoke.md").read_text()
    assert "| spread | 0 | naive | 2 | backlog | 12/12 |" in table
    assert (tmp_path / "smoke.png").stat().st_size > 10_000


def test_the_probe_classifies_storage_requests_by_kind() -> None:
    probe = StorageProbe("bcompletions", ("bledger",), ("b-leases",))

    class Request:
        def __init__(self, method: str, url: str, body: bytes = b"") -> None:
            self.method, self.url, self.body = method, url, body

    base = "http://127.0.0.1:1/devstoreaccount1"
    cases = {
        ("POST", f"{base}/bcompletions"): "record",
        ("GET", f"{base}/bcompletions(PartitionKey='r',RowKey='o')"): "record",
        ("GET", f"{base}/bcompletions()"): "scan",
        ("PUT", f"{base}/b-leases/ledger-leader?comp=lease"): "lease",
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
