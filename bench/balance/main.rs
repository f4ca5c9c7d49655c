//! Balance benchmark: how much of its backends' capacity the gateway turns into served tokens,
//! per strategy, under load below and above that capacity; and how each strategy copes with
//! one backend five times slower than the others. Loopback only, bounded in time.
//!
//!     cargo run --release --example balance [-- --seconds 20]
//!
//! Three simulated Azure OpenAI backends with tokens-per-minute limits of 60k, 60k and 30k, the
//! first at priority 1 (the PTU), the others at priority 2 (pay-as-you-go), are driven open-loop
//! at 80 % and 120 % of their aggregate capacity. Requests are plain chat completions charged
//! and served at prompt + 100 tokens. Each run has a 5 s warm-up that is not measured, so the
//! figures show steady-state throughput, not the first minute's burst. Then one backend is made
//! five times slower than the others. Writes `bench/results/balance-<date>.md`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark fails loudly and prints its tables"
)]

#[path = "../common.rs"]
mod common;
use common::today;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use switchyard::config::Config;
use switchyard::sim::{SimConfig, Simulator};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const TPM: [u32; 3] = [60_000, 60_000, 30_000];
const PRIORITY: [u32; 3] = [1, 2, 2];
const NAMES: [&str; 3] = ["ptu-a", "paygo-b", "paygo-c"];
const COMPLETION: u32 = 100;
/// Buckets start 2 % full, and the first `WARMUP` of each run is not measured: by then, above
/// capacity, that head start is spent and the figures show the steady state.
const FILL: f64 = 0.02;
const WARMUP: Duration = Duration::from_secs(5);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Sample {
    /// When the request started, from the start of the run.
    at: Duration,
    status: u16,
    retry_after: bool,
    backend: Option<usize>,
    latency: Duration,
    tokens: u64,
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let run = Duration::from_secs(seconds);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(http);

    let prompt_tokens = measure_prompt_tokens(&client).await;
    let per_request = f64::from(prompt_tokens + COMPLETION);
    let capacity_per_sec: f64 = TPM.iter().map(|t| f64::from(*t) / 60.0).sum();
    let mut out = String::new();
    out.push_str(&format!(
        "## Throttled backends: TPM 60k (priority 1), 60k, 30k (priority 2); {seconds} s per row\n\n\
         Capacity {capacity_per_sec:.0} tokens/s = {:.1} requests/s of {per_request:.0} tokens. \
         Each row: {} s warm-up, then {seconds} s measured; figures are for requests started in the measured part.\n\n\
         | strategy | load | sent | ok | 429 (with retry-after) | other errors | served tokens / capacity | p50 ms | p99 ms | share a/b/c | PTU used |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
        capacity_per_sec / per_request,
        WARMUP.as_secs()
    ));
    for strategy in switchyard::config::Strategy::ALL.map(|s| s.as_str()) {
        for load in [0.8, 1.2] {
            let rate = load * capacity_per_sec / per_request;
            let samples = throttled_run(&client, strategy, rate, run).await;
            let row = throttled_row(strategy, load, &samples, run, capacity_per_sec);
            eprintln!("{row}");
            out.push_str(&row);
            out.push('\n');
        }
    }

    out.push_str(&format!(
        "\n## One backend 5x slower (no rate limits, 40 requests/s, {seconds} s per row)\n\n\
         | strategy | p50 ms | p99 ms | fast backends' own p99 ms | p99 / fast p99 | slow backend's share |\n\
         |---|---:|---:|---:|---:|---:|\n"
    ));
    for strategy in switchyard::config::Strategy::ALL.map(|s| s.as_str()) {
        let samples = slow_run(&client, strategy, 40.0, run).await;
        let row = slow_row(strategy, &samples);
        eprintln!("{row}");
        out.push_str(&row);
        out.push('\n');
    }

    let date = today();
    let path = format!("bench/results/balance-{date}.md");
    let doc = format!(
        "# Balance benchmark, {date}\n\n`cargo run --release --example balance -- --seconds {seconds}` on {} cores.\n\n{out}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    match std::fs::write(&path, &doc) {
        Ok(()) => eprintln!("\nwrote {path}"),
        Err(e) => eprintln!("\ncould not write {path}: {e}"),
    }
    println!("{doc}");
}

