"""The scale-out simulator's supervisor: N instance processes on one storage account.

Each instance is a separate Python process (``python -m simulator instance``) so that it can be
killed (SIGKILL) or paused (SIGSTOP) like a real scaled-out instance. The supervisor collects
their JSON event lines and keeps counts, and which instance holds each shard's lease (an event
names its shard; one without a shard is shard 0's). An instance that dies on its own (a crash
order of ``simulator/faults.py``) is started again by ``restart_exited``, as Azure would.
``kill_holder`` SIGKILLs an instance and says which shards' leases it held when it died (from
every event line it wrote before dying).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from simulator import REPO_ROOT


class Cluster:
    """Start, signal and stop simulated instances; count what they report."""

    def __init__(self, env: Mapping[str, str], instances: int = 8, threads: int = 4,
                 lock_seconds: float = 30, sweep_seconds: float | None = 60,
                 log_path: Path | None = None, sweepers: int = 1) -> None:
        self.env = dict(env)
        self.size = instances
        self.threads = threads
        self.lock_seconds = lock_seconds
        self.sweep_seconds = sweep_seconds
        self.sweepers = sweepers  # instances 0..sweepers-1 run the timer-triggered sweeper
        self.log_path = log_path
        self.processes: dict[int, subprocess.Popen[str]] = {}
        self.events: Counter[str] = Counter()
        self.errors: list[str] = []
        self.last_leader: int | None = None  # index of the instance that most recently led
        self.current_leader: int | None = None  # holds a lease now (leading, not yet stopped)
        self.leading_since = 0.0  # monotonic time of the current leader's 'leading' event
        self.leader_changes = 0  # leases won by another instance than the shard's previous one
        # Per shard: the instance that led it last, and the one holding its lease now (since).
        self.last_leaders: dict[int, int] = {}
        self.current_leaders: dict[int, tuple[int, float]] = {}
        # Per shard: leases won, and leases won by another process than the shard's previous
        # holder (a replacement instance has its predecessor's index but not its process).
        self.leases_won: Counter[int] = Counter()
        self.holder_changes: Counter[int] = Counter()
        self._last_holder_pid: dict[int, int] = {}
        self._readers: dict[int, threading.Thread] = {}  # index -> its process's event reader
        self.stopped: set[int] = set()  # instances the supervisor stopped or killed itself
        self.up: set[int] = set()  # instances whose process said 'started' (set up, listening)
        self.faults: Counter[str] = Counter()  # injected faults reported by instances at exit
        self._lock = threading.Lock()
        self._log: IO[str] | None = None

    def start(self) -> Cluster:
        """Start every instance; the first ``sweepers`` also run the timer-triggered sweeper.

        In Azure the timer runs on one instance at a time and moves to another when that one
        dies or hangs (its singleton lock expires); several sweepers model that failover.
        """
        if self.log_path is not None:
            self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        for index in range(self.size):
            self.start_instance(index)
        return self

    def start_instance(self, index: int) -> None:
        """(Re)start one instance process."""
        args = [sys.executable, "-m", "simulator", "instance", "--index", str(index),
                "--threads", str(self.threads), "--lock-seconds", str(self.lock_seconds)]
        if index < self.sweepers and self.sweep_seconds:
            args += ["--sweep-seconds", str(self.sweep_seconds)]
        env = {**os.environ, **self.env, "WEBSITE_INSTANCE_ID": f"sim-i{index}",
               "PYTHONPATH": str(REPO_ROOT)}
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=self._log or subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, text=True)
        self.processes[index] = process
        self.stopped.discard(index)
        self.up.discard(index)
        reader = threading.Thread(target=self._read_events, args=(process,), daemon=True)
        self._readers[index] = reader
        reader.start()

    def _read_events(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._lock:
                self.events[event.get("event", "?")] += 1
                if event.get("event") == "started" and process is self.processes.get(
                        int(event["index"])):
                    self.up.add(int(event["index"]))
                if event.get("event") == "leading":
                    index, shard = int(event["index"]), int(event.get("shard", 0))
                    previous = self.last_leaders.get(shard)
                    if previous is not None and index != previous:
                        self.leader_changes += 1
                    self.last_leader = self.current_leader = self.last_leaders[shard] = index
                    self.leading_since = time.monotonic()
                    self.current_leaders[shard] = (index, self.leading_since)
                    self.leases_won[shard] += 1
                    if self._last_holder_pid.setdefault(shard, process.pid) != process.pid:
                        self.holder_changes[shard] += 1
                        self._last_holder_pid[shard] = process.pid
                elif event.get("event") == "stopped_leading":
                    index, shard = int(event["index"]), int(event.get("shard", 0))
                    if self.current_leaders.get(shard, (None, 0.0))[0] == index:
                        del self.current_leaders[shard]
                    if self.current_leader == index:
                        self.current_leader = None
                elif event.get("event") == "faults":
                    self.faults.update(event.get("injected", {}))
                if event.get("event") in ("failed", "poisoned"):
                    self.errors.append(str(event.get("error", "")))

    def count(self, event: str) -> int:
        """How many events of this kind all instances reported so far."""
        with self._lock:
            return self.events[event]

    def signal(self, index: int, signum: int) -> None:
        """Send a signal to one instance (SIGKILL, SIGSTOP, SIGCONT ... for chaos runs)."""
        self.processes[index].send_signal(signum)

    def leader_mid_drain(self, min_seconds: float = 0.0) -> int | None:
        """The instance holding the lease now, once it has held it ``min_seconds``."""
        with self._lock:
            if self.current_leader is None:
                return None
            if time.monotonic() - self.leading_since < min_seconds:
                return None
            return self.current_leader

    def leaders(self) -> dict[int, int]:
        """Shard -> the instance holding its lease now (as the events last said)."""
        with self._lock:
            return {shard: index for shard, (index, _) in self.current_leaders.items()}

    def _forget(self, index: int) -> None:
        """A dead instance holds nothing any more (as far as the supervisor tracks it)."""
        with self._lock:
            if self.current_leader == index:
                self.current_leader = None
            for shard in [s for s, (i, _) in self.current_leaders.items() if i == index]:
                del self.current_leaders[shard]

    def restart_exited(self) -> list[tuple[int, int, bool]]:
        """Start again every instance that exited without the supervisor asking it to
        (as Azure replaces a crashed worker); (index, exit code, whether it had started: an
        instance whose set-up failed, say storage down, never did) of each."""
        restarted = []
        for index, process in sorted(self.processes.items()):
            code = process.poll()
            if code is None or index in self.stopped:
                continue
            with self._lock:
                had_started = index in self.up
            self._forget(index)
            self.start_instance(index)
            restarted.append((index, code, had_started))
        return restarted

    def kill(self, index: int, restart: bool = True) -> None:
        """SIGKILL one instance (no release, no clean-up) and, as Azure would, start another."""
        process = self.processes[index]
        self.stopped.add(index)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self._forget(index)
        if restart:
            self.start_instance(index)

    def kill_holder(self, index: int, restart: bool = True) -> list[int]:
        """SIGKILL one instance and return the shards whose leases it held when it died (as its
        own event lines said: every line it wrote is read before the answer); then, as Azure
        would, start another in its place."""
        process, reader = self.processes[index], self._readers[index]
        self.stopped.add(index)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        reader.join(timeout=10)  # its stdout is closed: the reader reaches the end
        with self._lock:
            held = sorted(shard for shard, (i, _) in self.current_leaders.items() if i == index)
        self._forget(index)
        if restart:
            self.start_instance(index)
        return held

    def alive(self) -> list[int]:
        """Indexes of the instances still running."""
        return [i for i, p in self.processes.items() if p.poll() is None]

    def stop(self, timeout: float = 20) -> None:
        """Ask every instance to finish its in-flight work and exit; kill what does not."""
        self.stopped.update(self.processes)
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
