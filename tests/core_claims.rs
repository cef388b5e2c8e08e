//! One or more tests per claim of the seed (named `claimNN_*`, referenced from `docs/claims.md`),
//! and tests of the credit rules and of the layout configuration.

use rsmsg::core::{
    ConfigError, Delivery, DirEntry, EntryState, Generation, GroupConfig, GroupId, Layout, NO_NEXT,
    PartitionIndex, ProtocolError, Receiver, Reservation, ReserveError, SegmentId, Sender,
    reconstruct_freed,
};

/// A sender and a receiver joined by memory copies.
struct Pair {
    tx: Sender,
    rx: Receiver,
    src: Vec<Vec<u8>>,
    dst: Vec<Vec<u8>>,
}

impl Pair {
    fn new(layout: Layout) -> Self {
        let tx = Sender::new(layout.clone());
        let rx = Receiver::new(layout);
        let bufs: Vec<Vec<u8>> = tx
            .tables()
            .segments()
            .iter()
            .map(|s| vec![0u8; s.bytes() as usize])
            .collect();
        Pair {
            tx,
            rx,
            src: bufs.clone(),
            dst: bufs,
        }
    }

    fn write(&mut self, r: &Reservation, fill: u8) {
        let img = &mut self.src[r.segment.index()];
        img[r.offset..r.payload_offset()].copy_from_slice(r.wire_header());
        img[r.payload_offset()..r.payload_offset() + r.len].fill(fill);
    }

    fn transfer(&mut self, r: &Reservation) -> Result<Delivery, ProtocolError> {
        let s = r.segment.index();
        let span = r.offset..r.offset + r.wire_len();
        let bytes = self.src[s][span.clone()].to_vec();
        self.dst[s][span].copy_from_slice(&bytes);
        let a = self.rx.on_immediate(r.immediate.get())?;
        let off = a.header_offset();
        let hdr = self.dst[s][off..off + a.header_len()].to_vec();
        self.rx.accept(a, &hdr)
    }

    fn send(&mut self, len: usize, fill: u8) -> (Reservation, Delivery) {
        let r = self.tx.reserve(len).expect("room");
        self.write(&r, fill);
        let d = self.transfer(&r).expect("accepted");
        (r, d)
    }

    fn payload(&self, d: &Delivery) -> &[u8] {
        &self.dst[d.token.segment().index()][d.offset..d.offset + d.len]
    }
}

fn small_layout() -> Layout {
    // group 0: 64 B x 8 span 4; group 1: 256 B x 8 span 2; group 2: 1 KiB x 4 span 4.
    Layout::new(vec![
        GroupConfig::new(64, 8, 4),
        GroupConfig::new(256, 8, 2),
        GroupConfig::new(1024, 4, 4),
    ])
    .unwrap()
}

// ---------------------------------------------------------------- claims 1, 10, 19, 20, 22, 24

#[test]
fn claim01_groups_of_unequal_partition_size_message_in_contiguous_partitions_sent_once() {
    let mut p = Pair::new(Layout::default());
    let groups = p.tx.tables().groups();
    assert!(groups.len() >= 2);
    assert!(groups[0].partition_size != groups[1].partition_size);
    // A message of 1000 bytes goes to the 256-byte group: partition size smaller than the message.
    let (r, d) = p.send(1000, 0xab);
    assert_eq!(r.group, GroupId(0));
    assert!(p.tx.tables().groups()[0].partition_size < 1000);
    assert_eq!(
        r.count, 4,
        "1016 wire bytes in four contiguous 256-byte partitions"
    );
    // One transfer: one contiguous byte range and one immediate naming segment and first partition.
    assert_eq!(r.offset, r.first.get() as usize * 256);
    assert_eq!(r.wire_len(), 1016);
    assert_eq!(d.len, 1000);
    assert!(p.payload(&d).iter().all(|&b| b == 0xab));
}

#[test]
fn claim01_source_and_target_segments_have_like_partitions() {
    let tx = Sender::new(Layout::default());
    let rx = Receiver::new(Layout::default());
    assert_eq!(tx.tables().segments(), rx.tables().segments());
    for s in tx.tables().segments() {
        assert_eq!(
            tx.directory(s.id).unwrap().len(),
            rx.directory(s.id).unwrap().len()
        );
    }
}

