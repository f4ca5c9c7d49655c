//! End-to-end behaviour of the core gateway against in-process simulated backends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use switchyard::sim::Faults;

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
async fn the_backend_never_sees_the_clients_credentials() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let r = client()
        .post(gw.url(CHAT))
        .header("content-type", "application/json")
        .header("api-key", "client-secret-1")
        .header("authorization", "Bearer client-secret-2")
        .header("ocp-apim-subscription-key", "client-secret-3")
        .header("x-custom", "kept")
        .header("x-request-id", "my-trace-123")
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-request-id"), "my-trace-123");
    let seen = s.requests();
    let h = &seen[0].headers;
    assert_eq!(h["api-key"], "key-east");
    assert!(h.get("authorization").is_none());
    assert!(h.get("ocp-apim-subscription-key").is_none());
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["x-request-id"], "my-trace-123");
    assert_eq!(h["host"], s.addr().to_string());
    let all = format!("{h:?}");
    assert!(!all.contains("client-secret"), "{all}");
    gw.stop().await;
}

/// A backend's own `x-request-id` and `x-switchyard-*` answer headers are replaced by the
/// gateway's, never sent beside them; other `x-switchyard-` names pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_headers_replace_a_backends_own() {
    let (url, _server) = common::scripted_backend(
        400,
        vec![
            ("x-request-id", "from-backend".to_string()),
            ("x-switchyard-backend", "spoofed".to_string()),
            ("x-switchyard-attempts", "9".to_string()),
            ("x-switchyard-hop", "inner".to_string()),
        ],
    )
    .await;
    let gw = gateway(&[B::url("only", url)], "", "").await;
    let r = post_chat(&client(), &gw.base).await;
    assert_eq!(r.status(), 400);
    let all = |name: &str| -> Vec<String> {
        r.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(all("x-switchyard-backend"), ["only"]);
    assert_eq!(all("x-switchyard-attempts"), ["1"]);
    assert_eq!(all("x-switchyard-hop"), ["inner"]);
    let ids = all("x-request-id");
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_ne!(ids[0], "from-backend");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_request_ids_reach_the_client() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let r = post_chat(&client(), &gw.base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ms-region"), "east");
    assert!(!header(&r, "apim-request-id").is_empty());
    assert!(!header(&r, "x-ratelimit-remaining-tokens").is_empty());
    assert_eq!(header(&r, "x-switchyard-backend"), "east");
    let rid = header(&r, "x-request-id");
    assert_eq!(rid.len(), 36, "a generated id: {rid}");
    assert_eq!(s.requests()[0].headers["x-request-id"], rid.as_str());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_paths_and_queries_are_forwarded_byte_exact() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let client = client();

    // Binary body on a sub-path the gateway knows nothing about.
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let path = "/openai/deployments/tts-1/audio/speech?api-version=2025-03-01-preview&x=a%2Fb";
    let r = client
        .post(gw.url(path))
        .header("content-type", "application/octet-stream")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap().as_ref(), binary.as_slice());
    let rec = s.requests().pop().unwrap();
    assert_eq!(rec.path_and_query, path);
    assert_eq!(rec.body.as_ref(), binary.as_slice());

    // Multipart, as audio transcription sends it.
    let boundary = "----switchyard-test";
    let mut multipart = Vec::new();
    multipart.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    multipart.extend_from_slice(&[0u8, 1, 2, 255, 254, 13, 10, 0]);
    multipart.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = client
        .post(gw.url("/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21"))
        .header("content-type", &ct)
        .body(multipart.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = s.requests().pop().unwrap();
    assert_eq!(rec.body.as_ref(), multipart.as_slice());
    assert_eq!(rec.headers["content-type"], ct.as_str());

    // OpenAI-style /v1 goes to the backend's /openai/v1; other /openai paths verbatim.
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.requests().pop().unwrap().path_and_query,
        "/openai/v1/chat/completions"
    );
    let r = client
        .get(gw.url("/openai/v1/models?api-version=preview"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = s.requests().pop().unwrap();
    assert_eq!(rec.method, http::Method::GET);
    assert_eq!(rec.path_and_query, "/openai/v1/models?api-version=preview");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_oversized_bodies_get_openai_errors() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "max_body_bytes = 1024").await;
    let client = client();
    for path in [
        "/",
        "/admin",
        "/openai/deployments/x",
        "/v2/chat/completions",
    ] {
        let r = client.post(gw.url(path)).body("{}").send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert!(v["error"]["message"].is_string());
        assert!(v["error"]["type"].is_string());
    }
    let r = client
        .post(gw.url(CHAT))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes")
    );
    // Chunked (no content-length) and over the limit: also 413.
    let chunks = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 512]))),
    );
    let r = client
        .post(gw.url(CHAT))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(s.requests().is_empty(), "nothing reached the backend");
    gw.stop().await;
}

