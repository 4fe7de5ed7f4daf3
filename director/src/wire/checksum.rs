//! The Internet checksum (RFC 1071), its incremental update (RFC 1624), and the CHECKSUM_PARTIAL variant.
//!
//! Conventions. A *sum* (what [`data`], [`combine`] and [`pseudo_header_v4`] return) is the folded 16-bit
//! one's-complement sum, not inverted; a *complete checksum* (what a header's checksum field holds on the
//! wire) is the inverted sum of everything it covers, with the field itself counted as zero. Folding never
//! yields 0 for a non-zero input, so a sum is in `1..=0xffff` and a complete checksum in `0..=0xfffe` when
//! computed from scratch; incremental updates can produce either representation of one's-complement zero
//! (0x0000 or 0xffff), which verify alike, except in UDP, where 0 means "no checksum" (see
//! [`super::udp`]).
//!
//! # CHECKSUM_PARTIAL
//!
//! A frame read from a veth, a tap, or an AF_PACKET socket with PACKET_VNET_HDR can be in the kernel's
//! CHECKSUM_PARTIAL state (virtio_net_hdr flag `NEEDS_CSUM`): the TCP/UDP checksum has not been computed
//! yet; whoever transmits the frame last (the NIC, or the kernel's `skb_checksum_help`) will compute it
//! by summing the bytes from `csum_start` to the end of the packet and storing the inverted result at
//! `csum_start + csum_offset`. To make that result include the pseudo-header, the stack seeds the checksum
//! field with the pseudo-header *sum* (source, destination, protocol, L4 length), folded and **not
//! inverted** (`th->check = ~tcp_v4_check(len, saddr, daddr, 0)`, and `tcp_v4_check` already inverts).
//!
//! Two consequences for NAT on such a frame:
//!
//! 1. Changing a pseudo-header field (an IPv4 address) must move the seed by the same delta the pseudo-
//!    header sum moves: `seed' = seed + (-old) + new` in one's-complement arithmetic. That is
//!    [`update_partial_u32`] / [`update_partial_u16`]. The complete-checksum update, [`update_u32`], works
//!    on the *inverted* sum (`~HC`, RFC 1624 eqn 3) and inverts again at the end; applied to a seed it
//!    moves the seed by the *negated* delta, and the finished checksum comes out wrong. Equivalently,
//!    `update_partial(seed, ..) == !update(!seed, ..)`.
//! 2. Changing a byte *inside* the L4 header or payload (a port, an MSS option) needs **no** change to the
//!    seed: the final summing pass will read the new bytes. Adjusting the seed there would count the change
//!    twice. [`ChecksumState`] carries this distinction through the TCP/UDP setters.
//!
//! The same holds for TSO/GSO super-frames (whose seed, on current kernels, uses the length of the whole
//! super-frame, which is what [`pseudo_header_v4`] of the IP total length gives).

use std::net::Ipv4Addr;

/// Whether a TCP/UDP checksum field holds a complete checksum or a CHECKSUM_PARTIAL pseudo-header seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumState {
    /// The field holds the complete checksum (or, for UDP, may be 0 for "none").
    Complete,
    /// The field holds the folded, non-inverted pseudo-header sum; the device completes it on transmit
    /// (virtio_net_hdr `NEEDS_CSUM`).
    Partial,
}

/// Fold a wide one's-complement accumulator to 16 bits (end-around carry).
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Add `data` (as big-endian 16-bit words, an odd last byte padded with zero) to `acc`.
///
/// The bytes are read as 32-bit words: 2^16 ≡ 1 (mod 0xffff), so summing 32-bit words and folding is the
/// same one's-complement sum, in half the additions. `acc` cannot overflow for any buffer shorter than
/// 16 GiB.
#[inline]
fn accumulate(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    match *words.remainder() {
        [a, b, c] => acc += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => acc += u64::from(u16::from_be_bytes([a, b])),
        [a] => acc += u64::from(a) << 8,
        _ => {}
    }
    acc
}

/// The folded one's-complement sum of `data` (not inverted).
pub fn data(data: &[u8]) -> u16 {
    fold(accumulate(0, data))
}

/// The one's-complement sum of several folded sums (for summing non-contiguous pieces, each of which
/// starts at an even offset of the checksummed data).
pub fn combine(sums: &[u16]) -> u16 {
    fold(sums.iter().map(|&s| u64::from(s)).sum())
}

