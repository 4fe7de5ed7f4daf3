//! The engine without sockets: crafted frames in, verdicts and bytes out, on a simulated clock. Checksums are
//! checked with the wire module's full verification, independent of the incremental updates under test.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::afpacket::{RxMeta, VNET_HDR_LEN};
use super::counters::{DropReason, WorkerCounters};
use super::engine::{Engine, EngineConfig};
use super::table::{Health, ServiceTable, TableBuilder};
use super::worker::{PacketHandler, Scratch, Verdict};
use crate::config::{ForwardMethod, Protocol, RealServerConfig, Scheduler, ServiceConfig, TimeoutsConfig};
use crate::wire::{self, ArpOperation, ArpPacket, Ipv4Packet, TcpFlags, TcpPacket, UdpPacket};

const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x21];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 21);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const NO_META: RxMeta = RxMeta { vlan_stripped: false, losing: false, truncated: false };

fn server_mac(i: u8) -> [u8; 6] {
    [2, 0, 0, 0, 1, i]
}

fn server_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i)
}

struct Rig {
    engine: Engine,
    table: Arc<ArcSwap<ServiceTable>>,
    builder: TableBuilder,
    counters: Arc<WorkerCounters>,
    serving: Arc<AtomicBool>,
    now: Instant,
}

fn service(forward: ForwardMethod, weights: &[u32], scheduler: Scheduler) -> ServiceConfig {
    ServiceConfig {
        vip: VIP.into(),
        port: 80,
        protocol: Protocol::Tcp,
        scheduler,
        persistence_s: 0,
        sloppy: false,
        feedback: Default::default(),
        health: Default::default(),
        servers: weights
            .iter()
            .enumerate()
            .map(|(i, weight)| RealServerConfig {
                address: server_ip(i as u8 + 1).into(),
                port: Some(8080),
                weight: *weight,
                forward,
            })
            .collect(),
    }
}

impl Rig {
    fn new(services: &[ServiceConfig], capacity: usize) -> Rig {
        let mut builder = TableBuilder::new(1);
        let table = Arc::new(ArcSwap::from_pointee(builder.build(services)));
        for (i, server) in table.load().servers.iter().flatten().enumerate() {
            server.state.set_mac(server_mac(i as u8 + 1));
        }
        let counters = Arc::new(WorkerCounters::default());
        let serving = Arc::new(AtomicBool::new(true));
        let now = Instant::now();
        let config = EngineConfig {
            worker: 0,
            our_mac: OUR_MAC,
            our_ip: OUR_IP,
            connection_capacity: capacity,
            timeouts: TimeoutsConfig::default(),
            garp_count: 2,
            garp_interval: Duration::from_millis(100),
            tunnel_mtu: 1500,
            arp_duty: true,
        };
        let engine =
            Engine::new(config, Arc::clone(&table), Arc::clone(&counters), Arc::clone(&serving), now).expect("engine");
        Rig { engine, table, builder, counters, serving, now }
    }

    fn republish(&mut self, services: &[ServiceConfig]) {
        self.table.store(Arc::new(self.builder.build(services)));
        let mut scratch = Scratch::new();
        self.engine.poll(self.now, &mut scratch);
    }

    fn handle(&mut self, buffer: &mut [u8]) -> (Verdict, Vec<Vec<u8>>) {
        let mut scratch = Scratch::new();
        let verdict = self.engine.handle(buffer, NO_META, self.now, &mut scratch);
        let queued = queued_frames(&scratch);
        (verdict, queued)
    }

    fn dropped(&self, reason: DropReason) -> u64 {
        self.counters.drops[reason as usize].load(Ordering::Relaxed)
    }
}

fn queued_frames(scratch: &Scratch) -> Vec<Vec<u8>> {
    scratch.queued_frames().map(|frame| frame.to_vec()).collect()
}

/// `[vnet hdr (zeros)][ethernet][ipv4][tcp][payload]` with complete, valid checksums.
fn tcp_frame(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; VNET_HDR_LEN + 14 + 20 + 20 + payload.len()];
    let frame = &mut buf[VNET_HDR_LEN..];
    frame[..6].copy_from_slice(&OUR_MAC);
    frame[6..12].copy_from_slice(&src_mac);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..34]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((40 + payload.len()) as u16);
        ip.set_dont_frag(true);
        ip.set_ttl(64);
        ip.set_protocol(6);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
    }
    {
        let tcp_bytes = &mut frame[34..];
        tcp_bytes[20..].copy_from_slice(payload);
        let mut tcp = TcpPacket::new_unchecked(tcp_bytes);
        tcp.set_src_port(sport);
        tcp.set_dst_port(dport);
        tcp.set_seq_number(1000);
        tcp.set_header_len(20);
        tcp.set_flags(flags);
        tcp.set_window_len(65535);
        tcp.fill_checksum(src, dst);
    }
    buf
}

fn syn_from_client(sport: u16) -> Vec<u8> {
    tcp_frame(CLIENT_MAC, CLIENT, sport, VIP, 80, TcpFlags::SYN, &[])
}

fn ack_from_client(sport: u16) -> Vec<u8> {
    tcp_frame(CLIENT_MAC, CLIENT, sport, VIP, 80, TcpFlags::ACK, b"GET / HTTP/1.1\r\n\r\n")
}

fn ip_of(buffer: &[u8]) -> Ipv4Packet<&[u8]> {
    Ipv4Packet::new_unchecked(&buffer[VNET_HDR_LEN + 14..])
}

