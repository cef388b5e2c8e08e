//! The shared-memory transport: peers on one host.
//!
//! Here claim 3 holds literally: the receiver allocates each target segment as a sealed memfd,
//! passes it to the sender over a Unix-domain socket (`SCM_RIGHTS`), and the sender maps it: the
//! source segment *is* the target segment, so a message costs one copy, straight into the
//! receiver's partitions. The immediate goes through a doorbell ring in the receiver's control
//! region; credits come back as absolute counters in the sender's control region.
//!
//! # Regions of one side (the receiver of one direction)
//! - the control region: the doorbell ring the peer pushes immediates into, then the credit
//!   mailbox the peer publishes credits into (one `u64` per segment of our *sending* direction,
//!   plus one word where we announce that we wait for a credit);
//! - one region per target segment of our receive layout.
//!
//! # Handshake (over the Unix socket, fixed-size frames)
//! 1. connector → listener: `Hello` (magic, version, poll mode, pid, the connector's receive
//!    layout, the address of its readability probe).
//! 2. listener → connector: `Hello` with the listener's receive layout and probe, then a frame
//!    carrying the fds of its control region, of its wake-up socket's other end (the peer
//!    signals it when we wait in an event loop; checked to be a datagram socket pair made by the
//!    process the kernel saw connect) and of its target segments.
//! 3. connector → listener: a frame carrying the connector's fds (the same three kinds), then
//!    one byte: whether it can read the listener's memory (it read the listener's probe with
//!    `process_vm_readv`).
//! 4. listener → connector: two bytes once it has mapped them: status 1, then whether it can
//!    read the connector's memory.
//!
//! Each side thus knows, before any transfer, whether its peer reads its rendezvous buffers or
//! must be sent them through the segments (`docs/rendezvous.md`).
//!
//! Each side checks every field and every region's size (and seals) against the layouts before
//! it uses anything; a peer that dies leaves nothing behind once both processes are gone (the
//! memfds have no name in any file system).

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::{Connection, Link, PollMode, TargetMemory, TransportError};
use crate::core::{CreditUpdate, Layout, SegmentId};
// Rendezvous (transport/rndv.rs).
use super::rndv::Exposure;
use crate::core::RndvConfig;
use crate::core::{RndvRequest, refuse_reason};
use crate::shm::{PROBE_LEN, probe_addr, probe_peer, read_peer_memory, socket_peer_pid};

use crate::shm::{
    CreditMailbox, DoorbellConsumer, DoorbellProducer, MAX_FDS, PeerStatus, PushOutcome,
    RingLayout, ShmRegion, WaitMode, WakeSocket, recv_fds, send_fds, socket_peer_status,
};

const MAGIC: [u8; 4] = *b"RSHM";
/// Version 6: bare messages (immediate type 2, a data payload of exactly one partition without
/// its header in the partition), which a version 5 peer refuses. Version 5: the second fd
/// passed is one end of a datagram socket pair the receiver made (its wake-up for event loops,
/// [`WakeSocket`]), where version 4 passed an eventfd. Version 4: the
/// hello carries the address of a readability probe, and the sides exchange whether they can
/// read each other (version 3: no probe). The fds passed are the control region, the wake-up,
/// then the segments; doorbell slots are 32 bytes and carry a copy of the message header.
const VERSION: u16 = 6;
const HELLO_LEN: usize = 512;
/// Where the probe address sits in the hello (its last 8 bytes).
const PROBE_AT: usize = HELLO_LEN - 8;
/// The longest layout description (it sits at bytes 18.. up to the probe address).
const LAYOUT_TEXT_MAX: usize = PROBE_AT - 18;
/// Mailbox slots: one per possible segment id, then the "waiting for a credit" word.
const MAILBOX_SLOTS: usize = 257;
const WAITER_SLOT: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Fds passed before the segments: the control region and the wake-up socket's other end.
const FIXED_FDS: usize = 2;

/// A connection over shared memory.
pub type ShmConnection = Connection<ShmLink, ShmTarget>;

/// The directory holding the sockets of named shared-memory endpoints: `$RSMSG_SHM_DIR`, else
/// `$XDG_RUNTIME_DIR/rsmsg`, else `/tmp/rsmsg-UID`.
pub fn socket_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RSMSG_SHM_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("rsmsg");
    }
    PathBuf::from(format!("/tmp/rsmsg-{}", own_uid()))
}

fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Makes sure `dir`, in a directory every user may write to (`/tmp`), is this user's own: created
/// with mode 0700 if missing, otherwise a real directory (not a link) owned by this user, whose
/// mode is then tightened to 0700 if needed. Another user who created `/tmp/rsmsg-UID` first could otherwise swap
/// the sockets in it and sit between two endpoints.
///
/// # Errors
/// The directory cannot be created, or it exists and is not a directory owned by this user.
pub fn ensure_private_dir(dir: &Path) -> Result<(), TransportError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create the socket directory")(e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(io("inspect the socket directory"))?;
    let uid = own_uid();
    if m.file_type().is_dir() && m.uid() == uid && m.mode() & 0o077 != 0 {
        // Ours, made with a looser umask (earlier versions did that): tighten it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("make the socket directory private"))?;
        return Ok(());
    }
    if !m.file_type().is_dir() || m.uid() != uid {
        return Err(TransportError::Failed(format!(
            "the socket directory {} is not a directory of uid {uid} (a {}, owner uid {}, mode \
             {:o}); refusing to use it: remove it, or set RSMSG_SHM_DIR or XDG_RUNTIME_DIR",
            dir.display(),
            if m.file_type().is_symlink() {
                "symbolic link"
            } else if m.file_type().is_dir() {
                "directory"
            } else {
                "file"
            },
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// The socket path of endpoint `name`.
///
/// # Errors
/// A name that is empty, longer than 64 bytes or not made of `[A-Za-z0-9._-]`.
pub fn socket_path(name: &str) -> Result<PathBuf, TransportError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok {
        return Err(TransportError::Handshake {
            peer: name.into(),
            reason: "endpoint names are 1-64 bytes of [A-Za-z0-9._-]".into(),
        });
    }
    let dir = socket_dir();
    if std::env::var_os("RSMSG_SHM_DIR").is_none() && std::env::var_os("XDG_RUNTIME_DIR").is_none()
    {
        // The shared /tmp fallback: only a directory of our own.
        ensure_private_dir(&dir)?;
    }
    Ok(dir.join(format!("{name}.sock")))
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { step, source }
}

fn hs(peer: &str, reason: impl Into<String>) -> TransportError {
    TransportError::Handshake {
        peer: peer.into(),
        reason: reason.into(),
    }
}

/// The `Hello` frame.
#[derive(Debug, Clone, PartialEq)]
struct Hello {
    mode: PollMode,
    pid: u32,
    layout: Layout,
    /// Address of the sender's readability probe (`crate::shm::probe_addr`).
    probe: u64,
}

impl Hello {
    fn encode(&self) -> Result<[u8; HELLO_LEN], TransportError> {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let (mode, spins) = match self.mode {
            PollMode::Busy => (0u8, 0u32),
            PollMode::Event => (1, 0),
            PollMode::Adaptive { spins } => (2, spins),
        };
        b[6] = mode;
        b[8..12].copy_from_slice(&self.pid.to_le_bytes());
        b[12..16].copy_from_slice(&spins.to_le_bytes());
        let text = self.layout.to_string();
        if text.len() > LAYOUT_TEXT_MAX {
            return Err(hs("", "layout description too long for the handshake"));
        }
        b[16..18].copy_from_slice(&(text.len() as u16).to_le_bytes());
        b[18..18 + text.len()].copy_from_slice(text.as_bytes());
        b[PROBE_AT..].copy_from_slice(&self.probe.to_le_bytes());
        Ok(b)
    }

    fn decode(b: &[u8; HELLO_LEN], peer: &str) -> Result<Hello, TransportError> {
        if b[0..4] != MAGIC {
            return Err(hs(peer, "not an rsmsg shared-memory peer (bad magic)"));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(hs(
                peer,
                format!("protocol version {version}, expected {VERSION}"),
            ));
        }
        if b[7] != 0 {
            return Err(hs(peer, "reserved byte set"));
        }
        let spins = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        let mode = match b[6] {
            0 => PollMode::Busy,
            1 => PollMode::Event,
            2 => PollMode::Adaptive { spins },
            m => return Err(hs(peer, format!("unknown poll mode {m}"))),
        };
        let pid = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let n = u16::from_le_bytes([b[16], b[17]]) as usize;
        if n == 0 || n > LAYOUT_TEXT_MAX {
            return Err(hs(peer, format!("layout length {n} out of range")));
        }
        if b[18 + n..PROBE_AT].iter().any(|&x| x != 0) {
            return Err(hs(peer, "bytes after the layout"));
        }
        let probe = u64::from_le_bytes(b[PROBE_AT..].try_into().expect("8 bytes"));
        if probe == 0 || probe.checked_add(PROBE_LEN as u64).is_none() {
            return Err(hs(peer, format!("probe address {probe:#x} out of range")));
        }
        let text = std::str::from_utf8(&b[18..18 + n]).map_err(|_| hs(peer, "layout not UTF-8"))?;
        let layout = text
            .parse::<Layout>()
            .map_err(|e| hs(peer, format!("layout {text:?}: {e}")))?;
        Ok(Hello {
            mode,
            pid,
            layout,
            probe,
        })
    }
}

/// Geometry of a control region for a receiver with these layouts.
#[derive(Debug, Clone, Copy)]
struct ControlGeometry {
    ring: RingLayout,
    mailbox_offset: usize,
    bytes: usize,
}

impl ControlGeometry {
    fn new(recv: &Layout, send: &Layout) -> Result<Self, TransportError> {
        let bound = Layout::recv_wqe_bound_for(recv, send);
        let cap = bound.checked_next_power_of_two().unwrap_or(u32::MAX);
        let ring = RingLayout::new(cap)?;
        let mailbox_offset = ring.bytes().next_multiple_of(RingLayout::ALIGN);
        let bytes = mailbox_offset + CreditMailbox::bytes(MAILBOX_SLOTS);
        Ok(ControlGeometry {
            ring,
            mailbox_offset,
            bytes,
        })
    }
}

/// This side's receiving resources: what it creates and hands to the peer.
struct Local {
    control: Arc<ShmRegion>,
    /// Signaled by the peer when we wait in an event loop ([`Connection::arm`]).
    event: WakeSocket,
    /// The other end of `event`'s pair, passed to the peer.
    event_remote: OwnedFd,
    segments: Vec<ShmRegion>,
}

impl Local {
    fn create(recv: &Layout, geo: ControlGeometry) -> Result<Local, TransportError> {
        let control = Arc::new(ShmRegion::create("rsmsg-control", geo.bytes)?);
        let tables = crate::core::Tables::new(recv.clone());
        let segments = tables
            .segments()
            .iter()
            .map(|s| ShmRegion::create(&format!("rsmsg-seg{}", s.id.0), s.bytes() as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let (event, event_remote) = WakeSocket::pair()?;
        Ok(Local {
            control,
            event,
            event_remote,
            segments,
        })
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        [self.control.fd(), self.event_remote.as_fd()]
            .into_iter()
            .chain(self.segments.iter().map(|s| s.fd()))
            .collect()
    }
}

/// The peer's receiving resources, mapped here.
struct Remote {
    control: Arc<ShmRegion>,
    event: WakeSocket,
    segments: Vec<ShmRegion>,
}

impl Remote {
    fn open(
        fds: Vec<OwnedFd>,
        recv: &Layout,
        geo: ControlGeometry,
        (peer, peer_pid): (&str, i32),
    ) -> Result<Remote, TransportError> {
        let tables = crate::core::Tables::new(recv.clone());
        if fds.len() != FIXED_FDS + tables.segments().len() {
            return Err(hs(
                peer,
                format!(
                    "{} fds passed, expected {}",
                    fds.len(),
                    FIXED_FDS + tables.segments().len()
                ),
            ));
        }
        let mut fds = fds.into_iter();
        let control = Arc::new(ShmRegion::from_fd(fds.next().expect("counted"), geo.bytes)?);
        let event = WakeSocket::from_peer(fds.next().expect("counted"), peer_pid)?;
        let segments = tables
            .segments()
            .iter()
            .zip(fds)
            .map(|(s, fd)| ShmRegion::from_fd(fd, s.bytes() as usize))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Remote {
            control,
            event,
            segments,
        })
    }
}

/// The [`Link`] of a shared-memory connection.
pub struct ShmLink {
    sock: UnixStream,
    /// The peer's target segments, mapped: our source images.
    peer_segments: Vec<ShmRegion>,
    /// The peer's doorbell ring (we push).
    doorbell: DoorbellProducer,
    /// Our doorbell ring (the peer pushes).
    bell: DoorbellConsumer,
    /// Credits for our sends (the peer publishes here).
    mailbox: CreditMailbox,
    /// The peer's mailbox (we publish credits for its sends).
    peer_mailbox: CreditMailbox,
    /// Whether the peer sleeps (event/adaptive): then every push is followed by a wake-up check.
    peer_sleeps: bool,
    /// Our wake-up socket (the peer signals it when we armed).
    event: WakeSocket,
    _control: Arc<ShmRegion>,
    _peer_control: Arc<ShmRegion>,
    /// The peer's process id as the kernel saw it connect (`SO_PEERCRED`): whose memory a
    /// rendezvous reads (transport/rndv.rs).
    peer_pid: i32,
}

impl std::fmt::Debug for ShmLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmLink").finish_non_exhaustive()
    }
}

/// Our target segments, read in place.
#[derive(Debug)]
pub struct ShmTarget {
    segments: Vec<ShmRegion>,
}

impl TargetMemory for ShmTarget {
    #[inline(always)]
    fn bytes(
        &self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&[u8], TransportError> {
        match self.segments.get(segment.index()) {
            Some(region) => Ok(region.received(offset, len)?),
            None => Err(no_segment("target", segment)),
        }
    }
}

/// The error for a segment id outside the table (the core validated it, so never in practice).
#[cold]
fn no_segment(which: &str, segment: SegmentId) -> TransportError {
    TransportError::Failed(format!("no {which} segment {}", segment.0))
}

fn wait_mode(m: PollMode) -> WaitMode {
    match m {
        PollMode::Busy => WaitMode::Busy,
        PollMode::Event => WaitMode::Event,
        PollMode::Adaptive { spins } => WaitMode::Adaptive { spins },
    }
}

impl ShmLink {
    #[inline]
    fn segment(&mut self, segment: SegmentId) -> Result<&mut ShmRegion, TransportError> {
        match self.peer_segments.get_mut(segment.index()) {
            Some(region) => Ok(region),
            None => Err(no_segment("peer", segment)),
        }
    }

    #[inline]
    fn push(&mut self, imm: u32) -> Result<(), TransportError> {
        self.push_with(imm, &[0; crate::core::wire::HEADER_LEN])
    }

    /// After a credit store, for a peer that sleeps: a credit notice if it announced that it
    /// waits for one. Dekker with `want_credit_notice`: our credit store, a full fence, then
    /// the peer's flag.
    #[inline(never)]
    fn notify_credit(&mut self, credit: CreditUpdate) -> Result<(), TransportError> {
        fence(Ordering::SeqCst);
        if self.peer_mailbox.load(WAITER_SLOT)? != 0 {
            self.peer_mailbox.store(WAITER_SLOT, 0)?;
            self.push(credit.notice().get())?;
        }
        Ok(())
    }

    /// Pushes `imm` with a copy of its message's header in the slot (zeros: none).
    #[inline]
    fn push_with(
        &mut self,
        imm: u32,
        header: &[u8; crate::core::wire::HEADER_LEN],
    ) -> Result<(), TransportError> {
        match self.doorbell.try_push_with(imm, header)? {
            PushOutcome::Pushed => {}
            PushOutcome::Full => {
                // The ring holds every message the core lets us have in flight plus our credit
                // notices; full means the peer stopped consuming or is broken.
                return Err(TransportError::Failed(
                    "peer's doorbell ring is full beyond the protocol bound".into(),
                ));
            }
        }
        if self.peer_sleeps {
            self.doorbell.notify()?;
        }
        Ok(())
    }
}

impl Link for ShmLink {
    #[inline]
    fn write(
        &mut self,
        segment: SegmentId,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransportError> {
        self.segment(segment)?.copy_in(offset, bytes)?;
        Ok(())
    }

    #[inline]
    fn fill(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransportError> {
        Ok(self.segment(segment)?.filling(offset, len)?)
    }

    #[inline]
    fn post(
        &mut self,
        _segment: SegmentId,
        _offset: usize,
        _len: usize,
        imm: u32,
    ) -> Result<(), TransportError> {
        // The bytes are already in the receiver's partitions; the doorbell's Release store
        // publishes them with the immediate.
        self.push(imm)
    }

    #[inline]
    fn send_message(
        &mut self,
        res: &crate::core::Reservation,
        parts: &[&[u8]],
    ) -> Result<(), TransportError> {
        // One range check for the whole message, then plain copies into the peer's partitions.
        let dst = self
            .segment(res.segment)?
            .filling(res.offset, res.wire_len())?;
        let mut dst = if res.bare {
            dst
        } else {
            // A fixed-size store, not a copy of a length known only at run time.
            let Some((h, rest)) = dst.split_first_chunk_mut::<{ crate::core::wire::HEADER_LEN }>()
            else {
                return Err(TransportError::Failed(
                    "reserved range shorter than a header".into(),
                ));
            };
            *h = res.header;
            rest
        };
        for p in parts {
            let Some((d, rest)) = dst.split_at_mut_checked(p.len()) else {
                return Err(TransportError::Failed(
                    "message parts longer than the reserved range".into(),
                ));
            };
            crate::copy::copy(d, p);
            dst = rest;
        }
        // The header also rides in the doorbell slot (a bare message's too, though it has none
        // in the partition): the receiver validates the message from the line it polls, without
        // pulling the partition's first line from our core.
        self.push_with(res.immediate.get(), &res.header)
    }

    #[inline]
    fn next_immediate(
        &mut self,
        mode: PollMode,
        timeout: Option<Duration>,
    ) -> Result<Option<u32>, TransportError> {
        if timeout == Some(Duration::ZERO) {
            return Ok(self.bell.try_pop()?);
        }
        Ok(self.bell.wait(wait_mode(mode), timeout)?)
    }

    #[inline]
    fn header_with_immediate(&self) -> Option<[u8; crate::core::wire::HEADER_LEN]> {
        // All zeros (no magic): the entry came without one (a credit notice, a message posted
        // with `post`); the header is then read from the partition.
        let h = self.bell.extra();
        ((h[0] | h[1]) != 0).then_some(h)
    }

    #[inline]
    fn inline_headers(&self) -> bool {
        true
    }

    #[inline]
    fn publish_credit(&mut self, credit: CreditUpdate) -> Result<(), TransportError> {
        self.peer_mailbox
            .store(credit.segment.index(), credit.freed)?;
        if !self.peer_sleeps {
            // A busy-polling peer never announces a wait: it re-reads its mailbox.
            return Ok(());
        }
        self.notify_credit(credit)
    }

    fn want_credit_notice(&mut self) {
        // The slot index is in range by construction; a failure here can only be a bug.
        let _ = self.mailbox.store(WAITER_SLOT, 1);
        fence(Ordering::SeqCst);
    }

    #[inline]
    fn credit(&self, segment: SegmentId) -> u64 {
        self.mailbox.load(segment.index()).unwrap_or(0)
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.event.fd())
    }

    fn arm(&mut self) -> Result<bool, TransportError> {
        // Reset first: a signal that lands after the reset is one this wait must see.
        self.event.drain()?;
        Ok(self.bell.arm()?)
    }

    fn check_peer(&self) -> Result<(), TransportError> {
        match socket_peer_status(&self.sock)? {
            PeerStatus::Alive => Ok(()),
            PeerStatus::Gone => Err(TransportError::PeerClosed),
        }
    }

    // ---- rendezvous (transport/rndv.rs): the receiver copies straight from the sender ----

    fn rndv_expose<'b>(&mut self, buf: &'b [u8]) -> Result<Option<Exposure<'b>>, TransportError> {
        Ok(Some(Exposure::by_address(buf)))
    }

    fn rndv_can_stream(&self) -> bool {
        true
    }

    fn rndv_read(
        &mut self,
        req: &RndvRequest,
        dst: &mut [u8],
        _cacheable: bool,
    ) -> Result<Result<(), u32>, TransportError> {
        if req.rkey != 0 {
            return Ok(Err(refuse_reason::MALFORMED));
        }
        match read_peer_memory(self.peer_pid, req.addr, dst) {
            Ok(()) => Ok(Ok(())),
            Err(e) => {
                tracing::debug!(error = %e, pid = self.peer_pid, "cannot read the peer's buffer");
                let code = match e.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::ESRCH) => refuse_reason::NO_ACCESS,
                    _ => refuse_reason::MALFORMED,
                };
                Ok(Err(code))
            }
        }
    }
}

