//! Metrics (one struct of families, registered once and passed by reference) and log set-up.
//! Label values are bounded: backend names come from the config, statuses and outcomes are
//! small fixed sets; nothing from the request (keys, paths, error text) becomes a label.

mod attempt;
pub mod otlp;
pub mod trace;

pub use attempt::AttemptOutcome;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The deployment asked for (`-` for none; `other` past the tracked set, so a client making
    /// names up cannot grow the label set).
    pub deployment: String,
    /// The backend that produced the response, or `none` when the gateway answered itself.
    pub backend: String,
    /// `2xx`, `4xx`, `5xx`, ...
    pub status_class: &'static str,
    /// The consumer's configured name, or `-` without consumers.
    pub consumer: String,
}

/// `2xx`, `3xx`, `4xx`, `5xx` (or `1xx`).
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "1xx",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub backend: String,
    /// A status code (`"429"`) or a transport outcome (`connect_error`, `timeout`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub deployment: String,
    pub backend: String,
    /// The consumer's configured name, or `-` without consumers.
    pub consumer: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    /// The consumer's configured name, or `-` without consumers.
    pub consumer: String,
    /// The deployment that served.
    pub deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The deployment that could not serve the request.
    pub deployment: String,
    /// The deployment the request went on to.
    pub fallback: String,
    /// `throttled`, `unavailable`, `context_length_exceeded` or `content_filter`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerRejectionLabels {
    /// The consumer's configured name.
    pub consumer: String,
    /// `requests_per_minute`, `tokens_per_minute`, `token_quota` or `store_unavailable`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `rejected`.
    pub result: &'static str,
    /// `start`, `signal`, `admin`, `file`.
    pub trigger: &'static str,
}

/// One backend's running totals for the status page, and its own handles on the metric series
/// labelled with its name: the request path pays an increment, not a label lookup with its
/// allocations and hashing. Kept by name across reloads.
#[derive(Debug)]
pub struct BackendStats {
    pub ttfb_histogram: Histogram,
    pub duration_histogram: Histogram,
    /// `attempts_total{outcome="200"}`: the outcome nearly every attempt has.
    pub attempts_ok: Counter,
    /// Responses this backend produced that went to a client.
    pub served: AtomicU64,
    /// Attempts it answered with 429.
    pub throttled: AtomicU64,
    /// Attempts that failed otherwise: 5xx answers, connect errors, timeouts.
    pub failed: AtomicU64,
    /// Tokens it reported using (prompt + completion).
    pub tokens: AtomicU64,
    /// Time to first byte of the responses it served: sum (µs) and count, for averages.
    pub ttfb_us: AtomicU64,
    pub ttfb_count: AtomicU64,
    /// When (Unix seconds) it was last logged as unable to serve a deployment.
    pub misfit_warned: AtomicU64,
}

