"""The chaos run (simulator/chaos.py), its checks, and what it found.

``test_the_chaos_run_loses_nothing_and_applies_nothing_twice`` is the issue's chaos run in
test form on one shard: real instance processes on an on-disk Azurite that is restarted mid-run,
leaders killed mid-drain, leases broken, a leader paused past its lease, storage faults on every
instance, checked against the workload alone. ``..._across_four_shards`` is a short run with
K = 4 shards: leaders also killed before or after each step of the cross-shard protocol, every
shard's lease broken, the independent checker (``simulator/checker.py``) judging the ledger
partitions during the run and at the end. The other tests show that the checks and the workload
can fail (no test that cannot fail), and reproduce, deterministically, the two production bugs
the K = 4 runs found.
"""

from __future__ import annotations

import io
import itertools
import json
from decimal import Decimal
from pathlib import Path

import pytest

from shared.config.settings import load_config
from shared.domain.exchange import (
    FLIGHT_PREFIX,
    Coordination,
    ExchangeBatch,
    MessageKind,
    ShardMessage,
)
from shared.domain.model import AccountRow, DecidedOutcome, Fence, Outcome, OutcomeStatus
from shared.domain.planning import MAX_TRANSACTION_OPERATIONS, plan_transaction
from shared.domain.sharding import ShardMap
from shared.leadership.elections import Election, run_election
from shared.leadership.instance import LedgerApp
from shared.storage.clients import clients_from_connection_string
from simulator import __main__ as sim
from simulator.azurite import Azurite
from simulator.chaos import (
    ChaosOptions,
    ChaosRun,
    fault_spec,
    plan_schedule,
    replay_command,
    report,
)
from simulator.cluster import Cluster
from simulator.faults import (
    CallKind,
    FaultPlan,
    Step,
    TableNames,
    When,
    classify,
    ledger_writes,
    protocol_steps,
    shard_of_partition,
)
from simulator.workload import ChaosWorkload, check_chaos, generate_chaos
from tests.helpers import (
    Namespace,
    balance,
    deposit,
    record,
    send,
    status,
    step,
    transfer,
    wait_until,
)

# The test's run: 1,200 requests, every kind of fault at least as often as `./dev chaos` makes
# it. It uses 12 instances rather than 16 and fewer requests to stay inside 4 minutes on a
# 2-core CI machine; `./dev chaos` runs 16 instances and 2,000 requests by default.
TEST_RUN = ChaosOptions(seed=2026, instances=12, requests=1200, shards=1, leader_kills=5,
                        random_kills=2, breaks=5, pauses=1, storage_restarts=1, timeout=270)
# The K = 4 run: 200 requests fed over 45 s (so that requests are still being coordinated when
# the coordinate step's leader is to be killed) through 6 instances, a leader killed at each
# protocol step, every shard's lease broken once, a leader paused, storage restarted; sized to
# finish in about two minutes on a 2-core machine (late duplicates close behind their
# originals and a 90 s request timeout keep the tail short; 30 s let a step that the loaded CI
# machine delivered late expire its request). Kills mid-drain and at random are the run above's.
SHARDED_RUN = ChaosOptions(seed=2027, instances=6, requests=200, shards=4, minutes=0.75,
                           leader_kills=0, random_kills=0, step_kills=6, breaks=4, pauses=1,
                           storage_restarts=1, request_timeout=90, duplicate_spread=60,
                           timeout=270)


@pytest.mark.slow
def test_the_chaos_run_loses_nothing_and_applies_nothing_twice() -> None:
    out = io.StringIO()
    figures = ChaosRun(TEST_RUN, out).run()
    report(figures, out)
    text = out.getvalue()
    print(text)  # the schedule, the seed and the figures (shown with -s, or on failure)
    assert figures.problems == [], text
    assert figures.requests >= 1250, text
    assert figures.leader_kills >= 5, text
    assert figures.breaks_while_leading >= 5, text
    assert figures.pauses_resumed_after_another_commit >= 1, text
    assert figures.storage_restarts >= 1, text
    assert figures.takeovers >= 5, text
    assert sum(n for k, n in figures.faults.items() if k.endswith(":latency")) > 0, text
    assert figures.check is not None, text
    assert figures.check.drift == Decimal("0.00"), text
    assert f"seed {TEST_RUN.seed}" in text


