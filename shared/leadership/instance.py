"""``LedgerApp``: one instance's configuration, clients, stores and clocks, wired together once.

Everything the functions do takes a ``LedgerApp``; the Functions host builds one per worker
process (``shared/wiring.py``), the simulator one per simulated instance, the tests one per test
(with their own table, queue and blob names on a shared Azurite).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

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
from shared.storage.azure_leases import AzureBlobLease
from shared.storage.cleanup import RowCleaner
from shared.storage.clients import StorageClients, ensure_queues, ensure_tables
from shared.storage.completions import CompletionStore
from shared.storage.ledger import Ledger
from shared.storage.parking import ParkingLot
from shared.storage.ports import MessageQueue


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


@dataclass
class LedgerApp:
    """The assembled app of one instance: its configuration, clients, clock and shards.

    An app object acts for one shard at a time, ``current`` (0 unless it came from ``on``):
    ``elector``, ``ledger``, ``completions``, ``cleaner``, ``snapshot`` and
    ``recently_decided`` are that shard's. ``on(k)`` is the same app acting for shard ``k``;
    it shares everything else (configuration, clients, clock, queues).
    """

    config: AppConfig
    clients: StorageClients
    parking: ParkingLot
    shards: tuple[Shard, ...]
    clock: Clock = SYSTEM_CLOCK  # the one clock: monotonic time and sleep; wall time to show
    # Added to storage's time when the leader judges expiry. Zero in production; tests move it
    # forward to reach REQUEST_TIMEOUT_SECONDS without waiting (it moves "now" only, so a step
    # recorded after a shift already looks that old).
    time_shift: Callable[[], timedelta] = lambda: timedelta(0)
    current: int = 0  # the shard this app object acts for
    # Queue clients opened once and shared by every ``on(k)`` of this app.
    opened_queues: dict[str, MessageQueue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.shards) != self.config.shards:
            raise ValueError(f"LEDGER_SHARDS={self.config.shards} but the app was given "
                             f"{len(self.shards)} shard(s)")

    @property
    def sharded(self) -> bool:
        """More than one shard (``LEDGER_SHARDS`` > 1)."""
        return len(self.shards) > 1

    @property
    def shard_map(self) -> ShardMap:
        return ShardMap(len(self.shards))

    @property
    def shard(self) -> Shard:
        """The shard this app object acts for."""
        return self.shards[self.current]

    def on(self, shard: int) -> LedgerApp:
        """This app acting for ``shard`` (itself when it already does)."""
        if shard == self.current:
            return self
        if not 0 <= shard < len(self.shards):
            raise ValueError(f"no shard {shard}: this ledger has {len(self.shards)}")
        acting = copy.copy(self)  # shares every attribute (and a subclass's own) but ``current``
        acting.current = shard
        return acting

    def each_shard(self) -> list[LedgerApp]:
        """The app acting for each shard in turn."""
        return [self.on(k) for k in range(len(self.shards))]

    def home_of(self, completion: Completion) -> LedgerApp:
        """The app acting for the completion's home shard (where its request is recorded)."""
        return self.on(self.shard_map.home_of(completion.request_id,
                                              completion.expected_operations,
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
        shards = []
        for k in range(config.shards):
            elector = LeaseElector(
                AzureBlobLease(container, lease_blob_name(config.lease_blob, k),
                               call_timeout_seconds=config.storage_timeout_seconds),
                config.election, config.instance_id, clock, callbacks)
            completions = clients.open_table(completions_table_name(config.completions_table, k))
            shards.append(Shard.of(str(k), elector, Ledger(ledger_table, ledger_partition(k)),
                                   CompletionStore(completions), clock))
        return cls(config=config, clients=clients,
                   parking=ParkingLot(clients.open_table(config.parked_table)),
                   shards=tuple(shards), clock=clock)

    def ensure_resources(self, queues: bool = True) -> None:
        """Create the tables, the lease blob and (locally) the queues. Idempotent.

        In Azure the Bicep deployment creates them; this is for Azurite and first runs.
        """
        shard_tables = [completions_table_name(self.config.completions_table, k)
                        for k in range(len(self.shards))]
        ensure_tables(self.clients, (*shard_tables, self.config.ledger_table,
                                     self.config.parked_table))
        for shard in self.shards:
            shard.elector.ensure_blob()
        if queues:
            intake = self.config.intake_queue_names
            ensure_queues(self.clients, (*intake, *(poison_queue_name(name) for name in intake),
                                         self.config.wakeup_queue))

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
