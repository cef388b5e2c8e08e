//! The rendezvous driver: messages of any size over any [`Link`] that can expose a buffer to
//! its peer and read the peer's.
//!
//! Sender: the buffer is exposed ([`Link::rndv_expose`]: verbs registers it with remote-read
//! access, shared memory only names its address), a rendezvous request (id, address, rkey,
//! length) goes through the partitions like any message, and the transfer waits for the
//! receiver's done (or refused). Receiver: the request is validated (length against the
//! receive limit, exact control layout), the buffer is read straight into the destination
//! ([`Link::rndv_read`]: one RDMA READ, or `process_vm_readv`), and done goes back. Zero copies
//! on verbs, one on shared memory. See `docs/rendezvous.md`.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use super::conn::{Connection, Got, Inner, SendError, Wait};
use super::{Link, PollMode, TargetMemory, TransportError};
use crate::core::control::CHUNK_HEADER_LEN;
use crate::core::wire::{Immediate, ImmediateKind};
use crate::core::{
    ControlMessage, Delivery, MessageKind, ProtocolError, RndvConfig, RndvRequest, RndvSends,
    RndvState, refuse_reason,
};
use crate::verbs::{BoundWindow, RegCacheStats, RemoteReadGrant};

/// A buffer exposed to the peer for one rendezvous transfer. The exposure ends when the link
/// revokes it ([`Link::rndv_revoke`], when the transfer is answered) or when it drops (verbs: the
/// remote-read registration is deregistered, or the memory window deallocated; either way the
/// rkey is dead).
#[derive(Debug)]
pub struct Exposure<'b> {
    addr: u64,
    rkey: u32,
    _grant: Option<RemoteReadGrant<'b>>,
    window: Option<BoundWindow>,
    /// The buffer, when the link may be asked to stream it through the segments.
    data: Option<&'b [u8]>,
    _buf: PhantomData<&'b [u8]>,
}

impl<'b> Exposure<'b> {
    /// An exposure by a remote-read registration (verbs).
    pub fn registered(grant: RemoteReadGrant<'b>) -> Self {
        Exposure {
            addr: grant.addr(),
            rkey: grant.rkey().0,
            _grant: Some(grant),
            window: None,
            data: None,
            _buf: PhantomData,
        }
    }

    /// An exposure by a memory window bound over `buf` (verbs, with the send cache): the link
    /// invalidates it in [`Link::rndv_revoke`].
    pub fn windowed(buf: &'b [u8], window: BoundWindow) -> Self {
        Exposure {
            addr: buf.as_ptr() as u64,
            rkey: window.rkey().0,
            _grant: None,
            window: Some(window),
            data: None,
            _buf: PhantomData,
        }
    }

    /// An exposure by address only (shared memory: the peer reads it with `process_vm_readv`,
    /// or, when it may not, asks for it through the segments).
    pub fn by_address(buf: &'b [u8]) -> Self {
        Exposure {
            addr: buf.as_ptr() as u64,
            rkey: 0,
            _grant: None,
            window: None,
            data: Some(buf),
            _buf: PhantomData,
        }
    }

    /// Takes the memory window out (for the link to invalidate and reuse it).
    pub fn take_window(&mut self) -> Option<BoundWindow> {
        self.window.take()
    }

    /// The address the peer reads from.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The key the peer reads with (0 on shared memory).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
}

/// The key of a shared-memory rendezvous request whose chunks follow it through the segments
/// (the sender learned that the receiver cannot read its memory, or was told to stream);
/// 0 asks the receiver to read the buffer.
const STREAMED_RKEY: u32 = 1;

/// Rendezvous counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RndvStats {
    /// Rendezvous messages sent (answered done).
    pub sent: u64,
    /// Bytes of those.
    pub sent_bytes: u64,
    /// Rendezvous messages received (read and answered done).
    pub received: u64,
    /// Bytes of those.
    pub received_bytes: u64,
    /// Requests this side refused.
    pub refused_here: u64,
    /// Our requests the peer refused.
    pub refused_by_peer: u64,
    /// Received straight into a caller's buffer (`recv_into`).
    pub into_caller_buffer: u64,
    /// Received through the segments in chunks, because the link could not read the sender's
    /// buffer (shared memory without permission for `process_vm_readv`, or
    /// [`RndvConfig::stream_only`]).
    pub streamed: u64,
    /// Requests refused at once because [`RndvConfig::MAX_QUEUED_TRANSFERS`] transfers were
    /// already queued for the application (also counted in `refused_here`).
    pub refused_busy: u64,
    /// Answers (done, refused, a request to stream) that found no free partition towards the
    /// peer when they were due, so they waited in this side's queue and went with a later call
    /// instead of holding up the receive that made them.
    pub answers_deferred: u64,
}

/// Answers that may wait for room at once ([`Inner::answer`]); beyond, an answer waits for
/// credits where it is made, as every answer once did. A peer that sends this many requests
/// without ever giving partitions back has them answered one at a time.
const MAX_DEFERRED_ANSWERS: usize = 4096;

/// How long a receive that has answers waiting for room polls the link before it looks at the
/// credits again (busy peers write credits without a notice).
pub(super) const ANSWER_POLL: Duration = Duration::from_micros(200);

/// How long a chunk sender waits for one arrival before it looks at its credits again.
const CREDIT_POLL: Duration = Duration::from_micros(200);

/// The error of a receive whose deadline passed while a streamed message was still coming.
fn timed_out(wait: Wait) -> TransportError {
    TransportError::Timeout(match wait {
        Wait::For(t) => t,
        Wait::No | Wait::Forever | Wait::Until(_) => Duration::ZERO,
    })
}

/// What arrived while this side waited for a rendezvous answer: kept in order for the next
/// receive.
#[derive(Debug, Clone)]
pub(super) enum Ready {
    /// A data message, accepted, held in place.
    Data(Delivery),
    /// A rendezvous request, not yet served (served by the next receive, into its buffer).
    Request {
        /// The request.
        req: RndvRequest,
        /// Its sequence number.
        seq: u32,
    },
    /// A data message copied out of its partitions (it arrived while a rendezvous message was
    /// being streamed: its partitions went back to the sender at once; or a `recv_into` buffer
    /// was too short for it). Held up to [`RndvConfig::COPIED_OUT_FACTOR`] times the receive
    /// segments' bytes.
    Owned {
        /// The payload.
        data: Vec<u8>,
        /// Its sequence number.
        seq: u32,
    },
    /// A streamed rendezvous message whose chunks are still coming: its receive's deadline
    /// passed first, or it arrived while no receive was taking it. Its chunks are filed here
    /// wherever they arrive (any call that makes progress on the connection), and the next
    /// receive resumes it.
    Partial {
        /// The sender's id.
        id: u64,
        /// Announced length.
        len: u64,
        /// Its sequence number.
        seq: u32,
        /// Bytes received so far (the chunks come in order).
        got: u64,
        /// The message so far, `got` bytes long (it grows as the chunks come: nothing is
        /// reserved for what the sender has not sent); `None` when its chunks are only drained,
        /// to refuse it with `refuse` once they are all in.
        data: Option<Vec<u8>>,
        /// Refusal code for a drained message.
        refuse: u32,
    },
    /// A streamed rendezvous message whose chunks have all come, not answered yet: the receive
    /// that takes it answers done (or, into a buffer too short, refused), so its sender's
    /// transfer completes when the application has it, as for a message read in place.
    Streamed {
        /// The sender's id.
        id: u64,
        /// Its sequence number.
        seq: u32,
        /// The message.
        data: Vec<u8>,
    },
    /// A rendezvous request to refuse at the next receive.
    Refuse {
        /// Its chunks follow it and are still to be discarded.
        streamed: bool,
        /// The sender's id.
        id: u64,
        /// Announced length.
        len: u64,
        /// Refusal code.
        reason: u32,
    },
}

/// The receive queue of [`Ready`] entries, with the counts the receive-side limits need kept
/// as entries come and go (so that no arrival scans the queue).
#[derive(Debug, Default)]
pub(super) struct ReadyQueue {
    q: VecDeque<Ready>,
    /// Rendezvous transfers queued (requests, refusals, streamed messages complete or not).
    transfers: usize,
    /// Streamed messages whose chunks are still coming ([`Ready::Partial`] short of `len`).
    incoming: usize,
    /// Bytes of data messages copied out of their partitions ([`Ready::Owned`]).
    copied: u64,
}

