"""The archive container: blobs of archived ledger and parked rows, as JSON lines.

The retention step (``shared/leadership/retention.py``) uploads a batch here before it deletes
the rows. A blob's name is derived from its content (``batch_name``), so uploading the same
batch again (after a crash between upload and delete) writes the same blob with the same bytes:
overwriting is idempotent. Each line is one row: ``table``, ``PartitionKey``, ``RowKey``,
``Timestamp`` (storage's, ISO 8601), ``etag`` and the row's ``properties``, keys sorted. A
reader that meets a row in two blobs (a batch re-selected after a crash picked other rows too)
keeps one per (table, PartitionKey, RowKey, etag).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings

from shared.errors import NotFound
from shared.storage.errors import translating

CONTENT_TYPE = "application/x-ndjson"


@dataclass(frozen=True)
class ArchivedRow:
    """One row to archive: where it is, its version, and what it holds."""

    table: str
    partition: str
    row_key: str
    etag: str
    timestamp: datetime | None
    properties: Mapping[str, Any]

    def line(self) -> str:
        def plain(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, bytes):
                return value.hex()
            return value if isinstance(value, (str, int, float, bool)) or value is None \
                else str(value)

        return json.dumps({"table": self.table, "PartitionKey": self.partition,
                           "RowKey": self.row_key, "etag": self.etag,
                           "Timestamp": self.timestamp.isoformat() if self.timestamp else None,
                           "properties": {k: plain(v) for k, v in self.properties.items()
                                          if k not in ("PartitionKey", "RowKey")}},
                          sort_keys=True, separators=(",", ":"))


def batch_content(rows: Iterable[ArchivedRow]) -> bytes:
    """The blob's bytes: one line per row, in (table, partition, row key) order."""
    ordered = sorted(rows, key=lambda r: (r.table, r.partition, r.row_key))
    return "".join(row.line() + "\n" for row in ordered).encode("utf-8")


def batch_name(prefix: str, content: bytes) -> str:
    """A deterministic name: ``{prefix}/{sha256 of the content, 32 hex}.jsonl``."""
    return f"{prefix}/{hashlib.sha256(content).hexdigest()[:32]}.jsonl"


class ArchiveStore:
    """The archive container (``ARCHIVE_CONTAINER_NAME``)."""

    def __init__(self, container: ContainerClient) -> None:
        self.container = container

    @classmethod
    def of(cls, service: BlobServiceClient, name: str) -> ArchiveStore:
        return cls(service.get_container_client(name))

    def ensure(self) -> None:
        """Create the container if it is missing (Bicep creates it in Azure)."""
        with translating(), contextlib.suppress(ResourceExistsError):
            self.container.create_container()

    def put(self, name: str, content: bytes) -> None:
        """Upload (or overwrite with the same bytes) one batch."""
        with translating():
            self.container.upload_blob(name, content, overwrite=True,
                                       content_settings=ContentSettings(content_type=CONTENT_TYPE))

    def get(self, name: str) -> bytes | None:
        try:
            with translating():
                return self.container.download_blob(name).readall()
        except NotFound:
            return None

    def names(self, prefix: str = "") -> list[str]:
        try:
            with translating():
                return sorted(b.name for b in self.container.list_blobs(
                    name_starts_with=prefix or None))
        except NotFound:
            return []
