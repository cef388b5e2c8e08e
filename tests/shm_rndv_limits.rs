//! The receive-side limits of rendezvous over shared memory (`docs/rendezvous.md`, "Limits on
//! the receiving side"): what a peer can make the receiver hold is bounded.
//!
//! - A peer that announces streamed transfers (rkey 1: "the chunks follow") and never sends
//!   their chunks: past `RndvConfig::MAX_QUEUED_TRANSFERS` queued transfers the requests are
//!   refused at once (reason busy), and past `MAX_DROPPING_STREAMS` such refusals still owed
//!   their chunks the connection fails with a protocol error naming the limit; nothing grows
//!   per request without end.
//! - A peer that announces a streamed transfer and then sends data messages instead of its
//!   chunks: the data copied out of the partitions (the chunks need them) is held up to
//!   `COPIED_OUT_FACTOR` times the receive layout's segment bytes, then the connection fails.
//! - An honest sender with more transfers than the receiver queues gets `SendError::Refused`
//!   (busy) for the extra ones; the queued ones arrive intact.
//! - A message too long for `recv_into`: a streamed rendezvous message complete in the
//!   receiver's memory is refused (no room) at both ends, like any rendezvous message, not
//!   answered done and then dropped; an eager message stays queued for the next receive.
//!
//! The hostile peer is built from the crate's public pieces: the shared-memory handshake done
//! by hand, then the core `Sender` placing its messages in the victim's segments, paced by the
//! credits the victim publishes.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rsmsg::core::{
    ControlMessage, Layout, MessageKind, ProtocolError, RndvConfig, Sender, Tables, refuse_reason,
};
use rsmsg::shm::{CreditMailbox, DoorbellProducer, PushOutcome, ShmRegion};
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect_path};
use rsmsg::transport::{PollMode, SendError, TransportError};

mod common;
use common::payload;

#[path = "support/shm_handshake.rs"]
mod shm_handshake;

use shm_handshake::MAILBOX_SLOTS;

/// The rendezvous key that says "the chunks follow the request".
const STREAMED_RKEY: u32 = 1;
/// How long a receive of the victim may wait before the test calls it a hang.
const PATIENCE: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

fn layout() -> Layout {
    "256:64:4,4k:16:4".parse().unwrap()
}

/// A peer that completed the handshake by hand and sends whatever it likes, in order and
/// within the credits the victim gives back (so that only the content is hostile).
struct Hostile {
    _sock: UnixStream,
    /// The victim's target segments, mapped writable, in the order of its tables.
    segments: Vec<ShmRegion>,
    tables: Tables,
    /// The victim's doorbell.
    bell: DoorbellProducer,
    /// Where the victim publishes the credits of our sends.
    mailbox: CreditMailbox,
    tx: Sender,
    _own: (Arc<ShmRegion>, rsmsg::shm::WakeSocket, Vec<ShmRegion>),
}

impl Hostile {
    fn connect(path: &Path) -> Hostile {
        let h = shm_handshake::connect(path, &layout());
        let mailbox =
            CreditMailbox::new(h.own_control.clone(), h.own_mailbox_offset, MAILBOX_SLOTS).unwrap();
        Hostile {
            _sock: h.sock,
            segments: h.segments,
            tables: Tables::new(h.victim.clone()),
            bell: DoorbellProducer::new(h.control, 0, h.ring).unwrap(),
            mailbox,
            tx: Sender::new(h.victim),
            _own: (h.own_control, h.own_event, h.own_segments),
        }
    }

    /// Sends one message, waiting for credits; `false` once `stop` is set (the victim has
    /// given up and stopped releasing).
    fn send(&mut self, kind: MessageKind, body: &[u8], stop: &AtomicBool) -> bool {
        let r = loop {
            match self.tx.reserve_kind(kind, body.len()) {
                Ok(r) => break r,
                Err(_) => {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    for s in self.tables.segments() {
                        let v = self.mailbox.load(s.id.index()).unwrap();
                        if self.tx.credit(s.id).is_some_and(|known| v > known) {
                            self.tx.handle_credit(s.id, v).unwrap();
                        }
                    }
                    thread::yield_now();
                }
            }
        };
        let seg = self
            .tables
            .segments()
            .iter()
            .position(|s| s.id == r.segment)
            .unwrap();
        self.segments[seg]
            .copy_in(r.offset, r.wire_header())
            .unwrap();
        self.segments[seg]
            .copy_in(r.payload_offset(), body)
            .unwrap();
        loop {
            match self
                .bell
                .try_push_with(r.immediate.get(), &r.header)
                .unwrap()
            {
                PushOutcome::Pushed => return true,
                PushOutcome::Full if stop.load(Ordering::Relaxed) => return false,
                PushOutcome::Full => thread::yield_now(),
            }
        }
    }

