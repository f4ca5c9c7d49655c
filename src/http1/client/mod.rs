//! HTTP/1.1 to backends over connections the request's own task drives.
//!
//! hyper-util's pooled client runs every connection as a task of its own and hands each request
//! to it through a channel and a oneshot, after looking the pool up by a SipHash of scheme and
//! authority: a large share of the gateway's work per request, and a task wake-up in each
//! direction (measured in bench/results/profile-2026-11-26.md). Here a backend's idle connections sit in a short LIFO list;
//! a request takes one, writes its head and body in one go, reads the response head, and its
//! body reads straight from the socket as the client's connection asks for it. When the body
//! ends cleanly the connection goes back to the list.
//!
//! Only what a proxy to Azure OpenAI needs: no pipelining, no upgrades (those take the hyper
//! client), no request trailers. Responses are read per RFC 9112 §6.3: no body for HEAD, 1xx,
//! 204 and 304; chunked; `content-length`; or until the backend closes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::common::{GATEWAY_SETS, HOP_BY_HOP, MAX_HEADERS, RawHeaders, with_names};
use super::common::{Lines, header_name, parse_length};
use crate::body::BoxError;

mod body;
mod pool;

pub use body::H1Body;
use body::State;
use pool::Conn;
pub use pool::{HostPool, Pools, enter_worker};

/// A request body up to this size is copied after the head and sent with it in one write.
pub const INLINE_BODY: usize = 16 * 1024;
/// A response head larger than this is refused (hyper's default limit is about 400 KB; Azure's
/// heads are about 1.5 KB).
const MAX_HEAD: usize = super::common::MAX_HEAD_BYTES;
/// A chunk-size line (with extensions) or a trailer line longer than this is refused.
const MAX_LINE: usize = 4096;
/// What a read asks room for at first: an SSE event or a small answer fits, and 2,000 open
/// streams do not hold 2,000 large buffers.
const READ_MIN: usize = 4 * 1024;
/// What it grows to while reads keep filling the room they had (a large body).
const READ_MAX: usize = 64 * 1024;
/// Idle connections kept per backend; a burst's extra connections close as they come back.
const MAX_IDLE: usize = 128;
/// An idle connection closes after this long unused, so a quiet gateway gives its memory back.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle connections are checked against `IDLE_TIMEOUT`.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Why an exchange failed, for the caller's error kind.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (DNS, refused, TLS handshake, connect timeout).
    Connect(String),
    /// The connection broke or the backend's answer was not valid HTTP/1.1; `delivered`: after
    /// the whole request was written.
    Protocol { message: String, delivered: bool },
    /// The deadline passed before the response head came; `delivered` as above.
    TimedOut { delivered: bool },
}

enum Failure {
    /// The request could not be written whole.
    Unwritten(io::Error),
    /// The connection ended or broke before a byte of the response came.
    Unanswered(io::Error),
    /// It broke after the response began, or the response was not valid.
    Broken(String),
}

