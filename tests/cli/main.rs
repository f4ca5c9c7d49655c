//! The `switchyard` binary: `check`, `serve` start-up errors, serving and SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

#[path = "../common/mod.rs"]
mod common;
mod deploy;
mod usage;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("switchyard.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("switchyard-cli-{}-{name}", std::process::id()))
}

/// The shipped example, on ports the OS picks and with this test's variable names.
fn valid() -> String {
    include_str!("../../switchyard.example.toml")
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("${EASTUS_KEY}", "${SY_TEST_EASTUS_KEY}")
        .replace("${WESTUS_KEY}", "${SY_TEST_WESTUS_KEY}")
}

/// `switchyard check` on `path` with the two backends' keys: exit code, stdout and stderr.
fn check(path: &std::path::Path, east: &str, west: &str) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .env("SY_TEST_EASTUS_KEY", east)
        .env("SY_TEST_WESTUS_KEY", west)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), all)
}

#[test]
fn check_accepts_a_valid_config_without_printing_secrets() {
    let p = write_config(&tmp("valid"), &valid());
    let (code, all) = check(&p, "super-secret-east", "super-secret-west");
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("eastus") && all.contains("westus"), "{all}");
    assert!(!all.contains("super-secret"), "{all}");
}

/// The Redis of an Azure estate: `check` says what it will sign in with, never a secret, and a
/// bad key is named.
#[test]
fn check_describes_the_redis_store_and_names_a_bad_key() {
    let store = "\n[limits]\nstore = \"redis\"\nredis_url = \"rediss://cache.westeurope.redis.azure.net:10000\"\nredis_cluster = true\nredis_auth = { type = \"client_secret\", tenant_id = \"t\", client_id = \"c\", client_secret = \"very-secret-value\" }\n";
    let p = write_config(&tmp("redis-store"), &format!("{}{store}", valid()));
    let run = |p: &std::path::Path| check(p, "x", "y");
    let (code, all) = run(&p);
    assert_eq!(code, Some(0), "{all}");
    assert!(
        all.contains("Redis Cluster at cache.westeurope.redis.azure.net:10000 (TLS)"),
        "{all}"
    );
    assert!(all.contains("https://redis.azure.com/.default"), "{all}");
    assert!(!all.contains("very-secret-value"), "{all}");
    let p = write_config(
        &tmp("redis-bad"),
        &format!("{}{}", valid(), store.replace(":10000", ":10000/2")),
    );
    let (code, all) = run(&p);
    assert_eq!(code, Some(1), "{all}");
    assert!(
        all.contains("limits.redis_url") && all.contains("database 0"),
        "{all}"
    );
}

#[test]
fn check_and_serve_reject_bad_configs_naming_the_field() {
    let p = write_config(&tmp("missing-env"), &valid());
    for cmd in ["check", "serve"] {
        let out = Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&p)
            .env_remove("SY_TEST_EASTUS_KEY")
            .env("SY_TEST_WESTUS_KEY", "x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("backends[0].auth.key"), "{cmd}: {err}");
        assert!(err.contains("SY_TEST_EASTUS_KEY"), "{cmd}: {err}");
    }
    let p = write_config(
        &tmp("bad-url"),
        &valid().replace("https://my-westus.openai.azure.com", "my-westus"),
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&p)
        .env("SY_TEST_EASTUS_KEY", "x")
        .env("SY_TEST_WESTUS_KEY", "y")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backends[1].url"));
}

