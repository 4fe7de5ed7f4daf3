//! Memory and speed of one worker's connection table at a million entries (or the count given).
//!
//!     cargo run --release -p fulcrum-director --example conntrack_bench -- [ENTRIES]
//!
//! Prints a table: bytes per entry (computed from the layout, and measured as the VmRSS growth of this
//! process), the rates of insert, lookup, packet accounting and expiry, and how long each budgeted expire
//! call took (percentiles: load from other processes shows up in the max). Run it through
//! `bench/conntrack-memory.sh`. Numbers are reported, never asserted.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use fulcrum_director::config::ForwardMethod;
use fulcrum_director::conntrack::{
    random_seed, ConnTable, Direction, TcpFlags, Tick, Timeouts, ENTRY_BYTES, WHEEL_SLOTS,
};
use fulcrum_director::flow::{FlowV4, Proto};

/// A distinct client per `i` (multiplying by an odd constant is a bijection on u32), spread like real
/// addresses rather than sequential.
fn forward(i: u32) -> FlowV4 {
    FlowV4 {
        src: Ipv4Addr::from(i.wrapping_mul(0x9e37_79b1)),
        dst: Ipv4Addr::new(192, 0, 2, 10),
        src_port: 1024 + (i % 60_000) as u16,
        dst_port: 443,
        proto: Proto::Tcp,
    }
}

/// NAT reply key: real server (one of 16) → client.
fn reply(i: u32, f: &FlowV4) -> FlowV4 {
    FlowV4 {
        src: Ipv4Addr::new(10, 1, 0, (i % 16) as u8 + 1),
        dst: f.src,
        src_port: 8443,
        dst_port: f.src_port,
        proto: f.proto,
    }
}

/// Resident set size of this process in KiB.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn rate(count: u64, elapsed: Duration) -> String {
    let per_sec = count as f64 / elapsed.as_secs_f64();
    format!("{:.2} M/s ({:.0} ns each)", per_sec / 1e6, 1e9 / per_sec)
}

