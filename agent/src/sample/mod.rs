//! What the agent measures on its real server: CPU (host-wide or one cgroup's), load average, memory, CPU
//! pressure, established connections on the service ports, and the service's response time.
//!
//! Each measurement is a pure parser or calculation over explicit inputs (file text, readings, instants), with
//! a thin function that reads the real file and calls it, so the maths is tested on recorded samples in
//! `agent/testdata/` without root, sleeps or a live /proc. [`Sampler`] ties the file-based measurements
//! together; the response-time probe ([`probe_once`], [`ProbeTracker`]) is separate because it is async and
//! runs on its own schedule.

pub mod cgroup;
pub mod cpu;
pub mod probe;
pub mod sock_diag;
pub mod system;

use std::path::{Path, PathBuf};
use std::time::Instant;

use fulcrum_protocol::{CpuPressure, CpuSource, CpuUsage, MemoryUsage, FULL_SCALE_BP};

pub use cgroup::{utilisation_bp, CgroupCpu, CgroupReading, CpuLimit};
pub use cpu::{busy_bp, CpuTimes};
pub use probe::{probe_once, InvalidAlpha, InvalidProbeConfig, ProbeConfig, ProbeTracker};
pub use system::count_established;

/// A measurement that could not be taken; every variant names the file (or cgroup) concerned.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
    #[error("{} line {line}: {what}", path.display())]
    Line { path: PathBuf, line: usize, what: String },
    #[error("cgroup {name:?}: {what}")]
    Cgroup { name: String, what: String },
    #[error("sock_diag netlink: {what}")]
    Netlink { what: String },
}

impl SampleError {
    fn parse(path: &Path, what: impl Into<String>) -> SampleError {
        SampleError::Parse { path: path.to_owned(), what: what.into() }
    }

    fn line(path: &Path, line: usize, what: impl Into<String>) -> SampleError {
        SampleError::Line { path: path.to_owned(), line, what: what.into() }
    }
}

fn read_text(path: &Path) -> Result<String, SampleError> {
    std::fs::read_to_string(path).map_err(|source| SampleError::Io { path: path.to_owned(), source })
}

/// A file's text, `None` when it does not exist (an optional kernel or cgroup file).
fn read_if_present(path: &Path) -> Result<Option<String>, SampleError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SampleError::Io { path: path.to_owned(), source }),
    }
}

/// `num / den` in basis points, rounded to the nearest and clamped to 100 %; `None` if `den` is 0.
fn ratio_bp(num: u128, den: u128) -> Option<u16> {
    if den == 0 {
        return None;
    }
    let bp = num.saturating_mul(u128::from(FULL_SCALE_BP)).saturating_add(den / 2) / den;
    Some(u16::try_from(bp.min(u128::from(FULL_SCALE_BP))).unwrap_or(FULL_SCALE_BP))
}

/// Where CPU utilisation comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuSourceConfig {
    /// The whole host, from /proc/stat.
    Proc,
    /// One cgroup, relative to its CPU limit.
    Cgroup(CgroupCpu),
}

/// The files a [`Sampler`] reads; [`Default`] is the real system's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemPaths {
    pub proc_stat: PathBuf,
    pub loadavg: PathBuf,
    pub meminfo: PathBuf,
    pub pressure_cpu: PathBuf,
    pub net_tcp: PathBuf,
    pub net_tcp6: PathBuf,
    pub cpu_online: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> SystemPaths {
        SystemPaths {
            proc_stat: cpu::PROC_STAT.into(),
            loadavg: system::PROC_LOADAVG.into(),
            meminfo: system::PROC_MEMINFO.into(),
            pressure_cpu: system::PROC_PRESSURE_CPU.into(),
            net_tcp: system::PROC_NET_TCP.into(),
            net_tcp6: system::PROC_NET_TCP6.into(),
            cpu_online: cgroup::SYS_CPU_ONLINE.into(),
        }
    }
}

