//! The rendezvous registrations: caches of local registrations for receive destinations and
//! send buffers, and scoped remote-read grants for send buffers.
//!
//! # What is cached, what is not
//! - Receive destinations (the READ target, `LOCAL_WRITE` only, no remote access) may be kept
//!   in a [`RegCache`] keyed by address range, under a byte cap with LRU eviction. A hit saves
//!   `ibv_reg_mr` (pinning every page) and `ibv_dereg_mr`.
//! - Send buffers are never cached with remote access. By default a [`RemoteReadGrant`]
//!   registers the buffer with `REMOTE_READ` for one transfer and deregisters it when dropped
//!   (after the receiver's done). With a send cache ([`RegCache::for_send`]) the buffer's
//!   registration is kept with [`AccessFlags::MW_BIND`] only (no remote access) and each
//!   transfer binds a memory window with remote read over exactly the buffer
//!   ([`BoundWindow`]), invalidated when the transfer ends. Either way no memory of the process
//!   is remotely readable outside a transfer in flight, and a stale rkey a peer kept is useless
//!   once the transfer ends.
//!
//! # Invalidation: what the cache can and cannot see
//! The cache holds registrations of memory it does not own. If the application frees a buffer
//! that is cached and the address range later holds other memory (`munmap` then `mmap`, which
//! the allocator does for large blocks), the cached registration still pins the *old* pages:
//! a READ through it lands there, and the new buffer never sees the data. Nothing in this crate
//! can detect that: there are no allocator or `munmap` hooks (and no userfaultfd monitor). The
//! contract is therefore explicit:
//! - call [`RegCache::invalidate`] (through the connection) for a range before freeing or
//!   unmapping memory that was used as a rendezvous receive destination, or
//! - keep the cache disabled (cap 0, the default), which registers every destination per
//!   transfer and is always correct.
//!
//! Entries are also dropped by LRU eviction when the cap is reached, and all of them with the
//! cache.
//!
//! The send cache has the same contract, with a different failure: a send buffer freed while
//! cached, whose address range later holds new memory, is sent from the *old* pages (the window
//! is bound over the stale registration): the receiver silently gets stale bytes. Hence the send
//! cache is off by default too, and [`RegCache::invalidate`] must be called (through the
//! connection) before freeing or unmapping a buffer that was sent by rendezvous while it is on.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use super::error::Result;
use super::mr::{MemoryRegion, ProtectionDomain};
use super::mw::MemoryWindow;
use super::types::{AccessFlags, Rkey};

/// Counters of a registration cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegCacheStats {
    /// Lookups served by a cached registration.
    pub hits: u64,
    /// Lookups that registered.
    pub misses: u64,
    /// Entries dropped to stay under the cap.
    pub evictions: u64,
    /// Entries dropped by [`RegCache::invalidate`].
    pub invalidations: u64,
    /// Bytes currently registered by the cache.
    pub bytes_registered: u64,
    /// Bytes registered over the cache's life (misses, cached or not).
    pub bytes_registered_total: u64,
    /// Entries currently cached.
    pub entries: u64,
}

/// Address ranges mapped to values, with LRU eviction under a byte cap: the pure bookkeeping of
/// [`RegCache`] (no verbs), usable with any value.
#[derive(Debug)]
pub struct RangeCache<V> {
    cap: usize,
    tick: u64,
    /// start -> (len, last use, value)
    entries: BTreeMap<u64, (usize, u64, V)>,
    stats: RegCacheStats,
}

/// How many entries starting below an address a lookup examines (entries may overlap; missing
/// a covering entry only costs a registration).
const LOOKBACK: usize = 8;

impl<V: Clone> RangeCache<V> {
    /// An empty cache holding at most `cap` bytes of ranges.
    pub fn new(cap: usize) -> Self {
        RangeCache {
            cap,
            tick: 0,
            entries: BTreeMap::new(),
            stats: RegCacheStats::default(),
        }
    }

