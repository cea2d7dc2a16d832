"""One leadership term: drain the completions table and commit, fenced by the term's epoch.

A ``LeaderTerm`` holds the lease, the epoch it claimed, and a cache of the balances it read. It
is valid only while its fence holds: every transaction is conditional on the fence, so the cache
can never be acted on after a newer leader has written.

The drain keeps one thing strictly serial: the commit transactions, each conditional on the
fence ETag the one before returned. Everything else is batched or runs beside them: the account
rows a round needs are read many at once (``ACCOUNT_READERS`` threads); consumed completion rows
are deleted in batches by background threads once their outcome is durable
(``shared/cleanup.py``); and after the first full scan the leader reads only rows stored since
the newest it has seen (``CompletionView``). A leader whose work keeps coming lingers
(``LINGER_SECONDS``) instead of releasing at once. docs/design.md says why each is safe.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from shared import telemetry
from shared.app import LedgerApp
from shared.completions import RecordedStep
from shared.decision import (
    Assessment,
    InsufficientFunds,
    Verdict,
    apply_legs,
    assess,
    contradiction,
)
from shared.election import HeldLease
from shared.ledger import (
    MAX_TRANSACTION_OPERATIONS,
    AccountChanged,
    AccountRow,
    DecidedOutcome,
    Fence,
    LedgerSnapshot,
    LedgerWriteError,
    Outcome,
    OutcomeExists,
)
from shared.parking import ParkedKind, late_step_id

logger = logging.getLogger(__name__)
_Row = TypeVar("_Row")

MAX_ACCOUNT_RETRIES = 3  # re-reads of accounts changed under the leader, per batch
ACCOUNT_READERS = 6  # concurrent point reads (the clients' connection pool holds 10)
LINGER_SECONDS = 0.25  # a leader whose work kept coming holds the lease this long once idle
POLL_SECONDS = 0.02  # between its reads while it lingers
FULL_SCAN_SECONDS = 30.0  # a long term re-reads the whole table at least this often
# An incremental read starts this long before the newest row already seen: it covers writes
# that storage stamped earlier but made visible later. A row missed anyway is found by the next
# full scan (at most FULL_SCAN_SECONDS later, and at every term's start and final look).
READ_OVERLAP = timedelta(seconds=1)


@dataclass
class DrainReport:
    """What one term did."""

    epoch: int
    outcomes: Counter[str] = field(default_factory=Counter)
    late_requests: list[str] = field(default_factory=list)
    parked_late_steps: int = 0  # late steps that contradicted their request's outcome
    transactions: int = 0
    scans: int = 0
    budget_exhausted: bool = False


class CompletionView:
    """The leader's picture of the completions table: a full scan, then incremental reads.

    Rows whose delete is already queued (``app.cleaner``) are left out, so a committed request
    is never proposed twice by the process that committed it, nor are rows it already deleted
    that a read racing with the delete returned (``RowCleaner.handled``).
    """

    def __init__(self, app: LedgerApp) -> None:
        self.app = app
        self.rows: dict[str, dict[tuple[str, str], RecordedStep]] = {}
        self.others_seen = False  # a row recorded by another instance was read
        self.since: datetime | None = None  # storage time the next incremental read starts at
        self.full_scan_at = float("-inf")  # time.monotonic() of the last full scan

    @telemetry.traced("ledger.scan")
    def read(self, full: bool = False) -> list[Assessment]:
        """Every request decidable now, oldest last step first, after reading what is new.

        ``full`` (or no earlier read, or ``FULL_SCAN_SECONDS`` since the last full scan) reads
        the whole table; otherwise only rows storage stamped at or after ``since``. Expiry
        compares storage's time of record with storage's time of the read: one clock.
        """
        app = self.app
        full = full or self.since is None or \
            time.monotonic() - self.full_scan_at >= FULL_SCAN_SECONDS
        scan = app.completions.scan(fallback_now=app.wallclock(),
                                    since=None if full else self.since)
        if full:
            self.rows = {}
            self.full_scan_at = time.monotonic()
        touched: set[str] = set()
        me = app.config.instance_id
        for request_id, steps in scan.steps.items():
            self.others_seen = self.others_seen or any(s.recorded_by != me for s in steps)
            fresh = [s for s in steps if not app.cleaner.handled(s)]
            if fresh:
                known = self.rows.setdefault(request_id, {})
                known.update(((s.partition_key, s.row_key), s) for s in fresh)
                touched.add(request_id)
        newest = scan.newest_record if scan.newest_record is not None else scan.storage_time
        mark = newest - READ_OVERLAP
        if self.since is None or mark > self.since:
            self.since = mark
        # A full read decides on everything (expiry included); an incremental one on the
        # requests it brought new rows for.
        candidates = self.rows.keys() if full else touched
        now = scan.storage_time + app.time_shift()
        timeout = timedelta(seconds=app.config.request_timeout_seconds)
        assessed = []
        for request_id in candidates:
            assessment = assess(request_id, list(self.rows[request_id].values()), now, timeout)
            if request_id in app.recently_decided:
                # This process decided it: whatever rows are still here are late (or their
                # delete failed); either way they are settled against the outcome.
                assessment = Assessment(request_id, Verdict.LATE, "request already ended",
                                        assessment.steps)
            assessed.append(assessment)
        ready = sorted((a for a in assessed if a.decided),
                       key=lambda a: (a.last_recorded_at, a.request_id))
        if full:  # the gauges describe the whole table: only a full read can set them
            telemetry.record_scan(assessed, ready, now)
        return ready

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop requests that were decided (their rows are being deleted)."""
        for request_id in request_ids:
            self.rows.pop(request_id, None)


