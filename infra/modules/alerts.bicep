// Log search alerts on the app's OpenTelemetry data in Application Insights (docs/operations.md):
// work announced and not committed for 5 minutes, messages parked, the poison queue not empty.
// Each queries the spans and metrics that shared/observability/telemetry.py emits.

@description('Prefix of the alert rule names.')
param namePrefix string

@description('Azure region.')
param location string

@description('Tags applied to the rules.')
param tags object = {}

@description('Application Insights component the rules query.')
param appInsightsName string

@description('Resource ids of action groups to notify (e-mail, pager). Empty: the alerts show in the portal only.')
param actionGroupIds array = []

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Every full scan in the window (the sweeper makes one a minute) found work announced in the
// ready index and not committed, and no request was decided (the outcome counter is a metric:
// never sampled, unlike spans).
var noCommitQuery = '''
let scans = dependencies
    | where name == "ledger.full_scan"
    | summarize scansSeen = count(), fewestWaiting = min(toint(customDimensions.requestsReady));
let decided = toscalar(customMetrics
    | where name == "ledger.outcomes"
    | summarize sum(value));
scans
| where scansSeen > 0 and fewestWaiting > 0 and coalesce(decided, 0.0) == 0
'''

// Messages parked in the window (malformed, or late steps that contradict an outcome).
var parkedQuery = '''
customMetrics
| where name == "ledger.parked"
| summarize parked = sum(value)
| where parked > 0
'''

// The poison queue's depth as the latest sweep (timer invocation) read it.
var poisonQuery = '''
requests
| where name == "ledger.invocation" and tostring(customDimensions.trigger) == "timer"
| where isnotempty(tostring(customDimensions.poisonDepth))
| top 1 by timestamp desc
| where toint(customDimensions.poisonDepth) > 0
'''

resource noCommitAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-no-commit-while-pending'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: work announced, no commit for 5 minutes'
    description: 'Every full scan of the last 5 minutes found work announced in the ready index and no commit succeeded: is a leader being fenced out or failing? See docs/operations.md.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: noCommitQuery
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

resource parkedAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-messages-parked'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: messages parked'
    description: 'Messages were parked in the last 15 minutes: list them with ./dev cli parked list, fix the sender, replay. See docs/operations.md.'
    severity: 3
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: parkedQuery
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

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-poison-queue-not-empty'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: poison queue not empty'
    description: 'The host gave up on messages (storage failing?): fix the cause, then ./dev cli poison replay. See docs/operations.md.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT10M'
    criteria: {
      allOf: [
        {
          query: poisonQuery
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

output alertRuleNames array = [
  noCommitAlert.name
  parkedAlert.name
  poisonAlert.name
]