// ---------------------------------------------------------------- claims 2, 11

#[test]
fn claim02_full_source_segment_moves_to_group_with_larger_partitions() {
    let mut p = Pair::new(small_layout());
    // Fill group 0 (8 partitions of 64 bytes) with messages of one partition, none released.
    for i in 0..8 {
        let (r, _) = p.send(10, i);
        assert_eq!(r.group, GroupId(0));
    }
    let (r, d) = p.send(10, 0xee);
    assert_eq!(
        r.group,
        GroupId(1),
        "group 0 is full: next group with larger partitions"
    );
    assert!(p.payload(&d).iter().all(|&b| b == 0xee));
}

// ---------------------------------------------------------------- claims 9, 18

#[test]
fn claim09_partition_size_and_span_factor_decide_fit() {
    let tx = Sender::new(small_layout());
    // group 0 holds 64 * 4 = 256 wire bytes: 240 payload bytes fit, 241 do not.
    assert_eq!(tx.select(240).unwrap().group, GroupId(0));
    assert_eq!(tx.select(240).unwrap().count, 4);
    // group 1 holds 256 * 2 = 512 wire bytes.
    assert_eq!(tx.select(241).unwrap().group, GroupId(1));
    assert_eq!(tx.select(496).unwrap().group, GroupId(1));
    // group 2 holds 4096.
    assert_eq!(tx.select(497).unwrap().group, GroupId(2));
    assert_eq!(tx.select(4080).unwrap().group, GroupId(2));
    assert_eq!(
        tx.select(4081),
        Err(ReserveError::NeedsRendezvous {
            len: 4081,
            max: 4080
        }),
        "no group can hold it: rendezvous"
    );
    assert_eq!(tx.max_eager_payload(), 4080);
}

// ---------------------------------------------------------------- claims 3, 4, 12, 13, 20-25

#[test]
fn claim03_source_image_mirrors_target_offsets() {
    let mut p = Pair::new(Layout::default());
    for len in [0usize, 100, 5000, 100_000] {
        let r = p.tx.reserve(len).unwrap();
        p.write(&r, 1);
        let a = p.rx.on_immediate(r.immediate.get()).unwrap();
        assert_eq!(a.segment(), r.segment);
        assert_eq!(
            a.header_offset(),
            r.offset,
            "same offset in image and target"
        );
        let s = r.segment.index();
        let bytes = p.src[s][r.offset..r.offset + r.wire_len()].to_vec();
        p.dst[s][r.offset..r.offset + r.wire_len()].copy_from_slice(&bytes);
        let d = p.rx.accept(a, &bytes[..16]).unwrap();
        assert_eq!(d.offset, r.payload_offset());
    }
}

#[test]
fn claim04_segment_table_gives_the_descriptor_to_register() {
    let rx = Receiver::new(Layout::default());
    let seg = rx.tables().segments()[0];
    // What the receiver allocates and registers with the manager, and the sender images.
    assert_eq!(seg.bytes(), 256 * 256);
    assert_eq!(
        (seg.partition_size, seg.partitions, seg.span),
        (256, 256, 4)
    );
    let total: u64 = rx.tables().segments().iter().map(|s| s.bytes()).sum();
    assert_eq!(total, rx.layout().segment_bytes());
}

#[test]
fn claim21_receiver_takes_a_single_message_of_several_partitions() {
    let mut p = Pair::new(Layout::default());
    let (r, d) = p.send(12_000, 7);
    assert_eq!(r.group, GroupId(1));
    assert_eq!(r.count, 3);
    assert_eq!(d.token.count(), 3);
    assert!(p.payload(&d).iter().all(|&b| b == 7));
    assert_eq!(p.rx.stats().messages, 1);
}

// ---------------------------------------------------------------- claims 5, 14

#[test]
fn claim05_group_table_and_segment_table() {
    let layout: Layout = "64:16:4:2,256:8:2:3,1k:4:4".parse().unwrap();
    let tx = Sender::new(layout);
    let t = tx.tables();
    assert_eq!(t.groups().len(), 3);
    assert_eq!(t.groups()[0].segments, vec![SegmentId(0), SegmentId(1)]);
    assert_eq!(
        t.groups()[1].segments,
        vec![SegmentId(2), SegmentId(3), SegmentId(4)]
    );
    assert_eq!(t.groups()[2].segments, vec![SegmentId(5)]);
    assert_eq!(t.segments().len(), 6);
    for (i, s) in t.segments().iter().enumerate() {
        assert_eq!(s.id, SegmentId(i as u8));
        assert_eq!(t.group(s.group).unwrap().partition_size, s.partition_size);
    }
    assert_eq!(t.segment(SegmentId(6)), None);
}

