"""The leader's drain rate with outcome events on, side by side with ``OUTCOME_EVENTS=false``.

The drain of ``bench/drain.py`` (a ready backlog of deposits recorded behind someone else's
lease, then one cold instance's election), run in pairs on fresh names: events off, then on
(the next round on, then off), at each ``--latency-ms``. With events on, the election returns
once the leader did its part of publishing: the events of its small rows sent and the rows
deleted, one hand-off message sent per big row (``Publisher.finish``). Ratio = mean rate on /
mean rate off; target >= 0.85.

Then the hand-offs are published as the ``wake_up`` function would, by ``--publishers``
threads of one process (a Functions host runs up to ``batchSize`` invocations at once, and
Azure spreads the messages over every instance): ``publish_rate`` is the events a second that
one such process sends, at the same per-call latency; the outbox must be empty after it.

    python -m bench.outbox [--backlog 2000] [--accounts 200] [--latency-ms 0 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from azure.storage.blob import BlobLeaseClient

from bench.cells import Names, drop, leader_app, prepare
from bench.drain import record_backlog
from bench.probe import KINDS
from shared.leadership.elections import handle_wakeup, run_election
from shared.leadership.outbox import depth
from shared.leadership.wakeup import publish_request
from shared.storage.clients import ensure_queues
from simulator.azurite import Azurite


@dataclass
class OutboxDrain:
    """One drain: events on or off."""

    events: bool
    latency_ms: float
    backlog: int
    seconds: float = 0.0
    rate: float = 0.0
    queue_sends: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    handed_off: int = 0  # hand-off messages the leader sent
    publish_seconds: float = 0.0
    publish_rate: float = 0.0  # events a second, one process of ``publishers`` threads
    outbox_left: int = 0


def publish_handed_off(app: Any, threads: int) -> int:
    """Take every hand-off message of the wake-up queue and publish its row, ``threads`` at a
    time, as ``wake_up`` invocations would; the messages taken."""
    queue = app.wakeup_queue
    texts = []
    while got := queue.receive(max_messages=32, visibility_timeout=300):
        for message in got:
            if publish_request(message.text) is not None:
                texts.append(message.text)
            queue.delete(message.handle)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda text: handle_wakeup(app, text.encode()), texts))
    return len(texts)


def measure(connection_string: str, backlog: int, accounts: int, latency_ms: float,
            events: bool, publishers: int = 4) -> OutboxDrain:
    names = Names()
    overrides = {"OUTCOME_EVENTS": "true" if events else "false",
                 "OUTCOMES_QUEUE_NAME": f"{names.prefix}-outcomes"}
    result = OutboxDrain(events, latency_ms, backlog)
    setup = leader_app(connection_string, names, names.probe(0), "setup", overrides=overrides)
    prepare(setup)
    ensure_queues(setup.clients, [setup.config.outcomes_queue])  # Bicep makes it in Azure
    holder = BlobLeaseClient(setup.clients.blob.get_blob_client(setup.config.lease_container,
                                                                setup.config.lease_blob))
    holder.acquire(lease_duration=60)
    record_backlog(connection_string, names, backlog, accounts)
    holder.release()
    probe = names.probe(latency_ms)
    app = leader_app(connection_string, names, probe, "drainer", overrides=overrides)
    started = time.monotonic()
    while True:
        election = run_election(app)
        if not election.stopped_by or time.monotonic() - started > 600:
            break
    result.seconds = time.monotonic() - started
    calls = probe.reset()
    result.calls = {kind: calls[kind] for kind in KINDS if calls.get(kind)}
    decided = len(setup.ledger.list_outcomes())
    result.rate = decided / result.seconds if result.seconds else 0.0
    if events:
        sent_by_leader = app.queue(app.config.outcomes_queue).approximate_count()
        probe.latency_ms = latency_ms
        started = time.monotonic()
        result.handed_off = publish_handed_off(app, publishers)
        result.publish_seconds = time.monotonic() - started
        probe.reset()
        probe.latency_ms = 0
        result.queue_sends = app.queue(app.config.outcomes_queue).approximate_count()
        if result.handed_off and result.publish_seconds:
            result.publish_rate = (result.queue_sends - sent_by_leader) / result.publish_seconds
        result.outbox_left = depth(setup).rows
    drop(connection_string, names)
    return result


def run(backlog: int, accounts: int, latencies: Sequence[float], rounds: int,
        publishers: int = 4) -> dict[str, Any]:
    results: list[OutboxDrain] = []
    with Azurite(in_memory=True) as azurite:
        for latency in latencies:
            for n in range(rounds):
                order = (False, True) if n % 2 == 0 else (True, False)
                for events in order:
                    results.append(measure(azurite.connection_string, backlog, accounts,
                                           latency, events, publishers))
                    print(json.dumps(asdict(results[-1])), flush=True)
    summary = []
    for latency in latencies:
        on = [r.rate for r in results if r.latency_ms == latency and r.events]
        off = [r.rate for r in results if r.latency_ms == latency and not r.events]
        publish = [r.publish_rate for r in results if r.latency_ms == latency and r.events]
        summary.append({"latency_ms": latency, "on": statistics.mean(on),
                        "off": statistics.mean(off),
                        "ratio": statistics.mean(on) / statistics.mean(off),
                        "publish_rate": statistics.mean(publish)})
    return {"runs": [asdict(r) for r in results], "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 8.0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--publishers", type=int, default=4,
                        help="threads publishing the hand-offs (one process)")
    args = parser.parse_args(argv)
    report = run(args.backlog, args.accounts, args.latency_ms, args.rounds, args.publishers)
    print("| latency ms | events off (req/s) | events on (req/s) | on / off "
          "| hand-offs published (events/s, one process) |")
    print("|---:|---:|---:|---:|---:|")
    for row in report["summary"]:
        print(f"| {row['latency_ms']:g} | {row['off']:.0f} | {row['on']:.0f} | "
              f"{row['ratio']:.2f} | {row['publish_rate']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
