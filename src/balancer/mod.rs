//! Picks the backend for each attempt and keeps what it learns from the answers.
//! Synchronous and free of I/O: callers pass the time, so tests run on paused clocks.
//!
//! State lives per deployment (a [`Table`]) and, inside it, per backend: health (cooldown and
//! circuit breaker), requests in flight, a latency average and the rate-limit room the backend
//! reported. A pick filters the deployment's candidates to those that may take an attempt,
//! keeps the best priority group among them, and lets the strategy choose inside that group.

mod health;
mod hints;
mod lease;
mod misfit;
mod ranks;
mod signals;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::config::{CircuitBreakerConfig, Config, Strategy};
use crate::fnv::FnvBuild;
use crate::rng::SplitMix64;
use crate::sync::{lock, read, write};
use health::Health;
pub use health::{Availability, CircuitState};
pub use hints::retry_hint;
pub use lease::Lease;
pub use misfit::{MISFIT_TTL, Misfit, MisfitReason};
pub use ranks::Ranks;
use signals::{Headroom, PeakEwma};

/// Tables kept at most for deployments the config does not list; names past this share one
/// table, so a client inventing deployment names cannot grow memory without bound. Listed
/// deployments always have their own, made with the balancer: invented names cannot take
/// tracking away from them.
const MAX_TABLES: usize = 1024;
/// Highest `priority` the config accepts.
const MAX_PRIORITY: usize = crate::config::MAX_PRIORITY as usize;

/// What the balancer needs from the config.
#[derive(Debug)]
pub struct Policy {
    pub strategy: Strategy,
    pub priority: Vec<u32>,
    pub weight: Vec<u32>,
    pub default_cooldown: Duration,
    pub max_cooldown: Duration,
    pub breaker: CircuitBreakerConfig,
    /// Backends an operator drained: they take no new requests (in-flight ones finish).
    pub drained: Vec<AtomicBool>,
}

impl Policy {
    pub fn from_config(c: &Config) -> Self {
        Self {
            strategy: c.routing.strategy,
            priority: c.backends.iter().map(|b| b.priority).collect(),
            weight: c.backends.iter().map(|b| b.weight).collect(),
            default_cooldown: c.routing.default_cooldown,
            max_cooldown: c.routing.max_cooldown,
            breaker: c.routing.circuit_breaker,
            drained: c.backends.iter().map(|_| AtomicBool::new(false)).collect(),
        }
    }

    pub fn is_drained(&self, idx: usize) -> bool {
        self.drained
            .get(idx)
            .is_some_and(|d| d.load(Ordering::Relaxed))
    }
}

pub struct Balancer {
    policy: Arc<Policy>,
    tables: RwLock<Tables>,
    /// The deployments the config lists, with each one's backend ranks.
    listed: HashMap<Arc<str>, Arc<Ranks>, FnvBuild>,
    /// The backends' own priorities and weights, for deployments without ranks of their own.
    ranks: Arc<Ranks>,
    overflow: Arc<Table>,
}

#[derive(Default)]
struct Tables {
    by_name: HashMap<Arc<str>, Arc<Table>, FnvBuild>,
    /// How many are for names the config does not list.
    unlisted: usize,
}

/// One deployment's view of the backends.
pub struct Table {
    name: Arc<str>,
    policy: Arc<Policy>,
    ranks: Arc<Ranks>,
    state: Mutex<TableState>,
}

struct TableState {
    pairs: Vec<Pair>,
    /// Rotation position per priority level (index = priority), shared by every request for
    /// this deployment, so a spill-over group takes turns among itself.
    rr: Vec<usize>,
    rng: SplitMix64,
    /// Set when a reload replaced this table: where its backends' state went (old index →
    /// new index), so leases taken before the reload end their accounting there.
    successor: Option<Successor>,
}

/// The table that replaced another, and the old → new backend index map.
type Successor = (Arc<Table>, Arc<[Option<usize>]>);