fn body() -> Bytes {
    Bytes::from(
        serde_json::json!({
            "messages": [{"role": "user", "content": "Summarise the benefits of spreading load across regions."}],
            "max_tokens": COMPLETION
        })
        .to_string(),
    )
}

/// One request straight to a simulator, to learn the prompt's token count.
async fn measure_prompt_tokens(client: &HttpClient) -> u32 {
    let cfg = SimConfig {
        completion_tokens: COMPLETION,
        ..SimConfig::default()
    };
    let sim = Simulator::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let s = send(client, &sim.url()).await;
    sim.stop().await;
    (s.tokens as u32).saturating_sub(COMPLETION)
}

async fn start_gateway(config: &str) -> (switchyard::server::Gateway, CancellationToken) {
    let cfg = Config::parse(config, &|_| None).unwrap();
    let token = CancellationToken::new();
    let gw = switchyard::server::start(cfg, token.clone()).await.unwrap();
    (gw, token)
}

/// `throttled`: the TPM scenario (priorities, weights by quota); else all equal.
fn gateway_config(strategy: &str, sims: &[Simulator], throttled: bool) -> String {
    let mut c = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[routing]\nstrategy = \"{strategy}\"\nmax_attempts = 3\n"
    );
    for (i, s) in sims.iter().enumerate() {
        let (priority, weight) = if throttled {
            (PRIORITY[i], TPM[i] / 30_000)
        } else {
            (1, 1)
        };
        c.push_str(&format!(
            "\n[[backends]]\nname = \"{}\"\nurl = \"{}\"\nauth = {{ type = \"none\" }}\npriority = {priority}\nweight = {weight}\n",
            NAMES[i],
            s.url()
        ));
    }
    c
}

async fn throttled_run(
    client: &HttpClient,
    strategy: &str,
    rate: f64,
    run: Duration,
) -> Vec<Sample> {
    let sims = TPM
        .iter()
        .enumerate()
        .map(|(i, tpm)| SimConfig {
            name: NAMES[i].into(),
            ttft: Duration::from_millis(50),
            token_interval: Duration::from_millis(1),
            completion_tokens: COMPLETION,
            tokens_per_minute: Some(*tpm),
            initial_fill: FILL,
            seed: i as u64 + 1,
            ..SimConfig::default()
        })
        .collect();
    scenario(client, strategy, sims, true, rate, run).await
}

async fn slow_run(client: &HttpClient, strategy: &str, rate: f64, run: Duration) -> Vec<Sample> {
    let sims = NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            // The first backend is five times slower to first token and per token.
            let k = if i == 0 { 5 } else { 1 };
            SimConfig {
                name: (*name).into(),
                ttft: Duration::from_millis(20 * k),
                token_interval: Duration::from_micros(300 * k),
                completion_tokens: COMPLETION,
                seed: i as u64 + 1,
                ..SimConfig::default()
            }
        })
        .collect();
    scenario(client, strategy, sims, false, rate, run).await
}

