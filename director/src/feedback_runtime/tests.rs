use std::path::Path;

use fulcrum_protocol::fixtures::load_report;
use fulcrum_protocol::messages::{ProbeFailure, ProbeKind, ProbeOutcome, ProbeReport, ProbeSample};

use super::*;
use crate::dataplane::table::TableBuilder;
use crate::health::{CheckFailure, ReasonKind};

const SEC: Duration = Duration::from_secs(1);

struct Setup {
    _dir: tempfile::TempDir,
    config: DirectorConfig,
}

/// A director configuration with one service on 10.0.0.100:80 (extra service keys in `service`) and real
/// servers 10.0.0.11, .12, … with weight 10.
fn setup(service: &str, servers: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "d1.pem", "d1.key"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let d = dir.path().display();
    let mut text = format!(
        "name = \"d1\"\n[agents]\nca = \"{d}/ca.pem\"\ncert = \"{d}/d1.pem\"\nkey = \"{d}/d1.key\"\n\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\n{service}\n"
    );
    for i in 0..servers {
        text.push_str(&format!("[[service.server]]\naddress = \"10.0.0.{}\"\nweight = 10\n", 11 + i));
    }
    let config = DirectorConfig::from_text(Path::new("d.toml"), &text).unwrap();
    Setup { _dir: dir, config }
}

/// A feedback core configured at `t0` with `setup(service, servers)`, and the data-plane table it writes to
/// (built by `builder`, which later tables of the same test must come from).
struct Lab {
    builder: TableBuilder,
    table: ServiceTable,
    core: FeedbackCore,
    t0: Instant,
}

fn start(service: &str, servers: usize) -> Lab {
    let s = setup(service, servers);
    let mut builder = TableBuilder::new(1);
    let table = builder.build(&s.config.services);
    let mut core = FeedbackCore::default();
    let t0 = Instant::now();
    core.reconfigure(t0, &s.config);
    Lab { builder, table, core, t0 }
}

fn web() -> ServiceKey {
    ServiceKey { vip: "10.0.0.100".parse().unwrap(), port: 80, protocol: Protocol::Tcp }
}

fn server(i: u8) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 0, 0, 11 + i), 80)
}

/// (effective weight, health) of every server of the service, sorry server last.
fn published(table: &ServiceTable) -> Vec<(u32, Health)> {
    table.services[0]
        .servers
        .iter()
        .map(|id| {
            let state = &table.server(*id).unwrap().state;
            (state.effective_weight.load(Ordering::Relaxed), state.health())
        })
        .collect()
}

fn agent(i: u8, seq: u64, cpu_bp: u16, at: Instant) -> AgentLatest {
    AgentLatest { real_server: IpAddr::V4(server(i).0), connected: true, report: Some((load_report(seq, cpu_bp), at)) }
}

