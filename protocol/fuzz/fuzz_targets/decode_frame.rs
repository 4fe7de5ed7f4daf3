//! Any byte string: the decoders must return Ok or a typed error, never panic, and whatever decodes must
//! re-encode to exactly the bytes it came from (the encoding is canonical).
#![no_main]

use fulcrum_protocol::{decode_frame, encode_frame, AgentMessage, DirectorMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = decode_frame::<AgentMessage>(data) {
        let mut again = Vec::new();
        encode_frame(frame.version, &frame.message, &mut again).expect("a decoded message re-encodes");
        assert_eq!(again, &data[..used]);
    }
    if let Ok((frame, used)) = decode_frame::<DirectorMessage>(data) {
        let mut again = Vec::new();
        encode_frame(frame.version, &frame.message, &mut again).expect("a decoded message re-encodes");
        assert_eq!(again, &data[..used]);
    }
});