/// What one entry adds to the counts of a [`ReadyQueue`]: (transfers, incoming, copied bytes).
fn weight(r: &Ready) -> (usize, usize, u64) {
    match r {
        Ready::Data(_) => (0, 0, 0),
        Ready::Owned { data, .. } => (0, 0, data.len() as u64),
        Ready::Request { .. } | Ready::Refuse { .. } | Ready::Streamed { .. } => (1, 0, 0),
        Ready::Partial { len, got, .. } => (1, usize::from(got < len), 0),
    }
}

impl ReadyQueue {
    fn add(&mut self, r: &Ready) {
        let (t, i, c) = weight(r);
        self.transfers += t;
        self.incoming += i;
        self.copied += c;
    }

    fn sub(&mut self, r: &Ready) {
        let (t, i, c) = weight(r);
        self.transfers -= t;
        self.incoming -= i;
        self.copied -= c;
    }

    pub(super) fn push_back(&mut self, r: Ready) {
        self.add(&r);
        self.q.push_back(r);
    }

    pub(super) fn push_front(&mut self, r: Ready) {
        self.add(&r);
        self.q.push_front(r);
    }

    pub(super) fn pop_front(&mut self) -> Option<Ready> {
        let r = self.q.pop_front()?;
        self.sub(&r);
        Some(r)
    }

    fn remove(&mut self, i: usize) -> Option<Ready> {
        let r = self.q.remove(i)?;
        self.sub(&r);
        Some(r)
    }

    fn insert(&mut self, i: usize, r: Ready) {
        self.add(&r);
        self.q.insert(i, r);
    }

    /// Replaces entry `i` (which must exist) by `r`.
    fn replace(&mut self, i: usize, r: Ready) {
        if let Some(old) = self.remove(i) {
            drop(old);
            self.insert(i, r);
        }
    }

    pub(super) fn front(&self) -> Option<&Ready> {
        self.q.front()
    }

    fn get(&self, i: usize) -> Option<&Ready> {
        self.q.get(i)
    }

    /// Entry `i` to change in place: the change must leave its [`weight`] as it was.
    fn get_mut(&mut self, i: usize) -> Option<&mut Ready> {
        self.q.get_mut(i)
    }

    fn iter(&self) -> impl Iterator<Item = &Ready> {
        self.q.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.q.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

/// Where the chunks of a streamed message go.
enum Sink<'d> {
    /// Into a destination `len` bytes long (at each chunk's offset).
    Slice(&'d mut [u8]),
    /// Appended to a buffer that grows as they come.
    Grow(&'d mut Vec<u8>),
    /// Nowhere (a refused message's chunks, taken off the segments).
    Drop,
}

impl Sink<'_> {
    fn keeps(&self) -> bool {
        !matches!(self, Sink::Drop)
    }
}

/// Appends `bytes` to `v`, the start of a message of `total` bytes: the buffer grows by
/// doubling, never beyond `total`.
fn append_chunk(v: &mut Vec<u8>, bytes: &[u8], total: usize) {
    let need = v.len() + bytes.len();
    if need > v.capacity() {
        let want = v.capacity().saturating_mul(2).min(total).max(need);
        v.reserve_exact(want - v.len());
    }
    v.extend_from_slice(bytes);
}

/// The rendezvous state of a connection.
#[derive(Debug)]
pub(super) struct RndvInner {
    pub(super) cfg: RndvConfig,
    /// Messages longer than this go by rendezvous.
    pub(super) switch: usize,
    max_eager: usize,
    sends: RndvSends,
    /// The peer cannot read our memory (the shared-memory handshake found so, or the peer
    /// asked for a transfer through the segments): transfers are streamed at once, without
    /// waiting to be asked.
    peer_cannot_read: bool,
    /// We cannot read the peer's memory (the shared-memory handshake found so): a request to
    /// read is answered "stream" without trying.
    we_cannot_read: bool,
    /// Transfers requested for the peer to read (shared memory, rkey 0) and not answered yet:
    /// id -> (address, length) of the buffer, so that the connection can send the chunks itself
    /// if the peer asks for them ([`Inner::push_own`]).
    exposed: HashMap<u64, (u64, usize)>,
    pub(super) ready: ReadyQueue,
    /// Streamed transfers refused at once as busy whose chunks are still coming: id ->
    /// (announced length, bytes dropped so far). At most
    /// [`RndvConfig::MAX_DROPPING_STREAMS`].
    dropping: HashMap<u64, (u64, u64)>,
    /// Answers made while no partition towards the peer was free, oldest first: they go out,
    /// in order, with the next call that finds room ([`Inner::flush_answers`]). At most
    /// [`MAX_DEFERRED_ANSWERS`].
    answers: VecDeque<ControlMessage>,
    stats: RndvStats,
}

impl RndvInner {
    pub(super) fn new(max_eager: usize, cfg: RndvConfig) -> Self {
        RndvInner {
            switch: cfg.switch_point(max_eager),
            cfg,
            max_eager,
            sends: RndvSends::new(),
            peer_cannot_read: false,
            we_cannot_read: false,
            exposed: HashMap::new(),
            ready: ReadyQueue::default(),
            dropping: HashMap::new(),
            answers: VecDeque::new(),
            stats: RndvStats::default(),
        }
    }
}

impl RndvInner {
    /// Sequence numbers of the rendezvous sends not answered yet.
    pub(super) fn unconfirmed(&self) -> impl Iterator<Item = u32> + '_ {
        self.sends.unconfirmed()
    }

    /// Rendezvous sends the receiver answered done.
    pub(super) fn confirmed(&self) -> u64 {
        self.sends.confirmed()
    }
}

impl<L: Link> Inner<L> {
    /// Whether answers wait for room towards the peer ([`Inner::answer`]).
    #[inline]
    pub(super) fn answers_waiting(&self) -> bool {
        !self.rndv.answers.is_empty()
    }

    /// Sends an answer to the peer (done, refused, a request to stream) if a partition is free,
    /// else queues it for a later call ([`Inner::flush_answers`]) rather than wait here: the
    /// call that makes an answer is a receive, which keeps its deadline, and the credit it
    /// would wait for may come only when the peer's application next calls in. The queue goes
    /// out in order, and before any data message this side sends next.
    fn answer(&mut self, msg: ControlMessage) -> Result<(), TransportError> {
        self.flush_answers()?;
        if self.rndv.answers.is_empty() {
            match self.send_control(&msg) {
                Ok(()) => return Ok(()),
                Err(SendError::WouldBlock) => {}
                Err(SendError::Transport(e)) => return Err(e),
                Err(e) => return Err(TransportError::Failed(e.to_string())),
            }
        }
        if self.rndv.answers.len() >= MAX_DEFERRED_ANSWERS {
            // The peer has not given a partition back for this many answers: this one waits
            // for it here, behind those queued.
            while let Some(m) = self.rndv.answers.pop_front() {
                self.send_control_blocking(&m)?;
            }
            self.send_control_blocking(&msg)?;
            return Ok(());
        }
        tracing::debug!(
            ?msg,
            queued = self.rndv.answers.len(),
            "answer waits for room"
        );
        self.rndv.stats.answers_deferred += 1;
        self.rndv.answers.push_back(msg);
        // An event-mode peer rings when it gives partitions back.
        self.link.want_credit_notice();
        Ok(())
    }

    /// Sends the answers that waited for room ([`Inner::answer`]), in order, as far as
    /// partitions are free. Every wait for an arrival and every data send calls it first while
    /// answers wait.
    pub(super) fn flush_answers(&mut self) -> Result<(), TransportError> {
        while let Some(&msg) = self.rndv.answers.front() {
            match self.send_control(&msg) {
                Ok(()) => {
                    self.rndv.answers.pop_front();
                }
                Err(SendError::WouldBlock) => {
                    self.link.want_credit_notice();
                    return Ok(());
                }
                Err(SendError::Transport(e)) => return Err(e),
                Err(e) => return Err(TransportError::Failed(e.to_string())),
            }
        }
        Ok(())
    }

    /// Sends a control message, waiting for credits; returns its sequence number.
    fn send_control_blocking(&mut self, msg: &ControlMessage) -> Result<u32, TransportError> {
        loop {
            // The message takes the next sequence number (nothing else is sent meanwhile).
            let seq = self.tx.next_seq();
            match self.send_control(msg) {
                Ok(()) => return Ok(seq),
                Err(SendError::WouldBlock) => self.wait_credit()?,
                Err(SendError::Transport(e)) => return Err(e),
                Err(e) => return Err(TransportError::Failed(e.to_string())),
            }
        }
    }

