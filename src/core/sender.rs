//! The sending side of one direction: source images, selection and allocation, credits.

use super::config::Layout;
use super::control::{ControlBuf, ControlMessage};
use super::directory::{Directory, EntryState};
use super::error::{ConfigError, ProtocolError, ReserveError};
use super::stats::{GroupStats, SenderStats};
use super::tables::{GroupEntry, Tables};
use super::types::{
    Generation, GroupId, MessageKind, PartitionIndex, RingPos, SegmentId, ring_index,
};
use super::wire::{HEADER_LEN, Header, Immediate, ImmediateKind, reconstruct_freed};

/// Allocation state of one source segment (the sender's image of a target segment).
#[derive(Debug, Clone)]
struct SourceSegment {
    /// Ring position of the next partition to hand out.
    head: RingPos,
    /// Highest credit received: partitions below are free again.
    freed: u64,
    partitions: u32,
    /// log2 of the partition size (a power of two): byte offset = partition << shift.
    shift: u32,
    directory: Directory,
    /// Messages of this segment not yet covered by a credit, oldest first.
    unconfirmed: OutstandingRing,
}

// ---- delivery confirmation (see `Sender::unconfirmed`) ----------------------------------------

/// A message sent into a segment whose partitions the receiver has not yet given back.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    seq: u32,
    /// Absolute ring position just past the message: a credit at or above it confirms it.
    end: u64,
    data: bool,
}

/// The messages of one segment not yet covered by a credit, oldest first: a ring with room
/// for one message per partition, which is the most a segment can have in flight (each
/// message holds at least one partition until a credit covers it), so it never grows and a
/// push is a store.
#[derive(Debug, Clone)]
struct OutstandingRing {
    buf: Box<[Outstanding]>,
    start: usize,
    len: usize,
}

impl OutstandingRing {
    fn new(capacity: u32) -> Self {
        let empty = Outstanding {
            seq: 0,
            end: 0,
            data: false,
        };
        OutstandingRing {
            buf: vec![empty; capacity.max(1) as usize].into_boxed_slice(),
            start: 0,
            len: 0,
        }
    }

    #[inline(always)]
    fn push_back(&mut self, o: Outstanding) {
        let cap = self.buf.len();
        let mut i = self.start + self.len;
        if i >= cap {
            i -= cap;
        }
        // `len < cap` by the bound above; a full ring would mean more messages in flight than
        // partitions, which the ring allocation rules out.
        debug_assert!(self.len < cap, "more messages in flight than partitions");
        if let Some(slot) = self.buf.get_mut(i)
            && self.len < cap
        {
            *slot = o;
            self.len += 1;
        }
    }

    #[inline]
    fn front(&self) -> Option<&Outstanding> {
        if self.len == 0 {
            None
        } else {
            self.buf.get(self.start)
        }
    }

    #[inline]
    fn pop_front(&mut self) {
        if self.len > 0 {
            self.start += 1;
            if self.start == self.buf.len() {
                self.start = 0;
            }
            self.len -= 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Outstanding> {
        let (tail, head) = self.buf.split_at(self.start.min(self.buf.len()));
        head.iter().chain(tail).take(self.len)
    }
}

impl SourceSegment {
    /// Records a message just committed (its partitions end at `self.head`).
    #[inline(always)]
    fn track(&mut self, seq: u32, kind: MessageKind) {
        self.unconfirmed.push_back(Outstanding {
            seq,
            end: self.head.abs(),
            data: kind == MessageKind::Data,
        });
    }

    /// Drops the messages a credit of `self.freed` covers; returns how many data messages.
    fn confirm(&mut self) -> u64 {
        let mut n = 0;
        while let Some(o) = self.unconfirmed.front().copied() {
            if o.end > self.freed {
                break;
            }
            self.unconfirmed.pop_front();
            n += u64::from(o.data);
        }
        n
    }
}

impl Sender {
    /// Sequence numbers of the data messages sent whose partitions the receiver has not given
    /// back (no credit covers them), oldest first. A credit means the receiver's application
    /// released the message, so after a failure these are exactly the messages that may not
    /// have been delivered; every other data message was.
    pub fn unconfirmed(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .segments
            .iter()
            .flat_map(|s| s.unconfirmed.iter())
            .filter(|o| o.data)
            .map(|o| o.seq)
            .collect();
        // Oldest first, across the wrap of the 32-bit sequence numbers.
        let next = self.next_seq;
        v.sort_unstable_by_key(|&seq| std::cmp::Reverse(next.wrapping_sub(seq)));
        v
    }

    /// Data messages whose partitions the receiver gave back (confirmed delivered).
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }
}

// ---- end of delivery confirmation --------------------------------------------------------------

impl SourceSegment {
    fn new(partitions: u32, partition_size: u32) -> Self {
        SourceSegment {
            head: RingPos::default(),
            freed: 0,
            partitions,
            shift: partition_size.trailing_zeros(),
            directory: Directory::new(partitions),
            unconfirmed: OutstandingRing::new(partitions),
        }
    }

