//! Which worker gets a packet: a classic-BPF program for the AF_PACKET fanout group.
//!
//! Every packet of a client goes to the same worker: forward packets (to a VIP) are steered by their source
//! address, and NAT replies (from a real server back to the client) by their destination address. So each
//! worker owns its connection table and persistence templates outright: no lock, no shared map, and a
//! reply always finds the entry its forward packet created.
//!
//! The program runs on the packet as the kernel's fanout hook sees it: for received packets the skb data
//! starts at the network header, so absolute loads are offsets into the IPv4 header (the test
//! `steering_offsets_match_the_kernel` in the data-plane end-to-end tests checks this on a real veth).

use std::net::Ipv4Addr;

use super::afpacket::FanoutProgram;

// Classic BPF opcodes (linux/filter.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_LD_H_ABS: u16 = 0x28;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_ALU_MUL_K: u16 = 0x24;
const BPF_ALU_RSH_K: u16 = 0x74;
const BPF_ALU_MOD_K: u16 = 0x94;
const BPF_RET_A: u16 = 0x16;
const BPF_RET_K: u16 = 0x06;
/// `SKF_AD_OFF + SKF_AD_PROTOCOL`: the ancillary load of skb->protocol.
const SKF_AD_PROTOCOL: u32 = 0xfffff000;
const ETH_P_IP: u32 = 0x0800;
/// IPv4 header offsets.
const IP_SRC: u32 = 12;
const IP_DST: u32 = 16;
/// Knuth's multiplicative hash constant: spreads consecutive client addresses over workers.
const HASH_MUL: u32 = 2_654_435_761;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The program for `workers` workers serving `vips`. Jumps in classic BPF are 8-bit, so VIPs are checked
/// in chunks; up to 250 VIPs fit comfortably, far more than a director pair serves.
pub fn fanout_program(vips: &[Ipv4Addr], workers: u32) -> FanoutProgram {
    let workers = workers.max(1);
    let mut prog = vec![
        // Not IPv4 (ARP, IPv6, …): worker 0.
        op(BPF_LD_H_ABS, 0, 0, SKF_AD_PROTOCOL),
        op(BPF_JMP_JEQ_K, 1, 0, ETH_P_IP),
        op(BPF_RET_K, 0, 0, 0),
        op(BPF_LD_W_ABS, 0, 0, IP_DST),
    ];
    // For VIP i, "jump to the forward branch" skips the remaining VIP checks and the reply branch.
    let n = vips.len().min(250);
    for (i, vip) in vips.iter().take(n).enumerate() {
        let remaining = (n - i - 1) as u8;
        // Jump over the remaining jeq's and the 1-instruction reply branch ("ld dst" is already in A: jump
        // over "ja"), landing on "ld src".
        prog.push(op(BPF_JMP_JEQ_K, remaining + 1, 0, u32::from(*vip)));
    }
    // Reply direction: the client is the destination, already in A: skip the forward load.
    prog.push(op(BPF_JMP_JEQ_K, 1, 1, 0)); // unconditional skip of one (both branches)
    prog.push(op(BPF_LD_W_ABS, 0, 0, IP_SRC));
    prog.push(op(BPF_ALU_MUL_K, 0, 0, HASH_MUL));
    prog.push(op(BPF_ALU_RSH_K, 0, 0, 16));
    prog.push(op(BPF_ALU_MOD_K, 0, 0, workers));
    prog.push(op(BPF_RET_A, 0, 0, 0));
    FanoutProgram(prog)
}

/// The worker a client address maps to (the same hash as the program), for tests and diagnostics.
pub fn worker_for_client(client: Ipv4Addr, workers: u32) -> u32 {
    (u32::from(client).wrapping_mul(HASH_MUL) >> 16) % workers.max(1)
}

/// A minimal interpreter of the opcodes above, so the program is tested without a kernel.
#[cfg(test)]
pub(crate) fn run(prog: &FanoutProgram, protocol: u16, ip_header: &[u8]) -> Option<u32> {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    let load = |off: u32, width: usize| -> Option<u32> {
        let off = off as usize;
        let bytes = ip_header.get(off..off + width)?;
        Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
    };
    loop {
        let ins = prog.0.get(pc)?;
        pc += 1;
        match ins.code {
            BPF_LD_H_ABS if ins.k == SKF_AD_PROTOCOL => a = u32::from(protocol),
            BPF_LD_H_ABS => a = load(ins.k, 2)?,
            BPF_LD_W_ABS => a = load(ins.k, 4)?,
            BPF_JMP_JEQ_K => pc += usize::from(if a == ins.k { ins.jt } else { ins.jf }),
            BPF_ALU_MUL_K => a = a.wrapping_mul(ins.k),
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

    fn ip_header(src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[12..16].copy_from_slice(&src.octets());
        h[16..20].copy_from_slice(&dst.octets());
        h
    }

    #[test]
    fn both_directions_of_a_connection_go_to_the_clients_worker() {
        let vips = [Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 101), Ipv4Addr::new(10, 0, 0, 102)];
        let server = Ipv4Addr::new(10, 0, 0, 11);
        for workers in [1, 2, 3, 4, 8] {
            let prog = fanout_program(&vips, workers);
            for last in 1..=254u8 {
                let client = Ipv4Addr::new(192, 168, 7, last);
                let expected = worker_for_client(client, workers);
                for vip in vips {
                    assert_eq!(run(&prog, 0x0800, &ip_header(client, vip)), Some(expected), "forward to {vip}");
                }
                assert_eq!(run(&prog, 0x0800, &ip_header(server, client)), Some(expected), "NAT reply");
            }
        }
    }

    #[test]
    fn non_ipv4_goes_to_worker_zero_and_clients_spread() {
        let prog = fanout_program(&[Ipv4Addr::new(10, 0, 0, 100)], 4);
        assert_eq!(run(&prog, 0x0806, &[0; 28]), Some(0));
        let mut counts = [0u32; 4];
        for last in 0..=255u8 {
            counts[worker_for_client(Ipv4Addr::new(10, 1, 2, last), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (40..=90).contains(c)), "{counts:?}");
    }

    #[test]
    fn many_vips_still_jump_correctly() {
        let vips: Vec<_> = (0..250u32).map(|i| Ipv4Addr::from(0x0a00_1000 + i)).collect();
        let prog = fanout_program(&vips, 3);
        let client = Ipv4Addr::new(172, 16, 0, 9);
        for vip in [vips[0], vips[125], vips[249]] {
            assert_eq!(run(&prog, 0x0800, &ip_header(client, vip)), Some(worker_for_client(client, 3)));
        }
    }
}
