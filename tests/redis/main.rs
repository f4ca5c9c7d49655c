//! Scale-out: gateway replicas sharing limits and backend cooldowns through a real Redis.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

#[path = "../common/mod.rs"]
mod common;
mod entra;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use switchyard::sim::{Faults, Simulator};

const KEY: &str = "team-a-key-0123456789";

fn tail(redis: &str, consumer: &str) -> String {
    tail_with(redis, "", consumer)
}

/// A `[limits]` table on `redis` with `limits` lines added, and the consumer `team-a`.
fn tail_with(redis: &str, limits: &str, consumer: &str) -> String {
    format!(
        "\n[limits]\nstore = \"redis\"\nredis_url = \"{redis}\"\n{limits}\n\n[[consumers]]\nname = \"team-a\"\nkey = \"{KEY}\"\n{consumer}\n"
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

/// Two replicas sharing the Redis at `redis`, serving `gpt-4o` at a price from `s`, with
/// `team-a` given `consumer` (a budget).
async fn priced_replicas(redis: &str, s: &Simulator, consumer: &str) -> (Running, Running) {
    let t = format!(
        "{}\n[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ east = \"gpt-4o\" }}\nprice = {{ input = 2.50, output = 10.00 }}\n",
        tail_with(redis, "", consumer)
    );
    (
        gateway_with(&[B::sim(s)], "", "", &t).await,
        gateway_with(&[B::sim(s)], "", "", &t).await,
    )
}

/// A chat completion as `team-a`: its status, its body, and what it cost at `priced_replicas`'
/// price (nothing without usage).
async fn priced_chat(client: &reqwest::Client, base: &str) -> (u16, serde_json::Value, f64) {
    let r = client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .header("api-key", KEY)
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let left = r
        .headers()
        .get("x-ratelimit-remaining-budget")
        .map(|v| v.to_str().unwrap().to_string());
    let mut v = r.json_value().await;
    let u = &v["usage"];
    let cost = (u["prompt_tokens"].as_f64().unwrap_or(0.0) * 2.5
        + u["completion_tokens"].as_f64().unwrap_or(0.0) * 10.0)
        / 1e6;
    v["remaining_budget"] = left.into();
    (status, v, cost)
}

/// The statuses of `n` chat completions, one after the other.
async fn statuses(client: &reqwest::Client, base: &str, n: usize) -> Vec<u16> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(chat(client, base).await.0);
    }
    v
}

/// Two replicas on the Redis at `url` (with `limits` lines and `server` lines), one limit:
/// what both serve together stays within 5 % of what the limit allows.
async fn two_replicas_share_one_limit(url: &str, limits: &str, server: &str) {
    let s = start_sim(sim("east")).await;
    let t = tail_with(url, limits, "tokens_per_minute = 1200");
    let gw1 = gateway_with(&[B::sim(&s)], "", server, &t).await;
    let gw2 = gateway_with(&[B::sim(&s)], "", server, &t).await;
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
    for gw in [&gw1, &gw2] {
        assert_eq!(
            metric_value(&client, &gw.admin, "switchyard_limits_store_errors_total").await,
            0.0,
            "every Redis call answered"
        );
    }
    gw1.stop().await;
    gw2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_one_global_token_limit() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    two_replicas_share_one_limit(&redis.url(), "", "").await;
}

/// TLS with a CA made for the test, trusted through `server.ca_file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_limit_over_tls() {
    let ours = pki("redis");
    let Some((redis, files)) = RedisServer::tls(&ours) else {
        return;
    };
    let ca = files.write("trusted.crt", &ours.ca_pem);
    let url = format!("rediss://localhost:{}", redis.tls_port.unwrap());
    two_replicas_share_one_limit(&url, "", &format!("ca_file = \"{ca}\"")).await;
}

/// A three-node Redis Cluster: each consumer's keys sit on one slot, so its script runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_limit_on_a_three_node_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    two_replicas_share_one_limit(&cluster.url(), "redis_cluster = true", "").await;
    let keys = cluster.keys_per_node();
    let holding: Vec<usize> = (0..keys.len())
        .filter(|i| keys[*i].iter().any(|k| k.contains("{team-a}")))
        .collect();
    assert_eq!(
        holding.len(),
        1,
        "one node holds the consumer's keys: {keys:?}"
    );
    assert!(
        keys[holding[0]]
            .iter()
            .filter(|k| !k.starts_with("sy:v2:usage:"))
            .all(|k| k.starts_with("sy:v2:{team-a}:")),
        "{keys:?}"
    );
    // The usage figures the replicas wrote as they stopped: an hour's, a day's and a month's
    // hash, on the one node of the month's slot.
    let usage: Vec<Vec<&String>> = keys
        .iter()
        .map(|node| {
            node.iter()
                .filter(|k| k.starts_with("sy:v2:usage:{m"))
                .collect()
        })
        .collect();
    assert_eq!(
        usage
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| n.len())
            .collect::<Vec<_>>(),
        [3],
        "{keys:?}"
    );
}

