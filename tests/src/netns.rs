//! Network-namespace testbed: LANs (Linux bridges inside one "switch" namespace) and hosts (one
//! namespace each, joined to LANs by veth pairs).
//!
//! Naming: every namespace of a testbed is called `fu<pid>x<n>-...` where `<pid>` is the test process
//! and `<n>` a per-process counter, so parallel tests (threads and processes) never collide, and a
//! crashed run's leftovers can be recognised (dead `<pid>`) and swept by the next run. No interface is
//! ever created in the root namespace: veth pairs are created inside the switch namespace with the
//! peer placed directly into the host namespace, so interface names only need to be unique per
//! namespace (`eth0`, `eth1` in hosts, `p<n>` bridge ports in the switch).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{check_output, command_line, run, run_command, run_unchecked};
use crate::nginx::Nginx;
use crate::process::ChildGuard;
use crate::wait::wait_until;

/// Every testbed namespace name starts with this, followed by `<pid>x<n>-`.
pub const NETNS_PREFIX: &str = "fu";

const NETNS_DIR: &str = "/run/netns";

static TESTBED_COUNTER: AtomicU32 = AtomicU32::new(0);
static PORT_COUNTER: AtomicU32 = AtomicU32::new(0);
/// `ip netns add` sets up the /run/netns mount on first use; serialise it within the process.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Panics unless the effective uid is 0. Tests that need namespaces call this (via [`Testbed::new`])
/// so that they FAIL, loudly, rather than skip, when not run as root.
pub fn require_root() {
    match effective_uid() {
        Ok(0) => {}
        Ok(uid) => panic!(
            "these tests need root: network namespaces, veth pairs and bridges can only be created by root \
             (effective uid is {uid}); run them as root, e.g. `sudo -E cargo test -p fulcrum-tests`"
        ),
        Err(e) => panic!("these tests need root: network namespaces ...; could not determine the effective uid: {e:#}"),
    }
}

fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("Uid:")).context("no Uid: line in /proc/self/status")?;
    let euid = line.split_whitespace().nth(2).context("malformed Uid: line in /proc/self/status")?;
    euid.parse().with_context(|| format!("malformed Uid: line {line:?}"))
}

/// Parses `"10.0.0.11/24"` into address and prefix length.
pub fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (ip, len) = cidr.split_once('/').with_context(|| format!("{cidr:?} is not of the form a.b.c.d/len"))?;
    let ip: Ipv4Addr = ip.parse().with_context(|| format!("bad IPv4 address in {cidr:?}"))?;
    let len: u8 = len.parse().with_context(|| format!("bad prefix length in {cidr:?}"))?;
    if len > 32 {
        bail!("prefix length {len} > 32 in {cidr:?}");
    }
    Ok((ip, len))
}

