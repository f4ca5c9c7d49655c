//! A cached Entra token per credential, kept fresh in the background.
//!
//! - Refreshed at half its lifetime (which is never later than 5 minutes before expiry for any
//!   token living 10 minutes or more), by one background task per credential.
//! - A failed refresh keeps the current token serving while it is valid, and retries with
//!   backoff (1 s doubling to 60 s).
//! - A request waits on the identity endpoint only when no valid token exists; every request
//!   waiting then shares one fetch. Once a fetch failed, requests fail at once instead of
//!   queueing on a failing endpoint, until the background retries bring a token.

use std::sync::RwLock;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flows::{self, FetchError, Fetched};
use crate::config::EntraCredential;
use crate::http_client::HttpsClient;
use crate::sync::{read, write};

/// A token is used until this close to its expiry (or a quarter of its life, if shorter);
/// closer than that a request fetches anew, so clock skew cannot make a backend see it expired.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What operators see of a credential; never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialState {
    /// No token yet, first fetch in progress or pending.
    Starting,
    /// A valid token; refreshes are working.
    Ready,
    /// A valid token, but the last refresh failed (it keeps serving until it expires).
    Stale,
    /// No valid token; the identity endpoint is failing.
    Failing,
    /// No valid token; the identity platform rejected the request (configuration or role).
    Rejected,
}

impl CredentialState {
    pub fn as_str(&self) -> &'static str {
        match self {
            CredentialState::Starting => "starting",
            CredentialState::Ready => "ready",
            CredentialState::Stale => "stale",
            CredentialState::Failing => "failing",
            CredentialState::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CredentialStatus {
    pub state: CredentialState,
    /// Time left on the current token.
    pub expires_in: Option<Duration>,
    pub last_error: Option<String>,
}

struct Token {
    header: HeaderValue,
    /// When it stops being handed out: its expiry less the margin.
    usable_until: Instant,
    refresh_at: Instant,
}

#[derive(Default)]
struct State {
    token: Option<Token>,
    last_error: Option<FetchError>,
    failed_at: Option<Instant>,
}

pub struct TokenProvider {
    /// The backends it serves: one token per distinct credential and scope, shared. A reload
    /// may change the set while the token lives on.
    backends: RwLock<Vec<String>>,
    credential: EntraCredential,
    client: HttpsClient,
    state: RwLock<State>,
    /// One fetch at a time; waiters re-check the cache once they hold it.
    fetching: tokio::sync::Mutex<()>,
    /// Bumped at every new token: long-lived sign-ins (Redis connections) sign in again.
    renewed: tokio::sync::watch::Sender<u64>,
}

impl TokenProvider {
    pub fn new(backends: Vec<String>, credential: EntraCredential, client: HttpsClient) -> Self {
        Self {
            backends: RwLock::new(backends),
            credential,
            client,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            renewed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever a new token is in hand.
    pub fn renewals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.renewed.subscribe()
    }

    pub fn kind(&self) -> &'static str {
        self.credential.flow.kind()
    }

    /// The backends it serves, for logs and messages.
    pub fn label(&self) -> String {
        read(&self.backends).join(", ")
    }

    pub fn backends(&self) -> Vec<String> {
        read(&self.backends).clone()
    }

    pub fn serves(&self, backend: &str) -> bool {
        read(&self.backends).iter().any(|n| n == backend)
    }

    pub fn set_backends(&self, backends: Vec<String>) {
        *crate::sync::write(&self.backends) = backends;
    }

    pub fn credential(&self) -> &EntraCredential {
        &self.credential
    }

    fn cached(&self, now: Instant) -> Option<HeaderValue> {
        let st = read(&self.state);
        st.token
            .as_ref()
            .filter(|t| t.usable_until > now)
            .map(|t| t.header.clone())
    }

    /// The `Authorization` value for a request: the cached token, or one fetch shared with every
    /// other request that needs it now.
    pub async fn bearer(&self) -> Result<HeaderValue, String> {
        if let Some(h) = self.cached(Instant::now()) {
            return Ok(h);
        }
        // While the identity endpoint is failing, the refresher retries it with backoff;
        // requests do not queue on it, they fail at once (and the attempt moves on).
        if let Some(e) = self.failing() {
            return Err(e);
        }
        let _one = self.fetching.lock().await;
        if let Some(h) = self.cached(Instant::now()) {
            return Ok(h);
        }
        // The fetch this request waited on (the refresher's, or another request's) failed.
        if let Some(e) = self.failing() {
            return Err(e);
        }
        self.fetch_and_store().await.map_err(|e| e.to_string())
    }

    fn failing(&self) -> Option<String> {
        read(&self.state).last_error.as_ref().map(|e| e.to_string())
    }

    async fn fetch_and_store(&self) -> Result<HeaderValue, FetchError> {
        let result =
            flows::fetch(&self.credential.flow, &self.credential.scope, &self.client).await;
        let now = Instant::now();
        let mut st = write(&self.state);
        match result {
            Ok(Fetched { token, expires_in }) => {
                let mut header = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .map_err(|_| {
                        FetchError::Transient("the token is not a valid header value".into())
                    })?;
                header.set_sensitive(true);
                let refresh_in = (expires_in / 2).max(BACKOFF_MIN);
                st.token = Some(Token {
                    header: header.clone(),
                    usable_until: now + expires_in - EXPIRY_MARGIN.min(expires_in / 4),
                    refresh_at: now + refresh_in,
                });
                st.last_error = None;
                st.failed_at = None;
                tracing::info!(backends = %self.label(), credential = self.kind(), expires_in_s = expires_in.as_secs(), "token acquired");
                drop(st);
                self.renewed.send_modify(|n| *n += 1);
                Ok(header)
            }
            Err(e) => {
                tracing::warn!(backends = %self.label(), credential = self.kind(), error = %e, "token request failed");
                st.last_error = Some(e.clone());
                st.failed_at = Some(now);
                Err(e)
            }
        }
    }

    pub fn status(&self) -> CredentialStatus {
        let now = Instant::now();
        let st = read(&self.state);
        let valid = st.token.as_ref().filter(|t| t.usable_until > now);
        let state = match (valid, &st.last_error) {
            (Some(_), None) => CredentialState::Ready,
            (Some(_), Some(_)) => CredentialState::Stale,
            (None, Some(FetchError::Rejected(_))) => CredentialState::Rejected,
            (None, Some(FetchError::Transient(_))) => CredentialState::Failing,
            (None, None) => CredentialState::Starting,
        };
        CredentialStatus {
            state,
            expires_in: valid.map(|t| t.usable_until.saturating_duration_since(now)),
            last_error: st.last_error.as_ref().map(|e| e.to_string()),
        }
    }

    /// Keeps the token fresh until `shutdown`: fetches at once, then at half each token's life;
    /// on failure retries with backoff while the old token (if any) keeps serving.
    pub async fn refresh_loop(&self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let result = {
                let _one = self.fetching.lock().await;
                let due = {
                    let st = read(&self.state);
                    st.token
                        .as_ref()
                        .is_none_or(|t| t.refresh_at <= Instant::now())
                };
                if due {
                    Some(self.fetch_and_store().await)
                } else {
                    None
                }
            };
            wait = match result {
                Some(Err(_)) => {
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
                _ => {
                    backoff = BACKOFF_MIN;
                    let st = read(&self.state);
                    st.token
                        .as_ref()
                        .map(|t| t.refresh_at.saturating_duration_since(Instant::now()))
                        .unwrap_or(BACKOFF_MIN)
                }
            };
        }
    }
}
