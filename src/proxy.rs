//! The attempt loop: route, pick, send, classify, fail over. The only place retries live.
//!
//! Rules: at most `max_attempts` attempts, all within `request_timeout`; each goes to a backend
//! this request has not tried while another can take it; no sleeping between attempts (the next
//! backend is another instance, not the same one asked again); an attempt that the remaining
//! time cannot fit (going by the backend's recent time to first byte) is not started. A response
//! is retried only before any of it reached the client: the loop hands back headers and body
//! together, so that holds by construction. When every candidate is throttled the client gets
//! a 429 with the soonest `retry-after`; when every one is down, the last real backend answer
//! if there was one, else a 503.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Response;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use crate::balancer::Misfit;
use crate::balancer::{Balancer, Lease, Outcome, Pick, SCRATCH, Verdict, scratch};
use crate::body::{BoxBody, Whole};
use crate::config::RoutingConfig;
use crate::error::{ErrorKind, GatewayError};
use crate::limits::Shared;
use crate::routing::Router;
use crate::telemetry::trace::{AttemptRecord, TraceContext};
use crate::telemetry::{AttemptLabels, BackendLabels, BackendStats, Metrics};
use crate::upstream::{Backend, OutboundRequest, Upstream};

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
pub struct Trail(pub Vec<(Arc<str>, Result<u16, &'static str>)>);

impl std::fmt::Display for Trail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (backend, outcome)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match outcome {
                Ok(status) => write!(f, "{backend}:{status}")?,
                Err(label) => write!(f, "{backend}:{label}")?,
            }
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
}

impl Answer {
    fn error(e: GatewayError, attempts: u32) -> Self {
        Self {
            result: Err(e),
            backend: None,
            attempts,
            lease: None,
        }
    }
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

/// Pages of 100 read from each backend for one merged list, at most.
const LIST_PAGES: u32 = 50;
/// Longest list page read from a backend.
const LIST_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// How much of a 400 is read to see whether it says an object is missing.
const NOT_FOUND_BODY_BYTES: usize = 64 * 1024;

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

    /// Runs the attempts for one request. `deployment` is the client-facing deployment name
    /// (from the path or the body's `model`), the key health is tracked under.
    /// `log` receives one `backend:outcome` entry per attempt and the time spent waiting on
    /// backends, for the access log and the overhead metric.
    pub async fn forward(
        &self,
        req: &OutboundRequest<'_>,
        deployment: Option<&str>,
        target: Target<'_>,
        log: &mut AttemptLog,
    ) -> Answer {
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
        let deadline = now + self.routing.request_timeout;
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
            let rename = rename_for(&candidates, idx);
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
                        };
                    };
                    if let Some(m) = misfit(whole.status(), bytes) {
                        lease.report(Outcome::Misfit(m.clone()), answered);
                        self.misfit_seen(idx, shown, &m, !is_last);
                        log.tried
                            .0
                            .push((backend.name.clone(), Ok(whole.status().as_u16())));
                        if m.reason == NOT_DEPLOYED {
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
        let open = || {
            candidates
                .iter()
                .map(|c| c.backend)
                .filter(|&b| !policy.is_drained(b))
        };
        let best = open().map(|b| policy.priority[b]).min()?;
        open()
            .filter(|&b| policy.priority[b] == best)
            .max_by_key(|&b| rendezvous_score(key, &self.backends[b].name))
    }

    /// The owner of a named object cannot take the request now: it is not sent anywhere else,
    /// where the object does not exist. `retry_after` is set when it is cooling down.
    fn owner_busy(
        &self,
        owner: Option<(usize, &str)>,
        retry_after: Option<Duration>,
    ) -> GatewayError {
        let (idx, id) = owner.unwrap_or((0, ""));
        let name = self.backends.get(idx).map_or("?", |b| &*b.name);
        match retry_after {
            Some(wait) => GatewayError::new(
                ErrorKind::OwnerThrottled,
                format!(
                    "Backend '{name}' holds '{id}', which this request names, and is rate limited; it is available again in {:.1} s.",
                    wait.as_secs_f64()
                ),
            )
            .with_retry_after(Some(wait)),
            None => GatewayError::new(
                ErrorKind::OwnerUnavailable,
                format!(
                    "Backend '{name}' holds '{id}', which this request names, and is not available (circuit open or drained)."
                ),
            ),
        }
    }

    /// Asks the candidates in turn for objects no owner is known for, until one answers other
    /// than "not found". A "not found" (a 404, or a 400 naming one of `ids`) is neither a
    /// failure of that backend nor the client's answer while another may hold the object; only
    /// when none does is the client told it does not exist. A backend that could not be asked
    /// (throttled, down) might hold it: then the client is told to come back, not that it is
    /// missing.
    async fn search(
        &self,
        req: &OutboundRequest<'_>,
        deployment: Option<&str>,
        candidates: &[crate::routing::Candidate],
        ids: &[String],
        log: &mut AttemptLog,
    ) -> Answer {
        let backends: Vec<usize> = candidates.iter().map(|c| c.backend).collect();
        let table = self.balancer.table(deployment.unwrap_or(""));
        let shown = deployment.unwrap_or("(none)");
        let deadline = Instant::now() + self.routing.request_timeout;
        let mut tried = vec![false; self.backends.len()];
        let (mut kept, mut last_error, mut blocked) = (None::<Kept>, None, None);
        let (mut attempts, mut failures) = (0u32, 0u32);
        let id_list = ids
            .iter()
            .map(|i| format!("'{i}'"))
            .collect::<Vec<_>>()
            .join(", ");
        loop {
            let untried: Vec<usize> = backends.iter().copied().filter(|&b| !tried[b]).collect();
            if untried.is_empty() || failures >= self.routing.max_attempts {
                break;
            }
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            let mut lease = match table.pick(&untried, &tried, now) {
                Pick::Chosen(lease) => lease,
                Pick::Throttled { retry_after } => {
                    blocked = Some(GatewayError::new(
                        ErrorKind::AllThrottled,
                        format!("The backends not yet asked for {id_list} are rate limited; the soonest is available in {:.1} s.", retry_after.as_secs_f64()),
                    ).with_retry_after(Some(retry_after)));
                    break;
                }
                Pick::Unavailable { retry_after } => {
                    blocked = Some(GatewayError::new(
                        ErrorKind::NoBackendAvailable,
                        format!("The backends not yet asked for {id_list} are not available (circuits open or drained)."),
                    ).with_retry_after(retry_after));
                    break;
                }
            };
            if remaining.is_zero() {
                drop(lease);
                last_error = Some(GatewayError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "routing.request_timeout ({:?}) ran out while looking for {id_list}",
                        self.routing.request_timeout
                    ),
                ));
                break;
            }
            let idx = lease.backend();
            tried[idx] = true;
            attempts += 1;
            let rename = rename_for(candidates, idx);
            let (sent, waited, answered) = self
                .send_attempt(idx, rename, req, remaining, attempts, now, log)
                .await;
            let retryable = self.settle(
                &mut lease,
                idx,
                shown,
                &sent,
                (waited, answered),
                false,
                req.creates,
                &mut log.tried,
            );
            match sent {
                Ok(resp) => {
                    let status = resp.status();
                    let resp = if status == http::StatusCode::BAD_REQUEST {
                        // Whether it names a missing object is in the body: read it, and keep
                        // it to pass on if it is about something else.
                        let whole = read_whole(resp, NOT_FOUND_BODY_BYTES).await;
                        let bytes = whole.body().bytes.as_deref().unwrap_or_default();
                        if ids
                            .iter()
                            .any(|id| memchr::memmem::find(bytes, id.as_bytes()).is_some())
                        {
                            continue;
                        }
                        whole.map(Whole::into_body)
                    } else {
                        resp
                    };
                    if status == http::StatusCode::NOT_FOUND {
                        continue;
                    }
                    if retryable {
                        failures += 1;
                        let whole = read_whole(resp, KEEP_FAILED_BODY_BYTES).await;
                        if whole.body().bytes.is_some() {
                            kept = Some((idx, whole));
                        }
                        continue;
                    }
                    let found = if status.is_success() {
                        "found"
                    } else {
                        "answered"
                    };
                    self.metrics
                        .owner_searches
                        .get_or_create(&reason(found))
                        .inc();
                    return Answer {
                        result: Ok(resp),
                        backend: Some(idx),
                        attempts,
                        lease: Some(lease),
                    };
                }
                Err(e) => {
                    if !retryable {
                        return Answer {
                            result: Err(e),
                            backend: Some(idx),
                            attempts,
                            lease: None,
                        };
                    }
                    failures += 1;
                    last_error = Some(e);
                }
            }
        }
        // No backend said it holds them. One that failed or could not be asked might.
        if kept.is_some() || last_error.is_some() {
            self.metrics
                .owner_searches
                .get_or_create(&reason("unavailable"))
                .inc();
            return self.give_up(kept, last_error, attempts);
        }
        if let Some(e) = blocked {
            self.metrics
                .owner_searches
                .get_or_create(&reason("unavailable"))
                .inc();
            return Answer::error(e, attempts);
        }
        self.metrics
            .owner_searches
            .get_or_create(&reason("not_found"))
            .inc();
        Answer::error(not_found(ids), attempts)
    }

    /// Every backend's whole list at `path_and_query` (a list endpoint: files, batches, ...),
    /// fetched from all backends at once, each followed through its own pages (`limit=100`,
    /// `after=`) up to `LIST_PAGES`. The client's other query parameters (`api-version`,
    /// `purpose`, ...) go along. A backend that cannot be listed fails the whole list: a
    /// list quietly missing one backend's objects would be wrong, not partial.
    pub async fn list_all(
        &self,
        req: &OutboundRequest<'_>,
        log: &mut AttemptLog,
    ) -> Result<Vec<(usize, Vec<serde_json::Value>)>, Response<BoxBody>> {
        let (path, query) = req
            .path_and_query
            .split_once('?')
            .unwrap_or((req.path_and_query, ""));
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| {
                let name = p.split('=').next().unwrap_or("");
                !p.is_empty() && !matches!(name, "limit" | "after" | "before" | "order")
            })
            .collect();
        let deadline = Instant::now() + self.routing.request_timeout;
        let trace = log.trace;
        let fetches = self.backends.iter().enumerate().map(|(idx, _)| {
            let kept = &kept;
            async move {
                let mut own = AttemptLog {
                    trace,
                    ..AttemptLog::default()
                };
                let mut items = Vec::new();
                let mut after: Option<String> = None;
                for page in 1..=LIST_PAGES {
                    let mut q = kept.clone();
                    q.push("limit=100");
                    let cursor = after.as_ref().map(|a| format!("after={a}"));
                    if let Some(c) = &cursor {
                        q.push(c);
                    }
                    let pq = format!("{path}?{}", q.join("&"));
                    let page_req = OutboundRequest {
                        path_and_query: &pq,
                        deployment_span: None,
                        model_in_body: false,
                        body: Bytes::new(),
                        passthrough: req.passthrough.clone(),
                        ..*req
                    };
                    let now = Instant::now();
                    let remaining = deadline.saturating_duration_since(now);
                    let (sent, _, _) = self
                        .send_attempt(idx, None, &page_req, remaining, page, now, &mut own)
                        .await;
                    let name = self.backends[idx].name.clone();
                    let resp = match sent {
                        Ok(r) => r,
                        Err(e) => {
                            own.tried.0.push((name, Err(e.kind.label())));
                            return (own, Err(e.into_response()));
                        }
                    };
                    let status = resp.status();
                    own.tried.0.push((name, Ok(status.as_u16())));
                    let whole = read_whole(resp, LIST_PAGE_BYTES).await;
                    let Some(bytes) = whole.body().bytes.clone() else {
                        let e = GatewayError::new(
                            ErrorKind::UpstreamProtocol,
                            format!(
                                "backend {}: its list could not be read whole",
                                self.backends[idx].name
                            ),
                        );
                        return (own, Err(e.into_response()));
                    };
                    if !status.is_success() {
                        // The backend's own answer, as it gave it.
                        return (own, Err(whole.map(Whole::into_body)));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    let data = v
                        .get("data")
                        .and_then(|d| d.as_array())
                        .cloned()
                        .unwrap_or_default();
                    after = data
                        .last()
                        .and_then(|d| d.get("id"))
                        .and_then(|i| i.as_str())
                        .map(str::to_string);
                    items.extend(data);
                    if v.get("has_more").and_then(|h| h.as_bool()) != Some(true) || after.is_none()
                    {
                        break;
                    }
                }
                (own, Ok((idx, items)))
            }
        });
        let results = futures_util::future::join_all(fetches).await;
        let mut out = Vec::with_capacity(results.len());
        let mut failed = None;
        for (own, r) in results {
            log.tried.0.extend(own.tried.0);
            log.upstream = log.upstream.max(own.upstream);
            log.spans.extend(own.spans);
            match r {
                Ok(page) => out.push(page),
                Err(resp) => failed = failed.or(Some(resp)),
            }
        }
        match failed {
            Some(resp) => Err(resp),
            None => Ok(out),
        }
    }

    /// Counts and logs a backend found unable to serve a deployment: the attempt in metrics, the
    /// backend's last error, and a WARN once a minute per backend (a misconfigured backend is
    /// passed over, so it must not go unnoticed).
    fn misfit_seen(&self, idx: usize, deployment: &str, m: &Misfit, retried: bool) {
        let backend = &self.backends[idx];
        self.note(backend, deployment, m.reason, Verdict::Healthy, retried);
        *crate::sync::lock(&self.last_error[idx]) = Some((
            format!("{} on {deployment}: {}", m.reason, m.message),
            std::time::SystemTime::now(),
        ));
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = backend.stats.misfit_warned.load(Relaxed);
        if now >= last + 60
            && backend
                .stats
                .misfit_warned
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                backend = %backend.name,
                deployment,
                reason = m.reason,
                answer = %m.message,
                "a backend cannot serve a deployment; passed over for it (check backends[{idx}])"
            );
        }
    }

    /// Tells the balancer how an attempt went (its health verdict) and counts it: metrics, the
    /// backend's last error, the request's trail. Returns whether the outcome is one to retry
    /// elsewhere.
    #[expect(
        clippy::too_many_arguments,
        reason = "the attempt's facts, each from a different place in the loop"
    )]
    fn settle(
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
                self.note(backend, shown, status.as_str(), verdict, retried);
                trail.0.push((backend.name.clone(), Ok(status.as_u16())));
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
                    e.kind.label(),
                    verdict,
                    retryable && !is_last,
                );
                trail.0.push((backend.name.clone(), Err(e.kind.label())));
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
    async fn send_attempt(
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
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(e) => Err(e.kind.label()),
                },
            });
        }
        (sent_result, waited, answered)
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
            },
            None => Answer::error(
                error.unwrap_or_else(|| {
                    GatewayError::new(ErrorKind::NoBackendAvailable, "no backend attempt was made")
                }),
                attempts,
            ),
        }
    }

    fn note(
        &self,
        backend: &Backend,
        deployment: &str,
        outcome: &str,
        verdict: Verdict,
        retried: bool,
    ) {
        let stats = &backend.stats;
        let labels = || AttemptLabels {
            backend: backend.name.to_string(),
            outcome: outcome.to_string(),
        };
        if outcome == "200" {
            stats.attempts_ok.inc();
        } else {
            count(&self.metrics.attempts, &labels());
        }
        match outcome {
            "429" => BackendStats::add(&stats.throttled, 1),
            o if o.starts_with('5') || !o.starts_with(|c: char| c.is_ascii_digit()) => {
                BackendStats::add(&stats.failed, 1)
            }
            _ => {}
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
                        "{outcome} on {deployment}: cooling down for {:.1} s",
                        wait.as_secs_f64()
                    )
                }
                _ => format!("{outcome} on {deployment}"),
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

