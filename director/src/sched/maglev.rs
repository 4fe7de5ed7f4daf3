//! Maglev hashing (`mh`): `ip_vs_mh.c` and the Maglev paper (Eisenbud et al., NSDI 2016, §3.4).
//!
//! > The mh algorithm is to assign a preference list of all the lookup table positions to each destination and
//! > populate the table with the most-preferred position of destinations. Then it is to select destination with
//! > the hash key of source IP address through looking up a the lookup table.
//!
//! Each server has a permutation of the `M` table positions (`M` prime): `offset = h1(server) % M`,
//! `skip = h2(server) % (M - 1) + 1`, position `j` being `(offset + j * skip) % M`. Servers take turns claiming
//! their next preferred free position until the table is full; a client maps to `table[h(client) % M]`.
//! Because a server's permutation depends only on its own [`ServerView::key`], removing one of N servers moves
//! little more than that server's 1/N of the clients, and adding it back restores the previous table exactly.
//!
//! # Weights (`ip_vs_mh_permutate`)
//!
//! Each turn a server claims `turns` positions instead of one: `turns = ((weight / gcd) >> rshift) ?: (weight
//! != 0)`, where `gcd` is that of all weights > 0 and `rshift = max(0, fls(max_weight / gcd) - TAB_BITS)` keeps
//! `turns` within `TAB_BITS` bits. The kernel sets `TAB_BITS` to half the bits of its table index; Fulcrum does
//! the same for its larger tables (`TAB_BITS = floor(log2(M)) / 2`: 8 bits for 65537), so weight ratios are exact
//! up to 255:1 (after dividing by the gcd) and approximated beyond. Weight-0 servers get `turns = 0` and no
//! positions ("Ignore added server with zero weight").
//!
//! # Differences from the kernel
//!
//! - Hash functions: the kernel uses `hsiphash` with fixed keys; Fulcrum uses a fixed SplitMix64-style mixer of
//!   the server key (two constants for `h1`/`h2`) and of `client address << 16 | port`. Both are fixed, so every
//!   worker and every director builds the same table from the same server list: what lets ECMP'd directors
//!   agree on each client's server.
//! - Table size: the kernel's is a compile-time prime up to 131071 (default 4093); Fulcrum's is configurable,
//!   prime, at least 65537.
//! - The kernel builds from `last_weight` so a quiesced server keeps its positions; Fulcrum's table holds only
//!   servers with weight > 0 at the last rebuild.
//! - Unavailable server (weight 0 since the last rebuild): the kernel returns none, or with `mh-fallback` rehashes
//!   with offsets 0, 1, ... up to `M` times. Fulcrum always falls back: it probes up to `FALLBACK_PROBES`
//!   rehashed positions, then scans the server list, so that `None` means no server has weight > 0.

use std::net::Ipv4Addr;

use super::hashing::{mix64, reduce};
use super::{first_available_from, ServerView};

const EMPTY: u16 = u16::MAX;
/// Rehashed positions tried before scanning the server list when a client's position holds a quiesced server.
/// With a fraction `q` of the table quiesced since the last rebuild, all of them fail with probability `q^32`.
const FALLBACK_PROBES: u64 = 32;

const H1_SEED: u64 = 0x4D61_676C_6576_4831; // "MaglevH1"
const H2_SEED: u64 = 0x4D61_676C_6576_4832; // "MaglevH2"
const CLIENT_SEED: u64 = 0x4D61_676C_6576_4343; // "MaglevCC"

#[derive(Debug, Clone)]
pub(super) struct Maglev {
    size: u32,
    table: Vec<u16>,
}

/// `struct ip_vs_mh_dest_setup`.
#[derive(Debug, Clone, Copy)]
struct DestSetup {
    offset: u32,
    skip: u32,
    /// The next permutation position to try.
    perm: u32,
    turns: u32,
}

