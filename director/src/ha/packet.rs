//! The heartbeat message: a fixed binary layout (version 1), authenticated with HMAC-SHA256.
//!
//! All integers are big-endian. A message is exactly [`MESSAGE_LEN`] bytes:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 1 | version, [`VERSION`] (1) |
//! | 1 | 1 | state: 0 INIT, 1 BACKUP, 2 MASTER, 3 FAULT |
//! | 2 | 1 | priority, 1..=255 (0 is refused) |
//! | 3 | 1 | flags: bit 0 YIELD (demoted, hands mastership over), bit 1 CLAIM (promoted), bit 2 FAILOVER (mastership taken by failover); other bits must be 0 |
//! | 4 | 4 | node id |
//! | 8 | 8 | boot id (random per start of the sender) |
//! | 16 | 8 | sequence number, strictly increasing within a boot id, first is 1 |
//! | 24 | 8 | echo: the receiver's boot id as last heard by the sender (0: none) |
//! | 32 | 4 | period, µs: the sender's current interval until its next heartbeat |
//! | 36 | 4 | next period, µs: the announced period (equal to period unless a lengthening is being announced) |
//! | 40 | 1 | tolerance: consecutive lost heartbeats the receiver must ride out |
//! | 41 | 3 | reserved, must be 0 |
//! | 44 | 4 | load: packets per second forwarded (saturating) |
//! | 48 | 4 | load: tracked connections (saturating) |
//! | 52 | 8 | report: highest sequence number received from the receiver's current boot |
//! | 60 | 4 | report: heartbeats received from the receiver's current boot (wrapping) |
//! | 64 | 4 | report: measured jitter of the receiver's stream, µs |
//! | 68 | 32 | HMAC-SHA256 over bytes 0..68 with the shared key |
//!
//! Decoding checks, in order: length, version, MAC, then the fields; fields of a message that does not
//! authenticate are never looked at. Decoding never panics (tested over random bytes).

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use super::State;

/// The layout version this code writes and accepts.
pub const VERSION: u8 = 1;
/// Bytes covered by the MAC.
pub const BODY_LEN: usize = 68;
/// The whole message.
pub const MESSAGE_LEN: usize = BODY_LEN + 32;
/// Periods outside this range (µs) are malformed.
pub const PERIOD_RANGE_US: std::ops::RangeInclusive<u32> = 1_000..=60_000_000;
/// Largest tolerance accepted.
pub const MAX_TOLERANCE: u8 = 100;

pub const FLAG_YIELD: u8 = 1;
pub const FLAG_CLAIM: u8 = 2;
pub const FLAG_FAILOVER: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_YIELD | FLAG_CLAIM | FLAG_FAILOVER;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// One decoded heartbeat. `Default` and `serde(default)` let replay files name only the fields they need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    pub state: State,
    pub priority: u8,
    pub flags: u8,
    pub node_id: u32,
    pub boot_id: u64,
    pub seq: u64,
    pub echo_boot: u64,
    pub period_us: u32,
    pub next_period_us: u32,
    pub tolerance: u8,
    pub load_pps: u32,
    pub load_conns: u32,
    pub rx_seq: u64,
    pub rx_count: u32,
    pub rx_jitter_us: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            state: State::Init,
            priority: 100,
            flags: 0,
            node_id: 0,
            boot_id: 0,
            seq: 0,
            echo_boot: 0,
            period_us: 1_000_000,
            next_period_us: 1_000_000,
            tolerance: 3,
            load_pps: 0,
            load_conns: 0,
            rx_seq: 0,
            rx_count: 0,
            rx_jitter_us: 0,
        }
    }
}

/// Why a datagram is not a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes, a heartbeat is {MESSAGE_LEN}")]
    BadLength(usize),
    #[error("version {0}, expected {VERSION}")]
    BadVersion(u8),
    #[error("the MAC does not match (wrong key, forged or corrupted)")]
    BadMac,
    #[error("state byte {0} is not a state")]
    BadState(u8),
    #[error("priority 0")]
    BadPriority,
    #[error("unknown flags {0:#04x} or reserved bytes set")]
    BadFlags(u8),
    #[error("period {0} µs out of range")]
    BadPeriod(u32),
    #[error("tolerance {0} out of range")]
    BadTolerance(u8),
}

fn state_byte(state: State) -> u8 {
    match state {
        State::Init => 0,
        State::Backup => 1,
        State::Master => 2,
        State::Fault => 3,
    }
}

