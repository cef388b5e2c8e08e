//! Shared-memory rendezvous when one side may not read the other: readability is settled by the
//! handshake, before any transfer, so a sender whose peer cannot read it streams from its first
//! transfer; and a receive waiting for a streamed message's chunks keeps its deadline, leaving
//! the message (as far as it got) for the next receive.
//!
//! "May not read" is forced with `RSMSG_RNDV_STREAM_ONLY=1` in a child process (this host may
//! permit `process_vm_readv`): the test re-runs its own binary as the peer, selected by an
//! environment variable, so that the setting is on one side only.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rsmsg::core::{Layout, RndvConfig};
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect_path};
use rsmsg::transport::{PollMode, TransportError};

mod common;
use common::payload;

const ROLE_VAR: &str = "RSMSG_STREAM_SETUP_ROLE";
const SOCK_VAR: &str = "RSMSG_STREAM_SETUP_SOCK";
/// How long the parent lets the child run before it kills it (a hang guard: a deadlock fails
/// the test instead of stalling the suite).
const GUARD: Duration = Duration::from_secs(120);

/// Sizes of the transfers the parent starts before anything is received (all above the
/// switch point of the default layout).
const SIZES: [usize; 4] = [300_000, 1 << 20, 3_000_001, 700_000];
/// Sizes of the transfers the child sends back.
const BACK: [usize; 2] = [2 << 20, 262_129];

static NEXT: AtomicU32 = AtomicU32::new(0);

