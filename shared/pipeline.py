"""What each trigger does: record a completion, then run the election (and drain if elected).

``handle_completion`` is the queue trigger's whole job; ``run_election`` is shared with the
timer-triggered sweeper. Both take a ``LedgerApp`` and nothing from the Functions runtime.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum

from azure.core.exceptions import AzureError

from shared import telemetry
from shared.app import LedgerApp
from shared.completions import RecordResult
from shared.contract import MalformedMessage, parse_completion
from shared.election import TermEnded
from shared.leader import CompletionView, DrainReport, LeaderTerm
from shared.parking import queue_depth

logger = logging.getLogger(__name__)

# A leader that keeps finding work after releasing goes round at most this many times per
# invocation; the drain budget bounds it in time as well.
MAX_TERMS_PER_INVOCATION = 20


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


@dataclass
class CompletionResult:
    """What one queue message did."""

    recorded: RecordResult | None
    parked: bool = False
    election: ElectionResult | None = None


@telemetry.invocation("queue")
def handle_completion(app: LedgerApp, body: bytes, message_id: str,
                      dequeue_count: int = 1) -> CompletionResult:
    """Record one completion message, then try to lead.

    A malformed message is parked and acknowledged (it must not be retried into the poison
    queue). Storage errors while recording raise, so the host retries the message. Once the
    completion is recorded the message's job is done: an error while leading is logged, not
    raised, because the next leader (or the sweeper) resumes from the table.
    """
    try:
        completion = parse_completion(body)
    except MalformedMessage as exc:
        parked_id = message_id or hashlib.sha256(body).hexdigest()[:32]
        app.parking.park(parked_id, body, str(exc), dequeue_count, app.config.instance_id,
                         app.wallclock())
        return CompletionResult(recorded=None, parked=True)
    with telemetry.span("ledger.record", requestId=completion.request_id,
                        operationId=completion.operation_id):
        recorded = app.completions.record(completion, app.config.instance_id, app.wallclock())
    telemetry.record_delivery(recorded.value, completion.request_id)
    try:
        election = run_election(app, recorded_a_row=recorded is not RecordResult.DUPLICATE)
    except Exception:
        logger.exception("leading after recording %s/%s failed; the sweeper or the next leader "
                         "will resume", completion.request_id, completion.operation_id,
                         extra=telemetry.log_extra(requestId=completion.request_id))
        election = None
    return CompletionResult(recorded=recorded, election=election)


@telemetry.invocation("election")
def run_election(app: LedgerApp, recorded_a_row: bool = False) -> ElectionResult:
    """One acquire attempt; if elected, drain, release, and look again for work left behind.

    Looking again after the release is what guarantees that a completion recorded by an
    instance that exited early (because this one held the lease) is still committed: when the
    look finds ready work, this invocation competes for the lease again.

    ``recorded_a_row`` (the queue trigger, when it wrote a row) lets the attempt be skipped
    within ``elector.skip_seconds`` of an earlier refusal (``LeaseElector.try_acquire``). Such a
    skipping instance wrote a row before its refusal, so a leader that read a row of another
    instance (or whose own process was refused meanwhile) looks once more,
    ``elector.skip_seconds`` after its release, when every window opened during its term has
    closed: whatever the skipping instances recorded is in the table by then. The sweeper
    always attempts.
    """
    result = ElectionResult(Role.FOLLOWER)
    budget_deadline = app.clock() + app.config.drain_budget_seconds
    others_seen = False
    for _ in range(MAX_TERMS_PER_INVOCATION):
        asked_at = time.monotonic()
        skipped_before = app.elector.skipped
        with telemetry.lease_attempt() as attempt:
            lease = attempt.done(app.elector.try_acquire(after_recording=recorded_a_row))
            if app.elector.skipped > skipped_before:
                attempt.result = "skipped"  # no call made: a leader was seen within the window
        recorded_a_row = False  # a look that found work always competes
        if lease is None:
            return result
        result.role = Role.LEADER
        report: DrainReport | None = None
        view = CompletionView(app)
        try:
            ready = view.read(full=True)
            if ready:  # otherwise no epoch is claimed and the lease goes straight back
                with telemetry.span("ledger.claim"):
                    term = LeaderTerm.begin(app, lease, view)
                result.terms.append(term.report)
                with telemetry.drain(term.report):
                    report = term.drain(budget_deadline, ready)
        except TermEnded as exc:
            logger.warning("%s stopped leading: %s", app.config.instance_id, exc,
                           extra=telemetry.log_extra())
            result.stopped_by = str(exc)
            return result
        finally:
            # Consumed rows go before the lease does, so the next leader does not meet them.
            app.cleaner.drain(timeout=app.config.storage_timeout_seconds)
            lease.release()
        released_at = time.monotonic()
        others_seen = others_seen or view.others_seen
        if report is not None:
            if report.outcomes or report.late_requests:
                logger.info("epoch %d decided %s in %d transaction(s), %d late request(s) ignored",
                            report.epoch, dict(report.outcomes), report.transactions,
                            len(report.late_requests), extra=telemetry.log_extra())
            if report.budget_exhausted:
                result.stopped_by = "drain budget exhausted"
                return result
        # Released: look again for work recorded by instances that exited early meanwhile.
        look = CompletionView(app)
        found = bool(look.read(full=True))  # late steps to settle count as work
        others_seen = others_seen or look.others_seen
        if not found and (others_seen or app.elector.window_opened_at >= asked_at):
            # Someone else recorded while this invocation led: it may have been refused and be
            # skipping attempts. Look again once the last such window has closed.
            time.sleep(max(0.0, released_at + app.elector.skip_seconds - time.monotonic()))
            found = bool(look.read(full=True))
        if app.clock() >= budget_deadline or not found:
            return result
    return result


@telemetry.invocation("timer")
def sweep(app: LedgerApp) -> ElectionResult:
    """The timer trigger's job: report the poison queue's depth, then run the election."""
    try:
        telemetry.record_poison_depth(queue_depth(
            app.raw_queue_client(app.config.poison_queue)))
    except AzureError as exc:
        logger.warning("could not read the depth of %s: %s", app.config.poison_queue, exc)
    return run_election(app)
