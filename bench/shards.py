"""The sharding benchmark (issue 16, section 8): committed requests/s against shards, cross-shard
transfers against same-shard ones, and the hot account against the intake floor.

Every cell runs on fresh storage names with ``LEDGER_SHARDS`` = K, ``latency_ms`` (8) injected
before each storage call (``bench.probe``) and Azure's per-partition limit emulated in front of
Azurite (``bench.limiter``: 2,000 entities/s per table partition, shared by every process). The
messages are offered at once (a backlog) by the multi-process load generator (``bench.loadgen``:
``instances`` instances in ``processes`` processes, each delivery the real
``handle_completion``). Once every message was delivered, what is left (a coordination waiting
for a shard's answer, a request announced by the last deliveries) is settled by elections on
every shard, as the sweeper and the wake-up timers would; that tail is part of the time.

**Committed** means it reads final: a request counts once its outcome row in its home shard's
ledger partition says ``committed`` and is settled (a cross-shard outcome carries
``settled: false`` until every shard applied its legs). The rate is those requests over the time
from the generator's start to the last of them, read from storage at the end: each outcome row's
``Timestamp`` is when it was last written (its settling, for a cross-shard one), on the clock of
Azurite, which runs on this machine.

Cells:

- ``deposits``: single-step deposits to random accounts among 1,000 (a deposit is homed on its
  account's shard: it never crosses shards).
- ``transfers``: two-leg transfers between random accounts among 1,000 funded ones, the legs
  next to each other in random order, so that two instances usually take them; a transfer is
  homed on its requestId's shard and crosses shards unless both accounts and the home are on one
  shard (a share of 1 - 1/K^2 of random transfers). The share that crossed is read from the
  outcomes (``shards``).
- ``same`` and ``cross`` (at one K): only transfers whose accounts and home share a shard (the
  requestId chosen so), or only transfers between accounts on two different shards (the
  requestId as it comes): the same generator, side by side; cross / same is the price of the
  protocol (coordinate, vote, decide, apply, settle: more transactions and messages per request).
- ``hot`` and ``intake``: deposits on one account; ``hot`` delivers them (``handle_completion``),
  ``intake`` records and announces them only (no election, nothing committed): the most the same
  generator can deliver. hot / intake is the share of the intake the leader turns into commits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from azure.core.exceptions import AzureError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from bench.cells import Names, leader_app, prepare
from bench.limiter import AZURE_PARTITION_RATE, PartitionLimiter
from bench.loadgen import CpuMeter, LoadSpec, build_instance, run_load, table_port
from bench.workloads import account_name, deposit_body, step_body
from shared.config.names import completions_table_name, ledger_partition
from shared.domain.money import format_money
from shared.domain.planning import REQUEST_PREFIX, account_key
from shared.domain.sharding import ShardMap
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from shared.storage.completions import READY_PARTITION

logger = logging.getLogger(__name__)

LATENCY_MS = 8.0
ACCOUNTS = 1_000
FUNDS = Decimal("1000000.00")
KINDS = ("deposits", "transfers", "same", "cross", "hot", "intake")
TAIL_SECONDS = 300.0  # the settling after the last delivery gives up after this long
HOT_ACCOUNT = "hot"


@dataclass(frozen=True)
class Work:
    """One cell's messages, its requests, and the accounts to fund before."""

    bodies: list[bytes]
    request_ids: list[str]
    funded: list[str] = field(default_factory=list)


def _transfer(request_id: str, source: str, target: str, amount: str,
              rng: random.Random) -> list[bytes]:
    legs = [step_body(request_id, f"{request_id}-w", "withdraw_funds", source, amount, 2),
            step_body(request_id, f"{request_id}-a", "add_funds", target, amount, 2)]
    rng.shuffle(legs)
    return legs