impl Failure {
    fn describe(&self, authority: &http::uri::Authority) -> String {
        match self {
            Failure::Unwritten(e) => {
                format!("backend {authority} closed the connection as the request was sent: {e}")
            }
            Failure::Unanswered(e) => format!(
                "backend {authority} closed the connection after the request was sent, without an answer: {e}"
            ),
            Failure::Broken(e) => format!("backend {authority}: {e}"),
        }
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    /// The headers the gateway reads or sets, without the hop-by-hop ones.
    headers: HeaderMap,
    /// The rest, passed on as they came.
    passthrough: Option<RawHeaders>,
    keep_alive: bool,
    /// Whether `transfer-encoding`'s final coding is chunked; `None` without one.
    chunked: Option<bool>,
    length: Length,
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes `wire` (and `rest`, a body too large to copy after the head), then reads the head.
/// `written` is set once the request is all written.
async fn exchange(
    conn: &mut Conn,
    wire: &[u8],
    rest: &[u8],
    written: &AtomicBool,
) -> Result<Head, Failure> {
    let sent = match conn.io.write_all(wire).await {
        Ok(()) if !rest.is_empty() => conn.io.write_all(rest).await,
        other => other,
    };
    sent.and(conn.io.flush().await)
        .map_err(Failure::Unwritten)?;
    written.store(true, Relaxed);
    loop {
        match parse_head(&mut conn.buf).map_err(Failure::Broken)? {
            // This client sends no upgrade (those go through hyper's): a 101 would make what
            // follows another protocol's bytes, not this request's answer.
            Some(h) if h.status == StatusCode::SWITCHING_PROTOCOLS => {
                return Err(Failure::Broken(
                    "answered 101 Switching Protocols to a request that asked for no upgrade"
                        .into(),
                ));
            }
            Some(h) if h.status.is_informational() => continue, // 100, 103: the real one follows
            Some(h) => return Ok(h),
            None => {}
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(Failure::Broken(format!(
                "response head larger than {MAX_HEAD} bytes"
            )));
        }
        let had = conn.buf.len();
        let n = conn.read_some().await.map_err(|e| match had {
            0 => Failure::Unanswered(e),
            _ => Failure::Broken(format!("reading the response head: {e}")),
        })?;
        if n == 0 {
            return Err(match had {
                0 => Failure::Unanswered(io::ErrorKind::UnexpectedEof.into()),
                _ => Failure::Broken("connection closed inside the response head".into()),
            });
        }
    }
}

/// Parses a complete head off the front of `buf`; `None` when more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialised, and the spans below kept small: zeroing 4 KB per response was a
    // tenth of the parse.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default();
    let len = match parsing.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Complete(_)) => {
            return Err(format!("response head larger than {MAX_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| "invalid status code".to_string())?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Positions in `buf`, so that values can share one frozen copy of the head.
    let base = buf.as_ptr() as usize;
    // (A head is at most `MAX_HEAD`, so every offset and length fits in a `u16`.)
    const _: () = assert!(MAX_HEAD <= u16::MAX as usize + 1);
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = parsed.headers.len();
    let at = |p: *const u8| (p as usize - base) as u16;
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = at(h.name.as_ptr());
        let value = at(h.value.as_ptr());
        *span = (name, h.name.len() as u16, value, h.value.len() as u16);
    }
    let raw = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut passthrough = Lines::new(len);
    let mut date = false;
    let mut keep_alive = version == Version::HTTP_11;
    let mut transfer_coding = None;
    let mut length = Length::Absent;
    // `Connection` names other headers.
    let mut listed = false;
    for &(n, nl, v, vl) in &spans[..count] {
        let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
        let name_bytes = &raw[n..n + nl];
        let value = &raw[v..v + vl];
        match role(name_bytes) {
            // Hop-by-hop headers (RFC 9110 §7.6.1) are read here for framing and reuse, and
            // never reach the client: its connection is not this one. (Upgrades, which keep
            // them, go through hyper's client.)
            Role::Connection => {
                for token in value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive |= version == Version::HTTP_10;
                    } else {
                        listed |= !token.is_empty();
                    }
                }
            }
            Role::TransferEncoding => transfer_coding = Some(value),
            Role::Dropped => {}
            r @ (Role::Read | Role::ContentLength) => {
                if matches!(r, Role::ContentLength) {
                    length = length.and(value);
                }
                let name = header_name(name_bytes)
                    .map_err(|_| "invalid header name in the response".to_string())?;
                let value = HeaderValue::from_maybe_shared(raw.slice(v..v + vl))
                    .map_err(|_| format!("invalid value for response header {name}"))?;
                headers.append(name, value);
            }
            Role::Passed { date: is_date } => {
                date |= is_date;
                passthrough.push(&raw, n..n + nl, v..v + vl);
            }
        }
    }
    if transfer_coding.is_some() {
        // The body frames itself; a length beside it would describe the coded bytes, and a
        // client given both could read the answer short (RFC 9112 §6.3).
        headers.remove(http::header::CONTENT_LENGTH);
    }
    // Chunked only when it is the final coding; any other is read until close.
    let chunked = transfer_coding.map(|last| {
        last.rsplit(|b| *b == b',')
            .next()
            .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    });
    let mut lines = passthrough.finish(&raw);
    if listed {
        drop_listed(&raw, &spans[..count], &mut headers, &mut lines);
    }
    let passthrough = (!lines.is_empty()).then_some(RawHeaders { lines, date });
    Ok(Some(Head {
        status,
        version,
        headers,
        passthrough,
        keep_alive,
        chunked,
        length,
    }))
}

/// Takes out the headers a backend's `Connection` names (RFC 9110 §7.6.1: hop-by-hop too,
/// they stay on this connection), from the map and from the lines passed on. Rare: done apart
/// from the head's one pass. Framing and `Connection` itself were read whatever it names.
#[cold]
fn drop_listed(
    raw: &Bytes,
    spans: &[(u16, u16, u16, u16)],
    headers: &mut HeaderMap,
    lines: &mut Bytes,
) {
    // (Not through `role`, which the head's pass has inlined.)
    let framing = [&b"content-length"[..], b"transfer-encoding"];
    let listed: Vec<&[u8]> = spans
        .iter()
        .filter(|&&(n, nl, ..)| {
            raw[n as usize..][..nl as usize].eq_ignore_ascii_case(b"connection")
        })
        .flat_map(|&(_, _, v, vl)| raw[v as usize..][..vl as usize].split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !framing.iter().any(|f| f.eq_ignore_ascii_case(t)))
        .collect();
    for name in &listed {
        if let Ok(name) = HeaderName::from_bytes(&name.to_ascii_lowercase()) {
            headers.remove(name);
        }
    }
    let mut kept = BytesMut::with_capacity(lines.len());
    for line in lines.split_inclusive(|b| *b == b'\n') {
        let name = line.split(|b| *b == b':').next().unwrap_or(&[]);
        if !listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
            kept.extend_from_slice(line);
        }
    }
    *lines = kept.freeze();
}

