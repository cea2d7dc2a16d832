"""``./dev demo --shards 4 --queues 2 --kill-leader``: the sharded demo end to end.

A private Azurite, real instance processes, a workload that crosses shards (two-leg transfers
between shards, some kept on one shard, some of 3-4 legs) spread over two intake queues; a
third of the way in the demo SIGKILLs a lease holder. The demo's own checks must pass (exit 0):
money conserved to the cent over every shard, nothing left in flight, the independent checker's
verdict clean, and every shard the killed process held taken over (a higher epoch claimed by
another process). Sized for a 2-core CI machine: 25-30 s alone, about 105 s with two more
copies running beside it.

It needs ``INTAKE_QUEUES`` in the app (one queue trigger per intake queue): without it the demo
stops at once, saying that nothing listens on ``completions-1``.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from simulator import REPO_ROOT
from simulator.azurite import Azurite

SHARDS = 4


def _summary_lines(stdout: str, prefix: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(prefix)]


def _find(pattern: str, stdout: str) -> re.Match[str]:
    found = re.search(pattern, stdout, flags=re.M)
    assert found is not None, f"no line matches {pattern!r}:\n{stdout}"
    return found


@pytest.mark.slow
@pytest.mark.azurite
def test_sharded_demo_over_two_queues_survives_a_killed_holder_and_conserves_money() -> None:
    with Azurite(in_memory=True) as own:  # the demo uses the default names
        run = subprocess.run(
            [sys.executable, "-m", "simulator", "demo", "--shards", str(SHARDS), "--queues", "2",
             "--kill-leader", "--instances", "4", "--accounts", "12", "--transfers", "60",
             "--malformed", "3", "--timeout", "150", "--connection-string",
             own.connection_string],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "CHECK FAILED" not in out
    # The workload crossed shards, kept some transfers on one shard, and had 3-4-leg requests.
    layout = _find(r"^Layout: 4 shard\(s\): (\d+) request\(s\) cross shards, (\d+) transfer\(s\) "
                   r"stay on their home shard, (\d+) have 3-4 legs", out)
    assert all(int(n) > 0 for n in layout.groups()), layout[0]
    # The conservation check over every shard, and the checker's verdict.
    _find(rf"^Money: .* over 12 accounts on {SHARDS} shards -> conserved to the cent$", out)
    assert "0 lost, 0 double-applied, 0 partial requests, 0 drift" in out
    # One line per shard, each with nothing left in flight.
    shard_lines = _summary_lines(out, "  shard ")
    per_shard = [line for line in shard_lines if "| in flight " in line]
    assert [int(_find(r"^  shard (\d+):", line)[1]) for line in per_shard] == list(
        range(SHARDS)), out
    assert all(line.endswith("| in flight 0") for line in per_shard), out
    # Both queues were used; nothing poisoned on either.
    for name in ("completions", "completions-1"):
        _find(rf"^  {name} +\d+ message\(s\) sent, .* 0 in {name}-poison$", out)
    # The killed process's shards, each taken over by a higher epoch of another process.
    [must] = _summary_lines(out, "Shards that must show a takeover: ")
    held = [int(k) for k in must.rsplit(": ", 1)[1].split(", ")]
    assert held, out
    assert set(held) <= set(range(SHARDS)), out
    killed_pid = int(_find(r"^Killed at .*\(pid (\d+)\)", out)[1])
    for shard in held:
        found = _find(rf"^  shard {shard}: epoch (\d+) at the kill -> epoch (\d+) by "
                      rf"i\d+:(\d+): taken over$", out)
        before, after, pid = (int(g) for g in found.groups())
        assert after > before, out
        assert pid != killed_pid, out
    # The status page's data shows a takeover from the killed process on exactly the shards
    # where it died in a term (the demo compares them; here the line says which).
    page = _find(r"^Status page: a takeover from the killed process on shard\(s\) ([\d, ]*) "
                 r"\(it died in a term on ([\d, ]*)[;)]", out)
    assert page[1] == page[2], out
    assert set(int(k) for k in page[1].split(", ") if k) <= set(held), out
