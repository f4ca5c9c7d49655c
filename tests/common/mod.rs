//! Test harness: simulators and the gateway in-process, every listener on port 0.
#![allow(
    dead_code,
    unused_imports,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "each test binary uses some of the helpers (and of the stores); they print what they skip"
)]

use std::net::SocketAddr;

use switchyard::config::Config;
use switchyard::server::Gateway;
use switchyard::sim::{SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

pub const ANY: &str = "127.0.0.1:0";

mod stores;
pub use stores::*;

/// Faults that answer every request 429, asking to wait `retry_after_ms`.
pub fn throttling(retry_after_ms: u64) -> switchyard::sim::Faults {
    switchyard::sim::Faults {
        error_rate: 1.0,
        error_status: 429,
        retry_after_ms: Some(retry_after_ms),
        ..switchyard::sim::Faults::default()
    }
}

/// A simulator config that records requests and requires the key `key-{name}`.
pub fn sim(name: &str) -> SimConfig {
    SimConfig {
        name: name.into(),
        api_key: Some(format!("key-{name}")),
        record: true,
        ..SimConfig::default()
    }
}

pub async fn start_sim(cfg: SimConfig) -> Simulator {
    Simulator::start(cfg, ANY.parse().unwrap()).await.unwrap()
}

/// Default simulators named `names`, and the backend entries pointing at them.
pub async fn start_sims(names: &[&str]) -> (Vec<Simulator>, Vec<B>) {
    let mut sims = Vec::new();
    for n in names {
        sims.push(start_sim(sim(n)).await);
    }
    let backends = sims.iter().map(B::sim).collect();
    (sims, backends)
}

/// A loopback port free at the moment, for a process that binds it itself.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind(ANY).unwrap();
    l.local_addr().unwrap().port()
}

/// A URL where nothing listens: connects are refused. The port is bound and never listened on,
/// and stays so for the test's life: a port freed again could be taken meanwhile by another
/// test's server, which would then answer.
pub fn dead_url() -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(ANY.parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    format!("http://{addr}")
}

/// One backend entry: name, URL, key (None = no auth).
pub struct B {
    pub name: String,
    pub url: String,
    pub key: Option<String>,
    /// More keys for the `[[backends]]` entry, e.g. `"priority = 2"`.
    pub extra: String,
}

impl B {
    pub fn sim(s: &Simulator) -> B {
        B {
            name: s.name().to_string(),
            url: s.url(),
            key: Some(format!("key-{}", s.name())),
            extra: String::new(),
        }
    }

    pub fn dead(name: &str) -> B {
        B {
            name: name.into(),
            url: dead_url(),
            key: None,
            extra: String::new(),
        }
    }

    pub fn url(name: &str, url: String) -> B {
        B {
            name: name.into(),
            url,
            key: None,
            extra: String::new(),
        }
    }

    pub fn with(mut self, extra: &str) -> B {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }
}

pub struct Running {
    pub gateway: Gateway,
    pub base: String,
    pub admin: String,
    pub shutdown: CancellationToken,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.gateway.wait().await;
    }
}

pub fn config_text(backends: &[B], routing: &str, server: &str, tail: &str) -> String {
    // Tests stop their gateways at once, unless they are about the delay.
    let delay = if server.contains("shutdown_delay") {
        ""
    } else {
        "shutdown_delay = \"0s\"\n"
    };
    let mut t = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{delay}{server}\n\n[routing]\n{routing}\n"
    );
    for b in backends {
        let auth = match &b.key {
            // A whole auth table, e.g. `{ type = "managed_identity" }`.
            Some(k) if k.starts_with('{') => k.clone(),
            Some(k) => format!("{{ type = \"api_key\", key = \"{k}\" }}"),
            None => "{ type = \"none\" }".to_string(),
        };
        t.push_str(&format!(
            "\n[[backends]]\nname = \"{}\"\nurl = \"{}\"\nauth = {auth}\n{}",
            b.name, b.url, b.extra
        ));
    }
    t.push_str(tail);
    t
}

pub async fn gateway(backends: &[B], routing: &str, server: &str) -> Running {
    gateway_with(backends, routing, server, "").await
}

/// A gateway whose config ends with `tail` (e.g. `[[deployments]]` entries).
pub async fn gateway_with(backends: &[B], routing: &str, server: &str, tail: &str) -> Running {
    gateway_env(backends, routing, server, tail, &[]).await
}

/// As `gateway_with`, with `env` as the environment the config reads (`${VAR}`, and platform
/// variables such as `IDENTITY_ENDPOINT`); nothing comes from the real environment.
pub async fn gateway_env(
    backends: &[B],
    routing: &str,
    server: &str,
    tail: &str,
    env: &[(&str, &str)],
) -> Running {
    switchyard::install_crypto_provider();
    let text = config_text(backends, routing, server, tail);
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let cfg = Config::parse(&text, &lookup).unwrap_or_else(|e| panic!("{e}\n{text}"));
    start_gateway(cfg, None).await
}

