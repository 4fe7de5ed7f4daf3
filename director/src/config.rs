//! The director's configuration file (`/etc/fulcrum/director.toml`).
//!
//! Every key is checked: unknown keys, bad values and inconsistent services are refused with the file, line
//! and key named (see [`fulcrum_protocol::config_file`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use fulcrum_protocol::config_file::{unreadable, ConfigError, ConfigText, KeyStep};
use fulcrum_protocol::{DEFAULT_REPORT_INTERVAL_MS, MAX_REPORT_INTERVAL_MS, MIN_REPORT_INTERVAL_MS};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/fulcrum/director.toml";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/fulcrum/director.sock";
/// LVS's weight range.
pub const MAX_WEIGHT: u32 = 65_535;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorConfig {
    /// This director's name: its node id, and a DNS name in its certificate.
    pub name: String,
    pub agents: AgentListenerConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The packet forwarder; without it the director only gathers agent reports.
    pub dataplane: Option<DataplaneConfig>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Connection synchronisation with the peer director.
    pub sync: Option<SyncSection>,
    /// The director pair; without it the director is standalone and always serves.
    pub ha: Option<HaSection>,
}

/// The AF_PACKET forwarder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// The interface clients reach the VIPs on (and, in this version, real servers too).
    pub interface: String,
    /// Forwarding worker threads, joined in one AF_PACKET fanout group.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Receive-ring slots per worker; each slot holds one frame of up to 64 KB (a GSO super-frame).
    #[serde(default = "default_ring_frames")]
    pub ring_frames: u32,
    /// Connection-table capacity per worker; a full table drops new connections (counted).
    #[serde(default = "default_connection_capacity")]
    pub connection_capacity: u32,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Gratuitous ARPs sent for each VIP when the director starts serving it.
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    #[serde(default = "default_garp_interval_ms")]
    pub garp_interval_ms: u32,
    /// Largest packet real servers can take in `tun` mode, outer header included; TCP SYNs through a
    /// tunnel get their MSS clamped to fit.
    #[serde(default = "default_tunnel_mtu")]
    pub tunnel_mtu: u32,
    /// After a busy turn, spin on the ring this long (µs) before sleeping: trades CPU for latency and
    /// throughput. 0 always sleeps.
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u32,
}

/// Connection timeouts in seconds, as LVS's (`ipvsadm --set` covers the first three).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    #[serde(default = "default_tcp_established_s")]
    pub tcp_established_s: u32,
    #[serde(default = "default_tcp_fin_wait_s")]
    pub tcp_fin_wait_s: u32,
    #[serde(default = "default_tcp_fin_wait_s")]
    pub tcp_time_wait_s: u32,
    #[serde(default = "default_tcp_close_s")]
    pub tcp_close_s: u32,
    #[serde(default = "default_tcp_syn_s")]
    pub tcp_syn_s: u32,
    #[serde(default = "default_udp_s")]
    pub udp_s: u32,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            tcp_established_s: default_tcp_established_s(),
            tcp_fin_wait_s: default_tcp_fin_wait_s(),
            tcp_time_wait_s: default_tcp_fin_wait_s(),
            tcp_close_s: default_tcp_close_s(),
            tcp_syn_s: default_tcp_syn_s(),
            udp_s: default_udp_s(),
        }
    }
}

fn default_workers() -> u32 {
    1
}
fn default_ring_frames() -> u32 {
    256
}
fn default_connection_capacity() -> u32 {
    1 << 20
}
fn default_garp_count() -> u32 {
    3
}
fn default_garp_interval_ms() -> u32 {
    100
}
fn default_busy_poll_us() -> u32 {
    50
}
fn default_tunnel_mtu() -> u32 {
    1500
}
fn default_tcp_established_s() -> u32 {
    900
}
fn default_tcp_fin_wait_s() -> u32 {
    120
}
fn default_tcp_close_s() -> u32 {
    10
}
fn default_tcp_syn_s() -> u32 {
    60
}
fn default_udp_s() -> u32 {
    300
}

/// Most forwarding workers.
pub const MAX_WORKERS: u32 = 64;

/// The QUIC listener agents report to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentListenerConfig {
    /// UDP address to listen on.
    #[serde(default = "default_agent_listen")]
    pub listen: SocketAddr,
    /// The cluster CA certificate (PEM) that agent certificates must chain to.
    pub ca: PathBuf,
    /// This director's certificate (PEM), issued by the cluster CA.
    pub cert: PathBuf,
    /// This director's private key (PEM).
    pub key: PathBuf,
    /// The report interval asked of agents, in milliseconds; 0 leaves each agent's own setting.
    #[serde(default)]
    pub report_interval_ms: u32,
}

