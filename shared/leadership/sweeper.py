"""The sweeper's rare full scan: announce what no recorder announced, expire what timed out.

The hot path never scans the completion rows (the leader reads only the ready index). Two kinds
of request still need a look at the rows themselves:

- a request that stays incomplete past its deadline must be *expired*: nothing else happens to
  it, so no recorder announces it;
- a decidable request whose marker was never written: its recorder crashed between the row and
  the marker, and the message was never delivered again (moved to the poison queue).

``repair_scan`` walks the step rows (``CompletionStore.scan_rows``), assesses every request it
reads, and announces the decidable ones, so that the next leader settles them as it settles any
other. It runs at most once every ``FULL_SCAN_INTERVAL`` per deployment, whatever the number of
instances or sweeps: the time of the last scan is kept in storage (``claim_full_scan``). Each
scan reads at most ``FULL_SCAN_MAX_ROWS`` rows and the next one resumes where it stopped, so a
large backlog costs a bounded read a minute, never a read per delivery.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from shared.config.names import poison_queue_name
from shared.domain.rules import assess
from shared.errors import StorageError
from shared.leadership.elections import ElectionResult, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import sweep_outbox
from shared.observability import telemetry
from shared.storage.completions import FULL_SCAN_MAX_ROWS
from shared.storage.parking import queue_depth

logger = logging.getLogger(__name__)

ANNOUNCERS = 6  # concurrent marker writes of one scan


@dataclass(frozen=True)
class RepairReport:
    """What one full scan read and announced."""

    rows: int
    requests: int
    announced: int
    wrapped: bool  # it reached the end of the rows (the next scan starts from the beginning)


@telemetry.traced("ledger.full_scan")
def repair_scan(app: LedgerApp, max_rows: int = FULL_SCAN_MAX_ROWS,
                force: bool = False) -> RepairReport | None:
    """The deployment's full scan, if one is due (``None`` otherwise); see the module docstring.

    ``force`` skips the once-a-minute claim (operators and tests).
    """
    store = app.completions
    start = ("", "") if force else store.claim_full_scan(shift=app.time_shift())
    if start is None:
        return None
    # Work announced and not committed yet, before this scan announces more: with a minute
    # between scans, announced work that outlives several of them means no leader commits.
    announced = len(store.ready(fallback_now=app.clock.now()).markers)
    scan = store.scan_rows(start, max_rows, fallback_now=app.clock.now())
    now = scan.storage_time + app.time_shift()
    timeout = timedelta(seconds=app.config.request_timeout_seconds)
    assessed = [assess(request_id, steps, now, timeout) for request_id, steps in scan.steps.items()]
    # Decidable, or steps beside a tombstone (late: the recorder that wrote them stopped first).
    decidable = [a for a in assessed if a.decided or a.request_id in scan.late]
    with ThreadPoolExecutor(ANNOUNCERS, thread_name_prefix="announce") as pool:
        list(pool.map(lambda a: store.mark_ready(a.request_id, scan.steps[a.request_id],
                                                 read_at=now), decidable))
    if scan.old_request_rows:  # tombstones left by a process that stopped first
        store.delete(scan.old_request_rows)
    if not force:
        store.save_scan_position(scan.resume_at)
    oldest = min((s.recorded_at for steps in scan.steps.values() for s in steps), default=None)
    telemetry.record_scan(scan.rows, len(assessed) - len(decidable), announced,
                          max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    if decidable:
        logger.info("full scan: %d row(s) of %d request(s), %d announced (expired or left "
                    "unannounced)", scan.rows, len(assessed), len(decidable))
    return RepairReport(scan.rows, len(assessed), len(decidable), scan.resume_at is None)


def poison_depths(app: LedgerApp) -> dict[str, int]:
    """The approximate depth of every intake queue's poison queue (``INTAKE_QUEUES``), by name;
    a poison queue whose depth cannot be read is left out (and logged)."""
    depths = {}
    for queue in app.config.intake_queue_names:
        poison = poison_queue_name(queue)
        try:
            depths[poison] = queue_depth(app.queue(poison))
        except StorageError as exc:
            logger.warning("could not read the depth of %s: %s", poison, exc)
    return depths


def record_poison_depth(app: LedgerApp) -> None:
    """Report the messages parked in all the poison queues together (``ledger.poison.depth``)."""
    depths = poison_depths(app)
    if depths:
        telemetry.record_poison_depth(sum(depths.values()))
    if any(depths.values()):
        logger.warning("messages in poison queues: %s",
                       ", ".join(f"{name}={n}" for name, n in depths.items() if n))


@telemetry.invocation("timer")
def sweep(app: LedgerApp) -> ElectionResult:
    """The timer trigger's job: the poison queues' depth, then for each shard the rare full
    scan and the election (the first shard's result is returned, the others' in ``visits``)."""
    record_poison_depth(app)
    results = []
    for shard in app.each_shard():
        sweep_outbox(shard)  # outcome events a term left behind
        repair_scan(shard)
        results.append(run_election(shard))
    first = results[0]
    first.visits.extend(results[1:])
    return first