fn tcp_of(buffer: &[u8]) -> TcpPacket<&[u8]> {
    TcpPacket::new_unchecked(&buffer[VNET_HDR_LEN + 34..])
}

fn assert_checksums_valid(buffer: &[u8]) {
    let ip = ip_of(buffer);
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    assert!(tcp_of(buffer).verify_checksum(ip.src_addr(), ip.dst_addr()), "TCP checksum");
}

#[test]
fn arp_for_a_vip_is_answered_only_while_serving() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1], Scheduler::Rr)], 64);
    let mut request = vec![0u8; VNET_HDR_LEN + 42];
    let n = wire::emit_request(&mut request[VNET_HDR_LEN..], wire::EthernetAddress(CLIENT_MAC), CLIENT, VIP).unwrap();
    assert_eq!(n, 42);
    let (verdict, sent) = rig.handle(&mut request.clone());
    assert_eq!(verdict, Verdict::Ignore, "the kernel keeps its copy");
    assert_eq!(sent.len(), 1);
    let reply = ArpPacket::new_unchecked(&sent[0][VNET_HDR_LEN + 14..]);
    assert_eq!(reply.operation(), ArpOperation::REPLY);
    assert_eq!((reply.sender_hardware_addr().0, reply.sender_protocol_addr()), (OUR_MAC, VIP));
    assert_eq!(reply.target_protocol_addr(), CLIENT);
    assert_eq!(&sent[0][VNET_HDR_LEN..VNET_HDR_LEN + 6], &CLIENT_MAC);

    rig.serving.store(false, Ordering::Relaxed);
    assert!(rig.handle(&mut request.clone()).1.is_empty(), "a standby stays silent");
    let mut other = vec![0u8; VNET_HDR_LEN + 42];
    wire::emit_request(&mut other[VNET_HDR_LEN..], wire::EthernetAddress(CLIENT_MAC), CLIENT, OUR_IP).unwrap();
    rig.serving.store(true, Ordering::Relaxed);
    assert!(rig.handle(&mut other).1.is_empty(), "the director's own address is the kernel's business");
}

#[test]
fn gratuitous_arps_when_serving_starts_and_probes_for_unresolved_servers() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1], Scheduler::Rr)], 64);
    rig.table.load().servers[0].as_ref().unwrap().state.mac.store(0, Ordering::Relaxed);
    let mut scratch = Scratch::new();
    rig.engine.poll(rig.now, &mut scratch);
    let frames = queued_frames(&scratch);
    let arps: Vec<_> = frames.iter().map(|f| ArpPacket::new_unchecked(f[VNET_HDR_LEN + 14..].to_vec())).collect();
    assert!(arps.iter().any(|a| a.sender_protocol_addr() == VIP && a.target_protocol_addr() == VIP), "a GARP");
    assert!(
        arps.iter().any(|a| a.sender_protocol_addr() == OUR_IP && a.target_protocol_addr() == server_ip(1)),
        "a probe"
    );

    // The server's answer is learned.
    let mut answer = vec![0u8; VNET_HDR_LEN + 42];
    wire::emit_reply(
        &mut answer[VNET_HDR_LEN..],
        wire::EthernetAddress(server_mac(1)),
        server_ip(1),
        wire::EthernetAddress(OUR_MAC),
        OUR_IP,
    )
    .unwrap();
    rig.handle(&mut answer);
    assert_eq!(rig.table.load().servers[0].as_ref().unwrap().state.mac(), Some(server_mac(1)));
}

#[test]
fn dr_rewrites_only_the_macs_and_keeps_a_connection_on_its_server() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1, 1], Scheduler::Rr)], 64);
    let mut syn = syn_from_client(40000);
    let original = syn.clone();
    assert_eq!(rig.handle(&mut syn).0, Verdict::Transmit { len: syn.len() });
    let chosen = syn[VNET_HDR_LEN..VNET_HDR_LEN + 6].to_vec();
    assert!(chosen == server_mac(1) || chosen == server_mac(2));
    assert_eq!(&syn[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], &OUR_MAC);
    assert_eq!(&syn[VNET_HDR_LEN + 12..], &original[VNET_HDR_LEN + 12..], "IP and TCP untouched");
    for _ in 0..5 {
        let mut ack = ack_from_client(40000);
        rig.handle(&mut ack);
        assert_eq!(&ack[VNET_HDR_LEN..VNET_HDR_LEN + 6], chosen.as_slice(), "the connection stays put");
    }
    // A new connection goes to the other server (rr).
    let mut syn2 = syn_from_client(40001);
    rig.handle(&mut syn2);
    assert_ne!(&syn2[VNET_HDR_LEN..VNET_HDR_LEN + 6], chosen.as_slice());
}

#[test]
fn a_non_syn_without_an_entry_is_dropped_and_counted_unless_sloppy() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1], Scheduler::Rr)], 64);
    assert_eq!(rig.handle(&mut ack_from_client(40000)).0, Verdict::Drop);
    assert_eq!(rig.dropped(DropReason::NoConnection), 1);
    let mut sloppy = service(ForwardMethod::Dr, &[1], Scheduler::Rr);
    sloppy.sloppy = true;
    rig.republish(&[sloppy]);
    assert!(matches!(rig.handle(&mut ack_from_client(40000)).0, Verdict::Transmit { .. }));
}

