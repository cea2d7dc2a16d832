"""Write one run's results: JSON (everything), a Markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(run: dict[str, Any]) -> str:
    """The run as Markdown: headline, cells, drain, failover."""
    lines = [f"# Benchmark run {run['started']}", "",
             f"Command: `{run['command']}`  ", f"Machine: {run['machine']}", ""]
    if run.get("drain"):
        lines += ["## Leader drain rate on a ready backlog", "",
                  "| backlog | accounts | latency ms | decided | seconds | requests/s | terms | "
                  "calls by kind |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for d in run["drain"]:
            calls = ", ".join(f"{k} {v}" for k, v in d["calls"].items())
            lines.append(f"| {d['backlog']} | {d['accounts']} | {d['latency_ms']:g} | "
                         f"{d['decided']} | {d['seconds']:.2f} | **{d['rate']:.0f}** | "
                         f"{d['terms']} | {calls} |")
        lines.append("")
    if run.get("failover"):
        lines += ["## Failover (leader ends -> first commit by another instance)", "",
                  "| how the leader ended | latency ms | lease s | deliveries/s | seconds |",
                  "|---|---:|---:|---:|---:|"]
        for f in run["failover"]:
            lines.append(f"| {f['kind']} | {f['latency_ms']:g} | {f['lease_seconds']} | "
                         f"{f['delivery_rate']:g} | {_num(f['seconds'], 2)} |")
        lines.append("")
    if run.get("backlog"):
        lines += _backlog(run["backlog"])
    if run.get("overload"):
        lines += _overload(run["overload"])
    if run.get("shards"):
        lines += _shards(run["shards"])
    if not run["cells"]:
        return "\n".join(lines) + "\n"
    lines += ["## Strategies side by side", "",
              "Rate: committed requests/s. Latency: last step enqueued -> committed. Calls: "
              "storage calls per committed request (record / ready / lease / alarm / scan / "
              "read / commit / delete = total). Lease: requests/s on lease blobs.", "",
              "| workload | latency ms | strategy | instances | offered/s | committed | "
              "rate/s | p50 ms | p99 ms | calls per request | lease req/s | lease/delivery |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for c in run["cells"]:
        if c["skipped"]:
            lines.append(f"| {c['workload']} | {c['latency_ms']:g} | {c['strategy']} | "
                         f"{c['instances']} | | | n/a: {c['skipped']} | | | | | |")
            continue
        per = c["calls_per_request"]
        calls = " / ".join(_num(per.get(k), 2) for k in
                           ("record", "ready", "lease", "alarm", "scan", "read", "commit",
                            "delete"))
        offered = _num(c["offered_rate"]) if c["offered_rate"] else "backlog"
        lines.append(f"| {c['workload']} | {c['latency_ms']:g} | {c['strategy']} | "
                     f"{c['instances']} | {offered} | {c['committed']}/{c['sent']} | "
                     f"**{c['rate']:.0f}** | {_num(c['p50_ms'])} | {_num(c['p99_ms'])} | "
                     f"{calls} = {_num(per.get('total'), 2)} | {c['lease_rps']:.0f} | "
                     f"{_num(c.get('lease_per_delivery'), 2)} |")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None, target: str) -> str:
    return "-" if value is None else f"**{value:.2f}** (target {target})"


def _backlog(b: dict[str, Any]) -> list[str]:
    """The backlog benchmark: cells side by side, ratios, the full scan alone."""
    lines = [f"## Requests waiting for their steps: {b['waiting']:,} vs none", "",
             f"{b['latency_ms']:g} ms per call, cells alternating, {b['rounds']} round(s). Hot: "
             f"the leader's hot-account cell, {b['instances']} instances. Sequential: "
             f"{b['deliveries']} deposits delivered one after the other to one instance. "
             "Scans: full-scan calls inside the measured window.", "",
             "| cell | waiting | recorded in s | committed | rate/s | mean s | worst s | scans | "
             "calls by kind |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in b["cells"]:
        hot = c["kind"] == "hot"
        calls = ", ".join(f"{k} {v}" for k, v in c["calls"].items())
        lines.append(f"| {c['kind']} | {c['waiting']:,} | {c['record_seconds']:.1f} | "
                     f"{c['committed']} | {_num(c['rate']) if hot else ''} | "
                     f"{'' if hot else _num(c['mean_s'], 3)} | "
                     f"{'' if hot else _num(c['worst_s'], 3)} | {c['scans']} | {calls} |")
    lines += ["", f"- hot-account rate, with / without: {_ratio(b['hot_ratio'], '>= 0.9')}",
              f"- seconds per sequential delivery, with / without: mean "
              f"{_ratio(b['mean_ratio'], '<= 1.2')}, worst {_ratio(b['worst_ratio'], '<= 1.2')}"]
    scan = b.get("full_scan")
    if scan:
        calls = ", ".join(f"{k} {v}" for k, v in scan["calls"].items())
        lines.append(f"- the sweeper's full scan alone (once a minute per deployment), "
                     f"{scan['latency_ms']:g} ms per call: **{scan['seconds']:.2f} s** for "
                     f"{scan['rows']:,} rows of {scan['requests']:,} requests, "
                     f"{scan['announced']} announced ({calls})")
    return [*lines, ""]


def _overload(o: dict[str, Any]) -> list[str]:
    """The overload benchmark: clean and overloaded drains side by side, the long terms."""
    lines = [f"## Overload: {o['deposits']} deposits over {o['accounts']} accounts", "",
             f"Every call {o['delay_s'] * 1000:g} ms later; overloaded: also "
             f"{o['timeout_probability']:.0%} of account and outcome reads time out "
             f"(STORAGE_TIMEOUT_SECONDS={o['storage_timeout_s']:g}). {o['rounds']} round(s), "
             "alternating. Terms: lease held (s) / requests committed, per term.", "",
             "| cell | decided | seconds | rate/s | elections | timeouts injected | terms |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for c in o["cells"]:
        terms = ", ".join(f"{_num(t['held_s'], 1)} s / {t['committed']}" for t in c["terms"])
        lines.append(f"| {c['kind']} | {c['decided']}/{c['deposits']} | {c['seconds']:.2f} | "
                     f"**{c['rate']:.1f}** | {c['elections']} | {c['timeouts_injected']} | "
                     f"{terms} |")
    lines += ["", f"- commit rate, overloaded / clean: {_ratio(o['ratio'], '>= 0.25')}",
              f"- terms that held the lease {o['long_term_seconds']:g} s or more: "
              f"{o['long_terms']}, of which committed nothing: **{o['long_terms_idle']}** "
              "(target 0)"]
    return [*lines, ""]


def _waits(throttling: dict[str, dict[str, float]]) -> str:
    """Seconds requests waited for their partition's tokens, by partition kind."""
    waited = throttling.get("waited_s", {})
    return ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in sorted(waited.items())) or "0"