/// Most connections one [`ShmListener`] holds between the peer's connect and the application's
/// [`ShmListener::accept`]: handshakes in progress plus results not yet accepted. A connector
/// beyond that is closed at once (it sees the connection end before the listener's hello) until
/// the application accepts one, so unaccepted connectors cannot make the listener allocate
/// regions without bound.
pub const MAX_PENDING_HANDSHAKES: usize = 16;

/// A named shared-memory endpoint accepting connections.
///
/// Handshakes run on short-lived threads (at most [`MAX_PENDING_HANDSHAKES`] pending, each
/// bounded by a 10 s deadline for the whole exchange), so a connector that stalls or trickles
/// bytes never holds up the others: [`ShmListener::accept`] returns connections in the order
/// their handshakes complete.
#[derive(Debug)]
pub struct ShmListener {
    path: PathBuf,
    done: Mutex<mpsc::Receiver<Result<ShmConnection, TransportError>>>,
    /// Handshakes in progress plus results in `done`.
    pending: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl ShmListener {
    /// Listens under `name` (see [`socket_path`]) offering `layout` for messages sent to us.
    /// A stale socket left by a process that died is replaced; a live one is an error.
    ///
    /// # Errors
    /// A bad name, a name in use, a socket error.
    pub fn bind(name: &str, layout: Layout, mode: PollMode) -> Result<Self, TransportError> {
        let path = socket_path(name)?;
        Self::bind_path(&path, layout, mode)
    }

    /// As [`ShmListener::bind`], at an explicit socket path.
    ///
    /// # Errors
    /// As [`ShmListener::bind`].
    pub fn bind_path(path: &Path, layout: Layout, mode: PollMode) -> Result<Self, TransportError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("create the socket directory"))?;
        }
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(hs(
                        &path.display().to_string(),
                        "an endpoint is already listening under this name",
                    ));
                }
                std::fs::remove_file(path).map_err(io("remove a stale socket"))?;
                UnixListener::bind(path).map_err(io("bind the endpoint socket"))?
            }
            Err(e) => return Err(io("bind the endpoint socket")(e)),
        };
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, pending) = (stop.clone(), pending.clone());
            std::thread::Builder::new()
                .name("rsmsg-shm-accept".into())
                .spawn(move || accept_loop(&listener, &layout, mode, &stop, &pending, &tx))
                .map_err(io("start the accepting thread"))?
        };
        Ok(ShmListener {
            path: path.to_path_buf(),
            done: Mutex::new(rx),
            pending,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection whose handshake completed.
    ///
    /// # Errors
    /// A socket error or a peer that failed the handshake (the listener stays usable; call
    /// again for the next connection).
    pub fn accept(&self) -> Result<ShmConnection, TransportError> {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let r = done
            .recv()
            .map_err(|_| TransportError::Failed("the accepting thread ended".into()))?;
        self.pending.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

impl Drop for ShmListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread with a connection of our own; it sees `stop` and ends,
        // closing the listening socket. Joined only if the wake-up got through.
        let woke = UnixStream::connect(&self.path).is_ok();
        let _ = std::fs::remove_file(&self.path);
        if let Some(t) = self.acceptor.take()
            && woke
        {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    layout: &Layout,
    mode: PollMode,
    stop: &AtomicBool,
    in_flight: &AtomicUsize,
    tx: &mpsc::Sender<Result<ShmConnection, TransportError>>,
) {
    // Every result sent on `tx` was counted in `in_flight` first; `accept` uncounts it.
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let sock = match accepted {
            Ok((sock, _)) => sock,
            Err(e) => {
                if in_flight.load(Ordering::SeqCst) < MAX_PENDING_HANDSHAKES {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    if tx.send(Err(io("accept")(e))).is_err() {
                        return;
                    }
                }
                // Out of fds or similar: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if in_flight.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            tracing::debug!(
                limit = MAX_PENDING_HANDSHAKES,
                "too many connections pending, connector refused"
            );
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let (layout, tx2) = (layout.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name("rsmsg-shm-handshake".into())
            .spawn(move || {
                let _ = tx2.send(handshake(sock, &layout, mode));
            });
        if let Err(e) = spawned
            && tx.send(Err(io("start a handshake thread")(e))).is_err()
        {
            return;
        }
    }
}

/// Reads exactly `buf.len()` bytes before `deadline`: a peer that trickles bytes gets no more
/// time than one that sends nothing.
fn read_by(
    sock: &mut UnixStream,
    buf: &mut [u8],
    deadline: Instant,
    step: &'static str,
) -> Result<(), TransportError> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io(step)(std::io::ErrorKind::TimedOut.into()));
        }
        sock.set_read_timeout(Some(left))
            .map_err(io("set the handshake timeout"))?;
        match sock.read(&mut buf[got..]) {
            Ok(0) => return Err(io(step)(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(step)(e)),
        }
    }
    Ok(())
}

/// The listener's side of the handshake, within [`HANDSHAKE_TIMEOUT`] in all.
fn handshake(
    mut sock: UnixStream,
    layout: &Layout,
    mode: PollMode,
) -> Result<ShmConnection, TransportError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let peer = "connecting peer";
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io("set the handshake timeout"))?;
    let mut b = [0u8; HELLO_LEN];
    read_by(&mut sock, &mut b, deadline, "read the peer's hello")?;
    let theirs = Hello::decode(&b, peer)?;
    let ours = Hello {
        mode,
        pid: std::process::id(),
        layout: layout.clone(),
        probe: probe_addr(),
    };
    // A malformed RSMSG_RNDV_* value fails the set-up (naming the variable) rather than
    // silently dropping every rendezvous setting; the connection then uses what was read here.
    let rndv = RndvConfig::from_env()?;
    let we_read = read_verdict(&sock, &theirs, &rndv)?;
    sock.write_all(&ours.encode()?)
        .map_err(io("send our hello"))?;
    let my_geo = ControlGeometry::new(layout, &theirs.layout)?;
    let local = Local::create(layout, my_geo)?;
    send_frame_fds(&sock, &local.fds())?;
    let peer_geo = ControlGeometry::new(&theirs.layout, layout)?;
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(hs(peer, "handshake deadline passed"));
    }
    sock.set_read_timeout(Some(left))
        .map_err(io("set the handshake timeout"))?;
    let fds = recv_frame_fds(
        &sock,
        FIXED_FDS + theirs.layout.segment_count() as usize,
        peer,
    )?;
    let remote = Remote::open(
        fds,
        &theirs.layout,
        peer_geo,
        (peer, socket_peer_pid(&sock)?),
    )?;
    let mut v = [0u8; 1];
    read_by(&mut sock, &mut v, deadline, "read the peer's readability")?;
    let peer_reads_us = decode_verdict(v[0], peer)?;
    sock.write_all(&[1, u8::from(we_read)])
        .map_err(io("confirm the handshake"))?;
    sock.set_read_timeout(None)
        .map_err(io("clear the timeout"))?;
    sock.set_write_timeout(None)
        .map_err(io("clear the timeout"))?;
    build(
        sock,
        (local, my_geo),
        (remote, peer_geo),
        layout,
        theirs,
        mode,
        (rndv, peer_reads_us, we_read),
    )
}

