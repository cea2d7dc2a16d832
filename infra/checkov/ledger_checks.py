"""Custom checkov checks for what checkov's own Bicep/ARM checks do not cover.

checkov imports this file from ``--external-checks-dir infra/checkov`` and every check registers
itself when it is instantiated. It runs inside checkov's own venv (.venv-checkov), so the repo's
venv, and mypy, cannot resolve the ``checkov`` package here.
"""
# mypy: ignore-errors

from __future__ import annotations

from typing import Any

from checkov.bicep.checks.resource.base_resource_check import BaseResourceCheck
from checkov.bicep.checks.resource.base_resource_value_check import BaseResourceValueCheck
from checkov.common.models.enums import CheckCategories, CheckResult
from checkov.common.util.data_structures_utils import find_in_dict


class StorageSharedKeyAccessDisabled(BaseResourceValueCheck):
    """Shared Key (account key and SAS signed with it) authorization is off: Entra ID only."""

    def __init__(self) -> None:
        super().__init__(
            name="Ensure storage accounts disallow Shared Key authorization (allowSharedKeyAccess)",
            id="CKV_LEDGER_1",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Storage/storageAccounts",),
        )

    def get_inspected_key(self) -> str:
        return "properties/allowSharedKeyAccess"

    def get_expected_value(self) -> Any:
        return False


class AppInsightsLocalAuthDisabled(BaseResourceValueCheck):
    """Application Insights ingests Entra ID authenticated telemetry only (no ingestion key)."""

    def __init__(self) -> None:
        super().__init__(
            name="Ensure Application Insights disables local authentication (DisableLocalAuth)",
            id="CKV_LEDGER_2",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Insights/components",),
        )

    def get_inspected_key(self) -> str:
        return "properties/DisableLocalAuth"


class LogAnalyticsLocalAuthDisabled(BaseResourceValueCheck):
    """The Log Analytics workspace accepts Entra ID authentication only (no shared keys)."""

    def __init__(self) -> None:
        super().__init__(
            name="Ensure Log Analytics workspaces disable local authentication",
            id="CKV_LEDGER_3",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.OperationalInsights/workspaces",),
        )

    def get_inspected_key(self) -> str:
        return "properties/features/disableLocalAuth"


class FlexDeploymentStorageUsesIdentity(BaseResourceCheck):
    """A Flex Consumption app pulls its code package with a managed identity, not a key."""

    IDENTITY_TYPES = ("UserAssignedIdentity", "SystemAssignedIdentity")

    def __init__(self) -> None:
        super().__init__(
            name="Ensure Flex Consumption deployment storage authenticates with a managed identity",
            id="CKV_LEDGER_4",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Web/sites",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        storage = find_in_dict(conf, "properties/functionAppConfig/deployment/storage")
        if storage is None:
            return CheckResult.UNKNOWN  # not a Flex Consumption app
        auth_type = find_in_dict(conf, "properties/functionAppConfig/deployment/storage/"
                                       "authentication/type")
        return CheckResult.PASSED if auth_type in self.IDENTITY_TYPES else CheckResult.FAILED


class BlobSoftDeleteEnabled(BaseResourceCheck):
    """Deleted blobs and deleted containers can be restored (soft delete for both)."""

    def __init__(self) -> None:
        super().__init__(
            name="Ensure blob and container soft delete are enabled",
            id="CKV_LEDGER_5",
            categories=(CheckCategories.BACKUP_AND_RECOVERY,),
            supported_resources=("Microsoft.Storage/storageAccounts/blobServices",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        for policy in ("deleteRetentionPolicy", "containerDeleteRetentionPolicy"):
            if find_in_dict(conf, f"properties/{policy}/enabled") is not True:
                return CheckResult.FAILED
        return CheckResult.PASSED


class RoleAssignmentsAreDataPlaneOnly(BaseResourceCheck):
    """Role assignments grant the app's data-plane built-in roles only, under guid() names.

    Storage Blob Data Owner, Storage Queue Data Contributor, Storage Table Data Contributor and
    Monitoring Metrics Publisher; any other role (Owner, Contributor, a key-listing role) fails.
    """

    ALLOWED_ROLES = frozenset({
        "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner
        "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Storage Queue Data Contributor
        "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor
        "3913510d-42f4-4e42-8a64-420c390055eb",  # Monitoring Metrics Publisher
    })

    def __init__(self) -> None:
        super().__init__(
            name="Ensure role assignments grant only the app's data-plane built-in roles",
            id="CKV_LEDGER_6",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Authorization/roleAssignments",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        name = conf.get("name")
        if not (isinstance(name, dict) and name.get("function", {}).get("type") == "guid"):
            return CheckResult.FAILED
        role = find_in_dict(conf, "properties/roleDefinitionId")
        if not isinstance(role, dict):
            return CheckResult.FAILED
        function = role.get("function", {})
        role_id = (function.get("parameters") or {}).get("resource_name_1")
        if function.get("type") != "subscription_resource_id" or role_id not in self.ALLOWED_ROLES:
            return CheckResult.FAILED
        return CheckResult.PASSED


class LogAlertsEnabledAndScoped(BaseResourceCheck):
    """Log search alert rules are enabled, query at least one scope, and resolve themselves."""

    def __init__(self) -> None:
        super().__init__(
            name="Ensure log alert rules are enabled, scoped and auto-mitigated",
            id="CKV_LEDGER_7",
            categories=(CheckCategories.LOGGING,),
            supported_resources=("Microsoft.Insights/scheduledQueryRules",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        scopes = find_in_dict(conf, "properties/scopes")
        criteria = find_in_dict(conf, "properties/criteria/allOf")
        if (find_in_dict(conf, "properties/enabled") is not True
                or find_in_dict(conf, "properties/autoMitigate") is not True
                or not isinstance(scopes, list) or not scopes
                or not isinstance(criteria, list) or not criteria
                or not all(isinstance(c, dict) and c.get("query") for c in criteria)):
            return CheckResult.FAILED
        return CheckResult.PASSED


checks = (
    StorageSharedKeyAccessDisabled(),
    AppInsightsLocalAuthDisabled(),
    LogAnalyticsLocalAuthDisabled(),
    FlexDeploymentStorageUsesIdentity(),
    BlobSoftDeleteEnabled(),
    RoleAssignmentsAreDataPlaneOnly(),
    LogAlertsEnabledAndScoped(),
)
