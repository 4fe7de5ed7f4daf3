//! Why a frame could not be read, with a stable per-reason name for the data plane's drop counters.

use std::fmt;

/// The protocol layer an error was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// The `virtio_net_hdr` in front of a PACKET_VNET_HDR frame.
    Vnet,
    Ethernet,
    /// An 802.1Q / 802.1ad tag after the Ethernet addresses.
    Vlan,
    Arp,
    Ipv4,
    Tcp,
    Udp,
    Icmpv4,
    /// The original IPv4 header and transport bytes quoted inside an ICMPv4 error message.
    IcmpQuote,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Vnet => "vnet",
            Layer::Ethernet => "eth",
            Layer::Vlan => "vlan",
            Layer::Arp => "arp",
            Layer::Ipv4 => "ipv4",
            Layer::Tcp => "tcp",
            Layer::Udp => "udp",
            Layer::Icmpv4 => "icmpv4",
            Layer::IcmpQuote => "icmpv4_quote",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A malformed (or, for the emitters, unwritable) packet. `Copy` and allocation-free: it is made per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends before the header (or the length the header announces) does.
    #[error("{layer}: truncated, needs {needed} bytes, has {got}")]
    Truncated { layer: Layer, needed: usize, got: usize },
    /// An IP version other than 4 where IPv4 is expected.
    #[error("{layer}: IP version {version}, expected 4")]
    BadVersion { layer: Layer, version: u8 },
    /// A header-length field below the fixed header's size (IPv4 IHL < 5, TCP data offset < 5).
    #[error("{layer}: header length {len} is below the minimum")]
    BadHeaderLength { layer: Layer, len: usize },
    /// A total-length field smaller than the header it covers (IPv4 total length, UDP length).
    #[error("{layer}: length field {len} is smaller than the {header}-byte header")]
    BadTotalLength { layer: Layer, len: usize, header: usize },
    /// A checksum that does not verify.
    #[error("{layer}: bad checksum")]
    BadChecksum { layer: Layer },
    /// A TCP option whose length byte is below 2 or runs past the header, or an MSS option not 4 bytes long.
    #[error("{layer}: malformed option at header offset {offset}")]
    BadOption { layer: Layer, offset: usize },
    /// ARP for something other than Ethernet hardware addresses and IPv4 protocol addresses.
    #[error("ARP hardware type {hardware:#06x} / protocol {protocol:#06x} / lengths {hlen}/{plen}: not Ethernet/IPv4")]
    ArpNotEthernetIpv4 { hardware: u16, protocol: u16, hlen: u8, plen: u8 },
    /// The quoted original datagram was asked of an ICMP message that is not an error message.
    #[error("ICMP type {icmp_type} is not an error message")]
    IcmpNotError { icmp_type: u8 },
    /// `csum_start` + `csum_offset` do not leave room for the 2-byte checksum field inside the frame.
    #[error("virtio_net_hdr csum_start {start} + csum_offset {offset} + 2 exceeds the {len}-byte frame")]
    VnetBadChecksumOffsets { start: usize, offset: usize, len: usize },
    /// A GSO super-frame where a single packet is needed (its checksums only exist per segment).
    #[error("virtio_net_hdr gso_type {gso_type:#04x}: a GSO super-frame, not one packet")]
    VnetGso { gso_type: u8 },
    /// An emitter's output buffer (or an offset adjustment) does not fit.
    #[error("output does not fit: needs {needed} bytes, has {got}")]
    BufferTooSmall { needed: usize, got: usize },
}

