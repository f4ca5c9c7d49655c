//! Who is calling: a consumer, known by its key. Keys are accepted where unchanged SDKs send
//! them (`api-key` for Azure SDKs, `Authorization: Bearer` for OpenAI SDKs,
//! `Ocp-Apim-Subscription-Key` for clients written against APIM), and only their SHA-256 is
//! kept. Identifies; does not limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderMap;
use subtle::ConstantTimeEq;

use super::jwt::{JwtValidator, looks_like_jwt};
use crate::config::sha256;
use crate::config::{ConsumerConfig, ConsumerKey, JwtConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::http_client::HttpsClient;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: Arc<str>,
    /// The deployments it may use (`consumers[].models`); `None`: every one.
    pub models: Option<Arc<[String]>>,
    /// Whether a fallback deployment may serve it (`consumers[].fallbacks`).
    pub fallbacks: bool,
}

impl Consumer {
    fn of(c: &ConsumerConfig) -> Consumer {
        Consumer {
            name: Arc::from(c.name.as_str()),
            models: c.models.as_deref().map(Arc::from),
            fallbacks: c.fallbacks,
        }
    }

    /// Whether it may use `deployment`.
    pub fn may_use(&self, deployment: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|d| d == deployment))
    }
}

pub struct Authenticator {
    /// Every consumer's keys: the consumer, the key's hash and when it expires.
    keys: Vec<(Consumer, ConsumerKey)>,
    /// Consumers known by a claim of their token: claim value -> consumer.
    by_claim: HashMap<String, Consumer>,
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
                .flat_map(|c| {
                    let consumer = Consumer::of(c);
                    c.keys.iter().map(move |k| (consumer.clone(), k.clone()))
                })
                .collect(),
            by_claim: consumers
                .iter()
                .filter_map(|c| c.jwt.clone().map(|v| (v, Consumer::of(c))))
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
                Some(consumer) => Ok(Some(consumer.clone())),
                None => Err(unauthorized(&format!(
                    "Access denied: the token is valid but its {} claim names no consumer of this gateway.",
                    jwt.claim_name()
                ))),
            };
        }
        let digest = sha256(key.as_bytes());
        // Compare against every consumer, in constant time, so timing says nothing of which
        // key came close.
        let mut found: Option<&(Consumer, ConsumerKey)> = None;
        for entry in &self.keys {
            if bool::from(entry.1.sha256.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        match found {
            Some((_, key)) if key.expires.is_some_and(|t| SystemTime::now() >= t) => {
                let when = key.expires.map(humantime::format_rfc3339_seconds);
                Err(GatewayError::new(
                    ErrorKind::KeyExpired,
                    format!(
                        "Access denied: this key expired at {}. Use the key that replaced it.",
                        when.map(|t| t.to_string()).unwrap_or_default()
                    ),
                ))
            }
            Some((consumer, _)) => Ok(Some(consumer.clone())),
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
            keys: vec![ConsumerKey {
                sha256: sha256(key),
                expires: None,
            }],
            jwt: None,
            models: None,
            fallbacks: true,
            limits: Default::default(),
            deployment_limits: Vec::new(),
        }
    }

    /// A key past its `expires` is refused as expired, saying when; the consumer's other key
    /// goes on working.
    #[tokio::test]
    async fn an_expired_key_is_refused_saying_so() {
        let mut c = consumer("team-a", b"key-of-team-a-new-123");
        c.keys.push(ConsumerKey {
            sha256: sha256(b"key-of-team-a-old-123"),
            expires: Some(humantime::parse_rfc3339("2020-01-31T00:00:00Z").unwrap()),
        });
        c.keys.push(ConsumerKey {
            sha256: sha256(b"key-of-team-a-next-12"),
            expires: Some(SystemTime::now() + std::time::Duration::from_secs(3600)),
        });
        let auth = Authenticator::new(&[c], None, &client(), None);
        let with = |key: &str| {
            let mut h = HeaderMap::new();
            h.insert("api-key", key.parse().unwrap());
            h
        };
        let e = auth
            .authenticate(&with("key-of-team-a-old-123"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::KeyExpired);
        assert_eq!(e.kind.status(), http::StatusCode::UNAUTHORIZED);
        assert!(
            e.message.contains("expired at 2020-01-31T00:00:00Z"),
            "{}",
            e.message
        );
        for key in ["key-of-team-a-new-123", "key-of-team-a-next-12"] {
            let who = auth.authenticate(&with(key)).await.unwrap().unwrap();
            assert_eq!(&*who.name, "team-a");
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
