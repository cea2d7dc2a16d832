"""One row per shard for operators: what ``/api/leader``, ``/api/metrics``, the status page and
``./dev cli status`` show of each shard (K rows; one row, shard 0, with ``LEDGER_SHARDS=1``).

Each row is read from what storage holds for that shard, with bounded reads only:

- the fence row (one point read): holder, epoch, claim and last commit times;
- the lease blob's properties (one call): the lease state, ``unknown`` with the reason when
  storage did not say;
- the shard's waiting completion rows (projected, at most ``MAX_PENDING_ROWS``): how many and
  the oldest one's age;
- with shards, its work in flight between shards: the ``flight:`` rows of its ledger partition
  (keys and ``Timestamp`` only, at most ``MAX_FLIGHT_ROWS``): coordinations, escrows and inbox
  messages, how many requests they belong to, and the age of the oldest. A row's age is the
  time since storage last wrote it: a coordination is rewritten at each vote, so its age is
  the time since its last progress, an escrow's or a message's the time since it was made;
- for the status page, the outcome rows the shard decided in the last ``window`` seconds (at
  most ``window_limit(K)``: the total over all shards stays ``MAX_WINDOW_ROWS`` whatever K is):
  commits per second and the **takeover** marker.

A **takeover** is a claim of the shard's epoch whose previous holder had not released its lease
(it died, was paused past its lease, or its lease was broken): the claimer records it in the
``fence:takeover`` row (``shared/storage/ledger.py``; one point read per shard here). A
hand-over, where the holder released and another instance claimed the next epoch, is not one:
with short terms that happens all the time. A takeover shows for ``window`` seconds.

All the reads of all the shards run concurrently, ``SHARD_READERS`` at a time, so a page at
K = 16 costs about as much wall time as a few round trips (docs/operations.md has numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.domain.exchange import COORD_PREFIX, ESCROW_PREFIX, FLIGHT_PREFIX, INBOX_PREFIX
from shared.domain.model import Fence
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.reads import read_concurrently
from shared.storage.bounded import Bounded, take_bounded
from shared.storage.ledger import Takeover
from shared.storage.rows import prefix_range

MAX_PENDING_ROWS = 10_000  # completion rows read per shard
MAX_FLIGHT_ROWS = 10_000  # flight rows read per shard
MAX_WINDOW_ROWS = 20_000  # outcome rows of the window, over all shards together
MAX_OUTCOME_ROWS = 20_000  # outcome rows for the counts by status, over all shards together
SHARD_READERS = 8  # concurrent reads (the clients' connection pools hold 10)
PENDING_SELECT = ["PartitionKey", "RowKey", "requestId", "recordedAt"]
WINDOW_SELECT = ["status", "epoch", "decidedBy", "decidedAt"]


OUTCOME_SELECT = ["status", "epoch", "decidedBy", "decidedAt"]


def window_limit(shards: int) -> int:
    """Outcome rows of the window read per shard: ``MAX_WINDOW_ROWS`` shared by the shards."""
    return max(1_000, MAX_WINDOW_ROWS // shards)


def outcome_limit(shards: int) -> int:
    """Outcome rows read per shard for the counts: ``MAX_OUTCOME_ROWS`` shared by the shards."""
    return max(1_000, MAX_OUTCOME_ROWS // shards)


@dataclass(frozen=True)
class FlightSummary:
    """A shard's work in flight between shards, as one bounded read found it."""

    items: int = 0
    requests: int = 0
    by_kind: Mapping[str, int] = field(default_factory=dict)
    oldest_at: datetime | None = None
    read_at: datetime | None = None  # storage's time of the read
    truncated: bool = False

    def oldest_age(self, fallback_now: datetime) -> float | None:
        if self.oldest_at is None:
            return None
        now = self.read_at or fallback_now
        return round(max(0.0, (now - self.oldest_at).total_seconds()), 1)


@dataclass
class ShardReads:
    """What was read of one shard."""

    shard: int
    fence: Fence | None = None
    lease: dict[str, str] = field(default_factory=dict)
    pending: Bounded[dict[str, Any]] = field(default_factory=lambda: Bounded([], False))
    flight: FlightSummary = field(default_factory=FlightSummary)
    window: Bounded[dict[str, Any]] | None = None  # outcome rows decided in the window
    outcomes: Bounded[dict[str, Any]] | None = None  # outcome rows, for the counts by status
    takeover: Takeover | None = None  # the shard's latest takeover (status page)


def lease_view(app: LedgerApp) -> dict[str, str]:
    """The election lease's state and status (a blob not made yet is not leased); ``unknown``
    with the reason when storage did not say."""
    try:
        status = app.elector.lease_view()
    except StorageError as exc:
        return {"state": "unknown", "error": str(exc)}
    return {"state": status.state, "status": status.status}


_KINDS = {COORD_PREFIX: "coordinations", ESCROW_PREFIX: "escrows", INBOX_PREFIX: "messages"}


def read_flight(app: LedgerApp, limit: int = MAX_FLIGHT_ROWS) -> FlightSummary:
    """The shard's ``flight:`` rows, keys and write times only (one key range, bounded)."""
    ledger = app.ledger
    rows = ledger.table.query(
        "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
        parameters={"pk": ledger.partition, **prefix_range(FLIGHT_PREFIX)},
        select=["RowKey", "Timestamp"], page_size=1000)
    found = take_bounded(rows, limit)
    by_kind: dict[str, int] = {}
    requests: set[str] = set()
    oldest: datetime | None = None
    for row in found.rows:
        key = str(row["RowKey"])
        for prefix, kind in _KINDS.items():
            if key.startswith(prefix):
                by_kind[kind] = by_kind.get(kind, 0) + 1
                requests.add(key.removeprefix(prefix).split("|", 1)[0])
        if row.timestamp is not None and (oldest is None or row.timestamp < oldest):
            oldest = row.timestamp
    return FlightSummary(len(found.rows), len(requests), by_kind, oldest, rows.date,
                         found.truncated)


