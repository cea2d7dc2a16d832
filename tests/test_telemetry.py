"""Telemetry: the spans, metrics and log fields a real pipeline run emits (in-memory exporters,
real Azurite), and that the app runs unchanged with telemetry off."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.config.settings import ConfigError
from shared.leadership import sweeper
from shared.leadership.elections import Role
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from shared.observability import telemetry
from shared.storage.completions import RecordResult
from simulator import REPO_ROOT
from simulator.azurite import Azurite
from tests.helpers import (
    Namespace,
    balance,
    deposit,
    record,
    send,
    status,
    step,
    sweep_now,
    transfer,
)


class Exporters:
    """The process's in-memory span exporter and metric reader (installed once per process)."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        telemetry.install(tracer_provider, MeterProvider(metric_readers=[self.metrics]))

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of one metric, as collected now (cumulative)."""
        data = self.metrics.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend((dict(p.attributes or {}), p) for p in metric.data.data_points)
        return found

    def names(self) -> list[str]:
        """Every metric collected so far."""
        data = self.metrics.get_metrics_data()
        return [metric.name for resource in (data.resource_metrics if data else ())
                for scope in resource.scope_metrics for metric in scope.metrics]

    def total(self, name: str, **attributes: Any) -> float:
        """A counter's cumulative value (or a histogram's count) over points with ``attributes``."""
        total = 0.0
        for attrs, point in self.points(name):
            if all(attrs.get(k) == v for k, v in attributes.items()):
                count = getattr(point, "count", None)
                total += float(count if count is not None else point.value)
        return total

    def last(self, name: str, **attributes: Any) -> float | None:
        """A gauge's current value for ``attributes``."""
        for attrs, point in self.points(name):
            if all(attrs.get(k) == v for k, v in attributes.items()):
                return float(point.value)
        return None


_exporters: Exporters | None = None


@pytest.fixture
def otel() -> Exporters:
    """In-memory telemetry, cleared for this test (spans only: metrics are compared as deltas)."""
    global _exporters
    if _exporters is None:
        _exporters = Exporters()
    _exporters.spans.clear()
    return _exporters


def _epoch(app: LedgerApp) -> int:
    fence = app.ledger.read_fence()
    assert fence is not None
    return fence.epoch


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None
            and s.parent.span_id == parent.context.span_id]


