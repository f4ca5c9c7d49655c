//! Load signals a strategy reads: a peak-EWMA of time to first byte, and the room a backend
//! reported left in its own rate limit.

use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

/// How fast old latency samples fade.
const EWMA_TAU: Duration = Duration::from_secs(10);

/// Peak-sensitive moving average (as linkerd's): a slower sample takes over at once, faster
/// ones pull the value down gradually, so a backend that slows down is avoided quickly and
/// earns traffic back slowly.
#[derive(Debug, Default, Clone, Copy)]
pub struct PeakEwma {
    value: Option<f64>,
    stamp: Option<Instant>,
}

impl PeakEwma {
    pub fn observe(&mut self, sample: Duration, now: Instant) {
        let s = sample.as_secs_f64();
        self.value = Some(match (self.value, self.stamp) {
            (Some(v), _) if s > v => s,
            (Some(v), Some(t)) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                let w = (-dt / EWMA_TAU.as_secs_f64()).exp();
                v * w + s * (1.0 - w)
            }
            _ => s,
        });
        self.stamp = Some(now);
    }

    /// Seconds; `None` until the first sample (an unsampled backend is tried first).
    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// One `x-ratelimit-remaining-*` reading.
#[derive(Debug, Clone, Copy)]
struct Reading {
    remaining: f64,
    /// The largest remaining value seen: the best estimate of the limit itself.
    max_seen: f64,
    at: Instant,
    /// Share of the limit one request uses, learnt from how readings drop.
    per_request: f64,
}

impl Reading {
    fn update(prev: Option<Reading>, remaining: f64, now: Instant) -> Reading {
        let Some(p) = prev else {
            return Reading {
                remaining,
                max_seen: remaining,
                at: now,
                per_request: 0.0,
            };
        };
        let max_seen = p.max_seen.max(remaining);
        let mut per_request = p.per_request;
        if remaining < p.remaining && max_seen > 0.0 {
            let drop = (p.remaining - remaining) / max_seen;
            per_request = if per_request == 0.0 {
                drop
            } else {
                0.8 * per_request + 0.2 * drop
            };
        }
        Reading {
            remaining,
            max_seen,
            at: now,
            per_request,
        }
    }

    /// Share of the limit estimated free now: the reading, refilled linearly over `window`
    /// since it was taken, less what the requests in flight will use.
    fn room(&self, now: Instant, window: Duration, in_flight: u32) -> f64 {
        if self.max_seen <= 0.0 {
            return 0.0;
        }
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        let refill = (age / window.as_secs_f64()).min(1.0);
        let est = self.remaining + (self.max_seen - self.remaining) * refill;
        est / self.max_seen - self.per_request * f64::from(in_flight)
    }
}

/// What a backend last said about its remaining tokens and requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Headroom {
    tokens: Option<Reading>,
    requests: Option<Reading>,
}

// Looked up by prepared name: a `&str` lookup parses and validates the name on every response.
static REMAINING_TOKENS: http::HeaderName =
    http::HeaderName::from_static("x-ratelimit-remaining-tokens");
static REMAINING_REQUESTS: http::HeaderName =
    http::HeaderName::from_static("x-ratelimit-remaining-requests");

