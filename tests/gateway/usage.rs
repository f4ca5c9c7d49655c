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
