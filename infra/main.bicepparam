// Parameters of infra/main.bicep for `az deployment group create` and `azd up`. The app settings
// keep the code's defaults (shared/config/settings.py); change them here, never in the portal, so that a
// redeployment does not undo the change.
using './main.bicep'

param namePrefix = 'ledger'

// Flex Consumption: scale out to at most this many instances of 2048 MB each.
param maximumInstanceCount = 100
param instanceMemoryMB = 2048
param pythonVersion = '3.11'

// Standard_LRS keeps a demo cheap; Standard_ZRS, Standard_GRS or Standard_GZRS for production.
param storageSkuName = 'Standard_LRS'

// Object id of a developer who should read and write the app's storage too (queue messages,
// tables) with `--auth-mode login`; empty grants nothing. Override on the command line:
//   --parameters deployerPrincipalId=$(az ad signed-in-user show --query id -o tsv)
param deployerPrincipalId = ''
param deployerPrincipalType = 'User'

param completionsQueueName = 'completions'
param wakeupQueueName = 'wakeups'
param outcomesQueueName = 'outcomes'
param outcomeEvents = 'true'
param completionsTableName = 'completions'
param ledgerTableName = 'ledger'
param parkedTableName = 'parkedmessages'
param leaseContainerName = 'leader-election'
param leaseBlobName = 'ledger-leader'
param leaseSeconds = 60
// Empty: derived from leaseSeconds (a third, and a sixth rounded up); set both to override.
param renewIntervalSeconds = ''
param leaseSafetyMarginSeconds = ''
param drainBudgetSeconds = 240
param requestTimeoutSeconds = 900
param storageTimeoutSeconds = 5
// Ledger shards (1-64) and intake queues (1-16): choose them from the target rate (README,
// "Choosing an intake queue"; docs/operations.md). The app creates the shard tables on first use;
// this deployment creates the intake queues and their poison queues.
param ledgerShards = 1
param intakeQueues = 1
param telemetryConsoleExporter = '0'
