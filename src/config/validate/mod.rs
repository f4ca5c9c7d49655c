//! Raw config → validated types. Every check names the field it concerns.

mod consumers;
mod server;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use http::uri::Scheme;

use super::*;
use consumers::{validate_consumers, validate_limits};
pub use server::parse_duration;
use server::{opt_duration, parse_backend_url, validate_routing, validate_server};

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
    let metrics = raw.metrics.map(validate_metrics).transpose()?;
    let usage = validate_usage(raw.usage)?;
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
        metrics,
        usage,
    })
}

/// The usage report's hourly figures are kept this long unless `usage.retention` says.
const DEFAULT_RETENTION: Duration = Duration::from_secs(35 * 86_400);
/// Two years and a bit: a year-over-year comparison, not a data warehouse.
const MAX_RETENTION: Duration = Duration::from_secs(800 * 86_400);

fn validate_usage(raw: raw::RawUsage) -> Result<UsageConfig, ConfigError> {
    let currency = raw.currency.unwrap_or_else(|| "USD".to_string());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ConfigError::field(
            "usage.currency",
            format!("{currency:?} is not an ISO 4217 code such as \"USD\" or \"EUR\""),
        ));
    }
    let retention = match raw.retention {
        None => DEFAULT_RETENTION,
        Some(r) => {
            let d =
                server::parse_duration(&r).map_err(|e| ConfigError::field("usage.retention", e))?;
            if !(Duration::from_secs(3600)..=MAX_RETENTION).contains(&d) {
                return Err(ConfigError::field(
                    "usage.retention",
                    format!("{r:?} is out of range: at least \"1h\", at most \"800d\""),
                ));
            }
            d
        }
    };
    Ok(UsageConfig {
        currency,
        retention,
    })
}

/// A deployment's `price`, each figure per million tokens, finite and not negative.
fn price(raw: raw::RawPrice, path: &str) -> Result<Price, ConfigError> {
    let check = |v: f64, key: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(ConfigError::field(
                format!("{path}.{key}"),
                format!("{v} is not a price (per million tokens, 0 or more)"),
            ))
        }
    };
    let input = check(raw.input, "input")?;
    Ok(Price {
        input,
        cached_input: check(raw.cached_input.unwrap_or(input), "cached_input")?,
        output: check(raw.output, "output")?,
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

/// An OTLP/HTTP collector's URL for one signal (`v1/traces`, `v1/metrics`): a collector's base
/// address gets the signal's path, a full URL is taken as it is; and the headers sent with
/// every export.
fn otlp_target(
    section: &str,
    endpoint: &str,
    signal: &str,
    raw_headers: std::collections::BTreeMap<String, String>,
) -> Result<(http::Uri, Vec<(http::HeaderName, Secret)>), ConfigError> {
    let base = endpoint.trim().trim_end_matches('/');
    let url = if base.ends_with(signal) {
        base.to_string()
    } else {
        format!("{base}{signal}")
    };
    let uri = url
        .parse::<http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        .ok_or_else(|| {
            ConfigError::field(
                format!("{section}.otlp_endpoint"),
                format!("{endpoint:?} is not an http(s) URL (e.g. \"http://localhost:4318\")"),
            )
        })?;
    let mut headers = Vec::with_capacity(raw_headers.len());
    for (name, value) in raw_headers {
        let path = format!("{section}.headers.{name}");
        let n = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::field(&path, "is not a valid header name"))?;
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(ConfigError::field(&path, "is not a valid header value"));
        }
        headers.push((n, Secret::new(value)));
    }
    Ok((uri, headers))
}

fn service_name(raw: Option<String>) -> String {
    raw.filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "switchyard".to_string())
}

fn validate_tracing(raw: raw::RawTracing) -> Result<TracingConfig, ConfigError> {
    let (endpoint, headers) =
        otlp_target("tracing", &raw.otlp_endpoint, "/v1/traces", raw.headers)?;
    let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(ConfigError::field(
            "tracing.sample_ratio",
            format!("{sample_ratio} is not between 0 and 1"),
        ));
    }
    Ok(TracingConfig {
        endpoint,
        service_name: service_name(raw.service_name),
        sample_ratio,
        export_interval: opt_duration(raw.export_interval, "tracing.export_interval", 2000)?,
        headers,
    })
}

