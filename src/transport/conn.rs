//! The connection: one [`Sender`] and one [`Receiver`] of the core driven over a [`Link`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::rndv::RndvInner;
use super::{Link, PollMode, TargetMemory, TransportError};
use crate::core::wire::{HEADER_LEN, Immediate, ImmediateKind, reconstruct_freed};
use crate::core::{
    ControlMessage, Delivery, Layout, MessageKind, ProtocolError, Receiver, ReceiverStats,
    ReleaseToken, ReserveError, RndvConfig, Sender, SenderStats, close_reason,
};

/// How long a receive may wait.
#[derive(Debug, Clone, Copy)]
pub(super) enum Wait {
    /// Not at all.
    No,
    /// Until something arrives.
    Forever,
    /// At most this long.
    For(Duration),
    /// Until this instant: a [`Wait::For`] once its clock started ([`Inner::next_arrival_by`]),
    /// so a call that loops over arrivals keeps one deadline.
    Until(Instant),
}

/// The header that came beside an immediate ([`Link::header_with_immediate`]), if any.
type InlineHeader = Option<[u8; HEADER_LEN]>;

/// How long a blocking wait sleeps before it looks at the peer's liveness again.
const LIVENESS_SLICE: Duration = Duration::from_millis(50);

/// Polls a busy receive makes on its direct path ([`Connection::recv_direct`]) before the
/// general wait, with its clock and liveness checks, takes over: a few microseconds.
const DIRECT_POLLS: u32 = 4096;

/// Why a send did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No partition is free for the message now (the receiver has not released enough):
    /// back-pressure. Nothing was written; retry later, or use a blocking send.
    #[error("no free partitions for now (back-pressure)")]
    WouldBlock,
    /// The message is larger than any segment group carries eagerly and cannot go by rendezvous
    /// (filled in place with [`Connection::send_with`], or a link without rendezvous).
    #[error("message of {len} bytes exceeds the largest eager message of {max} bytes")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload the groups carry.
        max: usize,
    },
    /// The receiver refused a rendezvous message (longer than it accepts, its buffer too short,
    /// or it cannot read ours); the connection stays usable and the buffer is ours again.
    #[error("the receiver refused the message of {len} bytes: {}", crate::core::refuse_reason::describe(*.reason))]
    Refused {
        /// Payload length.
        len: usize,
        /// A [`crate::core::refuse_reason`] code.
        reason: u32,
    },
    /// The connection failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Counters of one connection, cheap to copy.
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    /// Sending side (messages, bytes, stalls, per group).
    pub sender: SenderStats,
    /// Receiving side (messages, bytes, partitions in use, per group).
    pub receiver: ReceiverStats,
}

pub(super) struct Inner<L> {
    pub(super) link: L,
    pub(super) tx: Sender,
    pub(super) rx: Receiver,
    pub(super) mode: PollMode,
    /// Immediates taken from the link while waiting for credits, in arrival order, each with
    /// the header that came beside it. Also, for the rest of one receive call, the arrival
    /// that call's direct path took and handed over ([`Connection::recv_direct`]), which may
    /// be a credit notice.
    stash: VecDeque<(u32, InlineHeader)>,
    /// At most this many: a peer within the protocol cannot exceed it (see [`Inner::stash`]).
    stash_cap: usize,
    failed: Option<String>,
    /// The last non-blocking send met back-pressure: [`Connection::arm`] then also asks for a
    /// credit notice.
    want_credit: bool,
    /// Rendezvous state (transport/rndv.rs).
    pub(super) rndv: RndvInner,
}

/// What a receive produced: a message, or (rendezvous into a caller's buffer) a length.
pub(super) enum Got<'a, L: Link, T: TargetMemory> {
    Msg(Message<'a, L, T>),
    Landed(usize),
}

/// A connection to one peer over a transport: bidirectional, messages in order.
///
/// # Thread safety
/// A connection is `Send` (when its link is) but not `Sync`: use it from one thread at a time.
/// Received [`Message`]s borrow it, so several can be held at once and released in any order.
pub struct Connection<L: Link, T: TargetMemory> {
    pub(super) target: T,
    /// A duplicate of the link's event fd (same open file), outside the `RefCell` so that it can
    /// be lent out; `None` in busy mode or for a link without one.
    event: Option<OwnedFd>,
    pub(super) inner: RefCell<Inner<L>>,
}

