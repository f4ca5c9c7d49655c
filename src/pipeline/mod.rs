//! The client request path, top to bottom:
//! request id → route → read body (capped) → attempt loop → response headers → tracked body.
//! WebSocket upgrades take the same path and are tunnelled once the backend answers 101.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;

use crate::affinity::{Learner, Owner, Owners, refs};
use crate::api;
use crate::auth::inbound::Consumer;
use crate::balancer::Lease;
use crate::body::{BoxBody, BoxError, RequestBody};
use crate::error::{ErrorKind, GatewayError};
use crate::http1::RawHeaders;
use crate::limits::{Admission, Refusal};
use crate::live::{GatewayState, Snapshot};
use crate::proxy::{AttemptLog, Target};
use crate::telemetry::trace::{self, Attr, Span, SpanKind, Tracer};
use crate::telemetry::{
    BackendLabels, BackendStats, ConsumerRejectionLabels, Metrics, RequestCounters, status_class,
};
use crate::upstream::{OutboundRequest, X_REQUEST_ID};
use crate::usage::{self, Tap, Usage};

pub async fn handle(
    state: Arc<GatewayState>,
    mut req: Request<RequestBody>,
) -> Result<Response<BoxBody>, Infallible> {
    let started = Instant::now();
    state.metrics.in_flight.inc();
    // Created before the first await: if the client goes away while attempts run, hyper drops
    // this future and the guard still ends the request's accounting.
    let mut guard = RequestGuard {
        metrics: state.metrics.clone(),
        backend: None,
        started,
        _lease: None,
        consumer: anonymous(),
        counters: None,
        success: false,
        reservation: None,
        tap: None,
        finished: false,
        log: AccessLog::default(),
        stats: None,
        tracer: None,
        stream_failed: false,
        learner: None,
    };
    let request_id = request_id(req.headers(), &state.ids);
    let wants_upgrade = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    guard.log.request_id = request_id.clone();
    guard.log.method = req.method().clone();
    guard.log.uri = req.uri().clone();
    if let Some(t) = &state.tracer {
        guard.log.wall_start = SystemTime::now();
        let ctx = t.start(req.headers());
        guard.log.attempts_log.trace = Some(ctx);
        if ctx.sampled {
            guard.tracer = Some(t.clone());
        }
    }

    // The config as of now, for the whole request: a reload does not change it half-way.
    let rt = state.snapshot();
    // Who is calling comes first: nothing about an unauthenticated request is read further.
    let consumer = rt.auth.authenticate(req.headers()).await;
    let consumer_name = match &consumer {
        Ok(Some(c)) => c.name.clone(),
        _ => anonymous(),
    };
    let outcome = match consumer {
        Ok(c) => serve(&state, &rt, req, &request_id, c.as_ref(), &mut guard.log).await,
        Err(e) => Err((None, 0, e)),
    };
    let (answer_backend, attempts, lease, limit, mut resp) = match outcome {
        Ok(served) => {
            guard.learner = served.learner;
            (
                served.backend,
                served.attempts,
                served.lease,
                served.limit,
                served.response,
            )
        }
        Err((backend, attempts, e)) => (backend, attempts, None, None, e.into_response()),
    };
    let backend_name = answer_backend.map(|i| rt.proxy.backends[i].name.clone());

    let status = resp.status();
    let deployment_label = match &guard.log.deployment {
        None => "-",
        Some(d) if rt.proxy.balancer().tracks(d) => d.as_str(),
        Some(_) => "other",
    };
    let counters = state.metrics.request_counters(
        deployment_label,
        backend_name.as_deref().unwrap_or("none"),
        status_class(status.as_u16()),
        &consumer_name,
    );
    counters.requests.inc();
    guard.log.status = status.as_u16();
    guard.log.attempts = attempts;
    guard.log.first_byte = started.elapsed();
    let stats = answer_backend.map(|i| rt.proxy.backends[i].stats.clone());
    if let Some(s) = &stats {
        BackendStats::add(&s.served, 1);
        BackendStats::add(&s.ttfb_us, guard.log.first_byte.as_micros() as u64);
        BackendStats::add(&s.ttfb_count, 1);
        let m = &state.metrics;
        s.ttfb_histogram.observe(guard.log.first_byte.as_secs_f64());
        // What the gateway itself added: all but the time spent waiting on backends.
        let overhead = guard
            .log
            .first_byte
            .saturating_sub(guard.log.attempts_log.upstream);
        m.overhead.observe(overhead.as_secs_f64());
    }

    if status == http::StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        tunnel(&state, client_upgrade, &mut resp);
    }

    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let sse = content_type.is_some_and(|v| v.starts_with("text/event-stream"));
    let strip = limit.as_ref().is_some_and(|l| l.strip);
    // Usage is read from whatever a backend answered (never from the gateway's own errors).
    let tap = backend_name
        .as_ref()
        .and_then(|_| Tap::new(content_type, strip));
    let (parts, mut body) = resp.into_parts();
    let passthrough = own_lines(
        &request_id,
        answer_backend.and_then(|i| rt.proxy.backends[i].name_header.as_ref()),
        attempts,
        body.take_passthrough(),
    );
    guard.backend = Some(backend_name.unwrap_or_else(|| Arc::from("none")));
    guard._lease = lease;
    guard.consumer = consumer_name;
    guard.counters = Some(counters);
    guard.success = status.is_success();
    guard.reservation = limit.map(|l| l.admission);
    guard.tap = tap;
    guard.stats = stats;
    let tracked = TrackedBody {
        inner: body,
        sse,
        ended: false,
        guard,
    };
    Ok(Response::from_parts(
        parts,
        BoxBody::new(tracked).with_passthrough(Some(passthrough)),
    ))
}

