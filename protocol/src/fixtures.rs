//! Sample messages for tests, this crate's and its users' (feature `test-fixtures`, meant for
//! `[dev-dependencies]`).

use crate::messages::{CpuSource, CpuUsage, LoadReport, MemoryUsage, ProbeKind, ProbeOutcome, ProbeReport};

/// An agent's report number `seq` of a 500 ms interval with `cpu_bp` of CPU busy, and nothing else measured.
pub fn load_report(seq: u64, cpu_bp: u16) -> LoadReport {
    LoadReport {
        seq,
        interval_ms: 500,
        cpu: Some(CpuUsage { source: CpuSource::ProcStat, busy_bp: cpu_bp }),
        load_avg_milli: [0; 3],
        memory: MemoryUsage { used_bytes: 1, total_bytes: 2 },
        cpu_pressure: None,
        established_connections: 0,
        probe: ProbeReport {
            kind: ProbeKind::Tcp,
            last: ProbeOutcome::Pending,
            smoothed_us: None,
            consecutive_failures: 0,
            total_failures: 0,
        },
    }
}