    /// The byte cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A cached value whose range covers `addr..addr+len` (and marks it used), counting a hit;
    /// `None` counts nothing (see [`RangeCache::insert`]).
    pub fn lookup(&mut self, addr: u64, len: usize) -> Option<V> {
        let end = addr.checked_add(len as u64)?;
        self.tick += 1;
        let tick = self.tick;
        let (_, (_, used, v)) = self
            .entries
            .range_mut(..=addr)
            .rev()
            .take(LOOKBACK)
            .find(|(start, (l, _, _))| **start + *l as u64 >= end)?;
        *used = tick;
        self.stats.hits += 1;
        Some(v.clone())
    }

    /// Records a miss that registered `len` bytes at `addr` as `v`, caching it unless it is
    /// larger than the cap; evicts least recently used entries to stay under the cap. Returns the
    /// evicted values (the caller drops them: deregistration).
    pub fn insert(&mut self, addr: u64, len: usize, v: V) -> Vec<V> {
        self.stats.misses += 1;
        self.stats.bytes_registered_total += len as u64;
        let mut out = Vec::new();
        if len > self.cap {
            return out;
        }
        // An entry at the same start is replaced (it did not cover this range).
        if let Some((l, _, old)) = self.entries.remove(&addr) {
            self.stats.bytes_registered -= l as u64;
            self.stats.evictions += 1;
            out.push(old);
        }
        while self.stats.bytes_registered as usize + len > self.cap {
            let Some((&victim, _)) = self.entries.iter().min_by_key(|(_, (_, used, _))| *used)
            else {
                break;
            };
            if let Some((l, _, old)) = self.entries.remove(&victim) {
                self.stats.bytes_registered -= l as u64;
                self.stats.evictions += 1;
                out.push(old);
            }
        }
        self.tick += 1;
        self.entries.insert(addr, (len, self.tick, v));
        self.stats.bytes_registered += len as u64;
        self.stats.entries = self.entries.len() as u64;
        out
    }

    /// Records a registration made outside the cache (a miss that is not kept).
    pub fn count_uncached(&mut self, len: usize) {
        self.stats.misses += 1;
        self.stats.bytes_registered_total += len as u64;
    }

    /// Drops every entry overlapping `addr..addr+len`; returns the dropped values.
    pub fn invalidate(&mut self, addr: u64, len: usize) -> Vec<V> {
        let end = addr.saturating_add(len as u64);
        let hit: Vec<u64> = self
            .entries
            .range(..end)
            .filter(|(start, (l, _, _))| **start + *l as u64 > addr)
            .map(|(s, _)| *s)
            .collect();
        let mut out = Vec::with_capacity(hit.len());
        for s in hit {
            if let Some((l, _, v)) = self.entries.remove(&s) {
                self.stats.bytes_registered -= l as u64;
                self.stats.invalidations += 1;
                out.push(v);
            }
        }
        self.stats.entries = self.entries.len() as u64;
        out
    }

    /// The counters.
    pub fn stats(&self) -> RegCacheStats {
        RegCacheStats {
            entries: self.entries.len() as u64,
            ..self.stats
        }
    }
}

/// A registration cache for rendezvous receive destinations (`LOCAL_WRITE` registrations, no
/// remote access) or send buffers (`MW_BIND` registrations, no remote access), keyed by address
/// range, capped in bytes, LRU. See the module docs for the invalidation contract.
pub struct RegCache {
    pd: ProtectionDomain,
    inner: RangeCache<MemoryRegion>,
    access: AccessFlags,
}

impl std::fmt::Debug for RegCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegCache")
            .field("cap", &self.inner.cap())
            .field("access", &self.access)
            .field("stats", &self.inner.stats())
            .finish()
    }
}

impl RegCache {
    /// A cache of registrations in `pd`, holding at most `cap` bytes (0: nothing is kept; every
    /// lookup registers a region that lives as long as the caller's handle).
    pub fn new(pd: &ProtectionDomain, cap: usize) -> Self {
        RegCache {
            pd: pd.clone(),
            inner: RangeCache::new(cap),
            access: AccessFlags::LOCAL_WRITE,
        }
    }

