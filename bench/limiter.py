"""Azure's per-partition limit, emulated in front of Azurite: a token bucket per table partition.

Azure Table storage serves one partition at up to ``2,000 entities/s``; Azurite has no such
limit, and that limit is the reason to shard the ledger. ``PartitionLimiter`` keeps one token
bucket per (table, PartitionKey), refilled at ``rate`` tokens/s up to ``burst`` tokens, and every
table request *consumes* from the bucket of the partition it touches:

- a point read, insert, update, merge or delete: one token;
- an entity-group transaction (``$batch``): one token per operation in it (all of one partition);
- a query: one token per entity it returned (counted in the answer: its ``odata.etag``
  properties), at least one; a query that names no single partition (a full scan) is charged
  to a table-wide bucket.

A request that finds its bucket short still goes, later: the bucket goes into debt and the
request waits ``debt / rate`` (writes before they are sent, queries after their answer came,
when their size is known). Requests are thus served first come, first served at the
partition's sustained rate, never refused: Azure answers 503 ``ServerBusy`` instead and the
SDK retries after a back-off, which only makes a throttled partition slower than this. So one
shard is bound by its partitions as in Azure (its ledger partition and its ready index above
all), and K shards have K times the partitions.

**Shared by every thread and process of a run.** The buckets live in shared memory
(``multiprocessing.RawArray``: 64-bit key digests, tokens, last refill time) under one
``multiprocessing.Lock``, created by the parent before it forks the load generator's processes
(``bench.loadgen``), which inherit them; ``time.monotonic`` is the one system-wide clock of
Linux, so every process refills alike. A bucket is found by open addressing on a BLAKE2 digest
of (table, PartitionKey): distinct partitions never share a bucket (a 64-bit digest collision
aside). The lock is held for a few microseconds per request; the wait happens outside it.

The limiter sits in the HTTP transport (``ThrottledAdapter``, a ``requests`` adapter mounted on
an azure-core ``RequestsTransport``: ``transport_factory`` of ``shared.storage.clients``), below
the SDKs' retry policies, after the ``StorageProbe``'s injected latency. Only the table endpoint
is limited (blobs and queues have their own, higher, limits that the benchmark does not reach).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import HTTPAdapter

AZURE_PARTITION_RATE = 2000.0  # entities/s one table partition serves (Azure's scalability target)
BURST_SECONDS = 0.1  # a bucket holds this many seconds of its rate
BUCKETS = 4096  # distinct (table, partition) pairs one limiter holds
WHOLE_TABLE = "*"  # the bucket a query over several partitions is charged to

_BATCH_OPERATION = re.compile(rb"^(?:POST|PUT|PATCH|MERGE|DELETE|GET) (https?://\S+) HTTP/1\.1",
                              re.M)
_KEY_IN_URL = re.compile(r"PartitionKey='((?:[^']|'')*)'")
_KEY_IN_BODY = re.compile(rb'"PartitionKey"\s*:\s*"((?:[^"\\]|\\.)*)"')
_KEY_IN_FILTER = re.compile(r"PartitionKey eq '((?:[^']|'')*)'")
_ENTITY = b'"odata.etag"'


@dataclass(frozen=True)
class Charge:
    """What one table request costs: ``tokens`` from the bucket of (``table``, ``partition``);
    ``after``: charged once the answer is in (a query: its entities are counted then)."""

    table: str
    partition: str
    tokens: int = 1
    after: bool = False
    label: str = ""  # how reports name it, when not by its partition (a read of work in flight)


def charge_of(method: str, url: str, body: bytes | str | None) -> Charge | None:
    """What a request to the table endpoint costs (``None``: no partition, e.g. ``Tables``)."""
    path = unquote(urlsplit(url).path).rstrip("/")
    segment = path.rsplit("/", 1)[-1]
    raw = body.encode() if isinstance(body, str) else (body or b"")
    if segment == "$batch":
        operations = _BATCH_OPERATION.findall(raw)
        if not operations:
            return None
        first = unquote(urlsplit(operations[0].decode("latin-1")).path).rsplit("/", 1)[-1]
        table, _, key = first.partition("(")
        found = _KEY_IN_URL.search(key)
        if found is not None:
            partition = found.group(1).replace("''", "'")
        else:
            in_body = _KEY_IN_BODY.search(raw)
            partition = in_body.group(1).decode("utf-8", "replace") if in_body else WHOLE_TABLE
        return Charge(table, partition, len(operations))
    table, paren, key = segment.partition("(")
    if table in ("", "Tables") or table.startswith("Tables"):
        return None
    found = _KEY_IN_URL.search(key)
    if found is not None:  # a point operation on one entity
        return Charge(table, found.group(1).replace("''", "'"))
    if method.upper() == "GET" or paren:  # a query: charged by what it returns
        query = unquote(urlsplit(url).query).replace("+", " ")
        where = _KEY_IN_FILTER.search(query)
        return Charge(table, where.group(1).replace("''", "'") if where else WHOLE_TABLE,
                      after=True, label="flight" if "'flight:'" in query else "")
    in_body = _KEY_IN_BODY.search(raw)  # an insert: the entity is the body
    return Charge(table, in_body.group(1).decode("utf-8", "replace") if in_body else WHOLE_TABLE)


def entities_in(answer: bytes) -> int:
    """How many entities a query's answer holds (at least one: an empty answer is a call too)."""
    return max(1, answer.count(_ENTITY))


