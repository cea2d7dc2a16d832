"""A generated workload for the demo, and the independent check of what the ledger ended with.

Deposits fund the accounts, then transfers (a withdraw leg and an add leg) move money between
them; some transfers have a failed leg, some messages are delivered twice, the legs of a request
arrive out of order, and a few messages are malformed. The check knows only what was sent: it
recomputes every balance from the committed outcomes' legs and from nothing else.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

from shared.contract import Operation, StepStatus, completion_message
from shared.ledger import DecidedOutcome
from shared.money import format_money


@dataclass
class Workload:
    """Messages to send, in sending order, and what each request is."""

    messages: list[str] = field(default_factory=list)
    deposits: dict[str, Decimal] = field(default_factory=dict)  # requestId -> amount
    transfers: dict[str, tuple[str, str, Decimal]] = field(default_factory=dict)
    doomed: set[str] = field(default_factory=set)  # requests with a failed step
    malformed: int = 0
    duplicates: int = 0

    @property
    def requests(self) -> int:
        """How many well-formed requests were sent."""
        return len(self.deposits) + len(self.transfers)


def _step(request_id: str, operation_id: str, operation: Operation, account: str,
          amount: Decimal, expected: int, status: StepStatus = StepStatus.SUCCEEDED) -> str:
    return completion_message(request_id=request_id, operation_id=operation_id,
                              operation=operation, account_id=account,
                              amount=format_money(amount), expected_operations=expected,
                              status=status)


def _money(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low * 100, high * 100)) / 100


def _bad(request_id: str, **fields: object) -> str:
    """A step that breaks the contract in the way ``fields`` say (built, not validated)."""
    good: dict[str, object] = dict(
        request_id=request_id, operation_id="x", operation=Operation.ADD_FUNDS, account_id="a",
        amount="1.00", expected_operations=1, status=StepStatus.SUCCEEDED)
    return completion_message(**{**good, **fields})


MALFORMED = [
    _bad("bad-1", amount=10.5),  # a float amount
    _bad("bad-2", amount="10.555"),  # 3 decimals
    completion_message(request_id="bad 3", operation="steal_funds"),  # bad charset, fields missing
    "this is not json",
    _bad("bad-5", operation=Operation.WITHDRAW_FUNDS, expected_operations=99),  # too many steps
]


def generate(accounts: int = 20, transfers: int = 200, failed_ratio: float = 0.05,
             duplicate_ratio: float = 0.1, malformed: int = 5, seed: int = 7) -> Workload:
    """Deposits first (one per account), then shuffled transfer legs with the faults mixed in."""
    rng = random.Random(seed)
    work = Workload()
    names = [f"acct-{i:03d}" for i in range(accounts)]
    for name in names:
        request_id = f"dep-{name}"
        amount = _money(rng, 100, 1000)
        work.deposits[request_id] = amount
        work.messages.append(_step(request_id, f"{request_id}-add", Operation.ADD_FUNDS, name,
                                   amount, 1))
    legs: list[str] = []
    for i in range(transfers):
        request_id = f"tx-{i:05d}"
        source, target = rng.sample(names, 2)
        amount = _money(rng, 1, 300)
        work.transfers[request_id] = (source, target, amount)
        failing = rng.random() < failed_ratio
        if failing:
            work.doomed.add(request_id)
        fail_leg = rng.choice(["w", "a"]) if failing else ""
        ok, failed = StepStatus.SUCCEEDED, StepStatus.FAILED
        legs.append(_step(request_id, f"{request_id}-w", Operation.WITHDRAW_FUNDS, source,
                          amount, 2, failed if fail_leg == "w" else ok))
        legs.append(_step(request_id, f"{request_id}-a", Operation.ADD_FUNDS, target, amount, 2,
                          failed if fail_leg == "a" else ok))
    duplicates = [leg for leg in legs if rng.random() < duplicate_ratio]
    work.duplicates = len(duplicates)
    bad = [MALFORMED[i % len(MALFORMED)] for i in range(malformed)]
    work.malformed = len(bad)
    tail = legs + duplicates + bad
    rng.shuffle(tail)  # out of order: a request's legs arrive in any order, far apart
    work.messages.extend(tail)
    return work


@dataclass
class CheckResult:
    """What the independent check found; ``problems`` empty means all held."""

    outcomes: Counter[str]
    total_deposited: Decimal
    total_balance: Decimal
    problems: list[str]


def check(work: Workload, decided: list[DecidedOutcome],
          balances: dict[str, Decimal], parked: int, poisoned: int) -> CheckResult:
    """Check the ledger against the workload, to the cent."""
    problems: list[str] = []
    by_request = {d.outcome.request_id: d.outcome for d in decided}
    statuses = Counter(outcome.status for outcome in by_request.values())
    known = set(work.deposits) | set(work.transfers)
    missing = sorted(known - set(by_request))
    if missing:
        problems.append(f"{len(missing)} request(s) have no outcome, e.g. {missing[:3]}")
    unexpected = sorted(set(by_request) - known)
    if unexpected:
        problems.append(f"outcomes for requests never sent: {unexpected[:3]}")
    for request_id in sorted(work.doomed & set(by_request)):
        if by_request[request_id].status != "aborted":
            problems.append(f"{request_id} had a failed step but is "
                            f"{by_request[request_id].status}")
    for request_id, outcome in by_request.items():
        if outcome.status == "rejected" and "insufficient funds" not in outcome.reason:
            problems.append(f"{request_id} rejected for an unexpected reason: {outcome.reason}")
    # Replay the committed legs: the ledger must hold exactly their sum, account by account.
    replayed: dict[str, Decimal] = {}
    for outcome in by_request.values():
        if outcome.status != "committed":
            continue
        for account, amount in outcome.legs:
            replayed[account] = replayed.get(account, Decimal("0.00")) + amount
    for account in sorted(set(replayed) | set(balances)):
        want = replayed.get(account, Decimal("0.00"))
        have = balances.get(account, Decimal("0.00"))
        if want != have:
            problems.append(f"{account}: balance {have} but committed legs sum to {want}")
        if have < 0:
            problems.append(f"{account} is negative: {have}")
    deposited = sum((amount for request_id, amount in work.deposits.items()
                     if request_id in by_request
                     and by_request[request_id].status == "committed"),
                    Decimal("0.00"))
    total = sum(balances.values(), Decimal("0.00"))
    if total != deposited:
        problems.append(f"money not conserved: balances sum to {total}, committed deposits to "
                        f"{deposited}")
    if parked != work.malformed:
        problems.append(f"{parked} message(s) parked, {work.malformed} malformed were sent")
    if poisoned:
        problems.append(f"{poisoned} message(s) ended in the poison queue")
    return CheckResult(statuses, deposited, total, problems)
