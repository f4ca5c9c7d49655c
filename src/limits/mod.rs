//! Per-consumer limits: requests per minute, tokens per minute, token quotas per fixed UTC
//! hour, day or month, and budgets in money per day or month, with APIM's answers (429 with
//! `retry-after` over a rate, 403 once a quota or budget is spent). A request reserves its
//! estimate (tokens, and their cost) before it is forwarded and is settled with the usage the
//! backend reports, so concurrent requests cannot overrun a limit by more than their
//! estimates' error. Kept in memory, per gateway, or in Redis, shared by every replica
//! (`shared`). No HTTP types here.

pub mod estimate;
pub mod shared;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use crate::config::{ConsumerConfig, ConsumerLimits, Price, QuotaPeriod};
use crate::sync::lock;
pub use shared::Shared;
use shared::{SharedHold, SharedOutcome};

/// A rate budget refilled evenly over a minute, spendable at once (Azure's own TPM shape).
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            capacity: f64::from(per_minute),
            level: f64::from(per_minute),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.capacity / 60.0).min(self.capacity);
        self.last = now;
    }

    /// Time until `amount` fits; zero if it fits now. More than the whole budget is admitted
    /// when the bucket is full (and leaves it in debt), so one large request is never stuck.
    fn wait_for(&self, amount: f64) -> Duration {
        let need = amount.min(self.capacity);
        if self.level >= need {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.level) * 60.0 / self.capacity)
    }
}

#[derive(Debug)]
struct QuotaWindow {
    window: u64,
    used: u64,
}

impl QuotaWindow {
    /// What `slot` holds as used in `window` (a slot of an older window holds nothing now).
    fn used_in(slot: &Option<QuotaWindow>, window: u64) -> u64 {
        match slot {
            Some(w) if w.window == window => w.used,
            _ => 0,
        }
    }

    /// Adds `n` to `slot`'s count in `window`, starting the window afresh if it is a new one.
    fn add(slot: &mut Option<QuotaWindow>, window: u64, n: u64) {
        match slot.as_mut() {
            Some(w) if w.window == window => w.used += n,
            _ => *slot = Some(QuotaWindow { window, used: n }),
        }
    }

    /// Whether `more` does not fit beside `used` of `limit`: a spent limit refuses all, and
    /// a started one what would overrun it (the first request of a window always fits).
    fn refuses(used: u64, more: u64, limit: u64) -> bool {
        used >= limit || (used > 0 && used + more > limit)
    }
}

#[derive(Debug)]
struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    quota: Option<QuotaWindow>,
    /// Spent of the budget, in millionths of the currency.
    budget: Option<QuotaWindow>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over requests or tokens per minute: 429, retry after the wait.
    Rate {
        what: &'static str,
        retry_after: Duration,
    },
    /// The quota for this period is spent: 403 until the next window.
    Quota {
        period: QuotaPeriod,
        resets_in: Duration,
    },
    /// The budget for this period is spent: 403 until the next window.
    Budget {
        period: QuotaPeriod,
        resets_in: Duration,
    },
    /// The shared store cannot be reached and `fail_closed` is set: 503.
    StoreUnavailable(String),
}

/// What a request used, to settle its reservation with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Used {
    pub tokens: u64,
    /// What the tokens cost, in millionths of the currency.
    pub cost: u64,
}

impl Refusal {
    /// The limit that refused, as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Rate {
                what: "requests", ..
            } => "requests_per_minute",
            Refusal::Rate { .. } => "tokens_per_minute",
            Refusal::Quota { .. } => "token_quota",
            Refusal::Budget { .. } => "budget",
            Refusal::StoreUnavailable(_) => "store_unavailable",
        }
    }
}

/// A consumer's budget as it stands (`Limiter::budgets`); money in millionths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    pub consumer: Arc<str>,
    pub period: QuotaPeriod,
    pub spent: u64,
    pub amount: u64,
}

/// What remains after a request was admitted, for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    /// The budget left and the whole budget, in millionths of the currency.
    pub budget: Option<(u64, u64)>,
}

/// Tokens held for one request until its real usage is known. Dropped without `settle` (the
/// request ended with nothing to read), the estimate stays charged: the safe side of a limit.
#[derive(Debug)]
pub struct Reservation {
    consumer: Arc<ConsumerLimiter>,
    tokens: u64,
    quota_window: Option<u64>,
    /// The estimated cost held on the budget, in millionths, and the budget's window.
    cost: u64,
    budget_window: Option<u64>,
}

