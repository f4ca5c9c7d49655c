//! The attempt loop: route, pick, send, classify, fail over. The only place retries live.
//!
//! Rules: at most `max_attempts` attempts, all within `request_timeout`; each goes to a backend
//! this request has not tried while another can take it; no sleeping between attempts (the next
//! backend is another instance, not the same one asked again); an attempt that the remaining
//! time cannot fit (going by the backend's recent time to first byte) is not started. A response
//! is retried only before any of it reached the client: the loop hands back headers and body
//! together, so that holds by construction. When every candidate is throttled the client gets
//! a 429 with the soonest `retry-after`; when every one is down, the last real backend answer
//! if there was one, else a 503. A deployment with fallbacks gets one such round, then each
//! fallback in turn (`fallback.rs`).

mod attempt;
mod fallback;
mod misfit;
mod objects;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Response;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use crate::balancer::{Balancer, Lease, Outcome, Pick, SCRATCH, Verdict, scratch};
use crate::balancer::{Misfit, MisfitReason};
use crate::body::{BoxBody, Whole};
use crate::config::RoutingConfig;
use crate::error::{ErrorKind, GatewayError};
use crate::limits::Shared;
use crate::routing::Router;
use crate::telemetry::trace::{AttemptRecord, TraceContext};
use crate::telemetry::{AttemptLabels, AttemptOutcome, BackendLabels, BackendStats, Metrics};
use crate::upstream::{Backend, OutboundRequest, Upstream};

pub use fallback::Gate;
use misfit::{auth_failed, may_be_misfit, misfit};
pub use objects::not_found;

/// A retried response is kept (up to this size) in case every later attempt fails without one:
/// the client then gets the last real backend answer rather than a gateway-made error.
const KEEP_FAILED_BODY_BYTES: usize = 1024 * 1024;
const KEEP_FAILED_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the attempts of one request were, for the access log and metrics.
#[derive(Debug, Default)]
pub struct AttemptLog {
    /// Each attempt's backend and outcome; shown as `backend:outcome ...`.
    pub tried: Trail,
    /// Time spent waiting on backends for response headers, all attempts together.
    pub upstream: Duration,
    /// The request's trace, when tracing is on: each attempt passes its span on to the backend.
    pub trace: Option<TraceContext>,
    /// One record per attempt of a sampled trace, for its span.
    pub spans: Vec<AttemptRecord>,
}

/// The attempts of one request, formatted only when a log line asks for them.
#[derive(Debug, Default)]
pub struct Trail(pub Vec<(Arc<str>, AttemptOutcome)>);

impl std::fmt::Display for Trail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (backend, outcome)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{backend}:{}", outcome.label())?;
        }
        Ok(())
    }
}

/// What the loop ends with.
pub struct Answer {
    /// The response to send, or the gateway's own error when no backend produced one.
    pub result: Result<Response<BoxBody>, GatewayError>,
    /// Index of the backend whose response this is.
    pub backend: Option<usize>,
    pub attempts: u32,
    /// The serving backend's in-flight slot, held until the response body ends.
    pub lease: Option<Lease>,
    /// The fallback deployment this answer is from; `None`: the one the request asked for.
    pub fallback: Option<Arc<str>>,
}

impl Answer {
    fn error(e: GatewayError, attempts: u32) -> Self {
        Self {
            result: Err(e),
            backend: None,
            attempts,
            lease: None,
            fallback: None,
        }
    }
}

/// One round of attempts: the deployment they serve, and by when.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// The client-facing deployment name (from the path or the body's `model`, or a fallback),
    /// the key health is tracked under.
    pub deployment: Option<&'a str>,
    /// A fallback's round: a backend with no name of its own for the deployment gets this
    /// one, as the request names another.
    pub fallback: bool,
    /// When the request's time (`routing.request_timeout`) runs out.
    pub deadline: Instant,
}

