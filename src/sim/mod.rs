//! The built-in Azure OpenAI simulator: chat completions (plain and streamed), completions and
//! embeddings with realistic bodies; api-key checking; latency; Azure-style TPM/RPM limits with
//! `retry-after`, `retry-after-ms` and `x-ratelimit-remaining-*`; fault injection. Any other
//! operation echoes the request body back, so byte-exact forwarding can be checked.
//!
//! Used in-process by tests and the demo, and as `switchyard simulate`.

mod answer;
mod limits;
mod paced;
mod responses;
mod stateful;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::body::{BoxBody, BoxError, full};
use crate::ids::IdGen;
use crate::rng::SplitMix64;
use crate::sync::lock;
use answer::answer;
use limits::Bucket;
use paced::PacedBody;
use responses::{Ask, Reply, azure_error};

/// How a simulated instance behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Shown in `x-ms-region` and logs.
    pub name: String,
    /// When set, requests must carry it in `api-key` or `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// When set, `Authorization: Bearer` tokens in this set are accepted too (an identity
    /// provider under test adds the tokens it issues, as Entra ID would make them valid).
    pub accepted_tokens: Option<Arc<Mutex<std::collections::HashSet<String>>>>,
    /// Time to first token (streams) or added to the whole answer (plain responses).
    pub ttft: Duration,
    /// Time between generated tokens.
    pub token_interval: Duration,
    /// How many tokens an answer has when `max_tokens` does not cut it shorter.
    pub completion_tokens: u32,
    pub tokens_per_minute: Option<u32>,
    pub requests_per_minute: Option<u32>,
    /// Share of the rate-limit budget available at start (1.0: a fresh minute). Benchmarks start
    /// lower so that steady-state throughput, not the first minute's burst, is measured.
    pub initial_fill: f64,
    /// Seeds fault draws and generated text, so runs repeat.
    pub seed: u64,
    /// Keep every request (method, path, headers, body) for inspection by tests.
    pub record: bool,
    pub faults: Faults,
    /// Serve HTTPS with this config (tests of TLS to backends).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How long a batch, or a background response, takes to complete.
    pub object_delay: Duration,
    /// The context window of a model (by the name the request uses, path or body `model`):
    /// a chat completion or completion whose prompt and `max_tokens` together are over it gets
    /// Azure's 400 `context_length_exceeded`. Unlisted models take any length.
    pub context_windows: Vec<(String, u32)>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            name: "sim".into(),
            api_key: None,
            accepted_tokens: None,
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            completion_tokens: 16,
            tokens_per_minute: None,
            requests_per_minute: None,
            initial_fill: 1.0,
            seed: 1,
            record: false,
            faults: Faults::default(),
            tls: None,
            object_delay: Duration::from_secs(2),
            context_windows: Vec::new(),
        }
    }
}

/// Injected failures, drawn per request from the seeded generator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Share of requests answered with `error_status` (0.0 to 1.0).
    pub error_rate: f64,
    /// The status for injected errors (500 when 0).
    pub error_status: u16,
    /// Share of requests whose connection drops: mid-stream for streams, before the answer else.
    pub drop_rate: f64,
    /// Share of requests that are never answered.
    pub stall_rate: f64,
    /// Refuse connections (the listener is closed until this is cleared).
    pub refuse: bool,
    /// The wait an injected 429 or 503 asks for, sent as `retry-after-ms` and `retry-after`
    /// (rounded up); `retry-after: 1` alone when unset.
    pub retry_after_ms: Option<u64>,
}

/// One request as the simulator received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Counts by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    pub requests: u64,
    pub ok: u64,
    pub throttled: u64,
    pub faulted: u64,
    pub unauthorized: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    throttled: AtomicU64,
    faulted: AtomicU64,
    unauthorized: AtomicU64,
}

struct Limits {
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
}

