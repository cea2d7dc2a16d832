"""The election: one acquire attempt, a term if elected, and the looks after the release.

``run_election`` is shared by the queue trigger (after it announced a request), the timer's
sweep and the lease alarm (``handle_wakeup``). Each step has one job: ``_attempt`` asks the
elector, ``_lead`` runs one term under the lease (alarm armed, epoch claimed, ready requests
committed, rows handed to the cleaner, lease released), ``_look`` reads the ready index once,
``_final_look`` waits out the skip windows this invocation's term opened and looks again. Every
wait and deadline reads the app's one clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from shared.domain.exchange import RESEND_SECONDS
from shared.election.elector import HeldLease, LeaseState, TermEnded
from shared.leadership import outbox
from shared.leadership.instance import LedgerApp
from shared.leadership.term import LeaderTerm, TermReport
from shared.leadership.view import ReadyView
from shared.leadership.wakeup import (
    WAKE_POLL_SECONDS,
    WAKE_WAIT_SECONDS,
    LeaseAlarm,
    publish_request,
    shard_of_alarm,
    wake_soon,
)
from shared.observability import telemetry

logger = logging.getLogger(__name__)

# A leader that keeps finding work after releasing goes round at most this many times per
# invocation; the drain budget bounds it in time as well.
MAX_TERMS_PER_INVOCATION = 20
# With shards, an invocation that sent messages to other shards then competes for their leases
# and acts on them (and on the answers), up to this many elections of other shards.
MAX_SHARD_VISITS = 64
IN_FLIGHT_TIMER = "work in flight between shards"
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
    terms: list[TermReport] = field(default_factory=list)
    stopped_by: str = ""  # why the last term ended early, if it did
    final_look: bool = False  # it looked once more after the skip window
    shard: int = 0
    visits: list[ElectionResult] = field(default_factory=list)  # other shards it then drove
    in_flight: bool = False  # its shard's coordinations still wait for other shards

    @property
    def messaged(self) -> set[int]:
        """The shards its terms sent messages to."""
        return {shard for term in self.terms for shard in term.messaged}

@telemetry.invocation("election")
def run_election(app: LedgerApp, handed_over: bool = False) -> ElectionResult:
    """One acquire attempt; if elected, commit, release, and look again for work left behind.

    Looking again after the release is what guarantees that work announced by an instance that
    exited early (because this one held the lease) is still committed: when the look finds
    work, this invocation competes for the lease again.

    ``handed_over`` (the queue trigger, right after it announced a request) lets the attempt be
    skipped within ``elector.skip_seconds`` of an earlier refusal (``LeaseElector.attempt``).
    Such a skipping instance announced work before its refusal, so a leader that saw another
    instance's work (or whose own process was refused meanwhile) looks once more,
    ``elector.skip_seconds`` after its release, when every window opened during its term has
    closed: whatever the skipping instances announced is in the index by then. It makes that
    final look even when its attempt after the first look was refused (docs/design.md 3.5).
    """
    election = Election(app)
    result = election.run(handed_over)
    if app.sharded:
        drive_shards(app, result, election.budget_deadline)
    return result


def drive_shards(app: LedgerApp, first: ElectionResult, deadline: float) -> None:
    """Compete for the shards this invocation sent messages to, and act on them, in turn.

    A shard's inbox is part of what its leader reads (``ReadyView``), so a shard whose lease is
    held by a live leader acts on the message itself: that leader's look after its release
    sees it. A shard nobody holds is taken here, so that no participant waits for the sweeper.
    Answers (votes, acks) bring the invocation back to the home shard the same way. Every
    visit shares ``deadline``, the invocation's one drain budget (monotonic).
    """
    queue = sorted(first.messaged)
    while queue and len(first.visits) < MAX_SHARD_VISITS:
        if app.clock.monotonic() >= deadline:
            wake_soon(app.wakeup_queue, app.config.instance_id, BUDGET_SPENT, queue[0])
            return
        shard = queue.pop(0)
        with telemetry.acting_for(shard):
            visit = Election(app.on(shard), deadline).run(False)
        first.visits.append(visit)
        queue += sorted(visit.messaged - set(queue))


class Election:
    """One invocation's part in the election: terms, looks after release, the final look."""

    def __init__(self, app: LedgerApp, deadline: float | None = None) -> None:
        """``deadline``: the invocation's (monotonic), when it already runs other elections."""
        self.app = app
        self.result = ElectionResult(Role.FOLLOWER, shard=app.current)
        self.budget_deadline = app.clock.monotonic() + app.config.drain_budget_seconds \
            if deadline is None else deadline
        self.started = app.clock.monotonic()
        self.others_seen = False
        self.released_at: float | None = None  # the clock's monotonic time of the release
        self.final_look_made = True  # nothing owed until this invocation releases a lease

    def run(self, handed_over: bool) -> ElectionResult:
        try:
            self._run(handed_over)
        finally:
            # Coordinations wait for other shards (even if this election failed after its
            # transaction landed): look again once they may need their messages sent again.
            self.result.in_flight = self.app.shard.in_flight
            if self.result.in_flight and self.result.stopped_by not in (BUDGET_SPENT,
                                                                        ROUNDS_SPENT):
                self._arm_in_flight_timer()
        if self.result.stopped_by in (BUDGET_SPENT, ROUNDS_SPENT):
            # Work may be left and nobody else may be coming: another invocation takes over.
            wake_soon(self.app.wakeup_queue,
                      self.app.config.instance_id, self.result.stopped_by, self.app.current)
        return self.result

    def _arm_in_flight_timer(self) -> None:
        """Coordinations still wait for other shards: look again once they may need a resend.

        A durable timer (a wake-up message with delayed visibility), so that a message lost
        with a crashed participant is sent again even when nothing else wakes this shard. One
        per shard and process at a time.
        """
        shard = self.app.shard
        now = self.app.clock.monotonic()
        if now < shard.timer_due:
            return
        delay = int(RESEND_SECONDS) + 1
        shard.timer_due = now + delay
        wake_soon(self.app.wakeup_queue, self.app.config.instance_id, IN_FLIGHT_TIMER,
                  self.app.current, delay)

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
            if self.app.clock.monotonic() >= self.budget_deadline:
                self.result.stopped_by = BUDGET_SPENT
                return
            if self._look() or self._final_look():
                continue  # work was announced meanwhile: compete for the lease again
            return
        self.result.stopped_by = ROUNDS_SPENT

    def _attempt(self, skippable: bool) -> HeldLease | None:
        """One acquire attempt (skipped, without a call, within a window a leader opened)."""
        with telemetry.lease_attempt() as span:
            attempt = self.app.elector.attempt(after_recording=skippable)
            span.result = attempt.outcome.value
        return attempt.lease

    def _lead(self, lease: HeldLease) -> bool:
        """One term under ``lease``; False when it ended early (the invocation then stops)."""
        app = self.app
        alarm = LeaseAlarm(app.wakeup_queue,
                           app.config.election.lease_seconds, lease.lease_id,
                           app.config.instance_id, shard=app.current)
        alarm.arm()
        lease.on_renewed = alarm.postpone
        view = ReadyView(app)
        report: TermReport | None = None
        term: LeaderTerm | None = None
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
            term = None  # deposed or lease lost: the next claim is a takeover, rightly
            return False
        finally:
            # Consumed rows go before the lease does, so the next leader does not meet them.
            app.cleaner.wait_until_done(timeout=app.config.storage_timeout_seconds)
            if term is not None and lease.state is LeaseState.LEADING:
                term.mark_released()  # a hand-over, not a takeover, for the next claim
            lease.release()
            if lease.state is LeaseState.RELEASED:
                alarm.disarm()  # a lease lost or not released keeps its alarm: it may expire
            self.released_at = app.clock.monotonic()
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
        clock = self.app.clock
        clock.sleep(self.released_at + self.app.elector.skip_seconds - clock.monotonic())
        return self._look()


