"""What to do about a storage error: the CLI's words for unreachable accounts and refused calls.

A refused call (403) names the data-plane role that the command needs on the service that refused
it and the ``az`` command that grants it; an account that cannot be reached names the endpoints
and the settings they come from.

Errors come as the app's ``StorageError`` (what ``shared.storage`` raises: its ``status``,
``code`` and ``failure`` say what happened, and the SDK's exception it was translated from, its
``__cause__``, says which request failed) or, from the calls still made on an SDK client (the
lease blob's), as Azure's own exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
)

from shared.config.settings import STORAGE_CONNECTION
from shared.errors import NO_CREDENTIAL, UNREACHABLE, StorageError
from shared.storage.clients import StorageClients

Failure = StorageError | AzureError

# The data-plane role each service needs for everything the CLI does on it (enqueue, replay and
# delete parked rows, read the lease blob). Owner, Contributor or Reader on the account are
# control-plane roles: they do not let anyone read or write the data.
ROLES = {
    "blob": "Storage Blob Data Contributor",
    "queue": "Storage Queue Data Contributor",
    "table": "Storage Table Data Contributor",
}
# Code of a 403 that a role (or a SAS with more permissions) fixes.
PERMISSION_CODES = {"AuthorizationPermissionMismatch"}


def _sdk(exc: Failure) -> AzureError | None:
    """The SDK's own exception: ``exc``, or the one a ``StorageError`` was translated from."""
    if isinstance(exc, AzureError):
        return exc
    return exc.__cause__ if isinstance(exc.__cause__, AzureError) else None


def problem(exc: Failure) -> str:
    """One line about a storage error (the SDK's text repeats the whole response)."""
    source = _sdk(exc)
    text = (source.message or source) if source is not None else exc
    first = (str(text).strip().splitlines() or [type(exc).__name__])[0]
    code = error_code(exc)
    return f"{first} ({code})" if code else first


def error_code(exc: Failure) -> str | None:
    """The storage error code (``AuthorizationPermissionMismatch``...) if the service sent one."""
    if isinstance(exc, StorageError):
        return exc.code
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # the SDKs give an enum or a str
    return str(code) if code else None


def status_of(exc: Failure) -> int | None:
    """The HTTP status storage answered with, if it answered."""
    if isinstance(exc, StorageError):
        return exc.status
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _bare(url: str) -> str:
    """A URL without its query (a SAS token is a secret) and trailing slash."""
    return url.split("?", 1)[0].rstrip("/")


def endpoints(clients: StorageClients) -> dict[str, str]:
    """The endpoint of each service, by service name (without any SAS token)."""
    return {service: _bare(client.url) for service, client in
            (("blob", clients.blob), ("queue", clients.queue), ("table", clients.table))}


def service_of(exc: Failure, clients: StorageClients) -> str | None:
    """Which service answered (``blob``, ``queue`` or ``table``), from the failed request's URL."""
    response = getattr(_sdk(exc), "response", None)
    url = _bare(str(getattr(getattr(response, "request", None), "url", "") or ""))
    for service, endpoint in endpoints(clients).items():
        if url and (url == endpoint or url.startswith(endpoint + "/")):
            return service
    return None


def account_name(endpoint: str) -> str:
    """The storage account in an endpoint URL (Azure's host name, or Azurite's first path part)."""
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    if host.count(".") >= 2 and not host.replace(".", "").isdigit():
        return host.split(".")[0]
    return parsed.path.strip("/").split("/")[0] or host


def grant_command(role: str, account: str) -> str:
    """The ``az`` command that gives the signed-in user ``role`` on the account."""
    return (f'az role assignment create --role "{role}" '
            '--assignee "$(az ad signed-in-user show --query id --output tsv)" '
            f'--scope "$(az storage account show --name {account} --query id --output tsv)"')


def explain(exc: Failure, clients: StorageClients, env: Mapping[str, str]) -> str:
    """The error message for a storage call that failed: what happened and what to do."""
    uses_connection_string = bool(env.get(STORAGE_CONNECTION, "").strip())
    status = status_of(exc)
    if isinstance(exc, ServiceRequestError) or (
            isinstance(exc, StorageError) and exc.failure == UNREACHABLE):
        where = ", ".join(f"{service} {url}" for service, url in endpoints(clients).items())
        setting = (STORAGE_CONNECTION if uses_connection_string
                   else f"{STORAGE_CONNECTION}__blobServiceUri/__queueServiceUri/__tableServiceUri")
        return (f"cannot reach the storage account ({where}): {problem(exc)}. Check {setting}, "
                "that the account exists and that this network may reach it (firewall, private "
                "endpoint); locally, start Azurite (./dev bootstrap, then npx azurite).")
    if (isinstance(exc, ClientAuthenticationError) and exc.status_code is None) or (
            isinstance(exc, StorageError) and exc.failure == NO_CREDENTIAL):
        return (f"could not sign in to storage: {problem(exc)}. Sign in with az login (the CLI "
                f"uses DefaultAzureCredential), or locally set {STORAGE_CONNECTION} to a "
                "connection string (UseDevelopmentStorage=true for Azurite).")
    if not isinstance(exc, HttpResponseError | StorageError) or status != 403:
        return f"storage call failed: {problem(exc)}"
    service = service_of(exc, clients)
    code = error_code(exc)
    if code not in PERMISSION_CODES or service is None:
        hint = ("the account's firewall refuses this network: allow your IP address "
                "(az storage account network-rule add) or run from an allowed network"
                if code == "AuthorizationFailure" else
                "check the credentials: the account key or SAS in the connection string, or "
                "your az login")
        return f"storage refused the call: {problem(exc)}; {hint}."
    role = ROLES[service]
    account = account_name(endpoints(clients)[service])
    who = ("the connection string's credentials (a SAS without the permission?) do not allow it: "
           f"use a SAS that does, or the identity-based settings with the role {role!r}"
           if uses_connection_string else
           f"the identity the CLI signs in with (az login, via DefaultAzureCredential) needs the "
           f"role {role!r} on the account {account!r} (Owner or Reader is not enough: data "
           "access needs a data-plane role)")
    return (f"the {service} service of {account!r} refused the call: {problem(exc)}. "
            f"{who[0].upper()}{who[1:]}. Grant the role with (it takes a few minutes to apply):\n"
            f"  {grant_command(role, account)}")
