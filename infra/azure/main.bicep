// Switchyard on Azure Container Apps, mirroring the APIM sample's infra/main.bicep: two Azure
// OpenAI accounts with a model deployment each, a user-assigned managed identity with
// "Cognitive Services OpenAI User" on both, and the gateway (here a Container App instead of
// API Management) calling them with that identity: no keys anywhere. Log Analytics collects
// the gateway's logs. With more than one replica, an Azure Managed Redis (TLS, clustered,
// Entra ID sign-in only) that the identity may use holds the state replicas share. Output: the
// endpoint to point SDKs at.
//
//   az group create -n switchyard-rg -l eastus
//   az deployment group create -g switchyard-rg -f infra/azure/main.bicep \
//     -p infra/azure/main.parameters.json -p adminKey="$(openssl rand -hex 24)" \
//     -p clientKey="$(openssl rand -hex 24)" -p image=<your image> [-p acrName=<registry>]
//
// Without clientKey the gateway has internal ingress only: an open gateway on the internet
// would serve anyone on the accounts' quota.
//
// See docs/deploy.md for what was and was not validated.

targetScope = 'resourceGroup'

@description('Prefix for resource names; a unique suffix is added where names must be global.')
@minLength(3)
@maxLength(12)
param namePrefix string = 'switchyard'

@description('Region of the Container Apps environment, the identity and the logs.')
param location string = resourceGroup().location

@description('The two Azure OpenAI accounts, as in the sample: a name suffix and a region each.')
param openAiInstances array = [
  {
    name: 'eastus'
    location: 'eastus'
  }
  {
    name: 'westus'
    location: 'westus'
  }
]

@description('The model deployed on each account, under the same deployment name.')
param deploymentName string = 'gpt-4o'
param modelName string = 'gpt-4o'
param modelVersion string = '2024-08-06'
@description('Deployment SKU: Standard (pay-as-you-go, regional), GlobalStandard, or ProvisionedManaged (PTU).')
param modelSku string = 'Standard'
@description('Capacity in thousands of tokens per minute (Standard) or PTUs (ProvisionedManaged).')
param modelCapacity int = 10

@description('The Switchyard container image (built from the repository\'s Dockerfile).')
param image string

@description('Key for the admin API (/admin/*); at least 16 characters.')
@secure()
@minLength(16)
param adminKey string

@description('A key clients send (as api-key) to use the gateway; at least 16 characters. Without one the ingress is internal: only apps inside the environment reach the gateway, which then serves anyone there.')
@secure()
param clientKey string = ''

@description('Pull the image from an Azure Container Registry in this resource group, by its name: the identity is given AcrPull on it. Leave empty for a public image or registryServer below.')
param acrName string = ''
@description('Another private registry: its server, user name and password.')
param registryServer string = ''
param registryUsername string = ''
@secure()
param registryPassword string = ''

@description('Replicas. With maxReplicas above 1 the template adds an Azure Managed Redis that the replicas share (limits, cooldowns, object owners), signed in to with the identity; with one replica, none.')
@minValue(1)
param minReplicas int = 1
@minValue(1)
param maxReplicas int = 1

@description('The Azure Managed Redis SKU, when there is more than one replica.')
param redisSku string = 'Balanced_B0'

var suffix = uniqueString(resourceGroup().id)
// Built-in role "Cognitive Services OpenAI User": call inference APIs, nothing else.
var openAiUserRoleId = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${namePrefix}-id'
  location: location
}

resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' = [for inst in openAiInstances: {
  name: '${namePrefix}-${inst.name}-${suffix}'
  location: inst.location
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  properties: {
    customSubDomainName: '${namePrefix}-${inst.name}-${suffix}'
    publicNetworkAccess: 'Enabled'
    // Keys are not needed: the gateway authenticates with the managed identity.
    disableLocalAuth: true
  }
}]

resource modelDeployment 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = [for (inst, i) in openAiInstances: {
  parent: openAi[i]
  name: deploymentName
  sku: {
    name: modelSku
    capacity: modelCapacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
  }
}]

resource openAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (inst, i) in openAiInstances: {
  name: guid(openAi[i].id, identity.id, openAiUserRoleId)
  scope: openAi[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUserRoleId)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}]

resource acr 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = if (!empty(acrName)) {
  name: empty(acrName) ? 'unused' : acrName
}

// Built-in role "AcrPull".
var acrPullRoleId = '7f951dda-4ed3-4680-a7ca-43fe172d538d'

resource acrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(acrName)) {
  name: guid(resourceGroup().id, acrName, identity.id, acrPullRoleId)
  scope: acr
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRoleId)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

var registries = !empty(acrName)
  ? [
      {
        server: acr.properties.loginServer
        identity: identity.id
      }
    ]
  : (empty(registryServer)
      ? []
      : [
          {
            server: registryServer
            username: registryUsername
            passwordSecretRef: 'registry-password'
          }
        ])

// Shared state for more than one replica: Azure Managed Redis, TLS on port 10000, the OSS
// cluster policy, no access keys (Entra ID only), and the identity given the default access
// policy (data access) under its object id, the user name it signs in with.
var sharedStore = maxReplicas > 1

