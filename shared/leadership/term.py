"""One leadership term: commit the ready requests, fenced by the term's epoch.

A ``LeaderTerm`` holds the lease, the epoch it claimed, and a cache of the balances it read. It
is valid only while its fence holds: every transaction is conditional on the fence, so the cache
can never be acted on after a newer leader has written.

**What the leader reads.** Only the ready index (``ReadyView``): one partition of markers, each
naming a request that a recorder found decidable, with its steps. Requests still waiting for
steps are never read here, so a term's work does not grow with the backlog of incomplete
requests; the sweeper's rare full scan (``shared/leadership/sweeper.py``) finds what no marker
announces.
A verdict that depends on the deadline (expired, or steps cut off as late) is confirmed on a
fresh read of the request's rows first (one key range).

**What is serial.** Only the commit transactions, each conditional on the fence ETag the one
before returned. The account rows a round needs are read many at once (``ACCOUNT_READERS``
threads); consumed rows and markers are deleted in batches by background threads once their
outcome is durable (``shared/storage/cleanup.py``). A leader whose work keeps coming lingers
(``LINGER_SECONDS``) instead of releasing at once. docs/design.md 3.9 says why each is safe.

**Slow storage.** A read that failed with a transient error (a timeout, a reset, a 5xx) is tried
again within what the lease allows; what was read is kept (balances are cached for the term),
and requests whose accounts could not be read wait for the next round while the others commit.
A term is not thrown away for a read that timed out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import TypeVar

from shared.domain.model import (
    AccountRow,
    DecidedOutcome,
    Fence,
    LedgerSnapshot,
    Outcome,
    OutcomeStatus,
    RecordedStep,
)
from shared.domain.planning import (
    MAX_RECORDED_STEPS,
    AccountChanged,
    ClaimedElsewhere,
    LedgerWriteError,
    OutcomeExists,
    accounts_of,
    plan_batches,
)
from shared.domain.rules import (
    Assessment,
    InsufficientFunds,
    Verdict,
    apply_legs,
    contradiction,
)
from shared.election.elector import HeldLease
from shared.leadership import generations
from shared.leadership.exchange import Exchange
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import Publisher
from shared.leadership.reads import Failed, read_concurrently, tolerant
from shared.leadership.report import TermReport as TermReport  # re-exported
from shared.leadership.view import ReadyRequest, ReadyRound, ReadyView
from shared.observability import telemetry
from shared.storage.completions import Tombstone
from shared.storage.ledger import CommitResult, MapMoved
from shared.storage.parking import ParkedKind, late_step_id
from shared.storage.retries import is_transient

logger = logging.getLogger(__name__)
_Key = TypeVar("_Key")
_Row = TypeVar("_Row")

MAX_ACCOUNT_RETRIES = 3  # re-reads of accounts changed under the leader, per batch
LINGER_SECONDS = 0.25  # a leader whose work kept coming holds the lease this long once idle
POLL_SECONDS = 0.02  # between its reads while it lingers
READ_PASSES = 3  # tries of the reads a round needs before the round goes on without them
READ_BACKOFF_SECONDS = 0.2  # before the second pass, doubled for the third


class LeaderTerm:
    """The work of one leader between acquiring and releasing the lease."""

    def __init__(self, app: LedgerApp, lease: HeldLease, fence: Fence,
                 balances: Mapping[str, AccountRow] | None = None,
                 view: ReadyView | None = None) -> None:
        self.app = app
        self.lease = lease
        self.fence = fence
        self.balances: dict[str, AccountRow] = dict(balances or {})
        self.view = view or ReadyView(app)
        self.report = TermReport(fence.epoch)
        self.outbox = Publisher(app)  # outcome events: one outbox row per transaction

    @classmethod
    def begin(cls, app: LedgerApp, lease: HeldLease,
              view: ReadyView | None = None) -> LeaderTerm:
        """Claim the next epoch under ``lease``; reuse this process's balances if still current."""
        lease.ensure_can_start(app.config.storage_timeout_seconds)
        known = app.snapshot
        try:
            fence, continued = app.ledger.claim_epoch(
                f"{app.config.instance_id}/{lease.lease_id}", app.clock.now(), known)
        except MapMoved:
            # A reshard moved the map on: this process reads it again, and the invocation
            # ends (the next one routes by the new map).
            app.topology.reload()
            raise
        telemetry.record_term_started(fence.epoch)
        logger.info("%s leads with epoch %d", app.config.instance_id, fence.epoch)
        lease.keep_renewing()
        return cls(app, lease, fence, known.balances if continued and known else None, view)

    def commit_ready(self, budget_deadline: float,
                     ready: ReadyRound | None = None) -> TermReport:
        """Settle every ready request until none is left or the budget (monotonic) runs out.

        ``ready`` is a read of ``self.view`` made just before (it saves one). Once more than
        one round found work (work keeps coming), an empty read does not end the term at once:
        the leader keeps reading for ``LINGER_SECONDS`` first. Raises ``LeadershipLost`` or
        ``FencedOut`` when leadership ends under it.
        """
        try:
            return self._rounds(budget_deadline, ready)
        finally:  # a term ends with its consumed rows gone (or their deletes given up on)
            self.app.cleaner.wait_until_done(timeout=self.app.config.storage_timeout_seconds)
            self.outbox.finish()  # its events sent; then what earlier terms left

    def _rounds(self, budget_deadline: float, ready: ReadyRound | None) -> TermReport:
        step_seconds = self.app.config.storage_timeout_seconds
        rounds_with_work = 0
        idle_since: float | None = None
        while True:
            if self.app.clock.monotonic() >= budget_deadline:
                self.report.budget_exhausted = True
                return self.report
            self.lease.ensure_can_start(step_seconds)
            if ready is None:
                ready = self._retried(self.view.read)
                self.report.scans += 1
            if not ready:
                now = self.app.clock.monotonic()
                idle_since = now if idle_since is None else idle_since
                if rounds_with_work < 2 or now - idle_since >= LINGER_SECONDS:
                    return self.report
                self.app.clock.sleep(POLL_SECONDS)
                ready = None
                continue
            idle_since = None
            if not self._round(ready, budget_deadline):
                return self.report
            rounds_with_work += 1
            ready = None  # settled everything seen: read again for what arrived meanwhile

    def _round(self, ready: ReadyRound, budget_deadline: float) -> bool:
        """Settle one read's requests; False when the budget ran out."""
        if self.app.earlier_maps:  # after a reshard: steps recorded under an older map
            ready = self._forward_strays(ready)
        if ready.unconfirmed:
            self._resolve_unconfirmed(ready.unconfirmed)
        late = [r for r in ready.decidable if r.assessment.verdict is Verdict.LATE]
        for request in late:
            self.settle_late(request)
        to_commit = [r for r in ready.decidable if r.assessment.verdict is not Verdict.LATE]
        if self.app.earlier_maps:
            to_commit = self._undecided_before(to_commit)
        cross = [r for r in to_commit if self._crosses_shards(r.assessment)]
        if cross:
            to_commit = [r for r in to_commit if r not in cross]
        self.read_accounts({account for r in to_commit for account in accounts_of(r.assessment)})
        # Requests whose accounts could not be read (storage too slow) wait for the next round.
        readable = [r for r in to_commit if accounts_of(r.assessment) <= self.balances.keys()]
        if self.app.sharded:
            readable = self._claim_elsewhere(readable)
        by_id = {r.request_id: r for r in readable}
        for batch in plan_batches([r.assessment for r in readable], claims=self.app.sharded,
                                  **self.outbox.batch_limits()):
            # A term commits at least one batch whatever its budget: otherwise a budget shorter
            # than a round's reads would end every term before its first commit.
            if self.report.transactions and self.app.clock.monotonic() >= budget_deadline:
                self.report.budget_exhausted = True
                return False
            self._commit([by_id[a.request_id] for a in batch])
        emptied = True
        if cross or ready.flight.inbox or ready.resend:
            emptied = Exchange(self, ready).run(cross)
        if emptied and ready.mail is not None:
            self.app.shard.mail_seen = ready.mail  # its inbox as of that flag is done
        # The markers go now (the next read would meet them again); step rows once a
        # partition is half full, the rest when the term ends (``wait_until_done``).
        self.app.cleaner.flush(everything=False)
        return True

    def _forward_strays(self, ready: ReadyRound) -> ReadyRound:
        """Send the requests with rows recorded here under an older shard map to their home."""
        strays = [r for r in (*ready.decidable, *ready.unconfirmed)
                  if generations.is_stray(self.app, r)]
        if not strays:
            return ready
        for request in strays:
            logger.warning("request %s has steps recorded on shard %d under an older shard "
                           "map; they are forwarded to their home", request.request_id,
                           self.app.current)
            self.report.messaged |= generations.forward(self.app, request)
        return replace(ready, decidable=[r for r in ready.decidable if r not in strays],
                       unconfirmed=[r for r in ready.unconfirmed if r not in strays])

    def _undecided_before(self, requests: list[ReadyRequest]) -> list[ReadyRequest]:
        """Leave out (and settle as late) the requests decided under an earlier map generation:
        their outcome is on their home of then, which this shard may not be."""
        decided = generations.earlier_outcomes(self.app, requests)
        for request in requests:
            if request.request_id in decided:
                self.settle_late(request, decided[request.request_id])
        return [r for r in requests if r.request_id not in decided]

    def _request_shard(self, request_id: str) -> int:
        return self.app.shard_map.request_shard(request_id)

    def _claim_elsewhere(self, requests: list[ReadyRequest]) -> list[ReadyRequest]:
        """Claim, in their requestId's shard, the requests this shard decides for its accounts
        (one-step requests); those another shard claimed first are settled against its outcome.
        Returns the requests this shard may decide."""
        me = self.app.current
        foreign: dict[int, list[str]] = {}
        for request in requests:
            shard = self._request_shard(request.request_id)
            if shard != me:
                foreign.setdefault(shard, []).append(request.request_id)
        lost: dict[str, int] = {}
        for found in read_concurrently(lambda item: self.app.on(item[0]).ledger.claim(item[1], me),
                                       sorted(foreign.items())):
            lost.update(found)
        for request in requests:
            if request.request_id in lost:
                self._claimed_by(request, lost[request.request_id])
        return [r for r in requests if r.request_id not in lost]

    def _claims(self, batch: Iterable[ReadyRequest]) -> list[tuple[str, int]]:
        """The claims the commit of ``batch`` creates with its outcomes (see ``claim_entity``)."""
        me = self.app.current
        return [(r.request_id, me) for r in batch if self.app.sharded
                and self._request_shard(r.request_id) == me]

    def _claimed_by(self, request: ReadyRequest, home: int) -> None:
        """Another shard decides the request: its steps here are settled against that outcome."""
        logger.warning("request %s is decided by shard %d, not %d: its steps disagree on where "
                       "(expectedOperations, or the account of a one-step request)",
                       request.request_id, home, self.app.current)
        self.settle_against(request, home)

    def settle_against(self, request: ReadyRequest, home: int) -> None:
        """Settle the request's rows against its outcome on shard ``home``; while it has none
        (being coordinated, or claimed and not decided yet), the rows wait out of the rounds."""
        decided = self.app.on(home).ledger.read_outcome(request.request_id)
        if decided is None:
            self.app.shard.held.add(request.request_id)
            return
        self.settle_late(request, decided)

    def _crosses_shards(self, assessment: Assessment) -> bool:
        """A commit whose legs touch another shard's accounts (never with one shard)."""
        if not self.app.sharded or assessment.verdict is not Verdict.COMMIT:
            return False
        shard_map, me = self.app.shard_map, self.app.current
        return any(shard_map.account_shard(account) != me for account, _ in assessment.legs)

    # --- reads that survive slow storage ---------------------------------------------------------
    def _retried(self, read: Callable[[], _Row]) -> _Row:
        """``read()``, tried again after a transient failure while the lease allows."""
        for attempt in range(READ_PASSES):
            self.lease.ensure_can_start(self.app.config.storage_timeout_seconds)
            try:
                return read()
            except Exception as exc:
                if not is_transient(exc) or attempt == READ_PASSES - 1:
                    raise
                self.report.reads_retried += 1
                logger.warning("a read failed (%s); trying again", type(exc).__name__)
                self.app.clock.sleep(READ_BACKOFF_SECONDS * 2 ** attempt)
        raise AssertionError("unreachable")

    def _read_many(self, read: Callable[[_Key], _Row],
                   keys: Sequence[_Key]) -> dict[_Key, _Row]:
        """``read(key)`` for every key, ``ACCOUNT_READERS`` at a time, keeping what succeeded.

        Keys whose read failed transiently are tried again (``READ_PASSES`` passes in all,
        within the lease); those still failing are left out of the answer.
        """
        found: dict[_Key, _Row] = {}
        missing = list(keys)
        for attempt in range(READ_PASSES):
            if not missing:
                break
            if attempt:
                self.report.reads_retried += len(missing)
                self.app.clock.sleep(READ_BACKOFF_SECONDS * 2 ** (attempt - 1))
            self.lease.ensure_can_start(self.app.config.storage_timeout_seconds)
            failed: list[_Key] = []
            for key, result in zip(missing, read_concurrently(tolerant(read), missing),
                                   strict=True):
                if isinstance(result, Failed):
                    if not is_transient(result.error):
                        raise result.error
                    failed.append(key)
                else:
                    found[key] = result
            missing = failed
        if missing:
            logger.warning("%d read(s) kept failing; their requests wait for the next round",
                           len(missing))
        return found

    def read_accounts(self, accounts: Iterable[str]) -> None:
        """Read the balances not cached yet; what could not be read stays missing."""
        missing = sorted(a for a in set(accounts) if a not in self.balances)
        if missing:
            self.balances.update(self._read_many(self.app.ledger.read_account, missing))

    def _read_outcomes(self, request_ids: Sequence[str]) -> dict[str, DecidedOutcome | None]:
        """The outcome of each request that could be read (``None``: it has none)."""
        return self._read_many(self.app.ledger.read_outcome, list(request_ids))

    # --- settling --------------------------------------------------------------------------------
    def _commit(self, batch: list[ReadyRequest]) -> None:
        step_seconds = self.app.config.storage_timeout_seconds
        pending = list(batch)
        # Each retry drops a late request or re-reads a changed account: bounded.
        for _ in range(len(batch) + MAX_ACCOUNT_RETRIES):
            if not pending:
                return
            self.read_accounts(set().union(*(accounts_of(r.assessment) for r in pending)))
            unreadable = [r for r in pending
                          if not accounts_of(r.assessment) <= self.balances.keys()]
            pending = [r for r in pending if r not in unreadable]
            if not pending:
                return
            outcomes, new_balances = self._decide([r.assessment for r in pending])
            self.lease.ensure_can_start(step_seconds)
            try:
                now = self.app.clock.now()
                with telemetry.commit_transaction(
                        [r.request_id for r in pending], [o.status.value for o in outcomes],
                        [max(0.0, (now - r.assessment.last_recorded_at).total_seconds())
                         for r in pending],
                        [(s.traceparent, s.request_id, s.operation_id)
                         for r in pending for s in r.assessment.steps],
                        self.lease.remaining()):
                    result = self.app.ledger.commit(self.fence, outcomes, new_balances, now,
                                                    claims=self._claims(pending),
                                                    extra=self.outbox.stage(self.fence, now,
                                                                            outcomes))
            except OutcomeExists as exc:
                # Such requests rarely come alone (a leader that crashed with deletes queued
                # leaves many): look up the whole batch's outcomes at once, settle all found.
                decided = self._read_outcomes([r.request_id for r in pending])
                found = [r for r in pending if decided.get(r.request_id) is not None] or \
                    [next(r for r in pending if r.request_id == exc.request_id)]
                for late in found:
                    pending.remove(late)
                    self.settle_late(late, decided.get(late.request_id))
                continue
            except ClaimedElsewhere as exc:
                claimed = next(r for r in pending if r.request_id == exc.request_id)
                pending.remove(claimed)
                home = self.app.ledger.claimed_by(exc.request_id)
                if home is None or home == self.app.current:
                    # This shard claimed it: it is being coordinated (a round that did not
                    # read the work in flight). Its rows wait until it is decided.
                    self.app.shard.held.add(exc.request_id)
                    continue
                self._claimed_by(claimed, home)
                continue
            except AccountChanged as exc:
                logger.warning("%s; reading it again", exc)
                self.balances.pop(exc.account_id, None)
                continue
            self.landed(result)
            self._committed(pending, outcomes, result.accounts)
            return
        raise LedgerWriteError(f"account rows kept changing under epoch {self.fence.epoch} "
                               "while it committed; is something other than the leader writing "
                               "the ledger table? Stop it; the next leader resumes")

    def mark_released(self) -> None:
        """Just before the lease goes back: note the hand-over on the fence, so that the next
        claim is not shown as a takeover (``Ledger.mark_released``). The note changes the
        fence's ETag and nothing else, so a snapshot that was current stays current."""
        etag = self.app.ledger.mark_released(self.fence)
        if etag is None:
            return
        snapshot = self.app.snapshot
        if snapshot is not None and snapshot.etag == self.fence.etag:
            self.app.snapshot = replace(snapshot, etag=etag)
        self.fence = replace(self.fence, etag=etag)

    def landed(self, result: CommitResult) -> None:
        """A transaction of this term landed: the new fence, the balances it wrote."""
        self.fence = result.fence
        self.report.transactions += 1
        self.balances.update(result.accounts)
        self.outbox.landed(result)  # its events are sent, then its outbox row deleted
        # This term's own dict (the next term copies it): current while the fence's ETag is.
        self.app.snapshot = LedgerSnapshot(self.fence.epoch, self.fence.etag,
                                           self.fence.last_commit_at, self.balances)

    def _committed(self, batch: list[ReadyRequest], outcomes: list[Outcome],
                   accounts: Mapping[str, AccountRow]) -> None:
        """After a commit: report, settle the late rows, queue the consumed rows."""
        for outcome in outcomes:
            self.report.outcomes[outcome.status] += 1
        self.app.recently_decided.add(outcome.request_id for outcome in outcomes)
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.assessment.late:  # steps past the deadline: checked against the outcome
                self.report.parked_late_steps += self._park_contradictions(
                    request.assessment.late, self._as_decided(outcome))
        # The outcomes are durable: their rows may go now, in the background, batched.
        self.app.cleaner.delete((ref for r in batch for ref in r.consumed),
                                  [Tombstone(o.request_id, o.status) for o in outcomes])

    def _as_decided(self, outcome: Outcome) -> DecidedOutcome:
        """The outcome this term just wrote, as a read would return it."""
        return DecidedOutcome(outcome, self.fence.last_commit_at, self.fence.epoch,
                              self.fence.holder, len(outcome.steps) <= MAX_RECORDED_STEPS)

    def _resolve_unconfirmed(self, requests: list[ReadyRequest]) -> None:
        """Markers whose steps decide nothing: late steps of a decided request, or stale cues."""
        decided = self._read_outcomes([r.request_id for r in requests])
        if self.app.earlier_maps:
            decided.update(generations.earlier_outcomes(
                self.app, [r for r in requests if r.request_id in decided
                           and decided[r.request_id] is None]))
        for request in requests:
            if request.request_id not in decided:
                continue  # could not be read now: the marker stays for the next round
            outcome = decided[request.request_id]
            if outcome is not None:
                self.settle_late(request, outcome)
            else:  # not decidable yet: the recorder of its last step marks it again
                self.app.cleaner.delete([request.marker.ref])

    def settle_late(self, late: ReadyRequest, decided: DecidedOutcome | None = None) -> None:
        """Rows of a request that already has an outcome: park what contradicts it, drop the rest.

        Parking comes before the delete (and is idempotent), so a crash in between loses
        nothing: the next leader finds the rows again and parks them again. The delete itself
        is queued on ``app.cleaner`` like any consumed row.
        """
        decided = decided or self.app.ledger.read_outcome(late.request_id)
        if decided is None and self.app.earlier_maps:
            decided = generations.earlier_outcomes(self.app, [late]).get(late.request_id)
        if decided is None:
            if self.app.sharded:
                # Being coordinated across shards: its rows wait, out of the rounds, until it is
                # decided (the view lets them back once the coordination is gone).
                self.app.shard.held.add(late.request_id)
                return
            # Not decided after all (a cache from an older fence?): keep them
            logger.warning("request %s has no outcome; its steps are kept", late.request_id)
            return
        rows = late.assessment.rows
        parked = self._park_contradictions(rows, decided)
        if parked < len(rows):
            logger.debug("%d late step(s) of request %s, which already ended, dropped",
                         len(rows) - parked, late.request_id)  # counted in the term summary
        self.app.cleaner.delete(late.consumed,
                                  [Tombstone(late.request_id, decided.outcome.status)])
        self.app.recently_decided.add([late.request_id])
        self.report.late_requests.append(late.request_id)
        self.report.parked_late_steps += parked

    def _park_contradictions(self, steps: Iterable[RecordedStep],
                             decided: DecidedOutcome) -> int:
        parked = 0
        for step in steps:
            why = contradiction(decided, step)
            if why is None:
                continue
            self.app.parking.park(late_step_id(step.request_id, step.row_key),
                                  step.to_message().encode(), why, 0,
                                  self.app.config.instance_id, self.app.clock.now(),
                                  ParkedKind.LATE_CONTRADICTION)
            self.outbox.contradiction(late_step_id(step.request_id, step.row_key), why,
                                      decided, step.operation_id)
            parked += 1
        return parked

    def _decide(self, batch: Sequence[Assessment]) -> tuple[
            list[Outcome], dict[str, tuple[AccountRow, Decimal]]]:
        working = {account: row.balance for account, row in self.balances.items()}
        touched: set[str] = set()
        outcomes: list[Outcome] = []
        for assessment in batch:
            if assessment.verdict is not Verdict.COMMIT:
                outcomes.append(_outcome(assessment, OutcomeStatus(assessment.verdict.value),
                                         assessment.reason))
                continue
            try:
                changed = apply_legs(working, assessment.legs)
            except InsufficientFunds as exc:
                outcomes.append(_outcome(assessment, OutcomeStatus.REJECTED, str(exc)))
                continue
            working.update(changed)
            touched.update(changed)
            outcomes.append(_outcome(assessment, OutcomeStatus.COMMITTED, "", assessment.legs))
        new_balances = {account: (self.balances[account], working[account])
                        for account in sorted(touched)}
        return outcomes, new_balances


def _outcome(assessment: Assessment, status: OutcomeStatus, reason: str,
             legs: tuple[tuple[str, Decimal], ...] = ()) -> Outcome:
    return Outcome(assessment.request_id, status, reason, legs, assessment.operations,
                   assessment.expected_operations, assessment.step_contents)
