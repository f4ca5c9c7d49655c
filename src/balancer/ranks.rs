//! Each backend's priority and weight for one deployment.

use super::Policy;

/// Each backend's priority and weight for one deployment: the backends' own, or what the
/// deployment's `[[deployments]]` entry says for some of them.
#[derive(Debug, PartialEq, Eq)]
pub struct Ranks {
    pub(super) priority: Box<[u32]>,
    pub(super) weight: Box<[u32]>,
}

impl Ranks {
    /// The backends' own ranks, with `overrides` (backend index, priority, weight) applied.
    pub(super) fn of(policy: &Policy, overrides: &[(usize, u32, u32)]) -> Ranks {
        let mut ranks = Ranks {
            priority: policy.priority.clone().into(),
            weight: policy.weight.clone().into(),
        };
        for &(idx, priority, weight) in overrides {
            if let (Some(p), Some(w)) = (ranks.priority.get_mut(idx), ranks.weight.get_mut(idx)) {
                *p = priority;
                *w = weight;
            }
        }
        ranks
    }

    /// Backend `idx`'s priority here (1 is served first).
    pub fn priority(&self, idx: usize) -> u32 {
        self.priority.get(idx).copied().unwrap_or(u32::MAX)
    }
}
