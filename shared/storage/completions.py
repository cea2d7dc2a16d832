"""The completions table: every completion recorded (one row per step), and the ready index.

**Step rows.** PartitionKey = one of ``BUCKETS`` (16) buckets, a stable hash of the requestId;
RowKey = ``requestId|operationId`` (``|`` is outside the identifier charset); the requestId is
also a property. One (requestId, operationId) thus has one key: a second delivery of an
operationId with the same content is a duplicate and changes nothing; with different content it
is recorded beside the first as a *conflict* row (``RowKey = requestId|operationId~conflict``,
one per operationId however many contents arrive, so a request holds at most two rows per
operationId) and the leader rejects the request. The rows of one request are one key range of
one partition, so a recorder reads them back with one range query (``steps_of``).

**The ready index.** The leader never scans the step rows on its hot path: waiting requests
(legs of a transfer may arrive minutes apart) would make every read grow with the backlog.
Instead, the recorder that finds a request decidable (``decision.assess`` on the rows it just
read) merges a *marker* into partition ``READY_PARTITION`` (RowKey = requestId) that carries the
steps it read, and the leader reads that one partition (``ready``). Markers are merged, never
replaced (each step is one property), so two recorders that complete a request at once union
what they saw. A marker is a hint: the leader decides from the steps it carries (or from a fresh
read of the rows when the deadline matters, ``leader.ReadyView``) and deletes it with the rows.

**Rare full scans.** Whatever no marker announces (a recorder that crashed between its row and
its marker and was never redelivered; a request that stays incomplete until it expires) is found
by ``scan_rows``, a bounded walk of the step rows that the sweeper makes at most once every
``FULL_SCAN_INTERVAL`` per deployment (``claim_full_scan`` keeps the time in storage).

**Deletes are conditional.** Every delete of a row or marker names the ETag that was read
(``RowRef``): a row recorded again after it was read (a late step with another content) is a new
version, and a stale delete cannot remove it.

The time of record is storage's own entity ``Timestamp``, and "now" is the ``Date`` of storage's
answer to the read: one clock that every instance shares (docs/design.md 3.7).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import unquote

from shared.domain.contract import Completion, Operation, StepStatus
from shared.domain.model import RecordedStep, RowRef
from shared.domain.money import format_money, parse_balance
from shared.errors import AlreadyExists, BatchRefused, ConditionFailed, NotFound, Retryable
from shared.observability import telemetry
from shared.storage.bounded import Bounded, take_bounded
from shared.storage.ports import Mode, Row, Rows, Table, Written
from shared.storage.rows import create_once

logger = logging.getLogger(__name__)
_Item = TypeVar("_Item")

CONFLICT_SEPARATOR = "~"  # not in the identifier charset, so it cannot clash with an operationId
CONFLICT_SUFFIX = CONFLICT_SEPARATOR + "conflict"
KEY_SEPARATOR = "|"  # between requestId and operationId in a RowKey; outside the charset too
BUCKETS = 16
MAX_BATCH_ROWS = 100  # rows of one partition per entity-group transaction
# Partitions of the app's own bookkeeping. "~" sorts after every identifier character, so the
# step rows (buckets, and requestIds of the earliest layout) are exactly the keys below "~".
READY_PARTITION = "~ready"
MAIL_FLAG_ROW = "~mail"  # in READY_PARTITION ("~" is not in a requestId): see raise_mail_flag
META_PARTITION = "~meta"
SPECIAL_PREFIX = "~"
FULL_SCAN_ROW = "fullscan"
FULL_SCAN_INTERVAL = timedelta(seconds=60)  # at most one full scan this often per deployment
FULL_SCAN_MAX_ROWS = 20_000  # rows one full scan reads before it stops (and resumes next time)
# A marker carries at most this many steps; a request with more rows (a large request, or a
# runaway upstream) is marked ``truncated`` and the leader reads its rows afresh (one key range).
MAX_MARKER_STEPS = 20
MAX_ROWS_PER_OPERATION = 2  # its first content and one conflict row
# Rows one read of a request returns: the leader reads at most this many of a request at once.
MAX_REQUEST_ROWS = 1_000
_STEP_PROPERTY = "s"  # marker properties: "s" + a digest of the step row's key
# Each request has one *request row* at the end of its key range (``requestId|~request``: "~"
# sorts after every operationId). It is created with the request's first step, in the same
# transaction, so the recorder that creates it knows it recorded the only row; when the request
# is decided it becomes a *tombstone*, kept ``TOMBSTONE_SECONDS``, so that a recorder that reads
# it knows at once that the step it recorded is late.
REQUEST_ROW_SUFFIX = KEY_SEPARATOR + "~request"
OPEN = "open"
DECIDED = "decided"
TOMBSTONE_SECONDS = 120
# A row moved to another shard's table (a reshard, or a step recorded under an older shard map
# and forwarded) keeps storage's time of its first record here: expiry is judged by it.
STORED_AT = "storedAt"


def bucket_of(request_id: str) -> str:
    """The PartitionKey of a request's rows: a stable hash of its id, one of ``BUCKETS``."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return f"b{int.from_bytes(digest[:4], 'big') % BUCKETS:02d}"


