"""A generated workload for the demo, and the independent check of what the ledger ended with.

Deposits fund the accounts, then transfers (a withdraw leg and an add leg) move money between
them; some transfers have a failed leg, some messages are delivered twice, the legs of a request
arrive out of order, and a few messages are malformed. The check knows only what was sent: it
recomputes every balance from the committed outcomes' legs and from nothing else.

With ``shards`` > 1 (the sharded demo), most transfers cross shards (two random accounts, and a
home shard of their own), a share are kept within one shard (both accounts on the shard of the
request id, its home: no cross-shard protocol), and a share have 3-4 legs spanning three shards
when there are that many. With one shard the workload is exactly what it always was.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from shared.domain.contract import Operation, StepStatus, completion_message
from shared.domain.model import DecidedOutcome
from shared.domain.money import format_money
from shared.domain.sharding import ShardMap
from simulator.checker import Sent


@dataclass
class Workload:
    """Messages to send, in sending order, and what each request is."""

    messages: list[str] = field(default_factory=list)
    deposits: dict[str, Decimal] = field(default_factory=dict)  # requestId -> amount
    transfers: dict[str, tuple[str, str, Decimal]] = field(default_factory=dict)
    doomed: set[str] = field(default_factory=set)  # requests with a failed step
    malformed: int = 0
    duplicates: int = 0
    # Requests of 3-4 legs (sharded workloads only): requestId -> (accountId, signed amount).
    multi: dict[str, tuple[tuple[str, Decimal], ...]] = field(default_factory=dict)
    shards: int = 1  # the shard count the workload was laid out for

    @property
    def requests(self) -> int:
        """How many well-formed requests were sent."""
        return len(self.deposits) + len(self.transfers) + len(self.multi)

    def legs(self) -> dict[str, tuple[tuple[str, Decimal], ...]]:
        """Every request's legs as sent, (accountId, signed amount), one per step."""
        found: dict[str, tuple[tuple[str, Decimal], ...]] = {
            request_id: ((request_id.removeprefix("dep-"), amount),)
                 for request_id, amount in self.deposits.items()}
        found.update({request_id: ((source, -amount), (target, amount))
                      for request_id, (source, target, amount) in self.transfers.items()})
        found.update(self.multi)
        return found

    def sent(self) -> dict[str, Sent]:
        """Every request as the independent checker (``simulator/checker.py``) takes it: a
        transfer may be refused (accounts are funded for a few transfers, not all)."""
        return {request_id: Sent(request_id, legs, request_id in self.doomed,
                                 may_reject=len(legs) > 1)
                for request_id, legs in self.legs().items()}

    def crossing(self) -> set[str]:
        """The requests whose legs are not all on their home shard (the cross-shard ones)."""
        shard_map = ShardMap(self.shards)
        found = set()
        for request_id, legs in self.legs().items():
            home = shard_map.home_of(request_id, len(legs), legs[0][0])
            if any(shard_map.account_shard(account) != home for account, _ in legs):
                found.add(request_id)
        return found


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
             duplicate_ratio: float = 0.1, malformed: int = 5, seed: int = 7, shards: int = 1,
             multi_leg_ratio: float = 0.1, local_ratio: float = 0.15) -> Workload:
    """Deposits first (one per account), then shuffled transfer legs with the faults mixed in.

    With ``shards`` > 1, a fraction ``multi_leg_ratio`` of the transfers have 3-4 legs (one
    payer, spanning three shards when there are that many) and ``local_ratio`` keep both
    accounts on the request's home shard; the others take two random accounts (with K shards,
    most cross shards). With one shard the ratios are not used: the same seed gives the same
    messages as it always did.
    """
    rng = random.Random(seed)
    work = Workload(shards=shards)
    names = [f"acct-{i:03d}" for i in range(accounts)]
    shard_map = ShardMap(shards)
    for name in names:
        request_id = f"dep-{name}"
        amount = _money(rng, 100, 1000)
        work.deposits[request_id] = amount
        work.messages.append(_step(request_id, f"{request_id}-add", Operation.ADD_FUNDS, name,
                                   amount, 1))
    legs: list[str] = []
    for i in range(transfers):
        request_id = f"tx-{i:05d}"
        kind = rng.random() if shards > 1 else 1.0  # one shard: the draws of old, no other
        if kind < multi_leg_ratio:
            legs.extend(_multi_leg(rng, work, request_id, names, shard_map, failed_ratio))
            continue
        if kind < multi_leg_ratio + local_ratio:
            home = shard_map.request_shard(request_id)
            local = [n for n in names if shard_map.account_shard(n) == home]
            source, target = rng.sample(local if len(local) >= 2 else names, 2)
        else:
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


