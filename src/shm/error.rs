//! Errors of the shared-memory layer.

use std::io;

/// An error from a shared-memory primitive. Every variant names the step that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// `memfd_create(2)` failed.
    #[error("memfd_create({name:?}) failed")]
    MemfdCreate {
        /// The debug name given to the memfd.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The region name contains a NUL byte or is longer than the kernel accepts (249 bytes).
    #[error("invalid memfd name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A region of length zero, or too large for this address space, was asked for.
    #[error("invalid region length {len}")]
    InvalidLength {
        /// The requested length in bytes.
        len: usize,
    },
    /// `ftruncate(2)` of a new memfd failed.
    #[error("ftruncate of memfd to {len} bytes failed")]
    Truncate {
        /// The requested length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fcntl(F_ADD_SEALS)` failed.
    #[error("sealing memfd failed")]
    Seal(#[source] io::Error),
    /// `fcntl(F_GET_SEALS)` failed on a received fd: it is not a sealable memory file.
    #[error("received fd is not a sealable memfd (F_GET_SEALS failed)")]
    NotMemfd(#[source] io::Error),
    /// A received memfd lacks a seal this layer relies on (without `F_SEAL_SHRINK` the peer
    /// could shrink the file under the mapping and turn every access into `SIGBUS`).
    #[error("received memfd seals {found:#x} lack the required {required:#x}")]
    MissingSeals {
        /// Seals present on the file.
        found: u32,
        /// Seals that must all be present.
        required: u32,
    },
    /// `fstat(2)` of a received fd failed.
    #[error("fstat of received fd failed")]
    Fstat(#[source] io::Error),
    /// A received region does not have the size the layout expects.
    #[error("region size mismatch: expected {expected} bytes, file has {actual}")]
    SizeMismatch {
        /// The length the caller's layout expects.
        expected: usize,
        /// The file's size as reported by `fstat`.
        actual: u64,
    },
    /// `mmap(2)` failed.
    #[error("mmap of {len} bytes failed")]
    Mmap {
        /// The length that was to be mapped.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An access reaches outside the region.
    #[error("access at offset {offset} of {len} bytes is outside the {region_len}-byte region")]
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Length of the region.
        region_len: usize,
    },
    /// A structure placed in a region is not aligned as it must be.
    #[error("offset {offset} is not a multiple of {align}")]
    Misaligned {
        /// The offending offset.
        offset: usize,
        /// The required alignment.
        align: usize,
    },
    /// A doorbell ring capacity is not a power of two in the supported range.
    #[error("ring capacity {capacity} is not a power of two in 1..={max}")]
    InvalidCapacity {
        /// The requested capacity.
        capacity: u32,
        /// The largest supported capacity.
        max: u32,
    },
    /// The peer left the shared ring in a state a correct peer cannot produce.
    #[error("doorbell ring corrupted by the peer: {detail}")]
    RingCorrupt {
        /// What was found.
        detail: &'static str,
        /// The ring position concerned.
        position: u64,
        /// The raw value read from shared memory.
        found: u64,
    },
    /// A credit mailbox index is out of range.
    #[error("mailbox index {index} out of range (mailbox has {len} counters)")]
    MailboxIndex {
        /// The requested index.
        index: usize,
        /// The number of counters.
        len: usize,
    },
    /// `futex(2)` failed with an unexpected error.
    #[error("futex {op} failed")]
    Futex {
        /// `"wait"` or `"wake"`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An eventfd operation failed, or a received fd is not a non-blocking eventfd.
    #[error("eventfd {op} failed")]
    EventFd {
        /// The step: `"create"`, `"check"`, `"signal"` or `"drain"`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A wake-up socket operation failed, or a received fd is not a wake-up socket of the peer
    /// ([`WakeSocket`](super::WakeSocket)).
    #[error("wake-up socket {op} failed")]
    Wake {
        /// The step: `"create"`, `"check"`, `"signal"` or `"drain"`.
        op: &'static str,
        /// The OS error, or what the check found.
        #[source]
        source: io::Error,
    },
    /// Too many fds for one message.
    #[error("{count} fds requested, at most {max} per message")]
    TooManyFds {
        /// The requested number.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// `sendmsg(2)` failed.
    #[error("sendmsg with {fds} fds failed")]
    SendMsg {
        /// The number of fds attached.
        fds: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `sendmsg(2)` sent fewer bytes than asked (the fds may have gone with the partial write).
    #[error("sendmsg sent {sent} of {len} bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes asked.
        len: usize,
    },
    /// `recvmsg(2)` failed.
    #[error("recvmsg failed")]
    RecvMsg(#[source] io::Error),
    /// The peer closed the socket before a message arrived.
    #[error("peer closed the socket")]
    PeerClosed,
    /// The ancillary data was truncated (`MSG_CTRUNC`): the peer sent more fds than allowed.
    #[error("ancillary data truncated (MSG_CTRUNC): peer sent more fds than the {max} accepted")]
    ControlTruncated {
        /// The number of fds the receive buffer had room for.
        max: usize,
    },
    /// The data did not fit the receive buffer (`MSG_TRUNC`).
    #[error("message truncated (MSG_TRUNC): larger than the {buf_len}-byte buffer")]
    DataTruncated {
        /// The buffer length.
        buf_len: usize,
    },
    /// An unexpected control message (not `SCM_RIGHTS`) arrived.
    #[error("unexpected control message level {level} type {kind}")]
    UnexpectedControl {
        /// `cmsg_level`.
        level: i32,
        /// `cmsg_type`.
        kind: i32,
    },
    /// The number of fds received differs from the number expected.
    #[error("expected {expected} fds, received {received}")]
    FdCount {
        /// Expected count.
        expected: usize,
        /// Received count (all of them were closed).
        received: usize,
    },
    /// `poll(2)` failed.
    #[error("poll failed")]
    Poll(#[source] io::Error),
    /// `getsockopt(SO_PEERCRED)` failed.
    #[error("getsockopt(SO_PEERCRED) failed")]
    PeerCred(#[source] io::Error),
    /// `pidfd_open(2)` failed.
    #[error("pidfd_open({pid}) failed")]
    PidfdOpen {
        /// The process id.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}
