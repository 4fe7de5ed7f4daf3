use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::quorum::{QuorumConfig, Routing, ServiceQuorum, Tally};
use super::*;

const SEC: Duration = Duration::from_secs(1);
const OK: CheckResult = CheckResult::Success;
const FAIL: CheckResult = CheckResult::Failure(CheckFailure::Timeout);

fn t0() -> Instant {
    // Only an origin to add durations to; no decision reads the clock.
    Instant::now()
}

fn checks_only() -> HealthConfig {
    HealthConfig { agent: AgentPolicy::Ignored, ..HealthConfig::default() }
}

fn state(config: HealthConfig) -> HealthState {
    HealthState::new(config).unwrap()
}

fn drain(h: &mut HealthState, now: Instant) -> Vec<Transition> {
    std::iter::from_fn(|| h.poll(now)).collect()
}

#[test]
fn rise_and_fall_counts() {
    let start = t0();
    let mut h = state(HealthConfig { slow_start: Duration::ZERO, ..checks_only() });
    assert_eq!(h.status(), HealthStatus::Down);
    h.record(start, OK);
    assert_eq!(h.poll(start), None, "one success is not rise = 2");
    h.record(start + SEC, OK);
    let up = h.poll(start + SEC).unwrap();
    assert_eq!(
        up,
        Transition {
            at: start + SEC,
            from: HealthStatus::Down,
            to: HealthStatus::Up,
            reason: Reason::ChecksPassed { consecutive: 2 }
        }
    );
    assert_eq!(h.poll(start + SEC), None, "returned once");
    // Two failures, a success (resets), three failures: down at the third consecutive one.
    for (k, result) in [FAIL, FAIL, OK, FAIL, FAIL].into_iter().enumerate() {
        h.record(start + SEC * (2 + k as u32), result);
        assert_eq!(h.poll(start + SEC * (2 + k as u32)), None);
    }
    h.record(start + SEC * 7, CheckResult::Failure(CheckFailure::Refused));
    let down = h.poll(start + SEC * 7).unwrap();
    assert_eq!(down.to, HealthStatus::Down);
    assert_eq!(down.reason, Reason::ChecksFailed { consecutive: 3, last: CheckFailure::Refused });
    assert_eq!(h.disposition(), Disposition::Quiesce);
    h.record(start + SEC * 8, FAIL);
    assert_eq!(h.poll(start + SEC * 8), None, "already down: no second transition");
    assert_eq!((h.count(ReasonKind::ChecksPassed), h.count(ReasonKind::ChecksFailed)), (1, 1));
}

#[test]
fn remove_instead_of_quiesce() {
    let mut h = state(HealthConfig { on_failure: FailureAction::Remove, ..checks_only() });
    assert_eq!(h.disposition(), Disposition::Remove);
    let start = t0();
    h.record(start, OK);
    h.record(start, OK);
    assert_eq!(h.disposition(), Disposition::Serve);
}

