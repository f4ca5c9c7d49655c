//! One attempt against one backend, and what its outcome tells the balancer, the metrics and
//! the request's log.

use super::*;

impl Proxy {
    /// Tells the balancer how an attempt went (its health verdict) and counts it: metrics, the
    /// backend's last error, the request's trail. Returns whether the outcome is one to retry
    /// elsewhere.
    #[expect(
        clippy::too_many_arguments,
        reason = "the attempt's facts, each from a different place in the loop"
    )]
    pub(super) fn settle(
        &self,
        lease: &mut Lease,
        idx: usize,
        shown: &str,
        sent: &Result<Response<BoxBody>, GatewayError>,
        (waited, answered): (Duration, Instant),
        is_last: bool,
        creates: bool,
        trail: &mut Trail,
    ) -> bool {
        let backend = &self.backends[idx];
        match sent {
            Ok(resp) => {
                let status = resp.status();
                let retryable = self.routing.retries_status(status);
                let verdict = lease.report(
                    Outcome::Response {
                        status,
                        headers: resp.headers(),
                        retryable,
                        ttfb: waited,
                    },
                    answered,
                );
                let retried = retryable && !is_last;
                self.note(
                    backend,
                    shown,
                    AttemptOutcome::Answered(status),
                    verdict,
                    retried,
                );
                trail
                    .0
                    .push((backend.name.clone(), AttemptOutcome::Answered(status)));
                retryable
            }
            Err(e) => {
                // A missing token says nothing of the backend's health: its circuit is left
                // alone, and it takes traffic again as soon as the credential has a token.
                let verdict = if e.kind == ErrorKind::CredentialUnavailable {
                    Verdict::Healthy
                } else {
                    lease.report(Outcome::Failure { elapsed: waited }, answered)
                };
                // A request that may have made an object where it went is not made again
                // elsewhere: a second batch or file is worse than an error.
                let retryable = e.kind.retryable() && !(e.delivered && creates);
                self.note(
                    backend,
                    shown,
                    AttemptOutcome::Failed(e.kind),
                    verdict,
                    retryable && !is_last,
                );
                trail
                    .0
                    .push((backend.name.clone(), AttemptOutcome::Failed(e.kind)));
                retryable
            }
        }
    }

    /// Sends one attempt to backend `idx` and records it: the time spent waiting, and the
    /// attempt's span when the trace is sampled. Returns the result, the wait and its end.
    #[expect(
        clippy::too_many_arguments,
        reason = "the attempt's facts, each from a different place in the loop"
    )]
    pub(super) async fn send_attempt(
        &self,
        idx: usize,
        rename: Option<&str>,
        req: &OutboundRequest<'_>,
        remaining: Duration,
        attempt: u32,
        sent: Instant,
        log: &mut AttemptLog,
    ) -> (Result<Response<BoxBody>, GatewayError>, Duration, Instant) {
        let backend = &self.backends[idx];
        let span = log
            .trace
            .map(|t| (t, t.attempt_span(attempt), SystemTime::now()));
        let sent_result = self
            .upstream
            .send(
                backend,
                req,
                rename,
                remaining,
                span.map(|(t, id, _)| t.traceparent(id)),
            )
            .await;
        let answered = Instant::now();
        let waited = answered.saturating_duration_since(sent);
        log.upstream += waited;
        if let Some((t, span_id, start)) = span
            && t.sampled
        {
            log.spans.push(AttemptRecord {
                span_id,
                attempt,
                backend: backend.name.clone(),
                host: backend.url.authority.host().to_string(),
                port: backend.url.authority.port_u16().unwrap_or(
                    if backend.url.scheme == http::uri::Scheme::HTTPS {
                        443
                    } else {
                        80
                    },
                ),
                model: rename.map(str::to_string),
                start,
                duration: waited,
                outcome: match &sent_result {
                    Ok(r) => AttemptOutcome::Answered(r.status()),
                    Err(e) => AttemptOutcome::Failed(e.kind),
                },
            });
        }
        (sent_result, waited, answered)
    }

    pub(super) fn note(
        &self,
        backend: &Backend,
        deployment: &str,
        outcome: AttemptOutcome,
        verdict: Verdict,
        retried: bool,
    ) {
        let stats = &backend.stats;
        let labels = || AttemptLabels {
            backend: backend.name.to_string(),
            outcome: outcome.label().to_string(),
        };
        if outcome == AttemptOutcome::Answered(http::StatusCode::OK) {
            stats.attempts_ok.inc();
        } else {
            count(&self.metrics.attempts, &labels());
        }
        if outcome == AttemptOutcome::Answered(http::StatusCode::TOO_MANY_REQUESTS) {
            BackendStats::add(&stats.throttled, 1);
        } else if outcome.failed() {
            BackendStats::add(&stats.failed, 1);
        }
        if retried {
            count(&self.metrics.retries, &labels());
        }
        let b = || BackendLabels {
            backend: backend.name.to_string(),
        };
        if !matches!(verdict, Verdict::Healthy)
            && let Some(idx) = self.backends.iter().position(|x| std::ptr::eq(x, backend))
        {
            let what = match verdict {
                Verdict::CooledDown(wait) => {
                    format!(
                        "{} on {deployment}: cooling down for {:.1} s",
                        outcome.label(),
                        wait.as_secs_f64()
                    )
                }
                _ => format!("{} on {deployment}", outcome.label()),
            };
            *crate::sync::lock(&self.last_error[idx]) = Some((what, std::time::SystemTime::now()));
        }
        match verdict {
            Verdict::CooledDown(wait) => {
                self.metrics.cooldowns.get_or_create(&b()).inc();
                if let Some(shared) = &self.shared {
                    shared.publish_cooldown(deployment, &backend.name, wait);
                }
                tracing::info!(backend = %backend.name, cooldown_ms = wait.as_millis() as u64, "backend throttled; cooling down");
            }
            Verdict::Failed {
                circuit_opened: true,
            } => {
                self.metrics.circuits_opened.get_or_create(&b()).inc();
                tracing::warn!(backend = %backend.name, "circuit opened after repeated failures");
            }
            _ => {}
        }
    }
}
