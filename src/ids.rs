//! Request ids: random UUID-shaped strings without a dependency on an RNG crate.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes ids unique within one generator: SipHash of a counter under a random key.
#[derive(Debug, Default)]
pub struct IdGen {
    counter: AtomicU64,
    key: RandomState,
}

impl IdGen {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next_u64(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut h = self.key.build_hasher();
        h.write_u64(n);
        h.finish()
    }

    /// A version-4-shaped UUID.
    pub fn uuid_v4(&self) -> String {
        let a = (self.next_u64() & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let b = (self.next_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_uuid_shaped_and_distinct() {
        let g = super::IdGen::new();
        let a = g.uuid_v4();
        let b = g.uuid_v4();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
