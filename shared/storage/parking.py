"""Dead letters: parked messages, and the poison queue, for an operator to see and replay.

Two kinds of message are parked (``ParkedKind``). A *malformed* message is never retried as it
is (it would fail the same way until it is poisoned): it is stored with the validation error and
acknowledged; it changes no balance. A *late contradicting* step arrived after its request was
decided and disagrees with the decision (``decision.contradiction``): the leader parks it with
the reason instead of dropping it, because upstream believes money moved that did not. An
operator lists them (``./dev cli parked list``), fixes the sender, and replays one
(``parked replay ID``): its body goes back on the completions queue and the row is removed.

A message whose invocation kept failing (storage down, say) is moved by the Functions host to the
poison queue after ``maxDequeueCount`` attempts; ``replay_poisoned`` puts such messages back
(``./dev cli poison replay``) once the cause is fixed.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from shared.errors import BadInput, NotFound
from shared.observability import telemetry
from shared.storage.bounded import take_bounded
from shared.storage.ports import MessageQueue, Mode, PeekableQueue, Table

logger = logging.getLogger(__name__)

PARKED_PARTITION = "parked"
# A table string property holds 64 KiB: 32,768 UTF-16 code units, and a character outside the
# Basic Multilingual Plane (an emoji) is two of them. Bodies are split across columns of at most
# _UNITS units, never inside a character, and the error is cut to as many.
_UNITS = 32_000
# One entity: at most 1 MiB, as Azure counts it (_entity_bytes), and 255 properties, PartitionKey,
# RowKey and Timestamp included. A queue message (64 KiB) parks in under a fifth of that.
_ENTITY_BYTES = 1 << 20
_PROPERTIES = 255


class ParkedKind(StrEnum):
    """Why a message was parked."""

    MALFORMED = "malformed"
    LATE_CONTRADICTION = "late-contradiction"


def late_step_id(request_id: str, row_key: str) -> str:
    """The parked id of a late step (one per recorded row: parking it twice is idempotent)."""
    return f"late:{request_id}:{row_key}"


@dataclass(frozen=True)
class ParkedMessage:
    """One parked message as an operator sees it."""

    parked_id: str
    body: bytes
    error: str
    parked_at: str
    dequeue_count: int
    instance_id: str
    kind: ParkedKind = ParkedKind.MALFORMED


def _encode(body: bytes) -> tuple[str, str]:
    try:
        return "utf-8", body.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(body).decode("ascii")


def _split(text: str, units: int = _UNITS) -> list[str]:
    """``text`` in pieces of at most ``units`` UTF-16 code units, no character cut in two."""
    data = text.encode("utf-16-le", "surrogatepass")
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + 2 * units, len(data))
        if end < len(data) and 0xD800 <= int.from_bytes(data[end - 2:end], "little") < 0xDC00:
            end -= 2  # a high surrogate: its pair starts the next piece
        pieces.append(data[start:end].decode("utf-16-le", "surrogatepass"))
        start = end
    return pieces or [""]


def _utf16_bytes(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass"))


def _entity_bytes(entity: dict[str, Any]) -> int:
    """The entity's size as Azure counts it: 4 + keys as UTF-16, and per property 8 + its name
    as UTF-16 + its value (a string: 4 + UTF-16; here 8 for anything else, the most). The
    server's Timestamp counts too."""
    size = 4 + _utf16_bytes(entity["PartitionKey"]) + _utf16_bytes(entity["RowKey"])
    for name, value in [*entity.items(), ("Timestamp", 0)]:
        if name not in ("PartitionKey", "RowKey"):
            size += 8 + _utf16_bytes(name) + (4 + _utf16_bytes(value)
                                              if isinstance(value, str) else 8)
    return size


