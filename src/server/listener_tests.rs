//! The fast HTTP/1.1 path through the listener, with raw bytes on loopback: framing both
//! ways, keep-alive and pipelining, what it hands to hyper, a client that leaves, timeouts and
//! shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{ConnMetrics, ListenOptions, serve};
use crate::body::{BoxBody, ChannelBody, RequestBody, full};
use crate::http1::RawHeaders;

/// What the test handler was given, for the test to look at.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    dropped_unanswered: AtomicBool,
}

struct Gateway {
    addr: std::net::SocketAddr,
    seen: Arc<Seen>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Marks a request whose handler was dropped before it answered.
struct Unanswered(Arc<Seen>, bool);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.1 {
            self.0.dropped_unanswered.store(true, Ordering::SeqCst);
        }
    }
}

/// The handler answers by path:
/// - `/echo`: the body back, with `x-body: full|streaming` saying how it arrived;
/// - `/stream`: three chunks from a channel, 20 ms apart (no known length);
/// - `/short`: declares 10 bytes and sends 3;
/// - `/close`: answers with `connection: close`;
/// - `/raw`: a backend's headers passed on as raw lines, a `date` among them;
/// - `/hang`: never answers.
async fn start(header_timeout: Duration) -> Gateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let s = seen.clone();
    let handler = move |req: Request<RequestBody>| {
        let seen = s.clone();
        async move {
            seen.requests.fetch_add(1, Ordering::SeqCst);
            let mut mark = Unanswered(seen.clone(), false);
            let (parts, body) = req.into_parts();
            let how = match body {
                RequestBody::Full { .. } => "full",
                RequestBody::Streaming(_) => "streaming",
            };
            let resp: Response<BoxBody> = match parts.uri.path() {
                "/echo" => {
                    let bytes = body.collect().await.unwrap().to_bytes();
                    let mut r = Response::new(full(bytes));
                    r.headers_mut().insert("x-body", how.parse().unwrap());
                    r
                }
                "/stream" => {
                    let (tx, body) = ChannelBody::new(4);
                    tokio::spawn(async move {
                        for part in ["one;", "two;", "three"] {
                            tx.send(Ok(Bytes::from(part))).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    });
                    Response::new(BoxBody::new(body))
                }
                "/short" => {
                    let mut r = Response::new(BoxBody::new(http_body_util::StreamBody::new(
                        futures_stream(b"abc"),
                    )));
                    r.headers_mut()
                        .insert("content-length", "10".parse().unwrap());
                    r
                }
                "/close" => {
                    let mut r = Response::new(full("bye"));
                    r.headers_mut()
                        .insert("connection", "close".parse().unwrap());
                    r
                }
                "/raw" => {
                    let raw = RawHeaders {
                        lines: Bytes::from_static(
                            b"X-Raw: 2\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\nx-raw: 3\r\n",
                        ),
                        date: true,
                    };
                    let mut r = Response::new(full("raw").with_passthrough(Some(raw)));
                    r.headers_mut().insert("x-map", "1".parse().unwrap());
                    r
                }
                "/hang" => std::future::pending().await,
                _ => Response::new(full(format!("{} {}", parts.method, parts.uri))),
            };
            mark.1 = true;
            Ok::<_, std::convert::Infallible>(resp)
        }
    };
    let options = ListenOptions {
        grace: Duration::from_secs(5),
        header_read_timeout: header_timeout,
        body_read_timeout: header_timeout * 4,
        max_connections: 100,
        spread: None,
        tls: None,
        metrics: ConnMetrics::default(),
        stall: crate::stall::StallLimit::new(Duration::from_secs(30)),
    };
    let task = tokio::spawn(serve(listener, handler, stop.clone(), options));
    Gateway {
        addr,
        seen,
        stop,
        task,
    }
}

/// A body of one data frame whose stream then ends (its size is not known in advance).
fn futures_stream(
    bytes: &'static [u8],
) -> impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, crate::body::BoxError>> {
    futures_util::stream::iter([Ok(http_body::Frame::data(Bytes::from_static(bytes)))])
}

