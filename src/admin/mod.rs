//! The admin listener: liveness, readiness and Prometheus metrics, away from client traffic.

mod metrics;
pub mod status;
mod usage;

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use tokio_util::sync::CancellationToken;

use crate::auth::outbound::CredentialState;
use crate::body::{BoxBody, RequestBody, full};
use crate::error::{ErrorKind, GatewayError};
use crate::live::{ReloadError, Snapshot, Trigger};
use crate::telemetry::Metrics;

/// What the admin listener reads.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub stopping: CancellationToken,
    /// The shared limits store, if limits live in Redis.
    pub shared: Option<Arc<crate::limits::Shared>>,
    /// The client-facing side, whose backends the admin API reports on, drains and reloads.
    pub gateway: Arc<crate::live::GatewayState>,
    /// The backends' recent history, for the status page.
    pub history: Arc<status::History>,
    pub started: std::time::SystemTime,
    /// The admin listener's own address: a `Host` naming it is this listener's.
    pub addr: std::net::SocketAddr,
}

pub async fn handle(
    state: Arc<AdminState>,
    req: Request<RequestBody>,
) -> Result<Response<BoxBody>, Infallible> {
    if let Err(e) = same_origin(&state, &req) {
        return Ok(e.into_response());
    }
    let path = req.uri().path().to_string();
    if path.starts_with("/admin/") {
        return Ok(admin_api(&state, &req, &path).await);
    }
    let resp = match path.as_str() {
        // The page holds no data: it reads `/admin/status`, behind the admin key.
        "/" => {
            let mut r = text(StatusCode::OK, status::PAGE, "text/html; charset=utf-8");
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
                ),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => readiness(&state),
        "/metrics" => text(
            StatusCode::OK,
            metrics::render_metrics(&state),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        other => GatewayError::new(
            ErrorKind::NotFound,
            format!(
                "no admin route {}; try /healthz, /readyz or /metrics",
                other.chars().take(100).collect::<String>()
            ),
        )
        .into_response(),
    };
    Ok(resp)
}

/// What a browser may not make of the admin listener, key or no key: a page on another site
/// must not drain a backend with a form (cross-site request forgery), nor read the config
/// through a name of its own that resolves to the listener (DNS rebinding). So every request
/// names this listener in `Host` (its address, `localhost`, or one of `server.admin_hosts`),
/// and one that changes state comes from no browser page or from the listener's own.
fn same_origin(state: &AdminState, req: &Request<RequestBody>) -> Result<(), GatewayError> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()));
    let Some(host) = host else {
        // Browsers always send one; only an HTTP/1.0 client may not.
        if req.version() == http::Version::HTTP_10 {
            return Ok(());
        }
        return Err(GatewayError::new(
            ErrorKind::BadRequest,
            "an HTTP/1.1 request needs exactly one valid Host header",
        ));
    };
    if !is_own_host(
        host,
        state.addr,
        &state.gateway.snapshot().config.server.admin_hosts,
    ) {
        let shown: String = String::from_utf8_lossy(host).chars().take(100).collect();
        return Err(GatewayError::new(
            ErrorKind::MisdirectedRequest,
            format!(
                "the admin listener does not answer for the host {shown:?}: use its address, localhost, or a name listed in server.admin_hosts"
            ),
        ));
    }
    if matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        return Ok(());
    }
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| !matches!(v.as_bytes(), b"same-origin" | b"none"));
    let foreign_origin = headers.get(header::ORIGIN).is_some_and(|origin| {
        let own = origin
            .as_bytes()
            .strip_prefix(b"http://")
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        !own
    });
    if cross_site || foreign_origin {
        return Err(GatewayError::new(
            ErrorKind::CrossOrigin,
            "the admin API takes no state-changing request from another site's page",
        ));
    }
    Ok(())
}