    /// Announces streamed transfer `id` of `len` bytes (its chunks are never sent).
    fn announce(&mut self, id: u64, len: u64, stop: &AtomicBool) -> bool {
        let body = ControlMessage::RendezvousRequest {
            id,
            addr: 0x10_0000,
            len,
            rkey: STREAMED_RKEY,
        }
        .encode();
        self.send(MessageKind::Control, body.as_slice(), stop)
    }
}

/// A victim listening, and a hostile peer connected to it running `attack` on its own thread
/// until `stop` is set.
fn with_hostile(
    attack: impl FnOnce(&mut Hostile, &AtomicBool) + Send + 'static,
) -> (ShmConnection, Arc<AtomicBool>, thread::JoinHandle<()>) {
    let name = format!(
        "limits-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let listener = ShmListener::bind(&name, layout(), PollMode::Busy).unwrap();
    let p = listener.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = thread::spawn(move || {
        let mut h = Hostile::connect(&p);
        attack(&mut h, &s);
    });
    let victim = listener.accept().unwrap();
    (victim, stop, h)
}

/// Streamed requests without their chunks, in a loop. Before the limits every request was
/// queued with a buffer of its full length reserved (1 GiB each at the default limit), so the
/// loop ended only when the allocation failed; now the queue stops at its limit, the next
/// requests are refused (busy), and the peer that keeps owing chunks fails the connection.
#[test]
fn streamed_requests_without_chunks_are_refused_then_fail_the_connection() {
    // More than the victim can let in before it gives up; far fewer than could hurt it if a
    // limit were missing (64 KiB announced each).
    const FLOOD: u64 = 1000;
    let (victim, stop, hostile) = with_hostile(|h, stop| {
        for id in 0..FLOOD {
            if !h.announce(id, 64 << 10, stop) {
                return;
            }
        }
    });
    let t0 = Instant::now();
    let r = victim.recv_timeout(PATIENCE);
    stop.store(true, Ordering::Relaxed);
    hostile.join().unwrap();
    match &r {
        Err(TransportError::Protocol(ProtocolError::LimitExceeded { limit, .. })) => {
            assert_eq!(*limit, RndvConfig::MAX_DROPPING_STREAMS as u64, "{r:?}");
        }
        other => panic!(
            "expected the dropping limit after {:?}, got {other:?}",
            t0.elapsed()
        ),
    }
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("limit of 16"), "{msg}");
    let s = victim.rndv_stats();
    // The first request was being received; MAX_QUEUED_TRANSFERS more were queued; the next
    // ones were refused at once, up to the dropping limit.
    assert_eq!(
        s.refused_busy,
        RndvConfig::MAX_DROPPING_STREAMS as u64,
        "{s:?}"
    );
    assert_eq!(s.refused_here, s.refused_busy, "{s:?}");
    assert!(victim.failure().is_some());
    assert!(victim.try_recv().is_err());
}

/// A streamed request, then data messages instead of its chunks. The receiver copies each out
/// of its partitions (the chunks need them) and used to keep every copy; now it holds
/// `COPIED_OUT_FACTOR` times its segment bytes at most and fails the connection past that.
#[test]
fn data_instead_of_chunks_fails_the_connection_at_the_copy_limit() {
    // 20 MB at most, far past the limit (640 KiB for this layout).
    const FLOOD: usize = 20_000;
    let (victim, stop, hostile) = with_hostile(|h, stop| {
        if !h.announce(0, 1 << 20, stop) {
            return;
        }
        let data = vec![0xa5u8; 1000];
        for _ in 0..FLOOD {
            if !h.send(MessageKind::Data, &data, stop) {
                return;
            }
        }
    });
    let limit = RndvConfig::COPIED_OUT_FACTOR * layout().segment_bytes();
    let r = victim.recv_timeout(PATIENCE);
    stop.store(true, Ordering::Relaxed);
    hostile.join().unwrap();
    match &r {
        Err(TransportError::Protocol(ProtocolError::LimitExceeded { limit: l, what })) => {
            assert_eq!(*l, limit, "{what}");
            assert!(what.contains("copied out"), "{what}");
        }
        other => panic!("expected the copy limit, got {other:?}"),
    }
    assert!(victim.failure().is_some());
}