/// The pid embedded in a testbed namespace name (`fu<pid>x<n>-...`), if the name is one.
pub fn testbed_netns_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (n, _) = rest.split_once('-')?;
    if !all_digits(pid) || !all_digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a process with this pid exists.
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Names of all named network namespaces (entries of /run/netns).
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes testbed namespaces left behind by processes that no longer exist (crashed or killed
/// runs), killing whatever still runs inside them. Returns the names it deleted.
pub fn sweep_stale_namespaces() -> Result<Vec<String>> {
    let me = std::process::id();
    let mut swept = Vec::new();
    for name in list_netns()? {
        let Some(pid) = testbed_netns_pid(&name) else { continue };
        if pid == me || pid_alive(pid) {
            continue;
        }
        destroy_netns(&name).with_context(|| format!("sweeping stale namespace {name} (pid {pid} is gone)"))?;
        swept.push(name);
    }
    Ok(swept)
}

/// Pids of the processes inside namespace `ns` (`ip netns pids`).
pub fn netns_pids(ns: &str) -> Result<Vec<u32>> {
    let out = run("ip", &["netns", "pids", ns])?;
    out.split_whitespace()
        .map(|p| p.parse().with_context(|| format!("bad pid {p:?} from `ip netns pids {ns}`")))
        .collect()
}

/// SIGKILLs every process inside `ns`, waits for them to be gone, then deletes the namespace.
/// A namespace that does not exist (any more) is not an error.
pub fn destroy_netns(ns: &str) -> Result<()> {
    if !netns_exists(ns) {
        return Ok(());
    }
    kill_until_gone(&format!("the processes in namespace {ns}"), Duration::from_secs(10), || {
        if !netns_exists(ns) {
            return Ok(Vec::new());
        }
        netns_pids(ns)
    })?;
    let out = run_unchecked(Command::new("ip").args(["netns", "delete", ns]))?;
    if !out.status.success() && netns_exists(ns) {
        check_output(&format!("ip netns delete {ns}"), out)?;
    }
    Ok(())
}

/// SIGKILLs the processes `pids` lists until it lists none, for at most `timeout`; `what` names them in the
/// timeout error.
pub(crate) fn kill_until_gone(what: &str, timeout: Duration, mut pids: impl FnMut() -> Result<Vec<u32>>) -> Result<()> {
    wait_until(&format!("{what} to die"), timeout, Duration::from_millis(10), || {
        let pids = pids()?;
        if pids.is_empty() {
            return Ok(true);
        }
        let mut kill = Command::new("kill");
        kill.arg("-KILL").args(pids.iter().map(|p| p.to_string()));
        // Some may already have died: ignore the status, the next poll re-lists.
        run_unchecked(&mut kill)?;
        Ok(false)
    })
}

/// Whether `s` is a non-empty run of ASCII digits (the pid and counter fields of the names experiments give
/// their namespaces and cgroups).
pub(crate) fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn sanitize(hint: &str, max: usize) -> String {
    let s: String =
        hint.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(max).collect();
    if s.is_empty() {
        "tb".to_string()
    } else {
        s
    }
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 40 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("{kind} name {name:?} must be 1-40 characters of [A-Za-z0-9_-]");
    }
    Ok(())
}

fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name.chars().any(char::is_whitespace) {
        bail!("interface name {name:?} must be 1-15 characters without '/' or whitespace (IFNAMSIZ)");
    }
    Ok(())
}

fn ipv6_available() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

/// A broadcast domain: a Linux bridge inside the testbed's switch namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lan {
    name: String,
    bridge: String,
    netns: String,
}

impl Lan {
    /// The name given to [`Testbed::add_lan`] (`"lan"` for the default LAN).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The bridge device (`br0` for the default LAN, `br1`, ... for further ones).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }
    /// The namespace holding the bridge (shared by all LANs of a testbed).
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

/// A set of namespaces forming one test network. Dropping it kills every process left inside its
/// namespaces and deletes them (also when the test panicked).
///
/// `Testbed` is `Sync`: hosts can be added from several threads.
pub struct Testbed {
    prefix: String,
    hint: String,
    switch_ns: String,
    namespaces: Mutex<Vec<String>>,
    lans: Mutex<Vec<Lan>>,
    host_names: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed").field("prefix", &self.prefix).field("hint", &self.hint).finish()
    }
}

