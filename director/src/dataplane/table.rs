//! The service table the workers read: an immutable snapshot published by the control plane through an
//! atomic pointer swap, so a worker never locks to find a service.
//!
//! What must outlive a snapshot — a server's connection counts, its effective weight, its resolved MAC —
//! lives in [`ServerState`], shared by `Arc` from one snapshot to the next (matched by service and server
//! address), so editing the configuration never resets a counter or forgets a MAC.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ForwardMethod, Protocol, Scheduler, ServiceConfig};
use crate::flow::{Proto, ServerIndex};

/// One worker's counters for one server, on a cache line of its own: each worker writes only its slot, so
/// workers never contend for a line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerServerSlot {
    /// Connections in ESTABLISHED state (LVS's ActiveConn).
    pub active: AtomicU32,
    /// Connections in any other state (LVS's InActConn).
    pub inactive: AtomicU32,
    pub connections_total: AtomicU64,
    /// Connections that got going: TCP ones when they reached ESTABLISHED (the server answered the SYN),
    /// UDP flows when created (UDP has no handshake). The rest of `connections_total` is still waiting for
    /// the server's SYN-ACK or never got it: a server whose listen queue is full drops SYNs, and its
    /// clients retry a second later.
    pub connections_established: AtomicU64,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

/// State of one real server that survives configuration changes.
#[derive(Debug)]
pub struct ServerState {
    /// The weight the scheduler uses: the configured weight until dynamic feedback or health checks change
    /// it. 0 = quiesced.
    pub effective_weight: AtomicU32,
    /// The server's MAC as a big-endian u48 in a u64; 0 while unresolved.
    pub mac: AtomicU64,
    /// `df`'s response-time term T and load term L (`sched::ServerView`), written by the feedback task.
    pub response_time_norm: AtomicU32,
    pub cpu_norm: AtomicU32,
    /// The feedback blender's estimate of the connections per second the server completes at full CPU, rounded;
    /// 0 while unknown. Shown by `fulcrumctl list --json` and the metrics.
    pub capacity_per_s: AtomicU32,
    /// A [`Health`] as u8, written by the feedback task, read by `fulcrumctl list` and the metrics.
    pub health: AtomicU8,
    pub workers: Box<[WorkerServerSlot]>,
}

/// A server's health as the feedback task last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// No health signal configured for its service: always serving.
    Unchecked = 0,
    Up = 1,
    /// Serving, weight ramping up.
    SlowStart = 2,
    /// Failed (or not yet proven healthy): quiesced, weight 0.
    Down = 3,
    /// Healthy again, held back by flap damping.
    HeldDown = 4,
    /// Failed with `on_failure = "remove"`: out of scheduling.
    Removed = 5,
    /// A sorry server while the quorum is met: idle.
    SorryStandby = 6,
    /// A sorry server taking the service's new connections.
    SorryActive = 7,
}

impl Health {
    pub const fn name(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Up => "up",
            Health::SlowStart => "slow-start",
            Health::Down => "down",
            Health::HeldDown => "held-down",
            Health::Removed => "removed",
            Health::SorryStandby => "sorry-standby",
            Health::SorryActive => "sorry-active",
        }
    }

    /// Whether the server takes new connections.
    pub const fn is_serving(self) -> bool {
        matches!(self, Health::Unchecked | Health::Up | Health::SlowStart | Health::SorryActive)
    }

    /// Whether the server failed its health checks (down, held down after flapping, or removed), as opposed to
    /// idle or quiesced by its configured weight: persistence templates stop sending clients to a failed server
    /// (`sched::ServerView::failed`), while a drained one keeps its persistent clients.
    pub const fn is_failed(self) -> bool {
        matches!(self, Health::Down | Health::HeldDown | Health::Removed)
    }

    pub const fn from_u8(raw: u8) -> Health {
        match raw {
            1 => Health::Up,
            2 => Health::SlowStart,
            3 => Health::Down,
            4 => Health::HeldDown,
            5 => Health::Removed,
            6 => Health::SorryStandby,
            7 => Health::SorryActive,
            _ => Health::Unchecked,
        }
    }
}

