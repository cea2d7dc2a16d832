"""The leader's drain rate on a ready backlog, and a profile of that drain.

``backlog`` single-step deposits over ``accounts`` accounts are recorded as instances record them
(each row, then its marker in the ready index: ``record_bodies``; without latency, by 16
recorder threads) while the lease is held by someone else, so nothing drains them; then the
lease is released and one fresh instance (cold: no snapshot, no cached balances) runs one
election with ``latency_ms`` per call. The rate is backlog / time from the election's start to
its return, once every request is decided.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobLeaseClient

from bench.cells import Names, leader_app, prepare
from bench.probe import KINDS
from bench.workloads import account_name, deposit_body
from shared.domain.contract import parse_completion
from shared.leadership.elections import run_election
from shared.leadership.intake import announce_if_ready, record_completion

RECORDERS = 16  # threads that record a backlog (instances recording at once)


@dataclass
class DrainResult:
    """One drain measurement."""

    backlog: int
    accounts: int
    latency_ms: float
    decided: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    terms: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    profile: str = ""  # path of the profile, when one was taken

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_bodies(connection_string: str, names: Names, bodies: Sequence[bytes],
                  threads: int = RECORDERS) -> None:
    """Record message bodies as instances would, ``threads`` at a time, without latency.

    Each one is what a delivery does before its lease attempt (``shared.leadership.pipeline``): its
    row,
    then a marker in the ready index when that decides its request. No election runs.
    """
    probe = names.probe(0)
    recorders = [leader_app(connection_string, names, probe, f"recorder-{i}")
                 for i in range(threads)]
    prepare(recorders[0])

    def record(index: int) -> None:
        app = recorders[index]
        for body in bodies[index::len(recorders)]:
            completion = parse_completion(body)
            announce_if_ready(app, completion, record_completion(app, completion))

    with ThreadPoolExecutor(len(recorders)) as pool:
        list(pool.map(record, range(len(recorders))))


def record_backlog(connection_string: str, names: Names, backlog: int, accounts: int) -> None:
    """Record ``backlog`` ready deposits over ``accounts`` accounts, announced."""
    record_bodies(connection_string, names,
                  [deposit_body(f"d{n:06d}", account_name(n % accounts), "1.25")
                   for n in range(backlog)])


def measure_drain(connection_string: str, backlog: int, accounts: int, latency_ms: float,
                  profile_to: Path | None = None) -> DrainResult:
    """Record a backlog behind someone else's lease, then time one leader draining it."""
    names = Names()
    result = DrainResult(backlog, accounts, latency_ms)
    setup = leader_app(connection_string, names, names.probe(0), "setup")
    prepare(setup)
    holder = BlobLeaseClient(setup.clients.blob.get_blob_client(setup.config.lease_container,
                                                                setup.config.lease_blob))
    holder.acquire(lease_duration=60)
    record_backlog(connection_string, names, backlog, accounts)
    holder.release()
    probe = names.probe(latency_ms)
    app = leader_app(connection_string, names, probe, "drainer")
    profiler = None
    if profile_to is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001)
        profiler.start()
    started = time.monotonic()
    while True:  # one election drains it all unless a term stopped early (budget, fence)
        election = run_election(app)
        result.terms += len(election.terms)
        if not election.stopped_by or time.monotonic() - started > 600:
            break
    result.seconds = time.monotonic() - started
    if profiler is not None and profile_to is not None:
        profiler.stop()
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO(profiler.output_text(unicode=False, color=False, show_all=False))
        profile_to.write_text(text.getvalue())
        result.profile = str(profile_to)
    calls = probe.reset()
    result.calls = {kind: calls[kind] for kind in KINDS if calls.get(kind)}
    result.decided = len(setup.ledger.list_outcomes())
    result.rate = result.decided / result.seconds if result.seconds else 0.0
    return result
