//! Host-wide CPU utilisation from the aggregate `cpu` line of /proc/stat.

use std::io::Cursor;
use std::path::Path;

use procfs::{ExplicitSystemInfo, FromReadSI, KernelStats};

use super::SampleError;

/// Where the kernel publishes host CPU times.
pub const PROC_STAT: &str = "/proc/stat";

/// Cumulative CPU time of all CPUs since boot, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

impl CpuTimes {
    /// Sums the aggregate `cpu` line of a parsed /proc/stat.
    ///
    /// guest and guest_nice are not added: the kernel already counts guest time inside user and nice, so adding
    /// them would count it twice. steal is busy because the time was unavailable to us, and counting it as idle
    /// would make an over-committed VM look like it has room to spare. iowait is idle: the CPU could have run
    /// something else.
    pub fn from_kernel_stats(stats: &KernelStats) -> CpuTimes {
        let t = &stats.total;
        let busy = [t.user, t.nice, t.system, t.irq.unwrap_or(0), t.softirq.unwrap_or(0), t.steal.unwrap_or(0)]
            .into_iter()
            .fold(0u64, u64::saturating_add);
        let total = busy.saturating_add(t.idle).saturating_add(t.iowait.unwrap_or(0));
        CpuTimes { busy, total }
    }
}

/// Parses the text of /proc/stat; `path` only labels errors.
pub fn parse_proc_stat(text: &str, path: &Path) -> Result<CpuTimes, SampleError> {
    // KernelStats only needs the system info to convert ticks to time units, which we never do (both sides of
    // the ratio are in ticks), so fixed values keep the parse independent of the live system.
    let info = ExplicitSystemInfo { boot_time_secs: 0, ticks_per_second: 100, page_size: 4096, is_little_endian: true };
    let stats = KernelStats::from_read(Cursor::new(text.as_bytes()), &info)
        .map_err(|e| SampleError::parse(path, format!("not a valid /proc/stat: {e}")))?;
    Ok(CpuTimes::from_kernel_stats(&stats))
}

/// Reads and parses /proc/stat (or a file in its format).
pub fn read_proc_stat(path: &Path) -> Result<CpuTimes, SampleError> {
    parse_proc_stat(&super::read_text(path)?, path)
}

/// Busy share between two readings in basis points (0 ..= 10 000), rounded to the nearest.
///
/// `None` when no time passed (nothing to divide by) or a counter went backwards (the readings do not belong
/// together, e.g. they straddle a counter reset); the caller then simply waits for the next pair.
pub fn busy_bp(prev: CpuTimes, cur: CpuTimes) -> Option<u16> {
    let d_total = cur.total.checked_sub(prev.total)?;
    let d_busy = cur.busy.checked_sub(prev.busy)?;
    // iowait may decrease between readings (see proc(5)), which can make Δbusy exceed Δtotal by a tick or two;
    // ratio_bp clamps that, and returns None when no time passed.
    super::ratio_bp(u128::from(d_busy), u128::from(d_total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::testdata;

    #[test]
    fn recorded_samples_give_hand_computed_times() {
        let (path, text) = testdata("proc_stat_1.txt");
        let first = parse_proc_stat(&text, &path).unwrap();
        // cpu  13220 0 2003 241006 247 0 55 7 300 0
        // busy = 13220 + 0 + 2003 + 0 + 55 + 7 = 15285; total = 15285 + 241006 + 247 = 256538
        assert_eq!(first, CpuTimes { busy: 15_285, total: 256_538 });

        let (path, text) = testdata("proc_stat_2.txt");
        let second = parse_proc_stat(&text, &path).unwrap();
        // cpu  13370 5 2048 241126 252 0 60 7 330 0
        // busy = 13370 + 5 + 2048 + 0 + 60 + 7 = 15490; total = 15490 + 241126 + 252 = 256868
        assert_eq!(second, CpuTimes { busy: 15_490, total: 256_868 });

        // Δbusy = 205, Δtotal = 330: 205 / 330 = 0.621212… → 6212 bp
        assert_eq!(busy_bp(first, second), Some(6_212));
    }

    #[test]
    fn short_cpu_line_of_an_old_kernel_parses() {
        let text = "cpu  100 0 50 850\ncpu0 100 0 50 850\nctxt 1\nbtime 2\nprocesses 3\n";
        let times = parse_proc_stat(text, Path::new("mem")).unwrap();
        assert_eq!(times, CpuTimes { busy: 150, total: 1_000 });
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let err = parse_proc_stat("cpu  x y z\n", Path::new("/proc/stat")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/proc/stat"), "{text}");
        assert!(parse_proc_stat("", Path::new("/proc/stat")).is_err());
    }

    #[test]
    fn busy_bp_edges() {
        let a = CpuTimes { busy: 100, total: 1_000 };
        assert_eq!(busy_bp(a, a), None, "no time passed");
        assert_eq!(busy_bp(a, CpuTimes { busy: 99, total: 1_100 }), None, "busy went backwards");
        assert_eq!(busy_bp(a, CpuTimes { busy: 150, total: 999 }), None, "total went backwards");
        assert_eq!(busy_bp(a, CpuTimes { busy: 100, total: 1_100 }), Some(0));
        assert_eq!(busy_bp(a, CpuTimes { busy: 200, total: 1_100 }), Some(10_000));
        assert_eq!(busy_bp(a, CpuTimes { busy: 205, total: 1_100 }), Some(10_000), "clamped");
        assert_eq!(busy_bp(a, CpuTimes { busy: 101, total: 1_003 }), Some(3_333));
        assert_eq!(busy_bp(a, CpuTimes { busy: 102, total: 1_003 }), Some(6_667), "rounds to nearest");
        let big = CpuTimes { busy: u64::MAX - 10, total: u64::MAX - 10 };
        assert_eq!(busy_bp(big, CpuTimes { busy: u64::MAX, total: u64::MAX }), Some(10_000), "no overflow");
    }
}
