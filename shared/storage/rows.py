"""Two row-level idioms over the ``Table`` port that several stores share.

- ``prefix_range``: the ``RowKey`` range of the keys that start with a prefix, as query
  parameters (``RowKey ge @low and RowKey lt @high``).
- ``create_once``: create rows of one partition that may exist already, one entity-group
  transaction per 100 rows, and one by one when storage refuses a transaction (a row of it
  exists); it says which rows existed, and the caller decides what that means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.domain.planning import MAX_TRANSACTION_OPERATIONS
from shared.errors import AlreadyExists, BatchRefused
from shared.storage.ports import Table


def prefix_range(prefix: str) -> dict[str, str]:
    """The RowKey range of the keys that start with ``prefix``: ``low <= key < high``."""
    return {"low": prefix, "high": prefix[:-1] + chr(ord(prefix[-1]) + 1)}


def create_once(table: Table, entities: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Create rows of one partition (a RowKey given twice is created once); the entities whose
    row existed already."""
    unique = list({str(e["RowKey"]): e for e in entities}.values())
    existing: list[dict[str, Any]] = []
    for start in range(0, len(unique), MAX_TRANSACTION_OPERATIONS):
        chunk = unique[start:start + MAX_TRANSACTION_OPERATIONS]
        try:
            table.submit([("create", e) for e in chunk])
            continue
        except BatchRefused:
            pass
        for entity in chunk:
            try:
                table.create(entity)
            except AlreadyExists:
                existing.append(entity)
    return existing
