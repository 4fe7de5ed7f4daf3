//! Which worker gets a packet: a classic-BPF program for the AF_PACKET fanout group.
//!
//! Every packet of a connection goes to the same worker, so each worker owns its connection table outright: no
//! lock, no shared map, and a reply always finds the entry its forward packet created. The key is the client's
//! end of the connection:
//!
//! - a packet to a VIP: its source address and source port;
//! - anything else (a NAT reply from a real server): its destination address and destination port;
//! - an ICMP error: the client's end of the datagram it quotes (the quoted destination for an error sent to a
//!   VIP about a packet the VIP sent, the quoted source for an error about a packet the client sent a NAT
//!   server), so the error reaches the worker that owns the connection whoever sent it.
//!
//! [`Steering::Connection`] hashes address and port: one busy client's connections spread over all workers.
//! [`Steering::Client`] hashes the address alone, as persistence needs: a worker owns its persistence templates,
//! so every connection of a client must meet the same worker. The director uses `Client` while any service is
//! persistent (see [`Steering::for_services`]).
//!
//! The program runs on the packet as the kernel's fanout hook sees it: for received packets the skb data
//! starts at the network header, so absolute loads are offsets into the IPv4 header (the test
//! `steering_offsets_match_the_kernel_and_frames_carry_their_vnet_header` in tests/tests/dataplane_ring.rs
//! checks this on a real veth). A load past the end of the packet ends the program with verdict 0: such a
//! packet (too short to be anything the workers forward) goes to worker 0.

use std::net::Ipv4Addr;

use super::afpacket::FanoutProgram;

/// How the fanout program keys packets to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// By the client's address and port: connections spread over workers.
    Connection,
    /// By the client's address alone: all of a client's connections meet one worker (persistence).
    Client,
}

impl Steering {
    /// `Client` if any service is persistent, else `Connection`.
    pub fn for_services(mut persistent: impl Iterator<Item = bool>) -> Steering {
        if persistent.any(|p| p) {
            Steering::Client
        } else {
            Steering::Connection
        }
    }
}

// Classic BPF opcodes (linux/filter.h).
const BPF_LD_IMM: u16 = 0x00;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_LD_H_ABS: u16 = 0x28;
const BPF_LD_B_ABS: u16 = 0x30;
const BPF_LD_W_IND: u16 = 0x40;
const BPF_LD_H_IND: u16 = 0x48;
const BPF_LD_B_IND: u16 = 0x50;
const BPF_LD_MEM: u16 = 0x60;
const BPF_LDX_B_MSH: u16 = 0xb1;
const BPF_ST: u16 = 0x02;
const BPF_ALU_ADD_X: u16 = 0x0c;
const BPF_ALU_MUL_K: u16 = 0x24;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_ALU_LSH_K: u16 = 0x64;
const BPF_ALU_RSH_K: u16 = 0x74;
const BPF_ALU_MOD_K: u16 = 0x94;
const BPF_ALU_XOR_X: u16 = 0xac;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_RET_A: u16 = 0x16;
const BPF_RET_K: u16 = 0x06;
const BPF_MISC_TAX: u16 = 0x07;
/// `SKF_AD_OFF + SKF_AD_PROTOCOL`: the ancillary load of skb->protocol.
const SKF_AD_PROTOCOL: u32 = 0xfffff000;
const ETH_P_IP: u32 = 0x0800;
/// IPv4 header offsets.
const IP_PROTOCOL: u32 = 9;
const IP_SRC: u32 = 12;
const IP_DST: u32 = 16;
const PROTO_ICMP: u32 = 1;
const PROTO_TCP: u32 = 6;
const PROTO_UDP: u32 = 17;
/// From the ICMP header: the quoted IPv4 header starts 8 bytes in.
const ICMP_QUOTE: u32 = 8;
/// Knuth's multiplicative hash constant: spreads consecutive client addresses and ports over workers.
const HASH_MUL: u32 = 2_654_435_761;

