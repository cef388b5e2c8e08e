//! The credit mailbox: an array of absolute `u64` credit counters in shared memory, one per
//! segment, written by the receiver (`Release`) and read by the sender (`Acquire`).
//!
//! Each counter has one writer. A credit is the receiver's absolute `freed` position of a
//! segment (see the protocol's "Credits" section): stores are whole 64-bit atomics, so a reader
//! never sees a torn value, and `Release`/`Acquire` make the receiver's last reads of the freed
//! partitions happen before the sender's next writes to them. The mailbox does not judge
//! values: a counter that goes backwards or above the sender's head is the core's protocol
//! error to detect (a hostile peer can store anything).

#[cfg(loom)]
use loom::sync::Arc;
#[cfg(not(loom))]
use std::sync::Arc;

use super::ShmError;
#[cfg(not(loom))]
use super::ShmRegion;
use super::sync::{AtomicU64, Ordering};

/// Who keeps the counters alive (held only for that).
#[derive(Debug, Clone)]
#[allow(dead_code)]
enum Owner {
    #[cfg(not(loom))]
    Region(Arc<ShmRegion>),
    Heap(Arc<Vec<AtomicU64>>),
}

/// An array of `u64` credit counters in shared memory. Cloning shares the same counters.
#[derive(Debug, Clone)]
pub struct CreditMailbox {
    owner: Owner,
    counters: *const AtomicU64,
    len: usize,
}

// SAFETY: `counters` points into memory kept alive by `owner` (an `Arc`), which moves with
// the value; every access through it is atomic.
unsafe impl Send for CreditMailbox {}
// SAFETY: all methods take `&self` and access the counters only through atomics.
unsafe impl Sync for CreditMailbox {}

impl CreditMailbox {
    /// The alignment of a mailbox's offset inside its region.
    pub const ALIGN: usize = 8;

    /// The bytes a mailbox of `count` counters occupies.
    pub fn bytes(count: usize) -> usize {
        count.saturating_mul(8)
    }

    /// A mailbox of `count` counters at `offset` of `region` (zeroed memory reads as credit 0).
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`] if the counters do not fit, [`ShmError::Misaligned`] if
    /// `offset` is not a multiple of 8.
    #[cfg(not(loom))]
    pub fn new(region: Arc<ShmRegion>, offset: usize, count: usize) -> Result<Self, ShmError> {
        let bytes = count.checked_mul(8).ok_or(ShmError::OutOfBounds {
            offset,
            len: usize::MAX,
            region_len: region.len(),
        })?;
        let counters = region
            .ptr_at(offset, bytes, Self::ALIGN)?
            .cast::<AtomicU64>();
        Ok(Self {
            owner: Owner::Region(region),
            counters,
            len: count,
        })
    }

    /// A mailbox of `count` counters in this process's heap (threads of one process, and the
    /// storage loom models check).
    pub fn heap(count: usize) -> Self {
        let counters: Arc<Vec<AtomicU64>> =
            Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
        let ptr = counters.as_ptr();
        let (owner, counters) = (Owner::Heap(counters), ptr);
        Self {
            owner,
            counters,
            len: count,
        }
    }

    /// The number of counters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for a mailbox without counters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn counter(&self, index: usize) -> Result<&AtomicU64, ShmError> {
        if index >= self.len {
            return Err(ShmError::MailboxIndex {
                index,
                len: self.len,
            });
        }
        let _ = &self.owner;
        // SAFETY: `index < len` and the `len` counters are in bounds and 8-byte aligned
        // (checked at construction) in memory `owner` keeps alive; `AtomicU64` has the layout
        // of `u64` and any bit pattern is valid. Peers write it only atomically or, if faulty,
        // with plain stores the hardware makes atomic for aligned 8-byte words.
        Ok(unsafe { &*self.counters.add(index) })
    }

    /// Stores `value` in counter `index` with `Release` (receiver side).
    ///
    /// # Errors
    /// [`ShmError::MailboxIndex`].
    #[inline]
    pub fn store(&self, index: usize, value: u64) -> Result<(), ShmError> {
        self.counter(index)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Loads counter `index` with `Acquire` (sender side).
    ///
    /// # Errors
    /// [`ShmError::MailboxIndex`].
    #[inline]
    pub fn load(&self, index: usize) -> Result<u64, ShmError> {
        Ok(self.counter(index)?.load(Ordering::Acquire))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_between_mappings_and_bounds_checked() {
        let region = Arc::new(ShmRegion::create("mailbox", 4096).unwrap());
        let peer =
            Arc::new(ShmRegion::from_fd(region.fd().try_clone_to_owned().unwrap(), 4096).unwrap());
        let writer = CreditMailbox::new(region, 64, 4).unwrap();
        let reader = CreditMailbox::new(peer, 64, 4).unwrap();
        assert_eq!(reader.len(), 4);
        assert_eq!(reader.load(3).unwrap(), 0);
        writer.store(3, 0x1234_5678_9abc_def0).unwrap();
        writer.store(0, 7).unwrap();
        assert_eq!(reader.load(3).unwrap(), 0x1234_5678_9abc_def0);
        assert_eq!(reader.load(0).unwrap(), 7);
        assert!(matches!(
            writer.store(4, 1),
            Err(ShmError::MailboxIndex { index: 4, len: 4 })
        ));
        assert!(matches!(
            reader.load(usize::MAX),
            Err(ShmError::MailboxIndex { .. })
        ));
    }

    #[test]
    fn placement_is_checked() {
        let region = Arc::new(ShmRegion::create("mailbox-place", 4096).unwrap());
        assert!(matches!(
            CreditMailbox::new(region.clone(), 4, 2),
            Err(ShmError::Misaligned {
                offset: 4,
                align: 8
            })
        ));
        assert!(matches!(
            CreditMailbox::new(region.clone(), 4088, 2),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(CreditMailbox::new(region.clone(), 0, usize::MAX).is_err());
        assert!(CreditMailbox::new(region, 4080, 2).is_ok());
    }
}
