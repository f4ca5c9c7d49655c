//! The usage ledger: requests, each token kind and cost, by consumer, deployment and UTC hour,
//! for chargeback (`GET /admin/usage`) and the status page's consumers view.
//!
//! Each (consumer, deployment) pair has a cell that the request's counters hold, so recording
//! a request is one uncontended lock and a few additions: no map lookup on the request path.
//! Kept in memory, a cell holds its hours for `usage.retention`; with the limits in Redis, a
//! cell holds only what is not yet written there, and the limits store's background task
//! moves it into Redis every few seconds (and once more on shutdown), where every replica's
//! figures add up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::sync::lock;

use super::Usage;

/// An hour, counted from the Unix epoch.
pub type Hour = u64;

/// A cost as whole billionths of the currency.
pub fn nanos(cost: f64) -> u64 {
    (cost * 1e9).round().max(0.0) as u64
}

/// The hour `t` falls in.
pub fn hour_of(t: SystemTime) -> Hour {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
}

/// What some requests used. Cost is in whole billionths of the currency, so that figures from
/// many replicas add up exactly, and a request of a few tokens is not rounded to nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub audio_tokens: u64,
    pub cost_nanos: u64,
}

impl Tally {
    /// The field names, as the report and the shared store spell them, in [`Tally::values`]
    /// order.
    pub const FIELDS: [&'static str; 7] = [
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "audio_tokens",
        "cost_nanos",
    ];

    /// One request, with what it used when its answer said.
    pub fn request(usage: Option<&Usage>, cost_nanos: u64) -> Self {
        let u = usage.copied().unwrap_or_default();
        Self {
            requests: 1,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
            reasoning_tokens: u.reasoning_tokens,
            audio_tokens: u.audio_tokens,
            cost_nanos,
        }
    }

    pub fn values(&self) -> [u64; 7] {
        [
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            self.audio_tokens,
            self.cost_nanos,
        ]
    }

    /// Sets the field named `name` (one of [`Tally::FIELDS`]) to `v`; false for another name.
    pub fn set(&mut self, name: &str, v: u64) -> bool {
        let slot = match name {
            "requests" => &mut self.requests,
            "prompt_tokens" => &mut self.prompt_tokens,
            "completion_tokens" => &mut self.completion_tokens,
            "cached_tokens" => &mut self.cached_tokens,
            "reasoning_tokens" => &mut self.reasoning_tokens,
            "audio_tokens" => &mut self.audio_tokens,
            "cost_nanos" => &mut self.cost_nanos,
            _ => return false,
        };
        *slot = v;
        true
    }

    pub fn add(&mut self, o: &Tally) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cached_tokens += o.cached_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.audio_tokens += o.audio_tokens;
        self.cost_nanos += o.cost_nanos;
    }

    /// Prompt and completion tokens together (cached, reasoning and audio are parts of them).
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn cost(&self) -> f64 {
        self.cost_nanos as f64 / 1e9
    }
}

/// One consumer's use of one deployment in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub hour: Hour,
    pub consumer: Arc<str>,
    pub deployment: Arc<str>,
    pub tally: Tally,
}

/// No hour counted yet.
const NO_HOUR: u64 = u64::MAX;

/// One (consumer, deployment) pair's figures: the live hour's in atomic counters, which the
/// request path adds to without a lock (every replica's busiest label set is one cell, shared
/// by all its threads), and the hours before it, oldest first.
#[derive(Debug)]
pub struct Cell {
    consumer: Arc<str>,
    deployment: Arc<str>,
    /// The hour `live` counts, or [`NO_HOUR`].
    current: AtomicU64,
    /// The live hour's figures, in [`Tally::values`] order.
    live: [AtomicU64; 7],
    hours: Mutex<VecDeque<(Hour, Tally)>>,
}

impl Cell {
    fn new(consumer: Arc<str>, deployment: Arc<str>) -> Self {
        Self {
            consumer,
            deployment,
            current: AtomicU64::new(NO_HOUR),
            live: Default::default(),
            hours: Mutex::new(VecDeque::new()),
        }
    }

