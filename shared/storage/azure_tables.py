"""``AzureTable``: the ``Table`` port over the SDK's ``TableClient``.

Every call translates the SDK's exceptions (``shared/storage/errors.py``), lazily read query
pages included, so nothing of Azure's escapes. Transactions go through the app's own ``$batch``
codec (``shared/storage/transactions.py``), which answers as the SDK's ``submit_transaction``;
what the SDK would refuse before sending (no keys, two partitions) is refused here first, as
storage refuses it, with ``BatchRefused``.

Rows come back as ``Row``: plain values (an ``Edm.Int64`` is an ``int``, and an ``int`` beyond
32 bits is written as one), storage's ``etag`` and ``Timestamp`` as attributes. A write's
``Written`` carries storage's ``Date`` and the ``Timestamp`` its ETag carries (Table storage's
ETags, Azure's and Azurite's, are ``W/"datetime'2026-12-02T17%3A25%3A09.8022309Z'"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

from azure.core import MatchConditions
from azure.core.pipeline import PipelineResponse
from azure.data.tables import EdmType, EntityProperty, TableClient, TableEntity, UpdateMode

from shared.errors import BatchRefused
from shared.storage.errors import translating
from shared.storage.ports import Mode, Operation, Row, Rows, Written, mode_of
from shared.storage.transactions import submit_transaction

_ETAG_STAMP = re.compile(r"datetime'([^']+)'")
_KINDS = ("create", "upsert", "update", "delete")
_OPTIONS = frozenset({"mode", "etag", "match_condition"})
_INT32 = range(-(2**31), 2**31)


def parse_stamp(text: str) -> datetime:
    """Storage's ISO time (``2026-12-02T17:25:09.8022309Z``: up to seven digits) in UTC."""
    text = text.rstrip("Z")
    head, _, fraction = text.partition(".")
    stamp = datetime.fromisoformat(head + (f".{fraction[:6]:0<6}" if fraction else ""))
    return stamp.replace(tzinfo=UTC)


def stamp_of_etag(etag: str | None) -> datetime | None:
    """The ``Timestamp`` a Table storage ETag carries, or ``None`` when it carries none."""
    found = _ETAG_STAMP.search(unquote(etag or ""))
    if found is None:
        return None
    try:
        return parse_stamp(found.group(1))
    except ValueError:
        return None


def _date(value: Any) -> datetime | None:
    """A plain UTC ``datetime`` (not the SDK's subclass) from a header or metadata value."""
    if isinstance(value, datetime):
        return datetime.combine(value.date(), value.time(), value.tzinfo or UTC)
    if isinstance(value, str) and value:
        try:
            return parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
    return None


class _StorageDate:
    """A ``raw_response_hook`` that keeps the ``Date`` of storage's latest answer."""

    def __init__(self) -> None:
        self.latest: datetime | None = None

    def __call__(self, response: PipelineResponse) -> None:  # type: ignore[type-arg]
        found = _date(response.http_response.headers.get("Date"))
        if found is not None:
            self.latest = found


def _row(entity: TableEntity) -> Row:
    metadata = getattr(entity, "metadata", None) or {}
    stamp = metadata.get("timestamp")
    properties = {name: value.value if isinstance(value, EntityProperty) else value
                  for name, value in entity.items()}
    return Row(properties, str(metadata.get("etag") or ""),
               stamp if stamp is None else _date(stamp))


def _entity(entity: Mapping[str, Any]) -> dict[str, Any]:
    """The entity as the SDK takes it: an ``int`` beyond 32 bits as an ``Edm.Int64``."""
    return {name: EntityProperty(value, EdmType.INT64)
            if type(value) is int and value not in _INT32 else value
            for name, value in entity.items()}


def _written(meta: Mapping[str, Any], date: datetime | None = None) -> Written:
    etag = meta.get("etag")
    etag = str(etag) if etag else None
    return Written(etag, stamp_of_etag(etag), _date(meta.get("date")) or date)


def _condition(etag: str | None) -> dict[str, Any]:
    if etag:
        return {"etag": etag, "match_condition": MatchConditions.IfNotModified}
    return {"match_condition": MatchConditions.Unconditionally}


