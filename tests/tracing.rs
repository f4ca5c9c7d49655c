//! OpenTelemetry tracing: the caller's `traceparent` is continued, each attempt's span is the
//! parent the backend sees, and the spans reach an OTLP/HTTP collector with the GenAI
//! semantic-convention attributes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A stand-in OTLP/HTTP collector: keeps every span posted to `/v1/traces` (JSON encoding).
async fn collector() -> (
    String,
    Arc<Mutex<Vec<Value>>>,
    Arc<Mutex<Vec<http::HeaderMap>>>,
) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let headers = Arc::new(Mutex::new(Vec::new()));
    let (s, h) = (spans.clone(), headers.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (s, h) = (s.clone(), h.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (s, h) = (s.clone(), h.clone());
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/json");
                        h.lock().unwrap().push(req.headers().clone());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        for rs in v["resourceSpans"].as_array().unwrap() {
                            let service = &rs["resource"]["attributes"][0];
                            assert_eq!(service["key"], "service.name");
                            for ss in rs["scopeSpans"].as_array().unwrap() {
                                for span in ss["spans"].as_array().unwrap() {
                                    let mut span = span.clone();
                                    span["service"] = service["value"]["stringValue"].clone();
                                    s.lock().unwrap().push(span);
                                }
                            }
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            switchyard::body::full("{}"),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, spans, headers)
}

fn attrs(span: &Value) -> HashMap<String, Value> {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let v = &a["value"];
            let v = v
                .get("stringValue")
                .or_else(|| v.get("intValue"))
                .or_else(|| v.get("doubleValue"))
                .cloned()
                .unwrap();
            (a["key"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

async fn spans_of(spans: &Arc<Mutex<Vec<Value>>>, trace: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<Value> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == trace)
            .cloned()
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} spans of {trace} never arrived: {got:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tracing_section(collector: &str, extra: &str) -> String {
    format!(
        "\n[tracing]\notlp_endpoint = \"{collector}\"\nservice_name = \"gateway-under-test\"\nexport_interval = \"50ms\"\n{extra}"
    )
}

#[tokio::test]
async fn a_failed_over_request_is_one_trace_continued_from_the_caller() {
    let (url, spans, headers) = collector().await;
    let good = start_sim(sim("good")).await;
    let gw = gateway_with(
        &[B::dead("dead"), B::sim(&good)],
        "",
        "",
        &tracing_section(
            &url,
            "headers = { \"x-collector-key\" = \"collector-secret-1234\" }",
        ),
    )
    .await;
    let client = client();
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = client
        .post(gw.url(CHAT))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .header("tracestate", "vendor=opaque")
        .body(
            serde_json::json!({
                "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 8, "temperature": 0.5,
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    let usage = r.json_value().await["usage"].clone();

    // The backend was called as a child of the gateway's second attempt, in the caller's trace.
    let seen = good.requests();
    let tp = seen[0].headers["traceparent"].to_str().unwrap().to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], caller_trace, "{tp}");
    assert_ne!(
        parts[2], caller_span,
        "the gateway's own span is the backend's parent"
    );
    assert_eq!(parts[3], "01");
    assert_eq!(seen[0].headers["tracestate"], "vendor=opaque");

    let got = spans_of(&spans, caller_trace, 3).await;
    let server: Vec<&Value> = got.iter().filter(|s| s["kind"] == 2).collect();
    let client_spans: Vec<&Value> = got.iter().filter(|s| s["kind"] == 3).collect();
    assert_eq!((server.len(), client_spans.len()), (1, 2), "{got:#?}");
    let req = server[0];
    assert_eq!(req["parentSpanId"], caller_span);
    assert_eq!(req["name"], "chat gpt-4o");
    assert_eq!(req["service"], "gateway-under-test");
    let a = attrs(req);
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.provider.name"], "azure.ai.openai");
    assert_eq!(a["gen_ai.request.model"], "gpt-4o");
    assert_eq!(a["gen_ai.request.max_tokens"], "8");
    assert_eq!(a["gen_ai.request.temperature"], 0.5);
    assert_eq!(
        a["gen_ai.usage.input_tokens"],
        usage["prompt_tokens"].to_string()
    );
    assert_eq!(
        a["gen_ai.usage.output_tokens"],
        usage["completion_tokens"].to_string()
    );
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["switchyard.backend"], "good");
    assert_eq!(a["switchyard.attempts"], "2");
    assert_eq!(req["status"]["code"], 0);

    let mut attempts: Vec<(String, HashMap<String, Value>, &Value)> = client_spans
        .iter()
        .map(|s| (s["spanId"].as_str().unwrap().to_string(), attrs(s), *s))
        .collect();
    attempts.sort_by_key(|(_, a, _)| a["switchyard.attempt"].as_str().unwrap().to_string());
    let (first_id, first, first_span) = &attempts[0];
    let (second_id, second, second_span) = &attempts[1];
    for s in [first_span, second_span] {
        assert_eq!(s["parentSpanId"], req["spanId"]);
        assert_eq!(s["name"], "chat gpt-4o");
    }
    assert_ne!(first_id, second_id);
    assert_eq!(first["switchyard.backend"], "dead");
    assert_eq!(first["error.type"], "backend_connect_error");
    assert_eq!(first_span["status"]["code"], 2);
    assert_eq!(second["switchyard.backend"], "good");
    assert_eq!(second["http.response.status_code"], "200");
    assert_eq!(second["server.address"], "127.0.0.1");
    assert_eq!(
        second["server.port"],
        addr_of(&good.url()).port().to_string()
    );
    assert_eq!(
        parts[2], second_id,
        "the backend's parent is the attempt span"
    );
    // Spans start no earlier than their parent and end no later than it.
    let n = |s: &Value, k: &str| s[k].as_str().unwrap().parse::<u128>().unwrap();
    assert!(n(first_span, "startTimeUnixNano") >= n(req, "startTimeUnixNano"));
    assert!(n(second_span, "endTimeUnixNano") <= n(req, "endTimeUnixNano"));

    // The collector's key went with the export, and nowhere else.
    assert_eq!(
        headers.lock().unwrap()[0]["x-collector-key"],
        "collector-secret-1234"
    );
    let config = client
        .get(format!("{}/admin/config", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!config.contains("collector-secret"), "{config}");
    assert!(config.contains("x-collector-key"), "{config}");
    gw.stop().await;
}

#[tokio::test]
async fn a_new_trace_is_started_and_streams_are_spanned_to_their_end() {
    let (url, spans, _) = collector().await;
    let (url_b, mut streams, _server) = manual_stream_backend().await;
    let gw = gateway_with(&[B::url("live", url_b)], "", "", &tracing_section(&url, "")).await;
    let client = client();
    let resp = send_chat(&client, &gw.base, true).await;
    let tx = streams.recv().await.unwrap();
    tx.send(Ok(bytes::Bytes::from_static(b"data: {\"n\":1}\n\n")))
        .await
        .unwrap();
    // Hold the stream open a while: the request span must cover it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    tx.send(Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n")))
        .await
        .unwrap();
    drop(tx);
    let _ = resp.text().await.unwrap();

    let all = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = spans.lock().unwrap().clone();
            if s.len() >= 2 {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "no spans: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let req = all.iter().find(|s| s["kind"] == 2).unwrap();
    assert!(req.get("parentSpanId").is_none(), "a root span: {req}");
    assert_eq!(req["traceId"].as_str().unwrap().len(), 32);
    let n = |s: &Value, k: &str| s[k].as_str().unwrap().parse::<u128>().unwrap();
    let long = n(req, "endTimeUnixNano") - n(req, "startTimeUnixNano");
    assert!(
        long >= 150_000_000,
        "the span ends with the stream: {long} ns"
    );
    gw.stop().await;
}

#[tokio::test]
async fn unsampled_callers_are_not_recorded_but_still_propagated() {
    let (url, spans, _) = collector().await;
    let good = start_sim(sim("good")).await;
    // Nothing of its own is sampled either.
    let gw = gateway_with(
        &[B::sim(&good)],
        "",
        "",
        &tracing_section(&url, "sample_ratio = 0.0"),
    )
    .await;
    let client = client();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let r = client
        .post(gw.url(CHAT))
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-00"))
        .body(chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r2 = post_chat(&client, &gw.base).await;
    assert_eq!(r2.status(), 200);
    let seen = good.requests();
    let tp = seen[0].headers["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    assert!(
        seen[1].headers["traceparent"]
            .to_str()
            .unwrap()
            .ends_with("-00")
    );
    gw.stop().await;
    assert!(spans.lock().unwrap().is_empty(), "nothing was sampled");
}

/// A stand-in OTLP/HTTP collector for metrics: keeps every payload posted to `/v1/metrics`
/// (JSON encoding), with its headers.
async fn metrics_collector() -> (String, Arc<Mutex<Vec<(http::HeaderMap, Value)>>>) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let posts = Arc::new(Mutex::new(Vec::new()));
    let p = posts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let p = p.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let p = p.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/metrics");
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        p.lock().unwrap().push((headers, v));
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            switchyard::body::full("{}"),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, posts)
}

/// A number as OTLP's JSON encoding gives it: 64-bit integers as strings.
fn number(v: &Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0.0)
}

/// The data points of metric `name` in a payload, with their attributes.
fn points(payload: &Value, name: &str) -> Vec<(HashMap<String, Value>, Value)> {
    let mut out = Vec::new();
    for rm in payload["resourceMetrics"].as_array().unwrap() {
        for sm in rm["scopeMetrics"].as_array().unwrap() {
            for m in sm["metrics"].as_array().unwrap() {
                if m["name"] != name {
                    continue;
                }
                let data = m.get("histogram").or_else(|| m.get("sum")).unwrap();
                for p in data["dataPoints"].as_array().unwrap() {
                    out.push((attrs(p), p.clone()));
                }
            }
        }
    }
    out
}

/// `[metrics]`: the GenAI client metrics, the cost and the tokens by kind reach an OTLP
/// collector, with the collector's header, and add up to what the answers said; the last
/// figures are sent as the gateway stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reach_an_otlp_collector_with_the_genai_conventions() {
    let (url, posts) = metrics_collector().await;
    let s = start_sim(sim("east")).await;
    let tail = format!(
        "\n[metrics]\notlp_endpoint = \"{url}\"\nservice_name = \"gateway-under-test\"\nexport_interval = \"100ms\"\nheaders = {{ \"x-collector-key\" = \"collector-secret-1234\" }}\n\n[[deployments]]\nname = \"gpt-4o\"\nbackends = {{ east = \"gpt-4o\" }}\nprice = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}\n\n[[consumers]]\nname = \"team-a\"\nkey = \"team-a-key-0123456789\"\n"
    );
    let gw = gateway_with(&[B::sim(&s)], "", "", &tail).await;
    let client = client();
    let (mut prompt, mut completion, mut cost) = (0u64, 0u64, 0.0f64);
    for stream in [false, true, false] {
        let r = client
            .post(gw.url(CHAT))
            .header("content-type", "application/json")
            .header("api-key", "team-a-key-0123456789")
            .body(chat_body(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        if stream {
            // Usage arrives in the stream only when the client asks; the gateway reads it
            // either way, so count what a plain call of the same body reports.
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            continue;
        }
        let v: Value = serde_json::from_str(&text).unwrap();
        let (p, c) = (
            v["usage"]["prompt_tokens"].as_u64().unwrap(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        );
        prompt += p;
        completion += c;
        cost += (p as f64 * 2.5 + c as f64 * 10.0) / 1e6;
    }
    // One request the gateway refuses itself.
    let r = client.post(gw.url(CHAT)).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 401);
    gw.stop().await;

    let posts = posts.lock().unwrap();
    let (headers, last) = posts.last().expect("a metrics export");
    assert_eq!(headers["x-collector-key"], "collector-secret-1234");
    assert_eq!(headers["content-type"], "application/json");
    let service = &last["resourceMetrics"][0]["resource"]["attributes"];
    assert!(
        service.to_string().contains("gateway-under-test"),
        "{service}"
    );
    // Cumulative: the last export holds every request.
    let durations = points(last, "gen_ai.client.operation.duration");
    let count: f64 = durations.iter().map(|(_, p)| number(&p["count"])).sum();
    assert_eq!(count, 4.0, "{durations:?}");
    let refused = durations
        .iter()
        .find(|(a, _)| a.get("error.type") == Some(&Value::from("401")))
        .expect("the refused request, with its error type");
    assert_eq!(number(&refused.1["count"]), 1.0);
    let chat = durations
        .iter()
        .find(|(a, _)| a.get("error.type").is_none())
        .unwrap();
    assert_eq!(chat.0["gen_ai.operation.name"], "chat");
    assert_eq!(chat.0["gen_ai.provider.name"], "azure.ai.openai");
    assert_eq!(chat.0["gen_ai.request.model"], "gpt-4o");
    assert_eq!(chat.0["switchyard.consumer"], "team-a");

    let tokens = points(last, "gen_ai.client.token.usage");
    let of = |kind: &str| {
        tokens
            .iter()
            .filter(|(a, _)| a["gen_ai.token.type"] == kind)
            .map(|(_, p)| (number(&p["sum"]), number(&p["count"])))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    // Three answers with usage: the stream's is the same body's, so a third of the rest again.
    let (input, n) = of("input");
    assert_eq!(n, 3.0, "{tokens:?}");
    assert_eq!(input, prompt as f64 * 1.5, "{tokens:?}");
    assert_eq!(of("output").0, completion as f64 * 1.5, "{tokens:?}");
    let by_kind = points(last, "switchyard.tokens");
    let completion_kind: f64 = by_kind
        .iter()
        .filter(|(a, _)| a["kind"] == "completion")
        .map(|(_, p)| number(&p["asInt"]))
        .sum();
    assert_eq!(completion_kind, completion as f64 * 1.5);
    let spent: f64 = points(last, "switchyard.cost")
        .iter()
        .map(|(_, p)| number(&p["asDouble"]))
        .sum();
    assert!((spent - cost * 1.5).abs() < 1e-9, "{spent} {cost}");
    assert!(
        !posts
            .iter()
            .any(|(_, v)| v.to_string().contains("team-a-key")),
        "no key in the metrics"
    );
}
