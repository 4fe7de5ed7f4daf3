//! The feedback benchmark's machinery, end to end with real cgroups: an nginx confined to a CPU quota, its
//! agent reporting the cgroup's CPU relative to that quota to a real director, and the CPU antagonist.
//!
//! Needs root (network namespaces, cgroups); fails loudly without it. No timing is asserted: the test waits
//! (with a deadline) for states the director reports.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fulcrum_tests::cgroup::CfsPeriod;
use fulcrum_tests::pki::Pki;
use fulcrum_tests::quota::QuotaServer;
use fulcrum_tests::{abort_wait, require_root, wait_until, workspace_bin, ChildGuard, Host, Testbed};
use serde_json::Value;

const DIRECTOR_IP: &str = "10.0.0.2";
const AGENT_PORT: u16 = 7946;
const POLL: Duration = Duration::from_millis(100);
/// 10 % of one core, in CFS periods of 20 ms (2 ms of CPU each).
const CORES: f64 = 0.1;
const PERIOD: Duration = Duration::from_millis(20);

fn start_director(host: &Host, work: &Path, pki: &Pki, server: &str) -> Result<(ChildGuard, std::path::PathBuf)> {
    let socket = work.join("director.sock");
    let config = work.join("director.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:{AGENT_PORT}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[control]\nsocket = \"{}\"\n\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\n\n[[service.server]]\naddress = \"{server}\"\n",
            pki.path("ca.pem").display(),
            pki.path("d1.pem").display(),
            pki.path("d1.key").display(),
            socket.display()
        ),
    )?;
    let mut cmd = Command::new(workspace_bin("fulcrum-director"));
    cmd.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn");
    let process = host.spawn(cmd)?;
    host.wait_udp_listening(AGENT_PORT, Duration::from_secs(10))?;
    Ok((process, socket))
}

/// The director's view of the agent of `server`: (CPU source, busy basis points) of its newest report.
fn reported_cpu(socket: &Path, server: &str) -> Result<Option<(String, u64)>> {
    let out =
        Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(socket).args(["agents", "--json"]).output()?;
    if !out.status.success() {
        bail!("fulcrumctl agents: {}", String::from_utf8_lossy(&out.stderr));
    }
    let agents: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let Some(agent) = agents.iter().find(|a| a["real_server"] == server && a["connected"] == true) else {
        return Ok(None);
    };
    let cpu = &agent["last_report"]["cpu"];
    Ok(cpu["busy_bp"].as_u64().map(|bp| (cpu["source"].as_str().unwrap_or("").to_string(), bp)))
}

#[test]
fn an_agent_in_a_quota_cgroup_reports_cpu_relative_to_the_quota() -> Result<()> {
    require_root();
    let bed = Testbed::new("fbench")?;
    let dir1 = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
    let rs1 = bed.add_host("rs1", "10.0.0.11/24")?;
    let pki = Pki::new(&[("d1", DIRECTOR_IP.parse()?)], &["rs1"])?;
    let work = tempfile::tempdir()?;

    let mut server = QuotaServer::start(&rs1, 80, CORES, CfsPeriod::Fixed(PERIOD))?;
    let quota = server.cgroup().quota()?.context("a quota is set")?;
    assert!((quota - CORES).abs() < 1e-9, "quota {quota} CPUs, want {CORES}");
    // nginx (master and worker) runs in the cgroup, and still serves.
    let procs = server.cgroup().processes()?;
    assert!(procs.len() >= 2, "nginx master and worker in the cgroup, found {procs:?}");
    let before = server.cgroup().usage()?;
    for _ in 0..20 {
        assert_eq!(rs1.curl("http://10.0.0.11/", &[])?, "host=rs1\n");
    }
    let after = server.cgroup().usage()?;
    assert!(after > before, "nginx's work is charged to its cgroup ({before:?} → {after:?})");

    let (mut director, socket) = start_director(&dir1, work.path(), &pki, "10.0.0.11")?;
    server.start_agent(&pki, "d1", format!("{DIRECTOR_IP}:{AGENT_PORT}").parse()?, 500)?;

    // Idle nginx: well under its quota.
    let (source, idle_bp) = wait_until("the agent's first CPU sample", Duration::from_secs(20), POLL, || {
        if let Some(status) = director.try_wait()? {
            return Err(abort_wait(anyhow::anyhow!("director exited with {status}: {}", director.output_tails())));
        }
        reported_cpu(&socket, "10.0.0.11")
    })?;
    assert!(source.starts_with("Cgroup"), "the agent reads its cgroup, not /proc/stat: source {source}");
    assert!(idle_bp < 5_000, "idle nginx at {idle_bp} bp of its quota");

    // A burner in the cgroup takes all of 10 % of one core: host-wide that is 5 % of a two-core machine, but
    // relative to the quota the cgroup is full, and the kernel throttles it.
    let throttled_before = server.cgroup().throttled_periods()?;
    let antagonist = server.start_antagonist()?;
    assert!(server.cgroup().processes()?.contains(&antagonist.pid()));
    wait_until("the agent to report its cgroup near its quota", Duration::from_secs(20), POLL, || {
        Ok(reported_cpu(&socket, "10.0.0.11")?.is_some_and(|(_, bp)| bp >= 8_000))
    })?;
    let throttled = server.cgroup().throttled_periods()?;
    assert!(throttled > throttled_before, "the quota bites: {throttled_before} → {throttled} throttled periods");

    // Doubling the quota while the burner runs: still full relative to the new quota.
    server.set_quota(2.0 * CORES)?;
    assert!((server.cgroup().quota()?.context("quota")? - 2.0 * CORES).abs() < 1e-9);

    // The antagonist gone, the report falls back.
    drop(antagonist);
    wait_until("the agent to report its cgroup idle again", Duration::from_secs(20), POLL, || {
        Ok(reported_cpu(&socket, "10.0.0.11")?.is_some_and(|(_, bp)| bp < 5_000))
    })?;
    let agent = server.agent().context("agent started")?;
    assert!(agent.is_running()?, "agent exited: {}", agent.output_tails());
    Ok(())
}
