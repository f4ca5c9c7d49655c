//! `switchyard probe`, the sample notebook's test step as a command: sends chat completions to any
//! Azure OpenAI-compatible endpoint (a Switchyard, or Azure itself) and reports where they went
//! (`x-switchyard-backend`, else `x-ms-region`), statuses, latency percentiles and tokens. The
//! demo drives its load with the same code.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http_client::HttpsClient;
use crate::usage::{Tap, Usage};

/// Where and how to send.
#[derive(Clone)]
pub struct Target {
    /// The full chat completions URL, query included.
    pub url: String,
    /// Sent as `api-key`.
    pub key: Option<String>,
    /// Stream every n-th request (0: never, 1: always).
    pub stream_every: usize,
    /// Streams ask for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Sent with every request too (`--header`), e.g. the ones an SDK adds.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Longest one request may take, its whole answer included.
    pub timeout: Duration,
}

impl Target {
    /// A `--header` argument, `name: value`.
    pub fn header(arg: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
        let bad =
            || format!("--header {arg:?}: expected `name: value` with a valid name and value");
        let (name, value) = arg.split_once(':').ok_or_else(bad)?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let value = http::HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        Ok((name, value))
    }

    /// `{base}/openai/deployments/{deployment}/chat/completions?api-version=...`.
    pub fn azure(base: &str, deployment: &str, api_version: &str) -> String {
        format!(
            "{}/openai/deployments/{deployment}/chat/completions?api-version={api_version}",
            base.trim_end_matches('/')
        )
    }
}

/// One request's result.
pub struct Outcome {
    /// The answer's status (502 when there was none, with `attempts` 0: see `failure`).
    pub status: StatusCode,
    /// Why there was no whole answer: a transport error, the timeout, a stop.
    pub failure: Option<String>,
    /// The start of a non-2xx answer's body.
    pub error_body: Option<String>,
    /// `x-switchyard-backend`, else `x-ms-region`.
    pub served_by: Option<String>,
    /// `x-switchyard-deployment`: the deployment that served (a fallback, when one did).
    pub deployment: Option<String>,
    pub attempts: u32,
    pub latency: Duration,
    /// A whole JSON answer, or a stream that ended with `[DONE]`.
    pub complete: bool,
    pub usage: Option<Usage>,
}

/// Sends `total` requests, `concurrency` at a time, showing progress on stderr. Requests still
/// out when `stop` fires are reported as stopped, not left out.
pub async fn drive(
    client: &HttpsClient,
    target: &Target,
    total: usize,
    concurrency: usize,
    stop: &CancellationToken,
) -> Vec<Outcome> {
    let target = Arc::new(target.clone());
    let mut set = JoinSet::new();
    let mut outcomes = Vec::with_capacity(total);
    let mut next = 0usize;
    let bar = Progress::new(total);
    while outcomes.len() < total && !stop.is_cancelled() {
        while set.len() < concurrency.max(1) && next < total {
            let (client, target) = (client.clone(), target.clone());
            let stream = target.stream_every > 0 && next.is_multiple_of(target.stream_every);
            next += 1;
            let n = next;
            set.spawn(async move { one_request(&client, &target, stream, n).await });
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
    let unfinished = set.len();
    set.shutdown().await;
    bar.finish();
    for _ in 0..unfinished {
        outcomes.push(Outcome::failed(
            Duration::ZERO,
            "stopped before an answer".into(),
        ));
    }
    outcomes
}

impl Outcome {
    fn failed(latency: Duration, why: String) -> Outcome {
        Outcome {
            status: StatusCode::BAD_GATEWAY,
            failure: Some(why),
            error_body: None,
            served_by: None,
            deployment: None,
            attempts: 0,
            latency,
            complete: false,
            usage: None,
        }
    }
}

/// How much of a non-2xx body is kept to show.
const ERROR_BODY_CHARS: usize = 300;

async fn one_request(client: &HttpsClient, target: &Target, stream: bool, n: usize) -> Outcome {
    let started = Instant::now();
    match tokio::time::timeout(target.timeout, exchange(client, target, stream, n, started)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::failed(
            started.elapsed(),
            format!("no whole answer within {:?} (--timeout)", target.timeout),
        ),
    }
}

async fn exchange(
    client: &HttpsClient,
    target: &Target,
    stream: bool,
    n: usize,
    started: Instant,
) -> Outcome {
    let mut body = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": format!("Request {n}: say something about load balancing across regions.")}
        ],
        "max_tokens": 24,
    });
    if stream {
        body["stream"] = serde_json::json!(true);
        if target.include_usage {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
    }
    let mut req = Request::post(&target.url).header("content-type", "application/json");
    if let Some(k) = &target.key {
        req = req.header("api-key", k);
    }
    for (name, value) in &target.headers {
        req = req.header(name, value);
    }
    let req = match req.body(Full::new(Bytes::from(body.to_string()))) {
        Ok(r) => r,
        Err(e) => return Outcome::failed(started.elapsed(), format!("invalid request: {e}")),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::failed(started.elapsed(), transport_error(&e)),
    };
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let served_by = header("x-switchyard-backend").or_else(|| header("x-ms-region"));
    let deployment = header("x-switchyard-deployment");
    let attempts = header("x-switchyard-attempts")
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let mut tap = Tap::new(header("content-type").as_deref(), false);
    let bytes = resp.into_body().collect().await.map(|c| c.to_bytes());
    let (complete, usage, failure, error_body) = match bytes {
        Ok(b) => {
            let complete = if stream {
                b.ends_with(b"data: [DONE]\n\n")
            } else {
                serde_json::from_slice::<serde_json::Value>(&b).is_ok()
            };
            let error_body = (!status.is_success()).then(|| {
                String::from_utf8_lossy(&b)
                    .chars()
                    .take(ERROR_BODY_CHARS)
                    .collect()
            });
            let usage = tap.as_mut().and_then(|t| {
                t.feed(b);
                t.finish().1
            });
            (complete, usage, None, error_body)
        }
        Err(e) => (
            false,
            None,
            Some(format!("the answer's body broke off: {e}")),
            None,
        ),
    };
    Outcome {
        status,
        failure,
        error_body,
        served_by,
        deployment,
        attempts,
        latency: started.elapsed(),
        complete,
        usage,
    }
}

