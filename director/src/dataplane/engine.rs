//! The packet engine of one worker: pure code that decides, for each received frame, whether it is ours and
//! what to send. It owns the worker's connection table, schedulers and persistence templates; it reads the
//! published [`ServiceTable`] and writes only its own counter slots.
//!
//! Per frame (`[virtio-net header][ethernet frame]`):
//! - **ARP** request for a VIP we serve: answer from userspace with our MAC. ARP from a real server: learn
//!   its MAC (direct routing and NAT need it).
//! - **TCP/UDP to a VIP:port service**: find the connection, or (a SYN, a UDP datagram, anything with
//!   `sloppy`) schedule a real server and create one; then forward by the server's method:
//!   `dr` rewrites the MACs only; `nat` also rewrites destination address and port, with checksums updated
//!   incrementally (complete or CHECKSUM_PARTIAL); `tun` prepends an outer IPv4 header (IP-in-IP), completing
//!   checksums and segmenting GSO frames in software because a virtio-net header cannot describe IP-in-IP GSO.
//! - **NAT replies** (real server → client): rewrite the source back to VIP:port and send to the client's MAC.
//! - **ICMP errors** about a tracked connection: to the real server (`dr`/`tun`: as is; `nat`: translated),
//!   or from a NAT real server back to the client (translated).
//! - Anything else is not ours: the kernel has its own copy, the engine ignores it.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::afpacket::{RxMeta, VNET_HDR_LEN};
use super::counters::{DropReason, WorkerCounters};
use super::table::{ServerEntry, ServiceTable};
use super::worker::{PacketHandler, Scratch, Verdict};
use crate::config::{ForwardMethod, TimeoutsConfig};
use crate::conntrack::{self, ConnTable, Direction, InsertError, Tick, Timeouts};
use crate::flow::{FlowV4, Proto, ServerIndex};
use crate::sched::{server_key, PersistenceTable, PickInput, SchedulerOptions, SchedulerState, ServerView};
use crate::sync::RecordKind;
use crate::wire::{
    self, checksum, emit_frag_needed, emit_gratuitous, emit_reply, ip_protocol, ArpOperation, ArpPacket, ChecksumState,
    EthernetAddress, GarpTarget, Ipv4Packet, ParsedV4, TcpPacket, UdpPacket, VnetHeader,
};

#[path = "engine_sync.rs"]
mod sync_hooks;

/// Persistence templates per service and worker.
const PERSISTENCE_CAPACITY: usize = 1 << 16;
/// Expired connections handled per loop turn: bounded work, so expiry never stalls forwarding.
const EXPIRE_BUDGET: usize = 4096;
/// How often unresolved real servers are probed by ARP, and resolved ones refreshed.
const ARP_PROBE_INTERVAL: Duration = Duration::from_secs(1);
const ARP_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Outer header of IP-in-IP.
const OUTER_IPV4_LEN: usize = 20;
const ETH_LEN: usize = 14;

/// What a worker's engine is told at start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub worker: usize,
    pub our_mac: [u8; 6],
    pub our_ip: Ipv4Addr,
    pub connection_capacity: usize,
    pub timeouts: TimeoutsConfig,
    pub garp_count: u32,
    pub garp_interval: Duration,
    pub tunnel_mtu: u16,
    /// Worker 0 also answers ARP, probes real servers and sends gratuitous ARPs (the steering program sends
    /// every non-IPv4 frame to it).
    pub arp_duty: bool,
}

/// Per-service state of this worker, rebuilt when a new table is published.
struct ServiceRuntime {
    scheduler: Option<SchedulerState>,
    persistence: Option<PersistenceTable>,
    /// Scheduler inputs, refilled before each pick (no allocation: capacity fixed at rebuild).
    views: Vec<ServerView>,
}

pub struct Engine {
    config: EngineConfig,
    table: Arc<ArcSwap<ServiceTable>>,
    snapshot: Arc<ServiceTable>,
    services: Vec<ServiceRuntime>,
    conns: ConnTable,
    /// The client-side MAC of each NAT connection (replies go back to it), by connection-table slot.
    client_macs: Vec<[u8; 6]>,
    counters: Arc<WorkerCounters>,
    /// Whether this director serves its VIPs (answers ARP, forwards); false on a standby.
    serving: Arc<AtomicBool>,
    was_serving: bool,
    /// Bumped by `Dataplane::announce`: a new value while serving re-sends the gratuitous-ARP burst.
    announce: Arc<AtomicU64>,
    announced: u64,
    epoch: Instant,
    garps_left: u32,
    next_garp: Instant,
    next_arp_probe: Instant,
    last_probe: Vec<Instant>,
    /// Connection sync with the peer director, when configured.
    sync: Option<sync_hooks::EngineSync>,
}

