"""``FakeClock``: the app's ``Clock`` with time that moves only when told (or slept)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class FakeClock:
    """Monotonic and wall time that advance together, instantly.

    ``sleep(s)`` returns at once, ``s`` later on both clocks; ``advance(s)`` moves them without a
    sleep (another thread's time passing). ``sleeps`` lists every sleep asked for.
    """

    def __init__(self, start: datetime = EPOCH, monotonic_start: float = 1_000.0) -> None:
        if start.tzinfo is None:
            raise ValueError("the wall clock is in UTC: give an aware datetime")
        self._start = start.astimezone(UTC)
        self._monotonic_start = monotonic_start
        self._elapsed = 0.0
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic_start + self._elapsed

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if seconds > 0:  # as SystemClock: nothing for zero or less
                self._elapsed += seconds

    def advance(self, seconds: float) -> None:
        """Move both clocks ``seconds`` on (never back)."""
        if seconds < 0:
            raise ValueError(f"time does not go back ({seconds} s)")
        with self._lock:
            self._elapsed += seconds
