//! Configuration: TOML → `${VAR}` expansion → raw serde types → validated [`Config`].
//!
//! Everything is checked before a port is bound; every error names the field path.

mod credential;
mod deployment;
mod env;
mod raw;
mod redact;
mod redis_url;
mod secret;
mod tls;
mod validate;

pub use credential::{DEFAULT_SCOPE, EntraCredential, EntraFlow, ManagedIdentityId, MiSource};
pub use deployment::{DeploymentConfig, FallbackOn, Price};

pub use validate::parse_duration;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use http::uri::{Authority, Scheme};
use serde::Deserialize;

pub use redis_url::RedisTarget;
pub use secret::{Secret, sha256};
pub use tls::{ExtraCa, ListenerTls};

/// Default body limit kept for replay: 32 MiB, Azure OpenAI's own request ceiling for most operations.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default cap on open client connections; beyond it new ones are closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default total attempts per request, as the sample's README says.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Completion tokens reserved against limits for a request without `max_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 500;
/// Statuses retried on the next backend unless configured otherwise.
pub const DEFAULT_RETRY_ON_STATUS: [u16; 6] = [408, 429, 500, 502, 503, 504];
/// Highest backend `priority` (1 is served first).
pub const MAX_PRIORITY: u32 = 100;

/// Azure's rule for deployment names, held alike for names in requests and in the config: 1 to
/// 64 letters, digits, `-`, `_` or `.`, and not `.` or `..` (which mean something else in a
/// path). A name that could not exist on any backend never leaves the gateway.
pub fn valid_deployment_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A config problem, with the dotted path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// e.g. `backends[1].auth.key`; empty for whole-file problems.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn at(path: &[String], message: impl Into<String>) -> Self {
        let mut p = String::new();
        for seg in path {
            if !p.is_empty() && !seg.starts_with('[') {
                p.push('.');
            }
            p.push_str(seg);
        }
        Self {
            path: p,
            message: message.into(),
        }
    }

    fn field(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The raw config from a parsed document, an error naming the field it is about.
fn deserialize(doc: toml::Value) -> Result<raw::RawConfig, ConfigError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigError::field(path, e.into_inner().message().to_string())
    })
}

/// 1-based line and column (in characters) of byte `at` in `text`.
fn line_and_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// How a backend is picked for each attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A strict rotation over the backends, shared by every connection.
    RoundRobin,
    /// Smooth weighted round-robin on `weight`.
    Weighted,
    /// Fewest requests in flight (streams count until they end), relative to `weight`.
    LeastInflight,
    /// Power of two choices on a peak-EWMA of time to first byte, weighed by in-flight.
    Latency,
    /// Most room left in the backend's own rate limit, from its `x-ratelimit-remaining-*`.
    Headroom,
}

impl Strategy {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [Strategy; 5] = [
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::LeastInflight,
        Strategy::Latency,
        Strategy::Headroom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastInflight => "least_inflight",
            Strategy::Latency => "latency",
            Strategy::Headroom => "headroom",
        }
    }
}

/// What to do with a deployment no `[[deployments]]` entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownDeployments {
    /// Send it to every backend under its own name (the core gateway's behaviour).
    #[default]
    Forward,
    /// Answer 404 naming it.
    Reject,
}

/// One of a consumer's keys: its SHA-256, all the gateway keeps whether the config gave the key
/// or its hash, and when it stops being accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerKey {
    pub sha256: [u8; 32],
    pub expires: Option<std::time::SystemTime>,
}

