"""Pure planners: how ready requests group into transactions, what one fenced transaction
writes, and what storage's refusal of one means.

Nothing here does I/O. A ``TransactionPlan`` lists plain ``Write`` values (create, or replace
If-Match an ETag); ``shared.storage.ledger`` turns them into the table's operations. The
refusals are the app's errors: ``FencedOut`` and ``LedgerWriteError`` end the term,
``OutcomeExists`` and ``AccountChanged`` are settled by the term and retried.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from shared.domain.contract import MAX_EXPECTED_OPERATIONS
from shared.domain.model import AccountRow, Fence, Outcome, bounded
from shared.domain.money import format_money
from shared.domain.rules import Assessment
from shared.errors import Retryable, TermEnded

LEDGER_PARTITION = "ledger"
FENCE_ROW = "fence"
ACCOUNT_PREFIX = "account:"
REQUEST_PREFIX = "request:"
CLAIM_PREFIX = "claim:"
MAX_TRANSACTION_OPERATIONS = 100
MAX_RECORDED_STEPS = MAX_EXPECTED_OPERATIONS  # step digests kept on an outcome row

# Storage's documented error codes that mean something to the leader (anything else stops the
# term). They are data from Azure's REST reference, not an SDK dependency.
CONDITION_NOT_MET = "UpdateConditionNotSatisfied"
ALREADY_EXISTS = "EntityAlreadyExists"
NOT_FOUND = "ResourceNotFound"


class FencedOut(TermEnded):
    """A newer leader has claimed a higher epoch: this leader must stop; it committed nothing."""


class LedgerWriteError(TermEnded):
    """Storage refused a ledger transaction for a reason the leader cannot resolve by itself.

    Nothing was written and nothing is deleted: the term stops, the completions stay, and the
    error (storage's code and the row it names) is logged for an operator.
    """


class OutcomeExists(Retryable):
    """The request already has an outcome: the steps at hand are late deliveries."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} already has an outcome")
        self.request_id = request_id


class AlreadyRecorded(Retryable):
    """A create-once row of cross-shard work exists already (a vote, an applied marker, a
    coordination): the message or request at hand was acted on before."""

    def __init__(self, kind: str, request_id: str) -> None:
        super().__init__(f"the {kind} row of request {request_id} exists already")
        self.kind = kind
        self.request_id = request_id


class ClaimedElsewhere(Retryable):
    """Another shard claimed the request (its steps disagree on where it is decided)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} is claimed by another shard")
        self.request_id = request_id


class InboxGone(Retryable):
    """A message row changed or went since it was read: the message was acted on before."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"a message about request {request_id} changed since it was read")
        self.request_id = request_id


class AccountChanged(Retryable):
    """An account row changed under the leader (an operator edit?): re-read it and retry."""

    def __init__(self, account_id: str) -> None:
        super().__init__(f"account {account_id} changed since it was read")
        self.account_id = account_id


def account_key(account_id: str) -> str:
    """The row key of an account's balance."""
    return ACCOUNT_PREFIX + account_id


def request_key(request_id: str) -> str:
    """The row key of a request's outcome."""
    return REQUEST_PREFIX + request_id


def claim_key(request_id: str) -> str:
    """The row key of a request's claim (in the partition of its requestId's shard)."""
    return CLAIM_PREFIX + request_id


def claim_entity(request_id: str, home: int) -> dict[str, Any]:
    """A request's claim: the one shard that decides it (no partition: the caller's).

    **Claims** (with shards only). A request is decided by its home: a one-step request by its
    account's shard, any other by its requestId's shard. Steps that disagree (another
    ``expectedOperations``, or a second content naming another account) could make two
    shards each believe they are the home. So every decision also claims the request, once,
    in the partition of its requestId's shard: that shard's own decisions create the claim in
    the same fenced transaction as the outcome; another shard creates it first (create-once)
    and decides only if the claim is its own. The steps of a loser are settled against the
    winner's outcome (parked when they contradict it), as any late step is.
    """
    return {"RowKey": claim_key(request_id), "home": home}


WriteKind = Literal["create", "replace", "replace_any", "merge", "upsert_merge", "delete"]


