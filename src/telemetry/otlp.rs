//! Metrics pushed to an OpenTelemetry collector over OTLP/HTTP (JSON encoding), for estates
//! that read OpenTelemetry rather than scrape Prometheus (Azure Container Apps' managed
//! collector, Azure Monitor): the GenAI semantic conventions' client metrics
//! (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`), the cost of the tokens,
//! and the tokens by kind. Built on the OpenTelemetry SDK and its OTLP exporter; the exporter
//! posts through the gateway's own HTTP client (its TLS roots, `server.ca`) on the gateway's
//! runtime.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundHistogram, Counter, Histogram, Meter, MeterProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

use super::TOKEN_KINDS;
use crate::config::MetricsConfig;
use crate::http_client::HttpsClient;
use crate::usage::Usage;

const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a stopping gateway looks whether its last requests have finished.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// The semantic conventions' advised buckets for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// The semantic conventions' advised buckets for `gen_ai.client.operation.duration`.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// The exporter's HTTP client: the gateway's, driven on the gateway's runtime (the SDK's
/// reader runs on a thread of its own, with no runtime).
#[derive(Debug)]
struct Client {
    client: HttpsClient,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let req = Request::from_parts(parts, Full::new(body));
        let sent = self.runtime.spawn(async move {
            tokio::time::timeout(EXPORT_TIMEOUT, async {
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>(Response::from_parts(parts, body))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {EXPORT_TIMEOUT:?}")))
        });
        match sent.await {
            Ok(r) => r.map_err(Into::into),
            Err(e) => Err(e.to_string().into()),
        }
    }
}

/// What one finished request is recorded with. Every name is one of a bounded set (the
/// metrics' labels), so callers cannot grow the series.
pub struct Finished<'a> {
    pub operation: Option<&'static str>,
    /// The deployment the caller asked for (`gen_ai.request.model`), when a fallback served.
    pub requested: Option<&'a str>,
    /// The deployment that served, as the Prometheus metrics label it (`-` for none, `other`
    /// past the tracked ones).
    pub deployment: &'a str,
    pub consumer: &'a str,
    pub backend: &'a str,
    pub status: u16,
    pub stream_failed: bool,
    pub duration: Duration,
    pub usage: Option<Usage>,
    pub cost: Option<f64>,
}

/// The status a request whose stream broke is keyed by.
const STREAM_FAILED: u16 = 1;

/// What a request's instruments are bound by.
struct Key<'a> {
    operation: &'static str,
    model: &'a str,
    deployment: &'a str,
    consumer: &'a str,
    backend: &'a str,
    status: u16,
}

impl Key<'_> {
    fn parts(&self) -> [&str; 5] {
        [
            self.operation,
            self.model,
            self.deployment,
            self.consumer,
            self.backend,
        ]
    }
}

/// The instruments bound to one key's attributes.
struct Bound {
    operation: &'static str,
    /// Model, deployment, consumer, backend.
    parts: [Box<str>; 4],
    status: u16,
    duration: BoundHistogram<f64>,
    input: BoundHistogram<u64>,
    output: BoundHistogram<u64>,
    tokens: [BoundCounter<u64>; TOKEN_KINDS.len()],
    cost: BoundCounter<f64>,
}

impl Bound {
    fn is(&self, k: &Key<'_>) -> bool {
        self.operation == k.operation
            && self.status == k.status
            && self
                .parts
                .iter()
                .zip([k.model, k.deployment, k.consumer, k.backend])
                .all(|(a, b)| **a == *b)
    }
}

/// The instruments, and the provider that exports them.
pub struct OtlpMetrics {
    provider: SdkMeterProvider,
    token_usage: Histogram<u64>,
    duration: Histogram<f64>,
    cost: Counter<f64>,
    tokens: Counter<u64>,
    /// The instruments bound to each key seen.
    bound: std::sync::RwLock<HashMap<u64, Vec<Arc<Bound>>, crate::fnv::FnvBuild>>,
}

impl std::fmt::Debug for OtlpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpMetrics").finish_non_exhaustive()
    }
}

