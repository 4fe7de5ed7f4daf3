//! The control plane: the one place the running configuration changes — from the file at start and on
//! SIGHUP, or from `fulcrumctl` edits. Every change passes the same checks as the file
//! ([`DirectorConfig::check`]), then is published at once to the workers (a new [`ServiceTable`] snapshot)
//! and to the agent listener (a new config). A refused change leaves everything as it was.
//!
//! Edits made with `fulcrumctl` live until the next reload, which re-reads the file (as `ipvsadm` edits do
//! under keepalived).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agents::AgentRegistry;
use crate::config::{DirectorConfig, ForwardMethod, Invalid, Protocol, RealServerConfig, Scheduler, ServiceConfig};
use crate::dataplane::table::{ServiceTable, TableBuilder};
use crate::flow::Proto;

/// Names a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match self.vip {
            IpAddr::V4(v4) => write!(f, "{v4}:{}/{proto}", self.port),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}/{proto}", self.port),
        }
    }
}

/// A change asked for through the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "edit", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Edit {
    ServiceAdd {
        service: ServiceKey,
        scheduler: Scheduler,
        persistence_s: u32,
        sloppy: bool,
    },
    ServiceEdit {
        service: ServiceKey,
        scheduler: Option<Scheduler>,
        persistence_s: Option<u32>,
        sloppy: Option<bool>,
    },
    ServiceDel {
        service: ServiceKey,
    },
    ServerAdd {
        service: ServiceKey,
        server: RealServerConfig,
    },
    ServerEdit {
        service: ServiceKey,
        address: IpAddr,
        port: Option<u16>,
        weight: Option<u32>,
        forward: Option<ForwardMethod>,
    },
    ServerDel {
        service: ServiceKey,
        address: IpAddr,
        port: Option<u16>,
        purge: bool,
    },
}

/// Why a change was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("no service {0}")]
    NoService(ServiceKey),
    #[error("service {0} already exists")]
    ServiceExists(ServiceKey),
    #[error("service {service} has no real server {address}:{port}")]
    NoServer { service: ServiceKey, address: IpAddr, port: u16 },
    #[error("service {service} already has real server {address}:{port}")]
    ServerExists { service: ServiceKey, address: IpAddr, port: u16 },
    #[error("{0}")]
    Invalid(#[from] Invalid),
}

/// A real server as `fulcrumctl list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    pub address: Ipv4Addr,
    pub port: u16,
    pub forward: ForwardMethod,
    pub weight: u32,
    pub effective_weight: u32,
    pub active_connections: u32,
    pub inactive_connections: u32,
    pub connections_total: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The resolved MAC address, once known.
    pub mac: Option<String>,
    /// From the server's agent, when one reports.
    pub cpu_bp: Option<u16>,
    pub response_time_us: Option<u32>,
    /// CPU pressure as reported (PSI `some avg10`, or a v1 cgroup's throttling in that form), basis points, and
    /// its cumulative stall time in microseconds, from which the blender takes each interval's share.
    #[serde(default)]
    pub cpu_pressure_bp: Option<u16>,
    #[serde(default)]
    pub cpu_pressure_total_us: Option<u64>,
    pub report_age_ms: Option<u64>,
    /// `up`, `slow-start`, `down`, `held-down`, `removed`, `unchecked` (no health signal configured), or for
    /// the sorry server `sorry-standby` / `sorry-active` (see `dataplane::table::Health`).
    pub health: String,
    /// `df`'s response-time and load terms from the feedback blender (0 with feedback off).
    pub df_response_time_term: u32,
    pub df_load_term: u32,
    /// The blender's estimate of the connections per second the server completes at full CPU (from the
    /// director's counts and the reported CPU); `None` until sampled or with feedback off.
    #[serde(default)]
    pub capacity_per_s: Option<u32>,
}

/// A virtual service as `fulcrumctl list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: ServiceKey,
    pub scheduler: Scheduler,
    pub persistence_s: u32,
    pub sloppy: bool,
    pub servers: Vec<ServerView>,
}

struct Inner {
    config: DirectorConfig,
    builder: TableBuilder,
}

