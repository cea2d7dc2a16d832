"""Storage service clients built from the ``AzureWebJobsStorage`` settings.

Locally ``AzureWebJobsStorage`` holds a connection string (``UseDevelopmentStorage=true`` or
Azurite's explicit one). In Azure it is identity-based:
``AzureWebJobsStorage__blobServiceUri``, ``__queueServiceUri``, ``__tableServiceUri`` (or
``__accountName``), ``__credential=managedidentity`` and
``__clientId`` for a user-assigned identity. No account key is ever needed in Azure.

``StorageClients`` also builds the storage ports on its service clients: ``open_table(name)``
(an ``AzureTable``) and ``open_queue(name)`` (an ``AzureQueue``); ``ensure_tables`` and
``ensure_queues`` create what is missing. Nothing above ``shared.storage`` touches an SDK client.

``request_hook`` is called with every HTTP request each client sends, retries included (azure-core's
``raw_request_hook``, honoured by the blob, queue and table SDKs alike): the hook for counting
storage calls (benchmarks). ``transport_factory`` replaces the HTTP transport under the SDKs'
retry policies (the fault layer of the tests and chaos runs, ``simulator/faults.py``).

Every client retries with the sub-second timings of ``shared/storage/retries.py``, never the SDKs'
defaults (a 15 s wait before a blob retry), so retries fit inside the lease.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceExistsError
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.transport import HttpTransport
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient, QueueServiceClient

from shared.config.settings import STORAGE_CONNECTION, ConfigError
from shared.storage.azure_queues import AzureQueue
from shared.storage.azure_tables import AzureTable
from shared.storage.errors import translating
from shared.storage.retries import (
    FIRST_BACKOFF_SECONDS,
    MAX_BACKOFF_SECONDS,
    RETRY_TOTAL,
    LeaseFitRetry,
)

# Azurite's well-known development account (public, documented, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def azurite_connection_string(host: str = "127.0.0.1", blob_port: int = 10000,
                              queue_port: int = 10001, table_port: int = 10002) -> str:
    """The explicit connection string of an Azurite instance."""
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://{host}:{blob_port}/{AZURITE_ACCOUNT};"
            f"QueueEndpoint=http://{host}:{queue_port}/{AZURITE_ACCOUNT};"
            f"TableEndpoint=http://{host}:{table_port}/{AZURITE_ACCOUNT};")


RequestHook = Callable[[PipelineRequest], None]  # type: ignore[type-arg]
TransportFactory = Callable[[float], HttpTransport]  # type: ignore[type-arg]


@dataclass(frozen=True)
class StorageClients:
    """The three service clients of one storage account.

    ``queue_options`` are the options the queue service client was built with (timeouts,
    retries, transport; not the request hook, which counts the app's own calls), for the
    queue clients ``open_queue`` builds.
    """

    blob: BlobServiceClient
    queue: QueueServiceClient
    table: TableServiceClient
    queue_options: Mapping[str, Any] = field(default_factory=dict)

    def open_table(self, name: str) -> AzureTable:
        """The ``Table`` port on table ``name`` (the table service client's pipeline: its
        timeouts, retries, transport and request hook)."""
        return AzureTable(self.table.get_table_client(name))

    def open_queue(self, name: str, *, raw: bool = False,
                   timeout_seconds: float | None = None) -> AzureQueue:
        """The ``MessageQueue`` port on queue ``name``: text encoded as the Functions host
        decodes it (base64), or moved as it is when ``raw``.

        Its client is built apart, with the queue service client's timeouts, retries and
        transport (``queue_options``) but without its request hook. ``timeout_seconds``: the
        per-try timeouts when ``queue_options`` name none.
        """
        options: dict[str, Any] = {}
        if timeout_seconds is not None:
            options.update(connection_timeout=timeout_seconds, read_timeout=timeout_seconds)
        options.update(self.queue_options)
        if "retry_policy" in options:
            # Each pipeline links its policies (``policy.next``) to the ones after them: a policy
            # object shared by two clients would send one client's requests down the other's
            # chain, and fail (``'_SansIOHTTPPolicyRunner' object has no attribute 'next'``)
            # while a new client's pipeline is being built on another thread.
            options["retry_policy"] = copy.copy(options["retry_policy"])
        client = QueueClient(self.queue.url, name, credential=self.queue.credential, **options)
        return AzureQueue(client, raw=raw)


def ensure_tables(clients: StorageClients, names: Iterable[str]) -> None:
    """Create the tables that do not exist yet (idempotent)."""
    with translating():
        for name in names:
            clients.table.create_table_if_not_exists(name)


def ensure_queues(clients: StorageClients, names: Iterable[str]) -> None:
    """Create the queues that do not exist yet (idempotent)."""
    with translating():
        for name in names:
            with contextlib.suppress(ResourceExistsError):
                clients.queue.create_queue(name)


class _Options:
    """The keyword arguments each service client is built with."""

    def __init__(self, timeout_seconds: float, request_hook: RequestHook | None,
                 transport_factory: TransportFactory | None) -> None:
        common: dict[str, Any] = {"connection_timeout": timeout_seconds,
                                  "read_timeout": timeout_seconds}
        if request_hook is not None:
            common["raw_request_hook"] = request_hook
        self.common = common
        self.timeout_seconds = timeout_seconds
        self.transport_factory = transport_factory

    def _with_transport(self, options: dict[str, Any]) -> dict[str, Any]:
        if self.transport_factory is not None:
            options["transport"] = self.transport_factory(self.timeout_seconds)
        return options

    def storage(self) -> dict[str, Any]:
        """Blob and queue (azure-storage retry policies)."""
        return self._with_transport({**self.common, "retry_policy": LeaseFitRetry()})

    def table(self) -> dict[str, Any]:
        """Tables (azure-core's retry policy: no sleep before the first retry, then 0.4 s)."""
        return self._with_transport({**self.common, "retry_total": RETRY_TOTAL,
                                     "retry_backoff_factor": FIRST_BACKOFF_SECONDS,
                                     "retry_backoff_max": MAX_BACKOFF_SECONDS})


def _without_hook(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "raw_request_hook"}


def clients_from_connection_string(connection_string: str, timeout_seconds: float = 5,
                                   request_hook: RequestHook | None = None,
                                   transport_factory: TransportFactory | None = None,
                                   ) -> StorageClients:
    """Clients for a connection string (Azurite or a key-based account outside Azure)."""
    if connection_string.strip().lower().startswith("usedevelopmentstorage=true"):
        connection_string = azurite_connection_string()
    options = _Options(timeout_seconds, request_hook, transport_factory)
    queue_options = options.storage()
    return StorageClients(
        blob=BlobServiceClient.from_connection_string(connection_string, **options.storage()),
        queue=QueueServiceClient.from_connection_string(connection_string, **queue_options),
        table=TableServiceClient.from_connection_string(connection_string, **options.table()),
        queue_options=_without_hook(queue_options),
    )


def _credential(env: Mapping[str, str]) -> TokenCredential:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    kind = env.get(f"{STORAGE_CONNECTION}__credential", "").strip().lower()
    client_id = env.get(f"{STORAGE_CONNECTION}__clientId", "").strip() or None
    if kind == "managedidentity":
        return ManagedIdentityCredential(client_id=client_id)
    return DefaultAzureCredential(managed_identity_client_id=client_id)


def clients_from_settings(env: Mapping[str, str], timeout_seconds: float = 5,
                          request_hook: RequestHook | None = None,
                          transport_factory: TransportFactory | None = None) -> StorageClients:
    """Clients from the app settings, as the Functions host reads ``AzureWebJobsStorage``."""
    connection_string = env.get(STORAGE_CONNECTION, "").strip()
    if connection_string:
        return clients_from_connection_string(connection_string, timeout_seconds, request_hook,
                                              transport_factory)
    prefix = f"{STORAGE_CONNECTION}__"
    account = env.get(prefix + "accountName", "").strip()
    uris = {service: env.get(f"{prefix}{service}ServiceUri", "").strip() or (
        f"https://{account}.{service}.core.windows.net" if account else "")
        for service in ("blob", "queue", "table")}
    missing = [service for service, uri in uris.items() if not uri]
    if missing:
        raise ConfigError(
            f"No storage connection: set {STORAGE_CONNECTION} to a connection string "
            f"(UseDevelopmentStorage=true for Azurite), or set {prefix}blobServiceUri, "
            f"{prefix}queueServiceUri and {prefix}tableServiceUri (or {prefix}accountName) with "
            f"{prefix}credential=managedidentity; missing: {', '.join(missing)}."
        )
    credential = _credential(env)
    options = _Options(timeout_seconds, request_hook, transport_factory)
    queue_options = options.storage()
    return StorageClients(
        blob=BlobServiceClient(uris["blob"], credential=credential, **options.storage()),
        queue=QueueServiceClient(uris["queue"], credential=credential, **queue_options),
        table=TableServiceClient(uris["table"], credential=credential, **options.table()),
        queue_options=_without_hook(queue_options),
    )
