//! `switchyard demo`: three simulated Azure OpenAI instances on loopback (one with a small
//! tokens-per-minute quota, so it throttles), the gateway in front, a mix of streaming and plain
//! chat requests, then a table of what each backend served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::probe::{Outcome, Target, drive, percentile};
use crate::sim::{SimConfig, Simulator};

pub struct DemoOptions {
    pub requests: usize,
    pub concurrency: usize,
    pub once: bool,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
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

    let client = crate::upstream::system_client(Duration::from_secs(5), false)
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let target = Target {
        url: Target::azure(&base, "gpt-4o", "2024-10-21"),
        key: Some("demo-client".into()),
        stream_every: 3,
        include_usage: true,
        headers: Vec::new(),
    };
    let outcomes = drive(
        &client,
        &target,
        opts.requests,
        opts.concurrency.max(1),
        &shutdown,
    )
    .await;
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
             Status page: http://{admin}/   Metrics: curl -s http://{admin}/metrics",
            admin = gateway
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

fn print_table(outcomes: &[Outcome], sims: &[Simulator], metrics: &crate::telemetry::Metrics) {
    println!(
        "\n{:<15} {:>8} {:>14} {:>9} {:>9}",
        "backend", "served", "429s absorbed", "p50 ms", "p99 ms"
    );
    for sim in sims {
        let mut lat: Vec<Duration> = outcomes
            .iter()
            .filter(|o| o.served_by.as_deref() == Some(sim.name()) && o.status.is_success())
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
