//! The config file as written: serde types with no meaning attached yet.
//! `super::validate` turns these into the types the gateway runs on.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub deployments: Vec<RawDeployment>,
    #[serde(default)]
    pub consumers: Vec<RawConsumer>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub affinity: RawAffinity,
    pub jwt: Option<RawJwt>,
    pub tracing: Option<RawTracing>,
    pub metrics: Option<RawMetrics>,
    #[serde(default)]
    pub usage: RawUsage,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub currency: Option<String>,
    pub retention: Option<String>,
}

/// Per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub cached_input: Option<f64>,
    pub output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: String,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
    pub export_interval: Option<String>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub otlp_endpoint: String,
    pub service_name: Option<String>,
    pub export_interval: Option<String>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: String,
    pub audience: OneOrMany,
    pub jwks_url: String,
    pub claim: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    pub name: String,
    pub key: Option<String>,
    pub key_sha256: Option<String>,
    /// More keys, each with an optional expiry: a new key is added beside the old one, clients
    /// move to it, and the old one expires.
    pub keys: Option<Vec<RawKey>>,
    /// The value of `jwt.claim` in a caller's Entra ID token that makes it this consumer.
    pub jwt: Option<String>,
    /// The deployments it may use; every one without it.
    pub models: Option<Vec<String>>,
    /// `false`: never served by a fallback deployment, only by the one asked for.
    pub fallbacks: Option<bool>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub token_quota: Option<RawQuota>,
    /// What it may spend per day or month, in `[usage] currency`.
    pub budget: Option<RawBudget>,
    /// Limits for this consumer on one deployment, on top of its overall ones.
    #[serde(default)]
    pub deployments: std::collections::BTreeMap<String, RawLimitSet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub key: Option<String>,
    pub key_sha256: Option<String>,
    /// RFC 3339 (`2027-01-31T00:00:00Z`): the key is refused from then on.
    pub expires: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimitSet {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub token_quota: Option<RawQuota>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub period: super::QuotaPeriod,
    pub amount: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub period: super::QuotaPeriod,
    pub tokens: u64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub store: Option<String>,
    pub redis_url: Option<String>,
    pub fail_closed: Option<bool>,
    pub redis_timeout: Option<String>,
    pub redis_cluster: Option<bool>,
    pub redis_auth: Option<RawAuth>,
    pub redis_user: Option<String>,
    pub completion_estimate: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAffinity {
    pub ttl: Option<String>,
    pub max_entries: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub admin_key: Option<String>,
    pub admin_hosts: Option<Vec<String>>,
    pub max_body_bytes: Option<u64>,
    pub shutdown_grace: Option<String>,
    pub shutdown_delay: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub max_connections: Option<u32>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub strategy: Option<super::Strategy>,
    pub max_attempts: Option<u32>,
    pub retry_on_status: Option<Vec<u16>>,
    pub connect_timeout: Option<String>,
    pub first_byte_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub default_cooldown: Option<String>,
    pub max_cooldown: Option<String>,
    pub unknown_deployments: Option<super::UnknownDeployments>,
    pub affinity_key: Option<Vec<String>>,
    #[serde(default)]
    pub circuit_breaker: RawCircuitBreaker,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    pub failures: Option<u32>,
    pub interval: Option<String>,
    pub trip_duration: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub name: String,
    /// Backend name -> the deployment's name on that backend (or a table with it and the
    /// backend's priority and weight for this deployment). A `BTreeMap` keeps the order
    /// stable, so errors and summaries read the same on every run.
    pub backends: std::collections::BTreeMap<String, RawDeploymentBackend>,
    /// Deployments tried in turn when this one cannot serve a request.
    pub fallbacks: Option<Vec<String>>,
    /// What makes a request go on to the next fallback.
    pub fallback_on: Option<Vec<String>>,
    /// What its tokens cost, per million.
    pub price: Option<RawPrice>,
}

/// `"gpt-4o"`, or `{ deployment = "gpt-4o", priority = 1, weight = 3 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawDeploymentBackend {
    Name(String),
    Table(RawDeploymentTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploymentTable {
    pub deployment: String,
    pub priority: Option<u32>,
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub url: String,
    pub auth: RawAuth,
    pub priority: Option<u32>,
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawAuth {
    ApiKey {
        key: String,
    },
    None,
    ManagedIdentity {
        client_id: Option<String>,
        object_id: Option<String>,
        resource_id: Option<String>,
        scope: Option<String>,
        /// IMDS token endpoint; for tests and unusual hosts.
        endpoint: Option<String>,
    },
    WorkloadIdentity {
        client_id: Option<String>,
        tenant_id: Option<String>,
        token_file: Option<String>,
        authority_host: Option<String>,
        scope: Option<String>,
    },
    ClientSecret {
        tenant_id: String,
        client_id: String,
        client_secret: String,
        authority_host: Option<String>,
        scope: Option<String>,
    },
    AzureCli {
        scope: Option<String>,
        /// The `az` executable.
        command: Option<String>,
    },
}
