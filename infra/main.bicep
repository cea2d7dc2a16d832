// Ledger leader election on Azure Functions (Flex Consumption, Python), deployed into one resource
// group: `az deployment group create -g <rg> -f infra/main.bicep -p infra/main.bicepparam`, or
// `azd up`. Storage is reached with a user-assigned managed identity only: no key, no connection
// string with a secret, anywhere. See docs/deploy.md.
targetScope = 'resourceGroup'

@description('Azure region of every resource (one that offers Flex Consumption: az functionapp list-flexconsumption-locations).')
param location string = resourceGroup().location

@description('Prefix of resource names: 2-10 lower-case letters or digits.')
@minLength(2)
@maxLength(10)
param namePrefix string = 'ledger'

@description('Tags applied to every resource.')
param tags object = {}

@description('Upper bound of instances Flex Consumption scales the app out to.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory of each instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Python version of the Functions runtime (the app needs 3.11 or later: pyproject.toml requires-python).')
@allowed([
  '3.11'
  '3.12'
  '3.13'
])
param pythonVersion string = '3.11'

@description('Redundancy of the storage account (the ledger lives there): LRS by default; ZRS, GRS or GZRS for production.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Optional object id of an extra principal (e.g. the deploying developer: az ad signed-in-user show --query id -o tsv) granted the same data roles as the app. Empty: none.')
param deployerPrincipalId string = ''

@description('Kind of the extra principal.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param deployerPrincipalType string = 'User'

@description('Resource ids of action groups the alerts notify (docs/operations.md). Empty: alerts show in the portal only.')
param alertActionGroupIds array = []

@description('Alert: seconds a cross-shard request may go without progress before it fires.')
param alertInFlightAgeThresholdSeconds int = 300

@description('Alert: a shard is far behind when its backlog exceeds this many times the median of all shards...')
param alertBehindFactor int = 10

@description('... and this many waiting completions.')
param alertBehindMinPending int = 1000

// The settings the app code reads: shared/config/settings.py SETTINGS, with the code's defaults.

@description('COMPLETIONS_QUEUE_NAME: queue the upstream steps post completions to.')
param completionsQueueName string = 'completions'

@description('WAKEUP_QUEUE_NAME: queue of the lease alarms, each due when a lease holder stops renewing.')
param wakeupQueueName string = 'wakeups'

@description('COMPLETIONS_TABLE_NAME: table where every completion is recorded.')
param completionsTableName string = 'completions'

@description('LEDGER_TABLE_NAME: table of balances, request outcomes and the fence.')
param ledgerTableName string = 'ledger'

@description('PARKED_TABLE_NAME: table where malformed messages are parked.')
param parkedTableName string = 'parkedmessages'

@description('LEASE_CONTAINER_NAME: blob container that holds the lease blob.')
param leaseContainerName string = 'leader-election'

@description('LEASE_BLOB_NAME: blob whose lease elects the leader.')
param leaseBlobName string = 'ledger-leader'

@description('LEASE_SECONDS: lease duration (Azure allows 15-60 s).')
@minValue(15)
@maxValue(60)
param leaseSeconds int = 60

@description('RENEW_INTERVAL_SECONDS: how often the leader renews its lease while it drains; empty derives it from the lease (LEASE_SECONDS / 3).')
param renewIntervalSeconds string = ''

@description('LEASE_SAFETY_MARGIN_SECONDS: no commit starts later than last renew sent + lease - this margin; empty derives it from the lease (LEASE_SECONDS / 6, rounded up).')
param leaseSafetyMarginSeconds string = ''

@description('DRAIN_BUDGET_SECONDS: longest a leader drains in one invocation (below host.json functionTimeout).')
@minValue(1)
param drainBudgetSeconds int = 240

@description('REQUEST_TIMEOUT_SECONDS: an incomplete request expires this long after its first step.')
@minValue(1)
param requestTimeoutSeconds int = 900

@description('STORAGE_TIMEOUT_SECONDS: per-call network timeout of the ledger and lease clients.')
@minValue(1)
param storageTimeoutSeconds int = 5

@description('LEDGER_SHARDS: shards of the ledger, each with its own lease, ledger partition and completions table (the app creates the shard tables on first use).')
@minValue(1)
@maxValue(64)
param ledgerShards int = 1

@description('OUTCOME_EVENTS: true sends one outcome event per decided request to OUTCOMES_QUEUE_NAME (a transactional outbox); false sends none.')
@allowed([
  'true'
  'false'
])
param outcomeEvents string = 'true'

@description('OUTCOMES_QUEUE_NAME: queue the leader sends outcome and contradiction events to (base64 JSON, version 1).')
param outcomesQueueName string = 'outcomes'

@description('Minutes an outcome event may stay unsent before the outbox alert fires.')
@minValue(2)
param outboxAlertMinutes int = 5
@description('RECONCILE_MAX_FLIGHT_SECONDS: reconciliation reports work in flight between shards older than this.')
@minValue(10)
@maxValue(604800)
param reconcileMaxFlightSeconds int = 300

@description('RETENTION_DAYS: outcome, claim, applied and parked rows older than this are archived to a blob and deleted; a step re-sent later is taken as new (README, "Retention").')
@minValue(7)
@maxValue(3650)
param retentionDays int = 365

@description('ARCHIVE_CONTAINER_NAME: blob container the retention step exports archived rows to.')
param archiveContainerName string = 'ledger-archive'
@description('INTAKE_QUEUES: intake queues, completionsQueueName then completionsQueueName-1 ... -(intakeQueues - 1), each with its poison queue and its own queue trigger; about 2,000 messages/s per queue (README, "Choosing an intake queue").')
@minValue(1)
@maxValue(16)
param intakeQueues int = 1

@description('TELEMETRY_CONSOLE_EXPORTER: 1 prints spans and metrics to stderr; in Azure telemetry goes to Application Insights whatever this says.')
@allowed([
  '0'
  '1'
])
param telemetryConsoleExporter string = '0'

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, namePrefix))
var storageAccountName = take('st${replace(toLower(namePrefix), '-', '')}${resourceToken}', 24)
var deploymentContainerName = 'app-package-${take(resourceToken, 7)}'

