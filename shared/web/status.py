"""The live status page: its HTML, and the one JSON snapshot it polls (``GET /api/metrics``).

Everything comes from what storage already holds, read with bounded queries (each stops after a
fixed number of rows and says so with ``truncated``), all of them at once
(``shared/web/shards.py``):

- for each shard, the lease blob's properties and the fence row: who leads, with which epoch,
  since when; its completions table (projected scan): pending rows and the oldest one's age;
  with shards, its work in flight between shards;
- outcome rows of each shard's ledger partition: decided in the last ``WINDOW_SECONDS``
  (filtered on ``decidedAt`` by the server) for the throughput chart, each shard's commit rate
  and takeover marker, and all of them, up to ``shards.MAX_OUTCOME_ROWS`` over all shards, for the
  counts by status and shard 0's epochs that decided requests (the recent leader changes);
- the parked table and the poison queue's approximate depth.

The top-level ``leader`` and ``pending`` describe shard 0, as they did before shards; ``shards``
has one row per shard.

Lease time left is not something storage tells anyone but the holder, so it is a lower bound:
the lease was (re)acquired when the epoch was claimed, and renewed no later than one renew
interval before the holder's last commit. Wall-clock times come from the instances' clocks.
A storage error of any kind (unreachable, a missing role) answers 503 with a reason for people
that names no host, port, URL or account (only storage's status and error code when it
answered); the whole error goes to the log.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from shared.config.names import poison_queue_name
from shared.domain.model import Fence
from shared.errors import NO_ANSWER, NO_CREDENTIAL, UNREACHABLE, StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import outbox_view
from shared.storage.bounded import Bounded
from shared.storage.parking import queue_depth
from shared.web.api import Reply, leader_view
from shared.web.shards import page_row, parse_time, read_shards

logger = logging.getLogger(__name__)

PAGE_PATH = Path(__file__).with_name("status_page.html")
WINDOW_SECONDS = 300  # the throughput chart's span
BUCKET_SECONDS = 10  # one bar of the chart
MAX_PARKED_ROWS = 10_000  # parked rows counted
RECENT_LEADERS = 10  # epochs shown, newest first


@functools.cache
def page_html() -> bytes:
    """The status page: one self-contained HTML file (inline CSS and JS), read once."""
    return PAGE_PATH.read_bytes()


def metrics_reply(get_app: Callable[[], LedgerApp]) -> Reply:
    """``GET /api/metrics``: the snapshot, or 503 with the reason when storage cannot answer."""
    try:
        return Reply(200, snapshot(get_app()))
    except StorageError as exc:
        reason = _reason(exc)
        # The whole error for the operator's log: the SDK's own, endpoint and all.
        logger.warning("status snapshot failed, %s: %s", reason, exc.__cause__ or exc)
        return Reply(503, {"error": reason, "retryable": True})


_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,99}")  # a storage error code, not an address


def _reason(exc: StorageError) -> str:
    """What failed, by category: the SDKs' own text names the endpoint (host, port, account)."""
    if exc.failure == UNREACHABLE:
        return "storage cannot be reached"
    if exc.failure == NO_ANSWER:
        return "storage did not answer (the connection was dropped or timed out)"
    if exc.status:
        code = exc.code or ""
        shown = f" {code}" if _CODE.fullmatch(code) else ""
        return f"storage refused the read ({exc.status}{shown})"
    if exc.failure == NO_CREDENTIAL:
        return "the app could not get a token for storage"
    return f"the storage read failed ({type(exc).__name__})"


