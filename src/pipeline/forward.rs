//! The forward phase: the request goes to a backend through the attempt loop
//! ([`crate::proxy::Proxy::forward`], the only place retries live, awaited in
//! [`super::serve`]), or, for a list of stored objects, to every backend, merged into one list.
//! A good answer teaches the gateway who holds the objects it names or makes, and where a
//! session was served.

use http::Response;
use http::header::{self, HeaderValue};
use http_body::Body;

use crate::affinity::{Learner, Owner, refs};
use crate::body::BoxBody;
use crate::live::{GatewayState, Snapshot};
use crate::proxy::{Answer, AttemptLog, Target};
use crate::upstream::OutboundRequest;

use super::admit::Limit;
use super::read::{Inbound, Payload};
use super::route::Placement;
use super::{Failed, Served};

/// The request as the attempt loop sends it.
pub(super) fn outbound<'a>(
    inbound: &'a Inbound<'_>,
    payload: Payload,
    place: &Placement<'_>,
    request_id: &'a HeaderValue,
) -> OutboundRequest<'a> {
    let parts = inbound.parts;
    let endpoint = &inbound.endpoint;
    OutboundRequest {
        method: &parts.method,
        path_and_query: &endpoint.path_and_query,
        deployment_span: endpoint.deployment_span.clone(),
        model_in_body: endpoint.model_in_body && inbound.model.is_some(),
        headers: &parts.headers,
        passthrough: payload.passthrough,
        body: payload.body,
        request_id,
        upgrade: inbound.upgrade,
        creates: creates(&parts.method, place.object.as_ref(), place.stored),
    }
}

/// The deployment a request asks for and its fallbacks, when it may be served by them: not
/// for a consumer that turned them off (`consumers[].fallbacks = false`), nor for a search of
/// the backends for objects no owner is known for.
pub(super) fn chain<'s, 'a>(
    snap: &'s Snapshot,
    inbound: &'a Inbound<'_>,
    place: &Placement<'_>,
    consumer: Option<&crate::auth::inbound::Consumer>,
) -> Option<(&'a str, &'s crate::routing::Fallbacks)> {
    let asked = inbound.deployment()?;
    let chain = snap.proxy.fallbacks(Some(asked))?;
    if consumer.is_some_and(|c| !c.fallbacks) || matches!(place.target(), Target::Search { .. }) {
        return None;
    }
    Some((asked, chain))
}

/// The collection a request lists (`GET /openai/files`, ...), answered with every backend's
/// objects rather than one backend's.
pub(super) fn listed(inbound: &Inbound<'_>, place: &Placement<'_>) -> Option<&'static str> {
    place
        .object
        .as_ref()
        .filter(|o| inbound.parts.method == http::Method::GET && o.is_list())
        .map(|o| o.collection)
}

/// Every backend's objects of `collection`, merged into one list.
pub(super) async fn list(
    state: &GatewayState,
    snap: &Snapshot,
    outbound: &OutboundRequest<'_>,
    collection: &str,
    place: &Placement<'_>,
    limit: Option<Limit>,
    log: &mut AttemptLog,
) -> Served {
    let result = merged_list(
        state,
        snap,
        outbound,
        collection,
        place.owner_consumer.as_deref(),
        log,
    )
    .await;
    if let Some(l) = limit {
        l.admission.settle(Some(crate::limits::Used::default()));
    }
    Served::gateway(result.unwrap_or_else(|failed| failed))
}

