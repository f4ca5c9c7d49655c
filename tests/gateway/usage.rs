//! Usage: every token kind counted, from plain answers and from streams sent with the SDKs'
//! defaults.

use super::*;

/// A streamed chat completion sent as the SDKs send it (no `stream_options`) by a caller with
/// no consumer or limits: the gateway asks for the usage chunk, counts every kind (the second
/// turn's prompt is served from the instance's prompt cache), and the client's stream carries
/// no usage it did not ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_with_the_sdk_defaults_are_counted_too() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let client = client();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(150);
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": long}],
        "max_tokens": 8,
        "stream": true
    })
    .to_string();
    for _ in 0..2 {
        let r = client
            .post(gw.url(CHAT))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
        assert!(!text.contains("usage"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let sent: serde_json::Value = serde_json::from_slice(&s.requests()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let m = metrics_text(&client, &gw.admin).await;
    let tokens = |kind: &str| {
        metric_in(
            &m,
            &format!(
                r#"switchyard_tokens_total{{deployment="gpt-4o",backend="east",consumer="-",kind="{kind}"}}"#
            ),
        )
    };
    assert_eq!(tokens("completion"), 16.0, "{m}");
    assert!(tokens("prompt") > 2.0 * 1000.0, "{m}");
    let cached = tokens("cached");
    assert!(
        cached > 0.0 && cached < tokens("prompt") / 2.0,
        "the second turn's: {m}"
    );
    assert_eq!(tokens("reasoning"), 0.0);
    gw.stop().await;
}

/// The cost of a known mix of requests (plain and streamed chat, some with cached prompts,
/// embeddings) is what each answer's usage at its deployment's price comes to, to the cent
/// and below: in `switchyard_cost_total` per consumer and deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_is_each_answers_usage_at_its_deployments_price() {
    let s = start_sim(sim("east")).await;
    let tail = "\n[usage]\ncurrency = \"EUR\"\n\n[[deployments]]\nname = \"gpt-4o\"\nbackends = { east = \"gpt-4o\" }\nprice = { input = 2.50, cached_input = 1.25, output = 10.00 }\n\n[[deployments]]\nname = \"embed\"\nbackends = { east = \"text-embedding-3-large\" }\nprice = { input = 0.13, output = 0 }\n\n[[deployments]]\nname = \"free\"\nbackends = { east = \"free\" }\n\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\n";
    let gw = gateway_with(&[B::sim(&s)], "", "", tail).await;
    let client = client();
    let send = |path: &'static str, body: serde_json::Value| {
        client
            .post(gw.url(path))
            .header("content-type", "application/json")
            .header("api-key", "team-a-key-0123456789")
            .body(body.to_string())
            .send()
    };
    let chat = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    let long = "Tell me about the sea and the ships upon it. ".repeat(120);
    let (mut chat_cost, mut embed_cost) = (0.0f64, 0.0f64);
    for i in 0..6 {
        let content = if i % 2 == 0 {
            long.clone()
        } else {
            format!("Question {i}")
        };
        let stream = i >= 3;
        let mut body = serde_json::json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 5 + i,
        });
        if stream {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let r = send(chat, body).await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let usage: serde_json::Value = if stream {
            let last = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .rfind(|d| d.contains("\"usage\":{"))
                .unwrap();
            serde_json::from_str::<serde_json::Value>(last).unwrap()["usage"].clone()
        } else {
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["usage"].clone()
        };
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64;
        let prompt = n(&usage["prompt_tokens"]);
        let cached = n(&usage["prompt_tokens_details"]["cached_tokens"]);
        let completion = n(&usage["completion_tokens"]);
        chat_cost += ((prompt - cached) * 2.50 + cached * 1.25 + completion * 10.00) / 1e6;
    }
    for _ in 0..3 {
        let r = send(
            "/openai/deployments/embed/embeddings?api-version=2024-10-21",
            serde_json::json!({"input": ["one two three", "four five"]}),
        )
        .await
        .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        embed_cost += v["usage"]["prompt_tokens"].as_u64().unwrap() as f64 * 0.13 / 1e6;
    }
    let r = send(
        "/openai/deployments/free/chat/completions?api-version=2024-10-21",
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;

    let m = metrics_text(&client, &gw.admin).await;
    let cost = |d: &str| {
        metric_in(
            &m,
            &format!(r#"switchyard_cost_total{{consumer="team-a",deployment="{d}"}}"#),
        )
    };
    assert!(chat_cost > 0.005, "a mix worth counting: {chat_cost}");
    assert!(
        (cost("gpt-4o") - chat_cost).abs() < 1e-9,
        "{chat_cost}\n{m}"
    );
    assert!(
        (cost("embed") - embed_cost).abs() < 1e-12,
        "{embed_cost}\n{m}"
    );
    assert!(
        !m.contains(r#"deployment="free"}"#),
        "no price, no cost: {m}"
    );
    gw.stop().await;
}

/// Every token kind the simulator reports, from plain and streamed answers of each operation
/// (chat with a reasoning and an audio model, Responses, embeddings), is what
/// `switchyard_tokens_total` counts, kind by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_kind_of_every_operation_is_counted() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let client = client();
    let long = "Summarise the history of the lighthouse keepers of the north coast. ".repeat(80);
    let mut want = HashMap::<&str, u64>::new();
    let mut add = |u: &serde_json::Value| {
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let details = |a: &str, b: &str, k: &str| n(&u[a][k]) + n(&u[b][k]);
        *want.entry("prompt").or_default() += n(&u["prompt_tokens"]) + n(&u["input_tokens"]);
        *want.entry("completion").or_default() +=
            n(&u["completion_tokens"]) + n(&u["output_tokens"]);
        *want.entry("cached").or_default() += details(
            "prompt_tokens_details",
            "input_tokens_details",
            "cached_tokens",
        );
        *want.entry("reasoning").or_default() += details(
            "completion_tokens_details",
            "output_tokens_details",
            "reasoning_tokens",
        );
        *want.entry("audio").or_default() += details(
            "prompt_tokens_details",
            "completion_tokens_details",
            "audio_tokens",
        );
    };
    // The usage an answer reports: a JSON body's, or a stream's last usage.
    let usage_of = |text: &str| -> serde_json::Value {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
            return v["usage"].clone();
        }
        let last = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .rfind(|d| d.contains("\"usage\":{"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        if v["response"].is_object() {
            v["response"]["usage"].clone()
        } else {
            v["usage"].clone()
        }
    };
    let send = async |path: &str, body: serde_json::Value| {
        let r = client
            .post(gw.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let text = r.text().await.unwrap();
        usage_of(&text)
    };
    let v1 = "/openai/v1/chat/completions";
    for model in ["o3-mini", "gpt-4o-audio-preview", "gpt-4o"] {
        for stream in [false, true] {
            let mut body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": long}],
                "max_tokens": 6,
            });
            if stream {
                body["stream"] = true.into();
                body["stream_options"] = serde_json::json!({"include_usage": true});
            }
            add(&send(v1, body).await);
        }
    }
    for stream in [false, true] {
        let body = serde_json::json!({"model": "o3", "input": long, "stream": stream});
        add(&send("/openai/v1/responses", body).await);
    }
    let body = serde_json::json!({"model": "text-embedding-3-large", "input": ["a b c", "d e"]});
    add(&send("/openai/v1/embeddings", body).await);

    let m = metrics_text(&client, &gw.admin).await;
    for (kind, want) in &want {
        let counted: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_tokens_total{") && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(counted, *want as f64, "{kind}\n{m}");
        assert!(*want > 0, "the simulator reported some {kind} tokens");
    }
    gw.stop().await;
}
