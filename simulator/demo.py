"""The local demo: a generated workload through N simulated instances, then a checked summary.

``--shards K`` runs the ledger with ``LEDGER_SHARDS=K`` (the workload then crosses shards, see
``simulator/workload.py``) and ``--queues Q`` spreads the messages over Q intake queues (message
``n`` to queue ``n mod Q``), with ``INTAKE_QUEUES=Q`` for the app. With more than one shard the
summary has one line per shard (its leaders and their epochs, holder changes, the requests homed
there by outcome, its accounts and their total, what is left in flight: must be 0) and two
independent checks: the workload's (``workload.check``) and ``simulator/checker.py``'s, over
every shard. ``--kill-leader`` then SIGKILLs the instance that holds shard 0's lease (or, when
none does at that moment, the one holding the most shards) a third of the way in; every shard
it held when it died must show a takeover by the end: a higher epoch, claimed by another process.
The summary names those shards (``Shards that must show a takeover: ...``), and checks that the
status page's data (``/api/metrics``' ``shards``) shows a takeover from the killed process on
exactly the shards where it died in a term (a lease it held between terms just expires).
"""

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO, TypeVar

from azure.core.exceptions import AzureError

from shared import wiring as runtime
from shared.config.names import intake_queue_names
from shared.config.settings import SETTINGS
from shared.domain.exchange import COMMITTING
from shared.domain.model import DecidedOutcome, Fence
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import drain_outbox
from shared.storage.clients import ensure_queues
from shared.storage.parking import queue_depth
from shared.storage.ports import MessageQueue
from shared.web import api
from shared.web import status as status_data
from simulator.azurite import Azurite
from simulator.checker import LedgerReader, Snapshot, Verdict, check_final, money
from simulator.cluster import Cluster
from simulator.functions import indexed, resolve_setting
from simulator.http import serve
from simulator.workload import Workload, check, generate

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
    shards: int = 1  # LEDGER_SHARDS of the app and its instances
    queues: int = 1  # INTAKE_QUEUES: message n goes to intake queue n mod queues


def queue_of(n: int, queues: int) -> int:
    """The intake queue message ``n`` (in sending order) goes to: round robin."""
    return n % queues


@dataclass
class Intake:
    """The intake queues the demo sends to, and their poison queues."""

    names: list[str]
    queues: list[MessageQueue]
    poisons: list[MessageQueue]

    @classmethod
    def open(cls, app: LedgerApp, count: int) -> Intake:
        """Open (and create) ``count`` intake queues and their poison queues."""
        names = list(intake_queue_names(app.config.completions_queue, count))
        ensure_queues(app.clients, [n for name in names for n in (name, f"{name}-poison")])
        return cls(names, [app.queue(name) for name in names],
                   [app.queue(f"{name}-poison") for name in names])

    def waiting(self) -> int:
        """Messages still in the intake queues (approximately, as Storage counts them)."""
        return sum(queue.approximate_count() for queue in self.queues)

    def unheard(self, env: dict[str, str]) -> list[str]:
        """Intake queues no queue trigger of the app listens on (the instances would never
        take their messages)."""
        defaults = {s.name: s.default for s in SETTINGS}
        heard = {resolve_setting(t.queue_name_setting, env, defaults) for t in indexed().queues}
        return [name for name in self.names if name not in heard]


@dataclass
class Kill:
    """The instance ``--kill-leader`` killed, and the shards whose leases it held then."""

    index: int
    pid: int
    at: float  # seconds into the run
    held: list[int]
    epochs: dict[int, int] = field(default_factory=dict)  # shard -> its epoch after the kill
    # The shards whose current epoch it had claimed and not released: it died in a term there.
    in_term: list[int] = field(default_factory=list)


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


