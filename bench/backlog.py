"""Requests waiting for their steps do not slow the hot path: with and without, side by side.

``waiting`` incomplete requests wait in the completions table: the withdraw legs of two-leg
transfers (``expectedOperations: 2``) whose add legs never come, recorded as instances record
them (``drain.record_bodies``: 16 threads, no injected latency; a request's first step needs no
marker, so none is announced). Then, at ``LATENCY_MS`` per call, each cell on fresh storage
names, with the waiting requests and without, alternating (without, with; then with, without;
...), so that drift on this shared machine falls on both alike:

- ``hot``: the hot-account cell of the strategy matrix (``cells.run_cell``: the leader, single-step
  deposits on one account, ``instances`` instances): committed requests/s. Target with/without
  >= 0.9.
- ``sequential``: ``deliveries`` deposits to one account delivered one after the other to one
  instance (``handle_completion``: record, announce, lead), each timed from its start to its
  return, after one warm-up delivery that is not counted: mean and worst seconds per delivery.
  Target with/without <= 1.2 for both.
- ``full_scan``: the sweeper's rare full scan (``repair_scan(app, force=True)``) of the waiting
  rows, timed alone once the cells are done. It runs at most once a minute per deployment
  (``FULL_SCAN_INTERVAL``) and never inside a measured window here: nothing in the cells calls the
  sweeper, and each cell's ``scans`` (the probe's full-scan calls in its window) says so.

Ratios compare the means over the rounds. A finished cell's tables are dropped.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.cells import Names, drop, leader_app, prepare, run_cell
from bench.drain import record_bodies
from bench.probe import KINDS
from bench.workloads import account_name, deposit_body, first_leg_body
from shared.leadership.intake import handle_completion
from shared.leadership.sweeper import repair_scan

logger = logging.getLogger(__name__)

LATENCY_MS = 8.0  # per storage call, as in the strategy matrix's Azure-like cells
INSTANCES = 16  # of the hot cell
DELIVERIES = 20  # sequential deliveries per cell
WAITING_ACCOUNTS = 1_000  # the waiting legs' accounts


@dataclass
class BacklogCell:
    """One measured cell: ``kind`` is ``hot`` or ``sequential``."""

    kind: str
    waiting: int
    record_seconds: float = 0.0  # recording the waiting requests (setup, not measured)
    rate: float = 0.0  # hot: committed requests/s
    committed: int = 0
    mean_s: float = 0.0  # sequential: seconds per delivery
    worst_s: float = 0.0
    deliveries: int = 0
    scans: int = 0  # full-scan calls inside the measured window (expected: none)
    calls: dict[str, int] = field(default_factory=dict)


@dataclass
class FullScan:
    """One forced full scan of the waiting rows."""

    waiting: int
    latency_ms: float
    seconds: float = 0.0
    rows: int = 0
    requests: int = 0
    announced: int = 0
    calls: dict[str, int] = field(default_factory=dict)


@dataclass
class BacklogResult:
    """The backlog benchmark: cells side by side, ratios, the full scan on its own."""

    waiting: int
    latency_ms: float
    instances: int
    deliveries: int
    rounds: int
    cells: list[BacklogCell] = field(default_factory=list)
    hot_ratio: float | None = None  # rate with / without (target >= 0.9)
    mean_ratio: float | None = None  # seconds per delivery with / without (target <= 1.2)
    worst_ratio: float | None = None
    full_scan: FullScan | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_waiting(connection_string: str, names: Names, waiting: int) -> float:
    """Record ``waiting`` first legs whose second legs never come; return the seconds taken."""
    started = time.monotonic()
    record_bodies(connection_string, names,
                  [first_leg_body(f"w{n:06d}", account_name(n % WAITING_ACCOUNTS), "1.00")
                   for n in range(waiting)])
    return time.monotonic() - started


def hot_cell(connection_string: str, waiting: int, instances: int, requests: int,
             seconds: float) -> BacklogCell:
    """The strategy matrix's hot-account cell, on names holding ``waiting`` waiting requests."""
    names = Names()
    cell = BacklogCell("hot", waiting)
    if waiting:
        cell.record_seconds = record_waiting(connection_string, names, waiting)
    measured = run_cell(connection_string, "leader", "hot", instances, LATENCY_MS, requests,
                        seconds, names=names)
    drop(connection_string, names)
    cell.rate, cell.committed, cell.calls = measured.rate, measured.committed, measured.calls
    cell.scans = measured.calls.get("scan", 0)
    return cell


