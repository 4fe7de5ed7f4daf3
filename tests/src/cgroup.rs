//! CPU cgroups with a CFS bandwidth quota, for experiments with real servers of unequal capacity.
//!
//! [`CpuCgroup::create`] makes a cgroup directly under the root of the CPU hierarchy, named
//! `/fulcrum-<pid>-<n>-<hint>` (unique per process, so parallel tests do not collide), in cgroup v1 (both the
//! `cpu` and the `cpuacct` hierarchies, co-mounted or not) or, where no v1 CPU controllers are mounted, in
//! cgroup v2 (enabling the `cpu` controller in the root's `cgroup.subtree_control`). The choice is the agent's
//! (`agent/src/sample/cgroup.rs`): v1 when both v1 controllers are mounted, else v2. Dropping the cgroup moves
//! whatever still runs in it back to the root and removes it. A run that was killed cannot drop its cgroups;
//! the next [`CpuCgroup::create`] removes those of processes that no longer exist, killing what still runs in
//! them ([`sweep_stale_cgroups`]), as [`crate::Testbed::new`] sweeps stale namespaces.
//!
//! `ip netns exec` remounts `/sys` for the namespace, which hides `/sys/fs/cgroup`: a process that must read
//! its cgroup (an agent with `cpu.source = "cgroup"`) is started with [`netns_command_keeping_mounts`]
//! (`nsenter --net`), which changes the network namespace only.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Where the kernel keeps the CPU accounting and the limit of one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupDirs {
    /// Limit in `<cpu>/cpu.cfs_{quota,period}_us`, usage in `<cpuacct>/cpuacct.usage` (one directory when the
    /// controllers are co-mounted).
    V1 { cpu: PathBuf, cpuacct: PathBuf },
    /// Limit in `<dir>/cpu.max`, usage in `<dir>/cpu.stat`.
    V2 { dir: PathBuf },
}

impl CgroupDirs {
    /// Every directory of the cgroup (one when the v1 controllers are co-mounted).
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            CgroupDirs::V1 { cpu, cpuacct } if cpu == cpuacct => vec![cpu.clone()],
            CgroupDirs::V1 { cpu, cpuacct } => vec![cpu.clone(), cpuacct.clone()],
            CgroupDirs::V2 { dir } => vec![dir.clone()],
        }
    }
}

/// The mount points of the CPU controllers, read from a mountinfo text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuMounts {
    pub v1_cpu: Option<PathBuf>,
    pub v1_cpuacct: Option<PathBuf>,
    pub v2: Option<PathBuf>,
}

