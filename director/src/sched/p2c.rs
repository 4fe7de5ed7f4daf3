//! Power of two choices (`p2c`): draw two distinct servers uniformly at random among those with weight > 0 and
//! send the connection to the one with the lower `conn_overhead / weight` (`wlc`'s load, compared the same way;
//! on a tie the first drawn). Mitzenmacher's "power of two choices" keeps the maximum load within O(log log n)
//! of the mean, and unlike `wlc` it does not send every worker's next connections to the same least-loaded
//! server while their shared counters lag behind: the herding that per-worker schedulers with global counts are
//! prone to.
//!
//! The candidates come from the list of servers with weight > 0 at the last rebuild; a candidate quiesced since
//! then makes this pick fall back to `wlc` over all servers (never to a weight-0 server).

use super::hashing::XorShift64Star;
use super::least_conn::{conn_overhead, heavier, wlc};
use super::ServerView;

#[derive(Debug, Clone)]
pub(super) struct P2c {
    rng: XorShift64Star,
    /// Indices of the servers with weight > 0 at the last rebuild.
    eligible: Vec<u16>,
}

fn eligible(servers: &[ServerView]) -> Vec<u16> {
    (0..servers.len()).filter(|&i| servers[i].weight > 0).map(|i| i as u16).collect()
}

impl P2c {
    pub(super) fn new(servers: &[ServerView], seed: u64) -> P2c {
        P2c { rng: XorShift64Star::new(seed), eligible: eligible(servers) }
    }

    pub(super) fn rebuild(&mut self, servers: &[ServerView]) {
        self.eligible = eligible(servers);
    }

    #[inline]
    pub(super) fn pick(&mut self, servers: &[ServerView]) -> Option<usize> {
        let available = |i: u16| servers.get(usize::from(i)).is_some_and(|s| s.weight > 0);
        let m = self.eligible.len() as u32;
        match m {
            0 => wlc(servers),
            1 => {
                let only = self.eligible[0];
                if available(only) {
                    Some(usize::from(only))
                } else {
                    wlc(servers)
                }
            }
            _ => {
                let i = self.rng.below(m);
                let mut j = self.rng.below(m - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (self.eligible[i as usize], self.eligible[j as usize]);
                if !available(a) || !available(b) {
                    return wlc(servers);
                }
                let (sa, sb) = (&servers[usize::from(a)], &servers[usize::from(b)]);
                if heavier(conn_overhead(sa), sa.weight, conn_overhead(sb), sb.weight) {
                    Some(usize::from(b))
                } else {
                    Some(usize::from(a))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::servers;
    use super::*;

    #[test]
    fn never_picks_quiesced_servers_and_draws_both_candidates_distinct() {
        let list = servers(&[0, 1, 0, 1, 1, 0]);
        let mut p2c = P2c::new(&list, 7);
        let mut counts = [0usize; 6];
        for _ in 0..30_000 {
            counts[p2c.pick(&list).unwrap()] += 1;
        }
        assert_eq!((counts[0], counts[2], counts[5]), (0, 0, 0));
        // Equal (zero) loads: ties go to the first drawn, uniformly random: an even spread.
        for c in [counts[1], counts[3], counts[4]] {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        // Two available servers, one loaded: distinct candidates mean the loaded one is never chosen.
        let mut two = servers(&[1, 0, 1]);
        two[0].active = 1;
        let mut p2c = P2c::new(&two, 7);
        assert!((0..1000).all(|_| p2c.pick(&two) == Some(2)));
    }

    #[test]
    fn single_and_no_candidates() {
        let list = servers(&[0, 3]);
        let mut p2c = P2c::new(&list, 1);
        assert_eq!(p2c.pick(&list), Some(1));
        assert_eq!(p2c.pick(&servers(&[0, 0])), None, "quiesced since the rebuild");
        let mut none = P2c::new(&servers(&[0, 0]), 1);
        assert_eq!(none.pick(&servers(&[0, 0])), None);
        assert_eq!(none.pick(&servers(&[0, 2])), Some(1), "available since the rebuild: wlc fallback");
        assert_eq!(P2c::new(&[], 1).pick(&[]), None);
    }

    #[test]
    fn the_seed_decides_the_draws() {
        let mut list = servers(&[1; 8]);
        for (i, s) in list.iter_mut().enumerate() {
            s.active = i as u32 % 3;
        }
        let draws = |seed| {
            let mut p2c = P2c::new(&list, seed);
            (0..64).map(|_| p2c.pick(&list).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }

    /// Start from a skewed state (one server far busier) and place 2000 new connections, each adding an active
    /// connection to the server picked. Uniform random choice keeps feeding the busy server and leaves the
    /// others unevenly loaded; p2c avoids the busy one entirely and keeps the others within a few connections.
    #[test]
    fn beats_random_choice_on_a_skewed_load() {
        const N: usize = 10;
        const ARRIVALS: usize = 2000;
        let skewed = || {
            let mut list = servers(&[1; N]);
            list[0].active = 500;
            list
        };
        let spread = |list: &[ServerView]| {
            let rest = list[1..].iter().map(|s| s.active);
            rest.clone().max().unwrap() - rest.min().unwrap()
        };

        let mut p2c_list = skewed();
        let mut p2c = P2c::new(&p2c_list, 11);
        for _ in 0..ARRIVALS {
            let i = p2c.pick(&p2c_list).unwrap();
            p2c_list[i].active += 1;
        }

        let mut random_list = skewed();
        let mut rng = XorShift64Star::new(11);
        for _ in 0..ARRIVALS {
            random_list[rng.below(N as u32) as usize].active += 1;
        }

        let (p2c_busy, random_busy) = (p2c_list[0].active - 500, random_list[0].active - 500);
        assert_eq!(p2c_busy, 0, "p2c never sent to the busy server (its load stayed above every other's)");
        assert!(random_busy > 150, "random sent {random_busy} to the busy server");
        let (p2c_spread, random_spread) = (spread(&p2c_list), spread(&random_list));
        assert!(p2c_spread <= 3, "p2c spread {p2c_spread}");
        assert!(random_spread > 3 * p2c_spread.max(5), "random spread {random_spread} vs p2c {p2c_spread}");
    }

    #[test]
    fn weights_scale_the_load_comparison() {
        // Server 1 has 4x the weight: it should end with about 4x the connections.
        let mut list = servers(&[1, 4]);
        let mut p2c = P2c::new(&list, 3);
        for _ in 0..5000 {
            let i = p2c.pick(&list).unwrap();
            list[i].active += 1;
        }
        let ratio = f64::from(list[1].active) / f64::from(list[0].active);
        assert!((ratio - 4.0).abs() < 0.05, "{ratio}");
    }
}