impl ServerState {
    pub fn new(weight: u32, workers: usize) -> ServerState {
        ServerState {
            effective_weight: AtomicU32::new(weight),
            mac: AtomicU64::new(0),
            response_time_norm: AtomicU32::new(0),
            cpu_norm: AtomicU32::new(0),
            capacity_per_s: AtomicU32::new(0),
            health: AtomicU8::new(Health::Unchecked as u8),
            workers: (0..workers).map(|_| WorkerServerSlot::default()).collect(),
        }
    }

    pub fn active(&self) -> u32 {
        self.workers.iter().map(|w| w.active.load(Ordering::Relaxed)).fold(0, u32::saturating_add)
    }

    pub fn inactive(&self) -> u32 {
        self.workers.iter().map(|w| w.inactive.load(Ordering::Relaxed)).fold(0, u32::saturating_add)
    }

    pub fn sum(&self, field: impl Fn(&WorkerServerSlot) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| field(w).load(Ordering::Relaxed)).fold(0, u64::saturating_add)
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        let raw = self.mac.load(Ordering::Relaxed);
        (raw != 0).then(|| {
            let b = raw.to_be_bytes();
            [b[2], b[3], b[4], b[5], b[6], b[7]]
        })
    }

    pub fn set_mac(&self, mac: [u8; 6]) {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&mac);
        self.mac.store(u64::from_be_bytes(b), Ordering::Relaxed);
    }
}

/// A real server in a snapshot.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    /// The service it belongs (or, when retired, belonged) to.
    pub vip: Ipv4Addr,
    pub service_port: u16,
    pub proto: Proto,
    pub address: Ipv4Addr,
    pub port: u16,
    pub forward: ForwardMethod,
    pub configured_weight: u32,
    /// Removed from its service without `--purge`: no new connections, existing ones continue.
    pub retired: bool,
    /// The service's sorry server (`[service.health] sorry_server`): weight 0 until the quorum is lost.
    pub sorry: bool,
    pub state: Arc<ServerState>,
}

/// A virtual service in a snapshot.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub scheduler: Scheduler,
    pub persistence: Duration,
    pub sloppy: bool,
    /// Stable ids of its servers, in configuration order, then its sorry server if it has one.
    pub servers: Vec<ServerIndex>,
}

/// Identity of a server across snapshots.
type ServerKey = (Ipv4Addr, u16, Proto, Ipv4Addr, u16);

/// One published snapshot.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    /// Increases with every publication; workers rebuild their per-service scheduler state when it changes.
    pub generation: u64,
    pub services: Vec<ServiceEntry>,
    /// Every server by stable id; `None` once purged.
    pub servers: Vec<Option<ServerEntry>>,
    /// The distinct VIPs, for ARP and the steering program.
    pub vips: Vec<Ipv4Addr>,
}

impl ServiceTable {
    /// The service a packet to `vip:port/proto` belongs to.
    pub fn find(&self, vip: Ipv4Addr, port: u16, proto: Proto) -> Option<(usize, &ServiceEntry)> {
        self.services.iter().enumerate().find(|(_, s)| s.vip == vip && s.port == port && s.proto == proto)
    }

    pub fn server(&self, id: ServerIndex) -> Option<&ServerEntry> {
        self.servers.get(id as usize).and_then(Option::as_ref)
    }

    pub fn is_vip(&self, address: Ipv4Addr) -> bool {
        self.vips.contains(&address)
    }

    /// How packets must be steered to workers for these services (by client alone while one is persistent).
    pub fn steering(&self) -> super::steer::Steering {
        super::steer::Steering::for_services(self.services.iter().map(|s| !s.persistence.is_zero()))
    }
}

