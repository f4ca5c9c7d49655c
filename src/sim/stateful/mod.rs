//! The objects one simulated instance holds, and only it: files, batches and stored Responses,
//! with the answers a real instance gives for ids it does not hold (404 on a path, 400 for a
//! `previous_response_id`, an `input_file_id` or a reasoning item sealed elsewhere). Also the
//! instance's prompt cache, so `cached_tokens` shows whether a conversation stayed on one
//! instance.

mod responses_api;

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::paced::PacedBody;
use super::responses::{self, Reply, text_tokens};
use super::{SimResult, SimState, admit, json_response, pause};
use crate::body::BoxBody;
use crate::rng::SplitMix64;
use crate::sync::lock;
use responses_api::{create_response, response};

/// Prompt-cache granularity, in characters (128 tokens at four characters a token), and the
/// shortest prefix cached (1,024 tokens), as Azure's prompt caching works.
const CACHE_BLOCK: usize = 512;
const CACHE_MIN_BLOCKS: usize = 8;
/// Prefix hashes kept per instance before the cache starts over.
const CACHE_ENTRIES: usize = 200_000;
/// The paths (after `/openai/` or `/openai/v1/`) answered here.
pub(super) const FAMILIES: [&str; 3] = ["files", "batches", "responses"];

/// Everything an instance stores.
pub(super) struct Objects {
    files: HashMap<String, File>,
    batches: HashMap<String, Batch>,
    responses: HashMap<String, Stored>,
    cache: HashSet<u64>,
    /// Seals reasoning items: only this instance can open what it sealed.
    secret: [u8; 32],
}

struct File {
    meta: Value,
    content: Bytes,
}

struct Batch {
    meta: Value,
    started: Instant,
    /// The JSONL lines of its input, answered when it completes.
    lines: Vec<Value>,
    cancelled: bool,
}

struct Stored {
    response: Value,
    input_items: Vec<Value>,
    /// The conversation so far, its own output included: the prompt a follow-up extends.
    context: String,
    /// Background responses: when they were queued.
    queued: Option<Instant>,
}

impl Objects {
    pub(super) fn new(seed: u64) -> Self {
        let mut secret = [0u8; 32];
        let mut rng = SplitMix64::new(seed ^ 0x005e_ed5e_c2e7);
        for chunk in secret.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        Self {
            files: HashMap::new(),
            batches: HashMap::new(),
            responses: HashMap::new(),
            cache: HashSet::new(),
            secret,
        }
    }

    /// Tokens of `text` served from this instance's cache, and the prefixes stored for next
    /// time: whole blocks of a prefix of at least `CACHE_MIN_BLOCKS` blocks.
    pub(super) fn cached_tokens(&mut self, text: &str) -> u32 {
        let bytes = text.as_bytes();
        let blocks = bytes.len() / CACHE_BLOCK;
        if blocks < CACHE_MIN_BLOCKS {
            return 0;
        }
        if self.cache.len() > CACHE_ENTRIES {
            self.cache.clear();
        }
        let mut h = crate::fnv::Fnv::default();
        let mut hit = 0;
        for b in 0..blocks {
            h.write(&bytes[b * CACHE_BLOCK..(b + 1) * CACHE_BLOCK]);
            let key = h.finish();
            if b + 1 >= CACHE_MIN_BLOCKS && !self.cache.insert(key) {
                hit = b + 1;
            }
        }
        (hit * CACHE_BLOCK / 4) as u32
    }

    fn seal(&self, item: &str) -> String {
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret),
            item.as_bytes(),
        );
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        base64::engine::general_purpose::STANDARD.encode(format!("{item}.{hex}"))
    }

    fn opens(&self, item: &str, sealed: &str) -> bool {
        base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|s| s.starts_with(item) && self.seal(item) == sealed)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn oai_error(status: StatusCode, message: &str, param: Option<&str>, code: &str) -> SimResult {
    let body = json!({"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": code
    }});
    Ok(json_response(status, Bytes::from(body.to_string())))
}

