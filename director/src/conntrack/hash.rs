//! The keyed 5-tuple hash behind both indexes.
//!
//! The 13 key bytes are packed into two words (addresses; ports and protocol), each is XORed with a secret
//! key word and the two are multiplied into a 128-bit product whose halves are XORed ("folded multiply", the
//! core of foldhash and of aHash's fallback); a second folded multiply with a third key word mixes the
//! result. That is a handful of cycles where SipHash-1-3 (std's `DefaultHasher`) costs several times more.
//!
//! What it guarantees: the 192-bit key comes from the seed given to the table (use
//! [`random_seed`](super::random_seed) in production), so an attacker who only sends packets cannot compute
//! 5-tuples that share a bucket, as they could against an unkeyed hash. It is not a cryptographic PRF: it
//! resists precomputed collision floods, not an adversary who can observe timings at length to recover the
//! key. Collisions only lengthen chains (the index is chained, never "full"), so the worst case is slower
//! lookups, never a wrong answer or a refused insert.

use crate::flow::FlowV4;

#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasher {
    k0: u64,
    k1: u64,
    k2: u64,
}

#[inline(always)]
fn folded_multiply(x: u64, y: u64) -> u64 {
    let product = (x as u128) * (y as u128);
    (product as u64) ^ ((product >> 64) as u64)
}

/// SplitMix64: expands one seed into well-mixed key words.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl KeyHasher {
    pub(crate) fn new(seed: u64) -> KeyHasher {
        let mut state = seed;
        let k0 = splitmix64(&mut state);
        let k1 = splitmix64(&mut state);
        // Odd, so the final multiply is a bijection on the low word.
        let k2 = splitmix64(&mut state) | 1;
        KeyHasher { k0, k1, k2 }
    }

    #[inline(always)]
    pub(crate) fn hash(&self, key: &FlowV4) -> u64 {
        let addresses = (u64::from(u32::from(key.src)) << 32) | u64::from(u32::from(key.dst));
        let rest = (u64::from(key.src_port) << 24) | (u64::from(key.dst_port) << 8) | key.proto as u64;
        let h = folded_multiply(addresses ^ self.k0, rest ^ self.k1);
        folded_multiply(h, self.k2)
    }
}
