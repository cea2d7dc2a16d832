"""Configuration: ``load_config`` validation, host.json, and storage clients from app settings.

No storage call is made here: clients are built, never used.
"""

from __future__ import annotations

import json

import pytest
from azure.identity import ManagedIdentityCredential

from shared.config import settings
from shared.config.settings import (
    FUNCTION_TIMEOUT_SECONDS,
    SETTINGS,
    ConfigError,
    load_config,
)
from shared.storage.clients import clients_from_settings
from simulator import REPO_ROOT
from simulator.hostjson import read_host_json, timespan_seconds

host_json = read_host_json
seconds = timespan_seconds


# --- load_config ---------------------------------------------------------------------------
def test_defaults() -> None:
    config = load_config({}, instance_id="i1")
    assert config.completions_queue == "completions"
    assert config.poison_queue == "completions-poison"
    assert config.completions_table == "completions"
    assert config.ledger_table == "ledger"
    assert config.parked_table == "parkedmessages"
    assert config.lease_container == "leader-election"
    assert config.lease_blob == "ledger-leader"
    assert config.election.lease_seconds == 60
    assert config.election.renew_interval_seconds == 20
    assert config.election.safety_margin_seconds == 10
    assert config.election.renew_deadline_seconds == 50
    assert config.drain_budget_seconds == 240
    assert config.request_timeout_seconds == 900
    assert config.storage_timeout_seconds == 5
    assert config.instance_id == "i1"


def test_every_setting_is_read_and_blank_means_default() -> None:
    env = {"COMPLETIONS_QUEUE_NAME": "q", "COMPLETIONS_TABLE_NAME": "c", "LEDGER_TABLE_NAME": "l",
           "PARKED_TABLE_NAME": "p", "LEASE_CONTAINER_NAME": "lc", "LEASE_BLOB_NAME": "lb",
           "LEASE_SECONDS": "30", "RENEW_INTERVAL_SECONDS": "8",
           "LEASE_SAFETY_MARGIN_SECONDS": "5", "DRAIN_BUDGET_SECONDS": "100",
           "REQUEST_TIMEOUT_SECONDS": "60", "STORAGE_TIMEOUT_SECONDS": " 2 "}
    config = load_config(env, instance_id="i1")
    assert (config.completions_queue, config.completions_table, config.ledger_table,
            config.parked_table, config.lease_container, config.lease_blob) == (
        "q", "c", "l", "p", "lc", "lb")
    assert (config.election.lease_seconds, config.election.renew_interval_seconds,
            config.election.safety_margin_seconds) == (30, 8, 5)
    assert (config.drain_budget_seconds, config.request_timeout_seconds,
            config.storage_timeout_seconds) == (100, 60, 2)
    assert load_config({"LEASE_SECONDS": "  ", "COMPLETIONS_QUEUE_NAME": ""},
                       instance_id="i1").election.lease_seconds == 60


def test_instance_id_defaults_to_something_unique_per_process() -> None:
    assert load_config({}).instance_id == settings.default_instance_id()
    assert load_config({}).instance_id


@pytest.mark.parametrize("value", ["14", "61", "abc", "0", "-60", "14.9"])
def test_lease_seconds_outside_15_to_60_fails_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError, match="LEASE_SECONDS") as caught:
        load_config({"LEASE_SECONDS": value})
    assert "15" in str(caught.value)
    assert "60" in str(caught.value)


@pytest.mark.parametrize("value", ["15", "60", "45"])
def test_lease_seconds_at_and_inside_the_limits_is_accepted(value: str) -> None:
    env = {"LEASE_SECONDS": value, "RENEW_INTERVAL_SECONDS": "4",
           "LEASE_SAFETY_MARGIN_SECONDS": "5"}
    assert load_config(env).election.lease_seconds == float(value)


@pytest.mark.parametrize(("lease", "renew", "margin"), [
    ("60", "50", "10"),  # renew == lease - margin
    ("60", "55", "10"),
    ("15", "10", "5"),
    ("30", "25", "10"),
])
def test_renewing_no_sooner_than_lease_minus_margin_is_refused(lease: str, renew: str,
                                                              margin: str) -> None:
    env = {"LEASE_SECONDS": lease, "RENEW_INTERVAL_SECONDS": renew,
           "LEASE_SAFETY_MARGIN_SECONDS": margin}
    with pytest.raises(ConfigError, match="RENEW_INTERVAL_SECONDS") as caught:
        load_config(env)
    assert "LEASE_SAFETY_MARGIN_SECONDS" in str(caught.value)


def test_a_storage_timeout_that_leaves_no_time_to_commit_is_refused() -> None:
    # lease 15, margin 5 -> renew deadline 10; renew every 5 s leaves 5 s for one storage call.
    timings = {"LEASE_SECONDS": "15", "RENEW_INTERVAL_SECONDS": "5",
               "LEASE_SAFETY_MARGIN_SECONDS": "5"}
    with pytest.raises(ConfigError, match="STORAGE_TIMEOUT_SECONDS=20 does not fit") as caught:
        load_config({**timings, "STORAGE_TIMEOUT_SECONDS": "20"})
    assert "at most 5" in str(caught.value)
    # Below the deadline but longer than the gap between renewals: the leader would give its
    # lease up before the next renewal, so this is refused too.
    with pytest.raises(ConfigError, match="STORAGE_TIMEOUT_SECONDS=6 does not fit"):
        load_config({**timings, "STORAGE_TIMEOUT_SECONDS": "6"})
    assert load_config({**timings, "STORAGE_TIMEOUT_SECONDS": "5"}).storage_timeout_seconds == 5


def test_a_fractional_lease_is_refused() -> None:
    with pytest.raises(ConfigError, match="whole seconds"):
        load_config({"LEASE_SECONDS": "15.5"})


