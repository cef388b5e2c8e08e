//! Completion queues, completion channels and work completions.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdma_sys::{ibv_comp_channel, ibv_cq, ibv_wc, ibv_wc_opcode, ibv_wc_status};

use super::device::{Context, ContextInner};
use super::error::{Result, VerbsError};
use super::types::{QpNum, WrId};

pub(crate) struct ChannelInner {
    ch: NonNull<ibv_comp_channel>,
    _ctx: Arc<ContextInner>,
}

// SAFETY: a completion channel is an fd plus a context pointer; `ibv_get_cq_event` is a read(2)
// on that fd and may be called from any thread; destruction happens once, in `Drop`.
unsafe impl Send for ChannelInner {}
// SAFETY: concurrent `ibv_get_cq_event` calls are reads of one fd, which the kernel serialises.
unsafe impl Sync for ChannelInner {}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: every CQ using this channel holds an `Arc<ChannelInner>`, so none remains
        // (otherwise the verb fails with EBUSY); destroyed once.
        let rc = unsafe { rdma_sys::ibv_destroy_comp_channel(self.ch.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_comp_channel failed");
        }
    }
}

/// A completion channel (`ibv_create_comp_channel(3)`): an fd that becomes readable when an
/// armed CQ gets a completion. Usable with poll/epoll/tokio `AsyncFd`.
#[derive(Clone)]
pub struct CompletionChannel {
    inner: Arc<ChannelInner>,
}

impl std::fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionChannel")
            .field("fd", &self.as_raw_fd())
            .finish()
    }
}

/// An identifier of a CQ, to match a [`CqEvent`] with its [`CompletionQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CqId(usize);

/// A completion event read from a channel. Acknowledged (`ibv_ack_cq_events(3)`) on drop.
///
/// A CQ cannot be destroyed while an event of it is unacknowledged (`ibv_destroy_cq` blocks),
/// so drop the event before the last handle of its CQ.
#[derive(Debug)]
pub struct CqEvent {
    cq: NonNull<ibv_cq>,
}

// SAFETY: the event only holds the CQ pointer for `ibv_ack_cq_events`, which locks the CQ's
// mutex inside libibverbs and may run on any thread.
unsafe impl Send for CqEvent {}

impl CqEvent {
    /// The CQ that has a completion.
    pub fn cq_id(&self) -> CqId {
        CqId(self.cq.as_ptr() as usize)
    }
    /// Whether the event belongs to `cq`.
    pub fn is_for(&self, cq: &CompletionQueue) -> bool {
        self.cq_id() == cq.id()
    }
}

impl Drop for CqEvent {
    fn drop(&mut self) {
        // SAFETY: the CQ cannot have been destroyed: `ibv_destroy_cq` waits until every event
        // it reported is acknowledged, and this is that acknowledgement (exactly once).
        unsafe { rdma_sys::ibv_ack_cq_events(self.cq.as_ptr(), 1) };
    }
}

impl CompletionChannel {
    /// Create a completion channel (`ibv_create_comp_channel(3)`).
    ///
    /// # Errors
    /// [`VerbsError::CreateCompChannel`].
    pub fn new(ctx: &Context) -> Result<CompletionChannel> {
        // SAFETY: valid open context, kept alive by the `Arc` stored below.
        let ch = unsafe { rdma_sys::ibv_create_comp_channel(ctx.raw()) };
        let ch = NonNull::new(ch)
            .ok_or_else(|| VerbsError::CreateCompChannel(io::Error::last_os_error()))?;
        Ok(CompletionChannel {
            inner: Arc::new(ChannelInner {
                ch,
                _ctx: ctx.inner.clone(),
            }),
        })
    }

