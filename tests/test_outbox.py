"""Outcome events from the transactional outbox, against a real Azurite, with K = 1 and K = 4.

Each scenario drives a small workload (deposits, transfers, some of them across shards with
K = 4, aborted and rejected requests, one request left incomplete) through the queue trigger's
handler, breaks something on the way (a crash between the commit and the publish, lost answers
to the sends, the lease broken while publishing, transactions at the 100-operation limit), and
then checks the outcomes queue against the read API:

- every decided request has at least one outcome event, with the status the read API reports;
- no event exists for a request that is not decided;
- duplicates carry the same body (``eventId`` is the idempotency key);
- every shard's outbox is empty at the end.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import threading
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient

from operator_cli import cli
from shared.config.names import lease_blob_name
from shared.config.settings import load_config
from shared.domain.contract import Operation
from shared.domain.model import Outcome, OutcomeStatus
from shared.domain.outbox import (
    CHUNK_CHARACTERS,
    MAX_ROW_CHARACTERS,
    event_size_bound,
    events_of,
    outbox_entity,
    outcome_event,
)
from shared.domain.planning import MAX_TRANSACTION_OPERATIONS, plan_batches
from shared.domain.rules import Assessment, Verdict
from shared.domain.sharding import ShardMap
from shared.errors import NotFound
from shared.leadership import outbox as outbox_module
from shared.leadership import sweeper
from shared.leadership.elections import handle_wakeup, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import Publisher, depth, store
from shared.leadership.reshard import reshard
from shared.leadership.wakeup import publish_body, publish_request
from shared.storage.clients import clients_from_connection_string
from shared.storage.outbox import OutboxStore
from shared.web import api
from simulator.faults import CallKind, Fault, FaultPlan, TableNames
from tests.helpers import Namespace, deposit, record, send, step, transfer, wait_until

FINAL = {s.value for s in OutcomeStatus}
SHARD_COUNTS = [1, 4]


# --- helpers -------------------------------------------------------------------------------------
def app_with(ns: Namespace, shards: int, **overrides: str) -> LedgerApp:
    settings: dict[str, Any] = {"LEDGER_SHARDS": str(shards), **overrides}
    return ns.app(None, **settings)


def accounts_on(shards: int, shard: int, count: int, prefix: str, width: int = 0) -> list[str]:
    """``count`` account ids (padded to ``width`` characters) that live on ``shard``."""
    shard_map = ShardMap(shards)
    ids = (f"{prefix}-{i}-".ljust(width, "w") if width else f"{prefix}-{i}"
           for i in itertools.count())
    return list(itertools.islice((a for a in ids if shard_map.account_shard(a) == shard), count))


def workload(tag: str) -> tuple[list[bytes], list[bytes], list[str], str]:
    """(funding deposits, the rest, every request id, the id of one left incomplete).

    Transfers between ten accounts (with K = 4 most cross shards); two abort (a failed step),
    two are rejected (an empty source); one is left with one step of two.
    """
    accounts = [f"{tag}-acct-{i}" for i in range(10)]
    funding = [body for i, a in enumerate(accounts)
               for body in deposit(f"{tag}-fund-{i}", a, "100.00")]
    rest: list[bytes] = []
    ids = [f"{tag}-fund-{i}" for i in range(len(accounts))]
    for i in range(6):
        rid = f"{tag}-move-{i}"
        rest += transfer(rid, accounts[i], accounts[(i + 3) % 10], "10.00")
        ids.append(rid)
    for i in range(2):
        rid = f"{tag}-abort-{i}"
        rest += transfer(rid, accounts[i], accounts[i + 1], "5.00", fail="add")
        ids.append(rid)
    for i in range(2):
        rid = f"{tag}-short-{i}"
        rest += transfer(rid, f"{tag}-empty-{i}", accounts[i], "5.00")
        ids.append(rid)
    incomplete = f"{tag}-incomplete"
    rest.append(transfer(incomplete, accounts[0], accounts[1], "1.00")[0])
    ids.append(incomplete)
    return funding, rest, ids, incomplete


def api_status(app: LedgerApp, request_id: str) -> str:
    reply = api.request(app, request_id)
    return str(reply.body.get("status", reply.status))


def take_events(app: LedgerApp) -> list[str]:
    """Every message on the outcomes queue (received and deleted), as the trigger decodes it."""
    queue = app.queue(app.config.outcomes_queue)
    bodies: list[str] = []
    while True:
        try:
            got = queue.receive(max_messages=32, visibility_timeout=60)
        except NotFound:  # never sent to: the queue was not even made
            return bodies
        if not got:
            return bodies
        for message in got:
            bodies.append(message.text)
            queue.delete(message.handle)


def run_publishers(app: LedgerApp) -> int:
    """What the wake_up function does with the hand-off messages on the wake-up queue: each
    sends one outbox row. Returns how many there were (lease alarms are dropped)."""
    handed = 0
    while got := app.wakeup_queue.receive(max_messages=32, visibility_timeout=60):
        for message in got:
            if publish_request(message.text) is not None:
                handle_wakeup(app, message.text.encode())
                handed += 1
            app.wakeup_queue.delete(message.handle)
    return handed


def settle(app: LedgerApp, ids: list[str], incomplete: str, timeout: float = 60) -> None:
    """Run every shard's election until each request but ``incomplete`` reads final."""
    def done() -> bool:
        for shard in app.each_shard():
            with contextlib.suppress(Exception):  # an injected crash: the next round goes on
                run_election(shard)
        return all(api_status(app, r) in FINAL for r in ids if r != incomplete)
    wait_until(done, timeout, "every complete request to be decided", interval=0.2)