impl<L: Link, T: TargetMemory> fmt::Debug for Connection<L, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl<L: Link, T: TargetMemory> Connection<L, T> {
    /// Joins a link to the core. `send_layout` is the peer's receive layout (the target segments
    /// we write into), `recv_layout` ours.
    ///
    /// The rendezvous settings come from the environment (`RSMSG_RNDV_*`); a malformed value is
    /// logged and the defaults are used. The transports parse it during set-up, fail on a
    /// malformed value, and pass what they read to the connection they build.
    pub fn new(
        link: L,
        target: T,
        send_layout: Layout,
        recv_layout: Layout,
        mode: PollMode,
    ) -> Self {
        let rndv = RndvConfig::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the rendezvous environment");
            RndvConfig::default()
        });
        Self::with_rndv(link, target, (send_layout, recv_layout), mode, rndv)
    }

    /// As [`Connection::new`], with these rendezvous settings: (`send_layout`, `recv_layout`).
    pub(crate) fn with_rndv(
        link: L,
        target: T,
        (send_layout, recv_layout): (Layout, Layout),
        mode: PollMode,
        rndv: RndvConfig,
    ) -> Self {
        let stash_cap = Layout::recv_wqe_bound_for(&recv_layout, &send_layout) as usize;
        crate::copy::calibrate();
        let event = match mode {
            PollMode::Busy => None,
            PollMode::Event | PollMode::Adaptive { .. } => {
                link.event_fd().and_then(|fd| fd.try_clone_to_owned().ok())
            }
        };
        let rndv = RndvInner::new(send_layout.max_eager_payload(), rndv);
        Connection {
            target,
            event,
            inner: RefCell::new(Inner {
                link,
                tx: Sender::new(send_layout),
                rx: Receiver::new(recv_layout),
                mode,
                stash: VecDeque::with_capacity(stash_cap),
                stash_cap,
                failed: None,
                want_credit: false,
                rndv,
            }),
        }
    }

    /// Re-types the connection with a wider link and target type (e.g. the enum over every
    /// transport); nothing about its state changes.
    pub fn convert<L2, T2>(self) -> Connection<L2, T2>
    where
        L2: Link + From<L>,
        T2: TargetMemory + From<T>,
    {
        let inner = self.inner.into_inner();
        Connection {
            target: T2::from(self.target),
            event: self.event,
            inner: RefCell::new(Inner {
                link: L2::from(inner.link),
                tx: inner.tx,
                rx: inner.rx,
                mode: inner.mode,
                stash: inner.stash,
                stash_cap: inner.stash_cap,
                failed: inner.failed,
                want_credit: inner.want_credit,
                rndv: inner.rndv,
            }),
        }
    }

    /// The largest payload one message carries eagerly (through partitions). Longer messages
    /// go by rendezvous on links that have it (see [`Connection::switch_point`]).
    pub fn max_message(&self) -> usize {
        self.inner.borrow().tx.max_eager_payload()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ConnectionStats {
        let inner = self.inner.borrow();
        ConnectionStats {
            sender: inner.tx.stats().clone(),
            receiver: inner.rx.stats().clone(),
        }
    }

    /// Sends `msg` if partitions are free now; never waits for credits. A message above the
    /// [switch point](Connection::switch_point) goes by rendezvous, which waits for the receiver
    /// to read it ([`Connection::send_start`] is the non-blocking form).
    ///
    /// # Errors
    /// [`SendError::WouldBlock`] under back-pressure, [`SendError::TooLarge`],
    /// [`SendError::Transport`] if the connection failed.
    #[inline]
    pub fn try_send(&self, msg: &[u8]) -> Result<(), SendError> {
        self.try_send_vectored(&[msg])
    }

    /// Sends the concatenation of `parts` as one message if partitions are free now.
    ///
    /// # Errors
    /// As [`Connection::try_send`].
    #[inline]
    pub fn try_send_vectored(&self, parts: &[&[u8]]) -> Result<(), SendError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        // ---- rendezvous branch (transport/rndv.rs): above the switch point ----
        if len > inner.rndv.switch {
            drop(inner);
            return self.send_large(parts);
        }
        let r = inner.send_parts(parts, len);
        inner.want_credit = matches!(r, Err(SendError::WouldBlock));
        inner.note(r)
    }

    /// The file descriptor to wait on in an event loop (`poll`, `epoll`, mio, tokio's
    /// `AsyncFd`): it becomes readable when a message (or a credit) may have arrived, once
    /// [`Connection::arm`] returned `false`. Shared memory: an eventfd the peer signals; verbs:
    /// the completion channel of the receive CQ. `None` in [`PollMode::Busy`] (the peer then
    /// never signals; create the connection in [`PollMode::Event`] for event loops).
    ///
    /// The protocol, from one thread:
    /// 1. take messages with [`Connection::try_recv`] until it returns `Ok(None)` (and send with
    ///    [`Connection::try_send`]);
    /// 2. call [`Connection::arm`]; if it returns `true`, something is already there: go to 1;
    /// 3. otherwise wait until the fd is readable (level- or edge-triggered both work: `arm`
    ///    resets it), then go to 1.
    ///
    /// A `try_send` that met back-pressure makes the next `arm` also ask the peer for a credit
    /// notice, so a readable fd may mean "retry the send". Blocking calls (`recv`, `send`)
    /// may be mixed in; they leave the fd as it was or readable, never missing a wake-up.
    pub fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.event.as_ref().map(|fd| fd.as_fd())
    }

    /// Prepares a wait on [`Connection::event_fd`] (see there for the protocol): resets the
    /// fd, announces the wait to the peer (and, after a `try_send` that met back-pressure,
    /// asks for a credit notice), then checks once more. Returns `true` when something
    /// already arrived (do not wait: receive, or retry the send), `false` when the wait may
    /// begin. Without an event fd (busy mode) it returns `true`.
    ///
    /// # Errors
    /// A failed connection, a peer that went away.
    pub fn arm(&self) -> Result<bool, TransportError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        if self.event.is_none() || !inner.stash.is_empty() {
            return Ok(true);
        }
        if inner.want_credit || inner.answers_waiting() {
            inner.link.want_credit_notice();
            if inner.credit_news() {
                return Ok(true);
            }
        }
        match inner.link.arm() {
            Ok(ready) => Ok(ready),
            Err(e) => Err(inner.fail(e)),
        }
    }

    /// Sends `msg`, waiting for credits while the receiver holds every partition.
    ///
    /// A blocking send waits for the peer application to release messages: two peers that
    /// only ever block in `send` towards each other can wait forever; interleave `try_send` and
    /// receives for such patterns.
    ///
    /// A message above the [switch point](Connection::switch_point) goes by rendezvous: the
    /// receiver reads it straight from `msg`, and `send` returns once it has (the buffer may
    /// then be freed or reused). The receiving application must be receiving for that to happen.
    ///
    /// # Errors
    /// [`SendError::TooLarge`] (only on a link without rendezvous), [`SendError::Refused`],
    /// [`SendError::Transport`] (including a peer that went away).
    #[inline]
    pub fn send(&self, msg: &[u8]) -> Result<(), SendError> {
        self.send_vectored(&[msg])
    }

    /// Blocking form of [`Connection::try_send_vectored`].
    ///
    /// # Errors
    /// As [`Connection::send`].
    #[inline]
    pub fn send_vectored(&self, parts: &[&[u8]]) -> Result<(), SendError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        // ---- rendezvous branch (transport/rndv.rs): above the switch point ----
        if len > inner.rndv.switch {
            drop(inner);
            return self.send_large(parts);
        }
        // ---- eager ----
        loop {
            match inner.send_parts(parts, len) {
                // Returned at once rather than through `note`: the error type is 64 bytes, and
                // moving it around is a measurable share of a small message's cost.
                Ok(()) => return Ok(()),
                Err(SendError::WouldBlock) => {
                    let r = inner.wait_credit_giving_back(&self.target);
                    inner.note(r.map_err(SendError::from))?;
                }
                Err(e) => return inner.note(Err(e)),
            }
        }
    }

    /// A message above the switch point: one buffer goes by rendezvous from where it is; several
    /// parts are gathered into one buffer first (one copy).
    fn send_large(&self, parts: &[&[u8]]) -> Result<(), SendError> {
        match parts {
            [one] => self.send_rndv(one),
            _ => self.send_rndv(&parts.concat()),
        }
    }

    /// The eager path of [`Connection::send`], whatever the switch point says.
    pub(super) fn send_eager(&self, msg: &[u8]) -> Result<(), SendError> {
        let mut inner = self.inner.borrow_mut();
        loop {
            match inner.send_parts(&[msg], msg.len()) {
                Err(SendError::WouldBlock) => {
                    let r = inner.wait_credit_giving_back(&self.target);
                    inner.note(r.map_err(SendError::from))?;
                }
                r => return inner.note(r),
            }
        }
    }

    /// Fills a message of `len` bytes in place in the source image (zero-copy send): `fill`
    /// gets the payload bytes; the message is sent when it returns. Waits for credits like
    /// [`Connection::send`].
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub fn send_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), SendError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        let res = loop {
            match inner.reserve(MessageKind::Data, len) {
                Err(SendError::WouldBlock) => {
                    let r = inner.wait_credit_giving_back(&self.target);
                    inner.note(r.map_err(SendError::from))?;
                }
                Err(e) => return inner.note(Err(e)),
                Ok(res) => break res,
            }
        };
        let r = (|| {
            let header = res.wire_header();
            if !header.is_empty() {
                inner.link.write(res.segment, res.offset, header)?;
            }
            fill(inner.link.fill(res.segment, res.payload_offset(), len)?);
            inner
                .link
                .post(res.segment, res.offset, res.wire_len(), res.immediate.get())
        })();
        inner.note(r.map_err(SendError::from))
    }

    /// Takes the next message if one has arrived; never waits.
    ///
    /// It also does a bounded amount of work: after a receive queue's worth of arrivals that
    /// brought no message (credit notices, control messages), it returns `Ok(None)` and leaves
    /// the rest, in order, for the next call, so a peer that keeps ringing cannot hold it.
    /// What is left still counts for [`Connection::arm`], which then returns `true`.
    ///
    /// One exception to "never waits": a rendezvous message it takes is answered (*done*, or a
    /// refusal) before it returns, and the answer travels in the peer's partitions. If they all
    /// hold messages of ours that the peer's application has not received, the call waits until
    /// one is free: until the peer receives, or waits for a transfer of its own (which gives
    /// partitions back, `docs/rendezvous.md`). Deferring the answer instead would leave the
    /// peer's send waiting on this side calling again.
    ///
    /// # Errors
    /// A protocol violation by the peer (the connection is then failed), a peer that closed.
    pub fn try_recv(&self) -> Result<Option<Message<'_, L, T>>, TransportError> {
        self.recv_msg(Wait::No)
    }

    /// Waits for the next message.
    ///
    /// # Errors
    /// As [`Connection::try_recv`].
    pub fn recv(&self) -> Result<Message<'_, L, T>, TransportError> {
        match self.recv_msg(Wait::Forever)? {
            Some(m) => Ok(m),
            None => Err(TransportError::Failed(
                "receive ended without a message".into(),
            )),
        }
    }

    /// Waits at most `timeout` for the next message.
    ///
    /// # Errors
    /// [`TransportError::Timeout`] when nothing came, otherwise as [`Connection::try_recv`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Message<'_, L, T>, TransportError> {
        match self.recv_msg(Wait::For(timeout)) {
            Ok(Some(m)) => Ok(m),
            // Whichever part of the call timed out (waiting for an arrival, or for a stream's
            // chunks against the deadline the call started), it reports the caller's timeout.
            Ok(None) | Err(TransportError::Timeout(_)) => Err(TransportError::Timeout(timeout)),
            Err(e) => Err(e),
        }
    }

    /// Receives the next message into `buf` and releases its partitions at once. Returns the
    /// message length. An eager message is copied; a rendezvous message is read straight into
    /// `buf` (zero copy).
    ///
    /// # Errors
    /// As [`Connection::recv`]. A message longer than `buf`:
    /// - an eager message (already in this side's memory) is not delivered:
    ///   [`TransportError::BufferTooShort`] gives its length, and it stays queued, copied out of
    ///   its partitions, for the next receive (as the C API's `rsmsg_recv` keeps it);
    /// - a rendezvous message (not answered yet, whether read in place or streamed through the
    ///   segments) is refused: [`TransportError::RendezvousRefused`] with reason no room, and
    ///   its sender's send fails with [`SendError::Refused`].
    ///
    /// The connection stays usable either way.
    pub fn recv_into(&self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mut m = match self.recv_until(Wait::Forever, Some(&mut *buf))? {
            Some(Got::Msg(m)) => m,
            Some(Got::Landed(n)) => return Ok(n),
            None => {
                return Err(TransportError::Failed(
                    "receive ended without a message".into(),
                ));
            }
        };
        let n = m.len();
        if n > buf.len() {
            // Kept for the next receive, ahead of everything that came after it.
            let data = m.owned.take().unwrap_or_else(|| m.data.to_vec());
            let token = m.token.take();
            let seq = m.seq;
            drop(m);
            let mut inner = self.inner.borrow_mut();
            if let Some(t) = token
                && let Err(e) = inner.release(t)
            {
                return Err(inner.fail(e));
            }
            inner.requeue(data, seq);
            return Err(TransportError::BufferTooShort {
                len: n,
                cap: buf.len(),
            });
        }
        crate::copy::copy(&mut buf[..n], &m);
        Ok(n)
    }

    /// Tells the peer we are closing (best effort) and fails the connection locally.
    pub fn close(&self) {
        let mut inner = self.inner.borrow_mut();
        if inner.failed.is_none() {
            // Answers that waited for room go first, as far as there is room now.
            let _ = inner.flush_answers();
            let _ = inner.send_control(&ControlMessage::Close {
                reason: close_reason::NORMAL,
            });
            inner.failed = Some("closed by this side".into());
        }
    }

    // ---- delivery confirmation ------------------------------------------------------------

    /// Sequence numbers (as [`Message::seq`] shows them to the receiver) of the data messages
    /// this side sent that the peer has not confirmed, oldest first.
    ///
    /// An eager message is confirmed when the peer gives its partitions back (its application
    /// released the message); a rendezvous message (above the switch point) when the peer
    /// answers that it has read it (its sequence number is that of its request). So once the
    /// connection failed these are the messages that may not have been delivered, and every
    /// other message sent was. Credits the peer published before it failed are read first.
    /// `confirmed() + unconfirmed().len()` counts every eager data message sent (including one
    /// whose send reported a transport error after its partitions were reserved) and every
    /// rendezvous message whose request was sent, except those the receiver refused (their
    /// send returned [`SendError::Refused`]: not delivered, and known).
    pub fn unconfirmed(&self) -> Vec<u32> {
        let mut inner = self.inner.borrow_mut();
        // Best effort: a credit the peer wrote before it died still counts; a malformed one
        // leaves the messages unconfirmed.
        let _ = inner.refresh_credits();
        let mut v = inner.tx.unconfirmed();
        // ---- rendezvous (transport/rndv.rs): requests not answered ----
        let before = v.len();
        v.extend(inner.rndv.unconfirmed());
        if v.len() > before {
            // Oldest first, across the wrap of the 32-bit sequence numbers.
            let next = inner.tx.next_seq();
            v.sort_unstable_by_key(|&seq| std::cmp::Reverse(next.wrapping_sub(seq)));
        }
        v
    }

    /// Data messages this side sent that the peer confirmed (released, or for a rendezvous
    /// message, answered done), see [`Connection::unconfirmed`].
    pub fn confirmed(&self) -> u64 {
        let mut inner = self.inner.borrow_mut();
        let _ = inner.refresh_credits();
        inner.tx.confirmed() + inner.rndv.confirmed()
    }

    /// Whether the connection has failed (or was closed), and why.
    pub fn failure(&self) -> Option<String> {
        self.inner.borrow().failed.clone()
    }

    // ---- end of delivery confirmation ---------------------------------------------------------

    fn recv_msg(&self, deadline: Wait) -> Result<Option<Message<'_, L, T>>, TransportError> {
        if let Some(m) = self.recv_direct(deadline)? {
            return Ok(Some(m));
        }
        match self.recv_until(deadline, None)? {
            Some(Got::Msg(m)) => Ok(Some(m)),
            Some(Got::Landed(_)) => Err(TransportError::Failed(
                "a rendezvous landed without a destination".into(),
            )),
            None => Ok(None),
        }
    }

    /// The message path of a receive: the next arrival, if it is a data message that came with
    /// its header beside the immediate ([`Link::header_with_immediate`]), is validated and
    /// returned without the general path's layers (waits with deadlines, liveness checks, the
    /// rendezvous queue, answers waiting for room). A busy receive that waits forever polls here
    /// [`DIRECT_POLLS`] times first; the general path then takes over, liveness checks and all.
    ///
    /// `Ok(None)` hands over to [`Connection::recv_until`]: nothing arrived yet, or what came
    /// needs the general path (a credit notice, a message without its header beside it, a
    /// control message): it is put back, with its header, in front of the stash, where the
    /// general path looks first, so it is handled and counted exactly as if taken there.
    #[inline(always)]
    fn recv_direct(&self, deadline: Wait) -> Result<Option<Message<'_, L, T>>, TransportError> {
        let mut inner = self.inner.borrow_mut();
        if !inner.link.inline_headers()
            || inner.failed.is_some()
            || !inner.stash.is_empty()
            || !inner.rndv.ready.is_empty()
            || inner.answers_waiting()
        {
            return Ok(None);
        }
        let mode = inner.mode;
        let polls = match (deadline, mode) {
            (Wait::Forever, PollMode::Busy) => DIRECT_POLLS,
            _ => 1,
        };
        let mut imm = None;
        for _ in 0..polls {
            imm = match inner.link.next_immediate(mode, Some(Duration::ZERO)) {
                Ok(imm) => imm,
                Err(e) => return Err(inner.fail(e)),
            };
            if imm.is_some() {
                break;
            }
        }
        let Some(imm) = imm else {
            return Ok(None);
        };
        match inner.link.header_with_immediate() {
            Some(h)
                if matches!(
                    Immediate(imm).kind_bits(),
                    ImmediateKind::MESSAGE_TYPE | ImmediateKind::BARE_TYPE
                ) && h[2] == MessageKind::Data as u8 =>
            {
                let d = match inner.rx.accept_with_header(imm, &h) {
                    Ok(d) => d,
                    Err(e) => return Err(inner.fail(e.into())),
                };
                match self.in_place(&d) {
                    Ok(m) => Ok(Some(m)),
                    Err(e) => Err(inner.fail(e)),
                }
            }
            inline => {
                inner.stash.push_front((imm, inline));
                Ok(None)
            }
        }
    }

    fn recv_until(
        &self,
        deadline: Wait,
        mut dst: Option<&mut [u8]>,
    ) -> Result<Option<Got<'_, L, T>>, TransportError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        // ---- rendezvous branch: what arrived while a send waited for its answer ----
        if let Some(r) = inner.rndv.ready.pop_front() {
            return self
                .serve_for_recv(&mut inner, r, dst, deadline)
                .map_err(|e| refused_or_fail(&mut inner, e));
        }
        let mut wait = deadline;
        let mut idle = 0usize;
        loop {
            let (imm, inline) = match inner.next_arrival_by(&mut wait) {
                Ok(Some(got)) => got,
                Ok(None) => return Ok(None),
                Err(e) => return Err(inner.fail(e)),
            };
            // `wait`, not `deadline`: once the wait has started it is the instant the call ends,
            // which a rendezvous served from here (a stream's chunks) keeps.
            match self.accept(&mut inner, imm, inline, dst.as_deref_mut(), wait) {
                Ok(Some(m)) => return Ok(Some(m)),
                // Consumed here (a credit notice, a control message): off the message path.
                Ok(None) => {
                    idle += 1;
                    if inner.idle_done(&mut wait, idle) {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(refused_or_fail(&mut inner, e)),
            }
        }
    }

    /// Handles one immediate: a data message is returned, credits and control are consumed.
    /// `inline` is the header that came beside the immediate, if the link carries one;
    /// otherwise the header is read from the partition.
    fn accept(
        &self,
        inner: &mut Inner<L>,
        imm: u32,
        inline: InlineHeader,
        dst: Option<&mut [u8]>,
        deadline: Wait,
    ) -> Result<Option<Got<'_, L, T>>, TransportError> {
        // The type bits alone pick the path; `on_immediate` decodes (and validates) the rest.
        match Immediate(imm).kind_bits() {
            ImmediateKind::CREDIT_TYPE => {
                inner.credit_notice(imm)?;
                Ok(None)
            }
            _ => {
                let d = match &inline {
                    Some(h) => inner.rx.accept_with_header(imm, h)?,
                    None => {
                        let arrival = inner.rx.on_immediate(imm)?;
                        let header = self.target.bytes(
                            arrival.segment(),
                            arrival.header_offset(),
                            arrival.header_len(),
                        )?;
                        inner.rx.accept(arrival, header)?
                    }
                };
                match d.kind {
                    MessageKind::Data => Ok(Some(Got::Msg(self.in_place(&d)?))),
                    MessageKind::Control => {
                        let data = self.target.bytes(d.token.segment(), d.offset, d.len)?;
                        let msg = ControlMessage::decode(data);
                        inner.release(d.token)?;
                        // ---- rendezvous branch: requests are served, answers filed ----
                        match inner.file_control(msg?, d.seq)? {
                            Some(r) => self.serve_for_recv(inner, r, dst, deadline),
                            None => Ok(None),
                        }
                    }
                }
            }
        }
    }

    /// The message a delivery names, read in place in its target segment.
    #[inline(always)]
    pub(super) fn in_place(&self, d: &Delivery) -> Result<Message<'_, L, T>, TransportError> {
        let data = self.target.bytes(d.token.segment(), d.offset, d.len)?;
        Ok(Message {
            conn: self,
            token: Some(d.token),
            data,
            owned: None,
            seq: d.seq,
        })
    }

    /// A message received into a buffer of its own (a rendezvous message, or one copied out of
    /// its partitions): nothing to release.
    pub(super) fn owned(&self, data: Vec<u8>, seq: u32) -> Message<'_, L, T> {
        Message {
            conn: self,
            token: None,
            data: &[],
            owned: Some(data),
            seq,
        }
    }

    fn release(&self, token: ReleaseToken) {
        let mut inner = self.inner.borrow_mut();
        if let Err(e) = inner.release(token) {
            inner.fail(e);
        }
    }
}

