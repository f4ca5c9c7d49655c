//! Stateful APIs behind the balancer: files, batches and Responses conversations made through
//! the gateway stay on the simulated instance that holds them, under every strategy, with the
//! `async-openai` client pointed at the gateway's `/openai/v1` (Azure's v1 API).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::result_large_err,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly by design, and print what they measured"
)]

#[path = "../common/mod.rs"]
mod common;
mod sharing;

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::batches::{BatchCompletionWindow, BatchEndpoint, BatchRequest};
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
use async_openai::types::responses::{CreateResponse, OutputItem, ResponseStreamEvent};
use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use switchyard::sim::{SimConfig, Simulator};

fn stateful_sim(name: &str) -> SimConfig {
    SimConfig {
        object_delay: Duration::from_millis(200),
        ..sim(name)
    }
}

async fn three_sims() -> (Vec<Simulator>, Vec<B>) {
    let mut sims = Vec::new();
    for n in ["east", "west", "north"] {
        sims.push(start_sim(stateful_sim(n)).await);
    }
    let backends = sims.iter().map(B::sim).collect();
    (sims, backends)
}

fn sdk(gw: &Running, key: &str) -> Client<OpenAIConfig> {
    switchyard::install_crypto_provider();
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(gw.url("/openai/v1"))
            .with_api_key(key),
    )
}

fn response_request(v: Value) -> CreateResponse {
    serde_json::from_value(v).unwrap()
}

/// How many of the simulators hold `id`, asked directly (not through the gateway).
async fn holders(sims: &[Simulator], collection: &str, id: &str) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for s in sims {
        let r = http
            .get(format!("{}/openai/v1/{collection}/{id}", s.url()))
            .header("api-key", format!("key-{}", s.name()))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            out.push(s.name().to_string());
        }
    }
    out
}

/// Requests each simulator received whose path contains `needle`.
fn hits(sims: &[Simulator], needle: &str) -> Vec<usize> {
    sims.iter()
        .map(|s| {
            s.requests()
                .iter()
                .filter(|r| r.path_and_query.contains(needle))
                .count()
        })
        .collect()
}

const BATCH_INPUT: &str = concat!(
    r#"{"custom_id":"one","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"first"}]}}"#,
    "\n",
    r#"{"custom_id":"two","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"second"}]}}"#,
    "\n"
);

