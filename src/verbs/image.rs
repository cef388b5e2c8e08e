//! Memory regions with one role each in a messaging connection, so that their bytes can be
//! borrowed without `unsafe` at the call site.
//!
//! - [`SourceImage`]: the sender's local image of a peer's target segment. Local access only (no
//!   peer can write it); this process writes it through `&mut self` and the local device reads it
//!   for the work requests posted from it.
//! - [`TargetImage`]: a segment peers write messages into (remote write). This process only reads
//!   it, in place.
//! - [`CreditWords`]: an array of `u64` counters a peer writes with RDMA WRITE and this process
//!   reads atomically (the credit mailbox).
//!
//! None of them is `Clone` and none hands out its [`MemoryRegion`]: work requests are built by the
//! image itself, so no other handle in this process can write the bytes a borrow covers.
//!
//! # Trust model of in-place access
//! A peer can write a [`TargetImage`] at any time, including bytes the application is reading
//! (a peer that breaks the protocol). That can change the values read, never their bounds: every
//! offset and length is checked against the region, and the protocol core validates headers and
//! immediates before they steer anything. Code that must not trust a peer's content to stay
//! stable copies it out first.

use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{Result, VerbsError};
use super::mr::{MemoryRegion, ProtectionDomain};
use super::qp::{SendOp, SendWr};
use super::types::{AccessFlags, Rkey, WrId};

/// A sender's local image of a peer's target segment (local access only).
#[derive(Debug)]
pub struct SourceImage {
    mr: MemoryRegion,
}

impl SourceImage {
    /// Allocates and registers `len` zeroed bytes with local access only.
    ///
    /// # Errors
    /// As [`MemoryRegion::alloc`].
    pub fn new(pd: &ProtectionDomain, len: usize) -> Result<SourceImage> {
        Ok(SourceImage {
            mr: MemoryRegion::alloc(pd, len, AccessFlags::local_only())?,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mr.len()
    }

    /// Whether the image is empty (never: zero-length regions are refused).
    pub fn is_empty(&self) -> bool {
        self.mr.is_empty()
    }

    /// Copies `data` into the image at `offset`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    #[inline]
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        self.mr.write(offset, data)
    }

    /// Borrows `offset..offset+len` mutably, to fill a message in place (zero-copy send).
    ///
    /// A work request posted earlier from the same range may still be read by the device; the
    /// caller's protocol must refill a range only after its transfer completed (rsmsg's core
    /// reuses partitions only after the receiver released them), otherwise the transfer carries a
    /// mix of old and new bytes. Bounds are always checked.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    #[inline]
    pub fn filling(&mut self, offset: usize, len: usize) -> Result<&mut [u8]> {
        // SAFETY: the region has no remote access, so no peer writes it; every handle of this
        // process that could write it is owned by `self` (the image is not `Clone` and never
        // hands out its region; work requests keep a handle only to name the SGE), and
        // `&mut self` excludes them for the slice's lifetime. The device only *reads* ranges
        // posted from the image, which changes no byte the slice covers.
        unsafe { self.mr.slice_mut(offset, len) }
    }

    /// A work request of operation `op` with one SGE covering `offset..offset+len` of this
    /// image, to be patched with [`SendWr::set_sge`] and posted.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    pub fn send_wr(&self, op: SendOp, wr_id: WrId, offset: usize, len: usize) -> Result<SendWr> {
        let mut wr = SendWr::new(op, wr_id);
        wr.push_sge(&self.mr, offset, len)?;
        Ok(wr)
    }
}

/// A segment peers write messages into (remote write), read in place by this process.
#[derive(Debug)]
pub struct TargetImage {
    mr: MemoryRegion,
}

impl TargetImage {
    /// Allocates and registers `len` zeroed bytes with local and remote write access.
    ///
    /// # Errors
    /// As [`MemoryRegion::alloc`].
    pub fn new(pd: &ProtectionDomain, len: usize) -> Result<TargetImage> {
        Ok(TargetImage {
            mr: MemoryRegion::alloc(pd, len, AccessFlags::remote_write())?,
        })
    }

    /// The address peers write to.
    pub fn addr(&self) -> u64 {
        self.mr.addr()
    }

    /// The remote key peers use.
    pub fn rkey(&self) -> Rkey {
        self.mr.rkey()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mr.len()
    }

    /// Whether the image is empty (never: zero-length regions are refused).
    pub fn is_empty(&self) -> bool {
        self.mr.is_empty()
    }

    /// Borrows `offset..offset+len` of a received message (zero-copy receive), under the trust
    /// model of this module.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    #[inline]
    pub fn received(&self, offset: usize, len: usize) -> Result<&[u8]> {
        // SAFETY: in bounds (checked by `slice`) of the live allocation, which outlives `&self`.
        // Nothing in this process writes the region: the image has no writing method and never
        // hands out its region. A peer writes only partitions the receiver has not handed out
        // (the protocol's invariant; a peer breaking it changes values, never bounds).
        unsafe { self.mr.slice(offset, len) }
    }
}

/// An array of `u64` counters that a peer writes with RDMA WRITE (8-byte aligned, remote
/// write) and this process reads atomically: the credit mailbox.
#[derive(Debug)]
pub struct CreditWords {
    mr: MemoryRegion,
    count: usize,
}

impl CreditWords {
    /// Allocates `count` zeroed counters (`count * 8` bytes, page aligned) with remote write.
    ///
    /// # Errors
    /// As [`MemoryRegion::alloc`].
    pub fn new(pd: &ProtectionDomain, count: usize) -> Result<CreditWords> {
        let len = count
            .checked_mul(8)
            .ok_or(VerbsError::AllocBuffer { len: usize::MAX })?;
        Ok(CreditWords {
            mr: MemoryRegion::alloc(pd, len, AccessFlags::remote_write())?,
            count,
        })
    }

    /// The address peers write to.
    pub fn addr(&self) -> u64 {
        self.mr.addr()
    }

    /// The remote key peers use.
    pub fn rkey(&self) -> Rkey {
        self.mr.rkey()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mr.len()
    }

    /// Whether there are no counters.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Reads counter `index` (`Acquire`): the bytes the peer wrote before it are visible after.
    /// `None` for an index out of range.
    #[inline]
    pub fn load(&self, index: usize) -> Option<u64> {
        if index >= self.count {
            return None;
        }
        // SAFETY: `index < count`, so `index * 8 .. +8` lies inside the page-aligned (hence
        // 8-aligned) allocation, which outlives `&self`. This process only ever accesses the
        // counters atomically (the type has no other accessor and never hands out its region);
        // the device writes them with aligned 8-byte RDMA WRITEs.
        let word = unsafe { AtomicU64::from_ptr(self.mr.as_ptr().add(index * 8).cast::<u64>()) };
        Some(word.load(Ordering::Acquire))
    }
}