def row_key_of(request_id: str, operation_id: str) -> str:
    """The RowKey of a step's row."""
    return f"{request_id}{KEY_SEPARATOR}{operation_id}"


def request_row_key(request_id: str) -> str:
    """The RowKey of a request's own row (open, then its tombstone)."""
    return request_id + REQUEST_ROW_SUFFIX


def is_request_row(row_key: str) -> bool:
    """True for the RowKey of a request row (never a step's: "~" is outside the charset)."""
    return row_key.endswith(REQUEST_ROW_SUFFIX)


def _open_request_row(request_id: str) -> dict[str, Any]:
    return {"PartitionKey": bucket_of(request_id), "RowKey": request_row_key(request_id),
            "state": OPEN}


@dataclass(frozen=True)
class Tombstone:
    """What a decided request's row becomes where its steps were (see ``TOMBSTONE_SECONDS``)."""

    request_id: str
    status: str

    @property
    def partition_key(self) -> str:
        return bucket_of(self.request_id)

    @property
    def ref(self) -> RowRef:
        """The tombstone's row, whatever its version."""
        return RowRef(self.partition_key, request_row_key(self.request_id), "")

    def entity(self) -> dict[str, Any]:
        return {"PartitionKey": self.partition_key, "RowKey": request_row_key(self.request_id),
                "state": DECIDED, "status": self.status}


