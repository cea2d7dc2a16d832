"""What the benchmark puts between every strategy and storage: injected latency and call counts.

One ``StorageProbe`` is installed as the ``raw_request_hook`` of every client a run builds
(``shared.storage.clients`` passes it to the SDKs, where azure-core's ``CustomHookPolicy`` /
``StorageRequestHook`` call it once per *try*, after the retry policy). It

- sleeps ``latency_ms`` before each request goes out: an Azure-like round trip added to
  Azurite's loopback one, the same for every strategy;
- classifies the request from its method, URL (its ``$filter`` too) and, for ``$batch``, its
  body into one kind (the same split as ``simulator.faults.classify``, coarser; every shard's
  completions table, ``{name}shard{k}``, is a completions table, and a shard's reads of its work
  in flight between shards are ledger reads):

  - ``record``: what a recorder does with its request's rows: the transaction that creates a
    request's first step with its request row, a step's insert alone, point reads of a step,
    the read of one request's rows (one key range), and the merge of a marker into the ready
    index (``~ready``); also the leader's confirming read of one request's rows;
  - ``ready``: the leader's read of the ready index (a query of partition ``~ready``);
  - ``scan``: a real full scan of the completion rows (the sweeper's ``scan_rows``, ``count``,
    a query without a filter) and the bookkeeping of the rare full scan (partition ``~meta``);
  - ``lease``: any request on a lease blob (acquire, renew, release; the single consumer's lock);
  - ``alarm``: a call on the wake-up queue (``WAKEUP_QUEUE_NAME``): a leader arms a lease alarm
    when it acquires, postpones it at each renewal and deletes it at its release;
  - ``read``: a read of the ledger (fence, accounts, outcomes) or of the naive strategies' table;
  - ``commit``: a write to those (transactions, fence claims);
  - ``delete``: deleting completion rows and markers (tombstones written with them included);
  - ``other``: creating tables, queues, containers and blobs, and any other queue call.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from shared.config.names import TABLE_SUFFIX as SHARD_SUFFIX  # shard k's table: {name}shard{k}

KINDS = ("record", "ready", "lease", "alarm", "scan", "read", "commit", "delete", "other")
READY_PARTITION = "'~ready'"  # as it appears in a $filter or a key (shared.storage.completions)
META_PARTITION = "'~meta'"


class CallCounter:
    """A ``request_hook`` that counts storage calls by HTTP method (retries count too)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Any) -> None:
        method = request.http_request.method
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1

    @property
    def total(self) -> int:
        """All calls counted so far."""
        return sum(self.calls.values())


@dataclass
class StorageProbe:
    """A request hook: per-call latency plus counts by kind (thread-safe)."""

    completions_table: str
    data_tables: tuple[str, ...]  # tables a strategy reads and commits to (ledger, naive)
    lease_containers: tuple[str, ...]  # containers of the lease blobs
    latency_ms: float = 0.0
    wakeup_queue: str = ""  # the queue of the lease alarms
    counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _in_batch: re.Pattern[str] = field(init=False, repr=False)  # a completions table's URL

    def __post_init__(self) -> None:
        self._in_batch = re.compile(f"/{re.escape(self.completions_table)}"
                                    f"(?:{SHARD_SUFFIX}[0-9]+)?[ (]")

    def __call__(self, request: Any) -> None:
        kind = self.classify(request.http_request)
        with self._lock:
            self.counts[kind] += 1
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000)

    def reset(self) -> Counter[str]:
        """Return the counts so far and start again from zero."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def classify(self, http_request: Any) -> str:
        """The kind of one storage request (see the module docstring)."""
        method = str(http_request.method).upper()
        url = urlparse(str(http_request.url))
        path = unquote(url.path)
        parts = path.strip("/").split("/")
        if "comp=lease" in url.query or (len(parts) >= 3 and parts[1] in self.lease_containers):
            return "lease"
        if len(parts) >= 3 and parts[2] == "messages":
            return "alarm" if self.wakeup_queue and parts[1] == self.wakeup_queue else "other"
        segment = path.rstrip("/").rsplit("/", 1)[-1]
        if segment == "$batch":
            return self._batch(_body_text(http_request))
        table, _, key = segment.partition("(")
        if self._is_completions(table):
            return self._completions(method, key, parse_qs(url.query).get("$filter", [""])[0])
        if table in self.data_tables:
            return "read" if method == "GET" else "commit"
        return "other"

    def _is_completions(self, table: str) -> bool:
        """The completions table of shard 0 or of any other shard (``{name}shard{k}``)."""
        return table == self.completions_table or (
            table.startswith(self.completions_table + SHARD_SUFFIX)
            and table[len(self.completions_table) + len(SHARD_SUFFIX):].isdigit())

    def _batch(self, body: str) -> str:
        if "DELETE " in body:
            return "delete"
        if self._in_batch.search(body):
            return "record"
        return "commit"

    @staticmethod
    def _completions(method: str, key: str, where: str) -> str:
        """The kind of a call on the completions table (``key``: what follows the name)."""
        if META_PARTITION in key or META_PARTITION in where:
            return "scan"  # the full scan's claim and resume position
        if method == "DELETE":
            return "delete"
        if method != "GET":
            return "record"  # an insert, or a marker merged into the ready index
        if "PartitionKey=" in key:
            return "record"  # a point read of a step
        if READY_PARTITION in where and "RowKey" not in where:
            return "ready"
        if "PartitionKey eq" in where and "RowKey ge" in where and " or " not in where:
            return "record"  # one request's rows: a key range of one partition
        return "scan"


def _body_text(http_request: Any) -> str:
    body = getattr(http_request, "body", None) or getattr(http_request, "data", None) or b""
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return str(body)
