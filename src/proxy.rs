//! The attempt loop: pick a backend, send, classify, fail over. The only place retries live.
//!
//! Rules: at most `max_attempts` attempts; the next attempt goes to a backend this request has
//! not tried while one remains; no sleeping between attempts (the next backend is another
//! instance, not the same one asked again); a response is only retried before any of it went to
//! the client (the loop returns headers and body together, so that holds by construction).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Limited};

use crate::balancer::RoundRobin;
use crate::body::{BoxBody, full};
use crate::config::RoutingConfig;
use crate::error::GatewayError;
use crate::telemetry::{AttemptLabels, Metrics};
use crate::upstream::{Backend, OutboundRequest, Upstream};

/// A retried response is kept (up to this size) in case every later attempt fails without one:
/// the client then gets the last real backend answer rather than a gateway-made error.
const KEEP_FAILED_BODY_BYTES: usize = 1024 * 1024;
const KEEP_FAILED_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the loop ends with.
pub struct Answer {
    /// The response to send, or the gateway's own error when no backend produced one.
    pub result: Result<Response<BoxBody>, GatewayError>,
    /// Index of the backend whose response this is.
    pub backend: Option<usize>,
    pub attempts: u32,
}

pub struct Proxy {
    pub backends: Vec<Backend>,
    balancer: RoundRobin,
    upstream: Upstream,
    routing: RoutingConfig,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(
        backends: Vec<Backend>,
        upstream: Upstream,
        routing: RoutingConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            balancer: RoundRobin::new(backends.len()),
            backends,
            upstream,
            routing,
            metrics,
        }
    }

    pub async fn forward(&self, req: &OutboundRequest<'_>) -> Answer {
        let mut tried = vec![false; self.backends.len()];
        let mut kept: Option<(usize, Response<Bytes>)> = None;
        let mut last_error: Option<GatewayError> = None;
        let max = self.routing.max_attempts;
        for attempt in 1..=max {
            let idx = self.balancer.pick(&tried);
            tried[idx] = true;
            let backend = &self.backends[idx];
            let is_last = attempt == max;
            match self.upstream.send(backend, req).await {
                Ok(resp) => {
                    let status = resp.status();
                    self.count(&self.metrics.attempts, backend, status.as_str());
                    if is_last || !self.routing.retries_status(status) {
                        return Answer {
                            result: Ok(resp.map(|b| b.map_err(Into::into).boxed())),
                            backend: Some(idx),
                            attempts: attempt,
                        };
                    }
                    self.count(&self.metrics.retries, backend, status.as_str());
                    tracing::debug!(backend = %backend.name, %status, attempt, "retrying on the next backend");
                    let (parts, body) = resp.into_parts();
                    let collected = tokio::time::timeout(
                        KEEP_FAILED_BODY_TIMEOUT,
                        Limited::new(body, KEEP_FAILED_BODY_BYTES).collect(),
                    )
                    .await;
                    if let Ok(Ok(c)) = collected {
                        kept = Some((idx, Response::from_parts(parts, c.to_bytes())));
                    }
                }
                Err(e) => {
                    self.count(&self.metrics.attempts, backend, e.kind.label());
                    if !e.kind.retryable() {
                        return Answer {
                            result: Err(e),
                            backend: Some(idx),
                            attempts: attempt,
                        };
                    }
                    if !is_last {
                        self.count(&self.metrics.retries, backend, e.kind.label());
                    }
                    tracing::debug!(backend = %backend.name, error = %e, attempt, "attempt failed");
                    last_error = Some(e);
                }
            }
        }
        match kept {
            Some((idx, resp)) => Answer {
                result: Ok(resp.map(full)),
                backend: Some(idx),
                attempts: max,
            },
            None => Answer {
                result: Err(last_error.unwrap_or_else(|| {
                    GatewayError::new(
                        crate::error::ErrorKind::UpstreamConnect,
                        "no backend attempt was made",
                    )
                })),
                backend: None,
                attempts: max,
            },
        }
    }

    fn count(
        &self,
        family: &prometheus_client::metrics::family::Family<
            AttemptLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        backend: &Backend,
        outcome: &str,
    ) {
        family
            .get_or_create(&AttemptLabels {
                backend: backend.name.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}
