//! A hostile shared-memory peer: it passes the handshake (built here from the public `shm`
//! primitives, as any process on the host could), then writes what an honest sender never
//! would: out-of-range immediates, stale generations, headers whose length exceeds the span or
//! the segment, garbage control messages, forged credit notices, forged rendezvous requests. Each time the victim answers
//! with a clear protocol error, fails that connection only, and keeps its other connections.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rsmsg::core::{
    ControlMessage, Generation, Header, Immediate, Layout, MessageKind, PartitionIndex,
    ProtocolError, SegmentId,
};
use rsmsg::shm::{CreditMailbox, DoorbellProducer, PushOutcome, ShmRegion};
use rsmsg::transport::shm::{ShmListener, connect_path};
use rsmsg::transport::{PollMode, TransportError};

#[path = "support/shm_handshake.rs"]
mod shm_handshake;

use shm_handshake::MAILBOX_SLOTS;

fn layout() -> Layout {
    "256:64:4,4k:16:4".parse().unwrap()
}

/// A peer that completed the handshake and holds the victim's regions.
struct Hostile {
    _sock: UnixStream,
    /// The victim's target segments, mapped writable.
    segments: Vec<ShmRegion>,
    /// The victim's doorbell.
    bell: DoorbellProducer,
    /// The victim's credit mailbox (credits for what the victim sends us).
    mailbox: CreditMailbox,
    _own: (Arc<ShmRegion>, rsmsg::shm::WakeSocket, Vec<ShmRegion>),
}

impl Hostile {
    fn connect(path: &Path) -> Hostile {
        let h = shm_handshake::connect(path, &layout());
        Hostile {
            _sock: h.sock,
            segments: h.segments,
            mailbox: CreditMailbox::new(h.control.clone(), h.mailbox_offset, MAILBOX_SLOTS)
                .unwrap(),
            bell: DoorbellProducer::new(h.control, 0, h.ring).unwrap(),
            _own: (h.own_control, h.own_event, h.own_segments),
        }
    }

    fn header(&mut self, segment: usize, offset: usize, h: Header) {
        self.segments[segment].copy_in(offset, &h.encode()).unwrap();
    }

    fn ring(&mut self, imm: u32) {
        assert_eq!(self.bell.try_push(imm).unwrap(), PushOutcome::Pushed);
    }

    /// Rings with `header` in the doorbell slot (the copy the receiver validates first).
    fn ring_with(&mut self, imm: u32, header: [u8; 16]) {
        assert_eq!(
            self.bell.try_push_with(imm, &header).unwrap(),
            PushOutcome::Pushed
        );
    }
}

fn first_message_imm(generation: Generation) -> u32 {
    Immediate::message(SegmentId(0), PartitionIndex::from_u16(0), generation).get()
}

fn data_header(len: u32, generation: Generation) -> Header {
    Header {
        kind: MessageKind::Data,
        len,
        seq: 0,
        generation,
    }
}

