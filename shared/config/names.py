"""What each shard's storage is called: the lease blob, the ledger partition, the completions table.

Shard 0 keeps every name a one-shard deployment has always used, so ``LEDGER_SHARDS=1`` reads
and writes exactly what it did before shards existed. Shard ``k >= 1`` appends ``-k`` (a blob
or a partition) or ``shardk`` (table names are alphanumeric).
"""

from __future__ import annotations

SLOTS = 64  # ids hash into this many slots; slots map to shards (shared/domain/sharding.py)
MAX_SHARDS = SLOTS
LEDGER_PARTITION = "ledger"
TABLE_SUFFIX = "shard"
MAX_TABLE_NAME = 63  # Azure Table names: 3-63 alphanumeric characters


def lease_blob_name(base: str, shard: int) -> str:
    """The blob whose lease elects the shard's leader."""
    return base if shard == 0 else f"{base}-{shard}"


def ledger_partition(shard: int) -> str:
    """The shard's ledger partition: balances, outcomes, the fence and its work in flight."""
    return LEDGER_PARTITION if shard == 0 else f"{LEDGER_PARTITION}-{shard}"


def completions_table_name(base: str, shard: int) -> str:
    """The table the shard's home requests are recorded in."""
    return base if shard == 0 else f"{base}{TABLE_SUFFIX}{shard}"
