//! A cgroup's CPU use relative to what it may use, for cgroup v1 (cpuacct + cpu controllers) and v2.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use fulcrum_protocol::CpuSource;

use super::{read_if_present, SampleError};

pub const PROC_SELF_MOUNTINFO: &str = "/proc/self/mountinfo";
pub const SYS_CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

/// The period the kernel uses when a v2 cgroup has no `cpu.max` (only meaningful alongside an unlimited quota).
const DEFAULT_PERIOD_US: u64 = 100_000;

/// Where a cgroup's CPU accounting lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupCpu {
    /// Usage in `<cpuacct_dir>/cpuacct.usage`, limit in `<cpu_dir>/cpu.cfs_{quota,period}_us`. The two are the
    /// same directory when the controllers are co-mounted (`cpu,cpuacct`). `cpuset_dir` is the cgroup of the same
    /// name in the v1 cpuset hierarchy, when one is mounted: v1 keeps each controller's tree apart, and the tools
    /// that confine a service to some CPUs (Docker, LXC, libcgroup) name its cgroup alike in every hierarchy.
    V1 { cpuacct_dir: PathBuf, cpu_dir: PathBuf, cpuset_dir: Option<PathBuf> },
    /// Usage in `<dir>/cpu.stat` (`usage_usec`), limit in `<dir>/cpu.max`.
    V2 { dir: PathBuf },
}

/// A CFS bandwidth limit: `quota_us` of CPU time per `period_us` of wall time, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

impl CpuLimit {
    pub const UNLIMITED: CpuLimit = CpuLimit { quota_us: None, period_us: DEFAULT_PERIOD_US };

