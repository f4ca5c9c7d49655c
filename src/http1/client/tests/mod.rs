//! The HTTP/1.1 client against hand-written backends on loopback: framing, reuse, the
//! keep-alive race, TLS.

mod reuse;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::body::{chunk_size, front_line};
use super::pool::Stream;
use super::*;

/// What the backend does for one request.
struct Reply {
    bytes: Vec<u8>,
    /// Written one byte at a time, to split heads, chunk lines and CRLFs across reads.
    trickle: bool,
    /// Closes the connection after writing.
    close: bool,
}

fn reply(bytes: &str) -> Reply {
    Reply {
        bytes: bytes.as_bytes().to_vec(),
        trickle: false,
        close: false,
    }
}

struct Backend {
    authority: http::uri::Authority,
    accepts: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

/// A backend that answers requests in order with `replies`, on whatever connection they come.
async fn backend(replies: Vec<Reply>) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let queue = Arc::new(Mutex::new(std::collections::VecDeque::from(replies)));
    let (a, r) = (accepts.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let (queue, requests) = (queue.clone(), r.clone());
            tokio::spawn(async move {
                loop {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    requests.lock().unwrap().push(req);
                    let Some(reply) = queue.lock().unwrap().pop_front() else {
                        return;
                    };
                    if reply.trickle {
                        for b in &reply.bytes {
                            if sock.write_all(&[*b]).await.is_err() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                    } else if sock.write_all(&reply.bytes).await.is_err() {
                        return;
                    }
                    if reply.close {
                        return;
                    }
                }
            });
        }
    });
    Backend {
        authority,
        accepts,
        requests,
        _task: task,
    }
}

/// One request's head and body (by its content-length), as text.
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if sock.read(&mut b).await.ok()? == 0 {
            return None;
        }
        buf.push(b[0]);
    }
    let head = String::from_utf8(buf.clone()).ok()?;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await.ok()?;
    buf.extend_from_slice(&body);
    String::from_utf8(buf).ok()
}

fn pools() -> Pools {
    Pools::new(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    ))
}

const T: Duration = Duration::from_secs(5);

async fn get(pool: &Arc<HostPool>, path: &str) -> Result<(StatusCode, HeaderMap, String), String> {
    let head = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    let (resp, raw) = pool
        .send(
            head.into_bytes(),
            &Bytes::new(),
            false,
            T,
            Instant::now() + T,
        )
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (mut parts, body) = resp.into_parts();
    if let Some(raw) = raw {
        raw.append_to(&mut parts.headers);
    }
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    ))
}