// ---------------------------------------------------------------- claims 6, 15

#[test]
fn claim06_directory_entry_first_flag_next_partition_length_generation() {
    let mut p = Pair::new(small_layout());
    let (_, d1) = p.send(100, 1); // 116 bytes: 2 partitions of 64
    let (r2, d2) = p.send(150, 2); // 166 bytes: 3 partitions
    assert_eq!((r2.first.get(), r2.count), (2, 3));
    for dir in [
        p.tx.directory(SegmentId(0)).unwrap(),
        p.rx.directory(SegmentId(0)).unwrap(),
    ] {
        let e: Vec<DirEntry> = (0..8).map(|i| *dir.entry(i).unwrap()).collect();
        assert!(e[0].first && e[0].extent == 2 && e[0].next == 1 && e[0].len == 100);
        assert!(!e[1].first && e[1].next == NO_NEXT);
        assert!(e[2].first && e[2].extent == 3 && e[2].next == 3 && e[2].len == 150);
        assert!(!e[3].first && e[3].next == 4);
        assert!(!e[4].first && e[4].next == NO_NEXT);
        assert!(
            e[..5]
                .iter()
                .all(|d| d.state == EntryState::InUse && d.generation == Generation(0))
        );
        assert!(e[5..].iter().all(|d| d.state == EntryState::Free));
    }
    p.rx.release(d1.token).unwrap();
    p.rx.release(d2.token).unwrap();
    assert_eq!(p.rx.directory(SegmentId(0)).unwrap().busy_count(), 0);
}

// ---------------------------------------------------------------- claims 7, 16

#[test]
fn claim07_directory_tells_whether_contiguous_partitions_suffice() {
    let mut p = Pair::new(small_layout());
    let (_, d1) = p.send(10, 1); // partition 0
    let (_, _d2) = p.send(10, 2); // partition 1
    let dir = p.rx.directory(SegmentId(0)).unwrap();
    assert!(!dir.is_free_run(0, 1));
    assert!(dir.is_free_run(2, 6));
    assert!(!dir.is_free_run(2, 7), "runs past the end are not free");
    assert_eq!(dir.find_free_run(6), Some(2));
    assert_eq!(dir.find_free_run(7), None);
    // Release the first message: not contiguous with the ring head yet, but its partition is free
    // once freed reaches it.
    p.rx.release(d1.token).unwrap();
    assert!(p.rx.directory(SegmentId(0)).unwrap().is_free_run(0, 1));
    // The sender's directory still shows partition 0 busy until the credit arrives.
    let txdir = p.tx.directory(SegmentId(0)).unwrap();
    assert!(!txdir.is_free_run(0, 1));
}

// ---------------------------------------------------------------- claims 8, 17

#[test]
fn claim08_additional_groups_and_segments_added_at_run_time() {
    let layout: Layout = "64:4:1,128:4:1,256:4:1,512:4:1".parse().unwrap();
    let mut p = Pair::new(layout);
    assert_eq!(p.tx.tables().groups().len(), 4);
    let sizes: Vec<u32> =
        p.tx.tables()
            .groups()
            .iter()
            .map(|g| g.partition_size)
            .collect();
    assert_eq!(sizes, vec![64, 128, 256, 512]);
    // Grow group 0: the receiver creates the target segment, the sender adds the image under its id.
    let id = p.rx.add_segment(GroupId(0)).unwrap();
    assert_eq!(id, SegmentId(4));
    assert!(matches!(
        p.tx.add_segment(GroupId(0), SegmentId(9)),
        Err(ConfigError::UnexpectedSegmentId { .. })
    ));
    p.tx.add_segment(GroupId(0), id).unwrap();
    assert_eq!(p.tx.tables().groups()[0].segments, vec![SegmentId(0), id]);
    assert!(matches!(
        p.rx.add_segment(GroupId(7)),
        Err(ConfigError::UnknownGroup { .. })
    ));
    p.src.push(vec![0; 256]);
    p.dst.push(vec![0; 256]);
    // Fill segment 0 (4 partitions); the fifth small message goes to the new segment of group 0.
    for i in 0..4 {
        assert_eq!(p.send(1, i).0.segment, SegmentId(0));
    }
    let (r, d) = p.send(1, 9);
    assert_eq!((r.group, r.segment), (GroupId(0), id));
    assert_eq!(p.payload(&d), &[9]);
}

