//! Raw config → validated types. Every check names the field it concerns.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use http::uri::Scheme;

use super::*;

pub(super) fn validate(
    raw: raw::RawConfig,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
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
        let name = checked_name(&b.name, &at("name"))?;
        if let Some(j) = backends.iter().position(|o| o.name == name) {
            return Err(ConfigError::field(
                at("name"),
                format!("duplicate backend name {name:?} (also backends[{j}])"),
            ));
        }
        let url = parse_backend_url(&b.url).map_err(|m| ConfigError::field(at("url"), m))?;
        let priority = b.priority.unwrap_or(1);
        if !(1..=MAX_PRIORITY).contains(&priority) {
            return Err(ConfigError::field(
                at("priority"),
                format!("{priority} is out of range (1 = served first, up to {MAX_PRIORITY})"),
            ));
        }
        let weight = b.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            return Err(ConfigError::field(
                at("weight"),
                format!("{weight} is out of range (1 to 1000)"),
            ));
        }
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
            other => BackendAuth::Entra(super::credential::validate(
                other,
                &at("auth"),
                lookup,
                super::credential::DEFAULT_SCOPE,
            )?),
        };
        backends.push(BackendConfig {
            name,
            url,
            auth,
            priority,
            weight,
        });
    }
    let deployments = validate_deployments(raw.deployments, &backends)?;
    let jwt = raw.jwt.map(validate_jwt).transpose()?;
    let consumers = validate_consumers(raw.consumers, jwt.is_some())?;
    let limits = validate_limits(raw.limits, lookup)?;
    let affinity = validate_affinity(raw.affinity)?;
    let tracing = raw.tracing.map(validate_tracing).transpose()?;
    Ok(Config {
        server,
        routing,
        backends,
        deployments,
        consumers,
        limits,
        affinity,
        jwt,
        tracing,
    })
}

fn validate_affinity(raw: raw::RawAffinity) -> Result<AffinityConfig, ConfigError> {
    let max_entries = raw.max_entries.unwrap_or(200_000);
    if max_entries == 0 || max_entries > 100_000_000 {
        return Err(ConfigError::field(
            "affinity.max_entries",
            format!("{max_entries} is out of range (1 to 100000000)"),
        ));
    }
    Ok(AffinityConfig {
        ttl: opt_duration(raw.ttl, "affinity.ttl", 30 * 24 * 3600 * 1000)?,
        max_entries: max_entries as usize,
    })
}

fn validate_tracing(raw: raw::RawTracing) -> Result<TracingConfig, ConfigError> {
    let base = raw.otlp_endpoint.trim().trim_end_matches('/');
    // A collector's base address gets the traces path; a full traces URL is taken as it is.
    let url = if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    };
    let endpoint = url
        .parse::<http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        .ok_or_else(|| {
            ConfigError::field(
                "tracing.otlp_endpoint",
                format!(
                    "{:?} is not an http(s) URL (e.g. \"http://localhost:4318\")",
                    raw.otlp_endpoint
                ),
            )
        })?;
    let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(ConfigError::field(
            "tracing.sample_ratio",
            format!("{sample_ratio} is not between 0 and 1"),
        ));
    }
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (name, value) in raw.headers {
        let path = format!("tracing.headers.{name}");
        let n = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::field(&path, "is not a valid header name"))?;
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(ConfigError::field(&path, "is not a valid header value"));
        }
        headers.push((n, Secret::new(value)));
    }
    Ok(TracingConfig {
        endpoint,
        service_name: raw
            .service_name
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "switchyard".to_string()),
        sample_ratio,
        export_interval: opt_duration(raw.export_interval, "tracing.export_interval", 2000)?,
        headers,
    })
}