    /// Takes one immediate (waiting as `wait` says) and files what it brings: credits to the
    /// sender, answers to the rendezvous table, data and requests to the ready queue. `Ok(false)`
    /// when nothing came.
    ///
    /// `give_back`: this side waits for its own transfer (an answer, or credits for its chunks),
    /// so a data message is copied out of its partitions, which go back to the peer at once,
    /// within [`Inner::give_back_room`] ([`Inner::give_back`]); a receive leaves it in place.
    fn progress(
        &mut self,
        target: &impl TargetMemory,
        wait: Wait,
        give_back: bool,
    ) -> Result<bool, TransportError> {
        let Some(imm) = self.next_immediate(wait)? else {
            return Ok(false);
        };
        match Immediate(imm).decode()? {
            ImmediateKind::Credit { .. } => {
                self.credit_notice(imm)?;
            }
            ImmediateKind::Message { .. } => {
                let arrival = self.rx.on_immediate(imm)?;
                let header = target.bytes(
                    arrival.segment(),
                    arrival.header_offset(),
                    arrival.header_len(),
                )?;
                let d = self.rx.accept(arrival, header)?;
                match d.kind {
                    MessageKind::Data if self.has_partial() => {
                        // A streamed message is still coming: its chunks need the partitions.
                        self.copy_out(target, d)?;
                    }
                    MessageKind::Data if give_back && self.give_back_room(d.len) => {
                        self.copy_out(target, d)?;
                    }
                    MessageKind::Data => self.rndv.ready.push_back(Ready::Data(d)),
                    MessageKind::Control => {
                        let body = target.bytes(d.token.segment(), d.offset, d.len)?;
                        let msg = ControlMessage::decode(body);
                        if let Ok(ControlMessage::RendezvousChunk { id, offset, .. }) = msg {
                            let r = self.absorb(id, offset, &body[CHUNK_HEADER_LEN..]);
                            // Released before the answer: it may wait for credits.
                            self.release(d.token)?;
                            if let Some(i) = r? {
                                self.complete_partial(i)?;
                            }
                            return Ok(true);
                        }
                        self.release(d.token)?;
                        if let Some(r) = self.file_control(msg?, d.seq)? {
                            self.file_ready(target, r)?;
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    /// Handles a control message other than the ones a receive returns: answers go to the
    /// table; a request is validated into [`Ready`].
    pub(super) fn file_control(
        &mut self,
        msg: ControlMessage,
        seq: u32,
    ) -> Result<Option<Ready>, TransportError> {
        match msg {
            ControlMessage::Close { .. } => Err(TransportError::PeerClosed),
            ControlMessage::RendezvousDone { id } => {
                self.rndv.sends.answer(id, None)?;
                self.rndv.exposed.remove(&id);
                Ok(None)
            }
            ControlMessage::RendezvousRefused { id, reason } => {
                self.rndv.sends.answer(id, Some(reason))?;
                self.rndv.exposed.remove(&id);
                Ok(None)
            }
            ControlMessage::RendezvousStream { id } => {
                // Our exposure is not readable by the peer (the read was permitted at connection
                // setup, not any more): the chunks go now, from whatever call brought the
                // request, and later transfers are streamed at once.
                self.rndv.sends.stream(id)?;
                self.rndv.peer_cannot_read = true;
                if let Some((addr, len)) = self.rndv.exposed.remove(&id) {
                    self.push_own(id, addr, len)?;
                }
                Ok(None)
            }
            ControlMessage::RendezvousChunk { len, .. } => Err(ProtocolError::BadControl {
                ty: 6,
                len: CHUNK_HEADER_LEN + len as usize,
                reason: "rendezvous chunk outside a streamed transfer",
            }
            .into()),
            ControlMessage::RendezvousRequest {
                id,
                addr,
                len,
                rkey,
            } => Ok(Some(
                match RndvRequest::validate(id, addr, len, rkey, self.rndv.cfg.max_recv) {
                    Ok(req) => Ready::Request { req, seq },
                    Err(reason) => Ready::Refuse {
                        streamed: rkey == STREAMED_RKEY && self.link.rndv_can_stream(),
                        id,
                        len,
                        reason,
                    },
                },
            )),
        }
    }

    /// Queues `r` for the next receive. A streamed request (its chunks follow it) is queued as
    /// [`Ready::Partial`]: its chunks are filed there as they arrive (or discarded, for a
    /// request to refuse), by whatever call makes progress, without waiting for them here.
    ///
    /// At most [`RndvConfig::MAX_QUEUED_TRANSFERS`] rendezvous transfers are queued: a request
    /// beyond is refused at once ([`refuse_reason::BUSY`], or its own refusal reason), and the
    /// chunks of a streamed one are dropped as they come.
    fn file_ready(&mut self, target: &impl TargetMemory, r: Ready) -> Result<(), TransportError> {
        let can_stream = self.link.rndv_can_stream();
        let answer = match &r {
            Ready::Request { req, .. } => Some((
                req.id,
                req.len as u64,
                refuse_reason::BUSY,
                req.rkey == STREAMED_RKEY && can_stream,
            )),
            Ready::Refuse {
                streamed,
                id,
                len,
                reason,
            } => Some((*id, *len, *reason, *streamed)),
            _ => None,
        };
        if let Some((id, len, reason, streamed)) = answer
            && self.rndv.ready.transfers >= RndvConfig::MAX_QUEUED_TRANSFERS
        {
            return self.refuse_busy(target, id, len, reason, streamed);
        }
        let r = match r {
            Ready::Request { req, seq } if req.rkey == STREAMED_RKEY && can_stream => {
                self.copy_out_held(target)?;
                Ready::Partial {
                    id: req.id,
                    len: req.len as u64,
                    seq,
                    got: 0,
                    data: Some(Vec::new()),
                    refuse: 0,
                }
            }
            Ready::Refuse {
                streamed: true,
                id,
                len,
                reason,
            } => {
                self.copy_out_held(target)?;
                Ready::Partial {
                    id,
                    len,
                    seq: 0,
                    got: 0,
                    data: None,
                    refuse: reason,
                }
            }
            r => r,
        };
        self.rndv.ready.push_back(r);
        Ok(())
    }

    /// Refuses transfer `id` at once, without queueing it: the queue holds
    /// [`RndvConfig::MAX_QUEUED_TRANSFERS`] already. A streamed transfer's chunks follow its
    /// request: they are dropped as they come (at most [`RndvConfig::MAX_DROPPING_STREAMS`]
    /// such transfers at once, else the peer is sending requests without their chunks and the
    /// connection fails).
    fn refuse_busy(
        &mut self,
        target: &impl TargetMemory,
        id: u64,
        len: u64,
        reason: u32,
        streamed: bool,
    ) -> Result<(), TransportError> {
        if streamed {
            if self.rndv.dropping.len() >= RndvConfig::MAX_DROPPING_STREAMS {
                return Err(ProtocolError::LimitExceeded {
                    what: "streamed rendezvous transfers refused while their chunks still come",
                    limit: RndvConfig::MAX_DROPPING_STREAMS as u64,
                }
                .into());
            }
            self.copy_out_held(target)?;
            self.rndv.dropping.insert(id, (len, 0));
        }
        self.rndv.stats.refused_here += 1;
        if reason == refuse_reason::BUSY {
            // A request already refused for a reason of its own keeps that reason.
            self.rndv.stats.refused_busy += 1;
        }
        tracing::warn!(
            id,
            len,
            reason,
            queued = self.rndv.ready.transfers,
            "refusing a rendezvous request: too many transfers queued"
        );
        self.answer(ControlMessage::RendezvousRefused { id, reason })
    }

    /// Whether `n` more bytes may be copied out by a side that waits for its own transfer
    /// ([`Inner::give_back`]): up to the receive layout's segment bytes in all, so everything
    /// the peer can have in our partitions at once, within [`Inner::copy_limit`].
    fn give_back_room(&self, n: usize) -> bool {
        self.rndv.ready.copied.saturating_add(n as u64) <= self.rx.layout().segment_bytes()
    }

    /// Before this side waits for its own transfer: copies the data messages it holds in
    /// their partitions out of them, oldest first and within [`Inner::give_back_room`], so that
    /// the partitions go back to the peer. The peer may need one to answer: a peer receiving
    /// our request sends `done` through our partitions, and with them all holding its earlier
    /// messages, which our application has not received, it would wait for a credit that only
    /// our receive gives, while we wait for its answer. Messages that arrive during the wait are
    /// given back the same way ([`Inner::progress`]). Past the room they stay in place, so a
    /// peer that keeps sending data meets back-pressure as before.
    fn give_back(&mut self, target: &impl TargetMemory) -> Result<(), TransportError> {
        self.copy_out_held_within(target, |s, n| Ok(s.give_back_room(n)))
    }

    /// Whether a streamed message is still coming in (its chunks need partitions).
    fn has_partial(&self) -> bool {
        self.rndv.ready.incoming > 0 || !self.rndv.dropping.is_empty()
    }

    /// The most bytes of copied-out data messages held at once:
    /// [`RndvConfig::COPIED_OUT_FACTOR`] times the receive layout's segment bytes.
    fn copy_limit(&self) -> u64 {
        RndvConfig::COPIED_OUT_FACTOR.saturating_mul(self.rx.layout().segment_bytes())
    }

    /// Checks that `n` more bytes copied out of their partitions stay within
    /// [`Inner::copy_limit`]: beyond, the peer sends data instead of the chunks it announced.
    fn check_copy(&self, n: usize) -> Result<(), TransportError> {
        let limit = self.copy_limit();
        if self.rndv.ready.copied.saturating_add(n as u64) > limit {
            return Err(ProtocolError::LimitExceeded {
                what: "bytes of data messages copied out of their partitions while a streamed \
                       rendezvous message comes in",
                limit,
            }
            .into());
        }
        Ok(())
    }

    /// Copies data message `d` out of its partitions (they go back to the sender at once) to
    /// the back of the queue.
    fn copy_out(&mut self, target: &impl TargetMemory, d: Delivery) -> Result<(), TransportError> {
        self.check_copy(d.len)?;
        let data = target.bytes(d.token.segment(), d.offset, d.len)?.to_vec();
        self.release(d.token)?;
        self.rndv.ready.push_back(Ready::Owned { data, seq: d.seq });
        Ok(())
    }

    /// Copies the data messages held in their partitions out of them, so that the partitions go
    /// back to the sender at once: the chunks of a streamed message need them.
    fn copy_out_held(&mut self, target: &impl TargetMemory) -> Result<(), TransportError> {
        self.copy_out_held_within(target, |s, n| s.check_copy(n).map(|()| true))
    }

    /// Copies the data messages held in their partitions out of them, oldest first, while
    /// `room(self, n)` allows `n` more bytes; stops at the first it does not.
    fn copy_out_held_within(
        &mut self,
        target: &impl TargetMemory,
        room: impl Fn(&Self, usize) -> Result<bool, TransportError>,
    ) -> Result<(), TransportError> {
        for i in 0..self.rndv.ready.len() {
            if let Some(&Ready::Data(d)) = self.rndv.ready.get(i) {
                if !room(self, d.len)? {
                    break;
                }
                let data = target.bytes(d.token.segment(), d.offset, d.len)?.to_vec();
                self.release(d.token)?;
                self.rndv
                    .ready
                    .replace(i, Ready::Owned { data, seq: d.seq });
            }
        }
        Ok(())
    }

    /// Puts a data message that did not fit the receive's buffer back at the head of the queue,
    /// copied out of its partitions (which go back to the sender now).
    pub(super) fn requeue(&mut self, data: Vec<u8>, seq: u32) {
        self.rndv.ready.push_front(Ready::Owned { data, seq });
    }

    /// Files a chunk of transfer `id` that arrived while no receive was taking that transfer:
    /// into its [`Ready::Partial`]. Returns the queue position of the message when this chunk
    /// completed it (for [`Inner::complete_partial`], once the chunk's partitions are released).
    fn absorb(
        &mut self,
        id: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Option<usize>, TransportError> {
        let bad = |reason| ProtocolError::BadControl {
            ty: 6,
            len: CHUNK_HEADER_LEN + bytes.len(),
            reason,
        };
        let Some(i) = self.rndv.ready.iter().position(
            |r| matches!(r, Ready::Partial { id: p, len, got, .. } if *p == id && got < len),
        ) else {
            // A transfer refused as busy: its chunks are dropped.
            let Some((len, got)) = self.rndv.dropping.get_mut(&id) else {
                return Err(bad("rendezvous chunk outside a streamed transfer").into());
            };
            let end = *got + bytes.len() as u64;
            if offset != *got || end > *len {
                return Err(bad("chunk out of order or beyond the message").into());
            }
            *got = end;
            if end == *len {
                self.rndv.dropping.remove(&id);
            }
            return Ok(None);
        };
        let Some(Ready::Partial { len, got, data, .. }) = self.rndv.ready.get_mut(i) else {
            return Err(TransportError::Failed("rendezvous queue changed".into()));
        };
        let total = *len;
        let end = *got + bytes.len() as u64;
        if offset != *got || end > total {
            return Err(bad("chunk out of order or beyond the message").into());
        }
        if end < total {
            // Still short of its length: the entry's weight in the queue does not change.
            if let Some(v) = data.as_mut() {
                append_chunk(v, bytes, total as usize);
            }
            *got = end;
            return Ok(None);
        }
        // The last chunk: taken out and put back, so that the queue's counts follow.
        let Some(Ready::Partial {
            id,
            len,
            seq,
            mut data,
            refuse,
            ..
        }) = self.rndv.ready.remove(i)
        else {
            return Err(TransportError::Failed("rendezvous queue changed".into()));
        };
        if let Some(v) = data.as_mut() {
            append_chunk(v, bytes, total as usize);
        }
        self.rndv.ready.insert(
            i,
            Ready::Partial {
                id,
                len,
                seq,
                got: end,
                data,
                refuse,
            },
        );
        Ok(Some(i))
    }

    /// Turns the streamed message completed at queue position `i` into [`Ready::Streamed`] (the
    /// receive that takes it answers done), or, drained, into a refusal for the next receive.
    fn complete_partial(&mut self, i: usize) -> Result<(), TransportError> {
        let Some(Ready::Partial {
            id,
            len,
            seq,
            data,
            refuse,
            ..
        }) = self.rndv.ready.remove(i)
        else {
            return Err(TransportError::Failed("rendezvous queue changed".into()));
        };
        let done = match data {
            Some(data) => Ready::Streamed { id, seq, data },
            None => Ready::Refuse {
                streamed: false,
                id,
                len,
                reason: refuse,
            },
        };
        self.rndv.ready.insert(i, done);
        Ok(())
    }

    /// Refuses request `id` towards the sender and builds this side's error.
    fn refuse(&mut self, id: u64, len: u64, reason: u32) -> TransportError {
        self.rndv.stats.refused_here += 1;
        tracing::debug!(id, len, reason, "refusing a rendezvous request");
        match self.answer(ControlMessage::RendezvousRefused { id, reason }) {
            Ok(()) => TransportError::RendezvousRefused { len, reason },
            Err(e) => e,
        }
    }

    /// Reads request `req` into `dst` and answers done. When the link cannot read the
    /// sender's buffer but can stream (shared memory without permission for
    /// `process_vm_readv`, or [`RndvConfig::stream_only`]), the sender is asked for the message
    /// through the segments instead. A streamed message whose chunks have not all come by
    /// `wait`'s deadline is kept, as received so far, at the head of the queue for the next
    /// receive to resume, and [`TransportError::Timeout`] is returned.
    fn read_and_answer(
        &mut self,
        target: &impl TargetMemory,
        req: &RndvRequest,
        seq: u32,
        dst: &mut [u8],
        cacheable: bool,
        wait: Wait,
    ) -> Result<(), TransportError> {
        let can_stream = self.link.rndv_can_stream();
        let r = if can_stream && req.rkey == STREAMED_RKEY {
            // The chunks follow the request.
            Err(None)
        } else if can_stream && (self.rndv.cfg.stream_only || self.rndv.we_cannot_read) {
            Err(Some(refuse_reason::NO_ACCESS))
        } else {
            self.link.rndv_read(req, dst, cacheable)?.map_err(Some)
        };
        match r {
            Ok(()) => {}
            Err(ask) if can_stream && ask.is_none_or(|r| r == refuse_reason::NO_ACCESS) => {
                let len = req.len as u64;
                let got = self.stream_into(
                    target,
                    req.id,
                    len,
                    Sink::Slice(&mut *dst),
                    0,
                    ask.is_some(),
                    wait,
                )?;
                if got < len {
                    // Kept as far as it got; the rest grows it as it comes.
                    let data = dst[..got as usize].to_vec();
                    self.rndv.ready.push_front(Ready::Partial {
                        id: req.id,
                        len,
                        seq,
                        got,
                        data: Some(data),
                        refuse: 0,
                    });
                    return Err(timed_out(wait));
                }
                self.rndv.stats.streamed += 1;
            }
            Err(reason) => {
                let reason = reason.unwrap_or(refuse_reason::MALFORMED);
                return Err(self.refuse(req.id, req.len as u64, reason));
            }
        }
        self.answer(ControlMessage::RendezvousDone { id: req.id })?;
        self.rndv.stats.received += 1;
        self.rndv.stats.received_bytes += req.len as u64;
        Ok(())
    }

    /// Drains the chunks of streamed transfer `id` (to refuse it), from `got` on: the
    /// refusal when they are all in, or, past `wait`'s deadline, [`TransportError::Timeout`]
    /// with the drain kept at the head of the queue for the next receive.
    fn drain_and_refuse(
        &mut self,
        target: &impl TargetMemory,
        id: u64,
        len: u64,
        got: u64,
        reason: u32,
        wait: Wait,
    ) -> TransportError {
        match self.stream_into(target, id, len, Sink::Drop, got, false, wait) {
            Ok(got) if got < len => {
                self.rndv.ready.push_front(Ready::Partial {
                    id,
                    len,
                    seq: 0,
                    got,
                    data: None,
                    refuse: reason,
                });
                timed_out(wait)
            }
            Ok(_) => self.refuse(id, len, reason),
            Err(e) => e,
        }
    }

    /// Copies the `len` bytes of transfer `id` from offset `got` on into `dst` as its chunks
    /// come, after asking the sender for them (`ask`) unless they
    /// follow the request anyway. Returns how far it got: `len`, or less when `wait`'s deadline
    /// passed first. Data messages that arrive meanwhile are copied out so that their partitions
    /// go back at once (the chunks need them); chunks of other streamed transfers are filed in
    /// their [`Ready::Partial`].
    #[allow(clippy::too_many_arguments)]
    fn stream_into(
        &mut self,
        target: &impl TargetMemory,
        id: u64,
        len: u64,
        mut dst: Sink<'_>,
        mut got: u64,
        ask: bool,
        wait: Wait,
    ) -> Result<u64, TransportError> {
        tracing::debug!(id, len, got, keep = dst.keeps(), "rendezvous by stream");
        let deadline = match wait {
            Wait::Forever => None,
            Wait::No => Some(Instant::now()),
            Wait::For(t) => Instant::now().checked_add(t),
            Wait::Until(d) => Some(d),
        };
        // Arrivals that did not move this transfer on: past the deadline (at once for a call
        // that does not wait), a bounded number of them ends the call ([`Inner::idle_budget`]),
        // so a peer that keeps ringing cannot hold it.
        let (mut idle, mut seen) = (0usize, got);
        // Messages already waiting in their partitions are copied out too.
        self.copy_out_held(target)?;
        if ask {
            self.answer(ControlMessage::RendezvousStream { id })?;
        }
        let bad = |len: usize, reason| ProtocolError::BadControl { ty: 6, len, reason };
        while got < len {
            if got == seen {
                idle += 1;
                if idle > self.idle_budget() && deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(got);
                }
            } else {
                seen = got;
            }
            let w = match deadline {
                None => Wait::Forever,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Wait::For(left),
                    _ => Wait::No,
                },
            };
            let Some(imm) = self.next_immediate(w)? else {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(got);
                }
                continue;
            };
            if let ImmediateKind::Credit { .. } = Immediate(imm).decode()? {
                self.credit_notice(imm)?;
                continue;
            }
            let arrival = self.rx.on_immediate(imm)?;
            let header = target.bytes(
                arrival.segment(),
                arrival.header_offset(),
                arrival.header_len(),
            )?;
            let d = self.rx.accept(arrival, header)?;
            if d.kind == MessageKind::Data {
                self.copy_out(target, d)?;
                continue;
            }
            let body = target.bytes(d.token.segment(), d.offset, d.len)?;
            let msg = ControlMessage::decode(body);
            match msg {
                Ok(ControlMessage::RendezvousChunk {
                    id: cid,
                    offset,
                    len: n,
                }) => {
                    if cid != id {
                        // Another streamed transfer, filed for a later receive.
                        let r = self.absorb(cid, offset, &body[CHUNK_HEADER_LEN..]);
                        self.release(d.token)?;
                        if let Some(i) = r? {
                            self.complete_partial(i)?;
                        }
                        continue;
                    }
                    let end = got + u64::from(n);
                    if offset != got || end > len {
                        return Err(
                            bad(body.len(), "chunk out of order or beyond the message").into()
                        );
                    }
                    let bytes = &body[CHUNK_HEADER_LEN..];
                    match &mut dst {
                        Sink::Slice(dst) => {
                            let slot = dst
                                .get_mut(got as usize..end as usize)
                                .ok_or_else(|| bad(body.len(), "chunk beyond the destination"))?;
                            crate::copy::copy(slot, bytes);
                        }
                        Sink::Grow(v) => append_chunk(v, bytes, len as usize),
                        Sink::Drop => {}
                    }
                    got = end;
                    self.release(d.token)?;
                }
                other => {
                    self.release(d.token)?;
                    if let Some(r) = self.file_control(other?, d.seq)? {
                        self.file_ready(target, r)?;
                    }
                }
            }
        }
        Ok(got)
    }

    /// Sends the message of transfer `id` through the segments in chunks, waiting for credits as
    /// a blocking send does, and marks the transfer streamed. While it waits it takes what
    /// arrives ([`Inner::wait_credit_taking`]), so two peers streaming to each other both get on.
    fn push_chunks(
        &mut self,
        target: &impl TargetMemory,
        id: u64,
        data: &[u8],
    ) -> Result<(), SendError> {
        let chunk = self.rndv.max_eager.saturating_sub(CHUNK_HEADER_LEN).max(1);
        for (i, part) in data.chunks(chunk).enumerate() {
            let head = ControlMessage::RendezvousChunk {
                id,
                offset: (i * chunk) as u64,
                len: part.len() as u32,
            }
            .encode();
            loop {
                match self.send_chunk(head.as_slice(), part) {
                    Ok(()) => break,
                    Err(SendError::WouldBlock) => {
                        let r = self.wait_credit_taking(target);
                        self.note(r.map_err(SendError::from))?;
                    }
                    Err(e) => return self.note(Err(e)),
                }
            }
        }
        self.rndv.sends.streamed(id);
        tracing::trace!(id, len = data.len(), "rendezvous streamed");
        Ok(())
    }

    /// Sends the chunks of transfer `id` (the peer asked for them: it may no longer read our
    /// memory) from the buffer at `addr`, `len` bytes of this process, read with
    /// `process_vm_readv` on this very process: the kernel always permits that, and it copies or
    /// fails (a range no longer mapped, after a leaked handle), it never faults. So the chunks go
    /// from any call on the connection, not only from the transfer's handle, which the
    /// application may not poll before it receives. Waits for credits as a blocking send does:
    /// the peer is receiving these very chunks, or takes them as they come from any of its calls.
    fn push_own(&mut self, id: u64, addr: u64, len: usize) -> Result<(), TransportError> {
        let chunk = self.rndv.max_eager.saturating_sub(CHUNK_HEADER_LEN).max(1);
        let mut part = vec![0u8; chunk.min(len)];
        let pid = std::process::id() as i32;
        let mut off = 0usize;
        while off < len {
            let n = chunk.min(len - off);
            crate::shm::read_peer_memory(pid, addr + off as u64, &mut part[..n]).map_err(|e| {
                TransportError::Failed(format!(
                    "rendezvous buffer of transfer {id} no longer readable: {e}"
                ))
            })?;
            let head = ControlMessage::RendezvousChunk {
                id,
                offset: off as u64,
                len: n as u32,
            }
            .encode();
            loop {
                match self.send_chunk(head.as_slice(), &part[..n]) {
                    Ok(()) => break,
                    Err(SendError::WouldBlock) => self.wait_credit()?,
                    Err(SendError::Transport(e)) => return Err(e),
                    Err(e) => return Err(TransportError::Failed(e.to_string())),
                }
            }
            off += n;
        }
        self.rndv.sends.streamed(id);
        tracing::debug!(id, len, "rendezvous streamed on request");
        Ok(())
    }

    /// Waits a little for credits while taking what arrives: chunks of the peer's streamed
    /// messages are filed (their partitions go back at once), requests and data are queued for
    /// the next receive, credit notices are counted. A peer streaming to us while we stream to it
    /// needs its chunks released to send ours credits back; a plain credit wait would leave both
    /// waiting. Returns after one arrival or [`CREDIT_POLL`].
    fn wait_credit_taking(&mut self, target: &impl TargetMemory) -> Result<(), TransportError> {
        // Event modes: the peer rings when it returns credit (busy peers ignore the request and
        // the next reservation re-reads the mailbox).
        self.link.want_credit_notice();
        self.give_back(target)?;
        self.progress(target, Wait::For(CREDIT_POLL), true)?;
        Ok(())
    }

    /// [`Inner::wait_credit`] for an eager send. While a rendezvous transfer of ours waits for
    /// its answer, the peer may need our partitions to send it, and they may all hold its
    /// earlier messages, which our application (in this send) has not received: then this wait
    /// takes what arrives and gives partitions back as a waiting rendezvous sender does
    /// ([`Inner::give_back`]), so that neither side waits for the other. With no transfer
    /// waiting it is [`Inner::wait_credit`] unchanged.
    pub(super) fn wait_credit_giving_back(
        &mut self,
        target: &impl TargetMemory,
    ) -> Result<(), TransportError> {
        if self.rndv.sends.waiting() == 0 {
            return self.wait_credit();
        }
        self.give_back(target)?;
        // News: a mailbox slot above what the sender knows, or a credit applied meanwhile (a
        // credit notice taken by `progress`).
        let credits = self.tx.stats().credits;
        let news = |s: &Self| s.credit_news() || s.tx.stats().credits != credits;
        loop {
            self.link.check_peer()?;
            // What has arrived: credits, answers, and data given back.
            for _ in 0..self.idle_budget() {
                if news(self) || !self.progress(target, Wait::No, true)? {
                    break;
                }
            }
            if news(self) {
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
                    if news(self) {
                        return Ok(());
                    }
                    self.progress(target, Wait::For(CREDIT_POLL), true)?;
                }
            }
        }
    }

    /// Sends one chunk (control message: fixed part `head`, then `data`) if partitions are free.
    fn send_chunk(&mut self, head: &[u8], data: &[u8]) -> Result<(), SendError> {
        let res = self.reserve(MessageKind::Control, head.len() + data.len())?;
        self.link.send_message(&res, &[head, data])?;
        Ok(())
    }
}

impl<L: Link, T: TargetMemory> Connection<L, T> {
    /// Serves a rendezvous request: into `dst` when given (`Got::Landed`), else into a buffer
    /// the returned message owns. A streamed message whose chunks stall past `wait`'s deadline
    /// stays queued, as far as it got, and [`TransportError::Timeout`] is returned: the next
    /// receive resumes it (nothing is lost, the order is kept, the sender still waits for its
    /// answer).
    pub(super) fn serve<'a>(
        &'a self,
        inner: &mut Inner<L>,
        ready: Ready,
        dst: Option<&mut [u8]>,
        wait: Wait,
    ) -> Result<Got<'a, L, T>, TransportError> {
        match ready {
            Ready::Data(d) => Ok(Got::Msg(self.in_place(&d)?)),
            Ready::Owned { data, seq } => Ok(Got::Msg(self.owned(data, seq))),
            Ready::Refuse {
                streamed,
                id,
                len,
                reason,
            } => {
                if streamed {
                    return Err(inner.drain_and_refuse(&self.target, id, len, 0, reason, wait));
                }
                Err(inner.refuse(id, len, reason))
            }
            Ready::Partial {
                id,
                len,
                got,
                data: None,
                refuse,
                ..
            } => Err(inner.drain_and_refuse(&self.target, id, len, got, refuse, wait)),
            Ready::Partial {
                id,
                len,
                got,
                data: Some(_),
                ..
            } if dst.as_ref().is_some_and(|b| (b.len() as u64) < len) => {
                // The buffer is too short: the rest of the chunks are dropped, and it is refused.
                Err(inner.drain_and_refuse(
                    &self.target,
                    id,
                    len,
                    got,
                    refuse_reason::NO_ROOM,
                    wait,
                ))
            }
            Ready::Partial {
                id,
                len,
                seq,
                got,
                data: Some(mut data),
                ..
            } => {
                // Resumed: the rest comes into the message's own buffer.
                let got = inner.stream_into(
                    &self.target,
                    id,
                    len,
                    Sink::Grow(&mut data),
                    got,
                    false,
                    wait,
                )?;
                if got < len {
                    inner.rndv.ready.push_front(Ready::Partial {
                        id,
                        len,
                        seq,
                        got,
                        data: Some(data),
                        refuse: 0,
                    });
                    return Err(timed_out(wait));
                }
                self.deliver_streamed(inner, id, seq, data, dst)
            }
            Ready::Streamed { id, seq, data } => self.deliver_streamed(inner, id, seq, data, dst),
            Ready::Request { req, seq } => match dst {
                Some(buf) if buf.len() >= req.len => {
                    inner.read_and_answer(
                        &self.target,
                        &req,
                        seq,
                        &mut buf[..req.len],
                        true,
                        wait,
                    )?;
                    inner.rndv.stats.into_caller_buffer += 1;
                    Ok(Got::Landed(req.len))
                }
                Some(_) => {
                    let len = req.len as u64;
                    if req.rkey == STREAMED_RKEY && inner.link.rndv_can_stream() {
                        // Its chunks follow: take them off the segments first.
                        return Err(inner.drain_and_refuse(
                            &self.target,
                            req.id,
                            len,
                            0,
                            refuse_reason::NO_ROOM,
                            wait,
                        ));
                    }
                    Err(inner.refuse(req.id, len, refuse_reason::NO_ROOM))
                }
                None => {
                    let mut v = vec![0u8; req.len];
                    inner.read_and_answer(&self.target, &req, seq, &mut v, false, wait)?;
                    Ok(Got::Msg(self.owned(v, seq)))
                }
            },
        }
    }

    /// Delivers a streamed message whose chunks have all come: answers done and lands it in
    /// `dst`, or returns it as a message; a `dst` too short refuses it (reason no room), as any
    /// rendezvous message.
    fn deliver_streamed<'a>(
        &'a self,
        inner: &mut Inner<L>,
        id: u64,
        seq: u32,
        data: Vec<u8>,
        dst: Option<&mut [u8]>,
    ) -> Result<Got<'a, L, T>, TransportError> {
        let len = data.len() as u64;
        if dst.as_ref().is_some_and(|b| b.len() < data.len()) {
            return Err(inner.refuse(id, len, refuse_reason::NO_ROOM));
        }
        inner.answer(ControlMessage::RendezvousDone { id })?;
        inner.rndv.stats.streamed += 1;
        inner.rndv.stats.received += 1;
        inner.rndv.stats.received_bytes += len;
        match dst {
            Some(buf) => {
                crate::copy::copy(&mut buf[..data.len()], &data);
                inner.rndv.stats.into_caller_buffer += 1;
                Ok(Got::Landed(data.len()))
            }
            None => Ok(Got::Msg(self.owned(data, seq))),
        }
    }

