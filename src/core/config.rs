//! Configuration of the segment groups of one direction, its validation, its compact string form
//! and what it costs in registered memory.

use std::fmt;
use std::str::FromStr;

use super::error::ConfigError;
use super::wire::HEADER_LEN;

/// One segment group: segments of `partitions` partitions of `partition_size` bytes; a message
/// may occupy at most `span` contiguous partitions (the *span factor*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupConfig {
    /// Partition size in bytes: a power of two, at least 64.
    pub partition_size: u32,
    /// Partitions per segment, `1..=65536`.
    pub partitions: u32,
    /// Most partitions one message may occupy, `1..=partitions`.
    pub span: u32,
    /// Segments the group starts with (at least 1; more may be added at run time).
    pub segments: u32,
}

impl GroupConfig {
    /// A group of one segment.
    pub const fn new(partition_size: u32, partitions: u32, span: u32) -> Self {
        GroupConfig {
            partition_size,
            partitions,
            span,
            segments: 1,
        }
    }

    /// Bytes of one segment of this group.
    pub fn segment_bytes(&self) -> u64 {
        u64::from(self.partition_size) * u64::from(self.partitions)
    }

    /// Largest wire size (header included) one message of this group may have: `P * S`.
    pub fn max_wire(&self) -> u64 {
        u64::from(self.partition_size) * u64::from(self.span)
    }
}

/// Registered memory one direction of a connection costs (see [`Layout::registered_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// Target segments, registered by the receiver (remote-writable).
    pub target_bytes: u64,
    /// Source images, registered by the sender (verbs only; over shared memory the source image is
    /// the mapped target and costs nothing more).
    pub source_image_bytes: u64,
    /// The sender's credit mailbox: one u64 per segment id.
    pub mailbox_bytes: u64,
}

impl MemoryReport {
    /// Sum of the parts.
    pub fn total(&self) -> u64 {
        self.target_bytes + self.source_image_bytes + self.mailbox_bytes
    }
}

/// The validated group layout of one direction of a connection.
///
/// Invariants (checked by [`Layout::new`]): 2..=256 groups, partition sizes powers of two >= 64
/// and strictly increasing, `1 <= partitions <= 65536`, `1 <= span <= partitions`, at least one
/// segment per group, at most 256 segments in all, `P * S <= 2^32`, and the segment bytes within
/// the memory cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    groups: Vec<GroupConfig>,
    memory_cap: u64,
}

/// Slack of receive WQEs for control traffic on top of the partition-derived bound.
pub const RECV_WQE_MARGIN: u32 = 16;

impl Layout {
    /// The environment variable transports read the compact form from (`Layout::from_str`).
    pub const ENV_VAR: &'static str = "RSMSG_GROUPS";
    /// Default cap on segment bytes per direction: 256 MiB.
    pub const DEFAULT_MEMORY_CAP: u64 = 256 << 20;
    /// Most segments per direction (the immediate's segment field is 8 bits).
    pub const MAX_SEGMENTS: u32 = 256;

    /// Validates `groups` with the default memory cap.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first group and field that break an invariant.
    pub fn new(groups: Vec<GroupConfig>) -> Result<Self, ConfigError> {
        Self::with_memory_cap(groups, Self::DEFAULT_MEMORY_CAP)
    }

