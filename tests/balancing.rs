//! Smart balancing end to end: strategies, priority spillover and recovery, exhaustion answers,
//! deployment routing, deadlines and idle timeouts, against in-process simulators.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use switchyard::sim::{Faults, SimConfig};

fn throttling(ms: u64) -> Faults {
    Faults {
        error_rate: 1.0,
        error_status: 429,
        retry_after_ms: Some(ms),
        ..Faults::default()
    }
}

async fn served_by(base: &str, n: usize) -> Vec<String> {
    let client = client();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = post_chat(&client, base).await;
        assert_eq!(r.status(), 200);
        out.push(header(&r, "x-switchyard-backend"));
    }
    out
}

fn count(v: &[String], name: &str) -> usize {
    v.iter().filter(|b| *b == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_splits_by_weight() {
    let (sims, _) = start_sims(&["a", "b", "c"]).await;
    let backends = vec![
        B::sim(&sims[0]).with("weight = 3"),
        B::sim(&sims[1]),
        B::sim(&sims[2]),
    ];
    let gw = gateway(&backends, "strategy = \"weighted\"", "").await;
    let seen = served_by(&gw.base, 50).await;
    assert_eq!(
        (count(&seen, "a"), count(&seen, "b"), count(&seen, "c")),
        (30, 10, 10)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_inflight_keeps_new_requests_off_a_busy_backend() {
    let slow = start_sim(SimConfig {
        ttft: Duration::from_secs(2),
        ..sim("slow")
    })
    .await;
    let (fast, _) = start_sims(&["f1", "f2"]).await;
    let backends = vec![B::sim(&slow), B::sim(&fast[0]), B::sim(&fast[1])];
    for (strategy, slow_share) in [("least_inflight", 1), ("round_robin", 3)] {
        let gw = gateway(&backends, &format!("strategy = \"{strategy}\""), "").await;
        let before = slow.requests().len();
        // The first request lands on the slow backend and stays in flight for 2 s.
        let client = client();
        let base = gw.base.clone();
        let pending = tokio::spawn(async move { post_chat(&client, &base).await.status() });
        while slow.requests().len() == before {
            tokio::task::yield_now().await;
        }
        let seen = served_by(&gw.base, 6).await;
        let on_slow = slow.requests().len() - before;
        assert_eq!(on_slow, slow_share, "{strategy}: {seen:?}");
        assert_eq!(pending.await.unwrap(), 200);
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_strategy_avoids_a_slow_backend() {
    let slow = start_sim(SimConfig {
        ttft: Duration::from_millis(150),
        ..sim("slow")
    })
    .await;
    let (fast, _) = start_sims(&["f1", "f2"]).await;
    let backends = vec![B::sim(&slow), B::sim(&fast[0]), B::sim(&fast[1])];
    let gw = gateway(&backends, "strategy = \"latency\"", "").await;
    let seen = served_by(&gw.base, 60).await;
    assert!(
        count(&seen, "slow") <= 3,
        "measured once, then avoided: {seen:?}"
    );
    assert!(
        count(&seen, "f1") > 15 && count(&seen, "f2") > 15,
        "{seen:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headroom_prefers_the_backend_with_more_quota_left() {
    let big = start_sim(SimConfig {
        tokens_per_minute: Some(200_000),
        ..sim("big")
    })
    .await;
    let small = start_sim(SimConfig {
        tokens_per_minute: Some(5_000),
        ..sim("small")
    })
    .await;
    let gw = gateway(
        &[B::sim(&big), B::sim(&small)],
        "strategy = \"headroom\"",
        "",
    )
    .await;
    let seen = served_by(&gw.base, 60).await;
    let (b, s) = (count(&seen, "big"), count(&seen, "small"));
    assert!(b > 4 * s, "big {b}, small {s}");
    assert_eq!(
        small.stats().throttled,
        0,
        "steered away before the small one throttled"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_spills_over_when_the_first_group_throttles_and_comes_back() {
    let ptu = start_sim(sim("ptu")).await;
    let (paygo, _) = start_sims(&["paygo1", "paygo2"]).await;
    let backends = vec![
        B::sim(&ptu).with("priority = 1"),
        B::sim(&paygo[0]).with("priority = 2"),
        B::sim(&paygo[1]).with("priority = 2"),
    ];
    let gw = gateway(&backends, "", "").await;
    assert_eq!(count(&served_by(&gw.base, 10).await, "ptu"), 10);

    ptu.set_faults(throttling(300)).await;
    let throttled_at = Instant::now();
    let seen = served_by(&gw.base, 10).await;
    assert_eq!(count(&seen, "ptu"), 0, "{seen:?}");
    assert_eq!(count(&seen, "paygo1"), 5);
    assert_eq!(
        ptu.stats().faulted,
        1,
        "one 429, then the cooldown keeps traffic away"
    );

    ptu.set_faults(Faults::default()).await;
    // Back on the PTU once its cooldown ends, not before; bounded by a deadline, not a sleep.
    let client = client();
    let back = loop {
        let r = post_chat(&client, &gw.base).await;
        if header(&r, "x-switchyard-backend") == "ptu" {
            break throttled_at.elapsed();
        }
        assert!(
            throttled_at.elapsed() < Duration::from_secs(5),
            "never came back"
        );
        tokio::task::yield_now().await;
    };
    assert!(
        back >= Duration::from_millis(300),
        "came back after {back:?}"
    );
    assert_eq!(count(&served_by(&gw.base, 5).await, "ptu"), 5);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_are_throttled_the_client_gets_429_with_the_soonest_retry_after() {
    let (sims, backends) = start_sims(&["a", "b"]).await;
    sims[0].set_faults(throttling(5_000)).await;
    sims[1].set_faults(throttling(2_500)).await;
    let gw = gateway(&backends, "", "").await;
    let client = client();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        header(&r, "x-switchyard-attempts"),
        "2",
        "each backend tried once"
    );
    let ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!((2_000..=2_500).contains(&ms), "{ms}");
    assert_eq!(header(&r, "retry-after"), "3");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4o"));

    // Now the gateway answers at once, without asking either backend.
    let asked = sims[0].requests().len() + sims[1].requests().len();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-switchyard-attempts"), "");
    assert_eq!(sims[0].requests().len() + sims[1].requests().len(), asked);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_are_down_the_client_gets_503() {
    let gw = gateway(
        &[B::dead("d1"), B::dead("d2")],
        "[routing.circuit_breaker]\nfailures = 1\ntrip_duration = \"30s\"",
        "",
    )
    .await;
    let client = client();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(
        r.status(),
        502,
        "the last connect error, while circuits were closed"
    );
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 503);
    let secs: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((29..=30).contains(&secs), "{secs}");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "no_backend_available");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_route_and_rename_per_backend() {
    let (sims, backends) = start_sims(&["eastus", "westus", "swe"]).await;
    let tail = r#"
[[deployments]]
name = "gpt-4o"
backends = { eastus = "gpt-4o", westus = "gpt-4o-2024-08-06" }

[[deployments]]
name = "embed"
backends = { swe = "text-embedding-3-large" }
"#;
    let gw = gateway_with(&backends, "", "", tail).await;
    let client = client();
    for _ in 0..4 {
        assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    }
    let paths = |i: usize| -> Vec<String> {
        sims[i]
            .requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect()
    };
    assert_eq!(paths(0).len(), 2);
    assert!(
        paths(0)
            .iter()
            .all(|p| p.starts_with("/openai/deployments/gpt-4o/"))
    );
    assert_eq!(paths(1).len(), 2);
    assert!(
        paths(1)
            .iter()
            .all(|p| p.starts_with("/openai/deployments/gpt-4o-2024-08-06/chat"))
    );
    assert!(paths(1)[0].ends_with("?api-version=2024-10-21"));
    assert!(paths(2).is_empty(), "swe does not serve gpt-4o");

    // v1: the deployment is the body's model; renamed in the body where the backend's differs.
    let body = r#"{"model":"embed","input":"hello"}"#;
    let r = client
        .post(gw.url("/openai/v1/embeddings"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = sims[2].requests().pop().unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&rec.body).unwrap();
    assert_eq!(sent["model"], "text-embedding-3-large");
    assert_eq!(sent["input"], "hello");
    let v1_chat = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..2 {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(v1_chat)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let east = sims[0].requests().pop().unwrap();
    assert_eq!(
        east.body.as_ref(),
        v1_chat.as_bytes(),
        "byte-exact where names agree"
    );
    let west = sims[1].requests().pop().unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&west.body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-2024-08-06");

    // A deployment no entry names goes everywhere under its own name...
    let r = client
        .post(gw.url("/openai/deployments/other/chat/completions?api-version=2024-10-21"))
        .header("content-type", "application/json")
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.stop().await;

    // ... unless unknown deployments are rejected.
    let gw = gateway_with(&backends, "unknown_deployments = \"reject\"", "", tail).await;
    let r = client
        .post(gw.url("/openai/deployments/other/chat/completions?api-version=2024-10-21"))
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "DeploymentNotFound");
    assert!(v["error"]["message"].as_str().unwrap().contains("'other'"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_tracked_per_deployment() {
    let (sims, backends) = start_sims(&["a", "b"]).await;
    let gw = gateway(&backends, "", "").await;
    let client = client();
    sims[0].set_faults(throttling(30_000)).await;
    // gpt-4o on `a` is throttled now; `a` still serves another deployment.
    for _ in 0..4 {
        assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    }
    sims[0].set_faults(Faults::default()).await;
    let mut on_a = 0;
    for _ in 0..4 {
        let r = client
            .post(gw.url("/openai/deployments/other/chat/completions?api-version=2024-10-21"))
            .body(chat_body(false))
            .send()
            .await
            .unwrap();
        on_a += (header(&r, "x-switchyard-backend") == "a") as usize;
    }
    assert_eq!(on_a, 2);
    for _ in 0..4 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(
            header(&r, "x-switchyard-backend"),
            "b",
            "gpt-4o on a is still cooling"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_all_attempts() {
    let stall = Faults {
        stall_rate: 1.0,
        ..Faults::default()
    };
    let (sims, backends) = start_sims(&["a", "b", "c"]).await;
    for s in &sims {
        s.set_faults(stall.clone()).await;
    }
    let gw = gateway(
        &backends,
        "request_timeout = \"300ms\"\nfirst_byte_timeout = \"10s\"",
        "",
    )
    .await;
    let started = Instant::now();
    let r = post_chat(&client(), &gw.base).await;
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_ends_with_an_error_event_after_the_idle_timeout() {
    let (url, mut senders, server) = manual_stream_backend().await;
    let gw = gateway(&[B::url("stall", url)], "idle_timeout = \"200ms\"", "").await;
    let r = send_chat(&client(), &gw.base, true).await;
    assert_eq!(r.status(), 200);
    let backend = senders.recv().await.unwrap();
    backend
        .send(Ok(bytes::Bytes::from_static(b"data: {\"n\":1}\n\n")))
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(first.as_ref(), b"data: {\"n\":1}\n\n");
    // The backend goes quiet, holding the stream open.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut rest = Vec::new();
        while let Some(chunk) = body.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        rest
    })
    .await
    .expect("the gateway ended the stalled stream");
    let text = String::from_utf8(rest).unwrap();
    assert!(text.starts_with("data: {\"error\":"), "{text}");
    assert!(text.contains("idle_timeout"), "{text}");
    drop(backend);
    gw.stop().await;
    server.abort();
}

/// Each form of retry hint a backend may send, end to end: the exhaustion answer's wait is the
/// soonest any backend asked for, garbage is ignored, and huge values are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_hints_in_every_form_set_the_cooldowns() {
    let in_7s = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(7));
    type Headers = Vec<(&'static str, String)>;
    // (what the backend sends, least and most retry-after-ms the client may then see)
    let cases: Vec<(Headers, u64, u64)> = vec![
        (vec![("retry-after", in_7s)], 5_500, 7_000),
        (
            vec![
                ("retry-after-ms", "2500".into()),
                ("retry-after", "9".into()),
            ],
            2_000,
            2_500,
        ),
        (vec![("retry-after", "4".into())], 3_500, 4_000),
        (
            vec![("x-ratelimit-reset-tokens", "3s".into())],
            2_500,
            3_000,
        ),
        (vec![("retry-after", "soon".into())], 9_500, 10_000),
        // No hint at all: the default cooldown.
        (vec![], 9_500, 10_000),
        (vec![("retry-after", "86400".into())], 59_000, 60_000),
    ];
    for (headers, lo, hi) in cases {
        let shown = format!("{headers:?}");
        let (url, server) = scripted_backend(429, headers).await;
        let gw = gateway(&[B::url("only", url)], "", "").await;
        let client = client();
        // The backend's 429 puts it in cooldown; with nothing else to try, the gateway answers.
        let first = post_chat(&client, &gw.base).await;
        assert_eq!(first.status(), 429, "{shown}");
        assert_eq!(header(&first, "x-switchyard-attempts"), "1");
        // Then at once, without asking the backend again.
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "x-switchyard-attempts"), "", "no attempt made");
        for resp in [&first, &r] {
            let ms: u64 = header(resp, "retry-after-ms").parse().unwrap();
            assert!((lo..=hi).contains(&ms), "{shown}: {ms} ms");
            let secs: u64 = header(resp, "retry-after").parse().unwrap();
            assert_eq!(secs, ms.div_ceil(1000), "{shown}");
        }
        gw.stop().await;
        server.abort();
    }
}

/// The state `/admin/backends` gives a backend for a deployment, and its error.
async fn pair_state(
    client: &reqwest::Client,
    admin: &str,
    backend: &str,
    deployment: &str,
) -> (String, String) {
    let v: serde_json::Value = client
        .get(format!("{admin}/admin/backends"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap();
    let d = b["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deployment"] == deployment)
        .cloned()
        .unwrap_or_default();
    (
        d["state"].as_str().unwrap_or("").to_string(),
        d["error"].as_str().unwrap_or("").to_string(),
    )
}

/// A backend whose key is wrong answers 401: the request moves on, the backend is marked
/// `auth_rejected` for the deployment and passed over; the client never sees the 401. When
/// every backend refuses the gateway's credential, the client gets a 502 naming the config
/// field to check, never a 401 that reads as its own key being wrong.
#[tokio::test]
async fn a_backend_with_a_wrong_key_is_passed_over_and_named() {
    let (sims, _) = start_sims(&["east", "west"]).await;
    let mut wrong = B::sim(&sims[0]);
    wrong.key = Some("not-the-key".into());
    let gw = gateway(&[wrong, B::sim(&sims[1])], "", "").await;
    let client = client();
    for _ in 0..20 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-backend"), "west");
    }
    assert!(
        sims[0].requests().len() <= 1,
        "asked again: {}",
        sims[0].requests().len()
    );
    let (state, error) = pair_state(&client, &gw.admin, "east", "gpt-4o").await;
    assert_eq!(state, "auth_rejected");
    assert!(!error.is_empty());
    let m = metrics_text(&client, &gw.admin).await;
    assert!(
        m.contains("switchyard_attempts_total{backend=\"east\",outcome=\"auth_rejected\"} 1"),
        "{m}"
    );
    gw.stop().await;

    let mut both: Vec<B> = sims.iter().map(B::sim).collect();
    for b in &mut both {
        b.key = Some("not-the-key".into());
    }
    let gw = gateway(&both, "", "").await;
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "backend_auth_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(".auth"), "{msg}");
    // Passed over, not forgotten: the next request asks them again and says the same.
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 502);
    gw.stop().await;
}

/// A deployment one of two backends does not have: its 404 `DeploymentNotFound` moves the
/// request on and is remembered (`not_deployed`); with no backend having it, the client gets
/// the 404.
#[tokio::test]
async fn a_deployment_missing_on_one_backend_is_served_by_the_other() {
    let s = start_sim(sim("east")).await;
    let missing = r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#;
    let (url, _b) = scripted_backend_with(404, vec![], missing).await;
    let gw = gateway(&[B::sim(&s), B::url("west", url.clone())], "", "").await;
    let client = client();
    for _ in 0..10 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-backend"), "east");
    }
    let (state, error) = pair_state(&client, &gw.admin, "west", "gpt-4o").await;
    assert_eq!(state, "not_deployed");
    assert!(error.contains("does not exist"), "{error}");
    gw.stop().await;

    let gw = gateway(&[B::url("west", url)], "", "").await;
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "DeploymentNotFound");
    gw.stop().await;
}
