//! Errors of the verbs layer.

use std::io;

/// An error from the verbs layer. Each variant names the verb (or step) that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbsError {
    /// `ibv_get_device_list(3)` failed; `ENOSYS` means the kernel has no RDMA support.
    #[error("ibv_get_device_list failed (no RDMA support in this kernel?)")]
    GetDeviceList(#[source] io::Error),
    /// The device list is empty.
    #[error("no RDMA device found")]
    NoDevice,
    /// No device carries the requested name.
    #[error("RDMA device {name:?} not found (available: {available})")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// Comma-separated names of the devices present.
        available: String,
    },
    /// `ibv_open_device(3)` failed.
    #[error("ibv_open_device({device}) failed")]
    OpenDevice {
        /// Device name.
        device: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_device(3)` failed.
    #[error("ibv_query_device({device}) failed")]
    QueryDevice {
        /// Device name.
        device: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_port(3)` failed.
    #[error("ibv_query_port({device}, port {port}) failed")]
    QueryPort {
        /// Device name.
        device: String,
        /// Port number (1-based).
        port: u8,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_gid(3)` failed.
    #[error("ibv_query_gid({device}, port {port}, index {index}) failed")]
    QueryGid {
        /// Device name.
        device: String,
        /// Port number (1-based).
        port: u8,
        /// GID table index.
        index: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The port exists but its state is not `ACTIVE`.
    #[error("{device} port {port} is not active (state {state})")]
    PortNotActive {
        /// Device name.
        device: String,
        /// Port number (1-based).
        port: u8,
        /// The port state as reported.
        state: String,
    },
    /// No GID of the port is usable for a connection (or the configured index is empty).
    #[error("no usable GID on {device} port {port}: {reason}")]
    NoUsableGid {
        /// Device name.
        device: String,
        /// Port number (1-based).
        port: u8,
        /// Why none was chosen.
        reason: String,
    },
    /// `ibv_alloc_pd(3)` failed.
    #[error("ibv_alloc_pd failed")]
    AllocPd(#[source] io::Error),
    /// Allocating the memory behind a memory region failed or the length was invalid.
    #[error("allocating {len} bytes for a memory region failed")]
    AllocBuffer {
        /// Requested length.
        len: usize,
    },
    /// `ibv_reg_mr(3)` failed.
    #[error("ibv_reg_mr({len} bytes) failed")]
    RegMr {
        /// Length of the region.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_alloc_mw(3)` failed (`EOPNOTSUPP`: the device has no memory windows).
    #[error("ibv_alloc_mw failed")]
    AllocMw(#[source] io::Error),
    /// `ibv_create_comp_channel(3)` failed.
    #[error("ibv_create_comp_channel failed")]
    CreateCompChannel(#[source] io::Error),
    /// Setting `O_NONBLOCK` on the completion channel fd failed (`fcntl(2)`).
    #[error("fcntl on the completion channel fd failed")]
    ChannelFcntl(#[source] io::Error),
    /// `poll(2)` on the completion channel fd failed.
    #[error("poll(2) on the completion channel fd failed")]
    ChannelPoll(#[source] io::Error),
    /// `ibv_create_cq(3)` failed.
    #[error("ibv_create_cq({cqe} entries) failed")]
    CreateCq {
        /// Requested entries.
        cqe: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_req_notify_cq(3)` failed.
    #[error("ibv_req_notify_cq failed")]
    ReqNotifyCq(#[source] io::Error),
    /// `ibv_get_cq_event(3)` failed.
    #[error("ibv_get_cq_event failed")]
    GetCqEvent(#[source] io::Error),
    /// `ibv_poll_cq(3)` failed.
    #[error("ibv_poll_cq failed")]
    PollCq(#[source] io::Error),
    /// `ibv_create_qp(3)` failed.
    #[error("ibv_create_qp(RC) failed")]
    CreateQp(#[source] io::Error),
    /// `ibv_modify_qp(3)` failed for the named transition.
    #[error("ibv_modify_qp({qpn} -> {to}) failed")]
    ModifyQp {
        /// Local QP number.
        qpn: u32,
        /// Target state (`INIT`, `RTR`, `RTS`, `ERR`, `RESET`).
        to: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_qp(3)` failed.
    #[error("ibv_query_qp({qpn}) failed")]
    QueryQp {
        /// Local QP number.
        qpn: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_post_send(3)` returned `ENOMEM`: the send queue is full. Back-pressure: poll the send
    /// CQ and retry; WRs before `index` in a batch were posted.
    #[error("send queue full (ibv_post_send ENOMEM) at work request {index}")]
    SendQueueFull {
        /// Index in the batch of the first work request not posted.
        index: usize,
    },
    /// `ibv_post_send(3)` failed otherwise.
    #[error("ibv_post_send failed at work request {index}")]
    PostSend {
        /// Index in the batch of the first work request not posted.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ibv_post_recv(3)` returned `ENOMEM`: the receive queue is full.
    #[error("receive queue full (ibv_post_recv ENOMEM) at work request {index}")]
    RecvQueueFull {
        /// Index in the batch of the first work request not posted.
        index: usize,
    },
    /// `ibv_post_recv(3)` failed otherwise.
    #[error("ibv_post_recv failed at work request {index}")]
    PostRecv {
        /// Index in the batch of the first work request not posted.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An RDMA READ completed with an error (e.g. a remote access error for a bad rkey or
    /// range); the queue pair is in the error state.
    #[error("RDMA READ of {len} bytes failed: {status} (vendor error {vendor_err:#x})")]
    ReadFailed {
        /// Bytes asked for.
        len: usize,
        /// The completion status.
        status: super::WcStatus,
        /// The provider's vendor error.
        vendor_err: u32,
    },
    /// Work requests neither completed nor failed for the stall limit (see
    /// [`ReadOptions::stall`](super::ReadOptions::stall)); the queue pair was moved to the error
    /// state, which flushed them.
    #[error(
        "{outstanding} work requests neither completed nor failed in {:.1} s; the queue pair was \
         moved to the error state",
        waited.as_secs_f64()
    )]
    Stalled {
        /// How long nothing completed.
        waited: std::time::Duration,
        /// Work requests outstanding then.
        outstanding: u64,
    },
    /// A range lies outside a memory region.
    #[error("range {offset}+{len} outside memory region of {region_len} bytes")]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// Length of the region.
        region_len: usize,
    },
    /// A work request would carry more scatter/gather entries than allowed.
    #[error("too many scatter/gather entries (at most {max})")]
    TooManySge {
        /// The limit.
        max: usize,
    },
    /// A scatter/gather entry index that was never set.
    #[error("scatter/gather entry {index} not set (work request has {count})")]
    NoSuchSge {
        /// Index asked for.
        index: usize,
        /// Entries present.
        count: usize,
    },
    /// The work request is not valid for this use (e.g. a remote address on a SEND).
    #[error("invalid work request: {0}")]
    InvalidWorkRequest(&'static str),
    /// A connection endpoint received from a peer (or built locally) is malformed.
    #[error("invalid QP endpoint: {0}")]
    InvalidEndpoint(&'static str),
    /// The two ends of a connection do not use the same link layer.
    #[error("link layer mismatch: local {local}, remote {remote}")]
    LinkLayerMismatch {
        /// Local link layer.
        local: &'static str,
        /// Remote link layer.
        remote: &'static str,
    },
}

impl VerbsError {
    /// The `errno` from a verb that reports failure through its return value (0 or errno).
    pub(crate) fn rc(rc: i32) -> io::Error {
        // Some providers return -errno, some +errno, some -1 with errno set.
        if rc == -1 {
            io::Error::last_os_error()
        } else {
            io::Error::from_raw_os_error(rc.abs())
        }
    }
}

/// Result with [`VerbsError`].
pub type Result<T, E = VerbsError> = std::result::Result<T, E>;
