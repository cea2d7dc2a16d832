"""Publishing the outbox: send each event to the outcomes queue, then delete its row.

A term stages the outbox row of each transaction it commits (``Publisher.stage``: the events of
the outcomes the transaction decides, or of the cross-shard requests it settles;
``shared/domain/outbox.py``). Once storage answered that the transaction landed
(``Publisher.landed``), the row's events are sent, each as one base64 message on
``OUTCOMES_QUEUE_NAME`` through the app's ``MessageQueue`` port, and then the row is deleted
``If-Match`` the version the transaction wrote. ``PUBLISHERS`` threads do that while the term's
next commits run; the term waits for them before it ends (``Publisher.finish``), so no send
outlives its invocation (one still running at ``WAIT_SECONDS`` is cancelled, its row kept).

**Rows of many events are handed off.** One send costs the leader a round trip and about a
millisecond of CPU, and the leader is the one process per shard that cannot scale out. So a
row of more than ``INLINE_EVENTS`` events (a busy leader's transaction) is marked ``handedOff``
in its transaction, and after the commit the leader sends one message instead of its events
(from a publisher thread, so the leader's next commit does not wait for it):
a wake-up message (``publish_body``) that any instance's ``wake_up`` invocation takes, reads
the row, sends its events and deletes it (``publish_handed_off``). A quiet leader's events go
out from the leader itself, at once. A hand-off message that cannot be sent makes the leader
send the row itself; one that is lost leaves the row to the look below.

**What is left is sent by the next one.** A row whose sends failed, or that a crash, a lost
answer or an ended term left behind, stays in the ledger partition. The term reads the shard's
outbox once more when it ends and sends what it finds (``publish_remaining``); the sweeper does
the same for every shard, every minute, for rows older than ``SWEEP_MIN_AGE_SECONDS`` (a live
leader sends its own rows within milliseconds). Deleting a row is not fenced: the row is never
changed after its transaction, and it is deleted only by a process that has just sent every
event it carries, so any process may do it, a deposed leader included. The price is a
duplicate when two processes send one row (or a send's answer is lost and it is sent again):
the same body, with the same ``eventId``, which consumers use as their idempotency key.

**Contradictions.** A late step that contradicts its request's decision is parked (a table
other than the ledger), so its event cannot be written in a fenced transaction. The term
creates its outbox row right after parking it (create-once, keyed by the parked id), before
the step's rows are deleted: a crash in between leaves the rows, the next leader parks the step
again and creates the row again (the same key, the same body). So every parked contradiction
gets its event, at least once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shared.domain.model import DecidedOutcome, Fence, Outcome
from shared.domain.outbox import (
    MAX_ROW_CHARACTERS,
    OUTBOX_OPERATIONS,
    contradiction_event,
    contradiction_key,
    decided_event,
    event_size_bound,
    event_text,
    outbox_key,
    outbox_write,
    outcome_event,
)
from shared.domain.planning import Subject, Write
from shared.domain.rules import Assessment
from shared.errors import NotFound, StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.reads import read_concurrently
from shared.leadership.wakeup import publish_body
from shared.observability import telemetry
from shared.storage.clients import ensure_queues
from shared.storage.outbox import OutboxDepth, OutboxRow, OutboxStore
from shared.storage.ports import MessageQueue

logger = logging.getLogger(__name__)

PUBLISHERS = 8  # threads sending events and deleting rows, per process
INLINE_EVENTS = 8  # a row with more events is handed off to a publisher invocation
HANDED_OFF_GRACE_SECONDS = 10.0  # a handed-off row anyone else sends once it is this old
WAIT_SECONDS = 60.0  # the longest a term waits for its sends when it ends
SWEEP_MIN_AGE_SECONDS = 10.0  # rows the sweeper leaves to the live leader that wrote them
RECOVER_ROWS = 1000  # rows one look at the outbox sends at most

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
# A hook for tests: called with (key, body) before each send; raising fails the send.
before_send: Callable[[str, str], None] | None = None


def _forget_pool() -> None:
    """In a forked child: the parent's threads (and a lock one of them held) are not there."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    """The process's publisher threads (made again in a child forked after they started: a
    forked child inherits the pool but not its threads)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(PUBLISHERS, thread_name_prefix="outbox")
            _pool_pid = os.getpid()
        return _pool


def outcomes_queue(app: LedgerApp) -> MessageQueue:
    """The outcomes queue (base64 text, as a queue trigger decodes it), opened once per app."""
    queue = app.opened_queues.get("outcomes")
    if queue is None:
        queue = app.opened_queues.setdefault("outcomes", app.queue(app.config.outcomes_queue))
    return queue


def store(app: LedgerApp) -> OutboxStore:
    """The outbox rows of the shard ``app`` acts for."""
    return OutboxStore(app.ledger.table, app.ledger.partition)


