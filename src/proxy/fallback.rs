//! Fallback chains (`[[deployments]] fallbacks`): a request its deployment cannot serve goes on
//! to the next deployment of the chain, one round of attempts each (`max_attempts` counts per
//! deployment), all within the one `routing.request_timeout`. Only whole answers are judged,
//! before any byte reached the client, so a started response is never redone elsewhere.

use super::*;
use crate::config::FallbackOn;
use crate::routing::Fallbacks;
use crate::telemetry::FallbackLabels;

/// Lets a request go on to a fallback deployment, or not: whether the caller may use it, and
/// its limits there.
pub trait Gate {
    /// The request goes on from deployment `from`, which did not serve it, to `to`; `false`
    /// skips `to`.
    fn enter(&mut self, from: &str, to: &str) -> impl Future<Output = bool> + Send;
}

/// Why a deployment's round did not serve the request, as `fallback_on` names it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Miss {
    /// Every backend is rate limited; the soonest is free after this long (when known).
    Throttled(Option<Duration>),
    Unavailable,
    /// A 400 with this error code.
    Refused(&'static str),
}

impl Miss {
    fn label(self) -> &'static str {
        match self {
            Miss::Throttled(_) => "throttled",
            Miss::Unavailable => "unavailable",
            Miss::Refused(code) => code,
        }
    }
}

impl Proxy {
    /// What a deployment's tokens cost, if it has a price.
    pub fn price(&self, deployment: Option<&str>) -> Option<crate::config::Price> {
        self.router.price(deployment?)
    }

    /// The fallbacks of the deployment a request asks for, if it has any.
    pub fn fallbacks(&self, deployment: Option<&str>) -> Option<&Fallbacks> {
        self.router.fallbacks(deployment?)
    }

    /// Runs a round of attempts for `asked`, then for each fallback of `chain` in turn while
    /// the last did not serve the request for a reason `chain.on` lists and `gate` lets it
    /// go on. An exhausted chain answers as one deployment's exhaustion does: 429 with the
    /// soonest `retry-after` when any was throttled, else the last round's answer (the asked
    /// deployment's own when no fallback could be tried).
    pub async fn forward_chain<G: Gate>(
        &self,
        req: &OutboundRequest<'_>,
        asked: &str,
        chain: &Fallbacks,
        target: Target<'_>,
        log: &mut AttemptLog,
        gate: &mut G,
    ) -> Answer {
        let first = self.round(Some(asked));
        let mut answer = self.forward(req, first, target, log).await;
        let mut attempts = answer.attempts;
        let mut from: &str = asked;
        let mut soonest: Option<Option<Duration>> = None;
        let mut miss = match self.missed(&mut answer, chain.on, true, req.creates).await {
            Some(m) => m,
            None => return answer,
        };
        for (i, to) in chain.to.iter().enumerate() {
            note_throttled(&mut soonest, miss);
            if Instant::now() >= first.deadline {
                break;
            }
            // A request about a stored object stays on the backend holding it.
            if let Target::Owner { backend, .. } = target
                && !self
                    .router
                    .resolve(Some(to))
                    .is_ok_and(|c| c.iter().any(|c| c.backend == backend))
            {
                continue;
            }
            if !gate.enter(from, to).await {
                continue;
            }
            self.metrics
                .fallbacks
                .get_or_create(&FallbackLabels {
                    deployment: from.to_string(),
                    fallback: to.to_string(),
                    reason: miss.label(),
                })
                .inc();
            tracing::debug!(deployment = from, fallback = %to, reason = miss.label(), "going on to a fallback deployment");
            let round = Round {
                deployment: Some(to),
                fallback: true,
                deadline: first.deadline,
            };
            // A session's backend is the asked deployment's: a fallback is balanced afresh.
            let target = match target {
                Target::Prefer { .. } => Target::Any,
                t => t,
            };
            answer = self.forward(req, round, target, log).await;
            attempts += answer.attempts;
            answer.attempts = attempts;
            answer.fallback = Some(to.clone());
            from = to;
            let last = i + 1 == chain.to.len();
            miss = match self.missed(&mut answer, chain.on, !last, req.creates).await {
                Some(m) => m,
                None => return answer,
            };
        }
        note_throttled(&mut soonest, miss);
        answer.attempts = attempts;
        // No fallback could take it (or none was tried): the answer as without a chain.
        let Some(retry_after) = soonest.filter(|_| answer.fallback.is_some()) else {
            return answer;
        };
        self.metrics
            .rejections
            .get_or_create(&reason("all_throttled"))
            .inc();
        let wait = retry_after.map_or(String::new(), |d| {
            format!("; the soonest is available in {:.1} s", d.as_secs_f64())
        });
        let names: Vec<&str> = chain.to.iter().map(|d| &**d).collect();
        let e = GatewayError::new(
            ErrorKind::AllThrottled,
            format!(
                "Every backend serving deployment '{asked}' or its fallbacks ({}) is rate limited or unavailable{wait}.",
                names.join(", ")
            ),
        )
        .with_retry_after(retry_after);
        Answer::error(e, attempts)
    }

