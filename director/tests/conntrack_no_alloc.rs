//! The connection table's per-packet operations never touch the allocator: a counting global allocator,
//! armed on the test's own thread only, sees no allocation, reallocation or free while they run.

use std::net::Ipv4Addr;
use std::time::Duration;

use fulcrum_director::config::ForwardMethod;
use fulcrum_director::conntrack::{
    may_create, ConnFlags, ConnState, ConnTable, Direction, SyncedConn, TcpFlags, Tick, Timeouts,
};
use fulcrum_director::flow::{FlowV4, Proto};

mod common;
use common::allocator_calls;

fn client(i: u32, proto: Proto) -> FlowV4 {
    FlowV4 {
        src: Ipv4Addr::from(0x0a00_0000 + i),
        dst: Ipv4Addr::new(192, 0, 2, 10),
        src_port: 1024 + (i % 50_000) as u16,
        dst_port: 80,
        proto,
    }
}

fn reply(forward: &FlowV4) -> FlowV4 {
    FlowV4 {
        src: Ipv4Addr::new(10, 1, 0, 1),
        dst: forward.src,
        src_port: 8080,
        dst_port: forward.src_port,
        proto: forward.proto,
    }
}

#[test]
fn the_counter_sees_allocations() {
    let (calls, v) = allocator_calls(|| vec![1u8; 100]);
    assert!(calls >= 1);
    drop(v);
}

#[test]
fn per_packet_operations_do_not_allocate() {
    const N: u32 = 20_000;
    let mut table = ConnTable::new(N as usize, Timeouts::default(), 7).unwrap();
    let t0 = Tick::from_secs(1);

    let (calls, ()) = allocator_calls(|| {
        let mut checksum = 0u64;
        // New connections: the SYN/sloppy decision, lookup miss, insert, first packet.
        for i in 0..N {
            let proto = if i % 5 == 0 { Proto::Udp } else { Proto::Tcp };
            let forward = client(i, proto);
            assert!(table.lookup_forward(&forward).is_none());
            assert!(may_create(TcpFlags::SYN, false));
            let (reply, method) =
                if i % 2 == 0 { (Some(reply(&forward)), ForwardMethod::Nat) } else { (None, ForwardMethod::Dr) };
            let h = table.insert(forward, reply, 1, i % 8, method, t0).unwrap();
            table.on_packet(h, Direction::Input, TcpFlags::SYN, t0);
        }
        // The table is full: refused and counted, still without allocating.
        assert!(table.insert(client(N, Proto::Tcp), None, 1, 0, ForwardMethod::Dr, t0).is_err());
        if !may_create(TcpFlags::ACK, false) {
            table.count_untracked_drop();
        }
        // Traffic both ways.
        let t1 = Tick::from_secs(2);
        for i in 0..N {
            let forward = client(i, if i % 5 == 0 { Proto::Udp } else { Proto::Tcp });
            let h = table.lookup_forward(&forward).unwrap();
            table.on_packet(h, Direction::Input, TcpFlags::ACK, t1);
            if i % 2 == 0 {
                let back = table.lookup_reply(&reply(&forward)).unwrap();
                assert_eq!(back, h);
                let change = table.on_packet(back, Direction::Output, TcpFlags(0x18), t1);
                checksum += change.new as u64;
            }
            if i % 7 == 0 {
                table.on_packet(h, Direction::Input, TcpFlags::RST, t1);
            }
        }
        // Connection sync: updates of existing entries, and new ones after removals.
        for i in 0..100 {
            let forward = client(i * 5 + 1, Proto::Tcp); // a TCP entry (every fifth is UDP)
            let conn = SyncedConn {
                forward,
                reply: None,
                service: 1,
                server: 2,
                method: ForwardMethod::Dr,
                state: ConnState::FinWait,
                flags: ConnFlags::NONE,
                remaining: Duration::from_secs(30),
            };
            if let Some(h) = table.lookup_forward(&forward) {
                table.remove(h);
            }
            table.install_synced(&conn, t1).unwrap();
            table.install_synced(&conn, t1).unwrap();
        }
        // A bounded dump and a bounded purge.
        checksum += table.iter().take(1_000).map(|(_, info)| info.in_packets as u64).sum::<u64>();
        table.remove_server_step(1, 3, 0, 5_000, |_| {});
        // Expiry: CLOSE entries at 12 s, budgeted; then everything.
        let mut reaped = 0u64;
        while table.expire(Tick::from_secs(12), 1_000, |info| reaped += info.server as u64 + 1).pending {}
        while table.expire(Tick::from_secs(2_000), 4_096, |_| reaped += 1).pending {}
        assert!(table.is_empty());
        assert!(checksum > 0 && reaped > 0);
    });
    assert_eq!(calls, 0, "the connection table called the allocator {calls} times");
    assert_eq!(table.counters().table_full, 1);
}
