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

from shared.app import LedgerApp
from shared.completions import RecordResult
from shared.contract import MalformedMessage, parse_completion
from shared.decision import Verdict
from shared.election import TermEnded
from shared.leader import CompletionView, DrainReport, LeaderTerm, ready_assessments

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
    recorded = app.completions.record(completion, app.config.instance_id, app.wallclock())
    try:
        election = run_election(app, after_delivery=True)
    except Exception:
        logger.exception("leading after recording %s/%s failed; the sweeper or the next leader "
                         "will resume", completion.request_id, completion.operation_id)
        election = None
    return CompletionResult(recorded=recorded, election=election)


def run_election(app: LedgerApp, after_delivery: bool = False) -> ElectionResult:
    """One acquire attempt; if elected, drain, release, and look again for work left behind.

    Looking again after the release is what guarantees that a completion recorded by an
    instance that exited early (because this one held the lease) is still committed: when the
    look finds ready work, this invocation competes for the lease again. The look comes
    ``elector.skip_seconds`` after the release: an instance refused while this one held the
    lease makes no attempt of its own for that long (``LeaseElector.try_acquire``), so every
    completion it recorded meanwhile is in the table by the time of the look.
    ``after_delivery`` (the queue trigger) allows that skip; the sweeper always attempts.
    """
    result = ElectionResult(Role.FOLLOWER)
    budget_deadline = app.clock() + app.config.drain_budget_seconds
    for _ in range(MAX_TERMS_PER_INVOCATION):
        lease = app.elector.try_acquire(skip_if_leader_seen=after_delivery)
        after_delivery = False  # a look that found work always competes
        if lease is None:
            return result
        result.role = Role.LEADER
        report: DrainReport | None = None
        try:
            view = CompletionView(app)
            ready = view.read(full=True)
            if ready:  # otherwise no epoch is claimed and the lease goes straight back
                term = LeaderTerm.begin(app, lease, view)
                result.terms.append(term.report)
                report = term.drain(budget_deadline, ready)
        except TermEnded as exc:
            logger.warning("%s stopped leading: %s", app.config.instance_id, exc)
            result.stopped_by = str(exc)
            return result
        finally:
            # Consumed rows go before the lease does, so the next leader does not meet them.
            app.cleaner.drain(timeout=app.config.storage_timeout_seconds)
            lease.release()
        released_at = time.monotonic()
        if report is not None:
            if report.outcomes or report.late_requests:
                logger.info("epoch %d decided %s in %d transaction(s)", report.epoch,
                            dict(report.outcomes), report.transactions)
            if report.budget_exhausted:
                result.stopped_by = "drain budget exhausted"
                return result
        # Released: look again for work recorded by instances that exited early meanwhile, once
        # the last of them (refused just before the release) has stopped skipping attempts.
        time.sleep(max(0.0, released_at + app.elector.skip_seconds - time.monotonic()))
        # Steps of requests this process already decided (late ones, or rows whose delete
        # failed) do not start a term of their own: the next leader or the sweeper settles them.
        if app.clock() >= budget_deadline or all(
                a.verdict is Verdict.LATE for a in ready_assessments(app)):
            return result
    return result
