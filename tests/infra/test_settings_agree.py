"""The setting names and defaults in infra/, host.json and local.settings.sample.json agree with
the one source of truth in the code: ``shared/config/settings.py``."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from shared.config.names import MAX_INTAKE_QUEUES, MAX_SHARDS, poison_queue_name
from shared.config.settings import (
    ARCHIVE_CONTAINER_NAME,
    COMPLETIONS_QUEUE_NAME,
    COMPLETIONS_TABLE_NAME,
    DRAIN_BUDGET_SECONDS,
    FUNCTION_TIMEOUT_SECONDS,
    INTAKE_QUEUES,
    LEASE_CONTAINER_NAME,
    LEDGER_SHARDS,
    LEDGER_TABLE_NAME,
    OUTCOMES_QUEUE_NAME,
    PARKED_TABLE_NAME,
    SETTINGS,
    STORAGE_CONNECTION,
    STORAGE_IDENTITY_SUFFIXES,
    WAKEUP_QUEUE_NAME,
    load_config,
)
from simulator import REPO_ROOT
from simulator.hostjson import read_host_json, timespan_seconds
from tests.infra.bicep_model import BicepFile, Scope, app_settings_of, parse_bicepparam, root_scope

SETTING_NAMES = {setting.name for setting in SETTINGS}

# Settings the platform reads, not the app code: allowed beside SETTINGS.
PLATFORM_SETTINGS = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsFeatureFlags", STORAGE_CONNECTION}
PLATFORM_PREFIXES = (f"{STORAGE_CONNECTION}__", "APPLICATIONINSIGHTS_")


def _is_platform(name: str) -> bool:
    return name in PLATFORM_SETTINGS or name.startswith(PLATFORM_PREFIXES)


def _camel(setting_name: str) -> str:
    """COMPLETIONS_QUEUE_NAME -> completionsQueueName: the Bicep parameter of a setting."""
    first, *rest = setting_name.lower().split("_")
    return first + "".join(word.capitalize() for word in rest)


def _sample_values() -> dict[str, str]:
    sample = json.loads((REPO_ROOT / "local.settings.sample.json").read_text())
    return dict(sample["Values"])


def _deployed_settings(with_param_file: bool) -> dict[str, Any]:
    main = root_scope(with_param_file)
    _, app = main.module("modules/functionapp.bicep")
    return app_settings_of(app, app.file.one("Microsoft.Web/sites"))


@pytest.fixture(scope="module", params=[False, True], ids=["bicep-defaults", "bicepparam"])
def deployed(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The function app's settings with main.bicep's defaults, then with main.bicepparam."""
    return _deployed_settings(bool(request.param))


def test_sample_lists_every_setting_with_its_default() -> None:
    values = _sample_values()
    for setting in SETTINGS:
        assert values.get(setting.name) == setting.default, setting.name


def test_sample_has_no_setting_the_code_does_not_know() -> None:
    unknown = sorted(name for name in _sample_values()
                     if name not in SETTING_NAMES and not _is_platform(name))
    assert not unknown, f"local.settings.sample.json: unknown settings {unknown}"


def test_bicep_sets_every_setting_with_the_code_default(deployed: dict[str, Any]) -> None:
    for setting in SETTINGS:
        assert setting.name in deployed, f"the function app does not set {setting.name}"
        assert deployed[setting.name] == setting.default, setting.name


def test_each_setting_is_a_main_parameter_with_the_code_default() -> None:
    main = root_scope()
    for setting in SETTINGS:
        param = _camel(setting.name)
        assert param in main.file.params, f"main.bicep has no parameter {param} ({setting.name})"
        assert str(main.param(param)) == setting.default, param


def test_bicep_has_no_setting_the_code_does_not_know(deployed: dict[str, Any]) -> None:
    unknown = sorted(name for name in deployed
                     if name not in SETTING_NAMES and not _is_platform(name))
    assert not unknown, f"the function app sets unknown settings {unknown}"


def test_bicep_sets_the_identity_based_storage_connection(deployed: dict[str, Any]) -> None:
    for suffix in STORAGE_IDENTITY_SUFFIXES:
        assert f"{STORAGE_CONNECTION}__{suffix}" in deployed, suffix
    assert deployed[f"{STORAGE_CONNECTION}__credential"] == "managedidentity"
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in deployed
    assert "APPLICATIONINSIGHTS_AUTHENTICATION_STRING" in deployed


def _names(storage: Scope, resource_type: str) -> set[str]:
    return {storage.resolve(instance["name"])
            for resource in storage.file.of_type(resource_type).values()
            for instance in storage.instances(resource)}


