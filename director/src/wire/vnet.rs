//! The `virtio_net_hdr` that an AF_PACKET socket with `PACKET_VNET_HDR` puts in front of every frame it
//! reads and expects in front of every frame it sends (`struct virtio_net_hdr`, linux/virtio_net.h):
//!
//! ```text
//! offset 0  flags        u8   NEEDS_CSUM (1), DATA_VALID (2)
//!        1  gso_type     u8   NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5, | ECN 0x80
//!        2  hdr_len      u16  GSO: length of the headers copied into every segment (link layer included)
//!        4  gso_size     u16  GSO: payload bytes per segment (the MSS for TCP)
//!        6  csum_start   u16  NEEDS_CSUM: where checksumming starts, from the start of the Ethernet frame
//!        8  csum_offset  u16  NEEDS_CSUM: where the checksum goes, from csum_start (16 TCP, 6 UDP)
//! ```
//!
//! The 16-bit fields are in the host's byte order for AF_PACKET (the kernel uses the legacy, native-endian
//! virtio layout there: little-endian on x86-64 and arm64). The header is 10 bytes: AF_PACKET never uses the
//! 12-byte `virtio_net_hdr_mrg_rxbuf` form unless a recent kernel is asked to with `PACKET_VNET_HDR_SZ`.
//!
//! `NEEDS_CSUM` means the frame is in CHECKSUM_PARTIAL state: the transport checksum field holds only the
//! pseudo-header seed (see [`super::checksum`]); [`complete_checksum`] finishes it in software. On receive,
//! `DATA_VALID` means the checksum was already verified (CHECKSUM_UNNECESSARY). A `gso_type` other than
//! NONE marks a TSO/GSO super-frame (up to 64 KiB) that the kernel or NIC cuts into `gso_size` segments on
//! transmit.
//!
//! # Adding an outer header (the IP-in-IP tunnel mode)
//!
//! Inserting a 20-byte outer IPv4 header after the Ethernet header moves the inner transport header 20 bytes
//! further from the frame start: `csum_start` and (for GSO) `hdr_len` must grow by 20
//! ([`VnetHeader::shift_for_outer_header`]). That is enough for a single packet with `NEEDS_CSUM`. It is
//! *not* enough for a GSO super-frame: segmenting an IPIP packet needs the kernel's `SKB_GSO_IPXIP4` flag,
//! which `virtio_net_hdr` cannot express (its gso types describe only the outermost L3/L4), so the kernel
//! would drop the frame. The tunnel mode must therefore never transmit a GSO super-frame: it either
//! segments the frame itself or refuses it (and keeps GSO/GRO from producing them on the receive side),
//! and it completes checksums with [`complete_checksum`] (or shifts `csum_start`) on single packets.

use super::checksum::{self, ChecksumState};
use super::error::{Layer, WireError};
use super::field::Field;

/// The length of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;

/// `flags` bits.
pub mod vnet_flags {
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum to be completed from `csum_start`, stored at `csum_offset`.
    pub const NEEDS_CSUM: u8 = 1;
    /// VIRTIO_NET_HDR_F_DATA_VALID: checksum already verified (receive only).
    pub const DATA_VALID: u8 = 2;
    /// VIRTIO_NET_HDR_F_RSC_INFO (not produced by AF_PACKET).
    pub const RSC_INFO: u8 = 4;
}

/// `gso_type` values.
pub mod gso_type {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    /// UFO (UDP fragmentation offload; obsolete).
    pub const UDP: u8 = 3;
    pub const TCPV6: u8 = 4;
    /// USO (UDP segmentation offload, `UDP_SEGMENT`).
    pub const UDP_L4: u8 = 5;
    /// Flag: the TCP flow uses ECN (segments after the first must clear CWR).
    pub const ECN: u8 = 0x80;
}

mod field {
    use super::Field;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Field = 2..4;
    pub const GSO_SIZE: Field = 4..6;
    pub const CSUM_START: Field = 6..8;
    pub const CSUM_OFFSET: Field = 8..10;
}

