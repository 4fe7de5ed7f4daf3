//! Unit tests of the connection table. Simulated time only.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::tcp::{next_state, Rows};
use super::*;
use crate::config::ForwardMethod;
use crate::flow::{FlowV4, Proto};

const SEED: u64 = 0x5eed_1234_abcd_0001;
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

const SYN: TcpFlags = TcpFlags::SYN;
const SYN_ACK: TcpFlags = TcpFlags::SYN_ACK;
const ACK: TcpFlags = TcpFlags::ACK;
const PSH_ACK: TcpFlags = TcpFlags(0x18);
const FIN_ACK: TcpFlags = TcpFlags::FIN_ACK;
const RST: TcpFlags = TcpFlags::RST;
const IN: Direction = Direction::Input;
const OUT: Direction = Direction::Output;

fn table(capacity: usize) -> ConnTable {
    ConnTable::new(capacity, Timeouts::default(), SEED).unwrap()
}

fn flow(i: u32, proto: Proto) -> FlowV4 {
    FlowV4 { src: Ipv4Addr::from(0x0a00_0000 + i), dst: VIP, src_port: 1024 + (i % 50_000) as u16, dst_port: 80, proto }
}

fn tcp(i: u32) -> FlowV4 {
    flow(i, Proto::Tcp)
}

fn server_addr(server: u16) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, server as u8 + 1)
}

/// The reply key of `forward` NATed to `server`:8080.
fn reply(forward: &FlowV4, server: u16) -> FlowV4 {
    FlowV4 {
        src: server_addr(server),
        dst: forward.src,
        src_port: 8080,
        dst_port: forward.src_port,
        proto: forward.proto,
    }
}

fn secs(s: u32) -> Tick {
    Tick::from_secs(s)
}

fn ms(t: u32) -> Tick {
    Tick::from_millis(t)
}

fn insert_nat(t: &mut ConnTable, i: u32, now: Tick) -> Handle {
    let f = tcp(i);
    t.insert(f, Some(reply(&f, 0)), 1, 0, ForwardMethod::Nat, now).unwrap()
}

fn insert_dr(t: &mut ConnTable, i: u32, now: Tick) -> Handle {
    t.insert(tcp(i), None, 1, 0, ForwardMethod::Dr, now).unwrap()
}

/// Runs `expire` with an unlimited budget and returns the reaped entries.
fn expire_all(t: &mut ConnTable, now: Tick) -> Vec<ConnInfo> {
    let mut gone = Vec::new();
    let stats = t.expire(now, usize::MAX, |info| gone.push(*info));
    assert!(!stats.pending);
    assert_eq!(stats.expired, gone.len());
    gone
}

/// Feeds packets and checks the state after each.
fn run(t: &mut ConnTable, h: Handle, now: Tick, steps: &[(Direction, TcpFlags, ConnState)]) {
    for (i, &(direction, flags, expected)) in steps.iter().enumerate() {
        let change = t.on_packet(h, direction, flags, now);
        assert_eq!(change.new, expected, "step {i}: {direction:?} {flags:?} from {}", change.old);
        assert_eq!(t.state(h), expected);
        let timeout = t.timeouts().for_state(expected);
        assert_eq!(t.get(h).expires, now + timeout, "step {i}: deadline is now + the {expected} timeout");
    }
}

// --- TCP state machine -------------------------------------------------------------------------------------

#[test]
fn nat_handshake_and_client_close_follow_ipvs() {
    let mut t = table(8);
    let now = secs(1);
    let h = insert_nat(&mut t, 1, now);
    assert_eq!(t.state(h), ConnState::None);
    use ConnState::*;
    run(
        &mut t,
        h,
        now,
        &[
            (IN, SYN, SynRecv),
            (OUT, SYN_ACK, SynRecv),
            (IN, ACK, Established),
            (IN, PSH_ACK, Established),
            (OUT, PSH_ACK, Established),
            // The client closes first: the director saw its FIN, the server's is still to come.
            (IN, FIN_ACK, CloseWait),
            (OUT, ACK, CloseWait),
            (OUT, FIN_ACK, TimeWait),
            (IN, ACK, TimeWait),
        ],
    );
}

#[test]
fn nat_server_close_follows_ipvs() {
    let mut t = table(8);
    let now = secs(1);
    let h = insert_nat(&mut t, 1, now);
    use ConnState::*;
    run(
        &mut t,
        h,
        now,
        &[
            (IN, SYN, SynRecv),
            (OUT, SYN_ACK, SynRecv),
            (IN, ACK, Established),
            (OUT, FIN_ACK, FinWait),
            (IN, ACK, FinWait),
            (IN, FIN_ACK, TimeWait),
            (OUT, ACK, TimeWait),
        ],
    );
}

#[test]
fn rst_closes_except_where_ipvs_ignores_it() {
    use ConnState::*;
    let mut t = table(8);
    let now = secs(1);
    let a = insert_nat(&mut t, 1, now);
    run(&mut t, a, now, &[(IN, SYN, SynRecv), (IN, ACK, Established), (IN, RST, Close)]);
    let b = insert_nat(&mut t, 2, now);
    run(&mut t, b, now, &[(IN, SYN, SynRecv), (IN, ACK, Established), (OUT, TcpFlags::RST_ACK, Close)]);
    // A (possibly spoofed) client RST during the handshake does not end it; the server's RST does.
    let c = insert_nat(&mut t, 3, now);
    run(&mut t, c, now, &[(IN, SYN, SynRecv), (IN, RST, SynRecv), (OUT, RST, Close)]);
    let d = insert_dr(&mut t, 4, now);
    run(&mut t, d, now, &[(IN, SYN, SynRecv), (IN, ACK, Established), (IN, RST, Close)]);
}

