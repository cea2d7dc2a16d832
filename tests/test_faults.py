"""Storage faults at the transport (simulator/faults.py) against a real Azurite.

For every write the app makes, a response lost *after* storage applied the write leaves the
ledger exact and the request decided once; 500/503 and timeouts on the lease blob and the ledger
partition slow the pipeline down without losing or stranding anything; and retries fit the
lease: a transient error costs a sub-second retry, hand-over and failover stay
within the lease plus a few seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from azure.core.exceptions import AzureError

from shared.config.settings import load_config
from shared.election.elector import HeldLease, LeadershipLost, LeaseState
from shared.errors import StorageError
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from shared.leadership.sweeper import repair_scan
from shared.leadership.term import LeaderTerm
from shared.storage.clients import clients_from_connection_string
from shared.storage.retries import LeaseFitRetry, fit_retries, worst_case_seconds
from simulator.faults import CallKind, Fault, FaultPlan, TableNames, classify
from tests.helpers import Namespace, balance, deposit, record, status, transfer, wait_until

SHORT_LEASE = {"LEASE_SECONDS": "15", "RENEW_INTERVAL_SECONDS": "5",
               "LEASE_SAFETY_MARGIN_SECONDS": "5"}


def faulty_app(ns: Namespace, overrides: dict[str, str] | None = None,
               seed: int = 0) -> tuple[LedgerApp, FaultPlan]:
    """An instance whose storage calls all go through a fault plan (no rule yet)."""
    config = load_config(ns.env(**(overrides or {})), instance_id=f"faulty-{uuid.uuid4().hex[:6]}")
    plan = FaultPlan(TableNames.of(config), seed=seed)
    clients = clients_from_connection_string(ns.connection_string,
                                             config.storage_timeout_seconds,
                                             transport_factory=plan.transport)
    app = LedgerApp.create(config, clients)
    app.ensure_resources()
    return app, plan


def deliver(app: LedgerApp, body: bytes, attempts: int = 5) -> None:
    """Deliver one message as the host does: an invocation that raises is retried."""
    message_id = uuid.uuid4().hex
    for count in range(1, attempts + 1):
        try:
            handle_completion(app, body, message_id, dequeue_count=count)
            return
        except (AzureError, StorageError):  # the SDK's, or the lease port's translation
            continue
    raise AssertionError(f"message {body!r} failed {attempts} times")


def settle(app: LedgerApp, timeout: float = 60) -> None:
    """Run the sweeper until the completions table is empty (faults stay on)."""
    def quiet() -> bool:
        try:
            run_election(app)
            return app.completions.count() == 0
        except (AzureError, StorageError):  # the SDK's, or the lease port's translation
            return False
    wait_until(quiet, timeout, "the sweeper to decide everything", interval=0.2)


def test_every_storage_call_is_named_by_what_it_does(ns: Namespace) -> None:
    app, plan = faulty_app(ns)
    plan.calls.clear()
    for body in [*deposit("d1", "alice", "10.00"), *transfer("t1", "alice", "bob", "4.00"),
                 b"not json"]:
        deliver(app, body)
    lease = app.elector.try_acquire()
    assert lease is not None
    lease.renew()
    lease.release()
    app.queue().send("x")
    app.queue(raw=True).receive()
    seen = {str(kind) for kind, n in plan.calls.items() if n}
    repair_scan(app, force=True)
    assert {"record", "request_read", "announce", "ready_read", "acquire", "scan",
            "fence_read", "claim", "account_read", "commit", "delete", "renew", "release",
            "park", "queue_send", "queue_receive"} <= seen | {
                str(kind) for kind, n in plan.calls.items() if n}
    assert "other" not in seen, "no call of the pipeline is left unnamed"
    names = TableNames("c", "l", "p")
    base = "http://127.0.0.1:1/devstoreaccount1"
    assert classify("DELETE", f"{base}/c(PartitionKey='r',RowKey='o')", {}, None,
                    names) is CallKind.DELETE
    assert classify("POST", f"{base}/$batch", {}, b"PUT /devstoreaccount1/l(Part", names) is (
        CallKind.COMMIT)
    assert classify("PUT", f"{base}/q/messages/1?popreceipt=x", {}, None, names) is (
        CallKind.QUEUE_UPDATE)


def _funded(ns: Namespace) -> LedgerApp:
    clean = ns.app("funder")
    for body in deposit("d-alice", "alice", "100.00") + deposit("d-bob", "bob", "50.00"):
        deliver(clean, body)
    assert balance(clean, "alice") == Decimal("100.00")
    return clean


LOST_WRITES = [CallKind.RECORD, CallKind.CLAIM, CallKind.COMMIT, CallKind.DELETE,
               CallKind.ACQUIRE, CallKind.RELEASE, CallKind.PARK]


@pytest.mark.parametrize("kind", LOST_WRITES, ids=str)
def test_a_write_whose_response_is_lost_after_it_landed_changes_nothing_twice(
        ns: Namespace, kind: CallKind) -> None:
    clean = _funded(ns)
    epoch_before = clean.ledger.read_fence().epoch  # type: ignore[union-attr]
    app, plan = faulty_app(ns)
    plan.add(Fault.LOSE_RESPONSE, [kind], times=1)
    for body in [*transfer("t1", "alice", "bob", "30.00"), b'{"requestId": 5}']:
        deliver(app, body)
    settle(app)
    assert plan.count(Fault.LOSE_RESPONSE, kind) == 1, f"the {kind} response was lost once"
    assert status(clean, "t1") == "committed"
    assert balance(clean, "alice") == Decimal("70.00")
    assert balance(clean, "bob") == Decimal("80.00")
    assert len(clean.ledger.list_outcomes()) == 3, "d-alice, d-bob and t1: one outcome each"
    assert clean.completions.count() == 0, "no completion row left behind"
    assert len(clean.parking.list()) == 1, "the malformed message is parked once"
    assert clean.ledger.read_fence().epoch > epoch_before  # type: ignore[union-attr]


def test_a_renewal_whose_response_is_lost_keeps_the_lease_and_the_commit_lands(
        ns: Namespace) -> None:
    clean = _funded(ns)
    app, plan = faulty_app(ns)
    record(app, *transfer("t1", "alice", "bob", "30.00"))
    lease = app.elector.try_acquire()
    assert lease is not None
    term = LeaderTerm.begin(app, lease)
    plan.add(Fault.LOSE_RESPONSE, [CallKind.RENEW], times=1)
    lease.renew()
    assert lease.state is LeaseState.LEADING
    term.commit_ready(budget_deadline=app.clock.monotonic() + 30)
    lease.release()
    assert plan.count(Fault.LOSE_RESPONSE, CallKind.RENEW) == 1
    assert status(clean, "t1") == "committed"
    assert balance(clean, "alice") == Decimal("70.00")
    assert balance(clean, "bob") == Decimal("80.00")


def test_throttling_on_the_lease_blob_and_the_ledger_slows_down_but_loses_nothing(
        ns: Namespace) -> None:
    clean = _funded(ns)
    lease_and_ledger = [CallKind.ACQUIRE, CallKind.RENEW, CallKind.RELEASE, CallKind.CLAIM,
                        CallKind.FENCE_READ, CallKind.ACCOUNT_READ, CallKind.COMMIT]
    instances = []
    for seed in range(3):
        # A release that fails all its tries leaves the lease to expire: 15 s, not 60.
        app, plan = faulty_app(ns, SHORT_LEASE, seed=seed)
        plan.add(Fault.STATUS, lease_and_ledger, probability=0.3, status=503)
        plan.add(Fault.STATUS, lease_and_ledger, probability=0.05, status=500)
        plan.add(Fault.TIMEOUT, lease_and_ledger, probability=0.05, seconds=0.3)
        plan.add(Fault.LATENCY, lease_and_ledger, probability=0.2, seconds=0.1)
        instances.append((app, plan))
    bodies = []
    for i in range(12):
        source, target = ("alice", "bob") if i % 2 else ("bob", "alice")
        bodies.extend(transfer(f"t{i}", source, target, f"{i + 1}.25"))
    errors: list[BaseException] = []

    def run(app: LedgerApp, mine: list[bytes]) -> None:
        try:
            for body in mine:
                deliver(app, body)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(app, bodies[i::3]))
               for i, (app, _) in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    settle(instances[0][0])
    injected = sum(plan.count(Fault.STATUS) + plan.count(Fault.TIMEOUT)
                   for _, plan in instances)
    assert injected >= 10, f"only {injected} faults were injected"
    assert all(status(clean, f"t{i}") == "committed" for i in range(12))
    moved = sum((Decimal(f"{i + 1}.25") * (1 if i % 2 else -1) for i in range(12)),
                Decimal("0"))
    assert balance(clean, "alice") == Decimal("100.00") - moved
    assert balance(clean, "bob") == Decimal("50.00") + moved
    assert len(clean.ledger.list_outcomes()) == 14
    assert clean.completions.count() == 0


# --- retries that fit the lease ----------------------------------------------------------------

@pytest.mark.parametrize(("seconds_left", "retries"), [
    (40, 2), (15, 2), (10, 2), (3, 2), (2, 1), (1.3, 1), (1, 0), (0, 0), (-4, 0)])
def test_a_lease_call_with_its_retries_fits_the_time_left(seconds_left: float,
                                                           retries: int) -> None:
    options = fit_retries(seconds_left, per_try_seconds=5)
    assert options["retry_total"] == retries
    assert options["connection_timeout"] == options["read_timeout"] <= 5
    longest = worst_case_seconds(options["read_timeout"], options["retry_total"])
    assert longest <= max(seconds_left, 0.5) + 1e-9


def test_back_off_is_sub_second_and_grows() -> None:
    policy = LeaseFitRetry()
    first = [policy.get_backoff_time({"count": 1}) for _ in range(50)]
    second = [policy.get_backoff_time({"count": 2}) for _ in range(50)]
    assert 0.16 <= min(first) <= max(first) <= 0.24
    assert 0.32 <= min(second) <= max(second) <= 0.48
    assert max(policy.get_backoff_time({"count": n}) for n in range(1, 10)) <= 0.96


@pytest.mark.parametrize("fault", [Fault.STATUS, Fault.LOSE_RESPONSE, Fault.TIMEOUT], ids=str)
def test_a_transient_error_on_a_renewal_costs_a_sub_second_retry(ns: Namespace,
                                                                  fault: Fault) -> None:
    app, plan = faulty_app(ns, SHORT_LEASE)
    lease = app.elector.try_acquire()
    assert lease is not None
    plan.add(fault, [CallKind.RENEW], times=1, seconds=0.3)
    started = time.monotonic()
    lease.renew()
    took = time.monotonic() - started
    assert plan.count(fault, CallKind.RENEW) == 1
    assert lease.state is LeaseState.LEADING
    # Well inside the 10 s a 15 s lease has left when it is renewed (the SDK's default back-off
    # took 17 s here: past the lease).
    assert took < 5, f"one transient error held renew() for {took:.1f} s"
    lease.release()


def test_a_renewal_against_hung_storage_gives_up_before_the_lease_expires(
        ns: Namespace) -> None:
    app, plan = faulty_app(ns, SHORT_LEASE)
    lease = app.elector.try_acquire()
    assert lease is not None
    lease.last_renew_sent -= 12  # as if the last renewal was 12 s ago: 3 s left on the lease
    left = lease.last_renew_sent + lease.config.lease_seconds - time.monotonic()
    plan.add(Fault.TIMEOUT, [CallKind.RENEW], seconds=60)  # every try hangs to its timeout
    started = time.monotonic()
    with pytest.raises(LeadershipLost):
        lease.renew()
    took = time.monotonic() - started
    assert plan.count(Fault.TIMEOUT, CallKind.RENEW) == 3, "three tries, each cut short"
    assert took <= left + 1, f"renew() took {took:.1f} s with {left:.1f} s left on the lease"


def _acquire_by(app: LedgerApp, timeout: float) -> tuple[HeldLease, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lease = app.elector.try_acquire()
        except (AzureError, StorageError):  # the SDK's, or the lease port's translation
            lease = None
        if lease is not None:
            return lease, time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"no lease within {timeout} s")


def test_hand_over_with_lost_release_and_busy_acquire_takes_about_a_second(
        ns: Namespace) -> None:
    old, old_plan = faulty_app(ns, SHORT_LEASE)
    new, new_plan = faulty_app(ns, SHORT_LEASE)
    lease = old.elector.try_acquire()
    assert lease is not None
    old_plan.add(Fault.LOSE_RESPONSE, [CallKind.RELEASE], times=1)
    new_plan.add(Fault.STATUS, [CallKind.ACQUIRE], after=1, times=2, status=503)
    assert new.elector.try_acquire() is None  # refused while the old leader holds it
    started = time.monotonic()
    lease.release()
    released = time.monotonic() - started
    _, acquired_at = _acquire_by(new, 10)
    assert old_plan.count(Fault.LOSE_RESPONSE, CallKind.RELEASE) == 1
    assert new_plan.count(Fault.STATUS, CallKind.ACQUIRE) == 2
    assert released < 5, f"a lost release held the old leader {released:.1f} s"
    assert acquired_at - started < 5, "the next leader took over within a few seconds"


@pytest.mark.slow
def test_failover_under_busy_storage_stays_within_the_lease_plus_a_few_seconds(
        ns: Namespace) -> None:
    dead, _ = faulty_app(ns, SHORT_LEASE)
    survivor, plan = faulty_app(ns, SHORT_LEASE)
    lease = dead.elector.try_acquire()
    assert lease is not None
    last_renew = lease.last_renew_sent  # then the holder dies: no renewal, no release
    plan.add(Fault.STATUS, [CallKind.ACQUIRE], probability=0.5, status=503)
    plan.add(Fault.LOSE_RESPONSE, [CallKind.ACQUIRE], probability=0.2)
    _, acquired_at = _acquire_by(survivor, 30)
    failover = acquired_at - last_renew
    assert plan.count(Fault.STATUS, CallKind.ACQUIRE) > 0
    assert failover < 15 + 3, f"failover took {failover:.1f} s with a 15 s lease"


def test_queue_clients_opened_from_one_account_share_no_retry_policy_object() -> None:
    # A pipeline links its policies to the ones after it: one retry policy object in two
    # clients sent one's requests down the other's chain, and a client built on another thread
    # meanwhile made a listener's receive fail ("_SansIOHTTPPolicyRunner ... no attribute
    # 'next'": the intake queues' test under load).
    clients = clients_from_connection_string("UseDevelopmentStorage=true")
    first, second = clients.open_queue("first"), clients.open_queue("second")
    policies: list[Any] = [queue.client._config.retry_policy for queue in (first, second)]
    assert all(isinstance(policy, LeaseFitRetry) for policy in policies)
    assert policies[0] is not policies[1]
    assert clients.queue._config.retry_policy not in policies
    # Each client's retry policy hands its requests to its own pipeline.
    for queue, policy in zip((first, second), policies, strict=True):
        chain: list[Any] = queue.client._pipeline._impl_policies
        assert policy.next is chain[chain.index(policy) + 1]