def _multi_leg(rng: random.Random, work: Workload, request_id: str, names: list[str],
               shard_map: ShardMap, failed_ratio: float) -> list[str]:
    """A request of 3-4 legs: one payer, its amount split between the payees; its messages."""
    count = rng.randint(3, 4)
    chosen = _spanning(rng, names, min(count, len(names)), shard_map.account_shard)
    payer, payees = chosen[0], chosen[1:]
    amount = _money(rng, 2, 300)
    split = (amount / len(payees)).quantize(Decimal("0.01"))
    planned = [(payer, -amount)] + [
        (payee, split if j < len(payees) - 1 else amount - split * (len(payees) - 1))
        for j, payee in enumerate(payees)]
    work.multi[request_id] = tuple(planned)
    failing = rng.randrange(len(planned)) if rng.random() < failed_ratio else -1
    if failing >= 0:
        work.doomed.add(request_id)
    return [_step(request_id, f"{request_id}-{j}",
                  Operation.WITHDRAW_FUNDS if signed < 0 else Operation.ADD_FUNDS, account,
                  abs(signed), len(planned),
                  StepStatus.FAILED if j == failing else StepStatus.SUCCEEDED)
            for j, (account, signed) in enumerate(planned)]


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
    statuses = Counter(outcome.status.value for outcome in by_request.values())
    known = set(work.deposits) | set(work.transfers) | set(work.multi)
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
    planned = work.legs()
    for request_id, outcome in by_request.items():
        if outcome.status == "rejected" and "insufficient funds" not in outcome.reason:
            problems.append(f"{request_id} rejected for an unexpected reason: {outcome.reason}")
        if (outcome.status == "committed" and request_id in planned
                and sorted(outcome.legs) != sorted(planned[request_id])):
            problems.append(f"{request_id} committed legs {list(outcome.legs)}, it sent "
                            f"{list(planned[request_id])}")
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


# --- the chaos run's workload: every outcome known in advance --------------------------------

@dataclass(frozen=True)
class PlannedRequest:
    """One request of the chaos workload and the outcome it must end with."""

    request_id: str
    legs: tuple[tuple[str, Decimal], ...]  # (accountId, signed amount), one per step
    failed: bool  # one step reports failure: aborted, nothing moves
    # Its outcome depends on the order requests commit in (an account funded too thinly for
    # every withdrawal from it): committed, or rejected for insufficient funds.
    may_reject: bool = False

    @property
    def expected_status(self) -> str:
        return "aborted" if self.failed else "committed"

    @property
    def allowed(self) -> frozenset[str]:
        """The outcomes the workload allows it."""
        if self.failed:
            return frozenset({"aborted"})
        return frozenset({"committed", "rejected"} if self.may_reject else {"committed"})


@dataclass
class ChaosWorkload:
    """Funding deposits (sent and committed first), then the requests under chaos.

    Withdrawals from each ordinary account never exceed what its deposit put there, whatever
    the order the requests commit in, so their outcomes and balances follow from the workload
    alone. The *tight* accounts (``tight-*``, optional) are funded for half of the
    withdrawals from them: which of those commit depends on the order, so those requests are
    ``may_reject`` and only conservation and consistency can be checked for them.
    """

    seed: int
    funding: dict[str, Decimal] = field(default_factory=dict)  # accountId -> deposit
    funding_messages: list[str] = field(default_factory=list)
    requests: dict[str, PlannedRequest] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)  # after the funding, in sending order
    malformed: list[str] = field(default_factory=list)
    duplicates: int = 0

    @property
    def all_requests(self) -> int:
        """Funding deposits plus the requests under chaos."""
        return len(self.funding) + len(self.requests)

    def expected_balances(self, committed: set[str] | None = None) -> dict[str, Decimal]:
        """Every account's final balance, from the workload (and, for the requests whose
        outcome depends on order, from ``committed``: the ids of those that committed)."""
        balances = dict(self.funding)
        for request in self.requests.values():
            if request.failed or (request.may_reject and request.request_id not in
                                  (committed or set())):
                continue
            for account, amount in request.legs:
                balances[account] = balances.get(account, Decimal("0.00")) + amount
        return balances

    def sent(self) -> dict[str, Sent]:
        """Every request as the independent checker (``simulator/checker.py``) takes it."""
        found = {f"fund-{a}": Sent(f"fund-{a}", ((a, amount),)) for a, amount in
                 self.funding.items()}
        found.update({r: Sent(r, p.legs, p.failed, p.may_reject)
                      for r, p in self.requests.items()})
        return found


