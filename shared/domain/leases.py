"""What a lease looks like from outside: the plain view the lock port returns for the status page.

Pure data (the Azure adapter and the in-memory fake both return it); the port itself is
``shared.election.lock.LeaseLock``.
"""

from __future__ import annotations

from dataclasses import dataclass

INFINITE = -1  # a lease duration that never expires
MIN_LEASE_SECONDS = 15  # Azure's limits on a fixed-duration blob lease
MAX_LEASE_SECONDS = 60
MAX_BREAK_SECONDS = 60


@dataclass(frozen=True)
class LeaseStatus:
    """A blob lease as storage reports it.

    ``state``: available, leased, expired, breaking or broken; ``status``: locked (leased or
    breaking) or unlocked; ``duration``: fixed or infinite while locked, else ``None``.
    """

    state: str = "available"
    status: str = "unlocked"
    duration: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The JSON the read API shows (``duration`` only while there is one)."""
        view = {"state": self.state, "status": self.status}
        if self.duration:
            view["duration"] = self.duration
        return view
