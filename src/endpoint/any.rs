//! One connection type over every transport.

use std::time::Duration;

use crate::core::{CreditUpdate, SegmentId};
use crate::transport::shm::{ShmLink, ShmTarget};
use crate::transport::verbs::{VerbsLink, VerbsTarget};
use crate::transport::{Connection, Link, PollMode, TargetMemory, TransportError};

/// The transport a connection runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// Shared memory (both processes on one host).
    Shm,
    /// RDMA verbs (RC queue pair).
    Verbs,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Shm => "shm",
            Transport::Verbs => "verbs",
        })
    }
}

/// The link of a connection on any transport.
#[derive(Debug)]
#[non_exhaustive]
// One per connection, so the size does not matter; boxing the larger variant would add a
// pointer chase to every send and receive.
#[allow(clippy::large_enum_variant)]
pub enum AnyLink {
    /// Shared memory.
    Shm(ShmLink),
    /// RDMA verbs.
    Verbs(VerbsLink),
}

/// The target memory of a connection on any transport.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyTarget {
    /// Shared memory.
    Shm(ShmTarget),
    /// RDMA verbs.
    Verbs(VerbsTarget),
}

impl AnyLink {
    /// The transport of this link.
    pub fn transport(&self) -> Transport {
        match self {
            AnyLink::Shm(_) => Transport::Shm,
            AnyLink::Verbs(_) => Transport::Verbs,
        }
    }
}

impl From<ShmLink> for AnyLink {
    fn from(l: ShmLink) -> Self {
        AnyLink::Shm(l)
    }
}

impl From<VerbsLink> for AnyLink {
    fn from(l: VerbsLink) -> Self {
        AnyLink::Verbs(l)
    }
}

impl From<ShmTarget> for AnyTarget {
    fn from(t: ShmTarget) -> Self {
        AnyTarget::Shm(t)
    }
}

impl From<VerbsTarget> for AnyTarget {
    fn from(t: VerbsTarget) -> Self {
        AnyTarget::Verbs(t)
    }
}

macro_rules! each_link {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            AnyLink::Shm($l) => $e,
            AnyLink::Verbs($l) => $e,
        }
    };
}

impl Link for AnyLink {
    #[inline]
    fn write(
        &mut self,
        segment: SegmentId,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransportError> {
        each_link!(self, l => l.write(segment, offset, bytes))
    }
    #[inline]
    fn fill(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransportError> {
        each_link!(self, l => l.fill(segment, offset, len))
    }
    #[inline]
    fn post(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> Result<(), TransportError> {
        each_link!(self, l => l.post(segment, offset, len, imm))
    }
    #[inline]
    fn next_immediate(
        &mut self,
        mode: PollMode,
        timeout: Option<Duration>,
    ) -> Result<Option<u32>, TransportError> {
        each_link!(self, l => l.next_immediate(mode, timeout))
    }
    #[inline]
    fn header_with_immediate(&self) -> Option<[u8; crate::core::wire::HEADER_LEN]> {
        each_link!(self, l => l.header_with_immediate())
    }
    #[inline]
    fn inline_headers(&self) -> bool {
        each_link!(self, l => l.inline_headers())
    }
    #[inline]
    fn publish_credit(&mut self, credit: CreditUpdate) -> Result<(), TransportError> {
        each_link!(self, l => l.publish_credit(credit))
    }
    #[inline]
    fn want_credit_notice(&mut self) {
        each_link!(self, l => l.want_credit_notice())
    }
    #[inline]
    fn credit(&self, segment: SegmentId) -> u64 {
        each_link!(self, l => l.credit(segment))
    }
    #[inline]
    fn check_peer(&self) -> Result<(), TransportError> {
        each_link!(self, l => l.check_peer())
    }
    #[inline]
    fn send_message(
        &mut self,
        res: &crate::core::Reservation,
        parts: &[&[u8]],
    ) -> Result<(), TransportError> {
        each_link!(self, l => l.send_message(res, parts))
    }
    fn event_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        each_link!(self, l => l.event_fd())
    }
    fn arm(&mut self) -> Result<bool, TransportError> {
        each_link!(self, l => l.arm())
    }
    // Rendezvous (transport/rndv.rs): forwarded.
    fn rndv_expose<'b>(
        &mut self,
        buf: &'b [u8],
    ) -> Result<Option<crate::transport::Exposure<'b>>, TransportError> {
        each_link!(self, l => l.rndv_expose(buf))
    }
    fn rndv_read(
        &mut self,
        req: &crate::core::RndvRequest,
        dst: &mut [u8],
        cacheable: bool,
    ) -> Result<Result<(), u32>, TransportError> {
        each_link!(self, l => l.rndv_read(req, dst, cacheable))
    }
    fn rndv_set_cache_cap(&mut self, bytes: usize) {
        each_link!(self, l => l.rndv_set_cache_cap(bytes))
    }
    fn rndv_revoke(&mut self, exposure: crate::transport::Exposure<'_>) {
        each_link!(self, l => l.rndv_revoke(exposure))
    }
    fn rndv_read_many(
        &mut self,
        reqs: &[crate::core::RndvRequest],
        dsts: &mut [&mut [u8]],
    ) -> Option<Result<(), TransportError>> {
        each_link!(self, l => l.rndv_read_many(reqs, dsts))
    }
    fn rndv_can_stream(&self) -> bool {
        each_link!(self, l => l.rndv_can_stream())
    }
    fn rndv_set_send_cache_cap(&mut self, bytes: usize) {
        each_link!(self, l => l.rndv_set_send_cache_cap(bytes))
    }
    fn rndv_send_cache_stats(&self) -> Option<crate::verbs::RegCacheStats> {
        each_link!(self, l => l.rndv_send_cache_stats())
    }
    fn rndv_cache_stats(&self) -> Option<crate::verbs::RegCacheStats> {
        each_link!(self, l => l.rndv_cache_stats())
    }
    fn rndv_invalidate(&mut self, addr: u64, len: usize) -> usize {
        each_link!(self, l => l.rndv_invalidate(addr, len))
    }
}

impl TargetMemory for AnyTarget {
    #[inline]
    fn bytes(
        &self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&[u8], TransportError> {
        match self {
            AnyTarget::Shm(t) => t.bytes(segment, offset, len),
            AnyTarget::Verbs(t) => t.bytes(segment, offset, len),
        }
    }
}

/// A connection on whichever transport was chosen for the peer: shared memory or verbs, with
/// the same methods (see [`Connection`]).
pub type Conn = Connection<AnyLink, AnyTarget>;

/// A message received on a [`Conn`], read in place; its partitions return to the sender when it
/// is dropped.
pub type Msg<'a> = crate::transport::Message<'a, AnyLink, AnyTarget>;
