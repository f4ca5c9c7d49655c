//! Outbound credentials: what each backend is sent to prove the gateway may call it. Only this
//! module and `upstream` ever hold the values; everything else sees kinds and states.

mod flows;
mod token;

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

pub use flows::FetchError;
pub use token::{CredentialState, CredentialStatus, TokenProvider};

use crate::config::BackendAuth;
use crate::error::{ErrorKind, GatewayError};
use crate::upstream::HttpsClient;

/// A backend's credential, ready to produce its header.
pub enum Credential {
    None,
    /// A fixed header (`api-key`).
    Static(HeaderName, HeaderValue),
    /// An Entra token, as `Authorization: Bearer`.
    Token(Arc<TokenProvider>),
}

impl Credential {
    pub fn new(backend: &str, auth: &BackendAuth, client: &HttpsClient) -> Result<Self, String> {
        Ok(match auth {
            BackendAuth::None => Credential::None,
            BackendAuth::ApiKey(key) => {
                let mut v = HeaderValue::from_str(key.expose()).map_err(|_| {
                    format!("backend {backend}: the key is not a valid header value")
                })?;
                v.set_sensitive(true);
                Credential::Static(HeaderName::from_static("api-key"), v)
            }
            BackendAuth::Entra(c) => Credential::Token(Arc::new(TokenProvider::new(
                backend,
                c.clone(),
                client.clone(),
            ))),
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

    pub fn provider(&self) -> Option<&Arc<TokenProvider>> {
        match self {
            Credential::Token(p) => Some(p),
            _ => None,
        }
    }
}
