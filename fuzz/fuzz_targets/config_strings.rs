//! Configuration strings a user controls: the group layout (`RSMSG_GROUPS`, `Layout::from_str`),
//! the poll mode and the transport choice.
//!
//! Parsing never panics; a layout that parses prints to a string that parses to the same layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::core::Layout;
use rsmsg::endpoint::TransportChoice;
use rsmsg::transport::PollMode;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(layout) = s.parse::<Layout>() {
        let text = layout.to_string();
        let again: Layout = text.parse().expect("a printed layout parses");
        assert_eq!(again, layout);
        // Every accepted layout keeps its documented invariants.
        let groups = layout.groups();
        assert!(groups.len() >= 2 && groups.len() <= 256);
        assert!(groups.windows(2).all(|w| w[0].partition_size < w[1].partition_size));
        assert!(layout.segment_count() <= Layout::MAX_SEGMENTS);
        assert!(layout.segment_bytes() <= layout.memory_cap());
    }
    let _ = s.parse::<PollMode>();
    let _ = s.parse::<TransportChoice>();
});
