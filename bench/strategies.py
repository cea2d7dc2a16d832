"""The three ways of applying completions that the benchmark compares, one instance each.

An *instance* is one object with its own storage clients (its own connection pool), driven by
one thread that handles one delivery at a time: a Functions instance with a concurrency of one.
Several instances run as threads of the benchmark process on one Azurite.

- ``LeaderInstance``: this app. Each delivery is ``shared.leadership.pipeline.handle_completion``
(record,
  one lease attempt, drain when elected), the real code of ``shared/``.
- ``NaiveInstance``: per-message optimistic concurrency. Each delivery reads its account row and
  writes the new balance with ``If-Match`` its ETag, in one entity-group transaction with an
  idempotency row ``request:{id}`` (a redelivery fails on that row and changes nothing); on 412
  it reads again and retries. Rows are keyed by account (PK = account id), so spread accounts
  never contend.
- ``SingleInstance``: one consumer at a time. Each delivery takes a lock (a blob lease, polled
  every ``LOCK_POLL_SECONDS`` while refused), then applies the message as the naive strategy
  does and releases the lock.

Why only the leader can run two-leg transfers atomically: the legs of a transfer arrive as two
messages, at different instances, at different times, and touch two accounts. The naive and the
single consumer apply each message on its own: applying one leg before the other leg (or its
failure) is known breaks all-or-nothing, and the two accounts' rows are in two partitions, where
no entity-group transaction reaches. Making them atomic needs a place where the legs wait until
all are in and one writer that applies them together: that is the completions table plus the
leader.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.data.tables import TableClient, TableTransactionError, UpdateMode
from azure.storage.blob import BlobClient, BlobLeaseClient

from shared.domain.contract import Operation, parse_completion
from shared.domain.money import format_money, parse_balance
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from shared.storage.transactions import submit_transaction

STRATEGIES = ("leader", "naive", "single")
LOCK_POLL_SECONDS = 0.05  # how often a single-consumer instance retries a refused lock
MAX_OPTIMISTIC_ATTEMPTS = 10_000

CommitSink = Callable[[list[str], float], None]  # request ids committed, monotonic time


class UnsupportedWorkload(ValueError):
    """The strategy cannot run this workload correctly (the message says why)."""


class LeaderInstance:
    """One instance of this app."""

    def __init__(self, app: LedgerApp, on_commit: CommitSink) -> None:
        self.app = app
        commit = app.ledger.commit

        def timed_commit(*args: Any, **kwargs: Any) -> Any:
            result = commit(*args, **kwargs)
            outcomes = args[1] if len(args) > 1 else kwargs["outcomes"]
            on_commit([o.request_id for o in outcomes if o.status == "committed"],
                      time.monotonic())
            return result

        app.ledger.commit = timed_commit  # type: ignore[method-assign]

    def handle(self, body: bytes) -> None:
        """One delivery, as the queue trigger runs it."""
        handle_completion(self.app, body, message_id=uuid.uuid4().hex)


def _delta(body: bytes) -> tuple[str, str, Decimal]:
    completion = parse_completion(body)
    if completion.expected_operations != 1:
        raise UnsupportedWorkload(
            "a multi-step request cannot be applied atomically one message at a time (see "
            "bench/strategies.py)")
    amount = completion.amount if completion.operation is Operation.ADD_FUNDS \
        else -completion.amount
    return completion.request_id, completion.account_id, amount


def apply_optimistically(table: TableClient, body: bytes) -> tuple[str, bool, int]:
    """Apply one single-step message with If-Match and an idempotency row; retry on 412.

    Returns (request id, whether this call applied it, attempts).
    """
    request_id, account, amount = _delta(body)
    for attempt in range(1, MAX_OPTIMISTIC_ATTEMPTS + 1):
        try:
            row = table.get_entity(account, "balance")
            balance, etag = parse_balance(row["balance"]), row.metadata["etag"]
        except ResourceNotFoundError:
            balance, etag = Decimal("0.00"), None
        new_balance = balance + amount
        if new_balance < 0:
            raise UnsupportedWorkload("the benchmark's naive workloads never overdraw")
        stamp = datetime.now(UTC).isoformat()
        entity = {"PartitionKey": account, "RowKey": "balance",
                  "balance": format_money(new_balance), "updatedAt": stamp}
        operations: list[Any] = [("create", {"PartitionKey": account,
                                             "RowKey": f"request:{request_id}",
                                             "committedAt": stamp})]
        if etag is None:
            operations.append(("create", entity))
        else:
            operations.append(("update", entity, {
                "mode": UpdateMode.REPLACE, "etag": etag,
                "match_condition": MatchConditions.IfNotModified}))
        try:
            submit_transaction(table, operations)  # the leader's fast path, for fairness
            return request_id, True, attempt
        except TableTransactionError as exc:
            if exc.index == 0:  # the idempotency row exists: a redelivery, already applied
                return request_id, False, attempt
            continue  # 412 (or 409 on a first create): someone wrote the account; read again
    raise RuntimeError(f"{request_id}: {MAX_OPTIMISTIC_ATTEMPTS} optimistic attempts failed")


class NaiveInstance:
    """Per-message ETag: read the account, write If-Match, retry on 412."""

    def __init__(self, table: TableClient, on_commit: CommitSink) -> None:
        self.table = table
        self.on_commit = on_commit

    def handle(self, body: bytes) -> None:
        request_id, applied, _ = apply_optimistically(self.table, body)
        if applied:
            self.on_commit([request_id], time.monotonic())


class SingleInstance:
    """One consumer at a time: a blob-lease lock around the naive apply."""

    def __init__(self, table: TableClient, lock_blob: BlobClient, on_commit: CommitSink) -> None:
        self.table = table
        self.lock_blob = lock_blob
        self.on_commit = on_commit

    def handle(self, body: bytes) -> None:
        lock = BlobLeaseClient(self.lock_blob, lease_id=str(uuid.uuid4()))
        while True:
            try:
                lock.acquire(lease_duration=15)
                break
            except HttpResponseError as exc:
                if exc.status_code != 409:
                    raise
                time.sleep(LOCK_POLL_SECONDS * (0.5 + random.random()))
        try:
            request_id, applied, _ = apply_optimistically(self.table, body)
        finally:
            lock.release()
        if applied:
            self.on_commit([request_id], time.monotonic())