/// One response off `sock`: status line and headers (lower-cased names), and the body as
/// framed (content-length or chunked; `None` when the connection ended first).
async fn read_response(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(sock, buf).await?;
    };
    let head = String::from_utf8(buf[..head_end].to_vec())
        .unwrap()
        .to_lowercase();
    buf.drain(..head_end);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    };
    let mut body = Vec::new();
    if let Some(n) = header("content-length") {
        let n: usize = n.parse().unwrap();
        while buf.len() < n {
            read_more(sock, buf).await?;
        }
        body.extend(buf.drain(..n));
    } else if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                read_more(sock, buf).await?;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                read_more(sock, buf).await?;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    }
    Some((head, body))
}

/// A connection to `addr` with `bytes` already sent.
async fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(bytes).await.unwrap();
    sock
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match sock.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// Whether the gateway closed the connection (EOF or reset), reading past anything it sent.
async fn closed(sock: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or(false)
}

const POST: &str = "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}";

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let gw = start(Duration::from_secs(30)).await;
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    // Two requests in one write, then a third after the answers.
    sock.write_all(format!("{POST}GET /x?q=1 HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        head.contains("x-body: full"),
        "the fast path read the body: {head}"
    );
    assert!(head.contains("date: "), "{head}");
    assert_eq!(body, b"{\"a\":1}");
    let (_, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(body, b"GET /x?q=1");
    sock.write_all(POST.as_bytes()).await.unwrap();
    let (_, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(body, b"{\"a\":1}");
    assert_eq!(gw.seen.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_still_served() {
    let gw = start(Duration::from_secs(30)).await;
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.set_nodelay(true).unwrap();
    for b in POST.as_bytes() {
        sock.write_all(&[*b]).await.unwrap();
    }
    let (head, body) = read_response(&mut sock, &mut Vec::new()).await.unwrap();
    assert!(head.contains("x-body: full"), "{head}");
    assert_eq!(body, b"{\"a\":1}");
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_and_each_chunk_goes_out_as_it_comes() {
    let gw = start(Duration::from_secs(30)).await;
    let mut sock = send(gw.addr, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n").await;
    // The first chunk arrives while the body is still open (the rest is 40 ms away).
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"one;") {
        read_more(&mut sock, &mut buf).await.unwrap();
    }
    assert!(!buf.windows(4).any(|w| w == b"two;"));
    let (head, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(body, b"one;two;three");
    // And the connection is good for another request.
    sock.write_all(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(body, b"GET /again");
}

#[tokio::test]
async fn connection_close_from_either_side_closes_after_the_answer() {
    let gw = start(Duration::from_secs(30)).await;
    let mut sock = send(
        gw.addr,
        b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"GET /a");
    assert!(closed(&mut sock).await);

    let mut sock = send(gw.addr, b"GET /close HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (head, body) = read_response(&mut sock, &mut Vec::new()).await.unwrap();
    assert_eq!(head.matches("connection: close").count(), 1, "{head}");
    assert_eq!(body, b"bye");
    assert!(closed(&mut sock).await);
}

#[tokio::test]
async fn a_body_shorter_than_its_length_is_cut_not_passed_off_as_whole() {
    let gw = start(Duration::from_secs(30)).await;
    let mut sock = send(gw.addr, b"GET /short HTTP/1.1\r\nhost: x\r\n\r\n").await;
    // Three of the ten bytes, then the connection ends: the client cannot take it as whole.
    assert!(read_response(&mut sock, &mut Vec::new()).await.is_none());
}

#[tokio::test]
async fn what_the_fast_path_does_not_serve_goes_to_hyper_with_the_bytes_read() {
    let gw = start(Duration::from_secs(30)).await;
    let cases: [(&str, &str); 4] = [
        (
            "chunked upload",
            "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "HTTP/1.0",
            "POST /echo HTTP/1.0\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
        ),
        (
            "expect",
            "POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\nabc",
        ),
        (
            // hyper takes repeated equal lengths; it decides, as before the fast path.
            "a second content-length",
            "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
        ),
    ];
    for (what, raw) in cases {
        let mut sock = send(gw.addr, raw.as_bytes()).await;
        let mut buf = Vec::new();
        // hyper reads the rest; an interim 100 Continue may come first.
        let (mut head, mut body) = read_response(&mut sock, &mut buf).await.unwrap();
        if head.starts_with("http/1.1 100") {
            (head, body) = read_response(&mut sock, &mut buf).await.unwrap();
        }
        assert!(head.contains("x-body: streaming"), "{what}: {head}");
        assert_eq!(body, b"abc", "{what}");
    }

    // A body over 1 MiB is streamed by hyper, whole.
    let big = vec![b'x'; (1 << 20) + 10];
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    let (mut rd, mut wr) = sock.split();
    let send = async {
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&big).await.unwrap();
    };
    let mut buf = Vec::new();
    let recv = async {
        let mut all = Vec::new();
        let mut chunk = vec![0u8; 65536];
        loop {
            let n = rd.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early");
            all.extend_from_slice(&chunk[..n]);
            if let Some(i) = all.windows(4).position(|w| w == b"\r\n\r\n")
                && all.len() >= i + 4 + big.len()
            {
                return all;
            }
        }
    };
    let ((), all) = tokio::join!(send, recv);
    buf.extend(all);
    let text = String::from_utf8_lossy(&buf[..200]).to_lowercase();
    assert!(text.contains("x-body: streaming"), "{text}");
    assert!(buf.ends_with(&big));

    // HTTP/2 with prior knowledge is hyper's too.
    let sock = TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(sock),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            Request::post(format!("http://{}/echo", gw.addr))
                .body(http_body_util::Full::new(Bytes::from_static(b"h2")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-body"], "streaming");
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "h2");
}

#[tokio::test]
async fn a_request_target_the_gateway_cannot_use_gets_a_json_400() {
    let gw = start(Duration::from_secs(30)).await;
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    // httparse takes `<` in a target; `http::Uri` does not.
    sock.write_all(b"GET /a<b> HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut sock, &mut Vec::new()).await.unwrap();
    assert!(head.starts_with("http/1.1 400"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(gw.seen.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_that_leaves_takes_its_request_with_it() {
    let gw = start(Duration::from_secs(30)).await;
    let sock = send(gw.addr, b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n").await;
    while gw.seen.requests.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    drop(sock);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !gw.seen.dropped_unanswered.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the handler was not dropped when its client left");
}

#[tokio::test]
async fn idle_connections_and_half_sent_requests_time_out() {
    let gw = start(Duration::from_millis(300)).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    let mut half = send(gw.addr, b"POST /echo HTTP/1.1\r\nhost: x\r\n").await;
    // A whole head, then 3 of the 10 body bytes it declares, then nothing.
    let mut stalled = send(
        gw.addr,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
    )
    .await;
    assert!(closed(&mut idle).await);
    assert!(closed(&mut half).await);
    assert!(closed(&mut stalled).await);
    assert_eq!(gw.seen.requests.load(Ordering::SeqCst), 0);

    // The connection's one timer starts over for each head: served twice, slower in all than
    // the timeout, then closed once idle for it.
    let mut served = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        served
            .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (_, body) = read_response(&mut served, &mut buf).await.unwrap();
        assert_eq!(body, b"GET /a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed(&mut served).await);
    assert_eq!(gw.seen.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_lets_answers_finish() {
    let gw = start(Duration::from_secs(30)).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    // Served once, so the connection is known to the fast path and now idle.
    idle.write_all(b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut idle, &mut Vec::new()).await.unwrap();
    let mut busy = send(gw.addr, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"one;") {
        read_more(&mut busy, &mut buf).await.unwrap();
    }
    gw.stop.cancel();
    assert!(closed(&mut idle).await);
    // The stream in flight still ends whole.
    let (_, body) = read_response(&mut busy, &mut buf).await.unwrap();
    assert_eq!(body, b"one;two;three");
    assert!(closed(&mut busy).await);
    tokio::time::timeout(Duration::from_secs(10), gw.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn raw_header_lines_are_written_once_on_either_path_and_a_backend_date_is_kept() {
    let gw = start(Duration::from_secs(30)).await;
    for (what, req) in [
        ("fast path", "GET /raw HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("hyper", "GET /raw HTTP/1.0\r\nhost: x\r\n\r\n"),
    ] {
        let mut sock = send(gw.addr, req.as_bytes()).await;
        let mut buf = Vec::new();
        let (head, body) = read_response(&mut sock, &mut buf).await.unwrap();
        assert_eq!(body, b"raw", "{what}");
        let lines: Vec<&str> = head.lines().skip(1).collect();
        let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count("x-map: 1"), 1, "{what}: {head}");
        assert_eq!(count("x-raw: 2"), 1, "{what}: {head}");
        assert_eq!(count("x-raw: 3"), 1, "{what}: {head}");
        assert_eq!(count("date: "), 1, "{what}: {head}");
        assert_eq!(count("date: thu, 01 jan 2026"), 1, "{what}: {head}");
    }
}
