//! A running gateway, wired in one place ([`start_on`]): the limits store, the backend
//! connection pools, the tracer and the live state ([`crate::live`]) are built, then the client
//! listener is handed [`crate::pipeline::handle`] and the admin listener
//! [`crate::admin::handle`]. Below: the listeners (`listener.rs`: connection cap, TLS, header
//! timeout, graceful drain) and the per-core worker runtimes (`workers.rs`).

mod listener;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, LimitStore};
use crate::limits::Shared;
use crate::telemetry::Metrics;

#[doc(hidden)]
pub use crate::http1::server::{
    Head as RequestHead, Parsed as ParsedHead, parse_for_fuzz as parse_request_head, passes_raw,
};
use crate::live;
pub use crate::live::{ConfigSource, GatewayState, ReloadError, Reloaded, Trigger};
use listener::{ConnMetrics, ListenOptions};
pub use workers::{ThreadChore, Workers, per_core};

const IDENTITY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// A running gateway: its bound addresses and the task that ends when it has shut down.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<GatewayState>,
    tasks: TaskTracker,
}

impl Gateway {
    /// Reloads the config from its file, as SIGHUP and `POST /admin/reload` do.
    pub async fn reload(&self, trigger: Trigger) -> Result<Reloaded, ReloadError> {
        self.state.reload(trigger).await
    }

    /// Waits until both listeners have drained after the shutdown token fired.
    pub async fn wait(self) {
        let Gateway { tasks, state, .. } = self;
        // The trace exporter ends once the last holder of the state lets go.
        drop(state);
        tasks.close();
        tasks.wait().await;
    }
}

/// Connections the kernel queues for a listener before the accept loop takes them. tokio's
/// `TcpListener::bind` listened with 128 (as `ss -ltn` showed): a burst of 2,000 connects
/// overflowed it, and each dropped SYN cost its client a second, the retransmit timer.
/// Linux caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// A listening socket on `addr` (port 0 for any), with room for a burst of connections.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's bind does: a restarted process takes its port back while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// [`bind`], its error naming the address and the field that set it.
fn bind_named(addr: SocketAddr, field: &str) -> std::io::Result<TcpListener> {
    bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({field}): {e}"))
    })
}

/// Binds the listeners and starts serving; returns once both are accepting.
/// Cancelling `shutdown` stops accepting, lets in-flight requests and streams finish within
/// `server.shutdown_grace`, then ends every connection that is left.
pub async fn start(config: Config, shutdown: CancellationToken) -> std::io::Result<Gateway> {
    start_with(config, None, shutdown).await
}

/// [`start`], reloading the config from `source` on `POST /admin/reload` and, as the source
/// says, on SIGHUP and when the file changes.
pub async fn start_with(
    config: Config,
    source: Option<ConfigSource>,
    shutdown: CancellationToken,
) -> std::io::Result<Gateway> {
    start_on(config, source, shutdown, &[]).await
}

