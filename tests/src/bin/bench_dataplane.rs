//! The data-plane benchmark (not a test): one network-namespace testbed, one run, every forwarding mode.
//!
//! A client (10.0.0.1), a director (10.0.0.2) and three real servers (10.0.0.11-13, each a real nginx; rs1 also
//! runs an iperf3 server) share one LAN; the VIP is 10.0.0.100. For each mode in turn the topology is set up,
//! checked with a real request through the VIP, measured, and torn down:
//!
//! | mode | what forwards |
//! | --- | --- |
//! | `direct` | nothing: the client talks to rs1 itself (the ceiling) |
//! | `nft-fwd` | nftables `netdev` ingress on the director: `ether daddr set … fwd to "eth0"` (the DR ceiling) |
//! | `nft-dnat` | nftables `ip nat` DNAT + `numgen inc` with conntrack (the IPVS-NAT stand-in) |
//! | `haproxy` | HAProxy `mode tcp`, as many threads as Fulcrum workers |
//! | `fulcrum-dr` / `fulcrum-nat` | `fulcrum-director run` with a `[dataplane]` and `forward = "dr"` / `"nat"` |
//!
//! Measured per mode: iperf3 bulk throughput (1 and 4 streams), wrk requests/s on 64 keep-alive connections
//! and with `Connection: close` (= new connections/s), and p50/p99 latency at a fixed rate of new connections
//! (open loop, timed from each request's intended send time: [`fulcrum_tests::loadgen`]); plus the CPU time and
//! resident memory of the processes in the director's namespace. Medians of `--repeat` runs are printed as a
//! Markdown table, then the ratios against the targets, every run, notes and the machine.
//!
//! A mode that cannot be set up or does not answer through the VIP is reported as `failed: <reason>`; the
//! others still run. Needs root. `bench/dataplane.sh` installs the tools, builds, runs this and keeps the output.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use fulcrum_tests::loadgen::{self, ConnectionMode, LoadSpec};
use fulcrum_tests::{
    in_netns, median, metric_sum, netns_pids, require_root, try_workspace_bin, ChildGuard, Host, Nginx, Testbed,
};
use serde_json::Value;

const CLIENT_IP: &str = "10.0.0.1";
const DIRECTOR_IP: &str = "10.0.0.2";
const SERVER_IPS: [&str; 3] = ["10.0.0.11", "10.0.0.12", "10.0.0.13"];
/// The client's ephemeral ports when it goes to the servers directly, and through a balancer: disjoint, so that
/// no server sees a direct run's 4-tuple again through NAT (see `Bench::setup`).
const DIRECT_CLIENT_PORTS: &str = "1024 33279";
const BALANCED_CLIENT_PORTS: &str = "33280 65535";
const VIP: &str = "10.0.0.100";
const HTTP_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;
const AGENT_PORT: u16 = 7946;
/// The director's Prometheus endpoint: after each Fulcrum run its loss counters go into the notes.
const METRICS_PORT: u16 = 9100;
/// How long a mode has to answer a request through the VIP once set up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Each request of the latency test is abandoned this long after its intended send time.
const LATENCY_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between measurements: lets queues drain and sockets close.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(about = "Fulcrum data-plane benchmark: every forwarding mode on one namespace testbed (needs root)")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Modes to run, comma-separated, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,direct-spread,nft-fwd,nft-dnat,haproxy,fulcrum-dr,fulcrum-nat"
    )]
    modes: Vec<Mode>,
    /// Runs of every mode; the table shows the median of each measurement.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=21))]
    repeat: u32,
    /// Requests per second of the fixed-rate latency test (a new connection per request).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// wrk threads; the default is one per CPU, so that the client is not what limits the fast modes (with
    /// one thread, nftables forwarding measured 32 000 new connections/s, with two 44 000, HAProxy the same
    /// with either). The spread mode takes at least one per real server.
    #[arg(long, default_value_t = default_wrk_threads(), value_parser = clap::value_parser!(u32).range(1..=64))]
    wrk_threads: u32,
    /// Fulcrum forwarding workers; HAProxy gets as many threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Measurements to take, comma-separated: a short A/B comparison of one figure need not pay for all five.
    /// Those left out show as `–`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "bulk,keepalive,conn,latency")]
    measure: Vec<Measure>,
    /// Sets the director's `busy_poll_us` (its own default when absent).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: Option<u32>,
}

/// wrk threads in `direct-spread`: `--wrk-threads`, but at least one per real server (each aims at its own).
fn spread_threads(wrk_threads: u32) -> u32 {
    wrk_threads.max(SERVER_IPS.len() as u32)
}

fn default_wrk_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1).min(64))
}

/// What `measure` runs: `bulk` is iperf3 with 1 and 4 streams, `conn` is wrk with `Connection: close`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Measure {
    Bulk,
    Keepalive,
    Conn,
    Latency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
enum Mode {
    Direct,
    /// No balancer at all: the client itself spreads its connections over the three servers (wrk with one
    /// thread per server). What any balancer's requests per second are bounded by on this testbed; requests
    /// only (iperf3 and the latency test run against one address).
    DirectSpread,
    NftFwd,
    NftDnat,
    Haproxy,
    FulcrumDr,
    FulcrumNat,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::DirectSpread => "direct-spread",
            Mode::NftFwd => "nft-fwd",
            Mode::NftDnat => "nft-dnat",
            Mode::Haproxy => "haproxy",
            Mode::FulcrumDr => "fulcrum-dr",
            Mode::FulcrumNat => "fulcrum-nat",
        }
    }

    /// Where the client sends its traffic.
    fn target(self) -> &'static str {
        match self {
            Mode::Direct | Mode::DirectSpread => SERVER_IPS[0],
            _ => VIP,
        }
    }

    fn is_kernel(self) -> bool {
        matches!(self, Mode::NftFwd | Mode::NftDnat)
    }

    /// No balancer on the path.
    fn is_direct(self) -> bool {
        matches!(self, Mode::Direct | Mode::DirectSpread)
    }
}

/// One run of one mode. `None`: that measurement failed (the reason is in the notes).
#[derive(Clone, Debug, Default)]
struct Sample {
    gbps1: Option<f64>,
    gbps4: Option<f64>,
    keepalive_rps: Option<f64>,
    conn_rps: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// Requests of the latency test without a good response, as a fraction of those scheduled.
    lat_error_ratio: Option<f64>,
    /// CPU of the director namespace's processes during iperf3 -P4 and during wrk `Connection: close`, in %
    /// of one core; `None` when no process runs there.
    cpu_bulk: Option<f64>,
    cpu_conn: Option<f64>,
    rss_mib: Option<f64>,
    /// HTTP requests each real server logged during the run (all measurements): proof of where traffic went.
    spread: Option<[u64; 3]>,
}

