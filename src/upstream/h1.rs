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

use crate::body::BoxError;
use crate::http1::{Lines, header_name, parse_length};
use crate::http1::{MAX_HEADERS, RawHeaders};

/// A request body up to this size is copied after the head and sent with it in one write.
pub const INLINE_BODY: usize = 16 * 1024;
/// A response head larger than this is refused (hyper's default limit is about 400 KB; Azure's
/// heads are about 1.5 KB).
const MAX_HEAD: usize = 64 * 1024;
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

/// Every backend's idle connections, shared by all configs a reload produces, and the TLS
/// settings new connections use.
pub struct Pools {
    hosts: Mutex<Vec<Arc<HostPool>>>,
    tls: TlsConnector,
    /// As given, without the ALPN setting: for the other clients built later.
    client_config: Arc<rustls::ClientConfig>,
    /// Runtimes serving requests, each with idle lists of its own.
    workers: usize,
}

thread_local! {
    /// The runtime this thread drives, as an index into every backend's idle lists. Set once,
    /// when a worker thread starts ([`enter_worker`]); 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as the one driving worker runtime `index`. A connection is registered
/// with the reactor and timer of the runtime that opened it; used from another runtime's task,
/// each readiness event would be a wake-up across threads, and its reads would wait on the
/// other runtime's turn at its reactor. So each worker takes and returns connections from
/// lists of its own.
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

impl Pools {
    pub fn new(client_config: Arc<rustls::ClientConfig>) -> Self {
        Self::with_workers(client_config, 1)
    }

    /// Pools for `workers` runtimes, each with idle lists of its own (see [`enter_worker`]).
    pub fn with_workers(client_config: Arc<rustls::ClientConfig>, workers: usize) -> Self {
        let mut tls = (*client_config).clone();
        // This client speaks HTTP/1.1 only; say so, so a backend never picks h2 for us.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            hosts: Mutex::new(Vec::new()),
            tls: TlsConnector::from(Arc::new(tls)),
            client_config,
            workers: workers.max(1),
        }
    }

    /// The roots every HTTPS client of this gateway trusts.
    pub fn client_config(&self) -> &rustls::ClientConfig {
        &self.client_config
    }

    /// The pool for a backend's scheme and authority, made on first use.
    pub fn host(&self, https: bool, authority: &http::uri::Authority) -> Arc<HostPool> {
        let mut hosts = crate::sync::lock(&self.hosts);
        if let Some(h) = hosts
            .iter()
            .find(|h| h.https == https && h.authority == *authority)
        {
            return h.clone();
        }
        let host = authority.host();
        // `[::1]` in a URL, `::1` to connect and to name the server.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        let pool = Arc::new(HostPool {
            https,
            authority: authority.clone(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            host,
            tls: self.tls.clone(),
            idle: (0..self.workers).map(|_| Mutex::new(Vec::new())).collect(),
        });
        hosts.push(pool.clone());
        pool
    }

    /// Closes connections idle for longer than [`IDLE_TIMEOUT`] until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            self.sweep_once(Instant::now());
        }
    }

    /// Closes the connections idle since before `now - IDLE_TIMEOUT`.
    fn sweep_once(&self, now: Instant) {
        let hosts = crate::sync::lock(&self.hosts).clone();
        for idle in hosts.iter().flat_map(|h| h.idle.iter()) {
            // Dropped outside the lock: closing a TLS connection does some work.
            let expired: Vec<Idle> = {
                let mut idle = crate::sync::lock(idle);
                // Oldest first: the list is used from its end.
                let keep = idle
                    .iter()
                    .position(|c| now.duration_since(c.since) < IDLE_TIMEOUT)
                    .unwrap_or(idle.len());
                idle.drain(..keep).collect()
            };
            drop(expired);
        }
    }

    /// Idle connections across all backends.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        crate::sync::lock(&self.hosts)
            .iter()
            .flat_map(|h| h.idle.iter())
            .map(|idle| crate::sync::lock(idle).len())
            .sum()
    }
}

