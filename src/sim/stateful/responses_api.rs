//! The Responses API of one simulated instance: stored responses, conversations chained by
//! `previous_response_id`, reasoning items sealed by the instance that made them, streamed events.

use super::*;

/// Reasoning tokens every simulated answer reports.
pub(super) const REASONING_TOKENS: u64 = 4;

/// A stored response as of now: a background one completes `object_delay` after it was queued.
pub(super) fn response(state: &SimState, id: &str) -> Option<Value> {
    let mut objects = lock(&state.objects);
    let s = objects.responses.get_mut(id)?;
    if let Some(q) = s.queued
        && s.response["status"] == "queued"
        && q.elapsed() >= state.cfg.object_delay
    {
        if let Some(done) = s.response.get_mut("background_result").map(Value::take) {
            s.response = done;
        }
        s.response["status"] = json!("completed");
    }
    let mut v = s.response.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("background_result");
    }
    Some(v)
}

/// The text a request's input items carry, for the prompt they make.
pub(super) fn input_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|i| input_text(i, out)),
        Value::Object(o) => {
            if let Some(t) = o.get("text").and_then(Value::as_str) {
                out.push_str(t);
                out.push('\n');
            }
            if let Some(c) = o.get("content") {
                input_text(c, out);
            }
        }
        _ => {}
    }
}