@pytest.mark.slow
def test_the_chaos_run_loses_nothing_and_applies_nothing_twice_across_four_shards() -> None:
    out = io.StringIO()
    figures = ChaosRun(SHARDED_RUN, out).run()
    report(figures, out)
    text = out.getvalue()
    print(text)
    assert figures.problems == [], text
    assert figures.verdict is not None, text
    assert figures.verdict.line() == "0 lost, 0 double-applied, 0 partial requests, 0 drift", text
    assert figures.check is not None, text
    assert figures.check.drift == Decimal("0.00"), text
    # Every protocol step had a leader killed right before or after it.
    assert {kind.split("/")[0] for kind in figures.step_kills} == {str(s) for s in Step}, text
    assert figures.breaks_by_shard.keys() == {0, 1, 2, 3}, text
    assert figures.breaks_while_leading >= 4, text
    assert figures.pauses_resumed_after_another_commit >= 1, text
    assert figures.storage_restarts >= 1, text
    assert figures.invariant_checks >= 3, text  # the checker looked during the run too
    # Order-dependent outcomes happened: some withdrawals from the thin accounts were refused.
    assert figures.verdict.outcomes["rejected"] >= 1, text
    assert figures.verdict.outcomes["committed"] >= 200, text


def test_the_schedule_and_the_faults_replay_from_the_seed() -> None:
    options = ChaosOptions(seed=5)
    assert plan_schedule(options) == plan_schedule(ChaosOptions(seed=5))
    assert plan_schedule(options) != plan_schedule(ChaosOptions(seed=6))
    actions = [action for _, action in plan_schedule(options)]
    assert actions.count("kill_leader") == 5
    assert actions.count("break_lease") == 5
    assert actions.count("pause_leader") == 1
    assert actions.count("restart_storage") == 1
    assert json.loads(fault_spec(options))["seed"] == 5
    assert generate_chaos(5, requests=50).messages == generate_chaos(5, requests=50).messages


@pytest.mark.parametrize("options", [TEST_RUN, SHARDED_RUN, ChaosOptions(seed=9, minutes=3)],
                         ids=["one-shard", "four-shards", "three-minutes"])
def test_the_printed_replay_command_runs_the_same_options(options: ChaosOptions) -> None:
    argv = replay_command(options).split()[1:]  # after ./dev
    assert sim._chaos_options(sim.build_parser().parse_args(argv)) == options


def test_every_protocol_step_has_a_leader_killed_before_or_after_it() -> None:
    kills = [a for _, a in plan_schedule(SHARDED_RUN) if a.startswith("kill_at:")]
    assert len(kills) == 6
    assert {a.split(":")[1] for a in kills} == {str(s) for s in Step}
    full = [a for _, a in plan_schedule(ChaosOptions(seed=5)) if a.startswith("kill_at:")]
    assert sorted(full) == sorted(f"kill_at:{s}:{w}" for s in Step for w in When)
    assert not [a for _, a in plan_schedule(TEST_RUN) if a.startswith("kill_at:")], \
        "one shard has no cross-shard protocol"
    assert json.loads(fault_spec(SHARDED_RUN, "/tmp/x"))["crash_dir"] == "/tmp/x"


