"""The read API: what the HTTP-triggered functions answer, as (status code, JSON body) pairs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.domain.contract import IDENTIFIER_PATTERN
from shared.domain.exchange import COMMITTING, coord_key
from shared.domain.model import Fence
from shared.domain.money import format_money
from shared.leadership.generations import earlier_outcome_by_id
from shared.leadership.instance import LedgerApp
from shared.leadership.reshard import status as reshard_status
from shared.storage.ledger import outcome_view
from shared.storage.parking import ParkedKind
from shared.web import shards

_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer before it becomes an ``HttpResponse``."""

    status: int
    body: dict[str, Any]


def _bad_identifier(kind: str, value: str) -> Reply | None:
    if _IDENTIFIER.fullmatch(value):
        return None
    return Reply(400, {"error": f"{kind} must be 1-128 characters of A-Za-z0-9._:-"})


def account(app: LedgerApp, account_id: str) -> Reply:
    """``GET /api/accounts/{accountId}``: the committed balance, or 404."""
    if bad := _bad_identifier("accountId", account_id):
        return bad
    row = app.account_shard(account_id).ledger.read_account(account_id)
    if row.etag is None:
        return Reply(404, {"error": f"account {account_id} has no committed balance"})
    body = {"accountId": account_id, "balance": format_money(row.balance)}
    if row.reserved:
        body["reserved"] = format_money(row.reserved)  # held for undecided cross-shard requests
    return Reply(200, body)


def request(app: LedgerApp, request_id: str) -> Reply:
    """``GET /api/requests/{requestId}``: the outcome; ``pending`` while steps wait;
    ``committing`` while shards decide or apply it; or 404.

    With shards, a request is decided by its home: its requestId's shard, which also keeps the
    claim of a one-step request decided on its account's shard (``claim_entity``). A one-step
    request still waiting is found on its account's shard, which the id alone does not name:
    the other shards are looked at last.
    """
    if bad := _bad_identifier("requestId", request_id):
        return bad
    if app.earlier_maps and (before := earlier_outcome_by_id(app, request_id)) is not None:
        return Reply(200, {"requestId": request_id, **outcome_view(before)})  # before a reshard
    if not app.sharded:
        found = _request_on(app, request_id)
    else:
        home = app.on(app.shard_map.request_shard(request_id))
        found = _request_on(home, request_id)
        claimed = home.ledger.claimed_by(request_id) if found is None else None
        if claimed is not None and claimed != home.current:
            found = _request_on(app.on(claimed), request_id)
        for other in app.each_shard():
            if found is None and other.current not in (home.current, claimed):
                found = _request_on(other, request_id)
    return found or Reply(404, {"error": f"request {request_id} is unknown"})


def _request_on(app: LedgerApp, request_id: str) -> Reply | None:
    """The request as ``app``'s shard knows it, or ``None`` when that shard has no trace of it."""
    outcome = app.ledger.read_outcome(request_id)
    if outcome is not None:
        if not outcome.settled:
            return Reply(200, {"requestId": request_id, "status": COMMITTING,
                               "reason": "decided "
                               f"{outcome.outcome.status.value}; other shards still apply it"})
        return Reply(200, {"requestId": request_id, **outcome_view(outcome)})
    if app.sharded and app.ledger.read_row(coord_key(request_id)) is not None:
        return Reply(200, {"requestId": request_id, "status": COMMITTING,
                           "reason": "complete; the shards it touches are voting"})
    steps = app.completions.steps_of(request_id)
    if not steps:
        return None
    arrived = len({s.operation_id for s in steps})
    expected = max(s.expected_operations for s in steps)
    return Reply(200, {"requestId": request_id, "status": "pending",
                       "reason": f"{arrived} of {expected} steps arrived"})


def lease_view(app: LedgerApp) -> dict[str, str]:
    """The election lease's state and status of ``app``'s shard (``shards.lease_view``)."""
    return shards.lease_view(app)


def leader_view(fence: Fence | None, lease: Mapping[str, str]) -> dict[str, Any]:
    """Who leads a shard, as the read API and the status page both show it
    (``shards.leader_fields``)."""
    return shards.leader_fields(fence, lease)


def leader(app: LedgerApp) -> Reply:
    """``GET /api/leader``: shard 0's lease state, epoch, holder and pending completions at the
    top level (as before shards), the parked messages, and ``shards``: one row per shard, in
    shard order (``shared/web/shards.py``), shard 0's included.

    The body is built as a dict, field by field, so that more fields can join it.
    """
    rows = shards.read_shards(app)
    first = rows[0]
    now = app.clock.now()
    parked = app.parking.count_by_kind()
    body: dict[str, Any] = {
        **leader_view(first.fence, first.lease),
        "pendingCompletions": len(first.pending.rows),
        "parkedMessages": {kind.value: parked.get(kind.value, 0) for kind in ParkedKind},
        "shards": [shards.shard_row(reads, now) for reads in rows],
        "reshard": reshard_status(app),  # null unless LEDGER_SHARDS disagrees with the map
    }
    return Reply(200, body)