    /// Whether `self` allows less CPU than `other` (`quota / period` smaller; no quota allows the most).
    fn tighter_than(self, other: CpuLimit) -> bool {
        match (self.quota_us, other.quota_us) {
            (Some(q), Some(o)) => {
                u128::from(q) * u128::from(other.period_us) < u128::from(o) * u128::from(self.period_us)
            }
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// One reading of a cgroup's cumulative CPU use and its current limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupReading {
    /// CPU time used by the cgroup's tasks since it was created, in nanoseconds.
    pub usage_ns: u64,
    /// The tightest CFS limit on the cgroup or any of its ancestors: a quota on a parent (a systemd slice's
    /// `CPUQuota=`, a container's) binds the cgroups below it as much as one of their own.
    pub limit: CpuLimit,
    /// The CPUs its cpuset lets it run on (v2 `cpuset.cpus.effective`, v1 `cpuset.effective_cpus`); `None` when
    /// not known (no cpuset controller, or on v1 no cgroup of that name in the cpuset hierarchy), and then every
    /// online CPU counts.
    pub cpuset_cpus: Option<u32>,
}

impl CgroupCpu {
    /// Finds a cgroup from either a directory inside a mounted cgroup hierarchy (e.g.
    /// `/sys/fs/cgroup/cpu,cpuacct/fulcrum/web1`) or a cgroup name as in /proc/<pid>/cgroup (`/fulcrum/web1`),
    /// using this process's /proc/self/mountinfo, and checks that its files can be read.
    pub fn locate(path_or_name: &str) -> Result<CgroupCpu, SampleError> {
        let mountinfo_path = Path::new(PROC_SELF_MOUNTINFO);
        let mountinfo = super::read_text(mountinfo_path)?;
        // Resolve symlinks such as /sys/fs/cgroup/cpu -> cpu,cpuacct so that the path matches a mount point.
        let resolved = match std::fs::canonicalize(path_or_name) {
            Ok(real) if Path::new(path_or_name).is_absolute() => real.to_string_lossy().into_owned(),
            _ => path_or_name.to_owned(),
        };
        let cgroup = CgroupCpu::locate_in(&mountinfo, &resolved)?;
        cgroup.read()?;
        Ok(cgroup)
    }

    /// The pure part of [`CgroupCpu::locate`]: resolves `path_or_name` against the text of a mountinfo file.
    ///
    /// A path that lies under a cgroup mount point is turned into the cgroup's name first, so that for v1 both
    /// the cpuacct and the cpu directory can be found even if only one of them was given. The version is v2 if
    /// the path is inside the cgroup2 mount; otherwise v1 when both the cpu and the cpuacct controllers are
    /// mounted as v1 hierarchies (on a "hybrid" host the cgroup2 mount at /sys/fs/cgroup/unified has no CPU
    /// controller), else v2 when a cgroup2 hierarchy is mounted.
    pub fn locate_in(mountinfo: &str, path_or_name: &str) -> Result<CgroupCpu, SampleError> {
        let mounts = parse_mountinfo(mountinfo)?;
        let not_found = |what: String| SampleError::Cgroup { name: path_or_name.to_owned(), what };
        let given = normalise(path_or_name).ok_or_else(|| not_found("the name contains \"..\"".into()))?;
        let v1_cpu = mounts.iter().find(|m| m.is_v1_with("cpu"));
        let v1_acct = mounts.iter().find(|m| m.is_v1_with("cpuacct"));
        let v2 = mounts.iter().find(|m| m.fstype == "cgroup2");
        let v1_cpuset = mounts.iter().find(|m| m.is_v1_with("cpuset"));

        let name_under = |mount: Option<&Mount>| mount.and_then(|m| m.name_of(&given));
        if let Some(name) = name_under(v2) {
            return v2
                .and_then(|m| m.dir_of(&name))
                .map(|dir| CgroupCpu::V2 { dir })
                .ok_or_else(|| not_found("not inside the cgroup2 mount".into()));
        }
        let name = name_under(v1_acct).or_else(|| name_under(v1_cpu)).unwrap_or(given);
        match (v1_acct, v1_cpu, v2) {
            (Some(acct), Some(cpu), _) => {
                let cpuacct_dir = acct.dir_of(&name).ok_or_else(|| {
                    not_found(format!("outside the part of the cpuacct hierarchy mounted at {}", acct.point.display()))
                })?;
                let cpu_dir = cpu.dir_of(&name).ok_or_else(|| {
                    not_found(format!("outside the part of the cpu hierarchy mounted at {}", cpu.point.display()))
                })?;
                Ok(CgroupCpu::V1 { cpuacct_dir, cpu_dir, cpuset_dir: v1_cpuset.and_then(|m| m.dir_of(&name)) })
            }
            (_, _, Some(v2)) => v2.dir_of(&name).map(|dir| CgroupCpu::V2 { dir }).ok_or_else(|| {
                not_found(format!("outside the part of the cgroup2 hierarchy mounted at {}", v2.point.display()))
            }),
            _ => Err(not_found(
                "neither cgroup v1 cpu and cpuacct hierarchies nor a cgroup2 hierarchy is mounted".into(),
            )),
        }
    }

    /// What a [`fulcrum_protocol::CpuUsage`] from this cgroup reports as its source.
    pub fn source(&self) -> CpuSource {
        match self {
            CgroupCpu::V1 { .. } => CpuSource::CgroupV1,
            CgroupCpu::V2 { .. } => CpuSource::CgroupV2,
        }
    }

    /// The cgroup's own CPU pressure file: v2's `cpu.pressure`. `None` for v1, whose cgroups have no PSI (the
    /// sampler derives the pressure from [`CgroupCpu::read_throttled_ns`] there); the host's pressure would
    /// describe the cgroup's neighbours, not the cgroup.
    pub fn pressure_file(&self) -> Option<PathBuf> {
        match self {
            CgroupCpu::V1 { .. } => None,
            CgroupCpu::V2 { dir } => Some(dir.join("cpu.pressure")),
        }
    }

    /// Nanoseconds for which the CFS quota has held the cgroup's runnable tasks back: v1's `cpu.stat`
    /// `throttled_time`, the stand-in for the PSI that v1 cgroups lack (v2's `cpu.pressure` counts throttled
    /// tasks as stalled too). `None` for v2, and for a v1 kernel without CFS bandwidth control (no `cpu.stat`
    /// or no such line). Summed over the cgroup's CPUs by the kernel.
    pub fn read_throttled_ns(&self) -> Result<Option<u64>, SampleError> {
        match self {
            CgroupCpu::V2 { .. } => Ok(None),
            CgroupCpu::V1 { cpu_dir, .. } => {
                let stat = cpu_dir.join("cpu.stat");
                match read_if_present(&stat)? {
                    Some(text) => cpu_stat_value(&text, &stat, "throttled_time"),
                    None => Ok(None),
                }
            }
        }
    }

    /// Reads the cumulative usage and the current limit.
    pub fn read(&self) -> Result<CgroupReading, SampleError> {
        match self {
            CgroupCpu::V1 { cpuacct_dir, cpu_dir, cpuset_dir } => {
                let usage = cpuacct_dir.join("cpuacct.usage");
                let limit_in = |dir: &Path, quota_text: String| -> Result<CpuLimit, SampleError> {
                    let (quota, period) = (dir.join("cpu.cfs_quota_us"), dir.join("cpu.cfs_period_us"));
                    Ok(CpuLimit {
                        quota_us: parse_cfs_quota_us(&quota_text, &quota)?,
                        period_us: parse_cfs_period_us(&super::read_text(&period)?, &period)?,
                    })
                };
                // The cgroup's own limit files must be there (they are in every cgroup of the cpu hierarchy);
                // an ancestor without them limits nothing.
                let own_quota = cpu_dir.join("cpu.cfs_quota_us");
                let own = limit_in(cpu_dir, super::read_text(&own_quota)?)?;
                let limit = tightest_limit(cpu_dir, own, |dir| {
                    read_if_present(&dir.join("cpu.cfs_quota_us"))?.map(|text| limit_in(dir, text)).transpose()
                })?;
                let cpuset_cpus = match cpuset_dir {
                    Some(dir) => cpuset_cpus(dir, V1_CPUSET_FILES)?,
                    None => None,
                };
                Ok(CgroupReading {
                    usage_ns: parse_cpuacct_usage(&super::read_text(&usage)?, &usage)?,
                    limit,
                    cpuset_cpus,
                })
            }
            CgroupCpu::V2 { dir } => {
                let stat = dir.join("cpu.stat");
                let usage_us = parse_cpu_stat_usage_usec(&super::read_text(&stat)?, &stat)?;
                // The root cgroup has no cpu.max, and neither has a cgroup whose parent does not enable the cpu
                // controller for it; nothing of its own limits it then.
                let limit_in = |dir: &Path| {
                    let max = dir.join("cpu.max");
                    read_if_present(&max)?.map(|text| parse_cpu_max(&text, &max)).transpose()
                };
                let limit = tightest_limit(dir, limit_in(dir)?.unwrap_or(CpuLimit::UNLIMITED), limit_in)?;
                Ok(CgroupReading {
                    usage_ns: usage_us.saturating_mul(1_000),
                    limit,
                    cpuset_cpus: cpuset_cpus(dir, V2_CPUSET_FILES)?,
                })
            }
        }
    }
}

/// The cpuset files of cgroup v2: the CPUs in effect.
const V2_CPUSET_FILES: &[&str] = &["cpuset.cpus.effective"];
/// The cpuset files of cgroup v1: the CPUs in effect, or on kernels before 3.17, which lack that file, the
/// configured ones.
const V1_CPUSET_FILES: &[&str] = &["cpuset.effective_cpus", "cpuset.cpus"];

/// The CPUs of a cgroup's cpuset, from the first of `files` it has that lists any: its own, or, where it has
/// none (v2 with the cpuset controller off: a slice's `AllowedCPUs=` binds it; v1 with no cgroup of that name
/// in the cpuset hierarchy), its nearest ancestor's; `None` when no cgroup up the tree has one.
fn cpuset_cpus(dir: &Path, files: &[&str]) -> Result<Option<u32>, SampleError> {
    // On v1 the cgroup, and its parents, may not exist in the cpuset hierarchy at all: start from the nearest
    // directory that does.
    let Some(nearest) = dir.ancestors().find(|up| up.is_dir()) else {
        return Ok(None);
    };
    for cgroup in std::iter::once(nearest).chain(ancestors(nearest)) {
        for file in files {
            let file = cgroup.join(file);
            if let Some(text) = read_if_present(&file)?.filter(|text| !text.trim().is_empty()) {
                return parse_cpu_list(&text, &file).map(Some);
            }
        }
    }
    Ok(None)
}

/// The ancestors of cgroup `dir` in its hierarchy, nearest first: each parent directory that is a cgroup (has
/// a `cgroup.procs`, as every cgroup does, the root included; the directory holding the mount does not).
fn ancestors(dir: &Path) -> impl Iterator<Item = &Path> {
    std::iter::successors(dir.parent(), |up| up.parent()).take_while(|up| up.join("cgroup.procs").exists())
}

/// The tightest of `own` (the limit of cgroup `dir` itself) and the limits `limit_of` reads on its
/// [`ancestors`]; `limit_of` gives `None` for a directory without a limit file.
fn tightest_limit(
    dir: &Path,
    own: CpuLimit,
    limit_of: impl Fn(&Path) -> Result<Option<CpuLimit>, SampleError>,
) -> Result<CpuLimit, SampleError> {
    let mut tightest = own;
    for up in ancestors(dir) {
        if let Some(limit) = limit_of(up)?.filter(|limit| limit.tighter_than(tightest)) {
            tightest = limit;
        }
    }
    Ok(tightest)
}

/// The cgroup's busy share of what it may use, in basis points (0 ..= 10 000), rounded to the nearest:
/// Δusage / (Δwall × limit), where the limit in CPUs is quota / period, capped at the host's online CPUs (a quota
/// larger than the machine cannot be used), or the host's online CPUs when there is no quota.
///
/// The result is clamped to 10 000 because the kernel enforces the quota per CFS period, and those periods are
/// not aligned with our sampling window: a window that starts just after a refill can see up to one extra
/// period's quota, briefly more than the limit allows on average.
///
/// `None` when no wall time passed, when there are no CPUs, or when usage went backwards (the cgroup was
/// removed and re-created between the readings).
pub fn utilisation_bp(
    prev_usage_ns: u64,
    cur_usage_ns: u64,
    wall: Duration,
    limit: CpuLimit,
    host_cpus: u32,
) -> Option<u16> {
    let used = u128::from(cur_usage_ns.checked_sub(prev_usage_ns)?);
    let wall_ns = wall.as_nanos();
    if wall_ns == 0 || host_cpus == 0 {
        return None;
    }
    let host = u128::from(host_cpus);
    let period = u128::from(limit.period_us);
    let (num, den) = match limit.quota_us.map(u128::from) {
        // used / (wall × quota / period) = used × period / (wall × quota)
        Some(quota) if quota < host.saturating_mul(period) => {
            (used.saturating_mul(period), wall_ns.saturating_mul(quota))
        }
        _ => (used, wall_ns.saturating_mul(host)),
    };
    super::ratio_bp(num, den)
}

/// `cpuacct.usage`: cumulative nanoseconds.
pub fn parse_cpuacct_usage(text: &str, path: &Path) -> Result<u64, SampleError> {
    let text = text.trim();
    text.parse().map_err(|_| SampleError::parse(path, format!("{text:?} is not a count of nanoseconds")))
}

/// `cpu.cfs_quota_us`: microseconds per period, or -1 for no limit.
pub fn parse_cfs_quota_us(text: &str, path: &Path) -> Result<Option<u64>, SampleError> {
    let text = text.trim();
    match text.parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(quota) if quota > 0 => Ok(Some(quota.unsigned_abs())),
        _ => Err(SampleError::parse(path, format!("{text:?} is neither -1 nor a positive number of microseconds"))),
    }
}

/// `cpu.cfs_period_us`: a positive number of microseconds.
pub fn parse_cfs_period_us(text: &str, path: &Path) -> Result<u64, SampleError> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(period) if period > 0 => Ok(period),
        _ => Err(SampleError::parse(path, format!("{text:?} is not a positive number of microseconds"))),
    }
}

