//! Safe wrappers over libibverbs (through `rdma-sys`): the only module that calls verbs.
//!
//! Resources form `Arc` chains so that a child keeps its parents alive and everything is
//! destroyed in `Drop`, children first: [`MemoryRegion`] -> [`ProtectionDomain`] -> [`Context`];
//! [`QueuePair`] -> [`ProtectionDomain`] + [`CompletionQueue`]s; [`CompletionQueue`] ->
//! [`CompletionChannel`] -> [`Context`].
//!
//! ```no_run
//! use rsmsg::verbs::*;
//! # fn main() -> Result<(), VerbsError> {
//! let ctx = Context::open(None)?;                       // first device, or by name
//! let pd = ProtectionDomain::new(&ctx)?;
//! let cq = CompletionQueue::new(&ctx, 256, None)?;
//! let mut qp = QueuePair::new(&pd, &cq, &cq, &QpConfig::default())?;
//! let local = qp.local_endpoint(1, GidSelector::Auto, Psn::random())?;
//! # let remote = local;
//! // ... exchange `local.encode()` with the peer, decode its endpoint into `remote` ...
//! qp.connect(&local, &remote, &ConnectParams::default())?;
//! let target = MemoryRegion::alloc(&pd, 1 << 20, AccessFlags::remote_write())?;
//! let mut wr = SendWr::write_with_imm(WrId(1), &target, 0, 64, 0x1000, Rkey(7), 42)?;
//! qp.post_send(&mut wr)?;
//! let mut wcs: [WorkCompletion; 16] = Default::default();
//! let n = cq.poll(&mut wcs)?;
//! # let _ = n; Ok(()) }
//! ```
//!
//! # Thread safety
//! Contexts, PDs, MRs and CQs are `Send + Sync` (libibverbs serialises internally). Posting to a
//! [`QueuePair`] takes `&mut self`.
//!
//! # Memory of a region
//! The device (and peers, with remote access) write region memory asynchronously, so it is
//! copied in and out ([`MemoryRegion::write`], [`MemoryRegion::read`]) or viewed through
//! `unsafe` borrows whose caller guarantees no transfer targets the range meanwhile.

#![deny(missing_docs)]

mod cq;
mod device;
mod error;
mod image;
mod mr;
mod mw;
mod qp;
mod regcache;
mod stall;
mod test_support;
mod types;

pub use cq::{
    CompletionChannel, CompletionQueue, CqEvent, CqId, WcOpcode, WcStatus, WorkCompletion,
};
pub use device::{
    Context, Device, DeviceAttr, GidEntry, GidSelector, PortAttr, devices, find_device,
};
pub use error::{Result, VerbsError};
pub use image::{CreditWords, SourceImage, TargetImage};
pub use mr::{MemoryRegion, ProtectionDomain};
pub use mw::MemoryWindow;
pub use qp::{
    ConnectParams, MAX_SGE, QpCaps, QpConfig, QpEndpoint, QpState, QueuePair, ReadJob, ReadOptions,
    RecvWr, SendOp, SendWr,
};
pub use regcache::{BoundWindow, RangeCache, RegCache, RegCacheStats, RemoteReadGrant};
pub(crate) use stall::{Stall, retry_bound};
pub use test_support::{
    CountingAllocator, ENV_DEVICE, ENV_REQUIRE, count_allocations, test_context,
};
pub use types::{
    AccessFlags, Gid, GidIndex, GidType, LinkLayer, Lkey, Mtu, PortState, Psn, QpNum, Rkey, WrId,
};
