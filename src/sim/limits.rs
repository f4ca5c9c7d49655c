//! Azure-style rate limits: tokens per minute and requests per minute, charged when a request
//! arrives (prompt + max_tokens), refilled continuously. Requests are limited over 10-second
//! windows, as Azure does (600 RPM allows 100 requests in any 10 s).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Bucket {
    capacity: f64,
    level: f64,
    per_sec: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Self {
            capacity,
            level: capacity,
            per_sec,
            last: now,
        }
    }

    /// Tokens per minute: the whole minute's budget may be spent at once.
    pub fn per_minute(limit: u32, now: Instant) -> Self {
        Self::new(limit as f64, limit as f64 / 60.0, now)
    }

    /// Requests per minute, enforced per 10 s.
    pub fn requests_per_minute(limit: u32, now: Instant) -> Self {
        Self::new((limit as f64 / 6.0).max(1.0), limit as f64 / 60.0, now)
    }

    /// Starts with only `fraction` of the budget available, as if the minute were half spent.
    pub fn filled(mut self, fraction: f64) -> Self {
        self.level = self.capacity * fraction.clamp(0.0, 1.0);
        self
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// How long until `amount` fits, or `None` if it fits now. A request larger than the whole
    /// bucket is admitted when the bucket is full (and leaves it in debt), so it is never stuck.
    pub fn wait_for(&mut self, amount: f64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let need = amount.min(self.capacity);
        if self.level >= need {
            return None;
        }
        Some(Duration::from_secs_f64((need - self.level) / self.per_sec))
    }

    pub fn take(&mut self, amount: f64) {
        self.level -= amount;
    }

    pub fn remaining(&self) -> u64 {
        self.level.max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(600, t0);
        assert!(b.wait_for(500.0, t0).is_none());
        b.take(500.0);
        assert_eq!(b.remaining(), 100);
        let wait = b.wait_for(200.0, t0).unwrap();
        assert_eq!(wait, Duration::from_secs(10)); // 100 missing at 10 tokens/s
        assert!(b.wait_for(200.0, t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn requests_use_ten_second_windows() {
        let t0 = Instant::now();
        let mut b = Bucket::requests_per_minute(60, t0);
        for _ in 0..10 {
            assert!(b.wait_for(1.0, t0).is_none());
            b.take(1.0);
        }
        assert_eq!(b.wait_for(1.0, t0), Some(Duration::from_secs(1)));
    }
}
