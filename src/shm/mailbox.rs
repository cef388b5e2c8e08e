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

#[cfg(not(loom))]
type Owner = Arc<ShmRegion>;
#[cfg(loom)]
type Owner = Arc<[AtomicU64]>;

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
            owner: region,
            counters,
            len: count,
        })
    }

    /// A mailbox over heap storage, for loom models.
    #[cfg(loom)]
    pub fn model(count: usize) -> Self {
        let owner: Arc<[AtomicU64]> = (0..count)
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into();
        let counters = owner.as_ptr();
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