#[test]
fn nat_rewrites_both_ways_with_valid_checksums() {
    let mut rig = Rig::new(&[service(ForwardMethod::Nat, &[1], Scheduler::Rr)], 64);
    let mut syn = syn_from_client(40000);
    assert!(matches!(rig.handle(&mut syn).0, Verdict::Transmit { .. }));
    assert_eq!((ip_of(&syn).dst_addr(), tcp_of(&syn).dst_port()), (server_ip(1), 8080));
    assert_eq!(&syn[VNET_HDR_LEN..VNET_HDR_LEN + 6], &server_mac(1));
    assert_checksums_valid(&syn);

    let mut reply = tcp_frame(server_mac(1), server_ip(1), 8080, CLIENT, 40000, TcpFlags::SYN | TcpFlags::ACK, &[]);
    assert!(matches!(rig.handle(&mut reply).0, Verdict::Transmit { .. }));
    assert_eq!((ip_of(&reply).src_addr(), tcp_of(&reply).src_port()), (VIP, 80));
    assert_eq!(&reply[VNET_HDR_LEN..VNET_HDR_LEN + 6], &CLIENT_MAC, "back to the client's MAC");
    assert_checksums_valid(&reply);

    // Traffic from the server that belongs to no connection is not ours.
    let mut stray = tcp_frame(server_mac(1), server_ip(1), 8080, CLIENT, 40999, TcpFlags::ACK, &[]);
    assert_eq!(rig.handle(&mut stray).0, Verdict::Ignore);
}

#[test]
fn nat_keeps_checksum_partial_seeds_right() {
    let mut rig = Rig::new(&[service(ForwardMethod::Nat, &[1], Scheduler::Rr)], 64);
    let mut syn = syn_from_client(40000);
    // As veth hands it over: NEEDS_CSUM, the TCP field holding the pseudo-header seed.
    let (vnet, frame) = syn.split_at_mut(VNET_HDR_LEN);
    vnet[0] = 1;
    vnet[6..8].copy_from_slice(&(14u16 + 20).to_le_bytes());
    vnet[8..10].copy_from_slice(&16u16.to_le_bytes());
    TcpPacket::new_unchecked(&mut frame[34..]).fill_partial_checksum(CLIENT, VIP);
    rig.handle(&mut syn);
    // Completing the checksum as the device would must give a valid one for the new addresses.
    let (vnet, frame) = syn.split_at_mut(VNET_HDR_LEN);
    wire::complete_checksum(frame, &wire::VnetHeader::new_unchecked(&*vnet)).unwrap();
    assert_checksums_valid(&syn);
    assert_eq!(ip_of(&syn).dst_addr(), server_ip(1));
}

#[test]
fn a_quiesced_server_gets_no_new_connections_but_keeps_its_own() {
    let weights = [1, 1];
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &weights, Scheduler::Rr)], 64);
    let mut first = syn_from_client(40000);
    rig.handle(&mut first);
    let owner = first[VNET_HDR_LEN..VNET_HDR_LEN + 6].to_vec();
    let owner_index = if owner == server_mac(1) { 0 } else { 1 };
    let mut drained = service(ForwardMethod::Dr, &weights, Scheduler::Rr);
    drained.servers[owner_index].weight = 0;
    rig.republish(&[drained]);
    for port in 41000..41020 {
        let mut syn = syn_from_client(port);
        rig.handle(&mut syn);
        assert_ne!(&syn[VNET_HDR_LEN..VNET_HDR_LEN + 6], owner.as_slice(), "a new connection on the quiesced server");
    }
    let mut ack = ack_from_client(40000);
    rig.handle(&mut ack);
    assert_eq!(&ack[VNET_HDR_LEN..VNET_HDR_LEN + 6], owner.as_slice(), "the open connection continues");
}

#[test]
fn persistent_clients_stay_on_a_drained_server_but_leave_a_failed_one() {
    let mut config = service(ForwardMethod::Dr, &[1, 1], Scheduler::Rr);
    config.persistence_s = 300;
    let mut rig = Rig::new(&[config], 64);
    let dst_mac = |frame: &[u8]| frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].to_vec();
    let mut syn = syn_from_client(40000);
    rig.handle(&mut syn);
    let owner = dst_mac(&syn);
    let table = rig.table.load_full();
    let owner_state = &table
        .servers
        .iter()
        .flatten()
        .find(|server| server_mac(server.address.octets()[3] - 10).as_slice() == owner.as_slice())
        .expect("the owner's entry")
        .state;
    // Drained (weight 0, health unchanged): the template holds.
    owner_state.effective_weight.store(0, Ordering::Relaxed);
    let mut syn = syn_from_client(40001);
    rig.handle(&mut syn);
    assert_eq!(dst_mac(&syn), owner, "a drained server keeps its persistent client");
    // Failed its health checks: the client is scheduled elsewhere, and stays there once the server is back.
    owner_state.health.store(Health::Down as u8, Ordering::Relaxed);
    let mut syn = syn_from_client(40002);
    rig.handle(&mut syn);
    let moved = dst_mac(&syn);
    assert_ne!(moved, owner, "a persistent client sent to a failed server");
    owner_state.health.store(Health::Up as u8, Ordering::Relaxed);
    owner_state.effective_weight.store(1, Ordering::Relaxed);
    let mut syn = syn_from_client(40003);
    rig.handle(&mut syn);
    assert_eq!(dst_mac(&syn), moved, "the template names the new server");
}

#[test]
fn a_full_table_drops_new_connections_and_says_so() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1], Scheduler::Rr)], 1);
    assert!(matches!(rig.handle(&mut syn_from_client(40000)).0, Verdict::Transmit { .. }));
    assert_eq!(rig.handle(&mut syn_from_client(40001)).0, Verdict::Drop);
    assert_eq!(rig.dropped(DropReason::TableFull), 1);
}