#[test]
fn dr_and_tun_use_the_input_only_rows() {
    use ConnState::*;
    let mut t = table(8);
    let now = secs(1);
    for (i, method) in [(1, ForwardMethod::Dr), (2, ForwardMethod::Tun)] {
        let h = t.insert(tcp(i), Option::None, 1, 0, method, now).unwrap();
        run(
            &mut t,
            h,
            now,
            &[
                (IN, SYN, SynRecv),
                (IN, ACK, Established),
                (IN, PSH_ACK, Established),
                // Without the server's side, a client FIN means FIN_WAIT (not CLOSE_WAIT, as NAT would).
                (IN, FIN_ACK, FinWait),
                (IN, ACK, FinWait),
                (IN, FIN_ACK, FinWait),
            ],
        );
    }
}

#[test]
fn an_output_packet_switches_a_dr_entry_to_both_directions() {
    use ConnState::*;
    let mut t = table(8);
    let now = secs(1);
    let h = insert_dr(&mut t, 1, now);
    run(
        &mut t,
        h,
        now,
        &[(IN, SYN, SynRecv), (IN, ACK, Established), (OUT, ACK, Established), (IN, FIN_ACK, CloseWait)],
    );
}

#[test]
fn a_packet_without_syn_fin_ack_or_rst_closes() {
    let mut t = table(8);
    let h = insert_nat(&mut t, 1, secs(1));
    run(&mut t, h, secs(1), &[(IN, SYN, ConnState::SynRecv), (IN, TcpFlags::NONE, ConnState::Close)]);
}

#[test]
fn sloppy_pickup_ack_in_none_becomes_established() {
    let mut t = table(8);
    let h = insert_dr(&mut t, 1, secs(1));
    let change = t.on_packet(h, IN, PSH_ACK, secs(1));
    assert_eq!((change.old, change.new), (ConnState::None, ConnState::Established));
    assert!(change.became_active());
}

#[test]
fn secure_tcp_uses_the_dos_rows() {
    use ConnState::*;
    let mut t = table(8);
    t.set_secure_tcp(true);
    let now = secs(1);
    let h = insert_dr(&mut t, 1, now);
    run(&mut t, h, now, &[(IN, SYN, SynAck), (IN, SYN, SynAck), (IN, ACK, Established), (IN, FIN_ACK, FinWait)]);
    let n = insert_nat(&mut t, 2, now);
    run(&mut t, n, now, &[(IN, SYN, SynRecv), (OUT, SYN_ACK, SynAck), (IN, ACK, SynAck), (OUT, ACK, Established)]);
}

#[test]
fn spot_checks_of_the_tables() {
    use ConnState::*;
    // (state, rows, flags, secure) -> next, one per interesting cell.
    let cases = [
        (None, Rows::Output, SYN, false, SynSent),
        (SynSent, Rows::Input, SYN, false, Established),
        (Established, Rows::Input, FIN_ACK, false, CloseWait),
        (Established, Rows::InputOnly, FIN_ACK, false, FinWait),
        (LastAck, Rows::Input, ACK, false, Close),
        (LastAck, Rows::Input, RST, false, LastAck),
        (LastAck, Rows::Output, ACK, false, LastAck),
        (Listen, Rows::Output, ACK, false, Established),
        (Listen, Rows::Input, SYN, false, SynRecv),
        (TimeWait, Rows::Output, RST, false, TimeWait),
        (SynAck, Rows::Input, RST, false, SynRecv),
        (SynAck, Rows::InputOnly, RST, false, Close),
        (SynRecv, Rows::Input, ACK, true, SynRecv),
        (SynRecv, Rows::Output, SYN_ACK, true, SynAck),
        (SynAck, Rows::Input, FIN_ACK, true, SynAck),
        (None, Rows::InputOnly, SYN, true, SynAck),
        // RST wins over SYN, SYN over FIN, FIN over ACK.
        (Established, Rows::Input, TcpFlags(0x06), false, Close),
        (Established, Rows::Input, TcpFlags(0x03), false, Established),
    ];
    for (state, rows, flags, secure, expected) in cases {
        assert_eq!(next_state(state, rows, flags, secure), expected, "{state} {rows:?} {flags:?} secure={secure}");
    }
}

#[test]
fn activity_follows_lvs_active_and_inactive() {
    let mut t = table(8);
    let now = secs(1);
    let h = insert_nat(&mut t, 1, now);
    assert!(!t.get(h).is_active(), "a new entry is inactive");
    assert!(!t.on_packet(h, IN, SYN, now).became_active());
    let up = t.on_packet(h, IN, ACK, now);
    assert!(up.became_active() && up.changed());
    let same = t.on_packet(h, IN, PSH_ACK, now);
    assert!(!same.changed() && !same.became_active() && !same.became_inactive());
    assert!(t.on_packet(h, IN, FIN_ACK, now).became_inactive());
}

#[test]
fn udp_entries_ignore_flags_and_stay_inactive() {
    let mut t = table(8);
    let now = secs(1);
    let h = t.insert(flow(1, Proto::Udp), None, 2, 0, ForwardMethod::Dr, now).unwrap();
    assert_eq!(t.state(h), ConnState::Udp);
    for flags in [SYN, RST, TcpFlags::NONE] {
        let change = t.on_packet(h, IN, flags, now);
        assert_eq!((change.old, change.new), (ConnState::Udp, ConnState::Udp));
    }
    assert_eq!(t.get(h).expires, secs(301));
    assert_eq!(t.get(h).in_packets, 3);
    assert!(!t.get(h).is_active());
}

