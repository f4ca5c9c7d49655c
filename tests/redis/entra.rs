//! Entra ID sign-in to Redis: tokens renewed under load, an identity that gives none, and a TLS
//! cluster signed in to as Azure Managed Redis is.

use super::*;

/// A fake managed-identity endpoint (the IMDS shape) whose tokens Redis accepts: each token it
/// issues is added to the ACL user's passwords before it is handed out, and the one issued two
/// renewals before is removed, as Azure's Redis stops taking an expired token.
struct Identity {
    url: String,
    issued: Arc<AtomicU64>,
    up: Arc<std::sync::atomic::AtomicBool>,
    _server: tokio::task::JoinHandle<()>,
}

const OID: &str = "0b8e3c1a-7f6d-4e2b-9c5a-1d2e3f4a5b6c";

/// Runs an ACL command on every node of the store.
type Acl = Arc<dyn Fn(&[&str]) + Send + Sync>;

fn acl_on(redis: &Arc<RedisServer>) -> Acl {
    let redis = redis.clone();
    Arc::new(move |args: &[&str]| {
        redis.cmd(args);
    })
}

fn token(n: u64) -> String {
    use base64::Engine;
    let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.signature-{n}",
        enc(r#"{"alg":"RS256","typ":"JWT"}"#),
        enc(&format!(
            r#"{{"aud":"https://redis.azure.com","oid":"{OID}","n":{n}}}"#
        ))
    )
}

impl Identity {
    /// `acl` runs an ACL command on every Redis node.
    async fn start(acl: Acl, lifetime_secs: u64) -> Identity {
        let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
        let url = format!(
            "http://{}/metadata/identity/oauth2/token",
            listener.local_addr().unwrap()
        );
        let issued = Arc::new(AtomicU64::new(0));
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (n, up2) = (issued.clone(), up.clone());
        let server = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (n, up, acl) = (n.clone(), up2.clone(), acl.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let (n, up, acl) = (n.clone(), up.clone(), acl.clone());
                        async move {
                            let (status, body) = if up.load(Ordering::SeqCst) {
                                let k = n.fetch_add(1, Ordering::SeqCst) + 1;
                                let t = token(k);
                                acl(&["ACL", "SETUSER", OID, &format!(">{t}")]);
                                if k > 2 {
                                    acl(&["ACL", "SETUSER", OID, &format!("<{}", token(k - 2))]);
                                }
                                (
                                    200,
                                    format!(
                                        r#"{{"access_token":"{t}","expires_in":"{lifetime_secs}","resource":"https://redis.azure.com","token_type":"Bearer"}}"#
                                    ),
                                )
                            } else {
                                (500, r#"{"error":"temporarily_unavailable"}"#.to_string())
                            };
                            let mut r = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(body),
                            ));
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        Identity {
            url,
            issued,
            up,
            _server: server,
        }
    }
}

/// A Redis whose default user has a password of the test's, and an ACL user named for the
/// identity's object id that has no password until the identity issues one.
fn entra_redis() -> Option<Arc<RedisServer>> {
    let redis = RedisServer::spawn(
        None,
        &["--requirepass".to_string(), "admin-pass".to_string()],
        Some("admin-pass"),
    )?;
    redis.cmd(&["ACL", "SETUSER", OID, "on", "~sy:*", "+@all"]);
    Some(Arc::new(redis))
}

/// Entra ID sign-in under steady load: tokens live 3 s and renew every 1.5 s, each renewal signs
/// every open connection in again, and the token from two renewals before is taken out of the
/// ACL. Limits fail closed, so a single Redis call that failed would be a refused request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_sign_in_rotates_tokens_under_load_without_a_failed_request() {
    let Some(redis) = entra_redis() else {
        return;
    };
    let identity = Identity::start(acl_on(&redis), 3).await;
    let s = start_sim(sim("east")).await;
    let limits = format!(
        "fail_closed = true\nredis_auth = {{ type = \"managed_identity\", endpoint = \"{}\" }}",
        identity.url
    );
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        &tail_with(&redis.url(), &limits, "requests_per_minute = 1000000"),
    )
    .await;
    let client = client();
    let auths_before = redis.calls("auth");
    let started = Instant::now();
    let results = futures_util::stream::iter(0..1_000_000)
        .take_while(|_| std::future::ready(started.elapsed() < Duration::from_secs(7)))
        .map(|_| {
            let (client, base) = (client.clone(), gw.base.clone());
            async move { chat(&client, &base).await.0 }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    let failed = results.iter().filter(|s| **s != 200).count();
    let issued = identity.issued.load(Ordering::SeqCst);
    eprintln!(
        "{} requests, {failed} failed, {issued} tokens issued",
        results.len()
    );
    assert!(results.len() > 100, "steady load: {}", results.len());
    assert_eq!(failed, 0, "no request failed across {issued} tokens");
    assert!(issued >= 4, "tokens were renewed: {issued}");
    // Every renewal signed the connection in again (and the first sign-in came with the first).
    let auths = redis.calls("auth") - auths_before;
    assert!(auths >= issued - 1, "{auths} sign-ins for {issued} tokens");
    assert_eq!(
        metric_value(&client, &gw.admin, "switchyard_limits_store_errors_total").await,
        0.0
    );
    let metrics = metrics_text(&client, &gw.admin).await;
    assert!(
        metrics.contains(
            "switchyard_limits_store_credential_state{kind=\"managed_identity\",state=\"ready\"} 1"
        ),
        "{metrics}"
    );
    // Signed in as the token's object id, with the latest token.
    let clients = redis.text(&["CLIENT", "LIST"]);
    assert!(
        clients.lines().any(|l| l.contains(&format!("user={OID}"))),
        "{clients}"
    );
    assert!(!metrics.contains("signature-"), "no token in the metrics");
    gw.stop().await;
}

/// No token: `/readyz` and the metrics say so, and limited requests are refused (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_gives_no_token_shows_in_readiness_and_metrics() {
    let Some(redis) = entra_redis() else {
        return;
    };
    let identity = Identity::start(acl_on(&redis), 3600).await;
    identity.up.store(false, Ordering::SeqCst);
    let s = start_sim(sim("east")).await;
    let limits = format!(
        "fail_closed = true\nredis_auth = {{ type = \"managed_identity\", endpoint = \"{}\" }}\nredis_user = \"{OID}\"",
        identity.url
    );
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        &tail_with(&redis.url(), &limits, "requests_per_minute = 100"),
    )
    .await;
    let client = client();
    let ready = || readyz_text(&client, &gw.admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = ready().await;
        if r.contains("limits store (Redis): managed_identity credential failing") {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat(&client, &gw.base).await.0, 503);
    let metrics = metrics_text(&client, &gw.admin).await;
    assert!(
        metrics.contains(
            "switchyard_limits_store_credential_state{kind=\"managed_identity\",state=\"failing\"} 1"
        ),
        "{metrics}"
    );
    // The identity comes back: the gateway signs in and counts again, by itself.
    identity.up.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if chat(&client, &gw.base).await.0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never signed in: {}",
            ready().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
}