#[test]
fn claim08_segment_count_is_capped() {
    let mut rx = Receiver::new("64:1:1:200,128:1:1:56".parse().unwrap());
    assert!(matches!(
        rx.add_segment(GroupId(0)),
        Err(ConfigError::TooManySegments { .. })
    ));
}

// ---------------------------------------------------------------- allocation, release, credits

#[test]
fn back_pressure_never_overwrites() {
    let mut p = Pair::new(small_layout());
    let mut held = Vec::new();
    // Fill every group with messages that need group 2 (too long for 0 and 1).
    for _ in 0..4 {
        held.push(p.send(600, 3).1); // 616 bytes: one 1 KiB partition
    }
    let before = p.tx.stats().credit_stalls;
    assert!(matches!(
        p.tx.reserve(600),
        Err(ReserveError::WouldBlock {
            group: GroupId(2),
            ..
        })
    ));
    assert_eq!(p.tx.stats().credit_stalls, before + 1);
    // The sender's directory still holds every partition: nothing may be overwritten.
    assert_eq!(p.tx.directory(SegmentId(6)).map(|d| d.busy_count()), None);
    let seg = held[0].token.segment();
    assert_eq!(p.tx.directory(seg).unwrap().busy_count(), 4);
    // Releasing the oldest message (quarter of 4 partitions is 1) emits a credit at once.
    let c = p.rx.release(held.remove(0).token).unwrap().expect("credit");
    assert_eq!((c.segment, c.freed), (seg, 1));
    assert!(
        matches!(p.tx.reserve(600), Err(ReserveError::WouldBlock { .. })),
        "credit not applied yet"
    );
    p.tx.handle_credit(c.segment, c.freed).unwrap();
    let (r, d) = p.send(600, 4);
    assert_eq!(
        (r.segment, r.first.get(), r.generation),
        (seg, 0, Generation(1))
    );
    assert!(p.payload(&d).iter().all(|&b| b == 4));
    // The messages still held were not touched.
    for h in &held {
        assert!(p.payload(h).iter().all(|&b| b == 3));
    }
}

#[test]
fn credit_emitted_at_quarter_and_when_idle() {
    // 16 partitions: quarter = 4.
    let mut p = Pair::new("64:16:1,128:4:1".parse().unwrap());
    let ds: Vec<Delivery> = (0..10).map(|i| p.send(1, i).1).collect();
    let mut credits = Vec::new();
    for (i, d) in ds.iter().enumerate() {
        if let Some(c) = p.rx.release(d.token).unwrap() {
            credits.push((i, c.freed));
        }
    }
    // Emitted after the 4th and 8th releases (quarter), then at the 10th (segment idle).
    assert_eq!(credits, vec![(3, 4), (7, 8), (9, 10)]);
}

#[test]
fn out_of_order_release_credits_only_contiguous_free_partitions() {
    let mut p = Pair::new("64:8:1,128:4:1".parse().unwrap());
    let ds: Vec<Delivery> = (0..4).map(|i| p.send(1, i).1).collect();
    // Release 3, 2, 1: partition 0 still held, nothing may be credited.
    for d in ds[1..].iter().rev() {
        assert_eq!(p.rx.release(d.token).unwrap(), None);
        assert_eq!(p.rx.freed(SegmentId(0)), Some(0));
    }
    assert_eq!(p.rx.stats().out_of_order_releases, 3);
    // Releasing 0 frees the whole run at once: one absolute credit of 4.
    let c = p.rx.release(ds[0].token).unwrap().unwrap();
    assert_eq!((c.segment, c.freed), (SegmentId(0), 4));
    p.tx.handle_credit(c.segment, c.freed).unwrap();
    assert_eq!(p.tx.partitions_in_use(SegmentId(0)), Some(0));
}

