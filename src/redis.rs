//! The connection to the Redis that replicas share, on the maintained `redis` crate: one
//! multiplexed connection to a single node (or one per node of a Redis Cluster) that reconnects
//! by itself; TLS against the system's roots plus `server.ca_file`, never unverified; ACL users
//! and database numbers from the URL; Entra ID tokens that renew on live connections. Every call
//! is bounded by `limits.redis_timeout`, so the request path never waits longer on Redis.

use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, ScriptInvocation,
    TlsCertificates, Value,
};
use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::auth::outbound::RedisCredentials;
use crate::config::{ExtraCa, RedisTarget};
use crate::sync::lock;

/// A connection attempt (TCP, TLS, sign-in) may take this long; it runs beside requests, which
/// wait on it no longer than the store's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that has not answered for this long (or the store's timeout, if longer) is
/// replaced.
const MIN_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Calls queued on one connection before callers wait for room.
const PIPELINE_BUFFER: usize = 1024;
/// Connections refused at sign-in are rebuilt at most this often.
const REBUILD_EVERY: Duration = Duration::from_secs(1);

/// How to reach the store.
pub struct Options<'a> {
    pub cluster: bool,
    /// The longest wait on any one call.
    pub timeout: Duration,
    /// Trusted beside the system's roots for `rediss://`.
    pub ca: &'a ExtraCa,
    /// Entra ID sign-in, instead of a password.
    pub credentials: Option<RedisCredentials>,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Builds connections; kept to build anew when Redis refuses the sign-in.
enum Factory {
    Single(Client, ConnectionManagerConfig),
    /// The client, and how long a node may take to answer.
    Cluster(::redis::cluster::ClusterClient, Duration),
}

impl Factory {
    fn connect(&self) -> Result<Conn, RedisError> {
        Ok(match self {
            Factory::Single(c, manager) => {
                Conn::Single(c.get_connection_manager_lazy(manager.clone())?)
            }
            Factory::Cluster(c, response_timeout) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(*response_timeout);
                Conn::Cluster(c.get_pending_async_connection_with_config(config))
            }
        })
    }
}

pub struct Redis {
    conn: ArcSwap<Conn>,
    factory: Factory,
    rebuilt: Mutex<Option<Instant>>,
    timeout: Duration,
    addr: String,
}

impl Redis {
    /// Ready to use at once: connections are made on first use and in the background, so a
    /// Redis that is down at start-up delays nothing. Needs a Tokio runtime.
    pub fn open(url: &str, opts: Options<'_>) -> Result<Redis, String> {
        let target = RedisTarget::parse(url, opts.cluster)?;
        let certs = if target.tls {
            Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(roots_pem(opts.ca)?),
            })
        } else {
            None
        };
        let response_timeout = opts.timeout.max(MIN_RESPONSE_TIMEOUT);
        let fail = |e: RedisError| format!("Redis at {}: {e}", target.addr);
        let factory = if opts.cluster {
            let mut b = ClusterClientBuilder::new(vec![target.info().clone()])
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(response_timeout)
                .retries(1);
            if let Some(c) = certs {
                b = b.certs(c);
            }
            if let Some(c) = opts.credentials.clone() {
                b = b.set_credentials_provider(c);
            }
            Factory::Cluster(b.build().map_err(fail)?, response_timeout)
        } else {
            let client = match certs {
                Some(c) => Client::build_with_tls(target.info().clone(), c),
                None => Client::open(target.info().clone()),
            }
            .map_err(fail)?;
            let mut manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(response_timeout))
                // One attempt per reconnection: commands meanwhile fail at once (and are
                // served open or refused as configured) rather than queue behind a backoff.
                .set_number_of_retries(0)
                // Every request in flight may have a call queued on the one connection; the
                // crate's default (50) would make the 51st wait for room.
                .set_pipeline_buffer_size(PIPELINE_BUFFER);
            if let Some(c) = opts.credentials {
                manager = manager.set_credentials_provider(c);
            }
            Factory::Single(client, manager)
        };
        let conn = factory.connect().map_err(fail)?;
        Ok(Redis {
            conn: ArcSwap::from_pointee(conn),
            factory,
            rebuilt: Mutex::new(None),
            timeout: opts.timeout,
            addr: target.addr,
        })
    }

    /// Runs one command, bounded by the store's timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, String> {
        let mut conn = Conn::clone(&self.conn.load());
        self.bounded(self.timeout, cmd.query_async(&mut conn)).await
    }

    /// Runs a script (by SHA, loading it when Redis does not know it), bounded by the store's
    /// timeout. In a cluster it goes to the node of its first key.
    pub async fn script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let mut conn = Conn::clone(&self.conn.load());
        self.bounded(self.timeout, invocation.invoke_async(&mut conn))
            .await
    }

    /// A `PING` that may wait for a whole connection attempt: started at once so the first
    /// requests find the connection made.
    pub async fn warm_up(&self) -> Result<(), String> {
        let mut conn = Conn::clone(&self.conn.load());
        self.bounded(
            CONNECT_TIMEOUT + self.timeout,
            ::redis::cmd("PING").query_async::<()>(&mut conn),
        )
        .await
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.rebuild_if_refused(&e);
                Err(format!("Redis at {}: {e}", self.addr))
            }
            Err(_) => Err(format!(
                "no answer from Redis at {} within {limit:?}",
                self.addr
            )),
        }
    }

    /// A connection whose sign-in was refused (a rotated password, a token Redis did not yet
    /// know) is not retried by the crate, only lost connections are: build a new one.
    fn rebuild_if_refused(&self, e: &RedisError) {
        let refused = matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::Client | ErrorKind::InvalidClientConfig
        ) || e.code().is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS");
        if !refused {
            return;
        }
        let now = Instant::now();
        {
            let mut last = lock(&self.rebuilt);
            if last.is_some_and(|t| now.duration_since(t) < REBUILD_EVERY) {
                return;
            }
            *last = Some(now);
        }
        match self.factory.connect() {
            Ok(c) => self.conn.store(std::sync::Arc::new(c)),
            Err(e) => tracing::warn!(error = %e, "cannot build a new Redis connection"),
        }
    }
}

/// The system's root certificates and `ca`'s, as one PEM bundle (what the crate takes). A
/// system certificate rustls cannot use is left out rather than failing the whole store.
fn roots_pem(ca: &ExtraCa) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let system = rustls_native_certs::load_native_certs().certs;
    let mut check = rustls::RootCertStore::empty();
    let mut pem = String::new();
    for der in system.iter().chain(ca.certs.iter()) {
        if check.add(der.clone()).is_err() {
            continue;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    if pem.is_empty() {
        return Err(
            "no root CA certificates for rediss://: the system has none and server.ca_file is not set"
                .into(),
        );
    }
    Ok(pem.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roots_bundle_holds_the_extra_ca() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let extra = ExtraCa {
            path: None,
            certs: vec![ca.der().clone()],
        };
        let pem = String::from_utf8(roots_pem(&extra).unwrap()).unwrap();
        assert!(pem.contains(&ca.pem().lines().nth(1).unwrap().to_string()));
    }
}
