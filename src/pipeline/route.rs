//! The route phase: where a request may go. A request about stored objects (a response, a
//! file, a batch ...) goes to the backend that holds them, or searches for them; one carrying a
//! session key (`routing.affinity_key`) prefers the backend its session was served by; any
//! other, whichever backend the balancer picks.

use std::sync::Arc;

use crate::affinity::{Owners, refs};
use crate::auth::inbound::Consumer;
use crate::error::{ErrorKind, GatewayError};
use crate::live::{GatewayState, Snapshot};
use crate::proxy::Target;

use super::context::first_chars;
use super::read::{Inbound, Payload, form_type};

/// Where a request may be served, and what the answer should teach the gateway.
pub(super) struct Placement<'a> {
    /// The stored-object family the path is about, and the object it names.
    pub(super) object: Option<refs::PathObject<'a>>,
    /// Every stored object the request names (path and body).
    pub(super) ids: Vec<String>,
    /// The backend keeps the answer (a stored chat completion).
    pub(super) stored: bool,
    /// With `[[consumers]]`, objects are their makers' own: the caller, to check and record.
    pub(super) owner_consumer: Option<Arc<str>>,
    /// The request's session key, when it has one and names no object.
    pub(super) session: Option<String>,
    pinned: Pinned,
    /// The backend the session was last served by (or its rendezvous choice).
    preferred: Option<usize>,
}

impl Placement<'_> {
    /// What the attempt loop is asked to do.
    pub(super) fn target(&self) -> Target<'_> {
        match &self.pinned {
            Pinned::None => self
                .preferred
                .map_or(Target::Any, |backend| Target::Prefer { backend }),
            Pinned::Owner(backend, id) => Target::Owner {
                backend: *backend,
                id,
            },
            Pinned::Search(unknown) => Target::Search { ids: unknown },
        }
    }
}

pub(super) async fn route<'a>(
    state: &GatewayState,
    snap: &Snapshot,
    inbound: &'a Inbound<'_>,
    payload: &Payload,
    consumer: Option<&Consumer>,
) -> Result<Placement<'a>, GatewayError> {
    let headers = &inbound.parts.headers;
    let body = &payload.body;
    // The stored objects the request names, and the backend that holds them.
    let object = refs::path_object(&inbound.endpoint.path_and_query);
    let mut ids: Vec<String> = object
        .as_ref()
        .and_then(|o| o.id.as_deref())
        .map(|id| vec![id.to_string()])
        .unwrap_or_default();
    // Whether the backend keeps the answer (a stored chat completion).
    let mut stored = false;
    if !body.is_empty() {
        let named = match form_type(headers) {
            Some(ct) => refs::form_ids(ct, body.clone()).await,
            None => {
                let collection = object.as_ref().map(|o| o.collection);
                let named = refs::body_refs(
                    body,
                    matches!(collection, Some("responses" | "conversations")),
                    collection == Some("chat/completions"),
                );
                if let Some(key) = named.repeated {
                    let shown = first_chars(&key, 64);
                    return Err(GatewayError::new(
                        ErrorKind::BadRequest,
                        format!(
                            "the request body repeats the key '{shown}' in one object: its meaning is not certain"
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
    let isolated = !snap.config.consumers.is_empty();
    let caller = consumer.map(|c| c.name.clone());
    let owner_consumer = caller.clone().filter(|_| isolated);
    let pinned = pin(&state.owners, snap, &ids, owner_consumer.as_deref()).await?;
    // A session key keeps a conversation on one backend, and its prompt cache warm.
    let session = match &pinned {
        Pinned::None if !snap.config.routing.affinity_key.is_empty() => session_key(
            &snap.config.routing.affinity_key,
            headers,
            &payload.passthrough,
            body,
        )
        .map(|k| {
            format!(
                "{}\n{}\n{k}",
                caller.as_deref().unwrap_or(""),
                inbound.deployment().unwrap_or("")
            )
        }),
        _ => None,
    };
    let preferred = match &session {
        Some(key) => match state.sessions.get(key).await {
            Some(o) => snap.proxy.backends.iter().position(|b| b.name == o.backend),
            None => snap.proxy.rendezvous(inbound.deployment(), key),
        },
        None => None,
    };
    if let Pinned::Owner(..) = pinned {
        state.metrics.owner_routed.inc();
    }
    Ok(Placement {
        object,
        ids,
        stored,
        owner_consumer,
        session,
        pinned,
        preferred,
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
    snap: &Snapshot,
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
    match snap.proxy.backends.iter().position(|b| b.name == backend) {
        Some(idx) => Ok(Pinned::Owner(idx, id.clone())),
        None => Err(GatewayError::new(
            ErrorKind::OwnerGone,
            format!(
                "'{id}' is held by backend '{backend}', which is no longer configured: the object cannot be reached."
            ),
        )),
    }
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
