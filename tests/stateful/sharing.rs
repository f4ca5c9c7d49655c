//! Owners shared through Redis, sessions, background responses, owners drained or removed.

use super::*;

/// The value of `key` in the Redis at `port` (a `GET` over RESP), `None` when unset.
fn redis_get(port: u16, key: &str) -> Option<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let len: i64 = line.trim()[1..].parse().unwrap();
    if len < 0 {
        return None;
    }
    let mut buf = vec![0u8; len as usize + 2];
    r.read_exact(&mut buf).unwrap();
    buf.truncate(len as usize);
    Some(String::from_utf8(buf).unwrap())
}

/// Two replicas sharing a real Redis: every call of each conversation goes to the other
/// replica than the one before, with no failed call; an owner one replica learned is used by
/// the other without a search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_owners_through_redis() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let (sims, backends) = three_sims().await;
    let tail = format!(
        "\n[limits]\nstore = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    let gw1 = gateway_with(&backends, "", "", &tail).await;
    let gw2 = gateway_with(&backends, "", "", &tail).await;
    let clients = [sdk(&gw1, "unused"), sdk(&gw2, "unused")];
    files_and_batch(&clients, &sims).await;
    chained(&clients, false).await;
    chained(&clients, true).await;
    stateless_with_reasoning(&clients).await;

    // Learned by the first replica, used straight away by the second once Redis has it.
    let made = clients[0]
        .responses()
        .create(response_request(
            json!({"model": "gpt-4o", "input": "hello"}),
        ))
        .await
        .unwrap();
    let key = format!("sy:v1:own:{}", made.id);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let record = loop {
        if let Some(v) = redis_get(redis.port, &key) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the owner never reached Redis"
        );
        tokio::task::yield_now().await;
    };
    let owner = holders(&sims, "responses", &made.id).await;
    assert_eq!(record.lines().next(), Some(owner[0].as_str()));
    let before = hits(&sims, &made.id);
    clients[1].responses().retrieve(&made.id).await.unwrap();
    let grew: usize = hits(&sims, &made.id)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .sum();
    assert_eq!(grew, 1, "sent straight to the owner");

    // A delete through one replica is forgotten by both.
    clients[1].responses().delete(&made.id).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while redis_get(redis.port, &key).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the owner was never forgotten"
        );
        tokio::task::yield_now().await;
    }
    gw1.stop().await;
    gw2.stop().await;
}

/// `routing.affinity_key`: a session's requests go to one backend while it can take them,
/// move when it is throttled and stay where they moved; requests without a key are balanced
/// as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_keep_a_conversation_on_one_backend() {
    let (sims, backends) = three_sims().await;
    let gw = gateway(
        &backends,
        "strategy = \"round_robin\"\naffinity_key = [\"header:x-session-id\", \"body:prompt_cache_key\", \"body:user\"]",
        "",
    )
    .await;
    let http = reqwest::Client::new();
    let send = |session: Option<(&'static str, String)>| {
        let http = http.clone();
        let url = gw.url(CHAT);
        async move {
            let mut body =
                json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
            let mut req = http.post(url).header("content-type", "application/json");
            match session {
                Some(("header", v)) => req = req.header("x-session-id", v),
                Some((field, v)) => body[field] = json!(v),
                None => {}
            }
            let r = req.body(body.to_string()).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-switchyard-backend"]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    let mut homes = std::collections::BTreeMap::new();
    for i in 0..12 {
        for kind in ["header", "prompt_cache_key", "user"] {
            let key = format!("{kind}-{i}");
            let mut served = std::collections::BTreeSet::new();
            for _ in 0..4 {
                served.insert(send(Some((kind, key.clone()))).await);
            }
            assert_eq!(served.len(), 1, "{key} went to {served:?}");
            homes.insert(key, served.into_iter().next().unwrap());
        }
    }
    let used: std::collections::BTreeSet<_> = homes.values().collect();
    assert_eq!(
        used.len(),
        3,
        "sessions spread over every backend: {homes:?}"
    );
    let mut unkeyed = std::collections::BTreeSet::new();
    for _ in 0..3 {
        unkeyed.insert(send(None).await);
    }
    assert_eq!(unkeyed.len(), 3, "round robin without a key");

    // The home of one session throttles: the session moves, and stays moved afterwards.
    let home = homes["header-0"].clone();
    let sim = sims.iter().find(|s| s.name() == home).unwrap();
    sim.set_faults(switchyard::sim::Faults {
        error_rate: 1.0,
        error_status: 429,
        retry_after_ms: Some(300),
        ..Default::default()
    })
    .await;
    let moved = send(Some(("header", "header-0".into()))).await;
    assert_ne!(moved, home);
    sim.set_faults(switchyard::sim::Faults::default()).await;
    for _ in 0..3 {
        assert_eq!(send(Some(("header", "header-0".into()))).await, moved);
    }
    gw.stop().await;
}

/// `background: true`: the polls and the cancel reach the instance working on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_responses_are_polled_and_cancelled_where_they_run() {
    let (_sims, backends) = three_sims().await;
    let gw = gateway(&backends, "", "").await;
    let client = sdk(&gw, "unused");
    let queued = client
        .responses()
        .create(response_request(
            json!({"model": "gpt-4o", "input": "take your time", "background": true}),
        ))
        .await
        .unwrap();
    let to_cancel = client
        .responses()
        .create(response_request(
            json!({"model": "gpt-4o", "input": "never mind", "background": true}),
        ))
        .await
        .unwrap();
    let cancelled = client.responses().cancel(&to_cancel.id).await.unwrap();
    assert_eq!(
        serde_json::to_value(cancelled.status).unwrap(),
        json!("cancelled")
    );
    let started = std::time::Instant::now();
    let done = loop {
        let r = client.responses().retrieve(&queued.id).await.unwrap();
        let status = serde_json::to_value(&r.status).unwrap();
        if status == json!("completed") {
            break r;
        }
        assert_eq!(status, json!("queued"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never completed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(done.usage.is_some());
    gw.stop().await;
}

/// The owner drained → 503 naming it; the owner removed from the config by a reload → 404
/// naming it. Neither request goes anywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_drained_or_removed_is_named_not_replaced() {
    let (sims, backends) = three_sims().await;
    let file = ConfigFile::new(&config_text(&backends, "", "", ""));
    let gw = gateway_from_file(&file, None).await;
    let http = reqwest::Client::new();
    let id = new_response(&http, &gw).await;
    let owner = holders(&sims, "responses", &id).await.remove(0);
    let before = hits(&sims, &id);

    let drained = http
        .post(format!("{}/admin/backends/{owner}/drain", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    let (status, body) = get_json(&http, &gw.url(&format!("/openai/v1/responses/{id}"))).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "owner_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains(&owner));

    let others: Vec<B> = sims
        .iter()
        .filter(|s| s.name() != owner)
        .map(B::sim)
        .collect();
    file.write(&config_text(&others, "", "", ""));
    let reload = http
        .post(format!("{}/admin/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let (status, body) = get_json(&http, &gw.url(&format!("/openai/v1/responses/{id}"))).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "owner_not_configured");
    assert!(body["error"]["message"].as_str().unwrap().contains(&owner));
    assert_eq!(hits(&sims, &id), before, "no backend was asked");
    gw.stop().await;
}