/// A response head read as the backend client reads it, for the fuzz target: the map the
/// gateway gets, how many entries it had before the passed-on lines were added back, and how
/// many lines there were (`None` while the head is incomplete).
#[doc(hidden)]
pub fn parse_response_head(bytes: &[u8]) -> Result<Option<(HeaderMap, usize, usize)>, String> {
    let mut buf = BytesMut::from(bytes);
    let Some(head) = parse_head(&mut buf)? else {
        return Ok(None);
    };
    let mut headers = head.headers;
    let read = headers.len();
    let lines = head.passthrough.map_or(0, |raw| {
        let lines = memchr::memmem::find_iter(&raw.lines, b"\r\n").count();
        raw.append_to(&mut headers);
        lines
    });
    Ok(Some((headers, read, lines)))
}

/// What [`parse_head`] does with a response header.
#[derive(Clone, Copy)]
enum Role {
    Connection,
    TransferEncoding,
    /// Hop-by-hop, or one the gateway answers with its own (`x-request-id`,
    /// `x-switchyard-backend`, `-attempts`, `-deployment`).
    Dropped,
    ContentLength,
    /// Read by the gateway (`balancer::hints`, `balancer::signals`, the handler), or set by
    /// it for a consumer's limits (`x-ratelimit-remaining-*`): into the response's map.
    Read,
    /// Neither: passed on as a raw line.
    Passed {
        date: bool,
    },
}

/// The response headers [`parse_head`] does not pass on as they came.
const ROLES: [(&[u8], Role); 19] = with_names(
    with_names::<_, 9, 4, 13>(
        [
            (b"content-type", Role::Read),
            (b"content-length", Role::ContentLength),
            (b"date", Role::Passed { date: true }),
            (b"retry-after", Role::Read),
            (b"retry-after-ms", Role::Read),
            (b"x-ms-retry-after-ms", Role::Read),
            (b"connection", Role::Connection),
            (b"transfer-encoding", Role::TransferEncoding),
            (b"upgrade", Role::Dropped),
        ],
        GATEWAY_SETS,
        Role::Dropped,
    ),
    HOP_BY_HOP,
    Role::Dropped,
);

/// The role of a response header by its name, in any case. Names are matched as sent first
/// (backends send them in lowercase), and only a name that matched nothing and has capitals
/// is compared again ignoring case.
fn role(name: &[u8]) -> Role {
    find_role(name, |a, b| a == b)
        .or_else(|| {
            name.iter()
                .any(u8::is_ascii_uppercase)
                .then(|| find_role(name, <[u8]>::eq_ignore_ascii_case))
                .flatten()
        })
        .unwrap_or(Role::Passed { date: false })
}

// Generic over `eq` (not a function pointer) so that each comparison is inlined.
fn find_role(name: &[u8], eq: impl Fn(&[u8], &[u8]) -> bool) -> Option<Role> {
    if let Some(&(_, r)) = ROLES.iter().find(|(n, _)| eq(n, name)) {
        return Some(r);
    }
    // Read as a family (`x-ratelimit-remaining-tokens`, ...), and the gateway may set its own.
    let starts = |p: &[u8]| name.get(..p.len()).is_some_and(|n| eq(n, p));
    starts(b"x-ratelimit-").then_some(Role::Read)
}

/// What a response's `content-length` headers say, all of them taken together.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Length {
    Absent,
    Is(u64),
    /// Not a number.
    Invalid,
    /// Two that disagree.
    Conflicting,
}

impl Length {
    /// With one more header's value, which may itself be a list.
    fn and(self, value: &[u8]) -> Length {
        let mut at = self;
        for part in value.split(|b| *b == b',') {
            at = match (at, parse_length(part.trim_ascii())) {
                (Length::Invalid | Length::Conflicting, _) => return at,
                (_, None) => return Length::Invalid,
                (Length::Is(l), Some(n)) if l != n => return Length::Conflicting,
                (_, Some(n)) => Length::Is(n),
            };
        }
        at
    }
}

fn framing(head: &Head, head_request: bool) -> Result<Framing, String> {
    let s = head.status.as_u16();
    if head_request || (100..200).contains(&s) || s == 204 || s == 304 {
        return Ok(Framing::Empty);
    }
    match (head.chunked, head.length) {
        (Some(true), _) => Ok(Framing::Chunked),
        (Some(false), _) => Ok(Framing::UntilClose),
        (None, Length::Is(n)) => Ok(Framing::Length(n)),
        (None, Length::Absent) => Ok(Framing::UntilClose),
        (None, Length::Invalid) => Err("invalid content-length".into()),
        (None, Length::Conflicting) => Err("conflicting content-length values".into()),
    }
}

#[cfg(test)]
mod tests;
