//! Every decoder refuses every bad field with a clear error (never a panic).

use rsmsg::core::{
    ControlMessage, Generation, Header, Immediate, ImmediateKind, Layout, MessageKind,
    PartitionIndex, ProtocolError, Receiver, ReleaseToken, SegmentId, Sender, close_reason,
};

/// Layout used here: segment 0 of group 0 has 8 partitions of 64 bytes, span 4.
fn layout() -> Layout {
    "64:8:4,256:4:2".parse().unwrap()
}

fn header(kind: MessageKind, len: u32, seq: u32, generation: u32) -> [u8; 16] {
    Header {
        kind,
        len,
        seq,
        generation: Generation(generation),
    }
    .encode()
}

fn msg_imm(seg: u8, first: u32, gen_bits: u32) -> u32 {
    Immediate::message(
        SegmentId(seg),
        PartitionIndex::new(first).unwrap(),
        Generation(gen_bits),
    )
    .get()
}

#[test]
fn immediate_round_trip_big_endian() {
    let imm = Immediate::message(
        SegmentId(0xa5),
        PartitionIndex::new(0xbeef).unwrap(),
        Generation(0x47),
    );
    assert_eq!(imm.get() >> 30, 0);
    assert_eq!(imm.to_be_bytes(), imm.get().to_be_bytes());
    assert_eq!(Immediate::from_be_bytes(imm.to_be_bytes()), imm);
    assert_eq!(Immediate::from_be(imm.to_be()), imm);
    assert_eq!(
        imm.decode(),
        Ok(ImmediateKind::Message {
            segment: SegmentId(0xa5),
            first: PartitionIndex::new(0xbeef).unwrap(),
            generation_bits: 0x07,
            bare: false,
        })
    );
    let c = Immediate::credit(SegmentId(3), (5 << 22) + 77);
    assert_eq!(
        c.decode(),
        Ok(ImmediateKind::Credit {
            segment: SegmentId(3),
            freed_low: 77
        })
    );
}

#[test]
fn immediate_unknown_type_refused() {
    let rx = Receiver::new(layout());
    let raw = 3u32 << 30;
    assert!(matches!(
        Immediate(raw).decode(),
        Err(ProtocolError::UnknownImmediateType { ty: 3, .. })
    ));
    assert!(matches!(
        rx.on_immediate(raw),
        Err(ProtocolError::UnknownImmediateType { ty: 3, .. })
    ));
}

#[test]
fn immediate_wrong_side_refused() {
    let rx = Receiver::new(layout());
    let mut tx = Sender::new(layout());
    let credit = Immediate::credit(SegmentId(0), 0).get();
    assert!(matches!(
        rx.on_immediate(credit),
        Err(ProtocolError::UnexpectedImmediateType { .. })
    ));
    assert!(matches!(
        tx.handle_credit_notice(msg_imm(0, 0, 0)),
        Err(ProtocolError::UnexpectedImmediateType { .. })
    ));
}

#[test]
fn immediate_unknown_segment_refused() {
    let rx = Receiver::new(layout());
    assert!(matches!(
        rx.on_immediate(msg_imm(2, 0, 0)),
        Err(ProtocolError::UnknownSegment {
            segment: SegmentId(2),
            ..
        })
    ));
    assert!(matches!(
        rx.on_immediate(msg_imm(255, 0, 0)),
        Err(ProtocolError::UnknownSegment { .. })
    ));
}

#[test]
fn immediate_partition_out_of_range_refused() {
    let rx = Receiver::new(layout());
    assert!(matches!(
        rx.on_immediate(msg_imm(0, 8, 0)),
        Err(ProtocolError::PartitionOutOfRange {
            partition: 8,
            partitions: 8,
            ..
        })
    ));
    assert!(matches!(
        rx.on_immediate(msg_imm(1, 65535, 0)),
        Err(ProtocolError::PartitionOutOfRange { .. })
    ));
}

#[test]
fn immediate_unexpected_partition_refused() {
    let rx = Receiver::new(layout());
    assert!(matches!(
        rx.on_immediate(msg_imm(0, 3, 0)),
        Err(ProtocolError::UnexpectedPartition {
            got: 3,
            expected: 0,
            ..
        })
    ));
}

