"""A bad setting stops the app when the host indexes it, with a message that says the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from simulator import REPO_ROOT


@pytest.mark.parametrize(("name", "value", "says"), [
    ("LEASE_SECONDS", "90", "LEASE_SECONDS=90 is out of range; set it between 15 and 60"),
    ("RENEW_INTERVAL_SECONDS", "55", "must be greater than RENEW_INTERVAL_SECONDS"),
    ("DRAIN_BUDGET_SECONDS", "600", "DRAIN_BUDGET_SECONDS=600 is out of range"),
])
def test_indexing_the_app_fails_fast_on_a_bad_setting(name: str, value: str, says: str) -> None:
    env = {**os.environ, name: value}
    run = subprocess.run([sys.executable, "-c", "import function_app"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "ConfigError" in run.stderr
    assert says in run.stderr


def test_indexing_succeeds_with_the_defaults() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LEASE_SECONDS"}
    run = subprocess.run([sys.executable, "-c", "import function_app"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
