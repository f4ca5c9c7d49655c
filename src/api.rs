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
    // Most paths hold neither a dot nor a percent sign: one scan clears them of both checks.
    if memchr::memchr2(b'.', b'%', path.as_bytes()).is_some() {
        check_segments(path)?;
    }
    if let Some(rest) = path.strip_prefix(DEPLOYMENTS_PREFIX) {
        let (deployment, operation) = match memchr::memchr(b'/', rest.as_bytes()) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if deployment.is_empty() || operation.is_empty() {
            return Err(not_found(
                path,
                "expected /openai/deployments/{deployment}/{operation}",
            ));
        }
        if !valid_deployment(deployment) {
            return Err(GatewayError::new(
                ErrorKind::BadRequest,
                "invalid deployment name: use 1 to 64 letters, digits, '-', '_' or '.'",
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
        let (deployment, deployment_span) = if upgrade_allowed {
            realtime_deployment(path_and_query)?
        } else {
            (None, None)
        };
        return Ok(Route {
            path_and_query: Cow::Borrowed(path_and_query),
            upgrade_allowed,
            deployment,
            deployment_span,
            model_in_body: path.starts_with("/openai/v1/") && !upgrade_allowed,
        });
    }
    if path == "/v1" || path.starts_with("/v1/") {
        let upgrade_allowed = path == "/v1/realtime";
        let (deployment, deployment_span) = if upgrade_allowed {
            realtime_deployment(path_and_query)?
        } else {
            (None, None)
        };
        // The span moves with the `/openai` put in front.
        let deployment_span = deployment_span.map(|r| r.start + 7..r.end + 7);
        return Ok(Route {
            path_and_query: Cow::Owned(format!("/openai{path_and_query}")),
            upgrade_allowed,
            deployment,
            deployment_span,
            model_in_body: !upgrade_allowed,
        });
    }
    Err(not_found(
        path,
        "Switchyard serves the Azure OpenAI API under /openai/... and the OpenAI API under /v1/...",
    ))
}

/// The Realtime API names its deployment in the query (`deployment=` on Azure's preview path,
/// `model=` on the v1 path): routed through `[[deployments]]` like any other, and renamed per
/// backend in place.
type Named<'a> = (Option<&'a str>, Option<std::ops::Range<usize>>);

fn realtime_deployment(path_and_query: &str) -> Result<Named<'_>, GatewayError> {
    let Some(q) = path_and_query.find('?') else {
        return Ok((None, None));
    };
    let mut at = q + 1;
    let mut found = None;
    for pair in path_and_query[q + 1..].split('&') {
        if let Some(value) = pair
            .strip_prefix("deployment=")
            .or_else(|| pair.strip_prefix("model="))
        {
            let start = at + (pair.len() - value.len());
            // `deployment` wins over `model` when both are there.
            if found.is_none() || pair.starts_with("deployment=") {
                found = Some((value, start..start + value.len()));
            }
        }
        at += pair.len() + 1;
    }
    match found {
        Some((name, _)) if !valid_deployment(name) => Err(GatewayError::new(
            ErrorKind::BadRequest,
            "invalid deployment name: use 1 to 64 letters, digits, '-', '_' or '.'",
        )),
        Some((name, span)) => Ok((Some(name), Some(span))),
        None => Ok((None, None)),
    }
}

/// Dot segments and encoded separators: refused before routing.
fn check_segments(path: &str) -> Result<(), GatewayError> {
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
    if let Some(bad) = encoded_separator(path) {
        return Err(GatewayError::new(
            ErrorKind::BadRequest,
            format!(
                "the path may not contain {bad}: encoded separators and control characters are refused"
            ),
        ));
    }
    Ok(())
}

/// Azure's own rule for deployment names, so a name that could not exist on any backend (or
/// that would mean something else once decoded there) never leaves the gateway.
fn valid_deployment(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A percent-encoded `/`, `\` or control character: a backend, or a proxy in front of it,
/// that decodes the path would see other segments (or a cut line) than the gateway routed on.
fn encoded_separator(path: &str) -> Option<&str> {
    let b = path.as_bytes();
    (0..b.len().saturating_sub(2)).find_map(|i| {
        if b[i] != b'%' {
            return None;
        }
        let v = (hex(b[i + 1])? << 4) | hex(b[i + 2])?;
        (v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f).then(|| &path[i..i + 3])
    })
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
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
    fn realtime_names_its_deployment_in_the_query() {
        let r = ok("/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-rt");
        assert_eq!(r.deployment, Some("gpt-rt"));
        assert_eq!(
            &r.path_and_query[r.deployment_span.clone().unwrap()],
            "gpt-rt"
        );
        assert!(!r.model_in_body);
        let r = ok("/v1/realtime?model=gpt-rt");
        assert_eq!(r.path_and_query, "/openai/v1/realtime?model=gpt-rt");
        assert_eq!(
            &r.path_and_query[r.deployment_span.clone().unwrap()],
            "gpt-rt"
        );
        assert_eq!(ok("/openai/realtime?api-version=x").deployment, None);
        let bad = "/openai/realtime?deployment=a;b";
        assert_eq!(
            route("/openai/realtime", bad).unwrap_err().kind,
            ErrorKind::BadRequest
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

    #[test]
    fn encoded_separators_and_odd_deployment_names_are_400() {
        for p in [
            "/openai/deployments/a%2Fb/chat/completions",
            "/openai/deployments/a%2fb/chat/completions",
            "/openai/files/x%5C..%5Cadmin",
            "/openai/deployments/x%0d%0aHost:%20evil/chat/completions",
            "/v1/chat%00/completions",
            "/openai/deployments/gpt%204o/chat/completions",
            "/openai/deployments/gpt-4o;rm/chat/completions",
            "/openai/deployments/\u{e9}t\u{e9}/chat/completions",
        ] {
            let e = route(p, p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{p}");
        }
        let long = format!("/openai/deployments/{}/chat/completions", "a".repeat(65));
        assert_eq!(route(&long, &long).unwrap_err().kind, ErrorKind::BadRequest);
        let longest = format!("/openai/deployments/{}/chat/completions", "a".repeat(64));
        assert!(route(&longest, &longest).is_ok());
        // Other encodings pass through untouched, as do names Azure allows.
        assert!(route("/openai/files/a%20b", "/openai/files/a%20b").is_ok());
        assert_eq!(
            ok("/openai/deployments/My_gpt-4.1/embeddings").deployment,
            Some("My_gpt-4.1")
        );
        // A trailing lone percent sign is not an encoding.
        assert!(route("/openai/files/a%2", "/openai/files/a%2").is_ok());
    }
}
