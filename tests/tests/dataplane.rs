//! End-to-end data plane: clients reach real nginx servers through the director's VIP, in `dr` and `nat`
//! modes, with every offload on.
//!
//! Needs root (network namespaces); fails loudly without it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fulcrum_tests::{in_netns, require_root, sha256_file, wait_until, workspace_bin, ChildGuard, Host, Nginx, Testbed};
use serde_json::Value;

const VIP: &str = "10.0.0.100";
const DIRECTOR_IP: &str = "10.0.0.2";
const POLL: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Dr,
    Nat,
    Tun,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Dr => "dr",
            Mode::Nat => "nat",
            Mode::Tun => "tun",
        }
    }

    /// Real servers share the clients' subnet in DR; in NAT they sit in their own subnet behind the director,
    /// which is their gateway (so their replies come back through it).
    fn server_ip(self, i: usize) -> String {
        match self {
            Mode::Dr | Mode::Tun => format!("10.0.0.{}", 11 + i),
            Mode::Nat => format!("10.0.1.{}", 11 + i),
        }
    }
}

/// A LAN with clients, one director and real servers running nginx.
struct Lab {
    // Fields drop in order: the director stops before its namespaces go.
    _director_process: ChildGuard,
    clients: Vec<Host>,
    director: Host,
    servers: Vec<(Host, Nginx)>,
    work: tempfile::TempDir,
    socket: PathBuf,
    _bed: Testbed,
}