#[test]
fn immediate_stale_generation_refused() {
    let rx = Receiver::new(layout());
    assert!(matches!(
        rx.on_immediate(msg_imm(0, 0, 1)),
        Err(ProtocolError::StaleGeneration {
            step: "immediate",
            got: 1,
            expected: 0,
            ..
        })
    ));
}

/// A receiver that has taken `n` one-partition messages on segment 0 (held).
fn receiver_with(n: u32) -> Receiver {
    let mut rx = Receiver::new(layout());
    for i in 0..n {
        let a = rx.on_immediate(msg_imm(0, i, 0)).unwrap();
        rx.accept(a, &header(MessageKind::Data, 1, i, 0)).unwrap();
    }
    rx
}

#[test]
fn header_fields_refused() {
    let mut rx = Receiver::new(layout());
    let a = rx.on_immediate(msg_imm(0, 0, 0)).unwrap();
    let good = header(MessageKind::Data, 10, 0, 0);
    let mut bad = good;
    bad[0] = 0;
    assert!(matches!(
        rx.accept(a, &bad),
        Err(ProtocolError::BadMagic { .. })
    ));
    let mut bad = good;
    bad[2] = 3;
    assert!(matches!(
        rx.accept(a, &bad),
        Err(ProtocolError::BadKind { got: 3 })
    ));
    let mut bad = good;
    bad[2] = 0;
    assert!(matches!(
        rx.accept(a, &bad),
        Err(ProtocolError::BadKind { got: 0 })
    ));
    let mut bad = good;
    bad[3] = 1;
    assert!(matches!(
        rx.accept(a, &bad),
        Err(ProtocolError::BadFlags { got: 1 })
    ));
    assert!(matches!(
        rx.accept(a, &good[..15]),
        Err(ProtocolError::HeaderTooShort { len: 15, .. })
    ));
    assert!(matches!(
        rx.accept(a, &[]),
        Err(ProtocolError::HeaderTooShort { .. })
    ));
    // Stale generation in the header.
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, 10, 0, 1 << 6)),
        Err(ProtocolError::StaleGeneration { step: "header", .. })
    ));
    // Length beyond the span: 64 * 4 - 16 = 240 is the most.
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, 241, 0, 0)),
        Err(ProtocolError::LengthBeyondSpan {
            count: 5,
            span: 4,
            ..
        })
    ));
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, u32::MAX, 0, 0)),
        Err(ProtocolError::LengthBeyondSpan { .. })
    ));
    // Wrong sequence number.
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, 10, 1, 0)),
        Err(ProtocolError::OutOfSequence {
            got: 1,
            expected: 0
        })
    ));
    // None of the refusals changed state: the good header is still accepted.
    let d = rx.accept(a, &good).unwrap();
    assert_eq!((d.len, d.seq, d.offset), (10, 0, 16));
    // The same arrival cannot be accepted twice.
    assert!(matches!(
        rx.accept(a, &good),
        Err(ProtocolError::StaleArrival { .. })
    ));
}

#[test]
fn header_len_beyond_segment_end_refused() {
    let mut rx = receiver_with(6);
    let a = rx.on_immediate(msg_imm(0, 6, 0)).unwrap();
    // 3 partitions from 6 run past 8.
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, 150, 6, 0)),
        Err(ProtocolError::LengthBeyondSegmentEnd {
            first: 6,
            count: 3,
            partitions: 8,
            ..
        })
    ));
}

#[test]
fn needless_padding_refused() {
    let mut rx = receiver_with(6);
    // Free the 6 partitions so the wrap itself would be allowed.
    for i in 0..6 {
        let t = ReleaseToken::from_parts(
            SegmentId(0),
            PartitionIndex::new(i).unwrap(),
            1,
            Generation(0),
        );
        rx.release(t).unwrap();
    }
    // A message at partition 0 of lap 1 while 2 partitions fit at 6: the wrap was not needed.
    let a = rx.on_immediate(msg_imm(0, 0, 1)).unwrap();
    assert_eq!(a.padding(), 2);
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, 100, 6, 1)),
        Err(ProtocolError::NeedlessPadding {
            expected: 6,
            count: 2,
            ..
        })
    ));
    // A 3-partition message did need the wrap.
    let d = rx.accept(a, &header(MessageKind::Data, 150, 6, 1)).unwrap();
    assert_eq!(d.token.count(), 3);
}

