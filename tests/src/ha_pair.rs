//! A director pair on the testbed, for the failover tests and benchmark: two directors (d1 priority 200,
//! d2 priority 100) with an `[ha]` section on the LAN, real servers in DR mode running nginx and a UDP
//! echo behind the VIP, a client, and optionally a tiebreaker host and a separate heartbeat LAN.
//!
//! ```text
//!   client 10.0.0.21   tiebreaker 10.0.0.1
//!          |                  |
//!   ------ LAN 10.0.0.0/24 ---------------------------------
//!      |              |              |             |
//!   d1 10.0.0.2    d2 10.0.0.3    rs1 10.0.0.11  rs2 10.0.0.12   (VIP 10.0.0.100 on their lo)
//!      |              |
//!   -- heartbeat LAN 10.9.0.0/24 (optional; else heartbeats cross the main LAN) --
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{abort_wait, require_root, wait_until, workspace_bin, ChildGuard, Host, Nginx, Testbed};

pub const VIP: &str = "10.0.0.100";
pub const UDP_PORT: u16 = 9000;
pub const TIEBREAKER_IP: &str = "10.0.0.1";
/// The TCP echo service behind the VIP ([`PairOptions::tcp_echo`]).
pub const TCP_ECHO_PORT: u16 = 7000;
const POLL: Duration = Duration::from_millis(20);

/// How the pair is built.
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Heartbeats on a LAN of their own (10.9.0.0/24, interface `hb0`) instead of the main LAN.
    pub heartbeat_lan: bool,
    /// A tiebreaker host at [`TIEBREAKER_IP`], pinged by both directors.
    pub tiebreaker: bool,
    /// `[ha] high_load_pps`: the forwarding rate counted as full load (the period is shortest from there).
    pub high_load_pps: u64,
    pub init_hold_ms: u32,
    /// Extra `[ha]` lines.
    pub extra_ha: String,
    /// How the directors reach the real servers: `dr` (servers on the LAN, VIP on their lo) or `nat` (servers
    /// on 10.0.1.0/24 on the same wire, their default route via the VIP, which follows the MASTER).
    pub forward: &'static str,
    /// Forwarding workers per director.
    pub workers: u32,
    /// A `[sync]` section: each director listens on its address, port 7950, and connects to the other's.
    pub sync: bool,
    /// A TCP echo service (`tcp_echo`) on each real server, balanced at [`TCP_ECHO_PORT`].
    pub tcp_echo: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            heartbeat_lan: false,
            tiebreaker: false,
            high_load_pps: 500,
            init_hold_ms: 1000,
            extra_ha: String::new(),
            forward: "dr",
            workers: 1,
            sync: false,
            tcp_echo: false,
        }
    }
}

/// One director of the pair.
pub struct PairDirector {
    pub name: String,
    pub host: Host,
    pub ip: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub process: Option<ChildGuard>,
}

impl PairDirector {
    /// Starts (or restarts) the director process; returns once its control socket answers.
    pub fn start(&mut self) -> Result<()> {
        let mut command = Command::new(workspace_bin("fulcrum-director"));
        command.args(["run", "--config"]).arg(&self.config).env("RUST_LOG", "info");
        let mut process = self.host.spawn(command)?;
        let socket = self.socket.clone();
        wait_until(&format!("{}'s control socket", self.name), Duration::from_secs(15), POLL, || {
            if !process.is_running()? {
                return Err(abort_wait(anyhow::anyhow!("director exited: {}", process.output_tails())));
            }
            Ok(fulcrumctl(&socket, &["ha", "status", "--json"]).is_ok())
        })?;
        self.process = Some(process);
        Ok(())
    }

    /// `kill -9`.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    pub fn fulcrumctl(&self, args: &[&str]) -> Result<String> {
        fulcrumctl(&self.socket, args)
    }

    /// `fulcrumctl ha status --json`.
    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.fulcrumctl(&["ha", "status", "--json"])?)?)
    }

    /// The state, upper case as the table shows it (`MASTER`, …).
    pub fn state(&self) -> Result<String> {
        let status = self.status()?;
        status["status"]["state"].as_str().map(str::to_uppercase).context("no state in the HA status")
    }

    pub fn wait_state(&self, state: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("{} to be {state}", self.name), timeout, POLL, || Ok(self.state()? == state))
    }

    /// Sum of the samples of `series` (exact name, any labels when `series` ends with `{`).
    pub fn metric(&self, series: &str) -> Result<f64> {
        let text = self.host.curl(&format!("http://{}:9469/metrics", self.ip), &["--max-time", "5"])?;
        Ok(crate::metric_sum(&text, series).unwrap_or(0.0))
    }

    /// The MAC of the director's LAN interface.
    pub fn mac(&self) -> Result<String> {
        self.host.mac_of("eth0")
    }
}