#[derive(Debug, Default, Clone)]
struct Pair {
    health: Health,
    in_flight: u32,
    ttfb: PeakEwma,
    headroom: Headroom,
    /// Smooth weighted round-robin's running score.
    wrr: i64,
    /// The backend answered that it cannot serve this deployment at all (its credential was
    /// refused, the deployment is not there): passed over while others can serve, until then.
    misfit: Option<(Misfit, Instant)>,
}

/// The result of a pick.
pub enum Pick {
    Chosen(Lease),
    /// Every candidate is cooling down (or its circuit is open); the soonest is free after this.
    Throttled {
        retry_after: Duration,
    },
    /// No candidate can take traffic for reasons other than throttling.
    Unavailable {
        retry_after: Option<Duration>,
    },
}

/// How an attempt went, as far as health and load signals care.
pub enum Outcome<'a> {
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
        /// Whether the status is one the gateway retries (`routing.retry_on_status`).
        retryable: bool,
        ttfb: Duration,
    },
    /// No response: connect error, timeout, broken exchange.
    Failure { elapsed: Duration },
    /// An answer saying the backend cannot serve this deployment (see [`Misfit`]).
    Misfit(Misfit),
}

/// What the balancer concluded from an outcome (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    CooledDown(Duration),
    Failed { circuit_opened: bool },
}

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        Self::with_listed(policy, std::iter::empty::<(&str, &[(usize, u32, u32)])>())
    }

    /// A balancer with a table made up front for each of the `listed` deployments, each with
    /// its backends' ranks where they differ from the backends' own (backend index,
    /// priority, weight).
    pub fn with_listed<'a>(
        policy: Policy,
        listed: impl IntoIterator<Item = (&'a str, &'a [(usize, u32, u32)])>,
    ) -> Self {
        let policy = Arc::new(policy);
        let ranks = Arc::new(Ranks::of(&policy, &[]));
        let listed: HashMap<Arc<str>, Arc<Ranks>, FnvBuild> = listed
            .into_iter()
            .map(|(name, overrides)| {
                let own = if overrides.is_empty() {
                    ranks.clone()
                } else {
                    Arc::new(Ranks::of(&policy, overrides))
                };
                (Arc::from(name), own)
            })
            .collect();
        let by_name = listed
            .iter()
            .map(|(n, r)| {
                let t = Table::new(n.clone(), policy.clone(), r.clone());
                (n.clone(), Arc::new(t))
            })
            .collect();
        Self {
            overflow: Arc::new(Table::new(Arc::from("*"), policy.clone(), ranks.clone())),
            ranks,
            policy,
            tables: RwLock::new(Tables {
                by_name,
                unlisted: 0,
            }),
            listed,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Drains (no new requests) or re-enables a backend, in every deployment.
    pub fn set_drained(&self, idx: usize, drained: bool) -> bool {
        match self.policy.drained.get(idx) {
            Some(d) => {
                d.store(drained, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The state table for a deployment (the key health is tracked under).
    pub fn table(&self, deployment: &str) -> Arc<Table> {
        if let Some(t) = read(&self.tables).by_name.get(deployment) {
            return t.clone();
        }
        let mut tables = write(&self.tables);
        if let Some(t) = tables.by_name.get(deployment) {
            return t.clone();
        }
        // Listed names have theirs from the start: this one is not listed.
        if tables.unlisted >= MAX_TABLES {
            return self.overflow.clone();
        }
        tables.unlisted += 1;
        let name: Arc<str> = Arc::from(deployment);
        let t = Arc::new(Table::new(
            name.clone(),
            self.policy.clone(),
            self.ranks.clone(),
        ));
        tables.by_name.insert(name, t.clone());
        t
    }

    /// Takes over what `old` learned, after a reload: `map[i]` is the new index of the old
    /// backend `i` when it is unchanged. Its health, latency, headroom, in-flight count and
    /// drained flag carry over; leases taken from `old` end in the new tables from now on.
    pub fn inherit(&self, old: &Balancer, map: &[Option<usize>]) {
        for (i, d) in old.policy.drained.iter().enumerate() {
            if let Some(Some(j)) = map.get(i)
                && let Some(nd) = self.policy.drained.get(*j)
            {
                nd.store(d.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        let map: Arc<[Option<usize>]> = Arc::from(map);
        let old_tables: Vec<Arc<Table>> = read(&old.tables).by_name.values().cloned().collect();
        let mut tables = write(&self.tables);
        for ot in old_tables {
            let ranks = match self.listed.get(&ot.name) {
                Some(r) => r.clone(),
                None if tables.unlisted >= MAX_TABLES => continue,
                None => {
                    tables.unlisted += 1;
                    self.ranks.clone()
                }
            };
            let nt = Arc::new(Table::new(ot.name.clone(), self.policy.clone(), ranks));
            {
                // Old before new, always: a lease ending on the old table locks in that order.
                let mut os = lock(&ot.state);
                let mut ns = lock(&nt.state);
                for (i, pair) in os.pairs.iter().enumerate() {
                    if let Some(Some(j)) = map.get(i)
                        && let Some(slot) = ns.pairs.get_mut(*j)
                    {
                        *slot = pair.clone();
                    }
                }
                os.successor = Some((nt.clone(), map.clone()));
            }
            tables.by_name.insert(ot.name.clone(), nt);
        }
    }

    /// Whether `deployment` has a table of its own (is within the tracked set).
    pub fn tracks(&self, deployment: &str) -> bool {
        read(&self.tables).by_name.contains_key(deployment)
    }

    /// Every deployment table, for status views.
    pub fn tables(&self) -> Vec<Arc<Table>> {
        read(&self.tables).by_name.values().cloned().collect()
    }
}

impl Table {
    fn new(name: Arc<str>, policy: Arc<Policy>, ranks: Arc<Ranks>) -> Self {
        let n = policy.priority.len();
        // Seeded from the name so runs repeat; only `latency`'s coin flips use it.
        let seed = name
            .bytes()
            .fold(0x5eed_u64, |h, b| h.rotate_left(5) ^ u64::from(b));
        Self {
            name,
            policy,
            ranks,
            state: Mutex::new(TableState {
                pairs: (0..n).map(|_| Pair::default()).collect(),
                rr: vec![0; MAX_PRIORITY + 1],
                rng: SplitMix64::new(seed),
                successor: None,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Each backend's priority and weight for this deployment.
    pub fn ranks(&self) -> &Ranks {
        &self.ranks
    }

    /// Chooses a backend among `candidates` (backend indices). Backends marked in `tried` are
    /// taken only when no other candidate can take the attempt.
    pub fn pick(self: &Arc<Self>, candidates: &[usize], tried: &[bool], now: Instant) -> Pick {
        let policy = &self.policy;
        let ranks = &*self.ranks;
        let mut st = lock(&self.state);
        let n = st.pairs.len();
        let usable = |c: usize| c < n && !policy.is_drained(c);
        // The group to choose from is built in place, on the stack for any usual pool size:
        // this runs for every attempt.
        let mut stack = [0usize; SCRATCH];
        let mut heap = Vec::new();
        let buf = scratch(&mut stack, &mut heap, candidates.len());
        let mut len = 0;
        let mut untried = false;
        // Backends that said they cannot serve this deployment are asked only when no other
        // can: so the client still gets a real answer, and they are checked again.
        let fits = |pair: &Pair| pair.misfit.as_ref().is_none_or(|(_, until)| *until <= now);
        let mut misfits = 0;
        for &c in candidates {
            if usable(c) && st.pairs[c].health.availability(now) == Availability::Ready {
                if !fits(&st.pairs[c]) {
                    misfits += 1;
                    continue;
                }
                buf[len] = c;
                len += 1;
                untried |= !tried.get(c).copied().unwrap_or(false);
            }
        }
        if len == 0 && misfits > 0 {
            for &c in candidates {
                if usable(c) && st.pairs[c].health.availability(now) == Availability::Ready {
                    buf[len] = c;
                    len += 1;
                    untried |= !tried.get(c).copied().unwrap_or(false);
                }
            }
        }
        if untried {
            len = retain(&mut buf[..len], |c| !tried.get(c).copied().unwrap_or(false));
        }
        let Some(best) = buf[..len].iter().map(|&c| ranks.priority[c]).min() else {
            // Nothing ready: what each is waiting for (asked again at the same instant, so
            // the answers are the ones above).
            let avail: Vec<(usize, Availability)> = candidates
                .iter()
                .filter(|&&c| usable(c))
                .map(|&c| (c, st.pairs[c].health.availability(now)))
                .collect();
            return exhausted(&avail);
        };
        let len = retain(&mut buf[..len], |c| ranks.priority[c] == best);
        let group = &buf[..len];
        let idx = st.choose(policy, ranks, candidates, group, now);
        let pair = &mut st.pairs[idx];
        pair.in_flight += 1;
        let probe = pair.health.begin();
        let expected_ttfb = pair.ttfb.get().map(Duration::from_secs_f64);
        Pick::Chosen(Lease {
            table: self.clone(),
            idx,
            pre_reload: st.successor.is_none(),
            probe,
            reported: false,
            expected_ttfb,
        })
    }

    /// A cooldown another replica learned (through the shared store).
    pub fn remote_cooldown(&self, idx: usize, wait: Duration, now: Instant) {
        if let Some(pair) = lock(&self.state).pairs.get_mut(idx) {
            pair.health.cool_until(now + wait);
        }
    }

    /// A snapshot of one backend's state in this table, for status views and tests.
    pub fn status(&self, idx: usize, now: Instant) -> Option<PairStatus> {
        let mut st = lock(&self.state);
        let pair = st.pairs.get_mut(idx)?;
        Some(PairStatus {
            availability: pair.health.availability(now),
            misfit: pair
                .misfit
                .as_ref()
                .filter(|(_, until)| *until > now)
                .map(|(m, _)| m.clone()),
            circuit: pair.health.state(),
            in_flight: pair.in_flight,
            ttfb_ewma: pair.ttfb.get().map(Duration::from_secs_f64),
            room: pair.headroom.room(now, 0),
        })
    }
}

/// A backend's state in one deployment table.
#[derive(Debug, Clone)]
pub struct PairStatus {
    pub availability: Availability,
    /// Why the backend cannot serve this deployment, while it is passed over for it.
    pub misfit: Option<Misfit>,
    pub circuit: CircuitState,
    pub in_flight: u32,
    pub ttfb_ewma: Option<Duration>,
    pub room: f64,
}

/// Pools up to this size are picked from without an allocation.
pub const SCRATCH: usize = 16;

/// `len` slots to work in, each `T::default()` at first: on the stack when they fit, else in
/// `heap`. For per-request lists sized by the backends, which rarely exceed a few.
pub fn scratch<'a, T: Copy + Default>(
    stack: &'a mut [T; SCRATCH],
    heap: &'a mut Vec<T>,
    len: usize,
) -> &'a mut [T] {
    if len <= SCRATCH {
        &mut stack[..len]
    } else {
        heap.resize(len, T::default());
        heap
    }
}

/// Keeps the items of `items` that pass `keep`, in order, at its front; returns how many.
fn retain(items: &mut [usize], keep: impl Fn(usize) -> bool) -> usize {
    let mut kept = 0;
    for i in 0..items.len() {
        if keep(items[i]) {
            items[kept] = items[i];
            kept += 1;
        }
    }
    kept
}

fn exhausted(avail: &[(usize, Availability)]) -> Pick {
    let cooling = avail
        .iter()
        .filter_map(|(_, a)| match a {
            Availability::Cooling(d) => Some(*d),
            _ => None,
        })
        .min();
    let open = avail
        .iter()
        .filter_map(|(_, a)| match a {
            Availability::Open(d) => Some(*d),
            _ => None,
        })
        .min();
    match cooling {
        Some(c) => Pick::Throttled {
            retry_after: open.map_or(c, |o| o.min(c)),
        },
        None => Pick::Unavailable { retry_after: open },
    }
}

impl TableState {
    /// The strategy's choice inside `group` (non-empty, all ready, one priority).
    fn choose(
        &mut self,
        policy: &Policy,
        ranks: &Ranks,
        candidates: &[usize],
        group: &[usize],
        now: Instant,
    ) -> usize {
        let level = (ranks.priority[group[0]] as usize).min(MAX_PRIORITY);
        let rr = self.rr[level];
        if group.len() == 1 {
            // Keep the rotation moving so round-robin stays fair once the others return.
            self.rr[level] = rr.wrapping_add(1);
            return group[0];
        }
        // Group members in rotation order, starting at the group's shared position: ties in
        // every strategy go to the earliest in this order, so equal backends take turns.
        let n = candidates.len();
        let mut stack = [0usize; SCRATCH];
        let mut heap = Vec::new();
        let buf = scratch(&mut stack, &mut heap, n);
        let mut len = 0;
        for k in 0..n {
            let c = candidates[(rr + k) % n];
            if group.contains(&c) {
                buf[len] = c;
                len += 1;
            }
        }
        let rotation = &buf[..len];
        let chosen = match policy.strategy {
            Strategy::RoundRobin => rotation[0],
            Strategy::Weighted => {
                let total: i64 = group.iter().map(|&c| i64::from(ranks.weight[c])).sum();
                for &c in group {
                    self.pairs[c].wrr += i64::from(ranks.weight[c]);
                }
                let best = rotation
                    .iter()
                    .copied()
                    .reduce(|a, b| {
                        if self.pairs[b].wrr > self.pairs[a].wrr {
                            b
                        } else {
                            a
                        }
                    })
                    .unwrap_or(rotation[0]);
                self.pairs[best].wrr -= total;
                best
            }
            Strategy::LeastInflight => rotation
                .iter()
                .copied()
                .reduce(|a, b| {
                    // in_flight / weight, compared without division.
                    let la = u64::from(self.pairs[a].in_flight) * u64::from(ranks.weight[b]);
                    let lb = u64::from(self.pairs[b].in_flight) * u64::from(ranks.weight[a]);
                    if lb < la { b } else { a }
                })
                .unwrap_or(rotation[0]),
            Strategy::Latency => {
                let i = (self.rng.next_u64() % rotation.len() as u64) as usize;
                let mut j = (self.rng.next_u64() % (rotation.len() as u64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                let (a, b) = (rotation[i], rotation[j]);
                // A backend not measured yet is assumed as fast as the group's average, so it
                // gets tried, but its in-flight requests still count: costing it zero would send
                // it every request until its first answer came back.
                let known: Vec<f64> = group
                    .iter()
                    .filter_map(|&c| self.pairs[c].ttfb.get())
                    .collect();
                let prior = if known.is_empty() {
                    0.001
                } else {
                    known.iter().sum::<f64>() / known.len() as f64
                };
                let cost = |c: usize| {
                    let p = &self.pairs[c];
                    p.ttfb.get().unwrap_or(prior) * f64::from(p.in_flight + 1)
                        / f64::from(ranks.weight[c])
                };
                if cost(b) < cost(a) { b } else { a }
            }
            Strategy::Headroom => rotation
                .iter()
                .copied()
                .reduce(|a, b| {
                    let ra = self.pairs[a].headroom.room(now, self.pairs[a].in_flight);
                    let rb = self.pairs[b].headroom.room(now, self.pairs[b].in_flight);
                    if rb > ra + 1e-9 { b } else { a }
                })
                .unwrap_or(rotation[0]),
        };
        // Move the rotation just past the chosen backend.
        if let Some(pos) = (0..n).find(|k| candidates[(rr + k) % n] == chosen) {
            self.rr[level] = rr.wrapping_add(pos + 1);
        }
        chosen
    }
}