    /// Where `count` partitions would go now: `(first, padding)`, or `None` when they do not fit.
    #[inline(always)]
    fn place(&self, count: u32) -> Option<(u32, u32)> {
        let n = u64::from(self.partitions);
        let avail = n - (self.head.abs() - self.freed);
        let pos = self.head.index();
        if pos + count <= self.partitions {
            (avail >= u64::from(count) && self.directory.is_free_run(pos, count))
                .then_some((pos, 0))
        } else {
            let pad = self.partitions - pos;
            (avail >= u64::from(pad) + u64::from(count)
                && self.directory.is_free_run(pos, pad)
                && self.directory.is_free_run(0, count))
            .then_some((0, pad))
        }
    }
}

/// Result of [`Sender::select`]: where a message would go, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// The chosen group.
    pub group: GroupId,
    /// The chosen segment of that group.
    pub segment: SegmentId,
    /// First partition of the message.
    pub first: PartitionIndex,
    /// Partitions the message occupies.
    pub count: u32,
    /// Partitions skipped at the end of the segment before wrapping to partition 0.
    pub padding: u32,
    /// A bare message: a data payload exactly one partition long, sent without its header.
    pub bare: bool,
}

/// Partitions reserved for one message in a source image. The transport copies
/// [`Reservation::wire_header`] (the header, or nothing for a bare message) to
/// [`Reservation::offset`] of the source image and the payload to
/// [`Reservation::payload_offset`], and sends [`Reservation::wire_len`] bytes from `offset` to
/// the same offset of the target segment with [`Reservation::immediate`], in the order the
/// reservations were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Group chosen by selection.
    pub group: GroupId,
    /// Segment (source image and target) chosen.
    pub segment: SegmentId,
    /// First partition of the message.
    pub first: PartitionIndex,
    /// Partitions the message occupies.
    pub count: u32,
    /// Partitions skipped before the message (end of the ring).
    pub padding: u32,
    /// Byte offset of the message (its header) in the segment.
    pub offset: usize,
    /// Payload length in bytes.
    pub len: usize,
    /// Sequence number of the message in this direction.
    pub seq: u32,
    /// Generation (lap) of the first partition.
    pub generation: Generation,
    /// Kind written in the header.
    pub kind: MessageKind,
    /// The immediate to send with the write.
    pub immediate: Immediate,
    /// The message's header. It goes to `offset` unless the message is bare; a transport that
    /// carries a copy beside the immediate (shared memory) sends it there either way.
    pub header: [u8; HEADER_LEN],
    /// A bare message (immediate type 2): a data payload of exactly one partition, sent without
    /// its header. The receiver knows its length (the partition size), kind (data), sequence
    /// number (the next) and generation (the lap) from the immediate and its own state.
    pub bare: bool,
}

impl Reservation {
    /// Header bytes on the wire: 16, or 0 for a bare message.
    #[inline]
    pub fn header_len(&self) -> usize {
        if self.bare { 0 } else { HEADER_LEN }
    }

    /// The header bytes to write at `offset`: the header, or nothing for a bare message.
    #[inline]
    pub fn wire_header(&self) -> &[u8] {
        &self.header[..self.header_len()]
    }

    /// Byte offset of the payload in the segment (`offset + 16`, or `offset` when bare).
    #[inline]
    pub fn payload_offset(&self) -> usize {
        self.offset + self.header_len()
    }

