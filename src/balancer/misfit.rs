//! A backend that cannot serve a deployment at all, as its own answer says.

use std::time::Duration;

/// Why a backend cannot serve a deployment, from its own answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    pub reason: MisfitReason,
    /// The backend's own words, shortened.
    pub message: String,
}

/// Why a backend cannot serve a deployment at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MisfitReason {
    /// It refused the gateway's credential.
    AuthRejected,
    /// It has no such deployment.
    NotDeployed,
}

impl MisfitReason {
    /// As metrics, logs and the admin API name it.
    pub fn label(self) -> &'static str {
        match self {
            MisfitReason::AuthRejected => "auth_rejected",
            MisfitReason::NotDeployed => "not_deployed",
        }
    }
}

/// How long a misfit backend is passed over before it is asked again: a role assignment that
/// propagates, a deployment that gets created, a key that is fixed, are picked up by then.
pub const MISFIT_TTL: Duration = Duration::from_secs(60);
