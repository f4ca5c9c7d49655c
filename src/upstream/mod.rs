//! One attempt against one backend: the pooled client, URL and header rewriting, timeouts.

use crate::http1;
use crate::http1::client as h1;

use std::borrow::Cow;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};

use crate::auth::outbound::{Credential, TokenProvider};
use crate::body::{BoxBody, BoxError};
use crate::config::{BackendConfig, BackendUrl, RoutingConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::http_client::{HttpsClient, build_client};
use crate::telemetry::BackendStats;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A backend as the request path needs it: name, URL, and its credential.
pub struct Backend {
    pub name: Arc<str>,
    /// The name as `x-switchyard-backend` carries it, made once (`None` if it cannot be).
    pub name_header: Option<HeaderValue>,
    pub url: BackendUrl,
    pub credential: Credential,
    /// Totals for the status page.
    pub stats: Arc<BackendStats>,
    /// Its connections, found in the shared pools on first use.
    pool: std::sync::OnceLock<Arc<h1::HostPool>>,
}

impl Backend {
    /// `providers` hold the Entra tokens, for backends that use them; `stats`: the totals a
    /// backend of this name had before a reload, if any.
    pub fn new(
        cfg: &BackendConfig,
        providers: &[Arc<TokenProvider>],
        stats: Option<Arc<BackendStats>>,
        metrics: &crate::telemetry::Metrics,
    ) -> Result<Self, String> {
        Ok(Self {
            name: Arc::from(cfg.name.as_str()),
            name_header: HeaderValue::from_str(&cfg.name).ok(),
            url: cfg.url.clone(),
            credential: Credential::new(&cfg.name, &cfg.auth, providers)?,
            stats: stats.unwrap_or_else(|| Arc::new(BackendStats::new(&cfg.name, metrics))),
            pool: std::sync::OnceLock::new(),
        })
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("url", &self.url.to_string())
            .finish_non_exhaustive()
    }
}

/// What the attempt loop sends: the client's request, made specific to a backend per attempt.
pub struct OutboundRequest<'a> {
    pub method: &'a Method,
    /// Path and query as the backend should see them (already rewritten for `/v1`).
    pub path_and_query: &'a str,
    /// Where the deployment name sits in `path_and_query`, for requests that name it there.
    pub deployment_span: Option<Range<usize>>,
    /// The deployment travels in the JSON body's `model` (the v1 API).
    pub model_in_body: bool,
    pub headers: &'a HeaderMap,
    /// Header lines (`name: value\r\n`) passed on as the client sent them, after `headers`.
    pub passthrough: Bytes,
    pub body: Bytes,
    pub request_id: &'a HeaderValue,
    /// A WebSocket upgrade: the `Upgrade`/`Connection` pair is kept and HTTP/1.1 is used.
    pub upgrade: bool,
    /// It makes an object on the backend (a file, batch, stored response ...): once it reached
    /// a backend whole, a failure is final rather than a reason to send it elsewhere.
    pub creates: bool,
}

impl OutboundRequest<'_> {
    /// The path with the backend's own deployment name, when it has another.
    pub fn path_for(&self, rename: Option<&str>) -> Cow<'_, str> {
        match (rename, &self.deployment_span) {
            (Some(name), Some(span)) => {
                let pq = self.path_and_query;
                Cow::Owned(format!("{}{name}{}", &pq[..span.start], &pq[span.end..]))
            }
            _ => Cow::Borrowed(self.path_and_query),
        }
    }

    /// The body with the backend's own deployment name in `model`, when it has another.
    /// Untouched (byte for byte) otherwise.
    pub fn body_for(&self, rename: Option<&str>) -> Bytes {
        if let (Some(name), true) = (rename, self.model_in_body)
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&self.body)
            && let Some(obj) = v.as_object_mut()
        {
            obj.insert("model".into(), serde_json::Value::String(name.into()));
            if let Ok(b) = serde_json::to_vec(&v) {
                return Bytes::from(b);
            }
        }
        self.body.clone()
    }
}

