//! The QUIC listener agents report to, and the registry of their latest reports.
//!
//! Each agent connection carries one bidirectional stream: `Hello` → `Welcome`/`Reject`, then `Report` →
//! `Ack` until `Goodbye` or the connection ends. An agent is accepted only when its certificate chains to the
//! cluster CA (checked by TLS), its declared name is a name in that certificate, and the real server and ports
//! it stands for are configured. A bad frame closes only that agent's connection.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use fulcrum_protocol::stream::{read_frame, write_frame, StreamError};
use fulcrum_protocol::{
    negotiate, Ack, AgentMessage, DirectorMessage, FrameError, Hello, Instructions, LoadReport, Reject, RejectReason,
    VersionRange, Welcome, HELLO_VERSION,
};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::config::DirectorConfig;
use crate::tls;

/// QUIC application close codes the director uses.
pub mod close_code {
    /// The agent said goodbye, or the director is shutting down.
    pub const NORMAL: u32 = 0;
    /// The agent was refused (see the `Reject` sent before closing).
    pub const REJECTED: u32 = 1;
    /// The agent sent a frame that could not be decoded, or broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 2;
}

/// How long an agent has to open its stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the director knows about the agent of one real server.
#[derive(Debug, Clone)]
struct AgentRecord {
    agent_name: String,
    remote: SocketAddr,
    software: String,
    protocol_version: u16,
    connected: bool,
    /// When the current (or last) connection was accepted.
    since: SystemTime,
    /// Why the last connection ended, if it has.
    disconnect_reason: Option<String>,
    connections: u64,
    reports: u64,
    last_report: Option<(LoadReport, Instant)>,
}

/// A snapshot of one agent's state, as `fulcrumctl agents` and the metrics show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AgentView {
    pub real_server: IpAddr,
    pub agent_name: String,
    pub remote: SocketAddr,
    pub software: String,
    pub protocol_version: u16,
    pub connected: bool,
    pub since_unix_ms: u64,
    pub disconnect_reason: Option<String>,
    /// Connections accepted from this agent since the director started.
    pub connections: u64,
    pub reports: u64,
    /// Milliseconds since the last report arrived.
    pub report_age_ms: Option<u64>,
    pub last_report: Option<LoadReport>,
}

/// One agent as the feedback task sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentLatest {
    pub real_server: IpAddr,
    pub connected: bool,
    /// The newest report and when it arrived.
    pub report: Option<(LoadReport, Instant)>,
}

/// Latest report per real server, shared by the listener, the control socket and the metrics endpoint.
///
/// A plain mutex: it is touched once per report and once per query, never on the packet path.
#[derive(Debug, Clone, Default)]
pub struct AgentRegistry {
    records: Arc<Mutex<BTreeMap<IpAddr, AgentRecord>>>,
    /// Woken by every report, so that the feedback task blends it at once rather than at its next period.
    reported: Arc<Notify>,
}

