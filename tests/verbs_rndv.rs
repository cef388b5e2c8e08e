//! Rendezvous over verbs (in the Soft-RoCE guest): the receiver RDMA-READs the sender's buffer
//! straight into its destination. Every size from 1 B to 64 MiB around every group's largest
//! payload and the switch point, every byte checked; concurrent transfers; the registration
//! cache under a small cap; refusals at both ends.
//!
//! Without a device they print `skipped: no RDMA device` and return, unless
//! `RSMSG_REQUIRE_RDMA=1`, which makes a missing device a failure (see `verbs::test_context`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{Manager, ManagerHandle, Token};
use rsmsg::core::{Layout, RndvConfig, refuse_reason};
use rsmsg::transport::verbs::{self, VerbsConnection, VerbsListener, VerbsOptions};
use rsmsg::transport::{PollMode, SendError, TransportError};
use rsmsg::verbs::{Context, test_context};

mod common;
use common::payload;

/// Guard against a hang, not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(300);

static NAMES: AtomicU32 = AtomicU32::new(0);

fn token() -> Token {
    Token::new("verbs-rndv-test-token").expect("token")
}

fn manager() -> ManagerHandle {
    Manager::bind("127.0.0.1:0", token()).expect("embedded manager")
}

fn opts(ctx: &Context) -> VerbsOptions {
    VerbsOptions {
        context: Some(ctx.clone()),
        setup_timeout: Duration::from_secs(60),
        ..VerbsOptions::from_env().expect("options from the environment")
    }
}

/// (listener side, connector side), both busy-polling with `layout`.
fn pair(ctx: &Context, addr: SocketAddr, layout: &Layout) -> (VerbsConnection, VerbsConnection) {
    let name = format!(
        "rndv-{}-{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    );
    let mut listener = VerbsListener::bind(
        addr,
        token(),
        &name,
        layout.clone(),
        PollMode::Busy,
        opts(ctx),
    )
    .expect("bind");
    let t = thread::spawn(move || listener.accept().expect("accept"));
    let c = verbs::connect(
        addr,
        &token(),
        &name,
        layout.clone(),
        PollMode::Busy,
        &opts(ctx),
    )
    .expect("connect");
    (t.join().expect("listener thread"), c)
}

macro_rules! device_or_skip {
    ($name:expr) => {
        match test_context($name) {
            Some(ctx) => ctx,
            None => return,
        }
    };
}

/// Sizes from 1 B to `top`, with len-1, len, len+1 around every group's largest payload and
/// around `switch`.
fn sizes(layout: &Layout, switch: usize, top: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 100, 4096, 65_536, 1 << 20, 3 << 20, 16 << 20, top];
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

/// Sends every size from one thread; receives alternately with `recv` and `recv_into`, checking
/// every byte.
fn sweep(rx: VerbsConnection, tx: VerbsConnection, sizes: Vec<usize>) -> VerbsConnection {
    let expect = sizes.clone();
    let h = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            let m = payload(i as u64, len);
            tx.send(&m)
                .unwrap_or_else(|e| panic!("send of {len} bytes: {e}"));
            // The blocking send returned: the receiver has read it, the buffer may go.
            drop(m);
        }
        tx
    });
    let mut buf = vec![0u8; 64 << 20];
    for (i, &len) in expect.iter().enumerate() {
        let want = payload(i as u64, len);
        if i % 2 == 0 {
            let m = rx.recv_timeout(HANG_GUARD).unwrap();
            assert_eq!(m.len(), len);
            assert!(*m == want[..], "message {i} of {len} bytes differs");
        } else {
            buf[..len].fill(0xa5);
            let got = rx.recv_into(&mut buf).unwrap();
            assert_eq!(got, len);
            assert!(buf[..len] == want[..], "message {i} of {len} bytes differs");
        }
    }
    let tx = h.join().unwrap();
    let big = expect.iter().filter(|&&l| l > tx.switch_point()).count() as u64;
    assert!(big > 0);
    assert_eq!(tx.rndv_stats().sent, big);
    assert_eq!(rx.rndv_stats().received, big);
    rx
}