/// One backend's idle connections and how to open new ones.
pub struct HostPool {
    https: bool,
    authority: http::uri::Authority,
    host: String,
    port: u16,
    tls: TlsConnector,
    /// One list per worker runtime.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl HostPool {
    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        let idle = self.own_idle();
        loop {
            let mut conn = crate::sync::lock(idle).pop()?.conn;
            if conn.is_open() {
                return Some(conn);
            }
        }
    }

    /// This thread's runtime's idle list.
    fn own_idle(&self) -> &Mutex<Vec<Idle>> {
        let i = WORKER.with(|w| w.get());
        &self.idle[i % self.idle.len()]
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = crate::sync::lock(self.own_idle());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<Conn, SendError> {
        let connecting = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect to {}: {e}", self.authority))?;
            // Nagle would hold small writes (an SSE event, a request head) for an ACK.
            let _ = tcp.set_nodelay(true);
            let io = if self.https {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{}: not a valid TLS server name: {e}", self.host))?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", self.authority))?;
                Stream::Tls(Box::new(tls))
            } else {
                Stream::Tcp(tcp)
            };
            Ok::<_, String>(Conn {
                io,
                buf: BytesMut::new(),
                read_size: READ_MIN,
                timer: None,
            })
        };
        match tokio::time::timeout(timeout, connecting).await {
            Ok(r) => r.map_err(SendError::Connect),
            Err(_) => Err(SendError::Connect(format!(
                "connect to {} timed out after {timeout:?}",
                self.authority
            ))),
        }
    }

    /// Writes `head` and `body` and reads the response head. When a pooled connection cannot
    /// take the whole request, the usual cause is the keep-alive race (the backend closed it
    /// as the request went out): the request goes once more, on a new connection. Once it was
    /// all written it never goes again from here, answered or not: the backend may have acted
    /// on it (made a batch, a file). A failure on a new connection is the attempt loop's.
    pub async fn send(
        self: &Arc<Self>,
        mut head: Vec<u8>,
        body: &Bytes,
        head_request: bool,
        connect_timeout: Duration,
        deadline: Instant,
    ) -> Result<(Response<H1Body>, Option<RawHeaders>), SendError> {
        // A small body goes in the head's buffer: one write, one segment on the wire, and no
        // Nagle interplay between the two.
        let rest: &[u8] = if body.len() <= INLINE_BODY {
            head.extend_from_slice(body);
            &[]
        } else {
            body
        };
        let pooled = self.checkout();
        let mut retry = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect_by(connect_timeout, deadline).await?,
        };
        loop {
            // The connection's own timer, moved on to this deadline: moving a registered timer
            // later is an atomic store, where a new timer per request took the timer wheel's
            // lock to register and again to cancel.
            let mut timer = conn
                .timer
                .take()
                .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)));
            timer.as_mut().reset(deadline);
            // Atomic only to keep the future `Send`; nothing else touches it.
            let written = AtomicBool::new(false);
            let exchanged = tokio::select! {
                biased;
                r = exchange(&mut conn, &head, rest, &written) => r,
                _ = timer.as_mut() => {
                    let delivered = written.load(Relaxed);
                    return Err(SendError::TimedOut { delivered });
                }
            };
            conn.timer = Some(timer);
            match exchanged {
                Ok(h) => return self.respond(conn, h, head_request),
                Err(Failure::Unwritten(_)) if retry => {
                    retry = false;
                    conn = self.connect_by(connect_timeout, deadline).await?;
                }
                Err(f) => {
                    return Err(SendError::Protocol {
                        message: f.describe(&self.authority),
                        delivered: written.load(Relaxed),
                    });
                }
            }
        }
    }

    /// [`Self::connect`], given up at `deadline` too.
    async fn connect_by(&self, timeout: Duration, deadline: Instant) -> Result<Conn, SendError> {
        tokio::time::timeout_at(deadline, self.connect(timeout))
            .await
            .unwrap_or(Err(SendError::TimedOut { delivered: false }))
    }

    fn respond(
        self: &Arc<Self>,
        conn: Conn,
        head: Head,
        head_request: bool,
    ) -> Result<(Response<H1Body>, Option<RawHeaders>), SendError> {
        let framing = framing(&head, head_request).map_err(|e| SendError::Protocol {
            message: format!("backend {}: {e}", self.authority),
            delivered: true,
        })?;
        let reusable = head.keep_alive && !matches!(framing, Framing::UntilClose);
        let mut body = H1Body {
            conn: Some(conn),
            state: match framing {
                Framing::Empty | Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::ChunkSize,
                Framing::UntilClose => State::UntilClose,
            },
            reusable,
            pool: self.clone(),
        };
        if matches!(body.state, State::Done) {
            body.release();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        // Returned beside the body, not in it: the body is moved several times more.
        Ok((resp, head.passthrough))
    }
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
    /// `x-switchyard-backend`, `x-switchyard-attempts`).
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
const ROLES: [(&[u8], Role); 18] = [
    (b"content-type", Role::Read),
    (b"content-length", Role::ContentLength),
    (b"date", Role::Passed { date: true }),
    (b"retry-after", Role::Read),
    (b"retry-after-ms", Role::Read),
    (b"x-ms-retry-after-ms", Role::Read),
    // The gateway sets these itself.
    (b"x-request-id", Role::Dropped),
    (b"x-switchyard-backend", Role::Dropped),
    (b"x-switchyard-attempts", Role::Dropped),
    (b"connection", Role::Connection),
    (b"transfer-encoding", Role::TransferEncoding),
    (b"keep-alive", Role::Dropped),
    (b"proxy-connection", Role::Dropped),
    (b"proxy-authenticate", Role::Dropped),
    (b"proxy-authorization", Role::Dropped),
    (b"te", Role::Dropped),
    (b"trailer", Role::Dropped),
    (b"upgrade", Role::Dropped),
];

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

/// A connection to a backend and the bytes read from it but not yet used.
struct Conn {
    io: Stream,
    buf: BytesMut,
    /// Room the next read asks for, when the buffer is nearly full.
    read_size: usize,
    /// Bounds the wait for a response head; kept with the connection from one exchange to
    /// the next. A timer that fires while the connection idles only wakes the task that last
    /// waited on it, for nothing.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    async fn read_some(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_some(cx)).await
    }

    fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        self.read_size = if n == room {
            (self.read_size * 2).min(READ_MAX)
        } else {
            READ_MIN
        };
        Poll::Ready(Ok(n))
    }

    /// Whether an idle connection is still usable: nothing to read and not closed. A backend
    /// that closed it, or sent something unasked, makes it unusable.
    fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

