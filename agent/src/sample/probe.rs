//! The agent's own measurement of the service's response time: a TCP connect or a minimal HTTP GET.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use fulcrum_protocol::{ProbeFailure, ProbeKind, ProbeOutcome, ProbeReport, ProbeSample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes read while looking for the end of the HTTP status line; a real status line is a few dozen bytes,
/// so anything longer is not HTTP and reading on would only let a broken server keep us busy.
pub const MAX_STATUS_LINE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub kind: ProbeKind,
    pub target: SocketAddr,
    /// Host header of the HTTP request.
    pub http_host: String,
    /// Request target of the HTTP request, e.g. `/healthz`.
    pub http_path: String,
    /// HTTP statuses that count as success.
    pub expect_status: RangeInclusive<u16>,
    /// Bound on the whole probe (connect, request, status line).
    pub timeout: Duration,
}

/// A [`ProbeConfig`] that cannot produce a valid probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidProbeConfig {
    #[error("http_path {0:?} must start with '/' and contain no whitespace or control characters")]
    HttpPath(String),
    #[error("http_host {0:?} must be non-empty and contain no whitespace or control characters")]
    HttpHost(String),
    #[error("expect_status {start}..={end} is empty or outside 100..=999")]
    ExpectStatus { start: u16, end: u16 },
    #[error("the probe timeout must be greater than zero")]
    ZeroTimeout,
}

impl ProbeConfig {
    /// Checks what [`probe_once`] relies on: host and path go into the request verbatim, so a space or CR/LF
    /// in them would produce a malformed request (or smuggle extra headers) rather than a failed probe.
    /// The HTTP fields are only checked for HTTP probes.
    pub fn validate(&self) -> Result<(), InvalidProbeConfig> {
        let clean = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if self.kind == ProbeKind::Http {
            if !self.http_path.starts_with('/') || !clean(&self.http_path) {
                return Err(InvalidProbeConfig::HttpPath(self.http_path.clone()));
            }
            if !clean(&self.http_host) {
                return Err(InvalidProbeConfig::HttpHost(self.http_host.clone()));
            }
            let (start, end) = (*self.expect_status.start(), *self.expect_status.end());
            if start > end || start < 100 || end > 999 {
                return Err(InvalidProbeConfig::ExpectStatus { start, end });
            }
        }
        if self.timeout.is_zero() {
            return Err(InvalidProbeConfig::ZeroTimeout);
        }
        Ok(())
    }
}

/// Runs one probe. TCP: the time to connect. HTTP: connect, send a `GET`, and read the status line; the time is
/// from sending the request to the first response byte. The response body is not read, and the connection is
/// closed (the request says `Connection: close`).
pub async fn probe_once(cfg: &ProbeConfig) -> Result<ProbeSample, ProbeFailure> {
    match tokio::time::timeout(cfg.timeout, probe_inner(cfg)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ProbeFailure::Timeout),
    }
}

async fn probe_inner(cfg: &ProbeConfig) -> Result<ProbeSample, ProbeFailure> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(cfg.target).await.map_err(io_failure)?;
    let connect_us = micros(start.elapsed());
    if cfg.kind == ProbeKind::Tcp {
        return Ok(ProbeSample { connect_us, first_byte_us: None, http_status: None });
    }

    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fulcrum-agent\r\nConnection: close\r\n\r\n",
        cfg.http_path, cfg.http_host
    );
    let sent = Instant::now();
    stream.write_all(request.as_bytes()).await.map_err(io_failure)?;

    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    let mut first_byte_us = None;
    loop {
        let Some(free) = buf.get_mut(len..).filter(|free| !free.is_empty()) else {
            // A full buffer without a line end: not an HTTP status line.
            return Err(ProbeFailure::BadResponse);
        };
        let n = stream.read(free).await.map_err(io_failure)?;
        if n == 0 {
            break;
        }
        if first_byte_us.is_none() {
            first_byte_us = Some(micros(sent.elapsed()));
        }
        len += n;
        if buf[..len].contains(&b'\n') {
            break;
        }
    }
    let status = parse_status_line(&buf[..len]).ok_or(ProbeFailure::BadResponse)?;
    if !cfg.expect_status.contains(&status) {
        return Err(ProbeFailure::HttpStatus(status));
    }
    Ok(ProbeSample { connect_us, first_byte_us, http_status: Some(status) })
}

