"""What the leader decides for one request, from its recorded steps alone (pure functions).

Only the steps stamped (by storage) before the request's **deadline**, its first step's
``Timestamp`` plus ``REQUEST_TIMEOUT_SECONDS``, count. A step stamped at or after the deadline
is *late*: it never changes the decision, whenever the leader happens to look; once the outcome
exists it is settled like any late step (dropped when it agrees, parked when it contradicts).

Order of the rules over the steps on time, first match wins:

1. a conflict row (one operationId, two contents)            -> rejected
2. steps disagree on expectedOperations                        -> rejected
3. more distinct steps than expected                           -> rejected
4. any step failed                                             -> aborted
5. all expected steps succeeded                                -> ready to commit (the leader then
   rejects it if a balance would go below zero, see ``apply_legs``)
6. incomplete, and storage's time has passed the deadline      -> expired
7. otherwise                                                   -> pending (nothing to do yet)

Rule 6 waits ``EXPIRY_GRACE`` past the deadline, so that a row stamped just before the deadline
but made visible a moment after it is part of the read that decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from shared.domain.contract import StepStatus
from shared.domain.model import DecidedOutcome, RecordedStep
from shared.errors import BadInput

NAMED_IN_REASON = 5  # offenders a reason names before it gives a count
# How long after a request's deadline storage's time must be before it is judged expired: a
# write stamped before the deadline is visible well within this (docs/design.md 3.7).
EXPIRY_GRACE = timedelta(seconds=1)


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
    steps: tuple[RecordedStep, ...]  # the steps on time: what the decision is made from
    legs: tuple[tuple[str, Decimal], ...] = ()
    expected_operations: int = 0  # what the steps said (0 when they disagree)
    late: tuple[RecordedStep, ...] = ()  # stamped at or after the deadline: settled afterwards

    @property
    def rows(self) -> tuple[RecordedStep, ...]:
        """Every row the decision consumes: the steps on time and the late ones."""
        return self.steps + self.late

    @property
    def decided(self) -> bool:
        """True when the leader can write this request's outcome now."""
        return self.verdict is not Verdict.PENDING

    @property
    def operations(self) -> int:
        """How many distinct operationIds were recorded for the request."""
        return len({step.operation_id for step in self.steps})

    @property
    def step_contents(self) -> tuple[tuple[str, str], ...]:
        """(operationId, contentKey) of its first-recorded steps, sorted by operationId."""
        return tuple(sorted({s.operation_id: s.content_key() for s in self.steps
                             if not s.conflict}.items()))

    @property
    def last_recorded_at(self) -> datetime:
        """When the newest of its steps was recorded (the commit order)."""
        return max(step.recorded_at for step in self.steps)


def name_some(items: Sequence[str], limit: int = NAMED_IN_REASON) -> str:
    """The first ``limit`` items, then how many more: a reason stays short whatever the input."""
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more ({len(items)} in all)"


def deadline_of(steps: Sequence[RecordedStep], request_timeout: timedelta) -> datetime:
    """When the request expires: its first step's storage time plus the timeout."""
    return min(s.recorded_at for s in steps) + request_timeout


