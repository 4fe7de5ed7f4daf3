//! End-to-end director pair: two real directors with an `[ha]` section on the netns testbed, real servers
//! (DR) running nginx and a UDP echo behind the VIP, a client probing the VIP every millisecond.
//!
//! Needs root (network namespaces); fails loudly without it. Outage figures are printed, never asserted.

use std::time::Duration;

use anyhow::Result;
use fulcrum_director::ha::packet::MESSAGE_LEN;
use fulcrum_director::ha::{Heartbeat, State};
use fulcrum_tests::arp_watch::{longest_dual, mac_string, ArpWatch};
use fulcrum_tests::ha_pair::{capture_udp, Pair, PairOptions, TIEBREAKER_IP, VIP};
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
    // The notify hook records every state change, named by the director's namespace.
    let hooks = tempfile::tempdir()?;
    let log = hooks.path().join("notify.log");
    let script = hooks.path().join("notify.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$(ip netns identify) $1\" >> {}\n", log.display()))?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let options = PairOptions { extra_ha: format!("notify = \"{}\"\n", script.display()), ..PairOptions::default() };
    let pair = Pair::start("ha-demote", &options)?;
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
    let (old, new) = (pair.directors[master].host.netns(), pair.directors[backup].host.netns());
    let expected = [format!("{old} master"), format!("{new} backup"), format!("{new} master"), format!("{old} backup")];
    fulcrum_tests::wait_until("every notify hook to run", Duration::from_secs(10), Duration::from_millis(20), || {
        let lines = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(expected.iter().all(|e| lines.lines().any(|l| l == e)))
    })?;
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
    let options = PairOptions { extra_ha: "garp_refresh_s = 1\n".to_string(), ..PairOptions::default() };
    let pair = Pair::start("ha-forge", &options)?;
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

    // garp_refresh_s = 1: the MASTER re-announces its VIPs every second, the BACKUP never.
    let garps = pair.directors[master].metric("fulcrum_gratuitous_arps_total")?;
    fulcrum_tests::wait_until("a periodic re-announcement", Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(pair.directors[master].metric("fulcrum_gratuitous_arps_total")? > garps)
    })?;
    assert_eq!(pair.directors[backup].metric("fulcrum_gratuitous_arps_total")?, 0.0);
    Ok(())
}

const ARP_ROUND: Duration = Duration::from_millis(20);
/// The idle heartbeat period (`period_max_ms` default): the longest two directors may both answer ARP,
/// plus slack for the watch's resolution (a 20 ms round either side) and a busy machine's scheduling.
const PERIOD: Duration = Duration::from_millis(1000 + 100);

fn split_pair(name: &str) -> Result<(Pair, ArpWatch)> {
    let options = PairOptions { heartbeat_lan: true, tiebreaker: true, ..PairOptions::default() };
    let pair = Pair::start(name, &options)?;
    assert_eq!(pair.wait_settled(SETTLE)?, 0, "d1 has the higher priority");
    let watch = ArpWatch::start(pair.client.netns(), "eth0", "10.0.0.21".parse()?, VIP.parse()?, ARP_ROUND)?;
    fulcrum_tests::wait_until("ARP answers for the VIP", Duration::from_secs(5), ARP_ROUND, || {
        Ok(watch.rounds().iter().filter(|r| !r.macs.is_empty()).count() >= 5)
    })?;
    Ok((pair, watch))
}

