//! Reading and writing frames on an async byte stream (a QUIC stream, in practice).
//!
//! This is the only I/O in the crate, behind the `tokio` feature, so that the agent and the director frame
//! messages in exactly one way.

use bincode::{Decode, Encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{decode_body, encode_frame, Frame, FrameError, FrameHeader, HEADER_LEN};
use crate::messages::Validate;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended inside a frame ({read} of {expected} bytes read)")]
    EndInsideFrame { read: usize, expected: usize },
}

/// Reads one frame. Returns `Ok(None)` when the stream ends cleanly between frames. `buf` is reused across
/// calls; it never grows beyond [`crate::MAX_BODY_LEN`] because the header is checked first.
pub async fn read_frame<M, R>(reader: &mut R, buf: &mut Vec<u8>) -> Result<Option<Frame<M>>, StreamError>
where
    M: Decode<()> + Validate,
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(StreamError::EndInsideFrame { read: got, expected: HEADER_LEN })
            };
        }
        got += n;
    }
    let header = FrameHeader::parse(&header)?;
    buf.clear();
    buf.resize(header.body_len, 0);
    let mut got = 0;
    while got < header.body_len {
        let n = reader.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(StreamError::EndInsideFrame { read: HEADER_LEN + got, expected: header.frame_len() });
        }
        got += n;
    }
    let message = decode_body(header, buf)?;
    Ok(Some(Frame { version: header.version, message }))
}

/// Encodes and writes one frame. `buf` is reused across calls.
pub async fn write_frame<M, W>(writer: &mut W, version: u16, message: &M, buf: &mut Vec<u8>) -> Result<(), StreamError>
where
    M: Encode + Validate,
    W: AsyncWrite + Unpin,
{
    buf.clear();
    encode_frame(version, message, buf)?;
    writer.write_all(buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{AgentMessage, Goodbye, GoodbyeReason};
    use crate::PROTOCOL_VERSION;

    #[tokio::test]
    async fn frames_cross_a_byte_stream_in_small_pieces() {
        let (mut a, mut b) = tokio::io::duplex(3); // tiny buffer: forces partial reads
        let msg = AgentMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown });
        let sent = msg.clone();
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            write_frame(&mut a, PROTOCOL_VERSION, &sent, &mut buf).await.unwrap();
            write_frame(&mut a, PROTOCOL_VERSION, &sent, &mut buf).await.unwrap();
        });
        let mut buf = Vec::new();
        for _ in 0..2 {
            let frame = read_frame::<AgentMessage, _>(&mut b, &mut buf).await.unwrap().unwrap();
            assert_eq!(frame.message, msg);
        }
        writer.await.unwrap();
        assert!(read_frame::<AgentMessage, _>(&mut b, &mut buf).await.unwrap().is_none(), "clean end");
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_before_the_body_is_read() {
        let mut bytes = b"FU\x00\x01".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut reader = &bytes[..];
        let mut buf = Vec::new();
        let err = read_frame::<AgentMessage, _>(&mut reader, &mut buf).await.unwrap_err();
        assert!(matches!(err, StreamError::Frame(FrameError::TooLarge { .. })), "{err}");
        assert_eq!(buf.capacity(), 0, "nothing was allocated for the body");
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_error() {
        let mut bytes = Vec::new();
        crate::encode_frame(
            PROTOCOL_VERSION,
            &AgentMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown }),
            &mut bytes,
        )
        .unwrap();
        bytes.pop();
        let mut reader = &bytes[..];
        let err = read_frame::<AgentMessage, _>(&mut reader, &mut Vec::new()).await.unwrap_err();
        assert!(matches!(err, StreamError::EndInsideFrame { .. }), "{err}");
    }
}