#[tokio::test]
async fn chunked_bodies_split_anywhere_are_decoded() {
    let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                   5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";
    let b = backend(vec![
        Reply {
            trickle: true,
            ..reply(chunked)
        },
        reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let (_, _, text) = get(&pool, "/").await.unwrap();
    assert_eq!(text, "hello 0123456789");
    // The trailers were read to the end, so the connection carries the next exchange.
    assert_eq!(get(&pool, "/").await.unwrap().2, "ok");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_without_length_runs_to_close_and_the_connection_is_not_kept() {
    let b = backend(vec![
        Reply {
            close: true,
            ..reply("HTTP/1.1 200 OK\r\n\r\nuntil the end")
        },
        reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    assert_eq!(get(&pool, "/").await.unwrap().2, "until the end");
    assert_eq!(pools.idle_count(), 0);
    assert_eq!(get(&pool, "/").await.unwrap().2, "ok");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let b = backend(vec![
        reply("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na"),
        reply("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    assert_eq!(get(&pool, "/").await.unwrap().2, "a");
    assert_eq!(pools.idle_count(), 0);
    assert_eq!(get(&pool, "/").await.unwrap().2, "b");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);
}

fn head_len(request: &str) -> usize {
    request.find("\r\n\r\n").unwrap() + 4
}

#[tokio::test]
async fn informational_responses_are_skipped() {
    let b = backend(vec![reply(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )])
    .await;
    let pool = pools().host(false, &b.authority);
    let (status, headers, text) = get(&pool, "/").await.unwrap();
    assert_eq!((status.as_u16(), text.as_str()), (200, "ok"));
    assert!(headers.get("link").is_none());
}

#[tokio::test]
async fn head_204_and_304_have_no_body_whatever_they_announce() {
    let b = backend(vec![
        reply("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
        reply("HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n"),
        reply("HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
        reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let (resp, _) = pool
        .send(
            b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            &Bytes::new(),
            true,
            T,
            Instant::now() + T,
        )
        .await
        .unwrap();
    assert!(resp.body().is_end_stream());
    assert_eq!(get(&pool, "/").await.unwrap().2, "");
    assert_eq!(get(&pool, "/").await.unwrap().2, "");
    assert_eq!(get(&pool, "/").await.unwrap().2, "ok");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
    let b = backend(vec![Reply {
        close: true,
        ..reply("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    }])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let err = get(&pool, "/").await.unwrap_err();
    assert!(
        err.contains("closed the connection before the body ended"),
        "{err}"
    );
    assert_eq!(pools.idle_count(), 0);
}

#[tokio::test]
async fn malformed_answers_are_protocol_errors() {
    let big = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
        "a".repeat(MAX_HEAD + 10)
    );
    for (raw, expect) in [
        ("HELLO\r\n\r\n", "invalid response head"),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nab",
            "conflicting",
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "invalid content-length",
        ),
        (big.as_str(), "larger than"),
    ] {
        let b = backend(vec![reply(raw)]).await;
        let pool = pools().host(false, &b.authority);
        let err = get(&pool, "/").await.unwrap_err();
        assert!(
            err.starts_with("Protocol") && err.contains(expect),
            "{raw:.40}: {err}"
        );
    }
    let b = backend(vec![Reply {
        close: true,
        ..reply("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
    }])
    .await;
    let err = get(&pools().host(false, &b.authority), "/")
        .await
        .unwrap_err();
    assert!(err.contains("invalid chunk size"), "{err}");
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = l.local_addr().unwrap().to_string().parse().unwrap();
    drop(l);
    let err = get(&pools().host(false, &authority), "/")
        .await
        .unwrap_err();
    assert!(err.starts_with("Connect"), "{err}");
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test]
async fn https_backends_are_verified_against_the_roots_and_reused() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&fixture("server.pem"))
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&fixture("server.key")).unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority: http::uri::Authority =
        listener.local_addr().unwrap().to_string().parse().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = accepts.clone();
    let _server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut n = 0;
                loop {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    n += 1;
                    let body = format!("secure {n}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    tls.write_all(resp.as_bytes()).await.unwrap();
                    tls.flush().await.unwrap();
                }
            });
        }
    });

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&fixture("ca.pem")) {
        roots.add(c.unwrap()).unwrap();
    }
    let trusting = Pools::new(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ));
    let pool = trusting.host(true, &authority);
    assert_eq!(get(&pool, "/").await.unwrap().2, "secure 1");
    assert_eq!(get(&pool, "/").await.unwrap().2, "secure 2");
    assert_eq!(accepts.load(Ordering::SeqCst), 1);

    // The same server, from a client that does not trust its CA: refused at the handshake.
    let err = get(&pools().host(true, &authority), "/").await.unwrap_err();
    assert!(
        err.starts_with("Connect") && err.contains("TLS handshake"),
        "{err}"
    );
}

#[tokio::test]
async fn large_bodies_arrive_whole() {
    let big: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let b = backend(vec![
        reply(&format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{big}",
            big.len()
        )),
        reply(&format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
            big.len()
        )),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    assert_eq!(get(&pool, "/").await.unwrap().2, big);
    assert_eq!(get(&pool, "/").await.unwrap().2, big);
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_frame_the_answer_and_are_left_out_of_it() {
    // So is the backend's request id: the gateway answers with its own.
    let b = backend(vec![
        reply(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: gzip, chunked\r\nTE: trailers\r\nTrailer: x-t\r\n\
             Upgrade: h2c\r\nProxy-Authenticate: Basic\r\nProxy-Connection: close\r\n\
             x-end: 1\r\nX-Request-Id: theirs\r\ncontent-type: text/plain\r\n\r\n\
             2\r\nhi\r\n0\r\n\r\n",
        ),
        reply("HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\nCONNECTION: Close\r\n\r\nok"),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let (status, headers, body) = get(&pool, "/").await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "hi"));
    let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-type", "x-end"]);
    assert_eq!(pools.idle_count(), 1, "chunked and keep-alive: reused");

    // A repeated equal length is one length; `connection: close` in any case is honoured.
    let (_, headers, body) = get(&pool, "/").await.unwrap();
    assert_eq!(body, "ok");
    assert_eq!(headers["content-length"], "2, 2");
    assert!(headers.get("connection").is_none());
    assert_eq!(pools.idle_count(), 0, "closed by the backend: not kept");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_deadline_bounds_the_wait_for_a_head_on_a_reused_connection() {
    let b = backend(vec![
        reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        reply(""), // never answers
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    // A far deadline, met: the connection keeps its timer, set for then.
    assert_eq!(get(&pool, "/").await.unwrap().2, "ok");
    // On the same connection, a deadline earlier than the one its timer holds.
    let started = Instant::now();
    let wait = Duration::from_millis(200);
    let r = pool
        .send(
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            &Bytes::new(),
            false,
            T,
            started + wait,
        )
        .await;
    assert!(
        matches!(r, Err(SendError::TimedOut { delivered: true })),
        "{:?}",
        r.err()
    );
    let took = started.elapsed();
    assert!(took >= wait && took < T / 2, "{took:?}");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn headers_the_gateway_does_not_read_pass_on_as_sent() {
    let b = backend(vec![reply(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-ms-region: east\r\n\
         X-RateLimit-Remaining-Tokens: 7\r\napim-request-id:abc\r\nretry-after-ms: 5\r\n\
         Date: Thu, 26 Nov 2026 22:00:00 GMT\r\nx-ms-region: west\r\nx-empty:\r\n\
         x-padded:   v  \r\ncontent-length: 2\r\n\r\nok",
    )])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let (mut resp, raw) = pool
        .send(
            b"GET / HTTP/1.1\r\nhost: h\r\n\r\n".to_vec(),
            &Bytes::new(),
            false,
            T,
            Instant::now() + T,
        )
        .await
        .unwrap();
    // What the balancer, the handler and the server read is in the map...
    let mut names: Vec<&str> = resp.headers().keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "content-length",
            "content-type",
            "retry-after-ms",
            "x-ratelimit-remaining-tokens"
        ]
    );
    // ...and the rest is kept as lines, in order, names as sent.
    let raw = raw.unwrap();
    assert_eq!(
        &raw.lines[..],
        &b"x-ms-region: east\r\napim-request-id: abc\r\nDate: Thu, 26 Nov 2026 22:00:00 GMT\r\n\
          x-ms-region: west\r\nx-empty: \r\nx-padded: v\r\n"[..]
    );
    assert!(raw.date);
    raw.append_to(resp.headers_mut());
    let h = resp.headers();
    let regions: Vec<_> = h.get_all("x-ms-region").iter().collect();
    assert_eq!(regions, ["east", "west"]);
    assert_eq!(h["apim-request-id"], "abc");
    assert_eq!(h["date"], "Thu, 26 Nov 2026 22:00:00 GMT");
    assert_eq!(h["x-empty"], "");
    assert_eq!(h["x-padded"], "v");
    assert_eq!(h.len(), 10);
}

#[test]
fn chunk_sizes_are_hex_digits_only_and_lines_end_at_lf_with_or_without_cr() {
    assert_eq!(chunk_size(b"a"), Ok(10));
    assert_eq!(chunk_size(b"FF"), Ok(255));
    assert_eq!(chunk_size(b"1f ; name=value"), Ok(31));
    assert_eq!(chunk_size(b" 0 "), Ok(0));
    assert_eq!(chunk_size(b"fffffffffffffff"), Ok(0xfff_ffff_ffff_ffff));
    for bad in [
        &b""[..],
        b";x",
        b"+5",
        b"-1",
        b"0x5",
        b"g",
        b"1 2",
        b"1000000000000000",
    ] {
        assert!(
            chunk_size(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(front_line(b"5\r\nhello"), Ok(Some((1, 3))));
    assert_eq!(front_line(b"5\nhello"), Ok(Some((1, 2))));
    assert_eq!(front_line(b"\r\n"), Ok(Some((0, 2))));
    assert_eq!(front_line(b"\n"), Ok(Some((0, 1))));
    assert_eq!(front_line(b"5\r"), Ok(None));
    assert!(front_line(&vec![b'1'; MAX_LINE + 1]).is_err());
}