/// A backend whose stream the test releases chunk by chunk: if the gateway buffered, the client
/// would never see the first chunk, because the backend sends the second only after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chunks_reach_the_client_before_the_backend_sends_the_next() {
    let (url, mut senders_rx, server) = manual_stream_backend().await;
    let gw = gateway(&[B::url("manual", url)], "", "").await;
    let resp = send_chat(&client(), &gw.base, true).await;
    assert_eq!(resp.status(), 200);
    let backend = senders_rx.recv().await.unwrap();
    let mut body = resp.bytes_stream();
    for i in 0..3 {
        let event = format!("data: {{\"n\":{i}}}\n\n");
        backend.send(Ok(Bytes::from(event.clone()))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("chunk was held back by the gateway")
            .unwrap()
            .unwrap();
        assert_eq!(got, event.as_bytes());
    }
    backend
        .send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
        .await
        .unwrap();
    drop(backend);
    let rest: Vec<_> = body.collect().await;
    assert_eq!(rest.len(), 1);
    gw.stop().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_streams_pass_through_whole() {
    let s = start_sim(switchyard::sim::SimConfig {
        token_interval: Duration::from_millis(2),
        ..sim("east")
    })
    .await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let r = send_chat(&client(), &gw.base, true).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(
        text.starts_with("data: {\"choices\":[],"),
        "Azure's filter event first: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(text.matches("chat.completion.chunk").count(), 1 + 8 + 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_streams_finish_and_stops_accepting() {
    let s = start_sim(switchyard::sim::SimConfig {
        token_interval: Duration::from_millis(50),
        ..sim("east")
    })
    .await;
    let gw = gateway(&[B::sim(&s)], "", "shutdown_grace = \"10s\"").await;
    let client = client();
    let r = send_chat(&client, &gw.base, true).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let admin = gw.admin.clone();
    let base = gw.base.clone();
    gw.shutdown.cancel();
    // The stream still runs to its end.
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), gw.gateway.wait())
        .await
        .expect("gateway stopped after the stream");
    assert!(
        reqwest::Client::new()
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .is_err()
    );
    assert!(
        reqwest::Client::new()
            .post(format!("{base}{CHAT}"))
            .send()
            .await
            .is_err()
    );
}

/// After a stop signal, `/readyz` fails at once while both listeners keep accepting for
/// `server.shutdown_delay` (an orchestrator still sends new connections for a few seconds);
/// then they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_stop_signal_listeners_accept_for_the_shutdown_delay() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "shutdown_delay = \"2s\"").await;
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    assert_eq!(
        fresh()
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stopped = std::time::Instant::now();
    gw.shutdown.cancel();
    let ready = fresh()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("shutting down"));
    // A new connection a second after the signal is served.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = post_chat(&fresh(), &gw.base).await;
    assert_eq!(r.status(), 200);
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "the test was too slow to show it"
    );
    // Then the listeners close and the gateway ends.
    tokio::time::timeout(Duration::from_secs(10), gw.gateway.wait())
        .await
        .expect("the gateway stopped after the delay");
    assert!(stopped.elapsed() >= Duration::from_secs(2));
    assert!(
        fresh()
            .post(format!("{}{CHAT}", gw.base))
            .send()
            .await
            .is_err()
    );
}

