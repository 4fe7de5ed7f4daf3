//! TCP segments (RFC 9293): header fields, options, checksums, and the in-place rewrites the forwarding
//! modes need (ports for NAT, the MSS option for tunnels).

use std::fmt;
use std::net::Ipv4Addr;

use super::checksum::{self, ChecksumState};
use super::error::{Layer, WireError};
use super::field::Field;
use super::ipv4::ip_protocol;

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ_NUM: Field = 4..8;
    pub const ACK_NUM: Field = 8..12;
    /// Data offset in the high nibble; the low nibble holds reserved bits (and the former NS/now AE bit).
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
    pub const OPTIONS: usize = 20;
}

/// The length of a TCP header without options.
pub const MIN_HEADER_LEN: usize = field::OPTIONS;
/// Offset of the checksum field in the TCP header (the virtio_net_hdr `csum_offset` for TCP).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// The TCP flags byte (byte 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);
    pub const ECE: TcpFlags = TcpFlags(0x40);
    pub const CWR: TcpFlags = TcpFlags(0x80);
    pub const NONE: TcpFlags = TcpFlags(0);
    pub const SYN_ACK: TcpFlags = TcpFlags(0x12);
    pub const FIN_ACK: TcpFlags = TcpFlags(0x11);
    pub const RST_ACK: TcpFlags = TcpFlags(0x14);

    /// All bits of `other` are set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn fin(self) -> bool {
        self.contains(Self::FIN)
    }
    pub fn syn(self) -> bool {
        self.contains(Self::SYN)
    }
    pub fn rst(self) -> bool {
        self.contains(Self::RST)
    }
    pub fn psh(self) -> bool {
        self.contains(Self::PSH)
    }
    pub fn ack(self) -> bool {
        self.contains(Self::ACK)
    }
    pub fn urg(self) -> bool {
        self.contains(Self::URG)
    }
    pub fn ece(self) -> bool {
        self.contains(Self::ECE)
    }
    pub fn cwr(self) -> bool {
        self.contains(Self::CWR)
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for TcpFlags {
    /// tcpdump's letters: `S` SYN, `F` FIN, `R` RST, `P` PSH, `.` ACK, `U` URG, `E` ECE, `W` CWR.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (flag, letter) in [
            (Self::SYN, 'S'),
            (Self::FIN, 'F'),
            (Self::RST, 'R'),
            (Self::PSH, 'P'),
            (Self::URG, 'U'),
            (Self::ECE, 'E'),
            (Self::CWR, 'W'),
            (Self::ACK, '.'),
        ] {
            if self.contains(flag) {
                fmt::Write::write_char(f, letter)?;
            }
        }
        Ok(())
    }
}

/// One TCP option, as [`TcpOptions`] yields it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    /// Kind 0: the end of the option list (what follows is padding).
    EndOfList,
    /// Kind 1.
    NoOp,
    /// Kind 2, length 4.
    Mss(u16),
    /// Kind 3, length 3.
    WindowScale(u8),
    /// Kind 4, length 2.
    SackPermitted,
    /// Kind 8, length 10.
    Timestamp { tsval: u32, tsecr: u32 },
    /// Any other option, or a known kind with a length it cannot have (which receivers ignore, as Linux
    /// does). `data` excludes the kind and length bytes.
    Unknown { kind: u8, data: &'a [u8] },
}

mod option_kind {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const TIMESTAMP: u8 = 8;
}

