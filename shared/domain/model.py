"""The model types the rules, the term and the repositories share (pure data, no I/O).

A ``RecordedStep`` is a ``Completion`` as storage recorded it; an ``Outcome`` is the final word
on one request; the ``Fence`` is the epoch a leader writes under. Every type here is immutable:
a new fence or snapshot is a new value, never a change to the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import ConfigDict

from shared.domain.contract import Completion

MAX_REASON_CHARS = 1_000  # a table property holds 32K characters; reasons stay far below


@dataclass(frozen=True)
class RowRef:
    """One version of one row: its keys and the ETag it was read with (for conditional deletes)."""

    partition_key: str
    row_key: str
    etag: str


class RecordedStep(Completion):
    """One completion as recorded: the message's fields plus where and when storage kept it.

    Built by the repositories with ``model_construct`` (the row was validated when the message
    was); ``recorded_at`` is storage's Timestamp of the row, the clock expiry is judged by.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    row_key: str
    stored_key: str  # the content key recorded with the row
    recorded_at: datetime
    conflict: bool = False
    partition_key: str = ""  # where the row is stored (the bucket; the requestId for old rows)
    recorded_by: str = ""  # the instance that recorded it
    traceparent: str = ""  # the span that recorded it (W3C), for the commit span's link
    etag: str = ""  # the version read: a delete removes this version only

    def content_key(self) -> str:
        """The content key as recorded (what made two deliveries of one step the same)."""
        return self.stored_key

    @property
    def ref(self) -> RowRef:
        """This version of the row."""
        return RowRef(self.partition_key or self.request_id, self.row_key, self.etag)


class OutcomeStatus(StrEnum):
    """How a request ended."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    REJECTED = "rejected"
    EXPIRED = "expired"


Leg = tuple[str, Decimal]  # (accountId, signed amount)


@dataclass(frozen=True)
class Outcome:
    """The final word on one request, written exactly once."""

    request_id: str
    status: OutcomeStatus
    reason: str
    legs: tuple[Leg, ...] = ()  # applied on commit
    operations: int = 0  # distinct operationIds seen when it was decided
    expected_operations: int = 0  # what the steps said (0: they disagreed)
    steps: tuple[tuple[str, str], ...] = ()  # (operationId, contentKey) of the decided steps
    # Other shards that must apply (or release) it before it is settled: a cross-shard request.
    shards: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecidedOutcome:
    """An outcome as stored: what was decided, when, and by which epoch."""

    outcome: Outcome
    decided_at: str
    epoch: int
    decided_by: str
    steps_complete: bool  # False when the row keeps only the first MAX_RECORDED_STEPS digests
    # False while other shards have yet to apply or release a cross-shard decision.
    settled: bool = True

    @property
    def step_contents(self) -> dict[str, str]:
        """operationId -> contentKey of the steps the outcome was decided on."""
        return dict(self.outcome.steps)


@dataclass(frozen=True)
class Fence:
    """The fence row: the current epoch, its holder, and the row's ETag (immutable)."""

    epoch: int
    etag: str
    holder: str
    claimed_at: str
    last_commit_at: str = ""
    released_epoch: int = 0  # the last epoch whose holder released its lease (a hand-over)

    @property
    def released(self) -> bool:
        """Its epoch's holder released the lease: the next claim is a hand-over, not a
        takeover (``Ledger.mark_released``)."""
        return self.released_epoch == self.epoch


@dataclass(frozen=True)
class AccountRow:
    """An account's balance and the ETag it was read with (``None``: no row yet, balance 0)."""

    account_id: str
    balance: Decimal  # what the account can spend: money held in escrow is not in it
    etag: str | None
    reserved: Decimal = Decimal("0.00")  # held in escrow for undecided cross-shard requests


@dataclass(frozen=True)
class LedgerSnapshot:
    """What a leader knew when its last transaction landed.

    Every ledger write changes the fence's ETag, so while the fence still has ``etag`` nothing
    was written since and ``balances`` are current: the next term may start from them.
    """

    epoch: int
    etag: str
    last_commit_at: str
    balances: Mapping[str, AccountRow]


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying that it was cut."""
    if len(text) <= limit:
        return text
    keep = limit - len(f"... ({len(text)} more characters)")  # the count has no more digits
    return f"{text[:keep]}... ({len(text) - keep} more characters)"
