//! End-to-end connection sync: a director pair (`[ha]` and `[sync]`) on the netns testbed, real servers
//! running a TCP echo and a UDP echo behind the VIP, in `dr` and in `nat` mode.
//!
//! - The standby's connection table fills with the active's connections, and a standby restarted empty
//!   gets the full table back.
//! - `kill -9` of the MASTER while 200 long-lived TCP connections exchange data every 10 ms and a probe
//!   sends a UDP datagram every 1 ms: every TCP connection keeps working, with no reset and no byte lost
//!   or changed. The outage (longest probe gap, longest wait for an echo) is printed, never asserted.
//!
//! Needs root (network namespaces); fails loudly without it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fulcrum_tests::ha_pair::{Pair, PairDirector, PairOptions, TCP_ECHO_PORT, VIP};
use fulcrum_tests::tcp_streams::TcpStreams;
use fulcrum_tests::udp_probe::UdpProbe;
use fulcrum_tests::wait_until;
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// Default preemption (no `preempt_delay_ms`): a restarted director takes the VIPs back only once its peer's
/// full table has arrived, which these tests prove by failing back without losing a connection.
fn options(forward: &'static str) -> PairOptions {
    PairOptions { forward, workers: 2, sync: true, tcp_echo: true, ..PairOptions::default() }
}

fn echo_target() -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("VIP"), TCP_ECHO_PORT)
}

/// `fulcrumctl sync --json`.
fn sync_status(director: &PairDirector) -> Result<Value> {
    let text = director.fulcrumctl(&["sync", "--json"])?;
    serde_json::from_str(&text).with_context(|| format!("fulcrumctl sync: {text}"))
}

fn counter(status: &Value, key: &str) -> u64 {
    status[key].as_u64().unwrap_or(0)
}

/// Both directions of sync are up on both directors.
fn wait_sync_connected(pair: &Pair) -> Result<()> {
    wait_until("both sync connections up on both directors", Duration::from_secs(20), POLL, || {
        for director in &pair.directors {
            let status = sync_status(director)?;
            if status["sending_connected"] != true || status["receiving_connected"] != true {
                return Ok(false);
            }
        }
        Ok(true)
    })
}

/// Tracked connections of a director (all workers).
fn table_entries(director: &PairDirector) -> Result<u64> {
    Ok(director.metric("fulcrum_connection_table_entries")? as u64)
}

fn wait_entries(director: &PairDirector, at_least: u64, timeout: Duration) -> Result<()> {
    wait_until(&format!("{} to track {at_least} connections", director.name), timeout, POLL, || {
        Ok(table_entries(director)? >= at_least)
    })
}

fn assert_nothing_refused(director: &PairDirector) -> Result<()> {
    for reason in ["unknown_service", "install_failed", "auth", "replay", "malformed"] {
        let dropped = director.metric(&format!("fulcrum_sync_dropped_total{{reason=\"{reason}\"}}"))?;
        assert_eq!(dropped, 0.0, "{}: sync records dropped for {reason}", director.name);
    }
    Ok(())
}

fn standby_fills_and_a_restarted_standby_gets_the_full_table(name: &str, forward: &'static str) -> Result<()> {
    const CONNECTIONS: usize = 50;
    let mut pair = Pair::start(name, &options(forward))?;
    let master = pair.wait_settled(SETTLE)?;
    let backup = 1 - master;
    wait_sync_connected(&pair)?;
    assert_eq!(table_entries(&pair.directors[backup])?, 0);

    let streams = TcpStreams::start(pair.client.netns(), echo_target(), CONNECTIONS, Duration::from_millis(10))?;
    streams.wait_rounds(5, Duration::from_secs(10))?;
    wait_entries(&pair.directors[backup], CONNECTIONS as u64, Duration::from_secs(10))?;
    // The standby counts them per server, as established (ActiveConn), like the master.
    wait_until("the standby's ActiveConn", Duration::from_secs(10), POLL, || {
        Ok(pair.directors[backup].metric("fulcrum_active_connections{")? >= CONNECTIONS as f64)
    })?;
    let sent = sync_status(&pair.directors[master])?;
    let received = sync_status(&pair.directors[backup])?;
    assert!(counter(&sent, "records_sent") >= CONNECTIONS as u64, "{sent}");
    assert!(counter(&received, "records_applied") >= CONNECTIONS as u64, "{received}");
    assert_eq!(counter(&sync_status(&pair.directors[backup])?, "records_sent"), 0, "a standby sends nothing");
    assert_nothing_refused(&pair.directors[backup])?;

    // The standby restarts empty; on reconnecting it asks for, and gets, the whole table.
    pair.directors[backup].kill()?;
    pair.directors[backup].start()?;
    pair.directors[backup].wait_state("BACKUP", SETTLE)?;
    wait_entries(&pair.directors[backup], CONNECTIONS as u64, Duration::from_secs(20))?;
    wait_until("the end-of-table marker", Duration::from_secs(10), POLL, || {
        Ok(counter(&sync_status(&pair.directors[backup])?, "full_tables_received") >= 1)
    })?;
    let sent = sync_status(&pair.directors[master])?;
    assert!(counter(&sent, "full_tables_sent") >= 1, "{sent}");
    assert_nothing_refused(&pair.directors[backup])?;

    streams.wait_rounds(5, Duration::from_secs(10))?;
    let report = streams.stop()?;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    Ok(())
}

