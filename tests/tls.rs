//! HTTPS on the client listener (certificate and key from the config, replaced by a reload)
//! and HTTPS to backends with an extra CA. Every certificate is made here, by a CA generated
//! for the test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::sync::Arc;

use common::*;
use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use switchyard::config::Config;
use switchyard::sim::SimConfig;

fn client_trusting(ca_pem: &str) -> reqwest::Client {
    switchyard::install_crypto_provider();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}

/// Whether a new client that trusts only `ca_pem` gets a chat completion from `base`: a new
/// connection, so a new handshake.
async fn served_with(ca_pem: &str, base: &str) -> bool {
    client_trusting(ca_pem)
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(chat_body(false))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

fn https_base(r: &Running) -> String {
    format!("https://localhost:{}", r.gateway.addr.port())
}

#[tokio::test]
async fn the_listener_serves_https_with_the_configured_certificate() {
    let (_sims, backends) = start_sims(&["a"]).await;
    let dir = TempDir::new();
    let p = pki("listener");
    let cert = dir.write("cert.pem", &p.cert_pem);
    let key = dir.write("key.pem", &p.key_pem);
    let g = gateway(
        &backends,
        "",
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\nheader_read_timeout = \"500ms\""),
    )
    .await;
    let base = https_base(&g);

    let r = post_chat(&client_trusting(&p.ca_pem), &base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ms-region"), "a");

    // A body that stops arriving over HTTPS is cut off with a 408, as over plain HTTP.
    let stalled = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"model\""))
    })
    .chain(futures_util::stream::pending());
    let r = client_trusting(&p.ca_pem)
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stalled))
        .send();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), r)
        .await
        .expect("a stalled body over HTTPS was never cut off")
        .unwrap();
    assert_eq!(r.status(), 408);

    // A client that does not trust the CA refuses the certificate.
    let other = pki("other");
    let e = client_trusting(&other.ca_pem)
        .post(format!("{base}{CHAT}"))
        .body(chat_body(false))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");

    // Plain HTTP to the HTTPS port gets no answer as HTTP.
    let plain = client()
        .post(format!("http://{}{CHAT}", g.gateway.addr))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    g.stop().await;
}

/// A gateway started from a config file, serving HTTPS with `first`'s certificate from files
/// in `dir` that the test rewrites.
struct HttpsGateway {
    _sims: Vec<switchyard::sim::Simulator>,
    _file: ConfigFile,
    dir: TempDir,
    first: Pki,
    g: Running,
    base: String,
}

async fn https_gateway(watch: Option<std::time::Duration>) -> HttpsGateway {
    let (sims, backends) = start_sims(&["a"]).await;
    let dir = TempDir::new();
    let first = pki("first");
    let cert = dir.write("cert.pem", &first.cert_pem);
    let key = dir.write("key.pem", &first.key_pem);
    let text = config_text(
        &backends,
        "",
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\""),
        "",
    );
    let file = ConfigFile::new(&text);
    let g = gateway_from_file(&file, watch).await;
    let base = https_base(&g);
    HttpsGateway {
        _sims: sims,
        _file: file,
        dir,
        first,
        g,
        base,
    }
}

#[tokio::test]
async fn a_reload_replaces_the_listener_certificate() {
    // Every field bound: `..` would drop the simulator and the config file at once.
    let HttpsGateway {
        _sims,
        _file,
        dir,
        first,
        g,
        base,
    } = https_gateway(None).await;
    assert!(served_with(&first.ca_pem, &base).await);

    let second = pki("second");
    dir.write("cert.pem", &second.cert_pem);
    dir.write("key.pem", &second.key_pem);
    let reloaded = g
        .gateway
        .reload(switchyard::server::Trigger::Admin)
        .await
        .unwrap();
    assert!(reloaded.restart_required.is_empty(), "{reloaded:?}");
    // New connections get the new certificate (fresh clients: no pooled connection).
    assert!(served_with(&second.ca_pem, &base).await);
    assert!(
        client_trusting(&first.ca_pem)
            .post(format!("{base}{CHAT}"))
            .body(chat_body(false))
            .send()
            .await
            .is_err()
    );

    // A key that does not match its certificate is refused, and the running one stays.
    dir.write("key.pem", &first.key_pem);
    let e = g
        .gateway
        .reload(switchyard::server::Trigger::Admin)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("server.tls_key"), "{e}");
    assert!(served_with(&second.ca_pem, &base).await);
    g.stop().await;
}

