//! How many tokens a request will use, before it is sent: its prompt counted with the model
//! family's tokenizer (tiktoken's o200k for the GPT-4o/4.1/5 and o-series families, cl100k for
//! GPT-4, GPT-3.5 and the embedding models), plus the completion it may produce (`max_tokens`,
//! `max_completion_tokens` or `max_output_tokens`, else a configured allowance).

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// Tokens an image in a prompt is charged at, as APIM's token policies estimate it.
const IMAGE_TOKENS: u64 = 1200;
/// Per-message framing tokens in the chat format, and the reply's priming.
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

fn tokenizer(deployment: &str) -> &'static CoreBPE {
    let d = deployment.to_ascii_lowercase();
    let older = (d.contains("gpt-4") && !d.contains("gpt-4o") && !d.contains("gpt-4.1"))
        || d.contains("gpt-35")
        || d.contains("gpt-3.5")
        || d.contains("embedding");
    if older {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

/// Loads both tokenizers (about 0.2 s), so the first limited request does not pay for it.
pub fn warm_up() {
    let _ = tiktoken_rs::o200k_base_singleton();
    let _ = tiktoken_rs::cl100k_base_singleton();
}

fn count(bpe: &CoreBPE, text: &str) -> u64 {
    bpe.encode_with_special_tokens(text).len() as u64
}

fn content_tokens(bpe: &CoreBPE, v: &Value) -> u64 {
    match v {
        Value::String(s) => count(bpe, s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => count(bpe, s),
                Value::Object(o) => match o.get("type").and_then(Value::as_str) {
                    Some("image_url" | "input_image" | "image") => IMAGE_TOKENS,
                    _ => o
                        .get("text")
                        .and_then(Value::as_str)
                        .map_or(0, |t| count(bpe, t)),
                },
                // Token arrays (embeddings, completions) are already tokens.
                Value::Array(tokens) => tokens.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// (prompt tokens, completion allowance) for a JSON request body; `None` if it is not JSON.
pub fn estimate(body: &[u8], deployment: &str, completion_default: u64) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let bpe = tokenizer(deployment);
    let prompt = if let Some(messages) = v.get("messages").and_then(Value::as_array) {
        REPLY_PRIMING
            + messages
                .iter()
                .map(|m| {
                    PER_MESSAGE
                        + m.get("content").map_or(0, |c| content_tokens(bpe, c))
                        + m.get("name")
                            .and_then(Value::as_str)
                            .map_or(0, |n| count(bpe, n))
                })
                .sum::<u64>()
    } else if let Some(p) = v.get("prompt") {
        content_tokens(bpe, p)
    } else if let Some(i) = v.get("input") {
        content_tokens(bpe, i)
    } else {
        0
    };
    let is_embedding = v.get("input").is_some()
        && v.get("messages").is_none()
        && v.get("max_output_tokens").is_none();
    let completion = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_u64))
        .unwrap_or(if is_embedding { 0 } else { completion_default });
    let n = v
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128);
    Some((prompt, completion.saturating_mul(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_chat_prompts_with_the_models_tokenizer() {
        let body = br#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Hello, world!"}],"max_tokens":50}"#;
        let (prompt, completion) = estimate(body, "gpt-4o", 1000).unwrap();
        // o200k: "You are a helpful assistant." = 6, "Hello, world!" = 4; 2 x 3 framing + 3.
        assert_eq!(prompt, 6 + 4 + 2 * 3 + 3);
        assert_eq!(completion, 50);
        let (old, _) = estimate(body, "gpt-35-turbo", 1000).unwrap();
        assert_eq!(old, 6 + 4 + 2 * 3 + 3, "the same here with cl100k");
    }

    #[test]
    fn images_defaults_embeddings_and_n() {
        let body = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"What is this?"},{"type":"image_url","image_url":{"url":"data:..."}}]}],"n":2}"#;
        let (prompt, completion) = estimate(body, "gpt-4o", 300).unwrap();
        assert!(
            prompt > IMAGE_TOKENS && prompt < IMAGE_TOKENS + 20,
            "{prompt}"
        );
        assert_eq!(
            completion, 600,
            "the default allowance, for each of n choices"
        );
        let (prompt, completion) = estimate(
            br#"{"input":["one two three","four"]}"#,
            "text-embedding-3-small",
            300,
        )
        .unwrap();
        assert_eq!((prompt, completion), (4, 0));
        assert!(estimate(b"not json", "gpt-4o", 1).is_none());
    }
}