#[test]
fn may_create_only_on_syn_unless_sloppy() {
    assert!(may_create(SYN, false));
    assert!(may_create(SYN | TcpFlags::PSH, false));
    for flags in [SYN_ACK, ACK, PSH_ACK, FIN_ACK, RST, TcpFlags(0x06), TcpFlags::NONE] {
        assert!(!may_create(flags, false), "{flags:?}");
    }
    for flags in [SYN, SYN_ACK, ACK, PSH_ACK, FIN_ACK, TcpFlags::NONE] {
        assert!(may_create(flags, true), "{flags:?} with sloppy");
    }
    assert!(!may_create(RST, true));
    assert!(!may_create(TcpFlags::RST_ACK, true));
}

#[test]
fn untracked_drops_are_counted() {
    let mut t = table(8);
    if !may_create(ACK, false) {
        t.count_untracked_drop();
    }
    assert_eq!(t.counters().untracked_drops, 1);
}

// --- timeouts ----------------------------------------------------------------------------------------------

#[test]
fn default_timeouts_are_ipvs() {
    let t = Timeouts::default();
    let s = Duration::from_secs;
    assert_eq!(t.tcp_established, s(900));
    assert_eq!(t.tcp_syn_sent, s(120));
    assert_eq!(t.tcp_syn_recv, s(60));
    assert_eq!(t.tcp_fin_wait, s(120));
    assert_eq!(t.tcp_time_wait, s(120));
    assert_eq!(t.tcp_close, s(10));
    assert_eq!(t.tcp_close_wait, s(60));
    assert_eq!(t.tcp_last_ack, s(30));
    assert_eq!(t.tcp_listen, s(120));
    assert_eq!(t.tcp_synack, s(120));
    assert_eq!(t.tcp_none, s(2));
    assert_eq!(t.udp, s(300));
}

/// Distinct timeouts per state, so that a wrong one is noticed.
fn distinct_timeouts() -> Timeouts {
    let mut t = Timeouts::default();
    let primes = [3u64, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41];
    for (state, p) in ConnState::ALL.into_iter().zip(primes) {
        t.set(state, Duration::from_secs(p));
    }
    t
}

/// Brings a new entry into `state` with packets at `now` (or, for the states no packet leads to, a synced
/// install followed by a packet that keeps the state, so the state's own timeout is applied).
fn drive_into(t: &mut ConnTable, state: ConnState, now: Tick) -> Handle {
    use ConnState::*;
    let dr = |t: &mut ConnTable| insert_dr(t, 1, now);
    let nat = |t: &mut ConnTable| insert_nat(t, 1, now);
    let synced = |t: &mut ConnTable, state| {
        let conn = SyncedConn {
            forward: tcp(1),
            reply: Option::None,
            service: 1,
            server: 0,
            method: ForwardMethod::Dr,
            state,
            flags: ConnFlags::NONE,
            remaining: Duration::from_secs(1),
        };
        t.install_synced(&conn, now).unwrap().handle()
    };
    let (h, packets): (Handle, &[(Direction, TcpFlags)]) = match state {
        None => (dr(t), &[]),
        Established => (dr(t), &[(IN, SYN), (IN, ACK)]),
        SynSent => (nat(t), &[(OUT, SYN)]),
        SynRecv => (nat(t), &[(IN, SYN)]),
        FinWait => (dr(t), &[(IN, SYN), (IN, ACK), (IN, FIN_ACK)]),
        TimeWait => (nat(t), &[(IN, SYN), (IN, ACK), (IN, FIN_ACK), (OUT, FIN_ACK)]),
        Close => (dr(t), &[(IN, SYN), (IN, ACK), (IN, RST)]),
        CloseWait => (nat(t), &[(IN, SYN), (IN, ACK), (IN, FIN_ACK)]),
        LastAck => (synced(t, LastAck), &[(IN, RST)]),
        Listen => (synced(t, Listen), &[(IN, FIN_ACK)]),
        SynAck => {
            t.set_secure_tcp(true);
            (dr(t), &[(IN, SYN)])
        }
        Udp => (t.insert(flow(1, Proto::Udp), Option::None, 1, 0, ForwardMethod::Dr, now).unwrap(), &[(IN, ACK)]),
    };
    for &(direction, flags) in packets {
        t.on_packet(h, direction, flags, now);
    }
    assert_eq!(t.state(h), state);
    h
}

#[test]
fn every_state_expires_exactly_after_its_timeout() {
    let timeouts = distinct_timeouts();
    for state in ConnState::ALL {
        let mut t = ConnTable::new(4, timeouts, SEED).unwrap();
        let now = ms(1_000);
        drive_into(&mut t, state, now);
        let deadline = now + timeouts.for_state(state);
        assert!(expire_all(&mut t, now).is_empty());
        assert!(expire_all(&mut t, deadline.add_millis(u32::MAX)).is_empty(), "{state}: reaped 1 ms early");
        let gone = expire_all(&mut t, deadline);
        assert_eq!(gone.len(), 1, "{state}: not reaped at its deadline");
        assert_eq!(gone[0].state, state);
        assert!(t.is_empty());
        assert_eq!(t.counters().expired, 1);
    }
}

#[test]
fn deadlines_off_the_slot_grid_are_reaped_within_one_slot() {
    let timeouts = Timeouts { udp: Duration::from_millis(1_001), ..Timeouts::default() };
    let mut t = ConnTable::new(4, timeouts, SEED).unwrap();
    t.insert(flow(1, Proto::Udp), None, 1, 0, ForwardMethod::Dr, ms(3)).unwrap();
    // Deadline 1004 ms; the wheel slot ends at 1008 ms.
    for now in [1_000, 1_003, 1_004, 1_007] {
        assert!(expire_all(&mut t, ms(now)).is_empty(), "reaped at {now} ms");
    }
    assert_eq!(expire_all(&mut t, ms(1_008)).len(), 1);
}

