//! Balancing and failover: round robin, what is retried and where, timeouts, the last answer.

use super::*;

fn always(status: u16) -> Faults {
    Faults {
        error_rate: 1.0,
        error_status: status,
        ..Faults::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_round_robin_is_exact() {
    let (sims, backends) = start_sims(&["a", "b", "c"]).await;
    let gw = gateway(&backends, "", "").await;
    let client = client();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-attempts"), "1");
        *seen.entry(header(&r, "x-switchyard-backend")).or_default() += 1;
    }
    for s in &sims {
        assert_eq!(s.stats().ok, 100, "{}", s.name());
        assert_eq!(seen[s.name()], 100);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_round_robin_shares_within_one() {
    let (sims, backends) = start_sims(&["a", "b", "c"]).await;
    let gw = gateway(&backends, "", "").await;
    let client = client();
    let results = futures_util::stream::iter(0..301)
        .map(|_| {
            let client = client.clone();
            let base = gw.base.clone();
            async move { post_chat(&client, &base).await.status() }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    assert!(results.iter().all(|s| *s == 200));
    for s in &sims {
        let ok = s.stats().ok as i64;
        assert!((ok - 100).abs() <= 1, "{} served {ok}", s.name());
    }
    gw.stop().await;
}

async fn failover_case(faults: Faults) {
    let bad = start_sim(common::sim("bad")).await;
    bad.set_faults(faults).await;
    let good1 = start_sim(sim("good1")).await;
    let good2 = start_sim(sim("good2")).await;
    let gw = gateway(&[B::sim(&bad), B::sim(&good1), B::sim(&good2)], "", "").await;
    let client = client();
    for _ in 0..30 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_ne!(header(&r, "x-switchyard-backend"), "bad");
        let attempts: u32 = header(&r, "x-switchyard-attempts").parse().unwrap();
        assert!(attempts <= 2, "attempts {attempts}");
    }
    assert_eq!(bad.stats().ok, 0);
    // A 429 cools the backend down (the simulator asks for 1 s); other failures open its
    // circuit after 5 (the default): either way it stops taking first attempts.
    let faulted = bad.stats().faulted;
    assert!(
        (1..=5).contains(&faulted),
        "the bad backend was tried {faulted} times"
    );
    assert_eq!(good1.stats().ok + good2.stats().ok, 30);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_429() {
    failover_case(always(429)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_500() {
    failover_case(always(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_refused_connections() {
    let good = start_sim(sim("good")).await;
    let gw = gateway(&[B::dead("dead"), B::sim(&good)], "", "").await;
    let client = client();
    for _ in 0..10 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-backend"), "good");
    }
    let text = metrics_text(&client, &gw.admin).await;
    // Five refused connects open the dead backend's circuit; after that it gets no attempts.
    let dead = "switchyard_attempts_total{backend=\"dead\",outcome=\"backend_connect_error\"} 5";
    assert!(text.contains(dead), "{text}");
    assert!(
        text.contains("switchyard_circuits_opened_total{backend=\"dead\"} 1"),
        "{text}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_simulator_is_skipped_and_comes_back() {
    let flaky = start_sim(sim("flaky")).await;
    let good = start_sim(sim("good")).await;
    let gw = gateway(&[B::sim(&flaky), B::sim(&good)], "", "").await;
    let client = client();
    flaky
        .set_faults(Faults {
            refuse: true,
            ..Faults::default()
        })
        .await;
    for _ in 0..4 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-backend"), "good");
    }
    flaky.set_faults(Faults::default()).await;
    let mut served_by_flaky = 0;
    for _ in 0..4 {
        let r = post_chat(&client, &gw.base).await;
        assert_eq!(r.status(), 200);
        served_by_flaky += (header(&r, "x-switchyard-backend") == "flaky") as u32;
    }
    assert_eq!(served_by_flaky, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried() {
    let a = start_sim(sim("a")).await;
    let b = start_sim(sim("b")).await;
    let gw = gateway(&[B::sim(&a), B::sim(&b)], "", "").await;
    let client = client();
    // Invalid JSON: the backend answers 400, which goes back as it is.
    let r = client
        .post(gw.url(CHAT))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    assert_eq!(a.requests().len() + b.requests().len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "BadRequest");
    gw.stop().await;

    // A backend configured with the wrong key answers 401: that is the gateway's config, not
    // the client's request, so it moves on (tests/balancing.rs has the rest).
    let mut wrong = B::sim(&a);
    wrong.key = Some("wrong".into());
    let gw = gateway(&[wrong, B::sim(&b)], "", "").await;
    let before = b.requests().len();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-backend"), "b");
    assert_eq!(b.requests().len(), before + 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_is_respected_and_the_last_response_returned() {
    let (sims, backends) = start_sims(&["a", "b", "c"]).await;
    for s in &sims {
        s.set_faults(always(503)).await;
    }
    let gw = gateway(&backends, "max_attempts = 2", "").await;
    let client = client();
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(
        r.status(),
        503,
        "the backend's own answer, not a gateway 500"
    );
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    assert_eq!(header(&r, "x-switchyard-backend"), "b");
    assert_eq!(header(&r, "retry-after"), "1");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["message"], "Simulated failure");
    let total: usize = sims.iter().map(|s| s.requests().len()).sum();
    assert_eq!(total, 2);
    gw.stop().await;

    // More attempts than backends: each 503 came with a retry hint, so each backend is cooling
    // down once tried, and the gateway answers 429 with the soonest one's wait.
    let gw = gateway(&backends, "max_attempts = 5", "").await;
    let r = post_chat(&client, &gw.base).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-switchyard-attempts"), "3");
    assert_eq!(header(&r, "retry-after"), "1");
    let total: usize = sims.iter().map(|s| s.requests().len()).sum();
    assert_eq!(total, 2 + 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_last_attempt_cannot_connect_the_last_real_response_is_returned() {
    let throttled = start_sim(sim("throttled")).await;
    throttled.set_faults(always(429)).await;
    let gw = gateway(
        &[B::sim(&throttled), B::dead("dead")],
        "max_attempts = 2",
        "",
    )
    .await;
    let r = post_chat(&client(), &gw.base).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-switchyard-backend"), "throttled");
    assert_eq!(header(&r, "retry-after"), "1");
    // Kept whole while the next attempt ran: the headers passed on unread came along.
    assert_eq!(header(&r, "x-ms-region"), "throttled");
    assert!(!header(&r, "apim-request-id").is_empty());
    gw.stop().await;

    // Nothing answered at all: a gateway error in the OpenAI shape.
    let gw = gateway(&[B::dead("d1"), B::dead("d2")], "", "").await;
    let r = post_chat(&client(), &gw.base).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "backend_connect_error");
    assert!(v["error"]["type"].is_string());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fail_over() {
    let stalled = start_sim(sim("stalled")).await;
    stalled
        .set_faults(Faults {
            stall_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let good = start_sim(sim("good")).await;
    let gw = gateway(
        &[B::sim(&stalled), B::sim(&good)],
        "first_byte_timeout = \"300ms\"",
        "",
    )
    .await;
    let r = post_chat(&client(), &gw.base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-backend"), "good");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_dropped_connections() {
    failover_case(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
}

/// Priority per deployment: `west` is the PTU for `gpt-4o` only (its `[[deployments]]` table
/// gives it priority 1 and `east` 2), while `embed` keeps the backends' own order (`east`
/// first). A throttled `west` spills `gpt-4o` over to `east`.
#[tokio::test]
async fn a_deployment_ranks_its_backends_its_own_way_and_spills_over() {
    let (sims, _) = start_sims(&["east", "west"]).await;
    let backends = [
        B::sim(&sims[0]).with("priority = 1"),
        B::sim(&sims[1]).with("priority = 2"),
    ];
    let tail = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = { deployment = \"gpt-4o\", priority = 2 }, west = { deployment = \"gpt-4o\", priority = 1 } }\n\n[[deployments]]\nname = \"embed\"\nbackends = { east = \"embed\", west = \"embed\" }\n";
    let gw = gateway_with(&backends, "", "", tail).await;
    let client = client();
    let served_by = |deployment: &'static str| {
        let client = client.clone();
        let url = gw.url(&format!(
            "/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
        ));
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body(chat_body(false))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            header(&r, "x-switchyard-backend")
        }
    };
    for _ in 0..4 {
        assert_eq!(served_by("gpt-4o").await, "west", "gpt-4o: west first");
        assert_eq!(served_by("embed").await, "east", "embed: east first");
    }
    sims[1].set_faults(throttling(30_000)).await;
    for _ in 0..4 {
        assert_eq!(
            served_by("gpt-4o").await,
            "east",
            "spilled over while west cools down"
        );
    }
    gw.stop().await;
}