#[test]
fn absolute_credits_are_idempotent_and_monotonic() {
    let mut p = Pair::new("64:8:1,128:4:1".parse().unwrap());
    let ds: Vec<Delivery> = (0..4).map(|i| p.send(1, i).1).collect();
    for d in &ds {
        p.rx.release(d.token).unwrap();
    }
    p.tx.handle_credit(SegmentId(0), 4).unwrap();
    // Duplicates and older values change nothing.
    p.tx.handle_credit(SegmentId(0), 4).unwrap();
    p.tx.handle_credit(SegmentId(0), 2).unwrap();
    p.tx.handle_credit(SegmentId(0), 0).unwrap();
    assert_eq!(p.tx.credit(SegmentId(0)), Some(4));
}

#[test]
fn padding_at_ring_end_is_freed_by_the_receiver() {
    // 7 partitions, messages of 3: the third goes to partition 0 of lap 1 after one padding.
    let mut p = Pair::new("64:7:3,128:4:1".parse().unwrap());
    let (_, d1) = p.send(150, 1);
    let (_, d2) = p.send(150, 2);
    p.rx.release(d1.token).unwrap();
    let c =
        p.rx.release(d2.token)
            .unwrap()
            .expect("segment idle: credit");
    p.tx.handle_credit(c.segment, c.freed).unwrap();
    assert_eq!(p.tx.credit(SegmentId(0)), Some(6));
    let (r3, d3) = p.send(150, 3);
    assert_eq!(
        (r3.first.get(), r3.padding, r3.generation),
        (0, 1, Generation(1))
    );
    assert_eq!(p.rx.stats().padding_partitions, 1);
    assert_eq!(p.rx.freed(SegmentId(0)), Some(7), "padding freed at once");
    let c = p.rx.release(d3.token).unwrap().unwrap();
    assert_eq!(c.freed, 10);
    p.tx.handle_credit(c.segment, c.freed).unwrap();
    assert_eq!(p.tx.partitions_in_use(SegmentId(0)), Some(0));
}

#[test]
fn flush_and_poll_credit_report_unreported_progress() {
    let mut p = Pair::new("64:16:1,128:4:1".parse().unwrap());
    let ds: Vec<Delivery> = (0..3).map(|i| p.send(1, i).1).collect();
    assert_eq!(
        p.rx.release(ds[0].token).unwrap(),
        None,
        "below a quarter, segment busy"
    );
    assert_eq!(p.rx.poll_credit(), None);
    p.rx.flush();
    let c = p.rx.poll_credit().unwrap();
    assert_eq!((c.segment, c.freed), (SegmentId(0), 1));
    assert_eq!(p.rx.poll_credit(), None);
}

#[test]
fn credit_notice_round_trips_and_reconstructs_across_wrap() {
    let mut p = Pair::new("64:8:1,128:4:1".parse().unwrap());
    let d = p.send(1, 0).1;
    let c = p.rx.release(d.token).unwrap().unwrap();
    assert_eq!(
        p.tx.handle_credit_notice(c.notice().get()),
        Ok((SegmentId(0), 1))
    );
    // Reconstruction near and across a 2^22 boundary.
    let m = 1u64 << 22;
    assert_eq!(reconstruct_freed(5, 3 * m + 10), Some(3 * m + 5));
    assert_eq!(
        reconstruct_freed((m - 3) as u32, 3 * m + 10),
        Some(3 * m - 3)
    );
    assert_eq!(reconstruct_freed(10, 3 * m + 10), Some(3 * m + 10));
    assert_eq!(reconstruct_freed(11, 5), None);
}

// ---------------------------------------------------------------- configuration

#[test]
fn default_layout_report() {
    let l = Layout::default();
    assert_eq!(l.groups().len(), 3);
    assert_eq!(l.segment_bytes(), 64 * 1024 + 256 * 1024 + 1024 * 1024);
    let m = l.registered_bytes();
    assert_eq!(m.target_bytes, l.segment_bytes());
    assert_eq!(m.source_image_bytes, l.segment_bytes());
    assert_eq!(m.mailbox_bytes, 2048);
    assert_eq!(m.total(), 2 * l.segment_bytes() + 2048);
    assert_eq!(l.max_eager_payload(), 256 * 1024 - 16);
    assert_eq!(l.recv_wqe_bound(), 2 * (256 + 64 + 16) + 16);
    assert_eq!(l.to_string(), "256:256:4,4096:64:4,65536:16:4");
    assert_eq!(l.to_string().parse::<Layout>().unwrap(), l);
}