    /// As [`Connection::serve`], for a receive: a deadline that passed while a streamed
    /// message was coming is "nothing yet" for a receive that does not wait
    /// ([`Connection::try_recv`]), and a timeout (the connection stays up) otherwise.
    pub(super) fn serve_for_recv<'a>(
        &'a self,
        inner: &mut Inner<L>,
        ready: Ready,
        dst: Option<&mut [u8]>,
        wait: Wait,
    ) -> Result<Option<Got<'a, L, T>>, TransportError> {
        match self.serve(inner, ready, dst, wait) {
            Ok(g) => Ok(Some(g)),
            Err(TransportError::Timeout(_)) if matches!(wait, Wait::No) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts sending `buf`: a message up to the switch point is sent at once (waiting for
    /// credits like [`Connection::send`]) and the handle is already complete; a longer one is
    /// exposed to the receiver and announced, and the handle completes when the receiver has
    /// read it. Several transfers may be in flight on one connection; each handle borrows its
    /// buffer until it completes.
    ///
    /// A transfer the peer cannot read (shared memory where it may not read this process, or
    /// `RSMSG_RNDV_STREAM_ONLY=1` on either side) is streamed: its chunks go through the
    /// segments before `send_start` returns, waiting for credits as [`Connection::send`] does,
    /// so such a call returns only as the peer takes the chunks (in any receive or rendezvous
    /// call of its own).
    ///
    /// # Errors
    /// As [`Connection::send`]; the registration of the buffer failed.
    pub fn send_start<'b>(&self, buf: &'b [u8]) -> Result<SendHandle<'_, 'b, L, T>, SendError> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        if buf.len() <= inner.rndv.switch {
            drop(inner);
            self.send(buf)?;
            return Ok(SendHandle {
                conn: self,
                id: None,
                len: buf.len(),
                exposure: None,
            });
        }
        let r = Self::start_rndv(&mut inner, &self.target, buf);
        let (id, exposure) = inner.note(r)?;
        Ok(SendHandle {
            conn: self,
            id: Some(id),
            len: buf.len(),
            exposure: Some(exposure),
        })
    }

    fn start_rndv<'b>(
        inner: &mut Inner<L>,
        target: &T,
        buf: &'b [u8],
    ) -> Result<(u64, Exposure<'b>), SendError> {
        let Some(exposure) = inner.link.rndv_expose(buf)? else {
            let max = inner.rndv.max_eager;
            if buf.len() <= max {
                // No rendezvous on this link: the threshold cannot apply.
                return Err(SendError::WouldBlock);
            }
            return Err(SendError::TooLarge {
                len: buf.len(),
                max,
            });
        };
        let id = inner.rndv.sends.start();
        // Streamed at once (the chunks follow the request) when the peer cannot read us.
        let stream_now = inner.link.rndv_can_stream()
            && (inner.rndv.cfg.stream_only || inner.rndv.peer_cannot_read);
        let req = ControlMessage::RendezvousRequest {
            id,
            addr: exposure.addr(),
            len: buf.len() as u64,
            rkey: if stream_now {
                STREAMED_RKEY
            } else {
                exposure.rkey()
            },
        };
        match inner.send_control_blocking(&req) {
            Ok(seq) => inner.rndv.sends.requested(id, seq),
            Err(e) => {
                inner.rndv.sends.forget(id);
                return Err(e.into());
            }
        }
        if stream_now && let Err(e) = inner.push_chunks(target, id, buf) {
            inner.rndv.sends.forget(id);
            return Err(e);
        }
        if !stream_now && inner.link.rndv_can_stream() {
            // Should the peer ask for the chunks, the connection sends them itself.
            inner.rndv.exposed.insert(id, (exposure.addr(), buf.len()));
        }
        tracing::trace!(id, len = buf.len(), "rendezvous requested");
        Ok((id, exposure))
    }

    /// Blocking rendezvous send (the large branch of [`Connection::send`]).
    pub(super) fn send_rndv(&self, buf: &[u8]) -> Result<(), SendError> {
        let r = {
            let mut inner = self.inner.borrow_mut();
            Self::start_rndv(&mut inner, &self.target, buf)
        };
        match r {
            Ok((id, exposure)) => SendHandle {
                conn: self,
                id: Some(id),
                len: buf.len(),
                exposure: Some(exposure),
            }
            .wait(),
            // A link without rendezvous under the threshold: send eagerly.
            Err(SendError::WouldBlock) => self.send_eager(buf),
            Err(e) => Err(e),
        }
    }

    /// Polls for answers to rendezvous transfers without waiting (progress for
    /// [`SendHandle::test`]).
    fn rndv_poll(&self, id: u64, wait: bool) -> Result<RndvState, SendError> {
        let mut inner = self.inner.borrow_mut();
        let mut idle = 0usize;
        loop {
            inner.check()?;
            match inner.rndv.sends.state(id) {
                Some(RndvState::Waiting | RndvState::Streamed) => {}
                Some(s) => return Ok(s),
                None => {
                    return Err(SendError::Transport(TransportError::Failed(
                        "unknown rendezvous transfer".into(),
                    )));
                }
            }
            let w = if wait { Wait::Forever } else { Wait::No };
            // Not waiting, a bounded number of arrivals without the answer ends the call
            // ([`Inner::idle_budget`]); the rest stays queued.
            if !wait && idle >= inner.idle_budget() {
                return Ok(RndvState::Waiting);
            }
            if idle == 0
                && let Err(e) = inner.give_back(&self.target)
            {
                return Err(SendError::Transport(inner.fail(e)));
            }
            idle += 1;
            match inner.progress(&self.target, w, true) {
                Ok(true) => {}
                Ok(false) => return Ok(RndvState::Waiting),
                Err(e) => return Err(SendError::Transport(inner.fail(e))),
            }
        }
    }

    /// Receives at least one and at most `bufs.len()` messages, one into each buffer in order,
    /// waiting only for the first; returns their lengths. Rendezvous messages among them are read
    /// concurrently where the link can (verbs: their RDMA READs are in flight together, up to the
    /// QP's limit), which is what a stream of large messages needs to keep the link busy. A
    /// message that cannot join the batch (a refusal, a buffer too short, a message over shared
    /// memory) ends it, or, as the first, is received as [`Connection::recv_into`] would.
    ///
    /// # Errors
    /// As [`Connection::recv_into`].
    pub fn recv_into_many(&self, bufs: &mut [&mut [u8]]) -> Result<Vec<usize>, TransportError> {
        if bufs.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        // Whatever has arrived, and at least one message. Once it has one, it takes no more
        // arrivals without waiting than a receive that does not wait ([`Inner::idle_budget`]).
        let mut idle = 0usize;
        loop {
            let w = if inner.rndv.ready.is_empty() {
                Wait::Forever
            } else if inner.rndv.ready.len() < bufs.len() && idle < inner.idle_budget() {
                idle += 1;
                Wait::No
            } else {
                break;
            };
            match inner.progress(&self.target, w, false) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(inner.fail(e)),
            }
        }
        let batchable = |inner: &Inner<L>, r: &Ready, room: usize| match r {
            Ready::Data(d) => d.len <= room,
            Ready::Owned { data, .. } => data.len() <= room,
            Ready::Request { req, .. } => req.len <= room && !inner.link.rndv_can_stream(),
            Ready::Refuse { .. } | Ready::Partial { .. } | Ready::Streamed { .. } => false,
        };
        let first_ok = inner
            .rndv
            .ready
            .front()
            .is_some_and(|r| batchable(&inner, r, bufs[0].len()));
        if !first_ok {
            // Received alone, as `recv_into` receives it.
            drop(inner);
            return self.recv_into(bufs[0]).map(|n| vec![n]);
        }
        let mut lens = Vec::with_capacity(bufs.len());
        let mut reqs = Vec::new();
        let mut dsts: Vec<&mut [u8]> = Vec::new();
        for buf in bufs.iter_mut() {
            let Some(r) = inner.rndv.ready.front() else {
                break;
            };
            if !batchable(&inner, r, buf.len()) {
                break;
            }
            let Some(r) = inner.rndv.ready.pop_front() else {
                break;
            };
            match r {
                Ready::Data(d) => {
                    let data = self.target.bytes(d.token.segment(), d.offset, d.len)?;
                    crate::copy::copy(&mut buf[..d.len], data);
                    if let Err(e) = inner.release(d.token) {
                        return Err(inner.fail(e));
                    }
                    lens.push(d.len);
                }
                Ready::Owned { data, .. } => {
                    crate::copy::copy(&mut buf[..data.len()], &data);
                    lens.push(data.len());
                }
                Ready::Request { req, .. } => {
                    lens.push(req.len);
                    dsts.push(&mut buf[..req.len]);
                    reqs.push(req);
                }
                other => {
                    // Not batchable (checked above): left for the next receive.
                    inner.rndv.ready.push_front(other);
                    break;
                }
            }
        }
        if reqs.is_empty() {
            return Ok(lens);
        }
        let r = match inner.link.rndv_read_many(&reqs, &mut dsts) {
            Some(r) => r,
            None => {
                // One at a time (requests are batched only on links that read them together,
                // so this is only a fallback).
                let mut r = Ok(());
                for (req, dst) in reqs.iter().zip(dsts.iter_mut()) {
                    match inner.link.rndv_read(req, dst, true) {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => {
                            r = Err(TransportError::Failed(format!(
                                "rendezvous read refused in a batch: {}",
                                refuse_reason::describe(reason)
                            )));
                            break;
                        }
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    }
                }
                r
            }
        };
        if let Err(e) = r {
            return Err(inner.fail(e));
        }
        for req in &reqs {
            if let Err(e) = inner.answer(ControlMessage::RendezvousDone { id: req.id }) {
                return Err(inner.fail(e));
            }
            inner.rndv.stats.received += 1;
            inner.rndv.stats.received_bytes += req.len as u64;
            inner.rndv.stats.into_caller_buffer += 1;
        }
        Ok(lens)
    }

    /// Whether the peer reads this side's rendezvous buffers itself. `false` on shared memory
    /// when the connection's handshake found that the peer may not read this process
    /// (`process_vm_readv` not permitted, or [`RndvConfig::stream_only`] set on the peer), or
    /// when the peer asked for a transfer through the segments since: then every rendezvous
    /// message this side sends is streamed through the segments from the start
    /// (see `docs/rendezvous.md`). Always `true` on verbs.
    pub fn rndv_peer_can_read(&self) -> bool {
        !self.inner.borrow().rndv.peer_cannot_read
    }

    /// Records what the shared-memory handshake found: whether the peer can read our memory,
    /// and whether we can read the peer's.
    pub(super) fn set_rndv_readability(&self, peer_reads_us: bool, we_read_peer: bool) {
        let mut inner = self.inner.borrow_mut();
        inner.rndv.peer_cannot_read = !peer_reads_us;
        inner.rndv.we_cannot_read = !we_read_peer;
    }

    /// The rendezvous settings.
    pub fn rndv_config(&self) -> RndvConfig {
        self.inner.borrow().rndv.cfg
    }

    /// Replaces the rendezvous settings (switch point, receive limit, cache cap). The default
    /// comes from `RSMSG_RNDV_THRESHOLD`, `RSMSG_RNDV_MAX` and `RSMSG_RNDV_CACHE`.
    pub fn set_rndv_config(&self, cfg: RndvConfig) {
        let mut inner = self.inner.borrow_mut();
        let max_eager = inner.rndv.max_eager;
        inner.rndv.switch = cfg.switch_point(max_eager);
        let old = inner.rndv.cfg;
        inner.rndv.cfg = cfg;
        if old.cache_bytes != cfg.cache_bytes {
            inner.link.rndv_set_cache_cap(cfg.cache_bytes);
        }
        if old.send_cache_bytes != cfg.send_cache_bytes {
            inner.link.rndv_set_send_cache_cap(cfg.send_cache_bytes);
        }
    }

    /// The longest message sent eagerly (through partitions); longer ones go by rendezvous.
    pub fn switch_point(&self) -> usize {
        self.inner.borrow().rndv.switch
    }

    /// Rendezvous counters.
    pub fn rndv_stats(&self) -> RndvStats {
        self.inner.borrow().rndv.stats
    }

    /// The receive-destination registration cache's counters (verbs), if any.
    pub fn rndv_cache_stats(&self) -> Option<RegCacheStats> {
        self.inner.borrow().link.rndv_cache_stats()
    }

    /// The send-buffer registration cache's counters (verbs with memory windows and
    /// [`RndvConfig::send_cache_bytes`] set), if any.
    pub fn rndv_send_cache_stats(&self) -> Option<RegCacheStats> {
        self.inner.borrow().link.rndv_send_cache_stats()
    }

    /// Drops cached registrations overlapping `buf` (receive destinations and send buffers):
    /// call it before freeing or unmapping a buffer given to [`Connection::recv_into`] or sent
    /// by rendezvous while a cache is enabled (see `docs/rendezvous.md`). Returns how many were
    /// dropped.
    pub fn rndv_invalidate(&self, buf: &[u8]) -> usize {
        self.inner
            .borrow_mut()
            .link
            .rndv_invalidate(buf.as_ptr() as u64, buf.len())
    }
}