/// What the attempt loop's answer makes of the request: the answer to pass on, with the
/// consumer's headroom; or, when no backend answered, the reservation given back.
pub(super) fn answered(
    state: &GatewayState,
    snap: &Snapshot,
    inbound: &Inbound<'_>,
    place: &Placement<'_>,
    limit: Option<Limit>,
    answer: Answer,
    request_id: &HeaderValue,
) -> Result<Served, Failed> {
    match answer.result {
        Ok(mut resp) => {
            let learner = answer
                .backend
                .filter(|_| resp.status().is_success())
                .and_then(|idx| learn(state, snap, inbound, place, idx, &resp));
            if let Some(l) = &limit {
                // The consumer's own headroom replaces the backend's.
                let h = resp.headers_mut();
                if let Some(r) = l.admission.remaining.requests {
                    h.insert("x-ratelimit-remaining-requests", HeaderValue::from(r));
                }
                if let Some(t) = l.admission.remaining.tokens {
                    h.insert("x-ratelimit-remaining-tokens", HeaderValue::from(t));
                }
                if let Some((left, _)) = l.admission.remaining.budget
                    && let Ok(v) = HeaderValue::from_str(&format!("{:.6}", left as f64 / 1e6))
                {
                    h.insert("x-ratelimit-remaining-budget", v);
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
        Err(error) => {
            // Throttling is capacity doing its job, not a fault to warn of.
            let id = request_id.to_str().unwrap_or("");
            if error.kind == crate::error::ErrorKind::AllThrottled
                || error.kind == crate::error::ErrorKind::OwnerThrottled
            {
                tracing::info!(request_id = id, error = %error, "no backend answered");
            } else {
                tracing::warn!(request_id = id, error = %error, "no backend answered");
            }
            // Nothing was served: the reservation is given back, not charged.
            if let Some(l) = limit {
                l.admission.settle(Some(crate::limits::Used::default()));
            }
            Err(Failed {
                backend: answer.backend,
                attempts: answer.attempts,
                error,
            })
        }
    }
}

/// What backend `idx`'s good answer teaches: who holds the objects the request named (found
/// by a search, or made before the gateway saw them), that a deleted one is gone, where the
/// session was served; and, for answers that make objects known, a [`Learner`] to read them.
fn learn(
    state: &GatewayState,
    snap: &Snapshot,
    inbound: &Inbound<'_>,
    place: &Placement<'_>,
    idx: usize,
    resp: &Response<BoxBody>,
) -> Option<Learner> {
    let deleted = inbound.parts.method == http::Method::DELETE;
    let object = place.object.as_ref();
    let learnable = learns(
        object,
        &inbound.endpoint.path_and_query,
        deleted,
        place.stored,
    );
    // Most answers name no object, make none known and belong to no session.
    if place.ids.is_empty() && place.session.is_none() && !learnable && !deleted {
        return None;
    }
    let owner = Owner {
        backend: snap.proxy.backends[idx].name.clone(),
        consumer: place.owner_consumer.clone(),
    };
    if let Some(key) = &place.session {
        // Where the session was served is where it stays, moved or not.
        state.sessions.put(
            std::slice::from_ref(key),
            &Owner {
                backend: owner.backend.clone(),
                consumer: None,
            },
        );
    }
    match object {
        Some(o) if deleted && o.exact => {
            if let Some(id) = &o.id {
                state.owners.forget(id);
            }
        }
        // Whoever answered holds what the request named: found by a search, or made before
        // the gateway saw it (known ones are only refreshed).
        _ => state.owners.put(&place.ids, &owner),
    }
    if !learnable {
        return None;
    }
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
}

/// A list endpoint (`GET /openai/files`, ...) answered with every backend's objects, merged
/// and paged as one list; with consumers (`caller` set), only the caller's own objects.
async fn merged_list(
    state: &GatewayState,
    snap: &Snapshot,
    req: &OutboundRequest<'_>,
    collection: &str,
    caller: Option<&str>,
    log: &mut AttemptLog,
) -> Result<Response<BoxBody>, Response<BoxBody>> {
    let pages = snap.proxy.list_all(req, log).await?;
    let mut items = Vec::new();
    for (idx, data) in pages {
        let backend = snap.proxy.backends[idx].name.clone();
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
    Ok(super::json(&page))
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

#[cfg(test)]
mod tests {
    use super::refs;

    #[test]
    fn only_answers_about_stored_objects_are_read() {
        let learns = |path: &str, deleted: bool, body: &str| {
            let object = refs::path_object(path);
            let stored = refs::body_refs(body.as_bytes(), false, true).stored;
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
}
