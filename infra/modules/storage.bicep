// The storage account of the app's data and of the Functions host: no shared keys, no public blobs,
// TLS 1.2, HTTPS only, soft delete; the intake queues (completions, completions-1, ...) and the wake-up queue,
// each with its poison queue, the tables, the lease container and the container that Flex Consumption deploys
// the code package from.

@description('Storage account name (3-24 lower-case letters and digits, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Tags applied to the account.')
param tags object = {}

@description('Queue the upstream steps post completions to (COMPLETIONS_QUEUE_NAME).')
param completionsQueueName string

@description('Intake queues (INTAKE_QUEUES): completionsQueueName, then completionsQueueName-1 ... -(intakeQueues - 1).')
@minValue(1)
@maxValue(16)
param intakeQueues int = 1

@description('Queue of the lease alarms (WAKEUP_QUEUE_NAME).')
param wakeupQueueName string

@description('Queue the leader sends outcome events to (OUTCOMES_QUEUE_NAME).')
param outcomesQueueName string = 'outcomes'

@description('Table where every completion is recorded (COMPLETIONS_TABLE_NAME).')
param completionsTableName string

@description('Table of balances, request outcomes and the fence (LEDGER_TABLE_NAME).')
param ledgerTableName string

@description('Table where malformed messages are parked (PARKED_TABLE_NAME).')
param parkedTableName string

@description('Blob container that holds the lease blob (LEASE_CONTAINER_NAME).')
param leaseContainerName string

@description('Blob container Flex Consumption deploys the code package from.')
param deploymentContainerName string

@description('Redundancy of the account: LRS by default; ZRS, GRS or GZRS for production.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param skuName string = 'Standard_LRS'

@description('Days a deleted blob or container can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 7

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: Flex Consumption without VNet integration reaches storage over its public endpoint; every request still needs an Entra ID token (shared keys are off)
  // checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35: the app and its deployer reach the account over the public endpoint, authorised by Entra ID RBAC only
  // checkov:skip=CKV_AZURE_206: LRS is the cost-conscious default of a demo; set storageSkuName to Standard_ZRS, Standard_GRS or Standard_GZRS for production
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
  }
}

resource leaseContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: leaseContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource completionsQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: completionsQueueName
}

// The Functions host moves a message here after host.json's maxDequeueCount failed attempts.
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: '${completionsQueueName}-poison'
}

// Intake queues 1 .. intakeQueues - 1 (shared/config/names.py intake_queue_name), beside queue 0 above:
// the app has one queue trigger per intake queue (function_app.py).
resource extraIntakeQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for q in range(1, intakeQueues - 1): {
  parent: queueService
  name: '${completionsQueueName}-${q}'
}]

// Each intake queue's poison queue: the host moves a message of completions-q to completions-q-poison.
resource extraIntakePoisonQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for q in range(1, intakeQueues - 1): {
  parent: queueService
  name: '${completionsQueueName}-${q}-poison'
}]

// Lease alarms: messages that come due when a lease holder stops renewing (shared/leadership/wakeup.py).
resource wakeupQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: wakeupQueueName
}

resource wakeupPoisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: '${wakeupQueueName}-poison'
}

// Outcome events for upstream: one per decided request (shared/leadership/outbox.py).
resource outcomesQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: outcomesQueueName
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource completionsTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: completionsTableName
}

resource ledgerTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: ledgerTableName
}

resource parkedTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: parkedTableName
}

output name string = account.name
output id string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output tableEndpoint string = account.properties.primaryEndpoints.table
output completionsQueueName string = completionsQueue.name
output poisonQueueName string = poisonQueue.name
output wakeupQueueName string = wakeupQueue.name
output deploymentContainerUrl string = '${account.properties.primaryEndpoints.blob}${deploymentContainer.name}'