/// A connected pair in one process: (listener side, connector side).
fn pair() -> (ShmConnection, ShmConnection) {
    let dir = std::env::temp_dir().join(format!("rsmsg-limits-{}", std::process::id()));
    let path = dir.join(format!("ep{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy).expect("bind");
    let h = thread::spawn(move || listener.accept().expect("accept"));
    let b = connect_path(&path, Layout::default(), PollMode::Busy).expect("connect");
    (h.join().expect("listener thread"), b)
}

fn stream_only(c: &ShmConnection) {
    c.set_rndv_config(RndvConfig {
        stream_only: true,
        ..c.rndv_config()
    });
}

/// An honest sender starts more transfers than the receiver queues while the receiver takes
/// arrivals without receiving them: the extra ones are refused at once (busy) at both ends,
/// the queued ones arrive intact and in order, and the connection stays up.
#[test]
fn transfers_past_the_queue_limit_are_refused_busy_at_both_ends() {
    const EXTRA: usize = 6;
    let total = RndvConfig::MAX_QUEUED_TRANSFERS + EXTRA;
    let (rx, tx) = pair();
    // The transfers must wait in the receiver's queue, which only reads do: a streamed
    // `send_start` pushes its chunks before it returns, so with the receiver not yet receiving
    // the sender would wait for credits instead (as documented), and this test would hang.
    assert!(
        tx.rndv_peer_can_read(),
        "this test needs the reading path (threads of one process may read each other); \
         RSMSG_RNDV_STREAM_ONLY=1 forces streaming"
    );
    let (started, go) = mpsc::channel::<()>();
    let receiver = thread::spawn(move || {
        go.recv().unwrap();
        // Offered more buffers than transfers, it takes everything that has arrived (every
        // request) before it receives the first (alone: over shared memory requests are not
        // batched): the queue fills, and the requests past its limit are refused there and
        // then.
        let mut first = vec![0u8; 400_000];
        let mut rest: Vec<[u8; 0]> = vec![[]; total];
        let mut bufs: Vec<&mut [u8]> = vec![&mut first[..]];
        bufs.extend(rest.iter_mut().map(|b| &mut b[..]));
        let n = rx.recv_into_many(&mut bufs).unwrap();
        drop(bufs);
        assert_eq!(n.len(), 1);
        assert!(first[..n[0]] == payload(0, 300_000)[..]);
        let s = rx.rndv_stats();
        assert_eq!(s.refused_busy, EXTRA as u64, "{s:?}");
        let mut buf = vec![0u8; 400_000];
        for i in 1..RndvConfig::MAX_QUEUED_TRANSFERS {
            let n = rx.recv_into(&mut buf).unwrap();
            assert!(
                buf[..n] == payload(i as u64, 300_000 + i)[..],
                "transfer {i}"
            );
        }
        // Next in line is what the sender sent after all its transfers: the refused ones were
        // not queued.
        let m = rx.recv().unwrap();
        assert_eq!(&*m, b"still up", "a transfer past the limit was delivered");
        drop(m);
        rx
    });
    let bufs: Vec<Vec<u8>> = (0..total).map(|i| payload(i as u64, 300_000 + i)).collect();
    let handles: Vec<_> = bufs.iter().map(|b| tx.send_start(b).unwrap()).collect();
    started.send(()).unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.wait();
        if i < RndvConfig::MAX_QUEUED_TRANSFERS {
            r.unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        } else {
            match r {
                Err(SendError::Refused { reason, len }) => {
                    assert_eq!(reason, refuse_reason::BUSY);
                    assert_eq!(len, 300_000 + i);
                }
                other => panic!("transfer {i}: expected a busy refusal, got {other:?}"),
            }
        }
    }
    tx.send(b"still up").unwrap();
    let rx = receiver.join().unwrap();
    assert_eq!(tx.rndv_stats().refused_by_peer, EXTRA as u64);
    assert_eq!(
        tx.rndv_stats().sent,
        RndvConfig::MAX_QUEUED_TRANSFERS as u64
    );
    assert_eq!(
        rx.rndv_stats().received,
        RndvConfig::MAX_QUEUED_TRANSFERS as u64
    );
}

/// A streamed message whose chunks have all come while the receiver was busy elsewhere, then
/// a `recv_into` buffer too short for it: refused (no room) at both ends, as any rendezvous
/// message. It used to be answered done as soon as its last chunk came, and then dropped by
/// the short receive while its sender counted it delivered.
#[test]
fn a_complete_streamed_message_too_long_for_recv_into_is_refused_at_both_ends() {
    let (a, b) = pair();
    stream_only(&a);
    stream_only(&b);
    let (sent, go) = (mpsc::channel(), mpsc::channel::<()>());
    let sender = thread::spawn(move || {
        // Fits the receiver's free partitions: the send starts and all its chunks go at once.
        let big = payload(1, 600_000);
        let h = b.send_start(&big).unwrap();
        assert!(h.is_rendezvous());
        b.send(b"after").unwrap();
        sent.0.send(()).unwrap();
        let r = h.wait();
        match r {
            Err(SendError::Refused { reason, len }) => {
                assert_eq!(reason, refuse_reason::NO_ROOM);
                assert_eq!(len, 600_000);
            }
            other => panic!("expected a no-room refusal, got {other:?}"),
        }
        go.1.recv().unwrap();
        let m = b.recv().unwrap();
        assert!(*m == payload(2, 300_000)[..]);
        drop(m);
        b
    });
    // A transfer of this side, whose handle's test takes whatever has arrived meanwhile.
    let mine = payload(2, 300_000);
    let mut h = a.send_start(&mine).unwrap();
    sent.1.recv().unwrap();
    assert!(!h.test().unwrap(), "the peer has not received it yet");
    // Everything the sender sent is in now: the request and all its chunks, then "after".
    let mut short = vec![0u8; 100_000];
    match a.recv_into(&mut short) {
        Err(TransportError::RendezvousRefused { len, reason }) => {
            assert_eq!(len, 600_000);
            assert_eq!(reason, refuse_reason::NO_ROOM);
        }
        other => panic!("expected a no-room refusal, got {other:?}"),
    }
    let m = a.recv().unwrap();
    assert_eq!(&*m, b"after");
    drop(m);
    go.0.send(()).unwrap();
    h.wait().unwrap();
    let b = sender.join().unwrap();
    assert_eq!(a.rndv_stats().refused_here, 1);
    assert_eq!(a.rndv_stats().received, 0);
    assert_eq!(b.rndv_stats().refused_by_peer, 1);
    assert_eq!(b.rndv_stats().sent, 0);
}

/// An eager message too long for `recv_into` is not delivered and not lost: the receive says
/// how long it is, and the message stays first in line.
#[test]
fn an_eager_message_too_long_for_recv_into_stays_queued() {
    let (a, b) = pair();
    let m1 = payload(5, 1000);
    b.send(&m1).unwrap();
    b.send(b"next").unwrap();
    let mut small = [0u8; 10];
    match a.recv_into(&mut small) {
        Err(TransportError::BufferTooShort { len, cap }) => {
            assert_eq!((len, cap), (1000, 10));
        }
        other => panic!("expected BufferTooShort, got {other:?}"),
    }
    assert!(a.failure().is_none());
    // Still too short: the same answer, nothing consumed.
    assert!(matches!(
        a.recv_into(&mut small),
        Err(TransportError::BufferTooShort { len: 1000, .. })
    ));
    let mut buf = vec![0u8; 2000];
    let n = a.recv_into(&mut buf).unwrap();
    assert!(buf[..n] == m1[..]);
    let n = a.recv_into(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"next");
    // Its partitions went back: the sender confirms both.
    let t0 = Instant::now();
    while b.confirmed() < 2 && t0.elapsed() < PATIENCE {
        thread::yield_now();
    }
    assert_eq!(b.confirmed(), 2);
}

/// Within the limits an honest exchange is untouched: 32 streamed transfers started while the
/// receiver waits on its own transfer (it takes their chunks meanwhile, so they are all queued
/// complete, unanswered), then received in order; the sender's handles complete once they are.
#[test]
fn thirty_two_streamed_transfers_queued_while_the_receiver_waits_all_arrive() {
    const N: usize = 32;
    let (a, b) = pair();
    stream_only(&a);
    stream_only(&b);
    let sender = thread::spawn(move || {
        let bufs: Vec<Vec<u8>> = (0..N)
            .map(|i| payload(10 + i as u64, 300_000 + 1000 * i))
            .collect();
        let handles: Vec<_> = bufs.iter().map(|x| b.send_start(x).unwrap()).collect();
        // Only now does this side receive the peer's transfer (its wait then completes).
        let m = b.recv().unwrap();
        assert!(*m == payload(1, 400_000)[..]);
        drop(m);
        for (i, h) in handles.into_iter().enumerate() {
            h.wait().unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        }
        assert_eq!(b.rndv_stats().sent, N as u64);
        assert_eq!(b.rndv_stats().refused_by_peer, 0);
        b
    });
    let mine = payload(1, 400_000);
    a.send_start(&mine).unwrap().wait().unwrap();
    let mut dst = vec![0u8; 1 << 20];
    for i in 0..N {
        let want = payload(10 + i as u64, 300_000 + 1000 * i);
        if i % 2 == 0 {
            let n = a.recv_into(&mut dst).unwrap();
            assert!(dst[..n] == want[..], "transfer {i}");
        } else {
            let m = a.recv().unwrap();
            assert!(*m == want[..], "transfer {i}");
        }
    }
    let s = a.rndv_stats();
    assert_eq!(
        (s.received, s.streamed, s.refused_here),
        (N as u64, N as u64, 0)
    );
    sender.join().unwrap();
}
