//! Accepting connections: the connection cap, TLS, the header read timeout, graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::body::{BoxBody, RequestBody};
use crate::http1::server as h1;
use crate::live::CertSwap;
use crate::stall::{StallLimit, WriteStall};

/// The largest request head read from a client.
const MAX_REQUEST_HEAD: usize = crate::http1::MAX_HEAD_BYTES;
/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_STREAMS: u32 = 128;
/// Streams a peer may reset before the server took them up; past it, GOAWAY.
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams a peer may make the server reset (by protocol errors); past it, GOAWAY.
const H2_MAX_LOCAL_RESETS: usize = 256;

/// A rustls server config over `certs`, offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn tls_acceptor(certs: Arc<CertSwap>) -> tokio_rustls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Connection counts for the client listener's metrics.
#[derive(Clone, Default)]
pub struct ConnMetrics {
    pub open: Gauge,
    pub refused: Counter,
}

/// How a listener serves its connections.
pub struct ListenOptions {
    /// In-flight requests get this long to finish after shutdown.
    pub grace: Duration,
    /// Longest wait for a request head or a TLS handshake; also the keep-alive idle limit.
    pub header_read_timeout: Duration,
    /// Longest a request body may take to arrive whole.
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    /// The runtimes that serve the accepted connections, when there are several.
    pub spread: Option<Arc<Spread>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub metrics: ConnMetrics,
    /// How long a write may wait for a client that reads nothing.
    pub stall: Arc<StallLimit>,
}

/// Runtimes that serve a listener's connections, and how many each has open. A connection is
/// served from start to end by the runtime with the fewest: left to whichever runtime woke
/// first to accept, one runtime could end up with all 64 connections of a benchmark run while
/// the other idled.
pub struct Spread {
    /// The accepting runtime first.
    runtimes: Vec<(tokio::runtime::Handle, AtomicUsize)>,
}

impl Spread {
    /// `runtimes[0]` is the one that accepts.
    pub fn new(runtimes: Vec<tokio::runtime::Handle>) -> Spread {
        Spread {
            runtimes: runtimes
                .into_iter()
                .map(|h| (h, AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// The runtime with the fewest open connections (the accepting one on a tie), now
    /// counting one more.
    fn take(&self) -> usize {
        let mut best = 0;
        let mut fewest = usize::MAX;
        for (i, (_, open)) in self.runtimes.iter().enumerate() {
            let n = open.load(Ordering::Relaxed);
            if n < fewest {
                (best, fewest) = (i, n);
            }
        }
        self.runtimes[best].1.fetch_add(1, Ordering::Relaxed);
        best
    }

    fn release(&self, i: usize) {
        self.runtimes[i].1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until `shutdown`, then drains them for at most `grace`.
/// Connection tasks live in a `JoinSet`, so any still running after the grace period are
/// aborted when it drops: no task outlives the server.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: CancellationToken,
    options: ListenOptions,
) where
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<BoxBody>, Infallible>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper silently drops its header read timeout: a client that sends
    // half a request head and goes quiet would hold its connection forever (slowloris).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // Bounds the request head (431 beyond), as the backend client bounds response heads,
        // and its headers to the same count as theirs.
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(crate::http1::MAX_HEADERS);
    // HTTP/2 has no head to time out; a peer that stops answering pings is cut off instead.
    // The abuse limits are set here on purpose rather than left to defaults that may move:
    // streams reset before they were taken up (rapid reset, CVE-2023-44487) and streams the
    // peer makes the server reset (CVE-2025-8671) end the connection with a GOAWAY past a
    // few; a header block, CONTINUATION frames and all, is bounded like an HTTP/1.1 head
    // (a CONTINUATION flood, CVE-2024-27316, is cut there).
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(options.header_read_timeout))
        .keep_alive_timeout(options.header_read_timeout)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .max_header_list_size(MAX_REQUEST_HEAD as u32);
    let builder = Arc::new(builder);
    let mut last_refusal_logged = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                // Past the cap a connection is closed at once: the process keeps the file
                // descriptors and memory it needs for the connections it already serves.
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    options.metrics.refused.inc();
                    // One line per burst of refusals, not one per connection.
                    if last_refusal_logged.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10)) {
                        last_refusal_logged = Some(Instant::now());
                        tracing::warn!(%peer, max = options.max_connections, "connections refused: server.max_connections reached");
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let home = options.spread.as_ref().map(|s| (s.clone(), s.take()));
                let slot = Slot::new(permit, options.metrics.open.clone(), home.clone());
                let job = Job {
                    handler: handler.clone(),
                    stop: shutdown.clone(),
                    builder: builder.clone(),
                    tls: options.tls.clone(),
                    header_timeout: options.header_read_timeout,
                    body_timeout: options.body_read_timeout,
                    stall: options.stall.clone(),
                    peer,
                    slot,
                };
                match home {
                    Some((spread, i)) if i > 0 => {
                        // Registered with the other runtime's reactor from there.
                        let Ok(stream) = stream.into_std() else { continue };
                        connections.spawn_on(
                            async move {
                                match TcpStream::from_std(stream) {
                                    Ok(stream) => job.run(stream).await,
                                    Err(e) => tracing::warn!(error = %e, "cannot hand a connection to a worker"),
                                }
                            },
                            &spread.runtimes[i].0,
                        );
                    }
                    _ => {
                        connections.spawn(job.run(stream));
                    }
                }
            }
        }
    }
    drop(listener);
    // Every connection sees the same token: idle ones close, busy ones finish their request.
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(options.grace, drain).await.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "grace period over; closing connections"
        );
    }
    connections.shutdown().await;
}

