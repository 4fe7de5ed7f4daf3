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

pub mod checksum;
mod error;

pub use checksum::ChecksumState;
pub use error::{Layer, WireError};
