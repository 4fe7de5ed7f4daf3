//! Zero-copy packet views for the data plane: Ethernet, ARP, IPv4, TCP, UDP, ICMPv4, the `virtio_net_hdr`
//! of PACKET_VNET_HDR sockets, and the Internet checksum.
//!
//! The rules (after smoltcp's `wire` module):
//!
//! * Each header is a view, `XxxPacket<T: AsRef<[u8]>>`, over a borrowed buffer; nothing is copied or
//!   allocated, here or anywhere in this module (it runs for every packet). Getters need
//!   `T: AsRef<[u8]>`, setters `T: AsMut<[u8]>` as well, so a view over `&mut [u8]` rewrites in place.
//! * `new_unchecked` wraps any buffer; its accessors may panic if the buffer is too short for them.
//!   `check_len` validates everything the accessors rely on, and `new_checked` is `new_unchecked` +
//!   `check_len`: after it succeeds, **no accessor panics, on any input**. (Setters of length fields can
//!   break what was checked; check again after changing them.) Validation beyond that
//!   (checksums, field values that are merely unusual) is the caller's choice: `verify_checksum` and
//!   friends.
//! * Field offsets are constants in a private `mod field` per file.
//! * Failures are [`WireError`]s, one variant per malformation, each with a stable [`WireError::reason`]
//!   string for the data plane's per-reason drop counters.
//! * Emitters (`emit_*`) write a complete packet into a caller-provided buffer and return its length, or
//!   `BufferTooSmall`; they do not panic either.
//! * Transport views take the transport segment exactly (the IPv4 payload bounded by the total length,
//!   not the Ethernet frame's possibly padded end), because their checksums cover all of it.
//! * IPv4 first; the types are per family so IPv6 and NDP views can follow beside them.
//!
//! [`parse_ipv4_flow`] is the data plane's entry point: one pass from an Ethernet frame to a classification
//! with the offsets needed to rewrite the frame in place.

mod arp;
pub mod checksum;
mod error;
mod ethernet;
mod icmp;
mod ipv4;
mod tcp;
mod udp;
pub mod vnet;

pub use arp::{emit_gratuitous, emit_reply, emit_request, ArpOperation, ArpPacket, GarpTarget};
pub use checksum::ChecksumState;
pub use error::{Layer, WireError};
pub use ethernet::{EtherType, EthernetAddress, EthernetFrame, VlanTag};
pub use icmp::{
    emit_frag_needed, icmp_error_allowed, icmp_type, is_error_type, unreachable_code, IcmpQuote, Icmpv4Packet, QuoteLen,
};
pub use ipv4::{ip_protocol, Ipv4Packet};
pub use tcp::{TcpFlags, TcpOption, TcpOptions, TcpPacket};
pub use udp::UdpPacket;
pub use vnet::{complete_checksum, VnetHeader, VNET_HDR_LEN};

/// Header lengths and field offsets callers need for in-place work.
pub mod consts {
    pub use super::arp::{FRAME_LEN as ARP_FRAME_LEN, PACKET_LEN as ARP_PACKET_LEN};
    pub use super::ethernet::{HEADER_LEN as ETHERNET_HEADER_LEN, VLAN_HEADER_LEN};
    pub use super::icmp::{HEADER_LEN as ICMPV4_HEADER_LEN, QUOTED_L4_LEN};
    pub use super::ipv4::MIN_HEADER_LEN as IPV4_MIN_HEADER_LEN;
    pub use super::tcp::{CHECKSUM_OFFSET as TCP_CHECKSUM_OFFSET, MIN_HEADER_LEN as TCP_MIN_HEADER_LEN};
    pub use super::udp::{CHECKSUM_OFFSET as UDP_CHECKSUM_OFFSET, HEADER_LEN as UDP_HEADER_LEN};
}

mod field {
    pub type Field = core::ops::Range<usize>;
}

use std::net::Ipv4Addr;

use crate::flow::{FlowV4, Proto};