def make_work(kind: str, requests: int, shards: int, seed: int = 11) -> Work:
    """``requests`` requests of ``kind`` for a ledger of ``shards`` shards."""
    rng = random.Random(seed)
    shard_map = ShardMap(shards)
    accounts = [account_name(i) for i in range(ACCOUNTS)]
    on_shard: dict[int, list[str]] = {}
    for account in accounts:
        on_shard.setdefault(shard_map.account_shard(account), []).append(account)
    bodies: list[bytes] = []
    ids: list[str] = []
    prefix = kind[0]
    for n in range(requests):
        request_id = f"{prefix}{n:06d}"
        amount = f"{rng.randint(1, 9)}.{rng.randint(0, 99):02d}"
        if kind in ("deposits", "hot", "intake"):
            account = HOT_ACCOUNT if kind != "deposits" else rng.choice(accounts)
            bodies.append(deposit_body(request_id, account, amount))
        elif kind == "transfers":
            source, target = rng.sample(accounts, 2)
            bodies += _transfer(request_id, source, target, amount, rng)
        elif kind == "same":
            shard = rng.randrange(shards)
            source, target = rng.sample(on_shard[shard], 2)
            suffix = 0
            while shard_map.home_of(request_id, 2, source) != shard:
                suffix += 1
                request_id = f"{prefix}{n:06d}.{suffix}"
            bodies += _transfer(request_id, source, target, amount, rng)
        elif kind == "cross":
            if shards < 2:
                raise ValueError("cross-shard transfers need at least two shards")
            first, second = rng.sample(range(shards), 2)
            bodies += _transfer(request_id, rng.choice(on_shard[first]),
                                rng.choice(on_shard[second]), amount, rng)
        else:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        ids.append(request_id)
    funded = accounts if kind in ("transfers", "same", "cross") else []
    return Work(bodies, ids, funded)


def fund(app: LedgerApp, accounts: Iterable[str], balance: Decimal = FUNDS) -> None:
    """Give each account a balance row in its own shard's ledger partition (before any leader)."""
    by_shard: dict[int, list[str]] = {}
    for account in accounts:
        by_shard.setdefault(app.shard_map.account_shard(account), []).append(account)
    for shard, held in by_shard.items():
        table = app.on(shard).ledger.table
        for start in range(0, len(held), 99):
            table.submit([("create", {"PartitionKey": ledger_partition(shard),
                                      "RowKey": account_key(account),
                                      "balance": format_money(balance), "epoch": 0,
                                      "updatedAt": ""})
                          for account in held[start:start + 99]])


@dataclass
class Outcomes:
    """The outcome rows of every shard, as read at the end."""

    final: int = 0  # settled (committed or rejected)
    committed: int = 0  # committed and settled
    rejected: int = 0
    unsettled: int = 0
    crossed: int = 0  # final outcomes of requests that crossed shards
    last_final: float = 0.0  # wall clock of the last final outcome's write


def read_outcomes(connection_string: str, names: Names, shards: int) -> Outcomes:
    """Every shard's outcome rows (the benchmark's own look, without latency or limiter)."""
    table = TableServiceClient.from_connection_string(connection_string).get_table_client(
        names.env()["LEDGER_TABLE_NAME"])
    found = Outcomes()
    for shard in range(shards):
        rows = table.query_entities(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": ledger_partition(shard), "low": REQUEST_PREFIX,
                        "high": REQUEST_PREFIX[:-1] + chr(ord(REQUEST_PREFIX[-1]) + 1)},
            select=["RowKey", "status", "settled", "shards", "Timestamp"])
        for row in rows:
            if not bool(row.get("settled", True)):
                found.unsettled += 1
                continue
            found.final += 1
            found.committed += row.get("status") == "committed"
            found.rejected += row.get("status") == "rejected"
            found.crossed += len(str(row.get("shards") or "[]")) > 2
            stamp = row.metadata.get("timestamp")
            if stamp is not None:
                found.last_final = max(found.last_final, stamp.timestamp())
    return found


def count_markers(connection_string: str, names: Names, shards: int) -> int:
    """Requests announced in the ready indexes of every shard (the intake cells' check)."""
    service = TableServiceClient.from_connection_string(connection_string)
    base = names.env()["COMPLETIONS_TABLE_NAME"]
    return sum(1 for shard in range(shards)
               for _ in service.get_table_client(completions_table_name(base, shard))
               .query_entities("PartitionKey eq @pk", parameters={"pk": READY_PARTITION},
                               select=["RowKey"]))


def drop_cell(connection_string: str, names: Names, shards: int) -> None:
    """Delete a finished cell's tables, containers and queues (keeps Azurite's memory small)."""
    env = names.env()
    tables = TableServiceClient.from_connection_string(connection_string)
    for name in [completions_table_name(env["COMPLETIONS_TABLE_NAME"], k) for k in range(shards)
                 ] + [env["LEDGER_TABLE_NAME"], env["PARKED_TABLE_NAME"]]:
        with contextlib.suppress(AzureError):
            tables.delete_table(name)
    with contextlib.suppress(AzureError):
        BlobServiceClient.from_connection_string(connection_string).delete_container(
            env["LEASE_CONTAINER_NAME"])
    queues = QueueServiceClient.from_connection_string(connection_string)
    for name in (env["WAKEUP_QUEUE_NAME"], env["COMPLETIONS_QUEUE_NAME"]):
        with contextlib.suppress(AzureError):
            queues.delete_queue(name)


