//! Rendezvous over shared memory: messages of any size (the receiver copies once, straight from
//! the sender's buffer, with `process_vm_readv`), boundaries around every group and the switch
//! point, concurrent transfers, receive limits, refusals at both ends; the fallback through the
//! segments when the read is not permitted (forced with `RndvConfig::stream_only`, since this
//! host may permit it); delivery accounting when the receiver goes away.

use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use rsmsg::core::{Layout, RndvConfig, refuse_reason};
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect_path};
use rsmsg::transport::{PollMode, SendError, TransportError};

mod common;
use common::payload;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A connected pair in one process: (listener side, connector side).
fn pair_with(layout: Layout, mode: PollMode) -> (ShmConnection, ShmConnection) {
    let dir = std::env::temp_dir().join(format!("rsmsg-rndv-{}", std::process::id()));
    let path = dir.join(format!("ep{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let l2 = layout.clone();
    let listener = ShmListener::bind_path(&path, layout, mode).expect("bind");
    let h = thread::spawn(move || listener.accept().expect("accept"));
    let b = connect_path(&path, l2, mode).expect("connect");
    let a = h.join().expect("listener thread");
    (a, b)
}

fn pair() -> (ShmConnection, ShmConnection) {
    pair_with(Layout::default(), PollMode::Busy)
}

/// Sizes from 1 B to `top`, with len-1, len, len+1 around every group's largest payload and
/// around `switch`.
fn sizes(layout: &Layout, switch: usize, top: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 100, 4096, 65_536, 1 << 20, 3 << 20, top];
    for g in layout.groups() {
        let m = (u64::from(g.partition_size) * u64::from(g.span)) as usize - 16;
        v.extend([m - 1, m, m + 1]);
    }
    v.extend([switch - 1, switch, switch + 1]);
    v.sort_unstable();
    v.dedup();
    v.retain(|&n| n <= top);
    v
}

/// Sends every size from one thread, receives (both `recv` and `recv_into`) on another, checks
/// every byte.
fn sweep(rx: ShmConnection, tx: ShmConnection, sizes: Vec<usize>) {
    let n = sizes.len();
    let expect = sizes.clone();
    let h = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            let m = payload(i as u64, len);
            tx.send(&m)
                .unwrap_or_else(|e| panic!("send of {len} bytes: {e}"));
            // The blocking send returned: the receiver has it; the buffer is ours to drop.
            drop(m);
        }
        tx
    });
    let mut buf = vec![0u8; 64 << 20];
    for (i, &len) in expect.iter().enumerate() {
        let want = payload(i as u64, len);
        if i % 2 == 0 {
            let m = rx.recv().unwrap();
            assert_eq!(m.len(), len);
            assert!(*m == want[..], "message {i} of {len} bytes differs");
        } else {
            buf.fill(0xa5);
            let got = rx.recv_into(&mut buf).unwrap();
            assert_eq!(got, len);
            assert!(buf[..len] == want[..], "message {i} of {len} bytes differs");
        }
    }
    let tx = h.join().unwrap();
    let big = expect.iter().filter(|&&l| l > tx.switch_point()).count() as u64;
    assert_eq!(tx.rndv_stats().sent, big);
    assert_eq!(rx.rndv_stats().received, big);
    assert!(rx.stats().receiver.messages as usize >= n);
}

#[test]
fn every_size_to_64_mib_every_byte() {
    let (a, b) = pair();
    let switch = b.switch_point();
    assert_eq!(switch, Layout::default().max_eager_payload());
    sweep(a, b, sizes(&Layout::default(), switch, 64 << 20));
}

#[test]
fn lowered_threshold_is_the_switch_point() {
    let (a, b) = pair();
    let cfg = RndvConfig {
        threshold: Some(3000),
        ..b.rndv_config()
    };
    b.set_rndv_config(cfg);
    assert_eq!(b.switch_point(), 3000);
    sweep(a, b, sizes(&Layout::default(), 3000, 1 << 20));
}