/// A send in progress ([`Connection::send_start`]). The buffer stays borrowed (and, for a
/// rendezvous, exposed to the receiver) until the transfer completes; dropping an unfinished
/// handle waits for it.
pub struct SendHandle<'c, 'b, L: Link, T: TargetMemory> {
    conn: &'c Connection<L, T>,
    id: Option<u64>,
    len: usize,
    exposure: Option<Exposure<'b>>,
}

impl<L: Link, T: TargetMemory> std::fmt::Debug for SendHandle<'_, '_, L, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendHandle")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("pending", &self.exposure.is_some())
            .finish()
    }
}

impl<L: Link, T: TargetMemory> SendHandle<'_, '_, L, T> {
    /// Whether the transfer went by rendezvous.
    pub fn is_rendezvous(&self) -> bool {
        self.id.is_some()
    }

    /// Message length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes progress without waiting: `Ok(true)` once the receiver has the message (the
    /// buffer may then be reused).
    ///
    /// # Errors
    /// [`SendError::Refused`] when the receiver refused it; [`SendError::Transport`].
    pub fn test(&mut self) -> Result<bool, SendError> {
        let Some(id) = self.id else {
            return Ok(true);
        };
        if self.exposure.is_none() {
            return Ok(true);
        }
        let s = self.conn.rndv_poll(id, false)?;
        self.settle(id, s)
    }

