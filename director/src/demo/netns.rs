//! The demo's throw-away network: named network namespaces joined by veth pairs to one bridge, built with
//! `ip` (iproute2), and the processes started inside them. [`Playground`]'s `Drop` takes it all down again
//! (processes newest first, then every namespace, then the work directory), so Ctrl-C, SIGTERM, a panic and
//! the normal end all leave the machine as it was.
//!
//! Names: every namespace is `fdemo<pid>-<role>`, `<pid>` being the demo process. A run that was killed
//! outright (SIGKILL) cannot clean up; the next run recognises its namespaces by the prefix and a dead pid and
//! removes them ([`sweep_leftovers`]). No interface is created in the root namespace: each veth pair is made in
//! the bridge's namespace with its peer placed straight into the host's.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Every demo namespace name starts with this, then the demo's pid and `-`.
pub const NETNS_PREFIX: &str = "fdemo";
const NETNS_DIR: &str = "/run/netns";

/// The pid in a demo namespace name (`fdemo<pid>-<role>`), if the name is one.
pub fn demo_netns_pid(name: &str) -> Option<u32> {
    let (pid, role) = name.strip_prefix(NETNS_PREFIX)?.split_once('-')?;
    if pid.is_empty() || role.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Names of all named network namespaces.
pub fn list_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry.with_context(|| format!("listing {NETNS_DIR}"))?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn is_dead(pid: u32) -> bool {
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// The work directory of demo process `pid`.
pub fn work_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("{WORK_DIR_PREFIX}{pid}"))
}
const WORK_DIR_PREFIX: &str = "fulcrum-demo-";

/// Removes the namespaces and work directories of earlier demo runs whose process is gone; returns what it
/// removed.
pub fn sweep_leftovers() -> Result<Vec<String>> {
    let mut swept = Vec::new();
    for name in list_netns()? {
        let Some(pid) = demo_netns_pid(&name) else { continue };
        if is_dead(pid) {
            destroy_netns(&name).with_context(|| format!("removing {name}, left by demo process {pid}"))?;
            swept.push(format!("namespace {name}"));
        }
    }
    let temp = std::env::temp_dir();
    for entry in std::fs::read_dir(&temp).with_context(|| format!("listing {}", temp.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(WORK_DIR_PREFIX).and_then(|pid| pid.parse::<u32>().ok()) else { continue };
        if is_dead(pid) && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
            swept.push(format!("directory {}", entry.path().display()));
        }
    }
    Ok(swept)
}

