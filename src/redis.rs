//! A small Redis client: a few connections, RESP2, every command under a short timeout, scripts
//! by SHA with a fallback to sending the script. Small on purpose: the gateway needs a handful of
//! commands, and a bounded wait on every one of them (the request path never blocks on a slow
//! Redis for longer than `timeout`).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

/// A Lua script, sent by SHA once Redis knows it.
pub struct Script {
    pub source: &'static str,
    pub sha: String,
}

impl Script {
    pub fn new(source: &'static str) -> Self {
        let digest =
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, source.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { source, sha }
    }
}

pub struct Redis {
    addr: String,
    password: Option<String>,
    db: u32,
    timeout: Duration,
    /// A command holds one connection for its round trip; several let requests overlap.
    conns: Vec<tokio::sync::Mutex<Option<BufStream<TcpStream>>>>,
    next: std::sync::atomic::AtomicUsize,
}

/// Connections per client.
const POOL: usize = 8;

impl Redis {
    /// From `redis://[:password@]host:port[/db]`.
    pub fn from_url(url: &str, timeout: Duration) -> Result<Self, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{url:?} is not a redis:// URL"))?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((h, d)) if !d.is_empty() => (
                h,
                d.parse()
                    .map_err(|_| format!("{d:?} is not a database number"))?,
            ),
            Some((h, _)) => (h, 0),
            None => (hostpart, 0),
        };
        if hostport.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        let addr = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        };
        let password = auth
            .map(|a| a.trim_start_matches(':').to_string())
            .filter(|p| !p.is_empty());
        Ok(Self {
            addr,
            password,
            db,
            timeout,
            conns: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Runs one command; on any failure the connection is dropped and the next call reconnects.
    pub async fn cmd(&self, args: &[&[u8]]) -> Result<Reply, String> {
        // A free connection if there is one, else the next in turn.
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = (0..POOL)
            .map(|k| &self.conns[(start + k) % POOL])
            .find(|c| c.try_lock().is_ok())
            .unwrap_or(&self.conns[start % POOL]);
        match tokio::time::timeout(self.timeout, self.cmd_on(slot, args)).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be mid-reply: it cannot be reused.
                if let Ok(mut c) = slot.try_lock() {
                    *c = None;
                }
                Err(format!(
                    "no answer from Redis at {} within {:?}",
                    self.addr, self.timeout
                ))
            }
        }
    }

    async fn cmd_on(
        &self,
        slot: &tokio::sync::Mutex<Option<BufStream<TcpStream>>>,
        args: &[&[u8]],
    ) -> Result<Reply, String> {
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let Some(conn) = guard.as_mut() else {
            return Err("no connection".into());
        };
        let result = exchange(conn, args).await;
        if result.is_err() {
            *guard = None;
        }
        result
    }

    async fn connect(&self) -> Result<BufStream<TcpStream>, String> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot connect to Redis at {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let mut conn = BufStream::new(stream);
        if let Some(p) = &self.password {
            expect_ok(exchange(&mut conn, &[b"AUTH", p.as_bytes()]).await?)?;
        }
        if self.db != 0 {
            let db = self.db.to_string();
            expect_ok(exchange(&mut conn, &[b"SELECT", db.as_bytes()]).await?)?;
        }
        Ok(conn)
    }

    /// Runs a script by SHA, loading it when Redis does not know it yet.
    pub async fn eval(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Reply, String> {
        let nkeys = keys.len().to_string();
        let mut argv: Vec<&[u8]> = vec![b"EVALSHA", script.sha.as_bytes(), nkeys.as_bytes()];
        argv.extend(keys.iter().map(|k| k.as_bytes()));
        argv.extend(args.iter().map(|a| a.as_bytes()));
        match self.cmd(&argv).await? {
            Reply::Error(e) if e.starts_with("NOSCRIPT") => {
                argv[0] = b"EVAL";
                argv[1] = script.source.as_bytes();
                match self.cmd(&argv).await? {
                    Reply::Error(e) => Err(format!("Redis script error: {e}")),
                    r => Ok(r),
                }
            }
            Reply::Error(e) => Err(format!("Redis script error: {e}")),
            r => Ok(r),
        }
    }
}

fn expect_ok(r: Reply) -> Result<(), String> {
    match r {
        Reply::Error(e) => Err(format!("Redis refused: {e}")),
        _ => Ok(()),
    }
}

async fn exchange(conn: &mut BufStream<TcpStream>, args: &[&[u8]]) -> Result<Reply, String> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    let io = |e: std::io::Error| format!("Redis connection: {e}");
    conn.write_all(&out).await.map_err(io)?;
    conn.flush().await.map_err(io)?;
    read_reply(conn).await
}

async fn read_line(conn: &mut BufStream<TcpStream>) -> Result<String, String> {
    let mut line = String::new();
    let n = conn
        .read_line(&mut line)
        .await
        .map_err(|e| format!("Redis connection: {e}"))?;
    if n == 0 {
        return Err("Redis closed the connection".into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_reply(
    conn: &mut BufStream<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, String>> + Send + '_>> {
    Box::pin(async move {
        let line = read_line(conn).await?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        let num = || {
            rest.parse::<i64>()
                .map_err(|_| format!("bad Redis reply {line:?}"))
        };
        match kind {
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Int(num()?)),
            "$" => {
                let len = num()?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut buf = vec![0; len as usize + 2];
                conn.read_exact(&mut buf)
                    .await
                    .map_err(|e| format!("Redis connection: {e}"))?;
                buf.truncate(len as usize);
                Ok(Reply::Bulk(Some(buf)))
            }
            "*" => {
                let len = num()?;
                if len < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(read_reply(conn).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(format!("bad Redis reply {line:?}")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let r = Redis::from_url("redis://127.0.0.1:6380/2", Duration::from_millis(50)).unwrap();
        assert_eq!(
            (r.addr.as_str(), r.db, r.password.as_deref()),
            ("127.0.0.1:6380", 2, None)
        );
        let r =
            Redis::from_url("redis://:s3cret@cache.internal", Duration::from_millis(50)).unwrap();
        assert_eq!(
            (r.addr.as_str(), r.password.as_deref()),
            ("cache.internal:6379", Some("s3cret"))
        );
        assert!(Redis::from_url("http://x", Duration::from_millis(1)).is_err());
    }

    #[test]
    fn script_sha_is_redis_sha1() {
        // SHA1("return 1"), as Redis computes it for SCRIPT LOAD.
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}
