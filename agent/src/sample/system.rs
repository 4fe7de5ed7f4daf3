//! Load average, memory, CPU pressure and established service connections.

use std::io::{Cursor, ErrorKind};
use std::path::Path;

use fulcrum_protocol::{CpuPressure, MemoryUsage, FULL_SCALE_BP};
use procfs::{FromRead, Meminfo};

use super::SampleError;

pub const PROC_LOADAVG: &str = "/proc/loadavg";
pub const PROC_MEMINFO: &str = "/proc/meminfo";
pub const PROC_PRESSURE_CPU: &str = "/proc/pressure/cpu";
pub const PROC_NET_TCP: &str = "/proc/net/tcp";
pub const PROC_NET_TCP6: &str = "/proc/net/tcp6";

/// `st` value of an ESTABLISHED socket in /proc/net/tcp (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 0x01;

/// Parses an unsigned decimal such as `12.34` into an integer scaled by 10^`decimals` (`12.34`, 3 → 12340),
/// rounding half up on extra digits. Exact, unlike going through a float: the kernel prints these numbers with
/// two decimals, and scaling by 100 or 1000 must not turn 0.29 into 289.
fn parse_scaled(text: &str, decimals: u32) -> Option<u64> {
    let (int, frac) = match text.split_once('.') {
        Some((int, frac)) if !frac.is_empty() => (int, frac),
        Some(_) => return None,
        None => (text, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut value: u64 = int.parse().ok()?;
    let mut digits = frac.bytes().map(|b| u64::from(b - b'0'));
    for _ in 0..decimals {
        value = value.checked_mul(10)?.checked_add(digits.next().unwrap_or(0))?;
    }
    if digits.next().is_some_and(|d| d >= 5) {
        value = value.checked_add(1)?;
    }
    Some(value)
}

/// The 1, 5 and 15 minute load averages × 1000 from the text of /proc/loadavg.
pub fn parse_loadavg(text: &str, path: &Path) -> Result<[u32; 3], SampleError> {
    let mut fields = text.split_whitespace();
    let mut out = [0u32; 3];
    for (slot, window) in out.iter_mut().zip(["1", "5", "15"]) {
        let field =
            fields.next().ok_or_else(|| SampleError::parse(path, format!("no {window}-minute load average")))?;
        let milli = parse_scaled(field, 3).ok_or_else(|| {
            SampleError::parse(path, format!("{window}-minute load average {field:?} is not a number"))
        })?;
        // A load over four million is not going to be reported faithfully by anyone; saturate rather than fail.
        *slot = u32::try_from(milli).unwrap_or(u32::MAX);
    }
    Ok(out)
}

pub fn read_loadavg(path: &Path) -> Result<[u32; 3], SampleError> {
    parse_loadavg(&super::read_text(path)?, path)
}

/// Memory in use from the text of /proc/meminfo: MemTotal − MemAvailable.
///
/// MemAvailable is the kernel's own estimate of what could be handed to a new workload without swapping (free
/// memory plus reclaimable cache), which is what "used" should mean for load balancing; MemTotal − MemFree would
/// count the page cache as used and make every long-running server look full.
pub fn parse_meminfo(text: &str, path: &Path) -> Result<MemoryUsage, SampleError> {
    let info = Meminfo::from_read(Cursor::new(text.as_bytes()))
        .map_err(|e| SampleError::parse(path, format!("not a valid /proc/meminfo: {e}")))?;
    let available =
        info.mem_available.ok_or_else(|| SampleError::parse(path, "no MemAvailable line (kernel older than 3.14?)"))?;
    Ok(MemoryUsage { used_bytes: info.mem_total.saturating_sub(available), total_bytes: info.mem_total })
}

pub fn read_meminfo(path: &Path) -> Result<MemoryUsage, SampleError> {
    parse_meminfo(&super::read_text(path)?, path)
}

/// The `some` line of /proc/pressure/cpu, e.g. `some avg10=1.53 avg60=0.67 avg300=1.22 total=9043242`.
///
/// The averages are percentages with two decimals, so × 100 is exact basis points.
pub fn parse_cpu_pressure(text: &str, path: &Path) -> Result<CpuPressure, SampleError> {
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, line)| line.split_whitespace().next() == Some("some"))
        .ok_or_else(|| SampleError::parse(path, "no \"some\" line"))?;
    let line_no = index + 1;
    let (mut avg10, mut avg60, mut total) = (None, None, None);
    for field in line.split_whitespace().skip(1) {
        let Some((key, value)) = field.split_once('=') else {
            return Err(SampleError::line(path, line_no, format!("field {field:?} is not key=value")));
        };
        let bad = || SampleError::line(path, line_no, format!("{key} value {value:?} is not a number"));
        match key {
            "avg10" => avg10 = Some(parse_scaled(value, 2).ok_or_else(bad)?),
            "avg60" => avg60 = Some(parse_scaled(value, 2).ok_or_else(bad)?),
            "total" => total = Some(value.parse::<u64>().map_err(|_| bad())?),
            // avg300 is not reported; unknown future fields are tolerated.
            _ => {}
        }
    }
    let missing = |key: &str| SampleError::line(path, line_no, format!("no {key} field"));
    // A percentage cannot exceed 100; clamp so a rounding quirk can never produce a report the director rejects.
    let bp = |v: u64| u16::try_from(v.min(u64::from(FULL_SCALE_BP))).unwrap_or(FULL_SCALE_BP);
    Ok(CpuPressure {
        some_avg10_bp: bp(avg10.ok_or_else(|| missing("avg10"))?),
        some_avg60_bp: bp(avg60.ok_or_else(|| missing("avg60"))?),
        some_total_us: total.ok_or_else(|| missing("total"))?,
    })
}

