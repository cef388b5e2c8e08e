//! A receiver that stops consuming: the sender gets back-pressure (never an overwrite), its
//! memory does not grow however often it retries, and a blocked send completes once the receiver
//! releases messages.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rsmsg::core::Layout;
use rsmsg::transport::shm::{ShmListener, connect};
use rsmsg::transport::{PollMode, SendError};

/// Resident set size of this process in bytes (`/proc/self/statm`).
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn pattern(seq: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

#[test]
fn stalled_receiver_gets_no_overwrite_and_the_sender_no_growth() {
    let name = format!("fault-bp-{}", std::process::id());
    let layout: Layout = "256:64:4,4k:16:4".parse().unwrap();
    let listener = ShmListener::bind(&name, layout.clone(), PollMode::Busy).unwrap();
    let (to_rx, rx_cmd) = mpsc::channel::<()>();
    let (rx_done, from_rx) = mpsc::channel::<u32>();
    let receiver = thread::spawn(move || {
        let conn = listener.accept().unwrap();
        // Wait until the sender is stuck, then check every held message, in place.
        rx_cmd.recv().unwrap();
        let mut held = Vec::new();
        while let Ok(Some(m)) = conn.try_recv() {
            held.push(m);
        }
        for (i, m) in held.iter().enumerate() {
            assert_eq!(m.seq(), i as u32);
            assert_eq!(
                &m[..],
                &pattern(i as u32, m.len())[..],
                "message {i} overwritten"
            );
        }
        rx_done.send(held.len() as u32).unwrap();
        // Still holding everything: the sender retries meanwhile. Then release the older half
        // (credits go back once a quarter of a segment is free, see docs/protocol.md).
        rx_cmd.recv().unwrap();
        let half = held.len() / 2;
        held.drain(..half);
        rx_cmd.recv().unwrap();
        drop(held);
        // Drain the rest, including what the blocked send wrote.
        let mut n = 0;
        while let Ok(m) = conn.recv_timeout(Duration::from_secs(5)) {
            n += 1;
            drop(m);
        }
        n
    });
    let conn = connect(&name, layout, PollMode::Busy).unwrap();
    // Fill every partition: sizes cycle through both groups, and once a larger message is
    // refused, the smallest fill what is left.
    let mut sent = 0u32;
    let mut small_only = false;
    loop {
        let len = if small_only {
            100
        } else {
            [100usize, 1000, 3000][sent as usize % 3]
        };
        match conn.try_send(&pattern(sent, len)) {
            Ok(()) => sent += 1,
            Err(SendError::WouldBlock) if len == 100 => break,
            Err(SendError::WouldBlock) => small_only = true,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent > 0);
    to_rx.send(()).unwrap();
    let held = from_rx.recv().unwrap();
    assert_eq!(held, sent, "the receiver holds every message sent");
    // Many retries against the stalled receiver: all back-pressure, no growth.
    let probe = pattern(9999, 100);
    for _ in 0..1000 {
        assert!(matches!(conn.try_send(&probe), Err(SendError::WouldBlock)));
    }
    let before = rss();
    for _ in 0..200_000 {
        assert!(matches!(conn.try_send(&probe), Err(SendError::WouldBlock)));
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 256 * 1024,
        "RSS grew by {grown} bytes over 200000 refused sends"
    );
    assert_eq!(conn.unconfirmed().len() as u32, sent);
    // A blocking send waits, and completes once the receiver releases messages.
    to_rx.send(()).unwrap();
    conn.send(&pattern(sent, 100)).unwrap();
    to_rx.send(()).unwrap();
    let drained = receiver.join().unwrap();
    // The held messages were received before; only the blocked one arrives now.
    assert_eq!(drained, 1);
    assert_eq!(conn.confirmed(), u64::from(sent) + 1);
    assert!(conn.unconfirmed().is_empty());
}
