//! `SchedulerState::pick` and the persistence table's lookups and inserts must not allocate: a counting global
//! allocator (this test binary's own) counts the allocations made on the test's thread around a loop of picks
//! for every scheduler kind.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use fulcrum_director::sched::{
    server_key, PersistenceTable, PickInput, SchedulerKind, SchedulerOptions, SchedulerState, ServerView,
};

mod common;

/// Runs `f` and returns how many allocator calls this thread made meanwhile.
fn allocations_in(f: impl FnOnce()) -> u64 {
    common::allocator_calls(f).0
}

#[test]
fn the_counter_sees_allocations() {
    let n = allocations_in(|| {
        std::hint::black_box(vec![1u8; 64]);
    });
    assert!(n >= 1);
}

#[test]
fn picks_do_not_allocate() {
    let mut servers: Vec<ServerView> =
        (0..8u32).map(|i| ServerView::new(server_key(Ipv4Addr::from(0x0A00_0001 + i), 80), i % 4)).collect();
    let options = SchedulerOptions { lblc_capacity: 256, ..SchedulerOptions::default() };
    let mut states: Vec<SchedulerState> =
        SchedulerKind::ALL.iter().map(|&kind| SchedulerState::new(kind, &servers, &options).unwrap()).collect();
    let mut persistence = PersistenceTable::new(512, Duration::from_secs(300), 7);
    let t0 = Instant::now();
    let mut picked = 0u64;

    let n = allocations_in(|| {
        for round in 0..2_000u32 {
            // Counters move, a server is quiesced now and then, time passes: every code path of the pickers,
            // including the fallbacks and the lblc/lblcr map inserts, evictions and expiries.
            for (i, s) in servers.iter_mut().enumerate() {
                s.active = (round + i as u32 * 7) % 13;
                s.inactive = (round * 3 + i as u32) % 29;
                s.response_time_norm = (round + i as u32) % 5;
            }
            servers[round as usize % 8].weight = if round % 3 == 0 { 0 } else { 2 };
            let input = PickInput {
                servers: &servers,
                client: Ipv4Addr::from(round.wrapping_mul(2_654_435_761)),
                client_port: (round % 60_000) as u16 + 1024,
                dest: Ipv4Addr::from(round % 1000),
                now: t0 + Duration::from_secs(u64::from(round) * 60),
            };
            for state in states.iter_mut() {
                picked += u64::from(state.pick(&input).is_some());
            }
            picked += u64::from(persistence.pick(&mut states[0], &input).is_some());
            persistence.insert(input.client, round as usize % 8, input.now);
            picked += u64::from(persistence.lookup(input.client, input.now).is_some());
        }
    });
    assert_eq!(n, 0, "{n} allocations on the pick path");
    assert!(picked > 2_000 * 13, "the loop did pick ({picked})");
}