#[test]
fn traffic_pushes_the_deadline() {
    let mut t = table(8);
    let h = insert_dr(&mut t, 1, secs(0));
    run(&mut t, h, secs(0), &[(IN, SYN, ConnState::SynRecv), (IN, ACK, ConnState::Established)]);
    for at in [100, 300, 500] {
        assert!(expire_all(&mut t, secs(at)).is_empty());
        t.on_packet(h, IN, PSH_ACK, secs(at));
    }
    // The entry's first slot (900 s) comes up: it is found not due and moved, not reaped.
    let stats = t.expire(secs(900), usize::MAX, |_| panic!("reaped before its deadline"));
    assert_eq!(stats.examined, 1);
    assert!(expire_all(&mut t, ms(1_399_999)).is_empty());
    assert_eq!(expire_all(&mut t, secs(1_400)).len(), 1);
}

#[test]
fn a_shorter_timeout_takes_effect_at_once() {
    let mut t = table(8);
    let h = insert_dr(&mut t, 1, secs(0));
    run(&mut t, h, secs(0), &[(IN, SYN, ConnState::SynRecv), (IN, ACK, ConnState::Established)]);
    t.on_packet(h, IN, RST, secs(100));
    assert!(expire_all(&mut t, ms(109_999)).is_empty());
    assert_eq!(expire_all(&mut t, secs(110)).len(), 1);
}

#[test]
fn new_timeouts_apply_from_the_next_packet() {
    let mut t = table(8);
    let h = t.insert(flow(1, Proto::Udp), None, 1, 0, ForwardMethod::Dr, secs(0)).unwrap();
    t.on_packet(h, IN, ACK, secs(0));
    let mut timeouts = *t.timeouts();
    timeouts.udp = Duration::from_secs(20);
    t.set_timeouts(timeouts).unwrap();
    assert_eq!(t.get(h).expires, secs(300));
    t.on_packet(h, IN, ACK, secs(10));
    assert_eq!(t.get(h).expires, secs(30));
    assert_eq!(expire_all(&mut t, secs(30)).len(), 1);
}

#[test]
fn timeouts_longer_than_a_wheel_turn() {
    let timeouts = Timeouts { udp: Duration::from_secs(3 * 3600), ..Timeouts::default() };
    let mut t = ConnTable::new(8, timeouts, SEED).unwrap();
    t.insert(flow(1, Proto::Udp), None, 1, 0, ForwardMethod::Dr, secs(0)).unwrap();
    let mut now = 0;
    while now < 3 * 3600 {
        assert!(expire_all(&mut t, secs(now)).is_empty(), "reaped at {now} s");
        now += 100;
    }
    assert_eq!(expire_all(&mut t, secs(3 * 3600)).len(), 1);
}

#[test]
fn a_long_pause_between_expire_calls_catches_up() {
    let timeouts = Timeouts { udp: Duration::from_secs(3_000), ..Timeouts::default() };
    let mut t = ConnTable::new(8, timeouts, SEED).unwrap();
    let close = insert_dr(&mut t, 1, secs(0));
    t.on_packet(close, IN, RST, secs(0)); // 10 s
    insert_dr(&mut t, 2, secs(0)); // NONE, 2 s
    let est = insert_dr(&mut t, 3, secs(0));
    t.on_packet(est, IN, ACK, secs(0)); // 900 s
    t.insert(flow(4, Proto::Udp), None, 1, 0, ForwardMethod::Dr, secs(0)).unwrap(); // 3000 s
                                                                                    // Nothing ran expire for 2000 s, more than a wheel turn.
    let gone = expire_all(&mut t, secs(2_000));
    assert_eq!(gone.len(), 3);
    assert_eq!(t.len(), 1);
    assert!(expire_all(&mut t, ms(2_999_999)).is_empty());
    assert_eq!(expire_all(&mut t, secs(3_000)).len(), 1);
}

#[test]
fn the_clock_may_wrap() {
    let mut t = table(8);
    let start = Tick(u32::MAX - 4_999);
    let h = insert_dr(&mut t, 1, start);
    t.on_packet(h, IN, SYN, start);
    t.on_packet(h, IN, ACK, start);
    let deadline = start + Duration::from_secs(900);
    assert!(deadline.0 < 1_000_000, "the deadline wrapped");
    let mut now = start;
    while now.is_before(deadline) {
        assert!(expire_all(&mut t, now).is_empty(), "reaped at {now:?}");
        now = now.add_millis(10_000);
    }
    assert!(expire_all(&mut t, deadline.add_millis(u32::MAX)).is_empty());
    assert_eq!(expire_all(&mut t, deadline).len(), 1);
}

// --- incremental expiry -------------------------------------------------------------------------------------

#[test]
fn a_million_entries_due_at_once_drain_over_several_calls() {
    const N: u32 = 1_000_000;
    const BUDGET: usize = 100_000;
    let mut t = table(N as usize);
    for i in 0..N {
        t.insert(flow(i, Proto::Udp), None, 1, (i % 7) as u16, ForwardMethod::Dr, secs(0)).unwrap();
    }
    assert_eq!(t.len(), N as usize);
    let stats = t.expire(ms(299_999), BUDGET, |_| panic!("early"));
    assert_eq!(stats.expired, 0);
    let mut calls = 0;
    let mut total = 0;
    loop {
        let mut reported = 0;
        let stats = t.expire(secs(300), BUDGET, |_| reported += 1);
        calls += 1;
        assert!(stats.examined <= BUDGET && stats.expired <= BUDGET);
        assert_eq!(stats.expired, reported);
        total += stats.expired;
        assert_eq!(t.len(), N as usize - total);
        if !stats.pending {
            break;
        }
        assert_eq!(stats.expired, BUDGET, "a pending call used its whole budget");
    }
    assert_eq!(calls, N as usize / BUDGET);
    assert_eq!(total, N as usize);
    assert!(t.is_empty());
    assert_eq!(t.counters().expired, u64::from(N));
}

