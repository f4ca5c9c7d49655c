//! The client listener's fast HTTP/1.1 path, for plain-TCP connections.
//!
//! What SDKs send — an HTTP/1.1 `GET`/`POST`/`PUT`/`PATCH`/`DELETE` whose body, if any, has a
//! `content-length` of at most 1 MiB, with no upgrade, no `expect` and no transfer coding — is
//! parsed, served and answered here, with one read and one write per request where the bytes
//! allow: far less work than hyper's server spends on the same (see
//! bench/results/profile-2026-11-26.md).
//!
//! Anything else is not decided here: the connection, with every byte read so far, is handed
//! to hyper for the rest of its life ([`Ended::Handover`]). So HTTP/2, HTTP/1.0, chunked or
//! large uploads, `Expect: 100-continue`, WebSocket upgrades, malformed and hostile heads all
//! get hyper's well-tested handling, and this module only ever has to be right about the
//! simple case.

mod head;

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::common::{
    HOP_BY_HOP, Lines, MAX_HEADERS, header_name, parse_length, put_line, with_names,
};
use crate::body::{BoxBody, RequestBody};
use crate::error::{ErrorKind, GatewayError};
use crate::stall::StallLimit;
pub use head::{Head, NO_HOST, Parsed, parse_for_fuzz, passes_raw, valid_host};
use head::{Parse, ReadHead, has_token, parse};

/// Larger bodies are streamed by hyper rather than read whole here.
const MAX_BODY: usize = 1 << 20;
/// Written in one go once this much is buffered, even if more body is ready.
const FLUSH_AT: usize = 64 * 1024;
/// Buffers that grew past this for one large exchange are not kept for the next.
const KEEP_BUFFER: usize = 64 * 1024;
/// The write buffer's first size: a response head and a stream's event fit; a larger answer
/// grows it once for the connection. Each open stream holds one, so it starts small.
const OUT_START: usize = 1024;

/// How a connection left the fast path.
pub enum Ended {
    /// Closed (by either side, on a timeout, on shutdown, or after an error).
    Closed,
    /// Not a request this path serves: hyper takes the connection from here.
    Handover(Prefixed),
}

/// Serves requests on `stream` until it closes or a request needs hyper.
///
/// `header_timeout` bounds the wait for each request head, the idle time between requests
/// included, and each gap in a body; `body_timeout` the whole body; `max_head` is the largest
/// head accepted (hyper answers 431 beyond it).
pub async fn serve<F, Fut>(
    stream: TcpStream,
    handler: &F,
    shutdown: &CancellationToken,
    header_timeout: Duration,
    body_timeout: Duration,
    max_head: usize,
    stall: &Arc<StallLimit>,
) -> Ended
where
    F: Fn(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Result<Response<BoxBody>, Infallible>>,
{
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(4096),
        out: Vec::with_capacity(OUT_START),
        date: DateCache::default(),
        stall: stall.clone(),
    };
    // One timer for the connection's life, moved on for each head. Moving a registered timer
    // later is an atomic store; a new timer per request takes the timer wheel's lock twice.
    let deadline = tokio::time::sleep(header_timeout);
    tokio::pin!(deadline);
    loop {
        deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + header_timeout);
        let head = match tokio::select! {
            biased;
            r = conn.read_head(max_head) => Ok(r),
            _ = &mut deadline => Err(()),
            // An idle connection closes at once on shutdown; one part-way through a head too:
            // its request would only be refused.
            _ = shutdown.cancelled() => return Ended::Closed,
        } {
            Ok(Ok(ReadHead::Head(h))) => h,
            Ok(Ok(ReadHead::Invalid(e))) => {
                // The head parsed but cannot become a request: answer as hyper would, with the
                // gateway's JSON error, and close.
                let resp = e.into_response();
                let _ = conn.respond(resp, true, false).await;
                return Ended::Closed;
            }
            Ok(Ok(ReadHead::NotMine)) => return Ended::Handover(conn.handover()),
            // The header read timeout (slowloris), a closed or failed connection.
            Ok(Err(_)) | Err(_) => return Ended::Closed,
        };
        let close = head.close;
        let request = match conn.read_body(head, header_timeout, body_timeout).await {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let late = GatewayError::new(
                    ErrorKind::BodyTimeout,
                    body_late_message(header_timeout, body_timeout),
                );
                let _ = conn.respond(late.into_response(), true, false).await;
                return Ended::Closed;
            }
            Err(_) => return Ended::Closed,
        };
        // The handler runs while the connection is watched: a client that goes away takes
        // its request with it, as under hyper (the attempts stop, the accounting ends).
        let response = {
            // Inline, not boxed: a box would give back some memory per open stream once the
            // answer is made, but moving the future into it costs more on every request.
            let served = handler(request);
            tokio::pin!(served);
            tokio::select! {
                biased;
                r = &mut served => r,
                _ = gone(&mut conn.stream, &mut conn.buf, max_head) => return Ended::Closed,
            }
        };
        let Ok(response) = response;
        let close = close || shutdown.is_cancelled();
        match conn.respond(response, close, true).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return Ended::Closed,
        }
        conn.trim();
    }
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet consumed: the next head, or a pipelined request.
    buf: BytesMut,
    /// The response bytes waiting to be written.
    out: Vec<u8>,
    date: DateCache,
    /// How long a write may wait for a client that reads nothing.
    stall: Arc<StallLimit>,
}

