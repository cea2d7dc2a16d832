"""Test helpers: message builders, app factories on a shared Azurite, waiting on conditions."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from azure.storage.blob import BlobClient

from shared.config.settings import load_config
from shared.domain.clock import ComposedClock
from shared.domain.contract import Operation, StepStatus, message_body, parse_completion
from shared.domain.model import DecidedOutcome
from shared.election.elector import ElectionCallbacks
from shared.leadership.elections import ElectionResult, handle_wakeup, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import (
    CompletionResult,
    announce_if_ready,
    handle_completion,
    record_completion,
)
from shared.leadership.sweeper import repair_scan
from shared.leadership.view import ReadyRound, ReadyView
from shared.storage.clients import RequestHook, clients_from_connection_string


def step(request_id: str, operation_id: str, operation: str, account_id: str, amount: str,
         expected: int, status: str = StepStatus.SUCCEEDED, **extra: Any) -> bytes:
    """One completion message body (v1 contract), built by the contract's own builder.

    Not validated, so a test can build a malformed one (``amount="1.005"``); ``extra`` adds or
    replaces fields by their wire name (``completedAt=...``, ``expectedOperations="2"``) as written.
    """
    body = message_body(request_id=request_id, operation_id=operation_id, operation=operation,
                        account_id=account_id, amount=amount, expected_operations=expected,
                        status=status)
    return json.dumps({**body, **extra}).encode()


def deposit(request_id: str, account_id: str, amount: str) -> list[bytes]:
    """A one-step request that adds funds."""
    return [step(request_id, f"{request_id}-add", Operation.ADD_FUNDS, account_id, amount, 1)]


def transfer(request_id: str, source: str, target: str, amount: str,
             fail: str | None = None) -> list[bytes]:
    """A two-step request: withdraw from ``source``, add to ``target``."""
    return [
        step(request_id, f"{request_id}-w", Operation.WITHDRAW_FUNDS, source, amount, 2,
             StepStatus.FAILED if fail == "withdraw" else StepStatus.SUCCEEDED),
        step(request_id, f"{request_id}-a", Operation.ADD_FUNDS, target, amount, 2,
             StepStatus.FAILED if fail == "add" else StepStatus.SUCCEEDED),
    ]


class ManualClock:
    """Time the test moves by hand: a wall clock, and a shift of storage's time for expiry."""

    def __init__(self) -> None:
        self.start = datetime(2026, 1, 1, tzinfo=UTC)
        self.now = self.start

    def __call__(self) -> datetime:
        return self.now

    def shift(self) -> timedelta:
        """How far the test has moved time (``LedgerApp.time_shift``)."""
        return self.now - self.start

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Namespace:
    """Unique storage names for one test, so tests share one Azurite without seeing each other."""

    connection_string: str
    prefix: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    counter: int = 0

    def env(self, **overrides: str) -> dict[str, str]:
        names = {
            "COMPLETIONS_QUEUE_NAME": f"{self.prefix}-completions",
            "WAKEUP_QUEUE_NAME": f"{self.prefix}-wakeups",
            "OUTCOMES_QUEUE_NAME": f"{self.prefix}-outcomes",
            "COMPLETIONS_TABLE_NAME": f"{self.prefix}completions",
            "LEDGER_TABLE_NAME": f"{self.prefix}ledger",
            "PARKED_TABLE_NAME": f"{self.prefix}parked",
            "LEASE_CONTAINER_NAME": f"{self.prefix}-leases",
            "AzureWebJobsStorage": self.connection_string,
        }
        names.update(overrides)
        return names

    def app(self, instance_id: str | None = None, callbacks: ElectionCallbacks | None = None,
            wallclock: Callable[[], datetime] | None = None,
            time_shift: Callable[[], timedelta] | None = None,
            request_hook: RequestHook | None = None, **overrides: str) -> LedgerApp:
        """A ``LedgerApp`` (one simulated instance) on this namespace, resources created."""
        self.counter += 1
        config = load_config(self.env(**overrides),
                             instance_id=instance_id or f"instance-{self.counter}")
        clients = clients_from_connection_string(self.connection_string,
                                                 config.storage_timeout_seconds, request_hook)
        kwargs: dict[str, Any] = {"callbacks": callbacks}
        if wallclock is not None:
            kwargs["clock"] = ComposedClock(now=wallclock)
        app = LedgerApp.create(config, clients, **kwargs)
        if time_shift is not None:
            app.time_shift = time_shift
        app.ensure_resources()
        return app


def lease_blob(app: LedgerApp) -> BlobClient:
    """The election's lease blob, for a test that plays another holder or an operator."""
    return app.clients.blob.get_blob_client(app.config.lease_container, app.config.lease_blob)


def send(app: LedgerApp, *bodies: bytes) -> list[CompletionResult]:
    """Deliver message bodies to one instance, one invocation each, in order."""
    return [handle_completion(app, body, message_id=uuid.uuid4().hex) for body in bodies]


def record(app: LedgerApp, *bodies: bytes) -> None:
    """Record completions as an instance would (rows, and markers of decidable requests),
    without running any election."""
    for body in bodies:
        completion = parse_completion(body)
        home = app.home_of(completion)
        announce_if_ready(home, completion, record_completion(home, completion))


def sweep_now(app: LedgerApp) -> ElectionResult:
    """What the sweeper does when its full scan is due (forced: tests do not wait a minute)."""
    repair_scan(app, force=True)
    return run_election(app)


def ready(app: LedgerApp) -> ReadyRound:
    """What the leader's next read of the ready index finds."""
    return ReadyView(app).read()


def balance(app: LedgerApp, account_id: str) -> Decimal:
    """The committed balance (0 for an account with no row), read on the account's shard."""
    return app.account_shard(account_id).ledger.read_account(account_id).balance


def status(app: LedgerApp, request_id: str) -> str | None:
    """The request's recorded outcome status, or None."""
    decided = app.ledger.read_outcome(request_id)
    return None if decided is None else decided.outcome.status


def decided(app: LedgerApp, request_id: str) -> DecidedOutcome:
    """The request's outcome; fails the test when it has none."""
    found = app.ledger.read_outcome(request_id)
    assert found is not None, f"request {request_id} has no outcome"
    return found


def reason(app: LedgerApp, request_id: str) -> str:
    """The reason stored with the request's outcome."""
    return decided(app, request_id).outcome.reason


def fence_epoch(app: LedgerApp) -> int:
    """The current epoch (0 before the first leader)."""
    fence = app.ledger.read_fence()
    return 0 if fence is None else fence.epoch


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def take_alarms(app: LedgerApp, stop: threading.Event) -> None:
    """The host's listener on the wake-up queue: each alarm that comes due wakes ``app``."""
    queue = app.queue(app.config.wakeup_queue)  # decodes as the host does
    while not stop.is_set():
        for message in queue.receive(max_messages=1, visibility_timeout=30):
            handle_wakeup(app, message.text.encode())
            queue.delete(message.handle)
        stop.wait(0.1)
