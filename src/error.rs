//! The one error type the gateway answers with: status, retryability, metric label and an
//! OpenAI-shaped JSON body (`{"error":{"code","message","type"}}`), the shape every SDK parses.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{BoxBody, full};

/// What went wrong, at the granularity an operator or a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route for the path.
    NotFound,
    /// Request body over `server.max_body_bytes`.
    BodyTooLarge,
    /// The client's request could not be read or is malformed.
    BadRequest,
    /// The request body did not arrive in time (`server.body_read_timeout`, or a gap longer
    /// than `server.header_read_timeout`).
    BodyTimeout,
    /// A method the gateway does not forward.
    MethodNotAllowed,
    /// A state-changing admin request from another site's page.
    CrossOrigin,
    /// A request whose `Host` names another server than the admin listener.
    MisdirectedRequest,
    /// The backend could not be reached (refused, DNS, TLS).
    UpstreamConnect,
    /// The backend did not answer in time.
    UpstreamTimeout,
    /// The backend broke the exchange (reset, bad HTTP).
    UpstreamProtocol,
    /// The gateway is stopping and takes no new work.
    ShuttingDown,
    /// No backend serves the deployment asked for.
    UnknownDeployment,
    /// Every backend that could serve the request is throttled (`Retry-After` says until when).
    AllThrottled,
    /// Every backend that could serve the request is down (circuits open).
    NoBackendAvailable,
    /// The request's own deadline (`routing.request_timeout`) ran out.
    DeadlineExceeded,
    /// No token could be had for the backend's Entra credential.
    CredentialUnavailable,
    /// The backends refused the gateway's credential (401, 403): a config problem.
    BackendAuthFailed,
    /// The caller's key is missing or not valid.
    Unauthorized,
    /// The caller's key was valid until its `expires`.
    KeyExpired,
    /// The caller may not use the deployment it asked for (`consumers[].models`).
    ModelNotAllowed,
    /// The model list has no such entry (or the caller may not use it).
    ModelNotFound,
    /// The caller is over its requests or tokens per minute.
    ConsumerRateLimited,
    /// The caller's token quota for the period is spent.
    QuotaExceeded,
    /// The caller's budget in money for the period is spent.
    BudgetExceeded,
    /// No backend holds the stored object the request names (or it is another consumer's).
    ObjectNotFound,
    /// The request names stored objects held by different backends.
    ObjectsSplit,
    /// The backend holding the object the request names is cooling down after a 429.
    OwnerThrottled,
    /// The backend holding the object the request names is down or drained.
    OwnerUnavailable,
    /// The backend holding the object the request names is no longer configured.
    OwnerGone,
}

