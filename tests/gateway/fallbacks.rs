//! Fallback chains: a request its deployment cannot serve goes on to the next deployment of the
//! chain, and only then.

use super::*;

const CONSUMERS: &str = r#"
[[consumers]]
name = "app"
key = "app-key-00000001"

[[consumers]]
name = "strict"
key = "strict-key-00001"
fallbacks = false

[[consumers]]
name = "only4o"
key = "only4o-key-00001"
models = ["gpt-4o"]
"#;

/// `gpt-4o` on `east`, falling back to `gpt-4o-mini`, which `west` calls `mini-2024`.
fn chain(fallback_on: &str) -> String {
    format!(
        "\n[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ east = \"gpt-4o\" }}\nfallbacks = [\"gpt-4o-mini\"]\n{fallback_on}\n\n[[deployments]]\nname = \"gpt-4o-mini\"\nbackends = {{ west = \"mini-2024\" }}\n{CONSUMERS}"
    )
}

async fn chat(gw: &Running, key: &str, path: &str, body: String) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .header("content-type", "application/json")
        .header("api-key", key)
        .body(body)
        .send()
        .await
        .unwrap()
}

fn v1_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        "stream": stream
    })
    .to_string()
}

/// While every backend of `gpt-4o` cools down after 429s, its requests are served by
/// `gpt-4o-mini` under the fallback backend's own name (in the path, and in a v1 body's
/// `model`), streams too; answers say who served. A consumer that turned fallbacks off, or may
/// not use the fallback, gets the 429 as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_deployment_falls_back_to_the_next_model() {
    let (sims, backends) = start_sims(&["east", "west"]).await;
    let gw = gateway_with(&backends, "", "", &chain("")).await;
    let key = "app-key-00000001";

    let r = chat(&gw, key, CHAT, chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-switchyard-deployment"),
        "gpt-4o",
        "served as asked"
    );
    assert_eq!(header(&r, "x-switchyard-backend"), "east");

    sims[0].set_faults(throttling(30_000)).await;
    // The first meets east's 429 and goes on; the next find east cooling down and go on at once.
    for i in 0..3 {
        let r = chat(&gw, key, CHAT, chat_body(false)).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(header(&r, "x-switchyard-deployment"), "gpt-4o-mini");
        assert_eq!(header(&r, "x-switchyard-backend"), "west");
        let attempts = if i == 0 { "2" } else { "1" };
        assert_eq!(header(&r, "x-switchyard-attempts"), attempts, "request {i}");
    }
    assert_eq!(
        sims[0].stats().faulted,
        1,
        "east was asked once, then left to cool down"
    );
    let seen = sims[1].requests();
    assert_eq!(seen.len(), 3);
    assert!(
        seen[0]
            .path_and_query
            .starts_with("/openai/deployments/mini-2024/chat/completions?"),
        "{}",
        seen[0].path_and_query
    );
    assert_eq!(seen[0].body, chat_body(false), "the body as sent");

    // The v1 API: the body's model is the fallback backend's name for it.
    let r = chat(
        &gw,
        key,
        "/openai/v1/chat/completions",
        v1_body("gpt-4o", false),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-deployment"), "gpt-4o-mini");
    let sent: serde_json::Value = serde_json::from_slice(&sims[1].requests()[3].body).unwrap();
    assert_eq!(sent["model"], "mini-2024");

    // A stream falls back before its first byte, whole.
    let r = chat(&gw, key, CHAT, chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-deployment"), "gpt-4o-mini");
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // Never served by another model: the 429 as without fallbacks.
    for key in ["strict-key-00001", "only4o-key-00001"] {
        let r = chat(&gw, key, CHAT, chat_body(false)).await;
        assert_eq!(r.status(), 429, "{key}");
        let wait: u64 = header(&r, "retry-after-ms").parse().unwrap();
        assert!(wait > 20_000 && wait <= 30_000, "{key}: {wait}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("'gpt-4o'"),
            "{body}"
        );
    }
    assert_eq!(sims[1].requests().len(), 5, "west was not asked for them");

    let text = metrics_text(&client(), &gw.admin).await;
    assert_eq!(
        metric_in(
            &text,
            r#"switchyard_fallbacks_total{deployment="gpt-4o",fallback="gpt-4o-mini",reason="throttled"}"#
        ),
        5.0,
        "{text}"
    );
    // Counted under the deployment that served.
    assert_eq!(
        metric_in(
            &text,
            r#"switchyard_requests_total{deployment="gpt-4o-mini",backend="west",status_class="2xx",consumer="app"}"#
        ),
        5.0,
        "{text}"
    );
    gw.stop().await;
}

/// A deployment whose backends are down (connections refused) falls back; one whose fallback
/// is down too answers as exhaustion does without fallbacks: the last failure, a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_deployment_falls_back_and_an_exhausted_chain_answers_as_before() {
    let west = start_sim(sim("west")).await;
    let backends = [B::dead("east"), B::sim(&west), B::dead("north")];
    let tail = format!(
        "{}\n[[deployments]]\nname = \"gpt-4.1\"\nbackends = {{ east = \"gpt-4.1\" }}\nfallbacks = [\"o3\"]\n\n[[deployments]]\nname = \"o3\"\nbackends = {{ north = \"o3\" }}\n",
        chain("")
    );
    let gw = gateway_with(&backends, "", "", &tail).await;
    let key = "app-key-00000001";
    let r = chat(&gw, key, CHAT, chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-deployment"), "gpt-4o-mini");
    assert_eq!(header(&r, "x-switchyard-backend"), "west");

    let path = "/openai/deployments/gpt-4.1/chat/completions?api-version=2024-10-21";
    let r = chat(&gw, key, path, chat_body(false)).await;
    assert_eq!(r.status(), 502);
    assert_eq!(
        header(&r, "x-switchyard-attempts"),
        "6",
        "max_attempts (3) a deployment"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "backend_connect_error", "{body}");
    let text = metrics_text(&client(), &gw.admin).await;
    assert_eq!(
        metric_in(
            &text,
            r#"switchyard_fallbacks_total{deployment="gpt-4.1",fallback="o3",reason="unavailable"}"#
        ),
        1.0,
        "{text}"
    );
    gw.stop().await;
}

/// A prompt too long for the small model's context window (the simulator answers 400
/// `context_length_exceeded`, as Azure does) goes on to the larger one when `fallback_on` lists
/// it; where it does not, the 400 is the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_long_for_the_model_goes_on_to_a_larger_one() {
    let s = start_sim(SimConfig {
        context_windows: vec![("small".into(), 40), ("small-strict".into(), 40)],
        ..sim("east")
    })
    .await;
    let tail = "\n[[deployments]]\nname = \"small\"\nbackends = { east = \"small\" }\nfallbacks = [\"large\"]\nfallback_on = [\"throttled\", \"context_length_exceeded\"]\n\n[[deployments]]\nname = \"small-strict\"\nbackends = { east = \"small-strict\" }\nfallbacks = [\"large\"]\n\n[[deployments]]\nname = \"large\"\nbackends = { east = \"large\" }\n";
    let gw = gateway_with(&[B::sim(&s)], "", "", tail).await;
    let body = |words: usize| {
        serde_json::json!({
            "messages": [{"role": "user", "content": "lorem ipsum ".repeat(words)}],
            "max_tokens": 8,
        })
        .to_string()
    };
    let path = |d: &str| format!("/openai/deployments/{d}/chat/completions?api-version=2024-10-21");

    let r = chat(&gw, "-", &path("small"), body(3)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-switchyard-deployment"),
        "small",
        "a short prompt fits"
    );

    let r = chat(&gw, "-", &path("small"), body(200)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-deployment"), "large");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["model"], "large");

    let r = chat(&gw, "-", &path("small-strict"), body(200)).await;
    assert_eq!(r.status(), 400, "fallback_on does not list it");
    assert_eq!(header(&r, "x-switchyard-deployment"), "small-strict");
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        answer["error"]["code"], "context_length_exceeded",
        "{answer}"
    );
    assert_eq!(s.requests().len(), 4);
    gw.stop().await;
}

