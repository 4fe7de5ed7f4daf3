//! Round robin (`ip_vs_rr.c`) and interleaved weighted round robin (`ip_vs_wrr.c`).
//!
//! The kernel walks a circular list with a head; here the head is `None` and a server is `Some(index)`.

use super::ServerView;

/// `rr`: the next server after the last one picked (cyclically) whose weight is > 0. The first pick after
/// construction is the first available server, as the kernel starts at the list head.
#[derive(Debug, Clone, Default)]
pub(super) struct RoundRobin {
    last: Option<usize>,
}

impl RoundRobin {
    pub(super) fn new() -> RoundRobin {
        RoundRobin { last: None }
    }

    /// The position survives while it is still inside the list (the kernel keeps it across adds; on delete it
    /// steps back to the previous server).
    pub(super) fn rebuild(&mut self, servers: &[ServerView]) {
        if self.last.is_some_and(|last| last >= servers.len()) {
            self.last = None;
        }
    }

    #[inline]
    pub(super) fn pick(&mut self, servers: &[ServerView]) -> Option<usize> {
        let n = servers.len();
        let start = self.last.map_or(0, |last| last + 1);
        // From the one after `last` to the end, then from the head up to and including `last`.
        let found = (0..n).map(|k| (start + k) % n).find(|&i| servers[i].weight > 0)?;
        self.last = Some(found);
        Some(found)
    }
}

/// `wrr`, exactly `ip_vs_wrr.c`:
///
/// > - mw: maximum weight
/// > - di: weight step, greatest common divisor from all weights
/// > - cw: current required weight
/// >
/// > First, we start with cw = mw and select dests with weight >= cw. Then cw is reduced with di and all dests
/// > are checked again. [...] mw is calculated, now it is reduced with (di - 1), so that last cw is 1 to catch
/// > such dests with weight below di.
///
/// Over one cycle (`mw / di` passes) each server is picked `weight / di` times, interleaved: weights (4, 3, 2)
/// give `A A B A B C A B C`. `mw` and `di` come from the weights at the last rebuild (as the kernel computes them
/// on `add_dest`/`upd_dest`); each pick compares the servers' current weights with `cw`, so a server quiesced
/// since is skipped, and the final pass with `cw = 1` still finds any server whose weight dropped below `di`.
#[derive(Debug, Clone)]
pub(super) struct WeightedRoundRobin {
    /// `mark->cl`: the last server picked, or the head.
    cl: Option<usize>,
    cw: i64,
    mw: i64,
    di: i64,
}