def test_the_sharded_workload_spans_shards_and_must_refuse_some_withdrawals() -> None:
    shards = ShardMap(4)
    work = generate_chaos(11, accounts=50, requests=2000, shards=4, deposit_ratio=0.05,
                          tight_accounts=4, overdraft_ratio=0.06)
    requests = list(work.requests.values())
    multi = [r for r in requests if len(r.legs) > 2 and not r.may_reject]
    assert multi
    assert all(len({shards.account_shard(a) for a, _ in r.legs}) >= 3 for r in multi)
    crossing = [r for r in requests if len({shards.account_shard(a) for a, _ in r.legs}) > 1]
    assert len(crossing) > 0.6 * len(requests)
    assert 50 < sum(len(r.legs) == 1 for r in requests) < 150  # deposits under chaos
    tight = [a for a in work.funding if a.startswith("tight-")]
    assert sorted(shards.account_shard(a) for a in tight) == [0, 1, 2, 3]
    for account in tight:  # withdrawn more than funded, whatever the order: some are refused
        withdrawn = sum(-m for r in requests if not r.failed for a, m in r.legs if a == account)
        assert withdrawn > work.funding[account]
        assert all(r.may_reject for r in requests if any(a == account for a, _ in r.legs))
    assert any(len(r.legs) == 3 and len({shards.account_shard(a) for a, _ in r.legs}) == 3
               for r in requests if r.may_reject)
    # The others are funded whatever the order, as with one shard.
    withdrawn_ok: dict[str, Decimal] = {}
    for request in requests:
        if not request.failed and not request.may_reject:
            for account, amount in request.legs:
                if amount < 0:
                    withdrawn_ok[account] = withdrawn_ok.get(account, Decimal(0)) - amount
    assert all(withdrawn_ok.get(a, 0) <= funded for a, funded in work.funding.items())


def test_the_chaos_workload_funds_every_withdrawal_whatever_the_order() -> None:
    work = generate_chaos(9, accounts=50, requests=2000)
    assert len(work.requests) == 2000
    legs = [len(r.legs) for r in work.requests.values()]
    assert legs.count(2) > 1500
    assert 100 < sum(n >= 3 for n in legs) < 400
    assert max(legs) <= 5
    assert all(sum(amount for _, amount in r.legs) == 0 for r in work.requests.values())
    # Worst case for every account: all its withdrawals commit before any deposit into it.
    withdrawn: dict[str, Decimal] = {}
    for request in work.requests.values():
        if not request.failed:
            for account, amount in request.legs:
                if amount < 0:
                    withdrawn[account] = withdrawn.get(account, Decimal(0)) - amount
    assert all(withdrawn.get(a, 0) <= funded for a, funded in work.funding.items())
    steps = sum(legs)
    assert 0.08 * steps < work.duplicates < 0.12 * steps
    assert 0.015 * len(work.messages) < len(work.malformed) < 0.025 * len(work.messages)
    assert 0 < sum(r.failed for r in work.requests.values()) < 150
    # Out of order: some request's last leg is sent before its first.
    position = {json.loads(m)["operationId"]: i for i, m in enumerate(work.messages)
                if m not in work.malformed}
    assert any(position[f"{r}-{len(p.legs) - 1}"] < position[f"{r}-0"]
               for r, p in work.requests.items())


def _decided(work: ChaosWorkload) -> list[DecidedOutcome]:
    rows = [Outcome(f"fund-{a}", OutcomeStatus.COMMITTED, "", ((a, amount),))
            for a, amount in work.funding.items()]
    rows += [Outcome(r, OutcomeStatus(p.expected_status), "", () if p.failed else p.legs)
             for r, p in work.requests.items()]
    return [DecidedOutcome(o, "", 1, "x", True) for o in rows]


def test_the_checker_accepts_the_right_end_state_and_catches_each_wrong_one() -> None:
    work = generate_chaos(3, accounts=6, requests=40)
    decided = _decided(work)
    balances = work.expected_balances()
    parked = [("malformed", body.encode(), "a reason") for body in work.malformed]
    assert check_chaos(work, decided, balances, parked, [], 0).problems == []

    def problems(**changes: object) -> list[str]:
        args: dict[str, object] = {"decided": decided, "balances": balances, "parked": parked,
                                   "poisoned": [], "completion_rows": 0, **changes}
        return check_chaos(work, **args).problems  # type: ignore[arg-type]

    first = next(iter(work.requests))
    assert any("more than once" in p for p in problems(decided=[*decided, decided[-1]]))
    assert any("no outcome" in p for p in problems(decided=decided[1:]))
    flipped = [DecidedOutcome(Outcome(d.outcome.request_id, OutcomeStatus.EXPIRED, "", ()), "", 1,
                              "x", True) if d.outcome.request_id == first else d for d in decided]
    assert any("wrong outcome" in p for p in problems(decided=flipped))
    account = next(iter(balances))
    off = dict(balances, **{account: balances[account] + Decimal("0.01")})
    assert any(account in p for p in problems(balances=off))
    assert any("malformed" in p for p in problems(parked=parked[1:]))
    assert any("without a reason" in p
               for p in problems(parked=[(k, b, "") for k, b, _ in parked]))
    valid = json.dumps({"requestId": first})
    assert any("poison" in p for p in problems(poisoned=[valid]))
    assert any("left behind" in p for p in problems(completion_rows=1))