#[test]
fn tun_encapsulates_and_clamps_the_mss() {
    let mut rig = Rig::new(&[service(ForwardMethod::Tun, &[1], Scheduler::Rr)], 64);
    // A SYN with an MSS option of 1460, as a client on a 1500-byte link sends.
    let mut with_mss = tcp_frame(CLIENT_MAC, CLIENT, 40000, VIP, 80, TcpFlags::SYN, &[]);
    {
        with_mss.splice(VNET_HDR_LEN + 54..VNET_HDR_LEN + 54, [2u8, 4, 0x05, 0xb4]);
        let frame = &mut with_mss[VNET_HDR_LEN..];
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_total_len(44);
        ip.fill_checksum();
        let mut tcp = TcpPacket::new_unchecked(&mut frame[34..]);
        tcp.set_header_len(24);
        tcp.fill_checksum(CLIENT, VIP);
    }
    let mut syn = with_mss;
    let mut scratch = Scratch::new();
    let verdict = rig.engine.handle(&mut syn, NO_META, rig.now, &mut scratch);
    let Verdict::TransmitAfter { prefix, prefix_len, from, to } = verdict else { panic!("{verdict:?}") };
    let mut packet = scratch.get(prefix).unwrap()[..prefix_len].to_vec();
    packet.extend_from_slice(&syn[from..to]);
    let outer = Ipv4Packet::new_unchecked(&packet[VNET_HDR_LEN + 14..]);
    assert_eq!((outer.protocol(), outer.src_addr(), outer.dst_addr()), (4, OUR_IP, server_ip(1)));
    assert!(outer.verify_checksum());
    assert_eq!(usize::from(outer.total_len()), 20 + 44);
    assert_eq!(&packet[VNET_HDR_LEN..VNET_HDR_LEN + 6], &server_mac(1));
    let inner = Ipv4Packet::new_unchecked(&packet[VNET_HDR_LEN + 34..]);
    assert_eq!(inner.dst_addr(), VIP, "the inner packet still goes to the VIP");
    let tcp = TcpPacket::new_unchecked(&packet[VNET_HDR_LEN + 54..]);
    assert_eq!(tcp.mss_option().unwrap(), Some(1500 - 20 - 40), "MSS clamped to fit the tunnel");
    assert!(tcp.verify_checksum(CLIENT, VIP));
}

#[test]
fn tun_segments_a_gso_super_frame() {
    let mut rig = Rig::new(&[service(ForwardMethod::Tun, &[1], Scheduler::Rr)], 64);
    rig.handle(&mut syn_from_client(40000));
    let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    let mut big = tcp_frame(CLIENT_MAC, CLIENT, 40000, VIP, 80, TcpFlags::ACK | TcpFlags::PSH, &payload);
    {
        let (vnet, frame) = big.split_at_mut(VNET_HDR_LEN);
        vnet[0] = 1; // NEEDS_CSUM
        vnet[1] = 1; // GSO TCPV4
        vnet[2..4].copy_from_slice(&54u16.to_le_bytes());
        vnet[4..6].copy_from_slice(&1400u16.to_le_bytes());
        vnet[6..8].copy_from_slice(&34u16.to_le_bytes());
        vnet[8..10].copy_from_slice(&16u16.to_le_bytes());
        TcpPacket::new_unchecked(&mut frame[34..]).fill_partial_checksum(CLIENT, VIP);
    }
    let (verdict, segments) = rig.handle(&mut big);
    assert_eq!(verdict, Verdict::Consumed);
    assert_eq!(segments.len(), 3, "4000 bytes in 1400-byte segments");
    let mut joined = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        assert!(segment.len() - VNET_HDR_LEN - 14 <= 1500, "fits the tunnel MTU");
        let outer = Ipv4Packet::new_unchecked(&segment[VNET_HDR_LEN + 14..]);
        assert!(outer.verify_checksum());
        let inner = Ipv4Packet::new_unchecked(&segment[VNET_HDR_LEN + 34..]);
        assert!(inner.verify_checksum());
        let tcp = TcpPacket::new_unchecked(&segment[VNET_HDR_LEN + 54..]);
        assert!(tcp.verify_checksum(CLIENT, VIP), "segment {i}: full checksum");
        assert_eq!(tcp.seq_number(), 1000 + 1400 * i as u32);
        assert_eq!(tcp.flags().psh(), i == 2, "PSH only on the last segment");
        joined.extend_from_slice(tcp.payload());
    }
    assert_eq!(joined, payload);
}

#[test]
fn udp_flows_are_tracked_and_balanced() {
    let mut udp = service(ForwardMethod::Nat, &[1, 1], Scheduler::Rr);
    udp.protocol = Protocol::Udp;
    let mut rig = Rig::new(&[udp], 64);
    let datagram = |sport: u16| {
        let mut buf = tcp_frame(CLIENT_MAC, CLIENT, sport, VIP, 80, TcpFlags(0), &[0; 12]);
        let frame = &mut buf[VNET_HDR_LEN..];
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_protocol(17);
        ip.set_total_len(20 + 8 + 12);
        ip.fill_checksum();
        let udp_bytes = &mut frame[34..];
        udp_bytes[4..6].copy_from_slice(&20u16.to_be_bytes());
        let mut udp = UdpPacket::new_unchecked(udp_bytes);
        udp.fill_checksum(CLIENT, VIP);
        buf.truncate(VNET_HDR_LEN + 14 + 20 + 20);
        buf
    };
    let mut first = datagram(5000);
    assert!(matches!(rig.handle(&mut first).0, Verdict::Transmit { .. }));
    let server = Ipv4Packet::new_unchecked(&first[VNET_HDR_LEN + 14..]).dst_addr();
    let mut again = datagram(5000);
    rig.handle(&mut again);
    assert_eq!(Ipv4Packet::new_unchecked(&again[VNET_HDR_LEN + 14..]).dst_addr(), server, "a UDP flow stays put");
    let ip = Ipv4Packet::new_unchecked(&again[VNET_HDR_LEN + 14..]);
    assert!(UdpPacket::new_unchecked(&again[VNET_HDR_LEN + 34..]).verify_checksum(ip.src_addr(), ip.dst_addr()));
    let mut other = datagram(5001);
    rig.handle(&mut other);
    assert_ne!(Ipv4Packet::new_unchecked(&other[VNET_HDR_LEN + 14..]).dst_addr(), server, "rr");
    // UDP has no handshake: every flow counts as established when created.
    assert_eq!(scheduled_and_established(&rig), (2, 2));
}

