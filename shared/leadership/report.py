"""``TermReport``: what one leadership term did (plain counts, for logs, tests and telemetry)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class TermReport:
    """What one term did."""

    epoch: int
    outcomes: Counter[str] = field(default_factory=Counter)
    late_requests: list[str] = field(default_factory=list)
    parked_late_steps: int = 0  # late steps that contradicted their request's outcome
    transactions: int = 0
    scans: int = 0
    budget_exhausted: bool = False
    reads_retried: int = 0  # reads that failed transiently and were tried again
    messaged: set[int] = field(default_factory=set)  # shards this term sent messages to
    messages: Counter[str] = field(default_factory=Counter)  # messages acted on, by kind
