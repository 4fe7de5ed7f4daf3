//! UDP datagrams (RFC 768). Over IPv4 a checksum of 0 means "none": it is kept 0 through rewrites, and a
//! computed 0 is sent as 0xffff.

use std::net::Ipv4Addr;

use super::checksum::{self, ChecksumState};
use super::error::{Layer, WireError};
use super::field::Field;
use super::ipv4::ip_protocol;

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

pub const HEADER_LEN: usize = field::CHECKSUM.end;
/// Offset of the checksum field in the UDP header (the virtio_net_hdr `csum_offset` for UDP).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// A read/write view of a UDP datagram; the buffer is the IPv4 payload.
///
/// [`check_len`](Self::check_len) guarantees: the 8-byte header, and 8 ≤ length field ≤ buffer length.
/// [`payload`](Self::payload) ends at the length field.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(d: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([d[f.start], d[f.start + 1]])
}

/// A computed complete checksum as UDP sends it: 0 would mean "no checksum", so it goes out as 0xffff (the
/// other representation of one's-complement zero).
fn on_wire(checksum: u16) -> u16 {
    if checksum == 0 {
        0xffff
    } else {
        checksum
    }
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wrap a buffer without checking it. Accessors panic if it is shorter than what they read.
    pub fn new_unchecked(buffer: T) -> UdpPacket<T> {
        UdpPacket { buffer }
    }

    /// Wrap a buffer and [`check_len`](Self::check_len) it.
    pub fn new_checked(buffer: T) -> Result<UdpPacket<T>, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::truncated(Layer::Udp, HEADER_LEN, len));
        }
        let length = usize::from(self.len());
        if length < HEADER_LEN {
            return Err(WireError::BadTotalLength { layer: Layer::Udp, len: length, header: HEADER_LEN });
        }
        if length > len {
            return Err(WireError::truncated(Layer::Udp, length, len));
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// The length field (header + payload).
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// The length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The sender computed a checksum (the field is not 0).
    pub fn checksum_present(&self) -> bool {
        self.checksum() != 0
    }

    /// The payload, bounded by the length field.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// The datagram, header through the length field.
    pub fn datagram(&self) -> &[u8] {
        &self.buffer.as_ref()[..usize::from(self.len())]
    }

    /// The checksum verifies for a datagram from `src` to `dst`, or there is none (field 0).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if !self.checksum_present() {
            return true;
        }
        let data = self.datagram();
        let pseudo = checksum::pseudo_header_v4_wide(src, dst, ip_protocol::UDP, data.len());
        checksum::sum_with(pseudo, data) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn set_src_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::SRC_PORT].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_dst_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::DST_PORT].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Compute the complete checksum from scratch for a datagram from `src` to `dst` and store it (a
    /// computed 0 is stored as 0xffff).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let data = self.datagram();
        let pseudo = checksum::pseudo_header_v4_wide(src, dst, ip_protocol::UDP, data.len());
        let sum = checksum::sum_with(pseudo, data);
        self.set_checksum(on_wire(!sum));
    }

    /// Store the CHECKSUM_PARTIAL seed (the pseudo-header sum, not inverted).
    pub fn fill_partial_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let pseudo = checksum::pseudo_header_v4_wide(src, dst, ip_protocol::UDP, usize::from(self.len()));
        self.set_checksum(checksum::fold(pseudo));
    }

    /// Apply an incremental change to a complete checksum, keeping "none" (0) as none and never producing 0.
    fn update_complete(&mut self, update: impl FnOnce(u16) -> u16) {
        let csum = self.checksum();
        if csum != 0 {
            self.set_checksum(on_wire(update(csum)));
        }
    }

    /// Account in the checksum field for a pseudo-header address changing from `old` to `new`. A complete
    /// checksum of 0 (none) stays 0; a CHECKSUM_PARTIAL seed moves with the pseudo-header sum (see
    /// [`super::checksum`]).
    pub fn pseudo_header_addr_changed(&mut self, old: Ipv4Addr, new: Ipv4Addr, state: ChecksumState) {
        let (old, new) = (u32::from(old), u32::from(new));
        match state {
            ChecksumState::Complete => self.update_complete(|c| checksum::update_u32(c, old, new)),
            ChecksumState::Partial => {
                let seed = checksum::update_partial_u32(self.checksum(), old, new);
                self.set_checksum(seed);
            }
        }
    }

    /// Replace the source port; returns the old one. A complete checksum is updated (0 stays 0); a
    /// CHECKSUM_PARTIAL seed is left alone.
    pub fn rewrite_src_port(&mut self, new: u16, state: ChecksumState) -> u16 {
        let old = self.src_port();
        self.set_src_port(new);
        if state == ChecksumState::Complete {
            self.update_complete(|c| checksum::update_u16(c, old, new));
        }
        old
    }

    /// Replace the destination port; as [`rewrite_src_port`](Self::rewrite_src_port).
    pub fn rewrite_dst_port(&mut self, new: u16, state: ChecksumState) -> u16 {
        let old = self.dst_port();
        self.set_dst_port(new);
        if state == ChecksumState::Complete {
            self.update_complete(|c| checksum::update_u16(c, old, new));
        }
        old
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for UdpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::tests::Rng;
    use super::super::tests::lab_frame;
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

    /// Frame 13 of the capture: "udp-probe" from 10.1.0.1:34278 to 10.2.0.1:5353, checksum 0x2691.
    fn probe() -> [u8; 17] {
        let mut d = [0u8; 17];
        d.copy_from_slice(&lab_frame(13)[34..]);
        d
    }

    #[test]
    fn deconstruct_captured() {
        let d = probe();
        let udp = UdpPacket::new_checked(&d[..]).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (34278, 5353));
        assert_eq!(udp.len(), 17);
        assert_eq!(udp.checksum(), 0x2691);
        assert!(udp.checksum_present() && !udp.is_empty());
        assert_eq!(udp.payload(), b"udp-probe");
        assert!(udp.verify_checksum(A, B));
        assert!(!udp.verify_checksum(B, B));
    }

    #[test]
    fn construct() {
        let mut bytes = [0xa5u8; 17];
        let mut udp = UdpPacket::new_unchecked(&mut bytes[..]);
        udp.set_src_port(34278);
        udp.set_dst_port(5353);
        udp.set_len(17);
        udp.payload_mut().copy_from_slice(b"udp-probe");
        udp.fill_checksum(A, B);
        assert_eq!(bytes, probe());
    }

    #[test]
    fn padding_and_length() {
        // Trailing bytes past the length field are not payload.
        let mut d = [0u8; 24];
        d[..17].copy_from_slice(&probe());
        let udp = UdpPacket::new_checked(&d[..]).unwrap();
        assert_eq!(udp.payload(), b"udp-probe");
        assert!(udp.verify_checksum(A, B));
    }

    #[test]
    fn zero_checksum_means_none_and_stays_none() {
        let mut d = probe();
        let mut udp = UdpPacket::new_checked(&mut d[..]).unwrap();
        udp.set_checksum(0);
        assert!(udp.verify_checksum(A, B));
        udp.rewrite_dst_port(53, ChecksumState::Complete);
        udp.pseudo_header_addr_changed(B, Ipv4Addr::new(192, 0, 2, 1), ChecksumState::Complete);
        assert_eq!(udp.checksum(), 0);
    }

    #[test]
    fn computed_zero_is_sent_as_ffff() {
        // Find a payload whose checksum computes to 0: vary two payload bytes until it does.
        let mut d = [0u8; 10];
        let mut udp = UdpPacket::new_unchecked(&mut d[..]);
        udp.set_src_port(1);
        udp.set_dst_port(2);
        udp.set_len(10);
        let mut found = false;
        for x in 0..=u16::MAX {
            udp.payload_mut().copy_from_slice(&x.to_be_bytes());
            udp.set_checksum(0);
            let data = udp.datagram();
            let pseudo = checksum::pseudo_header_v4_wide(A, B, ip_protocol::UDP, data.len());
            if !checksum::sum_with(pseudo, data) == 0 {
                udp.fill_checksum(A, B);
                assert_eq!(udp.checksum(), 0xffff);
                assert!(udp.verify_checksum(A, B));
                // An incremental update that lands on 0 must also give 0xffff: change the port and back.
                udp.rewrite_src_port(7, ChecksumState::Complete);
                udp.rewrite_src_port(1, ChecksumState::Complete);
                assert_ne!(udp.checksum(), 0);
                assert!(udp.verify_checksum(A, B));
                found = true;
                break;
            }
        }
        assert!(found);
    }

    #[test]
    fn nat_rewrites() {
        let mut d = probe();
        let mut udp = UdpPacket::new_checked(&mut d[..]).unwrap();
        let real = Ipv4Addr::new(172, 16, 5, 9);
        udp.pseudo_header_addr_changed(B, real, ChecksumState::Complete);
        assert_eq!(udp.rewrite_dst_port(15353, ChecksumState::Complete), 5353);
        assert!(udp.verify_checksum(A, real));
        let incremental = udp.checksum();
        udp.fill_checksum(A, real);
        assert_eq!(udp.checksum(), incremental);
    }

    #[test]
    fn errors() {
        let d = probe();
        for len in 0..8 {
            assert_eq!(
                UdpPacket::new_checked(&d[..len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Udp, needed: 8, got: len }
            );
        }
        let err = UdpPacket::new_checked(&d[..16]).unwrap_err();
        assert_eq!(err, WireError::Truncated { layer: Layer::Udp, needed: 17, got: 16 });
        let mut bad = d;
        bad[4..6].copy_from_slice(&7u16.to_be_bytes());
        let err = UdpPacket::new_checked(&bad[..]).unwrap_err();
        assert_eq!(err, WireError::BadTotalLength { layer: Layer::Udp, len: 7, header: 8 });
        assert_eq!(err.reason(), "udp_bad_length");
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(5);
        let mut buf = [0u8; 200];
        for round in 0..50_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if len > 5 && round % 2 == 0 {
                buf[4..6].copy_from_slice(&(rng.below(len + 1) as u16).to_be_bytes());
            }
            if let Ok(mut udp) = UdpPacket::new_checked(&mut buf[..len]) {
                let _ = (udp.src_port(), udp.dst_port(), udp.len(), udp.checksum(), udp.payload());
                let _ = udp.verify_checksum(A, B);
                udp.rewrite_dst_port(1, ChecksumState::Complete);
                udp.fill_checksum(A, B);
            }
        }
    }
}
