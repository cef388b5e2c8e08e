//! A hostile shared-memory peer: it passes the handshake (built here from the public `shm`
//! primitives, as any process on the host could), then writes what an honest sender never
//! would: out-of-range immediates, stale generations, headers whose length exceeds the span or
//! the segment, garbage control messages, forged credit notices, forged rendezvous requests. Each time the victim answers
//! with a clear protocol error, fails that connection only, and keeps its other connections.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rsmsg::core::{
    ControlMessage, Generation, Header, Immediate, Layout, MessageKind, PartitionIndex,
    ProtocolError, SegmentId, Tables,
};
use rsmsg::shm::{
    CreditMailbox, DoorbellProducer, MAX_FDS, PushOutcome, RingLayout, ShmRegion, recv_fds,
    send_fds,
};
use rsmsg::transport::shm::{ShmListener, connect_path};
use rsmsg::transport::{PollMode, TransportError};

const HELLO_LEN: usize = 512;
const MAILBOX_SLOTS: usize = 257;

fn layout() -> Layout {
    "256:64:4,4k:16:4".parse().unwrap()
}

/// Control-region geometry of a receiver with these layouts (as documented in docs/shm.md).
fn geometry(recv: &Layout, send: &Layout) -> (RingLayout, usize) {
    let bound = Layout::recv_wqe_bound_for(recv, send);
    let ring = RingLayout::new(bound.next_power_of_two()).unwrap();
    let mailbox = ring.bytes().next_multiple_of(RingLayout::ALIGN);
    (ring, mailbox + CreditMailbox::bytes(MAILBOX_SLOTS))
}

/// A peer that completed the handshake and holds the victim's regions.
struct Hostile {
    _sock: UnixStream,
    /// The victim's target segments, mapped writable.
    segments: Vec<ShmRegion>,
    /// The victim's doorbell.
    bell: DoorbellProducer,
    _own: (ShmRegion, rsmsg::shm::EventFd, Vec<ShmRegion>),
}

impl Hostile {
    fn connect(path: &Path) -> Hostile {
        let mine = layout();
        let mut sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(b"RSHM");
        hello[4..6].copy_from_slice(&4u16.to_le_bytes());
        hello[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        let text = mine.to_string();
        hello[16..18].copy_from_slice(&(text.len() as u16).to_le_bytes());
        hello[18..18 + text.len()].copy_from_slice(text.as_bytes());
        // Handshake version 4: the readability probe's address in the last 8 bytes.
        hello[HELLO_LEN - 8..].copy_from_slice(&rsmsg::shm::probe_addr().to_le_bytes());
        sock.write_all(&hello).unwrap();
        let mut theirs = [0u8; HELLO_LEN];
        sock.read_exact(&mut theirs).unwrap();
        let n = u16::from_le_bytes([theirs[16], theirs[17]]) as usize;
        let victim: Layout = std::str::from_utf8(&theirs[18..18 + n])
            .unwrap()
            .parse()
            .unwrap();
        // The victim's regions.
        let tables = Tables::new(victim.clone());
        // Control region, wake-up eventfd, then the segments.
        let expected = 2 + tables.segments().len();
        let mut fds = Vec::new();
        while fds.len() < expected {
            let want = (expected - fds.len()).min(MAX_FDS);
            let mut count = [0u8; 8];
            let (_, got) = recv_fds(sock.as_fd(), &mut count, want).unwrap();
            fds.extend(got);
        }
        let (ring, control_bytes) = geometry(&victim, &mine);
        let mut fds = fds.into_iter();
        let control = Arc::new(ShmRegion::from_fd(fds.next().unwrap(), control_bytes).unwrap());
        let _victim_event = fds.next().unwrap();
        let segments = tables
            .segments()
            .iter()
            .zip(fds)
            .map(|(s, fd)| ShmRegion::from_fd(fd, s.bytes() as usize).unwrap())
            .collect();
        // Our own regions, as an honest connector would create them.
        let (_, my_bytes) = geometry(&mine, &victim);
        let my_control = ShmRegion::create("hostile-control", my_bytes).unwrap();
        let my_segments: Vec<ShmRegion> = Tables::new(mine.clone())
            .segments()
            .iter()
            .map(|s| ShmRegion::create("hostile-seg", s.bytes() as usize).unwrap())
            .collect();
        let my_event = rsmsg::shm::EventFd::new().unwrap();
        let all: Vec<_> = [my_control.fd(), my_event.fd()]
            .into_iter()
            .chain(my_segments.iter().map(|s| s.fd()))
            .collect();
        for chunk in all.chunks(MAX_FDS) {
            send_fds(&sock, &(chunk.len() as u64).to_le_bytes(), chunk).unwrap();
        }
        // Whether we can read the victim (version 4), then its status and its own verdict.
        sock.write_all(&[1]).unwrap();
        let mut ok = [0u8; 2];
        sock.read_exact(&mut ok).unwrap();
        assert_eq!(ok[0], 1);
        Hostile {
            _sock: sock,
            segments,
            bell: DoorbellProducer::new(control, 0, ring).unwrap(),
            _own: (my_control, my_event, my_segments),
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
