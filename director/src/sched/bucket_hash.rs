//! Source hashing (`sh`, `ip_vs_sh.c`) and destination hashing (`dh`, `ip_vs_dh.c`): a 256-bucket table maps a
//! hash of one address to a server.
//!
//! # Hash
//!
//! As the current kernel: `sh` uses `(offset + hash_32(ntohs(port) + ntohl(addr), 8)) & 255`, the port being 0
//! unless port hashing is on ([`super::SchedulerOptions::hash_client_port`]); `dh` uses `hash_32(ntohl(daddr), 8)`.
//!
//! # Buckets
//!
//! `ip_vs_sh_reassign` walks the servers cyclically, giving each `weight` consecutive buckets ("Don't move to next
//! dest until filling weight"; a weight-0 server still gets one bucket), until the 256 buckets are filled. Fulcrum
//! builds exactly that table whenever the turns (`max(weight, 1)` per server) add up to at most 256, so an `sh`
//! service maps clients as LVS does with the same server order. Above 256 the kernel would leave later servers
//! without buckets; Fulcrum then apportions the 256 buckets to the servers with weight > 0 in proportion to
//! weight (largest remainder, at least one bucket each while there are at most 256 of them), in contiguous runs.
//!
//! `dh` in the kernel ignores weights (one bucket per server, cyclically). Fulcrum weights `dh` like `sh`; with
//! all weights equal to 1 the table is the kernel's.
//!
//! # Unavailable servers
//!
//! The kernel returns "no destination" when the bucket's server has weight 0, unless the service has the
//! `sh-fallback` flag, in which case `ip_vs_sh_get_fallback` "loops around the table starting from a 'random'
//! point (in fact, it is chosen to be the original hash value to make the algorithm deterministic) to find a
//! new server". Fulcrum always falls back that way (`dh` too, which has no such flag in the kernel), and if all
//! 256 buckets are unavailable, scans the server list, so that only "no server has weight > 0" gives `None`.

use std::net::Ipv4Addr;

use super::hashing::hash_32;
use super::{first_available_from, ServerView};

pub(super) const TAB_BITS: u32 = 8;
pub(super) const TAB_SIZE: usize = 1 << TAB_BITS;
const TAB_MASK: u32 = (TAB_SIZE - 1) as u32;
const EMPTY: u16 = u16::MAX;

/// `hash_32(port + addr, 8)`: the bucket for offset 0 (`ip_vs_sh_hashkey(af, addr, port, 0)`).
#[inline]
pub(super) fn hash_key(addr: Ipv4Addr, port: u16) -> u32 {
    hash_32(u32::from(port).wrapping_add(u32::from(addr)), TAB_BITS)
}

/// The bucket table of one `sh` or `dh` service.
#[derive(Debug, Clone)]
pub(super) struct BucketTable {
    /// Server index per bucket; `EMPTY` only when there are no servers (or none with weight > 0 after
    /// apportioning).
    buckets: Vec<u16>,
}

impl BucketTable {
    pub(super) fn build(servers: &[ServerView]) -> BucketTable {
        let mut buckets = vec![EMPTY; TAB_SIZE];
        let turns: u64 = servers.iter().map(|s| u64::from(s.weight.max(1))).sum();
        if servers.is_empty() {
            // Nothing to assign.
        } else if turns <= TAB_SIZE as u64 {
            assign_like_the_kernel(servers, &mut buckets);
        } else {
            apportion(servers, &mut buckets);
        }
        BucketTable { buckets }
    }

    /// `ip_vs_sh_get_fallback` with `hkey = hash_32(...)` (the bucket for offset 0), then a scan of the servers.
    #[inline]
    pub(super) fn pick(&self, hkey: u32, servers: &[ServerView]) -> Option<usize> {
        let available = |b: u16| servers.get(usize::from(b)).is_some_and(|s| s.weight > 0);
        // First try the dest it's supposed to go to.
        let ihash = hkey & TAB_MASK;
        let first = self.buckets[ihash as usize];
        if first == EMPTY {
            return first_available_from(servers, ihash as usize);
        }
        if available(first) {
            return Some(usize::from(first));
        }
        // If the original dest is unavailable, loop around the table starting from ihash to find a new dest.
        for offset in 0..TAB_SIZE as u32 {
            let roffset = (offset + ihash) % TAB_SIZE as u32;
            let hash = roffset.wrapping_add(hkey) & TAB_MASK;
            let dest = self.buckets[hash as usize];
            if dest == EMPTY {
                break;
            }
            if available(dest) {
                return Some(usize::from(dest));
            }
        }
        first_available_from(servers, ihash as usize)
    }

