//! Switchyard: a self-hosted gateway for Azure OpenAI.
//!
//! The way of one request: `server` (listeners) hands it to [`pipeline::handle`], whose
//! phases run in the order of its files (authenticate, read, route, admit, forward, respond,
//! finish); `forward` runs the attempt loop in `proxy` (`balancer` picks, `upstream` sends one
//! attempt over `http1::client`), and the answer streams back in a body that ends the
//! request's accounting. `live` holds what every request reads and what a reload swaps.

pub mod admin;
pub mod affinity;
pub mod api;
pub mod auth;
pub mod balancer;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod fnv;
pub mod http1;
pub mod http_client;
pub mod ids;
pub mod limits;
pub mod live;
pub mod pipeline;
pub mod proxy;
pub mod redis;
pub mod rng;
pub mod routing;
pub mod server;
pub mod sim;
pub mod stall;
pub mod sync;
pub mod telemetry;
pub mod upstream;
pub mod usage;

/// Installs the process-wide TLS crypto provider (ring). Idempotent; call before building clients.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