    fn add_live(&self, t: &Tally) {
        for (c, v) in self.live.iter().zip(t.values()) {
            if v > 0 {
                c.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// The live figures, left counting (`take`: taken, left at zero).
    fn live(&self, take: bool) -> Tally {
        let mut t = Tally::default();
        for (name, c) in Tally::FIELDS.iter().zip(&self.live) {
            let v = if take {
                c.swap(0, Ordering::Relaxed)
            } else {
                c.load(Ordering::Relaxed)
            };
            t.set(name, v);
        }
        t
    }

    /// Counts `t` at `hour`. A request of the live hour only adds to atomic counters; the first
    /// of a new hour closes the live one under the lock. One that finishes as another turns the
    /// hour may be counted in the new hour: nothing is lost.
    fn add(&self, hour: Hour, t: &Tally, keep_from: Hour) {
        if self.current.load(Ordering::Acquire) == hour {
            self.add_live(t);
            return;
        }
        let mut hours = lock(&self.hours);
        let current = self.current.load(Ordering::Acquire);
        if current == hour {
            self.add_live(t);
        } else if current == NO_HOUR || hour > current {
            if current != NO_HOUR {
                let closed = self.live(true);
                if closed != Tally::default() {
                    insert(&mut hours, current, &closed);
                }
            }
            self.add_live(t);
            self.current.store(hour, Ordering::Release);
            while hours.front().is_some_and(|(h, _)| *h < keep_from) {
                hours.pop_front();
            }
        } else {
            // An hour before the live one: figures put back after a failed write, or a clock
            // set back.
            insert(&mut hours, hour, t);
        }
    }
}

/// Adds `t` to `hour` in `hours`, kept in order.
fn insert(hours: &mut VecDeque<(Hour, Tally)>, hour: Hour, t: &Tally) {
    let at = hours.partition_point(|(h, _)| *h < hour);
    match hours.get_mut(at) {
        Some((h, sum)) if *h == hour => sum.add(t),
        _ => hours.insert(at, (hour, *t)),
    }
}

/// A consumer and a deployment.
type Pair = (Arc<str>, Arc<str>);

/// Every cell, and how long their hours are kept.
#[derive(Debug)]
pub struct Ledger {
    cells: Mutex<HashMap<Pair, Arc<Cell>>>,
    retention_hours: AtomicU64,
    /// Whether a shared store keeps the figures (the cells only buffer them).
    shared: AtomicBool,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            cells: Mutex::new(HashMap::new()),
            retention_hours: AtomicU64::new(35 * 24),
            shared: AtomicBool::new(false),
        }
    }
}

impl Ledger {
    /// The cell of `consumer`'s use of `deployment`, made on first use.
    pub fn cell(&self, consumer: &str, deployment: &str) -> Arc<Cell> {
        // Made once per label set: the request's counters keep it.
        let (consumer, deployment): (Arc<str>, Arc<str>) = (consumer.into(), deployment.into());
        lock(&self.cells)
            .entry((consumer.clone(), deployment.clone()))
            .or_insert_with(|| Arc::new(Cell::new(consumer, deployment)))
            .clone()
    }

    pub fn set_retention(&self, retention: Duration) {
        let hours = retention.as_secs().div_ceil(3600).max(1);
        self.retention_hours.store(hours, Ordering::Relaxed);
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours.load(Ordering::Relaxed) * 3600)
    }

    /// From now on the figures are kept in a shared store: cells buffer them until
    /// [`Ledger::drain`] takes them there.
    pub fn set_shared(&self) {
        self.shared.store(true, Ordering::Relaxed);
    }

    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    /// Counts one request in `cell` at `hour`.
    pub fn record(&self, cell: &Cell, hour: Hour, t: &Tally) {
        // What a shared store keeps is drained every few seconds: nothing ages out here.
        let keep_from = if self.is_shared() {
            0
        } else {
            hour.saturating_sub(self.retention_hours.load(Ordering::Relaxed) - 1)
        };
        cell.add(hour, t, keep_from);
    }