/// One accepted connection and what serving it takes.
struct Job<F> {
    handler: F,
    stop: CancellationToken,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: Duration,
    body_timeout: Duration,
    stall: Arc<StallLimit>,
    peer: std::net::SocketAddr,
    slot: Slot,
}

impl<F, Fut> Job<F>
where
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<BoxBody>, Infallible>> + Send + 'static,
{
    async fn run(self, stream: TcpStream) {
        let Job {
            handler,
            stop,
            builder,
            tls,
            header_timeout,
            body_timeout,
            stall,
            peer,
            slot: _slot,
        } = self;
        // The TLS handshake and hyper's connection futures are boxed: inline, they would set
        // the size of every connection's task, fast path included, for as long as it is open.
        match tls {
            // Plain HTTP/1.1 takes the fast path; hyper gets what it hands over.
            None => {
                let served = h1::serve(
                    stream,
                    &handler,
                    &stop,
                    header_timeout,
                    body_timeout,
                    MAX_REQUEST_HEAD,
                    &stall,
                );
                match served.await {
                    h1::Ended::Closed => {}
                    h1::Ended::Handover(io) => {
                        let io = WriteStall::new(io, stall);
                        Box::pin(connection(&builder, io, handler, &stop)).await
                    }
                }
            }
            Some(acceptor) => {
                Box::pin(async move {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let io = WriteStall::new(tls, stall);
                            connection(&builder, io, handler, &stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                })
                .await
            }
        }
    }
}

/// A connection's place under the cap and on its runtime, given back however its task ends
/// (aborted included).
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
    home: Option<(Arc<Spread>, usize)>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: Gauge, home: Option<(Arc<Spread>, usize)>) -> Slot {
        open.inc();
        Slot {
            _permit: permit,
            open,
            home,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
        if let Some((spread, i)) = &self.home {
            spread.release(*i);
        }
    }
}

/// Serves a connection with hyper (HTTP/2, TLS, and what the fast path hands over) until it
/// closes; on shutdown, the request in flight is finished and the connection closed.
async fn connection<I, F, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    handler: F,
    shutdown: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<BoxBody>, Infallible>> + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let answer = handler(req.map(RequestBody::Streaming));
        async move {
            let mut resp = answer.await?;
            // hyper writes only the map.
            if let Some(raw) = resp.body_mut().take_passthrough() {
                raw.append_to(resp.headers_mut());
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