/// Places in the program that jumps name; resolved by [`Assembler::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    ReturnZero,
    Forward,
    ForwardPorts,
    ForwardIcmp,
    Reply,
    ReplyPorts,
    ReplyIcmp,
    NoPort,
    Hash,
}

/// A classic-BPF assembler just big enough for this program: conditional jumps name labels (8-bit forward
/// offsets, checked), `ja` takes a 32-bit one.
#[derive(Default)]
struct Assembler {
    code: Vec<(libc::sock_filter, Label, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Assembler {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push((libc::sock_filter { code, jt: 0, jf: 0, k }, Label::Next, Label::Next));
    }

    fn jeq(&mut self, k: u32, yes: Label, no: Label) {
        self.code.push((libc::sock_filter { code: BPF_JMP_JEQ_K, jt: 0, jf: 0, k }, yes, no));
    }

    fn ja(&mut self, to: Label) {
        self.code.push((libc::sock_filter { code: BPF_JMP_JA, jt: 0, jf: 0, k: 0 }, to, Label::Next));
    }

    fn label(&mut self, label: Label) {
        self.labels.push((label, self.code.len()));
    }

    fn finish(self) -> FanoutProgram {
        let at = |label: Label, pc: usize| -> usize {
            match label {
                Label::Next => pc + 1,
                _ => self.labels.iter().find(|(l, _)| *l == label).map_or(pc + 1, |&(_, at)| at),
            }
        };
        let mut prog = Vec::with_capacity(self.code.len());
        for (pc, &(mut ins, yes, no)) in self.code.iter().enumerate() {
            // Every jump goes forwards (the program is laid out so), which the kernel requires too.
            let offset = |label: Label| at(label, pc).saturating_sub(pc + 1);
            if ins.code == BPF_JMP_JA {
                ins.k = offset(yes) as u32;
            } else if ins.code == BPF_JMP_JEQ_K {
                ins.jt = u8::try_from(offset(yes)).unwrap_or(u8::MAX);
                ins.jf = u8::try_from(offset(no)).unwrap_or(u8::MAX);
            }
            prog.push(ins);
        }
        FanoutProgram(prog)
    }
}

/// The program for `workers` workers serving `vips`. VIPs are compared one by one with 8-bit forward jumps to
/// the forward branch right after the list, so up to 250 VIPs are steered (far more than a director pair
/// serves); packets to further VIPs are steered as replies (by destination), still consistently.
pub fn fanout_program(vips: &[Ipv4Addr], workers: u32, steering: Steering) -> FanoutProgram {
    let workers = workers.max(1);
    let mut a = Assembler::default();
    // A port load, or 0 when steering by address alone.
    let port = |a: &mut Assembler, code: u16, k: u32| match steering {
        Steering::Connection => a.op(code, k),
        Steering::Client => a.op(BPF_LD_IMM, 0),
    };
    // Not IPv4 (ARP, IPv6, …): worker 0.
    a.op(BPF_LD_H_ABS, SKF_AD_PROTOCOL);
    a.jeq(ETH_P_IP, Label::Next, Label::ReturnZero);
    a.op(BPF_LD_W_ABS, IP_DST);
    for vip in vips.iter().take(250) {
        a.jeq(u32::from(*vip), Label::Forward, Label::Next);
    }
    a.ja(Label::Reply);
    a.label(Label::ReturnZero);
    a.op(BPF_RET_K, 0);

    // To a VIP: the client is the source. M[0] holds the client's address, X the IPv4 header length.
    a.label(Label::Forward);
    a.op(BPF_LD_W_ABS, IP_SRC);
    a.op(BPF_ST, 0);
    a.op(BPF_LDX_B_MSH, 0);
    a.op(BPF_LD_B_ABS, IP_PROTOCOL);
    a.jeq(PROTO_ICMP, Label::ForwardIcmp, Label::Next);
    a.jeq(PROTO_TCP, Label::ForwardPorts, Label::Next);
    a.jeq(PROTO_UDP, Label::ForwardPorts, Label::NoPort);
    a.label(Label::ForwardPorts);
    port(&mut a, BPF_LD_H_IND, 0); // source port
    a.ja(Label::Hash);
    // An error about a packet the VIP sent a client: the client is the quoted destination.
    a.label(Label::ForwardIcmp);
    a.op(BPF_LD_W_IND, ICMP_QUOTE + IP_DST);
    a.op(BPF_ST, 0);
    quoted_l4_offset(&mut a);
    port(&mut a, BPF_LD_H_IND, ICMP_QUOTE + 2); // quoted destination port
    a.ja(Label::Hash);

    // Not to a VIP (a NAT reply): the client is the destination, still in A.
    a.label(Label::Reply);
    a.op(BPF_ST, 0);
    a.op(BPF_LDX_B_MSH, 0);
    a.op(BPF_LD_B_ABS, IP_PROTOCOL);
    a.jeq(PROTO_ICMP, Label::ReplyIcmp, Label::Next);
    a.jeq(PROTO_TCP, Label::ReplyPorts, Label::Next);
    a.jeq(PROTO_UDP, Label::ReplyPorts, Label::NoPort);
    a.label(Label::ReplyPorts);
    port(&mut a, BPF_LD_H_IND, 2); // destination port
    a.ja(Label::Hash);
    // An error about a packet the client sent a NAT server: the client is the quoted source.
    a.label(Label::ReplyIcmp);
    a.op(BPF_LD_W_IND, ICMP_QUOTE + IP_SRC);
    a.op(BPF_ST, 0);
    quoted_l4_offset(&mut a);
    port(&mut a, BPF_LD_H_IND, ICMP_QUOTE); // quoted source port
    a.ja(Label::Hash);

    a.label(Label::NoPort);
    a.op(BPF_LD_IMM, 0);
    // A = port, M[0] = address: worker = ((address * MUL ^ port) * MUL >> 16) % workers.
    a.label(Label::Hash);
    a.op(BPF_MISC_TAX, 0);
    a.op(BPF_LD_MEM, 0);
    a.op(BPF_ALU_MUL_K, HASH_MUL);
    a.op(BPF_ALU_XOR_X, 0);
    a.op(BPF_ALU_MUL_K, HASH_MUL);
    a.op(BPF_ALU_RSH_K, 16);
    a.op(BPF_ALU_MOD_K, workers);
    a.op(BPF_RET_A, 0);
    a.finish()
}

/// With X = the outer IPv4 header length (ICMP header at X): sets X to the outer plus the quoted header
/// length, so the quoted transport header is at X + 8.
fn quoted_l4_offset(a: &mut Assembler) {
    a.op(BPF_LD_B_IND, ICMP_QUOTE);
    a.op(BPF_ALU_AND_K, 0x0f);
    a.op(BPF_ALU_LSH_K, 2);
    a.op(BPF_ALU_ADD_X, 0);
    a.op(BPF_MISC_TAX, 0);
}

/// The worker the program sends a connection to, given its client's address and port (the port is ignored
/// under [`Steering::Client`]): for tests, diagnostics and whoever must place a connection on its worker.
pub fn worker_for_connection(client: Ipv4Addr, client_port: u16, workers: u32, steering: Steering) -> u32 {
    let port = match steering {
        Steering::Connection => u32::from(client_port),
        Steering::Client => 0,
    };
    ((u32::from(client).wrapping_mul(HASH_MUL) ^ port).wrapping_mul(HASH_MUL) >> 16) % workers.max(1)
}

/// A minimal interpreter of the opcodes above, so the program is tested without a kernel. Like the kernel,
/// a load past the end of the packet returns 0.
#[cfg(test)]
pub(crate) fn run(prog: &FanoutProgram, protocol: u16, ip_header: &[u8]) -> Option<u32> {
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    let load = |off: u32, width: usize| -> Option<u32> {
        let off = off as usize;
        let bytes = ip_header.get(off..off + width)?;
        Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
    };
    loop {
        let ins = prog.0.get(pc)?;
        pc += 1;
        let loaded = match ins.code {
            BPF_LD_H_ABS if ins.k == SKF_AD_PROTOCOL => Some(Some(u32::from(protocol))),
            BPF_LD_B_ABS => Some(load(ins.k, 1)),
            BPF_LD_H_ABS => Some(load(ins.k, 2)),
            BPF_LD_W_ABS => Some(load(ins.k, 4)),
            BPF_LD_B_IND => Some(load(x.wrapping_add(ins.k), 1)),
            BPF_LD_H_IND => Some(load(x.wrapping_add(ins.k), 2)),
            BPF_LD_W_IND => Some(load(x.wrapping_add(ins.k), 4)),
            _ => None,
        };
        if let Some(value) = loaded {
            match value {
                Some(v) => a = v,
                None => return Some(0),
            }
            continue;
        }
        match ins.code {
            BPF_LD_IMM => a = ins.k,
            BPF_LD_MEM => a = *mem.get(ins.k as usize)?,
            BPF_LDX_B_MSH => match load(ins.k, 1) {
                Some(b) => x = (b & 0x0f) << 2,
                None => return Some(0),
            },
            BPF_ST => *mem.get_mut(ins.k as usize)? = a,
            BPF_MISC_TAX => x = a,
            BPF_JMP_JA => pc += ins.k as usize,
            BPF_JMP_JEQ_K => pc += usize::from(if a == ins.k { ins.jt } else { ins.jf }),
            BPF_ALU_ADD_X => a = a.wrapping_add(x),
            BPF_ALU_XOR_X => a ^= x,
            BPF_ALU_MUL_K => a = a.wrapping_mul(ins.k),
            BPF_ALU_AND_K => a &= ins.k,
            BPF_ALU_LSH_K => a <<= ins.k,
            BPF_ALU_RSH_K => a >>= ins.k,
            BPF_ALU_MOD_K => a %= ins.k,
            BPF_RET_A => return Some(a),
            BPF_RET_K => return Some(ins.k),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    /// An IPv4 header (20 bytes, or 24 with options) followed by source and destination ports.
    fn packet(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, options: bool) -> Vec<u8> {
        let ihl = if options { 6 } else { 5 };
        let mut p = vec![0u8; ihl * 4 + 8];
        p[0] = 0x40 | ihl as u8;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[ihl * 4..ihl * 4 + 2].copy_from_slice(&sport.to_be_bytes());
        p[ihl * 4 + 2..ihl * 4 + 4].copy_from_slice(&dport.to_be_bytes());
        p
    }

    /// An ICMP error from `from` to `to` quoting `quoted` (an IPv4 header and 8 bytes of transport).
    fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
        let mut p = packet(1, from, to, 0x0304, 0, false);
        p.truncate(20);
        p.extend_from_slice(&[3, 4, 0, 0, 0, 0, 0x05, 0xdc]);
        p.extend_from_slice(quoted);
        p
    }

    #[test]
    fn every_packet_of_a_connection_goes_to_the_worker_its_client_end_names() {
        let vips = [Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 101), Ipv4Addr::new(10, 0, 0, 102)];
        let server = Ipv4Addr::new(10, 0, 0, 11);
        let router = Ipv4Addr::new(10, 9, 9, 9);
        for steering in [Steering::Connection, Steering::Client] {
            for workers in [1, 2, 3, 4, 8] {
                let prog = fanout_program(&vips, workers, steering);
                for last in (1..=254u8).step_by(7) {
                    let client = Ipv4Addr::new(192, 168, 7, last);
                    for client_port in [1024, 40_000, 40_001, 65_535] {
                        let expected = worker_for_connection(client, client_port, workers, steering);
                        let check = |p: &[u8], what: &str| {
                            assert_eq!(run(&prog, 0x0800, p), Some(expected), "{what}, {steering:?}, {workers} workers")
                        };
                        for proto in [TCP, UDP] {
                            for options in [false, true] {
                                for vip in vips {
                                    check(&packet(proto, client, vip, client_port, 80, options), "forward");
                                }
                                check(&packet(proto, server, client, 8080, client_port, options), "NAT reply");
                            }
                        }
                        // An error sent to the VIP about a packet the VIP sent the client (a router's "fragmentation
                        // needed"), and one sent to the client's address about a packet it sent a NAT server.
                        let sent = packet(TCP, vips[1], client, 80, client_port, true);
                        check(&icmp_error(router, vips[1], &sent), "ICMP error to a VIP");
                        let sent = packet(UDP, client, server, client_port, 53, false);
                        check(&icmp_error(router, client, &sent), "ICMP error to a client");
                    }
                }
            }
        }
    }

    #[test]
    fn connections_of_one_client_spread_unless_steered_by_client() {
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        let client = Ipv4Addr::new(10, 1, 2, 3);
        let by_connection = fanout_program(&[vip], 4, Steering::Connection);
        let mut counts = [0u32; 4];
        for port in 30_000..31_024u16 {
            let worker = run(&by_connection, 0x0800, &packet(TCP, client, vip, port, 80, false));
            counts[worker.expect("a verdict") as usize] += 1;
        }
        assert!(counts.iter().all(|c| (200..=320).contains(c)), "{counts:?}");
        let by_client = fanout_program(&[vip], 4, Steering::Client);
        let first = run(&by_client, 0x0800, &packet(TCP, client, vip, 30_000, 80, false));
        for port in 30_001..30_100u16 {
            assert_eq!(run(&by_client, 0x0800, &packet(TCP, client, vip, port, 80, false)), first);
        }
        let mut counts = [0u32; 4];
        for last in 0..=255u8 {
            counts[worker_for_connection(Ipv4Addr::new(10, 1, 2, last), 0, 4, Steering::Client) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (40..=90).contains(c)), "{counts:?}");
    }

    #[test]
    fn non_ipv4_and_runt_packets_go_to_worker_zero() {
        let prog = fanout_program(&[Ipv4Addr::new(10, 0, 0, 100)], 4, Steering::Connection);
        assert_eq!(run(&prog, 0x0806, &[0; 28]), Some(0));
        let mut runt = packet(TCP, Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 0, 0, 100), 1, 80, false);
        runt.truncate(21);
        assert_eq!(run(&prog, 0x0800, &runt), Some(0));
    }

    #[test]
    fn many_vips_still_jump_correctly() {
        let vips: Vec<_> = (0..250u32).map(|i| Ipv4Addr::from(0x0a00_1000 + i)).collect();
        let prog = fanout_program(&vips, 3, Steering::Connection);
        assert!(prog.0.iter().all(|ins| ins.code != BPF_JMP_JEQ_K || (ins.jt < 255 && ins.jf < 255)));
        let client = Ipv4Addr::new(172, 16, 0, 9);
        for vip in [vips[0], vips[125], vips[249]] {
            assert_eq!(
                run(&prog, 0x0800, &packet(TCP, client, vip, 5555, 80, false)),
                Some(worker_for_connection(client, 5555, 3, Steering::Connection))
            );
        }
    }

    #[test]
    fn persistence_anywhere_steers_by_client() {
        assert_eq!(Steering::for_services([false, false].into_iter()), Steering::Connection);
        assert_eq!(Steering::for_services(std::iter::empty()), Steering::Connection);
        assert_eq!(Steering::for_services([false, true].into_iter()), Steering::Client);
    }
}