@dataclass
class Throttling:
    """What the limiter did in one process: tokens taken and seconds waited, by partition kind
    (``ledger``, ``ready`` index, ``steps`` rows, ``meta``, ``other``; the ledger partition's
    reads of its work in flight between shards apart, as ``flight``)."""

    tokens: Counter[str] = field(default_factory=Counter)
    waited_s: dict[str, float] = field(default_factory=dict)
    waits: Counter[str] = field(default_factory=Counter)  # requests that had to wait

    def add(self, kind: str, tokens: int, waited: float) -> None:
        self.tokens[kind] += tokens
        if waited > 0:
            self.waited_s[kind] = self.waited_s.get(kind, 0.0) + waited
            self.waits[kind] += 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"tokens": dict(self.tokens), "waited_s": {k: round(v, 3) for k, v in
                                                          self.waited_s.items()},
                "waits": dict(self.waits)}

    def merge(self, other: dict[str, dict[str, float]]) -> None:
        self.tokens.update({k: int(v) for k, v in other.get("tokens", {}).items()})
        for kind, waited in other.get("waited_s", {}).items():
            self.waited_s[kind] = self.waited_s.get(kind, 0.0) + waited
        self.waits.update({k: int(v) for k, v in other.get("waits", {}).items()})


def partition_kind(table: str, partition: str) -> str:
    """A coarse name for reports: ledger, ready index, step rows, or other."""
    if partition.startswith("ledger"):
        return "ledger"
    if partition == "~ready":
        return "ready"
    if partition.startswith("~"):
        return "meta"
    if "completions" in table:
        return "steps"
    return "other"


class PartitionLimiter:
    """Token buckets per (table, PartitionKey) in shared memory (see the module docstring).

    Build it in the parent before forking; the children use the same buckets.
    ``rate <= 0`` turns it off (every request passes at once).
    """

    def __init__(self, rate: float = AZURE_PARTITION_RATE, burst_seconds: float = BURST_SECONDS,
                 buckets: int = BUCKETS, table_port: int | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * burst_seconds)
        self.buckets = buckets
        self.table_port = table_port  # only requests to this port are limited (None: any)
        context = multiprocessing.get_context("fork")
        self._keys = context.RawArray("Q", buckets)  # 0: free
        self._tokens = context.RawArray("d", buckets)
        self._refilled = context.RawArray("d", buckets)  # monotonic time; 0: never (full)
        self._lock = context.Lock()
        self.throttling = Throttling()  # this process's own figures
        self._local = threading.Lock()

    @staticmethod
    def _digest(table: str, partition: str) -> int:
        digest = hashlib.blake2b(f"{table}\x00{partition}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") or 1

    def _slot(self, digest: int) -> int:
        index = digest % self.buckets
        for _ in range(self.buckets):
            held = self._keys[index]
            if held == digest:
                return index
            if held == 0:
                self._keys[index] = digest
                return index
            index = (index + 1) % self.buckets
        raise RuntimeError(f"more than {self.buckets} partitions: make the limiter bigger")

    def take(self, table: str, partition: str, tokens: int, wait: bool = True,
             label: str = "") -> float:
        """Consume ``tokens`` from the partition's bucket; wait while it is in debt (unless not
        ``wait``: the bucket is charged all the same). Returns the seconds to wait."""
        if self.rate <= 0:
            return 0.0
        digest = self._digest(table, partition)
        with self._lock:
            slot = self._slot(digest)
            now = time.monotonic()
            last = self._refilled[slot]
            held = self.burst if last == 0 else min(
                self.burst, self._tokens[slot] + (now - last) * self.rate)
            held -= tokens
            self._tokens[slot] = held
            self._refilled[slot] = now
        delay = -held / self.rate if held < 0 else 0.0
        if delay > 0 and wait:
            time.sleep(delay)
        with self._local:
            self.throttling.add(label or partition_kind(table, partition), tokens, delay)
        return delay

    def limits(self, url: str) -> bool:
        """Whether requests to ``url`` go through the buckets (the table endpoint only)."""
        if self.rate <= 0:
            return False
        return self.table_port is None or urlsplit(url).port == self.table_port

    def reset(self) -> Throttling:
        """This process's figures so far, and start again from zero."""
        with self._local:
            taken, self.throttling = self.throttling, Throttling()
        return taken

    def transport(self, timeout_seconds: float) -> RequestsTransport:
        """An azure-core transport whose requests go through the buckets (a
        ``shared.storage.clients.TransportFactory``)."""
        session = requests.Session()
        adapter = ThrottledAdapter(self)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return RequestsTransport(session=session, session_owner=True,
                                 connection_timeout=timeout_seconds,
                                 read_timeout=timeout_seconds)


class ThrottledAdapter(HTTPAdapter):
    """A ``requests`` adapter that charges each table request to its partition's bucket."""

    def __init__(self, limiter: PartitionLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        url = str(request.url)
        body = request.body if isinstance(request.body, bytes | str) else None
        charge = charge_of(str(request.method), url, body) if self.limiter.limits(url) else None
        if charge is not None and not charge.after:
            self.limiter.take(charge.table, charge.partition, charge.tokens, label=charge.label)
        response = super().send(request, stream=stream, timeout=timeout, verify=verify,
                                cert=cert, proxies=proxies)
        if charge is not None and charge.after:
            tokens = entities_in(response.content) if not stream else 1
            self.limiter.take(charge.table, charge.partition, tokens, label=charge.label)
        return response
