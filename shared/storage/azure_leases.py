"""``AzureBlobLease``: the elector's lock (``shared.election.lock.LeaseLock``) over a blob lease.

Each call is one ``BlobLeaseClient`` call, as the elector made them before it had a port:
acquire with the client's retries, renew and release with retries fitted to what is left of the
lease (``fit_retries``), so that a transient error costs a sub-second retry, never a stall past
the lease. Azure's exceptions are translated here into ``shared.errors``: a 409 or 412 (the lease
held under another id, breaking, broken, released) is ``ConditionFailed``, a 404 ``NotFound``,
timeouts, throttling and 5xx ``StorageUnavailable``, any other refusal ``StorageRefused``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError
from azure.storage.blob import BlobLeaseClient, ContainerClient

from shared.domain.leases import LeaseStatus
from shared.errors import (
    ConditionFailed,
    NotFound,
    StorageError,
    StorageRefused,
    StorageUnavailable,
)
from shared.storage.retries import fit_retries, is_transient, worst_case_seconds


def _error_code(exc: HttpResponseError) -> str | None:
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # the SDK gives an enum or a str
    return str(code) if code else None


def translate(exc: AzureError, what: str) -> StorageError:
    """The ``shared.errors`` exception for an SDK exception raised by a lease call."""
    reason = str(getattr(exc, "reason", None) or type(exc).__name__)
    if not isinstance(exc, HttpResponseError) or is_transient(exc):
        status = exc.status_code if isinstance(exc, HttpResponseError) else None
        return StorageUnavailable(f"{what}: {reason}", status=status)
    status, code = exc.status_code, _error_code(exc)
    message = f"{what}: {reason}" + (f" ({code})" if code else "")
    if status in (409, 412):
        return ConditionFailed(message, status=status, code=code)
    if status == 404:
        return NotFound(message, status=status, code=code)
    return StorageRefused(message, status=status, code=code)


class AzureBlobLease:
    """The lease of one blob. ``call_timeout_seconds``: one try of a call (the storage timeout)."""

    def __init__(self, container: ContainerClient, blob_name: str,
                 call_timeout_seconds: float = 5) -> None:
        self.container = container
        self.blob = container.get_blob_client(blob_name)
        self.call_timeout_seconds = call_timeout_seconds

    def __repr__(self) -> str:
        return f"AzureBlobLease({self.container.container_name}/{self.blob.blob_name})"

    def _lease(self, lease_id: str) -> BlobLeaseClient:
        return BlobLeaseClient(self.blob, lease_id=lease_id)

    def _fitted(self, within_s: float | None) -> dict[str, Any]:
        """Retries and per-try timeouts so that the call ends within ``within_s``."""
        if within_s is None:
            return {}
        budget = min(within_s, worst_case_seconds(self.call_timeout_seconds))
        return fit_retries(budget, self.call_timeout_seconds)

    def ensure_exists(self) -> None:
        try:
            with contextlib.suppress(ResourceExistsError):
                self.container.create_container()
            with contextlib.suppress(ResourceExistsError):  # exists, possibly leased: both fine
                self.blob.upload_blob(b"", overwrite=False)
        except AzureError as exc:
            raise translate(exc, f"creating {self!r}") from exc

    def acquire(self, duration_s: int, proposed_id: str) -> str:
        lease = self._lease(proposed_id)
        try:
            lease.acquire(lease_duration=int(duration_s))
        except AzureError as exc:
            raise translate(exc, f"acquiring the lease of {self!r}") from exc
        return str(lease.id)

    def renew(self, lease_id: str, *, within_s: float | None = None) -> None:
        try:
            self._lease(lease_id).renew(**self._fitted(within_s))
        except AzureError as exc:
            raise translate(exc, f"renewing lease {lease_id}") from exc

    def release(self, lease_id: str, *, within_s: float | None = None) -> None:
        try:
            self._lease(lease_id).release(**self._fitted(within_s))
        except AzureError as exc:
            raise translate(exc, f"releasing lease {lease_id}") from exc

    def break_lease(self, break_period_s: int | None = None) -> int:
        """End whoever's lease (an operator's or a test's tool, not the elector's): after
        ``break_period_s`` (default: what is left of it) nobody holds it. Returns the seconds
        until then."""
        try:
            return int(BlobLeaseClient(self.blob).break_lease(lease_break_period=break_period_s))
        except AzureError as exc:
            raise translate(exc, f"breaking the lease of {self!r}") from exc

    def state(self) -> LeaseStatus:
        try:
            props = self.blob.get_blob_properties()
        except AzureError as exc:
            error = translate(exc, f"reading the lease of {self!r}")
            if isinstance(error, NotFound):  # a blob not made yet is not leased
                return LeaseStatus()
            raise error from exc
        lease = props.lease
        return LeaseStatus(state=str(lease.state), status=str(lease.status),
                           duration=str(lease.duration) if lease.duration else None)
