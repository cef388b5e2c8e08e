//! Bootstrap frames (`src/bootstrap/wire.rs`): any bytes a manager or client may receive.
//!
//! Decoding never panics; a frame that decodes re-encodes to a frame that decodes to the same
//! message, and the encoding is canonical (the re-encoded frame is the input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::bootstrap::wire::{FrameHeader, HEADER_LEN, Message};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.first_chunk::<HEADER_LEN>() {
        // The header decoder on its own, as the stream reader uses it.
        if let Ok(h) = FrameHeader::decode(head) {
            let payload = &data[HEADER_LEN..];
            let _ = Message::decode_payload(h.kind, &payload[..payload.len().min(h.len)]);
        }
    }
    if let Ok(msg) = Message::decode_frame(data) {
        let bytes = msg.encode().expect("a decoded message re-encodes");
        let again = Message::decode_frame(&bytes).expect("a re-encoded frame decodes");
        assert_eq!(again, msg);
        assert_eq!(again.encode().expect("encodes"), bytes);
        // The encoding is canonical: one message, one frame.
        assert_eq!(bytes, data);
    }
});