def flush_outbox(app: LedgerApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeper's pass over every shard's outbox (without its 10 s grace)."""
    monkeypatch.setattr(outbox_module, "SWEEP_MIN_AGE_SECONDS", 0.0)
    sweeper.sweep(app)


def check(app: LedgerApp, bodies: list[str], ids: list[str]) -> dict[str, int]:
    """The guarantees; returns how many events each request got."""
    by_event: dict[str, set[str]] = defaultdict(set)
    per_request: dict[str, int] = defaultdict(int)
    outcomes: dict[str, dict[str, Any]] = {}
    for body in bodies:
        event = json.loads(body)
        by_event[event["eventId"]].add(body)
        if event["type"] == "outcome":
            assert event["eventId"] == f"{event['requestId']}:outcome"
            assert event["version"] == 1
            outcomes[event["requestId"]] = event
            per_request[event["requestId"]] += 1
    duplicated = {e: b for e, b in by_event.items() if len(b) > 1}
    assert not duplicated, f"events with one eventId and different bodies: {duplicated}"
    statuses = {r: api_status(app, r) for r in ids}
    decided = {r for r, s in statuses.items() if s in FINAL}
    assert set(outcomes) == decided, (
        f"no event for {sorted(decided - set(outcomes))}; "
        f"events for undecided {sorted(set(outcomes) - decided)}")
    for request_id, event in outcomes.items():
        assert event["status"] == statuses[request_id], request_id
        stored = api.request(app, request_id).body
        assert event["epoch"] == stored["epoch"]
        assert event["decidedAt"] == stored["decidedAt"]
        assert ("legs" in event) == (event["status"] == "committed")
    assert depth(app).rows == 0, "outbox rows left"
    return dict(per_request)


# --- pure planning -------------------------------------------------------------------------------
def _assessment(request_id: str, accounts: list[str]) -> Assessment:
    return Assessment(request_id, Verdict.COMMIT, "", (),
                      tuple((a, Decimal("1.00")) for a in accounts), len(accounts))


def test_the_outbox_row_counts_against_100_operations_and_its_character_budget() -> None:
    limits = Publisher.__new__(Publisher)
    limits.enabled = True
    kwargs = limits.batch_limits()
    # One account each: fence + outbox + (outcome + account) * 49 = 100 operations exactly.
    ready = [_assessment(f"r{i}", [f"a{i}"]) for i in range(200)]
    batches = plan_batches(ready, **kwargs)
    assert [len(b) for b in batches][:4] == [49, 49, 49, 49]
    assert all(2 + 2 * len(b) <= MAX_TRANSACTION_OPERATIONS for b in batches)
    assert [len(b) for b in plan_batches(ready)][:2] == [49, 49]  # 1 + 2 * 49 = 99 without
    # Wide events: 50 legs of 128-character accounts shared by every request; the row's
    # character budget cuts the batch long before 100 operations.
    wide = [f"{i:03d}" + "x" * 125 for i in range(50)]
    ready = [_assessment(f"w{i}", wide) for i in range(60)]
    bound = event_size_bound("w0", ready[0].legs)
    batches = plan_batches(ready, **kwargs)
    assert all(len(b) * bound <= MAX_ROW_CHARACTERS for b in batches)
    assert len(batches[0]) == MAX_ROW_CHARACTERS // bound
    assert 2 + len(batches[0]) + len(wide) < MAX_TRANSACTION_OPERATIONS  # room left in ops
    # The actual events stay under their bound, and the row splits them over properties.
    events = [outcome_event(Outcome(a.request_id, OutcomeStatus.COMMITTED, "", a.legs),
                            7, "2024-01-01T00:00:00+00:00") for a in batches[0]]
    entity = outbox_entity("ledger", "outbox:1", events)
    chunks = [k for k in entity if k.startswith("events")]
    assert len(chunks) > 1
    assert all(len(entity[k]) <= CHUNK_CHARACTERS for k in chunks)
    assert [json.loads(b) for b in events_of(entity)] == events


# --- scenarios against Azurite -------------------------------------------------------------------
@pytest.fixture(params=SHARD_COUNTS, ids=lambda k: f"K{k}")
def shards(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_killed_between_the_commit_and_the_publish(ns: Namespace, shards: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_with(ns, shards)
    funding, rest, ids, incomplete = workload("kill")
    send(app, *funding)
    landed = Publisher.landed
    crashes = {"left": 3}

    def crash_after_commit(self: Publisher, result: Any) -> None:
        if crashes["left"] > 0 and getattr(result, "outbox", None):
            crashes["left"] -= 1
            raise RuntimeError("killed between the commit and the publish")
        landed(self, result)

    monkeypatch.setattr(Publisher, "landed", crash_after_commit)
    send(app, *rest)
    settle(app, ids, incomplete)
    assert crashes["left"] == 0, "the crash hook never fired"
    flush_outbox(app, monkeypatch)
    bodies = take_events(app)
    counts = check(app, bodies, ids)
    assert incomplete not in counts
    assert len(counts) == len(ids) - 1


def test_a_send_whose_answer_is_lost_is_sent_again_with_the_same_body(
        ns: Namespace, shards: int, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(ns.env(LEDGER_SHARDS=str(shards)), instance_id="lossy")
    plan = FaultPlan(TableNames.of(config), seed=3)
    clients = clients_from_connection_string(ns.connection_string,
                                             config.storage_timeout_seconds,
                                             transport_factory=plan.transport)
    app = LedgerApp.create(config, clients)
    app.ensure_resources()
    funding, rest, ids, incomplete = workload("lost")
    send(app, *funding)
    # The queue's sends (events; lease alarms alike) land, and the answer is lost: the SDK
    # sends again, so the queue holds the event twice.
    plan.add(Fault.LOSE_RESPONSE, kinds=[CallKind.QUEUE_SEND], probability=0.5, times=12)
    send(app, *rest)
    settle(app, ids, incomplete)
    plan.clear()
    flush_outbox(app, monkeypatch)
    bodies = take_events(app)
    assert plan.injected[f"{CallKind.QUEUE_SEND}:{Fault.LOSE_RESPONSE}"] > 0
    counts = check(app, bodies, ids)
    assert len(counts) == len(ids) - 1
    assert len(bodies) > len(ids) - 1 or max(counts.values()) == 1


def test_the_lease_broken_while_publishing(ns: Namespace, shards: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_with(ns, shards)
    funding, rest, ids, incomplete = workload("broken")
    send(app, *funding)
    broken = {"done": False}

    def break_leases(key: str, body: str) -> None:
        if broken["done"]:
            return
        broken["done"] = True
        for k in range(shards):
            blob = app.clients.blob.get_blob_client(app.config.lease_container,
                                                    lease_blob_name(app.config.lease_blob, k))
            with contextlib.suppress(Exception):  # a shard whose lease nobody holds
                BlobLeaseClient(blob).break_lease(lease_break_period=0)

    monkeypatch.setattr(outbox_module, "before_send", break_leases)
    send(app, *rest)
    other = app_with(ns, shards)  # another instance takes over what is left
    settle(other, ids, incomplete)
    assert broken["done"]
    monkeypatch.setattr(outbox_module, "before_send", None)
    flush_outbox(other, monkeypatch)
    counts = check(other, take_events(other), ids)
    assert len(counts) == len(ids) - 1


def test_the_outbox_at_the_100_operation_limit_and_past_64_kib(
        ns: Namespace, shards: int, monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_with(ns, shards)
    # 49 deposits on 49 accounts (with K = 4, on one shard and homed there), recorded before
    # any leader runs: one transaction of fence + outbox + 98 rows (K = 4: claims cut it).
    accounts = accounts_on(shards, 0, 49, "full")
    ids = [f"full-{a}" for a in accounts]
    record(app, *(body for a, r in zip(accounts, ids, strict=True)
                  for body in deposit(r, a, "2.00")))
    # Ten requests of 50 add legs on 128-character accounts: ~9,600 characters per event, a
    # row of ~96,000 characters, split over properties of 30,000.
    wide = accounts_on(shards, 0, 50, "wide", width=128)
    shard_map = ShardMap(shards)
    wide_ids = list(itertools.islice((f"wide-{i}" for i in itertools.count()
                                      if shard_map.home_of(f"wide-{i}", 50, "") == 0), 10))
    record(app, *(step(r, f"{r}-{n}", Operation.ADD_FUNDS, account, "1.00", 50)
                  for r in wide_ids for n, account in enumerate(wide)))
    sizes: list[int] = []
    real_stage = Publisher.stage

    def measured(self: Publisher, *args: Any, **kwargs: Any) -> Any:
        writes = real_stage(self, *args, **kwargs)
        for _, write in writes:
            sizes.append(sum(len(v) for k, v in write.entity.items() if k.startswith("events")))
        return writes

    monkeypatch.setattr(Publisher, "stage", measured)
    run_election(app)
    every = ids + wide_ids
    assert all(api_status(app, r) == "committed" for r in every)
    assert max(sizes) > 64 * 1024 // 2, "no outbox row past one property's 32K characters"
    # Rows of more than INLINE_EVENTS events were handed off: any instance's wake_up sends them.
    assert take_events(app) == [], "the leader sent none of a big row's events itself"
    assert run_publishers(app) >= 2
    counts = check(app, take_events(app), every)
    assert set(counts) == set(every)


@pytest.mark.parametrize("lost", [False, True], ids=["handed-off", "hand-off-lost"])
def test_a_busy_leaders_rows_are_handed_off_and_a_lost_hand_off_is_sent_later(
        ns: Namespace, lost: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A leader with a backlog writes rows of many events; it sends one hand-off message per row
    # instead of the events (it is the one process of its shard that cannot scale out). A
    # hand-off message that is lost leaves the row to the next look once it is 10 s old.
    app = app_with(ns, 1)
    ids = [f"busy-{i}" for i in range(30)]
    record(app, *(body for i, r in enumerate(ids) for body in deposit(r, f"busy-{i}", "3.00")))
    run_election(app)
    assert all(api_status(app, r) == "committed" for r in ids)
    assert take_events(app) == []
    [row] = store(app).read()[0]
    assert row.handed_off
    if lost:
        while got := app.wakeup_queue.receive(max_messages=32, visibility_timeout=60):
            for message in got:
                app.wakeup_queue.delete(message.handle)
        assert outbox_module.publish_remaining(app) == 0, "young: its publisher may still come"
        monkeypatch.setattr(outbox_module, "HANDED_OFF_GRACE_SECONDS", 0.0)
        assert outbox_module.publish_remaining(app) == 1
    else:
        assert run_publishers(app) == 1
    check(app, take_events(app), ids)
    # The host delivering the hand-off again (its deletion's answer lost): the row is gone,
    # nothing is sent twice.
    handle_wakeup(app, publish_body(0, row.key).encode())
    assert take_events(app) == []


def test_events_off_writes_no_outbox_row_and_sends_nothing(ns: Namespace) -> None:
    app = app_with(ns, 1, OUTCOME_EVENTS="false")
    funding, rest, ids, incomplete = workload("off")
    send(app, *funding, *rest)
    assert all(api_status(app, r) in FINAL for r in ids if r != incomplete)
    assert store(app).read()[0] == []
    assert take_events(app) == []


def test_a_late_contradiction_gets_an_event_of_its_own(ns: Namespace) -> None:
    app = app_with(ns, 1)
    send(app, *deposit("late-1", "late-acct", "5.00"))
    # The same step again with another amount: it contradicts the commit and is parked.
    send(app, *deposit("late-1", "late-acct", "6.00"))
    run_election(app)
    bodies = [json.loads(b) for b in take_events(app)]
    kinds = sorted(b["type"] for b in bodies)
    assert kinds == ["contradiction", "outcome"], bodies
    contradiction = next(b for b in bodies if b["type"] == "contradiction")
    assert contradiction["eventId"] == f"late-1:contradiction:{contradiction['parkedId']}"
    assert contradiction["status"] == "committed"
    assert app.parking.count_by_kind()["late-contradiction"] == 1
    assert depth(app).rows == 0


def test_the_cli_tails_events_and_status_shows_the_outbox(ns: Namespace) -> None:
    app = app_with(ns, 1)
    send(app, *deposit("tail-1", "tail-acct", "3.00"))
    out = io.StringIO()
    assert cli.main(["outcomes", "tail", "--json", "--once"], environ=ns.env(), stdout=out,
                    stderr=io.StringIO()) == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["requestId"], e["status"]) for e in events] == [("tail-1", "committed")]
    # It peeks: the event is still there for upstream.
    assert len(take_events(app)) == 1
    out = io.StringIO()
    assert cli.main(["status", "--json"], environ=ns.env(), stdout=out,
                    stderr=io.StringIO()) == 0
    assert json.loads(out.getvalue())["outbox"]["rows"] == 0


def test_a_row_left_behind_shows_in_the_outbox_depth_until_the_sweeper_sends_it(
        ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_with(ns, 1)
    send(app, *deposit("left-1", "left-acct", "3.00"))
    [event] = [json.loads(b) for b in take_events(app)]
    store(app).create_once("outbox:000000000001:left", [event])  # as a crashed leader leaves it
    found = depth(app)
    assert (found.rows, found.events) == (1, 1)
    assert 0 <= found.oldest_age_seconds < 120
    sweeper.sweep(app)  # the row is younger than the sweeper's grace: left to its leader
    assert depth(app).rows == 1
    flush_outbox(app, monkeypatch)
    assert depth(app).rows == 0
    assert [json.loads(b) for b in take_events(app)] == [event]  # the same body again


def test_a_child_forked_after_publishing_started_has_publishers_of_its_own() -> None:
    """A process forked with the pool running (the bench's load generators) inherits the pool
    but not its threads: its sends must still run, not wait out ``WAIT_SECONDS``."""
    pool = outbox_module._executor()
    everyone = threading.Barrier(outbox_module.PUBLISHERS + 1)  # every thread of it started
    started = [pool.submit(everyone.wait, 5) for _ in range(outbox_module.PUBLISHERS)]
    everyone.wait(5)
    assert [f.result(timeout=5) is not None for f in started] == [True] * len(started)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one publish job, answered through the pipe
        ok = outbox_module.wait_all([outbox_module._executor().submit(lambda: True)], 5)
        os.write(write, b"1" if ok == [True] else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_a_reshard_sends_every_outbox_row_first(ns: Namespace) -> None:
    # Rows stay in the partition that wrote them, and nobody reads the partition of a shard a
    # reshard removes: the reshard sends every row first, handed-off ones included (here the
    # hand-off message was lost).
    app = app_with(ns, 4)
    accounts = accounts_on(4, 3, 12, "rs")
    ids = [f"rs-{account}" for account in accounts]
    record(app, *(body for account, request_id in zip(accounts, ids, strict=True)
                  for body in deposit(request_id, account, "1.00")))
    run_election(app.on(3))
    while got := app.wakeup_queue.receive(max_messages=32, visibility_timeout=60):
        for message in got:
            app.wakeup_queue.delete(message.handle)
    removed = app.topology.ledger_of(3)
    left = OutboxStore(removed.table, removed.partition)
    assert [row.handed_off for row in left.read()[0]] == [True]
    reshard(app_with(ns, 4), 2)
    assert left.read()[0] == [], "the removed shard's outbox was sent"
    check(app_with(ns, 2), take_events(app), ids)
