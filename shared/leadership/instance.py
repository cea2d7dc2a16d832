"""``LedgerApp``: one instance's configuration, clients, stores and clocks, wired together once.

Everything the functions do takes a ``LedgerApp``; the Functions host builds one per worker
process (``shared/wiring.py``), the simulator one per simulated instance, the tests one per test
(with their own table, queue and blob names on a shared Azurite).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from shared.config.names import (
    completions_table_name,
    lease_blob_name,
    ledger_partition,
    poison_queue_name,
)
from shared.config.settings import AppConfig
from shared.domain.clock import SYSTEM_CLOCK, Clock
from shared.domain.contract import Completion
from shared.domain.model import LedgerSnapshot
from shared.domain.sharding import ShardMap
from shared.election.elector import ElectionCallbacks, LeaseElector
from shared.errors import NotFound, StorageError
from shared.storage.azure_leases import AzureBlobLease
from shared.storage.cleanup import RowCleaner
from shared.storage.clients import StorageClients, ensure_queues, ensure_tables
from shared.storage.completions import CompletionStore
from shared.storage.ledger import Ledger
from shared.storage.parking import ParkingLot
from shared.storage.ports import MessageQueue
from shared.storage.shardmap import ShardMapStore, StoredMap

logger = logging.getLogger(__name__)


class RecentRequests:
    """The ids of the last ``capacity`` requests this process decided (thread-safe, bounded).

    A completion of one of these is a late step: the leader drops it at once instead of waiting
    for the request to expire. Requests decided by other processes are caught at expiry.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._ids[request_id] = None
                self._ids.move_to_end(request_id)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._ids


@dataclass
class Shard:
    """One ledger partition and the election that guards it: everything a leader of it holds.

    An app has one per shard (``LEDGER_SHARDS``), each complete: its elector, its ledger
    partition, the completions its home requests are recorded in, the cleaner of those rows,
    and this process's snapshot of its last commit and the requests it decided.
    """

    name: str  # its number, as text
    elector: LeaseElector
    ledger: Ledger
    completions: CompletionStore
    cleaner: RowCleaner
    snapshot: LedgerSnapshot | None = None  # this process's last commit (see LeaderTerm)
    recently_decided: RecentRequests = field(default_factory=RecentRequests)
    # Coordinations whose messages this process sent again: request id -> monotonic time.
    resent: dict[str, float] = field(default_factory=dict)
    timer_due: float = float("-inf")  # until when its in-flight timer is armed (monotonic)
    mail_seen: str | None = None  # the mail flag's version when this process emptied the inbox
    flight_read_at: float = float("-inf")  # when this process last read the work in flight
    in_flight: bool = False  # its last read found coordinations waiting for other shards
    held: set[str] = field(default_factory=set)  # requests in flight whose late rows wait

    @classmethod
    def of(cls, name: str, elector: LeaseElector, ledger: Ledger, completions: CompletionStore,
           clock: Clock) -> Shard:
        """A shard with a cleaner of its own for ``completions`` (deletes batched, off the
        commit path)."""
        return cls(name, elector, ledger, completions,
                   RowCleaner(completions, clock=clock.monotonic))


MAP_TTL_SECONDS = 5.0  # a process uses the shard map it read for at most this long on intake


