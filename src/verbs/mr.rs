//! Protection domains and memory regions.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_mr, ibv_pd};

use super::device::{Context, ContextInner};
use super::error::{Result, VerbsError};
use super::types::{AccessFlags, Lkey, Rkey};

pub(crate) struct PdInner {
    pub(crate) pd: NonNull<ibv_pd>,
    pub(crate) ctx: Arc<ContextInner>,
}

// SAFETY: a PD is an opaque kernel object handle; the verbs taking it (reg_mr, create_qp,
// dealloc_pd) are thread-safe in libibverbs. Deallocation happens once, in `Drop`.
unsafe impl Send for PdInner {}
// SAFETY: see `Send`; shared references only pass the handle to thread-safe verbs.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an `Arc<PdInner>`, so none remains; freed once.
        let rc = unsafe { rdma_sys::ibv_dealloc_pd(self.pd.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_pd failed");
        }
    }
}

/// A protection domain (`ibv_alloc_pd(3)`). Cheap to clone; keeps its [`Context`] alive.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl ProtectionDomain {
    /// Allocate a protection domain (`ibv_alloc_pd(3)`).
    ///
    /// # Errors
    /// [`VerbsError::AllocPd`].
    pub fn new(ctx: &Context) -> Result<ProtectionDomain> {
        // SAFETY: valid open context (kept alive by the `Arc` stored below).
        let pd = unsafe { rdma_sys::ibv_alloc_pd(ctx.raw()) };
        let pd = NonNull::new(pd).ok_or_else(|| VerbsError::AllocPd(io::Error::last_os_error()))?;
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: ctx.inner.clone(),
            }),
        })
    }

    pub(crate) fn raw(&self) -> *mut ibv_pd {
        self.inner.pd.as_ptr()
    }

    /// The context this PD belongs to.
    pub fn context(&self) -> Context {
        Context {
            inner: self.inner.ctx.clone(),
        }
    }
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name)
            .finish()
    }
}

/// Who owns the memory behind a region.
enum Backing {
    /// Allocated here with this layout; freed after deregistration.
    Owned(Layout),
    /// Owned by the caller of [`MemoryRegion::register`].
    Borrowed,
}

pub(crate) struct MrInner {
    mr: NonNull<ibv_mr>,
    addr: NonNull<u8>,
    len: usize,
    access: AccessFlags,
    backing: Backing,
    _pd: Arc<PdInner>,
}

// SAFETY: the MR handle is only passed to `ibv_dereg_mr` (once, in Drop). The memory is reached
// only through raw pointers in bounds-checked copies or through the `unsafe` views whose callers
// take on the aliasing rules; lkey/rkey/addr are immutable after registration.
unsafe impl Send for MrInner {}
// SAFETY: see `Send`: no method of `&MrInner` creates references to the memory on its own.
unsafe impl Sync for MrInner {}

impl Drop for MrInner {
    fn drop(&mut self) {
        // SAFETY: the MR was registered once and is deregistered once. After a successful
        // `ibv_dereg_mr` the device no longer accesses the memory, so freeing it is sound.
        let rc = unsafe { rdma_sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            // The device may still reach the memory: leak it rather than free it under DMA.
            tracing::warn!(
                rc,
                len = self.len,
                "ibv_dereg_mr failed; leaking its memory"
            );
            return;
        }
        if let Backing::Owned(layout) = self.backing {
            // SAFETY: allocated in `MemoryRegion::alloc` with exactly this layout, freed once.
            unsafe { std::alloc::dealloc(self.addr.as_ptr(), layout) };
        }
    }
}

/// A registered memory region (`ibv_reg_mr(3)`). Cheap to clone; keeps its PD alive.
///
/// Its memory may be written by the device (and, with remote access, by peers) at any time, so
/// it is read and written through bounds-checked copies ([`MemoryRegion::read`],
/// [`MemoryRegion::write`]) or, for zero-copy, through `unsafe` views whose caller guarantees
/// that no transfer targets the range meanwhile.
#[derive(Clone)]
pub struct MemoryRegion {
    pub(crate) inner: Arc<MrInner>,
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

const PAGE: usize = 4096;

impl MemoryRegion {
    /// Allocate `len` zeroed, page-aligned bytes and register them with `access`
    /// (`ibv_reg_mr(3)`).
    ///
    /// # Errors
    /// [`VerbsError::AllocBuffer`] for `len == 0` or when allocation fails;
    /// [`VerbsError::RegMr`] (e.g. `ENOMEM` when the locked-memory limit is hit).
    pub fn alloc(pd: &ProtectionDomain, len: usize, access: AccessFlags) -> Result<MemoryRegion> {
        let layout =
            Layout::from_size_align(len, PAGE).map_err(|_| VerbsError::AllocBuffer { len })?;
        if len == 0 {
            return Err(VerbsError::AllocBuffer { len });
        }
        // SAFETY: `layout` has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let addr = NonNull::new(p).ok_or(VerbsError::AllocBuffer { len })?;
        // SAFETY: `addr..addr+len` is a live allocation owned by the region being built; on
        // failure it is freed below.
        match unsafe { Self::reg(pd, addr, len, access, Backing::Owned(layout)) } {
            Ok(mr) => Ok(mr),
            Err(e) => {
                // SAFETY: allocated just above with `layout`, not registered, freed once.
                unsafe { std::alloc::dealloc(addr.as_ptr(), layout) };
                Err(e)
            }
        }
    }