#[test]
fn changes_between_budgeted_calls_are_safe() {
    let mut t = table(64);
    let entries: Vec<(Handle, FlowV4)> = (0..20).map(|i| (insert_dr(&mut t, i, secs(0)), tcp(i))).collect();
    // All 20 are due at 2 s, in one wheel slot; the walk stops after 5.
    let mut gone = Vec::new();
    let stats = t.expire(secs(2), 5, |info| gone.push(info.forward));
    assert!(stats.pending);
    assert_eq!(gone.len(), 5);
    let alive: Vec<(Handle, FlowV4)> = entries.into_iter().filter(|(_, k)| !gone.contains(k)).collect();
    // Remove five survivors (the first is where the walk stopped), push three past the deadline, and add
    // one entry due later.
    for &(h, _) in &alive[..5] {
        t.remove(h);
    }
    for &(h, _) in &alive[5..8] {
        t.on_packet(h, IN, ACK, secs(1)); // ESTABLISHED, due at 901 s
    }
    insert_dr(&mut t, 100, secs(1)); // due at 3 s
    let mut rest = Vec::new();
    while t.expire(secs(2), 3, |info| rest.push(info.forward)).pending {}
    let expected: Vec<FlowV4> = alive[8..].iter().map(|&(_, k)| k).collect();
    rest.sort_by_key(|k| k.src);
    assert_eq!(rest, expected);
    assert_eq!(t.len(), 4);
    assert_eq!(expire_all(&mut t, secs(3))[0].forward, tcp(100));
    assert_eq!(expire_all(&mut t, secs(901)).len(), 3);
    assert!(t.is_empty());
}

#[test]
fn expired_entries_are_reported_with_server_and_state() {
    let mut t = table(8);
    let f = tcp(9);
    let h = t.insert(f, Some(reply(&f, 3)), 4, 3, ForwardMethod::Nat, secs(0)).unwrap();
    t.on_packet(h, IN, SYN, secs(0));
    let gone = expire_all(&mut t, secs(60));
    assert_eq!(gone.len(), 1);
    let info = gone[0];
    assert_eq!((info.forward, info.reply, info.service, info.server), (f, Some(reply(&f, 3)), 4, 3));
    assert_eq!((info.method, info.state, info.in_packets), (ForwardMethod::Nat, ConnState::SynRecv, 1));
    assert!(t.lookup_forward(&f).is_none() && t.lookup_reply(&reply(&f, 3)).is_none());
}

// --- capacity, keys, removal --------------------------------------------------------------------------------

#[test]
fn capacity_is_a_hard_limit() {
    let mut t = table(1_000);
    for i in 0..1_000 {
        insert_dr(&mut t, i, secs(0));
    }
    assert_eq!(t.len(), 1_000);
    assert_eq!(t.insert(tcp(1_000), None, 1, 0, ForwardMethod::Dr, secs(0)), Err(InsertError::Full));
    assert_eq!(t.counters().table_full, 1);
    assert_eq!(t.counters().inserted, 1_000);
    assert_eq!(t.len(), 1_000);
    let victim = t.lookup_forward(&tcp(500)).unwrap();
    t.remove(victim);
    insert_dr(&mut t, 1_000, secs(0));
    assert_eq!(t.insert(tcp(1_001), None, 1, 0, ForwardMethod::Dr, secs(0)), Err(InsertError::Full));
    assert_eq!(t.counters().table_full, 2);
}

#[test]
fn the_reply_key_finds_the_nat_entry() {
    let mut t = table(16);
    let f = tcp(7);
    let r = reply(&f, 2);
    let h = t.insert(f, Some(r), 1, 2, ForwardMethod::Nat, secs(0)).unwrap();
    let dr = insert_dr(&mut t, 8, secs(0));
    assert_eq!(t.lookup_forward(&f), Some(h));
    assert_eq!(t.lookup_reply(&r), Some(h));
    assert_eq!(t.get(h).reply, Some(r));
    // Keys are directional and exact.
    assert_eq!(t.lookup_forward(&r), None);
    assert_eq!(t.lookup_reply(&f), None);
    assert_eq!(t.lookup_reply(&reply(&f, 3)), None);
    assert_eq!(t.lookup_reply(&FlowV4 { proto: Proto::Udp, ..r }), None);
    assert_eq!(t.get(dr).reply, None);
    assert_eq!(t.lookup_reply(&reply(&tcp(8), 0)), None);
}

#[test]
fn removing_frees_both_keys() {
    let mut t = table(16);
    let f = tcp(7);
    let r = reply(&f, 2);
    let h = t.insert(f, Some(r), 1, 2, ForwardMethod::Nat, secs(0)).unwrap();
    let info = t.remove(h);
    assert_eq!((info.forward, info.reply), (f, Some(r)));
    assert_eq!(t.lookup_forward(&f), None);
    assert_eq!(t.lookup_reply(&r), None);
    assert!(t.is_empty());
    assert_eq!(t.counters().removed, 1);
    // Removed entries never come back from the wheel.
    assert!(expire_all(&mut t, secs(10_000)).is_empty());
    let again = t.insert(f, Some(r), 1, 2, ForwardMethod::Nat, secs(0)).unwrap();
    assert_eq!(t.lookup_reply(&r), Some(again));
}

#[test]
#[should_panic(expected = "free entry")]
fn a_stale_handle_panics() {
    let mut t = table(4);
    let h = insert_dr(&mut t, 1, secs(0));
    t.remove(h);
    t.on_packet(h, IN, ACK, secs(1));
}

