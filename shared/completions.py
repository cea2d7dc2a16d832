"""The completions table: every completion recorded (one row per step), read back by the leader.

Row layout: PartitionKey = one of ``BUCKETS`` (16) buckets, a stable hash of the requestId;
RowKey = ``requestId|operationId`` (``|`` is outside the identifier charset); the requestId is
also a property. One (requestId, operationId) thus has one key, as before: a second delivery of
an operationId with the same content is a duplicate and changes nothing; with different content
it is recorded beside the first as a *conflict* row (``RowKey = requestId|operationId~conflict``,
one per operationId however many contents arrive, so a request holds at most two rows per
operationId) and the leader rejects the request. Rows are deleted only after the request's
outcome is written to the ledger. Buckets let the leader delete the rows of many requests in one
transaction (up to 100 rows of one bucket) instead of one transaction per request. Rows of the
earlier layout (PartitionKey = requestId, RowKey = operationId) are still read and deleted.

The time of record is storage's own entity ``Timestamp``, and the leader's "now" for expiry is
the ``Date`` of storage's answer to its scan: one clock that every instance shares, so a skewed
instance clock can neither expire a fresh request nor keep an old one alive.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline import PipelineResponse
from azure.data.tables import TableClient, TableEntity, TableTransactionError

from shared import telemetry
from shared.contract import Completion, Operation, StepStatus, completion_message
from shared.money import format_money, parse_balance

logger = logging.getLogger(__name__)

CONFLICT_SEPARATOR = "~"  # not in the identifier charset, so it cannot clash with an operationId
CONFLICT_SUFFIX = CONFLICT_SEPARATOR + "conflict"
KEY_SEPARATOR = "|"  # between requestId and operationId in a RowKey; outside the charset too
BUCKETS = 16
MAX_BATCH_ROWS = 100  # rows of one partition per entity-group transaction


def bucket_of(request_id: str) -> str:
    """The PartitionKey of a request's rows: a stable hash of its id, one of ``BUCKETS``."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return f"b{int.from_bytes(digest[:4], 'big') % BUCKETS:02d}"


def row_key_of(request_id: str, operation_id: str) -> str:
    """The RowKey of a step's row."""
    return f"{request_id}{KEY_SEPARATOR}{operation_id}"


class RecordResult(StrEnum):
    """What recording one delivery did."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class RecordedStep:
    """One completion row as the leader reads it."""

    request_id: str
    row_key: str
    operation_id: str
    operation: Operation
    account_id: str
    amount: Decimal
    expected_operations: int
    status: StepStatus
    content_key: str
    recorded_at: datetime  # storage's Timestamp of the row: the shared clock
    conflict: bool
    completed_at: str = ""
    partition_key: str = ""  # where the row is stored (the bucket; the requestId for old rows)
    recorded_by: str = ""  # the instance that recorded it
    traceparent: str = ""  # the span that recorded it (W3C), for the commit span's link

    def to_message(self) -> bytes:
        """The step as the v1 message upstream sent (to park it for an operator)."""
        return completion_message(
            request_id=self.request_id, operation_id=self.operation_id,
            operation=self.operation, account_id=self.account_id,
            amount=format_money(self.amount), expected_operations=self.expected_operations,
            status=self.status, **({"completed_at": self.completed_at}
                                   if self.completed_at else {})).encode()

    @property
    def signed_amount(self) -> Decimal:
        """The change this step makes to its account's balance when committed."""
        return self.amount if self.operation is Operation.ADD_FUNDS else -self.amount


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


def _step(row: TableEntity) -> RecordedStep:
    return RecordedStep(
        request_id=row.get("requestId") or row["PartitionKey"],
        row_key=row["RowKey"],
        operation_id=row["operationId"],
        operation=Operation(row["operation"]),
        account_id=row["accountId"],
        amount=parse_balance(row["amount"]),
        expected_operations=int(row["expectedOperations"]),
        status=StepStatus(row["status"]),
        content_key=row["contentKey"],
        recorded_at=_storage_time(row),
        conflict=bool(row.get("conflict", False)),
        completed_at=str(row.get("completedAt") or ""),
        partition_key=row["PartitionKey"],
        recorded_by=str(row.get("recordedBy") or ""),
        traceparent=str(row.get(telemetry.TRACEPARENT, "")),
    )


def _storage_time(row: TableEntity) -> datetime:
    stamp = row.metadata.get("timestamp")
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    # Not returned (a projection without Timestamp): the recorder's own stamp, as written.
    return datetime.fromisoformat(row["recordedAt"])


@dataclass(frozen=True)
class CompletionScan:
    """Every recorded step grouped by request, and storage's time when it answered."""

    steps: dict[str, list[RecordedStep]]
    storage_time: datetime  # the Date of storage's answer: "now" on the record times' clock
    newest_record: datetime | None = None  # the latest Timestamp among the rows read