#[test]
fn every_size_to_64_mib_every_byte() {
    let ctx = device_or_skip!("every_size_to_64_mib_every_byte");
    let mgr = manager();
    let l = Layout::default();
    let (a, b) = pair(&ctx, mgr.local_addr(), &l);
    let switch = b.switch_point();
    assert_eq!(switch, l.max_eager_payload());
    sweep(a, b, sizes(&l, switch, 64 << 20));
}

#[test]
fn lowered_threshold_and_small_groups() {
    let ctx = device_or_skip!("lowered_threshold_and_small_groups");
    let mgr = manager();
    let l: Layout = "256:16:4,4k:8:4".parse().unwrap();
    let (a, b) = pair(&ctx, mgr.local_addr(), &l);
    b.set_rndv_config(RndvConfig {
        threshold: Some(2000),
        ..b.rndv_config()
    });
    assert_eq!(b.switch_point(), 2000);
    sweep(a, b, sizes(&l, 2000, 1 << 20));
}

#[test]
fn many_concurrent_rendezvous_buffers_freed_after_completion() {
    let ctx = device_or_skip!("many_concurrent_rendezvous_buffers_freed_after_completion");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    let n = 24u64;
    let h = thread::spawn(move || {
        for i in 0..n {
            let m = a.recv_timeout(HANG_GUARD).unwrap();
            assert!(
                *m == payload(i, 300_000 + 4099 * i as usize)[..],
                "large {i}"
            );
            drop(m);
            let s = a.recv_timeout(HANG_GUARD).unwrap();
            assert_eq!(&*s, &[i as u8; 10][..]);
        }
        a
    });
    let bufs: Vec<Vec<u8>> = (0..n)
        .map(|i| payload(i, 300_000 + 4099 * i as usize))
        .collect();
    let mut handles = Vec::new();
    for (i, buf) in bufs.iter().enumerate() {
        let h = b.send_start(buf).unwrap();
        assert!(h.is_rendezvous());
        handles.push(h);
        b.send(&[i as u8; 10]).unwrap();
    }
    // Complete out of order; only then free the buffers (the borrow checker insists).
    while let Some(h) = handles.pop() {
        h.wait().unwrap();
    }
    drop(handles);
    drop(bufs);
    let a = h.join().unwrap();
    assert_eq!(b.rndv_stats().sent, n);
    assert_eq!(a.rndv_stats().received, n);
}

#[test]
fn cache_evicts_under_a_small_cap_and_invalidates() {
    let ctx = device_or_skip!("cache_evicts_under_a_small_cap_and_invalidates");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    let cap = 3 << 20;
    a.set_rndv_config(RndvConfig {
        cache_bytes: cap,
        ..a.rndv_config()
    });
    let len = 1 << 20;
    let rounds = 12u64;
    let h = thread::spawn(move || {
        for i in 0..rounds {
            b.send(&payload(i, len)).unwrap();
        }
        b
    });
    // Four destinations cycled under a cap of three: LRU evicts every time after the first
    // fill; the same buffer twice in a row hits.
    let mut dsts: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; len]).collect();
    for i in 0..rounds {
        let d = &mut dsts[(i as usize / 2) % 4];
        d.fill(0);
        assert_eq!(a.recv_into(d).unwrap(), len);
        assert!(d[..] == payload(i, len)[..], "message {i}");
        let s = a.rndv_cache_stats().unwrap();
        assert!(s.bytes_registered <= cap as u64, "{s:?}");
    }
    let _b = h.join().unwrap();
    let s = a.rndv_cache_stats().unwrap();
    assert_eq!(s.hits + s.misses, rounds, "{s:?}");
    assert_eq!(s.hits, rounds / 2, "{s:?}");
    assert!(s.evictions >= 2, "{s:?}");
    assert!(s.entries <= 3, "{s:?}");
    // Invalidation before freeing: every cached destination goes.
    let mut dropped = 0;
    for d in &dsts {
        dropped += a.rndv_invalidate(d);
    }
    assert_eq!(dropped as u64, s.entries);
    assert_eq!(a.rndv_cache_stats().unwrap().bytes_registered, 0);
}