def assess(request_id: str, steps: Sequence[RecordedStep], now: datetime,
           request_timeout: timedelta) -> Assessment:
    """Apply the rules above to the steps recorded for one request.

    ``now`` and the steps' ``recorded_at`` must come from one clock (storage's, see
    ``CompletionStore``), so that expiry never compares two machines' clocks. The verdict
    depends only on the steps stamped before the deadline and, for expiry, on ``now``.
    """
    deadline = deadline_of(steps, request_timeout)
    on_time = tuple(s for s in steps if s.recorded_at < deadline)
    late = tuple(s for s in steps if s.recorded_at >= deadline)
    expected = {s.expected_operations for s in on_time}
    wanted = next(iter(expected)) if len(expected) == 1 else 0

    def verdict(kind: Verdict, reason: str, legs: tuple[tuple[str, Decimal], ...] = ()) -> (
            Assessment):
        return Assessment(request_id, kind, reason, on_time, legs, wanted, late)

    conflicts = sorted({s.operation_id for s in on_time if s.conflict})
    if conflicts:
        return verdict(Verdict.REJECTED, "operationId arrived twice with different content: "
                       + name_some(describe_conflicts(on_time, conflicts)))
    if len(expected) > 1:
        return verdict(Verdict.REJECTED, "steps disagree on expectedOperations: "
                       + name_some([str(n) for n in sorted(expected)]))
    distinct = {s.operation_id: s for s in on_time}
    if len(distinct) > wanted:
        return verdict(Verdict.REJECTED, f"{len(distinct)} distinct steps arrived, "
                       f"expectedOperations is {wanted}")
    failed = sorted(op for op, s in distinct.items() if s.status is StepStatus.FAILED)
    if failed:
        return verdict(Verdict.ABORTED, "step failed: " + name_some(failed))
    if len(distinct) == wanted:
        legs = tuple((s.account_id, s.signed_amount)
                     for _, s in sorted(distinct.items()))
        return verdict(Verdict.COMMIT, "", legs)
    if now >= deadline + EXPIRY_GRACE:
        return verdict(Verdict.EXPIRED, f"{len(distinct)} of {wanted} steps arrived within "
                       f"{request_timeout.total_seconds():g} s")
    return verdict(Verdict.PENDING, f"{len(distinct)} of {wanted} steps arrived")


def depends_on_deadline(assessment: Assessment) -> bool:
    """True when the verdict was reached at or past the deadline (expired, or late rows cut off).

    Such a verdict is confirmed on a fresh read of the request's rows before it is written.
    """
    return assessment.verdict is Verdict.EXPIRED or bool(assessment.late)


# What a second content of one step may differ in: (the contract's name, the step's attribute).
_CONTENT_FIELDS = (("operation", "operation"), ("accountId", "account_id"),
                   ("amount", "amount"), ("expectedOperations", "expected_operations"),
                   ("status", "status"))


def describe_conflicts(steps: Sequence[RecordedStep], operation_ids: Sequence[str]) -> list[str]:
    """Each conflicting operationId with the fields in which its contents differ."""
    versions: dict[str, list[RecordedStep]] = {}
    for step in steps:
        versions.setdefault(step.operation_id, []).append(step)
    described = []
    for operation_id in operation_ids:
        differing = [name for name, attribute in _CONTENT_FIELDS
                     if len({str(getattr(s, attribute)) for s in versions[operation_id]}) > 1]
        described.append(f"{operation_id} ({', '.join(differing)} differ)" if differing
                         else operation_id)
    return described


class InsufficientFunds(BadInput):
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


def contradiction(decided: DecidedOutcome, step: RecordedStep) -> str | None:
    """Why a late step contradicts its request's outcome; ``None`` when it does not.

    A plain duplicate of a decided step does not, nor does a late step of a request that moved
    no money (aborted, rejected, expired) unless it gives a decided step a second content. A
    late step of a *committed* request contradicts it when it disagrees on expectedOperations
    or carries a leg the commit did not apply: upstream then believes money moved that did not.
    """
    outcome = decided.outcome
    known = decided.step_contents.get(step.operation_id)
    where = f"request {outcome.request_id} was {outcome.status} at epoch {decided.epoch}"
    if step.conflict or (known is not None and known != step.content_key()):
        return (f"late step {step.operation_id} has a content different from the step the "
                f"request was decided on; {where}")
    if outcome.status != "committed":
        return None
    if outcome.expected_operations and step.expected_operations != outcome.expected_operations:
        return (f"late step {step.operation_id} says expectedOperations "
                f"{step.expected_operations}, the commit had {outcome.expected_operations}; "
                f"its leg ({step.operation.value} {step.amount} on {step.account_id}) was "
                f"never applied; {where}")
    if known is None and decided.steps_complete:
        return (f"late step {step.operation_id} is not one of the {len(decided.step_contents)} "
                f"steps the request committed with; its leg ({step.operation.value} "
                f"{step.amount} on {step.account_id}) was never applied; {where}")
    return None