def _malformed_body(rng: random.Random, index: int) -> str:
    base = {"requestId": f"bad-{index:04d}", "operationId": f"bad-{index:04d}-x",
            "operation": "add_funds", "accountId": "acct-000", "amount": "10.00",
            "expectedOperations": 1, "status": "succeeded"}
    kind = index % 6
    if kind == 0:
        base["amount"] = 10.5  # a float: money is never a float
    elif kind == 1:
        base["amount"] = "10.555"
    elif kind == 2:
        base["operation"] = "steal_funds"
    elif kind == 3:
        return f"not json {index}"
    elif kind == 4:
        base["expectedOperations"] = 99
    else:
        del base["accountId"]
    return json.dumps(base)


def _spanning(rng: random.Random, names: list[str], legs: int,
              shard_of: Callable[[str], int]) -> list[str]:
    """``legs`` distinct accounts whose shards include at least three different ones."""
    by_shard: dict[int, list[str]] = {}
    for name in names:
        by_shard.setdefault(shard_of(name), []).append(name)
    shards = sorted(by_shard)
    if len(shards) < 3:
        return rng.sample(names, legs)
    chosen = [rng.choice(by_shard[k]) for k in rng.sample(shards, 3)]
    chosen += rng.sample([n for n in names if n not in chosen], legs - 3)
    rng.shuffle(chosen)
    return chosen


