"""The lock the elector competes for: a small port over a lease (an Azure blob lease in production,
``tests.fakes.leases.MemoryLease`` in tests).

Errors are ``shared.errors``' only: a lease held under another id, or an operation the lease's
state refuses, raises ``ConditionFailed`` (HTTP 409 in Azure); a missing lease object raises
``NotFound``; anything transient ``StorageUnavailable``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from shared.domain.leases import INFINITE, LeaseStatus

__all__ = ["INFINITE", "LeaseLock", "LeaseStatus"]


@runtime_checkable
class LeaseLock(Protocol):
    """One lease that at most one holder has at a time."""

    def ensure_exists(self) -> None:
        """Create what the lease lives on (the blob and its container) if missing; idempotent."""
        ...

    def acquire(self, duration_s: int, proposed_id: str) -> str:
        """Take the lease for ``duration_s`` (15-60, or ``INFINITE``) under ``proposed_id``.

        Returns the lease id. Taking it again under the id that holds it renews it with the new
        duration. Raises ``ConditionFailed`` while another id holds it (or it is breaking),
        ``NotFound`` when the lease object does not exist.
        """
        ...

    def renew(self, lease_id: str, *, within_s: float | None = None) -> None:
        """Restart the lease's duration. Works after expiry if nobody took it meanwhile.

        ``within_s``: the call, retries included, must end within this many seconds.
        Raises ``ConditionFailed`` when ``lease_id`` no longer holds it (taken, broken, released).
        """
        ...

    def release(self, lease_id: str, *, within_s: float | None = None) -> None:
        """Give the lease back at once. Raises ``ConditionFailed`` under a wrong id."""
        ...

    def state(self) -> LeaseStatus:
        """The lease as storage reports it (available when the lease object does not exist)."""
        ...