/// This side's answer to "can you read my memory?" for the handshake: no when
/// `RSMSG_RNDV_STREAM_ONLY` is set here (this side never reads its peer), otherwise whether the
/// peer's probe reads back from the process the kernel saw connect (`SO_PEERCRED`). Fails with
/// [`TransportError::Config`] when an `RSMSG_RNDV_*` variable is malformed.
fn read_verdict(
    sock: &UnixStream,
    theirs: &Hello,
    rndv: &RndvConfig,
) -> Result<bool, TransportError> {
    if rndv.stream_only {
        return Ok(false);
    }
    let pid = socket_peer_pid(sock)?;
    let readable = probe_peer(pid, theirs.probe);
    tracing::debug!(pid, readable, "probed the peer's memory");
    Ok(readable)
}

/// A readability byte of the handshake: 0 (cannot read) or 1 (can).
fn decode_verdict(b: u8, peer: &str) -> Result<bool, TransportError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(hs(peer, format!("readability byte {v}, expected 0 or 1"))),
    }
}

fn recv_frame_fds(
    sock: &UnixStream,
    expected: usize,
    peer: &str,
) -> Result<Vec<OwnedFd>, TransportError> {
    // Regions come in frames of at most MAX_FDS descriptors, each frame saying how many it
    // carries (a layout may have up to 256 segments).
    let mut all = Vec::with_capacity(expected);
    while all.len() < expected {
        let want = (expected - all.len()).min(MAX_FDS);
        let mut count = [0u8; 8];
        let (n, fds) = recv_fds(sock.as_fd(), &mut count, want)?;
        if n != 8 || u64::from_le_bytes(count) != want as u64 {
            return Err(hs(peer, "bad region frame"));
        }
        all.extend(fds);
    }
    Ok(all)
}

