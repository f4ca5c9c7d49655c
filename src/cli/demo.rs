//! `switchyard demo`: three simulated Azure OpenAI instances on loopback, the gateway in front,
//! a mix of streaming and plain chat requests for `gpt-4o`, then a table of what each backend
//! served. The two serving `gpt-4o` have small tokens-per-minute quotas, so they throttle: the
//! gateway works around one, and when both cool down it falls back to `gpt-4o-mini` on the
//! third. Then the stateful half of the API
//! (a file and a batch on it, a Responses conversation of several turns), showing which
//! instance held each object.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::probe::{Outcome, Target, drive, percentile};
use crate::config::Config;
use crate::sim::{SimConfig, Simulator};

pub struct DemoOptions {
    pub requests: usize,
    pub concurrency: usize,
    pub once: bool,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

/// Name, tokens per minute, time to first token (ms).
const BACKENDS: [(&str, Option<u32>, u64); 3] = [
    // Small quotas: these throttle within the first seconds; the gateway works around one, and
    // falls back to gpt-4o-mini while both cool down.
    ("eastus", Some(5_000), 30),
    ("swedencentral", Some(3_000), 25),
    ("westus", None, 45),
];

/// `gpt-4o` on the two with quotas, falling back to `gpt-4o-mini` on the third.
const DEPLOYMENTS: &str = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { eastus = \"gpt-4o\", swedencentral = \"gpt-4o\" }\nfallbacks = [\"gpt-4o-mini\"]\n\n[[deployments]]\nname = \"gpt-4o-mini\"\nbackends = { westus = \"gpt-4o-mini\" }\n";

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
                object_delay: Duration::from_secs(1),
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
    toml.push_str(DEPLOYMENTS);
    let config = Config::parse(&toml, &|_| None).map_err(|e| format!("demo config: {e}"))?;
    let gateway = crate::server::start(config, shutdown.clone())
        .await
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    let base = format!("http://{}", gateway.addr);
    eprintln!(
        "Switchyard demo: gateway on {base} in front of {} simulated Azure OpenAI backends\n",
        sims.len()
    );

    let client = crate::http_client::system_client(Duration::from_secs(5), false)
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let target = Target {
        url: Target::azure(&base, "gpt-4o", "2024-10-21"),
        key: Some("demo-client".into()),
        stream_every: 3,
        include_usage: true,
        headers: Vec::new(),
        timeout: Duration::from_secs(60),
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
    if !shutdown.is_cancelled() {
        stateful(&client, &base).await?;
    }

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

/// A request through the gateway as an SDK makes it, retried as the SDKs do when the gateway
/// says to come back (429 with `retry-after-ms`). Returns the status, the serving backend and
/// the body.
async fn call(
    client: &crate::http_client::HttpsClient,
    method: Method,
    url: &str,
    content_type: &str,
    body: Bytes,
) -> Result<(u16, String, Bytes), String> {
    for _ in 0..5 {
        let req = Request::builder()
            .method(method.clone())
            .uri(url)
            .header("api-key", "demo-client")
            .header("content-type", content_type)
            .body(Full::new(body.clone()))
            .map_err(|e| format!("{e}"))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (backend, wait) = (header("x-switchyard-backend"), header("retry-after-ms"));
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        if status == 429 {
            let ms = wait.parse::<u64>().unwrap_or(1000).min(10_000);
            println!(
                "  (429: the instance holding it is busy; retrying in {ms} ms, as an SDK would)"
            );
            tokio::time::sleep(Duration::from_millis(ms)).await;
            continue;
        }
        return Ok((status, backend, bytes));
    }
    Err(format!("{url}: still throttled after 5 tries"))
}

/// `call` with a JSON body, expecting success and a JSON answer.
async fn call_json(
    client: &crate::http_client::HttpsClient,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> Result<(String, Value), String> {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let (status, backend, bytes) = call(client, method, url, "application/json", body).await?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{url}: {status} {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let v = serde_json::from_slice(&bytes).map_err(|e| format!("{url}: {e}"))?;
    Ok((backend, v))
}

/// Files, a batch and a Responses conversation through the gateway, each call printed with
/// the instance that served it: the one holding the object, every time.
async fn stateful(client: &crate::http_client::HttpsClient, base: &str) -> Result<(), String> {
    println!(
        "\nStateful APIs (each object lives on one instance; every call about it goes there):"
    );
    let v1 = format!("{base}/openai/v1");
    let lines = (1..=3)
        .map(|i| {
            json!({"custom_id": format!("request-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": format!("Question {i}")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let boundary = "switchyard-demo-boundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{lines}\n\r\n--{boundary}--\r\n"
    );
    let (status, holder, bytes) = call(
        client,
        Method::POST,
        &format!("{v1}/files"),
        &format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(form),
    )
    .await?;
    let file: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("upload ({status}): {e}"))?;
    let file_id = file["id"].as_str().unwrap_or("").to_string();
    show(&format!("file {file_id} uploaded"), &holder);
    let (backend, batch) = call_json(
        client,
        Method::POST,
        &format!("{v1}/batches"),
        Some(json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
    )
    .await?;
    let batch_id = batch["id"].as_str().unwrap_or("").to_string();
    show(&format!("batch {batch_id} made on it"), &backend);
    let started = std::time::Instant::now();
    let output = loop {
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("batch {batch_id} did not complete within 30 s"));
        }
        let (backend, b) = call_json(
            client,
            Method::GET,
            &format!("{v1}/batches/{batch_id}"),
            None,
        )
        .await?;
        if let Some(out) = b["output_file_id"].as_str() {
            show("batch completed", &backend);
            break out.to_string();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (_, backend, content) = call(
        client,
        Method::GET,
        &format!("{v1}/files/{output}/content"),
        "application/json",
        Bytes::new(),
    )
    .await?;
    let results = content
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    show(
        &format!("output file {output}: {results} results"),
        &backend,
    );

    let mut previous: Option<String> = None;
    for turn in 1..=4 {
        let mut req = json!({"model": "gpt-4o", "input": format!("Turn {turn}: tell me more.")});
        if let Some(p) = &previous {
            req["previous_response_id"] = json!(p);
        }
        let (backend, r) =
            call_json(client, Method::POST, &format!("{v1}/responses"), Some(req)).await?;
        let id = r["id"].as_str().unwrap_or("").to_string();
        show(&format!("response turn {turn}: {id}"), &backend);
        previous = Some(id);
    }
    if let Some(last) = &previous {
        let (backend, _) =
            call_json(client, Method::GET, &format!("{v1}/responses/{last}"), None).await?;
        show("retrieved the last response", &backend);
    }
    Ok(())
}

fn show(what: &str, backend: &str) {
    println!("  {what:<62} -> {backend}");
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
        "\n{:<15} {:<13} {:>8} {:>14} {:>9} {:>9}",
        "backend", "deployment", "served", "429s absorbed", "p50 ms", "p99 ms"
    );
    for sim in sims {
        let mut served: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.served_by.as_deref() == Some(sim.name()) && o.status.is_success())
            .map(|o| o.deployment.as_deref().unwrap_or("-"))
            .collect();
        served.sort_unstable();
        served.dedup();
        if served.is_empty() {
            served.push("-");
        }
        for deployment in served {
            let mut lat: Vec<Duration> = outcomes
                .iter()
                .filter(|o| {
                    o.served_by.as_deref() == Some(sim.name())
                        && o.status.is_success()
                        && o.deployment.as_deref().unwrap_or("-") == deployment
                })
                .map(|o| o.latency)
                .collect();
            lat.sort();
            println!(
                "{:<15} {:<13} {:>8} {:>14} {:>9.1} {:>9.1}",
                sim.name(),
                deployment,
                lat.len(),
                metrics.retried(sim.name(), "429"),
                percentile(&lat, 0.5).as_secs_f64() * 1000.0,
                percentile(&lat, 0.99).as_secs_f64() * 1000.0,
            );
        }
    }
    let ok = outcomes
        .iter()
        .filter(|o| o.status.is_success() && o.complete)
        .count();
    let retried = outcomes.iter().filter(|o| o.attempts > 1).count();
    let fell_back = outcomes
        .iter()
        .filter(|o| o.status.is_success() && o.deployment.as_deref() == Some("gpt-4o-mini"))
        .count();
    let rate = if outcomes.is_empty() {
        0.0
    } else {
        100.0 * ok as f64 / outcomes.len() as f64
    };
    println!(
        "\nclient-visible success: {ok}/{} ({rate:.1}%), {retried} requests needed a second backend, \
         {fell_back} were served by the fallback gpt-4o-mini while gpt-4o's backends cooled down",
        outcomes.len()
    );
}
