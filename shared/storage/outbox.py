"""The outbox rows of a ledger partition: read them, create one outside a commit, delete them.

An outbox row (``shared/domain/outbox.py``) is created in the fenced transaction that decides
(or settles) the requests its events announce, and deleted once every event it carries was
sent. Nothing else changes a row, so deleting one ``If-Match`` the version read is deleting the
row whose events were just sent, whoever sends them. Rows are read by key range (``outbox:``),
oldest epoch first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.domain.outbox import HANDED_OFF, OUTBOX_PREFIX, events_of, outbox_entity
from shared.errors import AlreadyExists, NotFound
from shared.storage.ports import Table
from shared.storage.rows import prefix_range


@dataclass(frozen=True)
class OutboxRow:
    """One row as read: its key and version, the bodies it carries, storage's time of write."""

    key: str
    etag: str
    bodies: tuple[str, ...]
    written_at: datetime | None = None
    handed_off: bool = False  # a publisher invocation sends it (the leader handed it off)


@dataclass(frozen=True)
class OutboxDepth:
    """How many outbox rows and events wait in a partition, and the oldest row's age."""

    rows: int
    events: int
    oldest_age_seconds: float


def _row(row: Any) -> OutboxRow:
    return OutboxRow(str(row["RowKey"]), str(row.etag), tuple(events_of(row)), row.timestamp,
                     bool(row.get(HANDED_OFF)))


class OutboxStore:
    """The outbox rows of one ledger partition."""

    def __init__(self, table: Table, partition: str) -> None:
        self.table = table
        self.partition = partition

    def _query(self, limit: int, select: Sequence[str] | None = None) -> Any:
        return self.table.query("PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
                                parameters={"pk": self.partition,
                                            **prefix_range(OUTBOX_PREFIX)},
                                select=select, page_size=min(1000, limit), limit=limit)

    def read(self, limit: int = 1000) -> tuple[list[OutboxRow], datetime | None]:
        """At most ``limit`` rows, oldest epoch first, and storage's time of the read."""
        rows = self._query(limit)
        found = [_row(row) for row in rows]
        return found, rows.date

    def read_row(self, key: str) -> OutboxRow | None:
        """One row by its key, or ``None`` (sent and deleted already)."""
        try:
            return _row(self.table.get(self.partition, key))
        except NotFound:
            return None

    def depth(self, limit: int = 10_000) -> OutboxDepth:
        """Rows and events waiting (counting stops at ``limit`` rows), and the oldest's age
        (storage's time of its write against the ``Date`` of this read)."""
        rows = self._query(limit, select=["RowKey", "count", "Timestamp"])
        count = events = 0
        oldest: datetime | None = None
        for row in rows:
            count += 1
            events += int(row.get("count") or 0)
            stamp = row.timestamp
            if stamp is not None and (oldest is None or stamp < oldest):
                oldest = stamp
        age = 0.0
        if oldest is not None and rows.date is not None:
            age = max(0.0, (rows.date - oldest).total_seconds())
        return OutboxDepth(count, events, age)

    def create_once(self, key: str, events: Sequence[Mapping[str, Any]]) -> None:
        """Create a row outside a commit (a parked contradiction); one that exists is kept."""
        with contextlib.suppress(AlreadyExists):
            self.table.create(outbox_entity(self.partition, key, events))

    def delete(self, key: str, etag: str | None) -> None:
        """Delete a row whose events were sent (``If-Match`` ``etag``; absent is done)."""
        self.table.delete(self.partition, key, etag=etag)