#[test]
fn duplicate_keys_are_refused() {
    let mut t = table(16);
    let f = tcp(1);
    let r = reply(&f, 0);
    let h = t.insert(f, Some(r), 1, 0, ForwardMethod::Nat, secs(0)).unwrap();
    assert_eq!(t.insert(f, None, 1, 0, ForwardMethod::Dr, secs(0)), Err(InsertError::ForwardExists(h)));
    // Same client address and port to the same real server through another VIP.
    let other_vip = FlowV4 { dst: Ipv4Addr::new(192, 0, 2, 11), ..f };
    assert_eq!(t.insert(other_vip, Some(r), 2, 0, ForwardMethod::Nat, secs(0)), Err(InsertError::ReplyExists(h)));
    let udp_reply = FlowV4 { proto: Proto::Udp, ..reply(&tcp(2), 0) };
    assert_eq!(t.insert(tcp(2), Some(udp_reply), 1, 0, ForwardMethod::Nat, secs(0)), Err(InsertError::ProtoMismatch));
    assert_eq!(t.counters().duplicates, 2);
    assert_eq!(t.len(), 1);
}

#[test]
fn remove_server_purges_only_that_server() {
    let mut t = table(1_024);
    let mut n = 0;
    for service in 1..=2u16 {
        for server in 0..4u16 {
            for _ in 0..50 {
                let f = tcp(n);
                t.insert(f, Some(reply(&f, server)), service, server, ForwardMethod::Nat, secs(0)).unwrap();
                n += 1;
            }
        }
    }
    let mut purged = Vec::new();
    assert_eq!(t.remove_server(1, 2, |info| purged.push(*info)), 50);
    assert!(purged.iter().all(|info| (info.service, info.server) == (1, 2)));
    for info in &purged {
        assert!(t.lookup_forward(&info.forward).is_none());
        assert!(t.lookup_reply(&info.reply.unwrap()).is_none());
    }
    assert_eq!(t.len(), 350);
    assert!(t.iter().all(|(_, info)| (info.service, info.server) != (1, 2)));
    assert_eq!(t.iter().filter(|(_, info)| info.server == 2).count(), 50);
    // The bounded variant, a few slots at a time.
    let (mut from, mut removed) = (Some(0), 0);
    while let Some(start) = from {
        let step = t.remove_server_step(2, 2, start, 7, |_| {});
        removed += step.removed;
        from = step.next;
    }
    assert_eq!(removed, 50);
    assert_eq!(t.len(), 300);
    assert_eq!(t.counters().removed, 100);
}

#[test]
fn iter_lists_live_entries_and_resumes() {
    let mut t = table(32);
    let handles: Vec<Handle> = (0..10).map(|i| insert_dr(&mut t, i, secs(0))).collect();
    for &h in &handles[2..5] {
        t.remove(h);
    }
    let all: Vec<(Handle, ConnInfo)> = t.iter().collect();
    assert_eq!(all.len(), 7);
    for (h, info) in &all {
        assert_eq!(t.lookup_forward(&info.forward), Some(*h));
    }
    let first = t.iter().take(3).collect::<Vec<_>>();
    let rest: Vec<_> = t.iter_from(first.last().unwrap().0.index() + 1).collect();
    assert_eq!(first.len() + rest.len(), 7);
}

// --- connection sync ----------------------------------------------------------------------------------------

fn synced(i: u32, state: ConnState, remaining_ms: u64) -> SyncedConn {
    let f = tcp(i);
    SyncedConn {
        forward: f,
        reply: Some(reply(&f, 1)),
        service: 3,
        server: 1,
        method: ForwardMethod::Nat,
        state,
        flags: ConnFlags::NONE,
        remaining: Duration::from_millis(remaining_ms),
    }
}

#[test]
fn install_synced_keeps_the_remaining_timeout() {
    let mut t = table(16);
    let now = secs(5);
    let conn = synced(1, ConnState::Established, 37_000);
    let Installed::New(h) = t.install_synced(&conn, now).unwrap() else { panic!("expected a new entry") };
    let info = t.get(h);
    assert_eq!(info.state, ConnState::Established);
    assert!(info.flags.contains(ConnFlags::SYNCED));
    assert_eq!(info.expires, secs(42));
    assert_eq!(info.remaining(secs(40)), Duration::from_secs(2));
    assert_eq!(t.lookup_reply(&conn.reply.unwrap()), Some(h));
    assert_eq!(info.to_synced(now), SyncedConn { flags: ConnFlags::SYNCED, ..conn });
    assert!(expire_all(&mut t, ms(41_999)).is_empty());
    assert_eq!(expire_all(&mut t, secs(42)).len(), 1);
    assert_eq!(t.counters().synced_new, 1);
}

#[test]
fn install_synced_updates_an_existing_entry() {
    let mut t = table(16);
    let now = secs(5);
    let h = t.install_synced(&synced(1, ConnState::SynRecv, 60_000), now).unwrap().handle();
    // The connection became established, then closes; the server changed on the active (a failover there).
    let mut update = synced(1, ConnState::Established, 900_000);
    update.server = 2;
    update.reply = Some(reply(&update.forward, 2));
    match t.install_synced(&update, secs(6)).unwrap() {
        Installed::Updated { handle, previous } => {
            assert_eq!(handle, h);
            assert_eq!((previous.state, previous.server), (ConnState::SynRecv, 1));
        }
        other => panic!("expected an update, got {other:?}"),
    }
    assert_eq!(t.lookup_reply(&reply(&update.forward, 1)), None);
    assert_eq!(t.lookup_reply(&reply(&update.forward, 2)), Some(h));
    assert_eq!(t.state(h), ConnState::Established);
    // A shorter remaining time is honoured at once.
    t.install_synced(&synced(1, ConnState::Close, 3_000), secs(7)).unwrap();
    assert!(expire_all(&mut t, ms(9_999)).is_empty());
    assert_eq!(expire_all(&mut t, secs(10)).len(), 1);
    assert_eq!((t.counters().synced_new, t.counters().synced_updated), (1, 2));
}

