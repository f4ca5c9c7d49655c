//! Micro-benchmarks of the request path's hot pieces: backend pick, header rewrite, SSE usage
//! parsing, token estimation and retry-hint parsing.
//!
//!   cargo bench --bench hot
//!
//! Results of the latest run are in `bench/results/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark fails loudly and prints its tables"
)]

use std::hint::black_box;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use switchyard::balancer::{Balancer, Pick, Policy, retry_hint};
use switchyard::config::{
    BackendAuth, BackendConfig, BackendUrl, CircuitBreakerConfig, Secret, Strategy,
};
use switchyard::upstream::{Backend, OutboundRequest, build_request};
use switchyard::usage::Tap;

fn policy(strategy: Strategy, n: usize) -> Policy {
    Policy {
        strategy,
        priority: vec![1; n],
        weight: vec![1; n],
        default_cooldown: Duration::from_secs(10),
        max_cooldown: Duration::from_secs(60),
        breaker: CircuitBreakerConfig {
            failures: 5,
            interval: Duration::from_secs(10),
            trip_duration: Duration::from_secs(30),
        },
        drained: (0..n).map(|_| AtomicBool::new(false)).collect(),
    }
}

fn pick(c: &mut Criterion) {
    let candidates: Vec<usize> = (0..3).collect();
    let tried = [false; 3];
    for strategy in [
        Strategy::RoundRobin,
        Strategy::LeastInflight,
        Strategy::Latency,
        Strategy::Headroom,
    ] {
        let table = Balancer::new(policy(strategy, 3)).table("gpt-4o");
        c.bench_function(&format!("pick/{}", strategy.as_str()), |b| {
            b.iter(|| {
                let now = tokio::time::Instant::now();
                match table.pick(black_box(&candidates), &tried, now) {
                    Pick::Chosen(lease) => black_box(lease.backend()),
                    _ => unreachable!(),
                }
            })
        });
    }
}

fn header_rewrite(c: &mut Criterion) {
    let backend = Backend::new(
        &BackendConfig {
            name: "eastus".into(),
            url: BackendUrl {
                scheme: http::uri::Scheme::HTTPS,
                authority: "my-eastus.openai.azure.com".parse().unwrap(),
                base_path: String::new(),
            },
            auth: BackendAuth::ApiKey(Secret::new("backend-key")),
            priority: 1,
            weight: 1,
        },
        &[],
        None,
        &switchyard::telemetry::Metrics::new(),
    )
    .unwrap();
    // What the OpenAI Python SDK sends.
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("host", "gateway.example"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "AzureOpenAI/Python 1.57.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "1.57.0"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.11.7"),
        ("api-key", "client-key"),
        ("connection", "keep-alive"),
        ("content-length", "120"),
    ] {
        headers.insert(k, HeaderValue::from_static(v));
    }
    let method = Method::POST;
    let rid = HeaderValue::from_static("6f1c1b9e-3c1d-4a51-9f7e-0c7b1d2f3a4b");
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    let req = OutboundRequest {
        method: &method,
        path_and_query: path,
        deployment_span: Some(20..26),
        model_in_body: false,
        headers: &headers,
        passthrough: Bytes::new(),
        body: Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8}"#,
        ),
        request_id: &rid,
        upgrade: false,
        creates: false,
    };
    let auth = Some((
        http::HeaderName::from_static("api-key"),
        HeaderValue::from_static("backend-key"),
    ));
    c.bench_function("header_rewrite/build_request", |b| {
        b.iter(|| {
            black_box(build_request(
                &backend,
                black_box(&req),
                None,
                auth.clone(),
                None,
            ))
        })
    });
    c.bench_function("header_rewrite/build_request_renamed", |b| {
        b.iter(|| {
            black_box(build_request(
                &backend,
                black_box(&req),
                Some("gpt-4o-2024-08-06"),
                auth.clone(),
                None,
            ))
        })
    });
}