/// Every deployment of the chain throttled: 429 with the soonest `retry-after` among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_chain_answers_429_with_the_soonest_retry_after() {
    let (sims, backends) = start_sims(&["east", "west"]).await;
    for (s, ms) in sims.iter().zip([30_000, 8_000]) {
        s.set_faults(throttling(ms)).await;
    }
    let gw = gateway_with(&backends, "", "", &chain("")).await;
    let r = chat(&gw, "app-key-00000001", CHAT, chat_body(false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    let wait: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!(wait > 5_000 && wait <= 8_000, "{wait}");
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("gpt-4o-mini"), "{message}");
    gw.stop().await;
}

/// A request that reached a backend whole and got no answer may have been acted on: one that
/// makes an object (a stored chat completion) goes to no fallback, as it goes to no other
/// backend; one that makes none goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_made_an_object_is_not_sent_to_a_fallback() {
    let (sims, backends) = start_sims(&["east", "west"]).await;
    sims[0]
        .set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let gw = gateway_with(&backends, "max_attempts = 1", "", &chain("")).await;
    let key = "app-key-00000001";
    let v1 = "/openai/v1/chat/completions";
    let stored = serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Hello there"}],
        "store": true
    })
    .to_string();
    let r = chat(&gw, key, v1, stored).await;
    assert_eq!(r.status(), 502);
    assert!(sims[1].requests().is_empty(), "not made twice");

    let r = chat(&gw, key, v1, v1_body("gpt-4o", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-deployment"), "gpt-4o-mini");
    gw.stop().await;
}
