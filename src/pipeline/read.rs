//! The read phase: the request's head checked, its path classified, its body read (within
//! `server.max_body_bytes` and the body timeouts), and the deployment it asks for found, in the
//! path or, on the v1 API, in the body's `model`.

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::api::{self, Endpoint};
use crate::auth::inbound::Consumer;
use crate::body::RequestBody;
use crate::error::{ErrorKind, GatewayError};
use crate::live::Snapshot;
use crate::telemetry::trace;

use super::context::{RequestContext, first_chars};

/// A request as read: what the later phases decide on.
pub(super) struct Inbound<'a> {
    pub(super) parts: &'a http::request::Parts,
    /// What the path is, and the path and query the backend gets.
    pub(super) endpoint: Endpoint<'a>,
    /// The v1 body's `model`, when the path names no deployment.
    pub(super) model: Option<String>,
    /// A WebSocket upgrade on a path that takes one.
    pub(super) upgrade: bool,
}

impl Inbound<'_> {
    /// The deployment asked for: in the path, else the body's `model`.
    pub(super) fn deployment(&self) -> Option<&str> {
        self.endpoint.deployment().or(self.model.as_deref())
    }
}

/// What goes to the backend as it came: the body, and the client's header lines the gateway
/// does not read.
pub(super) struct Payload {
    pub(super) body: Bytes,
    pub(super) passthrough: Bytes,
}

/// Reads the request whose head is `parts`.
pub(super) async fn read<'a>(
    snap: &Snapshot,
    parts: &'a http::request::Parts,
    mut body: RequestBody,
    consumer: Option<&Consumer>,
    ctx: &mut RequestContext,
) -> Result<(Inbound<'a>, Payload), GatewayError> {
    // The fast path checked `Host` as it read the head.
    let via_hyper = matches!(body, RequestBody::Streaming(_));
    check_head(parts, via_hyper)?;
    let passthrough = body.take_passthrough();
    let path = parts.uri.path();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(path);
    let endpoint = api::classify(path, pq)?;
    let upgrade = endpoint.upgrade_allowed && parts.headers.contains_key(header::UPGRADE);

    let body = read_body(body, &parts.headers, &snap.config.server).await?;
    // Where the gateway itself reads the body (the model to route on, the tokens to count
    // against a consumer's limits), a body declared as JSON that does not parse is the
    // client's error, not something to send to every backend in turn.
    let declared_json = is_json(&parts.headers) && !body.is_empty();
    let invalid_json =
        || GatewayError::new(ErrorKind::BadRequest, "the request body is not valid JSON");
    let model = if endpoint.model_in_body {
        // Read as JSON whatever the content type says when it looks like JSON: a backend may
        // not care for the header either, and must not be the one to decide the model.
        let looks_json = declared_json
            || (form_type(&parts.headers).is_none()
                && body.trim_ascii_start().first() == Some(&b'{'));
        match model_of(&body) {
            Ok(model) => model,
            Err(BodyModel::Repeated) if looks_json => {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    "the request body names 'model' more than once: its meaning is not certain",
                ));
            }
            Err(_) if looks_json => return Err(invalid_json()),
            // Multipart and binary bodies name no model.
            Err(_) => None,
        }
    } else {
        None
    };
    if !endpoint.model_in_body
        && declared_json
        && consumer.is_some_and(|c| snap.limiter.counts_tokens(&c.name))
        && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
    {
        return Err(invalid_json());
    }
    let inbound = Inbound {
        parts,
        endpoint,
        model,
        upgrade,
    };
    ctx.deployment = inbound
        .deployment()
        .map(|d| first_chars(d, 128).to_string());
    let body = match ask_usage(&inbound, &body) {
        Some(asked) => {
            ctx.usage_asked = true;
            asked
        }
        None => body,
    };
    // Only a sampled trace's spans and the OTLP metrics read these.
    if ctx.sampled() || ctx.otlp.is_some() {
        ctx.operation = trace::operation_name(path);
    }
    if ctx.sampled() {
        ctx.params = serde_json::from_slice(&body).ok();
    }
    Ok((inbound, Payload { body, passthrough }))
}

/// A streamed chat completion (or completion) that did not ask for its usage is made to: its
/// tokens are counted for every request, not only those of consumers with token limits. The
/// gateway takes the usage chunk out of the stream again (`ctx.usage_asked`), so the client sees
/// the stream it asked for. `None`: the body goes as sent.
fn ask_usage(inbound: &Inbound<'_>, body: &[u8]) -> Option<Bytes> {
    if inbound.parts.method != http::Method::POST {
        return None;
    }
    let pq = inbound.endpoint.path_and_query.as_bytes();
    let path = &pq[..memchr::memchr(b'?', pq).unwrap_or(pq.len())];
    // Only chat completions and completions have `stream_options.include_usage`; the
    // Responses API reports usage by itself and refuses the option.
    if !path.ends_with(b"/completions") {
        return None;
    }
    // Most requests are not streams and never say `stream`: no parse for them. The searcher
    // is made once: making it cost more than the search.
    static STREAM: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"stream\""));
    STREAM.find(body)?;
    crate::usage::request_usage_chunk(body)
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

/// A `multipart/form-data` body's content type.
pub(super) fn form_type(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::CONTENT_TYPE)?;
    // Checked on the bytes first: most bodies are JSON, and `to_str` reads the whole value.
    let form = v
        .as_bytes()
        .get(..19)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"multipart/form-data"));
    form.then(|| v.to_str().ok()).flatten()
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