#[test]
fn event_mode_and_both_directions() {
    let (a, b) = pair_with(Layout::default(), PollMode::Event);
    let h = thread::spawn(move || {
        for i in 0..20u64 {
            let m = payload(i, 300_000 + i as usize);
            b.send(&m).unwrap();
            let back = b.recv().unwrap();
            assert!(*back == payload(i + 1000, 500_000)[..]);
        }
    });
    for i in 0..20u64 {
        let m = a.recv().unwrap();
        assert!(*m == payload(i, 300_000 + i as usize)[..]);
        drop(m);
        a.send(&payload(i + 1000, 500_000)).unwrap();
    }
    h.join().unwrap();
}

#[test]
fn many_concurrent_rendezvous_on_one_connection() {
    let (a, b) = pair();
    let bufs: Vec<Vec<u8>> = (0..32u64)
        .map(|i| payload(i, 300_000 + 1000 * i as usize))
        .collect();
    let expect = bufs.clone();
    let h = thread::spawn(move || {
        for (i, want) in expect.iter().enumerate() {
            // Interleave small messages: they arrive in order with the large ones.
            let m = a.recv().unwrap();
            assert!(*m == want[..], "large {i}");
            drop(m);
            let s = a.recv().unwrap();
            assert_eq!(&*s, &[i as u8; 10][..]);
        }
        a
    });
    let mut handles = Vec::new();
    for (i, buf) in bufs.iter().enumerate() {
        let h = b.send_start(buf).unwrap();
        assert!(h.is_rendezvous());
        handles.push(h);
        b.send(&[i as u8; 10]).unwrap();
    }
    // Complete them out of order; the buffers are freed only afterwards.
    while let Some(h) = handles.pop() {
        h.wait().unwrap();
    }
    drop(handles);
    drop(bufs);
    let a = h.join().unwrap();
    assert_eq!(b.rndv_stats().sent, 32);
    assert_eq!(a.rndv_stats().received, 32);
}

#[test]
fn oversize_is_refused_at_both_ends_and_the_connection_survives() {
    oversize_and_short_buffer_refused(false);
}

#[test]
fn streamed_oversize_and_short_buffer_are_refused_and_their_chunks_dropped() {
    oversize_and_short_buffer_refused(true);
}

fn stream_only(c: &ShmConnection) {
    c.set_rndv_config(RndvConfig {
        stream_only: true,
        ..c.rndv_config()
    });
}

