//! `switchyard demo`: three simulated Azure OpenAI instances on loopback (one with a small
//! tokens-per-minute quota, so it throttles), the gateway in front, a mix of streaming and plain
//! chat requests, then a table of what each backend served.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sim::{SimConfig, Simulator};

pub struct DemoOptions {
    pub requests: usize,
    pub concurrency: usize,
    pub once: bool,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

struct Outcome {
    status: StatusCode,
    backend: Option<String>,
    attempts: u32,
    latency: Duration,
    complete: bool,
}

const BACKENDS: [(&str, Option<u32>, u64); 3] = [
    ("eastus", None, 30),
    ("westus", None, 45),
    // A small quota: this one throttles within the first seconds and the gateway works around it.
    ("swedencentral", Some(3_000), 25),
];

pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<(), String> {
    let mut sims = Vec::new();
    for (i, (name, tpm, ttft_ms)) in BACKENDS.iter().enumerate() {
        let sim = Simulator::start(
            SimConfig {
                name: (*name).into(),
                api_key: Some(format!("demo-key-{name}")),
                ttft: Duration::from_millis(*ttft_ms),
                token_interval: Duration::from_millis(3),
                completion_tokens: 24,
                tokens_per_minute: *tpm,
                seed: 42 + i as u64,
                ..SimConfig::default()
            },
            "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        )
        .await
        .map_err(|e| format!("cannot start simulator {name}: {e}"))?;
        sims.push(sim);
    }

    let listen = free_or_any(opts.listen);
    let admin = free_or_any(opts.admin_listen);
    let mut toml = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nshutdown_grace = \"5s\"\n\n\
         [routing]\nstrategy = \"round_robin\"\nmax_attempts = 3\n"
    );
    for sim in &sims {
        toml.push_str(&format!(
            "\n[[backends]]\nname = \"{n}\"\nurl = \"{u}\"\nauth = {{ type = \"api_key\", key = \"demo-key-{n}\" }}\n",
            n = sim.name(),
            u = sim.url()
        ));
    }
    let config = Config::parse(&toml, &|_| None).map_err(|e| format!("demo config: {e}"))?;
    let gateway = crate::server::start(config, shutdown.clone())
        .await
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    let base = format!("http://{}", gateway.addr);
    eprintln!(
        "Switchyard demo: gateway on {base} in front of {} simulated Azure OpenAI backends\n",
        sims.len()
    );

    let outcomes = drive(&base, opts.requests, opts.concurrency.max(1), &shutdown).await;
    print_table(&outcomes, &sims, &gateway.metrics);

    if !opts.once && !shutdown.is_cancelled() {
        println!(
            "\nThe gateway keeps serving until Ctrl-C. Try it:\n\n  \
             curl -s {base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \\\n    \
             -H 'content-type: application/json' -H 'api-key: anything' \\\n    \
             -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}' -i\n\n  \
             Python (openai package):\n    \
             from openai import AzureOpenAI\n    \
             client = AzureOpenAI(azure_endpoint=\"{base}\", api_key=\"anything\", api_version=\"2024-10-21\")\n    \
             client.chat.completions.create(model=\"gpt-4o\", messages=[{{\"role\":\"user\",\"content\":\"Hi\"}}])\n\n  \
             Metrics: curl -s http://{}/metrics",
            gateway
                .admin_addr
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    gateway.wait().await;
    for sim in sims {
        sim.stop().await;
    }
    Ok(())
}

/// The requested address if it can be bound now, else any free port on the same IP, so the demo
/// runs even where 8080 is taken.
fn free_or_any(addr: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}

async fn drive(
    base: &str,
    total: usize,
    concurrency: usize,
    stop: &CancellationToken,
) -> Vec<Outcome> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    let client = Arc::new(client);
    let base: Arc<str> = Arc::from(base);
    let mut set = JoinSet::new();
    let mut outcomes = Vec::with_capacity(total);
    let mut next = 0usize;
    let bar = Progress::new(total);
    while outcomes.len() < total && !stop.is_cancelled() {
        while set.len() < concurrency && next < total {
            let (client, base) = (client.clone(), base.clone());
            let stream = next % 3 == 0;
            next += 1;
            set.spawn(async move { one_request(&client, &base, stream, next).await });
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(done) = set.join_next() => {
                if let Ok(o) = done {
                    outcomes.push(o);
                }
                bar.show(&outcomes);
            }
        }
    }
    set.shutdown().await;
    bar.finish();
    outcomes
}

async fn one_request(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    stream: bool,
    n: usize,
) -> Outcome {
    let body = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": format!("Request {n}: say something about load balancing across regions.")}
        ],
        "max_tokens": 24,
        "stream": stream
    });
    let started = Instant::now();
    let req = Request::post(format!(
        "{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    ))
    .header("content-type", "application/json")
    .header("api-key", "demo-client")
    .body(Full::new(Bytes::from(body.to_string())));
    let failed = |status| Outcome {
        status,
        backend: None,
        attempts: 0,
        latency: started.elapsed(),
        complete: false,
    };
    let Ok(req) = req else {
        return failed(StatusCode::BAD_REQUEST);
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(_) => return failed(StatusCode::BAD_GATEWAY),
    };
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let backend = header("x-switchyard-backend");
    let attempts = header("x-switchyard-attempts")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let body = resp.into_body().collect().await.map(|c| c.to_bytes());
    let complete = match body {
        Ok(b) if stream => b.ends_with(b"data: [DONE]\n\n"),
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b).is_ok(),
        Err(_) => false,
    };
    Outcome {
        status,
        backend,
        attempts,
        latency: started.elapsed(),
        complete,
    }
}

