"""The completions table: every completion recorded (one row per step), read back by the leader.

Row layout: PartitionKey = requestId, RowKey = operationId. A second delivery of an operationId
with the same content is a duplicate and changes nothing; with different content it is recorded
beside the first as a *conflict* row (``RowKey = operationId~conflict``, one per operationId
however many contents arrive, so a request holds at most two rows per operationId) and the
leader rejects the request. Rows are deleted only after the request's outcome is written to the
ledger.

The time of record is storage's own entity ``Timestamp``, and the leader's "now" for expiry is
the ``Date`` of storage's answer to its scan: one clock that every instance shares, so a skewed
instance clock can neither expire a fresh request nor keep an old one alive.
"""

from __future__ import annotations

import contextlib
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
_DELETE_CHUNK = 100


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
        "PartitionKey": completion.request_id,
        "RowKey": row_key,
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
        request_id=row["PartitionKey"],
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
        entity = _entity(completion, completion.operation_id, instance_id, now, conflict=False)
        for _ in range(3):
            try:
                self.table.create_entity(entity)
                return RecordResult.RECORDED
            except ResourceExistsError:
                pass
            try:
                first = self.table.get_entity(completion.request_id, completion.operation_id)
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
        row_key = completion.operation_id + CONFLICT_SUFFIX
        with contextlib.suppress(ResourceExistsError):  # a conflict was recorded already
            self.table.create_entity(_entity(completion, row_key, instance_id, now,
                                             conflict=True))
        logger.warning("operationId %s of request %s arrived twice with different content; the "
                       "request will be rejected", completion.operation_id, completion.request_id,
                       extra=telemetry.log_extra(requestId=completion.request_id))
        return RecordResult.CONFLICT

    def scan(self, fallback_now: datetime) -> CompletionScan:
        """Every recorded step, grouped by request (one scan of the table), and storage's time.

        ``fallback_now`` is used only if storage's answer carried no ``Date`` header.
        """
        grouped: dict[str, list[RecordedStep]] = defaultdict(list)
        date = StorageDate()
        for row in self.table.list_entities(raw_response_hook=date):
            grouped[row["PartitionKey"]].append(_step(row))
        if date.latest is None:
            logger.warning("storage sent no Date header; request expiry uses this instance's "
                           "clock for this scan")
        return CompletionScan(dict(grouped), date.latest or fallback_now)

    def steps_of(self, request_id: str) -> list[RecordedStep]:
        """The recorded steps of one request."""
        rows = self.table.query_entities("PartitionKey eq @pk", parameters={"pk": request_id})
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
        """Delete rows of requests whose outcome is already in the ledger (idempotent)."""
        by_request: dict[str, list[str]] = defaultdict(list)
        for step in steps:
            by_request[step.request_id].append(step.row_key)
        for request_id, row_keys in by_request.items():
            for chunk in _chunks(row_keys, _DELETE_CHUNK):
                try:
                    self.table.submit_transaction(
                        [("delete", {"PartitionKey": request_id, "RowKey": rk}) for rk in chunk])
                except TableTransactionError:
                    # One row was already gone (a previous leader crashed mid-cleanup).
                    for rk in chunk:
                        with contextlib.suppress(ResourceNotFoundError):
                            self.table.delete_entity(request_id, rk)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
