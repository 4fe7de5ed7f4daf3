//! Sync frames on the TCP stream between the two directors, authenticated with HMAC-SHA256 and protected
//! against replay.
//!
//! A frame is a 16-byte header, a body and a 32-byte MAC; integers are big-endian:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 2 | magic `"FS"` |
//! | 2 | 1 | version, [`VERSION`] (1) |
//! | 3 | 1 | type: 1 hello, 2 records, 3 full-table request, 4 end of full table |
//! | 4 | 4 | body length, at most [`MAX_BODY`] |
//! | 8 | 8 | sequence number: 0 for the hello, then 1, 2, 3 … on this connection |
//! | 16 | n | body: hello: the sender's nonce (8 bytes); records: a count (u16) and that many 32-byte records; requests and end markers: empty |
//! | 16 + n | 32 | HMAC-SHA256 with the shared key over the receiver's nonce (8 bytes) then bytes 0 .. 16 + n |
//!
//! **Replay protection.** Each side opens a connection with a hello carrying a fresh random nonce (its MAC
//! covers the nonce 0, as the peer's is not known yet). Every later frame's MAC covers the *receiver's*
//! nonce and a sequence number that must be exactly one more than the last: a frame recorded on an earlier
//! connection fails the MAC (other nonce), one replayed, dropped or reordered within a connection fails the
//! sequence check. A replayed hello gets an attacker nowhere: it cannot produce the frames that must follow.
//! Any refused frame ends the connection (TCP does not lose or reorder, so a bad frame is an attack or a bug).
//!
//! The header is checked before the body is read: a length over [`MAX_BODY`] is refused without allocating.

use hmac::{KeyInit, Mac};

use super::record::{RecordError, SyncRecord, RECORD_LEN};

pub const MAGIC: [u8; 2] = *b"FS";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
pub const MAC_LEN: usize = 32;
/// Largest body: 2 + 2047 records of 32 bytes fit.
pub const MAX_BODY: usize = 65_536;
/// Most records in one frame.
pub const MAX_RECORDS: usize = (MAX_BODY - 2) / RECORD_LEN;
/// Shortest accepted key.
pub const MIN_KEY_LEN: usize = 16;

const TYPE_HELLO: u8 = 1;
const TYPE_RECORDS: u8 = 2;
const TYPE_DUMP_REQUEST: u8 = 3;
const TYPE_DUMP_END: u8 = 4;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        nonce: u64,
    },
    Records(Vec<SyncRecord>),
    /// "Send me your whole table": a director that (re)connects starts empty, or may have missed changes.
    FullTableRequest,
    /// Every record of the requested full table has been sent.
    EndOfTable,
}

/// Why bytes are not an acceptable frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}")]
    Magic([u8; 2]),
    #[error("version {0}, expected {VERSION}")]
    Version(u8),
    #[error("unknown frame type {0}")]
    Type(u8),
    #[error("body of {0} bytes exceeds {MAX_BODY}")]
    TooLong(usize),
    #[error("{got} bytes after the header, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("the MAC does not match (wrong key, forged, corrupted or replayed from another connection)")]
    Mac,
    #[error("sequence number {got}, expected {expected} (replayed, dropped or reordered frame)")]
    Sequence { got: u64, expected: u64 },
    #[error("a {0} frame before the hello")]
    BeforeHello(&'static str),
    #[error("a second hello on one connection")]
    SecondHello,
    #[error("malformed {what}: {detail}")]
    Body { what: &'static str, detail: String },
    #[error("record {index}: {error}")]
    Record { index: usize, error: RecordError },
}

impl FrameError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Mac => "auth",
            FrameError::Sequence { .. } | FrameError::SecondHello => "replay",
            _ => "malformed",
        }
    }
}

/// A checked header: the caller reads `body_len() + MAC_LEN` more bytes and hands them to [`Receiver::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; HEADER_LEN],
}