def _send(app: LedgerApp, key: str, body: str) -> None:
    if before_send is not None:
        before_send(key, body)
    queue = outcomes_queue(app)
    try:
        queue.send(body)
    except NotFound:  # the queue does not exist yet (locally: Bicep creates it in Azure)
        ensure_queues(app.clients, [app.config.outcomes_queue])
        queue.send(body)


def publish_row(app: LedgerApp, key: str, etag: str | None, bodies: Sequence[str]) -> bool:
    """Send every body of one row, then delete the row; False (the row kept) on a failure."""
    try:
        for body in bodies:
            _send(app, key, body)
        store(app).delete(key, etag)
    except StorageError as exc:
        logger.warning("outbox row %s of shard %d not published (%s: %s); it is sent again "
                       "by the next leader or the sweeper", key, app.current,
                       type(exc).__name__, exc)
        return False
    return True


def hand_off(app: LedgerApp, key: str) -> bool:
    """Ask any instance to send row ``key`` of ``app``'s shard (one wake-up message); False
    when the message could not be sent (the caller then sends the row itself)."""
    try:
        app.wakeup_queue.send(publish_body(app.current, key))
    except StorageError as exc:
        logger.info("could not hand outbox row %s of shard %d off (%s): sent by the leader",
                    key, app.current, exc)
        return False
    return True


def _hand_off_or_publish(app: LedgerApp, key: str, etag: str | None,
                         bodies: Sequence[str]) -> bool:
    """A publisher thread's part for a big row: hand it off, or send it when that fails."""
    return hand_off(app, key) or publish_row(app, key, etag, bodies)


def publish_handed_off(app: LedgerApp, key: str) -> bool:
    """A publisher invocation's job: send row ``key`` of ``app``'s shard, then delete it
    (True also when it is gone already: someone sent it). A failure raises, so the host
    delivers the message again; past ``maxDequeueCount`` the look below sends the row."""
    if not app.config.outcome_events:
        return True
    row = store(app).read_row(key)
    if row is None:
        return True
    for body in row.bodies:
        _send(app, key, body)
    store(app).delete(key, row.etag)
    return True


def publish_remaining(app: LedgerApp, min_age_seconds: float = 0.0,
                      limit: int = RECOVER_ROWS, handed_off_grace: bool = True) -> int:
    """Send the rows left in the shard's outbox (older than ``min_age_seconds``); the rows
    published. Storage errors are logged: what stays is sent by the next look."""
    if not app.config.outcome_events:
        return 0
    try:
        rows, now = store(app).read(limit)
    except StorageError as exc:
        logger.warning("could not read the outbox of shard %d: %s", app.current, exc)
        return 0
    def old_enough(row: OutboxRow) -> bool:
        grace = HANDED_OFF_GRACE_SECONDS if row.handed_off and handed_off_grace else 0.0
        least = max(min_age_seconds, grace)
        return least <= 0 or row.written_at is None or now is None or \
            (now - row.written_at).total_seconds() >= least

    due = [row for row in rows if old_enough(row)]
    if not due:
        return 0
    sent = sum(wait_all([_executor().submit(publish_row, app, row.key, row.etag, row.bodies)
                         for row in due], WAIT_SECONDS))
    logger.info("shard %d: %d outbox row(s) left behind sent (%d event(s))", app.current,
                sent, sum(len(row.bodies) for row in due))
    return sent


def wait_all(futures: Sequence[Future[bool]], timeout: float) -> list[bool]:
    """The futures' results once done; those not done by ``timeout`` are cancelled (False)."""
    done, not_done = wait(futures, timeout=timeout)
    for future in not_done:
        future.cancel()
    return [future.result() if future in done and not future.cancelled() else False
            for future in futures]


def depth(app: LedgerApp) -> OutboxDepth:
    """The outbox of every shard: rows, events, and the oldest unpublished row's age."""
    found = read_concurrently(lambda shard: store(shard).depth(), app.each_shard())
    return OutboxDepth(sum(d.rows for d in found), sum(d.events for d in found),
                       max((d.oldest_age_seconds for d in found), default=0.0))


def outbox_view(app: LedgerApp) -> dict[str, Any]:
    """The operator's view of every shard's outbox (status page, ``/api/metrics``, CLI)."""
    found = depth(app)
    return {"rows": found.rows, "events": found.events,
            "oldestAgeSeconds": round(found.oldest_age_seconds, 1),
            "queue": app.config.outcomes_queue, "enabled": app.config.outcome_events}


def sweep_outbox(app: LedgerApp) -> None:
    """The sweeper's pass over one shard's outbox: send what terms left behind, then report
    what is still unsent (a warning with ``outboxEvents`` and ``outboxOldestAgeSeconds``, which
    the alert of infra/modules/outbox_alerts.bicep reads)."""
    if not app.config.outcome_events:
        return
    publish_remaining(app, SWEEP_MIN_AGE_SECONDS)
    try:
        left = store(app).depth()
    except StorageError as exc:
        logger.warning("could not read the outbox of shard %d: %s", app.current, exc)
        return
    if left.rows:
        logger.warning("outbox of shard %d: %d event(s) unsent, the oldest for %.0f s",
                       app.current, left.events, left.oldest_age_seconds,
                       extra=telemetry.log_extra(shard=app.current, outboxEvents=left.events,
                                                 outboxOldestAgeSeconds=round(
                                                     left.oldest_age_seconds, 1)))


