"""The one clock: monotonic time and sleep for timing decisions, wall time only for display.

Every timing decision in the app (skip window, linger, renew deadlines, budgets, expiry waits)
reads ``Clock.monotonic`` and waits with ``Clock.sleep``, so tests drive them with a fake clock in
milliseconds. Wall time (``now``) is never used for a safety decision: a request's age and
deadline come from storage's own timestamps on its rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


class ComposedClock:
    """A clock from parts (tests, the simulator): each part defaults to the system clock's."""

    def __init__(self, monotonic: Callable[[], float] | None = None,
                 now: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        self._monotonic = monotonic or SYSTEM_CLOCK.monotonic
        self._now = now or SYSTEM_CLOCK.now
        self._sleep = sleep or SYSTEM_CLOCK.sleep

    def monotonic(self) -> float:
        return self._monotonic()

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    def now(self) -> datetime:
        return self._now()