/// Upload, read back, batch, and the batch's output, each call through the next of `clients`
/// (two replicas, or the same gateway twice).
async fn files_and_batch(clients: &[Client<OpenAIConfig>], sims: &[Simulator]) {
    let mut turn = 0;
    let mut next = || {
        turn += 1;
        &clients[turn % clients.len()]
    };
    let file_id = upload(next()).await;
    assert_eq!(holders(sims, "files", &file_id).await.len(), 1);
    for _ in 0..4 {
        assert_eq!(next().files().retrieve(&file_id).await.unwrap().id, file_id);
    }
    let content = next().files().content(&file_id).await.unwrap();
    assert_eq!(content, BATCH_INPUT.as_bytes());

    let batch = next()
        .batches()
        .create(BatchRequest {
            input_file_id: file_id.clone(),
            endpoint: BatchEndpoint::V1ChatCompletions,
            completion_window: BatchCompletionWindow::W24H,
            metadata: None,
            output_expires_after: None,
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let output = loop {
        let b = next().batches().retrieve(&batch.id).await.unwrap();
        if let Some(out) = b.output_file_id {
            break out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the batch never completed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines = next().files().content(&output).await.unwrap();
    let lines: Vec<Value> = std::str::from_utf8(&lines)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["custom_id"], "two");
    assert_eq!(lines[0]["response"]["status_code"], 200);
    // The file, its batch and the batch's output are all on one instance.
    let owner = holders(sims, "files", &file_id).await;
    assert_eq!(holders(sims, "batches", &batch.id).await, owner);
    assert_eq!(holders(sims, "files", &output).await, owner);
}

/// Three turns chained by `previous_response_id`, plain or streamed; returns the first id.
async fn chained(clients: &[Client<OpenAIConfig>], stream: bool) -> String {
    let mut previous: Option<String> = None;
    let mut first = None;
    for turn in 0..3 {
        let client = &clients[turn % clients.len()];
        let mut req = json!({"model": "gpt-4o", "input": format!("turn {turn}: tell me more")});
        if let Some(p) = &previous {
            req["previous_response_id"] = json!(p);
        }
        let id = if stream {
            req["stream"] = json!(true);
            let mut events = client
                .responses()
                .create_stream(response_request(req))
                .await
                .unwrap();
            let (mut created, mut completed) = (None, None);
            while let Some(e) = events.next().await {
                match e.unwrap() {
                    ResponseStreamEvent::ResponseCreated(c) => created = Some(c.response.id),
                    ResponseStreamEvent::ResponseCompleted(c) => {
                        let usage = c.response.usage.unwrap();
                        assert!(usage.input_tokens > 0 && usage.output_tokens > 0);
                        completed = Some(c.response.id);
                    }
                    _ => {}
                }
            }
            assert_eq!(created, completed);
            completed.unwrap()
        } else {
            let r = client
                .responses()
                .create(response_request(req))
                .await
                .unwrap();
            assert_eq!(r.previous_response_id, previous);
            r.id
        };
        first.get_or_insert_with(|| id.clone());
        previous = Some(id);
    }
    first.unwrap()
}

/// A conversation that keeps no state on the server (`store: false`), sending back each
/// answer's output, encrypted reasoning included, as Codex and the Agents SDK do.
async fn stateless_with_reasoning(clients: &[Client<OpenAIConfig>]) {
    let mut input: Vec<Value> = Vec::new();
    for turn in 0..3 {
        let client = &clients[turn % clients.len()];
        input.push(json!({"role": "user", "content": format!("turn {turn}")}));
        let r = client
            .responses()
            .create(response_request(json!({
                "model": "gpt-4o", "store": false, "input": input,
                "include": ["reasoning.encrypted_content"]
            })))
            .await
            .unwrap();
        let reasoning = r
            .output
            .iter()
            .filter(|o| matches!(o, OutputItem::Reasoning(_)))
            .count();
        assert_eq!(reasoning, 1);
        let raw = serde_json::to_value(&r).unwrap();
        for item in raw["output"].as_array().unwrap() {
            input.push(item.clone());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_objects_stay_with_their_instance_under_every_strategy() {
    let (sims, backends) = three_sims().await;
    for strategy in switchyard::config::Strategy::ALL.map(|s| s.as_str()) {
        let gw = gateway(&backends, &format!("strategy = \"{strategy}\""), "").await;
        let client = sdk(&gw, "unused");
        let clients = [client.clone()];
        files_and_batch(&clients, &sims).await;
        let first = chained(&clients, false).await;
        chained(&clients, true).await;
        stateless_with_reasoning(&clients).await;

        // Retrieve, list its input, delete, and it is gone, from the one instance holding it.
        assert_eq!(client.responses().retrieve(&first).await.unwrap().id, first);
        let http = reqwest::Client::new();
        let items: Value = http
            .get(gw.url(&format!("/openai/v1/responses/{first}/input_items")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(items["data"].as_array().unwrap().len(), 1, "{items}");
        assert_eq!(holders(&sims, "responses", &first).await.len(), 1);
        client.responses().delete(&first).await.unwrap();
        assert!(holders(&sims, "responses", &first).await.is_empty());
        let gone = http
            .get(gw.url(&format!("/openai/v1/responses/{first}")))
            .send()
            .await
            .unwrap();
        assert_eq!(gone.status(), 404, "{strategy}");
        gw.stop().await;
    }
    // The work was spread: every instance made objects of its own.
    for s in &sims {
        assert!(
            s.requests().iter().any(|r| r.method == "POST"),
            "{} took no part",
            s.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_made_before_a_restart_are_found_once_then_sent_straight_there() {
    let (sims, backends) = three_sims().await;
    let gw = gateway(&backends, "", "").await;
    let client = sdk(&gw, "unused");
    let file_id = upload(&client).await;
    let response = client
        .responses()
        .create(response_request(
            json!({"model": "gpt-4o", "input": "hello"}),
        ))
        .await
        .unwrap();
    gw.stop().await;

    // A new gateway with the memory store knows no owner.
    let gw = gateway(&backends, "", "").await;
    let client = sdk(&gw, "unused");
    let before = hits(&sims, &file_id);
    assert_eq!(client.files().retrieve(&file_id).await.unwrap().id, file_id);
    let searched: usize = hits(&sims, &file_id)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .sum();
    assert!((1..=3).contains(&searched), "{searched}");
    let before = hits(&sims, &file_id);
    for _ in 0..3 {
        client.files().retrieve(&file_id).await.unwrap();
    }
    let after = hits(&sims, &file_id);
    let grew: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(grew.iter().filter(|n| **n > 0).count(), 1, "{grew:?}");
    assert_eq!(grew.iter().sum::<usize>(), 3, "{grew:?}");

    // A follow-up to a response made before the restart finds it (a 400 "not found" from the
    // others is not the client's answer), and a missing id is a 404 once every one was asked.
    let next = client
        .responses()
        .create(response_request(json!({
            "model": "gpt-4o", "input": "and then?", "previous_response_id": response.id
        })))
        .await
        .unwrap();
    assert_eq!(
        next.previous_response_id.as_deref(),
        Some(response.id.as_str())
    );
    let missing = reqwest::get(gw.url("/openai/v1/files/file-doesnotexist"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(hits(&sims, "file-doesnotexist"), [1, 1, 1]);
    let metrics = metrics_text(&reqwest::Client::new(), &gw.admin).await;
    assert!(
        metrics.contains("switchyard_owner_searches_total{reason=\"not_found\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_owner_is_waited_for_not_replaced() {
    let (sims, backends) = three_sims().await;
    let gw = gateway(&backends, "", "").await;
    let http = reqwest::Client::new();
    let id = new_response(&http, &gw).await;
    let owner = &sims[sims
        .iter()
        .position(|s| s.requests().iter().any(|r| r.method == "POST"))
        .unwrap()];
    owner
        .set_faults(switchyard::sim::Faults {
            error_rate: 1.0,
            error_status: 429,
            retry_after_ms: Some(20_000),
            ..Default::default()
        })
        .await;
    let before = hits(&sims, &id);
    for _ in 0..2 {
        let r = http
            .get(gw.url(&format!("/openai/v1/responses/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
        assert!(r.headers().contains_key("retry-after-ms"));
        let body: Value = r.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(owner.name()), "{message}");
    }
    // Only the owner was asked, once: the second answer came from its cooldown.
    let grew: Vec<usize> = hits(&sims, &id)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(grew.iter().sum::<usize>(), 1, "{grew:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_see_only_their_own_objects() {
    let (_sims, backends) = three_sims().await;
    let gw = gateway_with(
        &backends,
        "",
        "",
        "\n[[consumers]]\nname = \"team-a\"\nkey = \"key-a-0123456789abcdef\"\n\n[[consumers]]\nname = \"team-b\"\nkey = \"key-b-0123456789abcdef\"\ntokens_per_minute = 100000\n",
    )
    .await;
    let a = sdk(&gw, "key-a-0123456789abcdef");
    let file_id = upload(&a).await;
    assert_eq!(a.files().retrieve(&file_id).await.unwrap().id, file_id);
    let http = reqwest::Client::new();
    let get = |id: String, key: &'static str| {
        let http = http.clone();
        let url = gw.url(&format!("/openai/v1/files/{id}"));
        async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    // Lists hold every backend's objects, the caller's only.
    let mut a_files = vec![file_id.clone()];
    for _ in 0..2 {
        a_files.push(upload(&a).await);
    }
    let b_file = upload(&sdk(&gw, "key-b-0123456789abcdef")).await;
    let mut listed: Vec<String> = a
        .files()
        .list()
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|f| f.id)
        .collect();
    listed.sort();
    a_files.sort();
    assert_eq!(listed, a_files);
    let b_listed = sdk(&gw, "key-b-0123456789abcdef")
        .files()
        .list()
        .await
        .unwrap()
        .data;
    assert_eq!(b_listed.len(), 1);
    assert_eq!(b_listed[0].id, b_file);

    let (status, theirs) = get(file_id.clone(), "key-b-0123456789abcdef").await;
    let (missing_status, missing) = get("file-nothere".into(), "key-b-0123456789abcdef").await;
    assert_eq!(status, 404);
    assert_eq!(missing_status, 404);
    assert_eq!(theirs["error"]["code"], missing["error"]["code"]);
    assert_eq!(theirs["error"]["type"], missing["error"]["type"]);
    // Nor can it be named in a body.
    let b = sdk(&gw, "key-b-0123456789abcdef");
    let err = b
        .batches()
        .create(BatchRequest {
            input_file_id: file_id.clone(),
            endpoint: BatchEndpoint::V1ChatCompletions,
            completion_window: BatchCompletionWindow::W24H,
            metadata: None,
            output_expires_after: None,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No object"), "{err}");
    // Nor hidden behind escapes in the key's name, or percent-encoding in the path.
    let escaped = format!(
        r#"{{"input\u005ffile_id":"{file_id}","endpoint":"/v1/chat/completions","completion_window":"24h"}}"#
    );
    let r = http
        .post(gw.url("/openai/v1/batches"))
        .bearer_auth("key-b-0123456789abcdef")
        .header("content-type", "application/json")
        .body(escaped)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let encoded = file_id.replacen("file", "%66ile", 1);
    let (status, _) = get(encoded, "key-b-0123456789abcdef").await;
    assert_eq!(status, 404);

    // A consumer with token limits streams a Responses call: the request goes out without
    // `stream_options.include_usage` (the simulator refuses it, as Azure does) and its usage
    // is counted.
    let mut events = b
        .responses()
        .create_stream(response_request(
            json!({"model": "gpt-4o", "input": "count me", "stream": true}),
        ))
        .await
        .unwrap();
    let mut completed = false;
    while let Some(e) = events.next().await {
        completed |= matches!(e.unwrap(), ResponseStreamEvent::ResponseCompleted(_));
    }
    assert!(completed);
    let metrics = metrics_text(&reqwest::Client::new(), &gw.admin).await;
    let counted = metrics.lines().any(|l| {
        l.starts_with("switchyard_tokens_total{")
            && l.contains("consumer=\"team-b\"")
            && l.contains("kind=\"completion\"")
            && !l.ends_with(" 0")
    });
    assert!(counted, "{metrics}");
    gw.stop().await;
}

async fn upload(client: &Client<OpenAIConfig>) -> String {
    client
        .files()
        .create(CreateFileRequest {
            file: FileInput::from_vec_u8("f.jsonl".into(), BATCH_INPUT.as_bytes().to_vec()),
            purpose: FilePurpose::Batch,
            expires_after: None,
        })
        .await
        .unwrap()
        .id
}

/// `GET /openai/v1/files` and `/batches` page through every backend's objects as one list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_merge_every_backend_and_page_across_them() {
    let (sims, backends) = three_sims().await;
    let gw = gateway(&backends, "", "").await;
    let client = sdk(&gw, "unused");
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(upload(&client).await);
    }
    for s in &sims {
        assert!(
            s.requests().iter().any(|r| r.method == "POST"),
            "{} holds none",
            s.name()
        );
    }
    let http = reqwest::Client::new();
    for base in ["/openai/v1/files", "/v1/files", "/openai/files"] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{}?limit=2&api-version=2025-04-01-preview", gw.url(base));
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let page: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            let data = page["data"].as_array().unwrap();
            assert!(data.len() <= 2, "{page}");
            seen.extend(data.iter().map(|f| f["id"].as_str().unwrap().to_string()));
            if page["has_more"] != true {
                break;
            }
            after = page["last_id"].as_str().map(str::to_string);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 5, "{base}: {seen:?}");
        let mut want = made.clone();
        want.sort();
        assert_eq!(sorted, want);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_two_backends_in_one_request_are_refused() {
    let (sims, backends) = three_sims().await;
    let gw = gateway(&backends, "", "").await;
    let http = reqwest::Client::new();
    // Round robin puts two responses on two instances.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v: Value = http
            .post(gw.url("/openai/v1/responses"))
            .json(&json!({"model": "gpt-4o", "input": "hi"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    assert_ne!(
        holders(&sims, "responses", &ids[0]).await,
        holders(&sims, "responses", &ids[1]).await
    );
    let r = http
        .post(gw.url("/openai/v1/responses"))
        .json(&json!({"model": "gpt-4o", "previous_response_id": ids[0],
            "input": "both", "conversation": ids[1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "objects_on_different_backends");
    gw.stop().await;
}

/// A response made through the gateway (on whichever instance it chose); its id.
async fn new_response(http: &reqwest::Client, gw: &Running) -> String {
    let made: Value = http
        .post(gw.url("/openai/v1/responses"))
        .json(&json!({"model": "gpt-4o", "input": "hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    made["id"].as_str().unwrap().to_string()
}

async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}
