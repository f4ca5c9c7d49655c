//! The respond phase: the answer's status and backend are counted, the gateway's own headers
//! put ahead of the backend's, usage read from the body as it passes, and an upgrade tunnelled.
//! The request's context rides in the body ([`TrackedBody`]) until the body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame};
use hyper_util::rt::TokioIo;

use crate::body::{BoxBody, BoxError};
use crate::http1::{RawHeaders, put_line};
use crate::live::{GatewayState, Snapshot};
use crate::telemetry::{BackendLabels, BackendStats, status_class};
use crate::usage::Tap;

use super::context::RequestContext;
use super::{Failed, Served};

/// The response the client gets: its head, and its body with the gateway's own header lines
/// ahead of the backend's, for [`track`] to carry `ctx` to its end.
pub(super) fn respond(
    state: &GatewayState,
    snap: &Snapshot,
    ctx: &mut RequestContext,
    outcome: Result<Served, Failed>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<BoxBody> {
    let (answer_backend, limit, mut resp) = match outcome {
        Ok(served) => {
            ctx.learner = served.learner;
            ctx.lease = served.lease;
            ctx.attempts = served.attempts;
            (served.backend, served.limit, served.response)
        }
        Err(failed) => {
            ctx.attempts = failed.attempts;
            (failed.backend, None, failed.error.into_response())
        }
    };
    let backend_name = answer_backend.map(|i| snap.proxy.backends[i].name.clone());

    let status = resp.status();
    let deployment_label = match &ctx.deployment {
        None => "-",
        Some(d) if snap.proxy.balancer().tracks(d) => d.as_str(),
        Some(_) => "other",
    };
    let counters = state.metrics.request_counters(
        deployment_label,
        backend_name.as_deref().unwrap_or("none"),
        status_class(status.as_u16()),
        &ctx.consumer,
    );
    counters.requests.inc();
    ctx.status = status.as_u16();
    ctx.first_byte = ctx.started.elapsed();
    let stats = answer_backend.map(|i| snap.proxy.backends[i].stats.clone());
    if let Some(s) = &stats {
        BackendStats::add(&s.served, 1);
        BackendStats::add(&s.ttfb_us, ctx.first_byte.as_micros() as u64);
        BackendStats::add(&s.ttfb_count, 1);
        s.ttfb_histogram.observe(ctx.first_byte.as_secs_f64());
        // What the gateway itself added: all but the time spent waiting on backends.
        let overhead = ctx.first_byte.saturating_sub(ctx.attempts_log.upstream);
        state.metrics.overhead.observe(overhead.as_secs_f64());
    }

    if status == http::StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        tunnel(state, client_upgrade, &mut resp);
    }

    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let sse = content_type.is_some_and(|v| v.starts_with("text/event-stream"));
    let strip = ctx.usage_asked;
    // Usage is read from whatever a backend answered (never from the gateway's own errors).
    let tap = backend_name
        .as_ref()
        .and_then(|_| Tap::new(content_type, strip));
    let passed = resp.body_mut().take_passthrough();
    // Who served: the deployment asked for, or the fallback that answered instead. A body's
    // `model` may hold anything; only a name fit for a header line is sent back.
    let deployment = answer_backend
        .and(ctx.deployment.as_deref())
        .map(str::as_bytes)
        .filter(|d| d.iter().all(|b| (0x21..0x7f).contains(b)));
    let lines = own_lines(
        &ctx.request_id,
        answer_backend.and_then(|i| snap.proxy.backends[i].name_header.as_ref()),
        deployment,
        ctx.attempts,
        passed,
    );
    ctx.sse = sse;
    if tap.is_some() {
        ctx.price = snap.proxy.price(ctx.deployment.as_deref());
    }
    ctx.backend = Some(backend_name.unwrap_or_else(|| Arc::from("none")));
    ctx.counters = Some(counters);
    ctx.success = status.is_success();
    ctx.reservation = limit.map(|l| l.admission);
    ctx.tap = tap;
    ctx.stats = stats;
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.with_passthrough(Some(lines)))
}

/// `body` in a [`TrackedBody`] that ends `ctx` with it, its header lines moved to the new box.
/// The context is moved here once: it is large, and every move is a `memcpy`
/// (bench/results/pipeline-2026-12-02.md).
pub(super) fn track(mut body: BoxBody, ctx: RequestContext) -> BoxBody {
    let lines = body.take_passthrough();
    BoxBody::new(TrackedBody {
        inner: body,
        ended: false,
        ctx,
    })
    .with_passthrough(lines)
}

