//! Health of one (backend, deployment) pair: a cooldown set by throttling answers, and a circuit
//! breaker fed by other failures. This is the one place that decides whether a pair may be tried.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    /// No traffic until `until`; then one probe.
    Open {
        until: Instant,
    },
    /// One probe may go; `probing` while it is out.
    HalfOpen {
        probing: bool,
    },
}

/// Whether a pair can take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Ready,
    /// Throttled by the backend; free again after the duration.
    Cooling(Duration),
    /// Circuit open; a probe is allowed after the duration.
    Open(Duration),
    /// Half-open with its one probe already out.
    Probing,
}

#[derive(Debug, Clone)]
pub struct Health {
    cooldown_until: Option<Instant>,
    state: CircuitState,
    failures: VecDeque<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            cooldown_until: None,
            state: CircuitState::Closed,
            failures: VecDeque::new(),
        }
    }
}

impl Health {
    pub fn availability(&mut self, now: Instant) -> Availability {
        if let Some(until) = self.cooldown_until {
            if until > now {
                return Availability::Cooling(until - now);
            }
            self.cooldown_until = None;
        }
        match self.state {
            CircuitState::Closed | CircuitState::HalfOpen { probing: false } => Availability::Ready,
            CircuitState::HalfOpen { probing: true } => Availability::Probing,
            CircuitState::Open { until } if until > now => Availability::Open(until - now),
            CircuitState::Open { .. } => {
                self.state = CircuitState::HalfOpen { probing: false };
                Availability::Ready
            }
        }
    }

    /// An attempt is going out; a half-open circuit now has its probe out.
    /// Returns whether this attempt is the probe.
    pub fn begin(&mut self) -> bool {
        if self.state == (CircuitState::HalfOpen { probing: false }) {
            self.state = CircuitState::HalfOpen { probing: true };
            return true;
        }
        false
    }

    /// The backend answered in a way that shows it works (any non-failure status, a throttle too).
    pub fn success(&mut self) {
        self.state = CircuitState::Closed;
        self.failures.clear();
    }

    /// The backend asked to be left alone for `wait` (already capped by the caller).
    pub fn throttled(&mut self, wait: Duration, now: Instant) {
        self.cool_until(now + wait);
        // A 429 is an answer: the backend is up, so a probe that got one closes the circuit.
        self.success();
    }

    /// Another replica learned this pair is throttled until `until`: stay away as long, without
    /// touching the circuit (this replica has no evidence either way).
    pub fn cool_until(&mut self, until: Instant) {
        if self.cooldown_until.is_none_or(|u| u < until) {
            self.cooldown_until = Some(until);
        }
    }

    /// A failure that counts towards opening the circuit. Returns true if it opened now.
    pub fn failure(&mut self, cfg: &CircuitBreakerConfig, now: Instant) -> bool {
        match self.state {
            CircuitState::HalfOpen { .. } => {
                self.state = CircuitState::Open {
                    until: now + cfg.trip_duration,
                };
                true
            }
            CircuitState::Open { .. } => false,
            CircuitState::Closed => {
                self.failures.push_back(now);
                while self
                    .failures
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) > cfg.interval)
                {
                    self.failures.pop_front();
                }
                if self.failures.len() >= cfg.failures as usize {
                    self.failures.clear();
                    self.state = CircuitState::Open {
                        until: now + cfg.trip_duration,
                    };
                    return true;
                }
                false
            }
        }
    }

    /// A probe ended without a verdict (the client went away): let another one through.
    pub fn abandon_probe(&mut self) {
        if self.state == (CircuitState::HalfOpen { probing: true }) {
            self.state = CircuitState::HalfOpen { probing: false };
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CB: CircuitBreakerConfig = CircuitBreakerConfig {
        failures: 3,
        interval: Duration::from_secs(10),
        trip_duration: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn cooldown_expires() {
        let mut h = Health::default();
        let t0 = Instant::now();
        h.throttled(Duration::from_secs(5), t0);
        assert_eq!(
            h.availability(t0),
            Availability::Cooling(Duration::from_secs(5))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.availability(Instant::now()), Availability::Ready);
        // A shorter hint does not cut an existing cooldown short.
        let t1 = Instant::now();
        h.throttled(Duration::from_secs(10), t1);
        h.throttled(Duration::from_secs(1), t1);
        assert_eq!(
            h.availability(t1),
            Availability::Cooling(Duration::from_secs(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_opens_probes_and_closes() {
        let mut h = Health::default();
        let t0 = Instant::now();
        assert!(!h.failure(&CB, t0));
        assert!(!h.failure(&CB, t0));
        assert!(
            h.failure(&CB, t0),
            "third failure within the interval opens"
        );
        assert_eq!(
            h.availability(t0),
            Availability::Open(Duration::from_secs(30))
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        let t1 = Instant::now();
        assert_eq!(h.availability(t1), Availability::Ready);
        assert!(h.begin(), "the first attempt after the trip is the probe");
        assert_eq!(h.availability(t1), Availability::Probing);
        h.success();
        assert_eq!(h.state(), CircuitState::Closed);
        assert_eq!(h.availability(t1), Availability::Ready);
        assert!(!h.begin());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_old_failures_expire() {
        let (mut h, t1) = tripped_and_expired().await;
        h.begin();
        assert!(h.failure(&CB, t1));
        assert_eq!(
            h.availability(t1),
            Availability::Open(Duration::from_secs(30))
        );

        // Failures spread wider than the interval never open a closed circuit.
        let mut h = Health::default();
        for _ in 0..10 {
            assert!(!h.failure(&CB, Instant::now()));
            tokio::time::advance(Duration::from_secs(6)).await;
        }
    }

    /// A circuit opened by three failures, with its trip duration just over: ready to probe.
    async fn tripped_and_expired() -> (Health, Instant) {
        let mut h = Health::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            h.failure(&CB, t0);
        }
        tokio::time::advance(CB.trip_duration).await;
        let t1 = Instant::now();
        assert_eq!(h.availability(t1), Availability::Ready);
        (h, t1)
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_lets_another_through() {
        let (mut h, t1) = tripped_and_expired().await;
        assert!(h.begin());
        h.abandon_probe();
        assert_eq!(h.availability(t1), Availability::Ready);
        assert!(h.begin());
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_probe_closes_the_circuit_but_cools_down() {
        let (mut h, t1) = tripped_and_expired().await;
        h.begin();
        h.throttled(Duration::from_secs(2), t1);
        assert_eq!(h.state(), CircuitState::Closed);
        assert_eq!(
            h.availability(t1),
            Availability::Cooling(Duration::from_secs(2))
        );
    }
}