/// `/readyz` means "can serve": ready while every deployment has a backend that can take it,
/// what is degraded listed; not ready once one has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_means_every_deployment_can_be_served() {
    let (_sims, backends) = start_sims(&["east", "west"]).await;
    let tail = "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = \"gpt-4o\", west = \"gpt-4o\" }\n\n[[deployments]]\nname = \"embed\"\nbackends = { east = \"embed\" }\n";
    let gw = gateway_with(&backends, "unknown_deployments = \"reject\"", "", tail).await;
    let client = client();
    let ready = async || {
        let r = client
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let admin = async |path: &str| {
        let r = client
            .post(format!("{}{path}", gw.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    assert_eq!(ready().await, (200, "ready\n".to_string()));
    // West drained: both deployments still have east.
    admin("/admin/backends/west/drain").await;
    assert_eq!(
        ready().await,
        (200, "ready\nbackend west: drained\n".to_string())
    );
    // East drained instead: `embed` has no backend left.
    admin("/admin/backends/west/enable").await;
    admin("/admin/backends/east/drain").await;
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("no backend can serve: embed\n"), "{body}");
    admin("/admin/backends/east/enable").await;
    assert_eq!(ready().await.0, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let client = client();
    post_chat(&client, &gw.base).await;
    let get = |p: &str| client.get(format!("{}{p}", gw.admin)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let m = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        m.contains("switchyard_requests_total{deployment=\"gpt-4o\",backend=\"east\",status_class=\"2xx\",consumer=\"-\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_attempts_total{backend=\"east\",outcome=\"200\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("switchyard_in_flight_requests 0"), "{m}");
    assert!(!m.contains("key-east"));
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_limits_auth_and_determinism() {
    let client = client();
    let s = start_sim(switchyard::sim::SimConfig {
        tokens_per_minute: Some(60),
        requests_per_minute: Some(600),
        ..sim("lim")
    })
    .await;
    let url = format!("{}{CHAT}", s.url());
    let r = client
        .post(&url)
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no key");
    let send = || {
        client
            .post(&url)
            .header("api-key", "key-lim")
            .body(chat_body(false))
            .send()
    };
    // Each request is charged prompt + max_tokens (about 16 tokens) of the 60-token minute.
    let mut statuses = Vec::new();
    let mut throttled = None;
    for _ in 0..6 {
        let r = send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            throttled = Some(r);
            break;
        }
        assert!(!header(&r, "x-ratelimit-remaining-tokens").is_empty());
    }
    let r = throttled.unwrap_or_else(|| panic!("never throttled: {statuses:?}"));
    let secs: u64 = header(&r, "retry-after").parse().unwrap();
    let ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!(
        secs >= 1 && ms > 0 && ms <= secs * 1000,
        "{secs} s vs {ms} ms"
    );
    assert!(!header(&r, "x-ratelimit-remaining-requests").is_empty());
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "429");

    // The same seed gives the same fault sequence.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let s = start_sim(switchyard::sim::SimConfig {
            seed: 99,
            faults: Faults {
                error_rate: 0.5,
                ..Faults::default()
            },
            ..sim("det")
        })
        .await;
        let url = format!("{}{CHAT}", s.url());
        let mut seq = Vec::new();
        for _ in 0..20 {
            let r = client
                .post(&url)
                .header("api-key", "key-det")
                .body(chat_body(false))
                .send()
                .await
                .unwrap();
            seq.push(r.status().as_u16());
        }
        runs.push(seq);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&500) && runs[0].contains(&200),
        "{:?}",
        runs[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_dropped_connections() {
    failover_case(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
}

/// Once bytes went to the client nothing is retried; a backend dying mid-stream must not look
/// like a stream that ended normally: the client gets an SSE error event and no `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_way_is_not_a_clean_end() {
    // Paced, so the headers and the first events are out before the connection drops.
    let s = start_sim(switchyard::sim::SimConfig {
        token_interval: Duration::from_millis(5),
        ..sim("cut")
    })
    .await;
    s.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let other = start_sim(sim("other")).await;
    let gw = gateway(&[B::sim(&s), B::sim(&other)], "", "").await;
    let client = client();
    let r = send_chat(&client, &gw.base, true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-backend"), "cut");
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(
        last.starts_with("data: {\"error\":"),
        "ends with an error event: {last}"
    );
    assert!(last.contains("backend_stream_error"), "{last}");
    assert!(!text.contains("[DONE]"));
    assert!(
        text.contains("chat.completion.chunk"),
        "part of the stream came through first"
    );
    assert_eq!(other.requests().len(), 0, "no retry after bytes were sent");
    let m = metrics_text(&client, &gw.admin).await;
    assert!(
        m.contains("switchyard_stream_errors_total{backend=\"cut\"} 1"),
        "{m}"
    );
    assert!(m.contains("switchyard_in_flight_requests 0"), "{m}");
    gw.stop().await;
}

async fn in_flight(client: &reqwest::Client, admin: &str) -> String {
    metrics_text(client, admin)
        .await
        .lines()
        .find(|l| l.starts_with("switchyard_in_flight_requests "))
        .unwrap_or_default()
        .to_string()
}

/// A client that gives up (while the gateway waits on a backend, or mid-stream) must not leave
/// the request counted as in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_are_no_longer_in_flight() {
    let stalled = start_sim(sim("stalled")).await;
    stalled
        .set_faults(Faults {
            stall_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let slow = start_sim(switchyard::sim::SimConfig {
        token_interval: Duration::from_millis(100),
        completion_tokens: 50,
        ..sim("slow")
    })
    .await;
    let client = client();
    for s in [&stalled, &slow] {
        let gw = gateway(&[B::sim(s)], "", "").await;
        let quick = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let r = quick
            .post(gw.url(CHAT))
            .header("content-type", "application/json")
            .body(chat_body(true))
            .send()
            .await;
        match r {
            // The streaming backend: take one chunk, then hang up.
            Ok(resp) => {
                let mut body = resp.bytes_stream();
                let _ = body.next().await;
                drop(body);
            }
            Err(e) => assert!(e.is_timeout(), "{e}"),
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let line = in_flight(&client, &gw.admin).await;
            if line == "switchyard_in_flight_requests 0" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: still {line}",
                s.name()
            );
            tokio::task::yield_now().await;
        }
        gw.stop().await;
    }
}

/// With `[[consumers]]`, nothing passes without a valid key, in any header an SDK uses; the
/// backend never sees it either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_keys_are_required_when_configured() {
    let s = start_sim(sim("east")).await;
    // sha256("team-b-key-from-hash-0001"): a consumer configured by the hash of its key.
    let hash = "3bf50e77847fad1ac7326414494664915786430d45319b71adfcd620f424ceaf";
    let tail = format!(
        "\n[[consumers]]\nname = \"team-a\"\nkey = \"${{TEAM_A_KEY}}\"\n\n[[consumers]]\nname = \"team-b\"\nkey_sha256 = \"{hash}\"\n"
    );
    let gw = gateway_env(
        &[B::sim(&s)],
        "",
        "",
        &tail,
        &[("TEAM_A_KEY", "team-a-secret-key-0001")],
    )
    .await;
    let client = client();
    let send = |h: &'static str, v: &'static str| {
        let mut req = client
            .post(gw.url(CHAT))
            .header("content-type", "application/json")
            .body(chat_body(false));
        if !h.is_empty() {
            req = req.header(h, v);
        }
        req.send()
    };
    for (h, v) in [
        ("api-key", "team-a-secret-key-0001"),
        ("authorization", "Bearer team-a-secret-key-0001"),
        ("ocp-apim-subscription-key", "team-a-secret-key-0001"),
        ("api-key", "team-b-key-from-hash-0001"),
    ] {
        assert_eq!(send(h, v).await.unwrap().status(), 200, "{h}");
    }
    for (h, v) in [
        ("", ""),
        ("api-key", "wrong-key"),
        ("authorization", "Bearer team-a"),
    ] {
        let r = send(h, v).await.unwrap();
        assert_eq!(r.status(), 401, "{h}: {v}");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(!body.to_string().contains("team-a-secret"));
    }
    assert_eq!(
        s.requests().len(),
        4,
        "unauthenticated requests never reach a backend"
    );
    for r in s.requests() {
        assert_eq!(r.headers["api-key"], "key-east");
        assert!(!format!("{:?}", r.headers).contains("team-a-secret"));
    }
    // Unauthenticated requests get no routing information either.
    let r = client.get(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_shows_backend_state_drains_and_redacts() {
    let (sims, backends) = start_sims(&["a", "b"]).await;
    sims[0]
        .set_faults(Faults {
            error_rate: 1.0,
            error_status: 429,
            retry_after_ms: Some(30_000),
            ..Faults::default()
        })
        .await;
    let gw = gateway(&backends, "", "admin_key = \"admin-key-0123456789\"").await;
    let client = client();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);

    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{}{path}", gw.admin))
            .header("authorization", "Bearer admin-key-0123456789")
    };
    let unauth = client
        .get(format!("{}/admin/backends", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let open = client
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200, "metrics stay open for scrapers");

    let v: serde_json::Value = admin(reqwest::Method::GET, "/admin/backends")
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    let a = &v["backends"][0];
    assert_eq!(a["name"], "a");
    assert_eq!(a["deployments"][0]["deployment"], "gpt-4o");
    assert_eq!(a["deployments"][0]["state"], "cooling_down");
    let left = a["deployments"][0]["available_in_ms"].as_u64().unwrap();
    assert!(left > 25_000 && left <= 30_000, "{left}");
    assert!(
        a["last_error"]["error"].as_str().unwrap().contains("429"),
        "{a}"
    );
    assert_eq!(v["backends"][1]["deployments"][0]["state"], "healthy");

    // Drain b: with a cooling down too, nothing is left, so clients get a clear answer.
    let r = admin(reqwest::Method::POST, "/admin/backends/b/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let served = sims[1].stats().requests;
    assert_eq!(post_chat(&client, &gw.base).await.status(), 429);
    assert_eq!(
        sims[1].stats().requests,
        served,
        "a drained backend takes no new requests"
    );
    admin(reqwest::Method::POST, "/admin/backends/b/enable")
        .send()
        .await
        .unwrap();
    assert_eq!(post_chat(&client, &gw.base).await.status(), 200);
    let r = admin(reqwest::Method::POST, "/admin/backends/zzz/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let m = metrics_text(&client, &gw.admin).await;
    assert!(
        m.contains(
            "switchyard_backend_state{deployment=\"gpt-4o\",backend=\"a\",state=\"cooling_down\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains(
        "switchyard_backend_state{deployment=\"gpt-4o\",backend=\"b\",state=\"healthy\"} 1"
    ));
    assert!(
        m.contains("switchyard_gateway_overhead_seconds_count 2"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_time_to_first_byte_seconds_count{backend=\"b\"} 2"),
        "{m}"
    );
    assert!(m.ends_with("# EOF\n"));
    let cfg = admin(reqwest::Method::GET, "/admin/config")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        cfg.contains("\"name\":\"a\"") && cfg.contains("api_key"),
        "{cfg}"
    );
    assert!(
        !cfg.contains("key-a") && !cfg.contains("admin-key-0123"),
        "no secret: {cfg}"
    );
    gw.stop().await;
}

/// Every metric the shipped Grafana dashboard queries exists in the gateway's `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_metrics_that_exist() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/switchyard-dashboard.json")).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("switchyard_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name);
            }
        }
    }
    assert!(names.len() > 10, "{names:?}");
    // A gateway with a keyless backend, a limited consumer and Redis-free limits: every family.
    let s = start_sim(sim("east")).await;
    let tail = "\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\ntokens_per_minute = 100000\n";
    let gw = gateway_with(&[B::sim(&s)], "", "", tail).await;
    let client = client();
    let r = client
        .post(gw.url(CHAT))
        .header("api-key", "team-a-key-0123456789")
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let m = metrics_text(&client, &gw.admin).await;
    // Families appear in /metrics once they have samples; the rest must at least be registered
    // (by name in telemetry/mod.rs) or rendered by the admin listener (admin/metrics.rs).
    let telemetry = include_str!("../src/telemetry/mod.rs");
    let admin = include_str!("../src/admin/metrics.rs");
    for name in &names {
        let family = name.trim_end_matches("_total").trim_end_matches("_bucket");
        let exported = m
            .lines()
            .any(|l| l.starts_with(name.as_str()) || l.starts_with(&format!("# TYPE {family} ")));
        let stem = family.trim_start_matches("switchyard_");
        let registered = telemetry.contains(&format!("\"{stem}\"")) || admin.contains(family);
        assert!(
            exported || registered,
            "the dashboard queries {name}, which is neither exported nor registered"
        );
    }
    gw.stop().await;
}