/// Where a request may go, as the objects it names decide (see `affinity`).
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Any backend serving the deployment: the balancer chooses.
    Any,
    /// Only the backend holding `id` (and every other object the request names).
    Owner { backend: usize, id: &'a str },
    /// Objects no owner is known for: asked of the candidates in turn until one holds them.
    Search { ids: &'a [String] },
    /// A session's backend (`routing.affinity_key`): tried first while it can take the request,
    /// else the balancer chooses.
    Prefer { backend: usize },
}

pub struct Proxy {
    pub backends: Vec<Backend>,
    balancer: Balancer,
    router: Router,
    upstream: Upstream,
    routing: RoutingConfig,
    metrics: Arc<Metrics>,
    /// Where cooldowns are shared with other replicas, if anywhere.
    shared: Option<Arc<Shared>>,
    /// Each backend's latest failure (what and when), for the admin API.
    last_error: Vec<std::sync::Mutex<Option<(String, std::time::SystemTime)>>>,
}

impl Proxy {
    pub fn new(
        backends: Vec<Backend>,
        balancer: Balancer,
        router: Router,
        upstream: Upstream,
        routing: RoutingConfig,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> Self {
        Self {
            last_error: backends
                .iter()
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
            backends,
            balancer,
            router,
            upstream,
            routing,
            metrics,
            shared,
        }
    }

    /// A backend's latest failure: what happened and when.
    pub fn last_error(&self, idx: usize) -> Option<(String, std::time::SystemTime)> {
        self.last_error
            .get(idx)
            .and_then(|m| crate::sync::lock(m).clone())
    }

    /// Applies a cooldown another replica learned, if the names are known here.
    pub fn remote_cooldown(&self, deployment: &str, backend: &str, wait: Duration) {
        if let Some(idx) = self.backends.iter().position(|b| &*b.name == backend) {
            self.balancer
                .table(deployment)
                .remote_cooldown(idx, wait, Instant::now());
            self.metrics.remote_cooldowns.inc();
        }
    }

    /// Takes over `old`'s learned state for the backends a reload kept (`map[old] = new`).
    pub fn inherit(&self, old: &Proxy, map: &[Option<usize>]) {
        self.balancer.inherit(&old.balancer, map);
        for (i, j) in map.iter().enumerate() {
            if let (Some(j), Some(e)) = (j, old.last_error(i))
                && let Some(slot) = self.last_error.get(*j)
            {
                *crate::sync::lock(slot) = Some(e);
            }
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The round of attempts a request for `deployment` starts with, its time starting now.
    pub fn round<'a>(&self, deployment: Option<&'a str>) -> Round<'a> {
        Round {
            deployment,
            fallback: false,
            deadline: Instant::now() + self.routing.request_timeout,
        }
    }

    /// Runs one round of attempts for a request (`forward_chain` runs one a deployment of a
    /// fallback chain). `log` receives one `backend:outcome` entry per attempt and the time
    /// spent waiting on backends, for the access log and the overhead metric.
    pub async fn forward(
        &self,
        req: &OutboundRequest<'_>,
        round: Round<'_>,
        target: Target<'_>,
        log: &mut AttemptLog,
    ) -> Answer {
        let deployment = round.deployment;
        let candidates = match self.router.resolve(deployment) {
            Ok(c) => c,
            Err(e) => return Answer::error(e, 0),
        };
        let (owner, prefer) = match target {
            Target::Any => (None, None),
            Target::Prefer { backend } => (None, Some(backend)),
            Target::Owner { backend, id } => (Some((backend, id)), None),
            Target::Search { ids } => {
                return self.search(req, deployment, &candidates, ids, log).await;
            }
        };
        // On the stack for the usual pool sizes: this runs for every request.
        let (mut backends_stack, mut backends_heap) = ([0usize; SCRATCH], Vec::new());
        let backends: &[usize] = match owner {
            // The object is there and nowhere else, whatever the deployment's pool.
            Some((backend, _)) => {
                backends_stack[0] = backend;
                &backends_stack[..1]
            }
            None => {
                let backends = scratch(&mut backends_stack, &mut backends_heap, candidates.len());
                for (slot, c) in backends.iter_mut().zip(candidates.iter()) {
                    *slot = c.backend;
                }
                backends
            }
        };
        let table = self.balancer.table(deployment.unwrap_or(""));
        let shown = deployment.unwrap_or("(none)");
        let mut now = Instant::now();
        let deadline = round.deadline;
        let (mut tried_stack, mut tried_heap) = ([false; SCRATCH], Vec::new());
        let tried = scratch(&mut tried_stack, &mut tried_heap, self.backends.len());
        let mut kept: Option<Kept> = None;
        let mut last_error: Option<GatewayError> = None;
        let mut attempts = 0;
        // Backends that got the whole request and failed to answer: it is not sent to them
        // again, in case they acted on it.
        let mut spent: Vec<usize> = Vec::new();

        for attempt in 1..=self.routing.max_attempts {
            if attempt > 1 {
                now = Instant::now();
            }
            let remaining = deadline.saturating_duration_since(now);
            let unspent: Vec<usize>;
            let backends: &[usize] = if spent.is_empty() {
                backends
            } else {
                unspent = backends
                    .iter()
                    .copied()
                    .filter(|b| !spent.contains(b))
                    .collect();
                if unspent.is_empty() {
                    return self.give_up(kept, last_error, attempts);
                }
                &unspent
            };
            let picked = match prefer {
                Some(b) if attempt == 1 && backends.contains(&b) => {
                    match table.pick(std::slice::from_ref(&b), tried, now) {
                        chosen @ Pick::Chosen(_) => chosen,
                        // Throttled or down: the session moves.
                        _ => table.pick(backends, tried, now),
                    }
                }
                _ => table.pick(backends, tried, now),
            };
            let mut lease = match picked {
                Pick::Chosen(lease) => lease,
                Pick::Throttled { retry_after } if owner.is_some() => {
                    return Answer::error(self.owner_busy(owner, Some(retry_after)), attempts);
                }
                Pick::Unavailable { retry_after } if owner.is_some() => {
                    let e = self.owner_busy(owner, None).with_retry_after(retry_after);
                    return self.give_up(kept, Some(e), attempts);
                }
                Pick::Throttled { retry_after } => {
                    self.metrics
                        .rejections
                        .get_or_create(&reason("all_throttled"))
                        .inc();
                    let e = GatewayError::new(
                        ErrorKind::AllThrottled,
                        format!(
                            "Every backend serving deployment '{shown}' is rate limited; the soonest is available in {:.1} s.",
                            retry_after.as_secs_f64()
                        ),
                    )
                    .with_retry_after(Some(retry_after));
                    return Answer::error(e, attempts);
                }
                Pick::Unavailable { retry_after } => {
                    self.metrics
                        .rejections
                        .get_or_create(&reason("all_unavailable"))
                        .inc();
                    let e = GatewayError::new(
                        ErrorKind::NoBackendAvailable,
                        format!(
                            "No backend serving deployment '{shown}' is available: their circuits are open after repeated failures."
                        ),
                    )
                    .with_retry_after(retry_after);
                    return self.give_up(kept, last_error.or(Some(e)), attempts);
                }
            };
            if remaining.is_zero() || lease.expected_ttfb().is_some_and(|t| t > remaining) {
                drop(lease);
                let e = GatewayError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "routing.request_timeout ({:?}) leaves no time for another attempt",
                        self.routing.request_timeout
                    ),
                );
                return self.give_up(kept, last_error.or(Some(e)), attempts);
            }
            let idx = lease.backend();
            tried[idx] = true;
            attempts = attempt;
            let backend = &self.backends[idx];
            let rename = match rename_for(&candidates, idx) {
                None if round.fallback => deployment,
                own => own,
            };
            let is_last = attempt == self.routing.max_attempts;
            let (sent_result, waited, answered) = self
                .send_attempt(idx, rename, req, remaining, attempt, now, log)
                .await;
            // An answer saying this backend cannot serve the deployment at all (its credential
            // refused, the deployment missing there) is the backend's fault, not the
            // client's: remembered, and the request moves on.
            let sent_result = match sent_result {
                Ok(resp) if owner.is_none() && may_be_misfit(resp.status()) => {
                    let whole = read_whole(resp, KEEP_FAILED_BODY_BYTES).await;
                    // Error bodies are small; one that is not, or never ends, is not passed
                    // on cut short.
                    let Some(bytes) = &whole.body().bytes else {
                        let e = GatewayError::new(
                            ErrorKind::UpstreamProtocol,
                            format!(
                                "backend {} answered {} with a body over {KEEP_FAILED_BODY_BYTES} bytes or too slow to read",
                                backend.name,
                                whole.status()
                            ),
                        );
                        return Answer {
                            result: Err(e),
                            backend: Some(idx),
                            attempts,
                            lease: None,
                            fallback: None,
                        };
                    };
                    if let Some(m) = misfit(whole.status(), bytes) {
                        lease.report(Outcome::Misfit(m.clone()), answered);
                        self.misfit_seen(idx, shown, &m, !is_last);
                        log.tried.0.push((
                            backend.name.clone(),
                            AttemptOutcome::Answered(whole.status()),
                        ));
                        if m.reason == MisfitReason::NotDeployed {
                            // If no backend has it, the client gets this 404.
                            kept = Some((idx, whole));
                        } else {
                            last_error = Some(auth_failed(backend, idx, &m));
                        }
                        if is_last {
                            return self.give_up(kept, last_error, attempts);
                        }
                        continue;
                    }
                    Ok(whole.map(Whole::into_body))
                }
                other => other,
            };
            let retryable = self.settle(
                &mut lease,
                idx,
                shown,
                &sent_result,
                (waited, answered),
                is_last,
                req.creates,
                &mut log.tried,
            );
            match sent_result {
                Ok(resp) => {
                    if !retryable || is_last {
                        return Answer {
                            result: Ok(resp),
                            backend: Some(idx),
                            attempts,
                            lease: Some(lease),
                            fallback: None,
                        };
                    }
                    tracing::debug!(backend = %backend.name, status = %resp.status(), attempt, "retrying on another backend");
                    let whole = read_whole(resp, KEEP_FAILED_BODY_BYTES).await;
                    if whole.body().bytes.is_some() {
                        kept = Some((idx, whole));
                    }
                }
                Err(e) => {
                    if !retryable {
                        return Answer {
                            result: Err(e),
                            backend: Some(idx),
                            attempts,
                            lease: None,
                            fallback: None,
                        };
                    }
                    tracing::debug!(backend = %backend.name, error = %e, attempt, "attempt failed");
                    if e.delivered {
                        spent.push(idx);
                    }
                    last_error = Some(e);
                }
            }
        }
        self.give_up(kept, last_error, attempts)
    }

    /// The backend a session key belongs to when nothing else says: the best priority group's
    /// highest hash of key and backend name (rendezvous hashing, so a backend added or removed
    /// moves only its own share of sessions). Drained backends are left out.
    pub fn rendezvous(&self, deployment: Option<&str>, key: &str) -> Option<usize> {
        let candidates = self.router.resolve(deployment).ok()?;
        let policy = self.balancer.policy();
        let table = self.balancer.table(deployment.unwrap_or(""));
        let ranks = table.ranks();
        let open = || {
            candidates
                .iter()
                .map(|c| c.backend)
                .filter(|&b| !policy.is_drained(b))
        };
        let best = open().map(|b| ranks.priority(b)).min()?;
        open()
            .filter(|&b| ranks.priority(b) == best)
            .max_by_key(|&b| rendezvous_score(key, &self.backends[b].name))
    }

    /// No attempt produced an answer to pass on: the last real backend response if one was
    /// kept, else the gateway's own error.
    fn give_up(&self, kept: Option<Kept>, error: Option<GatewayError>, attempts: u32) -> Answer {
        match kept {
            Some((idx, resp)) => Answer {
                result: Ok(resp.map(Whole::into_body)),
                backend: Some(idx),
                attempts,
                lease: None,
                fallback: None,
            },
            None => Answer::error(
                error.unwrap_or_else(|| {
                    GatewayError::new(ErrorKind::NoBackendAvailable, "no backend attempt was made")
                }),
                attempts,
            ),
        }
    }
}

