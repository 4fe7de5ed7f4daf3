//! Simulated-time tests of the heartbeat protocol: no sleeps, no sockets.

mod scenarios;
mod sim;

use std::time::Duration;

use sim::{config, Pair, KEY};

use super::packet::{Heartbeat, FLAG_YIELD};
use super::{Action, Ha, HaConfig, LoadSummary, Reason, State};

const HIGH: LoadSummary = LoadSummary { pps: 1_000_000, conns: 100_000 };

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

/// A (priority 200, id 1), B (priority 100, id 2), started together and settled: A MASTER.
fn settled(seed: u64) -> Pair {
    let mut p = Pair::new(config(1, 200), config(2, 100), seed);
    p.run_until(secs(5));
    assert_eq!(p.states(), [State::Master, State::Backup]);
    p
}

fn set_load(p: &mut Pair, i: usize, load: LoadSummary) {
    let now = p.now;
    p.nodes[i].ha.set_load(now, load);
    p.drain(i);
}

/// Time from `t0` to node `i`'s next BecomeMaster.
fn takeover_after(p: &Pair, i: usize, t0: Duration) -> Option<Duration> {
    p.actions_since(i, t0).into_iter().find(|(_, a)| matches!(a, Action::BecomeMaster { .. })).map(|(t, _)| t - t0)
}

#[test]
fn normal_start_elects_by_priority_then_node_id() {
    for seed in 0..20 {
        let mut p = Pair::new(config(1, 200), config(2, 100), seed);
        p.run_until(secs(5));
        assert_eq!(p.states(), [State::Master, State::Backup], "seed {seed}");
        // Elected as soon as they heard each other, not after the INIT hold.
        let t = takeover_after(&p, 0, Duration::ZERO).unwrap();
        assert!(t < ms(50), "elected after {t:?}");
        assert_eq!(p.transitions_since(Duration::ZERO).len(), 2, "one transition each");

        let mut p = Pair::new(config(1, 100), config(2, 100), seed);
        p.run_until(secs(5));
        assert_eq!(p.states(), [State::Backup, State::Master], "equal priority: higher node id wins");
        let start_actions = p.actions_since(1, Duration::ZERO);
        let kinds: Vec<_> = start_actions.iter().map(|(_, a)| a.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                Action::CheckTiebreaker,
                Action::BecomeMaster { reason: Reason::Election },
                Action::RunNotify(State::Master),
                Action::SendGratuitousArp
            ]
        );
    }
}

#[test]
fn a_lone_director_becomes_master_after_the_init_hold() {
    let mut p = Pair::new(config(1, 100), config(2, 200), 1);
    p.kill(1);
    p.run_until(secs(10));
    assert_eq!(p.state(0), State::Master);
    let t = takeover_after(&p, 0, Duration::ZERO).unwrap();
    assert!(t >= ms(3000) && t <= ms(3010), "{t:?}");
    // The peer starts late: it becomes BACKUP, then preempts (priority 200, preempt on).
    p.restart(1, config(2, 200));
    p.run_for(secs(5));
    assert_eq!(p.states(), [State::Backup, State::Master]);
}

#[test]
fn master_death_is_detected_within_the_deadline_under_load() {
    let mut worst = Duration::ZERO;
    let mut best = Duration::MAX;
    for seed in 0..30 {
        let mut p = settled(seed);
        set_load(&mut p, 0, HIGH);
        p.run_for(secs(2));
        assert_eq!(p.nodes[0].ha.status().period, ms(20));
        assert_eq!(p.nodes[1].ha.status().peer.unwrap().period, ms(20));
        // Die at a random phase of the period.
        let phase = Duration::from_micros(p.rng.below(20_000));
        p.run_for(phase);
        let t0 = p.elapsed();
        p.kill(0);
        p.run_for(secs(1));
        assert_eq!(p.state(1), State::Master);
        let took = takeover_after(&p, 1, t0).unwrap();
        worst = worst.max(took);
        best = best.min(took);
        let st = p.nodes[1].ha.status();
        assert_eq!(st.counters.failovers, 1);
        assert!(p.actions_since(1, t0).iter().any(|(_, a)| *a == Action::BecomeMaster { reason: Reason::PeerDead }));
    }
    // Rule: 3·20 + latency + 3 ms .. 4·20 + latency + 3 ms, plus 1 ms tiebreaker.
    assert!(worst <= ms(85), "worst detection {worst:?}");
    assert!(best >= ms(60), "best detection {best:?}");
}