/// The `usage_usec` line of a v2 `cpu.stat`.
pub fn parse_cpu_stat_usage_usec(text: &str, path: &Path) -> Result<u64, SampleError> {
    cpu_stat_value(text, path, "usage_usec")?.ok_or_else(|| SampleError::parse(path, "no usage_usec line"))
}

/// The value on the `key` line of a `cpu.stat` (v2: `usage_usec`; v1: `throttled_time`), `None` without one.
pub fn cpu_stat_value(text: &str, path: &Path, key: &str) -> Result<Option<u64>, SampleError> {
    for (index, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(key) {
            continue;
        }
        let value = fields.next().unwrap_or("");
        return match (value.parse::<u64>(), fields.next()) {
            (Ok(value), None) => Ok(Some(value)),
            _ => Err(SampleError::line(path, index + 1, format!("{key} value {value:?} is not a number"))),
        };
    }
    Ok(None)
}

/// A v2 `cpu.max`: `max 100000` or `50000 100000` (quota and period in microseconds).
pub fn parse_cpu_max(text: &str, path: &Path) -> Result<CpuLimit, SampleError> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let bad = || SampleError::parse(path, format!("{:?} is not \"max PERIOD\" or \"QUOTA PERIOD\"", text.trim()));
    let [quota, period] = fields.as_slice() else { return Err(bad()) };
    let period_us = period.parse::<u64>().ok().filter(|&p| p > 0).ok_or_else(bad)?;
    let quota_us = match *quota {
        "max" => None,
        quota => Some(quota.parse::<u64>().ok().filter(|&q| q > 0).ok_or_else(bad)?),
    };
    Ok(CpuLimit { quota_us, period_us })
}