struct Served {
    backend: Option<usize>,
    attempts: u32,
    lease: Option<Lease>,
    limit: Option<Limit>,
    response: Response<BoxBody>,
    /// Remembers the owner of the objects the answer makes known.
    learner: Option<Learner>,
}

/// A request's hold on its consumer's limits.
struct Limit {
    admission: Admission,
    /// The usage chunk was asked for by the gateway: strip it from the client's stream.
    strip: bool,
}

fn refusal(consumer: &str, r: Refusal) -> GatewayError {
    match r {
        Refusal::Rate { what, retry_after } => GatewayError::new(
            ErrorKind::ConsumerRateLimited,
            format!(
                "Rate limit of consumer '{consumer}' exceeded ({what} per minute). Retry after {} seconds.",
                retry_after.as_millis().div_ceil(1000)
            ),
        )
        .with_retry_after(Some(retry_after)),
        Refusal::Quota { period, resets_in } => GatewayError::new(
            ErrorKind::QuotaExceeded,
            format!(
                "Token quota of consumer '{consumer}' for this {} is spent; it renews in {} seconds.",
                match period {
                    crate::config::QuotaPeriod::Hour => "hour",
                    crate::config::QuotaPeriod::Day => "day",
                    crate::config::QuotaPeriod::Month => "month",
                },
                resets_in.as_secs()
            ),
        )
        .with_retry_after(Some(resets_in)),
        Refusal::StoreUnavailable(e) => GatewayError::new(
            ErrorKind::NoBackendAvailable,
            format!("Limits for consumer '{consumer}' cannot be checked (the limits store is unreachable: {e}), and the gateway is set to refuse then (limits.fail_closed)."),
        )
        .with_retry_after(Some(std::time::Duration::from_secs(1))),
    }
}
type Failed = (Option<usize>, u32, GatewayError);