impl Header {
    pub fn parse(bytes: [u8; HEADER_LEN]) -> Result<Header, FrameError> {
        if bytes[..2] != MAGIC {
            return Err(FrameError::Magic([bytes[0], bytes[1]]));
        }
        if bytes[2] != VERSION {
            return Err(FrameError::Version(bytes[2]));
        }
        if !(TYPE_HELLO..=TYPE_DUMP_END).contains(&bytes[3]) {
            return Err(FrameError::Type(bytes[3]));
        }
        let header = Header { bytes };
        if header.body_len() > MAX_BODY {
            return Err(FrameError::TooLong(header.body_len()));
        }
        Ok(header)
    }

    pub fn body_len(&self) -> usize {
        u32::from_be_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]]) as usize
    }

    /// Bytes to read after the header: body and MAC.
    pub fn rest_len(&self) -> usize {
        self.body_len() + MAC_LEN
    }

    fn kind(&self) -> u8 {
        self.bytes[3]
    }

    fn seq(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[8..16]);
        u64::from_be_bytes(b)
    }
}

fn mac(key: &[u8], receiver_nonce: u64, header: &[u8], body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(&receiver_nonce.to_be_bytes());
    mac.update(header);
    mac.update(body);
    mac
}

/// The sending half of one connection.
#[derive(Debug)]
pub struct Sender {
    key: Vec<u8>,
    nonce: u64,
    peer_nonce: Option<u64>,
    next_seq: u64,
}

/// The receiving half of one connection.
#[derive(Debug)]
pub struct Receiver {
    key: Vec<u8>,
    nonce: u64,
    peer_nonce: Option<u64>,
    next_seq: u64,
}

/// Both halves of a new connection; `nonce` must be fresh and random (see [`random_nonce`]).
pub fn session(key: &[u8], nonce: u64) -> (Sender, Receiver) {
    (
        Sender { key: key.to_vec(), nonce, peer_nonce: None, next_seq: 1 },
        Receiver { key: key.to_vec(), nonce, peer_nonce: None, next_seq: 0 },
    )
}

/// A random nonce from the kernel.
pub fn random_nonce() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 8 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_be_bytes(bytes))
}

fn seal(key: &[u8], receiver_nonce: u64, kind: u8, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(body);
    let tag = mac(key, receiver_nonce, &out[..HEADER_LEN], body).finalize().into_bytes();
    out.extend_from_slice(&tag);
    out
}

impl Sender {
    /// The first frame on a connection.
    pub fn hello(&self) -> Vec<u8> {
        seal(&self.key, 0, TYPE_HELLO, 0, &self.nonce.to_be_bytes())
    }

    /// Learns the peer's nonce (from its hello, through [`Receiver::open`]).
    pub fn set_peer_nonce(&mut self, nonce: u64) {
        self.peer_nonce = Some(nonce);
    }

    pub fn is_ready(&self) -> bool {
        self.peer_nonce.is_some()
    }

    /// Encodes a message after the hello. `None` before the peer's hello was received (nothing can be
    /// authenticated for it yet) or for a hello (sent with [`hello`](Self::hello) only).
    pub fn seal(&mut self, message: &Message) -> Option<Vec<u8>> {
        let peer = self.peer_nonce?;
        let (kind, body) = match message {
            Message::Hello { .. } => return None,
            Message::Records(records) => {
                let records = &records[..records.len().min(MAX_RECORDS)];
                let mut body = Vec::with_capacity(2 + records.len() * RECORD_LEN);
                body.extend_from_slice(&(records.len() as u16).to_be_bytes());
                let mut buf = [0u8; RECORD_LEN];
                for record in records {
                    record.encode(&mut buf);
                    body.extend_from_slice(&buf);
                }
                (TYPE_RECORDS, body)
            }
            Message::FullTableRequest => (TYPE_DUMP_REQUEST, Vec::new()),
            Message::EndOfTable => (TYPE_DUMP_END, Vec::new()),
        };
        let frame = seal(&self.key, peer, kind, self.next_seq, &body);
        self.next_seq += 1;
        Some(frame)
    }
}

