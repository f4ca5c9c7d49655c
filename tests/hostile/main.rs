//! Hostile input, sent as raw bytes (or raw HTTP/2 frames) so no client library tidies it
//! first: each request gets a clear 4xx or a closed connection, the gateway keeps serving, and
//! nothing reaches a backend. And hostile backends, answering in raw bytes: what they get wrong
//! never reaches the client as if it were right, and nothing is sent to them twice.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod backends;
#[path = "../common/mod.rs"]
mod common;
mod http2;
mod slow;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any wait in these tests; the gateway should answer or close long before.
const PATIENCE: Duration = Duration::from_secs(10);

/// Sends `bytes` on a new connection and returns everything the gateway sends back until it
/// closes the connection (every request here asks for, or earns, a close).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    raw_as(addr, bytes, "request").await
}

async fn raw_as(addr: SocketAddr, bytes: &[u8], what: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The gateway may close before reading all of a hostile request: a failed write is fine.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "{what}: the gateway neither closed nor finished (got {:?})",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> Option<u16> {
    response.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A 4xx or a plain close: never a 2xx, a 5xx or a hang.
fn refused(response: &str, what: &str) {
    match status_of(response) {
        None => assert!(response.is_empty(), "{what}: not HTTP: {response:?}"),
        Some(s) => assert!((400..500).contains(&s), "{what}: got {s}: {response}"),
    }
}

const HEAD: &str = "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n";

/// A whole chat completion request with `body`, asking for the connection to close after.
fn chat_request(body: &str) -> String {
    format!(
        "{HEAD}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Polls `cond` (a gauge the gateway updates from its own tasks) until it holds.
async fn wait_for(cond: impl Fn() -> bool) {
    let done = tokio::time::timeout(PATIENCE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "condition never held");
}

#[tokio::test]
async fn malformed_and_smuggling_requests_never_reach_a_backend() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(
        &[B::sim(&s)],
        "",
        "max_body_bytes = 4096\nheader_read_timeout = \"1s\"",
    )
    .await;
    let addr = gw.gateway.addr;
    let big = "a".repeat(70 * 1024);
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, String)> = vec![
        (
            "content-length with transfer-encoding",
            format!(
                "{HEAD}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\nzzzz\r\nGET /admin HTTP/1.1\r\nHost: gw\r\n\r\n"
            ),
        ),
        (
            "two content-lengths",
            format!("{HEAD}Content-Length: 2\r\nContent-Length: 30\r\n\r\n{{}}"),
        ),
        (
            "bad chunk size",
            format!("{HEAD}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"),
        ),
        (
            "chunk longer than its size",
            format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}xx\r\n0\r\n\r\n"),
        ),
        (
            "transfer-encoding other than chunked",
            format!("{HEAD}Transfer-Encoding: gzip\r\n\r\n{{}}"),
        ),
        (
            "one huge header",
            format!("{HEAD}x-big: {big}\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "too many headers",
            format!("{HEAD}{many}Content-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "header name with a space",
            format!("{HEAD}bad name: x\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "NUL in a header value",
            format!("{HEAD}x-a: a\0b\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "bare CR in a header value (injection attempt)",
            format!("{HEAD}x-a: a\rHost: evil\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "obsolete line folding",
            format!("{HEAD}x-a: a\r\n  folded\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "body over max_body_bytes",
            format!("{HEAD}Content-Length: 5000\r\n\r\n{}", "x".repeat(5000)),
        ),
        (
            "chunked body over max_body_bytes",
            format!(
                "{HEAD}Transfer-Encoding: chunked\r\n\r\n1000\r\n{}\r\n1000\r\n{}\r\n0\r\n\r\n",
                "x".repeat(4096),
                "x".repeat(4096)
            ),
        ),
        (
            "traversal",
            "POST /openai/deployments/../../admin/chat HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}".into(),
        ),
        (
            "encoded traversal",
            "POST /openai/%2e%2e/admin HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}".into(),
        ),
        (
            "encoded slash in the deployment",
            "POST /openai/deployments/gpt-4o%2F..%2Fx/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}".into(),
        ),
        (
            "encoded CRLF in the deployment",
            "POST /openai/deployments/x%0d%0aHost:%20evil/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}".into(),
        ),
        (
            "unknown path",
            "GET /etc/passwd HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "not HTTP at all",
            "\x16\x03\x01\x00\x7f\x01\x00\x00\x7b\x03\x03garbage\r\n\r\n".into(),
        ),
    ];
    for (what, request) in &cases {
        let response = raw_as(addr, request.as_bytes(), what).await;
        refused(&response, what);
        if let Some(status) = status_of(&response) {
            // The gateway's own answers are OpenAI-shaped; hyper's protocol errors have no body.
            let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
            if !body.is_empty() {
                let v: serde_json::Value = serde_json::from_str(body)
                    .unwrap_or_else(|e| panic!("{what}: {status} body is not JSON ({e}): {body}"));
                assert!(v["error"]["message"].is_string(), "{what}: {body}");
            }
        }
    }
    assert!(
        s.requests().is_empty(),
        "reached the backend: {:?}",
        s.requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
    // HTTP/2 that never gets going (a frame of no known type, then half a frame): pings go
    // unanswered and the gateway closes with a GOAWAY.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00garbage")
        .await
        .unwrap();
    let mut frames = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut frames)).await;
    assert!(closed.is_ok(), "an idle HTTP/2 connection stayed open");
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]) as usize;
        types.push(frames[at + 3]);
        at += 9 + len;
    }
    assert!(types.contains(&7), "no GOAWAY among frame types {types:?}");

    // And the gateway still serves.
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);

    // An absolute-form target (which HTTP/1.1 servers must accept) names a host, but the
    // request still goes only to a configured backend, with that backend's host.
    let body = chat_body(false);
    let r = raw(
        addr,
        format!(
            "POST http://evil.example{} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            CHAT,
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), Some(200), "{r}");
    let last = s.requests().pop().unwrap();
    assert_eq!(last.headers["host"], s.addr().to_string().as_str());
    gw.stop().await;
}

#[tokio::test]
async fn invalid_json_is_refused_where_the_gateway_reads_the_body() {
    let s = start_sim(sim("east")).await;
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        "\n[[consumers]]\nname = \"team\"\nkey = \"team-key-0123456789\"\ntokens_per_minute = 100000\n",
    )
    .await;
    let c = client();
    for (path, auth) in [
        // The v1 API: the deployment is the body's `model`.
        ("/v1/chat/completions", "team-key-0123456789"),
        // A consumer with token limits: the prompt is counted from the body.
        (CHAT, "team-key-0123456789"),
    ] {
        let r = c
            .post(gw.url(path))
            .header("api-key", auth)
            .header("content-type", "application/json")
            .body("{\"model\": \"gpt-4o\", \"messages\": [")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert!(s.requests().is_empty());
    // A valid body still goes through.
    let r = c
        .post(gw.url(CHAT))
        .header("api-key", "team-key-0123456789")
        .header("content-type", "application/json")
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn headers_passed_on_unread_reach_the_backend_and_connection_listed_ones_do_not() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let addr = gw.gateway.addr;
    let body = chat_body(false);
    let send = |extra: &str| {
        format!(
            "{HEAD}{extra}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // What an SDK sends besides its key: passed on as it came, credentials still replaced.
    let r = raw(
        addr,
        send("User-Agent: OpenAI/Python 1.54.0\r\nx-stainless-lang: python\r\nAccept: application/json\r\nApi-Key: client-key\r\nX-Request-Id: theirs\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), Some(200), "{r}");
    let seen = s.requests().pop().unwrap();
    assert_eq!(seen.headers["user-agent"], "OpenAI/Python 1.54.0");
    assert_eq!(seen.headers["x-stainless-lang"], "python");
    assert_eq!(seen.headers["accept"], "application/json");
    assert_eq!(seen.headers["api-key"], "key-east");
    assert_eq!(seen.headers.get_all("api-key").iter().count(), 1);
    // The client's request id is the gateway's too; it goes on once.
    assert_eq!(seen.headers.get_all("x-request-id").iter().count(), 1);

    // A header the client names in `Connection` is hop-by-hop: it stops here.
    let r = raw(
        addr,
        format!(
            "{HEAD}Connection: close, X-Hop\r\nX-Hop: 1\r\nx-kept: 2\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), Some(200), "{r}");
    let seen = s.requests().pop().unwrap();
    assert!(seen.headers.get("x-hop").is_none(), "{:?}", seen.headers);
    assert_eq!(seen.headers["x-kept"], "2");
    gw.stop().await;
}

/// The deployment is decided on the path the backend will serve: spellings a backend may take
/// for the same path are routed (and limited, and refused) as that path, and forwarded in its
/// canonical form; a path whose meaning is not certain is a 400.
#[tokio::test]
async fn paths_are_routed_and_forwarded_in_their_canonical_form() {
    let s = start_sim(sim("east")).await;
    let tail = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = \"gpt-4o\" }\n\n[[consumers]]\nname = \"team\"\nkey = \"team-key-0123456789\"\ndeployments = { gpt-4o = { requests_per_minute = 1 } }\n";
    let gw = gateway_with(&[B::sim(&s)], "unknown_deployments = \"reject\"", "", tail).await;
    let addr = gw.gateway.addr;
    let body = chat_body(false);
    let send = |method: &str, path: &str, extra: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: gw\r\napi-key: team-key-0123456789\r\nContent-Type: application/json\r\n{extra}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Deployments no entry names are refused however the path spells `deployments`.
    for path in [
        "/openai/Deployments/other/chat/completions",
        "/openai/%64eployments/other/chat/completions",
        "/openai//deployments/other/chat/completions",
        "/OPENAI/deployments/other/chat/completions",
    ] {
        let r = raw(addr, send("POST", path, "", &body).as_bytes()).await;
        assert_eq!(status_of(&r), Some(404), "{path}: {r}");
        assert!(r.contains("DeploymentNotFound"), "{path}: {r}");
    }
    // The one request the consumer may send this minute, on an odd spelling: forwarded in
    // the canonical form...
    let r = raw(
        addr,
        send(
            "POST",
            "//openai/Deployments/gpt-4o//Chat/Completions?api-version=2024-10-21",
            "",
            &body,
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert_eq!(
        s.requests().pop().unwrap().path_and_query,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
    // ... and counted against that deployment, whatever the next spelling.
    for path in [
        CHAT,
        "/openai/Deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        "/openai/%64eployments/gpt-4o/chat/completions?api-version=2024-10-21",
    ] {
        let r = raw(addr, send("POST", path, "", &body).as_bytes()).await;
        assert_eq!(status_of(&r), Some(429), "{path}: {r}");
    }
    // The v1 API under another spelling still routes on the body's model.
    let v1 = r#"{"model":"other","messages":[{"role":"user","content":"hi"}]}"#;
    for path in [
        "/openai/V1/chat/completions",
        "/openai//v1/chat/completions",
    ] {
        let r = raw(addr, send("POST", path, "", v1).as_bytes()).await;
        assert_eq!(status_of(&r), Some(404), "{path}: {r}");
    }
    let before = s.requests().len();
    // What cannot be pinned down is a 400: a raw `\`, dot segments however written, encoded
    // separators; and a v1 body naming its model twice, whatever its content type says.
    for path in [
        "/openai/deployments/gpt-4o/chat\\..\\..\\secret\\chat\\completions",
        "/openai/deployments/gpt-4o/chat/%2e%2e/%2E%2e/x/chat/completions",
        "/openai/deployments/gpt-4o/./chat/completions",
        "/openai/files/a%5c..%5cb",
    ] {
        let r = raw(addr, send("POST", path, "", &body).as_bytes()).await;
        assert_eq!(status_of(&r), Some(400), "{path}: {r}");
    }
    let twice = r#"{"model":"gpt-4o","messages":[],"model":"other"}"#;
    for content_type in ["text/json", "text/plain", "application/json"] {
        let r = raw(
            addr,
            format!(
                "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\napi-key: team-key-0123456789\r\nContent-Type: {content_type}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{twice}",
                twice.len()
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&r), Some(400), "{content_type}: {r}");
        assert!(r.contains("'model' more than once"), "{r}");
    }
    assert_eq!(s.requests().len(), before, "reached the backend");
    gw.stop().await;
}

/// Only the API's methods are forwarded (TRACE would echo the backend's credential), and an
/// HTTP/1.1 request needs exactly one valid `Host`, on the fast path and on hyper's.
#[tokio::test]
async fn other_methods_get_405_and_a_missing_or_repeated_host_400() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let addr = gw.gateway.addr;
    for method in ["TRACE", "TRACK", "OPTIONS", "HEAD", "CONNECT", "PROPFIND"] {
        let target = if method == "CONNECT" { "gw:443" } else { CHAT };
        let r = raw(
            addr,
            format!("{method} {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        // CONNECT's authority target is refused by hyper itself; the rest by the gateway.
        if method == "CONNECT" {
            refused(&r, method);
        } else {
            assert_eq!(status_of(&r), Some(405), "{method}: {r}");
            assert!(
                r.to_ascii_lowercase()
                    .contains("allow: get, post, put, patch, delete"),
                "{method}: {r}"
            );
        }
    }
    let body = chat_body(false);
    for (what, hosts) in [
        ("no host", ""),
        ("two hosts", "Host: gw\r\nHost: evil.example\r\n"),
        ("an empty host", "Host: \r\n"),
        ("a host with a user part", "Host: user@gw\r\n"),
        ("a host with a space", "Host: g w\r\n"),
        ("a host with a path", "Host: gw/x\r\n"),
    ] {
        for framing in [
            format!("Content-Length: {}\r\n\r\n{body}", body.len()),
            format!(
                "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            ),
        ] {
            let r = raw(
                addr,
                format!("POST {CHAT} HTTP/1.1\r\n{hosts}Content-Type: application/json\r\nConnection: close\r\n{framing}").as_bytes(),
            )
            .await;
            assert_eq!(status_of(&r), Some(400), "{what}: {r}");
        }
    }
    assert!(s.requests().is_empty());
    // HTTP/1.0 needs none; a host with a port is fine.
    for (version, host) in [
        ("HTTP/1.0", ""),
        ("HTTP/1.1", "Host: gw:8080\r\n"),
        ("HTTP/1.1", "Host: [::1]:80\r\n"),
    ] {
        let r = raw(
            addr,
            format!("POST {CHAT} {version}\r\n{host}Content-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        )
        .await;
        assert!(r.contains(" 200 OK"), "{version} {host}: {r}");
    }
    gw.stop().await;
}

/// A keyless loopback admin listener (what the example config ships) takes no state-changing
/// request from another site's page, and answers no `Host` but its own: a form POST from
/// another origin cannot drain a backend, and a rebound DNS name cannot read the config.
#[tokio::test]
async fn the_admin_listener_refuses_cross_site_requests_and_foreign_hosts() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "admin_hosts = [\"admin.internal\"]").await;
    let admin = addr_of(&gw.admin);
    let port = admin.port();
    let drain = |extra: &str, host: &str| {
        format!(
            "POST /admin/backends/east/drain HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let own = format!("127.0.0.1:{port}");
    for (what, request) in [
        (
            "a form from another origin",
            drain("Origin: http://evil.example\r\n", &own),
        ),
        ("an opaque origin", drain("Origin: null\r\n", &own)),
        (
            "another port on this host",
            drain(&format!("Origin: http://127.0.0.1:{}\r\n", port + 1), &own),
        ),
        (
            "fetch metadata: cross-site",
            drain("Sec-Fetch-Site: cross-site\r\n", &own),
        ),
        (
            "fetch metadata: same-site",
            drain("Sec-Fetch-Site: same-site\r\n", &own),
        ),
    ] {
        let r = raw(admin, request.as_bytes()).await;
        assert_eq!(status_of(&r), Some(403), "{what}: {r}");
        assert!(r.contains("cross_origin_request"), "{what}: {r}");
    }
    // Clients were never cut off: the backend is not drained.
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);

    // Any request naming another host, a read included, is misdirected (DNS rebinding).
    for host in [
        "evil.example",
        "evil.example:80",
        "localhost.evil.example",
        "10.1.2.3",
    ] {
        let r = raw(
            admin,
            format!("GET /admin/config HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&r), Some(421), "{host}: {r}");
        assert!(!r.contains("backends"), "{host}: {r}");
    }
    // Its own names, any port (a port forward): served.
    for host in [
        own.as_str(),
        "localhost",
        "LOCALHOST:1234",
        "admin.internal:9090",
        "[::1]",
    ] {
        let r = raw(
            admin,
            format!("GET /admin/config HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&r), Some(200), "{host}: {r}");
    }
    // The listener's own page, a script or curl (no origin at all) may change state.
    for extra in [
        format!("Origin: http://{own}\r\nSec-Fetch-Site: same-origin\r\n"),
        String::new(),
    ] {
        let r = raw(admin, drain(&extra, &own).as_bytes()).await;
        assert_eq!(status_of(&r), Some(200), "{extra}: {r}");
    }
    let r = client()
        .post(gw.url(CHAT))
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "drained by a same-origin request");
    gw.stop().await;
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