#[test]
fn slow_start_ramps_from_one_to_full_weight() {
    let start = t0();
    let mut h = state(HealthConfig { slow_start: SEC * 10, ..checks_only() });
    assert_eq!(h.effective_weight(start, 100), 0, "down");
    h.record(start, OK);
    h.record(start, OK);
    let t = h.poll(start).unwrap();
    assert_eq!(t.to, HealthStatus::SlowStart { since: start });
    assert_eq!(h.effective_weight(start, 100), 1, "starts at 1, not 0");
    assert_eq!(h.weight_factor(start + SEC * 3), (3000, 10_000));
    let ramp: Vec<u32> = (0..=10).map(|s| h.effective_weight(start + SEC * s, 100)).collect();
    assert_eq!(ramp, [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    assert!(ramp.windows(2).all(|p| p[0] <= p[1]));
    // Polled late: the transition to up is dated when it became due.
    let up = h.poll(start + SEC * 25).unwrap();
    assert_eq!((up.at, up.to, up.reason), (start + SEC * 10, HealthStatus::Up, Reason::SlowStartComplete));
    assert_eq!(h.weight_factor(start + SEC * 25), (1, 1));
    assert_eq!(h.effective_weight(start + SEC * 25, 7), 7);
    assert_eq!(h.effective_weight(start + SEC * 25, 0), 0, "configured 0 stays 0");
}

#[test]
fn a_failure_during_slow_start_takes_the_server_down() {
    let start = t0();
    let mut h = state(HealthConfig { fall: 1, ..checks_only() });
    h.record(start, OK);
    h.record(start, OK);
    h.record(start + SEC, FAIL);
    let kinds: Vec<(HealthStatus, ReasonKind)> =
        drain(&mut h, start + SEC).iter().map(|t| (t.to, t.reason.kind())).collect();
    assert_eq!(
        kinds,
        [
            (HealthStatus::SlowStart { since: start }, ReasonKind::ChecksPassed),
            (HealthStatus::Down, ReasonKind::ChecksFailed)
        ]
    );
    assert_eq!(h.effective_weight(start + SEC, 10), 0);
}

#[test]
fn flapping_is_held_down_with_exponential_back_off() {
    let start = t0();
    let config = HealthConfig { rise: 1, fall: 1, slow_start: Duration::ZERO, ..checks_only() };
    let mut h = state(config);
    let mut now = start;
    let mut log = Vec::new();
    // Up and down every second: downs 1 and 2 recover at once; from the third, recoveries are held down.
    for _ in 0..3 {
        h.record(now, OK);
        now += SEC;
        h.record(now, FAIL);
        now += SEC;
        log.extend(drain(&mut h, now));
    }
    assert_eq!(h.status(), HealthStatus::Down);
    h.record(now, OK);
    let held = h.poll(now).unwrap();
    assert_eq!(held.to, HealthStatus::HeldDown { until: now + SEC * 10 });
    assert_eq!(held.reason, Reason::FlapHoldDown { downs: 3, hold: SEC * 10 });
    assert_eq!(h.disposition(), Disposition::Quiesce);
    assert_eq!(h.effective_weight(now, 5), 0);
    // Still held 9 s later, up at 10 s.
    assert_eq!(h.poll(now + SEC * 9), None);
    let back = h.poll(now + SEC * 10).unwrap();
    assert_eq!((back.to, back.reason), (HealthStatus::Up, Reason::HoldDownExpired));
    // A fourth down within the window: the next hold is twice as long.
    now += SEC * 11;
    h.record(now, FAIL);
    h.record(now + SEC, OK);
    let t = drain(&mut h, now + SEC);
    assert_eq!(t.len(), 2);
    assert_eq!(t[1].reason, Reason::FlapHoldDown { downs: 4, hold: SEC * 20 });
    // A failure during the hold: down again; recovering before the hold's end is held until the same end.
    h.record(now + SEC * 2, FAIL);
    h.record(now + SEC * 3, OK);
    let t = drain(&mut h, now + SEC * 3);
    assert_eq!(t[0].to, HealthStatus::Down);
    assert!(matches!(t[1].to, HealthStatus::HeldDown { until } if until >= now + SEC * 21));
    // Each transition counted once by kind.
    assert_eq!(h.count(ReasonKind::HoldDownExpired), 1);
    assert_eq!(h.count(ReasonKind::FlapHoldDown), 3);
    assert_eq!(h.count(ReasonKind::ChecksFailed), 5);
}

#[test]
fn hold_down_is_capped_and_old_downs_are_forgotten() {
    let start = t0();
    let config = HealthConfig {
        rise: 1,
        fall: 1,
        slow_start: Duration::ZERO,
        flap_threshold: 2,
        hold_down_base: SEC * 100,
        hold_down_max: SEC * 150,
        ..checks_only()
    };
    let mut h = state(config);
    let mut now = start;
    for _ in 0..4 {
        h.record(now, OK);
        h.record(now, FAIL);
        now += SEC;
    }
    h.record(now, OK);
    let t = drain(&mut h, now);
    assert_eq!(t.last().unwrap().reason, Reason::FlapHoldDown { downs: 2, hold: SEC * 100 }, "{t:?}");
    // Two minutes later (window 60 s), the old downs no longer count.
    let later = now + SEC * 200;
    assert_eq!(h.poll(later).unwrap().reason, Reason::HoldDownExpired);
    h.record(later, FAIL);
    h.record(later + SEC, OK);
    let t = drain(&mut h, later + SEC);
    assert_eq!(t.last().unwrap().reason, Reason::ChecksPassed { consecutive: 1 }, "one down in the window: no hold");
    // Many downs: capped at hold_down_max.
    for k in 0..6 {
        h.record(later + SEC * (2 + k), FAIL);
        h.record(later + SEC * (2 + k), OK);
    }
    let t = drain(&mut h, later + SEC * 8);
    assert!(t.iter().all(|t| !matches!(t.reason, Reason::FlapHoldDown { hold, .. } if hold > SEC * 150)));
}

#[test]
fn an_agent_only_failure_takes_the_server_down() {
    let start = t0();
    let mut h = state(HealthConfig { slow_start: Duration::ZERO, ..HealthConfig::default() });
    h.record(start, OK);
    h.record(start, OK);
    assert_eq!(h.poll(start), None, "checks pass, but no agent yet");
    assert_eq!(h.status(), HealthStatus::Down);
    h.agent(start + SEC, true, Some(Duration::from_millis(200)));
    let up = h.poll(start + SEC).unwrap();
    assert_eq!((up.to, up.reason), (HealthStatus::Up, Reason::AgentBack));
    // Reports get old while the checks keep passing.
    h.record(start + SEC * 2, OK);
    h.agent(start + SEC * 6, true, Some(SEC * 5));
    assert_eq!(h.poll(start + SEC * 6), None, "5 s old is still alive");
    h.agent(start + SEC * 7, true, Some(SEC * 6));
    let down = h.poll(start + SEC * 7).unwrap();
    assert_eq!(down.reason, Reason::AgentLost { connected: true, report_age: Some(SEC * 6) });
    assert_eq!(h.status(), HealthStatus::Down);
    // Disconnected: no new transition (already down), then back.
    h.agent(start + SEC * 8, false, Some(SEC * 7));
    assert_eq!(h.poll(start + SEC * 8), None);
    h.agent(start + SEC * 9, true, Some(Duration::ZERO));
    assert_eq!(h.poll(start + SEC * 9).unwrap().reason, Reason::AgentBack);
    h.agent(start + SEC * 10, false, Some(Duration::ZERO));
    assert_eq!(
        h.poll(start + SEC * 10).unwrap().reason,
        Reason::AgentLost { connected: false, report_age: Some(Duration::ZERO) }
    );
    assert_eq!((h.count(ReasonKind::AgentLost), h.count(ReasonKind::AgentBack)), (2, 2));
}

#[test]
fn the_checks_recovering_while_the_agent_is_dead_stay_down() {
    let start = t0();
    let mut h = state(HealthConfig { slow_start: Duration::ZERO, initially_up: true, ..HealthConfig::default() });
    assert_eq!(h.status(), HealthStatus::Up);
    h.agent(start, false, None);
    assert_eq!(h.poll(start).unwrap().reason, Reason::AgentLost { connected: false, report_age: None });
    for k in 1..=3 {
        h.record(start + SEC * k, FAIL);
    }
    for k in 4..=6 {
        h.record(start + SEC * k, OK);
    }
    assert_eq!(h.poll(start + SEC * 6), None, "the checks alone do not bring it back");
    h.agent(start + SEC * 7, true, Some(Duration::ZERO));
    assert_eq!(h.poll(start + SEC * 7).unwrap().to, HealthStatus::Up);
}

#[test]
fn every_transition_is_returned_once_in_order() {
    let start = t0();
    let mut h = state(HealthConfig { rise: 1, fall: 1, slow_start: SEC, ..checks_only() });
    // Several transitions before anyone polls.
    h.record(start, OK);
    h.record(start + SEC * 2, FAIL); // slow start ended at 1 s: Up first, then Down
    h.record(start + SEC * 3, OK);
    let t = drain(&mut h, start + SEC * 3);
    let seen: Vec<(Instant, ReasonKind)> = t.iter().map(|t| (t.at, t.reason.kind())).collect();
    assert_eq!(
        seen,
        [
            (start, ReasonKind::ChecksPassed),
            (start + SEC, ReasonKind::SlowStartComplete),
            (start + SEC * 2, ReasonKind::ChecksFailed),
            (start + SEC * 3, ReasonKind::ChecksPassed),
        ]
    );
    assert!(t.windows(2).all(|p| p[0].to == p[1].from), "a chain: {t:?}");
    assert_eq!(h.poll(start + SEC * 3), None);
    let total: u64 = ReasonKind::ALL.iter().map(|&k| h.count(k)).sum();
    assert_eq!(total, 4);
}

#[test]
fn configuration_is_validated() {
    assert!(HealthState::new(HealthConfig { rise: 0, ..HealthConfig::default() }).is_err());
    assert_eq!(HealthConfig { fall: 0, ..HealthConfig::default() }.validate(), Err(HealthConfigError::ZeroCount));
    let bad = HealthConfig { hold_down_max: SEC, ..HealthConfig::default() };
    assert_eq!(bad.validate(), Err(HealthConfigError::HoldDown));
    assert_eq!(HealthConfig::default().validate(), Ok(()));
    let names: Vec<&str> = ReasonKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(names.len(), 7);
}

#[test]
fn quorum_and_sorry_server() {
    let start = t0();
    let sorry: SocketAddr = "10.0.0.250:80".parse().unwrap();
    let config = QuorumConfig {
        min_servers: 2,
        min_weight: 10,
        hysteresis: 1,
        sorry_server: Some(sorry),
        ..QuorumConfig::default()
    };
    let mut q = ServiceQuorum::new(config);
    assert_eq!(q.routing(), Routing::SorryServer(sorry), "no server proven healthy yet");
    assert_eq!(q.evaluate(start, [5, 5]), None, "2 servers but hysteresis asks for 3 to regain");
    let up = q.evaluate(start + SEC, [5, 5, 5]).unwrap();
    assert_eq!(
        (up.from, up.to, up.tally),
        (Routing::SorryServer(sorry), Routing::RealServers, Tally { servers: 3, weight: 15 })
    );
    assert_eq!(q.evaluate(start + SEC * 2, [5, 5]), None, "2 servers keep the quorum");
    // Enough servers but not enough weight.
    let lost = q.evaluate(start + SEC * 3, [5, 4]).unwrap();
    assert_eq!((lost.at, lost.to, lost.tally.weight), (start + SEC * 3, Routing::SorryServer(sorry), 9));
    assert_eq!(q.evaluate(start + SEC * 4, []), None, "reported once");
    assert!(!q.is_met());
    assert_eq!(q.counts(), (1, 1));
    // Without a sorry server the service keeps whatever remains.
    let mut q = ServiceQuorum::new(QuorumConfig::default());
    assert_eq!(q.evaluate(start, [1]).unwrap().to, Routing::RealServers);
    assert_eq!(q.evaluate(start, std::iter::empty()).unwrap().to, Routing::BelowQuorum);
}

#[test]
fn servers_feed_the_quorum() {
    // Three servers' health decides the service's routing.
    let start = t0();
    let config = HealthConfig { rise: 1, fall: 1, slow_start: Duration::ZERO, ..checks_only() };
    let mut servers: Vec<HealthState> = (0..3).map(|_| state(config.clone())).collect();
    let sorry: SocketAddr = "192.0.2.1:80".parse().unwrap();
    let mut q =
        ServiceQuorum::new(QuorumConfig { min_servers: 2, sorry_server: Some(sorry), ..QuorumConfig::default() });
    let mut evaluate = |servers: &mut [HealthState], now| {
        for s in servers.iter_mut() {
            while s.poll(now).is_some() {}
        }
        q.evaluate(now, servers.iter().filter(|s| s.status().is_serving()).map(|_| 1)).map(|t| t.to)
    };
    for s in &mut servers {
        s.record(start, OK);
    }
    assert_eq!(evaluate(&mut servers, start), Some(Routing::RealServers));
    servers[0].record(start + SEC, FAIL);
    assert_eq!(evaluate(&mut servers, start + SEC), None);
    servers[1].record(start + SEC * 2, FAIL);
    assert_eq!(evaluate(&mut servers, start + SEC * 2), Some(Routing::SorryServer(sorry)));
}
