//! What the request path reads from one config, built whole off the request path.

use std::sync::Arc;

use crate::auth::inbound::Authenticator;
use crate::auth::outbound::{self, TokenProvider};
use crate::balancer::{Balancer, Policy};
use crate::config::Config;
use crate::http_client::HttpsClient;
use crate::limits::{Limiter, Shared};
use crate::proxy::Proxy;
use crate::routing::Router;
use crate::telemetry::Metrics;
use crate::upstream::{Backend, Upstream};

/// Everything the request path reads from one config.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub(crate) proxy: Proxy,
    pub(crate) auth: Authenticator,
    pub(crate) limiter: Limiter,
    /// Every backend's Entra credential.
    pub credentials: Vec<Arc<TokenProvider>>,
    /// 1 for the config the gateway started with, one more per applied reload.
    pub generation: u64,
    /// When it was built, in seconds since the Unix epoch (the model list's `created`).
    pub built_at: u64,
}

/// `map[i]`: the index in `new` of `old`'s backend `i`, when its name, URL and credential are
/// unchanged (the same endpoint reached the same way, so what was learned of it still holds).
pub fn backend_map(old: &Config, new: &Config) -> Vec<Option<usize>> {
    old.backends
        .iter()
        .map(|o| {
            new.backends
                .iter()
                .position(|n| n.name == o.name && n.url == o.url && n.auth == o.auth)
        })
        .collect()
}

/// What every snapshot is built with: set up once at start.
pub(super) struct Parts<'a> {
    pub metrics: &'a Arc<Metrics>,
    pub identity_client: &'a HttpsClient,
    pub shared: &'a Option<Arc<Shared>>,
    /// Backend connections, kept across reloads.
    pub pools: &'a Arc<crate::http1::client::Pools>,
}

/// Builds a snapshot of `config`, taking over what `previous` learned.
pub(super) fn build(
    parts: &Parts<'_>,
    config: Config,
    previous: Option<&Snapshot>,
) -> std::io::Result<Snapshot> {
    let reuse = previous.map_or(&[][..], |p| p.credentials.as_slice());
    let credentials = outbound::providers(&config.backends, parts.identity_client, reuse);
    let backends = config
        .backends
        .iter()
        .map(|b| {
            // Totals go on under the same name, as the Prometheus counters do.
            let stats = previous.and_then(|p| {
                p.proxy
                    .backends
                    .iter()
                    .find(|o| *o.name == *b.name)
                    .map(|o| o.stats.clone())
            });
            Backend::new(b, &credentials, stats, parts.metrics)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    let upstream = match previous {
        Some(p) => p.proxy.upstream().reconfigure(&config.routing)?,
        None => Upstream::new(&config.routing, parts.pools.clone())?,
    };
    let proxy = Proxy::new(
        backends,
        Balancer::with_listed(
            Policy::from_config(&config),
            config
                .deployments
                .iter()
                .map(|d| (d.name.as_str(), d.ranks.as_slice())),
        ),
        Router::new(&config),
        upstream,
        config.routing.clone(),
        parts.metrics.clone(),
        parts.shared.clone(),
    );
    let auth = Authenticator::new(
        &config.consumers,
        config.jwt.as_ref(),
        parts.identity_client,
        previous.map(|p| &p.auth),
    );
    parts.metrics.ledger.set_retention(config.usage.retention);
    let limiter = Limiter::new(
        &config.consumers,
        config.limits.completion_estimate,
        parts.shared.clone(),
        previous.map(|p| &p.limiter),
    );
    if let Some(p) = previous {
        // Last, once nothing can fail: from here leases of the old snapshot end in this one.
        proxy.inherit(&p.proxy, &backend_map(&p.config, &config));
    }
    Ok(Snapshot {
        generation: previous.map_or(1, |p| p.generation + 1),
        built_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        config: Arc::new(config),
        proxy,
        auth,
        limiter,
        credentials,
    })
}
