//! IPv4 headers (RFC 791), options included.

use std::net::Ipv4Addr;

use super::checksum;
use super::error::{Layer, WireError};
use super::field::Field;

/// IP protocol numbers the director meets.
pub mod ip_protocol {
    pub const ICMP: u8 = 1;
    /// IPv4-in-IPv4 (the tunnel forwarding mode).
    pub const IPIP: u8 = 4;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const GRE: u8 = 47;
    pub const ICMPV6: u8 = 58;
}

mod field {
    use super::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC_ADDR: Field = 12..16;
    pub const DST_ADDR: Field = 16..20;
}

/// The length of an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = field::DST_ADDR.end;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A read/write view of an IPv4 packet.
///
/// [`check_len`](Self::check_len) guarantees: version 4, IHL ≥ 5, the header (with options) inside the
/// buffer, and header length ≤ total length ≤ buffer length. The buffer may be longer than the total length
/// (Ethernet pads frames to 60 bytes): [`payload`](Self::payload) ends at the total length, never at the
/// buffer's end.
///
/// TSO super-frames from PACKET_VNET_HDR carry the super-frame's total length (≤ 65535), so they pass.
/// "BIG TCP" IPv4 super-frames (> 64 KiB, Linux ≥ 6.3 with `gso_ipv4_max_size` raised) carry total length
/// 0 and are rejected as `ipv4_bad_total_length`; leave that setting at its default on data-plane
/// interfaces.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(d: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([d[f.start], d[f.start + 1]])
}