/// Connections scheduled and connections established, summed over the rig's servers.
fn scheduled_and_established(rig: &Rig) -> (u64, u64) {
    let table = rig.table.load();
    table.servers.iter().flatten().fold((0, 0), |(total, established), s| {
        (total + s.state.sum(|w| &w.connections_total), established + s.state.sum(|w| &w.connections_established))
    })
}

#[test]
fn a_connection_counts_as_established_once_its_handshake_completes() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1], Scheduler::Rr)], 64);
    for port in [40000, 40001, 40002] {
        rig.handle(&mut syn_from_client(port));
    }
    // Three SYNs sent on; none answered yet.
    assert_eq!(scheduled_and_established(&rig), (3, 0));
    // Two clients complete the handshake (the server answered their SYNs), and send more.
    for port in [40000, 40001] {
        rig.handle(&mut ack_from_client(port));
        rig.handle(&mut ack_from_client(port));
    }
    assert_eq!(scheduled_and_established(&rig), (3, 2), "the third SYN was never answered");
    // Its client's retry goes to the same entry: not a new connection.
    rig.handle(&mut syn_from_client(40002));
    rig.handle(&mut ack_from_client(40002));
    assert_eq!(scheduled_and_established(&rig), (3, 3));
}

#[test]
fn arbitrary_frames_never_panic_the_engine() {
    let mut rig = Rig::new(&[service(ForwardMethod::Nat, &[1, 1], Scheduler::Wlc)], 64);
    let mut state = 0x1234_5678_9abc_def0u64;
    let template = syn_from_client(40000);
    for round in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut frame = template.clone();
        // Corrupt a few bytes of a valid frame (more likely to reach deep code than random noise), and cut it.
        for k in 0..(state % 4 + 1) {
            let at = ((state >> (8 * k)) as usize) % frame.len();
            frame[at] = (state >> (8 * k + 3)) as u8;
        }
        frame.truncate(((state >> 40) as usize % frame.len()).max(VNET_HDR_LEN * (round % 2)));
        let mut scratch = Scratch::new();
        rig.engine.handle(&mut frame, NO_META, rig.now, &mut scratch);
    }
}

/// An ICMP error frame: `[vnet][eth][ipv4 src→dst][icmp type/code][quoted datagram]`, via the wire emitter.
fn icmp_error_about(from_mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr, offending: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    buf[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&OUR_MAC);
    buf[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&from_mac);
    buf[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x08, 0x00]);
    let len = wire::emit_frag_needed(&mut buf[VNET_HDR_LEN + 14..], offending, from, 1400, 7, wire::QuoteLen::Rfc792)
        .expect("icmp");
    // The emitter addresses the error to the offending packet's source; here that is `to`.
    assert_eq!(Ipv4Packet::new_unchecked(&buf[VNET_HDR_LEN + 14..]).dst_addr(), to);
    buf.truncate(VNET_HDR_LEN + 14 + len);
    buf
}

#[test]
fn icmp_errors_about_a_dr_connection_reach_its_server() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1, 1], Scheduler::Rr)], 64);
    let mut syn = syn_from_client(40000);
    rig.handle(&mut syn);
    let owner = syn[VNET_HDR_LEN..VNET_HDR_LEN + 6].to_vec();
    // A router near the client says the server's reply (VIP:80 → client) was too big.
    let reply = tcp_frame(owner.as_slice().try_into().unwrap(), VIP, 80, CLIENT, 40000, TcpFlags::ACK, &[0; 100]);
    let router = Ipv4Addr::new(10, 0, 0, 1);
    let mut error = icmp_error_about([2, 0, 0, 0, 0, 1], router, VIP, &reply[VNET_HDR_LEN + 14..]);
    assert!(matches!(rig.handle(&mut error).0, Verdict::Transmit { .. }));
    assert_eq!(&error[VNET_HDR_LEN..VNET_HDR_LEN + 6], owner.as_slice(), "to the server that owns the connection");
    // An error about a connection nobody has is not ours.
    let stranger = tcp_frame(CLIENT_MAC, VIP, 80, CLIENT, 40999, TcpFlags::ACK, &[0; 100]);
    let mut unknown = icmp_error_about([2, 0, 0, 0, 0, 1], router, VIP, &stranger[VNET_HDR_LEN + 14..]);
    assert_eq!(rig.handle(&mut unknown).0, Verdict::Ignore);
}

