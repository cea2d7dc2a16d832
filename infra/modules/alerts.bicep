// Log search alerts on the app's OpenTelemetry data in Application Insights (docs/operations.md):
// work announced and not committed for 5 minutes, messages parked, the poison queue not empty;
// and per shard (every metric and span carries a shard dimension): a shard without a leader while
// its work waits, cross-shard work without progress for too long, one shard far behind the others.
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

@description('Cross-shard work alert: seconds a coordination may go without progress (a vote, a decision, an ack) before the alert fires.')
param inFlightAgeThresholdSeconds int = 300

@description('Shard-behind alert: a shard fires when its waiting completions exceed this many times the median of all shards...')
param behindFactor int = 10

@description('... and exceed this floor (small backlogs never fire).')
param behindMinPending int = 1000

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

// Per shard: every full scan of the shard in the window found work announced and not committed,
// and the shard decided nothing: no leader commits it while work waits.
var leaderlessShardQuery = '''
let scans = dependencies
    | where name == "ledger.full_scan"
    | summarize scansSeen = count(), fewestWaiting = min(toint(customDimensions.requestsReady))
        by shard = toint(customDimensions.shard);
let decided = customMetrics
    | where name == "ledger.outcomes"
    | summarize decided = sum(value) by shard = toint(customDimensions.shard);
scans
| join kind=leftouter decided on shard
| where scansSeen > 0 and fewestWaiting > 0 and coalesce(decided, 0.0) == 0
| project shard, fewestWaiting
'''

// Per shard: its oldest coordination (a cross-shard request it is home of) went without
// progress for longer than the threshold, as the latest read of its work in flight saw it.
var inFlightQuery = 'customMetrics | where name == "ledger.flight.oldest_age" | summarize arg_max(timestamp, value) by shard = toint(customDimensions.shard) | where value > ${inFlightAgeThresholdSeconds} | project shard, oldestInFlightAgeSeconds = value'

// One shard far behind: its waiting completions (the latest full scan of each shard) exceed
// behindFactor x the median of all shards, and behindMinPending.
var behindQuery = 'let latest = dependencies | where name == "ledger.full_scan" | summarize arg_max(timestamp, customDimensions) by shard = toint(customDimensions.shard) | extend pending = toint(customDimensions.completions); let median = toscalar(latest | summarize percentile(pending, 50)); latest | where pending > ${behindFactor} * median and pending > ${behindMinPending} | project shard, pending, median'

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

resource leaderlessShardAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-shard-without-leader'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: a shard without a leader while work waits'
    description: 'Every full scan of one shard in the last 10 minutes found work announced and the shard decided nothing: its lease held by a stuck instance, or its leader fenced out. See docs/operations.md (Shards).'
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
          query: leaderlessShardQuery
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

resource inFlightAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-cross-shard-work-old'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: cross-shard work without progress'
    description: 'A shard\'s oldest cross-shard request went without a vote, decision or ack for longer than inFlightAgeThresholdSeconds: money stays in escrow meanwhile. See docs/operations.md (Shards).'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: inFlightQuery
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

resource behindAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-shard-far-behind'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Ledger: one shard far behind the others'
    description: 'One shard has behindFactor times the median backlog of all shards (and more than behindMinPending completions waiting): a hot account, a slow leader, or a shard with too much to do. See docs/operations.md (Shards).'
    severity: 3
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: behindQuery
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
  leaderlessShardAlert.name
  inFlightAlert.name
  behindAlert.name
]