fn health_kinds(events: &[Event]) -> Vec<ReasonKind> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Health { transition, .. } => Some(transition.reason.kind()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_blender_takes_the_agents_smoothed_response_time_while_its_probe_succeeds() {
    // The agent probes several times per report and smooths them: one probe alone is a poor sample of a server
    // that answers in microseconds or, throttled, milliseconds. A failing probe has no response time.
    let at = Instant::now();
    let with_probe = |kind, last| {
        let mut r = load_report(1, 5_000);
        r.probe = ProbeReport { kind, last, smoothed_us: Some(9_999), consecutive_failures: 0, total_failures: 0 };
        ReportInput::from_report(&r, at).response_time_us
    };
    let http = ProbeSample { connect_us: 150, first_byte_us: Some(2_400), http_status: Some(200) };
    assert_eq!(with_probe(ProbeKind::Http, ProbeOutcome::Ok(http)), Some(9_999));
    let tcp = ProbeSample { connect_us: 150, first_byte_us: None, http_status: None };
    assert_eq!(with_probe(ProbeKind::Tcp, ProbeOutcome::Ok(tcp)), Some(9_999));
    assert_eq!(with_probe(ProbeKind::Http, ProbeOutcome::Failed(ProbeFailure::Timeout)), None);
    assert_eq!(with_probe(ProbeKind::Http, ProbeOutcome::Pending), None);
}

#[test]
fn without_health_or_feedback_the_configured_weights_stand() {
    let Lab { table, mut core, t0, .. } = start("scheduler = \"wlc\"", 2);
    // A loaded agent changes nothing: feedback is off for wlc unless enabled.
    let events = core.tick(t0, &table, &[agent(0, 1, 9000, t0)]);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(published(&table), vec![(10, Health::Unchecked), (10, Health::Unchecked)]);
    assert_eq!(core.period(), Duration::from_millis(500));
}

#[test]
fn checks_bring_a_server_up_through_slow_start_and_down_on_failures() {
    let Lab { table, mut core, t0, .. } =
        start("[service.health]\nkind = \"tcp\"\nrise = 2\nfall = 3\nslow_start_s = 10", 2);
    core.tick(t0, &table, &[]);
    assert_eq!(published(&table), vec![(0, Health::Down), (0, Health::Down)], "not proven healthy yet");

    for i in 0..2 {
        core.record(t0, web(), server(i), CheckResult::Success);
        core.record(t0, web(), server(i), CheckResult::Success);
    }
    let events = core.tick(t0, &table, &[]);
    assert_eq!(health_kinds(&events), vec![ReasonKind::ChecksPassed; 2]);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Quorum { transition, .. } if transition.to == Routing::RealServers)));
    assert_eq!(published(&table), vec![(1, Health::SlowStart), (1, Health::SlowStart)], "the ramp starts at 1");
    core.tick(t0 + 5 * SEC, &table, &[]);
    assert_eq!(published(&table), vec![(5, Health::SlowStart), (5, Health::SlowStart)], "half way");
    let events = core.tick(t0 + 10 * SEC, &table, &[]);
    assert_eq!(health_kinds(&events), vec![ReasonKind::SlowStartComplete; 2]);
    assert_eq!(published(&table), vec![(10, Health::Up), (10, Health::Up)]);

    // Three refused connects take server 0 down (quiesced); server 1 serves on.
    for _ in 0..3 {
        core.record(t0 + 11 * SEC, web(), server(0), CheckResult::Failure(CheckFailure::Refused));
    }
    let events = core.tick(t0 + 11 * SEC, &table, &[]);
    assert_eq!(health_kinds(&events), vec![ReasonKind::ChecksFailed]);
    assert_eq!(published(&table), vec![(0, Health::Down), (10, Health::Up)]);
    // Each transition is reported once.
    assert!(core.tick(t0 + 12 * SEC, &table, &[]).is_empty());
}

#[test]
fn below_quorum_the_sorry_server_takes_the_new_connections() {
    let Lab { table, mut core, t0, .. } = start(
        "[service.health]\nkind = \"tcp\"\nrise = 1\nfall = 1\nslow_start_s = 0\non_failure = \"remove\"\nsorry_server = \"10.0.0.50:80\"",
        2,
    );
    let events = core.tick(t0, &table, &[]);
    assert!(events.is_empty(), "the quorum starts lost: {events:?}");
    assert_eq!(published(&table), vec![(0, Health::Removed), (0, Health::Removed), (1, Health::SorryActive)]);

    core.record(t0, web(), server(1), CheckResult::Success);
    let events = core.tick(t0, &table, &[]);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Quorum { transition, .. } if transition.to == Routing::RealServers)));
    assert_eq!(published(&table), vec![(0, Health::Removed), (10, Health::Up), (0, Health::SorryStandby)]);

    core.record(t0 + SEC, web(), server(1), CheckResult::Failure(CheckFailure::Timeout));
    let events = core.tick(t0 + SEC, &table, &[]);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Quorum { transition, .. } if matches!(transition.to, Routing::SorryServer(_)))));
    assert_eq!(published(&table), vec![(0, Health::Removed), (0, Health::Removed), (1, Health::SorryActive)]);
}

