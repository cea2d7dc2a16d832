"""Earlier shard map generations: where a request decided before a reshard has its outcome, and
what a leader does with a step recorded under a map that is no longer in force.

A reshard (``shared/leadership/reshard.py``) moves accounts and pending steps, never outcome
rows: ``request:{R}`` and ``claim:{R}`` stay in the partition of the shard that was R's home
(or R's requestId's shard) when R was decided. So after a reshard a late duplicate of a decided
request's step is recorded on R's *new* home, which has no outcome for it. Before deciding, a
leader therefore looks up the outcome under each earlier generation whose home differs
(``earlier_outcomes``: one point read per such generation and request, all concurrently; none
at all while the map has only one generation), and settles the steps against it as late ones.
The read API does the same by the requestId alone (``earlier_outcome_by_id``).

A *stray* is a step row whose home under the map in force is another shard: a recorder used a
map older than the one in force (its cache was up to ``MAP_TTL_SECONDS`` old, or it was paused
between reading the map and writing). The leader that meets one forwards it to its home
(``forward``): the rows are written there with their first time of record, announced there, and
deleted here.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.domain.model import DecidedOutcome, RecordedStep
from shared.domain.sharding import earlier_homes
from shared.leadership.instance import LedgerApp
from shared.leadership.reads import read_concurrently
from shared.leadership.view import ReadyRequest


def _homes_before(app: LedgerApp, request: ReadyRequest) -> list[int]:
    current, earlier = app.shard_map, app.earlier_maps
    found: list[int] = []
    for row in request.assessment.rows:
        for shard in earlier_homes(row.request_id, row.expected_operations, row.account_id,
                                   current, earlier):
            if shard not in found and shard != app.current:
                found.append(shard)
    return found


def earlier_outcomes(app: LedgerApp, requests: Sequence[ReadyRequest]
                     ) -> dict[str, DecidedOutcome]:
    """The requests decided under an earlier map generation, with their outcomes."""
    if not app.earlier_maps or not requests:
        return {}
    reads = [(shard, r.request_id) for r in requests for shard in _homes_before(app, r)]
    found: dict[str, DecidedOutcome] = {}
    for (_, request_id), decided in zip(reads, read_concurrently(
            lambda item: app.topology.ledger_of(item[0]).read_outcome(item[1]), reads),
            strict=True):
        if decided is not None:
            found.setdefault(request_id, decided)
    return found


def earlier_outcome_by_id(app: LedgerApp, request_id: str) -> DecidedOutcome | None:
    """A request's outcome decided under an earlier generation, found by its id alone: on the
    requestId's shard of that generation, or on the shard its claim there names (a one-step
    request is decided on its account's shard, which the id does not name)."""
    current_shard = app.shard_map.request_shard(request_id)
    for shard_map in reversed(app.earlier_maps):
        shard = shard_map.request_shard(request_id)
        if shard == current_shard and shard_map.shards == app.shard_map.shards:
            continue
        ledger = app.topology.ledger_of(shard)
        decided = ledger.read_outcome(request_id)
        if decided is None and shard_map.shards > 1:
            home = ledger.claimed_by(request_id)
            if home is not None and home != shard:
                decided = app.topology.ledger_of(home).read_outcome(request_id)
        if decided is not None:
            return decided
    return None


def is_stray(app: LedgerApp, request: ReadyRequest) -> bool:
    """Whether a row of the request belongs to another shard under the map in force."""
    shard_map = app.shard_map
    return any(shard_map.home_of(s.request_id, s.expected_operations, s.account_id)
               != app.current for s in request.assessment.rows)


def forward(app: LedgerApp, request: ReadyRequest) -> set[int]:
    """Write the request's stray rows on their home shards and announce them there; queue
    their delete here (with the marker). Returns the shards written to."""
    shard_map = app.shard_map
    by_home: dict[int, list[RecordedStep]] = {}
    for step in request.assessment.rows:
        home = shard_map.home_of(step.request_id, step.expected_operations, step.account_id)
        if home != app.current:
            by_home.setdefault(home, []).append(step)
    for home, steps in sorted(by_home.items()):
        target = app.on(home)
        target.completions.import_steps(steps)
        target.completions.mark_ready(request.request_id, steps)
    refs = [s.ref for steps in by_home.values() for s in steps] + [request.marker.ref]
    app.cleaner.delete(refs)
    return set(by_home)