    /// Register caller-owned memory (`ibv_reg_mr(3)`), e.g. a user buffer for a rendezvous.
    ///
    /// # Errors
    /// [`VerbsError::RegMr`]; [`VerbsError::AllocBuffer`] for a null pointer or zero length.
    ///
    /// # Safety
    /// `addr..addr+len` must stay valid (allocated, not unmapped) until every clone of the
    /// returned region is dropped, and the caller must not create Rust references to it that
    /// overlap a transfer the device performs (the device reads or writes it asynchronously).
    pub unsafe fn register(
        pd: &ProtectionDomain,
        addr: *mut u8,
        len: usize,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        let addr = NonNull::new(addr).ok_or(VerbsError::AllocBuffer { len })?;
        if len == 0 {
            return Err(VerbsError::AllocBuffer { len });
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::reg(pd, addr, len, access, Backing::Borrowed) }
    }

    /// # Safety
    /// `addr..addr+len` is valid memory that outlives the region.
    unsafe fn reg(
        pd: &ProtectionDomain,
        addr: NonNull<u8>,
        len: usize,
        access: AccessFlags,
        backing: Backing,
    ) -> Result<MemoryRegion> {
        // SAFETY: valid PD; memory valid per this function's contract; access bits are a
        // subset of the defined `ibv_access_flags`.
        let mr = unsafe {
            rdma_sys::ibv_reg_mr(
                pd.raw(),
                addr.as_ptr().cast(),
                len,
                access.bits() as libc::c_int,
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| VerbsError::RegMr {
            len,
            source: io::Error::last_os_error(),
        })?;
        Ok(MemoryRegion {
            inner: Arc::new(MrInner {
                mr,
                addr,
                len,
                access,
                backing,
                _pd: pd.inner.clone(),
            }),
        })
    }

    /// The registration handle, for a memory window bind (`struct ibv_mw_bind_info`).
    pub(crate) fn as_raw(&self) -> *mut ibv_mr {
        self.inner.mr.as_ptr()
    }

    fn raw(&self) -> &ibv_mr {
        // SAFETY: the MR stays registered (and its struct allocated) while `inner` lives; its
        // fields are written by libibverbs only during registration.
        unsafe { self.inner.mr.as_ref() }
    }

    /// The local key, for scatter/gather entries.
    pub fn lkey(&self) -> Lkey {
        Lkey(self.raw().lkey)
    }
    /// The remote key, for a peer's RDMA WRITE/READ (zero meaning if the region has no remote access).
    pub fn rkey(&self) -> Rkey {
        Rkey(self.raw().rkey)
    }
    /// The address of the first byte (what a peer uses as the remote address).
    pub fn addr(&self) -> u64 {
        self.inner.addr.as_ptr() as u64
    }
    /// A raw pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.addr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }
    /// Whether the region is empty (never true: zero-length regions are refused).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// The access rights it was registered with.
    pub fn access(&self) -> AccessFlags {
        self.inner.access
    }
    /// Whether two handles refer to the same registration.
    pub fn same_region(&self, other: &MemoryRegion) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Check that `offset..offset+len` lies inside the region.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.len => Ok(()),
            _ => Err(VerbsError::OutOfBounds {
                offset,
                len,
                region_len: self.inner.len,
            }),
        }
    }

    /// Copy `data` into the region at `offset`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        // In pieces where a long `memcpy` crawls (under emulation: `crate::copy`), else one.
        let step = crate::copy::piece_len();
        for (i, piece) in data.chunks(step).enumerate() {
            // SAFETY: the range is inside the live allocation (checked above for the whole of
            // `data`, of which this piece is the part at `i * step`); the source is a distinct
            // Rust slice so the ranges do not overlap. The region is only accessed through raw
            // pointers here, so no Rust reference aliases it.
            unsafe {
                let dst = self.as_ptr().add(offset + i * step);
                std::ptr::copy_nonoverlapping(piece.as_ptr(), dst, piece.len())
            };
        }
        Ok(())
    }

    /// Copy bytes of the region at `offset` into `out`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_range(offset, out.len())?;
        let step = crate::copy::piece_len();
        for (i, piece) in out.chunks_mut(step).enumerate() {
            // SAFETY: as in `write`, with the roles of source and destination swapped.
            unsafe {
                let src = self.as_ptr().add(offset + i * step);
                std::ptr::copy_nonoverlapping(src, piece.as_mut_ptr(), piece.len())
            };
        }
        Ok(())
    }

    /// Fill `offset..offset+len` with `byte`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: in-bounds range of the live allocation, accessed through a raw pointer only.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// A shared view of `offset..offset+len` (zero-copy receive).
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    ///
    /// # Safety
    /// While the slice lives, nothing may write the range: no RDMA WRITE or READ response from
    /// a peer or the local device, and no [`MemoryRegion::write`] or mutable view. A protocol
    /// that hands the range back to the peer only after the view is dropped satisfies this.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> Result<&[u8]> {
        self.check_range(offset, len)?;
        // SAFETY: in bounds of the live allocation, which outlives `&self`; exclusive of
        // writers by the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts(self.as_ptr().add(offset), len) })
    }

    /// A mutable view of `offset..offset+len` (fill a source image in place).
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`].
    ///
    /// # Safety
    /// While the slice lives, nothing else may read or write the range: no posted work request
    /// reading it (RDMA WRITE/SEND source), no remote access, no other view or copy.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> Result<&mut [u8]> {
        self.check_range(offset, len)?;
        // SAFETY: in bounds of the live allocation; exclusive by the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(offset), len) })
    }
}
