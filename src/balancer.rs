//! Picks the backend for each attempt. Pure state, no I/O.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A strict rotation shared by every request: each pick takes the next slot, so N sequential
/// picks over K backends land exactly N/K on each, and concurrent picks stay within one.
#[derive(Debug)]
pub struct RoundRobin {
    next: AtomicUsize,
    len: usize,
}

impl RoundRobin {
    pub fn new(len: usize) -> Self {
        Self {
            next: AtomicUsize::new(0),
            len: len.max(1),
        }
    }

    /// The next backend index in rotation whose `tried` flag is false; when every backend was
    /// tried already, simply the next in rotation (a retry then goes around again).
    pub fn pick(&self, tried: &[bool]) -> usize {
        let all_tried = tried.len() >= self.len && tried.iter().take(self.len).all(|t| *t);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.len;
            if all_tried || !tried.get(i).copied().unwrap_or(false) {
                return i;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_evenly() {
        let rr = RoundRobin::new(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.pick(&[false; 3])] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn skips_tried_backends() {
        let rr = RoundRobin::new(3);
        assert_eq!(rr.pick(&[false, false, false]), 0);
        // Slot 1 was tried by this request: the pick moves on to 2.
        assert_eq!(rr.pick(&[false, true, false]), 2);
        assert_eq!(rr.pick(&[true, true, true]), 0);
    }

    #[test]
    fn concurrent_picks_share_evenly() {
        let rr = std::sync::Arc::new(RoundRobin::new(3));
        let counts: Vec<_> = (0..4)
            .map(|_| {
                let rr = rr.clone();
                std::thread::spawn(move || {
                    let mut c = [0usize; 3];
                    for _ in 0..3000 {
                        c[rr.pick(&[false; 3])] += 1;
                    }
                    c
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        let total: Vec<usize> = (0..3).map(|i| counts.iter().map(|c| c[i]).sum()).collect();
        assert_eq!(total, vec![4000, 4000, 4000]);
    }
}
