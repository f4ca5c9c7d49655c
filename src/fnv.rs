//! FNV-1a, for the small maps the request path looks names up in. std's SipHash cost several
//! times as much per lookup there; its defence against crafted collisions is not needed for
//! maps whose size is bounded (a collision only lengthens a scan of a few entries).

use std::hash::{BuildHasherDefault, Hasher};

pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A `HashMap` hasher: `HashMap<K, V, FnvBuild>`.
pub type FnvBuild = BuildHasherDefault<Fnv>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn known_values_and_distinct_keys() {
        // The FNV-1a reference values for "" and "a".
        assert_eq!(Fnv::default().finish(), 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv::default();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        let b = FnvBuild::default();
        assert_ne!(b.hash_one("gpt-4o"), b.hash_one("gpt-4o-mini"));
    }
}
