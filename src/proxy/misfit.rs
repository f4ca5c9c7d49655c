//! Misfits: answers saying a backend cannot serve a deployment at all (its credential refused,
//! the deployment missing there), which move the request on and are remembered.

use super::*;

impl Proxy {
    /// Counts and logs a backend found unable to serve a deployment: the attempt in metrics, the
    /// backend's last error, and a WARN once a minute per backend (a misconfigured backend is
    /// passed over, so it must not go unnoticed).
    pub(super) fn misfit_seen(&self, idx: usize, deployment: &str, m: &Misfit, retried: bool) {
        let backend = &self.backends[idx];
        self.note(
            backend,
            deployment,
            AttemptOutcome::Misfit(m.reason),
            Verdict::Healthy,
            retried,
        );
        *crate::sync::lock(&self.last_error[idx]) = Some((
            format!("{} on {deployment}: {}", m.reason.label(), m.message),
            std::time::SystemTime::now(),
        ));
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = backend.stats.misfit_warned.load(Relaxed);
        if now >= last + 60
            && backend
                .stats
                .misfit_warned
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                backend = %backend.name,
                deployment,
                reason = m.reason.label(),
                answer = %m.message,
                "a backend cannot serve a deployment; passed over for it (check backends[{idx}])"
            );
        }
    }
}

/// Statuses that may say the backend cannot serve the deployment (the body says which).
pub(super) fn may_be_misfit(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 404)
}

/// What an answer says about the backend, from its status and body: a refused credential (401;
/// a 403 not about content or policy), or a deployment it does not have (a 404 with Azure's
/// `DeploymentNotFound`).
pub(super) fn misfit(status: http::StatusCode, body: &[u8]) -> Option<Misfit> {
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    let reason = match status.as_u16() {
        401 => MisfitReason::AuthRejected,
        403 if !(lower.contains("content") || lower.contains("policy")) => {
            MisfitReason::AuthRejected
        }
        404 if lower.contains("deploymentnotfound") => MisfitReason::NotDeployed,
        _ => return None,
    };
    // The backend's own message when it gave one in the OpenAI shape, else its first words.
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    let mut message: String = message.chars().take(300).collect();
    if message.is_empty() {
        message = format!("answered {status}");
    }
    Some(Misfit { reason, message })
}

/// The client's answer when the backends refused the gateway's credential: the gateway's
/// fault to fix, never the client's key (`backends[i].auth` says where).
pub(super) fn auth_failed(backend: &Backend, idx: usize, m: &Misfit) -> GatewayError {
    GatewayError::new(
        ErrorKind::BackendAuthFailed,
        format!(
            "backend {} refused the gateway's credential ({}); check backends[{idx}].auth",
            backend.name, m.message
        ),
    )
}