@dataclass
class ShardCell:
    """One measured cell."""

    kind: str
    shards: int
    requests: int
    instances: int
    processes: int
    latency_ms: float
    partition_rate: float
    deliveries: int = 0
    final: int = 0
    committed: int = 0
    rejected: int = 0
    crossed: int = 0  # of the final outcomes, requests that crossed shards
    announced: int = 0  # intake cells: markers in the ready indexes at the end
    seconds: float = 0.0  # start -> last final outcome (intake: last delivery recorded)
    rate: float = 0.0  # committed requests/s (intake: recorded deliveries/s)
    tail_s: float = 0.0  # last delivery handled -> everything final
    tail_rounds: int = 0  # rounds of elections on every shard in the tail
    series: str = ""  # the line of the figure it belongs to (its kind unless told)
    tail_throttling: dict[str, dict[str, float]] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)  # bench.loadgen.LoadResult
    cpu: dict[str, float] = field(default_factory=dict)  # bench.loadgen.CpuMeter

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settle(spec: LoadSpec, limiter: PartitionLimiter, expected: int,
           deadline_s: float = TAIL_SECONDS) -> int:
    """Elections on every shard (as the sweeper and the wake-up timers run them) until
    ``expected`` outcomes read final; returns the rounds it took."""
    app = build_instance(spec, limiter, "sweeper", spec.names.probe(spec.latency_ms))
    deadline = time.monotonic() + deadline_s
    rounds = 0
    while time.monotonic() < deadline:
        if read_outcomes(spec.connection_string, spec.names, spec.shards).final >= expected:
            break
        for shard in app.each_shard():
            run_election(shard)
        rounds += 1
    return rounds


def run_shard_cell(connection_string: str, kind: str, shards: int, requests: int,
                   instances: int, processes: int, latency_ms: float = LATENCY_MS,
                   partition_rate: float = AZURE_PARTITION_RATE, seed: int = 11,
                   profile_to: str = "") -> ShardCell:
    """Measure one cell (see the module docstring)."""
    processes = max(1, min(processes, instances))
    cell = ShardCell(kind, shards, requests, instances, processes, latency_ms, partition_rate,
                     series=kind)
    names = Names()
    spec = LoadSpec(connection_string, names, shards, latency_ms, processes, instances,
                    intake_only=kind == "intake", profile_to=profile_to)
    setup = leader_app(connection_string, names, names.probe(0), "setup",
                       overrides=spec.settings())
    prepare(setup)
    work = make_work(kind, requests, shards, seed)
    fund(setup, work.funded)
    limiter = PartitionLimiter(partition_rate, table_port=table_port(connection_string))
    meter = CpuMeter(connection_string)
    meter.start()
    try:
        load = run_load(spec, work.bodies, limiter)
        cell.deliveries = load.handled
        if kind == "intake":
            cell.seconds, cell.rate = load.seconds, load.recorded_rate
        else:
            delivered = time.monotonic()
            cell.tail_rounds = settle(spec, limiter, requests)
            cell.tail_s = round(time.monotonic() - delivered, 3)
        cpu = meter.stop()
        cell.tail_throttling = limiter.reset().as_dict()  # the tail's (this process's)
        cell.load, cell.cpu = load.as_dict(), cpu
        if kind == "intake":
            cell.announced = count_markers(connection_string, names, shards)
        else:
            found = read_outcomes(connection_string, names, shards)
            cell.final, cell.committed, cell.rejected = found.final, found.committed, \
                found.rejected
            cell.crossed = found.crossed
            if found.final and found.last_final > load.started:
                cell.seconds = found.last_final - load.started
                cell.rate = found.committed / cell.seconds
    finally:
        drop_cell(connection_string, names, shards)
    return cell


@dataclass(frozen=True)
class Series:
    """One line of the scaling figure: a kind of request at every K, measured alike."""

    name: str
    kind: str
    partition_rate: float
    requests: int
    per_shard: int = 2  # instances per shard (instances = per_shard * K) ...
    instances: int = 0  # ... unless a fixed number of instances is given

    def instances_at(self, shards: int) -> int:
        return self.instances or self.per_shard * shards


@dataclass
class ShardsResult:
    """The whole sharding benchmark."""

    latency_ms: float
    partition_rate: float
    series: list[dict[str, Any]] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)
    scaling: dict[str, dict[str, float]] = field(default_factory=dict)  # series -> K -> req/s
    speedup: dict[str, dict[str, float]] = field(default_factory=dict)  # series -> K -> x K=1
    cross_ratio: float | None = None  # cross / same, committed requests/s
    cross_shards: int | None = None
    hot_ratio: float | None = None  # hot committed / intake recorded
    machine_load: list[float] = field(default_factory=list)  # 1-minute load before, after

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(cells: list[ShardCell], series: str, shards: int | None = None) -> float | None:
    rates = [c.rate for c in cells if c.series == series
             and (shards is None or c.shards == shards)]
    return statistics.fmean(rates) if rates else None


