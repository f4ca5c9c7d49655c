//! Slow and greedy clients: heads and bodies that trickle or stall, connections over the cap.

use super::*;

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