/// The folded sum of the IPv4 pseudo-header (RFC 793 / 768): source, destination, zero + protocol, and the
/// transport length (header + payload).
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
    fold(pseudo_header_v4_wide(src, dst, protocol, usize::from(length)))
}

/// The pseudo-header sum for a transport length of any size, unfolded (the views use it so a buffer over
/// 64 KiB cannot wrap the length; such a buffer is never a valid IPv4 segment, and then simply fails to
/// verify).
pub(crate) fn pseudo_header_v4_wide(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: usize) -> u64 {
    let s = u32::from(src);
    let d = u32::from(dst);
    u64::from(s >> 16)
        + u64::from(s & 0xffff)
        + u64::from(d >> 16)
        + u64::from(d & 0xffff)
        + u64::from(protocol)
        + length as u64
}

/// The folded sum of a pseudo-header (as [`pseudo_header_v4_wide`] gives it) and `data`.
pub(crate) fn sum_with(pseudo: u64, data_bytes: &[u8]) -> u16 {
    fold(accumulate(pseudo, data_bytes))
}

/// The complete checksum of `data` after a pseudo-header sum: `!(pseudo + sum(data))`.
pub fn finish(pseudo: u16, data_bytes: &[u8]) -> u16 {
    !fold(accumulate(u64::from(pseudo), data_bytes))
}

/// RFC 1624 eqn. 3: the complete checksum `checksum` after a 16-bit word it covers changed from `old` to
/// `new`: `HC' = ~(~HC + ~m + m')`. The word must sit at an even offset of the checksummed data; for a word
/// at an odd offset pass both values byte-swapped (the sum is byte-order independent, RFC 1071 §2(B)).
#[inline]
pub fn update_u16(checksum: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!checksum) + u64::from(!old) + u64::from(new))
}

/// [`update_u16`] for a 32-bit value (an IPv4 address) at an even offset.
#[inline]
pub fn update_u32(checksum: u16, old: u32, new: u32) -> u16 {
    !fold(
        u64::from(!checksum)
            + u64::from(!(old >> 16) & 0xffff)
            + u64::from(!old & 0xffff)
            + u64::from(new >> 16)
            + u64::from(new & 0xffff),
    )
}

/// The CHECKSUM_PARTIAL seed `field` (a folded pseudo-header sum, *not* inverted) after a 16-bit
/// pseudo-header word changed from `old` to `new`: `seed' = seed + ~old + new`.
///
/// Use this only for pseudo-header fields (addresses, protocol, length); bytes inside the transport
/// segment need no seed change at all. See the module documentation for why the complete-checksum update
/// is wrong here.
#[inline]
pub fn update_partial_u16(field: u16, old: u16, new: u16) -> u16 {
    fold(u64::from(field) + u64::from(!old) + u64::from(new))
}