pub struct ConsumerLimiter {
    limits: ConsumerLimits,
    /// The deployment these limits are on; `None`: the consumer's overall limits.
    scope: Option<String>,
    state: Mutex<State>,
}

impl std::fmt::Debug for ConsumerLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerLimiter")
            .field("limits", &self.limits)
            .finish()
    }
}

/// All consumers' limiters: one for each consumer's overall limits, one for each of its
/// per-deployment limits. A request must fit all that apply to it.
pub struct Limiter {
    consumers: HashMap<Arc<str>, Entry>,
    /// Completion tokens reserved for a request without `max_tokens`.
    pub completion_estimate: u64,
    /// When set, limits are counted in Redis rather than in the entries' memory.
    shared: Option<Arc<Shared>>,
}

struct Entry {
    overall: Option<Arc<ConsumerLimiter>>,
    per_deployment: HashMap<String, Arc<ConsumerLimiter>>,
}

/// A request admitted under its consumer's limits, until it is settled.
#[derive(Debug)]
pub struct Admission {
    reservations: Vec<Reservation>,
    /// One hold per admission joined in (the asked deployment's, a fallback's).
    shared: Vec<SharedHold>,
    /// The tightest headroom among the limits that apply.
    pub remaining: Remaining,
    /// Whether any applying limit counts tokens (and so needs the response's usage).
    pub counts_tokens: bool,
}

impl Admission {
    /// Replaces the estimate with what the request used (`None`: keep the estimate).
    pub fn settle(self, used: Option<Used>) {
        for r in self.reservations {
            r.settle(used);
        }
        for h in self.shared {
            h.settle(used);
        }
    }

    /// The request goes on from `deployment` to a fallback, not served there: the tokens
    /// reserved on the consumer's limits for that deployment are given back (that the request
    /// was sent there stays counted).
    pub fn leave(&mut self, deployment: &str) {
        let (left, kept) = std::mem::take(&mut self.reservations)
            .into_iter()
            .partition(|r| r.consumer.scope.as_deref() == Some(deployment));
        self.reservations = kept;
        for r in left {
            r.settle(Some(Used::default()));
        }
        for h in &mut self.shared {
            h.leave(deployment);
        }
    }

    /// Takes in the admission of the same request under more limits (a fallback's).
    fn join(&mut self, other: Admission) {
        self.reservations.extend(other.reservations);
        self.shared.extend(other.shared);
        self.remaining.requests = tighter(self.remaining.requests, other.remaining.requests);
        self.remaining.tokens = tighter(self.remaining.tokens, other.remaining.tokens);
        self.remaining.budget = self.remaining.budget.or(other.remaining.budget);
        self.counts_tokens |= other.counts_tokens;
    }
}

fn limiter_for(
    limits: &ConsumerLimits,
    scope: Option<&str>,
    now: Instant,
) -> Option<Arc<ConsumerLimiter>> {
    if *limits == ConsumerLimits::default() {
        return None;
    }
    Some(Arc::new(ConsumerLimiter {
        limits: limits.clone(),
        scope: scope.map(str::to_string),
        state: Mutex::new(State {
            requests: limits.requests_per_minute.map(|r| Bucket::new(r, now)),
            tokens: limits.tokens_per_minute.map(|t| Bucket::new(t, now)),
            quota: None,
            budget: None,
        }),
    }))
}