def _enqueue(intake: Intake, work: Workload) -> None:
    queues = intake.queues

    def send(n: int, message: str) -> None:
        queues[queue_of(n, len(queues))].send(message)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(send, range(len(work.messages)), work.messages))


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; return 0 when the independent check holds, 1 otherwise."""
    sharded = options.shards > 1
    work = generate(accounts=options.accounts, transfers=options.transfers,
                    malformed=options.malformed, seed=options.seed, shards=options.shards)
    with storage(options.connection_string) as connection_string:
        env = {s.name: os.environ.get(s.name) or s.default for s in SETTINGS}
        env["AzureWebJobsStorage"] = connection_string
        env.update(LEDGER_SHARDS=str(options.shards), INTAKE_QUEUES=str(options.queues))
        if options.kill_leader:  # the shortest lease Azure allows, so the failover is quick
            env.update(LEASE_SECONDS="15")  # renew interval and margin derive from it
        os.environ.update(env)
        runtime.reset()
        app = runtime.get_app()  # the supervisor's own instance: HTTP API and checks
        app.ensure_resources()
        intake = Intake.open(app, options.queues)
        unheard = intake.unheard(env)
        if unheard:
            out.write(f"error: no queue trigger of function_app.py listens on {unheard} with "
                      f"INTAKE_QUEUES={options.queues}: the instances would never take those "
                      "messages\n")
            return 2
        out.write(f"Workload: {work.requests} requests ({len(work.deposits)} deposits, "
                  f"{len(work.transfers) + len(work.multi)} transfers, {len(work.doomed)} with "
                  f"a failed step), {len(work.messages)} messages incl. {work.duplicates} "
                  f"duplicates and {work.malformed} malformed, shuffled.\n")
        if sharded or options.queues > 1:
            out.write(_layout(work, intake))
        _enqueue(intake, work)
        server, base_url = serve()
        out.write(f"Read API on {base_url}/api/leader (and /api/accounts/{{id}}, "
                  f"/api/requests/{{id}}); status page: {base_url}/api/status\n")
        log_path = run_log_path()
        cluster = Cluster(env, instances=options.instances, sweep_seconds=options.sweep_seconds,
                          lock_seconds=10 if options.kill_leader else 30, log_path=log_path)
        reader = LedgerReader(connection_string, app.config.ledger_table, options.shards)
        out.write(f"Starting {options.instances} instances (logs: {log_path}) ...\n")
        out.flush()
        started = time.monotonic()
        progress = Progress()
        cluster.start()
        finished = False
        kill_pending = options.kill_leader
        kill: Kill | None = None
        try:
            while time.monotonic() - started < options.timeout:
                time.sleep(0.25)
                done = cluster.count("done") + cluster.count("poisoned")
                try:  # a busy Azurite may time a poll out: the next one asks again
                    decided = _decided(app, reader)
                    progress.show(done, len(work.messages), decided, work.requests, started)
                    if kill_pending and done >= len(work.messages) // 3:
                        if sharded:
                            kill = _kill_holder(app, cluster, started, out)
                            kill_pending = kill is None
                        elif (leader := _epoch_holder(app)) is not None:
                            kill_pending = False
                            _kill_leader(cluster, leader, started, out)
                    # With shards, a run whose every request is settled ends even if no
                    # leader could be killed (the check then says so).
                    if decided >= work.requests and (not kill_pending or sharded) and not (
                            intake.waiting()) and (not sharded or _in_flight(reader) == 0):
                        finished = True
                        break
                except StorageError as exc:
                    logger.info("progress poll failed (%s); polling again", exc)
            progress.show(cluster.count("done") + cluster.count("poisoned"), len(work.messages),
                          _decided(app, reader), work.requests, started, force=True)
        finally:
            progress.close()
            cluster.stop()
        elapsed = time.monotonic() - started
        try:
            code = _summary(app, work, cluster, base_url, elapsed, finished, out, intake,
                            reader if sharded else None, kill, options.kill_leader)
        finally:
            reader.close()
        out.write(f"Instance logs of this run: {log_path}\n")
        if options.serve_after:
            if kill is not None:
                out.write(f"The status page must show a takeover on shard(s) {_list(kill.held)} "
                          "(the killed process's) and on no other.\n")
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


def _layout(work: Workload, intake: Intake) -> str:
    """How the workload falls on the shards and the queues (a line for the header)."""
    crossing = work.crossing()
    local = sum(1 for r in work.transfers if r not in crossing)
    spread = ", ".join(f"{name} {len(range(q, len(work.messages), len(intake.names)))}"
                       for q, name in enumerate(intake.names))
    return (f"Layout: {work.shards} shard(s): {len(crossing)} request(s) cross shards, "
            f"{local} transfer(s) stay on their home shard, {len(work.multi)} have 3-4 legs; "
            f"{len(intake.names)} intake queue(s), message n to queue n mod "
            f"{len(intake.names)}: {spread} message(s).\n")


def _decided(app: LedgerApp, reader: LedgerReader) -> int:
    """Outcome rows so far: shard 0's as the app lists them, or every shard's (keys only)."""
    if not app.sharded:
        return len(app.ledger.list_outcomes())
    try:
        return reader.count_outcomes()
    except AzureError as exc:
        raise StorageError(str(exc)) from exc


def _in_flight(reader: LedgerReader) -> int:
    """Work left between shards: flight rows, and outcomes not yet settled, on every shard."""
    try:
        return sum(len(reader.rows(k, "flight:"))
                   + sum(1 for r in reader.rows(k, "request:").values()
                         if r.get("settled") is False)
                   for k in range(reader.shards))
    except AzureError as exc:
        raise StorageError(str(exc)) from exc


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


def _holder_to_kill(cluster: Cluster, seconds: float = 1.0) -> int | None:
    """The instance holding shard 0's lease now or, when none does, the one holding the most
    shards (as their event lines say), watched for up to ``seconds``: terms can be short."""
    deadline = time.monotonic() + seconds
    while True:
        leaders = cluster.leaders()
        if leaders:
            if 0 in leaders:
                return leaders[0]
            held = Counter(leaders.values())
            return min(held, key=lambda i: (-held[i], min(k for k, v in leaders.items()
                                                          if v == i)))
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _kill_holder(app: LedgerApp, cluster: Cluster, started: float, out: TextIO) -> Kill | None:
    """SIGKILL a lease holder (no release, no clean-up) and start a replacement; the shards it
    held when it died, with their epochs then (None: it held none by the time it died)."""
    index = _holder_to_kill(cluster)
    if index is None:
        return None
    pid = cluster.processes[index].pid
    held = cluster.kill_holder(index)
    at = time.monotonic() - started
    if not held:
        out.write(f"\n{at:5.1f} s: killed instance {index} (pid {pid}), but it had released "
                  "its leases by then; started a replacement, and will kill the next holder\n")
        out.flush()
        return None
    kill = Kill(index, pid, at, held)
    for shard in held:  # it is dead: only another process can claim a higher epoch now
        ledger = app.on(shard).ledger
        fence = _retry(ledger.read_fence)
        kill.epochs[shard] = fence.epoch if fence else 0
        if fence is not None and _holder_pid(fence.holder) == pid and not fence.released:
            kill.in_term.append(shard)
    out.write(f"\n{at:5.1f} s: killed instance {index} (pid {pid}), the holder of shard(s) "
              f"{_list(held)} (SIGKILL: its leases are not released and expire within 15 s), "
              "started a replacement\n")
    out.flush()
    return kill


def _retry(read: Callable[[], T], attempts: int = 5) -> T:
    """A storage read, tried again after a failure (a busy Azurite may time one out)."""
    for attempt in range(attempts):
        try:
            return read()
        except StorageError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _list(shards: list[int]) -> str:
    return ", ".join(str(k) for k in shards)


def _holder_pid(holder: str) -> int | None:
    """The process id in an instance id (``sim-iN:pid``, then ``/lease`` on a fence)."""
    match = re.match(r"[^:]*:(\d+)", holder)
    return int(match.group(1)) if match else None


def _short(holder: str) -> str:
    """``sim-i3:1234/lease`` -> ``i3:1234``."""
    return holder.split("/")[0].removeprefix("sim-") or "?"


def _summary(app: LedgerApp, work: Workload, cluster: Cluster, base_url: str, elapsed: float,
             finished: bool, out: TextIO, intake: Intake, reader: LedgerReader | None,
             kill: Kill | None, kill_asked: bool) -> int:
    shards = app.each_shard()
    by_shard = {acting.current: acting.ledger.list_outcomes() for acting in shards}
    outcomes = [d for found in by_shard.values() for d in found]
    balances: dict[str, Decimal] = {}
    for acting in shards:
        balances.update(acting.ledger.list_balances())  # an account lives on one shard
    parked = len(app.parking.list())
    poisoned_by_queue = [queue_depth(poison) for poison in intake.poisons]
    poisoned = sum(poisoned_by_queue)
    result = check(work, outcomes, balances, parked, poisoned)
    with urllib.request.urlopen(f"{base_url}/api/leader", timeout=10) as response:
        leader_view = json.loads(response.read())
    sample = sorted(balances)[0] if balances else "acct-000"
    with urllib.request.urlopen(f"{base_url}/api/accounts/{sample}", timeout=10) as response:
        sample_view = json.loads(response.read())

    w = out.write
    w(f"\n== Summary ({elapsed:.1f} s, {cluster.size} instances, "
      f"{cluster.count('done')} invocations acknowledged)\n")
    fences = {acting.current: acting.ledger.read_fence() for acting in shards}
    epochs = sum(fence.epoch for fence in fences.values() if fence)
    w(f"Election: {cluster.count('leading')} lease(s) won, {cluster.count('refused')} attempt(s) "
      f"refused (those invocations exited early); {epochs} epoch(s) claimed"
      + (f" over {len(shards)} shards" if reader else "") + ".\n")
    if reader is None:
        leaders: Counter[tuple[int, str]] = Counter(
            (d.epoch, d.decided_by.split("/")[0] or "?") for d in outcomes)
        w("Leaders that decided requests:\n")
        for (epoch, holder), count in sorted(leaders.items()):
            w(f"  epoch {epoch:>3}  {holder:<16} {count:>4} request(s)\n")
    w("Requests by outcome: " + ", ".join(f"{k} {v}" for k, v in
                                         sorted(result.outcomes.items())) + "\n")
    verdict: Verdict | None = None
    if reader is not None:
        snapshot = reader.snapshot()
        verdict = check_final(reader, work.sent(), snapshot)
        w("Shards (leaders: the processes that decided requests there, with their epochs; "
          "holder changes: leases won by another process than the last holder):\n")
        for k, found in sorted(by_shard.items()):
            w(_shard_line(k, found, fences[k], snapshot, cluster))
    conserved = result.total_deposited == result.total_balance
    over = f" on {len(shards)} shards" if reader else ""
    w(f"Money: committed deposits {result.total_deposited}, balances sum to "
      f"{result.total_balance} over {len(balances)} accounts{over} -> "
      f"{'conserved to the cent' if conserved else 'NOT conserved'}\n")
    if verdict is not None:
        w(f"Checker (every shard, storage read directly): {verdict.line()}; "
          f"{verdict.accounts} accounts hold {verdict.total}\n")
    if len(intake.names) == 1:
        w(f"Dead letters: {parked} parked (malformed), {poisoned} in {app.config.poison_queue}\n")
    else:
        w(f"Dead letters: {parked} parked (malformed, from every queue), {poisoned} poisoned; "
          "by queue:\n")
        for q, name in enumerate(intake.names):
            sent = work.messages[q::len(intake.names)]
            malformed = sum(1 for m in sent if not _well_formed(m))
            w(f"  {name:<16} {len(sent):>5} message(s) sent, {malformed} malformed (to be parked), "
              f"{poisoned_by_queue[q]} in {name}-poison\n")
    decided = {d.outcome.request_id for d in outcomes}
    rows = late = 0
    for acting in shards:
        left = acting.completions.scan_rows(fallback_now=app.clock.now()).steps
        rows += sum(len(steps) for steps in left.values())
        late += sum(len(steps) for request_id, steps in left.items() if request_id in decided)
    w(f"Completion rows left: {rows}" + (
        f", {late} of them late duplicates of decided requests (a leader that did not decide "
        "those requests drops them when they would expire)\n" if rows else "\n"))
    w(f"GET /api/leader -> epoch {leader_view['epoch']}, lease {leader_view['lease']['state']}, "
      f"pending {leader_view['pendingCompletions']}\n")
    w(f"GET /api/accounts/{sample} -> {sample_view}\n")
    result.problems += check_outcome_events(app, out)  # issue 18: the outcomes queue
    if verdict is not None:
        result.problems += [f"checker: {p}" for p in verdict.problems]
        if not verdict.ok and not verdict.problems:
            result.problems.append(f"checker: {verdict.line()}")
    if kill is not None:
        result.problems += _takeovers(kill, fences, _retry(lambda: status_data.snapshot(app)), w)
    elif kill_asked and reader is not None:
        result.problems.append("no instance held a lease when the kill was due: none killed")
    if not finished:
        result.problems.insert(0, "the run timed out before every request was decided")
    if result.problems:
        w("CHECK FAILED:\n" + "".join(f"  - {p}\n" for p in result.problems[:60]))
        return 1
    w("Check: every request decided once, balances equal the committed legs, none negative"
      + ("; every shard settled, nothing in flight, every shard the killed process held "
         "taken over" if kill else "; every shard settled, nothing in flight" if reader
         else "") + ".\n")
    return 0


def _well_formed(message: str) -> bool:
    """Whether a message of the workload is a valid step (else it must end parked)."""
    try:
        body = json.loads(message)
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("requestId", "")).startswith(("dep-", "tx-"))


def _shard_line(shard: int, decided: list[DecidedOutcome], fence: Fence | None,
                snapshot: Snapshot, cluster: Cluster) -> str:
    """One shard: leaders and epochs, holder changes, requests homed there, money, in flight."""
    epochs: dict[str, list[int]] = {}
    for d in decided:
        epochs.setdefault(_short(d.decided_by), []).append(d.epoch)
    leaders = ", ".join(f"{holder} e{_ranges(sorted(set(found)))}" for holder, found in
                        sorted(epochs.items(), key=lambda item: min(item[1]))) or "none"
    statuses = Counter(d.outcome.status.value for d in decided)
    by_outcome = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none"
    accounts = snapshot.prefixed(shard, "account:")
    total = sum((money(row.get("balance")) for row in accounts.values()), Decimal("0.00"))
    reserved = sum((money(row.get("reserved")) for row in accounts.values()), Decimal("0.00"))
    flight = len(snapshot.prefixed(shard, "flight:")) + sum(
        1 for row in snapshot.prefixed(shard, "request:").values()
        if row.get("settled") is False)
    now = f"epoch {fence.epoch} ({_short(fence.holder)})" if fence else "no epoch"
    return (f"  shard {shard}: leaders {leaders}; now {now}; leases won "
            f"{cluster.leases_won[shard]}, holder changes {cluster.holder_changes[shard]} | "
            f"{len(decided)} request(s) homed: {by_outcome} | {len(accounts)} account(s), total "
            f"{total}" + (f", {reserved} in escrow" if reserved else "")
            + f" | in flight {flight}\n")


def _ranges(numbers: list[int]) -> str:
    """1,2,3,5 -> ``1-3,5``."""
    parts: list[str] = []
    for n in numbers:
        if parts and parts[-1].split("-")[-1] == str(n - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ",".join(parts)


def _takeovers(kill: Kill, fences: dict[int, Fence | None], page: dict[str, Any],
               w: Callable[[str], object]) -> list[str]:
    """Each shard the killed process held must have a higher epoch now, by another process."""
    problems = []
    w(f"Killed at {kill.at:.1f} s: instance {kill.index} (pid {kill.pid}), holding shard(s) "
      f"{_list(kill.held)}\n")
    w(f"Shards that must show a takeover: {_list(kill.held)}\n")
    for shard in kill.held:
        fence, before = fences.get(shard), kill.epochs[shard]
        taken = fence is not None and fence.epoch > before and _holder_pid(fence.holder) not in (
            None, kill.pid)
        now = f"epoch {fence.epoch} by {_short(fence.holder)}" if fence else "no epoch"
        w(f"  shard {shard}: epoch {before} at the kill -> {now}: "
          f"{'taken over' if taken else 'NOT taken over'}\n")
        if not taken:
            problems.append(f"shard {shard}, held by the killed process {kill.pid}, shows no "
                            f"takeover (epoch {before} at the kill, {now})")
    problems += _page_takeovers(kill, page, w)
    return problems


def _page_takeovers(kill: Kill, page: dict[str, Any], w: Callable[[str], object]) -> list[str]:
    """The status page (``/api/metrics``' ``shards``) must show a takeover from the killed
    process on exactly the shards where it died in a term. A shard whose lease it held between
    terms (acquired, no epoch claimed yet) had nothing to take over: its lease just expired."""
    shown = {row["shard"]: row["takeover"] for row in page["shards"] if row.get("takeover")}
    from_killed = sorted(k for k, found in shown.items()
                         if _holder_pid(str(found.get("from", ""))) == kill.pid)
    w(f"Status page: a takeover from the killed process on shard(s) {_list(from_killed)}"
      f" (it died in a term on {_list(kill.in_term)}")
    between = sorted(set(kill.held) - set(kill.in_term))
    w(f"; held between terms: {_list(between)})\n" if between else ")\n")
    others = sorted(set(shown) - set(from_killed))
    if others:
        w(f"  also taken over, from another holder that lost its lease: {_list(others)}\n")
    if from_killed != sorted(kill.in_term):
        return [f"the status page shows a takeover from the killed process on shard(s) "
                f"{_list(from_killed)}, not on {_list(kill.in_term)}"]
    return []
