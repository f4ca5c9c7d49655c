//! HTTPS clients for the gateway's own calls (identity endpoints, JWKS, trace export, the
//! `probe` and `demo` commands, WebSocket upgrades): hyper's pooled client over rustls, every
//! one trusting the system's root certificates plus `server.ca_file`. Calls to backends go
//! through `upstream`'s own HTTP/1.1 client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::ExtraCa;

/// hyper's pooled HTTP(S) client: for WebSocket upgrades to backends, the identity platform and
/// the trace collector.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The system's root certificates, read once: every HTTPS client (backends, upgrades, the
/// identity platform, the trace collector) verifies against the same store, which loading and
/// parsing per client had made the costliest part of start-up. Empty when the system has none.
fn native_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(loaded.certs);
            if store.is_empty() {
                tracing::debug!(errors = ?loaded.errors, "no system root certificates");
            }
            Arc::new(store)
        })
        .clone()
}

/// TLS for every connection the gateway makes: the system's root certificates plus the
/// configured `server.ca_file`.
pub fn tls_config(ca: &ExtraCa) -> Result<Arc<rustls::ClientConfig>, std::io::Error> {
    let system = native_roots();
    let roots = if ca.certs.is_empty() {
        system
    } else {
        let mut store = (*system).clone();
        // Checked when the config was loaded.
        store.add_parsable_certificates(ca.certs.iter().cloned());
        Arc::new(store)
    };
    if roots.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no root CA certificates: the system has none and server.ca_file is not set",
        ));
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// [`build_client`] trusting the system's root certificates only (the demo, `probe`).
pub fn system_client(
    connect_timeout: Duration,
    http2: bool,
) -> Result<HttpsClient, std::io::Error> {
    Ok(build_client(
        connect_timeout,
        http2,
        &*tls_config(&ExtraCa::default())?,
    ))
}

pub fn build_client(
    connect_timeout: Duration,
    http2: bool,
    tls: &rustls::ClientConfig,
) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http();
    let connector = if http2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        // An idle connection to a backend closes after 30 s: a quiet gateway gives its memory
        // back, and a busy one reuses connections long before that.
        .pool_idle_timeout(Duration::from_secs(30))
        // Without a timer the pool only notices expired connections when it next checks one
        // out: after a burst they would stay open, and hold their memory, indefinitely.
        .pool_timer(hyper_util::rt::TokioTimer::new())
        // Enough idle connections per backend for a steady high load; a burst's extra
        // connections close as they come back instead of holding memory for 90 s.
        .pool_max_idle_per_host(128)
        .build(connector)
}