impl AgentRegistry {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<IpAddr, AgentRecord>) -> T) -> T {
        // A panic while holding the lock cannot leave a record half-written in a way that matters here.
        f(&mut self.records.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn connected(&self, hello: &Hello, remote: SocketAddr, version: u16) {
        self.with(|records| {
            let previous = records.get(&hello.real_server);
            if let Some(prev) = previous.filter(|p| p.connected && p.agent_name != hello.agent_name) {
                warn!(
                    server = %hello.real_server, old = %prev.agent_name, new = %hello.agent_name,
                    "a second agent claims this real server; the newest connection wins"
                );
            }
            let connections = previous.map_or(0, |p| p.connections) + 1;
            let reports = previous.map_or(0, |p| p.reports);
            let last_report = previous.and_then(|p| p.last_report.clone());
            records.insert(
                hello.real_server,
                AgentRecord {
                    agent_name: hello.agent_name.clone(),
                    remote,
                    software: hello.software.clone(),
                    protocol_version: version,
                    connected: true,
                    since: SystemTime::now(),
                    disconnect_reason: None,
                    connections,
                    reports,
                    last_report,
                },
            );
        });
        metrics::counter!("fulcrum_agent_connections_total", "server" => hello.real_server.to_string()).increment(1);
    }

    /// Records a report from the connection at `remote`; false (and nothing recorded) when a newer connection
    /// for the same real server has replaced it: the newest connection wins, and two connections writing to
    /// one record would interleave unrelated reports (two agents configured with the same real server, or an
    /// agent's old connection not yet timed out).
    fn report(&self, server: IpAddr, remote: SocketAddr, report: LoadReport, now: Instant) -> bool {
        let accepted = self.with(|records| match records.get_mut(&server).filter(|r| r.remote == remote) {
            Some(record) => {
                record.reports += 1;
                record.last_report = Some((report, now));
                true
            }
            None => false,
        });
        if accepted {
            self.reported.notify_one();
            metrics::counter!("fulcrum_agent_reports_received_total", "server" => server.to_string()).increment(1);
        }
        accepted
    }

    /// Marks the agent's connection as ended, unless a newer connection for the same server has replaced it.
    fn disconnected(&self, server: IpAddr, remote: SocketAddr, reason: String) {
        self.with(|records| {
            if let Some(record) = records.get_mut(&server).filter(|r| r.remote == remote && r.connected) {
                record.connected = false;
                record.disconnect_reason = Some(reason);
            }
        });
    }

    /// Resolves once a report has arrived since the last call returned (a report that arrives while nobody
    /// waits is kept, so none is missed); reports that arrive together wake it once.
    pub async fn report_arrived(&self) {
        self.reported.notified().await;
    }

    /// Every agent the director has heard from, by real server address.
    pub fn snapshot(&self, now: Instant) -> Vec<(IpAddr, AgentView)> {
        self.with(|records| {
            records
                .iter()
                .map(|(server, r)| {
                    let view = AgentView {
                        real_server: *server,
                        agent_name: r.agent_name.clone(),
                        remote: r.remote,
                        software: r.software.clone(),
                        protocol_version: r.protocol_version,
                        connected: r.connected,
                        since_unix_ms: r
                            .since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                        disconnect_reason: r.disconnect_reason.clone(),
                        connections: r.connections,
                        reports: r.reports,
                        report_age_ms: r
                            .last_report
                            .as_ref()
                            .map(|(_, at)| now.saturating_duration_since(*at).as_millis() as u64),
                        last_report: r.last_report.as_ref().map(|(report, _)| report.clone()),
                    };
                    (*server, view)
                })
                .collect()
        })
    }

    /// Each agent's connection state and newest report with its receipt time: the feedback task's input.
    pub fn latest(&self) -> Vec<AgentLatest> {
        self.with(|records| {
            records
                .iter()
                .map(|(server, r)| AgentLatest {
                    real_server: *server,
                    connected: r.connected,
                    report: r.last_report.clone(),
                })
                .collect()
        })
    }

    /// Sets the per-agent gauges; called at scrape time so that ages are current.
    pub fn publish_metrics(&self, now: Instant) {
        for (server, view) in self.snapshot(now) {
            let label = server.to_string();
            metrics::gauge!("fulcrum_server_agent_connected", "server" => label.clone())
                .set(f64::from(u8::from(view.connected)));
            if let Some(age) = view.report_age_ms {
                metrics::gauge!("fulcrum_server_report_age_seconds", "server" => label.clone())
                    .set(age as f64 / 1000.0);
            }
            let Some(report) = view.last_report else { continue };
            if let Some(cpu) = report.cpu {
                metrics::gauge!("fulcrum_server_cpu_ratio", "server" => label.clone())
                    .set(f64::from(cpu.busy_bp) / f64::from(fulcrum_protocol::FULL_SCALE_BP));
            }
            if let Some(us) = report.probe.response_time_us() {
                metrics::gauge!("fulcrum_server_response_time_seconds", "server" => label.clone())
                    .set(f64::from(us) / 1e6);
            }
            if let Some(psi) = report.cpu_pressure {
                metrics::gauge!("fulcrum_server_cpu_pressure_ratio", "server" => label.clone())
                    .set(f64::from(psi.some_avg10_bp) / f64::from(fulcrum_protocol::FULL_SCALE_BP));
            }
            metrics::gauge!("fulcrum_server_probe_consecutive_failures", "server" => label.clone())
                .set(f64::from(report.probe.consecutive_failures));
            metrics::gauge!("fulcrum_server_established_connections", "server" => label)
                .set(f64::from(report.established_connections));
        }
    }
}

/// Counts a refused frame or agent by reason.
fn count_rejection(reason: &'static str) {
    metrics::counter!("fulcrum_agent_rejections_total", "reason" => reason).increment(1);
}

/// The agent listener.
pub struct AgentListener {
    endpoint: quinn::Endpoint,
    config: watch::Receiver<Arc<DirectorConfig>>,
    registry: AgentRegistry,
}

impl AgentListener {
    /// Binds the QUIC endpoint. `config` is watched so that a reload changes which servers are accepted and
    /// what agents are told, without dropping connections.
    pub fn bind(config: watch::Receiver<Arc<DirectorConfig>>, registry: AgentRegistry) -> Result<AgentListener> {
        let current = config.borrow().clone();
        let agents = &current.agents;
        let server_config = tls::server_config(&agents.ca, &agents.cert, &agents.key)?;
        let endpoint = quinn::Endpoint::server(server_config, agents.listen)
            .with_context(|| format!("binding the agent listener on UDP {}", agents.listen))?;
        info!(listen = %agents.listen, "agent listener ready");
        Ok(AgentListener { endpoint, config, registry })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().context("agent listener address")
    }