/// `ip_vs_wrr_gcd_weight`: gcd of the weights > 0, or 1 when there are none.
fn gcd_weight(servers: &[ServerView]) -> i64 {
    let g = servers.iter().map(|s| i64::from(s.weight)).filter(|&w| w > 0).fold(0, gcd);
    if g > 0 {
        g
    } else {
        1
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `ip_vs_wrr_max_weight`.
fn max_weight(servers: &[ServerView]) -> i64 {
    servers.iter().map(|s| i64::from(s.weight)).max().unwrap_or(0)
}

impl WeightedRoundRobin {
    /// `ip_vs_wrr_init_svc`.
    pub(super) fn new(servers: &[ServerView]) -> WeightedRoundRobin {
        let di = gcd_weight(servers);
        let mw = max_weight(servers) - (di - 1);
        WeightedRoundRobin { cl: None, cw: mw, mw, di }
    }

    /// `ip_vs_wrr_dest_changed`.
    pub(super) fn rebuild(&mut self, servers: &[ServerView]) {
        self.cl = None;
        self.di = gcd_weight(servers);
        self.mw = max_weight(servers) - (self.di - 1);
        if self.cw > self.mw || self.cw == 0 {
            self.cw = self.mw;
        } else if self.di > 1 {
            self.cw = (self.cw / self.di) * self.di + 1;
        }
    }

    /// `ip_vs_wrr_schedule`, line for line (without the kernel's overload flag, which Fulcrum does not have).
    #[inline]
    pub(super) fn pick(&mut self, servers: &[ServerView]) -> Option<usize> {
        if self.mw == 0 {
            // "No available dests?"
            return None;
        }
        let last = self.cl;
        let mut dest = self.cl;
        let mut stop: Option<usize> = None;
        let mut last_pass = false;
        let mut restarted = false;
        // Stop only after all dests were checked for weight >= 1 (last pass).
        loop {
            // list_for_each_entry_continue: from the one after `dest` to the end of the list.
            let from = dest.map_or(0, |d| d + 1);
            for (i, server) in servers.iter().enumerate().skip(from) {
                if i64::from(server.weight) >= self.cw {
                    self.cl = Some(i);
                    return Some(i);
                }
                if stop == Some(i) {
                    // All destinations checked for weight >= 1.
                    self.cl = Some(i);
                    return None;
                }
            }
            dest = None;
            self.cw -= self.di;
            if self.cw <= 0 {
                self.cw = self.mw;
                // Stop if we tried the last pass from the first dest: either the last pass started when
                // cw > di but all dests were then checked for w >= 1, or `last` was the head and the only
                // traversal was for weight >= 1 over all dests.
                if last_pass || last.is_none() {
                    self.cl = None;
                    return None;
                }
                restarted = true;
            }
            last_pass = self.cw <= self.di;
            if last_pass && restarted && last.is_some() {
                // The first traversal was for w >= 1 but only for dests after `last`: now do the same for
                // all dests up to `last`.
                stop = last;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::servers;
    use super::*;
    use proptest::prelude::*;

    fn sequence(weights: &[u32], picks: usize) -> Vec<usize> {
        let list = servers(weights);
        let mut wrr = WeightedRoundRobin::new(&list);
        (0..picks).map(|_| wrr.pick(&list).unwrap()).collect()
    }

    fn letters(seq: &[usize]) -> String {
        seq.iter().map(|&i| (b'A' + i as u8) as char).collect()
    }

    #[test]
    fn rr_is_even_within_one_and_skips_quiesced() {
        for n in 1..=7usize {
            let list = servers(&vec![1; n]);
            let mut rr = RoundRobin::new();
            for picks in [1usize, n, 3 * n + 2, 1000] {
                let mut counts = vec![0usize; n];
                for _ in 0..picks {
                    counts[rr.pick(&list).unwrap()] += 1;
                }
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(max - min <= 1, "{n} servers, {picks} picks: {counts:?}");
            }
        }
        let list = servers(&[1, 0, 5, 0]);
        let mut rr = RoundRobin::new();
        let seq: Vec<usize> = (0..6).map(|_| rr.pick(&list).unwrap()).collect();
        assert_eq!(seq, [0, 2, 0, 2, 0, 2], "weights other than 0 do not matter to rr");
        assert_eq!(rr.pick(&servers(&[0, 0])), None);
        assert_eq!(rr.pick(&[]), None);
    }

    #[test]
    fn rr_starts_at_the_head_and_resumes_after_a_rebuild() {
        let list = servers(&[1, 1, 1]);
        let mut rr = RoundRobin::new();
        assert_eq!([rr.pick(&list), rr.pick(&list)], [Some(0), Some(1)]);
        let longer = servers(&[1, 1, 1, 1]);
        rr.rebuild(&longer);
        assert_eq!([rr.pick(&longer), rr.pick(&longer), rr.pick(&longer)], [Some(2), Some(3), Some(0)]);
        rr.pick(&longer);
        rr.pick(&longer);
        rr.pick(&longer); // last = 3
        let shorter = servers(&[1, 1]);
        rr.rebuild(&shorter);
        assert_eq!(rr.pick(&shorter), Some(0));
    }

    /// Derivation for (4, 3, 2): di = 1, mw = 4.
    /// cw=4: A. cw=3: A B. cw=2: A B C. cw=1: A B C. Then cw wraps to 4.
    #[test]
    fn wrr_interleaves_like_lvs() {
        assert_eq!(letters(&sequence(&[4, 3, 2], 9)), "AABABCABC");
        assert_eq!(letters(&sequence(&[4, 3, 2], 18)), "AABABCABCAABABCABC");
        // gcd stepping: (6, 4, 2) has di = 2, mw = 5: passes cw = 5, 3, 1.
        assert_eq!(letters(&sequence(&[6, 4, 2], 6)), "AABABC");
        // (5, 1, 1): cw = 5..2 only A, then cw = 1 all.
        assert_eq!(letters(&sequence(&[5, 1, 1], 7)), "AAAAABC");
        assert_eq!(letters(&sequence(&[1, 1, 1], 4)), "ABCA");
        assert_eq!(letters(&sequence(&[0, 2, 0, 1], 6)), "BBDBBD");
    }

    #[test]
    fn wrr_gives_exact_proportions_per_cycle() {
        let cases: [&[u32]; 6] = [&[4, 3, 2], &[6, 4, 2], &[1, 2, 3, 4, 5], &[100, 50, 25], &[7, 0, 13, 1], &[3]];
        for weights in cases {
            let g = weights.iter().copied().filter(|&w| w > 0).fold(0, |a, b| gcd(a, b as i64)) as u32;
            let cycle: usize = weights.iter().map(|&w| (w / g) as usize).sum();
            for cycles in [1, 3] {
                let mut counts = vec![0u32; weights.len()];
                for i in sequence(weights, cycle * cycles) {
                    counts[i] += 1;
                }
                let expected: Vec<u32> = weights.iter().map(|&w| w / g * cycles as u32).collect();
                assert_eq!(counts, expected, "{weights:?}");
            }
        }
    }

    #[test]
    fn wrr_with_no_weights_picks_nothing() {
        assert_eq!(sequence(&[], 0), Vec::<usize>::new());
        let list = servers(&[0, 0]);
        let mut wrr = WeightedRoundRobin::new(&list);
        assert_eq!(wrr.pick(&list), None);
        assert_eq!(wrr.pick(&[]), None);
    }

    #[test]
    fn wrr_rebuild_adjusts_cw_like_the_kernel() {
        let list = servers(&[4, 3, 2]);
        let mut wrr = WeightedRoundRobin::new(&list);
        for _ in 0..4 {
            wrr.pick(&list); // A A B A: cw = 2
        }
        assert_eq!(wrr.cw, 2);
        // New weights (8, 4): di = 4, mw = 5; cw = 2 <= mw and di > 1: cw = (2 / 4) * 4 + 1 = 1.
        let list = servers(&[8, 4]);
        wrr.rebuild(&list);
        assert_eq!((wrr.cl, wrr.cw, wrr.mw, wrr.di), (None, 1, 5, 4));
        assert_eq!(letters(&(0..4).map(|_| wrr.pick(&list).unwrap()).collect::<Vec<_>>()), "ABAA");
        // cw above the new mw: restart at mw.
        let list = servers(&[1, 1]);
        wrr.rebuild(&list);
        assert_eq!((wrr.cw, wrr.mw, wrr.di), (1, 1, 1));
        // All weights gone then back: cw was 0 (mw 0), restarts at the new mw.
        wrr.rebuild(&servers(&[0, 0]));
        assert_eq!((wrr.cw, wrr.mw), (0, 0));
        let list = servers(&[2, 1]);
        wrr.rebuild(&list);
        assert_eq!(wrr.cw, 2);
        assert_eq!(letters(&(0..3).map(|_| wrr.pick(&list).unwrap()).collect::<Vec<_>>()), "AAB");
    }

    proptest! {
        /// Weights changed (even to 0) since the last rebuild: wrr still terminates, never picks weight 0, and
        /// finds a server whenever one has weight > 0.
        #[test]
        fn wrr_survives_weights_changed_without_rebuild(
            weights in proptest::collection::vec((0u32..20, 0u32..20), 0..8),
            picks_before in 0usize..20,
        ) {
            let built_list = servers(&weights.iter().map(|w| w.0).collect::<Vec<_>>());
            let now_list = servers(&weights.iter().map(|w| w.1).collect::<Vec<_>>());
            let mut wrr = WeightedRoundRobin::new(&built_list);
            for _ in 0..picks_before {
                wrr.pick(&built_list);
            }
            let any = now_list.iter().any(|s| s.weight > 0);
            for _ in 0..30 {
                match wrr.pick(&now_list) {
                    Some(i) => prop_assert!(now_list[i].weight > 0),
                    None => prop_assert!(!any || wrr.mw == 0, "missed an available server"),
                }
            }
        }
    }
}