/// A retried backend's answer, kept whole (its passed-through header lines too) in case no
/// later attempt answers.
type Kept = (usize, Response<Whole>);

fn rendezvous_score(key: &str, backend: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::fnv::Fnv::default();
    h.write(key.as_bytes());
    h.write(&[0xff]);
    h.write(backend.as_bytes());
    // FNV's low bits mix poorly: a finaliser spreads them before the comparison.
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// The backend's own name for the deployment, when it has another.
fn rename_for(candidates: &[crate::routing::Candidate], idx: usize) -> Option<&str> {
    candidates
        .iter()
        .find(|c| c.backend == idx)
        .and_then(|c| c.rename.as_deref())
}

/// A response read whole: its head, and its body if that ends within `max` bytes and
/// `KEEP_FAILED_BODY_TIMEOUT`, with the header lines passed on as the backend sent them.
async fn read_whole(resp: Response<BoxBody>, max: usize) -> Response<Whole> {
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.read_whole(max, KEEP_FAILED_BODY_TIMEOUT).await)
}

fn count(family: &Family<AttemptLabels, Counter>, labels: &AttemptLabels) {
    family.get_or_create(labels).inc();
}

fn reason(r: &'static str) -> crate::telemetry::ReasonLabels {
    crate::telemetry::ReasonLabels { reason: r }
}
