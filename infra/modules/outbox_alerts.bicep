// Log search alert on the outbox (docs/operations.md, "Outcome events"): an outcome event stayed
// unsent longer than the threshold. The sweeper sends what terms left behind every minute and
// then logs a warning with the shard's unsent events and the oldest one's age
// (shared/leadership/outbox.py, sweep_outbox): customDimensions.outboxOldestAgeSeconds.

@description('Prefix of the alert rule names.')
param namePrefix string

@description('Azure region.')
param location string

@description('Tags applied to the rule.')
param tags object = {}

@description('Application Insights component the rule queries.')
param appInsightsName string

@description('Resource ids of action groups to notify. Empty: the alert shows in the portal only.')
param actionGroupIds array = []

@description('Minutes an event may stay unsent before the alert fires.')
@minValue(2)
param thresholdMinutes int = 5

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

var unsentQuery = '''
traces
| where isnotempty(tostring(customDimensions.outboxOldestAgeSeconds))
| summarize oldest = max(todouble(customDimensions.outboxOldestAgeSeconds)),
    events = max(toint(customDimensions.outboxEvents)) by shard = tostring(customDimensions.shard)
| where oldest > {0}
'''

resource unsentAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-outcome-events-unsent'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: outcome events unsent'
    description: 'An outcome event stayed in the outbox longer than the threshold: is the outcomes queue missing, or the app refused on it? ./dev cli status shows the outbox. See docs/operations.md.'
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
          query: format(unsentQuery, thresholdMinutes * 60)
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
