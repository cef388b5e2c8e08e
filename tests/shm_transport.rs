//! The shared-memory transport end to end: handshake, messages of every group, credits,
//! back-pressure, out-of-order release, event mode, peer departure.

use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use rsmsg::core::Layout;
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect_path};
use rsmsg::transport::{PollMode, SendError, TransportError};

mod common;
use common::payload;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A connected pair in one process: (listener side, connector side).
fn pair_with(a_layout: Layout, b_layout: Layout, mode: PollMode) -> (ShmConnection, ShmConnection) {
    let dir = std::env::temp_dir().join(format!("rsmsg-test-{}", std::process::id()));
    let path = dir.join(format!("ep{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let listener = ShmListener::bind_path(&path, a_layout, mode).expect("bind");
    let h = thread::spawn(move || listener.accept().expect("accept"));
    let b = connect_path(&path, b_layout, mode).expect("connect");
    let a = h.join().expect("listener thread");
    (a, b)
}

fn pair() -> (ShmConnection, ShmConnection) {
    pair_with(Layout::default(), Layout::default(), PollMode::Busy)
}

#[test]
fn ping_pong_both_directions() {
    let (a, b) = pair();
    for i in 0..1000u64 {
        let m = payload(i, (i as usize * 7) % 300 + 1);
        b.send(&m).unwrap();
        let got = a.recv().unwrap();
        assert_eq!(&*got, &m[..]);
        drop(got);
        a.send(&m).unwrap();
        let back = b.recv().unwrap();
        assert_eq!(&*back, &m[..]);
    }
}

#[test]
fn stream_of_every_size_across_groups_checks_every_byte() {
    let (a, b) = pair();
    let max = b.max_message();
    assert_eq!(max, Layout::default().max_eager_payload());
    // Every group boundary and a spread of sizes in between.
    let mut sizes: Vec<usize> = vec![
        0,
        1,
        15,
        16,
        17,
        240,
        1008,
        1009,
        16368,
        16369,
        max - 1,
        max,
    ];
    let mut x = 12345u64;
    for _ in 0..3000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let bound = match x % 3 {
            0 => 1100,
            1 => 17000,
            _ => max + 1,
        };
        sizes.push(((x >> 33) as usize) % bound);
    }
    let n = sizes.len();
    let expect = sizes.clone();
    let sender = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            b.send(&payload(i as u64, len)).unwrap();
        }
        b
    });
    for (i, &len) in expect.iter().enumerate() {
        let m = a.recv().unwrap();
        assert_eq!(m.len(), len, "message {i}");
        assert!(*m == payload(i as u64, len)[..], "bytes of message {i}");
        assert_eq!(m.seq(), i as u32);
    }
    let b = sender.join().unwrap();
    assert_eq!(b.stats().sender.messages, n as u64);
    assert_eq!(a.stats().receiver.messages, n as u64);
}