def read_shards(app: LedgerApp, *, window_since: datetime | None = None,
                outcomes: bool = False,
                more: Sequence[Callable[[], None]] = ()) -> list[ShardReads]:
    """Every shard's reads, in shard order, all of them concurrently.

    ``window_since``: also read the outcome rows decided since then; ``outcomes``: also read
    the outcome rows for the counts by status (both for the status page). ``more``: other reads
    of the caller's, run alongside.
    """
    shards = app.each_shard()
    found = [ShardReads(k) for k in range(len(shards))]
    tasks: list[Callable[[], None]] = []
    for shard, into in zip(shards, found, strict=True):
        tasks += _tasks(shard, into, window_since, outcomes)
    tasks += more  # last: a failure is reported as the first failed read in this order says
    read_concurrently(lambda task: task(), tasks, workers=SHARD_READERS)
    return found


def _tasks(app: LedgerApp, into: ShardReads, window_since: datetime | None,
           outcomes: bool) -> list[Callable[[], None]]:
    count = len(app.shards)

    def fence() -> None:
        into.fence = app.ledger.read_fence()

    def lease() -> None:
        into.lease = lease_view(app)

    def pending() -> None:
        into.pending = app.completions.waiting_rows(MAX_PENDING_ROWS, PENDING_SELECT)

    def flight() -> None:
        into.flight = read_flight(app)

    def window() -> None:
        assert window_since is not None
        into.window = app.ledger.outcome_rows(
            window_limit(count), WINDOW_SELECT,
            decided_since=window_since.isoformat(timespec="microseconds"))

    def counts() -> None:
        into.outcomes = app.ledger.outcome_rows(outcome_limit(count), OUTCOME_SELECT)

    def taken_over() -> None:
        into.takeover = app.ledger.read_takeover()

    tasks: list[Callable[[], None]] = [fence, lease, pending]
    if app.sharded:  # one shard has no work in flight between shards
        tasks.append(flight)
    if window_since is not None:
        tasks += [window, taken_over]
    if outcomes:
        tasks.append(counts)
    return tasks


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def instance_of(holder: Any) -> str:
    """The instance of a holder (``instance/leaseId``)."""
    return str(holder or "").split("/", 1)[0]


def oldest_pending(rows: Sequence[dict[str, Any]]) -> datetime | None:
    return min((stamp for row in rows if (stamp := parse_time(row.get("recordedAt")))),
               default=None)


def leader_fields(fence: Fence | None, lease: Mapping[str, str]) -> dict[str, Any]:
    """Who leads a shard, as every view shows it.

    ``holder`` is the fence's holder while the lease is held (``None`` otherwise);
    ``lastHolder`` whoever claimed the current epoch, whatever the lease says now.
    """
    last_holder = fence.holder if fence else None
    return {"holder": last_holder if lease.get("state") == "leased" else None,
            "lastHolder": last_holder,
            "epoch": fence.epoch if fence else 0,
            "lease": dict(lease),
            "lastCommitAt": (fence.last_commit_at if fence else "") or None}


def shard_row(reads: ShardReads, now: datetime) -> dict[str, Any]:
    """One shard's row of ``/api/leader`` (the status page's adds to it: ``page_row``)."""
    oldest = oldest_pending(reads.pending.rows)
    flight = reads.flight
    return {
        "shard": reads.shard,
        **leader_fields(reads.fence, reads.lease),
        "claimedAt": (reads.fence.claimed_at if reads.fence else "") or None,
        "pendingCompletions": len(reads.pending.rows),
        "pendingTruncated": reads.pending.truncated,
        "oldestPendingAgeSeconds": round(max(0.0, (now - oldest).total_seconds()), 1)
        if oldest else None,
        "inFlight": flight.items,
        "inFlightRequests": flight.requests,
        "inFlightByKind": dict(flight.by_kind),
        "oldestInFlightAgeSeconds": flight.oldest_age(now),
        "inFlightTruncated": flight.truncated,
    }


def page_row(reads: ShardReads, now: datetime, window_seconds: float) -> dict[str, Any]:
    """One shard's row of ``/api/metrics``: ``shard_row`` with its commit rate and takeover."""
    rows = reads.window.rows if reads.window else []
    minute_ago = now - timedelta(seconds=60)
    last_minute = sum(1 for row in rows if row.get("status") == "committed"
                      and (stamp := parse_time(row.get("decidedAt"))) and stamp > minute_ago)
    return {**shard_row(reads, now),
            "committedPerSecondLastMinute": round(last_minute / 60, 2),
            "windowTruncated": bool(reads.window and reads.window.truncated),
            "takeover": takeover(reads.takeover, now, window_seconds)}


def takeover(found: Takeover | None, now: datetime,
             window_seconds: float) -> dict[str, Any] | None:
    """The shard's latest takeover if it happened within the window, or ``None``."""
    at = parse_time(found.at) if found is not None else None
    if found is None or at is None:
        return None
    ago = (now - at).total_seconds()
    if ago > window_seconds:
        return None
    return {"at": at.isoformat(), "secondsAgo": round(max(0.0, ago), 1),
            "fromEpoch": found.from_epoch, "toEpoch": found.epoch,
            "from": instance_of(found.from_holder), "to": instance_of(found.to_holder)}
