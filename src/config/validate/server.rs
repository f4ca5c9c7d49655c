//! The listeners, routing, and the values they are written in: durations, addresses, URLs.

use super::*;

pub(super) fn validate_server(raw: raw::RawServer) -> Result<ServerConfig, ConfigError> {
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

pub(super) fn affinity_keys(raw: Vec<String>) -> Result<Vec<AffinityKey>, ConfigError> {
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

pub(super) fn validate_routing(raw: raw::RawRouting) -> Result<RoutingConfig, ConfigError> {
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

pub(super) fn opt_duration(
    raw: Option<String>,
    path: &str,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(Duration::from_millis(default_ms)),
        Some(s) => match parse_duration(&s) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(ConfigError::field(path, "must be greater than zero")),
            Err(m) => Err(ConfigError::field(path, m)),
        },
    }
}

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
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

pub(super) fn parse_backend_url(s: &str) -> Result<BackendUrl, String> {
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
