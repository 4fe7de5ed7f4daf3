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

mod arp;
pub mod checksum;
mod error;
mod ethernet;
mod icmp;
mod ipv4;
mod tcp;
mod udp;
pub mod vnet;

pub use arp::{emit_gratuitous, emit_reply, ArpOperation, ArpPacket, GarpTarget};
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

mod field {
    pub type Field = core::ops::Range<usize>;
}

#[cfg(test)]
pub(crate) mod tests {
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
}