    /// Bytes to transfer: header and payload.
    #[inline]
    pub fn wire_len(&self) -> usize {
        self.len + self.header_len()
    }
}

/// The last first-choice selection, reusable for any wire length in `(lo, hi]`: those lengths
/// have the same first-choice group and need the same partition count there.
#[derive(Debug, Clone, Copy)]
struct FastChoice {
    lo: u64,
    hi: u64,
    group: GroupId,
    /// The group's first segment (segments are tried in table order, so only the first one can
    /// be taken without looking at the others).
    segment: SegmentId,
    count: u32,
}

/// The sending side of one direction of a connection.
///
/// Input: [`Sender::reserve`] (a message to send), [`Sender::handle_credit`] (the mailbox value of
/// a segment) and [`Sender::handle_credit_notice`]. Output: [`Reservation`]s. No I/O, no clock,
/// no allocation on the hot path.
#[derive(Debug, Clone)]
pub struct Sender {
    tables: Tables,
    segments: Vec<SourceSegment>,
    next_seq: u32,
    max_eager: usize,
    /// For each power of two `2^k`: the group whose partitions are exactly that size, if one
    /// is and a payload of that size goes eagerly (bare messages).
    bare_groups: [Option<GroupId>; 32],
    fast: Option<FastChoice>,
    stats: SenderStats,
    /// Data messages confirmed by credits (see [`Sender::confirmed`]).
    confirmed: u64,
}

