//! Request ids: random UUID-shaped strings without a dependency on an RNG crate.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes ids unique within one generator: a counter under a random key (SipHash for trace ids,
/// SplitMix64 for request ids).
#[derive(Debug)]
pub struct IdGen {
    counter: AtomicU64,
    key: RandomState,
    /// A random key for request ids, drawn once from `key`.
    id_key: u64,
}

impl Default for IdGen {
    fn default() -> Self {
        let key = RandomState::new();
        let mut h = key.build_hasher();
        h.write_u64(u64::MAX);
        IdGen {
            counter: AtomicU64::new(0),
            id_key: h.finish(),
            key,
        }
    }
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

    /// A version-4-shaped UUID as ASCII bytes, without allocating (one per request). A request
    /// id needs to be unique, not secret: SplitMix64 (a bijection) of the counter under a
    /// random key, the second half mixed from the first; SipHash and a nibble at a time were
    /// most of an id's cost. (Trace ids keep [`Self::next_u64`].)
    pub fn uuid_v4_bytes(&self) -> [u8; 36] {
        // Where each byte's two hex digits go, around the dashes.
        const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let h = splitmix64(n ^ self.id_key);
        let a = (h & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let b = (splitmix64(h) & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&a.to_be_bytes());
        bytes[8..].copy_from_slice(&b.to_be_bytes());
        let mut out = [b'-'; 36];
        for (&at, &byte) in AT.iter().zip(&bytes) {
            out[at..at + 2].copy_from_slice(&HEX_PAIRS[byte as usize]);
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

/// Each byte's two lowercase hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

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
        let many: std::collections::HashSet<[u8; 36]> =
            (0..10_000).map(|_| g.uuid_v4_bytes()).collect();
        assert_eq!(many.len(), 10_000);
        let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        assert!(many.iter().all(|id| id.iter().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *b == b'-'
            } else {
                hex(b)
            }
        })));
    }
}
