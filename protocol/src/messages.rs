//! The messages agents and directors exchange.
//!
//! Quantities are integers in fixed units (basis points, microseconds, bytes) rather than floats: a report can
//! never carry NaN or infinity, it round-trips exactly, and range checks are plain comparisons.

use std::net::IpAddr;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::version::VersionRange;

/// Longest agent or director name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Most service ports one agent may stand for.
pub const MAX_PORTS: usize = 32;
/// Longest free-text field (software version, reason text), in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// 100 % in basis points.
pub const FULL_SCALE_BP: u16 = 10_000;

/// Agent → director.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    Report(LoadReport),
    Goodbye(Goodbye),
}

/// Director → agent.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum DirectorMessage {
    Welcome(Welcome),
    Reject(Reject),
    Ack(Ack),
}

/// First message on a connection. Always sent in a version-1 frame, whatever the agent's newest version, so
/// that any director can read it and answer with the version both speak (see [`crate::negotiate`]).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's identity; must be one of the DNS names in its client certificate.
    pub agent_name: String,
    /// Protocol versions the agent speaks.
    pub versions: VersionRange,
    /// The real server this agent stands for, as configured on the director.
    pub real_server: IpAddr,
    /// The service ports on that real server (the director checks each is configured).
    pub ports: Vec<u16>,
    /// The agent's software version, for logs and `fulcrumctl agents`.
    pub software: String,
}

/// The director's answer to a [`Hello`] it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Welcome {
    /// The version every later frame on this connection uses, in both directions.
    pub version: u16,
    pub director_name: String,
    pub instructions: Instructions,
}

/// The director's answer to a [`Hello`] it refuses; the director closes the connection after sending it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum RejectReason {
    /// No protocol version in common; `detail` names the director's range.
    UnsupportedVersion,
    /// The declared real server (or one of its ports) is not in the director's configuration.
    UnknownRealServer,
    /// The declared agent name is not a name in the client certificate.
    NameMismatch,
    /// The first message was not a Hello.
    ExpectedHello,
}

/// Acknowledges one report and carries the director's current wishes.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Ack {
    /// Sequence number of the acknowledged report.
    pub seq: u64,
    pub instructions: Instructions,
}

/// What the director asks of the agent; repeated in every Welcome and Ack so that a change reaches the agent
/// within one report interval.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Instructions {
    /// Requested report interval in milliseconds; 0 means "keep your configured interval".
    pub report_interval_ms: u32,
    /// The director is draining this real server (weight 0): no new connections will be sent to it.
    pub drain: bool,
}

/// A periodic load report.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct LoadReport {
    /// Increases by one per report; restarts at 1 with the agent process and at each reload (SIGHUP), which
    /// reconnects. The director tells reports apart by this and their receipt time, so a restart is no repeat.
    pub seq: u64,
    /// The interval this report covers, in milliseconds.
    pub interval_ms: u32,
    /// CPU utilisation over the interval; `None` until two samples exist.
    pub cpu: Option<CpuUsage>,
    /// 1, 5 and 15 minute load averages × 1000.
    pub load_avg_milli: [u32; 3],
    pub memory: MemoryUsage,
    /// CPU pressure stall information, where the kernel has PSI.
    pub cpu_pressure: Option<CpuPressure>,
    /// TCP connections in ESTABLISHED state on the service ports.
    pub established_connections: u32,
    pub probe: ProbeReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct CpuUsage {
    pub source: CpuSource,
    /// Busy share of the available CPU in basis points, 0 ..= 10 000. For a cgroup with a quota, "available"
    /// is the quota; otherwise it is every CPU the host has.
    pub busy_bp: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum CpuSource {
    /// Host-wide, from /proc/stat.
    ProcStat,
    /// A cgroup v1 (`cpuacct.usage` with `cpu.cfs_quota_us`).
    CgroupV1,
    /// A cgroup v2 (`cpu.stat` with `cpu.max`).
    CgroupV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct MemoryUsage {
    pub used_bytes: u64,
    pub total_bytes: u64,
}

/// The `some` line of /proc/pressure/cpu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct CpuPressure {
    /// Share of the last 10 s in which some task stalled on CPU, in basis points.
    pub some_avg10_bp: u16,
    /// The same over 60 s.
    pub some_avg60_bp: u16,
    /// Total stall time since boot, in microseconds.
    pub some_total_us: u64,
}

/// The agent's own measurement of the service's response time.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct ProbeReport {
    pub kind: ProbeKind,
    /// The latest probe.
    pub last: ProbeOutcome,
    /// Exponentially smoothed response time (TCP: connect time; HTTP: time to first byte) over successful
    /// probes, in microseconds; `None` before the first success.
    pub smoothed_us: Option<u32>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Failures since the agent started.
    pub total_failures: u64,
}

