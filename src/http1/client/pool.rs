//! Every backend's idle connections: a short LIFO list per worker runtime, and the
//! connections themselves.

use super::*;

/// Every backend's idle connections, shared by all configs a reload produces, and the TLS
/// settings new connections use.
pub struct Pools {
    pub(super) hosts: Mutex<Vec<Arc<HostPool>>>,
    pub(super) tls: TlsConnector,
    /// As given, without the ALPN setting: for the other clients built later.
    pub(super) client_config: Arc<rustls::ClientConfig>,
    /// Runtimes serving requests, each with idle lists of its own.
    pub(super) workers: usize,
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
    pub(super) fn sweep_once(&self, now: Instant) {
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
    pub(super) fn idle_count(&self) -> usize {
        crate::sync::lock(&self.hosts)
            .iter()
            .flat_map(|h| h.idle.iter())
            .map(|idle| crate::sync::lock(idle).len())
            .sum()
    }
}

/// One backend's idle connections and how to open new ones.
pub struct HostPool {
    pub(super) https: bool,
    pub(super) authority: http::uri::Authority,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: TlsConnector,
    /// One list per worker runtime.
    pub(super) idle: Box<[Mutex<Vec<Idle>>]>,
}

pub(super) struct Idle {
    pub(super) conn: Conn,
    pub(super) since: Instant,
}

impl HostPool {
    /// The most recently used idle connection that is still open.
    pub(super) fn checkout(&self) -> Option<Conn> {
        let idle = self.own_idle();
        loop {
            let mut conn = crate::sync::lock(idle).pop()?.conn;
            if conn.is_open() {
                return Some(conn);
            }
        }
    }

    /// This thread's runtime's idle list.
    pub(super) fn own_idle(&self) -> &Mutex<Vec<Idle>> {
        let i = WORKER.with(|w| w.get());
        &self.idle[i % self.idle.len()]
    }

    pub(super) fn checkin(&self, conn: Conn) {
        let mut idle = crate::sync::lock(self.own_idle());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    pub(super) async fn connect(&self, timeout: Duration) -> Result<Conn, SendError> {
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
    pub(super) async fn connect_by(
        &self,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Conn, SendError> {
        tokio::time::timeout_at(deadline, self.connect(timeout))
            .await
            .unwrap_or(Err(SendError::TimedOut { delivered: false }))
    }

    pub(super) fn respond(
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

/// A connection to a backend and the bytes read from it but not yet used.
pub(super) struct Conn {
    pub(super) io: Stream,
    pub(super) buf: BytesMut,
    /// Room the next read asks for, when the buffer is nearly full.
    pub(super) read_size: usize,
    /// Bounds the wait for a response head; kept with the connection from one exchange to
    /// the next. A timer that fires while the connection idles only wakes the task that last
    /// waited on it, for nothing.
    pub(super) timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    pub(super) async fn read_some(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_some(cx)).await
    }

    pub(super) fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
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
    pub(super) fn is_open(&mut self) -> bool {
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

pub(super) enum Stream {
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