@pytest.mark.parametrize("with_param_file", [False, True], ids=["bicep-defaults", "bicepparam"])
def test_storage_names_agree_with_the_code(with_param_file: bool) -> None:
    config = load_config({}, instance_id="test")
    storage = root_scope(with_param_file).module("modules/storage.bicep")[1]
    queues = _names(storage, "Microsoft.Storage/storageAccounts/queueServices/queues")
    assert queues == {COMPLETIONS_QUEUE_NAME.default, config.poison_queue,
                      WAKEUP_QUEUE_NAME.default, f"{WAKEUP_QUEUE_NAME.default}-poison",
                      OUTCOMES_QUEUE_NAME.default}
    assert config.completions_queue == COMPLETIONS_QUEUE_NAME.default
    tables = _names(storage, "Microsoft.Storage/storageAccounts/tableServices/tables")
    assert tables == {COMPLETIONS_TABLE_NAME.default, LEDGER_TABLE_NAME.default,
                      PARKED_TABLE_NAME.default}
    containers = _names(storage, "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert LEASE_CONTAINER_NAME.default in containers
    assert storage.param("deploymentContainerName") in containers
    assert len(containers) == 2, containers


@pytest.mark.parametrize("with_param_file", [False, True], ids=["bicep-defaults", "bicepparam"])
def test_the_archive_container_is_the_settings(with_param_file: bool) -> None:
    main = root_scope(with_param_file)
    _, module = main.module("modules/reconcile_alerts.bicep")
    containers = _names(module, "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert containers == {ARCHIVE_CONTAINER_NAME.default}
    app = _deployed_settings(with_param_file)
    assert app[ARCHIVE_CONTAINER_NAME.name] == ARCHIVE_CONTAINER_NAME.default
QUEUE_TYPE = "Microsoft.Storage/storageAccounts/queueServices/queues"


@pytest.mark.parametrize("count", [1, 2, 3, MAX_INTAKE_QUEUES])
def test_the_intake_queues_bicep_creates_are_the_ones_the_app_reads(count: int) -> None:
    # intakeQueues=Q: queues 0..Q-1 and their poison queues, named as shared/config/names.py
    # names them, the wake-up queue kept; and the app setting says Q.
    main = Scope(root_scope().file, {"intakeQueues": count})
    config = load_config({INTAKE_QUEUES.name: str(count)}, instance_id="test")
    assert len(config.intake_queue_names) == count
    expected = {*config.intake_queue_names,
                *(poison_queue_name(name) for name in config.intake_queue_names),
                WAKEUP_QUEUE_NAME.default, poison_queue_name(WAKEUP_QUEUE_NAME.default),
                OUTCOMES_QUEUE_NAME.default}
    assert _names(main.module("modules/storage.bicep")[1], QUEUE_TYPE) == expected
    _, app = main.module("modules/functionapp.bicep")
    assert app_settings_of(app, app.file.one("Microsoft.Web/sites"))[INTAKE_QUEUES.name] == (
        str(count))


@pytest.mark.parametrize(("setting", "param", "highest"), [
    (LEDGER_SHARDS, "ledgerShards", MAX_SHARDS), (INTAKE_QUEUES, "intakeQueues", MAX_INTAKE_QUEUES),
])
def test_shards_and_queues_are_parameters_with_the_code_range(setting: Any, param: str,
                                                               highest: int) -> None:
    # The parameter's bounds are the setting's: the deployment refuses what the app would.
    decorators = {d["type"]: d["argument"] for d in root_scope().file.params[param]["decorators"]
                  if d["type"] in ("min_value", "max_value")}
    assert decorators == {"min_value": 1, "max_value": highest}, decorators
    load_config({setting.name: str(highest)}, instance_id="test")  # the code takes both ends
    load_config({setting.name: "1"}, instance_id="test")
    # main.bicepparam sets it, and main.bicep hands it to the app settings unchanged.
    _, values = parse_bicepparam(root_scope().file.path.with_suffix(".bicepparam"))
    assert str(values[param]) == setting.default, param
    main = Scope(root_scope().file, {param: 5})
    _, app = main.module("modules/functionapp.bicep")
    assert app_settings_of(app, app.file.one("Microsoft.Web/sites"))[setting.name] == "5"


def test_the_queue_data_role_covers_every_intake_queue() -> None:
    # The queue role is granted on the storage account, so it covers queues added by intakeQueues
    # (a role scoped to one queue would leave the others unreadable).
    roles = BicepFile(root_scope().file.path.parent / "modules" / "roles.bicep")
    [queue_role] = [config for config in roles.of_type(
        "Microsoft.Authorization/roleAssignments").values()
        if "storageQueueDataContributor" in str(config["properties"]["roleDefinitionId"])]
    assert queue_role["scope"] == "storage"
    assert roles.resources["storage"]["type"] == "Microsoft.Storage/storageAccounts"


_host_json = read_host_json


def test_host_json_function_timeout_and_drain_budget() -> None:
    timeout = timespan_seconds(_host_json()["functionTimeout"])
    assert timeout == FUNCTION_TIMEOUT_SECONDS
    main = root_scope()
    assert int(main.param(_camel(DRAIN_BUDGET_SECONDS.name))) < timeout
    assert int(DRAIN_BUDGET_SECONDS.default) < timeout


@pytest.mark.parametrize("file_name", ["host.json", "function_app.py"])
def test_binding_expressions_name_known_settings(file_name: str) -> None:
    text = (REPO_ROOT / file_name).read_text()
    named = set(re.findall(r"%([A-Za-z0-9_]+)%", text))
    assert named <= SETTING_NAMES, sorted(named - SETTING_NAMES)


def test_trigger_connection_is_the_identity_based_one() -> None:
    # The Bicep sets AzureWebJobsStorage__* for exactly the connection the triggers name.
    text = (REPO_ROOT / "function_app.py").read_text()
    connections = set(re.findall(r"connection\s*=\s*[\"']([^\"']+)[\"']", text))
    assert connections <= {STORAGE_CONNECTION}, connections


def test_host_json_queue_encoding_is_base64() -> None:
    # docs/deploy.md tells users to base64-encode what they put on the deployed queue.
    assert _host_json()["extensions"]["queues"]["messageEncoding"] == "base64"