impl ProbeReport {
    /// The response time the director goes by, in microseconds: the smoothed figure while the latest probe
    /// succeeded; `None` when it failed or none has completed. The agent probes several times per report
    /// interval, so the smoothed figure mostly averages the last interval's probes, where one probe alone is a
    /// poor sample of a service that answers in microseconds or, when its CPU quota is spent, milliseconds.
    pub fn response_time_us(&self) -> Option<u32> {
        match self.last {
            ProbeOutcome::Ok(_) => self.smoothed_us,
            ProbeOutcome::Pending | ProbeOutcome::Failed(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum ProbeKind {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum ProbeOutcome {
    /// No probe has completed yet.
    Pending,
    Ok(ProbeSample),
    Failed(ProbeFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct ProbeSample {
    /// TCP connect time, microseconds.
    pub connect_us: u32,
    /// HTTP: time from sending the request to the first response byte, microseconds.
    pub first_byte_us: Option<u32>,
    /// HTTP: the response status.
    pub http_status: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum ProbeFailure {
    ConnectRefused,
    Timeout,
    /// Any other connect or read error (unreachable, reset, …).
    Network,
    /// The response was not HTTP.
    BadResponse,
    /// The status was outside the configured expected range.
    HttpStatus(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Goodbye {
    pub reason: GoodbyeReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum GoodbyeReason {
    /// The agent is stopping (SIGTERM or SIGINT).
    Shutdown,
}

/// A decoded message that breaks one of the protocol's semantic limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("{field} is {len} bytes long; the limit is {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {value}; the largest valid value is {max}")]
    OutOfRange { field: &'static str, value: u64, max: u64 },
    #[error("{field} is not a DNS name")]
    NotADnsName { field: &'static str },
    #[error("version range {min}..={max} is empty")]
    EmptyVersionRange { min: u16, max: u16 },
}

/// Whether `name` is a DNS name (letters, digits and '-' in dot-separated labels): agent and director names
/// must be, because they are matched against certificate subject-alternative names.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Messages check their semantic limits after decoding, so that no caller sees an impossible value.
pub trait Validate {
    fn validate(&self) -> Result<(), InvalidMessage>;
}

fn check_text(field: &'static str, text: &str, max: usize, may_be_empty: bool) -> Result<(), InvalidMessage> {
    if !may_be_empty && text.is_empty() {
        return Err(InvalidMessage::Empty { field });
    }
    if text.len() > max {
        return Err(InvalidMessage::TooLong { field, len: text.len(), max });
    }
    Ok(())
}

fn check_bp(field: &'static str, value: u16) -> Result<(), InvalidMessage> {
    if value > FULL_SCALE_BP {
        return Err(InvalidMessage::OutOfRange { field, value: value.into(), max: FULL_SCALE_BP.into() });
    }
    Ok(())
}

impl Validate for AgentMessage {
    fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            AgentMessage::Hello(hello) => {
                check_text("hello.agent_name", &hello.agent_name, MAX_NAME_LEN, false)?;
                if !is_dns_name(&hello.agent_name) {
                    return Err(InvalidMessage::NotADnsName { field: "hello.agent_name" });
                }
                check_text("hello.software", &hello.software, MAX_TEXT_LEN, true)?;
                if hello.versions.min > hello.versions.max {
                    return Err(InvalidMessage::EmptyVersionRange { min: hello.versions.min, max: hello.versions.max });
                }
                if hello.ports.is_empty() {
                    return Err(InvalidMessage::Empty { field: "hello.ports" });
                }
                if hello.ports.len() > MAX_PORTS {
                    return Err(InvalidMessage::TooLong {
                        field: "hello.ports",
                        len: hello.ports.len(),
                        max: MAX_PORTS,
                    });
                }
                Ok(())
            }
            AgentMessage::Report(report) => {
                if let Some(cpu) = report.cpu {
                    check_bp("report.cpu.busy_bp", cpu.busy_bp)?;
                }
                if let Some(psi) = report.cpu_pressure {
                    check_bp("report.cpu_pressure.some_avg10_bp", psi.some_avg10_bp)?;
                    check_bp("report.cpu_pressure.some_avg60_bp", psi.some_avg60_bp)?;
                }
                if report.memory.used_bytes > report.memory.total_bytes {
                    return Err(InvalidMessage::OutOfRange {
                        field: "report.memory.used_bytes",
                        value: report.memory.used_bytes,
                        max: report.memory.total_bytes,
                    });
                }
                Ok(())
            }
            AgentMessage::Goodbye(_) => Ok(()),
        }
    }
}

impl Validate for DirectorMessage {
    fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            DirectorMessage::Welcome(welcome) => {
                check_text("welcome.director_name", &welcome.director_name, MAX_NAME_LEN, false)
            }
            DirectorMessage::Reject(reject) => check_text("reject.detail", &reject.detail, MAX_TEXT_LEN, true),
            DirectorMessage::Ack(_) => Ok(()),
        }
    }
}
