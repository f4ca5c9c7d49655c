//! Test harness: simulators and the gateway in-process, every listener on port 0.
#![allow(dead_code)]

use std::net::SocketAddr;

use switchyard::config::Config;
use switchyard::server::Gateway;
use switchyard::sim::{SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

pub const ANY: &str = "127.0.0.1:0";

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

/// A URL where nothing listens: connects are refused.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind(ANY).unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// One backend entry: name, URL, key (None = no auth).
pub struct B {
    pub name: String,
    pub url: String,
    pub key: Option<String>,
}

impl B {
    pub fn sim(s: &Simulator) -> B {
        B {
            name: s.name().to_string(),
            url: s.url(),
            key: Some(format!("key-{}", s.name())),
        }
    }

    pub fn dead(name: &str) -> B {
        B {
            name: name.into(),
            url: dead_url(),
            key: None,
        }
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

pub fn config_text(backends: &[B], routing: &str, server: &str) -> String {
    let mut t = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n\n[routing]\n{routing}\n"
    );
    for b in backends {
        let auth = match &b.key {
            Some(k) => format!("{{ type = \"api_key\", key = \"{k}\" }}"),
            None => "{ type = \"none\" }".to_string(),
        };
        t.push_str(&format!(
            "\n[[backends]]\nname = \"{}\"\nurl = \"{}\"\nauth = {auth}\n",
            b.name, b.url
        ));
    }
    t
}

pub async fn gateway(backends: &[B], routing: &str, server: &str) -> Running {
    switchyard::install_crypto_provider();
    let text = config_text(backends, routing, server);
    let cfg = Config::parse(&text, &|_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let shutdown = CancellationToken::new();
    let gateway = switchyard::server::start(cfg, shutdown.clone())
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