#[test]
fn oversize_and_short_buffer_are_refused_at_both_ends() {
    let ctx = device_or_skip!("oversize_and_short_buffer_are_refused_at_both_ends");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    a.set_rndv_config(RndvConfig {
        max_recv: 1 << 20,
        ..a.rndv_config()
    });
    let h = thread::spawn(move || {
        match a.recv_timeout(HANG_GUARD) {
            Err(TransportError::RendezvousRefused { len, reason }) => {
                assert_eq!(len, (1 << 20) + 1);
                assert_eq!(reason, refuse_reason::TOO_LARGE);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let m = a.recv_timeout(HANG_GUARD).unwrap();
        assert!(*m == payload(2, 1 << 20)[..]);
        drop(m);
        let mut small = vec![0u8; 300_000];
        match a.recv_into(&mut small) {
            Err(TransportError::RendezvousRefused { reason, .. }) => {
                assert_eq!(reason, refuse_reason::NO_ROOM)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(a.recv_timeout(HANG_GUARD).unwrap().len(), 7);
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
}

#[test]
fn crossing_large_sends_complete() {
    let ctx = device_or_skip!("crossing_large_sends_complete");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    let h = thread::spawn(move || {
        let mine = payload(10, 3 << 20);
        let mut s = a.send_start(&mine).unwrap();
        let got = a.recv_timeout(HANG_GUARD).unwrap();
        assert!(*got == payload(9, 5 << 20)[..]);
        drop(got);
        while !s.test().unwrap() {
            std::hint::spin_loop();
        }
    });
    let big = payload(9, 5 << 20);
    let s = b.send_start(&big).unwrap();
    let got = b.recv_timeout(HANG_GUARD).unwrap();
    assert!(*got == payload(10, 3 << 20)[..]);
    drop(got);
    s.wait().unwrap();
    h.join().unwrap();
}

/// The receiver goes away with rendezvous transfers in flight: the one it read is confirmed,
/// the one it never read is listed by `unconfirmed()` under its request's sequence number
/// (once the sender's probe finds the peer gone), and with the eager messages every message
/// sent is counted once.
#[test]
fn rendezvous_in_flight_when_the_receiver_goes_is_unconfirmed() {
    let ctx = device_or_skip!("rendezvous_in_flight_when_the_receiver_goes_is_unconfirmed");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    let big1 = payload(1, 1 << 20);
    let big2 = payload(2, 2 << 20);
    // Sequence numbers: 0 small, 1 and 2 the requests of big1 and big2, 3 small.
    b.send(b"zero").unwrap();
    let h1 = b.send_start(&big1).unwrap();
    let h2 = b.send_start(&big2).unwrap();
    b.send(b"three").unwrap();
    let t = thread::spawn(move || {
        let m = a.recv_timeout(HANG_GUARD).unwrap();
        assert_eq!(&*m, b"zero");
        drop(m);
        let mut dst = vec![0u8; 1 << 20];
        assert_eq!(a.recv_into(&mut dst).unwrap(), 1 << 20);
        assert!(dst == payload(1, 1 << 20));
        // Gone (its queue pair destroyed) without reading big2 or the last small message.
    });
    h1.wait().unwrap();
    t.join().unwrap();
    assert!(
        h2.wait().is_err(),
        "the unread transfer must fail, not complete"
    );
    let u = b.unconfirmed();
    let c = b.confirmed();
    assert!(u.contains(&2), "the unread rendezvous: {u:?}");
    assert!(u.contains(&3), "the unread small message: {u:?}");
    assert!(!u.contains(&1), "the rendezvous read and answered: {u:?}");
    assert!(u.windows(2).all(|w| w[0] < w[1]), "oldest first: {u:?}");
    assert_eq!(c + u.len() as u64, 4, "confirmed {c}, unconfirmed {u:?}");
    assert!(c >= 1, "big1 is confirmed");
}

/// With the send cache on (memory windows over cached registrations): every size and byte
/// arrives, a buffer sent twice hits the cache, and invalidation empties it.
#[test]
fn send_cache_with_memory_windows() {
    let ctx = device_or_skip!("send_cache_with_memory_windows");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    b.set_rndv_config(RndvConfig {
        send_cache_bytes: 64 << 20,
        ..b.rndv_config()
    });
    let Some(_) = b.rndv_send_cache_stats() else {
        // The device has no memory windows: the link registers per transfer, as by default.
        println!("memory windows not supported by this device: per-transfer registration");
        let a = sweep(a, b, vec![300_000, 1 << 20]);
        assert_eq!(a.rndv_stats().received, 2);
        return;
    };
    let switch = b.switch_point();
    let buf = payload(7, 3 << 20);
    let h = thread::spawn(move || {
        let mut dst = vec![0u8; 3 << 20];
        for round in 0..3 {
            let n = a.recv_into(&mut dst).unwrap();
            assert_eq!(n, 3 << 20);
            assert!(dst == payload(7, 3 << 20), "round {round}");
        }
        a
    });
    for round in 0..3 {
        b.send(&buf)
            .unwrap_or_else(|e| panic!("send {round} through a memory window: {e}"));
    }
    let a = h.join().unwrap();
    let s = b.rndv_send_cache_stats().unwrap();
    assert_eq!((s.misses, s.hits), (1, 2), "{s:?}");
    assert_eq!(b.rndv_invalidate(&buf), 1);
    assert_eq!(b.rndv_send_cache_stats().unwrap().entries, 0);
    // Sizes through the cache, every byte checked; each buffer is invalidated before it is
    // freed, as the contract asks (its address may be reused by the next allocation).
    let sizes = sizes(&Layout::default(), switch, 16 << 20);
    let expect = sizes.clone();
    let h = thread::spawn(move || {
        let mut dst = vec![0u8; 16 << 20];
        for (i, &len) in expect.iter().enumerate() {
            dst[..len].fill(0xa5);
            assert_eq!(a.recv_into(&mut dst).unwrap(), len);
            assert!(
                dst[..len] == payload(i as u64, len)[..],
                "message {i} of {len} bytes"
            );
        }
    });
    for (i, &len) in sizes.iter().enumerate() {
        let m = payload(i as u64, len);
        b.send(&m).unwrap();
        b.rndv_invalidate(&m);
    }
    h.join().unwrap();
    let big = sizes.iter().filter(|&&l| l > switch).count() as u64;
    let s = b.rndv_send_cache_stats().unwrap();
    assert_eq!(s.misses, 1 + big, "{s:?}");
    assert_eq!(s.entries, 0, "{s:?}");
}

/// `recv_into_many`: several rendezvous messages read together (their READs in flight at
/// once), eager messages between them, every byte checked, sizes across chunk boundaries.
#[test]
fn recv_into_many_reads_several_messages_at_once() {
    let ctx = device_or_skip!("recv_into_many_reads_several_messages_at_once");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    a.set_rndv_config(RndvConfig {
        cache_bytes: 64 << 20,
        ..a.rndv_config()
    });
    let sizes: Vec<usize> = (0..24)
        .map(|i| match i % 4 {
            0 => 300_000 + 4099 * i,
            1 => 100 + i,
            2 => (1 << 20) + 1 + i,
            _ => (3 << 20) - i,
        })
        .collect();
    let bufs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &l)| payload(i as u64, l))
        .collect();
    let expect = sizes.clone();
    let h = thread::spawn(move || {
        let mut dst: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 4 << 20]).collect();
        let mut seen = 0usize;
        let mut batches = 0;
        while seen < expect.len() {
            let mut views: Vec<&mut [u8]> = dst.iter_mut().map(|b| &mut b[..]).collect();
            let lens = a.recv_into_many(&mut views).unwrap();
            batches += 1;
            for (k, &n) in lens.iter().enumerate() {
                let i = seen + k;
                assert_eq!(n, expect[i], "message {i}");
                assert!(dst[k][..n] == payload(i as u64, n)[..], "message {i}");
            }
            seen += lens.len();
        }
        (a, batches)
    });
    let mut handles = Vec::new();
    for buf in &bufs {
        handles.push(b.send_start(buf).unwrap());
    }
    for h in handles {
        h.wait().unwrap();
    }
    let (a, batches) = h.join().unwrap();
    let big = sizes.iter().filter(|&&l| l > b.switch_point()).count() as u64;
    assert_eq!(a.rndv_stats().received, big);
    assert_eq!(b.rndv_stats().sent, big);
    println!("24 messages in {batches} receives");
}

/// As the shared-memory test of the same name: A's eager messages fill B's partitions while B
/// sends A a large message; A's receive must send `done` through B's partitions, and B, waiting
/// for it, gives them back. Then B receives every one of A's messages, intact and in order.
#[test]
fn a_receive_that_must_answer_is_not_held_up_by_its_own_messages() {
    let ctx = device_or_skip!("a_receive_that_must_answer_is_not_held_up_by_its_own_messages");
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    let mut sent = 0u64;
    while a.try_send(&payload(sent, 1000)).is_ok() {
        sent += 1;
    }
    assert!(sent > 0);
    let len = 4 << 20;
    let sender = thread::spawn(move || {
        let big = payload(99, len);
        b.send(&big).expect("the large send completes");
        b
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = thread::spawn(move || {
        let mut buf = vec![0u8; len];
        let n = a.recv_into(&mut buf).expect("the large message");
        let _ = tx.send(());
        (a, n, buf)
    });
    rx.recv_timeout(HANG_GUARD)
        .expect("the receive that answers hung");
    let (a, n, buf) = receiver.join().unwrap();
    assert_eq!(n, len);
    assert!(buf == payload(99, len));
    let b = sender.join().unwrap();
    for i in 0..sent {
        let m = b
            .recv_timeout(HANG_GUARD)
            .expect("every message A sent before");
        assert!(*m == payload(i, 1000)[..], "message {i}");
    }
    drop(a);
}

/// As the shared-memory test of the same name: B started a transfer to A, then blocks in eager
/// sends while A's earlier messages fill B's partitions; A's receive of the transfer answers
/// through B's partitions, which B, waiting for credits with its transfer unanswered, gives
/// back. Every message arrives intact and in order at both ends.
#[test]
fn a_receive_that_must_answer_is_not_held_up_by_a_sender_waiting_for_credits() {
    let ctx = device_or_skip!(
        "a_receive_that_must_answer_is_not_held_up_by_a_sender_waiting_for_credits"
    );
    let mgr = manager();
    let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
    let mut sent = 0u64;
    while a.try_send(&payload(sent, 1000)).is_ok() {
        sent += 1;
    }
    let len = 4 << 20;
    let eager = 4 * sent;
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
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = thread::spawn(move || {
        let mut buf = vec![0u8; len];
        let n = a.recv_into(&mut buf).expect("the large message");
        assert_eq!(n, len);
        assert!(buf == payload(99, len));
        for i in 0..eager {
            let m = a.recv_timeout(HANG_GUARD).expect("eager message");
            assert!(*m == payload(1000 + i, 500)[..], "eager {i}");
        }
        let _ = tx.send(());
        a
    });
    rx.recv_timeout(HANG_GUARD)
        .expect("the receive that answers hung");
    let a = receiver.join().unwrap();
    let b = sender.join().unwrap();
    for i in 0..sent {
        let m = b
            .recv_timeout(HANG_GUARD)
            .expect("every message A sent before");
        assert!(*m == payload(i, 1000)[..], "message {i}");
    }
    drop(a);
}

/// As the shared-memory test of the same name: A's eager messages fill B's partitions, and B,
/// having started a large transfer to A, does not call in until A's receive has returned. A's
/// receive reads the message (or refuses it, its buffer one byte short), and its answer, with no
/// room towards B, waits in A's queue instead of holding the receive; A's next call (a send or
/// a receive) sends it once B's wait has given partitions back. B's handle then completes or
/// reports the refusal, and every message arrives intact and in order at both ends.
#[test]
fn a_receive_returns_while_its_answer_waits_for_room() {
    let ctx = device_or_skip!("a_receive_returns_while_its_answer_waits_for_room");
    let mgr = manager();
    for refuse in [false, true] {
        for next_is_send in [false, true] {
            let (a, b) = pair(&ctx, mgr.local_addr(), &Layout::default());
            common::answer_room::answer_waits_for_room(
                a,
                b,
                refuse,
                next_is_send,
                HANG_GUARD / 2,
                HANG_GUARD,
                &format!("refuse {refuse}, next call a send {next_is_send}"),
            );
        }
    }
}