#[test]
fn icmp_errors_from_a_nat_server_are_translated_back_to_the_vip() {
    let mut rig = Rig::new(&[service(ForwardMethod::Nat, &[1], Scheduler::Rr)], 64);
    let mut syn = syn_from_client(40000);
    rig.handle(&mut syn);
    // The server's side complains about the (translated) packet client → server:8080.
    let mut error = icmp_error_about(server_mac(1), server_ip(1), CLIENT, &syn[VNET_HDR_LEN + 14..]);
    assert!(matches!(rig.handle(&mut error).0, Verdict::Transmit { .. }));
    let frame = &error[VNET_HDR_LEN..];
    assert_eq!(&frame[..6], &CLIENT_MAC);
    let outer = Ipv4Packet::new_unchecked(&frame[14..]);
    assert_eq!(outer.src_addr(), VIP, "the client hears from the VIP, never the real server");
    assert!(outer.verify_checksum());
    let icmp = &frame[14 + 20..14 + usize::from(outer.total_len())];
    assert_eq!(!wire::checksum::data(icmp), 0, "ICMP checksum valid");
    let quoted = Ipv4Packet::new_unchecked(&icmp[8..]);
    assert_eq!(quoted.dst_addr(), VIP);
    assert!(quoted.verify_checksum());
    assert_eq!(u16::from_be_bytes([icmp[8 + 22], icmp[8 + 23]]), 80, "quoted destination port back to the service's");
}

#[test]
fn a_purged_server_loses_its_connections() {
    let services = [service(ForwardMethod::Dr, &[1], Scheduler::Rr)];
    let mut rig = Rig::new(&services, 64);
    rig.handle(&mut syn_from_client(40000));
    assert!(matches!(rig.handle(&mut ack_from_client(40000)).0, Verdict::Transmit { .. }));
    // Removed without purge: the connection continues.
    let mut emptied = services[0].clone();
    emptied.servers.clear();
    rig.republish(&[emptied.clone()]);
    assert!(matches!(rig.handle(&mut ack_from_client(40000)).0, Verdict::Transmit { .. }));
    // Purged: the next packet finds no server; a non-SYN is then a stray.
    let table = rig.builder.purge(0);
    rig.table.store(Arc::new(table));
    let mut scratch = Scratch::new();
    rig.engine.poll(rig.now, &mut scratch);
    assert_eq!(rig.handle(&mut ack_from_client(40000)).0, Verdict::Drop);
    assert_eq!(rig.dropped(DropReason::NoConnection), 1);
}

#[test]
fn an_announcement_resends_the_gratuitous_arp_burst_only_while_serving() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1], Scheduler::Rr)], 64);
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    rig.engine.watch_announcements(Arc::clone(&generation));
    let garps = |rig: &Rig| rig.counters.garps.load(Ordering::Relaxed);
    // The start-up burst: garp_count (2) rounds, 100 ms apart.
    for step in 0..4 {
        rig.engine.poll(rig.now + Duration::from_millis(100 * step), &mut Scratch::new());
    }
    assert_eq!(garps(&rig), 2);
    generation.fetch_add(1, Ordering::Relaxed);
    for step in 4..8 {
        rig.engine.poll(rig.now + Duration::from_millis(100 * step), &mut Scratch::new());
    }
    assert_eq!(garps(&rig), 4, "one more burst per announcement");
    rig.serving.store(false, Ordering::Relaxed);
    generation.fetch_add(1, Ordering::Relaxed);
    for step in 8..12 {
        rig.engine.poll(rig.now + Duration::from_millis(100 * step), &mut Scratch::new());
    }
    assert_eq!(garps(&rig), 4, "a standby never announces");
}

// ----- connection sync: what a worker emits, and how the peer's worker installs it -----

mod sync {
    use super::*;
    use crate::conntrack::ConnState;
    use crate::sync::{hub, RecordKind, SyncRecord, TaskPorts};

    /// A rig whose engine is attached to sync, with the task's ends of its rings.
    fn synced_rig(forward: ForwardMethod, persistence_s: u32, serving: bool) -> (Rig, TaskPorts) {
        let mut config = service(forward, &[1, 1], Scheduler::Rr);
        config.persistence_s = persistence_s;
        let mut rig = Rig::new(&[config], 64);
        let (_, mut ports, task) = hub(1, 1024);
        rig.engine.attach_sync(ports.remove(0), Duration::from_secs(60), rig.now);
        rig.serving.store(serving, Ordering::Relaxed);
        (rig, task)
    }

    fn sent(task: &mut TaskPorts) -> Vec<SyncRecord> {
        std::iter::from_fn(|| task.outgoing[0].pop()).collect()
    }

    fn deliver(rig: &mut Rig, task: &mut TaskPorts, records: &[SyncRecord]) {
        for record in records {
            task.incoming[0].push(*record).expect("room");
        }
        let mut scratch = Scratch::new();
        rig.engine.poll(rig.now, &mut scratch);
    }

    fn active_inactive(rig: &Rig) -> (u32, u32) {
        let table = rig.table.load();
        let servers = table.servers.iter().flatten();
        servers.fold((0, 0), |(a, i), s| (a + s.state.active(), i + s.state.inactive()))
    }

