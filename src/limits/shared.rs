//! Limits shared by every gateway replica through Redis. One Lua script checks and takes all of
//! a request's limits atomically on Redis's own clock (no read-modify-write races between
//! replicas); settlements and learned backend cooldowns go through a background task, so the
//! request path makes exactly one bounded Redis call. When Redis cannot be reached the gateway
//! fails open (or closed, if configured), says so in logs (once per interval), metrics and
//! `/readyz`, and recovers by itself.
//!
//! The usage ledger's hourly figures are added to Redis by the same background task, every few
//! seconds and once more on shutdown, into an hour's, a day's and a month's hash (the month is
//! their hash tag), which the usage report and the status page read back.
//!
//! Every key one script touches carries the consumer's name as its hash tag, so on a Redis
//! Cluster each script runs on one slot. Backend cooldowns live in one hash (backend ×
//! deployment → until, on Redis's clock), read whole in one call: the cost per replica is fixed,
//! whatever else Redis holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use futures_util::StreamExt;

use super::{Refusal, Remaining, until_next_window, window_of};
use crate::auth::outbound::TokenProvider;
use crate::config::{ConsumerLimits, QuotaPeriod};
use crate::redis::Redis;
use crate::sync::lock;
use crate::telemetry::Metrics;
use crate::usage::ledger::{Entry, Hour, Tally};

/// Key prefix, versioned so a rolling upgrade with a new layout cannot misread old keys.
const PREFIX: &str = "sy:v2";
/// Owner records kept the layout they had under the first prefix, so replicas of either
/// version read each other's.
const OWNER_PREFIX: &str = "sy:v1";
/// The hash of shared cooldowns: field `{deployment}:{backend}`, value the end on Redis's
/// clock in milliseconds.
const COOLDOWNS: &str = "sy:v2:cooldowns";
/// Errors are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the usage ledger's figures are written to Redis.
const USAGE_FLUSH: Duration = Duration::from_secs(5);
/// How often a stopping replica looks whether its last requests have finished.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// Hours of usage read from Redis at once for a report.
const USAGE_READS: usize = 16;
/// How often cooldowns learned by other replicas are read.
const COOLDOWN_POLL: Duration = Duration::from_millis(250);
/// Pending settlements and cooldowns; past this they are dropped (estimates stay charged).
const QUEUE: usize = 10_000;

const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tokens = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil then return cap end
  return math.min(cap, l + (now - ts) * cap / 60000)
end
local lv = {}
local wait, what = 0, 0
for i = 0, n - 1 do
  local a = 4 + i * 6
  local rpm, tpm, ql, bl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
  if ql > 0 then
    local used = tonumber(redis.call('GET', KEYS[3 + i * 4]) or '0')
    if used >= ql or (used > 0 and used + tokens > ql) then return {2, i, 0, -1} end
  end
  if bl > 0 then
    local spent = tonumber(redis.call('GET', KEYS[4 + i * 4]) or '0')
    if spent >= bl or (spent > 0 and spent + cost > bl) then return {3, i, 0, -1} end
  end
  if rpm > 0 then
    local l = level(KEYS[1 + i * 4], rpm)
    lv[1 + i * 4] = l
    if l < 1 then
      local w = math.ceil((1 - l) * 60000 / rpm)
      if w > wait then wait, what = w, 1 end
    end
  end
  if tpm > 0 then
    local l = level(KEYS[2 + i * 4], tpm)
    lv[2 + i * 4] = l
    local need = math.min(tokens, tpm)
    if l < need then
      local w = math.ceil((need - l) * 60000 / tpm)
      if w > wait then wait, what = w, 2 end
    end
  end
end
if what ~= 0 then return {0, what, wait, -1} end
local rr, rt, rb = -1, -1, -1
-- Stores a bucket's new level; returns what is left, floored at zero.
local function take(key, level)
  redis.call('HSET', key, 'l', tostring(level), 't', now)
  redis.call('PEXPIRE', key, 120000)
  return math.max(0, math.floor(level))