#[test]
fn a_required_agent_is_a_second_signal() {
    let Lab { table, mut core, t0, .. } =
        start("[service.health]\nagent = \"required\"\nagent_max_age_ms = 2000\nrise = 1\nslow_start_s = 0", 1);
    core.tick(t0, &table, &[]);
    assert_eq!(published(&table), vec![(0, Health::Down)], "no agent yet");
    let events = core.tick(t0, &table, &[agent(0, 1, 1000, t0)]);
    assert_eq!(health_kinds(&events), vec![ReasonKind::AgentBack]);
    assert_eq!(published(&table), vec![(10, Health::Up)]);
    let events = core.tick(t0 + 3 * SEC, &table, &[agent(0, 1, 1000, t0)]);
    assert_eq!(health_kinds(&events), vec![ReasonKind::AgentLost], "its report is too old");
    assert_eq!(published(&table), vec![(0, Health::Down)]);
}

#[test]
fn df_feedback_lowers_a_loaded_servers_weight_and_sets_its_terms() {
    let Lab { table, mut core, t0, .. } = start("scheduler = \"df\"", 2);
    for k in 0..10u32 {
        let now = t0 + SEC * k;
        let events =
            core.tick(now, &table, &[agent(0, u64::from(k) + 1, 9000, now), agent(1, u64::from(k) + 1, 1000, now)]);
        if k == 0 {
            // Each server's first report takes its feedback from stale (never reported) to normal: logged once.
            let kinds: Vec<_> = events
                .iter()
                .map(|e| match e {
                    Event::Feedback { from, to, .. } => (from.name(), to.name()),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            assert_eq!(kinds, [("stale", "normal"); 2]);
        } else {
            assert!(events.is_empty(), "{events:?}");
        }
    }
    let weights = published(&table);
    assert!(weights[0].0 < weights[1].0, "the loaded server weighs less: {weights:?}");
    let terms = |i: usize| {
        let state = &table.server(table.services[0].servers[i]).unwrap().state;
        (state.cpu_norm.load(Ordering::Relaxed), state.response_time_norm.load(Ordering::Relaxed))
    };
    // df divides its terms by the weight: per unit of weight, L is larger for the loaded server.
    let per_weight = |i: usize| f64::from(terms(i).0) / f64::from(weights[i].0);
    assert!(
        per_weight(0) > per_weight(1),
        "L / W is larger for the loaded server: {:?} {:?} {weights:?}",
        terms(0),
        terms(1)
    );

    // An impossible report is refused and said so, once.
    let now = t0 + SEC * 11;
    let events = core.tick(now, &table, &[agent(0, 99, 12_000, now), agent(1, 99, 1000, now)]);
    assert_eq!(
        events,
        vec![Event::Rejected { service: web(), server: server(0), reason: RejectReason::CpuOverFullScale }]
    );
    assert!(core.tick(now, &table, &[agent(0, 99, 12_000, now), agent(1, 99, 1000, now)]).is_empty());
}

#[test]
fn reconfiguring_keeps_the_health_of_unchanged_servers() {
    let Lab { mut builder, table, mut core, t0, .. } =
        start("[service.health]\nkind = \"tcp\"\nrise = 1\nslow_start_s = 0", 1);
    core.record(t0, web(), server(0), CheckResult::Success);
    core.tick(t0, &table, &[]);
    assert_eq!(published(&table), vec![(10, Health::Up)]);

    // A reload that adds a server: the first stays up, the new one starts down.
    let two = setup("[service.health]\nkind = \"tcp\"\nrise = 1\nslow_start_s = 0", 2);
    let table = builder.build(&two.config.services);
    core.reconfigure(t0, &two.config);
    core.tick(t0, &table, &[]);
    assert_eq!(published(&table), vec![(10, Health::Up), (0, Health::Down)]);

    // Changed health settings restart the machines but a serving server stays up.
    let changed = setup("[service.health]\nkind = \"tcp\"\nrise = 3\nslow_start_s = 0", 2);
    let table = builder.build(&changed.config.services);
    core.reconfigure(t0, &changed.config);
    core.tick(t0, &table, &[]);
    assert_eq!(published(&table), vec![(10, Health::Up), (0, Health::Down)]);
}

/// `agent` with its probe failing `failures` times in a row.
fn failing_agent(i: u8, seq: u64, at: Instant, failures: u32) -> AgentLatest {
    let mut report = load_report(seq, 5000);
    report.probe.consecutive_failures = failures;
    AgentLatest { real_server: IpAddr::V4(server(i).0), connected: true, report: Some((report, at)) }
}

#[test]
fn when_every_agent_falls_silent_the_configured_weights_stand() {
    let Lab { table, mut core, t0, .. } = start("scheduler = \"df\"", 2);
    core.tick(t0, &table, &[agent(0, 1, 9000, t0), agent(1, 1, 1000, t0)]);
    // Nothing heard for longer than down_after (10 s): the silence is the agents', not proof that the servers
    // died, so the configured weights stand rather than none.
    let late = t0 + 11 * SEC;
    let events = core.tick(late, &table, &[agent(0, 1, 9000, t0), agent(1, 1, 1000, t0)]);
    let feedback: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Feedback { to, .. } => Some(to.name()),
            _ => None,
        })
        .collect();
    assert_eq!(feedback, ["down", "down"], "each server's status change is still reported: {events:?}");
    assert!(events.contains(&Event::AgentsSilent { service: web(), silent: true }), "{events:?}");
    assert_eq!(published(&table), vec![(10, Health::Unchecked), (10, Health::Unchecked)]);
    assert!(!core.tick(late + SEC, &table, &[]).iter().any(|e| matches!(e, Event::AgentsSilent { .. })), "once");

    // One agent reports again: feedback again. The other keeps its share while it too may be reconnecting, for
    // down_after, and is down after that.
    let back = late + 2 * SEC;
    let events = core.tick(back, &table, &[agent(0, 2, 5000, back), agent(1, 1, 1000, t0)]);
    assert!(events.contains(&Event::AgentsSilent { service: web(), silent: false }), "{events:?}");
    assert_eq!(published(&table)[1], (10, Health::Unchecked), "in the grace after the silence");
    let after = back + 11 * SEC;
    core.tick(after, &table, &[agent(0, 3, 5000, after), agent(1, 1, 1000, t0)]);
    let weights = published(&table);
    assert!(weights[0].0 > 0 && weights[1].0 == 0, "{weights:?}");
}