fn sock_path() -> std::path::PathBuf {
    std::env::temp_dir()
        .join(format!("rsmsg-stream-setup-{}", std::process::id()))
        .join(format!("ep{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// A connected pair in one process: (listener side, connector side).
fn pair() -> (ShmConnection, ShmConnection) {
    let path = sock_path();
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy).expect("bind");
    let h = thread::spawn(move || listener.accept().expect("accept"));
    let b = connect_path(&path, Layout::default(), PollMode::Busy).expect("connect");
    (h.join().expect("listener thread"), b)
}

/// The child: connects with `RSMSG_RNDV_STREAM_ONLY=1` (it never reads its peer), receives
/// the parent's transfers in order, then sends its own back with `send_start`, receiving the
/// parent's go-ahead before it waits on them. Panics (a failed exit) on any difference.
fn child(path: &str) {
    let c = connect_path(path.as_ref(), Layout::default(), PollMode::Busy).expect("connect");
    assert!(
        c.rndv_config().stream_only,
        "the child runs with stream_only"
    );
    // The parent may read this process (its descendant) unless Yama forbids every read; the
    // handshake found what the kernel allows.
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert_eq!(c.rndv_peer_can_read(), scope < 2, "ptrace_scope {scope}");
    let mut buf = vec![0u8; 4 << 20];
    for (i, &len) in SIZES.iter().enumerate() {
        let want = payload(i as u64, len);
        if i % 2 == 0 {
            let m = c.recv().expect("recv");
            assert!(*m == want[..], "transfer {i} differs");
        } else {
            let n = c.recv_into(&mut buf).expect("recv_into");
            assert!(n == len && buf[..n] == want[..], "transfer {i} differs");
        }
    }
    let s = c.rndv_stats();
    assert_eq!(s.streamed, SIZES.len() as u64, "{s:?}");
    assert_eq!(s.received, SIZES.len() as u64, "{s:?}");
    // Back: streamed at once by this side's own setting.
    let bufs: Vec<Vec<u8>> = BACK
        .iter()
        .enumerate()
        .map(|(i, &len)| payload(100 + i as u64, len))
        .collect();
    let mut handles: Vec<_> = bufs.iter().map(|b| c.send_start(b).unwrap()).collect();
    let go = c.recv().expect("go-ahead");
    assert_eq!(&*go, b"go");
    drop(go);
    while let Some(h) = handles.pop() {
        h.wait().expect("send back");
    }
    drop(handles);
    assert_eq!(c.rndv_stats().sent, BACK.len() as u64);
    let bye = c.recv().expect("bye");
    assert_eq!(&*bye, b"bye");
}

/// Kills the child if it is still running after [`GUARD`].
fn guard(mut child: Child) -> thread::JoinHandle<std::process::ExitStatus> {
    thread::spawn(move || {
        let until = Instant::now() + GUARD;
        loop {
            if let Some(st) = child.try_wait().expect("wait for the child") {
                return st;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                return child.wait().expect("reap the child");
            }
            thread::sleep(Duration::from_millis(20));
        }
    })
}

/// The peer may not read this process (it says so in the handshake): several transfers are
/// started and none is waited on while the peer receives them all, then the later handles are
/// waited first. Before readability was settled at connection setup, the receiver asked for the
/// first transfer through the segments and waited for chunks only that transfer's handle would
/// send: this deadlocked.
#[test]
fn transfers_started_before_any_wait_reach_a_peer_that_may_not_read() {
    if let Ok(path) = std::env::var(SOCK_VAR)
        && std::env::var(ROLE_VAR).as_deref() == Ok("stream-only-peer")
    {
        child(&path);
        return;
    }
    let path = sock_path();
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy).expect("bind");
    let exe = std::env::current_exe().expect("test executable");
    let child = Command::new(exe)
        .args([
            "--exact",
            "transfers_started_before_any_wait_reach_a_peer_that_may_not_read",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_VAR, "stream-only-peer")
        .env(SOCK_VAR, &path)
        .env(RndvConfig::ENV_STREAM_ONLY, "1")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the child");
    let waiter = guard(child);
    let c = listener.accept().expect("accept the child");
    // Settled by the handshake, before any transfer.
    assert!(!c.rndv_peer_can_read(), "the child said it may not read us");
    let bufs: Vec<Vec<u8>> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| payload(i as u64, len))
        .collect();
    let mut handles: Vec<_> = bufs.iter().map(|b| c.send_start(b).unwrap()).collect();
    // The latest first.
    while let Some(h) = handles.pop() {
        h.wait().expect("transfer");
    }
    drop(handles);
    let s = c.rndv_stats();
    assert_eq!(s.sent, SIZES.len() as u64, "{s:?}");
    assert_eq!(s.refused_by_peer, 0, "{s:?}");
    // The child's transfers back: streamed by the child, received here.
    c.send(b"go").unwrap();
    for (i, &len) in BACK.iter().enumerate() {
        let m = c.recv().expect("transfer back");
        assert!(*m == payload(100 + i as u64, len)[..], "transfer back {i}");
    }
    assert_eq!(c.rndv_stats().streamed, BACK.len() as u64);
    c.send(b"bye").unwrap();
    let st = waiter.join().expect("guard thread");
    assert!(st.success(), "the child failed: {st}");
}

/// The runtime fallback: the receiver stops reading after the connection was made (here
/// `stream_only` set on it alone, after the handshake found the read permitted), so it asks for
/// the first transfer through the segments. The sender has started several transfers and waits
/// on the latest first while the receiver only receives: the chunks asked for go from whatever
/// call on the sender's connection brings the request, not only from that transfer's handle.
#[test]
fn the_runtime_fallback_does_not_wait_for_the_asked_transfers_handle() {
    let (rx, tx) = pair();
    assert!(tx.rndv_peer_can_read());
    rx.set_rndv_config(RndvConfig {
        stream_only: true,
        ..rx.rndv_config()
    });
    let receiver = thread::spawn(move || {
        let mut buf = vec![0u8; 4 << 20];
        for (i, &len) in SIZES.iter().enumerate() {
            let n = rx.recv_into(&mut buf).expect("receive");
            assert!(n == len && buf[..n] == payload(i as u64, len)[..], "{i}");
        }
        let s = rx.rndv_stats();
        assert_eq!(s.streamed, SIZES.len() as u64, "{s:?}");
        rx
    });
    let bufs: Vec<Vec<u8>> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| payload(i as u64, len))
        .collect();
    let mut handles: Vec<_> = bufs.iter().map(|b| tx.send_start(b).unwrap()).collect();
    // The latest first: its wait brings the request for the first one's chunks.
    while let Some(h) = handles.pop() {
        h.wait().expect("transfer");
    }
    drop(handles);
    assert!(!tx.rndv_peer_can_read(), "learnt from the stream request");
    assert_eq!(tx.rndv_stats().sent, SIZES.len() as u64);
    receiver.join().expect("receiver");
}

/// In one process both sides may read each other, and the handshake finds so (unless the
/// whole process streams).
#[test]
fn handshake_finds_a_readable_peer_readable() {
    let (a, b) = pair();
    let forced = RndvConfig::from_env().is_ok_and(|c| c.stream_only);
    assert_eq!(a.rndv_peer_can_read(), !forced);
    assert_eq!(b.rndv_peer_can_read(), !forced);
}

