"""``LedgerApp``: one instance's configuration, clients, stores and clocks, wired together once.

Everything the functions do takes a ``LedgerApp``; the Functions host builds one per worker
process (``shared/wiring.py``), the simulator one per simulated instance, the tests one per test
(with their own table, queue and blob names on a shared Azurite).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from shared.config.settings import AppConfig
from shared.domain.clock import SYSTEM_CLOCK, Clock
from shared.domain.model import LedgerSnapshot
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

    An app has one today. Sharding (K leases and ledger partitions) gives it one bundle per
    shard, each complete: its elector, its ledger partition, the completions its requests are
    recorded in, the cleaner of those rows, and this process's snapshot of its last commit and
    the requests it decided.
    """

    name: str
    elector: LeaseElector
    ledger: Ledger
    completions: CompletionStore
    cleaner: RowCleaner
    snapshot: LedgerSnapshot | None = None  # this process's last commit (see LeaderTerm)
    recently_decided: RecentRequests = field(default_factory=RecentRequests)

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

    ``elector``, ``ledger``, ``completions``, ``cleaner``, ``snapshot`` and ``recently_decided``
    are those of ``shard``, the one shard there is today.
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

    def __post_init__(self) -> None:
        if len(self.shards) != 1:
            raise ValueError(f"an app has exactly one shard today, not {len(self.shards)}")

    @property
    def shard(self) -> Shard:
        """The app's one shard."""
        return self.shards[0]

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
        """Wire the stores and the elector to the clients (makes no storage call)."""
        container = clients.blob.get_container_client(config.lease_container)
        elector = LeaseElector(
            AzureBlobLease(container, config.lease_blob,
                           call_timeout_seconds=config.storage_timeout_seconds),
            config.election, config.instance_id, clock, callbacks)
        shard = Shard.of("0", elector, Ledger(clients.open_table(config.ledger_table)),
                         CompletionStore(clients.open_table(config.completions_table)), clock)
        return cls(config=config, clients=clients,
                   parking=ParkingLot(clients.open_table(config.parked_table)),
                   shards=(shard,), clock=clock)

    def ensure_resources(self, queues: bool = True) -> None:
        """Create the tables, the lease blob and (locally) the queues. Idempotent.

        In Azure the Bicep deployment creates them; this is for Azurite and first runs.
        """
        ensure_tables(self.clients, (self.config.completions_table, self.config.ledger_table,
                                     self.config.parked_table))
        self.elector.ensure_blob()
        if queues:
            ensure_queues(self.clients, (self.config.completions_queue, self.config.poison_queue,
                                         self.config.wakeup_queue))

    def queue(self, name: str | None = None, *, raw: bool = False) -> MessageQueue:
        """The completions queue (or ``name``): text encoded as the host decodes it (base64),
        or, ``raw``, as it is on the wire (moving and peeking at poisoned messages).

        Its client has the queue service client's timeouts, retries and transport.
        """
        return self.clients.open_queue(name or self.config.completions_queue, raw=raw,
                                       timeout_seconds=self.config.storage_timeout_seconds)

    @functools.cached_property
    def wakeup_queue(self) -> MessageQueue:
        """The wake-up queue (lease alarms), made once: a term must not open a connection of
        its own."""
        return self.queue(self.config.wakeup_queue)
