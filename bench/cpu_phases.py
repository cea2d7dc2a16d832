"""Where the CPU goes in the hot-account cells: thread CPU by phase, per request, side by side.

    .venv/bin/python -m bench.cpu_phases                       # intake, hot, hot, intake

A diagnostic for ``bench.shards``' hot account against the intake floor (same generator, same
cells). Before the generator forks, it wraps the phases of a delivery and of a term with
``time.thread_time()`` deltas (the CPU of the calling thread only, so nested phases are
included in their callers): ``record`` (``record_completion``), ``announce``
(``announce_if_ready``), ``election`` (``run_election`` from the queue trigger: the lease attempt
and, for the leader, its term), ``lead`` (``Election._lead``: the term alone), ``cleaner``
(``RowCleaner._delete``: deletes of consumed rows and tombstones, on the cleaner's threads), and
``process`` (all threads of the generator's processes, ``getrusage``). Each process writes its
sums to a file twice a second; the figures are milliseconds of CPU per request, with Azurite's
from ``CpuMeter``. On a machine where the generator and Azurite share two saturated cores, the
hot/intake rate ratio is bounded by the ratio of these costs.

The cleaner's batching of deletes (``RowCleaner.flush``: after each round only the ready
index's markers and half-full step-row partitions) was first tried here by patching the class;
it is production behaviour since (bench/README.md, "The hot account against the intake floor").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.shards import run_shard_cell
from shared.leadership import elections, intake
from shared.storage import cleanup
from simulator.azurite import Azurite

PHASES = ("record", "announce", "election", "lead", "cleaner", "process")


class PhaseClock:
    """Thread CPU by phase in this process, written to ``folder`` twice a second."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def _dump_forever(self) -> None:
        while True:
            time.sleep(0.5)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            with self._lock:
                data = {**self.spent, "process": usage.ru_utime + usage.ru_stime}
            (self.folder / f"cpu-{os.getpid()}.json").write_text(json.dumps(data))

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._pid != os.getpid():  # first call in a (forked) process: start its writer
                self._pid = os.getpid()
                threading.Thread(target=self._dump_forever, daemon=True).start()
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.spent[phase] = self.spent.get(phase, 0.0) + (
                        time.thread_time() - started)
        return timed

    def install(self) -> None:
        """Wrap the phases (module attributes are looked up at call time, so the callers, in
        this process and in the processes it forks later, go through the wrappers)."""
        for module, name, phase in ((intake, "record_completion", "record"),
                                    (intake, "announce_if_ready", "announce"),
                                    (intake, "run_election", "election"),
                                    (elections.Election, "_lead", "lead"),
                                    (cleanup.RowCleaner, "_delete", "cleaner")):
            setattr(module, name, self.wrap(phase, getattr(module, name)))
        for name in ("record_completion", "announce_if_ready"):  # the intake floor's path
            setattr(loadgen, name, getattr(intake, name))

    def collect(self) -> Counter[str]:
        """The sums of every process, and start again."""
        time.sleep(1.0)  # the last writes
        total: Counter[str] = Counter()
        for path in self.folder.glob("cpu-*.json"):
            total.update(json.loads(path.read_text()))
            path.unlink()
        return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_phases",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--cells", nargs="+", default=["intake", "hot", "hot", "intake"],
                        choices=["intake", "hot"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("azure").setLevel(logging.ERROR)
    logging.getLogger("shared").setLevel(logging.ERROR)
    clock = PhaseClock(Path(tempfile.mkdtemp(prefix="cpu-phases-")))
    clock.install()
    rates: dict[str, list[float]] = {}
    with Azurite(in_memory=True) as azurite:
        for kind in args.cells:
            cell = run_shard_cell(azurite.connection_string, kind, 1, args.requests,
                                  args.instances, args.processes)
            spent = clock.collect()
            per = {phase: round(spent[phase] * 1000 / args.requests, 2) for phase in PHASES
                   if phase in spent}
            tokens = cell.load["throttling"]["tokens"]
            calls = cell.load["calls"]
            print(f"{kind}: {cell.rate:.0f}/s; ms of CPU per request {per}, Azurite "
                  f"{cell.cpu['azurite_cpu_s'] * 1000 / args.requests:.2f}; ready-index "
                  f"entities per request {tokens.get('ready', 0) / args.requests:.2f}, delete "
                  f"calls per request {calls.get('delete', 0) / args.requests:.2f}", flush=True)
            rates.setdefault(kind, []).append(cell.rate)
    means = {kind: sum(found) / len(found) for kind, found in rates.items()}
    if means.get("intake") and means.get("hot"):
        print(f"hot / intake: {means['hot'] / means['intake']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