impl ConsumerKey {
    /// The first 8 hex digits of the hash: enough to tell a consumer's keys apart, nothing to
    /// sign in with.
    pub fn prefix(&self) -> String {
        self.sha256[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub routing: RoutingConfig,
    pub backends: Vec<BackendConfig>,
    pub deployments: Vec<DeploymentConfig>,
    /// When non-empty, every request must carry one of these consumers' keys.
    pub consumers: Vec<ConsumerConfig>,
    pub limits: LimitsConfig,
    /// How the owners of stored objects are remembered.
    pub affinity: AffinityConfig,
    /// Entra ID (or any OIDC) tokens accepted from callers, in `Authorization: Bearer`.
    pub jwt: Option<JwtConfig>,
    /// OpenTelemetry trace export; off when absent.
    pub tracing: Option<TracingConfig>,
    /// OpenTelemetry metrics export; off when absent.
    pub metrics: Option<MetricsConfig>,
    /// Usage and cost accounting.
    pub usage: UsageConfig,
}

/// `[usage]`: how usage is priced.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageConfig {
    /// The currency of `[[deployments]] price` and of every cost shown (ISO 4217, e.g. `USD`).
    pub currency: String,
    /// How long the usage report's hourly figures are kept.
    pub retention: Duration,
}

/// Where and how spans are exported (OTLP over HTTP, JSON encoding).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The collector's traces URL (`…/v1/traces`).
    pub endpoint: http::Uri,
    pub service_name: String,
    /// Share of new traces recorded (a caller's sampled `traceparent` is always followed).
    pub sample_ratio: f64,
    pub export_interval: Duration,
    /// Sent with every export, e.g. a collector's API key; values are secrets.
    pub headers: Vec<(http::HeaderName, Secret)>,
}

/// Where and how metrics are exported (OTLP over HTTP, JSON encoding).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// The collector's metrics URL (`…/v1/metrics`).
    pub endpoint: http::Uri,
    pub service_name: String,
    pub export_interval: Duration,
    /// Sent with every export, e.g. a collector's API key; values are secrets.
    pub headers: Vec<(http::HeaderName, Secret)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_url: String,
    /// The claim whose value names the consumer (`azp`: the calling app's client id).
    pub claim: String,
}

/// How long, and how many, owners of stored objects (responses, files, batches, ...) are
/// remembered. They are kept where limits are (`limits.store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityConfig {
    pub ttl: Duration,
    /// Owners this replica keeps in memory at most; least recently used dropped first.
    pub max_entries: usize,
}

/// How consumer limits are kept.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Completion tokens reserved for a request that sets no `max_tokens`.
    pub completion_estimate: u64,
    pub store: LimitStore,
}

/// Where limits are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitStore {
    /// In this gateway's memory.
    Memory,
    /// In Redis, shared by every replica.
    Redis(RedisStore),
}

/// The Redis that replicas share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStore {
    /// `redis[s]://[[user]:password@]host[:port][/db]`; printed without the password.
    pub url: Secret,
    /// Refuse limited requests while Redis is unreachable (default: serve them).
    pub fail_closed: bool,
    /// Longest wait on Redis on the request path.
    pub timeout: Duration,
    /// Redis Cluster: the URL names one node, the others are discovered.
    pub cluster: bool,
    /// Entra ID sign-in: the token is the password, renewed on every connection.
    pub auth: Option<EntraCredential>,
    /// The ACL user to sign in as with `auth`; else the token's `oid` claim.
    pub user: Option<String>,
}

/// A consumer's limits; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub token_quota: Option<Quota>,
    /// A budget in money (`consumers[].budget`; the consumer's overall limits only).
    pub budget: Option<Budget>,
}

impl ConsumerLimits {
    /// Whether any limit counts tokens (and so needs each response's usage).
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.token_quota.is_some() || self.budget.is_some()
    }
}

/// What a consumer may spend per fixed UTC window, in millionths of `[usage] currency` (whole
/// numbers, so that every replica adds them up alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub period: QuotaPeriod,
    pub micros: u64,
}

/// Money as whole millionths of the currency, as budgets count it.
pub fn micros(amount: f64) -> u64 {
    (amount * 1_000_000.0).round().max(0.0) as u64
}

/// A token budget per fixed UTC window (APIM's `token-quota`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub period: QuotaPeriod,
    pub tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Hour,
    Day,
    Month,
}