def _sdk_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The port's options of one operation, as the SDK (and the ``$batch`` codec) take them."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown transaction options {sorted(unknown)}")
    sdk: dict[str, Any] = {}
    if "mode" in options:
        sdk["mode"] = UpdateMode(mode_of(options["mode"]).value)
    etag = options.get("etag")
    condition = options.get("match_condition")
    condition_name = getattr(condition, "name", condition)
    if condition is not None and condition_name not in ("IfNotModified", "Unconditionally"):
        raise ValueError(f"match_condition {condition!r} is not supported")
    if condition_name == "IfNotModified" and not etag:
        raise ValueError("match_condition IfNotModified needs an etag")
    if kind in ("update", "delete") and etag:
        sdk.update(_condition(etag))
    elif etag:
        raise ValueError(f"a {kind} takes no etag")
    return sdk


class AzureTable:
    """The ``Table`` port over one ``TableClient``."""

    def __init__(self, client: TableClient) -> None:
        self.client = client

    @property
    def name(self) -> str:
        return str(self.client.table_name)

    def get(self, partition_key: str, row_key: str, *,
            select: Sequence[str] | None = None) -> Row:
        with translating():
            entity = self.client.get_entity(partition_key, row_key,
                                            **({"select": list(select)} if select else {}))
        return _row(entity)

    def query(self, filter: str, *, parameters: Mapping[str, Any] | None = None,
              select: Sequence[str] | None = None, page_size: int | None = None,
              limit: int | None = None) -> Rows:
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size {page_size}: a page holds at least one row")
        hook = _StorageDate()
        options: dict[str, Any] = {"raw_response_hook": hook}
        if parameters:
            options["parameters"] = dict(parameters)
        if select:
            options["select"] = list(select)
        if page_size is not None or limit is not None:
            options["results_per_page"] = min(page_size or 1000, limit or 1000, 1000)

        def read() -> Iterator[Row]:
            if limit is not None and limit <= 0:
                return
            count = 0
            with translating():
                for entity in self.client.query_entities(filter, **options):
                    rows.date = hook.latest
                    yield _row(entity)
                    count += 1
                    if limit is not None and count >= limit:
                        return
            rows.date = hook.latest  # storage answered with no row (or no more): its Date too

        rows = Rows(read())  # read() runs when iterated, with ``rows`` bound
        return rows

    def create(self, entity: Mapping[str, Any]) -> Written:
        hook = _StorageDate()
        with translating():
            meta = self.client.create_entity(_entity(entity), raw_response_hook=hook)
        return _written(meta, hook.latest)

    def upsert(self, entity: Mapping[str, Any], *, mode: Mode = Mode.MERGE) -> Written:
        hook = _StorageDate()
        with translating():
            meta = self.client.upsert_entity(_entity(entity), mode=UpdateMode(mode_of(mode).value),
                                             raw_response_hook=hook)
        return _written(meta, hook.latest)

    def update(self, entity: Mapping[str, Any], *, mode: Mode = Mode.MERGE,
               etag: str | None = None) -> Written:
        hook = _StorageDate()
        with translating():
            meta = self.client.update_entity(_entity(entity), mode=UpdateMode(mode_of(mode).value),
                                             raw_response_hook=hook, **_condition(etag))
        return _written(meta, hook.latest)

    def delete(self, partition_key: str, row_key: str, *, etag: str | None = None) -> None:
        with translating():  # the SDK answers a 404 with None: absent is not an error
            self.client.delete_entity(partition_key, row_key, **_condition(etag))

    def submit(self, operations: Sequence[Operation]) -> list[Written]:
        if not operations:
            return []
        sdk_operations: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        partition: Any = None
        for index, operation in enumerate(operations):
            kind, entity = operation[0], operation[1]
            options: Mapping[str, Any] = operation[2] if len(operation) > 2 else {}
            if kind not in _KINDS:
                raise ValueError(f"unknown transaction operation {kind!r}")
            if "PartitionKey" not in entity or "RowKey" not in entity:
                raise BatchRefused(f"operation {index} names no PartitionKey or RowKey",
                                   index=index, status=400, code="PropertiesNeedValue")
            if index == 0:
                partition = entity["PartitionKey"]
            elif entity["PartitionKey"] != partition:
                raise BatchRefused(f"operation {index} is on another partition than operation 0",
                                   index=index, status=400,
                                   code="CommandsInBatchActOnDifferentPartitions")
            sdk_operations.append((kind, _entity(entity), _sdk_options(kind, options)))
        hook = _StorageDate()
        with translating():
            results = submit_transaction(self.client, sdk_operations, raw_response_hook=hook)
        return [_written({"etag": result.get("etag")}, hook.latest) for result in results]
