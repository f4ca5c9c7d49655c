//! The token flows, spoken directly over HTTP (or through the Azure CLI): managed identity on
//! App Service / Container Apps and through IMDS, workload identity and client secret against
//! the Entra token endpoint. Direct, because every endpoint must be pointable at a test server
//! and the refresh policy on top (see `token.rs`) is ours.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};

use crate::config::{EntraFlow, ManagedIdentityId, MiSource, Secret};
use crate::http_client::HttpsClient;

/// Longest a token request may take before it counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// A token and how long it lives from now.
#[derive(Debug)]
pub struct Fetched {
    pub token: Secret,
    pub expires_in: Duration,
}

/// Why a token could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Worth retrying: the endpoint is down, slow, busy (5xx, 404/410 while IMDS starts, 429).
    Transient(String),
    /// The identity platform said no (wrong client id, no such identity, bad secret): retrying
    /// will not help until the configuration or role assignment changes.
    Rejected(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Transient(m) => write!(f, "{m}"),
            FetchError::Rejected(m) => write!(f, "rejected: {m}"),
        }
    }
}

pub async fn fetch(
    flow: &EntraFlow,
    scope: &str,
    client: &HttpsClient,
) -> Result<Fetched, FetchError> {
    let request = match flow {
        EntraFlow::ManagedIdentity { id, source } => managed_identity(id.as_ref(), source, scope)?,
        EntraFlow::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
            authority_host,
        } => {
            // Re-read each time: the kubelet rotates the projected service account token.
            let assertion = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                FetchError::Transient(format!(
                    "cannot read the federated token file {}: {e}",
                    token_file.display()
                ))
            })?;
            entra(
                authority_host,
                tenant_id,
                &[
                    ("client_id", client_id),
                    ("scope", scope),
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.trim()),
                ],
            )?
        }
        EntraFlow::ClientSecret {
            tenant_id,
            client_id,
            secret,
            authority_host,
        } => entra(
            authority_host,
            tenant_id,
            &[
                ("client_id", client_id),
                ("scope", scope),
                ("grant_type", "client_credentials"),
                ("client_secret", secret.expose()),
            ],
        )?,
        EntraFlow::AzureCli { command } => return azure_cli(command, scope).await,
    };
    let response = tokio::time::timeout(FETCH_TIMEOUT, client.request(request))
        .await
        .map_err(|_| FetchError::Transient(format!("no answer within {FETCH_TIMEOUT:?}")))?
        .map_err(|e| FetchError::Transient(format!("cannot reach the identity endpoint: {e}")))?;
    let status = response.status();
    let body = tokio::time::timeout(FETCH_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| FetchError::Transient("the identity endpoint's answer stalled".into()))?
        .map_err(|e| FetchError::Transient(format!("reading the identity endpoint's answer: {e}")))?
        .to_bytes();
    if !status.is_success() {
        let text = error_text(&body);
        let msg = format!("identity endpoint answered {status}: {text}");
        // IMDS answers 404/410 while it starts up and 429 when busy; all worth a retry.
        return Err(
            if status.is_client_error() && !matches!(status.as_u16(), 404 | 408 | 410 | 429) {
                FetchError::Rejected(msg)
            } else {
                FetchError::Transient(msg)
            },
        );
    }
    parse_token(&body)
}

fn managed_identity(
    id: Option<&ManagedIdentityId>,
    source: &MiSource,
    scope: &str,
) -> Result<Request<Full<Bytes>>, FetchError> {
    // Managed identity endpoints take a resource, not a scope.
    let resource = scope.strip_suffix("/.default").unwrap_or(scope);
    let (endpoint, version, id_param, header) = match source {
        MiSource::AppService { endpoint, header } => (
            endpoint.as_str(),
            "2019-08-01",
            id.map(|i| match i {
                ManagedIdentityId::ClientId(v) => ("client_id", v),
                ManagedIdentityId::ObjectId(v) => ("principal_id", v),
                ManagedIdentityId::ResourceId(v) => ("mi_res_id", v),
            }),
            ("x-identity-header", header.expose()),
        ),
        MiSource::Imds { endpoint } => (
            endpoint.as_str(),
            "2018-02-01",
            id.map(|i| match i {
                ManagedIdentityId::ClientId(v) => ("client_id", v),
                ManagedIdentityId::ObjectId(v) => ("object_id", v),
                ManagedIdentityId::ResourceId(v) => ("msi_res_id", v),
            }),
            ("metadata", "true"),
        ),
    };
    let mut query = vec![("api-version", version), ("resource", resource)];
    if let Some((k, v)) = id_param {
        query.push((k, v.as_str()));
    }
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    let url = format!("{endpoint}{sep}{}", form(&query));
    let mut value = http::HeaderValue::from_str(header.1)
        .map_err(|_| FetchError::Rejected("IDENTITY_HEADER is not a valid header value".into()))?;
    value.set_sensitive(true);
    Request::builder()
        .method(Method::GET)
        .uri(url)
        .header(header.0, value)
        .body(Full::new(Bytes::new()))
        .map_err(|e| FetchError::Rejected(format!("bad identity endpoint URL: {e}")))
}