resource redis 'Microsoft.Cache/redisEnterprise@2025-04-01' = if (sharedStore) {
  name: '${namePrefix}-redis-${suffix}'
  location: location
  sku: {
    name: redisSku
  }
  properties: {
    minimumTlsVersion: '1.2'
  }
}

resource redisDb 'Microsoft.Cache/redisEnterprise/databases@2025-04-01' = if (sharedStore) {
  parent: redis
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    port: 10000
    clusteringPolicy: 'OSSCluster'
    evictionPolicy: 'NoEviction'
    accessKeysAuthentication: 'Disabled'
  }
}

resource redisAccess 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2025-04-01' = if (sharedStore) {
  parent: redisDb
  name: 'gateway'
  properties: {
    accessPolicyName: 'default'
    user: {
      objectId: identity.properties.principalId
    }
  }
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${namePrefix}-logs-${suffix}'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource env 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: '${namePrefix}-env'
  location: location
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
  }
}

// The gateway's config: one backend per account (at its custom subdomain, known before the
// deployment runs), each called with the identity's token. `\${...}` is a literal `${...}` for
// Switchyard, which reads it from the environment.
var backendLines = [for (inst, i) in openAiInstances: join([
  '[[backends]]'
  'name = "${inst.name}"'
  'url = "https://${namePrefix}-${inst.name}-${suffix}.openai.azure.com"'
  'auth = { type = "managed_identity", client_id = "${identity.properties.clientId}" }'
  ''
], '\n')]
// The shared store, with more than one replica.
var storeLines = sharedStore ? [
  '[limits]'
  'store = "redis"'
  'redis_url = "rediss://${redis.properties.hostName}:10000"'
  'redis_cluster = true'
  'redis_auth = { type = "managed_identity", client_id = "${identity.properties.clientId}" }'
  'redis_user = "${identity.properties.principalId}"'
  ''
] : []
var config = join(concat([
  '[server]'
  'listen = "0.0.0.0:8080"'
  'admin_listen = "0.0.0.0:9090"'
  'admin_key = "\${SWITCHYARD_ADMIN_KEY}"'
  ''
  '[routing]'
  'strategy = "round_robin"'
  'max_attempts = 3'
  ''
], backendLines, empty(clientKey) ? [] : [
  '[[consumers]]'
  'name = "clients"'
  'key = "\${SWITCHYARD_CLIENT_KEY}"'
  ''
], storeLines), '\n')

var secrets = concat([
  {
    name: 'admin-key'
    value: adminKey
  }
  {
    name: 'config'
    value: config
  }
], empty(clientKey) ? [] : [
  {
    name: 'client-key'
    value: clientKey
  }
], empty(registryPassword) ? [] : [
  {
    name: 'registry-password'
    value: registryPassword
  }
])

var clientKeyEnv = empty(clientKey) ? [] : [
  {
    name: 'SWITCHYARD_CLIENT_KEY'
    secretRef: 'client-key'
  }
]

resource app 'Microsoft.App/containerApps@2024-03-01' = {
  name: namePrefix
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    managedEnvironmentId: env.id
    configuration: {
      ingress: {
        // Reachable from the internet only when clients need a key to use it.
        external: !empty(clientKey)
        targetPort: 8080
        transport: 'auto'
        allowInsecure: false
      }
      registries: registries
      secrets: secrets
    }
    template: {
      // More than server.shutdown_delay (5 s) and server.shutdown_grace (30 s) together.
      terminationGracePeriodSeconds: 40
      containers: [
        {
          name: 'switchyard'
          image: image
          args: [
            'serve'
            '--config'
            '/etc/switchyard/switchyard.toml'
          ]
          env: concat([
            {
              name: 'SWITCHYARD_ADMIN_KEY'
              secretRef: 'admin-key'
            }
          ], clientKeyEnv)
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          volumeMounts: [
            {
              volumeName: 'config'
              mountPath: '/etc/switchyard'
            }
          ]
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: 9090
                // The admin listener answers only a Host that names it.
                httpHeaders: [
                  {
                    name: 'Host'
                    value: 'localhost'
                  }
                ]
              }
              periodSeconds: 10
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: 9090
                // The admin listener answers only a Host that names it.
                httpHeaders: [
                  {
                    name: 'Host'
                    value: 'localhost'
                  }
                ]
              }
              periodSeconds: 5
            }
          ]
        }
      ]
      volumes: [
        {
          name: 'config'
          storageType: 'Secret'
          secrets: [
            {
              secretRef: 'config'
              path: 'switchyard.toml'
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        rules: [
          {
            name: 'http'
            http: {
              metadata: {
                concurrentRequests: '200'
              }
            }
          }
        ]
      }
    }
  }
  dependsOn: [
    openAiUser
    modelDeployment
    acrPull
    redisAccess
  ]
}

@description('The endpoint for SDKs: an Azure OpenAI endpoint, as the sample\'s APIM gateway URL.')
output endpoint string = 'https://${app.properties.configuration.ingress.fqdn}'
output identityClientId string = identity.properties.clientId
output openAiEndpoints array = [for (inst, i) in openAiInstances: openAi[i].properties.endpoint]
