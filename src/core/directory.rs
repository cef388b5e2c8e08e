//! The per-segment directory (claims 6, 7): one entry per partition.
//!
//! The entry of a message's first partition carries the first-partition flag, the extent (number
//! of partitions of the message), the message length and the generation; every entry of a message
//! names the next partition of the message, if any. Both sides keep a directory per segment: the
//! sender to check that the run it is about to write is free, the receiver to validate releases
//! and to compute credits that only ever describe free partitions.

use super::types::Generation;

/// Value of [`DirEntry::next`] for the last partition of a message.
pub const NO_NEXT: u32 = u32::MAX;

/// State of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryState {
    /// Free: may be written.
    #[default]
    Free,
    /// Part of a message that is in flight (sender) or held by the application (receiver).
    InUse,
    /// Released by the receiving application but not yet contiguous with the freed region, so
    /// not yet reported to the sender.
    Released,
    /// Skipped at the end of the ring (padding); free as soon as the ring reaches it.
    Padding,
}

/// One directory entry (one partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry {
    /// State of the partition.
    pub state: EntryState,
    /// Whether this is the first partition of a message (or of a padding run).
    pub first: bool,
    /// On a first partition: partitions of the message. Otherwise 0.
    pub extent: u32,
    /// The next partition of the same message, or [`NO_NEXT`].
    pub next: u32,
    /// On a first partition: payload length of the message. Otherwise 0.
    pub len: u32,
    /// Generation (lap) of the message.
    pub generation: Generation,
}

impl Default for DirEntry {
    fn default() -> Self {
        DirEntry {
            state: EntryState::Free,
            first: false,
            extent: 0,
            next: NO_NEXT,
            len: 0,
            generation: Generation(0),
        }
    }
}

/// The directory of one segment: a preallocated entry per partition.
#[derive(Debug, Clone)]
pub struct Directory {
    entries: Vec<DirEntry>,
}

impl Directory {
    /// A directory of `partitions` free entries.
    pub fn new(partitions: u32) -> Self {
        Directory {
            entries: vec![DirEntry::default(); partitions as usize],
        }
    }

    /// Number of entries (partitions).
    #[inline]
    pub fn len(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Whether the directory has no entries (never true for a validated layout).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of partition `index`, if in range.
    #[inline]
    pub fn entry(&self, index: u32) -> Option<&DirEntry> {
        self.entries.get(index as usize)
    }

    /// Claim 7: whether the `count` partitions from `start` exist and are all free.
    #[inline(always)]
    pub fn is_free_run(&self, start: u32, count: u32) -> bool {
        let (s, e) = (start as usize, start as usize + count as usize);
        match self.entries.get(s..e) {
            Some(run) => run.iter().all(|d| d.state == EntryState::Free),
            None => false,
        }
    }

    /// Index of the first entry in `start..start+count` that is not free, if any (entries past the
    /// end count as not free).
    #[inline]
    pub fn first_busy(&self, start: u32, count: u32) -> Option<u32> {
        (start..start.saturating_add(count)).find(|&i| {
            self.entries
                .get(i as usize)
                .is_none_or(|d| d.state != EntryState::Free)
        })
    }

    /// Claim 7, general form: the lowest `start` such that `count` contiguous partitions from
    /// `start` are free. The ring allocator only needs [`Directory::is_free_run`] at the ring
    /// position; this search serves diagnostics and property tests.
    pub fn find_free_run(&self, count: u32) -> Option<u32> {
        if count == 0 {
            return Some(0);
        }
        let mut run = 0u32;
        for (i, d) in self.entries.iter().enumerate() {
            if d.state == EntryState::Free {
                run += 1;
                if run == count {
                    return Some(i as u32 + 1 - count);
                }
            } else {
                run = 0;
            }
        }
        None
    }

    /// Records a message of `count` partitions from `start` (claim 6): the first entry gets the
    /// first flag, extent, length and generation; each entry names the next one.
    ///
    /// The caller has checked the run with [`Directory::is_free_run`]. Returns `false` and
    /// changes nothing when `count` is 0 or the run does not fit in the segment.
    #[inline(always)]
    pub fn mark_message(
        &mut self,
        start: u32,
        count: u32,
        len: u32,
        generation: Generation,
        state: EntryState,
    ) -> bool {
        let s = start as usize;
        let Some(run) = self.entries.get_mut(s..s + count as usize) else {
            return false;
        };
        let Some(last) = (count as usize).checked_sub(1) else {
            return false;
        };
        for (i, d) in run.iter_mut().enumerate() {
            *d = DirEntry {
                state,
                first: i == 0,
                extent: if i == 0 { count } else { 0 },
                next: if i < last {
                    start + i as u32 + 1
                } else {
                    NO_NEXT
                },
                len: if i == 0 { len } else { 0 },
                generation,
            };
        }
        true
    }

    /// Records a padding run of `count` partitions from `start` (to the end of the segment).
    /// Returns `false` and changes nothing when the run is empty or does not fit.
    #[inline]
    pub fn mark_padding(&mut self, start: u32, count: u32, generation: Generation) -> bool {
        self.mark_message(start, count, 0, generation, EntryState::Padding)
    }

    /// Sets the state of the first entry of a message (release marks only the first entry; the
    /// whole run is freed when the credit position passes it).
    #[inline]
    pub fn set_first_state(&mut self, start: u32, state: EntryState) {
        if let Some(d) = self.entries.get_mut(start as usize) {
            d.state = state;
        }
    }

    /// Frees `count` entries from `start`.
    #[inline(always)]
    pub fn free_run(&mut self, start: u32, count: u32) {
        let s = start as usize;
        let e = (s + count as usize).min(self.entries.len());
        for d in &mut self.entries[s.min(e)..e] {
            d.state = EntryState::Free;
            d.first = false;
            d.extent = 0;
            d.next = NO_NEXT;
            d.len = 0;
        }
    }

    /// Number of entries not free.
    pub fn busy_count(&self) -> u32 {
        self.entries
            .iter()
            .filter(|d| d.state != EntryState::Free)
            .count() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_partition_message_has_no_next() {
        let mut d = Directory::new(4);
        d.mark_message(3, 1, 9, Generation(2), EntryState::InUse);
        let e = d.entry(3).unwrap();
        assert!(e.first && e.extent == 1 && e.next == NO_NEXT && e.len == 9);
        assert_eq!(d.first_busy(0, 4), Some(3));
        assert_eq!(d.first_busy(0, 3), None);
        assert_eq!(d.first_busy(3, 5), Some(3));
        d.free_run(3, 1);
        assert_eq!(d.busy_count(), 0);
        assert_eq!(d.first_busy(2, 3), Some(4), "past the end counts as busy");
        assert!(
            !d.mark_message(3, 2, 0, Generation(0), EntryState::InUse),
            "runs past the end"
        );
        assert!(
            !d.mark_message(0, 0, 0, Generation(0), EntryState::InUse),
            "empty run"
        );
        assert_eq!(d.busy_count(), 0);
    }
}