/// The gateway's answer for objects that no backend holds (or that belong to another
/// consumer: the same answer, so one cannot tell the two apart).
pub fn not_found(ids: &[String]) -> GatewayError {
    let shown: Vec<String> = ids
        .iter()
        .map(|i| format!("'{}'", i.chars().take(128).collect::<String>()))
        .collect();
    GatewayError::new(
        ErrorKind::ObjectNotFound,
        format!("No object with id {} was found.", shown.join(", ")),
    )
}

/// The backend's own name for the deployment, when it has another.
fn rename_for(candidates: &[crate::routing::Candidate], idx: usize) -> Option<&str> {
    candidates
        .iter()
        .find(|c| c.backend == idx)
        .and_then(|c| c.rename.as_deref())
}

/// [`Misfit::reason`] for a deployment the backend does not have.
const NOT_DEPLOYED: &str = "not_deployed";
/// [`Misfit::reason`] for a backend that refused the gateway's credential.
const AUTH_REJECTED: &str = "auth_rejected";

/// Statuses that may say the backend cannot serve the deployment (the body says which).
fn may_be_misfit(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 404)
}

/// What an answer says about the backend, from its status and body: a refused credential (401;
/// a 403 not about content or policy), or a deployment it does not have (a 404 with Azure's
/// `DeploymentNotFound`).
fn misfit(status: http::StatusCode, body: &[u8]) -> Option<Misfit> {
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    let reason = match status.as_u16() {
        401 => AUTH_REJECTED,
        403 if !(lower.contains("content") || lower.contains("policy")) => AUTH_REJECTED,
        404 if lower.contains("deploymentnotfound") => NOT_DEPLOYED,
        _ => return None,
    };
    // The backend's own message when it gave one in the OpenAI shape, else its first words.
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    let mut message: String = message.chars().take(300).collect();
    if message.is_empty() {
        message = format!("answered {status}");
    }
    Some(Misfit { reason, message })
}

/// The client's answer when the backends refused the gateway's credential: the gateway's
/// fault to fix, never the client's key (`backends[i].auth` says where).
fn auth_failed(backend: &Backend, idx: usize, m: &Misfit) -> GatewayError {
    GatewayError::new(
        ErrorKind::BackendAuthFailed,
        format!(
            "backend {} refused the gateway's credential ({}); check backends[{idx}].auth",
            backend.name, m.message
        ),
    )
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
