//! ARP (RFC 826) for Ethernet hardware addresses and IPv4 protocol addresses, and the two frames the
//! director sends: replies for its virtual addresses and gratuitous announcements when it takes them over.

use std::fmt;
use std::net::Ipv4Addr;

use super::error::{Layer, WireError};
use super::ethernet::{self, EtherType, EthernetAddress};
use super::field::Field;

/// The ARP operation field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpOperation(pub u16);

impl ArpOperation {
    pub const REQUEST: ArpOperation = ArpOperation(1);
    pub const REPLY: ArpOperation = ArpOperation(2);
}

impl fmt::Display for ArpOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ArpOperation::REQUEST => f.write_str("request"),
            ArpOperation::REPLY => f.write_str("reply"),
            ArpOperation(other) => write!(f, "op {other}"),
        }
    }
}

mod field {
    use super::Field;
    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

/// The length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = field::TPA.end;
/// The length of the frames [`emit_reply`] and [`emit_gratuitous`] write (the NIC pads them to 60 bytes).
pub const FRAME_LEN: usize = ethernet::HEADER_LEN + PACKET_LEN;

const HARDWARE_ETHERNET: u16 = 1;

/// A read/write view of an Ethernet/IPv4 ARP packet (the bytes after the Ethernet header).
///
/// The field layout is fixed for Ethernet/IPv4 ARP; [`check_len`](Self::check_len) only makes the accessors
/// safe, [`check_ethernet_ipv4`](Self::check_ethernet_ipv4) checks that the layout applies.
#[derive(Debug, Clone)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(d: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([d[f.start], d[f.start + 1]])
}

fn ipv4_at(d: &[u8], f: Field) -> Ipv4Addr {
    Ipv4Addr::new(d[f.start], d[f.start + 1], d[f.start + 2], d[f.start + 3])
}

