//! Worker runtimes (`server::Workers`): the client listener served by single-threaded runtimes
//! beside the one that started the gateway, as `switchyard serve` runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use switchyard::config::Config;
use tokio_util::sync::CancellationToken;

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
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            len = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).unwrap();
    (
        status.trim_end().to_string(),
        String::from_utf8(body).unwrap(),
    )
}

/// While the runtime that started the gateway is not running at all, a worker alone accepts
/// the connections, proxies them over backend connections of its own and answers; shutdown
/// then ends its accept loop and connections, and the worker thread stops.
#[test]
fn a_worker_runtime_serves_connections_on_its_own() {
    switchyard::install_crypto_provider();
    let backends_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (sims, bs) = backends_rt.block_on(common::start_sims(&["a"]));
    let text = common::config_text(&bs, "", "", "");
    let cfg = Config::parse(&text, &|_: &str| None).unwrap();

    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let workers = switchyard::server::Workers::start(1).unwrap();
    let shutdown = CancellationToken::new();
    let gw = main
        .block_on(switchyard::server::start_on(
            cfg,
            None,
            shutdown.clone(),
            workers.handles(),
        ))
        .unwrap();

    // `main` is not driven from here on: its accept loop never runs.
    let mut conns: Vec<_> = (0..3)
        .map(|_| {
            let s = TcpStream::connect(gw.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            BufReader::new(s)
        })
        .collect();
    for round in 0..2 {
        for c in &mut conns {
            let (status, body) = chat(c);
            assert_eq!(status, "HTTP/1.1 200 OK", "round {round}: {body}");
            assert!(body.contains("\"usage\""), "{body}");
        }
    }
    assert_eq!(sims[0].stats().ok, 6);

    shutdown.cancel();
    main.block_on(gw.wait());
    let mut rest = Vec::new();
    let closed = conns[0].read_to_end(&mut rest).unwrap();
    assert_eq!(closed, 0, "idle connections are closed at shutdown");
    workers.stop();
    backends_rt.block_on(async {
        for s in sims {
            s.stop().await;
        }
    });
}
