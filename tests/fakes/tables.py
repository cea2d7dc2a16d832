"""``MemoryTables``/``MemoryTable``: the ``Table`` port in memory, answering as Table storage.

What it keeps of Azure's documented behaviour (learn.microsoft.com, "Understanding the Table
service data model", "Performing entity group transactions", "Querying tables and entities",
"Table service error codes"), and the ``tests/contract/`` suite checks against Azurite:

- every write gives the entity a new ``Timestamp`` (the fake clock's wall time, made strictly
  increasing per service, so two writes in one instant still differ) and an ETag that carries
  it (``W/"datetime'2026-01-01T00%3A00%3A00.0000000Z'"``, as storage writes them);
- ``If-Match``: an update or delete with a stale ETag is refused (412), an update of an absent
  entity is refused (404), a create of a present one (409); a delete of an absent entity is not
  an error (the port's choice, as the SDK's);
- entity-group transactions: all or nothing; at most 100 operations, one PartitionKey, each
  entity once, a payload under 4 MiB (counted as the ``$batch`` body the adapter sends, about);
- entities: at most 255 properties (PartitionKey, RowKey and Timestamp included), 1 MiB of data
  as storage counts it, property names of up to 255 characters, strings of up to 32 Ki UTF-16
  units, keys of up to 1 KiB of UTF-16 (512 units) without ``/ \\ # ?`` or control characters;
- queries: the OData subset the app writes (``eq ne gt ge lt le``, ``and or not``, parentheses,
  string, integer, boolean, double, ``datetime''`` and ``guid''`` literals), ``@name``
  parameters substituted as the SDK substitutes them (whole space-separated words); results in
  key order; a comparison with a property an entity lacks never matches it; ``select``; the
  ``Date`` of the answer (whole seconds, as the HTTP header).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from shared.domain.clock import SYSTEM_CLOCK, Clock
from shared.errors import (
    AlreadyExists,
    BatchRefused,
    ConditionFailed,
    NotFound,
    StorageRefused,
)
from shared.storage.ports import (
    FORBIDDEN_KEY_CHARACTERS,
    MAX_BATCH_BYTES,
    MAX_BATCH_OPERATIONS,
    MAX_ENTITY_BYTES,
    MAX_KEY_UNITS,
    MAX_PROPERTIES,
    MAX_PROPERTY_NAME,
    MAX_STRING_CHARACTERS,
    Mode,
    Operation,
    Row,
    Rows,
    Written,
    mode_of,
)

_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")
_INT64 = range(-(2**63), 2**63)
_KEYS = ("PartitionKey", "RowKey")
_BATCH_PART_OVERHEAD = 400  # the headers of one operation in a $batch body, about


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _value_bytes(value: Any) -> int:
    """A property value's size as storage counts an entity's (the data model's formula)."""
    if isinstance(value, str):
        return 4 + 2 * _utf16_units(value)
    if isinstance(value, bytes):
        return 4 + len(value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, uuid.UUID):
        return 16
    if isinstance(value, int):
        return 4 if -(2**31) <= value < 2**31 else 8
    return 8  # double, datetime


def entity_bytes(entity: Mapping[str, Any]) -> int:
    """4 bytes, the keys in UTF-16, and per property 8 bytes, its name in UTF-16, its value."""
    size = 4 + 2 * (_utf16_units(entity["PartitionKey"]) + _utf16_units(entity["RowKey"]))
    for name, value in entity.items():
        if name not in _KEYS:
            size += 8 + 2 * _utf16_units(name) + _value_bytes(value)
    return size


def etag_of(stamp: datetime) -> str:
    """The ETag Table storage gives a version written at ``stamp``."""
    return f"W/\"datetime'{quote(_iso7(stamp), safe='.-')}'\""


def _iso7(stamp: datetime) -> str:
    stamp = stamp.astimezone(UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond:06d}0Z"


def _refused(status: int, code: str, message: str) -> StorageRefused:
    kind: type[StorageRefused] = {404: NotFound, 409: AlreadyExists,
                                  412: ConditionFailed}.get(status, StorageRefused)
    return kind(f"{status} {code}: {message}", status=status, code=code)


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, (str, bool, float, bytes, uuid.UUID)):
        pass
    elif isinstance(value, int):
        if value not in _INT64:
            raise TypeError(f"{value} is too large to be cast to type Edm.Int64")
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError(f"property {name!r}: give a datetime in UTC (an aware one)")
    else:
        raise TypeError(f"property {name!r}: type {type(value).__name__} is not supported")
    if isinstance(value, str) and _utf16_units(value) > MAX_STRING_CHARACTERS:
        raise _refused(400, "PropertyValueTooLarge",
                       f"the value of {name!r} is larger than 64 KiB")
    if isinstance(value, bytes) and len(value) > 2 * MAX_STRING_CHARACTERS:
        raise _refused(400, "PropertyValueTooLarge",
                       f"the value of {name!r} is larger than 64 KiB")