def generate_chaos(seed: int, accounts: int = 50, requests: int = 2000,
                   multi_leg_ratio: float = 0.1, failed_ratio: float = 0.03,
                   duplicate_ratio: float = 0.1, malformed_ratio: float = 0.02,
                   window: int = 48, duplicate_spread: int = 400, shards: int = 1,
                   deposit_ratio: float = 0.0, tight_accounts: int = 0,
                   overdraft_ratio: float = 0.0) -> ChaosWorkload:
    """Mostly two-leg transfers, some 3-5-leg requests, faults mixed in, legs out of order.

    The legs of a request are shuffled within a window of ``window`` messages (they arrive out
    of order but close together, as steps of one request do); a duplicate arrives up to
    ``duplicate_spread`` messages after its original, often after its request was decided.

    With ``shards`` > 1, every request of 3-5 legs spans at least three shards. Optionally, a
    fraction ``deposit_ratio`` of the requests are one-step deposits, and ``overdraft_ratio``
    are withdrawals from ``tight_accounts`` accounts funded for half of what is withdrawn from
    them (two legs, or three legs across three shards): whatever the order, some of those
    must be refused, and which ones depends on the order.
    """
    rng = random.Random(seed)
    work = ChaosWorkload(seed)
    shard_map = ShardMap(shards)
    names = [f"acct-{i:03d}" for i in range(accounts)]
    room: dict[str, Decimal] = {}
    for name in names:
        amount = _money(rng, 5_000, 10_000)
        work.funding[name] = amount
        room[name] = amount
        work.funding_messages.append(_step(f"fund-{name}", f"fund-{name}-add",
                                           Operation.ADD_FUNDS, name, amount, 1))
    tight = _tight_names(tight_accounts, shard_map)
    extras = deposit_ratio > 0 or (overdraft_ratio > 0 and bool(tight))
    steps: list[str] = []
    for i in range(requests):
        request_id = f"rq-{i:05d}"
        kind = rng.random() if extras else 1.0
        may_reject = False
        if kind < deposit_ratio:
            legs = [(rng.choice(names), _money(rng, 1, 120))]
        elif kind < deposit_ratio + overdraft_ratio and tight:
            payer, amount = rng.choice(tight), _money(rng, 20, 80)
            payees: list[str] = []
            used = {shard_map.account_shard(payer)}
            for _ in range(1 if rng.random() < 0.5 else 2):  # 3 legs: three shards if K >= 3
                pool = [n for n in names if n not in payees]
                pool = [n for n in pool if shard_map.account_shard(n) not in used] or pool
                payees.append(rng.choice(pool))
                used.add(shard_map.account_shard(payees[-1]))
            split = (amount / len(payees)).quantize(Decimal("0.01"))
            legs = [(payer, -amount)] + [
                (payee, split if j < len(payees) - 1 else amount - split * (len(payees) - 1))
                for j, payee in enumerate(payees)]
            may_reject = True
        else:
            legs = _transfer_legs(rng, names, room, multi_leg_ratio,
                                  shard_map.account_shard if shards > 1 else None)
        failed = rng.random() < failed_ratio
        request = PlannedRequest(request_id, tuple(legs), failed, may_reject)
        work.requests[request_id] = request
        if not failed and not may_reject:
            for account, signed in legs:
                if signed < 0:
                    room[account] += signed
        failing_leg = rng.randrange(len(legs)) if failed else -1
        for index, (account, signed) in enumerate(legs):
            operation = Operation.WITHDRAW_FUNDS if signed < 0 else Operation.ADD_FUNDS
            steps.append(_step(request_id, f"{request_id}-{index}", operation, account,
                               abs(signed), len(legs),
                               StepStatus.FAILED if index == failing_leg
                               else StepStatus.SUCCEEDED))
    for name in tight:  # funded for half of what is withdrawn: at least one is refused
        withdrawn = sum((-m for r in work.requests.values() if not r.failed
                         for a, m in r.legs if a == name), Decimal("0.00"))
        amount = max(Decimal("1.00"), (withdrawn / 2).quantize(Decimal("0.01")))
        work.funding[name] = amount
        work.funding_messages.append(_step(f"fund-{name}", f"fund-{name}-add",
                                           Operation.ADD_FUNDS, name, amount, 1))
    ordered: list[str] = []
    for start in range(0, len(steps), window):
        block = steps[start:start + window]
        rng.shuffle(block)  # out of order within a window
        ordered.extend(block)
    for original in [s for s in ordered if rng.random() < duplicate_ratio]:
        position = ordered.index(original) + rng.randint(1, duplicate_spread)
        ordered.insert(min(position, len(ordered)), original)
        work.duplicates += 1
    count = int(len(ordered) * malformed_ratio)
    for index in range(count):
        body = _malformed_body(rng, index)
        work.malformed.append(body)
        ordered.insert(rng.randrange(len(ordered) + 1), body)
    work.messages = ordered
    return work


def _tight_names(count: int, shard_map: ShardMap) -> list[str]:
    """``count`` tight account names, spread over the shards (one per shard in turn)."""
    found: list[str] = []
    for i in itertools.count():
        if len(found) == count:
            return found
        name = f"tight-{i:02d}"
        if shard_map.account_shard(name) == len(found) % shard_map.shards:
            found.append(name)
    return found


def _transfer_legs(rng: random.Random, names: list[str], room: dict[str, Decimal],
                   multi_leg_ratio: float,
                   shard_of: Callable[[str], int] | None) -> list[tuple[str, Decimal]]:
    """A funded transfer: 2 legs, or 3-5 (spanning three shards when ``shard_of`` is given)."""
    legs_wanted = rng.randint(3, 5) if rng.random() < multi_leg_ratio else 2
    chosen = (_spanning(rng, names, legs_wanted, shard_of) if shard_of and legs_wanted > 2
              else rng.sample(names, legs_wanted))
    payers = chosen[:1] if legs_wanted < 4 else chosen[:2]
    payees = chosen[len(payers):]
    amount = _money(rng, 1, 120)
    payers = [p for p in payers if room[p] >= amount] or [max(names, key=room.__getitem__)]
    if payers[0] in payees:
        payees = [p for p in names if p not in payers][:max(1, len(payees))]
    legs: list[tuple[str, Decimal]] = []
    share = (amount / len(payers)).quantize(Decimal("0.01"))
    paid = Decimal("0.00")
    for index, payer in enumerate(payers):
        part = share if index < len(payers) - 1 else amount - share * (len(payers) - 1)
        legs.append((payer, -part))
        paid += part
    split = (paid / len(payees)).quantize(Decimal("0.01"))
    for index, payee in enumerate(payees):
        part = split if index < len(payees) - 1 else paid - split * (len(payees) - 1)
        legs.append((payee, part))
    return legs