/// Joins the client's and the backend's upgraded connections once both sides have switched.
fn tunnel(state: &GatewayState, client: hyper::upgrade::OnUpgrade, resp: &mut Response<BoxBody>) {
    let backend = hyper::upgrade::on(resp);
    let shutdown = state.shutdown.clone();
    let grace = state.grace;
    state.tasks.spawn(async move {
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut backend = TokioIo::new(backend);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "websocket tunnel closed with an error");
                }
            }
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::info!("closing a websocket tunnel at the end of the shutdown grace period");
            }
        }
    });
}

pin_project_lite::pin_project! {
    /// The response body as the client gets it. If the backend fails after the headers went out,
    /// an event stream gets a final SSE `error` event (and no `[DONE]`), so SDKs raise an error
    /// instead of taking a cut stream for a complete one; other bodies are cut off.
    pub(super) struct TrackedBody {
        #[pin]
        inner: BoxBody,
        ended: bool,
        ctx: RequestContext,
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.ended {
                return Poll::Ready(None);
            }
            let polled = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(p) => p,
            };
            match polled {
                Some(Ok(frame)) => {
                    if let (Some(l), Some(data)) = (this.ctx.learner.as_mut(), frame.data_ref()) {
                        l.feed(data);
                    }
                    let frame = match (frame.into_data(), this.ctx.tap.as_mut()) {
                        (Ok(data), Some(tap)) => {
                            let out = tap.feed(data);
                            if out.is_empty() {
                                continue; // part of an event held until it is whole
                            }
                            Frame::data(out)
                        }
                        (Ok(data), None) => Frame::data(data),
                        (Err(other), _) => other,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                None => {
                    *this.ended = true;
                    let (rest, usage) = match this.ctx.tap.as_mut() {
                        Some(tap) => tap.finish(),
                        None => (Bytes::new(), None),
                    };
                    this.ctx.finish(usage);
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Some(Err(e)) => {
                    this.ctx.stream_failed = true;
                    let backend = this.ctx.backend.as_deref().unwrap_or("none");
                    tracing::warn!(backend, error = %e, "response body failed mid-stream");
                    this.ctx
                        .metrics
                        .stream_errors
                        .get_or_create(&BackendLabels {
                            backend: backend.to_string(),
                        })
                        .inc();
                    if !this.ctx.sse {
                        return Poll::Ready(Some(Err(e)));
                    }
                    *this.ended = true;
                    let body = crate::error::openai_error_body(
                        "backend_stream_error",
                        &format!("The backend's stream broke off: {e}"),
                        "gateway_error",
                    );
                    let mut event = Vec::with_capacity(body.len() + 8);
                    event.extend_from_slice(b"data: ");
                    event.extend_from_slice(&body);
                    event.extend_from_slice(b"\n\n");
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Only once the end was seen here: a body that says it is complete would otherwise not
        // be polled to its end, and the tap and the limits would never hear it ended.
        self.ended
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The headers the gateway sets on every answer (`x-request-id`, and `x-switchyard-backend`,
/// `-deployment` and `-attempts` when a backend was tried), as lines ahead of those passed on
/// from the backend:
/// cheaper than three inserts into the response's map, a name hash and a probe each
/// (bench/results/profile-2026-11-26.md). A backend's own headers of these names never get this far (the
/// backend clients drop them).
fn own_lines(
    request_id: &HeaderValue,
    backend: Option<&HeaderValue>,
    deployment: Option<&[u8]>,
    attempts: u32,
    passed: Option<RawHeaders>,
) -> RawHeaders {
    let (passed, date) = passed.map_or((Bytes::new(), false), |r| (r.lines, r.date));
    let mut digits = [0u8; 20];
    let attempts = (attempts > 0).then(|| crate::http1::decimal(u64::from(attempts), &mut digits));
    let mut out = BytesMut::with_capacity(
        request_id.len()
            + backend.map_or(0, |b| b.len())
            + deployment.map_or(0, <[u8]>::len)
            + attempts.map_or(0, <[u8]>::len)
            + passed.len()
            // The four names, their `: ` and line ends.
            + 96,
    );
    let mut line = |name: &[u8], value: &[u8]| put_line(&mut out, name, value);
    line(b"x-request-id", request_id.as_bytes());
    if let Some(b) = backend {
        line(b"x-switchyard-backend", b.as_bytes());
    }
    if let Some(d) = deployment {
        line(b"x-switchyard-deployment", d);
    }
    if let Some(n) = attempts {
        line(b"x-switchyard-attempts", n);
    }
    out.extend_from_slice(&passed);
    RawHeaders {
        lines: out.freeze(),
        date,
    }
}
