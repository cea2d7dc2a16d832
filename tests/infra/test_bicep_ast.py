"""infra/ parses with pycep-parser, and its AST has the security properties the issue asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from simulator import REPO_ROOT
from tests.infra.bicep_model import (
    INFRA,
    MAIN,
    MAIN_PARAMS,
    BicepFile,
    Ref,
    Scope,
    app_settings_of,
    bicep_files,
    functions_in,
    module_calls,
    parse,
    parse_bicepparam,
    root_scope,
    walk,
)

# Built-in role definition ids, checked against Microsoft's "Azure built-in roles" reference.
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
STORAGE_ROLES = {STORAGE_BLOB_DATA_OWNER, STORAGE_QUEUE_DATA_CONTRIBUTOR,
                 STORAGE_TABLE_DATA_CONTRIBUTOR}
ALL_ROLES = STORAGE_ROLES | {MONITORING_METRICS_PUBLISHER}

STORAGE_MODULE = "modules/storage.bicep"
FUNCTION_APP_MODULE = "modules/functionapp.bicep"
MONITORING_MODULE = "modules/monitoring.bicep"
ROLES_MODULE = "modules/roles.bicep"
IDENTITY_MODULE = "modules/identity.bicep"


@pytest.fixture(scope="module")
def main() -> Scope:
    return root_scope()


@pytest.fixture(scope="module")
def storage(main: Scope) -> Scope:
    return main.module(STORAGE_MODULE)[1]


@pytest.fixture(scope="module")
def function_app(main: Scope) -> Scope:
    return main.module(FUNCTION_APP_MODULE)[1]


def _relative(path: Path) -> str:
    return str(path.relative_to(INFRA))


@pytest.mark.parametrize("path", bicep_files(), ids=_relative)
def test_bicep_file_parses(path: Path) -> None:
    ast = parse(path)
    assert ast.get("resources") or ast.get("modules"), f"{path.name} declares nothing"


def test_bicepparam_parses_and_targets_main() -> None:
    using, values = parse_bicepparam(MAIN_PARAMS)
    assert (MAIN_PARAMS.parent / using).resolve() == MAIN
    main_params = BicepFile(MAIN).params
    unknown = sorted(set(values) - set(main_params))
    assert not unknown, f"main.bicepparam sets parameters main.bicep does not declare: {unknown}"
    for name, value in values.items():
        expected = {"string": str, "int": int, "bool": bool}.get(main_params[name]["type"])
        if expected is not None:
            assert isinstance(value, expected), f"{name} = {value!r} is not a {expected.__name__}"
        for decorator in main_params[name]["decorators"]:
            if decorator["type"] == "allowed":
                assert value in decorator["argument"], f"{name} = {value!r} is not allowed"


def test_the_python_versions_infra_allows_are_those_the_app_supports() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    allowed = next(d["argument"] for d in BicepFile(MAIN).params["pythonVersion"]["decorators"]
                   if d["type"] == "allowed")
    assert min(allowed, key=lambda v: tuple(map(int, v.split(".")))) == minimum
    assert "3.13" in allowed, "azure-functions 2.x is locked for 3.13 (requirements.in)"


def test_main_deploys_only_local_modules_of_raw_resources() -> None:
    main = BicepFile(MAIN)
    assert main.ast["globals"]["scope"]["value"] == "resourceGroup"
    assert not main.resources, "main.bicep wires modules; resources live in infra/modules/"
    calls = module_calls(main)
    assert {call.file.path.parent for call in calls} == {INFRA / "modules"}
    for call in calls:
        assert call.file.path.is_file(), call.file.path
        assert not module_calls(call.file), f"{call.file.path.name}: raw resources, no modules"
        assert call.file.declared() or call.file.resources, call.file.path.name


def test_storage_account_is_locked_down(storage: Scope) -> None:
    account = storage.file.one("Microsoft.Storage/storageAccounts")
    props = account["properties"]
    assert account["kind"] == "StorageV2"
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["supportsHttpsTrafficOnly"] is True
    assert props.get("defaultToOAuthAuthentication") is True


def test_blob_and_container_soft_delete(storage: Scope) -> None:
    props = storage.file.one("Microsoft.Storage/storageAccounts/blobServices")["properties"]
    for policy in ("deleteRetentionPolicy", "containerDeleteRetentionPolicy"):
        assert props[policy]["enabled"] is True, policy
        days = storage.resolve(props[policy]["days"])
        assert isinstance(days, int), f"{policy}.days must resolve to a number: {days!r}"
        assert days >= 1, policy
    containers = storage.file.of_type("Microsoft.Storage/storageAccounts/blobServices/containers")
    for symbol, container in containers.items():
        assert container["properties"]["publicAccess"] == "None", symbol


def test_plan_is_flex_consumption_on_linux(function_app: Scope) -> None:
    plan = function_app.file.one("Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True


def test_function_app_is_hardened(function_app: Scope) -> None:
    site = function_app.file.one("Microsoft.Web/sites")
    props = site["properties"]
    assert "linux" in site["kind"].split(",")
    assert props["httpsOnly"] is True
    assert props["siteConfig"]["ftpsState"] == "Disabled"
    assert props["siteConfig"]["minTlsVersion"] == "1.2"
    assert site["identity"]["type"] == "UserAssigned"
    identities = [key.strip("'") for key in site["identity"]["userAssignedIdentities"]]
    assert identities == ["${identityId}"]
    assert function_app.param("identityId") == Ref("identity.outputs.id")


def test_function_app_config_flex(main: Scope, function_app: Scope) -> None:
    config = function_app.file.one("Microsoft.Web/sites")["properties"]["functionAppConfig"]
    assert function_app.resolve(config["runtime"]) == {"name": "python", "version": "3.11"}
    scale = config["scaleAndConcurrency"]
    # Set by main.bicep's parameter, not a constant buried in the module.
    assert scale["maximumInstanceCount"] == "maximumInstanceCount"
    call, _ = main.module(FUNCTION_APP_MODULE)
    assert call.params["maximumInstanceCount"] == "maximumInstanceCount"
    assert main.file.params["maximumInstanceCount"]["type"] == "int"
    assert function_app.resolve(scale["instanceMemoryMB"]) in (512, 2048, 4096)


def test_deployment_storage_uses_the_managed_identity(main: Scope, function_app: Scope) -> None:
    deployment = function_app.file.one("Microsoft.Web/sites")["properties"]["functionAppConfig"][
        "deployment"]["storage"]
    assert deployment["type"] == "blobContainer"
    assert deployment["authentication"]["type"] == "UserAssignedIdentity"
    assert function_app.resolve(deployment["authentication"]["userAssignedIdentityResourceId"]) \
        == Ref("identity.outputs.id")
    # The package container is the one the storage module creates.
    container = function_app.param("deploymentContainerName")
    _, storage = main.module(STORAGE_MODULE)
    assert storage.param("deploymentContainerName") == container
    created = {storage.resolve(c["name"]) for c in storage.file.of_type(
        "Microsoft.Storage/storageAccounts/blobServices/containers").values()}
    assert container in created
    assert str(deployment["value"]).endswith("}${deploymentContainerName}")


def test_app_insights_and_workspace_disable_local_auth(main: Scope) -> None:
    monitoring = main.module(MONITORING_MODULE)[1].file
    insights = monitoring.one("Microsoft.Insights/components")
    assert insights["properties"]["DisableLocalAuth"] is True
    assert insights["properties"]["WorkspaceResourceId"] == "workspace.id"
    workspace = monitoring.one("Microsoft.OperationalInsights/workspaces")
    assert workspace["properties"]["features"]["disableLocalAuth"] is True


def test_telemetry_authenticates_with_the_identity(main: Scope, function_app: Scope) -> None:
    site = function_app.file.one("Microsoft.Web/sites")
    settings = app_settings_of(function_app, site)
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == (
        "ClientId=${identityClientId};Authorization=AAD")
    assert function_app.param("identityClientId") == Ref("identity.outputs.clientId")
    identity_call, identity = main.module(IDENTITY_MODULE)
    assert identity_call.symbol == "identity"
    assert identity.file.outputs["clientId"]["value"] == "identity.properties.clientId"
    assert settings["APPLICATIONINSIGHTS_CONNECTION_STRING"] == Ref(
        "appInsights.properties.ConnectionString")


def test_host_storage_is_identity_based(main: Scope, function_app: Scope) -> None:
    settings = app_settings_of(function_app, function_app.file.one("Microsoft.Web/sites"))
    assert "AzureWebJobsStorage" not in settings, "no connection string: identity-based only"
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == Ref("identity.outputs.clientId")
    for service in ("blob", "queue", "table"):
        assert settings[f"AzureWebJobsStorage__{service}ServiceUri"] == Ref(
            f"storage.properties.primaryEndpoints.{service}")
    # `storage` there is the account the storage module creates.
    existing = function_app.file.resources["storage"]
    assert existing["existing"] is True
    assert function_app.resolve(existing["config"]["name"]) == Ref("storage.outputs.name")
    # Flex Consumption takes the runtime from functionAppConfig.
    assert "FUNCTIONS_WORKER_RUNTIME" not in settings


def _role_assignments() -> list[tuple[BicepFile, str, dict[str, Any]]]:
    found = []
    for path in bicep_files():
        file = BicepFile(path)
        for symbol, config in file.of_type("Microsoft.Authorization/roleAssignments").items():
            found.append((file, symbol, config))
    return found


def test_role_assignments_have_deterministic_names() -> None:
    assignments = _role_assignments()
    assert len(assignments) == len(ALL_ROLES)
    for _, symbol, config in assignments:
        name = config["name"]
        assert isinstance(name, dict), f"{symbol}: name must be guid(...), not {name!r}"
        function = name["function"]
        assert function["type"] == "guid", f"{symbol}: name must be guid(...)"
        arguments = [arg for arg in function["parameters"].values() if arg is not None]
        assert "principalId" in arguments, f"{symbol}: one assignment per principal"
        assert not [f for f in functions_in(name) if f["type"] == "new_guid"], symbol


def test_role_definitions_are_the_least_privilege_built_in_roles() -> None:
    granted: dict[str, str] = {}
    for file, symbol, config in _role_assignments():
        scope = Scope(file)
        role = config["properties"]["roleDefinitionId"]["function"]
        assert role["type"] == "subscription_resource_id", symbol
        params = role["parameters"]
        assert params["resource_type"] == "Microsoft.Authorization/roleDefinitions", symbol
        role_id = scope.resolve(params["resource_name_1"])
        assert role_id in ALL_ROLES, f"{symbol}: {role_id} is not one of the expected roles"
        granted[role_id] = config["scope"]
    assert set(granted) == ALL_ROLES
    for role_id in STORAGE_ROLES:
        assert granted[role_id] == "storage", "storage data roles are scoped to the account"
    assert granted[MONITORING_METRICS_PUBLISHER] == "appInsights"
    roles = BicepFile(INFRA / ROLES_MODULE)
    assert roles.resources["storage"]["type"] == "Microsoft.Storage/storageAccounts"
    assert roles.resources["appInsights"]["type"] == "Microsoft.Insights/components"


def test_app_identity_and_optional_deployer_get_the_roles(main: Scope) -> None:
    calls = main.calls(ROLES_MODULE)
    by_principal = {str(call.params["principalId"]): (call, scope) for call, scope in calls}
    assert set(by_principal) == {"identity.outputs.principalId", "deployerPrincipalId"}
    app_call, app_scope = by_principal["identity.outputs.principalId"]
    assert app_call.condition is None
    assert app_scope.param("principalType") == "ServicePrincipal"
    deployer_call, _ = by_principal["deployerPrincipalId"]
    assert main.file.params["deployerPrincipalId"]["default"] == "", "off by default"
    condition = deployer_call.condition
    assert condition["operator"]["type"] == "not"
    empty = condition["operator"]["operands"]["bool_value"]["function"]
    assert empty == {"type": "empty", "parameters": {"item_to_test": "deployerPrincipalId"}}
    for _, scope in calls:
        assert scope.param("storageAccountName") == Ref("storage.outputs.name")
    # The function app waits for its roles.
    app_module = main.module(FUNCTION_APP_MODULE)[0]
    assert app_call.symbol in app_module.depends_on


def test_outputs(main: Scope) -> None:
    outputs = {name: out["value"] for name, out in main.file.outputs.items()}
    assert outputs == {
        "AZURE_FUNCTION_APP_NAME": "functionApp.outputs.name",
        "AZURE_FUNCTION_APP_HOSTNAME": "functionApp.outputs.defaultHostName",
        "AZURE_STORAGE_ACCOUNT_NAME": "storage.outputs.name",
        "AZURE_COMPLETIONS_QUEUE_NAME": "storage.outputs.completionsQueueName",
    }
    app = main.module(FUNCTION_APP_MODULE)[1].file
    assert app.outputs["defaultHostName"]["value"] == "app.properties.defaultHostName"
    storage = main.module(STORAGE_MODULE)[1].file
    assert storage.outputs["completionsQueueName"]["value"] == "completionsQueue.name"


# Text that would put a secret or an account key into a template, an output or an app setting.
SECRET_PATTERNS = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"listKeys\s*\(",
        r"\.listKeys\b",
        r"listAccountSas|listServiceSas",
        r"accountKey",
        r"AccountKey=",
        r"SharedAccessKey",
        r"SharedAccessSignature",
        r"DefaultEndpointsProtocol=",
        r"InstrumentationKey=",
        r"\bsig=[A-Za-z0-9%]",
        r"@secure\(\)",
        r"AzureWebJobsStorage['\"]?\s*:",
    )
]


def _infra_text_files() -> list[Path]:
    return sorted(path for path in INFRA.rglob("*")
                  if path.is_file() and path.suffix in {".bicep", ".bicepparam", ".json"})


@pytest.mark.parametrize("path", _infra_text_files(), ids=_relative)
def test_no_secret_or_account_key(path: Path) -> None:
    text = path.read_text()
    hits = [(pattern.pattern, text[m.start():m.start() + 60])
            for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]
    assert not hits, f"{path.name}: secret-like text {hits}"


@pytest.mark.parametrize("path", bicep_files(), ids=_relative)
def test_no_key_functions_or_secure_outputs(path: Path) -> None:
    ast = parse(path)
    listing = [f["type"] for f in functions_in(ast) if f["type"].startswith("list")]
    assert not listing, f"{path.name}: {listing} would read keys"
    for name, output in ast.get("outputs", {}).items():
        decorators = [d["type"] for d in output["decorators"]]
        assert "secure" not in decorators, f"{path.name}: output {name} is a secret"
    for name, param in ast.get("parameters", {}).items():
        decorators = [d["type"] for d in param["decorators"]]
        assert "secure" not in decorators, f"{path.name}: param {name} takes a secret"
    # pycep keeps `account.listKeys().keys[0].value` as a string, not a function call.
    strings = [node for node in walk(ast) if isinstance(node, str)]
    key_like = [s for s in strings if re.search(r"\.list[A-Z]\w*\(|AccountKey|SharedAccessKey", s)]
    assert not key_like, f"{path.name}: {key_like}"


def _yaml_value(text: str, key: str) -> str:
    match = re.search(rf"^\s*{key}:\s*(\S+)\s*$", text, re.MULTILINE)
    assert match, f"azure.yaml: no {key}"
    return match.group(1)


def test_azure_yaml_points_azd_at_this_infra_and_app(function_app: Scope) -> None:
    # No YAML parser in the dev venv: azure.yaml is small and flat enough for line matching.
    text = (INFRA.parent / "azure.yaml").read_text()
    assert _yaml_value(text, "provider") == "bicep"
    assert (INFRA.parent / _yaml_value(text, "path")).resolve() == INFRA
    assert _yaml_value(text, "module") == MAIN.stem
    services = re.search(r"^services:\n((?:[ \t].*\n?)+)", text, re.MULTILINE)
    assert services, "azure.yaml: no services"
    names = re.findall(r"^  ([A-Za-z0-9-]+):\s*$", services.group(1), re.MULTILINE)
    assert names == [function_app.param("azdServiceName")], "azd finds the app by this tag"
    assert _yaml_value(services.group(1), "host") == "function"
    assert _yaml_value(services.group(1), "language") == "python"
    assert (INFRA.parent / _yaml_value(services.group(1), "project") / "host.json").is_file()
    tags = function_app.resolve(function_app.file.one("Microsoft.Web/sites")["tags"])
    assert {key.strip("'"): value for key, value in tags.items()} == {"azd-service-name": names[0]}


ALERTS_MODULE = "modules/alerts.bicep"


def test_alerts_query_the_apps_telemetry_in_app_insights(main: Scope) -> None:
    call, alerts = main.module(ALERTS_MODULE)
    assert call.condition is None
    assert alerts.param("appInsightsName") == Ref("monitoring.outputs.appInsightsName")
    assert main.file.params["alertActionGroupIds"]["default"] == [], "no action group by default"
    assert alerts.param("actionGroupIds") == []
    component = alerts.file.resources["appInsights"]
    assert component["existing"] is True
    assert component["type"] == "Microsoft.Insights/components"
    rules = alerts.file.of_type("Microsoft.Insights/scheduledQueryRules")
    # Span and metric names as the app code writes them (shared/observability/telemetry.py and its
    # call sites).
    emitted = "".join(path.read_text() for path in sorted((REPO_ROOT / "shared").rglob("*.py")))
    queries: dict[str, str] = {}
    for symbol, rule in rules.items():
        props = rule["properties"]
        assert props["enabled"] is True, symbol
        assert props["autoMitigate"] is True, symbol
        assert props["scopes"] == ["appInsights.id"], symbol
        assert props["actions"]["actionGroups"] == "actionGroupIds", symbol
        (criterion,) = props["criteria"]["allOf"]
        assert (criterion["operator"], criterion["threshold"]) == ("GreaterThan", 0), symbol
        query = alerts.resolve(criterion["query"])
        assert isinstance(query, str), symbol
        queries[symbol] = query
        for name in re.findall(r'"(ledger\.[a-z_.]+)"', query):
            assert f'"{name}"' in emitted, f"{symbol} queries {name}, which the app never emits"
    assert set(queries) == {"noCommitAlert", "parkedAlert", "poisonAlert",
                            "leaderlessShardAlert", "inFlightAlert", "behindAlert"}
    for symbol in ("leaderlessShardAlert", "inFlightAlert", "behindAlert"):
        assert "customDimensions.shard" in queries[symbol], f"{symbol} is per shard"
    assert "ledger.flight.oldest_age" in queries["inFlightAlert"]
    for param, default in (("inFlightAgeThresholdSeconds", 300), ("behindFactor", 10),
                           ("behindMinPending", 1000)):
        assert alerts.file.params[param]["default"] == default, param
    assert "ledger.full_scan" in queries["noCommitAlert"]
    assert "requestsReady" in queries["noCommitAlert"]
    assert "ledger.outcomes" in queries["noCommitAlert"]
    no_commit = rules["noCommitAlert"]["properties"]
    assert (no_commit["evaluationFrequency"], no_commit["windowSize"]) == ("PT5M", "PT5M")
    assert "ledger.parked" in queries["parkedAlert"]
    assert "poisonDepth" in queries["poisonAlert"]
    assert "annotate(poisonDepth=" in emitted