def ready_assessments(app: LedgerApp) -> list[Assessment]:
    """Every request the leader can decide now, in commit order (oldest last step first).

    One full scan of the completions table (rows already being deleted left out).
    """
    return CompletionView(app).read(full=True)


def _accounts(assessment: Assessment) -> set[str]:
    return {account for account, _ in assessment.legs}


def plan_batches(ready: Sequence[Assessment]) -> list[list[Assessment]]:
    """Group requests into transactions of at most 100 operations (fence + outcomes + accounts)."""
    batches: list[list[Assessment]] = []
    batch: list[Assessment] = []
    accounts: set[str] = set()
    for assessment in ready:
        merged = accounts | _accounts(assessment)
        if batch and 1 + len(batch) + 1 + len(merged) > MAX_TRANSACTION_OPERATIONS:
            batches.append(batch)
            batch, merged = [], _accounts(assessment)
        batch.append(assessment)
        accounts = merged
    if batch:
        batches.append(batch)
    return batches


class LeaderTerm:
    """The work of one leader between acquiring and releasing the lease."""

    def __init__(self, app: LedgerApp, lease: HeldLease, fence: Fence,
                 balances: Mapping[str, AccountRow] | None = None,
                 view: CompletionView | None = None) -> None:
        self.app = app
        self.lease = lease
        self.fence = fence
        self.balances: dict[str, AccountRow] = dict(balances or {})
        self.view = view or CompletionView(app)
        self.report = DrainReport(fence.epoch)

    @classmethod
    def begin(cls, app: LedgerApp, lease: HeldLease,
              view: CompletionView | None = None) -> LeaderTerm:
        """Claim the next epoch under ``lease``; reuse this process's balances if still current."""
        lease.ensure_can_start(app.config.storage_timeout_seconds)
        known = app.snapshot
        fence, continued = app.ledger.claim_epoch(f"{app.config.instance_id}/{lease.lease_id}",
                                                  app.wallclock(), known)
        telemetry.record_term_started(fence.epoch)
        logger.info("%s leads with epoch %d", app.config.instance_id, fence.epoch)
        lease.keep_renewing()
        return cls(app, lease, fence, known.balances if continued and known else None, view)

    def drain(self, budget_deadline: float,
              ready: list[Assessment] | None = None) -> DrainReport:
        """Commit every ready request until none is left or the budget (monotonic) runs out.

        ``ready`` is a read of ``self.view`` made just before (it saves one). Once more than
        one round found work (work keeps coming), an empty read does not end the term at once:
        the leader keeps reading for ``LINGER_SECONDS`` first. Raises ``LeadershipLost`` or
        ``FencedOut`` when leadership ends under it.
        """
        try:
            return self._drain(budget_deadline, ready)
        finally:  # a term ends with its consumed rows gone (or their deletes given up on)
            self.app.cleaner.drain(timeout=self.app.config.storage_timeout_seconds)

    def _drain(self, budget_deadline: float, ready: list[Assessment] | None) -> DrainReport:
        step_seconds = self.app.config.storage_timeout_seconds
        rounds_with_work = 0
        idle_since: float | None = None
        while True:
            if self.app.clock() >= budget_deadline:
                self.report.budget_exhausted = True
                return self.report
            self.lease.ensure_can_start(step_seconds)
            if ready is None:
                ready = self.view.read()
                self.report.scans += 1
            if not ready:
                now = time.monotonic()
                idle_since = now if idle_since is None else idle_since
                if rounds_with_work < 2 or now - idle_since >= LINGER_SECONDS:
                    return self.report
                time.sleep(POLL_SECONDS)
                ready = None
                continue
            idle_since = None
            late = [a for a in ready if a.verdict is Verdict.LATE]
            rounds_with_work += len(late) < len(ready)
            for assessment in late:
                self._settle_late(assessment)
            batches = plan_batches([a for a in ready if a.verdict is not Verdict.LATE])
            self._read_accounts({account for batch in batches for a in batch
                                 for account in _accounts(a)})
            for batch in batches:
                if self.app.clock() >= budget_deadline:
                    self.report.budget_exhausted = True
                    return self.report
                self._commit(batch)
            # Partly filled buckets go now rather than wait for more: fewer rows outlive a crash.
            self.app.cleaner.flush()
            ready = None  # committed everything seen: read again for what arrived meanwhile

    def _read_accounts(self, accounts: Iterable[str]) -> None:
        """Read the balances not cached yet, ``ACCOUNT_READERS`` at a time."""
        missing = sorted(a for a in set(accounts) if a not in self.balances)
        if not missing:
            return
        self.lease.ensure_can_start(self.app.config.storage_timeout_seconds)
        for row in _read_concurrently(self.app.ledger.read_account, missing):
            self.balances[row.account_id] = row

    def _commit(self, batch: list[Assessment]) -> None:
        step_seconds = self.app.config.storage_timeout_seconds
        pending = list(batch)
        # Each retry drops a late request or re-reads a changed account: bounded.
        for _ in range(len(batch) + MAX_ACCOUNT_RETRIES):
            if not pending:
                return
            self._read_accounts(set().union(*(_accounts(a) for a in pending)))
            outcomes, new_balances = self._decide(pending)
            self.lease.ensure_can_start(step_seconds)
            try:
                with telemetry.commit_transaction(pending, outcomes, self.lease.remaining(),
                                                  self.app.wallclock()):
                    result = self.app.ledger.commit(self.fence, outcomes, new_balances,
                                                    self.app.wallclock())
            except OutcomeExists as exc:
                # Such requests rarely come alone (a leader that crashed with deletes queued
                # leaves many): look up the whole batch's outcomes at once, settle all found.
                decided = self._read_outcomes([a.request_id for a in pending])
                found = [a for a in pending if a.request_id in decided] or \
                    [next(a for a in pending if a.request_id == exc.request_id)]
                for late in found:
                    pending.remove(late)
                    self._settle_late(late, decided.get(late.request_id))
                continue
            except AccountChanged as exc:
                logger.warning("%s; reading it again", exc)
                self.balances.pop(exc.account_id, None)
                continue
            self.report.transactions += 1
            self.balances.update(result.accounts)
            # This term's own dict (the next term copies it): current while the fence's ETag is.
            self.app.snapshot = LedgerSnapshot(self.fence.epoch, self.fence.etag,
                                               self.fence.last_commit_at, self.balances)
            for outcome in outcomes:
                self.report.outcomes[outcome.status] += 1
            self.app.recently_decided.add(outcome.request_id for outcome in outcomes)
            # The outcomes are durable: their rows may go now, in the background, batched.
            self.view.forget(a.request_id for a in pending)
            self.app.cleaner.consumed(step for a in pending for step in a.steps)
            return
        raise LedgerWriteError(f"account rows kept changing under epoch {self.fence.epoch} "
                               "while it committed; is something other than the leader writing "
                               "the ledger table? Stop it; the next leader resumes")

    def _read_outcomes(self, request_ids: list[str]) -> dict[str, DecidedOutcome]:
        """The outcomes that exist among ``request_ids``, ``ACCOUNT_READERS`` reads at a time."""
        read = _read_concurrently(self.app.ledger.read_outcome, request_ids)
        return {request_id: decided for request_id, decided in
                zip(request_ids, read, strict=True) if decided is not None}

    def _settle_late(self, late: Assessment, decided: DecidedOutcome | None = None) -> None:
        """Steps of a request that already has an outcome: park what contradicts it, drop the rest.

        Parking comes before the delete (and is idempotent), so a crash in between loses
        nothing: the next leader finds the rows again and parks them again. The delete itself
        is queued on ``app.cleaner`` like any consumed row.
        """
        decided = decided or self.app.ledger.read_outcome(late.request_id)
        if decided is None:  # not decided after all (a cache from an older fence?): keep them
            logger.warning("request %s has no outcome; its steps are kept", late.request_id)
            self.view.forget([late.request_id])
            return
        parked = 0
        for step in late.steps:
            why = contradiction(decided, step)
            if why is None:
                continue
            self.app.parking.park(late_step_id(step.request_id, step.row_key), step.to_message(),
                                  why, 0, self.app.config.instance_id, self.app.wallclock(),
                                  ParkedKind.LATE_CONTRADICTION)
            parked += 1
        if parked < len(late.steps):
            logger.debug("%d late step(s) of request %s, which already ended, dropped",
                         len(late.steps) - parked, late.request_id)  # counted in the term summary
        self.view.forget([late.request_id])
        self.app.cleaner.consumed(late.steps)
        self.app.recently_decided.add([late.request_id])
        self.report.late_requests.append(late.request_id)
        self.report.parked_late_steps += parked

    def _decide(self, batch: Sequence[Assessment]) -> tuple[
            list[Outcome], dict[str, tuple[AccountRow, Decimal]]]:
        working = {account: row.balance for account, row in self.balances.items()}
        touched: set[str] = set()
        outcomes: list[Outcome] = []
        for assessment in batch:
            if assessment.verdict is not Verdict.COMMIT:
                outcomes.append(_outcome(assessment, assessment.verdict.value, assessment.reason))
                continue
            try:
                changed = apply_legs(working, assessment.legs)
            except InsufficientFunds as exc:
                outcomes.append(_outcome(assessment, Verdict.REJECTED.value, str(exc)))
                continue
            working.update(changed)
            touched.update(changed)
            outcomes.append(_outcome(assessment, "committed", "", assessment.legs))
        new_balances = {account: (self.balances[account], working[account])
                        for account in sorted(touched)}
        return outcomes, new_balances


def _read_concurrently(read: Callable[[str], _Row], keys: Sequence[str]) -> list[_Row]:
    """``read(key)`` for every key, in order, ``ACCOUNT_READERS`` point reads at a time."""
    if len(keys) == 1:
        return [read(keys[0])]
    with ThreadPoolExecutor(min(ACCOUNT_READERS, len(keys)),
                            thread_name_prefix="ledger-read") as pool:
        return list(pool.map(read, keys))


def _outcome(assessment: Assessment, status: str, reason: str,
             legs: tuple[tuple[str, Decimal], ...] = ()) -> Outcome:
    return Outcome(assessment.request_id, status, reason, legs, assessment.operations,
                   assessment.expected_operations, assessment.step_contents)
