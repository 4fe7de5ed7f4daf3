//! Fulcrum's network-namespace testbed, used by the end-to-end tests in `tests/tests/`.
//!
//! Everything here needs root ([`require_root`] panics otherwise: tests fail, they never skip).
//!
//! ```no_run
//! use std::time::Duration;
//! use fulcrum_tests::{workspace_bin, Testbed};
//!
//! # fn main() -> anyhow::Result<()> {
//! let tb = Testbed::new("dr-basic")?;                  // LAN br0, namespaces fu<pid>x<n>-*
//! let client = tb.add_host("client", "10.0.0.2/24")?;
//! let director = tb.add_host("dir1", "10.0.0.10/24")?;
//! let rs = tb.add_host("rs1", "10.0.0.11/24")?;
//! rs.add_address("10.0.0.100/32", "lo")?;             // VIP on lo of the real server
//! rs.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
//! rs.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
//! let _web = rs.start_nginx(80)?;                     // returns once listening
//! let mut cmd = director.command(workspace_bin("fulcrum-director"));
//! cmd.args(["--config", "/tmp/director.toml"]);
//! let mut dir_proc = director.spawn(cmd)?;            // killed on drop, logs captured
//! director.wait_udp_listening(4433, Duration::from_secs(10))?;
//! assert_eq!(client.curl("http://10.0.0.100/", &[])?, "host=rs1\n");
//! dir_proc.terminate(Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

pub mod arp_watch;
pub mod cgroup;
pub mod cmd;
pub mod ha_pair;
pub mod loadgen;
pub mod netns;
pub mod nginx;
pub mod pki;
pub mod process;
pub mod quota;
pub mod tcp_streams;
pub mod udp_probe;
pub mod wait;

#[cfg(test)]
mod selftest;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use cmd::{command_line, run_command, run_unchecked};
pub use netns::{
    destroy_netns, in_netns, list_netns, netns_pids, parse_cidr, require_root, sweep_stale_namespaces, Host, Lan,
    Testbed,
};
pub use nginx::Nginx;
pub use pki::Pki;
pub use process::ChildGuard;
pub use wait::{abort_wait, wait_until, PollResult};

/// Locates a binary built from this workspace (`fulcrum-director`, `fulcrum-agent`, `fulcrumctl`).
///
/// Looks at `CARGO_BIN_EXE_<name>` (set by cargo only for the owning package), then
/// `$FULCRUM_BIN_DIR/<name>`, then `target/<profile>/<name>` next to the running test executable
/// (`target/<profile>/deps/<test>-<hash>`). Errors tell the user to `cargo build --workspace`.
pub fn try_workspace_bin(name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(dir) = std::env::var_os("FULCRUM_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{name} not found in FULCRUM_BIN_DIR ({})", p.display());
    }
    let exe = std::env::current_exe().context("locating the running test executable")?;
    let mut dir = exe.parent().with_context(|| format!("{} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().with_context(|| format!("{} has no parent directory", dir.display()))?;
    }
    let candidate = dir.join(name);
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "workspace binary {name} not found at {}: build it first with `cargo build --workspace` \
         (same profile and CARGO_TARGET_DIR as the tests, e.g. `cargo build --workspace --release` before \
         `cargo test --release`), or point FULCRUM_BIN_DIR at the directory holding it",
        candidate.display()
    )
}

/// [`try_workspace_bin`], panicking with its message when the binary is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    try_workspace_bin(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Writes `size` pseudo-random bytes (xorshift64*, deterministic for a given `seed`) to `path`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 16, file);
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut left = size;
    while left > 0 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let bytes = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let n = left.min(8) as usize;
        w.write_all(&bytes[..n]).with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The sum of the samples of `series` in a Prometheus text exposition: an exact name (with its labels, if
/// any), or, when `series` ends with `{`, a name with any labels. `None` when the exposition has no such sample.
pub fn metric_sum(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| line.starts_with(series) && (series.ends_with('{') || line[series.len()..].starts_with(' ')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

/// The median of `values` (the mean of the middle two for an even count); `None` for none. For the benchmarks'
/// summaries, where one run's outlier must not decide a figure.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// The SHA-256 of a file as lowercase hex (via `sha256sum`).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut cmd = std::process::Command::new("sha256sum");
    cmd.arg(path);
    let out = run_command(&mut cmd)?;
    match out.split_whitespace().next() {
        Some(hex) if hex.len() == 64 => Ok(hex.to_string()),
        _ => bail!("unexpected sha256sum output {out:?}"),
    }
}