impl Sender {
    /// A sender for `layout`, all partitions free.
    pub fn new(layout: Layout) -> Self {
        let tables = Tables::new(layout);
        let segments = tables
            .segments()
            .iter()
            .map(|s| SourceSegment::new(s.partitions, s.partition_size))
            .collect();
        let max_eager = tables.layout().max_eager_payload();
        let stats = SenderStats::new(tables.groups().len());
        let bare_groups = bare_groups(&tables, max_eager);
        Sender {
            tables,
            segments,
            next_seq: 0,
            max_eager,
            bare_groups,
            fast: None,
            stats,
            confirmed: 0,
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

    /// Largest payload sent eagerly.
    pub fn max_eager_payload(&self) -> usize {
        self.max_eager
    }

    /// Counters.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// Sequence number the next message will carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Absolute ring head of a segment (partitions handed out so far, padding included).
    pub fn head(&self, segment: SegmentId) -> Option<u64> {
        self.segments.get(segment.index()).map(|s| s.head.abs())
    }

    /// Highest credit received for a segment.
    pub fn credit(&self, segment: SegmentId) -> Option<u64> {
        self.segments.get(segment.index()).map(|s| s.freed)
    }

    /// Partitions of a segment not yet given back by the receiver.
    pub fn partitions_in_use(&self, segment: SegmentId) -> Option<u64> {
        self.segments
            .get(segment.index())
            .map(|s| s.head.abs() - s.freed)
    }

    /// Partitions of a group's segments not yet freed.
    pub fn group_partitions_in_use(&self, group: GroupId) -> Option<u64> {
        let g = self.tables.group(group)?;
        Some(
            g.segments
                .iter()
                .map(|s| self.segments[s.index()].head.abs() - self.segments[s.index()].freed)
                .sum(),
        )
    }

    /// Partitions of all segments not yet given back.
    pub fn total_partitions_in_use(&self) -> u64 {
        self.segments.iter().map(|s| s.head.abs() - s.freed).sum()
    }

    /// The directory of a segment's source image.
    pub fn directory(&self, segment: SegmentId) -> Option<&Directory> {
        self.segments.get(segment.index()).map(|s| &s.directory)
    }

    /// Selection (claims 1, 2, 7, 9) of a data message without allocating: the group with the
    /// smallest partition size whose partition size and span factor can hold `len + 16` bytes;
    /// if none of its segments has enough free contiguous partitions, the next group with
    /// larger partitions. A payload exactly as long as a group's partitions goes bare (without
    /// its header, in one partition) to that group first.
    ///
    /// # Errors
    /// [`ReserveError::WouldBlock`] (back-pressure) or [`ReserveError::NeedsRendezvous`].
    #[inline]
    pub fn select(&self, len: usize) -> Result<Selection, ReserveError> {
        self.select_kind(MessageKind::Data, len)
    }

    #[inline]
    fn select_kind(&self, kind: MessageKind, len: usize) -> Result<Selection, ReserveError> {
        let wire = self.wire_len(len)?;
        let mut smallest: Option<GroupId> = None;
        // Groups with partitions this large or smaller are not tried with a header.
        let mut tried_up_to = 0;
        if let Some(gid) = self.bare_group(kind, len) {
            smallest = Some(gid);
            if let Some(sel) = self.select_bare(gid) {
                return Ok(sel);
            }
            // Claim 2: no room for it bare, so on to the groups with larger partitions.
            tried_up_to = len;
        }
        for g in self.tables.groups() {
            if g.partition_size as usize <= tried_up_to || !g.can_hold(wire) {
                continue;
            }
            smallest.get_or_insert(g.id);
            if let Some(sel) = self.select_in_group(g, wire) {
                return Ok(sel);
            }
        }
        match smallest {
            Some(group) => Err(ReserveError::WouldBlock { len, group }),
            None => Err(ReserveError::NeedsRendezvous {
                len,
                max: self.max_eager,
            }),
        }
    }

    /// The group a `len`-byte message goes to bare first: a data message exactly as long as the
    /// group's partitions (and no longer than the largest eager payload).
    #[inline(always)]
    fn bare_group(&self, kind: MessageKind, len: usize) -> Option<GroupId> {
        if kind != MessageKind::Data || !len.is_power_of_two() {
            return None;
        }
        *self.bare_groups.get(len.trailing_zeros() as usize)?
    }

    /// A bare message in group `gid`: one partition in the first of its segments that has one
    /// free. One partition always fits before the segment's end, so there is no padding.
    #[inline]
    fn select_bare(&self, gid: GroupId) -> Option<Selection> {
        let g = self.tables.group(gid)?;
        for &seg in &g.segments {
            if let Some((first, padding)) = self.segments[seg.index()].place(1) {
                return Some(Selection {
                    group: gid,
                    segment: seg,
                    first: PartitionIndex::new(first)?,
                    count: 1,
                    padding,
                    bare: true,
                });
            }
        }
        None
    }

    /// Header and payload bytes of a `len`-byte payload, if it goes eagerly.
    #[inline(always)]
    fn wire_len(&self, len: usize) -> Result<u64, ReserveError> {
        if len <= self.max_eager {
            // `max_eager` < 2^32, so `len` fits.
            Ok(len as u64 + HEADER_LEN as u64)
        } else {
            Err(ReserveError::NeedsRendezvous {
                len,
                max: self.max_eager,
            })
        }
    }

    /// The hot path of selection: reserves in the group selection picks first (the one with the
    /// smallest partition size whose span factor holds the message), and refuses with
    /// [`ReserveError::WouldBlock`] when none of its segments has room now, instead of moving on
    /// to a group with larger partitions. A transport whose credits may be stale (it reads its
    /// mailbox only when it must) calls this first, and on `WouldBlock` refreshes its credits and
    /// calls [`Sender::reserve_kind`], which moves to larger groups if the first still has no
    /// room (claim 2). Not counted as a stall.
    ///
    /// # Errors
    /// [`ReserveError::WouldBlock`] (the first group has no room now) or
    /// [`ReserveError::NeedsRendezvous`].
    #[inline(always)]
    pub fn reserve_first_choice(
        &mut self,
        kind: MessageKind,
        len: usize,
    ) -> Result<Reservation, ReserveError> {
        let r = self.first_choice(kind, len);
        if let Err(ReserveError::NeedsRendezvous { .. }) = r {
            self.stats.rendezvous_needed += 1;
        }
        r
    }

    #[inline(always)]
    fn first_choice(&mut self, kind: MessageKind, len: usize) -> Result<Reservation, ReserveError> {
        let wire = self.wire_len(len)?;
        if let Some(group) = self.bare_group(kind, len) {
            return match self.select_bare(group) {
                Some(sel) => Ok(self.commit(sel, kind, len)),
                None => Err(ReserveError::WouldBlock { len, group }),
            };
        }
        // The common case: a length like the last one, room in the group's first segment.
        if let Some(f) = self.fast
            && wire > f.lo
            && wire <= f.hi
        {
            if let Some((first, padding)) = self.segments[f.segment.index()].place(f.count)
                && let Some(first) = PartitionIndex::new(first)
            {
                let sel = Selection {
                    group: f.group,
                    segment: f.segment,
                    first,
                    count: f.count,
                    padding,
                    bare: false,
                };
                return Ok(self.commit(sel, kind, len));
            }
            return Err(ReserveError::WouldBlock {
                len,
                group: f.group,
            });
        }
        let Some(gi) = self.tables.groups().iter().position(|g| g.can_hold(wire)) else {
            return Err(ReserveError::NeedsRendezvous {
                len,
                max: self.max_eager,
            });
        };
        let groups = self.tables.groups();
        let g = &groups[gi];
        let sel = self.select_in_group(g, wire);
        if let Some(sel) = sel
            && g.segments.first() == Some(&sel.segment)
        {
            // Remember the range of wire lengths with this group and count.
            let p = u64::from(g.partition_size);
            let below = groups[..gi]
                .iter()
                .map(|h| u64::from(h.partition_size) * u64::from(h.span))
                .max()
                .unwrap_or(0);
            self.fast = Some(FastChoice {
                lo: below.max(u64::from(sel.count - 1) * p),
                hi: (p * u64::from(g.span)).min(u64::from(sel.count) * p),
                group: g.id,
                segment: sel.segment,
                count: sel.count,
            });
        }
        match sel {
            Some(sel) => Ok(self.commit(sel, kind, len)),
            None => Err(ReserveError::WouldBlock { len, group: g.id }),
        }
    }

    /// Claim 2: tests whether some segment of `g` holds `wire` bytes now.
    #[inline]
    fn select_in_group(&self, g: &GroupEntry, wire: u64) -> Option<Selection> {
        let count = g.partitions_for(wire) as u32;
        for &seg in &g.segments {
            if let Some((first, padding)) = self.segments[seg.index()].place(count) {
                return Some(Selection {
                    group: g.id,
                    segment: seg,
                    first: PartitionIndex::new(first)?,
                    count,
                    padding,
                    bare: false,
                });
            }
        }
        None
    }

    /// Reserves partitions for a data message of `len` payload bytes.
    ///
    /// # Errors
    /// [`ReserveError::WouldBlock`]: no group has room now (retry after a credit);
    /// [`ReserveError::NeedsRendezvous`]: no group can ever hold it.
    #[inline]
    pub fn reserve(&mut self, len: usize) -> Result<Reservation, ReserveError> {
        self.reserve_kind(MessageKind::Data, len)
    }

    /// Reserves partitions for a message of the given kind (data or control).
    ///
    /// # Errors
    /// As [`Sender::reserve`].
    #[inline]
    pub fn reserve_kind(
        &mut self,
        kind: MessageKind,
        len: usize,
    ) -> Result<Reservation, ReserveError> {
        let sel = match self.select_kind(kind, len) {
            Ok(sel) => sel,
            Err(e) => {
                match e {
                    ReserveError::WouldBlock { .. } => self.stats.credit_stalls += 1,
                    ReserveError::NeedsRendezvous { .. } => self.stats.rendezvous_needed += 1,
                }
                return Err(e);
            }
        };
        Ok(self.commit(sel, kind, len))
    }

    /// Reserves partitions for a control message and encodes its body; the transport writes the
    /// body at [`Reservation::payload_offset`] like a data payload.
    ///
    /// # Errors
    /// As [`Sender::reserve`].
    pub fn reserve_control(
        &mut self,
        msg: &ControlMessage,
    ) -> Result<(Reservation, ControlBuf), ReserveError> {
        let body = msg.encode();
        let r = self.reserve_kind(MessageKind::Control, body.as_slice().len())?;
        Ok((r, body))
    }

    #[inline(always)]
    fn commit(&mut self, sel: Selection, kind: MessageKind, len: usize) -> Reservation {
        let s = &mut self.segments[sel.segment.index()];
        if sel.padding > 0 {
            let marked = s.directory.mark_padding(
                s.head.index(),
                sel.padding,
                Generation::from_lap(s.head.lap()),
            );
            debug_assert!(marked, "run checked free and in range");
            s.head.advance(sel.padding, s.partitions);
        }
        let generation = Generation::from_lap(s.head.lap());
        let first = sel.first.get();
        // `len` fits u32: it is at most the largest eager payload, and P * S <= 2^32.
        let len32 = len as u32;
        let marked =
            s.directory
                .mark_message(first, sel.count, len32, generation, EntryState::InUse);
        debug_assert!(marked, "run checked free and in range");
        s.head.advance(sel.count, s.partitions);
        let s_shift = s.shift;
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        s.track(seq, kind);
        let header = Header {
            kind,
            len: len32,
            seq,
            generation,
        }
        .encode();
        let st = &mut self.stats;
        st.messages += 1;
        st.bytes += len as u64;
        st.padding_partitions += u64::from(sel.padding);
        if kind == MessageKind::Control {
            st.control_messages += 1;
        }
        if let Some(g) = st.per_group.get_mut(sel.group.index()) {
            g.messages += 1;
            g.bytes += len as u64;
        }
        Reservation {
            group: sel.group,
            segment: sel.segment,
            first: sel.first,
            count: sel.count,
            padding: sel.padding,
            offset: (first as usize) << s_shift,
            len,
            seq,
            generation,
            kind,
            immediate: if sel.bare {
                Immediate::bare(sel.segment, sel.first, generation)
            } else {
                Immediate::message(sel.segment, sel.first, generation)
            },
            header,
            bare: sel.bare,
        }
    }

    /// Applies a credit: the absolute `freed` position of `segment` as written by the receiver
    /// in the credit mailbox. Keeps the maximum, so duplicated, reordered or superseded writes are
    /// harmless; frees the directory entries the credit covers.
    ///
    /// # Errors
    /// [`ProtocolError::UnknownSegment`], [`ProtocolError::CreditAboveHead`] (more than was ever
    /// sent), [`ProtocolError::CreditNotOnBoundary`] (a credit inside a message).
    pub fn handle_credit(&mut self, segment: SegmentId, freed: u64) -> Result<(), ProtocolError> {
        let s = self
            .segments
            .get_mut(segment.index())
            .ok_or(ProtocolError::UnknownSegment {
                step: "credit",
                segment,
            })?;
        if freed <= s.freed {
            return Ok(());
        }
        let head = s.head.abs();
        if freed > head {
            return Err(ProtocolError::CreditAboveHead {
                segment,
                freed,
                head,
            });
        }
        let n = u64::from(s.partitions);
        if freed < head {
            let at = s.directory.entry(ring_index(freed, n));
            if !at.is_some_and(|d| d.first && d.state != EntryState::Free) {
                return Err(ProtocolError::CreditNotOnBoundary { segment, freed });
            }
        }
        // Walk message by message from the old credit to the new one.
        let mut p = s.freed;
        while p < freed {
            let pos = ring_index(p, n);
            let extent = s
                .directory
                .entry(pos)
                .map_or(0, |d| if d.first { d.extent } else { 0 });
            if extent == 0 {
                // Unreachable when the boundary check passed; refuse rather than loop.
                return Err(ProtocolError::CreditNotOnBoundary { segment, freed });
            }
            s.directory.free_run(pos, extent);
            p += u64::from(extent);
        }
        if p != freed {
            return Err(ProtocolError::CreditNotOnBoundary { segment, freed });
        }
        s.freed = freed;
        self.confirmed += s.confirm();
        self.stats.credits += 1;
        Ok(())
    }

    /// Applies a credit notice immediate (type 1): reconstructs the absolute `freed` from its
    /// 22 bits against the segment's head (see [`reconstruct_freed`]) and applies it. Returns the
    /// segment and the reconstructed value.
    ///
    /// # Errors
    /// [`ProtocolError::UnknownImmediateType`], [`ProtocolError::UnexpectedImmediateType`] for a
    /// message immediate, and the errors of [`Sender::handle_credit`].
    pub fn handle_credit_notice(&mut self, imm: u32) -> Result<(SegmentId, u64), ProtocolError> {
        let ImmediateKind::Credit { segment, freed_low } = Immediate(imm).decode()? else {
            return Err(ProtocolError::UnexpectedImmediateType {
                raw: imm,
                expected: "credit notice",
            });
        };
        let head = self
            .segments
            .get(segment.index())
            .ok_or(ProtocolError::UnknownSegment {
                step: "credit notice",
                segment,
            })?
            .head
            .abs();
        let freed = reconstruct_freed(freed_low, head).ok_or(ProtocolError::CreditAboveHead {
            segment,
            freed: u64::from(freed_low),
            head,
        })?;
        self.handle_credit(segment, freed)?;
        Ok((segment, freed))
    }

    /// Adds a segment to `group`, under the id `id` the receiver gave its new target segment
    /// (it must be the next id of the segment table, see [`Tables::next_segment_id`]).
    ///
    /// # Errors
    /// [`ConfigError::UnexpectedSegmentId`], and the errors of [`Tables::add_segment`].
    pub fn add_segment(&mut self, group: GroupId, id: SegmentId) -> Result<(), ConfigError> {
        let expected = self.tables.next_segment_id();
        if u16::from(id.0) != expected {
            return Err(ConfigError::UnexpectedSegmentId { got: id, expected });
        }
        let new = self.tables.add_segment(group)?;
        debug_assert_eq!(new, id);
        let e = self.tables.segments()[new.index()];
        self.segments
            .push(SourceSegment::new(e.partitions, e.partition_size));
        if self.stats.per_group.len() < self.tables.groups().len() {
            self.stats
                .per_group
                .resize(self.tables.groups().len(), GroupStats::default());
        }
        Ok(())
    }
}

/// The bare-message table of [`Sender`]: for each `2^k` up to `max_eager`, the group whose
/// partitions are `2^k` bytes.
fn bare_groups(tables: &Tables, max_eager: usize) -> [Option<GroupId>; 32] {
    let mut t = [None; 32];
    for g in tables.groups() {
        let k = g.partition_size.trailing_zeros() as usize;
        if g.partition_size as usize <= max_eager
            && let Some(slot) = t.get_mut(k)
        {
            *slot = Some(g.id);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outstanding_ring_keeps_order_across_wrap_around() {
        let mut r = OutstandingRing::new(3);
        let o = |seq| Outstanding {
            seq,
            end: u64::from(seq),
            data: seq % 2 == 0,
        };
        let seqs = |r: &OutstandingRing| r.iter().map(|o| o.seq).collect::<Vec<_>>();
        for lap in 0..5u32 {
            r.push_back(o(lap * 10));
            r.push_back(o(lap * 10 + 1));
            r.push_back(o(lap * 10 + 2));
            assert_eq!(seqs(&r), [lap * 10, lap * 10 + 1, lap * 10 + 2]);
            r.pop_front();
            assert_eq!(r.front().map(|o| o.seq), Some(lap * 10 + 1));
            r.pop_front();
            r.pop_front();
            assert!(r.front().is_none() && seqs(&r).is_empty());
            // Leave one behind so that the next lap starts elsewhere in the buffer.
            r.push_back(o(99));
            r.pop_front();
        }
    }

    #[test]
    fn unconfirmed_messages_survive_many_laps_of_a_segment() {
        let mut tx = Sender::new("256:4:1,4k:4:1".parse().unwrap());
        let seg = SegmentId(0);
        for round in 0..10u64 {
            // First choice only: the 4 KiB group stays out of it.
            for _ in 0..4 {
                tx.reserve_first_choice(MessageKind::Data, 10).unwrap();
            }
            assert!(
                tx.reserve_first_choice(MessageKind::Data, 10).is_err(),
                "four partitions, four messages"
            );
            let first = (round * 4) as u32;
            assert_eq!(tx.unconfirmed(), [first, first + 1, first + 2, first + 3]);
            tx.handle_credit(seg, round * 4 + 3).unwrap();
            assert_eq!(tx.unconfirmed(), [first + 3]);
            tx.handle_credit(seg, round * 4 + 4).unwrap();
            assert!(tx.unconfirmed().is_empty());
            assert_eq!(tx.confirmed(), round * 4 + 4);
        }
    }
}
