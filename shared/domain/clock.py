"""The one clock: monotonic time and sleep for timing decisions, wall time only for display.

Every timing decision in the app (skip window, linger, renew deadlines, budgets, expiry waits)
reads ``Clock.monotonic`` and waits with ``Clock.sleep``, so tests drive them with a fake clock in
milliseconds. Wall time (``now``) is never used for a safety decision: a request's age and
deadline come from storage's own timestamps on its rows.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """What the app needs of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for durations and deadlines)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait this long (a fake clock advances instead)."""
        ...

    def now(self) -> datetime:
        """The wall clock in UTC, for display and logs only."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.sleep`` and UTC wall time."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def now(self) -> datetime:
        return datetime.now(UTC)


SYSTEM_CLOCK = SystemClock()
