// The user-assigned managed identity the function app runs as: it reads and writes storage, pulls
// the deployment package and sends telemetry, all with Entra ID tokens (no keys anywhere).

@description('Identity name.')
param name string

@description('Azure region.')
param location string

@description('Tags applied to the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
