//! The director holding 1,000,000 tracked connections: its memory, and its CPU while idle with them and
//! while they are created. A benchmark that prints a table, not a test.
//!
//! The rings get 1024 slots: on a 2-core machine shared by the sender, two workers and the kernel's softirq,
//! a worker is sometimes not scheduled for a few milliseconds, and a 256-slot ring (the default) overflows
//! at this rate — the measurement is about the table, so the ring is made deep enough. (Each slot is 72 KiB,
//! sized for a GSO super-frame, so 2 × 1024 slots are 144 MiB of the RSS; see the README on ring sizing.)
//!
//! A client namespace sends one UDP datagram per flow (distinct source address and port) to a UDP service on
//! the VIP, from a raw socket; the director (2 workers, `dr`) tracks each as a connection. Needs root.
//!
//!   cargo run --release -p fulcrum-tests --bin bench_million -- [FLOWS]

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fulcrum_tests::{in_netns, require_root, wait_until, workspace_bin, Testbed};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PORT: u16 = 9999;

fn main() -> Result<()> {
    require_root();
    let flows: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(1_000_000);
    let bed = Testbed::new("million")?;
    let director = bed.add_host("dir1", "10.0.0.2/24")?;
    let client = bed.add_host("client", "10.0.0.21/24")?;
    let server = bed.add_host("rs1", "10.0.0.11/24")?;
    server.accept_vip_for_dr(&VIP.to_string())?;

    let work = tempfile::tempdir()?;
    let pki = work.path().join("pki");
    let pki_str = pki.to_str().context("path")?;
    for args in [
        vec!["certs", "ca", "--dir", pki_str],
        vec!["certs", "issue", "--dir", pki_str, "--role", "director", "--name", "d1"],
    ] {
        let out = Command::new(workspace_bin("fulcrum-director")).args(&args).output()?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let socket = work.path().join("d.sock");
    let config = work.path().join("director.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"d1\"\n[agents]\nlisten = \"10.0.0.2:7946\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/d1.pem\"\nkey = \"{p}/d1.key\"\n[control]\nsocket = \"{s}\"\n[metrics]\nlisten = \"10.0.0.2:9469\"\n[dataplane]\ninterface = \"eth0\"\nworkers = 2\nring_frames = 1024\nconnection_capacity = 1048576\n[[service]]\nvip = \"{VIP}\"\nport = {PORT}\nprotocol = \"udp\"\nscheduler = \"rr\"\n[[service.server]]\naddress = \"10.0.0.11\"\n",
            p = pki.display(),
            s = socket.display()
        ),
    )?;
    let mut command = Command::new(workspace_bin("fulcrum-director"));
    command.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn");
    let mut process = director.spawn(command)?;
    let pid = wait_until("the director's worker threads", Duration::from_secs(20), Duration::from_millis(50), || {
        if !process.is_running()? {
            bail!("the director exited: {}", process.output_tails());
        }
        // The namespace's process that is the director itself (not `ip netns exec`).
        Ok(fulcrum_tests::netns_pids(director.netns())?.into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "fulcrum-directo")
        }))
    })?;
    let metric = |name: &str| -> Result<f64> {
        let text = director.curl("http://10.0.0.2:9469/metrics", &[])?;
        fulcrum_tests::metric_sum(&text, name).with_context(|| format!("metric {name}"))
    };
    wait_until("the real server's MAC", Duration::from_secs(15), Duration::from_millis(50), || {
        let out =
            Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(&socket).args(["list", "--json"]).output()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(!list[0]["servers"][0]["mac"].is_null())
    })?;
    let rss_empty = rss_kib(pid)?;

    let cpu_before = cpu_ticks(pid)?;
    let started = Instant::now();
    let sent = in_netns(client.netns(), move || send_flows(flows))?;
    let fill_time = started.elapsed();
    let tracked = wait_until("the table to stop growing", Duration::from_secs(30), Duration::from_millis(500), {
        let mut last = -1.0;
        move || {
            let now = metric("fulcrum_connection_table_entries")?;
            let settled = now == last;
            last = now;
            Ok(settled.then_some(now))
        }
    })?;
    let cpu_fill = cpu_ticks(pid)? - cpu_before;
    let rss_full = rss_kib(pid)?;
    let idle_window = Duration::from_secs(10);
    let idle_before = cpu_ticks(pid)?;
    std::thread::sleep(idle_window);
    let cpu_idle = cpu_ticks(pid)? - idle_before;
    let ticks = clock_ticks();
    let ring_drops = metric("fulcrum_ring_drops_total").unwrap_or(0.0);
    drop(process);

    println!();
    println!("director holding {tracked:.0} tracked connections (2 workers, rings 2 x 1024 x 72 KiB, tables 2 x 1048576 entries, UDP flows)");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| flows sent | {sent} |");
    println!("| connections tracked | {tracked:.0} |");
    println!("| ring drops while filling | {ring_drops:.0} |");
    println!("| fill rate | {:.0} new connections/s |", tracked / fill_time.as_secs_f64());
    println!(
        "| director CPU while filling | {:.1} % of one core |",
        100.0 * cpu_fill as f64 / ticks / fill_time.as_secs_f64()
    );
    println!(
        "| director CPU idle with the table full | {:.2} % of one core |",
        100.0 * cpu_idle as f64 / ticks / idle_window.as_secs_f64()
    );
    println!("| director RSS, empty table (preallocated) | {:.1} MiB |", rss_empty as f64 / 1024.0);
    println!("| director RSS, table full | {:.1} MiB |", rss_full as f64 / 1024.0);
    println!(
        "| RSS per tracked connection | {:.0} bytes (whole process; the table alone: bench/conntrack-memory.sh) |",
        rss_full as f64 * 1024.0 / tracked.max(1.0)
    );
    println!(
        "machine: {} cores, {}, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    Ok(())
}

/// One UDP datagram per flow from a raw socket: source addresses 10.0.64.0/18 (16384 of them) and ports
/// 1024…, so that every datagram is a new connection for the director.
fn send_flows(flows: usize) -> Result<usize> {
    // SAFETY: plain socket(2); closed at the end.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_in is plain data.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as u16;
    to.sin_addr.s_addr = u32::from(VIP).to_be();
    const PACKET_LEN: usize = 20 + 8 + 4;
    let mut packet = [0u8; PACKET_LEN];
    let mut sent = 0;
    let pace = Instant::now();
    for i in 0..flows {
        let src = Ipv4Addr::from(0x0a00_4000u32 + (i as u32 % 16_384));
        let sport = 1024 + (i / 16_384) as u16;
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&(PACKET_LEN as u16).to_be_bytes());
        packet[8] = 64;
        packet[9] = 17;
        packet[12..16].copy_from_slice(&src.octets());
        packet[16..20].copy_from_slice(&VIP.octets());
        packet[20..22].copy_from_slice(&sport.to_be_bytes());
        packet[22..24].copy_from_slice(&PORT.to_be_bytes());
        packet[24..26].copy_from_slice(&12u16.to_be_bytes());
        // UDP checksum 0: none (allowed over IPv4); the kernel fills the IP header checksum.
        // SAFETY: sending our buffer to a valid address.
        let rc = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc > 0 {
            sent += 1;
        }
        // Pace to about 200k datagrams/s so the measurement is the table, not ring overflow.
        if i % 2000 == 1999 {
            let due = Duration::from_micros((i as u64 + 1) * 5);
            if let Some(wait) = due.checked_sub(pace.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    Ok(sent)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/PID/stat, i.e. 11 and 12 after the command name.
    Ok(fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default()
}
