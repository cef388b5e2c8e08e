//! Memory windows (`ibv_alloc_mw(3)`, type 2): remote access to a slice of a registered region,
//! granted by a bind work request on a queue pair and revoked by a local invalidation, without
//! registering (pinning) the memory again.
//!
//! A rendezvous sender keeps its buffer's registration (local access and
//! [`AccessFlags::MW_BIND`] only: the region itself grants no remote access) and, per transfer,
//! binds a window with remote-read access over exactly the buffer
//! ([`super::SendWr::bind_mw`]), then invalidates it ([`super::SendWr::local_inv`]) when the
//! receiver has answered: the rkey the peer was given is dead after the transfer, as with a
//! per-transfer registration, but the pages are pinned once.
//!
//! [`AccessFlags::MW_BIND`]: super::AccessFlags::MW_BIND

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_mw, ibv_mw_type};

use super::error::{Result, VerbsError};
use super::mr::{PdInner, ProtectionDomain};
use super::types::Rkey;

pub(crate) struct MwInner {
    mw: NonNull<ibv_mw>,
    _pd: Arc<PdInner>,
}

// SAFETY: the window handle is only passed to the thread-safe verbs (a bind work request posted
// under `&mut QueuePair`, `ibv_dealloc_mw` once in Drop); no memory is reached through it.
unsafe impl Send for MwInner {}
// SAFETY: see `Send`: `&MwInner` only reads the handle's address.
unsafe impl Sync for MwInner {}

impl Drop for MwInner {
    fn drop(&mut self) {
        // SAFETY: allocated by `ibv_alloc_mw`, deallocated once; a window still bound is
        // invalidated by the deallocation, so no peer keeps access through it.
        let rc = unsafe { rdma_sys::ibv_dealloc_mw(self.mw.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_mw failed");
        }
    }
}

/// A type-2 memory window. Cheap to clone (the handle is shared); deallocated (and with that
/// invalidated) when the last clone drops. Bound and invalidated by work requests
/// ([`super::SendWr::bind_mw`], [`super::SendWr::local_inv`]); the window remembers the key of
/// its last bind.
#[derive(Clone)]
pub struct MemoryWindow {
    pub(crate) inner: Arc<MwInner>,
    rkey: u32,
}

impl std::fmt::Debug for MemoryWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWindow")
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .finish()
    }
}

impl MemoryWindow {
    /// Allocates a type-2 window in `pd` (`ibv_alloc_mw(3)`).
    ///
    /// # Errors
    /// [`VerbsError::AllocMw`] (`EOPNOTSUPP` when the device has no memory windows).
    pub fn alloc(pd: &ProtectionDomain) -> Result<MemoryWindow> {
        // SAFETY: valid PD (kept alive by the `Arc` stored below); the helper checks that the
        // provider implements `alloc_mw` and sets `EOPNOTSUPP` otherwise.
        let raw = unsafe { rdma_sys::ibv_alloc_mw(pd.raw(), ibv_mw_type::IBV_MW_TYPE_2) };
        let mw = raw
            .and_then(NonNull::new)
            .ok_or_else(|| VerbsError::AllocMw(io::Error::last_os_error()))?;
        // SAFETY: a window just allocated; `rkey` is set by the provider and read once.
        let rkey = unsafe { mw.as_ref().rkey };
        Ok(MemoryWindow {
            inner: Arc::new(MwInner {
                mw,
                _pd: pd.inner.clone(),
            }),
            rkey,
        })
    }

    /// The key of the last bind (or the allocation's key before any bind).
    pub fn rkey(&self) -> Rkey {
        Rkey(self.rkey)
    }

    /// The key the next bind should carry: the same window index, the next 8-bit tag (so a
    /// key from an earlier bind never matches the new one).
    pub fn next_rkey(&self) -> Rkey {
        Rkey(next_tag(self.rkey))
    }

    /// Records that a bind with `rkey` was posted. The provider names the window by the key in
    /// its `struct ibv_mw` when the next bind is posted, so that key is updated too.
    pub fn set_rkey(&mut self, rkey: Rkey) {
        self.rkey = rkey.0;
        // SAFETY: the window struct stays allocated while `inner` lives; the provider reads
        // `rkey` only while a bind of this window is being posted, which takes `&mut` of the
        // queue pair on this thread, not concurrently with this write (the link owns the window
        // between binds).
        unsafe { (*self.inner.mw.as_ptr()).rkey = rkey.0 };
    }

    pub(crate) fn as_raw(&self) -> *mut ibv_mw {
        self.inner.mw.as_ptr()
    }
}

/// `rkey` with its low 8 bits (the tag) advanced by one, the index (upper 24 bits) kept.
fn next_tag(rkey: u32) -> u32 {
    (rkey & !0xff) | (rkey.wrapping_add(1) & 0xff)
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_key_keeps_the_index_and_wraps_the_tag() {
        let k = super::next_tag;
        assert_eq!(k(0x1234_5600), 0x1234_5601);
        assert_eq!(k(0x1234_56ff), 0x1234_5600);
        assert_eq!(k(0xffff_ffff), 0xffff_ff00);
    }
}
