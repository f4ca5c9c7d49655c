//! Outbound credentials: what each backend is sent to prove the gateway may call it. Only this
//! module and `upstream` ever hold the values; everything else sees kinds and states.

mod flows;
mod store;
mod token;

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

pub use flows::FetchError;
pub use store::RedisCredentials;
pub use token::{CredentialState, CredentialStatus, TokenProvider};

use crate::config::{BackendAuth, BackendConfig, EntraCredential};
use crate::error::{ErrorKind, GatewayError};
use crate::http_client::HttpsClient;

/// A backend's credential, ready to produce its header.
pub enum Credential {
    None,
    /// A fixed header (`api-key`).
    Static(HeaderName, HeaderValue),
    /// An Entra token, as `Authorization: Bearer`.
    Token(Arc<TokenProvider>),
}

/// One token provider per distinct Entra credential (flow, identity and scope) among the
/// backends: backends that share an identity share its token and its refreshes. A provider in
/// `reuse` (the running ones, on a reload) is kept for its credential, token and all.
pub fn providers(
    backends: &[BackendConfig],
    client: &HttpsClient,
    reuse: &[Arc<TokenProvider>],
) -> Vec<Arc<TokenProvider>> {
    let mut groups: Vec<(EntraCredential, Vec<String>)> = Vec::new();
    for b in backends {
        if let BackendAuth::Entra(c) = &b.auth {
            match groups.iter_mut().find(|(g, _)| g == c) {
                Some((_, names)) => names.push(b.name.clone()),
                None => groups.push((c.clone(), vec![b.name.clone()])),
            }
        }
    }
    groups
        .into_iter()
        .map(
            |(c, names)| match reuse.iter().find(|p| *p.credential() == c) {
                Some(p) => p.clone(),
                None => Arc::new(TokenProvider::new(names, c, client.clone())),
            },
        )
        .collect()
}

/// Which backends each provider serves under `backends` (after a reload, the set may differ).
pub fn assign(providers: &[Arc<TokenProvider>], backends: &[BackendConfig]) {
    for p in providers {
        let names = backends
            .iter()
            .filter(|b| matches!(&b.auth, BackendAuth::Entra(c) if c == p.credential()))
            .map(|b| b.name.clone())
            .collect();
        p.set_backends(names);
    }
}

impl Credential {
    /// `providers`: from [`providers`], for backends with an Entra credential.
    pub fn new(
        backend: &str,
        auth: &BackendAuth,
        providers: &[Arc<TokenProvider>],
    ) -> Result<Self, String> {
        Ok(match auth {
            BackendAuth::None => Credential::None,
            BackendAuth::ApiKey(key) => {
                let mut v = HeaderValue::from_str(key.expose()).map_err(|_| {
                    format!("backend {backend}: the key is not a valid header value")
                })?;
                v.set_sensitive(true);
                Credential::Static(HeaderName::from_static("api-key"), v)
            }
            BackendAuth::Entra(c) => Credential::Token(
                providers
                    .iter()
                    .find(|p| p.credential() == c)
                    .cloned()
                    .ok_or_else(|| format!("backend {backend}: no token provider was set up"))?,
            ),
        })
    }

    /// The header to send, fetching a token if none is valid.
    pub async fn header(
        &self,
        backend: &str,
    ) -> Result<Option<(HeaderName, HeaderValue)>, GatewayError> {
        match self {
            Credential::None => Ok(None),
            Credential::Static(n, v) => Ok(Some((n.clone(), v.clone()))),
            Credential::Token(p) => match p.bearer().await {
                Ok(v) => Ok(Some((http::header::AUTHORIZATION, v))),
                Err(e) => Err(GatewayError::new(
                    ErrorKind::CredentialUnavailable,
                    format!(
                        "backend {backend}: no token from its {} credential: {e}",
                        p.kind()
                    ),
                )),
            },
        }
    }
}
