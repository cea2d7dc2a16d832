"""The queue trigger's job: record a completion, announce its request when ready, then elect.

``handle_completion`` parses one message (a malformed one is parked with the reason), records
its step (idempotent), and, when that leaves the request decidable, *announces* it (a marker in
the ready index, ``CompletionStore.mark_ready``) before competing for the lease
(``shared.leadership.elections``). A step that still waits for others is recorded and the
invocation returns. docs/design.md 3.5 says why nothing is stranded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared.domain.contract import Completion, MalformedMessage, parse_completion
from shared.domain.model import RecordedStep
from shared.domain.rules import assess
from shared.leadership.elections import ElectionResult, run_election
from shared.leadership.instance import MAP_TTL_SECONDS, LedgerApp
from shared.observability import telemetry
from shared.storage.completions import MAX_ROWS_PER_OPERATION, Recorded, RecordResult

logger = logging.getLogger(__name__)


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
                         app.clock.now())
        return CompletionResult(recorded=None, parked=True)
    home = app.home_of(completion)  # the shard follows from the ids, never from the queue
    map_asked_at = app.topology.checked_at
    recorded = record_completion(home, completion)
    if app.clock.monotonic() - map_asked_at > MAP_TTL_SECONDS:
        home = rehome_if_moved(app, home, completion)
    result = CompletionResult(recorded=recorded.result,
                              announced=announce_if_ready(home, completion, recorded))
    if not result.announced:
        return result  # nothing the leader can do yet: no lease attempt
    try:
        result.election = run_election(home, handed_over=True)
    except Exception:
        logger.exception("leading after recording %s/%s failed; the sweeper or the next leader "
                         "will resume", completion.request_id, completion.operation_id,
                         extra=telemetry.log_extra(requestId=completion.request_id))
    return result


def rehome_if_moved(app: LedgerApp, home: LedgerApp, completion: Completion) -> LedgerApp:
    """Move the request's rows to its home under the map in force, if a reshard moved it while
    this delivery was recording; the app acting for the home the rows are on now.

    Called when the map this delivery used was asked for more than ``MAP_TTL_SECONDS`` before
    its write ended. A reshard moves the steps recorded under the old map once every process
    has read the new one (``MAP_TTL_SECONDS`` after publishing it), so only a write that landed
    later than that can be left behind, and such a write ends more than ``MAP_TTL_SECONDS``
    after its map was asked for: this check catches it, even on a shard the new map removed
    (whose table no leader reads). Moving is idempotent (a leader forwarding the same strays
    meets rows already imported, or already deleted).
    """
    app.topology.reload()
    moved = app.home_of(completion)
    if moved.current == home.current:
        return home
    steps = home.completions.steps_of(completion.request_id)
    logger.warning("request %s was recorded on shard %d under an older shard map; its %d row(s) "
                   "move to shard %d", completion.request_id, home.current, len(steps),
                   moved.current, extra=telemetry.log_extra(requestId=completion.request_id))
    if steps:
        moved.completions.import_steps(steps)
        home.completions.delete([step.ref for step in steps])
    return moved


def queue_handler(get_app: Callable[[], LedgerApp], message_type: type,
                  function_name: str) -> Callable[[Any], None]:
    """The handler of intake queue q >= 1's trigger (``INTAKE_QUEUES``): what function_app.py's
    ``record_completion`` does for queue 0, as a new function named ``function_name``.

    ``message_type`` is ``azure.functions.QueueMessage``: the worker checks the ``msg``
    annotation against the binding, and this layer imports no Azure package. Any instance takes
    any queue's message: ``handle_completion`` finds the shard from the ids.
    """
    def handler(msg: Any) -> None:
        handle_completion(get_app(), msg.get_body(), message_id=msg.id or "",
                          dequeue_count=msg.dequeue_count or 1)

    handler.__name__ = handler.__qualname__ = function_name
    handler.__annotations__ = {"msg": message_type, "return": None}
    handler.__doc__ = f"Record one step's completion from intake queue {function_name}."
    return handler


def record_completion(app: LedgerApp, completion: Completion) -> Recorded:
    """Write the step's row (idempotent) in ``app``'s shard, which must be the completion's home
    (``LedgerApp.home_of``); the result says whether it was new."""
    with telemetry.acting_for(app.current):
        with telemetry.span("ledger.record", requestId=completion.request_id,
                            operationId=completion.operation_id):
            recorded = app.completions.record(completion, app.config.instance_id,
                                              app.clock.now())
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
        rows = app.completions.read_request(request_id, limit=most, fallback_now=app.clock.now())
        steps, truncated, late = rows.steps, rows.truncated, rows.decided
        now = read_at = rows.storage_time + app.time_shift()
    if not steps:
        return False  # its rows went meanwhile (the leader settled them)
    decidable = truncated or assess(request_id, steps, now, timeout).decided
    if not (decidable or late or request_id in app.recently_decided):
        return False
    app.completions.mark_ready(request_id, steps, read_at=read_at, truncated=truncated)
    return True