/// CPU pressure, or `None` when the kernel has no PSI: the file is missing (CONFIG_PSI off, kernel < 4.20), or
/// present but reading it fails with EOPNOTSUPP (CONFIG_PSI on, booted with psi=0).
pub fn read_cpu_pressure(path: &Path) -> Result<Option<CpuPressure>, SampleError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_cpu_pressure(&text, path).map(Some),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Unsupported) => Ok(None),
        Err(source) => Err(SampleError::Io { path: path.to_owned(), source }),
    }
}

/// Counts the sockets in /proc/net/tcp or /proc/net/tcp6 text that are ESTABLISHED and whose local port is
/// one of `ports`.
///
/// Matching the local port counts connections clients made to the services, and not the agent's own (or any
/// other process's) outgoing connections that happen to go to such a port elsewhere. A line that does not parse
/// is an error, not skipped: a silently short count would look like a lightly loaded server.
pub fn count_established(text: &str, ports: &[u16], path: &Path) -> Result<u32, SampleError> {
    let mut count: u32 = 0;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if index == 0 && first == "sl" {
            continue;
        }
        let err = |what: String| SampleError::line(path, line_no, what);
        let slot = first.strip_suffix(':').unwrap_or("");
        if slot.is_empty() || !slot.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(format!("slot {first:?} is not a number followed by ':'")));
        }
        let local = fields.next().ok_or_else(|| err("no local address".into()))?;
        let remote = fields.next().ok_or_else(|| err("no remote address".into()))?;
        let state = fields.next().ok_or_else(|| err("no state".into()))?;
        let local_port = parse_socket_address(local).ok_or_else(|| err(format!("bad local address {local:?}")))?;
        parse_socket_address(remote).ok_or_else(|| err(format!("bad remote address {remote:?}")))?;
        let state = match state.len() {
            2 => u8::from_str_radix(state, 16).ok(),
            _ => None,
        }
        .ok_or_else(|| err(format!("bad state {state:?}")))?;
        if state == TCP_ESTABLISHED && ports.contains(&local_port) {
            count = count.saturating_add(1);
        }
    }
    Ok(count)
}

