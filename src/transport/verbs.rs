//! The verbs transport: peers anywhere on an RDMA fabric (InfiniBand, RoCE, Soft-RoCE).
//!
//! Per connection, each side owns
//! - one **target image** per segment of its receive layout (remote write): the peer's messages
//!   land there and are read in place;
//! - a **credit mailbox** of 257 `u64` words (remote write): the peer writes the absolute
//!   `freed` counter of each segment we send into, with a plain RDMA WRITE;
//! - one **source image** per segment of the peer's receive layout (local only): messages are
//!   copied (or filled in place) there and sent with one RDMA WRITE_WITH_IMM to the same offset
//!   of the peer's target image;
//! - one RC queue pair, a send CQ, a receive CQ attached to a completion channel (event mode).
//!
//! # Setup through the bootstrap manager (four rounds)
//! 1. initiator → listener: offer = target segments, mailbox, and in `opaque` a hello (magic,
//!    version, poll mode, link layer, receive layout). No QP yet: the receive queue depth
//!    depends on both layouts.
//! 2. listener → initiator: answer = the same for the listener, plus its QP (created in RESET).
//! 3. initiator → listener: the initiator's QP, already connected (RTS) with its receive queue
//!    stocked.
//! 4. listener → initiator: `ready` once the listener's QP is connected and stocked. Nobody
//!    writes before its peer's QP can take it.
//!
//! Every descriptor received is checked against the layout the peer announced (which must parse
//! and validate): segment ids, groups, partition sizes, counts, span factors, lengths, the
//! mailbox size, the QP attributes.
//!
//! # Hot path
//! Work requests are built once per segment and patched (SGE, remote address, immediate) before
//! each post: nothing allocates. Messages up to the QP's inline limit go inline. One send in
//! `k` (a quarter of the send queue) is signaled; the driver counts posted and completed work
//! requests and reaps the send CQ when the queue fills, so a full send queue is back-pressure,
//! never an error. Receive WQEs (no SGE) are posted up to
//! [`Layout::recv_wqe_bound_for`] and one is re-posted per receive completion, so the normal
//! path never meets RNR.
//!
//! # Credit notices
//! A side in event or adaptive mode announces it in its hello. Its peer then follows every
//! credit WRITE with a zero-length WRITE_WITH_IMM carrying a credit notice, so a sender sleeping
//! on the completion channel for credits always wakes up (no flag to race with: RC ordering
//! places the mailbox write before the notice's completion). Notices consume receive WQEs, so
//! such a side also drains its receive CQ each time it posts a message (dropping notices: the
//! mailbox already holds their value, keeping messages in arrival order), which bounds the
//! notices pending at any time by the partitions of its sending direction, as the receive
//! queue depth assumes. A busy-mode side reads its mailbox and gets no notices.
//!
//! # Liveness
//! While a side waits (nothing to receive, or no credit), [`Link::check_peer`] posts a signaled
//! 8-byte RDMA WRITE probe (into the peer's spare mailbox word) at most once per second. A peer
//! that died never acknowledges it: the QP's retry limits (`timeout`, `retry_cnt` in [`VerbsOptions::params`]) turn that into an
//! error completion in bounded time, and the connection fails with
//! [`TransportError::PeerClosed`]. Any error completion fails the connection with its status.
//!
//! Those limits bind only while the device runs them. Every wait on send completions (the
//! probe's, a full send queue, a memory-window operation, rendezvous READs) is also bounded by
//! [`VerbsOptions::stall_limit`]: when nothing completes for that long, the QP is moved to the
//! error state (flushing what is outstanding) and the connection fails with a "no send
//! completion" error. Soft-RoCE has left sends neither completed nor failed after its netdev went
//! down, and an infinite RNR retry count never ends against a peer that posts no receive.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use super::{Connection, Link, PollMode, TargetMemory, TransportError};
use crate::bootstrap::{
    BootstrapError, Descriptors, EndpointInfo, EndpointName, ErrorCode, HostId, Incoming,
    MailboxDescriptor, ManagerClient, QpInfo, Registration, RendezvousId, SegmentDescriptor, Side,
    Token, TransportSet,
};
use crate::core::wire::{Immediate, ImmediateKind};
use crate::core::{CreditUpdate, Layout, SegmentId, Tables};
use crate::verbs::{
    CompletionChannel, CompletionQueue, ConnectParams, Context, CreditWords, Gid, GidIndex,
    GidSelector, LinkLayer, Mtu, ProtectionDomain, Psn, QpConfig, QpEndpoint, QpNum, QueuePair,
    RecvWr, Rkey, SendOp, SendWr, SourceImage, Stall, TargetImage, VerbsError, WcOpcode, WcStatus,
    WorkCompletion, WrId,
};

// Rendezvous (transport/rndv.rs).
use super::rndv::Exposure;
use crate::core::{RndvConfig, RndvRequest};
use crate::verbs::{
    AccessFlags, BoundWindow, MemoryWindow, ReadJob, ReadOptions, RegCache, RegCacheStats,
    RemoteReadGrant,
};

const MAGIC: [u8; 4] = *b"RSVB";
/// Version 2: bare messages (immediate type 2, a data payload of exactly one partition without
/// its header), which a version 1 peer refuses as an unknown immediate type.
const VERSION: u16 = 2;
const HELLO_FIXED: usize = 14;
/// Mailbox words: one per possible segment id, plus one spare (as in the shared-memory layout).
const MAILBOX_SLOTS: usize = 257;
const RECV_BATCH: usize = 16;
const SEND_BATCH: usize = 16;
/// How often a waiting side probes its peer.
/// Messages posted while credits wait before the credits ride on a post (chained, one more
/// WRITE): credits that crossed a quarter segment are posted at once; the others cost at most
/// one WRITE per this many messages, and a peer's view of what was delivered lags by as much.
const RIDE_AFTER: u32 = 16;
/// Polls in a row that find nothing before waiting credits are written on their own.
const IDLE_POLLS: u32 = 1024;
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Content of the fourth setup round.
const READY: &[u8] = b"ready";

/// A connection over verbs.
pub type VerbsConnection = Connection<VerbsLink, VerbsTarget>;

/// Device, port, GID and QP parameters of verbs connections.
#[derive(Debug, Clone)]
pub struct VerbsOptions {
    /// Device name (default: `$RSMSG_DEVICE`, else the first device).
    pub device: Option<String>,
    /// An already open device to use instead of opening `device` (shares one context among
    /// connections).
    pub context: Option<Context>,
    /// Port number (default 1, or `$RSMSG_PORT`).
    pub port: u8,
    /// GID to use: automatic (a RoCE v2 IPv4-mapped GID first), or `$RSMSG_GID_INDEX`.
    pub gid: GidSelector,
    /// QP connection parameters: MTU cap, ACK timeout and retries (which bound how long a dead
    /// peer takes to detect), RNR retries.
    pub params: ConnectParams,
    /// Send queue depth asked for (capped by the device).
    pub send_queue_depth: u32,
    /// Inline data asked for (messages up to this many wire bytes are copied at post time).
    pub max_inline: u32,
    /// Bound on each setup step through the manager.
    pub setup_timeout: Duration,
    /// How long send work may go neither completed nor failed before the connection fails as
    /// stalled; the limit used is never below twice the QP's own retry bound (see
    /// [`VerbsOptions::stall_limit`]). Default 10 s, or `$RSMSG_STALL_TIMEOUT` seconds.
    pub stall_timeout: Duration,
}

