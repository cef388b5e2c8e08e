//! Newtypes for the raw numbers of the protocol, so that a swapped argument does not compile.

use std::fmt;

/// Identifies a segment within one direction of a connection (the key of the *segment table*).
///
/// Segment ids are unique across groups and fit the 8-bit field of the immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u8);

impl SegmentId {
    /// The id as an index into per-segment tables.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seg{}", self.0)
    }
}

/// Identifies a segment group (the key of the *segment group table*). Groups are numbered in
/// order of strictly increasing partition size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u8);

impl GroupId {
    /// The id as an index into per-group tables.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group{}", self.0)
    }
}

/// Index of a partition inside one segment (`0..partitions`, at most 65536 partitions, so it fits
/// the 16-bit field of the immediate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionIndex(u16);

impl PartitionIndex {
    /// Largest number of partitions a segment may have.
    pub const MAX_PARTITIONS: u32 = 1 << 16;

    /// Builds an index, `None` when `index >= 65536`.
    #[inline]
    pub fn new(index: u32) -> Option<Self> {
        u16::try_from(index).ok().map(PartitionIndex)
    }

    /// Builds an index from the 16-bit wire value.
    #[inline]
    pub fn from_u16(index: u16) -> Self {
        PartitionIndex(index)
    }

    /// The index as a number.
    #[inline]
    pub fn get(self) -> u32 {
        u32::from(self.0)
    }
}

impl fmt::Display for PartitionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// The generation of a partition use: the lap of the segment ring (`head / partitions`) at the
/// message's first partition, kept to its low 32 bits (the header field; the immediate carries the
/// low 6 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u32);

impl Generation {
    /// The generation of lap `lap`.
    #[inline]
    pub fn from_lap(lap: u64) -> Self {
        Generation(lap as u32)
    }

    /// The 6 bits the immediate carries.
    #[inline]
    pub fn imm_bits(self) -> u8 {
        (self.0 & 0x3f) as u8
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen{}", self.0)
    }
}

/// Kind of a message, carried in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// Application data.
    Data = 1,
    /// A control message (see [`crate::core::control`]).
    Control = 2,
}

impl MessageKind {
    /// Decodes the header byte; `None` for an unknown kind.
    #[inline]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(MessageKind::Data),
            2 => Some(MessageKind::Control),
            _ => None,
        }
    }
}

/// An absolute position in a segment's ring of partitions, with its index (`abs % n`) and lap
/// (`abs / n`) kept beside it: the per-message path moves it by a message's partitions and
/// reads all three without a division or a test of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RingPos {
    abs: u64,
    index: u32,
    lap: u64,
}

impl RingPos {
    /// The absolute position: partitions passed since the start.
    #[inline(always)]
    pub(crate) fn abs(self) -> u64 {
        self.abs
    }

    /// The partition index, `abs % n`.
    #[inline(always)]
    pub(crate) fn index(self) -> u32 {
        self.index
    }

    /// The lap, `abs / n`.
    #[inline(always)]
    pub(crate) fn lap(self) -> u64 {
        self.lap
    }

    /// Moves on by `k` partitions in a ring of `n`. Callers never pass the ring's end: a
    /// message or padding run ends at or before it (`index + k <= n`), and reaching it wraps
    /// to index 0 of the next lap.
    #[inline(always)]
    pub(crate) fn advance(&mut self, k: u32, n: u32) {
        debug_assert!(u64::from(self.index) + u64::from(k) <= u64::from(n));
        self.abs += u64::from(k);
        let i = self.index + k;
        if i >= n {
            self.index = i - n;
            self.lap += 1;
        } else {
            self.index = i;
        }
    }
}

/// Index of absolute ring position `pos` in a segment of `n` partitions (`pos % n`), with a
/// mask instead of a division when `n` is a power of two, as in the default layouts (the
/// per-message paths keep a [`RingPos`] instead).
#[inline(always)]
pub(crate) fn ring_index(pos: u64, n: u64) -> u32 {
    if n.is_power_of_two() {
        (pos & (n - 1)) as u32
    } else {
        (pos % n) as u32
    }
}

#[cfg(test)]
mod ring_tests {
    use super::{RingPos, ring_index};

    #[test]
    fn ring_pos_keeps_index_and_lap_of_its_absolute_position() {
        for n in [1u32, 2, 3, 5, 8, 12, 16, 1000] {
            let mut p = RingPos::default();
            // Runs of 1..=n partitions, never past the ring's end (as messages and padding).
            let mut k = 1;
            for _ in 0..500 {
                let step = k.min(n - p.index());
                p.advance(step, n);
                assert_eq!(p.index(), ring_index(p.abs(), u64::from(n)), "n={n}");
                assert_eq!(p.lap(), p.abs() / u64::from(n), "n={n}");
                k = k % n + 1;
            }
        }
    }

    #[test]
    fn ring_math_matches_division() {
        for n in [1u64, 2, 3, 5, 8, 12, 16, 256, 1000, 65536] {
            for pos in [0u64, 1, n - 1, n, n + 1, 7 * n + 3, u64::MAX - 1, u64::MAX] {
                assert_eq!(u64::from(ring_index(pos, n)), pos % n, "index {pos} % {n}");
            }
        }
    }
}
