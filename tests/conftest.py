"""Session fixtures and the suite's collection rules.

One private Azurite per test process, on loopback ports the kernel hands out (``./dev test`` runs
pytest-xdist workers, each with its own). At collection:

- every test that needs Azurite (the ``azurite`` fixture, directly or through another fixture such
  as ``ns``, or an Azurite of its own: ``STARTS_ITS_OWN_AZURITE``) gets the ``azurite`` marker, and
  every test that drives Chromium (the ``browser`` fixture) the ``chromium`` marker too, so that
  ``./dev test --fast`` (``-m "not azurite and not chromium"``) runs the rest without Node or a
  browser. A test without the marker that starts an Azurite fails and says where to add it;
- the known-slow tests go first, longest first, so that parallel workers start them at once and
  the run's tail is short (``SLOW_FIRST``; the order changes no test's outcome).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.azurite import Azurite
from tests.helpers import Namespace

# The SDKs log every HTTP request and response at INFO: keep the app's INFO logs, not theirs.
logging.getLogger("azure").setLevel(logging.WARNING)

# Tests that start an Azurite without the session fixture (their own, or the demo's in a child
# process): they need Node all the same.
STARTS_ITS_OWN_AZURITE = (
    "tests/test_chaos.py::test_the_chaos_run_loses_nothing_and_applies_nothing_twice",
    "tests/test_chaos.py::test_the_chaos_run_loses_nothing_and_applies_nothing_twice_across_"
    "four_shards",
    "tests/test_chaos.py::test_an_instance_keeps_listening_across_a_storage_restart",
    "tests/test_simulator.py::test_demo_through_four_instances_conserves_money",
    "tests/test_simulator.py::test_demo_with_the_leader_killed_fails_over_to_a_higher_epoch",
    "tests/test_simulator.py::test_sigterm_stops_the_demo_with_its_instances_and_its_private_azurite",
)

# The tests (node id prefixes) that take longest, longest first: they start first. The seconds
# are one parallel run's on a busy 2-core machine (--durations); a prefix can name a module.
SLOW_FIRST = (
    "tests/test_chaos.py::test_the_chaos_run_loses_nothing_and_applies_nothing_twice",  # 130
    # (the prefix covers the K = 4 run too: 71 s)
    "tests/test_model.py::test_the_protocol_keeps_the_contract_under_faults",  # 70
    "tests/test_model.py::test_shards_keep_the_contract_under_faults",  # 60
    "tests/test_limits.py::test_hundreds_of_conflicting_steps_recorded_behind_",  # 50
    "tests/infra/test_checkov.py",  # 20, one group: checkov runs once
    "tests/infra/",  # 20 in all, one group: the Bicep files are parsed once
    "tests/test_limits.py::test_more_conflicting_deliveries_of_one_step_add_one_row_only",  # 30
    "tests/test_model.py::test_late_steps_that_contradict_a_commit_are_parked",  # 25
    "tests/test_simulator.py::test_killing_the_leader_mid_drain_",  # 20
    "tests/test_demo_shards.py",  # 30
    "tests/test_simulator.py::test_demo_",  # 35 (two)
    "tests/test_status_page.py",  # 20, one group: one Chromium
    "tests/test_faults.py::test_throttling_on_the_lease_blob_",  # 17
    "tests/test_faults.py::test_failover_under_busy_storage_",  # 16
    "tests/test_limits.py::test_a_full_transaction_of_100_entities_",  # 16
    "tests/test_stranding.py::test_work_handed_to_a_holder_that_stops_",  # 16
    "tests/test_bench_smoke.py",  # 19 (two)
    "tests/test_expiry.py::test_the_same_steps_expire_whether_or_not_",  # 10
    "tests/test_limits.py::test_too_many_distinct_steps_",  # 9
    "tests/test_leader.py::test_sixteen_concurrent_invocations_",  # 9
    "tests/test_bad_input.py::test_the_parser_refuses_exactly_",  # 8
    "tests/test_slow_storage.py::test_under_overload_",  # 7
    "tests/test_late_steps_and_skewed_clocks.py::test_a_skewed_recording_instance_",  # 12
    "tests/test_simulator.py::test_sigterm_",  # 6
)
# Modules whose module-scoped fixtures or caches are costly (checkov, the Bicep parse, Chromium):
# each runs on one worker only (``--dist loadgroup``, see ``pytest_xdist_make_scheduler``).
# The first prefix that matches names the group.
# The chaos runs share one worker too: each is a cluster of instance processes and an Azurite,
# and two at once on 2 cores starve their instances past their queue messages' visibility.
GROUPS = ("tests/infra/test_checkov.py", "tests/infra/", "tests/test_status_page.py",
          "tests/test_chaos.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "azurite" in getattr(item, "fixturenames", ()) or \
                item.nodeid.startswith(STARTS_ITS_OWN_AZURITE):
            item.add_marker(pytest.mark.azurite)
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.chromium)

    def rank(item: pytest.Item) -> int:
        for position, prefix in enumerate(SLOW_FIRST):
            if item.nodeid.startswith(prefix):
                return position
        return len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the rest keep their collection order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: one test at a time to whichever worker is free, in collection order
    (slow first), except that each of ``GROUPS`` goes whole to one worker.

    xdist's own loadgroup reads ``xdist_group`` markers by renaming node ids, which pytest 9 no
    longer allows (the markers are silently ignored), hence this scheduler.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
        def _split_scope(self, nodeid: str) -> str:
            return next((prefix for prefix in GROUPS if nodeid.startswith(prefix)), nodeid)

    config.option.loadscopereorder = False  # keep the collection order: the slow tests first
    return GroupScheduling(config, log)


@pytest.fixture(autouse=True)
def _azurite_only_where_marked(request: pytest.FixtureRequest,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the ``azurite`` marker honest: ``--fast`` must not meet a test that needs Node."""
    if request.node.get_closest_marker("azurite") is not None:
        return

    def refuse(self: Azurite, timeout: float = 60) -> Azurite:
        raise AssertionError(f"{request.node.nodeid} starts an Azurite: add it to "
                             "STARTS_ITS_OWN_AZURITE in tests/conftest.py")

    monkeypatch.setattr(Azurite, "start", refuse)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A real Azurite, started for the session (one per xdist worker) and stopped after it."""
    with Azurite(in_memory=True) as instance:
        yield instance


@pytest.fixture
def ns(azurite: Azurite) -> Namespace:
    """Storage names of this test alone."""
    return Namespace(azurite.connection_string)