fn timeouts(config: &TimeoutsConfig) -> Timeouts {
    let s = |secs: u32| Duration::from_secs(secs.into());
    Timeouts {
        tcp_established: s(config.tcp_established_s),
        tcp_fin_wait: s(config.tcp_fin_wait_s),
        tcp_time_wait: s(config.tcp_time_wait_s),
        tcp_close: s(config.tcp_close_s),
        tcp_syn_recv: s(config.tcp_syn_s),
        tcp_syn_sent: s(config.tcp_syn_s),
        udp: s(config.udp_s),
        ..Timeouts::default()
    }
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        table: Arc<ArcSwap<ServiceTable>>,
        counters: Arc<WorkerCounters>,
        serving: Arc<AtomicBool>,
        now: Instant,
    ) -> anyhow::Result<Engine> {
        let conns = ConnTable::new(config.connection_capacity, timeouts(&config.timeouts), conntrack::random_seed())
            .map_err(|e| anyhow::anyhow!("connection table: {e}"))?;
        counters.table_capacity.store(conns.capacity() as u64, Ordering::Relaxed);
        let snapshot = table.load_full();
        let mut engine = Engine {
            client_macs: vec![[0u8; 6]; conns.capacity()],
            conns,
            table,
            snapshot: Arc::new(ServiceTable::default()),
            services: Vec::new(),
            counters,
            serving,
            was_serving: false,
            announce: Arc::new(AtomicU64::new(0)),
            announced: 0,
            epoch: now,
            garps_left: 0,
            next_garp: now,
            next_arp_probe: now,
            last_probe: Vec::new(),
            sync: None,
            config,
        };
        engine.adopt(snapshot);
        Ok(engine)
    }

    /// Watches `generation` (shared with `Dataplane::announce`): each change re-announces every VIP.
    pub fn watch_announcements(&mut self, generation: Arc<AtomicU64>) {
        self.announced = generation.load(Ordering::Relaxed);
        self.announce = generation;
    }

    fn tick(&self, now: Instant) -> Tick {
        Tick::since(self.epoch, now)
    }

    /// Switches to a newly published table: rebuilds schedulers (allocation happens here, not per packet)
    /// and carries persistence templates over by server identity.
    fn adopt(&mut self, table: Arc<ServiceTable>) {
        let mut services = Vec::with_capacity(table.services.len());
        for (i, service) in table.services.iter().enumerate() {
            let views: Vec<ServerView> = service
                .servers
                .iter()
                .filter_map(|id| table.server(*id))
                .map(|server| ServerView::new(server_key(server.address, server.port), server.configured_weight))
                .collect();
            let options = SchedulerOptions {
                p2c_seed: 0x5EED_F00D_CAFE_0001 ^ (self.config.worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ..SchedulerOptions::default()
            };
            let scheduler = match SchedulerState::new(service.scheduler, &views, &options) {
                Ok(state) => Some(state),
                Err(e) => {
                    tracing::error!(service = %service.vip, error = %e, "cannot build the scheduler; the service gets no new connections");
                    None
                }
            };
            // Keep this service's templates if it existed with the same persistence, remapping positions.
            let old = self.snapshot.services.iter().position(|s| {
                s.vip == service.vip
                    && s.port == service.port
                    && s.proto == service.proto
                    && s.persistence == service.persistence
            });
            let persistence = if service.persistence.is_zero() {
                None
            } else if let Some(mut kept) = old.and_then(|o| self.services.get_mut(o)).and_then(|r| r.persistence.take())
            {
                let old_ids = &self.snapshot.services[old.unwrap_or(0)].servers;
                kept.remap_servers(|position| {
                    let id = *old_ids.get(position)?;
                    service.servers.iter().position(|new_id| *new_id == id)
                });
                Some(kept)
            } else {
                Some(PersistenceTable::new(PERSISTENCE_CAPACITY, service.persistence, 0xC0FF_EE00 ^ i as u64))
            };
            services.push(ServiceRuntime { scheduler, persistence, views });
        }
        self.services = services;
        self.last_probe.resize(table.servers.len(), self.epoch);
        self.snapshot = table;
    }

    fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    fn arp(&mut self, frame: &[u8], l3: usize, operation: ArpOperation, scratch: &mut Scratch) -> Verdict {
        let Some(arp) = frame.get(l3..).map(ArpPacket::new_unchecked) else { return Verdict::Ignore };
        let (sender_ip, sender_mac) = (arp.sender_protocol_addr(), arp.sender_hardware_addr());
        // Learn real servers' MACs from whatever ARP they send (replies to our probes, their own requests).
        for server in self.snapshot.servers.iter().flatten() {
            if server.address == sender_ip && sender_mac.0 != [0; 6] {
                server.state.set_mac(sender_mac.0);
            }
        }
        let target = arp.target_protocol_addr();
        if operation == ArpOperation::REQUEST && self.serving() && self.snapshot.is_vip(target) && sender_ip != target {
            if let Some((index, buffer)) = scratch.take() {
                buffer[..VNET_HDR_LEN].fill(0);
                let reply = emit_reply(
                    &mut buffer[VNET_HDR_LEN..],
                    EthernetAddress(self.config.our_mac),
                    target,
                    sender_mac,
                    sender_ip,
                );
                if let Ok(len) = reply {
                    scratch.queue(index, VNET_HDR_LEN + len);
                    self.counters.arp_replies.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Verdict::Ignore
    }

    /// Picks a server for a new connection of `service`, honouring persistence.
    fn schedule(&mut self, service: usize, flow: &FlowV4, now: Instant) -> Option<ServerIndex> {
        let entry = self.snapshot.services.get(service)?;
        let runtime = self.services.get_mut(service)?;
        runtime.views.clear();
        for id in &entry.servers {
            let Some(server) = self.snapshot.server(*id) else { continue };
            let state = &server.state;
            let mut view = ServerView::new(
                server_key(server.address, server.port),
                state.effective_weight.load(Ordering::Relaxed),
            );
            view.active = state.active();
            view.inactive = state.inactive();
            view.response_time_norm = state.response_time_norm.load(Ordering::Relaxed);
            view.cpu_norm = state.cpu_norm.load(Ordering::Relaxed);
            view.failed = state.health().is_failed();
            runtime.views.push(view);
        }
        let input =
            PickInput { servers: &runtime.views, client: flow.src, client_port: flow.src_port, dest: flow.dst, now };
        let scheduler = runtime.scheduler.as_mut()?;
        let position = match runtime.persistence.as_mut() {
            Some(templates) => templates.pick(scheduler, &input),
            None => scheduler.pick(&input),
        }?;
        entry.servers.get(position).copied()
    }

    fn count_state(&self, server: &ServerEntry, change: conntrack::StateChange) {
        let slot = &server.state.workers[self.config.worker];
        if change.became_active() {
            slot.connections_established.fetch_add(1, Ordering::Relaxed);
            slot.active.fetch_add(1, Ordering::Relaxed);
            slot.inactive.fetch_sub(1, Ordering::Relaxed);
        } else if change.became_inactive() {
            slot.active.fetch_sub(1, Ordering::Relaxed);
            slot.inactive.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refuse(&self, reason: DropReason) -> Verdict {
        self.counters.count_drop(reason);
        Verdict::Drop
    }

    /// Client → VIP.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        buffer: &mut [u8],
        flow: FlowV4,
        l3: usize,
        l4: usize,
        tcp_flags: Option<wire::TcpFlags>,
        now: Instant,
        scratch: &mut Scratch,
    ) -> Verdict {
        let tick = self.tick(now);
        let flags = tcp_flags.unwrap_or(wire::TcpFlags::NONE);
        let mut handle = self.conns.lookup_forward(&flow);
        let mut created = None;
        if let Some(h) = handle {
            let (_, server) = self.conns.server(h);
            if self.snapshot.server(server).is_none() {
                // Its server was purged: the connection is gone; the packet is treated as new.
                self.conns.remove(h);
                handle = None;
            } else if flow.proto == Proto::Tcp && conntrack::opens_over(flags, self.conns.state(h)) {
                // A new connection on a reused client port: the old entry ends here, as if it had expired.
                self.end_for_reuse(h, tick);
                handle = None;
            }
        }
        let handle = match handle {
            Some(h) => h,
            None => {
                let Some((service, entry)) = self.snapshot.find(flow.dst, flow.dst_port, flow.proto) else {
                    return Verdict::Ignore;
                };
                let sloppy = entry.sloppy;
                if flow.proto == Proto::Tcp && !conntrack::may_create(flags, sloppy) {
                    self.conns.count_untracked_drop();
                    return self.refuse(DropReason::NoConnection);
                }
                let Some(id) = self.schedule(service, &flow, now) else { return self.refuse(DropReason::NoServer) };
                let Some(server) = self.snapshot.server(id) else { return self.refuse(DropReason::NoServer) };
                let method = server.forward;
                let reply = (method == ForwardMethod::Nat).then_some(FlowV4 {
                    src: server.address,
                    dst: flow.src,
                    src_port: server.port,
                    dst_port: flow.src_port,
                    proto: flow.proto,
                });
                let mut inserted = self.conns.insert(flow, reply, service as u16, id, method, tick);
                if let Err(InsertError::ReplyExists(old)) = inserted {
                    // The same client port reached the same real server's address and port through another
                    // service before (its entry lingers as the server's TIME_WAIT does). To the server both are
                    // one 4-tuple, so a SYN over a closing entry opens a new connection there just as on a reused
                    // port of the same service: the old entry ends here. Over a live one it is refused, as the
                    // server would refuse it.
                    if flow.proto == Proto::Tcp && conntrack::opens_over(flags, self.conns.state(old)) {
                        self.end_for_reuse(old, tick);
                        inserted = self.conns.insert(flow, reply, service as u16, id, method, tick);
                    }
                }
                match inserted {
                    Ok(h) => {
                        if let Some(server) = self.snapshot.server(id) {
                            let slot = &server.state.workers[self.config.worker];
                            slot.connections_total.fetch_add(1, Ordering::Relaxed);
                            if flow.proto == Proto::Udp {
                                slot.connections_established.fetch_add(1, Ordering::Relaxed);
                            }
                            slot.inactive.fetch_add(1, Ordering::Relaxed);
                        }
                        self.counters.connections_created.fetch_add(1, Ordering::Relaxed);
                        if let (Some(mac), Some(src)) =
                            (self.client_macs.get_mut(h.index()), buffer.get(VNET_HDR_LEN + 6..VNET_HDR_LEN + 12))
                        {
                            mac.copy_from_slice(src);
                        }
                        created = Some((service, id));
                        h
                    }
                    Err(InsertError::Full) => return self.refuse(DropReason::TableFull),
                    Err(InsertError::ReplyExists(_)) => return self.refuse(DropReason::ReplyClash),
                    Err(_) => return self.refuse(DropReason::Malformed),
                }
            }
        };
        let change = self.conns.on_packet(handle, Direction::Input, flags, tick);
        if let Some((service, server)) = created {
            self.sync_connection(handle, RecordKind::New, tick);
            self.sync_template(service, flow.src, server);
        } else if change.old != change.new {
            self.sync_connection(handle, RecordKind::Update, tick);
        }
        let (_, id) = self.conns.server(handle);
        // Borrowed, not cloned: cloning the entry would touch its Arc's count, a cache line all workers share.
        let Some(server) = self.snapshot.server(id) else { return self.refuse(DropReason::ServerGone) };
        self.count_state(server, change);
        let Some(server_mac) = server.state.mac() else { return self.refuse(DropReason::Unresolved) };
        let slot = &server.state.workers[self.config.worker];
        slot.packets.fetch_add(1, Ordering::Relaxed);
        slot.bytes.fetch_add((buffer.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        let (address, port, forward) = (server.address, server.port, server.forward);
        match forward {
            ForwardMethod::Dr => {
                self.set_macs(buffer, server_mac);
                Verdict::Transmit { len: buffer.len() }
            }
            ForwardMethod::Nat => {
                let state = checksum_state(buffer);
                let frame = &mut buffer[VNET_HDR_LEN..];
                rewrite_l3_l4(frame, l3, l4, flow.proto, Rewrite::Dst(address, port), state);
                self.set_macs(buffer, server_mac);
                Verdict::Transmit { len: buffer.len() }
            }
            ForwardMethod::Tun => self.tunnel(buffer, l3, l4, flow, address, server_mac, tcp_flags, scratch),
        }
    }

    fn set_macs(&self, buffer: &mut [u8], dst: [u8; 6]) {
        if let Some(macs) = buffer.get_mut(VNET_HDR_LEN..VNET_HDR_LEN + 12) {
            macs[..6].copy_from_slice(&dst);
            macs[6..].copy_from_slice(&self.config.our_mac);
        }
    }

    /// Real server → client, NAT.
    fn reply(
        &mut self,
        buffer: &mut [u8],
        flow: FlowV4,
        l3: usize,
        l4: usize,
        tcp_flags: Option<wire::TcpFlags>,
        now: Instant,
    ) -> Verdict {
        let Some(handle) = self.conns.lookup_reply(&flow) else { return Verdict::Ignore };
        if !self.serving() {
            return Verdict::Ignore;
        }
        let tick = self.tick(now);
        let flags = tcp_flags.unwrap_or(wire::TcpFlags::NONE);
        let info = self.conns.get(handle);
        if self.snapshot.server(info.server).is_none() {
            self.conns.remove(handle);
            return self.refuse(DropReason::ServerGone);
        }
        let change = self.conns.on_packet(handle, Direction::Output, flags, tick);
        if change.old != change.new {
            self.sync_connection(handle, RecordKind::Update, tick);
        }
        if let Some(server) = self.snapshot.server(info.server) {
            self.count_state(server, change);
        }
        let state = checksum_state(buffer);
        let frame = &mut buffer[VNET_HDR_LEN..];
        rewrite_l3_l4(frame, l3, l4, flow.proto, Rewrite::Src(info.forward.dst, info.forward.dst_port), state);
        let client_mac = self.client_macs.get(handle.index()).copied().unwrap_or([0xff; 6]);
        self.set_macs(buffer, client_mac);
        Verdict::Transmit { len: buffer.len() }
    }

    /// IP-in-IP to the real server. The outer header goes in a scratch buffer in front of the unchanged inner
    /// packet; GSO frames are segmented in software (a virtio-net header cannot describe IP-in-IP GSO), and
    /// checksums left partial are completed, since no device downstream will.
    #[allow(clippy::too_many_arguments)]
    fn tunnel(
        &mut self,
        buffer: &mut [u8],
        l3: usize,
        l4: usize,
        flow: FlowV4,
        server: Ipv4Addr,
        server_mac: [u8; 6],
        tcp_flags: Option<wire::TcpFlags>,
        scratch: &mut Scratch,
    ) -> Verdict {
        let mtu = usize::from(self.config.tunnel_mtu);
        let (vnet_bytes, frame) = buffer.split_at_mut(VNET_HDR_LEN);
        let vnet = VnetHeader::new_unchecked(&*vnet_bytes);
        let inner_len = frame.len() - l3;
        // Clamp the MSS of SYNs so that the client's segments fit the tunnel.
        if tcp_flags.is_some_and(|f| f.syn()) {
            let state = vnet.checksum_state();
            let limit = (mtu - OUTER_IPV4_LEN - 40) as u16;
            if let Some(l4_bytes) = frame.get_mut(l4..) {
                let _ = TcpPacket::new_unchecked(l4_bytes).clamp_mss(limit, state);
            }
        }
        if vnet.is_gso() {
            let gso_size = usize::from(vnet.gso_size());
            return self.segment_into_tunnel(frame, l3, l4, flow, gso_size, server, server_mac, scratch);
        }
        if inner_len + OUTER_IPV4_LEN > mtu {
            let dont_fragment = Ipv4Packet::new_unchecked(&frame[l3..]).dont_frag();
            if dont_fragment {
                self.send_frag_needed(frame, l3, (mtu - OUTER_IPV4_LEN) as u16, scratch);
            }
            return self.refuse(DropReason::TooBig);
        }
        if vnet.needs_csum() && wire::complete_checksum(frame, &vnet).is_err() {
            return self.refuse(DropReason::Malformed);
        }
        let header = TunnelHeader::new(self.config.our_mac, server_mac, self.config.our_ip, server, &frame[l3..]);
        let Some((index, head)) = scratch.take() else { return self.refuse(DropReason::NoBuffer) };
        head[..VNET_HDR_LEN].fill(0);
        let outer = write_tunnel_header(&mut head[VNET_HDR_LEN..], &header, inner_len);
        Verdict::TransmitAfter {
            prefix: index,
            prefix_len: VNET_HDR_LEN + outer,
            from: VNET_HDR_LEN + l3,
            to: VNET_HDR_LEN + frame.len(),
        }
    }

    /// Splits a TCP GSO super-frame into MSS-sized segments, each encapsulated, with full checksums.
    #[allow(clippy::too_many_arguments)]
    fn segment_into_tunnel(
        &mut self,
        frame: &[u8],
        l3: usize,
        l4: usize,
        flow: FlowV4,
        gso_size: usize,
        server: Ipv4Addr,
        server_mac: [u8; 6],
        scratch: &mut Scratch,
    ) -> Verdict {
        if flow.proto != Proto::Tcp || gso_size == 0 {
            return self.refuse(DropReason::TooBig);
        }
        let Some(tcp) = frame.get(l4..).map(TcpPacket::new_unchecked) else {
            return self.refuse(DropReason::Malformed);
        };
        let tcp_header_len = tcp.header_len();
        let ip_header_len = l4 - l3;
        let headers = ip_header_len + tcp_header_len;
        let payload = &frame[l4 + tcp_header_len..];
        let mtu = usize::from(self.config.tunnel_mtu);
        let segment_payload = gso_size.min(mtu - OUTER_IPV4_LEN - headers);
        let count = payload.len().div_ceil(segment_payload).max(1);
        if scratch.remaining() < count {
            return self.refuse(DropReason::NoBuffer);
        }
        let inner_ip = Ipv4Packet::new_unchecked(&frame[l3..l4]);
        let first_id = inner_ip.ident();
        let header = TunnelHeader::new(self.config.our_mac, server_mac, self.config.our_ip, server, &frame[l3..l4]);
        let first_seq = tcp.seq_number();
        let flags = tcp.flags();
        for (i, chunk) in payload.chunks(segment_payload).enumerate() {
            let Some((index, buf)) = scratch.take() else { return self.refuse(DropReason::NoBuffer) };
            buf[..VNET_HDR_LEN].fill(0);
            let inner_start = VNET_HDR_LEN + ETH_LEN + OUTER_IPV4_LEN;
            let inner_len = headers + chunk.len();
            let inner = &mut buf[inner_start..inner_start + inner_len];
            inner[..headers].copy_from_slice(&frame[l3..l3 + headers]);
            inner[headers..].copy_from_slice(chunk);
            {
                let mut ip = Ipv4Packet::new_unchecked(&mut inner[..]);
                ip.set_total_len(inner_len as u16);
                ip.set_ident(first_id.wrapping_add(i as u16));
                ip.fill_checksum();
            }
            {
                let (ip_part, tcp_part) = inner.split_at_mut(ip_header_len);
                let ip = Ipv4Packet::new_unchecked(&*ip_part);
                let mut segment = TcpPacket::new_unchecked(tcp_part);
                segment.set_seq_number(first_seq.wrapping_add((i * segment_payload) as u32));
                let last = i + 1 == count;
                let mut f = flags.0;
                if !last {
                    f &= !(wire::TcpFlags::FIN.0 | wire::TcpFlags::PSH.0);
                }
                if i > 0 {
                    f &= !wire::TcpFlags::CWR.0;
                }
                segment.set_flags(wire::TcpFlags(f));
                segment.fill_checksum(ip.src_addr(), ip.dst_addr());
            }
            let outer = write_tunnel_header(&mut buf[VNET_HDR_LEN..], &header, inner_len);
            scratch.queue(index, VNET_HDR_LEN + outer + inner_len);
        }
        Verdict::Consumed
    }

    /// ICMP "fragmentation needed" back to the sender of a packet too big for the tunnel (RFC 1191).
    fn send_frag_needed(&mut self, frame: &[u8], l3: usize, mtu: u16, scratch: &mut Scratch) {
        if !wire::icmp_error_allowed(&Ipv4Packet::new_unchecked(&frame[l3..])) {
            return;
        }
        let Some((index, buffer)) = scratch.take() else { return };
        buffer[..VNET_HDR_LEN].fill(0);
        let eth = &mut buffer[VNET_HDR_LEN..VNET_HDR_LEN + ETH_LEN];
        eth[..6].copy_from_slice(&frame[6..12]);
        eth[6..12].copy_from_slice(&self.config.our_mac);
        eth[12..14].copy_from_slice(&[0x08, 0x00]);
        let ident = self.counters.looped.transmitted.load(Ordering::Relaxed) as u16;
        let ip = &mut buffer[VNET_HDR_LEN + ETH_LEN..];
        if let Ok(len) = emit_frag_needed(ip, &frame[l3..], self.config.our_ip, mtu, ident, wire::QuoteLen::Rfc1812) {
            scratch.queue(index, VNET_HDR_LEN + ETH_LEN + len);
        }
    }

    /// An ICMP error about a tracked connection.
    fn icmp_error(&mut self, buffer: &mut [u8], l3: usize, quote: wire::QuotedV4) -> Verdict {
        let Some(quoted) = quote.flow else { return Verdict::Ignore };
        if !self.serving() {
            return Verdict::Ignore;
        }
        // About a packet the VIP sent to a client (DR/TUN replies, or a NAT reply after translation): the
        // connection is the reverse of the quoted flow. Send the error to the server that owns it.
        if self.snapshot.is_vip(quoted.src) {
            let Some(handle) = self.conns.lookup_forward(&quoted.reversed()) else { return Verdict::Ignore };
            let info = self.conns.get(handle);
            let Some(server) = self.snapshot.server(info.server) else { return Verdict::Ignore };
            let Some(mac) = server.state.mac() else { return self.refuse(DropReason::Unresolved) };
            if server.forward == ForwardMethod::Nat {
                let frame = &mut buffer[VNET_HDR_LEN..];
                translate_icmp(frame, l3, quote, server.address, server.port, true);
            }
            self.set_macs(buffer, mac);
            self.counters.icmp_forwarded.fetch_add(1, Ordering::Relaxed);
            return Verdict::Transmit { len: buffer.len() };
        }
        // From a NAT real server's side, about a packet the client sent it: translate back to the VIP.
        let Some(handle) = self.conns.lookup_reply(&quoted.reversed()) else { return Verdict::Ignore };
        let info = self.conns.get(handle);
        let frame = &mut buffer[VNET_HDR_LEN..];
        translate_icmp(frame, l3, quote, info.forward.dst, info.forward.dst_port, false);
        let client_mac = self.client_macs.get(handle.index()).copied().unwrap_or([0xff; 6]);
        self.set_macs(buffer, client_mac);
        self.counters.icmp_forwarded.fetch_add(1, Ordering::Relaxed);
        Verdict::Transmit { len: buffer.len() }
    }

    fn arp_duties(&mut self, now: Instant, scratch: &mut Scratch) {
        let serving = self.serving();
        let generation = self.announce.load(Ordering::Relaxed);
        if serving && (!self.was_serving || generation != self.announced) {
            // Just started serving, or asked to announce again: announce every VIP.
            self.garps_left = self.config.garp_count;
            self.next_garp = now;
        }
        self.was_serving = serving;
        self.announced = generation;
        if serving && self.garps_left > 0 && now >= self.next_garp {
            for vip in self.snapshot.vips.clone() {
                let Some((index, buffer)) = scratch.take() else { break };
                buffer[..VNET_HDR_LEN].fill(0);
                if let Ok(len) = emit_gratuitous(
                    &mut buffer[VNET_HDR_LEN..],
                    EthernetAddress(self.config.our_mac),
                    vip,
                    GarpTarget::Broadcast,
                ) {
                    scratch.queue(index, VNET_HDR_LEN + len);
                    self.counters.garps.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.garps_left -= 1;
            self.next_garp = now + self.config.garp_interval;
        }
        if now >= self.next_arp_probe {
            self.next_arp_probe = now + ARP_PROBE_INTERVAL / 4;
            for (id, server) in self.snapshot.servers.iter().enumerate() {
                let Some(server) = server else { continue };
                let last = self.last_probe.get(id).copied().unwrap_or(self.epoch);
                let due = if server.state.mac().is_some() { ARP_REFRESH_INTERVAL } else { ARP_PROBE_INTERVAL };
                if now.duration_since(last) < due && last != self.epoch {
                    continue;
                }
                let Some((index, buffer)) = scratch.take() else { break };
                buffer[..VNET_HDR_LEN].fill(0);
                if let Ok(len) = wire::emit_request(
                    &mut buffer[VNET_HDR_LEN..],
                    EthernetAddress(self.config.our_mac),
                    self.config.our_ip,
                    server.address,
                ) {
                    scratch.queue(index, VNET_HDR_LEN + len);
                    self.counters.arp_probes.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(slot) = self.last_probe.get_mut(id) {
                    *slot = now;
                }
            }
        }
    }
}

impl PacketHandler for Engine {
    fn handle(&mut self, buffer: &mut [u8], meta: RxMeta, now: Instant, scratch: &mut Scratch) -> Verdict {
        let Some(frame) = buffer.get(VNET_HDR_LEN..) else { return self.refuse(DropReason::Malformed) };
        let parsed = match wire::parse_ipv4_flow(frame) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.counters.count_malformed(&error);
                return Verdict::Drop;
            }
        };
        match parsed {
            ParsedV4::Arp { l3_offset, operation } => {
                if self.config.arp_duty {
                    let frame = &buffer[VNET_HDR_LEN..];
                    return self.arp(frame, l3_offset, operation, scratch);
                }
                Verdict::Ignore
            }
            ParsedV4::Ipv4 { flow, l3_offset, l4_offset, tcp_flags, is_fragment } => {
                if self.snapshot.is_vip(flow.dst) {
                    if !self.serving() || self.snapshot.find(flow.dst, flow.dst_port, flow.proto).is_none() {
                        return Verdict::Ignore;
                    }
                    if meta.truncated {
                        return self.refuse(DropReason::Truncated);
                    }
                    if meta.vlan_stripped {
                        return self.refuse(DropReason::Vlan);
                    }
                    if is_fragment {
                        return self.refuse(DropReason::Fragment);
                    }
                    return self.forward(buffer, flow, l3_offset, l4_offset, tcp_flags, now, scratch);
                }
                self.reply(buffer, flow, l3_offset, l4_offset, tcp_flags, now)
            }
            ParsedV4::Ipv4Fragment { dst, .. } if self.snapshot.is_vip(dst) && self.serving() => {
                self.refuse(DropReason::Fragment)
            }
            ParsedV4::Icmpv4 { l3_offset, quote: Some(quote), .. } => self.icmp_error(buffer, l3_offset, quote),
            _ => Verdict::Ignore,
        }
    }

    fn poll(&mut self, now: Instant, scratch: &mut Scratch) {
        let current = self.table.load();
        if current.generation != self.snapshot.generation {
            let table = arc_swap::Guard::into_inner(current);
            self.adopt(table);
        }
        if self.config.arp_duty {
            self.arp_duties(now, scratch);
        }
        let tick = self.tick(now);
        let expired = self.expire_and_sync(tick, EXPIRE_BUDGET);
        self.sync_poll(now, tick);
        self.counters.connections_expired.fetch_add(expired, Ordering::Relaxed);
        self.counters.table_entries.store(self.conns.len() as u64, Ordering::Relaxed);
    }
}

fn checksum_state(buffer: &[u8]) -> ChecksumState {
    match buffer.get(..VNET_HDR_LEN) {
        Some(vnet) => VnetHeader::new_unchecked(vnet).checksum_state(),
        None => ChecksumState::Complete,
    }
}

enum Rewrite {
    /// New destination address and port (client → server, NAT).
    Dst(Ipv4Addr, u16),
    /// New source address and port (server → client, NAT).
    Src(Ipv4Addr, u16),
}

/// Rewrites an address and a port of a TCP/UDP packet in place, with incremental checksum updates.
fn rewrite_l3_l4(frame: &mut [u8], l3: usize, l4: usize, proto: Proto, rewrite: Rewrite, state: ChecksumState) {
    let (l3_bytes, l4_bytes) = frame.split_at_mut(l4);
    let Some(l3_bytes) = l3_bytes.get_mut(l3..) else { return };
    let mut ip = Ipv4Packet::new_unchecked(l3_bytes);
    let (old, new, port) = match rewrite {
        Rewrite::Dst(address, port) => (ip.rewrite_dst_addr(address), address, port),
        Rewrite::Src(address, port) => (ip.rewrite_src_addr(address), address, port),
    };
    match proto {
        Proto::Tcp => {
            let mut tcp = TcpPacket::new_unchecked(l4_bytes);
            tcp.pseudo_header_addr_changed(old, new, state);
            match rewrite {
                Rewrite::Dst(..) => tcp.rewrite_dst_port(port, state),
                Rewrite::Src(..) => tcp.rewrite_src_port(port, state),
            };
        }
        Proto::Udp => {
            let mut udp = UdpPacket::new_unchecked(l4_bytes);
            udp.pseudo_header_addr_changed(old, new, state);
            match rewrite {
                Rewrite::Dst(..) => udp.rewrite_dst_port(port, state),
                Rewrite::Src(..) => udp.rewrite_src_port(port, state),
            };
        }
    }
}

/// Translates an ICMP error for NAT. `to_server`: an error the client side sent about a packet from the VIP,
/// going to the real server — the outer destination and the quoted source become the server's. Otherwise an
/// error from the server's side about a packet to it, going to the client — the outer source and the quoted
/// destination become the VIP's. The ICMP checksum is recomputed (the message is small).
fn translate_icmp(frame: &mut [u8], l3: usize, quote: wire::QuotedV4, address: Ipv4Addr, port: u16, to_server: bool) {
    let Some(ip_bytes) = frame.get_mut(l3..) else { return };
    let mut ip = Ipv4Packet::new_unchecked(&mut *ip_bytes);
    if to_server {
        ip.rewrite_dst_addr(address);
    } else {
        ip.rewrite_src_addr(address);
    }
    // The quoted header: its own checksum updated, its ports set; quoted transport checksums are left alone
    // (the quote holds only 8 bytes of it and receivers do not check it).
    if let Some(quoted) = frame.get_mut(quote.l3_offset..quote.l4_offset) {
        let mut inner = Ipv4Packet::new_unchecked(quoted);
        if to_server {
            inner.rewrite_src_addr(address);
        } else {
            inner.rewrite_dst_addr(address);
        }
    }
    if let Some(ports) = frame.get_mut(quote.l4_offset..quote.l4_offset + 4) {
        let at = if to_server { 0 } else { 2 };
        ports[at..at + 2].copy_from_slice(&port.to_be_bytes());
    }
    // ICMP header starts after the outer IPv4 header.
    let header_len = usize::from(frame.get(l3).copied().unwrap_or(0x45) & 0x0f) * 4;
    let total_len = frame.get(l3 + 2..l3 + 4).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let (start, end) = (l3 + header_len, (l3 + total_len).min(frame.len()));
    if start + 4 <= end {
        let icmp = &mut frame[start..end];
        icmp[2..4].fill(0);
        let sum = !checksum::data(icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Writes Ethernet and outer IPv4 (protocol 4) headers for an IP-in-IP packet; returns their length.
/// The outer header copies the inner packet's DSCP, ECN and DF (as Linux's ipip does).
struct TunnelHeader {
    our_mac: [u8; 6],
    server_mac: [u8; 6],
    our_ip: Ipv4Addr,
    server: Ipv4Addr,
    tos: u8,
    dont_fragment: bool,
}

impl TunnelHeader {
    fn new(our_mac: [u8; 6], server_mac: [u8; 6], our_ip: Ipv4Addr, server: Ipv4Addr, inner_ip: &[u8]) -> TunnelHeader {
        let inner = Ipv4Packet::new_unchecked(inner_ip);
        TunnelHeader {
            our_mac,
            server_mac,
            our_ip,
            server,
            tos: inner.dscp() << 2 | inner.ecn(),
            dont_fragment: inner.dont_frag(),
        }
    }
}

fn write_tunnel_header(buf: &mut [u8], header: &TunnelHeader, inner_len: usize) -> usize {
    let TunnelHeader { our_mac, server_mac, our_ip, server, tos, dont_fragment: df } = *header;
    buf[..6].copy_from_slice(&server_mac);
    buf[6..12].copy_from_slice(&our_mac);
    buf[12..14].copy_from_slice(&[0x08, 0x00]);
    let mut outer = Ipv4Packet::new_unchecked(&mut buf[ETH_LEN..ETH_LEN + OUTER_IPV4_LEN]);
    outer.set_version(4);
    outer.set_header_len(OUTER_IPV4_LEN);
    outer.set_dscp(tos >> 2);
    outer.set_ecn(tos & 3);
    outer.set_total_len((inner_len + OUTER_IPV4_LEN) as u16);
    outer.set_ident(0);
    outer.clear_flags();
    outer.set_dont_frag(df);
    outer.set_frag_offset(0);
    outer.set_ttl(64);
    outer.set_protocol(ip_protocol::IPIP);
    outer.set_src_addr(our_ip);
    outer.set_dst_addr(server);
    outer.fill_checksum();
    ETH_LEN + OUTER_IPV4_LEN
}