impl WireError {
    /// A stable, metric-label-safe name for the drop reason (e.g. `"ipv4_truncated"`). Every value is in
    /// [`WireError::ALL_REASONS`].
    pub fn reason(&self) -> &'static str {
        match *self {
            WireError::Truncated { layer, .. } => match layer {
                Layer::Vnet => "vnet_truncated",
                Layer::Ethernet => "eth_truncated",
                Layer::Vlan => "vlan_truncated",
                Layer::Arp => "arp_truncated",
                Layer::Ipv4 => "ipv4_truncated",
                Layer::Tcp => "tcp_truncated",
                Layer::Udp => "udp_truncated",
                Layer::Icmpv4 => "icmpv4_truncated",
                Layer::IcmpQuote => "icmpv4_quote_truncated",
            },
            // Only IPv4 headers carry a version; the quote is the one other place one is read.
            WireError::BadVersion { layer: Layer::IcmpQuote, .. } => "icmpv4_quote_bad_version",
            WireError::BadVersion { .. } => "ipv4_bad_version",
            WireError::BadHeaderLength { layer: Layer::Tcp, .. } => "tcp_bad_header_length",
            WireError::BadHeaderLength { layer: Layer::IcmpQuote, .. } => "icmpv4_quote_bad_header_length",
            WireError::BadHeaderLength { .. } => "ipv4_bad_header_length",
            WireError::BadTotalLength { layer: Layer::Udp, .. } => "udp_bad_length",
            WireError::BadTotalLength { .. } => "ipv4_bad_total_length",
            WireError::BadChecksum { layer: Layer::Tcp } => "tcp_bad_checksum",
            WireError::BadChecksum { layer: Layer::Udp } => "udp_bad_checksum",
            WireError::BadChecksum { layer: Layer::Icmpv4 } => "icmpv4_bad_checksum",
            WireError::BadChecksum { .. } => "ipv4_bad_checksum",
            WireError::BadOption { .. } => "tcp_bad_option",
            WireError::ArpNotEthernetIpv4 { .. } => "arp_not_ethernet_ipv4",
            WireError::IcmpNotError { .. } => "icmpv4_not_error",
            WireError::VnetBadChecksumOffsets { .. } => "vnet_bad_csum_offsets",
            WireError::VnetGso { .. } => "vnet_gso_frame",
            WireError::BufferTooSmall { .. } => "buffer_too_small",
        }
    }

    /// Every value [`WireError::reason`] can return, so counters can be registered (or laid out in an array)
    /// up front.
    pub const ALL_REASONS: &'static [&'static str] = &[
        "vnet_truncated",
        "eth_truncated",
        "vlan_truncated",
        "arp_truncated",
        "ipv4_truncated",
        "tcp_truncated",
        "udp_truncated",
        "icmpv4_truncated",
        "icmpv4_quote_truncated",
        "icmpv4_quote_bad_version",
        "ipv4_bad_version",
        "tcp_bad_header_length",
        "icmpv4_quote_bad_header_length",
        "ipv4_bad_header_length",
        "udp_bad_length",
        "ipv4_bad_total_length",
        "tcp_bad_checksum",
        "udp_bad_checksum",
        "icmpv4_bad_checksum",
        "ipv4_bad_checksum",
        "tcp_bad_option",
        "arp_not_ethernet_ipv4",
        "icmpv4_not_error",
        "vnet_bad_csum_offsets",
        "vnet_gso_frame",
        "buffer_too_small",
    ];

    pub(crate) fn truncated(layer: Layer, needed: usize, got: usize) -> WireError {
        WireError::Truncated { layer, needed, got }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_and_listed() {
        let layers = [
            Layer::Vnet,
            Layer::Ethernet,
            Layer::Vlan,
            Layer::Arp,
            Layer::Ipv4,
            Layer::Tcp,
            Layer::Udp,
            Layer::Icmpv4,
            Layer::IcmpQuote,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for layer in layers {
            for err in [
                WireError::Truncated { layer, needed: 1, got: 0 },
                WireError::BadVersion { layer, version: 6 },
                WireError::BadHeaderLength { layer, len: 0 },
                WireError::BadTotalLength { layer, len: 0, header: 20 },
                WireError::BadChecksum { layer },
                WireError::BadOption { layer, offset: 20 },
            ] {
                assert!(WireError::ALL_REASONS.contains(&err.reason()), "{} not listed", err.reason());
                seen.insert(err.reason());
            }
        }
        for err in [
            WireError::ArpNotEthernetIpv4 { hardware: 6, protocol: 0x800, hlen: 6, plen: 4 },
            WireError::IcmpNotError { icmp_type: 8 },
            WireError::VnetBadChecksumOffsets { start: 1, offset: 2, len: 3 },
            WireError::VnetGso { gso_type: 1 },
            WireError::BufferTooSmall { needed: 42, got: 10 },
        ] {
            assert!(WireError::ALL_REASONS.contains(&err.reason()), "{} not listed", err.reason());
            seen.insert(err.reason());
        }
        let listed: std::collections::BTreeSet<_> = WireError::ALL_REASONS.iter().copied().collect();
        assert_eq!(listed.len(), WireError::ALL_REASONS.len(), "duplicate in ALL_REASONS");
        assert_eq!(seen, listed, "ALL_REASONS lists a reason nothing produces");
        for reason in WireError::ALL_REASONS {
            assert!(reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{reason}");
        }
    }

    #[test]
    fn display_names_the_layer() {
        let err = WireError::Truncated { layer: Layer::Ipv4, needed: 40, got: 33 };
        assert_eq!(err.to_string(), "ipv4: truncated, needs 40 bytes, has 33");
        assert_eq!(err.reason(), "ipv4_truncated");
    }
}