def _tokens(cell: dict[str, Any]) -> str:
    """Tokens taken per request from each kind of partition (ledger, ready index, steps)."""
    tokens = cell["load"].get("throttling", {}).get("tokens", {})
    if not cell["requests"]:
        return ""
    return ", ".join(f"{kind} {count / cell['requests']:.1f}"
                     for kind, count in sorted(tokens.items()))


def _met(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return "**met**" if value >= target else "**not met**"


def _shards(r: dict[str, Any]) -> list[str]:
    """The sharding benchmark: scaling with K, cross against same shard, hot against intake."""
    machine = " -> ".join(f"{x:.1f}" for x in r["machine_load"])
    lines = ["## Shards", "",
             f"{r['latency_ms']:g} ms per call; table partitions limited to "
             f"{r['partition_rate']:,.0f} entities/s each (bench/limiter.py); the multi-process "
             "load generator (bench/loadgen.py). Rate: requests that read final (committed and "
             "settled) per second, from the start to the last of them. Intake: deliveries "
             "handled per second. CPU: cores used over the cell (Azurite / the benchmark's "
             f"processes). Machine load (1 min) {machine}.",
             "",
             "| cell | K | partition limit/s | instances | processes | final/requests | crossed | "
             "rate/s | intake deliveries/s | tail s | CPU Azurite / bench | waited s | "
             "tokens per request |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for c in r["cells"]:
        load, cpu = c["load"], c["cpu"]
        final = f"{c['announced']} announced" if c["kind"] == "intake" else \
            f"{c['committed']}/{c['requests']}"
        lines.append(
            f"| {c.get('series') or c['kind']} | {c['shards']} | {c['partition_rate']:,.0f} | "
            f"{c['instances']} | "
            f"{c['processes']} | {final} | {c['crossed']} | **{c['rate']:.0f}** | "
            f"{load.get('recorded_rate', 0.0):.0f} | {c['tail_s']:.1f} | "
            f"{cpu.get('azurite_cores', 0.0):.2f} / {cpu.get('bench_cores', 0.0):.2f} | "
            f"{_waits(load.get('throttling', {}))} | {_tokens(c)} |")
    lines.append("")
    for name, rates in r.get("scaling", {}).items():
        speed = r.get("speedup", {}).get(name, {})
        figures = ", ".join(f"K={k}: {rate:.0f}/s ({speed.get(k, 0.0):.2f}x)"
                            for k, rate in rates.items())
        lines.append(f"- {name}, committed requests/s (x K=1): {figures}")
    deposits = r.get("speedup", {}).get("deposits", {}).get("4")
    if deposits is not None:
        lines.append(f"- deposits, K=4 / K=1: **{deposits:.2f}x** (target >= 3.2x: "
                     f"{_met(deposits, 3.2)})")
    if r.get("cross_ratio") is not None:
        lines.append(f"- cross-shard / same-shard transfers at K={r['cross_shards']}: "
                     f"**{r['cross_ratio']:.2f}** (target >= 0.4: {_met(r['cross_ratio'], 0.4)})")
    if r.get("hot_ratio") is not None:
        lines.append(f"- hot account: committed / intake floor: **{r['hot_ratio']:.2f}** "
                     f"(target >= 0.7: {_met(r['hot_ratio'], 0.7)})")
    return [*lines, ""]


def plot(run: dict[str, Any], path: Path) -> None:
    """Committed requests/s against instances, one line per strategy, one panel per
    (workload, latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in run["cells"] if not c["skipped"] and c["offered_rate"] is None]
    panels = sorted({(c["workload"], c["latency_ms"]) for c in cells})
    if not panels:
        return
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (workload, latency) in zip(axes.flat, panels, strict=False):
        for strategy in ("leader", "naive", "single"):
            points = sorted((c["instances"], c["rate"]) for c in cells
                            if c["strategy"] == strategy and c["workload"] == workload
                            and c["latency_ms"] == latency)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=strategy)
        ax.set_title(f"{workload}, {latency:g} ms per call")
        ax.set_xlabel("instances")
        ax.set_ylabel("committed requests/s")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write(run: dict[str, Any], directory: Path, name: str) -> list[Path]:
    """Write ``name``.json, .md and .png into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (directory / f"{name}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(run, indent=1) + "\n")
    md_path.write_text(markdown(run))
    plot(run, png_path)  # nothing to plot without cells
    return [path for path in (json_path, md_path, png_path) if path.exists()]
