//! Connection sync on the packet path never touches the allocator: with a counting global allocator armed
//! on this thread, a serving engine creates, changes and expires NAT connections (emitting records into
//! its ring) and a standby engine installs them and takes one over, with no allocation, reallocation or
//! free.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use fulcrum_director::config::{ForwardMethod, Protocol, RealServerConfig, Scheduler, ServiceConfig, TimeoutsConfig};
use fulcrum_director::dataplane::afpacket::RxMeta;
use fulcrum_director::dataplane::counters::WorkerCounters;
use fulcrum_director::dataplane::engine::{Engine, EngineConfig};
use fulcrum_director::dataplane::table::TableBuilder;
use fulcrum_director::dataplane::worker::{PacketHandler, Scratch, Verdict};
use fulcrum_director::sync::{hub, TaskPorts};
use fulcrum_director::wire::{Ipv4Packet, TcpFlags, TcpPacket, VNET_HDR_LEN};

mod common;
use common::allocator_calls;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 21);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
const META: RxMeta = RxMeta { vlan_stripped: false, losing: false, truncated: false };

fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: TcpFlags) -> Vec<u8> {
    let mut buf = vec![0u8; VNET_HDR_LEN + 14 + 40];
    let eth = &mut buf[VNET_HDR_LEN..];
    eth[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    eth[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x21]);
    eth[12..14].copy_from_slice(&[0x08, 0x00]);
    let mut ip = Ipv4Packet::new_unchecked(&mut eth[14..34]);
    ip.set_version(4);
    ip.set_header_len(20);
    ip.set_total_len(40);
    ip.set_ttl(64);
    ip.set_protocol(6);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.fill_checksum();
    let mut tcp = TcpPacket::new_unchecked(&mut eth[34..]);
    tcp.set_src_port(sport);
    tcp.set_dst_port(dport);
    tcp.set_header_len(20);
    tcp.set_flags(flags);
    tcp.set_window_len(65535);
    tcp.fill_checksum(src, dst);
    buf
}

fn engine(serving: bool, now: Instant) -> (Engine, TaskPorts, Arc<AtomicBool>) {
    let service = ServiceConfig {
        vip: VIP.into(),
        port: 80,
        protocol: Protocol::Tcp,
        scheduler: Scheduler::Rr,
        persistence_s: 300,
        sloppy: false,
        feedback: Default::default(),
        health: Default::default(),
        servers: vec![RealServerConfig {
            address: SERVER.into(),
            port: Some(8080),
            weight: 1,
            forward: ForwardMethod::Nat,
        }],
    };
    let table = Arc::new(ArcSwap::from_pointee(TableBuilder::new(1).build(&[service])));
    for server in table.load().servers.iter().flatten() {
        server.state.set_mac([2, 0, 0, 0, 1, 11]);
    }
    let config = EngineConfig {
        worker: 0,
        our_mac: [2, 0, 0, 0, 0, 2],
        our_ip: Ipv4Addr::new(10, 0, 0, 2),
        connection_capacity: 4096,
        timeouts: TimeoutsConfig::default(),
        garp_count: 0,
        garp_interval: Duration::from_millis(100),
        tunnel_mtu: 1500,
        arp_duty: false,
    };
    let serving = Arc::new(AtomicBool::new(serving));
    let counters = Arc::new(WorkerCounters::default());
    let mut engine = Engine::new(config, table, counters, Arc::clone(&serving), now).expect("engine");
    let (_, mut ports, task) = hub(1, 4096);
    engine.attach_sync(ports.remove(0), Duration::from_secs(60), now);
    (engine, task, serving)
}

#[test]
fn sync_on_the_packet_path_never_allocates() {
    let now = Instant::now();
    let (mut active, mut active_task, _) = engine(true, now);
    let (mut standby, mut standby_task, standby_serving) = engine(false, now);
    let mut scratch = Scratch::new();
    let syns: Vec<Vec<u8>> = (0..100).map(|i| frame(CLIENT, 40_000 + i, VIP, 80, TcpFlags::SYN)).collect();
    let acks: Vec<Vec<u8>> = (0..100).map(|i| frame(CLIENT, 40_000 + i, VIP, 80, TcpFlags::ACK)).collect();
    let replies: Vec<Vec<u8>> =
        (0..100).map(|i| frame(SERVER, 8080, CLIENT, 40_000 + i, TcpFlags::SYN | TcpFlags::ACK)).collect();
    let (mut syns, mut acks, mut replies) = (syns, acks, replies);
    let mut takeover = frame(CLIENT, 40_000, VIP, 80, TcpFlags::ACK);
    let (calls, v) = allocator_calls(|| vec![1u8; 100]);
    assert!(calls >= 1, "the counter sees allocations");
    drop(v);
    let (calls, (moved, forwarded)) = allocator_calls(|| {
        for ((syn, reply), ack) in syns.iter_mut().zip(replies.iter_mut()).zip(acks.iter_mut()) {
            active.handle(syn, META, now, &mut scratch);
            active.handle(reply, META, now, &mut scratch);
            active.handle(ack, META, now, &mut scratch);
        }
        active.poll(now, &mut scratch);
        // The sync task's part, without the socket: the active's records into the standby's ring.
        let mut moved = 0;
        while let Some(record) = active_task.outgoing[0].pop() {
            if standby_task.incoming[0].push(record).is_ok() {
                moved += 1;
            }
        }
        standby.poll(now, &mut scratch);
        // Takeover: the standby forwards a packet of a connection it only heard of.
        standby_serving.store(true, Ordering::Relaxed);
        let forwarded = matches!(standby.handle(&mut takeover, META, now, &mut scratch), Verdict::Transmit { .. });
        // The SYN_RECV/ESTABLISHED timeouts pass on the active: closes are emitted.
        let later = now + Duration::from_secs(16 * 60);
        active.poll(later, &mut scratch);
        (moved, forwarded)
    });
    assert!(moved >= 200, "{moved} records (new, template, established) moved");
    assert!(forwarded, "the standby forwards the synced connection");
    assert!(active_task.outgoing[0].len() >= 100, "closes emitted");
    assert_eq!(calls, 0, "allocator calls on the sync packet path");
}