#[test]
fn agents_falling_silent_a_report_apart_are_one_silence() {
    let Lab { table, mut core, t0, .. } = start("scheduler = \"df\"", 2);
    let last = [agent(0, 1, 5000, t0), agent(1, 1, 5000, t0 + SEC / 2)];
    core.tick(t0 + SEC / 2, &table, &last);
    // Server 0's report is past down_after (10 s), server 1's half a second short of it: already one silence,
    // rather than server 0 dropped while server 1 waits its turn.
    let events = core.tick(t0 + 10 * SEC + SEC / 4, &table, &last);
    assert!(events.contains(&Event::AgentsSilent { service: web(), silent: true }), "{events:?}");
    assert_eq!(published(&table), vec![(10, Health::Unchecked), (10, Health::Unchecked)]);
}

#[test]
fn adding_a_sorry_server_to_a_running_service_keeps_its_feedback() {
    let Lab { mut builder, table, mut core, t0, .. } = start("scheduler = \"df\"", 2);
    for k in 0..10u32 {
        let now = t0 + SEC * k;
        core.tick(now, &table, &[agent(0, u64::from(k) + 1, 9000, now), agent(1, u64::from(k) + 1, 1000, now)]);
    }
    let before: Vec<u32> = published(&table).iter().map(|p| p.0).collect();
    assert!(before[0] < before[1], "{before:?}");
    // The new quorum has never counted: it must not read as the sorry server standing in and wipe the weights.
    let with_sorry = setup("scheduler = \"df\"\n[service.health]\nsorry_server = \"10.0.0.50:80\"", 2);
    let table = builder.build(&with_sorry.config.services);
    core.reconfigure(t0 + SEC * 10, &with_sorry.config);
    let now = t0 + SEC * 10;
    core.tick(now, &table, &[agent(0, 11, 9000, now), agent(1, 11, 1000, now)]);
    let after: Vec<u32> = published(&table).iter().map(|p| p.0).collect();
    assert!(after[0] < after[1] && after[0].abs_diff(before[0]) <= before[0] / 4 + 1, "{before:?} → {after:?}");
    assert_eq!(published(&table)[2], (0, Health::SorryStandby));
}

