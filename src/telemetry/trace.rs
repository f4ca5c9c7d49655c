//! Distributed tracing: W3C trace context taken from clients and passed to backends, and spans
//! exported to an OpenTelemetry collector over OTLP/HTTP in its JSON encoding. The request path
//! only fills a bounded queue; one task batches and posts, and drops (and counts) what a slow
//! or absent collector cannot take, so tracing never holds a request up.
//!
//! Spans follow the OpenTelemetry GenAI semantic conventions: a SERVER span per client request
//! and a CLIENT span per attempt on a backend, named `{gen_ai.operation.name} {model}`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::TracingConfig;
use crate::http_client::HttpsClient;
use crate::ids::IdGen;

/// Spans waiting for export; past this, new ones are dropped (and counted).
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// The trace a request belongs to and its own span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The gateway's span for this request.
    pub span_id: SpanId,
    /// The caller's span, when the request came with a `traceparent`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

impl TraceContext {
    /// The span id of attempt `n` (from 1): derived from the request's span, so the proxy needs
    /// no generator, and as unpredictable as it is.
    pub fn attempt_span(&self, n: u32) -> SpanId {
        let base = u64::from_be_bytes(self.span_id);
        let mut z = base ^ u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // splitmix64's finaliser: a bijection, so distinct attempts get distinct ids.
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if z == 0 {
            z = 1;
        }
        z.to_be_bytes()
    }

    /// The `traceparent` a backend gets for the span `span`.
    pub fn traceparent(&self, span: SpanId) -> HeaderValue {
        let v = format!(
            "00-{}-{}-{}",
            hex(&self.trace_id),
            hex(&span),
            if self.sampled { "01" } else { "00" }
        );
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A W3C `traceparent`: (trace id, parent span id, sampled). `None` when malformed, per the
/// spec's rules (lowercase hex, no all-zero ids, version `ff` invalid, version 00 exact).
pub fn parse_traceparent(v: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let version: [u8; 1] = unhex(version)?;
    if version[0] == 0xff || (version[0] == 0 && rest.is_some()) {
        return None;
    }
    let trace: TraceId = unhex(trace)?;
    let span: SpanId = unhex(span)?;
    let flags: [u8; 1] = unhex(flags)?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags[0] & 1 == 1))
}

/// One attempt of a traced request, as the proxy saw it: enough for its CLIENT span.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub span_id: SpanId,
    pub attempt: u32,
    pub backend: Arc<str>,
    pub host: String,
    pub port: u16,
    /// The deployment's name on this backend, when it differs from the client's.
    pub model: Option<String>,
    pub start: SystemTime,
    /// Until the response headers (or the failure).
    pub duration: Duration,
    /// The backend's status, or the gateway's error label when there was no response.
    pub outcome: super::AttemptOutcome,
}

/// An attribute value, as OTLP types them.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Double(f64),
}

impl From<&str> for Attr {
    fn from(v: &str) -> Self {
        Attr::Str(v.to_string())
    }
}
impl From<String> for Attr {
    fn from(v: String) -> Self {
        Attr::Str(v)
    }
}
impl From<u64> for Attr {
    fn from(v: u64) -> Self {
        Attr::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for Attr {
    fn from(v: f64) -> Self {
        Attr::Double(v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attr)>,
    /// Set when the span failed: its status is ERROR with this message.
    pub error: Option<String>,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

impl Span {
    fn to_otlp(&self) -> Value {
        let attributes: Vec<Value> = self
            .attributes
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Attr::Str(s) => json!({ "stringValue": s }),
                    // OTLP/JSON carries 64-bit integers as strings.
                    Attr::Int(i) => json!({ "intValue": i.to_string() }),
                    Attr::Double(d) => json!({ "doubleValue": d }),
                };
                json!({ "key": k, "value": value })
            })
            .collect();
        let mut span = json!({
            "traceId": hex(&self.trace_id),
            "spanId": hex(&self.span_id),
            "name": self.name,
            "kind": match self.kind { SpanKind::Server => 2, SpanKind::Client => 3 },
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(self.end),
            "attributes": attributes,
            "status": match &self.error {
                Some(m) => json!({ "code": 2, "message": m }),
                None => json!({ "code": 0 }),
            },
        });
        if let Some(p) = self.parent {
            span["parentSpanId"] = hex(&p).into();
        }
        span
    }
}

/// Starts traces and takes finished spans; cheap to call on the request path.
pub struct Tracer {
    tx: mpsc::Sender<Span>,
    ids: IdGen,
    /// Share of new traces (no sampled parent) that are recorded, as a threshold on a u64.
    threshold: u64,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// Posts batches of spans to the collector; runs until shutdown, then sends what is left.
pub struct Exporter {
    rx: mpsc::Receiver<Span>,
    client: HttpsClient,
    config: TracingConfig,
    exported: prometheus_client::metrics::counter::Counter,
    failed: prometheus_client::metrics::counter::Counter,
}

impl Tracer {
    pub fn new(
        config: &TracingConfig,
        client: HttpsClient,
        metrics: &super::Metrics,
    ) -> (Arc<Tracer>, Exporter) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let ratio = config.sample_ratio.clamp(0.0, 1.0);
        let threshold = if ratio >= 1.0 {
            u64::MAX
        } else {
            (ratio * u64::MAX as f64) as u64
        };
        let tracer = Arc::new(Tracer {
            tx,
            ids: IdGen::new(),
            threshold,
            dropped: metrics.spans_dropped.clone(),
        });
        let exporter = Exporter {
            rx,
            client,
            config: config.clone(),
            exported: metrics.spans_exported.clone(),
            failed: metrics.span_exports_failed.clone(),
        };
        (tracer, exporter)
    }

