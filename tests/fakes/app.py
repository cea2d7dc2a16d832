"""``memory_app``: a whole ``LedgerApp`` on the in-memory fakes, for tests in milliseconds.

Its tables are ``MemoryTables``, its queues ``MemoryQueue``s and its lease a ``MemoryLease``, all
on one clock (a ``FakeClock`` unless told), so that storage's timestamps, the lease's expiry and
the app's own time move together and only when the test moves them. Several instances share one
``MemoryStorage`` as instances of a deployment share one account.

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
    """One fake storage account: its tables, its queues (made on first use) and the lease."""

    clock: Clock
    tables: MemoryTables = field(init=False)
    lease: MemoryLease = field(init=False)
    queues: dict[str, MemoryQueue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tables = MemoryTables(self.clock)
        self.lease = MemoryLease(self.clock)

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
        self.elector.ensure_blob()  # tables and queues are made on first use


def memory_app(clock: Clock | None = None, *, storage: MemoryStorage | None = None,
               instance_id: str = "memory-1", callbacks: ElectionCallbacks | None = None,
               **settings: str) -> MemoryLedgerApp:
    """An instance on ``storage`` (a new ``MemoryStorage`` on ``clock`` when none is given;
    ``clock`` defaults to the storage's, else a new ``FakeClock``), with ``settings`` over the
    defaults (``REQUEST_TIMEOUT_SECONDS="2"``, say)."""
    if storage is None:
        storage = MemoryStorage(clock or FakeClock())
    clock = OwnedClock(clock or storage.clock)
    config = load_config({**NAMES, **settings}, instance_id=instance_id)
    nowhere = azurite_connection_string(blob_port=NOWHERE, queue_port=NOWHERE,
                                        table_port=NOWHERE)
    shard = Shard.of("0", LeaseElector(storage.lease, config.election, config.instance_id,
                                       clock, callbacks),
                     Ledger(storage.tables.table(config.ledger_table)),
                     CompletionStore(storage.tables.table(config.completions_table)), clock)
    fields: dict[str, Any] = {
        "config": config,
        "clients": clients_from_connection_string(nowhere, 1),
        "parking": ParkingLot(storage.tables.table(config.parked_table)),
        "shards": (shard,),
        "clock": clock,
    }
    app = MemoryLedgerApp(**fields)
    app.storage = storage
    return app
