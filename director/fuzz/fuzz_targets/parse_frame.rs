//! Any byte string, as an Ethernet frame, as each header view, as a virtio_net_hdr + frame, and as the
//! packet an ICMP error is about: nothing may panic, and the checksum arithmetic must keep its promises.
#![no_main]

use std::net::Ipv4Addr;

use fulcrum_director::wire::{
    checksum, complete_checksum, emit_frag_needed, icmp_error_allowed, parse_ipv4_flow, ArpPacket, ChecksumState,
    EthernetFrame, Icmpv4Packet, Ipv4Packet, ParsedV4, QuoteLen, TcpPacket, UdpPacket, VnetHeader, VNET_HDR_LEN,
};
use libfuzzer_sys::fuzz_target;

/// A naive Internet checksum sum to hold the optimised one to.
fn reference_sum(data: &[u8]) -> u16 {
    let mut total: u64 = data.chunks(2).map(|w| u64::from(w[0]) << 8 | u64::from(*w.get(1).unwrap_or(&0))).sum();
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

/// Every view over `data`, every accessor of those that check out.
fn views(data: &[u8]) {
    if let Ok(eth) = EthernetFrame::new_checked(data) {
        let _ = (eth.dst_addr(), eth.src_addr(), eth.ethertype(), eth.vlan_tag(), eth.payload().len());
    }
    if let Ok(arp) = ArpPacket::new_checked(data) {
        let _ = (arp.check_ethernet_ipv4(), arp.operation(), arp.sender_hardware_addr(), arp.target_protocol_addr());
    }
    if let Ok(ip) = Ipv4Packet::new_checked(data) {
        let _ = (ip.header_len(), ip.total_len(), ip.is_fragment(), ip.options(), ip.payload(), ip.verify_checksum());
        let _ = (icmp_error_allowed(&ip), ip.pseudo_header_sum());
    }
    if let Ok(tcp) = TcpPacket::new_checked(data) {
        let _ = (tcp.flags(), tcp.options(), tcp.payload(), tcp.mss_option());
        for option in tcp.option_iter() {
            let _ = option;
        }
    }
    if let Ok(udp) = UdpPacket::new_checked(data) {
        let _ = (udp.len(), udp.payload(), udp.verify_checksum(Ipv4Addr::LOCALHOST, Ipv4Addr::BROADCAST));
    }
    if let Ok(icmp) = Icmpv4Packet::new_checked(data) {
        let _ = (icmp.msg_type(), icmp.next_hop_mtu(), icmp.data(), icmp.verify_checksum());
        if let Ok(quote) = icmp.quote() {
            let _ = (quote.ip().src_addr(), quote.l4(), quote.ports(), quote.flow());
        }
    }
}

/// NAT a TCP/UDP frame the parser accepted: checksums that verified before must verify after.
fn nat(frame: &[u8], l3_offset: usize) {
    let mut copy = frame.to_vec();
    let Some(l3) = copy.get_mut(l3_offset..) else { return };
    let mut ip = Ipv4Packet::new_checked(l3).expect("the parser checked this header");
    let (src, new_dst) = (ip.src_addr(), Ipv4Addr::new(198, 51, 100, 42));
    let old_dst = ip.rewrite_dst_addr(new_dst);
    assert!(ip.verify_checksum(), "IPv4 checksum broken by an incremental rewrite");
    let proto = ip.protocol();
    let l4 = ip.payload_mut();
    if proto == 6 {
        let mut tcp = TcpPacket::new_checked(l4).expect("the parser checked this header");
        let before = tcp.verify_checksum(src, old_dst);
        tcp.pseudo_header_addr_changed(old_dst, new_dst, ChecksumState::Complete);
        tcp.rewrite_dst_port(8443, ChecksumState::Complete);
        let _ = tcp.clamp_mss(1200, ChecksumState::Complete);
        if before {
            assert!(tcp.verify_checksum(src, new_dst), "TCP checksum broken by incremental NAT");
        }
    } else if let Ok(mut udp) = UdpPacket::new_checked(l4) {
        let before = udp.verify_checksum(src, old_dst);
        udp.pseudo_header_addr_changed(old_dst, new_dst, ChecksumState::Complete);
        udp.rewrite_dst_port(5353, ChecksumState::Complete);
        if before {
            assert!(udp.verify_checksum(src, new_dst), "UDP checksum broken by incremental NAT");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(checksum::data(data), reference_sum(data));

    if let Ok(ParsedV4::Ipv4 { l3_offset, is_fragment: false, .. }) = parse_ipv4_flow(data) {
        nat(data, l3_offset);
    }
    views(data);
    if let Some(rest) = data.get(14..) {
        views(rest);
    }

    // As virtio_net_hdr + frame: completion must make the region sum, with the old seed, to 0xffff.
    if let Ok(vnet) = VnetHeader::new_checked(data) {
        let mut frame = data[VNET_HDR_LEN..].to_vec();
        let (start, offset) = (usize::from(vnet.csum_start()), usize::from(vnet.csum_offset()));
        let seed = frame.get(start + offset..start + offset + 2).map(|f| u16::from_be_bytes([f[0], f[1]]));
        if complete_checksum(&mut frame, &vnet).is_ok() && vnet.needs_csum() && offset % 2 == 0 {
            let seed = seed.expect("completion succeeded, so the field is inside the frame");
            assert_eq!(checksum::combine(&[checksum::data(&frame[start..]), seed]), 0xffff);
        }
        let _ = parse_ipv4_flow(&frame);
    }

    // As the packet a "fragmentation needed" is about: whatever comes out must be a valid datagram.
    let mut out = [0u8; 600];
    for quote in [QuoteLen::Rfc792, QuoteLen::Rfc1812] {
        if let Ok(len) = emit_frag_needed(&mut out, data, Ipv4Addr::new(192, 0, 2, 1), 1400, 7, quote) {
            let ip = Ipv4Packet::new_checked(&out[..len]).expect("emitted IPv4 is well-formed");
            assert!(ip.verify_checksum());
            let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("emitted ICMP is well-formed");
            assert!(icmp.verify_checksum());
            assert_eq!((icmp.msg_type(), icmp.code(), icmp.next_hop_mtu()), (3, 4, 1400));
        }
    }
});