#[test]
fn a_wrapped_message_onto_its_own_padding_is_refused() {
    // 4 partitions, span 4: three one-partition messages taken and released (freed = head = 3).
    let mut rx = Receiver::new("64:4:4,256:4:2".parse().unwrap());
    for i in 0..3 {
        let a = rx.on_immediate(msg_imm(0, i, 0)).unwrap();
        let d = rx.accept(a, &header(MessageKind::Data, 1, i, 0)).unwrap();
        rx.release(d.token).unwrap();
    }
    // A 4-partition message at partition 0 of lap 1 pads partition 3 of lap 0: with its
    // padding it needs 5 partitions of a ring of 4. Partitions 0..3 are free in the directory,
    // and so was 3 until the padding took it.
    let a = rx.on_immediate(msg_imm(0, 0, 1)).unwrap();
    assert_eq!(a.padding(), 1);
    assert!(matches!(
        rx.accept(a, &header(MessageKind::Data, 200, 3, 1)),
        Err(ProtocolError::PartitionNotFree {
            step: "accept after padding",
            partition: 3,
            ..
        })
    ));
    // The same header through the one-pass path: the same error, and nothing changed.
    assert_eq!(
        rx.accept_with_header(msg_imm(0, 0, 1), &header(MessageKind::Data, 200, 3, 1)),
        Err(ProtocolError::PartitionNotFree {
            step: "accept after padding",
            segment: SegmentId(0),
            partition: 3,
        })
    );
    assert_eq!(
        (rx.head(SegmentId(0)), rx.freed(SegmentId(0))),
        (Some(3), Some(3))
    );
    // Three partitions after the padding fit.
    let d = rx
        .accept_with_header(msg_imm(0, 0, 1), &header(MessageKind::Data, 150, 3, 1))
        .unwrap();
    assert_eq!(d.token.count(), 3);
}

#[test]
fn overrun_of_held_partitions_refused() {
    // All 8 partitions held; a message for lap 1 partition 0 would overwrite a held one.
    let rx = receiver_with(8);
    assert!(matches!(
        rx.on_immediate(msg_imm(0, 0, 1)),
        Err(ProtocolError::PartitionNotFree { partition: 0, .. })
    ));
}

#[test]
fn release_tokens_validated() {
    let mut rx = Receiver::new(layout());
    let a = rx.on_immediate(msg_imm(0, 0, 0)).unwrap();
    let d = rx.accept(a, &header(MessageKind::Data, 100, 0, 0)).unwrap(); // 2 partitions
    let a = rx.on_immediate(msg_imm(0, 2, 0)).unwrap();
    let d2 = rx.accept(a, &header(MessageKind::Data, 1, 1, 0)).unwrap();
    let t = d.token;
    let forge = |seg, first, count, g| {
        ReleaseToken::from_parts(
            SegmentId(seg),
            PartitionIndex::new(first).unwrap(),
            count,
            Generation(g),
        )
    };
    let invalid =
        |r: Result<_, ProtocolError>| matches!(r, Err(ProtocolError::InvalidToken { .. }));
    assert!(matches!(
        rx.release(forge(9, 0, 2, 0)),
        Err(ProtocolError::UnknownSegment { .. })
    ));
    assert!(matches!(
        rx.release(forge(0, 8, 1, 0)),
        Err(ProtocolError::PartitionOutOfRange { .. })
    ));
    assert!(
        invalid(rx.release(forge(0, 1, 1, 0))),
        "not a first partition"
    );
    assert!(invalid(rx.release(forge(0, 5, 1, 0))), "free partition");
    assert!(
        invalid(rx.release(forge(0, 0, 2, 64))),
        "generation from another lap"
    );
    assert!(invalid(rx.release(forge(0, 0, 1, 0))), "wrong count");
    // Out of order: release the second, then a double release of it is refused.
    assert_eq!(rx.release(d2.token), Ok(None));
    assert!(
        invalid(rx.release(d2.token)),
        "double release (released, not yet freed)"
    );
    let c = rx.release(t).unwrap().unwrap();
    assert_eq!(c.freed, 3);
    assert!(invalid(rx.release(t)), "double release (freed)");
    assert!(invalid(rx.release(d2.token)), "double release (freed)");
}

