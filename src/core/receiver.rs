//! The receiving side of one direction: target segments, arrival validation, release and credits.

use super::config::Layout;
use super::directory::{Directory, EntryState};
use super::error::{ConfigError, ProtocolError};
use super::stats::{GroupStats, ReceiverStats};
use super::tables::{SegmentEntry, Tables};
use super::types::{Generation, GroupId, MessageKind, PartitionIndex, RingPos, SegmentId};
use super::wire::{HEADER_LEN, Header, Immediate, ImmediateKind};

/// Allocation state of one target segment.
#[derive(Debug, Clone)]
struct TargetSegment {
    /// Ring position where the next message must start.
    head: RingPos,
    /// Ring position below which every partition is released (contiguously).
    freed: RingPos,
    /// Last `freed` emitted as a credit.
    reported: u64,
    /// Emit a credit once `freed - reported` reaches this (a quarter segment, at least 1).
    quarter: u64,
    partitions: u32,
    /// Messages held by the application.
    held: u32,
    /// The segment's row of the segment table (span, group, partition size), kept here so
    /// that a message costs one lookup.
    entry: SegmentEntry,
    /// log2 of the partition size: byte offset = partition << shift.
    shift: u32,
    directory: Directory,
}

impl TargetSegment {
    fn new(entry: SegmentEntry) -> Self {
        let partitions = entry.partitions;
        TargetSegment {
            head: RingPos::default(),
            freed: RingPos::default(),
            reported: 0,
            quarter: u64::from((partitions / 4).max(1)),
            partitions,
            held: 0,
            entry,
            shift: entry.partition_size.trailing_zeros(),
            directory: Directory::new(partitions),
        }
    }

    /// Hands the application the message of `count` partitions from `first` (the ring head,
    /// checked free): its directory entries, the head, the held count.
    #[inline(always)]
    fn take(&mut self, first: u32, count: u32, h: &Header) {
        let marked =
            self.directory
                .mark_message(first, count, h.len, h.generation, EntryState::InUse);
        debug_assert!(marked, "run checked free and in range");
        self.head.advance(count, self.partitions);
        self.held += 1;
    }

    /// Partitions not yet returned to the sender.
    fn in_use(&self) -> u64 {
        self.head.abs() - self.freed.abs()
    }

    /// Advances `freed` over the contiguous run of released or padding partitions.
    #[inline(always)]
    fn advance(&mut self) {
        while self.freed.abs() < self.head.abs() {
            let pos = self.freed.index();
            let Some(d) = self.directory.entry(pos) else {
                break;
            };
            if !(d.first && matches!(d.state, EntryState::Released | EntryState::Padding)) {
                break;
            }
            let extent = d.extent;
            self.directory.free_run(pos, extent);
            self.freed.advance(extent, self.partitions);
        }
    }

    /// The credit to emit now, if the rule of `docs/protocol.md` says so: `freed` moved by at
    /// least a quarter segment since the last credit, or the segment has nothing in use.
    #[inline(always)]
    fn take_credit(&mut self) -> Option<u64> {
        let freed = self.freed.abs();
        let moved = freed - self.reported;
        if moved > 0 && (moved >= self.quarter || freed == self.head.abs()) {
            self.reported = freed;
            Some(freed)
        } else {
            None
        }
    }
}

/// A validated message immediate, to be completed by [`Receiver::accept`] with the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    segment: SegmentId,
    first: PartitionIndex,
    generation: Generation,
    padding: u32,
    base: u64,
    offset: usize,
    bare: bool,
}

impl Arrival {
    /// Target segment.
    pub fn segment(&self) -> SegmentId {
        self.segment
    }

    /// First partition of the message.
    pub fn first(&self) -> PartitionIndex {
        self.first
    }

    /// Generation (lap) expected for the message.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Partitions the sender skipped before the message (end of the ring).
    pub fn padding(&self) -> u32 {
        self.padding
    }

    /// Byte offset of the header in the target segment: read [`Arrival::header_len`] bytes
    /// there and pass them to [`Receiver::accept`].
    pub fn header_offset(&self) -> usize {
        self.offset
    }

    /// Bytes of the header: [`HEADER_LEN`], or 0 for a bare message (immediate type 2), whose
    /// payload fills its one partition.
    pub fn header_len(&self) -> usize {
        if self.bare { 0 } else { HEADER_LEN }
    }

