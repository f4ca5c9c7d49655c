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

mod common;

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
async fn a_slow_request_head_is_cut_off_by_the_header_read_timeout() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "header_read_timeout = \"300ms\"").await;
    let mut conn = TcpStream::connect(gw.gateway.addr).await.unwrap();
    conn.write_all(HEAD.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    // Slowloris: one more header byte now and then, never the end of the head.
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                r = conn.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408, if any; the close follows
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if conn.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");
    // Not at once: the timeout closed it, not the bytes (hyper's clock starts at accept, a
    // moment before `started`).
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "closed too early"
    );
    assert!(s.requests().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_counted() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "max_connections = 2").await;
    let addr = gw.gateway.addr;
    let metrics = gw.gateway.metrics.clone();
    let first = TcpStream::connect(addr).await.unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    wait_for(|| metrics.open_connections.get() == 2).await;

    // The third is closed at once, before a byte is read.
    let response = raw(addr, HEAD.as_bytes()).await;
    assert_eq!(response, "", "over the cap");
    assert_eq!(metrics.connections_refused.get(), 1);
    let text = metrics_text(&client(), &gw.admin).await;
    assert!(
        text.contains("switchyard_connections_refused_total 1"),
        "{text}"
    );
    assert!(text.contains("switchyard_open_connections 2"), "{text}");

    // A slot that frees up is taken again.
    drop(first);
    wait_for(|| metrics.open_connections.get() == 1).await;
    let r = raw(addr, chat_request(&chat_body(false)).as_bytes()).await;
    assert_eq!(status_of(&r), Some(200), "{r}");
    drop(second);
    wait_for(|| metrics.open_connections.get() == 0).await;
    gw.stop().await;
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

/// Sends `head` and then `trickle` one byte every `every` until the gateway answers or closes;
/// returns what it sent back and how long that took.
async fn trickled(
    addr: SocketAddr,
    head: &str,
    trickle: &[u8],
    every: Duration,
) -> (String, Duration) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let mut next = trickle.iter();
    let done = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                r = conn.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(every) => {
                    if let Some(b) = next.next() && conn.write_all(&[*b]).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "the connection stayed open (got {:?})",
        String::from_utf8_lossy(&out)
    );
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// A body that stops, or trickles in just inside the gap limit, is cut off with a 408 and a
/// close on the fast path (a `content-length` body) and on hyper's (chunked, HTTP/1.0,
/// `expect`), and the connection's slot is free again at once.
#[tokio::test]
async fn request_bodies_that_stall_or_trickle_get_408_and_a_close() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(
        &[B::sim(&s)],
        "",
        "header_read_timeout = \"400ms\"\nbody_read_timeout = \"1500ms\"\nmax_connections = 3",
    )
    .await;
    let addr = gw.gateway.addr;
    let body = chat_body(false);
    let slow = Duration::from_millis(150);
    let never = Duration::from_secs(3600);
    let cases: Vec<(&str, String, &[u8], Duration, Duration)> = vec![
        (
            "fast path: length declared, half the body, then nothing",
            format!(
                "{HEAD}Content-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..10]
            ),
            b"",
            never,
            Duration::from_millis(400),
        ),
        (
            "fast path: a byte at a time inside the gap",
            format!("{HEAD}Content-Length: {}\r\n\r\n", body.len()),
            body.as_bytes(),
            slow,
            Duration::from_millis(1500),
        ),
        (
            "hyper: chunked, one chunk, then nothing",
            format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n2\r\n{{\"\r\n"),
            b"",
            never,
            Duration::from_millis(400),
        ),
        (
            "hyper: chunked, a byte at a time inside the gap",
            format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n100\r\n"),
            &[b'x'; 256],
            slow,
            Duration::from_millis(1500),
        ),
        (
            "hyper: expect 100-continue, then nothing",
            format!(
                "{HEAD}Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            ),
            b"",
            never,
            Duration::from_millis(400),
        ),
        (
            "hyper: HTTP/1.0, then nothing",
            format!(
                "POST {CHAT} HTTP/1.0\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{{",
                body.len()
            ),
            b"",
            never,
            Duration::from_millis(400),
        ),
        (
            "hyper: a body over the fast path's 1 MiB, then nothing",
            format!("{HEAD}Content-Length: 2000000\r\n\r\n{{"),
            b"",
            never,
            Duration::from_millis(400),
        ),
    ];
    for (what, head, trickle, every, at_least) in cases {
        let (response, took) = trickled(addr, &head, trickle, every).await;
        // An `expect` request may see `100 Continue` first.
        let last = response
            .rfind("HTTP/1.")
            .map_or(response.as_str(), |i| &response[i..]);
        assert!(
            last.starts_with("HTTP/1.1 408") || last.starts_with("HTTP/1.0 408"),
            "{what}: {response}"
        );
        assert!(
            last.to_ascii_lowercase().contains("connection: close"),
            "{what}: {response}"
        );
        assert!(last.contains("request_body_timeout"), "{what}: {response}");
        assert!(took >= at_least, "{what}: cut after {took:?}");
    }
    assert!(s.requests().is_empty());

    // As many stalled uploads as the listener takes connections: each is cut off, and the
    // slots come back for the next clients.
    let stalled: Vec<_> = (0..3)
        .map(|_| {
            let head = format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n");
            tokio::spawn(async move { trickled(addr, &head, b"", never).await })
        })
        .collect();
    for t in stalled {
        let (response, _) = t.await.unwrap();
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    }
    let metrics = gw.gateway.metrics.clone();
    wait_for(|| metrics.open_connections.get() == 0).await;
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);
    gw.stop().await;
}