#[test]
fn a_server_the_feedback_marks_down_is_not_serving_for_the_quorum() {
    let Lab { table, mut core, t0, .. } =
        start("scheduler = \"df\"\n[service.health]\nsorry_server = \"10.0.0.50:80\"", 2);
    core.tick(t0, &table, &[agent(0, 1, 5000, t0), agent(1, 1, 5000, t0)]);
    assert_eq!(published(&table), vec![(10, Health::Unchecked), (10, Health::Unchecked), (0, Health::SorryStandby)]);
    // Both agents' probes of their service fail: the feedback marks both servers down, and with none serving
    // the sorry server takes the new connections (the weights alone would have dropped them).
    let now = t0 + SEC;
    let events = core.tick(now, &table, &[failing_agent(0, 2, now, 3), failing_agent(1, 2, now, 3)]);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Quorum { transition, .. } if matches!(transition.to, Routing::SorryServer(_)))));
    assert_eq!(published(&table), vec![(0, Health::Unchecked), (0, Health::Unchecked), (1, Health::SorryActive)]);
}

#[test]
fn changing_the_health_settings_keeps_a_met_quorum() {
    let health = |timeout| {
        format!(
            "[service.health]\nkind = \"tcp\"\nrise = 1\nfall = 1\nslow_start_s = 0\ntimeout_ms = {timeout}\n\
             quorum = 2\nhysteresis = 1\nsorry_server = \"10.0.0.50:80\""
        )
    };
    let Lab { mut builder, table, mut core, t0, .. } = start(&health(1000), 3);
    for i in 0..3 {
        core.record(t0, web(), server(i), CheckResult::Success);
    }
    core.tick(t0, &table, &[]);
    core.record(t0 + SEC, web(), server(2), CheckResult::Failure(CheckFailure::Refused));
    core.tick(t0 + SEC, &table, &[]);
    // Two of three serving: still at quorum 2, though regaining it would take three.
    assert_eq!(published(&table)[3], (0, Health::SorryStandby));

    let changed = setup(&health(500), 3);
    let table = builder.build(&changed.config.services);
    core.reconfigure(t0 + 2 * SEC, &changed.config);
    let events = core.tick(t0 + 2 * SEC, &table, &[]);
    assert!(!events.iter().any(|e| matches!(e, Event::Quorum { .. })), "{events:?}");
    assert_eq!(
        published(&table),
        vec![(10, Health::Up), (10, Health::Up), (0, Health::Down), (0, Health::SorryStandby)],
        "a new check timeout alone does not send the service to its sorry server"
    );
}

#[test]
fn a_server_out_of_rotation_comes_back_at_its_configured_share() {
    let Lab { table, mut core, t0, .. } =
        start("scheduler = \"df\"\n[service.health]\nkind = \"tcp\"\nrise = 1\nfall = 1\nslow_start_s = 0", 2);
    core.record(t0, web(), server(0), CheckResult::Failure(CheckFailure::Refused));
    core.record(t0, web(), server(1), CheckResult::Success);
    // Server 0 is down for 30 s; its agent, with no traffic to serve, reads idle all along.
    for k in 0..30u32 {
        let now = t0 + SEC * k;
        let seq = u64::from(k) + 1;
        core.tick(now, &table, &[agent(0, seq, 300, now), agent(1, seq, 5000, now)]);
    }
    assert_eq!(published(&table), vec![(0, Health::Down), (10, Health::Up)]);
    let now = t0 + SEC * 30;
    core.record(now, web(), server(0), CheckResult::Success);
    core.tick(now, &table, &[agent(0, 31, 300, now), agent(1, 31, 5000, now)]);
    let weights = published(&table);
    // Counted while down, the idle server would have climbed towards 10 × 10 and the other sunk to the floor.
    assert!(weights[0].0 <= 13 && weights[1].0 >= 8, "back at about its configured share: {weights:?}");
}