/// What [`parse_ipv4_flow`] found in a frame. Offsets are from the start of the Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParsedV4 {
    /// An ARP packet, checked to be a complete Ethernet/IPv4 one.
    Arp { l3_offset: usize, operation: ArpOperation },
    /// A frame carrying an 802.1Q/802.1ad tag (the data plane passes these to the kernel).
    Vlan(VlanTag),
    /// TCP or UDP over IPv4: a whole datagram, or the first fragment of one (`is_fragment`), which still
    /// carries the ports.
    Ipv4 {
        flow: FlowV4,
        l3_offset: usize,
        l4_offset: usize,
        /// The TCP flags, for TCP.
        tcp_flags: Option<TcpFlags>,
        is_fragment: bool,
    },
    /// A fragment other than the first: no transport header, so no ports. Identified by
    /// (src, dst, protocol, ident) for reassembly or pass-through.
    Ipv4Fragment { l3_offset: usize, src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, ident: u16 },
    /// ICMPv4 (not a non-first fragment). For an error message, `quote` locates the datagram it is about.
    Icmpv4 {
        l3_offset: usize,
        l4_offset: usize,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        quote: Option<QuotedV4>,
    },
    /// Another protocol over IPv4 (IP-in-IP, GRE, SCTP, ...), not a non-first fragment.
    Ipv4Other { l3_offset: usize, l4_offset: usize, src: Ipv4Addr, dst: Ipv4Addr, protocol: u8 },
    /// Any other EtherType (IPv6 included, until its views exist).
    Other(EtherType),
}

/// The datagram quoted in an ICMPv4 error, located in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotedV4 {
    /// Offset of the quoted IPv4 header.
    pub l3_offset: usize,
    /// Offset of the quoted transport bytes (at least 8 are present).
    pub l4_offset: usize,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// The quoted TCP/UDP flow, in the direction the quoted datagram travelled.
    pub flow: Option<FlowV4>,
}

/// Classify an Ethernet frame (without FCS) and locate its headers, validating what the data plane relies
/// on: the Ethernet header; for ARP, a complete Ethernet/IPv4 packet; for IPv4, the header lengths and the
/// header checksum; for TCP, the header with its options; for UDP, the header and its length field (first
/// fragments: the header only, as the length covers the whole datagram); for ICMP, the header and, in an
/// error message, the quoted IPv4 header plus 8 transport bytes. Transport checksums are not verified (they
/// may be CHECKSUM_PARTIAL seeds, and the endpoints verify them).
///
/// A frame that fails is malformed: drop it and count [`WireError::reason`].
pub fn parse_ipv4_flow(frame: &[u8]) -> Result<ParsedV4, WireError> {
    let eth = EthernetFrame::new_checked(frame)?;
    let l3_offset = ethernet::HEADER_LEN;
    let ethertype = eth.ethertype();
    if let Some(tag) = eth.vlan_tag()? {
        return Ok(ParsedV4::Vlan(tag));
    }
    match ethertype {
        EtherType::ARP => {
            let arp = ArpPacket::new_checked(eth.payload())?;
            arp.check_ethernet_ipv4()?;
            Ok(ParsedV4::Arp { l3_offset, operation: arp.operation() })
        }
        EtherType::IPV4 => parse_ipv4(eth.payload(), l3_offset),
        other => Ok(ParsedV4::Other(other)),
    }
}

