//! `limits.redis_url`: what a `redis://` or `rediss://` URL names, read with the `redis` crate's
//! own parser so the store connects to exactly what was checked.

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

/// Where a `redis://` or `rediss://` URL points, checked before anything connects. Messages
/// name the host and port, never the URL (it may hold a password).
pub struct RedisTarget {
    info: ConnectionInfo,
    pub tls: bool,
    pub has_user: bool,
    pub has_password: bool,
    /// `host:port`, for messages.
    pub addr: String,
}

impl RedisTarget {
    pub fn parse(url: &str, cluster: bool) -> Result<RedisTarget, String> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("not a redis:// or rediss:// URL".into());
        }
        if url.contains('#') {
            // The crate reads `#insecure` as "skip certificate checks".
            return Err(
                "a fragment (such as #insecure) is not accepted: certificates are always verified"
                    .into(),
            );
        }
        let info = url
            .into_connection_info()
            .map_err(|e| format!("not a Redis URL: {e}"))?;
        let (addr, tls) = match info.addr() {
            ConnectionAddr::Tcp(h, p) => (format!("{h}:{p}"), false),
            ConnectionAddr::TcpTls { host, port, .. } => (format!("{host}:{port}"), true),
            _ => return Err("not a redis:// or rediss:// URL".into()),
        };
        let r = info.redis_settings();
        if cluster && r.db() != 0 {
            return Err(format!(
                "names database {}: a Redis Cluster has only database 0",
                r.db()
            ));
        }
        Ok(RedisTarget {
            tls,
            has_user: r.username().is_some_and(|u| !u.is_empty()),
            has_password: r.password().is_some_and(|p| !p.is_empty()),
            addr,
            info,
        })
    }

    /// What the `redis` crate connects with.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = RedisTarget::parse("redis://127.0.0.1:6380/2", false).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.tls, t.has_user, t.has_password),
            ("127.0.0.1:6380", false, false, false)
        );
        assert_eq!(t.info.redis_settings().db(), 2);
        let t = RedisTarget::parse("rediss://gw:s3cret@cache.internal:10000", false).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.tls, t.has_user, t.has_password),
            ("cache.internal:10000", true, true, true)
        );
        let t = RedisTarget::parse("redis://:s3cret@cache.internal", false).unwrap();
        assert_eq!(t.addr, "cache.internal:6379");
        assert!((t.has_password, t.has_user) == (true, false));
    }

    #[test]
    fn refused_urls_never_echo_the_password() {
        for (url, cluster, says) in [
            ("http://x:pw@h", false, "not a redis://"),
            ("rediss://u:pw@h:6380/#insecure", false, "always verified"),
            ("redis://u:pw@h:6379/3", true, "only database 0"),
            ("redis+unix:///tmp/r.sock", false, "not a redis://"),
        ] {
            let e = RedisTarget::parse(url, cluster).err().unwrap();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("pw"), "{url}: {e}");
        }
    }
}