impl BackendStats {
    pub fn new(backend: &str, metrics: &Metrics) -> Self {
        let b = BackendLabels {
            backend: backend.to_string(),
        };
        Self {
            ttfb_histogram: metrics.time_to_first_byte.get_or_create(&b).clone(),
            duration_histogram: metrics.duration.get_or_create(&b).clone(),
            attempts_ok: metrics
                .attempts
                .get_or_create(&AttemptLabels {
                    backend: backend.to_string(),
                    outcome: "200".to_string(),
                })
                .clone(),
            served: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            ttfb_us: AtomicU64::new(0),
            ttfb_count: AtomicU64::new(0),
            misfit_warned: AtomicU64::new(0),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    /// Attempts that failed and were followed by another attempt on another backend.
    pub retries: Family<AttemptLabels, Counter>,
    pub duration: Family<BackendLabels, Histogram>,
    /// Request received to response headers sent, by serving backend.
    pub time_to_first_byte: Family<BackendLabels, Histogram>,
    /// Time the gateway itself added before the first byte: everything but waiting on backends.
    pub overhead: Histogram,
    pub in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub stream_errors: Family<BackendLabels, Counter<u64, AtomicU64>>,
    pub cooldowns: Family<BackendLabels, Counter>,
    pub circuits_opened: Family<BackendLabels, Counter>,
    /// Requests the gateway answered itself because no backend could take them.
    pub rejections: Family<ReasonLabels, Counter>,
    /// Tokens the backends reported using, by backend, consumer and kind (prompt, completion).
    pub tokens: Family<TokenLabels, Counter>,
    /// Requests refused by their consumer's own limits (APIM's rate-limit and quota policies).
    pub consumer_rejections: Family<ConsumerRejectionLabels, Counter>,
    /// Config reloads, applied or rejected, by what triggered them.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Which config is running: 1 at start, one more per applied reload.
    pub config_generation: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Client connections open now.
    pub open_connections: Gauge,
    /// Client connections closed at once because `server.max_connections` were open.
    pub connections_refused: Counter,
    pub spans_exported: Counter,
    /// Spans lost because the export queue was full (collector slow or down).
    pub spans_dropped: Counter,
    pub span_exports_failed: Counter,
    /// 1 while the shared limits store (Redis) answers, 0 while it does not.
    pub store_up: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub store_errors: Counter,
    /// Cooldowns learned from other replicas through the shared store.
    pub remote_cooldowns: Counter,
    /// Stored objects whose owning backend this replica remembers.
    pub owners: Gauge,
    /// Owners forgotten to stay within `affinity.max_entries` (least recently used first).
    pub owner_evictions: Counter,
    /// Searches for the backend holding an object never seen made, by result.
    pub owner_searches: Family<ReasonLabels, Counter>,
    /// Requests sent to the backend holding an object they name.
    pub owner_routed: Counter,
    /// Requests that went on from their deployment to a fallback, by both and why.
    pub fallbacks: Family<FallbackLabels, Counter>,
    /// What the tokens used cost, in `[usage] currency`, by consumer and deployment.
    pub cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    /// The share of each consumer's budget spent (and held) this period, as of its latest
    /// admitted request.
    pub budget_used: Family<ConsumerLabels, Gauge<f64, AtomicU64>>,
    /// Requests, tokens and cost by consumer, deployment and hour, for the usage report.
    pub ledger: std::sync::Arc<crate::usage::ledger::Ledger>,
    /// The per-request counters of each label set seen, found in the families once.
    request_counters: std::sync::RwLock<
        std::collections::HashMap<u64, Vec<CachedCounters>, crate::fnv::FnvBuild>,
    >,
}

/// The counters every answered request touches, for one label set.
#[derive(Clone)]
pub struct RequestCounters {
    pub requests: Counter,
    tokens: std::sync::Arc<TokenCounters>,
    /// The usage ledger's cell of the label set's consumer and deployment.
    ledger: std::sync::Arc<crate::usage::ledger::Cell>,
}

/// Token counters are created with the first usage reported, so label sets that never carry
/// usage (the gateway's own errors) add no token series.
struct TokenCounters {
    labels: TokenLabels,
    counters: std::sync::OnceLock<[Counter; TOKEN_KINDS.len()]>,
    cost: std::sync::OnceLock<Counter<f64, AtomicU64>>,
}

/// The `kind`s of `switchyard_tokens_total`: prompt and completion as the answer counts them,
/// and the parts of them it breaks out (cached prompt, reasoning, audio).
pub const TOKEN_KINDS: [&str; 5] = ["prompt", "completion", "cached", "reasoning", "audio"];

impl RequestCounters {
    pub fn add_usage(&self, metrics: &Metrics, u: &crate::usage::Usage) {
        let counters = self.tokens.counters.get_or_init(|| {
            let mut labels = self.tokens.labels.clone();
            TOKEN_KINDS.map(|kind| {
                labels.kind = kind;
                metrics.tokens.get_or_create(&labels).clone()
            })
        });
        for (c, n) in counters.iter().zip(u.by_kind()) {
            c.inc_by(n);
        }
    }

    /// The deployment label: the served deployment, `-` for none, `other` past the tracked.
    pub fn deployment(&self) -> &str {
        &self.tokens.labels.deployment
    }

    /// Counts a finished request in the usage ledger, in the hour it finished.
    pub fn record(
        &self,
        metrics: &Metrics,
        hour: crate::usage::ledger::Hour,
        t: &crate::usage::ledger::Tally,
    ) {
        metrics.ledger.record(&self.ledger, hour, t);
    }

    /// Adds what a request's tokens cost.
    pub fn add_cost(&self, metrics: &Metrics, cost: f64) {
        self.tokens
            .cost
            .get_or_init(|| {
                let l = &self.tokens.labels;
                metrics
                    .cost
                    .get_or_create(&CostLabels {
                        consumer: l.consumer.clone(),
                        deployment: l.deployment.clone(),
                    })
                    .clone()
            })
            .inc_by(cost);
    }
}

struct CachedCounters {
    deployment: Box<str>,
    backend: Box<str>,
    status_class: &'static str,
    consumer: Box<str>,
    counters: RequestCounters,
}

/// FNV-1a over the label values, with a separator so that ("ab", "c") and ("a", "bc") differ.
/// Collisions only cost a longer scan: entries are compared whole.
fn label_hash(parts: [&str; 4]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Client requests answered, by serving backend and status",
            requests.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Upstream attempts, by backend and outcome",
            attempts.clone(),
        );
        let retries = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "retries",
            "Failed attempts that were retried on another backend, by backend and outcome",
            retries.clone(),
        );
        let duration = Family::<BackendLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to the last response byte sent, by serving backend",
            duration.clone(),
        );
        let time_to_first_byte = Family::<BackendLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time from request received to response headers sent, by serving backend",
            time_to_first_byte.clone(),
        );
        let overhead = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
        ]);
        registry.register(
            "gateway_overhead_seconds",
            "Time the gateway added before the first byte (all but the wait on backends)",
            overhead.clone(),
        );
        let in_flight = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "in_flight_requests",
            "Requests being served, streams included until they end",
            in_flight.clone(),
        );
        let stream_errors = Family::<BackendLabels, Counter>::default();
        registry.register(
            "stream_errors",
            "Responses whose body failed after headers were sent to the client",
            stream_errors.clone(),
        );
        let cooldowns = Family::<BackendLabels, Counter>::default();
        registry.register(
            "cooldowns",
            "Times a backend was put in cooldown after a throttling answer (429, or 503 with a retry hint)",
            cooldowns.clone(),
        );
        let circuits_opened = Family::<BackendLabels, Counter>::default();
        registry.register(
            "circuits_opened",
            "Times a backend's circuit breaker opened after repeated failures",
            circuits_opened.clone(),
        );
        let rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests answered by the gateway because no backend could take them (all_throttled, all_unavailable)",
            rejections.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens used, as the backends reported them (usage), by backend, consumer and kind",
            tokens.clone(),
        );
        let consumer_rejections = Family::<ConsumerRejectionLabels, Counter>::default();
        registry.register(
            "consumer_rejections",
            "Requests refused by their consumer's limits, by consumer and limit",
            consumer_rejections.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, applied or rejected (invalid), by trigger",
            reloads.clone(),
        );
        let config_generation = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "config_generation",
            "The running config's generation: 1 at start, one more per applied reload",
            config_generation.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed on arrival because server.max_connections were open",
            connections_refused.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            spans_exported.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full",
            spans_dropped.clone(),
        );
        let span_exports_failed = Counter::default();
        registry.register(
            "trace_spans_failed",
            "Spans lost because their export to the collector failed",
            span_exports_failed.clone(),
        );
        let store_up = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "limits_store_up",
            "1 while the shared limits store (Redis) answers, 0 while it does not",
            store_up.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "limits_store_errors",
            "Failed or timed-out calls to the shared limits store",
            store_errors.clone(),
        );
        let remote_cooldowns = Counter::default();
        registry.register(
            "remote_cooldowns",
            "Backend cooldowns learned from other replicas through the shared store",
            remote_cooldowns.clone(),
        );
        let owners = Gauge::default();
        registry.register(
            "owners",
            "Stored objects whose owning backend this replica remembers",
            owners.clone(),
        );
        let owner_evictions = Counter::default();
        registry.register(
            "owner_evictions",
            "Remembered owners dropped to stay within affinity.max_entries, least recently used first",
            owner_evictions.clone(),
        );
        let owner_searches = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "owner_searches",
            "Searches of the backends for an object the gateway never saw made, by result (found, not_found, unavailable)",
            owner_searches.clone(),
        );
        let owner_routed = Counter::default();
        registry.register(
            "owner_routed",
            "Requests sent to the backend that holds an object they name",
            owner_routed.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests that went on from their deployment to a fallback deployment, by both and why (throttled, unavailable, context_length_exceeded, content_filter)",
            fallbacks.clone(),
        );
        let cost = Family::<CostLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "cost",
            "What the tokens used cost, from each answer's usage and its deployment's price, in the configured currency ([usage] currency), by consumer and deployment",
            cost.clone(),
        );
        let budget_used = Family::<ConsumerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "budget_used_ratio",
            "The share of the consumer's budget (consumers[].budget) spent or held this period, as of its latest admitted request",
            budget_used.clone(),
        );
        Self {
            budget_used,
            cost,
            fallbacks,
            owners,
            owner_evictions,
            owner_searches,
            owner_routed,
            registry,
            time_to_first_byte,
            overhead,
            remote_cooldowns,
            consumer_rejections,
            reloads,
            config_generation,
            open_connections,
            connections_refused,
            spans_exported,
            spans_dropped,
            span_exports_failed,
            store_up,
            store_errors,
            tokens,
            cooldowns,
            circuits_opened,
            rejections,
            requests,
            attempts,
            retries,
            duration,
            in_flight,
            stream_errors,
            ledger: Default::default(),
            request_counters: Default::default(),
        }
    }

    /// The request and token counters for one label set. Looking them up in their families
    /// takes a `String` per label and a SipHash per lookup, three times per request; the label
    /// sets are few (all bounded, see `RequestLabels`), so each is looked up there once.
    pub fn request_counters(
        &self,
        deployment: &str,
        backend: &str,
        status_class: &'static str,
        consumer: &str,
    ) -> RequestCounters {
        let key = label_hash([deployment, backend, status_class, consumer]);
        let matches = |c: &&CachedCounters| {
            &*c.deployment == deployment
                && &*c.backend == backend
                && c.status_class == status_class
                && &*c.consumer == consumer
        };
        // A poisoned lock only means a panic elsewhere mid-insert: the map is still whole.
        let cache = self
            .request_counters
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&key).and_then(|v| v.iter().find(matches)) {
            return c.counters.clone();
        }
        drop(cache);
        let counters = RequestCounters {
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    deployment: deployment.to_string(),
                    backend: backend.to_string(),
                    status_class,
                    consumer: consumer.to_string(),
                })
                .clone(),
            tokens: std::sync::Arc::new(TokenCounters {
                labels: TokenLabels {
                    deployment: deployment.to_string(),
                    backend: backend.to_string(),
                    consumer: consumer.to_string(),
                    kind: "prompt",
                },
                counters: std::sync::OnceLock::new(),
                cost: std::sync::OnceLock::new(),
            }),
            ledger: self.ledger.cell(consumer, deployment),
        };
        let mut cache = self
            .request_counters
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let entries = cache.entry(key).or_default();
        if !entries.iter().any(|c| matches(&c)) {
            entries.push(CachedCounters {
                deployment: deployment.into(),
                backend: backend.into(),
                status_class,
                consumer: consumer.into(),
                counters: counters.clone(),
            });
        }
        counters
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Attempts on `backend` with `outcome` that were retried elsewhere (the demo's "absorbed").
    pub fn retried(&self, backend: &str, outcome: &str) -> u64 {
        self.retries
            .get_or_create(&AttemptLabels {
                backend: backend.to_string(),
                outcome: outcome.to_string(),
            })
            .get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs the log subscriber: `RUST_LOG` wins, else `default_filter`.
/// `json`: one JSON object per line (for log pipelines); otherwise readable text, coloured on
/// a terminal.
pub fn init_logging(default_filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_request_counters_are_the_families_own() {
        let m = Metrics::new();
        let a = m.request_counters("gpt-4o", "east", "2xx", "-");
        a.requests.inc();
        // Found again from the cache: the same counter.
        m.request_counters("gpt-4o", "east", "2xx", "-")
            .requests
            .inc();
        // Label values that concatenate alike are still different sets.
        m.request_counters("gpt-4", "oeast", "2xx", "-")
            .requests
            .inc();
        m.request_counters("gpt-4o", "east", "5xx", "-")
            .requests
            .inc();
        let text = m.render();
        assert!(text.contains(r#"switchyard_requests_total{deployment="gpt-4o",backend="east",status_class="2xx",consumer="-"} 2"#), "{text}");
        assert!(text.contains(r#"switchyard_requests_total{deployment="gpt-4",backend="oeast",status_class="2xx",consumer="-"} 1"#), "{text}");
        assert!(text.contains(r#"switchyard_requests_total{deployment="gpt-4o",backend="east",status_class="5xx",consumer="-"} 1"#), "{text}");
        // No token series until usage is reported, then every kind.
        assert!(!text.contains("switchyard_tokens_total{"), "{text}");
        let usage = |prompt, completion, cached, reasoning, audio| crate::usage::Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: cached,
            reasoning_tokens: reasoning,
            audio_tokens: audio,
        };
        a.add_usage(&m, &usage(10, 3, 8, 2, 0));
        m.request_counters("gpt-4o", "east", "2xx", "-")
            .add_usage(&m, &usage(1, 1, 0, 0, 1));
        let text = m.render();
        for (kind, n) in [
            ("prompt", 11),
            ("completion", 4),
            ("cached", 8),
            ("reasoning", 2),
            ("audio", 1),
        ] {
            let line = format!(
                r#"switchyard_tokens_total{{deployment="gpt-4o",backend="east",consumer="-",kind="{kind}"}} {n}"#
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }
}