/// A client error as a person reads it: its kind and every cause, not just "error".
fn transport_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut text = if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "the connection failed".to_string()
    };
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
        if !self.tty && !n.is_multiple_of(50) && n != self.total {
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
        let line = format!("[{bar}] {n}/{}  ok {ok}  retried {retried}", self.total);
        if self.tty {
            let _ = write!(err, "\r{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// The `p` quantile (0 to 1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// The probe's findings.
pub fn report(outcomes: &[Outcome]) -> serde_json::Value {
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut error_bodies: BTreeMap<u16, String> = BTreeMap::new();
    for o in outcomes {
        // A request that got no answer (no attempt came back) has no status to count.
        if o.attempts > 0 {
            *by_status.entry(o.status.as_u16()).or_default() += 1;
        }
        if let Some(why) = &o.failure {
            *failures.entry(why.clone()).or_default() += 1;
        }
        if let Some(body) = &o.error_body {
            error_bodies
                .entry(o.status.as_u16())
                .or_insert_with(|| body.clone());
        }
        if o.status.is_success() {
            *by_backend
                .entry(o.served_by.clone().unwrap_or_else(|| "-".into()))
                .or_default() += 1;
        }
    }
    let mut lat: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.status.is_success())
        .map(|o| o.latency)
        .collect();
    lat.sort();
    let ms = |p| percentile(&lat, p).as_secs_f64() * 1000.0;
    let sum = |f: fn(&Usage) -> u64| {
        outcomes
            .iter()
            .filter_map(|o| o.usage.as_ref())
            .map(f)
            .sum::<u64>()
    };
    serde_json::json!({
        "requests": outcomes.len(),
        "succeeded": outcomes.iter().filter(|o| o.status.is_success() && o.complete).count(),
        "retried": outcomes.iter().filter(|o| o.attempts > 1).count(),
        "by_backend": by_backend,
        "by_status": by_status,
        "failures": failures,
        "error_bodies": error_bodies,
        "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": ms(1.0)},
        "tokens": {
            "prompt": sum(|u| u.prompt_tokens),
            "completion": sum(|u| u.completion_tokens),
            "total": sum(|u| u.total_tokens),
        },
    })
}

/// The report as a person reads it.
pub fn print_report(r: &serde_json::Value) {
    println!("\n{:<24} {:>8}", "served by", "requests");
    if let Some(m) = r["by_backend"].as_object() {
        for (k, v) in m {
            println!("{k:<24} {v:>8}");
        }
    }
    println!("\n{:<24} {:>8}", "status", "requests");
    if let Some(m) = r["by_status"].as_object() {
        for (k, v) in m {
            println!("{k:<24} {v:>8}");
        }
    }
    if let Some(m) = r["failures"].as_object().filter(|m| !m.is_empty()) {
        println!("\nno whole answer:");
        for (why, n) in m {
            println!("  {n:>6}  {why}");
        }
    }
    if let Some(m) = r["error_bodies"].as_object().filter(|m| !m.is_empty()) {
        println!("\nfirst answer of each error status:");
        for (status, body) in m {
            println!("  {status}: {}", body.as_str().unwrap_or(""));
        }
    }
    let l = &r["latency_ms"];
    println!(
        "\nlatency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        l["p50"].as_f64().unwrap_or(0.0),
        l["p90"].as_f64().unwrap_or(0.0),
        l["p99"].as_f64().unwrap_or(0.0),
        l["max"].as_f64().unwrap_or(0.0)
    );
    let t = &r["tokens"];
    println!(
        "tokens: prompt {}  completion {}  total {}",
        t["prompt"], t["completion"], t["total"]
    );
    println!(
        "succeeded {}/{}, {} needed a second backend",
        r["succeeded"], r["requests"], r["retried"]
    );
}

/// `switchyard health`: a GET on a plain-HTTP `url` (the admin listener's `/healthz`), for
/// container health checks in images without curl. Ok with the status when it is 2xx.
pub async fn health(url: &str, timeout: Duration) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs are checked"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url}: no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // The status line is all that is read.
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut head[n..]).await {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(e.to_string()),
            }
        }
        std::str::from_utf8(&head[..n])
            .ok()
            .and_then(|l| {
                l.strip_prefix("HTTP/1.1 ")
                    .or_else(|| l.strip_prefix("HTTP/1.0 "))
            })
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP answer".to_string())
    };
    let status = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))??;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(format!("{url}: {status}"))
    }
}