    /// Make [`CompletionChannel::get_event`] non-blocking (`O_NONBLOCK` on the fd, `fcntl(2)`),
    /// as needed with epoll or an async reactor.
    ///
    /// # Errors
    /// [`VerbsError::ChannelFcntl`].
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        let fd = self.as_raw_fd();
        // SAFETY: `fd` is the channel's open descriptor, alive while `self` is.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(VerbsError::ChannelFcntl(io::Error::last_os_error()));
        }
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above; only the status flags change.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(VerbsError::ChannelFcntl(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Wait until the channel fd is readable (an event is pending) or `timeout` passes
    /// (`poll(2)`; `None` waits without limit). Returns whether it is readable. An interrupted
    /// wait (`EINTR`) returns `Ok(false)` early; callers loop on their own deadline.
    ///
    /// # Errors
    /// [`VerbsError::ChannelPoll`].
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool> {
        let ms: libc::c_int = match timeout {
            None => -1,
            // Round up so that a short non-zero wait does not become a busy poll.
            Some(t) => t
                .as_micros()
                .div_ceil(1000)
                .try_into()
                .unwrap_or(libc::c_int::MAX),
        };
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid, initialised `pollfd` on the stack for the whole call and the
        // count is 1; the fd is the channel's, open while `self` lives.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(VerbsError::ChannelPoll(e));
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// Read the next completion event (`ibv_get_cq_event(3)`). Blocks unless the channel is
    /// non-blocking, in which case `Ok(None)` means no event is pending. The CQ must be re-armed
    /// with [`CompletionQueue::req_notify`] to get the next event.
    ///
    /// # Errors
    /// [`VerbsError::GetCqEvent`].
    pub fn get_event(&self) -> Result<Option<CqEvent>> {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut cq_ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: valid channel; both out-pointers are valid for writes.
        let rc =
            unsafe { rdma_sys::ibv_get_cq_event(self.inner.ch.as_ptr(), &mut cq, &mut cq_ctx) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(VerbsError::GetCqEvent(e));
        }
        let cq = NonNull::new(cq)
            .ok_or_else(|| VerbsError::GetCqEvent(io::Error::from_raw_os_error(libc::EIO)))?;
        Ok(Some(CqEvent { cq }))
    }
}

impl AsRawFd for CompletionChannel {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: the channel struct is valid while `inner` lives; `fd` is set at creation.
        unsafe { self.inner.ch.as_ref().fd }
    }
}

impl AsFd for CompletionChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd stays open until the channel is destroyed, which cannot happen while
        // `self` (and so the returned borrow) lives.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

pub(crate) struct CqInner {
    pub(crate) cq: NonNull<ibv_cq>,
    capacity: u32,
    _channel: Option<Arc<ChannelInner>>,
    _ctx: Arc<ContextInner>,
}

// SAFETY: libibverbs providers lock the CQ internally in poll_cq / req_notify_cq, so the handle
// may move between threads; destruction happens once, in `Drop`.
unsafe impl Send for CqInner {}
// SAFETY: concurrent `ibv_poll_cq` / `ibv_req_notify_cq` on one CQ are serialised by the
// provider's CQ lock (rdma-core providers are built thread-safe unless a single-threaded parent
// domain is requested, which this library never does).
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an `Arc<CqInner>`, so none remains; every
        // `CqEvent` acknowledges itself on drop. Destroyed once.
        let rc = unsafe { rdma_sys::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_cq failed");
        }
    }
}

/// A completion queue (`ibv_create_cq(3)`). Cheap to clone.
#[derive(Clone)]
pub struct CompletionQueue {
    pub(crate) inner: Arc<CqInner>,
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl CompletionQueue {
    /// Create a CQ with room for at least `cqe` completions (`ibv_create_cq(3)`), optionally
    /// attached to a completion channel for event mode.
    ///
    /// # Errors
    /// [`VerbsError::CreateCq`] (e.g. `EINVAL` when `cqe` exceeds the device's `max_cqe`).
    pub fn new(
        ctx: &Context,
        cqe: u32,
        channel: Option<&CompletionChannel>,
    ) -> Result<CompletionQueue> {
        let n = libc::c_int::try_from(cqe).map_err(|_| VerbsError::CreateCq {
            cqe,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.inner.ch.as_ptr());
        // SAFETY: valid context; `ch` is null or a live channel of the same context, kept alive
        // by the `Arc` stored below.
        let cq = unsafe { rdma_sys::ibv_create_cq(ctx.raw(), n, std::ptr::null_mut(), ch, 0) };
        let cq = NonNull::new(cq).ok_or_else(|| VerbsError::CreateCq {
            cqe,
            source: io::Error::last_os_error(),
        })?;
        // SAFETY: the CQ struct was just returned by libibverbs and is valid.
        let capacity = u32::try_from(unsafe { cq.as_ref().cqe }).unwrap_or(cqe);
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                capacity,
                _channel: channel.map(|c| c.inner.clone()),
                _ctx: ctx.inner.clone(),
            }),
        })
    }

    /// The number of entries the provider actually allocated (at least the requested count).
    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    /// This CQ's identifier, as in [`CqEvent::cq_id`].
    pub fn id(&self) -> CqId {
        CqId(self.inner.cq.as_ptr() as usize)
    }

    /// Poll up to `out.len()` completions into `out` (`ibv_poll_cq(3)`); returns how many were
    /// written. Does not allocate.
    ///
    /// # Errors
    /// [`VerbsError::PollCq`] when the provider reports a failure (not for failed completions,
    /// which come back with a non-success [`WorkCompletion::status`]).
    #[inline]
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        let n = i32::try_from(out.len()).unwrap_or(i32::MAX);
        // SAFETY: valid CQ; `WorkCompletion` is `repr(transparent)` over `ibv_wc`, so `out` is
        // `n` writable `ibv_wc` slots; the provider writes at most `n`.
        let rc =
            unsafe { rdma_sys::ibv_poll_cq(self.inner.cq.as_ptr(), n, out.as_mut_ptr().cast()) };
        if rc < 0 {
            return Err(VerbsError::PollCq(VerbsError::rc(rc)));
        }
        Ok(rc as usize)
    }

    /// Arm the CQ so that the next completion (or next solicited one) raises an event on its
    /// channel (`ibv_req_notify_cq(3)`). Poll once after arming to close the race with a
    /// completion that arrived before.
    ///
    /// # Errors
    /// [`VerbsError::ReqNotifyCq`].
    pub fn req_notify(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: valid CQ; the provider serialises with concurrent polls.
        let rc = unsafe {
            rdma_sys::ibv_req_notify_cq(self.inner.cq.as_ptr(), i32::from(solicited_only))
        };
        if rc != 0 {
            return Err(VerbsError::ReqNotifyCq(VerbsError::rc(rc)));
        }
        Ok(())
    }
}

