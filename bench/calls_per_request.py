"""Storage calls per request: how many Azure Storage calls the pipeline spends per request.

Runs the same workload (deposits, then two-leg transfers) through K in-process instances,
invoked concurrently from threads as a scaled-out app would be, against a private Azurite, with
an azure-core policy counting every HTTP call (retries included). Reports calls per request,
split into the recorders' share and the leader's share, side by side for several K in one run.

    .venv/bin/python -m bench.calls_per_request --requests 200 --instances 1 4 8

``--telemetry`` runs it with the OpenTelemetry SDK recording every span and metric in memory
(what ``shared/observability/telemetry.py`` costs when exporting; Application Insights' network
export aside).
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.probe import CallCounter
from shared.config.settings import load_config
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from shared.observability import telemetry
from shared.storage.clients import clients_from_connection_string
from simulator.azurite import Azurite
from simulator.workload import generate


def run(connection_string: str, instances: int, transfers: int) -> dict[str, float]:
    """One measured run on fresh storage names; returns its figures."""
    prefix = "b" + uuid.uuid4().hex[:8]
    env = {"COMPLETIONS_TABLE_NAME": f"{prefix}completions", "LEDGER_TABLE_NAME": f"{prefix}ledger",
           "PARKED_TABLE_NAME": f"{prefix}parked", "LEASE_CONTAINER_NAME": f"{prefix}-leases",
           "COMPLETIONS_QUEUE_NAME": f"{prefix}-q"}
    counter = CallCounter()
    apps = []
    for i in range(instances):
        config = load_config(env, instance_id=f"bench-{i}")
        clients = clients_from_connection_string(connection_string, request_hook=counter)
        apps.append(LedgerApp.create(config, clients))
    apps[0].ensure_resources(queues=False)
    work = generate(accounts=20, transfers=transfers, malformed=0, duplicate_ratio=0.0, seed=11)
    counter.calls.clear()
    deposits, legs = work.messages[:len(work.deposits)], work.messages[len(work.deposits):]
    started = time.perf_counter()
    lock = threading.Lock()
    next_index = 0

    def invoke(app: LedgerApp, messages: list[str]) -> None:
        nonlocal next_index
        while True:
            with lock:
                if next_index >= len(messages):
                    return
                body = messages[next_index]
                next_index += 1
            handle_completion(app, body.encode(), message_id=uuid.uuid4().hex)

    for batch in (deposits, legs):
        next_index = 0
        with ThreadPoolExecutor(max_workers=instances) as pool:
            list(pool.map(lambda app, b=batch: invoke(app, b), apps))
    run_election(apps[0])  # what the sweeper would pick up
    elapsed = time.perf_counter() - started
    outcomes = apps[0].ledger.list_outcomes()
    balances = apps[0].ledger.list_balances()
    assert sum(balances.values(), Decimal(0)) == sum(work.deposits.values(), Decimal(0))
    requests = len(outcomes)
    assert requests == work.requests, f"{requests} of {work.requests} decided"
    return {"instances": instances, "requests": requests, "messages": len(work.messages),
            "calls": counter.total, "calls_per_request": counter.total / requests,
            "requests_per_s": requests / elapsed}


def _record_telemetry() -> InMemorySpanExporter:
    """Install the SDK with in-memory exporters for this process; return the span exporter."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry.install(tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    return spans


def main() -> None:
    """Measure each instance count in one run, against one Azurite, and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="transfers to send")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--telemetry", action="store_true",
                        help="record spans and metrics in memory (the SDK on, no network export)")
    args = parser.parse_args()
    spans = _record_telemetry() if args.telemetry else None
    with Azurite(in_memory=True) as azurite:
        rows = [run(azurite.connection_string, k, args.requests) for k in args.instances]
    if spans is not None:
        print(f"telemetry on: {len(spans.get_finished_spans())} spans recorded")
    print(f"{'instances':>9} {'requests':>8} {'messages':>8} {'calls':>7} {'calls/req':>9} "
          f"{'req/s':>7}")
    for row in rows:
        print(f"{row['instances']:>9} {row['requests']:>8} {row['messages']:>8} "
              f"{row['calls']:>7} {row['calls_per_request']:>9.2f} {row['requests_per_s']:>7.1f}")


if __name__ == "__main__":
    main()