class RecordResult(StrEnum):
    """What recording one delivery did."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def _entity(completion: Completion, row_key: str, instance_id: str, now: datetime,
            conflict: bool) -> dict[str, Any]:
    return {
        "PartitionKey": bucket_of(completion.request_id),
        "RowKey": row_key,
        "requestId": completion.request_id,
        "operationId": completion.operation_id,
        "operation": completion.operation.value,
        "accountId": completion.account_id,
        "amount": format_money(completion.amount),
        "expectedOperations": completion.expected_operations,
        "status": completion.status.value,
        "completedAt": completion.completed_at.isoformat() if completion.completed_at else "",
        "contentKey": completion.content_key(),
        "recordedAt": now.isoformat(),
        "recordedBy": instance_id,
        "conflict": conflict,
        **telemetry.traceparent_field(),
    }


def _step_entity(step: RecordedStep) -> dict[str, Any]:
    """A recorded step as its row (with its first time of record, ``STORED_AT``)."""
    return {
        "PartitionKey": bucket_of(step.request_id), "RowKey": step.row_key,
        "requestId": step.request_id, "operationId": step.operation_id,
        "operation": step.operation.value, "accountId": step.account_id,
        "amount": format_money(step.amount), "expectedOperations": step.expected_operations,
        "status": step.status.value,
        "completedAt": step.completed_at.isoformat() if step.completed_at else "",
        "contentKey": step.stored_key, "recordedAt": step.recorded_at.isoformat(),
        "recordedBy": step.recorded_by, "conflict": step.conflict,
        STORED_AT: step.recorded_at.isoformat(),
        **({telemetry.TRACEPARENT: step.traceparent} if step.traceparent else {}),
    }


def _step(row: Mapping[str, Any], etag: str = "",
          stamp: datetime | None = None) -> RecordedStep:
    completed = row.get("completedAt")
    return RecordedStep.model_construct(
        request_id=row.get("requestId") or row["PartitionKey"],
        row_key=row["RowKey"],
        operation_id=row["operationId"],
        operation=Operation(row["operation"]),
        account_id=row["accountId"],
        amount=parse_balance(row["amount"]),
        expected_operations=int(row["expectedOperations"]),
        status=StepStatus(row["status"]),
        stored_key=row["contentKey"],
        recorded_at=stamp or _storage_time(row),
        conflict=bool(row.get("conflict", False)),
        completed_at=datetime.fromisoformat(completed) if completed else None,
        partition_key=row["PartitionKey"],
        recorded_by=str(row.get("recordedBy") or ""),
        traceparent=str(row.get(telemetry.TRACEPARENT, "")),
        etag=etag or str(getattr(row, "etag", "") or ""),
    )


def _storage_time(row: Mapping[str, Any]) -> datetime:
    moved = row.get(STORED_AT)  # a row a reshard moved here keeps its first time of record
    if isinstance(moved, str) and moved:
        return datetime.fromisoformat(moved)
    stamp = getattr(row, "timestamp", None)  # a Row's: storage's Timestamp
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    text = row.get("Timestamp")  # a create's returned content carries it as text
    if isinstance(text, str) and text:
        return _parse_stamp(text)
    # Not returned (a projection without Timestamp): the recorder's own stamp, as written.
    return datetime.fromisoformat(row["recordedAt"])


_ETAG_STAMP = re.compile(r"datetime'([^']+)'")


def _stamp_of(result: Written, date: datetime | None) -> datetime:
    """A created row's Timestamp, from a transaction's answer.

    A transaction answers with each row's ETag only. Table storage's ETags (Azure's and
    Azurite's) carry the Timestamp (``W/"datetime'2026-12-02T17%3A25%3A09.8022309Z'"``); when one
    does not, the answer's ``Date`` (whole seconds) stands in: this time orders commits and
    starts the request's deadline, and every later read of the row brings the exact one.
    """
    if result.timestamp is not None:
        return result.timestamp
    found = _ETAG_STAMP.search(unquote(str(result.etag or "")))
    if found:
        with contextlib.suppress(ValueError):
            return _parse_stamp(found.group(1))
    return date or datetime.now(UTC)


def _parse_stamp(text: str) -> datetime:
    """Storage's ISO time (``2026-12-02T17:25:09.8022309Z``: seven digits) as a datetime."""
    text = text.rstrip("Z")
    head, _, fraction = text.partition(".")
    stamp = datetime.fromisoformat(head + (f".{fraction[:6]:0<6}" if fraction else ""))
    return stamp.replace(tzinfo=UTC)


# --- markers: a step as one property ---------------------------------------------------------
def step_property(step: RecordedStep) -> str:
    """The marker property that carries ``step`` (one per row, so merges never clash)."""
    key = f"{step.partition_key}\x1f{step.row_key}".encode()
    return _STEP_PROPERTY + hashlib.sha256(key).hexdigest()[:24]


def _step_json(step: RecordedStep) -> str:
    return json.dumps({
        "p": step.partition_key, "r": step.row_key, "q": step.request_id,
        "o": step.operation_id, "op": step.operation.value, "a": step.account_id,
        "m": format_money(step.amount), "n": step.expected_operations,
        "st": step.status.value, "k": step.stored_key, "t": step.recorded_at.isoformat(),
        "c": step.conflict, "ca": step.completed_at.isoformat() if step.completed_at else "",
        "b": step.recorded_by, "tp": step.traceparent, "e": step.etag}, separators=(",", ":"))


def _step_from_json(text: str) -> RecordedStep:
    d = json.loads(text)
    completed = d.get("ca")
    return RecordedStep.model_construct(
        request_id=d["q"], row_key=d["r"], operation_id=d["o"], operation=Operation(d["op"]),
        account_id=d["a"], amount=parse_balance(d["m"]), expected_operations=int(d["n"]),
        status=StepStatus(d["st"]), stored_key=d["k"],
        recorded_at=datetime.fromisoformat(d["t"]), conflict=bool(d["c"]),
        completed_at=datetime.fromisoformat(completed) if completed else None,
        partition_key=d["p"], recorded_by=d.get("b", ""), traceparent=d.get("tp", ""),
        etag=d.get("e", ""))


@dataclass(frozen=True)
class ReadyMarker:
    """A request some recorder found decidable, with the steps it (and any later one) read."""

    request_id: str
    steps: tuple[RecordedStep, ...]
    ref: RowRef  # the marker's own version: deleted only while nobody merged into it since
    truncated: bool = False  # the request had more rows than a marker carries
    read_at: datetime | None = None  # storage's time of a read that returned every row


def _marker(row: Row) -> ReadyMarker:
    steps = sorted((_step_from_json(value) for name, value in row.items()
                    if name.startswith(_STEP_PROPERTY) and isinstance(value, str)
                    and len(name) == len(_STEP_PROPERTY) + 24),
                   key=lambda s: (s.partition_key, s.row_key))
    read_at = row.get("readAt")
    return ReadyMarker(str(row["RowKey"]), tuple(steps),
                       RowRef(READY_PARTITION, str(row["RowKey"]), str(row.etag)),
                       bool(row.get("truncated", False)),
                       datetime.fromisoformat(read_at) if isinstance(read_at, str) else None)


@dataclass(frozen=True)
class RequestRows:
    """The rows of one request as one read found them, and storage's time of that read."""

    steps: list[RecordedStep]
    storage_time: datetime
    truncated: bool = False  # more rows than the read returned
    decided: bool = False  # its tombstone is there: the request was decided a moment ago


@dataclass(frozen=True)
class ReadyScan:
    """Every marker of the ready index, and storage's time when it answered."""

    markers: list[ReadyMarker]
    storage_time: datetime
    mail: str | None = None  # the mail flag's version: other shards sent this shard messages


@dataclass(frozen=True)
class RowScan:
    """Step rows of a bounded full scan, grouped by request, and where the next scan starts."""

    steps: dict[str, list[RecordedStep]]
    storage_time: datetime
    rows: int
    resume_at: tuple[str, str] | None  # (PartitionKey, RowKey) to start from; None: wrap around
    # Request rows to delete: tombstones kept past TOMBSTONE_SECONDS, and open rows left
    # without steps as long (a cleanup split across transactions).
    old_request_rows: list[RowRef] = field(default_factory=list)
    late: set[str] = field(default_factory=set)  # requests with steps beside their tombstone


@dataclass(frozen=True)
class Recorded:
    """What recording one delivery did, and the row as stored when this delivery created it."""

    result: RecordResult
    step: RecordedStep | None = None
    storage_time: datetime | None = None  # storage's Date of the answer
    first: bool = False  # it created the request's row too: no other row of the request exists


class CompletionStore:
    """Records completions, keeps the ready index, and gives the leader its reads of both."""

    def __init__(self, table: Table) -> None:
        self.table = table

    # --- recording ---------------------------------------------------------------------------
    def record(self, completion: Completion, instance_id: str, now: datetime) -> Recorded:
        """Record one delivery. Idempotent: a redelivery of the same content is a no-op.

        The request's first step is created together with the request's row, in one
        transaction: when that succeeds, this step is the request's only row (``first``).
        """
        key = row_key_of(completion.request_id, completion.operation_id)
        entity = _entity(completion, key, instance_id, now, conflict=False)
        try:
            results = self.table.submit([
                ("create", _open_request_row(completion.request_id)), ("create", entity)])
        except BatchRefused:
            pass  # the request has a row already (or this step does): record it on its own
        else:
            return Recorded(RecordResult.RECORDED,
                            _step(entity, etag=str(results[1].etag or ""),
                                  stamp=_stamp_of(results[1], results[1].date)),
                            results[1].date, first=True)
        for _ in range(3):
            try:
                written = self.table.create(entity)
                return Recorded(RecordResult.RECORDED, self._created(entity, written),
                                written.date)
            except AlreadyExists:
                pass
            try:
                first = self.table.get(entity["PartitionKey"], key)
                break
            except NotFound:
                continue  # the leader deleted it in between (its request ended): record anew
        else:
            raise RecordingRaced(f"{completion.request_id}/{completion.operation_id} kept "
                                 "appearing and disappearing; the host will retry the message")
        if first["contentKey"] == completion.content_key():
            logger.debug("duplicate delivery of %s/%s ignored", completion.request_id,
                         completion.operation_id)  # counted: ledger.completions.deliveries
            return Recorded(RecordResult.DUPLICATE)
        row_key = key + CONFLICT_SUFFIX
        with contextlib.suppress(AlreadyExists):  # a conflict was recorded already
            self.table.create(_entity(completion, row_key, instance_id, now,
                                             conflict=True))
        logger.warning("operationId %s of request %s arrived twice with different content; the "
                       "request will be rejected", completion.operation_id, completion.request_id,
                       extra=telemetry.log_extra(requestId=completion.request_id))
        return Recorded(RecordResult.CONFLICT)

    @staticmethod
    def _created(entity: dict[str, Any], written: Written) -> RecordedStep | None:
        if written.timestamp is None:
            return None  # storage's answer did not say: the caller reads it back
        return _step(entity, etag=str(written.etag or ""), stamp=written.timestamp)

    def steps_of(self, request_id: str, limit: int = MAX_REQUEST_ROWS) -> list[RecordedStep]:
        """The recorded steps of one request (one key range of one partition)."""
        return self.read_request(request_id, limit).steps

    def read_request(self, request_id: str, limit: int = MAX_REQUEST_ROWS,
                     fallback_now: datetime | None = None) -> RequestRows:
        """The rows of one request, at most ``limit``, and storage's time of the read."""
        low = request_id + KEY_SEPARATOR
        high = request_id + chr(ord(KEY_SEPARATOR) + 1)
        rows = self.table.query(
            "PartitionKey eq @bucket and RowKey ge @low and RowKey lt @high",
            parameters={"bucket": bucket_of(request_id), "low": low, "high": high},
            page_size=min(limit + 1, 1000))
        steps: list[RecordedStep] = []
        truncated = decided = False
        for row in rows:
            if is_request_row(row["RowKey"]):
                decided = row.get("state") == DECIDED
                continue
            if len(steps) >= limit:
                truncated = True
                break
            steps.append(_step(row))
        return RequestRows(steps, _date_or(rows, fallback_now), truncated, decided)

    # --- moving rows between shards (shared/leadership/reshard.py) ---------------------------
    def request_rows(self) -> Iterator[Row]:
        """Every step row and request row (the keys below ``~``), as stored: a scan."""
        return iter(self.table.query("PartitionKey lt @special",
                                     parameters={"special": SPECIAL_PREFIX}, page_size=1000))

    def marked(self) -> set[str]:
        """The requests that have a marker in the ready index (a scan of one partition)."""
        rows = self.table.query("PartitionKey eq @pk", parameters={"pk": READY_PARTITION},
                                select=["RowKey"], page_size=1000)
        return {str(row["RowKey"]) for row in rows if row["RowKey"] != MAIL_FLAG_ROW}

    def import_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write rows another shard's table held (step rows and open request rows) here, keeping
        each one's first time of record (``STORED_AT``). Idempotent: a step row that exists with
        the same content is left; with another content it is recorded as the conflict row, as
        a second delivery would be. Decided request rows (tombstones) are not moved."""
        by_partition: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if is_request_row(str(row["RowKey"])) and row.get("state") == DECIDED:
                continue
            entity = {k: v for k, v in row.items() if k not in ("Timestamp", "etag")}
            if not is_request_row(str(row["RowKey"])):
                entity[STORED_AT] = _storage_time(row).isoformat()
            by_partition[str(row["PartitionKey"])].append(entity)
        for entities in by_partition.values():
            for entity in create_once(self.table, entities):
                self._import_existing(entity)

    def import_steps(self, steps: Sequence[RecordedStep]) -> None:
        """``import_rows`` for steps as a leader read them (a step recorded on the wrong shard
        under an older shard map, forwarded to its home), with their requests' open rows."""
        rows: list[dict[str, Any]] = [_open_request_row(r) for r in {s.request_id for s in steps}]
        rows += [_step_entity(step) for step in steps]
        self.import_rows(rows)

    def _import_existing(self, entity: dict[str, Any]) -> None:
        """A row to import that exists here already: a step with another content is recorded
        as the conflict row (a request row, or a conflict row, is left as it is)."""
        if is_request_row(str(entity["RowKey"])) or entity.get("conflict"):
            return
        try:
            here = self.table.get(str(entity["PartitionKey"]), str(entity["RowKey"]))
        except NotFound:
            with contextlib.suppress(AlreadyExists):
                self.table.create(entity)
            return
        if here.get("contentKey") != entity.get("contentKey"):
            with contextlib.suppress(AlreadyExists):
                self.table.create({**entity, "RowKey": str(entity["RowKey"]) + CONFLICT_SUFFIX,
                                   "conflict": True})

    # --- the ready index ---------------------------------------------------------------------
    def mark_ready(self, request_id: str, steps: Sequence[RecordedStep],
                   read_at: datetime | None = None, truncated: bool = False) -> None:
        """Merge ``steps`` into the request's marker (created if missing): the leader's cue.

        ``read_at``: storage's time of the read that returned ``steps`` as *every* row of the
        request (``None`` when the caller did not read them all, e.g. a deposit's own row).
        ``truncated``: the request had more rows than the marker carries.
        """
        chosen = sorted(steps, key=lambda s: (s.partition_key, s.row_key))
        entity: dict[str, Any] = {"PartitionKey": READY_PARTITION, "RowKey": request_id}
        for step in chosen[:MAX_MARKER_STEPS]:
            entity[step_property(step)] = _step_json(step)
        if read_at is not None:
            entity["readAt"] = read_at.isoformat()
        if truncated or len(chosen) > MAX_MARKER_STEPS:
            entity["truncated"] = True
        self.table.upsert(entity, mode=Mode.MERGE)

    def ready(self, fallback_now: datetime) -> ReadyScan:
        """Every marker (one partition query), and storage's time when it answered."""
        rows = self.table.query("PartitionKey eq @pk", parameters={"pk": READY_PARTITION},
                                page_size=1000)
        markers: list[ReadyMarker] = []
        mail: str | None = None
        for row in rows:
            if row["RowKey"] == MAIL_FLAG_ROW:
                mail = str(row.etag)
            else:
                markers.append(_marker(row))
        return ReadyScan(markers, _date_or(rows, fallback_now), mail)

    def raise_mail_flag(self) -> None:
        """Tell this shard's leader that messages wait in its inbox (shared/domain/exchange.py).

        One row in the ready index, so the leader's one read of the index sees it: every
        raise changes the row's version, and a leader reads its inbox whenever the version
        differs from the last one it emptied the inbox at. Senders raise it *after* creating
        their messages.
        """
        self.table.upsert({"PartitionKey": READY_PARTITION, "RowKey": MAIL_FLAG_ROW,
                           "raisedAt": datetime.now(UTC).isoformat()}, mode=Mode.REPLACE)

    # --- rare full scans ---------------------------------------------------------------------
    def claim_full_scan(self, shift: timedelta = timedelta(0),
                        interval: timedelta = FULL_SCAN_INTERVAL) -> tuple[str, str] | None:
        """Take the deployment's next full scan if ``interval`` has passed since the last one.

        Returns where the scan starts (``("", "")``: the beginning), or ``None`` when another
        scan was made within ``interval`` (or another instance just took this one). The time is
        storage's (the ``Date`` of its answer, moved by ``shift`` in tests) and kept in storage.
        """
        # A query of the one key rather than a get: one call too, and its answer's Date is kept.
        found = self.table.query("PartitionKey eq @pk and RowKey eq @rk",
                                 parameters={"pk": META_PARTITION, "rk": FULL_SCAN_ROW}, limit=1)
        row: Row | None = next(found, None)
        now = (found.date or datetime.now(UTC)) + shift
        entity = {"PartitionKey": META_PARTITION, "RowKey": FULL_SCAN_ROW,
                  "lastScanAt": now.isoformat(),
                  "resumePartition": "" if row is None else str(row.get("resumePartition", "")),
                  "resumeRow": "" if row is None else str(row.get("resumeRow", ""))}
        try:
            if row is None:
                self.table.create(entity)
            else:
                last = datetime.fromisoformat(str(row.get("lastScanAt")))
                if now - last < interval:
                    return None
                self.table.update(entity, mode=Mode.REPLACE, etag=row.etag)
        except (AlreadyExists, ConditionFailed):
            return None  # another instance took it
        return entity["resumePartition"], entity["resumeRow"]

    def save_scan_position(self, resume_at: tuple[str, str] | None) -> None:
        """Where the next full scan starts (``None``: from the beginning)."""
        partition, row = resume_at or ("", "")
        self.table.upsert({"PartitionKey": META_PARTITION, "RowKey": FULL_SCAN_ROW,
                           "resumePartition": partition, "resumeRow": row}, mode=Mode.MERGE)

    def scan_rows(self, start: tuple[str, str] = ("", ""), max_rows: int = FULL_SCAN_MAX_ROWS,
                  fallback_now: datetime | None = None) -> RowScan:
        """Step rows from ``start`` on, grouped by request, stopping after about ``max_rows``.

        It stops at a request's boundary (a request's rows are one key range), so every group
        it returns is whole. Markers and bookkeeping rows (partitions from "~") are left out.
        """
        partition, row_key = start
        if partition:
            query = ("( PartitionKey eq @pk and RowKey ge @rk ) or "  # spaces: the SDK
                     "( PartitionKey gt @pk and PartitionKey lt @special )")  # substitutes words
            parameters = {"pk": partition, "rk": row_key, "special": SPECIAL_PREFIX}
        else:
            query = "PartitionKey lt @special"
            parameters = {"special": SPECIAL_PREFIX}
        rows = self.table.query(query, parameters=parameters, page_size=1000)
        grouped: dict[str, list[RecordedStep]] = defaultdict(list)
        count = 0
        last_request = ""
        resume_at: tuple[str, str] | None = None
        request_rows: dict[str, tuple[RowRef, datetime]] = {}
        decided: set[str] = set()
        for row in rows:
            if is_request_row(row["RowKey"]):
                request_id = row["RowKey"].removesuffix(REQUEST_ROW_SUFFIX)
                if row.get("state") == DECIDED:
                    decided.add(request_id)
                if row.get("state") == DECIDED or request_id not in grouped:
                    request_rows[request_id] = (RowRef(row["PartitionKey"], row["RowKey"],
                                                       str(row.etag)),
                                                _storage_time(row))
                continue
            step = _step(row)
            if count >= max_rows and step.request_id != last_request:
                resume_at = (step.partition_key, step.row_key)
                break
            grouped[step.request_id].append(step)
            last_request = step.request_id
            count += 1
        now = _date_or(rows, fallback_now)
        keep = timedelta(seconds=TOMBSTONE_SECONDS)
        return RowScan(dict(grouped), now, count, resume_at,
                       [ref for ref, stamp in request_rows.values() if now - stamp >= keep],
                       decided & grouped.keys())

    def count(self, limit: int = 10_000) -> int:
        """How many completion rows wait for the leader (counting stops at ``limit``)."""
        return len(self.waiting_rows(limit, ["RowKey"]).rows)

    def waiting_rows(self, limit: int, select: list[str]) -> Bounded[dict[str, Any]]:
        """The step rows waiting for the leader, at most ``limit`` (no request rows, no ready
        index, no bookkeeping), with the properties in ``select`` (``RowKey`` always)."""
        rows = self.table.query(
            "PartitionKey lt @special", parameters={"special": SPECIAL_PREFIX},
            select=sorted({*select, "RowKey"}), page_size=1000)
        return take_bounded((dict(row) for row in rows if not is_request_row(row["RowKey"])),
                            limit)

    # --- conditional deletes -----------------------------------------------------------------
    @telemetry.traced("ledger.delete")
    def delete(self, refs: Iterable[RowRef], tombstones: Iterable[Tombstone] = ()) -> list[RowRef]:
        """Delete these versions of rows (idempotent), and turn requests' rows into tombstones.

        A row changed since it was read stays. One transaction per 100 operations of a
        partition, whatever requests they belong to, each delete ``If-Match`` the ETag that was
        read. When one row of a transaction is gone or was recorded anew, that transaction's
        operations are made one by one. Returns the tombstones as written (with their ETags).
        """
        deletes: dict[str, dict[str, str]] = defaultdict(dict)
        for ref in refs:
            deletes[ref.partition_key][ref.row_key] = ref.etag
        marks: dict[str, list[Tombstone]] = defaultdict(list)
        for tombstone in tombstones:
            marks[tombstone.partition_key].append(tombstone)
        written: list[RowRef] = []
        for partition in sorted(deletes.keys() | marks.keys()):
            rows = deletes.get(partition, {})
            operations: list[Any] = [
                ("delete", {"PartitionKey": partition, "RowKey": rk}, _if_match(rows[rk]))
                for rk in sorted(rows)]
            operations += [("upsert", t.entity(), {"mode": Mode.REPLACE})
                           for t in marks.get(partition, [])]
            for chunk in _chunks(operations, MAX_BATCH_ROWS):
                try:
                    results = self.table.submit(chunk)
                except BatchRefused:
                    results = [self._one(partition, operation, rows) for operation in chunk]
                written += [RowRef(partition, operation[1]["RowKey"], str(result.etag))
                            for operation, result in zip(chunk, results, strict=True)
                            if operation[0] == "upsert" and result.etag]
        return written

    def _one(self, partition: str, operation: Any, etags: Mapping[str, str]) -> Written:
        if operation[0] == "delete":
            self._delete_one(partition, operation[1]["RowKey"], etags[operation[1]["RowKey"]])
            return Written(None)
        return self.table.upsert(operation[1], mode=Mode.REPLACE)

    def _delete_one(self, partition: str, row_key: str, etag: str) -> None:
        try:  # a row that is gone already (a previous leader's delete) is not an error
            self.table.delete(partition, row_key, etag=etag or None)
        except ConditionFailed:
            logger.debug("row %s/%s changed since it was read; kept", partition, row_key)
        except NotFound:
            pass  # already gone (a previous leader's delete, or a crash mid-cleanup)


class RecordingRaced(Retryable):
    """A step's row kept appearing and disappearing while it was recorded: retry the message."""


def _if_match(etag: str) -> dict[str, Any]:
    if not etag:  # rows read before ETags were kept: unconditional (the old behaviour)
        return {}
    return {"etag": etag}


def _date_or(rows: Rows, fallback: datetime | None) -> datetime:
    """Storage's ``Date`` of its answer to a query read to the end."""
    if rows.date is not None:
        return rows.date
    logger.warning("storage sent no Date header; request expiry uses this instance's clock")
    return fallback or datetime.now(UTC)


def _chunks(items: list[_Item], size: int) -> Iterator[list[_Item]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
