//! No secret leaves the process: the real binary runs with a recognisable secret in every
//! secret field (backend keys, a client secret and the tokens an identity endpoint issues for
//! it, client keys, the admin key, the Redis password, the trace collector's header), logging
//! at every level, serves and fails requests, and everything it emits (log lines, response
//! bodies and headers, metrics, the admin API and status page) is searched for them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use switchyard::sim::SimConfig;
use tokio::io::AsyncBufReadExt;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const BACKEND_KEY: &str = "SECRET-backend-key-7f3a9c";
const WRONG_BACKEND_KEY: &str = "SECRET-wrong-backend-key-0d9e";
const CLIENT_SECRET: &str = "SECRET-client-secret-2b8e4d";
const TOKEN_PREFIX: &str = "SECRET-issued-token-";
const CONSUMER_KEY: &str = "SECRET-consumer-key-91c6e0aa";
const WRONG_CONSUMER_KEY: &str = "SECRET-wrong-consumer-key-33f1";
const ADMIN_KEY: &str = "SECRET-admin-key-5d7e3f11";
const WRONG_ADMIN_KEY: &str = "SECRET-wrong-admin-key-77aa";
const REDIS_PASSWORD: &str = "SECRET-redis-pass-8a1b";
const COLLECTOR_KEY: &str = "SECRET-collector-key-4c2d";

