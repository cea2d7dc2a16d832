"""``MemoryLease``: the lock port (``shared.election.lock.LeaseLock``) in memory, on a given clock.

It behaves as Azure's documentation says a blob lease does (Lease Blob, "Outcomes of lease
operations on blobs by lease state"):

- states available, leased, expired, breaking, broken; status locked while leased or breaking;
  duration (fixed or infinite) while leased;
- durations 15-60 s or infinite (-1), anything else refused (400);
- acquire: from available, expired or broken under any id; while leased only under the id that
  holds it (which renews it with the new duration), else 409; never while breaking (409);
- renew: while leased under its id, or after expiry if nobody took it meanwhile; 409 otherwise
  (another id, available, breaking, broken);
- release: under its id from leased, expired, breaking or broken (-> available), else 409;
- break: a leased lease breaks after the break period, or what is left of it if shorter (an
  infinite one at once without a period); breaking -> broken when that time is up; an expired
  lease becomes available; nothing to break (available) is 409.

Refusals are ``shared.errors`` exceptions with Azure's status and error code. ``faults`` makes
the next call of an operation fail (a one-shot ``StorageError``); ``calls`` records each call.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from shared.domain.clock import Clock
from shared.domain.leases import (
    INFINITE,
    MAX_BREAK_SECONDS,
    MAX_LEASE_SECONDS,
    MIN_LEASE_SECONDS,
    LeaseStatus,
)
from shared.errors import ConditionFailed, NotFound, StorageError, StorageRefused

AVAILABLE, LEASED, EXPIRED = "available", "leased", "expired"
BREAKING, BROKEN = "breaking", "broken"


def _conflict(code: str, message: str) -> ConditionFailed:
    return ConditionFailed(f"{message} ({code})", status=409, code=code)


@dataclass
class _Lease:
    state: str = AVAILABLE
    lease_id: str | None = None
    duration: int = 0  # seconds, or INFINITE
    expires_at: float = 0.0  # while leased with a fixed duration
    broken_at: float = 0.0  # while breaking


class MemoryLease:
    """One lease in memory. ``exists=False``: its object (the blob) is created by
    ``ensure_exists``, and lease calls before that raise ``NotFound``."""

    def __init__(self, clock: Clock, exists: bool = True, name: str = "lease") -> None:
        self.clock = clock
        self.name = name
        self.exists = exists
        self.faults: dict[str, StorageError] = {}  # operation -> raised once by its next call
        self.calls: list[str] = []  # operation names, in call order
        self.budgets: list[float | None] = []  # the ``within_s`` of each renew and release
        self._lease = _Lease()
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryLease({self.name}: {self._lease.state})"

    # --- the port ------------------------------------------------------------------------------
    def ensure_exists(self) -> None:
        with self._mutex:
            self._call("ensure_exists")
            self.exists = True

    def acquire(self, duration_s: int, proposed_id: str | None = None) -> str:
        with self._mutex:
            self._call("acquire")
            lease = self._settled()
            if duration_s != INFINITE and not MIN_LEASE_SECONDS <= duration_s <= MAX_LEASE_SECONDS:
                raise StorageRefused(f"lease duration {duration_s} is not 15-60 or -1",
                                     status=400, code="InvalidHeaderValue")
            lease_id = proposed_id or str(uuid.uuid4())
            if lease.state == BREAKING:
                raise _conflict("LeaseIsBreakingAndCannotBeAcquired", "the lease is breaking")
            if lease.state == LEASED and lease.lease_id != lease_id:
                raise _conflict("LeaseAlreadyPresent", "there is already a lease present")
            self._take(lease_id, duration_s)
            return lease_id

    def renew(self, lease_id: str, *, within_s: float | None = None) -> None:
        with self._mutex:
            self._call("renew", within_s)
            lease = self._settled()
            self._check_id(lease, lease_id)
            if lease.state == BREAKING:
                raise _conflict("LeaseIsBreakingAndCannotBeRenewed", "the lease is breaking")
            if lease.state == BROKEN:
                raise _conflict("LeaseIsBrokenAndCannotBeRenewed", "the lease is broken")
            self._take(lease_id, lease.duration)  # leased, or expired and not taken since

    def release(self, lease_id: str, *, within_s: float | None = None) -> None:
        with self._mutex:
            self._call("release", within_s)
            lease = self._settled()
            self._check_id(lease, lease_id)
            self._lease = _Lease()  # the id is forgotten: it can no longer renew

    def state(self) -> LeaseStatus:
        with self._mutex:
            if not self.exists:
                return LeaseStatus()
            lease = self._settled()
            locked = lease.state in (LEASED, BREAKING)
            duration = None  # reported "when a blob is leased" only (not while breaking)
            if lease.state == LEASED:
                duration = "infinite" if lease.duration == INFINITE else "fixed"
            return LeaseStatus(lease.state, "locked" if locked else "unlocked", duration)

    # --- not in the port: an operator's tool -----------------------------------------------------
    def break_lease(self, break_period_s: int | None = None) -> int:
        """Break whoever's lease; return the seconds until it is broken."""
        with self._mutex:
            self._call("break")
            lease = self._settled()
            if break_period_s is not None and not 0 <= break_period_s <= MAX_BREAK_SECONDS:
                raise StorageRefused(f"break period {break_period_s} is not 0-60",
                                     status=400, code="InvalidHeaderValue")
            now = self.clock.monotonic()
            if lease.state == AVAILABLE:
                raise _conflict("LeaseNotPresentWithLeaseOperation", "there is no lease")
            if lease.state == EXPIRED:
                self._lease = _Lease()
                return 0
            if lease.state == BROKEN:
                return 0
            if lease.state == LEASED:
                left = float("inf") if lease.duration == INFINITE else lease.expires_at - now
                if break_period_s is None:
                    period = 0.0 if lease.duration == INFINITE else left
                else:
                    period = min(float(break_period_s), left)
            else:  # breaking: a shorter period brings the break forward
                left = lease.broken_at - now
                period = left if break_period_s is None else min(float(break_period_s), left)
            if period <= 0:
                lease.state = BROKEN
                return 0
            lease.state, lease.broken_at = BREAKING, now + period
            return int(period)

    # --- state ---------------------------------------------------------------------------------
    def _call(self, operation: str, within_s: float | None = None) -> None:
        self.calls.append(operation)
        if operation in ("renew", "release"):
            self.budgets.append(within_s)
        fault = self.faults.pop(operation, None)
        if fault is not None:
            raise fault
        if not self.exists and operation != "ensure_exists":
            raise NotFound(f"{self.name} does not exist (BlobNotFound)", status=404,
                           code="BlobNotFound")

    def _settled(self) -> _Lease:
        """The lease with the time that passed applied (expiry, the end of a break)."""
        lease, now = self._lease, self.clock.monotonic()
        if lease.state == LEASED and lease.duration != INFINITE and now >= lease.expires_at:
            lease.state = EXPIRED
        if lease.state == BREAKING and now >= lease.broken_at:
            lease.state = BROKEN
        return lease

    def _take(self, lease_id: str, duration_s: int) -> None:
        self._lease = _Lease(LEASED, lease_id, duration_s,
                             expires_at=self.clock.monotonic() + max(duration_s, 0))

    @staticmethod
    def _check_id(lease: _Lease, lease_id: str) -> None:
        if lease.state == AVAILABLE:
            raise _conflict("LeaseNotPresentWithLeaseOperation", "there is no lease")
        if lease.lease_id != lease_id:
            raise _conflict("LeaseIdMismatchWithLeaseOperation",
                            "the lease id does not match the lease's")
