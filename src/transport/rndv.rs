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

use std::collections::VecDeque;
use std::marker::PhantomData;

use super::conn::{Connection, Got, Inner, Message, SendError, Wait};
use super::{Link, TargetMemory, TransportError};
use crate::core::wire::{HEADER_LEN, Immediate, ImmediateKind};
use crate::core::{
    ControlMessage, Delivery, MessageKind, RndvConfig, RndvRequest, RndvSends, RndvState,
    refuse_reason,
};
use crate::verbs::{RegCacheStats, RemoteReadGrant};

/// A buffer exposed to the peer for one rendezvous transfer; the exposure ends when it drops
/// (verbs: the remote-read registration is deregistered, its rkey dead).
#[derive(Debug)]
pub struct Exposure<'b> {
    addr: u64,
    rkey: u32,
    _grant: Option<RemoteReadGrant<'b>>,
    _buf: PhantomData<&'b [u8]>,
}

impl<'b> Exposure<'b> {
    /// An exposure by a remote-read registration (verbs).
    pub fn registered(grant: RemoteReadGrant<'b>) -> Self {
        Exposure {
            addr: grant.addr(),
            rkey: grant.rkey().0,
            _grant: Some(grant),
            _buf: PhantomData,
        }
    }

    /// An exposure by address only (shared memory: the peer reads it with `process_vm_readv`).
    pub fn by_address(buf: &'b [u8]) -> Self {
        Exposure {
            addr: buf.as_ptr() as u64,
            rkey: 0,
            _grant: None,
            _buf: PhantomData,
        }
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
}

/// What arrived while this side waited for a rendezvous answer: kept in order for the next
/// receive.
#[derive(Debug, Clone, Copy)]
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
    /// A rendezvous request to refuse at the next receive.
    Refuse {
        /// The sender's id.
        id: u64,
        /// Announced length.
        len: u64,
        /// Refusal code.
        reason: u32,
    },
}

/// The rendezvous state of a connection.
#[derive(Debug)]
pub(super) struct RndvInner {
    pub(super) cfg: RndvConfig,
    /// Messages longer than this go by rendezvous.
    pub(super) switch: usize,
    max_eager: usize,
    sends: RndvSends,
    pub(super) ready: VecDeque<Ready>,
    stats: RndvStats,
}

impl RndvInner {
    pub(super) fn new(max_eager: usize) -> Self {
        let cfg = RndvConfig::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the rendezvous environment");
            RndvConfig::default()
        });
        RndvInner {
            switch: cfg.switch_point(max_eager),
            cfg,
            max_eager,
            sends: RndvSends::new(),
            ready: VecDeque::new(),
            stats: RndvStats::default(),
        }
    }
}

impl<L: Link> Inner<L> {
    /// Sends a control message, waiting for credits.
    fn send_control_blocking(&mut self, msg: &ControlMessage) -> Result<(), TransportError> {
        loop {
            match self.send_control(msg) {
                Ok(()) => return Ok(()),
                Err(SendError::WouldBlock) => self.wait_credit()?,
                Err(SendError::Transport(e)) => return Err(e),
                Err(e) => return Err(TransportError::Failed(e.to_string())),
            }
        }
    }

