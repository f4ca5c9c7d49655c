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

/// One (consumer, deployment) pair's hours, oldest first.
#[derive(Debug)]
pub struct Cell {
    consumer: Arc<str>,
    deployment: Arc<str>,
    hours: Mutex<VecDeque<(Hour, Tally)>>,
}

impl Cell {
    fn add(&self, hour: Hour, t: &Tally, keep_from: Hour) {
        let mut hours = lock(&self.hours);
        match hours.iter_mut().rev().find(|(h, _)| *h <= hour) {
            Some((h, sum)) if *h == hour => sum.add(t),
            _ => {
                // Hours come in order, but for figures put back after a failed write (or a
                // clock set back): kept in order all the same.
                let at = hours.partition_point(|(h, _)| *h < hour);
                hours.insert(at, (hour, *t));
                while hours.front().is_some_and(|(h, _)| *h < keep_from) {
                    hours.pop_front();
                }
            }
        }
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
            .or_insert_with(|| {
                Arc::new(Cell {
                    consumer,
                    deployment,
                    hours: Mutex::new(VecDeque::new()),
                })
            })
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
        let mut out = Vec::new();
        for cell in self.cells() {
            let hours = lock(&cell.hours);
            out.extend(hours.iter().filter(|(h, _)| (from..to).contains(h)).map(
                |(hour, tally)| Entry {
                    hour: *hour,
                    consumer: cell.consumer.clone(),
                    deployment: cell.deployment.clone(),
                    tally: *tally,
                },
            ));
        }
        out
    }

    /// Takes every figure held, to be written to the shared store.
    pub fn drain(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for cell in self.cells() {
            let hours = std::mem::take(&mut *lock(&cell.hours));
            out.extend(hours.into_iter().map(|(hour, tally)| Entry {
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
        // A request that started in hour 11 and ended after one of hour 12.
        l.record(&c, 11, &Tally::request(Some(&used(2, 2)), 4));
        let hours: Vec<(Hour, u64)> = l
            .entries(0, 100)
            .iter()
            .map(|e| (e.hour, e.tally.requests))
            .collect();
        let mut sorted = hours.clone();
        sorted.sort();
        assert_eq!(sorted, [(10, 2), (11, 1), (12, 1)]);
        assert_eq!(
            lock(&c.hours).iter().map(|(h, _)| *h).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        // Hour 13 starts: three hours kept, so hour 10 goes.
        l.record(&c, 13, &Tally::request(None, 0));
        assert_eq!(
            lock(&c.hours).iter().map(|(h, _)| *h).collect::<Vec<_>>(),
            [11, 12, 13]
        );
        assert_eq!(l.entries(11, 13).len(), 2);
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
