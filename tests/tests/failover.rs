//! End-to-end director pair: two real directors with an `[ha]` section on the netns testbed, real servers
//! (DR) running nginx and a UDP echo behind the VIP, a client probing the VIP every millisecond.
//!
//! Needs root (network namespaces); fails loudly without it. Outage figures are printed, never asserted.

use std::time::Duration;

use anyhow::Result;
use fulcrum_tests::ha_pair::{Pair, PairOptions, VIP};
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
