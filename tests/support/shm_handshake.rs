//! The shared-memory handshake done by hand, as any process on the host could (handshake
//! version 6, see docs/shm.md), for tests whose peer then writes what an honest one never would.
//! Each test that includes it uses its own subset.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rsmsg::core::{Layout, Tables};
use rsmsg::shm::{CreditMailbox, MAX_FDS, RingLayout, ShmRegion, WakeSocket, recv_fds, send_fds};

pub const HELLO_LEN: usize = 512;
pub const MAILBOX_SLOTS: usize = 257;

/// Control-region geometry of a receiver with these layouts: the ring, the mailbox's offset,
/// the region's bytes.
pub fn geometry(recv: &Layout, send: &Layout) -> (RingLayout, usize, usize) {
    let bound = Layout::recv_wqe_bound_for(recv, send);
    let ring = RingLayout::new(bound.next_power_of_two()).unwrap();
    let mailbox = ring.bytes().next_multiple_of(RingLayout::ALIGN);
    (ring, mailbox, mailbox + CreditMailbox::bytes(MAILBOX_SLOTS))
}

/// Everything a completed handshake leaves the hand-made peer.
pub struct Handshake {
    pub sock: UnixStream,
    /// The victim's receive layout.
    pub victim: Layout,
    /// The victim's control region (its doorbell ring, then the mailbox of its sends' credits).
    pub control: Arc<ShmRegion>,
    pub ring: RingLayout,
    pub mailbox_offset: usize,
    /// The victim's target segments, mapped writable, in the order of its tables.
    pub segments: Vec<ShmRegion>,
    /// Our own control region (the victim publishes our sends' credits at `own_mailbox_offset`).
    pub own_control: Arc<ShmRegion>,
    pub own_mailbox_offset: usize,
    /// Our wake-up socket (the victim signals it when our ring's `sleeping` word says armed).
    pub own_event: WakeSocket,
    /// A copy of the end of it we passed the victim (what the victim signals).
    pub own_event_remote: OwnedFd,
    /// The end of the victim's wake-up socket pair it passed us (we would signal it).
    pub victim_wake: OwnedFd,
    pub own_segments: Vec<ShmRegion>,
}

/// Connects to the listener at `path` offering `mine`, and completes the handshake.
pub fn connect(path: &Path, mine: &Layout) -> Handshake {
    connect_as(path, mine, 0)
}

/// As [`connect`], announcing poll mode byte `mode` (0 busy, 1 event, 2 adaptive).
pub fn connect_as(path: &Path, mine: &Layout, mode: u8) -> Handshake {
    let mut sock = UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut hello = [0u8; HELLO_LEN];
    hello[0..4].copy_from_slice(b"RSHM");
    hello[4..6].copy_from_slice(&6u16.to_le_bytes());
    hello[6] = mode;
    hello[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    let text = mine.to_string();
    hello[16..18].copy_from_slice(&(text.len() as u16).to_le_bytes());
    hello[18..18 + text.len()].copy_from_slice(text.as_bytes());
    // Since version 4: the readability probe's address in the last 8 bytes.
    hello[HELLO_LEN - 8..].copy_from_slice(&rsmsg::shm::probe_addr().to_le_bytes());
    sock.write_all(&hello).unwrap();
    let mut theirs = [0u8; HELLO_LEN];
    sock.read_exact(&mut theirs).unwrap();
    let n = u16::from_le_bytes([theirs[16], theirs[17]]) as usize;
    let victim: Layout = std::str::from_utf8(&theirs[18..18 + n])
        .unwrap()
        .parse()
        .unwrap();
    // The victim's regions: control region, its wake-up socket's other end, then the segments.
    let tables = Tables::new(victim.clone());
    let expected = 2 + tables.segments().len();
    let mut fds = Vec::new();
    while fds.len() < expected {
        let want = (expected - fds.len()).min(MAX_FDS);
        let mut count = [0u8; 8];
        let (_, got) = recv_fds(sock.as_fd(), &mut count, want).unwrap();
        fds.extend(got);
    }
    let (ring, mailbox_offset, control_bytes) = geometry(&victim, mine);
    let mut fds = fds.into_iter();
    let control = Arc::new(ShmRegion::from_fd(fds.next().unwrap(), control_bytes).unwrap());
    let victim_wake = fds.next().unwrap();
    let segments = tables
        .segments()
        .iter()
        .zip(fds)
        .map(|(s, fd)| ShmRegion::from_fd(fd, s.bytes() as usize).unwrap())
        .collect();
    // Our own regions, as an honest connector would create them.
    let (_, own_mailbox_offset, own_bytes) = geometry(mine, &victim);
    let own_control = Arc::new(ShmRegion::create("hand-control", own_bytes).unwrap());
    let own_segments: Vec<ShmRegion> = Tables::new(mine.clone())
        .segments()
        .iter()
        .map(|s| ShmRegion::create("hand-seg", s.bytes() as usize).unwrap())
        .collect();
    let (own_event, own_event_remote) = WakeSocket::pair().unwrap();
    let all: Vec<_> = [own_control.fd(), own_event_remote.as_fd()]
        .into_iter()
        .chain(own_segments.iter().map(|s| s.fd()))
        .collect();
    for chunk in all.chunks(MAX_FDS) {
        send_fds(&sock, &(chunk.len() as u64).to_le_bytes(), chunk).unwrap();
    }
    // Whether we can read the victim (since version 4), then its status and its own verdict.
    sock.write_all(&[1]).unwrap();
    let mut ok = [0u8; 2];
    sock.read_exact(&mut ok).unwrap();
    assert_eq!(ok[0], 1);
    Handshake {
        sock,
        victim,
        control,
        ring,
        mailbox_offset,
        segments,
        own_control,
        own_mailbox_offset,
        own_event,
        own_event_remote,
        victim_wake,
        own_segments,
    }
}