/// A watched config picks up renewed certificate files by itself, as a cert-manager rotation
/// would write them; a key that does not match is refused once and the running one stays.
#[tokio::test]
async fn the_file_watch_picks_up_a_renewed_certificate() {
    // Every field bound: `..` would drop the simulator and the config file at once.
    let HttpsGateway {
        _sims,
        _file,
        dir,
        first,
        g,
        base,
    } = https_gateway(Some(std::time::Duration::from_millis(50))).await;
    assert!(served_with(&first.ca_pem, &base).await);

    let second = pki("second");
    dir.write("cert.pem", &second.cert_pem);
    dir.write("key.pem", &second.key_pem);
    let renewed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if served_with(&second.ca_pem, &base).await {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(renewed.is_ok(), "the renewed certificate was never served");

    // A key that is not the certificate's: refused once, not on every look; the running
    // certificate stays.
    dir.write("key.pem", &first.key_pem);
    let rejected = "switchyard_config_reloads_total{result=\"rejected\",trigger=\"file\"}";
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while metric_value(&client(), &g.admin, rejected).await < 1.0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the mismatched key was never tried");
    // Ten more looks of the watch.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(metric_value(&client(), &g.admin, rejected).await, 1.0);
    assert!(served_with(&second.ca_pem, &base).await);
    g.stop().await;
}

async fn https_sim(p: &Pki) -> switchyard::sim::Simulator {
    let chain = vec![CertificateDer::from_pem_slice(p.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    start_sim(SimConfig {
        tls: Some(Arc::new(tls)),
        ..sim("secure")
    })
    .await
}

#[tokio::test]
async fn backends_over_https_are_trusted_through_the_configured_ca() {
    switchyard::install_crypto_provider();
    let p = pki("backend");
    let s = https_sim(&p).await;
    assert!(s.url().starts_with("https://localhost:"));
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &p.ca_pem);

    let trusting = gateway(&[B::sim(&s)], "", &format!("ca_file = \"{ca}\"")).await;
    let r = post_chat(&client(), &trusting.base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ms-region"), "secure");
    // Streams too.
    let r = send_chat(&client(), &trusting.base, true).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    trusting.stop().await;

    // Without the CA the backend's certificate is not trusted: nothing is served, and the
    // client hears why in an OpenAI-shaped error.
    let before = s.stats().requests;
    let strict = gateway(&[B::sim(&s)], "max_attempts = 1", "").await;
    let r = post_chat(&client(), &strict.base).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(s.stats().requests, before);
    strict.stop().await;
}

#[test]
fn tls_settings_are_checked_with_the_field_named() {
    let dir = TempDir::new();
    let p = pki("check");
    let other = pki("other");
    let cert = dir.write("cert.pem", &p.cert_pem);
    let key = dir.write("key.pem", &p.key_pem);
    let wrong_key = dir.write("wrong.pem", &other.key_pem);
    let not_pem = dir.write("junk.pem", "hello");
    let parse = |server: &str| {
        let text = format!(
            "[server]\n{server}\n[[backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\nauth = {{ type = \"none\" }}\n"
        );
        Config::parse(&text, &|_| None)
    };
    let err = |server: &str| parse(server).unwrap_err();

    assert!(parse(&format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"")).is_ok());
    assert!(parse(&format!("ca_file = \"{cert}\"")).is_ok());
    assert_eq!(
        err(&format!("tls_cert = \"{cert}\"")).path,
        "server.tls_key"
    );
    assert_eq!(err(&format!("tls_key = \"{key}\"")).path, "server.tls_cert");
    let e = err(&format!("tls_cert = \"{cert}\"\ntls_key = \"{wrong_key}\""));
    assert_eq!(e.path, "server.tls_key");
    assert!(e.message.contains("not the private key"), "{e}");
    let e = err(&format!("tls_cert = \"{not_pem}\"\ntls_key = \"{key}\""));
    assert_eq!(e.path, "server.tls_cert");
    let e = err(&format!("tls_cert = \"{cert}\"\ntls_key = \"{not_pem}\""));
    assert_eq!(e.path, "server.tls_key");
    // The key file's content never appears in an error.
    let e = err(&format!("tls_cert = \"{key}\"\ntls_key = \"{cert}\""));
    assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");
    let e = err("tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"");
    assert_eq!(e.path, "server.tls_cert");
    assert_eq!(
        err(&format!("ca_file = \"{not_pem}\"")).path,
        "server.ca_file"
    );
    // A device or a directory is refused before it is read.
    let e = err("ca_file = \"/dev/zero\"");
    assert!(e.message.contains("not a regular file"), "{e}");
    let e = err(&format!("ca_file = \"{}\"", dir.0.display()));
    assert!(e.message.contains("not a regular file"), "{e}");
    assert_eq!(
        err("header_read_timeout = \"0s\"").path,
        "server.header_read_timeout"
    );
    assert_eq!(err("max_connections = 0").path, "server.max_connections");
}