/// Status of a work completion (`enum ibv_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WcStatus(pub u32);

impl WcStatus {
    /// Success.
    pub const SUCCESS: WcStatus = WcStatus(ibv_wc_status::IBV_WC_SUCCESS);
    /// The QP was flushed (it went to the error state).
    pub const WR_FLUSH_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_WR_FLUSH_ERR);
    /// The peer had no receive WQE after the RNR retries.
    pub const RNR_RETRY_EXC_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR);
    /// Transport retries exceeded (peer unreachable or dead).
    pub const RETRY_EXC_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_RETRY_EXC_ERR);
    /// The peer refused the access (bad rkey, range or rights).
    pub const REM_ACCESS_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_REM_ACCESS_ERR);
    /// A local SGE did not match its MR (bad lkey, range or rights).
    pub const LOC_PROT_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_LOC_PROT_ERR);

    /// Whether this is success.
    pub fn is_success(self) -> bool {
        self == Self::SUCCESS
    }
    /// The text of `ibv_wc_status_str(3)`.
    pub fn as_str(self) -> &'static str {
        // SAFETY: `ibv_wc_status_str` accepts any value and returns a pointer to a static,
        // NUL-terminated string (or "unknown").
        let p = unsafe { rdma_sys::ibv_wc_status_str(self.0) };
        if p.is_null() {
            return "unknown";
        }
        // SAFETY: non-null static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("unknown")
    }
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.0)
    }
}

/// What a work completion completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WcOpcode {
    /// A SEND (or SEND_WITH_IMM) finished.
    Send,
    /// An RDMA WRITE (or WRITE_WITH_IMM) finished.
    RdmaWrite,
    /// An RDMA READ finished: the data is in the local buffer.
    RdmaRead,
    /// A SEND arrived into a receive WQE.
    Recv,
    /// An RDMA WRITE_WITH_IMM arrived: it consumed a receive WQE and carries an immediate.
    RecvRdmaWithImm,
    /// Another opcode (raw value).
    Other(u32),
}

/// A work completion (`struct ibv_wc`, see `ibv_poll_cq(3)`).
#[repr(transparent)]
pub struct WorkCompletion(ibv_wc);

impl Default for WorkCompletion {
    fn default() -> Self {
        // SAFETY: `ibv_wc` is plain-old-data (integers and a union of integers); all-zero is a
        // valid value.
        WorkCompletion(unsafe { std::mem::zeroed() })
    }
}

impl WorkCompletion {
    /// The work request id given when posting.
    pub fn wr_id(&self) -> WrId {
        WrId(self.0.wr_id)
    }
    /// The status; only `wr_id`, `status`, `qp_num` and `vendor_err` are valid when it is not success.
    pub fn status(&self) -> WcStatus {
        WcStatus(self.0.status)
    }
    /// Whether the work request succeeded.
    pub fn is_success(&self) -> bool {
        self.status().is_success()
    }
    /// The operation.
    pub fn opcode(&self) -> WcOpcode {
        match self.0.opcode {
            ibv_wc_opcode::IBV_WC_SEND => WcOpcode::Send,
            ibv_wc_opcode::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            ibv_wc_opcode::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            ibv_wc_opcode::IBV_WC_RECV => WcOpcode::Recv,
            ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            o => WcOpcode::Other(o),
        }
    }
    /// Bytes transferred (for receives: bytes written by the peer).
    pub fn byte_len(&self) -> u32 {
        self.0.byte_len
    }
    /// The immediate data in host order, if the completion carries one (`IBV_WC_WITH_IMM`).
    pub fn imm(&self) -> Option<u32> {
        if self.0.wc_flags & rdma_sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
            // SAFETY: with IBV_WC_WITH_IMM set, the union holds `imm_data` (network order);
            // both members are u32 so any bits are valid.
            Some(u32::from_be(unsafe {
                self.0.imm_data_invalidated_rkey_union.imm_data
            }))
        } else {
            None
        }
    }
    /// The local QP the completion belongs to.
    pub fn qp_num(&self) -> QpNum {
        QpNum(self.0.qp_num)
    }
    /// The vendor error syndrome (diagnostics for failed completions).
    pub fn vendor_err(&self) -> u32 {
        self.0.vendor_err
    }
}

impl std::fmt::Debug for WorkCompletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkCompletion")
            .field("wr_id", &self.wr_id())
            .field("status", &self.status())
            .field("opcode", &self.opcode())
            .field("byte_len", &self.byte_len())
            .field("imm", &self.imm())
            .field("qp_num", &self.qp_num())
            .finish()
    }
}
