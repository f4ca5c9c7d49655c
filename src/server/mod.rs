//! Listeners, connection handling and graceful shutdown. No business logic here.

mod gateway;
mod runtime;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::body::BoxBody;
use crate::config::{Config, LimitStore};
use crate::limits::Shared;
use crate::telemetry::Metrics;

pub use gateway::GatewayState;
pub use runtime::{ConfigSource, ReloadError, Reloaded, Runtime, Trigger};

const IDENTITY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    let metrics = Arc::new(Metrics::new());
    let identity_client = crate::upstream::build_client(IDENTITY_CONNECT_TIMEOUT, true)?;
    let shared = match &config.limits.store {
        LimitStore::Memory => None,
        LimitStore::Redis {
            url,
            fail_closed,
            timeout,
        } => {
            let redis = crate::redis::Redis::from_url(url.expose(), *timeout)
                .map_err(std::io::Error::other)?;
            Some(Shared::new(redis, *fail_closed, metrics.clone()))
        }
    };

    let listener = TcpListener::bind(config.server.listen).await?;
    let addr = listener.local_addr()?;
    let admin = match config.server.admin_listen {
        Some(a) => Some(TcpListener::bind(a).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;

    let tasks = TaskTracker::new();
    let grace = config.server.shutdown_grace;
    let last_text = match &source {
        Some(s) => tokio::fs::read_to_string(&s.path).await.ok(),
        None => None,
    };
    let watch = source.as_ref().and_then(|s| s.watch);
    let sighup = source.as_ref().is_some_and(|s| s.sighup);
    let pools = Arc::new(crate::upstream::h1::Pools::new(
        crate::upstream::tls_config()?,
    ));
    tasks.spawn(pools.clone().sweep(shutdown.clone()));
    let parts = runtime::Parts {
        metrics: &metrics,
        identity_client: &identity_client,
        shared: &shared,
        pools: &pools,
    };
    let tracer = match &config.tracing {
        Some(t) => {
            let client = crate::upstream::build_client(IDENTITY_CONNECT_TIMEOUT, true)?;
            let (tracer, exporter) = crate::telemetry::trace::Tracer::new(t, client, &metrics);
            tasks.spawn(exporter.run(shutdown.clone(), config.server.shutdown_grace));
            Some(tracer)
        }
        None => None,
    };
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
    if sighup {
        tasks.spawn(runtime::on_sighup(state.clone(), shutdown.clone()));
    }
    if let Some(every) = watch {
        tasks.spawn(runtime::watch(state.clone(), every, shutdown.clone()));
    }
    {
        let shutdown = shutdown.clone();
        let state = state.clone();
        tasks.spawn(serve(
            listener,
            move |req| gateway::handle(state.clone(), req),
            shutdown,
            grace,
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
            stopping: shutdown.clone(),
            shared: shared.clone(),
            gateway: state.clone(),
            history,
            started: std::time::SystemTime::now(),
        });
        tasks.spawn(serve(
            admin,
            move |req| crate::admin::handle(admin_state.clone(), req),
            shutdown.clone(),
            grace,
        ));
    }
    tracing::info!(%addr, admin = ?admin_addr, "switchyard listening");
    Ok(Gateway {
        addr,
        admin_addr,
        metrics,
        state,
        tasks,
    })
}

/// Accepts connections until `shutdown`, then drains them for at most `grace`.
/// Connection tasks live in a `JoinSet`, so any still running after the grace period are
/// aborted when it drops: no task outlives the server.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: CancellationToken,
    grace: Duration,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<BoxBody>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let watcher = graceful.watcher();
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        service_fn(handler),
                    );
                    let _ = watcher.watch(conn).await;
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(remaining = connections.len(), "grace period over; closing connections");
        }
    }
    connections.shutdown().await;
}
