//! The client request path, one phase a file, in the order a request meets them:
//!
//! 1. `RequestContext::start` (`context.rs`): the request id, the trace, in flight;
//! 2. `authenticate`: who is calling (a key or an Entra token), before anything else is read;
//! 3. `read::read`: the head checked, the path classified (`crate::api`), the body read, the
//!    deployment found;
//! 4. `admit::allowed`: the deployment is one the consumer may use; `models::answer`: the
//!    model list, which the gateway answers itself;
//! 5. `route::route`: the backend that holds the objects the request names, or the one its
//!    session prefers, or any;
//! 6. `admit::admit`: the consumer's limits checked and an estimate reserved;
//! 7. forward (`forward.rs`): the attempt loop (`crate::proxy`, the only place retries live),
//!    or a list merged from every backend, and what a good answer teaches about object owners
//!    and sessions;
//! 8. `respond::respond`: counters, the gateway's own headers, usage read as the body passes,
//!    WebSocket upgrades tunnelled;
//! 9. `RequestContext::finish` (`finish.rs`), when the body ends or the client goes away:
//!    access log, token metrics, the usage ledger, OTLP metrics, spans, and the reservation
//!    settled, in one place.

mod admit;
mod context;
mod finish;
mod forward;
mod models;
mod read;
mod respond;
mod route;

use std::convert::Infallible;
use std::sync::Arc;

use http::header;
use http::{Request, Response};

use crate::affinity::Learner;
use crate::auth::inbound::Consumer;
use crate::balancer::Lease;
use crate::body::{BoxBody, RequestBody};
use crate::error::{ErrorKind, GatewayError};
use crate::live::{GatewayState, Snapshot};

use context::RequestContext;

/// Serves one client request. Never fails: every error is an OpenAI-shaped answer.
pub async fn handle(
    state: Arc<GatewayState>,
    mut req: Request<RequestBody>,
) -> Result<Response<BoxBody>, Infallible> {
    // Made before the first await: if the client goes away while attempts run, hyper drops
    // this future and the context still ends the request's accounting.
    let mut ctx = RequestContext::start(&state, &req);
    let client_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    // The config as of now, for the whole request: a reload does not change it half-way.
    let snap = state.snapshot();
    let outcome = serve(&state, &snap, req, &mut ctx).await;
    let resp = respond::respond(&state, &snap, &mut ctx, outcome, client_upgrade);
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, respond::track(body, ctx)))
}

/// The phases up to a backend's answer.
async fn serve(
    state: &GatewayState,
    snap: &Snapshot,
    req: Request<RequestBody>,
    ctx: &mut RequestContext,
) -> Result<Served, Failed> {
    let consumer = authenticate(snap, &req, ctx).await?;
    if state.shutdown.is_cancelled() {
        return Err(
            GatewayError::new(ErrorKind::ShuttingDown, "the gateway is shutting down").into(),
        );
    }
    let (parts, body) = req.into_parts();
    let (inbound, payload) = read::read(snap, &parts, body, consumer.as_ref(), ctx).await?;
    admit::allowed(consumer.as_ref(), &inbound)?;
    if let Some(list) = models::answer(snap, &inbound, consumer.as_ref()) {
        return list.map(Served::gateway).map_err(Failed::from);
    }
    let place = route::route(state, snap, &inbound, &payload, consumer.as_ref()).await?;
    let limit = admit::admit(state, snap, consumer.as_ref(), &inbound, &payload.body).await?;
    let outbound = forward::outbound(&inbound, payload, &place, &ctx.request_id);
    if let Some(collection) = forward::listed(&inbound, &place) {
        let log = &mut ctx.attempts_log;
        return Ok(forward::list(state, snap, &outbound, collection, &place, limit, log).await);
    }
    // The attempt loop, the only place retries live; with fallbacks, one round a deployment.
    let log = &mut ctx.attempts_log;
    let mut limit = limit;
    let answer = match forward::chain(snap, &inbound, &place, consumer.as_ref()) {
        Some((asked, chain)) => {
            let mut gate = admit::FallbackGate {
                state,
                snap,
                consumer: consumer.as_ref(),
                body: &outbound.body,
                limit: &mut limit,
            };
            let target = place.target();
            let proxy = &snap.proxy;
            proxy
                .forward_chain(&outbound, asked, chain, target, log, &mut gate)
                .await
        }
        None => {
            let round = snap.proxy.round(inbound.deployment());
            snap.proxy
                .forward(&outbound, round, place.target(), log)
                .await
        }
    };
    if let Some(d) = &answer.fallback {
        ctx.requested = ctx.deployment.replace(d.to_string());
    }
    forward::answered(
        state,
        snap,
        &inbound,
        &place,
        limit,
        answer,
        &ctx.request_id,
    )
}

/// Who is calling: a consumer's key, an Entra token, or no one where neither is configured.
async fn authenticate(
    snap: &Snapshot,
    req: &Request<RequestBody>,
    ctx: &mut RequestContext,
) -> Result<Option<Consumer>, GatewayError> {
    let consumer = snap.auth.authenticate(req.headers()).await?;
    if let Some(c) = &consumer {
        ctx.consumer = c.name.clone();
    }
    Ok(consumer)
}

/// A backend's answer (or the gateway's merged list), and what the request holds until its
/// body ends.
struct Served {
    backend: Option<usize>,
    attempts: u32,
    lease: Option<Lease>,
    limit: Option<admit::Limit>,
    response: Response<BoxBody>,
    /// Remembers the owner of the objects the answer makes known.
    learner: Option<Learner>,
}

/// No answer to pass on: the gateway's own error, after `attempts` tries (the last on
/// `backend`, when one was tried).
struct Failed {
    backend: Option<usize>,
    attempts: u32,
    error: GatewayError,
}

impl Served {
    /// An answer the gateway made itself.
    fn gateway(response: Response<BoxBody>) -> Served {
        Served {
            backend: None,
            attempts: 0,
            lease: None,
            limit: None,
            response,
            learner: None,
        }
    }
}

/// An answer of the gateway's own: 200, `value` as JSON.
fn json(value: &serde_json::Value) -> Response<BoxBody> {
    let mut resp = Response::new(crate::body::full(value.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

impl From<GatewayError> for Failed {
    fn from(error: GatewayError) -> Failed {
        Failed {
            backend: None,
            attempts: 0,
            error,
        }
    }
}
