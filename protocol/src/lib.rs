//! Fulcrum's agent ⇄ director wire protocol.
//!
//! Messages ([`AgentMessage`], [`DirectorMessage`]) travel in length-prefixed frames ([`frame`]) encoded with
//! bincode 2. The crate does no I/O (the optional `tokio` feature adds a thin stream adapter), never panics on
//! any input, and never allocates more than [`MAX_BODY_LEN`] for a frame, whatever the peer claims.
//!
//! One QUIC connection per agent and director, one bidirectional stream on it, opened by the agent:
//!
//! ```text
//! agent                                director
//!   | Hello (v1 frame: name, versions,    |
//!   |        real server, ports)  ------> |  checks cert name, version, server
//!   | <------ Welcome(version, instr.)    |  or Reject(reason) and close
//!   | Report(seq, cpu, probe, …) -------> |
//!   | <------ Ack(seq, instructions)      |
//!   |   … every report interval …         |
//!   | Goodbye(Shutdown) ----------------> |
//! ```

#[cfg(feature = "config")]
pub mod config_file;
#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixtures;
pub mod frame;
pub mod messages;
#[cfg(feature = "tokio")]
pub mod stream;
pub mod version;

pub use frame::{
    decode_body, decode_frame, encode_frame, Frame, FrameError, FrameHeader, HEADER_LEN, MAX_BODY_LEN, MAX_FRAME_LEN,
};
pub use messages::*;
pub use version::{negotiate, NoCommonVersion, VersionRange, HELLO_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// ALPN protocol id for the agent ⇄ director QUIC connection.
pub const ALPN: &[u8] = b"fulcrum-agent";
/// Default UDP port of the director's agent listener.
pub const DEFAULT_AGENT_PORT: u16 = 7946;
/// The report interval of an agent that is not told another (its `interval_ms`, and no director asking for a
/// different one): the director judges report ages against it when it sets none itself.
pub const DEFAULT_REPORT_INTERVAL_MS: u32 = 500;
/// The shortest report interval an agent runs at, whether configured or asked for by a director (an agent clamps a
/// director's request into these bounds; a director's configuration outside them is refused).
pub const MIN_REPORT_INTERVAL_MS: u32 = 50;
/// The longest report interval an agent runs at.
pub const MAX_REPORT_INTERVAL_MS: u32 = 60_000;