fn sse_usage(c: &mut Criterion) {
    // A 100-token streamed answer as Azure sends it, usage chunk at the end.
    let mut stream = String::from(
        "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
    );
    for i in 0..100 {
        stream.push_str(&format!(
            "data: {{\"choices\":[{{\"content_filter_results\":{{}},\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null,\"index\":0}}],\"created\":1732600000,\"id\":\"chatcmpl-abc\",\"model\":\"gpt-4o-2024-08-06\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_1\",\"usage\":null}}\n\n"
        ));
    }
    stream.push_str("data: {\"choices\":[],\"created\":1732600000,\"id\":\"chatcmpl-abc\",\"model\":\"gpt-4o-2024-08-06\",\"object\":\"chat.completion.chunk\",\"usage\":{\"completion_tokens\":100,\"prompt_tokens\":12,\"total_tokens\":112}}\n\ndata: [DONE]\n\n");
    // In network-sized pieces that cut events apart.
    let chunks: Vec<Bytes> = stream
        .as_bytes()
        .chunks(1400)
        .map(Bytes::copy_from_slice)
        .collect();
    for strip in [false, true] {
        c.bench_function(
            &format!("sse_usage/100_tokens{}", if strip { "_strip" } else { "" }),
            |b| {
                b.iter(|| {
                    let mut tap = Tap::new(Some("text/event-stream"), strip).unwrap();
                    for ch in &chunks {
                        black_box(tap.feed(ch.clone()));
                    }
                    let (_, usage) = tap.finish();
                    assert_eq!(usage.unwrap().total_tokens, 112);
                })
            },
        );
    }
    // A streamed chat request without `stream_options`, as the SDKs send it: the gateway asks
    // for the usage chunk when the consumer has token limits.
    let request = br#"{"messages":[{"role":"system","content":"You are a concise assistant."},{"role":"user","content":"Say something about load balancing across regions."}],"model":"gpt-4o","max_tokens":256,"temperature":0.7,"stream":true}"#;
    c.bench_function("usage/request_usage_chunk", |b| {
        b.iter(|| black_box(switchyard::usage::request_usage_chunk(black_box(request))).unwrap())
    });
    let plain = Bytes::from_static(br#"{"id":"chatcmpl-abc","object":"chat.completion","created":1732600000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#);
    c.bench_function("usage/plain_json", |b| {
        b.iter(|| {
            let mut tap = Tap::new(Some("application/json"), false).unwrap();
            black_box(tap.feed(plain.clone()));
            let (_, usage) = tap.finish();
            assert_eq!(usage.unwrap().total_tokens, 21);
        })
    });
}

fn estimate(c: &mut Criterion) {
    switchyard::limits::estimate::warm_up();
    let short = br#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"max_tokens":50}"#;
    let long = serde_json::json!({
        "messages": [{"role": "user", "content": "lorem ipsum dolor sit amet ".repeat(400)}],
        "max_tokens": 200,
    })
    .to_string();
    c.bench_function("estimate/short_chat", |b| {
        b.iter(|| {
            black_box(switchyard::limits::estimate::estimate(
                black_box(short),
                "gpt-4o",
                500,
            ))
        })
    });
    c.bench_function("estimate/2k_token_chat", |b| {
        b.iter(|| {
            black_box(switchyard::limits::estimate::estimate(
                black_box(long.as_bytes()),
                "gpt-4o",
                500,
            ))
        })
    });
}

fn hints(c: &mut Criterion) {
    let now = SystemTime::now();
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("retry_after_ms", &[("retry-after-ms", "1500")]),
        ("retry_after_seconds", &[("retry-after", "12")]),
        (
            "retry_after_date",
            &[("retry-after", "Thu, 26 Nov 2026 06:30:00 GMT")],
        ),
        (
            "ratelimit_reset",
            &[
                ("x-ratelimit-reset-tokens", "6s"),
                ("x-ratelimit-reset-requests", "1m30s"),
            ],
        ),
    ];
    for (name, headers) in cases {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h.insert("content-type", HeaderValue::from_static("application/json"));
        c.bench_function(&format!("retry_hint/{name}"), |b| {
            b.iter(|| black_box(retry_hint(black_box(&h), now)))
        });
    }
}

criterion_group! {
    name = benches;
    // Short runs: the whole set takes about a minute.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = pick, header_rewrite, sse_usage, estimate, hints
}
criterion_main!(benches);
