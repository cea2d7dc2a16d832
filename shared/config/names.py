"""What each shard's storage is called (the lease blob, the ledger partition, the completions
table), and what each intake queue is called.

Shard 0 keeps every name a one-shard deployment has always used, so ``LEDGER_SHARDS=1`` reads
and writes exactly what it did before shards existed. Shard ``k >= 1`` appends ``-k`` (a blob
or a partition) or ``shardk`` (table names are alphanumeric).

Intake queues (``INTAKE_QUEUES`` = Q) follow the same rule: queue 0 is ``COMPLETIONS_QUEUE_NAME``
itself, queue ``q >= 1`` is ``{COMPLETIONS_QUEUE_NAME}-q``, and each has its poison queue
``{name}-poison``, where the Functions host moves a message after ``maxDequeueCount`` failures.
Queue 0's trigger is ``record_completion``, queue q's ``record_completion_q``; its binding
expression is ``%COMPLETIONS_QUEUE_NAME%-q`` (the host resolves a ``%setting%`` token inside a
longer string, as in ``%Environment%/newblob.txt``).
"""

from __future__ import annotations

import re

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


MAX_INTAKE_QUEUES = 16
MAX_QUEUE_NAME = 63  # Azure queue names: 3-63 characters
POISON_SUFFIX = "-poison"
INTAKE_FUNCTION = "record_completion"  # queue 0's function; queue q's is record_completion_q
# Lower-case letters, digits and single hyphens, starting and ending with a letter or digit.
_QUEUE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*")


def intake_queue_name(base: str, queue: int) -> str:
    """Intake queue ``queue``: the base name itself for queue 0, ``{base}-q`` after."""
    return base if queue == 0 else f"{base}-{queue}"


def intake_queue_names(base: str, count: int) -> tuple[str, ...]:
    """The names of intake queues 0..count-1."""
    return tuple(intake_queue_name(base, q) for q in range(count))


def poison_queue_name(queue_name: str) -> str:
    """The queue the Functions host moves a message of ``queue_name`` to after its retries."""
    return f"{queue_name}{POISON_SUFFIX}"


def intake_function_name(queue: int) -> str:
    """The name of the function triggered by intake queue ``queue`` (unique in the app)."""
    return INTAKE_FUNCTION if queue == 0 else f"{INTAKE_FUNCTION}_{queue}"


def intake_binding_expression(setting_name: str, queue: int) -> str:
    """The trigger's ``queue_name``: ``%SETTING%``, then ``%SETTING%-q`` for queue q >= 1."""
    return intake_queue_name(f"%{setting_name}%", queue)


def queue_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Azure queue name, or ``None`` when it is one."""
    if not 3 <= len(name) <= MAX_QUEUE_NAME:
        return f"{name!r} has {len(name)} characters (a queue name has 3-{MAX_QUEUE_NAME})"
    if not _QUEUE_NAME.fullmatch(name):
        return (f"{name!r} is not a valid queue name (lower-case letters, digits and single "
                "hyphens, starting and ending with a letter or digit)")
    return None
