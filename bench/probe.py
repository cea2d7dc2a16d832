"""What the benchmark puts between every strategy and storage: injected latency and call counts.

One ``StorageProbe`` is installed as the ``raw_request_hook`` of every client a run builds
(``shared.clients`` passes it to the SDKs, where azure-core's ``CustomHookPolicy`` /
``StorageRequestHook`` call it once per *try*, after the retry policy). It

- sleeps ``latency_ms`` before each request goes out: an Azure-like round trip added to
  Azurite's loopback one, the same for every strategy;
- classifies the request from its method, URL and (for ``$batch``) body into one kind:
  ``record`` (insert or point-read of a completion row), ``lease`` (any request on a lease
  blob), ``scan`` (a query or listing of the completions table), ``read`` (a read of the ledger
  or the naive strategy's table), ``commit`` (a write to those: transactions, fence claims),
  ``delete`` (deleting completion rows), ``other`` (table creation and the like).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

KINDS = ("record", "lease", "scan", "read", "commit", "delete", "other")


@dataclass
class StorageProbe:
    """A request hook: per-call latency plus counts by kind (thread-safe)."""

    completions_table: str
    data_tables: tuple[str, ...]  # tables a strategy reads and commits to (ledger, naive)
    lease_containers: tuple[str, ...]  # containers of the lease blobs
    latency_ms: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
        segment = path.rstrip("/").rsplit("/", 1)[-1]
        if segment == "$batch":
            body = _body_text(http_request)
            if "DELETE " in body:
                return "delete"
            if self.completions_table + "(" in body or f"/{self.completions_table} " in body:
                return "record"
            return "commit"
        table, _, key = segment.partition("(")
        point = "PartitionKey=" in key
        if table == self.completions_table:
            if method == "GET":
                return "record" if point else "scan"
            if method == "DELETE":
                return "delete"
            return "record"
        if table in self.data_tables:
            return "read" if method == "GET" else "commit"
        return "other"


def _body_text(http_request: Any) -> str:
    body = getattr(http_request, "body", None) or getattr(http_request, "data", None) or b""
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return str(body)
