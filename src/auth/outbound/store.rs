//! Entra ID sign-in to Redis (Azure Managed Redis, Azure Cache for Redis): the token is the
//! password and the identity's object id the user. Each connection signs in with the token in
//! hand and again with every renewed one, so none is cut off when a token expires.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use redis::auth::{BasicAuth, StreamingCredentialsProvider};
use redis::{ErrorKind, RedisError, RedisResult};

use super::TokenProvider;

#[derive(Clone)]
pub struct RedisCredentials {
    provider: Arc<TokenProvider>,
    /// `limits.redis_user`; else the token's `oid` claim.
    user: Option<String>,
}

impl RedisCredentials {
    pub fn new(provider: Arc<TokenProvider>, user: Option<String>) -> Self {
        Self { provider, user }
    }

    pub fn provider(&self) -> &Arc<TokenProvider> {
        &self.provider
    }

    async fn current(&self) -> RedisResult<BasicAuth> {
        let refused = |why: String| {
            RedisError::from((
                ErrorKind::AuthenticationFailed,
                "no Entra ID sign-in for Redis",
                why,
            ))
        };
        let header = self.provider.bearer().await.map_err(|e| {
            refused(format!(
                "no token from its {} credential: {e}",
                self.provider.kind()
            ))
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| refused("the token is not text".into()))?;
        let user = match &self.user {
            Some(u) => u.clone(),
            None => oid_claim(token).ok_or_else(|| {
                refused(
                    "the token carries no oid claim: set limits.redis_user to the identity's object id"
                        .into(),
                )
            })?,
        };
        Ok(BasicAuth::new(user, token.to_string()))
    }
}

/// The object id a token was issued to.
fn oid_claim(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let claims = crate::auth::jwt::decode_json(payload)?;
    claims["oid"].as_str().map(str::to_string)
}

impl StreamingCredentialsProvider for RedisCredentials {
    /// The credentials in hand at once, then again after every renewal of the token.
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let renewals = self.provider.renewals();
        Box::pin(futures_util::stream::unfold(
            (self.clone(), renewals, true),
            |(me, mut renewals, first)| async move {
                if !first && renewals.changed().await.is_err() {
                    return None;
                }
                renewals.borrow_and_update();
                let item = me.current().await;
                Some((item, (me, renewals, false)))
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn the_user_is_the_tokens_object_id() {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256"}"#),
            enc(
                r#"{"oid":"7c1c2a4e-0000-4000-8000-000000000001","aud":"https://redis.azure.com"}"#
            )
        );
        assert_eq!(
            oid_claim(&token).as_deref(),
            Some("7c1c2a4e-0000-4000-8000-000000000001")
        );
        assert_eq!(oid_claim("opaque-token"), None);
        assert_eq!(oid_claim(&format!("{}.{}.s", enc("{}"), enc("{}"))), None);
    }
}