fn validate_jwt(raw: raw::RawJwt) -> Result<JwtConfig, ConfigError> {
    let audiences = match raw.audience {
        raw::OneOrMany::One(a) => vec![a],
        raw::OneOrMany::Many(v) => v,
    };
    if audiences.is_empty() || audiences.iter().any(|a| a.trim().is_empty()) {
        return Err(ConfigError::field(
            "jwt.audience",
            "needs at least one non-empty audience",
        ));
    }
    if raw.issuer.trim().is_empty() {
        return Err(ConfigError::field("jwt.issuer", "must not be empty"));
    }
    let ok_url =
        raw.jwks_url.parse::<http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        });
    if !ok_url {
        return Err(ConfigError::field(
            "jwt.jwks_url",
            format!("{:?} is not an http(s) URL", raw.jwks_url),
        ));
    }
    Ok(JwtConfig {
        issuer: raw.issuer,
        audiences,
        jwks_url: raw.jwks_url,
        claim: raw.claim.unwrap_or_else(|| "azp".to_string()),
    })
}

fn validate_consumers(
    raw: Vec<raw::RawConsumer>,
    jwt_configured: bool,
) -> Result<Vec<ConsumerConfig>, ConfigError> {
    let mut out: Vec<ConsumerConfig> = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("consumers[{i}].{field}");
        let name = checked_name(&c.name, &at("name"))?;
        if let Some(j) = out.iter().position(|o| o.name == name) {
            return Err(ConfigError::field(
                at("name"),
                format!("duplicate consumer {name:?} (also consumers[{j}])"),
            ));
        }
        if c.jwt.is_some() && !jwt_configured {
            return Err(ConfigError::field(
                at("jwt"),
                "needs a [jwt] section saying which tokens to accept",
            ));
        }
        let key_sha256 = match (c.key, c.key_sha256) {
            (None, None) if c.jwt.is_some() => None,
            (Some(key), None) => {
                if key.len() < 16 {
                    return Err(ConfigError::field(
                        at("key"),
                        "too short: use at least 16 characters (32 random bytes, hex or base64, is better)",
                    ));
                }
                Some(crate::config::sha256(key.as_bytes()))
            }
            (None, Some(hex)) => Some(parse_sha256(&hex).ok_or_else(|| {
                ConfigError::field(
                    at("key_sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)",
                )
            })?),
            (Some(_), Some(_)) => {
                return Err(ConfigError::field(
                    at("key"),
                    "give key or key_sha256, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::field(
                    at("key"),
                    "a consumer needs key, key_sha256 or jwt",
                ));
            }
        };
        if let Some(j) = out
            .iter()
            .position(|o| key_sha256.is_some() && o.key_sha256 == key_sha256)
        {
            return Err(ConfigError::field(
                at("key"),
                format!("the same key as consumers[{j}]: each consumer needs its own"),
            ));
        }
        let limits = limit_set(
            c.requests_per_minute,
            c.tokens_per_minute,
            c.token_quota,
            &at(""),
        )?;
        let mut deployment_limits = Vec::with_capacity(c.deployments.len());
        for (deployment, set) in c.deployments {
            let path = at(&format!("deployments.{deployment}."));
            if !valid_deployment_name(&deployment) {
                return Err(ConfigError::field(
                    path.trim_end_matches('.'),
                    format!("{deployment:?} is not a valid deployment name"),
                ));
            }
            let l = limit_set(
                set.requests_per_minute,
                set.tokens_per_minute,
                set.token_quota,
                &path,
            )?;
            deployment_limits.push((deployment, l));
        }
        if let Some(j) = out.iter().position(|o| c.jwt.is_some() && o.jwt == c.jwt) {
            return Err(ConfigError::field(
                at("jwt"),
                format!("the same claim value as consumers[{j}]"),
            ));
        }
        out.push(ConsumerConfig {
            name,
            key_sha256,
            jwt: c.jwt,
            limits,
            deployment_limits,
        });
    }
    Ok(out)
}

