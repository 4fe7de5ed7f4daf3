//! One connection-sync record: a fixed 32-byte layout, the same in the worker rings and on the wire.
//!
//! A record names its service by VIP, port and protocol and its real server by address and port, never by
//! the sender's table indexes: the two directors build their tables independently (and `fulcrumctl` edits
//! may number servers differently), so the receiver resolves both in its own table.
//!
//! All integers are big-endian:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 1 | kind: 1 new, 2 update (state change or refresh), 3 closed, 4 persistence template |
//! | 1 | 1 | IP protocol: 6 TCP, 17 UDP |
//! | 2 | 1 | connection state (`ConnState` number; UDP entries are 11, templates 0) |
//! | 3 | 1 | forwarding method: 0 dr, 1 nat, 2 tun |
//! | 4 | 4 | client address |
//! | 8 | 2 | client port (0 in a template) |
//! | 10 | 2 | service port |
//! | 12 | 4 | VIP |
//! | 16 | 4 | real server address |
//! | 20 | 2 | real server port |
//! | 22 | 6 | the client-side MAC of the connection (NAT replies go back to it) |
//! | 28 | 4 | remaining timeout, ms (at most 7 days) |

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::config::ForwardMethod;
use crate::conntrack::{ConnState, Timeouts};
use crate::flow::{FlowV4, Proto};

pub const RECORD_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A connection the sender just created.
    New = 1,
    /// A state change, or a periodic refresh (or a full-table dump) of a live connection.
    Update = 2,
    /// The connection ended (expired or removed) on the sender.
    Closed = 3,
    /// A persistence template: `client` sticks to `server` in the service for `remaining`.
    Template = 4,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<RecordKind> {
        Some(match value {
            1 => RecordKind::New,
            2 => RecordKind::Update,
            3 => RecordKind::Closed,
            4 => RecordKind::Template,
            _ => return None,
        })
    }
}

/// One change, as the data path emits it and the peer installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRecord {
    pub kind: RecordKind,
    pub proto: Proto,
    pub state: ConnState,
    pub method: ForwardMethod,
    pub client: Ipv4Addr,
    pub client_port: u16,
    pub vip: Ipv4Addr,
    pub vip_port: u16,
    pub server: Ipv4Addr,
    pub server_port: u16,
    pub client_mac: [u8; 6],
    pub remaining_ms: u32,
}

/// What coalescing keys on: the latest record of a connection (or of a template) replaces older ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordKey {
    template: bool,
    client: Ipv4Addr,
    client_port: u16,
    vip: Ipv4Addr,
    vip_port: u16,
    proto: Proto,
}

/// Why 32 bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("IP protocol {0} is neither TCP nor UDP")]
    Protocol(u8),
    #[error("connection state {0} does not fit the protocol")]
    State(u8),
    #[error("forwarding method {0} is not dr, nat or tun")]
    Method(u8),
    #[error("remaining timeout of {0} ms exceeds 7 days")]
    Remaining(u32),
}

fn method_byte(method: ForwardMethod) -> u8 {
    match method {
        ForwardMethod::Dr => 0,
        ForwardMethod::Nat => 1,
        ForwardMethod::Tun => 2,
    }
}

fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl SyncRecord {
    pub fn key(&self) -> RecordKey {
        RecordKey {
            template: self.kind == RecordKind::Template,
            client: self.client,
            client_port: self.client_port,
            vip: self.vip,
            vip_port: self.vip_port,
            proto: self.proto,
        }
    }

    /// Client → VIP: the connection's forward key.
    pub fn forward(&self) -> FlowV4 {
        FlowV4 {
            src: self.client,
            dst: self.vip,
            src_port: self.client_port,
            dst_port: self.vip_port,
            proto: self.proto,
        }
    }

    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.remaining_ms.into())
    }

    pub fn encode(&self, out: &mut [u8; RECORD_LEN]) {
        out[0] = self.kind as u8;
        out[1] = self.proto as u8;
        out[2] = self.state as u8;
        out[3] = method_byte(self.method);
        out[4..8].copy_from_slice(&self.client.octets());
        out[8..10].copy_from_slice(&self.client_port.to_be_bytes());
        out[10..12].copy_from_slice(&self.vip_port.to_be_bytes());
        out[12..16].copy_from_slice(&self.vip.octets());
        out[16..20].copy_from_slice(&self.server.octets());
        out[20..22].copy_from_slice(&self.server_port.to_be_bytes());
        out[22..28].copy_from_slice(&self.client_mac);
        out[28..32].copy_from_slice(&self.remaining_ms.to_be_bytes());
    }

    /// Checks every field; never panics.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Result<SyncRecord, RecordError> {
        let kind = RecordKind::from_u8(b[0]).ok_or(RecordError::Kind(b[0]))?;
        let proto = Proto::from_ip_protocol(b[1]).ok_or(RecordError::Protocol(b[1]))?;
        let state = ConnState::from_u8(b[2]).ok_or(RecordError::State(b[2]))?;
        if kind != RecordKind::Template && state.is_tcp() != (proto == Proto::Tcp) {
            return Err(RecordError::State(b[2]));
        }
        let method = match b[3] {
            0 => ForwardMethod::Dr,
            1 => ForwardMethod::Nat,
            2 => ForwardMethod::Tun,
            other => return Err(RecordError::Method(other)),
        };
        let remaining_ms = u32::from_be_bytes([b[28], b[29], b[30], b[31]]);
        if u128::from(remaining_ms) > Timeouts::MAX.as_millis() {
            return Err(RecordError::Remaining(remaining_ms));
        }
        let mut client_mac = [0u8; 6];
        client_mac.copy_from_slice(&b[22..28]);
        Ok(SyncRecord {
            kind,
            proto,
            state,
            method,
            client: ipv4_at(b, 4),
            client_port: u16_at(b, 8),
            vip_port: u16_at(b, 10),
            vip: ipv4_at(b, 12),
            server: ipv4_at(b, 16),
            server_port: u16_at(b, 20),
            client_mac,
            remaining_ms,
        })
    }
}

/// Milliseconds of `remaining`, capped at 7 days (what a record may carry).
pub fn remaining_ms(remaining: Duration) -> u32 {
    remaining.min(Timeouts::MAX).as_millis() as u32
}

#[cfg(test)]
pub(crate) fn sample(kind: RecordKind, client_last: u8, state: ConnState) -> SyncRecord {
    SyncRecord {
        kind,
        proto: if state.is_tcp() { Proto::Tcp } else { Proto::Udp },
        state,
        method: ForwardMethod::Nat,
        client: Ipv4Addr::new(192, 168, 1, client_last),
        client_port: 40_000 + u16::from(client_last),
        vip: Ipv4Addr::new(10, 0, 0, 100),
        vip_port: 80,
        server: Ipv4Addr::new(10, 0, 1, 11),
        server_port: 8080,
        client_mac: [2, 0, 0, 0, 0, client_last],
        remaining_ms: 900_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_byte_for_byte() {
        let record = sample(RecordKind::Update, 7, ConnState::Established);
        let mut bytes = [0xa5u8; RECORD_LEN];
        record.encode(&mut bytes);
        assert_eq!(&bytes[..4], &[2, 6, ConnState::Established as u8, 1]);
        assert_eq!(&bytes[4..8], &[192, 168, 1, 7]);
        assert_eq!(&bytes[28..32], &900_000u32.to_be_bytes());
        assert_eq!(SyncRecord::decode(&bytes), Ok(record));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut bytes = [0u8; RECORD_LEN];
        sample(RecordKind::New, 1, ConnState::SynRecv).encode(&mut bytes);
        let bad = |at: usize, value: u8| {
            let mut b = bytes;
            b[at] = value;
            SyncRecord::decode(&b)
        };
        assert_eq!(bad(0, 9), Err(RecordError::Kind(9)));
        assert_eq!(bad(1, 1), Err(RecordError::Protocol(1)));
        assert_eq!(bad(2, ConnState::Udp as u8), Err(RecordError::State(ConnState::Udp as u8)));
        assert_eq!(bad(3, 3), Err(RecordError::Method(3)));
        assert_eq!(bad(28, 0xff), Err(RecordError::Remaining(u32::from_be_bytes([0xff, 0x0d, 0xbb, 0xa0]))));
    }

    #[test]
    fn decoding_random_bytes_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut b = [0u8; RECORD_LEN];
            for byte in &mut b {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            let _ = SyncRecord::decode(&b);
        }
    }
}
