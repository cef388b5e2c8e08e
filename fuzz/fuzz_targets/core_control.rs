//! Control message bodies (`src/core/control.rs`), written by the peer into partitions.
//!
//! Decoding never panics; a body that decodes re-encodes to exactly the input bytes (a chunk:
//! its fixed part, the data following it unchanged).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::core::ControlMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ControlMessage::decode(data) {
        let head = msg.encode();
        assert_eq!(head.as_slice(), &data[..head.as_slice().len()]);
        assert_eq!(msg.encoded_len(), data.len());
    }
});
