"""The chaos run: a generated workload through N instance processes while faults are injected.

Storage is a real Azurite that keeps its data on disk, so it can be stopped and started again
mid-run. The ledger has ``--shards`` K shards (4 by default; ``LEDGER_SHARDS`` in every
instance), so requests cross shards and the cross-shard protocol (``shared/domain/exchange.py``)
runs under the faults. On a seeded random schedule (printed first, so a failure can be replayed
with ``--seed``), at points of the run's progress, the supervisor:

- SIGKILLs random instances, and the leader of a shard in the middle of a drain (Azure then
  starts a new instance; the killed leader's lease expires by itself);
- kills the leader at each step of the cross-shard protocol (coordinate, vote, decide, apply,
  settle, and the message sends between a transaction and the next), right before or right
  after the request that carries the step: a crash order to every instance's transport
  (``simulator/faults.py``, ``CrashSwitch``), no hook in the app;
- breaks each shard's lease in turn from outside while a leader holds it and commits;
- SIGSTOPs a shard's leader past its lease (the lease is broken, the same fault as its expiry,
  or left to expire with ``--wait-for-expiry``) and SIGCONTs it once another leader of that
  shard has committed;
- stops Azurite and starts it again (data survives on disk);

while every instance's storage calls go through a ``FaultPlan`` (``simulator/faults.py``) that
adds latency spikes, ServerBusy answers and lost responses on a fraction of calls.

Two independent checks judge the run. ``workload.check_chaos`` knows only the workload: every
request has exactly one outcome, one its steps allow (a withdrawal from a thinly funded account
may be refused: which ones depends on order), every balance follows to the cent, no completion
row is left, every malformed message is parked with its reason and nothing valid sits in the
poison queue. ``simulator/checker.py`` reads the ledger partitions with the SDK alone: its
invariants are checked every few seconds during the run and once at the end, and the end state
gives ``lost, double-applied, partial requests, drift`` (all must be zero).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from azure.core.exceptions import AzureError, HttpResponseError
from azure.storage.blob import BlobLeaseClient

from shared.config.names import lease_blob_name
from shared.config.settings import SETTINGS, load_config
from shared.domain.model import DecidedOutcome
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.storage.clients import clients_from_connection_string
from simulator.azurite import Azurite
from simulator.checker import LedgerReader, Verdict, check_final, check_invariants
from simulator.cluster import Cluster
from simulator.faults import FAULTS_ENV, WRITE_KINDS, Step, When
from simulator.workload import ChaosCheck, ChaosWorkload, check_chaos, generate_chaos

CLAIM_SECONDS = 30  # how long a crash order waits for a leader to reach its step


@dataclass
class ChaosOptions:
    """Knobs of one chaos run (the defaults are the issue's full run)."""

    seed: int = 1
    instances: int = 16
    accounts: int = 50
    requests: int = 2000
    shards: int = 4  # LEDGER_SHARDS of every instance
    minutes: float = 0  # feed the requests over this long; 0: enqueue them all at once
    leader_kills: int = 5
    random_kills: int = 3
    step_kills: int = 12  # leaders killed at a protocol step (each step, before and after)
    breaks: int = 5
    pauses: int = 1
    storage_restarts: int = 1
    latency_ratio: float = 0.02  # fraction of storage calls delayed ...
    latency_seconds: float = 0.4  # ... by this much
    busy_ratio: float = 0.003  # fraction of writes answered 503 ServerBusy (not applied)
    lost_response_ratio: float = 0.002  # fraction of writes applied whose response is lost
    wait_for_expiry: bool = False  # a killed or paused leader's lease expires (not broken)
    request_timeout: int = 60  # REQUEST_TIMEOUT_SECONDS: late duplicates are settled by then
    threads: int = 2
    sweep_seconds: float = 3  # every instance sweeps (the timer's failover, see Cluster)
    timeout: float = 900  # give up after this long (the whole run, the last check aside)
    deposit_ratio: float = 0.05  # one-step deposits among the requests under chaos
    tight_accounts: int = 4  # accounts funded for a fraction of the withdrawals from them ...
    overdraft_ratio: float = 0.06  # ... and the share of requests that withdraw from them
    duplicate_spread: int = 400  # a duplicate arrives up to this many messages later
    check_seconds: float = 5  # the checker's invariants, this often during the run


@dataclass
class ChaosFigures:
    """What the run did and what the checks found."""

    seed: int
    instances: int
    requests: int
    messages: int
    duplicates: int
    malformed: int
    schedule: list[tuple[float, str]]
    replay: str = ""  # the command that replays this run
    shards: int = 1
    kills: int = 0
    leader_kills: int = 0
    step_kills: Counter[str] = field(default_factory=Counter)  # "vote/after" -> kills
    breaks: int = 0
    breaks_while_leading: int = 0
    breaks_by_shard: Counter[int] = field(default_factory=Counter)
    pauses: int = 0
    pauses_resumed_after_another_commit: int = 0
    storage_restarts: int = 0
    unexpected_exits: int = 0  # instances that died without a kill or a crash order
    failed_starts: int = 0  # instances whose set-up failed (storage down), started again
    fenced_out: int = 0  # terms whose write the fence refused (instance logs)
    leadership_lost: int = 0  # terms stopped by a lost lease or a passed renew deadline
    leases_won: int = 0
    takeovers: int = 0
    epochs: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    finished: bool = False
    check: ChaosCheck | None = None
    verdict: Verdict | None = None  # simulator/checker.py at the end
    invariant_checks: int = 0  # snapshots the checker judged during the run
    invariant_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = list(self.check.problems if self.check else ["no check ran"])
        if self.verdict is None:
            found.append("the checker did not run")
        elif not self.verdict.ok:
            found.append(f"checker: {self.verdict.line()}")
            found += [f"checker: {p}" for p in self.verdict.problems]
        found += [f"during the run: {p}" for p in self.invariant_problems]
        if self.unexpected_exits:
            found.append(f"{self.unexpected_exits} instance(s) exited on their own")
        if not self.finished:
            found.insert(0, "the run timed out before every request was decided and settled")
        return found


def plan_schedule(options: ChaosOptions) -> list[tuple[float, str]]:
    """When (fraction of the requests decided) each fault is injected: seeded, replayable."""
    rng = random.Random(options.seed)
    counts = {"kill_leader": options.leader_kills, "kill_random": options.random_kills,
              "break_lease": options.breaks, "pause_leader": options.pauses,
              "restart_storage": options.storage_restarts}
    events = [(round(rng.uniform(0.05, 0.85), 3), action)
              for action, count in counts.items() for _ in range(count)]
    if options.shards > 1 and options.step_kills:  # protocol steps exist only across shards
        # Every step once (before or after, drawn), then every step the other way round.
        steps = list(Step)
        rng.shuffle(steps)
        first = [(step, rng.choice(list(When))) for step in steps]
        order = first + [(step, When.AFTER if when is When.BEFORE else When.BEFORE)
                         for step, when in first]
        # Earlier than the others: once every request is in, no step coordinates any more.
        events += [(round(rng.uniform(0.05, 0.6), 3),
                    "kill_at:{}:{}".format(*order[i % len(order)]))
                   for i in range(options.step_kills)]
    return sorted(events)


def fault_spec(options: ChaosOptions, crash_dir: str | None = None) -> str:
    """The ``SIM_FAULTS`` spec every instance runs with (its seed is shifted per instance);
    ``crash_dir`` is where the supervisor arms crash orders at protocol steps."""
    writes = sorted(str(kind) for kind in WRITE_KINDS)
    return json.dumps({"seed": options.seed, "rules": [
        {"fault": "latency", "probability": options.latency_ratio,
         "seconds": options.latency_seconds},
        {"fault": "status", "kinds": writes, "probability": options.busy_ratio, "status": 503},
        {"fault": "lose_response", "kinds": writes,
         "probability": options.lost_response_ratio},
    ], **({"crash_dir": crash_dir} if crash_dir else {})})


class ChaosRun:
    """One run: storage, instances, feeder, injector and checks."""

    def __init__(self, options: ChaosOptions, out: TextIO) -> None:
        self.options = options
        self.out = out
        self.work: ChaosWorkload = generate_chaos(
            options.seed, options.accounts, options.requests, shards=options.shards,
            duplicate_spread=options.duplicate_spread, deposit_ratio=options.deposit_ratio,
            tight_accounts=options.tight_accounts, overdraft_ratio=options.overdraft_ratio)
        self.schedule = plan_schedule(options)
        self.figures = ChaosFigures(
            options.seed, options.instances, self.work.all_requests,
            len(self.work.funding_messages) + len(self.work.messages), self.work.duplicates,
            len(self.work.malformed), self.schedule, replay_command(options),
            shards=options.shards)
        self.rng = random.Random(options.seed + 1)
        self.storage_lock = threading.Lock()  # the feeder waits while storage restarts
        self.fed = threading.Event()
        self.stop_checking = threading.Event()
        self.started = time.monotonic()
        self.deadline = self.started + options.timeout  # every wait of the run ends by then
        self.crash_dir = ""
        self.orders = 0
        self.claimed: set[int] = set()  # instances that died on a crash order (not unexpected)
        self.claims_seen: set[str] = set()  # claim files accounted for
        self.reader: LedgerReader | None = None

    # --- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.out.write(f"{time.monotonic() - self.started:7.1f} s  {text}\n")
        self.out.flush()

    # --- setup -----------------------------------------------------------------------------
    def _env(self, connection_string: str) -> dict[str, str]:
        env = {s.name: s.default for s in SETTINGS}
        env.update({"AzureWebJobsStorage": connection_string, "LEASE_SECONDS": "15",
                    "RENEW_INTERVAL_SECONDS": "5", "LEASE_SAFETY_MARGIN_SECONDS": "5",
                    "REQUEST_TIMEOUT_SECONDS": str(self.options.request_timeout),
                    "LEDGER_SHARDS": str(self.options.shards),
                    FAULTS_ENV: fault_spec(self.options, self.crash_dir or None)})
        return env

    def _retrying(self, what: str, action: Callable[[], object], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with self.storage_lock:
                    action()
                return
            except (StorageError, AzureError) as exc:  # the lease blob's calls are the SDK's
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} kept failing: {exc}") from exc
                time.sleep(0.5)

    def _enqueue(self, app: LedgerApp, messages: list[str], seconds: float) -> None:
        queue = app.queue()
        pace = seconds / max(len(messages), 1)
        with ThreadPoolExecutor(max_workers=4) as pool:
            for message in messages:
                pool.submit(self._retrying, "sending a message",
                            functools.partial(queue.send, message))
                if pace:
                    time.sleep(pace)

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> ChaosFigures:
        options = self.options
        location = tempfile.mkdtemp(prefix="chaos-azurite-")
        self.crash_dir = str(Path(location) / "crash-orders")
        os.makedirs(self.crash_dir)
        azurite = Azurite(in_memory=False, location=location).start()
        try:
            env = self._env(azurite.connection_string)
            config = load_config(env, instance_id="chaos-supervisor")
            app = LedgerApp.create(config, clients_from_connection_string(
                azurite.connection_string, config.storage_timeout_seconds))
            app.ensure_resources()
            self.reader = LedgerReader(azurite.connection_string, config.ledger_table,
                                       options.shards)
            self._header(location)
            log_path = Path(location) / "instances.log"
            cluster = Cluster(env, instances=options.instances, threads=options.threads,
                              lock_seconds=10, sweep_seconds=options.sweep_seconds,
                              log_path=log_path, sweepers=options.instances)
            self.say(f"starting {options.instances} instances, {options.shards} shard(s) "
                     f"(logs: {log_path})")
            self._enqueue(app, self.work.funding_messages, 0)
            cluster.start()
            checking = threading.Thread(target=self._check_periodically, daemon=True)
            checking.start()
            try:
                self._wait(lambda: self._decided() >= len(self.work.funding), 300,
                           "the funding deposits", cluster)
                self.say(f"{len(self.work.funding)} accounts funded; sending "
                         f"{len(self.work.messages)} messages")
                feeder = threading.Thread(target=self._feed, args=(app,), daemon=True)
                feeder.start()
                self._inject(app, cluster, azurite)
                self._wait(lambda: self.fed.is_set() and self._quiet(app), options.timeout,
                           "every request decided and the queue empty", cluster)
                if options.shards > 1:
                    self.say("every request decided; waiting for every cross-shard request "
                             "to settle")
                    self._wait(lambda: self._in_flight() == 0, 180,
                               "every cross-shard request settled, nothing in flight", cluster)
                self.say("waiting for late duplicates to settle "
                         f"(REQUEST_TIMEOUT_SECONDS={options.request_timeout})")
                self._wait(lambda: self._completion_rows(app) == 0,
                           options.request_timeout + 90, "no completion row left", cluster)
                self.figures.finished = True
            except TimeoutError as exc:
                self.figures.notes.append(str(exc))
            finally:
                self.stop_checking.set()
                checking.join(timeout=120)
                cluster.stop()
            self._count_term_ends(log_path)
            self.figures.elapsed = time.monotonic() - self.started
            self.figures.leases_won = cluster.count("leading")
            self.figures.takeovers = cluster.leader_changes
            self.figures.faults = cluster.faults
            self.figures.check = self._check(app)
            return self.figures
        finally:
            if self.reader is not None:
                self.reader.close()
            azurite.stop()
            if self.figures.problems:
                self.out.write(f"Storage and instance logs kept in {location}\n")
            else:
                shutil.rmtree(location, ignore_errors=True)

    def _header(self, location: str) -> None:
        o = self.options
        requests = self.work.requests.values()
        self.out.write(
            f"Chaos run, seed {o.seed} (replay: {replay_command(o)})\n"
            f"Workload: {self.work.all_requests} requests ({len(self.work.funding)} funding "
            f"deposits, {len(self.work.requests)} under chaos, "
            f"{sum(len(r.legs) > 2 for r in requests)} with 3-5 legs, "
            f"{sum(len(r.legs) == 1 for r in requests)} deposits, "
            f"{sum(r.may_reject for r in requests)} withdrawals from "
            f"{sum(a.startswith('tight-') for a in self.work.funding)} thinly funded accounts "
            "(some must be refused), "
            f"{sum(r.failed for r in requests)} with a failed step), "
            f"{self.figures.messages} messages incl. {self.work.duplicates} duplicates and "
            f"{len(self.work.malformed)} malformed, legs out of order; {o.shards} shard(s).\n"
            f"Storage: Azurite on disk in {location}; lease 15 s; instances' storage faults: "
            f"{fault_spec(o)}\n"
            "Schedule (fraction of the requests under chaos decided -> fault):\n"
            + "".join(f"  {at:5.3f}  {action}\n" for at, action in self.schedule))
        self.out.flush()

    def _feed(self, app: LedgerApp) -> None:
        try:
            self._enqueue(app, self.work.messages, self.options.minutes * 60)
        finally:
            self.fed.set()

    def _count_term_ends(self, log_path: Path) -> None:
        """How terms ended early, from the instances' warnings (``run_election``)."""
        with contextlib.suppress(OSError):
            for line in log_path.read_text(errors="replace").splitlines():
                if " stopped leading: " not in line:
                    continue
                if any(m in line for m in ("no longer current", "claimed by", "could not claim")):
                    self.figures.fenced_out += 1
                elif "lease" in line:
                    self.figures.leadership_lost += 1

    # --- progress, from storage --------------------------------------------------------------
    @staticmethod
    def _count(read: Callable[[], int]) -> int:
        try:
            return read()
        except (StorageError, AzureError):
            return -1

    def _decided(self) -> int:
        assert self.reader is not None
        return self._count(self.reader.count_outcomes)

    def _in_flight(self) -> int:
        """Flight rows and unsettled outcomes left in every shard (-1: storage did not answer)."""
        assert self.reader is not None
        reader = self.reader

        def count() -> int:
            left = 0
            for shard in range(reader.shards):
                left += len(reader.rows(shard, "flight:"))
                left += sum(1 for r in reader.rows(shard, "request:").values()
                            if r.get("settled") is False)
            return left
        return self._count(count)

    def _completion_rows(self, app: LedgerApp) -> int:
        return self._count(lambda: sum(shard.completions.count() for shard in app.each_shard()))

    def _quiet(self, app: LedgerApp) -> bool:
        if self._decided() < self.work.all_requests:
            return False
        queued = self._count(lambda: app.queue().approximate_count())
        return queued == 0

    def _wait(self, predicate: Callable[[], bool], seconds: float, what: str,
              cluster: Cluster | None = None) -> None:
        """Until ``predicate``, for at most ``seconds`` and never past the run's deadline."""
        deadline = min(time.monotonic() + seconds, self.deadline)
        while not predicate():
            if cluster is not None:
                self._reap(cluster)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {time.monotonic() - self.started:.0f} s "
                                   f"of the run waiting for {what}")
            time.sleep(0.5)

    def _reap(self, cluster: Cluster) -> None:
        """Start again instances that died on their own (crash orders, or a real crash)."""
        for index, code, had_started in cluster.restart_exited():
            if index in self.claimed or self._claims_of(index):
                self.claimed.discard(index)
                continue
            if not had_started:  # its set-up failed (storage down?): the host starts it again
                self.figures.failed_starts += 1
                self.say(f"instance i{index} failed to start (code {code}); started again")
                continue
            self.figures.unexpected_exits += 1
            self.say(f"instance i{index} exited on its own (code {code}); started again")

    # --- the checker, during the run -----------------------------------------------------------
    def _check_periodically(self) -> None:
        """The checker's invariants every ``check_seconds`` until the run stops."""
        assert self.reader is not None
        sent = self.work.sent()
        seen: set[str] = set()
        while not self.stop_checking.wait(self.options.check_seconds):
            try:
                problems = check_invariants(self.reader, sent)
            except AzureError:
                continue  # storage restarting or slow: the next round looks again
            self.figures.invariant_checks += 1
            for problem in problems:
                if problem not in seen and len(seen) < 50:
                    seen.add(problem)
                    self.figures.invariant_problems.append(problem)
                    self.say(f"INVARIANT BROKEN: {problem}")

    # --- the faults ------------------------------------------------------------------------
    def _inject(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        """Inject each fault once that fraction of the requests under chaos is decided."""
        pending = list(self.schedule)
        last_report = 0.0
        progress = 0.0
        while pending and time.monotonic() < self.deadline:
            self._reap(cluster)
            decided = self._decided()
            if decided >= 0:
                progress = max(0, decided - len(self.work.funding)) / len(self.work.requests)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                self.say(f"{progress:.0%} of the requests under chaos decided")
            if progress >= 1.0:
                break
            if progress < pending[0][0]:
                time.sleep(0.5)
                continue
            _, action = pending.pop(0)
            if action.startswith("kill_at:"):
                _, step, when = action.split(":")
                self._kill_at(app, cluster, Step(step), When(when))
            else:
                getattr(self, f"_{action}")(app, cluster, azurite)
        for _, action in pending:
            self.figures.notes.append(f"{action} not injected: the run ended first")

    def _leader(self, cluster: Cluster, seconds: float = 60,
                shard: int | None = None) -> tuple[int, int] | None:
        """(instance, shard) of a leader holding a lease now (of ``shard``, if given)."""
        # The reworked drain holds the lease for short terms: a leader counts as mid-drain once
        # it holds the lease at all (a term can be over in tens of milliseconds).
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            leaders = [(index, k) for k, index in cluster.leaders().items()
                       if (shard is None or k == shard)
                       and cluster.processes[index].poll() is None]
            if leaders:
                return self.rng.choice(sorted(leaders))
            time.sleep(0.02)
        return None

    def _kill_leader(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        found = self._leader(cluster)
        if found is None:
            self.say("no leader held a lease within 60 s: killing a random instance")
            self._kill_random(app, cluster, azurite)
            return
        index, shard = found
        cluster.kill(index)
        self.figures.kills += 1
        self.figures.leader_kills += 1
        if self.options.wait_for_expiry:
            self.say(f"SIGKILL leader i{index} of shard {shard} mid-drain (its lease expires in "
                     "<= 15 s); replacement started")
        else:  # a dead holder cannot tell expiry from a break: the same fault, 15 s sooner
            self._break(app, shard)
            self.say(f"SIGKILL leader i{index} of shard {shard} mid-drain, its lease broken "
                     "(as if it expired); replacement started")

    def _kill_random(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        index = self.rng.choice(sorted(cluster.processes))
        led = sorted(k for k, i in cluster.leaders().items() if i == index)
        cluster.kill(index)
        self.figures.kills += 1
        self.figures.leader_kills += bool(led)
        self.say(f"SIGKILL instance i{index}"
                 f"{f' (leader of shard(s) {led})' if led else ''}; replacement started")

    def _kill_at(self, app: LedgerApp, cluster: Cluster, step: Step, when: When) -> None:
        """Arm a crash order: the next leader whose request carries ``step`` dies ``when``."""
        self.orders += 1
        order_id = self.orders
        folder = Path(self.crash_dir)
        claim_path = folder / f"claim-{order_id}.json"
        staged = folder / "order.tmp"
        staged.write_text(json.dumps({"id": order_id, "step": step.value, "when": when.value}))
        os.replace(staged, folder / "order.json")
        deadline = time.monotonic() + CLAIM_SECONDS
        while not claim_path.exists() and time.monotonic() < deadline:
            self._reap(cluster)
            time.sleep(0.05)
        (folder / "order.json").unlink(missing_ok=True)
        claim = self._read_claim(claim_path)
        if claim is None:
            self.figures.notes.append(f"no leader reached step {step}/{when} within "
                                      f"{CLAIM_SECONDS} s")
            self.say(f"crash order {step} {when}: no leader reached it within {CLAIM_SECONDS} s")
            return
        index = int(claim["index"])
        if claim_path.name not in self.claims_seen:  # else: reaped and started again already
            self.claims_seen.add(claim_path.name)
            self.claimed.add(index)
            with contextlib.suppress(subprocess.TimeoutExpired):
                cluster.processes[index].wait(timeout=10)
            self._reap(cluster)
        self.figures.kills += 1
        self.figures.leader_kills += 1
        self.figures.step_kills[f"{step}/{when}"] += 1
        shard = claim.get("shard")
        rows = ", ".join(claim.get("rows", [])[:6])
        if shard is not None and not self.options.wait_for_expiry:
            self._break(app, int(shard))
        self.say(f"killed leader i{index} of shard {shard} {when} its {step} request "
                 f"({rows}); replacement started"
                 + ("" if self.options.wait_for_expiry or shard is None
                    else ", its lease broken (as if it expired)"))

    def _claims_of(self, index: int) -> list[str]:
        """Crash orders that instance ``index`` claimed and the supervisor has not yet seen
        through (it died on one: no unexpected exit), marked seen."""
        found = []
        for path in sorted(Path(self.crash_dir).glob("claim-*.json")):
            if path.name in self.claims_seen:
                continue
            claim = self._read_claim(path)
            if claim is not None and int(claim["index"]) == index:
                found.append(path.name)
        self.claims_seen.update(found)
        return found

    @staticmethod
    def _read_claim(path: Path) -> dict[str, Any] | None:
        """The claim a crashed instance left (written just before it died)."""
        deadline = time.monotonic() + 5
        while path.exists() and time.monotonic() < deadline:
            try:
                found: dict[str, Any] = json.loads(path.read_text())
                return found
            except ValueError:
                time.sleep(0.05)  # still being written
        return None

    def _break(self, app: LedgerApp, shard: int) -> None:
        def break_now() -> None:
            try:
                blob = app.clients.blob.get_blob_client(
                    app.config.lease_container, lease_blob_name(app.config.lease_blob, shard))
                BlobLeaseClient(blob).break_lease(lease_break_period=0)
            except HttpResponseError as exc:
                if exc.status_code != 409:  # 409: no lease to break (released meanwhile)
                    raise
        self._retrying("breaking the lease", break_now, seconds=20)

    def _break_lease(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        shard = self.figures.breaks % self.options.shards  # every shard in turn
        found = self._leader(cluster, shard=shard)
        self._break(app, shard)
        self.figures.breaks += 1
        self.figures.breaks_by_shard[shard] += 1
        self.figures.breaks_while_leading += found is not None
        self.say(f"lease of shard {shard} broken from outside while i{found[0]} led"
                 if found is not None
                 else f"lease of shard {shard} broken from outside (no leader seen within 60 s)")

    def _pause_leader(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        found = self._leader(cluster)
        if found is None:
            self.figures.notes.append("pause skipped: no leader held a lease within 60 s")
            return
        index, shard = found
        acting = app.on(shard)
        cluster.signal(index, signal.SIGSTOP)
        fence = acting.ledger.read_fence()
        epoch = fence.epoch if fence else 0
        self.figures.pauses += 1
        if self.options.wait_for_expiry:
            self.say(f"SIGSTOP leader i{index} of shard {shard} (epoch {epoch}); waiting 16 s "
                     "for its lease to expire")
            time.sleep(16)
        else:
            self._break(app, shard)
            self.say(f"SIGSTOP leader i{index} of shard {shard} (epoch {epoch}); lease broken "
                     "(as if it expired)")
        try:
            self._wait(lambda: self._committed_since(acting, epoch), 90,
                       "another leader's commit")
            self.figures.pauses_resumed_after_another_commit += 1
            note = "after another leader committed"
        except TimeoutError:
            note = "without another commit within 90 s"
        cluster.signal(index, signal.SIGCONT)
        self.say(f"SIGCONT i{index} {note}: its next write to shard {shard} must be fenced out")

    @staticmethod
    def _committed_since(app: LedgerApp, epoch: int) -> bool:
        try:
            fence = app.ledger.read_fence()
        except StorageError:
            return False
        return fence is not None and fence.epoch > epoch and bool(fence.last_commit_at) and (
            fence.last_commit_at > fence.claimed_at)

    def _restart_storage(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        with self.storage_lock:
            azurite.stop()
            self.say("Azurite stopped")
            time.sleep(2)
            azurite.start()
        self.figures.storage_restarts += 1
        self.say("Azurite started again on the same data")

    # --- the checks ------------------------------------------------------------------------
    def _check(self, app: LedgerApp) -> ChaosCheck:
        decided: list[DecidedOutcome] = []
        balances: dict[str, Decimal] = {}
        self.figures.epochs = 0
        for shard in app.each_shard():
            decided += shard.ledger.list_outcomes()
            for account, amount in shard.ledger.list_balances().items():
                balances[account] = balances.get(account, Decimal("0.00")) + amount
            fence = shard.ledger.read_fence()
            self.figures.epochs += fence.epoch if fence else 0
        parked = [(m.kind.value, m.body, m.error) for m in app.parking.list(limit=100_000)]
        poison = app.queue(app.config.poison_queue, raw=True)
        texts: list[str] = []
        for message in poison.receive(max_messages=32, visibility_timeout=300):
            try:
                texts.append(base64.b64decode(message.text, validate=True).decode())
            except (binascii.Error, UnicodeDecodeError):
                texts.append(message.text)
        assert self.reader is not None
        self.figures.verdict = check_final(self.reader, self.work.sent())
        return check_chaos(self.work, decided, balances, parked, texts,
                           self._completion_rows(app))


def replay_command(options: ChaosOptions) -> str:
    """The command that runs these options again (same seed: same workload and schedule)."""
    o = options
    defaults = ChaosOptions()
    step_kills = f"--step-kills {o.step_kills} " if o.shards > 1 else ""
    return (f"./dev chaos --seed {o.seed} --shards {o.shards} --instances {o.instances} "
            f"--requests {o.requests} --minutes {o.minutes:g} --leader-kills {o.leader_kills} "
            f"{step_kills}--random-kills "
            f"{o.random_kills} --breaks {o.breaks} --pauses {o.pauses} --storage-restarts "
            f"{o.storage_restarts}" + (" --wait-for-expiry" if o.wait_for_expiry else "")
            + (f" --request-timeout {o.request_timeout}"
               if o.request_timeout != defaults.request_timeout else "")
            + (f" --duplicate-spread {o.duplicate_spread}"
               if o.duplicate_spread != defaults.duplicate_spread else "")
            + (f" --timeout {o.timeout:g}" if o.timeout != defaults.timeout + 90 * o.minutes
               else ""))


def report(figures: ChaosFigures, out: TextIO) -> None:
    """The figures of one run, and the checks' verdicts."""
    check = figures.check
    w = out.write
    w(f"\n== Chaos run, seed {figures.seed}: {figures.elapsed:.0f} s, {figures.instances} "
      f"instances, {figures.shards} shard(s)\n")
    w(f"requests {figures.requests} ({figures.messages} messages, {figures.duplicates} "
      f"duplicates, {figures.malformed} malformed)\n")
    w(f"kills {figures.kills} (leaders {figures.leader_kills}), lease breaks "
      f"{figures.breaks} (while a leader held it {figures.breaks_while_leading}; by shard "
      f"{dict(sorted(figures.breaks_by_shard.items()))}), pauses "
      f"{figures.pauses} (resumed after another leader committed "
      f"{figures.pauses_resumed_after_another_commit}), storage restarts "
      f"{figures.storage_restarts}\n")
    if figures.step_kills:
        w("leaders killed at a protocol step: "
          + ", ".join(f"{k} {v}" for k, v in sorted(figures.step_kills.items())) + "\n")
    if figures.failed_starts or figures.unexpected_exits:
        w(f"instances started again: {figures.failed_starts} whose set-up failed (storage "
          f"down), {figures.unexpected_exits} that exited on their own\n")
    w(f"leases won {figures.leases_won}, takeovers {figures.takeovers}, epochs "
      f"{figures.epochs}; terms ended by the fence (FencedOut) {figures.fenced_out}, by a lost "
      f"lease or its deadline (LeadershipLost) {figures.leadership_lost}\n")
    injected = ", ".join(f"{k} {v}" for k, v in sorted(figures.faults.items())) or "none reported"
    w(f"storage faults injected (instances that exited cleanly): {injected}\n")
    if check is not None:
        w("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(check.outcomes.items()))
          + f"; drift {check.drift} (sum of |balance - expected| over accounts)\n")
    w(f"checker, during the run: {figures.invariant_checks} snapshots of every shard, "
      f"{len(figures.invariant_problems)} invariant(s) broken\n")
    if figures.verdict is not None:
        w(f"checker, at the end: {figures.verdict.line()} ({figures.verdict.accounts} "
          f"accounts, {figures.verdict.total} in all)\n")
    for note in figures.notes:
        w(f"note: {note}\n")
    problems = figures.problems
    if problems:
        w(f"CHECK FAILED (replay: {figures.replay}):\n"
          + "".join(f"  - {p}\n" for p in problems[:60]))
        if len(problems) > 60:
            w(f"  ... and {len(problems) - 60} more\n")
    else:
        w("Check: every request decided once with an outcome its steps allow, balances "
          "exact to the cent, no completion row left, every malformed message parked with its "
          "reason, nothing valid poisoned; nothing left in flight, every cross-shard request "
          "applied on every shard or on none, and no invariant broken at any snapshot.\n")
    out.flush()


def run_chaos(options: ChaosOptions, out: TextIO = sys.stdout) -> int:
    """Run, print the figures; 0 when the check holds."""
    os.environ.pop(FAULTS_ENV, None)  # the supervisor itself talks to storage without faults
    figures = ChaosRun(options, out).run()
    report(figures, out)
    return 1 if figures.problems else 0