    /// Accepts agents until the endpoint is closed.
    pub async fn run(&self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let config = self.config.clone();
            let registry = self.registry.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(connection) => serve_agent(connection, config, registry).await,
                    Err(e) => {
                        count_rejection("handshake");
                        warn!(%remote, error = %e, "agent handshake failed");
                    }
                }
            });
        }
    }

    /// Closes every agent connection (agents reconnect to the restarted director).
    pub fn close(&self) {
        self.endpoint.close(close_code::NORMAL.into(), b"director shutting down");
    }
}

/// The instructions for the agent of `server` under the current config.
fn instructions(config: &DirectorConfig, server: IpAddr) -> Instructions {
    Instructions { report_interval_ms: config.agents.report_interval_ms, drain: config.is_drained(server) }
}

/// Why an agent's session ended.
enum SessionEnd {
    Goodbye,
    StreamClosed,
    Refused(RejectReason, String),
    /// The agent broke the protocol: the `fulcrum_agent_rejections_total` reason, and what happened.
    Protocol(&'static str, String),
    Transport(String),
    /// A newer connection for the same real server replaced this one.
    Superseded,
}

async fn serve_agent(
    connection: quinn::Connection,
    config: watch::Receiver<Arc<DirectorConfig>>,
    registry: AgentRegistry,
) {
    let remote = connection.remote_address();
    let chain = tls::peer_chain(&connection);
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "agent connection ended before opening its stream");
            return;
        }
        Err(_) => {
            count_rejection("hello_timeout");
            warn!(%remote, "agent opened no stream within {HELLO_TIMEOUT:?}; closing");
            connection.close(close_code::PROTOCOL_ERROR.into(), b"no hello");
            return;
        }
    };
    let mut buf = Vec::new();
    let mut out = Vec::new();

    // Hello, in a version-1 frame, within the deadline.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<AgentMessage, _>(&mut recv, &mut buf)).await {
        Ok(Ok(Some(frame))) if frame.version == HELLO_VERSION => match frame.message {
            AgentMessage::Hello(hello) => Ok(hello),
            _ => Err(SessionEnd::Refused(RejectReason::ExpectedHello, "the first message must be Hello".into())),
        },
        Ok(Ok(Some(frame))) => Err(SessionEnd::Protocol(
            "wrong_version",
            format!("Hello must be a version-{HELLO_VERSION} frame, got version {}", frame.version),
        )),
        Ok(Ok(None)) => Err(SessionEnd::StreamClosed),
        Ok(Err(e)) => Err(stream_error(e)),
        Err(_) => Err(SessionEnd::Protocol("hello_timeout", format!("no Hello within {HELLO_TIMEOUT:?}"))),
    };
    let accepted = hello.and_then(|hello| {
        let version = negotiate(VersionRange::SUPPORTED, hello.versions)
            .map_err(|e| SessionEnd::Refused(RejectReason::UnsupportedVersion, e.to_string()))?;
        if !tls::certificate_names(&chain, &hello.agent_name) {
            return Err(SessionEnd::Refused(
                RejectReason::NameMismatch,
                format!("agent name {:?} is not a name in its certificate", hello.agent_name),
            ));
        }
        let current = config.borrow().clone();
        if let Some(port) = hello.ports.iter().find(|port| !current.has_real_server(hello.real_server, **port)) {
            return Err(SessionEnd::Refused(
                RejectReason::UnknownRealServer,
                format!("real server {}:{port} is not configured on this director", hello.real_server),
            ));
        }
        Ok((hello, version))
    });
    let (hello, version) = match accepted {
        Ok(accepted) => accepted,
        Err(end) => {
            finish(&connection, &mut send, &mut out, None, remote, end).await;
            return;
        }
    };

    let server = hello.real_server;
    // One borrow at a time: a watch borrow is a read lock, and a second one taken while a configuration reload
    // waits to write would wait behind it for ever.
    let current = Arc::clone(&config.borrow());
    let welcome = DirectorMessage::Welcome(Welcome {
        version,
        director_name: current.name.clone(),
        instructions: instructions(&current, server),
    });
    drop(current);
    if let Err(e) = write_frame(&mut send, version, &welcome, &mut out).await {
        warn!(%remote, error = %e, "could not welcome agent");
        return;
    }
    registry.connected(&hello, remote, version);
    info!(agent = %hello.agent_name, %server, %remote, version, "agent connected");

    let end = loop {
        let frame = match read_frame::<AgentMessage, _>(&mut recv, &mut buf).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break SessionEnd::StreamClosed,
            Err(e) => break stream_error(e),
        };
        if frame.version != version {
            break SessionEnd::Protocol(
                "wrong_version",
                FrameError::WrongVersion { found: frame.version, expected: version }.to_string(),
            );
        }
        match frame.message {
            AgentMessage::Report(report) => {
                // A reload may have removed the server since the Hello: its reports would feed nothing.
                if !hello.ports.iter().any(|port| config.borrow().has_real_server(server, *port)) {
                    break SessionEnd::Refused(
                        RejectReason::UnknownRealServer,
                        format!("real server {server} is no longer configured on this director"),
                    );
                }
                let seq = report.seq;
                if !registry.report(server, remote, report, Instant::now()) {
                    break SessionEnd::Superseded;
                }
                let ack = DirectorMessage::Ack(Ack { seq, instructions: instructions(&config.borrow(), server) });
                if let Err(e) = write_frame(&mut send, version, &ack, &mut out).await {
                    break stream_error(e);
                }
            }
            AgentMessage::Goodbye(_) => break SessionEnd::Goodbye,
            AgentMessage::Hello(_) => {
                break SessionEnd::Protocol("malformed_frame", "a second Hello on the same connection".into())
            }
        }
    };
    let reason = finish(&connection, &mut send, &mut out, Some(version), remote, end).await;
    registry.disconnected(server, remote, reason.clone());
    info!(agent = %hello.agent_name, %server, %remote, %reason, "agent disconnected");
}