impl QuotaPeriod {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Hour => "hour",
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

/// A client of the gateway (APIM's subscription), known by its key.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub name: String,
    /// The consumer's keys (`key`/`key_sha256` and `keys`); empty for a consumer known only
    /// by its token's claim.
    pub keys: Vec<ConsumerKey>,
    /// The `jwt.claim` value that identifies this consumer in a caller's token.
    pub jwt: Option<String>,
    /// The deployments (client-facing names) it may use; `None`: every one.
    pub models: Option<Vec<String>>,
    /// Whether a fallback deployment may serve it (`consumers[].fallbacks`, default true).
    pub fallbacks: bool,
    pub limits: ConsumerLimits,
    /// Limits on one deployment (the client-facing name), on top of `limits`.
    pub deployment_limits: Vec<(String, ConsumerLimits)>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// Required by `/admin/*` (as `Authorization: Bearer` or `x-admin-key`); mandatory when the
    /// admin listener is not on loopback.
    pub admin_key: Option<Secret>,
    /// Host names the admin listener answers for besides its address and `localhost`.
    pub admin_hosts: Vec<String>,
    pub max_body_bytes: usize,
    /// How long in-flight requests and streams get to finish after a stop signal.
    pub shutdown_grace: Duration,
    /// How long the listeners keep accepting after a stop signal (`/readyz` is 503 from the
    /// signal on), for load balancers to stop sending new connections.
    pub shutdown_delay: Duration,
    /// Longest wait for a request's head (and a TLS handshake); also how long an idle
    /// keep-alive connection stays open.
    pub header_read_timeout: Duration,
    /// Longest a request body may take to arrive whole (its gaps are bounded by
    /// `header_read_timeout`).
    pub body_read_timeout: Duration,
    /// Open client connections at most; more are closed as they arrive.
    pub max_connections: usize,
    /// HTTPS on the client listener when set.
    pub tls: Option<ListenerTls>,
    /// CA certificates trusted besides the system's for HTTPS the gateway makes.
    pub ca: ExtraCa,
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub strategy: Strategy,
    pub max_attempts: u32,
    pub retry_on_status: Vec<StatusCode>,
    pub connect_timeout: Duration,
    /// Longest wait for a backend's response headers before the attempt counts as failed.
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks once a response has started.
    pub idle_timeout: Duration,
    /// Budget for the whole request across attempts (until response headers).
    pub request_timeout: Duration,
    /// Cooldown after a 429 that carries no usable retry hint.
    pub default_cooldown: Duration,
    /// Upper bound for any cooldown (Azure can ask for a day).
    pub max_cooldown: Duration,
    pub unknown_deployments: UnknownDeployments,
    pub circuit_breaker: CircuitBreakerConfig,
    /// Where a request's session key is read, first found wins: its requests go to one backend
    /// (and that backend's prompt cache) while it can take them. Empty: no session affinity.
    pub affinity_key: Vec<AffinityKey>,
}

/// One place a session key may be: a request header or a top-level string field of a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinityKey {
    Header(http::HeaderName),
    Body(String),
}

/// APIM's backend circuit breaker: `failures` failures within `interval` open the circuit for
/// `trip_duration`; then one probe is let through, and its success closes the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakerConfig {
    pub failures: u32,
    pub interval: Duration,
    pub trip_duration: Duration,
}

impl RoutingConfig {
    pub fn retries_status(&self, status: StatusCode) -> bool {
        self.retry_on_status.contains(&status)
    }
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    pub url: BackendUrl,
    pub auth: BackendAuth,
    /// 1 is served first; higher numbers take traffic only when every better group is unavailable.
    pub priority: u32,
    pub weight: u32,
}

/// A backend's base URL, split so that request paths can be joined without re-parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix without a trailing slash (usually empty).
    pub base_path: String,
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// How the gateway authenticates to a backend. The client's own credentials never reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAuth {
    /// Azure OpenAI key, sent as `api-key`.
    ApiKey(Secret),
    /// No credential (a local simulator or a backend behind its own gateway).
    None,
    /// A Microsoft Entra ID token, sent as `Authorization: Bearer`.
    Entra(EntraCredential),
}

impl BackendAuth {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendAuth::ApiKey(_) => "api_key",
            BackendAuth::None => "none",
            BackendAuth::Entra(e) => e.flow.kind(),
        }
    }
}

