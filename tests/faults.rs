//! The fault matrix, the parts not covered next to the features they test (gateway.rs,
//! balancing.rs): every retryable 5xx, bodies cut short, malformed JSON and SSE from a
//! backend, and a client too slow to read a long stream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use switchyard::sim::Faults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw backend does after its scripted bytes.
#[derive(Clone, Copy)]
enum Then {
    Close,
    /// Writes `data: x…` SSE events for as long as the peer takes them.
    Flood,
}

/// A raw backend's counters: bytes it managed to write, connections it is done with.
#[derive(Default)]
struct Counts {
    written: AtomicU64,
    finished: AtomicU64,
}

/// A backend that reads each request's head and body, then writes `script` byte for byte and
/// does `then`.
async fn raw_backend(script: &'static [u8], then: Then) -> (String, Arc<Counts>) {
    let listener = TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counts = Arc::new(Counts::default());
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counts = shared.clone();
            tokio::spawn(async move {
                read_request(&mut s).await;
                if s.write_all(script).await.is_ok() {
                    counts
                        .written
                        .fetch_add(script.len() as u64, Ordering::Relaxed);
                    if let Then::Flood = then {
                        let event = format!("data: {}\n\n", "x".repeat(16 * 1024));
                        while s.write_all(event.as_bytes()).await.is_ok() {
                            counts
                                .written
                                .fetch_add(event.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
                counts.finished.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    (url, counts)
}

async fn read_request(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return;
        }
    }
}

async fn in_flight_is_zero(admin: &str) {
    let c = client();
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if metric_value(&c, admin, "switchyard_in_flight_requests ").await == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "requests stayed in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retryable_5xx_fails_over_and_nothing_is_lost() {
    for status in [500, 502, 503, 504] {
        let bad = start_sim(sim("bad")).await;
        bad.set_faults(Faults {
            error_rate: 1.0,
            error_status: status,
            ..Faults::default()
        })
        .await;
        let good = start_sim(sim("good")).await;
        let gw = gateway(&[B::sim(&bad), B::sim(&good)], "", "").await;
        let c = client();
        for stream in [false, true, false, true] {
            let r = send_chat(&c, &gw.base, stream).await;
            assert_eq!(r.status(), 200, "{status}");
            assert_eq!(header(&r, "x-switchyard-backend"), "good", "{status}");
            let body = r.text().await.unwrap();
            assert!(
                !stream || body.ends_with("data: [DONE]\n\n"),
                "{status}: {body}"
            );
        }
        assert!(
            bad.stats().faulted >= 1,
            "{status}: the bad backend was tried"
        );
        assert_eq!(good.stats().ok, 4, "{status}");
        in_flight_is_zero(&gw.admin).await;
        gw.stop().await;
    }
}

/// A plain answer whose body ends before its content-length: the client must not take the
/// short body for the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_an_error_not_a_short_answer() {
    let (url, _) = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"choices\":[",
        Then::Close,
    )
    .await;
    let gw = gateway(&[B::url("cut", url)], "", "").await;
    // Either the head is out before the cut and the body then fails, or the cut comes
    // before the head was flushed and the connection closes: never a complete short answer.
    let sent = client()
        .post(gw.url(CHAT))
        .header("content-type", "application/json")
        .body(chat_body(false))
        .send()
        .await;
    if let Ok(r) = sent {
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.is_err(), "a cut body must fail");
    }
    let m = metrics_text(&client(), &gw.admin).await;
    assert!(
        m.contains("switchyard_stream_errors_total{backend=\"cut\"} 1"),
        "{m}"
    );
    in_flight_is_zero(&gw.admin).await;
    gw.stop().await;
}

/// The gateway reads usage out of answers but passes them on as they are: a backend's broken
/// JSON or SSE reaches the client byte for byte and costs the gateway nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_sse_from_a_backend_pass_through_untouched() {
    const JSON_BODY: &str = "{\"usage\": {\"prompt_tokens\": 12, \"completion_tok";
    const SSE_BODY: &str = "data: {\"usage\":{\"prompt_tokens\":\n\ndata: {]\n\n: comment\n\nevent\n\ndata: [DONE]\n\n";
    let json: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{JSON_BODY}",
            JSON_BODY.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let sse: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{SSE_BODY}\r\n0\r\n\r\n",
            SSE_BODY.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    for (script, want, stream) in [(json, JSON_BODY, false), (sse, SSE_BODY, true)] {
        let (url, _) = raw_backend(script, Then::Close).await;
        let gw = gateway_with(
            &[B::url("odd", url)],
            "",
            "",
            "\n[[consumers]]\nname = \"team\"\nkey = \"team-key-0123456789\"\ntokens_per_minute = 100000\n",
        )
        .await;
        let r = client()
            .post(gw.url(CHAT))
            .header("api-key", "team-key-0123456789")
            .header("content-type", "application/json")
            .body(chat_body(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), want);
        let m = metrics_text(&client(), &gw.admin).await;
        assert!(
            !m.contains("switchyard_tokens_total{"),
            "no usage was read: {m}"
        );
        assert!(!m.contains("switchyard_stream_errors_total{"), "{m}");
        in_flight_is_zero(&gw.admin).await;
        gw.stop().await;
    }
}

/// A client that stops reading a long stream holds the backend back through TCP flow control:
/// the gateway does not buffer the stream for it. What the backend gets to write is bounded by
/// the kernel's socket buffers on the way (loopback can grow them to their configured maxima),
/// not by the stream's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_back_the_backend_not_the_gateways_memory() {
    let (url, counts) = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        Then::Flood,
    )
    .await;
    let gw = gateway(&[B::url("flood", url)], "", "").await;
    let body = chat_body(true);
    let mut conn = TcpStream::connect(gw.gateway.addr).await.unwrap();
    conn.write_all(
        format!(
            "POST {CHAT} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read the start of the answer, then stop reading.
    let mut first = [0u8; 1024];
    conn.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));

    // Wait until the backend is stuck: no progress over half a second.
    let stuck = tokio::time::timeout(Duration::from_secs(30), async {
        let mut last = u64::MAX;
        loop {
            let now = counts.written.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("the backend never stopped writing: nothing held it back");
    // Receive and send buffers on both of the gateway's sockets, and the client's receive
    // buffer and the backend's send buffer, at most; plus a few MB of the gateway's own.
    let (rmem, wmem) = tcp_buffer_maxima();
    let bound = 2 * (rmem + wmem) + 8 * 1024 * 1024;
    eprintln!("backend stuck after {stuck} bytes (bound {bound})");
    assert!(
        stuck < bound,
        "the backend wrote {stuck} bytes for a client that read 1 KiB (bound {bound})"
    );
    assert!(stuck > 1024 * 1024, "the stream did flow: {stuck}");

    // The client leaves: the backend's request is cancelled (its connection closes, so its
    // writes fail) and nothing stays in flight.
    assert_eq!(counts.finished.load(Ordering::Relaxed), 0);
    drop(conn);
    let cancelled = tokio::time::timeout(Duration::from_secs(10), async {
        while counts.finished.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(cancelled.is_ok(), "the backend kept streaming to nobody");
    in_flight_is_zero(&gw.admin).await;
    gw.stop().await;
}
