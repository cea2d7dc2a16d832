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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from shared.domain.exchange import (
    COORD_PREFIX,
    ESCROW_PREFIX,
    FLIGHT_PREFIX,
    INBOX_PREFIX,
    Coordination,
    Escrow,
    Flight,
    ShardMessage,
)
from shared.domain.model import (
    AccountRow,
    DecidedOutcome,
    Fence,
    LedgerSnapshot,
    Outcome,
    OutcomeStatus,
)
from shared.domain.money import parse_balance
from shared.domain.planning import (
    ACCOUNT_PREFIX,
    CLAIM_PREFIX,
    FENCE_ROW,
    LEDGER_PARTITION,
    REQUEST_PREFIX,
    FencedOut,
    LedgerWriteError,
    Subject,
    Write,
    account_key,
    claim_entity,
    claim_key,
    classify_refusal,
    fence_entity,
    plan_transaction,
    request_key,
)
from shared.errors import AlreadyExists, BatchRefused, ConditionFailed, NotFound, StorageError
from shared.storage.bounded import Bounded, take_bounded
from shared.storage.ports import Mode, Operation, Row, Table
from shared.storage.rows import create_once, prefix_range

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitResult:
    """What one fenced transaction wrote: the fence's new version and the accounts' rows."""

    fence: Fence
    accounts: dict[str, AccountRow] = field(default_factory=dict)
    outbox: dict[str, str] = field(default_factory=dict)  # outbox rows created: key -> ETag


MAP_GENERATION = "mapGeneration"  # on the fence: the shard map generation of its writer


class MapMoved(FencedOut):
    """The fence was written under a newer shard map than this process's: reload the map.

    A reshard stamps every shard's fence with the new map's generation, and every fence write
    carries the writer's; a process whose map is older cannot claim an epoch
    (``Ledger.claim_epoch``), so it never writes under a map that is no longer in force.
    """

    def __init__(self, generation: int, mine: int, partition: str) -> None:
        super().__init__(f"the fence of {partition} was written under shard map generation "
                         f"{generation}; this process has generation {mine}: it reloads the map")
        self.generation = generation


def _generation(row: Mapping[str, Any]) -> int:
    return int(row.get(MAP_GENERATION) or 0)


RELEASED_EPOCH = "releasedEpoch"  # on the fence: the epoch whose holder released its lease
TAKEOVER_ROW = "fence:takeover"  # the shard's latest takeover (``Takeover``)


@dataclass(frozen=True)
class Takeover:
    """A claim of a shard's epoch whose previous holder had not released its lease: it died,
    was paused past its lease, or lost it to a break. A hand-over (the holder released, another
    instance claimed the next epoch, as happens all the time) is not one."""

    epoch: int  # the epoch claimed
    at: str  # when (the claim's time, ISO-8601)
    from_epoch: int
    from_holder: str
    to_holder: str


def _fence(row: Row) -> Fence:
    return Fence(int(row["epoch"]), str(row.etag), str(row.get("holder", "")),
                 str(row.get("claimedAt", "")), str(row.get("lastCommitAt", "")),
                 int(row.get(RELEASED_EPOCH) or 0))


def _decided(row: Row) -> DecidedOutcome:
    steps = json.loads(row.get("steps") or "{}")
    shards = tuple(int(k) for k in json.loads(row.get("shards") or "[]"))
    outcome = Outcome(
        request_id=str(row["RowKey"]).removeprefix(REQUEST_PREFIX),
        status=OutcomeStatus(str(row["status"])), reason=str(row.get("reason") or ""),
        legs=tuple((str(a), parse_balance(m)) for a, m in json.loads(row.get("legs") or "[]")),
        operations=int(row.get("operations") or 0),
        expected_operations=int(row.get("expectedOperations") or 0),
        steps=tuple(sorted(steps.items())), shards=shards)
    return DecidedOutcome(outcome, str(row.get("decidedAt", "")), int(row.get("epoch") or 0),
                          str(row.get("decidedBy", "")),
                          # rows written before step digests were kept have no "steps"
                          bool(row.get("stepsComplete", False)) and "steps" in row,
                          settled=bool(row.get("settled", True)))


