//! The lab shared by `health.rs` and `feedback.rs`: one LAN with a client, a director (`dr` mode), real servers
//! running nginx and, optionally, a sorry server; agents on the real servers on demand.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fulcrum_tests::{require_root, wait_until, workspace_bin, ChildGuard, Host, Nginx, Testbed};
use serde_json::Value;

pub const VIP: &str = "10.0.0.100";
pub const DIRECTOR_IP: &str = "10.0.0.2";
pub const SORRY_IP: &str = "10.0.0.50";
pub const POLL: Duration = Duration::from_millis(50);

pub struct RealServer {
    pub host: Host,
    pub nginx: Option<Nginx>,
}

impl RealServer {
    pub fn ip(&self) -> String {
        self.host.ip().to_string()
    }

    pub fn stop_nginx(&mut self) -> Result<()> {
        if let Some(nginx) = self.nginx.take() {
            nginx.stop()?;
        }
        Ok(())
    }

    pub fn start_nginx(&mut self) -> Result<()> {
        self.nginx = Some(self.host.start_nginx(80)?);
        Ok(())
    }
}

pub struct Lab {
    // Fields drop in order: the director stops before its namespaces go.
    director_process: ChildGuard,
    pub client: Host,
    pub director: Host,
    pub servers: Vec<RealServer>,
    pub sorry: Option<(Host, Nginx)>,
    pub work: tempfile::TempDir,
    pub socket: PathBuf,
    pub bed: Testbed,
}

/// A host that takes `dr` traffic for the VIP: the VIP on `lo`, never answering ARP for it.
fn dr_host(bed: &Testbed, name: &str, ip: &str) -> Result<Host> {
    let host = bed.add_host(name, &format!("{ip}/24"))?;
    host.accept_vip_for_dr(VIP)?;
    Ok(host)
}