def _root_of(spans: list[ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    by_id = {s.context.span_id: s for s in spans}
    while span.parent is not None:
        span = by_id[span.parent.span_id]
    return span


def test_a_committed_transfer_links_its_commit_to_the_spans_that_recorded_its_steps(
        ns: Namespace, otel: Exporters) -> None:
    app = ns.app(instance_id="inst-a")
    committed_before = otel.total("ledger.outcomes", status="committed")
    terms_before = otel.total("ledger.leader.terms", instance="inst-a")
    lag_before = otel.total("ledger.commit.lag")
    send(app, *deposit("d1", "alice", "100.00"))
    send(app, *transfer("t1", "alice", "bob", "40.00"))
    assert (balance(app, "alice"), balance(app, "bob")) == (Decimal("60.00"), Decimal("40.00"))

    spans = otel.finished()
    invocations = otel.finished("ledger.invocation")
    assert len(invocations) == 3, "one root span per message"
    for root in invocations:
        assert root.parent is None
        assert root.attributes is not None
        assert root.attributes["trigger"] == "queue"
        assert root.attributes["instance"] == "inst-a"
    assert [r.attributes["requestId"] for r in invocations if r.attributes] == ["d1", "t1", "t1"]

    records = [s for s in otel.finished("ledger.record")
               if s.attributes and s.attributes["requestId"] == "t1"]
    assert sorted(str(s.attributes["operationId"]) for s in records if s.attributes) == [
        "t1-a", "t1-w"]
    commits = [s for s in otel.finished("ledger.commit")
               if s.attributes and s.attributes.get("requestId") == "t1"]
    assert len(commits) == 1
    commit = commits[0]
    assert commit.attributes is not None
    assert commit.attributes["role"] == "leader"
    assert commit.attributes["instance"] == "inst-a"
    epoch = _epoch(app)
    assert commit.attributes["epoch"] == epoch
    assert commit.attributes["requests"] == 1
    assert commit.attributes["requestIds"] == "t1"
    assert commit.attributes["requestIdsComplete"] is True
    assert float(commit.attributes["leaseRemainingSeconds"]) > 0  # type: ignore[arg-type]
    # The link: the commit span points at both recording spans, across the two invocations.
    linked = {(link.context.trace_id, link.context.span_id) for link in commit.links}
    assert linked == {(s.context.trace_id, s.context.span_id) for s in records}
    assert len({s.context.trace_id for s in records}) == 2

    # The invocation that recorded the last step led: acquire, scan, claim, drain > commit, delete.
    last_root = _root_of(spans, commit)
    assert last_root.attributes is not None
    assert last_root.attributes["role"] == "leader"
    assert last_root.attributes["epoch"] == epoch
    names = {s.name for s in spans if _root_of(spans, s) is last_root}
    assert {"ledger.record", "ledger.acquire", "ledger.scan", "ledger.claim", "ledger.drain",
            "ledger.commit", "ledger.delete"} <= names
    claim = next(s for s in _children(spans, last_root) if s.name == "ledger.claim")
    assert claim.attributes is not None
    assert claim.attributes["epoch"] == epoch
    acquire = next(s for s in _children(spans, last_root) if s.name == "ledger.acquire")
    assert acquire.attributes is not None
    assert acquire.attributes["result"] == "acquired"
    drain = next(s for s in spans if s.name == "ledger.drain" and _root_of(spans, s) is last_root)
    assert commit in _children(spans, drain) or any(
        commit in _children(spans, c) for c in _children(spans, drain))

    # Metrics: two commits (d1, t1), two terms, a lag measured per request; all of shard 0.
    assert otel.total("ledger.outcomes", status="committed", shard=0) - committed_before == 2
    assert otel.total("ledger.leader.terms", instance="inst-a") - terms_before == 2
    assert otel.last("ledger.leader.epoch", instance="inst-a") == epoch
    assert otel.total("ledger.commit.lag") - lag_before == 2


def test_a_follower_counts_a_refused_attempt_without_a_warning(
        ns: Namespace, otel: Exporters, caplog: pytest.LogCaptureFixture) -> None:
    leader, follower = ns.app(instance_id="inst-l"), ns.app(instance_id="inst-f")
    held = leader.elector.try_acquire()
    assert held is not None
    refused_before = otel.total("ledger.lease.attempts", result="refused")
    caplog.set_level(logging.DEBUG, logger="shared")
    try:
        result = send(follower, *deposit("d2", "carol", "5.00"))[0]
    finally:
        held.release()
    assert result.election is not None
    assert result.election.role is Role.FOLLOWER
    assert otel.total("ledger.lease.attempts", result="refused") - refused_before == 1
    root = otel.finished("ledger.invocation")[-1]
    assert root.attributes is not None
    assert root.attributes["role"] == "follower"
    assert "epoch" not in root.attributes
    acquire = otel.finished("ledger.acquire")[-1]
    assert acquire.attributes is not None
    assert acquire.attributes["result"] == "refused"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    # The sweeper commits it: a timer invocation, the poison queue's depth reported.
    leader.queue(leader.config.poison_queue, raw=True).send("stuck")
    sweeper.sweep(leader)
    assert status(leader, "d2") == "committed"
    sweep_root = otel.finished("ledger.invocation")[-1]
    assert sweep_root.attributes is not None
    assert sweep_root.attributes["trigger"] == "timer"
    assert sweep_root.attributes["role"] == "leader"
    assert otel.last("ledger.poison.depth") == 1


def test_scans_report_pending_work_and_malformed_messages_are_counted(
        ns: Namespace, otel: Exporters) -> None:
    app = ns.app()
    parked_before = otel.total("ledger.parked")
    duplicates_before = otel.total("ledger.completions.deliveries", result="duplicate")
    withdraw = transfer("t2", "dave", "erin", "1.00")[0]
    send(app, withdraw, withdraw, b'{"requestId": "t3", "amount": 1.5}')
    assert otel.total("ledger.parked") - parked_before == 1
    assert otel.total("ledger.completions.deliveries", result="duplicate") - duplicates_before == 1
    sweep_now(app)  # the gauges come from the sweeper's full scan (the hot path reads no backlog)
    assert otel.last("ledger.completions.pending") == 1  # t2's withdraw waits for its add
    assert otel.last("ledger.requests.pending") == 1
    scan = otel.finished("ledger.full_scan")[-1]
    assert scan.attributes is not None
    assert (scan.attributes["completions"], scan.attributes["requestsReady"]) == (1, 0)


def test_log_records_carry_the_invocation_fields_and_info_lines_do_not_grow_with_messages(
        ns: Namespace, otel: Exporters, caplog: pytest.LogCaptureFixture) -> None:
    app, other = ns.app(instance_id="inst-x"), ns.app(instance_id="inst-y")
    telemetry.add_log_fields([caplog.handler])
    caplog.set_level(logging.INFO, logger="shared")
    held = app.elector.try_acquire()
    assert held is not None
    try:  # under load most invocations are followers; duplicates are redeliveries
        bodies = [body for i in range(15) for body in deposit(f"l{i}", "frank", "1.00")]
        send(other, *bodies, *bodies[:5])
    finally:
        held.release()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    sweeper.sweep(app)  # one leader commits all 15
    assert balance(app, "frank") == Decimal("15.00")
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert 1 <= len(info) <= 3, [r.getMessage() for r in info]
    leads = next(r for r in info if "leads with epoch" in r.getMessage())
    fields = {k: getattr(leads, k, None) for k in ("instance", "role", "epoch", "trigger")}
    assert fields == {"instance": "inst-x", "role": "leader",
                      "epoch": _epoch(app),
                      "trigger": "timer"}
    assert getattr(leads, "shard", None) == 0


def test_every_metric_has_a_shard_dimension_zero_with_one_shard(ns: Namespace,
                                                               otel: Exporters) -> None:
    app = ns.app()
    send(app, *deposit("s1", "gina", "1.00"), b'{"requestId": "bad"}')
    sweep_now(app)
    app.queue(app.config.poison_queue).send("gave up")
    sweeper.sweep(app)
    names = [name for name in otel.names() if name.startswith("ledger.")]
    assert {"ledger.outcomes", "ledger.lease.attempts", "ledger.leader.terms",
            "ledger.leader.epoch", "ledger.drain.duration", "ledger.commit.batch_size",
            "ledger.commit.lag", "ledger.completions.pending", "ledger.completions.deliveries",
            "ledger.parked", "ledger.poison.depth"} <= set(names)
    for name in names:
        for attributes, _ in otel.points(name):
            assert "shard" in attributes, (name, attributes)
    assert otel.total("ledger.outcomes", status="committed", shard=0) >= 1


def test_with_shards_a_leaders_metrics_and_spans_name_its_shard(ns: Namespace,
                                                               otel: Exporters) -> None:
    from tests.test_shards import accounts_on  # K = 4's accounts by shard

    app = ns.app(instance_id="inst-s", LEDGER_SHARDS="4")
    [on_two] = accounts_on(2, 1)
    committed = otel.total("ledger.outcomes", status="committed", shard=2)
    terms = otel.total("ledger.leader.terms", instance="inst-s", shard=2)
    send(app, *deposit("s2", on_two, "3.00"))  # its home is shard 2: that shard's leader commits
    assert balance(app, on_two) == Decimal("3.00")
    assert otel.total("ledger.outcomes", status="committed", shard=2) - committed == 1
    assert otel.total("ledger.leader.terms", instance="inst-s", shard=2) - terms == 1
    assert otel.last("ledger.leader.epoch", instance="inst-s", shard=2) == 1
    [commit] = [s for s in otel.finished("ledger.commit")
                if s.attributes and s.attributes.get("requestId") == "s2"]
    assert commit.attributes is not None
    assert commit.attributes["shard"] == 2
    # The sweeper's full scan of each shard reports for that shard.
    otel.spans.clear()
    sweeper.sweep(app)
    assert [s.attributes["shard"] for s in otel.finished("ledger.full_scan")
            if s.attributes] == [0, 1, 2, 3]
    assert {otel.last("ledger.completions.pending", shard=k) for k in range(4)} == {0}
    # Work in flight: the home's coordination waits for its voter, as the home's gauges say.
    from tests.test_shards import elect_only, request_on, settle

    rid = request_on(0, "x")
    send_to = accounts_on(3, 1)[0]
    record(app, *transfer(rid, on_two, send_to, "1.00"))
    elect_only(app, 0)  # coordinates: PREPARE to shard 2
    elect_only(app, 2)  # votes: the home's mail flag changes
    elect_only(app, 0)  # reads its flight: the coordination, and the vote in its inbox
    assert otel.last("ledger.flight.coordinations", shard=0) == 1
    age = otel.last("ledger.flight.oldest_age", shard=0)
    assert age is not None
    assert 0 <= age < 60
    settle(app, [rid])
    app.shards[0].flight_read_at = float("-inf")  # its next look reads the flight (it is due)
    elect_only(app, 0)
    assert otel.last("ledger.flight.coordinations", shard=0) == 0


def test_a_conflict_is_logged_with_its_request_id(ns: Namespace, otel: Exporters,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    app = ns.app()
    caplog.set_level(logging.INFO, logger="shared")
    first = step("c1", "c1-a", "add_funds", "gina", "1.00", 2)
    second = step("c1", "c1-a", "add_funds", "gina", "2.00", 2)
    results = send(app, first, second)
    assert results[1].recorded is RecordResult.CONFLICT
    conflict = next(r for r in caplog.records if "arrived twice" in r.getMessage())
    assert getattr(conflict, "requestId", None) == "c1"
    assert getattr(conflict, "instance", None) == app.config.instance_id


# --- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("On", True), ("0", False), ("", False), ("false", False)])
def test_console_exporter_setting(value: str, expected: bool) -> None:
    assert telemetry.console_requested({"TELEMETRY_CONSOLE_EXPORTER": value}) is expected
    assert telemetry.console_requested({}) is False


def test_console_exporter_setting_refuses_an_unclear_value() -> None:
    with pytest.raises(ConfigError, match="TELEMETRY_CONSOLE_EXPORTER='maybe': set 1"):
        telemetry.console_requested({"TELEMETRY_CONSOLE_EXPORTER": "maybe"})
    env = {**os.environ, "TELEMETRY_CONSOLE_EXPORTER": "maybe"}
    run = subprocess.run([sys.executable, "-c", "import function_app"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "TELEMETRY_CONSOLE_EXPORTER='maybe'" in run.stderr


def test_the_telemetry_identity_is_the_apps_managed_identity() -> None:
    assert telemetry.identity_client_id({
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "ClientId=abc-123;Authorization=AAD",
        "AzureWebJobsStorage__clientId": "other"}) == "abc-123"
    assert telemetry.identity_client_id({"AzureWebJobsStorage__clientId": "def"}) == "def"
    assert telemetry.identity_client_id({}) is None


def test_azure_monitor_is_configured_with_the_managed_identity(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.identity
    import azure.monitor.opentelemetry

    calls: list[dict[str, Any]] = []
    exporting = logging.Handler()  # stands for the distro's handler on the `shared` logger

    def configure_azure_monitor(**kwargs: Any) -> None:
        calls.append(kwargs)
        logging.getLogger(kwargs["logger_name"]).addHandler(exporting)

    monkeypatch.setattr(azure.monitor.opentelemetry, "configure_azure_monitor",
                        configure_azure_monitor)
    monkeypatch.setattr(azure.identity, "ManagedIdentityCredential",
                        lambda client_id=None: ("managed identity", client_id))
    monkeypatch.setattr(telemetry, "_mode", None)
    app_logger = logging.getLogger("shared")
    level = app_logger.level
    connection = "InstrumentationKey=00000000-0000-0000-0000-000000000000"
    try:
        mode = telemetry.configure({
            "APPLICATIONINSIGHTS_CONNECTION_STRING": connection,
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "ClientId=abc-123;Authorization=AAD"})
        assert app_logger.level == (level or logging.INFO), "the app's INFO lines are exported"
        assert any(isinstance(f, telemetry.LogFields) for f in exporting.filters), \
            "exported log records get the invocation's fields as custom dimensions"
    finally:
        app_logger.setLevel(level)
        app_logger.removeHandler(exporting)
    assert mode == "azure-monitor"
    assert len(calls) == 1
    assert calls[0]["connection_string"] == connection
    assert calls[0]["credential"] == ("managed identity", "abc-123")
    assert calls[0]["logger_name"] == "shared"
    assert calls[0]["sampling_ratio"] == 1.0
    # Keyword arguments the distro knows, and every instrumentation it would turn on is off.
    from azure.monitor.opentelemetry import _constants
    known = {value for name, value in vars(_constants).items() if name.endswith("_ARG")}
    assert set(calls[0]) - {"credential"} <= known
    options = calls[0]["instrumentation_options"]
    assert set(_constants._FULLY_SUPPORTED_INSTRUMENTED_LIBRARIES) <= set(options)
    assert all(option == {"enabled": False} for option in options.values())
    assert telemetry.configure({}) == "azure-monitor", "configured once per process"


_WITHOUT_TELEMETRY = textwrap.dedent("""
    import json, os, sys
    from opentelemetry import metrics, trace
    from shared.observability import telemetry
    from tests.helpers import Namespace, balance, deposit, send, transfer
    mode = telemetry.configure(os.environ)
    ns = Namespace(sys.argv[1])
    app = ns.app()
    withdraw = transfer("n2", "henry", "ida", "1.00")[0]
    result = send(app, *deposit("n1", "henry", "12.34"), withdraw)[0]
    print(json.dumps({
        "mode": mode,
        "tracer_provider": type(trace.get_tracer_provider()).__name__,
        "meter_provider": type(metrics.get_meter_provider()).__name__,
        "balance": str(balance(app, "henry")),
        "role": result.election.role.value,
        "pending_rows": [dict(row) for row in app.completions.table.query("PartitionKey ne ''")
                         if "traceparent" not in row and row.get("requestId") == "n2"] != [],
        "traceparent_in_rows": any("traceparent" in row for row in
            app.completions.table.query("PartitionKey ne ''")),
    }))
""")


def test_the_app_runs_unchanged_without_telemetry(azurite: Azurite) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APPLICATIONINSIGHTS_", "OTEL_", "TELEMETRY_"))}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TELEMETRY, azurite.connection_string],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"mode": "off", "tracer_provider": "ProxyTracerProvider",
                    "meter_provider": "_ProxyMeterProvider", "balance": "12.34",
                    "role": "leader", "pending_rows": True, "traceparent_in_rows": False}


def test_completion_rows_name_the_span_that_recorded_them(ns: Namespace,
                                                          otel: Exporters) -> None:
    app = ns.app()
    handle_completion(app, transfer("t9", "ivan", "jo", "1.00")[0], message_id="m1")
    rows = [row for row in app.completions.table.query("PartitionKey ne ''")
            if "operationId" in row]
    assert len(rows) == 1  # the step's row (beside it: its request's own row)
    record = otel.finished("ledger.record")[-1]
    trace_id, span_id = rows[0]["traceparent"].split("-")[1:3]
    assert (int(trace_id, 16), int(span_id, 16)) == (record.context.trace_id,
                                                     record.context.span_id)


_CONSOLE = textwrap.dedent("""
    import os, sys
    from shared import wiring as runtime
    from tests.helpers import Namespace, deposit, send
    os.environ.update(Namespace(sys.argv[1]).env(TELEMETRY_CONSOLE_EXPORTER="1"))
    app = runtime.get_app()
    app.ensure_resources()
    send(app, *deposit("k1", "kim", "3.00"))
    print("balance", app.ledger.read_account("kim").balance)
""")


def test_the_console_exporter_prints_spans_and_metrics_to_stderr(azurite: Azurite) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLICATIONINSIGHTS_")}
    run = subprocess.run([sys.executable, "-c", _CONSOLE, azurite.connection_string],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "balance 3.00" in run.stdout
    assert '"name"' not in run.stdout, "stdout stays free for the simulator's event channel"
    for name in ("ledger.invocation", "ledger.record", "ledger.commit"):
        assert f'"name": "{name}"' in run.stderr, name  # spans, flushed at exit
    assert '"ledger.outcomes"' in run.stderr  # metrics, exported at shutdown


def test_a_batch_commit_names_every_request_and_not_the_message_that_triggered_it(
        ns: Namespace, otel: Exporters, caplog: pytest.LogCaptureFixture) -> None:
    leader, follower = ns.app(instance_id="inst-b"), ns.app(instance_id="inst-c")
    telemetry.add_log_fields([caplog.handler])
    caplog.set_level(logging.INFO, logger="shared")
    held = leader.elector.try_acquire()
    assert held is not None
    try:
        send(follower, *deposit("e1", "lena", "1.00"), *deposit("e2", "lena", "2.00"))
    finally:
        held.release()
    send(leader, *deposit("e3", "lena", "3.00"))
    assert balance(leader, "lena") == Decimal("6.00")
    commit = otel.finished("ledger.commit")[-1]
    assert commit.attributes is not None
    assert commit.attributes["requests"] == 3
    assert commit.attributes["requestIds"] == "e1,e2,e3"
    assert "requestId" not in commit.attributes
    assert len(commit.links) == 3
    root = otel.finished("ledger.invocation")[-1]
    assert root.attributes is not None
    assert root.attributes["requestId"] == "e3"
    leads = next(r for r in caplog.records if "leads with epoch" in r.getMessage())
    assert not hasattr(leads, "requestId")
    assert getattr(leads, "instance", None) == "inst-b"
