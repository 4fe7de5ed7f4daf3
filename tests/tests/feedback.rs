//! End-to-end dynamic feedback: real agents report the CPU of their server's cgroup; the one whose cgroup burns
//! its whole CPU quota gets a lower effective weight (and a larger `df` load term) than the idle ones, visible in
//! `fulcrumctl list --json` and the metrics, and `df` sends it fewer new connections.
//!
//! Needs root (network namespaces, a cgroup v1 cpu/cpuacct or v2 hierarchy); fails loudly without it.

mod feedback_lab;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use feedback_lab::{Lab, POLL};
use fulcrum_tests::{wait_until, ChildGuard};

/// The cgroup v1 hierarchies the agent reads (`cpuacct.usage` over `cpu.cfs_quota_us`).
const V1_HIERARCHIES: [&str; 2] = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct"];
/// The cgroup v2 root, when the unified hierarchy is mounted there (`cpu.stat` over `cpu.max`).
const V2_ROOT: &str = "/sys/fs/cgroup";

/// A cgroup with a CPU quota — in the v1 cpu and cpuacct hierarchies when they are mounted (as the agent
/// prefers them), else in the v2 hierarchy; removed on drop (after its processes).
struct Cgroup {
    name: String,
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    fn new(name: String, quota_us: u32) -> Result<Cgroup> {
        let v1 = V1_HIERARCHIES.iter().all(|root| Path::new(root).join("cgroup.procs").exists());
        let roots: Vec<&str> = if v1 { V1_HIERARCHIES.to_vec() } else { vec![V2_ROOT] };
        if !v1 {
            // The cpu controller must be enabled for the root's children (allowed while processes live there).
            std::fs::write(Path::new(V2_ROOT).join("cgroup.subtree_control"), "+cpu")
                .context("enabling the cgroup v2 cpu controller (no cgroup v1 cpu hierarchy either)")?;
        }
        let mut cgroup = Cgroup { name, dirs: Vec::new() };
        for root in roots {
            let dir = Path::new(root).join(&cgroup.name);
            std::fs::create_dir(&dir).with_context(|| format!("creating the cgroup {}", dir.display()))?;
            cgroup.dirs.push(dir);
        }
        let dir = &cgroup.dirs[0];
        if v1 {
            std::fs::write(dir.join("cpu.cfs_period_us"), "100000")?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
        } else {
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} 100000"))?;
        }
        Ok(cgroup)
    }

    /// The path the agent's `cpu.cgroup` names.
    fn path(&self) -> String {
        format!("/{}", self.name)
    }

    /// A shell busy-looping in this cgroup; killed on drop. (It needs no network, so it stays in the root
    /// namespace, where the cgroup hierarchies are mounted.)
    fn burn(&self) -> Result<ChildGuard> {
        let join = self.dirs.iter().map(|d| format!("echo $$ > {}/cgroup.procs", d.display())).collect::<Vec<_>>();
        let mut command = Command::new("sh");
        command.args(["-c", &format!("{} && while :; do :; done", join.join(" && "))]);
        ChildGuard::spawn(&format!("burner@{}", self.name), command)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn weight_and_load(lab: &Lab, address: &str) -> Result<(u64, u64, Option<u64>)> {
    let view = lab.view(address)?;
    Ok((
        view["effective_weight"].as_u64().context("effective weight")?,
        view["df_load_term"].as_u64().context("df load term")?,
        view["cpu_bp"].as_u64(),
    ))
}

#[test]
fn a_cpu_loaded_server_gets_a_lower_effective_weight_and_fewer_df_connections() -> Result<()> {
    let mut lab = Lab::start("feedback", &[10, 10, 10], "scheduler = \"df\"\n", false)?;
    // Fields of `_cgroups` outlive the burner and agents (declared later, dropped first).
    let cgroups =
        (1..=3).map(|i| Cgroup::new(format!("{}-rs{i}", lab.bed.prefix()), 20_000)).collect::<Result<Vec<_>>>()?;
    let agents = (0..3).map(|i| lab.start_agent(i, &cgroups[i].path())).collect::<Result<Vec<_>>>()?;
    let _burner = cgroups[0].burn()?;
    let ips: Vec<String> = lab.servers.iter().map(|s| s.ip()).collect();

    // rs1's cgroup uses its whole 0.2-CPU quota; the others idle. The blender moves rs1's weight below theirs.
    let mut last = Vec::new();
    wait_until("rs1 weighted below the idle servers", Duration::from_secs(30), POLL, || {
        let views = ips.iter().map(|ip| weight_and_load(&lab, ip)).collect::<Result<Vec<_>>>()?;
        last.clone_from(&views);
        let loaded = views[0].2.is_some_and(|bp| bp > 8000);
        let idle = views[1..].iter().all(|v| v.2.is_some_and(|bp| bp < 2000));
        let lower = views[1..].iter().all(|v| views[0].0 < v.0);
        // The blender itself has taken rs1's load (its df load term), not only the agent registry: until the
        // blender accepts rs1's first report, rs1 keeps its configured weight while the idle servers' rise.
        // df divides the term by the weight, and sizes it to the weight: per unit of weight it is larger.
        let per_weight = |v: &(u64, u64, Option<u64>)| v.1 as f64 / v.0.max(1) as f64;
        let blended = views[1..].iter().all(|v| per_weight(&views[0]) > per_weight(v));
        Ok(loaded && idle && lower && blended)
    })
    .with_context(|| {
        let tails: Vec<String> = agents.iter().map(|a| a.output_tails()).collect();
        format!("(weight, df load term, CPU bp) of rs1..rs3: {last:?}; agents: {tails:?}")
    })?;
    let table = lab.fulcrumctl(&["list"])?;
    assert!(table.contains("TCP  10.0.0.100:80 df"), "{table}");

    // The same numbers as metrics (each scrape is a new sample on a busy machine: wait for it to agree).
    let metric =
        |name: &str, ip: &str| lab.metric(&format!("{name}{{service=\"10.0.0.100:80/tcp\",server=\"{ip}:80\"}}"));
    let cpu = |ip: &str| lab.metric(&format!("fulcrum_server_cpu_ratio{{server=\"{ip}\"}}"));
    wait_until("the metrics showing rs1 loaded and weighted lower", Duration::from_secs(10), POLL, || {
        let weight = |ip: &str| metric("fulcrum_server_effective_weight", ip);
        Ok(weight(&ips[0])? < weight(&ips[1])? && cpu(&ips[0])? > 0.5 && cpu(&ips[0])? > cpu(&ips[1])?)
    })?;

    // df places less than a fair share of new connections on the loaded server. (With one short connection
    // at a time nothing is active, and between the idle servers the response-time term T decides: an
    // inactive connection weighs 1/256 of an active one.)
    let counts = lab.spread(60)?;
    let of = |host: &str| counts.get(host).copied().unwrap_or(0);
    assert!(of("rs1") < 20 && of("rs1") < of("rs2").max(of("rs3")), "{counts:?}");

    // A reload turns feedback off and removes rs3: the configured weights and no df terms for rs1 and rs2, and
    // rs3's agent, reporting for a server no longer configured, is refused and counted.
    lab.reload("scheduler = \"df\"\n", "scheduler = \"df\"\n\n[service.feedback]\nenabled = false\n")?;
    lab.reload("\n[[service.server]]\naddress = \"10.0.0.13\"\nweight = 10\nforward = \"dr\"\n", "")?;
    wait_until("the configured weights back after the reload", Duration::from_secs(10), POLL, || {
        let views = ips[..2].iter().map(|ip| weight_and_load(&lab, ip)).collect::<Result<Vec<_>>>()?;
        Ok(views.iter().all(|v| v.0 == 10 && v.1 == 0) && lab.view(&ips[2]).is_err())
    })?;
    wait_until("rs3's agent refused", Duration::from_secs(10), POLL, || {
        Ok(lab.metric("fulcrum_agent_rejections_total{reason=\"unknown_real_server\"}")? >= 1.0)
    })?;
    Ok(())
}
