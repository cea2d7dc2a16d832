"""Outcome events and the transactional outbox rows that carry them (pure: no I/O).

An upstream system that ran a step must learn how its request ended (to compensate on
``aborted``, ``rejected`` or ``expired``). The leader tells it with one **outcome event** per
decided request, sent to the outcomes queue (``OUTCOMES_QUEUE_NAME``), and with one
**contradiction event** per late step it parks (the step disagrees with the decision).

**The outbox.** The events of a fenced transaction are written *in that transaction*, as one
row ``outbox:{epoch}:{token}`` of the same ledger partition: the events exist if and only if
the outcomes (or the settle) they announce landed. After the commit the leader sends each
event and then deletes the row (``shared/leadership/outbox.py``); a row left by a crash is
sent by the next leader of the shard or the sweeper. So every decided request gets at least
one event, and an event is never sent for a request that is not decided. A row is never
changed after it is written, so a row sent twice sends the same bodies: ``eventId`` is the
idempotency key.

**Cross-shard requests.** The event is written by the transaction after which the read API
gives the final status: the home's transaction that *settles* the request (its last ACK) for a
request that other shards apply, or the deciding transaction when nothing is left to apply (a
rejection made by the home alone, or a decision with no shard to wait for). Its ``epoch`` and
``decidedAt`` are the outcome row's (the home's epoch that wrote the decision), as the read API
shows them.

**Sizes.** One row carries every event of its transaction, so a transaction costs one
operation more, never half its requests. The events' JSON is split over properties of at most
``CHUNK_CHARACTERS`` characters (a string property holds 32K UTF-16 units), and a row holds at
most ``MAX_ROW_CHARACTERS`` (under the 1 MiB entity limit): ``plan_batches`` cuts a batch whose
events' upper bound (``event_size_bound``) would pass it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from shared.domain.model import DecidedOutcome, Outcome, OutcomeStatus, bounded
from shared.domain.money import format_money
from shared.domain.planning import Subject, Write

EVENT_VERSION = 1
OUTBOX_PREFIX = "outbox:"
CONTRADICTION_PREFIX = OUTBOX_PREFIX + "contradiction:"
CHUNK_CHARACTERS = 30_000  # per property: under 32K UTF-16 units (every character here is ASCII
# but a reason may not be: a non-BMP character costs two units, and 2 * 30,000 > 32K is
# prevented by ``_chunks`` counting units)
MAX_ROW_CHARACTERS = 400_000  # the events of one row: 800 KB as UTF-16, under the 1 MiB entity
MAX_CHUNKS = MAX_ROW_CHARACTERS // CHUNK_CHARACTERS + 2
OUTBOX_OPERATIONS = 1  # what the outbox adds to a transaction
HANDED_OFF = "handedOff"  # a row a publisher invocation sends (``shared/leadership/outbox.py``)
_EVENT_OVERHEAD = 400  # the fixed fields of an outcome event, generously
_LEG_OVERHEAD = 40  # {"accountId":"","amount":""}, and the separators
_AMOUNT_CHARACTERS = 17  # "-1000000000000.00"


def outcome_event_id(request_id: str) -> str:
    return f"{request_id}:outcome"


def contradiction_event_id(request_id: str, parked_id: str) -> str:
    return f"{request_id}:contradiction:{parked_id}"


def _legs(legs: Iterable[tuple[str, Decimal]]) -> list[dict[str, str]]:
    return [{"accountId": account, "amount": format_money(amount)} for account, amount in legs]


def outcome_event(outcome: Outcome, epoch: int, decided_at: str) -> dict[str, Any]:
    """The outcome event of a decision, as its outcome row stores it (reason bounded alike)."""
    event: dict[str, Any] = {
        "version": EVENT_VERSION, "type": "outcome",
        "eventId": outcome_event_id(outcome.request_id), "requestId": outcome.request_id,
        "status": outcome.status.value, "reason": bounded(outcome.reason) or None,
    }
    if outcome.status is OutcomeStatus.COMMITTED:
        event["legs"] = _legs(outcome.legs)
    event["decidedAt"] = decided_at
    event["epoch"] = epoch
    return event


def decided_event(decided: DecidedOutcome) -> dict[str, Any]:
    """The outcome event of a stored outcome (a cross-shard request, at its settle)."""
    return outcome_event(decided.outcome, decided.epoch, decided.decided_at)


def contradiction_event(parked_id: str, reason: str, decided: DecidedOutcome,
                        operation_id: str) -> dict[str, Any]:
    """The event of a late step parked because it contradicts the request's decision."""
    request_id = decided.outcome.request_id
    return {"version": EVENT_VERSION, "type": "contradiction",
            "eventId": contradiction_event_id(request_id, parked_id), "requestId": request_id,
            "parkedId": parked_id, "operationId": operation_id,
            "status": decided.outcome.status.value, "reason": bounded(reason),
            "decidedAt": decided.decided_at, "epoch": decided.epoch}