    /// Validates `groups` against a cap on the segment bytes of one direction.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first group and field that break an invariant.
    pub fn with_memory_cap(groups: Vec<GroupConfig>, memory_cap: u64) -> Result<Self, ConfigError> {
        if groups.len() < 2 {
            return Err(ConfigError::TooFewGroups {
                groups: groups.len(),
            });
        }
        if groups.len() > 256 {
            return Err(ConfigError::TooManyGroups {
                groups: groups.len(),
            });
        }
        let mut previous: Option<u32> = None;
        let mut segments: u64 = 0;
        let mut bytes: u64 = 0;
        for (i, g) in groups.iter().enumerate() {
            let size = g.partition_size;
            if size < 64 || !size.is_power_of_two() {
                return Err(ConfigError::BadPartitionSize {
                    group: i,
                    size: u64::from(size),
                });
            }
            if let Some(p) = previous
                && size <= p
            {
                return Err(ConfigError::NotIncreasing {
                    group: i,
                    size: u64::from(size),
                    previous: u64::from(p),
                });
            }
            previous = Some(size);
            if g.partitions == 0 || g.partitions > 65536 {
                return Err(ConfigError::BadPartitionCount {
                    group: i,
                    count: u64::from(g.partitions),
                });
            }
            if g.span == 0 || g.span > g.partitions {
                return Err(ConfigError::BadSpan {
                    group: i,
                    span: u64::from(g.span),
                    partitions: u64::from(g.partitions),
                });
            }
            if g.segments == 0 {
                return Err(ConfigError::NoSegments { group: i });
            }
            if g.max_wire() > 1 << 32 {
                return Err(ConfigError::Overflow { group: i });
            }
            segments += u64::from(g.segments);
            let group_bytes = g
                .segment_bytes()
                .checked_mul(u64::from(g.segments))
                .ok_or(ConfigError::Overflow { group: i })?;
            bytes = bytes
                .checked_add(group_bytes)
                .ok_or(ConfigError::Overflow { group: i })?;
        }
        if segments > u64::from(Self::MAX_SEGMENTS) {
            return Err(ConfigError::TooManySegments { segments });
        }
        if bytes > memory_cap {
            return Err(ConfigError::OverMemoryCap {
                bytes,
                cap: memory_cap,
            });
        }
        Ok(Layout { groups, memory_cap })
    }

    /// The groups, in order of increasing partition size (the group id is the position).
    pub fn groups(&self) -> &[GroupConfig] {
        &self.groups
    }

    /// The cap on segment bytes this layout was validated against.
    pub fn memory_cap(&self) -> u64 {
        self.memory_cap
    }

    /// Number of segments of this direction.
    pub fn segment_count(&self) -> u32 {
        self.groups.iter().map(|g| g.segments).sum()
    }

    /// Bytes of all segments of this direction.
    pub fn segment_bytes(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| g.segment_bytes() * u64::from(g.segments))
            .sum()
    }

    /// Partitions of all segments of this direction.
    pub fn total_partitions(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| u64::from(g.partitions) * u64::from(g.segments))
            .sum()
    }

    /// Registered memory of one direction over verbs: the receiver's target segments, the sender's
    /// source images and the sender's credit mailbox. A connection with the same layout both ways
    /// costs twice the total, split evenly between the two machines.
    pub fn registered_bytes(&self) -> MemoryReport {
        let seg = self.segment_bytes();
        MemoryReport {
            target_bytes: seg,
            source_image_bytes: seg,
            mailbox_bytes: 8 * u64::from(Self::MAX_SEGMENTS),
        }
    }

    /// Largest payload sent eagerly (through partitions); a longer one needs the rendezvous path.
    pub fn max_eager_payload(&self) -> usize {
        let wire = self
            .groups
            .iter()
            .map(GroupConfig::max_wire)
            .max()
            .unwrap_or(0);
        usize::try_from(wire.saturating_sub(HEADER_LEN as u64)).unwrap_or(usize::MAX)
    }

    /// Receive WQEs one endpoint needs when both directions use this layout; see
    /// [`Layout::recv_wqe_bound_for`].
    pub fn recv_wqe_bound(&self) -> u32 {
        Self::recv_wqe_bound_for(self, self)
    }

    /// Receive WQEs an endpoint must keep posted so that a WRITE_WITH_IMM never meets RNR.
    ///
    /// `incoming` is the layout of the direction this endpoint receives on, `outgoing` the one it
    /// sends on. Messages in flight towards this endpoint are bounded by the partitions of
    /// `incoming` (each message holds at least one until released); credit notices by the
    /// partitions of `outgoing` (each notice reports at least one freed partition, and the sender
    /// reuses them only after the notice's completion was polled, which re-posts its WQE). A margin
    /// of [`RECV_WQE_MARGIN`] covers control traffic. Recompute after adding segments.
    pub fn recv_wqe_bound_for(incoming: &Layout, outgoing: &Layout) -> u32 {
        let sum =
            incoming.total_partitions() + outgoing.total_partitions() + u64::from(RECV_WQE_MARGIN);
        u32::try_from(sum).unwrap_or(u32::MAX)
    }

    pub(crate) fn push_segment(&mut self, group: usize) -> Result<(), ConfigError> {
        let mut next = self.groups.clone();
        next[group].segments += 1;
        *self = Layout::with_memory_cap(next, self.memory_cap)?;
        Ok(())
    }
}