async fn serve(
    state: &GatewayState,
    rt: &Snapshot,
    req: Request<RequestBody>,
    request_id: &HeaderValue,
    consumer: Option<&Consumer>,
    log: &mut AccessLog,
) -> Result<Served, Failed> {
    if state.shutdown.is_cancelled() {
        return Err((
            None,
            0,
            GatewayError::new(ErrorKind::ShuttingDown, "the gateway is shutting down"),
        ));
    }
    let (parts, mut body) = req.into_parts();
    // The fast path checked `Host` as it read the head.
    let via_hyper = matches!(body, RequestBody::Streaming(_));
    check_head(&parts, via_hyper).map_err(|e| (None, 0, e))?;
    let passthrough = body.take_passthrough();
    let path = parts.uri.path();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(path);
    let route = api::route(path, pq).map_err(|e| (None, 0, e))?;
    let upgrade = route.upgrade_allowed && parts.headers.contains_key(header::UPGRADE);

    let mut body = read_body(body, &parts.headers, &rt.config.server)
        .await
        .map_err(|e| (None, 0, e))?;
    // Where the gateway itself reads the body (the model to route on, the tokens to count
    // against a consumer's limits), a body declared as JSON that does not parse is the
    // client's error, not something to send to every backend in turn.
    let declared_json = is_json(&parts.headers) && !body.is_empty();
    let invalid_json =
        || GatewayError::new(ErrorKind::BadRequest, "the request body is not valid JSON");
    let model = if route.model_in_body {
        // Read as JSON whatever the content type says when it looks like JSON: a backend may
        // not care for the header either, and must not be the one to decide the model.
        let looks_json = declared_json
            || (form_type(&parts.headers).is_none()
                && body.trim_ascii_start().first() == Some(&b'{'));
        match model_of(&body) {
            Ok(model) => model,
            Err(BodyModel::Repeated) if looks_json => {
                return Err((
                    None,
                    0,
                    GatewayError::new(
                        ErrorKind::BadRequest,
                        "the request body names 'model' more than once: its meaning is not certain",
                    ),
                ));
            }
            Err(_) if looks_json => return Err((None, 0, invalid_json())),
            // Multipart and binary bodies name no model.
            Err(_) => None,
        }
    } else {
        None
    };
    if !route.model_in_body
        && declared_json
        && consumer.is_some_and(|c| rt.limiter.counts_tokens(&c.name))
        && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
    {
        return Err((None, 0, invalid_json()));
    }
    let deployment = route.deployment().or(model.as_deref());
    log.deployment = deployment.map(|d| first_chars(d, 128).to_string());
    // Only a sampled trace's spans read these.
    if log.attempts_log.trace.is_some_and(|t| t.sampled) {
        log.operation = trace::operation_name(path);
        log.params = serde_json::from_slice(&body).ok();
    }

    // The stored objects the request names, and the backend that holds them.
    let object = refs::path_object(&route.path_and_query);
    let mut ids: Vec<String> = object
        .as_ref()
        .and_then(|o| o.id.as_deref())
        .map(|id| vec![id.to_string()])
        .unwrap_or_default();
    // Whether the backend keeps the answer (a stored chat completion).
    let mut stored = false;
    if !body.is_empty() {
        let named = match form_type(&parts.headers) {
            Some(ct) => refs::form_ids(ct, body.clone()).await,
            None => {
                let collection = object.as_ref().map(|o| o.collection);
                let named = refs::body_refs(
                    &body,
                    matches!(collection, Some("responses" | "conversations")),
                    collection == Some("chat/completions"),
                );
                if let Some(key) = named.repeated {
                    let shown = first_chars(&key, 64);
                    return Err((
                        None,
                        0,
                        GatewayError::new(
                            ErrorKind::BadRequest,
                            format!(
                                "the request body repeats the key '{shown}' in one object: its meaning is not certain"
                            ),
                        ),
                    ));
                }
                stored = named.stored;
                named.ids
            }
        };
        for id in named {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let isolated = !rt.config.consumers.is_empty();
    let caller = consumer.map(|c| c.name.clone());
    let pinned = pin(
        &state.owners,
        rt,
        &ids,
        isolated.then_some(caller.as_deref()).flatten(),
    )
    .await
    .map_err(|e| (None, 0, e))?;
    // A session key keeps a conversation on one backend, and its prompt cache warm.
    let session = match &pinned {
        Pinned::None if !rt.config.routing.affinity_key.is_empty() => session_key(
            &rt.config.routing.affinity_key,
            &parts.headers,
            &passthrough,
            &body,
        )
        .map(|k| {
            format!(
                "{}\n{}\n{k}",
                caller.as_deref().unwrap_or(""),
                deployment.unwrap_or("")
            )
        }),
        _ => None,
    };
    let preferred = match &session {
        Some(key) => match state.sessions.get(key).await {
            Some(o) => rt.proxy.backends.iter().position(|b| b.name == o.backend),
            None => rt.proxy.rendezvous(deployment, key),
        },
        None => None,
    };
    let target = match &pinned {
        Pinned::None => preferred.map_or(Target::Any, |backend| Target::Prefer { backend }),
        Pinned::Owner(backend, id) => {
            state.metrics.owner_routed.inc();
            Target::Owner {
                backend: *backend,
                id,
            }
        }
        Pinned::Search(unknown) => Target::Search { ids: unknown },
    };

    // The consumer's limits: reserve the estimate now, settle with the real usage at the end.
    let mut limit = None;
    if let Some(c) = consumer {
        let admitted = rt
            .limiter
            .admit(
                &c.name,
                deployment,
                &body,
                tokio::time::Instant::now(),
                std::time::SystemTime::now(),
            )
            .await
            .map_err(|r| {
                state
                    .metrics
                    .consumer_rejections
                    .get_or_create(&ConsumerRejectionLabels {
                        consumer: c.name.to_string(),
                        reason: r.reason(),
                    })
                    .inc();
                (None, 0, refusal(&c.name, r))
            })?;
        if let Some(admission) = admitted {
            // Settling needs a stream's usage: ask for it, and take it out again on the way back.
            let mut strip = false;
            if admission.counts_tokens
                && takes_usage_chunk(&route.path_and_query)
                && let Some(b) = usage::request_usage_chunk(&body)
            {
                body = b;
                strip = true;
            }
            limit = Some(Limit { admission, strip });
        }
    }

    let outbound = OutboundRequest {
        method: &parts.method,
        path_and_query: &route.path_and_query,
        deployment_span: route.deployment_span.clone(),
        model_in_body: route.model_in_body && model.is_some(),
        headers: &parts.headers,
        passthrough,
        body,
        request_id,
        upgrade,
        creates: creates(&parts.method, object.as_ref(), stored),
    };
    if parts.method == http::Method::GET && object.as_ref().is_some_and(|o| o.is_list()) {
        let collection = object.as_ref().map_or("", |o| o.collection);
        let result = merged_list(
            state,
            rt,
            &outbound,
            collection,
            caller.as_deref().filter(|_| isolated),
            &mut log.attempts_log,
        )
        .await;
        if let Some(l) = limit.take() {
            l.admission.settle(Some(0));
        }
        return Ok(Served {
            backend: None,
            attempts: 0,
            lease: None,
            limit: None,
            response: result.unwrap_or_else(|failed| failed),
            learner: None,
        });
    }
    let answer = rt
        .proxy
        .forward(&outbound, deployment, target, &mut log.attempts_log)
        .await;
    match answer.result {
        Ok(mut resp) => {
            let deleted = parts.method == http::Method::DELETE;
            let learnable = learns(object.as_ref(), &route.path_and_query, deleted, stored);
            // Most answers name no object, make none known and belong to no session.
            let remembers = !ids.is_empty() || session.is_some() || learnable || deleted;
            let learner = match answer.backend {
                Some(idx) if remembers && resp.status().is_success() => {
                    let owner = Owner {
                        backend: rt.proxy.backends[idx].name.clone(),
                        consumer: caller.filter(|_| isolated),
                    };
                    if let Some(key) = &session {
                        // Where the session was served is where it stays, moved or not.
                        state.sessions.put(
                            std::slice::from_ref(key),
                            &Owner {
                                backend: owner.backend.clone(),
                                consumer: None,
                            },
                        );
                    }
                    match &object {
                        Some(o) if deleted && o.exact => {
                            if let Some(id) = &o.id {
                                state.owners.forget(id);
                            }
                        }
                        // Whoever answered holds what the request named: found by a search,
                        // or made before the gateway saw it (known ones are only refreshed).
                        _ => state.owners.put(&ids, &owner),
                    }
                    learnable
                        .then(|| {
                            let ct = resp
                                .headers()
                                .get(header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok());
                            Learner::new(
                                state.owners.clone(),
                                owner,
                                ct,
                                resp.body().size_hint().exact(),
                            )
                        })
                        .flatten()
                }
                _ => None,
            };
            if let Some(l) = &limit {
                // The consumer's own headroom replaces the backend's.
                let h = resp.headers_mut();
                if let Some(r) = l.admission.remaining.requests {
                    h.insert("x-ratelimit-remaining-requests", HeaderValue::from(r));
                }
                if let Some(t) = l.admission.remaining.tokens {
                    h.insert("x-ratelimit-remaining-tokens", HeaderValue::from(t));
                }
            }
            Ok(Served {
                backend: answer.backend,
                attempts: answer.attempts,
                lease: answer.lease,
                limit,
                response: resp,
                learner,
            })
        }
        Err(e) => {
            tracing::warn!(request_id = request_id.to_str().unwrap_or(""), error = %e, "no backend answered");
            // Nothing was served: the reservation is given back, not charged.
            if let Some(l) = limit {
                l.admission.settle(Some(0));
            }
            Err((answer.backend, answer.attempts, e))
        }
    }
}

async fn read_body(
    body: RequestBody,
    headers: &http::HeaderMap,
    server: &crate::config::ServerConfig,
) -> Result<Bytes, GatewayError> {
    let max = server.max_body_bytes;
    let too_large = || {
        GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!(
                "request body exceeds the gateway's limit of {max} bytes (server.max_body_bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let body = match body {
        RequestBody::Full { body: b, .. } => {
            let b = b.unwrap_or_default();
            return if b.len() > max {
                Err(too_large())
            } else {
                Ok(b)
            };
        }
        RequestBody::Streaming(b) => b,
    };
    // Each frame within the gap limit, all of them within the body's: a client that stops
    // sending, or trickles, must not hold its connection (and its slot) for ever.
    let gap = server.header_read_timeout;
    let deadline = tokio::time::Instant::now() + server.body_read_timeout;
    let mut body = Limited::new(body, max);
    let mut parts: Vec<Bytes> = Vec::new();
    loop {
        let until = deadline.min(tokio::time::Instant::now() + gap);
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(too_large());
            }
            Ok(Some(Err(e))) => {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    format!("could not read the request body: {e}"),
                ));
            }
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::BodyTimeout,
                    crate::http1::server::body_late_message(gap, server.body_read_timeout),
                ));
            }
        };
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            parts.push(data);
        }
    }
    Ok(match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => parts.concat().into(),
    })
}

