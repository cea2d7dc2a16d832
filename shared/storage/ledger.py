"""The ledger table: balances, request outcomes and the fence, all in one partition.

Every write the leader makes is one entity-group transaction that starts with a conditional
update of the fence row (``If-Match`` the ETag this leader got when it claimed its epoch). A new
leader claims a higher epoch by updating that row, which changes its ETag, so any transaction of
a deposed leader fails as a whole: storage itself refuses it, atomically with the write.

One partition means one transaction can hold the fence, the outcomes and the balances together
(at most 100 operations, 4 MiB each), and also that the ledger is limited to one partition's
throughput (about 2,000 entities/s in Azure). docs/design.md says how to shard past it.

Everything written here fits Azure Table limits whatever the input (docs/design.md, "Storage
limits"): a reason is cut to ``MAX_REASON_CHARS``, an outcome keeps at most
``MAX_RECORDED_STEPS`` step digests, and legs exist only on commits (at most 50 of them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableEntity, TableTransactionError, UpdateMode

from shared.domain.contract import MAX_EXPECTED_OPERATIONS
from shared.domain.money import format_money, parse_balance
from shared.election.elector import TermEnded
from shared.storage.transactions import submit_transaction

logger = logging.getLogger(__name__)

LEDGER_PARTITION = "ledger"
FENCE_ROW = "fence"
ACCOUNT_PREFIX = "account:"
REQUEST_PREFIX = "request:"
MAX_TRANSACTION_OPERATIONS = 100
MAX_REASON_CHARS = 1_000  # a table property holds 32K characters; reasons stay far below
MAX_RECORDED_STEPS = MAX_EXPECTED_OPERATIONS  # step digests kept on an outcome row

# Storage's error codes that mean something to the leader (anything else stops the term).
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


class OutcomeExists(RuntimeError):
    """The request already has an outcome: the steps at hand are late deliveries."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} already has an outcome")
        self.request_id = request_id


class AccountChanged(RuntimeError):
    """An account row changed under the leader (an operator edit?): re-read it and retry."""

    def __init__(self, account_id: str) -> None:
        super().__init__(f"account {account_id} changed since it was read")
        self.account_id = account_id


@dataclass
class Fence:
    """The fence row: the current epoch, its holder, and the row's ETag."""

    epoch: int
    etag: str
    holder: str
    claimed_at: str
    last_commit_at: str = ""


@dataclass(frozen=True)
class LedgerSnapshot:
    """What a leader knew when its last transaction landed.

    Every ledger write changes the fence's ETag, so while the fence still has ``etag`` nothing
    was written since and ``balances`` are current: the next term may start from them.
    """

    epoch: int
    etag: str
    last_commit_at: str
    balances: Mapping[str, AccountRow]


@dataclass(frozen=True)
class AccountRow:
    """An account's balance and the ETag it was read with (``None``: no row yet, balance 0)."""

    account_id: str
    balance: Decimal
    etag: str | None


Leg = tuple[str, Decimal]  # (accountId, signed amount)


@dataclass(frozen=True)
class Outcome:
    """The final word on one request, written exactly once."""

    request_id: str
    status: str  # committed | aborted | rejected | expired
    reason: str
    legs: tuple[Leg, ...] = ()  # applied on commit
    operations: int = 0  # distinct operationIds seen when it was decided
    expected_operations: int = 0  # what the steps said (0: they disagreed)
    steps: tuple[tuple[str, str], ...] = ()  # (operationId, contentKey) of the decided steps


@dataclass(frozen=True)
class DecidedOutcome:
    """An outcome as stored: what was decided, when, and by which epoch."""

    outcome: Outcome
    decided_at: str
    epoch: int
    decided_by: str
    steps_complete: bool  # False when the row keeps only the first MAX_RECORDED_STEPS digests

    @property
    def step_contents(self) -> dict[str, str]:
        """operationId -> contentKey of the steps the outcome was decided on."""
        return dict(self.outcome.steps)


@dataclass
class CommitResult:
    """What one fenced transaction wrote."""

    fence: Fence
    accounts: dict[str, AccountRow] = field(default_factory=dict)