/// Kills every process inside `ns` and deletes it; a namespace that is already gone is not an error.
pub fn destroy_netns(ns: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(ns);
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() {
        let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
        if pids.trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes {} in namespace {ns} did not die", pids.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions; a pid that died meanwhile gives ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // The kernel reaps asynchronously: give it a moment before listing again.
        std::thread::sleep(Duration::from_millis(5));
    }
    if path.exists() {
        let out = Command::new("ip").args(["netns", "delete", ns]).output().context("running `ip netns delete`")?;
        if !out.status.success() && path.exists() {
            bail!("ip netns delete {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// Runs `program args…`; returns stdout, or an error quoting the command line and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not run `{program} {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process the playground started, stopped when the playground goes.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

/// The namespaces, the work directory and the processes of one demo run.
#[derive(Debug)]
pub struct Playground {
    prefix: String,
    bridge_ns: String,
    namespaces: Vec<String>,
    ports: u32,
    work: PathBuf,
    processes: Vec<Process>,
}

impl Playground {
    /// A work directory and a bridge namespace; first removes what a crashed earlier run left.
    pub fn new() -> Result<Playground> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the demo needs root: it creates network namespaces, veth pairs and a bridge");
        }
        for what in sweep_leftovers()? {
            eprintln!("demo: removed {what}, left by an earlier run that did not finish");
        }
        let pid = std::process::id();
        let work = work_dir(pid);
        if work.exists() {
            std::fs::remove_dir_all(&work).with_context(|| format!("removing the stale {}", work.display()))?;
        }
        std::fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
        let prefix = format!("{NETNS_PREFIX}{pid}");
        let mut playground = Playground {
            bridge_ns: format!("{prefix}-lan"),
            prefix,
            namespaces: Vec::new(),
            ports: 0,
            work,
            processes: Vec::new(),
        };
        let bridge_ns = playground.bridge_ns.clone();
        playground.add_netns(&bridge_ns)?;
        ip(&bridge_ns, &["link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"])?;
        ip(&bridge_ns, &["link", "set", "br0", "up"])?;
        Ok(playground)
    }

    /// The work directory (certificates, configs, sockets, logs); removed at the end.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// The namespace name of host `role`.
    pub fn netns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// The namespace prefix of this run (`fdemo<pid>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A host namespace `role` with `eth0` carrying `cidr`, plugged into the bridge; returns its namespace.
    pub fn add_host(&mut self, role: &str, cidr: &str) -> Result<String> {
        let ns = self.netns(role);
        self.add_netns(&ns)?;
        let port = format!("p{}", self.ports);
        self.ports += 1;
        let bridge_ns = self.bridge_ns.clone();
        ip(&bridge_ns, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&bridge_ns, &["link", "set", &port, "master", "br0"])?;
        ip(&bridge_ns, &["link", "set", &port, "up"])?;
        ip(&ns, &["addr", "add", cidr, "dev", "eth0"])?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// Makes `ns` a direct-routing real server for `vip`: the VIP on `lo`, and no ARP answers or
    /// announcements for it on the LAN (only the director may own it there).
    pub fn make_dr_real_server(&self, ns: &str, vip: Ipv4Addr) -> Result<()> {
        ip(ns, &["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        for scope in ["all", "eth0"] {
            sysctl(ns, &format!("net/ipv4/conf/{scope}/arp_ignore"), "1")?;
            sysctl(ns, &format!("net/ipv4/conf/{scope}/arp_announce"), "2")?;
        }
        Ok(())
    }

    /// Starts `program args…` inside `ns` (`ip netns exec`, which execs: the child's pid is the program's),
    /// with stdout and stderr in `<work>/<name>.log`. Returns its index for [`Playground::process`].
    pub fn spawn(&mut self, name: &str, ns: &str, program: &Path, args: &[&str]) -> Result<usize> {
        let log = self.work.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new("ip")
            // A process group of its own: Ctrl-C in the terminal reaches the demo only, which then stops
            // everything in order (and tells the interrupt from a crash).
            .process_group(0)
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {} {}", program.display(), args.join(" ")))?;
        self.processes.push(Process { name: name.to_string(), child, log });
        Ok(self.processes.len() - 1)
    }

    pub fn process(&mut self, index: usize) -> &mut Process {
        &mut self.processes[index]
    }

    /// Errors, with the end of its log, if a process has exited.
    pub fn check_running(&mut self, index: usize) -> Result<()> {
        let process = &mut self.processes[index];
        if let Some(status) = process.child.try_wait().context("checking a child process")? {
            bail!("{} exited ({status}); its log ends:\n{}", process.name, log_tail(&process.log));
        }
        Ok(())
    }

    fn add_netns(&mut self, ns: &str) -> Result<()> {
        run("ip", &["netns", "add", ns])?;
        // Registered at once, so that Drop deletes it whatever fails next.
        self.namespaces.push(ns.to_string());
        ip(ns, &["link", "set", "lo", "up"])?;
        if Path::new("/proc/sys/net/ipv6").exists() {
            // No IPv6 chatter (router solicitations, DAD) on the demo LAN.
            sysctl(ns, "net/ipv6/conf/all/disable_ipv6", "1")?;
            sysctl(ns, "net/ipv6/conf/default/disable_ipv6", "1")?;
        }
        Ok(())
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        // Newest first, SIGTERM: the load stops, then agents say goodbye, then the directors go.
        for process in self.processes.iter_mut().rev() {
            if let Ok(None) = process.child.try_wait() {
                // SAFETY: kill(2) on our own child, which has not been reaped (try_wait said it runs).
                unsafe { libc::kill(process.child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(2);
                while matches!(process.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = process.child.kill();
            }
            let _ = process.child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = destroy_netns(ns) {
                eprintln!("demo: cleaning up: {e:#}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.work) {
            eprintln!("demo: removing {}: {e}", self.work.display());
        }
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Writes a sysctl inside `ns` (`key` as a path under /proc/sys).
fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    run(
        "ip",
        &["netns", "exec", ns, "sh", "-c", "printf '%s\\n' \"$1\" > \"$2\"", "sh", value, &format!("/proc/sys/{key}")],
    )
    .with_context(|| format!("setting {key} = {value} in {ns}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_demo_namespace_names() {
        assert_eq!(demo_netns_pid("fdemo1234-lan"), Some(1234));
        assert_eq!(demo_netns_pid("fdemo1-rs1"), Some(1));
        assert_eq!(demo_netns_pid("fdemo-rs1"), None);
        assert_eq!(demo_netns_pid("fdemo12a-rs1"), None);
        assert_eq!(demo_netns_pid("fdemo12-"), None);
        assert_eq!(demo_netns_pid("fu12x1-sw"), None);
    }
}
