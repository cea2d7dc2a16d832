"""The benchmark, one command: strategies side by side, the leader's drain, failover, on one
private Azurite; writes JSON, Markdown and a PNG under ``bench/results/``.

    ./dev bench                 # everything (~60 min on 2 cores)
    ./dev bench --quick         # a small run (a few minutes), what the smoke test runs, smaller
    ./dev bench --profile       # also profile the drain and the hot leader (pyinstrument)
    ./dev bench --only waiting  # just the backlog benchmark (--waiting N requests waiting)
    ./dev bench --only overload # just the overload benchmark
    ./dev bench --only shards   # the sharding benchmark: K = 1, 2, 4, 8, cross-shard, hot account
    ./dev bench --only hot      # only its hot account against the intake floor
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.backlog import measure_backlog
from bench.cells import run_cell
from bench.drain import measure_drain
from bench.failover import measure_failover
from bench.overload import measure_overload
from bench.report import write
from bench.shards import measure_shards, run_shard_cell, scaling_series
from bench.strategies import STRATEGIES
from bench.workloads import WORKLOADS
from simulator.azurite import Azurite

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("cells", "drain", "failover", "waiting", "overload", "shards", "hot")


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, load {load:.1f} at start")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run for the smoke test")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--instances", nargs="+", type=int, default=None)
    parser.add_argument("--latency-ms", nargs="+", type=float, default=None,
                        help="injected per storage call (default 0 and 8)")
    parser.add_argument("--requests", type=int, default=None, help="requests per cell")
    parser.add_argument("--seconds", type=float, default=None,
                        help="instances stop taking deliveries after this long")
    parser.add_argument("--backlog", type=int, default=None, help="drain benchmark backlog")
    parser.add_argument("--waiting", type=int, default=None,
                        help="backlog benchmark: requests waiting for their second leg "
                             "(default 10,000; --quick 300)")
    parser.add_argument("--sequential", type=int, default=None,
                        help="backlog benchmark: sequential deliveries per cell (default 20)")
    parser.add_argument("--overload-deposits", type=int, default=None,
                        help="overload benchmark: deposits drained per cell (default 400 over "
                             "100 accounts; --quick 60 over 20)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="backlog and overload benchmarks: rounds of side-by-side cells "
                             "(default 2; --quick 1)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=None,
                        help="run only these parts (default: all of them)")
    parser.add_argument("--no-cells", action="store_true")
    parser.add_argument("--no-drain", action="store_true")
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--no-waiting", action="store_true", help="skip the backlog benchmark")
    parser.add_argument("--no-overload", action="store_true",
                        help="skip the overload benchmark")
    parser.add_argument("--no-shards", action="store_true",
                        help="skip the sharding benchmark's scaling and cross-shard cells")
    parser.add_argument("--no-hot", action="store_true",
                        help="skip the sharding benchmark's hot account against the intake")
    parser.add_argument("--shards", nargs="+", type=int, default=None,
                        help="sharding benchmark: LEDGER_SHARDS values (default 1 2 4 8; "
                             "--quick 1 4)")
    parser.add_argument("--shard-requests", type=int, default=None,
                        help="sharding benchmark: requests per cell (default 1,500; --quick 300)")
    parser.add_argument("--shard-instances", type=int, default=2,
                        help="sharding benchmark: instances per shard (default 2)")
    parser.add_argument("--shard-processes", type=int, default=4,
                        help="sharding benchmark: load generator processes (default 4)")
    parser.add_argument("--partition-rate", type=float, default=2000.0,
                        help="sharding benchmark: entities/s per table partition (Azure: 2,000)")
    parser.add_argument("--scaled-rate", type=float, default=None,
                        help="sharding benchmark: also deposits at this partition limit, a "
                             "scaled-down model the machine can saturate (default 50; 0: none)")
    parser.add_argument("--scaled-requests", type=int, default=None,
                        help="sharding benchmark: requests per cell of the scaled-down series "
                             "(default 600)")
    parser.add_argument("--fixed-instances", type=int, default=None,
                        help="sharding benchmark: also deposits with this many instances at "
                             "every K (default 16; --quick 0: none)")
    parser.add_argument("--cross-shards", type=int, default=4,
                        help="sharding benchmark: K of the cross- against same-shard cells")
    parser.add_argument("--hot-instances", type=int, default=16,
                        help="hot account against the intake floor: instances (default 16)")
    parser.add_argument("--hot-requests", type=int, default=None,
                        help="hot account: deposits per cell (default 6,000; --quick 600)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a 1,000-request drain at each latency, and the leader of "
                             "one more hot-account cell (pyinstrument)")
    parser.add_argument("--connection-string", default=None,
                        help="an Azurite to use instead of starting a private one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="file name stem (default: a timestamp)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.instances = args.instances or ([1, 4] if quick else [1, 4, 16, 32])
    args.latency_ms = args.latency_ms or ([0.0] if quick else [0.0, 8.0])
    args.requests = args.requests or (30 if quick else 3000)
    args.seconds = args.seconds or (3.0 if quick else 10.0)
    args.backlog = args.backlog or (100 if quick else 5000)
    args.waiting = args.waiting if args.waiting is not None else (300 if quick else 10_000)
    args.sequential = args.sequential or 20
    args.overload_deposits = args.overload_deposits or (60 if quick else 400)
    args.overload_accounts = max(1, min(100, args.overload_deposits // 3))
    args.rounds = args.rounds or (1 if quick else 2)
    args.shards = args.shards or ([1, 4] if quick else [1, 2, 4, 8])
    args.shard_requests = args.shard_requests or (300 if quick else 1500)
    args.hot_requests = args.hot_requests or (600 if quick else 6000)
    if args.scaled_rate is None:
        args.scaled_rate = 0.0 if quick else 50.0
    args.scaled_requests = args.scaled_requests or 600
    if args.fixed_instances is None:
        args.fixed_instances = 0 if quick else 16
    for part in PARTS:  # --only X: every other part is off (shards includes its hot account)
        if args.only is not None and part not in args.only and not (
                part == "hot" and "shards" in args.only):
            setattr(args, f"no_{part}", True)
    args.no_waiting = args.no_waiting or args.waiting <= 0
    return args


def run(args: argparse.Namespace, connection_string: str, command: str,
        name: str) -> dict[str, Any]:
    """Every measurement the arguments ask for, as one JSON-able dict."""
    result: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "command": command, "machine": machine(), "quick": args.quick,
                              "cells": [], "drain": [], "failover": [], "paced": [],
                              "backlog": None, "overload": None, "shards": None}
    log = logging.getLogger("bench")
    if not args.no_drain:
        for latency in args.latency_ms:
            drained = measure_drain(connection_string, args.backlog, 200, latency)
            log.warning("drain %d at %g ms: %.0f requests/s", args.backlog, latency,
                        drained.rate)
            result["drain"].append(drained.as_dict())
        if args.profile:
            for latency in args.latency_ms:
                profile = args.out / f"profile-{name}-drain-{latency:g}ms.txt"
                measure_drain(connection_string, min(args.backlog, 1000), 200, latency, profile)
    if not args.no_cells:
        for latency in args.latency_ms:
            for workload in args.workloads:
                for strategy in args.strategies:
                    for instances in args.instances:
                        cell = run_cell(connection_string, strategy, workload, instances,
                                        latency, args.requests, args.seconds)
                        log.warning("%s %s %g ms x%d: %.0f/s", workload, strategy, latency,
                                    instances, cell.rate)
                        result["cells"].append(cell.as_dict())
        # Commit latency below the peak: the leader, spread deposits, 16 instances (or the
        # most asked for), offered at half of the best rate it reached in this run.
        for latency in args.latency_ms:
            best = [c for c in result["cells"] if c["strategy"] == "leader"
                    and c["workload"] == "spread" and c["latency_ms"] == latency]
            if not best or "leader" not in args.strategies:
                continue
            peak = max(c["rate"] for c in best)
            instances = 16 if 16 in args.instances else max(args.instances)
            paced = run_cell(connection_string, "leader", "spread", instances, latency,
                             args.requests, args.seconds, rate=max(1.0, peak / 2))
            log.warning("paced at %.0f/s, %g ms: p99 %s ms", peak / 2, latency, paced.p99_ms)
            result["cells"].append(paced.as_dict())
        # The lease blob under load: transfers offered at 1,000 deliveries/s (500 requests/s)
        # to the most instances asked for.
        if "leader" in args.strategies and "transfers" in args.workloads and not args.quick:
            for latency in args.latency_ms:
                loaded = run_cell(connection_string, "leader", "transfers", max(args.instances),
                                  latency, args.requests, args.seconds, rate=500)
                log.warning("1,000 deliveries/s offered at %g ms: %d delivered, lease %.0f/s",
                            latency, loaded.deliveries, loaded.lease_rps)
                result["cells"].append(loaded.as_dict())
    if not args.no_failover:
        kinds = ["release"] if args.quick else ["release", "sigkill"]
        for kind in kinds:
            for latency in args.latency_ms[:1] if args.quick else args.latency_ms:
                failover = measure_failover(connection_string, kind, latency,
                                            backlog=200 if args.quick else 1000)
                log.warning("failover after %s at %g ms: %s s", kind, latency, failover.seconds)
                result["failover"].append(failover.as_dict())
    if not args.no_waiting:
        backlog = measure_backlog(connection_string, args.waiting, args.requests, args.seconds,
                                  args.rounds, deliveries=args.sequential)
        log.warning("backlog of %d waiting: hot %s, per delivery mean %s, worst %s; full scan "
                    "%.2f s", args.waiting, backlog.hot_ratio, backlog.mean_ratio,
                    backlog.worst_ratio, backlog.full_scan.seconds if backlog.full_scan else 0)
        result["backlog"] = backlog.as_dict()
    if not args.no_overload:
        overload = measure_overload(connection_string, args.overload_deposits,
                                    args.overload_accounts, args.rounds)
        log.warning("overload: overloaded/clean %s; %d term(s) of 10 s or more, %d idle",
                    overload.ratio, overload.long_terms, overload.long_terms_idle)
        result["overload"] = overload.as_dict()
    if not (args.no_shards and args.no_hot):
        shards = measure_shards(
            connection_string, args.shards,
            [] if args.no_shards else scaling_series(
                args.shard_requests, args.partition_rate, args.shard_instances,
                args.scaled_rate, args.scaled_requests, args.fixed_instances),
            processes=args.shard_processes,
            cross_at=args.cross_shards, cross_requests=0 if args.no_shards else (
                max(1, args.shard_requests // 2) if args.cross_shards >= 2 else 0),
            hot_instances=args.hot_instances, hot_requests=args.hot_requests,
            rounds=args.rounds, partition_rate=args.partition_rate, hot=not args.no_hot)
        log.warning("shards: speed-up %s; cross/same %s; hot/intake %s", shards.speedup,
                    shards.cross_ratio, shards.hot_ratio)
        result["shards"] = shards.as_dict()
        if args.profile and not args.no_hot:  # where the hot account's leader spends its time
            stem = args.out / f"profile-{name}-hot"
            args.out.mkdir(parents=True, exist_ok=True)
            profiled = run_shard_cell(connection_string, "hot", 1, args.hot_requests,
                                      args.hot_instances, args.shard_processes,
                                      partition_rate=args.partition_rate,
                                      profile_to=str(stem))
            result["shards"]["hot_profile"] = {
                "rate": profiled.rate, "files": sorted(
                    str(p) for p in args.out.glob(f"{stem.name}-*.txt"))}
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results; print where they are."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("azure").setLevel(logging.ERROR)
    logging.getLogger("shared").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    command = "./dev bench " + shlex.join(argv) if argv else "./dev bench"
    name = args.name or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + (
        "-quick" if args.quick else "")
    if args.connection_string:
        data = run(args, args.connection_string, command, name)
    else:
        with Azurite(in_memory=True) as azurite:
            data = run(args, azurite.connection_string, command, name)
    paths = write(data, args.out, name)
    complete = not any(getattr(args, f"no_{part}") for part in PARTS)
    if complete and not args.quick:  # latest.* always hold a whole run
        for path in paths:
            shutil.copyfile(path, args.out / f"latest{path.suffix}")
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