/// What Azure Managed Redis is: TLS, a three-node cluster, Entra ID sign-in (each node's default
/// user has a password the gateway does not know). Two replicas share one limit on it while
/// the identity renews its tokens every 1.5 s and every node takes the old ones out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_limit_on_a_tls_cluster_signed_in_with_entra_id() {
    let ours = pki("redis");
    let Some(cluster) = RedisCluster::start_with(
        [free_port(), free_port(), free_port()],
        ClusterOptions {
            tls: Some(&ours),
            password: Some("admin-pass"),
        },
    ) else {
        return;
    };
    let cluster = Arc::new(cluster);
    for n in &cluster.nodes {
        n.cmd(&["ACL", "SETUSER", OID, "on", "~sy:*", "+@all"]);
    }
    let nodes = cluster.clone();
    let acl: Acl = Arc::new(move |args: &[&str]| {
        for n in &nodes.nodes {
            n.cmd(args);
        }
    });
    let identity = Identity::start(acl, 3).await;
    let files = TempDir::new();
    let ca = files.write("ca.crt", &ours.ca_pem);
    let limits = format!(
        "redis_cluster = true\nredis_auth = {{ type = \"managed_identity\", endpoint = \"{}\" }}",
        identity.url
    );
    two_replicas_share_one_limit(&cluster.tls_url(), &limits, &format!("ca_file = \"{ca}\"")).await;
    let issued = identity.issued.load(Ordering::SeqCst);
    assert!(issued >= 2, "tokens were renewed during the run: {issued}");
    let keys = cluster.keys_per_node();
    assert_eq!(
        keys.iter()
            .filter(|k| k.iter().any(|k| k.contains("{team-a}")))
            .count(),
        1,
        "{keys:?}"
    );
}