fn validate_metrics(raw: raw::RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let (endpoint, headers) =
        otlp_target("metrics", &raw.otlp_endpoint, "/v1/metrics", raw.headers)?;
    let export_interval = opt_duration(raw.export_interval, "metrics.export_interval", 60_000)?;
    if export_interval < Duration::from_millis(100) {
        return Err(ConfigError::field(
            "metrics.export_interval",
            "must be at least 100ms",
        ));
    }
    Ok(MetricsConfig {
        endpoint,
        service_name: service_name(raw.service_name),
        export_interval,
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
    let mut chains = Vec::with_capacity(raw.len());
    for (i, d) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("deployments[{i}].{field}");
        chains.push((d.fallbacks, d.fallback_on));
        let price = d.price.map(|p| price(p, &at("price"))).transpose()?;
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
        let mut ranks = Vec::new();
        for (backend, entry) in d.backends {
            let (upstream, priority, weight) = match entry {
                raw::RawDeploymentBackend::Name(n) => (n, None, None),
                raw::RawDeploymentBackend::Table(t) => (t.deployment, t.priority, t.weight),
            };
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
            if let Some(p) = priority
                && !(1..=MAX_PRIORITY).contains(&p)
            {
                return Err(ConfigError::field(
                    at(&format!("backends.{backend}.priority")),
                    format!("{p} is out of range (1 = served first, up to {MAX_PRIORITY})"),
                ));
            }
            if let Some(w) = weight
                && !(1..=1000).contains(&w)
            {
                return Err(ConfigError::field(
                    at(&format!("backends.{backend}.weight")),
                    format!("{w} is out of range (1 to 1000)"),
                ));
            }
            if priority.is_some() || weight.is_some() {
                let own = &backends[idx];
                ranks.push((
                    idx,
                    priority.unwrap_or(own.priority),
                    weight.unwrap_or(own.weight),
                ));
            }
            mapped.push((idx, upstream));
        }
        // Config order of backends, not the map's alphabetical order.
        mapped.sort_by_key(|(idx, _)| *idx);
        out.push(DeploymentConfig {
            name: d.name,
            backends: mapped,
            ranks,
            fallbacks: Vec::new(),
            fallback_on: FallbackOn::default(),
            price,
        });
    }
    // Fallbacks name deployments, later ones too: checked once every name is known.
    for (i, (fallbacks, on)) in chains.into_iter().enumerate() {
        let at = |field: &str| format!("deployments[{i}].{field}");
        let fallbacks = fallbacks.unwrap_or_default();
        for (j, f) in fallbacks.iter().enumerate() {
            let path = at(&format!("fallbacks[{j}]"));
            if *f == out[i].name {
                return Err(ConfigError::field(
                    path,
                    format!("{f:?} is the deployment itself"),
                ));
            }
            if !out.iter().any(|d| d.name == *f) {
                return Err(ConfigError::field(
                    path,
                    format!("no [[deployments]] entry is named {f:?}: a fallback must be one"),
                ));
            }
            if fallbacks[..j].contains(f) {
                return Err(ConfigError::field(path, format!("{f:?} is listed twice")));
            }
        }
        if let Some(on) = on {
            if fallbacks.is_empty() {
                return Err(ConfigError::field(
                    at("fallback_on"),
                    "has no effect without fallbacks",
                ));
            }
            out[i].fallback_on = fallback_on(&on, &at("fallback_on"))?;
        }
        out[i].fallbacks = fallbacks;
    }
    Ok(out)
}

/// `fallback_on = ["throttled", ...]`: each value once, from [`FallbackOn::NAMES`].
fn fallback_on(values: &[String], path: &str) -> Result<FallbackOn, ConfigError> {
    let mut on = FallbackOn {
        throttled: false,
        unavailable: false,
        context_length_exceeded: false,
        content_filter: false,
    };
    for (j, v) in values.iter().enumerate() {
        let flag = match v.as_str() {
            "throttled" => &mut on.throttled,
            "unavailable" => &mut on.unavailable,
            "context_length_exceeded" => &mut on.context_length_exceeded,
            "content_filter" => &mut on.content_filter,
            _ => {
                return Err(ConfigError::field(
                    format!("{path}[{j}]"),
                    format!("{v:?} is not one of {}", FallbackOn::NAMES.join(", ")),
                ));
            }
        };
        if std::mem::replace(flag, true) {
            return Err(ConfigError::field(
                format!("{path}[{j}]"),
                format!("{v:?} is listed twice"),
            ));
        }
    }
    Ok(on)
}