/// The clients to backends: HTTP/1.1 connections of our own for normal traffic (see [`h1`]),
/// and hyper's HTTP/1.1 client for upgrades (WebSocket over HTTP/2 needs extended CONNECT,
/// which Azure does not speak).
#[derive(Clone)]
pub struct Upstream {
    pools: Arc<h1::Pools>,
    upgrade_client: HttpsClient,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    /// `pools` outlive configs: a reload keeps the open connections.
    pub fn new(routing: &RoutingConfig, pools: Arc<h1::Pools>) -> Result<Self, std::io::Error> {
        let upgrade_client = build_client(routing.connect_timeout, false, pools.client_config());
        Ok(Self {
            pools,
            upgrade_client,
            connect_timeout: routing.connect_timeout,
            first_byte_timeout: routing.first_byte_timeout,
            idle_timeout: routing.idle_timeout,
        })
    }

    /// The clients for a reloaded config: the same pools and open connections; the upgrade
    /// client is rebuilt only if the connect timeout, which is built into it, changed.
    pub fn reconfigure(&self, routing: &RoutingConfig) -> Result<Self, std::io::Error> {
        if routing.connect_timeout != self.connect_timeout {
            return Self::new(routing, self.pools.clone());
        }
        Ok(Self {
            first_byte_timeout: routing.first_byte_timeout,
            idle_timeout: routing.idle_timeout,
            ..self.clone()
        })
    }

    /// Sends one attempt and waits for the response headers, at most `budget` (and never longer
    /// than `routing.first_byte_timeout`). The body streams later, under the idle timeout.
    /// `traceparent`: this attempt's span, when the request is traced.
    pub async fn send(
        &self,
        backend: &Backend,
        req: &OutboundRequest<'_>,
        rename: Option<&str>,
        budget: Duration,
        traceparent: Option<HeaderValue>,
    ) -> Result<Response<BoxBody>, GatewayError> {
        let wait = budget.min(self.first_byte_timeout);
        let deadline = tokio::time::Instant::now() + wait;
        let timed_out = || {
            GatewayError::new(
                ErrorKind::UpstreamTimeout,
                format!("backend {} sent no response within {wait:?}", backend.name),
            )
        };
        // Waiting for a token is part of the attempt. (A timer is only set if it has to wait.)
        let auth = tokio::time::timeout_at(deadline, backend.credential.header(&backend.name))
            .await
            .map_err(|_| timed_out())??;
        let idle = self.idle_timeout;
        if req.upgrade {
            let request = build_request(backend, req, rename, auth, traceparent)?;
            let sent = tokio::time::timeout_at(deadline, self.upgrade_client.request(request));
            sent.await
                .map_err(|_| timed_out())?
                .map(|r| {
                    let mut r = r.map(|b| BoxBody::new(IdleTimeout::new(boxed(b), idle)));
                    // The backend client of our own leaves these out as it reads them.
                    clean_response_headers(r.headers_mut(), true);
                    r
                })
                .map_err(|e| {
                    let kind = if e.is_connect() {
                        ErrorKind::UpstreamConnect
                    } else {
                        ErrorKind::UpstreamProtocol
                    };
                    GatewayError::new(kind, format!("backend {}: {}", backend.name, describe(&e)))
                        .delivered(kind != ErrorKind::UpstreamConnect)
                })
        } else {
            let body = req.body_for(rename);
            let head = encode_head(backend, req, rename, body.len(), auth, traceparent)?;
            let host = backend.pool.get_or_init(|| {
                self.pools.host(
                    backend.url.scheme == http::uri::Scheme::HTTPS,
                    &backend.url.authority,
                )
            });
            // The deadline is kept by the connection's own timer (see `h1::HostPool::send`).
            let sent = host.send(
                head,
                &body,
                req.method == Method::HEAD,
                self.connect_timeout,
                deadline,
            );
            // Boxed once, with the idle timeout inside the box.
            sent.await
                .map(|(r, raw)| {
                    r.map(|b| BoxBody::new(IdleTimeout::new(b, idle)).with_passthrough(raw))
                })
                .map_err(|e| match e {
                    h1::SendError::Connect(m) => GatewayError::new(
                        ErrorKind::UpstreamConnect,
                        format!("backend {}: {m}", backend.name),
                    ),
                    h1::SendError::Protocol { message, delivered } => GatewayError::new(
                        ErrorKind::UpstreamProtocol,
                        format!("backend {}: {message}", backend.name),
                    )
                    .delivered(delivered),
                    h1::SendError::TimedOut { delivered } => timed_out().delivered(delivered),
                })
        }
    }
}

