//! End-to-end director pair: two real directors with an `[ha]` section on the netns testbed, real servers
//! (DR) running nginx and a UDP echo behind the VIP, a client probing the VIP every millisecond.
//!
//! Needs root (network namespaces); fails loudly without it. Outage figures are printed, never asserted.

use std::time::Duration;

use anyhow::Result;
use fulcrum_director::ha::packet::MESSAGE_LEN;
use fulcrum_director::ha::{Heartbeat, State};
use fulcrum_tests::ha_pair::{capture_udp, Pair, PairOptions, VIP};
use fulcrum_tests::udp_probe::UdpProbe;

const SETTLE: Duration = Duration::from_secs(20);
const PROBE_INTERVAL: Duration = Duration::from_millis(1);

/// Exactly one director becomes MASTER and serves; kill -9 it under a 1 ms UDP probe: the BACKUP takes
/// over and the probe resumes.
#[test]
fn one_master_serves_and_the_backup_takes_over_after_kill_9() -> Result<()> {
    let mut pair = Pair::start("ha-kill", &PairOptions::default())?;
    let master = pair.wait_settled(SETTLE)?;
    assert_eq!(master, 0, "d1 has the higher priority");
    let backup = 1 - master;
    assert_eq!(pair.directors[master].metric("fulcrum_ha_serving")?, 1.0);
    assert_eq!(pair.directors[backup].metric("fulcrum_ha_serving")?, 0.0);
    // Only the MASTER answers: TCP through the VIP reaches nginx.
    let body = pair.client.curl(&format!("http://{VIP}/"), &["--max-time", "5"])?;
    assert!(body.starts_with("host=rs"), "{body}");

    let probe = UdpProbe::start(pair.client.netns(), pair.udp_target(), PROBE_INTERVAL)?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    // Under the probe's load the MASTER's heartbeat period shortens (high_load_pps = 500).
    fulcrum_tests::wait_until(
        "the MASTER's period to shorten",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(pair.directors[master].metric("fulcrum_ha_heartbeat_period_seconds")? < 0.1),
    )?;
    pair.directors[master].kill()?;
    pair.directors[backup].wait_state("MASTER", Duration::from_secs(10))?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    let report = probe.stop()?;
    println!(
        "kill -9 of the MASTER under a 1 ms UDP probe: outage (longest gap) {:.1} ms, {} of {} datagrams lost, {} duplicated",
        report.longest_gap.as_secs_f64() * 1000.0,
        report.lost(),
        report.sent,
        report.duplicates
    );
    let status = pair.directors[backup].status()?;
    assert_eq!(status["status"]["counters"]["failovers"], 1, "{status}");
    assert_eq!(pair.directors[backup].metric("fulcrum_ha_serving")?, 1.0);
    assert!(pair.directors[backup].metric("fulcrum_ha_transitions_total{to=\"master\",reason=\"peer_dead\"}")? >= 1.0);
    // And TCP is served by the new MASTER.
    let body = pair.client.curl(&format!("http://{VIP}/"), &["--max-time", "5"])?;
    assert!(body.starts_with("host=rs"), "{body}");
    Ok(())
}

/// `fulcrumctl ha demote` on the MASTER hands over make-before-break: the probe loses nothing.
#[test]
fn a_graceful_demote_loses_no_probe_datagram() -> Result<()> {
    let pair = Pair::start("ha-demote", &PairOptions::default())?;
    let master = pair.wait_settled(SETTLE)?;
    let backup = 1 - master;
    pair.client.curl(&format!("http://{VIP}/"), &["--max-time", "5"])?;
    let probe = UdpProbe::start(pair.client.netns(), pair.udp_target(), PROBE_INTERVAL)?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    let out = pair.directors[master].fulcrumctl(&["ha", "demote"])?;
    assert!(out.contains("demoted"), "{out}");
    pair.directors[backup].wait_state("MASTER", Duration::from_secs(10))?;
    pair.directors[master].wait_state("BACKUP", Duration::from_secs(10))?;
    // The old MASTER has stopped forwarding (its drain is over) and the probe still flows.
    fulcrum_tests::wait_until(
        "the old MASTER to stop serving",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(pair.directors[master].metric("fulcrum_ha_serving")? == 0.0),
    )?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    let report = probe.stop()?;
    println!(
        "demote under a 1 ms UDP probe: longest gap {:.1} ms, {} of {} lost, {} duplicated",
        report.longest_gap.as_secs_f64() * 1000.0,
        report.lost(),
        report.sent - report.first_answered,
        report.duplicates
    );
    assert_eq!(report.lost(), 0, "{report:?}");
    let status = pair.directors[master].status()?;
    assert_eq!(status["status"]["demoted"], true, "{status}");
    assert_eq!(status["status"]["counters"]["failovers"], 0, "a handover is not a failover: {status}");
    // Release: automatic again, and d1 (higher priority, preempt on) takes mastership back if it lost it.
    pair.directors[master].fulcrumctl(&["ha", "release"])?;
    if master == 0 {
        pair.directors[0].wait_state("MASTER", Duration::from_secs(10))?;
    }
    Ok(())
}

