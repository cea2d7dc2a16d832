"""What each trigger does: record a completion, announce it when ready, and run the election.

``handle_completion`` is the queue trigger's whole job; ``run_election`` is shared with the
timer-triggered sweeper and the wake-up alarm. All take a ``LedgerApp`` and nothing from the
Functions runtime.

A delivery that leaves its request decidable *announces* it (a marker in the ready index,
``CompletionStore.mark_ready``) and then competes for the lease; a delivery of a step that still
waits for others records it and returns. docs/design.md 3.5 says why nothing is stranded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from azure.core.exceptions import AzureError

from shared.domain.contract import Completion, MalformedMessage, parse_completion
from shared.domain.model import RecordedStep
from shared.domain.rules import assess
from shared.election.elector import HeldLease, LeaseState, TermEnded
from shared.leadership.instance import LedgerApp
from shared.leadership.sweeper import repair_scan
from shared.leadership.term import DrainReport, LeaderTerm, ReadyView
from shared.leadership.wakeup import WAKE_POLL_SECONDS, WAKE_WAIT_SECONDS, LeaseAlarm, wake_soon
from shared.observability import telemetry
from shared.storage.completions import MAX_ROWS_PER_OPERATION, Recorded, RecordResult
from shared.storage.parking import queue_depth

logger = logging.getLogger(__name__)

# A leader that keeps finding work after releasing goes round at most this many times per
# invocation; the drain budget bounds it in time as well.
MAX_TERMS_PER_INVOCATION = 20
BUDGET_SPENT = "drain budget exhausted"
ROUNDS_SPENT = f"{MAX_TERMS_PER_INVOCATION} terms in one invocation"


class Role(StrEnum):
    """How an invocation took part in the election."""

    FOLLOWER = "follower"  # another instance held the lease: exited early
    LEADER = "leader"  # held the lease at least once


@dataclass
class ElectionResult:
    """What one ``run_election`` did."""

    role: Role
    terms: list[DrainReport] = field(default_factory=list)
    stopped_by: str = ""  # why the last term ended early, if it did
    final_look: bool = False  # it looked once more after the skip window


@dataclass
class CompletionResult:
    """What one queue message did."""

    recorded: RecordResult | None
    parked: bool = False
    announced: bool = False  # its request was decidable: the ready index says so
    election: ElectionResult | None = None


@telemetry.invocation("queue")
def handle_completion(app: LedgerApp, body: bytes, message_id: str,
                      dequeue_count: int = 1) -> CompletionResult:
    """Record one completion message, announce its request if decidable, then try to lead.

    A malformed message is parked and acknowledged (it must not be retried into the poison
    queue). Storage errors while recording or announcing raise, so the host retries the
    message (a redelivery is a duplicate that announces again). Once announced, the message's
    job is done: an error while leading is logged, not raised, because the next leader (or the
    sweeper) resumes from the ready index.
    """
    try:
        completion = parse_completion(body)
    except MalformedMessage as exc:
        parked_id = message_id or hashlib.sha256(body).hexdigest()[:32]
        app.parking.park(parked_id, body, str(exc), dequeue_count, app.config.instance_id,
                         app.wallclock())
        return CompletionResult(recorded=None, parked=True)
    recorded = record_completion(app, completion)
    result = CompletionResult(recorded=recorded.result,
                              announced=announce_if_ready(app, completion, recorded))
    if not result.announced:
        return result  # nothing the leader can do yet: no lease attempt
    try:
        result.election = run_election(app, handed_over=True)
    except Exception:
        logger.exception("leading after recording %s/%s failed; the sweeper or the next leader "
                         "will resume", completion.request_id, completion.operation_id,
                         extra=telemetry.log_extra(requestId=completion.request_id))
    return result


def record_completion(app: LedgerApp, completion: Completion) -> Recorded:
    """Write the step's row (idempotent); the result says whether it was new."""
    with telemetry.span("ledger.record", requestId=completion.request_id,
                        operationId=completion.operation_id):
        recorded = app.completions.record(completion, app.config.instance_id, app.wallclock())
    telemetry.record_delivery(recorded.result.value, completion.request_id)
    return recorded


