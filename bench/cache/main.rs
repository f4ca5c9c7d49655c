//! Prompt-cache benchmark: how much of a conversation's prompt the backends serve from their
//! prompt cache when the gateway spreads it over three instances, with and without
//! `routing.affinity_key`. Loopback only, bounded in count.
//!
//!     cargo run --release --example cache
//!
//! Three simulated instances, each with a prompt cache of its own (prefixes of 1,024 tokens and
//! up, in blocks of 128, as Azure's). 50 conversations of 10 turns, 10 conversations at a time:
//! each turn sends the conversation so far (a system prompt of about 1,200 tokens, then every
//! earlier question and answer) as a chat completion with the conversation's
//! `prompt_cache_key`, as the OpenAI SDKs let a client set it. Each row starts three fresh
//! instances. The last row sends every conversation to one instance: the most that can be
//! cached. Writes `bench/results/cache-<date>.md`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark fails loudly and prints its tables"
)]

#[path = "../common.rs"]
mod common;
use common::today;

use std::time::Instant;

use futures_util::StreamExt;
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::sim::{SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

const CONVERSATIONS: usize = 50;
const TURNS: usize = 10;
const AT_ONCE: usize = 10;

#[derive(Default, Clone, Copy)]
struct Totals {
    prompt: u64,
    cached: u64,
    /// Turns after the first, and those of them that found part of their prompt cached.
    later_turns: u64,
    later_hits: u64,
    failed: u64,
}

#[tokio::main]
async fn main() {
    switchyard::install_crypto_provider();
    let client = reqwest::Client::new();
    let mut out = String::from(
        "| strategy | routing.affinity_key | requests | failed | prompt tokens | served from cache | turns 2–10 with a cache hit | run s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut rows = Vec::new();
    for strategy in switchyard::config::Strategy::ALL.map(|s| s.as_str()) {
        for key in [None, Some("[\"body:prompt_cache_key\"]")] {
            rows.push((strategy.to_string(), key, 3));
        }
    }
    rows.push(("one instance".to_string(), None, 1));
    for (strategy, key, instances) in rows {
        let started = Instant::now();
        let t = run(&client, &strategy, key, instances).await;
        let row = format!(
            "| {strategy} | {} | {} | {} | {} | {:.1} % | {:.1} % | {:.1} |\n",
            key.map_or("—".to_string(), |k| format!("`{k}`")),
            CONVERSATIONS * TURNS,
            t.failed,
            t.prompt,
            100.0 * t.cached as f64 / t.prompt.max(1) as f64,
            100.0 * t.later_hits as f64 / t.later_turns.max(1) as f64,
            started.elapsed().as_secs_f64()
        );
        eprint!("{row}");
        out.push_str(&row);
    }
    let date = today();
    let commit = common::commit();
    let doc = format!(
        "# Prompt-cache benchmark, {date}\n\n`cargo run --release --example cache` at commit {commit}, on {} cores.\n\n\
         Three simulated instances, each with its own prompt cache; {CONVERSATIONS} conversations of {TURNS} turns \
         ({AT_ONCE} at a time), each turn the whole conversation so far with the conversation's `prompt_cache_key`. \
         \"Served from cache\" is the share of all prompt tokens the instances reported as `cached_tokens`. \
         The last row sends everything to one instance: the most that can be cached.\n\n{out}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let path = format!("bench/results/cache-{date}.md");
    match std::fs::write(&path, &doc) {
        Ok(()) => eprintln!("\nwrote {path}"),
        Err(e) => eprintln!("\ncould not write {path}: {e}"),
    }
    println!("{doc}");
}

/// One row: fresh instances, a gateway in front, every conversation played through it.
async fn run(
    client: &reqwest::Client,
    strategy: &str,
    affinity_key: Option<&str>,
    instances: usize,
) -> Totals {
    let mut sims = Vec::new();
    for i in 0..instances {
        let cfg = SimConfig {
            name: format!("sim-{i}"),
            completion_tokens: 24,
            seed: i as u64 + 1,
            ..SimConfig::default()
        };
        sims.push(
            Simulator::start(cfg, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[routing]\nstrategy = \"{}\"\n",
        if instances == 1 {
            "round_robin"
        } else {
            strategy
        }
    );
    if let Some(k) = affinity_key {
        text.push_str(&format!("affinity_key = {k}\n"));
    }
    for s in &sims {
        text.push_str(&format!(
            "[[backends]]\nname = \"{}\"\nurl = \"{}\"\nauth = {{ type = \"none\" }}\n",
            s.name(),
            s.url()
        ));
    }
    let cfg = Config::parse(&text, &|_| None).unwrap();
    let token = CancellationToken::new();
    let gw = switchyard::server::start(cfg, token.clone()).await.unwrap();
    let url = format!(
        "http://{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        gw.addr
    );
    let totals = futures_util::stream::iter(0..CONVERSATIONS)
        .map(|c| conversation(client, &url, c))
        .buffer_unordered(AT_ONCE)
        .fold(Totals::default(), |mut acc, t| async move {
            acc.prompt += t.prompt;
            acc.cached += t.cached;
            acc.later_turns += t.later_turns;
            acc.later_hits += t.later_hits;
            acc.failed += t.failed;
            acc
        })
        .await;
    token.cancel();
    gw.wait().await;
    totals
}

/// A system prompt of about 1,200 tokens (4,800 characters), different for each conversation.
fn system_prompt(c: usize) -> String {
    let mut s = format!("You are assistant number {c}. ");
    let mut i = 0;
    while s.len() < 4_800 {
        s.push_str(&format!(
            "Rule {i} of conversation {c}: answer briefly and cite sources. "
        ));
        i += 1;
    }
    s
}

async fn conversation(client: &reqwest::Client, url: &str, c: usize) -> Totals {
    let mut t = Totals::default();
    let mut messages = vec![json!({"role": "system", "content": system_prompt(c)})];
    for turn in 0..TURNS {
        messages.push(json!({"role": "user", "content": format!("Question {turn} of conversation {c}: what next?")}));
        let body = json!({
            "messages": messages, "max_tokens": 24, "prompt_cache_key": format!("conversation-{c}")
        });
        let answer: Option<Value> = match client.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            _ => None,
        };
        let Some(answer) = answer else {
            t.failed += 1;
            continue;
        };
        let usage = &answer["usage"];
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        t.prompt += usage["prompt_tokens"].as_u64().unwrap_or(0);
        t.cached += cached;
        if turn > 0 {
            t.later_turns += 1;
            t.later_hits += u64::from(cached > 0);
        }
        messages.push(json!({
            "role": "assistant",
            "content": answer["choices"][0]["message"]["content"].clone()
        }));
    }
    t
}