    #[test]
    fn a_standby_takes_over_a_nat_connection_it_only_heard_of() {
        let (mut active, mut active_task) = synced_rig(ForwardMethod::Nat, 0, true);
        let (mut standby, mut standby_task) = synced_rig(ForwardMethod::Nat, 0, false);

        let mut syn = syn_from_client(40000);
        assert!(matches!(active.handle(&mut syn).0, Verdict::Transmit { .. }));
        let server = ip_of(&syn).dst_addr();
        let mut syn_ack = tcp_frame(server_mac(1), server, 8080, CLIENT, 40000, TcpFlags::SYN | TcpFlags::ACK, &[]);
        active.handle(&mut syn_ack);
        active.handle(&mut ack_from_client(40000));
        let records = sent(&mut active_task);
        let kinds: Vec<_> = records.iter().map(|r| (r.kind, r.state)).collect();
        assert_eq!(kinds.first(), Some(&(RecordKind::New, ConnState::SynRecv)), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&(RecordKind::Update, ConnState::Established)), "{kinds:?}");
        let last = records.last().unwrap();
        assert_eq!((last.client, last.client_port, last.server, last.server_port), (CLIENT, 40000, server, 8080));
        assert_eq!(last.client_mac, CLIENT_MAC);

        deliver(&mut standby, &mut standby_task, &records);
        assert_eq!(active_inactive(&standby), (1, 0), "the standby counts the connection as active");
        assert!(sent(&mut standby_task).is_empty(), "a standby emits nothing");
        // Not serving: the standby leaves the traffic alone.
        assert_eq!(standby.handle(&mut ack_from_client(40000)).0, Verdict::Ignore);

        // Failover: the standby serves; the next data packet and the server's reply find the connection.
        standby.serving.store(true, Ordering::Relaxed);
        let mut data = ack_from_client(40000);
        assert!(matches!(standby.handle(&mut data).0, Verdict::Transmit { .. }));
        assert_eq!((ip_of(&data).dst_addr(), tcp_of(&data).dst_port()), (server, 8080), "same server");
        assert_checksums_valid(&data);
        let mut reply = tcp_frame(server_mac(1), server, 8080, CLIENT, 40000, TcpFlags::ACK, b"HTTP/1.1 200 OK\r\n");
        assert!(matches!(standby.handle(&mut reply).0, Verdict::Transmit { .. }));
        assert_eq!((ip_of(&reply).src_addr(), tcp_of(&reply).src_port()), (VIP, 80));
        assert_eq!(&reply[VNET_HDR_LEN..VNET_HDR_LEN + 6], &CLIENT_MAC, "back to the client's MAC it heard of");
        assert_eq!(standby.dropped(DropReason::NoConnection), 0);
    }

    #[test]
    fn closes_remove_the_peers_copy_and_keep_its_counters_right() {
        let (mut active, mut active_task) = synced_rig(ForwardMethod::Dr, 0, true);
        let (mut standby, mut standby_task) = synced_rig(ForwardMethod::Dr, 0, false);
        for port in [40000, 40001, 40002] {
            active.handle(&mut syn_from_client(port));
        }
        deliver(&mut standby, &mut standby_task, &sent(&mut active_task));
        assert_eq!(active_inactive(&standby), (0, 3));
        // The SYN_RECV timeout (60 s) passes on the active: three closes.
        active.now += Duration::from_secs(61);
        let mut scratch = Scratch::new();
        active.engine.poll(active.now, &mut scratch);
        let closes = sent(&mut active_task);
        assert_eq!(closes.iter().filter(|r| r.kind == RecordKind::Closed).count(), 3, "{closes:?}");
        deliver(&mut standby, &mut standby_task, &closes);
        assert_eq!(active_inactive(&standby), (0, 0));
        assert_eq!(standby.counters.table_entries.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_table_request_dumps_every_connection_and_templates_follow_new_connections() {
        let (mut active, mut active_task) = synced_rig(ForwardMethod::Dr, 300, true);
        for port in 40000..40010 {
            active.handle(&mut syn_from_client(port));
        }
        let records = sent(&mut active_task);
        assert_eq!(records.iter().filter(|r| r.kind == RecordKind::New).count(), 10);
        let templates: Vec<_> = records.iter().filter(|r| r.kind == RecordKind::Template).collect();
        assert_eq!(templates.len(), 10);
        assert_eq!((templates[0].client, templates[0].remaining_ms), (CLIENT, 300_000));

        // A restarted peer asks for everything: the workers walk their tables.
        let shared = Arc::clone(&active_task.shared);
        shared.dump_generation.store(1, Ordering::Release);
        let mut scratch = Scratch::new();
        active.engine.poll(active.now, &mut scratch);
        assert!(shared.dump_finished(1));
        let dump = sent(&mut active_task);
        assert_eq!(dump.len(), 10);
        assert!(dump.iter().all(|r| r.kind == RecordKind::Update && r.state == ConnState::SynRecv));

        // The restarted peer installs them, and its templates send the client to the same server.
        let (mut peer, mut peer_task) = synced_rig(ForwardMethod::Dr, 300, false);
        deliver(&mut peer, &mut peer_task, &records);
        assert_eq!(active_inactive(&peer), (0, 10));
        peer.serving.store(true, Ordering::Relaxed);
        let server = dump[0].server;
        for port in 41000..41004 {
            let mut syn = syn_from_client(port);
            assert!(matches!(peer.handle(&mut syn).0, Verdict::Transmit { .. }));
            assert_eq!(&syn[VNET_HDR_LEN..VNET_HDR_LEN + 6], &server_mac(server.octets()[3] - 10), "sticky");
        }
    }

    #[test]
    fn changes_lost_to_a_full_ring_are_counted_and_the_refresh_sends_them_later() {
        let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1, 1], Scheduler::Rr)], 64);
        let (_, mut ports, mut task) = hub(1, 4);
        rig.engine.attach_sync(ports.remove(0), Duration::from_secs(60), rig.now);
        for port in 40000..40010 {
            rig.handle(&mut syn_from_client(port));
        }
        assert_eq!(sent(&mut task).len(), 4, "the ring holds 4");
        assert_eq!(task.shared.dropped(crate::sync::SyncDrop::RingFull), 6);
        // Each refresh period walks the whole table; a full ring pauses the walk, which resumes later.
        let mut refreshed = std::collections::BTreeSet::new();
        for _ in 0..10 {
            rig.now += Duration::from_secs(30);
            let mut scratch = Scratch::new();
            rig.engine.poll(rig.now, &mut scratch);
            for record in sent(&mut task) {
                assert_eq!((record.kind, record.state), (RecordKind::Update, ConnState::SynRecv));
                refreshed.insert(record.client_port);
            }
            // Keep the connections alive: their SYN_RECV timeout is 60 s.
            for port in 40000..40010 {
                rig.handle(&mut syn_from_client(port));
            }
        }
        assert_eq!(refreshed.len(), 10, "every connection was sent again: {refreshed:?}");
        assert_eq!(task.shared.dropped(crate::sync::SyncDrop::RingFull), 6, "the refresh never overfills");
    }

    #[test]
    fn records_for_unknown_services_are_counted_not_installed() {
        let (mut standby, mut task) = synced_rig(ForwardMethod::Dr, 0, false);
        let mut record = crate::sync::record::sample(RecordKind::New, 5, ConnState::Established);
        record.vip_port = 443;
        deliver(&mut standby, &mut task, &[record]);
        assert_eq!(task.shared.dropped(crate::sync::SyncDrop::UnknownService), 1);
        assert_eq!(active_inactive(&standby), (0, 0));
    }
}