fn stream_error(e: StreamError) -> SessionEnd {
    match e {
        StreamError::Frame(frame) => SessionEnd::Protocol("malformed_frame", frame.to_string()),
        StreamError::EndInsideFrame { .. } => SessionEnd::Protocol("malformed_frame", e.to_string()),
        StreamError::Io(io) => SessionEnd::Transport(io.to_string()),
    }
}

/// Ends a session: sends a Reject where one is due, closes the connection with the matching code, logs, and
/// returns the reason in a few words.
async fn finish(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    out: &mut Vec<u8>,
    version: Option<u16>,
    remote: SocketAddr,
    end: SessionEnd,
) -> String {
    match end {
        SessionEnd::Goodbye => {
            let _ = send.finish();
            connection.close(close_code::NORMAL.into(), b"goodbye");
            "goodbye".to_string()
        }
        SessionEnd::StreamClosed => {
            let _ = send.finish();
            connection.close(close_code::NORMAL.into(), b"stream closed");
            "the agent closed its stream".to_string()
        }
        SessionEnd::Refused(reason, detail) => {
            count_rejection(match reason {
                RejectReason::UnsupportedVersion => "unsupported_version",
                RejectReason::UnknownRealServer => "unknown_real_server",
                RejectReason::NameMismatch => "name_mismatch",
                RejectReason::ExpectedHello => "expected_hello",
            });
            warn!(%remote, ?reason, %detail, "agent refused");
            let reject = DirectorMessage::Reject(Reject { reason, detail: truncate(&detail) });
            // The Reject travels in the version the agent is sure to read.
            if write_frame(send, version.unwrap_or(HELLO_VERSION), &reject, out).await.is_ok() {
                let _ = send.finish();
                // Let the Reject reach the agent before the close discards unsent stream data.
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            }
            connection.close(close_code::REJECTED.into(), b"rejected");
            format!("refused: {detail}")
        }
        SessionEnd::Protocol(reason, detail) => {
            count_rejection(reason);
            warn!(%remote, %detail, "agent broke the protocol; closing its connection");
            connection.close(close_code::PROTOCOL_ERROR.into(), truncate(&detail).as_bytes());
            format!("protocol error: {detail}")
        }
        SessionEnd::Transport(detail) => {
            debug!(%remote, %detail, "agent connection lost");
            format!("connection lost: {detail}")
        }
        SessionEnd::Superseded => {
            let _ = send.finish();
            warn!(%remote, "a newer connection for this real server replaced this one; closing it");
            connection.close(close_code::NORMAL.into(), b"superseded");
            "superseded by a newer connection".to_string()
        }
    }
}

