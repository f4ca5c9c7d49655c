//! One attempt against one backend: the pooled client, URL and header rewriting, timeouts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{BackendAuth, BackendConfig, BackendUrl, RoutingConfig};
use crate::error::{ErrorKind, GatewayError};

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus `host`, which the
/// client sets from the backend URL.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The client's credentials for the gateway; a backend must never see them.
const CLIENT_CREDENTIALS: [&str; 3] = ["api-key", "authorization", "ocp-apim-subscription-key"];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A backend as the request path needs it: name, URL, and its credential header ready to send.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub url: BackendUrl,
    auth: Option<(HeaderName, HeaderValue)>,
}

impl Backend {
    pub fn new(cfg: &BackendConfig) -> Result<Self, GatewayError> {
        let auth = match &cfg.auth {
            BackendAuth::ApiKey(key) => {
                let mut v = HeaderValue::from_str(key.expose()).map_err(|_| {
                    GatewayError::new(ErrorKind::BadRequest, "backend key is not a valid header")
                })?;
                v.set_sensitive(true);
                Some((HeaderName::from_static("api-key"), v))
            }
            BackendAuth::None => None,
        };
        Ok(Self {
            name: Arc::from(cfg.name.as_str()),
            url: cfg.url.clone(),
            auth,
        })
    }
}

/// What the attempt loop sends: everything but the backend-specific parts.
pub struct OutboundRequest<'a> {
    pub method: &'a Method,
    /// Path and query as the backend should see them (already rewritten for `/v1`).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub request_id: &'a HeaderValue,
    /// A WebSocket upgrade: the `Upgrade`/`Connection` pair is kept and HTTP/1.1 is used.
    pub upgrade: bool,
}

/// The HTTP clients to backends: one pooled client for normal traffic, one HTTP/1.1-only for
/// upgrades (WebSocket over HTTP/2 needs extended CONNECT, which Azure does not speak).
#[derive(Clone)]
pub struct Upstream {
    client: HttpsClient,
    upgrade_client: HttpsClient,
    first_byte_timeout: Duration,
}

impl Upstream {
    pub fn new(routing: &RoutingConfig) -> Result<Self, std::io::Error> {
        let client = build_client(routing.connect_timeout, true)?;
        let upgrade_client = build_client(routing.connect_timeout, false)?;
        Ok(Self {
            client,
            upgrade_client,
            first_byte_timeout: routing.first_byte_timeout,
        })
    }

    /// Sends one attempt and waits for the response headers (the body streams later).
    pub async fn send(
        &self,
        backend: &Backend,
        req: &OutboundRequest<'_>,
    ) -> Result<Response<Incoming>, GatewayError> {
        let request = build_request(backend, req)?;
        let client = if req.upgrade {
            &self.upgrade_client
        } else {
            &self.client
        };
        match tokio::time::timeout(self.first_byte_timeout, client.request(request)).await {
            Err(_) => Err(GatewayError::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "backend {} sent no response within {:?}",
                    backend.name, self.first_byte_timeout
                ),
            )),
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    ErrorKind::UpstreamConnect
                } else {
                    ErrorKind::UpstreamProtocol
                };
                Err(GatewayError::new(
                    kind,
                    format!("backend {}: {}", backend.name, describe(&e)),
                ))
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

fn build_client(connect_timeout: Duration, http2: bool) -> Result<HttpsClient, std::io::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http();
    let connector = if http2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector))
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
) -> Result<Request<Full<Bytes>>, GatewayError> {
    let url = &backend.url;
    let uri = Uri::builder()
        .scheme(url.scheme.clone())
        .authority(url.authority.clone())
        .path_and_query(format!("{}{}", url.base_path, req.path_and_query))
        .build()
        .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid path: {e}")))?;

    let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
    // Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    let connection_listed: Vec<String> = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in req.headers {
        let n = name.as_str();
        let keep_for_upgrade = req.upgrade && (n == "upgrade" || n == "connection");
        if !keep_for_upgrade
            && (HOP_BY_HOP.contains(&n)
                || connection_listed.iter().any(|c| c == n)
                || n == "host"
                || n == "content-length"
                // The gateway already holds the whole body; a backend's 100-continue is moot.
                || n == "expect")
        {
            continue;
        }
        if CLIENT_CREDENTIALS.contains(&n) || n == X_REQUEST_ID.as_str() {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if let Some((name, value)) = &backend.auth {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), req.request_id.clone());

    let mut request = Request::new(Full::new(req.body.clone()));
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Drops hop-by-hop headers from a backend's response before it goes to the client.
pub fn clean_response_headers(headers: &mut HeaderMap, upgrade: bool) {
    for name in HOP_BY_HOP {
        if upgrade && (name == "upgrade" || name == "connection") {
            continue;
        }
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn backend() -> Backend {
        Backend::new(&BackendConfig {
            name: "east".into(),
            url: BackendUrl {
                scheme: http::uri::Scheme::HTTPS,
                authority: "east.example:8443".parse().unwrap(),
                base_path: "/prefix".into(),
            },
            auth: BackendAuth::ApiKey(Secret::new("backend-secret")),
        })
        .unwrap()
    }

    #[test]
    fn rewrites_url_and_headers() {
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("client-key"));
        h.insert("authorization", HeaderValue::from_static("Bearer client"));
        h.insert("ocp-apim-subscription-key", HeaderValue::from_static("sub"));
        h.insert("host", HeaderValue::from_static("gateway.local"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-request-id", HeaderValue::from_static("client-rid"));
        let rid = HeaderValue::from_static("rid-1");
        let req = OutboundRequest {
            method: &Method::POST,
            path_and_query: "/openai/deployments/d/chat/completions?api-version=2024-10-21",
            headers: &h,
            body: Bytes::from_static(b"{}"),
            request_id: &rid,
            upgrade: false,
        };
        let out = build_request(&backend(), &req).unwrap();
        assert_eq!(
            out.uri().to_string(),
            "https://east.example:8443/prefix/openai/deployments/d/chat/completions?api-version=2024-10-21"
        );
        let oh = out.headers();
        assert_eq!(oh["api-key"], "backend-secret");
        assert!(oh.get("authorization").is_none());
        assert!(oh.get("ocp-apim-subscription-key").is_none());
        assert!(oh.get("host").is_none());
        assert!(oh.get("connection").is_none());
        assert!(oh.get("x-hop").is_none());
        assert_eq!(oh["content-type"], "application/json");
        assert_eq!(oh["x-request-id"], "rid-1");
    }
}