#[test]
fn a_deadline_already_passed_is_reaped_by_the_next_slot() {
    let mut t = table(16);
    insert_dr(&mut t, 50, secs(0)); // starts the wheel
    assert!(expire_all(&mut t, ms(1_000)).is_empty());
    // The wheel has processed the slot of 1000 ms; a record with no time left lands in the slot being
    // processed, not one turn (≈ 1049 s) later.
    t.install_synced(&synced(1, ConnState::Close, 0), ms(1_000)).unwrap();
    let gone = expire_all(&mut t, ms(1_008));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].forward, tcp(1));
}

#[test]
fn a_synced_entry_then_follows_its_own_traffic() {
    let mut t = table(16);
    let h = t.install_synced(&synced(1, ConnState::Established, 5_000), secs(0)).unwrap().handle();
    let change = t.on_packet(h, OUT, FIN_ACK, secs(1));
    assert_eq!(change.new, ConnState::FinWait);
    assert_eq!(t.get(h).expires, secs(121));
}

#[test]
fn install_synced_rejects_bad_records() {
    let mut t = table(1);
    let udp = SyncedConn { forward: flow(1, Proto::Udp), reply: None, ..synced(1, ConnState::Established, 1) };
    assert_eq!(t.install_synced(&udp, secs(0)), Err(InsertError::BadState(ConnState::Established)));
    let tcp_as_udp = synced(1, ConnState::Udp, 1);
    assert_eq!(t.install_synced(&tcp_as_udp, secs(0)), Err(InsertError::BadState(ConnState::Udp)));
    t.install_synced(&synced(1, ConnState::Established, 1), secs(0)).unwrap();
    assert_eq!(t.install_synced(&synced(2, ConnState::Established, 1), secs(0)), Err(InsertError::Full));
    assert_eq!(t.counters().table_full, 1);
}

// --- hashing ------------------------------------------------------------------------------------------------

#[test]
fn hash_collisions_stay_correct() {
    let mut t = table(2_048);
    t.degenerate_hash = true;
    let n = 2_000;
    let handles: Vec<Handle> = (0..n).map(|i| insert_nat(&mut t, i, secs(0))).collect();
    let (fwd, rep) = t.index_stats();
    assert_eq!((fwd.keys, fwd.occupied, fwd.longest_chain), (2_000, 1, 2_000));
    assert_eq!((rep.keys, rep.occupied, rep.longest_chain), (2_000, 1, 2_000));
    for (i, &h) in handles.iter().enumerate() {
        let f = tcp(i as u32);
        assert_eq!(t.lookup_forward(&f), Some(h));
        assert_eq!(t.lookup_reply(&reply(&f, 0)), Some(h));
    }
    for (i, &h) in handles.iter().enumerate() {
        if i % 3 == 1 {
            t.remove(h);
        }
    }
    for i in 0..n {
        let f = tcp(i);
        let found = t.lookup_forward(&f);
        assert_eq!(found.is_some(), i % 3 != 1, "{i}");
        assert_eq!(t.lookup_reply(&reply(&f, 0)), found);
    }
    // Expiry unlinks from the (single, long) chains too.
    assert_eq!(expire_all(&mut t, secs(2)).len(), t.counters().inserted as usize - t.counters().removed as usize);
    assert!((0..n).all(|i| t.lookup_forward(&tcp(i)).is_none()));
}

#[test]
fn the_seed_changes_the_hash() {
    use super::hash::KeyHasher;
    let (a, b) = (KeyHasher::new(1), KeyHasher::new(2));
    let differ = (0..64).filter(|&i| a.hash(&tcp(i)) != b.hash(&tcp(i))).count();
    assert_eq!(differ, 64);
    // Keys that differ in one field land in different buckets of a 2^21 index almost always.
    let mask = (1u64 << 21) - 1;
    let buckets: std::collections::HashSet<u64> = (0..4_096).map(|i| a.hash(&tcp(i)) & mask).collect();
    assert!(buckets.len() > 4_000, "{} distinct buckets", buckets.len());
}

// --- construction -------------------------------------------------------------------------------------------

#[test]
fn construction_rejects_bad_arguments() {
    assert!(matches!(ConnTable::new(0, Timeouts::default(), 0), Err(TableError::Capacity(0))));
    assert!(matches!(ConnTable::new(MAX_CAPACITY + 1, Timeouts::default(), 0), Err(TableError::Capacity(_))));
    let long = Timeouts { tcp_fin_wait: Timeouts::MAX + Duration::from_millis(1), ..Timeouts::default() };
    match ConnTable::new(4, long, 0) {
        Err(TableError::Timeout(e)) => assert_eq!(e.state, "FIN_WAIT"),
        other => panic!("expected a timeout error, got {other:?}"),
    }
    let t = table(1_000);
    assert_eq!(t.index_buckets(), 2_048);
    assert_eq!(t.capacity(), 1_000);
}

