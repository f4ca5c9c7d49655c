//! Requests about stored objects: the owner that cannot take one now, a search of the
//! candidates for objects no owner is known for, and a list merged from every backend.

use super::*;

impl Proxy {
    /// The owner of a named object cannot take the request now: it is not sent anywhere else,
    /// where the object does not exist. `retry_after` is set when it is cooling down.
    pub(super) fn owner_busy(
        &self,
        owner: Option<(usize, &str)>,
        retry_after: Option<Duration>,
    ) -> GatewayError {
        let (idx, id) = owner.unwrap_or((0, ""));
        let name = self.backends.get(idx).map_or("?", |b| &*b.name);
        match retry_after {
            Some(wait) => GatewayError::new(
                ErrorKind::OwnerThrottled,
                format!(
                    "Backend '{name}' holds '{id}', which this request names, and is rate limited; it is available again in {:.1} s.",
                    wait.as_secs_f64()
                ),
            )
            .with_retry_after(Some(wait)),
            None => GatewayError::new(
                ErrorKind::OwnerUnavailable,
                format!(
                    "Backend '{name}' holds '{id}', which this request names, and is not available (circuit open or drained)."
                ),
            ),
        }
    }

    /// Asks the candidates in turn for objects no owner is known for, until one answers other
    /// than "not found". A "not found" (a 404, or a 400 naming one of `ids`) is neither a
    /// failure of that backend nor the client's answer while another may hold the object; only
    /// when none does is the client told it does not exist. A backend that could not be asked
    /// (throttled, down) might hold it: then the client is told to come back, not that it is
    /// missing.
    pub(super) async fn search(
        &self,
        req: &OutboundRequest<'_>,
        deployment: Option<&str>,
        candidates: &[crate::routing::Candidate],
        ids: &[String],
        log: &mut AttemptLog,
    ) -> Answer {
        let backends: Vec<usize> = candidates.iter().map(|c| c.backend).collect();
        let table = self.balancer.table(deployment.unwrap_or(""));
        let shown = deployment.unwrap_or("(none)");
        let deadline = Instant::now() + self.routing.request_timeout;
        let mut tried = vec![false; self.backends.len()];
        let (mut kept, mut last_error, mut blocked) = (None::<Kept>, None, None);
        let (mut attempts, mut failures) = (0u32, 0u32);
        let id_list = ids
            .iter()
            .map(|i| format!("'{i}'"))
            .collect::<Vec<_>>()
            .join(", ");
        loop {
            let untried: Vec<usize> = backends.iter().copied().filter(|&b| !tried[b]).collect();
            if untried.is_empty() || failures >= self.routing.max_attempts {
                break;
            }
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            let mut lease = match table.pick(&untried, &tried, now) {
                Pick::Chosen(lease) => lease,
                Pick::Throttled { retry_after } => {
                    blocked = Some(GatewayError::new(
                        ErrorKind::AllThrottled,
                        format!("The backends not yet asked for {id_list} are rate limited; the soonest is available in {:.1} s.", retry_after.as_secs_f64()),
                    ).with_retry_after(Some(retry_after)));
                    break;
                }
                Pick::Unavailable { retry_after } => {
                    blocked = Some(GatewayError::new(
                        ErrorKind::NoBackendAvailable,
                        format!("The backends not yet asked for {id_list} are not available (circuits open or drained)."),
                    ).with_retry_after(retry_after));
                    break;
                }
            };
            if remaining.is_zero() {
                drop(lease);
                last_error = Some(GatewayError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "routing.request_timeout ({:?}) ran out while looking for {id_list}",
                        self.routing.request_timeout
                    ),
                ));
                break;
            }
            let idx = lease.backend();
            tried[idx] = true;
            attempts += 1;
            let rename = rename_for(candidates, idx);
            let (sent, waited, answered) = self
                .send_attempt(idx, rename, req, remaining, attempts, now, log)
                .await;
            let retryable = self.settle(
                &mut lease,
                idx,
                shown,
                &sent,
                (waited, answered),
                false,
                req.creates,
                &mut log.tried,
            );
            match sent {
                Ok(resp) => {
                    let status = resp.status();
                    let resp = if status == http::StatusCode::BAD_REQUEST {
                        // Whether it names a missing object is in the body: read it, and keep
                        // it to pass on if it is about something else.
                        let whole = read_whole(resp, NOT_FOUND_BODY_BYTES).await;
                        let bytes = whole.body().bytes.as_deref().unwrap_or_default();
                        if ids
                            .iter()
                            .any(|id| memchr::memmem::find(bytes, id.as_bytes()).is_some())
                        {
                            continue;
                        }
                        whole.map(Whole::into_body)
                    } else {
                        resp
                    };
                    if status == http::StatusCode::NOT_FOUND {
                        continue;
                    }
                    if retryable {
                        failures += 1;
                        let whole = read_whole(resp, KEEP_FAILED_BODY_BYTES).await;
                        if whole.body().bytes.is_some() {
                            kept = Some((idx, whole));
                        }
                        continue;
                    }
                    let found = if status.is_success() {
                        "found"
                    } else {
                        "answered"
                    };
                    self.metrics
                        .owner_searches
                        .get_or_create(&reason(found))
                        .inc();
                    return Answer {
                        result: Ok(resp),
                        backend: Some(idx),
                        attempts,
                        lease: Some(lease),
                        fallback: None,
                    };
                }
                Err(e) => {
                    if !retryable {
                        return Answer {
                            result: Err(e),
                            backend: Some(idx),
                            attempts,
                            lease: None,
                            fallback: None,
                        };
                    }
                    failures += 1;
                    last_error = Some(e);
                }
            }
        }
        // No backend said it holds them. One that failed or could not be asked might.
        if kept.is_some() || last_error.is_some() {
            self.metrics
                .owner_searches
                .get_or_create(&reason("unavailable"))
                .inc();
            return self.give_up(kept, last_error, attempts);
        }
        if let Some(e) = blocked {
            self.metrics
                .owner_searches
                .get_or_create(&reason("unavailable"))
                .inc();
            return Answer::error(e, attempts);
        }
        self.metrics
            .owner_searches
            .get_or_create(&reason("not_found"))
            .inc();
        Answer::error(not_found(ids), attempts)
    }

    /// Every backend's whole list at `path_and_query` (a list endpoint: files, batches, ...),
    /// fetched from all backends at once, each followed through its own pages (`limit=100`,
    /// `after=`) up to `LIST_PAGES`. The client's other query parameters (`api-version`,
    /// `purpose`, ...) go along. A backend that cannot be listed fails the whole list: a
    /// list quietly missing one backend's objects would be wrong, not partial.
    pub async fn list_all(
        &self,
        req: &OutboundRequest<'_>,
        log: &mut AttemptLog,
    ) -> Result<Vec<(usize, Vec<serde_json::Value>)>, Response<BoxBody>> {
        let (path, query) = req
            .path_and_query
            .split_once('?')
            .unwrap_or((req.path_and_query, ""));
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| {
                let name = p.split('=').next().unwrap_or("");
                !p.is_empty() && !matches!(name, "limit" | "after" | "before" | "order")
            })
            .collect();
        let deadline = Instant::now() + self.routing.request_timeout;
        let trace = log.trace;
        let fetches = self.backends.iter().enumerate().map(|(idx, _)| {
            let kept = &kept;
            async move {
                let mut own = AttemptLog {
                    trace,
                    ..AttemptLog::default()
                };
                let mut items = Vec::new();
                let mut after: Option<String> = None;
                for page in 1..=LIST_PAGES {
                    let mut q = kept.clone();
                    q.push("limit=100");
                    let cursor = after.as_ref().map(|a| format!("after={a}"));
                    if let Some(c) = &cursor {
                        q.push(c);
                    }
                    let pq = format!("{path}?{}", q.join("&"));
                    let page_req = OutboundRequest {
                        path_and_query: &pq,
                        deployment_span: None,
                        model_in_body: false,
                        body: Bytes::new(),
                        passthrough: req.passthrough.clone(),
                        ..*req
                    };
                    let now = Instant::now();
                    let remaining = deadline.saturating_duration_since(now);
                    let (sent, _, _) = self
                        .send_attempt(idx, None, &page_req, remaining, page, now, &mut own)
                        .await;
                    let name = self.backends[idx].name.clone();
                    let resp = match sent {
                        Ok(r) => r,
                        Err(e) => {
                            own.tried.0.push((name, AttemptOutcome::Failed(e.kind)));
                            return (own, Err(e.into_response()));
                        }
                    };
                    let status = resp.status();
                    own.tried.0.push((name, AttemptOutcome::Answered(status)));
                    let whole = read_whole(resp, LIST_PAGE_BYTES).await;
                    let Some(bytes) = whole.body().bytes.clone() else {
                        let e = GatewayError::new(
                            ErrorKind::UpstreamProtocol,
                            format!(
                                "backend {}: its list could not be read whole",
                                self.backends[idx].name
                            ),
                        );
                        return (own, Err(e.into_response()));
                    };
                    if !status.is_success() {
                        // The backend's own answer, as it gave it.
                        return (own, Err(whole.map(Whole::into_body)));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    let data = v
                        .get("data")
                        .and_then(|d| d.as_array())
                        .cloned()
                        .unwrap_or_default();
                    after = data
                        .last()
                        .and_then(|d| d.get("id"))
                        .and_then(|i| i.as_str())
                        .map(str::to_string);
                    items.extend(data);
                    if v.get("has_more").and_then(|h| h.as_bool()) != Some(true) || after.is_none()
                    {
                        break;
                    }
                }
                (own, Ok((idx, items)))
            }
        });
        let results = futures_util::future::join_all(fetches).await;
        let mut out = Vec::with_capacity(results.len());
        let mut failed = None;
        for (own, r) in results {
            log.tried.0.extend(own.tried.0);
            log.upstream = log.upstream.max(own.upstream);
            log.spans.extend(own.spans);
            match r {
                Ok(page) => out.push(page),
                Err(resp) => failed = failed.or(Some(resp)),
            }
        }
        match failed {
            Some(resp) => Err(resp),
            None => Ok(out),
        }
    }
}

/// Pages of 100 read from each backend for one merged list, at most.
pub(super) const LIST_PAGES: u32 = 50;

/// Longest list page read from a backend.
pub(super) const LIST_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// How much of a 400 is read to see whether it says an object is missing.
pub(super) const NOT_FOUND_BODY_BYTES: usize = 64 * 1024;

/// The gateway's answer for objects that no backend holds (or that belong to another
/// consumer: the same answer, so one cannot tell the two apart).
pub fn not_found(ids: &[String]) -> GatewayError {
    let shown: Vec<String> = ids
        .iter()
        .map(|i| format!("'{}'", i.chars().take(128).collect::<String>()))
        .collect();
    GatewayError::new(
        ErrorKind::ObjectNotFound,
        format!("No object with id {} was found.", shown.join(", ")),
    )
}