pub fn fulcrumctl(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(socket).args(args).output()?;
    if !out.status.success() {
        bail!("fulcrumctl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The lab. Fields drop in order: directors stop before the namespaces go.
pub struct Pair {
    pub directors: [PairDirector; 2],
    pub client: Host,
    pub servers: Vec<(Host, Nginx, ChildGuard)>,
    /// The TCP echo processes ([`PairOptions::tcp_echo`]).
    pub tcp_echoes: Vec<ChildGuard>,
    pub tiebreaker: Option<Host>,
    pub work: tempfile::TempDir,
    pub bed: Testbed,
}

impl Pair {
    /// Builds the lab and starts both directors (not waiting for an election).
    pub fn start(name: &str, options: &PairOptions) -> Result<Pair> {
        require_root();
        let bed = Testbed::new(name)?;
        let d1 = bed.add_host("d1", "10.0.0.2/24")?;
        let d2 = bed.add_host("d2", "10.0.0.3/24")?;
        let client = bed.add_host("client", "10.0.0.21/24")?;
        let tiebreaker =
            if options.tiebreaker { Some(bed.add_host("tb", &format!("{TIEBREAKER_IP}/24"))?) } else { None };
        if options.heartbeat_lan {
            let hb = bed.add_lan("hb")?;
            d1.attach(&hb, "hb0", "10.9.0.2/24")?;
            d2.attach(&hb, "hb0", "10.9.0.3/24")?;
        }
        let mut servers = Vec::new();
        let mut tcp_echoes = Vec::new();
        let nat = options.forward == "nat";
        let server_ip = |i: usize| if nat { format!("10.0.1.{}", 11 + i) } else { format!("10.0.0.{}", 11 + i) };
        for i in 0..2 {
            let host = bed.add_host(&format!("rs{}", i + 1), &format!("{}/24", server_ip(i)))?;
            // NAT: the servers answer through the MASTER, reached as the VIP (on-link although off-subnet).
            let echo_ip = if nat { "0.0.0.0" } else { VIP };
            if nat {
                host.ip_cmd(&["route", "replace", "default", "via", VIP, "dev", "eth0", "onlink"])?;
            } else {
                host.accept_vip_for_dr(VIP)?;
            }
            let nginx = host.start_nginx(80)?;
            let mut echo = Command::new(workspace_bin("udp_echo"));
            echo.arg(format!("{echo_ip}:{UDP_PORT}"));
            let echo = host.spawn(echo)?;
            host.wait_udp_listening(UDP_PORT, Duration::from_secs(10))?;
            if options.tcp_echo {
                let mut tcp = Command::new(workspace_bin("tcp_echo"));
                tcp.arg(format!("{echo_ip}:{TCP_ECHO_PORT}"));
                tcp_echoes.push(host.spawn(tcp)?);
                host.wait_tcp_listening(TCP_ECHO_PORT, Duration::from_secs(10))?;
            }
            servers.push((host, nginx, echo));
        }

        let work = tempfile::tempdir()?;
        let pki = work.path().join("pki");
        certs(&["ca", "--dir", path_str(&pki)?])?;
        let key = work.path().join("ha.key");
        std::fs::write(&key, "fulcrum test pair shared key 0123456789")?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let sync_key = work.path().join("sync.key");
        std::fs::write(&sync_key, "fulcrum test pair connection-sync key 0123456789")?;
        std::fs::set_permissions(&sync_key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let mut directors = Vec::new();
        for (i, host) in [d1, d2].into_iter().enumerate() {
            let name = format!("d{}", i + 1);
            certs(&["issue", "--dir", path_str(&pki)?, "--role", "director", "--name", &name])?;
            let ip = format!("10.0.0.{}", 2 + i);
            let (local, peer) = if options.heartbeat_lan {
                (format!("10.9.0.{}:7947", 2 + i), format!("10.9.0.{}:7947", 3 - i))
            } else {
                (format!("10.0.0.{}:7947", 2 + i), format!("10.0.0.{}:7947", 3 - i))
            };
            let socket = work.path().join(format!("{name}.sock"));
            let tiebreakers = if options.tiebreaker { format!("[\"{TIEBREAKER_IP}\"]") } else { "[]".to_string() };
            let mut config = format!(
                "name = \"{name}\"\n\n[agents]\nlisten = \"{ip}:7946\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\n\n[control]\nsocket = \"{s}\"\n\n[metrics]\nlisten = \"{ip}:9469\"\n\n[dataplane]\ninterface = \"eth0\"\nworkers = {workers}\nring_frames = 128\nconnection_capacity = 65536\n\n[ha]\nnode_id = {node}\npriority = {priority}\nkey_file = \"{k}\"\ninit_hold_ms = {hold}\nhigh_load_pps = {pps}\ntiebreakers = {tiebreakers}\n{extra}\n[[ha.path]]\nlocal = \"{local}\"\npeer = \"{peer}\"\n",
                p = pki.display(),
                s = socket.display(),
                k = key.display(),
                node = i + 1,
                priority = if i == 0 { 200 } else { 100 },
                hold = options.init_hold_ms,
                pps = options.high_load_pps,
                extra = options.extra_ha,
                workers = options.workers,
            );
            if options.sync {
                config.push_str(&format!(
                    "\n[sync]\nlisten = \"{ip}:7950\"\npeer = \"10.0.0.{}:7950\"\nkey_file = \"{}\"\n",
                    3 - i,
                    sync_key.display()
                ));
            }
            let tcp_echo = format!("port = {TCP_ECHO_PORT}\nprotocol = \"tcp\"");
            let echo_service = options.tcp_echo.then_some(tcp_echo.as_str());
            let udp = format!("port = {UDP_PORT}\nprotocol = \"udp\"");
            for service in ["port = 80\nprotocol = \"tcp\"", udp.as_str()].into_iter().chain(echo_service) {
                config.push_str(&format!("\n[[service]]\nvip = \"{VIP}\"\n{service}\nscheduler = \"rr\"\n"));
                for rs in 0..servers.len() {
                    config.push_str(&format!(
                        "\n[[service.server]]\naddress = \"{}\"\nforward = \"{}\"\n",
                        server_ip(rs),
                        options.forward
                    ));
                }
            }
            let config_path = work.path().join(format!("{name}.toml"));
            std::fs::write(&config_path, config)?;
            directors.push(PairDirector { name, host, ip, socket, config: config_path, process: None });
        }
        let directors: [PairDirector; 2] = directors.try_into().map_err(|_| anyhow::anyhow!("two directors"))?;
        let mut pair = Pair { directors, client, servers, tcp_echoes, tiebreaker, work, bed };
        for director in &mut pair.directors {
            director.start()?;
        }
        Ok(pair)
    }

    /// Waits until exactly one director is MASTER and the other BACKUP; returns the MASTER's index.
    pub fn wait_settled(&self, timeout: Duration) -> Result<usize> {
        wait_until("one MASTER and one BACKUP", timeout, POLL, || {
            let states = [self.directors[0].state()?, self.directors[1].state()?];
            Ok(match (states[0].as_str(), states[1].as_str()) {
                ("MASTER", "BACKUP") => Some(0),
                ("BACKUP", "MASTER") => Some(1),
                _ => None,
            })
        })
    }

    /// The UDP service behind the VIP.
    pub fn udp_target(&self) -> SocketAddr {
        SocketAddr::new(VIP.parse().expect("VIP"), UDP_PORT)
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 temp path")
}

fn certs(args: &[&str]) -> Result<()> {
    let out = Command::new(workspace_bin("fulcrum-director")).arg("certs").args(args).output()?;
    if !out.status.success() {
        bail!("certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Captures the payloads of the next `count` UDP datagrams from `source` to `destination` (address and
/// port) seen in namespace `netns` (an AF_PACKET socket, so the packets still reach their socket).
pub fn capture_udp(
    netns: &str,
    source: std::net::Ipv4Addr,
    destination: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>> {
    crate::in_netns(netns, move || {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from((libc::ETH_P_IP as u16).to_be())) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let std::net::IpAddr::V4(dst_ip) = destination.ip() else { bail!("IPv4 only") };
        let deadline = std::time::Instant::now() + timeout;
        let mut found = Vec::new();
        let mut buffer = [0u8; 2048];
        while found.len() < count {
            if std::time::Instant::now() > deadline {
                bail!("captured {} of {count} datagrams {source} -> {destination} within {timeout:?}", found.len());
            }
            // SAFETY: the buffer is valid for its length.
            let n = unsafe { libc::recv(raw, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if n <= 0 {
                continue;
            }
            let packet = &buffer[..n as usize];
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if packet.len() < ihl + 8 || packet[9] != 17 {
                continue;
            }
            let src = std::net::Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let dst = std::net::Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let dport = u16::from_be_bytes([packet[ihl + 2], packet[ihl + 3]]);
            if src == source && dst == dst_ip && dport == destination.port() {
                found.push(packet[ihl + 8..].to_vec());
            }
        }
        Ok(found)
    })
}