fn addr(d: &[u8], f: Field) -> Ipv4Addr {
    Ipv4Addr::new(d[f.start], d[f.start + 1], d[f.start + 2], d[f.start + 3])
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wrap a buffer without checking it. Accessors panic if the buffer is shorter than the fields they
    /// read (the payload accessors, if the header- or total-length field points past it).
    pub fn new_unchecked(buffer: T) -> Ipv4Packet<T> {
        Ipv4Packet { buffer }
    }

    /// Wrap a buffer and [`check_len`](Self::check_len) it.
    pub fn new_checked(buffer: T) -> Result<Ipv4Packet<T>, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check everything that makes the accessors panic-free (see the type's documentation). The version is
    /// checked too, since the length fields mean nothing in another version's header.
    pub fn check_len(&self) -> Result<(), WireError> {
        self.check_header(Layer::Ipv4)?;
        let len = self.buffer.as_ref().len();
        let total = usize::from(self.total_len());
        let header = self.header_len();
        if total < header {
            return Err(WireError::BadTotalLength { layer: Layer::Ipv4, len: total, header });
        }
        if total > len {
            return Err(WireError::truncated(Layer::Ipv4, total, len));
        }
        Ok(())
    }

    /// The checks of `check_len` that do not involve the total length: an ICMP error quotes only the start
    /// of a datagram, so the quoted header's total length exceeds what is there.
    pub(crate) fn check_header(&self, layer: Layer) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(WireError::truncated(layer, MIN_HEADER_LEN, len));
        }
        let version = self.version();
        if version != 4 {
            return Err(WireError::BadVersion { layer, version });
        }
        let header = self.header_len();
        if header < MIN_HEADER_LEN {
            return Err(WireError::BadHeaderLength { layer, len: header });
        }
        if len < header {
            return Err(WireError::truncated(layer, header, len));
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// The header length in bytes (IHL × 4), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn dscp(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] >> 2
    }

    pub fn ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] & 0x03
    }

    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    pub fn dont_frag(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }

    /// The fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK) << 3
    }

    /// Part of a fragmented datagram: MF set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & (FLAG_MF | OFFSET_MASK) != 0
    }

    /// A fragment other than the first: it carries no transport header.
    pub fn is_non_first_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// The protocol number (see [`ip_protocol`]).
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        addr(self.buffer.as_ref(), field::SRC_ADDR)
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        addr(self.buffer.as_ref(), field::DST_ADDR)
    }

    /// The header checksum verifies (the header, options included, sums to 0xffff).
    pub fn verify_checksum(&self) -> bool {
        checksum::data(&self.buffer.as_ref()[..self.header_len()]) == 0xffff
    }

    /// The header's options (empty without).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[MIN_HEADER_LEN..self.header_len()]
    }

    /// The whole packet, header through total length (without the link layer's trailing padding).
    pub fn packet(&self) -> &[u8] {
        &self.buffer.as_ref()[..usize::from(self.total_len())]
    }

    /// The payload: from the end of the header to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }

    /// The pseudo-header sum for this packet's transport segment (see [`checksum::pseudo_header_v4`]).
    pub fn pseudo_header_sum(&self) -> u16 {
        let l4_len = usize::from(self.total_len()).saturating_sub(self.header_len());
        checksum::pseudo_header_v4(self.src_addr(), self.dst_addr(), self.protocol(), l4_len as u16)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_version(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0x0f) | (value << 4);
    }

    /// Set the header length in bytes (a multiple of 4, 20..=60).
    pub fn set_header_len(&mut self, value: usize) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0xf0) | ((value / 4) as u8 & 0x0f);
    }

    pub fn set_dscp(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & 0x03) | (value << 2);
    }

    pub fn set_ecn(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & 0xfc) | (value & 0x03);
    }

    pub fn set_total_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_ident(&mut self, value: u16) {
        self.buffer.as_mut()[field::IDENT].copy_from_slice(&value.to_be_bytes())
    }

    fn set_flg_off(&mut self, value: u16) {
        self.buffer.as_mut()[field::FLG_OFF].copy_from_slice(&value.to_be_bytes())
    }

    fn flg_off(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLG_OFF)
    }

    /// Clear the three flag bits (reserved, DF, MF), keeping the fragment offset.
    pub fn clear_flags(&mut self) {
        let raw = self.flg_off();
        self.set_flg_off(raw & OFFSET_MASK);
    }

    pub fn set_dont_frag(&mut self, value: bool) {
        let raw = self.flg_off();
        self.set_flg_off(if value { raw | FLAG_DF } else { raw & !FLAG_DF });
    }

    pub fn set_more_frags(&mut self, value: bool) {
        let raw = self.flg_off();
        self.set_flg_off(if value { raw | FLAG_MF } else { raw & !FLAG_MF });
    }

    /// Set the fragment offset, in bytes (a multiple of 8).
    pub fn set_frag_offset(&mut self, value: u16) {
        let raw = self.flg_off();
        self.set_flg_off((raw & !OFFSET_MASK) | ((value >> 3) & OFFSET_MASK));
    }

    pub fn set_ttl(&mut self, value: u8) {
        self.buffer.as_mut()[field::TTL] = value
    }

    pub fn set_protocol(&mut self, value: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = value
    }

    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_src_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&value.octets())
    }

    pub fn set_dst_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&value.octets())
    }

    /// Compute the header checksum from scratch and store it.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::data(&self.buffer.as_ref()[..self.header_len()]);
        self.set_checksum(!sum);
    }

    /// Replace the source address, updating the header checksum incrementally; returns the old address.
    /// The transport checksum covers the address too (pseudo-header): update it with the TCP/UDP view's
    /// `pseudo_header_addr_changed`.
    pub fn rewrite_src_addr(&mut self, new: Ipv4Addr) -> Ipv4Addr {
        let old = self.src_addr();
        self.set_src_addr(new);
        self.set_checksum(checksum::update_u32(self.checksum(), u32::from(old), u32::from(new)));
        old
    }

    /// Replace the destination address, updating the header checksum incrementally; returns the old address.
    pub fn rewrite_dst_addr(&mut self, new: Ipv4Addr) -> Ipv4Addr {
        let old = self.dst_addr();
        self.set_dst_addr(new);
        self.set_checksum(checksum::update_u32(self.checksum(), u32::from(old), u32::from(new)));
        old
    }

    /// The payload, mutable (header end to total length).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = self.header_len()..usize::from(self.total_len());
        &mut self.buffer.as_mut()[range]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv4Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// Write a 20-byte IPv4 header (no options, checksum filled) at the start of `buf`.
pub(crate) struct HeaderFields {
    pub dscp_ecn: u8,
    pub total_len: u16,
    pub ident: u16,
    pub dont_frag: bool,
    pub ttl: u8,
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

pub(crate) fn emit_header(buf: &mut [u8], h: &HeaderFields) -> Result<(), WireError> {
    let got = buf.len();
    let header = buf.get_mut(..MIN_HEADER_LEN).ok_or(WireError::BufferTooSmall { needed: MIN_HEADER_LEN, got })?;
    let mut ip = Ipv4Packet::new_unchecked(header);
    ip.set_version(4);
    ip.set_header_len(MIN_HEADER_LEN);
    ip.set_dscp(h.dscp_ecn >> 2);
    ip.set_ecn(h.dscp_ecn & 3);
    ip.set_total_len(h.total_len);
    ip.set_ident(h.ident);
    ip.set_flg_off(if h.dont_frag { FLAG_DF } else { 0 });
    ip.set_ttl(h.ttl);
    ip.set_protocol(h.protocol);
    ip.set_src_addr(h.src);
    ip.set_dst_addr(h.dst);
    ip.fill_checksum();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::checksum::tests::{reference_sum, Rng};
    use super::super::tests::{lab_frame, lab_frames};
    use super::*;

    // Frame 5 of the capture, from the IP header on: the SYN 10.1.0.1:60634 -> 10.2.0.1:8080.
    fn syn() -> &'static [u8] {
        &lab_frame(5)[14..]
    }