def drain_outbox(app: LedgerApp) -> int:
    """Send everything in every shard's outbox, handed-off rows included (resharding calls
    this with every lease held: no row is being written); the rows published."""
    return sum(publish_remaining(shard, limit=RECOVER_ROWS * 100, handed_off_grace=False)
               for shard in app.each_shard())


class _Batch(Protocol):
    """What the publisher needs of a cross-shard transaction (``ExchangeBatch``)."""

    outcomes: list[Outcome]
    settled: list[str]


@dataclass
class Publisher:
    """One term's outbox: the row each transaction writes, and its publishing after it landed."""

    app: LedgerApp

    def __post_init__(self) -> None:
        self.enabled = self.app.config.outcome_events
        self._staged: dict[str, list[dict[str, Any]]] = {}
        self._futures: list[Future[bool]] = []

    @property
    def operations(self) -> int:
        """What the outbox adds to each transaction (0 when events are off)."""
        return OUTBOX_OPERATIONS if self.enabled else 0

    def batch_limits(self) -> dict[str, Any]:
        """``plan_batches``' arguments for the outbox row."""
        if not self.enabled:
            return {}
        return {"event_chars": _bound, "event_budget": MAX_ROW_CHARACTERS}

    def stage(self, fence: Fence, now: datetime, outcomes: Iterable[Outcome] = (),
              decided: Iterable[DecidedOutcome] = ()) -> list[tuple[Subject, Write]]:
        """The outbox row of the transaction about to be sent (none when there is no event).

        ``outcomes`` are decided by the transaction itself (``now`` is its time, as their rows
        say); ``decided`` are stored outcomes the transaction settles.
        """
        self._staged.clear()
        if not self.enabled:
            return []
        events = [outcome_event(o, fence.epoch, now.isoformat()) for o in outcomes]
        events += [decided_event(d) for d in decided]
        if not events:
            return []
        key = outbox_key(fence.epoch)
        self._staged[key] = events
        return [outbox_write(self.app.ledger.partition, key, events,
                             handed_off=len(events) > INLINE_EVENTS)]

    def stage_exchange(self, batch: _Batch, fence: Fence,
                       now: datetime) -> list[tuple[Subject, Write]]:
        """The outbox row of a cross-shard transaction: an event for each request it leaves
        final (decided with nothing left to apply elsewhere, or settled by its last ACK)."""
        if not self.enabled:
            return []
        final = [o for o in batch.outcomes if not o.shards]
        decided_here = {o.request_id for o in batch.outcomes}
        settled = [r for r in batch.settled if r not in decided_here]
        stored = [d for d in read_concurrently(self.app.ledger.read_outcome, settled)
                  if d is not None]
        return self.stage(fence, now, final, stored)

    def landed(self, result: Any) -> None:
        """The transaction landed (``CommitResult``): send its row's events, then delete it."""
        created: dict[str, str] = getattr(result, "outbox", {}) or {}
        for key, etag in created.items():
            events = self._staged.pop(key, None)
            if events is None:
                continue
            bodies = [event_text(e) for e in events]
            if len(events) > INLINE_EVENTS:
                self._futures.append(_executor().submit(_hand_off_or_publish, self.app, key,
                                                        etag, bodies))
                continue
            self._submit(key, etag, bodies)
        self._staged.clear()

    def contradiction(self, parked_id: str, reason: str, decided: DecidedOutcome,
                      operation_id: str) -> None:
        """A late step was parked: create its event's outbox row (create-once), then send it."""
        if not self.enabled:
            return
        event = contradiction_event(parked_id, reason, decided, operation_id)
        key = contradiction_key(parked_id)
        store(self.app).create_once(key, [event])
        self._submit(key, None, [event_text(event)])

    def _submit(self, key: str, etag: str | None, bodies: list[str]) -> None:
        self._futures.append(_executor().submit(publish_row, self.app, key, etag, bodies))

    def finish(self, recover: bool | None = None) -> None:
        """Wait for this term's sends; then (unless the term ended on an error, or ``recover``
        says otherwise) send what other terms left in the shard's outbox."""
        if not self.enabled:
            return
        futures, self._futures = self._futures, []
        wait_all(futures, WAIT_SECONDS)
        if recover is None:
            recover = sys.exc_info()[0] is None
        if recover:
            publish_remaining(self.app)


def _bound(assessment: Assessment) -> int:
    return event_size_bound(assessment.request_id, assessment.legs)