#[test]
fn dr_standby_fills_and_a_restarted_standby_gets_the_full_table() -> Result<()> {
    standby_fills_and_a_restarted_standby_gets_the_full_table("sync-fill-dr", "dr")
}

#[test]
fn nat_standby_fills_and_a_restarted_standby_gets_the_full_table() -> Result<()> {
    standby_fills_and_a_restarted_standby_gets_the_full_table("sync-fill-nat", "nat")
}

fn kill_9_of_the_master_keeps_every_tcp_connection(name: &str, forward: &'static str) -> Result<()> {
    const CONNECTIONS: usize = 200;
    let mut pair = Pair::start(name, &options(forward))?;
    let master = pair.wait_settled(SETTLE)?;
    let backup = 1 - master;
    wait_sync_connected(&pair)?;

    let streams = TcpStreams::start(pair.client.netns(), echo_target(), CONNECTIONS, Duration::from_millis(10))?;
    let probe = UdpProbe::start(pair.client.netns(), pair.udp_target(), Duration::from_millis(1))?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    streams.wait_rounds(10, Duration::from_secs(10))?;
    // Every TCP connection and the probe's UDP flow are on the standby before the master goes.
    wait_entries(&pair.directors[backup], CONNECTIONS as u64 + 1, Duration::from_secs(10))?;

    pair.directors[master].kill()?;
    pair.directors[backup].wait_state("MASTER", Duration::from_secs(10))?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    streams.wait_rounds(50, Duration::from_secs(30))?;
    let failover = probe.stop()?;

    // Failback: the old master restarts empty, gets the new master's table (sync works both ways) and takes
    // the VIPs back (higher priority); the connections carry on through it.
    let probe = UdpProbe::start(pair.client.netns(), pair.udp_target(), Duration::from_millis(1))?;
    probe.wait_answers(200, Duration::from_secs(10))?;
    pair.directors[master].start()?;
    pair.directors[master].wait_state("MASTER", SETTLE)?;
    pair.directors[backup].wait_state("BACKUP", Duration::from_secs(10))?;
    probe.wait_answers(500, Duration::from_secs(10))?;
    streams.wait_rounds(50, Duration::from_secs(30))?;
    let failback = probe.stop()?;
    let streams = streams.stop()?;
    println!(
        "{forward}: kill -9 of the MASTER under {CONNECTIONS} TCP connections (a message every 10 ms) and a 1 ms UDP \
         probe: outage (longest probe gap) {:.1} ms, {} of {} datagrams lost; failback: longest gap {:.1} ms, {} of {} \
         lost; longest wait for a TCP echo {:.1} ms; {} bytes sent, {} echoed, {} connection errors",
        failover.longest_gap.as_secs_f64() * 1000.0,
        failover.lost(),
        failover.sent,
        failback.longest_gap.as_secs_f64() * 1000.0,
        failback.lost(),
        failback.sent,
        streams.longest_stall.as_secs_f64() * 1000.0,
        streams.bytes_sent,
        streams.bytes_echoed,
        streams.errors.len(),
    );
    assert!(streams.errors.is_empty(), "connections failed: {:?}", streams.errors);
    assert_eq!(streams.connections, CONNECTIONS);
    assert_eq!(streams.bytes_echoed, streams.bytes_sent, "every byte sent came back");
    // Each new master knew every connection: none of their packets was refused as unknown.
    for director in &pair.directors {
        let unknown = director.metric("fulcrum_dropped_packets_total{reason=\"no_connection\"}")?;
        assert_eq!(unknown, 0.0, "{} refused packets of connections it did not know", director.name);
        assert_nothing_refused(director)?;
    }
    Ok(())
}

#[test]
fn dr_kill_9_of_the_master_keeps_every_tcp_connection() -> Result<()> {
    kill_9_of_the_master_keeps_every_tcp_connection("sync-kill-dr", "dr")
}

#[test]
fn nat_kill_9_of_the_master_keeps_every_tcp_connection() -> Result<()> {
    kill_9_of_the_master_keeps_every_tcp_connection("sync-kill-nat", "nat")
}
