//! The least-connection family: `lc`, `wlc`, `sed`, `nq` and `df`. Stateless: every pick scans all servers (as
//! the kernel does), O(n).
//!
//! Weighted comparisons follow the kernel: no division, `h1/w1 > h2/w2` computed as `h1*w2 > h2*w1` (here in
//! 128-bit arithmetic, so no count or weight can overflow). Ties go to the first server in list order, because
//! a later server replaces the current best only when strictly better.

use super::ServerView;

/// `ip_vs_dest_conn_overhead` (`include/net/ip_vs.h`):
///
/// > We think the overhead of processing active connections is 256 times higher than that of inactive
/// > connections in average. [...] We use the following formula to estimate the overhead now:
/// > `dest->activeconns*256 + dest->inactconns`
#[inline]
pub fn conn_overhead(server: &ServerView) -> u64 {
    (u64::from(server.active) << 8) + u64::from(server.inactive)
}

/// `ip_vs_sed_dest_overhead`/`ip_vs_nq_dest_overhead`: "We only use the active connection number in the cost
/// calculation here": `activeconns + 1`.
#[inline]
fn expected_delay_overhead(server: &ServerView) -> u64 {
    u64::from(server.active) + 1
}

/// `df`: `conn_overhead + response_time_norm + cpu_norm`.
#[inline]
fn feedback_overhead(server: &ServerView) -> u64 {
    conn_overhead(server) + u64::from(server.response_time_norm) + u64::from(server.cpu_norm)
}

/// `loh/lw > doh/dw`, as the kernel writes it: `loh * dw > doh * lw`.
#[inline]
pub(super) fn heavier(loh: u64, lw: u32, doh: u64, dw: u32) -> bool {
    u128::from(loh) * u128::from(dw) > u128::from(doh) * u128::from(lw)
}

/// The weighted-least-`overhead` server among those with weight > 0, first on ties: the two-stage loop of
/// `ip_vs_wlc_schedule` and `ip_vs_sed_schedule` (first available server, then any strictly lighter one).
#[inline]
fn weighted_least(servers: &[ServerView], overhead: impl Fn(&ServerView) -> u64) -> Option<usize> {
    let mut least: Option<(usize, u64, u32)> = None;
    for (i, server) in servers.iter().enumerate() {
        if server.weight == 0 {
            continue;
        }
        let doh = overhead(server);
        match least {
            Some((_, loh, lw)) if !heavier(loh, lw, doh, server.weight) => {}
            _ => least = Some((i, doh, server.weight)),
        }
    }
    least.map(|(i, _, _)| i)
}

/// `lc` (`ip_vs_lc.c`): the least `conn_overhead` (`activeconns*256 + inactconns`) among servers with weight
/// > 0, weights otherwise ignored; first on ties (`if (!least || doh < loh)`).
#[inline]
pub(super) fn lc(servers: &[ServerView]) -> Option<usize> {
    let mut least: Option<(usize, u64)> = None;
    for (i, server) in servers.iter().enumerate() {
        if server.weight == 0 {
            continue;
        }
        let doh = conn_overhead(server);
        if least.is_none_or(|(_, loh)| doh < loh) {
            least = Some((i, doh));
        }
    }
    least.map(|(i, _)| i)
}

/// `wlc` (`ip_vs_wlc.c`): the least `(activeconns*256 + inactconns) / weight`, compared as
/// `loh * atomic_read(&dest->weight) > doh * atomic_read(&least->weight)`; first on ties.
#[inline]
pub(super) fn wlc(servers: &[ServerView]) -> Option<usize> {
    weighted_least(servers, conn_overhead)
}

/// `sed` (`ip_vs_sed.c`): "the expected delay that the job will experience is (Ci + 1) / Ui if sent to the ith
/// server": the least `(activeconns + 1) / weight`; first on ties.
#[inline]
pub(super) fn sed(servers: &[ServerView]) -> Option<usize> {
    weighted_least(servers, expected_delay_overhead)
}

/// `nq` (`ip_vs_nq.c`): "When there is an idle server available, the job will be sent to the idle server
/// [...]. When there is no idle server available, the job will be sent to the server that minimize its
/// expected delay (The Shortest Expected Delay scheduling algorithm)." The first server with weight > 0 and
/// `activeconns == 0` wins at once (inactive connections do not make a server busy); otherwise as `sed`.
#[inline]
pub(super) fn nq(servers: &[ServerView]) -> Option<usize> {
    let mut least: Option<(usize, u64, u32)> = None;
    for (i, server) in servers.iter().enumerate() {
        if server.weight == 0 {
            continue;
        }
        // Return the server directly if it is idle.
        if server.active == 0 {
            return Some(i);
        }
        let doh = expected_delay_overhead(server);
        match least {
            Some((_, loh, lw)) if !heavier(loh, lw, doh, server.weight) => {}
            _ => least = Some((i, doh, server.weight)),
        }
    }
    least.map(|(i, _, _)| i)
}

