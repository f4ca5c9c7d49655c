//! Who is calling: a consumer, known by its key. Keys are accepted where unchanged SDKs send
//! them (`api-key` for Azure SDKs, `Authorization: Bearer` for OpenAI SDKs,
//! `Ocp-Apim-Subscription-Key` for clients written against APIM), and only their SHA-256 is
//! kept. Identifies; does not limit.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use subtle::ConstantTimeEq;

use super::jwt::{JwtValidator, looks_like_jwt};
use crate::config::sha256;
use crate::config::{ConsumerConfig, JwtConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::http_client::HttpsClient;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: Arc<str>,
}

pub struct Authenticator {
    keys: Vec<(Arc<str>, [u8; 32])>,
    /// Consumers known by a claim of their token: claim value -> name.
    by_claim: HashMap<String, Arc<str>>,
    /// Shared with the next config's authenticator when `[jwt]` is unchanged, so a reload
    /// keeps the signing keys it fetched.
    jwt: Option<Arc<JwtValidator>>,
    enabled: bool,
}

impl Authenticator {
    /// `client` fetches the token signing keys, when `[jwt]` is configured. `previous`: the
    /// authenticator this one replaces on a reload.
    pub fn new(
        consumers: &[ConsumerConfig],
        jwt: Option<&JwtConfig>,
        client: &HttpsClient,
        previous: Option<&Authenticator>,
    ) -> Self {
        let kept = previous
            .and_then(|p| p.jwt.as_ref())
            .filter(|v| Some(v.config()) == jwt)
            .cloned();
        Self {
            keys: consumers
                .iter()
                .filter_map(|c| c.key_sha256.map(|k| (Arc::from(c.name.as_str()), k)))
                .collect(),
            by_claim: consumers
                .iter()
                .filter_map(|c| c.jwt.clone().map(|v| (v, Arc::from(c.name.as_str()))))
                .collect(),
            jwt: kept
                .or_else(|| jwt.map(|j| Arc::new(JwtValidator::new(j.clone(), client.clone())))),
            enabled: !consumers.is_empty(),
        }
    }

    /// Whether callers must identify themselves (some consumer is configured).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The consumer the request's key or token names. `Ok(None)` when no consumers are
    /// configured (the gateway is open); a 401 when they are and nothing valid was presented.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Consumer>, GatewayError> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(key) = presented_key(headers) else {
            return Err(unauthorized(
                "No key. Send your Switchyard key in the api-key header (Azure SDKs), Authorization: Bearer (OpenAI SDKs) or Ocp-Apim-Subscription-Key.",
            ));
        };
        if let Some(jwt) = &self.jwt
            && looks_like_jwt(key)
        {
            let claims = jwt
                .validate(key)
                .await
                .map_err(|e| unauthorized(&format!("Access denied: {e}.")))?;
            let value = claims
                .get(jwt.claim_name())
                .and_then(|v| v.as_str())
                .unwrap_or("");
            return match self.by_claim.get(value) {
                Some(name) => Ok(Some(Consumer { name: name.clone() })),
                None => Err(unauthorized(&format!(
                    "Access denied: the token is valid but its {} claim names no consumer of this gateway.",
                    jwt.claim_name()
                ))),
            };
        }
        let digest = sha256(key.as_bytes());
        // Compare against every consumer, in constant time, so timing says nothing of which
        // key came close.
        let mut found: Option<&Arc<str>> = None;
        for (name, expected) in &self.keys {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(name);
            }
        }
        match found {
            Some(name) => Ok(Some(Consumer { name: name.clone() })),
            None => Err(unauthorized(
                "Access denied: the key is not valid for this gateway.",
            )),
        }
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    get("api-key")
        .or_else(|| {
            get("authorization").and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .map(str::trim)
            })
        })
        .or_else(|| get("ocp-apim-subscription-key"))
        .filter(|k| !k.is_empty())
}

fn unauthorized(message: &str) -> GatewayError {
    GatewayError::new(ErrorKind::Unauthorized, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> HttpsClient {
        crate::http_client::system_client(std::time::Duration::from_secs(1), false).unwrap()
    }

    fn consumer(name: &str, key: &[u8]) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            key_sha256: Some(sha256(key)),
            jwt: None,
            limits: Default::default(),
            deployment_limits: Vec::new(),
        }
    }

    fn auth() -> Authenticator {
        let consumers = [
            consumer("team-a", b"key-of-team-a-123456"),
            consumer("team-b", b"key-of-team-b-123456"),
        ];
        Authenticator::new(&consumers, None, &client(), None)
    }

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn every_sdk_header_works() {
        let a = auth();
        for (h, v) in [
            ("api-key", "key-of-team-a-123456"),
            ("authorization", "Bearer key-of-team-a-123456"),
            ("ocp-apim-subscription-key", "key-of-team-a-123456"),
        ] {
            let c = a.authenticate(&headers(h, v)).await.unwrap().unwrap();
            assert_eq!(&*c.name, "team-a", "{h}");
        }
        let b = headers("api-key", "key-of-team-b-123456");
        let c = a.authenticate(&b).await.unwrap().unwrap();
        assert_eq!(&*c.name, "team-b");
    }

    #[tokio::test]
    async fn missing_or_wrong_keys_are_401() {
        let a = auth();
        for h in [
            HeaderMap::new(),
            headers("api-key", "nope"),
            headers("authorization", "Basic a2V5"),
            headers("api-key", ""),
        ] {
            let e = a.authenticate(&h).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Unauthorized);
        }
        let open = Authenticator::new(&[], None, &client(), None);
        assert_eq!(open.authenticate(&HeaderMap::new()).await.unwrap(), None);
    }
}