impl Receiver {
    /// Authenticates and decodes the rest of a frame (`header.rest_len()` bytes). A hello hands back the
    /// peer's nonce, which the caller gives to its [`Sender`].
    pub fn open(&mut self, header: &Header, rest: &[u8]) -> Result<Message, FrameError> {
        if rest.len() != header.rest_len() {
            return Err(FrameError::Length { got: rest.len(), expected: header.rest_len() });
        }
        let (body, tag) = rest.split_at(header.body_len());
        let kind = header.kind();
        let receiver_nonce = if kind == TYPE_HELLO { 0 } else { self.nonce };
        mac(&self.key, receiver_nonce, &header.bytes, body).verify_slice(tag).map_err(|_| FrameError::Mac)?;
        match (kind == TYPE_HELLO, self.peer_nonce.is_some()) {
            (true, true) => return Err(FrameError::SecondHello),
            (false, false) => return Err(FrameError::BeforeHello(kind_name(kind))),
            _ => {}
        }
        let seq = header.seq();
        if seq != self.next_seq {
            return Err(FrameError::Sequence { got: seq, expected: self.next_seq });
        }
        let message = match kind {
            TYPE_HELLO => {
                let nonce: [u8; 8] = body.try_into().map_err(|_| FrameError::Body {
                    what: "hello",
                    detail: format!("{} bytes, expected 8", body.len()),
                })?;
                let nonce = u64::from_be_bytes(nonce);
                self.peer_nonce = Some(nonce);
                Message::Hello { nonce }
            }
            TYPE_RECORDS => Message::Records(decode_records(body)?),
            TYPE_DUMP_REQUEST | TYPE_DUMP_END if !body.is_empty() => {
                return Err(FrameError::Body {
                    what: kind_name(kind),
                    detail: format!("{} bytes, expected 0", body.len()),
                })
            }
            TYPE_DUMP_REQUEST => Message::FullTableRequest,
            _ => Message::EndOfTable,
        };
        self.next_seq += 1;
        Ok(message)
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        TYPE_HELLO => "hello",
        TYPE_RECORDS => "records",
        TYPE_DUMP_REQUEST => "full-table request",
        _ => "end-of-table",
    }
}