/// Forged heartbeats (wrong key, garbage) and replayed genuine ones, sent from a third namespace, change
/// nothing and are counted by reason.
#[test]
fn forged_and_replayed_heartbeats_change_nothing_and_are_counted() -> Result<()> {
    let pair = Pair::start("ha-forge", &PairOptions::default())?;
    let master = pair.wait_settled(SETTLE)?;
    let backup = 1 - master;
    let mallory = pair.bed.add_host("mallory", "10.0.0.66/24")?;
    let target: std::net::SocketAddr = format!("{}:7947", pair.directors[backup].ip).parse()?;
    let master_ip: std::net::Ipv4Addr = pair.directors[master].ip.parse()?;
    // Genuine heartbeats from the MASTER, captured on the way in.
    let genuine = capture_udp(pair.directors[backup].host.netns(), master_ip, target, 3, Duration::from_secs(10))?;
    let before = pair.directors[backup].status()?;
    let counters =
        |status: &serde_json::Value, key: &str| status["status"]["counters"]["rejected"][key].as_u64().unwrap_or(0);

    let forged = Heartbeat {
        state: State::Master,
        priority: 255,
        flags: fulcrum_director::ha::packet::FLAG_CLAIM,
        node_id: 1 + before["status"]["peer"]["node_id"].as_u64().unwrap_or(1) as u32,
        boot_id: 7,
        seq: u64::MAX / 2,
        echo_boot: before["status"]["boot_id"].as_u64().unwrap_or(0),
        period_us: 20_000,
        next_period_us: 20_000,
        tolerance: 3,
        load_pps: 0,
        load_conns: 0,
        rx_seq: 0,
        rx_count: 0,
        rx_jitter_us: 0,
    }
    .encode(b"not the pair's key, but 16+ bytes");
    // The right length and version, random bytes otherwise.
    let mut garbage = vec![0xa5u8; MESSAGE_LEN];
    garbage[0] = fulcrum_director::ha::packet::VERSION;
    let datagrams: Vec<Vec<u8>> = std::iter::repeat_n(forged.to_vec(), 10)
        .chain(std::iter::repeat_n(garbage, 5))
        .chain(std::iter::repeat_n(vec![1u8; 7], 5))
        .chain(genuine.iter().cloned().cycle().take(9))
        .collect();
    fulcrum_tests::in_netns(mallory.netns(), move || {
        let socket = std::net::UdpSocket::bind("10.0.0.66:0")?;
        for datagram in &datagrams {
            socket.send_to(datagram, target)?;
        }
        Ok(())
    })?;
    fulcrum_tests::wait_until(
        "every forged datagram counted",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let now = pair.directors[backup].status()?;
            let bad_mac = counters(&now, "bad_mac") - counters(&before, "bad_mac");
            let bad_length = counters(&now, "bad_length") - counters(&before, "bad_length");
            let replays = counters(&now, "replayed") + counters(&now, "duplicate")
                - counters(&before, "replayed")
                - counters(&before, "duplicate");
            Ok(bad_mac == 15 && bad_length == 5 && replays == 9)
        },
    )?;
    let after = pair.directors[backup].status()?;
    assert_eq!(after["status"]["state"], "Backup", "{after}");
    assert_eq!(after["status"]["counters"]["transitions"], before["status"]["counters"]["transitions"]);
    assert_eq!(pair.directors[master].state()?, "MASTER");
    assert!(pair.directors[backup].metric("fulcrum_ha_heartbeats_rejected_total{reason=\"bad_mac\"}")? >= 15.0);
    Ok(())
}