/// One reading of cumulative CPU counters, before any delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuReading {
    Proc(CpuTimes),
    Cgroup {
        /// [`CpuSource::CgroupV1`] or [`CpuSource::CgroupV2`].
        source: CpuSource,
        reading: CgroupReading,
        /// Online CPUs on the host, which cap (or, without a quota, are) the cgroup's limit.
        host_cpus: u32,
    },
}

/// Turns successive [`CpuReading`]s into utilisation over the interval between them.
#[derive(Debug, Clone, Default)]
pub struct CpuTracker {
    prev: Option<(Instant, CpuReading)>,
}

impl CpuTracker {
    /// Utilisation since the previous reading, `None` for the first. Also `None` when the readings do not
    /// form a valid interval (a counter went backwards, no time passed, or the source changed); the new reading
    /// then becomes the base for the next interval.
    pub fn update(&mut self, now: Instant, reading: CpuReading) -> Option<CpuUsage> {
        let prev = self.prev.replace((now, reading));
        let (then, prev) = prev?;
        match (prev, reading) {
            (CpuReading::Proc(prev), CpuReading::Proc(cur)) => {
                busy_bp(prev, cur).map(|busy_bp| CpuUsage { source: CpuSource::ProcStat, busy_bp })
            }
            (
                CpuReading::Cgroup { source: prev_source, reading: prev, .. },
                CpuReading::Cgroup { source, reading: cur, host_cpus },
            ) if prev_source == source => {
                let wall = now.saturating_duration_since(then);
                // A cpuset narrower than the host is all the CPU the cgroup can use without a quota.
                let cpus = cur.cpuset_cpus.map_or(host_cpus, |set| set.min(host_cpus));
                utilisation_bp(prev.usage_ns, cur.usage_ns, wall, cur.limit, cpus)
                    .map(|busy_bp| CpuUsage { source, busy_bp })
            }
            _ => None,
        }
    }
}

/// The file-based part of a load report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSample {
    /// `None` on the first sample, and whenever the interval was not measurable (see [`CpuTracker::update`]).
    pub cpu: Option<CpuUsage>,
    pub load_avg_milli: [u32; 3],
    pub memory: MemoryUsage,
    /// `None` when the kernel has no PSI.
    pub cpu_pressure: Option<CpuPressure>,
    /// ESTABLISHED TCP connections (IPv4 and IPv6) whose local port is a service port.
    pub established_connections: u32,
}

/// Everything one sample reads from files, before the CPU delta.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawSample {
    cpu: CpuReading,
    load_avg_milli: [u32; 3],
    memory: MemoryUsage,
    cpu_pressure: Option<CpuPressure>,
    /// A v1 cgroup's cumulative throttled time, nanoseconds: its pressure, see [`ThrottleAverages`].
    throttled_ns: Option<u64>,
    established_connections: u32,
}

/// Produces the non-probe part of successive load reports; owns the previous CPU reading.
#[derive(Debug, Clone)]
pub struct Sampler {
    source: CpuSourceConfig,
    ports: Vec<u16>,
    paths: SystemPaths,
    cpu: CpuTracker,
    throttle: ThrottleAverages,
    connections: ConnectionCounter,
}

/// PSI-style figures for a v1 cgroup, which has no PSI, from its CFS throttled time: the share of each interval
/// in which the quota held its tasks back, averaged over 10 s and 60 s as the kernel averages PSI, and the
/// cumulative time as `some_total_us` (from which the director takes the share of each report's interval).
/// Throttled time is stall time: v2's `cpu.pressure` counts throttled tasks as stalled.
#[derive(Debug, Clone, Default)]
struct ThrottleAverages {
    previous: Option<(Instant, u64)>,
    avg10: f64,
    avg60: f64,
}

