//! loom models of the shared-memory synchronisation: the doorbell ring's publish/consume, its
//! sleep/wake handshake (a lost wake-up would be a deadlock, which loom reports), and the credit
//! mailbox (monotonic absolute counters whose Release/Acquire pairing orders partition reuse).
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib shm::loom_models`. The models run the
//! same ring and mailbox code as normal builds; only the storage is on the heap, since loom's
//! atomics cannot live in a real mapping.

use crate::shm::{CreditMailbox, PushOutcome, RingLayout, SLOT_EXTRA, WaitMode, heap_pair};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// Message bytes written before an immediate is published, read after it is consumed: loom
/// flags a data race if the ring's ordering did not make the write visible.
struct Partitions(Vec<UnsafeCell<u32>>);
// SAFETY (test): access is ordered by the ring or mailbox under test; loom checks it.
unsafe impl Sync for Partitions {}
// SAFETY (test): as above.
unsafe impl Send for Partitions {}

/// Distinct extra bytes for entry `i`, different in both words.
fn extra_for(i: u32) -> [u8; SLOT_EXTRA] {
    std::array::from_fn(|k| (i as u8).wrapping_mul(31).wrapping_add(k as u8 + 1))
}

#[test]
fn ring_publish_consume_in_order_with_wraparound() {
    loom::model(|| {
        let (mut producer, mut consumer) = heap_pair(RingLayout::new(2).unwrap());
        const N: u32 = 3; // more entries than slots: the producer must see the consumer's tail
        let data = Arc::new(Partitions((0..N).map(|_| UnsafeCell::new(0)).collect()));
        let d = data.clone();
        let t = thread::spawn(move || {
            for i in 0..N {
                d.0[i as usize].with_mut(|p| unsafe { *p = 100 + i });
                // The slot's extra bytes (a copy of the header) travel with the entry; with
                // wrap-around the producer rewrites them in a slot the consumer read a lap ago.
                while producer.try_push_with(i, &extra_for(i)).unwrap() == PushOutcome::Full {
                    thread::yield_now();
                }
            }
        });
        for i in 0..N {
            let v = loop {
                if let Some(v) = consumer.try_pop().unwrap() {
                    break v;
                }
                thread::yield_now();
            };
            assert_eq!(v, i);
            assert_eq!(
                consumer.extra(),
                extra_for(i),
                "extra bytes of another entry"
            );
            assert_eq!(data.0[i as usize].with(|p| unsafe { *p }), 100 + i);
        }
        t.join().unwrap();
        assert_eq!(consumer.try_pop().unwrap(), None);
    });
}

#[test]
fn event_mode_never_loses_a_wakeup() {
    loom::model(|| {
        let (mut producer, mut consumer) = heap_pair(RingLayout::new(4).unwrap());
        let t = thread::spawn(move || {
            for i in 0..2 {
                assert_eq!(producer.try_push_notify(i).unwrap(), PushOutcome::Pushed);
            }
        });
        for i in 0..2 {
            // No timeout: a lost wake-up leaves the consumer blocked forever and loom fails
            // the model with a deadlock.
            assert_eq!(consumer.wait(WaitMode::Event, None).unwrap(), Some(i));
        }
        t.join().unwrap();
    });
}

#[test]
fn adaptive_mode_never_loses_a_wakeup() {
    loom::model(|| {
        let (mut producer, mut consumer) = heap_pair(RingLayout::new(1).unwrap());
        let t = thread::spawn(move || {
            assert_eq!(producer.try_push_notify(7).unwrap(), PushOutcome::Pushed);
        });
        assert_eq!(
            consumer
                .wait(WaitMode::Adaptive { spins: 1 }, None)
                .unwrap(),
            Some(7)
        );
        t.join().unwrap();
    });
}

#[test]
fn credit_counter_is_monotonic_and_orders_partition_reuse() {
    loom::model(|| {
        let mailbox = CreditMailbox::heap(2);
        // Two partitions the receiver reads before crediting them back.
        let parts = Arc::new(Partitions(vec![UnsafeCell::new(1), UnsafeCell::new(2)]));
        let (rx_box, rx_parts) = (mailbox.clone(), parts.clone());
        const BIG: u64 = 1 << 40; // credits are absolute u64 positions, high bits included
        let receiver = thread::spawn(move || {
            for (i, cell) in rx_parts.0.iter().enumerate() {
                assert_eq!(cell.with(|p| unsafe { *p }), i as u32 + 1);
                rx_box.store(1, BIG + i as u64 + 1).unwrap();
            }
        });
        let mut last = 0;
        for _ in 0..2 {
            let credit = mailbox.load(1).unwrap();
            assert!(
                credit == 0 || credit == BIG + 1 || credit == BIG + 2,
                "torn {credit:#x}"
            );
            assert!(credit >= last, "credit went backwards: {last} -> {credit}");
            last = credit;
            // Reuse every partition the credit covers: must not race with the receiver's read.
            for i in 0..credit.saturating_sub(BIG) as usize {
                parts.0[i].with_mut(|p| unsafe { *p = 0 });
            }
        }
        receiver.join().unwrap();
        assert_eq!(mailbox.load(1).unwrap(), BIG + 2);
        assert_eq!(mailbox.load(0).unwrap(), 0);
    });
}