impl CpuMounts {
    /// Parses `/proc/self/mountinfo` lines: `id parent maj:min root mount-point options … - fstype source
    /// super-options`. Only hierarchies mounted at their root (`root` = `/`) are used.
    pub fn parse(mountinfo: &str) -> CpuMounts {
        let mut mounts = CpuMounts::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(&root), Some(&point), Some(&fstype)) = (left.get(3), left.get(4), right.first()) else {
                continue;
            };
            if root != "/" {
                continue;
            }
            let point = PathBuf::from(point);
            match fstype {
                "cgroup" => {
                    let options: Vec<&str> = right.get(2).map(|o| o.split(',').collect()).unwrap_or_default();
                    if options.contains(&"cpu") && mounts.v1_cpu.is_none() {
                        mounts.v1_cpu = Some(point.clone());
                    }
                    if options.contains(&"cpuacct") && mounts.v1_cpuacct.is_none() {
                        mounts.v1_cpuacct = Some(point);
                    }
                }
                "cgroup2" if mounts.v2.is_none() => mounts.v2 = Some(point),
                _ => {}
            }
        }
        mounts
    }

    /// This machine's, from `/proc/self/mountinfo`.
    pub fn of_this_machine() -> Result<CpuMounts> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        Ok(CpuMounts::parse(&text))
    }

    /// The directories a cgroup named `name` (`/a/b`) has, v1 when both v1 controllers are mounted.
    pub fn dirs_of(&self, name: &str) -> Result<CgroupDirs> {
        let rel = name.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            bail!("bad cgroup name {name:?}: want /a/b without empty, . or .. components");
        }
        match (&self.v1_cpu, &self.v1_cpuacct, &self.v2) {
            (Some(cpu), Some(acct), _) => Ok(CgroupDirs::V1 { cpu: cpu.join(rel), cpuacct: acct.join(rel) }),
            (_, _, Some(v2)) => Ok(CgroupDirs::V2 { dir: v2.join(rel) }),
            _ => bail!("no CPU cgroup hierarchy is mounted (neither v1 cpu + cpuacct nor cgroup2)"),
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A cgroup made for an experiment; removed on drop.
#[derive(Debug)]
pub struct CpuCgroup {
    name: String,
    dirs: CgroupDirs,
    /// The root cgroup's `cgroup.procs` files, where leftover processes go on drop.
    root_procs: Vec<PathBuf>,
}

impl CpuCgroup {
    /// Creates `/fulcrum-<pid>-<n>-<hint>` with no limit.
    pub fn create(hint: &str) -> Result<CpuCgroup> {
        crate::require_root();
        let hint: String = hint.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(24).collect();
        let name = format!("/fulcrum-{}-{}-{hint}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mounts = CpuMounts::of_this_machine()?;
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            if let Err(e) = sweep_stale_cgroups(&mounts) {
                eprintln!("[fulcrum-tests] warning: sweeping stale cgroups: {e:#}");
            }
        });
        let dirs = mounts.dirs_of(&name)?;
        let root_procs = match (&dirs, &mounts) {
            (CgroupDirs::V1 { .. }, CpuMounts { v1_cpu: Some(cpu), v1_cpuacct: Some(acct), .. }) => {
                let mut v = vec![cpu.join("cgroup.procs")];
                if acct != cpu {
                    v.push(acct.join("cgroup.procs"));
                }
                v
            }
            (_, CpuMounts { v2: Some(v2), .. }) => {
                // Children of the root get the cpu controller only once the root hands it down.
                let controllers = read(&v2.join("cgroup.controllers"))?;
                if !controllers.split_whitespace().any(|c| c == "cpu") {
                    bail!("the cgroup2 hierarchy at {} has no cpu controller ({controllers:?})", v2.display());
                }
                write(&v2.join("cgroup.subtree_control"), "+cpu")?;
                vec![v2.join("cgroup.procs")]
            }
            _ => bail!("no CPU cgroup hierarchy is mounted"),
        };
        let cgroup = CpuCgroup { name, dirs, root_procs };
        for dir in cgroup.dirs.paths() {
            std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        Ok(cgroup)
    }

    /// The cgroup's name as in `/proc/<pid>/cgroup` (what the agent's `cpu.cgroup` takes).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dirs(&self) -> &CgroupDirs {
        &self.dirs
    }

    /// Limits the cgroup to `cores` CPUs (e.g. 0.1 = 10 % of one core) per CFS `period` (1 ms … 1 s). The
    /// quota must come to at least 1 ms per period (the kernel's minimum).
    pub fn set_quota(&self, cores: f64, period: Duration) -> Result<()> {
        let (quota_us, period_us) = quota_us(cores, period)?;
        match &self.dirs {
            CgroupDirs::V1 { cpu, .. } => {
                // The period first: a quota is checked against the current period.
                write(&cpu.join("cpu.cfs_period_us"), &period_us.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())
            }
            CgroupDirs::V2 { dir } => write(&dir.join("cpu.max"), &format!("{quota_us} {period_us}")),
        }
    }

    /// The limit in force, in CPUs; `None` when unlimited.
    pub fn quota(&self) -> Result<Option<f64>> {
        let (quota, period) = match &self.dirs {
            CgroupDirs::V1 { cpu, .. } => (
                read(&cpu.join("cpu.cfs_quota_us"))?.trim().to_string(),
                read(&cpu.join("cpu.cfs_period_us"))?.trim().to_string(),
            ),
            CgroupDirs::V2 { dir } => {
                let max = read(&dir.join("cpu.max"))?;
                let mut it = max.split_whitespace();
                let quota = it.next().unwrap_or("max").to_string();
                (quota, it.next().unwrap_or("100000").to_string())
            }
        };
        if quota == "max" || quota.starts_with('-') {
            return Ok(None);
        }
        let quota: f64 = quota.parse().with_context(|| format!("bad quota {quota:?} in cgroup {}", self.name))?;
        let period: f64 = period.parse().with_context(|| format!("bad period {period:?} in cgroup {}", self.name))?;
        Ok(Some(quota / period))
    }

    /// Moves one process (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        for dir in self.dirs.paths() {
            write(&dir.join("cgroup.procs"), &pid.to_string())
                .with_context(|| format!("moving process {pid} into cgroup {}", self.name))?;
        }
        Ok(())
    }

    /// Moves a process and all its descendants (e.g. an nginx master and its workers) into the cgroup.
    ///
    /// The parent moves first: a child it forks from then on is born in the cgroup, and every child forked
    /// before is found by the scan that follows.
    pub fn add_process_tree(&self, pid: u32) -> Result<()> {
        self.add_process(pid)?;
        for child in descendants(pid)? {
            self.add_process(child)?;
        }
        Ok(())
    }

    /// The processes in the cgroup.
    pub fn processes(&self) -> Result<Vec<u32>> {
        let dir = self.dirs.paths().into_iter().next().context("a cgroup has a directory")?;
        pids_in(&dir.join("cgroup.procs"))
    }

    /// CPU time used by the cgroup's tasks since it was made.
    pub fn usage(&self) -> Result<Duration> {
        match &self.dirs {
            CgroupDirs::V1 { cpuacct, .. } => {
                let path = cpuacct.join("cpuacct.usage");
                let text = read(&path)?;
                let ns: u64 = text.trim().parse().with_context(|| format!("bad {} {text:?}", path.display()))?;
                Ok(Duration::from_nanos(ns))
            }
            CgroupDirs::V2 { dir } => {
                let us = stat_field(&dir.join("cpu.stat"), "usage_usec")?;
                Ok(Duration::from_micros(us))
            }
        }
    }

    /// How many CFS periods the cgroup was throttled in (its quota ran out): proof that the quota bites.
    pub fn throttled_periods(&self) -> Result<u64> {
        match &self.dirs {
            CgroupDirs::V1 { cpu, .. } => stat_field(&cpu.join("cpu.stat"), "nr_throttled"),
            CgroupDirs::V2 { dir } => stat_field(&dir.join("cpu.stat"), "nr_throttled"),
        }
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // Leftover processes (a caller that let one outlive the cgroup) go back to the root: rmdir needs it empty.
        for pid in self.processes().unwrap_or_default() {
            for procs in &self.root_procs {
                let _ = std::fs::write(procs, pid.to_string());
            }
        }
        for dir in self.dirs.paths() {
            if let Err(e) = std::fs::remove_dir(&dir) {
                eprintln!("fulcrum-tests: could not remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// The pid of the process that made a cgroup named `fulcrum-<pid>-<n>-<hint>` (see [`CpuCgroup::create`]); `None`
/// for any other name.
pub fn experiment_cgroup_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("fulcrum-")?;
    let mut parts = rest.splitn(3, '-');
    let (pid, n) = (parts.next()?, parts.next()?);
    parts.next()?;
    if !crate::netns::all_digits(pid) || !crate::netns::all_digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the experiment cgroups (under the root of every CPU hierarchy in `mounts`) whose process no longer
/// exists: a run killed before it could drop them. What still runs in one is killed first, since it belongs
/// to that run (a server, a CPU antagonist) and would go on using CPU. Returns the directories removed.
pub fn sweep_stale_cgroups(mounts: &CpuMounts) -> Result<Vec<PathBuf>> {
    let me = std::process::id();
    let mut roots: Vec<&PathBuf> = [&mounts.v1_cpu, &mounts.v1_cpuacct, &mounts.v2].into_iter().flatten().collect();
    roots.dedup();
    let mut removed = Vec::new();
    for root in roots {
        let entries = std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))?;
        for entry in entries {
            let dir = entry.with_context(|| format!("listing {}", root.display()))?.path();
            let Some(pid) = dir.file_name().and_then(|n| n.to_str()).and_then(experiment_cgroup_pid) else { continue };
            if pid == me || crate::netns::pid_alive(pid) || !dir.is_dir() {
                continue;
            }
            let procs = dir.join("cgroup.procs");
            crate::netns::kill_until_gone(
                &format!("the processes in stale cgroup {}", dir.display()),
                Duration::from_secs(5),
                || pids_in(&procs),
            )?;
            std::fs::remove_dir(&dir).with_context(|| format!("removing stale cgroup {}", dir.display()))?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

/// The kernel's smallest CFS quota per period.
const MIN_QUOTA_US: f64 = 1_000.0;

/// Which CFS period a cgroup's quota is given in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CfsPeriod {
    /// The same period whatever the quota.
    Fixed(Duration),
    /// The shortest period in which the quota comes to the kernel's 1 ms minimum (20 ms for 5 % of a core, 5 ms
    /// for 20 %, 1 ms from one core up): a cgroup that spent its quota waits at most one period for the next,
    /// so the shorter the period, the less a small server stalls between bursts at full speed, the way no real
    /// server of that size does. Changing the quota changes the period with it.
    Shortest,
}

impl CfsPeriod {
    /// The period for a quota of `cores`.
    pub fn for_quota(self, cores: f64) -> Result<Duration> {
        match self {
            CfsPeriod::Fixed(period) => Ok(period),
            CfsPeriod::Shortest => {
                check_cores(cores)?;
                let period_us = (MIN_QUOTA_US / cores).ceil().max(MIN_QUOTA_US);
                if period_us > 1_000_000.0 {
                    bail!("{cores} cores would need a CFS period over 1 s to reach the kernel's 1 ms minimum quota");
                }
                Ok(Duration::from_micros(period_us as u64))
            }
        }
    }
}

/// A quota must be a positive, finite number of cores.
fn check_cores(cores: f64) -> Result<()> {
    if !(cores.is_finite() && cores > 0.0) {
        bail!("a CPU quota must be a positive number of cores, not {cores}");
    }
    Ok(())
}

/// `cores` per `period` as whole microseconds (quota, period), checked against the kernel's bounds.
pub fn quota_us(cores: f64, period: Duration) -> Result<(u64, u64)> {
    let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX);
    if !(1_000..=1_000_000).contains(&period_us) {
        bail!("a CFS period must be 1 ms … 1 s, not {period:?}");
    }
    check_cores(cores)?;
    let quota_us = (cores * period_us as f64).round() as u64;
    if (quota_us as f64) < MIN_QUOTA_US {
        bail!(
            "{cores} cores per {period:?} is {quota_us} µs, under the kernel's 1 ms minimum quota: use a longer period"
        );
    }
    Ok((quota_us, period_us))
}

/// The processes whose parent chain leads to `pid` (not `pid` itself), from `/proc/*/stat`.
pub fn descendants(pid: u32) -> Result<Vec<u32>> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the command name (which may hold spaces and parentheses): state, ppid, …
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|f| f.parse::<u32>().ok()) {
            parents.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    Ok(found)
}

/// A command that runs `program` in the network namespace `netns` and nothing else: unlike `ip netns exec`
/// (see [`crate::Host::command`]), it keeps this process's mounts, so `/sys/fs/cgroup` stays visible.
pub fn netns_command_keeping_mounts(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}")).arg("--").arg(program);
    cmd
}

/// The pids listed in a `cgroup.procs` file.
fn pids_in(procs: &Path) -> Result<Vec<u32>> {
    Ok(read(procs)?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn stat_field(path: &Path, key: &str) -> Result<u64> {
    let text = read(path)?;
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .ok_or_else(|| anyhow!("no {key} in {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("bad {key} in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn separate_v1_controllers_are_preferred_to_a_hybrid_cgroup2() {
        let m = CpuMounts::parse(HYBRID);
        assert_eq!(m.v1_cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(m.v1_cpuacct.as_deref(), Some(Path::new("/sys/fs/cgroup/cpuacct")));
        assert_eq!(
            m.dirs_of("/fulcrum-1-0-rs1").unwrap(),
            CgroupDirs::V1 {
                cpu: PathBuf::from("/sys/fs/cgroup/cpu/fulcrum-1-0-rs1"),
                cpuacct: PathBuf::from("/sys/fs/cgroup/cpuacct/fulcrum-1-0-rs1"),
            }
        );
    }

    #[test]
    fn co_mounted_v1_and_pure_v2() {
        let co = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let m = CpuMounts::parse(co);
        assert_eq!(m.v1_cpu, m.v1_cpuacct);
        let v2 = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = CpuMounts::parse(v2);
        assert_eq!(m.dirs_of("/x").unwrap(), CgroupDirs::V2 { dir: PathBuf::from("/sys/fs/cgroup/x") });
        // A hierarchy mounted from below its root (a container's view) is not used.
        let sub = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(CpuMounts::parse(sub), CpuMounts::default());
        assert!(CpuMounts::default().dirs_of("/x").is_err());
        assert!(m.dirs_of("/a/../b").is_err());
        assert!(m.dirs_of("/").is_err());
    }

    #[test]
    fn quotas_respect_the_kernel_bounds() {
        assert_eq!(quota_us(0.1, Duration::from_millis(20)).unwrap(), (2_000, 20_000));
        assert_eq!(quota_us(1.5, Duration::from_millis(100)).unwrap(), (150_000, 100_000));
        assert!(quota_us(0.01, Duration::from_millis(20)).is_err(), "200 µs is under the minimum");
        assert!(quota_us(0.5, Duration::from_secs(2)).is_err());
        assert!(quota_us(0.0, Duration::from_millis(20)).is_err());
        assert!(quota_us(f64::NAN, Duration::from_millis(20)).is_err());
    }

    #[test]
    fn the_shortest_period_gives_the_minimum_quota() {
        let ms = Duration::from_millis;
        for (cores, period) in [(0.05, ms(20)), (0.1, ms(10)), (0.2, ms(5)), (1.0, ms(1)), (4.0, ms(1))] {
            assert_eq!(CfsPeriod::Shortest.for_quota(cores).unwrap(), period, "{cores} cores");
            assert!(quota_us(cores, period).is_ok(), "{cores} cores in {period:?}");
        }
        // A share that divides 1 ms unevenly rounds the period up, never the quota under 1 ms.
        let odd = CfsPeriod::Shortest.for_quota(0.3).unwrap();
        assert_eq!(odd, Duration::from_micros(3_334));
        assert_eq!(quota_us(0.3, odd).unwrap(), (1_000, 3_334));
        assert!(CfsPeriod::Shortest.for_quota(0.0005).is_err(), "it would take a 2 s period");
        assert!(CfsPeriod::Shortest.for_quota(0.0).is_err());
        assert!(CfsPeriod::Shortest.for_quota(f64::INFINITY).is_err());
        assert_eq!(CfsPeriod::Fixed(ms(20)).for_quota(0.2).unwrap(), ms(20));
    }

    #[test]
    fn only_experiment_cgroup_names_give_a_pid() {
        assert_eq!(experiment_cgroup_pid("fulcrum-30179-2-rs3"), Some(30179));
        assert_eq!(experiment_cgroup_pid("fulcrum-7-0-stale-one"), Some(7));
        for other in
            ["fulcrum-30179-2", "fulcrum-x-2-rs3", "fulcrum-1-y-rs3", "system.slice", "fulcrum--0-a", "user-1-0-a"]
        {
            assert_eq!(experiment_cgroup_pid(other), None, "{other}");
        }
    }

    /// A run killed before it dropped its cgroups: the sweep kills what still runs in them and removes them,
    /// and leaves this process's own.
    #[test]
    fn stale_cgroups_of_dead_runs_are_swept() {
        crate::require_root();
        let mut exited = Command::new("true").spawn().unwrap();
        let dead = exited.id();
        exited.wait().unwrap();
        // Creating one sweeps once per process: do that first, so that the sweep below is the one that meets
        // the stale cgroup.
        let mine = CpuCgroup::create("mine").unwrap();
        let mounts = CpuMounts::of_this_machine().unwrap();
        let stale_dirs = mounts.dirs_of(&format!("/fulcrum-{dead}-0-stale")).unwrap().paths();
        for dir in &stale_dirs {
            std::fs::create_dir(dir).unwrap();
        }
        let mut leftover = Command::new("sleep").arg("600").spawn().unwrap();
        for dir in &stale_dirs {
            write(&dir.join("cgroup.procs"), &leftover.id().to_string()).unwrap();
        }
        let removed = sweep_stale_cgroups(&mounts).unwrap();
        for dir in &stale_dirs {
            assert!(removed.contains(dir), "{} not in {removed:?}", dir.display());
            assert!(!dir.exists(), "{} is still there", dir.display());
        }
        assert!(!leftover.wait().unwrap().success(), "the leftover process was killed");
        assert!(mine.dirs.paths().iter().all(|d| d.exists()), "this process's own cgroup was left alone");
    }
}
