//! Metrics pushed to an OpenTelemetry collector over OTLP/HTTP (JSON encoding), for estates
//! that read OpenTelemetry rather than scrape Prometheus (Azure Container Apps' managed
//! collector, Azure Monitor): the GenAI semantic conventions' client metrics
//! (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`), the cost of the tokens,
//! and the tokens by kind. Built on the OpenTelemetry SDK and its OTLP exporter; the exporter
//! posts through the gateway's own HTTP client (its TLS roots, `server.ca`) on the gateway's
//! runtime.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

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

/// What one finished request is recorded with.
pub struct Finished<'a> {
    pub operation: Option<&'static str>,
    /// The deployment the caller asked for (`gen_ai.request.model`).
    pub requested: Option<&'a str>,
    /// The deployment that served (a fallback's name when one did).
    pub deployment: Option<&'a str>,
    pub consumer: &'a str,
    pub backend: Option<&'a str>,
    pub status: u16,
    pub stream_failed: bool,
    pub duration: Duration,
    pub usage: Option<Usage>,
    pub cost: Option<f64>,
}

/// The instruments, and the provider that exports them.
pub struct OtlpMetrics {
    provider: SdkMeterProvider,
    token_usage: Histogram<u64>,
    duration: Histogram<f64>,
    cost: Counter<f64>,
    tokens: Counter<u64>,
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
        }
    }

    /// Records one finished request.
    pub fn record(&self, f: &Finished<'_>) {
        let mut attrs: Vec<KeyValue> = Vec::with_capacity(8);
        if let Some(op) = f.operation {
            attrs.push(KeyValue::new("gen_ai.operation.name", op));
        }
        attrs.push(KeyValue::new("gen_ai.provider.name", "azure.ai.openai"));
        if let Some(m) = f.requested.or(f.deployment) {
            attrs.push(KeyValue::new("gen_ai.request.model", m.to_string()));
        }
        if let Some(b) = f.backend {
            attrs.push(KeyValue::new("switchyard.backend", b.to_string()));
        }
        attrs.push(KeyValue::new("switchyard.consumer", f.consumer.to_string()));
        let deployment = f.deployment.unwrap_or("-").to_string();
        attrs.push(KeyValue::new("switchyard.deployment", deployment.clone()));
        let error = if f.stream_failed {
            Some("stream_error".to_string())
        } else if f.status >= 400 || f.status == 0 {
            Some(f.status.to_string())
        } else {
            None
        };
        let mut timed = attrs.clone();
        if let Some(e) = error {
            timed.push(KeyValue::new("error.type", e));
        }
        self.duration.record(f.duration.as_secs_f64(), &timed);
        if let Some(u) = f.usage {
            for (kind, n) in [("input", u.prompt_tokens), ("output", u.completion_tokens)] {
                attrs.push(KeyValue::new("gen_ai.token.type", kind));
                self.token_usage.record(n, &attrs);
                attrs.pop();
            }
            let who = [
                KeyValue::new("switchyard.consumer", f.consumer.to_string()),
                KeyValue::new("switchyard.deployment", deployment.clone()),
            ];
            let kinds = [
                ("prompt", u.prompt_tokens),
                ("completion", u.completion_tokens),
                ("cached", u.cached_tokens),
                ("reasoning", u.reasoning_tokens),
                ("audio", u.audio_tokens),
            ];
            for (kind, n) in kinds {
                let mut a = who.to_vec();
                a.push(KeyValue::new("kind", kind));
                self.tokens.add(n, &a);
            }
            if let Some(c) = f.cost {
                self.cost.add(c, &who);
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