@telemetry.invocation("wakeup")
def handle_wakeup(app: LedgerApp, body: bytes) -> ElectionResult:
    """A lease alarm came due: the holder may be gone. Compete until the work is done.

    The alarm comes due shortly before the lease would expire. While work waits in the ready
    index and another instance holds the lease, compete again every ``WAKE_POLL_SECONDS``, up
    to ``WAKE_WAIT_SECONDS``: a holder that stopped renewing loses its lease within that time.
    A holder that is alive commits the work itself (it then holds the lease all along).
    """
    if (handed := publish_request(body)) is not None:  # not an alarm: an outbox row to send
        shard, key = handed
        if shard < app.shard_map.shards:  # else a reshard removed it, sending its outbox first
            outbox.publish_handed_off(app.on(shard), key)
        return ElectionResult(Role.FOLLOWER, shard=shard)
    app = app.on(shard_of_alarm(body, len(app.shards)))
    deadline = app.clock.monotonic() + WAKE_WAIT_SECONDS
    while True:
        result = run_election(app)
        if result.role is Role.LEADER or not ReadyView(app).read():
            return result
        if app.clock.monotonic() >= deadline:
            logger.info("woken by a lease alarm, the lease stayed held for %g s while work "
                        "waited: its holder is alive and commits it", WAKE_WAIT_SECONDS)
            return result
        app.clock.sleep(WAKE_POLL_SECONDS)