/// A remaining count: a whole number as Azure sends it, or any finite non-negative number.
fn reading(value: &[u8]) -> Option<f64> {
    let v = value.trim_ascii();
    // Digits alone (the usual case) without the general float parser; 15 digits stay exact.
    if !v.is_empty() && v.len() <= 15 {
        let mut n = 0u64;
        for &d in v {
            if !d.is_ascii_digit() {
                n = u64::MAX;
                break;
            }
            n = n * 10 + u64::from(d - b'0');
        }
        if n != u64::MAX {
            return Some(n as f64);
        }
    }
    std::str::from_utf8(v)
        .ok()?
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

impl Headroom {
    pub fn observe(&mut self, headers: &HeaderMap, now: Instant) {
        // One pass over the map (a handful of headers: the rest of a response passes on
        // outside it), names compared by length first, costs less than two hashed lookups of
        // these long names. The first value counts, as `get`'s.
        let (mut tokens, mut requests) = (None, None);
        for (name, value) in headers {
            let slot = if *name == REMAINING_TOKENS {
                &mut tokens
            } else if *name == REMAINING_REQUESTS {
                &mut requests
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(reading(value.as_bytes()));
            }
        }
        if let Some(t) = tokens.flatten() {
            self.tokens = Some(Reading::update(self.tokens, t, now));
        }
        if let Some(r) = requests.flatten() {
            self.requests = Some(Reading::update(self.requests, r, now));
        }
    }

    /// Share of the backend's limit free now, the tighter of tokens and requests; 1.0 when the
    /// backend never reported (so it gets tried and reports).
    pub fn room(&self, now: Instant, in_flight: u32) -> f64 {
        // Azure refills tokens over a minute and requests over 10-second windows.
        let t = self
            .tokens
            .map(|r| r.room(now, Duration::from_secs(60), in_flight));
        let r = self
            .requests
            .map(|r| r.room(now, Duration::from_secs(10), in_flight));
        match (t, r) {
            (None, None) => 1.0,
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => a.min(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_parse_as_numbers_or_not_at_all() {
        assert_eq!(reading(b"4294967295"), Some(4_294_967_295.0));
        assert_eq!(reading(b" 12 "), Some(12.0));
        assert_eq!(reading(b"0"), Some(0.0));
        assert_eq!(reading(b"1.5"), Some(1.5));
        assert_eq!(reading(b"1e3"), Some(1000.0));
        assert_eq!(
            reading(b"123456789012345678901"),
            Some(1.2345678901234568e20)
        );
        for bad in [&b""[..], b" ", b"-1", b"inf", b"NaN", b"12a", b"\xff"] {
            assert_eq!(reading(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        assert!(e.get().is_none());
        e.observe(Duration::from_millis(100), t0);
        e.observe(Duration::from_millis(500), t0 + Duration::from_secs(1));
        assert!((e.get().unwrap() - 0.5).abs() < 1e-9, "peak taken at once");
        e.observe(Duration::from_millis(100), t0 + Duration::from_secs(11));
        let v = e.get().unwrap();
        assert!(v < 0.5 && v > 0.1, "decays gradually: {v}");
    }

    #[test]
    fn headroom_reads_each_remaining_header_by_its_first_value() {
        let t0 = Instant::now();
        let mut h = Headroom::default();
        let mut hm = HeaderMap::new();
        hm.insert("content-type", "application/json".parse().unwrap());
        hm.append("x-ratelimit-remaining-requests", "5".parse().unwrap());
        hm.append("x-ratelimit-remaining-requests", "1".parse().unwrap());
        hm.insert("x-ratelimit-remaining-tokens", "many".parse().unwrap());
        h.observe(&hm, t0);
        assert!(
            h.tokens.is_none(),
            "a value that is no number is no reading"
        );
        assert_eq!(h.requests.map(|r| r.remaining), Some(5.0));
        hm.insert("x-ratelimit-remaining-tokens", "900".parse().unwrap());
        h.observe(&hm, t0);
        assert_eq!(h.tokens.map(|r| r.remaining), Some(900.0));
    }

    #[test]
    fn headroom_prefers_fresh_room_and_refills_with_age() {
        let t0 = Instant::now();
        let mut h = Headroom::default();
        assert_eq!(h.room(t0, 0), 1.0);
        let mut hm = HeaderMap::new();
        hm.insert("x-ratelimit-remaining-tokens", "60000".parse().unwrap());
        h.observe(&hm, t0);
        hm.insert("x-ratelimit-remaining-tokens", "30000".parse().unwrap());
        h.observe(&hm, t0);
        assert!((h.room(t0, 0) - 0.5).abs() < 1e-9);
        // Half a minute later, half the used budget is back.
        assert!((h.room(t0 + Duration::from_secs(30), 0) - 0.75).abs() < 1e-9);
        assert!((h.room(t0 + Duration::from_secs(120), 0) - 1.0).abs() < 1e-9);
        // Requests in flight will use some of it (one request used half above).
        assert!(h.room(t0, 1) < 0.01);
    }
}