struct SimState {
    cfg: SimConfig,
    faults: Mutex<Faults>,
    rng: Mutex<SplitMix64>,
    limits: Mutex<Limits>,
    recorded: Mutex<Vec<RecordedRequest>>,
    counters: Counters,
    ids: IdGen,
    /// Files, batches and responses made on this instance, and its prompt cache.
    objects: Mutex<stateful::Objects>,
    refuse: watch::Sender<bool>,
    /// The accept loop echoes each refuse setting here once it took effect.
    refuse_applied: watch::Sender<bool>,
    shutdown: CancellationToken,
}

/// A running simulated Azure OpenAI instance. Dropping it stops it.
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<SimState>,
    task: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Binds `listen` (port 0 for any) and starts serving.
    pub async fn start(cfg: SimConfig, listen: SocketAddr) -> std::io::Result<Simulator> {
        let listener = crate::server::bind(listen)?;
        let addr = listener.local_addr()?;
        let now = tokio::time::Instant::now();
        let limits = Limits {
            tokens: cfg
                .tokens_per_minute
                .map(|l| Bucket::per_minute(l, now).filled(cfg.initial_fill)),
            requests: cfg
                .requests_per_minute
                .map(|l| Bucket::requests_per_minute(l, now).filled(cfg.initial_fill)),
        };
        let (refuse, refuse_rx) = watch::channel(cfg.faults.refuse);
        let (refuse_applied, _) = watch::channel(!cfg.faults.refuse);
        let state = Arc::new(SimState {
            faults: Mutex::new(cfg.faults.clone()),
            rng: Mutex::new(SplitMix64::new(cfg.seed)),
            limits: Mutex::new(limits),
            recorded: Mutex::new(Vec::new()),
            counters: Counters::default(),
            ids: IdGen::new(),
            objects: Mutex::new(stateful::Objects::new(cfg.seed ^ addr_seed(addr))),
            refuse,
            refuse_applied,
            shutdown: CancellationToken::new(),
            cfg,
        });
        let task = tokio::spawn(accept_loop(listener, addr, state.clone(), refuse_rx));
        Ok(Simulator {
            addr,
            state,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port` (`https://localhost:port` when it serves TLS), ready for a
    /// backend `url`.
    pub fn url(&self) -> String {
        match self.state.cfg.tls {
            None => format!("http://{}", self.addr),
            Some(_) => format!("https://localhost:{}", self.addr.port()),
        }
    }

    pub fn name(&self) -> &str {
        &self.state.cfg.name
    }

    /// Changes the injected faults. Returns once they apply: in particular, once the listener
    /// is closed (refuse) or accepting again, so the next connect sees the new behaviour.
    pub async fn set_faults(&self, faults: Faults) {
        let refuse = faults.refuse;
        *lock(&self.state.faults) = faults;
        let mut applied = self.state.refuse_applied.subscribe();
        self.state.refuse.send_replace(refuse);
        let _ =
            tokio::time::timeout(Duration::from_secs(5), applied.wait_for(|a| *a == refuse)).await;
    }

    /// Every request received so far (only when `record` is on).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.recorded).clone()
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.state.counters;
        SimStats {
            requests: c.requests.load(Ordering::Relaxed),
            ok: c.ok.load(Ordering::Relaxed),
            throttled: c.throttled.load(Ordering::Relaxed),
            faulted: c.faulted.load(Ordering::Relaxed),
            unauthorized: c.unauthorized.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and cuts every open connection, as a dying instance would.
    pub async fn stop(mut self) {
        self.state.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<SimState>,
    mut refuse: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        let refusing = *refuse.borrow_and_update();
        if refusing {
            // Closing the socket makes connects fail with "connection refused".
            listener = None;
        } else if listener.is_none() {
            match crate::server::bind(addr) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "simulator could not re-bind");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        state.refuse_applied.send_replace(refusing);
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            r = refuse.changed() => if r.is_err() { break },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = async { match &listener { Some(l) => l.accept().await, None => std::future::pending().await } } => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let tls = state.cfg.tls.clone();
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(cfg) => {
                            let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        }
    }
    connections.shutdown().await;
}

type SimResult = Result<Response<BoxBody>, BoxError>;

async fn handle(state: Arc<SimState>, req: Request<Incoming>) -> SimResult {
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    if state.cfg.record {
        lock(&state.recorded).push(RecordedRequest {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    let mut resp = answer(&state, &parts, body).await?;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&state.cfg.name) {
        h.insert("x-ms-region", v);
    }
    if let Ok(v) = HeaderValue::from_str(&state.ids.uuid_v4()) {
        h.insert("apim-request-id", v);
    }
    if let Some(rid) = parts.headers.get("x-request-id") {
        h.insert("x-request-id", rid.clone());
    }
    Ok(resp)
}

/// Waits `d`; not at all when it is zero (a zero sleep still waits for the timer's next
/// millisecond tick, which would put a millisecond on every instant answer).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// A request over the limits: how long until it would fit, and what is left.
struct Throttled {
    wait: Duration,
    tokens: bool,
    remaining: (u64, u64),
}

impl Throttled {
    fn response(&self) -> Response<BoxBody> {
        let what = if self.tokens {
            "token rate limit"
        } else {
            "call rate limit"
        };
        let secs = self.wait.as_millis().div_ceil(1000).max(1);
        let mut r = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            azure_error(
                "429",
                &format!(
                    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded {what} of your current OpenAI S0 pricing tier. Please retry after {secs} seconds."
                ),
            ),
        );
        let h = r.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        h.insert(
            "retry-after-ms",
            HeaderValue::from(self.wait.as_millis().max(1) as u64),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from(self.remaining.0),
        );
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from(self.remaining.1),
        );
        r
    }
}

/// Charges a request against the limits; returns what remains (tokens, requests).
fn admit(state: &SimState, tokens: u32) -> Result<(u64, u64), Throttled> {
    let now = tokio::time::Instant::now();
    let mut limits = lock(&state.limits);
    let wait_tokens = limits
        .tokens
        .as_mut()
        .and_then(|b| b.wait_for(tokens as f64, now));
    let wait_requests = limits.requests.as_mut().and_then(|b| b.wait_for(1.0, now));
    if wait_tokens.is_none() && wait_requests.is_none() {
        if let Some(b) = limits.tokens.as_mut() {
            b.take(tokens as f64);
        }
        if let Some(b) = limits.requests.as_mut() {
            b.take(1.0);
        }
    }
    let remaining = (
        limits
            .tokens
            .as_ref()
            .map(Bucket::remaining)
            .unwrap_or(u64::from(u32::MAX)),
        limits
            .requests
            .as_ref()
            .map(Bucket::remaining)
            .unwrap_or(u64::from(u32::MAX)),
    );
    match (wait_tokens, wait_requests) {
        (None, None) => Ok(remaining),
        (a, b) => Err(Throttled {
            wait: a.unwrap_or_default().max(b.unwrap_or_default()),
            tokens: a.is_some(),
            remaining,
        }),
    }
}

/// Mixed into the instance's secret, so instances started with the same seed still seal
/// reasoning differently.
fn addr_seed(addr: SocketAddr) -> u64 {
    u64::from(addr.port()) << 32 | 0x9e37
}

fn authorized(headers: &HeaderMap, cfg: &SimConfig) -> bool {
    let key = cfg.api_key.as_deref();
    let by_header = headers
        .get("api-key")
        .is_some_and(|v| key.is_some_and(|k| v.as_bytes() == k.as_bytes()));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let by_bearer = bearer.is_some_and(|t| {
        key == Some(t)
            || cfg
                .accepted_tokens
                .as_ref()
                .is_some_and(|set| lock(set).contains(t))
    });
    by_header || by_bearer
}

fn json_response(status: StatusCode, body: Bytes) -> Response<BoxBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
