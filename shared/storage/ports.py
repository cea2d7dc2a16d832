"""The storage ports: what the app needs of a table and of a queue, with no SDK type in sight.

Two small protocols, ``Table`` and ``MessageQueue``, each with two implementations: the Azure
adapters (``shared/storage/azure_tables.py``, ``shared/storage/azure_queues.py``) and the
in-memory fakes of the tests (``tests/fakes/``). One contract suite (``tests/contract/``) runs
against both, so the fakes answer as storage answers.

Entities are plain dicts (``PartitionKey``, ``RowKey`` and properties of ``str``, ``bool``,
``int``, ``float``, ``datetime``, ``bytes`` or ``uuid.UUID``; a ``None`` value is left out, as
the SDK leaves it out). A row read back is a ``Row``: a dict of its properties with storage's
``etag`` and ``timestamp`` beside it, never among them. Every call raises only the app's
``StorageError`` family (``shared/errors.py``): ``NotFound``, ``AlreadyExists``,
``ConditionFailed``, ``BatchRefused`` (with the failing operation's ``index``), another
``StorageRefused`` (a 4xx: a key or property storage refuses, say), or ``StorageUnavailable``.

Decisions that differ from the raw REST API, and why:

- ``Table.delete`` of an entity that is not there is not an error, with or without an ETag
  (storage answers 404; the SDK swallows it, and every caller treats "already gone" as done).
  A delete whose ETag no longer matches a present entity raises ``ConditionFailed``.
- ``Table.update`` without an ETag is unconditional (``If-Match: *``): it still needs the entity
  to exist (``NotFound``). With one it is ``If-Match`` that ETag (``ConditionFailed``).
- ``Table.submit`` of no operation returns ``[]`` without calling storage. A batch that storage
  would refuse before applying anything (operations on two partitions, more than 100, the same
  entity twice, too large) raises ``BatchRefused``; nothing of it was applied. Inside a batch a
  delete of an absent entity does refuse it (404), as storage does.
- An ``int`` is an ``Edm.Int32`` when it fits, an ``Edm.Int64`` otherwise, and read back as an
  ``int`` either way.

A caller's own mistakes (an unknown operation or option, a value of another type, a naive
``datetime``, a ``page_size`` below 1) are ``ValueError``/``TypeError``, never storage errors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol, TypeAlias

# Documented limits of Azure Table storage (learn.microsoft.com: "Understanding the Table
# service data model", "Performing entity group transactions", "Scalability and performance
# targets for Table storage").
MAX_BATCH_OPERATIONS = 100  # operations in one entity-group transaction
MAX_BATCH_BYTES = 4 * 1024 * 1024  # a transaction's payload is less than 4 MiB
MAX_PROPERTIES = 255  # PartitionKey, RowKey and Timestamp included: 252 of the app's own
MAX_ENTITY_BYTES = 1024 * 1024  # all of an entity's data, as storage counts it
# PartitionKey and RowKey: "a string value up to 1 KiB in size", sized as the data model sizes
# strings (UTF-16): 512 code units. Azurite refuses the 513th; the scalability targets page says
# "up to 1024 characters", so this is the smaller reading, the safe one.
MAX_KEY_UNITS = 512
MAX_PROPERTY_NAME = 255  # characters
# A string property holds 64 KiB of UTF-16 (32 Ki code units), as documented and as Azurite
# counts. Azure itself was reported to refuse more than 64,000 bytes (Azure/Azurite#2510):
# the app stays within 32,000 units (shared/storage/parking.py).
MAX_STRING_CHARACTERS = 32 * 1024
# Characters a PartitionKey or RowKey must not contain.
FORBIDDEN_KEY_CHARACTERS = frozenset("/\\#?") | frozenset(
    chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])

# Queue storage.
MAX_MESSAGE_BYTES = 64 * 1024  # a message as sent (after the base64 encoding)
MAX_RECEIVE = 32  # messages one receive returns at most


class Mode(StrEnum):
    """How a write meets an existing entity: ``MERGE`` keeps the properties it does not name,
    ``REPLACE`` drops them. The values are the SDK's ``UpdateMode`` values."""

    MERGE = "merge"
    REPLACE = "replace"


def mode_of(value: Any) -> Mode:
    """A ``Mode`` from a ``Mode``, the SDK's ``UpdateMode`` (same values) or its value."""
    return Mode(getattr(value, "value", value))


class Row(dict[str, Any]):
    """One entity as read: its properties (keys included when selected), and storage's metadata.

    ``etag`` names this version (for ``If-Match``); ``timestamp`` is storage's time of its last
    write (``None`` when a projection left ``Timestamp`` out).
    """

    def __init__(self, properties: Mapping[str, Any], etag: str,
                 timestamp: datetime | None) -> None:
        super().__init__(properties)
        self.etag = etag
        self.timestamp = timestamp

    def __repr__(self) -> str:
        return f"Row({dict.__repr__(self)}, etag={self.etag!r}, timestamp={self.timestamp!r})"


@dataclass(frozen=True)
class Written:
    """What storage answered to a write.

    ``etag``: the entity's new version (``None`` for a delete). ``timestamp``: storage's time of
    the write when its answer says (Table storage's ETags carry it). ``date``: storage's clock
    when it answered (the ``Date`` header), the app's "now" for expiry decisions.
    """

    etag: str | None
    timestamp: datetime | None = None
    date: datetime | None = None


