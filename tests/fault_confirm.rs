//! Delivery confirmation in the sans-I/O core: whatever the receiver releases, in whatever
//! order, the sender never reports a message confirmed that the receiver did not release,
//! every message sent is either confirmed or unconfirmed, and once everything is released
//! nothing stays unconfirmed.

use std::collections::HashSet;

use proptest::prelude::*;
use rsmsg::core::{Layout, Receiver, ReserveError, Sender};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn confirmed_only_what_was_released(
        sizes in proptest::collection::vec(0usize..3000, 1..120),
        keep in proptest::collection::vec(any::<bool>(), 120),
        order in proptest::collection::vec(any::<u32>(), 120),
    ) {
        let layout: Layout = "256:32:4,4k:8:2".parse().unwrap();
        let mut tx = Sender::new(layout.clone());
        let mut rx = Receiver::new(layout);
        // Send while partitions last; the receiver takes every message.
        let mut held = Vec::new();
        for &len in &sizes {
            let r = match tx.reserve(len) {
                Ok(r) => r,
                Err(ReserveError::WouldBlock { .. }) => break,
                Err(e) => panic!("{e:?}"),
            };
            let a = rx.on_immediate(r.immediate.get()).unwrap();
            let d = rx.accept(a, &r.header).unwrap();
            prop_assert_eq!(d.seq, r.seq);
            held.push(d);
        }
        let sent = held.len() as u32;
        // Release a subset, in a shuffled order; hand every credit to the sender.
        let mut idx: Vec<usize> = (0..held.len()).filter(|&i| keep[i]).collect();
        idx.sort_by_key(|&i| order[i]);
        let released: HashSet<u32> = idx.iter().map(|&i| held[i].seq).collect();
        let mut tokens: Vec<Option<_>> = held.into_iter().map(|d| Some(d.token)).collect();
        for &i in &idx {
            if let Some(c) = rx.release(tokens[i].take().unwrap()).unwrap() {
                tx.handle_credit(c.segment, c.freed).unwrap();
            }
        }
        let unconfirmed = tx.unconfirmed();
        let un: HashSet<u32> = unconfirmed.iter().copied().collect();
        prop_assert_eq!(un.len(), unconfirmed.len());
        prop_assert_eq!(tx.confirmed() + unconfirmed.len() as u64, u64::from(sent));
        for seq in (0..sent).filter(|s| !un.contains(s)) {
            prop_assert!(released.contains(&seq), "message {} confirmed but never released", seq);
        }
        // Release the rest: everything ends confirmed.
        for t in tokens.into_iter().flatten() {
            if let Some(c) = rx.release(t).unwrap() {
                tx.handle_credit(c.segment, c.freed).unwrap();
            }
        }
        prop_assert_eq!(tx.unconfirmed(), Vec::<u32>::new());
        prop_assert_eq!(tx.confirmed(), u64::from(sent));
    }
}
