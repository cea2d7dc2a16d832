"""Which shard owns an account or a request, and what each shard's storage is called (pure).

**Slots.** An id is hashed (SHA-256, the same in every process and every Python: never
``hash()``) into one of ``SLOTS`` (64) slots, and slots map to shards. A ``ShardMap`` is that
map: a list of 64 shard numbers and a ``generation``. A new deployment is seeded with slot ``s``
on shard ``s % K`` (``LEDGER_SHARDS``); a reshard (``shared/leadership/reshard.py``) gives the
next generation the same layout for its new K (``resharded``), and moves slots, never ids: an
id's slot never changes.

**Generations.** The map in force is kept in storage (``shared/storage/shardmap.py``) with the
earlier generations' slot lists. Outcome rows are never moved, so a request decided under an
earlier generation is found on its home *under that generation* (``earlier_homes``).

**Homes.** An account lives on the shard of its id: its balance row is in that shard's ledger
partition. A request is recorded and decided on its *home shard*: a one-step request (a deposit)
on its account's shard, so that it never crosses shards; a request of several steps on the shard
of its ``requestId`` (each step carries only its own account, so no step knows the others').

What each shard's storage is called is in ``shared/config/names.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from shared.config.names import MAX_SHARDS, SLOTS


def slot_of(identifier: str) -> int:
    """The id's slot, 0..SLOTS-1: a stable hash, the same in every process."""
    digest = hashlib.sha256(identifier.encode()).digest()
    return int.from_bytes(digest[:4], "big") % SLOTS


def seeded_slots(shards: int) -> tuple[int, ...]:
    """The layout of a new deployment of ``shards`` shards: slot ``s`` on shard ``s % shards``."""
    return tuple(slot % shards for slot in range(SLOTS))


@dataclass(frozen=True)
class ShardMap:
    """Slots to shards (``slots[s]`` is slot ``s``'s shard), and the map's generation.

    ``ShardMap(K)`` is the seeded layout ``s % K``. ``generation`` is 0 for a map computed in
    memory, and counts from 1 for the maps kept in storage.
    """

    shards: int = 1
    slots: tuple[int, ...] = ()
    generation: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"a ledger has 1 to {MAX_SHARDS} shards, not {self.shards}")
        if not self.slots:
            object.__setattr__(self, "slots", seeded_slots(self.shards))
        if len(self.slots) != SLOTS or any(not 0 <= s < self.shards for s in self.slots):
            raise ValueError(f"a shard map has {SLOTS} slots, each on one of its "
                             f"{self.shards} shard(s)")

    def resharded(self, shards: int) -> ShardMap:
        """The next generation's map for ``shards`` shards (the seeded layout of that K)."""
        return ShardMap(shards, seeded_slots(shards), self.generation + 1)

    def shard_of_slot(self, slot: int) -> int:
        return self.slots[slot]

    def account_shard(self, account_id: str) -> int:
        """The shard whose ledger partition holds the account's balance."""
        return self.shard_of_slot(slot_of(account_id)) if self.shards > 1 else 0

    def request_shard(self, request_id: str) -> int:
        """The shard of the requestId: the home of a request of several steps, and where every
        request's claim is kept (``shared.domain.planning.claim_entity``)."""
        return self.shard_of_slot(slot_of(request_id)) if self.shards > 1 else 0

    def home_of(self, request_id: str, expected_operations: int, account_id: str) -> int:
        """The shard that records a request's steps and decides it (see the module docstring)."""
        if self.shards == 1:
            return 0
        if expected_operations == 1:
            return self.account_shard(account_id)
        return self.request_shard(request_id)

    def legs_by_shard(self, legs: Iterable[tuple[str, Decimal]]
                      ) -> dict[int, tuple[tuple[str, Decimal], ...]]:
        """A request's legs grouped by the shard of their account (in the legs' order)."""
        grouped: dict[int, list[tuple[str, Decimal]]] = {}
        for account, amount in legs:
            grouped.setdefault(self.account_shard(account), []).append((account, amount))
        return {shard: tuple(found) for shard, found in sorted(grouped.items())}

    def moved_slots(self, other: ShardMap) -> list[int]:
        """The slots whose shard differs between this map and ``other``."""
        return [s for s in range(SLOTS) if self.slots[s] != other.slots[s]]


def earlier_homes(request_id: str, expected_operations: int, account_id: str,
                  current: ShardMap, earlier: Sequence[ShardMap]) -> list[int]:
    """The shards, other than the current home, that were the request's home under an earlier
    generation (newest first, each once): where an outcome decided then would be."""
    now = current.home_of(request_id, expected_operations, account_id)
    found: list[int] = []
    for shard_map in reversed(earlier):
        home = shard_map.home_of(request_id, expected_operations, account_id)
        if home != now and home not in found:
            found.append(home)
    return found


def earlier_request_shards(request_id: str, current: ShardMap,
                           earlier: Sequence[ShardMap]) -> list[int]:
    """The shards, other than the current one, that kept the requestId's claim (and the outcome
    of a request of several steps) under an earlier generation (newest first, each once)."""
    now = current.request_shard(request_id)
    found: list[int] = []
    for shard_map in reversed(earlier):
        shard = shard_map.request_shard(request_id)
        if shard != now and shard not in found:
            found.append(shard)
    return found