// --- model check --------------------------------------------------------------------------------------------

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random inserts, packets, removals, synced installs and budgeted expiry against a plain map of deadlines:
/// nothing is reaped before its deadline, everything is reaped within a slot of its deadline by a full expiry,
/// and both indexes agree with the model throughout.
#[test]
fn random_operations_agree_with_a_model() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut timeouts = distinct_timeouts();
        timeouts.udp = Duration::from_secs(1_500); // longer than a wheel turn
        let capacity = 48;
        let mut t = ConnTable::new(capacity, timeouts, seed).unwrap();
        t.degenerate_hash = seed % 3 == 0;
        // key index -> deadline (ms, wrapping)
        let mut model: HashMap<u32, u32> = HashMap::new();
        let mut now = Tick(u32::MAX - 200_000 + (seed as u32) * 7); // cross the wrap on the way
        let key = |k: u32| flow(k, if k % 4 == 0 { Proto::Udp } else { Proto::Tcp });
        let deadline_of = |t: &ConnTable, h: Handle| t.get(h).expires.0;
        for step in 0..20_000 {
            match rng.below(100) {
                0..=29 => {
                    let k = rng.below(96) as u32;
                    let f = key(k);
                    let nat = rng.below(2) == 0;
                    let r = nat.then(|| reply(&f, (k % 5) as u16));
                    let method = if nat { ForwardMethod::Nat } else { ForwardMethod::Dr };
                    match t.insert(f, r, 1, (k % 5) as u16, method, now) {
                        Ok(h) => {
                            assert!(!model.contains_key(&k) && model.len() < capacity, "step {step}");
                            model.insert(k, deadline_of(&t, h));
                        }
                        Err(InsertError::ForwardExists(h)) => {
                            assert!(model.contains_key(&k));
                            assert_eq!(t.get(h).forward, f);
                        }
                        Err(InsertError::ReplyExists(_)) => unreachable!("reply keys are unique per client"),
                        Err(InsertError::Full) => assert_eq!(model.len(), capacity, "step {step}"),
                        Err(e) => panic!("{e}"),
                    }
                }
                30..=64 => {
                    let k = rng.below(96) as u32;
                    if let Some(h) = t.lookup_forward(&key(k)) {
                        let flags = TcpFlags([0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x00][rng.below(7) as usize]);
                        let direction = if rng.below(3) == 0 { OUT } else { IN };
                        let change = t.on_packet(h, direction, flags, now);
                        let expected = now + timeouts.for_state(change.new);
                        assert_eq!(t.get(h).expires, expected);
                        model.insert(k, expected.0);
                    } else {
                        assert!(!model.contains_key(&k), "step {step}: key {k} lost");
                    }
                }
                65..=71 => {
                    let k = rng.below(96) as u32;
                    if let Some(h) = t.lookup_forward(&key(k)) {
                        let info = t.remove(h);
                        assert_eq!(info.forward, key(k));
                        if let Some(r) = info.reply {
                            assert_eq!(t.lookup_reply(&r), None);
                        }
                        assert!(model.remove(&k).is_some());
                    }
                }
                72..=75 => {
                    let k = rng.below(96) as u32;
                    let f = key(k);
                    let state = if f.proto == Proto::Udp { ConnState::Udp } else { ConnState::Established };
                    let remaining = match rng.below(4) {
                        0 => Duration::ZERO,
                        _ => Duration::from_millis(rng.below(20_000)),
                    };
                    let conn = SyncedConn {
                        forward: f,
                        reply: None,
                        service: 1,
                        server: 0,
                        method: ForwardMethod::Dr,
                        state,
                        flags: ConnFlags::NONE,
                        remaining,
                    };
                    match t.install_synced(&conn, now) {
                        Ok(installed) => {
                            model.insert(k, (now + remaining).0);
                            assert_eq!(t.get(installed.handle()).expires, now + remaining);
                        }
                        Err(InsertError::Full) => assert_eq!(model.len(), capacity),
                        Err(e) => panic!("{e}"),
                    }
                }
                76..=89 => {
                    // A budgeted expiry: whatever it reaps must be due.
                    let budget = rng.below(6) as usize;
                    t.expire(now, budget, |info| {
                        let k = u32::from(info.forward.src) - 0x0a00_0000;
                        let deadline = model.remove(&k).expect("reaped an entry the model does not have");
                        assert!(!now.is_before(Tick(deadline)), "step {step}: reaped before its deadline");
                        assert_eq!(info.expires, Tick(deadline));
                    });
                }
                _ => {
                    // Let time pass, sometimes a lot, then catch up fully.
                    let advance = match rng.below(10) {
                        0 => 1_200_000 + rng.below(200_000) as u32,
                        1..=3 => rng.below(40_000) as u32,
                        _ => rng.below(3_000) as u32,
                    };
                    now = now.add_millis(advance);
                    loop {
                        let stats = t.expire(now, 7, |info| {
                            let k = u32::from(info.forward.src) - 0x0a00_0000;
                            let deadline = model.remove(&k).expect("reaped an entry the model does not have");
                            assert!(!now.is_before(Tick(deadline)), "step {step}: reaped before its deadline");
                        });
                        if !stats.pending {
                            break;
                        }
                    }
                    // Reaped by the end of the slot after the one holding the deadline (a deadline that had
                    // already passed when it was set waits for the slot being processed).
                    for (&k, &deadline) in &model {
                        let boundary = Tick(deadline.wrapping_add(WHEEL_SLOT_MS - 1) & !(WHEEL_SLOT_MS - 1));
                        let bound = boundary.add_millis(WHEEL_SLOT_MS);
                        assert!(
                            now.is_before(bound),
                            "step {step}: key {k} overdue (deadline {deadline}, now {now:?})"
                        );
                    }
                }
            }
            assert_eq!(t.len(), model.len(), "step {step}");
        }
        for k in 0..96 {
            assert_eq!(t.lookup_forward(&key(k)).is_some(), model.contains_key(&k), "seed {seed} key {k}");
        }
        assert_eq!(t.iter().count(), model.len());
    }
}