/// Makes snapshots; owned by the control plane. Remembers every server it has given an id.
#[derive(Debug)]
pub struct TableBuilder {
    workers: usize,
    ids: HashMap<ServerKey, ServerIndex>,
    current: ServiceTable,
}

impl TableBuilder {
    pub fn new(workers: usize) -> TableBuilder {
        TableBuilder { workers, ids: HashMap::new(), current: ServiceTable::default() }
    }

    /// The next snapshot for `services`. Servers that left their service stay, retired, so their connections
    /// continue; IPv6 services are skipped (config validation refuses them when a data plane is configured).
    pub fn build(&mut self, services: &[ServiceConfig]) -> ServiceTable {
        let mut table = ServiceTable {
            generation: self.current.generation + 1,
            services: Vec::new(),
            servers: self.current.servers.clone(),
            vips: Vec::new(),
        };
        for server in table.servers.iter_mut().flatten() {
            server.retired = true;
        }
        for service in services {
            let IpAddr::V4(vip) = service.vip else { continue };
            let proto = match service.protocol {
                Protocol::Tcp => Proto::Tcp,
                Protocol::Udp => Proto::Udp,
            };
            let mut ids = Vec::with_capacity(service.servers.len() + 1);
            let real = service.servers.iter().map(|s| (s.address, s.port_for(service), s.weight, s.forward, false));
            let sorry = service.health.sorry_server.map(|a| (a.ip(), a.port(), 0, service.health.sorry_forward, true));
            for (address, port, weight, forward, sorry) in real.chain(sorry) {
                let IpAddr::V4(address) = address else { continue };
                let key = (vip, service.port, proto, address, port);
                let next_id = table.servers.len() as ServerIndex;
                let id = *self.ids.entry(key).or_insert(next_id);
                let state = match table.servers.get(id as usize).and_then(Option::as_ref) {
                    Some(existing) => {
                        if existing.configured_weight != weight || existing.retired {
                            // A changed configured weight resets what the scheduler uses (the feedback task
                            // recomputes it at once).
                            existing.state.effective_weight.store(weight, Ordering::Relaxed);
                        }
                        Arc::clone(&existing.state)
                    }
                    None => {
                        let state = Arc::new(ServerState::new(weight, self.workers));
                        // A MAC is the address's, not the entry's: another service's entry for the same address
                        // may know it already, and the new one forwards at once instead of after an ARP probe.
                        let known = table.servers.iter().flatten().filter(|s| s.address == address);
                        if let Some(mac) = known.filter_map(|s| s.state.mac()).next() {
                            state.set_mac(mac);
                        }
                        state
                    }
                };
                let entry = ServerEntry {
                    vip,
                    service_port: service.port,
                    proto,
                    address,
                    port,
                    forward,
                    configured_weight: weight,
                    retired: false,
                    sorry,
                    state,
                };
                if id as usize == table.servers.len() {
                    table.servers.push(Some(entry));
                } else {
                    table.servers[id as usize] = Some(entry);
                }
                ids.push(id);
            }
            if !table.vips.contains(&vip) {
                table.vips.push(vip);
            }
            table.services.push(ServiceEntry {
                vip,
                port: service.port,
                proto,
                scheduler: service.scheduler,
                persistence: Duration::from_secs(service.persistence_s.into()),
                sloppy: service.sloppy,
                servers: ids,
            });
        }
        self.current = table.clone();
        table
    }

    /// Forgets a retired server for good (after the workers purged its connections). Its id is not reused.
    pub fn purge(&mut self, id: ServerIndex) -> ServiceTable {
        if let Some(slot) = self.current.servers.get_mut(id as usize) {
            if slot.as_ref().is_some_and(|s| s.retired) {
                *slot = None;
            }
        }
        self.current.generation += 1;
        self.current.clone()
    }

