//! Ethernet II frames (no FCS: AF_PACKET neither delivers nor expects it) and 802.1Q tag detection.

use std::fmt;

use super::error::{Layer, WireError};
use super::field::Field;

/// A six-octet Ethernet (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);
    pub const ZERO: EthernetAddress = EthernetAddress([0; 6]);

    /// The address in `bytes`, or `None` unless it is exactly six bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<EthernetAddress> {
        <[u8; 6]>::try_from(bytes).ok().map(EthernetAddress)
    }

    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// The group bit (I/G) is set: multicast, which includes broadcast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// The U/L bit is set: a locally administered address.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

/// An EtherType value (the Ethernet II type field, or a VLAN tag's TPID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EtherType(pub u16);

impl EtherType {
    pub const IPV4: EtherType = EtherType(0x0800);
    pub const ARP: EtherType = EtherType(0x0806);
    /// 802.1Q customer VLAN tag.
    pub const VLAN: EtherType = EtherType(0x8100);
    pub const IPV6: EtherType = EtherType(0x86dd);
    /// 802.1ad service VLAN tag (QinQ outer tag).
    pub const QINQ: EtherType = EtherType(0x88a8);
    /// The pre-standard QinQ TPID some switches still use.
    pub const QINQ_LEGACY: EtherType = EtherType(0x9100);

    /// This value, in the type position, announces a VLAN tag rather than a payload protocol.
    pub fn is_vlan_tpid(self) -> bool {
        matches!(self, EtherType::VLAN | EtherType::QINQ | EtherType::QINQ_LEGACY)
    }
}

impl fmt::Display for EtherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EtherType::IPV4 => f.write_str("IPv4"),
            EtherType::ARP => f.write_str("ARP"),
            EtherType::VLAN => f.write_str("802.1Q"),
            EtherType::IPV6 => f.write_str("IPv6"),
            EtherType::QINQ => f.write_str("802.1ad"),
            EtherType(other) => write!(f, "{other:#06x}"),
        }
    }
}

mod field {
    use super::Field;
    pub const DESTINATION: Field = 0..6;
    pub const SOURCE: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    pub const PAYLOAD: usize = 14;
    // With one VLAN tag: the TCI follows the TPID, then the inner EtherType.
    pub const VLAN_TCI: Field = 14..16;
    pub const VLAN_INNER_ETHERTYPE: Field = 16..18;
}

/// The Ethernet II header length.
pub const HEADER_LEN: usize = field::PAYLOAD;
/// The header length with one 802.1Q tag.
pub const VLAN_HEADER_LEN: usize = field::VLAN_INNER_ETHERTYPE.end;

/// One 802.1Q/802.1ad tag, as [`EthernetFrame::vlan_tag`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    /// The TPID in the EtherType position (0x8100, 0x88a8 or 0x9100).
    pub tpid: EtherType,
    /// Priority code point (3 bits).
    pub pcp: u8,
    /// Drop-eligible indicator.
    pub dei: bool,
    /// VLAN identifier (12 bits).
    pub vid: u16,
    /// The EtherType after the tag (another TPID for QinQ).
    pub inner: EtherType,
}