def _check_key(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if _utf16_units(value) > MAX_KEY_UNITS:
        raise _refused(400, "KeyValueTooLarge", f"the {name} is larger than 1 KiB (UTF-16)")
    bad = sorted(set(value) & FORBIDDEN_KEY_CHARACTERS)
    if bad:
        raise _refused(400, "OutOfRangeInput", f"the {name} holds a forbidden character "
                       f"({', '.join(repr(c) for c in bad)})")


def _clean(entity: Mapping[str, Any]) -> dict[str, Any]:
    """The entity as storage would keep it (None left out), or the refusal storage answers."""
    for key in _KEYS:
        if key not in entity or entity[key] is None:
            raise _refused(400, "PropertiesNeedValue", f"the entity has no {key}")
        _check_key(key, entity[key])
    clean: dict[str, Any] = {}
    for name, value in entity.items():
        if value is None:
            continue
        if name == "Timestamp" or name.startswith("odata."):
            continue  # set by storage; the SDK drops it from what it sends too
        if len(name) > MAX_PROPERTY_NAME:
            raise _refused(400, "PropertyNameTooLong", f"property name {name[:20]!r}... is "
                           f"longer than {MAX_PROPERTY_NAME} characters")
        if name not in _KEYS:
            _check_value(name, value)
        clean[name] = copy.copy(value)
    if len(clean) + 1 > MAX_PROPERTIES:  # + Timestamp
        raise _refused(400, "TooManyProperties", f"the entity has {len(clean) + 1} properties "
                       f"(Timestamp included); at most {MAX_PROPERTIES}")
    if entity_bytes(clean) > MAX_ENTITY_BYTES:
        raise _refused(400, "EntityTooLarge", "the entity is larger than 1 MiB")
    return clean


def _payload_bytes(entity: Mapping[str, Any]) -> int:
    """About what one operation adds to a ``$batch`` body: its headers and JSON (with the
    ``@odata.type`` the adapter writes beside each string)."""
    size = _BATCH_PART_OVERHEAD
    for name, value in entity.items():
        if isinstance(value, str):
            size += len(json.dumps(value, ensure_ascii=False).encode()) + len(name) * 2 + 30
        elif isinstance(value, bytes):
            size += (len(value) * 4) // 3 + len(name) * 2 + 30
        else:
            size += len(name) + 40
    return size


@dataclass
class _Stored:
    properties: dict[str, Any]
    etag: str
    timestamp: datetime


# --- OData filters -------------------------------------------------------------------------


def substitute(filter: str, parameters: Mapping[str, Any] | None) -> str:
    """``@name`` words replaced by their literals, exactly as the SDK's
    ``_parameter_filter_substitution`` does (whole words between single spaces only)."""
    if not parameters:
        return filter
    words = filter.split(" ")
    for index, word in enumerate(words):
        if word.startswith("@"):
            value = parameters[word[1:]]
            words[index] = _literal(value)
    return " ".join(words)


def _literal(value: Any) -> str:
    if value is True or value is False:
        return str(value).lower()
    if isinstance(value, float):
        return str(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 32 else f"{value}L"
    if isinstance(value, datetime):
        return f"datetime'{value.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'"
    if isinstance(value, uuid.UUID):
        return f"guid'{value}'"
    if isinstance(value, bytes):
        return f"X'{value.hex()}'"
    return "'" + str(value).replace("'", "''") + "'"


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<open>\() | (?P<close>\)) |
      (?P<typed>(?:datetime|guid|X|binary)'(?:[^']|'')*') |
      (?P<string>'(?:[^']|'')*') |
      (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?[LlDdMmFf]?) |
      (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""", re.VERBOSE)
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: bool(a == b), "ne": lambda a, b: bool(a != b),
    "gt": lambda a, b: bool(a > b), "ge": lambda a, b: bool(a >= b),
    "lt": lambda a, b: bool(a < b), "le": lambda a, b: bool(a <= b),
}
_MISSING = object()

Predicate = Callable[[Mapping[str, Any]], bool]


class _Property:
    def __init__(self, name: str) -> None:
        self.name = name


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        found = _TOKEN.match(text, position)
        if found is None or found.end() == position:
            raise _refused(400, "InvalidInput", f"cannot parse the filter at {text[position:]!r}")
        kind = found.lastgroup or ""
        tokens.append((kind, found.group(kind)))
        position = found.end()
    return tokens


def _parse_value(kind: str, text: str) -> Any:
    if kind == "string":
        return text[1:-1].replace("''", "'")
    if kind == "typed":
        prefix, _, rest = text.partition("'")
        body = rest[:-1].replace("''", "'")
        if prefix == "datetime":
            stamp = datetime.fromisoformat(body.replace("Z", "+00:00"))
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
        if prefix == "guid":
            return uuid.UUID(body)
        return bytes.fromhex(body)
    if kind == "number":
        core = text.rstrip("LlDdMmFf")
        if text[-1:] in "Ll" or re.fullmatch(r"-?\d+", core):
            return int(core)
        return float(core)
    raise AssertionError(kind)


def _comparable(left: Any, right: Any) -> bool:
    """Storage compares values of one type only: any other comparison is false."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool)
    if isinstance(left, int) and isinstance(right, int):
        return True
    if isinstance(left, float) and isinstance(right, (int, float)):
        return True
    return type(left) is type(right) or (isinstance(left, datetime)
                                         and isinstance(right, datetime))


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.position = 0

    def peek_word(self) -> str | None:
        if self.position < len(self.tokens) and self.tokens[self.position][0] == "word":
            return self.tokens[self.position][1]
        return None

    def take(self) -> tuple[str, str]:
        if self.position >= len(self.tokens):
            raise _refused(400, "InvalidInput", "the filter ends too early")
        token = self.tokens[self.position]
        self.position += 1
        return token

    def parse(self) -> Predicate:
        predicate = self.disjunction()
        if self.position != len(self.tokens):
            raise _refused(400, "InvalidInput",
                           f"unexpected {self.tokens[self.position][1]!r} in the filter")
        return predicate

    def disjunction(self) -> Predicate:
        terms = [self.conjunction()]
        while self.peek_word() == "or":
            self.position += 1
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else (lambda e: any(t(e) for t in terms))

    def conjunction(self) -> Predicate:
        terms = [self.negation()]
        while self.peek_word() == "and":
            self.position += 1
            terms.append(self.negation())
        return terms[0] if len(terms) == 1 else (lambda e: all(t(e) for t in terms))

    def negation(self) -> Predicate:
        if self.peek_word() == "not":
            self.position += 1
            inner = self.negation()
            return lambda e: not inner(e)
        return self.primary()

    def primary(self) -> Predicate:
        kind, text = self.take()
        if kind == "open":
            inner = self.disjunction()
            if self.take()[0] != "close":
                raise _refused(400, "InvalidInput", "a parenthesis is not closed")
            return inner
        left = self.operand(kind, text)
        operator = self.take()
        if operator[0] != "word" or operator[1] not in _COMPARISONS:
            raise _refused(400, "InvalidInput", f"{operator[1]!r} is not a comparison")
        right = self.operand(*self.take())
        compare = _COMPARISONS[operator[1]]

        def predicate(entity: Mapping[str, Any]) -> bool:
            a = entity.get(left.name, _MISSING) if isinstance(left, _Property) else left
            b = entity.get(right.name, _MISSING) if isinstance(right, _Property) else right
            if a is _MISSING or b is _MISSING or not _comparable(a, b):
                return False
            return compare(a, b)

        return predicate

    def operand(self, kind: str, text: str) -> Any:
        if kind == "word":
            if text in ("true", "false"):
                return text == "true"
            return _Property(text)
        if kind in ("string", "typed", "number"):
            return _parse_value(kind, text)
        raise _refused(400, "InvalidInput", f"unexpected {text!r} in the filter")


def compile_filter(filter: str, parameters: Mapping[str, Any] | None = None) -> Predicate:
    """A predicate over an entity's properties (``Timestamp`` included) for an OData filter."""
    return _Parser(substitute(filter, parameters)).parse()


# --- the service and its tables -------------------------------------------------------------


class MemoryTables:
    """The tables of one fake storage account, on one clock."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._tables: dict[str, MemoryTable] = {}
        self._lock = threading.RLock()
        self._last_stamp: datetime | None = None

    def table(self, name: str) -> MemoryTable:
        """The table ``name``, made on first use (names are case-insensitive)."""
        if not _TABLE_NAME.match(name):
            raise _refused(400, "InvalidResourceName", f"{name!r} is not a valid table name")
        with self._lock:
            found = self._tables.get(name.lower())
            if found is None:
                found = self._tables[name.lower()] = MemoryTable(self, name)
            return found

    def stamp(self) -> datetime:
        """Storage's time for a write: the clock's, but always after the previous write's."""
        with self._lock:
            now = self.clock.now().astimezone(UTC)
            if self._last_stamp is not None and now <= self._last_stamp:
                now = self._last_stamp + timedelta(microseconds=1)
            self._last_stamp = now
            return now

    def date(self) -> datetime:
        """The ``Date`` header of an answer: the clock's time in whole seconds."""
        return self.clock.now().astimezone(UTC).replace(microsecond=0)


class MemoryTable:
    """One table in memory (thread-safe): the ``Table`` port."""

    def __init__(self, service: MemoryTables, name: str) -> None:
        self._service = service
        self._name = name
        self._rows: dict[tuple[str, str], _Stored] = {}
        self._lock = service._lock

    @property
    def name(self) -> str:
        return self._name

    # --- reads -------------------------------------------------------------------------------
    def get(self, partition_key: str, row_key: str, *,
            select: Sequence[str] | None = None) -> Row:
        with self._lock:
            stored = self._rows.get((partition_key, row_key))
            if stored is None:
                raise _refused(404, "ResourceNotFound", "The specified resource does not exist.")
            return _row(stored, select)

    def query(self, filter: str, *, parameters: Mapping[str, Any] | None = None,
              select: Sequence[str] | None = None, page_size: int | None = None,
              limit: int | None = None) -> Rows:
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size {page_size}: a page holds at least one row")
        matches = compile_filter(filter, parameters) if filter.strip() else (lambda _: True)

        def read() -> Iterator[Row]:
            with self._lock:  # the rows as they are when the query is answered
                rows.date = self._service.date()
                found = [_row(stored, select) for key, stored in sorted(self._rows.items())
                         if matches({**stored.properties, "Timestamp": stored.timestamp})]
            yield from found[:max(limit, 0)] if limit is not None else found

        rows = Rows(read())
        return rows

    def keys(self) -> list[tuple[str, str]]:
        """Every entity's keys, in key order (for tests)."""
        with self._lock:
            return sorted(self._rows)

    # --- writes ------------------------------------------------------------------------------
    def create(self, entity: Mapping[str, Any]) -> Written:
        return self._one(("create", entity, {}))

    def upsert(self, entity: Mapping[str, Any], *, mode: Mode = Mode.MERGE) -> Written:
        return self._one(("upsert", entity, {"mode": mode}))

    def update(self, entity: Mapping[str, Any], *, mode: Mode = Mode.MERGE,
               etag: str | None = None) -> Written:
        return self._one(("update", entity, {"mode": mode, "etag": etag}))

    def delete(self, partition_key: str, row_key: str, *, etag: str | None = None) -> None:
        keys = {"PartitionKey": partition_key, "RowKey": row_key}
        with contextlib.suppress(NotFound):  # absent is not an error (shared/storage/ports.py)
            self._one(("delete", keys, {"etag": etag}))

    def _one(self, operation: tuple[str, Mapping[str, Any], Mapping[str, Any]]) -> Written:
        with self._lock:
            stamp = self._service.stamp()
            rows = dict(self._rows)
            written = _apply(rows, operation, stamp)
            self._rows = rows
            return Written(written, None if written is None else stamp, self._service.date())

    def submit(self, operations: Sequence[Operation]) -> list[Written]:
        if not operations:
            return []
        normalized = [(op[0], op[1], op[2] if len(op) > 2 else {}) for op in operations]
        for kind, _, options in normalized:
            _check_options(kind, options)
        for index, (_, entity, _) in enumerate(normalized):
            if "PartitionKey" not in entity or "RowKey" not in entity:
                raise BatchRefused(f"operation {index} names no PartitionKey or RowKey",
                                   index=index, status=400, code="PropertiesNeedValue")
            if entity["PartitionKey"] != normalized[0][1]["PartitionKey"]:
                raise BatchRefused(f"operation {index} is on another partition than operation 0",
                                   index=index, status=400,
                                   code="CommandsInBatchActOnDifferentPartitions")
        if len(normalized) > MAX_BATCH_OPERATIONS:
            raise BatchRefused(f"{len(normalized)} operations: a transaction holds at most "
                               f"{MAX_BATCH_OPERATIONS}", index=None, status=400,
                               code="InvalidInput")
        if sum(_payload_bytes(entity) for _, entity, _ in normalized) >= MAX_BATCH_BYTES:
            raise BatchRefused("the transaction's payload is 4 MiB or more", index=None,
                               status=413, code="RequestBodyTooLarge")
        seen: set[str] = set()
        for index, (_, entity, _) in enumerate(normalized):
            if entity["RowKey"] in seen:
                raise BatchRefused(f"operation {index}: an entity appears once in a transaction",
                                   index=index, status=400, code="InvalidDuplicateRow")
            seen.add(entity["RowKey"])
        with self._lock:
            stamp = self._service.stamp()
            rows = dict(self._rows)
            etags: list[str | None] = []
            for index, operation in enumerate(normalized):
                try:
                    etags.append(_apply(rows, operation, stamp))
                except StorageRefused as exc:
                    raise BatchRefused(f"{index}:{exc}", index=index, status=exc.status,
                                       code=exc.code) from exc
            self._rows = rows  # all or nothing
            date = self._service.date()
            return [Written(etag, None if etag is None else stamp, date) for etag in etags]


def _check_options(kind: str, options: Mapping[str, Any]) -> None:
    if kind not in ("create", "upsert", "update", "delete"):
        raise ValueError(f"unknown transaction operation {kind!r}")
    unknown = set(options) - {"mode", "etag", "match_condition"}
    if unknown:
        raise ValueError(f"unknown transaction options {sorted(unknown)}")
    condition = options.get("match_condition")
    name = getattr(condition, "name", condition)
    if condition is not None and name not in ("IfNotModified", "Unconditionally"):
        raise ValueError(f"match_condition {condition!r} is not supported")
    if name == "IfNotModified" and not options.get("etag"):
        raise ValueError("match_condition IfNotModified needs an etag")
    if options.get("etag") and kind not in ("update", "delete"):
        raise ValueError(f"a {kind} takes no etag")


def _apply(rows: dict[tuple[str, str], _Stored],
           operation: tuple[str, Mapping[str, Any], Mapping[str, Any]],
           stamp: datetime) -> str | None:
    """Apply one operation to ``rows``; its new ETag (``None`` for a delete)."""
    kind, entity, options = operation
    _check_options(kind, options)
    if kind == "delete":
        for name in _KEYS:
            _check_key(name, entity.get(name))
    clean = _clean(entity) if kind != "delete" else dict(entity)
    key = (clean["PartitionKey"], clean["RowKey"])
    current = rows.get(key)
    etag = options.get("etag")
    mode = mode_of(options.get("mode") or Mode.MERGE)
    if kind == "create":
        if current is not None:
            raise _refused(409, "EntityAlreadyExists", "The specified entity already exists.")
    elif kind in ("update", "delete"):
        if current is None:
            raise _refused(404, "ResourceNotFound", "The specified resource does not exist.")
        if etag and etag != "*" and etag != current.etag:
            raise _refused(412, "UpdateConditionNotSatisfied",
                           "The update condition specified in the request was not satisfied.")
    if kind == "delete":
        del rows[key]
        return None
    properties = clean
    if current is not None and kind in ("upsert", "update") and mode == Mode.MERGE:
        properties = {**current.properties, **clean}
        if len(properties) + 1 > MAX_PROPERTIES:
            raise _refused(400, "TooManyProperties", "the merged entity has too many properties")
        if entity_bytes(properties) > MAX_ENTITY_BYTES:
            raise _refused(400, "EntityTooLarge", "the merged entity is larger than 1 MiB")
    new_etag = etag_of(stamp)
    rows[key] = _Stored(properties, new_etag, stamp)
    return new_etag


def _row(stored: _Stored, select: Sequence[str] | None) -> Row:
    if select:
        properties = {name: copy.copy(stored.properties[name]) for name in select
                      if name in stored.properties}
        timestamp = stored.timestamp if "Timestamp" in select else None
    else:
        properties = {name: copy.copy(value) for name, value in stored.properties.items()}
        timestamp = stored.timestamp
    return Row(properties, stored.etag, timestamp)


__all__ = ["MemoryTable", "MemoryTables", "compile_filter", "entity_bytes", "etag_of",
           "substitute"]