@dataclass
class ChaosCheck:
    """What the independent check of a chaos run found; ``problems`` empty means all held."""

    outcomes: Counter[str]
    drift: Decimal  # sum over accounts of |balance - expected|
    problems: list[str]


def check_chaos(work: ChaosWorkload, decided: list[DecidedOutcome],
                balances: dict[str, Decimal], parked: list[tuple[str, bytes, str]],
                poisoned: list[str], completion_rows: int) -> ChaosCheck:
    """Compare the end state with what the workload alone says it must be.

    ``parked`` holds (kind, body, reason) of every parked message; ``poisoned`` the decoded
    text of every message in the poison queue.
    """
    problems: list[str] = []
    seen: Counter[str] = Counter(d.outcome.request_id for d in decided)
    twice = sorted(r for r, n in seen.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} request(s) decided more than once, e.g. {twice[:3]}")
    by_request = {d.outcome.request_id: d.outcome for d in decided}
    expected = {f"fund-{a}": frozenset({"committed"}) for a in work.funding}
    expected.update({r: p.allowed for r, p in work.requests.items()})
    missing = sorted(set(expected) - set(by_request))
    if missing:
        problems.append(f"{len(missing)} request(s) have no outcome, e.g. {missing[:3]}")
    unknown = sorted(set(by_request) - set(expected))
    if unknown:
        problems.append(f"outcomes for requests never sent: {unknown[:3]}")
    wrong = [f"{r} is {by_request[r].status}, must be {' or '.join(sorted(want))}"
             for r, want in expected.items()
             if r in by_request and by_request[r].status not in want]
    if wrong:
        problems.append(f"{len(wrong)} request(s) with the wrong outcome, e.g. {wrong[:3]}")
    refused = [f"{r}: {o.reason}" for r, o in by_request.items()
               if o.status == "rejected" and not o.reason.startswith("insufficient funds")]
    if refused:
        problems.append(f"{len(refused)} request(s) rejected for another reason than funds, "
                        f"e.g. {refused[:2]}")
    for request_id, planned in work.requests.items():
        outcome = by_request.get(request_id)
        if outcome is None or outcome.status != "committed":
            continue
        if sorted(outcome.legs) != sorted(planned.legs):
            problems.append(f"{request_id} applied legs {outcome.legs}, sent {planned.legs}")
    want = work.expected_balances({r for r, o in by_request.items() if o.status == "committed"})
    drift = Decimal("0.00")
    for account in sorted(set(want) | set(balances)):
        have = balances.get(account, Decimal("0.00"))
        should = want.get(account, Decimal("0.00"))
        drift += abs(have - should)
        if have != should:
            problems.append(f"{account}: balance {have}, the workload says {should}")
    malformed = sorted(body for kind, body, _ in
                       ((k, b.decode("utf-8", "replace"), r) for k, b, r in parked)
                       if kind == "malformed")
    if malformed != sorted(work.malformed):
        problems.append(f"{len(malformed)} malformed message(s) parked, "
                        f"{len(work.malformed)} were sent (or their bodies differ)")
    unexplained = [body for kind, body, reason in parked if not reason.strip()]
    if unexplained:
        problems.append(f"{len(unexplained)} parked message(s) without a reason")
    others = [kind for kind, _, _ in parked if kind != "malformed"]
    if others:
        problems.append(f"{len(others)} parked message(s) of kind {sorted(set(others))}: this "
                        "workload has no contradicting steps")
    valid = [text for text in poisoned if text not in work.malformed]
    if valid:
        problems.append(f"{len(valid)} valid message(s) in the poison queue, e.g. {valid[:1]}")
    if completion_rows:
        problems.append(f"{completion_rows} completion row(s) left behind")
    statuses = Counter(outcome.status.value for outcome in by_request.values())
    return ChaosCheck(statuses, drift, problems)