fn main() {
    let n: u32 = match std::env::args().nth(1) {
        Some(arg) => arg.replace(['_', ','], "").parse().expect("ENTRIES must be a number"),
        None => 1_000_000,
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |name: &str, value: String| rows.push((name.to_string(), value));

    let rss_before = vm_rss_kib();
    let started = Instant::now();
    let mut table = ConnTable::new(n as usize, Timeouts::default(), random_seed()).expect("table");
    let built = started.elapsed();
    let rss_built = vm_rss_kib();

    // Fill: every entry NAT (both indexes used), created by a SYN as the packet path does it.
    let t0 = Tick::from_millis(0);
    let started = Instant::now();
    for i in 0..n {
        let f = forward(i);
        let r = reply(i, &f);
        let h = table.insert(f, Some(r), 1, i % 16, ForwardMethod::Nat, t0).expect("insert");
        table.on_packet(h, Direction::Input, TcpFlags::SYN, t0);
    }
    let insert_time = started.elapsed();
    let rss_filled = vm_rss_kib();
    assert_eq!(table.len(), n as usize);

    // Lookups in a scattered order (a permutation of 0..n when n's only prime factors are 2 and 5; any
    // order is fine for timing).
    let order = |k: u32| ((u64::from(k) * 0x9e37_79b1) % u64::from(n)) as u32;
    let started = Instant::now();
    for k in 0..n {
        black_box(table.lookup_forward(&forward(order(k))));
    }
    let lookup_time = started.elapsed();
    let started = Instant::now();
    for k in 0..n {
        let i = order(k);
        black_box(table.lookup_reply(&reply(i, &forward(i))));
    }
    let reply_time = started.elapsed();
    let started = Instant::now();
    for k in 0..n {
        black_box(table.lookup_forward(&forward(n + k)));
    }
    let miss_time = started.elapsed();

    // A packet of an existing connection: lookup + state machine + deadline (ESTABLISHED, 900 s).
    let t1 = Tick::from_secs(1);
    let started = Instant::now();
    for k in 0..n {
        let h = table.lookup_forward(&forward(order(k))).expect("present");
        black_box(table.on_packet(h, Direction::Input, TcpFlags::ACK, t1));
    }
    let packet_time = started.elapsed();

    let (fwd_index, rep_index) = table.index_stats();

    // Everything due at once: drained with a budget, as a packet loop would call it.
    const BUDGET: usize = 4_096;
    let now = Tick::from_secs(1_000);
    let mut call_times = Vec::with_capacity(n as usize / BUDGET + 2);
    let mut expired = 0u64;
    let started = Instant::now();
    loop {
        let call = Instant::now();
        let stats = table.expire(now, BUDGET, |info| {
            black_box(info);
        });
        call_times.push(call.elapsed());
        expired += stats.expired as u64;
        if !stats.pending {
            break;
        }
    }
    let expire_time = started.elapsed();
    assert!(table.is_empty());

    let capacity = n as u64;
    let layout_bytes = table.memory_bytes() as f64 / capacity as f64;
    let index_bytes = 2 * 4 * table.index_buckets() as u64;
    let wheel_bytes = (WHEEL_SLOTS * 8 + WHEEL_SLOTS / 8) as u64;
    let rss_new = (rss_built.saturating_sub(rss_before)) * 1024;
    let rss_full = (rss_filled.saturating_sub(rss_before)) * 1024;

    row("entries (capacity)", format!("{n}"));
    row("size_of(Entry)", format!("{ENTRY_BYTES} B"));
    row(
        "hash indexes",
        format!(
            "2 × {} buckets × 4 B = {:.1} MiB ({:.1} B/entry)",
            table.index_buckets(),
            index_bytes as f64 / 1048576.0,
            index_bytes as f64 / capacity as f64
        ),
    );
    row(
        "timer wheel",
        format!(
            "{WHEEL_SLOTS} slots × 8 B + bitmap = {:.2} MiB ({:.2} B/entry)",
            wheel_bytes as f64 / 1048576.0,
            wheel_bytes as f64 / capacity as f64
        ),
    );
    row(
        "bytes/entry (layout)",
        format!("{layout_bytes:.1} B  (total {:.1} MiB)", table.memory_bytes() as f64 / 1048576.0),
    );
    row(
        "RSS growth, new()",
        format!("{:.1} MiB = {:.1} B/entry", rss_new as f64 / 1048576.0, rss_new as f64 / capacity as f64),
    );
    row(
        "RSS growth, full",
        format!("{:.1} MiB = {:.1} B/entry", rss_full as f64 / 1048576.0, rss_full as f64 / capacity as f64),
    );
    row("new() (allocate + touch)", format!("{:.1} ms", built.as_secs_f64() * 1e3));
    row("insert + SYN", rate(capacity, insert_time));
    row("lookup_forward (hit)", rate(capacity, lookup_time));
    row("lookup_reply (hit)", rate(capacity, reply_time));
    row("lookup_forward (miss)", rate(capacity, miss_time));
    row("lookup + on_packet (ACK)", rate(capacity, packet_time));
    row(
        "longest chain fwd / reply",
        format!(
            "{} / {} (occupied buckets {:.1}% / {:.1}%)",
            fwd_index.longest_chain,
            rep_index.longest_chain,
            100.0 * fwd_index.occupied as f64 / fwd_index.buckets as f64,
            100.0 * rep_index.occupied as f64 / rep_index.buckets as f64
        ),
    );
    row("expire (all due at once)", rate(expired, expire_time));
    call_times.sort();
    let micros = |q: f64| call_times[((call_times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    row(
        "expire calls (budget 4096)",
        format!(
            "{} calls; per call p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            call_times.len(),
            micros(0.5),
            micros(0.99),
            micros(1.0)
        ),
    );
    row("counters", format!("{:?}", table.counters()));

    let width = rows.iter().map(|(name, _)| name.chars().count()).max().unwrap_or(0);
    println!("connection table, {n} entries");
    for (name, value) in &rows {
        println!("  {name:<width$}  {value}");
    }
}