#[test]
fn padding_token_refused() {
    let mut rx = receiver_with(7);
    for i in 0..7 {
        rx.release(ReleaseToken::from_parts(
            SegmentId(0),
            PartitionIndex::new(i).unwrap(),
            1,
            Generation(0),
        ))
        .unwrap();
    }
    let a = rx.on_immediate(msg_imm(0, 0, 1)).unwrap();
    let d = rx.accept(a, &header(MessageKind::Data, 100, 7, 1)).unwrap();
    // Partition 7 was padding and is free again; a token naming it is refused.
    let pad = ReleaseToken::from_parts(
        SegmentId(0),
        PartitionIndex::new(7).unwrap(),
        1,
        Generation(0),
    );
    assert!(matches!(
        rx.release(pad),
        Err(ProtocolError::InvalidToken { .. })
    ));
    rx.release(d.token).unwrap();
}

#[test]
fn credits_validated() {
    let mut tx = Sender::new(layout());
    let r1 = tx.reserve(100).unwrap(); // 2 partitions
    let _r2 = tx.reserve(1).unwrap(); // 1 partition
    assert_eq!(r1.count, 2);
    assert!(matches!(
        tx.handle_credit(SegmentId(0), 4),
        Err(ProtocolError::CreditAboveHead {
            freed: 4,
            head: 3,
            ..
        })
    ));
    assert!(matches!(
        tx.handle_credit(SegmentId(0), 1),
        Err(ProtocolError::CreditNotOnBoundary { freed: 1, .. })
    ));
    assert!(matches!(
        tx.handle_credit(SegmentId(7), 1),
        Err(ProtocolError::UnknownSegment { .. })
    ));
    // Refusals change nothing.
    assert_eq!(tx.credit(SegmentId(0)), Some(0));
    tx.handle_credit(SegmentId(0), 2).unwrap();
    tx.handle_credit(SegmentId(0), 3).unwrap();
    // A notice above head: 22 low bits that cannot be reached from head 3.
    assert!(matches!(
        tx.handle_credit_notice(Immediate::credit(SegmentId(0), 9).get()),
        Err(ProtocolError::CreditAboveHead { .. })
    ));
    assert!(matches!(
        tx.handle_credit_notice(Immediate::credit(SegmentId(8), 0).get()),
        Err(ProtocolError::UnknownSegment { .. })
    ));
}

#[test]
fn control_round_trip() {
    for m in [
        ControlMessage::RendezvousRequest {
            id: 7,
            addr: 0x1000,
            len: 1 << 30,
            rkey: 0xdead,
        },
        ControlMessage::RendezvousDone { id: u64::MAX },
        ControlMessage::Close {
            reason: close_reason::PROTOCOL_ERROR,
        },
    ] {
        let b = m.encode();
        assert_eq!(b.as_slice().len(), m.encoded_len());
        assert_eq!(ControlMessage::decode(b.as_slice()), Ok(m));
    }
}

#[test]
fn control_fields_refused() {
    let bad = |b: &[u8]| {
        matches!(
            ControlMessage::decode(b),
            Err(ProtocolError::BadControl { .. })
        )
    };
    let req = ControlMessage::RendezvousRequest {
        id: 1,
        addr: 64,
        len: 10,
        rkey: 2,
    }
    .encode();
    let req = req.as_slice();
    assert!(bad(&[]));
    assert!(bad(&req[..3]));
    assert!(bad(&req[..31]), "short request");
    let mut long = req.to_vec();
    long.push(0);
    assert!(bad(&long), "long request");
    let mut t = req.to_vec();
    t[0] = 9;
    assert!(bad(&t), "unknown type");
    t[0] = 0;
    assert!(bad(&t), "type 0");
    let mut r = req.to_vec();
    r[2] = 1;
    assert!(bad(&r), "reserved byte");
    let zero_len = ControlMessage::RendezvousRequest {
        id: 1,
        addr: 64,
        len: 0,
        rkey: 2,
    }
    .encode();
    assert!(bad(zero_len.as_slice()));
    let wraps = ControlMessage::RendezvousRequest {
        id: 1,
        addr: u64::MAX,
        len: 2,
        rkey: 2,
    }
    .encode();
    assert!(bad(wraps.as_slice()));
    let done = ControlMessage::RendezvousDone { id: 1 }.encode();
    assert!(bad(&done.as_slice()[..11]));
    let close = ControlMessage::Close { reason: 0 }.encode();
    assert!(bad(&[close.as_slice(), &[0]].concat()));
}

