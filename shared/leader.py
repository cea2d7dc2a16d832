"""One leadership term: drain the completions table and commit, fenced by the term's epoch.

A ``LeaderTerm`` holds the lease, the epoch it claimed, and a cache of the balances it read. It
is valid only while its fence holds: every transaction is conditional on the fence, so the cache
can never be acted on after a newer leader has written.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from shared import telemetry
from shared.app import LedgerApp
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
    Fence,
    LedgerSnapshot,
    LedgerWriteError,
    Outcome,
    OutcomeExists,
)
from shared.parking import ParkedKind, late_step_id

logger = logging.getLogger(__name__)

MAX_ACCOUNT_RETRIES = 3  # re-reads of accounts changed under the leader, per batch


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


@telemetry.traced("ledger.scan")
def ready_assessments(app: LedgerApp) -> list[Assessment]:
    """Every request the leader can decide now, in commit order (oldest last step first).

    Expiry compares storage's time of record with storage's time of the scan: one clock.
    """
    scan = app.completions.scan(fallback_now=app.wallclock())
    now = scan.storage_time + app.time_shift()
    timeout = timedelta(seconds=app.config.request_timeout_seconds)
    found = []
    for request_id, steps in scan.steps.items():
        assessment = assess(request_id, steps, now, timeout)
        if not assessment.decided and request_id in app.recently_decided:
            assessment = Assessment(request_id, Verdict.LATE, "request already ended",
                                    assessment.steps)
        found.append(assessment)
    ready = sorted((a for a in found if a.decided),
                   key=lambda a: (a.last_recorded_at, a.request_id))
    telemetry.record_scan(found, ready, now)
    return ready


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
                 balances: Mapping[str, AccountRow] | None = None) -> None:
        self.app = app
        self.lease = lease
        self.fence = fence
        self.balances: dict[str, AccountRow] = dict(balances or {})
        self.report = DrainReport(fence.epoch)

    @classmethod
    def begin(cls, app: LedgerApp, lease: HeldLease) -> LeaderTerm:
        """Claim the next epoch under ``lease``; reuse this process's balances if still current."""
        lease.ensure_can_start(app.config.storage_timeout_seconds)
        known = app.snapshot
        fence, continued = app.ledger.claim_epoch(f"{app.config.instance_id}/{lease.lease_id}",
                                                  app.wallclock(), known)
        telemetry.record_term_started(fence.epoch)
        logger.info("%s leads with epoch %d", app.config.instance_id, fence.epoch)
        lease.keep_renewing()
        return cls(app, lease, fence, known.balances if continued and known else None)

    def drain(self, budget_deadline: float,
              ready: list[Assessment] | None = None) -> DrainReport:
        """Commit every ready request until none is left or the budget (monotonic) runs out.

        ``ready`` is a scan made just before (it saves one). Raises ``LeadershipLost`` or
        ``FencedOut`` when leadership ends under it.
        """
        step_seconds = self.app.config.storage_timeout_seconds
        while True:
            if self.app.clock() >= budget_deadline:
                self.report.budget_exhausted = True
                return self.report
            self.lease.ensure_can_start(step_seconds)
            if ready is None:
                ready = ready_assessments(self.app)
                self.report.scans += 1
            if not ready:
                return self.report
            late = [a for a in ready if a.verdict is Verdict.LATE]
            for assessment in late:
                self._settle_late(assessment)
            for batch in plan_batches([a for a in ready if a.verdict is not Verdict.LATE]):
                if self.app.clock() >= budget_deadline:
                    self.report.budget_exhausted = True
                    return self.report
                self._commit(batch)
            ready = None  # committed everything seen: scan again for what arrived meanwhile

    def _commit(self, batch: list[Assessment]) -> None:
        step_seconds = self.app.config.storage_timeout_seconds
        pending = list(batch)
        # Each retry drops a late request or re-reads a changed account: bounded.
        for _ in range(len(batch) + MAX_ACCOUNT_RETRIES):
            if not pending:
                return
            self.lease.ensure_can_start(step_seconds)
            for account in sorted(set().union(*(_accounts(a) for a in pending))):
                if account not in self.balances:
                    self.balances[account] = self.app.ledger.read_account(account)
            outcomes, new_balances = self._decide(pending)
            self.lease.ensure_can_start(step_seconds)
            try:
                with telemetry.commit_transaction(pending, outcomes, self.lease.remaining(),
                                                  self.app.wallclock()):
                    result = self.app.ledger.commit(self.fence, outcomes, new_balances,
                                                    self.app.wallclock())
            except OutcomeExists as exc:
                late = next(a for a in pending if a.request_id == exc.request_id)
                pending.remove(late)
                self._settle_late(late)
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
            self.app.completions.delete(step for a in pending for step in a.steps)
            return
        raise LedgerWriteError(f"account rows kept changing under epoch {self.fence.epoch} "
                               "while it committed; is something other than the leader writing "
                               "the ledger table? Stop it; the next leader resumes")

    def _settle_late(self, late: Assessment) -> None:
        """Steps of a request that already has an outcome: park what contradicts it, drop the rest.

        Parking comes before the delete (and is idempotent), so a crash in between loses
        nothing: the next leader finds the rows again and parks them again.
        """
        decided = self.app.ledger.read_outcome(late.request_id)
        if decided is None:  # not decided after all (a cache from an older fence?): keep them
            logger.warning("request %s has no outcome; its steps are kept", late.request_id)
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
        self.app.completions.delete(late.steps)
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


def _outcome(assessment: Assessment, status: str, reason: str,
             legs: tuple[tuple[str, Decimal], ...] = ()) -> Outcome:
    return Outcome(assessment.request_id, status, reason, legs, assessment.operations,
                   assessment.expected_operations, assessment.step_contents)