    pub fn current(&self) -> &ServiceTable {
        &self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RealServerConfig;

    fn service(port: u16, servers: &[(&str, u32)]) -> ServiceConfig {
        ServiceConfig {
            vip: "10.0.0.100".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Wlc,
            persistence_s: 0,
            sloppy: false,
            feedback: Default::default(),
            health: Default::default(),
            servers: servers
                .iter()
                .map(|(address, weight)| RealServerConfig {
                    address: address.parse().unwrap(),
                    port: None,
                    weight: *weight,
                    forward: ForwardMethod::Dr,
                })
                .collect(),
        }
    }

    #[test]
    fn server_state_and_ids_survive_republication() {
        let mut builder = TableBuilder::new(2);
        let first = builder.build(&[service(80, &[("10.0.0.11", 1)])]);
        let id = first.services[0].servers[0];
        let state = Arc::clone(&first.server(id).unwrap().state);
        state.workers[1].active.store(7, Ordering::Relaxed);
        state.set_mac([2, 0, 0, 0, 0, 0x11]);
        let second = builder.build(&[service(80, &[("10.0.0.12", 1), ("10.0.0.11", 5)]), service(443, &[])]);
        assert_eq!(second.generation, first.generation + 1);
        assert_eq!(second.services[0].servers[1], id, "the id is stable although the order changed");
        let again = &second.server(id).unwrap().state;
        assert!(Arc::ptr_eq(again, &state));
        assert_eq!(again.active(), 7);
        assert_eq!(again.mac(), Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(again.effective_weight.load(Ordering::Relaxed), 5, "the new configured weight applies");
        assert_eq!(second.vips, vec![Ipv4Addr::new(10, 0, 0, 100)], "one VIP, two services");
        assert!(second.find(Ipv4Addr::new(10, 0, 0, 100), 443, Proto::Tcp).is_some());
        assert!(second.find(Ipv4Addr::new(10, 0, 0, 100), 443, Proto::Udp).is_none());
        // A new service's entry for an address whose MAC another entry knows starts with it, and forwards at once.
        let third = builder.build(&[
            service(80, &[("10.0.0.12", 1), ("10.0.0.11", 5)]),
            service(8080, &[("10.0.0.11", 1), ("10.0.0.12", 1)]),
        ]);
        let added = |i: usize| third.server(third.services[1].servers[i]).unwrap();
        assert!(!Arc::ptr_eq(&added(0).state, &state), "an entry of its own");
        assert_eq!(added(0).state.mac(), Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(added(1).state.mac(), None, "10.0.0.12 was never resolved");
    }

    #[test]
    fn a_removed_server_is_retired_until_purged_and_its_id_is_never_reused() {
        let mut builder = TableBuilder::new(1);
        let first = builder.build(&[service(80, &[("10.0.0.11", 1), ("10.0.0.12", 1)])]);
        let gone = first.services[0].servers[1];
        let second = builder.build(&[service(80, &[("10.0.0.11", 1)])]);
        assert!(second.server(gone).is_some_and(|s| s.retired), "connections to it continue");
        assert!(!second.services[0].servers.contains(&gone), "but it gets no new ones");
        let third = builder.purge(gone);
        assert!(third.server(gone).is_none());
        let fourth = builder.build(&[service(80, &[("10.0.0.11", 1), ("10.0.0.13", 1)])]);
        assert_ne!(fourth.services[0].servers[1], gone);
        // Coming back after a retirement (not purged) keeps the old state.
        let mut builder = TableBuilder::new(1);
        let a = builder.build(&[service(80, &[("10.0.0.11", 3)])]);
        let id = a.services[0].servers[0];
        builder.build(&[service(80, &[])]);
        let back = builder.build(&[service(80, &[("10.0.0.11", 3)])]);
        assert_eq!(back.services[0].servers[0], id);
        assert!(!back.server(id).unwrap().retired);
    }

    #[test]
    fn each_worker_slot_has_its_own_cache_line() {
        assert_eq!(std::mem::align_of::<WorkerServerSlot>(), 64);
        assert_eq!(std::mem::size_of::<WorkerServerSlot>(), 64);
    }
}
