"""The ledger table: balances, request outcomes and the fence, all in one partition.

Every write the leader makes is one entity-group transaction that starts with a conditional
update of the fence row (``If-Match`` the ETag this leader got when it claimed its epoch). A new
leader claims a higher epoch by updating that row, which changes its ETag, so any transaction of
a deposed leader fails as a whole: storage itself refuses it, atomically with the write.

One partition means one transaction can hold the fence, the outcomes and the balances together
(at most 100 operations, 4 MiB each), and also that the ledger is limited to one partition's
throughput (about 2,000 entities/s in Azure). docs/design.md says how to shard past it.
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

from shared.money import format_money, parse_balance

logger = logging.getLogger(__name__)

LEDGER_PARTITION = "ledger"
FENCE_ROW = "fence"
ACCOUNT_PREFIX = "account:"
REQUEST_PREFIX = "request:"
MAX_TRANSACTION_OPERATIONS = 100


class FencedOut(RuntimeError):
    """A newer leader has claimed a higher epoch: this leader must stop; it committed nothing."""


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
    """The epoch this leader claimed and the fence row's current ETag."""

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


@dataclass(frozen=True)
class Outcome:
    """The final word on one request, written exactly once."""

    request_id: str
    status: str  # committed | aborted | rejected | expired
    reason: str
    legs: tuple[tuple[str, Decimal], ...] = ()  # (accountId, signed amount) applied on commit
    operations: int = 0


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


