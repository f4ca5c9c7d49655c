//! Worker runtimes (`server::Workers`): the client listener's connections served by
//! single-threaded runtimes beside the one that started the gateway, as `switchyard serve`
//! runs it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchyard::config::Config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ANSWER: &str =
    r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;

/// A keep-alive backend that answers every request with `ANSWER`; counts its connections.
async fn backend() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut sock = tokio::io::BufReader::new(sock);
                loop {
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if sock.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        len = content_length(&line).unwrap_or(len);
                    }
                    let mut body = vec![0; len];
                    sock.read_exact(&mut body).await.unwrap();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
                        ANSWER.len()
                    );
                    sock.get_mut().write_all(answer.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (url, accepted)
}

/// The length a `content-length` header line gives; `None` for any other line.
fn content_length(line: &str) -> Option<usize> {
    let (name, value) = line.split_once(':')?;
    name.eq_ignore_ascii_case("content-length")
        .then(|| value.trim().parse().unwrap())
}

/// One keep-alive chat completion over `conn`: the status line and the body.
fn chat(conn: &mut BufReader<TcpStream>) -> (String, String) {
    let body = common::chat_body(false);
    let head = format!(
        "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n\
         host: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let sock = conn.get_mut();
    sock.write_all(head.as_bytes()).unwrap();
    sock.write_all(body.as_bytes()).unwrap();
    let mut status = String::new();
    conn.read_line(&mut status).unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        len = content_length(&line).unwrap_or(len);
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).unwrap();
    (
        status.trim_end().to_string(),
        String::from_utf8(body).unwrap(),
    )
}

/// Two connections open at once go to two runtimes: the one that accepts keeps the first and
/// hands the second to the worker, which has none. Each runtime then reaches the backend over
/// a connection of its own and reuses it, so requests in turns over the two client
/// connections open exactly two backend connections. Shutdown ends both.
#[test]
fn connections_are_spread_over_the_runtimes_and_each_keeps_its_backend_connections() {
    switchyard::install_crypto_provider();
    let backends_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (url, backend_conns) = backends_rt.block_on(backend());
    let text = common::config_text(&[common::B::url("only", url)], "", "", "");
    let cfg = Config::parse(&text, &|_: &str| None).unwrap();

    let shutdown = CancellationToken::new();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let stop = shutdown.clone();
        let serving = s.spawn(move || {
            // As `serve` runs: this thread's runtime and one worker beside it.
            let shutdown = stop;
            switchyard::server::per_core(2, None, |workers| async move {
                let gw = switchyard::server::start_on(cfg, None, shutdown.clone(), &workers)
                    .await
                    .unwrap();
                addr_tx.send(gw.addr).unwrap();
                shutdown.cancelled().await;
                gw.wait().await;
            })
            .unwrap()
        });
        // Cancelled however this closure ends, a failed assertion included, so the serving
        // thread ends and the scope can join it.
        let _stop = shutdown.clone().drop_guard();
        let addr = addr_rx.recv().unwrap();
        let connect = || {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            BufReader::new(s)
        };
        let mut first = connect();
        assert_eq!(chat(&mut first).0, "HTTP/1.1 200 OK");
        let mut second = connect();
        for round in 0..3 {
            for c in [&mut second, &mut first] {
                let (status, body) = chat(c);
                assert_eq!(status, "HTTP/1.1 200 OK", "round {round}: {body}");
                assert_eq!(body, ANSWER);
            }
        }
        assert_eq!(
            backend_conns.load(Ordering::SeqCst),
            2,
            "one backend connection per runtime, each reused"
        );
        shutdown.cancel();
        serving.join().unwrap();
        for c in [&mut first, &mut second] {
            let mut rest = Vec::new();
            assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "closed at shutdown");
        }
    });
}

/// A thread's allocator cache can only be flushed by the thread itself, so the chore must run
/// on every worker's own thread, again and again, and stop with the workers.
#[test]
fn the_thread_chore_runs_on_each_workers_own_thread_until_they_stop() {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let chore = switchyard::server::ThreadChore {
        every: Duration::from_millis(10),
        run: Arc::new(move || {
            let name = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            let _ = tx.send(name);
        }),
    };
    let workers = switchyard::server::Workers::start(2, Some(chore)).unwrap();
    let mut runs = std::collections::HashMap::<String, usize>::new();
    while runs.len() < 2 || runs.values().any(|n| *n < 3) {
        let name = rx.recv_timeout(Duration::from_secs(10)).expect("chore ran");
        *runs.entry(name).or_default() += 1;
    }
    let mut names: Vec<_> = runs.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["switchyard-worker-1", "switchyard-worker-2"]);
    workers.stop();
    // The threads are joined and the chore (with its sender) dropped: the channel ends.
    while rx.recv_timeout(Duration::from_secs(10)).is_ok() {}
    assert!(matches!(
        rx.try_recv(),
        Err(std::sync::mpsc::TryRecvError::Disconnected)
    ));
}