#[test]
fn control_messages_travel_in_partitions() {
    let mut tx = Sender::new(layout());
    let mut rx = Receiver::new(layout());
    let msg = ControlMessage::RendezvousRequest {
        id: 3,
        addr: 4096,
        len: 1 << 20,
        rkey: 9,
    };
    let (r, body) = tx.reserve_control(&msg).unwrap();
    assert_eq!(r.kind, MessageKind::Control);
    let mut seg = vec![0u8; 512];
    seg[r.offset..r.payload_offset()].copy_from_slice(&r.header);
    seg[r.payload_offset()..r.payload_offset() + r.len].copy_from_slice(body.as_slice());
    let a = rx.on_immediate(r.immediate.get()).unwrap();
    let d = rx.accept(a, &seg[a.header_offset()..]).unwrap();
    assert_eq!(d.kind, MessageKind::Control);
    assert_eq!(
        ControlMessage::decode(&seg[d.offset..d.offset + d.len]),
        Ok(msg)
    );
    assert_eq!(
        (tx.stats().control_messages, rx.stats().control_messages),
        (1, 1)
    );
}

fn bare_imm(seg: u8, first: u32, gen_bits: u32) -> u32 {
    Immediate::bare(
        SegmentId(seg),
        PartitionIndex::new(first).unwrap(),
        Generation(gen_bits),
    )
    .get()
}

#[test]
fn bare_immediates_are_checked_like_any_other() {
    let mut rx = Receiver::new(layout());
    // Not at the ring head; never after padding (one partition always fits before the end).
    assert!(matches!(
        rx.on_immediate(bare_imm(0, 1, 0)),
        Err(ProtocolError::UnexpectedPartition { .. })
    ));
    assert!(matches!(
        rx.on_immediate(bare_imm(0, 0, 1)),
        Err(ProtocolError::StaleGeneration { .. })
    ));
    assert!(matches!(
        rx.on_immediate(bare_imm(9, 0, 0)),
        Err(ProtocolError::UnknownSegment { .. })
    ));
    // Segment 0 has 8 partitions of 64 B: move its head to partition 7 with one message of 7.
    let mut tx = Sender::new(layout());
    for _ in 0..7 {
        let r = tx.reserve(64).unwrap();
        assert!(r.bare);
        let d = rx.accept_with_header(r.immediate.get(), &r.header).unwrap();
        assert_eq!((d.len, d.offset), (64, r.offset));
    }
    assert!(matches!(
        rx.on_immediate(bare_imm(0, 0, 1)),
        Err(ProtocolError::UnexpectedPartition {
            got: 0,
            expected: 7,
            ..
        })
    ));
    // The header bytes passed with a bare message are not looked at.
    let a = rx.on_immediate(bare_imm(0, 7, 0)).unwrap();
    assert!(a.is_bare() && a.header_len() == 0);
    let d = rx.accept(a, &[0xff; 3]).unwrap();
    assert_eq!((d.len, d.seq, d.offset), (64, 7, 7 * 64));
    // The ring is full now (nothing released): a bare message on the next lap is refused.
    assert!(matches!(
        rx.on_immediate(bare_imm(0, 0, 1)),
        Err(ProtocolError::PartitionNotFree { .. })
    ));
}

#[test]
fn a_bare_message_longer_than_any_eager_payload_is_refused() {
    // Group 1: 1 KiB partitions of span 1, so the largest eager payload is 1008 B and a sender
    // sends 1024 B by rendezvous, never bare.
    let layout: Layout = "64:8:4,1024:4:1".parse().unwrap();
    assert_eq!(layout.max_eager_payload(), 1008);
    let mut rx = Receiver::new(layout);
    let imm = bare_imm(1, 0, 0);
    let want = ProtocolError::BareBeyondEager {
        segment: SegmentId(1),
        len: 1024,
        max: 1008,
    };
    assert_eq!(rx.on_immediate(imm), Err(want.clone()));
    // The one-pass path (a header beside the immediate) refuses it the same way.
    assert_eq!(rx.accept_with_header(imm, &[0; 16]), Err(want));
    assert_eq!(rx.expected_seq(), 0);
}