def test_the_workload_check_allows_a_refusal_only_where_order_decides() -> None:
    work = generate_chaos(3, accounts=6, requests=40, shards=4, tight_accounts=2,
                          overdraft_ratio=0.3)
    thin = next(r for r, p in work.requests.items() if p.may_reject and not p.failed)
    plain = next(r for r, p in work.requests.items() if not p.may_reject and not p.failed)
    parked = [("malformed", body.encode(), "a reason") for body in work.malformed]

    def refusing(request_id: str, reason: str) -> list[DecidedOutcome]:
        return [DecidedOutcome(Outcome(request_id, OutcomeStatus.REJECTED, reason, ()), "", 1,
                               "x", True) if d.outcome.request_id == request_id else d
                for d in _decided(work)]

    refused = refusing(thin, "insufficient funds: account tight-00 would go to -1.00")
    balances = work.expected_balances({d.outcome.request_id for d in refused
                                       if d.outcome.status == "committed"})
    assert check_chaos(work, refused, balances, parked, [], 0).problems == []
    assert any("rejected for another reason" in p for p in check_chaos(
        work, refusing(thin, "no reason"), balances, parked, [], 0).problems)
    assert any("wrong outcome" in p for p in check_chaos(
        work, refusing(plain, "insufficient funds: x"), balances, parked, [], 0).problems)
    # A refused withdrawal's legs must not be in the balances.
    assert any("the workload says" in p for p in check_chaos(
        work, refused, work.expected_balances({thin} | set(work.requests)), parked, [],
        0).problems)


def test_the_transport_tells_every_protocol_step_from_the_sdk_requests(ns: Namespace) -> None:
    config = load_config(ns.env(LEDGER_SHARDS="4"), instance_id="steps")
    plan = FaultPlan(TableNames.of(config))
    app = LedgerApp.create(config, clients_from_connection_string(
        ns.connection_string, config.storage_timeout_seconds, transport_factory=plan.transport))
    app.ensure_resources()
    shards = ShardMap(4)
    a, b, c = (next(f"{p}-{i}" for i in itertools.count()
                    if shards.account_shard(f"{p}-{i}") == k) for p, k in (("a", 1), ("b", 2),
                                                                        ("c", 3)))
    rid = next(f"r-{i}" for i in itertools.count() if shards.home_of(f"r-{i}", 3, "") == 0)
    send(app, *deposit("fund-a", a, "10.00"), *deposit("fund-b", b, "10.00"))
    assert not plan.steps, "a deposit on its account's shard is no cross-shard step"
    send(app, step(rid, "w1", "withdraw_funds", a, "4.00", 3),
         step(rid, "w2", "withdraw_funds", b, "6.00", 3),
         step(rid, "add", "add_funds", c, "10.00", 3))
    wait_until(lambda: any(run_election(s) for s in app.each_shard())
               and plan.steps[str(Step.SETTLE)] > 0, 30, "the request settled")
    assert plan.steps.keys() == {str(s) for s in Step}, plan.steps
    assert plan.steps[str(Step.COORDINATE)] == 1
    assert plan.steps[str(Step.VOTE)] == 2  # shards 1 and 2 hold a debit
    assert plan.steps[str(Step.APPLY)] == 3  # every shard with a leg but home 0
    assert plan.calls[CallKind.DELIVER] >= 7  # 2 prepare, 2 vote, 3 decision, 3 ack (batched)
    assert plan.calls[CallKind.RECORD] >= 5, "shard k's completions table is a completions table"