/// Only the heartbeat link is cut (no second path), the tiebreaker reachable from both: the documented
/// split brain — both MASTER, since reachability of the tiebreaker cannot tell which side clients see.
/// When the link returns, the lower rank steps down at once: two directors answer ARP for less than one
/// period after that.
#[test]
fn a_cut_heartbeat_link_with_the_tiebreaker_reachable_from_both_is_split_brain_until_it_returns() -> Result<()> {
    let (pair, watch) = split_pair("ha-split")?;
    let d1_mac = pair.directors[0].mac()?;
    pair.directors[0].host.cut("hb0")?;
    pair.directors[1].wait_state("MASTER", Duration::from_secs(15))?;
    assert_eq!(pair.directors[0].state()?, "MASTER", "the documented outcome: both MASTER");
    fulcrum_tests::wait_until("both directors answering ARP", Duration::from_secs(5), ARP_ROUND, || {
        Ok(watch.rounds().last().is_some_and(|r| r.macs.len() == 2))
    })?;
    pair.directors[0].host.restore("hb0")?;
    let restored = std::time::Instant::now();
    pair.directors[1].wait_state("BACKUP", Duration::from_secs(10))?;
    assert_eq!(pair.directors[0].state()?, "MASTER", "d1 outranks d2");
    // A few more rounds with one answer each.
    let seen = watch.rounds().len();
    fulcrum_tests::wait_until("more ARP rounds", Duration::from_secs(5), ARP_ROUND, || {
        Ok(watch.rounds().len() >= seen + 10)
    })?;
    let rounds = watch.stop()?;
    let after: Vec<_> = rounds.iter().filter(|r| r.at >= restored).cloned().collect();
    let (dual, _) = longest_dual(&after);
    let (split, split_rounds) = longest_dual(&rounds);
    println!(
        "heartbeat link cut, tiebreaker reachable from both: both answered ARP for {:.0} ms ({split_rounds} rounds) \
         while cut; after it returned, for {:.0} ms",
        split.as_secs_f64() * 1000.0,
        dual.as_secs_f64() * 1000.0
    );
    assert!(dual <= PERIOD, "two directors answered ARP for {dual:?} after the link returned");
    let last = rounds.last().expect("rounds");
    assert_eq!(last.macs.iter().map(mac_string).collect::<Vec<_>>(), vec![d1_mac], "only d1 answers now");
    let status = pair.directors[1].status()?;
    let lost = status["shell"]["transitions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["to"] == "backup" && t["reason"] == "dual_master_lost");
    assert!(lost, "d2 stepped down by the dual-master rule: {status}");
    Ok(())
}

/// Only the heartbeat link is cut and the MASTER (d1) has lost its tiebreaker too: d2 takes over, d1 goes
/// to FAULT and stops answering ARP; two directors answer for less than one period.
#[test]
fn a_cut_heartbeat_link_with_the_tiebreaker_reachable_from_one_side_leaves_one_master() -> Result<()> {
    let (pair, watch) = split_pair("ha-onetb")?;
    let d2_mac = pair.directors[1].mac()?;
    pair.directors[0].host.ip_cmd(&["route", "add", "prohibit", &format!("{TIEBREAKER_IP}/32")])?;
    pair.directors[0].host.cut("hb0")?;
    pair.directors[1].wait_state("MASTER", Duration::from_secs(15))?;
    pair.directors[0].wait_state("FAULT", Duration::from_secs(10))?;
    let seen = watch.rounds().len();
    fulcrum_tests::wait_until("more ARP rounds", Duration::from_secs(5), ARP_ROUND, || {
        Ok(watch.rounds().len() >= seen + 10)
    })?;
    let rounds = watch.stop()?;
    let (dual, dual_rounds) = longest_dual(&rounds);
    println!(
        "heartbeat link cut, tiebreaker lost by the MASTER: both answered ARP for {:.0} ms ({dual_rounds} rounds)",
        dual.as_secs_f64() * 1000.0
    );
    assert!(dual <= PERIOD, "two directors answered ARP for {dual:?}");
    let last = rounds.last().expect("rounds");
    assert_eq!(last.macs.iter().map(mac_string).collect::<Vec<_>>(), vec![d2_mac], "only d2 answers now");
    assert_eq!(pair.directors[0].metric("fulcrum_ha_serving")?, 0.0);
    assert!(pair.directors[0].metric("fulcrum_ha_tiebreaker_unreachable_total")? >= 1.0);

    // Link and tiebreaker back: d1 recovers and, preempting, takes mastership back: one MASTER again.
    pair.directors[0].host.ip_cmd(&["route", "del", "prohibit", &format!("{TIEBREAKER_IP}/32")])?;
    pair.directors[0].host.restore("hb0")?;
    assert_eq!(pair.wait_settled(Duration::from_secs(15))?, 0);
    Ok(())
}

/// Stopping the MASTER (SIGTERM) hands over first: the probe loses nothing.
#[test]
fn stopping_the_master_hands_over_without_loss() -> Result<()> {
    let mut pair = Pair::start("ha-stop", &PairOptions::default())?;
    let master = pair.wait_settled(SETTLE)?;
    let backup = 1 - master;
    pair.client.curl(&format!("http://{VIP}/"), &["--max-time", "5"])?;
    let probe = UdpProbe::start(pair.client.netns(), pair.udp_target(), PROBE_INTERVAL)?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    let mut process = pair.directors[master].process.take().expect("running");
    let status = process.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "{status}: {}", process.output_tails());
    pair.directors[backup].wait_state("MASTER", Duration::from_secs(1))?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    let report = probe.stop()?;
    println!(
        "SIGTERM of the MASTER under a 1 ms UDP probe: longest gap {:.1} ms, {} lost",
        report.longest_gap.as_secs_f64() * 1000.0,
        report.lost()
    );
    assert_eq!(report.lost(), 0, "{report:?}");
    let status = pair.directors[backup].status()?;
    assert_eq!(status["status"]["counters"]["failovers"], 0, "a handover, not a failover: {status}");
    Ok(())
}

/// NAT real servers: their gateway is the VIP, so replies follow mastership. kill -9 of the MASTER under
/// the probe: the BACKUP takes over the VIP (and so the gateway), and the probe resumes.
#[test]
fn nat_real_servers_follow_the_master_after_kill_9() -> Result<()> {
    let mut pair = Pair::start("ha-nat", &PairOptions { forward: "nat", ..PairOptions::default() })?;
    let master = pair.wait_settled(SETTLE)?;
    let backup = 1 - master;
    let body = pair.client.curl(&format!("http://{VIP}/"), &["--max-time", "5"])?;
    assert!(body.starts_with("host=rs"), "{body}");
    let probe = UdpProbe::start(pair.client.netns(), pair.udp_target(), PROBE_INTERVAL)?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    pair.directors[master].kill()?;
    pair.directors[backup].wait_state("MASTER", Duration::from_secs(10))?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    let report = probe.stop()?;
    println!(
        "NAT, kill -9 of the MASTER under a 1 ms UDP probe: outage {:.1} ms, {} lost",
        report.longest_gap.as_secs_f64() * 1000.0,
        report.lost()
    );
    let body = pair.client.curl(&format!("http://{VIP}/"), &["--max-time", "5"])?;
    assert!(body.starts_with("host=rs"), "TCP through the new MASTER: {body}");
    Ok(())
}
