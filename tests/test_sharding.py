"""Which shard owns what, and what each shard's storage is called (pure: no Azurite)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from shared.config.names import (
    MAX_SHARDS,
    SLOTS,
    completions_table_name,
    lease_blob_name,
    ledger_partition,
)
from shared.config.settings import ConfigError, load_config
from shared.domain.sharding import ShardMap, earlier_homes, slot_of


def test_slots_are_a_stable_hash_the_same_in_every_process() -> None:
    # Known values: a change here moves every account of every deployment to another shard.
    assert [slot_of(x) for x in ["alice", "bob", "tx-42", ""]] == [9, 24, 34, 2]
    other = subprocess.run(  # another interpreter, another PYTHONHASHSEED
        [sys.executable, "-c", "from shared.domain.sharding import slot_of; "
         "print(slot_of('alice'))"], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).parents[1])
    assert other.stdout.strip() == "9"


def test_slots_spread_ids_evenly_over_shards() -> None:
    counts = Counter(ShardMap(8).account_shard(f"account-{i}") for i in range(8000))
    assert set(counts) == set(range(8))
    assert min(counts.values()) > 800  # 1000 each on average


def test_one_shard_owns_everything() -> None:
    one = ShardMap(1)
    assert {one.account_shard(f"a{i}") for i in range(100)} == {0}
    assert one.home_of("r1", 2, "alice") == 0


def test_a_deposit_is_homed_on_its_account_and_a_transfer_on_its_request() -> None:
    shards = ShardMap(4)
    for i in range(50):
        account, request = f"acct-{i}", f"req-{i}"
        assert shards.home_of(request, 1, account) == shards.account_shard(account)
        assert shards.home_of(request, 2, account) == slot_of(request) % 4
        assert shards.home_of(request, 2, "other") == shards.home_of(request, 2, account)


def test_legs_group_by_the_shard_of_their_account() -> None:
    shards = ShardMap(4)
    legs = [(f"acct-{i}", Decimal(i)) for i in range(12)]
    grouped = shards.legs_by_shard(legs)
    assert sorted(leg for group in grouped.values() for leg in group) == sorted(legs)
    assert all(shards.account_shard(a) == k for k, group in grouped.items() for a, _ in group)


@pytest.mark.parametrize("shards", [0, MAX_SHARDS + 1])
def test_a_map_has_one_to_sixty_four_shards(shards: int) -> None:
    with pytest.raises(ValueError, match="1 to 64"):
        ShardMap(shards)


def test_shard_zero_keeps_the_unsharded_names() -> None:
    assert (lease_blob_name("ledger-leader", 0), ledger_partition(0),
            completions_table_name("completions", 0)) == ("ledger-leader", "ledger",
                                                          "completions")
    assert (lease_blob_name("ledger-leader", 3), ledger_partition(3),
            completions_table_name("completions", 3)) == ("ledger-leader-3", "ledger-3",
                                                          "completionsshard3")
    assert SLOTS == MAX_SHARDS == 64


@pytest.mark.parametrize(("value", "message"), [
    ("0", "out of range"), ("65", "out of range"), ("2.5", "whole number"),
    ("many", "not a number")])
def test_ledger_shards_is_validated_at_start_up(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"LEDGER_SHARDS": value})


def test_shard_table_names_must_fit_azure_limits() -> None:
    long_name = "c" * 58
    assert load_config({"COMPLETIONS_TABLE_NAME": long_name}).shards == 1  # fine alone
    with pytest.raises(ConfigError, match="at most 63 characters"):
        load_config({"COMPLETIONS_TABLE_NAME": long_name, "LEDGER_SHARDS": "4"})
    assert load_config({"LEDGER_SHARDS": "64"}).shards == 64


def test_a_map_is_64_slots_seeded_s_mod_k_and_resharded_to_the_seed_of_the_new_k() -> None:
    four = ShardMap(4)
    assert four.slots == tuple(s % 4 for s in range(SLOTS))
    assert four == ShardMap(4, tuple(s % 4 for s in range(SLOTS)))
    stored = ShardMap(4, generation=2)
    two = stored.resharded(2)
    assert (two.shards, two.generation, two.slots) == (2, 3, ShardMap(2).slots)
    assert stored.moved_slots(two) == [s for s in range(SLOTS) if s % 4 >= 2]
    custom = ShardMap(2, tuple([1] * SLOTS))  # any layout: every slot on shard 1
    assert {custom.account_shard(f"a{i}") for i in range(50)} == {1}
    with pytest.raises(ValueError, match="64 slots"):
        ShardMap(2, (0, 1))
    with pytest.raises(ValueError, match="64 slots"):
        ShardMap(2, tuple([2] * SLOTS))


def test_earlier_homes_name_the_shards_that_were_a_request_home_before() -> None:
    one, four = ShardMap(1, generation=1), ShardMap(4, generation=2)
    request = next(f"r{i}" for i in range(100) if four.request_shard(f"r{i}") != 0)
    assert earlier_homes(request, 2, "x", four, [one]) == [0]
    stay = next(f"r{i}" for i in range(100) if four.request_shard(f"r{i}") == 0)
    assert earlier_homes(stay, 2, "x", four, [one]) == []
    assert earlier_homes(request, 2, "x", four, []) == []
