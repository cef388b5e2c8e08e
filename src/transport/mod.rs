#![forbid(unsafe_code)]
//! Transport drivers: the sans-I/O [`core`](crate::core) joined to a way of moving bytes.
//!
//! A driver implements [`Link`] (how a reserved message reaches the peer's target segment, how
//! immediates arrive, how credits are published and read) and [`TargetMemory`] (where received
//! messages are read in place). [`Connection`] runs the protocol over any link: selection,
//! allocation, the header, validation of every immediate and header, zero-copy delivery and
//! credit return are written once, here and in the core.
//!
//! - [`shm`]: peers on one host; the source segment *is* the receiver's target segment mapped
//!   into the sender (claim 3), immediates go through a doorbell ring in shared memory.
//! - [`verbs`]: peers anywhere on an RDMA fabric (InfiniBand, RoCE, Soft-RoCE); one RDMA
//!   WRITE_WITH_IMM per message from a registered source image, credits by RDMA WRITE.

mod conn;
pub mod rndv;
#[cfg(not(loom))]
pub mod shm;
pub mod verbs;

pub use conn::{Connection, ConnectionStats, Counters, GroupCounters, Message, SendError};
pub use rndv::{Exposure, RndvStats, SendHandle};

use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::core::{CreditUpdate, ProtocolError, SegmentId};

/// How a receiver waits for messages (and a blocked sender for credits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PollMode {
    /// Spin on the completion source: lowest latency, one core per waiting thread.
    #[default]
    Busy,
    /// Sleep in the kernel until the peer signals (futex for shared memory, completion channel
    /// for verbs).
    Event,
    /// Spin `spins` times, then sleep as in [`PollMode::Event`].
    Adaptive {
        /// Polls before sleeping.
        spins: u32,
    },
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "busy" => Ok(PollMode::Busy),
            "event" => Ok(PollMode::Event),
            "adaptive" => Ok(PollMode::Adaptive { spins: 20_000 }),
            other => match other.strip_prefix("adaptive:") {
                Some(n) => n
                    .parse()
                    .map(|spins| PollMode::Adaptive { spins })
                    .map_err(|_| format!("bad spin count in poll mode {other:?}")),
                None => Err(format!(
                    "unknown poll mode {other:?} (busy, event, adaptive[:SPINS])"
                )),
            },
        }
    }
}

