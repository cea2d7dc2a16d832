"""Every documented value of every setting works alone; the combinations that cannot are refused.

The ranges come from the README's settings table (its ``range`` column), so the documentation and
the code cannot drift apart: each end of each range is loaded with every other setting left at
its default, as a new user would try it.
"""

from __future__ import annotations

import re

import pytest

from shared.config.settings import SETTINGS, ConfigError, load_config
from simulator import REPO_ROOT

SETTING_NAMES = {setting.name for setting in SETTINGS}


def documented_ranges() -> dict[str, tuple[str, str]]:
    """``{setting: (low, high)}`` from the README's settings table."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    ranges: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        match = re.fullmatch(r"(\d+)-(\d+)", cells[2])
        if match:
            ranges[cells[0].strip("`")] = (match.group(1), match.group(2))
    return ranges


RANGES = documented_ranges()
RANGE_ENDS = [(name, end) for name, (low, high) in sorted(RANGES.items()) for end in (low, high)]


def test_the_readme_documents_a_range_for_every_numeric_setting() -> None:
    numeric = {s.name for s in SETTINGS
               if s.name.endswith("_SECONDS")
               or s.name in ("LEDGER_SHARDS", "RETENTION_DAYS", "INTAKE_QUEUES")}
    assert set(RANGES) == numeric
    assert numeric <= SETTING_NAMES


@pytest.mark.parametrize(("name", "value"), RANGE_ENDS, ids=[f"{n}={v}" for n, v in RANGE_ENDS])
def test_each_end_of_each_documented_range_works_alone(name: str, value: str) -> None:
    config = load_config({name: value}, instance_id="i1")
    election = config.election
    read = {
        "LEASE_SECONDS": election.lease_seconds,
        "RENEW_INTERVAL_SECONDS": election.renew_interval_seconds,
        "LEASE_SAFETY_MARGIN_SECONDS": election.safety_margin_seconds,
        "DRAIN_BUDGET_SECONDS": config.drain_budget_seconds,
        "REQUEST_TIMEOUT_SECONDS": config.request_timeout_seconds,
        "STORAGE_TIMEOUT_SECONDS": config.storage_timeout_seconds,
        "LEDGER_SHARDS": config.shards,
        "INTAKE_QUEUES": config.intake_queues,
        "RECONCILE_MAX_FLIGHT_SECONDS": config.reconcile_max_flight_seconds,
        "RETENTION_DAYS": config.retention_days,
    }
    assert read[name] == float(value)
    # The invariants the leader relies on (shared/election/elector.py).
    assert election.lease_seconds > election.renew_deadline_seconds
    assert election.renew_deadline_seconds > election.renew_interval_seconds > 0
    assert (election.renew_interval_seconds + config.storage_timeout_seconds
            <= election.renew_deadline_seconds)


@pytest.mark.parametrize(("name", "value"), [
    (name, str(int(end) + step)) for name, (low, high) in sorted(RANGES.items())
    for end, step in ((low, -1), (high, 1))
])
def test_just_outside_each_documented_range_is_refused_naming_the_setting(name: str,
                                                                          value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({name: value})


@pytest.mark.parametrize("lease", range(15, 61))
def test_every_lease_alone_derives_timings_that_fit(lease: int) -> None:
    election = load_config({"LEASE_SECONDS": str(lease)}, instance_id="i1").election
    assert election.renew_interval_seconds == lease // 3
    assert election.safety_margin_seconds == -(-lease // 6)  # a sixth, rounded up
    assert election.renew_interval_seconds + 5 <= election.renew_deadline_seconds < lease


@pytest.mark.parametrize(("env", "derived"), [
    ({"LEASE_SECONDS": "15"}, (5, 3)),
    ({"LEASE_SECONDS": "60"}, (20, 10)),
    ({"LEASE_SECONDS": "45"}, (15, 8)),
    ({"LEASE_SECONDS": "15", "RENEW_INTERVAL_SECONDS": "2"}, (2, 3)),
    ({"LEASE_SECONDS": "15", "LEASE_SAFETY_MARGIN_SECONDS": "5"}, (5, 5)),
    ({"RENEW_INTERVAL_SECONDS": "", "LEASE_SAFETY_MARGIN_SECONDS": "  "}, (20, 10)),
])
def test_only_the_unset_timings_are_derived(env: dict[str, str],
                                            derived: tuple[int, int]) -> None:
    election = load_config(env, instance_id="i1").election
    assert (election.renew_interval_seconds, election.safety_margin_seconds) == derived


@pytest.mark.parametrize(("env", "names", "fix"), [
    # An explicit renew interval that a short lease cannot hold.
    ({"LEASE_SECONDS": "15", "RENEW_INTERVAL_SECONDS": "12"},
     ("LEASE_SECONDS", "RENEW_INTERVAL_SECONDS"), "leave them unset"),
    # A margin that eats the whole gap between renewals.
    ({"LEASE_SECONDS": "15", "LEASE_SAFETY_MARGIN_SECONDS": "10"},
     ("LEASE_SAFETY_MARGIN_SECONDS", "RENEW_INTERVAL_SECONDS"), "15 s gives 5 and 3"),
    # The default storage timeout no longer fits a short lease with a late renewal.
    ({"LEASE_SECONDS": "15", "RENEW_INTERVAL_SECONDS": "8"},
     ("STORAGE_TIMEOUT_SECONDS", "RENEW_INTERVAL_SECONDS"), "at most 4"),
    # A long storage timeout with a short lease.
    ({"LEASE_SECONDS": "15", "STORAGE_TIMEOUT_SECONDS": "30"},
     ("STORAGE_TIMEOUT_SECONDS",), "at most 7"),
    # Each at its documented top: fine alone, not together.
    ({"RENEW_INTERVAL_SECONDS": "45", "STORAGE_TIMEOUT_SECONDS": "30"},
     ("STORAGE_TIMEOUT_SECONDS", "RENEW_INTERVAL_SECONDS"), "at most 5"),
    ({"LEASE_SAFETY_MARGIN_SECONDS": "30", "STORAGE_TIMEOUT_SECONDS": "30"},
     ("STORAGE_TIMEOUT_SECONDS", "LEASE_SAFETY_MARGIN_SECONDS"), "at most 10"),
])
def test_combinations_that_cannot_work_are_refused_with_the_fix(
        env: dict[str, str], names: tuple[str, ...], fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    message = str(caught.value)
    for name in names:
        assert name in message
    assert fix in message