/// HTTP/2 (prior knowledge on the plain listener): a stream whose body stops is answered 408
/// and reset; the connection's other streams are served.
#[tokio::test]
async fn an_http2_request_body_that_stalls_gets_408() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(
        &[B::sim(&s)],
        "",
        "header_read_timeout = \"400ms\"\nbody_read_timeout = \"1s\"",
    )
    .await;
    let tcp = TcpStream::connect(gw.gateway.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.unwrap();
    let req = || {
        http::Request::post(format!("http://gw{CHAT}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    };
    // Headers, two bytes of body, then nothing.
    let (answer, mut send) = h2.send_request(req(), false).unwrap();
    send.send_data(bytes::Bytes::from_static(b"{\""), false)
        .unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    assert_eq!(answer.status(), 408);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let mut answer_body = answer.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = answer_body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        String::from_utf8_lossy(&text).contains("request_body_timeout"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    // The connection still serves a whole request.
    let mut h2 = h2.ready().await.unwrap();
    let body = chat_body(false);
    let (answer, mut send) = h2.send_request(req(), false).unwrap();
    send.send_data(bytes::Bytes::from(body), true).unwrap();
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200);
    drop(h2);
    driver.abort();
    assert_eq!(s.requests().len(), 1);
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

/// What a raw backend does with the request it has read whole.
#[derive(Clone)]
enum Act {
    /// Writes these bytes and keeps the connection for the next request.
    Answer(Vec<u8>),
    /// Closes the connection without a word.
    Close,
    /// Writes these bytes, then SSE events until a write fails.
    Flood(Vec<u8>),
}

/// A backend of raw bytes: the n-th request it reads (on any connection) gets `acts[n]`, the
/// last one again once they run out. Returns its URL and the requests it read whole.
async fn raw_backend(acts: Vec<Act>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::sync::{Arc, Mutex};
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (log, acts) = (log.clone(), acts.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // A head, then its content-length's worth of body.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request: Vec<u8> = buf.drain(..end + len).collect();
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(String::from_utf8_lossy(&request).into_owned());
                        log.len() - 1
                    };
                    match acts[n.min(acts.len() - 1)].clone() {
                        Act::Answer(bytes) => {
                            if sock.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Act::Close => return,
                        Act::Flood(head) => {
                            let event = format!("data: {}\n\n", "x".repeat(4000));
                            if sock.write_all(&head).await.is_err() {
                                return;
                            }
                            while sock.write_all(event.as_bytes()).await.is_ok() {}
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, seen)
}

/// The head and body of an HTTP/1.1 response read whole (by its length or its chunks) off raw
/// text; the body de-chunked.
fn split_response(r: &str) -> (String, String) {
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((r, ""));
    let head = head.to_ascii_lowercase();
    if !head.contains("transfer-encoding: chunked") {
        return (head, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    (head, out)
}

/// Framing a hostile backend gets wrong does not reach the client: a length beside chunked
/// coding is dropped, headers named in `Connection` stay behind, an unasked-for `101` is a 502,
/// and a response head may carry as many headers as a request (100), no more.
#[tokio::test]
async fn a_backends_framing_is_made_right_or_refused() {
    let json = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#;
    let many = |n: usize| (0..n).map(|i| format!("x-h{i}: v\r\n")).collect::<String>();
    let cases: Vec<(&str, String, Option<u16>)> = vec![
        (
            "chunked with a content-length",
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n",
                json.len()
            ),
            Some(200),
        ),
        (
            "headers named in connection",
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nConnection: keep-alive, X-Hop-Secret, Retry-After\r\nx-hop-secret: s3cr3t\r\nretry-after: 1\r\nx-kept: yes\r\ncontent-length: {}\r\n\r\n{json}",
                json.len()
            ),
            Some(200),
        ),
        (
            "an unasked-for 101",
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{json}",
                json.len()
            ),
            Some(502),
        ),
        (
            "100 headers",
            format!(
                "HTTP/1.1 200 OK\r\n{}content-length: {}\r\n\r\n{json}",
                many(99),
                json.len()
            ),
            Some(200),
        ),
        (
            "101 headers",
            format!(
                "HTTP/1.1 200 OK\r\n{}content-length: {}\r\n\r\n{json}",
                many(100),
                json.len()
            ),
            Some(502),
        ),
    ];
    for (what, answer, expected) in cases {
        let (url, _) = raw_backend(vec![Act::Answer(answer.into_bytes())]).await;
        let gw = gateway(&[B::url("hostile", url)], "max_attempts = 1", "").await;
        let body = chat_body(false);
        let r = raw(gw.gateway.addr, chat_request(&body).as_bytes()).await;
        assert_eq!(status_of(&r), expected, "{what}: {r}");
        let (head, text) = split_response(&r);
        if expected == Some(200) {
            assert_eq!(text, json, "{what}: {r}");
            assert!(
                !head.lines().any(|l| l == "content-length: 5"),
                "{what}: {r}"
            );
            assert!(!head.contains("x-hop-secret"), "{what}: {r}");
            assert!(!head.contains("retry-after"), "{what}: {r}");
        } else {
            assert!(text.contains("backend_protocol_error"), "{what}: {r}");
        }
        if what == "headers named in connection" {
            assert!(head.contains("x-kept: yes"), "{r}");
        }
        gw.stop().await;
    }
}

/// A request whose bytes all reached a backend is not sent there again on a new connection
/// (the backend may have acted on it); one that makes an object is not sent anywhere else
/// either: a lost answer is a 502, not a second batch.
#[tokio::test]
async fn a_request_written_whole_is_never_replayed() {
    let ok = |body: &str| {
        Act::Answer(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    };
    let batch =
        r#"{"input_file_id":"file-1","endpoint":"/chat/completions","completion_window":"24h"}"#;
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Two backends that answer a first request, keep the connection, then close on the next
    // without a word.
    let answer = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#;
    let (url_a, seen_a) = raw_backend(vec![ok(answer), Act::Close]).await;
    let (url_b, seen_b) = raw_backend(vec![ok(answer), Act::Close]).await;
    let gw = gateway(
        &[B::url("a", url_a), B::url("b", url_b)],
        "max_attempts = 3\nstrategy = \"round_robin\"",
        "",
    )
    .await;
    let addr = gw.gateway.addr;
    // Each backend serves one chat completion and keeps its connection in the gateway's pool.
    let body = chat_body(false);
    for _ in 0..2 {
        let r = raw(addr, chat_request(&body).as_bytes()).await;
        assert_eq!(status_of(&r), Some(200), "{r}");
    }
    let (a0, b0) = (seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len());
    assert_eq!((a0, b0), (1, 1));
    let r = raw(
        addr,
        post("/openai/batches?api-version=2024-10-21", batch).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), Some(502), "{r}");
    assert!(r.contains("after the request was sent"), "{r}");
    let (a1, b1) = (seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len());
    assert_eq!(
        (a1 - a0) + (b1 - b0),
        1,
        "the batch was sent more than once"
    );
    gw.stop().await;

    // A chat completion makes nothing: it moves on to another backend, but never goes to the
    // one that lost it again.
    let (url_a, seen_a) = raw_backend(vec![Act::Close]).await;
    let (url_b, seen_b) = raw_backend(vec![Act::Close]).await;
    let gw = gateway(
        &[B::url("a", url_a), B::url("b", url_b)],
        "max_attempts = 5",
        "",
    )
    .await;
    let body = chat_body(false);
    let r = raw(gw.gateway.addr, chat_request(&body).as_bytes()).await;
    assert_eq!(status_of(&r), Some(502), "{r}");
    assert_eq!(seen_a.lock().unwrap().len(), 1);
    assert_eq!(seen_b.lock().unwrap().len(), 1);
    gw.stop().await;
}

/// A client that reads nothing of a streamed answer is disconnected after
/// `routing.idle_timeout`: its backend connection and in-flight count go with it, on the fast
/// path and on hyper's.
#[tokio::test]
async fn a_client_that_stops_reading_is_let_go_after_the_idle_timeout() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let (url, seen) = raw_backend(vec![Act::Flood(head.to_vec())]).await;
    let gw = gateway(&[B::url("flood", url)], "idle_timeout = \"1s\"", "").await;
    let metrics = gw.gateway.metrics.clone();
    let body = chat_body(true);
    for (what, framing) in [
        (
            "fast path",
            format!("Content-Length: {}\r\n\r\n{body}", body.len()),
        ),
        (
            "hyper",
            format!(
                "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            ),
        ),
    ] {
        let mut conn = TcpStream::connect(gw.gateway.addr).await.unwrap();
        conn.write_all(format!("{HEAD}{framing}").as_bytes())
            .await
            .unwrap();
        // The start of the answer, then nothing more is read.
        let mut first = [0u8; 512];
        conn.read_exact(&mut first).await.unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"), "{what}");
        wait_for(|| metrics.in_flight.get() == 1).await;
        let started = std::time::Instant::now();
        // Once the socket buffers are full, a second of no room lets the client go.
        wait_for(|| metrics.in_flight.get() == 0).await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{what}: let go too soon"
        );
        // The connection is closed: what was buffered drains, then it ends.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PATIENCE, async {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&buf[..n.min(16)]),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{what}: the connection stayed open");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
    gw.stop().await;
}

/// One HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for a chat completion request, every field a plain literal.
fn h2_request_block() -> Vec<u8> {
    let literal = |index: u8, value: &str| {
        let mut b = vec![index, value.len() as u8];
        b.extend_from_slice(value.as_bytes());
        b
    };
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(literal(0x04, "/openai/deployments/gpt-4o/chat/completions")); // :path
    block.extend(literal(0x01, "gw")); // :authority
    block
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads frames until the server closes; returns the GOAWAY error code, if one came.
async fn h2_goaway(conn: &mut TcpStream) -> Option<u32> {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        if bytes[at + 3] == 7 && at + 9 + 8 <= bytes.len() {
            let code = &bytes[at + 13..at + 17];
            return Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
        }
        at += 9 + len;
    }
    None
}

/// HTTP/2 abuse ends the connection with a GOAWAY and costs the backends next to nothing:
/// streams opened and reset at once (rapid reset), and a header block that never ends
/// (CONTINUATION flood).
#[tokio::test]
async fn http2_rapid_resets_and_continuation_floods_end_the_connection() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let addr = gw.gateway.addr;

    // Rapid reset: a thousand streams, each reset as soon as it is opened.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut burst = H2_PREFACE.to_vec();
    burst.extend(h2_frame(4, 0, 0, &[])); // SETTINGS
    let block = h2_request_block();
    for i in 0..1000u32 {
        let stream = 1 + 2 * i;
        burst.extend(h2_frame(1, 0x4 | 0x1, stream, &block)); // HEADERS, END_HEADERS|END_STREAM
        burst.extend(h2_frame(3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = conn.write_all(&burst).await;
    let code = h2_goaway(&mut conn).await;
    assert_eq!(
        code,
        Some(0xb),
        "rapid reset: GOAWAY ENHANCE_YOUR_CALM expected"
    );
    assert!(
        s.requests().len() < 100,
        "rapid reset: {} requests reached the backend",
        s.requests().len()
    );

    // CONTINUATION flood: a header block that goes on and on.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut start = H2_PREFACE.to_vec();
    start.extend(h2_frame(4, 0, 0, &[]));
    start.extend(h2_frame(1, 0, 1, &block)); // HEADERS without END_HEADERS
    conn.write_all(&start).await.unwrap();
    let mut filler = Vec::new();
    for i in 0..100 {
        // Literal without indexing, new name: `x-fill-NN: 100 bytes`.
        let name = format!("x-fill-{i:02}");
        filler.push(0x00);
        filler.push(name.len() as u8);
        filler.extend_from_slice(name.as_bytes());
        filler.push(100);
        filler.extend_from_slice(&[b'a'; 100]);
    }
    let continuation = h2_frame(9, 0, 1, &filler);
    let (mut reader, mut writer) = conn.into_split();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < (64 << 20) && writer.write_all(&continuation).await.is_ok() {
            sent += continuation.len();
        }
        sent
    });
    let mut bytes = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut bytes)).await;
    assert!(
        closed.is_ok(),
        "CONTINUATION flood: the connection stayed open"
    );
    let sent = flood.await.unwrap();
    // What the header block limit (64 KiB) lets in, plus what the two sockets' buffers hold
    // at most on the way.
    let (rmem, wmem) = tcp_buffer_maxima();
    let bound = (rmem + wmem) as usize + (1 << 20);
    assert!(
        sent < bound,
        "CONTINUATION flood: {sent} bytes of one header block went in (bound {bound})"
    );
    // The gateway still serves.
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);
    gw.stop().await;
}
