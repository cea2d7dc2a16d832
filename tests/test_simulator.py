"""The scale-out simulator end to end: real instance processes on the session's Azurite."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import azure.functions as func
import pytest
from azure.storage.queue import QueueClient

from shared.domain.model import DecidedOutcome, Outcome, OutcomeStatus
from shared.domain.sharding import ShardMap
from simulator import REPO_ROOT
from simulator.azurite import Azurite
from simulator.cluster import Cluster
from simulator.functions import QueueTrigger
from simulator.host import QueueListener, QueueOptions
from simulator.workload import check, generate
from tests.helpers import Namespace, balance, deposit, status, transfer, wait_until


def _demo(*options: str) -> subprocess.CompletedProcess[str]:
    # A private Azurite: the demo uses the default names.
    with Azurite(in_memory=True) as own:
        return subprocess.run(
            [sys.executable, "-m", "simulator", "demo", "--accounts", "8", "--transfers", "60",
             "--malformed", "3", "--timeout", "150", "--connection-string",
             own.connection_string, *options],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.slow
def test_demo_through_four_instances_conserves_money() -> None:
    run = _demo("--instances", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "conserved to the cent" in run.stdout
    assert "3 parked (malformed), 0 in completions-poison" in run.stdout
    assert "Completion rows left: 0\n" in run.stdout
    assert "CHECK FAILED" not in run.stdout


@pytest.mark.slow
def test_demo_with_the_leader_killed_fails_over_to_a_higher_epoch() -> None:
    run = _demo("--instances", "3", "--kill-leader")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "killed the leader" in run.stdout
    deciding = [int(e) for e in re.findall(r"^  epoch +(\d+) ", run.stdout, flags=re.M)]
    assert max(deciding, default=0) >= 2, (
        "a new leader claimed a higher epoch and decided requests\n" + run.stdout)
    assert "conserved to the cent" in run.stdout


def test_workload_is_reproducible_and_mixes_the_faults_in() -> None:
    first, second = generate(seed=3), generate(seed=3)
    assert first.messages == second.messages
    assert first.duplicates > 0
    assert first.doomed
    assert first.malformed == 5
    # Out of order: some transfer's add leg is sent before its withdraw leg.
    position = {json.loads(m)["operationId"]: i for i, m in enumerate(first.messages)
                if m.startswith("{") and "operationId" in m}
    assert any(position[f"{t}-a"] < position[f"{t}-w"] for t in first.transfers)


def test_a_sharded_workload_crosses_shards_and_keeps_some_requests_on_one() -> None:
    shard_map = ShardMap(4)
    work = generate(accounts=20, transfers=200, seed=7, shards=4)
    assert work.requests == 220
    crossing = work.crossing()
    local = [r for r in work.transfers if r not in crossing]
    assert len(crossing) > len(work.transfers) // 2  # most transfers cross shards
    assert local  # some stay on their home shard: both accounts on the request id's shard
    for request_id in local:
        source, target, _ = work.transfers[request_id]
        assert shard_map.account_shard(source) == shard_map.account_shard(target) == (
            shard_map.request_shard(request_id))
    assert work.multi
    for legs in work.multi.values():
        assert 3 <= len(legs) <= 4
        assert sum(amount for _, amount in legs) == 0  # a transfer moves money, makes none
        assert len({shard_map.account_shard(account) for account, _ in legs}) >= 3
    # Every step of every request is sent, with its request's step count.
    steps = [json.loads(m) for m in work.messages if m.startswith("{")]
    for request_id, legs in work.multi.items():
        sent = {s["operationId"]: s for s in steps if s.get("requestId") == request_id}
        assert len(sent) == len(legs)
        assert {s["expectedOperations"] for s in sent.values()} == {len(legs)}
    # The checker's view: transfers may be refused, deposits not; failed ones must abort.
    planned = work.sent()
    assert set(planned) == set(work.deposits) | set(work.transfers) | set(work.multi)
    assert all(planned[r].failed for r in work.doomed)
    # One shard: the ratios draw nothing, the workload is the one-shard demo's of old.
    assert generate(seed=7).messages == generate(seed=7, shards=1, multi_leg_ratio=0.5,
                                                 local_ratio=0.5).messages
    assert not generate(seed=7).multi


def test_the_independent_check_catches_a_wrong_balance() -> None:
    work = generate(accounts=2, transfers=0, malformed=0, seed=1)
    outcomes = [DecidedOutcome(Outcome(rid, OutcomeStatus.COMMITTED, "",
                                       ((f"acct-00{i}", amount),)), "", 1, "test", True)
                for i, (rid, amount) in enumerate(work.deposits.items())]
    right = {f"acct-00{i}": amount for i, amount in enumerate(work.deposits.values())}
    assert check(work, outcomes, right, parked=0, poisoned=0).problems == []
    wrong = dict(right, **{"acct-000": right["acct-000"] + Decimal("0.01")})
    problems = check(work, outcomes, wrong, parked=0, poisoned=0).problems
    assert any("committed legs sum to" in p for p in problems)
    assert any("money not conserved" in p for p in problems)
    # A commit whose legs are not the ones sent is caught too (balances agreeing with it).
    moved = [DecidedOutcome(Outcome(d.outcome.request_id, OutcomeStatus.COMMITTED, "",
                                    ((d.outcome.legs[0][0], d.outcome.legs[0][1] + 1),)),
                            "", 1, "test", True) for d in outcomes]
    shifted = {account: amount + 1 for account, amount in right.items()}
    problems = check(work, moved, shifted, parked=0, poisoned=0).problems
    assert any("committed legs" in p and "it sent" in p for p in problems)


def test_instances_commit_from_the_queue_and_poison_what_the_host_cannot_decode(
        ns: Namespace) -> None:
    app = ns.app()
    env = ns.env()
    raw = QueueClient.from_connection_string(ns.connection_string, env["COMPLETIONS_QUEUE_NAME"])
    raw.send_message("%% not base64 %%")  # the host cannot even decode this one
    encoded = app.queue()
    for body in deposit("d1", "alice", "12.34") + transfer("t1", "alice", "bob", "2.34"):
        encoded.send(body.decode())
    cluster = Cluster(env, instances=2, threads=2, sweep_seconds=None).start()
    try:
        wait_until(lambda: status(app, "t1") == "committed", 120, "t1 committed by the instances")
        poison = QueueClient.from_connection_string(ns.connection_string, app.config.poison_queue)
        wait_until(lambda: (poison.get_queue_properties().approximate_message_count or 0) == 1,
                   120, "the undecodable message in the poison queue")
    finally:
        cluster.stop()
    assert balance(app, "alice") == Decimal("10.00")
    assert balance(app, "bob") == Decimal("2.34")
    assert [m.content for m in poison.peek_messages()] == ["%% not base64 %%"]
    assert cluster.count("poisoned") == 1


@pytest.mark.slow
def test_killing_the_leader_mid_drain_loses_nothing_and_applies_nothing_twice(
        ns: Namespace) -> None:
    app = ns.app()
    env = ns.env(LEASE_SECONDS="15", RENEW_INTERVAL_SECONDS="5", LEASE_SAFETY_MARGIN_SECONDS="5")
    work = generate(accounts=6, transfers=80, malformed=2, seed=5)
    queue = app.queue()
    for message in work.messages:
        queue.send(message)
    cluster = Cluster(env, instances=3, threads=2, lock_seconds=10, sweep_seconds=2).start()
    try:
        wait_until(lambda: cluster.last_leader is not None, 60, "a first leader")
        victim = cluster.last_leader
        assert victim is not None
        cluster.signal(victim, signal.SIGKILL)  # no release, no clean-up: the lease must expire
        cluster.processes[victim].wait(timeout=10)
        cluster.start_instance(victim)  # Azure brings a replacement instance up
        wait_until(lambda: len(app.ledger.list_outcomes()) == work.requests, 180,
                   "every request decided after the leader was killed")
        wait_until(lambda: queue.approximate_count() == 0,
                   60, "the queue drained")
    finally:
        cluster.stop()
    poison = app.queue(app.config.poison_queue)
    result = check(work, app.ledger.list_outcomes(), app.ledger.list_balances(),
                   parked=len(app.parking.list()), poisoned=poison.approximate_count())
    assert result.problems == []
    assert result.total_balance == result.total_deposited


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines (from /proc)."""
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[int(stat.parent.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except OSError:
        return False
    return state.split()[0] != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_demo_with_its_instances_and_its_private_azurite() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "simulator", "demo", "--accounts", "4", "--transfers", "20",
         "--instances", "2", "--malformed", "0"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any("azurite" in c for c in _children(demo.pid).values())
                   and any("instance" in c for c in _children(demo.pid).values()),
                   60, "the demo to start Azurite and its instances", interval=0.2)
        started = list(_children(demo.pid))
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 130
        assert "interrupted" in (demo.stderr.read() if demo.stderr else "")
        wait_until(lambda: not any(_alive(pid) for pid in started), 30,
                   "Azurite and the instances to exit")
    finally:
        if demo.poll() is None:
            demo.kill()


def test_a_message_waiting_for_a_free_thread_stays_invisible(ns: Namespace) -> None:
    """The host keeps a received message invisible while it waits for the worker (CI run 20).

    One thread, a 2 s lock and three 1.5 s invocations: the third waits 3 s for the thread.
    A listener that only renewed visibility once an invocation began let that message come back
    (dequeue count 2, and under load past ``maxDequeueCount`` into the poison queue).
    """
    app = ns.app()
    queue = app.queue(ns.env()["COMPLETIONS_QUEUE_NAME"], raw=True)
    for n in range(3):
        queue.send(base64.b64encode(f"m{n}".encode()).decode())
    seen: list[tuple[str, int]] = []

    def slow(message: func.QueueMessage) -> None:
        time.sleep(1.5)  # the invocation's work, holding the only thread
        seen.append((message.get_body().decode(), message.dequeue_count or 0))

    host = SimpleNamespace(options=QueueOptions(batch_size=16, max_polling_interval=0.2),
                           index=0, lock_seconds=2, stopping=threading.Event(),
                           pool=ThreadPoolExecutor(max_workers=1))
    listener = QueueListener(host, QueueTrigger("slow", "COMPLETIONS_QUEUE_NAME", slow),  # type: ignore[arg-type]
                             queue, app.queue(f"{queue.name}-poison", raw=True))
    thread = threading.Thread(target=listener.run)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 3 and not listener.in_flight, 30, "three invocations")
    finally:
        host.stopping.set()
        thread.join()
        host.pool.shutdown(wait=True)
    assert sorted(seen) == [("m0", 1), ("m1", 1), ("m2", 1)]