/// `fls()`: the 1-based index of the highest set bit, 0 for 0.
fn fls(x: u32) -> u32 {
    32 - x.leading_zeros()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Maglev {
    /// `ip_vs_mh_reassign`: permutations and population. `size` must be a prime (checked by the options).
    pub(super) fn build(servers: &[ServerView], size: u32) -> Maglev {
        debug_assert!(size >= 3 && servers.len() < EMPTY as usize);
        let mut table = vec![EMPTY; size as usize];
        // ip_vs_mh_gcd_weight: "If gcd is smaller then 1, number of dests or all last_weight of dests are zero."
        let g = servers.iter().map(|s| s.weight).filter(|&w| w > 0).fold(0, gcd);
        if g == 0 {
            return Maglev { size, table };
        }
        // ip_vs_mh_shift_weight: "shift = occupied bits of weight/gcd - MH highest bits".
        let tab_bits = size.ilog2() / 2;
        let max_weight = servers.iter().map(|s| s.weight).max().unwrap_or(0);
        let rshift = fls(max_weight / g).saturating_sub(tab_bits);
        // ip_vs_mh_permutate.
        let mut setups: Vec<DestSetup> = servers
            .iter()
            .map(|s| {
                let offset = (mix64(s.key ^ H1_SEED) % u64::from(size)) as u32;
                let skip = (mix64(s.key ^ H2_SEED) % u64::from(size - 1)) as u32 + 1;
                let turns = match (s.weight / g) >> rshift {
                    0 => u32::from(s.weight != 0),
                    t => t,
                };
                DestSetup { offset, skip, perm: offset, turns }
            })
            .collect();
        // ip_vs_mh_populate: servers in list order, each claiming `turns` positions per round.
        let mut filled = 0u32;
        'populate: loop {
            for (i, ds) in setups.iter_mut().enumerate() {
                // Ignore added server with zero weight.
                for _ in 0..ds.turns {
                    let mut c = ds.perm;
                    while table[c as usize] != EMPTY {
                        // Add skip, mod size.
                        ds.perm += ds.skip;
                        if ds.perm >= size {
                            ds.perm -= size;
                        }
                        c = ds.perm;
                    }
                    table[c as usize] = i as u16;
                    filled += 1;
                    if filled == size {
                        break 'populate;
                    }
                }
            }
        }
        debug_assert!(setups.iter().all(|ds| ds.offset < size && (1..size).contains(&ds.skip)));
        Maglev { size, table }
    }

    #[inline]
    fn client_hash(client: Ipv4Addr, port: u16) -> u64 {
        mix64(((u64::from(u32::from(client)) << 16) | u64::from(port)) ^ CLIENT_SEED)
    }

    /// `ip_vs_mh_get_fallback`, then a scan of the servers.
    #[inline]
    pub(super) fn pick(&self, client: Ipv4Addr, port: u16, servers: &[ServerView]) -> Option<usize> {
        let hash = Maglev::client_hash(client, port);
        let available = |s: u16| servers.get(usize::from(s)).is_some_and(|v| v.weight > 0);
        let first = self.table[reduce(hash, self.size) as usize];
        if available(first) {
            return Some(usize::from(first));
        }
        if first != EMPTY {
            for probe in 1..=FALLBACK_PROBES {
                let dest = self.table[reduce(mix64(hash.wrapping_add(probe)), self.size) as usize];
                if available(dest) {
                    return Some(usize::from(dest));
                }
            }
        }
        first_available_from(servers, (hash % servers.len().max(1) as u64) as usize)
    }

    #[cfg(test)]
    fn table(&self) -> &[u16] {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{SchedulerKind, SchedulerOptions, SchedulerState, MIN_MAGLEV_TABLE_SIZE};
    use super::*;

    const M: u32 = MIN_MAGLEV_TABLE_SIZE;

    fn slot_shares(mh: &Maglev, n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &s in mh.table() {
            counts[s as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / mh.table().len() as f64).collect()
    }

    /// Each flow's server key, for flows given as (client, port).
    fn keys_of(list: &[ServerView], flows: &[(Ipv4Addr, u16)]) -> Vec<u64> {
        let mh = Maglev::build(list, M);
        flows.iter().map(|&(c, p)| list[mh.pick(c, p, list).unwrap()].key).collect()
    }

    fn flows(n: usize) -> Vec<(Ipv4Addr, u16)> {
        clients(n, 1234).into_iter().enumerate().map(|(i, c)| (c, (i % 60_000) as u16 + 1024)).collect()
    }

    #[test]
    fn the_table_is_filled_and_shares_follow_weights() {
        for weights in [&[1u32, 1, 1, 1, 1][..], &[1, 2, 3, 4], &[10, 20, 30], &[100, 1, 50, 7], &[3]] {
            let list = servers(weights);
            let mh = Maglev::build(&list, M);
            assert_eq!(mh.table().len(), M as usize);
            assert!(mh.table().iter().all(|&s| (s as usize) < list.len()), "{weights:?}: table not filled");
            let total: u32 = weights.iter().sum();
            for (i, share) in slot_shares(&mh, list.len()).into_iter().enumerate() {
                let want = f64::from(weights[i]) / f64::from(total);
                assert!(
                    (share - want).abs() < 0.01,
                    "{weights:?}: server {i} has {share:.4} of the table, want {want:.4}"
                );
            }
        }
    }

    #[test]
    fn flows_follow_the_table_shares() {
        let list = servers(&[1, 2, 3, 4]);
        let mh = Maglev::build(&list, M);
        let mut counts = [0usize; 4];
        let flows = flows(100_000);
        for &(c, p) in &flows {
            counts[mh.pick(c, p, &list).unwrap()] += 1;
        }
        for (i, &count) in counts.iter().enumerate() {
            let (share, want) = (count as f64 / flows.len() as f64, (i + 1) as f64 / 10.0);
            assert!((share - want).abs() < 0.015, "server {i}: {share:.4} of flows, want {want}");
        }
    }

    #[test]
    fn quiesced_servers_get_no_positions() {
        let list = servers(&[2, 0, 2]);
        let mh = Maglev::build(&list, M);
        assert!(!mh.table().contains(&1));
        let shares = slot_shares(&mh, 3);
        assert!((shares[0] - 0.5).abs() < 0.01 && shares[1] == 0.0);
        let none = Maglev::build(&servers(&[0, 0]), M);
        assert!(none.table().iter().all(|&s| s == EMPTY));
        assert_eq!(none.pick(Ipv4Addr::new(1, 2, 3, 4), 0, &servers(&[0, 0])), None);
        assert_eq!(Maglev::build(&[], M).pick(Ipv4Addr::new(1, 2, 3, 4), 0, &[]), None);
    }

    #[test]
    fn turns_follow_ip_vs_mh_shift_weight() {
        // gcd 5, max 65535/5 = 13107 (14 bits), TAB_BITS 8 for 65537: rshift 6.
        let list = servers(&[65_535, 5, 0]);
        let g = 5;
        let rshift = fls(65_535 / g).saturating_sub(M.ilog2() / 2);
        assert_eq!(rshift, 6);
        assert_eq!((65_535 / g) >> rshift, 204);
        // Server 1: (5/5) >> 6 = 0, so 1 turn (weight != 0): 204:1.
        let shares = slot_shares(&Maglev::build(&list, M), 3);
        assert!((shares[0] - 204.0 / 205.0).abs() < 0.005, "{shares:?}");
    }

    /// Removing one of N servers moves about 1/N of the flows: those of the removed server, and few others.
    #[test]
    fn removing_a_server_disrupts_little_and_adding_it_back_restores() {
        let flows = flows(100_000);
        for n in 5..=10usize {
            let all = servers(&vec![1; n]);
            let before = keys_of(&all, &flows);
            for removed in [0, n / 2, n - 1] {
                let mut fewer = all.clone();
                let gone = fewer.remove(removed).key;
                let after = keys_of(&fewer, &flows);
                let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
                let (others, others_kept) = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, _)| **b != gone)
                    .fold((0, 0), |(o, k), (b, a)| (o + 1, k + usize::from(b == a)));
                let kept = others_kept as f64 / others as f64;
                let moved = moved as f64 / flows.len() as f64;
                assert!(kept >= 0.99, "N={n}, removed {removed}: only {kept:.4} of other flows stayed");
                let ideal = 1.0 / n as f64;
                assert!(moved >= ideal - 0.01 && moved <= ideal + 0.01, "N={n}: moved {moved:.4}, ideal {ideal:.4}");
                assert!(after.iter().all(|&k| k != gone));
                // Adding it back (same position in the list) restores every flow.
                assert_eq!(keys_of(&all, &flows), before);
            }
        }
    }

    /// The table depends only on the server list: reordering nothing, another worker builds the same table.
    #[test]
    fn the_table_is_deterministic() {
        let list = servers(&[1, 2, 3]);
        assert_eq!(Maglev::build(&list, M).table(), Maglev::build(&list, M).table());
        let bigger = SchedulerOptions { maglev_table_size: 131_071, ..SchedulerOptions::default() };
        let mut a = SchedulerState::new(SchedulerKind::Mh, &list, &bigger).unwrap();
        let mut b = SchedulerState::new(SchedulerKind::Mh, &list, &bigger).unwrap();
        let now = t0();
        for client in clients(1000, 4) {
            assert_eq!(a.pick(&input(&list, client, now)), b.pick(&input(&list, client, now)));
        }
    }

    #[test]
    fn a_server_quiesced_since_the_rebuild_falls_back() {
        let list = servers(&[1, 1, 1, 1]);
        let mh = Maglev::build(&list, M);
        let mut quiesced = list.clone();
        quiesced[1].weight = 0;
        let mut moved = [0usize; 4];
        for (c, p) in flows(20_000) {
            let before = mh.pick(c, p, &list).unwrap();
            let after = mh.pick(c, p, &quiesced).unwrap();
            assert_ne!(after, 1);
            if before == 1 {
                moved[after] += 1;
            } else {
                assert_eq!(after, before);
            }
        }
        // The displaced flows spread over the remaining servers.
        for s in [0, 2, 3] {
            assert!(moved[s] > 1000, "{moved:?}");
        }
        // Only one server left available: the probes may miss, the scan does not.
        let mut one = list.clone();
        for s in &mut one[..3] {
            s.weight = 0;
        }
        for (c, p) in flows(1000) {
            assert_eq!(mh.pick(c, p, &one), Some(3));
        }
    }
}
