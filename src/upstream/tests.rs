//! Requests rewritten for a backend: URL, headers, credentials, the head on the wire.

use super::*;
use crate::config::{BackendAuth, Secret};

#[test]
fn decimal_matches_display() {
    let mut buf = [0u8; 20];
    for n in [0, 7, 10, 99, 100, 65_536, 1 << 20, u64::MAX] {
        assert_eq!(http1::decimal(n, &mut buf), n.to_string().as_bytes());
    }
}

fn backend() -> Backend {
    Backend::new(
        &BackendConfig {
            name: "east".into(),
            url: BackendUrl {
                scheme: http::uri::Scheme::HTTPS,
                authority: "east.example:8443".parse().unwrap(),
                base_path: "/prefix".into(),
            },
            auth: BackendAuth::ApiKey(Secret::new("backend-secret")),
            priority: 1,
            weight: 1,
        },
        &[],
        None,
        &crate::telemetry::Metrics::new(),
    )
    .unwrap()
}

fn key(b: &Backend) -> Option<(HeaderName, HeaderValue)> {
    match &b.credential {
        Credential::Static(n, v) => Some((n.clone(), v.clone())),
        _ => None,
    }
}

/// A POST of `{}` to deployment `d` (at 20..21 of `path_and_query`).
fn deployment_request<'a>(
    path_and_query: &'a str,
    headers: &'a HeaderMap,
    request_id: &'a HeaderValue,
) -> OutboundRequest<'a> {
    OutboundRequest {
        method: &Method::POST,
        path_and_query,
        deployment_span: Some(20..21),
        model_in_body: false,
        headers,
        passthrough: Bytes::new(),
        body: Bytes::from_static(b"{}"),
        request_id,
        upgrade: false,
        creates: false,
    }
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
    let req = deployment_request(
        "/openai/deployments/d/chat/completions?api-version=2024-10-21",
        &h,
        &rid,
    );
    let b = backend();
    let out = build_request(&b, &req, None, key(&b), None).unwrap();
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
    let renamed = build_request(&b, &req, Some("gpt-4o-2024-08-06"), key(&b), None).unwrap();
    assert_eq!(
        renamed.uri().path(),
        "/prefix/openai/deployments/gpt-4o-2024-08-06/chat/completions"
    );
}

#[test]
fn encodes_the_rewritten_head() {
    let mut h = HeaderMap::new();
    h.insert("api-key", HeaderValue::from_static("client-key"));
    h.insert("host", HeaderValue::from_static("gateway.local"));
    h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
    h.insert("x-hop", HeaderValue::from_static("1"));
    h.insert("content-length", HeaderValue::from_static("2"));
    h.insert("traceparent", HeaderValue::from_static("client-parent"));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let rid = HeaderValue::from_static("rid-1");
    let req = deployment_request(
        "/openai/deployments/d/chat/completions?api-version=1",
        &h,
        &rid,
    );
    let b = backend();
    let tp = HeaderValue::from_static("00-ours-01");
    let head = encode_head(&b, &req, Some("gpt-4o"), 2, key(&b), Some(tp)).unwrap();
    assert_eq!(
        String::from_utf8(head).unwrap(),
        "POST /prefix/openai/deployments/gpt-4o/chat/completions?api-version=1 HTTP/1.1\r\n\
         host: east.example:8443\r\n\
         content-type: application/json\r\n\
         api-key: backend-secret\r\n\
         traceparent: 00-ours-01\r\n\
         x-request-id: rid-1\r\n\
         content-length: 2\r\n\r\n"
    );
    // A GET without a body announces none.
    let get = OutboundRequest {
        method: &Method::GET,
        path_and_query: req.path_and_query,
        deployment_span: None,
        model_in_body: false,
        headers: &h,
        passthrough: Bytes::new(),
        body: Bytes::new(),
        request_id: &rid,
        upgrade: false,
        creates: false,
    };
    let head = String::from_utf8(encode_head(&b, &get, None, 0, None, None).unwrap()).unwrap();
    assert!(!head.contains("content-length"), "{head}");
    // Lines the listener passed on unread go out as they came, on either client.
    let sdk = OutboundRequest {
        passthrough: Bytes::from_static(
            b"User-Agent: OpenAI/Python 1.54.0\r\nx-stainless-lang: python\r\n",
        ),
        ..get
    };
    let head = String::from_utf8(encode_head(&b, &sdk, None, 0, None, None).unwrap()).unwrap();
    assert!(
        head.ends_with("User-Agent: OpenAI/Python 1.54.0\r\nx-stainless-lang: python\r\n\r\n"),
        "{head}"
    );
    let built = build_request(&b, &sdk, None, None, None).unwrap();
    assert_eq!(built.headers()["user-agent"], "OpenAI/Python 1.54.0");
    assert_eq!(built.headers()["x-stainless-lang"], "python");
    // A renamed deployment that would break the request line is refused, not sent.
    let err = encode_head(&b, &req, Some("a b\r\nx: y"), 2, None, None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
}

#[test]
fn renames_the_model_in_v1_bodies_only_when_asked() {
    let h = HeaderMap::new();
    let rid = HeaderValue::from_static("r");
    let body = Bytes::from_static(br#"{"model":"gpt-4o","messages":[],"n":1}"#);
    let req = OutboundRequest {
        method: &Method::POST,
        path_and_query: "/openai/v1/chat/completions",
        deployment_span: None,
        model_in_body: true,
        headers: &h,
        passthrough: Bytes::new(),
        body: body.clone(),
        request_id: &rid,
        upgrade: false,
        creates: false,
    };
    assert_eq!(req.body_for(None), body, "byte-exact when no rename");
    let v: serde_json::Value = serde_json::from_slice(&req.body_for(Some("gpt-4o-mini"))).unwrap();
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["n"], 1);
    assert_eq!(req.path_for(Some("x")), "/openai/v1/chat/completions");
}