#[test]
fn master_death_at_idle_is_detected_within_four_periods() {
    let mut p = settled(3);
    p.run_for(secs(10));
    assert_eq!(p.nodes[0].ha.status().period, ms(1000));
    let t0 = p.elapsed();
    p.kill(0);
    p.run_for(secs(10));
    let took = takeover_after(&p, 1, t0).unwrap();
    assert!(took > ms(3000) && took <= ms(4010), "{took:?}");
}

#[test]
fn idle_traffic_is_at_most_two_packets_per_second_per_direction() {
    let mut a = config(1, 200);
    let mut b = config(2, 100);
    a.paths = 2;
    b.paths = 2;
    let mut p = Pair::new(a, b, 9);
    p.run_until(secs(10));
    let before = [p.nodes[0].ha.status().counters.sent, p.nodes[1].ha.status().counters.sent];
    p.run_for(secs(100));
    for (i, before) in before.iter().enumerate() {
        let sent = p.nodes[i].ha.status().counters.sent - before;
        assert!(sent <= 2 * 100 + 2, "node {i} sent {sent} datagrams in 100 s over two paths");
    }
    assert!(p.transitions_since(secs(10)).is_empty());
}

#[test]
fn three_lost_heartbeats_at_the_fast_period_are_ridden_out_four_are_not() {
    for (burst, fails) in [(1, false), (2, false), (3, false), (4, true), (6, true)] {
        for seed in 0..5 {
            let mut p = settled(seed);
            set_load(&mut p, 0, HIGH);
            p.run_for(secs(2));
            let t0 = p.elapsed();
            p.nodes[0].burst = burst;
            p.run_for(secs(2));
            let took_over = takeover_after(&p, 1, t0).is_some();
            assert_eq!(took_over, fails, "burst of {burst}, seed {seed}");
            // Whatever happened, the pair ends with exactly one master.
            let masters = p.states().iter().filter(|s| **s == State::Master).count();
            assert_eq!(masters, 1, "burst of {burst}: {:?}", p.states());
        }
    }
}

#[test]
fn jitter_does_not_cause_failover() {
    let mut p = settled(11);
    p.set_links(|l| {
        l.latency = ms(1);
        l.jitter = ms(8);
    });
    set_load(&mut p, 0, HIGH);
    p.run_for(secs(120));
    assert!(p.transitions_since(secs(5)).is_empty(), "{:?}", p.transitions_since(secs(5)));
    let peer = p.nodes[1].ha.status().peer.unwrap();
    assert!(peer.jitter_us > 1000, "jitter measured: {} µs", peer.jitter_us);
    assert!(peer.deadline > ms(80), "margin grew with jitter: {:?}", peer.deadline);
}

#[test]
fn lengthening_survives_loss_of_the_announcing_heartbeats() {
    // High → idle: the master announces 1000 ms for four heartbeats at 20 ms. Losing any three of them
    // must not fail over; losing all four is four consecutive losses at 20 ms: failover by the rule.
    for (burst, fails) in [(1, false), (3, false), (4, true)] {
        let mut p = settled(5);
        set_load(&mut p, 0, HIGH);
        p.run_for(secs(2));
        let t0 = p.elapsed();
        p.nodes[0].burst = burst;
        set_load(&mut p, 0, LoadSummary::default());
        p.run_for(secs(10));
        assert_eq!(takeover_after(&p, 1, t0).is_some(), fails, "burst {burst}");
        if !fails {
            // Lengthened (to 500 ms when the losses marked the path degraded).
            assert!(p.nodes[1].ha.status().peer.unwrap().period >= ms(500));
        }
    }
}

