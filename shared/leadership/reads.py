"""Concurrent point reads for a term: many at once, in order, keeping what succeeded.

A term reads the account rows a round needs, and the ready view re-reads the requests whose
verdict depends on the deadline, ``ACCOUNT_READERS`` at a time (the clients' connection pool
holds 10); the operators' views read every shard the same way (``shared/web/shards.py``).
``tolerant`` turns a read that raises into a ``Failed`` value, so one slow or
failed read does not throw away the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

Key = TypeVar("Key")
Row = TypeVar("Row")

ACCOUNT_READERS = 6  # concurrent point reads (the clients' connection pool holds 10)


@dataclass(frozen=True)
class Failed:
    """A read that raised: its error, kept so that the other reads go on."""

    error: Exception


def tolerant(read: Callable[[Key], Row]) -> Callable[[Key], Row | Failed]:
    """``read``, returning ``Failed(error)`` instead of raising."""
    def attempt(key: Key) -> Row | Failed:
        try:
            return read(key)
        except Exception as exc:
            return Failed(exc)
    return attempt


def read_concurrently(read: Callable[[Key], Row], keys: Sequence[Key],
                      workers: int = ACCOUNT_READERS) -> list[Row]:
    """``read(key)`` for every key, in order, ``workers`` reads at a time."""
    if not keys:
        return []
    if len(keys) == 1:
        return [read(keys[0])]
    with ThreadPoolExecutor(min(workers, len(keys)),
                            thread_name_prefix="ledger-read") as pool:
        return list(pool.map(read, keys))