impl OtlpMetrics {
    /// Starts exporting every `config.export_interval`; needs a Tokio runtime.
    pub fn new(
        config: &MetricsConfig,
        client: HttpsClient,
        currency: &str,
    ) -> Result<Arc<Self>, String> {
        let headers = config
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.expose().to_string()))
            .collect();
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(Client {
                client,
                runtime: tokio::runtime::Handle::current(),
            })
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(config.endpoint.to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("metrics.otlp_endpoint: {e}"))?;
        let reader = PeriodicReader::builder(exporter)
            .with_interval(config.export_interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let meter = provider.meter("switchyard");
        Ok(Arc::new(Self::instruments(provider, &meter, currency)))
    }

    fn instruments(provider: SdkMeterProvider, meter: &Meter, currency: &str) -> Self {
        Self {
            token_usage: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Number of input and output tokens used")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("GenAI operation duration")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            cost: meter
                .f64_counter("switchyard.cost")
                .with_unit(format!("{{{currency}}}"))
                .with_description("What the tokens used cost, at the deployments' prices")
                .build(),
            tokens: meter
                .u64_counter("switchyard.tokens")
                .with_unit("{token}")
                .with_description(
                    "Tokens used by kind: prompt, completion and the parts of them (cached, reasoning, audio)",
                )
                .build(),
            provider,
            bound: Default::default(),
        }
    }

    /// The instruments bound to `key`'s attributes, made on first use: a request then records
    /// with no attribute hashing (the SDK's own lookup cost more than the rest of the request
    /// path together).
    fn bound(&self, key: &Key<'_>) -> Arc<Bound> {
        let hash = {
            let mut h = crate::fnv::Fnv::default();
            for part in key.parts() {
                h.write(part.as_bytes());
                h.write_u8(0xff);
            }
            h.write_u16(key.status);
            h.finish()
        };
        // A poisoned lock only means a panic elsewhere mid-insert: the map is still whole.
        let cache = self.bound.read().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.get(&hash).and_then(|v| v.iter().find(|b| b.is(key))) {
            return b.clone();
        }
        drop(cache);
        let b = Arc::new(self.bind(key));
        let mut cache = self.bound.write().unwrap_or_else(|e| e.into_inner());
        let entries = cache.entry(hash).or_default();
        match entries.iter().find(|e| e.is(key)) {
            Some(e) => e.clone(),
            None => {
                entries.push(b.clone());
                b
            }
        }
    }

    fn bind(&self, key: &Key<'_>) -> Bound {
        let mut attrs: Vec<KeyValue> = Vec::with_capacity(8);
        if !key.operation.is_empty() {
            attrs.push(KeyValue::new("gen_ai.operation.name", key.operation));
        }
        attrs.push(KeyValue::new("gen_ai.provider.name", "azure.ai.openai"));
        if key.model != "-" {
            attrs.push(KeyValue::new("gen_ai.request.model", key.model.to_string()));
        }
        attrs.push(KeyValue::new(
            "switchyard.deployment",
            key.deployment.to_string(),
        ));
        attrs.push(KeyValue::new("switchyard.backend", key.backend.to_string()));
        attrs.push(KeyValue::new(
            "switchyard.consumer",
            key.consumer.to_string(),
        ));
        let mut timed = attrs.clone();
        match key.status {
            STREAM_FAILED => timed.push(KeyValue::new("error.type", "stream_error")),
            s if s >= 400 || s == 0 => timed.push(KeyValue::new("error.type", s.to_string())),
            _ => {}
        }
        let typed = |kind: &'static str| {
            let mut a = attrs.clone();
            a.push(KeyValue::new("gen_ai.token.type", kind));
            self.token_usage.bind(&a)
        };
        let who = [
            KeyValue::new("switchyard.consumer", key.consumer.to_string()),
            KeyValue::new("switchyard.deployment", key.deployment.to_string()),
        ];
        let kind = |kind: &'static str| {
            let mut a = who.to_vec();
            a.push(KeyValue::new("kind", kind));
            self.tokens.bind(&a)
        };
        Bound {
            operation: key.operation,
            parts: [key.model, key.deployment, key.consumer, key.backend].map(Box::from),
            status: key.status,
            duration: self.duration.bind(&timed),
            input: typed("input"),
            output: typed("output"),
            tokens: TOKEN_KINDS.map(kind),
            cost: self.cost.bind(&who),
        }
    }

    /// Records one finished request.
    pub fn record(&self, f: &Finished<'_>) {
        let key = Key {
            operation: f.operation.unwrap_or(""),
            model: f.requested.unwrap_or(f.deployment),
            deployment: f.deployment,
            consumer: f.consumer,
            backend: f.backend,
            status: if f.stream_failed {
                STREAM_FAILED
            } else {
                f.status
            },
        };
        let b = self.bound(&key);
        b.duration.record(f.duration.as_secs_f64());
        if let Some(u) = f.usage {
            b.input.record(u.prompt_tokens);
            b.output.record(u.completion_tokens);
            for (c, n) in b.tokens.iter().zip(u.by_kind()) {
                c.add(n);
            }
            if let Some(c) = f.cost {
                b.cost.add(c);
            }
        }
    }

    /// Waits for `shutdown` and for the requests still draining (up to `grace`), then exports
    /// what is left and stops the export thread.
    pub async fn run(
        self: Arc<Self>,
        metrics: Arc<super::Metrics>,
        shutdown: tokio_util::sync::CancellationToken,
        grace: Duration,
    ) {
        shutdown.cancelled().await;
        let until = tokio::time::Instant::now() + grace;
        while metrics.in_flight.get() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(DRAIN_CHECK).await;
        }
        // The provider blocks until the collector answered or the export timed out, and the
        // export itself runs on this runtime: off its workers.
        let done = tokio::task::spawn_blocking(move || self.provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "OTLP metrics: the last export failed");
        }
    }
}