pin_project_lite::pin_project! {
    /// Fails a response body that goes quiet for longer than the idle timeout, so a stalled
    /// stream ends (with an error event, see `pipeline::respond`) instead of hanging forever.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        // Armed for `idle` after the latest frame at the earliest; moved on only when it fires,
        // so a body that keeps flowing costs no timer work per frame.
        #[pin]
        sleep: tokio::time::Sleep,
        idle: Duration,
        last: tokio::time::Instant,
    }
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            inner,
            sleep: tokio::time::sleep_until(now + idle),
            idle,
            last: now,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.last = tokio::time::Instant::now();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => loop {
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = *this.last + *this.idle;
                if tokio::time::Instant::now() >= due {
                    return Poll::Ready(Some(Err(format!(
                        "the backend sent nothing for {:?} (routing.idle_timeout)",
                        this.idle
                    )
                    .into())));
                }
                // Frames came since it was armed: wait out the rest from the latest one.
                this.sleep.as_mut().reset(due);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The error chain, innermost cause last, for logs and error bodies (no secrets live here).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Rewrites the client's request for `backend`: URL joined onto the backend's base, hop-by-hop
/// and client credential headers dropped, the backend's own credential and the request id set.
pub fn build_request(
    backend: &Backend,
    req: &OutboundRequest<'_>,
    rename: Option<&str>,
    auth: Option<(HeaderName, HeaderValue)>,
    traceparent: Option<HeaderValue>,
) -> Result<Request<Full<Bytes>>, GatewayError> {
    let url = &backend.url;
    let uri = Uri::builder()
        .scheme(url.scheme.clone())
        .authority(url.authority.clone())
        .path_and_query(format!("{}{}", url.base_path, req.path_for(rename)))
        .build()
        .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid path: {e}")))?;

    let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
    for (name, value) in forwarded(req) {
        headers.append(name.clone(), value.clone());
    }
    crate::http1::append_lines(&req.passthrough, &mut headers);
    if let Some((name, value)) = auth {
        headers.insert(name, value);
    }
    // The gateway's attempt span becomes the backend's parent (the caller's `tracestate`, if
    // any, passes on unchanged).
    if let Some(tp) = traceparent {
        headers.insert(TRACEPARENT.clone(), tp);
    }
    headers.insert(X_REQUEST_ID.clone(), req.request_id.clone());

    let mut request = Request::new(Full::new(req.body_for(rename)));
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The client's headers a backend gets: not the hop-by-hop ones, not the client's credentials,
/// not `host`, `content-length` or `expect` (the gateway sets its own), not `x-request-id` (the
/// gateway's id replaces it).
fn forwarded<'a>(
    req: &'a OutboundRequest<'_>,
) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> {
    // Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1). Scanned per header
    // rather than collected: it is nearly always just `keep-alive`.
    let connection = req.headers.get_all(header::CONNECTION);
    let connection_listed = move |n: &str| {
        connection
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|s| s.trim().eq_ignore_ascii_case(n))
    };
    let upgrade = req.upgrade;
    req.headers.iter().filter(move |(name, _)| {
        // One `match`: the compiler sorts the names by length, where testing a list of names
        // in turn is far dearer per header (bench/results/profile-2026-11-26.md).
        match name.as_str() {
            // Hop-by-hop (RFC 9110 §7.6.1), except what a WebSocket upgrade carries on.
            "connection" | "upgrade" => upgrade,
            "transfer-encoding" => false,
            // The client's credentials for the gateway: a backend must never see them.
            "api-key" | "authorization" | "ocp-apim-subscription-key" => false,
            // The gateway sets its own from the backend URL and the body it holds; a
            // backend's 100-continue is moot once the whole body is here.
            "host" | "content-length" | "expect" => false,
            "x-request-id" => false,
            n if http1::is_hop_by_hop(n) => false,
            n => !connection_listed(n),
        }
    })
}