    /// A cache of send-buffer registrations in `pd` (access [`AccessFlags::MW_BIND`] only: the
    /// device reads the buffer only through a memory window bound per transfer), holding at most
    /// `cap` bytes.
    pub fn for_send(pd: &ProtectionDomain, cap: usize) -> Self {
        RegCache {
            pd: pd.clone(),
            inner: RangeCache::new(cap),
            access: AccessFlags::MW_BIND,
        }
    }

    /// An `MW_BIND` registration covering the send buffer `buf`: cached, or registered now (and
    /// cached if it fits the cap). Only for a cache made by [`RegCache::for_send`].
    ///
    /// The handle may outlive `buf`; a window bound through it after `buf` is gone reads the pages
    /// it pinned, not whatever memory later sits at that address (no memory of the process is
    /// exposed beyond those pages, but the peer receives stale bytes): the invalidation contract.
    ///
    /// # Errors
    /// [`super::VerbsError::InvalidWorkRequest`] for a receive cache;
    /// [`super::VerbsError::RegMr`].
    pub fn get_send(&mut self, buf: &[u8]) -> Result<MemoryRegion> {
        if self.access != AccessFlags::MW_BIND {
            return Err(super::VerbsError::InvalidWorkRequest(
                "send buffer looked up in a receive registration cache",
            ));
        }
        let addr = buf.as_ptr() as u64;
        if let Some(mr) = self.inner.lookup(addr, buf.len()) {
            return Ok(mr);
        }
        // SAFETY: `buf` is live now. The access is MW_BIND only: the device never writes the
        // region (windows bound over it grant remote read only), so the shared borrow is
        // respected. The region may outlive `buf`: the kernel keeps the pinned pages until
        // deregistration, so a late read only reaches those pages (stale data, as the module
        // docs say), never memory the process uses otherwise.
        let mr = unsafe {
            MemoryRegion::register(
                &self.pd,
                buf.as_ptr().cast_mut(),
                buf.len(),
                AccessFlags::MW_BIND,
            )
        }?;
        drop(self.inner.insert(addr, buf.len(), mr.clone()));
        Ok(mr)
    }

    /// A local-write registration covering `dst`: cached, or registered now (and cached if it
    /// fits the cap).
    ///
    /// The handle may outlive `dst`; using it for a transfer after `dst` is gone writes into the
    /// pages it pinned, not into whatever memory later sits at that address (no memory of the
    /// process is touched, but the data is lost): that is the invalidation contract of the
    /// module docs.
    ///
    /// # Errors
    /// [`super::VerbsError::RegMr`] (e.g. the locked-memory limit).
    pub fn get(&mut self, dst: &mut [u8]) -> Result<MemoryRegion> {
        if self.access != AccessFlags::LOCAL_WRITE {
            return Err(super::VerbsError::InvalidWorkRequest(
                "receive destination looked up in a send registration cache",
            ));
        }
        let addr = dst.as_ptr() as u64;
        if let Some(mr) = self.inner.lookup(addr, dst.len()) {
            return Ok(mr);
        }
        // SAFETY: `dst` is live now. The region may outlive it; the kernel keeps the pinned
        // pages until deregistration, so a late transfer writes pages no longer mapped at that
        // address (data lost, as the module docs say), never memory the process uses otherwise.
        // No Rust reference to the region's memory is created from the handle.
        let mr = unsafe {
            MemoryRegion::register(
                &self.pd,
                dst.as_mut_ptr(),
                dst.len(),
                AccessFlags::LOCAL_WRITE,
            )
        }?;
        drop(self.inner.insert(addr, dst.len(), mr.clone()));
        Ok(mr)
    }

