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

    /// A version-4-shaped UUID as ASCII bytes, without allocating (one per request). One keyed
    /// hash per id: the second half is mixed from the first (64 bits unique per generator are
    /// plenty for request ids, and the hash was half the cost of an id).
    pub fn uuid_v4_bytes(&self) -> [u8; 36] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let h = self.next_u64();
        let a = (h & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let b = (splitmix64(h) & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        let mut out = [b'-'; 36];
        let mut pos = 0;
        for (word, nibbles) in [(a, 16), (b, 16)] {
            for k in (0..nibbles).rev() {
                if matches!(pos, 8 | 13 | 18 | 23) {
                    pos += 1;
                }
                out[pos] = HEX[((word >> (k * 4)) & 0xf) as usize];
                pos += 1;
            }
        }
        out
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

/// SplitMix64's output function: a bijection that spreads every input bit over the output.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        let c = String::from_utf8(g.uuid_v4_bytes().to_vec()).unwrap();
        assert_eq!(c.len(), 36);
        assert_eq!(
            c.char_indices()
                .filter(|(_, ch)| *ch == '-')
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [8, 13, 18, 23]
        );
        assert_eq!(&c[14..15], "4");
        assert!(matches!(&c[19..20], "8" | "9" | "a" | "b"), "{c}");
        assert_ne!(c, g.uuid_v4());
    }
}