def test_renewing_just_inside_lease_minus_margin_is_accepted() -> None:
    env = {"LEASE_SECONDS": "60", "RENEW_INTERVAL_SECONDS": "49",
           "LEASE_SAFETY_MARGIN_SECONDS": "10", "STORAGE_TIMEOUT_SECONDS": "1"}
    assert load_config(env).election.renew_deadline_seconds == 50
    with pytest.raises(ConfigError, match="STORAGE_TIMEOUT_SECONDS=5 does not fit"):
        load_config({**env, "STORAGE_TIMEOUT_SECONDS": "5"})


@pytest.mark.parametrize(("name", "value"), [
    ("RENEW_INTERVAL_SECONDS", "0"),
    ("RENEW_INTERVAL_SECONDS", "soon"),
    ("LEASE_SAFETY_MARGIN_SECONDS", "0"),
    ("LEASE_SAFETY_MARGIN_SECONDS", "31"),
    ("REQUEST_TIMEOUT_SECONDS", "0"),
    ("STORAGE_TIMEOUT_SECONDS", "61"),
    ("DRAIN_BUDGET_SECONDS", "0"),
    ("DRAIN_BUDGET_SECONDS", "ten"),
])
def test_other_bad_numbers_fail_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({name: value})


def test_drain_budget_must_leave_30_s_of_the_function_timeout() -> None:
    limit = FUNCTION_TIMEOUT_SECONDS - 30
    assert load_config({"DRAIN_BUDGET_SECONDS": str(limit)}).drain_budget_seconds == limit
    with pytest.raises(ConfigError, match="DRAIN_BUDGET_SECONDS"):
        load_config({"DRAIN_BUDGET_SECONDS": str(limit + 1)})
    with pytest.raises(ConfigError, match="DRAIN_BUDGET_SECONDS"):
        load_config({"DRAIN_BUDGET_SECONDS": str(FUNCTION_TIMEOUT_SECONDS)})


# --- host.json and the settings list -------------------------------------------------------
def test_host_json_function_timeout_is_the_one_the_settings_check_against() -> None:
    assert seconds(host_json()["functionTimeout"]) == FUNCTION_TIMEOUT_SECONDS


def test_host_json_sets_the_queue_extension_deliberately() -> None:
    queues = host_json()["extensions"]["queues"]
    assert {"batchSize", "maxDequeueCount", "visibilityTimeout", "messageEncoding"} <= set(queues)
    assert 1 <= queues["batchSize"] <= 32  # the host's limit
    assert queues["maxDequeueCount"] >= 1
    assert seconds(queues["visibilityTimeout"]) > 0
    # The CLI and the simulator send with TextBase64EncodePolicy: the host must decode base64.
    assert queues["messageEncoding"] == "base64"


def test_the_default_drain_budget_fits_inside_host_json_function_timeout() -> None:
    timeout = seconds(host_json()["functionTimeout"])
    assert load_config({}).drain_budget_seconds <= timeout - 30


def test_local_settings_sample_lists_every_setting_with_its_default() -> None:
    values = json.loads((REPO_ROOT / "local.settings.sample.json").read_text())["Values"]
    for setting in SETTINGS:
        assert values.get(setting.name) == setting.default, setting.name
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    load_config(values)  # the sample itself is a valid configuration


# --- storage clients from the settings ---------------------------------------------------------
def test_no_storage_setting_fails_naming_the_settings() -> None:
    with pytest.raises(ConfigError) as caught:
        clients_from_settings({})
    message = str(caught.value)
    for name in ("AzureWebJobsStorage", "AzureWebJobsStorage__blobServiceUri",
                 "AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__tableServiceUri",
                 "AzureWebJobsStorage__credential"):
        assert name in message


def test_a_partial_identity_configuration_names_what_is_missing() -> None:
    env = {"AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net"}
    with pytest.raises(ConfigError, match="missing: queue, table"):
        clients_from_settings(env)


def test_identity_settings_build_clients_for_the_given_uris() -> None:
    env = {
        "AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net",
        "AzureWebJobsStorage__queueServiceUri": "https://acct.queue.core.windows.net",
        "AzureWebJobsStorage__tableServiceUri": "https://acct.table.core.windows.net",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001",
    }
    clients = clients_from_settings(env, timeout_seconds=3)
    assert clients.blob.url.rstrip("/") == "https://acct.blob.core.windows.net"
    assert clients.queue.url.rstrip("/") == "https://acct.queue.core.windows.net"
    assert clients.table.url.rstrip("/") == "https://acct.table.core.windows.net"
    assert clients.blob.account_name == "acct"
    assert isinstance(clients.blob.credential, ManagedIdentityCredential)
    assert isinstance(clients.table.credential, ManagedIdentityCredential)


def test_an_account_name_is_enough_for_the_public_cloud_uris() -> None:
    clients = clients_from_settings({"AzureWebJobsStorage__accountName": "acct",
                                     "AzureWebJobsStorage__credential": "managedidentity"})
    assert clients.queue.url.rstrip("/") == "https://acct.queue.core.windows.net"
    assert clients.table.url.rstrip("/") == "https://acct.table.core.windows.net"


def test_a_connection_string_wins_over_identity_settings() -> None:
    env = {"AzureWebJobsStorage": "UseDevelopmentStorage=true",
           "AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net"}
    clients = clients_from_settings(env)
    assert clients.blob.url.startswith("http://127.0.0.1:10000/devstoreaccount1")
    assert clients.queue.url.startswith("http://127.0.0.1:10001/devstoreaccount1")
    assert clients.table.url.startswith("http://127.0.0.1:10002/devstoreaccount1")