/// `df` (dynamic feedback): the least `(activeconns*256 + inactconns + T + L) / W`; first on ties.
///
/// * `W` is the effective weight, which the dynamic-feedback blender (`crate::feedback`) already moves with the
///   servers' reported load;
/// * `T` = [`ServerView::response_time_norm`] and `L` = [`ServerView::cpu_norm`] are the blender's normalised
///   response-time and CPU metrics (1.0 = fully loaded) times `unit = 256 × max(mean active connections per
///   server, 1) × W / mean W`, i.e. in [`conn_overhead`] units: a fully busy CPU adds as much as the server's
///   fair share of the active connections, so the feedback terms stay comparable with the connection term at
///   any load, and equally loaded servers get the same `(T + L) / W` (a term the same size for all would weigh
///   `1 / W` and push connections off the small weights).
///
/// `df` and `wlc` therefore differ exactly by the feedback: with T = L = 0 this is `wlc`, decision for decision.
#[inline]
pub(super) fn df(servers: &[ServerView]) -> Option<usize> {
    weighted_least(servers, feedback_overhead)
}

/// The `lblc`/`lblcr` overload test (`is_overloaded` in `ip_vs_lblc.c`): "If this destination server is
/// overloaded and there is a less loaded server, then return true": `dest.activeconns > dest.weight` and some
/// server has `activeconns * 2 < weight`.
#[inline]
pub(super) fn lblc_overloaded(dest: &ServerView, servers: &[ServerView]) -> bool {
    dest.active > dest.weight && servers.iter().any(|d| u64::from(d.active) * 2 < u64::from(d.weight))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::servers;
    use super::*;
    use proptest::prelude::*;

    /// Servers from (weight, active, inactive).
    fn state(spec: &[(u32, u32, u32)]) -> Vec<ServerView> {
        let mut list = servers(&spec.iter().map(|s| s.0).collect::<Vec<_>>());
        for (server, &(_, active, inactive)) in list.iter_mut().zip(spec) {
            server.active = active;
            server.inactive = inactive;
        }
        list
    }

    #[test]
    fn overhead_is_active_times_256_plus_inactive() {
        assert_eq!(conn_overhead(&state(&[(1, 3, 7)])[0]), 3 * 256 + 7);
        assert_eq!(conn_overhead(&state(&[(1, u32::MAX, u32::MAX)])[0]), (u64::from(u32::MAX) << 8) + 0xFFFF_FFFF);
    }

    #[test]
    fn lc_picks_the_least_overhead_ignoring_weights() {
        // Overheads 512+0, 256+300, 256+10: the third. Weights do not matter.
        assert_eq!(lc(&state(&[(100, 2, 0), (1, 1, 300), (1, 1, 10)])), Some(2));
        // One active outweighs 255 inactive.
        assert_eq!(lc(&state(&[(1, 1, 0), (1, 0, 255)])), Some(1));
        assert_eq!(lc(&state(&[(1, 1, 0), (1, 0, 256)])), Some(0), "tie: first");
        // Ties go to the first in list order.
        assert_eq!(lc(&state(&[(1, 4, 4), (1, 4, 4), (1, 4, 4)])), Some(0));
        // A quiesced server is skipped even when idle.
        assert_eq!(lc(&state(&[(0, 0, 0), (1, 9, 0), (1, 5, 0)])), Some(2));
        assert_eq!(lc(&state(&[(0, 0, 0)])), None);
        assert_eq!(lc(&[]), None);
    }

    #[test]
    fn wlc_divides_overhead_by_weight() {
        // 512/1 vs 768/3 = 256: the second.
        assert_eq!(wlc(&state(&[(1, 2, 0), (3, 3, 0)])), Some(1));
        // 256/1 vs 768/3: tie, first.
        assert_eq!(wlc(&state(&[(1, 1, 0), (3, 3, 0)])), Some(0));
        // 256/1 vs 769/3: first is lighter.
        assert_eq!(wlc(&state(&[(1, 1, 0), (3, 3, 1)])), Some(0));
        // Quiesced server first in the list is skipped; the idle ones tie at 0: first idle available wins.
        assert_eq!(wlc(&state(&[(0, 0, 0), (5, 0, 0), (9, 0, 0)])), Some(1));
        // Huge counts and weights do not overflow.
        assert_eq!(wlc(&state(&[(65_535, u32::MAX, 0), (1, u32::MAX / 65_536, 0)])), Some(1));
        assert_eq!(wlc(&state(&[(0, 0, 0), (0, 1, 0)])), None);
    }

    #[test]
    fn sed_counts_the_incoming_job() {
        // wlc: 0/1 vs 256/10: the idle weak server. sed: (0+1)/1 = 1 vs (1+1)/10 = 0.2: the strong one.
        let list = state(&[(1, 0, 0), (10, 1, 0)]);
        assert_eq!(wlc(&list), Some(0));
        assert_eq!(sed(&list), Some(1));
        // Inactive connections do not count: (2+1)/1 vs (2+1)/1, tie -> first, despite 1000 inactive.
        assert_eq!(sed(&state(&[(1, 2, 1000), (1, 2, 0)])), Some(0));
        // (3+1)/2 = 2 vs (1+1)/1 = 2: tie -> first; (5+1)/3 = 2 vs (0+1)/1 = 1 -> second.
        assert_eq!(sed(&state(&[(2, 3, 0), (1, 1, 0)])), Some(0));
        assert_eq!(sed(&state(&[(3, 5, 0), (1, 0, 0)])), Some(1));
        assert_eq!(sed(&state(&[(0, 0, 0), (2, 8, 0)])), Some(1));
    }

    #[test]
    fn nq_sends_to_an_idle_server_first() {
        // sed would pick the strong server ((1+1)/10); nq takes the first idle one.
        assert_eq!(nq(&state(&[(10, 1, 0), (1, 0, 50), (1, 0, 0)])), Some(1));
        // No idle server: as sed.
        assert_eq!(nq(&state(&[(1, 1, 0), (10, 1, 0)])), Some(1));
        assert_eq!(nq(&state(&[(2, 3, 0), (1, 1, 0)])), Some(0), "tie: first");
        // An idle but quiesced server does not count.
        assert_eq!(nq(&state(&[(0, 0, 0), (1, 4, 0), (1, 2, 0)])), Some(2));
        assert_eq!(nq(&state(&[(0, 0, 0)])), None);
    }

    #[test]
    fn df_adds_feedback_terms_to_the_overhead() {
        let mut list = state(&[(1, 1, 0), (1, 1, 0)]);
        assert_eq!(df(&list), Some(0));
        list[0].response_time_norm = 100;
        assert_eq!(df(&list), Some(1));
        list[1].cpu_norm = 101;
        assert_eq!(df(&list), Some(0));
        list[1].cpu_norm = 100;
        assert_eq!(df(&list), Some(0), "tie: first");
        // Divided by weight like the rest: (256 + 600) / 4 = 214 < 256 / 1.
        let mut list = state(&[(1, 1, 0), (4, 1, 0)]);
        list[1].cpu_norm = 600;
        assert_eq!(df(&list), Some(1));
    }

    #[test]
    fn overload_needs_a_less_loaded_server() {
        // active 5 > weight 4, and server 1 has 1*2 < 3.
        let list = state(&[(4, 5, 0), (3, 1, 0)]);
        assert!(lblc_overloaded(&list[0], &list));
        // active 5 > weight 4, but no server with active*2 < weight.
        let list = state(&[(4, 5, 0), (2, 1, 0)]);
        assert!(!lblc_overloaded(&list[0], &list));
        // active == weight is not overloaded.
        let list = state(&[(4, 4, 0), (3, 0, 0)]);
        assert!(!lblc_overloaded(&list[0], &list));
    }

    fn arb_state() -> impl Strategy<Value = Vec<ServerView>> {
        proptest::collection::vec((0u32..5, 0u32..50, 0u32..500), 0..10).prop_map(|spec| state(&spec))
    }

    proptest! {
        #[test]
        fn df_without_feedback_is_wlc(list in arb_state()) {
            prop_assert_eq!(df(&list), wlc(&list));
        }

        /// With feedback, df is wlc over `conn_overhead + T + L`: the first server minimising it per weight.
        #[test]
        fn df_minimises_connections_plus_feedback_per_weight(
            list in arb_state(),
            feedback in proptest::collection::vec((0u32..2000, 0u32..2000), 10),
        ) {
            let mut list = list;
            for (server, &(t, l)) in list.iter_mut().zip(&feedback) {
                server.response_time_norm = t;
                server.cpu_norm = l;
            }
            let best = df(&list);
            let available: Vec<usize> = (0..list.len()).filter(|&i| list[i].weight > 0).collect();
            prop_assert_eq!(best.is_some(), !available.is_empty());
            if let Some(b) = best {
                let cost = |i: usize| {
                    let s = &list[i];
                    (conn_overhead(s) + u64::from(s.response_time_norm) + u64::from(s.cpu_norm)) as f64 / f64::from(s.weight)
                };
                for &i in &available {
                    prop_assert!(cost(b) <= cost(i));
                    if i < b {
                        prop_assert!(cost(i) > cost(b), "an earlier server ties");
                    }
                }
            }
        }

        /// Each of the weighted pickers returns a server whose load/weight is minimal, the first such.
        #[test]
        fn weighted_pickers_return_the_first_minimum(list in arb_state()) {
            for (pick, overhead) in [
                (wlc as fn(&[ServerView]) -> Option<usize>, conn_overhead as fn(&ServerView) -> u64),
                (sed, expected_delay_overhead),
            ] {
                let best = pick(&list);
                let available: Vec<usize> = (0..list.len()).filter(|&i| list[i].weight > 0).collect();
                prop_assert_eq!(best.is_some(), !available.is_empty());
                if let Some(b) = best {
                    let load = |i: usize| overhead(&list[i]) as f64 / list[i].weight as f64;
                    for &i in &available {
                        prop_assert!(load(b) <= load(i));
                        if i < b {
                            prop_assert!(load(i) > load(b), "an earlier server ties");
                        }
                    }
                }
            }
        }
    }
}