impl Lab {
    /// `service_extra` is TOML added to the `[[service]]` table (scheduler, `[service.health]`, …).
    pub fn start(name: &str, weights: &[u32], service_extra: &str, with_sorry: bool) -> Result<Lab> {
        require_root();
        let bed = Testbed::new(name)?;
        let director = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
        let client = bed.add_host("c0", "10.0.0.21/24")?;
        let mut servers = Vec::new();
        for i in 0..weights.len() {
            let host = dr_host(&bed, &format!("rs{}", i + 1), &format!("10.0.0.{}", 11 + i))?;
            let nginx = host.start_nginx(80)?;
            servers.push(RealServer { host, nginx: Some(nginx) });
        }
        let sorry = if with_sorry {
            let host = dr_host(&bed, "sorry", SORRY_IP)?;
            let nginx = host.start_nginx(80)?;
            Some((host, nginx))
        } else {
            None
        };

        let work = tempfile::tempdir()?;
        let pki = work.path().join("pki");
        certs(&["ca", "--dir", path_str(&pki)?])?;
        certs(&["issue", "--dir", path_str(&pki)?, "--role", "director", "--name", "d1"])?;
        let socket = work.path().join("director.sock");
        let mut config = format!(
            "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:7946\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/d1.pem\"\nkey = \"{p}/d1.key\"\n\n[control]\nsocket = \"{s}\"\n\n[metrics]\nlisten = \"{DIRECTOR_IP}:9469\"\n\n[dataplane]\ninterface = \"eth0\"\nworkers = 1\nring_frames = 128\nconnection_capacity = 65536\n\n[[service]]\nvip = \"{VIP}\"\nport = 80\n{service_extra}\n",
            p = pki.display(),
            s = socket.display()
        );
        for (i, weight) in weights.iter().enumerate() {
            config.push_str(&format!(
                "\n[[service.server]]\naddress = \"10.0.0.{}\"\nweight = {weight}\nforward = \"dr\"\n",
                11 + i
            ));
        }
        let config_path = work.path().join("director.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(workspace_bin("fulcrum-director"));
        command.args(["run", "--config"]).arg(&config_path).env("RUST_LOG", "info");
        let mut process = director.spawn(command)?;
        wait_until("the director's control socket", Duration::from_secs(15), POLL, || {
            if !process.is_running()? {
                return Err(fulcrum_tests::abort_wait(anyhow::anyhow!("director exited: {}", process.output_tails())));
            }
            Ok(list(&socket).is_ok())
        })?;
        Ok(Lab { director_process: process, client, director, servers, sorry, work, socket, bed })
    }

    /// Rewrites the director's file (`from` replaced by `to`) and reloads it with SIGHUP.
    pub fn reload(&mut self, from: &str, to: &str) -> Result<()> {
        let path = self.work.path().join("director.toml");
        let text = std::fs::read_to_string(&path)?;
        if !text.contains(from) {
            bail!("{from:?} is not in the director's file");
        }
        std::fs::write(&path, text.replacen(from, to, 1))?;
        self.director_process.signal("HUP")
    }

    /// The director's log so far.
    pub fn director_log(&self) -> String {
        self.director_process.stderr()
    }

    /// `fulcrumctl list --json`: the servers of the one service, sorry server last.
    pub fn servers_view(&self) -> Result<Vec<Value>> {
        Ok(list(&self.socket)?[0]["servers"].as_array().cloned().unwrap_or_default())
    }

    /// One server's view by address.
    pub fn view(&self, address: &str) -> Result<Value> {
        self.servers_view()?.into_iter().find(|s| s["address"] == address).with_context(|| format!("{address} listed"))
    }

    pub fn fulcrumctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(&self.socket).args(args).output()?;
        if !out.status.success() {
            bail!("fulcrumctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `n` requests from the client, each on a new connection; how many each host answered.
    pub fn spread(&self, n: usize) -> Result<BTreeMap<String, usize>> {
        let script = format!("for i in $(seq {n}); do curl -s --max-time 5 http://{VIP}/; done");
        let out = self.client.run(&["bash", "-c", &script])?;
        let mut counts = BTreeMap::new();
        for line in out.lines() {
            let host = line.strip_prefix("host=").with_context(|| format!("unexpected answer {line:?}"))?;
            *counts.entry(host.to_string()).or_insert(0) += 1;
        }
        let total: usize = counts.values().sum();
        if total != n {
            bail!("{total} of {n} requests answered: {counts:?}");
        }
        Ok(counts)
    }

    /// The sum of the scraped samples of `series` ([`fulcrum_tests::metric_sum`]), 0 without one.
    pub fn metric(&self, series: &str) -> Result<f64> {
        let text = self.director.curl(&format!("http://{DIRECTOR_IP}:9469/metrics"), &[])?;
        Ok(fulcrum_tests::metric_sum(&text, series).unwrap_or(0.0))
    }

    /// Issues an agent certificate and starts `fulcrum-agent` for real server `i`, reporting every 200 ms the CPU
    /// of the v1 cgroup `cgroup` (a path under the cpu/cpuacct hierarchies).
    pub fn start_agent(&self, i: usize, cgroup: &str) -> Result<ChildGuard> {
        let pki = self.work.path().join("pki");
        let name = format!("web{}", i + 1);
        certs(&["issue", "--dir", path_str(&pki)?, "--role", "agent", "--name", &name])?;
        let host = &self.servers[i].host;
        let config = self.work.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nreal_server = \"{ip}\"\nports = [80]\ninterval_ms = 200\n\n[[director]]\nname = \"d1\"\naddress = \"{DIRECTOR_IP}:7946\"\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\n\n[cpu]\nsource = \"cgroup\"\ncgroup = \"{cgroup}\"\n\n[probe]\nkind = \"http\"\npath = \"/health\"\n",
                ip = host.ip(),
                d = pki.display(),
            ),
        )?;
        // `nsenter --net` rather than `ip netns exec`: the latter remounts /sys, hiding the cgroup hierarchies
        // the agent reads.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", host.netns()))
            .arg("--")
            .arg(workspace_bin("fulcrum-agent"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info");
        ChildGuard::spawn(&format!("fulcrum-agent@{}", host.name()), command)
    }
}

pub fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 temp path")
}

pub fn certs(args: &[&str]) -> Result<()> {
    let out = Command::new(workspace_bin("fulcrum-director")).arg("certs").args(args).output()?;
    if !out.status.success() {
        bail!("certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn list(socket: &Path) -> Result<Value> {
    let out =
        Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(socket).args(["list", "--json"]).output()?;
    if !out.status.success() {
        bail!("fulcrumctl list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
