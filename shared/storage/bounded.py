"""Bounded reads: at most ``limit`` rows of a query, and whether it stopped at the bound.

The one place that counts or collects rows up to a limit (pending completions, parked
messages, outcome rows for the status page), so every such read costs at most ``limit`` rows
whatever the backlog.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Bounded(Generic[T]):
    """Rows read by a bounded query, and whether more were left unread."""

    rows: list[T]
    truncated: bool


def take_bounded(rows: Iterable[T], limit: int) -> Bounded[T]:
    """The first ``limit`` rows; ``truncated`` when at least one more exists."""
    found: list[T] = []
    for row in rows:
        if len(found) >= limit:
            return Bounded(found, True)
        found.append(row)
    return Bounded(found, False)
