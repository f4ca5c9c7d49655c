//! End-to-end behaviour of the core gateway against in-process simulated backends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod admin;
#[path = "../common/mod.rs"]
mod common;
mod consumers;
mod failover;
mod fallbacks;
mod usage;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use switchyard::sim::{Faults, SimConfig};

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
            ("x-switchyard-deployment", "spoofed".to_string()),
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
    assert_eq!(all("x-switchyard-deployment"), ["gpt-4o"]);
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
        .get(gw.url("/openai/operations/deployments/op-1?api-version=preview"))
        .send()
        .await
        .unwrap();
    // The simulator knows no such operation: its own 404, passed on.
    assert_eq!(r.status(), 404);
    let rec = s.requests().pop().unwrap();
    assert_eq!(rec.method, http::Method::GET);
    assert_eq!(
        rec.path_and_query,
        "/openai/operations/deployments/op-1?api-version=preview"
    );
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