def _log(cell: ShardCell) -> None:
    load = cell.load
    logger.warning("%s K=%d x%d in %d processes, %g entities/s per partition: %d/%d final, "
                   "%.0f/s (%d crossed), intake %.0f deliveries/s, tail %.1f s, CPU azurite "
                   "%.2f bench %.2f cores", cell.series, cell.shards, cell.instances,
                   cell.processes, cell.partition_rate, cell.committed, cell.requests, cell.rate,
                   cell.crossed, load.get("recorded_rate", 0.0), cell.tail_s,
                   cell.cpu.get("azurite_cores", 0.0), cell.cpu.get("bench_cores", 0.0))


def scaling_series(requests: int, partition_rate: float = AZURE_PARTITION_RATE,
                   per_shard: int = 2, scaled_rate: float = 0.0, scaled_requests: int = 0,
                   fixed_instances: int = 0) -> list[Series]:
    """The default lines: deposits and (half as many) transfers with ``per_shard`` instances
    per shard at Azure's limit; deposits at a scaled-down limit (the partition bound, not the
    machine, binds at K = 1 there); deposits with one fixed number of instances at every K."""
    made = [Series("deposits", "deposits", partition_rate, requests, per_shard),
            # a transfer is two deliveries: as many deliveries as the deposits
            Series("transfers", "transfers", partition_rate, max(1, requests // 2), per_shard)]
    if scaled_rate:
        made.append(Series(f"deposits@{scaled_rate:g}", "deposits", scaled_rate,
                           scaled_requests or requests, per_shard))
    if fixed_instances:
        made.append(Series(f"deposits x{fixed_instances}", "deposits", partition_rate,
                           requests, instances=fixed_instances))
    return made


def measure_shards(connection_string: str, shard_counts: list[int],
                   series: list[Series], processes: int = 4, cross_at: int | None = 4,
                   cross_requests: int = 0, hot_instances: int = 16, hot_requests: int = 0,
                   rounds: int = 1, latency_ms: float = LATENCY_MS,
                   partition_rate: float = AZURE_PARTITION_RATE, hot: bool = True
                   ) -> ShardsResult:
    """Each series at every K, cross- against same-shard transfers at ``cross_at`` shards
    (with ``2 * cross_at`` instances), the hot account against the intake floor (``hot``).
    The cells of one comparison alternate, ``rounds`` times, the order turned each round, so
    that drift on a shared machine falls on all of them alike."""
    result = ShardsResult(latency_ms, partition_rate, [asdict(s) for s in series])
    result.machine_load.append(os.getloadavg()[0])
    cells: list[ShardCell] = []

    def run(name: str, kind: str, shards: int, count: int, instances: int,
            rate: float) -> None:
        cell = run_shard_cell(connection_string, kind, shards, count, instances, processes,
                              latency_ms, rate)
        cell.series = name
        _log(cell)
        cells.append(cell)

    for round_ in range(rounds if series else 0):
        order = shard_counts if round_ % 2 == 0 else list(reversed(shard_counts))
        for shards in order:
            for line in series:
                run(line.name, line.kind, shards, line.requests, line.instances_at(shards),
                    line.partition_rate)
    for line in series:
        base = _mean(cells, line.name, 1)
        result.scaling[line.name] = {str(k): round(_mean(cells, line.name, k) or 0.0, 1)
                                     for k in shard_counts}
        if base:
            result.speedup[line.name] = {
                str(k): round((_mean(cells, line.name, k) or 0.0) / base, 2)
                for k in shard_counts}
    if cross_at is not None and cross_at >= 2 and cross_requests:
        for round_ in range(rounds):
            for kind in (("same", "cross") if round_ % 2 == 0 else ("cross", "same")):
                run(kind, kind, cross_at, cross_requests, 2 * cross_at, partition_rate)
        same, cross = _mean(cells, "same"), _mean(cells, "cross")
        result.cross_shards = cross_at
        result.cross_ratio = round(cross / same, 2) if same and cross else None
    if hot and hot_requests:
        for round_ in range(rounds):
            for kind in (("intake", "hot") if round_ % 2 == 0 else ("hot", "intake")):
                run(kind, kind, 1, hot_requests, hot_instances, partition_rate)
        intake, led = _mean(cells, "intake"), _mean(cells, "hot")
        result.hot_ratio = round(led / intake, 2) if intake and led else None
    result.cells = [c.as_dict() for c in cells]
    result.machine_load.append(os.getloadavg()[0])
    return result