async fn start_gateway(cfg: Config, source: Option<switchyard::server::ConfigSource>) -> Running {
    let shutdown = CancellationToken::new();
    let gateway = switchyard::server::start_with(cfg, source, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{}", gateway.addr);
    let admin = format!("http://{}", gateway.admin_addr.unwrap());
    Running {
        gateway,
        base,
        admin,
        shutdown,
    }
}

/// A config file for reload tests, removed on drop.
pub struct ConfigFile {
    pub path: std::path::PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("switchyard-test-{}-{n}.toml", std::process::id()));
        let f = ConfigFile { path };
        f.write(text);
        f
    }

    /// Replaces the content in one step (write aside, rename), as editors and Kubernetes do.
    pub fn write(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A gateway started from `file`, reloadable from it (`watch`: look at the file this often).
pub async fn gateway_from_file(file: &ConfigFile, watch: Option<std::time::Duration>) -> Running {
    switchyard::install_crypto_provider();
    let text = std::fs::read_to_string(&file.path).unwrap();
    let cfg = Config::parse(&text, &|_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let source = switchyard::server::ConfigSource {
        path: file.path.clone(),
        lookup: std::sync::Arc::new(|_| None),
        sighup: false,
        watch,
    };
    start_gateway(cfg, Some(source)).await
}

pub fn client() -> reqwest::Client {
    switchyard::install_crypto_provider();
    reqwest::Client::builder().build().unwrap()
}

pub const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

pub fn chat_body(stream: bool) -> String {
    serde_json::json!({
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        "stream": stream
    })
    .to_string()
}

pub async fn post_chat(client: &reqwest::Client, base: &str) -> reqwest::Response {
    send_chat(client, base, false).await
}

/// A chat completion request through the gateway at `base`, streaming or not.
pub async fn send_chat(client: &reqwest::Client, base: &str, stream: bool) -> reqwest::Response {
    client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .header("api-key", "client-key")
        .body(chat_body(stream))
        .send()
        .await
        .unwrap()
}

pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

pub fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A backend that answers each request with an event stream the test writes: each request
/// hands the test a sender for its body (an `Err` sent cuts the connection).
pub async fn manual_stream_backend() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<
        tokio::sync::mpsc::Sender<Result<bytes::Bytes, switchyard::body::BoxError>>,
    >,
    tokio::task::JoinHandle<()>,
) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use switchyard::body::ChannelBody;

    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (senders_tx, senders_rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let senders_tx = senders_tx.clone();
            conns.spawn(async move {
                let svc = service_fn(move |_req| {
                    let (tx, body) = ChannelBody::new(4);
                    let _ = senders_tx.send(tx);
                    async move {
                        let mut r = http::Response::new(body.boxed());
                        r.headers_mut()
                            .insert("content-type", "text/event-stream".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, senders_rx, server)
}

/// A backend that answers every request with `status`, `headers` and an Azure-shaped error body.
pub async fn scripted_backend(
    status: u16,
    headers: Vec<(&'static str, String)>,
) -> (String, tokio::task::JoinHandle<()>) {
    scripted_backend_with(
        status,
        headers,
        r#"{"error":{"code":"scripted","message":"scripted answer"}}"#,
    )
    .await
}

/// [`scripted_backend`] with its own body.
pub async fn scripted_backend_with(
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
) -> (String, tokio::task::JoinHandle<()>) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let headers = std::sync::Arc::new(headers);
    let server = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let headers = headers.clone();
            conns.spawn(async move {
                let svc = service_fn(move |_req| {
                    let mut r = http::Response::new(switchyard::body::full(body).boxed());
                    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    for (k, v) in headers.iter() {
                        r.headers_mut().insert(*k, v.parse().unwrap());
                    }
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, server)
}

/// The admin listener's `/readyz` text.
pub async fn readyz_text(client: &reqwest::Client, admin: &str) -> String {
    admin_text(client, admin, "/readyz").await
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(client: &reqwest::Client, admin: &str) -> String {
    admin_text(client, admin, "/metrics").await
}

async fn admin_text(client: &reqwest::Client, admin: &str, path: &str) -> String {
    client
        .get(format!("{admin}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first metric line starting with `prefix` (0 when absent).
pub async fn metric_value(client: &reqwest::Client, admin: &str, prefix: &str) -> f64 {
    metric_in(&metrics_text(client, admin).await, prefix)
}

/// The value of the first line of `text` starting with `prefix` (0 when absent).
pub fn metric_in(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A response body as JSON.
pub trait JsonValue {
    fn json_value(self) -> impl std::future::Future<Output = serde_json::Value>;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

/// The largest socket buffer the kernel lets a TCP connection grow to, receive and send:
/// the last field of `net.ipv4.tcp_rmem` and `tcp_wmem`.
pub fn tcp_buffer_maxima() -> (u64, u64) {
    let max_of = |path: &str| -> u64 {
        std::fs::read_to_string(path)
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        max_of("/proc/sys/net/ipv4/tcp_rmem"),
        max_of("/proc/sys/net/ipv4/tcp_wmem"),
    )
}