/// Where the objects a request names are.
enum Pinned {
    /// It names none: any backend.
    None,
    /// The backend holding them (one of the ids, for messages).
    Owner(usize, String),
    /// None of them has a known owner: ask the candidates.
    Search(Vec<String>),
}

/// The backend holding the objects `ids` names. With `[[consumers]]` (`caller` set), another
/// consumer's object is answered as one that does not exist.
async fn pin(
    owners: &Owners,
    rt: &Snapshot,
    ids: &[String],
    caller: Option<&str>,
) -> Result<Pinned, GatewayError> {
    if ids.is_empty() {
        return Ok(Pinned::None);
    }
    let mut held: Option<(Arc<str>, &String)> = None;
    let mut unknown = Vec::new();
    for id in ids {
        let Some(owner) = owners.get(id).await else {
            unknown.push(id.clone());
            continue;
        };
        if let Some(caller) = caller
            && owner.consumer.as_deref() != Some(caller)
        {
            return Err(crate::proxy::not_found(std::slice::from_ref(id)));
        }
        match &held {
            Some((backend, first)) if *backend != owner.backend => {
                return Err(GatewayError::new(
                    ErrorKind::ObjectsSplit,
                    format!(
                        "This request names objects held by different backends: '{first}' is on '{backend}', '{id}' on '{}'. Objects can only be used together where they were made.",
                        owner.backend
                    ),
                ));
            }
            Some(_) => {}
            None => held = Some((owner.backend, id)),
        }
    }
    let Some((backend, id)) = held else {
        return Ok(Pinned::Search(unknown));
    };
    match rt.proxy.backends.iter().position(|b| b.name == backend) {
        Some(idx) => Ok(Pinned::Owner(idx, id.clone())),
        None => Err(GatewayError::new(
            ErrorKind::OwnerGone,
            format!(
                "'{id}' is held by backend '{backend}', which is no longer configured: the object cannot be reached."
            ),
        )),
    }
}

