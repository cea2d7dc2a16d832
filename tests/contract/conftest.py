"""The storage contract's backends: every case runs on the in-memory fakes and on Azurite.

``backend`` is parametrized ``memory`` / ``azurite``; ``table`` and ``queue`` are a new table and
queue of it, named for the test alone. ``backend.wait(s)`` lets ``s`` seconds pass: the fake
clock advances at once, Azurite's time is real. Where Azurite does not do what Azure's
documentation says, a case calls ``backend.azurite_differs(reason)``: on Azurite it is then an
expected failure (strict: a case that starts to pass there is reported, so the mark goes).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from shared.storage.azure_queues import AzureQueue
from shared.storage.azure_tables import AzureTable
from shared.storage.clients import StorageClients, clients_from_connection_string
from shared.storage.ports import MessageQueue, Table
from simulator.azurite import Azurite
from tests.fakes import FakeClock, MemoryQueue, MemoryTables


@dataclass
class Backend:
    """One implementation of the ports, as the contract's cases use it."""

    kind: str
    new_table: Callable[[], Table]
    new_queue: Callable[[], MessageQueue]
    wait: Callable[[float], None]
    request: pytest.FixtureRequest

    def azurite_differs(self, reason: str) -> None:
        """Mark this case an expected failure on Azurite (where it departs from Azure's
        documentation), with why."""
        if self.kind == "azurite":
            self.request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def unique(prefix: str) -> str:
    """A table or queue name of this test alone (letters and digits, 3 to 63 characters)."""
    return f"{prefix}{uuid.uuid4().hex[:20]}"


@pytest.fixture(scope="session")
def azurite_clients(azurite: Azurite) -> StorageClients:
    """The app's own clients (its retries and timeouts) on the session's Azurite."""
    return clients_from_connection_string(azurite.connection_string)


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.azurite)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        clock = FakeClock()
        tables = MemoryTables(clock)
        return Backend("memory", lambda: tables.table(unique("t")),
                       lambda: MemoryQueue(unique("q"), clock), clock.advance, request)
    clients: StorageClients = request.getfixturevalue("azurite_clients")

    def new_table() -> Table:
        return AzureTable(clients.table.create_table(unique("t")))

    def new_queue() -> MessageQueue:
        return AzureQueue(clients.queue.create_queue(unique("q")))

    return Backend("azurite", new_table, new_queue, time.sleep, request)


@pytest.fixture
def table(backend: Backend) -> Table:
    return backend.new_table()


@pytest.fixture
def queue(backend: Backend) -> MessageQueue:
    return backend.new_queue()