#[test]
fn a_syn_on_a_closed_entry_is_a_new_connection_scheduled_afresh() {
    let mut rig = Rig::new(&[service(ForwardMethod::Dr, &[1, 1], Scheduler::Rr)], 64);
    let dst_mac = |frame: &[u8]| frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].to_vec();
    let mut syn = syn_from_client(40000);
    rig.handle(&mut syn);
    let first = dst_mac(&syn);
    // A retransmitted SYN of the half-open connection keeps its entry and its server.
    let mut again = syn_from_client(40000);
    rig.handle(&mut again);
    assert_eq!(dst_mac(&again), first, "a retransmitted SYN stays on its server");
    let mut ack = ack_from_client(40000);
    rig.handle(&mut ack);
    let mut rst = tcp_frame(CLIENT_MAC, CLIENT, 40000, VIP, 80, TcpFlags::RST, &[]);
    rig.handle(&mut rst);
    assert_eq!(rig.counters.connections_reused.load(Ordering::Relaxed), 0);
    // The client reuses the port for a new connection while the old entry lingers (closed): scheduled
    // afresh, so rr gives it the other server.
    let mut reuse = syn_from_client(40000);
    rig.handle(&mut reuse);
    assert_ne!(dst_mac(&reuse), first, "the new connection was scheduled, not glued to the old server");
    assert_eq!(rig.counters.connections_reused.load(Ordering::Relaxed), 1);
    assert_eq!(rig.counters.connections_created.load(Ordering::Relaxed), 2);
}

#[test]
fn a_client_port_reaching_the_same_nat_server_through_another_service_takes_over_a_closed_entry_only() {
    // Two services, VIP:80 and VIP:8081, both onto server 1's port 8080 in NAT: to the server a connection of
    // either from the same client port is the same 4-tuple.
    let other = ServiceConfig { port: 8081, ..service(ForwardMethod::Nat, &[1], Scheduler::Rr) };
    let mut rig = Rig::new(&[service(ForwardMethod::Nat, &[1], Scheduler::Rr), other], 64);
    let from_client = |port: u16, flags: TcpFlags| tcp_frame(CLIENT_MAC, CLIENT, 40000, VIP, port, flags, &[]);
    let from_server = |flags: TcpFlags| tcp_frame(server_mac(1), server_ip(1), 8080, CLIENT, 40000, flags, &[]);
    assert!(matches!(rig.handle(&mut from_client(80, TcpFlags::SYN)).0, Verdict::Transmit { .. }));
    assert!(matches!(rig.handle(&mut from_server(TcpFlags::SYN | TcpFlags::ACK)).0, Verdict::Transmit { .. }));
    assert!(matches!(rig.handle(&mut from_client(80, TcpFlags::ACK)).0, Verdict::Transmit { .. }));
    // While that connection lives, the other service's SYN from the same port is refused: its replies could
    // not be told apart, and the server would refuse it too.
    assert_eq!(rig.handle(&mut from_client(8081, TcpFlags::SYN)).0, Verdict::Drop);
    assert_eq!(rig.dropped(DropReason::ReplyClash), 1);
    // Once it is closed (its entry lingers), the SYN opens a new connection, and the server's answer goes back
    // as from VIP:8081.
    assert!(matches!(rig.handle(&mut from_client(80, TcpFlags::RST)).0, Verdict::Transmit { .. }));
    assert!(matches!(rig.handle(&mut from_client(8081, TcpFlags::SYN)).0, Verdict::Transmit { .. }));
    let mut answer = from_server(TcpFlags::SYN | TcpFlags::ACK);
    assert!(matches!(rig.handle(&mut answer).0, Verdict::Transmit { .. }));
    assert_eq!((ip_of(&answer).src_addr(), tcp_of(&answer).src_port()), (VIP, 8081));
    assert_eq!(rig.counters.connections_reused.load(Ordering::Relaxed), 1);
    assert_eq!(rig.dropped(DropReason::ReplyClash), 1);
}
