//! End-to-end health checks: the director checks real nginx servers over HTTP (`dr` mode, so the checks go to
//! each server's own address), quiesces a failed one while the others serve, brings it back through slow start,
//! and sends clients to the sorry server when none is left.
//!
//! Needs root (network namespaces); fails loudly without it.

mod feedback_lab;

use std::time::Duration;

use anyhow::Result;
use feedback_lab::{Lab, POLL, SORRY_IP};
use fulcrum_tests::wait_until;

const HEALTH: &str = "scheduler = \"wlc\"\n\n[service.health]\nkind = \"http\"\npath = \"/health\"\nbody = \"ok\"\nstatus = \"200-299\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 2\nfall = 2\nslow_start_s = 3\nsorry_server = \"10.0.0.50:80\"\n";

fn health_of(lab: &Lab, address: &str) -> Result<(String, u64)> {
    let view = lab.view(address)?;
    Ok((view["health"].as_str().unwrap_or("?").to_string(), view["effective_weight"].as_u64().unwrap_or(u64::MAX)))
}

#[test]
fn a_failed_server_is_quiesced_comes_back_ramping_and_the_sorry_server_serves_when_none_is_left() -> Result<()> {
    let mut lab = Lab::start("health", &[10, 10, 10], HEALTH, true)?;
    let ips: Vec<String> = lab.servers.iter().map(|s| s.ip()).collect();

    // Proven healthy by the checks, through slow start, up at full weight; the sorry server idles.
    wait_until("every real server up", Duration::from_secs(20), POLL, || {
        Ok(ips.iter().all(|ip| health_of(&lab, ip).is_ok_and(|h| h == ("up".into(), 10))))
    })?;
    assert_eq!(health_of(&lab, SORRY_IP)?, ("sorry-standby".to_string(), 0));
    let table = lab.fulcrumctl(&["list"])?;
    assert!(table.contains("Health") && table.contains(" up\n"), "{table}");
    let counts = lab.spread(30)?;
    assert!(["rs1", "rs2", "rs3"].iter().all(|h| counts.get(*h).is_some_and(|&n| n > 0)), "{counts:?}");

    // nginx stops on rs1: two failed checks quiesce it, the others serve every request.
    lab.servers[0].stop_nginx()?;
    wait_until("rs1 down and quiesced", Duration::from_secs(10), POLL, || {
        Ok(health_of(&lab, &ips[0])? == ("down".into(), 0))
    })?;
    let counts = lab.spread(40)?;
    assert_eq!(counts.get("rs1"), None, "a quiesced server gets no new connection: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 40);
    assert!(lab.metric("fulcrum_health_transitions_total{reason=\"checks_failed\"}")? >= 1.0);
    let log = lab.director_log();
    let logged = |reason: &str| {
        log.lines().filter(|l| l.contains("real server health") && l.contains(&ips[0]) && l.contains(reason)).count()
    };
    assert_eq!(logged("ChecksFailed"), 1, "the transition is logged once, with its reason:\n{log}");
    assert_eq!(
        lab.metric(&format!("fulcrum_server_health_up{{service=\"10.0.0.100:80/tcp\",server=\"{}:80\"}}", ips[0]))?,
        0.0
    );
    assert_eq!(
        lab.metric(&format!("fulcrum_server_health_up{{service=\"10.0.0.100:80/tcp\",server=\"{}:80\"}}", ips[1]))?,
        1.0
    );

    // nginx back: rise successes, then a weight ramp from 1 up to the full 10.
    lab.servers[0].start_nginx()?;
    let ramp = wait_until("rs1 in slow start", Duration::from_secs(10), Duration::from_millis(10), || {
        let (health, weight) = health_of(&lab, &ips[0])?;
        Ok((health == "slow-start").then_some(weight))
    })?;
    assert!((1..10).contains(&ramp), "slow start begins below full weight: {ramp}");
    wait_until("rs1 up at full weight", Duration::from_secs(10), POLL, || {
        Ok(health_of(&lab, &ips[0])? == ("up".into(), 10))
    })?;
    let counts = lab.spread(30)?;
    assert!(counts.get("rs1").is_some_and(|&n| n > 0), "rs1 serves again: {counts:?}");

    // Every real server down: below quorum, the sorry server answers.
    for server in &mut lab.servers {
        server.stop_nginx()?;
    }
    wait_until("the sorry server active", Duration::from_secs(10), POLL, || {
        Ok(health_of(&lab, SORRY_IP)? == ("sorry-active".into(), 1))
    })?;
    for ip in &ips {
        assert_eq!(health_of(&lab, ip)?, ("down".to_string(), 0));
    }
    let counts = lab.spread(10)?;
    assert_eq!(counts.get("sorry"), Some(&10), "{counts:?}");
    assert!(lab.metric("fulcrum_quorum_transitions_total{to=\"sorry_server\"}")? >= 1.0);

    // One server back: the quorum is regained and the sorry server idles again.
    lab.servers[1].start_nginx()?;
    wait_until("the quorum regained", Duration::from_secs(10), POLL, || {
        Ok(health_of(&lab, SORRY_IP)? == ("sorry-standby".into(), 0))
    })?;
    let counts = lab.spread(10)?;
    assert_eq!(counts.get("rs2"), Some(&10), "{counts:?}");
    Ok(())
}
