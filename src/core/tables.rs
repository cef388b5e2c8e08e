//! The segment group table and the segment table of one direction (claim 5).
//!
//! Both sides build the same tables from the same [`Layout`]: segment ids are given in group
//! order (group 0's segments first), and a segment added at run time takes the next id on both
//! sides.

use super::config::{GroupConfig, Layout};
use super::error::ConfigError;
use super::types::{GroupId, SegmentId};

/// One row of the segment group table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// The group's id (its position, in order of increasing partition size).
    pub id: GroupId,
    /// Partition size in bytes.
    pub partition_size: u32,
    /// Partitions per segment.
    pub partitions: u32,
    /// Span factor: most partitions per message.
    pub span: u32,
    /// The group's segments (pairings of a source image and a target segment).
    pub segments: Vec<SegmentId>,
    shift: u32,
}

impl GroupEntry {
    fn new(id: GroupId, g: &GroupConfig) -> Self {
        GroupEntry {
            id,
            partition_size: g.partition_size,
            partitions: g.partitions,
            span: g.span,
            segments: Vec::new(),
            shift: g.partition_size.trailing_zeros(),
        }
    }

    /// Partitions a message of `wire` bytes (header included) needs: `ceil(wire / P)`.
    #[inline]
    pub fn partitions_for(&self, wire: u64) -> u64 {
        (wire >> self.shift) + u64::from(wire & (u64::from(self.partition_size) - 1) != 0)
    }

    /// Claim 9: whether partition size and span factor are large enough for `wire` bytes.
    #[inline]
    pub fn can_hold(&self, wire: u64) -> bool {
        wire <= u64::from(self.partition_size) * u64::from(self.span)
    }
}

/// One row of the segment table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentEntry {
    /// The segment's id (its position in the table; carried in immediates).
    pub id: SegmentId,
    /// The group the segment belongs to.
    pub group: GroupId,
    /// Partition size in bytes.
    pub partition_size: u32,
    /// Partitions in the segment.
    pub partitions: u32,
    /// Span factor of the group.
    pub span: u32,
}

impl SegmentEntry {
    /// Bytes of the segment (what the receiver allocates and registers, and the sender images).
    pub fn bytes(&self) -> u64 {
        u64::from(self.partition_size) * u64::from(self.partitions)
    }

    /// Byte offset of partition `index` in the segment.
    #[inline]
    pub fn offset_of(&self, index: u32) -> usize {
        index as usize * self.partition_size as usize
    }

    /// Partitions a message of `wire` bytes needs in this segment.
    #[inline]
    pub fn partitions_for(&self, wire: u64) -> u64 {
        // Partition sizes are powers of two (validated by `Layout`): a shift, not a division.
        let p = u64::from(self.partition_size);
        if p.is_power_of_two() {
            wire.saturating_add(p - 1) >> p.trailing_zeros()
        } else {
            wire.div_ceil(p)
        }
    }
}

/// The segment group table and segment table of one direction.
#[derive(Debug, Clone)]
pub struct Tables {
    layout: Layout,
    groups: Vec<GroupEntry>,
    segments: Vec<SegmentEntry>,
}

impl Tables {
    /// Builds both tables from a validated layout (claim 5: every group and every segment is
    /// registered).
    pub fn new(layout: Layout) -> Self {
        let mut groups = Vec::with_capacity(layout.groups().len());
        let mut segments = Vec::with_capacity(Layout::MAX_SEGMENTS as usize);
        for (gi, g) in layout.groups().iter().enumerate() {
            let gid = GroupId(gi as u8);
            let mut entry = GroupEntry::new(gid, g);
            for _ in 0..g.segments {
                let id = SegmentId(segments.len() as u8);
                entry.segments.push(id);
                segments.push(SegmentEntry {
                    id,
                    group: gid,
                    partition_size: g.partition_size,
                    partitions: g.partitions,
                    span: g.span,
                });
            }
            groups.push(entry);
        }
        Tables {
            layout,
            groups,
            segments,
        }
    }

    /// The layout, including segments added at run time.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The segment group table, in order of increasing partition size.
    pub fn groups(&self) -> &[GroupEntry] {
        &self.groups
    }

    /// The segment table, indexed by segment id.
    pub fn segments(&self) -> &[SegmentEntry] {
        &self.segments
    }

    /// One group.
    pub fn group(&self, id: GroupId) -> Option<&GroupEntry> {
        self.groups.get(id.index())
    }

    /// One segment.
    #[inline]
    pub fn segment(&self, id: SegmentId) -> Option<&SegmentEntry> {
        self.segments.get(id.index())
    }

    /// The id the next added segment will have (`256` when the table is full).
    pub fn next_segment_id(&self) -> u16 {
        self.segments.len() as u16
    }

    /// Adds a segment to `group` (a group grows at run time) and returns its id.
    ///
    /// # Errors
    /// [`ConfigError::UnknownGroup`], [`ConfigError::TooManySegments`],
    /// [`ConfigError::OverMemoryCap`].
    pub fn add_segment(&mut self, group: GroupId) -> Result<SegmentId, ConfigError> {
        let gi = group.index();
        if gi >= self.groups.len() {
            return Err(ConfigError::UnknownGroup { group });
        }
        self.layout.push_segment(gi)?;
        let id = SegmentId(self.segments.len() as u8);
        let g = &mut self.groups[gi];
        g.segments.push(id);
        self.segments.push(SegmentEntry {
            id,
            group,
            partition_size: g.partition_size,
            partitions: g.partitions,
            span: g.span,
        });
        Ok(id)
    }
}