impl Default for Layout {
    /// Three groups: 256 B x 256 span 4 (payloads up to 1008 B, 64 KiB per segment), 4 KiB x 64
    /// span 4 (up to 16 KiB - 16, 256 KiB), 64 KiB x 16 span 4 (up to 256 KiB - 16, 1 MiB): about
    /// 1.3 MiB of segments per direction, so a process can hold hundreds of peers, while small
    /// messages waste at most one 256 B partition and 256 small messages can be in flight.
    fn default() -> Self {
        Layout::new(vec![
            GroupConfig::new(256, 256, 4),
            GroupConfig::new(4096, 64, 4),
            GroupConfig::new(65536, 16, 4),
        ])
        .expect("default layout is valid")
    }
}

fn parse_number(text: &str, whole: &str) -> Result<u64, ConfigError> {
    let err = |reason| ConfigError::Parse {
        input: whole.to_string(),
        reason,
    };
    let t = text.trim();
    let (digits, mult) = match t.as_bytes().last() {
        Some(b'k' | b'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&t[..t.len() - 1], 1u64 << 20),
        Some(b'g' | b'G') => (&t[..t.len() - 1], 1u64 << 30),
        Some(_) => (t, 1),
        None => return Err(err("empty number")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(
            "a number is not decimal digits with an optional k/m/g suffix",
        ));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    n.checked_mul(mult).ok_or_else(|| err("number too large"))
}

impl FromStr for Layout {
    type Err = ConfigError;

    /// Parses the compact form `SIZE:COUNT:SPAN[:SEGMENTS]`, comma-separated, one item per group
    /// in order of increasing size; numbers are decimal with an optional `k`, `m` or `g` suffix
    /// (powers of 1024). Example: `256:256:4,4k:64:4,64k:16:4:2`. Spaces around items are allowed;
    /// anything else is an error.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason| ConfigError::Parse {
            input: s.to_string(),
            reason,
        };
        let mut groups = Vec::new();
        for item in s.split(',') {
            let fields: Vec<&str> = item.split(':').collect();
            if item.trim().is_empty() {
                return Err(err("empty group item"));
            }
            if fields.len() != 3 && fields.len() != 4 {
                return Err(err("a group is SIZE:COUNT:SPAN[:SEGMENTS]"));
            }
            let mut nums = [0u64; 4];
            for (slot, f) in nums.iter_mut().zip(&fields) {
                *slot = parse_number(f, s)?;
            }
            let segments = if fields.len() == 4 { nums[3] } else { 1 };
            let to32 = |v: u64| u32::try_from(v).map_err(|_| err("number too large"));
            groups.push(GroupConfig {
                partition_size: to32(nums[0])?,
                partitions: to32(nums[1])?,
                span: to32(nums[2])?,
                segments: to32(segments)?,
            });
        }
        Layout::new(groups)
    }
}

impl fmt::Display for Layout {
    /// Writes the compact form accepted by [`Layout::from_str`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.groups.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}:{}", g.partition_size, g.partitions, g.span)?;
            if g.segments != 1 {
                write!(f, ":{}", g.segments)?;
            }
        }
        Ok(())
    }
}