/// The status code of an HTTP/1.x (or later) status line such as `HTTP/1.1 200 OK`, from the start of a
/// response. The line ends at the first LF (with or without CR) or, if the peer closed first, at the end of
/// the bytes.
pub fn parse_status_line(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let (version, rest) = rest.split_at(space);
    let version_ok = version.first().is_some_and(u8::is_ascii_digit)
        && version.last().is_some_and(u8::is_ascii_digit)
        && version.iter().all(|&b| b.is_ascii_digit() || b == b'.');
    let rest = rest.get(1..)?;
    let (code, reason) = rest.split_at(rest.len().min(3));
    if !version_ok || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) || code[0] == b'0' {
        return None;
    }
    // After the code comes a space and an optional reason phrase, or nothing.
    if !(reason.is_empty() || reason[0] == b' ') {
        return None;
    }
    Some(code.iter().fold(0u16, |v, &d| v * 10 + u16::from(d - b'0')))
}

fn io_failure(e: std::io::Error) -> ProbeFailure {
    match e.kind() {
        ErrorKind::ConnectionRefused => ProbeFailure::ConnectRefused,
        // The kernel gave up before our own timeout did (e.g. SYN retries exhausted).
        ErrorKind::TimedOut => ProbeFailure::Timeout,
        _ => ProbeFailure::Network,
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The smoothing factor's value must lie in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("probe smoothing factor {0} is not in (0, 1]")]
pub struct InvalidAlpha(pub f64);

/// Keeps what a [`ProbeReport`] says about a series of probe outcomes.
///
/// The smoothed response time is an exponentially weighted moving average over successful probes:
/// `s ← α·x + (1 − α)·s`, starting at the first success. α = 0.3 by default: a lasting change of the response
/// time shows up two-thirds within 3 probes and 97 % within 10, while a single slow probe moves the average by
/// only 30 % of its excess, so one outlier does not swing the director's weights. Failures leave it alone: a
/// refused connection has no response time, and counting the timeout as one would mix two different signals
/// that the report already carries separately.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTracker {
    kind: ProbeKind,
    alpha: f64,
    last: ProbeOutcome,
    smoothed_us: Option<f64>,
    consecutive_failures: u32,
    total_failures: u64,
}

impl ProbeTracker {
    pub const DEFAULT_ALPHA: f64 = 0.3;

    /// A tracker with smoothing factor `alpha`, which should lie in (0, 1] (1 disables smoothing). The
    /// configuration checks it; should an invalid value get here anyway (NaN, 0, negative, > 1), the tracker uses
    /// [`Self::DEFAULT_ALPHA`] rather than produce a meaningless average. Use [`Self::try_new`] to get an error.
    pub fn new(kind: ProbeKind, alpha: f64) -> ProbeTracker {
        ProbeTracker::try_new(kind, alpha).unwrap_or_else(|_| ProbeTracker::with_valid_alpha(kind, Self::DEFAULT_ALPHA))
    }

    /// Like [`Self::new`], but an `alpha` outside (0, 1] is an error.
    pub fn try_new(kind: ProbeKind, alpha: f64) -> Result<ProbeTracker, InvalidAlpha> {
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(InvalidAlpha(alpha));
        }
        Ok(ProbeTracker::with_valid_alpha(kind, alpha))
    }

    fn with_valid_alpha(kind: ProbeKind, alpha: f64) -> ProbeTracker {
        ProbeTracker {
            kind,
            alpha,
            last: ProbeOutcome::Pending,
            smoothed_us: None,
            consecutive_failures: 0,
            total_failures: 0,
        }
    }

    pub fn record(&mut self, outcome: Result<ProbeSample, ProbeFailure>) {
        match outcome {
            Ok(sample) => {
                // HTTP measures the service (time to first byte); TCP only what it can, the connect.
                let value = match self.kind {
                    ProbeKind::Http => sample.first_byte_us.unwrap_or(sample.connect_us),
                    ProbeKind::Tcp => sample.connect_us,
                };
                let value = f64::from(value);
                self.smoothed_us = Some(match self.smoothed_us {
                    None => value,
                    Some(s) => self.alpha * value + (1.0 - self.alpha) * s,
                });
                self.consecutive_failures = 0;
                self.last = ProbeOutcome::Ok(sample);
            }
            Err(failure) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.total_failures = self.total_failures.saturating_add(1);
                self.last = ProbeOutcome::Failed(failure);
            }
        }
    }

    pub fn report(&self) -> ProbeReport {
        ProbeReport {
            kind: self.kind,
            last: self.last,
            // The average of u32 values stays within u32; `as` saturates anyway and is exact after rounding.
            smoothed_us: self.smoothed_us.map(|s| s.round() as u32),
            consecutive_failures: self.consecutive_failures,
            total_failures: self.total_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    fn ok(connect_us: u32, first_byte_us: Option<u32>) -> Result<ProbeSample, ProbeFailure> {
        Ok(ProbeSample { connect_us, first_byte_us, http_status: first_byte_us.map(|_| 200) })
    }

    #[test]
    fn tracker_starts_pending() {
        let report = ProbeTracker::new(ProbeKind::Http, ProbeTracker::DEFAULT_ALPHA).report();
        assert_eq!(
            report,
            ProbeReport {
                kind: ProbeKind::Http,
                last: ProbeOutcome::Pending,
                smoothed_us: None,
                consecutive_failures: 0,
                total_failures: 0
            }
        );
    }

    #[test]
    fn tracker_smooths_successes_and_counts_failures() {
        let mut t = ProbeTracker::new(ProbeKind::Http, ProbeTracker::DEFAULT_ALPHA);
        t.record(Err(ProbeFailure::ConnectRefused));
        assert_eq!(t.report().smoothed_us, None);
        assert_eq!((t.report().consecutive_failures, t.report().total_failures), (1, 1));

        // HTTP smooths the first-byte time, not the connect time.
        t.record(ok(50, Some(1_000)));
        assert_eq!(t.report().smoothed_us, Some(1_000), "the first success starts the average");
        assert_eq!(t.report().consecutive_failures, 0);
        assert_eq!(t.report().total_failures, 1);

        t.record(ok(50, Some(2_000)));
        // 0.3 × 2000 + 0.7 × 1000 = 1300
        assert_eq!(t.report().smoothed_us, Some(1_300));
        assert_eq!(t.report().response_time_us(), Some(1_300), "the director goes by the smoothed figure");

        t.record(Err(ProbeFailure::Timeout));
        t.record(Err(ProbeFailure::HttpStatus(503)));
        let report = t.report();
        assert_eq!(report.smoothed_us, Some(1_300), "failures do not move the average");
        assert_eq!(report.response_time_us(), None, "a failing service has no response time");
        assert_eq!(report.last, ProbeOutcome::Failed(ProbeFailure::HttpStatus(503)));
        assert_eq!((report.consecutive_failures, report.total_failures), (2, 3));

        t.record(ok(50, Some(300)));
        // 0.3 × 300 + 0.7 × 1300 = 1000
        let report = t.report();
        assert_eq!(report.smoothed_us, Some(1_000));
        assert_eq!(report.last, ok(50, Some(300)).map(ProbeOutcome::Ok).unwrap());
        assert_eq!((report.consecutive_failures, report.total_failures), (0, 3));
    }

    #[test]
    fn tcp_tracker_uses_connect_time_and_alpha_is_configurable() {
        let mut t = ProbeTracker::try_new(ProbeKind::Tcp, 0.5).unwrap();
        t.record(ok(100, None));
        t.record(ok(200, Some(9_999)));
        assert_eq!(t.report().smoothed_us, Some(150));
        let mut raw = ProbeTracker::try_new(ProbeKind::Tcp, 1.0).unwrap();
        raw.record(ok(100, None));
        raw.record(ok(7, None));
        assert_eq!(raw.report().smoothed_us, Some(7));
        for bad in [0.0, -0.1, 1.01, f64::NAN, f64::INFINITY] {
            assert!(ProbeTracker::try_new(ProbeKind::Tcp, bad).is_err(), "{bad}");
            // The infallible constructor falls back to the default.
            let mut fallback = ProbeTracker::new(ProbeKind::Tcp, bad);
            fallback.record(ok(1_000, None));
            fallback.record(ok(2_000, None));
            assert_eq!(fallback.report().smoothed_us, Some(1_300), "{bad}");
        }
    }

    #[test]
    fn tracker_saturates_at_extremes() {
        let mut t = ProbeTracker::new(ProbeKind::Tcp, 0.3);
        t.record(ok(u32::MAX, None));
        t.record(ok(u32::MAX, None));
        assert_eq!(t.report().smoothed_us, Some(u32::MAX));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable\n"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/2 404 "), Some(404), "closed before the line end");
        for bad in [
            &b""[..],
            b"\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"HTTP/1.1 20 OK\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 099 x\r\n",
            b"HTTP/1.1  200 OK\r\n",
            b"HTTP/ 200 OK\r\n",
            b"HTTP/1.x 200 OK\r\n",
            b"HTTP/1.1 2x0 OK\r\n",
            b"http/1.1 200 OK\r\n",
            b"HTTP/1.1\r\n200 OK\r\n",
        ] {
            assert_eq!(parse_status_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A one-connection server: reads the request head, sends it to the test, answers with `response`, and then
    /// keeps the connection open until the test ends (so that "never answers" really never answers).
    async fn serve_once(response: &'static [u8]) -> (SocketAddr, oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap() == 1 {
                head.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            stream.write_all(response).await.unwrap();
            // Hold the connection until the peer goes away.
            let mut sink = [0u8; 64];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        (addr, rx)
    }

    fn http(target: SocketAddr, timeout_ms: u64) -> ProbeConfig {
        ProbeConfig {
            kind: ProbeKind::Http,
            target,
            http_host: "www.example.test".into(),
            http_path: "/healthz".into(),
            expect_status: 200..=399,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn config_validation() {
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let good = http(addr, 1_000);
        assert_eq!(good.validate(), Ok(()));
        let path = |p: &str| ProbeConfig { http_path: p.into(), ..good.clone() }.validate();
        assert!(matches!(path("healthz"), Err(InvalidProbeConfig::HttpPath(_))));
        assert!(matches!(path("/a b"), Err(InvalidProbeConfig::HttpPath(_))));
        assert!(matches!(path("/a\r\nX-Evil: 1"), Err(InvalidProbeConfig::HttpPath(_))));
        let host = |h: &str| ProbeConfig { http_host: h.into(), ..good.clone() }.validate();
        assert!(matches!(host(""), Err(InvalidProbeConfig::HttpHost(_))));
        assert!(matches!(host("a\nb"), Err(InvalidProbeConfig::HttpHost(_))));
        assert_eq!(host("[::1]:8080"), Ok(()));
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 400..=200;
        for range in [empty, 0..=200, 200..=1000] {
            let cfg = ProbeConfig { expect_status: range, ..good.clone() };
            assert!(matches!(cfg.validate(), Err(InvalidProbeConfig::ExpectStatus { .. })));
        }
        let zero = ProbeConfig { timeout: Duration::ZERO, ..good.clone() };
        assert_eq!(zero.validate(), Err(InvalidProbeConfig::ZeroTimeout));
        // A TCP probe does not use the HTTP fields.
        let tcp = ProbeConfig { kind: ProbeKind::Tcp, http_path: String::new(), http_host: String::new(), ..good };
        assert_eq!(tcp.validate(), Ok(()));
    }

    #[tokio::test]
    async fn http_200_sends_the_documented_request() {
        let (addr, request) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let sample = probe_once(&http(addr, 5_000)).await.unwrap();
        assert_eq!(sample.http_status, Some(200));
        assert!(sample.first_byte_us.is_some());
        assert_eq!(
            request.await.unwrap(),
            "GET /healthz HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: fulcrum-agent\r\nConnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn http_503_is_a_status_failure() {
        let (addr, _request) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(probe_once(&http(addr, 5_000)).await, Err(ProbeFailure::HttpStatus(503)));
    }

    #[tokio::test]
    async fn expected_range_is_configurable() {
        let (addr, _request) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let cfg = ProbeConfig { expect_status: 500..=503, ..http(addr, 5_000) };
        assert_eq!(probe_once(&cfg).await.unwrap().http_status, Some(503));
    }

    #[tokio::test]
    async fn garbage_is_a_bad_response() {
        let (addr, _request) = serve_once(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        assert_eq!(probe_once(&http(addr, 5_000)).await, Err(ProbeFailure::BadResponse));
    }

    #[tokio::test]
    async fn endless_status_line_is_a_bad_response() {
        static LONG: [u8; 4096] = [b'A'; 4096];
        let (addr, _request) = serve_once(&LONG).await;
        assert_eq!(probe_once(&http(addr, 5_000)).await, Err(ProbeFailure::BadResponse));
    }

    #[tokio::test]
    async fn close_without_answer_is_a_bad_response() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.shutdown().await;
            // Keep the socket (not just its write side) until the client is done, so it sees EOF, not a reset.
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        assert_eq!(probe_once(&http(addr, 5_000)).await, Err(ProbeFailure::BadResponse));
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        // Accepts (the kernel does, via the backlog) but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        assert_eq!(probe_once(&http(addr, 200)).await, Err(ProbeFailure::Timeout));
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(listener);
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert_eq!(probe_once(&http(addr, 5_000)).await, Err(ProbeFailure::ConnectRefused));
        let tcp = ProbeConfig { kind: ProbeKind::Tcp, ..http(addr, 5_000) };
        assert_eq!(probe_once(&tcp).await, Err(ProbeFailure::ConnectRefused));
    }

    #[tokio::test]
    async fn tcp_probe_only_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = ProbeConfig { kind: ProbeKind::Tcp, ..http(addr, 5_000) };
        let sample = probe_once(&tcp).await.unwrap();
        assert_eq!((sample.first_byte_us, sample.http_status), (None, None));
        drop(listener);
    }
}