impl Default for VerbsOptions {
    fn default() -> Self {
        VerbsOptions {
            device: None,
            context: None,
            port: 1,
            gid: GidSelector::Auto,
            params: ConnectParams {
                // 4.096 us * 2^17 = 0.54 s per try, 6 retries: a dead peer shows within about four
                // seconds of the probe (7 would mean "retry forever" to Soft-RoCE), while delays
                // of emulated or congested networks do not pass for a death; RNR retries forever
                // (the normal path never meets RNR).
                timeout: 17,
                retry_cnt: 6,
                rnr_retry: 7,
                min_rnr_timer: 12,
                ..ConnectParams::default()
            },
            send_queue_depth: 256,
            max_inline: 128,
            setup_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

impl VerbsOptions {
    /// Environment variable naming the device.
    pub const ENV_DEVICE: &'static str = "RSMSG_DEVICE";
    /// Environment variable naming the GID index.
    pub const ENV_GID_INDEX: &'static str = "RSMSG_GID_INDEX";
    /// Environment variable naming the port.
    pub const ENV_PORT: &'static str = "RSMSG_PORT";
    /// Environment variable setting the QP's ACK timeout exponent (4.096 us * 2^N, 1..=31).
    pub const ENV_QP_TIMEOUT: &'static str = "RSMSG_QP_TIMEOUT";
    /// Environment variable setting [`VerbsOptions::stall_timeout`] in whole seconds
    /// (1..=86400).
    pub const ENV_STALL_TIMEOUT: &'static str = "RSMSG_STALL_TIMEOUT";

    /// The value of [`VerbsOptions::ENV_STALL_TIMEOUT`]: whole seconds, 1..=86400.
    pub(crate) fn parse_stall_timeout(v: &str) -> Option<Duration> {
        v.trim()
            .parse()
            .ok()
            .filter(|t| (1..=86_400).contains(t))
            .map(Duration::from_secs)
    }

    /// How long a connection waits on send work that the device neither completes nor fails
    /// before it moves its QP to the error state and fails: `stall_timeout`, or twice the
    /// longest the QP's own retries take to fail a work request (4.096 us * 2^`timeout` times
    /// `retry_cnt + 1` tries) when that is longer, so that the QP's retries always fail a dead
    /// peer first. `None` when `params.timeout` is 0, which waits forever by definition.
    pub fn stall_limit(&self) -> Option<Duration> {
        let bound = crate::verbs::retry_bound(self.params.timeout, self.params.retry_cnt)?;
        Some(self.stall_timeout.max(bound.saturating_mul(2)))
    }

    /// The defaults, with device, port, GID index, QP timeout and stall timeout taken from the
    /// environment when set.
    ///
    /// # Errors
    /// A port, GID index or timeout that is not a number in range.
    pub fn from_env() -> Result<Self, TransportError> {
        let mut o = VerbsOptions::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        o.device = var(Self::ENV_DEVICE);
        if let Some(p) = var(Self::ENV_PORT) {
            o.port = p
                .trim()
                .parse()
                .ok()
                .filter(|&p| p >= 1)
                .ok_or_else(|| setup_err(Self::ENV_PORT, format!("bad port {p:?}")))?;
        }
        if let Some(t) = var(Self::ENV_QP_TIMEOUT) {
            o.params.timeout = t
                .trim()
                .parse()
                .ok()
                .filter(|t| (1..=31).contains(t))
                .ok_or_else(|| setup_err(Self::ENV_QP_TIMEOUT, format!("bad timeout {t:?}")))?;
        }
        if let Some(t) = var(Self::ENV_STALL_TIMEOUT) {
            o.stall_timeout = Self::parse_stall_timeout(&t).ok_or_else(|| {
                setup_err(
                    Self::ENV_STALL_TIMEOUT,
                    format!("bad stall timeout {t:?} (whole seconds, 1..=86400)"),
                )
            })?;
        }
        if let Some(g) = var(Self::ENV_GID_INDEX) {
            let i: u8 = g
                .trim()
                .parse()
                .map_err(|_| setup_err(Self::ENV_GID_INDEX, format!("bad GID index {g:?}")))?;
            o.gid = GidSelector::Index(GidIndex(i));
        }
        Ok(o)
    }

    fn open(&self) -> Result<Context, TransportError> {
        match &self.context {
            Some(c) => Ok(c.clone()),
            None => Ok(Context::open(self.device.as_deref())?),
        }
    }
}

fn setup_err(peer: &str, reason: impl Into<String>) -> TransportError {
    TransportError::Handshake {
        peer: peer.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Hello (in `Descriptors::opaque`)

#[derive(Debug, Clone, PartialEq)]
struct Hello {
    mode: PollMode,
    link_layer: LinkLayer,
    layout: Layout,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let text = self.layout.to_string();
        let mut b = Vec::with_capacity(HELLO_FIXED + text.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        let (mode, spins) = match self.mode {
            PollMode::Busy => (0u8, 0u32),
            PollMode::Event => (1, 0),
            PollMode::Adaptive { spins } => (2, spins),
        };
        b.push(mode);
        b.push(self.link_layer.to_raw());
        b.extend_from_slice(&spins.to_le_bytes());
        b.extend_from_slice(&(text.len() as u16).to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        b
    }

    fn decode(b: &[u8], peer: &str) -> Result<Hello, TransportError> {
        let bad = |r: String| setup_err(peer, r);
        if b.len() < HELLO_FIXED {
            return Err(bad(format!("hello of {} bytes is too short", b.len())));
        }
        if b[0..4] != MAGIC {
            return Err(bad("not an rsmsg verbs peer (bad magic)".into()));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(bad(format!(
                "protocol version {version}, expected {VERSION}"
            )));
        }
        let spins = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let mode = match (b[6], spins) {
            (0, 0) => PollMode::Busy,
            (1, 0) => PollMode::Event,
            (2, spins) => PollMode::Adaptive { spins },
            (m, s) => return Err(bad(format!("bad poll mode {m} with {s} spins"))),
        };
        if b[7] > 2 {
            return Err(bad(format!("unknown link layer {}", b[7])));
        }
        let link_layer = LinkLayer::from_raw(b[7]);
        let n = u16::from_le_bytes([b[12], b[13]]) as usize;
        if n == 0 || b.len() != HELLO_FIXED + n {
            return Err(bad(format!(
                "layout length {n} does not match the hello's {} bytes",
                b.len()
            )));
        }
        let text = std::str::from_utf8(&b[HELLO_FIXED..])
            .map_err(|_| bad("layout is not UTF-8".into()))?;
        let layout = text
            .parse::<Layout>()
            .map_err(|e| bad(format!("layout {text:?}: {e}")))?;
        Ok(Hello {
            mode,
            link_layer,
            layout,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptors

/// What one side learned about the other's receiving resources, validated.
#[derive(Debug)]
struct PeerInfo {
    hello: Hello,
    mailbox: MailboxDescriptor,
    segments: Vec<SegmentDescriptor>,
}

fn check_descriptors(d: &Descriptors, peer: &str) -> Result<PeerInfo, TransportError> {
    let bad = |r: String| setup_err(peer, r);
    d.validate()
        .map_err(|e| bad(format!("invalid descriptors: {e}")))?;
    let hello = Hello::decode(&d.opaque, peer)?;
    let tables = Tables::new(hello.layout.clone());
    if d.segments.len() != tables.segments().len() {
        return Err(bad(format!(
            "{} segment descriptors for a layout of {} segments",
            d.segments.len(),
            tables.segments().len()
        )));
    }
    for (s, e) in d.segments.iter().zip(tables.segments()) {
        let ok = s.segment_id == e.id.0
            && s.group == e.group.0
            && s.partition_size == e.partition_size
            && s.partition_count == e.partitions
            && s.span_factor == e.span
            && s.len >= e.bytes();
        if !ok {
            return Err(bad(format!(
                "segment descriptor {s:?} does not match segment {} of the announced layout",
                e.id.0
            )));
        }
    }
    let mailbox = d
        .mailbox
        .ok_or_else(|| bad("no credit mailbox descriptor".into()))?;
    if (mailbox.len as usize) < MAILBOX_SLOTS * 8 {
        return Err(bad(format!(
            "credit mailbox of {} bytes, expected at least {}",
            mailbox.len,
            MAILBOX_SLOTS * 8
        )));
    }
    Ok(PeerInfo {
        hello,
        mailbox,
        segments: d.segments.clone(),
    })
}

fn qp_info(ep: &QpEndpoint) -> QpInfo {
    QpInfo {
        qpn: ep.qpn.0,
        psn: ep.psn.get(),
        gid: ep.gid.0,
        lid: ep.lid,
        mtu: ep.mtu.bytes() as u16,
        port: ep.port,
        gid_index: ep.gid_index.0,
    }
}

fn qp_endpoint(
    info: &QpInfo,
    link_layer: LinkLayer,
    peer: &str,
) -> Result<QpEndpoint, TransportError> {
    let mtu = [
        Mtu::Mtu256,
        Mtu::Mtu512,
        Mtu::Mtu1024,
        Mtu::Mtu2048,
        Mtu::Mtu4096,
    ]
    .into_iter()
    .find(|m| m.bytes() == u32::from(info.mtu))
    .ok_or_else(|| setup_err(peer, format!("bad MTU {}", info.mtu)))?;
    let ep = QpEndpoint {
        qpn: QpNum(info.qpn),
        psn: Psn::new(info.psn).ok_or_else(|| setup_err(peer, "PSN exceeds 24 bits"))?,
        gid: Gid(info.gid),
        gid_index: GidIndex(info.gid_index),
        lid: info.lid,
        mtu,
        port: info.port,
        link_layer,
    };
    ep.validate()
        .map_err(|e| setup_err(peer, format!("queue pair: {e}")))?;
    Ok(ep)
}

// ---------------------------------------------------------------------------------------------
// Resources

/// This side's receiving resources, announced before the QP exists.
struct Receiving {
    targets: Vec<TargetImage>,
    mailbox: CreditWords,
}

impl Receiving {
    fn create(pd: &ProtectionDomain, layout: &Layout) -> Result<Receiving, TransportError> {
        let tables = Tables::new(layout.clone());
        let targets = tables
            .segments()
            .iter()
            .map(|s| TargetImage::new(pd, s.bytes() as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let mailbox = CreditWords::new(pd, MAILBOX_SLOTS)?;
        Ok(Receiving { targets, mailbox })
    }

    fn descriptors(&self, layout: &Layout, hello: &Hello) -> Descriptors {
        let tables = Tables::new(layout.clone());
        let segments = tables
            .segments()
            .iter()
            .zip(&self.targets)
            .map(|(e, t)| SegmentDescriptor {
                segment_id: e.id.0,
                group: e.group.0,
                addr: t.addr(),
                len: t.len() as u64,
                rkey: t.rkey().0,
                partition_size: e.partition_size,
                partition_count: e.partitions,
                span_factor: e.span,
            })
            .collect();
        Descriptors {
            qp: None,
            mailbox: Some(MailboxDescriptor {
                addr: self.mailbox.addr(),
                rkey: self.mailbox.rkey().0,
                len: self.mailbox.len() as u32,
            }),
            segments,
            opaque: hello.encode(),
        }
    }
}

/// The QP and its queues, in RESET until connected.
struct Queues {
    qp: QueuePair,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    channel: CompletionChannel,
    local: QpEndpoint,
    rq_depth: u32,
}

impl Queues {
    fn create(
        ctx: &Context,
        pd: &ProtectionDomain,
        opts: &VerbsOptions,
        recv: &Layout,
        send: &Layout,
    ) -> Result<Queues, TransportError> {
        let dev = ctx.query_device()?;
        let rq_depth = Layout::recv_wqe_bound_for(recv, send);
        if rq_depth > dev.max_qp_wr || rq_depth > dev.max_cqe {
            return Err(setup_err(
                ctx.device_name(),
                format!(
                    "the layouts need {rq_depth} receive WQEs; the device allows {} per queue and {} per CQ",
                    dev.max_qp_wr, dev.max_cqe
                ),
            ));
        }
        let sq_depth = opts.send_queue_depth.clamp(8, dev.max_qp_wr.max(8));
        let channel = CompletionChannel::new(ctx)?;
        channel.set_nonblocking(true)?;
        let send_cq = CompletionQueue::new(ctx, sq_depth, None)?;
        let recv_cq = CompletionQueue::new(ctx, rq_depth, Some(&channel))?;
        let cfg = QpConfig {
            max_send_wr: sq_depth,
            max_recv_wr: rq_depth,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: opts.max_inline,
            sig_all: false,
        };
        let qp = QueuePair::new(pd, &send_cq, &recv_cq, &cfg)?;
        if qp.caps().max_inline_data < 8 {
            return Err(setup_err(
                ctx.device_name(),
                "the device does not send 8 bytes inline (needed for credit writes)",
            ));
        }
        let local = qp.local_endpoint(opts.port, opts.gid, Psn::random())?;
        Ok(Queues {
            qp,
            send_cq,
            recv_cq,
            channel,
            local,
            rq_depth,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The link

/// Which prepared work request (or chain of them, posted with one `ibv_post_send`) to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wr {
    /// A message to peer segment `i`.
    Message(usize),
    /// The pending credits, then a message to peer segment `i`, in one post.
    CreditAndMessage(usize),
    /// The pending credits alone.
    Credit,
    /// The pending credits, then a credit notice, in one post.
    CreditAndNotice,
    /// The liveness probe.
    Probe,
}

impl Wr {
    /// Work requests in the chain.
    #[inline]
    fn len(self) -> u64 {
        match self {
            Wr::CreditAndMessage(_) | Wr::CreditAndNotice => 2,
            _ => 1,
        }
    }
}

/// Credits written into the staging words but not yet posted: the slot range `lo..=hi`.
/// Written with one RDMA WRITE of that range (the staging words hold the newest value of every
/// slot, and the peer's mailbox words are written by nobody else, so rewriting an unchanged
/// slot is harmless). Kept within the inline limit, so a post copies the words at once and a
/// later update of the staging words can never race with a DMA read of them.
#[derive(Debug, Clone, Copy)]
struct PendingCredits {
    lo: usize,
    hi: usize,
}

/// Why the link stopped working.
#[derive(Debug, Clone)]
struct Dead {
    peer_gone: bool,
    reason: String,
    /// Only flushed work requests were seen: the QP went to the error state for a cause that
    /// completes elsewhere or not at all. A cause seen later replaces this one (`record`).
    flushed_only: bool,
}

impl Dead {
    fn failed(reason: impl Into<String>) -> Self {
        Dead {
            peer_gone: false,
            reason: reason.into(),
            flushed_only: false,
        }
    }

    /// The QP is in the error state and none of this side's work requests failed before being
    /// flushed: this side's device moved it there because it refused one of the peer's requests
    /// (an RDMA access outside the memory registered for this connection). The peer broke the
    /// rules, it did not go away.
    fn flushed() -> Self {
        Dead {
            flushed_only: true,
            ..Dead::failed(
                "the queue pair went to the error state with no local failure: the device \
                 refused a request of the peer (an RDMA access outside the memory registered \
                 for this connection)",
            )
        }
    }

    /// Keeps the first cause in `slot` (a flush only stands until a cause is seen) and returns
    /// the one kept.
    fn record(slot: &mut Option<Dead>, d: Dead) -> &Dead {
        if slot
            .as_ref()
            .is_some_and(|old| old.flushed_only && !d.flushed_only)
        {
            *slot = None;
        }
        slot.get_or_insert(d)
    }

    fn error(&self) -> TransportError {
        if self.peer_gone {
            TransportError::PeerClosed
        } else {
            TransportError::Failed(self.reason.clone())
        }
    }
}

/// Why a failed completion stopped the link. A flushed one is a consequence, never the cause: a
/// send that failed first, or the peer's refused request, is.
fn dead_from(wc: &WorkCompletion, what: &str) -> Dead {
    let st = wc.status();
    if st == WcStatus::WR_FLUSH_ERR {
        return Dead::flushed();
    }
    Dead {
        peer_gone: st == WcStatus::RETRY_EXC_ERR || st == WcStatus::RNR_RETRY_EXC_ERR,
        ..Dead::failed(format!(
            "{what} completion failed: {st} (vendor error {:#x})",
            wc.vendor_err()
        ))
    }
}

/// The sending half: the QP and its prepared work requests.
struct SendSide {
    qp: QueuePair,
    cq: CompletionQueue,
    wcs: [WorkCompletion; SEND_BATCH],
    /// Per peer segment: `[credit WRITE, message WRITE_WITH_IMM]`, posted as a chain when
    /// credits are pending (the credit rides on the message's post) or the message alone.
    msg_wrs: Vec<[SendWr; 2]>,
    /// Peer target segments: base address and key.
    remote: Vec<(u64, Rkey)>,
    credit_stage: SourceImage,
    /// `[credit WRITE, credit notice WRITE_WITH_IMM]`.
    credit_wrs: [SendWr; 2],
    probe_wr: SendWr,
    /// Credits staged but not posted yet.
    pending: Option<PendingCredits>,
    /// Messages posted while `pending` waited (it rides on the next post once this reaches
    /// [`RIDE_AFTER`]).
    pending_posts: u32,
    /// Polls in a row that found nothing to receive (pending credits are written on their own
    /// once this reaches [`IDLE_POLLS`]).
    idle_polls: u32,
    /// Per slot: the value last posted (a credit is posted at once when it moves this far).
    posted_credit: Vec<u64>,
    /// Per slot: how far a credit must move past the posted value to be posted at once
    /// (a quarter of the segment), instead of riding on the next post.
    urgent: Vec<u64>,
    /// Most staging bytes one credit write carries (inline).
    credit_span: usize,
    peer_mailbox: (u64, Rkey),
    depth: u64,
    signal_every: u64,
    posted: u64,
    completed: u64,
    /// The outstanding probe: its work request id and when it was posted.
    probe_pending: Option<(u64, Instant)>,
    /// See [`VerbsOptions::stall_limit`].
    stall_limit: Option<Duration>,
    /// The wait of [`Link::check_peer`] while the send queue is full (no probe can be posted).
    full_wait: Stall,
    dead: Option<Dead>,
}

impl SendSide {
    #[inline]
    fn outstanding(&self) -> u64 {
        self.posted - self.completed
    }

    fn check(&self) -> Result<(), TransportError> {
        match &self.dead {
            Some(d) => Err(d.error()),
            None => Ok(()),
        }
    }

    /// Polls the send CQ once; an error completion kills the link. Returns the completions
    /// polled.
    fn reap(&mut self) -> Result<usize, TransportError> {
        let n = self.cq.poll(&mut self.wcs)?;
        for wc in &self.wcs[..n] {
            if !wc.is_success() {
                let d = dead_from(wc, "send");
                tracing::debug!(reason = %d.reason, "verbs link failed");
                Dead::record(&mut self.dead, d);
                continue;
            }
            // Completions are in posting order; a signaled one completes all before it.
            self.completed = self.completed.max(wc.wr_id().0 + 1);
        }
        if self.probe_pending.is_some_and(|(p, _)| self.completed > p) {
            self.probe_pending = None;
        }
        self.check().map(|()| n)
    }

    /// How long the wait of [`Link::check_peer`] has gone without a send completion, once that
    /// reaches the stall limit: the probe's age, or with the send queue full (no probe can be
    /// posted; a full queue holds signaled work requests) how long `completed` has not moved.
    /// The send CQ must have been drained just before.
    fn stalled_at(&mut self, now: Instant) -> Option<Duration> {
        let limit = self.stall_limit?;
        if let Some((_, at)) = self.probe_pending {
            let waited = now.saturating_duration_since(at);
            if waited >= limit {
                return Some(waited);
            }
        }
        if self.outstanding() >= self.depth {
            self.full_wait.stalled(self.completed, now)
        } else {
            self.full_wait = Stall::new(self.stall_limit);
            None
        }
    }

    /// Fails the link as stalled: work requests neither completed nor failed for `waited`. The
    /// QP goes to the error state, which flushes them (their memory is the connection's own).
    #[cold]
    fn stalled(&mut self, waited: Duration) -> TransportError {
        let d = Dead::failed(format!(
            "no send completion for {:.1} s with {} work requests outstanding: the device neither \
             delivered nor failed them (a stalled link or device; the limit is \
             RSMSG_STALL_TIMEOUT, never below twice the QP's retry bound); the queue pair was \
             moved to the error state",
            waited.as_secs_f64(),
            self.outstanding()
        ));
        tracing::debug!(reason = %d.reason, "verbs link stalled");
        if let Err(e) = self.qp.set_error() {
            tracing::debug!(error = %e, "moving the stalled queue pair to the error state");
        }
        Dead::record(&mut self.dead, d).error()
    }

    /// One turn of a wait on send completions: polls the CQ, and fails the link as stalled once
    /// `stall` has seen nothing complete for its limit.
    fn reap_or_stall(&mut self, stall: &mut Stall) -> Result<(), TransportError> {
        self.reap()?;
        if let Some(waited) = stall.spin(self.completed) {
            return Err(self.stalled(waited));
        }
        std::hint::spin_loop();
        Ok(())
    }

    fn post(&mut self, which: Wr) -> Result<(), TransportError> {
        self.check()?;
        let n = which.len();
        if self.outstanding() + n > self.depth / 2 {
            self.reap()?;
        }
        if matches!(
            which,
            Wr::CreditAndMessage(_) | Wr::Credit | Wr::CreditAndNotice
        ) {
            self.prepare_credit(which)?;
        }
        let mut done = 0u64;
        let mut wait = Stall::new(self.stall_limit);
        loop {
            // A full send queue is back-pressure: signaled work requests complete (or fail) in
            // bounded time, bounded by the QP's retry limits, or the stall limit when the device
            // runs none.
            while self.outstanding() + (n - done) > self.depth {
                self.reap_or_stall(&mut wait)?;
            }
            let seq = self.posted;
            // Selective signaling: the chain's last work request is signaled when the chain
            // covers a multiple of `signal_every` (a signaled completion completes every earlier
            // work request), or when it is the probe.
            let k = self.signal_every;
            let last = seq + (n - done) - 1;
            let signaled = which == Wr::Probe || (last + 1) / k != seq / k;
            let wrs: &mut [SendWr] = match which {
                Wr::Message(i) => &mut self.msg_wrs[i][1..],
                Wr::CreditAndMessage(i) => &mut self.msg_wrs[i][done as usize..],
                Wr::Credit => &mut self.credit_wrs[..1],
                Wr::CreditAndNotice => &mut self.credit_wrs[done as usize..],
                Wr::Probe => std::slice::from_mut(&mut self.probe_wr),
            };
            let count = wrs.len();
            for (j, wr) in wrs.iter_mut().enumerate() {
                wr.set_wr_id(WrId(seq + j as u64))
                    .set_signaled(signaled && j + 1 == count);
            }
            match self.qp.post_send_batch(wrs) {
                Ok(()) => {
                    self.posted += count as u64;
                    if which == Wr::Probe {
                        self.probe_pending = Some((seq, Instant::now()));
                    }
                    return Ok(());
                }
                Err(VerbsError::SendQueueFull { index }) => {
                    // The work requests before `index` were posted (unsignaled unless last).
                    self.posted += index as u64;
                    done += index as u64;
                    self.reap_or_stall(&mut wait)?;
                }
                Err(e) => {
                    let d = Dead::failed(format!("posting a send: {e}"));
                    self.dead = Some(d);
                    return Err(TransportError::Verbs(e));
                }
            }
        }
    }

    /// Points the credit work request of `which` at the pending slots and clears them.
    fn prepare_credit(&mut self, which: Wr) -> Result<(), TransportError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        self.pending_posts = 0;
        let off = p.lo * 8;
        let len = (p.hi - p.lo + 1) * 8;
        let (addr, rkey) = self.peer_mailbox;
        let wr = match which {
            Wr::CreditAndMessage(i) => &mut self.msg_wrs[i][0],
            _ => &mut self.credit_wrs[0],
        };
        wr.set_sge(0, off, len)?;
        wr.set_remote(addr + off as u64, rkey)?;
        for slot in p.lo..=p.hi {
            let word = self.credit_stage.filling(slot * 8, 8)?;
            let v = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
            if let Some(posted) = self.posted_credit.get_mut(slot) {
                *posted = v;
            }
        }
        Ok(())
    }

    /// Stages a credit; returns whether it must be posted now (it moved a quarter segment past
    /// the value last posted) rather than ride on the next post.
    fn stage_credit(&mut self, credit: CreditUpdate) -> Result<bool, TransportError> {
        let slot = credit.segment.index();
        if let Some(p) = self.pending
            && (slot.max(p.hi) - slot.min(p.lo) + 1) * 8 > self.credit_span
        {
            // The range would outgrow one inline write: post what is pending first.
            self.post(Wr::Credit)?;
        }
        self.credit_stage
            .write(slot * 8, &credit.freed.to_le_bytes())?;
        self.pending = Some(match self.pending {
            Some(p) => PendingCredits {
                lo: p.lo.min(slot),
                hi: p.hi.max(slot),
            },
            None => PendingCredits { lo: slot, hi: slot },
        });
        let posted = self.posted_credit.get(slot).copied().unwrap_or(0);
        let urgent = self.urgent.get(slot).copied().unwrap_or(1);
        Ok(credit.freed.saturating_sub(posted) >= urgent)
    }

    /// Posts one work request of the rendezvous (a memory window bind or invalidation) in line
    /// with the others; with `wait`, returns once it has completed.
    fn post_local(&mut self, wr: &mut SendWr, wait: bool) -> Result<(), TransportError> {
        let mut stall = Stall::new(self.stall_limit);
        loop {
            self.check()?;
            while self.outstanding() + 1 > self.depth {
                self.reap_or_stall(&mut stall)?;
            }
            let id = self.posted;
            // Signaled when waited for, or where selective signaling wants one.
            let k = self.signal_every;
            wr.set_wr_id(WrId(id))
                .set_signaled(wait || (id + 1) / k != id / k);
            match self.qp.post_send(wr) {
                Ok(()) => {
                    self.posted += 1;
                    while wait && self.completed <= id {
                        self.reap_or_stall(&mut stall)?;
                    }
                    return Ok(());
                }
                Err(VerbsError::SendQueueFull { .. }) => self.reap_or_stall(&mut stall)?,
                Err(e) => {
                    self.dead = Some(Dead::failed(format!(
                        "posting a memory window operation: {e}"
                    )));
                    return Err(TransportError::Verbs(e));
                }
            }
        }
    }

    /// Why the QP went to the error state, seen from a flushed receive. A send that failed first
    /// says why (its completion precedes the flushes: a peer that vanished gives
    /// `RETRY_EXC_ERR`). When none did, only flushes (`Dead::flushed`): the device refused one
    /// of the peer's requests.
    #[cold]
    fn why_flushed(&mut self) -> Dead {
        while self.dead.as_ref().is_none_or(|d| d.flushed_only) {
            let n = match self.cq.poll(&mut self.wcs) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            for wc in self.wcs[..n].iter().filter(|wc| !wc.is_success()) {
                Dead::record(&mut self.dead, dead_from(wc, "send"));
            }
        }
        self.dead.get_or_insert_with(Dead::flushed).clone()
    }

    /// Runs rendezvous READs on this queue pair and keeps its bookkeeping: our own work requests
    /// complete in order before the READs, which use the next ids; a failed completion of ours
    /// seen meanwhile, or a failed READ, kills the link.
    fn read_jobs(&mut self, jobs: &mut [ReadJob<'_>]) -> Result<(), TransportError> {
        let SendSide {
            qp,
            cq,
            posted,
            completed,
            dead,
            depth,
            stall_limit,
            ..
        } = self;
        let opts = ReadOptions {
            first_wr_id: *posted,
            chunk: RNDV_READ_CHUNK,
            window: (*depth / 2).clamp(1, 16) as u32,
            stall: *stall_limit,
        };
        let mut other_failed: Option<Dead> = None;
        let r = qp.read_many(cq, jobs, opts, |wc| {
            if wc.is_success() {
                *completed = (*completed).max(wc.wr_id().0 + 1);
            } else {
                Dead::record(&mut other_failed, dead_from(wc, "send"));
            }
        });
        match r {
            Ok(n) => {
                *posted += n;
                *completed = *posted;
                if let Some(d) = other_failed {
                    return Err(Dead::record(dead, d).error());
                }
                Ok(())
            }
            Err(e) => {
                let d = other_failed.unwrap_or(Dead::failed(format!("rendezvous read: {e}")));
                Dead::record(dead, d);
                Err(TransportError::Verbs(e))
            }
        }
    }

    /// Posts the pending credits on their own, if any.
    #[inline]
    fn flush_credits(&mut self) -> Result<(), TransportError> {
        if self.pending.is_some() {
            self.post(Wr::Credit)?;
        }
        Ok(())
    }
}

/// The receiving half: the receive CQ, its channel and the re-posted receive WR.
struct RecvSide {
    cq: CompletionQueue,
    channel: CompletionChannel,
    wr: RecvWr,
    wcs: [WorkCompletion; RECV_BATCH],
    /// Immediates polled but not yet handed out, in arrival order (capacity fixed at setup).
    queue: VecDeque<u32>,
    cap: usize,
    armed: bool,
}

impl RecvSide {
    /// Polls the receive CQ once, re-posts one WQE per completion and queues the immediates
    /// (dropping credit notices unless `keep_notices`). Returns how many completions came.
    fn poll(&mut self, tx: &mut SendSide, keep_notices: bool) -> Result<usize, TransportError> {
        let n = self.cq.poll(&mut self.wcs)?;
        for i in 0..n {
            let wc = &self.wcs[i];
            if !wc.is_success() {
                let d = if wc.status() == WcStatus::WR_FLUSH_ERR {
                    tx.why_flushed()
                } else {
                    dead_from(wc, "receive")
                };
                return Err(Dead::record(&mut tx.dead, d).error());
            }
            let imm = match (wc.opcode(), wc.imm()) {
                (WcOpcode::RecvRdmaWithImm, Some(imm)) => imm,
                (op, _) => {
                    let d = Dead::failed(format!(
                        "unexpected receive completion {op:?} from the peer"
                    ));
                    return Err(Dead::record(&mut tx.dead, d).error());
                }
            };
            tx.qp.post_recv(&mut self.wr)?;
            if !keep_notices && matches!(Immediate(imm).decode(), Ok(ImmediateKind::Credit { .. }))
            {
                continue;
            }
            if self.queue.len() >= self.cap {
                let d = Dead::failed("the peer sent more messages than its partitions allow");
                return Err(Dead::record(&mut tx.dead, d).error());
            }
            self.queue.push_back(imm);
        }
        Ok(n)
    }
}

/// The [`Link`] of a verbs connection.
pub struct VerbsLink {
    tx: RefCell<SendSide>,
    rx: RecvSide,
    sources: Vec<SourceImage>,
    mailbox: CreditWords,
    /// The peer sleeps for credits (event/adaptive): every credit is followed by a notice.
    peer_sleeps: bool,
    /// This side gets notices: drain them when posting.
    drain_on_post: bool,
    last_probe: Cell<Instant>,
    device: String,
    /// Rendezvous receive destinations' registrations (transport/rndv.rs).
    rndv_cache: RegCache,
    /// Rendezvous send buffers' registrations and the memory windows bound over them, when
    /// the send cache is on and the device has memory windows (transport/rndv.rs).
    rndv_send: Option<SendCache>,
}

/// The send cache of a verbs link: `MW_BIND` registrations, and idle windows to bind.
struct SendCache {
    regs: RegCache,
    idle: Vec<MemoryWindow>,
}

impl SendCache {
    /// A send cache of `cap` bytes, or `None` for 0 or when the device has no memory windows
    /// (then each transfer registers its buffer with remote read).
    fn new(pd: &ProtectionDomain, cap: usize) -> Option<SendCache> {
        if cap == 0 {
            return None;
        }
        match MemoryWindow::alloc(pd) {
            Ok(mw) => Some(SendCache {
                regs: RegCache::for_send(pd, cap),
                idle: vec![mw],
            }),
            Err(e) => {
                tracing::info!(error = %e, "no memory windows: rendezvous sends register per transfer");
                None
            }
        }
    }
}

impl std::fmt::Debug for VerbsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsLink")
            .field("device", &self.device)
            .field("peer_sleeps", &self.peer_sleeps)
            .finish_non_exhaustive()
    }
}

impl VerbsLink {
    #[inline]
    fn source(&mut self, segment: SegmentId) -> Result<&mut SourceImage, TransportError> {
        self.sources
            .get_mut(segment.index())
            .ok_or_else(|| TransportError::Failed(format!("no peer segment {}", segment.0)))
    }

    /// The device this connection uses.
    pub fn device(&self) -> &str {
        &self.device
    }
}

impl VerbsLink {
    /// The READs of several rendezvous requests, in flight together (see `Link::rndv_read_many`).
    fn read_many(
        &mut self,
        reqs: &[RndvRequest],
        dsts: &mut [&mut [u8]],
    ) -> Result<(), TransportError> {
        let tx = self.tx.get_mut();
        tx.check()?;
        if reqs.len() != dsts.len() || reqs.iter().zip(dsts.iter()).any(|(r, d)| r.len != d.len()) {
            return Err(TransportError::Failed(
                "rendezvous reads: destinations do not match the requests".into(),
            ));
        }
        let mrs = dsts
            .iter_mut()
            .map(|d| self.rndv_cache.get(d))
            .collect::<Result<Vec<_>, _>>()?;
        let mut jobs: Vec<ReadJob<'_>> = mrs
            .iter()
            .zip(dsts.iter_mut())
            .zip(reqs)
            .map(|((mr, dst), r)| ReadJob {
                mr,
                dst,
                remote_addr: r.addr,
                rkey: Rkey(r.rkey),
            })
            .collect();
        tx.read_jobs(&mut jobs)
    }
}

impl Link for VerbsLink {
    #[inline]
    fn write(
        &mut self,
        segment: SegmentId,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransportError> {
        self.source(segment)?.write(offset, bytes)?;
        Ok(())
    }

    #[inline]
    fn fill(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransportError> {
        Ok(self.source(segment)?.filling(offset, len)?)
    }

    #[inline]
    fn post(
        &mut self,
        segment: SegmentId,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> Result<(), TransportError> {
        let i = segment.index();
        let tx = self.tx.get_mut();
        if self.drain_on_post {
            self.rx.poll(tx, false)?;
        }
        let (base, rkey) = *tx
            .remote
            .get(i)
            .ok_or_else(|| TransportError::Failed(format!("no peer segment {}", segment.0)))?;
        let wr = &mut tx.msg_wrs[i][1];
        wr.set_sge(0, offset, len)?;
        wr.set_remote(base + offset as u64, rkey)?;
        wr.set_imm(imm)?;
        // Credits released a while ago ride on this post (one `ibv_post_send`, but one more
        // WRITE on the wire, so not on every message: in a ping-pong that doubled the packets).
        if tx.pending.is_some() {
            tx.pending_posts += 1;
            if tx.pending_posts >= RIDE_AFTER {
                return tx.post(Wr::CreditAndMessage(i));
            }
        }
        tx.post(Wr::Message(i))
    }

    fn next_immediate(
        &mut self,
        mode: PollMode,
        timeout: Option<Duration>,
    ) -> Result<Option<u32>, TransportError> {
        if let Some(imm) = self.rx.queue.pop_front() {
            return Ok(Some(imm));
        }
        let tx = self.tx.get_mut();
        tx.check()?;
        // The clock is read only once the first poll found nothing, and then every
        // `CLOCK_EVERY` polls while spinning: a clock read costs as much as a poll.
        const CLOCK_EVERY: u32 = 64;
        let mut deadline: Option<Option<Instant>> = None;
        let mut spins: u32 = 0;
        let mut polls: u32 = 0;
        loop {
            if self.rx.poll(tx, true)? > 0 {
                tx.idle_polls = 0;
            }
            if let Some(imm) = self.rx.queue.pop_front() {
                return Ok(Some(imm));
            }
            // Nothing to receive. After `IDLE_POLLS` such polls in a row (across calls, so a
            // caller looping on `try_recv` counts too) this side is idle: credits waiting to
            // ride on a post are written now (the peer may need them to send again).
            tx.idle_polls = tx.idle_polls.saturating_add(1);
            if tx.idle_polls == IDLE_POLLS {
                tx.flush_credits()?;
            }
            if timeout == Some(Duration::ZERO) {
                return Ok(None);
            }
            polls = polls.wrapping_add(1);
            let spinning = matches!(mode, PollMode::Busy)
                || matches!(mode, PollMode::Adaptive { spins: limit } if spins < limit);
            if spinning && deadline.is_some() && !polls.is_multiple_of(CLOCK_EVERY) {
                spins = spins.saturating_add(1);
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            let deadline =
                *deadline.get_or_insert_with(|| timeout.and_then(|t| now.checked_add(t)));
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            let sleep = match mode {
                PollMode::Busy => false,
                PollMode::Event => true,
                PollMode::Adaptive { spins: limit } => {
                    spins = spins.saturating_add(1);
                    spins > limit
                }
            };
            if !sleep {
                std::hint::spin_loop();
                continue;
            }
            if !self.rx.armed {
                // Going to sleep: nothing may wait on this side's credits.
                tx.flush_credits()?;
                // Arm, then poll again: a completion that came before arming raises no event.
                self.rx.cq.req_notify(false)?;
                self.rx.armed = true;
                continue;
            }
            let left = deadline.map(|d| d.saturating_duration_since(now));
            if self.rx.channel.wait_readable(left)? {
                // Acknowledged on drop; the CQ is disarmed by the event.
                while let Some(ev) = self.rx.channel.get_event()? {
                    drop(ev);
                    self.rx.armed = false;
                }
            }
        }
    }

    fn publish_credit(&mut self, credit: CreditUpdate) -> Result<(), TransportError> {
        let tx = self.tx.get_mut();
        let urgent = tx.stage_credit(credit)?;
        if self.peer_sleeps {
            // The peer may sleep for this credit: write it now, with its notice, in one post.
            tx.credit_wrs[1].set_imm(credit.notice().get())?;
            tx.post(Wr::CreditAndNotice)
        } else if urgent {
            tx.post(Wr::Credit)
        } else {
            // Rides on a later post, or is written once this side finds nothing to receive
            // for a while, arms its event fd, sleeps or waits for credits itself.
            Ok(())
        }
    }

    fn want_credit_notice(&mut self) {
        // A peer told at setup that we sleep sends a notice with every credit; nothing to
        // announce here. The fence keeps the contract's ordering for the caller's next read.
        fence(Ordering::SeqCst);
    }

    #[inline]
    fn credit(&self, segment: SegmentId) -> u64 {
        self.mailbox
            .load(segment.index())
            .map(u64::from_le)
            .unwrap_or(0)
    }

    fn event_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.rx.channel.as_fd())
    }

    fn arm(&mut self) -> Result<bool, TransportError> {
        if !self.rx.queue.is_empty() {
            return Ok(true);
        }
        let tx = self.tx.get_mut();
        tx.check()?;
        // Going idle: credits waiting for a post are written now.
        tx.flush_credits()?;
        // Reset the fd: read and acknowledge the events that made it readable (each disarms
        // the CQ), then arm the CQ and poll once more, since a completion that came before
        // arming raises no event.
        while let Some(ev) = self.rx.channel.get_event()? {
            drop(ev);
            self.rx.armed = false;
        }
        if !self.rx.armed {
            self.rx.cq.req_notify(false)?;
            self.rx.armed = true;
        }
        self.rx.poll(tx, true)?;
        Ok(!self.rx.queue.is_empty())
    }

    fn check_peer(&self) -> Result<(), TransportError> {
        let Ok(mut tx) = self.tx.try_borrow_mut() else {
            return Ok(());
        };
        tx.check()?;
        // Drain the send CQ, so that a probe not seen complete has not completed.
        while tx.reap()? == SEND_BATCH {}
        tx.flush_credits()?;
        let now = Instant::now();
        if let Some(waited) = tx.stalled_at(now) {
            return Err(tx.stalled(waited));
        }
        if now.duration_since(self.last_probe.get()) >= PROBE_INTERVAL {
            self.last_probe.set(now);
            if tx.probe_pending.is_none() && tx.outstanding() < tx.depth {
                tracing::trace!(posted = tx.posted, "probing the peer");
                tx.post(Wr::Probe)?;
            }
        }
        Ok(())
    }

    // ---- rendezvous (transport/rndv.rs) ----

    fn rndv_expose<'b>(&mut self, buf: &'b [u8]) -> Result<Option<Exposure<'b>>, TransportError> {
        let tx = self.tx.get_mut();
        tx.check()?;
        let Some(sc) = self.rndv_send.as_mut() else {
            let grant = RemoteReadGrant::new(tx.qp.pd(), buf)?;
            return Ok(Some(Exposure::registered(grant)));
        };
        // A cached registration without remote access, and a window with remote read over
        // exactly `buf`: bound by a work request that executes before the request goes out.
        let mr = sc.regs.get_send(buf)?;
        let mut mw = match sc.idle.pop() {
            Some(mw) => mw,
            None => MemoryWindow::alloc(tx.qp.pd())?,
        };
        let rkey = mw.next_rkey();
        let mut wr = SendWr::bind_mw(
            WrId(0),
            &mw,
            rkey,
            &mr,
            buf.as_ptr() as u64,
            buf.len(),
            AccessFlags::REMOTE_READ,
        )?;
        tx.post_local(&mut wr, false)?;
        drop(wr);
        mw.set_rkey(rkey);
        Ok(Some(Exposure::windowed(buf, BoundWindow::new(mw, mr))))
    }

    fn rndv_revoke(&mut self, mut exposure: Exposure<'_>) {
        if let Some(w) = exposure.take_window() {
            let (mw, _mr) = w.into_parts();
            // Invalidate before the buffer's borrow ends: the peer's key is dead when this
            // returns. If that fails (the connection is failing), the window is deallocated,
            // which revokes it as well.
            let mut wr = SendWr::local_inv(WrId(0), mw.rkey());
            let tx = self.tx.get_mut();
            match tx.post_local(&mut wr, true) {
                Ok(()) => {
                    if let Some(sc) = self.rndv_send.as_mut() {
                        sc.idle.push(mw);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "memory window invalidation failed"),
            }
        }
        drop(exposure);
    }

    fn rndv_set_send_cache_cap(&mut self, bytes: usize) {
        let pd = self.tx.get_mut().qp.pd().clone();
        self.rndv_send = SendCache::new(&pd, bytes);
    }

    fn rndv_send_cache_stats(&self) -> Option<RegCacheStats> {
        self.rndv_send.as_ref().map(|sc| sc.regs.stats())
    }

    fn rndv_read(
        &mut self,
        req: &RndvRequest,
        dst: &mut [u8],
        cacheable: bool,
    ) -> Result<Result<(), u32>, TransportError> {
        let tx = self.tx.get_mut();
        tx.check()?;
        let mr = if cacheable {
            self.rndv_cache.get(dst)?
        } else {
            self.rndv_cache.get_uncached(dst)?
        };
        let mut job = [ReadJob {
            mr: &mr,
            dst,
            remote_addr: req.addr,
            rkey: Rkey(req.rkey),
        }];
        tx.read_jobs(&mut job).map(Ok)
    }

    fn rndv_read_many(
        &mut self,
        reqs: &[RndvRequest],
        dsts: &mut [&mut [u8]],
    ) -> Option<Result<(), TransportError>> {
        Some(self.read_many(reqs, dsts))
    }

    fn rndv_set_cache_cap(&mut self, bytes: usize) {
        let pd = self.tx.get_mut().qp.pd().clone();
        self.rndv_cache = RegCache::new(&pd, bytes);
    }

    fn rndv_cache_stats(&self) -> Option<RegCacheStats> {
        Some(self.rndv_cache.stats())
    }

    fn rndv_invalidate(&mut self, addr: u64, len: usize) -> usize {
        let sent = self
            .rndv_send
            .as_mut()
            .map_or(0, |sc| sc.regs.invalidate(addr, len));
        self.rndv_cache.invalidate(addr, len) + sent
    }
}

/// Largest RDMA READ of a rendezvous transfer; longer ones are split (and pipelined).
const RNDV_READ_CHUNK: usize = 1 << 20;

/// Our target segments, read in place.
#[derive(Debug)]
pub struct VerbsTarget {
    segments: Vec<TargetImage>,
}

impl TargetMemory for VerbsTarget {
    #[inline]
    fn bytes(
        &self,
        segment: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&[u8], TransportError> {
        let t = self
            .segments
            .get(segment.index())
            .ok_or_else(|| TransportError::Failed(format!("no target segment {}", segment.0)))?;
        Ok(t.received(offset, len)?)
    }
}

/// Connects `queues` to the peer, stocks the receive queue and builds the connection.
#[allow(clippy::too_many_arguments)] // the parts of a setup, each used once
fn finish(
    pd: &ProtectionDomain,
    mut queues: Queues,
    receiving: Receiving,
    peer: PeerInfo,
    remote_ep: &QpEndpoint,
    recv_layout: &Layout,
    mode: PollMode,
    opts: &VerbsOptions,
) -> Result<VerbsConnection, TransportError> {
    queues.qp.connect(&queues.local, remote_ep, &opts.params)?;
    let mut recv_wr = RecvWr::new(WrId(0));
    for _ in 0..queues.rq_depth {
        queues.qp.post_recv(&mut recv_wr)?;
    }
    let send_tables = Tables::new(peer.hello.layout.clone());
    let mut sources = Vec::with_capacity(send_tables.segments().len());
    let mut msg_wrs = Vec::with_capacity(send_tables.segments().len());
    let mut remote = Vec::with_capacity(send_tables.segments().len());
    let credit_stage = SourceImage::new(pd, MAILBOX_SLOTS * 8)?;
    let credit_wr = || -> Result<SendWr, TransportError> {
        let mut wr = credit_stage.send_wr(SendOp::RdmaWrite, WrId(0), 0, 8)?;
        wr.set_remote(peer.mailbox.addr, Rkey(peer.mailbox.rkey))?;
        Ok(wr)
    };
    for (e, d) in send_tables.segments().iter().zip(&peer.segments) {
        let img = SourceImage::new(pd, e.bytes() as usize)?;
        let mut wr = img.send_wr(
            SendOp::RdmaWriteWithImm,
            WrId(0),
            0,
            e.partition_size as usize,
        )?;
        wr.set_remote(d.addr, Rkey(d.rkey))?;
        msg_wrs.push([credit_wr()?, wr]);
        sources.push(img);
        remote.push((d.addr, Rkey(d.rkey)));
    }
    let mut notice_wr = SendWr::new(SendOp::RdmaWriteWithImm, WrId(0));
    notice_wr.set_remote(peer.mailbox.addr, Rkey(peer.mailbox.rkey))?;
    let credit_wrs = [credit_wr()?, notice_wr];
    // Credits we publish are for the segments of our receive layout.
    let recv_tables = Tables::new(recv_layout.clone());
    let urgent: Vec<u64> = recv_tables
        .segments()
        .iter()
        .map(|s| u64::from((s.partitions / 4).max(1)))
        .collect();
    let posted_credit = vec![0; urgent.len()];
    let credit_span =
        (queues.qp.caps().max_inline_data as usize).clamp(8, MAILBOX_SLOTS * 8) / 8 * 8;
    // The probe writes 8 bytes (inline) into the peer's spare mailbox word, which nobody reads:
    // a transfer with payload always needs the peer's acknowledgement.
    let spare = (MAILBOX_SLOTS - 1) * 8;
    let mut probe_wr = credit_stage.send_wr(SendOp::RdmaWrite, WrId(0), spare, 8)?;
    probe_wr.set_remote(peer.mailbox.addr + spare as u64, Rkey(peer.mailbox.rkey))?;
    let depth = u64::from(queues.qp.caps().max_send_wr.max(8));
    let stall_limit = opts.stall_limit();
    let tx = SendSide {
        qp: queues.qp,
        cq: queues.send_cq,
        wcs: Default::default(),
        msg_wrs,
        remote,
        credit_stage,
        credit_wrs,
        probe_wr,
        pending: None,
        pending_posts: 0,
        idle_polls: 0,
        posted_credit,
        urgent,
        credit_span,
        peer_mailbox: (peer.mailbox.addr, Rkey(peer.mailbox.rkey)),
        depth,
        signal_every: (depth / 4).max(1),
        posted: 0,
        completed: 0,
        probe_pending: None,
        stall_limit,
        full_wait: Stall::new(stall_limit),
        dead: None,
    };
    let cap = queues.rq_depth as usize + RECV_BATCH;
    let rx = RecvSide {
        cq: queues.recv_cq,
        channel: queues.channel,
        wr: recv_wr,
        wcs: Default::default(),
        queue: VecDeque::with_capacity(cap),
        cap,
        armed: false,
    };
    let device = pd.context().device_name().to_string();
    tracing::debug!(
        device,
        qpn = %queues.local.qpn,
        peer_qpn = %remote_ep.qpn,
        rq_depth = queues.rq_depth,
        sq_depth = depth,
        "verbs connection up"
    );
    // A malformed RSMSG_RNDV_* value fails the set-up (naming the variable) rather than
    // silently dropping every rendezvous setting.
    let rndv_env = RndvConfig::from_env()?;
    let link = VerbsLink {
        tx: RefCell::new(tx),
        rx,
        sources,
        mailbox: receiving.mailbox,
        peer_sleeps: peer.hello.mode != PollMode::Busy,
        drain_on_post: mode != PollMode::Busy,
        last_probe: Cell::new(Instant::now()),
        device,
        rndv_cache: RegCache::new(pd, rndv_env.cache_bytes),
        rndv_send: SendCache::new(pd, rndv_env.send_cache_bytes),
    };
    let target = VerbsTarget {
        segments: receiving.targets,
    };
    Ok(Connection::with_rndv(
        link,
        target,
        (peer.hello.layout, recv_layout.clone()),
        mode,
        rndv_env,
    ))
}

// ---------------------------------------------------------------------------------------------
// Listener

/// How many connection requests a listener answers at once; further requests wait at the
/// manager (which bounds its own queue) until one of these completes or fails.
pub const MAX_ANSWERING: usize = 64;

/// How long a listener with handshakes in progress waits on the oldest one before it looks for
/// new requests and at the others again.
const ANSWER_SLICE: Duration = Duration::from_millis(5);

/// A named verbs endpoint registered with a bootstrap manager, accepting connections.
///
/// Handshakes proceed side by side: a request is answered (the second round) as soon as it is
/// taken, and the listener then takes further requests while it waits for each initiator's
/// queue pair (the third round), so an initiator that stalls or dies mid-setup delays no one
/// else; it fails alone at `setup_timeout`.
#[derive(Debug)]
pub struct VerbsListener {
    reg: Registration,
    ctx: Context,
    layout: Layout,
    mode: PollMode,
    opts: VerbsOptions,
    link_layer: LinkLayer,
    /// Requests answered, oldest first, waiting for the initiator's queue pair.
    answering: VecDeque<Answering>,
}

/// A connection request answered with this side's descriptors and queue pair, waiting for the
/// initiator's queue pair.
struct Answering {
    id: RendezvousId,
    peer_name: String,
    pd: ProtectionDomain,
    receiving: Receiving,
    queues: Queues,
    peer: PeerInfo,
    deadline: Instant,
}

impl std::fmt::Debug for Answering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answering")
            .field("id", &self.id)
            .field("peer", &self.peer_name)
            .finish_non_exhaustive()
    }
}

impl Drop for VerbsListener {
    /// Tells the initiators still in a handshake that it is over, rather than leaving them to
    /// their own timeout.
    fn drop(&mut self) {
        // Only over the connection that holds them (never a new one made for this), and not
        // waiting on a manager that does not answer once per handshake: the manager closes the
        // rest when the registration's connection goes.
        for a in std::mem::take(&mut self.answering) {
            if !self.reg.is_connected()
                || self
                    .reg
                    .with_client(|c| c.close(a.id, Side::Listener, "the listener was closed"))
                    .is_err()
            {
                break;
            }
        }
    }
}

impl VerbsListener {
    /// Registers `name` with the manager at `manager` (authenticating with `token`), offering
    /// `layout` for messages sent to us, and opens the device of `opts`.
    ///
    /// # Errors
    /// The manager is unreachable or refuses the name; the device cannot be opened or its port
    /// is not active.
    pub fn bind(
        manager: impl ToSocketAddrs,
        token: Token,
        name: &str,
        layout: Layout,
        mode: PollMode,
        opts: VerbsOptions,
    ) -> Result<Self, TransportError> {
        let info = EndpointInfo {
            name: EndpointName::new(name)
                .map_err(|e| setup_err(name, format!("bad endpoint name: {e}")))?,
            host_id: HostId::local().map_err(|source| TransportError::Io {
                step: "read the host id",
                source,
            })?,
            transports: TransportSet::VERBS,
            shm_socket: None,
        };
        let reg = Registration::new(manager, token, info, opts.setup_timeout)?;
        Self::with_registration(reg, layout, mode, opts)
    }

    /// As [`VerbsListener::bind`], over a registration made by the caller (which must offer
    /// verbs).
    ///
    /// # Errors
    /// The device cannot be opened or its port is not active.
    pub fn with_registration(
        reg: Registration,
        layout: Layout,
        mode: PollMode,
        opts: VerbsOptions,
    ) -> Result<Self, TransportError> {
        let ctx = opts.open()?;
        let link_layer = ctx.active_port(opts.port)?.link_layer;
        Ok(VerbsListener {
            reg,
            ctx,
            layout,
            mode,
            opts,
            link_layer,
            answering: VecDeque::new(),
        })
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        self.reg.info().name.as_str()
    }

    /// Waits for the next connection request and completes its setup. A manager that went
    /// away is waited for (the registration is restored when it is back).
    ///
    /// # Errors
    /// The manager refuses the registration; a peer's request fails validation or setup (the
    /// request is rejected and the listener stays usable).
    pub fn accept(&mut self) -> Result<VerbsConnection, TransportError> {
        loop {
            match self.accept_timeout(Duration::from_secs(60)) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(TransportError::Bootstrap(e)) if e.is_unreachable() => {
                    tracing::debug!(error = %e, "manager unreachable; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits at most `timeout` for a connection to complete its setup; `Ok(None)` when none
    /// did. Requests taken meanwhile stay in progress for the next call.
    ///
    /// # Errors
    /// As [`VerbsListener::accept`] (one failed request each time), and an unreachable manager
    /// (the handshakes in progress are then abandoned: their rendezvous died with the manager
    /// connection).
    pub fn accept_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<VerbsConnection>, TransportError> {
        let deadline = Instant::now().checked_add(timeout);
        let left = || {
            deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            })
        };
        loop {
            // Initiators that answered (or failed, or ran out of time) since the last look.
            if let Some(done) = self.poll_answering(Duration::ZERO, false) {
                return done.map(Some);
            }
            // New requests: wait for one only when no handshake is in progress.
            if self.answering.len() < MAX_ANSWERING {
                let wait = if self.answering.is_empty() {
                    left()
                } else {
                    Duration::ZERO
                };
                let name = self.reg.info().name.clone();
                if let Some(incoming) = self.manager(|c| c.wait_connect(&name, wait))? {
                    self.begin(incoming)?;
                    if left().is_zero() {
                        return Ok(None);
                    }
                    continue;
                }
            }
            let left = left();
            if left.is_zero() {
                return Ok(None);
            }
            // Handshakes in progress: wait a little on the oldest (the manager answers at
            // once when its queue pair arrives), then look at everything again.
            if let Some(done) = self.poll_answering(left.min(ANSWER_SLICE), true) {
                return done.map(Some);
            }
        }
    }

    /// Runs `f` on the registration's manager connection (reconnecting and registering again
    /// first if it was lost). A lost connection abandons the handshakes in progress: their
    /// rendezvous went with it.
    fn manager<T>(
        &mut self,
        f: impl FnOnce(&mut ManagerClient) -> Result<T, BootstrapError>,
    ) -> Result<T, BootstrapError> {
        let r = self.reg.with_client(f);
        if let Err(e) = &r
            && e.is_unreachable()
            && !self.answering.is_empty()
        {
            tracing::warn!(
                abandoned = self.answering.len(),
                error = %e,
                "lost the manager with handshakes in progress"
            );
            self.answering.clear();
        }
        r
    }

    /// Takes a request: validates the offer, creates this side's resources and sends the
    /// answer (the second round). A failed request is closed with the reason and returned.
    fn begin(&mut self, incoming: Incoming) -> Result<(), TransportError> {
        let id = incoming.id;
        match self.answer(incoming) {
            Ok(a) => {
                self.answering.push_back(a);
                Ok(())
            }
            Err(e) => {
                self.close_rendezvous(id, &e.to_string());
                Err(e)
            }
        }
    }

    fn answer(&mut self, incoming: Incoming) -> Result<Answering, TransportError> {
        let peer_name = incoming.from.name.to_string();
        let peer = check_descriptors(&incoming.offer, &peer_name)?;
        if incoming.offer.qp.is_some() {
            return Err(setup_err(
                &peer_name,
                "queue pair offered in the first round",
            ));
        }
        // A protection domain per connection, as on the initiator's side: the keys a peer holds
        // (its target segments, mailbox, rendezvous buffers offered to it) then work only through
        // its own queue pair, never through another peer's connection to this listener.
        let pd = ProtectionDomain::new(&self.ctx)?;
        let receiving = Receiving::create(&pd, &self.layout)?;
        let queues = Queues::create(&self.ctx, &pd, &self.opts, &self.layout, &peer.hello.layout)?;
        let hello = Hello {
            mode: self.mode,
            link_layer: self.link_layer,
            layout: self.layout.clone(),
        };
        let mut answer = receiving.descriptors(&self.layout, &hello);
        answer.qp = Some(qp_info(&queues.local));
        let id = incoming.id;
        self.manager(|c| c.send(id, Side::Listener, &answer))?;
        Ok(Answering {
            id,
            peer_name,
            pd,
            receiving,
            queues,
            peer,
            deadline: Instant::now() + self.opts.setup_timeout,
        })
    }

    /// Looks whether a handshake in progress can finish: the oldest is waited on for up to
    /// `wait`, the others (unless `oldest_only`) are only looked at. Returns the first that
    /// finished, connected or failed, its rendezvous closed; `None` when none did.
    fn poll_answering(
        &mut self,
        wait: Duration,
        oldest_only: bool,
    ) -> Option<Result<VerbsConnection, TransportError>> {
        let n = if oldest_only {
            self.answering.len().min(1)
        } else {
            self.answering.len()
        };
        for i in 0..n {
            let id = self.answering[i].id;
            let wait = if i == 0 { wait } else { Duration::ZERO };
            let got = match self.manager(|c| c.recv(id, Side::Listener, wait)) {
                Ok(Some(theirs)) => Ok(theirs),
                Ok(None) if Instant::now() >= self.answering[i].deadline => Err(setup_err(
                    &self.answering[i].peer_name,
                    "no queue pair in time",
                )),
                Ok(None) => continue,
                // Every handshake was abandoned with the connection.
                Err(e) if e.is_unreachable() => return Some(Err(e.into())),
                Err(e) => Err(e.into()),
            };
            let a = self.answering.remove(i)?;
            let r = got.and_then(|theirs| self.complete(a, theirs));
            return Some(self.closed(id, r));
        }
        None
    }

    /// The third and fourth rounds: connects the queue pair to the initiator's and says ready.
    fn complete(
        &mut self,
        a: Answering,
        theirs: Descriptors,
    ) -> Result<VerbsConnection, TransportError> {
        let info = theirs
            .qp
            .ok_or_else(|| setup_err(&a.peer_name, "third round without a queue pair"))?;
        let ep = qp_endpoint(&info, a.peer.hello.link_layer, &a.peer_name)?;
        let conn = finish(
            &a.pd,
            a.queues,
            a.receiving,
            a.peer,
            &ep,
            &self.layout,
            self.mode,
            &self.opts,
        )?;
        let ready = Descriptors {
            opaque: READY.to_vec(),
            ..Descriptors::default()
        };
        self.manager(|c| c.send(a.id, Side::Listener, &ready))?;
        Ok(conn)
    }

    /// Closes the rendezvous of a finished handshake, saying why.
    fn closed(
        &mut self,
        id: RendezvousId,
        r: Result<VerbsConnection, TransportError>,
    ) -> Result<VerbsConnection, TransportError> {
        let reason = match &r {
            Ok(_) => "connected".to_string(),
            Err(e) => e.to_string(),
        };
        self.close_rendezvous(id, &reason);
        r
    }

    /// Closes this side of a rendezvous, best effort; not when the manager connection was
    /// lost (the rendezvous went with it, and a new connection may not touch it).
    fn close_rendezvous(&mut self, id: RendezvousId, reason: &str) {
        if self.reg.is_connected() {
            let _ = self.manager(|c| c.close(id, Side::Listener, reason));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Initiator

static INITIATOR_SEQ: AtomicU64 = AtomicU64::new(0);

/// Connects to the endpoint `name` registered with the manager at `manager`, offering `layout`
/// for messages sent to us. A name not (yet) registered, a manager not (yet) reachable, or a
/// request the manager refused for its load (`LimitExceeded`: say, as many connection requests
/// already wait for that listener as it queues) is retried until `opts.setup_timeout`.
///
/// # Errors
/// No such endpoint in time, a refused or failed setup, a device error.
pub fn connect(
    manager: impl ToSocketAddrs,
    token: &Token,
    name: &str,
    layout: Layout,
    mode: PollMode,
    opts: &VerbsOptions,
) -> Result<VerbsConnection, TransportError> {
    let addrs: Vec<_> = manager
        .to_socket_addrs()
        .map_err(|source| TransportError::Io {
            step: "resolve the manager address",
            source,
        })?
        .collect();
    let deadline = Instant::now() + opts.setup_timeout;
    loop {
        let r = ManagerClient::connect(&addrs[..], token, opts.setup_timeout)
            .map_err(TransportError::from)
            .and_then(|mut c| connect_with(&mut c, name, layout.clone(), mode, opts));
        match r {
            Err(TransportError::Bootstrap(e)) if retryable(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, "manager or endpoint not there yet, or busy; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

fn retryable(e: &BootstrapError) -> bool {
    e.is_unreachable()
        || matches!(
            e.code(),
            Some(ErrorCode::UnknownName | ErrorCode::LimitExceeded)
        )
}

/// As [`connect`], over a manager connection the caller holds (no retry).
///
/// # Errors
/// As [`connect`].
pub fn connect_with(
    client: &mut ManagerClient,
    name: &str,
    layout: Layout,
    mode: PollMode,
    opts: &VerbsOptions,
) -> Result<VerbsConnection, TransportError> {
    let to = EndpointName::new(name).map_err(|e| setup_err(name, format!("bad name: {e}")))?;
    let ctx = opts.open()?;
    let pd = ProtectionDomain::new(&ctx)?;
    let link_layer = ctx.active_port(opts.port)?.link_layer;
    let receiving = Receiving::create(&pd, &layout)?;
    let hello = Hello {
        mode,
        link_layer,
        layout: layout.clone(),
    };
    let offer = receiving.descriptors(&layout, &hello);
    let from = EndpointInfo {
        name: EndpointName::new(format!(
            "init-{}-{}",
            std::process::id(),
            INITIATOR_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
        .map_err(|e| setup_err(name, format!("initiator name: {e}")))?,
        host_id: HostId::local().map_err(|source| TransportError::Io {
            step: "read the host id",
            source,
        })?,
        transports: TransportSet::VERBS,
        shm_socket: None,
    };
    let t = opts.setup_timeout;
    let (id, answer) = client.dial(&from, &to, &offer, t)?;
    let r = (|| {
        let peer = check_descriptors(&answer, name)?;
        let info = answer
            .qp
            .ok_or_else(|| setup_err(name, "answer without a queue pair"))?;
        let ep = qp_endpoint(&info, peer.hello.link_layer, name)?;
        let queues = Queues::create(&ctx, &pd, opts, &layout, &peer.hello.layout)?;
        let ours = Descriptors {
            qp: Some(qp_info(&queues.local)),
            ..Descriptors::default()
        };
        let conn = finish(&pd, queues, receiving, peer, &ep, &layout, mode, opts)?;
        client.send(id, Side::Initiator, &ours)?;
        let ready = client
            .recv(id, Side::Initiator, t)?
            .ok_or_else(|| setup_err(name, "the listener did not confirm in time"))?;
        if ready.opaque != READY || ready.qp.is_some() || !ready.segments.is_empty() {
            return Err(setup_err(name, "bad confirmation from the listener"));
        }
        Ok(conn)
    })();
    let reason = match &r {
        Ok(_) => "connected".to_string(),
        Err(e) => e.to_string(),
    };
    let _ = close_rendezvous(client, id, &reason);
    r
}

fn close_rendezvous(
    client: &mut ManagerClient,
    id: RendezvousId,
    reason: &str,
) -> Result<(), BootstrapError> {
    client.close(id, Side::Initiator, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            mode: PollMode::Adaptive { spins: 77 },
            link_layer: LinkLayer::Ethernet,
            layout: "256:16:4,4k:8:2:2".parse().unwrap(),
        }
    }

    /// A flush is a consequence: the first real cause replaces it, whenever it is seen, and is
    /// never replaced itself.
    #[test]
    fn a_flush_stands_only_until_a_cause_is_seen() {
        let gone = Dead {
            peer_gone: true,
            ..Dead::failed("send completion failed: retry exceeded")
        };
        let mut slot = None;
        let e = Dead::record(&mut slot, Dead::flushed()).error();
        assert!(
            matches!(e, TransportError::Failed(r) if r.contains("refused a request of the peer"))
        );
        assert!(matches!(
            Dead::record(&mut slot, Dead::flushed()).error(),
            TransportError::Failed(_)
        ));
        assert!(matches!(
            Dead::record(&mut slot, gone.clone()).error(),
            TransportError::PeerClosed
        ));
        let e = Dead::record(&mut slot, Dead::failed("later")).error();
        assert!(matches!(e, TransportError::PeerClosed), "{e:?}");
        let e = Dead::record(&mut slot, Dead::flushed()).error();
        assert!(matches!(e, TransportError::PeerClosed), "{e:?}");

        let mut slot = Some(Dead::failed("first"));
        let e = Dead::record(&mut slot, gone).error();
        assert!(
            matches!(&e, TransportError::Failed(r) if r == "first"),
            "{e:?}"
        );
    }

    #[test]
    fn hello_roundtrip_and_rejects() {
        let h = hello();
        let b = h.encode();
        assert_eq!(Hello::decode(&b, "p").unwrap(), h);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b[..10].to_vec(), "too short"),
            (
                {
                    let mut x = b.clone();
                    x[0] = b'X';
                    x
                },
                "bad magic",
            ),
            (
                {
                    let mut x = b.clone();
                    x[4] = 9;
                    x
                },
                "version",
            ),
            (
                {
                    let mut x = b.clone();
                    x[6] = 3;
                    x
                },
                "poll mode",
            ),
            (
                {
                    let mut x = b.clone();
                    x[6] = 0;
                    x
                },
                "poll mode",
            ),
            (
                {
                    let mut x = b.clone();
                    x[7] = 7;
                    x
                },
                "link layer",
            ),
            (
                {
                    let mut x = b.clone();
                    x.push(b'1');
                    x
                },
                "does not match",
            ),
            (
                {
                    let mut x = b.clone();
                    x[HELLO_FIXED] = b'x';
                    x
                },
                "layout",
            ),
        ];
        for (bytes, what) in cases {
            match Hello::decode(&bytes, "p") {
                Err(TransportError::Handshake { reason, .. }) => {
                    assert!(reason.contains(what), "{reason:?} should mention {what:?}")
                }
                other => panic!("expected a handshake error about {what}, got {other:?}"),
            }
        }
    }

    fn descriptors(h: &Hello) -> Descriptors {
        let tables = Tables::new(h.layout.clone());
        Descriptors {
            qp: None,
            mailbox: Some(MailboxDescriptor {
                addr: 0x1000,
                rkey: 5,
                len: (MAILBOX_SLOTS * 8) as u32,
            }),
            segments: tables
                .segments()
                .iter()
                .map(|e| SegmentDescriptor {
                    segment_id: e.id.0,
                    group: e.group.0,
                    addr: 0x10_0000 * (1 + u64::from(e.id.0)),
                    len: e.bytes(),
                    rkey: 9,
                    partition_size: e.partition_size,
                    partition_count: e.partitions,
                    span_factor: e.span,
                })
                .collect(),
            opaque: h.encode(),
        }
    }

    #[test]
    fn descriptors_checked_against_the_layout() {
        let h = hello();
        let good = descriptors(&h);
        let p = check_descriptors(&good, "p").unwrap();
        assert_eq!(p.segments.len(), 3);
        assert_eq!(p.hello, h);

        let mut d = good.clone();
        d.segments.pop();
        assert!(check_descriptors(&d, "p").is_err(), "missing segment");
        let mut d = good.clone();
        d.segments[1].len -= 1;
        assert!(check_descriptors(&d, "p").is_err(), "short segment");
        let mut d = good.clone();
        d.segments[2].partition_count = 4;
        assert!(check_descriptors(&d, "p").is_err(), "count mismatch");
        let mut d = good.clone();
        d.mailbox = None;
        assert!(check_descriptors(&d, "p").is_err(), "no mailbox");
        let mut d = good.clone();
        d.mailbox.as_mut().unwrap().len = 8;
        assert!(check_descriptors(&d, "p").is_err(), "small mailbox");
        let mut d = good;
        d.opaque.truncate(4);
        assert!(check_descriptors(&d, "p").is_err(), "truncated hello");
    }

    #[test]
    fn qp_info_roundtrip() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[10, 77, 0, 1]);
        let ep = QpEndpoint {
            qpn: QpNum(0x123),
            psn: Psn::new(0x42).unwrap(),
            gid: Gid(g),
            gid_index: GidIndex(1),
            lid: 0,
            mtu: Mtu::Mtu1024,
            port: 1,
            link_layer: LinkLayer::Ethernet,
        };
        assert_eq!(
            qp_endpoint(&qp_info(&ep), LinkLayer::Ethernet, "p").unwrap(),
            ep
        );
        let mut bad = qp_info(&ep);
        bad.mtu = 1000;
        assert!(qp_endpoint(&bad, LinkLayer::Ethernet, "p").is_err());
        let mut bad = qp_info(&ep);
        bad.gid = [0; 16];
        assert!(qp_endpoint(&bad, LinkLayer::Ethernet, "p").is_err());
    }
}
