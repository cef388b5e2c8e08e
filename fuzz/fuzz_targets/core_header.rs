//! Message headers (`src/core/wire.rs`): the 16 bytes at the start of a message's first
//! partition, written by the peer.
//!
//! Decoding never panics; a header that decodes re-encodes to exactly its 16 input bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::core::{HEADER_LEN, Header};

fuzz_target!(|data: &[u8]| {
    match Header::decode(data) {
        Ok(h) => {
            assert!(data.len() >= HEADER_LEN);
            assert_eq!(h.encode()[..], data[..HEADER_LEN]);
        }
        Err(_) => {}
    }
});