    fn cells(&self) -> Vec<Arc<Cell>> {
        lock(&self.cells).values().cloned().collect()
    }

    /// Every figure held from `from` up to (not including) `to`.
    pub fn entries(&self, from: Hour, to: Hour) -> Vec<Entry> {
        self.collect(false)
            .into_iter()
            .filter(|e| (from..to).contains(&e.hour))
            .collect()
    }

    /// Takes every figure held, to be written to the shared store.
    pub fn drain(&self) -> Vec<Entry> {
        self.collect(true)
    }

    /// Every cell's hours and live hour (`take`: taken, the cells left empty).
    fn collect(&self, take: bool) -> Vec<Entry> {
        let mut out = Vec::new();
        for cell in self.cells() {
            let mut hours = lock(&cell.hours);
            let closed = if take {
                std::mem::take(&mut *hours)
            } else {
                hours.clone()
            };
            let current = cell.current.load(Ordering::Acquire);
            let live = (current != NO_HOUR)
                .then(|| (current, cell.live(take)))
                .filter(|(_, t)| *t != Tally::default());
            drop(hours);
            out.extend(closed.into_iter().chain(live).map(|(hour, tally)| Entry {
                hour,
                consumer: cell.consumer.clone(),
                deployment: cell.deployment.clone(),
                tally,
            }));
        }
        out
    }

    /// Puts back figures [`Ledger::drain`] took that could not be written.
    pub fn restore(&self, entries: Vec<Entry>) {
        for e in entries {
            self.cell(&e.consumer, &e.deployment)
                .add(e.hour, &e.tally, 0);
        }
    }
}

/// What a report adds up by: consumer, deployment, both or neither, and by hour or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grouping {
    pub consumer: bool,
    pub deployment: bool,
    pub hour: bool,
}

/// One line of a report: the group's key (what the grouping leaves out is `None`) and its sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub hour: Option<Hour>,
    pub consumer: Option<Arc<str>>,
    pub deployment: Option<Arc<str>>,
    pub tally: Tally,
}

