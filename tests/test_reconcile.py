"""Reconciliation against a real Azurite: a clean K = 4 ledger passes; each broken invariant,
written straight into a partition, is reported (library, ``./dev cli reconcile --json``, its
exit status), and the ``reconcile`` timer is registered as the host indexes it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from operator_cli.cli import main
from shared.domain.exchange import Escrow, escrow_key
from shared.domain.money import format_money
from shared.domain.planning import account_key
from shared.leadership.instance import LedgerApp
from shared.leadership.reconcile import Pace, reconcile_ledger
from shared.leadership.reshard import reshard
from simulator import REPO_ROOT
from tests.fakes.clock import FakeClock
from tests.helpers import Namespace, deposit, send, transfer, wait_until
from tests.test_shards import accounts_on, request_on, settle, sharded

SHARDS = "4"


def cli(ns: Namespace, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), environ=ns.env(LEDGER_SHARDS=SHARDS), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def funded_ledger(ns: Namespace) -> tuple[LedgerApp, list[str]]:
    """K = 4 with deposits and settled transfers across shards (one rejected for funds)."""
    app = sharded(ns)
    [a], [b], [c] = accounts_on(1, 1), accounts_on(2, 1), accounts_on(3, 1)
    send(app, *deposit("fa", a, "100.00"), *deposit("fb", b, "20.00"))
    t1, t2, t3 = request_on(0, "t1"), request_on(1, "t2"), request_on(3, "t3")
    send(app, *transfer(t1, a, c, "30.00"), *transfer(t2, b, a, "5.50"),
         *transfer(t3, b, c, "999.00"))  # rejected: b has 14.50 then
    settle(app, [t1, t2, t3])
    return app, [a, b, c]


def kinds(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for finding in report["findings"]:
        found.setdefault(finding["kind"], []).append(finding)
    return found


def test_a_clean_sharded_ledger_reconciles_clean(ns: Namespace) -> None:
    app, _ = funded_ledger(ns)
    report = reconcile_ledger(app)
    assert report.ok, report.findings
    assert report.grand_checked
    assert report.grand() == {"total": "120.00", "expected": "120.00"}
    assert [s.total == s.expected for s in report.shards] == [True] * 4
    assert report.counts()["accounts"] == 3
    code, out, err = cli(ns, "reconcile", "--json")
    assert code == 0, err
    view = json.loads(out)
    assert view["ok"] is True
    assert view["counts"]["error"] == view["counts"]["warning"] == 0
    assert [s["shard"] for s in view["shards"]] == [0, 1, 2, 3]
    assert view["totals"] == {"total": "120.00", "expected": "120.00", "checked": True}
    code, out, _ = cli(ns, "reconcile")
    assert code == 0
    assert "ledger reconciles: no problem found" in out


def test_a_negative_balance_is_reported(ns: Namespace) -> None:
    app, [_, b, _] = funded_ledger(ns)
    shard = app.account_shard(b)
    row = shard.ledger.table.get(shard.ledger.partition, account_key(b))
    # Balance and the legs stay in step (the deposit is bigger by as much): only the sign is off.
    shard.ledger.table.update({**row, "balance": "-1.00"}, etag=row.etag)
    code, out, _ = cli(ns, "reconcile", "--json")
    assert code == 1
    negative = kinds(json.loads(out))["negative-balance"]
    assert [(f["severity"], f["shard"], f["row"]) for f in negative] == \
        [("error", shard.current, account_key(b))]


def test_an_old_escrow_row_is_reported(ns: Namespace) -> None:
    app, [a, _, _] = funded_ledger(ns)
    shard = app.account_shard(a)
    ledger = shard.ledger
    row = ledger.table.get(ledger.partition, account_key(a))
    # A reservation left behind, consistent with the account (balance -> reserved).
    ledger.table.create(Escrow("ghost", a, Decimal("1.00")).entity(ledger.partition, 0))
    ledger.table.update({**row, "balance": format_money(Decimal(row["balance"]) - 1),
                         "reserved": "1.00"}, etag=row.etag)
    assert reconcile_ledger(app).ok  # young: not a problem yet
    app.time_shift = lambda: timedelta(seconds=301)
    report = reconcile_ledger(app)
    assert [(f.kind, f.shard, f.row) for f in report.problems] == \
        [("stale-flight", shard.current, escrow_key("ghost", a))]
    # The CLI with a threshold of 1 s, once the row is that old on storage's clock.
    found: dict[str, Any] = {}

    def reported() -> bool:
        code, out, _ = cli(ns, "reconcile", "--json", "--max-flight-seconds", "1")
        found.update(json.loads(out), code=code)
        return code == 1
    wait_until(reported, 15, "the escrow to be reported as stale")
    assert [f["row"] for f in kinds(found)["stale-flight"]] == [escrow_key("ghost", a)]


def test_a_shard_total_off_by_one_cent_is_reported(ns: Namespace) -> None:
    app, [_, _, c] = funded_ledger(ns)
    shard = app.account_shard(c)
    row = shard.ledger.table.get(shard.ledger.partition, account_key(c))
    shard.ledger.table.update(
        {**row, "balance": format_money(Decimal(row["balance"]) + Decimal("0.01"))},
        etag=row.etag)
    code, out, _ = cli(ns, "reconcile", "--json")
    assert code == 1
    view = json.loads(out)
    [off] = kinds(view)["shard-total"]
    assert (off["severity"], off["shard"]) == ("error", shard.current)
    assert "off by 0.01" in off["what"]
    assert view["totals"]["total"] == "120.01"
    code, out, _ = cli(ns, "reconcile")
    assert code == 1
    assert "1 problem(s) found" in out


def test_reserved_that_its_escrows_do_not_hold_is_reported(ns: Namespace) -> None:
    app, [a, _, _] = funded_ledger(ns)
    shard = app.account_shard(a)
    row = shard.ledger.table.get(shard.ledger.partition, account_key(a))
    shard.ledger.table.update({**row, "balance": format_money(Decimal(row["balance"]) - 2),
                               "reserved": "2.00"}, etag=row.etag)
    report = reconcile_ledger(app)
    assert [(f.kind, f.row) for f in report.problems] == [("reserved-mismatch", account_key(a))]


RUNTIME_PYTHON = "/tmp/rt313/bin/python"  # azure-functions-runtime, as the host indexes


def test_the_reconcile_timer_is_registered_as_the_host_indexes_it() -> None:
    python = RUNTIME_PYTHON if os.path.exists(RUNTIME_PYTHON) else sys.executable
    code = (
        "import json, sys; sys.path.insert(0, '.')\n"
        "try:\n"
        "    from azure_functions_runtime.loader import index_function_app\n"
        "    functions = index_function_app('function_app.py')\n"
        "except ImportError:\n"
        "    import function_app; functions = function_app.app.get_functions()\n"
        "found = {f.get_function_name(): f for f in functions}\n"
        "print(json.dumps([b.get_dict_repr() for b in found['reconcile'].get_bindings()],"
        " default=str))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LEASE_SECONDS"}
    run = subprocess.run([python, "-c", code], cwd=REPO_ROOT, capture_output=True, env=env,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    [binding] = json.loads(run.stdout)
    assert (binding["type"], binding["schedule"]) == ("timerTrigger", "0 */5 * * * *")


def test_the_alert_queries_the_summary_line_the_timer_logs() -> None:
    bicep = (REPO_ROOT / "infra/modules/reconcile_alerts.bicep").read_text()
    code = (REPO_ROOT / "shared/leadership/reconcile.py").read_text()
    assert 'message startswith "reconcile: checked"' in bicep
    assert '"reconcile: checked %s shard(s)' in code
    assert "customDimensions.reconcileProblems" in bicep
    assert "reconcileProblems=len(problems)" in code
    assert "windowSize: 'PT15M'" in bicep
    assert "evaluationFrequency: 'PT5M'" in bicep
    main_bicep = (REPO_ROOT / "infra/main.bicep").read_text()
    assert "module reconcileAlerts 'modules/reconcile_alerts.bicep'" in main_bicep


def test_the_timer_paces_its_reads_and_stops_at_its_budget() -> None:
    # A partition's target in Azure is about 2,000 entities/s, shared with its leader: the
    # timer reads at most 500 rows a second, and stops (truncated) when its time is up.
    clock = FakeClock()
    pace = Pace(clock, rate=500, deadline=clock.monotonic() + 10)
    started = clock.monotonic()
    assert all(pace.admit() for _ in range(2_000))
    assert clock.monotonic() - started == pytest.approx(4.0, abs=0.01), "2,000 rows at 500/s"
    while pace.admit():
        pass
    assert pace.out_of_time
    assert clock.monotonic() >= started + 10
    assert pace.rows <= 5_001, "nothing read past the deadline"
    unpaced = Pace(clock, rate=None, deadline=None)
    before = clock.monotonic()
    assert all(unpaced.admit() for _ in range(10_000))
    assert clock.monotonic() == before, "the CLI reads as fast as storage answers"


def test_a_resharded_ledger_reconciles_clean(ns: Namespace) -> None:
    # Accounts move, their history (outcomes, applied markers) stays: each reshard records what
    # it moved in and out of every shard, so the per-shard totals still add up, 1 -> 4 -> 2.
    app = ns.app()
    send(app, *deposit("d1", "alice", "10.00"), *deposit("d2", "bob", "5.00"),
         *deposit("d3", "carol", "2.50"), *transfer("t1", "alice", "bob", "1.25"))
    assert reconcile_ledger(app).ok
    for shards in (4, 2):
        reshard(ns.app(), shards)
        after = ns.app()
        assert after.shard_map.shards == shards
        report = reconcile_ledger(after)
        assert report.ok, [f.view() for f in report.findings]
        assert report.grand_checked
        assert report.grand() == {"total": "17.50", "expected": "17.50"}