def sequential_cell(connection_string: str, waiting: int, deliveries: int,
                    keep: bool = False) -> tuple[BacklogCell, Names]:
    """``deliveries`` deposits, one after the other, to one instance; timed one by one.

    ``keep``: leave the cell's tables (the full scan runs on them next).
    """
    names = Names()
    cell = BacklogCell("sequential", waiting, deliveries=deliveries)
    probe = names.probe(0)
    app = leader_app(connection_string, names, probe, "sequential")
    prepare(app)
    if waiting:
        cell.record_seconds = record_waiting(connection_string, names, waiting)
    probe.latency_ms = LATENCY_MS
    handle_completion(app, deposit_body("warm-up", "seq", "1.00"), uuid.uuid4().hex)
    probe.reset()
    took: list[float] = []
    for n in range(deliveries):
        started = time.monotonic()
        handle_completion(app, deposit_body(f"s{n:04d}", "seq", "1.00"), uuid.uuid4().hex)
        took.append(time.monotonic() - started)
    calls = probe.reset()
    probe.latency_ms = 0
    cell.mean_s, cell.worst_s = statistics.fmean(took), max(took)
    cell.calls = {kind: calls[kind] for kind in KINDS if calls.get(kind)}
    cell.scans = calls.get("scan", 0)
    cell.committed = sum(1 for o in app.ledger.list_outcomes()
                         if o.outcome.status == "committed" and o.outcome.request_id != "warm-up")
    if not keep:
        drop(connection_string, names)
    return cell, names


def time_full_scan(connection_string: str, names: Names, waiting: int) -> FullScan:
    """One forced full scan of ``names``' completion rows at ``LATENCY_MS`` per call."""
    probe = names.probe(LATENCY_MS)
    app = leader_app(connection_string, names, probe, "sweeper")
    probe.reset()  # the process's first read of the shard map is not the scan's
    scan = FullScan(waiting, LATENCY_MS)
    started = time.monotonic()
    report = repair_scan(app, force=True)
    scan.seconds = time.monotonic() - started
    calls = probe.reset()
    scan.calls = {kind: calls[kind] for kind in KINDS if calls.get(kind)}
    if report is not None:
        scan.rows, scan.requests, scan.announced = report.rows, report.requests, report.announced
    return scan


def _ratio(cells: list[BacklogCell], kind: str, figure: str, waiting: int) -> float | None:
    def mean(n: int) -> float:
        values = [getattr(c, figure) for c in cells if c.kind == kind and c.waiting == n]
        return statistics.fmean(values) if values else 0.0

    without = mean(0)
    return mean(waiting) / without if without else None


def measure_backlog(connection_string: str, waiting: int, requests: int, seconds: float,
                    rounds: int = 2, instances: int = INSTANCES,
                    deliveries: int = DELIVERIES) -> BacklogResult:
    """The benchmark; see the module docstring."""
    result = BacklogResult(waiting, LATENCY_MS, instances, deliveries, rounds)
    for round_number in range(rounds):
        order = (0, waiting) if round_number % 2 == 0 else (waiting, 0)
        for n in order:
            cell = hot_cell(connection_string, n, instances, requests, seconds)
            logger.warning("backlog: hot, %d waiting: %.0f/s", n, cell.rate)
            result.cells.append(cell)
        last = round_number == rounds - 1
        for n in order:
            sequential, names = sequential_cell(connection_string, n, deliveries,
                                                keep=last and n == waiting)
            logger.warning("backlog: sequential, %d waiting: mean %.3f s, worst %.3f s", n,
                           sequential.mean_s, sequential.worst_s)
            result.cells.append(sequential)
            if last and n == waiting:
                result.full_scan = time_full_scan(connection_string, names, waiting)
                drop(connection_string, names)
    result.hot_ratio = _ratio(result.cells, "hot", "rate", waiting)
    result.mean_ratio = _ratio(result.cells, "sequential", "mean_s", waiting)
    result.worst_ratio = _ratio(result.cells, "sequential", "worst_s", waiting)
    return result
