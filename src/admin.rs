//! The admin listener: liveness, readiness and Prometheus metrics, away from client traffic.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::auth::outbound::{CredentialState, TokenProvider};
use crate::body::{BoxBody, full};
use crate::error::{ErrorKind, GatewayError};
use crate::telemetry::Metrics;

/// What the admin listener reads.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub stopping: CancellationToken,
    /// Every backend's Entra credential, for readiness and status.
    pub credentials: Vec<Arc<TokenProvider>>,
    /// The shared limits store, if limits live in Redis.
    pub shared: Option<Arc<crate::limits::Shared>>,
}

pub async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let resp = match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => readiness(&state),
        "/metrics" => text(
            StatusCode::OK,
            render_metrics(&state),
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

/// Ready when not stopping and every backend's credential holds a valid token. The body says
/// what is missing, with the identity platform's own error text (never a token).
fn readiness(state: &AdminState) -> Response<BoxBody> {
    if state.stopping.is_cancelled() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
            "text/plain",
        );
    }
    let mut problems = String::new();
    for p in &state.credentials {
        let st = p.status();
        if !matches!(st.state, CredentialState::Ready | CredentialState::Stale) {
            problems.push_str(&format!(
                "backend {}: {} credential {}{}\n",
                p.label(),
                p.kind(),
                st.state.as_str(),
                st.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
    }
    let mut notes = String::new();
    if let Some(shared) = &state.shared
        && !shared.is_up()
    {
        if shared.fail_closed() {
            problems.push_str("limits store (Redis) unreachable: limited requests are refused (limits.fail_closed)\n");
        } else {
            notes.push_str("limits store (Redis) unreachable: serving without shared limits until it is back\n");
        }
    }
    if problems.is_empty() {
        text(StatusCode::OK, format!("ready\n{notes}"), "text/plain")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{problems}{notes}"),
            "text/plain",
        )
    }
}

/// The registry's metrics plus each credential's state and token lifetime, read at scrape time.
fn render_metrics(state: &AdminState) -> String {
    let mut out = state.metrics.render();
    if state.credentials.is_empty() {
        return out;
    }
    // OpenMetrics ends with `# EOF`; credential families go before it.
    let eof = out.ends_with("# EOF\n");
    if eof {
        out.truncate(out.len() - "# EOF\n".len());
    }
    out.push_str("# HELP switchyard_credential_state Entra credential state per backend (1 for the current state).\n");
    out.push_str("# TYPE switchyard_credential_state gauge\n");
    let mut expiry = String::new();
    for p in &state.credentials {
        let st = p.status();
        for backend in &p.backends {
            for s in ["starting", "ready", "stale", "failing", "rejected"] {
                out.push_str(&format!(
                    "switchyard_credential_state{{backend=\"{backend}\",kind=\"{}\",state=\"{s}\"}} {}\n",
                    p.kind(),
                    u8::from(st.state.as_str() == s)
                ));
            }
            if let Some(left) = st.expires_in {
                expiry.push_str(&format!(
                    "switchyard_credential_expiry_seconds{{backend=\"{backend}\"}} {}\n",
                    left.as_secs()
                ));
            }
        }
    }
    out.push_str("# HELP switchyard_credential_expiry_seconds Seconds left on each backend's current token.\n");
    out.push_str("# TYPE switchyard_credential_expiry_seconds gauge\n");
    out.push_str(&expiry);
    if eof {
        out.push_str("# EOF\n");
    }
    out
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
