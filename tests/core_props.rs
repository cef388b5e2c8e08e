//! Property tests: the directory against a model, selection against its specification, codecs
//! round-trip, decoders never panic on arbitrary input.

use proptest::prelude::*;
use rsmsg::core::{
    ControlMessage, Directory, EntryState, Generation, GroupConfig, Header, Immediate,
    ImmediateKind, Layout, MessageKind, PartitionIndex, Receiver, ReserveError, SegmentId, Sender,
};

#[derive(Debug, Clone)]
enum DirOp {
    /// Place a message of this many partitions at the first free run, if any.
    Place(u32),
    /// Free the n-th (modulo) placed message.
    Free(usize),
}

fn dir_ops() -> impl Strategy<Value = Vec<DirOp>> {
    prop::collection::vec(
        prop_oneof![
            (1u32..6).prop_map(DirOp::Place),
            any::<usize>().prop_map(DirOp::Free)
        ],
        0..200,
    )
}

fn naive_find(model: &[bool], count: u32) -> Option<u32> {
    let c = count as usize;
    (0..model.len())
        .find(|&s| s + c <= model.len() && model[s..s + c].iter().all(|b| !b))
        .map(|s| s as u32)
}

proptest! {
    #[test]
    fn directory_matches_model(n in 1u32..40, ops in dir_ops()) {
        let mut dir = Directory::new(n);
        let mut model = vec![false; n as usize];
        let mut placed: Vec<(u32, u32)> = Vec::new();
        for op in ops {
            match op {
                DirOp::Place(k) => {
                    let found = dir.find_free_run(k);
                    prop_assert_eq!(found, naive_find(&model, k));
                    if let Some(s) = found {
                        prop_assert!(dir.is_free_run(s, k));
                        dir.mark_message(s, k, k * 10, Generation(s), EntryState::InUse);
                        for b in &mut model[s as usize..(s + k) as usize] { *b = true; }
                        placed.push((s, k));
                    }
                }
                DirOp::Free(i) => {
                    if !placed.is_empty() {
                        let (s, k) = placed.swap_remove(i % placed.len());
                        dir.free_run(s, k);
                        for b in &mut model[s as usize..(s + k) as usize] { *b = false; }
                    }
                }
            }
            // Structure of every placed message (claim 6): first flag, extent, next chain, length.
            for &(s, k) in &placed {
                let e = dir.entry(s).unwrap();
                prop_assert!(e.first && e.extent == k && e.len == k * 10);
                let mut p = s;
                for _ in 1..k {
                    let next = dir.entry(p).unwrap().next;
                    prop_assert_eq!(next, p + 1);
                    prop_assert!(!dir.entry(next).unwrap().first);
                    p = next;
                }
                prop_assert_eq!(dir.entry(p).unwrap().next, rsmsg::core::NO_NEXT);
            }
            prop_assert_eq!(dir.busy_count() as usize, model.iter().filter(|b| **b).count());
            for s in 0..n {
                for k in 1..4 {
                    let want = (s + k) as usize <= model.len()
                        && model[s as usize..(s + k) as usize].iter().all(|b| !b);
                    prop_assert_eq!(dir.is_free_run(s, k), want);
                }
            }
        }
    }
}

/// Valid layouts: 2..5 groups, increasing power-of-two sizes, small counts.
fn layouts() -> impl Strategy<Value = Layout> {
    prop::collection::vec((0u32..3, 1u32..20, 1u32..8, 1u32..3), 2..5).prop_map(|gs| {
        let mut shift = 6;
        let groups = gs
            .into_iter()
            .map(|(step, partitions, span, segments)| {
                let g = GroupConfig {
                    partition_size: 1 << shift,
                    partitions,
                    span: span.min(partitions),
                    segments,
                };
                shift += 1 + step;
                g
            })
            .collect();
        Layout::new(groups).unwrap()
    })
}

/// Payload lengths below `max`, one in four a power of two from 64 B to 128 KiB: a partition
/// size of some layouts, so that bare messages (no header, one partition) come up.
fn lens(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..max,
        1 => (6u32..18).prop_map(|k| 1usize << k),
    ]
}

/// The group a data payload of `len` bytes goes to bare first: the one whose partitions are
/// exactly `len` bytes, if `len` goes eagerly at all.
fn bare_group(
    layout: &Layout,
    groups: &[rsmsg::core::GroupEntry],
    len: usize,
) -> Option<rsmsg::core::GroupId> {
    if len > layout.max_eager_payload() {
        return None;
    }
    groups
        .iter()
        .find(|g| g.partition_size as usize == len)
        .map(|g| g.id)
}