@dataclass(frozen=True)
class Write:
    """One operation of a transaction: create a row; replace it If-Match ``etag`` (``replace``)
    or whatever its version (``replace_any``); merge properties into it (``merge``: it must
    exist; ``upsert_merge``: made if missing); delete it (If-Match ``etag`` when given)."""

    kind: WriteKind
    entity: dict[str, Any]
    etag: str | None = None


# (kind, id): what an operation writes. Kinds: "fence", "request", "account", and the
# cross-shard rows of shared/domain/exchange.py ("coord", "escrow", "inbox", "vote", "applied").
Subject = tuple[str, str]


@dataclass(frozen=True)
class TransactionPlan:
    """One fenced transaction: its writes and, for each, what it writes (for errors)."""

    writes: list[Write]
    subjects: list[Subject] = field(default_factory=list)


def fence_entity(partition: str, epoch: int, holder: str, claimed_at: str,
                 last_commit_at: str) -> dict[str, Any]:
    """The fence row as stored."""
    return {"PartitionKey": partition, "RowKey": FENCE_ROW, "epoch": epoch,
            "holder": holder, "claimedAt": claimed_at, "lastCommitAt": last_commit_at}


def outcome_entity(partition: str, outcome: Outcome, fence: Fence,
                   stamp: str) -> dict[str, Any]:
    """The outcome row as stored: every property bounded, whatever the request held."""
    steps = outcome.steps[:MAX_RECORDED_STEPS]
    return {
        "PartitionKey": partition, "RowKey": request_key(outcome.request_id),
        "status": outcome.status.value, "reason": bounded(outcome.reason), "decidedAt": stamp,
        "epoch": fence.epoch, "decidedBy": fence.holder,
        "operations": outcome.operations,
        "expectedOperations": outcome.expected_operations,
        "legs": json.dumps([[acct, format_money(amt)] for acct, amt in outcome.legs]),
        "steps": json.dumps(dict(steps), separators=(",", ":")),
        "stepsComplete": len(steps) == len(outcome.steps),
        # A cross-shard decision is settled once every other shard applied (or released) it.
        **({"shards": json.dumps(list(outcome.shards)), "settled": False}
           if outcome.shards else {}),
    }


def account_entity(partition: str, account_id: str, balance: Decimal, reserved: Decimal,
                   fence: Fence, stamp: str) -> dict[str, Any]:
    """An account's row as stored (``reserved`` only when money is or was held in escrow)."""
    entity = {"PartitionKey": partition, "RowKey": account_key(account_id),
              "balance": format_money(balance), "epoch": fence.epoch, "updatedAt": stamp}
    if reserved:
        entity["reserved"] = format_money(reserved)
    return entity


def plan_transaction(partition: str, fence: Fence, outcomes: Sequence[Outcome],
                     balances: Mapping[str, tuple[AccountRow, Decimal]],
                     stamp: str, extra: Sequence[tuple[Subject, Write]] = (),
                     reserved: Mapping[str, Decimal] | None = None,
                     claims: Sequence[tuple[str, int]] = ()) -> TransactionPlan:
    """The fenced transaction that writes ``outcomes``, new ``balances`` and ``extra`` rows.

    The first operation replaces the fence If-Match its ETag: storage refuses the whole
    transaction once a newer epoch has written. Outcomes are creates (a request is decided
    once); accounts are replaced If-Match the ETag they were read with, or created, keeping
    the money they hold in escrow (or ``reserved[account]`` when given). ``extra`` are the
    cross-shard rows (shared/domain/exchange.py); ``claims`` (request id, home) the claims of
    requests decided here whose requestId's shard is this one (``claim_entity``).
    """
    if not outcomes and not extra and not balances:
        raise ValueError("a transaction needs something to write")
    size = 1 + len(outcomes) + len(balances) + len(extra) + len(claims)
    if size > MAX_TRANSACTION_OPERATIONS:
        raise ValueError(f"{size} operations exceed a transaction's "
                         f"{MAX_TRANSACTION_OPERATIONS}; split the batch")
    fence_row = fence_entity(partition, fence.epoch, fence.holder, fence.claimed_at, stamp)
    writes = [Write("replace", fence_row, fence.etag)]
    subjects: list[Subject] = [("fence", "")]
    for outcome in outcomes:
        writes.append(Write("create", outcome_entity(partition, outcome, fence, stamp)))
        subjects.append(("request", outcome.request_id))
    for account_id, (row, new_balance) in balances.items():
        held = row.reserved if reserved is None else reserved.get(account_id, row.reserved)
        entity = account_entity(partition, account_id, new_balance, held, fence, stamp)
        writes.append(Write("create", entity) if row.etag is None
                      else Write("replace", entity, row.etag))
        subjects.append(("account", account_id))
    for subject, write in extra:
        writes.append(write)
        subjects.append(subject)
    for request_id, home in claims:
        writes.append(Write("create", {"PartitionKey": partition,
                                       **claim_entity(request_id, home)}))
        subjects.append(("claim", request_id))
    return TransactionPlan(writes, subjects)


