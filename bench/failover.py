"""Failover time: from the leader's end to the first commit by another instance.

A leader drains a ready backlog while three follower instances keep receiving new deposits at
``delivery_rate`` messages/s (so candidates keep trying the lease, as under traffic). Then:

- ``sigkill``: the leader is a separate process (``bench.victim``), killed with SIGKILL mid-drain;
  its lease must expire (``LEASE_SECONDS`` = 15 here, the shortest Azure allows; 60 by default);
- ``release``: the leader is an instance in this process whose drain budget runs out (1 s): it
  releases the lease, the graceful way a leader stops (possibly before its first commit, when
  reading the backlog's cold accounts takes longer than its budget).

The figure is the time from the kill (or the release) to the first transaction committed by a
follower, on this process's monotonic clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.cells import Names, leader_app, prepare
from bench.drain import record_backlog
from bench.strategies import LeaderInstance
from bench.workloads import deposit_body
from shared.election.elector import ElectionCallbacks
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from simulator import REPO_ROOT

FAST_LEASE = {"LEASE_SECONDS": "15", "RENEW_INTERVAL_SECONDS": "4",
              "LEASE_SAFETY_MARGIN_SECONDS": "5"}


@dataclass
class FailoverResult:
    """One failover measurement."""

    kind: str
    latency_ms: float
    lease_seconds: int
    delivery_rate: float
    seconds: float | None = None  # None: no follower committed within the timeout

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_failover(connection_string: str, kind: str, latency_ms: float,
                     delivery_rate: float = 20, backlog: int = 3000,
                     timeout: float = 60) -> FailoverResult:
    """Measure one failover of ``kind`` (``sigkill`` or ``release``)."""
    names = Names()
    result = FailoverResult(kind, latency_ms, int(FAST_LEASE["LEASE_SECONDS"]), delivery_rate)
    probe = names.probe(latency_ms)
    first_commit: list[float] = []
    ended: list[float] = []

    def on_commit(request_ids: list[str], when: float) -> None:
        if ended and when > ended[0] and not first_commit:
            first_commit.append(when)

    followers = [LeaderInstance(leader_app(connection_string, names, probe, f"follower-{i}",
                                           overrides=FAST_LEASE), on_commit) for i in range(3)]
    prepare(followers[0].app)
    record_backlog(connection_string, names, backlog, 200)
    stop = threading.Event()

    def deliver(index: int) -> None:
        n = 0
        while not stop.is_set():
            followers[index].handle(deposit_body(f"f{index}-{n:06d}", "fresh", "1.00"))
            n += 1
            stop.wait(len(followers) / delivery_rate)

    victim: subprocess.Popen[bytes] | None = None
    leader_thread: threading.Thread | None = None
    if kind == "sigkill":
        victim = subprocess.Popen(
            [sys.executable, "-m", "bench.victim", connection_string, names.prefix,
             str(latency_ms)], cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
        _wait_for_commit_by(followers[0].app, "victim", timeout)
    else:
        def release_time(_lease_id: str) -> None:
            ended.append(time.monotonic())

        leader = leader_app(connection_string, names, probe, "victim",
                            ElectionCallbacks(before_release=release_time),
                            overrides={**FAST_LEASE, "DRAIN_BUDGET_SECONDS": "1"})
        leader_thread = threading.Thread(target=run_election, args=(leader,), daemon=True)
        leader_thread.start()
        # Its budget may run out before its first commit (its first round reads every cold
        # account; on a loaded machine that takes longer than 1 s): its release is the start.
        _wait_for_commit_by(followers[0].app, "victim", timeout, until=lambda: bool(ended))
    threads = [threading.Thread(target=deliver, args=(i,), daemon=True)
               for i in range(len(followers))]
    for thread in threads:
        thread.start()
    try:
        if victim is not None:
            time.sleep(0.2)
            ended.append(time.monotonic())
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
        deadline = time.monotonic() + timeout
        while not first_commit and time.monotonic() < deadline:
            time.sleep(0.01)
        if first_commit and ended:
            result.seconds = first_commit[0] - ended[0]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if victim is not None and victim.poll() is None:
            victim.kill()
            victim.wait()
        if leader_thread is not None:
            leader_thread.join(timeout=30)
    return result


def _wait_for_commit_by(app: LedgerApp, holder_prefix: str, timeout: float,
                        until: Callable[[], bool] = lambda: False) -> None:
    """Until a holder named ``holder_prefix...`` has committed (or ``until()``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        fence = app.ledger.read_fence()
        if fence is not None and fence.holder.startswith(holder_prefix) \
                and fence.last_commit_at:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{holder_prefix} did not commit within {timeout} s")