    /// Why `answer` did not serve the request, when `on` lists the reason; `None`: it is the
    /// answer. A 400's body is read for its error code only when `codes` (a fallback follows)
    /// and `on` lists a code; read or not, the answer stays whole. A request that `creates` an
    /// object and reached a backend whole before it failed goes nowhere else, as within a
    /// round: a second object is worse than an error.
    async fn missed(
        &self,
        answer: &mut Answer,
        on: FallbackOn,
        codes: bool,
        creates: bool,
    ) -> Option<Miss> {
        let resp = match &answer.result {
            Err(e) if e.delivered && creates => return None,
            Err(e) => {
                return match e.kind {
                    ErrorKind::AllThrottled | ErrorKind::OwnerThrottled if on.throttled => {
                        Some(Miss::Throttled(e.retry_after))
                    }
                    ErrorKind::NoBackendAvailable
                    | ErrorKind::OwnerUnavailable
                    | ErrorKind::UpstreamConnect
                    | ErrorKind::UpstreamTimeout
                    | ErrorKind::UpstreamProtocol
                    | ErrorKind::CredentialUnavailable
                    | ErrorKind::BackendAuthFailed
                        if on.unavailable =>
                    {
                        Some(Miss::Unavailable)
                    }
                    _ => None,
                };
            }
            Ok(resp) => resp,
        };
        let status = resp.status();
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            let hint = crate::balancer::retry_hint(resp.headers(), SystemTime::now())
                .map(|d| d.min(self.routing.max_cooldown));
            return on.throttled.then_some(Miss::Throttled(hint));
        }
        if status.is_server_error() && self.routing.retries_status(status) {
            return on.unavailable.then_some(Miss::Unavailable);
        }
        if status != http::StatusCode::BAD_REQUEST || !codes || !on.on_any_code() {
            return None;
        }
        let Ok(resp) = std::mem::replace(
            &mut answer.result,
            Err(GatewayError::new(ErrorKind::UpstreamProtocol, "")),
        ) else {
            return None;
        };
        let whole = read_whole(resp, KEEP_FAILED_BODY_BYTES).await;
        let code = whole.body().bytes.as_deref().and_then(error_code);
        answer.result = Ok(whole.map(Whole::into_body));
        code.filter(|c| on.on_code(c)).map(Miss::Refused)
    }
}

/// Keeps the soonest `retry-after` of the throttled rounds.
fn note_throttled(soonest: &mut Option<Option<Duration>>, miss: Miss) {
    let Miss::Throttled(wait) = miss else {
        return;
    };
    *soonest = Some(match (*soonest, wait) {
        (Some(Some(a)), Some(b)) => Some(a.min(b)),
        (Some(a), b) => a.or(b),
        (None, b) => b,
    });
}

/// The error code of an OpenAI-shaped error body (`{"error": {"code": ...}}`), when it is one
/// a fallback may be made for.
fn error_code(body: &[u8]) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        code: Option<std::borrow::Cow<'a, str>>,
    }
    let body: Body<'_> = serde_json::from_slice(body).ok()?;
    match body.error.code.as_deref()? {
        "context_length_exceeded" => Some("context_length_exceeded"),
        "content_filter" => Some("content_filter"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_error_codes_azure_answers_with() {
        let context = r#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        let filter = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"}}}}}"#;
        let other = r#"{"error":{"message":"Unsupported parameter","type":"invalid_request_error","param":"x","code":"unsupported_parameter"}}"#;
        let b = |s: &'static str| s.as_bytes();
        assert_eq!(error_code(b(context)), Some("context_length_exceeded"));
        assert_eq!(error_code(b(filter)), Some("content_filter"));
        assert_eq!(error_code(b(other)), None);
        assert_eq!(error_code(b(r#"{"error":{"code":null}}"#)), None);
        assert_eq!(error_code(b("not json")), None);
    }

    #[test]
    fn the_soonest_wait_of_the_throttled_rounds_is_kept() {
        let mut soonest = None;
        note_throttled(&mut soonest, Miss::Unavailable);
        assert_eq!(soonest, None);
        note_throttled(&mut soonest, Miss::Throttled(None));
        assert_eq!(soonest, Some(None));
        note_throttled(&mut soonest, Miss::Throttled(Some(Duration::from_secs(9))));
        note_throttled(&mut soonest, Miss::Throttled(Some(Duration::from_secs(4))));
        note_throttled(&mut soonest, Miss::Refused("content_filter"));
        assert_eq!(soonest, Some(Some(Duration::from_secs(4))));
    }
}