impl ThrottleAverages {
    fn update(&mut self, now: Instant, throttled_ns: u64) -> CpuPressure {
        if let Some((then, before)) = self.previous {
            let wall = now.saturating_duration_since(then).as_secs_f64();
            // A counter that went back belongs to a re-created cgroup: rebase without a sample.
            if let (true, Some(stalled)) = (wall > 0.0, throttled_ns.checked_sub(before)) {
                let share = (stalled as f64 / 1e9 / wall).min(1.0);
                for (avg, window_s) in [(&mut self.avg10, 10.0), (&mut self.avg60, 60.0)] {
                    let keep = (-wall / window_s).exp();
                    *avg = *avg * keep + share * (1.0 - keep);
                }
            }
        }
        self.previous = Some((now, throttled_ns));
        let bp = |share: f64| (share * 10_000.0).round().clamp(0.0, 10_000.0) as u16;
        CpuPressure { some_avg10_bp: bp(self.avg10), some_avg60_bp: bp(self.avg60), some_total_us: throttled_ns / 1000 }
    }
}

/// How established connections are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionCounter {
    /// Netlink sock_diag: cheap (see [`sock_diag`]).
    SockDiag,
    /// /proc/net/tcp and tcp6 at the sampler's paths: the fallback, and what tests with recorded files use.
    ProcFiles,
}

impl Sampler {
    /// A sampler of the real system.
    pub fn new(source: CpuSourceConfig, ports: Vec<u16>) -> Sampler {
        let mut sampler = Sampler::with_paths(source, ports, SystemPaths::default());
        sampler.connections = ConnectionCounter::SockDiag;
        sampler
    }

    /// A sampler reading other files than the system's (for tests, or a /proc mounted elsewhere).
    pub fn with_paths(source: CpuSourceConfig, ports: Vec<u16>, paths: SystemPaths) -> Sampler {
        Sampler {
            source,
            ports,
            paths,
            cpu: CpuTracker::default(),
            throttle: ThrottleAverages::default(),
            connections: ConnectionCounter::ProcFiles,
        }
    }

    /// Reads every source and returns the sample for the interval since the previous call, `now` being the
    /// time of this reading. Any read or parse failure fails the whole sample, and leaves the previous CPU
    /// reading in place so that the next successful sample covers the whole interval.
    pub fn sample(&mut self, now: Instant) -> Result<SystemSample, SampleError> {
        let raw = self.read_raw()?;
        Ok(self.ingest(now, raw))
    }

    fn read_proc_established(&self) -> Result<u32, SampleError> {
        let p = &self.paths;
        Ok(system::read_established(&p.net_tcp, &self.ports)?
            .saturating_add(system::read_established(&p.net_tcp6, &self.ports)?))
    }

    fn read_raw(&mut self) -> Result<RawSample, SampleError> {
        let p = &self.paths;
        let cpu = match &self.source {
            CpuSourceConfig::Proc => CpuReading::Proc(cpu::read_proc_stat(&p.proc_stat)?),
            CpuSourceConfig::Cgroup(cgroup) => CpuReading::Cgroup {
                source: cgroup.source(),
                reading: cgroup.read()?,
                host_cpus: cgroup::read_online_cpus(&p.cpu_online)?,
            },
        };
        let established = match self.connections {
            ConnectionCounter::SockDiag => match sock_diag::count_established(&self.ports) {
                Ok(count) => count,
                Err(e) => {
                    tracing::warn!(error = %e, "sock_diag unavailable; counting connections from /proc/net/tcp from now on");
                    self.connections = ConnectionCounter::ProcFiles;
                    self.read_proc_established()?
                }
            },
            ConnectionCounter::ProcFiles => self.read_proc_established()?,
        };
        Ok(RawSample {
            cpu,
            load_avg_milli: system::read_loadavg(&p.loadavg)?,
            memory: system::read_meminfo(&p.meminfo)?,
            cpu_pressure: match &self.source {
                CpuSourceConfig::Proc => system::read_cpu_pressure(&p.pressure_cpu)?,
                // The pressure of the same thing as the CPU figure: the cgroup's own, or none.
                CpuSourceConfig::Cgroup(cgroup) => match cgroup.pressure_file() {
                    Some(path) => system::read_cpu_pressure(&path)?,
                    None => None,
                },
            },
            throttled_ns: match &self.source {
                CpuSourceConfig::Cgroup(cgroup) => cgroup.read_throttled_ns()?,
                CpuSourceConfig::Proc => None,
            },
            established_connections: established,
        })
    }

