//! Unchanged SDK clients through the gateway: `async-openai` configured for Azure (chat,
//! streaming chat, embeddings), and a WebSocket client on the Realtime path.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::result_large_err,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use async_openai::Client;
use async_openai::config::AzureConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs,
};
use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
use common::*;
use futures_util::{SinkExt, StreamExt};

fn azure_client(base: &str) -> Client<AzureConfig> {
    switchyard::install_crypto_provider();
    Client::with_config(
        AzureConfig::new()
            .with_api_base(base)
            .with_api_version("2024-10-21")
            .with_deployment_id("gpt-4o")
            .with_api_key("client-key-never-forwarded"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_openai_chat_streaming_and_embeddings() {
    let a = start_sim(sim("a")).await;
    let b = start_sim(sim("b")).await;
    let gw = gateway(&[B::sim(&a), B::sim(&b)], "", "").await;
    let client = azure_client(&gw.base);

    let request = CreateChatCompletionRequestArgs::default()
        .max_tokens(12u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello through the gateway")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let resp = client.chat().create(request.clone()).await.unwrap();
    let text = resp.choices[0].message.content.clone().unwrap();
    assert_eq!(text.split(' ').count(), 12, "{text}");
    let usage = resp.usage.unwrap();
    assert_eq!(usage.completion_tokens, 12);
    assert!(usage.prompt_tokens > 0);

    let mut streaming = request.clone();
    streaming.stream = Some(true);
    streaming.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    let mut stream = client.chat().create_stream(streaming).await.unwrap();
    let mut content = String::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for choice in &chunk.choices {
            if let Some(c) = &choice.delta.content {
                content.push_str(c);
            }
            if choice.finish_reason.is_some() {
                finish = choice.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(content.split(' ').count(), 12, "{content}");
    assert!(finish.is_some());
    assert_eq!(usage.unwrap().completion_tokens, 12);

    let emb = client
        .embeddings()
        .create(
            CreateEmbeddingRequestArgs::default()
                .model("text-embedding-3-small")
                .input(vec!["first text", "second text"])
                .dimensions(64u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(emb.data.len(), 2);
    assert_eq!(emb.data[0].embedding.len(), 64);

    // Both backends took part, and neither saw the SDK's key.
    assert!(a.stats().ok >= 1 && b.stats().ok >= 1);
    for s in [&a, &b] {
        for r in s.requests() {
            assert_eq!(r.headers["api-key"], format!("key-{}", s.name()).as_str());
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_openai_survives_a_throttling_backend() {
    let throttling = start_sim(switchyard::sim::SimConfig {
        tokens_per_minute: Some(100),
        ..sim("small")
    })
    .await;
    let big = start_sim(sim("big")).await;
    let gw = gateway(&[B::sim(&throttling), B::sim(&big)], "", "").await;
    let client = azure_client(&gw.base);
    for _ in 0..10 {
        let request = CreateChatCompletionRequestArgs::default()
            .max_tokens(40u32)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content("hello")
                .build()
                .unwrap()
                .into()])
            .build()
            .unwrap();
        client.chat().create(request).await.unwrap();
    }
    assert!(
        throttling.stats().throttled > 0,
        "the small backend did throttle"
    );
    gw.stop().await;
}

/// The Realtime API: a WebSocket upgrade tunnelled to the backend that serves the deployment
/// its query names, under that backend's name for it, messages both ways, with the backend's
/// key in place of the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut seen_tx = Some(seen_tx);
        let callback = |req: &Request, resp: Response| {
            let h = req.headers();
            let seen = (
                req.uri().to_string(),
                h.get("api-key").map(|v| v.to_str().unwrap().to_string()),
                h.contains_key("authorization"),
            );
            seen_tx.take().unwrap().send(seen).unwrap();
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback)
            .await
            .unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                ws.send(Message::text(format!("echo: {t}"))).await.unwrap();
            }
        }
    });
    // The deployment in the query routes through `[[deployments]]` (never to the backend
    // without it) and is renamed to the backend's own name.
    let gw = gateway_with(
        &[
            B::dead("elsewhere"),
            B {
                key: Some("backend-key".into()),
                ..B::url("rt", url)
            },
        ],
        "",
        "",
        "\n[[deployments]]\nname = \"gpt-4o-realtime\"\nbackends = { rt = \"gpt-realtime-eastus\" }\n",
    )
    .await;
    let ws_url = format!(
        "ws://{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o-realtime",
        gw.gateway.addr
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url)
            .unwrap();
    request
        .headers_mut()
        .insert("api-key", "client-key".parse().unwrap());
    request
        .headers_mut()
        .insert("authorization", "Bearer client".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(resp.headers()["x-switchyard-backend"], "rt");
    let (uri, key, had_auth) = seen_rx.await.unwrap();
    assert_eq!(
        uri,
        "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-realtime-eastus"
    );
    assert_eq!(key.as_deref(), Some("backend-key"));
    assert!(!had_auth);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got, Message::text(format!("echo: hello {i}")));
    }
    ws.close(None).await.unwrap();
    // Finish the closing handshake so both ends of the tunnel close; only then does the gateway
    // stop without waiting out its grace period for an open tunnel.
    while ws.next().await.is_some() {}
    drop(ws);
    gw.stop().await;
    server.abort();
}

/// Consumer keys as SDKs send them: Azure SDKs in `api-key`, OpenAI SDKs as a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_authenticate_with_consumer_keys() {
    use async_openai::config::OpenAIConfig;
    let s = start_sim(sim("east")).await;
    let tail = "\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\n";
    let gw = gateway_with(&[B::sim(&s)], "", "", tail).await;
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-4o")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hi")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();

    let azure = Client::with_config(
        AzureConfig::new()
            .with_api_base(&gw.base)
            .with_api_version("2024-10-21")
            .with_deployment_id("gpt-4o")
            .with_api_key("team-a-key-0123456789"),
    );
    azure.chat().create(request.clone()).await.unwrap();
    let openai = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.base))
            .with_api_key("team-a-key-0123456789"),
    );
    openai.chat().create(request.clone()).await.unwrap();
    assert_eq!(s.stats().ok, 2);

    let wrong = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.base))
            .with_api_key("not-a-key"),
    );
    let err = wrong.chat().create(request).await.unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
    assert_eq!(s.stats().requests, 2);
    gw.stop().await;
}

/// A limited consumer streaming through async-openai: the gateway's own usage request is
/// invisible to the SDK, and the stream parses to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limited_consumer_streams_through_an_sdk() {
    let s = start_sim(sim("east")).await;
    let tail = "\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\ntokens_per_minute = 100000\n";
    let gw = gateway_with(&[B::sim(&s)], "", "", tail).await;
    let client = Client::with_config(
        AzureConfig::new()
            .with_api_base(&gw.base)
            .with_api_version("2024-10-21")
            .with_deployment_id("gpt-4o")
            .with_api_key("team-a-key-0123456789"),
    );
    let mut request = CreateChatCompletionRequestArgs::default()
        .max_tokens(6u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("stream please")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    request.stream = Some(true);
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let (mut words, mut saw_usage) = (0, false);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        saw_usage |= chunk.usage.is_some();
        words += chunk
            .choices
            .iter()
            .filter(|c| c.delta.content.as_deref().is_some_and(|t| !t.is_empty()))
            .count();
    }
    assert_eq!(words, 6);
    assert!(
        !saw_usage,
        "the client did not ask for usage, so it gets none"
    );
    gw.stop().await;
}