/// A list endpoint (`GET /openai/files`, ...) answered with every backend's objects, merged
/// and paged as one list; with consumers (`caller` set), only the caller's own objects.
async fn merged_list(
    state: &GatewayState,
    rt: &Snapshot,
    req: &crate::upstream::OutboundRequest<'_>,
    collection: &str,
    caller: Option<&str>,
    log: &mut AttemptLog,
) -> Result<Response<BoxBody>, Response<BoxBody>> {
    let pages = rt.proxy.list_all(req, log).await?;
    let mut items = Vec::new();
    for (idx, data) in pages {
        let backend = rt.proxy.backends[idx].name.clone();
        for item in data {
            let Some(id) = item.get("id").and_then(|i| i.as_str()) else {
                continue;
            };
            let known = state.owners.get(id).await;
            match (caller, known) {
                // Objects no consumer is known to have made are nobody's to list.
                (Some(caller), Some(o)) if o.consumer.as_deref() == Some(caller) => {}
                (Some(_), _) => continue,
                (None, Some(_)) => {}
                // Remembered here only: a long list would flood the shared store's queue,
                // and a search finds any of them again.
                (None, None) => state.owners.remember(
                    &[id.to_string()],
                    &Owner {
                        backend: backend.clone(),
                        consumer: None,
                    },
                ),
            }
            items.push(item);
        }
    }
    let query = req.path_and_query.split_once('?').map_or("", |(_, q)| q);
    let page = refs::merge_page(collection, query, items);
    let mut resp = Response::new(crate::body::full(Bytes::from(page.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// The request's session key: the first of `keys` it carries (a header, or a top-level string
/// field of its JSON body), at most 256 characters of it.
fn session_key(
    keys: &[crate::config::AffinityKey],
    headers: &http::HeaderMap,
    passthrough: &[u8],
    body: &[u8],
) -> Option<String> {
    let mut parsed: Option<Option<serde_json::Value>> = None;
    for k in keys {
        let found = match k {
            // Headers the gateway has no use for stay in the raw lines passed on as sent.
            crate::config::AffinityKey::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .or_else(|| raw_header(passthrough, name.as_str()))
                .map(str::to_string),
            crate::config::AffinityKey::Body(field) => {
                let quoted = format!("\"{field}\"");
                if memchr::memmem::find(body, quoted.as_bytes()).is_none() {
                    continue;
                }
                parsed
                    .get_or_insert_with(|| serde_json::from_slice(body).ok())
                    .as_ref()
                    .and_then(|v| v.get(field))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            }
        };
        if let Some(v) = found.filter(|v| !v.trim().is_empty()) {
            return Some(first_chars(&v, 256).to_string());
        }
    }
    None
}

/// The value of header `name` among raw `name: value\r\n` lines.
fn raw_header<'a>(lines: &'a [u8], name: &str) -> Option<&'a str> {
    lines.split(|b| *b == b'\n').find_map(|line| {
        let colon = memchr::memchr(b':', line)?;
        line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| std::str::from_utf8(line[colon + 1..].trim_ascii()).ok())
            .flatten()
    })
}

/// A `multipart/form-data` body's content type.
fn form_type(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::CONTENT_TYPE)?;
    // Checked on the bytes first: most bodies are JSON, and `to_str` reads the whole value.
    let form = v
        .as_bytes()
        .get(..19)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"multipart/form-data"));
    form.then(|| v.to_str().ok()).flatten()
}

/// Only chat completions and completions have `stream_options.include_usage`; the Responses
/// API reports usage by itself and refuses the option.
fn takes_usage_chunk(path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or("");
    path.ends_with("/chat/completions") || path.ends_with("/completions")
}

/// Whether a request makes an object on the backend that gets it: a POST about stored
/// objects (a file, a batch, a run, a stored response ...), a chat completion only when the
/// backend keeps it. Conservative: a POST that only changes one (`cancel`) counts too.
fn creates(method: &http::Method, object: Option<&refs::PathObject<'_>>, stored: bool) -> bool {
    *method == http::Method::POST
        && match object {
            Some(o) if o.collection == "chat/completions" => o.id.is_none() && stored,
            Some(_) => true,
            None => false,
        }
}

/// Whether an answer is read for the objects it makes known: answers about stored objects
/// (not a file's raw content, not a delete), and chat completions only when the backend keeps
/// them (`stored`: `"store": true`): the rest of the traffic, most of it, passes unread.
fn learns(object: Option<&refs::PathObject<'_>>, path: &str, deleted: bool, stored: bool) -> bool {
    match object {
        _ if deleted => false,
        Some(o) if o.collection == "chat/completions" => o.id.is_none() && stored,
        Some(_) => !path.split('?').next().unwrap_or("").ends_with("/content"),
        None => false,
    }
}

/// The methods the API uses are forwarded, no others (TRACE would echo the backend's
/// credential back); an HTTP/1.1 request names exactly one valid `Host` (RFC 9112 §3.2),
/// checked here for what hyper read (`host_unchecked`).
fn check_head(parts: &http::request::Parts, host_unchecked: bool) -> Result<(), GatewayError> {
    use http::Method;
    if !matches!(
        parts.method,
        Method::GET | Method::POST | Method::DELETE | Method::PUT | Method::PATCH
    ) {
        let shown = first_chars(parts.method.as_str(), 32);
        return Err(GatewayError::new(
            ErrorKind::MethodNotAllowed,
            format!("the method {shown} is not allowed: use GET, POST, PUT, PATCH or DELETE"),
        ));
    }
    if host_unchecked && parts.version == http::Version::HTTP_11 {
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let valid = match (hosts.next(), hosts.next()) {
            (Some(host), None) => crate::http1::server::valid_host(host.as_bytes()),
            _ => false,
        };
        if !valid {
            return Err(GatewayError::new(
                ErrorKind::BadRequest,
                crate::http1::server::NO_HOST,
            ));
        }
    }
    Ok(())
}

/// Whether the body is declared as JSON (`application/json`, parameters aside).
fn is_json(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let ct = v.as_bytes();
        let essence = memchr::memchr(b';', ct).map_or(ct, |i| &ct[..i]);
        essence
            .trim_ascii()
            .eq_ignore_ascii_case(b"application/json")
    })
}

