"""The whole app on the in-memory fakes (``tests/fakes/app.py``): no Azurite, a fake clock.

A deposit, a transfer, a follower that skips its attempt while a leader works and the leader's
final look that commits what the follower left, a request that expires when the fake clock
passes its deadline, and a transfer across shards (``memory_app(shards=3)``): each in
milliseconds.
"""

from __future__ import annotations

import itertools
import time
from decimal import Decimal

from shared.domain.exchange import APPLIED_PREFIX, FLIGHT_PREFIX
from shared.domain.sharding import ShardMap
from shared.election.elector import ElectionCallbacks, LeaseState
from shared.leadership.elections import Role
from shared.leadership.intake import handle_completion
from tests.fakes import FakeClock
from tests.fakes.app import MemoryStorage, memory_app
from tests.helpers import balance, deposit, send, status, sweep_now, transfer


def test_a_deposit_and_a_transfer_commit() -> None:
    started = time.monotonic()
    app = memory_app()
    app.ensure_resources()
    results = send(app, *deposit("d1", "alice", "10.00"), *transfer("t1", "alice", "bob", "4.00"))
    assert results[-1].election is not None
    assert results[-1].election.role is Role.LEADER
    assert status(app, "d1") == status(app, "t1") == "committed"
    assert balance(app, "alice") == Decimal("6.00")
    assert balance(app, "bob") == Decimal("4.00")
    assert app.cleaner.wait_until_done(timeout=5)
    assert app.completions.count() == 0, "the consumed rows are gone"
    assert time.monotonic() - started < 5


def test_a_follower_exits_early_and_the_leaders_final_look_commits_its_work() -> None:
    clock = FakeClock()
    storage = MemoryStorage(clock)
    follower = memory_app(storage=storage, instance_id="follower")
    roles: list[Role | None] = []

    def deliver(body: bytes) -> None:
        result = handle_completion(follower, body, message_id=body.decode()[:40])
        roles.append(result.election.role if result.election else None)

    released: list[bool] = []
    leader = memory_app(storage=storage, instance_id="leader", callbacks=ElectionCallbacks(
        # While the leader holds the lease: the follower is refused and opens its window.
        on_started_leading=lambda _id: None if roles else deliver(deposit("f1", "bob", "1.00")[0]),
        on_stopped_leading=lambda _id, state: released.append(state is LeaseState.RELEASED)))
    leader.ensure_resources()
    for app in (leader, follower):
        app.elector.skip_seconds = 2.0
    scan = leader.completions.ready

    def scan_then_deliver(*args: object, **kwargs: object) -> object:
        answer = scan(*args, **kwargs)  # type: ignore[arg-type]
        if released and len(roles) == 1:
            # After the leader released and looked once, inside the follower's window.
            deliver(deposit("f2", "bob", "2.00")[0])
        return answer

    leader.completions.ready = scan_then_deliver  # type: ignore[assignment,method-assign]
    started = clock.monotonic()
    send(leader, *deposit("d1", "alice", "1.00"))
    assert roles == [Role.FOLLOWER, Role.FOLLOWER]
    assert follower.elector.skipped == 1, "the follower skipped its attempt and exited"
    # No further message and no sweeper: the leader's final look, skip_seconds after its
    # release (fake time: slept at once), found f2 and committed it.
    assert [status(leader, r) for r in ("d1", "f1", "f2")] == ["committed"] * 3
    assert balance(leader, "bob") == Decimal("3.00")
    assert clock.monotonic() - started >= 2.0, "the final look waited out the window"


def test_a_request_expires_when_the_fake_clock_passes_its_deadline() -> None:
    clock = FakeClock()
    app = memory_app(clock, REQUEST_TIMEOUT_SECONDS="2")
    app.ensure_resources()
    send(app, *deposit("d1", "alice", "10.00"))
    withdraw, add = transfer("t1", "alice", "bob", "4.00")
    send(app, withdraw)
    assert status(app, "t1") is None, "waiting for its other step"
    clock.advance(10)  # past the deadline and its grace
    sweep_now(app)
    assert status(app, "t1") == "expired"
    send(app, add)  # the late step changes nothing
    assert status(app, "t1") == "expired"
    assert balance(app, "alice") == Decimal("10.00")
    assert balance(app, "bob") == Decimal("0.00")
    assert app.cleaner.wait_until_done(timeout=5)
    assert app.completions.count() == 0


def test_a_transfer_across_three_shards_commits_end_to_end_in_memory() -> None:
    """Alice on shard 1 pays bob on shard 2; the request is homed on shard 0. The queue
    trigger's election alone (no sweep) coordinates, votes, decides and applies it."""
    started = time.monotonic()
    shard_map = ShardMap(3)

    def on(shard: int, prefix: str, steps: int) -> str:
        return next(f"{prefix}{i}" for i in itertools.count()
                    if shard_map.home_of(f"{prefix}{i}", steps, f"{prefix}{i}") == shard)

    alice, bob, rid = on(1, "alice-", 1), on(2, "bob-", 1), on(0, "t-", 2)
    app = memory_app(shards=3)
    app.ensure_resources()
    assert [s.ledger.partition for s in app.shards] == ["ledger", "ledger-1", "ledger-2"]
    send(app, *deposit("fund", alice, "50.00"), *transfer(rid, alice, bob, "20.25"))
    decided = app.on(0).ledger.read_outcome(rid)
    assert decided is not None
    assert (decided.outcome.status, decided.outcome.shards, decided.settled) == (
        "committed", (1, 2), True)
    assert balance(app, alice) == Decimal("29.75")
    assert balance(app, bob) == Decimal("20.25")
    for shard in app.each_shard():
        assert shard.ledger.list_rows(FLIGHT_PREFIX) == [], f"work left on {shard.current}"
        assert all(row.reserved == 0 for row in shard.ledger.list_accounts().values())
        assert shard.cleaner.wait_until_done(timeout=5)
        assert shard.completions.count() == 0
    assert [s.current for s in app.each_shard()
            if s.ledger.list_rows(APPLIED_PREFIX)] == [1, 2], "applied where its legs are"
    assert app.storage.shard_lease(app.config.lease_blob, 2).calls, "shard 2's own lease"
    assert time.monotonic() - started < 5