impl Lab {
    fn start(name: &str, mode: Mode, scheduler: &str, weights: &[u32], clients: usize) -> Result<Lab> {
        require_root();
        let bed = Testbed::new(name)?;
        let director = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
        if mode == Mode::Nat {
            director.add_address("10.0.1.1/24", "eth0")?;
        }
        let clients = (0..clients)
            .map(|i| bed.add_host(&format!("c{i}"), &format!("10.0.0.{}/24", 21 + i)))
            .collect::<Result<Vec<_>>>()?;
        let mut servers = Vec::new();
        for i in 0..weights.len() {
            let host = bed.add_host(&format!("rs{}", i + 1), &format!("{}/24", mode.server_ip(i)))?;
            match mode {
                Mode::Dr | Mode::Tun => {
                    host.accept_vip_for_dr(VIP)?;
                }
                Mode::Nat => host.set_default_route("10.0.1.1")?,
            }
            let nginx = host.start_nginx(80)?;
            servers.push((host, nginx));
        }

        let work = tempfile::tempdir()?;
        let pki = work.path().join("pki");
        certs(&["ca", "--dir", path_str(&pki)?])?;
        certs(&["issue", "--dir", path_str(&pki)?, "--role", "director", "--name", "d1"])?;
        let socket = work.path().join("director.sock");
        let mut config = format!(
            "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:7946\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/d1.pem\"\nkey = \"{p}/d1.key\"\n\n[control]\nsocket = \"{s}\"\n\n[metrics]\nlisten = \"{DIRECTOR_IP}:9469\"\n\n[dataplane]\ninterface = \"eth0\"\nworkers = 2\nring_frames = 128\nconnection_capacity = 65536\n\n[[service]]\nvip = \"{VIP}\"\nport = 80\nscheduler = \"{scheduler}\"\n",
            p = pki.display(),
            s = socket.display()
        );
        for (i, weight) in weights.iter().enumerate() {
            config.push_str(&format!(
                "\n[[service.server]]\naddress = \"{}\"\nweight = {weight}\nforward = \"{}\"\n",
                mode.server_ip(i),
                mode.name()
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
        let lab = Lab { _director_process: process, clients, director, servers, work, socket, _bed: bed };
        lab.wait_resolved()?;
        if mode != Mode::Tun {
            lab.wait_answering()?;
        }
        Ok(lab)
    }

    fn wait_resolved(&self) -> Result<()> {
        wait_until("every real server's MAC resolved", Duration::from_secs(15), POLL, || {
            Ok(servers_of(&list(&self.socket)?).iter().all(|s| !s["mac"].is_null()))
        })
    }

    fn wait_answering(&self) -> Result<()> {
        wait_until("the VIP answering", Duration::from_secs(15), POLL, || {
            Ok(self.clients[0].curl(&format!("http://{VIP}/"), &["--max-time", "2"]).is_ok())
        })
    }

    fn fulcrumctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(&self.socket).args(args).output()?;
        if !out.status.success() {
            bail!("fulcrumctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `n` requests from `client`, each on a new connection; how many each real server answered.
    fn spread(&self, client: &Host, n: usize) -> Result<BTreeMap<String, usize>> {
        let script = format!("for i in $(seq {n}); do curl -s --max-time 5 http://{VIP}/; done");
        let out = client.run(&["bash", "-c", &script])?;
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

    fn metric(&self, series: &str) -> Result<f64> {
        let text = self.director.curl(&format!("http://{DIRECTOR_IP}:9469/metrics"), &[])?;
        Ok(fulcrum_tests::metric_sum(&text, series).unwrap_or(0.0))
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

fn list(socket: &Path) -> Result<Value> {
    let out =
        Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(socket).args(["list", "--json"]).output()?;
    if !out.status.success() {
        bail!("fulcrumctl list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn servers_of(list: &Value) -> Vec<Value> {
    list[0]["servers"].as_array().cloned().unwrap_or_default()
}

fn assert_share(counts: &BTreeMap<String, usize>, host: &str, expected: f64, tolerance: f64) {
    let total: usize = counts.values().sum();
    let share = counts.get(host).copied().unwrap_or(0) as f64 / total as f64;
    assert!(
        (share - expected).abs() <= tolerance,
        "{host} got {share:.3} of {total}, expected {expected:.3}: {counts:?}"
    );
}

#[test]
fn rr_spreads_evenly_and_the_vip_is_answered_from_userspace_in_dr_and_nat() -> Result<()> {
    for mode in [Mode::Dr, Mode::Nat] {
        let lab = Lab::start(&format!("rr{}", mode.name()), mode, "rr", &[1, 1, 1], 1)?;
        let before: u64 = servers_of(&list(&lab.socket)?).iter().filter_map(|s| s["connections_total"].as_u64()).sum();
        let counts = lab.spread(&lab.clients[0], 300)?;
        let servers = servers_of(&list(&lab.socket)?);
        let after: u64 = servers.iter().filter_map(|s| s["connections_total"].as_u64()).sum();
        assert_eq!(after - before, 300, "{mode:?}: one tracked connection per request: {servers:?}");
        let inactive: u64 = servers.iter().filter_map(|s| s["inactive_connections"].as_u64()).sum();
        assert!(inactive > 0, "{mode:?}: closed connections linger as InActConn: {servers:?}");
        for host in ["rs1", "rs2", "rs3"] {
            // Two workers each keep their own rotation: each server is within a couple of requests of 100.
            assert_share(&counts, host, 1.0 / 3.0, 0.02);
        }
        // The client learnt the VIP's MAC by ARP, answered by the director from userspace.
        let neigh = lab.clients[0].run(&["ip", "neigh", "show", VIP])?;
        assert!(neigh.contains(&lab.director.mac()?), "{mode:?}: {neigh}");
        // The kernel does not own the VIP and does not forward.
        let addresses = lab.director.run(&["ip", "-4", "addr", "show"])?;
        assert!(!addresses.contains(VIP), "{addresses}");
        assert_eq!(lab.director.read_sysctl("net.ipv4.conf.eth0.forwarding")?.trim(), "0");
        let table = lab.fulcrumctl(&["list"])?;
        assert!(table.contains(&format!("TCP  {VIP}:80 rr")), "{table}");
        if mode == Mode::Nat {
            // A service added at run time, translating port 8080 to the servers' 80, forwards at once.
            lab.fulcrumctl(&["service", "add", &format!("{VIP}:8080"), "-s", "rr"])?;
            let server = format!("{}:80", mode.server_ip(1));
            lab.fulcrumctl(&["server", "add", &format!("{VIP}:8080"), &server, "-m", "nat"])?;
            let answer = lab.clients[0].curl(&format!("http://{VIP}:8080/"), &["--max-time", "5"])?;
            assert_eq!(answer, "host=rs2\n");
            let refused = lab.fulcrumctl(&["server", "add", &format!("{VIP}:8080"), &server]);
            assert!(refused.is_err_and(|e| e.to_string().contains("already has real server")));
        }
        assert!(table.contains(if mode == Mode::Dr { "Route" } else { "Masq" }), "{table}");
    }
    Ok(())
}

#[test]
fn wrr_follows_weights_and_sh_keeps_each_client_on_one_server() -> Result<()> {
    let lab = Lab::start("wrr", Mode::Dr, "wrr", &[1, 2, 3], 1)?;
    let counts = lab.spread(&lab.clients[0], 600)?;
    assert_share(&counts, "rs1", 1.0 / 6.0, 0.03);
    assert_share(&counts, "rs2", 2.0 / 6.0, 0.03);
    assert_share(&counts, "rs3", 3.0 / 6.0, 0.03);
    drop(lab);

    let lab = Lab::start("sh", Mode::Nat, "sh", &[1, 1, 1], 4)?;
    let mut chosen = Vec::new();
    for client in &lab.clients {
        let counts = lab.spread(client, 20)?;
        assert_eq!(counts.len(), 1, "{}: one client, one server: {counts:?}", client.name());
        chosen.extend(counts.into_keys());
    }
    // And the same client still maps to the same server later.
    let again = lab.spread(&lab.clients[0], 5)?;
    assert_eq!(again.keys().next(), chosen.first(), "sh is stable over time");
    Ok(())
}

#[test]
fn a_100_mb_transfer_arrives_intact_with_offloads_on() -> Result<()> {
    for mode in [Mode::Dr, Mode::Nat] {
        let lab = Lab::start(&format!("big{}", mode.name()), mode, "rr", &[1], 1)?;
        // Offloads stay as veth sets them (TSO, GSO, GRO and checksum offload on): nothing here turns them off.
        let big = lab.servers[0].1.set_big_file(100 * 1024 * 1024)?;
        let expected = sha256_file(&big)?;
        let got = lab.work.path().join("got.bin");
        lab.clients[0].curl(&format!("http://{VIP}/big"), &["--max-time", "120", "-o", path_str(&got)?])?;
        assert_eq!(sha256_file(&got)?, expected, "{mode:?}: the bytes differ");
        let segments_with_bad_checksums = tcp_in_csum_errors(&lab.clients[0])? + tcp_in_csum_errors(&lab.servers[0].0)?;
        assert_eq!(segments_with_bad_checksums, 0, "{mode:?}: TcpInCsumErrors");
    }
    Ok(())
}

fn tcp_in_csum_errors(host: &Host) -> Result<u64> {
    let snmp = host.run(&["cat", "/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("Tcp header")?, tcp.next().context("Tcp values")?);
    let at = names.split_whitespace().position(|n| n == "InCsumErrors").context("InCsumErrors")?;
    Ok(values.split_whitespace().nth(at).context("value")?.parse()?)
}

#[test]
fn a_quiesced_server_gets_no_new_connections_while_an_open_one_finishes() -> Result<()> {
    for mode in [Mode::Dr, Mode::Nat] {
        let lab = Lab::start(&format!("q{}", mode.name()), mode, "rr", &[1, 1], 1)?;
        let big = lab.servers[0].1.set_big_file(8 * 1024 * 1024)?;
        let expected = sha256_file(&big)?;
        lab.servers[1].1.set_big_file(8 * 1024 * 1024)?;
        // A slow download from rs1: find a connection that lands there by asking until one does.
        let got = lab.work.path().join("slow.bin");
        let mut download = None;
        for _ in 0..10 {
            let mut command = lab.clients[0].command("curl");
            command.args(["-s", "--limit-rate", "1M", "-D", "-", "-o", path_str(&got)?, &format!("http://{VIP}/big")]);
            let mut child = lab.clients[0].spawn(command)?;
            child.wait_for_output("X-Backend:", Duration::from_secs(10))?;
            if child.stdout().contains("X-Backend: rs1") {
                download = Some(child);
                break;
            }
            child.kill()?;
        }
        let mut download = download.context("no download landed on rs1")?;
        let rs1 = servers_of(&list(&lab.socket)?)[0].clone();
        assert!(rs1["active_connections"].as_u64() >= Some(1), "{mode:?}: the open download is an ActiveConn: {rs1}");
        lab.fulcrumctl(&["server", "drain", &format!("{VIP}:80"), &mode.server_ip(0)])?;
        let counts = lab.spread(&lab.clients[0], 30)?;
        assert_eq!(counts.get("rs1"), None, "{mode:?}: the drained server got new connections: {counts:?}");
        let status = download.wait_exit(Duration::from_secs(60))?;
        assert!(status.success(), "{mode:?}: the open download failed: {}", download.output_tails());
        assert_eq!(sha256_file(&got)?, expected, "{mode:?}: the open download was damaged");
        let listed = servers_of(&list(&lab.socket)?);
        assert_eq!(listed[0]["effective_weight"], 0);
    }
    Ok(())
}

#[test]
fn a_non_syn_packet_without_an_entry_never_reaches_a_server() -> Result<()> {
    let lab = Lab::start("nosyn", Mode::Dr, "rr", &[1, 1], 1)?;
    // The lab's readiness requests may still be closing: their last segments would count as received.
    wait_until("the real servers' earlier connections to finish closing", Duration::from_secs(10), POLL, || {
        for (host, _) in &lab.servers {
            if !open_exchanges(host)?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let before: Vec<u64> = lab.servers.iter().map(|(host, _)| tcp_in_segs(host)).collect::<Result<_>>()?;
    let dropped_before = lab.metric("fulcrum_dropped_packets_total{reason=\"no_connection\"}")?;
    let client_ip: Ipv4Addr = "10.0.0.21".parse()?;
    in_netns(lab.clients[0].netns(), move || send_stray_ack(client_ip, VIP.parse()?, 40000, 80, 5))?;
    wait_until("the director to count the strays", Duration::from_secs(5), POLL, || {
        Ok(lab.metric("fulcrum_dropped_packets_total{reason=\"no_connection\"}")? >= dropped_before + 5.0)
    })?;
    let after: Vec<u64> = lab.servers.iter().map(|(host, _)| tcp_in_segs(host)).collect::<Result<_>>()?;
    assert_eq!(before, after, "a real server received a segment");
    Ok(())
}

#[test]
fn tun_sends_ip_in_ip_to_the_real_server_with_a_clamped_mss() -> Result<()> {
    // This kernel has no ipip module, so the real server cannot decapsulate: check the frames themselves.
    let lab = Lab::start("tun", Mode::Tun, "rr", &[1], 1)?;
    let server = &lab.servers[0].0;
    let capture = lab.work.path().join("tun.pcap");
    let mut tcpdump = server.command("tcpdump");
    tcpdump.args(["-i", "eth0", "-n", "-U", "-c", "2", "-w", path_str(&capture)?, "ip proto 4"]);
    let mut tcpdump = server.spawn(tcpdump)?;
    tcpdump.wait_for_output("listening on", Duration::from_secs(10))?;
    // The connection cannot complete; its SYN and a retransmission are enough.
    let _ = lab.clients[0].curl(&format!("http://{VIP}/"), &["--max-time", "3"]);
    let status = tcpdump.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "tcpdump: {}", tcpdump.output_tails());
    let decoded = server.run(&["tcpdump", "-n", "-vv", "-r", path_str(&capture)?])?;
    // Outer header from the director to the real server, inner SYN from the client to the VIP.
    let outer = format!("{DIRECTOR_IP} > {}: ", Mode::Tun.server_ip(0));
    assert!(decoded.contains(&outer), "{decoded}");
    assert!(decoded.contains("proto IPIP (4)"), "{decoded}");
    assert!(decoded.contains("10.0.0.21.") && decoded.contains(&format!("> {VIP}.80: Flags [S]")), "{decoded}");
    assert!(decoded.contains("mss 1440"), "the MSS was clamped to fit the tunnel: {decoded}");
    assert!(!decoded.contains("incorrect") && !decoded.contains("bad cksum"), "every checksum verifies: {decoded}");
    Ok(())
}

/// TCP sockets of `host` that still expect segments from their peer (`ss` lines; TIME-WAIT and listeners
/// expect none).
fn open_exchanges(host: &Host) -> Result<String> {
    let states = ["established", "syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack", "closing"];
    let mut args = vec!["ss", "-tnH"];
    for state in states {
        args.extend(["state", state]);
    }
    Ok(host.run(&args)?.trim().to_string())
}

fn tcp_in_segs(host: &Host) -> Result<u64> {
    let snmp = host.run(&["cat", "/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("Tcp header")?, tcp.next().context("Tcp values")?);
    let at = names.split_whitespace().position(|n| n == "InSegs").context("InSegs")?;
    Ok(values.split_whitespace().nth(at).context("value")?.parse()?)
}

/// Sends `count` bare ACKs (no connection behind them) with a raw socket.
fn send_stray_ack(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, count: usize) -> Result<()> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&sport.to_be_bytes());
    segment[2..4].copy_from_slice(&dport.to_be_bytes());
    segment[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    segment[8..12].copy_from_slice(&0x0000_1000u32.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = 0x10; // ACK
    segment[14..16].copy_from_slice(&8192u16.to_be_bytes());
    // TCP checksum over the pseudo-header and the segment.
    let mut sum: u32 = 0;
    for chunk in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    sum += 6 + 20;
    for chunk in segment.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    segment[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    // SAFETY: sockaddr_in is plain data.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as u16;
    addr.sin_addr.s_addr = u32::from(dst).to_be();
    for _ in 0..count {
        // SAFETY: sending our buffer to a valid address.
        let rc = unsafe {
            libc::sendto(
                fd,
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: closing our descriptor.
            unsafe { libc::close(fd) };
            bail!("sendto: {err}");
        }
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    Ok(())
}