#[test]
fn shortening_applies_at_once() {
    let mut p = settled(6);
    p.run_for(secs(3));
    let t0 = p.elapsed();
    set_load(&mut p, 0, HIGH);
    p.run_for(ms(100));
    let peer = p.nodes[1].ha.status().peer.unwrap();
    assert_eq!(peer.period, ms(20));
    // The first fast heartbeat went out right away.
    let first = p.nodes[0].sent.iter().find(|(t, _)| *t >= t0).unwrap().0;
    assert!(first - t0 <= ms(20));
}

#[test]
fn random_period_changes_with_jitter_and_loss_never_fail_over() {
    for seed in 0..6 {
        let mut p = settled(100 + seed);
        p.set_links(|l| {
            l.latency = ms(1);
            l.jitter = ms(3);
            l.loss = 0.02;
        });
        let mut changes = 0;
        while p.elapsed() < secs(600) {
            let step = ms(50 + p.rng.below(3000));
            p.run_for(step);
            let f = p.rng.below(10);
            let load = LoadSummary { pps: HIGH.pps * f / 9, conns: 0 };
            set_load(&mut p, 0, load);
            changes += 1;
        }
        assert!(changes > 300);
        assert!(p.transitions_since(secs(5)).is_empty(), "seed {seed}: {:?}", p.transitions_since(secs(5)));
        assert_eq!(p.nodes[1].ha.status().counters.peer_lost, 0);
    }
}

#[test]
fn degraded_path_halves_the_period_and_raises_the_tolerance() {
    let mut p = settled(7);
    p.set_links(|l| l.loss = 0.10);
    p.run_for(secs(60));
    let st = p.nodes[0].ha.status();
    assert!(st.degraded, "loss reported: {}", st.reported_loss);
    assert_eq!(st.period, ms(500));
    assert_eq!(st.tolerance, 7);
    assert!(p.transitions_since(secs(5)).is_empty());
    p.set_links(|l| l.loss = 0.0);
    p.run_for(secs(60));
    let st = p.nodes[0].ha.status();
    assert!(!st.degraded);
    assert_eq!((st.period, st.tolerance), (ms(1000), 3));
    assert!(p.transitions_since(secs(5)).is_empty());
}

#[test]
fn a_flapping_link_with_short_outages_changes_nothing() {
    let mut p = settled(12);
    set_load(&mut p, 0, HIGH);
    p.run_for(secs(1));
    for _ in 0..300 {
        p.set_path(0, false);
        p.run_for(ms(50));
        p.set_path(0, true);
        p.run_for(ms(50));
    }
    assert!(p.transitions_since(secs(5)).is_empty());
}

#[test]
fn a_flapping_link_with_long_outages_always_converges_to_one_master() {
    let mut p = settled(13);
    for round in 0..10 {
        p.set_path(0, false);
        p.run_for(secs(6));
        assert_eq!(p.states(), [State::Master, State::Master], "round {round}: both reach their tiebreakers");
        let back = p.elapsed();
        p.set_path(0, true);
        p.run_for(secs(3));
        assert_eq!(p.states(), [State::Master, State::Backup], "round {round}");
        assert!(p.actions_since(1, back).contains(&(
            p.actions_since(1, back).iter().find(|(_, a)| matches!(a, Action::BecomeBackup { .. })).unwrap().0,
            Action::BecomeBackup { reason: Reason::DualMasterLost }
        )));
        assert!(p.actions_since(0, back).iter().any(|(_, a)| *a == Action::SendGratuitousArp));
    }
}