fn send_frame_fds(sock: &UnixStream, fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
    for chunk in fds.chunks(MAX_FDS) {
        send_fds(sock, &(chunk.len() as u64).to_le_bytes(), chunk)?;
    }
    Ok(())
}

fn build(
    sock: UnixStream,
    (local, my_geo): (Local, ControlGeometry),
    (remote, peer_geo): (Remote, ControlGeometry),
    recv_layout: &Layout,
    theirs: Hello,
    mode: PollMode,
    // The rendezvous settings read at set-up, and the handshake's readability verdicts.
    (rndv, peer_reads_us, we_read): (RndvConfig, bool, bool),
) -> Result<ShmConnection, TransportError> {
    let bell = DoorbellConsumer::new(local.control.clone(), 0, my_geo.ring)?;
    let mailbox = CreditMailbox::new(local.control.clone(), my_geo.mailbox_offset, MAILBOX_SLOTS)?;
    let mut doorbell = DoorbellProducer::new(remote.control.clone(), 0, peer_geo.ring)?;
    doorbell.set_wake_socket(Arc::new(remote.event));
    let peer_mailbox = CreditMailbox::new(
        remote.control.clone(),
        peer_geo.mailbox_offset,
        MAILBOX_SLOTS,
    )?;
    let peer_pid = socket_peer_pid(&sock)?;
    let link = ShmLink {
        sock,
        peer_segments: remote.segments,
        doorbell,
        bell,
        mailbox,
        peer_mailbox,
        peer_sleeps: theirs.mode != PollMode::Busy,
        event: local.event,
        _control: local.control,
        _peer_control: remote.control,
        peer_pid,
    };
    let target = ShmTarget {
        segments: local.segments,
    };
    let conn = Connection::with_rndv(
        link,
        target,
        (theirs.layout, recv_layout.clone()),
        mode,
        rndv,
    );
    conn.set_rndv_readability(peer_reads_us, we_read);
    Ok(conn)
}