impl Sample {
    /// Director CPU time per new connection (during wrk `Connection: close`), in µs: the forwarder's cost,
    /// which stays steady on a busy machine where the rates themselves swing with the other load.
    fn cpu_us_per_conn(&self) -> Option<f64> {
        match (self.cpu_conn, self.conn_rps) {
            (Some(cpu), Some(rps)) if rps > 0.0 => Some(cpu / 100.0 * 1e6 / rps),
            _ => None,
        }
    }
}

type Outcome = std::result::Result<Sample, String>;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("bench_dataplane: {e:#}");
        std::process::exit(1);
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn run(args: &Args) -> Result<()> {
    require_root();
    for tool in ["iperf3", "wrk", "nft", "curl", "timeout"] {
        which(tool).with_context(|| format!("{tool} is not installed (bench/dataplane.sh installs what is needed)"))?;
    }
    if args.modes.contains(&Mode::Haproxy) {
        which("haproxy").context("haproxy is not installed (bench/dataplane.sh installs it)")?;
    }
    raise_nofile_limit();
    let mut modes: Vec<Mode> = Vec::new();
    for &mode in &args.modes {
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    let started = Instant::now();
    let mut bed = Bed::new(args)?;
    let mut outcomes: HashMap<Mode, Vec<Outcome>> = HashMap::new();
    let mut notes: Vec<String> = Vec::new();
    for run in 1..=args.repeat {
        for &mode in &modes {
            log(format!("run {run}/{} · {}", args.repeat, mode.name()));
            let outcome = bed.run_mode(mode, run, &mut notes);
            if let Err(reason) = &outcome {
                log(format!("{} failed: {reason}", mode.name()));
            }
            outcomes.entry(mode).or_default().push(outcome);
        }
    }
    bed.reset();
    let report = render(args, &modes, &outcomes, &notes, started.elapsed());
    print!("{report}");
    Ok(())
}

/// The testbed and its long-running servers. Field order: processes stop before the namespaces go.
struct Bed {
    nginx: Vec<Nginx>,
    iperf: Option<ChildGuard>,
    client: Host,
    director: Host,
    servers: Vec<Host>,
    director_mac: String,
    server_macs: Vec<String>,
    work: tempfile::TempDir,
    pki: Option<PathBuf>,
    seconds: u64,
    rate: u32,
    connections: u32,
    wrk_threads: u32,
    workers: u32,
    measure: Vec<Measure>,
    busy_poll_us: Option<u32>,
    tb: Testbed,
}

impl Bed {
    fn new(args: &Args) -> Result<Bed> {
        log("building the testbed: client, director, 3 real servers with nginx, iperf3 on rs1");
        let tb = Testbed::new("bench")?;
        let client = tb.add_host("client", &format!("{CLIENT_IP}/24"))?;
        let director = tb.add_host("director", &format!("{DIRECTOR_IP}/24"))?;
        let mut servers = Vec::new();
        for (i, ip) in SERVER_IPS.iter().enumerate() {
            servers.push(tb.add_host(&format!("rs{}", i + 1), &format!("{ip}/24"))?);
        }
        // Many short connections: a wide port range (the client's is set per mode, see `setup`), and TIME-WAIT
        // ports reused by new connections.
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        director.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        director.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        // The director forwards NAT traffic out of the interface it came in on: no ICMP redirects, which would
        // teach the real servers to bypass it.
        director.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        director.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;
        for rs in &servers {
            rs.sysctl("net.ipv4.conf.all.accept_redirects", "0")?;
            rs.sysctl("net.ipv4.conf.eth0.accept_redirects", "0")?;
        }
        let mut nginx = Vec::new();
        for rs in &servers {
            nginx.push(rs.start_nginx(HTTP_PORT)?);
        }
        let director_mac = director.mac()?;
        let server_macs = servers.iter().map(Host::mac).collect::<Result<Vec<_>>>()?;
        for rs in &servers {
            client.wait_ping(rs.ip(), Duration::from_secs(10))?;
        }
        client.wait_ping(director.ip(), Duration::from_secs(10))?;
        let work = tempfile::Builder::new().prefix("fulcrum-bench-").tempdir()?;
        let mut bed = Bed {
            nginx,
            iperf: None,
            client,
            director,
            servers,
            director_mac,
            server_macs,
            work,
            pki: None,
            seconds: args.seconds,
            rate: args.rate,
            connections: args.connections,
            wrk_threads: args.wrk_threads,
            workers: args.workers,
            measure: args.measure.clone(),
            busy_poll_us: args.busy_poll_us,
            tb,
        };
        bed.restart_iperf()?;
        log(format!("testbed {} ready", bed.tb.prefix()));
        Ok(bed)
    }

    /// (Re)starts the iperf3 server on rs1 (a failed test can leave it busy).
    fn restart_iperf(&mut self) -> Result<()> {
        if let Some(mut old) = self.iperf.take() {
            let _ = old.terminate(Duration::from_secs(3));
        }
        let rs1 = &self.servers[0];
        let mut cmd = rs1.command("iperf3");
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()]);
        let guard = rs1.spawn(cmd)?;
        rs1.wait_tcp_listening(IPERF_PORT, Duration::from_secs(10))?;
        self.iperf = Some(guard);
        Ok(())
    }

    /// Back to the neutral topology: no VIP anywhere, no rules, no forwarding, no static entries. Idempotent;
    /// errors (removing what is not there) are ignored.
    fn reset(&self) {
        let d = &self.director;
        let _ = d.run_unchecked(&["nft", "flush", "ruleset"]);
        let _ = d.run_unchecked(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "eth0"]);
        let _ = d.sysctl("net.ipv4.ip_forward", "0");
        for rs in &self.servers {
            let _ = rs.run_unchecked(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
            let _ = rs.run_unchecked(&["ip", "route", "del", &format!("{CLIENT_IP}/32")]);
            let _ = rs.run_unchecked(&["ip", "route", "del", "default"]);
            for key in ["arp_ignore", "arp_announce"] {
                for dev in ["all", "eth0"] {
                    let _ = rs.sysctl(&format!("net.ipv4.conf.{dev}.{key}"), "0");
                }
            }
        }
        let _ = self.client.run_unchecked(&["ip", "neigh", "del", VIP, "dev", "eth0"]);
        // nginx logs every request; keep the temp dirs small over long runs.
        for n in &self.nginx {
            let _ = std::fs::OpenOptions::new().write(true).open(n.dir().join("access.log")).and_then(|f| f.set_len(0));
        }
    }

    /// Sets up, checks, measures and tears down one mode.
    fn run_mode(&mut self, mode: Mode, run: u32, notes: &mut Vec<String>) -> Outcome {
        self.reset();
        let result = self.setup(mode).and_then(|mut setup| {
            self.wait_ready(mode, &mut setup, notes)?;
            Ok(self.measure(mode, run, &mut setup, notes))
        });
        // Processes (haproxy, the director) stop when `setup` is dropped above; then the topology goes.
        self.reset();
        result.map_err(|e| short_reason(&e))
    }

    fn setup(&mut self, mode: Mode) -> Result<Setup> {
        let mut setup = Setup { processes: Vec::new() };
        // The servers keep a closed connection's 4-tuple in TIME_WAIT for 60 s. A NAT mode presents the client's
        // address and port to the server unchanged, but with TCP timestamps offset for the VIP rather than the
        // server's address, so a SYN reusing a tuple a direct run left there fails PAWS and stalls for the
        // retransmission: after direct-spread, Fulcrum NAT and nftables DNAT alike fell from ~30 000 to ~350
        // new connections/s. Disjoint client port ranges keep the two apart.
        let ports = if mode.is_direct() { DIRECT_CLIENT_PORTS } else { BALANCED_CLIENT_PORTS };
        self.client.sysctl("net.ipv4.ip_local_port_range", ports)?;
        match mode {
            Mode::Direct | Mode::DirectSpread => {}
            Mode::NftFwd => {
                self.dr_real_servers()?;
                self.static_vip_neighbour()?;
                let macs = &self.server_macs;
                let rules = format!(
                    "table netdev fulcrum_bench {{\n  chain ingress {{\n    type filter hook ingress device \"eth0\" priority 0; policy accept;\n    ip daddr {VIP} tcp dport {IPERF_PORT} ether saddr set {dir} ether daddr set {m0} fwd to \"eth0\"\n    ip daddr {VIP} tcp dport {HTTP_PORT} ether saddr set {dir} ether daddr set jhash ip saddr . tcp sport mod 3 seed 0x5eed map {{ 0 : {m0}, 1 : {m1}, 2 : {m2} }} fwd to \"eth0\"\n  }}\n}}\n",
                    dir = self.director_mac,
                    m0 = macs[0],
                    m1 = macs[1],
                    m2 = macs[2],
                );
                self.load_nft("nft-fwd.nft", &rules)?;
            }
            Mode::NftDnat => {
                self.nat_real_servers()?;
                self.static_vip_neighbour()?;
                self.director.sysctl("net.ipv4.ip_forward", "1")?;
                let rules = format!(
                    "table ip fulcrum_bench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen inc mod 3 map {{ 0 : {s0}, 1 : {s1}, 2 : {s2} }}\n    ip daddr {VIP} tcp dport {IPERF_PORT} dnat to {s0}\n  }}\n}}\n",
                    s0 = SERVER_IPS[0],
                    s1 = SERVER_IPS[1],
                    s2 = SERVER_IPS[2],
                );
                self.load_nft("nft-dnat.nft", &rules)?;
            }
            Mode::Haproxy => {
                // A proxy terminates the client's connection: it must own the VIP.
                self.director.add_address(&format!("{VIP}/32"), "eth0")?;
                let config = self.work.path().join("haproxy.cfg");
                std::fs::write(&config, haproxy_config(self.workers))
                    .with_context(|| format!("writing {}", config.display()))?;
                let mut cmd = self.director.command("haproxy");
                cmd.arg("-f").arg(&config).arg("-db");
                let mut process = self.director.spawn(cmd)?;
                let ready = started(&mut process, "listening on ports 80 and 5201", || {
                    Ok(self.director.tcp_listening(HTTP_PORT)? && self.director.tcp_listening(IPERF_PORT)?)
                });
                setup.processes.push(process);
                ready?;
            }
            Mode::FulcrumDr | Mode::FulcrumNat => {
                let forward = if mode == Mode::FulcrumDr {
                    self.dr_real_servers()?;
                    "dr"
                } else {
                    self.nat_real_servers()?;
                    "nat"
                };
                let director_bin = try_workspace_bin("fulcrum-director")?;
                let pki = self.pki(&director_bin)?;
                let socket = self.work.path().join(format!("director-{forward}.sock"));
                let _ = std::fs::remove_file(&socket);
                let config = self.work.path().join(format!("director-{forward}.toml"));
                std::fs::write(&config, director_config(&pki, &socket, self.workers, self.busy_poll_us, forward))
                    .with_context(|| format!("writing {}", config.display()))?;
                let check =
                    run_unchecked(Command::new(&director_bin).arg("check-config").arg("--config").arg(&config))?;
                if !check.status.success() {
                    bail!("config refused: {}", last_line(&String::from_utf8_lossy(&check.stderr)));
                }
                let mut cmd = Command::new(&director_bin);
                cmd.arg("run").arg("--config").arg(&config).env("RUST_LOG", "warn");
                let mut process = self.director.spawn(cmd)?;
                let ready = started(&mut process, "its control socket", || Ok(socket.exists()));
                setup.processes.push(process);
                ready?;
                // Fulcrum answers ARP for its VIPs: no static neighbour entry (see wait_ready for the fallback).
            }
        }
        Ok(setup)
    }

    /// Direct routing: every real server has the VIP on `lo` and neither answers nor announces it by ARP.
    fn dr_real_servers(&self) -> Result<()> {
        for rs in &self.servers {
            rs.accept_vip_for_dr(VIP)?;
        }
        Ok(())
    }

    /// NAT: replies must go back through the director to be rewritten. The client is on the same LAN, so a
    /// default route is not enough: a host route to the client via the director overrides the connected one.
    fn nat_real_servers(&self) -> Result<()> {
        for rs in &self.servers {
            rs.ip_cmd(&["route", "replace", "default", "via", DIRECTOR_IP])?;
            rs.ip_cmd(&["route", "replace", &format!("{CLIENT_IP}/32"), "via", DIRECTOR_IP])?;
        }
        Ok(())
    }

    /// The client sends VIP traffic to the director's MAC without ARP: the kernel baselines own no VIP.
    fn static_vip_neighbour(&self) -> Result<()> {
        self.client.ip_cmd(&[
            "neigh",
            "replace",
            VIP,
            "lladdr",
            &self.director_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    fn load_nft(&self, file: &str, rules: &str) -> Result<()> {
        let path = self.work.path().join(file);
        std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        let out = self.director.run_unchecked(&["nft", "-f", path.to_str().context("temp path")?])?;
        if !out.status.success() {
            bail!("nft -f {file}: {}", last_line(&String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    fn pki(&mut self, director_bin: &Path) -> Result<PathBuf> {
        if let Some(pki) = &self.pki {
            return Ok(pki.clone());
        }
        let dir = self.work.path().join("pki");
        let dir_s = dir.to_str().context("temp path")?;
        for args in [
            vec!["certs", "ca", "--dir", dir_s],
            vec!["certs", "issue", "--dir", dir_s, "--role", "director", "--name", "d1", "--ip", DIRECTOR_IP],
        ] {
            let out = run_unchecked(Command::new(director_bin).args(&args))?;
            if !out.status.success() {
                bail!("fulcrum-director {}: {}", args.join(" "), last_line(&String::from_utf8_lossy(&out.stderr)));
            }
        }
        self.pki = Some(dir.clone());
        Ok(dir)
    }

    /// Waits until a real request through the target answers with one of the real servers' pages.
    fn wait_ready(&self, mode: Mode, setup: &mut Setup, notes: &mut Vec<String>) -> Result<()> {
        let url = format!("http://{}/", mode.target());
        let secs = READY_TIMEOUT.as_secs();
        let Err(why) = self.probe(&url, READY_TIMEOUT, setup)? else { return Ok(()) };
        if !matches!(mode, Mode::FulcrumDr | Mode::FulcrumNat) {
            bail!("no answer from {url} in {secs} s: {why}");
        }
        let log = setup.processes.first().map(|p| last_line(&p.stderr())).unwrap_or_default();
        let log = if log.is_empty() { String::new() } else { format!("; director log: {log}") };
        // Fulcrum should answer ARP for the VIP. If the client could not resolve it, try once more with a static
        // entry, so that a missing ARP responder and a missing forwarder are told apart.
        let neigh = self.client.ip_cmd(&["neigh", "show", VIP, "dev", "eth0"]).unwrap_or_default();
        let neigh = neigh.trim().to_string();
        let resolved = neigh.contains(&self.director_mac) && !neigh.contains("FAILED") && !neigh.contains("INCOMPLETE");
        if resolved {
            bail!("the VIP resolves to the director by ARP, but {url} gave no answer in {secs} s: {why}{log}");
        }
        self.static_vip_neighbour()?;
        match self.probe(&url, Duration::from_secs(5), setup)? {
            Ok(()) => {
                let entry = if neigh.is_empty() { "no entry".to_string() } else { neigh };
                notes.push(format!(
                    "{}: the director did not answer ARP for the VIP ({entry}); measured with a static neighbour entry",
                    mode.name()
                ));
                Ok(())
            }
            Err(why) => bail!(
                "no ARP answer for the VIP, and no answer from {url} with a static neighbour entry either: {why}{log}"
            ),
        }
    }

    /// Polls `url` with curl from the client until it returns a real server's page (`Ok(Ok(()))`), a process of
    /// the mode exits (`Err`), or `timeout` passes (`Ok(Err(curl's last complaint))`).
    fn probe(&self, url: &str, timeout: Duration, setup: &mut Setup) -> Result<std::result::Result<(), String>> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        for _ in 0..1000 {
            for p in &mut setup.processes {
                if let Some(status) = p.try_wait()? {
                    bail!("{} exited with {status}: {}", p.name(), last_line(&p.stderr()));
                }
            }
            let out = self.client.run_unchecked(&["curl", "-sS", "--max-time", "2", url])?;
            let body = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && body.starts_with("host=rs") {
                return Ok(Ok(()));
            }
            last = if out.status.success() {
                format!("unexpected answer {:?}", body.chars().take(60).collect::<String>())
            } else {
                last_line(&String::from_utf8_lossy(&out.stderr))
            };
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Err(last))
    }

    fn measure(&mut self, mode: Mode, run: u32, setup: &mut Setup, notes: &mut Vec<String>) -> Sample {
        let target = mode.target();
        let tag = format!("{} run {run}", mode.name());
        let mut sample = Sample::default();
        let note = |notes: &mut Vec<String>, what: &str, e: &anyhow::Error| {
            let msg = format!("{tag}: {what}: {}", short_reason(e));
            log(&msg);
            notes.push(msg);
        };

        // iperf3 serves on rs1 only, and the latency test sends to one address: no spread to measure.
        let spread = mode == Mode::DirectSpread;
        if self.measure.contains(&Measure::Bulk) && !spread {
            match self.iperf(target, 1) {
                Ok(g) => sample.gbps1 = Some(g),
                Err(e) => {
                    note(notes, "iperf3 -P1", &e);
                    let _ = self.restart_iperf();
                }
            }
            log(format!("  iperf3 1 stream: {}", fmt_opt(sample.gbps1, 2)));
            std::thread::sleep(SETTLE);

            let cpu = CpuWindow::start(&self.director);
            match self.iperf(target, 4) {
                Ok(g) => sample.gbps4 = Some(g),
                Err(e) => {
                    note(notes, "iperf3 -P4", &e);
                    let _ = self.restart_iperf();
                }
            }
            sample.cpu_bulk = cpu.percent();
            sample.rss_mib = max_opt(sample.rss_mib, director_rss_mib(&self.director));
            log(format!("  iperf3 4 streams: {}", fmt_opt(sample.gbps4, 2)));
            std::thread::sleep(SETTLE);
        }
        if self.measure.contains(&Measure::Keepalive) {
            match self.wrk(target, false, spread) {
                Ok((rps, errors)) => {
                    sample.keepalive_rps = Some(rps);
                    if let Some(errors) = errors {
                        notes.push(format!("{tag}: wrk keep-alive: {errors}"));
                    }
                }
                Err(e) => note(notes, "wrk keep-alive", &e),
            }
            sample.rss_mib = max_opt(sample.rss_mib, director_rss_mib(&self.director));
            log(format!("  keep-alive req/s: {}", fmt_opt(sample.keepalive_rps, 0)));
            std::thread::sleep(SETTLE);
        }
        if self.measure.contains(&Measure::Conn) {
            let cpu = CpuWindow::start(&self.director);
            match self.wrk(target, true, spread) {
                Ok((rps, errors)) => {
                    sample.conn_rps = Some(rps);
                    if let Some(errors) = errors {
                        notes.push(format!("{tag}: wrk Connection: close: {errors}"));
                    }
                }
                Err(e) => note(notes, "wrk Connection: close", &e),
            }
            sample.cpu_conn = cpu.percent();
            sample.rss_mib = max_opt(sample.rss_mib, director_rss_mib(&self.director));
            log(format!("  new conn/s: {}", fmt_opt(sample.conn_rps, 0)));
            std::thread::sleep(SETTLE);
        }
        if self.measure.contains(&Measure::Latency) && !spread {
            match self.latency(target) {
                Ok(report) => {
                    sample.p50_ms = Some(report.latency.p50.as_secs_f64() * 1e3);
                    sample.p99_ms = Some(report.latency.p99.as_secs_f64() * 1e3);
                    sample.lat_error_ratio = Some(report.errors() as f64 / report.scheduled.max(1) as f64);
                    let e = report.error_counts;
                    if e.total() > 0 {
                        notes.push(format!(
                            "{tag}: latency @ {} req/s: {} of {} requests failed (connect {}, io {}, status {}, timeout {})",
                            self.rate,
                            e.total(),
                            report.scheduled,
                            e.connect,
                            e.io,
                            e.status,
                            e.timeout
                        ));
                    }
                    if report.latency.count == 0 {
                        sample.p50_ms = None;
                        sample.p99_ms = None;
                    }
                }
                Err(e) => note(notes, "latency", &e),
            }
            sample.rss_mib = max_opt(sample.rss_mib, director_rss_mib(&self.director));
            log(format!("  p50 / p99 ms: {} / {}", fmt_opt(sample.p50_ms, 2), fmt_opt(sample.p99_ms, 2)));
        }

        sample.spread = self.requests_per_server();
        if matches!(mode, Mode::FulcrumDr | Mode::FulcrumNat) {
            if let Some(losses) = self.director_losses() {
                notes.push(format!("{tag}: director counters: {losses}"));
            }
        }

        // A director that died mid-run invalidates what came after: say so.
        for p in &mut setup.processes {
            if let Ok(Some(status)) = p.try_wait() {
                notes.push(format!("{tag}: {} exited with {status} during the measurements", p.name()));
            }
        }
        sample
    }

    /// Frames the director lost (ring drops, transmit errors, refused packets) out of those it received, from
    /// its metrics endpoint: a low figure with an idle director is explained by these.
    fn director_losses(&self) -> Option<String> {
        let url = format!("http://{DIRECTOR_IP}:{METRICS_PORT}/metrics");
        let out = match self.director.run_unchecked(&["curl", "-sS", "--max-time", "2", &url]) {
            Ok(out) => out,
            Err(e) => return Some(format!("not read ({url}: {})", short_reason(&e))),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // An unanswered scrape must not read as a run without losses.
        if !out.status.success() || !text.contains("fulcrum_received_packets_total") {
            let why = last_line(&String::from_utf8_lossy(&out.stderr));
            let why = if why.is_empty() { "no data-plane counters in the answer".to_string() } else { why };
            return Some(format!("not read ({url}: {why})"));
        }
        // A counter with labels is the sum of its series.
        let total = |name: &str| -> u64 {
            metric_sum(&text, name).or_else(|| metric_sum(&text, &format!("{name}{{"))).unwrap_or(0.0) as u64
        };
        Some(format!(
            "received {}, transmitted {}, ring drops {}, transmit errors {}, dropped {}",
            total("fulcrum_received_packets_total"),
            total("fulcrum_transmitted_packets_total"),
            total("fulcrum_ring_drops_total"),
            total("fulcrum_transmit_errors_total"),
            total("fulcrum_dropped_packets_total"),
        ))
    }

    /// Requests in each nginx's access log (emptied by `reset` before every mode).
    fn requests_per_server(&self) -> Option<[u64; 3]> {
        let mut counts = [0u64; 3];
        for (count, nginx) in counts.iter_mut().zip(&self.nginx) {
            let log = std::fs::read(nginx.dir().join("access.log")).ok()?;
            *count = log.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        Some(counts)
    }

    /// iperf3 from the client to `target`:5201 with `streams` parallel streams; received Gbit/s.
    fn iperf(&self, target: &str, streams: u32) -> Result<f64> {
        let limit = (self.seconds + 20).to_string();
        let out = self.client.run_unchecked(&[
            "timeout",
            "-k",
            "5",
            &limit,
            "iperf3",
            "-c",
            target,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &self.seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ])?;
        parse_iperf(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.trim().is_empty() {
                e
            } else {
                e.context(last_line(&stderr))
            }
        })
    }

    /// wrk with `--wrk-threads` threads and `--connections` connections: requests/s and a description of any errors. With
    /// `spread`, one thread per real server, each aimed at its own server (the connections split among them).
    fn wrk(&self, target: &str, close: bool, spread: bool) -> Result<(f64, Option<String>)> {
        let limit = (self.seconds + 20).to_string();
        let url = format!("http://{target}/");
        let conns = self.connections.to_string();
        let secs = format!("{}s", self.seconds);
        let threads = format!("-t{}", if spread { spread_threads(self.wrk_threads) } else { self.wrk_threads });
        let script =
            spread.then(|| std::env::temp_dir().join(format!("fulcrum-bench-spread-{}.lua", std::process::id())));
        if let Some(script) = &script {
            let hosts = SERVER_IPS.map(|ip| format!("\"{ip}\"")).join(", ");
            let lua = format!(
                "-- One wrk thread per real server: the client spreads its own connections.\n\
                 local hosts, next = {{{hosts}}}, 0\n\
                 function setup(thread)\n  next = next + 1\n  \
                 thread.addr = wrk.lookup(hosts[(next - 1) % #hosts + 1], \"{HTTP_PORT}\")[1]\nend\n"
            );
            std::fs::write(script, lua).with_context(|| format!("writing {}", script.display()))?;
        }
        let script_arg = script.as_ref().map(|p| p.display().to_string());
        let mut args =
            vec!["timeout", "-k", "5", &limit, "wrk", &threads, "-c", &conns, "-d", &secs, "--timeout", "2s"];
        if let Some(script) = &script_arg {
            args.extend(["-s", script.as_str()]);
        }
        if close {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let out = self.client.run_unchecked(&args);
        if let Some(script) = &script {
            let _ = std::fs::remove_file(script);
        }
        let out = out?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("wrk exited with {}: {}", out.status, last_line(&String::from_utf8_lossy(&out.stderr)));
        }
        parse_wrk(&stdout)
    }

    /// The fixed-rate latency test: new connection per request, open loop, from the client's namespace.
    fn latency(&self, target: &str) -> Result<loadgen::LoadReport> {
        let addr: SocketAddr = format!("{target}:{HTTP_PORT}").parse()?;
        let mut spec =
            LoadSpec::new(addr, f64::from(self.rate), Duration::from_secs(self.seconds), ConnectionMode::NewConnection);
        spec.timeout = LATENCY_TIMEOUT;
        in_netns(self.client.netns(), move || loadgen::run(&spec))
    }
}

/// Waits up to 10 s for a process just started to be `ready`; fails with its last words if it exits first.
fn started(process: &mut ChildGuard, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..1000 {
        if let Some(status) = process.try_wait()? {
            bail!("{} exited with {status}: {}", process.name(), last_line(&process.stderr()));
        }
        if ready().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} runs but is not {what} after 10 s: {}", process.name(), last_line(&process.stderr()))
}

/// What a mode started; dropping it stops the processes.
struct Setup {
    processes: Vec<ChildGuard>,
}

fn haproxy_config(threads: u32) -> String {
    let servers: String =
        SERVER_IPS.iter().enumerate().map(|(i, ip)| format!("    server rs{} {ip}:{HTTP_PORT}\n", i + 1)).collect();
    format!(
        "global\n    nbthread {threads}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\nfrontend http\n    bind {VIP}:{HTTP_PORT}\n    default_backend web\n\nbackend web\n    balance roundrobin\n{servers}\nfrontend iperf\n    bind {VIP}:{IPERF_PORT}\n    default_backend iperf\n\nbackend iperf\n    server rs1 {rs1}:{IPERF_PORT}\n",
        rs1 = SERVER_IPS[0]
    )
}

fn director_config(pki: &Path, socket: &Path, workers: u32, busy_poll_us: Option<u32>, forward: &str) -> String {
    let mut text = format!(
        "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:{AGENT_PORT}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[control]\nsocket = \"{socket}\"\n\n[metrics]\nlisten = \"{DIRECTOR_IP}:{METRICS_PORT}\"\n\n[dataplane]\ninterface = \"eth0\"\nworkers = {workers}\n",
        ca = pki.join("ca.pem").display(),
        cert = pki.join("d1.pem").display(),
        key = pki.join("d1.key").display(),
        socket = socket.display(),
    );
    if let Some(us) = busy_poll_us {
        text.push_str(&format!("busy_poll_us = {us}\n"));
    }
    text.push_str(&format!("\n[[service]]\nvip = \"{VIP}\"\nport = {HTTP_PORT}\nscheduler = \"rr\"\n"));
    for ip in SERVER_IPS {
        text.push_str(&format!("\n[[service.server]]\naddress = \"{ip}\"\nforward = \"{forward}\"\n"));
    }
    // An iperf3 test's control and data connections must all reach the same server: one server.
    text.push_str(&format!(
        "\n[[service]]\nvip = \"{VIP}\"\nport = {IPERF_PORT}\nscheduler = \"rr\"\n\n[[service.server]]\naddress = \"{}\"\nforward = \"{forward}\"\n",
        SERVER_IPS[0]
    ));
    text
}

/// `end.sum_received.bits_per_second` of `iperf3 -J`, in Gbit/s.
fn parse_iperf(json: &str) -> Result<f64> {
    let v: Value = serde_json::from_str(json.trim()).context("iperf3 printed no JSON")?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    if bps <= 0.0 {
        bail!("iperf3 received nothing");
    }
    Ok(bps / 1e9)
}

/// `Requests/sec:` of wrk's report, and its error lines if any.
fn parse_wrk(out: &str) -> Result<(f64, Option<String>)> {
    let field = |prefix: &str| out.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix).map(str::trim));
    let rps: f64 = field("Requests/sec:")
        .with_context(|| format!("no Requests/sec in wrk's output: {}", last_line(out)))?
        .parse()
        .context("bad Requests/sec")?;
    let requests: u64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.trim().to_string()))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if requests == 0 || rps <= 0.0 {
        bail!("wrk completed no request");
    }
    let mut errors = Vec::new();
    if let Some(socket) = field("Socket errors:") {
        errors.push(format!("socket errors: {socket}"));
    }
    if let Some(non2xx) = field("Non-2xx or 3xx responses:") {
        errors.push(format!("non-2xx/3xx responses: {non2xx}"));
    }
    let errors = (!errors.is_empty()).then(|| format!("{} of {requests} requests; {}", errors.join(", "), "see wrk"));
    Ok((rps, errors))
}

/// CPU time of the processes in a namespace over a window.
struct CpuWindow {
    ns: String,
    start: Instant,
    ticks: HashMap<u32, u64>,
}

impl CpuWindow {
    fn start(host: &Host) -> CpuWindow {
        let ns = host.netns().to_string();
        let ticks = ns_ticks(&ns);
        CpuWindow { ns, start: Instant::now(), ticks }
    }

    /// Percent of one core used by the namespace's processes since `start`; `None` when none ran there.
    fn percent(&self) -> Option<f64> {
        let end = ns_ticks(&self.ns);
        let wall = self.start.elapsed().as_secs_f64();
        if (end.is_empty() && self.ticks.is_empty()) || wall <= 0.0 {
            return None;
        }
        let used: u64 = end.iter().map(|(pid, t)| t.saturating_sub(self.ticks.get(pid).copied().unwrap_or(0))).sum();
        Some(100.0 * used as f64 / clock_ticks() / wall)
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime (all threads) of every process in `ns`, by pid.
fn ns_ticks(ns: &str) -> HashMap<u32, u64> {
    let mut ticks = HashMap::new();
    for pid in netns_pids(ns).unwrap_or_default() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name may hold spaces and parentheses: fields are counted after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime and stime are fields 14 and 15.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        ticks.insert(pid, field(14) + field(15));
    }
    ticks
}

/// Resident memory of the processes in the director's namespace, MiB; `None` when none runs there.
fn director_rss_mib(host: &Host) -> Option<f64> {
    let pids = netns_pids(host.netns()).ok()?;
    let mut kib = 0u64;
    let mut any = false;
    for pid in pids {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        if let Some(v) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
            kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            any = true;
        }
    }
    any.then_some(kib as f64 / 1024.0)
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `num / den` of one measurement, run by run, over the runs where both succeeded. The host's speed swings
/// by 1.5–2× within minutes here; a run measures every mode within a minute or so, so the ratio inside one
/// run is far steadier than the ratio of two medians taken from different runs.
fn paired_ratios(
    num: Option<&Vec<Outcome>>,
    den: Option<&Vec<Outcome>>,
    field: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    let (Some(num), Some(den)) = (num, den) else { return Vec::new() };
    num.iter()
        .zip(den)
        .filter_map(|pair| match pair {
            (Ok(a), Ok(b)) => field(a).zip(field(b)).filter(|&(_, b)| b > 0.0).map(|(a, b)| a / b),
            _ => None,
        })
        .collect()
}

/// The median of one measurement over a mode's successful runs.
fn med(outcomes: Option<&Vec<Outcome>>, field: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    median(outcomes.into_iter().flatten().filter_map(|o| o.as_ref().ok()).filter_map(&field).collect())
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.decimals$}"))
}

fn last_line(s: &str) -> String {
    s.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("").chars().take(200).collect()
}

/// The first line of an error chain, shortened for a table cell.
fn short_reason(e: &anyhow::Error) -> String {
    let full = format!("{e:#}");
    let line = full.lines().next().unwrap_or("").trim();
    let mut short: String = line.chars().take(160).collect();
    if line.chars().count() > 160 {
        short.push('…');
    }
    short.replace('|', "/")
}

fn which(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{tool} not found in PATH"))
}

fn run_unchecked(cmd: &mut Command) -> Result<Output> {
    fulcrum_tests::run_unchecked(cmd)
}

/// Every request of the latency test holds a socket: lift the soft open-files limit to the hard one.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn command_stdout(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let line = String::from_utf8_lossy(&text).lines().next()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}

fn render(
    args: &Args,
    modes: &[Mode],
    outcomes: &HashMap<Mode, Vec<Outcome>>,
    notes: &[String],
    elapsed: Duration,
) -> String {
    let mut s = String::new();
    let rate = args.rate;
    let _ = writeln!(s, "# Fulcrum data-plane benchmark\n");
    let _ = writeln!(
        s,
        "Medians of {} run(s) per mode, {} s per measurement, modes interleaved run by run. \
         wrk: {} thread(s) ({} in direct-spread), {} connections. Latency: open loop, {rate} new connections/s (`Connection: close`), \
         timed from each request's intended send time; {} Fulcrum worker(s), HAProxy `nbthread {}`{}.\n",
        args.repeat,
        args.seconds,
        args.wrk_threads,
        spread_threads(args.wrk_threads),
        args.connections,
        args.workers,
        args.workers,
        args.busy_poll_us.map_or_else(String::new, |us| format!(", director `busy_poll_us = {us}`"))
    );
    let _ = writeln!(
        s,
        "| mode | iperf3 1 stream Gbit/s | iperf3 4 streams Gbit/s | keep-alive req/s | new conn/s | p50 ms @ {rate}/s | p99 ms @ {rate}/s | failed @ {rate}/s | director CPU % (bulk / conn) | director CPU µs per new conn | director RSS MiB |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &mode in modes {
        let runs = outcomes.get(&mode);
        let ok = runs.into_iter().flatten().filter(|o| o.is_ok()).count();
        if ok == 0 {
            let reason = runs
                .and_then(|r| r.iter().find_map(|o| o.as_ref().err().cloned()))
                .unwrap_or_else(|| "not run".to_string());
            let _ = writeln!(s, "| {} | failed: {reason} | – | – | – | – | – | – | – | – | – |", mode.name());
            continue;
        }
        let m = |f: fn(&Sample) -> Option<f64>| med(runs, f);
        let cpu = match mode {
            m if m.is_direct() => "– (not on the path)".to_string(),
            m if m.is_kernel() => "kernel (softirq)".to_string(),
            _ => format!("{} / {}", fmt_opt(med(runs, |x| x.cpu_bulk), 0), fmt_opt(med(runs, |x| x.cpu_conn), 0)),
        };
        let rss = match mode {
            m if m.is_direct() => "–".to_string(),
            m if m.is_kernel() => "–".to_string(),
            _ => fmt_opt(m(|x| x.rss_mib), 1),
        };
        let per_conn = match mode {
            Mode::FulcrumDr | Mode::FulcrumNat => fmt_opt(m(Sample::cpu_us_per_conn), 1),
            _ => "–".to_string(),
        };
        let failed = m(|x| x.lat_error_ratio).map_or_else(|| "–".to_string(), |r| format!("{:.2} %", r * 100.0));
        let partial =
            if ok < args.repeat as usize { format!(" ({ok} of {} runs)", args.repeat) } else { String::new() };
        let _ = writeln!(
            s,
            "| {}{partial} | {} | {} | {} | {} | {} | {} | {failed} | {cpu} | {per_conn} | {rss} |",
            mode.name(),
            fmt_opt(m(|x| x.gbps1), 2),
            fmt_opt(m(|x| x.gbps4), 2),
            fmt_opt(m(|x| x.keepalive_rps), 0),
            fmt_opt(m(|x| x.conn_rps), 0),
            fmt_opt(m(|x| x.p50_ms), 2),
            fmt_opt(m(|x| x.p99_ms), 2),
        );
    }

    let _ = writeln!(s, "\n## Ratios and targets\n");
    let _ = writeln!(
        s,
        "Each value is the median of the ratios taken run by run (both modes measured within the same run), \
         not the ratio of the medians above: the host's speed drifts between runs.\n"
    );
    let _ = writeln!(s, "| ratio | measure | value | per run | target | verdict |");
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | --- |");
    type Field = fn(&Sample) -> Option<f64>;
    let gbps1: Field = |x| x.gbps1;
    let gbps4: Field = |x| x.gbps4;
    let conns: Field = |x| x.conn_rps;
    let ratios: [(Mode, Mode, &str, Field, Option<f64>); 10] = [
        (Mode::FulcrumDr, Mode::NftFwd, "iperf3 1 stream", gbps1, Some(0.8)),
        (Mode::FulcrumDr, Mode::NftFwd, "iperf3 4 streams", gbps4, Some(0.8)),
        (Mode::FulcrumDr, Mode::NftDnat, "new conn/s", conns, Some(1.0)),
        (Mode::FulcrumNat, Mode::NftDnat, "new conn/s", conns, Some(1.0)),
        (Mode::FulcrumDr, Mode::Haproxy, "new conn/s", conns, Some(2.0)),
        (Mode::FulcrumNat, Mode::Haproxy, "new conn/s", conns, Some(2.0)),
        (Mode::NftFwd, Mode::Direct, "iperf3 4 streams", gbps4, None),
        (Mode::NftDnat, Mode::Haproxy, "new conn/s", conns, None),
        (Mode::Direct, Mode::Haproxy, "new conn/s", conns, None),
        // No balancer at all, the client spreading over the servers itself: what any balancer's ratio to
        // HAProxy is bounded by on this testbed.
        (Mode::DirectSpread, Mode::Haproxy, "new conn/s", conns, None),
    ];
    for (num, den, what, field, target) in ratios {
        let a = med(outcomes.get(&num), field);
        let b = med(outcomes.get(&den), field);
        let per_run = paired_ratios(outcomes.get(&num), outcomes.get(&den), field);
        let value = median(per_run.clone());
        let per_run = if per_run.is_empty() {
            "–".to_string()
        } else {
            per_run.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" / ")
        };
        let verdict = match (value, target) {
            (Some(v), Some(t)) if v >= t => "PASS".to_string(),
            (Some(_), Some(_)) => "FAIL".to_string(),
            (Some(_), None) => "context".to_string(),
            (None, _) => {
                let missing: Vec<&str> =
                    [(num, a), (den, b)].iter().filter(|(_, v)| v.is_none()).map(|(m, _)| m.name()).collect();
                format!("not measured ({})", missing.join(", "))
            }
        };
        let _ = writeln!(
            s,
            "| {} / {} | {what} | {} | {per_run} | {} | {verdict} |",
            num.name(),
            den.name(),
            fmt_opt(value, 2),
            target.map_or_else(|| "–".to_string(), |t| format!("≥ {t:.1}")),
        );
    }

    let _ = writeln!(
        s,
        "\n`context` rows are not targets: nft-fwd / direct is what the kernel's DR path costs, and direct-spread / \
         haproxy (the client spreading its connections over the three servers itself, no balancer at all) bounds any \
         balancer's ratio to HAProxy on this testbed: the client, the servers and the balancer share the machine's \
         cores."
    );
    let _ = writeln!(s, "\n## Every run\n");
    let _ = writeln!(
        s,
        "| mode | run | 1 stream Gbit/s | 4 streams Gbit/s | keep-alive req/s | new conn/s | p50 ms | p99 ms | CPU % bulk / conn | RSS MiB | HTTP requests rs1 / rs2 / rs3 |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &mode in modes {
        for (i, outcome) in outcomes.get(&mode).into_iter().flatten().enumerate() {
            match outcome {
                Ok(x) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
                        mode.name(),
                        i + 1,
                        fmt_opt(x.gbps1, 2),
                        fmt_opt(x.gbps4, 2),
                        fmt_opt(x.keepalive_rps, 0),
                        fmt_opt(x.conn_rps, 0),
                        fmt_opt(x.p50_ms, 2),
                        fmt_opt(x.p99_ms, 2),
                        fmt_opt(x.cpu_bulk, 0),
                        fmt_opt(x.cpu_conn, 0),
                        fmt_opt(x.rss_mib, 1),
                        x.spread.map_or_else(|| "–".to_string(), |[a, b, c]| format!("{a} / {b} / {c}")),
                    );
                }
                Err(reason) => {
                    let _ = writeln!(s, "| {} | {} | failed: {reason} | | | | | | | | |", mode.name(), i + 1);
                }
            }
        }
    }

    let _ = writeln!(s, "\n## Notes\n");
    let method = [
        "Topology: client 10.0.0.1, director 10.0.0.2, real servers 10.0.0.11-13 (nginx, 1 worker each) on one \
         bridged LAN, VIP 10.0.0.100. Everything shares this machine's cores: the client's wrk/iperf3/load generator, \
         the director and the three nginx compete for CPU, so the numbers are for comparing modes, not absolute.",
        "iperf3 (port 5201) is balanced to rs1 only, in every mode: an iperf3 test's control and data connections \
         must all reach the same server. HTTP (port 80) is balanced over the three servers.",
        "nft-fwd hashes (source address, source port) to a real server's MAC (`jhash … map`): nftables' netdev hook \
         has no connection tracking, and `numgen inc` there would spread one connection's packets over servers. The \
         client reaches the VIP through a static neighbour entry (the director's MAC); no host owns the VIP in the \
         kernel. Real servers: VIP on lo, arp_ignore=1, arp_announce=2.",
        "nft-dnat: conntrack DNAT with `numgen inc mod 3` (per connection), ip_forward=1, static neighbour entry on \
         the client. fulcrum-nat uses the same topology with ip_forward=0. The client is on the servers' LAN, so \
         the servers route the client's address via the director (host route; ICMP redirects off).",
        "haproxy: `mode tcp`, `balance roundrobin`, the VIP on the director's eth0 (a proxy must own it).",
        "Director CPU: utime + stime of the processes in the director's namespace during iperf3 -P4 (bulk) and \
         wrk `Connection: close` (conn), in % of one core. The kernel baselines forward in softirq, which no process \
         is charged for: their cost is not shown. CPU µs per new conn is that conn figure over the new conn/s of \
         the same run (median of runs): the forwarder's own cost, steadier than the rates on a busy machine; \
         softirq work done in the workers' system calls counts, the receive copy into the ring (done in the \
         sender's softirq) does not. RSS: the largest resident set seen after a measurement.",
        "Latency percentiles are over successful requests; failed ones (timeout 2 s from the intended send time, \
         refused, reset) are the `failed` column.",
    ];
    for m in method {
        let _ = writeln!(s, "- {m}");
    }
    for n in notes {
        let _ = writeln!(s, "- {}", n.replace('|', "/"));
    }

    let _ = writeln!(s, "\n## Machine\n");
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown".to_string());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string())))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = command_stdout(&["date", "-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let commit = command_stdout(&["git", "-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"])
        .unwrap_or_else(|| "unknown".to_string());
    let tools = [
        command_stdout(&["nginx", "-v"]).or_else(|| command_stdout(&["/usr/sbin/nginx", "-v"])),
        command_stdout(&["haproxy", "-v"]),
        command_stdout(&["nft", "--version"]),
        command_stdout(&["iperf3", "--version"]),
        command_stdout(&["wrk", "-v"]),
    ];
    let _ = writeln!(s, "- cores: {cores} ({cpu_model}), memory {mem}");
    let _ = writeln!(s, "- kernel: {}", kernel.trim());
    let _ = writeln!(s, "- date: {date}; commit {commit}; whole run {:.0} s", elapsed.as_secs_f64());
    let tools: Vec<String> = tools.into_iter().flatten().collect();
    let _ = writeln!(s, "- tools: {}", tools.join("; "));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_paired_run_by_run() {
        let run = |rps: f64| -> Outcome { Ok(Sample { conn_rps: Some(rps), ..Sample::default() }) };
        let num = vec![run(60.0), Err("failed".to_string()), run(30.0), run(40.0)];
        let den = vec![run(30.0), run(10.0), run(30.0), Err("failed".to_string())];
        assert_eq!(paired_ratios(Some(&num), Some(&den), |x| x.conn_rps), vec![2.0, 1.0]);
        assert!(paired_ratios(Some(&num), None, |x| x.conn_rps).is_empty());
    }

    #[test]
    fn parses_wrk() {
        let out = "Running 3s test @ http://10.0.0.11/\n  1 threads and 64 connections\n  58261 requests in 3.00s, 13.78MB read\n  Socket errors: connect 0, read 12, write 0, timeout 0\nRequests/sec:  19413.34\nTransfer/sec:      4.59MB\n";
        let (rps, errors) = parse_wrk(out).unwrap();
        assert!((rps - 19413.34).abs() < 1e-6);
        assert!(errors.unwrap().contains("read 12"));
        let clean = "  100 requests in 1.00s, 1KB read\nRequests/sec:     100.00\n";
        assert_eq!(parse_wrk(clean).unwrap(), (100.0, None));
        assert!(parse_wrk("  0 requests in 3.00s, 0B read\nRequests/sec:      0.00\n").is_err());
        assert!(parse_wrk("unable to connect").is_err());
    }

    #[test]
    fn parses_iperf() {
        let ok = r#"{"end": {"sum_received": {"bits_per_second": 12.5e9}}}"#;
        assert!((parse_iperf(ok).unwrap() - 12.5).abs() < 1e-9);
        let err = r#"{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}"#;
        assert!(format!("{:#}", parse_iperf(err).unwrap_err()).contains("Connection refused"));
        assert!(parse_iperf("").is_err());
    }

    #[test]
    fn configs_name_every_server() {
        let h = haproxy_config(2);
        assert!(
            h.contains("nbthread 2") && h.contains("server rs3 10.0.0.13:80") && h.contains("bind 10.0.0.100:5201")
        );
        let d = director_config(Path::new("/p"), Path::new("/s.sock"), 2, None, "nat");
        assert_eq!(d.matches("forward = \"nat\"").count(), 4);
        assert!(d.contains("[dataplane]\ninterface = \"eth0\"\nworkers = 2\n"));
        assert!(!d.contains("busy_poll_us") && d.contains("[metrics]\nlisten = \"10.0.0.2:9100\""));
        let d = director_config(Path::new("/p"), Path::new("/s.sock"), 2, Some(0), "dr");
        assert!(d.contains("workers = 2\nbusy_poll_us = 0\n"));
    }
}
