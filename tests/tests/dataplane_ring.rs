//! The AF_PACKET shell on a real veth: the fanout program's offsets match what the kernel hands it (IPv4
//! header and ports), each connection lands on the worker the steering hash names, and frames arrive with
//! their virtio-net header.
//!
//! Needs root (network namespaces); fails loudly without it.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fulcrum_director::dataplane::afpacket::{PacketRing, RingConfig, VNET_HDR_LEN};
use fulcrum_director::dataplane::steer::{fanout_program, worker_for_connection, Steering};
use fulcrum_tests::{in_netns, require_root, Testbed};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PORT: u16 = 9999;
const PER_CLIENT: usize = 20;

/// What one ring saw of a test datagram.
#[derive(Debug, Clone, Copy)]
struct Seen {
    worker: usize,
    src: Ipv4Addr,
    src_port: u16,
    vnet_flags: u8,
    csum_start: u16,
    csum_offset: u16,
}

fn parse(worker: usize, bytes: &[u8]) -> Option<Seen> {
    let frame = bytes.get(VNET_HDR_LEN..)?;
    let ip = frame.get(14..)?;
    let is_test = frame.get(12..14)? == [0x08, 0x00]
        && ip.get(16..20)? == VIP.octets()
        && ip.get(9)? == &17
        && u16::from_be_bytes([*ip.get(22)?, *ip.get(23)?]) == PORT;
    is_test.then(|| Seen {
        worker,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        src_port: u16::from_be_bytes([ip[20], ip[21]]),
        vnet_flags: bytes[0],
        csum_start: u16::from_le_bytes([bytes[6], bytes[7]]),
        csum_offset: u16::from_le_bytes([bytes[8], bytes[9]]),
    })
}

#[test]
fn steering_offsets_match_the_kernel_and_frames_carry_their_vnet_header() -> Result<()> {
    require_root();
    let bed = Testbed::new("ring")?;
    let director = bed.add_host("dir1", "10.0.0.2/24")?;
    // Two clients; every datagram leaves from a new socket, so from a new source port, and the connections of
    // each client spread over both workers.
    let clients = [bed.add_host("ca", "10.0.0.21/24")?, bed.add_host("cb", "10.0.0.22/24")?];
    let director_mac = director.mac()?;
    for client in &clients {
        // Nobody answers ARP for the VIP in this test: point it at the director by hand.
        client.ip_cmd(&[
            "neigh",
            "replace",
            &VIP.to_string(),
            "lladdr",
            &director_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
    }

    let (ready_tx, ready_rx) = mpsc::channel();
    let netns = director.netns().to_string();
    let rings = std::thread::spawn(move || {
        in_netns(&netns, move || -> Result<Vec<Seen>> {
            let program = fanout_program(&[VIP], 2, Steering::Connection);
            let group = (std::process::id() & 0xffff) as u16;
            let config = RingConfig { frame_size: 72 * 1024, frame_count: 64 };
            let mut rings = [
                PacketRing::open("eth0", config, Some((group, &program)))?,
                PacketRing::open("eth0", config, Some((group, &program)))?,
            ];
            ready_tx.send(()).context("signalling readiness")?;
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.len() < 2 * PER_CLIENT && Instant::now() < deadline {
                for (worker, ring) in rings.iter_mut().enumerate() {
                    ring.wait(5)?;
                    while let Some((slot, _meta, bytes)) = ring.take_frame() {
                        seen.extend(parse(worker, bytes));
                        ring.release(slot);
                    }
                }
            }
            for ring in rings.iter_mut() {
                let stats = ring.stats()?;
                if stats.drops != 0 {
                    bail!("the kernel dropped {} packets on a ring: {stats:?}", stats.drops);
                }
            }
            Ok(seen)
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).context("rings did not open")?;
    for client in &clients {
        let script = format!("for i in $(seq {PER_CLIENT}); do echo hello > /dev/udp/{VIP}/{PORT}; done");
        client.run(&["bash", "-c", &script])?;
    }
    let seen = match rings.join() {
        Ok(result) => result?,
        Err(_) => bail!("the ring thread panicked"),
    };
    assert_eq!(seen.len(), 2 * PER_CLIENT, "every datagram received exactly once across the group: {seen:?}");
    for s in &seen {
        let expected = worker_for_connection(s.src, s.src_port, 2, Steering::Connection);
        assert_eq!(s.worker as u32, expected, "{s:?} went to the wrong worker");
        if s.vnet_flags & 1 != 0 {
            // NEEDS_CSUM: the checksum starts at the UDP header and its field is 6 bytes in.
            assert_eq!((s.csum_start, s.csum_offset), (14 + 20, 6), "{s:?}");
        }
    }
    assert!(seen.iter().any(|s| s.worker == 0) && seen.iter().any(|s| s.worker == 1));
    Ok(())
}