/// The HTTP/1.1 request head for `backend`: what [`build_request`] builds, written out.
pub fn encode_head(
    backend: &Backend,
    req: &OutboundRequest<'_>,
    rename: Option<&str>,
    body_len: usize,
    auth: Option<(HeaderName, HeaderValue)>,
    traceparent: Option<HeaderValue>,
) -> Result<Vec<u8>, GatewayError> {
    let url = &backend.url;
    let path = req.path_for(rename);
    // The target goes on the request line verbatim: no byte that could end or split it.
    let target_ok = |s: &str| s.bytes().all(|b| b > b' ' && b != 0x7f);
    if !target_ok(&url.base_path) || !target_ok(&path) || !path.starts_with('/') {
        return Err(GatewayError::new(
            ErrorKind::BadRequest,
            "invalid request path".to_string(),
        ));
    }
    // Room for a small body too, which the client appends to send both in one write.
    let inline = if body_len <= h1::INLINE_BODY {
        body_len
    } else {
        0
    };
    let mut out = Vec::with_capacity(512 + req.headers.len() * 48 + req.passthrough.len() + inline);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(url.base_path.as_bytes());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(url.authority.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        http1::put_line(&mut out, name.as_str().as_bytes(), value.as_bytes());
    };
    for (name, value) in forwarded(req) {
        // Set below, once.
        if auth.as_ref().is_some_and(|(n, _)| n == name)
            || (traceparent.is_some() && name == TRACEPARENT)
        {
            continue;
        }
        line(name, value);
    }
    if let Some((name, value)) = &auth {
        line(name, value);
    }
    if let Some(tp) = &traceparent {
        line(&TRACEPARENT, tp);
    }
    line(&X_REQUEST_ID, req.request_id);
    out.extend_from_slice(&req.passthrough);
    let bodiless = matches!(
        *req.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    );
    if body_len > 0 || !bodiless {
        out.extend_from_slice(b"content-length: ");
        let mut digits = [0u8; 20];
        out.extend_from_slice(http1::decimal(body_len as u64, &mut digits));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

fn boxed(b: hyper::body::Incoming) -> BoxBody {
    BoxBody::new(b.map_err(|e| -> BoxError { Box::new(e) }))
}

/// Drops hop-by-hop headers, and those the gateway answers with its own, from a backend's
/// response before it goes to the client.
fn clean_response_headers(headers: &mut HeaderMap, upgrade: bool) {
    // Prepared names: removing by `&str` parses each name again for every response.
    static NAMES: [HeaderName; 13] = [
        HeaderName::from_static(http1::GATEWAY_SETS[0]),
        HeaderName::from_static(http1::GATEWAY_SETS[1]),
        HeaderName::from_static(http1::GATEWAY_SETS[2]),
        HeaderName::from_static(http1::GATEWAY_SETS[3]),
        HeaderName::from_static(http1::HOP_BY_HOP[0]),
        HeaderName::from_static(http1::HOP_BY_HOP[1]),
        HeaderName::from_static(http1::HOP_BY_HOP[2]),
        HeaderName::from_static(http1::HOP_BY_HOP[3]),
        HeaderName::from_static(http1::HOP_BY_HOP[4]),
        HeaderName::from_static(http1::HOP_BY_HOP[5]),
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ];
    for name in &NAMES {
        if upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests;
