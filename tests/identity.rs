//! Keyless backends: every Entra token flow against a fake identity platform on loopback that
//! behaves like Azure's (expiry, outage, rejection, rotation), in front of a simulated backend
//! that accepts only the bearer tokens that platform issued.

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

/// How the fake identity platform answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ok,
    Down,
    Reject,
}

/// One request the fake saw: path and query, the headers that matter, the form body.
#[derive(Clone, Debug)]
struct Seen {
    uri: String,
    identity_header: Option<String>,
    metadata: Option<String>,
    form: String,
}

struct Identity {
    url: String,
    mode: Mutex<Mode>,
    lifetime_secs: AtomicU64,
    /// Delay before answering, to make concurrent requests overlap one fetch.
    delay_ms: AtomicU64,
    issued: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    accepted: Arc<Mutex<HashSet<String>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Identity {
    async fn start() -> Arc<Identity> {
        let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<Arc<Identity>>();
        let server = tokio::spawn(async move {
            let me = rx.await.unwrap();
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let me = me.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, std::convert::Infallible>(me.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        let id = Arc::new(Identity {
            url,
            mode: Mutex::new(Mode::Ok),
            lifetime_secs: AtomicU64::new(3600),
            delay_ms: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            accepted: Arc::new(Mutex::new(HashSet::new())),
            _server: server,
        });
        let _ = tx.send(id.clone());
        id
    }

    async fn answer(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<http_body_util::Full<Bytes>> {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let seen = Seen {
            uri: req.uri().to_string(),
            identity_header: h("x-identity-header"),
            metadata: h("metadata"),
            form: String::new(),
        };
        let form = String::from_utf8(req.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap();
        self.seen.lock().unwrap().push(Seen { form, ..seen });
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mode = *self.mode.lock().unwrap();
        let (status, body) = match mode {
            Mode::Down => (500, r#"{"error":"temporarily_unavailable"}"#.to_string()),
            Mode::Reject => (
                400,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#
                    .to_string(),
            ),
            Mode::Ok => {
                let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
                let token = format!("entra-token-{n}");
                self.accepted.lock().unwrap().insert(token.clone());
                let life = self.lifetime_secs.load(Ordering::SeqCst);
                let on = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    + life;
                // Managed identity answers with strings and expires_on; Entra with numbers.
                (
                    200,
                    format!(
                        r#"{{"access_token":"{token}","expires_in":"{life}","expires_on":"{on}","resource":"https://cognitiveservices.azure.com","token_type":"Bearer"}}"#
                    ),
                )
            }
        };
        let mut r = http::Response::new(http_body_util::Full::new(Bytes::from(body)));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        r
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn fetches(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A simulated backend that accepts only tokens `id` issued.
async fn keyless_backend(name: &str, id: &Identity) -> switchyard::sim::Simulator {
    start_sim(SimConfig {
        api_key: None,
        accepted_tokens: Some(id.accepted.clone()),
        ..sim(name)
    })
    .await
}

fn entra(s: &switchyard::sim::Simulator, auth: &str) -> B {
    B {
        key: Some(auth.to_string()),
        ..B::url(s.name(), s.url())
    }
}

/// Polls `cond` until it holds, failing after 10 s. No fixed sleeps.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_service_managed_identity_with_a_user_assigned_client_id() {
    let id = Identity::start().await;
    let backend = keyless_backend("east", &id).await;
    let endpoint = format!("{}/msi/token", id.url);
    let gw = gateway_env(
        &[entra(
            &backend,
            r#"{ type = "managed_identity", client_id = "11111111-2222" }"#,
        )],
        "",
        "",
        "",
        &[
            ("IDENTITY_ENDPOINT", &endpoint),
            ("IDENTITY_HEADER", "platform-header-secret"),
        ],
    )
    .await;
    let client = client();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 200);
    let rec = backend.requests().pop().unwrap();
    assert_eq!(rec.headers["authorization"], "Bearer entra-token-1");
    assert!(
        rec.headers.get("api-key").is_none(),
        "no key goes to a keyless backend"
    );
    let seen = id.seen().remove(0);
    assert!(seen.uri.starts_with("/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fcognitiveservices.azure.com&client_id=11111111-2222"), "{}", seen.uri);
    assert_eq!(
        seen.identity_header.as_deref(),
        Some("platform-header-secret")
    );
    // Ready, and the admin view shows state and expiry, never the token or the header secret.
    let (status, _) = get(&client, format!("{}/readyz", gw.admin)).await;
    assert_eq!(status, 200);
    let (_, metrics) = get(&client, format!("{}/metrics", gw.admin)).await;
    assert!(metrics.contains("switchyard_credential_state{backend=\"east\",kind=\"managed_identity\",state=\"ready\"} 1"), "{metrics}");
    assert!(
        metrics.contains("switchyard_credential_expiry_seconds{backend=\"east\"} 35"),
        "{metrics}"
    );
    assert!(!metrics.contains("entra-token") && !metrics.contains("platform-header-secret"));
    assert!(metrics.ends_with("# EOF\n"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_managed_identity_system_assigned() {
    let id = Identity::start().await;
    let backend = keyless_backend("vm", &id).await;
    let auth = format!(
        r#"{{ type = "managed_identity", endpoint = "{}/metadata/identity/oauth2/token", scope = "https://ai.azure.com/.default" }}"#,
        id.url
    );
    let gw = gateway_env(&[entra(&backend, &auth)], "", "", "", &[]).await;
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);
    let seen = id.seen().remove(0);
    assert_eq!(
        seen.uri,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fai.azure.com"
    );
    assert_eq!(seen.metadata.as_deref(), Some("true"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_flow_and_secrets_never_leak() {
    let id = Identity::start().await;
    let backend = keyless_backend("east", &id).await;
    let auth = format!(
        r#"{{ type = "client_secret", tenant_id = "tenant-1", client_id = "app-1", client_secret = "${{APP_SECRET}}", authority_host = "{}" }}"#,
        id.url
    );
    let gw = gateway_env(
        &[entra(&backend, &auth)],
        "",
        "",
        "",
        &[("APP_SECRET", "very-secret-value")],
    )
    .await;
    let client = client();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    let seen = id.seen().remove(0);
    assert_eq!(seen.uri, "/tenant-1/oauth2/v2.0/token");
    assert!(seen.form.contains("client_secret=very-secret-value"));
    assert!(seen.form.contains("grant_type=client_credentials"));
    assert!(
        seen.form
            .contains("scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default")
    );
    let (_, metrics) = get(&client, format!("{}/metrics", gw.admin)).await;
    assert!(!metrics.contains("very-secret-value") && !metrics.contains("entra-token"));
    gw.stop().await;

    // A wrong secret: Entra says no. Not ready, with Entra's text; requests get a clear 503.
    id.set(Mode::Reject);
    let gw = gateway_env(
        &[entra(&backend, &auth)],
        "",
        "",
        "",
        &[("APP_SECRET", "wrong")],
    )
    .await;
    let admin = gw.admin.clone();
    eventually("the credential to be rejected", async || {
        get(&client, format!("{admin}/readyz"))
            .await
            .1
            .contains("rejected")
    })
    .await;
    let (status, body) = get(&client, format!("{admin}/readyz")).await;
    assert_eq!(status, 503);
    assert!(body.contains("AADSTS7000215"), "{body}");
    assert!(!body.contains("wrong"), "the secret is not echoed: {body}");
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "backend_credential_unavailable");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("east") && msg.contains("client_secret"),
        "{msg}"
    );
    let (_, metrics) = get(&client, format!("{admin}/metrics")).await;
    assert!(metrics.contains("state=\"rejected\"} 1"), "{metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_rereads_the_rotated_token_file() {
    let id = Identity::start().await;
    id.lifetime_secs.store(2, Ordering::SeqCst);
    let backend = keyless_backend("aks", &id).await;
    let dir = std::env::temp_dir().join(format!("switchyard-wi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "assertion-one\n").unwrap();
    let env = [
        ("AZURE_CLIENT_ID", "wi-client"),
        ("AZURE_TENANT_ID", "wi-tenant"),
        ("AZURE_FEDERATED_TOKEN_FILE", file.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", id.url.as_str()),
    ];
    let gw = gateway_env(
        &[entra(&backend, r#"{ type = "workload_identity" }"#)],
        "",
        "",
        "",
        &env,
    )
    .await;
    let client = client();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    let first = id.seen().remove(0);
    assert_eq!(first.uri, "/wi-tenant/oauth2/v2.0/token");
    assert!(
        first.form.contains("client_assertion=assertion-one"),
        "{}",
        first.form
    );
    assert!(first.form.contains("client_id=wi-client"));
    assert!(first.form.contains("client-assertion-type%3Ajwt-bearer"));
    // The kubelet rotates the file; the next refresh (at half the 2 s lifetime) reads it anew.
    std::fs::write(&file, "assertion-two\n").unwrap();
    eventually("a refresh with the rotated assertion", async || {
        id.seen()
            .iter()
            .any(|s| s.form.contains("client_assertion=assertion-two"))
    })
    .await;
    // Requests keep working across refreshes, with the newest token.
    let newest = id.issued.load(Ordering::SeqCst);
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    let used = backend.requests().pop().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    let n: u64 = used
        .trim_start_matches("Bearer entra-token-")
        .parse()
        .unwrap();
    assert!(n >= newest.max(2) - 1, "used token {n}, newest {newest}");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outage_keeps_the_old_token_then_fails_over_then_recovers() {
    let id = Identity::start().await;
    id.lifetime_secs.store(4, Ordering::SeqCst);
    let keyless = keyless_backend("keyless", &id).await;
    let keyed = start_sim(sim("keyed")).await;
    let auth = format!(
        r#"{{ type = "managed_identity", endpoint = "{}/token" }}"#,
        id.url
    );
    let gw = gateway_env(&[entra(&keyless, &auth), B::sim(&keyed)], "", "", "", &[]).await;
    let client = client();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    assert_eq!(keyless.stats().ok, 1);

    // The identity endpoint goes down: the refresh at 2 s fails, the token still serves.
    id.set(Mode::Down);
    let admin = gw.admin.clone();
    eventually("a failed refresh", async || {
        get(&client, format!("{admin}/metrics"))
            .await
            .1
            .contains("state=\"stale\"} 1")
    })
    .await;
    let before = keyless.stats().ok;
    for _ in 0..4 {
        assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    }
    assert_eq!(
        keyless.stats().ok,
        before + 2,
        "still serving on the old token"
    );
    assert_eq!(get(&client, format!("{admin}/readyz")).await.0, 200);

    // Expired with no replacement: its requests fail over to the keyed backend, so the replica
    // stays ready, the keyless backend listed as degraded.
    eventually("the token to expire", async || {
        let (status, body) = get(&client, format!("{admin}/readyz")).await;
        assert_eq!(status, 200, "{body}");
        body.contains("backend keyless: managed_identity credential failing")
    })
    .await;
    let served = keyless.stats().ok;
    for _ in 0..6 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-backend"), "keyed");
    }
    assert_eq!(keyless.stats().ok, served);

    // The endpoint comes back: the background retries get a token and the backend rejoins.
    id.set(Mode::Ok);
    eventually("the backend to rejoin", async || {
        let r = post_chat(&client, &gw.base).await;
        header(&r, "x-switchyard-backend") == "keyless"
    })
    .await;
    let (status, body) = get(&client, format!("{admin}/readyz")).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_identity_is_down_answers_503_naming_it() {
    let id = Identity::start().await;
    id.set(Mode::Down);
    let keyless = keyless_backend("keyless", &id).await;
    let auth = format!(
        r#"{{ type = "managed_identity", endpoint = "{}/token" }}"#,
        id.url
    );
    let gw = gateway_env(&[entra(&keyless, &auth)], "", "", "", &[]).await;
    let client = client();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "backend_credential_unavailable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("managed_identity")
    );
    assert_eq!(keyless.stats().requests, 0, "nothing reached the backend");
    let (status, body) = get(&client, format!("{}/readyz", gw.admin)).await;
    assert_eq!(status, 503);
    assert!(body.contains("keyless") && body.contains("500"), "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_share_one_token_fetch() {
    let id = Identity::start().await;
    id.delay_ms.store(300, Ordering::SeqCst);
    let keyless = keyless_backend("keyless", &id).await;
    let auth = format!(
        r#"{{ type = "managed_identity", endpoint = "{}/token" }}"#,
        id.url
    );
    let gw = gateway_env(&[entra(&keyless, &auth)], "", "", "", &[]).await;
    let client = client();
    let statuses = futures_util::future::join_all(
        (0..20).map(|_| async { post_chat(&client, &gw.base).await.status() }),
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(id.fetches(), 1, "one fetch served all twenty");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_cli_for_local_development() {
    let id = Identity::start().await;
    id.accepted.lock().unwrap().insert("cli-token-xyz".into());
    let keyless = keyless_backend("dev", &id).await;
    let dir = std::env::temp_dir().join(format!("switchyard-az-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let az = dir.join("az");
    let on = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    std::fs::write(
        &az,
        format!(
            "#!/bin/sh\n[ \"$1 $2 $3 $4\" = \"account get-access-token --scope https://cognitiveservices.azure.com/.default\" ] || exit 3\necho '{{\"accessToken\":\"cli-token-xyz\",\"expiresOn\":\"2099-01-01 00:00:00.000000\",\"expires_on\":{on},\"tokenType\":\"Bearer\"}}'\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    let auth = format!(r#"{{ type = "azure_cli", command = "{}" }}"#, az.display());
    let gw = gateway_env(&[entra(&keyless, &auth)], "", "", "", &[]).await;
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);
    assert_eq!(
        keyless.requests().pop().unwrap().headers["authorization"],
        "Bearer cli-token-xyz"
    );
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_sharing_an_identity_share_its_token() {
    let id = Identity::start().await;
    let east = keyless_backend("east", &id).await;
    let west = keyless_backend("west", &id).await;
    let auth = format!(
        r#"{{ type = "managed_identity", endpoint = "{}/token" }}"#,
        id.url
    );
    let gw = gateway_env(&[entra(&east, &auth), entra(&west, &auth)], "", "", "", &[]).await;
    let client = client();
    for _ in 0..4 {
        assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    }
    assert_eq!(id.fetches(), 1, "one identity, one token");
    assert_eq!(east.stats().ok, 2);
    assert_eq!(west.stats().ok, 2);
    let (_, metrics) = get(&client, format!("{}/metrics", gw.admin)).await;
    assert!(metrics.contains("switchyard_credential_state{backend=\"west\",kind=\"managed_identity\",state=\"ready\"} 1"), "{metrics}");
    gw.stop().await;
}
