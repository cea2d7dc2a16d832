"""The work per delivery and per term does not grow with the requests waiting for their steps.

The hot path addresses completion rows by key only: a recorder reads its request's key range, a
leader reads the ready index (one partition). Full scans (``shared/leadership/sweeper.py``) are
made at most
once a minute per deployment, with the time of the last one kept in storage, and each reads a
bounded number of rows. The rates side by side are in ``bench/`` (``./dev bench --only waiting``).
"""

from __future__ import annotations

import threading
from collections import Counter
from urllib.parse import parse_qs, unquote, urlsplit

from azure.core.pipeline import PipelineRequest

from shared.leadership.elections import Role, run_election
from shared.leadership.sweeper import repair_scan
from shared.storage.completions import FULL_SCAN_ROW, META_PARTITION
from tests.helpers import Namespace, deposit, record, send, status, transfer


class TableReads:
    """A request hook: every read of one table, as (kind, filter)."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.reads: list[str] = []
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: PipelineRequest) -> None:  # type: ignore[type-arg]
        http = request.http_request
        parts = urlsplit(http.url)
        with self._lock:
            self.calls[http.method] += 1
            if http.method == "GET" and unquote(parts.path).split("/")[-1].startswith(
                    self.table):
                query = parse_qs(parts.query)
                self.reads.append(query.get("$filter", ["<no filter: a scan>"])[0])

    def clear(self) -> None:
        with self._lock:
            self.reads.clear()
            self.calls.clear()


READY = "PartitionKey eq '~ready'"


def _waiting(count: int) -> list[bytes]:
    """First legs of transfers whose second legs have not arrived."""
    return [transfer(f"wait{i:05d}", f"acct{i % 50}", "bob", "1.00")[0] for i in range(count)]


def test_deliveries_and_terms_read_by_key_only_whatever_waits(ns: Namespace) -> None:
    env = ns.env()
    hook = TableReads(env["COMPLETIONS_TABLE_NAME"])
    app = ns.app(request_hook=hook)
    send(app, *deposit("d0", "alice", "100.00"))

    def one_transfer(request_id: str) -> tuple[Counter[str], int]:
        """The calls one transfer's two deliveries made, and how many read the ready index."""
        hook.clear()
        results = send(app, *transfer(request_id, "alice", "bob", "1.00"))
        assert results[1].election is not None
        assert results[1].election.role is Role.LEADER
        assert status(app, request_id) == "committed"
        for read in hook.reads:  # a key range of one request, or the ready index's partition
            assert "PartitionKey eq" in read, read
            assert " or " not in read, read
        ready_reads = hook.reads.count(READY)
        return Counter(hook.calls) - Counter({"GET": ready_reads}), ready_reads

    one_transfer("t-warm")  # both accounts cached from here on
    without, ready_without = one_transfer("t-before")
    record(app, *_waiting(600))  # 600 requests wait for their other leg
    with_backlog, ready_with = one_transfer("t-after")
    assert with_backlog == without, "the same calls, however many requests wait"
    # A round and each look read the ready index once (a lingering leader may look once more).
    assert ready_without <= 4
    assert ready_with <= 4


def test_at_most_one_full_scan_a_minute_per_deployment_with_the_time_in_storage(
        ns: Namespace) -> None:
    first, second = ns.app("first"), ns.app("second")
    record(first, *_waiting(5))
    assert repair_scan(first) is not None
    assert repair_scan(second) is None, "another instance scanned less than a minute ago"
    assert repair_scan(first) is None
    row = first.completions.table.get(META_PARTITION, FULL_SCAN_ROW)
    assert row["lastScanAt"]


def test_a_full_scan_is_bounded_and_the_next_one_resumes_where_it_stopped(ns: Namespace) -> None:
    app = ns.app()
    record(app, *_waiting(250))
    seen: set[str] = set()
    position = ("", "")
    for _ in range(3):
        scan = app.completions.scan_rows(position, max_rows=100)
        assert scan.rows <= 100
        assert not seen & scan.steps.keys(), "each request once"
        seen |= scan.steps.keys()
        if scan.resume_at is None:
            break
        position = scan.resume_at
    assert len(seen) == 250
    assert scan.resume_at is None


def test_a_term_never_reads_waiting_requests(ns: Namespace) -> None:
    env = ns.env()
    hook = TableReads(env["COMPLETIONS_TABLE_NAME"])
    app = ns.app(request_hook=hook)
    record(app, *_waiting(300), *deposit("d1", "alice", "1.00"))
    hook.clear()
    result = run_election(app)
    assert result.role is Role.LEADER
    assert status(app, "d1") == "committed"
    assert hook.reads
    assert all(read == READY for read in hook.reads), hook.reads
