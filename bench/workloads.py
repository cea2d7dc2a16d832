"""The benchmark's workloads: completion messages (contract v1) for one cell.

- ``hot``: single-step deposits, all on one account;
- ``spread``: single-step deposits over 1,000 accounts;
- ``transfers``: two-leg transfers (withdraw + add, ``expectedOperations: 2``) between 1,000
  funded accounts, the two legs delivered next to each other in random order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from decimal import Decimal

WORKLOADS = ("hot", "spread", "transfers")
SPREAD_ACCOUNTS = 1_000
SEED_BALANCE = Decimal("1000000.00")  # what each transfer account starts with


@dataclass(frozen=True)
class Request:
    """One request's messages, in delivery order."""

    request_id: str
    bodies: tuple[bytes, ...]


def _step(request_id: str, operation_id: str, operation: str, account: str, amount: str,
          expected: int) -> bytes:
    return json.dumps({"requestId": request_id, "operationId": operation_id,
                       "operation": operation, "accountId": account, "amount": amount,
                       "expectedOperations": expected, "status": "succeeded"}).encode()


def step_body(request_id: str, operation_id: str, operation: str, account: str, amount: str,
              expected: int) -> bytes:
    """One step's message (``operation``: ``add_funds`` or ``withdraw_funds``)."""
    return _step(request_id, operation_id, operation, account, amount, expected)


def deposit_body(request_id: str, account: str, amount: str) -> bytes:
    """The one message of a single-step deposit."""
    return _step(request_id, f"{request_id}-add", "add_funds", account, amount, 1)


def first_leg_body(request_id: str, account: str, amount: str) -> bytes:
    """The withdraw leg of a two-leg transfer (``expectedOperations: 2``) sent alone: recorded,
    it waits for a second leg (the backlog benchmark's waiting requests never get one)."""
    return _step(request_id, f"{request_id}-w", "withdraw_funds", account, amount, 2)


def account_name(index: int) -> str:
    """The id of spread/transfer account number ``index``."""
    return f"acct-{index:04d}"


def generate(workload: str, requests: int, seed: int = 7, prefix: str = "r") -> list[Request]:
    """``requests`` requests of ``workload``."""
    rng = random.Random(seed)
    made: list[Request] = []
    for n in range(requests):
        request_id = f"{prefix}{n:06d}"
        amount = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
        if workload == "hot":
            made.append(Request(request_id, (
                _step(request_id, f"{request_id}-add", "add_funds", "hot", amount, 1),)))
        elif workload == "spread":
            account = account_name(rng.randrange(SPREAD_ACCOUNTS))
            made.append(Request(request_id, (
                _step(request_id, f"{request_id}-add", "add_funds", account, amount, 1),)))
        elif workload == "transfers":
            source, target = rng.sample(range(SPREAD_ACCOUNTS), 2)
            legs = [_step(request_id, f"{request_id}-w", "withdraw_funds", account_name(source),
                          amount, 2),
                    _step(request_id, f"{request_id}-a", "add_funds", account_name(target),
                          amount, 2)]
            rng.shuffle(legs)
            made.append(Request(request_id, tuple(legs)))
        else:
            raise ValueError(f"unknown workload {workload!r}; choose one of {WORKLOADS}")
    return made


def steps_of(requests: list[Request]) -> int:
    """How many messages ``requests`` make."""
    return sum(len(r.bodies) for r in requests)