/// [`update_partial_u16`] for a 32-bit pseudo-header value (an IPv4 address).
#[inline]
pub fn update_partial_u32(field: u16, old: u32, new: u32) -> u16 {
    fold(
        u64::from(field)
            + u64::from(!(old >> 16) & 0xffff)
            + u64::from(!old & 0xffff)
            + u64::from(new >> 16)
            + u64::from(new & 0xffff),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A second, deliberately naive implementation: 16-bit words summed in a u64, folded at the end.
    pub(crate) fn reference_sum(data: &[u8]) -> u16 {
        let mut total: u64 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u64::from(data[i]);
            let lo = if i + 1 < data.len() { u64::from(data[i + 1]) } else { 0 };
            total += (hi << 8) | lo;
            i += 2;
        }
        while total >> 16 != 0 {
            total = (total & 0xffff) + (total >> 16);
        }
        total as u16
    }

    /// Deterministic xorshift64* for tests that want many pseudo-random buffers without a dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next_u64() as u8;
            }
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }

    #[test]
    fn rfc1071_numerical_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to 2ddf0, which folds to ddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(data(&bytes), 0xddf2);
        assert_eq!(reference_sum(&bytes), 0xddf2);
        assert_eq!(finish(0, &bytes), 0x220d);
    }

    #[test]
    fn rfc1624_example_uses_eqn_3() {
        // RFC 1624 §4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285; eqn. 3 gives 0x0000 (eqn. 2 would give 0xffff).
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn matches_reference_on_random_buffers() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut buf = [0u8; 1600];
        for round in 0..4000 {
            let len = if round < 64 { round } else { rng.below(buf.len() + 1) };
            rng.fill(&mut buf[..len]);
            assert_eq!(data(&buf[..len]), reference_sum(&buf[..len]), "len {len}");
        }
        // Saturated input: the accumulator's widest case.
        let ones = [0xffu8; 65535];
        assert_eq!(data(&ones), reference_sum(&ones));
        assert_eq!(data(&[]), 0);
    }

    #[test]
    fn combine_and_pseudo_header() {
        let mut rng = Rng(7);
        let mut buf = [0u8; 200];
        rng.fill(&mut buf);
        // Splitting at an even offset and combining gives the whole sum.
        for split in (0..=200).step_by(2) {
            assert_eq!(combine(&[data(&buf[..split]), data(&buf[split..])]), data(&buf));
        }
        let (src, dst) = (Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(192, 168, 1, 2));
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&src.octets());
        pseudo[4..8].copy_from_slice(&dst.octets());
        pseudo[9] = 6;
        pseudo[10..].copy_from_slice(&1480u16.to_be_bytes());
        assert_eq!(pseudo_header_v4(src, dst, 6, 1480), reference_sum(&pseudo));
    }

    /// Put `value` at `at` in `buf` and return the old value.
    fn put16(buf: &mut [u8], at: usize, value: u16) -> u16 {
        let old = u16::from_be_bytes([buf[at], buf[at + 1]]);
        buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
        old
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        // A buffer whose first word is its checksum; change random words (even and odd offsets) and check
        // the incrementally updated checksum against one computed from scratch, bit for bit.
        let mut rng = Rng(0xdead_beef);
        let mut buf = [0u8; 64];
        for _ in 0..20_000 {
            let len = 6 + rng.below(58);
            rng.fill(&mut buf[..len]);
            put16(&mut buf, 0, 0);
            let csum = !data(&buf[..len]);
            put16(&mut buf, 0, csum);
            assert_eq!(data(&buf[..len]), 0xffff);

            let at = 2 + rng.below(len - 3);
            let new = rng.next_u64() as u16;
            let old = put16(&mut buf, at, new);
            let updated = if at % 2 == 0 {
                update_u16(csum, old, new)
            } else {
                update_u16(csum, old.swap_bytes(), new.swap_bytes())
            };
            put16(&mut buf, 0, 0);
            let fresh = !data(&buf[..len]);
            assert_eq!(updated, fresh, "len {len} at {at} old {old:#06x} new {new:#06x}");

            // A 32-bit change at an even offset.
            if len >= 8 {
                let at = 2 + 2 * rng.below((len - 4) / 2);
                let new32 = rng.next_u64() as u32;
                let old32 = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
                buf[at..at + 4].copy_from_slice(&new32.to_be_bytes());
                let updated = update_u32(fresh, old32, new32);
                assert_eq!(updated, !data(&buf[..len]));
            }
        }
    }

    #[test]
    fn partial_update_tracks_the_pseudo_header_sum() {
        let mut rng = Rng(42);
        for _ in 0..20_000 {
            let src = Ipv4Addr::from(rng.next_u64() as u32);
            let dst = Ipv4Addr::from(rng.next_u64() as u32);
            let new_dst = Ipv4Addr::from(rng.next_u64() as u32);
            let len = rng.next_u64() as u16;
            let proto = if rng.next_u64() & 1 == 0 { 6 } else { 17 };
            let seed = pseudo_header_v4(src, dst, proto, len);
            let moved = update_partial_u32(seed, u32::from(dst), u32::from(new_dst));
            assert_eq!(moved, pseudo_header_v4(src, new_dst, proto, len));
            // The identity the module documentation states.
            assert_eq!(moved, !update_u32(!seed, u32::from(dst), u32::from(new_dst)));
            let new_len = rng.next_u64() as u16;
            assert_eq!(update_partial_u16(seed, len, new_len), pseudo_header_v4(src, dst, proto, new_len));
        }
    }

    #[test]
    fn complete_update_on_a_partial_seed_is_wrong() {
        // The bug this module's split exists to prevent, shown on numbers.
        let (src, dst, new_dst) =
            (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 2, 0, 1), Ipv4Addr::new(192, 0, 2, 77));
        let seed = pseudo_header_v4(src, dst, 6, 40);
        let wrong = update_u32(seed, u32::from(dst), u32::from(new_dst));
        let right = update_partial_u32(seed, u32::from(dst), u32::from(new_dst));
        assert_eq!(right, pseudo_header_v4(src, new_dst, 6, 40));
        assert_ne!(wrong, right);
    }
}