/// An Entra token endpoint that issues `SECRET-issued-token-N` and tells the backend to
/// accept it.
async fn identity(accepted: Arc<Mutex<HashSet<String>>>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let issued = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let accepted = accepted.clone();
            let issued = issued.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let accepted = accepted.clone();
                    let issued = issued.clone();
                    async move {
                        let form = req.into_body().collect().await.unwrap().to_bytes();
                        let form = String::from_utf8_lossy(&form).into_owned();
                        // Only the right secret gets a token: proof the gateway sent it.
                        let (status, body) = if form.contains(CLIENT_SECRET) {
                            let n = issued.fetch_add(1, Ordering::SeqCst);
                            let token = format!("{TOKEN_PREFIX}{n}");
                            accepted.lock().unwrap().insert(token.clone());
                            (200, format!(r#"{{"token_type":"Bearer","expires_in":3600,"access_token":"{token}"}}"#))
                        } else {
                            (401, r#"{"error":"invalid_client"}"#.to_string())
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (url, task)
}

/// Everything the process and its answers showed, to be searched.
#[derive(Default)]
struct Emitted(Vec<String>);

impl Emitted {
    async fn response(&mut self, what: &str, r: reqwest::Response) -> u16 {
        let status = r.status().as_u16();
        let headers: Vec<String> = r
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let body = r.text().await.unwrap_or_default();
        self.0.push(format!(
            "{what} -> {status}\n{}\n{body}",
            headers.join("\n")
        ));
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_text_logs_answers_metrics_or_the_admin_api() {
    scan(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_json_logs_answers_metrics_or_the_admin_api() {
    scan(true).await;
}

/// The addresses in the "switchyard listening" line, text or JSON.
fn listening_addrs(line: &str) -> (String, String) {
    let (addr, admin) = if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        (
            v["addr"].as_str().unwrap().to_string(),
            v["admin"].as_str().unwrap().to_string(),
        )
    } else {
        let after = |k: &str, end: char| {
            line.split(k)
                .nth(1)
                .and_then(|s| s.split(end).next())
                .unwrap()
                .to_string()
        };
        (
            after("addr=", ' '),
            format!("Some({})", after("admin=Some(", ')')),
        )
    };
    let admin = admin
        .strip_prefix("Some(")
        .and_then(|a| a.strip_suffix(')'))
        .unwrap()
        .to_string();
    (addr, admin)
}

async fn scan(json: bool) {
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let (authority, _identity) = identity(accepted.clone()).await;
    let keyed = start_sim(SimConfig {
        api_key: Some(BACKEND_KEY.into()),
        ..sim("keyed")
    })
    .await;
    let keyless = start_sim(SimConfig {
        api_key: Some("not-used-by-the-gateway".into()),
        accepted_tokens: Some(accepted.clone()),
        ..sim("keyless")
    })
    .await;
    let misconfigured = start_sim(SimConfig {
        api_key: Some("the-real-key".into()),
        ..sim("misconfigured")
    })
    .await;

    let dir =
        std::env::temp_dir().join(format!("switchyard-secrets-{}-{json}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_key = "${{SY_ADMIN_KEY}}"

[routing]
max_attempts = 1

[[backends]]
name = "keyed"
url = "{keyed}"
auth = {{ type = "api_key", key = "${{SY_BACKEND_KEY}}" }}

[[backends]]
name = "keyless"
url = "{keyless}"
auth = {{ type = "client_secret", tenant_id = "tenant-1", client_id = "client-1", client_secret = "{CLIENT_SECRET}", authority_host = "{authority}" }}

[[backends]]
name = "misconfigured"
url = "{misconfigured}"
auth = {{ type = "api_key", key = "{WRONG_BACKEND_KEY}" }}

[[consumers]]
name = "team"
key = "{CONSUMER_KEY}"
tokens_per_minute = 1000000

[limits]
store = "redis"
redis_url = "redis://:{REDIS_PASSWORD}@127.0.0.1:1"
redis_timeout = "50ms"

[tracing]
otlp_endpoint = "http://127.0.0.1:1"
export_interval = "100ms"
headers = {{ "x-api-key" = "{COLLECTOR_KEY}" }}
"#,
            keyed = keyed.url(),
            keyless = keyless.url(),
            misconfigured = misconfigured.url(),
        ),
    )
    .unwrap();

    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .env("SWITCHYARD_LOG_FORMAT", if json { "json" } else { "text" })
        .env("SY_ADMIN_KEY", ADMIN_KEY)
        .env("SY_BACKEND_KEY", BACKEND_KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addrs_tx, addrs_rx) = tokio::sync::oneshot::channel::<(String, String)>();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let collect_err = {
        let lines = lines.clone();
        tokio::spawn(async move {
            let mut addrs_tx = Some(addrs_tx);
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.contains("switchyard listening")
                    && let Some(tx) = addrs_tx.take()
                {
                    let _ = tx.send(listening_addrs(&line));
                }
                lines.lock().unwrap().push(line);
            }
        })
    };
    let collect_out = {
        let lines = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let (addr, admin) = tokio::time::timeout(Duration::from_secs(30), addrs_rx)
        .await
        .unwrap()
        .unwrap();
    let base = format!("http://{addr}");
    let admin = format!("http://{admin}");
    let c = client();
    let mut seen = Emitted::default();

    // Traffic over all three backends, plain and streamed; the misconfigured one answers 401.
    for i in 0..9 {
        let r = c
            .post(format!("{base}{CHAT}"))
            .header("api-key", CONSUMER_KEY)
            .header("content-type", "application/json")
            .body(chat_body(i % 2 == 1))
            .send()
            .await
            .unwrap();
        seen.response("chat", r).await;
    }
    // Keys that are wrong, in each place a key goes.
    for (name, value) in [
        ("api-key", WRONG_CONSUMER_KEY.to_string()),
        ("authorization", format!("Bearer {WRONG_CONSUMER_KEY}")),
    ] {
        let r = c
            .post(format!("{base}{CHAT}"))
            .header(name, value)
            .body(chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(seen.response("wrong client key", r).await, 401);
    }
    let r = c
        .post(format!("{base}{CHAT}"))
        .header("api-key", CONSUMER_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(seen.response("bad body", r).await, 400);

    // The admin surface, with the key and with a wrong one.
    for path in [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/config",
        "/admin/backends",
        "/admin/status",
    ] {
        let r = c
            .get(format!("{admin}{path}"))
            .header("x-admin-key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        seen.response(path, r).await;
    }
    let r = c
        .get(format!("{admin}/admin/config"))
        .header("x-admin-key", WRONG_ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.response("wrong admin key", r).await, 401);
    let r = c
        .post(format!("{admin}/admin/reload"))
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    seen.response("reload", r).await;

    // Wait until the failing paths have run: Redis refused, trace export refused.
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = metrics_text(&c, &admin).await;
            if metric_in(&text, "switchyard_limits_store_errors_total") > 0.0
                && metric_in(&text, "switchyard_trace_spans_failed_total") > 0.0
            {
                seen.0.push(text);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "Redis and trace export failures never showed"
    );

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    collect_err.await.unwrap();
    collect_out.await.unwrap();

    // The secrets were in use: each backend served with its credential, a token was issued.
    assert!(keyed.stats().ok > 0, "{:?}", keyed.stats());
    assert!(keyless.stats().ok > 0, "{:?}", keyless.stats());
    assert!(misconfigured.stats().unauthorized > 0);
    let issued: Vec<String> = accepted.lock().unwrap().iter().cloned().collect();
    assert!(!issued.is_empty());

    let lines = lines.lock().unwrap().clone();
    // Logging was on at every level, and the failing paths logged.
    for level in ["TRACE", "DEBUG", "INFO", "WARN"] {
        let mark = if json {
            format!("\"level\":\"{level}\"")
        } else {
            format!(" {level} ")
        };
        assert!(lines.iter().any(|l| l.contains(&mark)), "no {level} line");
    }
    let everything = format!("{}\n{}", lines.join("\n"), seen.0.join("\n"));
    let mut secrets = vec![
        BACKEND_KEY,
        WRONG_BACKEND_KEY,
        CLIENT_SECRET,
        CONSUMER_KEY,
        WRONG_CONSUMER_KEY,
        ADMIN_KEY,
        WRONG_ADMIN_KEY,
        REDIS_PASSWORD,
        COLLECTOR_KEY,
        TOKEN_PREFIX,
    ];
    secrets.extend(issued.iter().map(String::as_str));
    let hits: Vec<String> = secrets
        .iter()
        .flat_map(|s| {
            everything
                .lines()
                .filter(move |l| l.contains(s))
                .map(move |l| format!("{s}: {}", l.chars().take(300).collect::<String>()))
        })
        .collect();
    assert!(
        hits.is_empty(),
        "{} leaks:\n{}",
        hits.len(),
        hits.join("\n")
    );
    // The search itself works: the names around the secrets are there.
    assert!(everything.contains("keyless") && everything.contains("misconfigured"));
    let _ = std::fs::remove_dir_all(&dir);
}
