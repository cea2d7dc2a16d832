"""The local demo: a generated workload through N simulated instances, then a checked summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shared import wiring as runtime
from shared.config.settings import SETTINGS
from shared.domain.exchange import COMMITTING
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import drain_outbox
from shared.storage.parking import queue_depth
from shared.web import api
from simulator.azurite import Azurite
from simulator.cluster import Cluster
from simulator.http import serve
from simulator.workload import Workload, check, generate

logger = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    """Knobs of one demo run."""

    instances: int = 8
    accounts: int = 20
    transfers: int = 200
    malformed: int = 5
    seed: int = 7
    timeout: float = 300
    sweep_seconds: float = 5
    connection_string: str | None = None
    serve_after: bool = False
    kill_leader: bool = False  # SIGKILL the leader a third of the way in: watch the failover


class Progress:
    """A one-line progress bar on a terminal; plain periodic lines elsewhere (CI logs)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0

    def show(self, done: int, total: int, decided: int, requests: int, started: float,
             force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not force and now - self.last < 2:
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] messages {done}/{total}  requests decided {decided}/{requests}  "
                f"{now - started:5.1f} s")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


@contextlib.contextmanager
def storage(connection_string: str | None) -> Iterator[str]:
    """The given storage, or a private in-memory Azurite for the run."""
    if connection_string:
        yield connection_string
        return
    with Azurite(in_memory=True) as azurite:
        yield azurite.connection_string


def _enqueue(app: LedgerApp, work: Workload) -> None:
    queue = app.queue()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(queue.send, work.messages))


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; return 0 when the independent check holds, 1 otherwise."""
    work = generate(accounts=options.accounts, transfers=options.transfers,
                    malformed=options.malformed, seed=options.seed)
    with storage(options.connection_string) as connection_string:
        env = {s.name: os.environ.get(s.name) or s.default for s in SETTINGS}
        env["AzureWebJobsStorage"] = connection_string
        if options.kill_leader:  # the shortest lease Azure allows, so the failover is quick
            env.update(LEASE_SECONDS="15")  # renew interval and margin derive from it
        os.environ.update(env)
        runtime.reset()
        app = runtime.get_app()  # the supervisor's own instance: HTTP API and checks
        app.ensure_resources()
        out.write(f"Workload: {work.requests} requests ({len(work.deposits)} deposits, "
                  f"{len(work.transfers)} transfers, {len(work.doomed)} with a failed step), "
                  f"{len(work.messages)} messages incl. {work.duplicates} duplicates and "
                  f"{work.malformed} malformed, shuffled.\n")
        _enqueue(app, work)
        server, base_url = serve()
        out.write(f"Read API on {base_url}/api/leader (and /api/accounts/{{id}}, "
                  f"/api/requests/{{id}}); status page: {base_url}/api/status\n")
        log_path = run_log_path()
        cluster = Cluster(env, instances=options.instances, sweep_seconds=options.sweep_seconds,
                          lock_seconds=10 if options.kill_leader else 30, log_path=log_path)
        queue = app.queue()
        out.write(f"Starting {options.instances} instances (logs: {log_path}) ...\n")
        out.flush()
        started = time.monotonic()
        progress = Progress()
        cluster.start()
        finished = False
        kill_pending = options.kill_leader
        try:
            while time.monotonic() - started < options.timeout:
                time.sleep(0.25)
                done = cluster.count("done") + cluster.count("poisoned")
                try:  # a busy Azurite may time a poll out: the next one asks again
                    decided = len(app.ledger.list_outcomes())
                    progress.show(done, len(work.messages), decided, work.requests, started)
                    if kill_pending and done >= len(work.messages) // 3 and (
                            leader := _epoch_holder(app)) is not None:
                        kill_pending = False
                        _kill_leader(cluster, leader, started, out)
                    if decided >= work.requests and not kill_pending and not (
                            queue.approximate_count()):
                        finished = True
                        break
                except StorageError as exc:
                    logger.info("progress poll failed (%s); polling again", exc)
            progress.show(cluster.count("done") + cluster.count("poisoned"), len(work.messages),
                          len(app.ledger.list_outcomes()), work.requests, started, force=True)
        finally:
            progress.close()
            cluster.stop()
        elapsed = time.monotonic() - started
        code = _summary(app, work, cluster, base_url, elapsed, finished, out)
        out.write(f"Instance logs of this run: {log_path}\n")
        if options.serve_after:
            out.write(f"Status page: {base_url}/api/status (open it in a browser)\n"
                      "Operator CLI on this storage, from another terminal:\n"
                      f"  AzureWebJobsStorage='{connection_string}' ./dev cli status\n"
                      f"Serving the read API on {base_url} until Ctrl-C ...\n")
            out.flush()
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
        server.shutdown()
        return code


def run_log_path() -> Path:
    """A new log file for this run's instances (each line names its instance: ``i3``)."""
    folder = tempfile.mkdtemp(prefix=time.strftime("ledger-demo-%Y%m%d-%H%M%S-"))
    return Path(folder) / "instances.log"


def _epoch_holder(app: LedgerApp) -> int | None:
    """The index of the instance that claimed the current epoch (``sim-iN:pid/lease``)."""
    fence = app.ledger.read_fence()
    match = re.match(r"sim-i(\d+):", fence.holder if fence else "")
    return int(match.group(1)) if match else None


def _kill_leader(cluster: Cluster, index: int, started: float, out: TextIO) -> None:
    """SIGKILL the leading instance (no release, no clean-up) and start a replacement."""
    cluster.signal(index, signal.SIGKILL)
    cluster.processes[index].wait(timeout=10)
    cluster.start_instance(index)
    out.write(f"\n{time.monotonic() - started:5.1f} s: killed the leader (the holder of the "
              f"current epoch), instance {index} "
              "(SIGKILL: its lease is not released and expires within 15 s), started a "
              "replacement\n")
    out.flush()