/// Owns the running configuration and publishes it.
pub struct ControlPlane {
    inner: Mutex<Inner>,
    table: Arc<ArcSwap<ServiceTable>>,
    config_tx: watch::Sender<Arc<DirectorConfig>>,
}

impl ControlPlane {
    /// Starts from a checked configuration. `workers` sizes the per-worker counter slots.
    pub fn new(config: DirectorConfig, workers: usize) -> (ControlPlane, watch::Receiver<Arc<DirectorConfig>>) {
        let mut builder = TableBuilder::new(workers);
        let table = Arc::new(ArcSwap::from_pointee(builder.build(&config.services)));
        let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
        (ControlPlane { inner: Mutex::new(Inner { config, builder }), table, config_tx }, config_rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The snapshot the workers read.
    pub fn table(&self) -> Arc<ArcSwap<ServiceTable>> {
        Arc::clone(&self.table)
    }

    pub fn config(&self) -> DirectorConfig {
        self.lock().config.clone()
    }

    /// Replaces the whole configuration (a reload). The new one has been checked by the loader.
    pub fn replace(&self, config: DirectorConfig) {
        let mut inner = self.lock();
        inner.config = config;
        self.publish(&mut inner);
    }

    fn publish(&self, inner: &mut Inner) {
        self.table.store(Arc::new(inner.builder.build(&inner.config.services)));
        self.config_tx.send_replace(Arc::new(inner.config.clone()));
    }

    /// Applies one edit, or refuses it and changes nothing.
    pub fn edit(&self, edit: Edit) -> Result<String, EditError> {
        let mut inner = self.lock();
        let mut config = inner.config.clone();
        let (message, purge) = apply(&mut config.services, &edit)?;
        config.check()?;
        inner.config = config;
        self.publish(&mut inner);
        if let Some((service, address, port)) = purge {
            let current = inner.builder.current().clone();
            let id = current.servers.iter().enumerate().find_map(|(id, server)| {
                server.as_ref().filter(|s| {
                    s.retired
                        && IpAddr::V4(s.vip) == service.vip
                        && s.service_port == service.port
                        && proto_of(service.protocol) == s.proto
                        && IpAddr::V4(s.address) == address
                        && s.port == port
                })?;
                Some(id)
            });
            if let Some(id) = id {
                // Workers drop a connection whose server is gone the next time they see it.
                self.table.store(Arc::new(inner.builder.purge(id as u32)));
            }
        }
        Ok(message)
    }

    /// Every service with its servers' counters and their agents' latest reports.
    pub fn list(&self, agents: &AgentRegistry, now: std::time::Instant) -> Vec<ServiceView> {
        let config = self.lock().config.clone();
        let table = self.table.load();
        let reports = agents.snapshot(now);
        config
            .services
            .iter()
            .map(|service| {
                let key = ServiceKey { vip: service.vip, port: service.port, protocol: service.protocol };
                let entry = match service.vip {
                    IpAddr::V4(vip) => table.find(vip, service.port, proto_of(service.protocol)).map(|(_, e)| e),
                    IpAddr::V6(_) => None,
                };
                let servers = entry
                    .into_iter()
                    .flat_map(|entry| entry.servers.iter())
                    .filter_map(|id| table.server(*id))
                    .map(|server| {
                        let state = &server.state;
                        let report = reports.iter().find(|(ip, _)| *ip == IpAddr::V4(server.address)).map(|(_, v)| v);
                        let last = report.and_then(|r| r.last_report.as_ref());
                        let pressure = last.and_then(|r| r.cpu_pressure.as_ref());
                        ServerView {
                            address: server.address,
                            port: server.port,
                            forward: server.forward,
                            weight: server.configured_weight,
                            effective_weight: state.effective_weight.load(std::sync::atomic::Ordering::Relaxed),
                            active_connections: state.active(),
                            inactive_connections: state.inactive(),
                            connections_total: state.sum(|w| &w.connections_total),
                            packets: state.sum(|w| &w.packets),
                            bytes: state.sum(|w| &w.bytes),
                            mac: state
                                .mac()
                                .map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                            cpu_bp: last.and_then(|r| r.cpu).map(|c| c.busy_bp),
                            response_time_us: last.and_then(|r| r.probe.response_time_us()),
                            cpu_pressure_bp: pressure.map(|p| p.some_avg10_bp),
                            cpu_pressure_total_us: pressure.map(|p| p.some_total_us),
                            report_age_ms: report.and_then(|r| r.report_age_ms),
                            health: state.health().name().to_string(),
                            df_response_time_term: state.response_time_norm.load(std::sync::atomic::Ordering::Relaxed),
                            df_load_term: state.cpu_norm.load(std::sync::atomic::Ordering::Relaxed),
                            capacity_per_s: Some(state.capacity_per_s.load(std::sync::atomic::Ordering::Relaxed))
                                .filter(|&c| c > 0),
                        }
                    })
                    .collect();
                ServiceView {
                    service: key,
                    scheduler: service.scheduler,
                    persistence_s: service.persistence_s,
                    sloppy: service.sloppy,
                    servers,
                }
            })
            .collect()
    }
}

fn proto_of(protocol: Protocol) -> Proto {
    match protocol {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
    }
}

type Purge = Option<(ServiceKey, IpAddr, u16)>;

/// Applies `edit` to a copy of the service list.
fn apply(services: &mut Vec<ServiceConfig>, edit: &Edit) -> Result<(String, Purge), EditError> {
    let find = |services: &Vec<ServiceConfig>, key: &ServiceKey| {
        services.iter().position(|s| s.vip == key.vip && s.port == key.port && s.protocol == key.protocol)
    };
    let service_mut = |services: &mut Vec<ServiceConfig>, key: &ServiceKey| -> Result<usize, EditError> {
        find(services, key).ok_or(EditError::NoService(*key))
    };
    match edit {
        Edit::ServiceAdd { service, scheduler, persistence_s, sloppy } => {
            if find(services, service).is_some() {
                return Err(EditError::ServiceExists(*service));
            }
            services.push(ServiceConfig {
                vip: service.vip,
                port: service.port,
                protocol: service.protocol,
                scheduler: *scheduler,
                persistence_s: *persistence_s,
                sloppy: *sloppy,
                feedback: Default::default(),
                health: Default::default(),
                servers: Vec::new(),
            });
            Ok((format!("added service {service}"), None))
        }
        Edit::ServiceEdit { service, scheduler, persistence_s, sloppy } => {
            let i = service_mut(services, service)?;
            let s = &mut services[i];
            if let Some(v) = scheduler {
                s.scheduler = *v;
            }
            if let Some(v) = persistence_s {
                s.persistence_s = *v;
            }
            if let Some(v) = sloppy {
                s.sloppy = *v;
            }
            Ok((format!("edited service {service}"), None))
        }
        Edit::ServiceDel { service } => {
            let i = service_mut(services, service)?;
            services.remove(i);
            Ok((format!("deleted service {service}"), None))
        }
        Edit::ServerAdd { service, server } => {
            let i = service_mut(services, service)?;
            let port = server.port.unwrap_or(service.port);
            let s = &mut services[i];
            if s.servers.iter().any(|e| e.address == server.address && e.port.unwrap_or(s.port) == port) {
                return Err(EditError::ServerExists { service: *service, address: server.address, port });
            }
            s.servers.push(server.clone());
            Ok((format!("added real server {}:{port} to {service}", server.address), None))
        }
        Edit::ServerEdit { service, address, port, weight, forward } => {
            let i = service_mut(services, service)?;
            let s = &mut services[i];
            let port = port.unwrap_or(s.port);
            let service_port = s.port;
            let server = s
                .servers
                .iter_mut()
                .find(|e| e.address == *address && e.port.unwrap_or(service_port) == port)
                .ok_or(EditError::NoServer { service: *service, address: *address, port })?;
            if let Some(v) = weight {
                server.weight = *v;
            }
            if let Some(v) = forward {
                server.forward = *v;
            }
            Ok((format!("edited real server {address}:{port} of {service}"), None))
        }
        Edit::ServerDel { service, address, port, purge } => {
            let i = service_mut(services, service)?;
            let s = &mut services[i];
            let port = port.unwrap_or(s.port);
            let service_port = s.port;
            let at = s
                .servers
                .iter()
                .position(|e| e.address == *address && e.port.unwrap_or(service_port) == port)
                .ok_or(EditError::NoServer { service: *service, address: *address, port })?;
            s.servers.remove(at);
            let note = if *purge { ", its connections purged" } else { "; its connections continue until they end" };
            Ok((
                format!("deleted real server {address}:{port} from {service}{note}"),
                purge.then_some((*service, *address, port)),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn plane() -> (ControlPlane, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "d1.pem", "d1.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let d = dir.path().display();
        let text = format!(
            "name = \"d1\"\n[agents]\nca = \"{d}/ca.pem\"\ncert = \"{d}/d1.pem\"\nkey = \"{d}/d1.key\"\n\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\n[[service.server]]\naddress = \"10.0.0.11\"\n"
        );
        let config = DirectorConfig::from_text(Path::new("d.toml"), &text).unwrap();
        (ControlPlane::new(config, 2).0, dir)
    }

    fn web() -> ServiceKey {
        ServiceKey { vip: "10.0.0.100".parse().unwrap(), port: 80, protocol: Protocol::Tcp }
    }

    fn server(address: &str, weight: u32) -> RealServerConfig {
        RealServerConfig { address: address.parse().unwrap(), port: None, weight, forward: ForwardMethod::Nat }
    }

    #[test]
    fn edits_are_published_to_the_workers_table() {
        let (plane, _dir) = plane();
        let before = plane.table().load().generation;
        plane.edit(Edit::ServerAdd { service: web(), server: server("10.0.0.12", 3) }).unwrap();
        let table = plane.table().load_full();
        assert!(table.generation > before);
        let service = table.find("10.0.0.100".parse().unwrap(), 80, Proto::Tcp).unwrap().1;
        assert_eq!(service.servers.len(), 2);
        let added = table.server(service.servers[1]).unwrap();
        assert_eq!((added.configured_weight, added.forward), (3, ForwardMethod::Nat));

        plane
            .edit(Edit::ServerEdit {
                service: web(),
                address: "10.0.0.12".parse().unwrap(),
                port: None,
                weight: Some(0),
                forward: None,
            })
            .unwrap();
        let table = plane.table().load_full();
        assert_eq!(table.server(service.servers[1]).unwrap().configured_weight, 0, "drained");
    }

    #[test]
    fn refused_edits_change_nothing_and_say_why() {
        let (plane, _dir) = plane();
        let generation = plane.table().load().generation;
        let err = plane.edit(Edit::ServerAdd { service: web(), server: server("10.0.0.12", 70_000) }).unwrap_err();
        assert_eq!(err.to_string(), "service[0].server[1].weight: weight 70000 is out of range 0..=65535");
        let err = plane.edit(Edit::ServerAdd { service: web(), server: server("10.0.0.11", 1) }).unwrap_err();
        assert_eq!(err.to_string(), "service 10.0.0.100:80/tcp already has real server 10.0.0.11:80");
        let other = ServiceKey { port: 443, ..web() };
        let err = plane.edit(Edit::ServiceDel { service: other }).unwrap_err();
        assert_eq!(err.to_string(), "no service 10.0.0.100:443/tcp");
        let err = plane
            .edit(Edit::ServiceAdd { service: web(), scheduler: Scheduler::Rr, persistence_s: 0, sloppy: false })
            .unwrap_err();
        assert_eq!(err, EditError::ServiceExists(web()));
        assert_eq!(plane.table().load().generation, generation, "nothing was published");
        assert_eq!(plane.config().services[0].servers.len(), 1);
    }

    #[test]
    fn deleting_without_purge_retires_and_with_purge_forgets() {
        let (plane, _dir) = plane();
        let id = plane.table().load().services[0].servers[0];
        let address: IpAddr = "10.0.0.11".parse().unwrap();
        plane.edit(Edit::ServerDel { service: web(), address, port: None, purge: false }).unwrap();
        assert!(plane.table().load().server(id).is_some_and(|s| s.retired));
        plane.edit(Edit::ServerAdd { service: web(), server: server("10.0.0.11", 1) }).unwrap();
        assert_eq!(plane.table().load().services[0].servers, vec![id], "it came back under the same id");
        let message = plane.edit(Edit::ServerDel { service: web(), address, port: None, purge: true }).unwrap();
        assert!(message.contains("purged"), "{message}");
        assert!(plane.table().load().server(id).is_none());
    }
}
