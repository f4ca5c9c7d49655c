//! The running configuration as the admin API shows it, every secret left out.

use super::*;

impl Config {
    /// The running configuration as JSON for `GET /admin/config`: every secret left out.
    pub fn redacted_json(&self) -> serde_json::Value {
        use serde_json::json;
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| {
                let auth = match &b.auth {
                    BackendAuth::Entra(e) => json!({"type": b.auth.kind(), "detail": e.describe()}),
                    other => json!({"type": other.kind()}),
                };
                json!({"name": b.name, "url": b.url.to_string(), "auth": auth, "priority": b.priority, "weight": b.weight})
            })
            .collect();
        let deployments: Vec<_> = self
            .deployments
            .iter()
            .map(|d| {
                let map: serde_json::Map<String, serde_json::Value> = d
                    .backends
                    .iter()
                    .map(|(i, n)| (self.backends[*i].name.clone(), json!(n)))
                    .collect();
                let ranks: Vec<_> = d
                    .ranks
                    .iter()
                    .map(|(i, p, w)| json!({"backend": self.backends[*i].name, "priority": p, "weight": w}))
                    .collect();
                let mut v = json!({"name": d.name, "backends": map, "ranks": ranks});
                if !d.fallbacks.is_empty() {
                    v["fallbacks"] = json!(d.fallbacks);
                    v["fallback_on"] = json!(d.fallback_on.names());
                }
                if let Some(p) = d.price {
                    v["price"] = json!({"input": p.input, "cached_input": p.cached_input, "output": p.output});
                }
                v
            })
            .collect();
        let limits = |l: &ConsumerLimits| {
            json!({
                "requests_per_minute": l.requests_per_minute,
                "tokens_per_minute": l.tokens_per_minute,
                "token_quota": l.token_quota.map(|q| json!({"period": q.period.as_str(), "tokens": q.tokens})),
                "budget": l.budget.map(|b| json!({"period": b.period.as_str(), "amount": b.micros as f64 / 1e6})),
            })
        };
        let consumers: Vec<_> = self
            .consumers
            .iter()
            .map(|c| {
                let per: serde_json::Map<String, serde_json::Value> =
                    c.deployment_limits.iter().map(|(d, l)| (d.clone(), limits(l))).collect();
                json!({"name": c.name, "key": !c.keys.is_empty(), "keys": c.keys.len(), "models": c.models, "fallbacks": c.fallbacks, "jwt": c.jwt, "limits": limits(&c.limits), "deployments": per})
            })
            .collect();
        let store = match &self.limits.store {
            LimitStore::Memory => json!({"store": "memory"}),
            LimitStore::Redis(r) => {
                json!({"store": "redis", "fail_closed": r.fail_closed, "redis_timeout_ms": r.timeout.as_millis() as u64,
                       "cluster": r.cluster, "auth": r.auth.as_ref().map(|a| a.describe()), "user": r.user})
            }
        };
        let r = &self.routing;
        json!({
            "server": {
                "listen": self.server.listen.to_string(),
                "admin_listen": self.server.admin_listen.map(|a| a.to_string()),
                "max_body_bytes": self.server.max_body_bytes,
                "shutdown_grace_ms": self.server.shutdown_grace.as_millis() as u64,
            },
            "routing": {
                "strategy": r.strategy.as_str(),
                "max_attempts": r.max_attempts,
                "retry_on_status": r.retry_on_status.iter().map(|s| s.as_u16()).collect::<Vec<_>>(),
                "connect_timeout_ms": r.connect_timeout.as_millis() as u64,
                "first_byte_timeout_ms": r.first_byte_timeout.as_millis() as u64,
                "idle_timeout_ms": r.idle_timeout.as_millis() as u64,
                "request_timeout_ms": r.request_timeout.as_millis() as u64,
                "default_cooldown_ms": r.default_cooldown.as_millis() as u64,
                "max_cooldown_ms": r.max_cooldown.as_millis() as u64,
            },
            "backends": backends,
            "deployments": deployments,
            "consumers": consumers,
            "usage": {"currency": self.usage.currency, "retention_s": self.usage.retention.as_secs()},
            "limits": store,
            "jwt": self.jwt.as_ref().map(|j| json!({"issuer": j.issuer, "audience": j.audiences, "jwks_url": j.jwks_url, "claim": j.claim})),
            // Header values are secrets: only their names are shown.
            "tracing": self.tracing.as_ref().map(|t| json!({
                "otlp_endpoint": t.endpoint.to_string(),
                "service_name": t.service_name,
                "sample_ratio": t.sample_ratio,
                "export_interval_ms": t.export_interval.as_millis() as u64,
                "headers": t.headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            })),
            "metrics": self.metrics.as_ref().map(|m| json!({
                "otlp_endpoint": m.endpoint.to_string(),
                "service_name": m.service_name,
                "export_interval_ms": m.export_interval.as_millis() as u64,
                "headers": m.headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            })),
        })
    }
}