/// Whether `count` partitions fit in a ring of `n` with `head`, `freed` (the protocol's rule).
fn ring_room(n: u64, head: u64, freed: u64, count: u64) -> bool {
    let free = n - (head - freed);
    let pos = head % n;
    if pos + count <= n {
        free >= count
    } else {
        free >= (n - pos) + count
    }
}

proptest! {
    #[test]
    fn selection_follows_its_specification(
        layout in layouts(),
        fill in prop::collection::vec(0usize..3000, 0..40),
        credits in prop::collection::vec(any::<bool>(), 0..40),
        len in lens(20_000),
    ) {
        let mut tx = Sender::new(layout.clone());
        // Put the sender in a random state: some messages in use, some credited back.
        for (i, l) in fill.iter().enumerate() {
            if let Ok(r) = tx.reserve(*l)
                && credits.get(i).copied().unwrap_or(false)
            {
                // Credit back everything sent on that segment so far.
                let head = tx.head(r.segment).unwrap();
                tx.handle_credit(r.segment, head).unwrap();
            }
        }
        let wire = len as u64 + 16;
        let groups = tx.tables().groups().to_vec();
        let room_for = |g: &rsmsg::core::GroupEntry, k: u64| {
            g.segments.iter().any(|&s| {
                ring_room(u64::from(g.partitions), tx.head(s).unwrap(), tx.credit(s).unwrap(), k)
            })
        };
        let room = |g: &rsmsg::core::GroupEntry| room_for(g, wire.div_ceil(u64::from(g.partition_size)));
        // A payload of exactly a partition goes bare to that group; when it has no room, the
        // message goes with its header to a group of larger partitions (claim 2), never smaller.
        let bare = bare_group(&layout, &groups, len);
        let tried = |g: &rsmsg::core::GroupEntry| {
            g.can_hold(wire) && bare.is_none_or(|b| g.id.index() > b.index())
        };
        match tx.select(len) {
            Ok(sel) if sel.bare => {
                prop_assert_eq!(Some(sel.group), bare);
                prop_assert_eq!((sel.count, sel.padding), (1, 0));
                prop_assert!(groups[sel.group.index()].segments.contains(&sel.segment));
                prop_assert!(tx.directory(sel.segment).unwrap().is_free_run(sel.first.get(), 1));
            }
            Ok(sel) => {
                if let Some(b) = bare {
                    prop_assert!(!room_for(&groups[b.index()], 1), "bare first, where there is room");
                    prop_assert!(sel.group.index() > b.index(), "then larger partitions only");
                }
                let g = &groups[sel.group.index()];
                prop_assert!(g.can_hold(wire), "claim 9: size and span hold the message");
                prop_assert_eq!(u64::from(sel.count), wire.div_ceil(u64::from(g.partition_size)));
                prop_assert!(sel.count <= g.span);
                prop_assert!(sel.first.get() + sel.count <= g.partitions);
                prop_assert!(g.segments.contains(&sel.segment));
                // Claim 2: every smaller group that could hold the message has no room now.
                for smaller in &groups[..sel.group.index()] {
                    prop_assert!(!(tried(smaller) && room(smaller)));
                }
                // Claim 7: the directory agrees the run is free.
                prop_assert!(tx.directory(sel.segment).unwrap().is_free_run(sel.first.get(), sel.count));
            }
            Err(ReserveError::WouldBlock { group, .. }) => {
                prop_assert!(groups.iter().any(|g| g.can_hold(wire)));
                let first = bare.unwrap_or_else(|| groups.iter().find(|g| g.can_hold(wire)).unwrap().id);
                prop_assert_eq!(group, first);
                if let Some(b) = bare {
                    prop_assert!(!room_for(&groups[b.index()], 1));
                }
                for g in &groups {
                    prop_assert!(!(tried(g) && room(g)), "back-pressure only when no group has room");
                }
            }
            Err(ReserveError::NeedsRendezvous { max, .. }) => {
                prop_assert!(groups.iter().all(|g| !g.can_hold(wire)));
                prop_assert_eq!(max, layout.max_eager_payload());
                prop_assert!(len > max);
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    #[test]
    fn layout_string_round_trips(layout in layouts()) {
        let text = layout.to_string();
        prop_assert_eq!(text.parse::<Layout>().unwrap(), layout);
    }

    #[test]
    fn immediate_round_trips(seg in any::<u8>(), first in any::<u16>(), lap in any::<u64>(), freed in any::<u64>()) {
        let g = Generation::from_lap(lap);
        let imm = Immediate::message(SegmentId(seg), PartitionIndex::from_u16(first), g);
        let back = Immediate::from_be_bytes(imm.to_be_bytes()).decode().unwrap();
        prop_assert_eq!(back, ImmediateKind::Message {
            segment: SegmentId(seg), first: PartitionIndex::from_u16(first), generation_bits: (lap & 63) as u8,
            bare: false,
        });
        let bare = Immediate::bare(SegmentId(seg), PartitionIndex::from_u16(first), g);
        prop_assert_eq!(Immediate::from_be(bare.to_be()).decode().unwrap(), ImmediateKind::Message {
            segment: SegmentId(seg), first: PartitionIndex::from_u16(first), generation_bits: (lap & 63) as u8,
            bare: true,
        });
        let c = Immediate::credit(SegmentId(seg), freed).decode().unwrap();
        prop_assert_eq!(c, ImmediateKind::Credit { segment: SegmentId(seg), freed_low: (freed & 0x3f_ffff) as u32 });
    }

    #[test]
    fn header_round_trips(ctl in any::<bool>(), len in any::<u32>(), seq in any::<u32>(), g in any::<u32>()) {
        let kind = if ctl { MessageKind::Control } else { MessageKind::Data };
        let h = Header { kind, len, seq, generation: Generation(g) };
        prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), imm in any::<u32>()) {
        let _ = Header::decode(&bytes);
        let _ = ControlMessage::decode(&bytes);
        let mut rx = Receiver::new(Layout::default());
        if let Ok(a) = rx.on_immediate(imm) {
            let _ = rx.accept(a, &bytes);
        }
        let mut tx = Sender::new(Layout::default());
        let _ = tx.handle_credit_notice(imm);
        let _ = tx.handle_credit(SegmentId((imm >> 24) as u8), u64::from(imm));
    }

    #[test]
    fn layout_parser_never_panics(s in "[0-9kmgKMG:, x]{0,40}") {
        let _ = s.parse::<Layout>();
    }
}

proptest! {
    /// The transports' hot path: `reserve_first_choice` (with its cached selection) reserves
    /// exactly what full selection would choose whenever that choice is the first group, and
    /// otherwise refuses with `WouldBlock` naming the first group, changing nothing.
    #[test]
    fn first_choice_agrees_with_selection(
        layout in layouts(),
        ops in prop::collection::vec((lens(6000), any::<bool>(), any::<bool>()), 1..120),
    ) {
        let mut fast = Sender::new(layout.clone());
        let mut spec = Sender::new(layout.clone());
        for (len, spill, credit) in ops {
            let expected = spec.select(len);
            let first_group = bare_group(&layout, spec.tables().groups(), len).or_else(|| {
                spec.tables()
                    .groups()
                    .iter()
                    .find(|g| g.can_hold(len as u64 + 16))
                    .map(|g| g.id)
            });
            let before = fast.next_seq();
            match fast.reserve_first_choice(MessageKind::Data, len) {
                Ok(r) => {
                    let sel = expected.expect("selection agrees there is room");
                    prop_assert_eq!(Some(sel.group), first_group);
                    prop_assert_eq!(
                        (r.group, r.segment, r.first, r.count, r.padding, r.bare),
                        (sel.group, sel.segment, sel.first, sel.count, sel.padding, sel.bare)
                    );
                    let s = spec.reserve(len).unwrap();
                    prop_assert_eq!(r, s);
                }
                Err(ReserveError::NeedsRendezvous { .. }) => {
                    let is_rendezvous = matches!(expected, Err(ReserveError::NeedsRendezvous { .. }));
                    prop_assert!(is_rendezvous);
                }
                Err(ReserveError::WouldBlock { group, .. }) => {
                    prop_assert_eq!(Some(group), first_group);
                    prop_assert_eq!(fast.next_seq(), before, "nothing reserved");
                    // Full selection would take the first group's first segment only if the
                    // first choice had taken it too.
                    if let Ok(sel) = expected {
                        let g = spec.tables().group(sel.group).unwrap();
                        prop_assert!(sel.group != group || g.segments[0] != sel.segment);
                    }
                    if spill {
                        prop_assert_eq!(fast.reserve(len), spec.reserve(len));
                    }
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
            if credit {
                for i in 0..spec.tables().segments().len() {
                    let id = SegmentId(i as u8);
                    let head = spec.head(id).unwrap();
                    spec.handle_credit(id, head).unwrap();
                    fast.handle_credit(id, head).unwrap();
                }
            }
        }
    }
}

/// One arrival for [`accept_with_header_agrees_with_two_steps`]: an honest message of this
/// length from the sender, possibly corrupted, or a release of a held message.
#[derive(Debug, Clone)]
enum Arrive {
    /// The sender reserves `len` bytes, for a control message if `control`; `flip` (bit index
    /// into the 16 header bytes and the 32-bit immediate, 0..160) corrupts one bit of what the
    /// receiver sees, if `Some`.
    Message {
        len: usize,
        control: bool,
        flip: Option<u32>,
    },
    /// The receiver releases the n-th (modulo) message it holds, then the sender takes the
    /// credits published so far.
    Release(usize),
    /// Arbitrary bytes from a peer.
    Random { imm: u32, header: [u8; 16] },
    /// The sender takes every partition as freed (a peer that overruns the receiver): what it
    /// sends next lands on partitions the receiver may still hold.
    Overrun,
}

fn arrivals() -> impl Strategy<Value = Vec<Arrive>> {
    prop::collection::vec(
        prop_oneof![
            4 => (lens(3000), prop::bool::weighted(0.2), prop::option::weighted(0.2, 0u32..160))
                .prop_map(|(len, control, flip)| Arrive::Message { len, control, flip }),
            4 => (0usize..64).prop_map(Arrive::Release),
            1 => (any::<u32>(), any::<[u8; 16]>())
                .prop_map(|(imm, header)| Arrive::Random { imm, header }),
            1 => Just(Arrive::Overrun),
        ],
        1..200,
    )
}

/// Everything a receiver exposes about its state (stats, then per segment its head, freed
/// position, held messages and directory, then the expected sequence number), for comparing
/// two of them.
fn receiver_state(r: &Receiver) -> String {
    let mut state = format!("{:?}", r.stats());
    for i in 0..r.tables().segments().len() {
        let id = SegmentId(i as u8);
        state += &format!(
            "|{:?} {:?} {:?} {:?}",
            r.head(id),
            r.freed(id),
            r.held(id),
            r.directory(id)
        );
    }
    state + &format!("|{}", r.expected_seq())
}

proptest! {
    /// The one-pass acceptance of a message whose header travels beside its immediate
    /// (`Receiver::accept_with_header`, the shared-memory receive path) gives exactly the
    /// delivery or the error of `on_immediate` then `accept`, and leaves the same state, for
    /// honest messages (ring wraps and padding included), corrupted ones and arbitrary input.
    #[test]
    fn accept_with_header_agrees_with_two_steps(layout in layouts(), ops in arrivals()) {
        let mut tx = Sender::new(layout.clone());
        let mut one = Receiver::new(layout.clone());
        let mut two = Receiver::new(layout);
        let mut held = Vec::new();
        for op in ops {
            // What the receivers see, then (for a corrupted message they refused) the honest
            // message, so that the stream stays in step with the sender.
            let seen = match op {
                Arrive::Message { len, control, flip } => {
                    let kind = if control { MessageKind::Control } else { MessageKind::Data };
                    let Ok(r) = tx.reserve_kind(kind, len) else { continue };
                    let (imm, header) = (r.immediate.get(), r.header);
                    let (mut bad_imm, mut bad_header) = (imm, header);
                    match flip {
                        Some(b) if b < 128 => bad_header[b as usize / 8] ^= 1 << (b % 8),
                        Some(b) => bad_imm ^= 1 << (b - 128),
                        None => {}
                    }
                    vec![(bad_imm, bad_header), (imm, header)]
                }
                Arrive::Random { imm, header } => vec![(imm, header)],
                Arrive::Overrun => {
                    for i in 0..tx.tables().segments().len() {
                        let id = SegmentId(i as u8);
                        let head = tx.head(id).unwrap();
                        let _ = tx.handle_credit(id, head);
                    }
                    continue;
                }
                Arrive::Release(n) => {
                    if held.is_empty() {
                        continue;
                    }
                    let token = held.remove(n % held.len());
                    let a = one.release(token);
                    prop_assert_eq!(&a, &two.release(token));
                    for i in 0..one.tables().segments().len() {
                        let id = SegmentId(i as u8);
                        let freed = one.freed(id).unwrap();
                        if tx.credit(id).is_some_and(|c| freed > c) {
                            // Refused when a corrupted length was accepted: the two sides
                            // no longer agree on boundaries, and the sender stops there.
                            let _ = tx.handle_credit(id, freed);
                        }
                    }
                    continue;
                }
            };
            for (imm, header) in seen {
                let a = one.accept_with_header(imm, &header);
                let b = two.on_immediate(imm).and_then(|arr| two.accept(arr, &header));
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(receiver_state(&one), receiver_state(&two));
                if let Ok(d) = a {
                    held.push(d.token);
                    break;
                }
            }
        }
    }
}