/// Errors of a transport connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer broke the protocol (bad immediate, header, credit or control message); the
    /// connection is closed.
    #[error("peer broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A shared-memory primitive failed.
    #[error("shared memory: {0}")]
    Shm(#[from] crate::shm::ShmError),
    /// A verb failed.
    #[error("verbs: {0}")]
    Verbs(#[from] crate::verbs::VerbsError),
    /// The bootstrap manager refused or could not be reached.
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] crate::bootstrap::BootstrapError),
    /// The connection setup failed.
    #[error("handshake with {peer}: {reason}")]
    Handshake {
        /// Who we were talking to.
        peer: String,
        /// What went wrong.
        reason: String,
    },
    /// An I/O step of the setup failed.
    #[error("{step}: {source}")]
    Io {
        /// The step.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection or its process died.
    #[error("peer closed the connection")]
    PeerClosed,
    /// The connection failed earlier and can no longer be used.
    #[error("connection failed earlier: {0}")]
    Failed(String),
    /// Nothing arrived before the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A message already received into memory of this side (an eager message) is longer than
    /// the buffer given to [`Connection::recv_into`]: nothing was copied, the message stays
    /// queued for the next receive, and the connection stays usable.
    #[error("message of {len} bytes does not fit a buffer of {cap} bytes; it stays queued")]
    BufferTooShort {
        /// The message length.
        len: usize,
        /// The buffer's length.
        cap: usize,
    },
    /// A rendezvous message was refused (by this side: over the receive limit, a destination
    /// too short, a sender buffer this side cannot read); the sender was told. The connection
    /// stays usable.
    #[error("refused a rendezvous message of {len} bytes: {}", crate::core::refuse_reason::describe(*.reason))]
    RendezvousRefused {
        /// The message length the sender announced.
        len: u64,
        /// A [`crate::core::refuse_reason`] code.
        reason: u32,
    },
    /// A rendezvous setting read from the environment when the connection was set up
    /// (`RSMSG_RNDV_*`) is malformed; no connection was made.
    #[error("configuration: {0}")]
    Config(#[from] crate::core::RndvConfigError),
}

/// How the generic [`Connection`] drives one transport.
///
/// Offsets are byte offsets inside a segment; the link maps (segment, offset) to its memory.
pub trait Link {
    /// Copies `bytes` into the source image of `segment` at `offset` (for shared memory, straight
    /// into the receiver's target segment).
    ///
    /// # Errors
    /// Out-of-range offsets or a failed link.
    fn write(
        &mut self,
        segment: SegmentId,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransportError>;

    /// Borrows `len` bytes of the source image of `segment` at `offset` for filling in place.
    ///
    /// # Errors
    /// Out-of-range offsets.
    fn fill(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransportError>;

    /// Transfers `len` bytes at `offset` of `segment` to the same place of the peer's target
    /// segment, and hands the peer `imm` once they are there (one WRITE_WITH_IMM; for shared
    /// memory the bytes are already there and only the doorbell rings). The link is sized so that
    /// this never meets a full queue while the core grants partitions.
    ///
    /// # Errors
    /// A failed link.
    fn post(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> Result<(), TransportError>;

    /// One whole message: copies the reservation's wire header (none for a bare message) then
    /// the concatenation of `parts` to its offset in the source image of its segment
    /// ([`wire_len`](crate::core::Reservation::wire_len) bytes in all) and posts them with its
    /// immediate. The default is [`Link::write`] per part then [`Link::post`]; a link overrides
    /// it to check the range once and touch its segment table once.
    ///
    /// # Errors
    /// As [`Link::write`] and [`Link::post`].
    #[inline]
    fn send_message(
        &mut self,
        res: &crate::core::Reservation,
        parts: &[&[u8]],
    ) -> Result<(), TransportError> {
        let header = res.wire_header();
        if !header.is_empty() {
            self.write(res.segment, res.offset, header)?;
        }
        let mut off = res.payload_offset();
        for p in parts {
            self.write(res.segment, off, p)?;
            off += p.len();
        }
        self.post(res.segment, res.offset, res.wire_len(), res.immediate.get())
    }

    /// The next immediate from the peer, waiting in `mode` for at most `timeout` (`Some(ZERO)`:
    /// do not wait). `Ok(None)` when nothing came.
    ///
    /// # Errors
    /// A failed link or a peer that went away.
    fn next_immediate(
        &mut self,
        mode: PollMode,
        timeout: Option<Duration>,
    ) -> Result<Option<u32>, TransportError>;

    /// The message header that came with the immediate `next_immediate` returned last, when
    /// the link carries one beside the immediate (shared memory: a copy in the doorbell slot,
    /// so the receiver need not pull the partition's first line from the sender's core).
    /// `None` (the default): read the header from the target segment. Either copy is
    /// validated the same way.
    #[inline]
    fn header_with_immediate(&self) -> Option<[u8; crate::core::wire::HEADER_LEN]> {
        None
    }

    /// Whether immediates come with their header ([`Link::header_with_immediate`]) and a poll
    /// with `Some(ZERO)` is one cheap look (shared memory: a load of the doorbell slot). A
    /// connection over such a link takes data messages on a direct path and spins on that
    /// poll in a busy receive before it hands over to the general wait. `false` (the default).
    #[inline]
    fn inline_headers(&self) -> bool {
        false
    }

    /// Publishes a credit into the peer's mailbox (and, if the peer sleeps for credits, a credit
    /// notice immediate).
    ///
    /// # Errors
    /// A failed link.
    fn publish_credit(&mut self, credit: CreditUpdate) -> Result<(), TransportError>;

    /// Announces that this side is about to wait for a credit: the peer pushes a credit notice
    /// immediate with its next credit. Must be ordered (a `SeqCst` fence) before the caller's
    /// next reading of the mailbox, so that either that reading sees the credit or the peer sees
    /// the announcement.
    fn want_credit_notice(&mut self);

    /// The current value of this side's mailbox slot for `segment` (credits for our sends).
    fn credit(&self, segment: SegmentId) -> u64;

    /// `Err(PeerClosed)` once the peer is known to be gone.
    ///
    /// # Errors
    /// [`TransportError::PeerClosed`].
    fn check_peer(&self) -> Result<(), TransportError>;

    /// A file descriptor that becomes readable when an immediate may have arrived, once
    /// [`Link::arm`] returned `false` (shared memory: this side's eventfd; verbs: the receive
    /// CQ's completion channel). `None` for a link that cannot be waited on this way.
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Prepares a wait on [`Link::event_fd`]: resets the fd, asks the peer (or the device) to
    /// signal it for the next immediate, and checks once more. `Ok(true)`: an immediate is
    /// already there (take it with `next_immediate`, do not wait); `Ok(false)`: the fd becomes
    /// readable when one arrives. A link without an event fd always returns `Ok(true)`.
    ///
    /// # Errors
    /// A failed link.
    fn arm(&mut self) -> Result<bool, TransportError> {
        Ok(true)
    }

    // --- Rendezvous (docs/rendezvous.md). The defaults: no rendezvous on this link. ---

    /// Exposes `buf` for the peer to read in one rendezvous transfer (verbs: a registration with
    /// remote-read access, revoked when the [`Exposure`] drops); `Ok(None)` when the link has
    /// no rendezvous.
    ///
    /// # Errors
    /// The registration failed (e.g. the locked-memory limit).
    fn rndv_expose<'b>(&mut self, buf: &'b [u8]) -> Result<Option<Exposure<'b>>, TransportError> {
        let _ = buf;
        Ok(None)
    }

    /// Reads the peer's exposed buffer `req` into `dst` (`dst.len() == req.len`), returning once
    /// the bytes are there. `cacheable`: `dst` is the application's buffer, whose registration may
    /// be kept in the cache (not a buffer the connection allocated and will free).
    /// `Ok(Err(reason))`: refuse the request with that [`crate::core::refuse_reason`] code, the
    /// connection stays usable.
    ///
    /// # Errors
    /// A failed link (a failed RDMA READ leaves the connection unusable).
    fn rndv_read(
        &mut self,
        req: &crate::core::RndvRequest,
        dst: &mut [u8],
        cacheable: bool,
    ) -> Result<Result<(), u32>, TransportError> {
        let _ = (req, dst, cacheable);
        Ok(Err(crate::core::refuse_reason::NO_ACCESS))
    }

    /// Reads several exposed buffers at once, `reqs[i]` into `dsts[i]` (each `dsts[i].len() ==
    /// reqs[i].len`), all in flight together, returning once every one is there (destinations
    /// are the application's: cacheable). `None`: this link reads one at a time (use
    /// [`Link::rndv_read`]).
    ///
    /// # Errors
    /// A failed link (a failed RDMA READ leaves the connection unusable).
    fn rndv_read_many(
        &mut self,
        reqs: &[crate::core::RndvRequest],
        dsts: &mut [&mut [u8]],
    ) -> Option<Result<(), TransportError>> {
        let _ = (reqs, dsts);
        None
    }

    /// Sets the cap of the receive-destination registration cache (bytes, 0: no cache).
    fn rndv_set_cache_cap(&mut self, bytes: usize) {
        let _ = bytes;
    }

    /// Ends an exposure once its transfer is answered (verbs with the send cache: invalidates
    /// the memory window before returning, then keeps it for the next transfer). The default
    /// drops it.
    fn rndv_revoke(&mut self, exposure: Exposure<'_>) {
        drop(exposure);
    }

    /// Whether a rendezvous message this link cannot read (`rndv_read` answered
    /// [`crate::core::refuse_reason::NO_ACCESS`]) may be asked for through the segments instead
    /// (the sender exposed it by address). The default: no.
    fn rndv_can_stream(&self) -> bool {
        false
    }

    /// Sets the cap of the send-buffer registration cache (bytes, 0: register per transfer).
    fn rndv_set_send_cache_cap(&mut self, bytes: usize) {
        let _ = bytes;
    }

    /// The send-buffer registration cache's counters, if the link has one.
    fn rndv_send_cache_stats(&self) -> Option<crate::verbs::RegCacheStats> {
        None
    }

    /// The registration cache's counters, if the link has one.
    fn rndv_cache_stats(&self) -> Option<crate::verbs::RegCacheStats> {
        None
    }

    /// Drops cached registrations overlapping `addr..addr+len`; returns how many.
    fn rndv_invalidate(&mut self, addr: u64, len: usize) -> usize {
        let _ = (addr, len);
        0
    }
}

/// The receiver's target segments, read in place.
pub trait TargetMemory {
    /// Borrows `len` bytes at `offset` of target segment `segment`.
    ///
    /// # Errors
    /// Out-of-range offsets.
    fn bytes(&self, segment: SegmentId, offset: usize, len: usize)
    -> Result<&[u8], TransportError>;
}