def check_outcome_events(app: LedgerApp, out: TextIO) -> list[str]:
    """Consume the outcomes queue as an upstream system would and check it against the read
    API: one distinct outcome event per decided request, with the status the API reports.

    Whatever the instances left in an outbox (a killed leader) is sent first, as the sweeper
    would. Returns the problems found (none when the check holds).
    """
    if not app.config.outcome_events:
        out.write("Outcome events: off (OUTCOME_EVENTS=false)\n")
        return []
    drain_outbox(app)
    queue = app.queue(app.config.outcomes_queue)
    events: dict[str, dict[str, object]] = {}
    bodies: dict[str, str] = {}
    copies = contradictions = 0
    problems = []
    while batch := queue.receive(max_messages=32, visibility_timeout=60):
        for message in batch:
            event = json.loads(message.text)
            queue.delete(message.handle)
            if event.get("type") == "contradiction":
                contradictions += 1
                continue
            copies += 1
            events[str(event["requestId"])] = event
            if bodies.setdefault(str(event["eventId"]), message.text) != message.text:
                problems.append(f"two bodies for event {event['eventId']}")
    decided = {d.outcome.request_id for shard in app.each_shard()
               for d in shard.ledger.list_outcomes()}
    final = {}
    for request_id in decided:
        status = str(api.request(app, request_id).body.get("status"))
        if status != COMMITTING:
            final[request_id] = status
    if missing := sorted(set(final) - set(events)):
        problems.append(f"{len(missing)} decided request(s) without an outcome event, "
                        f"e.g. {missing[:3]}")
    if extra := sorted(set(events) - set(final)):
        problems.append(f"{len(extra)} outcome event(s) for requests not decided, "
                        f"e.g. {extra[:3]}")
    if wrong := sorted(r for r in set(events) & set(final) if events[r]["status"] != final[r]):
        problems.append(f"{len(wrong)} outcome event(s) disagree with the read API, "
                        f"e.g. {wrong[:3]}")
    out.write(f"Outcome events: {len(events)} distinct for {len(final)} decided request(s) "
              f"({copies - len(events)} duplicate(s)), {contradictions} "
              f"contradiction(s); statuses {'match' if not wrong else 'DO NOT match'} "
              "the read API\n")
    return problems


def _summary(app: LedgerApp, work: Workload, cluster: Cluster, base_url: str, elapsed: float,
             finished: bool, out: TextIO) -> int:
    outcomes = app.ledger.list_outcomes()
    balances = app.ledger.list_balances()
    parked = len(app.parking.list())
    poisoned = queue_depth(app.queue(app.config.poison_queue))
    result = check(work, outcomes, balances, parked, poisoned)
    leaders: Counter[tuple[int, str]] = Counter(
        (d.epoch, d.decided_by.split("/")[0] or "?") for d in outcomes)
    fence = app.ledger.read_fence()
    with urllib.request.urlopen(f"{base_url}/api/leader", timeout=10) as response:
        leader_view = json.loads(response.read())
    sample = sorted(balances)[0] if balances else "acct-000"
    with urllib.request.urlopen(f"{base_url}/api/accounts/{sample}", timeout=10) as response:
        sample_view = json.loads(response.read())

    w = out.write
    w(f"\n== Summary ({elapsed:.1f} s, {cluster.size} instances, "
      f"{cluster.count('done')} invocations acknowledged)\n")
    epochs = fence.epoch if fence else 0
    w(f"Election: {cluster.count('leading')} lease(s) won, {cluster.count('refused')} attempt(s) "
      f"refused (those invocations exited early); {epochs} epoch(s) claimed.\n")
    w("Leaders that decided requests:\n")
    for (epoch, holder), count in sorted(leaders.items()):
        w(f"  epoch {epoch:>3}  {holder:<16} {count:>4} request(s)\n")
    w("Requests by outcome: " + ", ".join(f"{k} {v}" for k, v in
                                         sorted(result.outcomes.items())) + "\n")
    conserved = result.total_deposited == result.total_balance
    w(f"Money: committed deposits {result.total_deposited}, balances sum to "
      f"{result.total_balance} over {len(balances)} accounts -> "
      f"{'conserved to the cent' if conserved else 'NOT conserved'}\n")
    w(f"Dead letters: {parked} parked (malformed), {poisoned} in {app.config.poison_queue}\n")
    left = app.completions.scan_rows(fallback_now=app.clock.now()).steps
    decided = {d.outcome.request_id for d in outcomes}
    rows = sum(len(steps) for steps in left.values())
    late = sum(len(steps) for request_id, steps in left.items() if request_id in decided)
    w(f"Completion rows left: {rows}" + (
        f", {late} of them late duplicates of decided requests (a leader that did not decide "
        "those requests drops them when they would expire)\n" if rows else "\n"))
    w(f"GET /api/leader -> epoch {leader_view['epoch']}, lease {leader_view['lease']['state']}, "
      f"pending {leader_view['pendingCompletions']}\n")
    w(f"GET /api/accounts/{sample} -> {sample_view}\n")
    result.problems += check_outcome_events(app, out)  # issue 18: the outcomes queue
    if not finished:
        result.problems.insert(0, "the run timed out before every request was decided")
    if result.problems:
        w("CHECK FAILED:\n" + "".join(f"  - {p}\n" for p in result.problems))
        return 1
    w("Check: every request decided once, balances equal the committed legs, none negative.\n")
    return 0
