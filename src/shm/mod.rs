//! Shared-memory primitives for the intra-host transport.
//!
//! - [`ShmRegion`]: a memfd sealed against resizing, mapped `MAP_SHARED`; created by the
//!   receiver, opened (with size and seal checks) by the sender from a received fd.
//! - [`send_fds`] / [`recv_fds`]: passing those fds over a Unix-domain socket (`SCM_RIGHTS`).
//! - [`DoorbellProducer`] / [`DoorbellConsumer`]: a lock-free SPSC ring of 32-bit immediates in a
//!   region, polled busy, in event mode (futex) or adaptively.
//! - [`CreditMailbox`]: absolute `u64` credit counters in a region (`Release` / `Acquire`).
//! - [`socket_peer_status`], [`PidWatch`]: noticing a peer that died.
//!
//! All `unsafe` code of the shared-memory path lives in this module, behind these safe types.
//! The atomics come from a small `sync` shim, which switches to loom's under `--cfg loom` so that the ring
//! and the mailbox are model-checked as written (`src/shm/loom_models.rs`).
//!
//! # A peer is another process
//! Whatever lives in shared memory may be written by the peer at any time, correctly or not.
//! Positions are kept locally and never read back from shared memory, shared words are accessed
//! only through atomics, bulk bytes only through raw copies, and every value read is validated
//! before it steers anything; see [`ShmRegion`] and the doorbell module docs for the details.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use rsmsg::shm::{DoorbellConsumer, DoorbellProducer, RingLayout, ShmRegion, WaitMode};
//! # fn main() -> Result<(), rsmsg::shm::ShmError> {
//! let layout = RingLayout::new(1024)?;
//! let region = Arc::new(ShmRegion::create("rsmsg-doorbell", layout.bytes())?);
//! // ... send region.fd() to the peer with send_fds; the peer maps it with
//! // ShmRegion::from_fd(fd, layout.bytes()) and attaches a DoorbellProducer at offset 0.
//! let mut consumer = DoorbellConsumer::new(region, 0, layout)?;
//! let immediate = consumer.wait(WaitMode::Adaptive { spins: 1000 }, None)?;
//! # let _ = immediate; let _: Option<DoorbellProducer> = None; Ok(()) }
//! ```

mod doorbell;
mod error;
mod fdpass;
#[cfg(not(loom))]
mod fdwait;
mod inplace;
mod liveness;
#[cfg(all(test, loom))]
mod loom_models;
mod mailbox;
mod region;
pub(crate) mod sync;
mod vmread;
#[cfg(not(loom))]
mod wake;

#[cfg(not(loom))]
pub use doorbell::EventFd;
pub use doorbell::{
    DoorbellConsumer, DoorbellProducer, PushOutcome, RingLayout, SLEEP_ARMED, SLEEP_FUTEX,
    SLOT_EXTRA, WaitMode, heap_pair,
};
pub use error::ShmError;
pub use fdpass::{MAX_FDS, recv_fds, send_fds};
#[cfg(not(loom))]
pub use fdwait::wait_readable_any;
pub use liveness::{PeerStatus, PidWatch, socket_peer_pid, socket_peer_status};
pub use mailbox::CreditMailbox;
pub use region::{REQUIRED_SEALS, RegionView, ShmRegion};
pub use vmread::{
    PROBE_CONTENT, PROBE_LEN, may_read_peer, probe_addr, probe_peer, read_peer_memory,
};
#[cfg(not(loom))]
pub use wake::WakeSocket;