fn parse_ipv4(l3: &[u8], l3_offset: usize) -> Result<ParsedV4, WireError> {
    let ip = Ipv4Packet::new_checked(l3)?;
    if !ip.verify_checksum() {
        return Err(WireError::BadChecksum { layer: Layer::Ipv4 });
    }
    let (src, dst, protocol) = (ip.src_addr(), ip.dst_addr(), ip.protocol());
    if ip.is_non_first_fragment() {
        return Ok(ParsedV4::Ipv4Fragment { l3_offset, src, dst, protocol, ident: ip.ident() });
    }
    let is_fragment = ip.is_fragment();
    let l4_offset = l3_offset + ip.header_len();
    let l4 = ip.payload();
    let flow = |proto, src_port, dst_port| FlowV4 { src, dst, src_port, dst_port, proto };
    match protocol {
        ip_protocol::TCP => {
            let tcp = TcpPacket::new_checked(l4)?;
            Ok(ParsedV4::Ipv4 {
                flow: flow(Proto::Tcp, tcp.src_port(), tcp.dst_port()),
                l3_offset,
                l4_offset,
                tcp_flags: Some(tcp.flags()),
                is_fragment,
            })
        }
        ip_protocol::UDP => {
            let udp = if is_fragment {
                if l4.len() < udp::HEADER_LEN {
                    return Err(WireError::Truncated { layer: Layer::Udp, needed: udp::HEADER_LEN, got: l4.len() });
                }
                UdpPacket::new_unchecked(l4)
            } else {
                UdpPacket::new_checked(l4)?
            };
            Ok(ParsedV4::Ipv4 {
                flow: flow(Proto::Udp, udp.src_port(), udp.dst_port()),
                l3_offset,
                l4_offset,
                tcp_flags: None,
                is_fragment,
            })
        }
        ip_protocol::ICMP => {
            let icmp = Icmpv4Packet::new_checked(l4)?;
            let quote = if icmp.is_error() {
                let quote = icmp.quote()?;
                let quote_l3 = l4_offset + icmp::HEADER_LEN;
                Some(QuotedV4 {
                    l3_offset: quote_l3,
                    l4_offset: quote_l3 + quote.header_len(),
                    src: quote.ip().src_addr(),
                    dst: quote.ip().dst_addr(),
                    protocol: quote.ip().protocol(),
                    flow: quote.flow(),
                })
            } else {
                None
            };
            Ok(ParsedV4::Icmpv4 {
                l3_offset,
                l4_offset,
                src,
                dst,
                icmp_type: icmp.msg_type(),
                code: icmp.code(),
                quote,
            })
        }
        _ => Ok(ParsedV4::Ipv4Other { l3_offset, l4_offset, src, dst, protocol }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::checksum::tests::Rng;
    use super::*;

    static LAB_PCAP: &[u8] = include_bytes!("testdata/veth-lab.pcap");
    static VNET_HEX: &str = include_str!("testdata/vnet-frames.hex");

    fn le32(b: &[u8]) -> usize {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// The frames of testdata/veth-lab.pcap (classic pcap, little-endian, as tcpdump wrote it on x86-64).
    pub(crate) fn lab_frames() -> Vec<&'static [u8]> {
        assert_eq!(&LAB_PCAP[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "little-endian microsecond pcap");
        assert_eq!(le32(&LAB_PCAP[20..24]), 1, "LINKTYPE_ETHERNET");
        let mut frames = Vec::new();
        let mut at = 24;
        while at < LAB_PCAP.len() {
            let (caplen, origlen) = (le32(&LAB_PCAP[at + 8..]), le32(&LAB_PCAP[at + 12..]));
            assert_eq!(caplen, origlen, "frame {} was cut by the snap length", frames.len());
            frames.push(&LAB_PCAP[at + 16..at + 16 + caplen]);
            at += 16 + caplen;
        }
        frames
    }

    pub(crate) fn lab_frame(i: usize) -> &'static [u8] {
        lab_frames()[i]
    }

    /// The records of testdata/vnet-frames.hex: virtio_net_hdr + frame each.
    pub(crate) fn vnet_frames() -> Vec<Vec<u8>> {
        VNET_HEX
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect())
            .collect()
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const R: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

    #[test]
    fn classifies_every_captured_frame() {
        let frames = lab_frames();
        assert_eq!(frames.len(), 28);
        let tcp = |src, dst, src_port, dst_port| FlowV4 { src, dst, src_port, dst_port, proto: Proto::Tcp };
        for (i, frame) in frames.iter().enumerate() {
            let parsed = parse_ipv4_flow(frame).unwrap_or_else(|e| panic!("frame {i}: {e}"));
            match i {
                0 | 24 => assert_eq!(parsed, ParsedV4::Other(EtherType::IPV6)),
                1 | 23 => assert_eq!(parsed, ParsedV4::Arp { l3_offset: 14, operation: ArpOperation::REQUEST }),
                2 | 25 => assert_eq!(parsed, ParsedV4::Arp { l3_offset: 14, operation: ArpOperation::REPLY }),
                5 => assert_eq!(
                    parsed,
                    ParsedV4::Ipv4 {
                        flow: tcp(A, B, 60634, 8080),
                        l3_offset: 14,
                        l4_offset: 34,
                        tcp_flags: Some(TcpFlags::SYN),
                        is_fragment: false
                    }
                ),
                6 => assert_eq!(
                    parsed,
                    ParsedV4::Ipv4 {
                        flow: tcp(B, A, 8080, 60634),
                        l3_offset: 14,
                        l4_offset: 34,
                        tcp_flags: Some(TcpFlags::SYN | TcpFlags::ACK),
                        is_fragment: false
                    }
                ),
                7..=12 => assert!(matches!(parsed, ParsedV4::Ipv4 { tcp_flags: Some(_), .. })),
                13 => assert_eq!(
                    parsed,
                    ParsedV4::Ipv4 {
                        flow: FlowV4 { src: A, dst: B, src_port: 34278, dst_port: 5353, proto: Proto::Udp },
                        l3_offset: 14,
                        l4_offset: 34,
                        tcp_flags: None,
                        is_fragment: false
                    }
                ),
                14 => assert_eq!(
                    parsed,
                    ParsedV4::Icmpv4 {
                        l3_offset: 14,
                        l4_offset: 34,
                        src: B,
                        dst: A,
                        icmp_type: icmp_type::DEST_UNREACHABLE,
                        code: unreachable_code::PORT,
                        quote: Some(QuotedV4 {
                            l3_offset: 42,
                            l4_offset: 62,
                            src: A,
                            dst: B,
                            protocol: ip_protocol::UDP,
                            flow: Some(FlowV4 { src: A, dst: B, src_port: 34278, dst_port: 5353, proto: Proto::Udp }),
                        }),
                    }
                ),
                16 => assert!(matches!(
                    parsed,
                    ParsedV4::Icmpv4 {
                        src: R,
                        dst: A,
                        icmp_type: 3,
                        code: 4,
                        quote: Some(QuotedV4 { flow: None, .. }),
                        ..
                    }
                )),
                3 | 4 | 15 | 17 | 26 => {
                    assert!(matches!(parsed, ParsedV4::Icmpv4 { icmp_type: 0 | 8, quote: None, .. }), "{i}")
                }
                18 | 27 => assert!(matches!(parsed, ParsedV4::Icmpv4 { icmp_type: 11 | 3, quote: Some(_), .. })),
                // The first fragment of a big echo is still ICMP with its header; the second has none.
                19 | 21 => assert!(matches!(parsed, ParsedV4::Icmpv4 { icmp_type: 0 | 8, .. })),
                20 | 22 => assert!(matches!(parsed, ParsedV4::Ipv4Fragment { protocol: ip_protocol::ICMP, .. })),
                _ => panic!("frame {i} not covered: {parsed:?}"),
            }
        }
    }

    #[test]
    fn fragments_and_padding() {
        // A UDP datagram split in two: the first fragment keeps its ports although its UDP length field
        // covers the whole datagram; the second is a bare fragment.
        let mut frame = [0u8; 14 + 20 + 16];
        frame[..14].copy_from_slice(&lab_frame(13)[..14]);
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(36);
        ip.set_ident(99);
        ip.set_more_frags(true);
        ip.set_ttl(64);
        ip.set_protocol(ip_protocol::UDP);
        ip.set_src_addr(A);
        ip.set_dst_addr(B);
        ip.fill_checksum();
        let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
        udp.set_src_port(1000);
        udp.set_dst_port(53);
        udp.set_len(3000);
        let parsed = parse_ipv4_flow(&frame).unwrap();
        assert!(matches!(parsed, ParsedV4::Ipv4 { is_fragment: true, flow: FlowV4 { dst_port: 53, .. }, .. }));

        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_frag_offset(16);
        ip.set_more_frags(false);
        ip.fill_checksum();
        assert_eq!(
            parse_ipv4_flow(&frame).unwrap(),
            ParsedV4::Ipv4Fragment { l3_offset: 14, src: A, dst: B, protocol: ip_protocol::UDP, ident: 99 }
        );

        // A first fragment too short for the UDP header.
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_frag_offset(0);
        ip.set_more_frags(true);
        ip.set_total_len(27);
        ip.fill_checksum();
        assert_eq!(parse_ipv4_flow(&frame).unwrap_err(), WireError::Truncated { layer: Layer::Udp, needed: 8, got: 7 });

        // The captured UDP frame padded to the 60-byte minimum parses the same as unpadded.
        let mut padded = [0u8; 60];
        padded[..51].copy_from_slice(lab_frame(13));
        assert_eq!(parse_ipv4_flow(&padded), parse_ipv4_flow(lab_frame(13)));
    }

    #[test]
    fn vlan_and_other_ethertypes() {
        let mut tagged = [0u8; 46];
        tagged[..12].copy_from_slice(&lab_frame(1)[..12]);
        tagged[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        tagged[16..].copy_from_slice(&lab_frame(1)[12..]);
        assert_eq!(
            parse_ipv4_flow(&tagged).unwrap(),
            ParsedV4::Vlan(VlanTag { tpid: EtherType::VLAN, pcp: 0, dei: false, vid: 100, inner: EtherType::ARP })
        );
        assert_eq!(parse_ipv4_flow(&tagged[..16]).unwrap_err().reason(), "vlan_truncated");
        let mut lldp = [0u8; 60];
        lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
        assert_eq!(parse_ipv4_flow(&lldp).unwrap(), ParsedV4::Other(EtherType(0x88cc)));
    }

    #[test]
    fn errors_by_reason() {
        let reason = |frame: &[u8]| parse_ipv4_flow(frame).unwrap_err().reason();
        assert_eq!(reason(&lab_frame(5)[..13]), "eth_truncated");
        assert_eq!(reason(&lab_frame(1)[..41]), "arp_truncated");
        assert_eq!(reason(&lab_frame(5)[..33]), "ipv4_truncated");
        assert_eq!(reason(&lab_frame(5)[..73]), "ipv4_truncated"); // total length 60 > 59
        let mut syn = lab_frame(5).to_vec();
        syn[24] ^= 1; // TTL, covered by the header checksum
        assert_eq!(reason(&syn), "ipv4_bad_checksum");
        syn[24] ^= 1;
        syn[46] = 0x40; // TCP data offset 4
        assert_eq!(reason(&syn), "tcp_bad_header_length");
        syn[46] = 0xf0; // 60-byte TCP header in a 40-byte segment
        assert_eq!(reason(&syn), "tcp_truncated");
        let mut udp = lab_frame(13).to_vec();
        udp[38..40].copy_from_slice(&18u16.to_be_bytes());
        assert_eq!(reason(&udp), "udp_truncated");
        udp[38..40].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(reason(&udp), "udp_bad_length");
        let mut unreachable = lab_frame(14).to_vec();
        unreachable[42] = 0x60;
        assert_eq!(reason(&unreachable), "icmpv4_quote_bad_version");
        let mut arp = lab_frame(1).to_vec();
        arp[19] = 16;
        assert_eq!(reason(&arp), "arp_not_ethernet_ipv4");
        let mut v6_in_v4 = lab_frame(5).to_vec();
        v6_in_v4[14] = 0x65;
        assert_eq!(reason(&v6_in_v4), "ipv4_bad_version");
    }

    #[test]
    fn no_panic_on_arbitrary_frames() {
        let mut rng = Rng(9);
        let mut buf = [0u8; 200];
        let templates = [lab_frame(5), lab_frame(13), lab_frame(14), lab_frame(1), lab_frame(16)];
        let mut ok = 0;
        for round in 0..100_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            // Mostly-valid frames reach deeper: start from a captured frame and flip a few bytes.
            if round % 2 == 0 {
                let template = templates[rng.below(templates.len())];
                let n = len.min(template.len());
                buf[..n].copy_from_slice(&template[..n]);
                for _ in 0..1 + rng.below(3) {
                    if n > 0 {
                        buf[rng.below(n)] = rng.next_u64() as u8;
                    }
                }
            }
            if parse_ipv4_flow(&buf[..len]).is_ok() {
                ok += 1;
            }
        }
        assert!(ok > 1000, "the mutated frames should often still parse ({ok})");
    }

    mod nat_properties {
        use proptest::prelude::*;

        use super::super::*;

        fn addr() -> impl Strategy<Value = Ipv4Addr> {
            any::<u32>().prop_map(Ipv4Addr::from)
        }

        /// Build Ethernet + IPv4 + TCP (with `options`) or UDP + payload, with complete checksums.
        fn build(
            tcp: bool,
            src: Ipv4Addr,
            dst: Ipv4Addr,
            ports: (u16, u16),
            options: &[u8],
            payload: &[u8],
        ) -> Vec<u8> {
            let l4_header = if tcp { 20 + options.len() } else { 8 };
            let l4_len = l4_header + payload.len();
            let mut frame = vec![0u8; 14 + 20 + l4_len];
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_total_len((20 + l4_len) as u16);
            ip.set_ttl(64);
            ip.set_protocol(if tcp { ip_protocol::TCP } else { ip_protocol::UDP });
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.fill_checksum();
            let l4 = ip.payload_mut();
            if tcp {
                let mut t = TcpPacket::new_unchecked(&mut l4[..]);
                t.set_src_port(ports.0);
                t.set_dst_port(ports.1);
                t.set_seq_number(0x1234_5678);
                t.set_header_len(l4_header);
                t.set_flags(TcpFlags::SYN);
                t.set_window_len(29200);
                t.options_mut().copy_from_slice(options);
                t.payload_mut().copy_from_slice(payload);
                t.fill_checksum(src, dst);
            } else {
                let mut u = UdpPacket::new_unchecked(&mut l4[..]);
                u.set_src_port(ports.0);
                u.set_dst_port(ports.1);
                u.set_len(l4_len as u16);
                u.payload_mut().copy_from_slice(payload);
                u.fill_checksum(src, dst);
            }
            frame
        }

        /// SYN options with an MSS at a chosen alignment: `pad` NOPs, MSS, then NOPs to a multiple of 4.
        fn options(pad: usize, mss: u16) -> Vec<u8> {
            let mut o = vec![1u8; pad];
            o.extend_from_slice(&[2, 4]);
            o.extend_from_slice(&mss.to_be_bytes());
            while o.len() % 4 != 0 {
                o.push(1);
            }
            o
        }

        /// Full NAT of both addresses and ports (and an MSS clamp), incrementally, in place.
        fn nat(frame: &mut [u8], new_src: Ipv4Addr, new_dst: Ipv4Addr, ports: (u16, u16), state: ChecksumState) {
            let mut ip = Ipv4Packet::new_checked(&mut frame[14..]).unwrap();
            let old_src = ip.rewrite_src_addr(new_src);
            let old_dst = ip.rewrite_dst_addr(new_dst);
            if ip.protocol() == ip_protocol::TCP {
                let mut t = TcpPacket::new_checked(ip.payload_mut()).unwrap();
                t.pseudo_header_addr_changed(old_src, new_src, state);
                t.pseudo_header_addr_changed(old_dst, new_dst, state);
                t.rewrite_src_port(ports.0, state);
                t.rewrite_dst_port(ports.1, state);
                t.clamp_mss(1200, state).unwrap();
            } else {
                let mut u = UdpPacket::new_checked(ip.payload_mut()).unwrap();
                u.pseudo_header_addr_changed(old_src, new_src, state);
                u.pseudo_header_addr_changed(old_dst, new_dst, state);
                u.rewrite_src_port(ports.0, state);
                u.rewrite_dst_port(ports.1, state);
            }
        }

        /// The same frame with every checksum recomputed from scratch.
        fn recomputed(frame: &[u8]) -> Vec<u8> {
            let mut copy = frame.to_vec();
            let mut ip = Ipv4Packet::new_checked(&mut copy[14..]).unwrap();
            ip.fill_checksum();
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            if ip.protocol() == ip_protocol::TCP {
                TcpPacket::new_checked(ip.payload_mut()).unwrap().fill_checksum(src, dst);
            } else {
                let mut u = UdpPacket::new_checked(ip.payload_mut()).unwrap();
                if u.checksum() != 0 {
                    u.fill_checksum(src, dst);
                }
            }
            copy
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn incremental_nat_equals_recomputation(
                tcp in any::<bool>(),
                src in addr(), dst in addr(), new_src in addr(), new_dst in addr(),
                ports in any::<(u16, u16)>(), new_ports in any::<(u16, u16)>(),
                pad in 0usize..4, mss in any::<u16>(),
                payload in proptest::collection::vec(any::<u8>(), 0..64),
                no_udp_checksum in proptest::bool::weighted(0.1),
            ) {
                let mut frame = build(tcp, src, dst, ports, &options(pad, mss), &payload);
                if !tcp && no_udp_checksum {
                    frame[40..42].copy_from_slice(&[0, 0]);
                }
                nat(&mut frame, new_src, new_dst, new_ports, ChecksumState::Complete);
                prop_assert_eq!(&frame, &recomputed(&frame));
                if !tcp && no_udp_checksum {
                    prop_assert_eq!(&frame[40..42], &[0, 0]);
                }
                prop_assert!(parse_ipv4_flow(&frame).is_ok());
            }

            #[test]
            fn partial_nat_then_completion_verifies(
                tcp in any::<bool>(),
                src in addr(), dst in addr(), new_src in addr(), new_dst in addr(),
                ports in any::<(u16, u16)>(), new_ports in any::<(u16, u16)>(),
                pad in 0usize..4, mss in any::<u16>(),
                payload in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                // The frame as a CHECKSUM_PARTIAL sender hands it over: the L4 field holds the seed.
                let mut frame = build(tcp, src, dst, ports, &options(pad, mss), &payload);
                let (csum_offset, ip_total) = (if tcp { 16u16 } else { 6 }, frame.len() - 14);
                {
                    let mut ip = Ipv4Packet::new_checked(&mut frame[14..]).unwrap();
                    if tcp {
                        TcpPacket::new_checked(ip.payload_mut()).unwrap().fill_partial_checksum(src, dst);
                    } else {
                        UdpPacket::new_checked(ip.payload_mut()).unwrap().fill_partial_checksum(src, dst);
                    }
                }
                nat(&mut frame, new_src, new_dst, new_ports, ChecksumState::Partial);
                // The seed now equals the seed computed for the new addresses.
                let seed = u16::from_be_bytes([frame[34 + csum_offset as usize], frame[35 + csum_offset as usize]]);
                let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
                prop_assert_eq!(seed, ip.pseudo_header_sum());
                prop_assert_eq!(usize::from(ip.total_len()), ip_total);
                // Completing it like the device gives what a from-scratch computation gives.
                let mut hdr = [0u8; VNET_HDR_LEN];
                let mut vnet = VnetHeader::new_unchecked(&mut hdr[..]);
                vnet.set_flags(vnet::vnet_flags::NEEDS_CSUM);
                vnet.set_csum_start(34);
                vnet.set_csum_offset(csum_offset);
                complete_checksum(&mut frame, &vnet).unwrap();
                // The same bytes, except that a checksum computing to zero is stored as 0xffff by the
                // completion (like the kernel's) and as 0x0000 by TCP's from-scratch fill: both verify.
                let fresh = recomputed(&frame);
                let at = 34 + csum_offset as usize;
                prop_assert_eq!(&frame[..at], &fresh[..at]);
                prop_assert_eq!(&frame[at + 2..], &fresh[at + 2..]);
                let (got, want) = ([frame[at], frame[at + 1]], [fresh[at], fresh[at + 1]]);
                prop_assert!(got == want || (got == [0xff, 0xff] && want == [0, 0]), "{:?} vs {:?}", got, want);
            }
        }
    }
}