/// A certificate the gateway cannot verify is refused: nothing is counted there, limited
/// requests are refused (fail closed), and `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_from_another_ca_is_refused() {
    let ours = pki("redis");
    let other = pki("other");
    let Some((redis, files)) = RedisServer::tls(&ours) else {
        return;
    };
    let wrong = files.write("other.crt", &other.ca_pem);
    let s = start_sim(sim("east")).await;
    let url = format!("rediss://localhost:{}", redis.tls_port.unwrap());
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        &format!("ca_file = \"{wrong}\""),
        &tail_with(&url, "fail_closed = true", "requests_per_minute = 100"),
    )
    .await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(chat(&client, &gw.base).await.0, 503);
    }
    assert_eq!(s.stats().requests, 0);
    let ready = readyz_text(&client, &gw.admin).await;
    assert!(
        ready.contains("limits store (Redis) unreachable"),
        "{ready}"
    );
    let keys = redis.cmd(&["DBSIZE"]);
    assert_eq!(keys, redis::Value::Int(0), "nothing was written");
    gw.stop().await;
}

/// An ACL user signs in with its password from the URL, on a Redis whose default user has a
/// password of its own; a wrong password is refused and never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_signs_in_and_a_wrong_password_is_refused() {
    let Some(redis) = RedisServer::spawn(
        None,
        &["--requirepass".to_string(), "admin-pass".to_string()],
        Some("admin-pass"),
    ) else {
        return;
    };
    redis.cmd(&[
        "ACL",
        "SETUSER",
        "gateway",
        "on",
        ">gw-pass-1234",
        "~sy:*",
        "+@all",
    ]);
    let s = start_sim(sim("east")).await;
    let url = format!("redis://gateway:gw-pass-1234@127.0.0.1:{}/3", redis.port);
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        &tail_with(&url, "fail_closed = true", "requests_per_minute = 3"),
    )
    .await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(chat(&client, &gw.base).await.0);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    let clients = redis.text(&["CLIENT", "LIST"]);
    assert!(
        clients
            .lines()
            .any(|l| l.contains("user=gateway") && l.contains(" db=3 ")),
        "{clients}"
    );
    gw.stop().await;

    let wrong = format!("redis://gateway:not-the-pass@127.0.0.1:{}", redis.port);
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        &tail_with(&wrong, "fail_closed = true", "requests_per_minute = 3"),
    )
    .await;
    assert_eq!(chat(&client, &gw.base).await.0, 503);
    let ready = readyz_text(&client, &gw.admin).await;
    assert!(
        ready.contains("limits store (Redis) unreachable"),
        "{ready}"
    );
    let logs = metrics_text(&client, &gw.admin).await;
    assert!(!ready.contains("not-the-pass") && !logs.contains("not-the-pass"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_learned_by_one_replica_is_honoured_by_the_other() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    // Whatever else Redis holds, the cooldowns are one hash read in one call.
    redis.cmd(&[
        "EVAL",
        "for i = 1, 20000 do redis.call('SET', 'other:' .. i, i) end",
        "0",
    ]);
    cooldown_is_shared(&redis.url(), "").await;
    let redis::Value::Array(fields) = redis.cmd(&["HKEYS", "sy:v2:cooldowns"]) else {
        panic!("the cooldowns hash")
    };
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert!(
        matches!(&fields[0], redis::Value::BulkString(f) if f.ends_with(b":throttled")),
        "{fields:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_is_shared_through_a_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    cooldown_is_shared(&cluster.url(), "redis_cluster = true\n").await;
}

/// Replica 1 meets a 429 with a long `retry-after`; replica 2 learns it through Redis and never
/// tries that backend.
async fn cooldown_is_shared(url: &str, limits: &str) {
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
    let t = format!("\n[limits]\nstore = \"redis\"\nredis_url = \"{url}\"\n{limits}");
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

/// The whole cluster goes away and comes back (empty, on the same ports): requests are served
/// meanwhile (fail open), and counting resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_going_away_loses_no_request_and_limits_resume_when_it_returns() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let ports = cluster.ports();
    let s = start_sim(sim("east")).await;
    let gw = gateway_with(
        &[B::sim(&s)],
        "",
        "",
        &tail_with(
            &cluster.url(),
            "redis_cluster = true",
            "requests_per_minute = 5",
        ),
    )
    .await;
    let client = client();
    let statuses = |n| statuses(&client, &gw.base, n);
    assert_eq!(statuses(6).await, vec![200, 200, 200, 200, 200, 429]);
    drop(cluster);
    assert!(statuses(8).await.iter().all(|s| *s == 200));
    assert_eq!(
        metric_value(&client, &gw.admin, "switchyard_limits_store_up").await,
        0.0
    );
    let _cluster = RedisCluster::start_on(ports).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let after = statuses(6).await;
        assert!(after.iter().all(|s| *s == 200 || *s == 429), "{after:?}");
        if after.contains(&429) {
            break;
        }
        assert!(Instant::now() < deadline, "limits never resumed: {after:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        metric_value(&client, &gw.admin, "switchyard_limits_store_up").await,
        1.0
    );
    gw.stop().await;
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
    let statuses = |n| statuses(&client, &gw.base, n);
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

/// A budget in money spent across two replicas sharing Redis: each request holds its estimated
/// cost and is settled with what it cost; once the day's budget is spent, both refuse with 403
/// `consumer_budget_exceeded`, and no more was spent than the budget and one request's worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_spent_across_two_replicas() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let s = start_sim(sim("east")).await;
    let (gw1, gw2) = priced_replicas(
        &redis.url(),
        &s,
        "budget = { period = \"day\", amount = 0.001 }",
    )
    .await;
    let client = client();
    let (mut spent, mut one, mut refused) = (0.0f64, 0.0f64, 0);
    let mut lefts = Vec::new();
    for i in 0..40 {
        let base = if i % 2 == 0 { &gw1.base } else { &gw2.base };
        let (status, v, cost) = priced_chat(&client, base).await;
        if status == 403 {
            assert_eq!(v["error"]["code"], "consumer_budget_exceeded", "{v}");
            refused += 1;
            continue;
        }
        assert_eq!(status, 200, "{v}");
        assert_eq!(refused, 0, "once spent, the budget stays spent");
        lefts.push(
            v["remaining_budget"]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap(),
        );
        one = cost;
        spent += cost;
    }
    eprintln!(
        "spent {spent:.6} of 0.001 in {} requests; {refused} refused",
        lefts.len()
    );
    assert!(refused > 10, "the budget ran out: {refused} refused");
    assert!(
        spent <= 0.001 + one && spent >= 0.001 - 2.0 * one,
        "spent {spent} against a budget of 0.001 (one request {one})"
    );
    assert!(lefts.windows(2).all(|w| w[1] < w[0]), "{lefts:?}");
    let ratio = metric_value(
        &client,
        &gw1.admin,
        "switchyard_budget_used_ratio{consumer=\"team-a\"}",
    )
    .await;
    assert!(ratio > 0.8, "{ratio}");
    gw1.stop().await;
    gw2.stop().await;
}

/// Each replica writes its usage to Redis (every few seconds, and when it stops, after its last
/// requests): either replica's usage report and status page show both replicas' requests,
/// tokens and cost, and the consumer's budget as Redis counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_report_adds_up_both_replicas() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let s = start_sim(sim("east")).await;
    let (gw1, gw2) = priced_replicas(
        &redis.url(),
        &s,
        "budget = { period = \"month\", amount = 5.0 }",
    )
    .await;
    let client = client();
    let (mut prompt, mut completion, mut cost) = (0u64, 0u64, 0.0f64);
    for i in 0..8 {
        let base = if i < 5 { &gw1.base } else { &gw2.base };
        let (status, v, c) = priced_chat(&client, base).await;
        assert_eq!(status, 200, "{v}");
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += v["usage"]["completion_tokens"].as_u64().unwrap();
        cost += c;
    }
    gw2.stop().await;
    let report = client
        .get(format!(
            "{}/admin/usage?interval=total&group_by=consumer",
            gw1.admin
        ))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    let rows = report["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["consumer"], "team-a");
    assert_eq!(rows[0]["requests"], 8, "{report}");
    assert_eq!(rows[0]["prompt_tokens"], prompt);
    assert_eq!(rows[0]["completion_tokens"], completion);
    assert!(
        (rows[0]["cost"].as_f64().unwrap() - cost).abs() < 1e-9,
        "{report} {cost}"
    );

    let status = client
        .get(format!("{}/admin/status", gw1.admin))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    let c = &status["consumers"]["list"][0];
    assert_eq!(c["name"], "team-a", "{status}");
    assert_eq!(c["today"]["requests"], 8, "{status}");
    assert_eq!(c["month"]["tokens"], prompt + completion, "{status}");
    assert_eq!(c["budget"]["period"], "month");
    let left = c["budget"]["left"].as_f64().unwrap();
    assert!((left - (5.0 - cost)).abs() < 2e-6, "{status} {cost}");
    gw1.stop().await;
}
