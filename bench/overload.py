"""Overload: the drain's commit rate when storage is slow and reads time out, beside a clean run.

Every storage call of the draining instance goes through the fault layer
(``simulator.faults.FaultPlan``, mounted under the SDKs' retry policies as the tests mount it):

- ``clean``: every call 200 ms later (``DELAY_SECONDS``), nothing else;
- ``overloaded``: the same, and 20 % of the account and outcome reads (``CallKind.ACCOUNT_READ``,
  ``CallKind.OUTCOME_READ``; each try drawn anew) time out: the try hangs for
  ``STORAGE_TIMEOUT_SECONDS`` (1 here) and fails, the SDK tries again (three tries in all) and
  the leader retries what still failed (``shared/leadership/term.py``, "Slow storage").

Each cell, on fresh storage names: ``deposits`` single-step deposits over ``accounts`` accounts
are recorded and announced as instances do (``drain.record_bodies``: no faults, no latency); then
one instance runs elections one after another (what deliveries and the sweeper would start)
until every request is decided. Rate = decided / time from the first election's start to the
last commit. Cells alternate (clean, overloaded; then overloaded, clean; ...). Target:
overloaded / clean >= 0.25 (means over the rounds).

**Long terms.** Each term of the elections (``ElectionResult.terms``, a ``TermReport``) is
paired with how long its lease was held, acquire to release (``ElectionCallbacks``; the term's
epoch names its lease through the fence claim). The figure: how many terms held the lease
``LONG_TERM_SECONDS`` (10 s) or more, and whether each of them committed something (target: all).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.cells import Names, drop, leader_app, prepare
from bench.drain import record_bodies
from bench.workloads import account_name, deposit_body
from shared.election.elector import ElectionCallbacks, LeaseState
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from simulator.faults import CallKind, Fault, FaultPlan, TableNames

logger = logging.getLogger(__name__)

DELAY_SECONDS = 0.2  # added to every call, in both cells
TIMEOUT_PROBABILITY = 0.2  # of each try of an account or outcome read, overloaded cell only
STORAGE_TIMEOUT_SECONDS = 1
LONG_TERM_SECONDS = 10.0
GIVE_UP_SECONDS = 600.0  # a cell that has not decided everything by then reports what it did


@dataclass
class TermFigures:
    """One term: its epoch, how long its lease was held, what it committed."""

    epoch: int
    held_s: float | None  # None: its lease's acquire or release was not seen
    committed: int
    transactions: int
    reads_retried: int


@dataclass
class OverloadCell:
    """One drain: ``overloaded`` or ``clean``."""

    kind: str
    deposits: int
    accounts: int
    decided: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    elections: int = 0
    timeouts_injected: int = 0
    terms: list[TermFigures] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # by ``CallKind``

    @property
    def long_terms(self) -> list[TermFigures]:
        return [t for t in self.terms if t.held_s is not None and t.held_s >= LONG_TERM_SECONDS]


@dataclass
class OverloadResult:
    """Both kinds of cell, side by side, and the figures against the targets."""

    deposits: int
    accounts: int
    rounds: int
    delay_s: float = DELAY_SECONDS
    timeout_probability: float = TIMEOUT_PROBABILITY
    storage_timeout_s: float = STORAGE_TIMEOUT_SECONDS
    cells: list[OverloadCell] = field(default_factory=list)
    ratio: float | None = None  # overloaded rate / clean rate (target >= 0.25)
    long_terms: int = 0  # terms (all cells) that held the lease LONG_TERM_SECONDS or more
    long_terms_idle: int = 0  # of those, how many committed nothing (target: 0)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["long_term_seconds"] = LONG_TERM_SECONDS
        return data


class LeaseClock:
    """Election callbacks that time each lease held, and the epoch each term claimed on it.

    For one instance that leads in series: ``on_stopped_leading`` ends the lease that started
    last, whatever id it is given (after a successful release the SDK's lease client has
    dropped its id, and the callback gets ``"None"``).
    """

    def __init__(self) -> None:
        self.current = ""
        self.started: dict[str, float] = {}
        self.held: dict[str, float] = {}
        self.epochs: dict[int, str] = {}  # epoch -> lease id

    def callbacks(self) -> ElectionCallbacks:
        def started(lease_id: str) -> None:
            self.current = lease_id
            self.started[lease_id] = time.monotonic()

        def stopped(_lease_id: str, _state: LeaseState) -> None:
            if self.current in self.started and self.current not in self.held:
                self.held[self.current] = time.monotonic() - self.started[self.current]

        return ElectionCallbacks(on_started_leading=started, on_stopped_leading=stopped)

    def watch(self, app: LedgerApp) -> None:
        """Note which lease each epoch is claimed under (the fence's holder names it)."""
        claim = app.ledger.claim_epoch

        def noted(holder: str, *args: Any, **kwargs: Any) -> Any:
            fence, continued = claim(holder, *args, **kwargs)
            self.epochs[fence.epoch] = holder.rsplit("/", 1)[-1]
            return fence, continued

        app.ledger.claim_epoch = noted  # type: ignore[method-assign]

    def held_for(self, epoch: int) -> float | None:
        lease_id = self.epochs.get(epoch)
        return None if lease_id is None else self.held.get(lease_id)


def fault_plan(app_names: TableNames, overloaded: bool, seed: int) -> FaultPlan:
    """The cell's faults: the delay on every call; the timeouts when ``overloaded``."""
    plan = FaultPlan(app_names, seed=seed)
    plan.add(Fault.LATENCY, seconds=DELAY_SECONDS)
    if overloaded:
        plan.add(Fault.TIMEOUT, [CallKind.ACCOUNT_READ, CallKind.OUTCOME_READ],
                 probability=TIMEOUT_PROBABILITY, seconds=float(STORAGE_TIMEOUT_SECONDS))
    return plan


def drain_cell(connection_string: str, overloaded: bool, deposits: int, accounts: int,
               seed: int) -> OverloadCell:
    """Record an announced backlog, then drain it by elections through the cell's faults."""
    names = Names()
    cell = OverloadCell("overloaded" if overloaded else "clean", deposits, accounts)
    observer = leader_app(connection_string, names, names.probe(0), "observer")
    prepare(observer)
    record_bodies(connection_string, names,
                  [deposit_body(f"o{n:05d}", account_name(n % accounts), "1.00")
                   for n in range(deposits)])
    overrides = {"STORAGE_TIMEOUT_SECONDS": str(STORAGE_TIMEOUT_SECONDS)}
    plan = fault_plan(TableNames.of(observer.config), overloaded, seed)
    leases = LeaseClock()
    app = leader_app(connection_string, names, names.probe(0), "drainer", leases.callbacks(),
                     overrides, transport_factory=plan.transport)
    leases.watch(app)
    last_commit = [0.0]
    commit = app.ledger.commit

    def timed_commit(*args: Any, **kwargs: Any) -> Any:
        done = commit(*args, **kwargs)
        last_commit[0] = time.monotonic()
        return done

    app.ledger.commit = timed_commit  # type: ignore[method-assign]
    started = time.monotonic()
    while time.monotonic() - started < GIVE_UP_SECONDS:
        election = run_election(app)
        cell.elections += 1
        cell.terms += [TermFigures(t.epoch, leases.held_for(t.epoch),
                                   t.outcomes.get("committed", 0), t.transactions,
                                   t.reads_retried) for t in election.terms]
        cell.decided = len(observer.ledger.list_outcomes())  # unfaulted: outside the window
        if cell.decided >= deposits:
            break
    cell.seconds = (last_commit[0] or time.monotonic()) - started
    cell.rate = cell.decided / cell.seconds if cell.seconds > 0 else 0.0
    cell.timeouts_injected = plan.count(Fault.TIMEOUT)
    cell.calls = {str(kind): n for kind, n in sorted(plan.calls.items())}
    drop(connection_string, names)
    return cell


def measure_overload(connection_string: str, deposits: int, accounts: int,
                     rounds: int = 2) -> OverloadResult:
    """The benchmark; see the module docstring."""
    result = OverloadResult(deposits, accounts, rounds)
    for round_number in range(rounds):
        order = (False, True) if round_number % 2 == 0 else (True, False)
        for overloaded in order:
            cell = drain_cell(connection_string, overloaded, deposits, accounts,
                              seed=7 + round_number)
            logger.warning("overload: %s, %d deposits: %.1f/s, %d term(s), %d timeouts", cell.kind,
                           deposits, cell.rate, len(cell.terms), cell.timeouts_injected)
            result.cells.append(cell)

    def mean_rate(kind: str) -> float:
        return statistics.fmean([c.rate for c in result.cells if c.kind == kind])

    clean = mean_rate("clean")
    result.ratio = mean_rate("overloaded") / clean if clean else None
    long_terms = [t for c in result.cells for t in c.long_terms]
    result.long_terms = len(long_terms)
    result.long_terms_idle = sum(1 for t in long_terms if t.committed == 0)
    return result