class StorageDate:
    """A ``raw_response_hook`` that keeps the latest ``Date`` header storage answered with."""

    def __init__(self) -> None:
        self.latest: datetime | None = None

    def __call__(self, response: PipelineResponse) -> None:  # type: ignore[type-arg]
        header = response.http_response.headers.get("Date")
        if header:
            self.latest = parsedate_to_datetime(header)


class CompletionStore:
    """Records completions and gives the leader its view of them."""

    def __init__(self, table: TableClient) -> None:
        self.table = table

    def record(self, completion: Completion, instance_id: str, now: datetime) -> RecordResult:
        """Record one delivery. Idempotent: a redelivery of the same content is a no-op."""
        key = row_key_of(completion.request_id, completion.operation_id)
        entity = _entity(completion, key, instance_id, now, conflict=False)
        for _ in range(3):
            try:
                self.table.create_entity(entity)
                return RecordResult.RECORDED
            except ResourceExistsError:
                pass
            try:
                first = self.table.get_entity(entity["PartitionKey"], key)
                break
            except ResourceNotFoundError:
                continue  # the leader deleted it in between (its request ended): record anew
        else:
            raise RuntimeError(f"{completion.request_id}/{completion.operation_id} kept "
                               "appearing and disappearing; the host will retry the message")
        if first["contentKey"] == completion.content_key():
            logger.debug("duplicate delivery of %s/%s ignored", completion.request_id,
                         completion.operation_id)  # counted: ledger.completions.deliveries
            return RecordResult.DUPLICATE
        row_key = key + CONFLICT_SUFFIX
        with contextlib.suppress(ResourceExistsError):  # a conflict was recorded already
            self.table.create_entity(_entity(completion, row_key, instance_id, now,
                                             conflict=True))
        logger.warning("operationId %s of request %s arrived twice with different content; the "
                       "request will be rejected", completion.operation_id, completion.request_id,
                       extra=telemetry.log_extra(requestId=completion.request_id))
        return RecordResult.CONFLICT

    def scan(self, fallback_now: datetime, since: datetime | None = None) -> CompletionScan:
        """Every recorded step, grouped by request (one scan of the table), and storage's time.

        With ``since``, only the rows whose storage ``Timestamp`` is at or after it (the leader's
        incremental read; storage evaluates the filter, so only those rows travel).
        ``fallback_now`` is used only if storage's answer carried no ``Date`` header.
        """
        grouped: dict[str, list[RecordedStep]] = defaultdict(list)
        date = StorageDate()
        if since is None:
            rows = self.table.list_entities(raw_response_hook=date)
        else:
            rows = self.table.query_entities("Timestamp ge @since", parameters={"since": since},
                                             raw_response_hook=date)
        newest: datetime | None = None
        for row in rows:
            step = _step(row)
            grouped[step.request_id].append(step)
            if newest is None or step.recorded_at > newest:
                newest = step.recorded_at
        if date.latest is None:
            logger.warning("storage sent no Date header; request expiry uses this instance's "
                           "clock for this scan")
        return CompletionScan(dict(grouped), date.latest or fallback_now, newest)

    def steps_of(self, request_id: str) -> list[RecordedStep]:
        """The recorded steps of one request (either layout)."""
        low = request_id + KEY_SEPARATOR
        high = request_id + chr(ord(KEY_SEPARATOR) + 1)
        rows = self.table.query_entities(
            "( PartitionKey eq @bucket and RowKey ge @low and RowKey lt @high ) "
            "or PartitionKey eq @request",  # spaces: the SDK substitutes whole words
            parameters={"bucket": bucket_of(request_id), "low": low, "high": high,
                        "request": request_id})
        return [_step(row) for row in rows]

    def count(self, limit: int = 10_000) -> int:
        """How many completion rows wait for the leader (counting stops at ``limit``)."""
        total = 0
        for _ in self.table.list_entities(select=["RowKey"], results_per_page=1000):
            total += 1
            if total >= limit:
                break
        return total

    @telemetry.traced("ledger.delete")
    def delete(self, steps: Iterable[RecordedStep]) -> None:
        """Delete rows of requests whose outcome is already in the ledger (idempotent).

        One transaction per 100 rows of a partition, whatever requests they belong to.
        """
        by_partition: dict[str, set[str]] = defaultdict(set)
        for step in steps:
            by_partition[step.partition_key or step.request_id].add(step.row_key)
        for partition, row_keys in by_partition.items():
            for chunk in _chunks(sorted(row_keys), MAX_BATCH_ROWS):
                try:
                    self.table.submit_transaction(
                        [("delete", {"PartitionKey": partition, "RowKey": rk}) for rk in chunk])
                except TableTransactionError:
                    # One row was already gone (a previous leader crashed mid-cleanup).
                    for rk in chunk:
                        with contextlib.suppress(ResourceNotFoundError):
                            self.table.delete_entity(partition, rk)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
