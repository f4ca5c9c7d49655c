//! The running gateway's live state: what every request reads, and the one way it changes.
//!
//! A [`Snapshot`] is what the request path makes of one config (backends, balancer, consumers,
//! limits); a request takes the current one when it starts and keeps it to the end. Only a
//! reload ([`GatewayState::reload`], in `reload.rs`) builds and swaps in a new one, so the
//! snapshot, the listener's certificate and the write-stall limit are private here. What lives
//! across reloads (connection pools, the limits store, object owners, the tracer) is built once,
//! by [`GatewayState::new`].

mod cert;
mod reload;
mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cert::CertSwap;
pub use reload::{ConfigSource, Lookup, ReloadError, Reloaded, Trigger};
pub use snapshot::{Snapshot, backend_map};

use crate::affinity::Owners;
use crate::config::Config;
use crate::http_client::HttpsClient;
use crate::http1::client::Pools;
use crate::ids::IdGen;
use crate::limits::Shared;
use crate::stall::StallLimit;
use crate::telemetry::Metrics;
use crate::telemetry::otlp::OtlpMetrics;
use crate::telemetry::trace::Tracer;

/// How long a session key stays with the backend that served it last: longer than any prompt
/// cache lives on an idle instance (an hour at most).
const SESSION_TTL: Duration = Duration::from_secs(3600);

/// Shared by every connection of the client listener and by the admin listener.
pub struct GatewayState {
    /// What the current config makes of the request path; swapped whole by a reload.
    current: ArcSwap<Snapshot>,
    pub(crate) metrics: Arc<Metrics>,
    /// Owns the WebSocket tunnels, which outlive the request that opened them, and the token
    /// refreshers.
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    /// How long open tunnels may go on after a stop signal, like any other in-flight exchange.
    pub(crate) grace: Duration,
    pub(crate) ids: IdGen,
    /// Starts traces and takes their spans, when `[tracing]` is configured.
    pub(crate) tracer: Option<Arc<Tracer>>,
    /// Pushes metrics to an OpenTelemetry collector, when `[metrics]` is configured.
    pub(crate) otlp: Option<Arc<OtlpMetrics>>,
    /// Which backend holds each stored object (response, file, batch, ...).
    pub(crate) owners: Arc<Owners>,
    /// Which backend each session key (`routing.affinity_key`) was last served by.
    pub(crate) sessions: Arc<Owners>,
    /// The shared limits store; set at start, kept across reloads.
    pub(crate) shared: Option<Arc<Shared>>,
    /// Fetches tokens and signing keys from the identity platform.
    identity_client: HttpsClient,
    /// Connections to backends.
    pools: Arc<Pools>,
    refreshers: reload::Refreshers,
    source: Option<ConfigSource>,
    /// Held for the whole of a reload: one at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The file's text as last read by a reload, so the watcher does not reload it again.
    last_text: std::sync::Mutex<Option<String>>,
    /// The client listener's certificate, when it serves HTTPS.
    cert_swap: Option<Arc<CertSwap>>,
    /// `routing.idle_timeout` for writes to clients, as the running config says.
    write_stall: Arc<StallLimit>,
}

/// What the live state is made of besides the config: set up once, at start.
pub struct Parts {
    pub metrics: Arc<Metrics>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub identity_client: HttpsClient,
    pub pools: Arc<Pools>,
    pub shared: Option<Arc<Shared>>,
    pub tracer: Option<Arc<Tracer>>,
    pub otlp: Option<Arc<OtlpMetrics>>,
    pub source: Option<ConfigSource>,
}

impl GatewayState {
    /// The live state for `config`, with its credentials already being fetched (so the first
    /// requests find them ready) and, as `parts.source` says, reloads on SIGHUP and on change.
    pub async fn new(parts: Parts, config: Config) -> std::io::Result<Arc<GatewayState>> {
        let Parts {
            metrics,
            tasks,
            shutdown,
            identity_client,
            pools,
            shared,
            tracer,
            otlp,
            source,
        } = parts;
        let last_text = match &source {
            Some(s) => tokio::fs::read_to_string(&s.path).await.ok(),
            None => None,
        };
        let affinity = config.affinity.clone();
        let cert_swap = config
            .server
            .tls
            .as_ref()
            .map(|t| CertSwap::new(t.certified.clone()));
        let write_stall = StallLimit::new(config.routing.idle_timeout);
        let grace = config.server.shutdown_grace;
        let built = snapshot::Parts {
            metrics: &metrics,
            identity_client: &identity_client,
            shared: &shared,
            pools: &pools,
        };
        let first = snapshot::build(&built, config, None)?;
        let state = GatewayState {
            current: ArcSwap::from_pointee(first),
            grace,
            ids: IdGen::new(),
            owners: Arc::new(Owners::new(
                affinity.ttl,
                affinity.max_entries,
                metrics.clone(),
                shared.clone(),
            )),
            sessions: Arc::new(Owners::sessions(
                SESSION_TTL,
                affinity.max_entries,
                metrics.clone(),
                shared.clone(),
            )),
            metrics,
            tasks,
            shutdown,
            tracer,
            otlp,
            shared,
            identity_client,
            pools,
            refreshers: Default::default(),
            source,
            reloading: tokio::sync::Mutex::new(()),
            last_text: std::sync::Mutex::new(last_text),
            cert_swap,
            write_stall,
        };
        state.start_refreshers(&state.snapshot());
        state.metrics.config_generation.set(1);
        let state = Arc::new(state);
        state.spawn_reloaders();
        Ok(state)
    }

    /// The snapshot new requests get.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The client listener's certificate, which reloads replace, when it serves HTTPS.
    pub fn cert_swap(&self) -> Option<Arc<CertSwap>> {
        self.cert_swap.clone()
    }

    /// How long writes to clients may stall, which reloads change.
    pub fn write_stall(&self) -> Arc<StallLimit> {
        self.write_stall.clone()
    }
}