    /// A bare message: a data payload of exactly one partition, without a header.
    pub fn is_bare(&self) -> bool {
        self.bare
    }
}

/// Names a message held by the application; hand it back to [`Receiver::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReleaseToken {
    segment: SegmentId,
    first: PartitionIndex,
    count: u32,
    generation: Generation,
}

impl ReleaseToken {
    /// Rebuilds a token from its parts (for transports that keep tokens as plain numbers, e.g.
    /// across a C ABI). A token that names no held message is refused by [`Receiver::release`].
    pub fn from_parts(
        segment: SegmentId,
        first: PartitionIndex,
        count: u32,
        generation: Generation,
    ) -> Self {
        ReleaseToken {
            segment,
            first,
            count,
            generation,
        }
    }

    /// Segment of the message.
    pub fn segment(&self) -> SegmentId {
        self.segment
    }

    /// First partition of the message.
    pub fn first(&self) -> PartitionIndex {
        self.first
    }

    /// Partitions of the message.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Generation of the message.
    pub fn generation(&self) -> Generation {
        self.generation
    }
}

/// A message accepted into a target segment: read `len` bytes at `offset` of the segment, then
/// release `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Token to release the partitions with.
    pub token: ReleaseToken,
    /// Data or control.
    pub kind: MessageKind,
    /// Sequence number of the message.
    pub seq: u32,
    /// Byte offset of the payload in the target segment.
    pub offset: usize,
    /// Payload length in bytes.
    pub len: usize,
}

/// A credit to publish: write `freed` into the sender's mailbox slot of `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditUpdate {
    /// The segment.
    pub segment: SegmentId,
    /// Absolute freed position (partitions).
    pub freed: u64,
}

impl CreditUpdate {
    /// The credit notice immediate (type 1) that may follow the mailbox write in event mode.
    pub fn notice(&self) -> Immediate {
        Immediate::credit(self.segment, self.freed)
    }
}

/// Counts a message handed to the application (and the padding skipped before it).
#[inline(always)]
fn count_delivery(st: &mut ReceiverStats, group: GroupId, h: &Header, padding: u32) {
    st.messages += 1;
    st.bytes += u64::from(h.len);
    st.padding_partitions += u64::from(padding);
    if h.kind == MessageKind::Control {
        st.control_messages += 1;
    }
    if let Some(g) = st.per_group.get_mut(group.index()) {
        g.messages += 1;
        g.bytes += u64::from(h.len);
    }
}

/// What a bare message's header would say: data, the whole partition, the next sequence number,
/// the lap its immediate named.
#[inline(always)]
fn bare_header(entry: &SegmentEntry, seq: u32, generation: Generation) -> Header {
    Header {
        kind: MessageKind::Data,
        len: entry.partition_size,
        seq,
        generation,
    }
}

/// The delivery of a message of `count` partitions from `first`, whose header (of `header_len`
/// bytes: 16, or 0 when bare) is at byte `offset` of its segment.
#[inline(always)]
fn delivery(
    segment: SegmentId,
    first: PartitionIndex,
    count: u32,
    h: &Header,
    offset: usize,
    header_len: usize,
) -> Delivery {
    Delivery {
        token: ReleaseToken {
            segment,
            first,
            count,
            generation: h.generation,
        },
        kind: h.kind,
        seq: h.seq,
        offset: offset + header_len,
        len: h.len as usize,
    }
}

/// The receiving side of one direction of a connection.
///
/// Input: [`Receiver::on_immediate`] and [`Receiver::accept`] (a message landed),
/// [`Receiver::release`] (the application is done with it). Output: [`Delivery`]s and
/// [`CreditUpdate`]s (returned by `release`, or drained with [`Receiver::poll_credit`]).
/// No I/O, no clock, no allocation on the hot path.
#[derive(Debug, Clone)]
pub struct Receiver {
    tables: Tables,
    segments: Vec<TargetSegment>,
    expected_seq: u32,
    pending: [u64; 4],
    stats: ReceiverStats,
    /// The layout's largest eager payload: no bare message is longer.
    max_eager: usize,
}

