//! The live status page's data: a sampler turns each backend's running totals into a short
//! history (a point every [`SAMPLE_EVERY`], ten minutes kept) that `GET /admin/status` serves
//! with the backends' current state. The page itself is one embedded file, no external assets.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::live::{GatewayState, Snapshot};
use crate::sync::lock;
use crate::telemetry::BackendStats;

/// The page served at the admin listener's `/`.
pub const PAGE: &str = include_str!("status.html");
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Points kept per backend: ten minutes.
const KEEP: usize = 300;
/// Points in the "last minute" figures.
const MINUTE: usize = (60 / SAMPLE_EVERY.as_secs()) as usize;

/// One backend over one sample interval.
#[derive(Debug, Clone, Copy, Default)]
struct Point {
    /// End of the interval, Unix milliseconds.
    t: u64,
    requests: u64,
    throttled: u64,
    failed: u64,
    tokens: u64,
    /// Mean time to first byte of the requests served in the interval.
    latency_ms: Option<f64>,
    in_flight: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    served: u64,
    throttled: u64,
    failed: u64,
    tokens: u64,
    ttfb_us: u64,
    ttfb_count: u64,
}

impl Totals {
    fn read(s: &BackendStats) -> Self {
        Self {
            served: BackendStats::get(&s.served),
            throttled: BackendStats::get(&s.throttled),
            failed: BackendStats::get(&s.failed),
            tokens: BackendStats::get(&s.tokens),
            ttfb_us: BackendStats::get(&s.ttfb_us),
            ttfb_count: BackendStats::get(&s.ttfb_count),
        }
    }
}

#[derive(Default)]
struct Series {
    last: Totals,
    points: VecDeque<Point>,
}

impl Series {
    /// Adds the point for what the totals gained since the previous one.
    fn add(&mut self, now: Totals, t: u64, in_flight: u32) {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let count = d(now.ttfb_count, self.last.ttfb_count);
        let point = Point {
            t,
            requests: d(now.served, self.last.served),
            throttled: d(now.throttled, self.last.throttled),
            failed: d(now.failed, self.last.failed),
            tokens: d(now.tokens, self.last.tokens),
            latency_ms: (count > 0)
                .then(|| d(now.ttfb_us, self.last.ttfb_us) as f64 / count as f64 / 1000.0),
            in_flight,
        };
        self.last = now;
        if self.points.len() == KEEP {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }
}

/// Every backend's recent history, by name.
#[derive(Default)]
pub struct History {
    series: Mutex<HashMap<Arc<str>, Series>>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl History {
    /// Adds a point per backend of `rt`: what happened since the previous sample.
    pub fn sample(&self, rt: &Snapshot, now: SystemTime) {
        let tables = rt.proxy.balancer().tables();
        let clock = tokio::time::Instant::now();
        let backends = rt.proxy.backends.iter().enumerate().map(|(idx, b)| {
            let in_flight = tables
                .iter()
                .filter_map(|tb| tb.status(idx, clock))
                .map(|st| st.in_flight)
                .sum();
            (b.name.clone(), Totals::read(&b.stats), in_flight)
        });
        self.record(unix_ms(now), backends.collect());
    }

    /// Adds a point per backend, from its totals now and its requests in flight, at `t`.
    fn record(&self, t: u64, backends: Vec<(Arc<str>, Totals, u32)>) {
        let mut series = lock(&self.series);
        // Backends a reload removed leave the page with their history.
        series.retain(|name, _| backends.iter().any(|(n, ..)| n == name));
        for (name, totals, in_flight) in backends {
            // A new series starts from zero, not from the totals as they are now: the first
            // tick can come after the first requests (on a busy machine, the sampler's task
            // started after the listener had served some), and those belong in the first point.
            series.entry(name).or_default().add(totals, t, in_flight);
        }
    }

    /// A backend's last minute and its whole kept series, as the page reads them.
    pub fn backend_json(&self, name: &str) -> Value {
        let series = lock(&self.series);
        let Some(s) = series.get(name) else {
            return json!({"minute": null, "series": null});
        };
        let recent: Vec<&Point> = s.points.iter().rev().take(MINUTE).collect();
        let sum = |f: fn(&Point) -> u64| recent.iter().map(|p| f(p)).sum::<u64>();
        let timed: Vec<(f64, u64)> = recent
            .iter()
            .filter_map(|p| p.latency_ms.map(|l| (l, p.requests)))
            .collect();
        let weight: u64 = timed.iter().map(|(_, n)| n).sum();
        let latency = (weight > 0)
            .then(|| timed.iter().map(|(l, n)| l * *n as f64).sum::<f64>() / weight as f64);
        json!({
            "minute": {
                "requests": sum(|p| p.requests),
                "throttled": sum(|p| p.throttled),
                "failed": sum(|p| p.failed),
                "tokens": sum(|p| p.tokens),
                "latency_ms": latency,
            },
            "series": {
                "t": s.points.iter().map(|p| p.t).collect::<Vec<_>>(),
                "requests": s.points.iter().map(|p| p.requests).collect::<Vec<_>>(),
                "throttled": s.points.iter().map(|p| p.throttled).collect::<Vec<_>>(),
                "failed": s.points.iter().map(|p| p.failed).collect::<Vec<_>>(),
                "tokens": s.points.iter().map(|p| p.tokens).collect::<Vec<_>>(),
                "latency_ms": s.points.iter().map(|p| p.latency_ms).collect::<Vec<_>>(),
                "in_flight": s.points.iter().map(|p| p.in_flight).collect::<Vec<_>>(),
            },
        })
    }
}

/// Samples every [`SAMPLE_EVERY`] until shutdown.
pub async fn run(history: Arc<History>, state: Arc<GatewayState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => history.sample(&state.snapshot(), SystemTime::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(n: u64) -> Totals {
        Totals {
            served: n,
            ttfb_us: n * 2_000,
            ttfb_count: n,
            ..Totals::default()
        }
    }

    fn requests(h: &History, name: &str) -> Vec<u64> {
        lock(&h.series)
            .get(name)
            .map(|s| s.points.iter().map(|p| p.requests).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_first_point_counts_what_was_served_before_the_first_sample() {
        let h = History::default();
        let a: Arc<str> = Arc::from("a");
        // The sampler's first tick came after three requests had been served.
        h.record(1, vec![(a.clone(), served(3), 0)]);
        h.record(2, vec![(a.clone(), served(5), 1)]);
        assert_eq!(requests(&h, "a"), [3, 2]);
        let series = lock(&h.series);
        let second = series["a"].points[1];
        assert_eq!(second.latency_ms, Some(2.0));
        assert_eq!(second.in_flight, 1);
    }

    #[test]
    fn a_backend_a_reload_removed_leaves_with_its_history() {
        let h = History::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        h.record(
            1,
            vec![(a.clone(), served(1), 0), (b.clone(), served(2), 0)],
        );
        h.record(2, vec![(b.clone(), served(4), 0)]);
        assert_eq!(requests(&h, "a"), Vec::<u64>::new());
        assert_eq!(requests(&h, "b"), [2, 2]);
    }

    #[test]
    fn a_series_keeps_ten_minutes() {
        let mut s = Series::default();
        for i in 0..KEEP as u64 + 5 {
            s.add(served(i), i, 0);
        }
        assert_eq!(s.points.len(), KEEP);
        assert_eq!(s.points.front().map(|p| p.t), Some(5));
    }
}
