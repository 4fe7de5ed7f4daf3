//! Small deterministic hash functions and the PRNG the schedulers use. No state, no allocation, no clocks.

/// `GOLDEN_RATIO_32` from `include/linux/hash.h`.
const GOLDEN_RATIO_32: u32 = 0x61C8_8647;

/// The kernel's `hash_32(val, bits)` (`include/linux/hash.h`): `(val * GOLDEN_RATIO_32) >> (32 - bits)`, the
/// `bits` high bits of a multiplicative hash. `ip_vs_sh.c` and `ip_vs_dh.c` index their 256-bucket tables with it.
#[inline]
pub(crate) fn hash_32(val: u32, bits: u32) -> u32 {
    debug_assert!((1..=32).contains(&bits));
    val.wrapping_mul(GOLDEN_RATIO_32) >> (32 - bits)
}

/// The SplitMix64 finalizer: a bijective 64-bit mixer with full avalanche (every input bit flips each output bit
/// with probability ≈ 1/2). `mix64(0) == 0`.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps the high 32 bits of `h` onto `0..n` by multiplication (Lemire's "fast range"), avoiding a division.
/// Uniform up to a bias of at most `n / 2^32`.
#[inline]
pub(crate) fn reduce(h: u64, n: u32) -> u32 {
    (((h >> 32) * u64::from(n)) >> 32) as u32
}

/// Marsaglia's xorshift64 with Vigna's multiplicative output scrambling (xorshift64*): 8 bytes of state, a few
/// cycles per draw. Not cryptographic; good enough to pick load-balancing candidates.
#[derive(Debug, Clone)]
pub(crate) struct XorShift64Star {
    state: u64,
}

impl XorShift64Star {
    /// Any seed is fine (0 included): the seed is mixed first, and the one mixed value that would give the
    /// all-zero state (from which xorshift never leaves) is replaced.
    pub(crate) fn new(seed: u64) -> Self {
        let state = mix64(seed ^ 0x9E37_79B9_7F4A_7C15);
        XorShift64Star { state: if state == 0 { 0x9E37_79B9_7F4A_7C15 } else { state } }
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A draw from `0..n` (`n > 0`).
    #[inline]
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        debug_assert!(n > 0);
        reduce(self.next_u64(), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_32_matches_the_kernel_definition() {
        // hash_32(1, 8): 0x61C88647 >> 24.
        assert_eq!(hash_32(1, 8), 0x61);
        assert_eq!(hash_32(0, 8), 0);
        assert_eq!(hash_32(2, 32), 0xC391_0C8E);
        // 10.0.0.1 in host order.
        assert_eq!(hash_32(0x0A00_0001, 8), (0x0A00_0001u32.wrapping_mul(0x61C8_8647)) >> 24);
    }

    #[test]
    fn reduce_stays_in_range_and_spreads() {
        let mut counts = [0u32; 7];
        let mut rng = XorShift64Star::new(1);
        for _ in 0..70_000 {
            let r = rng.below(7);
            counts[r as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(reduce(u64::MAX, 5), 4);
        assert_eq!(reduce(0, 5), 0);
    }

    #[test]
    fn the_prng_is_seeded_and_never_stuck() {
        let a: Vec<u64> = {
            let mut r = XorShift64Star::new(42);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = XorShift64Star::new(42);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = XorShift64Star::new(43);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        for seed in [0, u64::MAX, 0x9E37_79B9_7F4A_7C15] {
            let mut r = XorShift64Star::new(seed);
            assert_ne!(r.next_u64(), r.next_u64(), "seed {seed:#x}");
        }
    }
}
