"""What the leader decides for one request, from its recorded steps alone (pure functions).

Order of the rules, first match wins:

1. a conflict row (one operationId, two contents)            -> rejected
2. steps disagree on expectedOperations                        -> rejected
3. more distinct steps than expected                           -> rejected
4. any step failed                                             -> aborted
5. all expected steps succeeded                                -> ready to commit (the leader then
   rejects it if a balance would go below zero, see ``apply_legs``)
6. still incomplete ``request_timeout`` after its first step   -> expired
7. otherwise                                                   -> pending (nothing to do yet)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from shared.completions import RecordedStep
from shared.contract import StepStatus


class Verdict(StrEnum):
    """What the leader can do with a request now."""

    PENDING = "pending"
    COMMIT = "commit"
    ABORTED = "aborted"
    REJECTED = "rejected"
    EXPIRED = "expired"
    LATE = "late"  # steps of a request that already ended: dropped, nothing written


@dataclass(frozen=True)
class Assessment:
    """The verdict on one request, with the reason and the legs a commit would apply."""

    request_id: str
    verdict: Verdict
    reason: str
    steps: tuple[RecordedStep, ...]
    legs: tuple[tuple[str, Decimal], ...] = ()

    @property
    def decided(self) -> bool:
        """True when the leader can write this request's outcome now."""
        return self.verdict is not Verdict.PENDING

    @property
    def last_recorded_at(self) -> datetime:
        """When the newest of its steps was recorded (the commit order)."""
        return max(step.recorded_at for step in self.steps)


def assess(request_id: str, steps: Sequence[RecordedStep], now: datetime,
           request_timeout: timedelta) -> Assessment:
    """Apply the rules above to the steps recorded for one request."""
    frozen = tuple(steps)

    def verdict(kind: Verdict, reason: str, legs: tuple[tuple[str, Decimal], ...] = ()) -> (
            Assessment):
        return Assessment(request_id, kind, reason, frozen, legs)

    conflicts = sorted({s.operation_id for s in frozen if s.conflict})
    if conflicts:
        return verdict(Verdict.REJECTED, "operationId arrived twice with different content: "
                       + describe_conflicts(frozen, conflicts))
    expected = {s.expected_operations for s in frozen}
    if len(expected) > 1:
        return verdict(Verdict.REJECTED, "steps disagree on expectedOperations: "
                       + ", ".join(str(n) for n in sorted(expected)))
    wanted = expected.pop()
    distinct = {s.operation_id: s for s in frozen}
    if len(distinct) > wanted:
        return verdict(Verdict.REJECTED, f"{len(distinct)} distinct steps arrived, "
                       f"expectedOperations is {wanted}")
    failed = sorted(op for op, s in distinct.items() if s.status is StepStatus.FAILED)
    if failed:
        return verdict(Verdict.ABORTED, "step failed: " + ", ".join(failed))
    if len(distinct) == wanted:
        legs = tuple((s.account_id, s.signed_amount)
                     for _, s in sorted(distinct.items()))
        return verdict(Verdict.COMMIT, "", legs)
    first = min(s.recorded_at for s in frozen)
    if now - first >= request_timeout:
        return verdict(Verdict.EXPIRED, f"{len(distinct)} of {wanted} steps arrived within "
                       f"{request_timeout.total_seconds():g} s")
    return verdict(Verdict.PENDING, f"{len(distinct)} of {wanted} steps arrived")


# What a second content of one step may differ in, by the contract's field names.
_CONTENT_FIELDS = (("operation", "operation"), ("accountId", "account_id"),
                   ("amount", "amount"), ("expectedOperations", "expected_operations"),
                   ("status", "status"))
_DESCRIBED_CONFLICTS = 3


def describe_conflicts(steps: Sequence[RecordedStep], operation_ids: Sequence[str]) -> str:
    """Which fields differ between the contents of each conflicting step (the first few)."""
    described = []
    for operation_id in operation_ids[:_DESCRIBED_CONFLICTS]:
        versions = [s for s in steps if s.operation_id == operation_id]
        differing = [name for name, attribute in _CONTENT_FIELDS
                     if len({str(getattr(s, attribute)) for s in versions}) > 1]
        described.append(f"{operation_id} ({', '.join(differing)} differ)" if differing
                         else operation_id)
    if len(operation_ids) > _DESCRIBED_CONFLICTS:
        described.append(f"and {len(operation_ids) - _DESCRIBED_CONFLICTS} more")
    return ", ".join(described)


class InsufficientFunds(ValueError):
    """Applying the legs would take an account below zero."""

    def __init__(self, account_id: str, balance: Decimal) -> None:
        super().__init__(f"insufficient funds: account {account_id} would go to {balance}")
        self.account_id = account_id


def apply_legs(balances: Mapping[str, Decimal],
               legs: Sequence[tuple[str, Decimal]]) -> dict[str, Decimal]:
    """The new balances of the accounts the legs touch, all or nothing.

    A request's legs are applied together: its net effect on each account must keep that
    account at or above zero (a transfer's withdraw and add legs on one account may net out).
    """
    changed: dict[str, Decimal] = {}
    for account_id, amount in legs:
        changed[account_id] = changed.get(account_id, balances[account_id]) + amount
    for account_id, balance in sorted(changed.items()):
        if balance < 0:
            raise InsufficientFunds(account_id, balance)
    return changed
