"""Retention: rows of history older than ``RETENTION_DAYS`` are exported to a blob, then deleted.

**What.** Per home shard, settled outcome rows (``request:{R}``) older than the retention period,
with the rows of the same request elsewhere: its claim (``claim:{R}``, at its home and at its
requestId's shard), its applied markers (``applied:{R}``) and votes (``vote:{R}``) on the home
and on the shards the outcome names. And parked messages older than the period. A row of a
request that is undecided or unsettled is never archived: an outcome row with ``settled: false``
is skipped (its coordination still exists), and an undecided request has no outcome row to start
from. A related row younger than the period (it cannot be, a settled request writes nothing
more) keeps its whole request for a later run.

**Age.** A row's storage ``Timestamp`` (its last write, set by storage), compared with this
process's clock minus the period: the same for every kind of row (claims, markers and parked
rows have no ``decidedAt``), immune to the deciding instance's clock, and conservative (a row
written again, e.g. an outcome marked ``settled``, counts from that write). Clock skew of seconds
is nothing against a period of days. Nothing younger than the period is ever deleted, so the read
API keeps answering for every request decided within it.

**Order, and a crash anywhere.** One bounded batch per run (``max_requests`` requests,
``max_parked`` parked rows): (1) select the rows; (2) upload them as one blob per shard whose
name is the hash of its content (``shared/storage/archive.py``), so a run that selects the same
rows again uploads the same bytes to the same name; (3) delete them, each ``If-Match`` the ETag
archived (a row changed since is kept for the next run), other shards' rows first and the outcome
row last, so a crash leaves an outcome row (re-selected next run) and never a marker without its
outcome. Each partition's deletes go in entity-group transactions with the carry row
``archive:totals``, whose ``archivedNet`` adds the committed legs deleted
(``shared/domain/reconciliation.py``): reconciliation's totals hold before, during and after.

**The contract with upstream.** Outcome rows and claims are also the ledger's memory of what it
decided: a step of an archived request delivered again after the retention period is taken as a
new request (and, with all its steps, committed again). Upstream must never send a step older
than ``RETENTION_DAYS`` (README, "Retention"). Runs from the ``reconcile`` timer (after the
check) and from ``./dev cli archive [--dry-run]``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from shared.config.names import ledger_partition
from shared.domain.exchange import APPLIED_PREFIX, VOTE_PREFIX
from shared.domain.money import format_money
from shared.domain.planning import CLAIM_PREFIX, MAX_TRANSACTION_OPERATIONS, REQUEST_PREFIX
from shared.domain.reconciliation import ARCHIVED_NET, CARRY_ROW, applied_here, money
from shared.errors import BatchRefused, NotFound, StorageError
from shared.leadership.instance import LedgerApp
from shared.storage.archive import ArchivedRow, ArchiveStore, batch_content, batch_name
from shared.storage.parking import PARKED_PARTITION
from shared.storage.ports import Mode, Operation, Row, Table

logger = logging.getLogger(__name__)

MAX_REQUESTS_PER_RUN = 1000  # outcome rows archived per run (with their related rows)
MAX_PARKED_PER_RUN = 1000
ZERO = Decimal("0.00")

Hook = Callable[[str], None]  # called with a step name ("uploaded"): tests inject crashes


@dataclass
class ArchiveReport:
    """What one run selected (and, unless a dry run, uploaded and deleted)."""

    dry_run: bool
    cutoff: str
    blobs: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by kind, selected
    deleted: int = 0
    kept_changed: int = 0  # rows that changed since they were read: left for the next run
    skipped_unsettled: int = 0
    skipped_young: int = 0  # requests with a related row younger than the period

    def view(self) -> dict[str, Any]:
        return {"dryRun": self.dry_run, "cutoff": self.cutoff, "blobs": self.blobs,
                "rows": dict(sorted(self.rows.items())), "selected": sum(self.rows.values()),
                "deleted": self.deleted, "keptChanged": self.kept_changed,
                "skippedUnsettled": self.skipped_unsettled,
                "skippedYoung": self.skipped_young}


def _kind(row_key: str) -> str:
    return row_key.split(":", 1)[0] if ":" in row_key else row_key


def _get(table: Table, partition: str, row_key: str) -> Row | None:
    try:
        return table.get(partition, row_key)
    except NotFound:
        return None


def _archived(table: Table, partition: str, row: Row) -> ArchivedRow:
    return ArchivedRow(table.name, partition, str(row["RowKey"]), row.etag, row.timestamp,
                       dict(row))


def _old(rows: Any, cutoff: datetime) -> bool:
    return rows.timestamp is not None and rows.timestamp < cutoff


def select_requests(app: LedgerApp, shard: int, cutoff: datetime, limit: int,
                    report: ArchiveReport) -> list[ArchivedRow]:
    """The rows of up to ``limit`` settled requests of ``shard`` older than ``cutoff``."""
    ledger = app.on(shard).ledger
    table, shards = ledger.table, len(app.shards)
    outcomes = table.query(
        "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high and Timestamp lt @cutoff",
        parameters={"pk": ledger.partition, "low": REQUEST_PREFIX, "high": "request;",
                    "cutoff": cutoff}, page_size=1000)
    selected: list[ArchivedRow] = []
    taken = 0
    for outcome in outcomes:
        if taken >= limit:
            break
        if not _old(outcome, cutoff):
            continue
        if outcome.get("settled") is False:
            report.skipped_unsettled += 1
            continue
        request_id = str(outcome["RowKey"]).removeprefix(REQUEST_PREFIX)
        places = {shard, *(int(k) for k in json.loads(outcome.get("shards") or "[]")
                           if 0 <= int(k) < shards)}
        wanted = [(k, prefix + request_id) for k in sorted(places)
                  for prefix in (APPLIED_PREFIX, VOTE_PREFIX)]
        wanted += [(k, CLAIM_PREFIX + request_id)
                   for k in sorted({shard, app.shard_map.request_shard(request_id)})]
        related = [(k, row) for k, key in wanted
                   if (row := _get(table, ledger_partition(k), key)) is not None]
        if any(not _old(row, cutoff) for _, row in related):
            report.skipped_young += 1
            continue
        taken += 1
        for k, row in [*related, (shard, outcome)]:
            selected.append(_archived(table, ledger_partition(k), row))
            report.rows[_kind(str(row["RowKey"]))] += 1
    return selected


def select_parked(app: LedgerApp, cutoff: datetime, limit: int,
                  report: ArchiveReport) -> list[ArchivedRow]:
    table = app.parking.table
    try:
        rows = list(table.query("PartitionKey eq @pk and Timestamp lt @cutoff",
                                parameters={"pk": PARKED_PARTITION, "cutoff": cutoff},
                                page_size=1000, limit=limit))
    except NotFound:  # the table is made on first use
        return []
    found = [_archived(table, PARKED_PARTITION, r) for r in rows if _old(r, cutoff)]
    report.rows["parked"] += len(found)
    return found


def _delete_partition(table: Table, partition: str, rows: list[ArchivedRow],
                      report: ArchiveReport, ledger: bool) -> bool:
    """Delete ``rows`` of one partition If-Match their archived ETags; on the ledger, with the
    carry row updated in the same transaction. False when a chunk was kept."""
    done = True
    step = MAX_TRANSACTION_OPERATIONS - 1
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        operations: list[Operation] = [("delete", {"PartitionKey": partition,
                                                   "RowKey": r.row_key}, {"etag": r.etag})
                                       for r in chunk]
        if ledger:
            carry = _get(table, partition, CARRY_ROW)
            net = sum((applied_here({**r.properties, "RowKey": r.row_key}) for r in chunk), ZERO)
            before = ZERO if carry is None else money(carry.get(ARCHIVED_NET))
            entity = {"PartitionKey": partition, "RowKey": CARRY_ROW,
                      ARCHIVED_NET: format_money(before + net),
                      "rows": (0 if carry is None else int(carry.get("rows") or 0)) + len(chunk)}
            operations.append(("create", entity) if carry is None else
                              ("update", entity, {"mode": Mode.REPLACE, "etag": carry.etag}))
        try:
            table.submit(operations)
            report.deleted += len(chunk)
        except BatchRefused as exc:
            # A row changed (or went) since it was read, or another archiver moved the carry
            # row: nothing of this chunk was deleted; the next run reads it again.
            report.kept_changed += len(chunk)
            done = False
            logger.warning("archive: %s row(s) of partition %s kept (changed since read: %s)",
                           len(chunk), partition, exc)
    return done


def archive(app: LedgerApp, *, dry_run: bool = False,
            max_requests: int = MAX_REQUESTS_PER_RUN, max_parked: int = MAX_PARKED_PER_RUN,
            now: datetime | None = None, hook: Hook | None = None) -> ArchiveReport:
    """One bounded batch of the retention step (see the module docstring)."""
    moment = now if now is not None else app.clock.now() + app.time_shift()
    cutoff = moment - timedelta(days=app.config.retention_days)
    report = ArchiveReport(dry_run, cutoff.isoformat())
    store = ArchiveStore.of(app.clients.blob, app.config.archive_container)
    ledger_table = app.ledger.table
    budget = max_requests
    batches: list[tuple[str, list[ArchivedRow], int]] = []  # (blob prefix, rows, home shard)
    for shard in range(len(app.shards)):
        if budget <= 0:
            break
        rows = select_requests(app, shard, cutoff, budget, report)
        budget -= sum(1 for r in rows if r.row_key.startswith(REQUEST_PREFIX))
        if rows:
            batches.append((f"{ledger_table.name}/shard-{shard}", rows, shard))
    parked = select_parked(app, cutoff, max_parked, report)
    if parked:
        batches.append((f"{app.parking.table.name}/parked", parked, -1))
    if not dry_run and batches:
        store.ensure()
    for prefix, rows, home in batches:
        content = batch_content(rows)
        name = batch_name(prefix, content)
        report.blobs.append(name)
        if dry_run:
            continue
        store.put(name, content)
        if hook is not None:
            hook("uploaded")
        if home < 0:
            _delete_partition(app.parking.table, PARKED_PARTITION, rows, report, ledger=False)
            continue
        by_partition: dict[str, list[ArchivedRow]] = defaultdict(list)
        for row in rows:
            by_partition[row.partition].append(row)
        home_partition = ledger_partition(home)
        # Other shards first; at home, markers and claims before the outcome rows.
        # A partition kept (a row changed) keeps the outcome rows too: never a marker or a
        # claim left without its outcome.
        order = sorted(by_partition, key=lambda p: p == home_partition)
        complete = True
        for partition in order:
            chunk = sorted(by_partition[partition],
                           key=lambda r: r.row_key.startswith(REQUEST_PREFIX))
            if partition == home_partition and not complete:
                report.kept_changed += len(chunk)
                continue
            complete = _delete_partition(ledger_table, partition, chunk, report,
                                         ledger=True) and complete
    return report


def run_retention(app: LedgerApp) -> ArchiveReport | None:
    """The timer's run: one batch, logged; a storage failure is logged, not raised."""
    try:
        report = archive(app)
    except StorageError as exc:
        logger.warning("archive: not run this time: %s", exc)
        return None
    if report.blobs or report.skipped_unsettled:
        logger.info("archive: %s row(s) older than %s exported to %s blob(s), %s deleted, %s "
                    "kept (changed), %s unsettled skipped", sum(report.rows.values()),
                    report.cutoff, len(report.blobs), report.deleted, report.kept_changed,
                    report.skipped_unsettled)
    return report
