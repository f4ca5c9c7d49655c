//! Who is calling: a consumer, known by its key. Keys are accepted where unchanged SDKs send
//! them (`api-key` for Azure SDKs, `Authorization: Bearer` for OpenAI SDKs,
//! `Ocp-Apim-Subscription-Key` for clients written against APIM), and only their SHA-256 is
//! kept. Identifies; does not limit.

use std::sync::Arc;

use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::ConsumerConfig;
use crate::error::{ErrorKind, GatewayError};

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: Arc<str>,
}

pub struct Authenticator {
    consumers: Vec<(Arc<str>, [u8; 32])>,
}

impl Authenticator {
    pub fn new(consumers: &[ConsumerConfig]) -> Self {
        Self {
            consumers: consumers
                .iter()
                .map(|c| (Arc::from(c.name.as_str()), c.key_sha256))
                .collect(),
        }
    }

    /// Whether keys are required at all (some consumer is configured).
    pub fn enabled(&self) -> bool {
        !self.consumers.is_empty()
    }

    /// The consumer whose key the request carries. `Ok(None)` when no consumers are
    /// configured (the gateway is open); a 401 when they are and the key is missing or wrong.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Consumer>, GatewayError> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(key) = presented_key(headers) else {
            return Err(unauthorized(
                "No key. Send your Switchyard key in the api-key header (Azure SDKs), Authorization: Bearer (OpenAI SDKs) or Ocp-Apim-Subscription-Key.",
            ));
        };
        let digest = sha256(key.as_bytes());
        // Compare against every consumer, in constant time, so timing says nothing of which
        // key came close.
        let mut found: Option<&Arc<str>> = None;
        for (name, expected) in &self.consumers {
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

    fn auth() -> Authenticator {
        Authenticator::new(&[
            ConsumerConfig {
                name: "team-a".into(),
                key_sha256: sha256(b"key-of-team-a-123456"),
                limits: Default::default(),
                deployment_limits: Vec::new(),
            },
            ConsumerConfig {
                name: "team-b".into(),
                key_sha256: sha256(b"key-of-team-b-123456"),
                limits: Default::default(),
                deployment_limits: Vec::new(),
            },
        ])
    }

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[test]
    fn every_sdk_header_works() {
        let a = auth();
        for (h, v) in [
            ("api-key", "key-of-team-a-123456"),
            ("authorization", "Bearer key-of-team-a-123456"),
            ("ocp-apim-subscription-key", "key-of-team-a-123456"),
        ] {
            let c = a.authenticate(&headers(h, v)).unwrap().unwrap();
            assert_eq!(&*c.name, "team-a", "{h}");
        }
        let c = a
            .authenticate(&headers("api-key", "key-of-team-b-123456"))
            .unwrap()
            .unwrap();
        assert_eq!(&*c.name, "team-b");
    }

    #[test]
    fn missing_or_wrong_keys_are_401() {
        let a = auth();
        for h in [
            HeaderMap::new(),
            headers("api-key", "nope"),
            headers("authorization", "Basic a2V5"),
            headers("api-key", ""),
        ] {
            let e = a.authenticate(&h).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Unauthorized);
        }
        assert_eq!(
            Authenticator::new(&[])
                .authenticate(&HeaderMap::new())
                .unwrap(),
            None
        );
    }
}
