"""Reconciliation against a live ledger: read every shard's partition, check its invariants.

The checks are ``shared/domain/reconciliation.py``'s (its docstring says what holds and why);
this module reads for them. Each shard's partition is read by key range (``account:``,
``flight:``, ``request:``, ``applied:``), page by page (1,000 rows a call), with only the
properties the checks need, and at most ``max_rows`` rows per range: a range cut short is
reported (info) and its totals are not judged. A read holds no lease and writes nothing: it runs
beside the leaders, from the ``reconcile`` timer (every 5 minutes), ``./dev cli reconcile`` or a
test.

**Cost.** A read is one call per 1,000 rows, and a shard's reads are all in its one partition,
whose scalability target in Azure is about 2,000 entities/s, shared with its leader. So the
``reconcile`` timer paces itself: at most ``TIMER_ROWS_PER_SECOND`` (500) rows a second per
partition (a quarter of the target; shards are read side by side, ``SHARD_READERS`` at a time),
within ``TIMER_BUDGET_SECONDS`` (240 s, inside the 5 minutes between runs and the 5-minute
``functionTimeout``). A ledger too large for that (about 120,000 rows per shard) is reported
``truncated`` (info): run ``./dev cli reconcile``, which reads at full speed, at a quiet time.

A shard's totals are judged only on a stable read: the fence row and the retention carry row
have the same ETags after the read as before (every fenced commit rewrites the fence). A shard
that changed is read again, up to ``ATTEMPTS`` times, then reported unverified (info).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime

from shared.domain.clock import Clock
from shared.domain.exchange import APPLIED_PREFIX, FLIGHT_PREFIX
from shared.domain.planning import ACCOUNT_PREFIX, FENCE_ROW, REQUEST_PREFIX
from shared.domain.reconciliation import (
    CARRY_ROW,
    MOVED_NET,
    MOVED_PREFIX,
    PROBLEMS,
    Finding,
    Reconciliation,
    Severity,
    ShardTally,
    reconcile,
)
from shared.errors import NotFound, StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.reads import read_concurrently
from shared.leadership.reshard import open_reshard
from shared.leadership.retention import run_retention
from shared.observability import telemetry
from shared.storage.ledger import Ledger
from shared.storage.ports import Row
from shared.storage.rows import prefix_range

logger = logging.getLogger(__name__)

MAX_ROWS_PER_SHARD = 200_000  # per key range of one shard, per run
TIMER_ROWS_PER_SECOND = 500.0  # the timer's pace per partition (its target: ~2,000/s)
TIMER_BUDGET_SECONDS = 240.0  # the timer's reads end by then (runs are 5 minutes apart)
SHARD_READERS = 4  # shards read side by side
ATTEMPTS = 3  # reads of a shard that kept changing before it is reported unverified
PAGE = 1000  # rows per call (storage's most)


class Pace:
    """Rows read from one partition at most ``rate`` a second, until ``deadline`` (monotonic):
    ``admit`` waits when the read is ahead, and says False once the time is up."""

    def __init__(self, clock: Clock, rate: float | None, deadline: float | None) -> None:
        self.clock = clock
        self.rate = rate
        self.deadline = deadline
        self.started = clock.monotonic()
        self.rows = 0
        self.out_of_time = False

    def admit(self) -> bool:
        self.rows += 1
        if self.deadline is not None and self.clock.monotonic() >= self.deadline:
            self.out_of_time = True
            return False
        if self.rate is not None and self.rows % 100 == 0:
            ahead = self.started + self.rows / self.rate - self.clock.monotonic()
            if ahead > 0:
                self.clock.sleep(ahead)
        return True


def _etag(ledger: Ledger, row_key: str) -> str | None:
    try:
        return ledger.table.get(ledger.partition, row_key, select=["RowKey"]).etag
    except NotFound:
        return None


def _range(ledger: Ledger, prefix: str, limit: int, select: list[str] | None = None,
           extra: str = "", parameters: dict[str, object] | None = None) -> Iterator[Row]:
    query = "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high" + extra
    return ledger.table.query(query, parameters={"pk": ledger.partition, **prefix_range(prefix),
                                                 **(parameters or {})},
                              select=select, page_size=PAGE, limit=limit)


def _read_shard(app: LedgerApp, shard: int, now: Callable[[], datetime],
                max_flight_seconds: float, max_rows: int, pace: Pace) -> ShardTally:
    ledger = app.on(shard).ledger
    tally = ShardTally(shard, now(), max_flight_seconds)
    for attempt in range(1, ATTEMPTS + 1):
        before = (_etag(ledger, FENCE_ROW), _etag(ledger, CARRY_ROW))
        flight = ledger.table.query(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": ledger.partition, "low": FLIGHT_PREFIX, "high": "flight;"},
            page_size=PAGE, limit=max_rows + 1)
        flight_rows = list(flight)
        stamp = flight.date + app.time_shift() if flight.date is not None else now()
        tally = ShardTally(shard, stamp, max_flight_seconds)
        truncated = len(flight_rows) > max_rows
        for row in flight_rows[:max_rows]:
            tally.flight(row, row.timestamp)
        for prefix, select, feed in (
                (ACCOUNT_PREFIX, ["RowKey", "balance", "reserved"], tally.account),
                (REQUEST_PREFIX, ["RowKey", "status", "legs", "shards"], tally.outcome),
                (APPLIED_PREFIX, ["RowKey", "status", "legs"], tally.marker)):
            for count, row in enumerate(_range(ledger, prefix, max_rows + 1, select), 1):
                if count > max_rows or not pace.admit():
                    truncated = True
                    break
                feed(row)
        for row in _range(ledger, MOVED_PREFIX, max_rows + 1, ["RowKey", MOVED_NET]):
            tally.moved(row)
        carry = ledger.read_row(CARRY_ROW)
        tally.carry(carry)
        after = (_etag(ledger, FENCE_ROW), None if carry is None else carry.etag)
        stable = before == after
        if stable or truncated or attempt == ATTEMPTS:
            tally.finish(verified=stable, truncated=truncated)
            return tally
        logger.info("reconcile: shard %s changed while it was read (attempt %s of %s)", shard,
                    attempt, ATTEMPTS)
    return tally  # not reached


def reconcile_ledger(app: LedgerApp, max_rows: int = MAX_ROWS_PER_SHARD,
                     max_flight_seconds: float | None = None,
                     rows_per_second: float | None = None,
                     budget_seconds: float | None = None) -> Reconciliation:
    """Read every shard and judge the invariants; the report (nothing is written).

    ``rows_per_second``: the most rows read a second from one partition (None: as fast as
    storage answers); ``budget_seconds``: stop reading then (what was not read is truncated).
    """
    threshold = (app.config.reconcile_max_flight_seconds if max_flight_seconds is None
                 else max_flight_seconds)

    def now() -> datetime:
        return app.clock.now() + app.time_shift()

    checked_at = now().isoformat()
    deadline = None if budget_seconds is None else app.clock.monotonic() + budget_seconds
    tallies = read_concurrently(
        lambda k: _read_shard(app, k, now, threshold, max_rows,
                              Pace(app.clock, rows_per_second, deadline)),
        list(range(app.shard_map.shards)), workers=SHARD_READERS)
    report = reconcile(tallies, checked_at, threshold)
    if (open_reshard := _open_reshard(app, now(), threshold)) is not None:
        report.findings.append(open_reshard)
    return report


def _open_reshard(app: LedgerApp, now: datetime, threshold: float) -> Finding | None:
    """An error when a reshard's journal has been open longer than ``threshold``: its leases
    keep every leader out until it finishes, so a crashed run must be resumed by a person."""
    opened = open_reshard(app)
    if opened is None:
        return None
    try:
        started: datetime | None = datetime.fromisoformat(opened["startedAt"])
    except ValueError:
        started = None
    if started is not None and (now - started).total_seconds() <= threshold:
        return None  # a reshard under way
    target = opened["to"]
    return Finding(Severity.ERROR, "reshard-open", None, "shardmap",
                   f"a reshard to {target} shard(s) has been open since {started} (phase "
                   f"{opened['phase']}): leaders stay paused until it finishes; resume it "
                   f"with ./dev cli reshard --to {target} --resume")


def log_report(report: Reconciliation) -> None:
    """One summary line (custom dimensions for the alert), then one warning per problem."""
    counts = report.counts()
    problems = report.problems
    grand = report.grand()
    logger.info("reconcile: checked %s shard(s), %s problem(s), %s account(s), %s in flight, "
                "total %s (expected %s, %s)", len(report.shards), len(problems),
                counts["accounts"], counts["inFlight"], grand["total"], grand["expected"],
                "judged" if report.grand_checked else "not judged",
                extra=telemetry.log_extra(reconcileOk=report.ok,
                                          reconcileProblems=len(problems),
                                          reconcileErrors=counts["error"],
                                          reconcileWarnings=counts["warning"],
                                          reconcileShards=len(report.shards),
                                          reconcileInFlight=counts["inFlight"]))
    for finding in report.findings:
        if finding.severity in PROBLEMS:
            logger.warning("reconcile %s %s on shard %s, row %s: %s", finding.severity.value,
                           finding.kind, finding.shard, finding.row or "-", finding.what,
                           extra=telemetry.log_extra(reconcileKind=finding.kind,
                                                     shard=finding.shard))


def run_reconcile(app: LedgerApp) -> Reconciliation | None:
    """The ``reconcile`` timer's job: the check (logged: one summary line, one warning per
    problem), then one batch of retention (``shared/leadership/retention.py``). A storage
    failure of the check is logged as an error and leaves no summary line, so the alert's "has
    not run" condition fires if it lasts."""
    report: Reconciliation | None = None
    try:
        report = reconcile_ledger(app, rows_per_second=TIMER_ROWS_PER_SECOND,
                                  budget_seconds=TIMER_BUDGET_SECONDS)
    except StorageError as exc:
        logger.error("reconcile: could not read the ledger: %s", exc)
    if report is not None:
        log_report(report)
    run_retention(app)
    return report
