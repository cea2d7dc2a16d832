"""One benchmark cell: a strategy, a workload, N instances and a latency, on fresh storage names.

Deliveries come from an in-process queue (the Functions host's queue listener, minus the queue
calls, which every strategy pays alike and which are not counted). All requests are put on it at
the start (a backlog, to measure the peak rate), or paced at a fixed rate (``rate``, to measure
the commit latency below the peak). Each instance is a thread that takes one delivery at a time;
instances stop taking deliveries after ``seconds``; then, for the leader, elections (what the
sweeper would run) settle what the last deliveries announced, while the ready index holds any.
A request's *commit latency* runs from when its last step was put on the queue to when the
transaction that committed it returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from azure.core.exceptions import AzureError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from bench.probe import KINDS, StorageProbe
from bench.strategies import (
    LeaderInstance,
    NaiveInstance,
    SingleInstance,
    UnsupportedWorkload,
)
from bench.workloads import SEED_BALANCE, SPREAD_ACCOUNTS, Request, account_name, generate
from shared.config.settings import load_config
from shared.domain.money import format_money
from shared.domain.planning import LEDGER_PARTITION, account_key
from shared.election.elector import ElectionCallbacks
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from shared.storage.clients import (
    TransportFactory,
    clients_from_connection_string,
    ensure_queues,
)
from shared.storage.completions import CompletionStore
from shared.storage.ports import Table

logger = logging.getLogger(__name__)


@dataclass
class Names:
    """Storage names of one cell (fresh per cell, so cells never see each other's rows)."""

    prefix: str = field(default_factory=lambda: "b" + uuid.uuid4().hex[:10])

    def env(self, **overrides: str) -> dict[str, str]:
        names = {"COMPLETIONS_TABLE_NAME": f"{self.prefix}completions",
                 "LEDGER_TABLE_NAME": f"{self.prefix}ledger",
                 "PARKED_TABLE_NAME": f"{self.prefix}parked",
                 "LEASE_CONTAINER_NAME": f"{self.prefix}-leases",
                 "COMPLETIONS_QUEUE_NAME": f"{self.prefix}-q",
                 "WAKEUP_QUEUE_NAME": f"{self.prefix}-wake"}
        names.update(overrides)
        return names

    @property
    def naive_table(self) -> str:
        return f"{self.prefix}naive"

    @property
    def lock_container(self) -> str:
        return f"{self.prefix}-lock"

    def probe(self, latency_ms: float = 0.0) -> StorageProbe:
        env = self.env()
        return StorageProbe(env["COMPLETIONS_TABLE_NAME"],
                            (env["LEDGER_TABLE_NAME"], self.naive_table),
                            (env["LEASE_CONTAINER_NAME"], self.lock_container), latency_ms,
                            env["WAKEUP_QUEUE_NAME"])


def leader_app(connection_string: str, names: Names, probe: StorageProbe, instance_id: str,
               callbacks: ElectionCallbacks | None = None,
               overrides: dict[str, str] | None = None,
               transport_factory: TransportFactory | None = None) -> LedgerApp:
    """One instance of this app on ``names``, its requests going through ``probe`` (and
    ``transport_factory``'s transport, the fault layer's, when given)."""
    config = load_config(names.env(**(overrides or {})), instance_id=instance_id)
    clients = clients_from_connection_string(connection_string, config.storage_timeout_seconds,
                                             probe, transport_factory)
    # The app's extra queue clients (the lease alarms') leave the request hook out; the probe
    # must see them too: their latency is the leader's, and they are calls it pays for.
    clients = dataclasses.replace(clients, queue_options={**clients.queue_options,
                                                          "raw_request_hook": probe})
    app = LedgerApp.create(config, clients, callbacks)
    app.shard_map  # noqa: B018  # the map is read once per process, before any cell's window
    return app


def drop(connection_string: str, names: Names) -> None:
    """Delete a finished cell's tables, containers and queues (keeps Azurite's memory small)."""
    env = names.env()
    tables = TableServiceClient.from_connection_string(connection_string)
    for key in ("COMPLETIONS_TABLE_NAME", "LEDGER_TABLE_NAME", "PARKED_TABLE_NAME"):
        with contextlib.suppress(AzureError):
            tables.delete_table(env[key])
    blobs = BlobServiceClient.from_connection_string(connection_string)
    for container in (env["LEASE_CONTAINER_NAME"], names.lock_container):
        with contextlib.suppress(AzureError):
            blobs.delete_container(container)
    queues = QueueServiceClient.from_connection_string(connection_string)
    for queue_name in (env["WAKEUP_QUEUE_NAME"], env["COMPLETIONS_QUEUE_NAME"]):
        with contextlib.suppress(AzureError):
            queues.delete_queue(queue_name)


def prepare(app: LedgerApp) -> None:
    """Create what a deployment has before the first delivery: tables, lease blob, and the
    wake-up queue that leaders arm their lease alarms on (nothing in the benchmark reads it)."""
    app.ensure_resources(queues=False)
    ensure_queues(app.clients, [app.config.wakeup_queue])


def seed_accounts(table: Table, accounts: list[str], balance: str) -> None:
    """Give each account a balance row in the ledger partition (before any leader ran)."""
    for start in range(0, len(accounts), 99):
        table.submit([
            ("create", {"PartitionKey": LEDGER_PARTITION, "RowKey": account_key(account),
                        "balance": balance, "epoch": 0, "updatedAt": ""})
            for account in accounts[start:start + 99]])


@dataclass
class CellResult:
    """The figures of one cell."""

    strategy: str
    workload: str
    instances: int
    latency_ms: float
    offered_rate: float | None  # requests/s put on the queue; None: all at once
    sent: int = 0
    committed: int = 0
    elapsed_s: float = 0.0
    rate: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    calls: dict[str, int] = field(default_factory=dict)
    calls_per_request: dict[str, float] = field(default_factory=dict)
    lease_rps: float = 0.0
    deliveries: int = 0  # messages handled (each one a queue-trigger invocation)
    lease_per_delivery: float = 0.0
    errors: int = 0
    skipped: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile of ``values`` (interpolated), ``None`` when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_cell(connection_string: str, strategy: str, workload: str, instances: int,
             latency_ms: float, requests: int, seconds: float,
             rate: float | None = None, names: Names | None = None) -> CellResult:
    """Measure one cell; see the module docstring.

    ``names``: storage names to run on (fresh ones by default); the backlog benchmark passes
    names whose completions table already holds requests waiting for their steps.
    """
    result = CellResult(strategy, workload, instances, latency_ms, rate)
    if strategy != "leader" and workload == "transfers":
        result.skipped = "cannot apply two legs atomically one message at a time"
        return result
    names = names or Names()
    probe = names.probe()
    committed_at: dict[str, float] = {}
    sink_lock = threading.Lock()

    def on_commit(request_ids: list[str], when: float) -> None:
        with sink_lock:
            for request_id in request_ids:
                committed_at.setdefault(request_id, when)

    handlers, finish = _build(connection_string, names, probe, strategy, workload, instances,
                              on_commit)
    work = generate(workload, requests, prefix=f"{strategy[0]}{workload[0]}")
    deliveries: queue.Queue[tuple[str, bytes]] = queue.Queue()
    enqueued_at: dict[str, float] = {}
    producing = threading.Event()
    producing.set()
    probe.reset()
    probe.latency_ms = latency_ms
    started = time.monotonic()
    stop_at = started + seconds

    def produce(batch: list[Request]) -> None:
        for n, request in enumerate(batch):
            if rate is not None:
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if time.monotonic() >= stop_at:
                    break
            for body in request.bodies:
                deliveries.put((request.request_id, body))
            enqueued_at[request.request_id] = time.monotonic() if rate is not None else started
        producing.clear()

    errors: list[BaseException] = []
    handled = [0] * len(handlers)

    def consume(index: int, handle: Callable[[bytes], None]) -> None:
        while time.monotonic() < stop_at:
            try:
                _, body = deliveries.get(timeout=0.02)
            except queue.Empty:
                if not producing.is_set():
                    return
                continue
            try:
                handle(body)
                handled[index] += 1
            except Exception as exc:  # the host would redeliver: count it and put it back
                errors.append(exc)
                logger.warning("delivery failed: %r", exc)
                deliveries.put(("", body))

    producer = threading.Thread(target=produce, args=(work,), daemon=True)
    producer.start()
    threads = [threading.Thread(target=consume, args=(i, h), daemon=True)
               for i, h in enumerate(handlers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    producer.join(timeout=5)
    finish()
    calls = probe.reset()
    probe.latency_ms = 0
    done = [(request_id, when) for request_id, when in committed_at.items()
            if request_id in enqueued_at]
    result.sent = len(enqueued_at)
    result.committed = len(done)
    result.errors = len(errors)
    result.deliveries = sum(handled)
    if result.deliveries:
        result.lease_per_delivery = calls.get("lease", 0) / result.deliveries
    if done:
        last = max(when for _, when in done)
        result.elapsed_s = last - started
        result.rate = len(done) / result.elapsed_s if result.elapsed_s > 0 else 0.0
        latencies = sorted((when - enqueued_at[request_id]) * 1000 for request_id, when in done)
        result.p50_ms = percentile(latencies, 50)
        result.p99_ms = percentile(latencies, 99)
    result.calls = {kind: calls.get(kind, 0) for kind in KINDS if calls.get(kind, 0)}
    if result.committed:
        result.calls_per_request = {kind: count / result.committed
                                    for kind, count in result.calls.items()}
        result.calls_per_request["total"] = sum(result.calls.values()) / result.committed
    window = max(result.elapsed_s, time.monotonic() - started if not done else 0.0)
    if window > 0:
        result.lease_rps = result.calls.get("lease", 0) / window
    return result


def _build(connection_string: str, names: Names, probe: StorageProbe, strategy: str,
           workload: str, instances: int,
           on_commit: Callable[[list[str], float], None]) -> tuple[
               list[Callable[[bytes], None]], Callable[[], None]]:
    """The instances' delivery handlers and what to run after the last delivery."""
    if strategy == "leader":
        apps = [leader_app(connection_string, names, probe, f"bench-{i}")
                for i in range(instances)]
        prepare(apps[0])
        if workload == "transfers":
            seed_accounts(apps[0].ledger.table,
                          [account_name(i) for i in range(SPREAD_ACCOUNTS)],
                          format_money(SEED_BALANCE))
        leaders = [LeaderInstance(app, on_commit) for app in apps]
        unprobed = CompletionStore(clients_from_connection_string(connection_string).open_table(
            names.env()["COMPLETIONS_TABLE_NAME"]))

        def announced() -> int:  # markers in the ready index (never the waiting step rows)
            return len(unprobed.ready(fallback_now=apps[0].clock.now()).markers)

        def sweep() -> None:  # what the sweeper's election would do after the last delivery
            deadline = time.monotonic() + 300
            left = announced()
            while left and time.monotonic() < deadline:
                run_election(apps[0])
                before, left = left, announced()
                if left >= before:  # what is left cannot be settled now
                    break

        return [leader.handle for leader in leaders], sweep
    if strategy in ("naive", "single"):
        if workload == "transfers":
            raise UnsupportedWorkload(strategy)
        service = TableServiceClient.from_connection_string(connection_string)
        service.create_table_if_not_exists(names.naive_table)
        handlers: list[Callable[[bytes], None]] = []
        lock_blob = None
        for _ in range(instances):
            clients = clients_from_connection_string(connection_string, 5, probe)
            table = clients.table.get_table_client(names.naive_table)
            if strategy == "naive":
                handlers.append(NaiveInstance(table, on_commit).handle)
                continue
            container = clients.blob.get_container_client(names.lock_container)
            if lock_blob is None:
                container.create_container()
                container.get_blob_client("lock").upload_blob(b"")
                lock_blob = True
            handlers.append(SingleInstance(table, container.get_blob_client("lock"),
                                           on_commit).handle)
        return handlers, lambda: None
    raise ValueError(f"unknown strategy {strategy!r}")
