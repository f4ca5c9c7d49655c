//! Callers with Entra ID tokens: tokens signed in the test, checked against a JWKS endpoint on
//! loopback that the test controls (to rotate keys).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};

const ISSUER: &str = "https://login.microsoftonline.com/tenant-1/v2.0";
const AUDIENCE: &str = "api://switchyard";

fn key(n: u8) -> RsaKeyPair {
    let der = std::fs::read(format!(
        "{}/tests/fixtures/jwt-test-key-{n}.pk8",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    RsaKeyPair::from_pkcs8(&der).unwrap()
}

fn jwk(kid: &str, k: &RsaKeyPair) -> serde_json::Value {
    let c: RsaPublicKeyComponents<Vec<u8>> = k.public().into();
    serde_json::json!({"kty": "RSA", "use": "sig", "kid": kid, "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(kid: &str, k: &RsaKeyPair, claims: serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; k.public().modulus_len()];
    k.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn claims(azp: &str) -> serde_json::Value {
    serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "azp": azp, "exp": now() + 3600, "nbf": now() - 10, "iat": now() - 10})
}

/// A JWKS endpoint whose key set the test can change.
async fn jwks(keys: Arc<Mutex<serde_json::Value>>) -> String {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!(
        "http://{}/discovery/v2.0/keys",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keys = keys.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = keys.lock().unwrap().to_string();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
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
    url
}

async fn call(client: &reqwest::Client, base: &str, token: &str) -> (u16, String) {
    let r = client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_tokens_identify_consumers_and_keys_rotate() {
    let (k1, k2) = (key(1), key(2));
    let set = Arc::new(Mutex::new(serde_json::json!({"keys": [jwk("k1", &k1)]})));
    let jwks_url = jwks(set.clone()).await;
    let s = start_sim(sim("east")).await;
    let tail = format!(
        "\n[jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_url = \"{jwks_url}\"\n\n\
         [[consumers]]\nname = \"team-a\"\njwt = \"app-a\"\n\n[[consumers]]\nname = \"team-b\"\nkey = \"team-b-key-0123456789\"\n"
    );
    let gw = gateway_with(&[B::sim(&s)], "", "", &tail).await;
    let client = client();

    let good = sign("k1", &k1, claims("app-a"));
    assert_eq!(call(&client, &gw.base, &good).await.0, 200);
    let seen = s.requests().pop().unwrap();
    assert_eq!(seen.headers["api-key"], "key-east");
    assert!(
        seen.headers.get("authorization").is_none(),
        "the caller's token never reaches a backend"
    );
    // Keys still work beside tokens.
    assert_eq!(
        call(&client, &gw.base, "team-b-key-0123456789").await.0,
        200
    );

    let mut expired = claims("app-a");
    expired["exp"] = serde_json::json!(now() - 3600);
    let mut other_aud = claims("app-a");
    other_aud["aud"] = serde_json::json!("api://someone-else");
    let mut other_iss = claims("app-a");
    other_iss["iss"] = serde_json::json!("https://evil.example/v2.0");
    let tampered = {
        let t = sign("k1", &k1, claims("app-a"));
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(claims("app-admin").to_string());
        parts.join(".")
    };
    for (token, why) in [
        (sign("k1", &k1, expired), "expired"),
        (sign("k1", &k1, other_aud), "audience"),
        (sign("k1", &k1, other_iss), "issuer"),
        (tampered, "signature"),
        (sign("k1", &k1, claims("app-unknown")), "names no consumer"),
        (sign("k2", &k2, claims("app-a")), "unknown key"),
    ] {
        let (status, body) = call(&client, &gw.base, &token).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(body.contains(why), "{why}: {body}");
        assert!(body.contains("invalid_api_key"));
    }

    // The issuer rotates to a new key: once it is published, tokens signed with it are
    // accepted (the gateway refetches the key set, at most every 2 s).
    *set.lock().unwrap() = serde_json::json!({"keys": [jwk("k1", &k1), jwk("k2", &k2)]});
    let rotated = sign("k2", &k2, claims("app-a"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = call(&client, &gw.base, &rotated).await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
}
