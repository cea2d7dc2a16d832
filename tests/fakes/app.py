"""``memory_app``: a whole ``LedgerApp`` on the in-memory fakes, for tests in milliseconds.

Its tables are ``MemoryTables``, its queues ``MemoryQueue``s and its lease a ``MemoryLease``, all
on one clock (a ``FakeClock`` unless told), so that storage's timestamps, the lease's expiry and
the app's own time move together and only when the test moves them. Several instances share one
``MemoryStorage`` as instances of a deployment share one account.

``shards=K`` (``LEDGER_SHARDS``) gives each shard what ``LedgerApp.create`` gives it in Azure,
under the same names (``shared/config/names.py``): its own ``MemoryLease`` (shard 0's is
``MemoryStorage.lease``, as with one shard), its partition of the ledger table and its own
completions table; cross-shard requests then run end to end in memory.

A ``FakeClock``'s sleep moves time on at once, which is what the test's own thread wants (a
final look ``skip_seconds`` later costs nothing); the lease's background renewer sleeps on
another thread, and there it would race the clock forward. So the app's clock lets only the
thread that made the app move time: other threads' sleeps wait a few real milliseconds.

The app's ``clients`` point at an endpoint where nothing listens: nothing on a memory app's path
uses them (its stores and queues are the fakes), and anything that did would fail at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.config.names import completions_table_name, lease_blob_name, ledger_partition
from shared.config.settings import load_config
from shared.domain.clock import Clock
from shared.election.elector import ElectionCallbacks, LeaseElector
from shared.leadership.instance import LedgerApp, Shard
from shared.storage.clients import azurite_connection_string, clients_from_connection_string
from shared.storage.completions import CompletionStore
from shared.storage.ledger import Ledger
from shared.storage.parking import ParkingLot
from shared.storage.ports import MessageQueue
from tests.fakes.clock import FakeClock
from tests.fakes.leases import MemoryLease
from tests.fakes.queues import MemoryQueue
from tests.fakes.tables import MemoryTables

NOWHERE = 9  # the discard port: a connection there is refused
NAMES = {
    "COMPLETIONS_QUEUE_NAME": "completions",
    "WAKEUP_QUEUE_NAME": "wakeups",
    "COMPLETIONS_TABLE_NAME": "completions",
    "LEDGER_TABLE_NAME": "ledger",
    "PARKED_TABLE_NAME": "parked",
    "LEASE_CONTAINER_NAME": "leases",
}


class OwnedClock:
    """``clock``, whose sleeps move time only on the thread that made it (see the docstring)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.owner = threading.get_ident()

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def now(self) -> datetime:
        return self.clock.now()

    def sleep(self, seconds: float) -> None:
        if threading.get_ident() == self.owner:
            self.clock.sleep(seconds)
        else:
            time.sleep(min(max(seconds, 0.0), 0.005))


@dataclass
class MemoryStorage:
    """One fake storage account: its tables, its queues (made on first use) and the lease
    (shard 0's; the other shards' lease blobs in ``leases``, made on first use)."""

    clock: Clock
    tables: MemoryTables = field(init=False)
    lease: MemoryLease = field(init=False)
    leases: dict[str, MemoryLease] = field(default_factory=dict)  # by blob name, shards >= 1
    queues: dict[str, MemoryQueue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tables = MemoryTables(self.clock)
        self.lease = MemoryLease(self.clock)

    def shard_lease(self, base: str, shard: int) -> MemoryLease:
        """The lease on shard ``shard``'s blob (``lease_blob_name(base, shard)``)."""
        if shard == 0:
            return self.lease
        name = lease_blob_name(base, shard)
        found = self.leases.get(name)
        if found is None:
            found = self.leases[name] = MemoryLease(self.clock, name=name)
        return found

    def queue(self, name: str) -> MemoryQueue:
        found = self.queues.get(name)
        if found is None:
            found = self.queues[name] = MemoryQueue(name, self.clock)
        return found


class MemoryLedgerApp(LedgerApp):
    """A ``LedgerApp`` whose queues are ``MemoryQueue``s (text as sent: raw or not alike)."""

    storage: MemoryStorage

    def queue(self, name: str | None = None, *, raw: bool = False) -> MessageQueue:
        return self.storage.queue(name or self.config.completions_queue)

    def ensure_resources(self, queues: bool = True) -> None:
        for shard in self.shards:  # tables and queues are made on first use
            shard.elector.ensure_blob()


def memory_app(clock: Clock | None = None, *, storage: MemoryStorage | None = None,
               instance_id: str = "memory-1", callbacks: ElectionCallbacks | None = None,
               shards: int = 1, **settings: str) -> MemoryLedgerApp:
    """An instance on ``storage`` (a new ``MemoryStorage`` on ``clock`` when none is given;
    ``clock`` defaults to the storage's, else a new ``FakeClock``), with ``settings`` over the
    defaults (``REQUEST_TIMEOUT_SECONDS="2"``, say), on ``shards`` shards (``LEDGER_SHARDS``;
    instances that share a storage must agree on it)."""
    if storage is None:
        storage = MemoryStorage(clock or FakeClock())
    clock = OwnedClock(clock or storage.clock)
    if shards != 1:
        settings = {"LEDGER_SHARDS": str(shards), **settings}
    config = load_config({**NAMES, **settings}, instance_id=instance_id)
    nowhere = azurite_connection_string(blob_port=NOWHERE, queue_port=NOWHERE,
                                        table_port=NOWHERE)
    ledger_table = storage.tables.table(config.ledger_table)
    each = tuple(
        Shard.of(str(k), LeaseElector(storage.shard_lease(config.lease_blob, k), config.election,
                                      config.instance_id, clock, callbacks),
                 Ledger(ledger_table, ledger_partition(k)),
                 CompletionStore(storage.tables.table(
                     completions_table_name(config.completions_table, k))), clock)
        for k in range(config.shards))
    fields: dict[str, Any] = {
        "config": config,
        "clients": clients_from_connection_string(nowhere, 1),
        "parking": ParkingLot(storage.tables.table(config.parked_table)),
        "shards": each,
        "clock": clock,
    }
    app = MemoryLedgerApp(**fields)
    app.storage = storage
    return app
