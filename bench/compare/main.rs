//! The streaming half of `bench/compare.sh`: time to first byte and the gaps between chunks of
//! streamed chat completions, and many streams held open at once. Prints its figures as JSON.
//!
//!   cargo run --release --example compare -- latency ROUNDS PER_ROUND URL...
//!   cargo run --release --example compare -- stream ROUNDS PER_ROUND TOKENS TOKEN_MS URL...
//!   cargo run --release --example compare -- hold URL STREAMS TOKENS TOKEN_MS READY_FILE
//!
//! `latency` sends plain chat completions one at a time, taking the targets in turns (PER_ROUND
//! requests each, ROUNDS times), so a noisy moment on a shared machine hits every target alike;
//! it reports p50 and p99 of the time to the whole response per target. `stream` takes the
//! targets in turns the same way.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark fails loudly and prints its tables"
)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const PATH: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(c)
}

fn request(base: &str, tokens: u32, token_ms: u64) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"Hello there"}}],"max_tokens":{tokens},"stream":true}}"#
    );
    http::Request::post(format!("{base}{PATH}"))
        .header("content-type", "application/json")
        .header("x-sim-token-ms", token_ms.to_string())
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One stream: (time to first body byte, gaps between data frames), or None on failure.
async fn one(c: &HttpClient, req: http::Request<Full<Bytes>>) -> Option<(Duration, Vec<Duration>)> {
    let start = Instant::now();
    let resp = c.request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = start;
    let mut gaps = Vec::new();
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Ok(d) = frame.into_data() {
            if d.is_empty() {
                continue;
            }
            let now = Instant::now();
            match first {
                None => first = Some(now - start),
                Some(_) => gaps.push(now - last),
            }
            last = now;
            data.extend_from_slice(&d);
        }
    }
    let complete = data.ends_with(b"data: [DONE]\n\n");
    complete.then(|| (first.unwrap_or_default(), gaps))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // One request at a time, the client runs on one thread: on a multi-threaded runtime each
    // answer also woke the client's second thread, whose turn on these two shared cores landed
    // in every measurement, and most in the proxied ones (two more wake-ups per request). The
    // 2,000 held streams keep both threads.
    let runtime = match args.get(1).map(String::as_str) {
        Some("hold") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    runtime.unwrap().block_on(run(args));
}

async fn run(args: Vec<String>) {
    let usage = "usage: compare latency ROUNDS PER_ROUND URL... | stream ROUNDS PER_ROUND TOKENS TOKEN_MS URL... | hold URL STREAMS TOKENS TOKEN_MS READY_FILE";
    let arg = |i: usize| args.get(i).expect(usage).clone();
    let c = client();
    match arg(1).as_str() {
        "latency" => {
            let rounds: usize = arg(2).parse().unwrap();
            let per: usize = arg(3).parse().unwrap();
            let urls: Vec<String> = args[4..].to_vec();
            let body = r#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}"#;
            let req = |base: &str| {
                http::Request::post(format!("{base}{PATH}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap()
            };
            let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds * per); urls.len()];
            let mut failed = vec![0usize; urls.len()];
            // Warm every connection and both ends first.
            for u in &urls {
                for _ in 0..200 {
                    let _ = c.request(req(u)).await.unwrap().into_body().collect().await;
                }
            }
            for _ in 0..rounds {
                for (i, u) in urls.iter().enumerate() {
                    for _ in 0..per {
                        let start = Instant::now();
                        let ok = match c.request(req(u)).await {
                            Ok(r) if r.status().is_success() => {
                                r.into_body().collect().await.is_ok()
                            }
                            _ => false,
                        };
                        if ok {
                            samples[i].push(start.elapsed().as_secs_f64() * 1e6);
                        } else {
                            failed[i] += 1;
                        }
                    }
                }
            }
            let out: Vec<serde_json::Value> = urls
                .iter()
                .zip(samples.iter_mut())
                .zip(failed)
                .map(|((u, s), f)| {
                    serde_json::json!({"url": u, "n": s.len(), "failed": f,
                        "p50_us": pct(s, 0.5), "p99_us": pct(s, 0.99)})
                })
                .collect();
            println!("{}", serde_json::Value::from(out));
        }
        "stream" => {
            let (rounds, per, tokens, ms) = (
                arg(2).parse::<usize>().unwrap(),
                arg(3).parse::<usize>().unwrap(),
                arg(4).parse().unwrap(),
                arg(5).parse().unwrap(),
            );
            let urls: Vec<String> = args[6..].to_vec();
            // Warm every connection and both ends.
            for u in &urls {
                for _ in 0..20 {
                    one(&c, request(u, tokens, ms)).await;
                }
            }
            let mut ttfb = vec![Vec::with_capacity(rounds * per); urls.len()];
            let mut gaps = vec![Vec::new(); urls.len()];
            let mut failed = vec![0usize; urls.len()];
            for _ in 0..rounds {
                for (i, u) in urls.iter().enumerate() {
                    for _ in 0..per {
                        match one(&c, request(u, tokens, ms)).await {
                            Some((t, g)) => {
                                ttfb[i].push(t.as_secs_f64() * 1e6);
                                gaps[i].extend(g.iter().map(|d| d.as_secs_f64() * 1e6));
                            }
                            None => failed[i] += 1,
                        }
                    }
                }
            }
            let out: Vec<serde_json::Value> = (0..urls.len())
                .map(|i| {
                    serde_json::json!({
                        "url": urls[i], "streams": rounds * per, "failed": failed[i],
                        "ttfb_p50_us": pct(&mut ttfb[i], 0.5), "ttfb_p99_us": pct(&mut ttfb[i], 0.99),
                        "gap_p50_us": pct(&mut gaps[i], 0.5), "gap_p99_us": pct(&mut gaps[i], 0.99),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::from(out));
        }
        "hold" => {
            let (url, n, tokens, ms, ready) = (
                arg(2),
                arg(3).parse::<usize>().unwrap(),
                arg(4).parse().unwrap(),
                arg(5).parse().unwrap(),
                arg(6),
            );
            let opened = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
            let mut set = tokio::task::JoinSet::new();
            let started = Instant::now();
            for _ in 0..n {
                let (c, url, opened) = (c.clone(), url.clone(), opened.clone());
                set.spawn(async move {
                    let resp = c.request(request(&url, tokens, ms)).await.ok()?;
                    if !resp.status().is_success() {
                        return None;
                    }
                    let mut body = resp.into_body();
                    let mut signalled = false;
                    let mut data = Vec::new();
                    while let Some(frame) = body.frame().await {
                        if let Ok(d) = frame.ok()?.into_data() {
                            if !signalled {
                                opened.add_permits(1);
                                signalled = true;
                            }
                            data.extend_from_slice(&d);
                        }
                    }
                    Some(data.ends_with(b"data: [DONE]\n\n"))
                });
            }
            // Every stream has its first chunk: tell the harness to take its measurement.
            let all = tokio::time::timeout(Duration::from_secs(120), opened.acquire_many(n as u32))
                .await
                .expect("not every stream opened within 120 s")
                .unwrap();
            all.forget();
            let open_after = started.elapsed();
            std::fs::write(&ready, b"open").unwrap();
            let mut complete = 0;
            while let Some(r) = set.join_next().await {
                if matches!(r, Ok(Some(true))) {
                    complete += 1;
                }
            }
            println!(
                "{}",
                serde_json::json!({
                    "streams": n, "complete": complete,
                    "all_open_after_ms": open_after.as_millis() as u64,
                    "total_ms": started.elapsed().as_millis() as u64,
                })
            );
        }
        _ => panic!("{usage}"),
    }
}