class Ledger:
    """Reads and fenced writes of the ledger partition."""

    def __init__(self, table: TableClient, partition: str = LEDGER_PARTITION) -> None:
        self.table = table
        self.partition = partition

    # --- the fence -------------------------------------------------------------------------
    def read_fence(self) -> dict[str, Any] | None:
        """The fence row as stored, or ``None`` before the first leader."""
        try:
            return dict(self.table.get_entity(self.partition, FENCE_ROW))
        except ResourceNotFoundError:
            return None

    def claim_epoch(self, holder: str, now: datetime, known: LedgerSnapshot | None = None,
                    attempts: int = 5) -> tuple[Fence, bool]:
        """Claim the next epoch with a conditional update; every later write depends on it.

        With ``known`` (this process's last snapshot) the claim is one call when nothing was
        written since; the second value is then True and the snapshot's balances are current.
        """
        if known is not None:
            entity = self._fence_entity(known.epoch + 1, holder, now.isoformat(),
                                        known.last_commit_at)
            try:
                meta = self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=known.etag,
                                                match_condition=MatchConditions.IfNotModified)
                return Fence(known.epoch + 1, meta["etag"], holder, entity["claimedAt"],
                             known.last_commit_at), True
            except (ResourceModifiedError, ResourceNotFoundError):
                pass  # someone wrote since: claim the long way
        seen: int | None = None
        for _ in range(attempts):
            try:
                current = self.table.get_entity(self.partition, FENCE_ROW)
            except ResourceNotFoundError:
                entity = self._fence_entity(1, holder, now.isoformat(), last_commit_at="")
                try:
                    meta = self.table.create_entity(entity)
                except ResourceExistsError:
                    continue
                return Fence(1, meta["etag"], holder, entity["claimedAt"]), False
            if current.get("holder") == holder:
                # Our own claim landed but its response was lost (the holder names our lease).
                return Fence(int(current["epoch"]), str(current.metadata["etag"]), holder,
                             str(current["claimedAt"]), str(current.get("lastCommitAt", ""))), False
            if seen is not None and int(current["epoch"]) > seen:
                raise FencedOut(f"epoch {current['epoch']} was claimed by {current.get('holder')} "
                                "while this claim was in flight: another leader is active")
            seen = int(current["epoch"])
            epoch = seen + 1
            entity = self._fence_entity(epoch, holder, now.isoformat(),
                                        last_commit_at=str(current.get("lastCommitAt", "")))
            try:
                meta = self.table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=current.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            except ResourceModifiedError:
                continue  # a deposed leader's last commit landed in between: read again
            return Fence(epoch, meta["etag"], holder, entity["claimedAt"],
                         entity["lastCommitAt"]), False
        raise FencedOut(f"could not claim an epoch in {attempts} attempts: the fence keeps "
                        "changing, so another leader is active")

    def _fence_entity(self, epoch: int, holder: str, claimed_at: str,
                      last_commit_at: str) -> dict[str, Any]:
        return {"PartitionKey": self.partition, "RowKey": FENCE_ROW, "epoch": epoch,
                "holder": holder, "claimedAt": claimed_at, "lastCommitAt": last_commit_at}

    # --- reads -----------------------------------------------------------------------------
    def read_account(self, account_id: str) -> AccountRow:
        """One account's balance (0 with no ETag when it has no row yet)."""
        try:
            row = self.table.get_entity(self.partition, account_key(account_id))
        except ResourceNotFoundError:
            return AccountRow(account_id, Decimal("0.00"), None)
        return AccountRow(account_id, parse_balance(row["balance"]), row.metadata["etag"])

    def read_outcome(self, request_id: str) -> dict[str, Any] | None:
        """A request's outcome row, or ``None`` while it has none."""
        try:
            return dict(self.table.get_entity(self.partition, request_key(request_id)))
        except ResourceNotFoundError:
            return None

    def _prefixed(self, prefix: str) -> Iterator[TableEntity]:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return iter(self.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": self.partition, "low": prefix, "high": upper}))

    def list_outcomes(self) -> list[dict[str, Any]]:
        """Every outcome row (a scan: for operators, the demo and checks, not the hot path)."""
        return [dict(row) for row in self._prefixed(REQUEST_PREFIX)]

    def list_balances(self) -> dict[str, Decimal]:
        """Every account's balance (a scan, like ``list_outcomes``)."""
        return {row["RowKey"].removeprefix(ACCOUNT_PREFIX): parse_balance(row["balance"])
                for row in self._prefixed(ACCOUNT_PREFIX)}

    # --- the one write path ----------------------------------------------------------------
    def commit(self, fence: Fence, outcomes: Sequence[Outcome],
               balances: Mapping[str, tuple[AccountRow, Decimal]], now: datetime) -> CommitResult:
        """Write outcomes and new balances in one transaction fenced by ``fence``.

        ``balances`` maps an account id to (the row as read, its new balance). Raises
        ``FencedOut``, ``OutcomeExists`` or ``AccountChanged``; in each case nothing was written.
        """
        if not outcomes:
            raise ValueError("commit needs at least one outcome")
        size = 1 + len(outcomes) + len(balances)
        if size > MAX_TRANSACTION_OPERATIONS:
            raise ValueError(f"{size} operations exceed a transaction's "
                             f"{MAX_TRANSACTION_OPERATIONS}; split the batch")
        stamp = now.isoformat()
        fence_row = self._fence_entity(fence.epoch, fence.holder, fence.claimed_at, stamp)
        operations: list[Any] = [("update", fence_row, {
            "mode": UpdateMode.REPLACE, "etag": fence.etag,
            "match_condition": MatchConditions.IfNotModified})]
        subjects: list[tuple[str, str]] = [("fence", "")]
        for outcome in outcomes:
            operations.append(("create", {
                "PartitionKey": self.partition, "RowKey": request_key(outcome.request_id),
                "status": outcome.status, "reason": outcome.reason, "decidedAt": stamp,
                "epoch": fence.epoch, "decidedBy": fence.holder,
                "operations": outcome.operations,
                "legs": json.dumps([[acct, format_money(amt)] for acct, amt in outcome.legs]),
            }))
            subjects.append(("request", outcome.request_id))
        for account_id, (row, new_balance) in balances.items():
            entity = {"PartitionKey": self.partition, "RowKey": account_key(account_id),
                      "balance": format_money(new_balance), "epoch": fence.epoch,
                      "updatedAt": stamp}
            if row.etag is None:
                operations.append(("create", entity))
            else:
                operations.append(("update", entity, {
                    "mode": UpdateMode.REPLACE, "etag": row.etag,
                    "match_condition": MatchConditions.IfNotModified}))
            subjects.append(("account", account_id))
        try:
            results = self.table.submit_transaction(operations)
        except TableTransactionError as exc:
            kind, subject = subjects[exc.index] if 0 <= exc.index < len(subjects) else ("?", "")
            if kind == "fence":
                raise FencedOut(f"epoch {fence.epoch} is no longer current (the fence's ETag "
                                "changed): this attempt wrote nothing. If it was an SDK retry "
                                "of an attempt that did land, the next leader drops these "
                                "steps as late") from exc
            if kind == "request":
                raise OutcomeExists(subject) from exc
            if kind == "account":
                raise AccountChanged(subject) from exc
            raise
        fence.etag = results[0]["etag"]
        fence.last_commit_at = stamp
        written: dict[str, AccountRow] = {}
        for (kind, subject), result in zip(subjects, results, strict=True):
            if kind == "account":
                written[subject] = AccountRow(subject, balances[subject][1], result["etag"])
        return CommitResult(fence, written)


def outcome_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The public shape of an outcome row (for the read API)."""
    return {"status": row["status"], "reason": row.get("reason") or None,
            "decidedAt": row.get("decidedAt"), "epoch": row.get("epoch")}


def request_id_of(row_key: str) -> str:
    """The request id in an outcome row's key (the inverse of ``request_key``)."""
    if not row_key.startswith(REQUEST_PREFIX):
        raise ValueError(f"{row_key!r} is not an outcome row key ({REQUEST_PREFIX}<requestId>)")
    return row_key.removeprefix(REQUEST_PREFIX)