fn default_agent_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], fulcrum_protocol::DEFAULT_AGENT_PORT))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket for `fulcrumctl`; created with mode 0600 (root only).
    #[serde(default = "default_control_socket")]
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { socket: default_control_socket() }
    }
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`); none when absent.
    pub listen: Option<SocketAddr>,
}

/// A virtual service: VIP, port and protocol, and the real servers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Sticky client → server for this many seconds (as `ipvsadm -p`); 0 disables persistence.
    #[serde(default)]
    pub persistence_s: u32,
    /// Accept non-SYN TCP packets without a connection entry.
    #[serde(default)]
    pub sloppy: bool,
    /// `[service.feedback]`: the dynamic-feedback blender.
    #[serde(default)]
    pub feedback: FeedbackSettings,
    /// `[service.health]`: health checks, quorum and sorry server.
    #[serde(default)]
    pub health: HealthSettings,
    #[serde(default, rename = "server")]
    pub servers: Vec<RealServerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// Scheduling algorithms, named as in LVS (the same names in the file and on `fulcrumctl`'s command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Rr,
    Wrr,
    Lc,
    #[default]
    Wlc,
    Sed,
    Nq,
    Sh,
    Dh,
    Mh,
    Lblc,
    Lblcr,
    /// Dynamic feedback.
    Df,
    /// Power of two choices, least connection.
    P2c,
}

impl Scheduler {
    /// Every algorithm, in declaration order.
    pub const ALL: [Scheduler; 13] = [
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Lc,
        Scheduler::Wlc,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::Sh,
        Scheduler::Dh,
        Scheduler::Mh,
        Scheduler::Lblc,
        Scheduler::Lblcr,
        Scheduler::Df,
        Scheduler::P2c,
    ];

    /// The lowercase name, as the file, `fulcrumctl -s` and `ipvsadm -s` spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sed => "sed",
            Scheduler::Nq => "nq",
            Scheduler::Sh => "sh",
            Scheduler::Dh => "dh",
            Scheduler::Mh => "mh",
            Scheduler::Lblc => "lblc",
            Scheduler::Lblcr => "lblcr",
            Scheduler::Df => "df",
            Scheduler::P2c => "p2c",
        }
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealServerConfig {
    pub address: IpAddr,
    /// Defaults to the service port.
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub forward: ForwardMethod,
}

fn default_weight() -> u32 {
    1
}

/// How packets reach a real server, as in LVS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMethod {
    /// Direct routing: rewrite the destination MAC only.
    #[default]
    Dr,
    /// Rewrite destination address and port; the director is the real servers' gateway.
    Nat,
    /// IP-in-IP encapsulation.
    Tun,
}

/// A semantic error: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", render_key(path))]
pub struct Invalid {
    pub path: Vec<KeyStep<'static>>,
    pub message: String,
}

fn invalid(path: &[KeyStep<'static>], message: impl Into<String>) -> Invalid {
    Invalid { path: path.to_vec(), message: message.into() }
}

fn render_key(path: &[KeyStep<'static>]) -> String {
    path.iter()
        .map(|step| match step {
            KeyStep::Key(k) => format!(".{k}"),
            KeyStep::Index(i) => format!("[{i}]"),
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

impl RealServerConfig {
    pub fn port_for(&self, service: &ServiceConfig) -> u16 {
        self.port.unwrap_or(service.port)
    }
}

impl DirectorConfig {
    /// Reads, parses and validates the file.
    pub fn load(path: &Path) -> Result<DirectorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| unreadable(path, &e))?;
        Self::from_text(path, &text)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn from_text(path: &Path, text: &str) -> Result<DirectorConfig, ConfigError> {
        let source = ConfigText::new(path, text);
        let config: DirectorConfig = source.parse()?;
        config.check().map_err(|e| source.error_at(&e.path, e.message))?;
        Ok(config)
    }

    /// Every semantic check, shared by the file loader and the control socket's edits.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.name.is_empty() || self.name.len() > fulcrum_protocol::MAX_NAME_LEN {
            return Err(invalid(
                &[KeyStep::Key("name")],
                format!("must be 1 to {} bytes long", fulcrum_protocol::MAX_NAME_LEN),
            ));
        }
        for (key, path) in [("ca", &self.agents.ca), ("cert", &self.agents.cert), ("key", &self.agents.key)] {
            if !path.is_file() {
                return Err(invalid(
                    &[KeyStep::Key("agents"), KeyStep::Key(key)],
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        let interval = self.agents.report_interval_ms;
        // An agent would clamp an interval outside its bounds, and the director would judge report ages against
        // an interval no agent runs at.
        if interval != 0 && !(MIN_REPORT_INTERVAL_MS..=MAX_REPORT_INTERVAL_MS).contains(&interval) {
            return Err(invalid(
                &[KeyStep::Key("agents"), KeyStep::Key("report_interval_ms")],
                format!(
                    "{interval} ms is outside {MIN_REPORT_INTERVAL_MS}..={MAX_REPORT_INTERVAL_MS} \
                     (0 leaves each agent's own interval)"
                ),
            ));
        }
        if let Some(dataplane) = &self.dataplane {
            let at = |key: &'static str| [KeyStep::Key("dataplane"), KeyStep::Key(key)];
            if dataplane.interface.is_empty() || dataplane.interface.len() > 15 || dataplane.interface.contains('/') {
                return Err(invalid(&at("interface"), format!("{:?} is not an interface name", dataplane.interface)));
            }
            if !(1..=MAX_WORKERS).contains(&dataplane.workers) {
                return Err(invalid(&at("workers"), format!("{} is outside 1..={MAX_WORKERS}", dataplane.workers)));
            }
            if !(8..=65_536).contains(&dataplane.ring_frames) {
                return Err(invalid(&at("ring_frames"), format!("{} is outside 8..=65536", dataplane.ring_frames)));
            }
            if !(1..=(1 << 26)).contains(&dataplane.connection_capacity) {
                return Err(invalid(
                    &at("connection_capacity"),
                    format!("{} is outside 1..={}", dataplane.connection_capacity, 1u32 << 26),
                ));
            }
            if dataplane.busy_poll_us > 10_000 {
                return Err(invalid(
                    &at("busy_poll_us"),
                    format!("{} µs is outside 0..=10000", dataplane.busy_poll_us),
                ));
            }
            if !(576..=9000).contains(&dataplane.tunnel_mtu) {
                return Err(invalid(&at("tunnel_mtu"), format!("{} is outside 576..=9000", dataplane.tunnel_mtu)));
            }
            let t = &dataplane.timeouts;
            for (key, value) in [
                ("tcp_established_s", t.tcp_established_s),
                ("tcp_fin_wait_s", t.tcp_fin_wait_s),
                ("tcp_time_wait_s", t.tcp_time_wait_s),
                ("tcp_close_s", t.tcp_close_s),
                ("tcp_syn_s", t.tcp_syn_s),
                ("udp_s", t.udp_s),
            ] {
                if !(1..=86_400 * 7).contains(&value) {
                    return Err(invalid(
                        &[KeyStep::Key("dataplane"), KeyStep::Key("timeouts"), KeyStep::Key(key)],
                        format!("{value} s is outside 1..=604800"),
                    ));
                }
            }
        }
        if let Some(ha) = &self.ha {
            if self.dataplane.is_none() {
                return Err(invalid(&[KeyStep::Key("ha")], "a director pair needs a [dataplane] section to serve"));
            }
            ha.check()?;
        }
        let mut services = HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |key: &'static str| [KeyStep::Key("service"), KeyStep::Index(i), KeyStep::Key(key)];
            if !services.insert((service.vip, service.port, service.protocol)) {
                return Err(invalid(
                    &at("vip"),
                    format!(
                        "duplicate service {}:{}/{:?}: each VIP, port and protocol may appear once",
                        service.vip, service.port, service.protocol
                    ),
                ));
            }
            if service.vip.is_unspecified() || service.vip.is_multicast() || service.vip.is_loopback() {
                return Err(invalid(&at("vip"), format!("{} cannot be a virtual IP", service.vip)));
            }
            if service.port == 0 {
                return Err(invalid(&at("port"), "port 0 cannot be served"));
            }
            if self.dataplane.is_some() && service.vip.is_ipv6() {
                return Err(invalid(&at("vip"), "IPv6 services are not forwarded yet; use an IPv4 VIP"));
            }
            let mut servers = HashSet::new();
            for (j, server) in service.servers.iter().enumerate() {
                let at = |key: &'static str| {
                    [
                        KeyStep::Key("service"),
                        KeyStep::Index(i),
                        KeyStep::Key("server"),
                        KeyStep::Index(j),
                        KeyStep::Key(key),
                    ]
                };
                if !servers.insert((server.address, server.port_for(service))) {
                    return Err(invalid(
                        &at("address"),
                        format!(
                            "duplicate real server {}:{} in this service",
                            server.address,
                            server.port_for(service)
                        ),
                    ));
                }
                if server.address.is_unspecified() || server.address.is_multicast() || server.address == service.vip {
                    return Err(invalid(&at("address"), format!("{} cannot be a real server", server.address)));
                }
                if server.weight > MAX_WEIGHT {
                    return Err(invalid(
                        &at("weight"),
                        format!("weight {} is out of range 0..={MAX_WEIGHT}", server.weight),
                    ));
                }
                if server.port == Some(0) {
                    return Err(invalid(&at("port"), "port 0 cannot be served"));
                }
            }
            service.feedback.check(i, service.scheduler, self.agents.report_interval_ms)?;
            service.health.check(i, service)?;
        }
        if let Some(sync) = &self.sync {
            if self.dataplane.is_none() {
                return Err(invalid(&[KeyStep::Key("sync")], "connection sync needs a [dataplane] section"));
            }
            sync.check()?;
        }
        Ok(())
    }

    /// Whether a real server at `address` is configured with `port` in some service.
    pub fn has_real_server(&self, address: IpAddr, port: u16) -> bool {
        self.real_servers().any(|(service, server)| server.address == address && server.port_for(service) == port)
    }

    /// Whether every configured entry for the real server at `address` has weight 0 (it is being drained).
    pub fn is_drained(&self, address: IpAddr) -> bool {
        let mut entries = self.real_servers().filter(|(_, server)| server.address == address).peekable();
        entries.peek().is_some() && entries.all(|(_, server)| server.weight == 0)
    }

    fn real_servers(&self) -> impl Iterator<Item = (&ServiceConfig, &RealServerConfig)> {
        self.services.iter().flat_map(|service| service.servers.iter().map(move |server| (service, server)))
    }
}

// ----- [sync]: connection synchronisation -----

/// Shortest accepted sync key.
/// A shared secret from `path` (the HA and sync keys): refused when readable by group or others, or
/// shorter than `min_len` bytes.
fn read_secret_key(path: &Path, min_len: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: the key must not be readable by others (chmod 600)",
            path.display()
        ));
    }
    let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if key.len() < min_len {
        return Err(format!("{} holds {} bytes; the key needs at least {min_len}", path.display(), key.len()));
    }
    Ok(key)
}

pub const MIN_SYNC_KEY_LEN: usize = crate::sync::frame::MIN_KEY_LEN;

/// The `[sync]` section: streaming connection-table changes to the peer director (see `sync`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// TCP address the peer connects to, to send us its changes.
    pub listen: SocketAddr,
    /// The peer's `listen` address: we connect there to send ours.
    pub peer: SocketAddr,
    /// The shared HMAC-SHA256 key: a file of at least 16 bytes, used as is, not readable by group or others.
    pub key_file: PathBuf,
    /// Records per second sent at most; changes beyond that coalesce (the latest state of a connection wins).
    #[serde(default = "default_sync_max_rate")]
    pub max_rate: u32,
    /// Most records per frame.
    #[serde(default = "default_sync_batch_records")]
    pub batch_records: u32,
    /// Longest a change waits for a frame to fill, ms.
    #[serde(default = "default_sync_batch_ms")]
    pub batch_ms: u32,
    /// While serving, every live connection is sent again once per this period (renews the peer's timeouts
    /// and repairs changes lost to a full ring), seconds.
    #[serde(default = "default_sync_refresh_s")]
    pub refresh_s: u32,
    /// Capacity of each worker's rings (changes out, records in), records.
    #[serde(default = "default_sync_ring_records")]
    pub ring_records: u32,
}

fn default_sync_max_rate() -> u32 {
    100_000
}
fn default_sync_batch_records() -> u32 {
    1024
}
fn default_sync_batch_ms() -> u32 {
    10
}
fn default_sync_refresh_s() -> u32 {
    60
}
fn default_sync_ring_records() -> u32 {
    65_536
}

impl SyncSection {
    fn check(&self) -> Result<(), Invalid> {
        let at = |key: &'static str| [KeyStep::Key("sync"), KeyStep::Key(key)];
        if self.peer == self.listen {
            return Err(invalid(&at("peer"), "the peer's address must not be our own listen address"));
        }
        if self.peer.ip().is_unspecified() || self.peer.port() == 0 {
            return Err(invalid(&at("peer"), format!("{} cannot be connected to", self.peer)));
        }
        if !(100..=10_000_000).contains(&self.max_rate) {
            return Err(invalid(&at("max_rate"), format!("{} is outside 100..=10000000", self.max_rate)));
        }
        let max_records = crate::sync::frame::MAX_RECORDS as u32;
        if !(1..=max_records).contains(&self.batch_records) {
            return Err(invalid(&at("batch_records"), format!("{} is outside 1..={max_records}", self.batch_records)));
        }
        if !(1..=1000).contains(&self.batch_ms) {
            return Err(invalid(&at("batch_ms"), format!("{} is outside 1..=1000", self.batch_ms)));
        }
        if !(1..=86_400).contains(&self.refresh_s) {
            return Err(invalid(&at("refresh_s"), format!("{} is outside 1..=86400", self.refresh_s)));
        }
        if !(1024..=(1 << 24)).contains(&self.ring_records) {
            return Err(invalid(&at("ring_records"), format!("{} is outside 1024..={}", self.ring_records, 1 << 24)));
        }
        self.read_key().map_err(|message| invalid(&at("key_file"), message))?;
        Ok(())
    }

    /// The key file's bytes; refused when shorter than [`MIN_SYNC_KEY_LEN`] or readable by group or others.
    pub fn read_key(&self) -> Result<Vec<u8>, String> {
        read_secret_key(&self.key_file, MIN_SYNC_KEY_LEN)
    }

    /// The sync task's settings (the key read from `key_file`).
    pub fn settings(&self) -> Result<crate::sync::runtime::SyncSettings, String> {
        Ok(crate::sync::runtime::SyncSettings {
            listen: self.listen,
            peer: self.peer,
            key: self.read_key()?,
            outbox: crate::sync::outbox::OutboxConfig {
                batch_records: self.batch_records as usize,
                batch_interval: std::time::Duration::from_millis(self.batch_ms.into()),
                max_rate: self.max_rate,
            },
        })
    }
}

// ----- [ha]: the director pair -----

/// The `[ha]` section: this director's side of the heartbeat protocol (see `ha` and `ha_runtime`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// This director's id in the pair (the two must differ); also breaks priority ties (higher wins).
    pub node_id: u32,
    /// 1..=255, higher is preferred.
    #[serde(default = "default_ha_priority")]
    pub priority: u32,
    /// The shared HMAC-SHA256 key: a file of at least 16 bytes, used as is, not readable by others
    /// (mode 0600 or 0400, as an SSH key).
    pub key_file: PathBuf,
    /// Heartbeat paths: one UDP socket each; every heartbeat goes out on all of them.
    #[serde(rename = "path")]
    pub paths: Vec<HaPath>,
    /// Heartbeat period under high load and when idle, in milliseconds.
    #[serde(default = "default_ha_period_min_ms")]
    pub period_min_ms: u32,
    #[serde(default = "default_ha_period_max_ms")]
    pub period_max_ms: u32,
    /// Consecutive lost heartbeats ridden out; the next loss fails over.
    #[serde(default = "default_ha_tolerance")]
    pub tolerance: u32,
    /// Take mastership back from a lower-priority MASTER peer.
    #[serde(default = "default_true")]
    pub preempt: bool,
    #[serde(default)]
    pub preempt_delay_ms: u32,
    /// Preempt also a peer that became MASTER by failover (when this director comes back).
    #[serde(default = "default_true")]
    pub auto_failback: bool,
    /// How long a starting director listens for its peer before taking over alone.
    #[serde(default = "default_ha_init_hold_ms")]
    pub init_hold_ms: u32,
    /// IPv4 addresses pinged (ICMP echo) before taking over and while MASTER without a peer; any answer
    /// counts as reachable. Empty: always reachable.
    #[serde(default)]
    pub tiebreakers: Vec<IpAddr>,
    #[serde(default = "default_ha_tiebreaker_timeout_ms")]
    pub tiebreaker_timeout_ms: u32,
    #[serde(default = "default_ha_tiebreaker_interval_ms")]
    pub tiebreaker_interval_ms: u32,
    /// While MASTER, re-send gratuitous ARPs every this many seconds; 0: only on becoming MASTER.
    #[serde(default)]
    pub garp_refresh_s: u32,
    /// After handing mastership over (demotion, preemption), keep forwarding this long (ms) for clients
    /// whose ARP caches still point here; 0 stops at once.
    #[serde(default = "default_ha_handover_drain_ms")]
    pub handover_drain_ms: u32,
    /// A program run (no shell) with the new state (`master`, `backup`, `fault`) as its argument.
    pub notify: Option<PathBuf>,
    /// The forwarding load at which the MASTER's period reaches `period_min_ms`.
    #[serde(default = "default_ha_high_load_pps")]
    pub high_load_pps: u64,
    #[serde(default = "default_ha_high_load_connections")]
    pub high_load_connections: u64,
}

/// One heartbeat path: a local UDP address to bind and the peer's address on that link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaPath {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

fn default_true() -> bool {
    true
}
fn default_ha_priority() -> u32 {
    100
}
fn default_ha_period_min_ms() -> u32 {
    20
}
fn default_ha_period_max_ms() -> u32 {
    1000
}
fn default_ha_tolerance() -> u32 {
    3
}
fn default_ha_init_hold_ms() -> u32 {
    3000
}
fn default_ha_tiebreaker_timeout_ms() -> u32 {
    500
}
fn default_ha_tiebreaker_interval_ms() -> u32 {
    1000
}
fn default_ha_handover_drain_ms() -> u32 {
    500
}
fn default_ha_high_load_pps() -> u64 {
    50_000
}
fn default_ha_high_load_connections() -> u64 {
    20_000
}

/// Smallest HMAC key accepted.
pub const MIN_HA_KEY_LEN: usize = 16;

impl HaSection {
    fn check(&self) -> Result<(), Invalid> {
        let at = |key: &'static str| [KeyStep::Key("ha"), KeyStep::Key(key)];
        if !(1..=255).contains(&self.priority) {
            return Err(invalid(&at("priority"), format!("{} is outside 1..=255", self.priority)));
        }
        self.read_key().map_err(|message| invalid(&at("key_file"), message))?;
        if self.paths.is_empty() {
            return Err(invalid(&at("path"), "at least one heartbeat path ([[ha.path]] local, peer) is needed"));
        }
        let mut locals = HashSet::new();
        for (i, path) in self.paths.iter().enumerate() {
            let at =
                |key: &'static str| [KeyStep::Key("ha"), KeyStep::Key("path"), KeyStep::Index(i), KeyStep::Key(key)];
            if !locals.insert(path.local) {
                return Err(invalid(&at("local"), format!("{} is used by another path", path.local)));
            }
            if path.peer.ip().is_unspecified() || path.peer.port() == 0 {
                return Err(invalid(&at("peer"), format!("{} is not an address to send to", path.peer)));
            }
        }
        if !(1..=60_000).contains(&self.period_min_ms) {
            return Err(invalid(&at("period_min_ms"), format!("{} ms is outside 1..=60000", self.period_min_ms)));
        }
        if !(self.period_min_ms..=60_000).contains(&self.period_max_ms) {
            return Err(invalid(
                &at("period_max_ms"),
                format!("{} ms is outside period_min_ms ({})..=60000", self.period_max_ms, self.period_min_ms),
            ));
        }
        let max_tolerance = u32::from(crate::ha::packet::MAX_TOLERANCE / 2);
        if self.tolerance > max_tolerance {
            return Err(invalid(&at("tolerance"), format!("{} is outside 0..={max_tolerance}", self.tolerance)));
        }
        for (i, tiebreaker) in self.tiebreakers.iter().enumerate() {
            if !tiebreaker.is_ipv4() || tiebreaker.is_unspecified() || tiebreaker.is_multicast() {
                return Err(invalid(
                    &[KeyStep::Key("ha"), KeyStep::Key("tiebreakers"), KeyStep::Index(i)],
                    format!("{tiebreaker} cannot be pinged: give a unicast IPv4 address"),
                ));
            }
        }
        for (key, value, range) in [
            ("tiebreaker_timeout_ms", self.tiebreaker_timeout_ms, 1..=60_000),
            ("tiebreaker_interval_ms", self.tiebreaker_interval_ms, 10..=3_600_000),
            ("init_hold_ms", self.init_hold_ms, 0..=600_000),
            ("preempt_delay_ms", self.preempt_delay_ms, 0..=3_600_000),
            ("garp_refresh_s", self.garp_refresh_s, 0..=86_400),
            ("handover_drain_ms", self.handover_drain_ms, 0..=60_000),
        ] {
            if !range.contains(&value) {
                return Err(invalid(&at(key), format!("{value} is outside {}..={}", range.start(), range.end())));
            }
        }
        if self.high_load_pps == 0 || self.high_load_connections == 0 {
            let key = if self.high_load_pps == 0 { "high_load_pps" } else { "high_load_connections" };
            return Err(invalid(&at(key), "must be at least 1"));
        }
        if let Some(notify) = &self.notify {
            if !notify.is_absolute() || !notify.is_file() {
                return Err(invalid(&at("notify"), format!("{} is not an absolute path to a file", notify.display())));
            }
        }
        Ok(())
    }

    /// The key file's bytes; refused when shorter than [`MIN_HA_KEY_LEN`] or readable by group or others.
    pub fn read_key(&self) -> Result<Vec<u8>, String> {
        read_secret_key(&self.key_file, MIN_HA_KEY_LEN)
    }

    /// The state machine's configuration (the key read from `key_file`).
    pub fn machine_config(&self) -> Result<crate::ha::HaConfig, String> {
        let ms = |v: u32| std::time::Duration::from_millis(v.into());
        Ok(crate::ha::HaConfig {
            node_id: self.node_id,
            priority: u8::try_from(self.priority)
                .map_err(|_| format!("priority {} is outside 1..=255", self.priority))?,
            key: self.read_key()?,
            paths: self.paths.len(),
            period_min: ms(self.period_min_ms),
            period_max: ms(self.period_max_ms),
            high_load: crate::ha::LoadSummary { pps: self.high_load_pps, conns: self.high_load_connections },
            tolerance: u8::try_from(self.tolerance)
                .map_err(|_| format!("tolerance {} is too large", self.tolerance))?,
            preempt: self.preempt,
            preempt_delay: ms(self.preempt_delay_ms),
            auto_failback: self.auto_failback,
            init_hold: ms(self.init_hold_ms),
            tiebreaker_timeout: ms(self.tiebreaker_timeout_ms),
            tiebreaker_interval: ms(self.tiebreaker_interval_ms),
            ..crate::ha::HaConfig::default()
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Dynamic feedback and health checks: `[service.feedback]` and `[service.health]`.
// ---------------------------------------------------------------------------------------------------------------

/// Shortest accepted `[service.feedback] stale_after_ms` when the agents' report interval is not known (or
/// shorter).
const MIN_STALE_AFTER_MS: u32 = 100;

/// `[service.feedback]`: the dynamic-feedback blender of one service (see `crate::feedback` for each formula).
/// Every key has a default; `enabled` defaults to on for `df` services only, so that `wlc` stays `wlc` and `df`
/// differs from it exactly by the feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackSettings {
    /// Blend agent reports into the effective weight; absent: on for `scheduler = "df"`, off otherwise.
    pub enabled: Option<bool>,
    /// How often the weights are recomputed, in milliseconds, besides at once on every report, health-check
    /// result and configuration change (what the period adds: stale and down ages, slow-start ramps).
    pub period_ms: u32,
    /// Coefficients of the aggregate load; ≥ 0, summing to 1.
    pub cpu: f64,
    pub response_time: f64,
    pub pressure: f64,
    pub connections: f64,
    /// `A`, in units of the configured weight or of the current one, whichever is larger.
    pub gain: f64,
    /// Largest step per period, as a share of the current or the configured weight, whichever is larger.
    pub max_step: f64,
    /// A weight at rest moves again only when its load is off target by more than this share (hysteresis
    /// against report noise).
    pub hold_band: f64,
    /// Half-life of the metrics' moving averages, milliseconds (0: no smoothing).
    pub half_life_ms: u32,
    /// A server whose newest report is older than this falls back to its configured weight.
    pub stale_after_ms: u32,
    /// … and older than this is marked down (weight 0).
    pub down_after_ms: u32,
    /// Consecutive agent probe failures that mark a server down (0: never).
    pub down_probe_failures: u32,
}

impl Default for FeedbackSettings {
    fn default() -> FeedbackSettings {
        let b = crate::feedback::BlenderConfig::default();
        FeedbackSettings {
            enabled: None,
            period_ms: 500,
            cpu: b.coefficients.cpu,
            response_time: b.coefficients.response_time,
            pressure: b.coefficients.pressure,
            connections: b.coefficients.connections,
            gain: b.gain,
            max_step: b.max_step,
            hold_band: b.hold_band,
            half_life_ms: b.half_life.as_millis() as u32,
            stale_after_ms: b.stale_after.as_millis() as u32,
            down_after_ms: b.down_after.as_millis() as u32,
            down_probe_failures: b.down_probe_failures,
        }
    }
}

impl FeedbackSettings {
    /// Whether the blender runs for a service with this scheduler.
    pub fn is_enabled(&self, scheduler: Scheduler) -> bool {
        self.enabled.unwrap_or(scheduler == Scheduler::Df)
    }

    /// The blender's configuration (the keys not exposed keep the blender's defaults).
    pub fn blender_config(&self) -> crate::feedback::BlenderConfig {
        use std::time::Duration;
        crate::feedback::BlenderConfig {
            coefficients: crate::feedback::Coefficients {
                cpu: self.cpu,
                response_time: self.response_time,
                pressure: self.pressure,
                connections: self.connections,
            },
            gain: self.gain,
            max_step: self.max_step,
            hold_band: self.hold_band,
            half_life: Duration::from_millis(self.half_life_ms.into()),
            stale_after: Duration::from_millis(self.stale_after_ms.into()),
            down_after: Duration::from_millis(self.down_after_ms.into()),
            down_probe_failures: self.down_probe_failures,
            ..crate::feedback::BlenderConfig::default()
        }
    }

    /// `report_interval_ms` is `[agents] report_interval_ms` (0: each agent's own, unknown here).
    fn check(&self, service: usize, scheduler: Scheduler, report_interval_ms: u32) -> Result<(), Invalid> {
        use crate::feedback::ConfigError as E;
        let at = |key: &'static str| {
            [KeyStep::Key("service"), KeyStep::Index(service), KeyStep::Key("feedback"), KeyStep::Key(key)]
        };
        if !(50..=60_000).contains(&self.period_ms) {
            return Err(invalid(&at("period_ms"), format!("{} ms is outside 50..=60000", self.period_ms)));
        }
        for (key, ms) in [
            ("half_life_ms", self.half_life_ms),
            ("stale_after_ms", self.stale_after_ms),
            ("down_after_ms", self.down_after_ms),
        ] {
            if ms > 3_600_000 {
                return Err(invalid(&at(key), format!("{ms} ms is outside 0..=3600000")));
            }
        }
        // A server whose newest report is older than `stale_after` falls back to its configured share. Within two
        // report intervals, one late report (a scheduling hiccup, a lost datagram) already makes it stale, and
        // its weight and averages restart; shorter than one, every server is stale between two reports (at 0,
        // at once) and feedback is silently off. The interval is the one the director asks for, or the agents'
        // default; it counts only while feedback is on, so that it refuses no service that never reads reports.
        let (floor, of) = if self.is_enabled(scheduler) {
            let (interval, which) = match report_interval_ms {
                0 => (DEFAULT_REPORT_INTERVAL_MS, "the agents' default report interval".to_string()),
                n => (n, format!("agents.report_interval_ms = {n}")),
            };
            let floor = interval.saturating_mul(2).max(MIN_STALE_AFTER_MS);
            (floor, format!("two report intervals ({which}, {interval} ms)"))
        } else {
            (MIN_STALE_AFTER_MS, format!("{MIN_STALE_AFTER_MS} ms"))
        };
        if self.stale_after_ms < floor {
            let when = if self.stale_after_ms == 0 {
                "every report would be stale the moment it is received, which silently turns feedback off"
            } else {
                "one late report would make a server stale and restart its weight"
            };
            return Err(invalid(
                &at("stale_after_ms"),
                format!(
                    "{} ms is shorter than {of}: {when}; use at least {floor} ms (the default is 3000)",
                    self.stale_after_ms
                ),
            ));
        }
        match self.blender_config().validate() {
            Ok(()) => Ok(()),
            Err(E::Coefficients(_)) => Err(invalid(
                &at("cpu"),
                format!(
                    "coefficients cpu, response_time, pressure, connections must be >= 0 and sum to 1 (they sum to {})",
                    self.cpu + self.response_time + self.pressure + self.connections
                ),
            )),
            Err(E::OutOfRange { field, value, range }) => {
                let key = match field {
                    "gain" => "gain",
                    "max_step" => "max_step",
                    "hold_band" => "hold_band",
                    _ => "enabled",
                };
                Err(invalid(&at(key), format!("{value} is outside {range}")))
            }
            Err(E::DownBeforeStale) => Err(invalid(&at("down_after_ms"), "must be longer than stale_after_ms")),
        }
    }
}

/// Active health check kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// No active check: the checks count as passing (the agent may still be required).
    #[default]
    None,
    /// A TCP connect to the real server's own address and port.
    Tcp,
    /// `GET path` over HTTP/1.0: a status in `status`, and `body` in the body when set.
    Http,
}

/// Whether the agent's liveness is a second health signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AgentLiveness {
    #[default]
    Ignored,
    /// The agent must be connected with a report at most `agent_max_age_ms` old.
    Required,
}

/// What happens to a failed server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Weight 0: no new connections; established ones continue.
    #[default]
    Quiesce,
    /// Taken out of scheduling altogether; established ones continue.
    Remove,
}

/// `[service.health]`: health checks of every real server of a service, its quorum and its sorry server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    pub kind: HealthCheckKind,
    /// Port checked on each real server's own address; absent: the server's port.
    pub port: Option<u16>,
    /// HTTP: the path requested.
    pub path: String,
    /// HTTP: the Host header; absent: the real server's address.
    pub host: Option<String>,
    /// HTTP: accepted statuses, `"200"` or `"200-399"`.
    pub status: String,
    /// HTTP: a substring the body must contain.
    pub body: Option<String>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive successes that bring a server up, failures that take it down.
    pub rise: u32,
    pub fall: u32,
    pub on_failure: OnFailure,
    /// Weight ramp after recovery, seconds (0: straight to full weight).
    pub slow_start_s: u32,
    pub agent: AgentLiveness,
    pub agent_max_age_ms: u32,
    /// Serving servers the service needs; below it new connections go to the sorry server.
    pub quorum: u32,
    /// Extra servers needed to regain a lost quorum.
    pub hysteresis: u32,
    /// Where new connections go below quorum.
    pub sorry_server: Option<SocketAddr>,
    pub sorry_forward: ForwardMethod,
}

impl Default for HealthSettings {
    fn default() -> HealthSettings {
        HealthSettings {
            kind: HealthCheckKind::None,
            port: None,
            path: "/".to_string(),
            host: None,
            status: "200-399".to_string(),
            body: None,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            on_failure: OnFailure::Quiesce,
            slow_start_s: 10,
            agent: AgentLiveness::Ignored,
            agent_max_age_ms: 5000,
            quorum: 1,
            hysteresis: 0,
            sorry_server: None,
            sorry_forward: ForwardMethod::Dr,
        }
    }
}

impl HealthSettings {
    /// Whether any health signal is configured; without one every server counts as healthy.
    pub fn is_checked(&self) -> bool {
        self.kind != HealthCheckKind::None || self.agent == AgentLiveness::Required
    }

    /// The accepted HTTP status range.
    pub fn status_range(&self) -> Option<std::ops::RangeInclusive<u16>> {
        let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c));
        let (low, high) = match self.status.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(&self.status)?, parse(&self.status)?),
        };
        (low <= high).then_some(low..=high)
    }

    /// The health state machine's configuration (flap damping keeps its defaults).
    pub fn health_config(&self) -> crate::health::HealthConfig {
        use std::time::Duration;
        crate::health::HealthConfig {
            rise: self.rise,
            fall: self.fall,
            on_failure: match self.on_failure {
                OnFailure::Quiesce => crate::health::FailureAction::Quiesce,
                OnFailure::Remove => crate::health::FailureAction::Remove,
            },
            slow_start: Duration::from_secs(self.slow_start_s.into()),
            agent: match self.agent {
                AgentLiveness::Ignored => crate::health::AgentPolicy::Ignored,
                AgentLiveness::Required => crate::health::AgentPolicy::Required {
                    max_report_age: Duration::from_millis(self.agent_max_age_ms.into()),
                },
            },
            ..crate::health::HealthConfig::default()
        }
    }

    fn check(&self, service: usize, config: &ServiceConfig) -> Result<(), Invalid> {
        let at = |key: &'static str| {
            [KeyStep::Key("service"), KeyStep::Index(service), KeyStep::Key("health"), KeyStep::Key(key)]
        };
        if self.port == Some(0) {
            return Err(invalid(&at("port"), "port 0 cannot be checked"));
        }
        if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(&at("path"), format!("{:?} is not an absolute path without spaces", self.path)));
        }
        if self.host.as_ref().is_some_and(|h| h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control())) {
            return Err(invalid(&at("host"), "must be a host name without spaces"));
        }
        if self.status_range().is_none() {
            return Err(invalid(
                &at("status"),
                format!("{:?} is not a status or range of statuses within 100-599 (e.g. \"200-399\")", self.status),
            ));
        }
        if self.body.as_ref().is_some_and(|b| b.is_empty() || b.len() > 1024) {
            return Err(invalid(&at("body"), "must be 1 to 1024 bytes long"));
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(invalid(&at("interval_ms"), format!("{} ms is outside 100..=3600000", self.interval_ms)));
        }
        if !(10..=60_000).contains(&self.timeout_ms) || self.timeout_ms > self.interval_ms {
            return Err(invalid(
                &at("timeout_ms"),
                format!("{} ms is outside 10..=60000 or longer than interval_ms", self.timeout_ms),
            ));
        }
        for (key, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&value) {
                return Err(invalid(&at(key), format!("{value} is outside 1..=100")));
            }
        }
        if self.slow_start_s > 3600 {
            return Err(invalid(&at("slow_start_s"), format!("{} s is outside 0..=3600", self.slow_start_s)));
        }
        if !(100..=3_600_000).contains(&self.agent_max_age_ms) {
            return Err(invalid(
                &at("agent_max_age_ms"),
                format!("{} ms is outside 100..=3600000", self.agent_max_age_ms),
            ));
        }
        if self.quorum > 10_000 || self.hysteresis > 10_000 {
            let key = if self.quorum > 10_000 { "quorum" } else { "hysteresis" };
            return Err(invalid(&at(key), "is outside 0..=10000"));
        }
        if let Some(sorry) = self.sorry_server {
            let ip = sorry.ip();
            if ip.is_unspecified() || ip.is_multicast() || ip == config.vip || sorry.port() == 0 {
                return Err(invalid(&at("sorry_server"), format!("{sorry} cannot be a sorry server")));
            }
            if ip.is_ipv4() != config.vip.is_ipv4() {
                return Err(invalid(&at("sorry_server"), "must be of the VIP's address family"));
            }
            if config.servers.iter().any(|s| s.address == ip && s.port_for(config) == sorry.port()) {
                return Err(invalid(&at("sorry_server"), format!("{sorry} is already a real server of this service")));
            }
            if self.quorum == 0 {
                return Err(invalid(
                    &at("quorum"),
                    "quorum 0 is never lost, so the sorry server would never be used; \
                     set quorum = 1 (the default) or remove sorry_server",
                ));
            }
        }
        // The quorum starts lost and, once lost, comes back only at quorum + hysteresis serving servers. With
        // fewer real servers than that it never would. Servers of weight 0 count: draining all of them to send
        // everyone to the sorry server is a legitimate workflow. A service without real servers keeps any
        // quorum: all its connections go to the sorry server.
        let servers = config.servers.len();
        let needed = u64::from(self.quorum) + u64::from(self.hysteresis);
        if servers > 0 && needed > servers as u64 {
            let key = if self.hysteresis > 0 && self.quorum as usize <= servers { "hysteresis" } else { "quorum" };
            let stuck = match self.sorry_server {
                Some(sorry) => format!("the sorry server {sorry} would take every new connection for good"),
                None => "the service would stay below quorum for good".to_string(),
            };
            return Err(invalid(
                &at(key),
                format!(
                    "quorum {} + hysteresis {} needs {needed} serving servers to be regained, but the service has \
                     {servers}: once lost (and it starts lost) the quorum would never come back, and {stuck}; \
                     lower {key} or add real servers",
                    self.quorum, self.hysteresis
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            for f in ["ca.pem", "d1.pem", "d1.key"] {
                std::fs::write(dir.path().join(f), "x").unwrap();
            }
            Pki { dir }
        }

        fn config(&self, services: &str) -> String {
            let d = self.dir.path().display();
            format!(
                "name = \"d1\"\n[agents]\nca = \"{d}/ca.pem\"\ncert = \"{d}/d1.pem\"\nkey = \"{d}/d1.key\"\n\n{services}"
            )
        }
    }

    const WEB: &str = "[[service]]\nvip = \"10.0.0.100\"\nport = 80\n\n[[service.server]]\naddress = \"10.0.0.11\"\nweight = 3\n\n[[service.server]]\naddress = \"10.0.0.12\"\nport = 8080\n";

    fn load(text: &str) -> Result<DirectorConfig, ConfigError> {
        DirectorConfig::from_text(Path::new("/etc/fulcrum/director.toml"), text)
    }

    #[test]
    fn a_valid_file_loads_with_defaults() {
        let pki = Pki::new();
        let config = load(&pki.config(WEB)).unwrap();
        assert_eq!(config.agents.listen.port(), fulcrum_protocol::DEFAULT_AGENT_PORT);
        let service = &config.services[0];
        assert_eq!((service.scheduler, service.protocol), (Scheduler::Wlc, Protocol::Tcp));
        assert_eq!(service.servers[0].port_for(service), 80);
        assert_eq!(service.servers[1].weight, 1);
        assert!(config.has_real_server("10.0.0.12".parse().unwrap(), 8080));
        assert!(!config.has_real_server("10.0.0.12".parse().unwrap(), 80));
    }

    fn refused(text: &str) -> ConfigError {
        load(text).expect_err("should be refused")
    }

    #[test]
    fn bad_files_name_line_and_key() {
        let pki = Pki::new();
        let err = refused(&pki.config(&WEB.replace("weight = 3", "weight = 70000")));
        assert_eq!((err.line, err.key.as_str()), (13, "service[0].server[0].weight"), "{err}");
        assert!(err.message.contains("out of range"), "{err}");

        let err = refused(&pki.config(&WEB.replace("weight = 3", "wieght = 3")));
        assert_eq!((err.line, err.key.as_str()), (13, "service[0].server[0].wieght"), "{err}");

        let err = refused(&pki.config(&format!("{WEB}\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\n")));
        assert_eq!((err.line, err.key.as_str()), (20, "service[1].vip"), "{err}");
        assert!(err.message.contains("duplicate service"), "{err}");

        let err = refused(
            &pki.config(&WEB.replace("scheduler", "x").replace("port = 80\n", "port = 80\nscheduler = \"fastest\"\n")),
        );
        assert_eq!(err.key, "service[0].scheduler", "{err}");

        let err = refused(&pki.config(&WEB.replace("10.0.0.100", "127.0.0.1")));
        assert_eq!(err.key, "service[0].vip", "{err}");

        let err = refused(&pki.config(&WEB.replace("10.0.0.12", "10.0.0.11").replace("port = 8080\n", "")));
        assert!(err.message.contains("duplicate real server"), "{err}");
    }

    #[test]
    fn feedback_and_health_keys_have_defaults_and_named_errors() {
        let pki = Pki::new();
        let config = load(&pki.config(WEB)).unwrap();
        let service = &config.services[0];
        assert!(!service.feedback.is_enabled(Scheduler::Wlc) && service.feedback.is_enabled(Scheduler::Df));
        assert_eq!(service.feedback.period_ms, 500);
        assert!(!service.health.is_checked(), "no health signal unless configured");
        assert_eq!(service.health.status_range(), Some(200..=399));

        let with = |section: &str| pki.config(&WEB.replace("port = 80\n", &format!("port = 80\n{section}\n")));
        let config = load(&with(
            "[service.health]\nkind = \"http\"\npath = \"/health\"\nstatus = \"200\"\nbody = \"ok\"\nsorry_server = \"10.0.0.50:80\"\n[service.feedback]\nenabled = true\ncpu = 1.0\nresponse_time = 0.0\npressure = 0.0",
        ))
        .unwrap();
        let service = &config.services[0];
        assert_eq!((service.health.kind, service.health.status_range()), (HealthCheckKind::Http, Some(200..=200)));
        assert!(service.feedback.is_enabled(Scheduler::Wlc));

        for (section, line, key, what) in [
            ("[service.health]\nkind = \"icmp\"", 4, "service[0].health.kind", "unknown variant"),
            ("[service.health]\nstatus = \"299-200\"", 4, "service[0].health.status", "not a status"),
            ("[service.health]\nrise = 0", 4, "service[0].health.rise", "outside 1..=100"),
            ("[service.health]\ntimeout_ms = 5000", 4, "service[0].health.timeout_ms", "longer than interval_ms"),
            (
                "[service.health]\nsorry_server = \"10.0.0.11:80\"",
                4,
                "service[0].health.sorry_server",
                "already a real server",
            ),
            ("[service.health]\non_failure = \"explode\"", 4, "service[0].health.on_failure", "unknown variant"),
            ("[service.feedback]\ncpu = 0.9", 4, "service[0].feedback.cpu", "sum to 1"),
            ("[service.feedback]\nperiod_ms = 10", 4, "service[0].feedback.period_ms", "outside 50..=60000"),
            (
                "[service.feedback]\ndown_after_ms = 1000",
                4,
                "service[0].feedback.down_after_ms",
                "longer than stale_after",
            ),
            ("[service.feedback]\nmax_step = 2.0", 4, "service[0].feedback.max_step", "outside (0, 1]"),
            ("[service.feedback]\nhold_band = 0.7", 4, "service[0].feedback.hold_band", "outside [0, 0.5]"),
            ("[service.feedback]\nperiod = 10", 4, "service[0].feedback.period", "unknown field"),
        ] {
            let err = refused(&with(section));
            assert_eq!((err.line, err.key.as_str()), (line + 7, key), "{section}: {err}");
            assert!(err.message.contains(what), "{section}: {err}");
        }
    }

    /// `WEB` with `section` after the service's `port` line: the section's line `n` (from 1) is the file's
    /// line `n + 9`.
    fn web_with(pki: &Pki, section: &str) -> String {
        pki.config(&WEB.replace("port = 80\n", &format!("port = 80\n{section}\n")))
    }

    #[test]
    fn a_quorum_that_could_never_be_regained_is_refused() {
        let pki = Pki::new();
        // WEB has two real servers.
        let err = refused(&web_with(&pki, "[service.health]\nquorum = 2\nhysteresis = 1"));
        assert_eq!((err.line, err.key.as_str()), (12, "service[0].health.hysteresis"), "{err}");
        assert!(
            err.message
                .contains("quorum 2 + hysteresis 1 needs 3 serving servers to be regained, but the service has 2"),
            "{err}"
        );
        assert!(err.message.contains("below quorum for good"), "{err}");

        let err = refused(&web_with(&pki, "[service.health]\nquorum = 3\nsorry_server = \"10.0.0.50:80\""));
        assert_eq!((err.line, err.key.as_str()), (11, "service[0].health.quorum"), "{err}");
        assert!(err.message.contains("quorum 3 + hysteresis 0 needs 3"), "{err}");
        assert!(err.message.contains("sorry server 10.0.0.50:80 would take every new connection for good"), "{err}");

        // The quorum alone cannot be met: the quorum is named, not the hysteresis.
        let err = refused(&web_with(&pki, "[service.health]\nquorum = 3\nhysteresis = 2"));
        assert_eq!((err.line, err.key.as_str()), (11, "service[0].health.quorum"), "{err}");

        // Servers of weight 0 count: draining them all to send everyone to the sorry server is legitimate.
        let drained = pki.config(
            &WEB.replace("weight = 3", "weight = 0")
                .replace("port = 8080\n", "port = 8080\nweight = 0\n")
                .replace("port = 80\n", "port = 80\n[service.health]\nquorum = 2\nsorry_server = \"10.0.0.50:80\"\n"),
        );
        let config = load(&drained).unwrap();
        assert!(config.services[0].servers.iter().all(|s| s.weight == 0));
    }

    #[test]
    fn a_quorum_within_the_servers_loads() {
        let pki = Pki::new();
        let three = format!("{WEB}\n[[service.server]]\naddress = \"10.0.0.13\"\n");
        let text =
            pki.config(&three.replace("port = 80\n", "port = 80\n[service.health]\nquorum = 2\nhysteresis = 1\n"));
        let health = &load(&text).unwrap().services[0].health;
        assert_eq!((health.quorum, health.hysteresis), (2, 1));
    }

    #[test]
    fn a_service_without_real_servers_keeps_the_default_quorum() {
        let pki = Pki::new();
        let service = "[[service]]\nvip = \"10.0.0.100\"\nport = 80\n";
        let config = load(&pki.config(service)).unwrap();
        assert_eq!((config.services[0].servers.len(), config.services[0].health.quorum), (0, 1));
        // A sorry-server-only service: every connection goes to the sorry server.
        let config =
            load(&pki.config(&format!("{service}[service.health]\nsorry_server = \"10.0.0.50:80\"\n"))).unwrap();
        assert_eq!(config.services[0].health.sorry_server, Some("10.0.0.50:80".parse().unwrap()));
    }

    #[test]
    fn quorum_zero_with_a_sorry_server_is_refused() {
        let pki = Pki::new();
        let err = refused(&web_with(&pki, "[service.health]\nsorry_server = \"10.0.0.50:80\"\nquorum = 0"));
        assert_eq!((err.line, err.key.as_str()), (12, "service[0].health.quorum"), "{err}");
        assert!(err.message.contains("never lost, so the sorry server would never be used"), "{err}");
        assert!(err.message.contains("quorum = 1") && err.message.contains("remove sorry_server"), "{err}");
        // Without a sorry server, quorum 0 (never below quorum) stays legal.
        assert_eq!(load(&web_with(&pki, "[service.health]\nquorum = 0")).unwrap().services[0].health.quorum, 0);
    }

    #[test]
    fn a_stale_after_shorter_than_a_report_interval_is_refused() {
        let pki = Pki::new();
        let err = refused(&web_with(&pki, "[service.feedback]\nstale_after_ms = 0"));
        assert_eq!((err.line, err.key.as_str()), (11, "service[0].feedback.stale_after_ms"), "{err}");
        assert!(err.message.contains("stale the moment it is received"), "{err}");
        assert!(err.message.contains("silently turns feedback off"), "{err}");
        assert!(err.message.contains("at least 100 ms"), "{err}");

        let err = refused(&web_with(&pki, "[service.feedback]\nstale_after_ms = 50"));
        assert_eq!(err.key, "service[0].feedback.stale_after_ms", "{err}");
        assert!(err.message.contains("shorter than 100 ms"), "{err}");
        assert_eq!(
            load(&web_with(&pki, "[service.feedback]\nstale_after_ms = 100")).unwrap().services[0]
                .feedback
                .stale_after_ms,
            100
        );

        // Agents asked for one report per 5 s: the default 3 s would make every df server stale between reports.
        let slow =
            |section: &str| web_with(&pki, section).replace("[agents]\n", "[agents]\nreport_interval_ms = 5000\n");
        let err = refused(&slow("scheduler = \"df\""));
        assert_eq!(err.key, "service[0].feedback.stale_after_ms", "{err}");
        assert!(
            err.message.contains("agents.report_interval_ms = 5000") && err.message.contains("at least 10000 ms"),
            "{err}"
        );
        // One interval is not enough either: a single late report would make the server stale.
        let err = refused(&slow("[service.feedback]\nenabled = true\nstale_after_ms = 5000"));
        assert_eq!((err.line, err.key.as_str()), (13, "service[0].feedback.stale_after_ms"), "{err}");
        assert!(err.message.contains("one late report"), "{err}");
        assert!(
            load(&slow("[service.feedback]\nenabled = true\nstale_after_ms = 10000\ndown_after_ms = 20000")).is_ok()
        );
        // Without feedback the reports' age is not read: the interval does not refuse the default.
        assert!(load(&slow("")).is_ok());
        // down_after must still exceed stale_after.
        let err = refused(&slow("[service.feedback]\nenabled = true\nstale_after_ms = 10000\ndown_after_ms = 10000"));
        assert_eq!(err.key, "service[0].feedback.down_after_ms", "{err}");
        // Without report_interval_ms the agents report at their default, 500 ms.
        let err = refused(&web_with(&pki, "scheduler = \"df\"\n[service.feedback]\nstale_after_ms = 200"));
        assert!(
            err.message.contains("the agents' default report interval") && err.message.contains("at least 1000 ms"),
            "{err}"
        );
    }

    #[test]
    fn a_report_interval_no_agent_runs_at_is_refused() {
        let pki = Pki::new();
        let with = |ms: u32| pki.config(WEB).replace("[agents]\n", &format!("[agents]\nreport_interval_ms = {ms}\n"));
        for ms in [49, 60_001] {
            let err = refused(&with(ms));
            assert_eq!((err.line, err.key.as_str()), (3, "agents.report_interval_ms"), "{err}");
            assert!(err.message.contains(&format!("{ms} ms is outside 50..=60000")), "{err}");
        }
        for ms in [0, 50, 60_000] {
            assert_eq!(load(&with(ms)).unwrap().agents.report_interval_ms, ms);
        }
    }

    #[test]
    fn a_missing_certificate_is_named() {
        let pki = Pki::new();
        std::fs::remove_file(pki.dir.path().join("d1.pem")).unwrap();
        let err = refused(&pki.config(WEB));
        assert_eq!((err.line, err.key.as_str()), (4, "agents.cert"), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn drained_means_every_entry_has_weight_zero() {
        let pki = Pki::new();
        let config = load(&pki.config(&WEB.replace("weight = 3", "weight = 0"))).unwrap();
        assert!(config.is_drained("10.0.0.11".parse().unwrap()));
        assert!(!config.is_drained("10.0.0.12".parse().unwrap()));
        assert!(!config.is_drained("10.9.9.9".parse().unwrap()), "an unknown server is not drained");
    }

    fn ha_config(pki: &Pki, ha: &str) -> String {
        let d = pki.dir.path().display();
        let key = pki.dir.path().join("ha.key");
        std::fs::write(&key, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        pki.config(&format!(
            "[dataplane]\ninterface = \"eth0\"\n\n[ha]\nnode_id = 1\nkey_file = \"{d}/ha.key\"\n{ha}\n[[ha.path]]\nlocal = \"10.0.0.2:7947\"\npeer = \"10.0.0.3:7947\"\n"
        ))
    }

    #[test]
    fn an_ha_section_loads_with_defaults() {
        let pki = Pki::new();
        let config = load(&ha_config(&pki, "tiebreakers = [\"10.0.0.1\"]\n")).unwrap();
        let ha = config.ha.as_ref().unwrap();
        let machine = ha.machine_config().unwrap();
        assert_eq!((machine.priority, machine.tolerance, machine.paths), (100, 3, 1));
        assert_eq!(machine.period_max, std::time::Duration::from_secs(1));
        assert_eq!(machine.key.len(), 20);
        assert!(machine.validate().is_ok());
    }

    #[test]
    fn bad_ha_settings_name_line_and_key() {
        let pki = Pki::new();
        let err = refused(&ha_config(&pki, "priority = 300\n"));
        assert_eq!((err.line, err.key.as_str()), (13, "ha.priority"), "{err}");
        let err = refused(&ha_config(&pki, "period_min_ms = 500\nperiod_max_ms = 100\n"));
        assert_eq!(err.key, "ha.period_max_ms", "{err}");
        let err = refused(&ha_config(&pki, "tiebreakers = [\"::1\"]\n"));
        assert_eq!(err.key, "ha.tiebreakers[0]", "{err}");
        let err = refused(&ha_config(&pki, "notify = \"relative.sh\"\n"));
        assert_eq!(err.key, "ha.notify", "{err}");
        let err = refused(&ha_config(&pki, "").replace("peer = \"10.0.0.3:7947\"", "peer = \"0.0.0.0:7947\""));
        assert_eq!(err.key, "ha.path[0].peer", "{err}");
    }

    #[test]
    fn the_ha_key_must_be_long_and_private() {
        let pki = Pki::new();
        let text = ha_config(&pki, "");
        let key = pki.dir.path().join("ha.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = refused(&text);
        assert_eq!(err.key, "ha.key_file", "{err}");
        assert!(err.message.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        std::fs::write(&key, "short").unwrap();
        let err = refused(&text);
        assert!(err.message.contains("at least 16"), "{err}");
    }

    #[test]
    fn an_ha_pair_needs_a_data_plane() {
        let pki = Pki::new();
        let text = ha_config(&pki, "").replace("[dataplane]\ninterface = \"eth0\"\n", "");
        assert_eq!(refused(&text).key, "ha", "a pair without a data plane has nothing to fail over");
    }
}

#[cfg(test)]
mod sync_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn with_sync(sync: &str) -> (tempfile::TempDir, Result<DirectorConfig, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "d1.pem", "d1.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let key = dir.path().join("sync.key");
        std::fs::write(&key, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let d = dir.path().display();
        let text = format!(
            "name = \"d1\"\n[agents]\nca = \"{d}/ca.pem\"\ncert = \"{d}/d1.pem\"\nkey = \"{d}/d1.key\"\n\n[dataplane]\ninterface = \"eth0\"\n\n[sync]\nlisten = \"10.0.0.2:7950\"\npeer = \"10.0.0.3:7950\"\nkey_file = \"{d}/sync.key\"\n{sync}"
        );
        let result = DirectorConfig::from_text(Path::new("/etc/fulcrum/director.toml"), &text);
        (dir, result)
    }

    #[test]
    fn a_sync_section_loads_with_defaults() {
        let (_dir, config) = with_sync("");
        let sync = config.unwrap().sync.unwrap();
        assert_eq!((sync.max_rate, sync.batch_records, sync.batch_ms, sync.refresh_s), (100_000, 1024, 10, 60));
        assert_eq!(sync.settings().unwrap().key, b"0123456789abcdef0123");
    }

    #[test]
    fn bad_sync_values_name_line_and_key() {
        let (_dir, result) = with_sync("batch_records = 5000\n");
        let err = result.unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (14, "sync.batch_records"), "{err}");
        let (_dir, result) = with_sync("max_rate = 1\n");
        assert_eq!(result.unwrap_err().key, "sync.max_rate");
        let (_dir, result) = with_sync("peer_address = \"x\"\n");
        assert_eq!(result.unwrap_err().key, "sync.peer_address");
        let (dir, _) = with_sync("");
        std::fs::set_permissions(dir.path().join("sync.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = dir.path().display();
        let err = DirectorConfig::from_text(
            Path::new("/etc/fulcrum/director.toml"),
            &format!("name = \"d1\"\n[agents]\nca = \"{d}/ca.pem\"\ncert = \"{d}/d1.pem\"\nkey = \"{d}/d1.key\"\n\n[dataplane]\ninterface = \"eth0\"\n\n[sync]\nlisten = \"10.0.0.2:7950\"\npeer = \"10.0.0.3:7950\"\nkey_file = \"{d}/sync.key\"\n"),
        )
        .unwrap_err();
        assert_eq!(err.key, "sync.key_file", "{err}");
        assert!(err.message.contains("chmod 600"), "{err}");
    }
}