// Every setting of shared/config/settings.py, as the strings the app reads from its environment.
var appSettings = {
  COMPLETIONS_QUEUE_NAME: completionsQueueName
  WAKEUP_QUEUE_NAME: wakeupQueueName
  COMPLETIONS_TABLE_NAME: completionsTableName
  LEDGER_TABLE_NAME: ledgerTableName
  PARKED_TABLE_NAME: parkedTableName
  LEASE_CONTAINER_NAME: leaseContainerName
  LEASE_BLOB_NAME: leaseBlobName
  LEASE_SECONDS: string(leaseSeconds)
  RENEW_INTERVAL_SECONDS: renewIntervalSeconds
  LEASE_SAFETY_MARGIN_SECONDS: leaseSafetyMarginSeconds
  DRAIN_BUDGET_SECONDS: string(drainBudgetSeconds)
  REQUEST_TIMEOUT_SECONDS: string(requestTimeoutSeconds)
  STORAGE_TIMEOUT_SECONDS: string(storageTimeoutSeconds)
  LEDGER_SHARDS: string(ledgerShards)
  OUTCOME_EVENTS: outcomeEvents
  OUTCOMES_QUEUE_NAME: outcomesQueueName
  RECONCILE_MAX_FLIGHT_SECONDS: string(reconcileMaxFlightSeconds)
  RETENTION_DAYS: string(retentionDays)
  ARCHIVE_CONTAINER_NAME: archiveContainerName
  INTAKE_QUEUES: string(intakeQueues)
  TELEMETRY_CONSOLE_EXPORTER: telemetryConsoleExporter
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: 'id-${namePrefix}-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: storageAccountName
    location: location
    tags: tags
    skuName: storageSkuName
    completionsQueueName: completionsQueueName
    intakeQueues: intakeQueues
    wakeupQueueName: wakeupQueueName
    outcomesQueueName: outcomesQueueName
    completionsTableName: completionsTableName
    ledgerTableName: ledgerTableName
    parkedTableName: parkedTableName
    leaseContainerName: leaseContainerName
    deploymentContainerName: deploymentContainerName
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: 'log-${namePrefix}-${resourceToken}'
    appInsightsName: 'appi-${namePrefix}-${resourceToken}'
    location: location
    tags: tags
  }
}

// Log search alerts on the app's telemetry: no commit while completions wait, parked messages,
// poison queue not empty.
module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    namePrefix: namePrefix
    location: location
    tags: tags
    appInsightsName: monitoring.outputs.appInsightsName
    actionGroupIds: alertActionGroupIds
    inFlightAgeThresholdSeconds: alertInFlightAgeThresholdSeconds
    behindFactor: alertBehindFactor
    behindMinPending: alertBehindMinPending
  }
}

// The archive container, and the alert on the reconcile timer's findings (or its silence).
module reconcileAlerts 'modules/reconcile_alerts.bicep' = {
  name: 'reconcile-alerts'
  params: {
    namePrefix: namePrefix
    location: location
    tags: tags
    appInsightsName: monitoring.outputs.appInsightsName
    storageAccountName: storage.outputs.name
    archiveContainerName: archiveContainerName
    actionGroupIds: alertActionGroupIds
  }
}

// Outcome events that stay unsent (the outbox, shared/leadership/outbox.py).
module outboxAlerts 'modules/outbox_alerts.bicep' = {
  name: 'outbox-alerts'
  params: {
    namePrefix: namePrefix
    location: location
    tags: tags
    appInsightsName: monitoring.outputs.appInsightsName
    actionGroupIds: alertActionGroupIds
    thresholdMinutes: outboxAlertMinutes
  }
}

module appRoles 'modules/roles.bicep' = {
  name: 'app-roles'
  params: {
    principalId: identity.outputs.principalId
    principalType: 'ServicePrincipal'
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

// Off by default: only when deployerPrincipalId is given.
module deployerRoles 'modules/roles.bicep' = if (!empty(deployerPrincipalId)) {
  name: 'deployer-roles'
  params: {
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'function-app'
  params: {
    name: 'func-${namePrefix}-${resourceToken}'
    planName: 'plan-${namePrefix}-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    appInsightsName: monitoring.outputs.appInsightsName
    pythonVersion: pythonVersion
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    appSettings: appSettings
  }
  // The host starts with its storage and telemetry roles in place.
  dependsOn: [
    appRoles
  ]
}

output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_HOSTNAME string = functionApp.outputs.defaultHostName
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_COMPLETIONS_QUEUE_NAME string = storage.outputs.completionsQueueName