fn mac(key: &[u8], body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(body);
    mac
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Heartbeat {
    /// The message, MAC included.
    pub fn encode(&self, key: &[u8]) -> [u8; MESSAGE_LEN] {
        let mut b = [0u8; MESSAGE_LEN];
        b[0] = VERSION;
        b[1] = state_byte(self.state);
        b[2] = self.priority;
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.node_id.to_be_bytes());
        b[8..16].copy_from_slice(&self.boot_id.to_be_bytes());
        b[16..24].copy_from_slice(&self.seq.to_be_bytes());
        b[24..32].copy_from_slice(&self.echo_boot.to_be_bytes());
        b[32..36].copy_from_slice(&self.period_us.to_be_bytes());
        b[36..40].copy_from_slice(&self.next_period_us.to_be_bytes());
        b[40] = self.tolerance;
        b[44..48].copy_from_slice(&self.load_pps.to_be_bytes());
        b[48..52].copy_from_slice(&self.load_conns.to_be_bytes());
        b[52..60].copy_from_slice(&self.rx_seq.to_be_bytes());
        b[60..64].copy_from_slice(&self.rx_count.to_be_bytes());
        b[64..68].copy_from_slice(&self.rx_jitter_us.to_be_bytes());
        let tag = mac(key, &b[..BODY_LEN]).finalize().into_bytes();
        b[BODY_LEN..].copy_from_slice(&tag);
        b
    }

    /// Checks length, version and MAC (constant-time), then every field.
    pub fn decode(bytes: &[u8], key: &[u8]) -> Result<Heartbeat, DecodeError> {
        if bytes.len() != MESSAGE_LEN {
            return Err(DecodeError::BadLength(bytes.len()));
        }
        if bytes[0] != VERSION {
            return Err(DecodeError::BadVersion(bytes[0]));
        }
        mac(key, &bytes[..BODY_LEN]).verify_slice(&bytes[BODY_LEN..]).map_err(|_| DecodeError::BadMac)?;
        let state = match bytes[1] {
            0 => State::Init,
            1 => State::Backup,
            2 => State::Master,
            3 => State::Fault,
            other => return Err(DecodeError::BadState(other)),
        };
        if bytes[2] == 0 {
            return Err(DecodeError::BadPriority);
        }
        if bytes[3] & !KNOWN_FLAGS != 0 || bytes[41..44] != [0, 0, 0] {
            return Err(DecodeError::BadFlags(bytes[3]));
        }
        let period_us = be32(bytes, 32);
        let next_period_us = be32(bytes, 36);
        for p in [period_us, next_period_us] {
            if !PERIOD_RANGE_US.contains(&p) {
                return Err(DecodeError::BadPeriod(p));
            }
        }
        if bytes[40] > MAX_TOLERANCE {
            return Err(DecodeError::BadTolerance(bytes[40]));
        }
        Ok(Heartbeat {
            state,
            priority: bytes[2],
            flags: bytes[3],
            node_id: be32(bytes, 4),
            boot_id: be64(bytes, 8),
            seq: be64(bytes, 16),
            echo_boot: be64(bytes, 24),
            period_us,
            next_period_us,
            tolerance: bytes[40],
            load_pps: be32(bytes, 44),
            load_conns: be32(bytes, 48),
            rx_seq: be64(bytes, 52),
            rx_count: be32(bytes, 60),
            rx_jitter_us: be32(bytes, 64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn sample() -> Heartbeat {
        Heartbeat {
            state: State::Master,
            priority: 200,
            flags: FLAG_CLAIM,
            node_id: 7,
            boot_id: 0xdead_beef_0bad_cafe,
            seq: 42,
            echo_boot: 99,
            period_us: 20_000,
            next_period_us: 1_000_000,
            tolerance: 3,
            load_pps: 123_456,
            load_conns: 7_890,
            rx_seq: 41,
            rx_count: 40,
            rx_jitter_us: 150,
        }
    }

    #[test]
    fn round_trip() {
        let hb = sample();
        let bytes = hb.encode(KEY);
        assert_eq!(bytes.len(), MESSAGE_LEN);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(Heartbeat::decode(&bytes, KEY), Ok(hb));
    }

    #[test]
    fn typed_errors() {
        let bytes = sample().encode(KEY);
        assert_eq!(Heartbeat::decode(&bytes[..50], KEY), Err(DecodeError::BadLength(50)));
        assert_eq!(Heartbeat::decode(&[], KEY), Err(DecodeError::BadLength(0)));
        let mut v = bytes;
        v[0] = 2;
        assert_eq!(Heartbeat::decode(&v, KEY), Err(DecodeError::BadVersion(2)));
        assert_eq!(Heartbeat::decode(&bytes, b"another key"), Err(DecodeError::BadMac));
        for i in 1..MESSAGE_LEN {
            let mut v = bytes;
            v[i] ^= 0x01;
            assert_eq!(Heartbeat::decode(&v, KEY), Err(DecodeError::BadMac), "bit flip at {i}");
        }
        let bad = |f: &dyn Fn(&mut Heartbeat)| {
            let mut hb = sample();
            f(&mut hb);
            Heartbeat::decode(&hb.encode(KEY), KEY)
        };
        assert_eq!(bad(&|h| h.priority = 0), Err(DecodeError::BadPriority));
        assert_eq!(bad(&|h| h.flags = 0x80), Err(DecodeError::BadFlags(0x80)));
        assert_eq!(bad(&|h| h.period_us = 5), Err(DecodeError::BadPeriod(5)));
        assert_eq!(bad(&|h| h.next_period_us = u32::MAX), Err(DecodeError::BadPeriod(u32::MAX)));
        assert_eq!(bad(&|h| h.tolerance = 200), Err(DecodeError::BadTolerance(200)));
        // A state byte that is not a state, correctly authenticated.
        let mut v = bytes;
        v[1] = 9;
        let tag = mac(KEY, &v[..BODY_LEN]).finalize().into_bytes();
        v[BODY_LEN..].copy_from_slice(&tag);
        assert_eq!(Heartbeat::decode(&v, KEY), Err(DecodeError::BadState(9)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Heartbeat::decode(&bytes, KEY);
        }

        #[test]
        fn never_panics_on_random_bytes_of_the_right_length(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, MESSAGE_LEN..=MESSAGE_LEN),
            version_ok in proptest::bool::ANY,
        ) {
            let mut bytes = bytes;
            if version_ok {
                bytes[0] = VERSION;
            }
            proptest::prop_assert!(Heartbeat::decode(&bytes, KEY).is_err());
        }
    }
}