class Topology:
    """The shard map this process uses, its earlier generations, and the shards built for it.

    Read from storage on first use (``ShardMapStore.load_or_seed``: ``LEDGER_SHARDS`` only
    seeds a new deployment) and kept; read again when a fence says the map moved on
    (``MapMoved``) or, on intake, once it is ``MAP_TTL_SECONDS`` old (``fresh``). Shared by
    every ``LedgerApp.on(k)`` of one app. Thread-safe.
    """

    def __init__(self, seed: int, built: dict[int, Shard], store: ShardMapStore,
                 build: Callable[[int], Shard] | None, clock: Clock,
                 partition_ledger: Callable[[int], Ledger]) -> None:
        self.seed = seed
        self.store = store
        self.clock = clock
        self._built = dict(built)
        self._build = build
        self._partition_ledger = partition_ledger
        self._ledgers: dict[int, Ledger] = {}
        self._lock = threading.RLock()
        self._stored: StoredMap | None = None
        self._checked_at = float("-inf")  # monotonic: when the map in use was asked for
        self._shards: tuple[Shard, ...] = ()
        # A reshard's own app writes the generation it is moving to (shared/leadership/reshard.py).
        self.writing_generation: int | None = None
        for shard in self._built.values():
            shard.ledger.map_generation = self.fence_generation

    # --- the map ---------------------------------------------------------------------------
    @property
    def stored(self) -> StoredMap:
        found = self._stored
        return found if found is not None else self.reload()

    @property
    def current(self) -> ShardMap:
        return self.stored.current

    @property
    def earlier(self) -> tuple[ShardMap, ...]:
        return self.stored.earlier

    def reload(self) -> StoredMap:
        """Read the map from storage (creating generation 1 from ``LEDGER_SHARDS`` if none)."""
        asked = self.clock.monotonic()
        try:
            found = self.store.load_or_seed(self.seed)
        except NotFound:
            # No ledger table yet (before ``ensure_resources``): the seed, generation 0 (not
            # stamped on fences), read again at the next ``fresh`` or ``ensure_resources``.
            found, asked = StoredMap(ShardMap(self.seed)), float("-inf")
        with self._lock:
            before = self._stored
            self._stored, self._checked_at = found, asked
            self._shards = tuple(self.shard(k) for k in range(found.current.shards))
        if before is None or before.current.generation != found.current.generation:
            if found.current.shards != self.seed:
                logger.warning(
                    "LEDGER_SHARDS=%s but the shard map in storage has %s shard(s) (generation "
                    "%s); the stored map is used. To change it: ./dev cli reshard --to %s",
                    self.seed, found.current.shards, found.current.generation, self.seed)
            if before is not None and before.current.generation:
                logger.info("shard map generation %s -> %s (%s shard(s))",
                            before.current.generation, found.current.generation,
                            found.current.shards)
        return found

    @property
    def checked_at(self) -> float:
        """When (monotonic) the map in use was asked for."""
        return self._checked_at

    def fresh(self, max_age: float = MAP_TTL_SECONDS) -> ShardMap:
        """The map, read again first when it was read more than ``max_age`` seconds ago.

        When storage cannot say, the map in use is kept for another ``max_age`` (a stale map
        cannot write anything wrong: fences carry the generation, see ``MapMoved``)."""
        if self._stored is None:
            self.reload()
        elif self.clock.monotonic() - self._checked_at > max_age:
            try:
                self.reload()
            except StorageError as exc:
                logger.warning("could not read the shard map again (the one in use is kept): "
                               "%s", exc)
                self._checked_at = self.clock.monotonic()
        return self.current

    def generation(self) -> int:
        return self.current.generation

    def fence_generation(self) -> int:
        """The generation this process's fence writes carry (and claims are checked against)."""
        if self.writing_generation is not None:
            return self.writing_generation
        return self.generation()

    # --- shards ----------------------------------------------------------------------------
    @property
    def shards(self) -> tuple[Shard, ...]:
        """The shards of the map in use."""
        if self._stored is None:
            self.reload()
        return self._shards

    def shard(self, k: int) -> Shard:
        """Shard ``k``'s objects (built on first use: a map may have more shards than the
        process started with)."""
        with self._lock:
            found = self._built.get(k)
            if found is None:
                if self._build is None:
                    raise ValueError(f"no shard {k}: this app was built with "
                                     f"{len(self._built)} shard(s) and cannot build more")
                found = self._built[k] = self._build(k)
                found.ledger.map_generation = self.fence_generation
            return found

    def ledger_of(self, k: int) -> Ledger:
        """The ledger partition of shard number ``k`` under any generation (for reads of
        history: outcomes and claims are never moved)."""
        with self._lock:
            if k in self._built:
                return self._built[k].ledger
            found = self._ledgers.get(k)
            if found is None:
                found = self._ledgers[k] = self._partition_ledger(k)
            return found