class ParkingLot:
    """The table of parked messages."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def park(self, parked_id: str, body: bytes, error: str, dequeue_count: int,
             instance_id: str, now: datetime,
             kind: ParkedKind = ParkedKind.MALFORMED) -> None:
        """Keep a message with why it was parked. Idempotent per ``parked_id``."""
        encoding, text = _encode(body)
        chunks = _split(text)
        entity: dict[str, Any] = {
            "PartitionKey": PARKED_PARTITION, "RowKey": parked_id, "error": _split(error)[0],
            "encoding": encoding, "chunks": len(chunks), "parkedAt": now.isoformat(),
            "dequeueCount": dequeue_count, "instanceId": instance_id, "kind": kind.value,
        }
        for index, chunk in enumerate(chunks):
            entity[f"body{index}"] = chunk
        if len(entity) + 1 > _PROPERTIES or _entity_bytes(entity) > _ENTITY_BYTES:
            raise ValueError(f"message {parked_id} is too large to park ({len(body)} bytes)")
        self.table.upsert(entity, mode=Mode.REPLACE)
        telemetry.record_parked(kind.value)
        logger.warning("parked %s message %s: %s", kind.value, parked_id, error,
                       extra=telemetry.log_extra(parkedId=parked_id, parkedKind=kind.value))

    def count_by_kind(self, limit: int = 10_000) -> dict[str, int]:
        """How many messages are parked, by kind (counting stops at ``limit``).

        All zero while the table does not exist yet (it is made on first use).
        """
        counts = {kind.value: 0 for kind in ParkedKind}
        rows = self.table.query("PartitionKey eq @pk", select=["kind"],
                                parameters={"pk": PARKED_PARTITION})
        try:
            for row in take_bounded(rows, limit).rows:
                kind = str(row.get("kind") or ParkedKind.MALFORMED.value)
                counts[kind] = counts.get(kind, 0) + 1
        except NotFound:
            pass
        return counts

    def list(self, limit: int = 1000) -> list[ParkedMessage]:
        """Parked messages, oldest first."""
        rows = self.table.query("PartitionKey eq @pk", parameters={"pk": PARKED_PARTITION})
        found: list[ParkedMessage] = []
        for row in rows:
            found.append(self._message(row))
            if len(found) >= limit:
                break
        return sorted(found, key=lambda m: m.parked_at)

    def get(self, parked_id: str) -> ParkedMessage | None:
        """One parked message, or ``None``."""
        try:
            return self._message(self.table.get(PARKED_PARTITION, parked_id))
        except NotFound:
            return None

    def replay(self, parked_id: str, queue: MessageQueue, body: bytes | None = None) -> None:
        """Put the message (or a corrected ``body``) back on the queue, then forget it.

        The queue must encode as the Functions host decodes (base64: ``AzureQueue``'s default).
        At least once: a crash between the two steps leaves the row to replay again, and the
        pipeline treats a second delivery of the same step as a duplicate.
        """
        message = self.get(parked_id)
        if message is None:
            raise BadInput(f"no parked message {parked_id!r}; list them with "
                           "'./dev cli parked list'")
        queue.send((body if body is not None else message.body).decode("utf-8"))
        self.table.delete(PARKED_PARTITION, parked_id)
        logger.info("replayed parked message %s", parked_id)

    @staticmethod
    def _message(row: Any) -> ParkedMessage:
        text = "".join(row.get(f"body{i}", "") for i in range(int(row.get("chunks", 1))))
        body = base64.b64decode(text) if row.get("encoding") == "base64" else text.encode()
        return ParkedMessage(row["RowKey"], body, row.get("error", ""), row.get("parkedAt", ""),
                             int(row.get("dequeueCount", 0)), row.get("instanceId", ""),
                             ParkedKind(row.get("kind") or ParkedKind.MALFORMED.value))


@dataclass(frozen=True)
class PoisonedMessage:
    """One message in the poison queue, as peeked (its text is what the host received)."""

    message_id: str
    text: str
    inserted_on: str
    dequeue_count: int


QUEUE_BATCH_LIMIT = 32  # the most messages one peek or receive returns (Azure Queue Storage)


def queue_depth(queue: MessageQueue) -> int:
    """The queue's approximate message count; 0 while it does not exist (the host makes the
    poison queue with the first message it poisons)."""
    try:
        return queue.approximate_count()
    except NotFound:
        return 0


def peek_poisoned(poison: PeekableQueue,
                  limit: int = QUEUE_BATCH_LIMIT) -> list[PoisonedMessage]:
    """Up to ``QUEUE_BATCH_LIMIT`` messages of the poison queue, without taking them.

    A raw queue (``open_queue(name, raw=True)``) shows each text as the host received it."""
    return [PoisonedMessage(m.message_id, m.text, str(m.inserted_on or ""), m.dequeue_count)
            for m in poison.peek(max_messages=min(limit, QUEUE_BATCH_LIMIT))]


def replay_poisoned(poison: MessageQueue, target: MessageQueue, limit: int) -> int:
    """Move up to ``limit`` poisoned messages back to ``target`` unchanged; return how many.

    Both queues must be raw (``open_queue(name, raw=True)``): the text moves as it is, already
    in the host's encoding. At least once: a crash between send and delete replays a message
    twice, which the pipeline treats as a duplicate delivery.
    """
    moved = 0
    while moved < limit:
        batch = poison.receive(max_messages=min(QUEUE_BATCH_LIMIT, limit - moved),
                               visibility_timeout=60)
        if not batch:
            break
        for message in batch:
            target.send(message.text)
            poison.delete(message.handle)
            moved += 1
    logger.info("replayed %d poisoned message(s)", moved)
    return moved
