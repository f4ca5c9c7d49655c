//! Listeners, connection handling and graceful shutdown. No business logic here.

mod gateway;

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

use crate::auth::outbound::TokenProvider;
use crate::balancer::{Balancer, Policy};
use crate::body::BoxBody;
use crate::config::{Config, LimitStore};
use crate::limits::Shared;
use crate::proxy::Proxy;
use crate::routing::Router;
use crate::telemetry::Metrics;
use crate::upstream::{Backend, Upstream};

pub use gateway::GatewayState;

const IDENTITY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running gateway: its bound addresses and the task that ends when it has shut down.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    tasks: TaskTracker,
}

impl Gateway {
    /// Waits until both listeners have drained after the shutdown token fired.
    pub async fn wait(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Binds the listeners and starts serving; returns once both are accepting.
/// Cancelling `shutdown` stops accepting, lets in-flight requests and streams finish within
/// `server.shutdown_grace`, then ends every connection that is left.
pub async fn start(config: Config, shutdown: CancellationToken) -> std::io::Result<Gateway> {
    let metrics = Arc::new(Metrics::new());
    let identity_client = crate::upstream::build_client(IDENTITY_CONNECT_TIMEOUT, true)?;
    let credentials: Vec<Arc<TokenProvider>> =
        crate::auth::outbound::providers(&config.backends, &identity_client);
    let backends = config
        .backends
        .iter()
        .map(|b| Backend::new(b, &credentials))
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    let upstream = Upstream::new(&config.routing)?;
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
    let proxy = Proxy::new(
        backends,
        Balancer::new(Policy::from_config(&config)),
        Router::new(&config),
        upstream,
        config.routing.clone(),
        metrics.clone(),
        shared.clone(),
    );

    let listener = TcpListener::bind(config.server.listen).await?;
    let addr = listener.local_addr()?;
    let admin = match config.server.admin_listen {
        Some(a) => Some(TcpListener::bind(a).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;

    let tasks = TaskTracker::new();
    let grace = config.server.shutdown_grace;
    // Tokens are fetched from the start, so the first requests find them ready.
    for provider in &credentials {
        let provider = provider.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { provider.refresh_loop(shutdown).await });
    }
    let state = Arc::new(GatewayState {
        proxy,
        metrics: metrics.clone(),
        max_body_bytes: config.server.max_body_bytes,
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        auth: crate::auth::inbound::Authenticator::new(
            &config.consumers,
            config.jwt.as_ref(),
            &identity_client,
        ),
        limiter: crate::limits::Limiter::new(
            &config.consumers,
            config.limits.completion_estimate,
            shared.clone(),
        ),
        grace,
        ids: crate::ids::IdGen::new(),
    });
    if let Some(shared) = &shared {
        let state = state.clone();
        tasks.spawn(shared.clone().run(
            move |deployment, backend, wait| state.proxy.remote_cooldown(deployment, backend, wait),
            shutdown.clone(),
        ));
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
        let admin_state = Arc::new(crate::admin::AdminState {
            metrics: metrics.clone(),
            stopping: shutdown.clone(),
            credentials,
            shared: shared.clone(),
            gateway: state.clone(),
            config: Arc::new(config.clone()),
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