    /// Takes one immediate (waiting as `wait` says) and files what it brings: credits to the
    /// sender, answers to the rendezvous table, data and requests to the ready queue. `Ok(false)`
    /// when nothing came.
    fn progress(&mut self, target: &impl TargetMemory, wait: Wait) -> Result<bool, TransportError> {
        let Some(imm) = self.next_immediate(wait)? else {
            return Ok(false);
        };
        match Immediate(imm).decode()? {
            ImmediateKind::Credit { .. } => {
                self.tx.handle_credit_notice(imm)?;
            }
            ImmediateKind::Message { .. } => {
                let arrival = self.rx.on_immediate(imm)?;
                let header =
                    target.bytes(arrival.segment(), arrival.header_offset(), HEADER_LEN)?;
                let d = self.rx.accept(arrival, header)?;
                match d.kind {
                    MessageKind::Data => self.rndv.ready.push_back(Ready::Data(d)),
                    MessageKind::Control => {
                        let body = target.bytes(d.token.segment(), d.offset, d.len)?;
                        let msg = ControlMessage::decode(body);
                        self.release(d.token)?;
                        if let Some(r) = self.file_control(msg?, d.seq)? {
                            self.rndv.ready.push_back(r);
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
                Ok(None)
            }
            ControlMessage::RendezvousRefused { id, reason } => {
                self.rndv.sends.answer(id, Some(reason))?;
                Ok(None)
            }
            ControlMessage::RendezvousRequest {
                id,
                addr,
                len,
                rkey,
            } => Ok(Some(
                match RndvRequest::validate(id, addr, len, rkey, self.rndv.cfg.max_recv) {
                    Ok(req) => Ready::Request { req, seq },
                    Err(reason) => Ready::Refuse { id, len, reason },
                },
            )),
        }
    }

    /// Refuses request `id` towards the sender and builds this side's error.
    fn refuse(&mut self, id: u64, len: u64, reason: u32) -> TransportError {
        self.rndv.stats.refused_here += 1;
        tracing::debug!(id, len, reason, "refusing a rendezvous request");
        match self.send_control_blocking(&ControlMessage::RendezvousRefused { id, reason }) {
            Ok(()) => TransportError::RendezvousRefused { len, reason },
            Err(e) => e,
        }
    }

    /// Reads request `req` into `dst` and answers done.
    fn read_and_answer(
        &mut self,
        req: &RndvRequest,
        dst: &mut [u8],
        cacheable: bool,
    ) -> Result<(), TransportError> {
        match self.link.rndv_read(req, dst, cacheable)? {
            Ok(()) => {
                self.send_control_blocking(&ControlMessage::RendezvousDone { id: req.id })?;
                self.rndv.stats.received += 1;
                self.rndv.stats.received_bytes += req.len as u64;
                Ok(())
            }
            Err(reason) => Err(self.refuse(req.id, req.len as u64, reason)),
        }
    }
}

impl<L: Link, T: TargetMemory> Connection<L, T> {
    /// Serves a rendezvous request: into `dst` when given (`Got::Landed`), else into a buffer
    /// the returned message owns.
    pub(super) fn serve<'a>(
        &'a self,
        inner: &mut Inner<L>,
        ready: Ready,
        dst: Option<&mut [u8]>,
    ) -> Result<Got<'a, L, T>, TransportError> {
        match ready {
            Ready::Data(d) => {
                let data = self.target.bytes(d.token.segment(), d.offset, d.len)?;
                Ok(Got::Msg(Message {
                    conn: self,
                    token: Some(d.token),
                    data,
                    owned: None,
                    seq: d.seq,
                }))
            }
            Ready::Refuse { id, len, reason } => Err(inner.refuse(id, len, reason)),
            Ready::Request { req, seq } => match dst {
                Some(buf) if buf.len() >= req.len => {
                    inner.read_and_answer(&req, &mut buf[..req.len], true)?;
                    inner.rndv.stats.into_caller_buffer += 1;
                    Ok(Got::Landed(req.len))
                }
                Some(_) => Err(inner.refuse(req.id, req.len as u64, refuse_reason::NO_ROOM)),
                None => {
                    let mut v = vec![0u8; req.len];
                    inner.read_and_answer(&req, &mut v, false)?;
                    Ok(Got::Msg(Message {
                        conn: self,
                        token: None,
                        data: &[],
                        owned: Some(v),
                        seq,
                    }))
                }
            },
        }
    }

    /// Starts sending `buf`: a message up to the switch point is sent at once (waiting for
    /// credits like [`Connection::send`]) and the handle is already complete; a longer one is
    /// exposed to the receiver and announced, and the handle completes when the receiver has
    /// read it. Several transfers may be in flight on one connection; each handle borrows its
    /// buffer until it completes.
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
        let r = Self::start_rndv(&mut inner, buf);
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
        let req = ControlMessage::RendezvousRequest {
            id,
            addr: exposure.addr(),
            len: buf.len() as u64,
            rkey: exposure.rkey(),
        };
        if let Err(e) = inner.send_control_blocking(&req) {
            inner.rndv.sends.forget(id);
            return Err(e.into());
        }
        tracing::trace!(id, len = buf.len(), "rendezvous requested");
        Ok((id, exposure))
    }

    /// Blocking rendezvous send (the large branch of [`Connection::send`]).
    pub(super) fn send_rndv(&self, buf: &[u8]) -> Result<(), SendError> {
        let r = {
            let mut inner = self.inner.borrow_mut();
            Self::start_rndv(&mut inner, buf)
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
        loop {
            inner.check()?;
            match inner.rndv.sends.state(id) {
                Some(RndvState::Waiting) => {}
                Some(s) => return Ok(s),
                None => {
                    return Err(SendError::Transport(TransportError::Failed(
                        "unknown rendezvous transfer".into(),
                    )));
                }
            }
            let w = if wait { Wait::Forever } else { Wait::No };
            match inner.progress(&self.target, w) {
                Ok(true) => {}
                Ok(false) => return Ok(RndvState::Waiting),
                Err(e) => return Err(SendError::Transport(inner.fail(e))),
            }
        }
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
        inner.rndv.cfg = cfg;
        inner.link.rndv_set_cache_cap(cfg.cache_bytes);
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

    /// Drops cached registrations overlapping `buf`: call it before freeing or unmapping a
    /// buffer given to [`Connection::recv_into`] while the cache is enabled (see
    /// `docs/rendezvous.md`). Returns how many were dropped.
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
        self.settle(id, s).map(|_| ())
    }

    fn finish(&mut self, id: u64) {
        // Revoke the exposure first: from here the peer cannot read the buffer.
        self.exposure = None;
        self.conn.inner.borrow_mut().rndv.sends.forget(id);
    }

    fn settle(&mut self, id: u64, s: RndvState) -> Result<bool, SendError> {
        match s {
            RndvState::Waiting => Ok(false),
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