#[test]
fn too_large_is_refused_not_truncated() {
    let (_a, b) = pair();
    let max = b.max_message();
    // Filled in place, a message must fit a group (a copy from a buffer goes by rendezvous:
    // tests/shm_rndv.rs).
    match b.send_with(max + 1, |_| ()) {
        Err(SendError::TooLarge { len, max: m }) => {
            assert_eq!(len, max + 1);
            assert_eq!(m, max);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn back_pressure_then_out_of_order_release_frees_everything() {
    let small: Layout = "256:8:2,4096:4:2".parse().unwrap();
    let (a, b) = pair_with(small.clone(), small, PollMode::Busy);
    // Fill every partition of both groups with one-partition messages.
    let mut sent = 0u64;
    loop {
        match b.try_send(&payload(sent, 100)) {
            Ok(()) => sent += 1,
            Err(SendError::WouldBlock) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // 8 partitions of 256 B hold 8 messages, then the sender moves to the 4 KiB group: 4 more.
    assert_eq!(sent, 12);
    let mut held = Vec::new();
    for i in 0..sent {
        let m = a.recv().unwrap();
        assert!(*m == payload(i, 100)[..]);
        held.push(m);
    }
    assert!(matches!(b.try_send(&[1]), Err(SendError::WouldBlock)));
    // Release in a scrambled order; nothing must be overwritten while held.
    let order = [5usize, 0, 11, 3, 7, 1, 9, 2, 10, 4, 8, 6];
    let mut slots: Vec<Option<_>> = held.into_iter().map(Some).collect();
    for &i in &order[..6] {
        slots[i].take().unwrap().release();
    }
    for (i, s) in slots.iter().enumerate() {
        if let Some(m) = s {
            assert!(
                **m == payload(i as u64, 100)[..],
                "held message {i} changed"
            );
        }
    }
    for &i in &order[6..] {
        slots[i].take().unwrap().release();
    }
    // All released: the sender gets every partition back.
    for i in 0..12 {
        b.try_send(&payload(100 + i, 100)).unwrap();
    }
    for i in 0..12 {
        let m = a.recv().unwrap();
        assert!(*m == payload(100 + i, 100)[..]);
    }
}

#[test]
fn blocking_sender_outpacing_receiver_loses_nothing() {
    let small: Layout = "256:4:2,1024:4:2".parse().unwrap();
    let (a, b) = pair_with(small.clone(), small, PollMode::Busy);
    let n = 5_000u64;
    let sender = thread::spawn(move || {
        for i in 0..n {
            b.send(&payload(i, (i % 700) as usize)).unwrap();
        }
        b.stats()
    });
    for i in 0..n {
        if i % 1000 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
        let m = a.recv().unwrap();
        assert!(*m == payload(i, (i % 700) as usize)[..], "message {i}");
    }
    let stats = sender.join().unwrap();
    assert_eq!(stats.sender.messages, n);
    assert!(
        stats.sender.credit_stalls > 0,
        "the receiver was slower: the sender must have stalled"
    );
}

#[test]
fn event_mode_wakes_sleeping_receiver_and_sender() {
    let small: Layout = "256:4:2,1024:4:2".parse().unwrap();
    let (a, b) = pair_with(small.clone(), small, PollMode::Event);
    let n = 2000u64;
    let sender = thread::spawn(move || {
        for i in 0..n {
            if i % 200 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
            b.send(&payload(i, 64)).unwrap();
        }
        b
    });
    for i in 0..n {
        let m = a.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(*m == payload(i, 64)[..]);
    }
    drop(sender.join().unwrap());
}

#[test]
fn zero_copy_send_and_recv_into() {
    let (a, b) = pair();
    b.send_with(5000, |buf| buf.copy_from_slice(&payload(7, 5000)))
        .unwrap();
    let mut out = vec![0u8; 8000];
    let n = a.recv_into(&mut out).unwrap();
    assert_eq!(&out[..n], &payload(7, 5000)[..]);
    b.send_vectored(&[b"abc", b"", b"defg"]).unwrap();
    assert_eq!(&*a.recv().unwrap(), b"abcdefg");
}

#[test]
fn peer_departure_is_reported() {
    let (a, b) = pair();
    b.send(b"last words").unwrap();
    drop(b);
    assert_eq!(&*a.recv().unwrap(), b"last words");
    match a.recv_timeout(Duration::from_secs(5)) {
        Err(TransportError::PeerClosed) => {}
        other => panic!("expected PeerClosed, got {other:?}"),
    }
}

#[test]
fn close_is_seen_by_peer() {
    let (a, b) = pair();
    b.close();
    match a.recv_timeout(Duration::from_secs(5)) {
        Err(TransportError::PeerClosed) => {}
        other => panic!("expected PeerClosed, got {other:?}"),
    }
    assert!(b.try_send(b"x").is_err());
}

#[test]
fn try_recv_on_empty_returns_none() {
    let (a, _b) = pair();
    assert!(a.try_recv().unwrap().is_none());
    assert!(matches!(
        a.recv_timeout(Duration::from_millis(20)),
        Err(TransportError::Timeout(_))
    ));
}

#[test]
fn layouts_with_more_segments_than_one_fd_frame_carries() {
    // 2 groups x 20 segments: 41 regions per side, more than one SCM_RIGHTS frame (32 fds).
    let many: Layout = "256:8:2:20,4096:4:2:20".parse().unwrap();
    assert_eq!(many.segment_count(), 40);
    let (a, b) = pair_with(many.clone(), many, PollMode::Busy);
    // 150 one-partition messages in flight need 19 of the 20 small segments; every byte checked.
    let mut seq = 0u64;
    for _round in 0..3 {
        for i in 0..150 {
            b.try_send(&payload(seq + i, 100)).unwrap();
        }
        for i in 0..150 {
            let m = a.recv().unwrap();
            assert!(*m == payload(seq + i, 100)[..], "message {}", seq + i);
        }
        seq += 150;
    }
}

#[test]
fn padding_freed_under_a_held_message_reaches_the_sender() {
    // A segment of 16 partitions of 64 B (a message takes its 16-byte header too), and one of
    // a single 4 KiB partition, filled by a held message so that the sender has nowhere else
    // to go.
    let layout: Layout = "64:16:16,4096:1:1".parse().unwrap();
    let (a, b) = pair_with(layout.clone(), layout, PollMode::Busy);
    let len = |parts: usize| parts * 64 - 16;
    b.send(&payload(0, 2000)).unwrap();
    let big = a.recv().unwrap();
    assert!(matches!(
        b.try_send(&payload(0, 2000)),
        Err(SendError::WouldBlock)
    ));
    // 12 partitions, received and released: the sender has its credit.
    b.send(&payload(1, len(12))).unwrap();
    a.recv().unwrap().release();
    // 8 partitions do not fit in the 4 left before the end: 4 of padding, then [0, 8).
    b.send(&payload(2, len(8))).unwrap();
    let held = a.recv().unwrap();
    assert!(*held == payload(2, len(8))[..]);
    // The padding is free (everything before it is), but only the receiver knows: 6 more
    // partitions fit in [8, 14) and the sender, counting the padding as in use, sees 4.
    assert!(matches!(
        b.try_send(&payload(3, len(6))),
        Err(SendError::WouldBlock)
    ));
    // The receiver looks for its next message while it still holds the wrapped one: the
    // padding's credit goes out then, and the sender can send what it waits for.
    assert!(a.try_recv().unwrap().is_none());
    b.try_send(&payload(3, len(6))).unwrap();
    let next = a
        .try_recv()
        .unwrap()
        .expect("the message sent after the credit");
    assert!(*next == payload(3, len(6))[..]);
    assert!(
        *held == payload(2, len(8))[..],
        "the held message is intact"
    );
    assert!(*big == payload(0, 2000)[..]);
}

/// Sends `i`-th message of `len` bytes by one of the send paths, chosen by `i`.
fn send_by_path(c: &ShmConnection, i: u64, len: usize) {
    let m = payload(i, len);
    match i % 3 {
        0 => c.send(&m).unwrap(),
        1 => c.send_with(len, |buf| buf.copy_from_slice(&m)).unwrap(),
        _ => {
            let (x, y) = m.split_at(len / 3);
            c.send_vectored(&[x, y]).unwrap()
        }
    }
}

/// A payload exactly one partition long goes bare (no header), so it takes one partition, not
/// two: the default layout's 64 KiB group (16 partitions) holds 16 such messages in flight, not
/// 8, and its 4 KiB group (64 partitions) 64 messages of 4 KiB, after which they go with their
/// header to the 64 KiB group. Every byte arrives, in order, among headered neighbours, over
/// every send path and both receive paths.
#[test]
fn a_payload_of_exactly_one_partition_goes_bare_and_takes_one_partition() {
    let (a, b) = pair();
    let mut seq = 0u64;
    for (len, fits) in [(65536usize, 16u64), (4096, 64 + 16)] {
        let mut sent = 0;
        while b.try_send(&payload(seq + sent, len)).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, fits, "messages of {len} B in flight");
        for i in seq..seq + sent {
            let m = a.recv().unwrap();
            assert_eq!(m.len(), len);
            assert!(*m == payload(i, len)[..], "bytes of message {i}");
        }
        seq += sent;
    }
    let per_group = &a.stats().receiver.per_group;
    assert_eq!(per_group[1].messages, 64);
    assert_eq!(per_group[2].messages, 16 + 16);
    // A stream of partition sizes and their neighbours.
    let sizes: Vec<usize> = (0..600)
        .map(|i| [256, 255, 257, 4096, 4095, 4097, 65536, 65535, 65537, 0][i % 10])
        .collect();
    let expect = sizes.clone();
    let t = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            send_by_path(&b, seq + i as u64, len);
        }
        b
    });
    let mut buf = vec![0u8; 1 << 17];
    for (i, &len) in expect.iter().enumerate() {
        let want = payload(seq + i as u64, len);
        if i % 2 == 0 {
            let m = a.recv().unwrap();
            assert_eq!(m.seq(), (seq + i as u64) as u32);
            assert!(*m == want[..], "message {i} of {len} B");
        } else {
            let n = a.recv_into(&mut buf).unwrap();
            assert_eq!(&buf[..n], &want[..], "message {i} of {len} B");
        }
    }
    t.join().unwrap();
}