    #[test]
    fn deconstruct_captured_syn() {
        let ip = Ipv4Packet::new_checked(syn()).unwrap();
        assert_eq!(ip.version(), 4);
        assert_eq!(ip.header_len(), 20);
        assert_eq!((ip.dscp(), ip.ecn()), (0, 0));
        assert_eq!(ip.total_len(), 60);
        assert_eq!(ip.ident(), 52079);
        assert!(ip.dont_frag() && !ip.more_frags() && !ip.is_fragment());
        assert_eq!(ip.frag_offset(), 0);
        assert_eq!(ip.ttl(), 64);
        assert_eq!(ip.protocol(), ip_protocol::TCP);
        assert_eq!(ip.checksum(), 0x5b48);
        assert_eq!(ip.src_addr(), Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(10, 2, 0, 1));
        assert!(ip.verify_checksum());
        assert_eq!(ip.payload().len(), 40);
        assert!(ip.options().is_empty());
    }

    #[test]
    fn every_captured_ipv4_header_verifies() {
        let mut count = 0;
        for frame in lab_frames() {
            if frame[12..14] != [0x08, 0x00] {
                continue;
            }
            let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(reference_sum(&frame[14..14 + ip.header_len()]), 0xffff);
            count += 1;
        }
        assert_eq!(count, 22);
    }

    #[test]
    fn captured_fragments() {
        // Frames 19 and 20: a 1608-byte echo request split at 1480.
        let first = Ipv4Packet::new_checked(&lab_frame(19)[14..]).unwrap();
        assert!(first.more_frags() && first.is_fragment() && !first.is_non_first_fragment());
        let second = Ipv4Packet::new_checked(&lab_frame(20)[14..]).unwrap();
        assert!(!second.more_frags() && second.is_fragment() && second.is_non_first_fragment());
        assert_eq!(second.frag_offset(), 1480);
        assert_eq!(first.ident(), second.ident());
    }

    #[test]
    fn payload_ignores_ethernet_padding() {
        // Frame 13 is a 51-byte UDP frame (IP total length 37); on a wire with a 60-byte minimum it arrives
        // padded: the payload must still end at the total length.
        let mut padded = [0u8; 46];
        padded[..37].copy_from_slice(&lab_frame(13)[14..]);
        let ip = Ipv4Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(ip.total_len(), 37);
        assert_eq!(ip.payload(), &lab_frame(13)[34..]);
        assert_eq!(ip.packet(), &lab_frame(13)[14..]);
    }

    #[test]
    fn construct() {
        let mut bytes = [0xa5u8; 60];
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_dscp(0);
        ip.set_ecn(0);
        ip.set_total_len(60);
        ip.set_ident(52079);
        ip.clear_flags();
        ip.set_dont_frag(true);
        ip.set_more_frags(false);
        ip.set_frag_offset(0);
        ip.set_ttl(64);
        ip.set_protocol(ip_protocol::TCP);
        ip.set_src_addr(Ipv4Addr::new(10, 1, 0, 1));
        ip.set_dst_addr(Ipv4Addr::new(10, 2, 0, 1));
        ip.fill_checksum();
        ip.payload_mut().copy_from_slice(&syn()[20..]);
        assert_eq!(&bytes[..], syn());

        let mut header = [0xa5u8; 20];
        let fields = HeaderFields {
            dscp_ecn: 0,
            total_len: 60,
            ident: 52079,
            dont_frag: true,
            ttl: 64,
            protocol: ip_protocol::TCP,
            src: Ipv4Addr::new(10, 1, 0, 1),
            dst: Ipv4Addr::new(10, 2, 0, 1),
        };
        emit_header(&mut header, &fields).unwrap();
        assert_eq!(&header[..], &syn()[..20]);
        assert_eq!(emit_header(&mut header[..19], &fields), Err(WireError::BufferTooSmall { needed: 20, got: 19 }));
    }

    #[test]
    fn flags_and_offset_setters_keep_each_other() {
        let mut bytes = [0u8; 20];
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.set_frag_offset(1480);
        ip.set_more_frags(true);
        ip.set_dont_frag(true);
        assert_eq!((ip.frag_offset(), ip.more_frags(), ip.dont_frag()), (1480, true, true));
        ip.set_dont_frag(false);
        ip.set_frag_offset(8);
        assert_eq!((ip.frag_offset(), ip.more_frags(), ip.dont_frag()), (8, true, false));
        ip.set_dscp(46);
        ip.set_ecn(3);
        assert_eq!((ip.dscp(), ip.ecn()), (46, 3));
    }

