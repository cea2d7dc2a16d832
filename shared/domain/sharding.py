"""Which shard owns an account or a request, and what each shard's storage is called (pure).

**Slots.** An id is hashed (SHA-256, the same in every process and every Python: never
``hash()``) into one of ``SLOTS`` (64) slots, and slots map to shards. Today slot ``s`` belongs
to shard ``s % K``; a reshard moves slots, never ids, so an id's slot never changes.

**Homes.** An account lives on the shard of its id: its balance row is in that shard's ledger
partition. A request is recorded and decided on its *home shard*: a one-step request (a deposit)
on its account's shard, so that it never crosses shards; a request of several steps on the shard
of its ``requestId`` (each step carries only its own account, so no step knows the others').

What each shard's storage is called is in ``shared/config/names.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from shared.config.names import MAX_SHARDS, SLOTS


def slot_of(identifier: str) -> int:
    """The id's slot, 0..SLOTS-1: a stable hash, the same in every process."""
    digest = hashlib.sha256(identifier.encode()).digest()
    return int.from_bytes(digest[:4], "big") % SLOTS


@dataclass(frozen=True)
class ShardMap:
    """Slots to shards: slot ``s`` belongs to shard ``s % shards``."""

    shards: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"a ledger has 1 to {MAX_SHARDS} shards, not {self.shards}")

    def shard_of_slot(self, slot: int) -> int:
        return slot % self.shards

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
