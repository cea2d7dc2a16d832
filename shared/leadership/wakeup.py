"""The lease alarm: a queue message that comes due when a holder's lease would expire.

A holder that dies (or is paused) keeps its lease until storage lets it expire, up to
``LEASE_SECONDS`` after its last renewal. The work it was to commit, and the work that other
instances handed over to it by exiting early, must not then wait for the next message or the
minute's sweeper. So every holder arms an alarm as it acquires: a message on the wake-up queue
(``WAKEUP_QUEUE_NAME``), invisible until ``ALARM_LEAD_SECONDS`` before the lease would expire.
Each renewal postpones it (an update with the handle the send returned) and the
release deletes it. A holder that stops renewing therefore leaves an alarm that comes due as its
lease runs out: the instance that receives it (``handle_wakeup`` in
``shared/leadership/elections.py``)
competes for the lease every ``WAKE_POLL_SECONDS`` until it holds it, and commits what waits.

This is a queue message with delayed visibility used as a durable timer: it survives the
process that armed it, and any instance may take it. Everything here is best effort: a send,
postpone or delete that fails is logged, and the minute's sweeper remains the backstop.

Not covered: a holder that dies between its acquire and the alarm's send (one storage call).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from shared.errors import StorageError
from shared.storage.ports import Handle, MessageQueue

logger = logging.getLogger(__name__)

ALARM_LEAD_SECONDS = 2  # the alarm comes due this long before the lease would expire
WAKE_POLL_SECONDS = 0.25  # how often a woken instance competes for the lease
# How long a woken instance keeps competing: the lead, plus the host's polling interval
# (host.json maxPollingInterval) by which the alarm may be picked up late, plus a margin.
WAKE_WAIT_SECONDS = ALARM_LEAD_SECONDS + 4
ALARM_TYPE = "lease-alarm"
PUBLISH_TYPE = "publish-outbox"  # a leader hands an outbox row to a publisher invocation


def alarm_body(holder: str, instance_id: str, reason: str = "", shard: int = 0) -> str:
    """The alarm's JSON text: the shard to wake (0 when absent); the rest is for people."""
    return json.dumps({"version": 1, "type": ALARM_TYPE, "holder": holder,
                       "armedBy": instance_id, **({"reason": reason} if reason else {}),
                       **({"shard": shard} if shard else {})},
                      separators=(",", ":"))


def publish_body(shard: int, row: str) -> str:
    """The wake-up message that asks any instance to send one outbox row's events."""
    return json.dumps({"version": 1, "type": PUBLISH_TYPE, "shard": shard, "row": row},
                      separators=(",", ":"))


def publish_request(body: bytes | str) -> tuple[int, str] | None:
    """(shard, outbox row key) of a publish message; ``None`` for anything else (an alarm)."""
    try:
        found = json.loads(body)
    except ValueError:
        return None
    if not isinstance(found, dict) or found.get("type") != PUBLISH_TYPE:
        return None
    shard, row = found.get("shard"), found.get("row")
    if not isinstance(shard, int) or shard < 0 or not isinstance(row, str) or not row:
        return None
    return shard, row


def shard_of_alarm(body: bytes | str, shards: int) -> int:
    """The shard an alarm wakes (0 for an alarm that names none, or names one out of range)."""
    try:
        found = json.loads(body).get("shard", 0)
    except (ValueError, AttributeError):
        return 0
    return found if isinstance(found, int) and 0 <= found < shards else 0


def wake_soon(queue: MessageQueue, instance_id: str, reason: str, shard: int = 0,
              delay_seconds: int = 1) -> None:
    """Wake another instance for ``shard`` in ``delay_seconds``: this invocation stops with
    work left over (or leaves work in flight that needs a look later)."""
    try:
        queue.send(alarm_body("", instance_id, reason, shard),
                   visibility_timeout=delay_seconds)
    except StorageError as exc:
        logger.warning("could not wake another instance (%s); the sweeper is the backstop",
                       type(exc).__name__)


@dataclass
class LeaseAlarm:
    """The alarm of one held lease: armed at acquire, postponed at renewals, deleted at release."""

    queue: MessageQueue  # encodes as the host decodes (base64)
    lease_seconds: float
    holder: str
    instance_id: str
    handle: Handle | None = None  # the armed alarm's, as of its latest send or update
    shard: int = 0  # whose lease

    @property
    def due_in(self) -> int:
        """Seconds until the alarm comes due, counted from now (a renewal or the acquire)."""
        return max(1, int(self.lease_seconds - ALARM_LEAD_SECONDS))

    def arm(self) -> None:
        """Send the alarm, due ``due_in`` seconds from now."""
        try:
            self.handle = self.queue.send(alarm_body(self.holder, self.instance_id,
                                                     shard=self.shard),
                                          visibility_timeout=self.due_in)
        except StorageError as exc:
            logger.warning("could not arm the lease alarm (%s); the sweeper is the backstop",
                           _kind(exc))

    def postpone(self) -> None:
        """After a renewal: due ``due_in`` seconds from now again."""
        if self.handle is None:
            return
        try:
            self.handle = self.queue.update(self.handle, visibility_timeout=self.due_in)
        except StorageError as exc:
            logger.info("could not postpone the lease alarm (%s); it may wake an instance "
                        "early, which then finds the lease held and goes back", _kind(exc))

    def disarm(self) -> None:
        """After the release: delete the alarm (it is not needed once the lease is free)."""
        if self.handle is None:
            return
        try:
            self.queue.delete(self.handle)
        except StorageError as exc:  # it came due and was taken already: harmless
            logger.debug("lease alarm not deleted (%s)", _kind(exc))
        self.handle = None


def _kind(exc: StorageError) -> str:
    """The failure's kind for a log line: the SDK's exception name as before, when there is one."""
    return type(exc.__cause__ or exc).__name__