def classify_refusal(subject: Subject, code: str, epoch: int) -> Exception:
    """What a refused transaction means, from the row storage named and storage's error code.

    Only "already exists" on an outcome row means the request was decided before; only a
    failed condition on the fence means a newer epoch; a failed condition (or a create that
    found a row) on an account means it changed under the leader. Anything else is a
    ``LedgerWriteError``: the term stops and nothing is deleted.
    """
    kind, name = subject
    if kind == "fence" and code in (CONDITION_NOT_MET, NOT_FOUND):
        return FencedOut(f"epoch {epoch} is no longer current (the fence's ETag changed): "
                         "this attempt wrote nothing. If it was an SDK retry of an attempt "
                         "that did land, the next leader drops these steps as late")
    if kind == "request" and code == ALREADY_EXISTS:
        return OutcomeExists(name)
    if kind == "account" and code in (CONDITION_NOT_MET, ALREADY_EXISTS):
        return AccountChanged(name)
    if kind in ("coord", "vote", "applied", "escrow") and code == ALREADY_EXISTS:
        return AlreadyRecorded(kind, name)
    if kind == "claim" and code == ALREADY_EXISTS:
        return ClaimedElsewhere(name)
    if kind == "inbox" and code in (CONDITION_NOT_MET, NOT_FOUND):
        return InboxGone(name)
    where = f"the {kind} row {name!r}" if name else f"the {kind} row"
    return LedgerWriteError(
        f"storage refused the commit of epoch {epoch} at {where} with {code or 'no code'}: "
        "nothing was written and no completion was deleted; the term stops. Fix the cause "
        "(see docs/design.md, 'Storage limits'); the next leader retries")


def accounts_of(assessment: Assessment) -> set[str]:
    """The accounts a request's commit would touch."""
    return {account for account, _ in assessment.legs}


def plan_batches(ready: Sequence[Assessment], claims: bool = False,
                 event_chars: Callable[[Assessment], int] | None = None,
                 event_budget: int = 0) -> list[list[Assessment]]:
    """Group requests into transactions of at most 100 operations (fence + outcomes + accounts,
    and a claim per request with ``claims``). With ``event_chars`` (outcome events on) each
    transaction also holds one outbox row, whose events (``event_chars`` each, at most) stay
    within ``event_budget`` characters (``shared/domain/outbox.py``)."""
    per_request = 2 if claims else 1
    fixed = 1 if event_chars is None else 2  # the fence (and the outbox row)
    batches: list[list[Assessment]] = []
    batch: list[Assessment] = []
    accounts: set[str] = set()
    chars = 0
    for assessment in ready:
        merged = accounts | accounts_of(assessment)
        size = 0 if event_chars is None else event_chars(assessment)
        if batch and (fixed + per_request * (len(batch) + 1) + len(merged) >
                      MAX_TRANSACTION_OPERATIONS or
                      (event_chars is not None and chars + size > event_budget)):
            batches.append(batch)
            batch, merged, chars = [], accounts_of(assessment), 0
        batch.append(assessment)
        accounts = merged
        chars += size
    if batch:
        batches.append(batch)
    return batches