def test_protocol_steps_of_hand_made_requests() -> None:
    names = TableNames("c", "ledger", "p")
    base = "http://h/acct"

    def batch(*ops: tuple[str, str, str]) -> str:
        parts = []
        for method, partition, key in ops:
            if method == "POST":
                parts.append(f"POST {base}/ledger HTTP/1.1\r\nContent-Type: application/json"
                             f"\r\n\r\n{json.dumps({'PartitionKey': partition, 'RowKey': key})}")
            else:
                quoted = key.replace(":", "%3A").replace("|", "%7C")
                parts.append(f"{method} {base}/ledger(PartitionKey='{partition}',"
                             f"RowKey='{quoted}') HTTP/1.1\r\n\r\n")
        return "--changeset\r\n" + "\r\n--changeset\r\n".join(parts)

    def steps(*ops: tuple[str, str, str]) -> set[str]:
        return {str(s) for s in protocol_steps(ledger_writes("POST", f"{base}/$batch",
                                                             batch(*ops), names))}

    fence = ("PUT", "ledger-1", "fence")
    assert steps(fence, ("POST", "ledger-1", "request:r"), ("PUT", "ledger-1", "account:a")) \
        == set(), "a commit on one shard"
    assert steps(fence, ("POST", "ledger-1", "request:r"), ("POST", "ledger-1", "claim:r"),
                 ("PUT", "ledger-1", "account:a")) == set(), "a claiming commit on one shard"
    assert steps(fence, ("POST", "ledger-1", "claim:r"),
                 ("POST", "ledger-1", "flight:coord:r")) == {"coordinate"}
    assert steps(fence, ("POST", "ledger-2", "flight:escrow:r|a"), ("POST", "ledger-2", "vote:r"),
                 ("DELETE", "ledger-2", "flight:inbox:r|prepare|1")) == {"vote"}
    assert steps(fence, ("POST", "ledger-1", "request:r"),
                 ("DELETE", "ledger-1", "flight:inbox:r|vote|2")) == {"decide"}
    assert steps(fence, ("POST", "ledger-2", "applied:r"),
                 ("DELETE", "ledger-2", "flight:inbox:r|decision|1")) == {"apply"}
    assert steps(fence, ("PATCH", "ledger-1", "request:r"),
                 ("DELETE", "ledger-1", "flight:coord:r")) == {"settle"}
    assert steps(("POST", "ledger-3", "flight:inbox:r|prepare|1")) == {"send"}
    body = batch(("POST", "ledger-3", "flight:inbox:r|prepare|1"))
    assert classify("POST", f"{base}/$batch", {}, body, names) is CallKind.DELIVER
    assert classify("POST", f"{base}/ledger", {}, json.dumps(
        {"PartitionKey": "ledger-3", "RowKey": "flight:inbox:r|vote|2"}), names) is \
        CallKind.DELIVER
    assert names.is_completions("cshard12")
    assert not names.is_completions("cshardx")
    assert shard_of_partition("ledger") == 0
    assert shard_of_partition("ledger-3") == 3


# --- what the K = 4 chaos runs found (shared/ bugs, reported; these fail until fixed) ---------

