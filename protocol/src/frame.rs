//! Length-prefixed frames.
//!
//! ```text
//!  0       2       4               8
//!  +-------+-------+---------------+------------------------------+
//!  | magic | vers. | body length   | body: bincode 2 (standard)   |
//!  | "FU"  | u16be | u32be         | ≤ MAX_BODY_LEN bytes         |
//!  +-------+-------+---------------+------------------------------+
//! ```
//!
//! The decoder checks the magic, the version and the length **before** it touches the body, so a hostile peer
//! cannot make it allocate more than [`MAX_BODY_LEN`]; bincode itself runs with the same limit, so no length
//! claimed inside the body can allocate more either.

use bincode::{Decode, Encode};

use crate::messages::{InvalidMessage, Validate};
use crate::version::VersionRange;

/// Frame magic: "FU".
pub const MAGIC: [u8; 2] = *b"FU";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;
/// The largest frame body accepted or produced. A report is about 100 bytes; the limit leaves room for growth
/// while keeping a hostile peer's cost trivial.
pub const MAX_BODY_LEN: usize = 4096;
/// The largest whole frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_big_endian().with_limit::<MAX_BODY_LEN>()
}

/// Why a frame could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:02x?} (expected \"FU\"): not a Fulcrum peer or a desynchronised stream")]
    BadMagic { found: [u8; 2] },
    #[error("frame version {found} is not spoken here (this build speaks {}..={})", supported.min, supported.max)]
    UnsupportedVersion { found: u16, supported: VersionRange },
    #[error("frame version {found} differs from the version {expected} negotiated for this connection")]
    WrongVersion { found: u16, expected: u16 },
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("frame body has {extra} bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("invalid message: {0}")]
    Invalid(#[from] InvalidMessage),
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub body_len: usize,
}

impl FrameHeader {
    /// Checks magic, version and length. Needs only the first [`HEADER_LEN`] bytes, so a stream reader can
    /// refuse an oversized frame before reading (or allocating for) its body.
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(FrameError::Truncated { needed: HEADER_LEN, available: bytes.len() })?;
        let magic = [header[0], header[1]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16::from_be_bytes([header[2], header[3]]);
        if !VersionRange::SUPPORTED.contains(version) {
            return Err(FrameError::UnsupportedVersion { found: version, supported: VersionRange::SUPPORTED });
        }
        let body_len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if body_len > MAX_BODY_LEN {
            return Err(FrameError::TooLarge { len: body_len, max: MAX_BODY_LEN });
        }
        Ok(FrameHeader { version, body_len })
    }

    /// Total length of the frame this header starts.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<M> {
    pub version: u16,
    pub message: M,
}

/// Decodes a body whose header has been checked: exactly `header.body_len` bytes, one message, no trailing
/// bytes, and every semantic limit respected.
pub fn decode_body<M: Decode<()> + Validate>(header: FrameHeader, body: &[u8]) -> Result<M, FrameError> {
    if body.len() < header.body_len {
        return Err(FrameError::Truncated { needed: header.body_len, available: body.len() });
    }
    let body = &body[..header.body_len];
    let (message, used): (M, usize) =
        bincode::decode_from_slice(body, bincode_config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::TrailingBytes { extra: body.len() - used });
    }
    message.validate()?;
    Ok(message)
}

/// Decodes the frame at the start of `bytes`, returning it and the number of bytes it took.
pub fn decode_frame<M: Decode<()> + Validate>(bytes: &[u8]) -> Result<(Frame<M>, usize), FrameError> {
    let header = FrameHeader::parse(bytes)?;
    let body = &bytes[HEADER_LEN..];
    if body.len() < header.body_len {
        return Err(FrameError::Truncated { needed: header.frame_len(), available: bytes.len() });
    }
    let message = decode_body(header, body)?;
    Ok((Frame { version: header.version, message }, header.frame_len()))
}