/// A receive waiting for a streamed message's chunks returns `Timeout` at its deadline; the
/// message is kept for the next receive, which gets it whole and in order; the sender's handle
/// completes once it is received, and later messages follow in order.
#[test]
fn a_stalled_stream_times_out_the_receive_and_is_resumed() {
    let (rx, tx) = pair();
    // This side may not read (set after the handshake: the sender learns it from the first
    // transfer, whose chunks only its handle sends; that is the stall).
    rx.set_rndv_config(RndvConfig {
        stream_only: true,
        ..rx.rndv_config()
    });
    let len = 3 << 20;
    let (sent, go) = (mpsc::channel(), mpsc::channel::<()>());
    let sender = thread::spawn(move || {
        let big = payload(7, len);
        let h = tx.send_start(&big).unwrap();
        tx.send(b"after").unwrap();
        sent.0.send(()).unwrap();
        go.1.recv().unwrap();
        h.wait().expect("the transfer completes once received");
        tx.send(b"later").unwrap();
        tx
    });
    sent.1.recv().unwrap();
    // Nothing sends the chunks yet.
    let t = Duration::from_millis(50);
    for _ in 0..3 {
        match rx.recv_timeout(t) {
            Err(TransportError::Timeout(d)) => assert_eq!(d, t),
            other => panic!("expected a timeout, got {:?}", other.map(|m| m.len())),
        }
    }
    assert!(rx.try_recv().unwrap().is_none(), "try_recv does not wait");
    go.0.send(()).unwrap();
    let mut buf = vec![0u8; len + 10];
    let n = rx.recv_into(&mut buf).expect("the resumed message");
    assert_eq!(n, len);
    assert!(buf[..n] == payload(7, len)[..]);
    assert_eq!(&*rx.recv().unwrap(), b"after");
    assert_eq!(&*rx.recv().unwrap(), b"later");
    let tx = sender.join().unwrap();
    assert_eq!(rx.rndv_stats().streamed, 1);
    assert_eq!(rx.rndv_stats().received, 1);
    assert_eq!(tx.rndv_stats().sent, 1);
    // The connection carries on, both ways.
    tx.send(b"ping").unwrap();
    assert_eq!(&*rx.recv().unwrap(), b"ping");
    rx.send(b"pong").unwrap();
    assert_eq!(&*tx.recv().unwrap(), b"pong");
}

/// A timed receive keeps the deadline it was called with when a rendezvous request arrives
/// during it: the streamed message that then stalls makes it time out at that deadline, not a
/// whole timeout after the request came (as it did, the wait starting again for the stream).
#[test]
fn a_stream_that_begins_late_in_a_timed_receive_keeps_its_deadline() {
    let (rx, tx) = pair();
    rx.set_rndv_config(RndvConfig {
        stream_only: true,
        ..rx.rndv_config()
    });
    let len = 1 << 20;
    // The request comes 1.5 s into a 2 s receive; its chunks are not sent until `go`.
    let (timeout, request_at) = (Duration::from_secs(2), Duration::from_millis(1500));
    let (start, go) = (mpsc::channel::<Instant>(), mpsc::channel::<()>());
    let sender = thread::spawn(move || {
        let big = payload(3, len);
        let t0 = start.1.recv().unwrap();
        thread::sleep(request_at.saturating_sub(t0.elapsed()));
        let h = tx.send_start(&big).unwrap();
        go.1.recv().unwrap();
        h.wait().expect("the transfer completes once received");
        tx
    });
    let t0 = Instant::now();
    start.0.send(t0).unwrap();
    match rx.recv_timeout(timeout) {
        Err(TransportError::Timeout(d)) => assert_eq!(d, timeout),
        other => panic!("expected a timeout, got {:?}", other.map(|m| m.len())),
    }
    let took = t0.elapsed();
    assert!(took >= timeout, "returned before its deadline: {took:?}");
    // With the deadline started again when the request came, it ends near 3.5 s.
    assert!(
        took < request_at + timeout - Duration::from_millis(500),
        "the receive waited {took:?}: its deadline started again for the stream"
    );
    go.0.send(()).unwrap();
    let mut buf = vec![0u8; len];
    assert_eq!(rx.recv_into(&mut buf).expect("the resumed message"), len);
    assert!(buf == payload(3, len));
    sender.join().unwrap();
}

/// Short deadlines while the chunks are coming: each receive takes what has arrived and times
/// out, or returns the message; every byte arrives, in order, whatever the split.
#[test]
fn short_deadlines_while_chunks_arrive_lose_nothing() {
    let (rx, tx) = pair();
    rx.set_rndv_config(RndvConfig {
        stream_only: true,
        ..rx.rndv_config()
    });
    let sizes = [8 << 20, 262_129, 5 << 20];
    let sender = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            let m = payload(i as u64, len);
            tx.send(&m).unwrap();
            tx.send(&[i as u8; 3]).unwrap();
        }
        tx
    });
    let mut timeouts = 0u32;
    let mut nones = 0u32;
    for (i, &len) in sizes.iter().enumerate() {
        let m = loop {
            // Alternately a short deadline and no wait at all.
            if (timeouts + nones).is_multiple_of(2) {
                match rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(m) => break m,
                    Err(TransportError::Timeout(_)) => timeouts += 1,
                    Err(e) => panic!("receive {i}: {e}"),
                }
            } else {
                match rx.try_recv() {
                    Ok(Some(m)) => break m,
                    Ok(None) => nones += 1,
                    Err(e) => panic!("receive {i}: {e}"),
                }
            }
        };
        assert!(*m == payload(i as u64, len)[..], "message {i}");
        drop(m);
        assert_eq!(&*rx.recv().unwrap(), &[i as u8; 3][..]);
    }
    let tx = sender.join().unwrap();
    assert_eq!(tx.rndv_stats().sent, sizes.len() as u64);
    assert_eq!(rx.rndv_stats().streamed, sizes.len() as u64);
    eprintln!("{timeouts} timeouts, {nones} empty polls before the messages");
}