def announce_if_ready(app: LedgerApp, completion: Completion, recorded: Recorded) -> bool:
    """Mark the request ready when its rows decide it (or the step is late); True if so.

    The request's first step knows it is the request's only row (``Recorded.first``); any other
    delivery reads the request's rows (one key range) to judge. A step of a request decided a
    moment ago (its tombstone is in the range, or this process decided it) is announced too, so
    that the leader settles it at once instead of at expiry.
    """
    request_id = completion.request_id
    timeout = timedelta(seconds=app.config.request_timeout_seconds)
    step = recorded.step
    if recorded.first and step is not None:  # the request's only row: nothing else to read
        steps: list[RecordedStep] = [step]
        read_at: datetime | None = None
        truncated = late = False
        now = (recorded.storage_time or step.recorded_at) + app.time_shift()
    else:
        # More rows than the request can hold (two per operation it expects) decide it
        # already (too many steps): the read stops there.
        most = MAX_ROWS_PER_OPERATION * completion.expected_operations
        rows = app.completions.read_request(request_id, limit=most, fallback_now=app.wallclock())
        steps, truncated, late = rows.steps, rows.truncated, rows.decided
        now = read_at = rows.storage_time + app.time_shift()
    if not steps:
        return False  # its rows went meanwhile (the leader settled them)
    decidable = truncated or assess(request_id, steps, now, timeout).decided
    if not (decidable or late or request_id in app.recently_decided):
        return False
    app.completions.mark_ready(request_id, steps, read_at=read_at, truncated=truncated)
    return True


@telemetry.invocation("election")
def run_election(app: LedgerApp, handed_over: bool = False) -> ElectionResult:
    """One acquire attempt; if elected, commit, release, and look again for work left behind.

    Looking again after the release is what guarantees that work announced by an instance that
    exited early (because this one held the lease) is still committed: when the look finds
    work, this invocation competes for the lease again.

    ``handed_over`` (the queue trigger, right after it announced a request) lets the attempt be
    skipped within ``elector.skip_seconds`` of an earlier refusal (``LeaseElector.try_acquire``).
    Such a skipping instance announced work before its refusal, so a leader that saw another
    instance's work (or whose own process was refused meanwhile) looks once more,
    ``elector.skip_seconds`` after its release, when every window opened during its term has
    closed: whatever the skipping instances announced is in the index by then. It makes that
    final look even when its attempt after the first look was refused (docs/design.md 3.5).
    """
    return Election(app).run(handed_over)