end
for i = 0, n - 1 do
  local a = 4 + i * 6
  local rpm, tpm, ql, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local bl, bttl = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if rpm > 0 then
    local r = take(KEYS[1 + i * 4], lv[1 + i * 4] - 1)
    if rr < 0 or r < rr then rr = r end
  end
  if tpm > 0 then
    local r = take(KEYS[2 + i * 4], lv[2 + i * 4] - tokens)
    if rt < 0 or r < rt then rt = r end
  end
  if ql > 0 then
    redis.call('INCRBY', KEYS[3 + i * 4], tokens)
    redis.call('EXPIRE', KEYS[3 + i * 4], ttl)
  end
  if bl > 0 then
    local spent = redis.call('INCRBY', KEYS[4 + i * 4], cost)
    redis.call('EXPIRE', KEYS[4 + i * 4], bttl)
    rb = math.max(0, bl - spent)
  end
end
return {1, rr, rt, rb}
"#;

const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delta = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
for i = 0, n - 1 do
  local a = 4 + i * 3
  local tpm, q, b = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if tpm > 0 and delta ~= 0 then
    local key = KEYS[1 + i * 3]
    local v = redis.call('HMGET', key, 'l', 't')
    local l, ts = tonumber(v[1]), tonumber(v[2])
    if l ~= nil then
      l = math.min(tpm, l + (now - ts) * tpm / 60000)
      l = math.min(tpm, l - delta)
      redis.call('HSET', key, 'l', tostring(l), 't', now)
      redis.call('PEXPIRE', key, 120000)
    end
  end
  if q > 0 and delta ~= 0 and redis.call('EXISTS', KEYS[2 + i * 3]) == 1 then
    if redis.call('INCRBY', KEYS[2 + i * 3], delta) < 0 then
      redis.call('SET', KEYS[2 + i * 3], 0, 'KEEPTTL')
    end
  end
  if b > 0 and cost ~= 0 and redis.call('EXISTS', KEYS[3 + i * 3]) == 1 then
    if redis.call('INCRBY', KEYS[3 + i * 3], cost) < 0 then
      redis.call('SET', KEYS[3 + i * 3], 0, 'KEEPTTL')
    end
  end
end
return 1
"#;

/// Records a cooldown (keeping a later one already there), drops the ended ones, and lets the
/// hash expire with the last of them.
const COOL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = now + tonumber(ARGV[2])
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if untl > cur then redis.call('HSET', KEYS[1], ARGV[1], untl) end
local all = redis.call('HGETALL', KEYS[1])
local last = 0
for i = 1, #all, 2 do
  local u = tonumber(all[i + 1])
  if u <= now then redis.call('HDEL', KEYS[1], all[i]) elseif u > last then last = u end
end
if last > now then redis.call('PEXPIRE', KEYS[1], last - now) end
return 1
"#;

