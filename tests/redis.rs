//! Scale-out: gateway replicas sharing limits and backend cooldowns through a real Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use switchyard::sim::Faults;

const KEY: &str = "team-a-key-0123456789";

fn tail(redis: &str, consumer: &str) -> String {
    format!(
        "\n[limits]\nstore = \"redis\"\nredis_url = \"{redis}\"\n\n[[consumers]]\nname = \"team-a\"\nkey = \"{KEY}\"\n{consumer}\n"
    )
}

async fn chat(client: &reqwest::Client, base: &str) -> (u16, u64) {
    let r = client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .header("api-key", KEY)
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default();
    (status, body["usage"]["total_tokens"].as_u64().unwrap_or(0))
}

/// Two replicas, one limit: what both serve together stays within 5 % of what the limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_one_global_token_limit() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let s = start_sim(sim("east")).await;
    let t = tail(&redis.url(), "tokens_per_minute = 1200");
    let gw1 = gateway_with(&[B::sim(&s)], "", "", &t).await;
    let gw2 = gateway_with(&[B::sim(&s)], "", "", &t).await;
    let client = client();
    let started = Instant::now();
    let run = Duration::from_secs(3);
    let results = futures_util::stream::iter(0..1_000_000)
        .take_while(|_| std::future::ready(started.elapsed() < run))
        .map(|i| {
            let base = if i % 2 == 0 {
                gw1.base.clone()
            } else {
                gw2.base.clone()
            };
            let client = client.clone();
            async move { chat(&client, &base).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let served: u64 = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, t)| t)
        .sum();
    let refused = results.iter().filter(|(s, _)| *s == 429).count();
    assert!(results.iter().all(|(s, _)| *s == 200 || *s == 429));
    // A full minute's budget at the start, then 20 tokens a second.
    let allowed = 1200.0 + 20.0 * elapsed;
    let ratio = served as f64 / allowed;
    eprintln!(
        "served {served} tokens of {allowed:.0} allowed in {elapsed:.1} s ({ratio:.3}); {refused} refused"
    );
    assert!(refused > 0, "the limit was reached");
    assert!(
        ratio <= 1.05,
        "served {served} of {allowed:.0} allowed ({ratio:.3}): the replicas did not share the limit"
    );
    assert!(
        ratio >= 0.85,
        "served {served} of {allowed:.0} allowed ({ratio:.3})"
    );
    gw1.stop().await;
    gw2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_learned_by_one_replica_is_honoured_by_the_other() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let throttled = start_sim(sim("throttled")).await;
    throttled
        .set_faults(Faults {
            error_rate: 1.0,
            error_status: 429,
            retry_after_ms: Some(20_000),
            ..Faults::default()
        })
        .await;
    let fine = start_sim(sim("fine")).await;
    let backends = [B::sim(&throttled), B::sim(&fine)];
    let t = format!(
        "\n[limits]\nstore = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    let gw1 = gateway_with(&backends, "", "", &t).await;
    let gw2 = gateway_with(&backends, "", "", &t).await;
    let client = client();
    assert_eq!(post_chat(&client, &gw1.base).await.status(), 200);
    assert_eq!(throttled.stats().requests, 1, "replica 1 met the 429");
    // Replica 2 hears of it through Redis.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&client, &gw2.admin, "switchyard_remote_cooldowns_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "replica 2 never learned the cooldown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..6 {
        let r = post_chat(&client, &gw2.base).await;
        assert_eq!(header(&r, "x-switchyard-backend"), "fine");
        assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    }
    assert_eq!(
        throttled.stats().requests,
        1,
        "replica 2 never tried the throttled backend"
    );
    gw1.stop().await;
    gw2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_loses_no_request_and_limits_resume_when_it_returns() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let port = redis.port;
    let s = start_sim(sim("east")).await;
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        &tail(&redis.url(), "requests_per_minute = 5"),
    )
    .await;
    let client = client();
    let statuses = |n| {
        let (client, base) = (client.clone(), gw.base.clone());
        async move {
            let mut v = Vec::new();
            for _ in 0..n {
                v.push(chat(&client, &base).await.0);
            }
            v
        }
    };
    assert_eq!(statuses(6).await, vec![200, 200, 200, 200, 200, 429]);

    drop(redis);
    // Fail open: served, uncounted; not a single request lost.
    assert!(statuses(8).await.iter().all(|s| *s == 200));
    let (status, body) = {
        let r = client
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(status, 200);
    assert!(body.contains("limits store (Redis) unreachable"), "{body}");
    assert_eq!(
        metric_value(&client, &gw.admin, "switchyard_limits_store_up").await,
        0.0
    );

    // Back (empty, as a restarted Redis would be): counting resumes by itself.
    let _redis = RedisServer::start(Some(port)).unwrap();
    let after = statuses(8).await;
    assert!(after.iter().all(|s| *s == 200 || *s == 429), "{after:?}");
    assert!(after.contains(&429), "limits resumed: {after:?}");
    assert_eq!(
        metric_value(&client, &gw.admin, "switchyard_limits_store_up").await,
        1.0
    );
    gw.stop().await;
}
