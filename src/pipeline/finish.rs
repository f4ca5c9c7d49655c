//! The finish phase: when the answer's body ends (or the client goes away), the request is
//! accounted for in one place: the access log line, token counts in the metrics and the status
//! page's totals, the usage ledger's hour, the OTLP metrics, the trace's spans, and the
//! consumer's reservation settled with what was used.

use crate::telemetry::trace::{Attr, Span, SpanKind, Tracer};
use crate::telemetry::{AttemptOutcome, BackendStats};
use crate::usage::ledger::Tally;
use crate::usage::{Tap, Usage};

use super::context::{RequestContext, first_chars};

impl RequestContext {
    /// The response body ended: count its tokens and settle the consumer's reservation.
    pub(super) fn finish(&mut self, usage: Option<Usage>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(l) = self.learner.as_mut() {
            l.finish();
        }
        // What it cost: only answers that served something are charged.
        let cost = self
            .price
            .zip(usage.filter(|_| self.success))
            .map(|(p, u)| p.cost(&u));
        let l = &*self;
        tracing::info!(
            target: "switchyard::access",
            request_id = l.request_id.to_str().unwrap_or(""),
            method = %l.method,
            path = first_chars(l.uri.path(), 256),
            deployment = l.deployment.as_deref().unwrap_or("-"),
            requested = l.requested.as_deref(),
            consumer = %self.consumer,
            status = l.status,
            backend = self.backend.as_deref().unwrap_or("none"),
            attempts = l.attempts,
            tried = %l.attempts_log.tried,
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            cached_tokens = usage.map(|u| u.cached_tokens),
            reasoning_tokens = usage.map(|u| u.reasoning_tokens),
            audio_tokens = usage.map(|u| u.audio_tokens),
            cost,
            first_byte_ms = l.first_byte.as_secs_f64() * 1000.0,
            total_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        if let Some(c) = &self.counters {
            // The hour of the access log line's own time stamp.
            let hour = crate::usage::ledger::hour_of(std::time::SystemTime::now());
            let nanos = cost.map_or(0, crate::usage::ledger::nanos);
            c.record(&self.metrics, hour, &Tally::request(usage.as_ref(), nanos));
        }
        if let Some(u) = usage {
            if let Some(s) = &self.stats {
                BackendStats::add(&s.tokens, u.total_tokens);
            }
            if let Some(c) = &self.counters {
                c.add_usage(&self.metrics, &u);
                if let Some(cost) = cost {
                    c.add_cost(&self.metrics, cost);
                }
            }
        }
        if let Some(otlp) = &self.otlp {
            otlp.record(&crate::telemetry::otlp::Finished {
                operation: self.operation,
                requested: self.requested.as_deref(),
                deployment: self.counters.as_ref().map_or("-", |c| c.deployment()),
                consumer: &self.consumer,
                backend: self.backend.as_deref().unwrap_or("none"),
                status: self.status,
                stream_failed: self.stream_failed,
                duration: self.started.elapsed(),
                usage,
                cost,
            });
        }
        if let Some(tracer) = self.tracer.take() {
            self.record_spans(&tracer, usage, cost);
        }
        if let Some(r) = self.reservation.take() {
            // A failed answer used nothing; a good one without readable usage keeps the estimate.
            let used = if self.success {
                usage.map(|u| crate::limits::Used {
                    tokens: u.total_tokens,
                    cost: cost.map_or(0, crate::config::micros),
                })
            } else {
                Some(crate::limits::Used::default())
            };
            r.settle(used);
        }
    }
}

impl RequestContext {
    /// The request's SERVER span and a CLIENT span per attempt, with the GenAI attributes.
    fn record_spans(&mut self, tracer: &Tracer, usage: Option<Usage>, cost: Option<f64>) {
        let attempt_spans = std::mem::take(&mut self.attempts_log.spans);
        let l = &*self;
        let Some(ctx) = l.attempts_log.trace else {
            return;
        };
        let provider = || -> [(&'static str, Attr); 2] {
            [
                ("gen_ai.provider.name", "azure.ai.openai".into()),
                // The older name, which many backends for GenAI traces still read.
                ("gen_ai.system", "az.ai.openai".into()),
            ]
        };
        let name = |model: Option<&str>| match (l.operation, model) {
            (Some(op), Some(m)) => format!("{op} {m}"),
            (Some(op), None) => op.to_string(),
            (None, _) => l.method.to_string(),
        };
        let mut attrs: Vec<(&'static str, Attr)> = Vec::with_capacity(20);
        if let Some(op) = l.operation {
            attrs.push(("gen_ai.operation.name", op.into()));
            attrs.extend(provider());
        }
        let asked = l.requested.as_deref().or(l.deployment.as_deref());
        if let Some(d) = asked {
            attrs.push(("gen_ai.request.model", d.to_string().into()));
        }
        if let (Some(_), Some(served)) = (&l.requested, &l.deployment) {
            attrs.push(("switchyard.fallback", served.clone().into()));
        }
        if let Some(p) = &l.params {
            if let Some(n) = p.max_tokens.or(p.max_completion_tokens) {
                attrs.push(("gen_ai.request.max_tokens", n.into()));
            }
            if let Some(t) = p.temperature {
                attrs.push(("gen_ai.request.temperature", t.into()));
            }
            if let Some(t) = p.top_p {
                attrs.push(("gen_ai.request.top_p", t.into()));
            }
        }
        if let Some(u) = usage {
            attrs.push(("gen_ai.usage.input_tokens", u.prompt_tokens.into()));
            attrs.push(("gen_ai.usage.output_tokens", u.completion_tokens.into()));
            attrs.push((
                "gen_ai.usage.cache_read.input_tokens",
                u.cached_tokens.into(),
            ));
            attrs.push(("gen_ai.usage.reasoning_tokens", u.reasoning_tokens.into()));
            attrs.push(("switchyard.usage.audio_tokens", u.audio_tokens.into()));
        }
        if let Some(c) = cost {
            attrs.push(("switchyard.cost", c.into()));
        }
        attrs.push(("http.request.method", l.method.to_string().into()));
        attrs.push((
            "url.path",
            first_chars(l.uri.path(), 256).to_string().into(),
        ));
        attrs.push(("http.response.status_code", u64::from(l.status).into()));
        attrs.push((
            "switchyard.request_id",
            l.request_id.to_str().unwrap_or("").to_string().into(),
        ));
        attrs.push(("switchyard.consumer", self.consumer.to_string().into()));
        if let Some(b) = &self.backend {
            attrs.push(("switchyard.backend", b.to_string().into()));
        }
        attrs.push(("switchyard.attempts", u64::from(l.attempts).into()));
        let error = if self.stream_failed {
            Some("stream_error".to_string())
        } else if l.status >= 500 {
            Some(l.status.to_string())
        } else {
            None
        };
        if let Some(e) = &error {
            attrs.push(("error.type", e.clone().into()));
        }
        tracer.record(Span {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent: ctx.parent,
            name: name(asked),
            kind: SpanKind::Server,
            start: l.wall_start,
            end: l.wall_start + self.started.elapsed(),
            attributes: attrs,
            error,
        });
        for a in attempt_spans {
            let model = a.model.as_deref().or(asked);
            let mut attrs: Vec<(&'static str, Attr)> = Vec::with_capacity(12);
            if let Some(op) = l.operation {
                attrs.push(("gen_ai.operation.name", op.into()));
                attrs.extend(provider());
            }
            if let Some(m) = model {
                attrs.push(("gen_ai.request.model", m.into()));
            }
            attrs.push(("server.address", a.host.clone().into()));
            attrs.push(("server.port", u64::from(a.port).into()));
            attrs.push(("switchyard.backend", a.backend.to_string().into()));
            attrs.push(("switchyard.attempt", u64::from(a.attempt).into()));
            let error = match a.outcome {
                AttemptOutcome::Answered(status) => {
                    attrs.push((
                        "http.response.status_code",
                        u64::from(status.as_u16()).into(),
                    ));
                    (status.as_u16() >= 400).then(|| status.as_str().to_string())
                }
                other => Some(other.label().to_string()),
            };
            if let Some(e) = &error {
                attrs.push(("error.type", e.clone().into()));
            }
            tracer.record(Span {
                trace_id: ctx.trace_id,
                span_id: a.span_id,
                parent: Some(ctx.span_id),
                name: name(model),
                kind: SpanKind::Client,
                start: a.start,
                end: a.start + a.duration,
                attributes: attrs,
                error,
            });
        }
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        // hyper stops polling a body once its content-length is written, so the end is often
        // seen here: settle with whatever usage the tap read.
        if !self.finished {
            let usage = self.tap.as_ref().and_then(Tap::usage);
            self.finish(usage);
        }
        self.metrics.in_flight.dec();
        // Empty when the client left before any answer: nothing was served, nothing to time.
        if let Some(s) = &self.stats {
            s.duration_histogram
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}