fn not_found(what: &str, id: &str) -> SimResult {
    oai_error(
        StatusCode::NOT_FOUND,
        &format!("No such {what} object: '{id}'"),
        Some("id"),
        "not_found",
    )
}

fn ok_json(v: &Value) -> SimResult {
    Ok(json_response(StatusCode::OK, Bytes::from(v.to_string())))
}

/// A list page as the API pages: newest first, the ones after `after`, at most `limit`
/// (default `default_limit`).
fn list(mut data: Vec<Value>, query: &str, default_limit: usize) -> SimResult {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let key = |v: &Value| {
        (
            v["created_at"].as_u64().unwrap_or(0),
            v["id"].as_str().unwrap_or("").to_string(),
        )
    };
    data.sort_by_key(|v| std::cmp::Reverse(key(v)));
    if let Some(after) = param("after") {
        let at = data.iter().position(|v| v["id"] == after.as_str());
        data.drain(..at.map_or(data.len(), |i| i + 1));
    }
    let limit = param("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(default_limit);
    let has_more = data.len() > limit;
    data.truncate(limit);
    let first = data.first().and_then(|v| v.get("id")).cloned();
    let last = data.last().and_then(|v| v.get("id")).cloned();
    ok_json(&json!({
        "object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more
    }))
}

/// Answers a request about a stored object; `None` when `rest` (the path after `/openai/` or
/// `/openai/v1/`) is none of the families simulated here.
pub(super) async fn handle(
    state: &SimState,
    method: &Method,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<SimResult> {
    let segs: Vec<&str> = rest.split('/').collect();
    let r = match (method, segs.as_slice()) {
        (&Method::POST, ["files"]) => upload(state, headers, body).await,
        (&Method::GET, ["files"]) => {
            let data: Vec<Value> = lock(&state.objects)
                .files
                .values()
                .map(|f| f.meta.clone())
                .collect();
            list(data, query, 10_000)
        }
        (&Method::GET, ["files", id]) => match lock(&state.objects).files.get(*id) {
            Some(f) => ok_json(&f.meta),
            None => not_found("File", id),
        },
        (&Method::GET, ["files", id, "content"]) => match lock(&state.objects).files.get(*id) {
            Some(f) => {
                let mut r = Response::new(crate::body::full(f.content.clone()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                Ok(r)
            }
            None => not_found("File", id),
        },
        (&Method::DELETE, ["files", id]) => match lock(&state.objects).files.remove(*id) {
            Some(_) => ok_json(&json!({"id": id, "object": "file", "deleted": true})),
            None => not_found("File", id),
        },
        (&Method::POST, ["batches"]) => create_batch(state, &body),
        (&Method::GET, ["batches"]) => {
            let ids: Vec<String> = lock(&state.objects).batches.keys().cloned().collect();
            let data: Vec<Value> = ids.iter().filter_map(|id| batch(state, id)).collect();
            list(data, query, 20)
        }
        (&Method::GET, ["batches", id]) => match batch(state, id) {
            Some(b) => ok_json(&b),
            None => not_found("Batch", id),
        },
        (&Method::POST, ["batches", id, "cancel"]) => {
            if let Some(b) = lock(&state.objects).batches.get_mut(*id) {
                b.cancelled = true;
            }
            match batch(state, id) {
                Some(b) => ok_json(&b),
                None => not_found("Batch", id),
            }
        }
        (&Method::POST, ["responses"]) => create_response(state, headers, &body).await,
        (&Method::GET, ["responses", id]) => match response(state, id) {
            Some(r) => ok_json(&r),
            None => not_found("Response", id),
        },
        (&Method::DELETE, ["responses", id]) => match lock(&state.objects).responses.remove(*id) {
            Some(_) => ok_json(&json!({"id": id, "object": "response", "deleted": true})),
            None => not_found("Response", id),
        },
        (&Method::GET, ["responses", id, "input_items"]) => {
            let items = lock(&state.objects)
                .responses
                .get(*id)
                .map(|s| s.input_items.clone());
            match items {
                Some(items) => list(items, query, 20),
                None => not_found("Response", id),
            }
        }
        (&Method::POST, ["responses", id, "cancel"]) => {
            let mut objects = lock(&state.objects);
            match objects.responses.get_mut(*id) {
                Some(s) if s.queued.is_some() => {
                    if s.response["status"] == "queued" {
                        s.response["status"] = json!("cancelled");
                        s.queued = None;
                    }
                    let v = s.response.clone();
                    drop(objects);
                    ok_json(&v)
                }
                Some(_) => oai_error(
                    StatusCode::BAD_REQUEST,
                    "Only background responses can be cancelled.",
                    None,
                    "invalid_request_error",
                ),
                None => {
                    drop(objects);
                    not_found("Response", id)
                }
            }
        }
        _ => return None,
    };
    Some(r)
}

async fn upload(state: &SimState, headers: &HeaderMap, body: Bytes) -> SimResult {
    let bad = |m: &str| oai_error(StatusCode::BAD_REQUEST, m, None, "invalid_request_error");
    let Some(boundary) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
    else {
        return bad("Files are uploaded as multipart/form-data.");
    };
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut purpose, mut file) = (None, None);
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().map(str::to_string);
                let filename = field.file_name().map(str::to_string);
                let Ok(bytes) = field.bytes().await else {
                    return bad("The multipart body is malformed.");
                };
                match name.as_deref() {
                    Some("purpose") => purpose = Some(String::from_utf8_lossy(&bytes).into_owned()),
                    Some("file") => file = Some((filename.unwrap_or_else(|| "file".into()), bytes)),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(_) => return bad("The multipart body is malformed."),
        }
    }
    let (Some(purpose), Some((filename, content))) = (purpose, file) else {
        return bad("Both 'purpose' and 'file' are required.");
    };
    let id = format!("file-{}", state.ids.uuid_v4().replace('-', ""));
    let meta = json!({
        "id": id, "object": "file", "bytes": content.len(), "created_at": now_secs(),
        "filename": filename, "purpose": purpose, "status": "processed", "status_details": null
    });
    lock(&state.objects).files.insert(
        id,
        File {
            meta: meta.clone(),
            content,
        },
    );
    ok_json(&meta)
}

fn create_batch(state: &SimState, body: &[u8]) -> SimResult {
    let bad = |m: &str, p: Option<&str>| {
        oai_error(StatusCode::BAD_REQUEST, m, p, "invalid_request_error")
    };
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return bad("The request body is not valid JSON.", None);
    };
    let (Some(input), Some(endpoint)) = (
        v.get("input_file_id").and_then(Value::as_str),
        v.get("endpoint").and_then(Value::as_str),
    ) else {
        return bad("'input_file_id' and 'endpoint' are required.", None);
    };
    let mut objects = lock(&state.objects);
    let Some(file) = objects.files.get(input) else {
        drop(objects);
        return bad(
            &format!("Invalid file id '{input}'."),
            Some("input_file_id"),
        );
    };
    let lines: Vec<Value> = String::from_utf8_lossy(&file.content)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let id = format!("batch_{}", state.ids.uuid_v4());
    let meta = json!({
        "id": id, "object": "batch", "endpoint": endpoint, "input_file_id": input,
        "completion_window": v.get("completion_window").cloned().unwrap_or(json!("24h")),
        "status": "validating", "output_file_id": null, "error_file_id": null,
        "created_at": now_secs(), "completed_at": null, "cancelled_at": null, "errors": null,
        "request_counts": {"total": lines.len(), "completed": 0, "failed": 0},
        "metadata": v.get("metadata").cloned().unwrap_or(Value::Null)
    });
    objects.batches.insert(
        id.clone(),
        Batch {
            meta,
            started: Instant::now(),
            lines,
            cancelled: false,
        },
    );
    drop(objects);
    batch(state, &id).map_or_else(|| not_found("Batch", &id), |b| ok_json(&b))
}

/// A batch as of now: it completes `object_delay` after it was made, and its output file is
/// written then, on this instance.
fn batch(state: &SimState, id: &str) -> Option<Value> {
    let mut objects = lock(&state.objects);
    let b = objects.batches.get_mut(id)?;
    let status = b.meta["status"].as_str().unwrap_or("").to_string();
    if status == "completed" || status == "cancelled" {
        return Some(b.meta.clone());
    }
    if b.cancelled {
        b.meta["status"] = json!("cancelled");
        b.meta["cancelled_at"] = json!(now_secs());
        return Some(b.meta.clone());
    }
    if b.started.elapsed() < state.cfg.object_delay {
        b.meta["status"] = json!("in_progress");
        return Some(b.meta.clone());
    }
    let mut out = String::new();
    let mut rng = SplitMix64::new(state.cfg.seed ^ b.started.elapsed().as_nanos() as u64);
    for (i, line) in b.lines.iter().enumerate() {
        let body = line.get("body").cloned().unwrap_or(Value::Null);
        let ask = responses::parse_ask("chat/completions", &body);
        let words = responses::words(&mut rng, state.cfg.completion_tokens);
        let reply_id = format!("chatcmpl-batch{i}");
        let reply = Reply {
            id: &reply_id,
            created: now_secs(),
            model: ask.model.as_deref().unwrap_or("gpt-4o"),
            words: &words,
            finish_reason: "stop",
            prompt_tokens: ask.prompt_tokens,
            cached_tokens: 0,
        };
        let answer: Value = serde_json::from_slice(&reply.chat()).unwrap_or(Value::Null);
        out.push_str(
            &json!({
                "id": format!("batch_req_{i}"), "custom_id": line.get("custom_id"),
                "response": {"status_code": 200, "request_id": format!("req-{i}"), "body": answer},
                "error": null
            })
            .to_string(),
        );
        out.push('\n');
    }
    let file_id = format!("file-{}", state.ids.uuid_v4().replace('-', ""));
    let n = b.lines.len();
    b.meta["status"] = json!("completed");
    b.meta["completed_at"] = json!(now_secs());
    b.meta["output_file_id"] = json!(file_id);
    b.meta["request_counts"] = json!({"total": n, "completed": n, "failed": 0});
    let meta = b.meta.clone();
    let content = Bytes::from(out);
    objects.files.insert(
        file_id.clone(),
        File {
            meta: json!({
                "id": file_id, "object": "file", "bytes": content.len(), "created_at": now_secs(),
                "filename": "batch_output.jsonl", "purpose": "batch_output", "status": "processed",
                "status_details": null
            }),
            content,
        },
    );
    Some(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_cache_counts_whole_blocks_of_a_repeated_prefix() {
        let mut o = Objects::new(1);
        let short = "x".repeat(CACHE_BLOCK * (CACHE_MIN_BLOCKS - 1));
        assert_eq!(o.cached_tokens(&short), 0);
        assert_eq!(o.cached_tokens(&short), 0, "too short to be cached");
        let long: String = (0..CACHE_BLOCK * 10)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        assert_eq!(o.cached_tokens(&long), 0, "first time: nothing cached");
        let longer = format!("{long}{}", "y".repeat(CACHE_BLOCK * 3));
        assert_eq!(o.cached_tokens(&longer), (10 * CACHE_BLOCK / 4) as u32);
        let mut other = Objects::new(2);
        assert_eq!(other.cached_tokens(&longer), 0, "another instance's cache");
    }

    #[test]
    fn only_the_sealing_instance_opens_reasoning() {
        let a = Objects::new(1);
        let b = Objects::new(2);
        let sealed = a.seal("rs_1");
        assert!(a.opens("rs_1", &sealed));
        assert!(!a.opens("rs_2", &sealed));
        assert!(!b.opens("rs_1", &sealed));
        assert!(!a.opens("rs_1", "not base64"));
    }
}