impl Config {
    /// Reads, expands and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::field("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, &|name| std::env::var(name).ok())
    }

    /// Parses config text, looking `${VAR}` names up through `lookup`.
    pub fn parse(
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Value = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let (line, column) = line_and_column(text, span.start);
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            ConfigError::field("", format!("invalid TOML{at}: {}", e.message().trim_end()))
        })?;
        // A misspelt key is reported as such before any `${VAR}` is looked up: a variable
        // the misspelt field names would otherwise hide it behind "not set". (Other errors
        // wait for the expansion: a `${VAR}` may stand for a valid value.)
        if let Err(e) = deserialize(doc.clone())
            && e.message.starts_with("unknown field")
        {
            return Err(e);
        }
        env::expand(&mut doc, &mut Vec::new(), lookup)?;
        validate::validate(deserialize(doc)?, lookup)
    }

    /// A human summary for `switchyard check`; secrets are masked.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "listen        {}", self.server.listen);
        match self.server.admin_listen {
            Some(a) => _ = writeln!(s, "admin_listen  {a}"),
            None => _ = writeln!(s, "admin_listen  (disabled)"),
        }
        let _ = writeln!(
            s,
            "routing       {} , max_attempts {} , retry on {:?}",
            self.routing.strategy.as_str(),
            self.routing.max_attempts,
            self.routing
                .retry_on_status
                .iter()
                .map(|s| s.as_u16())
                .collect::<Vec<_>>()
        );
        let _ = writeln!(s, "backends      {}", self.backends.len());
        for b in &self.backends {
            let _ = writeln!(
                s,
                "  - {:<16} {}  auth={} priority={} weight={}",
                b.name,
                b.url,
                b.auth.kind(),
                b.priority,
                b.weight
            );
            if let BackendAuth::Entra(e) = &b.auth {
                let _ = writeln!(s, "    {:<16} {}", "", e.describe());
            }
        }
        if !self.consumers.is_empty() {
            let names: Vec<&str> = self.consumers.iter().map(|c| c.name.as_str()).collect();
            let _ = writeln!(s, "consumers     {} ({})", names.len(), names.join(", "));
        }
        if let LimitStore::Redis(r) = &self.limits.store {
            let (addr, tls) = RedisTarget::parse(r.url.expose(), r.cluster)
                .map(|t| (t.addr, t.tls))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "limits store  Redis{} at {addr}{}, fail {}",
                if r.cluster { " Cluster" } else { "" },
                if tls { " (TLS)" } else { "" },
                if r.fail_closed { "closed" } else { "open" }
            );
            if let Some(a) = &r.auth {
                let _ = writeln!(
                    s,
                    "    {:<16} Entra ID sign-in as {}: {}",
                    "",
                    r.user.as_deref().unwrap_or("the token's oid"),
                    a.describe()
                );
            }
        }
        if !self.deployments.is_empty() {
            let _ = writeln!(s, "deployments   {}", self.deployments.len());
        }
        for d in &self.deployments {
            let names: Vec<String> = d
                .backends
                .iter()
                .map(|(i, n)| format!("{}={n}", self.backends[*i].name))
                .collect();
            let _ = writeln!(s, "  - {:<16} {}", d.name, names.join(", "));
            if !d.fallbacks.is_empty() {
                let _ = writeln!(
                    s,
                    "    {:<16} falls back to {} on {}",
                    "",
                    d.fallbacks.join(", then "),
                    d.fallback_on.names().join(", ")
                );
            }
            if let Some(p) = d.price {
                let _ = writeln!(
                    s,
                    "    {:<16} price per million tokens: input {}, cached input {}, output {} {}",
                    "", p.input, p.cached_input, p.output, self.usage.currency
                );
            }
        }
        if let Some(t) = &self.tracing {
            let _ = writeln!(
                s,
                "tracing       OTLP to {} (service {}, sampling {})",
                t.endpoint, t.service_name, t.sample_ratio
            );
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(
                s,
                "metrics       OTLP to {} (service {}, every {:?})",
                m.endpoint, m.service_name, m.export_interval
            );
        }
        let _ = writeln!(
            s,
            "usage         hourly figures kept {} days, costs in {}",
            self.usage.retention.as_secs_f64() / 86_400.0,
            self.usage.currency
        );
        s
    }
}

#[cfg(test)]
mod tests;