impl Conn {
    async fn read_head(&mut self, max_head: usize) -> io::Result<ReadHead> {
        // What is buffered already (a pipelined request) is parsed before anything is read.
        let mut try_parse = !self.buf.is_empty();
        loop {
            if try_parse {
                match parse(&mut self.buf, max_head) {
                    Parse::Partial => {}
                    Parse::Head(h) => return Ok(ReadHead::Head(h)),
                    Parse::Invalid(e) => return Ok(ReadHead::Invalid(e)),
                    Parse::NotMine => return Ok(ReadHead::NotMine),
                }
            }
            let before = self.buf.len();
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // A head ends with an empty line: it is parsed again only when one may have
            // arrived, not once per byte of a head sent a byte at a time. The first bytes are
            // always parsed, so what is not HTTP/1.1 at all goes to hyper at once.
            let new = &self.buf[before.saturating_sub(3)..];
            try_parse = before == 0
                || self.buf.len() >= max_head
                || memmem::find(new, b"\n\r\n").is_some()
                || memmem::find(new, b"\n\n").is_some();
        }
    }

    /// Reads the rest of the body. The buffer grows with what arrives, not with what the head
    /// declares, and a client that goes quiet mid-body for `idle`, or has not sent it all
    /// within `whole`, is cut off (`TimedOut`): a body is neither a way to make the gateway
    /// reserve memory nor to hold a connection for free, even trickled a byte at a time.
    async fn read_body(
        &mut self,
        head: Head,
        idle: Duration,
        whole: Duration,
    ) -> io::Result<Request<RequestBody>> {
        // Most bodies came with their head: no clock is read for them.
        let mut deadline = None;
        while self.buf.len() < head.body_len {
            let now = tokio::time::Instant::now();
            let end = *deadline.get_or_insert(now + whole);
            self.buf
                .reserve((head.body_len - self.buf.len()).min(64 * 1024));
            let until = end.min(now + idle);
            match tokio::time::timeout_at(until, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        let body = self.buf.split_to(head.body_len).freeze();
        let mut req = Request::new(RequestBody::full(body).with_passthrough(head.passthrough));
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = head.headers;
        Ok(req)
    }

    /// Writes `resp`; `Ok(true)` when the connection can take another request.
    async fn respond(
        &mut self,
        resp: Response<BoxBody>,
        mut close: bool,
        watch: bool,
    ) -> io::Result<bool> {
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let mut headers = parts.headers;
        let passthrough = body.take_passthrough();
        if let Some(c) = headers.remove(header::CONNECTION) {
            close |= has_token(c.as_bytes(), b"close");
        }
        headers.remove(header::TRANSFER_ENCODING);
        let framing = if status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status.is_informational()
        {
            if status != StatusCode::NOT_MODIFIED {
                headers.remove(header::CONTENT_LENGTH);
            }
            Framing::Empty
        } else {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .map(|v| parse_length(v.as_bytes()));
            match declared {
                Some(Some(n)) => Framing::Length(n),
                // A length that does not parse is not passed on: the body frames itself.
                Some(None) => {
                    headers.remove(header::CONTENT_LENGTH);
                    chunked_or_exact(&body, &mut headers)
                }
                None => chunked_or_exact(&body, &mut headers),
            }
        };

        let out = &mut self.out;
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &headers {
            put_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(raw) = &passthrough {
            out.extend_from_slice(&raw.lines);
        }
        if !headers.contains_key(header::DATE) && !passthrough.as_ref().is_some_and(|r| r.date) {
            put_line(out, b"date", self.date.now());
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        // The map is written: a stream that runs for minutes should not hold it, nor the
        // backend's read buffer its values point into.
        drop(headers);
        drop(passthrough);

        let mut written: u64 = 0;
        let ended_cleanly = loop {
            // What the body has ready goes out with the head (or the previous frame) in one
            // write; the buffer is written before waiting on a body that has nothing yet, so a
            // stream's chunks reach the client as they come.
            let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            let frame = match polled {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    self.flush().await?;
                    if watch {
                        tokio::select! {
                            biased;
                            f = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
                            _ = gone(&mut self.stream, &mut self.buf, FLUSH_AT) => return Ok(false),
                        }
                    } else {
                        poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                    }
                }
            };
            match frame {
                None => {
                    if framing == Framing::Chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    break match framing {
                        Framing::Length(n) => written == n,
                        _ => true,
                    };
                }
                Some(Err(e)) => {
                    // A backend that failed mid-body: the client must see a cut response, not
                    // a complete-looking one, so no last chunk and the connection closes.
                    tracing::debug!(error = %e, "response body failed");
                    let _ = self.flush().await;
                    return Ok(false);
                }
                Some(Ok(frame)) => {
                    let Some(data) = data_of(frame) else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    written += data.len() as u64;
                    match framing {
                        Framing::Empty => {}
                        Framing::Length(n) => {
                            if written > n {
                                // More than the head promised: what fits goes out, then the
                                // connection closes rather than desynchronise the client.
                                let fits = data.len() - (written - n) as usize;
                                self.out.extend_from_slice(&data[..fits]);
                                let _ = self.flush().await;
                                return Ok(false);
                            }
                            self.out.extend_from_slice(&data);
                        }
                        Framing::Chunked => {
                            let mut digits = [0u8; 16];
                            self.out.extend_from_slice(hex(data.len(), &mut digits));
                            self.out.extend_from_slice(b"\r\n");
                            self.out.extend_from_slice(&data);
                            self.out.extend_from_slice(b"\r\n");
                        }
                    }
                    if self.out.len() >= FLUSH_AT {
                        self.flush().await?;
                    }
                }
            }
        };
        self.flush().await?;
        if close || !ended_cleanly {
            let _ = self.stream.shutdown().await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Writes out what is buffered. A client that takes none of it for the stall limit is cut
    /// off: its answer, and the backend connection behind it, are not held for it. (No timer
    /// while the socket takes the bytes, as it nearly always does.)
    async fn flush(&mut self) -> io::Result<()> {
        let mut at = 0;
        while at < self.out.len() {
            match self.stream.try_write(&self.out[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(self.stall.get(), self.stream.writable())
                        .await
                        .map_err(|_| crate::stall::stalled())??;
                }
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Drops buffers a large exchange grew, so an idle keep-alive connection stays small.
    fn trim(&mut self) {
        if self.out.capacity() > KEEP_BUFFER {
            self.out = Vec::with_capacity(OUT_START);
        }
        if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
            self.buf = BytesMut::with_capacity(4096);
        }
    }

    fn handover(self) -> Prefixed {
        Prefixed {
            pre: self.buf.freeze(),
            io: self.stream,
        }
    }
}

/// What a client whose body came too slowly is told.
pub fn body_late_message(gap: Duration, whole: Duration) -> String {
    format!(
        "the request body did not arrive in time: no bytes for {} s (server.header_read_timeout), or not all within {} s (server.body_read_timeout)",
        gap.as_secs_f64(),
        whole.as_secs_f64()
    )
}

/// Resolves when the client closes its side or the connection fails. Bytes that arrive in the
/// meantime (a pipelined request) are kept, up to `limit`; past it the client is not read
/// until this request is answered.
async fn gone(stream: &mut TcpStream, buf: &mut BytesMut, limit: usize) {
    loop {
        if buf.len() >= limit {
            return std::future::pending().await;
        }
        buf.reserve(1024);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

fn chunked_or_exact(body: &BoxBody, headers: &mut HeaderMap) -> Framing {
    match body.size_hint().exact() {
        Some(n) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Framing::Length(n)
        }
        None => Framing::Chunked,
    }
}

fn data_of(frame: Frame<Bytes>) -> Option<Bytes> {
    // Trailers are not sent: hyper sends them only to clients that ask (`TE: trailers`), and
    // no backend answer the gateway forwards carries any it must keep.
    frame.into_data().ok()
}

fn hex(mut n: usize, digits: &mut [u8; 16]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &digits[i..];
        }
    }
}

/// The `date` header's value, formatted once a second rather than once a response.
#[derive(Default)]
struct DateCache {
    second: u64,
    text: Vec<u8>,
}

impl DateCache {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

/// A connection handed to hyper: the bytes already read come first.
pub struct Prefixed {
    pre: Bytes,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