/// Adds `entries` up by `grouping`, in order of hour, consumer and deployment.
pub fn group(entries: &[Entry], grouping: Grouping) -> Vec<Line> {
    type Key = (Option<Hour>, Option<Arc<str>>, Option<Arc<str>>);
    let mut sums: BTreeMap<Key, Tally> = BTreeMap::new();
    for e in entries {
        let key = (
            grouping.hour.then_some(e.hour),
            grouping.consumer.then(|| e.consumer.clone()),
            grouping.deployment.then(|| e.deployment.clone()),
        );
        sums.entry(key).or_default().add(&e.tally);
    }
    sums.into_iter()
        .map(|((hour, consumer, deployment), tally)| Line {
            hour,
            consumer,
            deployment,
            tally,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            ..Default::default()
        }
    }

    #[test]
    fn hours_are_kept_for_the_retention_and_in_order() {
        let l = Ledger::default();
        l.set_retention(Duration::from_secs(3 * 3600));
        let c = l.cell("alice", "gpt-4o");
        assert!(Arc::ptr_eq(&c, &l.cell("alice", "gpt-4o")));
        l.record(&c, 10, &Tally::request(Some(&used(5, 1)), 20));
        l.record(&c, 10, &Tally::request(None, 0));
        l.record(&c, 12, &Tally::request(Some(&used(1, 1)), 3));
        // Figures of hour 11 put back after one of hour 12 was counted.
        l.record(&c, 11, &Tally::request(Some(&used(2, 2)), 4));
        let hours: Vec<(Hour, u64)> = l
            .entries(0, 100)
            .iter()
            .map(|e| (e.hour, e.tally.requests))
            .collect();
        let mut sorted = hours.clone();
        sorted.sort();
        assert_eq!(sorted, [(10, 2), (11, 1), (12, 1)]);
        assert_eq!(hours, [(10, 2), (11, 1), (12, 1)], "in order");
        // Hour 13 starts: three hours kept, so hour 10 goes.
        l.record(&c, 13, &Tally::request(None, 0));
        let kept: Vec<Hour> = l.entries(0, 100).iter().map(|e| e.hour).collect();
        assert_eq!(kept, [11, 12, 13]);
        assert_eq!(l.entries(11, 13).len(), 2);
    }

    #[test]
    fn threads_counting_while_figures_are_drained_lose_nothing() {
        let l = Ledger::default();
        l.set_shared();
        let c = l.cell("alice", "gpt-4o");
        let mut drained = Vec::new();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (l, c) = (&l, &c);
                s.spawn(move || {
                    for i in 0..5_000u64 {
                        // The hour turns half-way through.
                        let hour = 100 + u64::from(i >= 2_500);
                        l.record(c, hour, &Tally::request(Some(&used(t + 1, 1)), 7));
                    }
                });
            }
            for _ in 0..50 {
                drained.extend(l.drain());
            }
        });
        drained.extend(l.drain());
        let mut total = Tally::default();
        for e in &drained {
            total.add(&e.tally);
        }
        assert_eq!(total.requests, 20_000);
        assert_eq!(total.prompt_tokens, 5_000 * (1 + 2 + 3 + 4));
        assert_eq!(total.cost_nanos, 20_000 * 7);
        assert!(drained.iter().all(|e| e.hour == 100 || e.hour == 101));
    }

    #[test]
    fn a_shared_ledger_drains_and_takes_back_what_could_not_be_written() {
        let l = Ledger::default();
        l.set_shared();
        let a = l.cell("alice", "gpt-4o");
        let b = l.cell("bob", "-");
        l.record(&a, 7, &Tally::request(Some(&used(3, 4)), 9));
        l.record(&b, 7, &Tally::request(None, 0));
        let mut taken = l.drain();
        taken.sort_by_key(|e| e.consumer.clone());
        assert_eq!(taken.len(), 2);
        assert!(l.entries(0, 100).is_empty());
        l.record(&a, 8, &Tally::request(Some(&used(1, 0)), 1));
        l.restore(taken);
        let mut back = l.entries(0, 100);
        back.sort_by_key(|e| (e.consumer.clone(), e.hour));
        let seen: Vec<(&str, Hour, u64, u64)> = back
            .iter()
            .map(|e| {
                (
                    &*e.consumer,
                    e.hour,
                    e.tally.prompt_tokens,
                    e.tally.cost_nanos,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("alice", 7, 3, 9), ("alice", 8, 1, 1), ("bob", 7, 0, 0)]
        );
    }

    #[test]
    fn a_report_adds_up_by_what_it_is_grouped_by() {
        let e = |hour, consumer: &str, deployment: &str, prompt| Entry {
            hour,
            consumer: consumer.into(),
            deployment: deployment.into(),
            tally: Tally::request(Some(&used(prompt, 1)), prompt),
        };
        let entries = [
            e(1, "a", "x", 10),
            e(1, "b", "x", 20),
            e(2, "a", "y", 30),
            e(2, "a", "x", 40),
        ];
        let by_consumer = group(
            &entries,
            Grouping {
                consumer: true,
                ..Grouping::default()
            },
        );
        let seen: Vec<(Option<&str>, u64, u64)> = by_consumer
            .iter()
            .map(|l| {
                (
                    l.consumer.as_deref(),
                    l.tally.requests,
                    l.tally.prompt_tokens,
                )
            })
            .collect();
        assert_eq!(seen, [(Some("a"), 3, 80), (Some("b"), 1, 20)]);
        let hourly = group(
            &entries,
            Grouping {
                deployment: true,
                hour: true,
                ..Grouping::default()
            },
        );
        let seen: Vec<(Option<Hour>, Option<&str>, u64)> = hourly
            .iter()
            .map(|l| (l.hour, l.deployment.as_deref(), l.tally.cost_nanos))
            .collect();
        assert_eq!(
            seen,
            [
                (Some(1), Some("x"), 30),
                (Some(2), Some("x"), 40),
                (Some(2), Some("y"), 30)
            ]
        );
        let all = group(&entries, Grouping::default());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].tally.tokens(), 104);
    }
}
