//! ICMPv4 (RFC 792): the header, the original datagram quoted in error messages (which tells which
//! connection an error belongs to), and the "fragmentation needed" error the director sends (RFC 1191).

use std::net::Ipv4Addr;

use super::checksum;
use super::error::{Layer, WireError};
use super::field::Field;
use super::ipv4::{self, ip_protocol, Ipv4Packet};
use crate::flow::{FlowV4, Proto};

/// ICMPv4 message types.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const SOURCE_QUENCH: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAM_PROBLEM: u8 = 12;
}

/// Codes of [`icmp_type::DEST_UNREACHABLE`].
pub mod unreachable_code {
    pub const NET: u8 = 0;
    pub const HOST: u8 = 1;
    pub const PROTOCOL: u8 = 2;
    pub const PORT: u8 = 3;
    /// Fragmentation needed and DF set; the next-hop MTU is in bytes 6..8 (RFC 1191).
    pub const FRAG_NEEDED: u8 = 4;
    pub const SOURCE_ROUTE_FAILED: u8 = 5;
    pub const ADMIN_PROHIBITED: u8 = 13;
}

mod field {
    use super::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQ: Field = 6..8;
    pub const UNUSED: Field = 4..6;
    pub const NEXT_HOP_MTU: Field = 6..8;
    pub const REST: Field = 4..8;
    pub const DATA: usize = 8;
}

/// The length of the ICMP header (type, code, checksum, and the 4 type-specific bytes).
pub const HEADER_LEN: usize = field::DATA;
/// How many transport bytes an error message quotes at least (RFC 792), and this module requires.
pub const QUOTED_L4_LEN: usize = 8;

/// A read/write view of an ICMPv4 message: the buffer must be exactly the message (the IPv4 payload), since
/// the checksum covers all of it. [`check_len`](Self::check_len) guarantees the 8-byte header.
#[derive(Debug, Clone)]
pub struct Icmpv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(d: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([d[f.start], d[f.start + 1]])
}

/// Whether an ICMP type is an error message (which quotes the datagram that caused it).
pub fn is_error_type(msg_type: u8) -> bool {
    matches!(
        msg_type,
        icmp_type::DEST_UNREACHABLE
            | icmp_type::SOURCE_QUENCH
            | icmp_type::REDIRECT
            | icmp_type::TIME_EXCEEDED
            | icmp_type::PARAM_PROBLEM
    )
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// Wrap a buffer without checking it. Accessors panic if it is shorter than 8 bytes.
    pub fn new_unchecked(buffer: T) -> Icmpv4Packet<T> {
        Icmpv4Packet { buffer }
    }

    /// Wrap a buffer and [`check_len`](Self::check_len) it.
    pub fn new_checked(buffer: T) -> Result<Icmpv4Packet<T>, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::truncated(Layer::Icmpv4, HEADER_LEN, len));
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Echo request/reply identifier.
    pub fn echo_ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ECHO_IDENT)
    }

    /// Echo request/reply sequence number.
    pub fn echo_seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ECHO_SEQ)
    }

    /// The next-hop MTU of a "fragmentation needed" message (0 from pre-RFC 1191 routers).
    pub fn next_hop_mtu(&self) -> u16 {
        be16(self.buffer.as_ref(), field::NEXT_HOP_MTU)
    }

    /// Bytes 4..8, whatever the type makes of them.
    pub fn rest_of_header(&self) -> u32 {
        let d = self.buffer.as_ref();
        let s = field::REST.start;
        u32::from_be_bytes([d[s], d[s + 1], d[s + 2], d[s + 3]])
    }

    pub fn is_error(&self) -> bool {
        is_error_type(self.msg_type())
    }

    /// The bytes after the 8-byte header (an error message's quoted datagram, an echo's data).
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA..]
    }

    /// The checksum verifies (over the whole message; ICMP has no pseudo-header).
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0xffff
    }

    /// For an error message: the quoted original datagram, checked to hold an IPv4 header (version 4,
    /// IHL ≥ 5) and at least [`QUOTED_L4_LEN`] bytes after it. The quoted total length is not checked: the
    /// quote is normally shorter than the datagram was.
    pub fn quote(&self) -> Result<IcmpQuote<'_>, WireError> {
        if !self.is_error() {
            return Err(WireError::IcmpNotError { icmp_type: self.msg_type() });
        }
        IcmpQuote::new(self.data())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    pub fn set_msg_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::TYPE] = value
    }

    pub fn set_code(&mut self, value: u8) {
        self.buffer.as_mut()[field::CODE] = value
    }

    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_echo_ident(&mut self, value: u16) {
        self.buffer.as_mut()[field::ECHO_IDENT].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_echo_seq(&mut self, value: u16) {
        self.buffer.as_mut()[field::ECHO_SEQ].copy_from_slice(&value.to_be_bytes())
    }

    /// Set bytes 4..6 (unused in "fragmentation needed") and 6..8 (the next-hop MTU).
    pub fn set_next_hop_mtu(&mut self, value: u16) {
        let d = self.buffer.as_mut();
        d[field::UNUSED].fill(0);
        d[field::NEXT_HOP_MTU].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_rest_of_header(&mut self, value: u32) {
        self.buffer.as_mut()[field::REST].copy_from_slice(&value.to_be_bytes())
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::DATA..]
    }

    /// Compute the checksum from scratch over the whole message and store it.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::data(self.buffer.as_ref());
        self.set_checksum(!sum);
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Icmpv4Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The original datagram quoted by an ICMP error: its IPv4 header and the first (≥ 8) transport bytes.
#[derive(Debug, Clone)]
pub struct IcmpQuote<'a> {
    data: &'a [u8],
    ip: Ipv4Packet<&'a [u8]>,
}