/// Whether `host` (`name[:port]`) names the listener at `addr`: an IP address it listens on
/// (any, when it listens on all of them), `localhost`, or one of `names`. The port is not
/// compared: a port forward may put the listener behind another.
fn is_own_host(host: &[u8], addr: std::net::SocketAddr, names: &[String]) -> bool {
    let Ok(authority) = http::uri::Authority::try_from(host) else {
        return false;
    };
    if host.contains(&b'@') {
        return false;
    }
    let name = authority.host();
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        let listens = addr.ip();
        return ip == listens
            || listens.is_unspecified()
            || (ip.is_loopback() && listens.is_loopback());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// `/admin/*`: backend states, drain and enable, the running config. Behind the admin key when
/// one is configured.
async fn admin_api(
    state: &AdminState,
    req: &Request<RequestBody>,
    path: &str,
) -> Response<BoxBody> {
    // The running config's key: a reload can change it.
    let rt = state.gateway.snapshot();
    if let Some(key) = &rt.config.server.admin_key {
        let h = req.headers();
        let given = h
            .get("x-admin-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                h.get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .unwrap_or("");
        let ok: bool = subtle::ConstantTimeEq::ct_eq(
            &crate::config::sha256(given.as_bytes())[..],
            &crate::config::sha256(key.expose().as_bytes())[..],
        )
        .into();
        if !ok {
            return GatewayError::new(
                ErrorKind::Unauthorized,
                "The admin API needs the admin key (Authorization: Bearer or x-admin-key).",
            )
            .into_response();
        }
    }
    let proxy = &rt.proxy;
    let json = |v: serde_json::Value| text(StatusCode::OK, v.to_string(), "application/json");
    match (req.method().as_str(), path) {
        ("GET", "/admin/backends") => json(backends_json(&rt)),
        ("GET", "/admin/status") => {
            let mut v = status_json(state, &rt);
            v["consumers"] = usage::consumers(state, &rt).await;
            json(v)
        }
        ("GET", "/admin/usage") => match usage::report(state, &rt, req.uri().query()).await {
            Ok((body, content_type)) => text(StatusCode::OK, body, content_type),
            Err(e) => e.into_response(),
        },
        ("GET", "/admin/consumers") => json(consumers_json(&rt)),
        ("GET", "/admin/config") => {
            let mut v = rt.config.redacted_json();
            v["generation"] = rt.generation.into();
            json(v)
        }
        ("POST", "/admin/reload") => match state.gateway.reload(Trigger::Admin).await {
            Ok(r) => json(r.to_json()),
            Err(e) => {
                let status = match e {
                    ReloadError::NoSource => StatusCode::CONFLICT,
                    ReloadError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                };
                let body = crate::error::openai_error_body(
                    "config_invalid",
                    &format!("Reload refused; the running config (generation {}) keeps serving: {e}", rt.generation),
                    "invalid_request_error",
                );
                let mut r = text(status, body, "application/json");
                *r.status_mut() = status;
                r
            }
        },
        ("POST", p) if p.starts_with("/admin/backends/") => {
            let rest = &p["/admin/backends/".len()..];
            let (name, action) = rest.rsplit_once('/').unwrap_or((rest, ""));
            let Some(idx) = proxy.backends.iter().position(|b| &*b.name == name) else {
                return GatewayError::new(ErrorKind::NotFound, format!("no backend named {:?}", name.chars().take(64).collect::<String>()))
                    .into_response();
            };
            let drained = match action {
                "drain" => true,
                "enable" => false,
                _ => {
                    return GatewayError::new(ErrorKind::NotFound, "use POST /admin/backends/{name}/drain or /enable")
                        .into_response();
                }
            };
            proxy.balancer().set_drained(idx, drained);
            tracing::info!(backend = name, drained, "backend {}", if drained { "drained" } else { "enabled" });
            json(serde_json::json!({"name": name, "drained": drained}))
        }
        _ => GatewayError::new(
            ErrorKind::NotFound,
            "admin routes: GET /admin/backends, GET /admin/status, GET /admin/consumers, GET /admin/usage, GET /admin/config, POST /admin/reload, POST /admin/backends/{name}/drain|enable",
        )
        .into_response(),
    }
}

/// Each backend's state: drained or not, credential, latest failure, and per deployment its
/// availability (cooling down until when, circuit), in flight, latency and headroom.
/// Each consumer's keys by the first digits of their hash, with their expiry: enough to see
/// which keys a rotation left, nothing to sign in with.
fn consumers_json(rt: &Snapshot) -> serde_json::Value {
    let now = std::time::SystemTime::now();
    let consumers: Vec<_> = rt
        .config
        .consumers
        .iter()
        .map(|c| {
            let keys: Vec<_> = c
                .keys
                .iter()
                .map(|k| {
                    serde_json::json!({
                        "sha256_prefix": k.prefix(),
                        "expires": k.expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        "expired": k.expires.is_some_and(|t| now >= t),
                    })
                })
                .collect();
            serde_json::json!({"name": c.name, "keys": keys, "jwt": c.jwt.is_some(), "models": c.models})
        })
        .collect();
    serde_json::json!({ "consumers": consumers })
}

fn backends_json(rt: &Snapshot) -> serde_json::Value {
    use serde_json::json;
    let proxy = &rt.proxy;
    let balancer = proxy.balancer();
    let now = tokio::time::Instant::now();
    let tables = balancer.tables();
    let out: Vec<_> = proxy
        .backends
        .iter()
        .enumerate()
        .map(|(idx, b)| {
            let deployments: Vec<_> = tables
                .iter()
                .filter_map(|t| {
                    let st = t.status(idx, now)?;
                    let (state_name, left) = match st.availability {
                        // Up, but unable to serve this deployment: passed over for it.
                        crate::balancer::Availability::Ready if st.misfit.is_some() => {
                            (st.misfit.as_ref().map_or("healthy", |m| m.reason.label()), None)
                        }
                        crate::balancer::Availability::Ready => ("healthy", None),
                        crate::balancer::Availability::Cooling(d) => ("cooling_down", Some(d)),
                        crate::balancer::Availability::Open(d) => ("circuit_open", Some(d)),
                        crate::balancer::Availability::Probing => ("probing", None),
                    };
                    Some(json!({
                        "deployment": t.name(),
                        "state": state_name,
                        "available_in_ms": left.map(|d| d.as_millis() as u64),
                        "circuit": match st.circuit {
                            crate::balancer::CircuitState::Closed => "closed",
                            crate::balancer::CircuitState::Open { .. } => "open",
                            crate::balancer::CircuitState::HalfOpen { .. } => "half_open",
                        },
                        "error": st.misfit.as_ref().map(|m| m.message.clone()),
                        "in_flight": st.in_flight,
                        "ttfb_ewma_ms": st.ttfb_ewma.map(|d| d.as_secs_f64() * 1000.0),
                        "headroom": st.room,
                    }))
                })
                .collect();
            let credential = rt
                .credentials
                .iter()
                .find(|p| p.serves(&b.name))
                .map(|p| {
                    let s = p.status();
                    json!({"kind": p.kind(), "state": s.state.as_str(), "expires_in_s": s.expires_in.map(|d| d.as_secs())})
                });
            let last_error = proxy.last_error(idx).map(|(what, at)| {
                json!({"error": what, "at": httpdate::fmt_http_date(at)})
            });
            json!({
                "name": &*b.name,
                "url": b.url.to_string(),
                "drained": balancer.policy().is_drained(idx),
                "credential": credential,
                "last_error": last_error,
                "deployments": deployments,
            })
        })
        .collect();
    json!({ "backends": out })
}

/// `/admin/backends` plus each backend's last minute (share of traffic, 429s, tokens, latency)
/// and recent series: what the status page draws.
fn status_json(state: &AdminState, rt: &Snapshot) -> serde_json::Value {
    let mut v = backends_json(rt);
    let empty = Vec::new();
    let list = v["backends"].as_array().unwrap_or(&empty).clone();
    let mut out = Vec::with_capacity(list.len());
    for (idx, mut b) in list.into_iter().enumerate() {
        let name = b["name"].as_str().unwrap_or_default().to_string();
        let h = state.history.backend_json(&name);
        b["minute"] = h["minute"].clone();
        b["series"] = h["series"].clone();
        b["priority"] = rt.config.backends.get(idx).map(|c| c.priority).into();
        b["weight"] = rt.config.backends.get(idx).map(|c| c.weight).into();
        let deployments = b["deployments"].as_array().unwrap_or(&empty).clone();
        b["in_flight"] = deployments
            .iter()
            .map(|d| d["in_flight"].as_u64().unwrap_or(0))
            .sum::<u64>()
            .into();
        // The backend's worst state over its deployments, and how long it lasts.
        let rank = |s: &str| match s {
            "auth_rejected" => 5,
            "not_deployed" => 4,
            "circuit_open" => 3,
            "cooling_down" => 2,
            "probing" => 1,
            _ => 0,
        };
        let worst = deployments
            .iter()
            .max_by_key(|d| rank(d["state"].as_str().unwrap_or("")))
            .cloned();
        b["state"] = if b["drained"] == true {
            "drained".into()
        } else {
            worst
                .as_ref()
                .map_or("healthy".into(), |d| d["state"].clone())
        };
        b["available_in_ms"] = worst
            .as_ref()
            .map_or(serde_json::Value::Null, |d| d["available_in_ms"].clone());
        // What the backend said, when it cannot serve a deployment.
        b["error"] = worst.map_or(serde_json::Value::Null, |d| d["error"].clone());
        out.push(b);
    }
    let total: u64 = out
        .iter()
        .map(|b| b["minute"]["requests"].as_u64().unwrap_or(0))
        .sum();
    for b in &mut out {
        let n = b["minute"]["requests"].as_u64().unwrap_or(0);
        b["share"] = if total > 0 {
            (n as f64 / total as f64).into()
        } else {
            serde_json::Value::Null
        };
    }
    v["backends"] = out.into();
    v["generation"] = rt.generation.into();
    v["sample_every_s"] = status::SAMPLE_EVERY.as_secs().into();
    v["uptime_s"] = state.started.elapsed().map_or(0, |d| d.as_secs()).into();
    v["in_flight"] = state.metrics.in_flight.get().into();
    v["strategy"] = rt.config.routing.strategy.as_str().into();
    v
}

/// Ready while every deployment the gateway serves has a backend that can take it: not drained,
/// and a token in hand when it signs in with Entra ID. What is degraded (a credential with no
/// token, a limits store that is down) is listed in the body, with the identity platform's own
/// error text (never a token), but one bad credential does not take a replica out of service
/// while others serve. Not ready while shutting down, or when some deployment has no backend.
fn readiness(state: &AdminState) -> Response<BoxBody> {
    if state.stopping.is_cancelled() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
            "text/plain",
        );
    }
    let rt = state.gateway.snapshot();
    let backends = &rt.proxy.backends;
    let policy = rt.proxy.balancer().policy();
    let mut degraded = String::new();
    // Whether backend `i` can take requests now, and what is wrong with it if not.
    let mut able = vec![true; backends.len()];
    for (i, b) in backends.iter().enumerate() {
        if policy.is_drained(i) {
            able[i] = false;
            degraded.push_str(&format!("backend {}: drained\n", b.name));
        }
    }
    for p in &rt.credentials {
        let st = p.status();
        if matches!(st.state, CredentialState::Ready | CredentialState::Stale) {
            continue;
        }
        for (i, b) in backends.iter().enumerate() {
            if p.serves(&b.name) {
                able[i] = false;
            }
        }
        degraded.push_str(&format!(
            "backend {}: {} credential {}{}\n",
            p.label(),
            p.kind(),
            st.state.as_str(),
            st.last_error.map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }
    // The deployments the config lists, and any other name when those go everywhere.
    let config = &rt.config;
    let mut unserved = Vec::new();
    for d in &config.deployments {
        if !d
            .backends
            .iter()
            .any(|(i, _)| able.get(*i).copied().unwrap_or(false))
        {
            unserved.push(d.name.as_str());
        }
    }
    let others_go_anywhere = config.deployments.is_empty()
        || config.routing.unknown_deployments == crate::config::UnknownDeployments::Forward;
    if others_go_anywhere && !able.iter().any(|a| *a) {
        unserved.push("(any other deployment)");
    }
    if let Some(p) = state.shared.as_ref().and_then(|s| s.credential()) {
        let st = p.status();
        if !matches!(st.state, CredentialState::Ready | CredentialState::Stale) {
            degraded.push_str(&format!(
                "limits store (Redis): {} credential {}{}\n",
                p.kind(),
                st.state.as_str(),
                st.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
    }
    if let Some(shared) = &state.shared
        && !shared.is_up()
    {
        if shared.fail_closed() {
            degraded.push_str("limits store (Redis) unreachable: limited requests are refused (limits.fail_closed)\n");
        } else {
            degraded.push_str("limits store (Redis) unreachable: serving without shared limits until it is back\n");
        }
    }
    if unserved.is_empty() {
        text(StatusCode::OK, format!("ready\n{degraded}"), "text/plain")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no backend can serve: {}\n{degraded}", unserved.join(", ")),
            "text/plain",
        )
    }
}

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &'static str,
) -> Response<BoxBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