    #[test]
    fn options_are_covered() {
        // A header with a 4-byte option (Router Alert, RFC 2113): IHL 6.
        let mut bytes = [0u8; 28];
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.set_version(4);
        ip.set_header_len(24);
        ip.set_total_len(28);
        ip.set_ttl(1);
        ip.set_protocol(2);
        bytes[20..24].copy_from_slice(&[0x94, 0x04, 0x00, 0x00]);
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.fill_checksum();
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.options(), &[0x94, 0x04, 0, 0]);
        assert_eq!(ip.payload().len(), 4);
        assert!(ip.verify_checksum());
        let mut broken = bytes;
        broken[22] = 1; // an option byte is covered by the checksum
        assert!(!Ipv4Packet::new_checked(&broken[..]).unwrap().verify_checksum());
    }

    #[test]
    fn rewrite_updates_checksum() {
        let mut bytes = [0u8; 60];
        bytes.copy_from_slice(syn());
        let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(ip.rewrite_dst_addr(Ipv4Addr::new(192, 0, 2, 10)), Ipv4Addr::new(10, 2, 0, 1));
        assert_eq!(ip.rewrite_src_addr(Ipv4Addr::new(198, 51, 100, 7)), Ipv4Addr::new(10, 1, 0, 1));
        assert!(ip.verify_checksum());
        let incremental = ip.checksum();
        ip.fill_checksum();
        assert_eq!(ip.checksum(), incremental);
    }

    #[test]
    fn errors() {
        let syn = syn();
        for len in 0..20 {
            assert_eq!(
                Ipv4Packet::new_checked(&syn[..len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Ipv4, needed: 20, got: len }
            );
        }
        // total length 60 > buffer
        let err = Ipv4Packet::new_checked(&syn[..59]).unwrap_err();
        assert_eq!(err, WireError::Truncated { layer: Layer::Ipv4, needed: 60, got: 59 });
        assert_eq!(err.reason(), "ipv4_truncated");

        let mut bytes = [0u8; 60];
        bytes.copy_from_slice(syn);
        bytes[0] = 0x65;
        let err = Ipv4Packet::new_checked(&bytes[..]).unwrap_err();
        assert_eq!(err, WireError::BadVersion { layer: Layer::Ipv4, version: 6 });
        assert_eq!(err.reason(), "ipv4_bad_version");
        bytes[0] = 0x44;
        let err = Ipv4Packet::new_checked(&bytes[..]).unwrap_err();
        assert_eq!(err, WireError::BadHeaderLength { layer: Layer::Ipv4, len: 16 });
        assert_eq!(err.reason(), "ipv4_bad_header_length");
        bytes[0] = 0x4f; // a 60-byte header: exactly the total length, so an empty payload
        assert!(Ipv4Packet::new_checked(&bytes[..]).unwrap().payload().is_empty());
        let err = Ipv4Packet::new_checked(&bytes[..40]).unwrap_err();
        assert_eq!(err, WireError::Truncated { layer: Layer::Ipv4, needed: 60, got: 40 });
        bytes[0] = 0x45;
        bytes[2..4].copy_from_slice(&19u16.to_be_bytes());
        let err = Ipv4Packet::new_checked(&bytes[..]).unwrap_err();
        assert_eq!(err, WireError::BadTotalLength { layer: Layer::Ipv4, len: 19, header: 20 });
        assert_eq!(err.reason(), "ipv4_bad_total_length");
        // BIG TCP's total length 0
        bytes[2..4].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            Ipv4Packet::new_checked(&bytes[..]).unwrap_err(),
            WireError::BadTotalLength { layer: Layer::Ipv4, len: 0, header: 20 }
        );
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(3);
        let mut buf = [0u8; 200];
        for round in 0..50_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if len > 0 && round % 2 == 0 {
                buf[0] = 0x40 | (buf[0] & 0x0f); // make version 4 common
            }
            if len > 3 && round % 4 == 0 {
                buf[2..4].copy_from_slice(&(rng.below(len + 1) as u16).to_be_bytes());
            }
            if let Ok(ip) = Ipv4Packet::new_checked(&buf[..len]) {
                let _ = (ip.version(), ip.header_len(), ip.dscp(), ip.ecn(), ip.total_len(), ip.ident());
                let _ = (ip.dont_frag(), ip.more_frags(), ip.frag_offset(), ip.is_fragment(), ip.ttl());
                let _ = (ip.protocol(), ip.checksum(), ip.src_addr(), ip.dst_addr(), ip.verify_checksum());
                let _ = (ip.options(), ip.payload(), ip.packet(), ip.pseudo_header_sum());
            }
        }
    }
}
