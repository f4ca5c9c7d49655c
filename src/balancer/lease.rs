//! A lease: one attempt's hold on a backend, which reports the attempt's outcome to the
//! backend's health and ends its in-flight count when dropped.

use super::*;

/// One attempt's hold on a backend: counts as in flight until dropped (for a streamed answer,
/// when the stream ends), and carries the attempt's outcome back to the health state.
pub struct Lease {
    pub(super) table: Arc<Table>,
    pub(super) idx: usize,
    /// Taken before the table was replaced by a reload (so it accounts in the successor).
    pub(super) pre_reload: bool,
    pub(super) probe: bool,
    pub(super) reported: bool,
    pub(super) expected_ttfb: Option<Duration>,
}

impl Lease {
    pub fn backend(&self) -> usize {
        self.idx
    }

    /// This backend's recent time to first byte, if measured.
    pub fn expected_ttfb(&self) -> Option<Duration> {
        self.expected_ttfb
    }

    /// Feeds an attempt's outcome back. Call once per attempt.
    pub fn report(&mut self, outcome: Outcome<'_>, now: Instant) -> Verdict {
        self.reported = true;
        let Some((table, idx)) = self.home() else {
            return Verdict::Healthy;
        };
        let policy = &table.policy;
        let mut st = lock(&table.state);
        let Some(pair) = st.pairs.get_mut(idx) else {
            return Verdict::Healthy;
        };
        match outcome {
            Outcome::Response {
                status,
                headers,
                retryable,
                ttfb,
            } => {
                pair.headroom.observe(headers, now);
                // Hints only matter on throttling answers; a 200 is not parsed for them.
                let hint = matches!(
                    status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                )
                .then(|| retry_hint(headers, SystemTime::now()))
                .flatten();
                let throttled = status == StatusCode::TOO_MANY_REQUESTS || hint.is_some();
                if throttled {
                    let wait = hint
                        .unwrap_or(policy.default_cooldown)
                        .min(policy.max_cooldown);
                    pair.health.throttled(wait, now);
                    Verdict::CooledDown(wait)
                } else if retryable {
                    pair.ttfb.observe(ttfb, now);
                    Verdict::Failed {
                        circuit_opened: pair.health.failure(&policy.breaker, now),
                    }
                } else {
                    pair.ttfb.observe(ttfb, now);
                    pair.health.success();
                    if status.is_success() {
                        pair.misfit = None;
                    }
                    Verdict::Healthy
                }
            }
            Outcome::Misfit(m) => {
                // An answer: the backend is up, and its circuit has nothing to learn.
                pair.misfit = Some((m, now + MISFIT_TTL));
                Verdict::Healthy
            }
            Outcome::Failure { elapsed } => {
                // A timeout is the slowest answer there is: let the latency average see it.
                pair.ttfb.observe(elapsed, now);
                Verdict::Failed {
                    circuit_opened: pair.health.failure(&policy.breaker, now),
                }
            }
        }
    }
}

impl Lease {
    /// The table and index this lease accounts in: its own, or, when a reload replaced the
    /// table after the lease was taken, the successor's (none if the backend was removed).
    fn home(&self) -> Option<(Arc<Table>, usize)> {
        let mut table = self.table.clone();
        let mut idx = self.idx;
        if !self.pre_reload {
            return Some((table, idx));
        }
        loop {
            let next = lock(&table.state).successor.clone();
            match next {
                None => return Some((table, idx)),
                Some((t, map)) => {
                    idx = map.get(idx).copied().flatten()?;
                    table = t;
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some((table, idx)) = self.home() else {
            return;
        };
        let mut st = lock(&table.state);
        if let Some(pair) = st.pairs.get_mut(idx) {
            pair.in_flight = pair.in_flight.saturating_sub(1);
            if self.probe && !self.reported {
                pair.health.abandon_probe();
            }
        }
    }
}
