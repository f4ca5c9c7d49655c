//! Hostile backends, answering in raw bytes: what they get wrong never reaches the client as if
//! it were right, nothing is sent to them twice, and a client that stops reading lets go of them.

use super::*;

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