/// A read/write view of a `virtio_net_hdr`. [`check_len`](Self::check_len) guarantees its 10 bytes.
#[derive(Debug, Clone)]
pub struct VnetHeader<T: AsRef<[u8]>> {
    buffer: T,
}

fn ne16(d: &[u8], f: Field) -> u16 {
    u16::from_ne_bytes([d[f.start], d[f.start + 1]])
}

impl<T: AsRef<[u8]>> VnetHeader<T> {
    /// Wrap a buffer without checking it. Accessors panic if it is shorter than 10 bytes.
    pub fn new_unchecked(buffer: T) -> VnetHeader<T> {
        VnetHeader { buffer }
    }

    /// Wrap a buffer (the header, or the header followed by the frame) and check it holds the header.
    pub fn new_checked(buffer: T) -> Result<VnetHeader<T>, WireError> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < VNET_HDR_LEN {
            return Err(WireError::truncated(Layer::Vnet, VNET_HDR_LEN, len));
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The raw `gso_type`, ECN bit included.
    pub fn gso_type(&self) -> u8 {
        self.buffer.as_ref()[field::GSO_TYPE]
    }

    /// The `gso_type` without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type() & !gso_type::ECN
    }

    pub fn gso_ecn(&self) -> bool {
        self.gso_type() & gso_type::ECN != 0
    }

    /// A GSO super-frame rather than one packet.
    pub fn is_gso(&self) -> bool {
        self.gso_kind() != gso_type::NONE
    }

    pub fn hdr_len(&self) -> u16 {
        ne16(self.buffer.as_ref(), field::HDR_LEN)
    }

    pub fn gso_size(&self) -> u16 {
        ne16(self.buffer.as_ref(), field::GSO_SIZE)
    }

    pub fn csum_start(&self) -> u16 {
        ne16(self.buffer.as_ref(), field::CSUM_START)
    }

    pub fn csum_offset(&self) -> u16 {
        ne16(self.buffer.as_ref(), field::CSUM_OFFSET)
    }

    pub fn needs_csum(&self) -> bool {
        self.flags() & vnet_flags::NEEDS_CSUM != 0
    }

    pub fn data_valid(&self) -> bool {
        self.flags() & vnet_flags::DATA_VALID != 0
    }

    /// What the frame's TCP/UDP checksum field holds: a CHECKSUM_PARTIAL seed when `NEEDS_CSUM` is set.
    pub fn checksum_state(&self) -> ChecksumState {
        if self.needs_csum() {
            ChecksumState::Partial
        } else {
            ChecksumState::Complete
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VnetHeader<T> {
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value
    }

    pub fn set_gso_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::GSO_TYPE] = value
    }