/// An iterator over the options of a TCP header. Yields `(offset in the TCP header, option)`, stops after
/// [`TcpOption::EndOfList`], and yields one `Err(BadOption)` (then stops) for an option whose length byte
/// is below 2 or runs past the header.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    options: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> TcpOptions<'a> {
    pub fn new(options: &'a [u8]) -> TcpOptions<'a> {
        TcpOptions { options, pos: 0, done: false }
    }
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<(usize, TcpOption<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let at = self.pos;
        let offset = MIN_HEADER_LEN + at;
        let rest = self.options.get(at..).unwrap_or(&[]);
        let (&kind, after_kind) = match rest.split_first() {
            Some(split) => split,
            None => {
                self.done = true;
                return None;
            }
        };
        match kind {
            option_kind::END => {
                self.done = true;
                return Some(Ok((offset, TcpOption::EndOfList)));
            }
            option_kind::NOP => {
                self.pos += 1;
                return Some(Ok((offset, TcpOption::NoOp)));
            }
            _ => {}
        }
        let len = after_kind.first().map_or(0, |&l| usize::from(l));
        let data = match rest.get(2..len) {
            Some(data) if len >= 2 => data,
            _ => {
                self.done = true;
                return Some(Err(WireError::BadOption { layer: Layer::Tcp, offset }));
            }
        };
        self.pos += len;
        let option = match (kind, data) {
            (option_kind::MSS, &[a, b]) => TcpOption::Mss(u16::from_be_bytes([a, b])),
            (option_kind::WINDOW_SCALE, &[shift]) => TcpOption::WindowScale(shift),
            (option_kind::SACK_PERMITTED, &[]) => TcpOption::SackPermitted,
            (option_kind::TIMESTAMP, &[a, b, c, d, e, f, g, h]) => TcpOption::Timestamp {
                tsval: u32::from_be_bytes([a, b, c, d]),
                tsecr: u32::from_be_bytes([e, f, g, h]),
            },
            (kind, data) => TcpOption::Unknown { kind, data },
        };
        Some(Ok((offset, option)))
    }
}

/// A read/write view of a TCP segment: the buffer must be exactly the segment (IPv4 payload bounded by the
/// total length, as [`super::Ipv4Packet::payload`] gives it), since the checksum covers all of it.
///
/// [`check_len`](Self::check_len) guarantees: the 20-byte header, a data offset ≥ 5, and the whole header
/// (options included) inside the buffer.
#[derive(Debug, Clone)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(d: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([d[f.start], d[f.start + 1]])
}