    #[cfg(test)]
    pub(super) fn buckets(&self) -> &[u16] {
        &self.buckets
    }
}

/// `ip_vs_sh_reassign`: each server in turn gets `weight` consecutive buckets (at least one), cyclically.
fn assign_like_the_kernel(servers: &[ServerView], buckets: &mut [u16]) {
    let mut p = 0usize;
    let mut d_count = 0u32;
    for bucket in buckets.iter_mut() {
        *bucket = p as u16;
        // Don't move to next dest until filling weight.
        d_count += 1;
        if d_count >= servers[p].weight {
            p = (p + 1) % servers.len();
            d_count = 0;
        }
    }
}

/// Fulcrum's extension for weight sums above 256: buckets in proportion to weight among servers with weight
/// > 0, each of those getting at least one while they number at most 256; contiguous runs in server order.
fn apportion(servers: &[ServerView], buckets: &mut [u16]) {
    let available: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].weight > 0).collect();
    if available.is_empty() {
        return;
    }
    let size = buckets.len() as u64;
    let mut counts = vec![0u64; available.len()];
    if available.len() as u64 >= size {
        // More servers than buckets: the first 256 available servers get one each.
        counts.iter_mut().take(buckets.len()).for_each(|c| *c = 1);
    } else {
        // One each, then the rest by weight, largest remainder first (ties to the earlier server).
        let spare = size - available.len() as u64;
        let total: u64 = available.iter().map(|&i| u64::from(servers[i].weight)).sum();
        let mut remainders = Vec::with_capacity(available.len());
        for (k, &i) in available.iter().enumerate() {
            let share = spare * u64::from(servers[i].weight);
            counts[k] = 1 + share / total;
            remainders.push((share % total, k));
        }
        let assigned: u64 = counts.iter().sum();
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, k) in remainders.iter().take((size - assigned) as usize) {
            counts[k] += 1;
        }
    }
    let mut next = 0;
    for (k, &i) in available.iter().enumerate() {
        for bucket in &mut buckets[next..next + counts[k] as usize] {
            *bucket = i as u16;
        }
        next += counts[k] as usize;
    }
    debug_assert_eq!(next, buckets.len());
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{SchedulerKind, SchedulerOptions, SchedulerState};
    use super::*;

    fn shares(weights: &[u32], kind: SchedulerKind, flows: usize) -> Vec<f64> {
        let list = servers(weights);
        let mut state = state(kind, &list);
        let now = t0();
        let mut counts = vec![0usize; weights.len()];
        for addr in clients(flows, 77) {
            let mut pick = input(&list, addr, now);
            pick.dest = addr;
            counts[state.pick(&pick).unwrap()] += 1;
        }
        counts.iter().map(|&c| c as f64 / flows as f64).collect()
    }

    fn assert_shares_follow_weights(weights: &[u32], kind: SchedulerKind, tolerance: f64) {
        let total: u32 = weights.iter().sum();
        let got = shares(weights, kind, 100_000);
        for (i, (&w, &share)) in weights.iter().zip(&got).enumerate() {
            let want = f64::from(w) / f64::from(total);
            assert!((share - want).abs() <= tolerance, "{kind} {weights:?}: server {i} got {share:.4}, want {want:.4}");
        }
    }

    #[test]
    fn the_table_is_the_kernels_for_small_weights() {
        let table = BucketTable::build(&servers(&[1, 2, 3]));
        let want: Vec<u16> = [0u16, 1, 1, 2, 2, 2].iter().copied().cycle().take(TAB_SIZE).collect();
        assert_eq!(table.buckets(), &want[..]);
        // A weight-0 server keeps one bucket, as in the kernel (it is skipped at pick time).
        let table = BucketTable::build(&servers(&[2, 0, 1]));
        let want: Vec<u16> = [0u16, 0, 1, 2].iter().copied().cycle().take(TAB_SIZE).collect();
        assert_eq!(table.buckets(), &want[..]);
        // Sum exactly 256: one run each.
        let table = BucketTable::build(&servers(&[200, 56]));
        assert_eq!(table.buckets().iter().filter(|&&b| b == 0).count(), 200);
        assert_eq!(table.buckets()[199..201], [0, 1]);
    }

    #[test]
    fn large_weights_are_apportioned_instead_of_starving_later_servers() {
        // The kernel would give 256 buckets to the first server and none to the second.
        let table = BucketTable::build(&servers(&[1000, 3000]));
        let count = |s: u16| table.buckets().iter().filter(|&&b| b == s).count();
        assert_eq!((count(0), count(1)), (65, 191));
        // Quiesced servers get nothing here; tiny weights still get one bucket.
        let table = BucketTable::build(&servers(&[65_535, 0, 1, 65_535]));
        let count = |s: u16| table.buckets().iter().filter(|&&b| b == s).count();
        assert_eq!((count(0), count(1), count(2), count(3)), (128, 0, 1, 127));
        // More available servers than buckets: every bucket still holds an available server.
        let many = servers(&vec![2; 300]);
        let table = BucketTable::build(&many);
        assert!(table.buckets().iter().all(|&b| (b as usize) < 256));
    }

    #[test]
    fn the_kernel_hash() {
        // hash_32(ntohl(addr), 8) with 10.0.0.1 = 0x0A000001.
        assert_eq!(hash_key(Ipv4Addr::new(10, 0, 0, 1), 0), 0x0A00_0001u32.wrapping_mul(0x61C8_8647) >> 24);
        // The port is added to the address before hashing.
        assert_eq!(hash_key(Ipv4Addr::new(10, 0, 0, 1), 5), hash_key(Ipv4Addr::new(10, 0, 0, 6), 0));
    }

    #[test]
    fn sh_is_stable_per_client() {
        let list = servers(&[1, 2, 3, 4]);
        let mut a = state(SchedulerKind::Sh, &list);
        let mut b = state(SchedulerKind::Sh, &list);
        let now = t0();
        for client in clients(1000, 5) {
            let first = a.pick(&input(&list, client, now));
            for port in [1, 40_000, 65_535] {
                let mut pick = input(&list, client, now);
                pick.client_port = port;
                assert_eq!(a.pick(&pick), first, "same client, any port");
                assert_eq!(b.pick(&pick), first, "another worker agrees");
            }
        }
    }

    #[test]
    fn sh_spreads_by_weight() {
        assert_shares_follow_weights(&[1, 1, 1, 1], SchedulerKind::Sh, 0.02);
        assert_shares_follow_weights(&[1, 2, 3, 4], SchedulerKind::Sh, 0.02);
        assert_shares_follow_weights(&[5, 1, 10], SchedulerKind::Sh, 0.02);
        assert_shares_follow_weights(&[1000, 3000], SchedulerKind::Sh, 0.02);
    }

    #[test]
    fn dh_is_stable_per_destination_and_spreads_by_weight() {
        let list = servers(&[1, 1, 2]);
        let mut dh = state(SchedulerKind::Dh, &list);
        let now = t0();
        for dest in clients(1000, 6) {
            let mut pick = input(&list, Ipv4Addr::new(198, 51, 100, 1), now);
            pick.dest = dest;
            let first = dh.pick(&pick);
            pick.client = Ipv4Addr::new(203, 0, 113, 9);
            pick.client_port = 1234;
            assert_eq!(dh.pick(&pick), first, "only the destination matters");
        }
        assert_shares_follow_weights(&[1, 1, 2], SchedulerKind::Dh, 0.02);
        assert_shares_follow_weights(&[3, 1], SchedulerKind::Dh, 0.02);
    }

    #[test]
    fn sh_port_hashing_spreads_one_client() {
        let list = servers(&[1, 1, 1, 1]);
        let options = SchedulerOptions { hash_client_port: true, ..SchedulerOptions::default() };
        let mut sh = SchedulerState::new(SchedulerKind::Sh, &list, &options).unwrap();
        let now = t0();
        let mut seen = [false; 4];
        for port in 1000..1100 {
            let mut pick = input(&list, Ipv4Addr::new(198, 51, 100, 7), now);
            pick.client_port = port;
            seen[sh.pick(&pick).unwrap()] = true;
        }
        assert_eq!(seen, [true; 4]);
    }

    #[test]
    fn fallback_is_deterministic_and_only_moves_the_quiesced_servers_clients() {
        let list = servers(&[1, 1, 1, 1]);
        let mut sh = state(SchedulerKind::Sh, &list);
        let mut quiesced = list.clone();
        quiesced[2].weight = 0;
        let now = t0();
        for client in clients(2000, 8) {
            let before = sh.pick(&input(&list, client, now)).unwrap();
            let after = sh.pick(&input(&quiesced, client, now)).unwrap();
            assert_ne!(after, 2);
            if before != 2 {
                assert_eq!(after, before, "clients of other servers stay put until the rebuild");
            }
            assert_eq!(sh.pick(&input(&quiesced, client, now)).unwrap(), after, "deterministic");
        }
    }
}
