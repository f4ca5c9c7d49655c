//! The client-facing routes: which paths are forwarded and how their path is rewritten.
//! Thin by design; the request handling lives in `server::gateway`.

use std::borrow::Cow;

use crate::error::{ErrorKind, GatewayError};

/// A request the gateway will forward.
#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    /// Path and query the backend receives.
    pub path_and_query: Cow<'a, str>,
    /// Whether a WebSocket upgrade may be tunnelled on this path (the Realtime API).
    pub upgrade_allowed: bool,
    /// The deployment named in the path.
    pub deployment: Option<&'a str>,
    /// Where that name sits in `path_and_query`, so it can be swapped per backend.
    pub deployment_span: Option<std::ops::Range<usize>>,
    /// The v1 API names the deployment in the JSON body's `model` instead.
    pub model_in_body: bool,
}

const DEPLOYMENTS_PREFIX: &str = "/openai/deployments/";

/// Classifies a request path:
/// - `/openai/deployments/{deployment}/{operation...}`: Azure's classic surface, verbatim;
/// - `/openai/realtime` (and `/openai/v1/realtime`): the Realtime API, WebSocket allowed;
/// - any other `/openai/...` (v1 API, files, batches, ...): verbatim;
/// - `/v1/...` (OpenAI style): sent to the backend as `/openai/v1/...`.
pub fn route<'a>(path: &'a str, path_and_query: &'a str) -> Result<Route<'a>, GatewayError> {
    if path.split('/').any(|seg| {
        [".", "..", "%2e", "%2e%2e", ".%2e", "%2e."]
            .iter()
            .any(|dots| seg.eq_ignore_ascii_case(dots))
    }) {
        return Err(GatewayError::new(
            ErrorKind::NotFound,
            "path segments '.' and '..' are not allowed",
        ));
    }
    if let Some(rest) = path.strip_prefix(DEPLOYMENTS_PREFIX) {
        let (deployment, operation) = rest.split_once('/').unwrap_or((rest, ""));
        if deployment.is_empty() || operation.is_empty() {
            return Err(not_found(
                path,
                "expected /openai/deployments/{deployment}/{operation}",
            ));
        }
        let start = DEPLOYMENTS_PREFIX.len();
        return Ok(Route {
            path_and_query: Cow::Borrowed(path_and_query),
            upgrade_allowed: false,
            deployment: Some(deployment),
            deployment_span: Some(start..start + deployment.len()),
            model_in_body: false,
        });
    }
    if path == "/openai" || path.starts_with("/openai/") {
        let upgrade_allowed = matches!(path, "/openai/realtime" | "/openai/v1/realtime");
        return Ok(Route {
            path_and_query: Cow::Borrowed(path_and_query),
            upgrade_allowed,
            deployment: None,
            deployment_span: None,
            model_in_body: path.starts_with("/openai/v1/"),
        });
    }
    if path == "/v1" || path.starts_with("/v1/") {
        return Ok(Route {
            path_and_query: Cow::Owned(format!("/openai{path_and_query}")),
            upgrade_allowed: path == "/v1/realtime",
            deployment: None,
            deployment_span: None,
            model_in_body: true,
        });
    }
    Err(not_found(
        path,
        "Switchyard serves the Azure OpenAI API under /openai/... and the OpenAI API under /v1/...",
    ))
}

fn not_found(path: &str, hint: &str) -> GatewayError {
    // The path is the client's own input; cap it so an error body stays small.
    let shown: String = path.chars().take(200).collect();
    GatewayError::new(ErrorKind::NotFound, format!("no route for {shown}: {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> Route<'_> {
        let path = p.split('?').next().unwrap();
        route(path, p).unwrap()
    }

    #[test]
    fn classic_paths_forward_verbatim() {
        let r = ok("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
        assert_eq!(
            r.path_and_query,
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(r.deployment, Some("gpt-4o"));
        assert_eq!(
            &r.path_and_query[r.deployment_span.clone().unwrap()],
            "gpt-4o"
        );
        assert!(!r.upgrade_allowed);
        assert_eq!(
            ok("/openai/deployments/w/audio/transcriptions").deployment,
            Some("w")
        );
    }

    #[test]
    fn v1_and_other_openai_paths() {
        assert_eq!(
            ok("/v1/chat/completions").path_and_query,
            "/openai/v1/chat/completions"
        );
        assert_eq!(
            ok("/openai/v1/embeddings").path_and_query,
            "/openai/v1/embeddings"
        );
        assert_eq!(
            ok("/openai/files?api-version=x").path_and_query,
            "/openai/files?api-version=x"
        );
        assert!(
            ok("/openai/realtime?api-version=2024-10-01-preview&deployment=rt").upgrade_allowed
        );
    }

    #[test]
    fn everything_else_is_404() {
        for p in [
            "/",
            "/admin",
            "/openai/deployments/",
            "/openai/deployments/x",
            "/openai/deployments//chat",
            "/openai/deployments/../x/y",
            "/openai/%2e%2e/admin",
            "/v2/chat",
        ] {
            let e = route(p, p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotFound, "{p}");
        }
    }
}
