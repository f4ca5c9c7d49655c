//! Listeners, connection handling and graceful shutdown. No business logic here.

mod gateway;
mod listener;
mod runtime;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::config::{Config, LimitStore};
use crate::limits::Shared;
use crate::telemetry::Metrics;

#[doc(hidden)]
pub use crate::http1::server::{
    Head as RequestHead, Parsed as ParsedHead, parse_for_fuzz as parse_request_head, passes_raw,
};
pub use gateway::GatewayState;
use listener::{ConnMetrics, ListenOptions};
pub use runtime::{ConfigSource, ReloadError, Reloaded, Runtime, Trigger};

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

/// How long a session key stays with the backend that served it last: longer than any prompt
/// cache lives on an idle instance (an hour at most).
const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

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
    let cert_swap = config
        .server
        .tls
        .as_ref()
        .map(|t| listener::CertSwap::new(t.certified.clone()));
    let last_text = match &source {
        Some(s) => tokio::fs::read_to_string(&s.path).await.ok(),
        None => None,
    };
    let watch = source.as_ref().and_then(|s| s.watch);
    let sighup = source.as_ref().is_some_and(|s| s.sighup);
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
    let parts = runtime::Parts {
        metrics: &metrics,
        identity_client: &identity_client,
        shared: &shared,
        pools: &pools,
    };
    let tracer = match &config.tracing {
        Some(t) => {
            let client = crate::http_client::build_client(IDENTITY_CONNECT_TIMEOUT, true, &tls);
            let (tracer, exporter) = crate::telemetry::trace::Tracer::new(t, client, &metrics);
            tasks.spawn(exporter.run(shutdown.clone(), config.server.shutdown_grace));
            Some(tracer)
        }
        None => None,
    };
    let config_affinity = config.affinity.clone();
    let write_stall = crate::stall::StallLimit::new(config.routing.idle_timeout);
    let rt = runtime::build(&parts, config, None)?;
    let state = GatewayState {
        runtime: ArcSwap::from_pointee(rt),
        metrics: metrics.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        grace,
        ids: crate::ids::IdGen::new(),
        identity_client,
        pools,
        shared: shared.clone(),
        refreshers: Default::default(),
        source,
        reloading: tokio::sync::Mutex::new(()),
        last_text: std::sync::Mutex::new(last_text),
        tracer,
        cert_swap: cert_swap.clone(),
        write_stall,
        owners: Arc::new(crate::affinity::Owners::new(
            config_affinity.ttl,
            config_affinity.max_entries,
            metrics.clone(),
            shared.clone(),
        )),
        sessions: Arc::new(crate::affinity::Owners::sessions(
            SESSION_TTL,
            config_affinity.max_entries,
            metrics.clone(),
            shared.clone(),
        )),
    };
    // Tokens are fetched from the start, so the first requests find them ready.
    state.start_refreshers(&state.runtime());
    metrics.config_generation.set(1);
    let state = Arc::new(state);
    if let Some(shared) = &shared {
        let state = state.clone();
        tasks.spawn(shared.clone().run(
            move |deployment, backend, wait| {
                state
                    .runtime()
                    .proxy
                    .remote_cooldown(deployment, backend, wait)
            },
            shutdown.clone(),
        ));
    }
    {
        let (state, shutdown, stop) = (state.clone(), shutdown.clone(), stop.clone());
        tasks.spawn(async move {
            stop.cancelled().await;
            let delay = state.runtime().config.server.shutdown_delay;
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
    if sighup {
        tasks.spawn(runtime::on_sighup(state.clone(), shutdown.clone()));
    }
    if let Some(every) = watch {
        tasks.spawn(runtime::watch(state.clone(), every, shutdown.clone()));
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
            tls: cert_swap.clone().map(listener::tls_acceptor),
            metrics: ConnMetrics {
                open: metrics.open_connections.clone(),
                refused: metrics.connections_refused.clone(),
            },
            stall: state.write_stall.clone(),
        };
        let state = state.clone();
        tasks.spawn(listener::serve(
            listener,
            move |req| gateway::handle(state.clone(), req),
            shutdown.clone(),
            options,
        ));
    }
    if let Some(admin) = admin {
        let history = Arc::new(crate::status::History::default());
        tasks.spawn(crate::status::run(
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
            stall: state.write_stall.clone(),
        };
        tasks.spawn(listener::serve(
            admin,
            move |req| crate::admin::handle(admin_state.clone(), req),
            shutdown.clone(),
            options,
        ));
    }
    tracing::info!(%addr, admin = ?admin_addr, "switchyard listening");
    let rt = state.runtime();
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

/// Runtimes of one thread each, beside the caller's, for [`start_on`]: like nginx's worker
/// processes, each serves the connections it is given from start to end, with its own timers,
/// reactor and backend connections. Against one multi-threaded runtime this saves the work
/// stealing's bookkeeping and atomics and keeps a connection's work on one core
/// (bench/results/profile-2026-11-26.md).
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Something every runtime's thread does for itself at a steady pace, whatever it is serving:
/// `serve` gives back the memory its allocator keeps cached for the thread (see `main.rs`),
/// which only the thread itself can do.
#[derive(Clone)]
pub struct ThreadChore {
    pub every: Duration,
    pub run: Arc<dyn Fn() + Send + Sync>,
}

impl ThreadChore {
    /// Runs the chore on the polling thread every `every`, the first time one period from now;
    /// it never ends, so race it against what ends the thread's work.
    pub async fn repeat(self) -> std::convert::Infallible {
        let start = tokio::time::Instant::now() + self.every;
        let mut tick = tokio::time::interval_at(start, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            (self.run)();
        }
    }
}

impl Workers {
    /// Starts `count` worker runtimes, numbered 1 to `count` (the caller's thread is 0), each
    /// thread doing `chore` besides.
    pub fn start(count: usize, chore: Option<ThreadChore>) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            stop: stop.clone(),
            threads: Vec::with_capacity(count),
        };
        for index in 1..=count {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let chore = chore.clone();
            let thread = std::thread::Builder::new()
                .name(format!("switchyard-worker-{index}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let rt = match rt {
                        Ok(rt) => {
                            let _ = tx.send(Ok(rt.handle().clone()));
                            rt
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    crate::http1::client::enter_worker(index);
                    rt.block_on(async move {
                        match chore {
                            Some(chore) => tokio::select! {
                                _ = stop.cancelled() => {}
                                never = chore.repeat() => match never {},
                            },
                            None => stop.cancelled().await,
                        }
                    });
                })?;
            workers.threads.push(thread);
            match rx.recv() {
                Ok(Ok(handle)) => workers.handles.push(handle),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other("a worker thread ended at start")),
            }
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }

    /// Stops the runtimes and waits for their threads; tasks still on them are dropped, so
    /// call it after [`Gateway::wait`].
    pub fn stop(self) {
        drop(self);
    }
}

/// Runs `f` on a single-threaded runtime on this thread, with `threads - 1` [`Workers`] beside
/// it whose handles `f` gets (for [`start_on`]), every thread doing `chore`; the workers stop
/// once `f` is done. How `serve` runs.
pub fn per_core<F, Fut>(
    threads: usize,
    chore: Option<ThreadChore>,
    f: F,
) -> std::io::Result<Fut::Output>
where
    F: FnOnce(Vec<tokio::runtime::Handle>) -> Fut,
    Fut: std::future::Future,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let workers = Workers::start(threads.saturating_sub(1), chore.clone())?;
    let work = f(workers.handles().to_vec());
    let out = runtime.block_on(async {
        match chore {
            Some(chore) => tokio::select! {
                out = work => out,
                never = chore.repeat() => match never {},
            },
            None => work.await,
        }
    });
    workers.stop();
    Ok(out)
}

/// Dropped, as when a start fails half-way, the workers stop too.
impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
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
