//! Memory regions backed by a sealed memfd and mapped `MAP_SHARED`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use super::ShmError;

/// Seals every region carries: its size can never change, and no seal can be removed or added.
/// `F_SEAL_SHRINK` is the one that matters for memory safety: a file shrunk under a live mapping
/// turns accesses past its new end into `SIGBUS`.
pub const REQUIRED_SEALS: u32 =
    (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL) as u32;

/// The longest memfd name the kernel accepts (249 bytes plus the `memfd:` prefix).
const MAX_NAME: usize = 249;

/// A shared memory region: a memfd sealed against resizing and mapped read-write `MAP_SHARED`.
///
/// The receiver of a connection [creates](Self::create) a region, passes [`fd`](Self::fd) to the
/// sender (see [`send_fds`](super::send_fds)), and the sender [opens](Self::from_fd) it, which
/// checks the size and the seals. Both then see the same pages.
///
/// # Memory shared with another process
/// A peer process can write any byte of the region at any time. The safe accessors are written
/// so that this can never break memory safety on this side:
/// - [`copy_in`](Self::copy_in) / [`copy_out`](Self::copy_out) and [`RegionView`] copy through
///   raw pointers (`ptr::copy_nonoverlapping`) and never create a Rust reference to the shared
///   bytes, so the compiler is never told the bytes are immutable or exclusive. If a peer writes
///   concurrently, the copied bytes may be a mix of old and new values (every bit pattern is a
///   valid `u8`): the *content* is then untrustworthy, which the protocol layer must check anyway
///   (headers, lengths and generations are validated), but nothing reads out of bounds.
/// - Handing out `&[u8]` to such memory is only sound while nobody writes it: the protocol
///   guarantees that a correct sender leaves a partition alone until it is released, but a
///   buggy or hostile peer could still write it, and the compiler may assume a `&[u8]` does not
///   change (re-reading it may be folded away, checks may be bypassed). That is why the
///   borrowing accessor ([`RegionView::as_bytes`]) is `unsafe` and states this contract.
/// - The accessors that write take `&mut self`, so two threads of this process cannot race on
///   the same region through this type.
///
/// The mapping is unmapped and the fd closed on drop. Atomics placed in the region
/// ([`Doorbell`](super::DoorbellConsumer), [`CreditMailbox`](super::CreditMailbox)) share it
/// through an `Arc<ShmRegion>`.
#[derive(Debug)]
pub struct ShmRegion {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region owns its fd and its mapping; the raw pointer is only the mapping's base,
// valid until drop wherever the value moves. Nothing is tied to the creating thread.
unsafe impl Send for ShmRegion {}
// SAFETY: every `&self` access either copies out through raw pointers (reads of memory that is
// already written concurrently by another process, see the type docs) or goes through atomics
// placed in the region; all writes through raw pointers require `&mut self`.
unsafe impl Sync for ShmRegion {}

impl ShmRegion {
    /// Creates a memfd of `len` bytes named `name` (for `/proc/*/fd` readers only), with
    /// `MFD_CLOEXEC | MFD_ALLOW_SEALING`, sizes it with `ftruncate`, seals it with
    /// [`REQUIRED_SEALS`] and maps it `MAP_SHARED`. The memory starts zeroed.
    ///
    /// # Errors
    /// [`ShmError::InvalidName`], [`ShmError::InvalidLength`] for `len == 0`, or the failed step:
    /// [`ShmError::MemfdCreate`], [`ShmError::Truncate`], [`ShmError::Seal`], [`ShmError::Mmap`].
    /// See `memfd_create(2)`, `fcntl(2)` (file sealing), `mmap(2)`.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        if name.len() > MAX_NAME {
            return Err(ShmError::InvalidName {
                name: name.into(),
                reason: "longer than 249 bytes",
            });
        }
        let cname = CString::new(name).map_err(|_| ShmError::InvalidName {
            name: name.into(),
            reason: "contains NUL",
        })?;
        let file_len = libc::off_t::try_from(len).map_err(|_| ShmError::InvalidLength { len })?;
        if len == 0 {
            return Err(ShmError::InvalidLength { len });
        }
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(ShmError::MemfdCreate {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), file_len) } != 0 {
            return Err(ShmError::Truncate {
                len,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: plain fcntl on an fd we own; F_ADD_SEALS takes an int argument.
        if unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                REQUIRED_SEALS as libc::c_int,
            )
        } != 0
        {
            return Err(ShmError::Seal(io::Error::last_os_error()));
        }
        Self::map(fd, len)
    }

    /// Maps a region received from a peer, after checking that `fd` is a memfd carrying
    /// [`REQUIRED_SEALS`] and that its size is exactly `expected_len`, the length the caller's
    /// layout needs (never a size the peer announced).
    ///
    /// # Errors
    /// [`ShmError::NotMemfd`], [`ShmError::MissingSeals`], [`ShmError::Fstat`],
    /// [`ShmError::SizeMismatch`], [`ShmError::InvalidLength`], [`ShmError::Mmap`].
    /// The fd is closed on error.
    pub fn from_fd(fd: OwnedFd, expected_len: usize) -> Result<Self, ShmError> {
        if expected_len == 0 {
            return Err(ShmError::InvalidLength { len: expected_len });
        }
        // SAFETY: plain fcntl on an fd we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(ShmError::NotMemfd(io::Error::last_os_error()));
        }
        let seals = seals as u32;
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(ShmError::MissingSeals {
                found: seals,
                required: REQUIRED_SEALS,
            });
        }
        // SAFETY: `libc::stat` is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable `stat` buffer for the duration of the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(ShmError::Fstat(io::Error::last_os_error()));
        }
        let actual = st.st_size as u64;
        if st.st_size < 0 || actual != expected_len as u64 {
            return Err(ShmError::SizeMismatch {
                expected: expected_len,
                actual,
            });
        }
        Self::map(fd, expected_len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        // SAFETY: a fresh mapping chosen by the kernel (addr = NULL) cannot alias any Rust
        // object; `fd` is open and `len` equals the file size, which the seals pin.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ShmError::Mmap {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(ShmError::Mmap {
            len,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(Self { fd, ptr, len })
    }

    /// The region's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a region is never empty. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass to a peer with [`send_fds`](super::send_fds).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The base address of the mapping. Getting it is safe; using it is the caller's business
    /// (valid for [`len`](Self::len) bytes while `self` lives).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Checks that `offset..offset + len` lies in the region.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    #[inline]
    pub fn check_range(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    /// Pointer to `offset`, after checking `offset..offset+len` is in bounds and `offset` is a
    /// multiple of `align` (the base is page-aligned).
    #[inline]
    pub(crate) fn ptr_at(
        &self,
        offset: usize,
        len: usize,
        align: usize,
    ) -> Result<*mut u8, ShmError> {
        self.check_range(offset, len)?;
        if !offset.is_multiple_of(align) {
            return Err(ShmError::Misaligned { offset, align });
        }
        // SAFETY: `offset <= len` of the mapping, checked above, so the result stays inside
        // (or one past) the same allocation.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`] if the range does not fit; nothing is written then.
    #[inline]
    pub fn copy_in(&mut self, offset: usize, src: &[u8]) -> Result<(), ShmError> {
        let dst = self.ptr_at(offset, src.len(), 1)?;
        // In pieces where a long `memcpy` crawls (under emulation: `crate::copy`), else one.
        let step = crate::copy::piece_len();
        for (i, piece) in src.chunks(step).enumerate() {
            // SAFETY: `dst..dst+src.len()` is inside the mapping (checked), and this piece is
            // the part of it at `i * step`; `src` is a Rust slice and cannot overlap the
            // mapping, to which no Rust reference is ever handed out safely. `&mut self`
            // excludes writers of this process; a peer process writing the same bytes can only
            // change their values, never the bounds.
            unsafe {
                let d = dst.add(i * step);
                std::ptr::copy_nonoverlapping(piece.as_ptr(), d, piece.len())
            };
        }
        Ok(())
    }

    /// Borrows `len` bytes at `offset` mutably, for filling a message in place (zero-copy send).
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    ///
    /// # Safety
    /// No other process may write the range while the slice lives (the caller trusts the peer
    /// to follow the protocol: a receiver does not write the partitions it lent to the sender).
    /// Reads by the peer are harmless to this side.
    pub unsafe fn bytes_mut(&mut self, offset: usize, len: usize) -> Result<&mut [u8], ShmError> {
        let ptr = self.ptr_at(offset, len, 1)?;
        // SAFETY: the range is inside the mapping (checked); `&mut self` excludes every other
        // access from this process for the slice's lifetime, the caller excludes other writers.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }

    /// Copies bytes of the region at `offset` into `dst`. If a peer writes the range at the
    /// same time, `dst` may hold a mix of old and new bytes (see the type docs).
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`] if the range does not fit; `dst` is untouched then.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        self.view(offset, dst.len())?.copy_to(dst);
        Ok(())
    }

    /// A bounds-checked view of `len` bytes at `offset`, for reading in place.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    #[inline]
    pub fn view(&self, offset: usize, len: usize) -> Result<RegionView<'_>, ShmError> {
        let ptr = self.ptr_at(offset, len, 1)?;
        Ok(RegionView {
            ptr,
            len,
            _region: std::marker::PhantomData,
        })
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `map`; every borrow of the
        // region (views, `Arc` holders) has ended since we are being dropped.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of a mapping we own failed");
        // `fd` closes itself.
    }
}

/// A bounds-checked window on a [`ShmRegion`], borrowed from it.
///
/// Reading through the view copies (`copy_to`, `to_vec`, `read_u32_le`, …) and is always safe.
/// A view never promises that the bytes stay put: a peer process may write them (a correct
/// peer does not while the protocol says the partition is the receiver's; a faulty one might).
#[derive(Debug, Clone, Copy)]
pub struct RegionView<'a> {
    ptr: *const u8,
    len: usize,
    _region: std::marker::PhantomData<&'a ShmRegion>,
}

// SAFETY: a view is a bounds-checked pointer range into a region that is itself `Sync`;
// it only ever reads through raw copies.
unsafe impl Send for RegionView<'_> {}
// SAFETY: as for `Send`: shared views only copy out.
unsafe impl Sync for RegionView<'_> {}

impl<'a> RegionView<'a> {
    /// The view's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for a zero-length view.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the whole view into `dst`.
    ///
    /// # Panics
    /// If `dst.len() != self.len()` (a caller bug, like `slice::copy_from_slice`).
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len, "RegionView::copy_to length mismatch");
        let step = crate::copy::piece_len();
        for (i, piece) in dst.chunks_mut(step).enumerate() {
            // SAFETY: the view's range is inside a live mapping (checked when the view was made,
            // the lifetime keeps the region), and this piece is the part of it at `i * step`;
            // `dst` is a Rust slice, disjoint from the mapping.
            unsafe {
                let src = self.ptr.add(i * step);
                std::ptr::copy_nonoverlapping(src, piece.as_mut_ptr(), piece.len())
            };
        }
    }

    /// Copies the view into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(&mut v);
        v
    }

    /// A sub-view, bounds-checked against this view.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`] (with `region_len` = this view's length).
    pub fn sub(&self, offset: usize, len: usize) -> Result<RegionView<'a>, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(RegionView {
                // SAFETY: `offset <= self.len`, so the pointer stays inside the view.
                ptr: unsafe { self.ptr.add(offset) },
                len,
                _region: std::marker::PhantomData,
            }),
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    /// Reads a little-endian `u32` at `offset` of the view (one copy, possibly torn by a
    /// concurrent peer write).
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    pub fn read_u32_le(&self, offset: usize) -> Result<u32, ShmError> {
        let mut b = [0u8; 4];
        self.sub(offset, 4)?.copy_to(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    /// Borrows the bytes in place, for zero-copy reads.
    ///
    /// # Safety
    /// No one, in this process or any other mapping the same memfd, may write the viewed bytes
    /// while the returned slice lives. The protocol gives this guarantee against a *correct*
    /// peer (a sender does not touch a partition until the receiver released it); the caller
    /// asserts it also holds for the peer at hand, i.e. that the peer is trusted. Against an
    /// untrusted peer use [`copy_to`](Self::copy_to) and validate the copy.
    pub unsafe fn as_bytes(&self) -> &'a [u8] {
        // SAFETY: the range is inside a live mapping for `'a`; the caller guarantees that nobody
        // writes it while the slice lives, which is what `&[u8]` requires.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies in and out go in pieces where `crate::copy` chose them: every byte lands, at
    /// every offset, and bounds are checked for the whole copy before any piece.
    #[test]
    fn copies_in_pieces_are_exact() {
        let before = crate::copy::piece_len();
        crate::copy::set_piece_len(crate::copy::PIECE);
        let len = 3 * crate::copy::PIECE + 17;
        let mut r = ShmRegion::create("pieces", 4 * crate::copy::PIECE + 64).unwrap();
        let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x5A).collect();
        for offset in [0, 1, 63] {
            r.copy_in(offset, &src).unwrap();
            let mut out = vec![0; len];
            r.copy_out(offset, &mut out).unwrap();
            assert_eq!(out, src, "offset {offset}");
        }
        let end = r.len() - len + 1;
        assert!(r.copy_in(end, &src).is_err());
        crate::copy::set_piece_len(before);
    }

    fn unsealed_memfd(len: i64) -> OwnedFd {
        // SAFETY (test): valid C string; the new fd is owned by the returned OwnedFd.
        unsafe {
            let raw = libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC);
            assert!(raw >= 0);
            assert_eq!(libc::ftruncate(raw, len), 0);
            OwnedFd::from_raw_fd(raw)
        }
    }

    #[test]
    fn create_copy_and_reopen_share_memory() {
        let mut a = ShmRegion::create("region-test", 8192).unwrap();
        assert_eq!(a.len(), 8192);
        let mut zero = [1u8; 16];
        a.copy_out(100, &mut zero).unwrap();
        assert_eq!(zero, [0u8; 16], "a new region must read as zeroes");
        a.copy_in(100, b"shared bytes").unwrap();
        let mut b = ShmRegion::from_fd(a.fd().try_clone_to_owned().unwrap(), 8192).unwrap();
        assert_eq!(b.view(100, 12).unwrap().to_vec(), b"shared bytes");
        b.copy_in(8188, &0xdead_beef_u32.to_le_bytes()).unwrap();
        assert_eq!(
            a.view(0, 8192).unwrap().read_u32_le(8188).unwrap(),
            0xdead_beef
        );
        // SAFETY (test): nobody writes the region while the slice lives.
        let bytes = unsafe { a.view(100, 6).unwrap().as_bytes() };
        assert_eq!(bytes, b"shared");
        // SAFETY (test): no other writer of these bytes while the slice lives.
        unsafe { b.bytes_mut(0, 4).unwrap() }.copy_from_slice(b"abcd");
        assert_eq!(a.view(0, 4).unwrap().to_vec(), b"abcd");
    }

    #[test]
    fn out_of_bounds_accesses_are_rejected() {
        let mut r = ShmRegion::create("bounds", 4096).unwrap();
        assert!(matches!(
            r.copy_in(4090, &[0; 7]),
            Err(ShmError::OutOfBounds {
                offset: 4090,
                len: 7,
                region_len: 4096
            })
        ));
        assert!(matches!(
            r.copy_in(usize::MAX, &[0; 2]),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.copy_out(4097, &mut []),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(r.copy_out(4096, &mut []).is_ok());
        assert!(r.view(1, 4096).is_err());
        let v = r.view(4000, 96).unwrap();
        assert!(v.sub(90, 7).is_err());
        assert!(v.read_u32_le(93).is_err());
        assert_eq!(v.sub(90, 6).unwrap().len(), 6);
        assert!(matches!(
            r.ptr_at(4, 8, 8),
            Err(ShmError::Misaligned {
                offset: 4,
                align: 8
            })
        ));
    }

    #[test]
    fn size_mismatch_is_rejected() {
        let a = ShmRegion::create("size", 4096).unwrap();
        match ShmRegion::from_fd(a.fd().try_clone_to_owned().unwrap(), 8192) {
            Err(ShmError::SizeMismatch {
                expected: 8192,
                actual: 4096,
            }) => {}
            other => panic!("expected SizeMismatch, got {other:?}"),
        }
        assert!(matches!(
            ShmRegion::from_fd(a.fd().try_clone_to_owned().unwrap(), 4095),
            Err(ShmError::SizeMismatch { .. })
        ));
        assert!(matches!(
            ShmRegion::from_fd(a.fd().try_clone_to_owned().unwrap(), 0),
            Err(ShmError::InvalidLength { len: 0 })
        ));
    }

    #[test]
    fn regions_are_sealed_and_unsealed_or_foreign_fds_rejected() {
        let a = ShmRegion::create("sealed", 4096).unwrap();
        // SAFETY (test): fcntl/ftruncate on an fd we borrow.
        let seals = unsafe { libc::fcntl(a.fd().as_raw_fd(), libc::F_GET_SEALS) } as u32;
        assert_eq!(seals & REQUIRED_SEALS, REQUIRED_SEALS);
        // SAFETY (test): as above.
        assert_ne!(
            unsafe { libc::ftruncate(a.fd().as_raw_fd(), 0) },
            0,
            "shrinking must be refused"
        );
        match ShmRegion::from_fd(unsealed_memfd(4096), 4096) {
            // Without MFD_ALLOW_SEALING the kernel sets F_SEAL_SEAL only.
            Err(ShmError::MissingSeals {
                found,
                required: REQUIRED_SEALS,
            }) if found == libc::F_SEAL_SEAL as u32 => {}
            other => panic!("expected MissingSeals, got {other:?}"),
        }
        let (rd, _wr) = std::io::pipe().unwrap();
        assert!(matches!(
            ShmRegion::from_fd(rd.into(), 4096),
            Err(ShmError::NotMemfd(_))
        ));
    }

    #[test]
    fn invalid_create_arguments() {
        assert!(matches!(
            ShmRegion::create("x", 0),
            Err(ShmError::InvalidLength { len: 0 })
        ));
        assert!(matches!(
            ShmRegion::create("a\0b", 64),
            Err(ShmError::InvalidName { .. })
        ));
        assert!(matches!(
            ShmRegion::create(&"n".repeat(300), 64),
            Err(ShmError::InvalidName { .. })
        ));
        assert!(matches!(
            ShmRegion::create("huge", usize::MAX),
            Err(ShmError::InvalidLength { .. })
        ));
    }
}