class Rows(Iterator[Row]):
    """The rows of a query, read page by page as they are iterated.

    ``date``: storage's clock when it answered the latest page (``None`` before the first).
    """

    date: datetime | None = None

    def __init__(self, rows: Iterator[Row]) -> None:
        self._rows = rows

    def __next__(self) -> Row:
        return next(self._rows)


OperationKind: TypeAlias = Literal["create", "upsert", "update", "delete"]
# An operation of an entity-group transaction, as the SDK's ``submit_transaction`` takes it:
# (kind, entity, options), options being ``mode`` (a ``Mode``), ``etag`` (``If-Match``; only
# for update and delete) and, for a caller written for the SDK, ``match_condition`` (its
# ``IfNotModified`` with an ETag, ``Unconditionally`` without; any other is refused).
Operation: TypeAlias = (tuple[OperationKind, Mapping[str, Any]]
                        | tuple[OperationKind, Mapping[str, Any], Mapping[str, Any]])


class Table(Protocol):
    """One table of Table storage."""

    @property
    def name(self) -> str:
        """The table's name."""
        ...

    def get(self, partition_key: str, row_key: str, *,
            select: Sequence[str] | None = None) -> Row:
        """One entity (``NotFound`` when it is not there); ``select`` names the properties."""
        ...

    def query(self, filter: str, *, parameters: Mapping[str, Any] | None = None,
              select: Sequence[str] | None = None, page_size: int | None = None,
              limit: int | None = None) -> Rows:
        """The entities matching an OData ``filter`` in key order (PartitionKey, then RowKey).

        ``@name`` words of the filter are replaced by ``parameters`` (as the SDK does: whole
        space-separated words only, so write ``( PartitionKey eq @pk )``). ``page_size``: rows
        per call to storage (storage's most, 1,000, when larger or ``None``); ``limit``: stop
        after that many rows (and read no page past them).
        """
        ...

    def create(self, entity: Mapping[str, Any]) -> Written:
        """Insert a new entity; ``AlreadyExists`` when one with its keys is there."""
        ...

    def upsert(self, entity: Mapping[str, Any], *, mode: Mode = Mode.MERGE) -> Written:
        """Insert, or merge into / replace the entity that is there."""
        ...

    def update(self, entity: Mapping[str, Any], *, mode: Mode = Mode.MERGE,
               etag: str | None = None) -> Written:
        """Merge into / replace an existing entity (``NotFound``), ``If-Match`` ``etag`` when
        one is given (``ConditionFailed``)."""
        ...

    def delete(self, partition_key: str, row_key: str, *, etag: str | None = None) -> None:
        """Delete the entity (``If-Match`` ``etag`` when given): absent is not an error."""
        ...

    def submit(self, operations: Sequence[Operation]) -> list[Written]:
        """One entity-group transaction: all operations are applied, or none.

        Returns one ``Written`` per operation (``etag`` ``None`` for a delete). A refusal raises
        ``BatchRefused`` with the index of the failing operation (``None`` when it is the batch
        as a whole: too many operations, too large); nothing of the batch was applied.
        """
        ...


@dataclass(frozen=True)
class Handle:
    """A message as the queue knows it: its id and the pop receipt of the latest send, receive
    or update (each gives a new receipt, and only the latest deletes or updates it)."""

    message_id: str
    pop_receipt: str


@dataclass(frozen=True)
class Message:
    """A message received: its text, how often it was received (this time included), and the
    handle to delete it with."""

    handle: Handle
    text: str
    dequeue_count: int


class MessageQueue(Protocol):
    """One queue of Queue storage; text messages (the adapter encodes them as the host reads
    them)."""

    @property
    def name(self) -> str:
        """The queue's name."""
        ...

    def send(self, text: str, *, visibility_timeout: int | None = None,
             time_to_live: int | None = None) -> Handle:
        """Add a message, invisible for ``visibility_timeout`` seconds (0 when ``None``), and
        gone after ``time_to_live`` seconds (storage's default, 7 days, when ``None``)."""
        ...

    def receive(self, *, max_messages: int = 1,
                visibility_timeout: int | None = None) -> list[Message]:
        """Take up to ``max_messages`` (1 to 32) visible messages, oldest first, and hide them
        for ``visibility_timeout`` seconds (30 when ``None``)."""
        ...

    def update(self, handle: Handle, *, visibility_timeout: int) -> Handle:
        """Make the message visible again ``visibility_timeout`` seconds from now (its text
        unchanged); returns its new handle. ``NotFound`` when it is gone, ``ConditionFailed``
        when ``handle`` is not its latest receipt (someone received it since)."""
        ...

    def delete(self, handle: Handle) -> None:
        """Delete the message. ``NotFound`` when it is gone, ``ConditionFailed`` when ``handle``
        is not its latest receipt (someone received it since)."""
        ...

    def approximate_count(self) -> int:
        """About how many messages the queue holds, invisible ones included."""
        ...


@dataclass(frozen=True)
class Peeked:
    """A message looked at without being received (its receipt is not changed)."""

    message_id: str
    text: str
    inserted_on: datetime | None
    dequeue_count: int


class PeekableQueue(MessageQueue, Protocol):
    """A queue whose messages an operator may look at without taking them."""

    def peek(self, *, max_messages: int = 1) -> list[Peeked]:
        """Up to ``max_messages`` (1 to 32) visible messages, oldest first, left where they are."""
        ...