def snapshot(app: LedgerApp) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready values.

    ``leader``, ``pending`` and ``leaders`` describe shard 0 (the whole ledger with one shard);
    ``throughput`` and ``outcomes`` count every shard; ``shards`` has one row per shard
    (``shared/web/shards.py``).
    """
    now = app.clock.now()
    election = app.config.election
    # Bars on whole BUCKET_SECONDS of the clock, so that they stay put between refreshes; the
    # last one is the bucket now falls in.
    bucket_end = now.timestamp() // BUCKET_SECONDS * BUCKET_SECONDS + BUCKET_SECONDS
    since = datetime.fromtimestamp(bucket_end - WINDOW_SECONDS, tz=now.tzinfo)
    queues: dict[str, Any] = {}

    def poison() -> None:  # every intake queue's poison queue (INTAKE_QUEUES)
        names = [poison_queue_name(name) for name in app.config.intake_queue_names]
        queues["byQueue"] = {name: queue_depth(app.queue(name)) for name in names}
        queues["poisoned"] = sum(queues["byQueue"].values())

    def parked() -> None:
        queues["parked"] = app.parking.count_by_kind(MAX_PARKED_ROWS)

    shards = read_shards(app, window_since=since, outcomes=True, more=(poison, parked))
    first = shards[0]
    fence, lease = first.fence, first.lease
    leased = lease.get("state") == "leased"
    claimed_at = parse_time(fence.claimed_at if fence else None)
    last_commit_at = parse_time(fence.last_commit_at if fence else None)
    outcomes = [row for reads in shards for row in (reads.outcomes.rows if reads.outcomes else [])]
    recent = [row for reads in shards for row in (reads.window.rows if reads.window else [])]
    parked_by_kind = queues["parked"]
    return {
        "generatedAt": now.isoformat(),
        "leader": {
            **leader_view(fence, lease),
            "claimedAt": (fence.claimed_at if fence else "") or None,
            "leaseSeconds": election.lease_seconds,
            "renewIntervalSeconds": election.renew_interval_seconds,
            "leaseSecondsLeftAtLeast": _lease_left(now, leased, claimed_at, last_commit_at,
                                                   election.lease_seconds,
                                                   election.renew_interval_seconds),
        },
        "pending": _pending(first.pending, now),
        "throughput": _throughput(Bounded(recent, any(r.window and r.window.truncated
                                                      for r in shards)), since, now),
        "outcomes": {"byStatus": dict(sorted(Counter(str(r.get("status")) for r in outcomes)
                                             .items())),
                     "total": len(outcomes),
                     "truncated": any(r.outcomes and r.outcomes.truncated for r in shards)},
        "leaders": _leaders(first.outcomes.rows if first.outcomes else [], fence),
        "shards": [page_row(reads, now, WINDOW_SECONDS) for reads in shards],
        "parked": sum(parked_by_kind.values()),
        "parkedByKind": parked_by_kind,
        "poisoned": queues["poisoned"],
        "poisonQueue": app.config.poison_queue,
        "outbox": outbox_view(app),  # outcome events not sent yet (shared/leadership/outbox.py)
        "poisonedByQueue": queues["byQueue"],
    }


def _lease_left(now: datetime, leased: bool, claimed_at: datetime | None,
                last_commit_at: datetime | None, lease_seconds: float,
                renew_interval_seconds: float) -> float | None:
    """A lower bound of the holder's lease time left (see the module docstring)."""
    if not leased or claimed_at is None:
        return None
    expires = claimed_at + timedelta(seconds=lease_seconds)
    if last_commit_at is not None and last_commit_at >= claimed_at:
        expires = max(expires, last_commit_at
                      + timedelta(seconds=lease_seconds - renew_interval_seconds))
    return round(max(0.0, (expires - now).total_seconds()), 1)


def _pending(rows: Bounded[dict[str, Any]], now: datetime) -> dict[str, Any]:
    recorded = [stamp for row in rows.rows if (stamp := parse_time(row.get("recordedAt")))]
    oldest = min(recorded, default=None)
    return {
        "completions": len(rows.rows),
        # PartitionKey is a bucket; rows of the earlier layout have no requestId (PK = it).
        "requests": len({row.get("requestId") or row.get("PartitionKey") for row in rows.rows}),
        "oldestRecordedAt": oldest.isoformat() if oldest else None,
        "oldestAgeSeconds": round((now - oldest).total_seconds(), 1) if oldest else None,
        "truncated": rows.truncated,
    }


def _throughput(recent: Bounded[dict[str, Any]], since: datetime, now: datetime) -> dict[str, Any]:
    count = WINDOW_SECONDS // BUCKET_SECONDS
    decided = [0] * count
    committed = [0] * count
    minute_ago = now - timedelta(seconds=60)
    last_minute = 0
    for row in recent.rows:
        stamp = parse_time(row.get("decidedAt"))
        if stamp is None or stamp < since:
            continue
        index = min(count - 1, int((stamp - since).total_seconds() // BUCKET_SECONDS))
        decided[index] += 1
        if row.get("status") == "committed":
            committed[index] += 1
            last_minute += stamp > minute_ago
    return {
        "windowSeconds": WINDOW_SECONDS,
        "bucketSeconds": BUCKET_SECONDS,
        "since": since.isoformat(),
        "decided": decided,
        "committed": committed,
        "committedPerSecondLastMinute": round(last_minute / 60, 2),
        "truncated": recent.truncated,
    }


def _leaders(rows: list[dict[str, Any]], fence: Fence | None) -> list[dict[str, Any]]:
    """Epochs newest first: holder, first and last decision, requests decided."""
    epochs: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.get("epoch") is None:
            continue
        epoch = int(row["epoch"])
        stamp = str(row.get("decidedAt") or "")
        entry = epochs.setdefault(epoch, {"epoch": epoch, "holder": row.get("decidedBy"),
                                          "claimedAt": None, "firstDecidedAt": stamp,
                                          "lastDecidedAt": stamp, "decided": 0})
        entry["decided"] += 1
        entry["firstDecidedAt"] = min(entry["firstDecidedAt"], stamp)
        entry["lastDecidedAt"] = max(entry["lastDecidedAt"], stamp)
    if fence is not None and fence.epoch:
        current = epochs.setdefault(fence.epoch, {
            "epoch": fence.epoch, "holder": fence.holder, "firstDecidedAt": None,
            "lastDecidedAt": None, "decided": 0})
        current["claimedAt"] = fence.claimed_at or None
    return [epochs[e] for e in sorted(epochs, reverse=True)[:RECENT_LEADERS]]