#[test]
fn a_second_path_keeps_the_pair_together() {
    let mut a = config(1, 200);
    let mut b = config(2, 100);
    a.paths = 2;
    b.paths = 2;
    let mut p = Pair::new(a, b, 14);
    p.run_until(secs(5));
    set_load(&mut p, 0, HIGH);
    p.set_path(0, false);
    p.run_for(secs(60));
    assert!(p.transitions_since(secs(1)).is_empty());
    assert_eq!(p.states(), [State::Master, State::Backup]);
    let st = p.nodes[1].ha.status();
    assert!(st.counters.received > 2900, "{}", st.counters.received);
    // Both paths up: every heartbeat arrives twice, the copy is counted as a duplicate.
    p.set_path(0, true);
    p.run_for(secs(10));
    assert!(p.nodes[1].ha.status().counters.rejected.duplicate > 400);
    let r = p.nodes[1].ha.status().counters.rejected;
    assert_eq!(r.total(), r.duplicate + r.unverified_boot, "{r:?}");
    assert!(r.unverified_boot <= 2, "only the first heartbeats at start, before boot ids were echoed");
}

#[test]
fn cutting_every_path_with_tiebreakers_reachable_from_both_makes_two_masters_until_healed() {
    let mut p = settled(15);
    p.set_path(0, false);
    p.run_for(secs(10));
    assert_eq!(p.states(), [State::Master, State::Master]);
    let healed = p.elapsed();
    p.set_path(0, true);
    p.run_for(secs(3));
    assert_eq!(p.states(), [State::Master, State::Backup]);
    // The loser stepped down on the first heartbeat; the winner re-announced the VIPs.
    let down = p.actions_since(1, healed);
    assert_eq!(down[0].1, Action::BecomeBackup { reason: Reason::DualMasterLost });
    assert!(down[0].0 - healed <= ms(1100));
    assert!(p.actions_since(0, healed).iter().any(|(_, a)| *a == Action::SendGratuitousArp));
}

#[test]
fn cutting_every_path_with_the_tiebreaker_reachable_from_one_side_only() {
    // The backup cannot reach its tiebreaker: it goes to FAULT, the master stays.
    let mut p = settled(16);
    p.nodes[1].tb_reachable = false;
    p.set_path(0, false);
    p.run_for(secs(10));
    assert_eq!(p.states(), [State::Master, State::Fault]);
    // The master cannot reach its tiebreaker: it stops serving, the backup takes over.
    let mut p = settled(17);
    p.nodes[0].tb_reachable = false;
    p.set_path(0, false);
    p.run_for(secs(10));
    assert_eq!(p.states(), [State::Fault, State::Master]);
    // Paths and tiebreaker back: the FAULT side leaves FAULT on its next check and, outranking the
    // master (priority 200, preempt on), takes the service back make-before-break.
    p.nodes[0].tb_reachable = true;
    let healed = p.elapsed();
    p.set_path(0, true);
    p.run_for(secs(5));
    assert_eq!(p.states(), [State::Master, State::Backup]);
    let back = p.actions_since(0, healed);
    assert!(back.iter().any(|(_, a)| *a == Action::BecomeMaster { reason: Reason::Preempt }), "{back:?}");
    assert!(p.always_served_since(healed));
}