impl Testbed {
    /// Creates a testbed with one LAN (`br0`). Panics if not root ([`require_root`]); first sweeps
    /// namespaces left by dead earlier runs ([`sweep_stale_namespaces`]).
    pub fn new(name_hint: &str) -> Result<Testbed> {
        require_root();
        if let Err(e) = sweep_stale_namespaces() {
            eprintln!("[fulcrum-tests] warning: sweeping stale namespaces: {e:#}");
        }
        let n = TESTBED_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NETNS_PREFIX}{}x{n}", std::process::id());
        let hint = sanitize(name_hint, 24);
        let switch_ns = format!("{prefix}-sw-{hint}");
        let tb = Testbed {
            prefix,
            hint,
            switch_ns: switch_ns.clone(),
            namespaces: Mutex::new(Vec::new()),
            lans: Mutex::new(Vec::new()),
            host_names: Mutex::new(HashSet::new()),
        };
        tb.create_netns(&switch_ns).context("creating the testbed's switch namespace")?;
        // A LAN switch does not run the IP firewall on the frames it bridges. Where the kernel has
        // br_netfilter (built in here, `bridge-nf-call-*` = 1 by default) every bridged frame would go through
        // the switch namespace's netfilter hooks: a cost on each hop that no real LAN has, and one that falls
        // twice on a balanced client packet (client → director → server) but once on a direct one.
        if std::path::Path::new("/proc/sys/net/bridge").exists() {
            for key in [
                "net.bridge.bridge-nf-call-iptables",
                "net.bridge.bridge-nf-call-ip6tables",
                "net.bridge.bridge-nf-call-arptables",
            ] {
                write_sysctl(&switch_ns, key, "0")?;
            }
        }
        tb.add_lan("lan")?;
        Ok(tb)
    }

    /// The `fu<pid>x<n>` prefix of all of this testbed's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace holding the bridges.
    pub fn switch_netns(&self) -> &str {
        &self.switch_ns
    }

    /// All namespaces created so far (switch first).
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.namespaces).clone()
    }

    /// The default LAN (`br0`), which [`Testbed::add_host`] attaches hosts to.
    pub fn lan(&self) -> Lan {
        // Invariant: `new` creates the default LAN before returning the testbed.
        lock(&self.lans)[0].clone()
    }

    /// A LAN by the name given to [`Testbed::add_lan`].
    pub fn lan_named(&self, name: &str) -> Option<Lan> {
        lock(&self.lans).iter().find(|l| l.name == name).cloned()
    }

    /// Adds another LAN: a new bridge (`br1`, `br2`, ...) in the switch namespace.
    pub fn add_lan(&self, name: &str) -> Result<Lan> {
        validate_name("LAN", name)?;
        let mut lans = lock(&self.lans);
        if lans.iter().any(|l| l.name == name) {
            bail!("testbed {} already has a LAN named {name:?}", self.prefix);
        }
        let lan = Lan { name: name.to_string(), bridge: format!("br{}", lans.len()), netns: self.switch_ns.clone() };
        let ns = &self.switch_ns;
        let br = &lan.bridge;
        ip_ns(
            ns,
            &["link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0", "mcast_snooping", "0"],
        )
        .with_context(|| format!("creating LAN {name:?}"))?;
        ip_ns(ns, &["link", "set", br, "up"])?;
        lans.push(lan.clone());
        Ok(lan)
    }

    /// Adds a host on the default LAN: namespace `<prefix>-<name>`, `lo` up, `eth0` with `cidr`
    /// (e.g. `"10.0.0.11/24"`) attached to `br0`.
    pub fn add_host(&self, name: &str, cidr: &str) -> Result<Host> {
        self.add_host_on(&self.lan(), name, cidr)
    }

    /// Like [`Testbed::add_host`] but on the given LAN.
    pub fn add_host_on(&self, lan: &Lan, name: &str, cidr: &str) -> Result<Host> {
        let host = self.add_bare_host(name)?;
        host.attach(lan, "eth0", cidr)?;
        Ok(host)
    }

    /// A host namespace with only `lo` (up); attach it to LANs with [`Host::attach`].
    pub fn add_bare_host(&self, name: &str) -> Result<Host> {
        validate_name("host", name)?;
        if !lock(&self.host_names).insert(name.to_string()) {
            bail!("testbed {} already has a host named {name:?}", self.prefix);
        }
        let ns = format!("{}-{name}", self.prefix);
        self.create_netns(&ns).with_context(|| format!("creating host {name:?}"))?;
        Ok(Host {
            inner: Arc::new(HostInner {
                name: name.to_string(),
                netns: ns,
                primary: Mutex::new(None),
                attachments: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Pulls the "cable" of `host`'s interface `iface`: see [`Host::cut`].
    pub fn cut(&self, host: &Host, iface: &str) -> Result<()> {
        host.cut(iface)
    }

    /// Plugs the cable back in: see [`Host::restore`].
    pub fn restore(&self, host: &Host, iface: &str) -> Result<()> {
        host.restore(iface)
    }

    fn create_netns(&self, ns: &str) -> Result<()> {
        {
            let _guard = lock(&NETNS_ADD_LOCK);
            run("ip", &["netns", "add", ns])?;
        }
        // Registered before any further step, so that Drop deletes it whatever fails next.
        lock(&self.namespaces).push(ns.to_string());
        ip_ns(ns, &["link", "set", "lo", "up"])?;
        if ipv6_available() {
            // No IPv6 chatter (RS, MLD, DAD) on the test LANs: keeps packet captures and data planes quiet.
            for key in ["net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"] {
                write_sysctl(ns, key, "1")?;
            }
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let namespaces = std::mem::take(&mut *lock(&self.namespaces));
        for ns in namespaces.iter().rev() {
            if let Err(e) = destroy_netns(ns) {
                eprintln!("[fulcrum-tests] warning: cleaning up testbed {}: {e:#}", self.prefix);
            }
        }
    }
}

/// Runs `ip -n <ns> <args>`.
fn ip_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns]).args(args);
    run_command(&mut cmd)
}

fn netns_exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

fn sysctl_path(key: &str) -> Result<String> {
    if key.is_empty() || key.contains("..") || key.starts_with('/') || key.starts_with('.') {
        bail!("bad sysctl key {key:?}");
    }
    Ok(format!("/proc/sys/{}", key.replace('.', "/")))
}

fn write_sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key)?;
    let mut cmd = netns_exec(ns, "sh");
    cmd.args(["-c", "printf '%s\\n' \"$1\" > \"$2\"", "sh", value, &path]);
    run_command(&mut cmd).with_context(|| format!("setting sysctl {key}={value} in namespace {ns}"))?;
    Ok(())
}