/// `switchyard serve` on `config` (the example's variables set), its log as text on stderr.
fn serve_text_logs(config: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("SY_TEST_EASTUS_KEY", "x")
        .env("SY_TEST_WESTUS_KEY", "y")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn serve_runs_and_exits_cleanly_on_sigterm() {
    let p = write_config(&tmp("serve"), &valid());
    let mut child = serve_text_logs(&p);
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let listening = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("switchyard listening"))
        .expect("a listening line");
    let admin = listening
        .split("admin=Some(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("admin address in the log line")
        .to_string();
    let health = std::net::TcpStream::connect(&admin);
    assert!(health.is_ok(), "admin listener accepts on {admin}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // A second after the signal the listeners still accept (server.shutdown_delay, 5 s), and
    // readiness says the replica is going.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut conn = std::net::TcpStream::connect(&admin).expect("still accepting");
    use std::io::{Read, Write};
    conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}");
}

/// `switchyard serve` on `config` with JSON logs, and its log lines.
fn serve_json_logs(
    config: &std::path::Path,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

/// The next JSON log line whose message starts with `want`.
async fn next_message(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    want: &str,
) -> serde_json::Value {
    loop {
        let line = lines.next_line().await.unwrap().expect("log line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"].as_str().is_some_and(|m| m.starts_with(want)) {
            return v;
        }
    }
}

/// `switchyard probe` against a running gateway: the distribution, statuses and tokens it reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_distribution_statuses_and_tokens() {
    let (_sims, backends) = common::start_sims(&["a", "b"]).await;
    let gw = common::gateway(&backends, "", "").await;
    let out = tokio::process::Command::new(BIN)
        .args([
            "probe",
            "--url",
            &gw.base,
            "--deployment",
            "gpt-4o",
            "--requests",
            "10",
            "--concurrency",
            "2",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["requests"], 10);
    assert_eq!(r["succeeded"], 10);
    assert_eq!(r["by_backend"]["a"], 5);
    assert_eq!(r["by_backend"]["b"], 5);
    assert_eq!(r["by_status"]["200"], 10);
    assert_eq!(
        r["tokens"]["completion"], 160,
        "16 completion tokens per simulated answer"
    );
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    gw.stop().await;

    // Against nothing: every request fails, and the exit code says so.
    let out = tokio::process::Command::new(BIN)
        .args([
            "probe",
            "--url",
            &common::dead_url(),
            "--deployment",
            "d",
            "--requests",
            "2",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["succeeded"], 0);
    // Said as what it is, with the system's own words, not as a status no server sent.
    assert_eq!(r["by_status"], serde_json::json!({}), "{r}");
    let failures = r["failures"].as_object().unwrap();
    assert_eq!(
        failures.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        2,
        "{r}"
    );
    let why = failures.keys().next().unwrap();
    assert!(
        why.starts_with("cannot connect") && why.contains("refused"),
        "{why}"
    );
}

/// Against an endpoint that accepts and never answers, every request ends at `--timeout`
/// and is reported as such (never "0/0"); an error status shows the start of its body.
#[tokio::test]
async fn probe_says_why_requests_failed() {
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", stalled.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = stalled.accept().await {
            open.push(s);
        }
    });
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(BIN)
        .args([
            "probe",
            "--url",
            &url,
            "--deployment",
            "d",
            "--requests",
            "3",
        ])
        .args(["--concurrency", "3", "--timeout", "500ms", "--json"])
        .output()
        .await
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["requests"], 3, "{r}");
    assert_eq!(
        r["failures"]["no whole answer within 500ms (--timeout)"], 3,
        "{r}"
    );
    held.abort();

    let (url, _backend) = common::scripted_backend(429, vec![("retry-after", "1".into())]).await;
    let out = tokio::process::Command::new(BIN)
        .args([
            "probe",
            "--url",
            &url,
            "--deployment",
            "d",
            "--requests",
            "2",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["by_status"]["429"], 2, "{r}");
    let body = r["error_bodies"]["429"].as_str().unwrap();
    assert!(body.contains("scripted answer"), "{body}");

    // The report as a person reads it says the same.
    let out = tokio::process::Command::new(BIN)
        .args([
            "probe",
            "--url",
            &url,
            "--deployment",
            "d",
            "--requests",
            "1",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("first answer of each error status:"),
        "{text}"
    );
    assert!(text.contains("429: {"), "{text}");
}

/// `switchyard serve` on `cfg` (written under `dir`) with JSON logs, one chat completion sent
/// to it, and what came of it: the answer's headers (status checked to be 200) and the
/// request's access line, each log line before it checked to hold none of `secrets`.
async fn one_logged_chat(
    dir: &str,
    cfg: &str,
    secrets: &[&str],
) -> (reqwest::header::HeaderMap, serde_json::Value) {
    let p = write_config(&tmp(dir), cfg);
    let (mut child, mut lines) = serve_json_logs(&p);
    let addr = next_message(&mut lines, "switchyard listening").await["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let r = common::client()
        .post(format!("http://{addr}{}", common::CHAT))
        .header("content-type", "application/json")
        .header("api-key", "client-secret-key")
        .body(common::chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let _ = r.bytes().await;
    let access = loop {
        let line = lines.next_line().await.unwrap().expect("an access line");
        assert!(!secrets.iter().any(|s| line.contains(s)), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["target"] == "switchyard::access" {
            break v;
        }
    };
    let _ = child.kill().await;
    (headers, access)
}

/// The access log: one JSON line per request with its id, every backend tried and how, status,
/// tokens and durations; never a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_when_asked() {
    let good = common::start_sim(common::sim("good")).await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[backends]]\nname = \"dead\"\nurl = \"{}\"\nauth = {{ type = \"none\" }}\n\n[[backends]]\nname = \"good\"\nurl = \"{}\"\nauth = {{ type = \"api_key\", key = \"key-good\" }}\n",
        common::dead_url(),
        good.url()
    );
    let (headers, access) =
        one_logged_chat("access-log", &cfg, &["client-secret-key", "key-good"]).await;
    assert_eq!(
        access["request_id"],
        headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(access["deployment"], "gpt-4o");
    assert!(access.get("requested").is_none(), "{access}");
    assert_eq!(access["status"], 200);
    assert_eq!(access["backend"], "good");
    assert_eq!(access["attempts"], 2);
    assert_eq!(access["tried"], "dead:backend_connect_error good:200");
    assert_eq!(access["completion_tokens"], 8);
    assert!(access["total_ms"].as_f64().unwrap() >= access["first_byte_ms"].as_f64().unwrap());
}

/// A request a fallback served is logged under the deployment that served it, with the one it
/// asked for beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_fallback_that_served() {
    let good = common::start_sim(common::sim("good")).await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[routing]\nmax_attempts = 1\n\n[[backends]]\nname = \"dead\"\nurl = \"{}\"\nauth = {{ type = \"none\" }}\n\n[[backends]]\nname = \"good\"\nurl = \"{}\"\nauth = {{ type = \"api_key\", key = \"key-good\" }}\n\n[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ dead = \"gpt-4o\" }}\nfallbacks = [\"gpt-4o-mini\"]\n\n[[deployments]]\nname = \"gpt-4o-mini\"\nbackends = {{ good = \"gpt-4o-mini\" }}\n",
        common::dead_url(),
        good.url()
    );
    let (headers, access) = one_logged_chat("access-log-fallback", &cfg, &[]).await;
    assert_eq!(headers["x-switchyard-deployment"], "gpt-4o-mini");
    assert_eq!(access["deployment"], "gpt-4o-mini", "{access}");
    assert_eq!(access["requested"], "gpt-4o", "{access}");
    assert_eq!(access["backend"], "good");
    assert_eq!(access["attempts"], 2);
    assert_eq!(access["tried"], "dead:backend_connect_error good:200");
    assert_eq!(access["completion_tokens"], 8);
}