fn oversize_and_short_buffer_refused(stream: bool) {
    let (a, b) = pair();
    a.set_rndv_config(RndvConfig {
        max_recv: 1 << 20,
        ..a.rndv_config()
    });
    if stream {
        stream_only(&a);
        stream_only(&b);
    }
    let h = thread::spawn(move || {
        match a.recv() {
            Err(TransportError::RendezvousRefused { len, reason }) => {
                assert_eq!(len, (1 << 20) + 1);
                assert_eq!(reason, refuse_reason::TOO_LARGE);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Exactly the limit passes, and a short buffer is refused too.
        let m = a.recv().unwrap();
        assert!(*m == payload(2, 1 << 20)[..]);
        drop(m);
        let mut small = vec![0u8; 300_000];
        match a.recv_into(&mut small) {
            Err(TransportError::RendezvousRefused { reason, .. }) => {
                assert_eq!(reason, refuse_reason::NO_ROOM)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(a.recv().unwrap().len(), 7);
        a
    });
    match b.send(&payload(1, (1 << 20) + 1)) {
        Err(SendError::Refused { len, reason }) => {
            assert_eq!(len, (1 << 20) + 1);
            assert_eq!(reason, refuse_reason::TOO_LARGE);
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    b.send(&payload(2, 1 << 20)).unwrap();
    assert!(matches!(
        b.send(&payload(3, 300_001)),
        Err(SendError::Refused {
            reason: refuse_reason::NO_ROOM,
            ..
        })
    ));
    b.send(b"1234567").unwrap();
    let a = h.join().unwrap();
    assert_eq!(a.rndv_stats().refused_here, 2);
    assert_eq!(b.rndv_stats().refused_by_peer, 2);
    assert_eq!(a.rndv_stats().streamed, u64::from(stream));
}

#[test]
fn non_blocking_handle_completes_while_the_sender_also_receives() {
    let (a, b) = pair();
    let big = payload(9, 5 << 20);
    // Both sides start a large send, then receive: no deadlock, each reads the other's.
    let h = thread::spawn(move || {
        let mine = payload(10, 3 << 20);
        let mut s = a.send_start(&mine).unwrap();
        let got = a.recv().unwrap();
        assert!(*got == payload(9, 5 << 20)[..]);
        drop(got);
        while !s.test().unwrap() {
            std::hint::spin_loop();
        }
    });
    let mut s = b.send_start(&big).unwrap();
    let got = b.recv().unwrap();
    assert!(*got == payload(10, 3 << 20)[..]);
    drop(got);
    assert!(!s.is_empty());
    while !s.test().unwrap() {
        std::hint::spin_loop();
    }
    drop(s);
    h.join().unwrap();
}

#[test]
fn a_departed_receiver_fails_the_send_not_hangs() {
    let (a, b) = pair();
    drop(a);
    let m = payload(1, 2 << 20);
    match b.send(&m) {
        Err(SendError::Transport(_)) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
}

/// The receiver may not read the sender's memory (forced): the first transfer is asked for
/// through the segments, later ones are streamed at once; every byte arrives, with `recv` and
/// `recv_into`, around every boundary.
#[test]
fn streamed_when_the_receiver_may_not_read() {
    let (a, b) = pair();
    stream_only(&a);
    let switch = b.switch_point();
    let sizes = sizes(&Layout::default(), switch, 8 << 20);
    let big = sizes.iter().filter(|&&l| l > switch).count() as u64;
    let a = sweep_back(a, b, sizes);
    assert_eq!(a.rndv_stats().streamed, big);
}

/// Both sides stream (as configured where the read is known to be forbidden): transfers in
/// flight, small messages between them, handles completed out of order; no deadlock.
#[test]
fn streamed_transfers_in_flight_with_small_messages_between() {
    let (a, b) = pair_with(Layout::default(), PollMode::Event);
    stream_only(&a);
    stream_only(&b);
    let bufs: Vec<Vec<u8>> = (0..16u64)
        .map(|i| payload(i, 300_000 + 77_777 * i as usize))
        .collect();
    let expect = bufs.clone();
    let h = thread::spawn(move || {
        let mut dst = vec![0u8; 2 << 20];
        for (i, want) in expect.iter().enumerate() {
            if i % 2 == 0 {
                let m = a.recv().unwrap();
                assert!(*m == want[..], "large {i}");
            } else {
                let n = a.recv_into(&mut dst).unwrap();
                assert!(dst[..n] == want[..], "large {i}");
            }
            let s = a.recv().unwrap();
            assert_eq!(&*s, &[i as u8; 10][..]);
        }
        a
    });
    let mut handles = Vec::new();
    for (i, buf) in bufs.iter().enumerate() {
        handles.push(b.send_start(buf).unwrap());
        b.send(&[i as u8; 10]).unwrap();
    }
    while let Some(h) = handles.pop() {
        h.wait().unwrap();
    }
    drop(handles);
    let a = h.join().unwrap();
    assert_eq!(a.rndv_stats().streamed, 16);
    assert_eq!(a.rndv_stats().received, 16);
    assert_eq!(b.rndv_stats().sent, 16);
}

/// As [`sweep`], returning the receiver.
fn sweep_back(rx: ShmConnection, tx: ShmConnection, sizes: Vec<usize>) -> ShmConnection {
    let expect = sizes.clone();
    let h = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            tx.send(&payload(i as u64, len))
                .unwrap_or_else(|e| panic!("send of {len} bytes: {e}"));
        }
        tx
    });
    let mut buf = vec![0u8; 8 << 20];
    for (i, &len) in expect.iter().enumerate() {
        let want = payload(i as u64, len);
        if i % 2 == 0 {
            let m = rx.recv().unwrap();
            assert!(*m == want[..], "message {i} of {len} bytes differs");
        } else {
            buf.fill(0xa5);
            let got = rx.recv_into(&mut buf).unwrap();
            assert_eq!(got, len);
            assert!(buf[..len] == want[..], "message {i} of {len} bytes differs");
        }
    }
    let tx = h.join().unwrap();
    let big = expect.iter().filter(|&&l| l > tx.switch_point()).count() as u64;
    assert_eq!(tx.rndv_stats().sent, big);
    assert_eq!(rx.rndv_stats().received, big);
    rx
}

/// The receiver goes away with rendezvous transfers in flight: the one it read is confirmed,
/// the one it never read is listed by `unconfirmed()` under its request's sequence number, and
/// together with the eager messages every message sent is counted once.
#[test]
fn rendezvous_in_flight_when_the_receiver_goes_is_unconfirmed() {
    let (a, b) = pair();
    let big1 = payload(1, 1 << 20);
    let big2 = payload(2, 2 << 20);
    // Sequence numbers: 0 small, 1 and 2 the requests of big1 and big2, 3 small.
    b.send(b"zero").unwrap();
    let h1 = b.send_start(&big1).unwrap();
    let h2 = b.send_start(&big2).unwrap();
    b.send(b"three").unwrap();
    assert_eq!(
        b.unconfirmed()
            .iter()
            .filter(|&&s| s == 1 || s == 2)
            .count(),
        2
    );
    let t = thread::spawn(move || {
        let m = a.recv().unwrap();
        assert_eq!(&*m, b"zero");
        assert_eq!(m.seq(), 0);
        drop(m);
        let mut dst = vec![0u8; 1 << 20];
        assert_eq!(a.recv_into(&mut dst).unwrap(), 1 << 20);
        assert!(dst == payload(1, 1 << 20));
        // Gone without reading big2 or the last small message.
    });
    h1.wait().unwrap();
    t.join().unwrap();
    match h2.wait() {
        Err(SendError::Transport(_)) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    let u = b.unconfirmed();
    let c = b.confirmed();
    assert!(u.contains(&2), "the unread rendezvous: {u:?}");
    assert!(u.contains(&3), "the unread small message: {u:?}");
    assert!(!u.contains(&1), "the rendezvous read and answered: {u:?}");
    assert!(u.windows(2).all(|w| w[0] < w[1]), "oldest first: {u:?}");
    assert_eq!(c + u.len() as u64, 4, "confirmed {c}, unconfirmed {u:?}");
    assert!(c >= 1, "big1 is confirmed");
}

/// `recv_into_many` takes what has arrived, in order: eager messages into their buffers, and a
/// rendezvous message (read alone over shared memory) ends the batch or comes alone.
#[test]
fn recv_into_many_takes_what_arrived_in_order() {
    let (a, b) = pair();
    for i in 0..5u64 {
        b.send(&payload(i, 1000 + i as usize)).unwrap();
    }
    let big = payload(5, 1 << 20);
    let h = b.send_start(&big).unwrap();
    b.send(&payload(6, 77)).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 2 << 20]).collect();
    let mut seen = 0u64;
    while seen < 7 {
        let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        let lens = a.recv_into_many(&mut views).unwrap();
        assert!(!lens.is_empty());
        for (k, &n) in lens.iter().enumerate() {
            let i = seen + k as u64;
            let want = match i {
                5 => big.clone(),
                6 => payload(6, 77),
                _ => payload(i, 1000 + i as usize),
            };
            assert_eq!(n, want.len(), "message {i}");
            assert!(bufs[k][..n] == want[..], "message {i}");
        }
        seen += lens.len() as u64;
    }
    h.wait().unwrap();
    assert_eq!(a.rndv_stats().received, 1);
}

/// Receives `what` on a thread and fails the test if it has not finished within a guard far
/// above any real call (a hang, not a measure of speed).
fn within_guard<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// A's eager messages fill B's partitions while B's application is busy sending a large
/// message to A. A receives it, so A must send `done` through B's partitions: B, waiting for
/// that answer, gives them back (it copies A's messages aside). Before, B held them, A's
/// receive waited for a credit and B for `done`: both hung. Then B still gets every one of
/// A's messages, intact and in order. In both poll modes, reading and streaming.
#[test]
fn a_receive_that_must_answer_is_not_held_up_by_its_own_messages() {
    for (mode, stream) in [
        (PollMode::Busy, false),
        (PollMode::Event, false),
        (PollMode::Busy, true),
    ] {
        let (a, b) = pair_with(Layout::default(), mode);
        if stream {
            stream_only(&a);
        }
        let mut sent = 0u64;
        while a.try_send(&payload(sent, 1000)).is_ok() {
            sent += 1;
        }
        assert!(sent > 0);
        let len = 4 << 20;
        let b = within_guard("the sender's blocking send", move || {
            let big = payload(99, len);
            let sender = thread::spawn(move || {
                b.send(&big).expect("the large send completes");
                b
            });
            let mut buf = vec![0u8; len];
            assert_eq!(a.recv_into(&mut buf).expect("the large message"), len);
            assert!(buf == payload(99, len), "{mode:?} stream {stream}");
            let b = sender.join().unwrap();
            drop(a);
            b
        });
        for i in 0..sent {
            let m = b.recv().expect("every message A sent before");
            assert!(
                *m == payload(i, 1000)[..],
                "message {i}, {mode:?} stream {stream}"
            );
        }
    }
}

/// As above, with the large message's sender blocked in eager sends after it started the
/// transfer (A's partitions full of them): waiting for credits with a transfer of its own
/// unanswered, B gives its partitions back too, so A's `done` goes out; then A takes the eager
/// messages and B's sends complete. Every message arrives intact and in order at both ends.
#[test]
fn a_receive_that_must_answer_is_not_held_up_by_a_sender_waiting_for_credits() {
    for mode in [PollMode::Busy, PollMode::Event] {
        let (a, b) = pair_with(Layout::default(), mode);
        let mut sent = 0u64;
        while a.try_send(&payload(sent, 1000)).is_ok() {
            sent += 1;
        }
        let len = 4 << 20;
        let eager = 4 * sent;
        let b = within_guard("the receive that answers", move || {
            let sender = thread::spawn(move || {
                let big = payload(99, len);
                let h = b.send_start(&big).unwrap();
                for i in 0..eager {
                    b.send(&payload(1000 + i, 500)).expect("eager send");
                }
                h.wait().expect("the large transfer completes");
                drop(big);
                b
            });
            let mut buf = vec![0u8; len];
            assert_eq!(a.recv_into(&mut buf).expect("the large message"), len);
            assert!(buf == payload(99, len), "{mode:?}");
            for i in 0..eager {
                let m = a.recv().expect("eager message");
                assert!(*m == payload(1000 + i, 500)[..], "eager {i}, {mode:?}");
            }
            let b = sender.join().unwrap();
            drop(a);
            b
        });
        for i in 0..sent {
            let m = b.recv().expect("every message A sent before");
            assert!(*m == payload(i, 1000)[..], "message {i}, {mode:?}");
        }
    }
}

/// A's eager messages fill B's partitions, and B's application, having started a large transfer
/// to A, does not call in until A's receive has returned. A's receive reads the message (or
/// refuses it: its buffer is one byte short) and must answer through B's partitions, where
/// there is no room: the answer waits in A's queue and the receive returns, rather than wait for
/// B's application to give a partition back. It goes out with A's next call once B's wait has
/// given partitions back: a send (the answer goes before the data) or a receive. B's handle then
/// completes, or reports the refusal, and every message arrives intact and in order at both
/// ends. In both poll modes ([`common::answer_room::answer_waits_for_room`]).
#[test]
fn a_receive_returns_while_its_answer_waits_for_room() {
    use std::time::Duration;
    for mode in [PollMode::Busy, PollMode::Event] {
        for refuse in [false, true] {
            for next_is_send in [false, true] {
                let (a, b) = pair_with(Layout::default(), mode);
                common::answer_room::answer_waits_for_room(
                    a,
                    b,
                    refuse,
                    next_is_send,
                    Duration::from_secs(20),
                    Duration::from_secs(60),
                    &format!("{mode:?}, refuse {refuse}, next call a send {next_is_send}"),
                );
            }
        }
    }
}