/// Connects to the endpoint `name` (see [`socket_path`]) offering `layout` for messages sent to
/// us.
///
/// # Errors
/// No such endpoint, a socket error, or a handshake failure.
pub fn connect(
    name: &str,
    layout: Layout,
    mode: PollMode,
) -> Result<ShmConnection, TransportError> {
    connect_path(&socket_path(name)?, layout, mode)
}

/// As [`connect`], to an explicit socket path.
///
/// # Errors
/// As [`connect`].
pub fn connect_path(
    path: &Path,
    layout: Layout,
    mode: PollMode,
) -> Result<ShmConnection, TransportError> {
    let peer = path.display().to_string();
    let mut sock = UnixStream::connect(path).map_err(io("connect to the endpoint socket"))?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io("set the handshake timeout"))?;
    let ours = Hello {
        mode,
        pid: std::process::id(),
        layout: layout.clone(),
        probe: probe_addr(),
    };
    sock.write_all(&ours.encode()?)
        .map_err(io("send our hello"))?;
    let mut b = [0u8; HELLO_LEN];
    sock.read_exact(&mut b)
        .map_err(io("read the peer's hello"))?;
    let theirs = Hello::decode(&b, &peer)?;
    // A malformed RSMSG_RNDV_* value fails the set-up (naming the variable) rather than
    // silently dropping every rendezvous setting; the connection then uses what was read here.
    let rndv = RndvConfig::from_env()?;
    let we_read = read_verdict(&sock, &theirs, &rndv)?;
    let peer_geo = ControlGeometry::new(&theirs.layout, &layout)?;
    let fds = recv_frame_fds(
        &sock,
        FIXED_FDS + theirs.layout.segment_count() as usize,
        &peer,
    )?;
    let remote = Remote::open(
        fds,
        &theirs.layout,
        peer_geo,
        (&peer, socket_peer_pid(&sock)?),
    )?;
    let my_geo = ControlGeometry::new(&layout, &theirs.layout)?;
    let local = Local::create(&layout, my_geo)?;
    send_frame_fds(&sock, &local.fds())?;
    sock.write_all(&[u8::from(we_read)])
        .map_err(io("send our readability"))?;
    let mut ok = [0u8; 2];
    sock.read_exact(&mut ok)
        .map_err(io("wait for the peer to map our regions"))?;
    if ok[0] != 1 {
        return Err(hs(&peer, "peer refused our regions"));
    }
    let peer_reads_us = decode_verdict(ok[1], &peer)?;
    sock.set_read_timeout(None)
        .map_err(io("clear the timeout"))?;
    build(
        sock,
        (local, my_geo),
        (remote, peer_geo),
        &layout,
        theirs,
        mode,
        (rndv, peer_reads_us, we_read),
    )
}