def event_text(event: Mapping[str, Any]) -> str:
    """An event's body as sent: compact JSON, keys in the order written (the same every time)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def event_size_bound(request_id: str, legs: Sequence[tuple[str, Decimal]]) -> int:
    """At most how many characters an outcome event of this request takes (any status)."""
    return (_EVENT_OVERHEAD + 2 * len(request_id) + 1_000  # the reason, bounded
            + sum(_LEG_OVERHEAD + len(account) + _AMOUNT_CHARACTERS for account, _ in legs))


def outbox_key(epoch: int) -> str:
    """A new outbox row's key: its epoch (sorts older terms first) and a unique token."""
    return f"{OUTBOX_PREFIX}{epoch:012d}:{uuid.uuid4().hex}"


def contradiction_key(parked_id: str) -> str:
    """The outbox row of one parked contradiction: one key per parked step (create-once)."""
    return CONTRADICTION_PREFIX + parked_id


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _chunks(text: str) -> list[str]:
    """``text`` cut into pieces of at most ``CHUNK_CHARACTERS`` UTF-16 units, never inside a
    character."""
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + CHUNK_CHARACTERS)
        while _units(text[start:end]) > CHUNK_CHARACTERS:
            end -= 1
        chunks.append(text[start:end])
        start = end
    return chunks or [""]


def outbox_entity(partition: str, key: str, events: Sequence[Mapping[str, Any]],
                  handed_off: bool = False) -> dict[str, Any]:
    """The outbox row of ``events``: their JSON list split over ``events``, ``events1``, ...;
    ``handedOff`` when a publisher invocation, not the leader, sends them."""
    text = json.dumps([event_text(e) for e in events], separators=(",", ":"),
                      ensure_ascii=False)
    if _units(text) > MAX_ROW_CHARACTERS + CHUNK_CHARACTERS:
        raise ValueError(f"{len(events)} events take {len(text)} characters, more than an "
                         f"outbox row's {MAX_ROW_CHARACTERS}: plan smaller batches")
    entity: dict[str, Any] = {"PartitionKey": partition, "RowKey": key, "count": len(events)}
    if handed_off:
        entity[HANDED_OFF] = True
    for index, chunk in enumerate(_chunks(text)):
        entity["events" if index == 0 else f"events{index}"] = chunk
    return entity


def events_of(row: Mapping[str, Any]) -> list[str]:
    """The event bodies an outbox row carries, as they are sent."""
    parts = [str(row.get("events") or "")]
    index = 1
    while f"events{index}" in row:
        parts.append(str(row[f"events{index}"]))
        index += 1
    text = "".join(parts)
    return [str(body) for body in json.loads(text)] if text else []


def outbox_write(partition: str, key: str, events: Sequence[Mapping[str, Any]],
                 handed_off: bool = False) -> tuple[Subject, Write]:
    """The create of one outbox row, as an extra write of a fenced transaction."""
    return ("outbox", key), Write("create", outbox_entity(partition, key, events, handed_off))
