//! Connection reuse: one connection for sequential requests, the keep-alive race, replays
//! never made, idle connections closed, each worker's own idle list.

use super::*;

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let b = backend(vec![
        reply("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"),
        reply("HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nbye"),
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let body = Bytes::from_static(b"{\"x\":1}");
    let head = b"POST /p?q=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 7\r\n\r\n";
    let (resp, raw) = pool
        .send(head.to_vec(), &body, false, T, Instant::now() + T)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let raw = raw.unwrap();
    assert_eq!(raw.lines, &b"x-a: 1\r\n"[..]);
    assert_eq!(resp.body().size_hint().exact(), Some(5));
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, "hello");
    assert_eq!(
        pools.idle_count(),
        1,
        "back in the pool once the body ended"
    );
    let (status, _, text) = get(&pool, "/two").await.unwrap();
    assert_eq!((status.as_u16(), text.as_str()), (201, "bye"));
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
    let reqs = b.requests.lock().unwrap().clone();
    assert_eq!(
        reqs[0],
        "POST /p?q=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 7\r\n\r\n{\"x\":1}"
    );
    assert!(reqs[1].starts_with("GET /two HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_replaced() {
    // The backend closes each connection after answering, without saying so: the next request
    // finds the pooled connection dead (before or after writing to it) and opens another.
    let b = backend(vec![
        Reply {
            close: true,
            ..reply("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")
        },
        Reply {
            close: true,
            ..reply("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb")
        },
    ])
    .await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    assert_eq!(get(&pool, "/").await.unwrap().2, "a");
    assert_eq!(get(&pool, "/").await.unwrap().2, "b");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);
}

/// A pooled connection whose peer is alive at checkout: `then` is what the peer does with the
/// request that comes on it.
async fn pooled_peer<F, Fut>(pool: &Arc<HostPool>, then: F) -> tokio::task::JoinHandle<()>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (theirs, _) = l.accept().await.unwrap();
    pool.checkin(Conn {
        io: Stream::Tcp(c),
        buf: BytesMut::new(),
        read_size: READ_MIN,
        timer: None,
    });
    tokio::spawn(then(theirs))
}

#[tokio::test]
async fn a_request_written_whole_is_never_sent_again_on_a_new_connection() {
    // The peer reads the whole request and closes without a word: it may have acted on it
    // (made a batch, a file), so the request is not sent again.
    let b = backend(vec![reply("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb")]).await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let closer = pooled_peer(&pool, |mut theirs| async move {
        let _ = read_request(&mut theirs).await;
    })
    .await;
    let r = get(&pool, "/").await;
    closer.await.unwrap();
    let e = r.unwrap_err();
    assert!(e.contains("delivered: true"), "{e}");
    assert!(e.contains("after the request was sent"), "{e}");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 0, "sent again");
}

#[tokio::test]
async fn a_request_a_dead_pooled_connection_would_not_take_goes_on_a_new_one() {
    // The keep-alive race: the backend closes the connection as the request goes out, having
    // read only its start (here, a kilobyte of a 4 MB upload). The write fails, and the
    // request goes whole on a new connection.
    let b = backend(vec![reply("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb")]).await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    let closer = pooled_peer(&pool, |mut theirs| async move {
        let mut start = [0u8; 1024];
        let _ = theirs.read_exact(&mut start).await;
        // Closed with unread bytes: the kernel resets the connection.
    })
    .await;
    let body = Bytes::from(vec![b'x'; 4 << 20]);
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (resp, _) = pool
        .send(head.into_bytes(), &body, false, T, Instant::now() + T)
        .await
        .unwrap();
    closer.await.unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"b");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
    let seen = b.requests.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].len(), head_len(&seen[0]) + (4 << 20));
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let b = backend(vec![reply("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")]).await;
    let pools = pools();
    let pool = pools.host(false, &b.authority);
    get(&pool, "/").await.unwrap();
    let now = Instant::now();
    pools.sweep_once(now + IDLE_TIMEOUT / 2);
    assert_eq!(pools.idle_count(), 1);
    pools.sweep_once(now + IDLE_TIMEOUT + Duration::from_secs(1));
    assert_eq!(pools.idle_count(), 0);
}

/// A connection is registered with the reactor and timer of the runtime that opened it, so
/// each worker runtime takes back only the connections it opened itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn each_worker_reuses_only_its_own_connections() {
    let ok = || reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    let b = backend(vec![ok(), ok(), ok(), ok()]).await;
    let pools = Arc::new(Pools::with_workers(
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
        2,
    ));
    let pool = pools.host(false, &b.authority);
    get(&pool, "/a").await.unwrap();
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
    let p = pool.clone();
    tokio::task::spawn_blocking(move || {
        enter_worker(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            get(&p, "/b").await.unwrap();
            get(&p, "/c").await.unwrap();
        });
    })
    .await
    .unwrap();
    assert_eq!(
        b.accepts.load(Ordering::SeqCst),
        2,
        "worker 1 opened one of its own and reused it"
    );
    get(&pool, "/d").await.unwrap();
    assert_eq!(
        b.accepts.load(Ordering::SeqCst),
        2,
        "worker 0 reused its own"
    );
    assert_eq!(pools.idle_count(), 2);
}
