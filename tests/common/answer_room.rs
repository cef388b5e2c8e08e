//! The scenario of `a_receive_returns_while_its_answer_waits_for_room`, for any link
//! (`tests/shm_rndv.rs`, `tests/verbs_rndv.rs`).

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rsmsg::core::refuse_reason;
use rsmsg::transport::{Connection, Link, SendError, TargetMemory, TransportError};

use super::payload;

/// A's eager messages fill B's partitions, and B, having started a `len`-byte transfer to A,
/// does not call in until A's receive has returned (or `patience` has passed). A's receive
/// reads the message (or refuses it: its buffer is one byte short, `refuse`), and its answer,
/// with no room towards B, must wait in A's queue rather than hold the receive. A's next call
/// (a send when `next_is_send`, else a receive of B's next message) sends it once B's wait has
/// given partitions back. Checks that A's receive returned while B was not calling in, that
/// exactly one answer waited, B's outcome (done or the refusal), and that every message
/// arrives intact and in order at both ends. `guard` bounds A's part.
pub fn answer_waits_for_room<L, T>(
    a: Connection<L, T>,
    b: Connection<L, T>,
    refuse: bool,
    next_is_send: bool,
    patience: Duration,
    guard: Duration,
    case: &str,
) where
    L: Link + Send + 'static,
    T: TargetMemory + Send + 'static,
{
    let mut sent = 0u64;
    while a.try_send(&payload(sent, 1000)).is_ok() {
        sent += 1;
    }
    assert!(sent > 0, "{case}: A filled B's partitions");
    let len = 4 << 20;
    let (returned_tx, returned_rx) = mpsc::channel();
    let sender = thread::spawn(move || {
        let big = payload(99, len);
        let h = b.send_start(&big).expect("send_start");
        // B's application does not call in until A's receive has returned.
        let returned = returned_rx.recv_timeout(patience).is_ok();
        let outcome = match h.wait() {
            Ok(()) => Ok(()),
            Err(SendError::Refused { len: l, reason }) => Err((l, reason)),
            Err(e) => panic!("the large transfer failed: {e}"),
        };
        if !next_is_send {
            b.send(b"next").expect("B's next message");
        }
        (returned, outcome, b)
    });
    let (done_tx, done_rx) = mpsc::channel();
    let c = case.to_owned();
    let receiver = thread::spawn(move || {
        let case = c;
        let mut buf = vec![0u8; if refuse { len - 1 } else { len }];
        let r = a.recv_into(&mut buf);
        let _ = returned_tx.send(());
        if refuse {
            assert!(
                matches!(
                    r,
                    Err(TransportError::RendezvousRefused { len: l, reason })
                        if l == len as u64 && reason == refuse_reason::NO_ROOM
                ),
                "{case}: {r:?}"
            );
        } else {
            assert_eq!(r.expect("the large message"), len, "{case}");
            assert!(buf == payload(99, len), "{case}");
        }
        let deferred = a.rndv_stats().answers_deferred;
        if next_is_send {
            a.send(b"after").expect("A's next send");
        } else {
            let m = a.recv_timeout(guard).expect("B's next message");
            assert_eq!(&*m, b"next", "{case}");
        }
        let _ = done_tx.send(());
        (a, deferred)
    });
    done_rx
        .recv_timeout(guard)
        .unwrap_or_else(|_| panic!("{case}: A's receive and its next call hung"));
    let (a, deferred) = receiver.join().expect("A's thread");
    let (returned, outcome, b) = sender.join().expect("B's thread");
    assert!(
        returned,
        "{case}: A's receive waited for B's application to give a partition back"
    );
    assert_eq!(deferred, 1, "{case}: answers that waited for room");
    if refuse {
        assert_eq!(outcome, Err((len, refuse_reason::NO_ROOM)), "{case}");
    } else {
        assert_eq!(outcome, Ok(()), "{case}");
    }
    for i in 0..sent {
        let m = b.recv_timeout(guard).expect("every message A sent before");
        assert!(*m == payload(i, 1000)[..], "{case}: message {i}");
    }
    if next_is_send {
        let m = b.recv_timeout(guard).expect("A's next message");
        assert_eq!(&*m, b"after", "{case}");
    }
    drop(a);
}