#[cfg(test)]
mod handshake_tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            mode: PollMode::Adaptive { spins: 7 },
            pid: 42,
            layout: Layout::default(),
            probe: probe_addr(),
        }
    }

    #[test]
    fn hello_round_trips_with_its_probe() {
        let h = hello();
        let b = h.encode().unwrap();
        assert_eq!(b[4..6], VERSION.to_le_bytes());
        assert_eq!(Hello::decode(&b, "t").unwrap(), h);
    }

    #[test]
    fn hello_with_a_bad_probe_or_version_is_a_handshake_error() {
        let good = hello().encode().unwrap();
        let reason = |b: &[u8; HELLO_LEN]| match Hello::decode(b, "t") {
            Err(TransportError::Handshake { reason, .. }) => reason,
            other => panic!("expected a handshake error, got {other:?}"),
        };
        let mut b = good;
        b[PROBE_AT..].fill(0);
        assert!(reason(&b).contains("probe address"), "{}", reason(&b));
        let mut b = good;
        b[PROBE_AT..].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(reason(&b).contains("probe address"), "{}", reason(&b));
        let mut b = good;
        b[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert!(reason(&b).contains("version 3"), "{}", reason(&b));
        // Version 4 passed an eventfd where a wake-up socket is expected now.
        let mut b = good;
        b[4..6].copy_from_slice(&4u16.to_le_bytes());
        assert!(reason(&b).contains("version 4"), "{}", reason(&b));
        // A layout description running into the probe's bytes.
        let mut b = good;
        b[16..18].copy_from_slice(&((LAYOUT_TEXT_MAX + 1) as u16).to_le_bytes());
        assert!(reason(&b).contains("out of range"), "{}", reason(&b));
        // A stray byte between the layout and the probe.
        let mut b = good;
        b[PROBE_AT - 1] = 1;
        assert!(
            reason(&b).contains("bytes after the layout"),
            "{}",
            reason(&b)
        );
    }

    #[test]
    fn readability_bytes_are_zero_or_one() {
        assert!(!decode_verdict(0, "t").unwrap());
        assert!(decode_verdict(1, "t").unwrap());
        for v in [2u8, 0x80, 0xff] {
            assert!(matches!(
                decode_verdict(v, "t"),
                Err(TransportError::Handshake { .. })
            ));
        }
    }
}