/// A refused rendezvous, or a deadline that passed while a streamed one was coming in (it is
/// resumed by the next receive), leaves the connection up; anything else fails it.
fn refused_or_fail<L: Link>(inner: &mut Inner<L>, e: TransportError) -> TransportError {
    match e {
        TransportError::RendezvousRefused { .. } | TransportError::Timeout(_) => e,
        e => inner.fail(e),
    }
}

impl<L: Link> Inner<L> {
    pub(super) fn check(&self) -> Result<(), TransportError> {
        match &self.failed {
            Some(why) => Err(TransportError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn fail(&mut self, e: TransportError) -> TransportError {
        if self.failed.is_none() {
            if !matches!(e, TransportError::PeerClosed | TransportError::Failed(_)) {
                // Tell the peer why, best effort: it must not keep writing into our segments.
                let _ = self.send_control(&ControlMessage::Close {
                    reason: close_reason::PROTOCOL_ERROR,
                });
            }
            tracing::debug!(error = %e, "connection failed");
            self.failed = Some(e.to_string());
        }
        e
    }

    #[inline]
    pub(super) fn note<R>(&mut self, r: Result<R, SendError>) -> Result<R, SendError> {
        if let Err(SendError::Transport(e)) = &r
            && self.failed.is_none()
        {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// Reads every mailbox slot newer than what the sender knows.
    fn refresh_credits(&mut self) -> Result<(), TransportError> {
        for i in 0..self.tx.tables().segments().len() {
            let id = self.tx.tables().segments()[i].id;
            let v = self.link.credit(id);
            if self.tx.credit(id).is_some_and(|known| v > known) {
                self.tx.handle_credit(id, v)?;
            }
        }
        Ok(())
    }

    #[inline]
    pub(super) fn reserve(
        &mut self,
        kind: MessageKind,
        len: usize,
    ) -> Result<crate::core::Reservation, SendError> {
        // ---- rendezvous branch: answers that waited for room go before new data ----
        if kind == MessageKind::Data && self.answers_waiting() {
            self.flush_answers()?;
        }
        match self.tx.reserve_first_choice(kind, len) {
            Ok(r) => Ok(r),
            Err(e) => self.reserve_slow(kind, len, e),
        }
    }

    /// The first group had no room by the credits the sender knows: refresh them from the
    /// mailbox (read only here, so the per-message path does not pull the line the peer
    /// writes), then select again, moving to larger groups if the first still has no room.
    #[cold]
    fn reserve_slow(
        &mut self,
        kind: MessageKind,
        len: usize,
        first: ReserveError,
    ) -> Result<crate::core::Reservation, SendError> {
        match first {
            ReserveError::WouldBlock { .. } => {
                self.refresh_credits()?;
                self.tx.reserve_kind(kind, len).map_err(|e| match e {
                    ReserveError::NeedsRendezvous { len, max } => SendError::TooLarge { len, max },
                    _ => SendError::WouldBlock,
                })
            }
            ReserveError::NeedsRendezvous { len, max } => Err(SendError::TooLarge { len, max }),
        }
    }

    /// One eager message of `len` bytes (the sum of the parts' lengths).
    #[inline]
    fn send_parts(&mut self, parts: &[&[u8]], len: usize) -> Result<(), SendError> {
        let res = self.reserve(MessageKind::Data, len)?;
        self.link.send_message(&res, parts)?;
        Ok(())
    }

    pub(super) fn send_control(&mut self, msg: &ControlMessage) -> Result<(), SendError> {
        let body = msg.encode();
        let res = self.reserve(MessageKind::Control, body.as_slice().len())?;
        self.link.send_message(&res, &[body.as_slice()])?;
        Ok(())
    }

    #[inline]
    pub(super) fn release(&mut self, token: ReleaseToken) -> Result<(), TransportError> {
        if let Some(credit) = self.rx.release(token)? {
            self.link.publish_credit(credit)?;
        }
        Ok(())
    }

    pub(super) fn next_immediate(&mut self, deadline: Wait) -> Result<Option<u32>, TransportError> {
        Ok(self.next_arrival_by(&mut { deadline })?.map(|(imm, _)| imm))
    }

    /// As [`Inner::next_immediate`], with the header that came beside an immediate fresh from
    /// the link ([`Link::header_with_immediate`]), or kept with a stashed one. A [`Wait::For`]
    /// that has to wait becomes the [`Wait::Until`] it waits for, so that a caller looping over
    /// arrivals keeps its deadline.
    #[inline]
    pub(super) fn next_arrival_by(
        &mut self,
        wait: &mut Wait,
    ) -> Result<Option<(u32, InlineHeader)>, TransportError> {
        // ---- rendezvous branch: answers that waited for room ----
        if self.answers_waiting() {
            self.flush_answers()?;
        }
        if let Some(arrival) = self.stash.pop_front() {
            return Ok(Some(arrival));
        }
        // Fast path without a clock read: the immediate is often already there.
        if let Some(imm) = self.link.next_immediate(self.mode, Some(Duration::ZERO))? {
            return Ok(Some((imm, self.link.header_with_immediate())));
        }
        // Nothing has come. A quarter segment freed by padding when a wrapped message was
        // accepted is a credit no release has carried yet (the message may still be held): it
        // goes out before this side waits, since the sender may need it for what we wait for.
        while let Some(credit) = self.rx.poll_credit() {
            self.link.publish_credit(credit)?;
        }
        let deadline = match *wait {
            Wait::Forever => None,
            Wait::No => return Ok(None),
            Wait::For(t) => {
                let d = Instant::now().checked_add(t);
                if let Some(d) = d {
                    *wait = Wait::Until(d);
                }
                d
            }
            Wait::Until(d) => Some(d),
        };
        loop {
            let mut slice = match deadline {
                None => LIVENESS_SLICE,
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(LIVENESS_SLICE),
            };
            if self.answers_waiting() {
                // Credits from a busy peer come without a notice: look at them often.
                self.flush_answers()?;
                slice = slice.min(crate::transport::rndv::ANSWER_POLL);
            }
            if let Some(imm) = self.link.next_immediate(self.mode, Some(slice))? {
                return Ok(Some((imm, self.link.header_with_immediate())));
            }
            self.link.check_peer()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    /// Arrivals a call handles without finding anything for its caller (credit notices, control
    /// messages, items filed for later) before a call that does not wait returns "nothing yet".
    ///
    /// The link's receive-queue bound ([`Layout::recv_wqe_bound_for`], `stash_cap`): an honest
    /// peer never has more immediates outstanding (message immediates are bounded by our
    /// partitions, credit notices by its, plus a margin for control), so by then the call has
    /// taken everything that was queued when it began, and what follows came during the call
    /// and may as well wait for the next one. Without a bound a peer that rings as fast as we
    /// pop (say, duplicate credit notices, each valid and freeing nothing) would keep a call
    /// that must not wait looping for as long as it likes. Nothing is dropped: what is left
    /// stays queued in order.
    pub(super) fn idle_budget(&self) -> usize {
        self.stash_cap
    }

    /// After the `idle`-th arrival that brought the caller nothing: whether the call is done.
    /// Only after [`Inner::idle_budget`] of them, as for a call that does not wait (so that a
    /// late wake-up still takes a message queued behind a few notices); then a timed call ends
    /// once its deadline has passed. `wait` is started here if the wait itself has not started
    /// it yet (the arrivals before came without waiting), and read only on such arrivals: a
    /// peer that keeps ringing never lets the link come up empty, where the wait looks.
    pub(super) fn idle_done(&self, wait: &mut Wait, idle: usize) -> bool {
        if let Wait::For(t) = *wait
            && let Some(d) = Instant::now().checked_add(t)
        {
            *wait = Wait::Until(d);
        }
        idle >= self.idle_budget()
            && match *wait {
                Wait::No => true,
                Wait::Until(d) => Instant::now() >= d,
                // Forever, or too long to have an instant.
                Wait::Forever | Wait::For(_) => false,
            }
    }

    /// Waits until a credit may have arrived: busy, it re-reads the mailbox; otherwise it waits
    /// for the link's credit notice, keeping message immediates that arrive meanwhile.
    ///
    /// "Arrived" means a mailbox slot above what the sender knows, not a change since this call
    /// began: a credit that landed between the failed reservation and this call counts.
    pub(super) fn wait_credit(&mut self) -> Result<(), TransportError> {
        loop {
            self.link.check_peer()?;
            if self.credit_news() {
                return Ok(());
            }
            match self.mode {
                PollMode::Busy => {
                    for _ in 0..1024 {
                        std::hint::spin_loop();
                        if self.credit_news() {
                            return Ok(());
                        }
                    }
                }
                PollMode::Event | PollMode::Adaptive { .. } => {
                    self.link.want_credit_notice();
                    if self.credit_news() {
                        return Ok(());
                    }
                    if let Some(imm) = self.link.next_immediate(self.mode, Some(LIVENESS_SLICE))? {
                        match Immediate(imm).decode()? {
                            ImmediateKind::Credit { .. } => {
                                self.credit_notice(imm)?;
                                return Ok(());
                            }
                            ImmediateKind::Message { .. } => self.stash(imm)?,
                        }
                    }
                }
            }
        }
    }

    /// Applies a credit notice. The notice says which segment has news; the value comes from
    /// the mailbox, which the peer wrote before it sent the notice (shared memory: a `Release`
    /// store before the doorbell; verbs: the credit WRITE posted ahead of the notice on the
    /// same queue pair). The notice's own 22 bits are only checked: rebuilt against the head,
    /// they name the true credit only while the notice is fresh, and one left queued while
    /// this side sent 2^22 partitions into the segment would be rebuilt into a credit the
    /// receiver never gave, and the sender would overwrite partitions still in use.
    ///
    /// # Errors
    /// A notice for an unknown segment or above anything sent, and the errors of
    /// [`Sender::handle_credit`] for the mailbox's value.
    pub(super) fn credit_notice(&mut self, imm: u32) -> Result<(), TransportError> {
        let ImmediateKind::Credit { segment, freed_low } = Immediate(imm).decode()? else {
            return Err(ProtocolError::UnexpectedImmediateType {
                raw: imm,
                expected: "credit notice",
            }
            .into());
        };
        let head = self.tx.head(segment).ok_or(ProtocolError::UnknownSegment {
            step: "credit notice",
            segment,
        })?;
        if reconstruct_freed(freed_low, head).is_none() {
            return Err(ProtocolError::CreditAboveHead {
                segment,
                freed: u64::from(freed_low),
                head,
            }
            .into());
        }
        let v = self.link.credit(segment);
        if self.tx.credit(segment).is_some_and(|known| v > known) {
            self.tx.handle_credit(segment, v)?;
        }
        Ok(())
    }

    /// Keeps a message immediate just taken from the link, with the header that came beside it,
    /// for the next receive. Every message takes at least one of our
    /// partitions, so a peer within the protocol never has more immediates outstanding than
    /// `stash_cap`; one that sends more (say, zero-length writes while this side waits for
    /// credits) is failed rather than buffered without bound.
    fn stash(&mut self, imm: u32) -> Result<(), TransportError> {
        if self.stash.len() >= self.stash_cap {
            return Err(ProtocolError::TooManyImmediates {
                limit: self.stash_cap,
            }
            .into());
        }
        let header = self.link.header_with_immediate();
        self.stash.push_back((imm, header));
        Ok(())
    }

    /// Whether a mailbox slot holds more than the sender knows.
    pub(super) fn credit_news(&self) -> bool {
        self.tx.tables().segments().iter().any(|s| {
            self.tx
                .credit(s.id)
                .is_some_and(|known| self.link.credit(s.id) > known)
        })
    }
}

/// A received message, read in place in the target segment (zero-copy). Its partitions return
/// to the sender when it is dropped (or [`released`](Message::release)); messages may be
/// released in any order. A rendezvous message (larger than the switch point) was read
/// straight into a buffer the message owns.
pub struct Message<'a, L: Link, T: TargetMemory> {
    pub(super) conn: &'a Connection<L, T>,
    pub(super) token: Option<ReleaseToken>,
    pub(super) data: &'a [u8],
    /// A rendezvous message's buffer.
    pub(super) owned: Option<Vec<u8>>,
    pub(super) seq: u32,
}

impl<L: Link, T: TargetMemory> Message<'_, L, T> {
    /// The message's sequence number in its direction of the connection.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Returns the partitions to the sender now (same as dropping the message).
    pub fn release(mut self) {
        if let Some(t) = self.token.take() {
            self.conn.release(t);
        }
    }
}

impl<L: Link, T: TargetMemory> Deref for Message<'_, L, T> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        match &self.owned {
            None => self.data,
            Some(v) => v,
        }
    }
}

impl<L: Link, T: TargetMemory> fmt::Debug for Message<'_, L, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("seq", &self.seq)
            .field("len", &self.len())
            .finish()
    }
}