def test_a_voter_whose_vote_was_lost_answers_the_prepare_sent_again(ns: Namespace) -> None:
    """A voter that voted, then died before its VOTE reached home (or whose commit's response
    was lost), gets PREPARE again from the home's resend. It must answer it again (its vote
    row says how); the transaction must not be refused at its own escrow row forever, which
    halts every cross-shard transaction of that shard (found by seed 7, step kill vote/after
    and lost commit responses)."""
    app = ns.app(LEDGER_SHARDS="4")
    shards = ShardMap(4)
    alice = next(f"a-{i}" for i in itertools.count() if shards.account_shard(f"a-{i}") == 1)
    bob = next(f"b-{i}" for i in itertools.count() if shards.account_shard(f"b-{i}") == 2)
    rid = next(f"t-{i}" for i in itertools.count() if shards.home_of(f"t-{i}", 2, "") == 0)
    send(app, *deposit("fund", alice, "10.00"))
    record(app, *transfer(rid, alice, bob, "4.00"))
    Election(app.on(0)).run(False)  # coordinates: PREPARE to shard 1
    Election(app.on(1)).run(False)  # reserves, votes yes, sends VOTE home
    home = app.on(0).ledger
    [vote] = home.list_rows(FLIGHT_PREFIX + "inbox:")
    home.table.delete(home.partition, vote["RowKey"])  # the VOTE never sent: its sender died

    def prepared_again() -> bool:
        Election(app.on(0)).run(False)
        return bool(app.on(1).ledger.list_rows(FLIGHT_PREFIX + "inbox:"))
    wait_until(prepared_again, 30, "the home to send PREPARE again (RESEND_SECONDS)")

    def settled() -> bool:
        for shard in app.each_shard():
            run_election(shard)
        return not any(s.ledger.list_rows(FLIGHT_PREFIX) for s in app.each_shard())
    wait_until(settled, 30, "the transfer settled: the voter answered the PREPARE again")
    assert (balance(app, alice), balance(app, bob)) == (Decimal("6.00"), Decimal("4.00"))


def test_a_transaction_of_cross_shard_work_stays_within_100_operations() -> None:
    """Votes that each decide a request: the batch must count the outcome rows it creates.
    Otherwise 21 such votes plan 106 operations, ``plan_transaction`` raises ``ValueError``
    on every term of that shard, and its cross-shard work halts (found by seed 7)."""
    shards = ShardMap(4)
    names = {k: (f"a-{i}" for i in itertools.count() if shards.account_shard(f"a-{i}") == k)
             for k in (0, 1)}
    coordinations, accounts, votes = {}, {}, []
    for n in range(40):
        payer, payee = next(names[1]), next(names[0])
        legs = ((payer, Decimal("-1.00")), (payee, Decimal("1.00")))
        rid = f"r{n:02d}"
        coordinations[rid] = Coordination(rid, 0, legs, {1: legs[:1]}, (1,), Outcome(
            rid, OutcomeStatus.COMMITTED, "", legs, 2, 2))
        accounts[payee] = AccountRow(payee, Decimal("0.00"), None)
        votes.append(ShardMessage(MessageKind.VOTE, rid, 1, 0, yes=True))
    batch = ExchangeBatch(0, "ledger", accounts, coordinations, {}, shards.account_shard)
    for vote in votes:  # as Exchange._plan fills one transaction
        if batch.handled and not batch.fits(batch.message_size(vote)):
            break
        batch.handle(vote)
    changed = batch.account_writes()
    plan = plan_transaction("ledger", Fence(1, "etag", "me", "now"), batch.outcomes,
                            {a: (row, new) for a, (row, new, _) in changed.items()}, "now",
                            batch.extra_writes(), {a: held for a, (_, _, held) in changed.items()})
    assert len(plan.writes) <= MAX_TRANSACTION_OPERATIONS


@pytest.mark.slow
def test_an_instance_keeps_listening_across_a_storage_restart(tmp_path: Path) -> None:
    with Azurite(in_memory=False, location=str(tmp_path)) as azurite:
        ns = Namespace(azurite.connection_string)
        app = ns.app()
        queue = app.queue()
        cluster = Cluster(ns.env(), instances=1, threads=1, sweep_seconds=None).start()
        try:
            queue.send(deposit("d1", "alice", "5.00")[0].decode())
            wait_until(lambda: status(app, "d1") == "committed", 60, "d1 committed")
            azurite.stop()
            wait_until(lambda: cluster.count("receive_failed") >= 1, 30,
                       "the instance to meet the storage outage")
            azurite.start()
            queue.send(deposit("d2", "alice", "7.00")[0].decode())
            wait_until(lambda: status(app, "d2") == "committed", 60,
                       "d2 committed by the same instance after the restart")
            assert cluster.alive() == [0]
            assert cluster.count("started") == 1, "the instance was not restarted"
        finally:
            cluster.stop()
        assert balance(app, "alice") == Decimal("12.00"), "d1 survived the restart on disk"
