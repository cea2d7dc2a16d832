"""Resharding: move a live ledger from K to K' shards without losing a cent.

``reshard(app, to)`` is the whole operation; ``./dev cli reshard --to K`` and the admin HTTP
function ``reshard`` call it. It runs in one process, against the deployment's storage, while
the app keeps running: recorders keep recording, but no shard has a leader until it ends (the
*pause*, docs/design.md 5.12).

**Phases**, each recorded in the journal row (``shared/storage/shardmap.py``) before the next
starts, each idempotent:

1. ``planned``: the journal is written: target map (the next generation), and one lease id per
   shard of the old and the new map, chosen up front.
2. ``leased``: every old and new shard's lease is taken under those ids (waiting for each
   holder to release it), kept renewed, and every fence is claimed with a new epoch and stamped
   with the new generation: a paused leader of the old map is fenced out, and no process whose
   map is older may claim an epoch from now on (``MapMoved``) until it has read the new map.
3. ``drained``: each old shard's term logic runs under the reshard's leases (the same
   ``LeaderTerm`` and ``Exchange`` a leader runs) until no shard has a ready request or a
   ``flight:`` row: complete requests are decided by their old homes, cross-shard work is
   settled and every escrow released. The balances are then read: the totals *before*.
4. ``copied``: every account whose slot moves is written to its new shard's partition with its
   exact row, in transactions fenced by that shard's fence; each copy is read back and compared.
5. ``published``: the map row gets the new generation (``If-Match``), with the old one kept
   among the earlier generations. From here the new map is authoritative.
6. ``moved``: pending steps (and their open request rows and ready markers) are moved to their
   new home's completions table, keeping their first time of record; then the reshard waits
   ``MAP_TTL_SECONDS`` + 1 s (every process's intake has read the new map by then) and moves
   the stragglers recorded meanwhile under the old map.
7. ``cleaned``: the moved accounts' old rows are deleted (fenced), and the totals *after* are
   read from the new map's placement: every account exactly once, each balance equal to before.
8. ``done``: the leases are released.

**Resuming.** The journal names the phase reached and the lease ids. A run started while a
journal is open for the same target resumes it (``--resume`` says so explicitly); another target
is refused. A resumed run takes the same leases again by their ids (Azure renews a lease taken
again under the id that holds it; after expiry the same id simply takes it again), claims the
fences again, and redoes the phases after the last one recorded. From ``leased`` on, the fences
carry the new generation, so an old-map leader cannot write even if the reshard's leases
lapsed: the ledger waits for the resume instead (``reshard`` in ``/api/leader`` says so).

Outcome rows, claims, votes and applied markers are never moved: reads consult the earlier
generations (``shared/leadership/generations.py``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.config.names import MAX_SHARDS, completions_table_name
from shared.domain.exchange import FLIGHT_PREFIX
from shared.domain.model import Fence, RowRef
from shared.domain.money import format_money, parse_balance
from shared.domain.planning import ACCOUNT_PREFIX, MAX_TRANSACTION_OPERATIONS
from shared.domain.reconciliation import MOVED_NET, MOVED_PREFIX
from shared.domain.sharding import ShardMap
from shared.election.elector import HeldLease
from shared.errors import AlreadyExists, ConditionFailed, LedgerError
from shared.leadership import outbox
from shared.leadership.instance import MAP_TTL_SECONDS, LedgerApp
from shared.leadership.term import LeaderTerm
from shared.leadership.view import ReadyView
from shared.storage.clients import ensure_tables
from shared.storage.completions import READY_PARTITION, is_request_row
from shared.storage.ports import Row
from shared.storage.shardmap import StoredMap

logger = logging.getLogger(__name__)

PHASES = ("planned", "leased", "drained", "copied", "published", "moved", "cleaned", "done")
DRAIN_PASSES = 40  # passes over the old shards before the drain gives up (and can be resumed)
DRAIN_SECONDS = 120.0  # the drain's time budget
LEASE_WAIT_POLL_SECONDS = 0.2
ROWS_PER_TRANSACTION = MAX_TRANSACTION_OPERATIONS - 1  # the fence takes one operation


class ReshardError(LedgerError):
    """The reshard cannot go on; its journal says where it stopped (resume it)."""


class ReshardRefused(ReshardError):
    """The reshard was not started: another is open, or there is nothing to do."""


class Interrupted(ReshardError):
    """A test stopped the run after a phase, as a crash there would (leases not released)."""


@dataclass
class ReshardReport:
    """What one run did: the maps, what moved, the totals, how long each phase took."""

    from_shards: int
    to_shards: int
    generation: int
    resumed: bool = False
    accounts: int = 0
    accounts_moved: int = 0
    steps_moved: int = 0
    total_before: Decimal | None = None
    total_after: Decimal | None = None
    verified: str = ""  # "exact": every balance as before; "placement": each account once
    pause_seconds: float = 0.0  # from the first lease taken to the last released
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    nothing_to_do: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"from": self.from_shards, "to": self.to_shards, "generation": self.generation,
                "resumed": self.resumed, "accounts": self.accounts,
                "accountsMoved": self.accounts_moved, "stepsMoved": self.steps_moved,
                "totalBefore": None if self.total_before is None
                else format_money(self.total_before),
                "totalAfter": None if self.total_after is None
                else format_money(self.total_after),
                "verified": self.verified, "pauseSeconds": round(self.pause_seconds, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()},
                "nothingToDo": self.nothing_to_do}


def reshard(app: LedgerApp, to: int, *, resume: bool = False,
            stop_after: str | None = None,
            lease_wait_seconds: float | None = None) -> ReshardReport:
    """Move the ledger of ``app``'s deployment to ``to`` shards (see the module docstring).

    ``resume``: only resume an open journal (refused when none is open). ``stop_after``
    (tests): stop as a crash would once that phase is recorded. ``lease_wait_seconds``: how long
    to wait for each shard's holder to release its lease (default: a lease's length + 15 s).
    Raises ``ReshardRefused`` (nothing was changed) or ``ReshardError`` (resume it).
    """
    if not 1 <= to <= MAX_SHARDS:
        raise ReshardRefused(f"a ledger has 1 to {MAX_SHARDS} shards, not {to}")
    run = _Run(app, stop_after, lease_wait_seconds)
    return run.start(to, resume)


def open_reshard(app: LedgerApp) -> dict[str, Any] | None:
    """The reshard whose journal is open (``phase``, ``to``, ``startedAt``), or ``None``."""
    journal = app.topology.store.read_journal()
    if journal is None or journal.get("phase") == "done":
        return None
    return {"phase": str(journal.get("phase")), "to": int(journal.get("toShards") or 0),
            "startedAt": str(journal.get("startedAt") or "")}


def status(app: LedgerApp) -> dict[str, Any] | None:
    """The ``reshard`` field of ``/api/leader``: ``None`` while the setting agrees with the
    stored map and no reshard is open; else what disagrees."""
    stored = app.topology.stored
    opened = open_reshard(app)
    setting = app.config.shards
    if setting == stored.current.shards and opened is None:
        return None
    found: dict[str, Any] = {"needed": setting != stored.current.shards, "setting": setting,
                             "stored": stored.current.shards,
                             "generation": stored.current.generation}
    if opened is not None:
        found["open"] = opened
    return found


class _Run:
    """One run of the reshard: its own app, journal, leases and fences."""

    def __init__(self, app: LedgerApp, stop_after: str | None,
                 lease_wait_seconds: float | None) -> None:
        if stop_after is not None and stop_after not in PHASES:
            raise ValueError(f"no phase {stop_after!r}: {', '.join(PHASES)}")
        # An app of its own: the process's app (if any) keeps its map and its caches.
        self.app = LedgerApp.create(app.config, app.clients, clock=app.clock)
        self.clock = app.clock
        self.store = self.app.topology.store
        self.stop_after = stop_after
        self.lease_wait = lease_wait_seconds if lease_wait_seconds is not None \
            else app.config.election.lease_seconds + 15
        self.journal: dict[str, Any] = {}
        self.etag = ""
        self.leases: dict[int, HeldLease] = {}
        self.fences: dict[int, Fence] = {}
        self.old = ShardMap()
        self.new = ShardMap()
        self.report = ReshardReport(0, 0, 0)
        self.before: dict[str, Decimal] = {}
        self.sources: dict[str, int] = {}  # a moving account's shard under the old map
        self.leased_at: float | None = None
        self.published_at: float | None = None  # monotonic, when this run published the map

    # --- the journal ---------------------------------------------------------------------------
    def start(self, to: int, resume: bool) -> ReshardReport:
        found = self.store.read_journal()
        open_journal = found is not None and found.get("phase") != "done"
        if open_journal:
            assert found is not None
            target = int(found.get("toShards") or 0)
            if target != to and not resume:
                raise ReshardRefused(
                    f"a reshard to {target} shard(s) is open (phase {found.get('phase')}); "
                    f"resume it first: reshard --to {target} --resume")
            self.journal, self.etag = dict(found), str(found.etag)
            self.report.resumed = True
            logger.info("resuming the reshard to %d shard(s) after phase %s", target,
                        found.get("phase"))
        else:
            if resume:
                raise ReshardRefused("no reshard is open: nothing to resume")
            stored = self.app.topology.reload()
            if stored.current.shards == to:
                return ReshardReport(to, to, stored.current.generation, nothing_to_do=True)
            self._plan(stored, to, found)
        self.old = _map_of(self.journal, "from")
        self.new = _map_of(self.journal, "to")
        self.report = ReshardReport(self.old.shards, self.new.shards, self.new.generation,
                                    resumed=self.report.resumed)
        return self._run()

    def _plan(self, stored: StoredMap, to: int, found: Row | None) -> None:
        new = stored.current.resharded(to)
        every = range(max(stored.current.shards, to))
        fields = {
            "phase": "planned", "holder": f"reshard-{uuid.uuid4().hex[:12]}",
            "fromGeneration": stored.current.generation, "fromShards": stored.current.shards,
            "fromSlots": ",".join(map(str, stored.current.slots)),
            "toGeneration": new.generation, "toShards": to,
            "toSlots": ",".join(map(str, new.slots)),
            "leases": json.dumps({str(k): str(uuid.uuid4()) for k in every}),
            "startedAt": self.clock.now().isoformat(), "totalBefore": "", "totalAfter": "",
            "accounts": 0, "accountsMoved": 0, "stepsMoved": 0,
        }
        try:
            if found is None:
                self.etag = self.store.create_journal(fields)
            else:
                self.etag = self.store.write_journal(fields, str(found.etag))
        except (AlreadyExists, ConditionFailed) as exc:
            raise ReshardRefused("another reshard started at the same time") from exc
        self.journal = fields
        logger.info("reshard planned: %d -> %d shard(s), generation %d", stored.current.shards,
                    to, new.generation)

    def _record(self, phase: str, **fields: Any) -> None:
        self.journal.update(fields, phase=phase, **{f"{phase}At": self.clock.now().isoformat()})
        body = {k: v for k, v in self.journal.items() if k not in ("PartitionKey", "RowKey")}
        try:
            self.etag = self.store.write_journal(body, self.etag)
        except ConditionFailed as exc:
            raise ReshardError("the journal changed under this run: another reshard process "
                               "is driving it; this one stops") from exc
        logger.info("reshard: %s", phase)
        if self.stop_after == phase:
            for lease in self.leases.values():  # a crash: renewals stop, nothing is released
                lease._stop(lease.state)
            raise Interrupted(f"stopped after phase {phase} (as a crash there would)")

    def _reached(self, phase: str) -> bool:
        return PHASES.index(str(self.journal.get("phase"))) >= PHASES.index(phase)

    # --- the run -------------------------------------------------------------------------------
    def _run(self) -> ReshardReport:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("drained", self._drain), ("copied", self._copy), ("published", self._publish),
            ("moved", self._move_steps), ("cleaned", self._clean)]
        try:
            self._timed("leased", self._take_leases)
            if self._reached("drained") and not self._reached("published"):
                # Resumed: the fences kept every old-map leader out since the drain, so the
                # old partitions still hold the balances the drain left.
                self.before = self._balances(self.old)
            for phase, action in steps:
                if not self._reached(phase):
                    self._timed(phase, action)
            if not self.report.verified:
                self._verify(exact=False)
            self._release()
            self._record("done", finishedAt=self.clock.now().isoformat(),
                         pauseSeconds=round(self.report.pause_seconds, 3))
        except Interrupted:
            raise
        except Exception:
            self._abandon()
            raise
        return self.report

    def _timed(self, phase: str, action: Callable[[], None]) -> None:
        started = self.clock.monotonic()
        action()
        self.report.phases[phase] = self.clock.monotonic() - started

    def _lease_ids(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in json.loads(self.journal["leases"]).items()}

    def _every_shard(self) -> range:
        return range(max(self.old.shards, self.new.shards))

    def _take_leases(self) -> None:
        """Every old and new shard's lease under the journal's ids; every fence claimed and
        stamped with the new generation."""
        app = self.app
        ensure_tables(app.clients, [completions_table_name(app.config.completions_table, k)
                                    for k in self._every_shard()])
        app.topology.writing_generation = self.new.generation
        ids = self._lease_ids()
        holder = str(self.journal["holder"])
        for k in self._every_shard():
            shard = app.topology.shard(k)
            shard.elector.ensure_blob()
            self.leases[k] = self._acquire(shard.elector.lock, ids[k], k)
            if self.leased_at is None:
                self.leased_at = self.clock.monotonic()
        for k in self._every_shard():
            ledger = app.topology.shard(k).ledger
            self.fences[k], _ = ledger.claim_epoch(f"{holder}/{ids[k]}", self.clock.now())
        if not self._reached("leased"):
            self._record("leased")

    def _acquire(self, lock: Any, lease_id: str, shard: int) -> HeldLease:
        config = self.app.config.election
        deadline = self.clock.monotonic() + self.lease_wait
        while True:
            sent = self.clock.monotonic()
            try:
                lock.acquire(int(config.lease_seconds), lease_id)
            except ConditionFailed:
                if self.clock.monotonic() >= deadline:
                    raise ReshardError(f"shard {shard}'s lease stayed held by another holder for "
                                       f"{self.lease_wait:g} s; resume the reshard later") \
                        from None
                self.clock.sleep(LEASE_WAIT_POLL_SECONDS)
                continue
            held = HeldLease(lock, lease_id, config, self.clock, last_renew_sent=sent)
            held.keep_renewing()
            return held

    def _release(self) -> None:
        for k, lease in self.leases.items():
            if k in self.fences:  # a hand-over: the next claim is not shown as a takeover
                self.app.topology.ledger_of(k).mark_released(self.fences[k])
            lease.release()
        if self.leased_at is not None:
            self.report.pause_seconds = self.clock.monotonic() - self.leased_at

    def _abandon(self) -> None:
        """A run that failed keeps its leases until they expire (its renewals stop): nothing
        runs on a half-moved ledger, and a resume takes them again by their ids."""
        for lease in self.leases.values():
            lease._stop(lease.state)

    # --- 3. drain ------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Run each old shard's term under the reshard's lease until nothing is left to do."""
        deadline = self.clock.monotonic() + DRAIN_SECONDS
        for _ in range(DRAIN_PASSES):
            worked = False
            for k in range(self.old.shards):
                worked = self._drain_shard(k, deadline) or worked
            if not worked and not self._in_flight():
                break
            if self.clock.monotonic() >= deadline:
                raise ReshardError("work in flight did not finish within the drain's budget; "
                                   "resume the reshard")
        else:
            raise ReshardError(f"work kept coming after {DRAIN_PASSES} passes; resume the "
                               "reshard")
        # Outcome events: every outbox row is sent now (rows stay in the partition that wrote
        # them, and a shard the new map removes is read by nobody).
        outbox.drain_outbox(self.app)
        self.before = self._balances(self.old)
        total = sum(self.before.values(), Decimal("0.00"))
        self.report.total_before, self.report.accounts = total, len(self.before)
        self._record("drained", totalBefore=format_money(total), accounts=len(self.before))

    def _drain_shard(self, k: int, deadline: float) -> bool:
        acting = self.app.on(k)
        acting.shard.flight_read_at = float("-inf")  # read its work in flight every time
        view = ReadyView(acting)
        ready = view.read()
        if not ready:
            return False
        term = LeaderTerm(acting, self.leases[k], self.fences[k], view=view)
        try:
            term.commit_ready(deadline, ready)
        finally:
            self.fences[k] = term.fence
        return True

    def _in_flight(self) -> bool:
        return any(self.app.topology.ledger_of(k).list_rows(FLIGHT_PREFIX)
                   for k in range(self.old.shards))

    def _balances(self, shard_map: ShardMap) -> dict[str, Decimal]:
        """Every account's balance, each read on its shard under ``shard_map`` (rows of other
        slots in a partition are left out); raises when money is held in escrow."""
        found: dict[str, Decimal] = {}
        for k in range(shard_map.shards):
            for account, row in self.app.topology.ledger_of(k).list_accounts().items():
                if shard_map.account_shard(account) != k:
                    continue
                if row.reserved:
                    raise ReshardError(f"account {account} still holds {row.reserved} in escrow")
                found[account] = row.balance
        return found

    # --- 4. copy -------------------------------------------------------------------------------
    def _moving_accounts(self) -> dict[int, list[dict[str, Any]]]:
        """The account rows whose slot moves, by their new shard, as stored in the old one."""
        by_target: dict[int, list[dict[str, Any]]] = {}
        for k in range(self.old.shards):
            for row in self.app.topology.ledger_of(k).list_rows(ACCOUNT_PREFIX):
                account = str(row["RowKey"]).removeprefix(ACCOUNT_PREFIX)
                if self.old.account_shard(account) != k:
                    continue
                target = self.new.account_shard(account)
                if target != k:
                    entity = {key: value for key, value in row.items()
                              if key not in ("PartitionKey", "Timestamp", "etag")}
                    by_target.setdefault(target, []).append(entity)
                    self.sources[account] = k
        return by_target

    def _record_moved_money(self, moving: dict[int, list[dict[str, Any]]]) -> None:
        """Each shard's ``archive:reshard:{generation}`` row: the balances this reshard moved
        in minus those it moved out. Reconciliation adds it to what the shard's own history
        (outcomes and applied markers, never moved) says it holds. Written whole (a resumed run
        writes the same values), fenced, before the map is published."""
        net: dict[int, Decimal] = {}
        for target, rows in moving.items():
            for row in rows:
                amount = parse_balance(row["balance"]) + parse_balance(
                    row.get("reserved") or "0.00")
                source = self.sources[str(row["RowKey"]).removeprefix(ACCOUNT_PREFIX)]
                net[target] = net.get(target, Decimal("0.00")) + amount
                net[source] = net.get(source, Decimal("0.00")) - amount
        for k, amount in sorted(net.items()):
            row = {"RowKey": f"{MOVED_PREFIX}{self.new.generation}",
                   MOVED_NET: format_money(amount)}
            self.fences[k] = self.app.topology.ledger_of(k).write_fenced(
                self.fences[k], [row], now=self.clock.now())

    def _copy(self) -> None:
        moving = self._moving_accounts()
        for target, rows in sorted(moving.items()):
            ledger = self.app.topology.ledger_of(target)
            for chunk in _chunks(rows, ROWS_PER_TRANSACTION):
                self.fences[target] = ledger.write_fenced(self.fences[target], chunk,
                                                          now=self.clock.now())
        moved = sum(len(rows) for rows in moving.values())
        for target, rows in moving.items():
            copied = self.app.topology.ledger_of(target).list_accounts()
            for row in rows:
                account = str(row["RowKey"]).removeprefix(ACCOUNT_PREFIX)
                if account not in copied or \
                        copied[account].balance != parse_balance(row["balance"]):
                    raise ReshardError(f"account {account} was not copied exactly to shard "
                                       f"{target}")
        self._record_moved_money(moving)
        self.report.accounts_moved = moved
        self._record("copied", accountsMoved=moved)

    # --- 5. publish ----------------------------------------------------------------------------
    def _publish(self) -> None:
        stored = self.store.read()
        if stored is None:
            raise ReshardError("the shard map row is gone")
        if stored.current.generation == self.old.generation:
            self.store.publish(self.new, stored)
        elif stored.current != self.new:
            raise ReshardError(f"the stored map is generation {stored.current.generation}, "
                               f"neither {self.old.generation} nor {self.new.generation}")
        self.app.topology.reload()
        self.published_at = self.clock.monotonic()
        self._record("published")

    # --- 6. move pending steps -----------------------------------------------------------------
    def _move_steps(self) -> None:
        moved = self._move_pending()
        # Every process's intake reads the map again within MAP_TTL_SECONDS: wait that out,
        # then move what was recorded under the old map meanwhile.
        published = self.published_at
        wait = MAP_TTL_SECONDS + 1 - (0 if published is None
                                      else self.clock.monotonic() - published)
        if wait > 0:
            self.clock.sleep(wait)
        moved += self._move_pending()
        self.report.steps_moved = moved
        self._record("moved", stepsMoved=moved)

    def _move_pending(self) -> int:
        """Move the step rows recorded on a shard that is not their home under the new map."""
        moved = 0
        for k in range(max(self.old.shards, self.new.shards)):
            store = self.app.topology.shard(k).completions
            by_request: dict[str, list[Row]] = {}
            for row in store.request_rows():
                request_id = str(row.get("requestId") or str(row["RowKey"]).split("|")[0])
                by_request.setdefault(request_id, []).append(row)
            marked = store.marked()
            refs: list[RowRef] = []
            for request_id, rows in by_request.items():
                steps = [r for r in rows if not is_request_row(str(r["RowKey"]))]
                homes = {self.new.home_of(request_id, int(r["expectedOperations"]),
                                          str(r["accountId"])) for r in steps}
                if not steps or homes == {k}:
                    continue
                for home in sorted(homes - {k}):
                    going = [r for r in steps
                             if self.new.home_of(request_id, int(r["expectedOperations"]),
                                                 str(r["accountId"])) == home]
                    opened = [r for r in rows if is_request_row(str(r["RowKey"]))]
                    target = self.app.topology.shard(home).completions
                    target.import_rows([*opened, *going])
                    if request_id in marked:
                        target.mark_ready(request_id, target.steps_of(request_id))
                    refs += [RowRef(str(r["PartitionKey"]), str(r["RowKey"]), str(r.etag))
                             for r in going]
                    moved += len(going)
                if k not in homes:  # nothing of it is left here: its open row and marker go
                    refs += [RowRef(str(r["PartitionKey"]), str(r["RowKey"]), str(r.etag))
                             for r in rows if is_request_row(str(r["RowKey"]))
                             and r.get("state") != "decided"]
                if request_id in marked:
                    refs.append(RowRef(READY_PARTITION, request_id, ""))
            if refs:
                store.delete(refs)
        return moved

    # --- 7. clean ------------------------------------------------------------------------------
    def _clean(self) -> None:
        for k in range(self.old.shards):
            ledger = self.app.topology.ledger_of(k)
            stale = [str(row["RowKey"]) for row in ledger.list_rows(ACCOUNT_PREFIX)
                     if self.new.account_shard(
                         str(row["RowKey"]).removeprefix(ACCOUNT_PREFIX)) != k]
            for chunk in _chunks(stale, ROWS_PER_TRANSACTION):
                self.fences[k] = ledger.write_fenced(self.fences[k], deletes=chunk,
                                                     now=self.clock.now())
        self._verify(exact=bool(self.before))
        self._record("cleaned", totalAfter=format_money(self.report.total_after or Decimal("0.00")))

    def _verify(self, exact: bool) -> None:
        """Every account exactly once, on its shard under the new map; with ``exact`` (this
        run held the leases since the drain) each balance as before, so the totals match."""
        after: dict[str, Decimal] = {}
        for k in range(max(self.old.shards, self.new.shards)):
            for account, row in self.app.topology.ledger_of(k).list_accounts().items():
                if self.new.account_shard(account) != k:
                    raise ReshardError(f"account {account} still has a row on shard {k}, "
                                       f"which is not its shard under the new map")
                after[account] = row.balance + row.reserved
        total = sum(after.values(), Decimal("0.00"))
        self.report.total_after, self.report.accounts = total, len(after)
        if exact:
            differ = sorted(a for a in self.before.keys() | after.keys()
                            if self.before.get(a) != after.get(a))
            if differ:
                raise ReshardError(f"{len(differ)} account(s) differ after the reshard, e.g. "
                                   f"{differ[:5]}")
            self.report.total_before = sum(self.before.values(), Decimal("0.00"))
            if self.report.total_before != total:
                raise ReshardError(f"totals differ: {self.report.total_before} before, "
                                   f"{total} after")
            self.report.verified = "exact"
        else:
            self.report.verified = "placement"


def _map_of(journal: Mapping[str, Any], side: str) -> ShardMap:
    return ShardMap(int(journal[f"{side}Shards"]),
                    tuple(int(s) for s in str(journal[f"{side}Slots"]).split(",")),
                    int(journal[f"{side}Generation"]))


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]