enum State {
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
    UntilClose,
    Done,
}

/// A backend's response body, read from its connection as it is polled. Dropped before its
/// end, the connection closes (the rest of the body is never read).
pub struct H1Body {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
    pool: Arc<HostPool>,
}

impl H1Body {
    /// The body ended: the connection goes back to the pool if it can carry another exchange.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.pool.checkin(conn);
        }
    }

    fn fail(&mut self, msg: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(msg.into().into())))
    }
}

/// The line at the front of `buf`, if a whole one is there: its length without the line end,
/// and with it. Measured in place rather than split off (a chunked body has two such lines
/// per chunk, and a split costs more than the rest of reading them).
fn front_line(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    match memchr::memchr(b'\n', buf) {
        Some(i) => {
            let len = if i > 0 && buf[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            Ok(Some((len, i + 1)))
        }
        None if buf.len() > MAX_LINE => Err("chunk-size or trailer line too long".into()),
        None => Ok(None),
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, String> {
    // Extensions after `;` are ignored (RFC 9112 §7.1.1).
    let end = memchr::memchr(b';', line).unwrap_or(line.len());
    let digits = line[..end].trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err("invalid chunk size".into());
    }
    digits
        .iter()
        .try_fold(0u64, |n, b| {
            char::from(*b).to_digit(16).map(|d| n << 4 | u64::from(d))
        })
        .ok_or_else(|| "invalid chunk size".into())
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Use what is buffered first; read only when it cannot make progress.
            match this.state {
                State::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                State::Length(left) | State::ChunkData(left) if !conn.buf.is_empty() => {
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    this.state = match this.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    if matches!(this.state, State::Done) {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize => match front_line(&conn.buf) {
                    Ok(Some((len, used))) => {
                        let size = chunk_size(&conn.buf[..len]);
                        conn.buf.advance(used);
                        match size {
                            Ok(0) => this.state = State::Trailers,
                            Ok(n) => this.state = State::ChunkData(n),
                            Err(e) => return this.fail(e),
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return this.fail(e),
                },
                State::ChunkEnd if conn.buf.len() >= 2 || conn.buf.first() == Some(&b'\n') => {
                    match front_line(&conn.buf) {
                        Ok(Some((0, used))) => {
                            conn.buf.advance(used);
                            this.state = State::ChunkSize;
                            continue;
                        }
                        _ => return this.fail("chunk data not followed by CRLF"),
                    }
                }
                State::Trailers => match front_line(&conn.buf) {
                    Ok(Some((len, used))) => {
                        conn.buf.advance(used);
                        if len == 0 {
                            this.state = State::Done;
                        }
                        // Trailers are dropped: the client's response carries none.
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return this.fail(e),
                },
                _ => {}
            }
            match ready!(conn.poll_read_some(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail("the backend closed the connection before the body ended");
                }
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
#[path = "h1_tests.rs"]
mod tests;
