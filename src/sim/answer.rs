//! One request's answer: which operation it asks for, the faults and limits it meets, and the
//! body (plain or streamed) a real instance would give.

use super::*;

pub(super) enum Op {
    Chat,
    Completions,
    Embeddings,
    Echo,
}

pub(super) async fn answer(
    state: &SimState,
    parts: &http::request::Parts,
    body: Bytes,
) -> SimResult {
    let path = parts.uri.path();
    let classic = path.starts_with("/openai/deployments/");
    let op_path = if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        rest.split_once('/').map(|(_, op)| op)
    } else {
        // Stored objects are also served on the preview surface (`/openai/files?api-version=`).
        path.strip_prefix("/openai/v1/").or_else(|| {
            path.strip_prefix("/openai/")
                .filter(|rest| stateful::FAMILIES.iter().any(|f| rest.starts_with(f)))
        })
    };
    let Some(op_path) = op_path else {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            azure_error("404", "Resource not found"),
        ));
    };
    let deployment = path
        .strip_prefix("/openai/deployments/")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");

    let needs_auth = state.cfg.api_key.is_some() || state.cfg.accepted_tokens.is_some();
    if needs_auth && !authorized(&parts.headers, &state.cfg) {
        state.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        return Ok(json_response(
            StatusCode::UNAUTHORIZED,
            azure_error(
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
            ),
        ));
    }

    let (fault, draw_drop, words_seed, retry_after_ms) = {
        let faults = lock(&state.faults).clone();
        let mut rng = lock(&state.rng);
        let stall = rng.next_f64() < faults.stall_rate;
        let error = rng.next_f64() < faults.error_rate;
        let drop = rng.next_f64() < faults.drop_rate;
        let seed = rng.next_u64();
        let fault = if stall {
            Some(None)
        } else if error {
            Some(Some(if faults.error_status == 0 {
                500
            } else {
                faults.error_status
            }))
        } else {
            None
        };
        (fault, drop, seed, faults.retry_after_ms)
    };
    match fault {
        Some(None) => {
            state.counters.faulted.fetch_add(1, Ordering::Relaxed);
            state.shutdown.cancelled().await;
            return Err("simulator stopped".into());
        }
        Some(Some(code)) => {
            state.counters.faulted.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = json_response(status, azure_error(status.as_str(), "Simulated failure"));
            if code == 429 || code == 503 {
                let h = r.headers_mut();
                match retry_after_ms {
                    Some(ms) => {
                        h.insert("retry-after-ms", HeaderValue::from(ms));
                        h.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
                    }
                    None => {
                        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    }
                }
            }
            return Ok(r);
        }
        None => {}
    }

    if !classic
        && let Some(r) = stateful::handle(
            state,
            &parts.method,
            op_path,
            parts.uri.query().unwrap_or(""),
            &parts.headers,
            body.clone(),
        )
        .await
    {
        if r.as_ref().is_ok_and(|r| r.status().is_success()) {
            state.counters.ok.fetch_add(1, Ordering::Relaxed);
        }
        return r;
    }
    let op = match op_path {
        "chat/completions" => Op::Chat,
        "completions" => Op::Completions,
        "embeddings" => Op::Embeddings,
        _ => Op::Echo,
    };
    if matches!(op, Op::Echo) {
        if draw_drop {
            state.counters.faulted.fetch_add(1, Ordering::Relaxed);
            return Err("simulated connection drop".into());
        }
        state.counters.ok.fetch_add(1, Ordering::Relaxed);
        let mut r = Response::new(full(body));
        if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
            r.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        r.headers_mut()
            .insert("x-sim-echo", HeaderValue::from_static("1"));
        return Ok(r);
    }

    let json: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                azure_error(
                    "BadRequest",
                    &format!("The request body is not valid JSON: {e}"),
                ),
            ));
        }
    };
    let op_name = match op {
        Op::Chat => "chat/completions",
        Op::Completions => "completions",
        _ => "embeddings",
    };
    let ask = responses::parse_ask(op_name, &json);
    let asked_model = ask.model.as_deref().unwrap_or(deployment);
    if !matches!(op, Op::Embeddings)
        && let Some((_, window)) = state
            .cfg
            .context_windows
            .iter()
            .find(|(m, _)| m == asked_model)
    {
        let completion = ask.max_tokens.unwrap_or(0);
        if ask.prompt_tokens + completion > *window {
            return Ok(context_length_exceeded(
                *window,
                ask.prompt_tokens,
                ask.max_tokens,
            ));
        }
    }
    let completion = match op {
        Op::Embeddings => 0,
        _ => ask
            .max_tokens
            .unwrap_or(state.cfg.completion_tokens)
            .min(state.cfg.completion_tokens),
    };
    let charge = ask.prompt_tokens + ask.max_tokens.unwrap_or(completion).max(completion);
    let remaining = match admit(state, charge) {
        Ok(r) => r,
        Err(throttled) => {
            state.counters.throttled.fetch_add(1, Ordering::Relaxed);
            return Ok(throttled.response());
        }
    };

    let model = ask
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            if deployment.is_empty() {
                "gpt-4o".into()
            } else {
                deployment.into()
            }
        });
    let mut rng = SplitMix64::new(words_seed);
    let mut resp = match op {
        Op::Embeddings => {
            pause(state.cfg.ttft).await;
            json_response(
                StatusCode::OK,
                responses::embeddings(&model, &ask, &mut rng),
            )
        }
        _ => {
            let words = responses::words(&mut rng, completion);
            let finish = if ask
                .max_tokens
                .is_some_and(|m| m < state.cfg.completion_tokens)
            {
                "length"
            } else {
                "stop"
            };
            let id = format!("chatcmpl-{}", &state.ids.uuid_v4()[..13]);
            let reply = Reply {
                id: &id,
                created: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                model: &model,
                words: &words,
                finish_reason: finish,
                prompt_tokens: ask.prompt_tokens,
                cached_tokens: match op {
                    Op::Chat => lock(&state.objects).cached_tokens(&responses::prompt_text(&json)),
                    _ => 0,
                },
            };
            // Benchmarks pace single requests with `x-sim-token-ms`, so one simulator serves
            // both instant answers and slow streams.
            let pace = parts
                .headers
                .get("x-sim-token-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(state.cfg.token_interval, Duration::from_millis);
            stream_or_plain(state, &op, &ask, &reply, draw_drop, pace).await?
        }
    };
    state.counters.ok.fetch_add(1, Ordering::Relaxed);
    let h = resp.headers_mut();
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(remaining.0),
    );
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(remaining.1),
    );
    Ok(resp)
}

