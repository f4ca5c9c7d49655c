//! Config reload. What the request path reads from the config (a [`Snapshot`]) is built whole,
//! off the request path, and swapped in atomically; a request keeps the runtime it started with
//! until it ends. Backends a reload leaves unchanged keep their health, in-flight counts, latency
//! averages and drained flag; consumers keep their limit counters; credentials keep their
//! tokens. An invalid config is refused with its error and the running one goes on serving.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::GatewayState;
use super::snapshot::{self, Snapshot, backend_map};
use crate::auth::outbound::{self, TokenProvider};
use crate::config::Config;
use crate::sync::lock;
use crate::telemetry::ReloadLabels;

/// Looks an environment variable up.
pub type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where reloads read the config from, and what triggers them besides `POST /admin/reload`.
pub struct ConfigSource {
    pub path: PathBuf,
    /// Looks `${VAR}` names up: the process environment, outside tests.
    pub lookup: Lookup,
    /// Reload on SIGHUP.
    pub sighup: bool,
    /// Look at the file this often and reload when it changed (`None`: don't watch).
    pub watch: Option<Duration>,
}

impl ConfigSource {
    /// A config file with `${VAR}` taken from the environment, reloaded on SIGHUP and on change.
    pub fn file(path: PathBuf) -> Self {
        Self {
            path,
            lookup: Arc::new(|name| std::env::var(name).ok()),
            sighup: true,
            watch: Some(Duration::from_secs(1)),
        }
    }
}

/// What set a reload off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Admin,
    File,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
            Trigger::File => "file",
        }
    }
}

/// Why a reload was not applied.
#[derive(Debug)]
pub enum ReloadError {
    /// The gateway was started from a config in memory: there is nothing to reload.
    NoSource,
    /// The file cannot be read or the config is invalid (the message names the field).
    Invalid(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::NoSource => {
                f.write_str("the gateway was not started from a config file; nothing to reload")
            }
            ReloadError::Invalid(e) => f.write_str(e),
        }
    }
}

/// What an applied reload changed.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub generation: u64,
    /// Backends whose state carried over (same name, URL and credential).
    pub kept: Vec<String>,
    /// Backends that start fresh: new, or with a changed URL or credential.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Settings that changed in the file but take effect only at a restart (kept as running).
    pub restart_required: Vec<&'static str>,
}

impl Reloaded {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "status": "applied",
            "generation": self.generation,
            "backends": {"kept": self.kept, "added": self.added, "removed": self.removed},
            "restart_required": self.restart_required,
        })
    }
}

/// The running token refreshers, each with the token that stops it.
pub(super) type Refreshers = Mutex<Vec<(Arc<TokenProvider>, CancellationToken)>>;

/// Settings a running gateway cannot change (its sockets and its limits store): reset to the
/// running values, and named, so the operator hears they wait for a restart.
fn keep_restart_only(new: &mut Config, running: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.server.listen != running.server.listen {
        changed.push("server.listen");
        new.server.listen = running.server.listen;
    }
    if new.server.admin_listen != running.server.admin_listen {
        changed.push("server.admin_listen");
        new.server.admin_listen = running.server.admin_listen;
    }
    if new.server.shutdown_grace != running.server.shutdown_grace {
        changed.push("server.shutdown_grace");
        new.server.shutdown_grace = running.server.shutdown_grace;
    }
    if new.server.header_read_timeout != running.server.header_read_timeout {
        changed.push("server.header_read_timeout");
        new.server.header_read_timeout = running.server.header_read_timeout;
    }
    if new.server.body_read_timeout != running.server.body_read_timeout {
        changed.push("server.body_read_timeout");
        new.server.body_read_timeout = running.server.body_read_timeout;
    }
    if new.server.max_connections != running.server.max_connections {
        changed.push("server.max_connections");
        new.server.max_connections = running.server.max_connections;
    }
    // A listener's certificate can be replaced while it serves; turning HTTPS on or off
    // needs a new listener.
    if new.server.tls.is_some() != running.server.tls.is_some() {
        changed.push("server.tls_cert");
        new.server.tls = running.server.tls.clone();
    }
    if new.server.ca != running.server.ca {
        changed.push("server.ca_file");
        new.server.ca = running.server.ca.clone();
    }
    if new.tracing != running.tracing {
        changed.push("tracing");
        new.tracing = running.tracing.clone();
    }
    if new.metrics != running.metrics {
        changed.push("metrics");
        new.metrics = running.metrics.clone();
    }
    if new.limits.store != running.limits.store {
        changed.push("limits.store");
        new.limits.store = running.limits.store.clone();
    }
    changed
}

impl GatewayState {
    /// Starts refreshing the credentials `rt` added and stops those it no longer uses.
    pub(super) fn start_refreshers(&self, rt: &Snapshot) {
        outbound::assign(&rt.credentials, &rt.config.backends);
        let mut running = lock(&self.refreshers);
        running.retain(|(p, stop)| {
            let used = rt.credentials.iter().any(|c| Arc::ptr_eq(c, p));
            if !used {
                stop.cancel();
            }
            used
        });
        for p in &rt.credentials {
            if running.iter().any(|(r, _)| Arc::ptr_eq(r, p)) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let provider = p.clone();
            let s = stop.clone();
            self.tasks
                .spawn(async move { provider.refresh_loop(s).await });
            running.push((p.clone(), stop));
        }
    }

