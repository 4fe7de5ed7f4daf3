//! Any byte string: the decoders must return Ok or a typed error, never panic, and whatever decodes must
//! survive a re-encode unchanged as a message. (Not byte for byte: bincode's varints accept non-minimal
//! encodings, which this fuzzer found; nothing signs or compares frames as bytes, so only the message matters.)
#![no_main]

use fulcrum_protocol::{decode_frame, encode_frame, AgentMessage, DirectorMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, _)) = decode_frame::<AgentMessage>(data) {
        let mut again = Vec::new();
        encode_frame(frame.version, &frame.message, &mut again).expect("a decoded message re-encodes");
        let (back, _) = decode_frame::<AgentMessage>(&again).expect("a re-encoded message decodes");
        assert_eq!(back.message, frame.message);
    }
    if let Ok((frame, _)) = decode_frame::<DirectorMessage>(data) {
        let mut again = Vec::new();
        encode_frame(frame.version, &frame.message, &mut again).expect("a decoded message re-encodes");
        let (back, _) = decode_frame::<DirectorMessage>(&again).expect("a re-encoded message decodes");
        assert_eq!(back.message, frame.message);
    }
});
