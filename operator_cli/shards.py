"""``./dev cli status``: one line per shard under the leader summary (``GET /api/leader``'s
``shards``): its leader, lease state, epoch, pending completions, work in flight between shards
with the oldest item's age, and its last commit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from operator_cli.output import table

HEADERS = ["SHARD", "LEADER", "LEASE", "EPOCH", "PENDING", "IN FLIGHT", "OLDEST", "LAST COMMIT"]


def age(seconds: float | None) -> str:
    """An age as people read it (``-`` when there is none)."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def shard_lines(shards: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-shard table (a ``>=`` marks a count that stopped at its bound)."""
    rows = []
    for shard in shards:
        lease = shard.get("lease") or {}
        holder = str(shard.get("holder") or "none")
        rows.append([
            shard.get("shard"), holder.split("/", 1)[0], lease.get("state", "unknown"),
            shard.get("epoch"),
            f"{'>=' if shard.get('pendingTruncated') else ''}{shard.get('pendingCompletions')}",
            f"{'>=' if shard.get('inFlightTruncated') else ''}{shard.get('inFlight', 0)}",
            age(shard.get("oldestInFlightAgeSeconds")),
            shard.get("lastCommitAt") or "never",
        ])
    return table(HEADERS, rows)
