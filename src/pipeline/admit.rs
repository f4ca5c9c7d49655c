//! The admit phase: a consumer's limits (requests and tokens per minute, token quotas) are
//! checked and the request's estimate reserved; the reservation is settled with the real usage
//! when the answer ends (`finish.rs`), or given back when nothing was served.

use bytes::Bytes;

use crate::auth::inbound::Consumer;
use crate::error::{ErrorKind, GatewayError};
use crate::limits::{Admission, Refusal};
use crate::live::{GatewayState, Snapshot};
use crate::telemetry::ConsumerRejectionLabels;

use super::read::Inbound;

/// A request's hold on its consumer's limits.
pub(super) struct Limit {
    pub(super) admission: Admission,
}

/// Whether `consumer` may use the deployment the request asks for (`consumers[].models`): a
/// 403 `model_not_allowed` otherwise, before anything else is done for it.
pub(super) fn allowed(
    consumer: Option<&Consumer>,
    inbound: &Inbound<'_>,
) -> Result<(), GatewayError> {
    let (Some(c), Some(deployment)) = (consumer, inbound.deployment()) else {
        return Ok(());
    };
    if c.may_use(deployment) {
        return Ok(());
    }
    let models = c.models.as_deref().unwrap_or_default().join(", ");
    Err(GatewayError::new(
        ErrorKind::ModelNotAllowed,
        format!(
            "Consumer '{}' may not use deployment '{deployment}'. It may use: {models}.",
            c.name
        ),
    ))
}

/// Admits the request under `consumer`'s limits; `None` when it has none.
pub(super) async fn admit(
    state: &GatewayState,
    snap: &Snapshot,
    consumer: Option<&Consumer>,
    inbound: &Inbound<'_>,
    body: &Bytes,
) -> Result<Option<Limit>, GatewayError> {
    let Some(c) = consumer else {
        return Ok(None);
    };
    let admitted = snap
        .limiter
        .admit(
            &c.name,
            inbound.deployment(),
            snap.proxy.price(inbound.deployment()),
            body,
            tokio::time::Instant::now(),
            std::time::SystemTime::now(),
        )
        .await
        .map_err(|r| {
            count_refusal(state, &c.name, &r);
            refusal(&c.name, r)
        })?;
    if let Some((left, of)) = admitted.as_ref().and_then(|a| a.remaining.budget) {
        let used = of.saturating_sub(left) as f64 / of.max(1) as f64;
        state
            .metrics
            .budget_used
            .get_or_create(&crate::telemetry::ConsumerLabels {
                consumer: c.name.to_string(),
            })
            .set(used);
    }
    Ok(admitted.map(|admission| Limit { admission }))
}

/// What lets a request go on to a fallback deployment: the caller may use it
/// (`consumers[].models`), and its limits there admit the request, which then count it there.
pub(super) struct FallbackGate<'a> {
    pub(super) state: &'a GatewayState,
    pub(super) snap: &'a Snapshot,
    pub(super) consumer: Option<&'a Consumer>,
    pub(super) body: &'a Bytes,
    pub(super) limit: &'a mut Option<Limit>,
}

impl crate::proxy::Gate for FallbackGate<'_> {
    async fn enter(&mut self, from: &str, to: &str) -> bool {
        let Some(c) = self.consumer else {
            return true;
        };
        if !c.may_use(to) {
            return false;
        }
        let mut admission = self.limit.take().map(|l| l.admission);
        if let Some(a) = admission.as_mut() {
            a.leave(from);
        }
        let entered = self
            .snap
            .limiter
            .enter(
                &mut admission,
                &c.name,
                to,
                self.body,
                tokio::time::Instant::now(),
                std::time::SystemTime::now(),
            )
            .await;
        *self.limit = admission.map(|admission| Limit { admission });
        match entered {
            Ok(()) => true,
            Err(r) => {
                count_refusal(self.state, &c.name, &r);
                tracing::debug!(consumer = %c.name, fallback = to, "the consumer's limits on the fallback refuse the request");
                false
            }
        }
    }
}

fn count_refusal(state: &GatewayState, consumer: &str, r: &Refusal) {
    state
        .metrics
        .consumer_rejections
        .get_or_create(&ConsumerRejectionLabels {
            consumer: consumer.to_string(),
            reason: r.reason(),
        })
        .inc();
}

fn refusal(consumer: &str, r: Refusal) -> GatewayError {
    match r {
        Refusal::Rate { what, retry_after } => GatewayError::new(
            ErrorKind::ConsumerRateLimited,
            format!(
                "Rate limit of consumer '{consumer}' exceeded ({what} per minute). Retry after {} seconds.",
                retry_after.as_millis().div_ceil(1000)
            ),
        )
        .with_retry_after(Some(retry_after)),
        Refusal::Quota { period, resets_in } => GatewayError::new(
            ErrorKind::QuotaExceeded,
            format!(
                "Token quota of consumer '{consumer}' for this {} is spent; it renews in {} seconds.",
                period.as_str(),
                resets_in.as_secs()
            ),
        )
        .with_retry_after(Some(resets_in)),
        Refusal::Budget { period, resets_in } => GatewayError::new(
            ErrorKind::BudgetExceeded,
            format!(
                "The budget of consumer '{consumer}' for this {} is spent; it renews in {} seconds.",
                period.as_str(),
                resets_in.as_secs()
            ),
        )
        .with_retry_after(Some(resets_in)),
        Refusal::StoreUnavailable(e) => GatewayError::new(
            ErrorKind::NoBackendAvailable,
            format!("Limits for consumer '{consumer}' cannot be checked (the limits store is unreachable: {e}), and the gateway is set to refuse then (limits.fail_closed)."),
        )
        .with_retry_after(Some(std::time::Duration::from_secs(1))),
    }
}