/// One attack: what the hostile peer writes, and what the victim must answer.
type Attack = (&'static str, fn(&mut Hostile), fn(&ProtocolError) -> bool);

fn attacks() -> Vec<Attack> {
    vec![
        (
            "immediate naming a segment that does not exist",
            |h| {
                h.ring(
                    Immediate::message(SegmentId(200), PartitionIndex::from_u16(0), Generation(0))
                        .get(),
                )
            },
            |e| matches!(e, ProtocolError::UnknownSegment { .. }),
        ),
        (
            "immediate naming a partition out of range",
            |h| {
                h.ring(
                    Immediate::message(SegmentId(0), PartitionIndex::from_u16(9999), Generation(0))
                        .get(),
                )
            },
            |e| {
                matches!(
                    e,
                    ProtocolError::PartitionOutOfRange { .. }
                        | ProtocolError::UnexpectedPartition { .. }
                )
            },
        ),
        (
            "immediate of an unknown type",
            |h| h.ring(0xc000_0000),
            |e| matches!(e, ProtocolError::UnknownImmediateType { .. }),
        ),
        (
            "stale generation",
            |h| {
                h.header(0, 0, data_header(10, Generation(5)));
                h.ring(first_message_imm(Generation(5)));
            },
            |e| matches!(e, ProtocolError::StaleGeneration { .. }),
        ),
        (
            "header length beyond the span",
            |h| {
                h.header(0, 0, data_header(4 * 256, Generation::from_lap(0)));
                h.ring(first_message_imm(Generation::from_lap(0)));
            },
            |e| {
                matches!(
                    e,
                    ProtocolError::LengthBeyondSpan { .. }
                        | ProtocolError::LengthBeyondSegmentEnd { .. }
                )
            },
        ),
        (
            "header length of 4 GiB",
            |h| {
                h.header(0, 0, data_header(u32::MAX, Generation::from_lap(0)));
                h.ring(first_message_imm(Generation::from_lap(0)));
            },
            |e| {
                matches!(
                    e,
                    ProtocolError::LengthBeyondSpan { .. }
                        | ProtocolError::LengthBeyondSegmentEnd { .. }
                )
            },
        ),
        (
            "bad header magic",
            |h| {
                h.segments[0].copy_in(0, &[0xff; 16]).unwrap();
                h.ring(first_message_imm(Generation::from_lap(0)));
            },
            |e| matches!(e, ProtocolError::BadMagic { .. }),
        ),
        (
            "bad header magic in the doorbell slot (a valid header in the partition)",
            |h| {
                h.header(0, 0, data_header(10, Generation::from_lap(0)));
                h.ring_with(first_message_imm(Generation::from_lap(0)), [0xff; 16]);
            },
            |e| matches!(e, ProtocolError::BadMagic { .. }),
        ),
        (
            "header in the doorbell slot with a length beyond the span",
            |h| {
                h.header(0, 0, data_header(10, Generation::from_lap(0)));
                let bad = data_header(4 * 256, Generation::from_lap(0)).encode();
                h.ring_with(first_message_imm(Generation::from_lap(0)), bad);
            },
            |e| {
                matches!(
                    e,
                    ProtocolError::LengthBeyondSpan { .. }
                        | ProtocolError::LengthBeyondSegmentEnd { .. }
                )
            },
        ),
        (
            "header in the doorbell slot with a stale generation",
            |h| {
                h.header(0, 0, data_header(10, Generation::from_lap(0)));
                let bad = data_header(10, Generation(64)).encode();
                h.ring_with(first_message_imm(Generation::from_lap(0)), bad);
            },
            |e| matches!(e, ProtocolError::StaleGeneration { .. }),
        ),
        (
            "out-of-sequence message",
            |h| {
                let mut hd = data_header(10, Generation::from_lap(0));
                hd.seq = 77;
                h.header(0, 0, hd);
                h.ring(first_message_imm(Generation::from_lap(0)));
            },
            |e| matches!(e, ProtocolError::OutOfSequence { .. }),
        ),
        (
            "garbage control message",
            |h| {
                let mut hd = data_header(8, Generation::from_lap(0));
                hd.kind = MessageKind::Control;
                h.header(0, 0, hd);
                h.segments[0]
                    .copy_in(16, &[9, 1, 2, 3, 4, 5, 6, 7])
                    .unwrap();
                h.ring(first_message_imm(Generation::from_lap(0)));
            },
            |e| matches!(e, ProtocolError::BadControl { .. }),
        ),
        (
            "credit notice for partitions never sent",
            |h| h.ring(Immediate::credit(SegmentId(0), 1000).get()),
            |e| matches!(e, ProtocolError::CreditAboveHead { .. }),
        ),
        (
            "credit notice for a segment that does not exist",
            |h| h.ring(Immediate::credit(SegmentId(99), 0).get()),
            |e| matches!(e, ProtocolError::UnknownSegment { .. }),
        ),
    ]
}

#[test]
fn every_attack_fails_only_its_connection_with_a_clear_error() {
    let name = format!("hostile-{}", std::process::id());
    let listener = Arc::new(ShmListener::bind(&name, layout(), PollMode::Busy).unwrap());
    let path = listener.path().to_path_buf();

    // An honest peer, connected first and checked after every attack.
    let honest_path = path.clone();
    let honest =
        thread::spawn(move || connect_path(&honest_path, layout(), PollMode::Busy).unwrap());
    let victim_of_honest = listener.accept().unwrap();
    let honest = honest.join().unwrap();
    let mut round = 0u32;
    let mut check_honest = |why: &str| {
        let msg = format!("round {round} after {why}");
        honest.send(msg.as_bytes()).unwrap();
        assert_eq!(&*victim_of_honest.recv().unwrap(), msg.as_bytes());
        victim_of_honest.send(b"ok").unwrap();
        assert_eq!(&*honest.recv().unwrap(), b"ok");
        round += 1;
    };
    check_honest("setup");

    for (what, attack, expected) in attacks() {
        let p = path.clone();
        let hostile = thread::spawn(move || {
            let mut h = Hostile::connect(&p);
            attack(&mut h);
            h
        });
        let victim = listener.accept().unwrap();
        let _h = hostile.join().unwrap();
        let err = match victim.recv_timeout(Duration::from_secs(30)) {
            Ok(m) => panic!("{what}: accepted a message of {} bytes", m.len()),
            Err(e) => e,
        };
        match &err {
            TransportError::Protocol(p) => assert!(expected(p), "{what}: unexpected error {p:?}"),
            other => panic!("{what}: expected a protocol error, got {other:?}"),
        }
        assert!(!err.to_string().is_empty());
        // That connection is failed for good, with the reason kept.
        assert!(victim.failure().is_some(), "{what}");
        assert!(victim.try_send(b"x").is_err(), "{what}");
        assert!(victim.try_recv().is_err(), "{what}");
        check_honest(what);
    }
}

#[test]
fn a_forged_rendezvous_request_is_refused_without_reading_anything() {
    let name = format!("hostile-rdv-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Busy).unwrap();
    let p = listener.path().to_path_buf();
    let hostile = thread::spawn(move || {
        let mut h = Hostile::connect(&p);
        // A request for 10 bytes at an address the peer made up, below any switch point.
        let body = ControlMessage::RendezvousRequest {
            id: 1,
            addr: 0x1000,
            len: 10,
            rkey: 0,
        }
        .encode();
        let mut hd = data_header(body.as_slice().len() as u32, Generation::from_lap(0));
        hd.kind = MessageKind::Control;
        h.header(0, 0, hd);
        h.segments[0].copy_in(16, body.as_slice()).unwrap();
        h.ring(first_message_imm(Generation::from_lap(0)));
        h
    });
    let victim = listener.accept().unwrap();
    let _h = hostile.join().unwrap();
    match victim.recv_timeout(Duration::from_secs(30)) {
        Err(TransportError::RendezvousRefused { len, .. }) => assert_eq!(len, 10),
        Ok(m) => panic!("accepted a forged rendezvous of {} bytes", m.len()),
        Err(e) => panic!("expected a refusal, got {e:?}"),
    }
}

#[test]
fn a_flood_of_immediates_while_the_victim_waits_for_credits_fails_its_connection() {
    let name = format!("hostile-flood-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Event).unwrap();
    let p = listener.path().to_path_buf();
    // Every message takes at least one partition, so no honest peer has more immediates
    // outstanding than this.
    let limit = Layout::recv_wqe_bound_for(&layout(), &layout()) as usize;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let hostile = thread::spawn(move || {
        let mut h = Hostile::connect(&p);
        // It releases nothing, so the victim runs out of credits and waits; meanwhile it rings
        // the victim's doorbell twice as often as the victim's partitions allow (zero-length
        // writes on verbs would do the same).
        let imm = first_message_imm(Generation::from_lap(0));
        let mut pushed = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pushed < 2 * limit && std::time::Instant::now() < deadline {
            match h.bell.try_push(imm).unwrap() {
                PushOutcome::Pushed => pushed += 1,
                PushOutcome::Full => thread::sleep(Duration::from_micros(100)),
            }
        }
        // Stays connected until the victim has answered.
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
        (h, pushed)
    });
    let victim = listener.accept().unwrap();
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    let sender = thread::spawn(move || {
        let mut sent = 0usize;
        let err = loop {
            match victim.send(&[7u8; 100]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        res_tx.send((sent, err.to_string())).unwrap();
        victim
    });
    let (sent, err) = res_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the victim still waits for credits after a flood of immediates (no bound)");
    done_tx.send(()).unwrap();
    let victim = sender.join().unwrap();
    let (_h, pushed) = hostile.join().unwrap();
    assert!(sent > 0, "nothing was sent before the wait");
    assert!(
        err.contains("message immediates pending") && err.contains(&limit.to_string()),
        "{err}"
    );
    assert!(pushed > limit, "the flood stopped at {pushed} of {limit}");
    assert!(victim.failure().is_some());
}

#[test]
fn a_credit_notice_frees_only_what_the_mailbox_says() {
    let name = format!("hostile-notice-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Busy).unwrap();
    let p = listener.path().to_path_buf();
    let (step_tx, step_rx) = std::sync::mpsc::channel::<u64>();
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
    let hostile = thread::spawn(move || {
        let mut h = Hostile::connect(&p);
        // Each step: the credit to announce for segment 0, and whether the mailbox says so too
        // (the high bit set: the notice alone).
        while let Ok(step) = step_rx.recv() {
            let freed = step & !(1 << 63);
            if step >> 63 == 0 {
                h.mailbox.store(0, freed).unwrap();
            }
            h.ring(Immediate::credit(SegmentId(0), freed).get());
            ack_tx.send(()).unwrap();
        }
        h
    });
    let victim = listener.accept().unwrap();
    // Fill every partition the peer offers (it releases nothing); each message takes one.
    let mut sent = 0;
    while victim.try_send(&[1u8; 100]).is_ok() {
        sent += 1;
    }
    assert!(sent >= 64, "only {sent} messages fit");
    // A notice for the first message with nothing in the mailbox, as a notice left queued
    // behind 2^22 partitions would be rebuilt: it frees nothing.
    step_tx.send(1 | 1 << 63).unwrap();
    ack_rx.recv().unwrap();
    assert!(victim.try_recv().unwrap().is_none());
    assert!(
        victim.try_send(&[2u8; 100]).is_err(),
        "a partition the receiver never released was written again"
    );
    assert!(victim.failure().is_none(), "{:?}", victim.failure());
    // The same credit in the mailbox, then its notice: the partition is free.
    step_tx.send(1).unwrap();
    ack_rx.recv().unwrap();
    assert!(victim.try_recv().unwrap().is_none());
    victim.try_send(&[3u8; 100]).unwrap();
    drop(step_tx);
    let _h = hostile.join().unwrap();
}

#[test]
fn a_flood_of_duplicate_credit_notices_does_not_hold_a_call_that_never_waits() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    /// How long the flood lasts, and how long one call may take before it counts as hung (a
    /// guard against a hang, far above any real call, not a measure of speed).
    const FLOOD: Duration = Duration::from_secs(2);
    const GUARD: Duration = Duration::from_secs(10);

    /// Stops the flood however the test ends, so a failed guard does not leave it spinning.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    let name = format!("hostile-dup-notice-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Busy).unwrap();
    let p = listener.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = Stop(stop.clone());
    let payload = b"behind the notices".to_vec();
    let hostile = {
        let (stop, payload) = (stop.clone(), payload.clone());
        thread::spawn(move || {
            let mut h = Hostile::connect(&p);
            // The victim has sent nothing and its mailbox says nothing was freed: a notice for
            // 0 freed partitions of segment 0 is valid and changes nothing. Re-pushed as soon as
            // there is room, so the ring never runs dry while the victim pops.
            let notice = Immediate::credit(SegmentId(0), 0).get();
            let mut pushed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match h.bell.try_push(notice).unwrap() {
                    PushOutcome::Pushed => pushed += 1,
                    PushOutcome::Full => std::hint::spin_loop(),
                }
            }
            // Then one real message, queued behind what is left of the flood.
            h.header(
                0,
                0,
                data_header(payload.len() as u32, Generation::from_lap(0)),
            );
            h.segments[0].copy_in(16, &payload).unwrap();
            let imm = first_message_imm(Generation::from_lap(0));
            let deadline = Instant::now() + Duration::from_secs(30);
            while h.bell.try_push(imm).unwrap() == PushOutcome::Full {
                assert!(
                    Instant::now() < deadline,
                    "the victim stopped taking arrivals"
                );
                thread::sleep(Duration::from_micros(100));
            }
            (h, pushed)
        })
    };
    let victim = listener.accept().unwrap();

    // The victim's calls run on their own thread; each reports when it returns.
    #[derive(Debug)]
    enum Call {
        TryRecv(Option<Vec<u8>>),
        PollReady(bool),
        Timeout(Result<Vec<u8>, TransportError>, Duration),
    }
    let (tx, rx) = mpsc::channel::<Call>();
    let flooding = Arc::new(AtomicBool::new(true));
    let worker = {
        let flooding = flooding.clone();
        thread::spawn(move || {
            for i in 0u64.. {
                let call = if i % 64 == 63 && flooding.load(Ordering::Relaxed) {
                    // A timed wait keeps its deadline while notices keep coming.
                    let t = Duration::from_millis(20);
                    let start = Instant::now();
                    let r = victim.recv_timeout(t).map(|m| m.to_vec());
                    Call::Timeout(r, start.elapsed())
                } else if i % 2 == 0 {
                    Call::TryRecv(victim.try_recv().unwrap().map(|m| m.to_vec()))
                } else {
                    Call::PollReady(victim.poll_ready().unwrap())
                };
                let got = matches!(call, Call::TryRecv(Some(_)) | Call::Timeout(Ok(_), _));
                if tx.send(call).is_err() || got {
                    break;
                }
            }
            victim
        })
    };
    let started = Instant::now();
    let mut calls = 0u64;
    let got = loop {
        let call = rx
            .recv_timeout(GUARD)
            .expect("a call that never waits did not return while credit notices kept coming");
        calls += 1;
        match call {
            Call::TryRecv(Some(m)) => break m,
            Call::TryRecv(None) => {}
            // Only the message, sent once the flood stopped, makes one ready.
            Call::PollReady(ready) => assert!(!ready || stop.load(Ordering::Relaxed)),
            // The message, sent once the flood stopped, may come to a timed wait already asked.
            Call::Timeout(Ok(m), _) if stop.load(Ordering::Relaxed) => break m,
            Call::Timeout(r, took) => {
                assert!(
                    matches!(r, Err(TransportError::Timeout(_))),
                    "recv_timeout during the flood: {r:?}"
                );
                assert!(took < GUARD, "recv_timeout took {took:?}");
            }
        }
        if started.elapsed() >= FLOOD && !stop.load(Ordering::Relaxed) {
            flooding.store(false, Ordering::Relaxed);
            stop.store(true, Ordering::Relaxed);
        }
    };
    assert_eq!(got, payload, "the message behind the notices");
    let victim = worker.join().unwrap();
    let (_h, pushed) = hostile.join().unwrap();
    assert!(victim.failure().is_none(), "{:?}", victim.failure());
    let budget = Layout::recv_wqe_bound_for(&layout(), &layout()) as u64;
    assert!(pushed > 2 * budget, "only {pushed} notices were pushed");
    assert!(calls > 1, "{calls} calls");
}

#[test]
fn a_call_that_never_waits_takes_at_most_a_receive_queue_of_notices() {
    use std::sync::mpsc;

    let name = format!("hostile-notice-bound-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Busy).unwrap();
    let p = listener.path().to_path_buf();
    // No honest peer has more immediates outstanding than this; the doorbell ring (a power of
    // two) has room for more, which a hostile peer fills.
    let budget = Layout::recv_wqe_bound_for(&layout(), &layout()) as u64;
    let payload = b"after the notices".to_vec();
    // Each step: the victim made one call; the hostile answers how many entries it took, found
    // by refilling the ring (`true`: then one real message).
    let (step_tx, step_rx) = mpsc::channel::<bool>();
    let (taken_tx, taken_rx) = mpsc::channel::<(u64, u64)>();
    let hostile = {
        let payload = payload.clone();
        thread::spawn(move || {
            let mut h = Hostile::connect(&p);
            let notice = Immediate::credit(SegmentId(0), 0).get();
            let fill = |h: &mut Hostile| {
                let mut n = 0u64;
                while h.bell.try_push(notice).unwrap() == PushOutcome::Pushed {
                    n += 1;
                }
                n
            };
            let capacity = fill(&mut h);
            taken_tx.send((capacity, 0)).unwrap();
            while let Ok(message) = step_rx.recv() {
                if message {
                    h.header(
                        0,
                        0,
                        data_header(payload.len() as u32, Generation::from_lap(0)),
                    );
                    h.segments[0].copy_in(16, &payload).unwrap();
                    h.ring(first_message_imm(Generation::from_lap(0)));
                    taken_tx.send((capacity, 0)).unwrap();
                } else {
                    taken_tx.send((capacity, fill(&mut h))).unwrap();
                }
            }
            h
        })
    };
    let victim = listener.accept().unwrap();
    let (capacity, _) = taken_rx.recv().unwrap();
    assert!(capacity > budget, "ring of {capacity}, budget {budget}");

    // A full ring of valid notices that free nothing: each call takes a budget's worth and
    // reports nothing yet, the rest staying queued.
    assert!(victim.try_recv().unwrap().is_none());
    step_tx.send(false).unwrap();
    let (_, taken) = taken_rx.recv().unwrap();
    assert_eq!(taken, budget, "try_recv took {taken} notices of {capacity}");
    assert!(!victim.poll_ready().unwrap());
    step_tx.send(false).unwrap();
    let (_, taken) = taken_rx.recv().unwrap();
    assert_eq!(
        taken, budget,
        "poll_ready took {taken} notices of {capacity}"
    );

    // Room for one message behind the notices: later calls deliver it, intact.
    assert!(victim.try_recv().unwrap().is_none());
    step_tx.send(true).unwrap();
    taken_rx.recv().unwrap();
    let mut calls = 0;
    let got = loop {
        calls += 1;
        if let Some(m) = victim.try_recv().unwrap() {
            break m.to_vec();
        }
        assert!(calls <= 2, "no message after {calls} calls");
    };
    assert_eq!(got, payload);
    assert!(victim.try_recv().unwrap().is_none());
    assert!(victim.failure().is_none(), "{:?}", victim.failure());
    drop(step_tx);
    hostile.join().unwrap();
}

/// Clears `O_NONBLOCK` on an fd's open file description, which every process holding the fd
/// shares: what a hostile peer can do to any fd it was passed.
fn make_blocking(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL/F_SETFL on a valid fd; no pointers.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        assert!(flags >= 0);
        assert_eq!(
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK),
            0
        );
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within a guard far above
/// any real call (a hang, not a measure of speed).
fn within_guard<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// The peer holds the end of our wake-up socket it signals. Making that file blocking (which a
/// passed eventfd would have shared with us) must not make our own drain, in `arm`, wait.
#[test]
fn a_peer_that_makes_our_wake_up_blocking_cannot_hang_arm() {
    let name = format!("hostile-wake-arm-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Event).unwrap();
    let p = listener.path().to_path_buf();
    let hostile = thread::spawn(move || {
        let h = shm_handshake::connect(&p, &layout());
        make_blocking(std::os::fd::AsFd::as_fd(&h.victim_wake));
        h
    });
    let victim = listener.accept().unwrap();
    let h = hostile.join().unwrap();
    let victim = within_guard("arm", move || {
        // Twice: the first may find a signal left from set-up; the second surely finds none.
        victim.arm().unwrap();
        assert!(!victim.arm().unwrap(), "nothing was sent");
        victim
    });
    // And the wake-up still works: the peer signals through its end, the victim sees it.
    let one = [1u8];
    // SAFETY: sends one byte from a live buffer on a valid fd.
    let rc = unsafe {
        libc::send(
            std::os::fd::AsRawFd::as_raw_fd(&h.victim_wake),
            one.as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT,
        )
    };
    assert_eq!(rc, 1);
    let fd = victim.event_fd().expect("event mode lends its fd");
    assert!(rsmsg::shm::wait_readable_any(&[fd], Some(Duration::from_secs(5))).unwrap());
}

/// The peer says it waits in an event loop, then fills its own wake-up socket and makes the
/// end we signal blocking (with an eventfd: its counter at the maximum, `O_NONBLOCK` cleared).
/// Our send, which signals it, must not wait.
#[test]
fn a_peer_whose_wake_up_is_full_and_blocking_cannot_hang_a_send() {
    let name = format!("hostile-wake-send-{}", std::process::id());
    let listener = ShmListener::bind(&name, layout(), PollMode::Busy).unwrap();
    let p = listener.path().to_path_buf();
    let hostile = thread::spawn(move || {
        // Mode 1: event, so the victim checks our `sleeping` word after each push.
        let h = shm_handshake::connect_as(&p, &layout(), 1);
        let (ring, _, _) = shm_handshake::geometry(&layout(), &h.victim);
        let mut own_bell =
            rsmsg::shm::DoorbellConsumer::new(h.own_control.clone(), 0, ring).unwrap();
        assert!(!own_bell.arm().unwrap(), "armed with nothing queued");
        let remote = std::os::fd::AsFd::as_fd(&h.own_event_remote);
        let one = [1u8];
        let mut sent = 0usize;
        loop {
            // SAFETY: sends one byte from a live buffer on a valid fd.
            let rc = unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(&remote),
                    one.as_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                break;
            }
            sent += 1;
        }
        assert!(sent > 0, "the queue took something before it filled");
        make_blocking(remote);
        (h, own_bell)
    });
    let victim = listener.accept().unwrap();
    let (h, mut own_bell) = hostile.join().unwrap();
    let victim = within_guard("send", move || {
        victim.send(b"to an armed peer").unwrap();
        victim
    });
    assert!(
        own_bell.try_pop().unwrap().is_some(),
        "the message was pushed"
    );
    assert!(victim.failure().is_none());
    drop(h);
}