    pub fn set_hdr_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::HDR_LEN].copy_from_slice(&value.to_ne_bytes())
    }

    pub fn set_gso_size(&mut self, value: u16) {
        self.buffer.as_mut()[field::GSO_SIZE].copy_from_slice(&value.to_ne_bytes())
    }

    pub fn set_csum_start(&mut self, value: u16) {
        self.buffer.as_mut()[field::CSUM_START].copy_from_slice(&value.to_ne_bytes())
    }

    pub fn set_csum_offset(&mut self, value: u16) {
        self.buffer.as_mut()[field::CSUM_OFFSET].copy_from_slice(&value.to_ne_bytes())
    }

    /// Zero the whole header: a complete, non-GSO frame (what to send after [`complete_checksum`]).
    pub fn clear(&mut self) {
        self.buffer.as_mut()[..VNET_HDR_LEN].fill(0)
    }

    /// Account for `added` bytes of header inserted between the Ethernet header and the packet (20 for an
    /// outer IPv4 header): `csum_start` moves if `NEEDS_CSUM` is set, `hdr_len` if it is non-zero. Fails
    /// (changing nothing) if either would overflow 16 bits. GSO super-frames cannot be tunnelled this way
    /// (see the module documentation).
    pub fn shift_for_outer_header(&mut self, added: u16) -> Result<(), WireError> {
        let shift = |value: u16| {
            value.checked_add(added).ok_or(WireError::BufferTooSmall {
                needed: usize::from(value) + usize::from(added),
                got: usize::from(u16::MAX),
            })
        };
        let start = if self.needs_csum() { Some(shift(self.csum_start())?) } else { None };
        let hdr_len = if self.hdr_len() != 0 { Some(shift(self.hdr_len())?) } else { None };
        if let Some(start) = start {
            self.set_csum_start(start);
        }
        if let Some(hdr_len) = hdr_len {
            self.set_hdr_len(hdr_len);
        }
        Ok(())
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for VnetHeader<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// Finish the transport checksum of a `NEEDS_CSUM` frame in software, as the kernel's `skb_checksum_help`
/// does: fold the bytes from `csum_start` to the end of `frame` (the checksum field already holds the
/// pseudo-header seed, so it is part of that sum) and store the inverted result at
/// `csum_start + csum_offset` (0 stored as 0xffff, which verifies alike and keeps UDP's "no checksum"
/// meaning out of the way).
///
/// `frame` must be exactly the Ethernet frame the header describes (no trailing bytes). Does nothing
/// without `NEEDS_CSUM`. Afterwards the caller clears `NEEDS_CSUM` (e.g. [`VnetHeader::clear`]) before
/// sending. Fails, changing nothing, for a GSO super-frame ([`WireError::VnetGso`]: its checksums exist
/// only per segment) and for offsets that leave no room for the field inside the frame.
pub fn complete_checksum<T: AsRef<[u8]>>(frame: &mut [u8], vnet: &VnetHeader<T>) -> Result<(), WireError> {
    if !vnet.needs_csum() {
        return Ok(());
    }
    if vnet.is_gso() {
        return Err(WireError::VnetGso { gso_type: vnet.gso_type() });
    }
    let start = usize::from(vnet.csum_start());
    let offset = usize::from(vnet.csum_offset());
    let at = start + offset;
    let bad = WireError::VnetBadChecksumOffsets { start, offset, len: frame.len() };
    if at + 2 > frame.len() {
        return Err(bad);
    }
    let sum = checksum::data(frame.get(start..).ok_or(bad)?);
    let csum = match !sum {
        0 => 0xffff,
        c => c,
    };
    frame.get_mut(at..at + 2).ok_or(bad)?.copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::checksum::tests::Rng;
    use super::super::ipv4::ip_protocol;
    use super::super::tests::vnet_frames;
    use super::super::{Ipv4Packet, TcpPacket, UdpPacket};
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

    /// The (header, frame) of captured record `i` (0-based).
    fn record(i: usize) -> (Vec<u8>, Vec<u8>) {
        let mut bytes = vnet_frames()[i].clone();
        let frame = bytes.split_off(VNET_HDR_LEN);
        (bytes, frame)
    }

    #[test]
    fn captured_headers() {
        let expect = [
            // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, frame length
            (1, 0, 0, 0, 34, 6, 53),
            (0, 0, 0, 0, 0, 0, 81),
            (1, 0, 0, 0, 34, 16, 74),
            (1, 0, 0, 0, 34, 16, 66),
            (1, 1, 66, 948, 34, 16, 4806),
        ];
        for (i, &(flags, gso, hdr_len, gso_size, start, offset, len)) in expect.iter().enumerate() {
            let (hdr, frame) = record(i);
            let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
            assert_eq!(
                (vnet.flags(), vnet.gso_type(), vnet.hdr_len(), vnet.gso_size(), vnet.csum_start(), vnet.csum_offset()),
                (flags, gso, hdr_len, gso_size, start, offset),
                "record {i}"
            );
            assert_eq!(frame.len(), len);
            assert_eq!(vnet.needs_csum(), flags == 1);
            assert_eq!(vnet.is_gso(), gso != 0);
            assert!(!vnet.data_valid() && !vnet.gso_ecn());
        }
        let (hdr, _) = record(4);
        let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
        assert_eq!(vnet.gso_kind(), gso_type::TCPV4);
        assert_eq!(vnet.checksum_state(), ChecksumState::Partial);
    }

    #[test]
    fn captured_partial_fields_hold_the_pseudo_header_seed() {
        for i in [0, 2, 3, 4] {
            let (hdr, frame) = record(i);
            let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
            let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
            let at = usize::from(vnet.csum_start() + vnet.csum_offset());
            let field = u16::from_be_bytes([frame[at], frame[at + 1]]);
            assert_eq!(field, ip.pseudo_header_sum(), "record {i}");
        }
    }

    #[test]
    fn complete_captured_partial_frames() {
        // The SYN: tcpdump reported "cksum 0x1433 (incorrect -> 0x0474)".
        let (hdr, mut frame) = record(2);
        let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
        complete_checksum(&mut frame, &vnet).unwrap();
        assert_eq!(&frame[50..52], &[0x04, 0x74]);
        assert!(TcpPacket::new_checked(&frame[34..]).unwrap().verify_checksum(A, B));

        let (hdr, mut frame) = record(0);
        let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
        complete_checksum(&mut frame, &vnet).unwrap();
        let udp = UdpPacket::new_checked(&frame[34..]).unwrap();
        assert_eq!(udp.payload(), b"udp-partial");
        assert!(udp.checksum_present() && udp.verify_checksum(A, B));

        // No NEEDS_CSUM: nothing to do.
        let (hdr, mut frame) = record(1);
        let before = frame.clone();
        complete_checksum(&mut frame, &VnetHeader::new_checked(&hdr[..]).unwrap()).unwrap();
        assert_eq!(frame, before);

        // GSO: refused, untouched.
        let (hdr, mut frame) = record(4);
        let before = frame.clone();
        let err = complete_checksum(&mut frame, &VnetHeader::new_checked(&hdr[..]).unwrap()).unwrap_err();
        assert_eq!(err, WireError::VnetGso { gso_type: 1 });
        assert_eq!(err.reason(), "vnet_gso_frame");
        assert_eq!(frame, before);
    }

    /// NAT the captured partial SYN (destination 10.2.0.1:8081 -> `real`:80, MSS clamped) in the state it was
    /// captured in, with `state` as the checksum convention, then complete it like the device would.
    fn nat_partial_syn(state: ChecksumState, real: Ipv4Addr) -> Vec<u8> {
        let (hdr, mut frame) = record(2);
        let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
        {
            let (_, l3) = frame.split_at_mut(14);
            let mut ip = Ipv4Packet::new_checked(&mut l3[..]).unwrap();
            let old = ip.rewrite_dst_addr(real);
            let mut tcp = TcpPacket::new_checked(ip.payload_mut()).unwrap();
            tcp.pseudo_header_addr_changed(old, real, state);
            tcp.rewrite_dst_port(80, state);
            assert_eq!(tcp.clamp_mss(900, state), Ok(Some(960)));
        }
        complete_checksum(&mut frame, &vnet).unwrap();
        frame
    }

    #[test]
    fn nat_on_a_partial_frame_needs_the_partial_update() {
        let real = Ipv4Addr::new(172, 16, 0, 9);
        let frame = nat_partial_syn(ChecksumState::Partial, real);
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum());
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((tcp.dst_port(), tcp.mss_option()), (80, Ok(Some(900))));
        assert!(tcp.verify_checksum(A, real));

        // Treating the seed as a complete checksum corrupts it.
        let frame = nat_partial_syn(ChecksumState::Complete, real);
        let tcp = TcpPacket::new_checked(&frame[34..]).unwrap();
        assert!(!tcp.verify_checksum(A, real));
    }

    #[test]
    fn ipip_encapsulation_shifts_csum_start() {
        let (hdr, frame) = record(2);
        let mut hdr_bytes = [0u8; VNET_HDR_LEN];
        hdr_bytes.copy_from_slice(&hdr);
        let mut vnet = VnetHeader::new_unchecked(&mut hdr_bytes[..]);
        vnet.shift_for_outer_header(20).unwrap();
        assert_eq!((vnet.csum_start(), vnet.csum_offset(), vnet.hdr_len()), (54, 16, 0));

        // Ethernet | outer IPv4 (proto 4) | the original packet.
        let mut tunnelled = vec![0u8; frame.len() + 20];
        tunnelled[..14].copy_from_slice(&frame[..14]);
        tunnelled[34..].copy_from_slice(&frame[14..]);
        let mut outer = Ipv4Packet::new_unchecked(&mut tunnelled[14..]);
        outer.set_version(4);
        outer.set_header_len(20);
        outer.set_total_len((frame.len() - 14 + 20) as u16);
        outer.set_ttl(64);
        outer.set_protocol(ip_protocol::IPIP);
        outer.set_src_addr(Ipv4Addr::new(192, 0, 2, 1));
        outer.set_dst_addr(Ipv4Addr::new(192, 0, 2, 2));
        outer.fill_checksum();
        complete_checksum(&mut tunnelled, &vnet).unwrap();
        let inner = Ipv4Packet::new_checked(&tunnelled[34..]).unwrap();
        assert!(TcpPacket::new_checked(inner.payload()).unwrap().verify_checksum(A, B));

        // GSO: hdr_len moves too.
        let (hdr, _) = record(4);
        hdr_bytes.copy_from_slice(&hdr);
        let mut vnet = VnetHeader::new_unchecked(&mut hdr_bytes[..]);
        vnet.shift_for_outer_header(20).unwrap();
        assert_eq!((vnet.csum_start(), vnet.hdr_len(), vnet.gso_size()), (54, 86, 948));
        vnet.set_csum_start(u16::MAX - 10);
        assert!(vnet.shift_for_outer_header(20).is_err());
        assert_eq!((vnet.csum_start(), vnet.hdr_len()), (u16::MAX - 10, 86));
    }

    #[test]
    fn construct() {
        let (hdr, _) = record(4);
        let mut bytes = [0xa5u8; VNET_HDR_LEN];
        let mut vnet = VnetHeader::new_unchecked(&mut bytes[..]);
        vnet.set_flags(vnet_flags::NEEDS_CSUM);
        vnet.set_gso_type(gso_type::TCPV4);
        vnet.set_hdr_len(66);
        vnet.set_gso_size(948);
        vnet.set_csum_start(34);
        vnet.set_csum_offset(16);
        assert_eq!(&bytes[..], &hdr[..]);
        let mut vnet = VnetHeader::new_unchecked(&mut bytes[..]);
        vnet.clear();
        assert_eq!(bytes, [0; 10]);
    }

    #[test]
    fn errors() {
        let (hdr, frame) = record(2);
        for len in 0..VNET_HDR_LEN {
            assert_eq!(
                VnetHeader::new_checked(&hdr[..len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Vnet, needed: 10, got: len }
            );
        }
        let vnet = VnetHeader::new_checked(&hdr[..]).unwrap();
        let mut short = frame[..51].to_vec();
        let err = complete_checksum(&mut short, &vnet).unwrap_err();
        assert_eq!(err, WireError::VnetBadChecksumOffsets { start: 34, offset: 16, len: 51 });
        assert_eq!(err.reason(), "vnet_bad_csum_offsets");
        let mut exact = frame[..52].to_vec();
        assert!(complete_checksum(&mut exact, &vnet).is_ok());
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(8);
        let mut buf = [0u8; 200];
        for round in 0..50_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if len > 10 && round % 2 == 0 {
                buf[0] = 1;
                buf[1] = 0;
                let start = rng.below(len) as u16;
                buf[6..8].copy_from_slice(&start.to_ne_bytes());
                buf[8..10].copy_from_slice(&(rng.below(40) as u16).to_ne_bytes());
            }
            let (head, frame) = buf.split_at_mut(len.min(VNET_HDR_LEN));
            if let Ok(mut vnet) = VnetHeader::new_checked(&mut head[..]) {
                let _ = (vnet.flags(), vnet.gso_type(), vnet.hdr_len(), vnet.gso_size(), vnet.checksum_state());
                let _ = complete_checksum(&mut frame[..len - VNET_HDR_LEN], &vnet);
                let _ = vnet.shift_for_outer_header(20);
            }
        }
    }
}
