//! The director's configuration file (`/etc/fulcrum/director.toml`).
//!
//! Every key is checked: unknown keys, bad values and inconsistent services are refused with the file, line
//! and key named (see [`fulcrum_protocol::config_file`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use fulcrum_protocol::config_file::{unreadable, ConfigError, ConfigText, KeyStep};
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
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

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

/// Scheduling algorithms, named as in LVS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
        config.validate(&source)?;
        Ok(config)
    }

    fn validate(&self, source: &ConfigText<'_>) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.len() > fulcrum_protocol::MAX_NAME_LEN {
            return Err(source.error_at(
                &[KeyStep::Key("name")],
                format!("must be 1 to {} bytes long", fulcrum_protocol::MAX_NAME_LEN),
            ));
        }
        for (key, path) in [("ca", &self.agents.ca), ("cert", &self.agents.cert), ("key", &self.agents.key)] {
            if !path.is_file() {
                return Err(source.error_at(
                    &[KeyStep::Key("agents"), KeyStep::Key(key)],
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        let mut services = HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |key: &'static str| [KeyStep::Key("service"), KeyStep::Index(i), KeyStep::Key(key)];
            if !services.insert((service.vip, service.port, service.protocol)) {
                return Err(source.error_at(
                    &at("vip"),
                    format!(
                        "duplicate service {}:{}/{:?}: each VIP, port and protocol may appear once",
                        service.vip, service.port, service.protocol
                    ),
                ));
            }
            if service.vip.is_unspecified() || service.vip.is_multicast() || service.vip.is_loopback() {
                return Err(source.error_at(&at("vip"), format!("{} cannot be a virtual IP", service.vip)));
            }
            if service.port == 0 {
                return Err(source.error_at(&at("port"), "port 0 cannot be served"));
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
                    return Err(source.error_at(
                        &at("address"),
                        format!(
                            "duplicate real server {}:{} in this service",
                            server.address,
                            server.port_for(service)
                        ),
                    ));
                }
                if server.address.is_unspecified() || server.address.is_multicast() || server.address == service.vip {
                    return Err(source.error_at(&at("address"), format!("{} cannot be a real server", server.address)));
                }
                if server.weight > MAX_WEIGHT {
                    return Err(source.error_at(
                        &at("weight"),
                        format!("weight {} is out of range 0..={MAX_WEIGHT}", server.weight),
                    ));
                }
                if server.port == Some(0) {
                    return Err(source.error_at(&at("port"), "port 0 cannot be served"));
                }
            }
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
}