    /// Waits until the receiver has the message.
    ///
    /// # Errors
    /// As [`SendHandle::test`].
    pub fn wait(mut self) -> Result<(), SendError> {
        self.wait_mut()
    }

    fn wait_mut(&mut self) -> Result<(), SendError> {
        let Some(id) = self.id else {
            return Ok(());
        };
        loop {
            if self.exposure.is_none() {
                return Ok(());
            }
            let s = match self.conn.rndv_poll(id, true) {
                Ok(s) => s,
                Err(e) => {
                    self.finish(id);
                    return Err(e);
                }
            };
            if self.settle(id, s)? {
                return Ok(());
            }
        }
    }

    /// Sends the message through the segments in chunks (the receiver asked for it: it cannot
    /// read our buffer), when the connection did not already send them on the request's arrival
    /// ([`Inner::push_own`]; it does for every transfer it exposed by address).
    fn push_chunks(&mut self, id: u64) -> Result<(), SendError> {
        let mut inner = self.conn.inner.borrow_mut();
        let Some(data) = self.exposure.as_ref().and_then(|e| e.data) else {
            let e = TransportError::from(ProtocolError::BadControl {
                ty: 5,
                len: 12,
                reason: "stream request for a buffer this link exposes only by key",
            });
            return Err(SendError::Transport(inner.fail(e)));
        };
        inner.push_chunks(&self.conn.target, id, data)
    }