/// Starts the simulators and a gateway over them, drives the load, and tears it all down.
async fn scenario(
    client: &HttpClient,
    strategy: &str,
    configs: Vec<SimConfig>,
    throttled: bool,
    rate: f64,
    run: Duration,
) -> Vec<Sample> {
    let mut sims = Vec::new();
    for cfg in configs {
        sims.push(
            Simulator::start(cfg, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    let (gw, stop) = start_gateway(&gateway_config(strategy, &sims, throttled)).await;
    let samples = drive(client, &format!("http://{}", gw.addr), rate, run).await;
    stop.cancel();
    gw.wait().await;
    for s in sims {
        s.stop().await;
    }
    samples
}

/// Open-loop load: requests start on schedule whatever the answers take. Runs `WARMUP` longer
/// than `run` and returns only the requests started after the warm-up.
async fn drive(client: &HttpClient, base: &str, rate: f64, run: Duration) -> Vec<Sample> {
    let run = run + WARMUP;
    let url: Arc<str> = Arc::from(format!(
        "{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    ));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut set = JoinSet::new();
    let mut samples = Vec::new();
    while started.elapsed() < run {
        tokio::select! {
            _ = tick.tick() => {
                let (client, url) = (client.clone(), url.clone());
                let at = started.elapsed();
                set.spawn(async move { Sample { at, ..send(&client, &url).await } });
            }
            Some(Ok(s)) = set.join_next(), if !set.is_empty() => samples.push(s),
        }
    }
    while let Some(r) = set.join_next().await {
        if let Ok(s) = r {
            samples.push(s);
        }
    }
    samples.retain(|s| s.at >= WARMUP);
    samples
}

async fn send(client: &HttpClient, url: &str) -> Sample {
    let started = Instant::now();
    let url = if url.contains("/openai/") {
        url.to_string()
    } else {
        format!("{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
    };
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body()))
        .unwrap();
    let Ok(resp) = client.request(req).await else {
        return Sample {
            at: Duration::ZERO,
            status: 0,
            retry_after: false,
            backend: None,
            latency: started.elapsed(),
            tokens: 0,
        };
    };
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key("retry-after");
    let backend = resp
        .headers()
        .get("x-switchyard-backend")
        .and_then(|v| v.to_str().ok())
        .and_then(|n| NAMES.iter().position(|x| *x == n));
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let tokens = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.pointer("/usage/total_tokens").and_then(|t| t.as_u64()))
        .filter(|_| status == 200)
        .unwrap_or(0);
    Sample {
        at: Duration::ZERO,
        status,
        retry_after,
        backend,
        latency: started.elapsed(),
        tokens,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn throttled_row(
    strategy: &str,
    load: f64,
    s: &[Sample],
    run: Duration,
    cap_per_sec: f64,
) -> String {
    let ok: Vec<&Sample> = s.iter().filter(|x| x.status == 200).collect();
    let r429 = s.iter().filter(|x| x.status == 429).count();
    let r429_ra = s
        .iter()
        .filter(|x| x.status == 429 && x.retry_after)
        .count();
    let other = s.len() - ok.len() - r429;
    let served: u64 = ok.iter().map(|x| x.tokens).sum();
    let capacity = cap_per_sec * run.as_secs_f64();
    let mut lat: Vec<Duration> = ok.iter().map(|x| x.latency).collect();
    lat.sort();
    let share: Vec<String> = (0..3)
        .map(|b| {
            format!(
                "{:.0}%",
                100.0 * ok.iter().filter(|x| x.backend == Some(b)).count() as f64
                    / ok.len().max(1) as f64
            )
        })
        .collect();
    let ptu_tokens: u64 = ok
        .iter()
        .filter(|x| x.backend == Some(0))
        .map(|x| x.tokens)
        .sum();
    let ptu_capacity = f64::from(TPM[0]) / 60.0 * run.as_secs_f64();
    format!(
        "| {strategy} | {:.0}% | {} | {} | {r429} ({r429_ra}) | {other} | {:.1}% | {:.0} | {:.0} | {} | {:.1}% |",
        load * 100.0,
        s.len(),
        ok.len(),
        100.0 * served as f64 / capacity,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        share.join(" / "),
        100.0 * ptu_tokens as f64 / ptu_capacity,
    )
}

fn slow_row(strategy: &str, s: &[Sample]) -> String {
    let ok: Vec<&Sample> = s.iter().filter(|x| x.status == 200).collect();
    let mut all: Vec<Duration> = ok.iter().map(|x| x.latency).collect();
    all.sort();
    let mut fast: Vec<Duration> = ok
        .iter()
        .filter(|x| x.backend.is_some_and(|b| b != 0))
        .map(|x| x.latency)
        .collect();
    fast.sort();
    let slow_share =
        ok.iter().filter(|x| x.backend == Some(0)).count() as f64 / ok.len().max(1) as f64;
    let p99 = pct(&all, 0.99);
    let fast_p99 = pct(&fast, 0.99);
    format!(
        "| {strategy} | {:.0} | {p99:.0} | {fast_p99:.0} | {:.2}x | {:.1}% |",
        pct(&all, 0.5),
        p99 / fast_p99.max(1e-9),
        100.0 * slow_share
    )
}