#[test]
fn forged_replayed_and_malformed_heartbeats_change_nothing_and_are_counted() {
    let mut p = settled(18);
    p.run_for(secs(5));
    // Heartbeats A sent (the real ones), to replay later.
    let recorded: Vec<Vec<u8>> = p.nodes[0].sent.iter().map(|(_, t)| t.bytes.clone()).collect();
    let last = recorded.last().unwrap().clone();
    let hb = Heartbeat::decode(&last, KEY).unwrap();
    let b_boot = p.nodes[1].ha.boot_id();
    let before = p.nodes[1].ha.status();
    let log_len = p.log.len();

    let mut forged = hb.clone();
    forged.state = State::Fault;
    forged.seq += 10;
    let wrong_key = forged.encode(b"a-completely-different-key-here!");
    let mut flipped = forged.encode(KEY);
    flipped[40] ^= 4;
    let mut other_version = forged.encode(KEY);
    other_version[0] = 7;
    let mut reflected = forged.clone();
    reflected.node_id = 2;
    let mut new_boot_unverified = forged.clone();
    new_boot_unverified.boot_id ^= 0xffff;
    new_boot_unverified.echo_boot = 0;
    let mut bad_priority = forged.clone();
    bad_priority.priority = 0;

    let now = p.now;
    let ha = &mut p.nodes[1].ha;
    for bytes in &recorded {
        ha.handle_datagram(now, 0, bytes); // all old or equal: replayed / duplicate
    }
    ha.handle_datagram(now, 0, &wrong_key);
    ha.handle_datagram(now, 0, &flipped);
    ha.handle_datagram(now, 0, &other_version);
    ha.handle_datagram(now, 0, &forged.encode(KEY)[..60]);
    ha.handle_datagram(now, 0, b"garbage");
    ha.handle_datagram(now, 0, &[]);
    ha.handle_datagram(now, 3, &forged.encode(KEY));
    ha.handle_datagram(now, 0, &reflected.encode(KEY));
    ha.handle_datagram(now, 0, &new_boot_unverified.encode(KEY));
    ha.handle_datagram(now, 0, &bad_priority.encode(KEY));
    let mut rng = sim::Rng(5);
    for _ in 0..1000 {
        let len = rng.below(120) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        ha.handle_datagram(now, 0, &bytes);
    }
    let after = ha.status();
    let r = after.counters.rejected;
    assert_eq!(r.replayed as usize, recorded.len() - 1);
    assert_eq!(r.duplicate, 1);
    assert!(r.bad_mac >= 2);
    let b = before.counters.rejected;
    assert_eq!((r.total() - b.total()) as usize, recorded.len() + 10 + 1000, "every datagram counted once: {r:?}");
    assert!(r.bad_version >= 1);
    assert!(r.bad_length >= 3);
    assert_eq!(r.bad_path, 1);
    assert_eq!(r.own_node_id, 1);
    assert_eq!(r.unverified_boot - b.unverified_boot, 1);
    assert_eq!(r.malformed, 1);
    assert_eq!(after.counters.received, before.counters.received);
    assert_eq!(after.state, State::Backup);
    assert_eq!(after.peer.as_ref().unwrap().state, State::Master);
    assert_eq!(after.peer.as_ref().unwrap().last_seq, before.peer.as_ref().unwrap().last_seq);
    assert!(p.log[log_len..].is_empty(), "no action: {:?}", &p.log[log_len..]);
    let _ = b_boot;
    p.drain(1);
    p.run_for(secs(10));
    assert!(p.transitions_since(secs(5)).is_empty());
}

#[test]
fn an_old_boot_replayed_after_the_peer_restarted_is_refused() {
    let mut p = settled(19);
    p.run_for(secs(3));
    let old: Vec<Vec<u8>> = p.nodes[0].sent.iter().map(|(_, t)| t.bytes.clone()).collect();
    p.kill(0);
    p.run_for(secs(6));
    assert_eq!(p.state(1), State::Master);
    p.restart(0, config(1, 200));
    p.run_for(secs(5));
    assert_eq!(p.states(), [State::Master, State::Backup], "preferred master back (auto-failback on)");
    let before = p.nodes[1].ha.status();
    let now = p.now;
    for bytes in &old {
        p.nodes[1].ha.handle_datagram(now, 0, bytes);
    }
    let after = p.nodes[1].ha.status();
    assert_eq!(after.counters.rejected.stale_boot as usize, old.len());
    assert_eq!(after.state, State::Backup);
    assert_eq!(after.peer.unwrap().boot_id, before.peer.unwrap().boot_id);
    assert!(p.nodes[1].ha.poll_action().is_none());
}