/// `HEXADDR:HEXPORT` with an 8 (IPv4) or 32 (IPv6) digit address; returns the port.
fn parse_socket_address(field: &str) -> Option<u16> {
    let (addr, port) = field.split_once(':')?;
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(addr.len() == 8 || addr.len() == 32) || !hex(addr) || port.len() != 4 || !hex(port) {
        return None;
    }
    u16::from_str_radix(port, 16).ok()
}

/// Reads one /proc/net/tcp-format file; a missing file counts zero, because /proc/net/tcp6 does not exist when
/// IPv6 is disabled.
pub fn read_established(path: &Path, ports: &[u16]) -> Result<u32, SampleError> {
    match super::read_if_present(path)? {
        Some(text) => count_established(&text, ports, path),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::testdata;

    #[test]
    fn scaled_decimals_are_exact() {
        assert_eq!(parse_scaled("0.29", 3), Some(290));
        assert_eq!(parse_scaled("0.29", 2), Some(29));
        assert_eq!(parse_scaled("12", 3), Some(12_000));
        assert_eq!(parse_scaled("1.2345", 3), Some(1_235), "rounds half up");
        assert_eq!(parse_scaled("1.2344", 3), Some(1_234));
        assert_eq!(parse_scaled("100.00", 2), Some(10_000));
        for bad in ["", ".5", "5.", "-1.00", "1.2.3", "1e3", "abc", " 1.0", "99999999999999999999.0"] {
            assert_eq!(parse_scaled(bad, 2), None, "{bad:?}");
        }
    }

    #[test]
    fn loadavg_recorded_sample() {
        let (path, text) = testdata("loadavg.txt");
        assert_eq!(parse_loadavg(&text, &path).unwrap(), [520, 280, 1_150]);
    }

    #[test]
    fn loadavg_errors_name_the_file() {
        let err = parse_loadavg("0.52 0.28\n", Path::new("/proc/loadavg")).unwrap_err().to_string();
        assert!(err.contains("/proc/loadavg") && err.contains("15-minute"), "{err}");
        let err = parse_loadavg("0.52 x 1.0 1/2 3\n", Path::new("/proc/loadavg")).unwrap_err().to_string();
        assert!(err.contains("5-minute") && err.contains("\"x\""), "{err}");
    }

    #[test]
    fn meminfo_recorded_sample() {
        let (path, text) = testdata("meminfo.txt");
        let memory = parse_meminfo(&text, &path).unwrap();
        // MemTotal 24730032 kB, MemAvailable 24369436 kB
        assert_eq!(memory.total_bytes, 24_730_032 * 1024);
        assert_eq!(memory.used_bytes, (24_730_032 - 24_369_436) * 1024);
    }

    #[test]
    fn meminfo_without_available_is_an_error() {
        let (path, text) = testdata("meminfo.txt");
        let old: String = text.lines().filter(|l| !l.starts_with("MemAvailable")).map(|l| format!("{l}\n")).collect();
        let err = parse_meminfo(&old, &path).unwrap_err().to_string();
        assert!(err.contains("MemAvailable") && err.contains("meminfo.txt"), "{err}");
        assert!(parse_meminfo("garbage\n", &path).is_err());
    }

    #[test]
    fn pressure_recorded_samples() {
        let (path, text) = testdata("pressure_cpu.txt");
        assert_eq!(
            parse_cpu_pressure(&text, &path).unwrap(),
            CpuPressure { some_avg10_bp: 1_234, some_avg60_bp: 67, some_total_us: 9_043_242 }
        );
        // Kernels before 5.13 print only the `some` line for CPU.
        let (path, text) = testdata("pressure_cpu_some_only.txt");
        assert_eq!(
            parse_cpu_pressure(&text, &path).unwrap(),
            CpuPressure { some_avg10_bp: 10_000, some_avg60_bp: 9_999, some_total_us: 18_446_744_073 }
        );
    }

    #[test]
    fn pressure_errors() {
        let p = Path::new("/proc/pressure/cpu");
        assert!(parse_cpu_pressure("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", p).is_err());
        let err = parse_cpu_pressure("some avg10=x avg60=0.00 avg300=0.00 total=0\n", p).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("avg10"), "{err}");
        let err = parse_cpu_pressure("\nsome avg10=1.00 avg300=0.00 total=0\n", p).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("avg60"), "{err}");
        assert!(parse_cpu_pressure("some avg10\n", p).is_err());
        // More than 100 % cannot happen, but must not produce an out-of-range report if it did.
        let psi = parse_cpu_pressure("some avg10=100.01 avg60=250.00 avg300=0.00 total=1\n", p).unwrap();
        assert_eq!((psi.some_avg10_bp, psi.some_avg60_bp), (10_000, 10_000));
    }

    #[test]
    fn missing_pressure_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_cpu_pressure(&dir.path().join("cpu")).unwrap(), None);
        // A directory cannot be read as text: a real error, not "no PSI".
        assert!(read_cpu_pressure(dir.path()).is_err());
    }

    #[test]
    fn established_on_recorded_tcp_and_tcp6() {
        let (path, text) = testdata("proc_net_tcp.txt");
        // Lines 3, 4 (port 80) and 5 (port 443) are ESTABLISHED on a service port. Not counted: the listeners,
        // ssh on 22, TIME_WAIT and CLOSE_WAIT on 80, and an outgoing connection to a remote port 80.
        assert_eq!(count_established(&text, &[80, 443], &path).unwrap(), 3);
        assert_eq!(count_established(&text, &[22], &path).unwrap(), 1);
        assert_eq!(count_established(&text, &[40_000], &path).unwrap(), 1);
        assert_eq!(count_established(&text, &[], &path).unwrap(), 0);

        let (path, text) = testdata("proc_net_tcp6.txt");
        // A v4-mapped connection on 80 and 2001:db8::1 on 443; ::1 on 8080 is not a service port here.
        assert_eq!(count_established(&text, &[80, 443], &path).unwrap(), 2);
        assert_eq!(count_established(&text, &[8080], &path).unwrap(), 1);
    }

    #[test]
    fn malformed_tcp_line_names_its_number() {
        let (path, text) = testdata("proc_net_tcp.txt");
        let mut lines: Vec<&str> = text.lines().collect();
        lines[4] = "   3: 0A00000A:0050 6501A8C0 01 00000000:00000000";
        let err = count_established(&lines.join("\n"), &[80], &path).unwrap_err().to_string();
        assert!(err.contains("line 5") && err.contains("proc_net_tcp.txt"), "{err}");

        let p = Path::new("/proc/net/tcp");
        for bad in [
            "   0: 0100007F:1F90",
            "   0: 0100007F:1F90 0100007F:D2F0 1",
            "   0: 0100007F:1F90 0100007F:D2F0 ZZ",
            "   0: 0100007F1F90 0100007F:D2F0 01",
            "   0: 0100007:1F90 0100007F:D2F0 01",
            "   0: 0100007F:1F9 0100007F:D2F0 01",
            "   x: 0100007F:1F90 0100007F:D2F0 01",
            "   0 0100007F:1F90 0100007F:D2F0 01",
            "   : 0100007F:1F90 0100007F:D2F0 01",
        ] {
            let err = count_established(bad, &[8080], p).unwrap_err().to_string();
            assert!(err.contains("line 1"), "{bad:?}: {err}");
        }
        // A header is only a header on the first line.
        assert!(count_established("  sl  local_address\n  sl  local_address\n", &[80], p).is_err());
        // Blank lines (e.g. a trailing newline) are not entries.
        assert_eq!(count_established("\n   0: 0100007F:1F90 0100007F:D2F0 01\n\n", &[8080], p).unwrap(), 1);
    }

    #[test]
    fn missing_tcp6_counts_zero() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_established(&dir.path().join("tcp6"), &[80]).unwrap(), 0);
    }
}