    fn ingest(&mut self, now: Instant, raw: RawSample) -> SystemSample {
        SystemSample {
            cpu: self.cpu.update(now, raw.cpu),
            load_avg_milli: raw.load_avg_milli,
            memory: raw.memory,
            cpu_pressure: raw.cpu_pressure.or_else(|| raw.throttled_ns.map(|ns| self.throttle.update(now, ns))),
            established_connections: raw.established_connections,
        }
    }
}

/// A recorded sample file and its text.
#[cfg(test)]
pub(crate) fn testdata(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn data(name: &str) -> PathBuf {
        testdata(name).0
    }

    fn recorded_paths() -> SystemPaths {
        SystemPaths {
            proc_stat: data("proc_stat_1.txt"),
            loadavg: data("loadavg.txt"),
            meminfo: data("meminfo.txt"),
            pressure_cpu: data("pressure_cpu.txt"),
            net_tcp: data("proc_net_tcp.txt"),
            net_tcp6: data("proc_net_tcp6.txt"),
            cpu_online: data("cpu_online.txt"),
        }
    }

    #[test]
    fn proc_tracker_reports_from_the_second_reading() {
        let mut tracker = CpuTracker::default();
        let t0 = Instant::now();
        let a = CpuTimes { busy: 100, total: 1_000 };
        assert_eq!(tracker.update(t0, CpuReading::Proc(a)), None);
        let b = CpuTimes { busy: 150, total: 1_200 };
        let usage = tracker.update(t0 + Duration::from_secs(1), CpuReading::Proc(b));
        assert_eq!(usage, Some(CpuUsage { source: CpuSource::ProcStat, busy_bp: 2_500 }));
        // Backwards: nothing, and the new reading becomes the base.
        let c = CpuTimes { busy: 10, total: 100 };
        assert_eq!(tracker.update(t0 + Duration::from_secs(2), CpuReading::Proc(c)), None);
        let d = CpuTimes { busy: 20, total: 200 };
        let usage = tracker.update(t0 + Duration::from_secs(3), CpuReading::Proc(d));
        assert_eq!(usage, Some(CpuUsage { source: CpuSource::ProcStat, busy_bp: 1_000 }));
    }

    #[test]
    fn cgroup_tracker_uses_wall_time_between_instants() {
        let limit = CpuLimit { quota_us: Some(50_000), period_us: 100_000 };
        let reading = |usage_ns| CpuReading::Cgroup {
            source: CpuSource::CgroupV1,
            reading: CgroupReading { usage_ns, limit, cpuset_cpus: None },
            host_cpus: 2,
        };
        let mut tracker = CpuTracker::default();
        let t0 = Instant::now();
        assert_eq!(tracker.update(t0, reading(1_000_000_000)), None);
        // 0.1 CPU-seconds in 0.5 s against half a CPU: 40 %.
        let usage = tracker.update(t0 + Duration::from_millis(500), reading(1_100_000_000));
        assert_eq!(usage, Some(CpuUsage { source: CpuSource::CgroupV1, busy_bp: 4_000 }));
        // The same instant again: no interval.
        assert_eq!(tracker.update(t0 + Duration::from_millis(500), reading(1_200_000_000)), None);
        // A different source does not mix with the previous reading.
        let v2 = CpuReading::Cgroup {
            source: CpuSource::CgroupV2,
            reading: CgroupReading { usage_ns: 2_000_000_000, limit, cpuset_cpus: None },
            host_cpus: 2,
        };
        assert_eq!(tracker.update(t0 + Duration::from_secs(1), v2), None);
        assert_eq!(tracker.update(t0 + Duration::from_secs(2), CpuReading::Proc(CpuTimes { busy: 1, total: 2 })), None);
    }

    #[test]
    fn a_cgroup_pinned_to_few_cpus_is_measured_against_them() {
        // No quota, 32 CPUs online, the cpuset allows 2: one CPU-second a second is half of what it can use.
        let reading = |usage_ns| CpuReading::Cgroup {
            source: CpuSource::CgroupV2,
            reading: CgroupReading { usage_ns, limit: CpuLimit::UNLIMITED, cpuset_cpus: Some(2) },
            host_cpus: 32,
        };
        let mut tracker = CpuTracker::default();
        let t0 = Instant::now();
        tracker.update(t0, reading(0));
        let usage = tracker.update(t0 + Duration::from_secs(1), reading(1_000_000_000));
        assert_eq!(usage, Some(CpuUsage { source: CpuSource::CgroupV2, busy_bp: 5_000 }));
    }

    #[test]
    fn sampler_over_recorded_files() {
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Proc, vec![80, 443], recorded_paths());
        let t0 = Instant::now();
        let first = sampler.sample(t0).unwrap();
        assert_eq!(
            first,
            SystemSample {
                cpu: None,
                load_avg_milli: [520, 280, 1_150],
                memory: MemoryUsage { used_bytes: (24_730_032 - 24_369_436) * 1024, total_bytes: 24_730_032 * 1024 },
                cpu_pressure: Some(CpuPressure { some_avg10_bp: 1_234, some_avg60_bp: 67, some_total_us: 9_043_242 }),
                // 3 over IPv4 and 2 over IPv6
                established_connections: 5,
            }
        );
        // Point /proc/stat at the later recording: the interval between the two.
        sampler.paths.proc_stat = data("proc_stat_2.txt");
        let second = sampler.sample(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(second.cpu, Some(CpuUsage { source: CpuSource::ProcStat, busy_bp: 6_212 }));
    }

    #[test]
    fn sampler_over_a_recorded_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("cpu.stat");
        std::fs::write(&stat, "usage_usec 1000000\n").unwrap();
        std::fs::write(dir.path().join("cpu.max"), "100000 100000\n").unwrap();
        let cgroup = CgroupCpu::V2 { dir: dir.path().to_owned() };
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Cgroup(cgroup), vec![8080], recorded_paths());
        let t0 = Instant::now();
        assert_eq!(sampler.sample(t0).unwrap().cpu, None);
        std::fs::write(&stat, "usage_usec 1250000\n").unwrap();
        let sample = sampler.sample(t0 + Duration::from_secs(1)).unwrap();
        // 0.25 CPU-seconds in 1 s against a quota of 1 CPU.
        assert_eq!(sample.cpu, Some(CpuUsage { source: CpuSource::CgroupV2, busy_bp: 2_500 }));
        assert_eq!(sample.established_connections, 1, "::1 on 8080");
    }

    #[test]
    fn a_cgroup_reports_its_own_pressure_never_the_hosts() {
        // The host's PSI (recorded_paths) is 12.34 %: in cgroup mode it describes the neighbours, not the service.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 1000000\n").unwrap();
        let v2 = CgroupCpu::V2 { dir: dir.path().to_owned() };
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Cgroup(v2.clone()), vec![80], recorded_paths());
        assert_eq!(sampler.sample(Instant::now()).unwrap().cpu_pressure, None, "v2 without cpu.pressure (PSI off)");
        std::fs::write(
            dir.path().join("cpu.pressure"),
            "some avg10=55.00 avg60=20.00 avg300=5.00 total=777\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        )
        .unwrap();
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Cgroup(v2), vec![80], recorded_paths());
        let own = CpuPressure { some_avg10_bp: 5_500, some_avg60_bp: 2_000, some_total_us: 777 };
        assert_eq!(sampler.sample(Instant::now()).unwrap().cpu_pressure, Some(own));

        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join("cgroup_v1");
        let v1 = CgroupCpu::V1 { cpuacct_dir: base.join("cpuacct"), cpu_dir: base.join("cpu"), cpuset_dir: None };
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Cgroup(v1), vec![80], recorded_paths());
        assert_eq!(sampler.sample(Instant::now()).unwrap().cpu_pressure, None, "v1 without cpu.stat: none");
    }

    /// v1 cgroups have no PSI: their pressure is the time the CFS quota throttled them, as PSI-style averages
    /// and a cumulative total.
    #[test]
    fn a_v1_cgroup_reports_its_throttled_time_as_pressure() {
        let dir = tempfile::tempdir().unwrap();
        let (acct, cpu) = (dir.path().join("cpuacct"), dir.path().join("cpu"));
        std::fs::create_dir_all(&acct).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(acct.join("cpuacct.usage"), "1000000000\n").unwrap();
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "1000\n").unwrap();
        std::fs::write(cpu.join("cpu.cfs_period_us"), "20000\n").unwrap();
        let stat = |throttled_ns: u64| {
            std::fs::write(
                cpu.join("cpu.stat"),
                format!("nr_periods 50\nnr_throttled 20\nthrottled_time {throttled_ns}\n"),
            )
            .unwrap()
        };
        stat(3_000_000_000);
        let v1 = CgroupCpu::V1 { cpuacct_dir: acct.clone(), cpu_dir: cpu.clone(), cpuset_dir: None };
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Cgroup(v1), vec![80], recorded_paths());
        let t0 = Instant::now();
        let first = sampler.sample(t0).unwrap().cpu_pressure.unwrap();
        assert_eq!(first, CpuPressure { some_avg10_bp: 0, some_avg60_bp: 0, some_total_us: 3_000_000 });
        // Half of the next second throttled: avg10 moves by (1 − e^(−1/10)) of the way to 50 %.
        stat(3_500_000_000);
        let second = sampler.sample(t0 + Duration::from_secs(1)).unwrap().cpu_pressure.unwrap();
        let expect = |window: f64| (5000.0 * (1.0 - (-1.0f64 / window).exp())).round() as u16;
        assert_eq!(
            second,
            CpuPressure { some_avg10_bp: expect(10.0), some_avg60_bp: expect(60.0), some_total_us: 3_500_000 }
        );
        // A garbled line is an error naming the file and line.
        std::fs::write(cpu.join("cpu.stat"), "nr_periods 50\nthrottled_time lots\n").unwrap();
        let err = sampler.sample(t0 + Duration::from_secs(2)).unwrap_err().to_string();
        assert!(err.contains("cpu.stat") && err.contains("throttled_time"), "{err}");
    }

    #[test]
    fn missing_optional_files_and_failing_required_ones() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SystemPaths {
            pressure_cpu: dir.path().join("no-psi"),
            net_tcp6: dir.path().join("no-ipv6"),
            ..recorded_paths()
        };
        let mut sampler = Sampler::with_paths(CpuSourceConfig::Proc, vec![80, 443], paths.clone());
        let sample = sampler.sample(Instant::now()).unwrap();
        assert_eq!((sample.cpu_pressure, sample.established_connections), (None, 3));

        let missing = dir.path().join("no-loadavg");
        let mut sampler =
            Sampler::with_paths(CpuSourceConfig::Proc, vec![80], SystemPaths { loadavg: missing.clone(), ..paths });
        let err = sampler.sample(Instant::now()).unwrap_err();
        assert!(matches!(&err, SampleError::Io { path, .. } if *path == missing), "{err}");
        assert!(err.to_string().contains("no-loadavg"), "{err}");
    }

    #[test]
    fn ratio_rounding_and_clamping() {
        assert_eq!(ratio_bp(1, 0), None);
        assert_eq!(ratio_bp(0, 7), Some(0));
        assert_eq!(ratio_bp(1, 20_000), Some(1), "half a basis point rounds up");
        assert_eq!(ratio_bp(1, 20_001), Some(0));
        assert_eq!(ratio_bp(3, 2), Some(10_000));
        assert_eq!(ratio_bp(u128::MAX, 1), Some(10_000));
    }

    /// The real files of this machine parse; their values are not checked, only that nothing is missing.
    #[test]
    fn live_system_files_parse() {
        let mut sampler = Sampler::new(CpuSourceConfig::Proc, vec![22]);
        let t0 = Instant::now();
        let first = sampler.sample(t0).unwrap();
        assert!(first.memory.total_bytes > 0 && first.memory.used_bytes <= first.memory.total_bytes);
        let second = sampler.sample(Instant::now()).unwrap();
        assert!(second.cpu.is_none_or(|cpu| cpu.busy_bp <= FULL_SCALE_BP));
    }
}