def account_key(account_id: str) -> str:
    """The row key of an account's balance."""
    return ACCOUNT_PREFIX + account_id


def request_key(request_id: str) -> str:
    """The row key of a request's outcome."""
    return REQUEST_PREFIX + request_id


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying that it was cut."""
    if len(text) <= limit:
        return text
    keep = limit - len(f"... ({len(text)} more characters)")  # the count has no more digits
    return f"{text[:keep]}... ({len(text) - keep} more characters)"


# --- rows <-> entities (pure) ---------------------------------------------------------------
def fence_entity(partition: str, epoch: int, holder: str, claimed_at: str,
                 last_commit_at: str) -> dict[str, Any]:
    """The fence row as stored."""
    return {"PartitionKey": partition, "RowKey": FENCE_ROW, "epoch": epoch,
            "holder": holder, "claimedAt": claimed_at, "lastCommitAt": last_commit_at}


def _fence(row: TableEntity) -> Fence:
    return Fence(int(row["epoch"]), str(row.metadata["etag"]), str(row.get("holder", "")),
                 str(row.get("claimedAt", "")), str(row.get("lastCommitAt", "")))


def outcome_entity(partition: str, outcome: Outcome, fence: Fence,
                   stamp: str) -> dict[str, Any]:
    """The outcome row as stored: every property bounded, whatever the request held."""
    steps = outcome.steps[:MAX_RECORDED_STEPS]
    return {
        "PartitionKey": partition, "RowKey": request_key(outcome.request_id),
        "status": outcome.status, "reason": bounded(outcome.reason), "decidedAt": stamp,
        "epoch": fence.epoch, "decidedBy": fence.holder,
        "operations": outcome.operations,
        "expectedOperations": outcome.expected_operations,
        "legs": json.dumps([[acct, format_money(amt)] for acct, amt in outcome.legs]),
        "steps": json.dumps(dict(steps), separators=(",", ":")),
        "stepsComplete": len(steps) == len(outcome.steps),
    }


def _decided(row: TableEntity) -> DecidedOutcome:
    steps = json.loads(row.get("steps") or "{}")
    outcome = Outcome(
        request_id=str(row["RowKey"]).removeprefix(REQUEST_PREFIX),
        status=str(row["status"]), reason=str(row.get("reason") or ""),
        legs=tuple((str(a), parse_balance(m)) for a, m in json.loads(row.get("legs") or "[]")),
        operations=int(row.get("operations") or 0),
        expected_operations=int(row.get("expectedOperations") or 0),
        steps=tuple(sorted(steps.items())))
    return DecidedOutcome(outcome, str(row.get("decidedAt", "")), int(row.get("epoch") or 0),
                          str(row.get("decidedBy", "")),
                          # rows written before step digests were kept have no "steps"
                          bool(row.get("stepsComplete", False)) and "steps" in row)


@dataclass(frozen=True)
class TransactionPlan:
    """One fenced transaction: its operations and, for each, what it writes (for errors)."""

    operations: list[Any]
    subjects: list[tuple[str, str]]  # ("fence" | "request" | "account", id)


def plan_transaction(partition: str, fence: Fence, outcomes: Sequence[Outcome],
                     balances: Mapping[str, tuple[AccountRow, Decimal]],
                     stamp: str) -> TransactionPlan:
    """The fenced transaction that writes ``outcomes`` and new ``balances`` (pure).

    The first operation updates the fence If-Match its ETag: storage refuses the whole
    transaction once a newer epoch has written. Outcomes are creates (a request is decided
    once); accounts are updates If-Match the ETag they were read with, or creates.
    """
    if not outcomes:
        raise ValueError("commit needs at least one outcome")
    size = 1 + len(outcomes) + len(balances)
    if size > MAX_TRANSACTION_OPERATIONS:
        raise ValueError(f"{size} operations exceed a transaction's "
                         f"{MAX_TRANSACTION_OPERATIONS}; split the batch")
    fence_row = fence_entity(partition, fence.epoch, fence.holder, fence.claimed_at, stamp)
    operations: list[Any] = [("update", fence_row, {
        "mode": UpdateMode.REPLACE, "etag": fence.etag,
        "match_condition": MatchConditions.IfNotModified})]
    subjects: list[tuple[str, str]] = [("fence", "")]
    for outcome in outcomes:
        operations.append(("create", outcome_entity(partition, outcome, fence, stamp)))
        subjects.append(("request", outcome.request_id))
    for account_id, (row, new_balance) in balances.items():
        entity = {"PartitionKey": partition, "RowKey": account_key(account_id),
                  "balance": format_money(new_balance), "epoch": fence.epoch,
                  "updatedAt": stamp}
        if row.etag is None:
            operations.append(("create", entity))
        else:
            operations.append(("update", entity, {
                "mode": UpdateMode.REPLACE, "etag": row.etag,
                "match_condition": MatchConditions.IfNotModified}))
        subjects.append(("account", account_id))
    return TransactionPlan(operations, subjects)


def classify_refusal(plan: TransactionPlan, index: int, code: str, epoch: int) -> Exception:
    """What a refused transaction means, from the row storage named and storage's error code.

    Only "already exists" on an outcome row means the request was decided before; only a
    failed condition on the fence means a newer epoch; a failed condition (or a create that
    found a row) on an account means it changed under the leader. Anything else is a
    ``LedgerWriteError``: the term stops and nothing is deleted.
    """
    kind, subject = plan.subjects[index] if 0 <= index < len(plan.subjects) else ("?", "")
    if kind == "fence" and code in (CONDITION_NOT_MET, NOT_FOUND):
        return FencedOut(f"epoch {epoch} is no longer current (the fence's ETag changed): "
                         "this attempt wrote nothing. If it was an SDK retry of an attempt "
                         "that did land, the next leader drops these steps as late")
    if kind == "request" and code == ALREADY_EXISTS:
        return OutcomeExists(subject)
    if kind == "account" and code in (CONDITION_NOT_MET, ALREADY_EXISTS):
        return AccountChanged(subject)
    where = f"the {kind} row {subject!r}" if subject else f"the {kind} row"
    return LedgerWriteError(
        f"storage refused the commit of epoch {epoch} at {where} with {code or 'no code'}: "
        "nothing was written and no completion was deleted; the term stops. Fix the cause "
        "(see docs/design.md, 'Storage limits'); the next leader retries")


class Ledger:
    """Reads and fenced writes of the ledger partition."""

    def __init__(self, table: TableClient, partition: str = LEDGER_PARTITION) -> None:
        self.table = table
        self.partition = partition

    # --- the fence -------------------------------------------------------------------------
    def read_fence(self) -> Fence | None:
        """The fence row, or ``None`` before the first leader."""
        try:
            return _fence(self.table.get_entity(self.partition, FENCE_ROW))
        except ResourceNotFoundError:
            return None

    def claim_epoch(self, holder: str, now: datetime, known: LedgerSnapshot | None = None,
                    attempts: int = 5) -> tuple[Fence, bool]:
        """Claim the next epoch with a conditional update; every later write depends on it.

        With ``known`` (this process's last snapshot) the claim is one call when nothing was
        written since; the second value is then True and the snapshot's balances are current.
        """
        claimed_at = now.isoformat()
        # 1. Fast path: nothing was written since this process's last commit, so the fence
        #    still has the snapshot's ETag and one conditional update claims the next epoch.
        if known is not None:
            entity = fence_entity(self.partition, known.epoch + 1, holder, claimed_at,
                                  known.last_commit_at)
            try:
                meta = self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=known.etag,
                                                match_condition=MatchConditions.IfNotModified)
                return Fence(known.epoch + 1, meta["etag"], holder, claimed_at,
                             known.last_commit_at), True
            except (ResourceModifiedError, ResourceNotFoundError):
                pass  # someone wrote since: claim the long way
        # 2. Slow path: read the fence, then update it If-Match what was read.
        seen: int | None = None
        for _ in range(attempts):
            # 2a. No fence yet: the first leader ever creates it with epoch 1.
            current = self.read_fence()
            if current is None:
                entity = fence_entity(self.partition, 1, holder, claimed_at, last_commit_at="")
                try:
                    meta = self.table.create_entity(entity)
                except ResourceExistsError:
                    continue
                return Fence(1, meta["etag"], holder, claimed_at), False
            # 2b. Our own claim landed but its response was lost (the holder names our lease).
            if current.holder == holder:
                return current, False
            # 2c. The epoch moved between two of our reads: another leader is claiming too.
            if seen is not None and current.epoch > seen:
                raise FencedOut(f"epoch {current.epoch} was claimed by {current.holder} while "
                                "this claim was in flight: another leader is active")
            seen = current.epoch
            # 2d. Claim epoch + 1 If-Match the ETag just read; a deposed leader's last commit
            #     in between changes it, and we read again.
            entity = fence_entity(self.partition, seen + 1, holder, claimed_at,
                                  current.last_commit_at)
            try:
                meta = self.table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=current.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
            except ResourceModifiedError:
                continue
            return Fence(seen + 1, meta["etag"], holder, claimed_at,
                         current.last_commit_at), False
        raise FencedOut(f"could not claim an epoch in {attempts} attempts: the fence keeps "
                        "changing, so another leader is active")

    # --- reads -----------------------------------------------------------------------------
    def read_account(self, account_id: str) -> AccountRow:
        """One account's balance (0 with no ETag when it has no row yet)."""
        try:
            row = self.table.get_entity(self.partition, account_key(account_id))
        except ResourceNotFoundError:
            return AccountRow(account_id, Decimal("0.00"), None)
        return AccountRow(account_id, parse_balance(row["balance"]), row.metadata["etag"])

    def read_outcome(self, request_id: str) -> DecidedOutcome | None:
        """A request's outcome, or ``None`` while it has none."""
        try:
            return _decided(self.table.get_entity(self.partition, request_key(request_id)))
        except ResourceNotFoundError:
            return None

    def _prefixed(self, prefix: str) -> Iterator[TableEntity]:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return iter(self.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": self.partition, "low": prefix, "high": upper}))

    def list_outcomes(self) -> list[DecidedOutcome]:
        """Every outcome (a scan: for operators, the demo and checks, not the hot path)."""
        return [_decided(row) for row in self._prefixed(REQUEST_PREFIX)]

    def list_balances(self) -> dict[str, Decimal]:
        """Every account's balance (a scan, like ``list_outcomes``)."""
        return {row["RowKey"].removeprefix(ACCOUNT_PREFIX): parse_balance(row["balance"])
                for row in self._prefixed(ACCOUNT_PREFIX)}

    # --- the one write path ----------------------------------------------------------------
    def commit(self, fence: Fence, outcomes: Sequence[Outcome],
               balances: Mapping[str, tuple[AccountRow, Decimal]], now: datetime) -> CommitResult:
        """Write outcomes and new balances in one transaction fenced by ``fence``.

        ``balances`` maps an account id to (the row as read, its new balance). Raises
        ``FencedOut``, ``OutcomeExists``, ``AccountChanged`` or ``LedgerWriteError``; in each
        case nothing was written.
        """
        stamp = now.isoformat()
        plan = plan_transaction(self.partition, fence, outcomes, balances, stamp)
        try:
            results = submit_transaction(self.table, plan.operations)  # the fast path
        except TableTransactionError as exc:
            error_code = getattr(exc, "error_code", None)  # set by azure-core from the answer
            code = str(getattr(error_code, "value", error_code) or "")
            refusal = classify_refusal(plan, exc.index, code, fence.epoch)
            if isinstance(refusal, LedgerWriteError):
                logger.error("%s", refusal)
            raise refusal from exc
        fence.etag = results[0]["etag"]
        fence.last_commit_at = stamp
        written: dict[str, AccountRow] = {}
        for (kind, subject), result in zip(plan.subjects, results, strict=True):
            if kind == "account":
                written[subject] = AccountRow(subject, balances[subject][1], result["etag"])
        return CommitResult(fence, written)


def outcome_view(decided: DecidedOutcome) -> dict[str, Any]:
    """The public shape of an outcome (for the read API)."""
    return {"status": decided.outcome.status, "reason": decided.outcome.reason or None,
            "decidedAt": decided.decided_at, "epoch": decided.epoch}
