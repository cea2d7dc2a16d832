"""The chaos run: a generated workload through N instance processes while faults are injected.

Storage is a real Azurite that keeps its data on disk, so it can be stopped and started again
mid-run. On a seeded random schedule (printed first, so a failure can be replayed with
``--seed``), at points of the run's progress, the supervisor:

- SIGKILLs random instances, and the leader in the middle of a drain (Azure then starts a new
  instance; the killed leader's lease expires by itself);
- breaks the lease from outside while a leader holds it and commits;
- SIGSTOPs a leader past its lease (the lease is broken, the same fault as its expiry, or left
  to expire with ``--wait-for-expiry``) and SIGCONTs it once another leader has committed;
- stops Azurite and starts it again (data survives on disk);

while every instance's storage calls go through a ``FaultPlan`` (``simulator/faults.py``) that
adds latency spikes, ServerBusy answers and lost responses on a fraction of calls.

The independent check (``workload.check_chaos``) knows only the workload: every request has
exactly one outcome and it is the one the workload implies, every balance is exact to the cent,
no completion row is left, every malformed message is parked with its reason and nothing valid
sits in the poison queue.
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
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from azure.core.exceptions import AzureError, HttpResponseError
from azure.storage.blob import BlobLeaseClient

from shared.config.settings import SETTINGS, load_config
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.storage.clients import clients_from_connection_string
from simulator.azurite import Azurite
from simulator.cluster import Cluster
from simulator.faults import FAULTS_ENV, WRITE_KINDS
from simulator.workload import ChaosCheck, ChaosWorkload, check_chaos, generate_chaos


@dataclass
class ChaosOptions:
    """Knobs of one chaos run (the defaults are the issue's full run)."""

    seed: int = 1
    instances: int = 16
    accounts: int = 50
    requests: int = 2000
    minutes: float = 0  # feed the requests over this long; 0: enqueue them all at once
    leader_kills: int = 5
    random_kills: int = 3
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
    timeout: float = 900  # give up after this long


@dataclass
class ChaosFigures:
    """What the run did and what the check found."""

    seed: int
    instances: int
    requests: int
    messages: int
    duplicates: int
    malformed: int
    schedule: list[tuple[float, str]]
    replay: str = ""  # the command that replays this run
    kills: int = 0
    leader_kills: int = 0
    breaks: int = 0
    breaks_while_leading: int = 0
    pauses: int = 0
    pauses_resumed_after_another_commit: int = 0
    storage_restarts: int = 0
    fenced_out: int = 0  # terms whose write the fence refused (instance logs)
    leadership_lost: int = 0  # terms stopped by a lost lease or a passed renew deadline
    leases_won: int = 0
    takeovers: int = 0
    epochs: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    finished: bool = False
    check: ChaosCheck | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = list(self.check.problems if self.check else ["no check ran"])
        if not self.finished:
            found.insert(0, "the run timed out before every request was decided")
        return found


def plan_schedule(options: ChaosOptions) -> list[tuple[float, str]]:
    """When (fraction of the requests decided) each fault is injected: seeded, replayable."""
    rng = random.Random(options.seed)
    counts = {"kill_leader": options.leader_kills, "kill_random": options.random_kills,
              "break_lease": options.breaks, "pause_leader": options.pauses,
              "restart_storage": options.storage_restarts}
    events = [(round(rng.uniform(0.05, 0.85), 3), action)
              for action, count in counts.items() for _ in range(count)]
    return sorted(events)


def fault_spec(options: ChaosOptions) -> str:
    """The ``SIM_FAULTS`` spec every instance runs with (its seed is shifted per instance)."""
    writes = sorted(str(kind) for kind in WRITE_KINDS)
    return json.dumps({"seed": options.seed, "rules": [
        {"fault": "latency", "probability": options.latency_ratio,
         "seconds": options.latency_seconds},
        {"fault": "status", "kinds": writes, "probability": options.busy_ratio, "status": 503},
        {"fault": "lose_response", "kinds": writes,
         "probability": options.lost_response_ratio},
    ]})


class ChaosRun:
    """One run: storage, instances, feeder, injector and check."""

    def __init__(self, options: ChaosOptions, out: TextIO) -> None:
        self.options = options
        self.out = out
        self.work: ChaosWorkload = generate_chaos(options.seed, options.accounts,
                                                  options.requests)
        self.schedule = plan_schedule(options)
        self.figures = ChaosFigures(
            options.seed, options.instances, self.work.all_requests,
            len(self.work.funding_messages) + len(self.work.messages), self.work.duplicates,
            len(self.work.malformed), self.schedule, replay_command(options))
        self.rng = random.Random(options.seed + 1)
        self.storage_lock = threading.Lock()  # the feeder waits while storage restarts
        self.fed = threading.Event()
        self.started = time.monotonic()

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
                    FAULTS_ENV: fault_spec(self.options)})
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
        azurite = Azurite(in_memory=False, location=location).start()
        try:
            env = self._env(azurite.connection_string)
            config = load_config(env, instance_id="chaos-supervisor")
            app = LedgerApp.create(config, clients_from_connection_string(
                azurite.connection_string, config.storage_timeout_seconds))
            app.ensure_resources()
            self._header(location)
            log_path = Path(location) / "instances.log"
            cluster = Cluster(env, instances=options.instances, threads=options.threads,
                              lock_seconds=10, sweep_seconds=options.sweep_seconds,
                              log_path=log_path, sweepers=options.instances)
            self.say(f"starting {options.instances} instances (logs: {log_path})")
            self._enqueue(app, self.work.funding_messages, 0)
            cluster.start()
            try:
                self._wait(lambda: self._decided(app) >= len(self.work.funding), 300,
                           "the funding deposits")
                self.say(f"{len(self.work.funding)} accounts funded; sending "
                         f"{len(self.work.messages)} messages")
                feeder = threading.Thread(target=self._feed, args=(app,), daemon=True)
                feeder.start()
                self._inject(app, cluster, azurite)
                self._wait(lambda: self.fed.is_set() and self._quiet(app), options.timeout,
                           "every request decided and the queue empty")
                self.say("every request decided; waiting for late duplicates to settle "
                         f"(REQUEST_TIMEOUT_SECONDS={options.request_timeout})")
                self._wait(lambda: self._count(app.completions.count) == 0,
                           options.request_timeout + 90, "no completion row left")
                self.figures.finished = True
            except TimeoutError as exc:
                self.figures.notes.append(str(exc))
            finally:
                cluster.stop()
            self._count_term_ends(log_path)
            self.figures.elapsed = time.monotonic() - self.started
            self.figures.leases_won = cluster.count("leading")
            self.figures.takeovers = cluster.leader_changes
            self.figures.faults = cluster.faults
            self.figures.check = self._check(app)
            return self.figures
        finally:
            azurite.stop()
            if self.figures.problems:
                self.out.write(f"Storage and instance logs kept in {location}\n")
            else:
                shutil.rmtree(location, ignore_errors=True)

    def _header(self, location: str) -> None:
        o = self.options
        self.out.write(
            f"Chaos run, seed {o.seed} (replay: {replay_command(o)})\n"
            f"Workload: {self.work.all_requests} requests ({len(self.work.funding)} funding "
            f"deposits, {len(self.work.requests)} under chaos, "
            f"{sum(len(r.legs) > 2 for r in self.work.requests.values())} with 3-5 legs, "
            f"{sum(r.failed for r in self.work.requests.values())} with a failed step), "
            f"{self.figures.messages} messages incl. {self.work.duplicates} duplicates and "
            f"{len(self.work.malformed)} malformed, legs out of order.\n"
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

    @staticmethod
    def _count(read: Callable[[], int]) -> int:
        try:
            return read()
        except StorageError:
            return -1

    def _decided(self, app: LedgerApp) -> int:
        return self._count(lambda: len(app.ledger.list_outcomes()))

    def _quiet(self, app: LedgerApp) -> bool:
        if self._decided(app) < self.work.all_requests:
            return False
        queued = self._count(lambda: app.queue().approximate_count())
        return queued == 0

    def _wait(self, predicate: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {seconds:g} s waiting for {what}")
            time.sleep(0.5)

    # --- the faults ------------------------------------------------------------------------
    def _inject(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        """Inject each fault once that fraction of the requests under chaos is decided."""
        pending = list(self.schedule)
        last_report = 0.0
        progress = 0.0
        deadline = time.monotonic() + self.options.timeout
        while pending and time.monotonic() < deadline:
            decided = self._decided(app)
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
            getattr(self, f"_{action}")(app, cluster, azurite)
        for _, action in pending:
            self.figures.notes.append(f"{action} not injected: the run ended first")

    def _leader(self, cluster: Cluster, seconds: float = 60) -> int | None:
        # The reworked drain holds the lease for short terms: a leader counts as mid-drain once
        # it holds the lease at all (a term can be over in tens of milliseconds).
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            index = cluster.leader_mid_drain()
            if index is not None and cluster.processes[index].poll() is None:
                return index
            time.sleep(0.02)
        return None

    def _kill_leader(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        index = self._leader(cluster)
        if index is None:
            self.say("no leader held the lease within 60 s: killing a random instance")
            self._kill_random(app, cluster, azurite)
            return
        cluster.kill(index)
        self.figures.kills += 1
        self.figures.leader_kills += 1
        if self.options.wait_for_expiry:
            self.say(f"SIGKILL leader i{index} mid-drain (its lease expires in <= 15 s); "
                     "replacement started")
        else:  # a dead holder cannot tell expiry from a break: the same fault, 15 s sooner
            self._break(app)
            self.say(f"SIGKILL leader i{index} mid-drain, its lease broken (as if it "
                     "expired); replacement started")

    def _kill_random(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        index = self.rng.choice(sorted(cluster.processes))
        was_leading = cluster.current_leader == index
        cluster.kill(index)
        self.figures.kills += 1
        self.figures.leader_kills += was_leading
        self.say(f"SIGKILL instance i{index}{' (the leader)' if was_leading else ''}; "
                 "replacement started")

    def _break(self, app: LedgerApp) -> None:
        def break_now() -> None:
            try:
                blob = app.clients.blob.get_blob_client(app.config.lease_container,
                                                        app.config.lease_blob)
                BlobLeaseClient(blob).break_lease(lease_break_period=0)
            except HttpResponseError as exc:
                if exc.status_code != 409:  # 409: no lease to break (released meanwhile)
                    raise
        self._retrying("breaking the lease", break_now, seconds=20)

    def _break_lease(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        index = self._leader(cluster)
        self._break(app)
        self.figures.breaks += 1
        self.figures.breaks_while_leading += index is not None
        self.say(f"lease broken from outside while i{index} led" if index is not None
                 else "lease broken from outside (no leader seen within 60 s)")

    def _pause_leader(self, app: LedgerApp, cluster: Cluster, azurite: Azurite) -> None:
        index = self._leader(cluster)
        if index is None:
            self.figures.notes.append("pause skipped: no leader held the lease within 60 s")
            return
        cluster.signal(index, signal.SIGSTOP)
        fence = app.ledger.read_fence()
        epoch = fence.epoch if fence else 0
        self.figures.pauses += 1
        if self.options.wait_for_expiry:
            self.say(f"SIGSTOP leader i{index} (epoch {epoch}); waiting 16 s for its lease "
                     "to expire")
            time.sleep(16)
        else:
            self._break(app)
            self.say(f"SIGSTOP leader i{index} (epoch {epoch}); lease broken (as if it "
                     "expired)")
        try:
            self._wait(lambda: self._committed_since(app, epoch), 90,
                       "another leader's commit")
            self.figures.pauses_resumed_after_another_commit += 1
            note = "after another leader committed"
        except TimeoutError:
            note = "without another commit within 90 s"
        cluster.signal(index, signal.SIGCONT)
        self.say(f"SIGCONT i{index} {note}: its next write must be fenced out")

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

    # --- the check -------------------------------------------------------------------------
    def _check(self, app: LedgerApp) -> ChaosCheck:
        decided = app.ledger.list_outcomes()
        fence = app.ledger.read_fence()
        self.figures.epochs = fence.epoch if fence else 0
        parked = [(m.kind.value, m.body, m.error) for m in app.parking.list(limit=100_000)]
        poison = app.queue(app.config.poison_queue, raw=True)
        texts: list[str] = []
        for message in poison.receive(max_messages=32, visibility_timeout=300):
            try:
                texts.append(base64.b64decode(message.text, validate=True).decode())
            except (binascii.Error, UnicodeDecodeError):
                texts.append(message.text)
        return check_chaos(self.work, decided, app.ledger.list_balances(), parked, texts,
                           app.completions.count())


def replay_command(options: ChaosOptions) -> str:
    """The command that runs these options again (same seed: same workload and schedule)."""
    o = options
    return (f"./dev chaos --seed {o.seed} --instances {o.instances} --requests {o.requests}"
            f" --minutes {o.minutes:g} --leader-kills {o.leader_kills} --random-kills "
            f"{o.random_kills} --breaks {o.breaks} --pauses {o.pauses} --storage-restarts "
            f"{o.storage_restarts}" + (" --wait-for-expiry" if o.wait_for_expiry else ""))


def report(figures: ChaosFigures, out: TextIO) -> None:
    """The figures of one run, and the check's verdict."""
    check = figures.check
    w = out.write
    w(f"\n== Chaos run, seed {figures.seed}: {figures.elapsed:.0f} s, {figures.instances} "
      "instances\n")
    w(f"requests {figures.requests} ({figures.messages} messages, {figures.duplicates} "
      f"duplicates, {figures.malformed} malformed)\n")
    w(f"kills {figures.kills} (leader mid-drain {figures.leader_kills}), lease breaks "
      f"{figures.breaks} (while a leader held it {figures.breaks_while_leading}), pauses "
      f"{figures.pauses} (resumed after another leader committed "
      f"{figures.pauses_resumed_after_another_commit}), storage restarts "
      f"{figures.storage_restarts}\n")
    w(f"leases won {figures.leases_won}, takeovers {figures.takeovers}, epochs "
      f"{figures.epochs}; terms ended by the fence (FencedOut) {figures.fenced_out}, by a lost "
      f"lease or its deadline (LeadershipLost) {figures.leadership_lost}\n")
    injected = ", ".join(f"{k} {v}" for k, v in sorted(figures.faults.items())) or "none reported"
    w(f"storage faults injected (instances that exited cleanly): {injected}\n")
    if check is not None:
        w("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(check.outcomes.items()))
          + f"; drift {check.drift} (sum of |balance - expected| over accounts)\n")
    for note in figures.notes:
        w(f"note: {note}\n")
    problems = figures.problems
    if problems:
        w(f"CHECK FAILED (replay: {figures.replay}):\n"
          + "".join(f"  - {p}\n" for p in problems))
    else:
        w("Check: every request decided once with the outcome the workload implies, balances "
          "exact to the cent, no completion row left, every malformed message parked with its "
          "reason, nothing valid poisoned.\n")
    out.flush()


def run_chaos(options: ChaosOptions, out: TextIO = sys.stdout) -> int:
    """Run, print the figures; 0 when the check holds."""
    os.environ.pop(FAULTS_ENV, None)  # the supervisor itself talks to storage without faults
    figures = ChaosRun(options, out).run()
    report(figures, out)
    return 1 if figures.problems else 0
