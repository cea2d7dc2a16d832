"""The lease alarm: a queue message that comes due when a holder's lease would expire.

A holder that dies (or is paused) keeps its lease until storage lets it expire, up to
``LEASE_SECONDS`` after its last renewal. The work it was to commit, and the work that other
instances handed over to it by exiting early, must not then wait for the next message or the
minute's sweeper. So every holder arms an alarm as it acquires: a message on the wake-up queue
(``WAKEUP_QUEUE_NAME``), invisible until ``ALARM_LEAD_SECONDS`` before the lease would expire.
Each renewal postpones it (``update_message`` with the pop receipt the send returned) and the
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

from azure.core.exceptions import AzureError
from azure.storage.queue import QueueClient

logger = logging.getLogger(__name__)

ALARM_LEAD_SECONDS = 2  # the alarm comes due this long before the lease would expire
WAKE_POLL_SECONDS = 0.25  # how often a woken instance competes for the lease
# How long a woken instance keeps competing: the lead, plus the host's polling interval
# (host.json maxPollingInterval) by which the alarm may be picked up late, plus a margin.
WAKE_WAIT_SECONDS = ALARM_LEAD_SECONDS + 4
ALARM_TYPE = "lease-alarm"


def alarm_body(holder: str, instance_id: str, reason: str = "") -> str:
    """The alarm's JSON text (what it says is for people; any alarm wakes the same way)."""
    return json.dumps({"version": 1, "type": ALARM_TYPE, "holder": holder,
                       "armedBy": instance_id, **({"reason": reason} if reason else {})},
                      separators=(",", ":"))


def wake_soon(queue: QueueClient, instance_id: str, reason: str) -> None:
    """Wake another instance within a second: this invocation stops with work left over."""
    try:
        queue.send_message(alarm_body("", instance_id, reason), visibility_timeout=1)
    except AzureError as exc:
        logger.warning("could not wake another instance (%s); the sweeper is the backstop",
                       type(exc).__name__)


@dataclass
class LeaseAlarm:
    """The alarm of one held lease: armed at acquire, postponed at renewals, deleted at release."""

    queue: QueueClient  # encodes as the host decodes (base64)
    lease_seconds: float
    holder: str
    instance_id: str
    message_id: str = ""
    pop_receipt: str = ""

    @property
    def due_in(self) -> int:
        """Seconds until the alarm comes due, counted from now (a renewal or the acquire)."""
        return max(1, int(self.lease_seconds - ALARM_LEAD_SECONDS))

    def arm(self) -> None:
        """Send the alarm, due ``due_in`` seconds from now."""
        try:
            sent = self.queue.send_message(alarm_body(self.holder, self.instance_id),
                                           visibility_timeout=self.due_in)
        except AzureError as exc:
            logger.warning("could not arm the lease alarm (%s); the sweeper is the backstop",
                           type(exc).__name__)
            return
        self.message_id, self.pop_receipt = str(sent.id), str(sent.pop_receipt)

    def postpone(self) -> None:
        """After a renewal: due ``due_in`` seconds from now again."""
        if not self.message_id:
            return
        try:
            updated = self.queue.update_message(self.message_id, self.pop_receipt,
                                                visibility_timeout=self.due_in)
        except AzureError as exc:
            logger.info("could not postpone the lease alarm (%s); it may wake an instance "
                        "early, which then finds the lease held and goes back", type(exc).__name__)
            return
        self.pop_receipt = str(updated.pop_receipt)

    def disarm(self) -> None:
        """After the release: delete the alarm (it is not needed once the lease is free)."""
        if not self.message_id:
            return
        try:
            self.queue.delete_message(self.message_id, self.pop_receipt)
        except AzureError as exc:  # it came due and was taken already: harmless
            logger.debug("lease alarm not deleted (%s)", type(exc).__name__)
        self.message_id = self.pop_receipt = ""