/// Azure's answer to a prompt (and completion) longer than the model's context window.
fn context_length_exceeded(window: u32, prompt: u32, max_tokens: Option<u32>) -> Response<BoxBody> {
    let message = match max_tokens {
        Some(m) => format!(
            "This model's maximum context length is {window} tokens. However, you requested {} tokens ({prompt} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
            prompt + m
        ),
        None => format!(
            "This model's maximum context length is {window} tokens. However, your messages resulted in {prompt} tokens. Please reduce the length of the messages."
        ),
    };
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }});
    json_response(StatusCode::BAD_REQUEST, Bytes::from(body.to_string()))
}

pub(super) async fn stream_or_plain(
    state: &SimState,
    op: &Op,
    ask: &Ask,
    reply: &Reply<'_>,
    drop_connection: bool,
    token_interval: Duration,
) -> SimResult {
    let cfg = &state.cfg;
    if ask.stream {
        let events = match op {
            Op::Chat => reply.chat_events(ask.include_usage),
            _ => reply.completion_events(),
        };
        // A dropped stream gets about half its events out first.
        let fail_after = drop_connection.then_some(events.len() / 2);
        if drop_connection {
            state.counters.faulted.fetch_add(1, Ordering::Relaxed);
        }
        // Headers go out when the first token is ready, as Azure's do.
        pause(cfg.ttft).await;
        let body = PacedBody::new(events, Duration::ZERO, token_interval, fail_after);
        let mut r = Response::new(BoxBody::new(body));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(r);
    }
    let total = cfg.ttft + token_interval * reply.words.len() as u32;
    pause(total).await;
    if drop_connection {
        state.counters.faulted.fetch_add(1, Ordering::Relaxed);
        return Err("simulated connection drop".into());
    }
    let body = match op {
        Op::Chat => reply.chat(),
        _ => reply.completion(),
    };
    Ok(json_response(StatusCode::OK, body))
}