impl<'a> IcmpQuote<'a> {
    /// Check `data` (an ICMP error's bytes after its 8-byte header) as a quote.
    pub fn new(data: &'a [u8]) -> Result<IcmpQuote<'a>, WireError> {
        let ip = Ipv4Packet::new_unchecked(data);
        ip.check_header(Layer::IcmpQuote)?;
        let needed = ip.header_len() + QUOTED_L4_LEN;
        if data.len() < needed {
            return Err(WireError::truncated(Layer::IcmpQuote, needed, data.len()));
        }
        Ok(IcmpQuote { data, ip })
    }

    /// The quoted IPv4 header (its total length is the original datagram's, not the quote's).
    pub fn ip(&self) -> &Ipv4Packet<&'a [u8]> {
        &self.ip
    }

    /// The quoted header's length (the offset of [`l4`](Self::l4) within the quote).
    pub fn header_len(&self) -> usize {
        self.ip.header_len()
    }

    /// The quoted transport bytes: at least 8 (ports, and TCP's sequence number or UDP's length/checksum).
    pub fn l4(&self) -> &'a [u8] {
        &self.data[self.ip.header_len()..]
    }

    /// The quoted ports (source, destination) for TCP/UDP, unless the quoted datagram is a non-first
    /// fragment (which has no transport header).
    pub fn ports(&self) -> Option<(u16, u16)> {
        if self.ip.is_non_first_fragment() {
            return None;
        }
        Proto::from_ip_protocol(self.ip.protocol())?;
        match *self.l4() {
            [a, b, c, d, ..] => Some((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))),
            _ => None,
        }
    }

    /// The flow of the quoted datagram, in the direction it was sent (usually from the local side to the
    /// host reporting the error: the reverse of the flow the error arrives on).
    pub fn flow(&self) -> Option<FlowV4> {
        let proto = Proto::from_ip_protocol(self.ip.protocol())?;
        let (src_port, dst_port) = self.ports()?;
        Some(FlowV4 { src: self.ip.src_addr(), dst: self.ip.dst_addr(), src_port, dst_port, proto })
    }
}

/// How much of the offending datagram an error message quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteLen {
    /// RFC 792: the IP header and the first 8 bytes of its payload.
    Rfc792,
    /// RFC 1812 §4.3.2.3 (what Linux sends): as much as fits in a 576-byte error datagram.
    Rfc1812,
}

/// The largest ICMP error datagram RFC 1812 allows.
const RFC1812_MAX: usize = 576;