/// [`start_with`], with the client listener's connections served by `workers` too (see
/// [`Workers`]): the caller's runtime accepts them and hands each to the runtime, itself
/// included, with the fewest open; it also runs everything else (admin listener, refreshers,
/// sweeps).
pub async fn start_on(
    config: Config,
    source: Option<ConfigSource>,
    stop: CancellationToken,
    workers: &[tokio::runtime::Handle],
) -> std::io::Result<Gateway> {
    // `stop` is the signal: readiness fails at once. `shutdown` follows it after
    // `server.shutdown_delay`: the listeners stop accepting and everything drains.
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let tls = crate::http_client::tls_config(&config.server.ca)?;
    let identity_client = crate::http_client::build_client(IDENTITY_CONNECT_TIMEOUT, true, &tls);
    let (shared, store_token) = match &config.limits.store {
        LimitStore::Memory => (None, None),
        LimitStore::Redis(store) => {
            let credentials = store.auth.as_ref().map(|c| {
                let provider = Arc::new(crate::auth::outbound::TokenProvider::new(
                    vec!["limits store".into()],
                    c.clone(),
                    identity_client.clone(),
                ));
                crate::auth::outbound::RedisCredentials::new(provider, store.user.clone())
            });
            let token = credentials.as_ref().map(|c| c.provider().clone());
            let redis = crate::redis::Redis::open(
                store.url.expose(),
                crate::redis::Options {
                    cluster: store.cluster,
                    timeout: store.timeout,
                    ca: &config.server.ca,
                    credentials,
                },
            )
            .map_err(|e| std::io::Error::other(format!("limits.redis_url: {e}")))?;
            let shared = Shared::new(redis, store.fail_closed, metrics.clone(), token.clone());
            (Some(shared), token)
        }
    };

    let listener = bind_named(config.server.listen, "server.listen")?;
    let addr = listener.local_addr()?;
    let admin = match config.server.admin_listen {
        Some(a) => Some(bind_named(a, "server.admin_listen")?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;

    let tasks = TaskTracker::new();
    let grace = config.server.shutdown_grace;
    let header_read_timeout = config.server.header_read_timeout;
    let body_read_timeout = config.server.body_read_timeout;
    let max_connections = config.server.max_connections;
    // The caller's runtime is worker 0 (see `Workers::start`).
    let pools = Arc::new(crate::http1::client::Pools::with_workers(
        tls.clone(),
        1 + workers.len(),
    ));
    tasks.spawn(pools.clone().sweep(shutdown.clone()));
    if let Some(token) = store_token {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { token.refresh_loop(shutdown).await });
    }
    let tracer = match &config.tracing {
        Some(t) => {
            let client = crate::http_client::build_client(IDENTITY_CONNECT_TIMEOUT, true, &tls);
            let (tracer, exporter) = crate::telemetry::trace::Tracer::new(t, client, &metrics);
            tasks.spawn(exporter.run(shutdown.clone(), config.server.shutdown_grace));
            Some(tracer)
        }
        None => None,
    };
    let otlp = match &config.metrics {
        Some(m) => {
            let client = crate::http_client::build_client(IDENTITY_CONNECT_TIMEOUT, true, &tls);
            let otlp = crate::telemetry::otlp::OtlpMetrics::new(m, client, &config.usage.currency)
                .map_err(std::io::Error::other)?;
            tasks.spawn(otlp.clone().run(metrics.clone(), shutdown.clone(), grace));
            Some(otlp)
        }
        None => None,
    };
    let parts = live::Parts {
        metrics: metrics.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        identity_client,
        pools,
        shared: shared.clone(),
        tracer,
        otlp,
        source,
    };
    let state = GatewayState::new(parts, config).await?;
    if let Some(shared) = &shared {
        let state = state.clone();
        tasks.spawn(shared.clone().run(
            move |deployment, backend, wait| {
                state
                    .snapshot()
                    .proxy
                    .remote_cooldown(deployment, backend, wait)
            },
            shutdown.clone(),
            grace,
        ));
    }
    {
        let (state, shutdown, stop) = (state.clone(), shutdown.clone(), stop.clone());
        tasks.spawn(async move {
            stop.cancelled().await;
            let delay = state.snapshot().config.server.shutdown_delay;
            if !delay.is_zero() {
                tracing::info!(
                    ?delay,
                    "stop signal: /readyz answers 503; still accepting for server.shutdown_delay"
                );
                tokio::time::sleep(delay).await;
            }
            shutdown.cancel();
        });
    }
    {
        let options = ListenOptions {
            grace,
            header_read_timeout,
            body_read_timeout,
            max_connections,
            spread: (!workers.is_empty()).then(|| {
                let here = tokio::runtime::Handle::current();
                let all = std::iter::once(here).chain(workers.iter().cloned());
                Arc::new(listener::Spread::new(all.collect()))
            }),
            tls: state.cert_swap().map(listener::tls_acceptor),
            metrics: ConnMetrics {
                open: metrics.open_connections.clone(),
                refused: metrics.connections_refused.clone(),
            },
            stall: state.write_stall(),
        };
        let state = state.clone();
        tasks.spawn(listener::serve(
            listener,
            move |req| crate::pipeline::handle(state.clone(), req),
            shutdown.clone(),
            options,
        ));
    }
    if let Some(admin) = admin {
        let history = Arc::new(crate::admin::status::History::default());
        tasks.spawn(crate::admin::status::run(
            history.clone(),
            state.clone(),
            shutdown.clone(),
        ));
        let admin_state = Arc::new(crate::admin::AdminState {
            metrics: metrics.clone(),
            stopping: stop.clone(),
            shared: shared.clone(),
            gateway: state.clone(),
            history,
            started: std::time::SystemTime::now(),
            addr: admin.local_addr()?,
        });
        // Plain HTTP and a small cap: the admin listener is for operators and probes on a
        // private address.
        let options = ListenOptions {
            grace,
            header_read_timeout,
            body_read_timeout,
            max_connections: ADMIN_MAX_CONNECTIONS,
            spread: None,
            tls: None,
            metrics: ConnMetrics::default(),
            stall: state.write_stall(),
        };
        tasks.spawn(listener::serve(
            admin,
            move |req| crate::admin::handle(admin_state.clone(), req),
            shutdown.clone(),
            options,
        ));
    }
    tracing::info!(%addr, admin = ?admin_addr, "switchyard listening");
    let rt = state.snapshot();
    if !addr.ip().is_loopback() && rt.config.consumers.is_empty() && rt.config.jwt.is_none() {
        tracing::warn!(
            %addr,
            "listening beyond loopback with no [[consumers]] or [jwt]: anyone who reaches this address is served on your backends' quota"
        );
    }
    Ok(Gateway {
        addr,
        admin_addr,
        metrics,
        state,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Connects the listener has not accepted yet complete in the kernel while they fit in
    /// the backlog; past it the SYN is dropped and the connect waits on retransmits.
    #[tokio::test]
    async fn a_burst_of_connects_fits_the_backlog() {
        let listener = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..300).map(|_| {
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        });
        let results = futures_util::future::join_all(connects).await;
        let done = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(done, 300, "connects left waiting on a full backlog");
        drop(listener);
    }

    /// A busy port is named, with the field that asked for it.
    #[tokio::test]
    async fn a_busy_address_is_named_with_its_field() {
        let taken = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = taken.local_addr().unwrap();
        let e = super::bind_named(addr, "server.admin_listen").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot listen on {addr} (server.admin_listen): ")),
            "{text}"
        );
    }
}