def _operation(write: Write) -> Operation:
    """A planned write as the table's transaction operation."""
    if write.kind == "create":
        return ("create", write.entity)
    if write.kind == "replace":
        return ("update", write.entity, {"mode": Mode.REPLACE, "etag": write.etag})
    if write.kind == "replace_any":
        return ("update", write.entity, {"mode": Mode.REPLACE})
    if write.kind == "merge":
        return ("update", write.entity, {"mode": Mode.MERGE})
    if write.kind == "upsert_merge":
        return ("upsert", write.entity, {"mode": Mode.MERGE})
    return ("delete", write.entity, {"etag": write.etag} if write.etag else {})


def _account(account_id: str, row: Row) -> AccountRow:
    return AccountRow(account_id, parse_balance(row["balance"]), row.etag,
                      parse_balance(row.get("reserved") or "0.00"))


class Ledger:
    """Reads and fenced writes of the ledger partition."""

    def __init__(self, table: Table, partition: str = LEDGER_PARTITION,
                 map_generation: Callable[[], int] | None = None) -> None:
        self.table = table
        self.partition = partition
        # The shard map generation this process writes under (0: not map-aware, never checked).
        self.map_generation: Callable[[], int] = map_generation or (lambda: 0)

    def _stamped(self, entity: dict[str, Any]) -> dict[str, Any]:
        """A fence entity with this process's map generation (when it has one)."""
        generation = self.map_generation()
        return {**entity, MAP_GENERATION: generation} if generation else entity

    def _check_generation(self, row: Mapping[str, Any]) -> None:
        """Raise ``MapMoved`` when the fence was written under a newer map than ours."""
        mine = self.map_generation()
        if mine and _generation(row) > mine:
            raise MapMoved(_generation(row), mine, self.partition)

    # --- the fence -------------------------------------------------------------------------
    def read_fence(self) -> Fence | None:
        """The fence row, or ``None`` before the first leader."""
        row = self.read_row(FENCE_ROW)
        return None if row is None else _fence(row)

    def mark_released(self, fence: Fence) -> str | None:
        """Note on the fence that ``fence``'s holder is releasing its lease, so that the next
        claim is a hand-over and not a takeover (one merge, ``If-Match`` ``fence``: balances and
        epoch unchanged). The fence's new ETag; ``None`` when the fence changed meanwhile (a
        newer claim) or storage did not answer: the next claim then records a takeover."""
        try:
            written = self.table.update({"PartitionKey": self.partition, "RowKey": FENCE_ROW,
                                         RELEASED_EPOCH: fence.epoch},
                                        mode=Mode.MERGE, etag=fence.etag)
        except StorageError as exc:
            logger.info("could not mark epoch %d of %s released: %s", fence.epoch,
                        self.partition, exc)
            return None
        return str(written.etag)

    def _record_takeover(self, takeover: Takeover) -> None:
        """Keep the shard's latest takeover for operators (what they see; nothing reads it to
        decide anything, so a failure is logged, not raised)."""
        try:
            self.table.upsert({"PartitionKey": self.partition, "RowKey": TAKEOVER_ROW,
                               "epoch": takeover.epoch, "at": takeover.at,
                               "fromEpoch": takeover.from_epoch, "from": takeover.from_holder,
                               "to": takeover.to_holder}, mode=Mode.REPLACE)
        except StorageError as exc:
            logger.warning("could not record the takeover of %s at epoch %d: %s",
                           self.partition, takeover.epoch, exc)

    def read_takeover(self) -> Takeover | None:
        """The shard's latest takeover, or ``None`` (never taken over since it was recorded)."""
        row = self.read_row(TAKEOVER_ROW)
        if row is None:
            return None
        return Takeover(int(row.get("epoch") or 0), str(row.get("at", "")),
                        int(row.get("fromEpoch") or 0), str(row.get("from", "")),
                        str(row.get("to", "")))

    def fence_generation(self) -> int:
        """The shard map generation the fence was last written under (0: none recorded)."""
        row = self.read_row(FENCE_ROW)
        return 0 if row is None else _generation(row)

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
            entity = self._stamped(fence_entity(self.partition, known.epoch + 1, holder,
                                                claimed_at, known.last_commit_at))
            try:
                written = self.table.update(entity, mode=Mode.REPLACE, etag=known.etag)
                return Fence(known.epoch + 1, str(written.etag), holder, claimed_at,
                             known.last_commit_at), True
            except (ConditionFailed, NotFound):
                pass  # someone wrote since: claim the long way
        # 2. Slow path: read the fence, then update it If-Match what was read.
        seen: int | None = None
        for _ in range(attempts):
            # 2a. No fence yet: the first leader ever creates it with epoch 1.
            row = self.read_row(FENCE_ROW)
            if row is not None:
                self._check_generation(row)  # a reshard moved the map on: reload it first
            current = None if row is None else _fence(row)
            if current is None:
                entity = self._stamped(fence_entity(self.partition, 1, holder, claimed_at,
                                                    last_commit_at=""))
                try:
                    written = self.table.create(entity)
                except AlreadyExists:
                    continue
                return Fence(1, str(written.etag), holder, claimed_at), False
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
            entity = {**fence_entity(self.partition, seen + 1, holder, claimed_at,
                                     current.last_commit_at),
                      MAP_GENERATION: max(_generation(row or {}), self.map_generation())}
            try:
                written = self.table.update(entity, mode=Mode.REPLACE, etag=current.etag)
            except ConditionFailed:
                continue
            if not current.released:
                self._record_takeover(Takeover(seen + 1, claimed_at, current.epoch,
                                               current.holder, holder))
            return Fence(seen + 1, str(written.etag), holder, claimed_at,
                         current.last_commit_at), False
        raise FencedOut(f"could not claim an epoch in {attempts} attempts: the fence keeps "
                        "changing, so another leader is active")

    # --- reads -----------------------------------------------------------------------------
    def read_account(self, account_id: str) -> AccountRow:
        """One account's balance (0 with no ETag when it has no row yet)."""
        try:
            row = self.table.get(self.partition, account_key(account_id))
        except NotFound:
            return AccountRow(account_id, Decimal("0.00"), None)
        return _account(account_id, row)

    def read_outcome(self, request_id: str) -> DecidedOutcome | None:
        """A request's outcome, or ``None`` while it has none."""
        try:
            return _decided(self.table.get(self.partition, request_key(request_id)))
        except NotFound:
            return None

    def _prefixed(self, prefix: str) -> Iterator[Row]:
        return iter(self.table.query(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": self.partition, **prefix_range(prefix)}))

    def outcome_rows(self, limit: int, select: list[str],
                     decided_since: str = "") -> Bounded[dict[str, Any]]:
        """At most ``limit`` outcome rows (decided at or after ``decided_since`` when given),
        as stored, with the properties in ``select``: for the status page's counts."""
        query = "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high"
        parameters = {"pk": self.partition, **prefix_range(REQUEST_PREFIX)}
        if decided_since:
            query += " and decidedAt ge @since"
            parameters["since"] = decided_since
        rows = self.table.query(query, parameters=parameters, select=select, page_size=1000)
        return take_bounded((dict(row) for row in rows), limit)

    def list_outcomes(self) -> list[DecidedOutcome]:
        """Every outcome (a scan: for operators, the demo and checks, not the hot path)."""
        return [_decided(row) for row in self._prefixed(REQUEST_PREFIX)]

    def list_balances(self) -> dict[str, Decimal]:
        """Every account's balance (a scan, like ``list_outcomes``)."""
        return {row["RowKey"].removeprefix(ACCOUNT_PREFIX): parse_balance(row["balance"])
                for row in self._prefixed(ACCOUNT_PREFIX)}

    def list_accounts(self) -> dict[str, AccountRow]:
        """Every account's row, balance and money held in escrow (a scan)."""
        return {(name := row["RowKey"].removeprefix(ACCOUNT_PREFIX)): _account(name, row)
                for row in self._prefixed(ACCOUNT_PREFIX)}

    def list_rows(self, prefix: str) -> list[Row]:
        """Every row whose key starts with ``prefix`` (a scan: checks and operators)."""
        return list(self._prefixed(prefix))

    # --- work in flight between shards (shared/domain/exchange.py) ---------------------------
    def read_flight(self) -> tuple[Flight, datetime | None]:
        """The shard's coordinations, inbox and escrows (one key range), and storage's time."""
        rows = self.table.query(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": self.partition, **prefix_range(FLIGHT_PREFIX)}, page_size=1000)
        coordinations: dict[str, Coordination] = {}
        inbox: list[ShardMessage] = []
        escrows: dict[str, list[Escrow]] = {}
        for row in rows:
            key = str(row["RowKey"])
            if key.startswith(COORD_PREFIX):
                stamp = row.timestamp
                coordination = Coordination.from_row(row, stamp)
                coordinations[coordination.request_id] = coordination
            elif key.startswith(INBOX_PREFIX):
                inbox.append(ShardMessage.from_row(row, str(row.etag)))
            elif key.startswith(ESCROW_PREFIX):
                escrow = Escrow.from_row(row)
                escrows.setdefault(escrow.request_id, []).append(escrow)
        return Flight(coordinations, tuple(inbox),
                      {k: tuple(v) for k, v in escrows.items()}), rows.date

    def claim(self, request_ids: Sequence[str], home: int) -> dict[str, int]:
        """Claim requests for shard ``home`` in this partition (create-once, not fenced: see
        ``claim_entity``). Returns the requests claimed by another shard, with its number."""
        lost: dict[str, int] = {}
        existing = create_once(self.table, [
            {"PartitionKey": self.partition, **claim_entity(r, home)} for r in request_ids])
        for entity in existing:
            request_id = str(entity["RowKey"]).removeprefix(CLAIM_PREFIX)
            owner = self.claimed_by(request_id)
            if owner is not None and owner != home:
                lost[request_id] = owner
        return lost

    def claimed_by(self, request_id: str) -> int | None:
        """The shard that claimed the request here, or ``None``."""
        found = self.read_row(claim_key(request_id))
        return None if found is None else int(found["home"])

    def read_row(self, row_key: str) -> Row | None:
        """One row of the partition, or ``None``."""
        try:
            return self.table.get(self.partition, row_key)
        except NotFound:
            return None

    def deliver(self, messages: Sequence[ShardMessage]) -> None:
        """Put messages in this shard's inbox (create-once: a message sent twice is one row)."""
        create_once(self.table, [m.entity(self.partition) for m in messages])

    # --- the one write path ----------------------------------------------------------------
    def commit(self, fence: Fence, outcomes: Sequence[Outcome],
               balances: Mapping[str, tuple[AccountRow, Decimal]], now: datetime,
               extra: Sequence[tuple[Subject, Write]] = (),
               reserved: Mapping[str, Decimal] | None = None,
               claims: Sequence[tuple[str, int]] = ()) -> CommitResult:
        """Write outcomes, new balances and ``extra`` rows in one transaction fenced by ``fence``.

        ``balances`` maps an account id to (the row as read, its new balance); ``reserved``
        gives new escrow totals; ``claims`` are created with the outcomes. Raises ``FencedOut``,
        ``OutcomeExists``, ``AccountChanged``, ``AlreadyRecorded``, ``ClaimedElsewhere``,
        ``InboxGone`` or ``LedgerWriteError``; in each case nothing was written.
        """
        stamp = now.isoformat()
        plan = plan_transaction(self.partition, fence, outcomes, balances, stamp, extra,
                                reserved, claims)
        writes = [replace(plan.writes[0], entity=self._stamped(plan.writes[0].entity)),
                  *plan.writes[1:]]  # the fence keeps the map generation it was claimed under
        try:
            results = self.table.submit([_operation(w) for w in writes])
        except BatchRefused as exc:
            code = exc.code or ""
            index = 0 if exc.index is None else exc.index  # the batch as a whole: its first
            refused = plan.subjects[index] if 0 <= index < len(plan.subjects) else ("?", "")
            refusal = classify_refusal(refused, code, fence.epoch)
            if isinstance(refusal, LedgerWriteError):
                logger.error("%s", refusal)
            raise refusal from exc
        written: dict[str, AccountRow] = {}
        for (kind, subject), result in zip(plan.subjects, results, strict=True):
            if kind == "account":
                held = balances[subject][0].reserved if reserved is None else \
                    reserved.get(subject, balances[subject][0].reserved)
                written[subject] = AccountRow(subject, balances[subject][1], result.etag, held)
        outbox = {name: str(result.etag) for (kind, name), result
                  in zip(plan.subjects, results, strict=True) if kind == "outbox"}
        return CommitResult(replace(fence, etag=str(results[0].etag), last_commit_at=stamp),
                            written, outbox)


    def write_fenced(self, fence: Fence, upserts: Sequence[Mapping[str, Any]] = (),
                     deletes: Sequence[str] = (), now: datetime | None = None) -> Fence:
        """One transaction fenced by ``fence``: replace rows of this partition whole
        (``upserts``) and delete rows by key (``deletes``, gone already is fine: the transaction
        is then made again without them). At most 99 rows. Returns the fence's new version.
        Raises ``FencedOut`` when the fence changed (another writer claimed it)."""
        stamp = (now.isoformat() if now else fence.last_commit_at)
        fence_row = self._stamped(fence_entity(self.partition, fence.epoch, fence.holder,
                                               fence.claimed_at, stamp))
        pending = list(deletes)
        for _ in range(len(pending) + 1):
            operations: list[Operation] = [
                ("update", fence_row, {"mode": Mode.REPLACE, "etag": fence.etag})]
            operations += [("upsert", {**e, "PartitionKey": self.partition},
                            {"mode": Mode.REPLACE}) for e in upserts]
            operations += [("delete", {"PartitionKey": self.partition, "RowKey": key}, {})
                           for key in pending]
            try:
                results = self.table.submit(operations)
            except BatchRefused as exc:
                index = exc.index
                if index == 0 or (exc.code or "") in ("UpdateConditionNotSatisfied",
                                                      "ConditionNotMet"):
                    raise FencedOut(f"the fence of {self.partition} changed: another "
                                    "writer holds it") from exc
                first_delete = 1 + len(upserts)
                if index is not None and index >= first_delete and \
                        (exc.code or "") == "ResourceNotFound":
                    del pending[index - first_delete]  # deleted already (a resumed run)
                    continue
                raise LedgerWriteError(f"a fenced write of {self.partition} was refused: "
                                       f"{exc}") from exc
            return replace(fence, etag=str(results[0].etag), last_commit_at=stamp)
        raise LedgerWriteError(f"a fenced write of {self.partition} kept being refused")

    def stamp_generation(self, fence: Fence, generation: int, holder: str,
                         now: datetime) -> Fence:
        """Claim the next epoch ``If-Match`` ``fence`` and record ``generation`` on the fence
        (a reshard's: every later claim under an older map raises ``MapMoved``)."""
        entity = {**fence_entity(self.partition, fence.epoch + 1, holder, now.isoformat(),
                                 fence.last_commit_at), MAP_GENERATION: generation}
        try:
            written = self.table.update(entity, mode=Mode.REPLACE, etag=fence.etag)
        except ConditionFailed as exc:
            raise FencedOut(f"the fence of {self.partition} changed: another writer holds "
                            "it") from exc
        return Fence(fence.epoch + 1, str(written.etag), holder, now.isoformat(),
                     fence.last_commit_at)


def outcome_view(decided: DecidedOutcome) -> dict[str, Any]:
    """The public shape of an outcome (for the read API)."""
    return {"status": decided.outcome.status.value, "reason": decided.outcome.reason or None,
            "decidedAt": decided.decided_at, "epoch": decided.epoch}