/// One set of limits; `at` is the path prefix its keys are reported under (ends with '.').
fn limit_set(
    rpm: Option<u32>,
    tpm: Option<u32>,
    quota: Option<raw::RawQuota>,
    at: &str,
) -> Result<ConsumerLimits, ConfigError> {
    let positive = |v: Option<u32>, key: &str| -> Result<Option<u32>, ConfigError> {
        match v {
            Some(0) => Err(ConfigError::field(
                format!("{at}{key}"),
                "must be at least 1 (leave it out for no limit)",
            )),
            other => Ok(other),
        }
    };
    let token_quota = match quota {
        None => None,
        Some(q) if q.tokens == 0 => {
            return Err(ConfigError::field(
                format!("{at}token_quota.tokens"),
                "must be at least 1",
            ));
        }
        Some(q) => Some(Quota {
            period: q.period,
            tokens: q.tokens,
        }),
    };
    Ok(ConsumerLimits {
        requests_per_minute: positive(rpm, "requests_per_minute")?,
        tokens_per_minute: positive(tpm, "tokens_per_minute")?,
        token_quota,
    })
}

fn validate_limits(
    raw: raw::RawLimits,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<LimitsConfig, ConfigError> {
    let store = match raw.store.as_deref() {
        None | Some("memory") => {
            let redis_keys = [
                ("redis_url", raw.redis_url.is_some()),
                ("fail_closed", raw.fail_closed.is_some()),
                ("redis_timeout", raw.redis_timeout.is_some()),
                ("redis_cluster", raw.redis_cluster.is_some()),
                ("redis_auth", raw.redis_auth.is_some()),
                ("redis_user", raw.redis_user.is_some()),
            ];
            if let Some((key, _)) = redis_keys.iter().find(|(_, set)| *set) {
                return Err(ConfigError::field(
                    format!("limits.{key}"),
                    "goes with store = \"redis\"",
                ));
            }
            LimitStore::Memory
        }
        Some("redis") => {
            let Some(url) = raw.redis_url else {
                return Err(ConfigError::field(
                    "limits.redis_url",
                    "required with store = \"redis\"",
                ));
            };
            let timeout = opt_duration(raw.redis_timeout, "limits.redis_timeout", 100)?;
            let cluster = raw.redis_cluster.unwrap_or(false);
            let target = RedisTarget::parse(&url, cluster)
                .map_err(|e| ConfigError::field("limits.redis_url", e))?;
            let auth = match raw.redis_auth {
                None => None,
                Some(a) => {
                    if target.has_password {
                        return Err(ConfigError::field(
                            "limits.redis_url",
                            "has a password, and limits.redis_auth signs in with Entra ID: keep one",
                        ));
                    }
                    if target.has_user {
                        return Err(ConfigError::field(
                            "limits.redis_url",
                            "names a user: with limits.redis_auth, set limits.redis_user instead",
                        ));
                    }
                    Some(super::credential::validate(
                        a,
                        "limits.redis_auth",
                        lookup,
                        super::credential::REDIS_SCOPE,
                    )?)
                }
            };
            let user = match raw.redis_user {
                None => None,
                Some(_) if auth.is_none() => {
                    return Err(ConfigError::field(
                        "limits.redis_user",
                        "goes with limits.redis_auth (a password sign-in names its user in redis_url)",
                    ));
                }
                Some(u)
                    if u.trim().is_empty()
                        || u.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                {
                    return Err(ConfigError::field(
                        "limits.redis_user",
                        "must be a user name (the identity's object id), without spaces",
                    ));
                }
                Some(u) => Some(u),
            };
            LimitStore::Redis(RedisStore {
                url: Secret::new(url),
                fail_closed: raw.fail_closed.unwrap_or(false),
                timeout,
                cluster,
                auth,
                user,
            })
        }
        Some(other) => {
            return Err(ConfigError::field(
                "limits.store",
                format!("unknown store {other:?}: use \"memory\" or \"redis\""),
            ));
        }
    };
    Ok(LimitsConfig {
        completion_estimate: raw
            .completion_estimate
            .unwrap_or(DEFAULT_COMPLETION_ESTIMATE),
        store,
    })
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Names of backends and consumers: they appear in headers, logs and metric labels.
fn name_chars_ok(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn checked_name(raw: &str, path: &str) -> Result<String, ConfigError> {
    let name = raw.trim();
    if name.is_empty() || !name_chars_ok(name) {
        return Err(ConfigError::field(
            path,
            format!("{raw:?} is not a valid name (use letters, digits, '-', '_', '.')"),
        ));
    }
    Ok(name.to_string())
}

fn validate_deployments(
    raw: Vec<raw::RawDeployment>,
    backends: &[BackendConfig],
) -> Result<Vec<DeploymentConfig>, ConfigError> {
    let mut out: Vec<DeploymentConfig> = Vec::with_capacity(raw.len());
    for (i, d) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("deployments[{i}].{field}");
        if !valid_deployment_name(&d.name) {
            return Err(ConfigError::field(
                at("name"),
                format!(
                    "{:?} is not a valid deployment name (1 to 64 letters, digits, '-', '_', '.')",
                    d.name
                ),
            ));
        }
        if let Some(j) = out.iter().position(|o| o.name == d.name) {
            return Err(ConfigError::field(
                at("name"),
                format!("duplicate deployment {:?} (also deployments[{j}])", d.name),
            ));
        }
        if d.backends.is_empty() {
            return Err(ConfigError::field(at("backends"), "names no backend"));
        }
        let mut mapped = Vec::with_capacity(d.backends.len());
        for (backend, upstream) in d.backends {
            let Some(idx) = backends.iter().position(|b| b.name == backend) else {
                return Err(ConfigError::field(
                    at(&format!("backends.{backend}")),
                    format!("no backend is named {backend:?}"),
                ));
            };
            if !valid_deployment_name(&upstream) {
                return Err(ConfigError::field(
                    at(&format!("backends.{backend}")),
                    format!("{upstream:?} is not a valid deployment name"),
                ));
            }
            mapped.push((idx, upstream));
        }
        // Config order of backends, not the map's alphabetical order.
        mapped.sort_by_key(|(idx, _)| *idx);
        out.push(DeploymentConfig {
            name: d.name,
            backends: mapped,
        });
    }
    Ok(out)
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
    if let Some(admin) = admin_listen
        && admin.port() != 0
        && admin.port() == listen.port()
        && (admin.ip() == listen.ip()
            || admin.ip().is_unspecified()
            || listen.ip().is_unspecified())
    {
        return Err(ConfigError::field(
            "server.admin_listen",
            format!(
                "{admin} is where server.listen ({listen}) is: give the admin listener a port of its own"
            ),
        ));
    }
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
    // Zero is allowed: stop accepting at once, as outside an orchestrator.
    let shutdown_delay = match raw.shutdown_delay {
        None => Duration::from_secs(5),
        Some(s) => {
            parse_duration(&s).map_err(|m| ConfigError::field("server.shutdown_delay", m))?
        }
    };
    let admin_key = match raw.admin_key {
        Some(k) if k.len() < 16 => {
            return Err(ConfigError::field(
                "server.admin_key",
                "too short: use at least 16 characters",
            ));
        }
        Some(k) => Some(Secret::new(k)),
        None => None,
    };
    if admin_listen.is_some_and(|a| !a.ip().is_loopback()) && admin_key.is_none() {
        return Err(ConfigError::field(
            "server.admin_key",
            "required when admin_listen is not on loopback (the admin API can drain backends)",
        ));
    }
    let mut admin_hosts = Vec::new();
    for (i, name) in raw.admin_hosts.unwrap_or_default().into_iter().enumerate() {
        let plain = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !plain {
            return Err(ConfigError::field(
                format!("server.admin_hosts[{i}]"),
                format!("{name:?} is not a host name (letters, digits, '-', '.', '_'; no port)"),
            ));
        }
        admin_hosts.push(name.trim_end_matches('.').to_string());
    }
    let header_read_timeout = opt_duration(
        raw.header_read_timeout,
        "server.header_read_timeout",
        30_000,
    )?;
    // Room for a 32 MiB upload at about 1 Mbit/s.
    let body_read_timeout =
        opt_duration(raw.body_read_timeout, "server.body_read_timeout", 300_000)?;
    let max_connections = match raw.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(0) => {
            return Err(ConfigError::field(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        Some(n) => n as usize,
    };
    let tls = match (raw.tls_cert.as_deref(), raw.tls_key.as_deref()) {
        (Some(cert), Some(key)) => Some(ListenerTls::load(cert, key)?),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::field(
                "server.tls_key",
                "required with server.tls_cert",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::field(
                "server.tls_cert",
                "required with server.tls_key",
            ));
        }
    };
    let ca = match raw.ca_file.as_deref() {
        Some(path) => ExtraCa::load(path, "server.ca_file")?,
        None => ExtraCa::default(),
    };
    Ok(ServerConfig {
        listen,
        admin_listen,
        admin_key,
        admin_hosts,
        max_body_bytes,
        shutdown_grace,
        shutdown_delay,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        tls,
        ca,
    })
}

fn affinity_keys(raw: Vec<String>) -> Result<Vec<AffinityKey>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, k)| {
            let at = format!("routing.affinity_key[{i}]");
            match k.split_once(':') {
                Some(("header", name)) => http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(AffinityKey::Header)
                    .map_err(|_| ConfigError::field(at, format!("{name:?} is not a header name"))),
                Some(("body", field)) if !field.trim().is_empty() => {
                    Ok(AffinityKey::Body(field.trim().to_string()))
                }
                _ => Err(ConfigError::field(
                    at,
                    format!(
                        "{k:?}: use \"header:<name>\" or \"body:<field>\" (e.g. \"header:x-session-id\", \"body:prompt_cache_key\")"
                    ),
                )),
            }
        })
        .collect()
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
    let cb = raw.circuit_breaker;
    let failures = cb.failures.unwrap_or(5);
    if !(1..=1000).contains(&failures) {
        return Err(ConfigError::field(
            "routing.circuit_breaker.failures",
            format!("{failures} is out of range (1 to 1000)"),
        ));
    }
    let circuit_breaker = CircuitBreakerConfig {
        failures,
        interval: opt_duration(cb.interval, "routing.circuit_breaker.interval", 10_000)?,
        trip_duration: opt_duration(
            cb.trip_duration,
            "routing.circuit_breaker.trip_duration",
            30_000,
        )?,
    };
    let default_cooldown = opt_duration(raw.default_cooldown, "routing.default_cooldown", 10_000)?;
    let max_cooldown = opt_duration(raw.max_cooldown, "routing.max_cooldown", 60_000)?;
    if default_cooldown > max_cooldown {
        return Err(ConfigError::field(
            "routing.default_cooldown",
            "must not exceed routing.max_cooldown",
        ));
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
        idle_timeout: opt_duration(raw.idle_timeout, "routing.idle_timeout", 60_000)?,
        request_timeout: opt_duration(raw.request_timeout, "routing.request_timeout", 300_000)?,
        default_cooldown,
        max_cooldown,
        unknown_deployments: raw.unknown_deployments.unwrap_or_default(),
        affinity_key: affinity_keys(raw.affinity_key.unwrap_or_default())?,
        circuit_breaker,
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

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"30d"` (one number, one unit).
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
        "d" => value * 86400.0,
        _ => return Err(format!("{s:?} needs a unit: ms, s, m, h or d")),
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
    if base_path.ends_with("/openai") {
        return Err(format!(
            "{s:?} ends in /openai, which the gateway adds itself (requests would go to /openai/openai/...); write the resource's root, e.g. https://<resource>.openai.azure.com"
        ));
    }
    Ok(BackendUrl {
        scheme,
        authority,
        base_path,
    })
}