fn entra(
    authority: &str,
    tenant: &str,
    fields: &[(&str, &str)],
) -> Result<Request<Full<Bytes>>, FetchError> {
    let url = format!("{authority}{}/oauth2/v2.0/token", urlencode(tenant));
    Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form(fields))))
        .map_err(|e| FetchError::Rejected(format!("bad token endpoint URL: {e}")))
}

async fn azure_cli(command: &str, scope: &str) -> Result<Fetched, FetchError> {
    let run = tokio::process::Command::new(command)
        .args([
            "account",
            "get-access-token",
            "--scope",
            scope,
            "--output",
            "json",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(FETCH_TIMEOUT, run)
        .await
        .map_err(|_| {
            FetchError::Transient(format!(
                "`{command}` did not answer within {FETCH_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| FetchError::Rejected(format!("cannot run `{command}`: {e}")))?;
    if !out.status.success() {
        let err: String = String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(300)
            .collect();
        return Err(FetchError::Rejected(format!(
            "`{command} account get-access-token` failed ({}): {}",
            out.status,
            err.trim()
        )));
    }
    parse_token(&out.stdout)
}

/// Reads `access_token` (or the CLI's `accessToken`) and its lifetime from any of the shapes
/// the flows answer with: `expires_in` (seconds, number or string) or `expires_on` (Unix time).
fn parse_token(body: &[u8]) -> Result<Fetched, FetchError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| FetchError::Transient("the identity endpoint's answer is not JSON".into()))?;
    let token = v
        .get("access_token")
        .or_else(|| v.get("accessToken"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| FetchError::Transient("the answer has no access_token".into()))?;
    let num = |key: &str| -> Option<u64> {
        let f = v.get(key)?;
        f.as_u64().or_else(|| f.as_str()?.trim().parse().ok())
    };
    let expires_in = if let Some(secs) = num("expires_in") {
        Duration::from_secs(secs)
    } else if let Some(at) = num("expires_on") {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(at).saturating_sub(now)
    } else {
        return Err(FetchError::Transient(
            "the answer says nothing of the token's expiry".into(),
        ));
    };
    Ok(Fetched {
        token: Secret::new(token),
        expires_in,
    })
}

/// `error: error_description` from an OAuth error answer (never a token), capped.
fn error_text(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            let (e, d) = (field("error"), field("error_description"));
            match (e.is_empty(), d.is_empty()) {
                (false, false) => format!("{e}: {d}"),
                (false, true) => e,
                (true, false) => d,
                (true, true) => v.to_string(),
            }
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.chars().take(400).collect()
}

fn form(fields: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push('&');
        }
        s.push_str(&urlencode(k));
        s.push('=');
        s.push_str(&urlencode(v));
    }
    s
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_token_shape() {
        let t = parse_token(br#"{"access_token":"abc","expires_in":"3599","token_type":"Bearer"}"#)
            .unwrap();
        assert_eq!(t.token.expose(), "abc");
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        let t = parse_token(br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"x"}"#).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let t = parse_token(format!(r#"{{"access_token":"y","expires_on":"{at}"}}"#).as_bytes())
            .unwrap();
        assert!(
            t.expires_in > Duration::from_secs(590) && t.expires_in <= Duration::from_secs(600)
        );
        let t =
            parse_token(format!(r#"{{"accessToken":"z","expires_on":{at}}}"#).as_bytes()).unwrap();
        assert_eq!(t.token.expose(), "z");
        assert!(parse_token(br#"{"expires_in":1}"#).is_err());
        assert!(parse_token(br#"{"access_token":"a"}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn oauth_errors_are_summarised() {
        assert_eq!(
            error_text(br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret.","error_codes":[7000215]}"#),
            "invalid_client: AADSTS7000215: Invalid client secret."
        );
        assert_eq!(error_text(b"plain"), "plain");
    }

    #[test]
    fn forms_are_encoded() {
        assert_eq!(
            form(&[("scope", "https://x/.default"), ("a b", "c&d")]),
            "scope=https%3A%2F%2Fx%2F.default&a%20b=c%26d"
        );
    }
}