fn truncate(text: &str) -> String {
    let mut end = text.len().min(fulcrum_protocol::MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use fulcrum_protocol::fixtures::load_report;

    /// Polls `future` once, without a runtime.
    fn ready(future: impl Future<Output = ()>) -> bool {
        pin!(future).poll(&mut Context::from_waker(Waker::noop())) == Poll::Ready(())
    }

    fn hello(name: &str, server: IpAddr) -> Hello {
        Hello {
            agent_name: name.to_string(),
            versions: VersionRange::SUPPORTED,
            real_server: server,
            ports: vec![80],
            software: "test".to_string(),
        }
    }

    #[test]
    fn a_report_wakes_the_feedback_task_once_even_when_nobody_waited() {
        let registry = AgentRegistry::default();
        let server: IpAddr = "10.0.0.11".parse().unwrap();
        let remote: SocketAddr = "10.0.0.11:40000".parse().unwrap();
        registry.connected(&hello("rs1", server), remote, 1);
        assert!(!ready(registry.report_arrived()), "no report yet");
        // Two reports before anyone waits: the wake-up is kept, and taken once.
        assert!(registry.report(server, remote, load_report(1, 5_000), Instant::now()));
        assert!(registry.report(server, remote, load_report(2, 5_000), Instant::now()));
        assert!(ready(registry.report_arrived()));
        assert!(!ready(registry.report_arrived()), "both reports were taken by one wake-up");
        assert!(registry.report(server, remote, load_report(3, 5_000), Instant::now()));
        assert!(ready(registry.report_arrived()));
    }

    #[test]
    fn the_newest_connection_for_a_real_server_is_the_only_one_heard() {
        let registry = AgentRegistry::default();
        let server: IpAddr = "10.0.0.11".parse().unwrap();
        let (old, new): (SocketAddr, SocketAddr) =
            ("10.0.0.11:40000".parse().unwrap(), "10.0.0.11:40001".parse().unwrap());
        registry.connected(&hello("rs1", server), old, 1);
        assert!(registry.report(server, old, load_report(7, 9_000), Instant::now()));
        // The agent reconnects (or a second agent claims the server): the old connection's reports are refused,
        // so the record never interleaves two unrelated sequences.
        registry.connected(&hello("rs1", server), new, 1);
        assert!(registry.report(server, new, load_report(1, 2_000), Instant::now()));
        assert!(!registry.report(server, old, load_report(8, 9_000), Instant::now()));
        let latest = registry.with(|records| records[&server].last_report.as_ref().map(|(r, _)| r.seq));
        assert_eq!(latest, Some(1));
        // The old connection ending does not mark the new one disconnected.
        registry.disconnected(server, old, "superseded".into());
        assert!(registry.with(|records| records[&server].connected));
        let never: IpAddr = "10.0.0.99".parse().unwrap();
        assert!(!registry.report(never, old, load_report(1, 0), Instant::now()), "no connection, no record");
    }
}