#[derive(Debug)]
struct Attachment {
    iface: String,
    lan: Lan,
    /// The bridge-side end of the veth pair, in the switch namespace.
    port: String,
}

#[derive(Debug)]
struct HostInner {
    name: String,
    netns: String,
    /// The address given to the first [`Host::attach`] (eth0 for `add_host`).
    primary: Mutex<Option<(Ipv4Addr, u8)>>,
    attachments: Mutex<Vec<Attachment>>,
}

/// One host: a network namespace. Cheap to clone (a handle); the namespace belongs to the testbed
/// and lives until the [`Testbed`] is dropped.
#[derive(Clone, Debug)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The namespace name, for `ip netns exec <netns> ...` or `ip -n <netns> ...`.
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// The host's primary address (the one given to `add_host`). Panics for a bare host that has not
    /// been attached to a LAN yet.
    pub fn ip(&self) -> Ipv4Addr {
        self.primary().map(|(ip, _)| ip).unwrap_or_else(|| panic!("host {} has no address yet", self.name()))
    }

    /// The primary address with its prefix length, e.g. `"10.0.0.11/24"`.
    pub fn cidr(&self) -> String {
        let (ip, len) = self.primary().unwrap_or_else(|| panic!("host {} has no address yet", self.name()));
        format!("{ip}/{len}")
    }

    fn primary(&self) -> Option<(Ipv4Addr, u8)> {
        *lock(&self.inner.primary)
    }

    /// MAC address of `eth0` as `aa:bb:cc:dd:ee:ff`, read from the kernel.
    pub fn mac(&self) -> Result<String> {
        self.mac_of("eth0")
    }

    /// MAC address of `iface`, read from the kernel.
    pub fn mac_of(&self, iface: &str) -> Result<String> {
        let link = self.link_json(iface)?;
        link.get("address")
            .and_then(|a| a.as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no address for {iface} in namespace {}: {link}", self.netns()))
    }

    /// Interface index of `iface`.
    pub fn ifindex_of(&self, iface: &str) -> Result<u32> {
        let link = self.link_json(iface)?;
        link.get("ifindex")
            .and_then(|i| i.as_u64())
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| anyhow!("no ifindex for {iface} in namespace {}: {link}", self.netns()))
    }

    /// `ip -j link show dev <iface>` parsed (the one object of the array).
    pub fn link_json(&self, iface: &str) -> Result<serde_json::Value> {
        let out = ip_ns(self.netns(), &["-j", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("parsing `ip -n {} -j link show dev {iface}` output {out:?}", self.netns()))?;
        v.as_array()
            .and_then(|a| a.first())
            .cloned()
            .ok_or_else(|| anyhow!("`ip -n {} -j link show dev {iface}` returned {out:?}", self.netns()))
    }

    /// Operational state of `iface` as the kernel reports it (`"UP"`, `"DOWN"`, `"LOWERLAYERDOWN"`, ...).
    pub fn operstate(&self, iface: &str) -> Result<String> {
        let link = self.link_json(iface)?;
        Ok(link.get("operstate").and_then(|s| s.as_str()).unwrap_or("UNKNOWN").to_string())
    }

    /// A command that runs `program` inside this host's namespace (`ip netns exec <ns> <program>`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_exec(self.netns(), program)
    }

    /// Runs `args[0]` with `args[1..]` in the namespace and returns stdout; a non-zero exit is an error
    /// quoting the command line and stderr.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let (program, rest) = args.split_first().context("Host::run needs at least the program")?;
        let mut cmd = self.command(program);
        cmd.args(rest);
        run_command(&mut cmd)
    }

    /// Like [`Host::run`] but returns the raw output whatever the exit status.
    pub fn run_unchecked<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let (program, rest) = args.split_first().context("Host::run_unchecked needs at least the program")?;
        let mut cmd = self.command(program);
        cmd.args(rest);
        run_unchecked(&mut cmd)
    }

    /// Runs `ip -n <ns> <args>` (faster than `run(&["ip", ...])`).
    pub fn ip_cmd(&self, args: &[&str]) -> Result<String> {
        ip_ns(self.netns(), args)
    }

    /// Starts `cmd` inside the namespace and returns a guard that stops it on drop (SIGTERM, then
    /// SIGKILL after [`crate::process::DROP_GRACE`]). `cmd` may come from [`Host::command`] or be a
    /// plain `Command::new(prog)`; in the latter case it is re-wrapped in `ip netns exec` keeping its
    /// program, arguments, environment changes and working directory. Stdin is `/dev/null`,
    /// stdout/stderr go to log files readable via the guard.
    pub fn spawn(&self, cmd: Command) -> Result<ChildGuard> {
        let cmd = self.in_netns(cmd);
        let label = cmd.get_args().nth(3).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let label = Path::new(&label).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(label);
        ChildGuard::spawn(&format!("{label}@{}", self.name()), cmd)
    }

    fn in_netns(&self, cmd: Command) -> Command {
        let args: Vec<&OsStr> = cmd.get_args().take(3).collect();
        let already = cmd.get_program() == "ip"
            && args.len() == 3
            && args[0] == "netns"
            && args[1] == "exec"
            && args[2] == OsStr::new(self.netns());
        if already {
            return cmd;
        }
        let mut wrapped = self.command(cmd.get_program());
        wrapped.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Joins this host to `lan` with a new interface `iface` (≤ 15 chars) carrying `cidr`
    /// (e.g. `host.attach(&hb, "eth1", "10.9.0.1/24")`). The first attachment's address becomes
    /// the host's primary [`Host::ip`]. Returns once the interface is operationally up.
    pub fn attach(&self, lan: &Lan, iface: &str, cidr: &str) -> Result<()> {
        validate_ifname(iface)?;
        let (ip, len) = parse_cidr(cidr)?;
        let ns = self.netns();
        let port = format!("p{}", PORT_COUNTER.fetch_add(1, Ordering::SeqCst));
        let what = || format!("attaching host {} ({iface} {cidr}) to LAN {:?}", self.name(), lan.name);
        ip_ns(&lan.netns, &["link", "add", &port, "type", "veth", "peer", "name", iface, "netns", ns])
            .with_context(what)?;
        ip_ns(&lan.netns, &["link", "set", &port, "master", &lan.bridge]).with_context(what)?;
        ip_ns(&lan.netns, &["link", "set", &port, "up"]).with_context(what)?;
        ip_ns(ns, &["addr", "add", cidr, "dev", iface]).with_context(what)?;
        ip_ns(ns, &["link", "set", iface, "up"]).with_context(what)?;
        lock(&self.inner.attachments).push(Attachment { iface: iface.to_string(), lan: lan.clone(), port });
        {
            let mut primary = lock(&self.inner.primary);
            if primary.is_none() {
                *primary = Some((ip, len));
            }
        }
        self.wait_operstate(iface, true, Duration::from_secs(10)).with_context(what)
    }

    /// The LAN-side port (in the switch namespace) of this host's interface `iface`.
    fn port_of(&self, iface: &str) -> Result<(Lan, String)> {
        lock(&self.inner.attachments)
            .iter()
            .find(|a| a.iface == iface)
            .map(|a| (a.lan.clone(), a.port.clone()))
            .ok_or_else(|| anyhow!("host {} has no interface {iface:?} attached to a LAN", self.name()))
    }

    /// Pulls the cable of `iface`: sets the bridge-side end of its veth pair down. The host keeps
    /// its addresses and routes, its interface loses carrier (`NO-CARRIER`, operstate
    /// `LOWERLAYERDOWN`) and every frame it sends there is dropped, as is everything towards it.
    /// Returns once the host sees the link down.
    pub fn cut(&self, iface: &str) -> Result<()> {
        let (lan, port) = self.port_of(iface)?;
        ip_ns(&lan.netns, &["link", "set", &port, "down"])
            .with_context(|| format!("cutting {}:{iface}", self.name()))?;
        self.wait_operstate(iface, false, Duration::from_secs(10))
    }

    /// Plugs the cable of `iface` back in (undoes [`Host::cut`]); returns once the link is up again.
    pub fn restore(&self, iface: &str) -> Result<()> {
        let (lan, port) = self.port_of(iface)?;
        ip_ns(&lan.netns, &["link", "set", &port, "up"])
            .with_context(|| format!("restoring {}:{iface}", self.name()))?;
        self.wait_operstate(iface, true, Duration::from_secs(10))
    }

    /// Sets `iface` administratively up or down on the host side (note: taking a link down makes the
    /// kernel drop its routes, unlike [`Host::cut`]).
    pub fn set_link(&self, iface: &str, up: bool) -> Result<()> {
        ip_ns(self.netns(), &["link", "set", iface, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Waits until `iface`'s operstate is `UP` (`up == true`) or anything else (`up == false`).
    pub fn wait_operstate(&self, iface: &str, up: bool, timeout: Duration) -> Result<()> {
        let what = format!("{}:{iface} to be {}", self.name(), if up { "UP" } else { "not UP" });
        wait_until(&what, timeout, Duration::from_millis(10), || Ok((self.operstate(iface)? == "UP") == up))
    }

    /// Adds an address, e.g. `host.add_address("10.0.0.100/32", "lo")` for a VIP.
    pub fn add_address(&self, cidr: &str, dev: &str) -> Result<()> {
        parse_cidr(cidr)?;
        ip_ns(self.netns(), &["addr", "add", cidr, "dev", dev])
            .with_context(|| format!("adding {cidr} to {dev} on host {}", self.name()))?;
        Ok(())
    }

    /// Makes this host a direct-routing real server for `vip`: the VIP on `lo` (it accepts packets for it),
    /// and `arp_ignore=1`, `arp_announce=2` (on `all` and `eth0`), so that it never answers or announces ARP
    /// for the VIP, which only the director may.
    pub fn accept_vip_for_dr(&self, vip: &str) -> Result<()> {
        self.add_address(&format!("{vip}/32"), "lo")?;
        for scope in ["all", "eth0"] {
            self.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
            self.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
        }
        Ok(())
    }

    /// Removes an address added with [`Host::add_address`].
    pub fn del_address(&self, cidr: &str, dev: &str) -> Result<()> {
        ip_ns(self.netns(), &["addr", "del", cidr, "dev", dev])
            .with_context(|| format!("removing {cidr} from {dev} on host {}", self.name()))?;
        Ok(())
    }

    /// Sets a sysctl inside the namespace, e.g. `host.sysctl("net.ipv4.conf.all.arp_ignore", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        write_sysctl(self.netns(), key, value)
    }

    /// Reads a sysctl inside the namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        Ok(self.run(&["cat", &path])?.trim().to_string())
    }

    /// `ip route replace default via <gateway>`.
    pub fn set_default_route(&self, gateway: impl std::fmt::Display) -> Result<()> {
        let gw = gateway.to_string();
        ip_ns(self.netns(), &["route", "replace", "default", "via", &gw])
            .with_context(|| format!("setting the default route of host {} via {gw}", self.name()))?;
        Ok(())
    }

    /// `ip route replace <dest> via <gateway>`.
    pub fn add_route(&self, dest: &str, gateway: impl std::fmt::Display) -> Result<()> {
        let gw = gateway.to_string();
        ip_ns(self.netns(), &["route", "replace", dest, "via", &gw])
            .with_context(|| format!("adding route {dest} via {gw} on host {}", self.name()))?;
        Ok(())
    }

    /// One ping (`ping -c1 -W1`); Ok if answered.
    pub fn ping(&self, ip: impl std::fmt::Display) -> Result<()> {
        let ip = ip.to_string();
        self.run(&["ping", "-n", "-q", "-c1", "-W1", &ip]).with_context(|| {
            format!("ping from {} to {ip} (needs iputils-ping: `apt-get install iputils-ping`)", self.name())
        })?;
        Ok(())
    }

    /// Pings until answered, up to `timeout`.
    pub fn wait_ping(&self, ip: impl std::fmt::Display, timeout: Duration) -> Result<()> {
        let ip = ip.to_string();
        wait_until(
            &format!("{} to get a ping answer from {ip}", self.name()),
            timeout,
            Duration::from_millis(50),
            || self.ping(&ip).map(|_| true),
        )
    }

    /// Is something listening on TCP `port` in this namespace (any address)?
    pub fn tcp_listening(&self, port: u16) -> Result<bool> {
        self.ss_listening("-Hltn", port)
    }

    /// Is a UDP socket bound to `port` in this namespace (any address)?
    pub fn udp_listening(&self, port: u16) -> Result<bool> {
        self.ss_listening("-Hlun", port)
    }

    fn ss_listening(&self, flags: &str, port: u16) -> Result<bool> {
        let mut cmd = Command::new("ss");
        cmd.args(["-N", self.netns(), flags, "sport", "=", &format!(":{port}")]);
        let line = command_line(&cmd);
        let out = check_output(&line, run_unchecked(&mut cmd)?)?;
        Ok(!out.trim().is_empty())
    }

    /// Waits until a TCP socket listens on `port` in this namespace.
    pub fn wait_tcp_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        let what = format!("a TCP listener on port {port} in host {}", self.name());
        wait_until(&what, timeout, Duration::from_millis(20), || self.tcp_listening(port))
    }

    /// Waits until a UDP socket is bound to `port` in this namespace.
    pub fn wait_udp_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        let what = format!("a UDP socket on port {port} in host {}", self.name());
        wait_until(&what, timeout, Duration::from_millis(20), || self.udp_listening(port))
    }

    /// `curl -sS --fail --max-time 10 <extra_args...> <url>` inside the namespace; returns the body.
    /// `--fail` makes HTTP errors (≥ 400) fail. A later `--max-time N` in `extra_args` overrides the
    /// default; use [`Host::curl_raw`] for full control.
    pub fn curl(&self, url: &str, extra_args: &[&str]) -> Result<String> {
        let mut args = vec!["curl", "-sS", "--fail", "--max-time", "10"];
        args.extend_from_slice(extra_args);
        args.push(url);
        self.run(&args)
    }

    /// `curl -sS --max-time 10 <args...>` inside the namespace (no `--fail`, no URL added).
    pub fn curl_raw(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["curl", "-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Starts nginx in this namespace on `0.0.0.0:<port>`; see [`Nginx`].
    pub fn start_nginx(&self, port: u16) -> Result<Nginx> {
        Nginx::start(self, port)
    }
}

/// Runs `f` on a new thread that has entered the network namespace `netns` (only that thread moves), and
/// returns its result. Sockets `f` creates live in that namespace.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = std::path::Path::new("/run/netns").join(netns);
    let handle = std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on a namespace file descriptor we own; it affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        if rc != 0 {
            anyhow::bail!("setns into {}: {}", path.display(), std::io::Error::last_os_error());
        }
        f()
    });
    handle.join().map_err(|_| anyhow::anyhow!("the thread in namespace {netns} panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_testbed_names() {
        assert_eq!(testbed_netns_pid("fu1234x0-sw-foo"), Some(1234));
        assert_eq!(testbed_netns_pid("fu1x22-h1"), Some(1));
        assert_eq!(testbed_netns_pid("fu1234x-h1"), None);
        assert_eq!(testbed_netns_pid("fux1-h1"), None);
        assert_eq!(testbed_netns_pid("fu12a4x1-h1"), None);
        assert_eq!(testbed_netns_pid("fu1234x1"), None);
        assert_eq!(testbed_netns_pid("foo"), None);
    }

    #[test]
    fn parses_cidrs() {
        assert_eq!(parse_cidr("10.0.0.11/24").unwrap(), (Ipv4Addr::new(10, 0, 0, 11), 24));
        assert!(parse_cidr("10.0.0.11").is_err());
        assert!(parse_cidr("10.0.0.300/24").is_err());
        assert!(parse_cidr("10.0.0.1/33").is_err());
    }

    #[test]
    fn sysctl_paths() {
        assert_eq!(sysctl_path("net.ipv4.conf.all.arp_ignore").unwrap(), "/proc/sys/net/ipv4/conf/all/arp_ignore");
        assert!(sysctl_path("../etc").is_err());
    }
}