/// A backend whose key is wrong is logged as a WARN naming it and the config to check, once,
/// while its requests are served by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusing_the_gateways_key_is_logged() {
    let east = common::start_sim(common::sim("east")).await;
    let west = common::start_sim(common::sim("west")).await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[backends]]\nname = \"east\"\nurl = \"{}\"\nauth = {{ type = \"api_key\", key = \"wrong-key\" }}\n\n[[backends]]\nname = \"west\"\nurl = \"{}\"\nauth = {{ type = \"api_key\", key = \"key-west\" }}\n",
        east.url(),
        west.url()
    );
    let p = write_config(&tmp("wrong-key"), &cfg);
    let (mut child, mut lines) = serve_json_logs(&p);
    let addr = next_message(&mut lines, "switchyard listening").await["addr"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..5 {
        let r = common::client()
            .post(format!("http://{addr}{}", common::CHAT))
            .header("content-type", "application/json")
            .body(common::chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let warned = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("a warning line");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["level"] == "WARN" && v["backend"] == "east" {
                break v;
            }
        }
    })
    .await
    .expect("a WARN about the backend");
    assert_eq!(warned["reason"], "auth_rejected", "{warned}");
    assert!(
        warned["message"].as_str().unwrap().contains("backends[0]"),
        "{warned}"
    );
    assert!(!warned["answer"].as_str().unwrap().is_empty(), "{warned}");
    assert!(!warned.to_string().contains("wrong-key"), "{warned}");
    let _ = child.kill().await;
}

/// `serve` reloads its file on SIGHUP: a bad file is refused with the field named, a good one
/// takes over (the next request goes to the backend the new file names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_sighup() {
    let a = common::start_sim(common::sim("a")).await;
    let b = common::start_sim(common::sim("b")).await;
    let cfg = |s: &switchyard::sim::Simulator| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[backends]]\nname = \"{}\"\nurl = \"{}\"\nauth = {{ type = \"api_key\", key = \"key-{}\" }}\n",
            s.name(),
            s.url(),
            s.name()
        )
    };
    let p = write_config(&tmp("sighup"), &cfg(&a));
    let (mut child, mut lines) = serve_json_logs(&p);
    let mut next_message = async |want: &str| next_message(&mut lines, want).await;
    let addr = next_message("switchyard listening").await["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &child.id().unwrap().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let client = common::client();
    let served_by = async || {
        let r = common::post_chat(&client, &format!("http://{addr}")).await;
        assert_eq!(r.status(), 200);
        common::header(&r, "x-switchyard-backend")
    };
    assert_eq!(served_by().await, "a");

    std::fs::write(&p, cfg(&b).replace("http://", "tcp://")).unwrap();
    hup();
    let refused = next_message("config reload rejected").await;
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("backends[0].url"),
        "{refused}"
    );
    assert_eq!(served_by().await, "a", "the old config keeps serving");

    std::fs::write(&p, cfg(&b)).unwrap();
    hup();
    let applied = next_message("config reloaded").await;
    assert_eq!(applied["generation"], 2, "{applied}");
    assert_eq!(served_by().await, "b");
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_only_for_a_2xx() {
    let (_sims, backends) = common::start_sims(&["a"]).await;
    let gw = common::gateway(&backends, "", "").await;
    let health = |url: String| async move {
        tokio::process::Command::new(BIN)
            .args(["health", "--url", &url])
            .output()
            .await
            .unwrap()
    };
    let ok = health(format!("{}/healthz", gw.admin)).await;
    assert!(ok.status.success(), "{ok:?}");
    let missing = health(format!("{}/nope", gw.admin)).await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("404"),
        "{missing:?}"
    );
    let dead = health(format!("{}/healthz", common::dead_url())).await;
    assert!(!dead.status.success());
    let https = health("https://127.0.0.1:1/healthz".into()).await;
    assert!(String::from_utf8_lossy(&https.stderr).contains("only http://"));
    gw.stop().await;
}