impl Receiver {
    /// A receiver for `layout`, all partitions free.
    pub fn new(layout: Layout) -> Self {
        let tables = Tables::new(layout);
        let segments = tables
            .segments()
            .iter()
            .map(|s| TargetSegment::new(*s))
            .collect();
        let stats = ReceiverStats::new(tables.groups().len());
        let max_eager = tables.layout().max_eager_payload();
        Receiver {
            tables,
            segments,
            expected_seq: 0,
            pending: [0; 4],
            stats,
            max_eager,
        }
    }

    /// The segment group table and segment table.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The layout, including segments added at run time.
    pub fn layout(&self) -> &Layout {
        self.tables.layout()
    }

    /// Counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// Sequence number the next message must carry.
    pub fn expected_seq(&self) -> u32 {
        self.expected_seq
    }

    /// Current absolute freed position of a segment (what a credit would say now).
    pub fn freed(&self, segment: SegmentId) -> Option<u64> {
        self.segments.get(segment.index()).map(|s| s.freed.abs())
    }

    /// Absolute ring position where the next message of a segment must start.
    pub fn head(&self, segment: SegmentId) -> Option<u64> {
        self.segments.get(segment.index()).map(|s| s.head.abs())
    }

    /// Messages of a segment held by the application.
    pub fn held(&self, segment: SegmentId) -> Option<u32> {
        self.segments.get(segment.index()).map(|s| s.held)
    }

    /// Partitions of a group's segments not yet freed.
    pub fn group_partitions_in_use(&self, group: GroupId) -> Option<u64> {
        let g = self.tables.group(group)?;
        Some(
            g.segments
                .iter()
                .map(|s| self.segments[s.index()].in_use())
                .sum(),
        )
    }

    /// Partitions of all segments not yet freed (held, released out of order, padding).
    pub fn total_partitions_in_use(&self) -> u64 {
        self.segments.iter().map(TargetSegment::in_use).sum()
    }

    /// The directory of a target segment.
    pub fn directory(&self, segment: SegmentId) -> Option<&Directory> {
        self.segments.get(segment.index()).map(|s| &s.directory)
    }

    /// Validates a message immediate (host order): type, segment, first partition exactly where
    /// the segment ring says (or 0 when the sender padded to the end; never for a bare message,
    /// whose one partition always fits before the end), generation of that lap, and a free
    /// first partition. Changes nothing until [`Receiver::accept`].
    ///
    /// # Errors
    /// [`ProtocolError::UnknownImmediateType`], [`ProtocolError::UnexpectedImmediateType`] (a
    /// credit notice), [`ProtocolError::UnknownSegment`], [`ProtocolError::BareBeyondEager`],
    /// [`ProtocolError::PartitionOutOfRange`],
    /// [`ProtocolError::UnexpectedPartition`], [`ProtocolError::StaleGeneration`],
    /// [`ProtocolError::PartitionNotFree`].
    #[inline(always)]
    pub fn on_immediate(&self, imm: u32) -> Result<Arrival, ProtocolError> {
        let ImmediateKind::Message {
            segment,
            first,
            generation_bits,
            bare,
        } = Immediate(imm).decode()?
        else {
            return Err(ProtocolError::UnexpectedImmediateType {
                raw: imm,
                expected: "message",
            });
        };
        let s = self
            .segments
            .get(segment.index())
            .ok_or(ProtocolError::UnknownSegment {
                step: "immediate",
                segment,
            })?;
        if bare && s.entry.partition_size as usize > self.max_eager {
            return Err(ProtocolError::BareBeyondEager {
                segment,
                len: s.entry.partition_size,
                max: self.max_eager,
            });
        }
        let f = first.get();
        if f >= s.partitions {
            return Err(ProtocolError::PartitionOutOfRange {
                step: "immediate",
                segment,
                partition: f,
                partitions: s.partitions,
            });
        }
        let pos = s.head.index();
        let mut lap = s.head.lap();
        let padding = if f == pos {
            0
        } else if f == 0 && !bare {
            lap += 1;
            s.partitions - pos
        } else {
            return Err(ProtocolError::UnexpectedPartition {
                segment,
                got: f,
                expected: pos,
            });
        };
        let generation = Generation::from_lap(lap);
        if generation.imm_bits() != generation_bits {
            return Err(ProtocolError::StaleGeneration {
                step: "immediate",
                segment,
                got: u32::from(generation_bits),
                expected: u32::from(generation.imm_bits()),
            });
        }
        if s.directory
            .entry(f)
            .is_none_or(|d| d.state != EntryState::Free)
        {
            return Err(ProtocolError::PartitionNotFree {
                step: "immediate",
                segment,
                partition: f,
            });
        }
        let offset = (f as usize) << s.shift;
        Ok(Arrival {
            segment,
            first,
            generation,
            padding,
            base: s.head.abs(),
            offset,
            bare,
        })
    }