#[test]
fn preempt_on_off_and_delay() {
    // B (low priority) alone becomes MASTER; A (high priority) starts 10 s later.
    for (preempt, delay, expect_master, min_wait) in [(true, 0, 0, 0), (false, 0, 1, 0), (true, 5000, 0, 5000)] {
        let mut a = config(1, 200);
        a.preempt = preempt;
        a.preempt_delay = ms(delay);
        let mut p = Pair::new(a.clone(), config(2, 100), 20);
        p.kill(0);
        p.run_until(secs(10));
        assert_eq!(p.state(1), State::Master);
        let t0 = p.elapsed();
        p.restart(0, a);
        p.run_for(secs(20));
        assert_eq!(p.state(expect_master), State::Master, "preempt {preempt} delay {delay}");
        assert_eq!(p.state(1 - expect_master), State::Backup);
        if expect_master == 0 {
            let took = takeover_after(&p, 0, t0).unwrap();
            assert!(took >= ms(min_wait) && took < ms(min_wait + 100), "took over after {took:?}");
            assert!(p.always_served_since(t0), "preemption is make-before-break");
        }
    }
}

#[test]
fn auto_failback_on_and_off() {
    for auto_failback in [true, false] {
        let mut a = config(1, 200);
        let mut b = config(2, 100);
        a.auto_failback = auto_failback;
        b.auto_failback = auto_failback;
        let mut p = Pair::new(a.clone(), b, 21);
        p.run_until(secs(5));
        assert_eq!(p.states(), [State::Master, State::Backup]);
        p.kill(0);
        p.run_for(secs(6));
        assert_eq!(p.state(1), State::Master);
        p.restart(0, a);
        p.run_for(secs(10));
        if auto_failback {
            assert_eq!(p.states(), [State::Master, State::Backup]);
        } else {
            assert_eq!(p.states(), [State::Backup, State::Master], "the survivor keeps the service");
            assert!(p.nodes[0].ha.status().peer.unwrap().alive);
        }
    }
}

#[test]
fn demote_hands_over_make_before_break() {
    for seed in 0..10 {
        let mut p = settled(30 + seed);
        set_load(&mut p, 0, HIGH);
        let pause = ms(p.rng.below(1500));
        p.run_for(pause);
        let t0 = p.elapsed();
        let now = p.now;
        p.nodes[0].ha.demote(now);
        p.drain(0);
        p.run_for(secs(3));
        assert_eq!(p.states(), [State::Backup, State::Master]);
        assert!(p.always_served_since(t0), "never a moment without a master");
        let up = takeover_after(&p, 1, t0).unwrap();
        let down = p.actions_since(0, t0).into_iter().find(|(_, a)| matches!(a, Action::BecomeBackup { .. })).unwrap();
        assert_eq!(down.1, Action::BecomeBackup { reason: Reason::HandedOver });
        assert!(t0 + up <= down.0, "the peer serves first");
        assert!(up < ms(10), "handover prompt: {up:?}");
        // Demotion sticks: A (priority 200, preempt on) does not take the service back.
        p.run_for(secs(10));
        assert_eq!(p.states(), [State::Backup, State::Master]);
        assert!(p.nodes[1].ha.status().peer.unwrap().demoted);
        // ...but still takes over if B dies.
        p.kill(1);
        p.run_for(secs(5));
        assert_eq!(p.state(0), State::Master);
    }
}

#[test]
fn demote_without_a_peer_keeps_serving() {
    let mut p = settled(40);
    p.kill(1);
    p.run_for(secs(6));
    let now = p.now;
    p.nodes[0].ha.demote(now);
    p.drain(0);
    p.run_for(secs(10));
    assert_eq!(p.state(0), State::Master);
    assert!(p.nodes[0].ha.status().demoted);
}

