//! How one attempt against a backend ended, as metrics, logs and spans name it.

/// How one attempt against a backend ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The backend answered with this status.
    Answered(http::StatusCode),
    /// No answer to pass on: the gateway's error (a connect error, a timeout ...).
    Failed(crate::error::ErrorKind),
    /// An answer saying the backend cannot serve the deployment at all.
    Misfit(crate::balancer::MisfitReason),
}

impl AttemptOutcome {
    /// As the metrics' `outcome` label, the access log's `tried` and spans name it: the status
    /// code, or the error's or the misfit's label.
    pub fn label(&self) -> &str {
        match self {
            AttemptOutcome::Answered(s) => s.as_str(),
            AttemptOutcome::Failed(kind) => kind.label(),
            AttemptOutcome::Misfit(reason) => reason.label(),
        }
    }

    /// Whether the backend failed at it: a 5xx, or no answer at all.
    pub fn failed(&self) -> bool {
        match self {
            AttemptOutcome::Answered(s) => s.is_server_error(),
            AttemptOutcome::Failed(_) | AttemptOutcome::Misfit(_) => true,
        }
    }
}
