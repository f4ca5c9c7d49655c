//! Configuration: TOML → `${VAR}` expansion → raw serde types → validated [`Config`].
//!
//! Everything is checked before a port is bound; every error names the field path.

mod env;
mod raw;
mod secret;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use http::uri::{Authority, Scheme};
use serde::Deserialize;

pub use secret::Secret;

/// Default body limit kept for replay: 32 MiB, Azure OpenAI's own request ceiling for most operations.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default total attempts per request, as the sample's README says.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Statuses retried on the next backend unless configured otherwise.
pub const DEFAULT_RETRY_ON_STATUS: [u16; 6] = [408, 429, 500, 502, 503, 504];

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

/// How a backend is picked for each attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A strict rotation over all backends, shared by every connection.
    RoundRobin,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
        }
    }
}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub routing: RoutingConfig,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    /// How long in-flight requests and streams get to finish after a stop signal.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub strategy: Strategy,
    pub max_attempts: u32,
    pub retry_on_status: Vec<StatusCode>,
    pub connect_timeout: Duration,
    /// Longest wait for a backend's response headers before the attempt counts as failed.
    pub first_byte_timeout: Duration,
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
#[derive(Debug, Clone)]
pub enum BackendAuth {
    /// Azure OpenAI key, sent as `api-key`.
    ApiKey(Secret),
    /// No credential (a local simulator or a backend behind its own gateway).
    None,
}

impl BackendAuth {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendAuth::ApiKey(_) => "api_key",
            BackendAuth::None => "none",
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
        let mut doc: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::field("", format!("invalid TOML: {}", e.message())))?;
        env::expand(&mut doc, &mut Vec::new(), lookup)?;
        let raw: raw::RawConfig = serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::field(path, e.into_inner().message().to_string())
        })?;
        validate(raw)
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
            let _ = writeln!(s, "  - {:<16} {}  auth={}", b.name, b.url, b.auth.kind());
        }
        s
    }
}

fn validate(raw: raw::RawConfig) -> Result<Config, ConfigError> {
    let server = validate_server(raw.server)?;
    let routing = validate_routing(raw.routing)?;
    if raw.backends.is_empty() {
        return Err(ConfigError::field(
            "backends",
            "at least one [[backends]] entry is required",
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backends.len());
    for (i, b) in raw.backends.into_iter().enumerate() {
        let at = |field: &str| format!("backends[{i}].{field}");
        let name = b.name.trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::field(
                at("name"),
                format!(
                    "{:?} is not a valid name (use letters, digits, '-', '_', '.')",
                    b.name
                ),
            ));
        }
        if let Some(j) = backends.iter().position(|o| o.name == name) {
            return Err(ConfigError::field(
                at("name"),
                format!("duplicate backend name {name:?} (also backends[{j}])"),
            ));
        }
        let url = parse_backend_url(&b.url).map_err(|m| ConfigError::field(at("url"), m))?;
        let auth = match b.auth {
            raw::RawAuth::ApiKey { key } => {
                if key.is_empty() {
                    return Err(ConfigError::field(at("auth.key"), "must not be empty"));
                }
                if http::HeaderValue::from_str(&key).is_err() {
                    return Err(ConfigError::field(
                        at("auth.key"),
                        "contains characters not allowed in an HTTP header",
                    ));
                }
                BackendAuth::ApiKey(Secret::new(key))
            }
            raw::RawAuth::None => BackendAuth::None,
        };
        backends.push(BackendConfig { name, url, auth });
    }
    Ok(Config {
        server,
        routing,
        backends,
    })
}

fn validate_server(raw: raw::RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = parse_addr(raw.listen.as_deref().unwrap_or("127.0.0.1:8080"))
        .map_err(|m| ConfigError::field("server.listen", m))?;
    let admin_listen = raw
        .admin_listen
        .as_deref()
        .map(parse_addr)
        .transpose()
        .map_err(|m| ConfigError::field("server.admin_listen", m))?;
    let max_body_bytes = match raw.max_body_bytes {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(0) => {
            return Err(ConfigError::field(
                "server.max_body_bytes",
                "must be at least 1",
            ));
        }
        Some(n) => usize::try_from(n)
            .map_err(|_| ConfigError::field("server.max_body_bytes", "too large"))?,
    };
    let shutdown_grace = opt_duration(raw.shutdown_grace, "server.shutdown_grace", 30_000)?;
    Ok(ServerConfig {
        listen,
        admin_listen,
        max_body_bytes,
        shutdown_grace,
    })
}

fn validate_routing(raw: raw::RawRouting) -> Result<RoutingConfig, ConfigError> {
    let max_attempts = raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=20).contains(&max_attempts) {
        return Err(ConfigError::field(
            "routing.max_attempts",
            format!("{max_attempts} is out of range (1 to 20)"),
        ));
    }
    let codes = raw
        .retry_on_status
        .unwrap_or_else(|| DEFAULT_RETRY_ON_STATUS.to_vec());
    let mut retry_on_status = Vec::with_capacity(codes.len());
    for (i, code) in codes.into_iter().enumerate() {
        match StatusCode::from_u16(code) {
            Ok(s) if (400..=599).contains(&code) => retry_on_status.push(s),
            _ => {
                return Err(ConfigError::field(
                    format!("routing.retry_on_status[{i}]"),
                    format!("{code} is not an HTTP error status (400 to 599)"),
                ));
            }
        }
    }
    Ok(RoutingConfig {
        strategy: raw.strategy.unwrap_or(Strategy::RoundRobin),
        max_attempts,
        retry_on_status,
        connect_timeout: opt_duration(raw.connect_timeout, "routing.connect_timeout", 5_000)?,
        first_byte_timeout: opt_duration(
            raw.first_byte_timeout,
            "routing.first_byte_timeout",
            120_000,
        )?,
    })
}

fn opt_duration(raw: Option<String>, path: &str, default_ms: u64) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(Duration::from_millis(default_ms)),
        Some(s) => match parse_duration(&s) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(ConfigError::field(path, "must be greater than zero")),
            Err(m) => Err(ConfigError::field(path, m)),
        },
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")"))
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. \"500ms\", \"30s\", \"2m\")"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?} needs a unit: ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

fn parse_backend_url(s: &str) -> Result<BackendUrl, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a valid URL ({e})"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{s:?} has no scheme; write https://<resource>.openai.azure.com"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!("{s:?}: scheme must be http or https"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{s:?} has no host"))?;
    if authority.host().is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "{s:?}: credentials in the URL are not allowed; use auth"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{s:?}: a backend URL takes no query string"));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(BackendUrl {
        scheme,
        authority,
        base_path,
    })
}

#[cfg(test)]
mod tests;