    fn finish(&mut self, id: u64) {
        let mut inner = self.conn.inner.borrow_mut();
        // Revoke the exposure first: from here the peer cannot read the buffer.
        if let Some(e) = self.exposure.take() {
            inner.link.rndv_revoke(e);
        }
        inner.rndv.exposed.remove(&id);
        inner.rndv.sends.forget(id);
    }

    fn settle(&mut self, id: u64, s: RndvState) -> Result<bool, SendError> {
        match s {
            RndvState::Waiting | RndvState::Streamed => Ok(false),
            RndvState::Stream => match self.push_chunks(id) {
                Ok(()) => Ok(false),
                Err(e) => {
                    self.finish(id);
                    Err(e)
                }
            },
            RndvState::Done => {
                self.finish(id);
                let mut inner = self.conn.inner.borrow_mut();
                inner.rndv.stats.sent += 1;
                inner.rndv.stats.sent_bytes += self.len as u64;
                Ok(true)
            }
            RndvState::Refused(reason) => {
                self.finish(id);
                self.conn.inner.borrow_mut().rndv.stats.refused_by_peer += 1;
                Err(SendError::Refused {
                    len: self.len,
                    reason,
                })
            }
        }
    }
}

impl<L: Link, T: TargetMemory> Drop for SendHandle<'_, '_, L, T> {
    fn drop(&mut self) {
        if self.exposure.is_some() {
            // The peer may be reading the buffer: wait for its answer (or the connection's
            // failure) before the borrow ends.
            let _ = self.wait_mut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_buffer_grows_with_its_chunks_and_never_past_its_length() {
        let total = 10_000;
        let mut v = Vec::new();
        let chunk = [7u8; 3000];
        append_chunk(&mut v, &chunk, total);
        assert_eq!(v.len(), 3000);
        assert!(v.capacity() < total, "reserved {} up front", v.capacity());
        append_chunk(&mut v, &chunk, total);
        append_chunk(&mut v, &chunk, total);
        append_chunk(&mut v, &chunk[..1000], total);
        assert_eq!(v.len(), total);
        assert!(v.capacity() <= total, "{}", v.capacity());
        assert!(v.iter().all(|&b| b == 7));
    }

    #[test]
    fn the_ready_queue_keeps_its_counts() {
        let mut q = ReadyQueue::default();
        let partial = |got| Ready::Partial {
            id: 1,
            len: 10,
            seq: 0,
            got,
            data: Some(Vec::new()),
            refuse: 0,
        };
        q.push_back(Ready::Owned {
            data: vec![0; 100],
            seq: 0,
        });
        q.push_back(partial(0));
        q.push_front(Ready::Refuse {
            streamed: false,
            id: 2,
            len: 5,
            reason: refuse_reason::NO_ROOM,
        });
        assert_eq!((q.transfers, q.incoming, q.copied), (2, 1, 100));
        // The partial completes: taken out and put back.
        let r = q.remove(2);
        assert!(matches!(r, Some(Ready::Partial { .. })));
        q.insert(
            2,
            Ready::Streamed {
                id: 1,
                seq: 0,
                data: vec![0; 10],
            },
        );
        assert_eq!((q.transfers, q.incoming, q.copied), (2, 0, 100));
        q.replace(
            1,
            Ready::Owned {
                data: vec![0; 40],
                seq: 0,
            },
        );
        assert_eq!(q.copied, 40);
        while q.pop_front().is_some() {}
        assert_eq!((q.transfers, q.incoming, q.copied, q.len()), (0, 0, 0, 0));
        assert!(q.is_empty());
    }
}
