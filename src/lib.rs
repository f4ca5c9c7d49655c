//! Switchyard: a self-hosted gateway for Azure OpenAI.
//!
//! Request pipeline (see `pipeline`): `api` classifies the path, the body is read under
//! `server.max_body_bytes`, `proxy` runs the attempt loop (`balancer` picks, `upstream` sends one
//! attempt with the backend's own credential), and the response streams back through a body
//! wrapper that ends the request's accounting in `telemetry`.

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