/// A read/write view of an Ethernet II frame.
///
/// Note on VLANs: an AF_PACKET socket normally receives frames with the VLAN tag already removed by the
/// NIC or the kernel (it is in the `tp_vlan_tci` of `PACKET_AUXDATA` / the TPACKET header instead), so the
/// data plane must check that metadata too; a tag in the frame itself shows up here as a TPID EtherType.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wrap a buffer without checking its length. Accessors panic if it is shorter than 14 bytes.
    pub fn new_unchecked(buffer: T) -> EthernetFrame<T> {
        EthernetFrame { buffer }
    }

    /// Wrap a buffer, checking that it holds the 14-byte header.
    pub fn new_checked(buffer: T) -> Result<EthernetFrame<T>, WireError> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Check that every accessor (except the [`vlan_tag`](Self::vlan_tag), which checks itself) is in bounds.
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::truncated(Layer::Ethernet, HEADER_LEN, len));
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst_addr(&self) -> EthernetAddress {
        let d = self.buffer.as_ref();
        EthernetAddress([d[0], d[1], d[2], d[3], d[4], d[5]])
    }

    pub fn src_addr(&self) -> EthernetAddress {
        let d = self.buffer.as_ref();
        EthernetAddress([d[6], d[7], d[8], d[9], d[10], d[11]])
    }

    /// The EtherType field (a TPID for a tagged frame).
    pub fn ethertype(&self) -> EtherType {
        let d = self.buffer.as_ref();
        EtherType(u16::from_be_bytes([d[field::ETHERTYPE.start], d[field::ETHERTYPE.start + 1]]))
    }

    pub fn is_vlan_tagged(&self) -> bool {
        self.ethertype().is_vlan_tpid()
    }

    /// The outer VLAN tag, `Ok(None)` for an untagged frame, or an error if the tag is cut short.
    pub fn vlan_tag(&self) -> Result<Option<VlanTag>, WireError> {
        let tpid = self.ethertype();
        if !tpid.is_vlan_tpid() {
            return Ok(None);
        }
        let d = self.buffer.as_ref();
        match d.get(field::VLAN_TCI.start..field::VLAN_INNER_ETHERTYPE.end) {
            Some(&[t0, t1, e0, e1]) => {
                let tci = u16::from_be_bytes([t0, t1]);
                Ok(Some(VlanTag {
                    tpid,
                    pcp: (tci >> 13) as u8,
                    dei: tci & 0x1000 != 0,
                    vid: tci & 0x0fff,
                    inner: EtherType(u16::from_be_bytes([e0, e1])),
                }))
            }
            _ => Err(WireError::truncated(Layer::Vlan, VLAN_HEADER_LEN, d.len())),
        }
    }

    pub fn header_len(&self) -> usize {
        HEADER_LEN
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> EthernetFrame<&'a T> {
    /// The bytes after the 14-byte header (for a tagged frame this starts with the TCI). This may include
    /// trailing padding up to the 60-byte minimum frame: bound it by the network-layer length.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_addr(&mut self, value: EthernetAddress) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&value.0)
    }

    pub fn set_src_addr(&mut self, value: EthernetAddress) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&value.0)
    }

    pub fn set_ethertype(&mut self, value: EtherType) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&value.0.to_be_bytes())
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for EthernetFrame<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// Write a 14-byte Ethernet II header at the start of `buf`.
pub(crate) fn emit_header(
    buf: &mut [u8],
    dst: EthernetAddress,
    src: EthernetAddress,
    ethertype: EtherType,
) -> Result<(), WireError> {
    match buf.get_mut(..HEADER_LEN) {
        Some(header) => {
            let mut frame = EthernetFrame::new_unchecked(header);
            frame.set_dst_addr(dst);
            frame.set_src_addr(src);
            frame.set_ethertype(ethertype);
            Ok(())
        }
        None => Err(WireError::BufferTooSmall { needed: HEADER_LEN, got: buf.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::tests::Rng;
    use super::*;

    // The first frame of testdata/veth-lab.pcap: the ARP request 10.1.0.1 sent for 10.1.0.2.
    static ARP_FRAME: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x0a, 0x01, 0x08, 0x06, 0x00, 0x01, 0x08, 0x00,
        0x06, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x0a, 0x01, 0x0a, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x0a, 0x01, 0x00, 0x02,
    ];

    #[test]
    fn deconstruct() {
        let frame = EthernetFrame::new_checked(&ARP_FRAME[..]).unwrap();
        assert_eq!(frame.dst_addr(), EthernetAddress::BROADCAST);
        assert!(frame.dst_addr().is_broadcast() && frame.dst_addr().is_multicast());
        assert_eq!(frame.src_addr(), EthernetAddress([2, 0, 0, 0, 0x0a, 1]));
        assert!(frame.src_addr().is_unicast() && frame.src_addr().is_local());
        assert_eq!(frame.ethertype(), EtherType::ARP);
        assert!(!frame.is_vlan_tagged());
        assert_eq!(frame.vlan_tag(), Ok(None));
        assert_eq!(frame.payload(), &ARP_FRAME[14..]);
        assert_eq!(frame.src_addr().to_string(), "02:00:00:00:0a:01");
        assert_eq!(EtherType::IPV4.to_string(), "IPv4");
        assert_eq!(EtherType(0x88cc).to_string(), "0x88cc");
    }

    #[test]
    fn construct() {
        let mut bytes = [0xa5u8; 42];
        let mut frame = EthernetFrame::new_unchecked(&mut bytes[..]);
        frame.set_dst_addr(EthernetAddress::BROADCAST);
        frame.set_src_addr(EthernetAddress([2, 0, 0, 0, 0x0a, 1]));
        frame.set_ethertype(EtherType::ARP);
        frame.payload_mut().copy_from_slice(&ARP_FRAME[14..]);
        assert_eq!(bytes, ARP_FRAME);

        let mut header = [0xa5u8; 14];
        emit_header(&mut header, EthernetAddress::BROADCAST, EthernetAddress([2, 0, 0, 0, 0x0a, 1]), EtherType::ARP)
            .unwrap();
        assert_eq!(header, ARP_FRAME[..14]);
        assert_eq!(
            emit_header(&mut header[..13], EthernetAddress::ZERO, EthernetAddress::ZERO, EtherType::ARP),
            Err(WireError::BufferTooSmall { needed: 14, got: 13 })
        );
    }

    #[test]
    fn vlan_tag() {
        // The ARP frame with an 802.1Q tag (PCP 5, DEI 0, VID 10) inserted after the addresses.
        let mut tagged = [0u8; 46];
        tagged[..12].copy_from_slice(&ARP_FRAME[..12]);
        tagged[12..16].copy_from_slice(&[0x81, 0x00, 0xa0, 0x0a]);
        tagged[16..].copy_from_slice(&ARP_FRAME[12..]);
        let frame = EthernetFrame::new_checked(&tagged[..]).unwrap();
        assert!(frame.is_vlan_tagged());
        assert_eq!(
            frame.vlan_tag(),
            Ok(Some(VlanTag { tpid: EtherType::VLAN, pcp: 5, dei: false, vid: 10, inner: EtherType::ARP }))
        );
        let short = EthernetFrame::new_checked(&tagged[..17]).unwrap();
        assert_eq!(short.vlan_tag(), Err(WireError::Truncated { layer: Layer::Vlan, needed: 18, got: 17 }));
    }

    #[test]
    fn truncated() {
        for len in 0..14 {
            assert_eq!(
                EthernetFrame::new_checked(&ARP_FRAME[..len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Ethernet, needed: 14, got: len }
            );
        }
        assert_eq!(EthernetFrame::new_checked(&ARP_FRAME[..14]).unwrap().payload(), &[] as &[u8]);
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(1);
        let mut buf = [0u8; 200];
        for round in 0..20_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if round % 3 == 0 && len >= 14 {
                buf[12..14].copy_from_slice(&[0x81, 0x00]);
            }
            if let Ok(frame) = EthernetFrame::new_checked(&buf[..len]) {
                let _ = (frame.dst_addr(), frame.src_addr(), frame.ethertype(), frame.vlan_tag(), frame.payload());
            }
        }
    }

    #[test]
    fn address_from_slice() {
        assert_eq!(EthernetAddress::from_slice(&[1, 2, 3, 4, 5, 6]), Some(EthernetAddress([1, 2, 3, 4, 5, 6])));
        assert_eq!(EthernetAddress::from_slice(&[1, 2, 3]), None);
        assert!(EthernetAddress::ZERO.is_zero());
    }
}
