//! Real servers of unequal capacity: an nginx confined to a CPU quota cgroup, an agent reporting that cgroup's
//! CPU (relative to the quota) to a director, and a CPU antagonist that can be put into the same cgroup.
//!
//! ```no_run
//! use fulcrum_tests::cgroup::CfsPeriod;
//! use fulcrum_tests::pki::Pki;
//! use fulcrum_tests::quota::QuotaServer;
//! use fulcrum_tests::Testbed;
//!
//! # fn main() -> anyhow::Result<()> {
//! let tb = Testbed::new("quota")?;
//! let rs = tb.add_host("rs1", "10.0.0.11/24")?;
//! let pki = Pki::new(&[("d1", "10.0.0.2".parse()?)], &["rs1"])?;
//! let mut server = QuotaServer::start(&rs, 80, 0.1, CfsPeriod::Shortest)?;   // 10 % of one core, 10 ms periods
//! server.start_agent(&pki, "d1", "10.0.0.2:7946".parse()?, 500)?;
//! let _antagonist = server.start_antagonist()?;                                      // burns the same quota
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cgroup::{netns_command_keeping_mounts, CfsPeriod, CpuCgroup};
use crate::pki::Pki;
use crate::{try_workspace_bin, ChildGuard, Host, Nginx};

/// nginx in a cgroup of its own with a CPU quota, and optionally an agent reporting that cgroup.
///
/// Field order: the agent and nginx stop before the cgroup is removed.
pub struct QuotaServer {
    agent: Option<ChildGuard>,
    nginx: Nginx,
    cgroup: CpuCgroup,
    host: Host,
    period: CfsPeriod,
    work: tempfile::TempDir,
}

impl QuotaServer {
    /// Starts nginx on `port` in `host`'s namespace and moves it (master and workers) into a new cgroup limited
    /// to `cores` CPUs per CFS `period`.
    pub fn start(host: &Host, port: u16, cores: f64, period: CfsPeriod) -> Result<QuotaServer> {
        let cgroup = CpuCgroup::create(host.name())?;
        cgroup.set_quota(cores, period.for_quota(cores)?)?;
        let mut nginx = host.start_nginx(port)?;
        cgroup.add_process_tree(nginx.process().pid())?;
        let work = tempfile::Builder::new().prefix(&format!("fulcrum-quota-{}-", host.name())).tempdir()?;
        Ok(QuotaServer { agent: None, nginx, cgroup, host: host.clone(), period, work })
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn nginx(&self) -> &Nginx {
        &self.nginx
    }

    pub fn cgroup(&self) -> &CpuCgroup {
        &self.cgroup
    }

    /// Changes the quota while nginx runs (in a period of the same kind: the same fixed one, or the shortest
    /// for the new quota).
    pub fn set_quota(&self, cores: f64) -> Result<()> {
        self.cgroup.set_quota(cores, self.period.for_quota(cores)?)
    }

    /// Starts `fulcrum-agent` for this server (its name is the host's name, its real server the host's address,
    /// port 80 probed over HTTP at `/health`), reporting the cgroup's CPU to the director `director_name` at
    /// `director` every `interval_ms`. The agent runs in the host's network namespace but outside the cgroup:
    /// its own work does not eat the server's quota.
    pub fn start_agent(
        &mut self,
        pki: &Pki,
        director_name: &str,
        director: SocketAddr,
        interval_ms: u64,
    ) -> Result<()> {
        let name = self.host.name().to_string();
        let config = self.work.path().join("agent.toml");
        let text = format!(
            "name = \"{name}\"\nreal_server = \"{ip}\"\nports = [{port}]\ninterval_ms = {interval_ms}\n\n[[director]]\nname = \"{director_name}\"\naddress = \"{director}\"\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[cpu]\nsource = \"cgroup\"\ncgroup = \"{cgroup}\"\n\n[probe]\nkind = \"http\"\npath = \"/health\"\n",
            ip = self.host.ip(),
            port = self.nginx.port(),
            ca = pki.path("ca.pem").display(),
            cert = pki.path(&format!("{name}.pem")).display(),
            key = pki.path(&format!("{name}.key")).display(),
            cgroup = self.cgroup.name(),
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let bin = try_workspace_bin("fulcrum-agent")?;
        let mut check = netns_command_keeping_mounts(self.host.netns(), &bin);
        check.arg("check-config").arg("--config").arg(&config);
        let out = crate::run_unchecked(&mut check)?;
        if !out.status.success() {
            bail!("agent config for {name} refused: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let mut cmd = netns_command_keeping_mounts(self.host.netns(), &bin);
        cmd.arg("--config").arg(&config).env("RUST_LOG", "warn");
        self.agent = Some(ChildGuard::spawn(&format!("fulcrum-agent@{name}"), cmd)?);
        Ok(())
    }

    pub fn agent(&mut self) -> Option<&mut ChildGuard> {
        self.agent.as_mut()
    }

    /// A CPU burner (a busy shell loop) inside this server's cgroup: it takes a share of the quota away from
    /// nginx until the returned guard is dropped.
    pub fn start_antagonist(&self) -> Result<ChildGuard> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]);
        let guard = ChildGuard::spawn(&format!("antagonist@{}", self.host.name()), cmd)?;
        self.cgroup.add_process(guard.pid())?;
        Ok(guard)
    }
}