class LedgerApp:
    """The assembled app of one instance: its configuration, clients, clock and shards.

    An app object acts for one shard at a time, ``current`` (0 unless it came from ``on``):
    ``elector``, ``ledger``, ``completions``, ``cleaner``, ``snapshot`` and
    ``recently_decided`` are that shard's. ``on(k)`` is the same app acting for shard ``k``;
    it shares everything else (configuration, clients, clock, queues, the shard map).

    The shard map (how many shards, which slot is on which) is read from storage on first use
    (``Topology``); ``shards`` are the shards given (``LEDGER_SHARDS`` of them) plus any the map
    needs beyond them.
    """

    storage: Any  # a subclass's (tests/fakes) own attributes survive ``on``

    def __init__(self, config: AppConfig, clients: StorageClients, parking: ParkingLot,
                 shards: tuple[Shard, ...], clock: Clock = SYSTEM_CLOCK,
                 time_shift: Callable[[], timedelta] | None = None, current: int = 0,
                 opened_queues: dict[str, MessageQueue] | None = None,
                 topology: Topology | None = None,
                 build: Callable[[int], Shard] | None = None) -> None:
        self.config = config
        self.clients = clients
        self.parking = parking
        self.clock = clock  # the one clock: monotonic time and sleep; wall time to show
        # Added to storage's time when the leader judges expiry. Zero in production; tests move
        # it forward to reach REQUEST_TIMEOUT_SECONDS without waiting (it moves "now" only, so a
        # step recorded after a shift already looks that old).
        self.time_shift: Callable[[], timedelta] = time_shift or (lambda: timedelta(0))
        self.current = current  # the shard this app object acts for
        # Queue clients opened once and shared by every ``on(k)`` of this app.
        self.opened_queues: dict[str, MessageQueue] = {} if opened_queues is None \
            else opened_queues
        if topology is None:
            table = shards[0].ledger.table
            topology = Topology(config.shards, dict(enumerate(shards)), ShardMapStore(table),
                                build, clock, lambda k: Ledger(table, ledger_partition(k)))
        self.topology = topology

    @property
    def shards(self) -> tuple[Shard, ...]:
        """The shards of the shard map in use (read from storage on first use)."""
        return self.topology.shards

    @property
    def sharded(self) -> bool:
        """More than one shard in the map in use."""
        return self.shard_map.shards > 1

    @property
    def shard_map(self) -> ShardMap:
        """The map in force, as read at most ``MAP_TTL_SECONDS`` ago (a long-lived worker
        follows a reshard within that time, whatever it does: reads, sweeps, alarms, terms)."""
        return self.topology.fresh()

    @property
    def earlier_maps(self) -> tuple[ShardMap, ...]:
        """The shard maps of earlier generations, oldest first (empty until a reshard)."""
        return self.topology.earlier

    @property
    def shard(self) -> Shard:
        """The shard this app object acts for."""
        return self.topology.shard(self.current)

    def on(self, shard: int) -> LedgerApp:
        """This app acting for ``shard`` (itself when it already does)."""
        if shard == self.current:
            return self
        if not 0 <= shard < self.shard_map.shards:
            raise ValueError(f"no shard {shard}: this ledger has {self.shard_map.shards}")
        acting = copy.copy(self)  # shares every attribute (and a subclass's own) but ``current``
        acting.current = shard
        return acting

    def each_shard(self) -> list[LedgerApp]:
        """The app acting for each shard in turn."""
        return [self.on(k) for k in range(self.shard_map.shards)]

    def home_of(self, completion: Completion) -> LedgerApp:
        """The app acting for the completion's home shard (where its request is recorded),
        by a shard map read at most ``MAP_TTL_SECONDS`` ago."""
        shard_map = self.topology.fresh()
        return self.on(shard_map.home_of(completion.request_id, completion.expected_operations,
                                         completion.account_id))

    def account_shard(self, account_id: str) -> LedgerApp:
        """The app acting for the shard that holds the account's balance."""
        return self.on(self.shard_map.account_shard(account_id))

    @property
    def elector(self) -> LeaseElector:
        return self.shard.elector

    @property
    def ledger(self) -> Ledger:
        return self.shard.ledger

    @property
    def completions(self) -> CompletionStore:
        return self.shard.completions

    @completions.setter
    def completions(self, store: CompletionStore) -> None:
        self.shard.completions = store

    @property
    def cleaner(self) -> RowCleaner:
        return self.shard.cleaner

    @property
    def snapshot(self) -> LedgerSnapshot | None:
        return self.shard.snapshot

    @snapshot.setter
    def snapshot(self, snapshot: LedgerSnapshot | None) -> None:
        self.shard.snapshot = snapshot

    @property
    def recently_decided(self) -> RecentRequests:
        return self.shard.recently_decided

    @classmethod
    def create(cls, config: AppConfig, clients: StorageClients,
               callbacks: ElectionCallbacks | None = None,
               clock: Clock = SYSTEM_CLOCK) -> LedgerApp:
        """Wire the stores and the elector of every shard to the clients (no storage call)."""
        container = clients.blob.get_container_client(config.lease_container)
        ledger_table = clients.open_table(config.ledger_table)

        def build(k: int) -> Shard:
            elector = LeaseElector(
                AzureBlobLease(container, lease_blob_name(config.lease_blob, k),
                               call_timeout_seconds=config.storage_timeout_seconds),
                config.election, config.instance_id, clock, callbacks)
            completions = clients.open_table(completions_table_name(config.completions_table, k))
            return Shard.of(str(k), elector, Ledger(ledger_table, ledger_partition(k)),
                            CompletionStore(completions), clock)

        return cls(config=config, clients=clients,
                   parking=ParkingLot(clients.open_table(config.parked_table)),
                   shards=tuple(build(k) for k in range(config.shards)), clock=clock,
                   build=build)

    def ensure_resources(self, queues: bool = True) -> None:
        """Create the tables, the lease blob and (locally) the queues. Idempotent.

        In Azure the Bicep deployment creates them; this is for Azurite and first runs.
        """
        ensure_tables(self.clients, (self.config.ledger_table, self.config.parked_table))
        self.topology.reload()
        shard_tables = [completions_table_name(self.config.completions_table, k)
                        for k in range(len(self.shards))]  # the map: read (or seeded) here
        ensure_tables(self.clients, shard_tables)
        for shard in self.shards:
            shard.elector.ensure_blob()
        if queues:
            intake = self.config.intake_queue_names
            ensure_queues(self.clients, (*intake, *(poison_queue_name(name) for name in intake),
                                         self.config.wakeup_queue, self.config.outcomes_queue))

    def queue(self, name: str | None = None, *, raw: bool = False) -> MessageQueue:
        """The completions queue (or ``name``): text encoded as the host decodes it (base64),
        or, ``raw``, as it is on the wire (moving and peeking at poisoned messages).

        Its client has the queue service client's timeouts, retries and transport.
        """
        return self.clients.open_queue(name or self.config.completions_queue, raw=raw,
                                       timeout_seconds=self.config.storage_timeout_seconds)

    @property
    def wakeup_queue(self) -> MessageQueue:
        """The wake-up queue (lease alarms), made once: a term must not open a connection of
        its own."""
        queue = self.opened_queues.get("wakeup")
        if queue is None:
            queue = self.opened_queues.setdefault("wakeup", self.queue(self.config.wakeup_queue))
        return queue