class Election:
    """One invocation's part in the election: terms, looks after release, the final look."""

    def __init__(self, app: LedgerApp) -> None:
        self.app = app
        self.result = ElectionResult(Role.FOLLOWER)
        self.budget_deadline = app.clock() + app.config.drain_budget_seconds
        self.started = time.monotonic()
        self.others_seen = False
        self.released_at: float | None = None  # time.monotonic() of this invocation's release
        self.final_look_made = True  # nothing owed until this invocation releases a lease

    def run(self, handed_over: bool) -> ElectionResult:
        self._run(handed_over)
        if self.result.stopped_by in (BUDGET_SPENT, ROUNDS_SPENT):
            # Work may be left and nobody else may be coming: another invocation takes over.
            wake_soon(self.app.wakeup_queue,
                      self.app.config.instance_id, self.result.stopped_by)
        return self.result

    def _run(self, handed_over: bool) -> None:
        skippable = handed_over
        for _ in range(MAX_TERMS_PER_INVOCATION):
            lease = self._attempt(skippable)
            skippable = False  # a look that found work always competes
            if lease is None:
                # Refused (or skipped). A leader that released and then lost the race for the
                # lease still owes its final look: skipping instances may count on it.
                if self._final_look():
                    continue
                return
            self.result.role = Role.LEADER
            if not self._lead(lease):
                return
            if self.app.clock() >= self.budget_deadline:
                self.result.stopped_by = BUDGET_SPENT
                return
            if self._look() or self._final_look():
                continue  # work was announced meanwhile: compete for the lease again
            return
        self.result.stopped_by = ROUNDS_SPENT

    def _attempt(self, skippable: bool) -> HeldLease | None:
        elector = self.app.elector
        skipped_before = elector.skipped
        with telemetry.lease_attempt() as attempt:
            lease = attempt.done(elector.try_acquire(after_recording=skippable))
            if elector.skipped > skipped_before:
                attempt.result = "skipped"  # no call made: a leader was seen within the window
        return lease

    def _lead(self, lease: HeldLease) -> bool:
        """One term under ``lease``; False when it ended early (the invocation then stops)."""
        app = self.app
        alarm = LeaseAlarm(app.wakeup_queue,
                           app.config.election.lease_seconds, lease.lease_id,
                           app.config.instance_id)
        alarm.arm()
        lease.on_renewed = alarm.postpone
        view = ReadyView(app)
        report: DrainReport | None = None
        try:
            ready = view.read()
            if ready:  # otherwise no epoch is claimed and the lease goes straight back
                with telemetry.span("ledger.claim"):
                    term = LeaderTerm.begin(app, lease, view)
                self.result.terms.append(term.report)
                with telemetry.term() as term_span:
                    try:
                        report = term.commit_ready(self.budget_deadline, ready)
                    finally:
                        term_span.record(term.report.outcomes)
        except TermEnded as exc:
            logger.warning("%s stopped leading: %s", app.config.instance_id, exc,
                           extra=telemetry.log_extra())
            self.result.stopped_by = str(exc)
            return False
        finally:
            # Consumed rows go before the lease does, so the next leader does not meet them.
            app.cleaner.wait_until_done(timeout=app.config.storage_timeout_seconds)
            lease.release()
            if lease.state is LeaseState.RELEASED:
                alarm.disarm()  # a lease lost or not released keeps its alarm: it may expire
            self.released_at = time.monotonic()
            self.others_seen = self.others_seen or view.others_seen
            self.final_look_made = False
        if report is not None:
            if report.outcomes or report.late_requests:
                logger.info("epoch %d decided %s in %d transaction(s), %d late request(s) ignored",
                            report.epoch, dict(report.outcomes), report.transactions,
                            len(report.late_requests), extra=telemetry.log_extra())
            if report.budget_exhausted:
                self.result.stopped_by = BUDGET_SPENT
                return False
        return True

    def _look(self) -> bool:
        """Read the ready index once (after a release); True when it announces work."""
        view = ReadyView(self.app)
        found = bool(view.read())  # late steps to settle count as work
        self.others_seen = self.others_seen or view.others_seen
        return found

    def _owes_final_look(self) -> bool:
        """Another instance may be skipping attempts because this invocation held the lease."""
        return self.others_seen or self.app.elector.window_opened_at >= self.started

    def _final_look(self) -> bool:
        """Once the last skip window this invocation's term opened has closed: look again."""
        if self.final_look_made or self.released_at is None or not self._owes_final_look():
            return False
        self.final_look_made = True
        self.result.final_look = True
        time.sleep(max(0.0, self.released_at + self.app.elector.skip_seconds - time.monotonic()))
        return self._look()


@telemetry.invocation("timer")
def sweep(app: LedgerApp) -> ElectionResult:
    """The timer trigger's job: the poison queue's depth, the rare full scan, the election."""
    try:
        telemetry.record_poison_depth(queue_depth(
            app.raw_queue_client(app.config.poison_queue)))
    except AzureError as exc:
        logger.warning("could not read the depth of %s: %s", app.config.poison_queue, exc)
    repair_scan(app)
    return run_election(app)


@telemetry.invocation("wakeup")
def handle_wakeup(app: LedgerApp, body: bytes) -> ElectionResult:
    """A lease alarm came due: the holder may be gone. Compete until the work is done.

    The alarm comes due shortly before the lease would expire. While work waits in the ready
    index and another instance holds the lease, compete again every ``WAKE_POLL_SECONDS``, up
    to ``WAKE_WAIT_SECONDS``: a holder that stopped renewing loses its lease within that time.
    A holder that is alive commits the work itself (it then holds the lease all along).
    """
    deadline = time.monotonic() + WAKE_WAIT_SECONDS
    while True:
        result = run_election(app)
        if result.role is Role.LEADER or not ReadyView(app).read():
            return result
        if time.monotonic() >= deadline:
            logger.info("woken by a lease alarm, the lease stayed held for %g s while work "
                        "waited: its holder is alive and commits it", WAKE_WAIT_SECONDS)
            return result
        time.sleep(WAKE_POLL_SECONDS)