/// Appends one frame holding `message`, encoded in `version`, to `out`.
pub fn encode_frame<M: Encode + Validate>(version: u16, message: &M, out: &mut Vec<u8>) -> Result<(), FrameError> {
    if !VersionRange::SUPPORTED.contains(version) {
        return Err(FrameError::UnsupportedVersion { found: version, supported: VersionRange::SUPPORTED });
    }
    message.validate()?;
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    let body_start = out.len();
    if let Err(e) = bincode::encode_into_std_write(message, out, bincode_config()) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let body_len = out.len() - body_start;
    if body_len > MAX_BODY_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge { len: body_len, max: MAX_BODY_LEN });
    }
    // body_len ≤ MAX_BODY_LEN, which fits in u32.
    out[start + 4..body_start].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::messages::*;
    use crate::version::PROTOCOL_VERSION;

    fn goodbye() -> AgentMessage {
        AgentMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown })
    }

    fn hello(name: &str, ports: Vec<u16>) -> AgentMessage {
        AgentMessage::Hello(Hello {
            agent_name: name.into(),
            versions: VersionRange::SUPPORTED,
            real_server: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)),
            ports,
            software: "0.1.0".into(),
        })
    }

    /// The byte layout is part of the protocol: a change here breaks deployed agents.
    #[test]
    fn goodbye_frame_bytes_are_stable() {
        let mut out = Vec::new();
        encode_frame(PROTOCOL_VERSION, &goodbye(), &mut out).unwrap();
        // magic, version 1, body length 2, variant 2 (Goodbye), reason 0 (Shutdown)
        assert_eq!(out, [b'F', b'U', 0, 1, 0, 0, 0, 2, 2, 0]);
    }

    #[test]
    fn encode_appends_without_touching_earlier_bytes() {
        let mut out = vec![0xa5; 3];
        encode_frame(PROTOCOL_VERSION, &goodbye(), &mut out).unwrap();
        assert_eq!(&out[..3], &[0xa5; 3]);
        let (frame, used) = decode_frame::<AgentMessage>(&out[3..]).unwrap();
        assert_eq!((frame.message, used), (goodbye(), out.len() - 3));
    }

    #[test]
    fn bad_magic_is_named() {
        let err = decode_frame::<AgentMessage>(b"GET / HTTP/1.1\r\n").unwrap_err();
        assert_eq!(err, FrameError::BadMagic { found: *b"GE" });
    }

    #[test]
    fn unknown_versions_are_refused_in_the_header() {
        for version in [0u16, PROTOCOL_VERSION + 1, u16::MAX] {
            let mut bytes = b"FU".to_vec();
            bytes.extend_from_slice(&version.to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, 2, 2, 0]);
            let err = decode_frame::<AgentMessage>(&bytes).unwrap_err();
            assert_eq!(err, FrameError::UnsupportedVersion { found: version, supported: VersionRange::SUPPORTED });
        }
        let err = encode_frame(PROTOCOL_VERSION + 1, &goodbye(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, FrameError::UnsupportedVersion { .. }));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let err = FrameHeader::parse(&[b'F', b'U', 0, 1, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: u32::MAX as usize, max: MAX_BODY_LEN });
        let err = FrameHeader::parse(&[b'F', b'U', 0, 1, 0, 0, 0x10, 0x01]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: MAX_BODY_LEN + 1, max: MAX_BODY_LEN });
    }

    #[test]
    fn truncation_and_trailing_bytes_are_distinct_errors() {
        let err = decode_frame::<AgentMessage>(&[b'F', b'U', 0]).unwrap_err();
        assert_eq!(err, FrameError::Truncated { needed: HEADER_LEN, available: 3 });
        let err = decode_frame::<AgentMessage>(&[b'F', b'U', 0, 1, 0, 0, 0, 2, 2]).unwrap_err();
        assert_eq!(err, FrameError::Truncated { needed: 10, available: 9 });
        let err = decode_frame::<AgentMessage>(&[b'F', b'U', 0, 1, 0, 0, 0, 3, 2, 0, 7]).unwrap_err();
        assert_eq!(err, FrameError::TrailingBytes { extra: 1 });
    }

    #[test]
    fn a_string_length_claim_beyond_the_limit_does_not_allocate() {
        // Hello whose agent_name claims u64::MAX bytes: bincode's limit refuses it before allocating.
        let body = [0u8, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let mut bytes = vec![b'F', b'U', 0, 1, 0, 0, 0, body.len() as u8];
        bytes.extend_from_slice(&body);
        assert!(matches!(decode_frame::<AgentMessage>(&bytes), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn semantic_limits_are_checked_on_both_sides() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let err = encode_frame(PROTOCOL_VERSION, &hello(&long, vec![80]), &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            FrameError::Invalid(InvalidMessage::TooLong {
                field: "hello.agent_name",
                len: MAX_NAME_LEN + 1,
                max: MAX_NAME_LEN
            })
        );
        let err = encode_frame(PROTOCOL_VERSION, &hello("web1", vec![]), &mut Vec::new()).unwrap_err();
        assert_eq!(err, FrameError::Invalid(InvalidMessage::Empty { field: "hello.ports" }));

        // A report claiming 100.01 % CPU, hand-encoded so the sender-side check is bypassed.
        let mut report = Vec::new();
        encode_frame(PROTOCOL_VERSION, &sample_report(FULL_SCALE_BP), &mut report).unwrap();
        let (frame, _) = decode_frame::<AgentMessage>(&report).unwrap();
        assert_eq!(frame.message, sample_report(FULL_SCALE_BP));
        let position = report.windows(2).position(|w| w == FULL_SCALE_BP.to_be_bytes()).unwrap();
        report[position..position + 2].copy_from_slice(&(FULL_SCALE_BP + 1).to_be_bytes());
        let err = decode_frame::<AgentMessage>(&report).unwrap_err();
        assert_eq!(
            err,
            FrameError::Invalid(InvalidMessage::OutOfRange { field: "report.cpu.busy_bp", value: 10_001, max: 10_000 })
        );
    }

    fn sample_report(busy_bp: u16) -> AgentMessage {
        AgentMessage::Report(crate::fixtures::load_report(1, busy_bp))
    }

    #[test]
    fn a_report_fits_comfortably_in_the_limit() {
        let mut out = Vec::new();
        encode_frame(PROTOCOL_VERSION, &sample_report(5000), &mut out).unwrap();
        assert!(out.len() < 100, "a report is {} bytes", out.len());
    }
}
