"""The leader's view of the ready index: which announced requests it can settle now.

``ReadyView.read`` reads the ready index (one partition of markers), leaves out what this
process already handed to the cleaner, assesses each request from its marker's steps, confirms
verdicts that depend on the deadline on a fresh read of the request's rows, and sorts the
requests into a ``ReadyRound``. Each of those is one method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared.domain.exchange import RESEND_SECONDS, Coordination, Flight
from shared.domain.model import RowRef
from shared.domain.rules import (
    EXPIRY_GRACE,
    Assessment,
    Verdict,
    assess,
    deadline_of,
    depends_on_deadline,
)
from shared.leadership.instance import LedgerApp
from shared.leadership.reads import read_concurrently
from shared.observability import telemetry
from shared.storage.completions import ReadyMarker


@dataclass(frozen=True)
class ReadyRequest:
    """A request the leader can settle now: the verdict, and the marker that announced it."""

    assessment: Assessment
    marker: ReadyMarker

    @property
    def request_id(self) -> str:
        return self.assessment.request_id

    @property
    def consumed(self) -> list[RowRef]:
        """Every row version the decision consumes, and the marker."""
        return [step.ref for step in self.assessment.rows] + [self.marker.ref]


@dataclass
class ReadyRound:
    """What one read of the ready index (and, with shards, of the work in flight) found."""

    decidable: list[ReadyRequest] = field(default_factory=list)  # oldest last step first
    unconfirmed: list[ReadyRequest] = field(default_factory=list)  # not decidable by its steps
    flight: Flight = field(default_factory=Flight)  # with shards: messages, coordinations
    resend: list[Coordination] = field(default_factory=list)  # no progress for RESEND_SECONDS
    mail: str | None = None  # the mail flag's version when the inbox was read with it
    def __bool__(self) -> bool:
        return bool(self.decidable or self.unconfirmed or self.flight.inbox or self.resend)


class ReadyView:
    """The leader's reads of the ready index (one partition of markers per read).

    Markers (and rows) whose delete this process already queued are left out, so a committed
    request is never proposed twice by the process that committed it. ``others_seen`` says
    whether a marker carried a step recorded by another instance (docs/design.md 3.5).
    """

    def __init__(self, app: LedgerApp) -> None:
        self.app = app
        self.others_seen = False

    @telemetry.traced("ledger.scan")
    def read(self) -> ReadyRound:
        """Every request announced as decidable, assessed, oldest last step first."""
        scan = self.app.completions.ready(fallback_now=self.app.clock.now())
        flight, flight_time = (self.app.ledger.read_flight() if self._flight_due(scan.mail)
                               else (Flight(), None))
        shard = self.app.shard
        if flight_time is not None:  # requests no longer in flight may be settled now
            shard.held &= flight.coordinations.keys()
            for request_id in shard.resent.keys() - flight.coordinations.keys():
                del shard.resent[request_id]
        waiting = flight.coordinations.keys() | shard.held
        markers = [m for m in self._markers(scan.markers) if m.request_id not in waiting]
        now = scan.storage_time + self.app.time_shift()
        assessed = {m.request_id: assess(m.request_id, m.steps, now, self.timeout)
                    for m in markers}
        assessed.update(self._confirmed(markers, assessed))
        found = self._round(markers, assessed, now)
        found.flight = flight
        if flight_time is not None:
            _record_flight(flight, flight_time)
            found.resend = self._due(flight, flight_time)
            found.mail = scan.mail
            if not flight.inbox:  # nothing waits: whatever the flag announced was acted on
                shard.mail_seen = scan.mail
            shard.in_flight = bool(flight.coordinations)
            shard.flight_read_at = self.app.clock.monotonic()
        return found

    def _flight_due(self, mail: str | None) -> bool:
        """Whether this read must read the shard's work in flight too (one more query).

        With shards only: when the mail flag changed since this process last emptied the
        inbox (another shard sent messages: votes and acks come back this way too), and at
        least every ``RESEND_SECONDS`` anyway (a new leader finds what a crashed one left;
        coordinations without progress are sent again).
        """
        if not self.app.sharded:
            return False
        shard = self.app.shard
        return (mail is not None and mail != shard.mail_seen) or \
            self.app.clock.monotonic() - shard.flight_read_at >= RESEND_SECONDS
    def _due(self, flight: Flight, now: datetime) -> list[Coordination]:
        """Coordinations without progress for ``RESEND_SECONDS`` (by storage's time), whose
        messages this process did not send again within as long (by its monotonic clock)."""
        resent = self.app.shard.resent
        clock = self.app.clock.monotonic()
        return [c for c in flight.coordinations.values()
                if c.updated_at is not None
                and (now - c.updated_at).total_seconds() >= RESEND_SECONDS
                and clock - resent.get(c.request_id, float("-inf")) >= RESEND_SECONDS]

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.app.config.request_timeout_seconds)

    def _markers(self, markers: Sequence[ReadyMarker]) -> list[ReadyMarker]:
        """The markers this process has not already handed to the cleaner; notes others' steps."""
        kept = [m for m in markers if m.steps and not self.app.cleaner.has_taken(m.ref)]
        me = self.app.config.instance_id
        self.others_seen = self.others_seen or any(
            s.recorded_by != me for m in kept for s in m.steps)
        return kept

    def _confirmed(self, markers: Sequence[ReadyMarker],
                   assessed: Mapping[str, Assessment]) -> dict[str, Assessment]:
        """Verdicts reached at or past the deadline, confirmed on the rows as they are now.

        Unless the marker's steps came from a read made after the deadline had passed (then
        they hold every step on time), or the marker was truncated (it never holds them all).
        """
        app, timeout = self.app, self.timeout
        confirm = [m for m in markers if m.truncated or (
            depends_on_deadline(assessed[m.request_id])
            and not settled_by(m, assessed[m.request_id], timeout))]
        confirmed: dict[str, Assessment] = {}
        for marker, rows in zip(confirm, read_concurrently(
                lambda m: app.completions.read_request(m.request_id), confirm), strict=True):
            fresh = [s for s in rows.steps if not app.cleaner.has_taken(s.ref)]
            if fresh:
                confirmed[marker.request_id] = assess(
                    marker.request_id, fresh, rows.storage_time + app.time_shift(), timeout)
            else:  # its rows are gone: whatever the marker says is late, or was settled
                confirmed[marker.request_id] = Assessment(
                    marker.request_id, Verdict.PENDING, "no rows left", ())
        return confirmed

    def _round(self, markers: Sequence[ReadyMarker], assessed: Mapping[str, Assessment],
               now: datetime) -> ReadyRound:
        """Sort the requests: decidable (oldest last step first) or not confirmed."""
        found = ReadyRound()
        for marker in markers:
            assessment = assessed[marker.request_id]
            if marker.request_id in self.app.recently_decided:
                # This process decided it: whatever rows are still here are late (or their
                # delete failed); either way they are settled against the outcome.
                assessment = Assessment(marker.request_id, Verdict.LATE, "request already ended",
                                        assessment.rows)
            item = ReadyRequest(assessment, marker)
            (found.decidable if assessment.decided else found.unconfirmed).append(item)
        found.decidable.sort(key=lambda r: (r.assessment.last_recorded_at
                                            if r.assessment.steps else now, r.request_id))
        return found


def _record_flight(flight: Flight, now: datetime) -> None:
    """Telemetry of one read of the shard's work in flight (for the stuck-work alert)."""
    stamps = [c.updated_at for c in flight.coordinations.values() if c.updated_at is not None]
    oldest = min(stamps, default=None)
    telemetry.record_flight(len(flight.coordinations), len(flight.inbox),
                            max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)


def settled_by(marker: ReadyMarker, assessment: Assessment, timeout: timedelta) -> bool:
    """True when the marker's steps were read (all of them) once the deadline had passed.

    Every row stamped before the deadline is visible ``EXPIRY_GRACE`` after it, so such a read
    holds every step on time; whatever was recorded later is late and changes nothing.
    """
    if marker.read_at is None or not assessment.rows:
        return False
    return marker.read_at >= deadline_of(assessment.rows, timeout) + EXPIRY_GRACE
