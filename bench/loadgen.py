"""A load generator of several processes, so that the harness (one Python process, one GIL) is
not the ceiling: each process builds its own instances and delivers completion messages to them.

An *instance* is a ``LedgerApp`` with its own storage clients (its own connection pool), driven
by one thread that takes one delivery at a time: a Functions instance with a concurrency of one.
Each process holds ``instances / processes`` of them. Every delivery calls the real queue-trigger
job, ``shared.leadership.intake.handle_completion(app, body, message_id=...)``, as the Functions
host does per message (record, announce when ready, compete for the lease of its home shard,
lead, drive the shards it messaged). ``intake_only`` makes the *intake floor* instead: the same
deliveries recorded and announced (``record_completion`` + ``announce_if_ready``), no election.

**The queue.** The messages are one list every process holds (inherited at fork); a shared
counter (``multiprocessing.Value``) hands out the next index, so instances compete for messages
as the host's listeners compete for a queue's, wherever they run. A backlog offers them all at
once; ``rate`` offers message ``n`` at ``start + n / rate``. A delivery that raises is delivered
again by the same instance (at most ``REDELIVERIES`` times), as the host would after the message
becomes visible again; each failure is counted.

**Start and stop.** The processes are forked after the parent has built the storage names, the
limiter (``bench.limiter``: its buckets are inherited) and the message list; each builds its
instances, then all wait at a barrier, and the clock starts when the parent releases them. Each
reports what it delivered, when, its storage calls by kind (``bench.probe``), the limiter's waits
and its own CPU time (``resource.getrusage``: every thread of the process).

**CPU.** ``CpuMeter`` reads Azurite's CPU time (``psutil``, the node process that listens on
the table port) and the benchmark's own (this process and its reaped children, ``os.times``)
around a measured window.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.cells import Names, leader_app
from bench.limiter import PartitionLimiter, Throttling
from bench.probe import KINDS
from shared.domain.contract import parse_completion
from shared.leadership.elections import ElectionResult, Role
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import announce_if_ready, handle_completion, record_completion

logger = logging.getLogger(__name__)

REDELIVERIES = 5  # a delivery that raises is tried again this many times
READY_TIMEOUT_S = 300.0  # the processes must have built their instances by then
PROFILE_INTERVAL_S = 0.002  # pyinstrument's sampling interval when profiling the instances


@dataclass(frozen=True)
class LoadSpec:
    """What to offer, to how many instances in how many processes."""

    connection_string: str
    names: Names
    shards: int
    latency_ms: float
    processes: int
    instances: int  # in all, spread over the processes
    intake_only: bool = False  # record + announce only: the intake floor
    rate: float | None = None  # deliveries/s offered; None: all at once (a backlog)
    overrides: tuple[tuple[str, str], ...] = ()  # more app settings
    profile_to: str = ""  # profile the instances that led (pyinstrument): {profile_to}-{id}.txt

    def settings(self) -> dict[str, str]:
        return {"LEDGER_SHARDS": str(self.shards), **dict(self.overrides)}


@dataclass
class LoadResult:
    """What the generator reached."""

    processes: int
    instances: int
    deliveries: int
    offered_rate: float | None
    handled: int = 0
    failures: int = 0  # deliveries that raised (each delivered again)
    started: float = 0.0  # wall clock (time.time) when the processes were released
    seconds: float = 0.0  # start -> last delivery handled
    taken_rate: float = 0.0  # deliveries taken from the queue per second
    recorded_rate: float = 0.0  # deliveries handled per second (the intake reached)
    elections_led: int = 0  # deliveries whose election held a lease
    terms: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    throttling: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_workers_s: float = 0.0  # user + system of the generator's processes
    per_process: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CpuMeter:
    """CPU seconds of Azurite and of the benchmark over a window (``start``, then ``stop``)."""

    def __init__(self, connection_string: str) -> None:
        self.azurite = _AZURITES.get(connection_string)
        if self.azurite is None:
            self.azurite = _AZURITES.setdefault(connection_string,
                                                azurite_process(connection_string))
        self._azurite0 = 0.0
        self._bench0 = 0.0
        self._wall0 = 0.0
        self.figures: dict[str, float] = {}

    def _azurite_s(self) -> float:
        if self.azurite is None:
            return float("nan")
        try:
            times = self.azurite.cpu_times()
        except Exception:  # it went away: no figure
            return float("nan")
        return float(times.user + times.system)

    @staticmethod
    def _bench_s() -> float:
        times = os.times()  # this process, and its children once reaped (the generator's)
        return times.user + times.system + times.children_user + times.children_system

    def start(self) -> None:
        self._azurite0, self._bench0, self._wall0 = (self._azurite_s(), self._bench_s(),
                                                     time.monotonic())

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall0
        azurite = self._azurite_s() - self._azurite0
        bench = self._bench_s() - self._bench0
        self.figures = {"wall_s": round(wall, 3), "azurite_cpu_s": round(azurite, 2),
                        "bench_cpu_s": round(bench, 2),
                        "azurite_cores": round(azurite / wall, 2) if wall else 0.0,
                        "bench_cores": round(bench / wall, 2) if wall else 0.0}
        return self.figures


_AZURITES: dict[str, Any] = {}  # connection string -> its Azurite's process (found once)


def azurite_process(connection_string: str) -> Any:
    """The process that listens on the connection string's table port (``psutil.Process``),
    or ``None`` when it cannot be found (psutil missing, another user's process)."""
    try:
        import psutil
    except ImportError:
        return None
    port = table_port(connection_string)
    if port is None:
        return None
    for process in psutil.process_iter():
        try:
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                    return process
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


def table_port(connection_string: str) -> int | None:
    """The table endpoint's port in a connection string."""
    return next((urlsplit(part.split("=", 1)[1]).port for part in connection_string.split(";")
                 if part.startswith("TableEndpoint=")), None)


def build_instance(spec: LoadSpec, limiter: PartitionLimiter, instance_id: str,
                   probe: Any) -> LedgerApp:
    """One instance: its own clients, through ``probe`` (latency, counts) and the limiter."""
    return leader_app(spec.connection_string, spec.names, probe, instance_id,
                      overrides=spec.settings(), transport_factory=limiter.transport)


def _deliver(app: LedgerApp, body: bytes, message_id: str, intake_only: bool
             ) -> ElectionResult | None:
    if intake_only:
        completion = parse_completion(body)
        home = app.home_of(completion)
        announce_if_ready(home, completion, record_completion(home, completion))
        return None
    return handle_completion(app, body, message_id=message_id).election


def _count_terms(election: ElectionResult | None) -> tuple[int, int]:
    """(1 if it led at all, terms) over an election and the shards it then drove."""
    if election is None:
        return 0, 0
    led = int(election.role is Role.LEADER)
    terms = len(election.terms)
    for visit in election.visits:
        visit_led, visit_terms = _count_terms(visit)
        led, terms = max(led, visit_led), terms + visit_terms
    return led, terms


def _worker(index: int, spec: LoadSpec, bodies: Sequence[bytes], instance_ids: list[str],
            limiter: PartitionLimiter, counter: Any, ready: Any, go: Any, start: Any,
            results: Any) -> None:
    """One generator process: build its instances, wait for the start, deliver, report."""
    try:
        probe = spec.names.probe(0.0)
        apps = [build_instance(spec, limiter, instance_id, probe) for instance_id in instance_ids]
        limiter.reset()
        ready.wait(READY_TIMEOUT_S)
        go.wait(READY_TIMEOUT_S)
        probe.reset()
        probe.latency_ms = spec.latency_ms
        began = start.value
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        stats: Counter[str] = Counter()
        times: dict[str, float] = {"first": float("inf"), "last_taken": 0.0, "last_done": 0.0}
        lock = threading.Lock()

        def run(app: LedgerApp) -> None:
            profiler = None
            if spec.profile_to:  # each instance apart; the leaders' profiles are kept
                from pyinstrument import Profiler

                profiler = Profiler(interval=PROFILE_INTERVAL_S)
                profiler.start()
            led = 0
            try:
                led = deliver_all(app)
            finally:
                if profiler is not None:
                    profiler.stop()
                    if led:
                        path = f"{spec.profile_to}-{app.config.instance_id}.txt"
                        with open(path, "w") as out:
                            out.write(profiler.output_text(unicode=False, color=False))

        def deliver_all(app: LedgerApp) -> int:
            """Deliver until the queue is empty; how many of its deliveries led."""
            leading = 0
            while True:
                with counter.get_lock():
                    n = counter.value
                    counter.value = n + 1
                if n >= len(bodies):
                    return leading
                if spec.rate:
                    delay = began + n / spec.rate - time.time()
                    if delay > 0:
                        time.sleep(delay)
                taken = time.time()
                election = None
                failures = 0
                for _ in range(REDELIVERIES + 1):
                    try:
                        election = _deliver(app, bodies[n], f"m{n:07d}", spec.intake_only)
                        break
                    except Exception as exc:  # the host would deliver it again
                        failures += 1
                        logger.warning("delivery %d failed: %r", n, exc)
                done = time.time()
                led, terms = _count_terms(election)
                leading += led
                with lock:
                    stats["handled"] += failures <= REDELIVERIES
                    stats["failures"] += failures
                    stats["led"] += led
                    stats["terms"] += terms
                    times["first"] = min(times["first"], taken)
                    times["last_taken"] = max(times["last_taken"], taken)
                    times["last_done"] = max(times["last_done"], done)

        threads = [threading.Thread(target=run, args=(app,), name=f"instance-{i}")
                   for i, app in enumerate(apps)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        results.put({"index": index, "instances": len(apps), **stats, **times,
                     "cpu_s": round(cpu.ru_utime - cpu0.ru_utime + cpu.ru_stime - cpu0.ru_stime,
                                    2),
                     "calls": dict(probe.reset()), "throttling": limiter.reset().as_dict()})
    except BaseException as exc:
        results.put({"index": index, "error": repr(exc)})
        raise


def run_load(spec: LoadSpec, bodies: Sequence[bytes], limiter: PartitionLimiter) -> LoadResult:
    """Offer ``bodies`` to ``spec.instances`` instances in ``spec.processes`` processes; return
    once every delivery was handled (see the module docstring)."""
    context = multiprocessing.get_context("fork")
    processes = max(1, min(spec.processes, spec.instances))
    counter = context.Value("q", 0)
    ready = context.Barrier(processes + 1)
    go = context.Event()
    start = context.Value("d", 0.0)
    results = context.Queue()
    ids = [f"p{p}i{i}" for i in range(spec.instances) for p in [i % processes]]
    workers = [context.Process(target=_worker, name=f"loadgen-{p}", daemon=True,
                               args=(p, spec, bodies, [x for x in ids if x.startswith(f"p{p}i")],
                                     limiter, counter, ready, go, start, results))
               for p in range(processes)]
    for worker in workers:
        worker.start()
    ready.wait(READY_TIMEOUT_S)
    start.value = time.time()
    go.set()
    reports = []
    for _ in workers:
        report = results.get(timeout=3600)
        if "error" in report:
            for worker in workers:
                worker.terminate()
            raise RuntimeError(f"load generator process {report['index']} failed: "
                               f"{report['error']}")
        reports.append(report)
    for worker in workers:
        worker.join(timeout=60)
    result = LoadResult(processes, spec.instances, len(bodies), spec.rate,
                        started=start.value)
    calls: Counter[str] = Counter()
    throttling = Throttling()
    for report in sorted(reports, key=lambda r: r["index"]):
        result.handled += report.get("handled", 0)
        result.failures += report.get("failures", 0)
        result.elections_led += report.get("led", 0)
        result.terms += report.get("terms", 0)
        result.cpu_workers_s += report["cpu_s"]
        calls.update(report["calls"])
        throttling.merge(report["throttling"])
        result.per_process.append({"index": report["index"], "instances": report["instances"],
                                   "handled": report.get("handled", 0),
                                   "cpu_s": report["cpu_s"]})
    last_taken = max((r["last_taken"] for r in reports), default=0.0)
    last_done = max((r["last_done"] for r in reports), default=0.0)
    result.seconds = max(0.0, last_done - result.started)
    if last_taken > result.started:
        result.taken_rate = result.handled / (last_taken - result.started)
    if result.seconds:
        result.recorded_rate = result.handled / result.seconds
    result.calls = {kind: calls[kind] for kind in KINDS if calls.get(kind)}
    result.throttling = throttling.as_dict()
    result.cpu_workers_s = round(result.cpu_workers_s, 2)
    return result