/// Counts the CPUs in a kernel CPU list such as /sys/devices/system/cpu/online (`0-3,6,8-9`).
pub fn parse_cpu_list(text: &str, path: &Path) -> Result<u32, SampleError> {
    let text = text.trim();
    let bad = || SampleError::parse(path, format!("{text:?} is not a CPU list"));
    let mut count: u32 = 0;
    for range in text.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let lo: u32 = lo.parse().map_err(|_| bad())?;
        let hi: u32 = hi.parse().map_err(|_| bad())?;
        let span = hi.checked_sub(lo).and_then(|d| d.checked_add(1)).ok_or_else(bad)?;
        count = count.checked_add(span).ok_or_else(bad)?;
    }
    Ok(count)
}

/// The number of online CPUs on the host.
///
/// Read from sysfs rather than `std::thread::available_parallelism`, which already divides by a cgroup quota
/// and would cap the limit by itself.
pub fn read_online_cpus(path: &Path) -> Result<u32, SampleError> {
    parse_cpu_list(&super::read_text(path)?, path)
}

/// One cgroup mount from mountinfo.
#[derive(Debug)]
struct Mount {
    /// The part of the hierarchy this mount shows (`/` unless it is a bind mount or inside a container without a
    /// cgroup namespace), as components.
    root: Vec<String>,
    point: PathBuf,
    fstype: String,
    super_options: String,
}

impl Mount {
    fn is_v1_with(&self, controller: &str) -> bool {
        // Exact option match: "cpu" must not match "cpuset".
        self.fstype == "cgroup" && self.super_options.split(',').any(|o| o == controller)
    }

    /// The cgroup name of a directory below this mount point, if it is one.
    fn name_of(&self, path: &[String]) -> Option<Vec<String>> {
        let point = normalise(&self.point.to_string_lossy())?;
        let rest = path.strip_prefix(point.as_slice())?;
        Some(self.root.iter().chain(rest).cloned().collect())
    }

    /// The directory of cgroup `name` within this mount, if the mount shows that part of the hierarchy.
    fn dir_of(&self, name: &[String]) -> Option<PathBuf> {
        let rest = name.strip_prefix(self.root.as_slice())?;
        Some(rest.iter().fold(self.point.clone(), |dir, part| dir.join(part)))
    }
}