/// Why a v1 body's `model` could not be read.
enum BodyModel {
    NotJson,
    /// Two `model` keys: parsers differ on which one counts.
    Repeated,
}

/// The `model` of a v1 JSON body: the deployment it asks for. Only the one field is decoded.
/// `Err` when the body is not JSON at all (the parse reads the whole document).
fn model_of(body: &[u8]) -> Result<Option<String>, BodyModel> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    let peek: Peek<'_> = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() && e.to_string().starts_with("duplicate field `model`") {
            BodyModel::Repeated
        } else {
            BodyModel::NotJson
        }
    })?;
    Ok(peek
        .model
        .filter(|m| !m.is_empty() && m.len() <= 256)
        .map(|m| m.into_owned()))
}

/// Keeps the client's `x-request-id` when it is a sane token, else makes one.
fn request_id(headers: &http::HeaderMap, ids: &crate::ids::IdGen) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let ok =
            v.len() <= 128 && !v.is_empty() && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    HeaderValue::from_bytes(&ids.uuid_v4_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Joins the client's and the backend's upgraded connections once both sides have switched.
fn tunnel(state: &GatewayState, client: hyper::upgrade::OnUpgrade, resp: &mut Response<BoxBody>) {
    let backend = hyper::upgrade::on(resp);
    let shutdown = state.shutdown.clone();
    let grace = state.grace;
    state.tasks.spawn(async move {
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut backend = TokioIo::new(backend);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "websocket tunnel closed with an error");
                }
            }
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::info!("closing a websocket tunnel at the end of the shutdown grace period");
            }
        }
    });
}

/// Ends a request's accounting when its body is done: finished, failed or dropped because the
/// client went away. A stream counts as in flight until then.
struct RequestGuard {
    metrics: Arc<Metrics>,
    /// The serving backend's name (`none` when none answered), once the answer is known.
    backend: Option<Arc<str>>,
    started: Instant,
    /// The serving backend's in-flight slot; released when the body ends or is dropped.
    _lease: Option<Lease>,
    consumer: Arc<str>,
    /// The request's counters, once its labels are known.
    counters: Option<RequestCounters>,
    success: bool,
    /// Settled when the body ends; dropped unsettled (estimate kept) if it never does.
    reservation: Option<Admission>,
    /// Reads usage from the body as it passes.
    tap: Option<Tap>,
    finished: bool,
    log: AccessLog,
    /// The serving backend's totals, for the status page.
    stats: Option<Arc<BackendStats>>,
    /// Set for sampled traces: takes the request's spans when it ends.
    tracer: Option<Arc<Tracer>>,
    /// The backend's body failed after the headers went out.
    stream_failed: bool,
    /// Remembers the owners of the objects the answer makes known.
    learner: Option<Learner>,
}

/// What the access log line says of a request, written when its response ends.
struct AccessLog {
    request_id: HeaderValue,
    method: http::Method,
    /// Only its path is written: a query string may carry a key (`subscription-key=`).
    uri: http::Uri,
    deployment: Option<String>,
    status: u16,
    attempts: u32,
    /// Every attempt, and the time spent waiting on backends.
    attempts_log: AttemptLog,
    first_byte: Duration,
    /// When the request arrived, for span timestamps.
    wall_start: SystemTime,
    /// `gen_ai.operation.name`, for known Azure OpenAI operations.
    operation: Option<&'static str>,
    /// The request's generation parameters, read only for sampled traces.
    params: Option<RequestParams>,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            request_id: HeaderValue::from_static(""),
            method: http::Method::GET,
            uri: http::Uri::default(),
            deployment: None,
            status: 0,
            attempts: 0,
            attempts_log: AttemptLog::default(),
            first_byte: Duration::ZERO,
            wall_start: UNIX_EPOCH,
            operation: None,
            params: None,
        }
    }
}

/// What the GenAI conventions record of a request's parameters.
#[derive(Debug, Default, serde::Deserialize)]
struct RequestParams {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
}