/// Whether RFC 1122 §3.2.2 allows sending an ICMP error about `offending`: not about an ICMP error, a
/// non-first fragment, a datagram to a broadcast or multicast address, or from an address that is not a
/// single host. (A datagram that arrived as a link-layer broadcast is excluded too; the caller knows that.)
pub fn icmp_error_allowed<T: AsRef<[u8]>>(offending: &Ipv4Packet<T>) -> bool {
    let (src, dst) = (offending.src_addr(), offending.dst_addr());
    if offending.is_non_first_fragment()
        || dst.is_broadcast()
        || dst.is_multicast()
        || src.is_unspecified()
        || src.is_broadcast()
        || src.is_multicast()
        || src.is_loopback()
        || src.octets()[0] >= 240
    {
        return false;
    }
    if offending.protocol() == ip_protocol::ICMP {
        let d = offending.as_ref();
        return match d.get(offending.header_len()) {
            Some(&msg_type) => !is_error_type(msg_type),
            None => false,
        };
    }
    true
}

/// Write into `buf` an IPv4 datagram (no link-layer header: write it before `buf`) carrying the ICMP
/// "destination unreachable, fragmentation needed" error (type 3 code 4, RFC 1191) about `offending` (an
/// IPv4 packet, from its header on): from `src` (the director's address) to the offending packet's source,
/// with `next_hop_mtu`, quoting per `quote`. Returns its length. The IP header carries TOS 0xc0 (internet
/// control, as Linux sends errors), TTL 64, no DF, and `ident`. Check [`icmp_error_allowed`] first.
pub fn emit_frag_needed(
    buf: &mut [u8],
    offending: &[u8],
    src: Ipv4Addr,
    next_hop_mtu: u16,
    ident: u16,
    quote: QuoteLen,
) -> Result<usize, WireError> {
    let original = Ipv4Packet::new_checked(offending)?;
    let original_len = usize::from(original.total_len());
    let quote_len = match quote {
        QuoteLen::Rfc792 => original_len.min(original.header_len() + QUOTED_L4_LEN),
        QuoteLen::Rfc1812 => original_len.min(RFC1812_MAX - ipv4::MIN_HEADER_LEN - HEADER_LEN),
    };
    let total = ipv4::MIN_HEADER_LEN + HEADER_LEN + quote_len;
    let got = buf.len();
    let out = buf.get_mut(..total).ok_or(WireError::BufferTooSmall { needed: total, got })?;
    let (ip_header, icmp_bytes) = out.split_at_mut(ipv4::MIN_HEADER_LEN);
    ipv4::emit_header(
        ip_header,
        &ipv4::HeaderFields {
            dscp_ecn: 0xc0,
            total_len: total as u16,
            ident,
            dont_frag: false,
            ttl: 64,
            protocol: ip_protocol::ICMP,
            src,
            dst: original.src_addr(),
        },
    )?;
    let mut icmp = Icmpv4Packet::new_unchecked(icmp_bytes);
    icmp.set_msg_type(icmp_type::DEST_UNREACHABLE);
    icmp.set_code(unreachable_code::FRAG_NEEDED);
    icmp.set_next_hop_mtu(next_hop_mtu);
    icmp.data_mut().copy_from_slice(&original.packet()[..quote_len]);
    icmp.fill_checksum();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::checksum::tests::Rng;
    use super::super::tests::{lab_frame, lab_frames};
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const R: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

    /// The ICMP message of a captured frame (IP payload, bounded by the total length).
    fn icmp_of(frame: &[u8]) -> &[u8] {
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        let (start, end) = (14 + ip.header_len(), 14 + usize::from(ip.total_len()));
        &frame[start..end]
    }

    #[test]
    fn echo_request() {
        let icmp = Icmpv4Packet::new_checked(icmp_of(lab_frame(3))).unwrap();
        assert_eq!((icmp.msg_type(), icmp.code()), (icmp_type::ECHO_REQUEST, 0));
        assert_eq!(icmp.checksum(), 0xe336);
        assert_eq!((icmp.echo_ident(), icmp.echo_seq()), (0x20a5, 1));
        assert!(icmp.verify_checksum());
        assert!(!icmp.is_error());
        assert_eq!(icmp.data().len(), 56);
        assert_eq!(icmp.quote().unwrap_err(), WireError::IcmpNotError { icmp_type: 8 });
    }

    #[test]
    fn every_captured_icmp_checksum_verifies() {
        let mut count = 0;
        for frame in lab_frames() {
            let Ok(ip) = Ipv4Packet::new_checked(&frame[14..]) else { continue };
            if ip.protocol() != ip_protocol::ICMP || ip.is_fragment() {
                continue;
            }
            assert!(Icmpv4Packet::new_checked(ip.payload()).unwrap().verify_checksum());
            count += 1;
        }
        assert_eq!(count, 9);
    }

    #[test]
    fn captured_port_unreachable_quotes_the_udp_flow() {
        // Frame 14: 10.2.0.1 says port 5353 is unreachable for the datagram of frame 13.
        let icmp = Icmpv4Packet::new_checked(icmp_of(lab_frame(14))).unwrap();
        assert_eq!((icmp.msg_type(), icmp.code()), (icmp_type::DEST_UNREACHABLE, unreachable_code::PORT));
        assert!(icmp.is_error());
        let quote = icmp.quote().unwrap();
        assert_eq!(quote.ip().src_addr(), A);
        assert_eq!(quote.ip().dst_addr(), B);
        assert_eq!(quote.ports(), Some((34278, 5353)));
        assert_eq!(quote.flow(), Some(FlowV4 { src: A, dst: B, src_port: 34278, dst_port: 5353, proto: Proto::Udp }));
        // Linux quotes the whole (short) datagram: 17 UDP bytes.
        assert_eq!(quote.l4().len(), 17);
    }

    #[test]
    fn captured_frag_needed_and_time_exceeded() {
        // Frame 16: the router's "fragmentation needed, mtu 1000" for the 1228-byte DF echo of frame 15.
        let icmp = Icmpv4Packet::new_checked(icmp_of(lab_frame(16))).unwrap();
        assert_eq!((icmp.msg_type(), icmp.code()), (3, unreachable_code::FRAG_NEEDED));
        assert_eq!(icmp.next_hop_mtu(), 1000);
        let quote = icmp.quote().unwrap();
        assert_eq!(quote.ip().total_len(), 1228); // the original's, not the quote's
        assert_eq!(quote.ip().protocol(), ip_protocol::ICMP);
        assert_eq!(quote.flow(), None);
        // Frame 18: time exceeded in transit.
        let icmp = Icmpv4Packet::new_checked(icmp_of(lab_frame(18))).unwrap();
        assert_eq!((icmp.msg_type(), icmp.code()), (icmp_type::TIME_EXCEEDED, 0));
        assert_eq!(icmp.quote().unwrap().ip().ttl(), 1);
    }

    #[test]
    fn frag_needed_matches_linux_byte_for_byte() {
        // Frame 16 is Linux's error for frame 15: RFC 1812 quoting, TOS 0xc0, TTL 64, ident 62909.
        let offending = &lab_frame(15)[14..];
        let mut buf = [0xa5u8; 700];
        let len = emit_frag_needed(&mut buf, offending, R, 1000, 62909, QuoteLen::Rfc1812).unwrap();
        assert_eq!(len, 576);
        assert_eq!(&buf[..len], &lab_frame(16)[14..]);
        assert!(buf[len..].iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn frag_needed_rfc792_quote() {
        let offending = &lab_frame(5)[14..]; // the captured TCP SYN, 60 bytes
        let mut buf = [0xa5u8; 56];
        let len = emit_frag_needed(&mut buf, offending, R, 1400, 7, QuoteLen::Rfc792).unwrap();
        assert_eq!(len, 20 + 8 + 28);
        let ip = Ipv4Packet::new_checked(&buf[..len]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr(), ip.protocol(), ip.ttl()), (R, A, ip_protocol::ICMP, 64));
        assert!(!ip.dont_frag());
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.next_hop_mtu(), 1400);
        assert_eq!(icmp.rest_of_header(), 1400);
        let quote = icmp.quote().unwrap();
        assert_eq!(quote.flow(), Some(FlowV4 { src: A, dst: B, src_port: 60634, dst_port: 8080, proto: Proto::Tcp }));
        assert_eq!(quote.l4(), &offending[20..28]);

        assert_eq!(
            emit_frag_needed(&mut buf[..55], offending, R, 1400, 7, QuoteLen::Rfc792),
            Err(WireError::BufferTooSmall { needed: 56, got: 55 })
        );
        assert_eq!(
            emit_frag_needed(&mut buf, &offending[..30], R, 1400, 7, QuoteLen::Rfc792),
            Err(WireError::Truncated { layer: Layer::Ipv4, needed: 60, got: 30 })
        );
    }

    #[test]
    fn construct() {
        // Rebuild frame 3's echo request field by field.
        let original = icmp_of(lab_frame(3));
        let mut bytes = [0xa5u8; 64];
        let mut icmp = Icmpv4Packet::new_unchecked(&mut bytes[..]);
        icmp.set_msg_type(icmp_type::ECHO_REQUEST);
        icmp.set_code(0);
        icmp.set_echo_ident(0x20a5);
        icmp.set_echo_seq(1);
        icmp.data_mut().copy_from_slice(&original[8..]);
        icmp.fill_checksum();
        assert_eq!(&bytes[..], original);
    }

    #[test]
    fn error_allowed() {
        let syn = Ipv4Packet::new_checked(&lab_frame(5)[14..]).unwrap();
        assert!(icmp_error_allowed(&syn));
        let echo = Ipv4Packet::new_checked(&lab_frame(15)[14..]).unwrap();
        assert!(icmp_error_allowed(&echo));
        let error = Ipv4Packet::new_checked(&lab_frame(16)[14..]).unwrap();
        assert!(!icmp_error_allowed(&error));
        let second_fragment = Ipv4Packet::new_checked(&lab_frame(20)[14..]).unwrap();
        assert!(!icmp_error_allowed(&second_fragment));
        let mut bytes = [0u8; 60];
        bytes.copy_from_slice(&lab_frame(5)[14..]);
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.set_dst_addr(Ipv4Addr::new(224, 0, 0, 5));
        assert!(!icmp_error_allowed(&ip));
        ip.set_dst_addr(B);
        ip.set_src_addr(Ipv4Addr::new(127, 0, 0, 1));
        assert!(!icmp_error_allowed(&ip));
    }

    #[test]
    fn quote_errors() {
        let message = icmp_of(lab_frame(14));
        let mut bytes = [0u8; 45];
        bytes.copy_from_slice(message);
        // Quote cut to header + 7 transport bytes.
        let icmp = Icmpv4Packet::new_checked(&bytes[..8 + 20 + 7]).unwrap();
        let err = icmp.quote().unwrap_err();
        assert_eq!(err, WireError::Truncated { layer: Layer::IcmpQuote, needed: 28, got: 27 });
        assert_eq!(err.reason(), "icmpv4_quote_truncated");
        let icmp = Icmpv4Packet::new_checked(&bytes[..8 + 19]).unwrap();
        assert_eq!(icmp.quote().unwrap_err(), WireError::Truncated { layer: Layer::IcmpQuote, needed: 20, got: 19 });
        bytes[8] = 0x65;
        let err = Icmpv4Packet::new_checked(&bytes[..]).unwrap().quote().unwrap_err();
        assert_eq!(err, WireError::BadVersion { layer: Layer::IcmpQuote, version: 6 });
        assert_eq!(err.reason(), "icmpv4_quote_bad_version");
        bytes[8] = 0x43;
        let err = Icmpv4Packet::new_checked(&bytes[..]).unwrap().quote().unwrap_err();
        assert_eq!(err, WireError::BadHeaderLength { layer: Layer::IcmpQuote, len: 12 });
        assert_eq!(err.reason(), "icmpv4_quote_bad_header_length");
        for len in 0..8 {
            assert_eq!(
                Icmpv4Packet::new_checked(&message[..len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Icmpv4, needed: 8, got: len }
            );
        }
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(6);
        let mut buf = [0u8; 200];
        let mut out = [0u8; 600];
        for round in 0..50_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if len > 8 && round % 2 == 0 {
                buf[0] = [3, 4, 5, 11, 12][rng.below(5)];
                buf[8] = 0x40 | (buf[8] & 0x0f);
            }
            if let Ok(icmp) = Icmpv4Packet::new_checked(&buf[..len]) {
                let _ = (icmp.msg_type(), icmp.code(), icmp.checksum(), icmp.echo_ident(), icmp.echo_seq());
                let _ = (icmp.next_hop_mtu(), icmp.rest_of_header(), icmp.data(), icmp.verify_checksum());
                if let Ok(quote) = icmp.quote() {
                    let _ = (quote.ip().src_addr(), quote.l4(), quote.ports(), quote.flow(), quote.header_len());
                }
            }
            if let Ok(ip) = Ipv4Packet::new_checked(&buf[..len]) {
                let _ = icmp_error_allowed(&ip);
            }
            let _ = emit_frag_needed(&mut out, &buf[..len], R, 1280, 1, QuoteLen::Rfc1812);
        }
    }
}
