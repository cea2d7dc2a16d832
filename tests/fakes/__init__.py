"""In-memory stand-ins for the storage ports and the clock, for fast tests.

``MemoryTables``/``MemoryTable`` (``Table``), ``MemoryQueue`` (``MessageQueue``) and
``FakeClock`` (``Clock``). The tables and the queue answer as Azure's documentation says storage
does; ``tests/contract/`` runs the same cases against them and against Azurite, so they cannot
drift from storage unnoticed.
"""

from tests.fakes.clock import FakeClock
from tests.fakes.queues import MemoryQueue
from tests.fakes.tables import MemoryTable, MemoryTables

__all__ = ["FakeClock", "MemoryQueue", "MemoryTable", "MemoryTables"]
