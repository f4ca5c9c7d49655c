//! Entra ID (or any OIDC issuer's) tokens from callers: RS256 signatures checked against the
//! issuer's JWKS, fetched on first use and again when a token names a key not seen yet (keys
//! rotate), at most once per `REFETCH_FLOOR`; then issuer, audience, expiry and not-before.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::config::JwtConfig;
use crate::http_client::HttpsClient;
use crate::sync::{read, write};

/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY: u64 = 60;
/// A token naming an unknown key triggers at most one JWKS fetch this often.
const REFETCH_FLOOR: Duration = Duration::from_secs(2);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

struct Key {
    n: Vec<u8>,
    e: Vec<u8>,
}

pub struct JwtValidator {
    config: JwtConfig,
    client: HttpsClient,
    keys: RwLock<HashMap<String, Key>>,
    /// When keys were last fetched; held while fetching, so fetches are one at a time.
    fetched: tokio::sync::Mutex<Option<Instant>>,
}

/// Whether a bearer value is a JWT rather than a plain key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

impl JwtValidator {
    pub fn new(config: JwtConfig, client: HttpsClient) -> Self {
        Self {
            config,
            client,
            keys: RwLock::new(HashMap::new()),
            fetched: tokio::sync::Mutex::new(None),
        }
    }

    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    pub fn claim_name(&self) -> &str {
        &self.config.claim
    }

    /// The token's claims if its signature, issuer, audience and lifetime check out.
    pub async fn validate(&self, token: &str) -> Result<Map<String, Value>, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let header: Value = decode_json(h).ok_or("the token header is not valid")?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err("only RS256-signed tokens are accepted".into());
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or("the token names no signing key (kid)")?
            .to_string();
        let signature = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| "the token signature is not base64url")?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        if !self.verify(&kid, signed, &signature) {
            if !self.has_key(&kid) {
                self.refresh().await?;
            }
            if !self.has_key(&kid) {
                return Err(format!("the token was signed with an unknown key ({kid})"));
            }
            if !self.verify(&kid, signed, &signature) {
                return Err("the token signature does not verify".into());
            }
        }
        let claims = match decode_json(p) {
            Some(Value::Object(m)) => m,
            _ => return Err("the token payload is not valid".into()),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let num = |k: &str| claims.get(k).and_then(Value::as_u64);
        match num("exp") {
            None => return Err("the token has no expiry".into()),
            Some(exp) if exp + LEEWAY < now => return Err("the token has expired".into()),
            _ => {}
        }
        if num("nbf").is_some_and(|nbf| nbf > now + LEEWAY) {
            return Err("the token is not valid yet".into());
        }
        if claims.get("iss").and_then(Value::as_str) != Some(self.config.issuer.as_str()) {
            return Err("the token is from another issuer".into());
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.config.audiences.iter().any(|x| x == a),
            Some(Value::Array(v)) => v
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.config.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err("the token is for another audience".into());
        }
        Ok(claims)
    }

    fn has_key(&self, kid: &str) -> bool {
        read(&self.keys).contains_key(kid)
    }

    fn verify(&self, kid: &str, message: &[u8], signature: &[u8]) -> bool {
        let keys = read(&self.keys);
        let Some(k) = keys.get(kid) else { return false };
        ring::signature::RsaPublicKeyComponents { n: &k.n, e: &k.e }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                message,
                signature,
            )
            .is_ok()
    }

    /// Fetches the JWKS, unless another fetch just happened (then the caller uses its result).
    async fn refresh(&self) -> Result<(), String> {
        let mut last = self.fetched.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFETCH_FLOOR) {
            return Ok(());
        }
        *last = Some(Instant::now());
        let req = http::Request::get(&self.config.jwks_url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad jwks_url: {e}"))?;
        let resp = tokio::time::timeout(FETCH_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "the JWKS endpoint did not answer in time".to_string())?
            .map_err(|e| format!("cannot fetch the JWKS: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the JWKS endpoint answered {}", resp.status()));
        }
        let body = tokio::time::timeout(FETCH_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| "the JWKS answer stalled".to_string())?
            .map_err(|e| format!("reading the JWKS: {e}"))?
            .to_bytes();
        let jwks: Value =
            serde_json::from_slice(&body).map_err(|_| "the JWKS is not JSON".to_string())?;
        let mut keys = HashMap::new();
        for k in jwks
            .get("keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |name: &str| k.get(name).and_then(Value::as_str);
            if field("kty") != Some("RSA") {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) = (field("kid"), field("n"), field("e")) else {
                continue;
            };
            if let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) {
                keys.insert(kid.to_string(), Key { n, e });
            }
        }
        tracing::info!(keys = keys.len(), "fetched the token signing keys");
        *write(&self.keys) = keys;
        Ok(())
    }
}

pub(crate) fn decode_json(part: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}