impl ErrorKind {
    /// HTTP status the client receives.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NotFound
            | ErrorKind::UnknownDeployment
            | ErrorKind::ObjectNotFound
            | ErrorKind::OwnerGone
            | ErrorKind::ModelNotFound => StatusCode::NOT_FOUND,
            ErrorKind::ObjectsSplit => StatusCode::BAD_REQUEST,
            ErrorKind::OwnerThrottled => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::OwnerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::AllThrottled => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unauthorized | ErrorKind::KeyExpired => StatusCode::UNAUTHORIZED,
            ErrorKind::ConsumerRateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::QuotaExceeded | ErrorKind::BudgetExceeded => StatusCode::FORBIDDEN,
            ErrorKind::NoBackendAvailable | ErrorKind::CredentialUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::CrossOrigin | ErrorKind::ModelNotAllowed => StatusCode::FORBIDDEN,
            ErrorKind::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::UpstreamConnect
            | ErrorKind::UpstreamProtocol
            | ErrorKind::BackendAuthFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether another backend may succeed where this attempt failed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::UpstreamConnect
                | ErrorKind::UpstreamTimeout
                | ErrorKind::UpstreamProtocol
                | ErrorKind::CredentialUnavailable
        )
    }

    /// Low-cardinality label for metrics and the `code` field of the body.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::BodyTimeout => "request_body_timeout",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::CrossOrigin => "cross_origin_request",
            ErrorKind::MisdirectedRequest => "misdirected_request",
            ErrorKind::UpstreamConnect => "backend_connect_error",
            ErrorKind::UpstreamTimeout => "backend_timeout",
            ErrorKind::UpstreamProtocol => "backend_protocol_error",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::UnknownDeployment => "DeploymentNotFound",
            ErrorKind::AllThrottled => "rate_limit_exceeded",
            ErrorKind::NoBackendAvailable => "no_backend_available",
            ErrorKind::DeadlineExceeded => "request_timeout",
            ErrorKind::CredentialUnavailable => "backend_credential_unavailable",
            ErrorKind::BackendAuthFailed => "backend_auth_failed",
            ErrorKind::Unauthorized => "invalid_api_key",
            ErrorKind::KeyExpired => "expired_api_key",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::ConsumerRateLimited => "consumer_rate_limit_exceeded",
            ErrorKind::QuotaExceeded => "consumer_quota_exceeded",
            ErrorKind::BudgetExceeded => "consumer_budget_exceeded",
            ErrorKind::ObjectNotFound => "not_found",
            ErrorKind::ObjectsSplit => "objects_on_different_backends",
            ErrorKind::OwnerThrottled => "owner_rate_limited",
            ErrorKind::OwnerUnavailable => "owner_unavailable",
            ErrorKind::OwnerGone => "owner_not_configured",
        }
    }

    fn error_type(self) -> &'static str {
        match self {
            ErrorKind::NotFound
            | ErrorKind::BodyTooLarge
            | ErrorKind::BadRequest
            | ErrorKind::BodyTimeout
            | ErrorKind::MethodNotAllowed
            | ErrorKind::CrossOrigin
            | ErrorKind::MisdirectedRequest
            | ErrorKind::UnknownDeployment
            | ErrorKind::Unauthorized
            | ErrorKind::KeyExpired
            | ErrorKind::ModelNotAllowed
            | ErrorKind::ModelNotFound
            | ErrorKind::ObjectNotFound
            | ErrorKind::ObjectsSplit
            | ErrorKind::OwnerGone => "invalid_request_error",
            ErrorKind::AllThrottled
            | ErrorKind::ConsumerRateLimited
            | ErrorKind::QuotaExceeded
            | ErrorKind::BudgetExceeded
            | ErrorKind::OwnerThrottled => "rate_limit_error",
            _ => "gateway_error",
        }
    }
}

/// An error the gateway itself answers with. The message must never carry a secret.
#[derive(Debug, Clone)]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub message: String,
    /// Sent as `retry-after` (whole seconds, rounded up) and `retry-after-ms`.
    pub retry_after: Option<Duration>,
    /// The request reached the backend whole before the attempt failed: the backend may have
    /// acted on it, so it is never sent there again, nor anywhere if it creates an object.
    pub delivered: bool,
}

impl GatewayError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
            delivered: false,
        }
    }

    pub fn delivered(mut self, delivered: bool) -> Self {
        self.delivered = delivered;
        self
    }

    pub fn with_retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }

    /// The JSON body, `{"error":{"code":..,"message":..,"type":..}}`.
    pub fn body(&self) -> Bytes {
        openai_error_body(self.kind.label(), &self.message, self.kind.error_type())
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let mut resp = Response::new(full(self.body()));
        *resp.status_mut() = self.kind.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(wait) = self.retry_after {
            let ms = wait.as_millis().max(1);
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(ms.div_ceil(1000) as u64),
            );
            h.insert("retry-after-ms", HeaderValue::from(ms as u64));
        }
        if self.kind == ErrorKind::MethodNotAllowed {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
            );
        }
        if matches!(self.kind, ErrorKind::BodyTooLarge | ErrorKind::BodyTimeout) {
            // The rest of the body is not wanted (or not coming): closing beats reading it
            // only to drop it, and frees the connection's slot at once.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.message)
    }
}

impl std::error::Error for GatewayError {}

/// Builds an OpenAI-shaped error body; used by the gateway and the simulator.
pub fn openai_error_body(code: &str, message: &str, error_type: &str) -> Bytes {
    let v = serde_json::json!({
        "error": { "code": code, "message": message, "type": error_type }
    });
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = GatewayError::new(ErrorKind::NotFound, "no route for /x");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no route for /x");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(e.into_response().status(), StatusCode::NOT_FOUND);
        assert!(ErrorKind::UpstreamTimeout.retryable());
        let r = GatewayError::new(ErrorKind::AllThrottled, "busy")
            .with_retry_after(Some(Duration::from_millis(2300)))
            .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["retry-after-ms"], "2300");
        assert!(!ErrorKind::BadRequest.retryable());
    }
}