#[test]
fn promote_takes_over_make_before_break_and_release_restores_priorities() {
    let mut p = settled(41);
    let t0 = p.elapsed();
    let now = p.now;
    p.nodes[1].ha.promote(now);
    p.drain(1);
    p.run_for(secs(3));
    assert_eq!(p.states(), [State::Backup, State::Master]);
    assert!(p.always_served_since(t0));
    assert_eq!(takeover_after(&p, 1, t0).map(|d| d < ms(10)), Some(true));
    assert!(p
        .actions_since(1, t0)
        .contains(&(t0 + takeover_after(&p, 1, t0).unwrap(), Action::BecomeMaster { reason: Reason::Promoted })));
    // A claiming master is not preempted.
    p.run_for(secs(10));
    assert_eq!(p.states(), [State::Backup, State::Master]);
    // Released: A (higher priority, preempt on) takes the service back, still make-before-break.
    let t1 = p.elapsed();
    let now = p.now;
    p.nodes[1].ha.release(now);
    p.drain(1);
    p.run_for(secs(3));
    assert_eq!(p.states(), [State::Master, State::Backup]);
    assert!(p.always_served_since(t1));
}

#[test]
fn dual_master_resolution_is_immediate_and_the_winner_sends_garp() {
    // Force both MASTER with all paths cut, equal priority: the higher node id wins.
    let mut p = Pair::new(config(1, 100), config(2, 100), 42);
    p.run_until(secs(5));
    assert_eq!(p.states(), [State::Backup, State::Master]);
    p.set_path(0, false);
    p.run_for(secs(10));
    assert_eq!(p.states(), [State::Master, State::Master]);
    set_load(&mut p, 0, HIGH);
    set_load(&mut p, 1, HIGH);
    let healed = p.elapsed();
    p.set_path(0, true);
    p.run_for(secs(2));
    assert_eq!(p.states(), [State::Backup, State::Master]);
    let loser = p.actions_since(0, healed);
    assert_eq!(loser[0].1, Action::BecomeBackup { reason: Reason::DualMasterLost });
    assert!(loser[0].0 - healed <= ms(25), "stepped down on the first heartbeat: {:?}", loser[0].0 - healed);
    let garp = p.actions_since(1, healed).into_iter().find(|(_, a)| *a == Action::SendGratuitousArp).unwrap();
    assert!(garp.0 - healed <= ms(25));
    assert!(p.actions_since(1, healed).iter().all(|(_, a)| !matches!(a, Action::BecomeBackup { .. })));
}

#[test]
fn random_datagrams_never_panic_nor_change_state() {
    let mut p = settled(43);
    let mut rng = sim::Rng(77);
    let now = p.now;
    let before = p.nodes[1].ha.status();
    // Valid length and version, random rest.
    for _ in 0..20_000 {
        let mut bytes: Vec<u8> = (0..super::packet::MESSAGE_LEN).map(|_| rng.next_u64() as u8).collect();
        bytes[0] = super::packet::VERSION;
        p.nodes[1].ha.handle_datagram(now, rng.below(2) as usize, &bytes);
    }
    let after = p.nodes[1].ha.status();
    assert_eq!(after.state, before.state);
    assert_eq!(after.counters.received, before.counters.received);
    assert!(p.nodes[1].ha.poll_action().is_none());
}

#[test]
fn config_is_validated() {
    let ok = config(1, 1);
    assert!(ok.validate().is_ok());
    assert!(HaConfig { priority: 0, ..ok.clone() }.validate().is_err());
    assert!(HaConfig { key: vec![1; 8], ..ok.clone() }.validate().is_err());
    assert!(HaConfig { paths: 0, ..ok.clone() }.validate().is_err());
    assert!(HaConfig { period_min: ms(2000), ..ok.clone() }.validate().is_err());
    assert!(HaConfig { degraded_loss: 0.0, ..ok }.validate().is_err());
}