fn mac_at(d: &[u8], f: Field) -> EthernetAddress {
    let s = f.start;
    EthernetAddress([d[s], d[s + 1], d[s + 2], d[s + 3], d[s + 4], d[s + 5]])
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Wrap a buffer without checking it. Accessors panic if it is shorter than 28 bytes.
    pub fn new_unchecked(buffer: T) -> ArpPacket<T> {
        ArpPacket { buffer }
    }

    /// Wrap a buffer, checking its length (only; see [`check_ethernet_ipv4`](Self::check_ethernet_ipv4)).
    pub fn new_checked(buffer: T) -> Result<ArpPacket<T>, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < PACKET_LEN {
            return Err(WireError::truncated(Layer::Arp, PACKET_LEN, len));
        }
        Ok(())
    }

    /// Check the hardware/protocol types and lengths say Ethernet/IPv4 (1/0x0800/6/4).
    pub fn check_ethernet_ipv4(&self) -> Result<(), WireError> {
        let (hardware, protocol, hlen, plen) =
            (self.hardware_type(), self.protocol_type(), self.hardware_len(), self.protocol_len());
        if hardware != HARDWARE_ETHERNET || protocol != EtherType::IPV4 || hlen != 6 || plen != 4 {
            return Err(WireError::ArpNotEthernetIpv4 { hardware, protocol: protocol.0, hlen, plen });
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn hardware_type(&self) -> u16 {
        be16(self.buffer.as_ref(), field::HTYPE)
    }

    pub fn protocol_type(&self) -> EtherType {
        EtherType(be16(self.buffer.as_ref(), field::PTYPE))
    }

    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }

    pub fn operation(&self) -> ArpOperation {
        ArpOperation(be16(self.buffer.as_ref(), field::OPER))
    }

    pub fn sender_hardware_addr(&self) -> EthernetAddress {
        mac_at(self.buffer.as_ref(), field::SHA)
    }

    pub fn sender_protocol_addr(&self) -> Ipv4Addr {
        ipv4_at(self.buffer.as_ref(), field::SPA)
    }

    pub fn target_hardware_addr(&self) -> EthernetAddress {
        mac_at(self.buffer.as_ref(), field::THA)
    }

    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        ipv4_at(self.buffer.as_ref(), field::TPA)
    }

    /// A gratuitous ARP (request or reply): sender and target protocol addresses are equal.
    pub fn is_gratuitous(&self) -> bool {
        self.sender_protocol_addr() == self.target_protocol_addr()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    pub fn set_hardware_type(&mut self, value: u16) {
        self.buffer.as_mut()[field::HTYPE].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_protocol_type(&mut self, value: EtherType) {
        self.buffer.as_mut()[field::PTYPE].copy_from_slice(&value.0.to_be_bytes())
    }

    pub fn set_hardware_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::HLEN] = value
    }

    pub fn set_protocol_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::PLEN] = value
    }

    pub fn set_operation(&mut self, value: ArpOperation) {
        self.buffer.as_mut()[field::OPER].copy_from_slice(&value.0.to_be_bytes())
    }

    pub fn set_sender_hardware_addr(&mut self, value: EthernetAddress) {
        self.buffer.as_mut()[field::SHA].copy_from_slice(&value.0)
    }

    pub fn set_sender_protocol_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::SPA].copy_from_slice(&value.octets())
    }

    pub fn set_target_hardware_addr(&mut self, value: EthernetAddress) {
        self.buffer.as_mut()[field::THA].copy_from_slice(&value.0)
    }

    pub fn set_target_protocol_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::TPA].copy_from_slice(&value.octets())
    }

    /// Write the fixed Ethernet/IPv4 header fields and an operation.
    fn set_ethernet_ipv4(&mut self, operation: ArpOperation) {
        self.set_hardware_type(HARDWARE_ETHERNET);
        self.set_protocol_type(EtherType::IPV4);
        self.set_hardware_len(6);
        self.set_protocol_len(4);
        self.set_operation(operation);
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for ArpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The target hardware address a gratuitous ARP request carries. Receivers ignore it; senders differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GarpTarget {
    /// 00:00:00:00:00:00, as the Linux kernel's own announcements (`arp_notify`, `arp_send` with no target
    /// hardware address) fill it.
    Zero,
    /// ff:ff:ff:ff:ff:ff, as keepalived and `arping -U` fill it.
    Broadcast,
}

fn frame_buffer(buf: &mut [u8]) -> Result<&mut [u8], WireError> {
    let got = buf.len();
    buf.get_mut(..FRAME_LEN).ok_or(WireError::BufferTooSmall { needed: FRAME_LEN, got })
}

/// Write into `buf` a complete Ethernet frame carrying the ARP reply "`our_ip` is at `our_mac`", addressed to
/// `to_mac` / `to_ip` (the request's sender), and return its length ([`FRAME_LEN`], 42 bytes; the NIC pads it).
pub fn emit_reply(
    buf: &mut [u8],
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    to_mac: EthernetAddress,
    to_ip: Ipv4Addr,
) -> Result<usize, WireError> {
    let frame = frame_buffer(buf)?;
    ethernet::emit_header(frame, to_mac, our_mac, EtherType::ARP)?;
    let mut arp = ArpPacket::new_unchecked(&mut frame[ethernet::HEADER_LEN..]);
    arp.set_ethernet_ipv4(ArpOperation::REPLY);
    arp.set_sender_hardware_addr(our_mac);
    arp.set_sender_protocol_addr(our_ip);
    arp.set_target_hardware_addr(to_mac);
    arp.set_target_protocol_addr(to_ip);
    Ok(FRAME_LEN)
}

/// Write into `buf` a request-style gratuitous ARP for `ip` at `our_mac` — broadcast, operation request,
/// sender and target protocol address both `ip` — and return its length ([`FRAME_LEN`]).
pub fn emit_gratuitous(
    buf: &mut [u8],
    our_mac: EthernetAddress,
    ip: Ipv4Addr,
    target: GarpTarget,
) -> Result<usize, WireError> {
    let target_mac = match target {
        GarpTarget::Zero => EthernetAddress::ZERO,
        GarpTarget::Broadcast => EthernetAddress::BROADCAST,
    };
    emit_broadcast_request(buf, our_mac, ip, target_mac, ip)
}

/// Write into `buf` a broadcast ARP request "who has `target_ip`? tell `our_ip`" and return its length: how
/// the director resolves a real server's MAC itself.
pub fn emit_request(
    buf: &mut [u8],
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) -> Result<usize, WireError> {
    emit_broadcast_request(buf, our_mac, our_ip, EthernetAddress::ZERO, target_ip)
}

/// A broadcast ARP request frame: what a gratuitous ARP and a resolution request have in common.
fn emit_broadcast_request(
    buf: &mut [u8],
    our_mac: EthernetAddress,
    sender_ip: Ipv4Addr,
    target_mac: EthernetAddress,
    target_ip: Ipv4Addr,
) -> Result<usize, WireError> {
    let frame = frame_buffer(buf)?;
    ethernet::emit_header(frame, EthernetAddress::BROADCAST, our_mac, EtherType::ARP)?;
    let mut arp = ArpPacket::new_unchecked(&mut frame[ethernet::HEADER_LEN..]);
    arp.set_ethernet_ipv4(ArpOperation::REQUEST);
    arp.set_sender_hardware_addr(our_mac);
    arp.set_sender_protocol_addr(sender_ip);
    arp.set_target_hardware_addr(target_mac);
    arp.set_target_protocol_addr(target_ip);
    Ok(FRAME_LEN)
}

#[cfg(test)]
mod tests {
    use super::super::checksum::tests::Rng;
    use super::super::tests::lab_frame;
    use super::*;

    const A_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0x0a, 1]);
    const R_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0x0a, 2]);
    const A_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const R_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

    #[test]
    fn deconstruct_captured_request() {
        // Frame 1 of the capture: Linux asking for 10.1.0.2 (target hardware address zero).
        let frame = lab_frame(1);
        let arp = ArpPacket::new_checked(&frame[14..]).unwrap();
        arp.check_ethernet_ipv4().unwrap();
        assert_eq!(arp.hardware_type(), 1);
        assert_eq!(arp.protocol_type(), EtherType::IPV4);
        assert_eq!((arp.hardware_len(), arp.protocol_len()), (6, 4));
        assert_eq!(arp.operation(), ArpOperation::REQUEST);
        assert_eq!(arp.sender_hardware_addr(), A_MAC);
        assert_eq!(arp.sender_protocol_addr(), A_IP);
        assert_eq!(arp.target_hardware_addr(), EthernetAddress::ZERO);
        assert_eq!(arp.target_protocol_addr(), R_IP);
        assert!(!arp.is_gratuitous());
        assert_eq!(arp.operation().to_string(), "request");
    }

    #[test]
    fn reply_matches_the_kernels() {
        // Frame 2 of the capture is the Linux neighbour's reply to frame 1; ours must be byte-identical.
        let mut buf = [0xa5u8; 64];
        let len = emit_reply(&mut buf, R_MAC, R_IP, A_MAC, A_IP).unwrap();
        assert_eq!(len, 42);
        assert_eq!(&buf[..len], lab_frame(2));
        assert!(buf[len..].iter().all(|&b| b == 0xa5), "wrote past the frame");
    }

    #[test]
    fn gratuitous_matches_arping_and_the_kernel_layout() {
        // Frame 23 of the capture is `arping -U` (keepalived's layout: target hardware address broadcast).
        let mut buf = [0xa5u8; 42];
        assert_eq!(emit_gratuitous(&mut buf, A_MAC, A_IP, GarpTarget::Broadcast), Ok(42));
        assert_eq!(&buf[..], lab_frame(23));
        let arp = ArpPacket::new_checked(&buf[14..]).unwrap();
        assert!(arp.is_gratuitous());

        let mut buf = [0xa5u8; 42];
        emit_gratuitous(&mut buf, A_MAC, A_IP, GarpTarget::Zero).unwrap();
        let mut expected = [0u8; 42];
        expected.copy_from_slice(lab_frame(23));
        expected[32..38].fill(0);
        assert_eq!(buf, expected);
    }

    #[test]
    fn construct_field_by_field() {
        let mut bytes = [0xa5u8; 28];
        let mut arp = ArpPacket::new_unchecked(&mut bytes[..]);
        arp.set_hardware_type(1);
        arp.set_protocol_type(EtherType::IPV4);
        arp.set_hardware_len(6);
        arp.set_protocol_len(4);
        arp.set_operation(ArpOperation::REQUEST);
        arp.set_sender_hardware_addr(A_MAC);
        arp.set_sender_protocol_addr(A_IP);
        arp.set_target_hardware_addr(EthernetAddress::ZERO);
        arp.set_target_protocol_addr(R_IP);
        assert_eq!(&bytes[..], &lab_frame(1)[14..]);
    }

    #[test]
    fn errors() {
        let frame = lab_frame(1);
        for len in 0..28 {
            assert_eq!(
                ArpPacket::new_checked(&frame[14..14 + len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Arp, needed: 28, got: len }
            );
        }
        let mut bytes = [0u8; 28];
        bytes.copy_from_slice(&frame[14..]);
        bytes[0..2].copy_from_slice(&6u16.to_be_bytes()); // IEEE 802 hardware
        let err = ArpPacket::new_checked(&bytes[..]).unwrap().check_ethernet_ipv4().unwrap_err();
        assert_eq!(err, WireError::ArpNotEthernetIpv4 { hardware: 6, protocol: 0x0800, hlen: 6, plen: 4 });
        assert_eq!(err.reason(), "arp_not_ethernet_ipv4");

        let mut small = [0u8; 41];
        assert_eq!(
            emit_reply(&mut small, R_MAC, R_IP, A_MAC, A_IP),
            Err(WireError::BufferTooSmall { needed: 42, got: 41 })
        );
        assert_eq!(
            emit_gratuitous(&mut small, R_MAC, R_IP, GarpTarget::Zero),
            Err(WireError::BufferTooSmall { needed: 42, got: 41 })
        );
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(2);
        let mut buf = [0u8; 200];
        for round in 0..20_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if let Ok(arp) = ArpPacket::new_checked(&buf[..len]) {
                let _ = arp.check_ethernet_ipv4();
                let _ = (arp.operation(), arp.sender_hardware_addr(), arp.sender_protocol_addr());
                let _ = (arp.target_hardware_addr(), arp.target_protocol_addr(), arp.is_gratuitous());
            }
        }
    }
}
