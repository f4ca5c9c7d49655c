//! Response bodies shaped like Azure OpenAI's: chat completions (plain and SSE, with Azure's
//! `prompt_filter_results` and `content_filter_results`), completions and embeddings.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::rng::SplitMix64;

const WORDS: [&str; 24] = [
    "the", "gateway", "routes", "each", "request", "to", "a", "healthy", "backend", "and",
    "streams", "tokens", "back", "as", "they", "arrive", "while", "quota", "is", "shared",
    "across", "every", "region", "evenly",
];

/// What a request asks for, read from its JSON body.
#[derive(Debug, Clone)]
pub struct Ask {
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u32>,
    pub prompt_tokens: u32,
    pub model: Option<String>,
    /// Embeddings: how many inputs, and the requested dimensions.
    pub inputs: usize,
    pub dimensions: Option<usize>,
}

/// A rough token count for text (about four characters a token, as OpenAI's rule of thumb).
pub fn text_tokens(s: &str) -> u32 {
    (s.chars().count() as u32).div_ceil(4).max(1)
}

fn content_tokens(v: &Value) -> u32 {
    match v {
        Value::String(s) => text_tokens(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => text_tokens(s),
                Value::Object(o) => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map(text_tokens)
                    .unwrap_or(0),
                Value::Array(tokens) => tokens.len() as u32,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// A chat request's messages as one text, the prompt whose prefix the cache keeps.
pub fn prompt_text(body: &Value) -> String {
    let mut out = String::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match m.get("content") {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .for_each(|t| out.push_str(t)),
            _ => {}
        }
        out.push('\n');
    }
    out
}

pub fn parse_ask(op: &str, body: &Value) -> Ask {
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n.min(u32::MAX as u64) as u32);
    let prompt_tokens = match op {
        "chat/completions" => {
            let msgs = body.get("messages").and_then(Value::as_array);
            3 + msgs
                .map(|m| {
                    m.iter()
                        .map(|m| 4 + content_tokens(m.get("content").unwrap_or(&Value::Null)))
                        .sum::<u32>()
                })
                .unwrap_or(0)
        }
        "completions" => content_tokens(body.get("prompt").unwrap_or(&Value::Null)),
        _ => content_tokens(body.get("input").unwrap_or(&Value::Null)),
    };
    let inputs = match body.get("input") {
        Some(Value::Array(a)) if a.first().is_some_and(|x| !x.is_number()) => a.len(),
        Some(_) => 1,
        None => 0,
    };
    Ask {
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tokens,
        prompt_tokens: prompt_tokens.max(1),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string),
        inputs,
        dimensions: body
            .get("dimensions")
            .and_then(Value::as_u64)
            .map(|d| d as usize),
    }
}

fn filter_ok() -> Value {
    json!({
        "hate": {"filtered": false, "severity": "safe"},
        "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"},
        "violence": {"filtered": false, "severity": "safe"}
    })
}

fn prompt_filter_results() -> Value {
    json!([{ "prompt_index": 0, "content_filter_results": filter_ok() }])
}

/// The generated answer, one word per token.
pub fn words(rng: &mut SplitMix64, n: u32) -> Vec<&'static str> {
    (0..n)
        .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
        .collect()
}

/// Reasoning tokens a reasoning model spends on each answer.
pub const REASONING_TOKENS: u32 = 4;

pub struct Reply<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub words: &'a [&'static str],
    pub finish_reason: &'a str,
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, those served from the instance's prompt cache.
    pub cached_tokens: u32,
}

impl Reply<'_> {
    /// As Azure counts it: a reasoning model (`o1`, `o3`, `o4-mini`, `gpt-5` ...) spends
    /// reasoning tokens on top of the text, counted among the completion tokens; an audio model
    /// (`gpt-4o-audio-preview` ...) answers in audio, its completion tokens audio tokens.
    fn usage(&self) -> Value {
        let m = self.model.to_ascii_lowercase();
        let reasoning = if ["o1", "o3", "o4", "gpt-5"].iter().any(|p| m.starts_with(p)) {
            REASONING_TOKENS
        } else {
            0
        };
        let text = self.words.len() as u32;
        let audio = if m.contains("audio") { text } else { 0 };
        let completion = text + reasoning;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": audio}
        })
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for (i, w) in self.words.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(w);
        }
        s
    }

    pub fn chat(&self) -> Bytes {
        let v = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_switchyard_sim",
            "prompt_filter_results": prompt_filter_results(),
            "choices": [{
                "index": 0,
                "finish_reason": self.finish_reason,
                "logprobs": null,
                "message": {"role": "assistant", "content": self.text(), "refusal": null},
                "content_filter_results": filter_ok()
            }],
            "usage": self.usage()
        });
        Bytes::from(v.to_string())
    }

    pub fn completion(&self) -> Bytes {
        let v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "prompt_filter_results": prompt_filter_results(),
            "choices": [{
                "index": 0, "text": self.text(), "finish_reason": self.finish_reason,
                "logprobs": null, "content_filter_results": filter_ok()
            }],
            "usage": self.usage()
        });
        Bytes::from(v.to_string())
    }

    /// The SSE events of a streamed chat completion, `[DONE]` included.
    pub fn chat_events(&self, include_usage: bool) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.words.len() + 5);
        // Azure's first event carries only the prompt filter verdict, with empty id and model.
        out.push(event(&json!({
            "id": "", "object": "", "created": 0, "model": "",
            "choices": [], "prompt_filter_results": prompt_filter_results()
        })));
        let chunk = |delta: Value, finish: Value, filter: bool| {
            let mut choice =
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null});
            if filter {
                choice["content_filter_results"] = filter_ok();
            }
            let mut v = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": "fp_switchyard_sim", "choices": [choice]
            });
            if include_usage {
                v["usage"] = Value::Null;
            }
            event(&v)
        };
        out.push(chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
            false,
        ));
        for (i, w) in self.words.iter().enumerate() {
            let piece = if i == 0 {
                (*w).to_string()
            } else {
                format!(" {w}")
            };
            out.push(chunk(json!({"content": piece}), Value::Null, true));
        }
        out.push(chunk(json!({}), json!(self.finish_reason), true));
        if include_usage {
            out.push(event(&json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": "fp_switchyard_sim",
                "choices": [], "usage": self.usage()
            })));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }

    /// The SSE events of a streamed text completion.
    pub fn completion_events(&self) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let last = i + 1 == self.words.len();
                event(&json!({
                    "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "text": if i == 0 { (*w).to_string() } else { format!(" {w}") },
                        "finish_reason": if last { json!(self.finish_reason) } else { Value::Null }, "logprobs": null}]
                }))
            })
            .collect();
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// An embeddings answer: deterministic unit vectors, one per input.
pub fn embeddings(model: &str, ask: &Ask, rng: &mut SplitMix64) -> Bytes {
    let dims = ask.dimensions.unwrap_or(1536).clamp(1, 3072);
    let mut data = Vec::with_capacity(ask.inputs.max(1));
    for index in 0..ask.inputs.max(1) {
        let raw: Vec<f64> = (0..dims).map(|_| rng.next_f64() - 0.5).collect();
        let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
        let v: Vec<f32> = raw.iter().map(|x| (x / norm) as f32).collect();
        data.push(json!({"object": "embedding", "index": index, "embedding": v}));
    }
    Bytes::from(
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": ask.prompt_tokens, "total_tokens": ask.prompt_tokens}
        })
        .to_string(),
    )
}

/// An Azure-shaped error body.
pub fn azure_error(code: &str, message: &str) -> Bytes {
    Bytes::from(json!({"error": {"code": code, "message": message}}).to_string())
}