#[test]
fn a_peer_that_does_not_echo_our_boot_is_not_trusted_until_it_does() {
    let now = std::time::Instant::now();
    let mut b = Ha::new(config(2, 100), 555, now).unwrap();
    let hb = Heartbeat {
        state: State::Master,
        priority: 200,
        flags: FLAG_YIELD,
        node_id: 1,
        boot_id: 9,
        seq: 1,
        echo_boot: 0,
        ..Heartbeat::default()
    };
    b.handle_datagram(now, 0, &hb.encode(KEY));
    assert_eq!(b.status().counters.rejected.unverified_boot, 1);
    assert!(b.status().peer.is_none());
    // Our next heartbeat echoes its boot id at once.
    let tx = b.poll_transmit(now).unwrap();
    assert_eq!(Heartbeat::decode(&tx.bytes, KEY).unwrap().echo_boot, 9);
    let hb2 = Heartbeat { seq: 2, echo_boot: 555, ..hb };
    b.handle_datagram(now, 0, &hb2.encode(KEY));
    assert_eq!(b.status().peer.unwrap().boot_id, 9);
}

/// Load arriving shortens the MASTER's period at once; that early heartbeat is not jitter, so the
/// BACKUP's deadline drops to about (n + 1) · P_min + margin_min right away (failover is fastest exactly
/// when load arrives).
#[test]
fn shortening_the_period_does_not_count_as_jitter() {
    let mut p = settled(3);
    p.run_for(secs(3));
    let before = p.nodes[1].ha.status().peer.expect("the BACKUP hears the MASTER").jitter_us;
    set_load(&mut p, 0, HIGH);
    p.run_for(ms(300));
    let peer = p.nodes[1].ha.status().peer.expect("the BACKUP hears the MASTER");
    assert_eq!(peer.period, ms(20));
    assert!(peer.jitter_us <= before, "jitter {} us after the period change, {before} us before", peer.jitter_us);
    assert!(peer.deadline <= ms(4 * 20 + 10), "deadline {:?}", peer.deadline);
}

#[test]
fn a_held_preemption_waits_for_the_shell_but_a_dead_peer_is_taken_over_at_once() {
    // B (low priority) alone becomes MASTER; A (high priority, preempt on) restarts with its preemption held,
    // as a director with connection sync holds it until the peer's table has arrived.
    let a = config(1, 200);
    let mut p = Pair::new(a.clone(), config(2, 100), 23);
    p.kill(0);
    p.run_until(secs(10));
    assert_eq!(p.state(1), State::Master);
    p.restart(0, a.clone());
    let now = p.now;
    p.nodes[0].ha.hold_preemption(now, true);
    p.drain(0);
    p.run_for(secs(10));
    assert_eq!(p.states(), [State::Backup, State::Master], "held: no preemption");
    let t0 = p.elapsed();
    let now = p.now;
    p.nodes[0].ha.hold_preemption(now, false);
    p.drain(0);
    p.run_for(secs(5));
    assert_eq!(p.states(), [State::Master, State::Backup], "released: A takes the service back");
    let took = takeover_after(&p, 0, t0).expect("a takeover after the release");
    assert!(took < ms(100), "took over {took:?} after the release");
    assert!(p.always_served_since(t0), "still make-before-break");

    // Held again, but the MASTER dies: the hold does not apply to a dead peer.
    let mut p = Pair::new(a.clone(), config(2, 100), 24);
    p.kill(0);
    p.run_until(secs(10));
    p.restart(0, a);
    let now = p.now;
    p.nodes[0].ha.hold_preemption(now, true);
    p.drain(0);
    p.run_for(secs(5));
    assert_eq!(p.state(0), State::Backup);
    p.kill(1);
    p.run_for(secs(10));
    assert_eq!(p.state(0), State::Master, "a dead peer is taken over although preemption is held");
}
