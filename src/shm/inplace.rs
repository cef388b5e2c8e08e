//! In-place access to message bytes, for zero-copy send and receive.
//!
//! # The trust model
//! A receiver hands the memfds of its target segments to one peer, exactly as a verbs receiver
//! hands the rkey of a target segment to one peer: from then on that peer *can* write any byte
//! of them. The partition protocol says it writes a partition only between the credit that frees
//! it and the doorbell that hands it over, and never while the receiver holds it. The borrowing
//! accessors below rely on that: while a `&[u8]` from [`ShmRegion::received`] lives, the peer
//! does not write those bytes; while a `&mut [u8]` from [`ShmRegion::filling`] lives, the
//! receiver does not read or write them.
//!
//! A peer that breaks the protocol can make the bytes of a message it sent change while the
//! application reads them, which it could have achieved by sending other bytes. It cannot make
//! this process access memory outside the region: every range is bounds-checked against the
//! mapping, and headers, lengths and immediates are copied out and validated by the core before
//! they steer anything. Code that must not trust its peer's content even to stay stable copies
//! it out first (`recv_into`).

use super::{ShmError, ShmRegion};

impl ShmRegion {
    /// Borrows `len` bytes at `offset` of a region holding received messages (zero-copy receive),
    /// under the trust model of this module.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    #[inline]
    pub fn received(&self, offset: usize, len: usize) -> Result<&[u8], ShmError> {
        let ptr = self.ptr_at(offset, len, 1)?;
        // SAFETY: the range lies inside the live mapping (checked), which outlives the borrow of
        // `self`. Nothing in this process writes it while the shared borrow lives: every writing
        // accessor takes `&mut self`. The peer does not write a partition the receiver holds
        // (the protocol's invariant; see the module docs for what a peer breaking it can do).
        Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// Borrows `len` bytes at `offset` of a peer's target region mutably, for filling a message in
    /// place (zero-copy send), under the trust model of this module.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    #[inline]
    pub fn filling(&mut self, offset: usize, len: usize) -> Result<&mut [u8], ShmError> {
        let ptr = self.ptr_at(offset, len, 1)?;
        // SAFETY: the range lies inside the live mapping (checked). `&mut self` excludes every
        // other access from this process while the slice lives; the receiver does not touch
        // partitions between granting them (credit) and receiving them (doorbell), which is when
        // a sender fills them.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }
}