struct Progress {
    total: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, done: &[Outcome]) {
        let n = done.len();
        if !self.tty && n % 50 != 0 && n != self.total {
            return;
        }
        let ok = done
            .iter()
            .filter(|o| o.status.is_success() && o.complete)
            .count();
        let retried = done.iter().filter(|o| o.attempts > 1).count();
        let width = 40;
        let filled = (n * width).checked_div(self.total).unwrap_or(width);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(
                err,
                "\r[{bar}] {n}/{}  ok {ok}  retried {retried}",
                self.total
            );
        } else {
            let _ = writeln!(
                err,
                "[{bar}] {n}/{}  ok {ok}  retried {retried}",
                self.total
            );
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn print_table(outcomes: &[Outcome], sims: &[Simulator], metrics: &crate::telemetry::Metrics) {
    println!(
        "\n{:<15} {:>8} {:>14} {:>9} {:>9}",
        "backend", "served", "429s absorbed", "p50 ms", "p99 ms"
    );
    for sim in sims {
        let mut lat: Vec<Duration> = outcomes
            .iter()
            .filter(|o| o.backend.as_deref() == Some(sim.name()) && o.status.is_success())
            .map(|o| o.latency)
            .collect();
        lat.sort();
        println!(
            "{:<15} {:>8} {:>14} {:>9.1} {:>9.1}",
            sim.name(),
            lat.len(),
            metrics.retried(sim.name(), "429"),
            percentile(&lat, 0.5).as_secs_f64() * 1000.0,
            percentile(&lat, 0.99).as_secs_f64() * 1000.0,
        );
    }
    let ok = outcomes
        .iter()
        .filter(|o| o.status.is_success() && o.complete)
        .count();
    let retried = outcomes.iter().filter(|o| o.attempts > 1).count();
    let rate = if outcomes.is_empty() {
        0.0
    } else {
        100.0 * ok as f64 / outcomes.len() as f64
    };
    println!(
        "\nclient-visible success: {ok}/{} ({rate:.1}%), {retried} requests needed a second backend",
        outcomes.len()
    );
}