/// The cooldowns still running, as field, milliseconds left, ...
const COOLING: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local left = tonumber(all[i + 1]) - now
  if left > 0 then
    out[#out + 1] = all[i]
    out[#out + 1] = left
  end
end
return out
"#;

/// Adds a flush's figures to one hour's, day's and month's usage hashes (one slot: the month is
/// the hash tag), and keeps each until `retention` after the last hour written to it.
const USAGE: &str = r#"
local t = redis.call('TIME')
local at = tonumber(ARGV[1])
local left = at - tonumber(t[1])
for k = 1, 3 do
  for i = 2, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  end
  if redis.call('TTL', KEYS[k]) < left then redis.call('EXPIREAT', KEYS[k], at) end
end
return 1
"#;

/// A request's hold on shared limits, settled through the background task.
#[derive(Debug)]
pub struct SharedHold {
    shared: Arc<Shared>,
    /// Each scope's token bucket, quota and budget keys, three a scope.
    keys: Vec<String>,
    /// Each scope's tokens per minute and whether it has a quota and a budget, three a scope.
    args: Vec<String>,
    /// The scopes (`*`, or a deployment), one a triple of keys.
    scopes: Vec<String>,
    tokens: u64,
    /// The estimated cost held on the budget, in millionths.
    cost: u64,
}

enum Job {
    Settle {
        keys: Vec<String>,
        args: Vec<String>,
    },
    Cooldown {
        key: String,
        wait: Duration,
    },
    /// Remembers which backend holds a stored object.
    Owner {
        key: String,
        value: String,
        ttl: Duration,
    },
    /// Forgets a deleted object's owner.
    Forget {
        key: String,
    },
}

pub struct Shared {
    redis: Redis,
    reserve: redis::Script,
    settle: redis::Script,
    cool: redis::Script,
    cooling: redis::Script,
    usage: redis::Script,
    /// Serialises flushes: a report's and the background task's must not both take figures.
    flushing: tokio::sync::Mutex<()>,
    fail_closed: bool,
    up: AtomicBool,
    last_log: Mutex<Option<Instant>>,
    jobs: mpsc::Sender<Job>,
    jobs_rx: Mutex<Option<mpsc::Receiver<Job>>>,
    metrics: Arc<Metrics>,
    /// Entra ID sign-in, when Redis takes tokens instead of a password.
    credential: Option<Arc<TokenProvider>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// What a shared reservation came to.
pub enum SharedOutcome {
    Admitted(SharedHold, Remaining),
    /// Redis could not be asked; `fail_closed` decides.
    Unavailable(String),
}

impl Shared {
    pub fn new(
        redis: Redis,
        fail_closed: bool,
        metrics: Arc<Metrics>,
        credential: Option<Arc<TokenProvider>>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        metrics.ledger.set_shared();
        Arc::new(Self {
            redis,
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
            cool: redis::Script::new(COOL),
            cooling: redis::Script::new(COOLING),
            usage: redis::Script::new(USAGE),
            flushing: tokio::sync::Mutex::new(()),
            fail_closed,
            up: AtomicBool::new(true),
            last_log: Mutex::new(None),
            jobs: tx,
            jobs_rx: Mutex::new(Some(rx)),
            metrics,
            credential,
        })
    }

    /// The Entra ID credential Redis is signed in with, if any.
    pub fn credential(&self) -> Option<&Arc<TokenProvider>> {
        self.credential.as_ref()
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }

    /// Whether the last Redis call worked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn note<T>(&self, result: &Result<T, String>) {
        match result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis is reachable again; shared limits resume");
                }
                self.metrics.store_up.set(1);
            }
            Err(e) => {
                self.up.store(false, Ordering::Relaxed);
                self.metrics.store_up.set(0);
                self.metrics.store_errors.inc();
                let mut last = lock(&self.last_log);
                if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    *last = Some(Instant::now());
                    let mode = if self.fail_closed {
                        "refusing limited requests"
                    } else {
                        "serving without shared limits"
                    };
                    tracing::warn!(error = %e, "limits store unreachable; {mode}");
                }
            }
        }
    }

    fn keys_and_args(
        consumer: &str,
        scopes: &[(&str, &ConsumerLimits)],
        wall: SystemTime,
    ) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::with_capacity(scopes.len() * 4);
        let mut args = Vec::with_capacity(scopes.len() * 6);
        for (scope, l) in scopes {
            // The consumer's name is the hash tag: every key of one script on one slot.
            let base = format!("{PREFIX}:{{{consumer}}}:{scope}");
            keys.push(format!("{base}:req"));
            keys.push(format!("{base}:tok"));
            let (quota_key, limit, ttl) = match l.token_quota {
                Some(q) => (
                    format!("{base}:q:{}", window_of(q.period, wall)),
                    q.tokens,
                    until_next_window(q.period, wall).as_secs() + 3600,
                ),
                None => (format!("{base}:q"), 0, 0),
            };
            keys.push(quota_key);
            let (budget_key, budget, budget_ttl) = match l.budget {
                Some(b) => (
                    format!("{base}:b:{}", window_of(b.period, wall)),
                    b.micros,
                    until_next_window(b.period, wall).as_secs() + 3600,
                ),
                None => (format!("{base}:b"), 0, 0),
            };
            keys.push(budget_key);
            args.push(l.requests_per_minute.unwrap_or(0).to_string());
            args.push(l.tokens_per_minute.unwrap_or(0).to_string());
            args.push(limit.to_string());
            args.push(ttl.to_string());
            args.push(budget.to_string());
            args.push(budget_ttl.to_string());
        }
        (keys, args)
    }

    /// Checks and takes every scope's limits in one atomic script.
    pub async fn reserve(
        self: &Arc<Self>,
        consumer: &str,
        scopes: &[(&str, &ConsumerLimits)],
        tokens: u64,
        cost: u64,
        wall: SystemTime,
    ) -> Result<SharedOutcome, Refusal> {
        let (keys, per_scope) = Self::keys_and_args(consumer, scopes, wall);
        let mut call = self.reserve.prepare_invoke();
        call.key(&keys)
            .arg(tokens)
            .arg(scopes.len())
            .arg(cost)
            .arg(&per_scope);
        let result = self.redis.script::<Vec<i64>>(&call).await;
        self.note(&result);
        let v = match result {
            Ok(v) => v,
            Err(e) => return Ok(SharedOutcome::Unavailable(e)),
        };
        match v.as_slice() {
            [1, rr, rt, rb] => {
                // Settlement touches the token buckets, quota and budget counters of each scope.
                let mut skeys = Vec::new();
                let mut sargs = Vec::new();
                let names = scopes.iter().map(|(s, _)| s.to_string()).collect();
                for (i, (_, l)) in scopes.iter().enumerate() {
                    skeys.extend_from_slice(&keys[i * 4 + 1..i * 4 + 4]);
                    sargs.push(l.tokens_per_minute.unwrap_or(0).to_string());
                    sargs.push(u8::from(l.token_quota.is_some()).to_string());
                    sargs.push(u8::from(l.budget.is_some()).to_string());
                }
                let of = scopes.iter().find_map(|(_, l)| l.budget).map(|b| b.micros);
                let remaining = Remaining {
                    requests: (*rr >= 0).then_some(*rr as u64),
                    tokens: (*rt >= 0).then_some(*rt as u64),
                    budget: of.filter(|_| *rb >= 0).map(|of| (*rb as u64, of)),
                };
                Ok(SharedOutcome::Admitted(
                    SharedHold {
                        shared: self.clone(),
                        keys: skeys,
                        args: sargs,
                        scopes: names,
                        tokens,
                        cost,
                    },
                    remaining,
                ))
            }
            [0, what, wait_ms, _] => Err(Refusal::Rate {
                what: if *what == 1 { "requests" } else { "tokens" },
                retry_after: Duration::from_millis((*wait_ms).max(1) as u64),
            }),
            [3, scope, _, _] => {
                let period = scopes
                    .get(*scope as usize)
                    .and_then(|(_, l)| l.budget.map(|b| b.period))
                    .unwrap_or(QuotaPeriod::Day);
                Err(Refusal::Budget {
                    period,
                    resets_in: until_next_window(period, wall),
                })
            }
            [2, scope, _, _] => {
                let (period, _) = scopes
                    .get(*scope as usize)
                    .and_then(|(_, l)| l.token_quota.map(|q| (q.period, q.tokens)))
                    .unwrap_or((QuotaPeriod::Day, 0));
                Err(Refusal::Quota {
                    period,
                    resets_in: until_next_window(period, wall),
                })
            }
            _ => Ok(SharedOutcome::Unavailable(format!(
                "unexpected reply from the limits script: {v:?}"
            ))),
        }
    }

    /// What `consumer` has spent (and holds) of its budget in the window `wall` falls in, in
    /// millionths: the key the reserve script counts it in.
    pub async fn budget_spent(
        &self,
        consumer: &str,
        period: QuotaPeriod,
        wall: SystemTime,
    ) -> Result<u64, String> {
        let key = format!("{PREFIX}:{{{consumer}}}:*:b:{}", window_of(period, wall));
        let r = self
            .redis
            .query::<Option<i64>>(redis::cmd("GET").arg(key))
            .await;
        self.note(&r);
        Ok(r?.unwrap_or(0).max(0) as u64)
    }

    /// Tells the other replicas a backend asked to be left alone.
    pub fn publish_cooldown(&self, deployment: &str, backend: &str, wait: Duration) {
        let key = format!("{deployment}:{backend}");
        let _ = self.jobs.try_send(Job::Cooldown { key, wait });
    }

    fn owner_key(namespace: &str, id: &str) -> String {
        format!("{OWNER_PREFIX}:{namespace}:{id}")
    }

    /// The owner record of a stored object (or a session's backend: `namespace` says which), as
    /// another replica (or this one) wrote it.
    /// Bounded by the store's timeout; an unreachable store is `Err`.
    pub async fn owner(&self, namespace: &str, id: &str) -> Result<Option<String>, String> {
        let key = Self::owner_key(namespace, id);
        let r = self
            .redis
            .query::<Option<Vec<u8>>>(redis::cmd("GET").arg(&key))
            .await;
        self.note(&r);
        Ok(r?.and_then(|v| String::from_utf8(v).ok()))
    }

    /// Writes owner records for the other replicas, off the request path.
    pub fn publish_owner(&self, namespace: &str, id: &str, value: String, ttl: Duration) {
        let key = Self::owner_key(namespace, id);
        if self.jobs.try_send(Job::Owner { key, value, ttl }).is_err() {
            self.metrics.store_errors.inc();
        }
    }

    /// Forgets a deleted object's owner for every replica.
    pub fn forget_owner(&self, namespace: &str, id: &str) {
        let key = Self::owner_key(namespace, id);
        if self.jobs.try_send(Job::Forget { key }).is_err() {
            self.metrics.store_errors.inc();
        }
    }

    /// Runs settlements, cooldown sharing and usage writes until `shutdown`, then goes on
    /// writing what the requests still draining settle and use, for up to `grace`; `apply`
    /// receives cooldowns other replicas learned: (deployment, backend name, time left).
    pub async fn run(
        self: Arc<Self>,
        apply: impl Fn(&str, &str, Duration) + Send,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let Some(mut rx) = lock(&self.jobs_rx).take() else {
            return;
        };
        // The first connection is made now, not by the first request; a stop meanwhile is not
        // kept waiting for it.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            warm = self.redis.warm_up() => self.note(&warm),
        }
        let mut poll = tokio::time::interval(COOLDOWN_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(USAGE_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                job = rx.recv() => match job {
                    None => break,
                    Some(job) => self.write(job).await,
                },
                _ = poll.tick() => self.read_cooldowns(&apply).await,
                _ = flush.tick() => {
                    let _ = self.flush_usage().await;
                }
            }
        }
        // Requests still draining settle and use after the stop: their figures are written
        // too, before the replica goes.
        let until = Instant::now() + grace;
        let mut check = tokio::time::interval(DRAIN_CHECK);
        while self.metrics.in_flight.get() > 0 && Instant::now() < until {
            tokio::select! {
                job = rx.recv() => match job {
                    None => break,
                    Some(job) => self.write(job).await,
                },
                _ = check.tick() => {}
            }
        }
        while let Ok(job) = rx.try_recv() {
            self.write(job).await;
        }
        let _ = self.flush_usage().await;
    }

    fn usage_keys(hour: Hour) -> [String; 3] {
        let secs = hour * 3600;
        let month = window_of(QuotaPeriod::Month, UNIX_EPOCH + Duration::from_secs(secs));
        let base = format!("{PREFIX}:usage:{{m{month}}}");
        [
            format!("{base}:h:{hour}"),
            format!("{base}:d:{}", hour / 24),
            format!("{base}:m"),
        ]
    }

    /// A usage hash's field: the consumer, the deployment and the figure, as a JSON array (names
    /// may hold any character).
    fn usage_field(consumer: &str, deployment: &str, figure: &str) -> String {
        serde_json::json!([consumer, deployment, figure]).to_string()
    }

    /// Writes what the usage ledger holds to Redis; on failure it stays held for the next try.
    pub async fn flush_usage(&self) -> Result<(), String> {
        let _one = self.flushing.lock().await;
        let ledger = &self.metrics.ledger;
        let entries = ledger.drain();
        if entries.is_empty() {
            return Ok(());
        }
        let retention = ledger.retention().as_secs();
        let mut by_hour: std::collections::BTreeMap<Hour, Vec<Entry>> = Default::default();
        for e in entries {
            by_hour.entry(e.hour).or_default().push(e);
        }
        let mut failed = None;
        let mut unwritten = Vec::new();
        for (hour, entries) in by_hour {
            if failed.is_some() {
                unwritten.extend(entries);
                continue;
            }
            let mut call = self.usage.prepare_invoke();
            call.key(&Self::usage_keys(hour)[..])
                .arg((hour + 1) * 3600 + retention);
            for e in &entries {
                for (name, v) in Tally::FIELDS.iter().zip(e.tally.values()) {
                    if v > 0 {
                        call.arg(Self::usage_field(&e.consumer, &e.deployment, name))
                            .arg(v);
                    }
                }
            }
            let r = self.redis.script::<()>(&call).await;
            self.note(&r);
            if let Err(e) = r {
                failed = Some(e);
                unwritten.extend(entries);
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                ledger.restore(unwritten);
                Err(e)
            }
        }
    }

    /// Reads one usage hash as ledger entries at `hour`.
    async fn read_usage(&self, key: &str, hour: Hour) -> Result<Vec<Entry>, String> {
        let r = self
            .redis
            .query::<Vec<(String, u64)>>(redis::cmd("HGETALL").arg(key))
            .await;
        self.note(&r);
        let mut tallies: std::collections::HashMap<(String, String), Tally> = Default::default();
        for (field, v) in r? {
            let Ok((consumer, deployment, figure)) =
                serde_json::from_str::<(String, String, String)>(&field)
            else {
                continue;
            };
            tallies
                .entry((consumer, deployment))
                .or_default()
                .set(&figure, v);
        }
        Ok(tallies
            .into_iter()
            .map(|((consumer, deployment), tally)| Entry {
                hour,
                consumer: consumer.into(),
                deployment: deployment.into(),
                tally,
            })
            .collect())
    }

    /// Every replica's usage from hour `from` up to `to`, this one's written first.
    pub async fn usage(&self, from: Hour, to: Hour) -> Result<Vec<Entry>, String> {
        self.flush_usage().await?;
        let reads = (from..to).map(|h| async move {
            let [key, ..] = Self::usage_keys(h);
            self.read_usage(&key, h).await
        });
        let mut out = Vec::new();
        let mut stream = futures_util::stream::iter(reads).buffered(USAGE_READS);
        while let Some(r) = stream.next().await {
            out.extend(r?);
        }
        Ok(out)
    }

    /// Every replica's usage in the UTC day and month `hour` falls in, this one's written
    /// first; each entry's hour is the period's first.
    pub async fn usage_periods(&self, hour: Hour) -> Result<(Vec<Entry>, Vec<Entry>), String> {
        self.flush_usage().await?;
        let [_, day, month] = Self::usage_keys(hour);
        let day = self.read_usage(&day, hour - hour % 24).await?;
        let month = self.read_usage(&month, hour).await?;
        Ok((day, month))
    }

    async fn write(&self, job: Job) {
        let r = match job {
            Job::Settle { keys, args } => {
                let mut call = self.settle.prepare_invoke();
                call.key(keys).arg(args);
                self.redis.script::<()>(&call).await
            }
            Job::Cooldown { key, wait } => {
                let mut call = self.cool.prepare_invoke();
                call.key(COOLDOWNS)
                    .arg(key)
                    .arg(wait.as_millis().max(1) as u64);
                self.redis.script::<()>(&call).await
            }
            Job::Owner { key, value, ttl } => {
                self.redis
                    .query::<()>(
                        redis::cmd("SET")
                            .arg(key)
                            .arg(value)
                            .arg("EX")
                            .arg(ttl.as_secs().max(1)),
                    )
                    .await
            }
            Job::Forget { key } => self.redis.query::<()>(redis::cmd("DEL").arg(key)).await,
        };
        self.note(&r);
    }

    async fn read_cooldowns(&self, apply: &impl Fn(&str, &str, Duration)) {
        let mut call = self.cooling.prepare_invoke();
        call.key(COOLDOWNS);
        let r = self.redis.script::<Vec<(String, u64)>>(&call).await;
        self.note(&r);
        for (field, ms) in r.unwrap_or_default() {
            if let Some((deployment, backend)) = field.rsplit_once(':') {
                apply(deployment, backend, Duration::from_millis(ms));
            }
        }
    }
}