    /// [`Receiver::on_immediate`] then [`Receiver::accept`], for a transport that carries the
    /// header beside the immediate. The common case, a message that starts at its segment's
    /// ring head and fits, is validated and committed in one pass: the immediate is compared
    /// with the one a sender builds for that position and lap, and the partitions are known
    /// free from the ring positions (every partition from `head` up to `freed` plus the
    /// segment's size is free, every other one is not: the directory says the same, see the
    /// debug assertion). Anything else (padding at the ring's end, any check that fails) takes
    /// the two steps, so the result and every error are exactly theirs.
    ///
    /// # Errors
    /// As [`Receiver::on_immediate`] and [`Receiver::accept`].
    #[inline(always)]
    pub fn accept_with_header(
        &mut self,
        imm: u32,
        header: &[u8; HEADER_LEN],
    ) -> Result<Delivery, ProtocolError> {
        if let Some(d) = self.accept_at_head(imm, header) {
            return Ok(d);
        }
        let arrival = self.on_immediate(imm)?;
        self.accept(arrival, header)
    }

    /// The one-pass case of [`Receiver::accept_with_header`]: `Some` once committed, `None`
    /// (nothing changed) when the two-step path must decide.
    #[inline(always)]
    fn accept_at_head(&mut self, imm: u32, header: &[u8; HEADER_LEN]) -> Option<Delivery> {
        let segment = SegmentId((imm >> 22) as u8);
        let s = self.segments.get_mut(segment.index())?;
        let first = PartitionIndex::from_u16(s.head.index() as u16);
        let generation = Generation::from_lap(s.head.lap());
        // The immediate a sender builds for a message at the head: type, segment, partition and
        // generation bits in one comparison.
        let (h, header_len) = if imm == Immediate::message(segment, first, generation).get() {
            let h = Header::decode(header).ok()?;
            if h.generation != generation || h.seq != self.expected_seq {
                return None;
            }
            (h, HEADER_LEN)
        } else if imm == Immediate::bare(segment, first, generation).get()
            && s.entry.partition_size as usize <= self.max_eager
        {
            // No header on the wire: any copy beside the immediate is not looked at.
            (bare_header(&s.entry, self.expected_seq, generation), 0)
        } else {
            return None;
        };
        let pos = first.get();
        let count = s.entry.partitions_for(u64::from(h.len) + header_len as u64);
        let free = (s.freed.abs() + u64::from(s.partitions)).saturating_sub(s.head.abs());
        if count > u64::from(s.entry.span) || count > u64::from(s.partitions - pos) || count > free
        {
            return None;
        }
        let count = count as u32;
        debug_assert!(
            s.directory.is_free_run(pos, count),
            "ring positions and directory agree"
        );
        s.take(pos, count, &h);
        self.expected_seq = self.expected_seq.wrapping_add(1);
        let group = s.entry.group;
        let offset = (pos as usize) << s.shift;
        count_delivery(&mut self.stats, group, &h, 0);
        Some(delivery(segment, first, count, &h, offset, header_len))
    }