/// Both peers stream to each other at once (neither may read the other), messages many times
/// the segments' room: `send_start` waits for credits while it sends the chunks, and takes the
/// peer's chunks meanwhile, so that neither waits for the other for good. Then each receives and
/// waits on its handles, as for any exchange.
#[test]
fn crossing_streamed_transfers_complete() {
    for mode in [PollMode::Busy, PollMode::Event] {
        let path = sock_path();
        let listener = ShmListener::bind_path(&path, Layout::default(), mode).expect("bind");
        let h = thread::spawn(move || listener.accept().expect("accept"));
        let b = connect_path(&path, Layout::default(), mode).expect("connect");
        let a = h.join().expect("listener thread");
        let (done_tx, done_rx) = mpsc::channel();
        let mut sides = Vec::new();
        for (k, c) in [a, b].into_iter().enumerate() {
            c.set_rndv_config(RndvConfig {
                stream_only: true,
                ..c.rndv_config()
            });
            let done = done_tx.clone();
            sides.push(thread::spawn(move || {
                let mine: Vec<Vec<u8>> = (0..3u64)
                    .map(|i| payload(10 * k as u64 + i, (6 << 20) + 1000 * i as usize))
                    .collect();
                let handles: Vec<_> = mine.iter().map(|m| c.send_start(m).unwrap()).collect();
                for i in 0..3u64 {
                    let m = c.recv().expect("crossing receive");
                    let want = payload(10 * (1 - k as u64) + i, (6 << 20) + 1000 * i as usize);
                    assert!(*m == want[..], "side {k}, message {i}");
                }
                for h in handles {
                    h.wait().expect("crossing transfer");
                }
                assert_eq!(c.rndv_stats().streamed, 3);
                assert_eq!(c.rndv_stats().sent, 3);
                done.send(()).unwrap();
                c
            }));
        }
        // A hang guard: a deadlock fails the test instead of stalling the suite.
        for _ in 0..2 {
            done_rx
                .recv_timeout(GUARD)
                .unwrap_or_else(|_| panic!("{mode:?}: the crossing transfers did not complete"));
        }
        for s in sides {
            s.join().expect("side");
        }
    }
}

/// A `Hello` of handshake `version` for the default layout, with `probe` as its probe address.
fn raw_hello(version: u16, probe: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(b"RSHM");
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    let text = Layout::default().to_string();
    h[16..18].copy_from_slice(&(text.len() as u16).to_le_bytes());
    h[18..18 + text.len()].copy_from_slice(text.as_bytes());
    h[504..].copy_from_slice(&probe.to_le_bytes());
    h
}

/// A connector whose hello names no usable probe, or speaks a version before this one (before
/// probes, before bare messages), is refused with a handshake error naming the field; the listener keeps accepting.
#[test]
fn a_hello_without_a_valid_probe_is_refused() {
    use std::io::Write;
    let path = sock_path();
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy).expect("bind");
    let cases: [(u16, u64, &str); 5] = [
        (6, 0, "probe address"),
        (6, u64::MAX - 8, "probe address"),
        (3, rsmsg::shm::probe_addr(), "version 3"),
        (4, rsmsg::shm::probe_addr(), "version 4"),
        // Before bare messages: it would refuse them as an unknown immediate type.
        (5, rsmsg::shm::probe_addr(), "version 5"),
    ];
    for (version, probe, want) in cases {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(&raw_hello(version, probe)).unwrap();
        match listener.accept() {
            Err(TransportError::Handshake { reason, .. }) => {
                assert!(reason.contains(want), "{reason:?} should name {want:?}")
            }
            other => panic!("expected a handshake error, got {:?}", other.map(|_| ())),
        }
    }
    // An honest connector still gets through.
    let h = thread::spawn(move || listener.accept().expect("accept"));
    let c = connect_path(&path, Layout::default(), PollMode::Busy).expect("connect");
    let a = h.join().unwrap();
    c.send(b"hi").unwrap();
    assert_eq!(&*a.recv().unwrap(), b"hi");
}
