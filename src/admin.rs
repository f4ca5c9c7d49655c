//! The admin listener: liveness, readiness and Prometheus metrics, away from client traffic.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::body::{BoxBody, full};
use crate::error::{ErrorKind, GatewayError};
use crate::telemetry::Metrics;

pub async fn handle(
    metrics: Arc<Metrics>,
    stopping: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let resp = match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" if stopping.is_cancelled() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
            "text/plain",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n", "text/plain"),
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
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