impl SharedHold {
    /// Queues the settlement: `used` replaces the estimate; `None` keeps it.
    pub fn settle(self, used: Option<super::Used>) {
        let Some(used) = used else { return };
        let delta = used.tokens as i64 - self.tokens as i64;
        let cost = used.cost as i64 - self.cost as i64;
        queue_settle(&self.shared, (delta, cost), self.keys, self.args);
    }

    /// Gives back the tokens held on scope `deployment` at once, and leaves it out of the
    /// settlement (the request went on to a fallback without being served there).
    pub fn leave(&mut self, deployment: &str) {
        let Some(i) = self.scopes.iter().position(|s| s == deployment) else {
            return;
        };
        self.scopes.remove(i);
        let keys = self.keys.drain(i * 3..i * 3 + 3).collect();
        let args = self.args.drain(i * 3..i * 3 + 3).collect();
        // A deployment's scope has no budget: the cost stays on the overall one.
        queue_settle(&self.shared, (-(self.tokens as i64), 0), keys, args);
    }
}

/// Queues a settlement of `(tokens, cost)` more (or fewer) on the scopes whose keys and
/// arguments are given.
fn queue_settle(shared: &Shared, (delta, cost): (i64, i64), keys: Vec<String>, rest: Vec<String>) {
    if (delta == 0 && cost == 0) || keys.is_empty() {
        return;
    }
    let mut args = vec![
        delta.to_string(),
        (keys.len() / 3).to_string(),
        cost.to_string(),
    ];
    args.extend(rest);
    let _ = shared.jobs.try_send(Job::Settle { keys, args });
}