    /// Reads the config file again and, if it is valid, swaps it in. One reload at a time.
    pub async fn reload(self: &Arc<Self>, trigger: Trigger) -> Result<Reloaded, ReloadError> {
        let Some(source) = &self.source else {
            return Err(ReloadError::NoSource);
        };
        let _one = self.reloading.lock().await;
        let text = match tokio::fs::read_to_string(&source.path).await {
            Ok(t) => t,
            Err(e) => {
                let e = ReloadError::Invalid(format!("cannot read {}: {e}", source.path.display()));
                self.rejected(trigger, &e);
                return Err(e);
            }
        };
        *lock(&self.last_text) = Some(text.clone());
        let state = self.clone();
        let lookup = source.lookup.clone();
        // Validation, token-counting tables and client set-up may take a while: not on a
        // runtime worker that is serving requests.
        let built = tokio::task::spawn_blocking(move || {
            let mut config =
                Config::parse(&text, &*lookup).map_err(|e| ReloadError::Invalid(e.to_string()))?;
            let previous = state.snapshot();
            let restart_required = keep_restart_only(&mut config, &previous.config);
            let parts = snapshot::Parts {
                metrics: &state.metrics,
                identity_client: &state.identity_client,
                shared: &state.shared,
                pools: &state.pools,
            };
            let rt = snapshot::build(&parts, config, Some(&previous))
                .map_err(|e| ReloadError::Invalid(e.to_string()))?;
            Ok::<_, ReloadError>((rt, previous, restart_required))
        })
        .await
        .unwrap_or_else(|e| Err(ReloadError::Invalid(format!("reload task failed: {e}"))));
        let (rt, previous, restart_required) = match built {
            Ok(b) => b,
            Err(e) => {
                self.rejected(trigger, &e);
                return Err(e);
            }
        };
        let map = backend_map(&previous.config, &rt.config);
        let kept_new: Vec<usize> = map.iter().flatten().copied().collect();
        let report = Reloaded {
            generation: rt.generation,
            kept: map
                .iter()
                .flatten()
                .map(|&j| rt.config.backends[j].name.clone())
                .collect(),
            added: (0..rt.config.backends.len())
                .filter(|j| !kept_new.contains(j))
                .map(|j| rt.config.backends[j].name.clone())
                .collect(),
            removed: map
                .iter()
                .enumerate()
                .filter(|(_, j)| j.is_none())
                .map(|(i, _)| previous.config.backends[i].name.clone())
                .collect(),
            restart_required,
        };
        if let (Some(swap), Some(tls)) = (&self.cert_swap, &rt.config.server.tls)
            && previous.config.server.tls.as_ref() != Some(tls)
        {
            swap.set(tls.certified.clone());
            tracing::info!(cert = %tls.cert_path.display(), "listener certificate replaced");
        }
        let rt = Arc::new(rt);
        self.start_refreshers(&rt);
        self.write_stall.set(rt.config.routing.idle_timeout);
        self.current.store(rt);
        self.metrics.config_generation.set(report.generation as i64);
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels {
                result: "applied",
                trigger: trigger.as_str(),
            })
            .inc();
        tracing::info!(
            trigger = trigger.as_str(),
            generation = report.generation,
            kept = %report.kept.join(","),
            added = %report.added.join(","),
            removed = %report.removed.join(","),
            "config reloaded"
        );
        if !report.restart_required.is_empty() {
            tracing::warn!(
                settings = %report.restart_required.join(", "),
                "these settings changed but take effect only after a restart; running with the old values"
            );
        }
        Ok(report)
    }

    /// Reloads on SIGHUP and when the file changes, as the config source says.
    pub(super) fn spawn_reloaders(self: &Arc<Self>) {
        let Some(source) = &self.source else {
            return;
        };
        if source.sighup {
            self.tasks
                .spawn(on_sighup(self.clone(), self.shutdown.clone()));
        }
        if let Some(every) = source.watch {
            self.tasks
                .spawn(watch(self.clone(), every, self.shutdown.clone()));
        }
    }

    fn rejected(&self, trigger: Trigger, e: &ReloadError) {
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels {
                result: "rejected",
                trigger: trigger.as_str(),
            })
            .inc();
        tracing::error!(trigger = trigger.as_str(), error = %e, "config reload rejected; the running config keeps serving");
    }
}

/// Reloads on SIGHUP until shutdown.
async fn on_sighup(state: Arc<GatewayState>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = state.reload(Trigger::Signal).await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (state, shutdown);
    }
}

/// Reloads when the file's content changes, once it has held still for one look (an editor
/// half-way through a write is not read as an invalid config), and likewise when the listener's
/// certificate or key file changes (cert-manager or Key Vault renewing it).
async fn watch(state: Arc<GatewayState>, every: Duration, shutdown: CancellationToken) {
    let Some(path) = state.source.as_ref().map(|s| s.path.clone()) else {
        return;
    };
    // The config's text, and what the listener's certificate and key files hold.
    let mut pending: Option<(String, Option<[u8; 32]>)> = None;
    // Certificate files a reload was already tried with: a bad pair is refused once, not on
    // every look.
    let mut tried_tls: Option<[u8; 32]> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // A missing file (mid-rename) is looked at again next time.
        let Ok(now) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        let running_tls = state.snapshot().config.server.tls.clone();
        let tls_now = match &running_tls {
            Some(t) => t.files_fingerprint().await,
            None => None,
        };
        let text_same = lock(&state.last_text).as_deref() == Some(now.as_str());
        let tls_same = match (tls_now, &running_tls) {
            (Some(f), Some(t)) => f == t.fingerprint() || Some(f) == tried_tls,
            _ => true,
        };
        if text_same && tls_same {
            pending = None;
            continue;
        }
        let snapshot = (now, tls_now);
        if pending.as_ref() == Some(&snapshot) {
            pending = None;
            tried_tls = snapshot.1;
            let _ = state.reload(Trigger::File).await;
        } else {
            pending = Some(snapshot);
        }
    }
}
