//! The verbs queue-pair endpoint a peer sends during connection setup (`src/verbs/qp.rs`).
//!
//! Decoding never panics; an endpoint that decodes re-encodes to a blob that decodes to the
//! same endpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::verbs::QpEndpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(ep) = QpEndpoint::decode(data) {
        let bytes = ep.encode();
        let again = QpEndpoint::decode(&bytes).expect("a re-encoded endpoint decodes");
        assert_eq!(again, ep);
    }
});
