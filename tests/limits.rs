//! Consumer limits end to end: requests and tokens per minute, quotas, settlement on real usage
//! (plain and streamed), and the usage chunk the gateway asks for on a client's behalf.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use common::*;
use futures_util::StreamExt;

const KEY_A: &str = "team-a-key-0123456789";
const KEY_B: &str = "team-b-key-0123456789";

async fn limited(extra_a: &str, limits: &str) -> (switchyard::sim::Simulator, Running) {
    let s = start_sim(sim("east")).await;
    let tail = format!(
        "\n[limits]\n{limits}\n\n[[consumers]]\nname = \"team-a\"\nkey = \"{KEY_A}\"\n{extra_a}\n\n[[consumers]]\nname = \"team-b\"\nkey = \"{KEY_B}\"\n"
    );
    let gw = gateway_with(&[B::sim(&s)], "", "", &tail).await;
    (s, gw)
}

async fn chat_as(client: &reqwest::Client, base: &str, key: &str, body: &str) -> reqwest::Response {
    client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .header("api-key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn num(r: &reqwest::Response, name: &str) -> i64 {
    header(r, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {:?}", header(r, name)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_per_consumer() {
    let (s, gw) = limited("requests_per_minute = 60", "").await;
    let client = client();
    let body = chat_body(false);
    // 60 per minute is 10 in any 10 s... as a bucket it allows the whole minute's 60 at once.
    for i in 0..60 {
        let r = chat_as(&client, &gw.base, KEY_A, &body).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 59 - i);
    }
    let r = chat_as(&client, &gw.base, KEY_A, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "1");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "consumer_rate_limit_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("team-a"));
    assert_eq!(
        s.stats().requests,
        60,
        "the refused request never reached a backend"
    );
    // Another consumer is not affected.
    assert_eq!(chat_as(&client, &gw.base, KEY_B, &body).await.status(), 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reserved_on_estimate_and_settled_on_usage() {
    let (s, gw) = limited("tokens_per_minute = 1000", "completion_estimate = 200").await;
    let client = client();
    // No max_tokens: 200 completion tokens are reserved; the simulator answers with 16.
    let body = r#"{"messages":[{"role":"user","content":"Hello there"}]}"#;
    let r1 = chat_as(&client, &gw.base, KEY_A, body).await;
    assert_eq!(r1.status(), 200);
    let rem1 = num(&r1, "x-ratelimit-remaining-tokens");
    assert!((780..=800).contains(&rem1), "reserved prompt + 200: {rem1}");
    let v: serde_json::Value = serde_json::from_slice(&r1.bytes().await.unwrap()).unwrap();
    let used = v["usage"]["total_tokens"].as_i64().unwrap();
    // The body was read, so the first request is settled: its unused reservation came back.
    let r2 = chat_as(&client, &gw.base, KEY_A, body).await;
    let rem2 = num(&r2, "x-ratelimit-remaining-tokens");
    let reserved = 1000 - rem1;
    let expect = 1000 - used - reserved;
    assert!(
        (rem2 - expect).abs() <= 2,
        "remaining {rem2}, expected about {expect}"
    );
    drop(r2);
    let m = metrics_text(&client, &gw.admin).await;
    assert!(
        m.contains(
            "switchyard_tokens_total{deployment=\"gpt-4o\",backend=\"east\",consumer=\"team-a\",kind=\"completion\"}"
        ),
        "{m}"
    );
    assert_eq!(s.stats().ok, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tokens_per_minute_is_429_with_retry_after() {
    let (_s, gw) = limited("tokens_per_minute = 300", "").await;
    let client = client();
    // Reserved at about 258, settled at what the simulator used (16 completion tokens).
    let small = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":250}"#;
    let r = chat_as(&client, &gw.base, KEY_A, small).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    // This one could use up to 295: more than is left.
    let big = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":295}"#;
    let r = chat_as(&client, &gw.base, KEY_A, big).await;
    assert_eq!(r.status(), 429);
    let secs: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    assert!(!header(&r, "retry-after-ms").is_empty());
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_quota_is_403() {
    let (_s, gw) = limited("token_quota = { period = \"day\", tokens = 60 }", "").await;
    let client = client();
    let body = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":16}"#;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = chat_as(&client, &gw.base, KEY_A, body).await;
        statuses.push(r.status().as_u16());
        let _ = r.bytes().await;
    }
    assert_eq!(statuses[0], 200);
    assert_eq!(*statuses.last().unwrap(), 403, "{statuses:?}");
    let r = chat_as(&client, &gw.base, KEY_A, body).await;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "consumer_quota_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("day"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_settled_and_the_client_sees_only_what_it_asked_for() {
    let (s, gw) = limited("tokens_per_minute = 100000", "").await;
    let client = client();
    // The client did not ask for usage: the gateway asks, counts, and strips it.
    let r = chat_as(&client, &gw.base, KEY_A, &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(text.matches("chat.completion.chunk").count(), 1 + 8 + 1);
    let sent: serde_json::Value =
        serde_json::from_slice(&s.requests().pop().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // The client asked for usage itself: it gets it, untouched.
    let own = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}"#;
    let r = chat_as(&client, &gw.base, KEY_A, own).await;
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while let Some(c) = body.next().await {
        text.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(
        text.contains("\"usage\":{\"completion_tokens\":8"),
        "{text}"
    );
    let m = metrics_text(&client, &gw.admin).await;
    let completion: u64 = m
        .lines()
        .find(|l| {
            l.starts_with(
                "switchyard_tokens_total{deployment=\"gpt-4o\",backend=\"east\",consumer=\"team-a\",kind=\"completion\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(
        completion, 16,
        "both streams' 8 completion tokens were counted"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_per_consumer_and_deployment() {
    let (_s, gw) = limited("deployments = { gpt-4o = { requests_per_minute = 1 } }", "").await;
    let client = client();
    let body = chat_body(false);
    assert_eq!(chat_as(&client, &gw.base, KEY_A, &body).await.status(), 200);
    assert_eq!(chat_as(&client, &gw.base, KEY_A, &body).await.status(), 429);
    let other = client
        .post(gw.url("/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"))
        .header("api-key", KEY_A)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "another deployment is not limited");
    assert_eq!(
        chat_as(&client, &gw.base, KEY_B, &body).await.status(),
        200,
        "nor another consumer"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_backend_could_serve_cost_no_tokens() {
    let s = start_sim(sim("east")).await;
    let tail = format!(
        "\n[[consumers]]\nname = \"team-a\"\nkey = \"{KEY_A}\"\ntokens_per_minute = 1000\n"
    );
    let gw = gateway_with(
        &[B::dead("down"), B::sim(&s)],
        "max_attempts = 1",
        "",
        &tail,
    )
    .await;
    let client = client();
    let body = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":400}"#;
    // The first attempt goes to the dead backend: 502, nothing served, nothing charged.
    let r = chat_as(&client, &gw.base, KEY_A, body).await;
    assert_eq!(r.status(), 502);
    let r = chat_as(&client, &gw.base, KEY_A, body).await;
    assert_eq!(r.status(), 200);
    let rem = num(&r, "x-ratelimit-remaining-tokens");
    assert!(
        rem > 1000 - 450,
        "only this request's reservation is held: {rem}"
    );
    gw.stop().await;
}