/// Splits an absolute or relative path into normal components; `None` if it climbs with "..".
fn normalise(path: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return None,
        }
    }
    Some(parts)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match escape.and_then(|d| u8::try_from(d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'))).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup and cgroup2 mounts in mountinfo text (proc(5)): `id parent major:minor root mount-point options
/// [optional fields…] - fstype source super-options`.
fn parse_mountinfo(text: &str) -> Result<Vec<Mount>, SampleError> {
    let mut mounts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 6);
        let (Some(sep), Some(root), Some(point)) = (separator, fields.get(3), fields.get(4)) else {
            return Err(SampleError::line(Path::new(PROC_SELF_MOUNTINFO), index + 1, "not a mountinfo line"));
        };
        let (Some(fstype), Some(super_options)) = (fields.get(sep + 1), fields.get(sep + 3)) else {
            return Err(SampleError::line(Path::new(PROC_SELF_MOUNTINFO), index + 1, "no fstype/source/options"));
        };
        if *fstype != "cgroup" && *fstype != "cgroup2" {
            continue;
        }
        let root = normalise(&unescape(root)).ok_or_else(|| {
            SampleError::line(Path::new(PROC_SELF_MOUNTINFO), index + 1, "mount root contains \"..\"")
        })?;
        mounts.push(Mount {
            root,
            point: PathBuf::from(unescape(point)),
            fstype: (*fstype).to_owned(),
            super_options: (*super_options).to_owned(),
        });
    }
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::testdata;
    use std::fs;
    use std::time::Instant;

    fn v1(acct: &str, cpu: &str, cpuset: Option<&str>) -> CgroupCpu {
        CgroupCpu::V1 { cpuacct_dir: acct.into(), cpu_dir: cpu.into(), cpuset_dir: cpuset.map(PathBuf::from) }
    }

    #[test]
    fn locate_v1_co_mounted() {
        let (_, text) = testdata("mountinfo_v1.txt");
        let both = "/sys/fs/cgroup/cpu,cpuacct/fulcrum/web1";
        let web1 = v1(both, both, Some("/sys/fs/cgroup/cpuset/fulcrum/web1"));
        // Hybrid host: the cgroup2 mount at /sys/fs/cgroup/unified is ignored for a name, and cpuset is not cpu
        // (but it is where the cgroup's CPUs are found).
        assert_eq!(CgroupCpu::locate_in(&text, "/fulcrum/web1").unwrap(), web1);
        assert_eq!(CgroupCpu::locate_in(&text, "fulcrum/web1/").unwrap(), web1);
        assert_eq!(CgroupCpu::locate_in(&text, both).unwrap(), web1);
        let root = "/sys/fs/cgroup/cpu,cpuacct";
        assert_eq!(CgroupCpu::locate_in(&text, "/").unwrap(), v1(root, root, Some("/sys/fs/cgroup/cpuset")));
        assert!(CgroupCpu::locate_in(&text, "/fulcrum/../etc").is_err());
        // A directory inside the cgroup2 mount is a v2 cgroup even on a hybrid host.
        assert_eq!(
            CgroupCpu::locate_in(&text, "/sys/fs/cgroup/unified/fulcrum").unwrap(),
            CgroupCpu::V2 { dir: "/sys/fs/cgroup/unified/fulcrum".into() }
        );
    }

    #[test]
    fn locate_v1_separate_mounts_like_this_machine() {
        let (_, text) = testdata("mountinfo_split_v1.txt");
        let expected = v1(
            "/sys/fs/cgroup/cpuacct/fulcrum/web1",
            "/sys/fs/cgroup/cpu/fulcrum/web1",
            Some("/sys/fs/cgroup/cpuset/fulcrum/web1"),
        );
        assert_eq!(CgroupCpu::locate_in(&text, "/fulcrum/web1").unwrap(), expected);
        // Either directory finds both.
        assert_eq!(CgroupCpu::locate_in(&text, "/sys/fs/cgroup/cpu/fulcrum/web1").unwrap(), expected);
        assert_eq!(CgroupCpu::locate_in(&text, "/sys/fs/cgroup/cpuacct/fulcrum/web1").unwrap(), expected);
    }

    #[test]
    fn locate_v2() {
        let (_, text) = testdata("mountinfo_v2.txt");
        let dir = CgroupCpu::V2 { dir: "/sys/fs/cgroup/system.slice/web.service".into() };
        assert_eq!(CgroupCpu::locate_in(&text, "/system.slice/web.service").unwrap(), dir);
        assert_eq!(CgroupCpu::locate_in(&text, "/sys/fs/cgroup/system.slice/web.service").unwrap(), dir);
        assert_eq!(
            CgroupCpu::locate_in(&text, "/sys/fs/cgroup/system.slice/web.service").unwrap().source(),
            CpuSource::CgroupV2
        );
    }

    #[test]
    fn locate_in_a_container_without_cgroup_namespace() {
        // The mount shows only /docker/4f1c2b9e of the host's hierarchy.
        let (_, text) = testdata("mountinfo_container_v1.txt");
        let own = "/sys/fs/cgroup/cpu,cpuacct";
        let container = v1(own, own, Some("/sys/fs/cgroup/cpuset"));
        assert_eq!(CgroupCpu::locate_in(&text, "/docker/4f1c2b9e").unwrap(), container);
        let child = "/sys/fs/cgroup/cpu,cpuacct/web";
        let web = v1(child, child, Some("/sys/fs/cgroup/cpuset/web"));
        assert_eq!(CgroupCpu::locate_in(&text, "/docker/4f1c2b9e/web").unwrap(), web);
        assert_eq!(CgroupCpu::locate_in(&text, child).unwrap(), web);
        let err = CgroupCpu::locate_in(&text, "/other").unwrap_err().to_string();
        assert!(err.contains("/other") && err.contains("outside"), "{err}");
    }

    #[test]
    fn locate_without_cgroups_or_with_bad_mountinfo() {
        let err = CgroupCpu::locate_in("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "/x").unwrap_err().to_string();
        assert!(err.contains("mounted"), "{err}");
        let err = CgroupCpu::locate_in("22 1 8:1 / / rw\n", "/x").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("mountinfo"), "{err}");
        let err = CgroupCpu::locate_in("22 1 8:1 / / rw - cgroup2\n", "/x").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn mount_points_with_escapes() {
        let text = "40 31 0:37 / /mnt/my\\040cgroups rw,relatime shared:5 master:1 - cgroup2 cgroup2 rw\n";
        assert_eq!(CgroupCpu::locate_in(text, "/web").unwrap(), CgroupCpu::V2 { dir: "/mnt/my cgroups/web".into() });
        assert_eq!(unescape("a\\134b\\011c\\9"), "a\\b\tc\\9");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn v1_files_from_testdata() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cgroup_v1");
        let cgroup = CgroupCpu::V1 {
            cpuacct_dir: base.join("cpuacct"),
            cpu_dir: base.join("cpu"),
            cpuset_dir: Some(base.join("cpuset")),
        };
        assert_eq!(cgroup.source(), CpuSource::CgroupV1);
        let want = CgroupReading {
            usage_ns: 154_825_888_351,
            limit: CpuLimit { quota_us: Some(50_000), period_us: 100_000 },
            cpuset_cpus: Some(5),
        };
        assert_eq!(cgroup.read().unwrap(), want);
        // No cgroup of that name in the cpuset hierarchy, or no cpuset hierarchy: every online CPU counts.
        let elsewhere = CgroupCpu::V1 {
            cpuacct_dir: base.join("cpuacct"),
            cpu_dir: base.join("cpu"),
            cpuset_dir: Some(base.join("no-such-cpuset")),
        };
        assert_eq!(elsewhere.read().unwrap(), CgroupReading { cpuset_cpus: None, ..want });
        let unmounted =
            CgroupCpu::V1 { cpuacct_dir: base.join("cpuacct"), cpu_dir: base.join("cpu"), cpuset_dir: None };
        assert_eq!(unmounted.read().unwrap(), CgroupReading { cpuset_cpus: None, ..want });
    }

    #[test]
    fn v2_files_from_testdata() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let limited = CgroupCpu::V2 { dir: base.join("cgroup_v2_limited") };
        assert_eq!(
            limited.read().unwrap(),
            CgroupReading {
                usage_ns: 8_391_522_000,
                limit: CpuLimit { quota_us: Some(150_000), period_us: 100_000 },
                cpuset_cpus: None
            }
        );
        let unlimited = CgroupCpu::V2 { dir: base.join("cgroup_v2_unlimited") };
        let want = CgroupReading { usage_ns: 421_337_000, limit: CpuLimit::UNLIMITED, cpuset_cpus: None };
        assert_eq!(unlimited.read().unwrap(), want);
    }

    /// A tree of cgroup directories under a temporary root: `(relative dir, [(file, text)])`, each a cgroup
    /// (with a `cgroup.procs`).
    fn cgroup_tree(dirs: &[(&str, &[(&str, &str)])]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (dir, files) in dirs {
            let dir = root.path().join(dir);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
            for (name, text) in *files {
                fs::write(dir.join(name), text).unwrap();
            }
        }
        root
    }

    #[test]
    fn a_parents_quota_binds_a_v2_cgroup_and_its_cpuset_counts() {
        // A systemd slice with CPUQuota=50 % and a service inside it with no quota of its own, pinned to 2 CPUs.
        let tree = cgroup_tree(&[
            ("cg", &[("cpu.stat", "usage_usec 1\n")]),
            ("cg/web.slice", &[("cpu.max", "50000 100000\n"), ("cpu.stat", "usage_usec 1\n")]),
            (
                "cg/web.slice/nginx.service",
                &[("cpu.max", "max 100000\n"), ("cpu.stat", "usage_usec 7\n"), ("cpuset.cpus.effective", "2-3\n")],
            ),
        ]);
        let service = CgroupCpu::V2 { dir: tree.path().join("cg/web.slice/nginx.service") };
        let reading = service.read().unwrap();
        assert_eq!(reading.limit, CpuLimit { quota_us: Some(50_000), period_us: 100_000 }, "the slice's quota");
        assert_eq!((reading.usage_ns, reading.cpuset_cpus), (7_000, Some(2)));
        // Without a cpuset controller of its own, the slice's cpuset binds it.
        fs::remove_file(tree.path().join("cg/web.slice/nginx.service/cpuset.cpus.effective")).unwrap();
        fs::write(tree.path().join("cg/web.slice/cpuset.cpus.effective"), "0,4-6\n").unwrap();
        assert_eq!(service.read().unwrap().cpuset_cpus, Some(4));
        // Its own quota, when tighter, is the one that binds (20 ms in 100 ms against 50 in 100).
        fs::write(tree.path().join("cg/web.slice/nginx.service/cpu.max"), "4000 20000\n").unwrap();
        assert_eq!(service.read().unwrap().limit, CpuLimit { quota_us: Some(4_000), period_us: 20_000 });
    }

    #[test]
    fn a_parents_quota_binds_a_v1_cgroup() {
        let tree = cgroup_tree(&[
            ("cpu", &[("cpu.cfs_quota_us", "-1\n"), ("cpu.cfs_period_us", "100000\n")]),
            ("cpu/docker", &[("cpu.cfs_quota_us", "150000\n"), ("cpu.cfs_period_us", "100000\n")]),
            ("cpu/docker/web", &[("cpu.cfs_quota_us", "-1\n"), ("cpu.cfs_period_us", "100000\n")]),
            ("cpuacct/docker/web", &[("cpuacct.usage", "42\n")]),
        ]);
        let web = CgroupCpu::V1 {
            cpuacct_dir: tree.path().join("cpuacct/docker/web"),
            cpu_dir: tree.path().join("cpu/docker/web"),
            cpuset_dir: None,
        };
        let reading = web.read().unwrap();
        assert_eq!(reading.limit, CpuLimit { quota_us: Some(150_000), period_us: 100_000 });
        assert_eq!(reading.usage_ns, 42);
        // The cgroup's own limit files are required (an ancestor's are not): without one, the file is named.
        fs::remove_file(tree.path().join("cpu/docker/web/cpu.cfs_quota_us")).unwrap();
        let err = web.read().unwrap_err().to_string();
        assert!(err.contains("cpu.cfs_quota_us"), "{err}");
    }

    #[test]
    fn a_v1_cpuset_is_found_up_the_tree_and_on_old_kernels() {
        let tree = cgroup_tree(&[
            ("cpu/docker/web", &[("cpu.cfs_quota_us", "-1\n"), ("cpu.cfs_period_us", "100000\n")]),
            ("cpuacct/docker/web", &[("cpuacct.usage", "42\n")]),
            ("cpuset", &[("cpuset.effective_cpus", "0-31\n")]),
            ("cpuset/docker", &[("cpuset.effective_cpus", "2-3\n")]),
        ]);
        let web = |cpuset: &str| CgroupCpu::V1 {
            cpuacct_dir: tree.path().join("cpuacct/docker/web"),
            cpu_dir: tree.path().join("cpu/docker/web"),
            cpuset_dir: Some(tree.path().join(cpuset)),
        };
        // Neither the cgroup nor its parent exists in the cpuset hierarchy: the nearest cgroup that does binds.
        assert_eq!(web("cpuset/docker/web/nginx").read().unwrap().cpuset_cpus, Some(2));
        // A kernel before 3.17 has no cpuset.effective_cpus: the configured CPUs count.
        fs::remove_file(tree.path().join("cpuset/docker/cpuset.effective_cpus")).unwrap();
        fs::write(tree.path().join("cpuset/docker/cpuset.cpus"), "5\n").unwrap();
        assert_eq!(web("cpuset/docker/web").read().unwrap().cpuset_cpus, Some(1));
        // A garbled list is an error naming the file.
        fs::write(tree.path().join("cpuset/docker/cpuset.cpus"), "five\n").unwrap();
        let err = web("cpuset/docker").read().unwrap_err().to_string();
        assert!(err.contains("cpuset.cpus"), "{err}");
    }

    #[test]
    fn v2_without_cpu_max_is_unlimited_and_missing_stat_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cpu.stat"), "usage_usec 5\nuser_usec 3\nsystem_usec 2\n").unwrap();
        let cgroup = CgroupCpu::V2 { dir: dir.path().to_owned() };
        let want = CgroupReading { usage_ns: 5_000, limit: CpuLimit::UNLIMITED, cpuset_cpus: None };
        assert_eq!(cgroup.read().unwrap(), want);
        let empty = tempfile::tempdir().unwrap();
        let err = CgroupCpu::V2 { dir: empty.path().to_owned() }.read().unwrap_err().to_string();
        assert!(err.contains("cpu.stat"), "{err}");
    }

    #[test]
    fn file_parsers() {
        let p = Path::new("f");
        assert_eq!(parse_cpuacct_usage("123\n", p).unwrap(), 123);
        assert!(parse_cpuacct_usage("-1\n", p).is_err());
        assert_eq!(parse_cfs_quota_us("-1\n", p).unwrap(), None);
        assert_eq!(parse_cfs_quota_us("50000\n", p).unwrap(), Some(50_000));
        for bad in ["0", "-2", "", "max"] {
            assert!(parse_cfs_quota_us(bad, p).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cfs_period_us("100000\n", p).unwrap(), 100_000);
        assert!(parse_cfs_period_us("0\n", p).is_err());
        assert_eq!(parse_cpu_max("max 100000\n", p).unwrap(), CpuLimit::UNLIMITED);
        assert_eq!(
            parse_cpu_max("50000 200000\n", p).unwrap(),
            CpuLimit { quota_us: Some(50_000), period_us: 200_000 }
        );
        for bad in ["max", "max 0", "0 100000", "50000", "50000 100000 1", "x 100000", ""] {
            let err = parse_cpu_max(bad, Path::new("/cg/cpu.max")).unwrap_err().to_string();
            assert!(err.contains("/cg/cpu.max"), "{bad:?}: {err}");
        }
        let err = parse_cpu_stat_usage_usec("user_usec 1\nusage_usec x\n", p).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_cpu_stat_usage_usec("usage_usec 1 2\n", p).is_err());
        assert!(parse_cpu_stat_usage_usec("user_usec 1\n", p).is_err());
    }

    #[test]
    fn cpu_lists() {
        let p = Path::new("online");
        let (path, text) = testdata("cpu_online.txt");
        assert_eq!(parse_cpu_list(&text, &path).unwrap(), 2);
        assert_eq!(parse_cpu_list("0\n", p).unwrap(), 1);
        assert_eq!(parse_cpu_list("0-3,6,8-9\n", p).unwrap(), 7);
        for bad in ["", "3-1", "0-", "a", "0,,1", "0-4294967295"] {
            assert!(parse_cpu_list(bad, p).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn utilisation_against_quota_and_host() {
        let second = Duration::from_secs(1);
        let half = CpuLimit { quota_us: Some(50_000), period_us: 100_000 };
        // 0.25 CPU-seconds in 1 s against a 0.5 CPU quota: 50 %.
        assert_eq!(utilisation_bp(1_000, 1_000 + 250_000_000, second, half, 4), Some(5_000));
        // The same use without a quota, on 4 CPUs: 0.25 / 4 = 6.25 %.
        assert_eq!(utilisation_bp(0, 250_000_000, second, CpuLimit::UNLIMITED, 4), Some(625));
        // A quota of 8 CPUs on a 2-CPU host is capped at 2: 1.5 CPU-seconds / 2 = 75 %.
        let eight = CpuLimit { quota_us: Some(800_000), period_us: 100_000 };
        assert_eq!(utilisation_bp(0, 1_500_000_000, second, eight, 2), Some(7_500));
        // Exactly the host size is the same either way.
        let two = CpuLimit { quota_us: Some(200_000), period_us: 100_000 };
        assert_eq!(utilisation_bp(0, 1_500_000_000, second, two, 2), Some(7_500));
        // 1.5 CPU quota over 2 s, 1 CPU-second used: 1 / 3 → 3333 bp.
        let one_half = CpuLimit { quota_us: Some(150_000), period_us: 100_000 };
        assert_eq!(utilisation_bp(0, 1_000_000_000, 2 * second, one_half, 2), Some(3_333));
        // Window misaligned with the CFS periods: briefly above the quota, clamped.
        assert_eq!(utilisation_bp(0, 600_000_000, second, half, 2), Some(10_000));
        assert_eq!(utilisation_bp(5, 4, second, half, 2), None, "usage went backwards");
        assert_eq!(utilisation_bp(0, 4, Duration::ZERO, half, 2), None, "no wall time");
        assert_eq!(utilisation_bp(0, 4, second, half, 0), None, "no CPUs");
        assert_eq!(
            utilisation_bp(0, u64::MAX, Duration::MAX, CpuLimit { quota_us: Some(u64::MAX), period_us: 1 }, 1),
            Some(0)
        );
    }

    /// Removes the test cgroups however the test ends; a v1 cgroup can only be removed once it has no tasks, so
    /// the thread is first moved back to the hierarchy roots.
    struct TestCgroups {
        dirs: Vec<PathBuf>,
        roots: Vec<PathBuf>,
        tid: Option<String>,
    }

    impl Drop for TestCgroups {
        fn drop(&mut self) {
            if let Some(tid) = &self.tid {
                for root in &self.roots {
                    let _ = fs::write(root.join("tasks"), tid);
                }
            }
            for dir in self.dirs.iter().rev() {
                if let Err(e) = fs::remove_dir(dir) {
                    eprintln!("cannot remove test cgroup {}: {e}", dir.display());
                }
            }
        }
    }

    /// Creates a real v1 cgroup with a 50 % quota, moves this test's thread into it, burns CPU and checks what the
    /// sampler's reading and maths make of the live counters. Needs root and v1 cpu/cpuacct hierarchies, and fails
    /// rather than skips without them, so that a run that did not exercise the real files cannot pass.
    #[test]
    fn real_v1_cgroup_on_this_machine() {
        let mountinfo = fs::read_to_string(PROC_SELF_MOUNTINFO).unwrap();
        let mounts = parse_mountinfo(&mountinfo).unwrap();
        let cpu_root = mounts.iter().find(|m| m.is_v1_with("cpu")).expect("no cgroup v1 cpu hierarchy is mounted");
        let acct_root =
            mounts.iter().find(|m| m.is_v1_with("cpuacct")).expect("no cgroup v1 cpuacct hierarchy is mounted");
        let name = format!("fulcrum-test-{}", std::process::id());
        let cpu_dir = cpu_root.point.join(&name);
        let acct_dir = acct_root.point.join(&name);
        let mut guard = TestCgroups { dirs: Vec::new(), roots: vec![cpu_root.point.clone()], tid: None };
        if acct_root.point != cpu_root.point {
            guard.roots.push(acct_root.point.clone());
        }
        for dir in [&cpu_dir, &acct_dir] {
            if guard.dirs.contains(dir) {
                continue;
            }
            if let Err(e) = fs::create_dir(dir) {
                panic!("cannot create {}: {e} (this test must run as root)", dir.display());
            }
            guard.dirs.push(dir.clone());
        }
        fs::write(cpu_dir.join("cpu.cfs_quota_us"), "50000").unwrap();
        let period =
            parse_cfs_period_us(&fs::read_to_string(cpu_dir.join("cpu.cfs_period_us")).unwrap(), &cpu_dir).unwrap();

        let cpuset_root =
            mounts.iter().find(|m| m.is_v1_with("cpuset")).expect("no cgroup v1 cpuset hierarchy is mounted");
        let cpuset_dir = cpuset_root.point.join(&name);

        let cgroup = CgroupCpu::locate(&format!("/{name}")).unwrap();
        let expected = CgroupCpu::V1 {
            cpuacct_dir: acct_dir.clone(),
            cpu_dir: cpu_dir.clone(),
            cpuset_dir: Some(cpuset_dir.clone()),
        };
        assert_eq!(cgroup, expected);
        assert_eq!(CgroupCpu::locate(&cpu_dir.to_string_lossy()).unwrap(), cgroup);
        // No cgroup of that name in the cpuset hierarchy yet: the hierarchy's root, every online CPU.
        let host = read_online_cpus(Path::new(SYS_CPU_ONLINE)).unwrap();
        assert_eq!(cgroup.read().unwrap().cpuset_cpus, Some(host));
        // Confined to CPU 0 (a cpuset needs its memory nodes set before its CPUs are effective).
        fs::create_dir(&cpuset_dir).unwrap();
        guard.dirs.push(cpuset_dir.clone());
        fs::write(cpuset_dir.join("cpuset.mems"), "0").unwrap();
        fs::write(cpuset_dir.join("cpuset.cpus"), "0").unwrap();
        let first = cgroup.read().unwrap();
        assert_eq!(first.cpuset_cpus, Some(1));
        let started = Instant::now();
        assert_eq!(first.limit, CpuLimit { quota_us: Some(50_000), period_us: period });
        assert_eq!(first.usage_ns, 0, "a fresh cgroup has used no CPU");

        // /proc/thread-self links to "<pid>/task/<tid>"; v1 "tasks" takes a thread id.
        let link = fs::read_link("/proc/thread-self").unwrap();
        let tid = link.file_name().unwrap().to_string_lossy().into_owned();
        guard.tid = Some(tid.clone());
        for root in [&cpu_dir, &acct_dir] {
            fs::write(root.join("tasks"), &tid).unwrap();
        }
        // Burn CPU until the cgroup has been charged 20 ms; the loop ends on the counter, not on a timer.
        let mut spin: u64 = 0;
        let second = loop {
            for i in 0..100_000u64 {
                spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(i));
            }
            let reading = cgroup.read().unwrap();
            if reading.usage_ns >= 20_000_000 {
                break reading;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the cgroup was charged no CPU: {reading:?}");
        };
        let wall = started.elapsed();
        let bp = utilisation_bp(first.usage_ns, second.usage_ns, wall, second.limit, host).unwrap();
        assert!(bp > 0 && bp <= 10_000, "{bp}");
        drop(guard);
        assert!(!cpu_dir.exists() && !acct_dir.exists() && !cpuset_dir.exists(), "test cgroups left behind");
    }
}