#[test]
fn layout_parse_accepts_suffixes_and_segments() {
    let l: Layout = " 256:256:4 , 4k:64:4:2,64K:16:4 ".parse().unwrap();
    assert_eq!(
        l.groups()[1],
        GroupConfig {
            partition_size: 4096,
            partitions: 64,
            span: 4,
            segments: 2
        }
    );
    assert_eq!(l.groups()[2].partition_size, 65536);
    let l: Layout = "1k:64k:1,1m:1:1".parse().unwrap();
    assert_eq!(l.groups()[0].partitions, 65536);
    assert_eq!(l.groups()[1].partition_size, 1 << 20);
}

#[test]
fn layout_parse_rejects_malformed_input() {
    for bad in [
        "",
        "256:256:4",
        "256:256,4k:64:4",
        "256:256:4,,4k:64:4",
        "256:256:4:1:1,4k:64:4",
        "256x256:4,4k:64:4",
        "256:256:4,4q:64:4",
        "256:-1:4,4k:64:4",
        "256:256:4,k:64:4",
        "256:256:4,99999999999999999999:1:1",
        "256:256:4,16g:1:1",
    ] {
        assert!(bad.parse::<Layout>().is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn layout_validation_names_each_broken_rule() {
    let g = GroupConfig::new;
    let e = |v: Vec<GroupConfig>| Layout::new(v).unwrap_err();
    assert!(matches!(
        e(vec![g(64, 1, 1)]),
        ConfigError::TooFewGroups { groups: 1 }
    ));
    assert!(matches!(
        e(vec![g(32, 1, 1), g(64, 1, 1)]),
        ConfigError::BadPartitionSize { group: 0, .. }
    ));
    assert!(matches!(
        e(vec![g(64, 1, 1), g(96, 1, 1)]),
        ConfigError::BadPartitionSize { group: 1, .. }
    ));
    assert!(matches!(
        e(vec![g(128, 1, 1), g(64, 1, 1)]),
        ConfigError::NotIncreasing { group: 1, .. }
    ));
    assert!(matches!(
        e(vec![g(64, 1, 1), g(64, 1, 1)]),
        ConfigError::NotIncreasing { .. }
    ));
    assert!(matches!(
        e(vec![g(64, 0, 1), g(128, 1, 1)]),
        ConfigError::BadPartitionCount { .. }
    ));
    assert!(matches!(
        e(vec![g(64, 65537, 1), g(128, 1, 1)]),
        ConfigError::BadPartitionCount { .. }
    ));
    assert!(matches!(
        e(vec![g(64, 4, 0), g(128, 1, 1)]),
        ConfigError::BadSpan { .. }
    ));
    assert!(matches!(
        e(vec![g(64, 4, 5), g(128, 1, 1)]),
        ConfigError::BadSpan { .. }
    ));
    let none = GroupConfig {
        segments: 0,
        ..g(64, 4, 1)
    };
    assert!(matches!(
        e(vec![none, g(128, 1, 1)]),
        ConfigError::NoSegments { group: 0 }
    ));
    let many = GroupConfig {
        segments: 256,
        ..g(64, 1, 1)
    };
    assert!(matches!(
        e(vec![many, g(128, 1, 1)]),
        ConfigError::TooManySegments { segments: 257 }
    ));
    assert!(matches!(
        e(vec![g(64, 1, 1), g(1 << 30, 8, 8)]),
        ConfigError::Overflow { .. } | ConfigError::OverMemoryCap { .. }
    ));
    assert!(matches!(
        e(vec![g(64, 1, 1), g(1 << 20, 512, 1)]),
        ConfigError::OverMemoryCap { .. }
    ));
    assert!(Layout::with_memory_cap(vec![g(64, 1, 1), g(1 << 20, 512, 1)], 1 << 30).is_ok());
}

#[test]
fn recv_wqe_bound_covers_both_directions() {
    let a: Layout = "64:10:1,128:5:1".parse().unwrap();
    let b: Layout = "64:100:1,128:50:1:2".parse().unwrap();
    assert_eq!(Layout::recv_wqe_bound_for(&a, &b), 15 + 200 + 16);
    // A message uses at least one partition: the in-flight bound is the partition count.
    let mut p = Pair::new(a.clone());
    let mut n = 0;
    while p.tx.reserve(0).is_ok() {
        n += 1;
    }
    assert_eq!(n, 15);
    let _ = &mut p;
}

#[test]
fn partition_index_is_checked() {
    assert_eq!(PartitionIndex::new(65535).map(|p| p.get()), Some(65535));
    assert_eq!(PartitionIndex::new(65536), None);
}

// ---------------------------------------------------------------- bare messages (immediate type 2)

#[test]
fn a_payload_of_exactly_one_partition_goes_bare_in_one_partition() {
    let mut p = Pair::new(Layout::default());
    // 4096 B in the 4 KiB group: one partition, no header, where 4112 wire bytes would take two.
    let (r, d) = p.send(4096, 0x5a);
    assert!(r.bare);
    assert_eq!((r.group, r.count, r.padding), (GroupId(1), 1, 0));
    assert_eq!((r.wire_len(), r.payload_offset()), (4096, r.offset));
    assert!(r.wire_header().is_empty());
    assert_eq!(r.immediate.kind_bits(), 2);
    assert_eq!((d.offset, d.len, d.seq), (r.offset, 4096, 0));
    assert!(p.payload(&d).iter().all(|&b| b == 0x5a));
    // Its neighbours keep their header; the sequence numbers run on across both kinds.
    for (i, len) in [4095usize, 4097, 256, 65536].into_iter().enumerate() {
        let (r, d) = p.send(len, i as u8);
        assert_eq!(r.bare, len.is_power_of_two(), "{len}");
        assert_eq!(r.wire_len(), len + if r.bare { 0 } else { 16 });
        assert_eq!((d.len, d.seq), (len, i as u32 + 1));
        assert!(p.payload(&d).iter().all(|&b| b == i as u8));
    }
    assert_eq!(p.tx.next_seq(), 5);
    assert_eq!(p.rx.expected_seq(), 5);
}

#[test]
fn a_bare_message_with_no_room_goes_to_larger_partitions_with_its_header() {
    let mut p = Pair::new(small_layout());
    // The 256 B group has 8 partitions: 8 bare messages of 256 B fill it...
    for i in 0..8 {
        let (r, _) = p.send(256, i);
        assert!(r.bare && r.group == GroupId(1) && r.count == 1);
    }
    // ...then the next goes with its header to the 1 KiB group, never to the 64 B group (whose
    // span would hold 272 bytes).
    let (r, d) = p.send(256, 9);
    assert!(!r.bare);
    assert_eq!((r.group, r.count, r.wire_len()), (GroupId(2), 1, 272));
    assert_eq!(d.len, 256);
    assert!(p.payload(&d).iter().all(|&b| b == 9));
    // The first choice alone refuses, naming the bare group.
    assert!(matches!(
        p.tx.reserve_first_choice(rsmsg::core::MessageKind::Data, 256),
        Err(ReserveError::WouldBlock {
            group: GroupId(1),
            ..
        })
    ));
}

#[test]
fn control_messages_and_payloads_beyond_the_eager_limit_are_never_bare() {
    let mut tx = Sender::new(small_layout());
    let r = tx
        .reserve_kind(rsmsg::core::MessageKind::Control, 256)
        .unwrap();
    assert!(!r.bare && r.count == 2 && r.wire_len() == 272);
    // A group of span 1 holds a bare payload of its partition size, which with a header it could
    // not; the largest eager payload (and so the switch point) does not change.
    let layout = Layout::new(vec![
        GroupConfig::new(64, 8, 4),
        GroupConfig::new(1024, 4, 1),
    ])
    .unwrap();
    assert_eq!(layout.max_eager_payload(), 1008);
    let mut tx = Sender::new(layout);
    assert!(matches!(
        tx.reserve(1024),
        Err(ReserveError::NeedsRendezvous { max: 1008, .. })
    ));
    let r = tx.reserve(64).unwrap();
    assert!(r.bare && r.group == GroupId(0));
}
