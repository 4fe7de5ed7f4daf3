//! Active health checks (TCP connect, HTTP GET), as keepalived's `TCP_CHECK` and `HTTP_GET`: the I/O half of
//! health checking. One tokio task per real server and service runs a check every `interval_ms`, each bounded
//! by `timeout_ms`, and sends the [`CheckResult`] to the feedback task, which feeds its `HealthState`.
//!
//! Checks go to the real server's own address (in `dr` and `tun` the real server answers on the VIP too, but
//! the director must not address the VIP it serves itself), at `[service.health] port` or the server's port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{CheckFailure, CheckResult};
use crate::config::{DirectorConfig, HealthCheckKind};
use crate::control_plane::ServiceKey;

/// Most response bytes an HTTP check reads (status line, headers and the start of the body).
pub const MAX_HTTP_RESPONSE: usize = 64 * 1024;

/// What to check, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub service: ServiceKey,
    /// The real server, as the service names it.
    pub address: Ipv4Addr,
    pub port: u16,
    /// Where the check connects.
    pub target: SocketAddr,
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Http { path: String, host: String, status: RangeInclusive<u16>, body: Option<String> },
}

/// One check's result, with the time it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOutcome {
    pub service: ServiceKey,
    pub address: Ipv4Addr,
    pub port: u16,
    pub at: Instant,
    pub result: CheckResult,
}

/// Every active check `config` asks for.
pub fn specs(config: &DirectorConfig) -> Vec<CheckSpec> {
    let mut specs = Vec::new();
    for service in &config.services {
        let h = &service.health;
        let kind = match h.kind {
            HealthCheckKind::None => continue,
            HealthCheckKind::Tcp => CheckKind::Tcp,
            HealthCheckKind::Http => CheckKind::Http {
                path: h.path.clone(),
                host: h.host.clone().unwrap_or_default(),
                // `DirectorConfig::check` refused an unparsable range.
                status: h.status_range().unwrap_or(200..=399),
                body: h.body.clone(),
            },
        };
        let key = ServiceKey { vip: service.vip, port: service.port, protocol: service.protocol };
        for server in &service.servers {
            let IpAddr::V4(address) = server.address else { continue };
            let port = server.port_for(service);
            let mut kind = kind.clone();
            if let CheckKind::Http { host, .. } = &mut kind {
                if host.is_empty() {
                    *host = address.to_string();
                }
            }
            specs.push(CheckSpec {
                service: key,
                address,
                port,
                target: SocketAddr::from((address, h.port.unwrap_or(port))),
                kind,
                interval: Duration::from_millis(h.interval_ms.into()),
                timeout: Duration::from_millis(h.timeout_ms.into()),
            });
        }
    }
    specs
}

/// Checks `spec` every interval forever, sending each result; ends when the receiver is gone.
pub async fn run(spec: CheckSpec, results: mpsc::Sender<CheckOutcome>) {
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = check(&spec).await;
        let outcome =
            CheckOutcome { service: spec.service, address: spec.address, port: spec.port, at: Instant::now(), result };
        if results.send(outcome).await.is_err() {
            return;
        }
    }
}

/// One check, bounded by the spec's timeout.
pub async fn check(spec: &CheckSpec) -> CheckResult {
    match tokio::time::timeout(spec.timeout, attempt(spec)).await {
        Ok(Ok(())) => CheckResult::Success,
        Ok(Err(failure)) => CheckResult::Failure(failure),
        Err(_) => CheckResult::Failure(CheckFailure::Timeout),
    }
}

async fn attempt(spec: &CheckSpec) -> Result<(), CheckFailure> {
    let mut stream = TcpStream::connect(spec.target).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => CheckFailure::Refused,
        _ => CheckFailure::Network,
    })?;
    let CheckKind::Http { path, host, status, body } = &spec.kind else { return Ok(()) };
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: fulcrum-health\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|_| CheckFailure::Network)?;
    let mut response = Vec::with_capacity(4096);
    let mut limited = (&mut stream).take(MAX_HTTP_RESPONSE as u64);
    limited.read_to_end(&mut response).await.map_err(|_| CheckFailure::Network)?;
    judge(&response, status, body.as_deref())
}

/// Whether an HTTP response has a status in `status` and, when asked, `body` in its body.
pub fn judge(response: &[u8], status: &RangeInclusive<u16>, body: Option<&str>) -> Result<(), CheckFailure> {
    let line_end = response.iter().position(|&b| b == b'\n').ok_or(CheckFailure::BadResponse)?;
    let line = std::str::from_utf8(&response[..line_end]).map_err(|_| CheckFailure::BadResponse)?;
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().ok_or(CheckFailure::BadResponse)?;
    let code: u16 = parts.next().and_then(|c| c.parse().ok()).ok_or(CheckFailure::BadResponse)?;
    if !version.starts_with("HTTP/1.") || !status.contains(&code) {
        return Err(CheckFailure::BadResponse);
    }
    if let Some(wanted) = body {
        let start = response.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).unwrap_or(response.len());
        let found = response[start..].windows(wanted.len()).any(|w| w == wanted.as_bytes());
        if !found {
            return Err(CheckFailure::BadResponse);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(judge(ok, &(200..=399), None), Ok(()));
        assert_eq!(judge(ok, &(200..=399), Some("ell")), Ok(()));
        assert_eq!(judge(ok, &(200..=399), Some("bye")), Err(CheckFailure::BadResponse));
        assert_eq!(judge(ok, &(300..=399), None), Err(CheckFailure::BadResponse));
        assert_eq!(judge(b"HTTP/1.0 503 Busy\r\n\r\n", &(200..=399), None), Err(CheckFailure::BadResponse));
        assert_eq!(judge(b"SSH-2.0-OpenSSH\r\n", &(200..=399), None), Err(CheckFailure::BadResponse));
        assert_eq!(judge(b"", &(200..=399), None), Err(CheckFailure::BadResponse));
        // The body substring is looked for in the body only, not in the headers.
        let header_only = b"HTTP/1.1 200 OK\r\nX-Word: hello\r\n\r\nbye";
        assert_eq!(judge(header_only, &(200..=399), Some("hello")), Err(CheckFailure::BadResponse));
    }

    fn spec(target: SocketAddr, kind: CheckKind) -> CheckSpec {
        CheckSpec {
            service: ServiceKey {
                vip: "10.0.0.100".parse().unwrap(),
                port: 80,
                protocol: crate::config::Protocol::Tcp,
            },
            address: Ipv4Addr::LOCALHOST,
            port: target.port(),
            target,
            kind,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
        }
    }

    /// Real sockets on loopback: a listener passes a TCP check, a closed port is refused, an HTTP server's answer
    /// is judged.
    #[tokio::test]
    async fn checks_real_sockets() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(check(&spec(tcp.local_addr().unwrap(), CheckKind::Tcp)).await, CheckResult::Success);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();

        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\nall good", "HTTP/1.1 500 Oops\r\n\r\n"] {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 1024];
                let n = conn.read(&mut request).await.unwrap();
                assert!(request[..n].starts_with(b"GET /health HTTP/1.0\r\nHost: web\r\n"));
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let http = CheckKind::Http {
            path: "/health".into(),
            host: "web".into(),
            status: 200..=299,
            body: Some("good".into()),
        };
        assert_eq!(check(&spec(open, http.clone())).await, CheckResult::Success);
        assert_eq!(check(&spec(open, http)).await, CheckResult::Failure(CheckFailure::BadResponse));
        server.await.unwrap();

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(check(&spec(closed, CheckKind::Tcp)).await, CheckResult::Failure(CheckFailure::Refused));
    }
}
