"""Slow storage slows a term down; it does not throw the term away.

A read that failed with a transient error (a timeout, a reset, a 5xx) is tried again within
what the lease allows, what was read is kept, and requests whose accounts could not be read
wait for the next round while the others commit. The rate under overload, side by side with a
clean run, is a benchmark (``./dev bench --only overload``); here, what must hold whatever the rate.
"""

from __future__ import annotations

from decimal import Decimal

from shared.leadership.elections import run_election
from simulator.faults import CallKind, Fault
from tests.helpers import Namespace, balance, deposit, record, status
from tests.test_faults import faulty_app

FAST = {"STORAGE_TIMEOUT_SECONDS": "1"}


def test_a_term_whose_account_reads_time_out_tries_them_again_and_commits(
        ns: Namespace) -> None:
    """Before, one account read that timed out on every try ended the term: nothing was
    committed and the next term started over."""
    app, plan = faulty_app(ns, FAST)
    requests = [f"d{i}" for i in range(12)]
    for i, request_id in enumerate(requests):
        record(app, *deposit(request_id, f"acct{i}", "1.00"))
    # Every account read fails on its three tries (the SDK's retries) at first: storage slow.
    plan.add(Fault.TIMEOUT, [CallKind.ACCOUNT_READ], times=3 * len(requests), seconds=0.05)
    result = run_election(app)
    assert not result.stopped_by, result.stopped_by
    assert len(result.terms) >= 1
    first_term = result.terms[0]
    assert sum(first_term.outcomes.values()) == len(requests), "committed in that very term"
    assert first_term.reads_retried >= 1
    if not all(status(app, r) == "committed" for r in requests):
        run_election(app)  # the one that waited: its account reads fine now
    assert all(status(app, r) == "committed" for r in requests)
    assert sum(balance(app, f"acct{i}") for i in range(12)) == Decimal("12.00")


def test_under_overload_every_term_commits_something_and_nothing_is_lost(
        ns: Namespace) -> None:
    """Every call 200 ms slower and 20 % of account and outcome reads timing out (each try):
    terms keep committing; no term ends on a read that timed out."""
    app, plan = faulty_app(ns, FAST, seed=7)
    clean = ns.app("observer")  # the test's own reads see no faults
    requests = [f"d{i}" for i in range(40)]
    for i, request_id in enumerate(requests):
        record(app, *deposit(request_id, f"acct{i % 20}", "1.00"))
    plan.add(Fault.LATENCY, seconds=0.2)
    plan.add(Fault.TIMEOUT, [CallKind.ACCOUNT_READ, CallKind.OUTCOME_READ], probability=0.2,
             seconds=0.3)
    terms = []
    for _ in range(20):
        result = run_election(app)
        assert not result.stopped_by, result.stopped_by
        terms += result.terms
        if all(status(clean, r) == "committed" for r in requests):
            break
    assert all(status(clean, r) == "committed" for r in requests)
    assert terms
    assert all(sum(t.outcomes.values()) > 0 for t in terms), [dict(t.outcomes) for t in terms]
    assert plan.count(Fault.TIMEOUT) > 0, "timeouts were injected"
    assert sum(balance(clean, f"acct{i}") for i in range(20)) == Decimal("40.00")
