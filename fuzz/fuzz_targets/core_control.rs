//! Control message bodies (`src/core/control.rs`), written by the peer into partitions.
//!
//! Decoding never panics; a body that decodes re-encodes to exactly the input bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::core::ControlMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ControlMessage::decode(data) {
        assert_eq!(msg.encode().as_slice(), data);
        assert_eq!(msg.encoded_len(), data.len());
    }
});