impl RequestGuard {
    /// The response body ended: count its tokens and settle the consumer's reservation.
    fn finish(&mut self, usage: Option<Usage>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(l) = self.learner.as_mut() {
            l.finish();
        }
        let l = &self.log;
        tracing::info!(
            target: "switchyard::access",
            request_id = l.request_id.to_str().unwrap_or(""),
            method = %l.method,
            path = first_chars(l.uri.path(), 256),
            deployment = l.deployment.as_deref().unwrap_or("-"),
            consumer = %self.consumer,
            status = l.status,
            backend = self.backend.as_deref().unwrap_or("none"),
            attempts = l.attempts,
            tried = %l.attempts_log.tried,
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            cached_tokens = usage.map(|u| u.cached_tokens),
            reasoning_tokens = usage.map(|u| u.reasoning_tokens),
            first_byte_ms = l.first_byte.as_secs_f64() * 1000.0,
            total_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        if let Some(u) = usage {
            if let Some(s) = &self.stats {
                BackendStats::add(&s.tokens, u.total_tokens);
            }
            if let Some(c) = &self.counters {
                c.add_tokens(&self.metrics, u.prompt_tokens, u.completion_tokens);
            }
        }
        if let Some(tracer) = self.tracer.take() {
            self.record_spans(&tracer, usage);
        }
        if let Some(r) = self.reservation.take() {
            // A failed answer used nothing; a good one without readable usage keeps the estimate.
            let used = if self.success {
                usage.map(|u| u.total_tokens)
            } else {
                Some(0)
            };
            r.settle(used);
        }
    }
}

impl RequestGuard {
    /// The request's SERVER span and a CLIENT span per attempt, with the GenAI attributes.
    fn record_spans(&mut self, tracer: &Tracer, usage: Option<Usage>) {
        let l = &mut self.log;
        let Some(ctx) = l.attempts_log.trace else {
            return;
        };
        let provider = || -> [(&'static str, Attr); 2] {
            [
                ("gen_ai.provider.name", "azure.ai.openai".into()),
                // The older name, which many backends for GenAI traces still read.
                ("gen_ai.system", "az.ai.openai".into()),
            ]
        };
        let name = |model: Option<&str>| match (l.operation, model) {
            (Some(op), Some(m)) => format!("{op} {m}"),
            (Some(op), None) => op.to_string(),
            (None, _) => l.method.to_string(),
        };
        let mut attrs: Vec<(&'static str, Attr)> = Vec::with_capacity(20);
        if let Some(op) = l.operation {
            attrs.push(("gen_ai.operation.name", op.into()));
            attrs.extend(provider());
        }
        if let Some(d) = &l.deployment {
            attrs.push(("gen_ai.request.model", d.clone().into()));
        }
        if let Some(p) = &l.params {
            if let Some(n) = p.max_tokens.or(p.max_completion_tokens) {
                attrs.push(("gen_ai.request.max_tokens", n.into()));
            }
            if let Some(t) = p.temperature {
                attrs.push(("gen_ai.request.temperature", t.into()));
            }
            if let Some(t) = p.top_p {
                attrs.push(("gen_ai.request.top_p", t.into()));
            }
        }
        if let Some(u) = usage {
            attrs.push(("gen_ai.usage.input_tokens", u.prompt_tokens.into()));
            attrs.push(("gen_ai.usage.output_tokens", u.completion_tokens.into()));
            attrs.push((
                "gen_ai.usage.cache_read.input_tokens",
                u.cached_tokens.into(),
            ));
            attrs.push(("gen_ai.usage.reasoning_tokens", u.reasoning_tokens.into()));
        }
        attrs.push(("http.request.method", l.method.to_string().into()));
        attrs.push((
            "url.path",
            first_chars(l.uri.path(), 256).to_string().into(),
        ));
        attrs.push(("http.response.status_code", u64::from(l.status).into()));
        attrs.push((
            "switchyard.request_id",
            l.request_id.to_str().unwrap_or("").to_string().into(),
        ));
        attrs.push(("switchyard.consumer", self.consumer.to_string().into()));
        if let Some(b) = &self.backend {
            attrs.push(("switchyard.backend", b.to_string().into()));
        }
        attrs.push(("switchyard.attempts", u64::from(l.attempts).into()));
        let error = if self.stream_failed {
            Some("stream_error".to_string())
        } else if l.status >= 500 {
            Some(l.status.to_string())
        } else {
            None
        };
        if let Some(e) = &error {
            attrs.push(("error.type", e.clone().into()));
        }
        tracer.record(Span {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent: ctx.parent,
            name: name(l.deployment.as_deref()),
            kind: SpanKind::Server,
            start: l.wall_start,
            end: l.wall_start + self.started.elapsed(),
            attributes: attrs,
            error,
        });
        for a in std::mem::take(&mut l.attempts_log.spans) {
            let model = a.model.as_deref().or(l.deployment.as_deref());
            let mut attrs: Vec<(&'static str, Attr)> = Vec::with_capacity(12);
            if let Some(op) = l.operation {
                attrs.push(("gen_ai.operation.name", op.into()));
                attrs.extend(provider());
            }
            if let Some(m) = model {
                attrs.push(("gen_ai.request.model", m.into()));
            }
            attrs.push(("server.address", a.host.clone().into()));
            attrs.push(("server.port", u64::from(a.port).into()));
            attrs.push(("switchyard.backend", a.backend.to_string().into()));
            attrs.push(("switchyard.attempt", u64::from(a.attempt).into()));
            let error = match a.outcome {
                Ok(status) => {
                    attrs.push(("http.response.status_code", u64::from(status).into()));
                    (status >= 400).then(|| status.to_string())
                }
                Err(label) => Some(label.to_string()),
            };
            if let Some(e) = &error {
                attrs.push(("error.type", e.clone().into()));
            }
            tracer.record(Span {
                trace_id: ctx.trace_id,
                span_id: a.span_id,
                parent: Some(ctx.span_id),
                name: name(model),
                kind: SpanKind::Client,
                start: a.start,
                end: a.start + a.duration,
                attributes: attrs,
                error,
            });
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // hyper stops polling a body once its content-length is written, so the end is often
        // seen here: settle with whatever usage the tap read.
        if !self.finished {
            let usage = self.tap.as_ref().and_then(Tap::usage);
            self.finish(usage);
        }
        self.metrics.in_flight.dec();
        // Empty when the client left before any answer: nothing was served, nothing to time.
        if let Some(s) = &self.stats {
            s.duration_histogram
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body as the client gets it. If the backend fails after the headers went out,
    /// an event stream gets a final SSE `error` event (and no `[DONE]`), so SDKs raise an error
    /// instead of taking a cut stream for a complete one; other bodies are cut off.
    struct TrackedBody {
        #[pin]
        inner: BoxBody,
        sse: bool,
        ended: bool,
        guard: RequestGuard,
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.ended {
                return Poll::Ready(None);
            }
            let polled = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(p) => p,
            };
            match polled {
                Some(Ok(frame)) => {
                    if let (Some(l), Some(data)) = (this.guard.learner.as_mut(), frame.data_ref()) {
                        l.feed(data);
                    }
                    let frame = match (frame.into_data(), this.guard.tap.as_mut()) {
                        (Ok(data), Some(tap)) => {
                            let out = tap.feed(data);
                            if out.is_empty() {
                                continue; // part of an event held until it is whole
                            }
                            Frame::data(out)
                        }
                        (Ok(data), None) => Frame::data(data),
                        (Err(other), _) => other,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                None => {
                    *this.ended = true;
                    let (rest, usage) = match this.guard.tap.as_mut() {
                        Some(tap) => tap.finish(),
                        None => (Bytes::new(), None),
                    };
                    this.guard.finish(usage);
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Some(Err(e)) => {
                    this.guard.stream_failed = true;
                    let backend = this.guard.backend.as_deref().unwrap_or("none");
                    tracing::warn!(backend, error = %e, "response body failed mid-stream");
                    this.guard
                        .metrics
                        .stream_errors
                        .get_or_create(&BackendLabels {
                            backend: backend.to_string(),
                        })
                        .inc();
                    if !*this.sse {
                        return Poll::Ready(Some(Err(e)));
                    }
                    *this.ended = true;
                    let body = crate::error::openai_error_body(
                        "backend_stream_error",
                        &format!("The backend's stream broke off: {e}"),
                        "gateway_error",
                    );
                    let mut event = Vec::with_capacity(body.len() + 8);
                    event.extend_from_slice(b"data: ");
                    event.extend_from_slice(&body);
                    event.extend_from_slice(b"\n\n");
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Only once the end was seen here: a body that says it is complete would otherwise not
        // be polled to its end, and the tap and the limits would never hear it ended.
        self.ended
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The headers the gateway sets on every answer (`x-request-id`, and `x-switchyard-backend` and
/// `-attempts` when a backend was tried), as lines ahead of those passed on from the backend:
/// cheaper than three inserts into the response's map, a name hash and a probe each
/// (bench/results/profile-2026-11-26.md). A backend's own headers of these names never get this far (the
/// backend clients drop them).
fn own_lines(
    request_id: &HeaderValue,
    backend: Option<&HeaderValue>,
    attempts: u32,
    passed: Option<RawHeaders>,
) -> RawHeaders {
    let (passed, date) = passed.map_or((Bytes::new(), false), |r| (r.lines, r.date));
    let mut digits = [0u8; 20];
    let attempts =
        (attempts > 0).then(|| crate::upstream::decimal(u64::from(attempts), &mut digits));
    let mut out = BytesMut::with_capacity(
        request_id.len()
            + backend.map_or(0, |b| b.len())
            + attempts.map_or(0, <[u8]>::len)
            + passed.len()
            + 80,
    );
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    line(b"x-request-id: ", request_id.as_bytes());
    if let Some(b) = backend {
        line(b"x-switchyard-backend: ", b.as_bytes());
    }
    if let Some(n) = attempts {
        line(b"x-switchyard-attempts: ", n);
    }
    out.extend_from_slice(&passed);
    RawHeaders {
        lines: out.freeze(),
        date,
    }
}

/// The consumer of a request no key or token named: one shared name, not one per request.
fn anonymous() -> Arc<str> {
    static DASH: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));
    DASH.clone()
}

/// The first `n` characters of `s` (a bound for what logs repeat of the client's input).
fn first_chars(s: &str, n: usize) -> &str {
    // One byte or more per character: short strings fit whole, without counting.
    if s.len() <= n {
        return s;
    }
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_answers_about_stored_objects_are_read() {
        let learns = |path: &str, deleted: bool, body: &str| {
            let object = super::refs::path_object(path);
            let stored = super::refs::body_refs(body.as_bytes(), false, true).stored;
            super::learns(object.as_ref(), path, deleted, stored)
        };
        let chat = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
        assert!(!learns(chat, false, r#"{"messages":[]}"#));
        assert!(!learns(
            "/openai/v1/chat/completions",
            false,
            r#"{"store":false}"#
        ));
        assert!(learns(
            "/openai/v1/chat/completions",
            false,
            r#"{"store":true}"#
        ));
        assert!(!learns("/openai/v1/chat/completions/chatcmpl-1", false, ""));
        assert!(!learns("/openai/v1/embeddings", false, r#"{"input":"x"}"#));
        assert!(learns("/openai/v1/responses", false, r#"{"input":"x"}"#));
        assert!(learns("/openai/files?api-version=x", false, ""));
        assert!(!learns("/openai/files/file-1/content", false, ""));
        assert!(!learns("/openai/v1/responses/resp_1", true, ""));
    }

    #[test]
    fn first_chars_cuts_on_character_boundaries() {
        assert_eq!(super::first_chars("abc", 5), "abc");
        assert_eq!(super::first_chars("abcdef", 3), "abc");
        assert_eq!(super::first_chars("ééé", 2), "éé");
        assert_eq!(super::first_chars("éé", 2), "éé");
    }
}
