// Reconciliation and retention (docs/operations.md, "Reconciliation and retention"): the archive
// container the retention step exports old rows to (ARCHIVE_CONTAINER_NAME), and a log search
// alert that fires when the `reconcile` timer (every 5 minutes) found a problem or has not
// reported for 15 minutes. The app's identity reaches the container through the account-wide
// Storage Blob Data Owner role (modules/roles.bicep).

@description('Prefix of the alert rule names.')
param namePrefix string

@description('Azure region.')
param location string

@description('Tags applied to the rule.')
param tags object = {}

@description('Application Insights component the rule queries.')
param appInsightsName string

@description('Storage account of the ledger (the archive container is created in it).')
param storageAccountName string

@description('ARCHIVE_CONTAINER_NAME: blob container of the archived rows.')
param archiveContainerName string

@description('Resource ids of action groups to notify. Empty: the alert shows in the portal only.')
param actionGroupIds array = []

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource archiveContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: archiveContainerName
  properties: {
    publicAccess: 'None'
  }
}

// The latest summary line of the window says problems > 0, or there is none: the timer has not
// reported for 15 minutes (its summary is "reconcile: checked ..." with reconcileProblems, logged
// by shared/leadership/reconcile.py log_report).
var reconcileQuery = '''
let runs = traces
    | where message startswith "reconcile: checked"
    | extend problems = toint(customDimensions.reconcileProblems);
let latest = runs | top 1 by timestamp desc | where problems > 0 | project reason = "problems found";
let ran = toscalar(runs | count);
union latest, (print reason = "has not run for 15 minutes" | where ran == 0)
'''

resource reconcileAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-reconcile-problem'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: reconciliation found a problem, or has not run'
    description: 'The reconcile timer found a negative balance, work in flight too long or totals that do not add up, or has not reported for 15 minutes: run ./dev cli reconcile. See docs/operations.md.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: reconcileQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

output archiveContainerName string = archiveContainer.name
output alertRuleName string = reconcileAlert.name