    /// A local-write registration of `dst` that is not cached (for a buffer about to be freed
    /// by its owner, e.g. one a received message owns); it is deregistered when the handle drops.
    /// Counted as a miss.
    ///
    /// # Errors
    /// As [`RegCache::get`].
    pub fn get_uncached(&mut self, dst: &mut [u8]) -> Result<MemoryRegion> {
        // SAFETY: as in `get`; the caller drops the handle before freeing `dst` (and a late
        // transfer would only reach the pinned pages).
        let mr = unsafe {
            MemoryRegion::register(
                &self.pd,
                dst.as_mut_ptr(),
                dst.len(),
                AccessFlags::LOCAL_WRITE,
            )
        }?;
        self.inner.count_uncached(dst.len());
        Ok(mr)
    }

    /// Drops (and deregisters, once no transfer holds them) every cached registration overlapping
    /// `addr..addr+len`. Returns how many were dropped.
    pub fn invalidate(&mut self, addr: u64, len: usize) -> usize {
        self.inner.invalidate(addr, len).len()
    }

    /// Drops every cached registration overlapping `buf`.
    pub fn invalidate_slice(&mut self, buf: &[u8]) -> usize {
        self.invalidate(buf.as_ptr() as u64, buf.len())
    }

    /// The counters.
    pub fn stats(&self) -> RegCacheStats {
        self.inner.stats()
    }

    /// The byte cap.
    pub fn cap(&self) -> usize {
        self.inner.cap()
    }
}

/// A memory window bound with remote read over one send buffer, for one rendezvous transfer,
/// over a cached `MW_BIND` registration. The link that bound it invalidates it when the
/// transfer ends ([`BoundWindow::into_parts`], then `IBV_WR_LOCAL_INV`) and reuses the window;
/// dropped any other way, the window is deallocated, which also revokes it.
pub struct BoundWindow {
    mw: MemoryWindow,
    mr: MemoryRegion,
}

impl std::fmt::Debug for BoundWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundWindow")
            .field("rkey", &self.mw.rkey())
            .finish()
    }
}

impl BoundWindow {
    /// A window whose bind over (part of) `mr` was posted; `mw` carries the bind's key.
    pub fn new(mw: MemoryWindow, mr: MemoryRegion) -> Self {
        BoundWindow { mw, mr }
    }

    /// The key the peer reads with.
    pub fn rkey(&self) -> Rkey {
        self.mw.rkey()
    }

    /// The window and the registration it is bound over (to invalidate and reuse the window).
    pub fn into_parts(self) -> (MemoryWindow, MemoryRegion) {
        (self.mw, self.mr)
    }
}

/// A send buffer registered with remote-read access for one rendezvous transfer; the
/// registration (and with it the rkey) is revoked when the grant is dropped.
///
/// The grant borrows the buffer, so the buffer outlives every remote read the grant allows.
/// Leaking the grant (`mem::forget`) leaks the registration: the pages stay pinned and readable
/// by the peer holding the rkey, until the protection domain goes away.
pub struct RemoteReadGrant<'a> {
    mr: MemoryRegion,
    _buf: PhantomData<&'a [u8]>,
}

impl std::fmt::Debug for RemoteReadGrant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReadGrant")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.mr.len())
            .finish()
    }
}

impl<'a> RemoteReadGrant<'a> {
    /// Registers `buf` with `REMOTE_READ` only (`ibv_reg_mr(3)`).
    ///
    /// # Errors
    /// [`super::VerbsError::AllocBuffer`] for an empty buffer; [`super::VerbsError::RegMr`].
    pub fn new(pd: &ProtectionDomain, buf: &'a [u8]) -> Result<Self> {
        // SAFETY: `buf` is borrowed for `'a`, which the grant carries, so the memory stays
        // valid while the registration exists (it is deregistered on drop; a leaked grant keeps
        // the pages pinned, which is memory-safe). The access is remote read only: the device
        // never writes the buffer, so the shared borrow is respected. No reference to the
        // region's memory is created from the handle, which never leaves the grant.
        let mr = unsafe {
            MemoryRegion::register(
                pd,
                buf.as_ptr().cast_mut(),
                buf.len(),
                AccessFlags::REMOTE_READ,
            )
        }?;
        Ok(RemoteReadGrant {
            mr,
            _buf: PhantomData,
        })
    }

