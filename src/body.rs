//! Body types shared by the gateway and the simulator.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

/// Response header lines a backend sent that the gateway neither reads nor sets, kept as bytes
/// (`name: value\r\n` each): filling a `HeaderMap` with them only to write them out again is
/// dear, and Azure answers with a dozen such headers
/// (`apim-request-id`, `x-ms-region`, `azureml-model-session`, ...). They travel with the
/// response's body ([`BoxBody`]); the HTTP/1.1 server writes them after the map, and anything
/// else puts them in the map first (`RawHeaders::append_to`, in `http1`).
#[derive(Debug)]
pub struct RawHeaders {
    pub(crate) lines: Bytes,
    /// Whether one of them is `date`, which the server would otherwise add.
    pub(crate) date: bool,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one response body type: whatever is inside, it is boxed to this.
///
/// It also carries the header lines of a backend's response that the gateway passes on
/// unread ([`RawHeaders`]). They travel with the body rather than in the response's
/// extensions, where an entry costs a hash map and three allocations per response; a body read
/// whole becomes a [`Whole`], which keeps them, and the one wrapper put around a backend's body
/// on its way to the client moves them in its constructor (`pipeline::respond::track`). They
/// sit in the box's one
/// allocation, so that a `Response<BoxBody>` stays 128 bytes: responses move through several
/// futures, and a larger one is moved with calls to `memcpy` instead of a few instructions.
pub struct BoxBody(Pin<Box<Boxed<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>>);

pin_project_lite::pin_project! {
    struct Boxed<B: ?Sized> {
        passthrough: Option<RawHeaders>,
        #[pin]
        body: B,
    }
}

impl BoxBody {
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        BoxBody(Box::pin(Boxed {
            passthrough: None,
            body,
        }))
    }

    pub fn with_passthrough(mut self, raw: Option<RawHeaders>) -> Self {
        *self.0.as_mut().project().passthrough = raw;
        self
    }

    pub fn take_passthrough(&mut self) -> Option<RawHeaders> {
        self.0.as_mut().project().passthrough.take()
    }

    /// The whole body, when it ends within `max` bytes and `timeout`, and its header lines.
    pub async fn read_whole(mut self, max: usize, timeout: std::time::Duration) -> Whole {
        let lines = self.take_passthrough();
        let bytes = tokio::time::timeout(timeout, collect_limited(self, max))
            .await
            .ok()
            .flatten();
        Whole { bytes, lines }
    }
}

/// A body read whole (or found too long or too slow to read), with the header lines that came
/// with it.
#[derive(Debug, Default)]
pub struct Whole {
    /// `None` when the body ran past the limit or the time allowed.
    pub bytes: Option<Bytes>,
    lines: Option<RawHeaders>,
}

impl Whole {
    /// A body of these bytes (none if there are none), with the same header lines.
    pub fn into_body(self) -> BoxBody {
        full(self.bytes.unwrap_or_default()).with_passthrough(self.lines)
    }
}

/// The whole body if it ends within `max` bytes.
async fn collect_limited(mut body: BoxBody, max: usize) -> Option<Bytes> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > max {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(Bytes::from(buf))
}

impl Body for BoxBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.as_mut().project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.body.size_hint()
    }
}

impl std::fmt::Debug for BoxBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoxBody")
            .field("passthrough", &self.0.passthrough)
            .finish_non_exhaustive()
    }
}

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    BoxBody::new(http_body_util::Full::new(bytes.into()).map_err(|never| match never {}))
}

/// A body fed chunk by chunk through a bounded channel; an `Err` item aborts the body
/// (the connection is cut, as a backend dying mid-stream would).
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl ChannelBody {
    pub fn new(capacity: usize) -> (mpsc::Sender<Result<Bytes, BoxError>>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A client's request body as the gateway's handlers get it: streamed by hyper (HTTP/2, TLS,
/// chunked uploads, anything unusual) or already read whole by the fast HTTP/1.1 path, which
/// also hands over the header lines it passes on to backends unread (see `http1::server`).
pub enum RequestBody {
    Streaming(hyper::body::Incoming),
    Full {
        body: Option<Bytes>,
        /// `name: value\r\n` lines; empty when there are none.
        passthrough: Bytes,
    },
}

impl RequestBody {
    /// The whole body, when the listener read it already.
    pub fn full(bytes: Bytes) -> RequestBody {
        RequestBody::Full {
            body: (!bytes.is_empty()).then_some(bytes),
            passthrough: Bytes::new(),
        }
    }

    pub fn with_passthrough(mut self, lines: Bytes) -> RequestBody {
        if let RequestBody::Full { passthrough, .. } = &mut self {
            *passthrough = lines;
        }
        self
    }

    /// The request's header lines for backends that are not in its map (empty if none).
    pub fn take_passthrough(&mut self) -> Bytes {
        match self {
            RequestBody::Full { passthrough, .. } => std::mem::take(passthrough),
            RequestBody::Streaming(_) => Bytes::new(),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Full { body, .. } => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(b) => b.is_end_stream(),
            RequestBody::Full { body, .. } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(b) => b.size_hint(),
            RequestBody::Full { body, .. } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