fn tighter(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Bodies larger than this are tokenized on the blocking pool: a long prompt takes
/// milliseconds, which must not stall the other requests sharing a runtime worker.
const INLINE_ESTIMATE_BYTES: usize = 16 * 1024;

impl Limiter {
    /// A request's prompt and completion tokens, estimated.
    async fn estimate(&self, body: &Bytes, deployment: &str) -> (u64, u64) {
        let allowance = self.completion_estimate;
        if body.len() <= INLINE_ESTIMATE_BYTES {
            return estimate::estimate(body, deployment, allowance).unwrap_or_default();
        }
        let (body, deployment) = (body.clone(), deployment.to_string());
        tokio::task::spawn_blocking(move || estimate::estimate(&body, &deployment, allowance))
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// `previous`: the limiter this one replaces on a reload. A consumer whose limit on a scope
    /// is unchanged keeps its counters there, so a reload hands out no fresh allowance.
    pub fn new(
        consumers: &[ConsumerConfig],
        completion_estimate: u64,
        shared: Option<Arc<Shared>>,
        previous: Option<&Limiter>,
    ) -> Self {
        let now = Instant::now();
        let kept = |name: &str, scope: Option<&str>, limits: &ConsumerLimits| {
            let entry = previous?.consumers.get(name)?;
            let old = match scope {
                None => entry.overall.as_ref()?,
                Some(d) => entry.per_deployment.get(d)?,
            };
            (old.limits == *limits).then(|| old.clone())
        };
        let limiter = |name: &str, scope: Option<&str>, limits: &ConsumerLimits| {
            kept(name, scope, limits).or_else(|| limiter_for(limits, scope, now))
        };
        let counts_tokens = consumers.iter().any(|c| {
            c.limits.counts_tokens() || c.deployment_limits.iter().any(|(_, l)| l.counts_tokens())
        });
        if counts_tokens {
            estimate::warm_up();
        }
        Self {
            consumers: consumers
                .iter()
                .map(|c| {
                    let entry = Entry {
                        overall: limiter(&c.name, None, &c.limits),
                        per_deployment: c
                            .deployment_limits
                            .iter()
                            .filter_map(|(d, l)| {
                                limiter(&c.name, Some(d), l).map(|x| (d.clone(), x))
                            })
                            .collect(),
                    };
                    (Arc::from(c.name.as_str()), entry)
                })
                .collect(),
            completion_estimate,
            shared,
        }
    }

    /// Each consumer with a budget: its period, what is spent (and held) of it in the window
    /// `wall` falls in, and the whole amount, in millionths of the currency. Read from the
    /// shared store when limits are kept there.
    pub async fn budgets(&self, wall: SystemTime) -> Result<Vec<BudgetState>, String> {
        let mut out = Vec::new();
        for (name, entry) in &self.consumers {
            let Some(l) = &entry.overall else { continue };
            let Some(b) = l.limits.budget else { continue };
            let window = window_of(b.period, wall);
            let spent = match &self.shared {
                Some(shared) => shared.budget_spent(name, b.period, wall).await?,
                None => QuotaWindow::used_in(&lock(&l.state).budget, window),
            };
            out.push(BudgetState {
                consumer: name.clone(),
                period: b.period,
                spent,
                amount: b.micros,
            });
        }
        Ok(out)
    }

    /// Whether any of `consumer`'s limits counts tokens, so its request bodies are read.
    pub fn counts_tokens(&self, consumer: &str) -> bool {
        self.consumers.get(consumer).is_some_and(|e| {
            e.overall.as_ref().is_some_and(|l| l.counts_tokens())
                || e.per_deployment.values().any(|l| l.counts_tokens())
        })
    }

    /// Admits a request of `consumer` for `deployment` (its JSON `body` is estimated when a
    /// limit counts tokens), or says why not. `Ok(None)`: no limit applies.
    pub async fn admit(
        &self,
        consumer: &str,
        deployment: Option<&str>,
        price: Option<Price>,
        body: &Bytes,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Option<Admission>, Refusal> {
        self.admit_on(consumer, deployment, true, price, body, now, wall)
            .await
    }

    /// Admits a request going on to fallback `deployment` under the consumer's limits on that
    /// deployment (its overall limits hold it already), joined into `admission`.
    pub async fn enter(
        &self,
        admission: &mut Option<Admission>,
        consumer: &str,
        deployment: &str,
        body: &Bytes,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), Refusal> {
        // A budget is on the overall limits, which hold the request already.
        let more = self
            .admit_on(consumer, Some(deployment), false, None, body, now, wall)
            .await?;
        match (admission.as_mut(), more) {
            (Some(a), Some(more)) => a.join(more),
            (None, more) => *admission = more,
            (Some(_), None) => {}
        }
        Ok(())
    }

    /// [`Limiter::admit`], with the consumer's overall limits or without (`overall`).
    #[expect(
        clippy::too_many_arguments,
        reason = "admit's and enter's arguments, and which of them this is"
    )]
    async fn admit_on(
        &self,
        consumer: &str,
        deployment: Option<&str>,
        overall: bool,
        price: Option<Price>,
        body: &Bytes,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Option<Admission>, Refusal> {
        let Some(entry) = self.consumers.get(consumer) else {
            return Ok(None);
        };
        let applying: Vec<(&str, &Arc<ConsumerLimiter>)> = entry
            .overall
            .iter()
            .filter(|_| overall)
            .map(|l| ("*", l))
            .chain(deployment.and_then(|d| {
                entry
                    .per_deployment
                    .get_key_value(d)
                    .map(|(k, l)| (k.as_str(), l))
            }))
            .collect();
        if applying.is_empty() {
            return Ok(None);
        }
        let counts_tokens = applying.iter().any(|(_, l)| l.counts_tokens());
        let (prompt, completion) = if counts_tokens {
            self.estimate(body, deployment.unwrap_or("")).await
        } else {
            (0, 0)
        };
        let tokens = prompt + completion;
        // The budget holds the estimate's cost at the asked deployment's price.
        let cost = price.map_or(0, |p| {
            crate::config::micros(p.cost(&crate::usage::Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                ..Default::default()
            }))
        });
        if let Some(shared) = &self.shared {
            let scopes: Vec<(&str, &ConsumerLimits)> = applying
                .iter()
                .map(|(scope, l)| (*scope, &l.limits))
                .collect();
            return match shared
                .reserve(consumer, &scopes, tokens, cost, wall)
                .await?
            {
                SharedOutcome::Admitted(hold, remaining) => Ok(Some(Admission {
                    reservations: Vec::new(),
                    shared: vec![hold],
                    remaining,
                    counts_tokens,
                })),
                SharedOutcome::Unavailable(e) if shared.fail_closed() => {
                    Err(Refusal::StoreUnavailable(e))
                }
                // Fail open: serve, uncounted, until Redis is back.
                SharedOutcome::Unavailable(_) => Ok(Some(Admission {
                    reservations: Vec::new(),
                    shared: Vec::new(),
                    remaining: Remaining::default(),
                    counts_tokens,
                })),
            };
        }
        let mut reservations = Vec::with_capacity(applying.len());
        let mut remaining = Remaining::default();
        for (_, l) in applying {
            match l.reserve(tokens, cost, now, wall) {
                Ok((r, rem)) => {
                    reservations.push(r);
                    remaining.requests = tighter(remaining.requests, rem.requests);
                    remaining.tokens = tighter(remaining.tokens, rem.tokens);
                    remaining.budget = remaining.budget.or(rem.budget);
                }
                Err(refusal) => {
                    // All or nothing: give back what the other limits already took.
                    for r in reservations {
                        r.cancel();
                    }
                    return Err(refusal);
                }
            }
        }
        Ok(Some(Admission {
            reservations,
            shared: Vec::new(),
            remaining,
            counts_tokens,
        }))
    }
}

impl ConsumerLimiter {
    fn counts_tokens(&self) -> bool {
        self.limits.counts_tokens()
    }

    /// Admits a request estimated at `tokens` costing `cost` (millionths), or says why not.
    /// Nothing is taken on refusal.
    fn reserve(
        self: &Arc<Self>,
        tokens: u64,
        cost: u64,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(Reservation, Remaining), Refusal> {
        let mut st = lock(&self.state);
        let budget_window = self.limits.budget.map(|b| window_of(b.period, wall));
        if let (Some(b), Some(window)) = (self.limits.budget, budget_window)
            && QuotaWindow::refuses(QuotaWindow::used_in(&st.budget, window), cost, b.micros)
        {
            return Err(Refusal::Budget {
                period: b.period,
                resets_in: until_next_window(b.period, wall),
            });
        }
        let quota_window = self.limits.token_quota.map(|q| window_of(q.period, wall));
        if let (Some(q), Some(window)) = (self.limits.token_quota, quota_window)
            && QuotaWindow::refuses(QuotaWindow::used_in(&st.quota, window), tokens, q.tokens)
        {
            return Err(Refusal::Quota {
                period: q.period,
                resets_in: until_next_window(q.period, wall),
            });
        }
        let mut wait = None;
        if let Some(b) = st.requests.as_mut() {
            b.refill(now);
            let w = b.wait_for(1.0);
            if !w.is_zero() {
                wait = Some(("requests", w));
            }
        }
        if let Some(b) = st.tokens.as_mut() {
            b.refill(now);
            let w = b.wait_for(tokens as f64);
            if !w.is_zero() && wait.is_none_or(|(_, o)| w > o) {
                wait = Some(("tokens", w));
            }
        }
        if let Some((what, retry_after)) = wait {
            return Err(Refusal::Rate { what, retry_after });
        }
        if let Some(b) = st.requests.as_mut() {
            b.level -= 1.0;
        }
        if let Some(b) = st.tokens.as_mut() {
            b.level -= tokens as f64;
        }
        if let Some(window) = quota_window {
            QuotaWindow::add(&mut st.quota, window, tokens);
        }
        if let Some(window) = budget_window {
            QuotaWindow::add(&mut st.budget, window, cost);
        }
        let remaining = Remaining {
            requests: st.requests.as_ref().map(|b| b.level.max(0.0) as u64),
            tokens: st.tokens.as_ref().map(|b| b.level.max(0.0) as u64),
            budget: self.limits.budget.map(|b| {
                let spent = st.budget.as_ref().map_or(0, |w| w.used);
                (b.micros.saturating_sub(spent), b.micros)
            }),
        };
        Ok((
            Reservation {
                consumer: self.clone(),
                tokens,
                quota_window,
                cost,
                budget_window,
            },
            remaining,
        ))
    }
}

impl Reservation {
    /// Gives everything back: the request was not sent after all.
    fn cancel(self) {
        let mut st = lock(&self.consumer.state);
        if let Some(b) = st.requests.as_mut() {
            b.level = (b.level + 1.0).min(b.capacity);
        }
        if let Some(b) = st.tokens.as_mut() {
            b.level = (b.level + self.tokens as f64).min(b.capacity);
        }
        if let (Some(window), Some(w)) = (self.quota_window, st.quota.as_mut())
            && w.window == window
        {
            w.used = w.used.saturating_sub(self.tokens);
        }
        if let (Some(window), Some(w)) = (self.budget_window, st.budget.as_mut())
            && w.window == window
        {
            w.used = w.used.saturating_sub(self.cost);
        }
    }

    /// Replaces the estimate with what the request really used. `None` keeps the estimate
    /// charged (the usage could not be read).
    pub fn settle(self, used: Option<Used>) {
        let Some(used) = used else { return };
        let mut st = lock(&self.consumer.state);
        if let (Some(window), Some(w)) = (self.budget_window, st.budget.as_mut())
            && w.window == window
        {
            w.used = (w.used + used.cost).saturating_sub(self.cost);
        }
        let used = used.tokens;
        let delta = used as f64 - self.tokens as f64;
        if let Some(b) = st.tokens.as_mut() {
            // Returned tokens cannot overfill the bucket; extra use can put it in debt.
            b.level = (b.level - delta).min(b.capacity);
        }
        if let (Some(window), Some(w)) = (self.quota_window, st.quota.as_mut())
            && w.window == window
        {
            w.used = (w.used as i64 + delta as i64).max(0) as u64;
        }
    }
}

/// The index of the UTC window `wall` falls in: hours or days since the epoch, or months.
fn window_of(period: QuotaPeriod, wall: SystemTime) -> u64 {
    let secs = wall
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    match period {
        QuotaPeriod::Hour => secs / 3600,
        QuotaPeriod::Day => secs / 86_400,
        QuotaPeriod::Month => {
            let (y, m, _) = civil_from_days((secs / 86_400) as i64);
            (y * 12 + i64::from(m) - 1) as u64
        }
    }
}

/// When the UTC window `wall` falls in began, in seconds since the epoch.
pub fn window_start(period: QuotaPeriod, wall: SystemTime) -> u64 {
    let secs = wall
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    match period {
        QuotaPeriod::Hour => secs - secs % 3600,
        QuotaPeriod::Day => secs - secs % 86_400,
        QuotaPeriod::Month => {
            let (y, m, _) = civil_from_days((secs / 86_400) as i64);
            (days_from_civil(y, m, 1) as u64) * 86_400
        }
    }
}

fn until_next_window(period: QuotaPeriod, wall: SystemTime) -> Duration {
    let secs = wall
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let next = match period {
        QuotaPeriod::Hour => (secs / 3600 + 1) * 3600,
        QuotaPeriod::Day => (secs / 86_400 + 1) * 86_400,
        QuotaPeriod::Month => {
            let (y, m, _) = civil_from_days((secs / 86_400) as i64);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (days_from_civil(ny, nm, 1) as u64) * 86_400
        }
    };
    Duration::from_secs(next.saturating_sub(secs))
}

/// (year, month 1-12, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