    fn span_id(&self) -> SpanId {
        loop {
            let id = self.ids.next_u64();
            if id != 0 {
                return id.to_be_bytes();
            }
        }
    }

    /// The trace context of a new request: a child of the caller's `traceparent` when it has a
    /// valid one (its sampling decision is kept), else a new trace sampled at `sample_ratio`.
    pub fn start(&self, headers: &HeaderMap) -> TraceContext {
        let incoming = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        match incoming {
            Some((trace_id, parent, sampled)) => TraceContext {
                trace_id,
                span_id: self.span_id(),
                parent: Some(parent),
                sampled,
            },
            None => {
                let mut trace_id = [0u8; 16];
                trace_id[..8].copy_from_slice(&self.ids.next_u64().to_be_bytes());
                trace_id[8..].copy_from_slice(&self.ids.next_u64().to_be_bytes());
                TraceContext {
                    trace_id,
                    span_id: self.span_id(),
                    parent: None,
                    sampled: self.ids.next_u64() <= self.threshold,
                }
            }
        }
    }

    /// Queues a finished span for export; dropped (and counted) if the queue is full.
    pub fn record(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

impl Exporter {
    /// Runs until every request has ended: the queue closes when the last sender (held by the
    /// gateway's state) is gone, or at the latest `grace` after shutdown began, so spans of
    /// requests finishing during the drain still go out.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) {
        let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(self.config.export_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut stop_by: Option<tokio::time::Instant> = None;
        loop {
            let deadline = async {
                match stop_by {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let flush = tokio::select! {
                _ = shutdown.cancelled(), if stop_by.is_none() => {
                    stop_by = Some(tokio::time::Instant::now() + grace + Duration::from_secs(1));
                    false
                }
                _ = deadline => break,
                _ = tick.tick() => !batch.is_empty(),
                got = self.rx.recv() => match got {
                    Some(span) => {
                        batch.push(span);
                        batch.len() >= BATCH
                    }
                    None => break,
                },
            };
            if flush {
                let spans = std::mem::take(&mut batch);
                match self.export(&spans).await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("trace export works again");
                    }
                    Ok(()) => {}
                    // One line per outage, not one per batch.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "trace export failed; spans are dropped until the collector answers");
                    }
                    Err(_) => {}
                }
            }
        }
        while let Ok(span) = self.rx.try_recv() {
            batch.push(span);
        }
        for chunk in batch.chunks(BATCH) {
            let _ = self.export(chunk).await;
        }
    }

    async fn export(&self, spans: &[Span]) -> Result<(), String> {
        if spans.is_empty() {
            return Ok(());
        }
        let body = json!({
            "resourceSpans": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": self.config.service_name}},
                    {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
                ]},
                "scopeSpans": [{
                    "scope": {"name": "switchyard", "version": env!("CARGO_PKG_VERSION")},
                    "spans": spans.iter().map(Span::to_otlp).collect::<Vec<_>>(),
                }],
            }],
        });
        let mut req = Request::post(self.config.endpoint.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        for (name, value) in &self.config.headers {
            let mut v = HeaderValue::from_str(value.expose()).map_err(|e| e.to_string())?;
            v.set_sensitive(true);
            req.headers_mut().insert(name.clone(), v);
        }
        let n = spans.len() as u64;
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            // Drain the answer so the connection can be reused.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {EXPORT_TIMEOUT:?}")));
        match &sent {
            Ok(()) => self.exported.inc_by(n),
            Err(_) => self.failed.inc_by(n),
        };
        sent
    }
}

/// `gen_ai.operation.name` for an Azure OpenAI operation path (`chat/completions`, ...).
pub fn operation_name(path: &str) -> Option<&'static str> {
    let op = path
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| rest.split_once('/').map(|(_, op)| op))
        .or_else(|| path.strip_prefix("/openai/v1/"))
        .or_else(|| path.strip_prefix("/v1/"))
        .or_else(|| path.strip_prefix("/openai/"))?;
    Some(match op.trim_end_matches('/') {
        "chat/completions" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        "responses" => "chat",
        "images/generations" => "image_generation",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_what_the_spec_rejects() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, sampled) = parse_traceparent(v).unwrap();
        assert_eq!(hex(&t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&s), "00f067aa0ba902b7");
        assert!(sampled);
        let ctx = TraceContext {
            trace_id: t,
            span_id: s,
            parent: None,
            sampled,
        };
        assert_eq!(ctx.traceparent(s).to_str().unwrap(), v);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may add fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn attempt_spans_differ_from_each_other_and_the_request() {
        let ctx = TraceContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: None,
            sampled: true,
        };
        let ids: Vec<SpanId> = (1..=5).map(|n| ctx.attempt_span(n)).collect();
        for (i, a) in ids.iter().enumerate() {
            assert_ne!(*a, ctx.span_id);
            assert!(ids[i + 1..].iter().all(|b| b != a));
        }
    }

    #[test]
    fn operation_names_follow_the_genai_conventions() {
        assert_eq!(
            operation_name("/openai/deployments/gpt-4o/chat/completions"),
            Some("chat")
        );
        assert_eq!(
            operation_name("/openai/deployments/emb/embeddings"),
            Some("embeddings")
        );
        assert_eq!(operation_name("/openai/v1/chat/completions"), Some("chat"));
        assert_eq!(
            operation_name("/openai/deployments/x/completions"),
            Some("text_completion")
        );
        assert_eq!(operation_name("/openai/deployments/x/audio/speech"), None);
    }
}