    /// Validates the header of an arrival (the [`Arrival::header_len`] bytes at
    /// [`Arrival::header_offset`]) and hands the message to the application: magic, kind,
    /// flags, a length whose partitions fit the span and the segment end, the next sequence
    /// number, the expected generation, free partitions. Padding before the message is freed
    /// at once. A bare message has no header: `header` is not looked at, and the message is
    /// the data payload of its one partition with the next sequence number.
    ///
    /// # Errors
    /// [`ProtocolError::StaleArrival`] (accepted out of order), the errors of [`Header::decode`],
    /// [`ProtocolError::StaleGeneration`], [`ProtocolError::LengthBeyondSpan`],
    /// [`ProtocolError::LengthBeyondSegmentEnd`], [`ProtocolError::NeedlessPadding`],
    /// [`ProtocolError::OutOfSequence`], [`ProtocolError::PartitionNotFree`].
    #[inline(always)]
    pub fn accept(&mut self, arrival: Arrival, header: &[u8]) -> Result<Delivery, ProtocolError> {
        let segment = arrival.segment;
        let s = self
            .segments
            .get_mut(segment.index())
            .ok_or(ProtocolError::UnknownSegment {
                step: "accept",
                segment,
            })?;
        let seg_entry = s.entry;
        if s.head.abs() != arrival.base {
            return Err(ProtocolError::StaleArrival { segment });
        }
        let (h, header_len) = if arrival.bare {
            let h = bare_header(&seg_entry, self.expected_seq, arrival.generation);
            (h, 0)
        } else {
            (Header::decode(header)?, HEADER_LEN)
        };
        if h.generation != arrival.generation {
            return Err(ProtocolError::StaleGeneration {
                step: "header",
                segment,
                got: h.generation.0,
                expected: arrival.generation.0,
            });
        }
        let wire = u64::from(h.len) + header_len as u64;
        let count = seg_entry.partitions_for(wire);
        if count > u64::from(seg_entry.span) {
            return Err(ProtocolError::LengthBeyondSpan {
                segment,
                len: h.len,
                count,
                span: seg_entry.span,
            });
        }
        let count = count as u32;
        let first = arrival.first.get();
        if first + count > s.partitions {
            return Err(ProtocolError::LengthBeyondSegmentEnd {
                segment,
                first,
                count,
                partitions: s.partitions,
            });
        }
        let pad_start = s.partitions - arrival.padding;
        if arrival.padding > 0 && pad_start + count <= s.partitions {
            return Err(ProtocolError::NeedlessPadding {
                segment,
                expected: pad_start,
                count,
            });
        }
        if h.seq != self.expected_seq {
            return Err(ProtocolError::OutOfSequence {
                got: h.seq,
                expected: self.expected_seq,
            });
        }
        if arrival.padding > 0
            && let Some(p) = s.directory.first_busy(pad_start, arrival.padding)
        {
            return Err(ProtocolError::PartitionNotFree {
                step: "accept padding",
                segment,
                partition: p,
            });
        }
        // A message after padding must fit, with its padding, in what was freed (the sender's
        // rule). The directory alone does not say so when the message wraps onto the very
        // partitions its padding takes: they are free until the padding is marked.
        if arrival.padding > 0 {
            let room = (s.freed.abs() + u64::from(s.partitions))
                .saturating_sub(s.head.abs() + u64::from(arrival.padding));
            if u64::from(count) > room {
                return Err(ProtocolError::PartitionNotFree {
                    step: "accept after padding",
                    segment,
                    partition: first + room as u32,
                });
            }
        }
        if !s.directory.is_free_run(first, count) {
            return Err(ProtocolError::PartitionNotFree {
                step: "accept",
                segment,
                partition: s.directory.first_busy(first, count).unwrap_or(first),
            });
        }
        // All checks passed: commit.
        if arrival.padding > 0 {
            let marked = s.directory.mark_padding(
                pad_start,
                arrival.padding,
                Generation::from_lap(s.head.lap()),
            );
            debug_assert!(marked, "run checked free and in range");
            s.head.advance(arrival.padding, s.partitions);
        }
        s.take(first, count, &h);
        self.expected_seq = self.expected_seq.wrapping_add(1);
        if arrival.padding > 0 {
            s.advance();
            if s.freed.abs() > s.reported && (s.freed.abs() - s.reported >= s.quarter) {
                self.pending[segment.index() / 64] |= 1 << (segment.index() % 64);
            }
        }
        count_delivery(&mut self.stats, seg_entry.group, &h, arrival.padding);
        Ok(delivery(
            segment,
            arrival.first,
            count,
            &h,
            arrival.offset,
            header_len,
        ))
    }