fn be32(d: &[u8], f: Field) -> u32 {
    u32::from_be_bytes([d[f.start], d[f.start + 1], d[f.start + 2], d[f.start + 3]])
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Wrap a buffer without checking it. Accessors panic if it is shorter than what they read.
    pub fn new_unchecked(buffer: T) -> TcpPacket<T> {
        TcpPacket { buffer }
    }

    /// Wrap a buffer and [`check_len`](Self::check_len) it.
    pub fn new_checked(buffer: T) -> Result<TcpPacket<T>, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(WireError::truncated(Layer::Tcp, MIN_HEADER_LEN, len));
        }
        let header = self.header_len();
        if header < MIN_HEADER_LEN {
            return Err(WireError::BadHeaderLength { layer: Layer::Tcp, len: header });
        }
        if header > len {
            return Err(WireError::truncated(Layer::Tcp, header, len));
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

    pub fn seq_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ_NUM)
    }

    pub fn ack_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::ACK_NUM)
    }

    /// The header length in bytes (data offset × 4), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFFSET] >> 4) * 4
    }

    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.buffer.as_ref()[field::FLAGS])
    }

    pub fn window_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WINDOW)
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn urgent_at(&self) -> u16 {
        be16(self.buffer.as_ref(), field::URGENT)
    }

    /// The option bytes (empty without options).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[field::OPTIONS..self.header_len()]
    }

    /// Iterate over the options.
    pub fn option_iter(&self) -> TcpOptions<'_> {
        TcpOptions::new(self.options())
    }

    /// The value of the first MSS option, if any; an error if the options are malformed before one is found.
    pub fn mss_option(&self) -> Result<Option<u16>, WireError> {
        Ok(self.find_mss()?.map(|(_, mss)| mss))
    }

    /// (header offset of the MSS value, value) of the first well-formed MSS option.
    fn find_mss(&self) -> Result<Option<(usize, u16)>, WireError> {
        for option in self.option_iter() {
            if let (offset, TcpOption::Mss(mss)) = option? {
                return Ok(Some((offset + 2, mss)));
            }
        }
        Ok(None)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }

    /// The checksum verifies for a segment from `src` to `dst` (a complete checksum; a CHECKSUM_PARTIAL
    /// frame does not verify until completed, see [`super::vnet::complete_checksum`]).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let data = self.buffer.as_ref();
        let pseudo = checksum::pseudo_header_v4_wide(src, dst, ip_protocol::TCP, data.len());
        checksum::sum_with(pseudo, data) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    pub fn set_src_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::SRC_PORT].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_dst_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::DST_PORT].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_seq_number(&mut self, value: u32) {
        self.buffer.as_mut()[field::SEQ_NUM].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_ack_number(&mut self, value: u32) {
        self.buffer.as_mut()[field::ACK_NUM].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the header length in bytes (a multiple of 4, 20..=60), keeping the reserved bits.
    pub fn set_header_len(&mut self, value: usize) {
        let b = &mut self.buffer.as_mut()[field::DATA_OFFSET];
        *b = (*b & 0x0f) | (((value / 4) as u8) << 4);
    }

    pub fn set_flags(&mut self, value: TcpFlags) {
        self.buffer.as_mut()[field::FLAGS] = value.0
    }

    pub fn set_window_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::WINDOW].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    pub fn set_urgent_at(&mut self, value: u16) {
        self.buffer.as_mut()[field::URGENT].copy_from_slice(&value.to_be_bytes())
    }

    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[field::OPTIONS..end]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        &mut self.buffer.as_mut()[start..]
    }

    /// Compute the complete checksum from scratch for a segment from `src` to `dst` and store it.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let data = self.buffer.as_ref();
        let pseudo = checksum::pseudo_header_v4_wide(src, dst, ip_protocol::TCP, data.len());
        let sum = checksum::sum_with(pseudo, data);
        self.set_checksum(!sum);
    }

    /// Store the CHECKSUM_PARTIAL seed for a segment from `src` to `dst` (the pseudo-header sum, not
    /// inverted), as the kernel does before handing the frame to a device that completes it.
    pub fn fill_partial_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let pseudo = checksum::pseudo_header_v4_wide(src, dst, ip_protocol::TCP, self.buffer.as_ref().len());
        self.set_checksum(checksum::fold(pseudo));
    }

    /// Account in the checksum field for an IPv4 address of the pseudo-header changing from `old` to `new`
    /// (call it after [`super::Ipv4Packet::rewrite_src_addr`]/`rewrite_dst_addr`). With
    /// [`ChecksumState::Partial`] it moves the seed rather than the checksum (see [`super::checksum`]).
    pub fn pseudo_header_addr_changed(&mut self, old: Ipv4Addr, new: Ipv4Addr, state: ChecksumState) {
        let (old, new) = (u32::from(old), u32::from(new));
        let value = match state {
            ChecksumState::Complete => checksum::update_u32(self.checksum(), old, new),
            ChecksumState::Partial => checksum::update_partial_u32(self.checksum(), old, new),
        };
        self.set_checksum(value);
    }

    /// Replace the source port; returns the old one. A complete checksum is updated incrementally; a
    /// CHECKSUM_PARTIAL seed is left alone (the port is summed when the checksum is completed).
    pub fn rewrite_src_port(&mut self, new: u16, state: ChecksumState) -> u16 {
        let old = self.src_port();
        self.set_src_port(new);
        if state == ChecksumState::Complete {
            self.set_checksum(checksum::update_u16(self.checksum(), old, new));
        }
        old
    }

    /// Replace the destination port; as [`rewrite_src_port`](Self::rewrite_src_port).
    pub fn rewrite_dst_port(&mut self, new: u16, state: ChecksumState) -> u16 {
        let old = self.dst_port();
        self.set_dst_port(new);
        if state == ChecksumState::Complete {
            self.set_checksum(checksum::update_u16(self.checksum(), old, new));
        }
        old
    }

    /// In a SYN (or SYN-ACK), lower the first MSS option to `limit` if it is larger; returns the old value if
    /// it changed it. Segments without SYN or without an MSS option are left alone (`Ok(None)`); so are
    /// segments whose options are malformed before an MSS option (`Err`). A complete checksum is updated
    /// incrementally (the value may sit at an odd offset: the update is byte-swapped then); a
    /// CHECKSUM_PARTIAL seed is left alone.
    pub fn clamp_mss(&mut self, limit: u16, state: ChecksumState) -> Result<Option<u16>, WireError> {
        if !self.flags().syn() {
            return Ok(None);
        }
        let (at, old) = match self.find_mss()? {
            Some((at, old)) if old > limit => (at, old),
            _ => return Ok(None),
        };
        self.buffer.as_mut()[at..at + 2].copy_from_slice(&limit.to_be_bytes());
        if state == ChecksumState::Complete {
            let csum = self.checksum();
            let csum = if at % 2 == 0 {
                checksum::update_u16(csum, old, limit)
            } else {
                checksum::update_u16(csum, old.swap_bytes(), limit.swap_bytes())
            };
            self.set_checksum(csum);
        }
        Ok(Some(old))
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for TcpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::tests::Rng;
    use super::super::tests::{lab_frame, lab_frames};
    use super::super::Ipv4Packet;
    use super::*;

    // smoltcp's test segment (src/wire/tcp.rs), an independent reference: 192.168.1.1 -> 192.168.1.2,
    // data offset 6 with 4 option bytes, flags 0x35 = FIN|RST|ACK|URG, checksum 0x01b6.
    static SMOLTCP_SEGMENT: [u8; 28] = [
        0xbf, 0x00, 0x00, 0x50, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x60, 0x35, 0x01, 0x23, 0x01, 0xb6,
        0x02, 0x01, 0x03, 0x03, 0x0c, 0x01, 0xaa, 0x00, 0x00, 0xff,
    ];
    const SMOL_SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const SMOL_DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

    /// The captured SYN's TCP segment (frame 5), copied.
    fn syn_segment() -> [u8; 40] {
        let mut seg = [0u8; 40];
        seg.copy_from_slice(&lab_frame(5)[34..74]);
        seg
    }

    #[test]
    fn deconstruct_smoltcp_segment() {
        let tcp = TcpPacket::new_checked(&SMOLTCP_SEGMENT[..]).unwrap();
        assert_eq!((tcp.src_port(), tcp.dst_port()), (48896, 80));
        assert_eq!(tcp.seq_number(), 0x0123_4567);
        assert_eq!(tcp.ack_number(), 0x89ab_cdef);
        assert_eq!(tcp.header_len(), 24);
        assert_eq!(tcp.flags(), TcpFlags::FIN | TcpFlags::RST | TcpFlags::ACK | TcpFlags::URG);
        assert_eq!(tcp.window_len(), 0x0123);
        assert_eq!(tcp.checksum(), 0x01b6);
        assert_eq!(tcp.urgent_at(), 0x0201);
        assert_eq!(tcp.options(), &[0x03, 0x03, 0x0c, 0x01]);
        assert_eq!(tcp.payload(), &[0xaa, 0x00, 0x00, 0xff]);
        assert!(tcp.verify_checksum(SMOL_SRC, SMOL_DST));
        assert!(!tcp.verify_checksum(SMOL_SRC, Ipv4Addr::new(192, 168, 1, 3)));
        // Its option is a window-scale kind with length 3 followed by a stray byte: the iterator reads the
        // 3-byte option, then kind 1 (NOP).
        let options: Vec<_> = tcp.option_iter().map(Result::unwrap).collect();
        assert_eq!(options, vec![(20, TcpOption::WindowScale(12)), (23, TcpOption::NoOp)]);
        assert_eq!(tcp.flags().to_string(), "FRU.");
    }

    #[test]
    fn deconstruct_captured_syn() {
        let seg = syn_segment();
        let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
        assert_eq!((tcp.src_port(), tcp.dst_port()), (60634, 8080));
        assert_eq!(tcp.seq_number(), 90_484_730);
        assert_eq!(tcp.ack_number(), 0);
        assert_eq!(tcp.header_len(), 40);
        assert_eq!(tcp.flags(), TcpFlags::SYN);
        assert!(tcp.flags().syn() && !tcp.flags().ack());
        assert_eq!(tcp.window_len(), 64240);
        assert_eq!(tcp.checksum(), 0xb9b7);
        assert!(tcp.verify_checksum(A, B));
        assert_eq!(tcp.mss_option(), Ok(Some(1460)));
        let options: Vec<_> = tcp.option_iter().map(|o| o.unwrap().1).collect();
        assert_eq!(
            options,
            vec![
                TcpOption::Mss(1460),
                TcpOption::SackPermitted,
                TcpOption::Timestamp { tsval: 478_322_948, tsecr: 0 },
                TcpOption::NoOp,
                TcpOption::WindowScale(10),
            ]
        );
        assert!(tcp.payload().is_empty());
        assert_eq!(tcp.flags().to_string(), "S");
    }

    #[test]
    fn every_captured_tcp_checksum_verifies() {
        let mut count = 0;
        for frame in lab_frames() {
            let Ok(ip) = Ipv4Packet::new_checked(&frame[14..]) else { continue };
            if ip.protocol() != ip_protocol::TCP {
                continue;
            }
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()));
            count += 1;
        }
        assert_eq!(count, 8);
    }

    #[test]
    fn construct_captured_syn() {
        let mut bytes = [0xa5u8; 40];
        let mut tcp = TcpPacket::new_unchecked(&mut bytes[..]);
        tcp.set_src_port(60634);
        tcp.set_dst_port(8080);
        tcp.set_seq_number(90_484_730);
        tcp.set_ack_number(0);
        bytes[12] = 0; // reserved bits: the setter keeps them, the capture has them clear
        let mut tcp = TcpPacket::new_unchecked(&mut bytes[..]);
        tcp.set_header_len(40);
        tcp.set_flags(TcpFlags::SYN);
        tcp.set_window_len(64240);
        tcp.set_urgent_at(0);
        let options = &syn_segment()[20..];
        tcp.options_mut().copy_from_slice(options);
        tcp.fill_checksum(A, B);
        assert_eq!(bytes, syn_segment());
    }

    #[test]
    fn clamp_mss_complete_even_offset() {
        let mut seg = syn_segment();
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        assert_eq!(tcp.clamp_mss(1500, ChecksumState::Complete), Ok(None));
        assert_eq!(tcp.clamp_mss(1400, ChecksumState::Complete), Ok(Some(1460)));
        assert_eq!(tcp.mss_option(), Ok(Some(1400)));
        assert!(tcp.verify_checksum(A, B));
        let incremental = tcp.checksum();
        tcp.fill_checksum(A, B);
        assert_eq!(tcp.checksum(), incremental);
        // Not a SYN: untouched.
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        tcp.set_flags(TcpFlags::ACK);
        assert_eq!(tcp.clamp_mss(536, ChecksumState::Complete), Ok(None));
        assert_eq!(tcp.mss_option(), Ok(Some(1400)));
    }

    #[test]
    fn clamp_mss_complete_odd_offset() {
        // Options NOP, MSS 1460, NOP, NOP, NOP: the MSS value sits at header offset 23.
        let mut seg = [0u8; 28];
        let mut tcp = TcpPacket::new_unchecked(&mut seg[..]);
        tcp.set_src_port(40000);
        tcp.set_dst_port(443);
        tcp.set_seq_number(7);
        tcp.set_header_len(28);
        tcp.set_flags(TcpFlags::SYN | TcpFlags::ACK);
        tcp.set_window_len(1000);
        tcp.options_mut().copy_from_slice(&[1, 2, 4, 0x05, 0xb4, 1, 1, 1]);
        tcp.fill_checksum(A, B);
        assert_eq!(tcp.clamp_mss(1200, ChecksumState::Complete), Ok(Some(1460)));
        assert_eq!(&tcp.options()[..5], &[1, 2, 4, 0x04, 0xb0]);
        assert!(tcp.verify_checksum(A, B));
    }

    #[test]
    fn clamp_mss_partial_leaves_the_seed() {
        let mut seg = syn_segment();
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        tcp.fill_partial_checksum(A, B);
        let seed = tcp.checksum();
        assert_eq!(tcp.clamp_mss(1400, ChecksumState::Partial), Ok(Some(1460)));
        assert_eq!(tcp.checksum(), seed);
        // Completing it (what the device does) gives a valid checksum.
        let sum = super::super::checksum::data(tcp.as_ref());
        tcp.set_checksum(!sum);
        assert!(tcp.verify_checksum(A, B));
    }

    #[test]
    fn nat_rewrites_keep_the_checksum_valid() {
        let mut seg = syn_segment();
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        let vip = Ipv4Addr::new(203, 0, 113, 80);
        assert_eq!(tcp.rewrite_dst_port(80, ChecksumState::Complete), 8080);
        tcp.pseudo_header_addr_changed(B, vip, ChecksumState::Complete);
        assert_eq!(tcp.rewrite_src_port(1, ChecksumState::Complete), 60634);
        assert!(tcp.verify_checksum(A, vip));
        let incremental = tcp.checksum();
        tcp.fill_checksum(A, vip);
        assert_eq!(tcp.checksum(), incremental);
    }

    #[test]
    fn errors() {
        let seg = syn_segment();
        for len in 0..20 {
            assert_eq!(
                TcpPacket::new_checked(&seg[..len]).unwrap_err(),
                WireError::Truncated { layer: Layer::Tcp, needed: 20, got: len }
            );
        }
        let err = TcpPacket::new_checked(&seg[..39]).unwrap_err();
        assert_eq!(err, WireError::Truncated { layer: Layer::Tcp, needed: 40, got: 39 });
        assert_eq!(err.reason(), "tcp_truncated");
        let mut bad = seg;
        bad[12] = 0x40;
        let err = TcpPacket::new_checked(&bad[..]).unwrap_err();
        assert_eq!(err, WireError::BadHeaderLength { layer: Layer::Tcp, len: 16 });
        assert_eq!(err.reason(), "tcp_bad_header_length");

        // Option length 0, 1, and past the header.
        for (options, offset) in [
            ([2u8, 0, 0, 0], 20),
            ([1, 3, 1, 0], 21),
            ([1, 1, 8, 10], 22),
            ([2, 4, 1, 2], usize::MAX), // a well-formed MSS
        ] {
            let mut seg = [0u8; 24];
            let mut tcp = TcpPacket::new_unchecked(&mut seg[..]);
            tcp.set_header_len(24);
            tcp.set_flags(TcpFlags::SYN);
            tcp.options_mut().copy_from_slice(&options);
            let result = tcp.mss_option();
            if offset == usize::MAX {
                assert_eq!(result, Ok(Some(0x0102)));
            } else {
                let err = result.unwrap_err();
                assert_eq!(err, WireError::BadOption { layer: Layer::Tcp, offset });
                assert_eq!(err.reason(), "tcp_bad_option");
                assert_eq!(tcp.clamp_mss(100, ChecksumState::Complete), Err(err));
            }
        }
        // An MSS option with the wrong length is ignored, like Linux does.
        let mut seg = [0u8; 24];
        let mut tcp = TcpPacket::new_unchecked(&mut seg[..]);
        tcp.set_header_len(24);
        tcp.options_mut().copy_from_slice(&[2, 3, 9, 0]);
        assert_eq!(tcp.mss_option(), Ok(None));
        let options: Vec<_> = tcp.option_iter().map(|o| o.unwrap().1).collect();
        assert_eq!(options, vec![TcpOption::Unknown { kind: 2, data: &[9] }, TcpOption::EndOfList]);
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(4);
        let mut buf = [0u8; 200];
        for round in 0..50_000 {
            let len = round % 200;
            rng.fill(&mut buf[..len]);
            if len > 13 && round % 2 == 0 {
                buf[12] = ((5 + rng.below(11)) as u8) << 4;
                buf[13] |= 0x02;
            }
            if let Ok(mut tcp) = TcpPacket::new_checked(&mut buf[..len]) {
                let _ = (tcp.src_port(), tcp.dst_port(), tcp.seq_number(), tcp.ack_number(), tcp.flags());
                let _ = (tcp.window_len(), tcp.checksum(), tcp.urgent_at(), tcp.options(), tcp.payload());
                let _ = (tcp.mss_option(), tcp.verify_checksum(A, B));
                for option in tcp.option_iter() {
                    let _ = option;
                }
                let _ = tcp.clamp_mss(536, ChecksumState::Complete);
                let _ = tcp.clamp_mss(100, ChecksumState::Partial);
            }
        }
    }
}