impl<L: Link, T: TargetMemory> Drop for Message<'_, L, T> {
    fn drop(&mut self) {
        if let Some(t) = self.token.take() {
            self.conn.release(t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness and counters for callers that drive several connections (the endpoint layer).

/// Counters of one connection, read in place without allocating (see
/// [`Connection::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Data and control messages sent.
    pub messages_sent: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Data and control messages received.
    pub messages_received: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Sends that found no free partition (back-pressure), each counted once per attempt.
    pub credit_stalls: u64,
    /// Partitions of the peer's target segments this side has filled and the peer has not yet
    /// credited back (messages in flight or held by the peer's application).
    pub partitions_in_flight: u64,
    /// Partitions of this side's target segments not yet returned to the peer (messages
    /// delivered and not released, or released out of order).
    pub partitions_held: u64,
    /// Attempts to fill in place ([`Connection::send_with`]) a message larger than any segment
    /// group, refused as [`SendError::TooLarge`] (messages sent from a buffer go by rendezvous:
    /// see [`Connection::rndv_stats`]).
    pub rendezvous_needed: u64,
}

/// Counters of one segment group of a connection (see [`Connection::group_counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupCounters {
    /// Messages sent through the group (the peer's receive layout).
    pub messages_sent: u64,
    /// Payload bytes of those messages.
    pub bytes_sent: u64,
    /// Messages received through the group (this side's receive layout).
    pub messages_received: u64,
    /// Payload bytes of those messages.
    pub bytes_received: u64,
    /// Partitions of the group's sending segments not yet credited back.
    pub partitions_in_flight: u64,
    /// Partitions of the group's receiving segments not yet returned.
    pub partitions_held: u64,
}

impl<L: Link, T: TargetMemory> Connection<L, T> {
    /// Whether a message is ready: takes what has arrived from the link without waiting,
    /// applies credit notices, and keeps a message for the next receive. `Ok(true)` means the
    /// next [`try_recv`](Connection::try_recv) returns a message or an error, never `None`.
    ///
    /// This lets one thread watch several connections without taking a message it cannot
    /// return yet. Like [`try_recv`](Connection::try_recv) it applies at most a receive
    /// queue's worth of credit notices per call, then returns `Ok(false)` with the rest queued.
    ///
    /// # Errors
    /// A failed link or a protocol violation (the connection is then failed).
    pub fn poll_ready(&self) -> Result<bool, TransportError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        let mut notices = 0usize;
        loop {
            // Between calls the stash holds message immediates only (credit notices are applied
            // on arrival).
            if !inner.stash.is_empty() {
                return Ok(true);
            }
            // Bounded as a receive that does not wait ([`Inner::idle_budget`]): the rest stays
            // queued (and keeps `arm` from letting a wait begin).
            if notices >= inner.idle_budget() {
                return Ok(false);
            }
            notices += 1;
            let mode = inner.mode;
            let imm = match inner.link.next_immediate(mode, Some(Duration::ZERO)) {
                Ok(Some(imm)) => imm,
                Ok(None) => return Ok(false),
                Err(e) => return Err(inner.fail(e)),
            };
            let r = match Immediate(imm).decode() {
                Ok(ImmediateKind::Credit { .. }) => inner.credit_notice(imm),
                Ok(ImmediateKind::Message { .. }) => inner.stash(imm),
                Err(e) => Err(TransportError::from(e)),
            };
            if let Err(e) = r {
                return Err(inner.fail(e));
            }
        }
    }

    /// `Err` once the peer is known to be gone (its process died, or for verbs an unanswered
    /// probe); cheap enough to call every few milliseconds while idle.
    ///
    /// # Errors
    /// [`TransportError::PeerClosed`], or the earlier failure of the connection.
    pub fn check_peer(&self) -> Result<(), TransportError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        match inner.link.check_peer() {
            Ok(()) => Ok(()),
            Err(e) => Err(inner.fail(e)),
        }
    }

    /// The connection's counters, read in place (no allocation).
    pub fn counters(&self) -> Counters {
        let inner = self.inner.borrow();
        let (s, r) = (inner.tx.stats(), inner.rx.stats());
        Counters {
            messages_sent: s.messages,
            bytes_sent: s.bytes,
            messages_received: r.messages,
            bytes_received: r.bytes,
            credit_stalls: s.credit_stalls,
            partitions_in_flight: inner.tx.total_partitions_in_use(),
            partitions_held: inner.rx.total_partitions_in_use(),
            rendezvous_needed: s.rendezvous_needed,
        }
    }

    /// The counters of segment group `group` (its index in the layouts), `None` when neither
    /// direction has such a group.
    pub fn group_counters(&self, group: usize) -> Option<GroupCounters> {
        let inner = self.inner.borrow();
        let g = u8::try_from(group).ok().map(crate::core::GroupId)?;
        let sent = inner.tx.stats().per_group.get(group);
        let received = inner.rx.stats().per_group.get(group);
        if sent.is_none() && received.is_none() {
            return None;
        }
        Some(GroupCounters {
            messages_sent: sent.map_or(0, |s| s.messages),
            bytes_sent: sent.map_or(0, |s| s.bytes),
            messages_received: received.map_or(0, |s| s.messages),
            bytes_received: received.map_or(0, |s| s.bytes),
            partitions_in_flight: inner.tx.group_partitions_in_use(g).unwrap_or(0),
            partitions_held: inner.rx.group_partitions_in_use(g).unwrap_or(0),
        })
    }
}