    /// The application is done with a message: its partitions become free once every partition
    /// before them in the ring is free too, and only then are they reported. Returns the credit
    /// to publish now, if any (absolute `freed`; see `docs/protocol.md` for when one is emitted).
    ///
    /// # Errors
    /// [`ProtocolError::UnknownSegment`], [`ProtocolError::PartitionOutOfRange`],
    /// [`ProtocolError::InvalidToken`] for a double release or a token that names no held message
    /// (forged, or from an earlier lap).
    #[inline(always)]
    pub fn release(&mut self, token: ReleaseToken) -> Result<Option<CreditUpdate>, ProtocolError> {
        let segment = token.segment;
        let s = self
            .segments
            .get_mut(segment.index())
            .ok_or(ProtocolError::UnknownSegment {
                step: "release",
                segment,
            })?;
        let first = token.first.get();
        let invalid = |reason| ProtocolError::InvalidToken {
            segment,
            partition: first,
            reason,
        };
        let d = *s
            .directory
            .entry(first)
            .ok_or(ProtocolError::PartitionOutOfRange {
                step: "release",
                segment,
                partition: first,
                partitions: s.partitions,
            })?;
        if !d.first {
            return Err(invalid(
                "no message starts at this partition (double release or forged token)",
            ));
        }
        match d.state {
            EntryState::InUse => {}
            EntryState::Released => return Err(invalid("message already released")),
            EntryState::Padding => return Err(invalid("partition is padding, not a message")),
            EntryState::Free => {
                return Err(invalid(
                    "partition is free (double release or forged token)",
                ));
            }
        }
        if d.generation != token.generation {
            return Err(invalid("generation differs: token from another lap"));
        }
        if d.extent != token.count {
            return Err(invalid("partition count differs from the message's"));
        }
        s.held -= 1;
        self.stats.releases += 1;
        if s.freed.abs() < s.head.abs() && s.freed.index() == first {
            // In order (the common case): the message is where `freed` stands, so it is freed
            // at once, then whatever released messages follow it (what `advance` would do
            // after marking it released).
            s.directory.free_run(first, d.extent);
            s.freed.advance(d.extent, s.partitions);
            s.advance();
        } else {
            s.directory.set_first_state(first, EntryState::Released);
            let before = s.freed;
            s.advance();
            if s.freed == before {
                self.stats.out_of_order_releases += 1;
            }
        }
        let credit = s.take_credit();
        if credit.is_some() {
            self.pending[segment.index() / 64] &= !(1 << (segment.index() % 64));
            self.stats.credits_emitted += 1;
        }
        Ok(credit.map(|freed| CreditUpdate { segment, freed }))
    }

    /// Next credit waiting to be published (set by [`Receiver::accept`] when padding freed a
    /// quarter segment, or by [`Receiver::flush`]). Publish until `None`.
    pub fn poll_credit(&mut self) -> Option<CreditUpdate> {
        for (w, word) in self.pending.iter_mut().enumerate() {
            while *word != 0 {
                let bit = word.trailing_zeros() as usize;
                *word &= !(1u64 << bit);
                let idx = w * 64 + bit;
                let Some(s) = self.segments.get_mut(idx) else {
                    continue;
                };
                if s.freed.abs() == s.reported {
                    continue;
                }
                s.reported = s.freed.abs();
                self.stats.credits_emitted += 1;
                return Some(CreditUpdate {
                    segment: SegmentId(idx as u8),
                    freed: s.freed.abs(),
                });
            }
        }
        None
    }

    /// Marks for [`Receiver::poll_credit`] every segment whose freed position moved since its
    /// last credit (for a transport that batches credits below the quarter-segment threshold,
    /// e.g. when idle).
    pub fn flush(&mut self) {
        for (i, s) in self.segments.iter().enumerate() {
            if s.freed.abs() > s.reported {
                self.pending[i / 64] |= 1 << (i % 64);
            }
        }
    }

    /// Adds a target segment to `group` (a group grows at run time) and returns its id, which the
    /// sender passes to [`Sender::add_segment`](super::Sender::add_segment).
    ///
    /// # Errors
    /// The errors of [`Tables::add_segment`].
    pub fn add_segment(&mut self, group: GroupId) -> Result<SegmentId, ConfigError> {
        let id = self.tables.add_segment(group)?;
        let entry = self.tables.segments()[id.index()];
        self.segments.push(TargetSegment::new(entry));
        if self.stats.per_group.len() < self.tables.groups().len() {
            self.stats
                .per_group
                .resize(self.tables.groups().len(), GroupStats::default());
        }
        Ok(id)
    }
}