/// Why a request is refused: message, parameter, code.
pub(super) type Refused = (String, Option<String>, &'static str);

/// What a Responses request may not carry here: ids this instance does not hold, reasoning it
/// did not seal, options the API does not have.
pub(super) fn check_request(objects: &Objects, v: &Value) -> Result<(), Refused> {
    if let Some(opts) = v.get("stream_options").and_then(Value::as_object)
        && let Some(k) = opts.keys().find(|k| *k != "include_obfuscation")
    {
        return Err((
            format!("Unknown parameter: 'stream_options.{k}'."),
            Some(format!("stream_options.{k}")),
            "unknown_parameter",
        ));
    }
    if let Some(prev) = v.get("previous_response_id").and_then(Value::as_str)
        && !objects.responses.contains_key(prev)
    {
        return Err((
            format!("Previous response with id '{prev}' not found."),
            Some("previous_response_id".into()),
            "previous_response_not_found",
        ));
    }
    let mut failure = None;
    visit_items(v.get("input"), &mut |item| {
        if failure.is_some() {
            return;
        }
        let kind = item.get("type").and_then(Value::as_str);
        if kind == Some("reasoning")
            && let (Some(id), Some(sealed)) = (
                item.get("id").and_then(Value::as_str),
                item.get("encrypted_content").and_then(Value::as_str),
            )
            && !objects.opens(id, sealed)
        {
            failure = Some((
                format!("The encrypted content for item {id} could not be verified."),
                "invalid_encrypted_content",
            ));
        }
        if kind == Some("input_file")
            && let Some(f) = item.get("file_id").and_then(Value::as_str)
            && !objects.files.contains_key(f)
        {
            failure = Some((format!("File '{f}' not found."), "invalid_request_error"));
        }
    });
    match failure {
        Some((m, code)) => Err((m, Some("input".into()), code)),
        None => Ok(()),
    }
}

pub(super) fn visit_items(v: Option<&Value>, f: &mut impl FnMut(&Value)) {
    if let Some(Value::Array(items)) = v {
        for item in items {
            f(item);
            if let Some(c) = item.get("content") {
                visit_items(Some(c), f);
            }
        }
    }
}

pub(super) async fn create_response(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
) -> SimResult {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return oai_error(
            StatusCode::BAD_REQUEST,
            "The request body is not valid JSON.",
            None,
            "invalid_request_error",
        );
    };
    let store = v.get("store").and_then(Value::as_bool).unwrap_or(true);
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let background = v
        .get("background")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if background && !store {
        return oai_error(
            StatusCode::BAD_REQUEST,
            "Background responses must be stored ('store': true).",
            Some("background"),
            "invalid_request_error",
        );
    }
    let encrypted = v
        .get("include")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|i| i == "reasoning.encrypted_content"));
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o")
        .to_string();
    let prev = v
        .get("previous_response_id")
        .and_then(Value::as_str)
        .map(str::to_string);

    // The prompt: the conversation so far, then this turn's instructions and input.
    let mut context = {
        let objects = lock(&state.objects);
        if let Err((message, param, code)) = check_request(&objects, &v) {
            return oai_error(StatusCode::BAD_REQUEST, &message, param.as_deref(), code);
        }
        prev.as_ref()
            .and_then(|p| objects.responses.get(p))
            .map(|s| s.context.clone())
            .unwrap_or_default()
    };
    if let Some(i) = v.get("instructions").and_then(Value::as_str) {
        context.push_str(i);
        context.push('\n');
    }
    input_text(v.get("input").unwrap_or(&Value::Null), &mut context);
    let input_tokens = text_tokens(&context);
    let completion = v
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .map_or(state.cfg.completion_tokens, |m| {
            (m.min(u64::from(u32::MAX)) as u32).min(state.cfg.completion_tokens)
        });
    if let Err(throttled) = admit(state, input_tokens + completion) {
        state
            .counters
            .throttled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(throttled.response());
    }
    let cached = lock(&state.objects).cached_tokens(&context);

    let uid = || state.ids.uuid_v4().replace('-', "");
    let id = format!("resp_{}", uid());
    let seed = state.ids.next_u64();
    let words = responses::words(&mut SplitMix64::new(seed), completion);
    let text = words.join(" ");
    context.push_str(&text);
    context.push('\n');
    let rs_id = format!("rs_{}", uid());
    let mut reasoning = json!({"type": "reasoning", "id": rs_id, "summary": []});
    if encrypted {
        reasoning["encrypted_content"] = json!(lock(&state.objects).seal(&rs_id));
    }
    let message = json!({
        "type": "message", "id": format!("msg_{}", uid()), "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    });
    let output_tokens = u64::from(completion) + REASONING_TOKENS;
    let usage = json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
        "total_tokens": u64::from(input_tokens) + output_tokens
    });
    let base = json!({
        "id": id, "object": "response", "created_at": now_secs(), "status": "in_progress",
        "background": background, "error": null, "incomplete_details": null,
        "instructions": v.get("instructions"), "max_output_tokens": v.get("max_output_tokens"),
        "model": model, "output": [], "parallel_tool_calls": true,
        "previous_response_id": prev, "reasoning": {"effort": "medium", "summary": null},
        "store": store, "temperature": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
        "usage": null, "user": v.get("user"), "metadata": v.get("metadata").cloned().unwrap_or(json!({}))
    });
    let mut done = base.clone();
    done["status"] = json!("completed");
    done["output"] = json!([reasoning, message]);
    done["usage"] = usage;
    let mut n = 0;
    let input_items: Vec<Value> = match v.get("input") {
        Some(Value::String(s)) => vec![json!({
            "type": "message", "id": format!("msg_{}", uid()), "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": s}]
        })],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                n += 1;
                let mut i = i.clone();
                if i.get("id").is_none() && i.is_object() {
                    i["id"] = json!(format!("msg_{}_{n}", uid()));
                }
                i
            })
            .collect(),
        _ => Vec::new(),
    };

    if background {
        let mut queued = base.clone();
        queued["status"] = json!("queued");
        queued["background_result"] = done;
        let shown = {
            let mut s = queued.clone();
            if let Some(o) = s.as_object_mut() {
                o.remove("background_result");
            }
            s
        };
        lock(&state.objects).responses.insert(
            id,
            Stored {
                response: queued,
                input_items,
                context,
                queued: Some(Instant::now()),
            },
        );
        return ok_json(&shown);
    }
    if store {
        lock(&state.objects).responses.insert(
            id.clone(),
            Stored {
                response: done.clone(),
                input_items,
                context,
                queued: None,
            },
        );
    }
    let pace = headers
        .get("x-sim-token-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(state.cfg.token_interval, Duration::from_millis);
    if !stream {
        pause(state.cfg.ttft + pace * words.len() as u32).await;
        return ok_json(&done);
    }
    pause(state.cfg.ttft).await;
    let events = stream_events(&base, &done, &words);
    let mut r = Response::new(BoxBody::new(PacedBody::new(
        events,
        Duration::ZERO,
        pace,
        None,
    )));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    Ok(r)
}

/// A streamed response's events, `response.created` to `response.completed`, each an
/// `event:` line and a `data:` line as the Responses API sends them.
pub(super) fn stream_events(base: &Value, done: &Value, words: &[&str]) -> Vec<Bytes> {
    let mut seq = 0u64;
    let mut out = Vec::new();
    let mut push = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        out.push(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")));
    };
    push("response.created", json!({"response": base}));
    push("response.in_progress", json!({"response": base}));
    let output = done["output"].as_array().cloned().unwrap_or_default();
    for (index, item) in output.iter().enumerate() {
        let mut added = item.clone();
        if item["type"] == "message" {
            added["status"] = json!("in_progress");
            added["content"] = json!([]);
        }
        push(
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
        );
        if item["type"] == "message" {
            let item_id = item["id"].clone();
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            push(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
            );
            for (i, w) in words.iter().enumerate() {
                let delta = if i == 0 {
                    (*w).to_string()
                } else {
                    format!(" {w}")
                };
                push(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}),
                );
            }
            let text = words.join(" ");
            push(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            );
            push(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
            );
        }
        push(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }
    push("response.completed", json!({"response": done}));
    out
}
