"""The shard map in storage: one row of the ledger table, authoritative, and the reshard journal.

**The map row** (PartitionKey ``shardmap``, RowKey ``current``): ``generation``, ``shards``, the
64 slots (``slots``: shard numbers, comma-separated) and ``earlier``: the earlier generations'
maps (JSON ``[[generation, shards, slots], ...]``, oldest first). A deployment's first process
creates it from ``LEDGER_SHARDS`` (create-once, ``load_or_seed``); afterwards ``LEDGER_SHARDS``
is only compared with it. Only a reshard changes it, ``If-Match`` the version it read
(``publish``), so two reshards cannot both publish.

**The journal row** (same partition, RowKey ``journal``): what a reshard has done so far and the
lease ids it holds (``shared/leadership/reshard.py``). Every change is ``If-Match`` the version
read, so two reshard processes cannot both drive one journal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.domain.sharding import ShardMap
from shared.errors import AlreadyExists, NotFound
from shared.storage.ports import Mode, Row, Table

MAP_PARTITION = "shardmap"
CURRENT_ROW = "current"
JOURNAL_ROW = "journal"


def _slots_text(shard_map: ShardMap) -> str:
    return ",".join(str(s) for s in shard_map.slots)


def _map(generation: Any, shards: Any, slots: Any) -> ShardMap:
    return ShardMap(int(shards), tuple(int(s) for s in str(slots).split(",")), int(generation))


@dataclass(frozen=True)
class StoredMap:
    """The map in force, the earlier generations' maps (oldest first), the row's version."""

    current: ShardMap
    earlier: tuple[ShardMap, ...] = ()
    etag: str = ""

    def entity(self) -> dict[str, Any]:
        return {"PartitionKey": MAP_PARTITION, "RowKey": CURRENT_ROW,
                "generation": self.current.generation, "shards": self.current.shards,
                "slots": _slots_text(self.current),
                "earlier": json.dumps([[m.generation, m.shards, _slots_text(m)]
                                       for m in self.earlier])}

    @classmethod
    def from_row(cls, row: Row) -> StoredMap:
        earlier = tuple(_map(*item) for item in json.loads(row.get("earlier") or "[]"))
        return cls(_map(row["generation"], row["shards"], row["slots"]), earlier, str(row.etag))


class ShardMapStore:
    """Reads and conditional writes of the map row and the journal row."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def read(self) -> StoredMap | None:
        try:
            return StoredMap.from_row(self.table.get(MAP_PARTITION, CURRENT_ROW))
        except NotFound:
            return None

    def load_or_seed(self, shards: int) -> StoredMap:
        """The stored map; a new deployment's first call creates generation 1 with the seeded
        layout of ``shards`` (create-once: every process agrees on the first one written)."""
        found = self.read()
        if found is not None:
            return found
        seed = StoredMap(ShardMap(shards, generation=1))
        try:
            written = self.table.create(seed.entity())
        except AlreadyExists:
            found = self.read()
            if found is None:  # pragma: no cover - created and deleted between two calls
                raise
            return found
        return StoredMap(seed.current, (), str(written.etag))

    def publish(self, new: ShardMap, seen: StoredMap) -> StoredMap:
        """Make ``new`` the map in force, ``If-Match`` the version ``seen`` (raises
        ``ConditionFailed`` when another writer changed it). ``seen.current`` joins the earlier
        generations. Publishing the map in force already is a no-op."""
        if seen.current == new:
            return seen
        stored = StoredMap(new, (*seen.earlier, seen.current))
        written = self.table.update(stored.entity(), mode=Mode.REPLACE, etag=seen.etag)
        return StoredMap(new, stored.earlier, str(written.etag))

    # --- the journal -----------------------------------------------------------------------
    def read_journal(self) -> Row | None:
        try:
            return self.table.get(MAP_PARTITION, JOURNAL_ROW)
        except NotFound:
            return None

    def create_journal(self, fields: dict[str, Any]) -> str:
        """Create the journal row (raises ``AlreadyExists``); returns its version."""
        written = self.table.create({"PartitionKey": MAP_PARTITION, "RowKey": JOURNAL_ROW,
                                     **fields})
        return str(written.etag)

    def write_journal(self, fields: dict[str, Any], etag: str) -> str:
        """Replace the journal row ``If-Match`` ``etag``; returns its new version."""
        written = self.table.update({"PartitionKey": MAP_PARTITION, "RowKey": JOURNAL_ROW,
                                     **fields}, mode=Mode.REPLACE, etag=etag)
        return str(written.etag)
