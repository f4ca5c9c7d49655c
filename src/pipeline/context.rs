//! One request's context: made as the request arrives, carried through every phase, and
//! ended once by [`RequestContext::finish`] (in `finish.rs`), whether the answer ran to its end,
//! failed, or the client went away.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;
use http::{Method, Request, Uri};

use crate::affinity::Learner;
use crate::balancer::Lease;
use crate::body::RequestBody;
use crate::limits::Admission;
use crate::live::GatewayState;
use crate::proxy::AttemptLog;
use crate::telemetry::otlp::OtlpMetrics;
use crate::telemetry::trace::Tracer;
use crate::telemetry::{BackendStats, Metrics, RequestCounters};
use crate::upstream::X_REQUEST_ID;
use crate::usage::Tap;

/// What is known of a request, phase after phase, and what its end must account for. A
/// stream counts as in flight until the context is dropped.
pub(super) struct RequestContext {
    pub(super) metrics: Arc<Metrics>,
    /// Where the request's metrics are pushed over OTLP, when they are.
    pub(super) otlp: Option<Arc<OtlpMetrics>>,
    pub(super) started: Instant,
    /// When the request arrived, for span timestamps.
    pub(super) wall_start: SystemTime,
    pub(super) request_id: HeaderValue,
    pub(super) method: Method,
    /// Only its path is logged: a query string may carry a key (`subscription-key=`).
    pub(super) uri: Uri,
    /// Who is calling (`-` when no key or token named anyone); set by `authenticate`.
    pub(super) consumer: Arc<str>,
    /// The deployment asked for, as logged (at most 128 characters); set by `read`, and to
    /// the one that served when that is a fallback.
    pub(super) deployment: Option<String>,
    /// The deployment asked for, when a fallback served the request.
    pub(super) requested: Option<String>,
    /// `gen_ai.operation.name`, for known Azure OpenAI operations (sampled traces only).
    pub(super) operation: Option<&'static str>,
    /// The request's generation parameters (sampled traces only).
    pub(super) params: Option<RequestParams>,
    /// Every attempt, the time spent waiting on backends, and the trace; kept by `forward`.
    pub(super) attempts_log: AttemptLog,
    /// Set for sampled traces: takes the request's spans when it ends.
    pub(super) tracer: Option<Arc<Tracer>>,

    // Known once the answer is (`respond`):
    pub(super) status: u16,
    pub(super) attempts: u32,
    pub(super) first_byte: Duration,
    /// The serving backend's name (`none` when none answered).
    pub(super) backend: Option<Arc<str>>,
    /// The serving backend's in-flight slot; released when the body ends or is dropped.
    pub(super) lease: Option<Lease>,
    /// The request's counters, once its labels are known.
    pub(super) counters: Option<RequestCounters>,
    pub(super) success: bool,
    /// Settled when the body ends; dropped unsettled (estimate kept) if it never does.
    pub(super) reservation: Option<Admission>,
    /// Reads usage from the body as it passes.
    pub(super) tap: Option<Tap>,
    /// The serving backend's totals, for the status page.
    pub(super) stats: Option<Arc<BackendStats>>,
    /// Remembers the owners of the objects the answer makes known.
    pub(super) learner: Option<Learner>,

    /// The answer is an event stream (a failure mid-stream gets a final `error` event).
    pub(super) sse: bool,
    /// What the serving deployment's tokens cost, when it has a price.
    pub(super) price: Option<crate::config::Price>,
    /// The gateway asked for the stream's usage chunk (the client did not): it is taken out
    /// of the stream again.
    pub(super) usage_asked: bool,

    // Known as the body goes by:
    /// The backend's body failed after the headers went out.
    pub(super) stream_failed: bool,
    pub(super) finished: bool,
}

impl RequestContext {
    /// The context of a request that just arrived: it counts as in flight from here.
    pub(super) fn start(state: &GatewayState, req: &Request<RequestBody>) -> RequestContext {
        let started = Instant::now();
        state.metrics.in_flight.inc();
        let mut ctx = RequestContext {
            metrics: state.metrics.clone(),
            otlp: state.otlp.clone(),
            started,
            wall_start: UNIX_EPOCH,
            request_id: request_id(req.headers(), &state.ids),
            method: req.method().clone(),
            uri: req.uri().clone(),
            consumer: anonymous(),
            deployment: None,
            requested: None,
            operation: None,
            params: None,
            attempts_log: AttemptLog::default(),
            tracer: None,
            status: 0,
            attempts: 0,
            first_byte: Duration::ZERO,
            backend: None,
            lease: None,
            counters: None,
            success: false,
            reservation: None,
            tap: None,
            stats: None,
            learner: None,
            sse: false,
            usage_asked: false,
            price: None,
            stream_failed: false,
            finished: false,
        };
        if let Some(t) = &state.tracer {
            ctx.wall_start = SystemTime::now();
            let trace = t.start(req.headers());
            ctx.attempts_log.trace = Some(trace);
            if trace.sampled {
                ctx.tracer = Some(t.clone());
            }
        }
        ctx
    }

    /// Whether this request's trace is sampled (its spans are recorded).
    pub(super) fn sampled(&self) -> bool {
        self.attempts_log.trace.is_some_and(|t| t.sampled)
    }
}

/// What the GenAI conventions record of a request's parameters.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct RequestParams {
    pub(super) max_tokens: Option<u64>,
    pub(super) max_completion_tokens: Option<u64>,
    pub(super) temperature: Option<f64>,
    pub(super) top_p: Option<f64>,
}

/// Keeps the client's `x-request-id` when it is a sane token, else makes one.
fn request_id(headers: &http::HeaderMap, ids: &crate::ids::IdGen) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let ok =
            v.len() <= 128 && !v.is_empty() && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    HeaderValue::from_bytes(&ids.uuid_v4_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The consumer of a request no key or token named: one shared name, not one per request.
pub(super) fn anonymous() -> Arc<str> {
    static DASH: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));
    DASH.clone()
}

/// The first `n` characters of `s` (a bound for what logs repeat of the client's input).
pub(super) fn first_chars(s: &str, n: usize) -> &str {
    // One byte or more per character: short strings fit whole, without counting.
    if s.len() <= n {
        return s;
    }
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_chars_cuts_on_character_boundaries() {
        assert_eq!(super::first_chars("abc", 5), "abc");
        assert_eq!(super::first_chars("abcdef", 3), "abc");
        assert_eq!(super::first_chars("ééé", 2), "éé");
        assert_eq!(super::first_chars("éé", 2), "éé");
    }
}