fn decode_records(body: &[u8]) -> Result<Vec<SyncRecord>, FrameError> {
    let Some((count, records)) = body.split_first_chunk::<2>() else {
        return Err(FrameError::Body { what: "records", detail: "no count".into() });
    };
    let count = usize::from(u16::from_be_bytes(*count));
    if records.len() != count * RECORD_LEN {
        return Err(FrameError::Body {
            what: "records",
            detail: format!("{count} records need {} bytes, got {}", count * RECORD_LEN, records.len()),
        });
    }
    records
        .chunks_exact(RECORD_LEN)
        .enumerate()
        .map(|(index, chunk)| {
            let bytes: &[u8; RECORD_LEN] = chunk.try_into().unwrap_or(&[0; RECORD_LEN]);
            SyncRecord::decode(bytes).map_err(|error| FrameError::Record { index, error })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::ConnState;
    use crate::sync::record::{sample, RecordKind};

    const KEY: &[u8] = b"0123456789abcdef-shared-key";

    fn parse(frame: &[u8]) -> (Header, &[u8]) {
        let header = Header::parse(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        (header, &frame[HEADER_LEN..])
    }

    fn deliver(rx: &mut Receiver, frame: &[u8]) -> Result<Message, FrameError> {
        let (header, rest) = parse(frame);
        rx.open(&header, rest)
    }

    /// Two connected ends after the hello exchange: (a's sender, b's receiver).
    fn connected(a_nonce: u64, b_nonce: u64) -> (Sender, Receiver) {
        let (mut a_tx, _a_rx) = session(KEY, a_nonce);
        let (b_tx, mut b_rx) = session(KEY, b_nonce);
        assert_eq!(deliver(&mut b_rx, &a_tx.hello()), Ok(Message::Hello { nonce: a_nonce }));
        a_tx.set_peer_nonce(b_nonce);
        drop(b_tx);
        (a_tx, b_rx)
    }

    #[test]
    fn records_and_markers_pass_after_the_hellos() {
        let (mut tx, mut rx) = connected(11, 22);
        let records = vec![
            sample(RecordKind::New, 1, ConnState::SynRecv),
            sample(RecordKind::Closed, 2, ConnState::Close),
            sample(RecordKind::Update, 3, ConnState::Udp),
        ];
        for message in [Message::FullTableRequest, Message::Records(records), Message::EndOfTable] {
            let frame = tx.seal(&message).unwrap();
            assert_eq!(deliver(&mut rx, &frame), Ok(message));
        }
    }

    #[test]
    fn nothing_is_sealed_before_the_peers_hello() {
        let (mut tx, _) = session(KEY, 1);
        assert!(!tx.is_ready());
        assert_eq!(tx.seal(&Message::EndOfTable), None);
    }

    #[test]
    fn a_wrong_key_or_a_flipped_bit_fails_the_mac() {
        let (mut tx, mut rx) = connected(1, 2);
        let mut frame = tx.seal(&Message::Records(vec![sample(RecordKind::New, 1, ConnState::SynRecv)])).unwrap();
        frame[HEADER_LEN + 5] ^= 1;
        assert_eq!(deliver(&mut rx, &frame), Err(FrameError::Mac));

        let (mut other, _) = session(b"another key of 16+ bytes", 1);
        other.set_peer_nonce(2);
        let (_, mut rx) = connected(1, 2);
        assert_eq!(deliver(&mut rx, &other.seal(&Message::EndOfTable).unwrap()), Err(FrameError::Mac));
    }

    #[test]
    fn replays_are_refused_within_and_across_connections() {
        let (mut tx, mut rx) = connected(1, 2);
        let first = tx.seal(&Message::FullTableRequest).unwrap();
        let second = tx.seal(&Message::EndOfTable).unwrap();
        assert_eq!(deliver(&mut rx, &first), Ok(Message::FullTableRequest));
        assert_eq!(deliver(&mut rx, &first), Err(FrameError::Sequence { got: 1, expected: 2 }));
        assert_eq!(deliver(&mut rx, &second), Ok(Message::EndOfTable));
        // A later connection: the receiver's nonce is new, so frames recorded before do not authenticate,
        // even at the expected sequence number.
        let (_, mut later) = connected(1, 3);
        assert_eq!(deliver(&mut later, &first), Err(FrameError::Mac));
        // A second hello is refused.
        let (hello_tx, _) = session(KEY, 1);
        assert_eq!(deliver(&mut rx, &hello_tx.hello()), Err(FrameError::SecondHello));
    }

    #[test]
    fn frames_before_the_hello_and_bad_headers_are_refused() {
        let (mut tx, _) = connected(1, 2);
        let (_, mut fresh) = session(KEY, 2);
        assert_eq!(
            deliver(&mut fresh, &tx.seal(&Message::EndOfTable).unwrap()),
            Err(FrameError::BeforeHello("end-of-table"))
        );
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(b"FS");
        header[2] = VERSION;
        header[3] = TYPE_RECORDS;
        header[4..8].copy_from_slice(&(MAX_BODY as u32 + 1).to_be_bytes());
        assert_eq!(Header::parse(header), Err(FrameError::TooLong(MAX_BODY + 1)));
        header[3] = 9;
        assert_eq!(Header::parse(header), Err(FrameError::Type(9)));
        header[2] = 2;
        assert_eq!(Header::parse(header), Err(FrameError::Version(2)));
        header[0] = b'X';
        assert_eq!(Header::parse(header), Err(FrameError::Magic([b'X', b'S'])));
    }

    #[test]
    fn a_bad_record_inside_an_authentic_frame_is_named() {
        let (mut tx, mut rx) = connected(1, 2);
        let mut record = sample(RecordKind::New, 1, ConnState::SynRecv);
        record.remaining_ms = 0;
        let frame = tx.seal(&Message::Records(vec![record, record])).unwrap();
        // Re-seal with a corrupted second record kind but a valid MAC, as a buggy peer would send.
        let (header, rest) = parse(&frame);
        let mut body = rest[..header.body_len()].to_vec();
        body[2 + RECORD_LEN] = 0x7f;
        let bad = seal(KEY, 2, TYPE_RECORDS, 1, &body);
        assert_eq!(deliver(&mut rx, &bad), Err(FrameError::Record { index: 1, error: RecordError::Kind(0x7f) }));
    }
}