    /// The address the peer reads from.
    pub fn addr(&self) -> u64 {
        self.mr.addr()
    }

    /// The key the peer reads with.
    pub fn rkey(&self) -> Rkey {
        self.mr.rkey()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mr.len()
    }

    /// Never true: empty buffers are refused.
    pub fn is_empty(&self) -> bool {
        self.mr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_when_a_cached_range_covers_the_lookup() {
        let mut c = RangeCache::new(1 << 20);
        assert!(c.lookup(4096, 100).is_none());
        assert!(c.insert(4096, 8192, 1).is_empty());
        assert_eq!(c.lookup(4096, 8192), Some(1));
        assert_eq!(c.lookup(4096 + 100, 100), Some(1), "inside");
        assert_eq!(c.lookup(4096 + 8191, 1), Some(1), "last byte");
        assert_eq!(c.lookup(4096 + 8191, 2), None, "runs past the end");
        assert_eq!(c.lookup(4095, 2), None, "starts before");
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (3, 1));
        assert_eq!(s.bytes_registered, 8192);
        assert_eq!(s.entries, 1);
    }

    #[test]
    fn lru_eviction_under_the_cap() {
        let mut c = RangeCache::new(3000);
        assert!(c.insert(0, 1000, 'a').is_empty());
        assert!(c.insert(10_000, 1000, 'b').is_empty());
        assert!(c.insert(20_000, 1000, 'c').is_empty());
        // Touch a: b is now the least recently used.
        assert_eq!(c.lookup(0, 10), Some('a'));
        assert_eq!(c.insert(30_000, 1000, 'd'), vec!['b']);
        assert_eq!(c.lookup(10_000, 10), None);
        assert_eq!(c.lookup(20_000, 10), Some('c'));
        // A range needing two slots evicts the two oldest (a, then d).
        assert_eq!(c.insert(40_000, 2000, 'e'), vec!['a', 'd']);
        let s = c.stats();
        assert_eq!(s.evictions, 3);
        assert_eq!(s.bytes_registered, 3000);
        assert!(s.bytes_registered <= 3000);
    }

    #[test]
    fn larger_than_the_cap_is_not_kept() {
        let mut c = RangeCache::new(100);
        assert!(c.insert(0, 101, 1).is_empty());
        assert_eq!(c.lookup(0, 1), None);
        let s = c.stats();
        assert_eq!((s.misses, s.entries, s.bytes_registered), (1, 0, 0));
        assert_eq!(s.bytes_registered_total, 101);
        let mut off = RangeCache::new(0);
        assert!(off.insert(0, 1, 1).is_empty());
        assert_eq!(off.lookup(0, 1), None);
    }

    #[test]
    fn invalidate_drops_every_overlap_only() {
        let mut c = RangeCache::new(1 << 20);
        c.insert(0, 100, 'a');
        c.insert(100, 100, 'b');
        c.insert(300, 100, 'c');
        assert_eq!(c.invalidate(150, 200), vec!['b', 'c']);
        assert_eq!(c.lookup(0, 100), Some('a'));
        assert_eq!(c.invalidate(100, 0), Vec::<char>::new(), "empty range");
        assert_eq!(c.invalidate(99, 1), vec!['a']);
        let s = c.stats();
        assert_eq!((s.invalidations, s.entries, s.bytes_registered), (3, 0, 0));
    }

    #[test]
    fn same_start_is_replaced() {
        let mut c = RangeCache::new(1 << 20);
        c.insert(0, 100, 'a');
        assert_eq!(c.lookup(0, 200), None);
        assert_eq!(c.insert(0, 200, 'b'), vec!['a']);
        assert_eq!(c.lookup(0, 200), Some('b'));
        assert_eq!(c.stats().bytes_registered, 200);
    }
}
