//! Reliable-connected queue pairs: creation, connection (INIT -> RTR -> RTS) and posting.

use std::io;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{
    ibv_qp, ibv_qp_attr, ibv_qp_attr_mask as M, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type,
    ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode,
};

use super::cq::{CompletionQueue, CqInner};
use super::device::GidSelector;
use super::error::{Result, VerbsError};
use super::mr::{MemoryRegion, ProtectionDomain};
use super::mw::MemoryWindow;
use super::types::{AccessFlags, Gid, GidIndex, LinkLayer, Mtu, Psn, QpNum, Rkey, WrId};

/// Most scatter/gather entries a [`SendWr`] or [`RecvWr`] holds (they are stored inline so that
/// posting never allocates).
pub const MAX_SGE: usize = 4;

/// Sizes requested for a new QP (`ibv_create_qp(3)`); the provider may round them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpConfig {
    /// Outstanding send work requests.
    pub max_send_wr: u32,
    /// Outstanding receive work requests.
    pub max_recv_wr: u32,
    /// SGEs per send work request (at most [`MAX_SGE`]).
    pub max_send_sge: u32,
    /// SGEs per receive work request (at most [`MAX_SGE`]).
    pub max_recv_sge: u32,
    /// Bytes that may be sent inline (copied by the CPU at post time).
    pub max_inline_data: u32,
    /// Signal every send (otherwise only the work requests marked signaled complete).
    pub sig_all: bool,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            max_send_wr: 128,
            max_recv_wr: 128,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
            sig_all: false,
        }
    }
}

/// The sizes the provider granted to a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding send work requests.
    pub max_send_wr: u32,
    /// Outstanding receive work requests.
    pub max_recv_wr: u32,
    /// SGEs per send work request.
    pub max_send_sge: u32,
    /// SGEs per receive work request.
    pub max_recv_sge: u32,
    /// Bytes that may be sent inline.
    pub max_inline_data: u32,
}

/// The state of a QP (`enum ibv_qp_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QpState {
    /// Just created or reset.
    Reset,
    /// Initialised: receive WRs may be posted.
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Send queue drained.
    Sqd,
    /// Send queue error.
    Sqe,
    /// Error: every outstanding WR is flushed.
    Err,
    /// Unknown.
    Unknown,
}

impl QpState {
    fn from_raw(v: u32) -> QpState {
        match v {
            ibv_qp_state::IBV_QPS_RESET => QpState::Reset,
            ibv_qp_state::IBV_QPS_INIT => QpState::Init,
            ibv_qp_state::IBV_QPS_RTR => QpState::Rtr,
            ibv_qp_state::IBV_QPS_RTS => QpState::Rts,
            ibv_qp_state::IBV_QPS_SQD => QpState::Sqd,
            ibv_qp_state::IBV_QPS_SQE => QpState::Sqe,
            ibv_qp_state::IBV_QPS_ERR => QpState::Err,
            _ => QpState::Unknown,
        }
    }
}

/// What one side of a connection tells the other (through a bootstrap) to connect an RC QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// QP number.
    pub qpn: QpNum,
    /// First PSN this side sends (the other side's expected receive PSN).
    pub psn: Psn,
    /// Source GID (RoCE; on InfiniBand used for routing across subnets only).
    pub gid: Gid,
    /// Index of `gid` in the local table (meaningful only to its owner).
    pub gid_index: GidIndex,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU of the port.
    pub mtu: Mtu,
    /// Port number (meaningful only to its owner).
    pub port: u8,
    /// Link layer of the port.
    pub link_layer: LinkLayer,
}

impl QpEndpoint {
    /// Length of the wire encoding.
    pub const WIRE_LEN: usize = 32;
    const VERSION: u8 = 1;

    /// Encode for exchange: version, link layer, MTU, port, QPN, PSN, LID, GID index, GID
    /// (big-endian, fixed 32 bytes).
    pub fn encode(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[0] = Self::VERSION;
        b[1] = self.link_layer.to_raw();
        b[2] = self.mtu.to_raw() as u8;
        b[3] = self.port;
        b[4..8].copy_from_slice(&self.qpn.0.to_be_bytes());
        b[8..12].copy_from_slice(&self.psn.get().to_be_bytes());
        b[12..14].copy_from_slice(&self.lid.to_be_bytes());
        b[14] = self.gid_index.0;
        b[16..32].copy_from_slice(&self.gid.0);
        b
    }

    /// Decode and validate an endpoint received from a peer.
    ///
    /// # Errors
    /// [`VerbsError::InvalidEndpoint`] naming the first bad field.
    pub fn decode(b: &[u8]) -> Result<QpEndpoint> {
        let bad = VerbsError::InvalidEndpoint;
        if b.len() != Self::WIRE_LEN {
            return Err(bad("wrong length"));
        }
        if b[0] != Self::VERSION {
            return Err(bad("unknown version"));
        }
        if b[1] > 2 {
            return Err(bad("unknown link layer"));
        }
        let link_layer = LinkLayer::from_raw(b[1]);
        let mtu = Mtu::from_raw(b[2].into()).ok_or(bad("MTU out of range"))?;
        if b[15] != 0 {
            return Err(bad("reserved byte not zero"));
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let ep = QpEndpoint {
            link_layer,
            mtu,
            port: b[3],
            qpn: QpNum(u32_at(4)),
            psn: Psn::new(u32_at(8)).ok_or(bad("PSN exceeds 24 bits"))?,
            lid: u16::from_be_bytes([b[12], b[13]]),
            gid_index: GidIndex(b[14]),
            gid: Gid(b[16..32].try_into().expect("16 bytes")),
        };
        ep.validate()?;
        Ok(ep)
    }

    /// Check the fields a connection relies on.
    ///
    /// # Errors
    /// [`VerbsError::InvalidEndpoint`].
    pub fn validate(&self) -> Result<()> {
        let bad = VerbsError::InvalidEndpoint;
        if self.qpn.0 > 0x00ff_ffff {
            return Err(bad("QPN exceeds 24 bits"));
        }
        if self.qpn.0 < 2 {
            return Err(bad("QPN 0 and 1 are special QPs"));
        }
        if self.port == 0 {
            return Err(bad("port 0"));
        }
        if self.link_layer.is_ethernet() && self.gid.is_zero() {
            return Err(bad("RoCE endpoint without GID"));
        }
        if !self.link_layer.is_ethernet() && self.lid == 0 && self.gid.is_zero() {
            return Err(bad("InfiniBand endpoint without LID or GID"));
        }
        Ok(())
    }
}

/// Parameters of [`QueuePair::connect`]; the defaults suit IB and RoCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectParams {
    /// Largest path MTU to use (the smaller of both ports' MTUs and this is used).
    pub max_mtu: Mtu,
    /// Local ACK timeout exponent (4.096 us * 2^timeout); 14 is about 67 ms.
    pub timeout: u8,
    /// Transport retries (0..=7).
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// RNR NAK timer code advertised to the peer.
    pub min_rnr_timer: u8,
    /// Outstanding RDMA READs initiated / accepted (capped by the device).
    pub max_rd_atomic: u8,
    /// Rights granted to the peer on this QP.
    pub remote_access: AccessFlags,
    /// IP hop limit (RoCE v2) / GRH hop limit.
    pub hop_limit: u8,
    /// Traffic class (RoCE: DSCP/ECN byte).
    pub traffic_class: u8,
    /// Service level.
    pub sl: u8,
}

impl Default for ConnectParams {
    fn default() -> Self {
        ConnectParams {
            max_mtu: Mtu::Mtu4096,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            max_rd_atomic: 16,
            remote_access: AccessFlags::LOCAL_WRITE
                | AccessFlags::REMOTE_WRITE
                | AccessFlags::REMOTE_READ,
            hop_limit: 64,
            traffic_class: 0,
            sl: 0,
        }
    }
}

/// An RC queue pair (`ibv_create_qp(3)`). Keeps its PD and CQs alive; destroyed on drop.
/// Posting takes `&mut self`.
pub struct QueuePair {
    qp: NonNull<ibv_qp>,
    caps: QpCaps,
    pd: ProtectionDomain,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
}

// SAFETY: the QP handle may be used from any thread (libibverbs verbs are thread-safe); posting
// needs `&mut self`, so one thread posts at a time; destruction happens once, in `Drop`.
unsafe impl Send for QueuePair {}
// SAFETY: `&QueuePair` only reads immutable fields or calls `ibv_query_qp`, which is thread-safe.
unsafe impl Sync for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_qp` and destroyed once; the PD and CQs it uses are still
        // alive (their `Arc`s are fields, dropped after this).
        let rc = unsafe { rdma_sys::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            tracing::warn!(qpn = %self.qp_num(), rc, "ibv_destroy_qp failed");
        }
    }
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qp_num())
            .field("caps", &self.caps)
            .finish()
    }
}

fn zeroed_attr() -> ibv_qp_attr {
    // SAFETY: `ibv_qp_attr` is plain-old-data (integers, a union of integers for the GID);
    // all-zero is a valid value and what the verbs expect for unused fields.
    unsafe { MaybeUninit::<ibv_qp_attr>::zeroed().assume_init() }
}

impl QueuePair {
    /// Create an RC QP in the RESET state (`ibv_create_qp(3)`).
    ///
    /// # Errors
    /// [`VerbsError::TooManySge`] if the config asks for more than [`MAX_SGE`];
    /// [`VerbsError::CreateQp`] (e.g. `EINVAL` for sizes beyond the device limits).
    pub fn new(
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        cfg: &QpConfig,
    ) -> Result<QueuePair> {
        if cfg.max_send_sge as usize > MAX_SGE || cfg.max_recv_sge as usize > MAX_SGE {
            return Err(VerbsError::TooManySge { max: MAX_SGE });
        }
        // SAFETY: plain-old-data; all-zero is valid (null pointers, zero sizes).
        let mut init: ibv_qp_init_attr = unsafe { MaybeUninit::zeroed().assume_init() };
        init.send_cq = send_cq.inner.cq.as_ptr();
        init.recv_cq = recv_cq.inner.cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = i32::from(cfg.sig_all);
        init.cap.max_send_wr = cfg.max_send_wr;
        init.cap.max_recv_wr = cfg.max_recv_wr;
        init.cap.max_send_sge = cfg.max_send_sge;
        init.cap.max_recv_sge = cfg.max_recv_sge;
        init.cap.max_inline_data = cfg.max_inline_data;
        // SAFETY: valid PD and CQs of the same context (kept alive by the fields below); `init`
        // is a fully initialised attribute struct that the call updates with the granted caps.
        let qp = unsafe { rdma_sys::ibv_create_qp(pd.raw(), &mut init) };
        let qp =
            NonNull::new(qp).ok_or_else(|| VerbsError::CreateQp(io::Error::last_os_error()))?;
        let caps = QpCaps {
            max_send_wr: init.cap.max_send_wr,
            max_recv_wr: init.cap.max_recv_wr,
            max_send_sge: init.cap.max_send_sge.min(MAX_SGE as u32),
            max_recv_sge: init.cap.max_recv_sge.min(MAX_SGE as u32),
            max_inline_data: init.cap.max_inline_data,
        };
        let qp = QueuePair {
            qp,
            caps,
            pd: pd.clone(),
            _send_cq: send_cq.inner.clone(),
            _recv_cq: recv_cq.inner.clone(),
        };
        tracing::debug!(qpn = %qp.qp_num(), ?caps, "created RC QP");
        Ok(qp)
    }

    /// The QP number.
    pub fn qp_num(&self) -> QpNum {
        // SAFETY: the QP struct is valid while `self` lives; `qp_num` is fixed at creation.
        QpNum(unsafe { self.qp.as_ref().qp_num })
    }

    /// The sizes granted at creation.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The protection domain.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// This side's endpoint for `port`: QPN, `psn`, the chosen GID, LID and active MTU.
    ///
    /// # Errors
    /// [`VerbsError::PortNotActive`], [`VerbsError::NoUsableGid`], query errors.
    pub fn local_endpoint(&self, port: u8, gid: GidSelector, psn: Psn) -> Result<QpEndpoint> {
        let ctx = self.pd.context();
        let pa = ctx.active_port(port)?;
        let g = ctx.select_gid(port, gid)?;
        Ok(QpEndpoint {
            qpn: self.qp_num(),
            psn,
            gid: g.gid,
            gid_index: g.index,
            lid: pa.lid,
            mtu: pa.active_mtu.unwrap_or(Mtu::Mtu1024),
            port,
            link_layer: pa.link_layer,
        })
    }

    fn modify(&mut self, attr: &mut ibv_qp_attr, mask: M, to: &'static str) -> Result<()> {
        // SAFETY: valid QP; `attr` is initialised and the mask names only fields that were set.
        let rc = unsafe { rdma_sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as libc::c_int) };
        if rc != 0 {
            return Err(VerbsError::ModifyQp {
                qpn: self.qp_num().0,
                to,
                source: VerbsError::rc(rc),
            });
        }
        tracing::debug!(qpn = %self.qp_num(), to, "modified QP");
        Ok(())
    }

    /// Connect to `remote`: RESET -> INIT -> RTR -> RTS (`ibv_modify_qp(3)`). On RoCE the path
    /// uses a GRH with `local.gid_index` and `remote.gid`; on InfiniBand the remote LID (with a
    /// GRH only if the GIDs are in different subnets). The path MTU is the smallest of both
    /// ports' MTUs and `params.max_mtu`.
    ///
    /// # Errors
    /// [`VerbsError::InvalidEndpoint`] when `local` is not this QP's or either endpoint is
    /// malformed; [`VerbsError::LinkLayerMismatch`]; [`VerbsError::ModifyQp`] naming the failed
    /// transition.
    pub fn connect(
        &mut self,
        local: &QpEndpoint,
        remote: &QpEndpoint,
        params: &ConnectParams,
    ) -> Result<()> {
        if local.qpn != self.qp_num() {
            return Err(VerbsError::InvalidEndpoint(
                "local endpoint belongs to another QP",
            ));
        }
        local.validate()?;
        remote.validate()?;
        if local.link_layer.is_ethernet() != remote.link_layer.is_ethernet() {
            return Err(VerbsError::LinkLayerMismatch {
                local: local.link_layer.as_str(),
                remote: remote.link_layer.as_str(),
            });
        }
        let dev = self.pd.context().query_device()?;
        let rd_atomic = u32::from(params.max_rd_atomic).max(1);
        let max_rd = rd_atomic.min(dev.max_qp_init_rd_atom.max(1)).min(255) as u8;
        let max_dest_rd = rd_atomic.min(dev.max_qp_rd_atom.max(1)).min(255) as u8;
        let mtu = local.mtu.min(remote.mtu).min(params.max_mtu);

        // RESET -> INIT
        let mut a = zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = local.port;
        a.qp_access_flags = params.remote_access.bits();
        self.modify(
            &mut a,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "INIT",
        )?;

        // INIT -> RTR
        let mut a = zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = mtu.to_raw();
        a.dest_qp_num = remote.qpn.0;
        a.rq_psn = remote.psn.get();
        a.max_dest_rd_atomic = max_dest_rd;
        a.min_rnr_timer = params.min_rnr_timer;
        a.ah_attr.port_num = local.port;
        a.ah_attr.sl = params.sl;
        let global = local.link_layer.is_ethernet()
            || (!remote.gid.is_zero() && remote.gid.subnet_prefix() != local.gid.subnet_prefix());
        if global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = remote.gid.0;
            a.ah_attr.grh.sgid_index = local.gid_index.0;
            a.ah_attr.grh.hop_limit = params.hop_limit;
            a.ah_attr.grh.traffic_class = params.traffic_class;
        }
        if !local.link_layer.is_ethernet() {
            a.ah_attr.dlid = remote.lid;
        }
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;

        // RTR -> RTS
        let mut a = zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = params.timeout;
        a.retry_cnt = params.retry_cnt.min(7);
        a.rnr_retry = params.rnr_retry.min(7);
        a.sq_psn = local.psn.get();
        a.max_rd_atomic = max_rd;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Move the QP to the error state (`ibv_modify_qp(3)`): every outstanding work request
    /// completes with [`super::WcStatus::WR_FLUSH_ERR`], which tells which were not delivered.
    ///
    /// # Errors
    /// [`VerbsError::ModifyQp`].
    pub fn set_error(&mut self) -> Result<()> {
        let mut a = zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, M::IBV_QP_STATE, "ERR")
    }

    /// The current state (`ibv_query_qp(3)`).
    ///
    /// # Errors
    /// [`VerbsError::QueryQp`].
    pub fn state(&self) -> Result<QpState> {
        let mut a = zeroed_attr();
        // SAFETY: plain-old-data; all-zero is valid.
        let mut init: ibv_qp_init_attr = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: valid QP; both out-structs are writable.
        let rc = unsafe {
            rdma_sys::ibv_query_qp(
                self.qp.as_ptr(),
                &mut a,
                M::IBV_QP_STATE.0 as libc::c_int,
                &mut init,
            )
        };
        if rc != 0 {
            return Err(VerbsError::QueryQp {
                qpn: self.qp_num().0,
                source: VerbsError::rc(rc),
            });
        }
        Ok(QpState::from_raw(a.qp_state))
    }

    /// Post one send work request (`ibv_post_send(3)`). The SGE list, flags (signaled, inline
    /// when the payload fits `max_inline_data` and the opcode allows it) are set from `wr`;
    /// nothing is allocated.
    ///
    /// # Errors
    /// [`VerbsError::SendQueueFull`] on `ENOMEM` (back-pressure: reap send completions and
    /// retry); [`VerbsError::PostSend`] otherwise.
    #[inline]
    pub fn post_send(&mut self, wr: &mut SendWr) -> Result<()> {
        self.post_send_batch(std::slice::from_mut(wr))
    }

    /// Post several send work requests as one chain (`ibv_post_send(3)`), in order.
    ///
    /// # Errors
    /// As [`QueuePair::post_send`]; `index` tells the first work request not posted (those
    /// before it were posted).
    pub fn post_send_batch(&mut self, wrs: &mut [SendWr]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let max_inline = self.caps.max_inline_data;
        for wr in wrs.iter_mut() {
            wr.prepare(max_inline);
        }
        let n = wrs.len();
        // From here on the WRs are reached only through `base`, so the pointers stored into
        // them (SGE lists, chain links) stay valid until the call returns.
        let base = wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: `i < n` (and `i + 1 < n` when linking), so every pointer is in bounds of
            // `wrs`, which is borrowed mutably for this whole call; no reference to an element
            // exists meanwhile.
            unsafe {
                let wr = base.add(i);
                (*wr).raw.sg_list = (&raw mut (*wr).sges).cast::<ibv_sge>();
                (*wr).raw.next = if i + 1 < n {
                    &raw mut (*base.add(i + 1)).raw
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: valid QP. The chain links only elements of `wrs`, each `sg_list` points into
        // its own WR's `sges`, and all live across the call. Each SGE lies inside a registered
        // region kept alive by the WR's `mrs` (bounds checked when set), so an inline copy
        // reads only live memory and a DMA is checked by the device against the lkey. The
        // provider copies what it needs before returning.
        let rc =
            unsafe { rdma_sys::ibv_post_send(self.qp.as_ptr(), &raw mut (*base).raw, &mut bad) };
        let mut index = 0;
        for i in 0..n {
            // SAFETY: in bounds of `wrs`, reached through `base` as above.
            unsafe {
                let raw = &raw mut (*base.add(i)).raw;
                if raw == bad {
                    index = i;
                }
                (*raw).next = std::ptr::null_mut();
            }
        }
        if rc == 0 {
            return Ok(());
        }
        let err = VerbsError::rc(rc);
        if err.raw_os_error() == Some(libc::ENOMEM) {
            Err(VerbsError::SendQueueFull { index })
        } else {
            Err(VerbsError::PostSend { index, source: err })
        }
    }

    /// RDMA READ of `remote_addr..+dst.len()` (key `rkey`) straight into `dst`, waiting until
    /// it has landed (rendezvous receive). `mr` is a `LOCAL_WRITE` registration covering `dst`.
    /// One job of [`QueuePair::read_many`], which says how it is split and numbered.
    ///
    /// # Errors
    /// As [`QueuePair::read_many`].
    #[allow(clippy::too_many_arguments)] // the parts of one READ, each used once
    pub fn read_into(
        &mut self,
        cq: &CompletionQueue,
        mr: &MemoryRegion,
        dst: &mut [u8],
        remote_addr: u64,
        rkey: Rkey,
        opts: ReadOptions,
        other: impl FnMut(&super::WorkCompletion),
    ) -> Result<u64> {
        self.read_many(
            cq,
            &mut [ReadJob {
                mr,
                dst,
                remote_addr,
                rkey,
            }],
            opts,
            other,
        )
    }

    /// RDMA READs of several remote buffers straight into their destinations, all in flight
    /// together, waiting until every one has landed (several rendezvous messages at once).
    ///
    /// Each job is split into chunks of at most `opts.chunk` bytes, each a signaled work request
    /// with ids `opts.first_wr_id..` (the jobs' chunks in order), at most `opts.window`
    /// outstanding across jobs; the send completions of other work requests polled from `cq`
    /// meanwhile (ids below `opts.first_wr_id`) are handed to `other`. Returns the number of ids
    /// used. Because the destinations are borrowed for the whole call and the call returns only
    /// once every chunk has completed or been flushed, the device never writes them after the
    /// borrow ends.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`] when a job's `mr` does not cover its destination;
    /// [`VerbsError::InvalidWorkRequest`] when a region lacks `LOCAL_WRITE`, a destination is
    /// empty or a remote range wraps (nothing is posted then);
    /// [`VerbsError::ReadFailed`] when a chunk completes in error (the QP is then moved to the
    /// error state: a failed READ leaves the connection unusable); [`VerbsError::Stalled`] when
    /// nothing completed for `opts.stall` (the QP is moved to the error state likewise); post and
    /// poll errors.
    pub fn read_many(
        &mut self,
        cq: &CompletionQueue,
        jobs: &mut [ReadJob<'_>],
        opts: ReadOptions,
        mut other: impl FnMut(&super::WorkCompletion),
    ) -> Result<u64> {
        let chunk = opts.chunk.clamp(4096, 1 << 30);
        // Validate every job first: (offset of the destination in its region, chunks).
        let mut plan = Vec::with_capacity(jobs.len());
        for job in jobs.iter() {
            let len = job.dst.len();
            if len == 0 {
                return Err(VerbsError::InvalidWorkRequest("RDMA READ of zero bytes"));
            }
            if !job.mr.access().contains(AccessFlags::LOCAL_WRITE) {
                return Err(VerbsError::InvalidWorkRequest(
                    "RDMA READ target registered without LOCAL_WRITE",
                ));
            }
            let start = (job.dst.as_ptr() as u64).checked_sub(job.mr.addr()).ok_or(
                VerbsError::OutOfBounds {
                    offset: 0,
                    len,
                    region_len: job.mr.len(),
                },
            )? as usize;
            job.mr.check_range(start, len)?;
            if job.remote_addr.checked_add(len as u64).is_none() {
                return Err(VerbsError::InvalidWorkRequest("RDMA READ range wraps"));
            }
            plan.push((start, len.div_ceil(chunk) as u64));
        }
        let window = u64::from(opts.window.max(1));
        let n: u64 = plan.iter().map(|p| p.1).sum();
        let first = opts.first_wr_id;
        // The next chunk to post: job index and chunk within the job.
        let (mut job_i, mut chunk_i) = (0usize, 0u64);
        let mut posted = 0u64;
        let mut done = 0u64;
        let mut failure: Option<VerbsError> = None;
        let mut wcs: [super::WorkCompletion; 16] = Default::default();
        let mut stall = super::Stall::new(opts.stall);
        // Completions polled, ours and others: what the stall watch sees move.
        let mut seen = 0u64;
        while done < n {
            // Post while the window allows (and nothing failed).
            while failure.is_none() && posted < n && posted - done < window {
                while chunk_i == plan[job_i].1 {
                    job_i += 1;
                    chunk_i = 0;
                }
                let (start, _) = plan[job_i];
                let job = &jobs[job_i];
                let off = chunk_i as usize * chunk;
                let l = chunk.min(job.dst.len() - off);
                let mut wr = SendWr::read(
                    WrId(first + posted),
                    job.mr,
                    start + off,
                    l,
                    job.remote_addr + off as u64,
                    job.rkey,
                )?;
                wr.set_signaled(true);
                match self.post_send(&mut wr) {
                    Ok(()) => {
                        posted += 1;
                        chunk_i += 1;
                    }
                    Err(VerbsError::SendQueueFull { .. }) => break,
                    Err(e) => failure = Some(e),
                }
            }
            if failure.is_some() && posted == done {
                break;
            }
            let got = match cq.poll(&mut wcs) {
                Ok(k) => k,
                Err(e) => {
                    // The CQ cannot be polled: stop the QP so that nothing more lands.
                    let _ = self.set_error();
                    return Err(e);
                }
            };
            seen += got as u64;
            for wc in &wcs[..got] {
                let id = wc.wr_id().0;
                let mine = id >= first && id < first + n;
                if mine {
                    done += 1;
                }
                if !wc.is_success() && failure.is_none() {
                    failure = Some(VerbsError::ReadFailed {
                        len: jobs.iter().map(|j| j.dst.len()).sum(),
                        status: wc.status(),
                        vendor_err: wc.vendor_err(),
                    });
                    // Flush what is still outstanding: each chunk then completes in error.
                    let _ = self.set_error();
                }
                if !mine {
                    other(wc);
                }
            }
            if got == 0 {
                // A device that neither completes nor fails the chunks: the error state flushes
                // them, and the loop goes on until every one has come back, so that nothing
                // lands in a destination after the borrow ends.
                if let Some(waited) = stall.spin(seen)
                    && failure.is_none()
                {
                    failure = Some(VerbsError::Stalled {
                        waited,
                        outstanding: posted - done,
                    });
                    let _ = self.set_error();
                }
                std::hint::spin_loop();
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Post one receive work request (`ibv_post_recv(3)`). A receive WR with no SGE is enough
    /// for RDMA WRITE_WITH_IMM, which writes through the rkey and only consumes the WQE.
    ///
    /// # Errors
    /// [`VerbsError::RecvQueueFull`] on `ENOMEM`; [`VerbsError::PostRecv`] otherwise.
    #[inline]
    pub fn post_recv(&mut self, wr: &mut RecvWr) -> Result<()> {
        self.post_recv_batch(std::slice::from_mut(wr))
    }

    /// Post several receive work requests as one chain (`ibv_post_recv(3)`).
    ///
    /// # Errors
    /// As [`QueuePair::post_recv`], with the index of the first work request not posted.
    pub fn post_recv_batch(&mut self, wrs: &mut [RecvWr]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let n = wrs.len();
        // The WRs are reached only through `base` until the call returns (see post_send_batch).
        let base = wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: in bounds of `wrs`, borrowed mutably for the whole call; no reference to an
            // element exists meanwhile.
            unsafe {
                let wr = base.add(i);
                (*wr).raw.sg_list = (&raw mut (*wr).sges).cast::<ibv_sge>();
                (*wr).raw.num_sge = (*wr).num_sge as libc::c_int;
                (*wr).raw.next = if i + 1 < n {
                    &raw mut (*base.add(i + 1)).raw
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: valid QP; the chain and its SGE arrays live across the call; every SGE lies in
        // a registered region with LOCAL_WRITE kept alive by its WR (checked when set).
        let rc =
            unsafe { rdma_sys::ibv_post_recv(self.qp.as_ptr(), &raw mut (*base).raw, &mut bad) };
        let mut index = 0;
        for i in 0..n {
            // SAFETY: in bounds of `wrs`, reached through `base` as above.
            unsafe {
                let raw = &raw mut (*base.add(i)).raw;
                if raw == bad {
                    index = i;
                }
                (*raw).next = std::ptr::null_mut();
            }
        }
        if rc == 0 {
            return Ok(());
        }
        let err = VerbsError::rc(rc);
        if err.raw_os_error() == Some(libc::ENOMEM) {
            Err(VerbsError::RecvQueueFull { index })
        } else {
            Err(VerbsError::PostRecv { index, source: err })
        }
    }
}

/// One RDMA READ of [`QueuePair::read_many`]: `remote_addr..+dst.len()` (key `rkey`) into
/// `dst`, which `mr` (a `LOCAL_WRITE` registration) covers.
pub struct ReadJob<'a> {
    /// The registration covering `dst`.
    pub mr: &'a MemoryRegion,
    /// Where the bytes land.
    pub dst: &'a mut [u8],
    /// The peer's address.
    pub remote_addr: u64,
    /// The peer's key.
    pub rkey: Rkey,
}

impl std::fmt::Debug for ReadJob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadJob")
            .field("len", &self.dst.len())
            .field("remote_addr", &format_args!("{:#x}", self.remote_addr))
            .finish()
    }
}

/// How [`QueuePair::read_many`] splits and numbers its work requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Work request id of the first chunk; the others follow.
    pub first_wr_id: u64,
    /// Largest chunk in bytes (clamped to 4 KiB..=1 GiB).
    pub chunk: usize,
    /// Most chunks outstanding at once.
    pub window: u32,
    /// How long the call waits with chunks outstanding and none completing before it moves the
    /// queue pair to the error state (which flushes them) and fails with
    /// [`VerbsError::Stalled`]; `None` waits for as long as the device takes.
    pub stall: Option<std::time::Duration>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            first_wr_id: 0,
            chunk: 1 << 20,
            window: 16,
            stall: None,
        }
    }
}

/// The operation of a [`SendWr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendOp {
    /// RDMA WRITE: local SGEs -> remote address; no completion at the peer.
    RdmaWrite,
    /// RDMA WRITE with a 32-bit immediate: consumes a receive WQE at the peer, whose CQ yields
    /// the immediate.
    RdmaWriteWithImm,
    /// RDMA READ: remote address -> local SGEs (which need `LOCAL_WRITE`).
    RdmaRead,
    /// SEND into the peer's next receive WQE.
    Send,
    /// SEND with a 32-bit immediate.
    SendWithImm,
    /// Bind a type-2 memory window over a slice of a registered region ([`SendWr::bind_mw`]).
    BindMw,
    /// Invalidate a memory window's key ([`SendWr::local_inv`]).
    LocalInv,
}

impl SendOp {
    fn raw(self) -> u32 {
        match self {
            SendOp::RdmaWrite => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            SendOp::RdmaWriteWithImm => ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            SendOp::RdmaRead => ibv_wr_opcode::IBV_WR_RDMA_READ,
            SendOp::Send => ibv_wr_opcode::IBV_WR_SEND,
            SendOp::SendWithImm => ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            SendOp::BindMw => ibv_wr_opcode::IBV_WR_BIND_MW,
            SendOp::LocalInv => ibv_wr_opcode::IBV_WR_LOCAL_INV,
        }
    }
    fn has_remote(self) -> bool {
        matches!(
            self,
            SendOp::RdmaWrite | SendOp::RdmaWriteWithImm | SendOp::RdmaRead
        )
    }
    fn has_imm(self) -> bool {
        matches!(self, SendOp::RdmaWriteWithImm | SendOp::SendWithImm)
    }
}

const EMPTY_SGE: ibv_sge = ibv_sge {
    addr: 0,
    length: 0,
    lkey: 0,
};

/// Check `offset..offset+len` of `mr` and turn it into an SGE.
fn make_sge(mr: &MemoryRegion, offset: usize, len: usize) -> Result<ibv_sge> {
    mr.check_range(offset, len)?;
    let length = u32::try_from(len).map_err(|_| VerbsError::OutOfBounds {
        offset,
        len,
        region_len: mr.len(),
    })?;
    Ok(ibv_sge {
        addr: mr.addr() + offset as u64,
        length,
        lkey: mr.lkey().0,
    })
}

/// A pre-built send work request (`struct ibv_send_wr`) with its SGEs stored inline.
///
/// Build it once with [`SendWr::new`] and [`SendWr::push_sge`], then on the hot path patch
/// only what changes ([`SendWr::set_sge`], [`SendWr::set_remote`], [`SendWr::set_imm`],
/// [`SendWr::set_wr_id`]) and post it: nothing allocates. Each SGE keeps a handle to its memory
/// region, so the memory it names stays registered while the WR exists.
pub struct SendWr {
    raw: ibv_send_wr,
    sges: [ibv_sge; MAX_SGE],
    mrs: [Option<MemoryRegion>; MAX_SGE],
    /// A bind's window and region, kept alive while the work request exists.
    bind: Option<(MemoryWindow, MemoryRegion)>,
    num_sge: usize,
    op: SendOp,
    signaled: bool,
    solicited: bool,
    inline_allowed: bool,
}

// SAFETY: the raw pointers inside (`next`, `sg_list`) are only set for the duration of a post
// and point into the WRs being posted; otherwise the struct holds plain data and `MemoryRegion`
// handles, which are `Send`.
unsafe impl Send for SendWr {}
// SAFETY: `&SendWr` exposes only copies of plain fields; the raw pointers are never dereferenced
// through a shared reference.
unsafe impl Sync for SendWr {}

impl std::fmt::Debug for SendWr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendWr")
            .field("op", &self.op)
            .field("wr_id", &self.wr_id())
            .field("num_sge", &self.num_sge)
            .field("total_len", &self.total_len())
            .field("signaled", &self.signaled)
            .finish()
    }
}

impl SendWr {
    /// An empty work request of operation `op` (no SGE, remote address 0, immediate 0,
    /// signaled, inline allowed).
    pub fn new(op: SendOp, wr_id: WrId) -> SendWr {
        // SAFETY: `ibv_send_wr` is plain-old-data (integers, raw pointers, unions of those);
        // all-zero (null pointers) is valid.
        let mut raw: ibv_send_wr = unsafe { MaybeUninit::zeroed().assume_init() };
        raw.wr_id = wr_id.0;
        raw.opcode = op.raw();
        SendWr {
            raw,
            sges: [EMPTY_SGE; MAX_SGE],
            mrs: Default::default(),
            bind: None,
            num_sge: 0,
            op,
            signaled: true,
            solicited: false,
            inline_allowed: true,
        }
    }

    /// An RDMA WRITE_WITH_IMM of `local[offset..offset+len]` to `remote_addr`/`rkey`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`] when the range is outside `local`.
    pub fn write_with_imm(
        wr_id: WrId,
        local: &MemoryRegion,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: Rkey,
        imm: u32,
    ) -> Result<SendWr> {
        let mut wr = SendWr::new(SendOp::RdmaWriteWithImm, wr_id);
        wr.push_sge(local, offset, len)?;
        wr.set_remote(remote_addr, rkey)?;
        wr.set_imm(imm)?;
        Ok(wr)
    }

    /// An RDMA READ of `len` bytes from `remote_addr`/`rkey` into `local[offset..]`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`]; [`VerbsError::InvalidWorkRequest`] if `local` lacks
    /// `LOCAL_WRITE`.
    pub fn read(
        wr_id: WrId,
        local: &MemoryRegion,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: Rkey,
    ) -> Result<SendWr> {
        let mut wr = SendWr::new(SendOp::RdmaRead, wr_id);
        wr.push_sge(local, offset, len)?;
        wr.set_remote(remote_addr, rkey)?;
        Ok(wr)
    }

    /// Binds type-2 window `mw` with key `rkey` over `len` bytes of `mr` at address `addr`,
    /// granting `access` (e.g. [`AccessFlags::REMOTE_READ`]) to the peer of the QP it is posted
    /// on. Work requests posted after it on the same QP execute after the bind.
    ///
    /// # Errors
    /// [`VerbsError::OutOfBounds`] when the range is not inside `mr`;
    /// [`VerbsError::InvalidWorkRequest`] when `mr` was not registered with
    /// [`AccessFlags::MW_BIND`] or the range is empty.
    pub fn bind_mw(
        wr_id: WrId,
        mw: &MemoryWindow,
        rkey: Rkey,
        mr: &MemoryRegion,
        addr: u64,
        len: usize,
        access: AccessFlags,
    ) -> Result<SendWr> {
        if !mr.access().contains(AccessFlags::MW_BIND) {
            return Err(VerbsError::InvalidWorkRequest(
                "memory window bound over a region registered without MW_BIND",
            ));
        }
        if len == 0 {
            return Err(VerbsError::InvalidWorkRequest(
                "memory window of zero bytes",
            ));
        }
        let offset = addr.checked_sub(mr.addr()).ok_or(VerbsError::OutOfBounds {
            offset: 0,
            len,
            region_len: mr.len(),
        })? as usize;
        mr.check_range(offset, len)?;
        let mut wr = SendWr::new(SendOp::BindMw, wr_id);
        wr.raw.bind_mw_tso_union.bind_mw = rdma_sys::bind_mw_t {
            mw: mw.as_raw(),
            rkey: rkey.0,
            bind_info: rdma_sys::ibv_mw_bind_info {
                mr: mr.as_raw(),
                addr,
                length: len as u64,
                mw_access_flags: access.bits(),
            },
        };
        wr.bind = Some((mw.clone(), mr.clone()));
        Ok(wr)
    }

    /// Invalidates the memory window key `rkey` (`IBV_WR_LOCAL_INV`): once it executes, no peer
    /// access through that key succeeds.
    pub fn local_inv(wr_id: WrId, rkey: Rkey) -> SendWr {
        let mut wr = SendWr::new(SendOp::LocalInv, wr_id);
        wr.raw.imm_data_invalidated_rkey_union.invalidated_rkey = rkey.0;
        wr
    }

    /// Append an SGE covering `mr[offset..offset+len]`.
    ///
    /// # Errors
    /// [`VerbsError::TooManySge`], [`VerbsError::OutOfBounds`], and
    /// [`VerbsError::InvalidWorkRequest`] for an RDMA READ into a region without `LOCAL_WRITE`.
    pub fn push_sge(&mut self, mr: &MemoryRegion, offset: usize, len: usize) -> Result<&mut Self> {
        if self.num_sge == MAX_SGE {
            return Err(VerbsError::TooManySge { max: MAX_SGE });
        }
        if self.op == SendOp::RdmaRead && !mr.access().contains(AccessFlags::LOCAL_WRITE) {
            return Err(VerbsError::InvalidWorkRequest(
                "RDMA READ destination region lacks LOCAL_WRITE",
            ));
        }
        self.sges[self.num_sge] = make_sge(mr, offset, len)?;
        self.mrs[self.num_sge] = Some(mr.clone());
        self.num_sge += 1;
        Ok(self)
    }

    /// Move SGE `index` to `offset..offset+len` of the same region (hot path: no allocation,
    /// no reference counting).
    ///
    /// # Errors
    /// [`VerbsError::NoSuchSge`], [`VerbsError::OutOfBounds`].
    #[inline]
    pub fn set_sge(&mut self, index: usize, offset: usize, len: usize) -> Result<()> {
        let mr = match self.mrs.get(index) {
            Some(Some(mr)) if index < self.num_sge => mr,
            _ => {
                return Err(VerbsError::NoSuchSge {
                    index,
                    count: self.num_sge,
                });
            }
        };
        self.sges[index] = make_sge(mr, offset, len)?;
        Ok(())
    }

    /// Remove all SGEs (a zero-length WRITE_WITH_IMM carries only its immediate).
    pub fn clear_sges(&mut self) {
        self.num_sge = 0;
        self.mrs = Default::default();
        self.sges = [EMPTY_SGE; MAX_SGE];
    }

    /// Set the remote address and key (RDMA WRITE / READ).
    ///
    /// # Errors
    /// [`VerbsError::InvalidWorkRequest`] for a SEND.
    #[inline]
    pub fn set_remote(&mut self, remote_addr: u64, rkey: Rkey) -> Result<&mut Self> {
        if !self.op.has_remote() {
            return Err(VerbsError::InvalidWorkRequest("SEND has no remote address"));
        }
        // The opcode is an RDMA one, which reads the `rdma` member of the union.
        self.raw.wr.rdma = rdma_sys::rdma_t {
            remote_addr,
            rkey: rkey.0,
        };
        Ok(self)
    }

    /// Set the immediate (given in host order; sent big-endian as the wire requires).
    ///
    /// # Errors
    /// [`VerbsError::InvalidWorkRequest`] for an operation without immediate.
    #[inline]
    pub fn set_imm(&mut self, imm: u32) -> Result<&mut Self> {
        if !self.op.has_imm() {
            return Err(VerbsError::InvalidWorkRequest(
                "operation carries no immediate",
            ));
        }
        self.raw.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        Ok(self)
    }

    /// Set the work request id.
    #[inline]
    pub fn set_wr_id(&mut self, wr_id: WrId) -> &mut Self {
        self.raw.wr_id = wr_id.0;
        self
    }

    /// Ask for a completion on the send CQ (default: yes). Unsignaled WRs complete silently,
    /// but at least one in every `max_send_wr` must be signaled to free send queue slots.
    #[inline]
    pub fn set_signaled(&mut self, signaled: bool) -> &mut Self {
        self.signaled = signaled;
        self
    }

    /// Mark the WR solicited, waking a peer armed with `req_notify(true)`.
    pub fn set_solicited(&mut self, solicited: bool) -> &mut Self {
        self.solicited = solicited;
        self
    }

    /// Allow sending inline when the payload fits `max_inline_data` (default: yes).
    pub fn set_inline_allowed(&mut self, allowed: bool) -> &mut Self {
        self.inline_allowed = allowed;
        self
    }

    /// The operation.
    pub fn op(&self) -> SendOp {
        self.op
    }
    /// The work request id.
    pub fn wr_id(&self) -> WrId {
        WrId(self.raw.wr_id)
    }
    /// The number of SGEs.
    pub fn num_sge(&self) -> usize {
        self.num_sge
    }
    /// The payload length (sum of the SGE lengths).
    pub fn total_len(&self) -> u64 {
        self.sges[..self.num_sge]
            .iter()
            .map(|s| u64::from(s.length))
            .sum()
    }

    fn prepare(&mut self, max_inline: u32) {
        let mut flags = 0;
        if self.signaled {
            flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if self.solicited {
            flags |= ibv_send_flags::IBV_SEND_SOLICITED.0;
        }
        let len = self.total_len();
        if self.inline_allowed
            && self.op != SendOp::RdmaRead
            && len > 0
            && len <= u64::from(max_inline)
        {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        self.raw.send_flags = flags;
        self.raw.num_sge = self.num_sge as libc::c_int;
    }

    /// Whether posting now on a QP with `max_inline` would send inline.
    pub fn would_inline(&self, max_inline: u32) -> bool {
        let len = self.total_len();
        self.inline_allowed
            && self.op != SendOp::RdmaRead
            && len > 0
            && len <= u64::from(max_inline)
    }
}

/// A pre-built receive work request (`struct ibv_recv_wr`) with its SGEs stored inline.
pub struct RecvWr {
    raw: ibv_recv_wr,
    sges: [ibv_sge; MAX_SGE],
    mrs: [Option<MemoryRegion>; MAX_SGE],
    num_sge: usize,
}

// SAFETY: as for `SendWr`: the raw pointers are set only during a post and point into the WRs
// being posted.
unsafe impl Send for RecvWr {}
// SAFETY: `&RecvWr` exposes only copies of plain fields.
unsafe impl Sync for RecvWr {}

impl std::fmt::Debug for RecvWr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvWr")
            .field("wr_id", &self.wr_id())
            .field("num_sge", &self.num_sge)
            .finish()
    }
}

impl RecvWr {
    /// A receive work request without SGE (enough for WRITE_WITH_IMM).
    pub fn new(wr_id: WrId) -> RecvWr {
        RecvWr {
            raw: ibv_recv_wr {
                wr_id: wr_id.0,
                next: std::ptr::null_mut(),
                sg_list: std::ptr::null_mut(),
                num_sge: 0,
            },
            sges: [EMPTY_SGE; MAX_SGE],
            mrs: Default::default(),
            num_sge: 0,
        }
    }

    /// Append an SGE covering `mr[offset..offset+len]` (for SENDs).
    ///
    /// # Errors
    /// [`VerbsError::TooManySge`], [`VerbsError::OutOfBounds`], and
    /// [`VerbsError::InvalidWorkRequest`] if the region lacks `LOCAL_WRITE`.
    pub fn push_sge(&mut self, mr: &MemoryRegion, offset: usize, len: usize) -> Result<&mut Self> {
        if self.num_sge == MAX_SGE {
            return Err(VerbsError::TooManySge { max: MAX_SGE });
        }
        if !mr.access().contains(AccessFlags::LOCAL_WRITE) {
            return Err(VerbsError::InvalidWorkRequest(
                "receive region lacks LOCAL_WRITE",
            ));
        }
        self.sges[self.num_sge] = make_sge(mr, offset, len)?;
        self.mrs[self.num_sge] = Some(mr.clone());
        self.num_sge += 1;
        Ok(self)
    }

    /// Set the work request id.
    #[inline]
    pub fn set_wr_id(&mut self, wr_id: WrId) -> &mut Self {
        self.raw.wr_id = wr_id.0;
        self
    }

    /// The work request id.
    pub fn wr_id(&self) -> WrId {
        WrId(self.raw.wr_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> QpEndpoint {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[10, 0, 0, 7]);
        QpEndpoint {
            qpn: QpNum(0x11),
            psn: Psn::new(0xabcdef).unwrap(),
            gid: Gid(g),
            gid_index: GidIndex(1),
            lid: 0,
            mtu: Mtu::Mtu1024,
            port: 1,
            link_layer: LinkLayer::Ethernet,
        }
    }

    #[test]
    fn endpoint_roundtrip() {
        let e = ep();
        let b = e.encode();
        assert_eq!(QpEndpoint::decode(&b).unwrap(), e);
        let mut ib = e;
        ib.link_layer = LinkLayer::InfiniBand;
        ib.lid = 0x1234;
        ib.gid = Gid([0; 16]);
        assert_eq!(QpEndpoint::decode(&ib.encode()).unwrap(), ib);
    }

    #[test]
    fn endpoint_rejects_bad_fields() {
        let good = ep().encode();
        let cases: &[(usize, u8, &str)] = &[
            (0, 2, "unknown version"),
            (1, 9, "unknown link layer"),
            (2, 0, "MTU out of range"),
            (2, 6, "MTU out of range"),
            (3, 0, "port 0"),
            (8, 1, "PSN exceeds 24 bits"),
            (4, 1, "QPN exceeds 24 bits"),
            (15, 1, "reserved byte not zero"),
        ];
        for &(i, v, what) in cases {
            let mut b = good;
            b[i] = v;
            match QpEndpoint::decode(&b) {
                Err(VerbsError::InvalidEndpoint(m)) => assert_eq!(m, what, "byte {i}"),
                other => panic!("byte {i}={v}: expected {what}, got {other:?}"),
            }
        }
        assert!(matches!(
            QpEndpoint::decode(&good[..31]),
            Err(VerbsError::InvalidEndpoint("wrong length"))
        ));
        let mut b = good;
        b[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(
            QpEndpoint::decode(&b),
            Err(VerbsError::InvalidEndpoint(_))
        ));
        let mut b = good;
        b[16..32].fill(0);
        assert!(matches!(
            QpEndpoint::decode(&b),
            Err(VerbsError::InvalidEndpoint("RoCE endpoint without GID"))
        ));
    }

    #[test]
    fn send_wr_without_device_validates_opcode_fields() {
        let mut wr = SendWr::new(SendOp::Send, WrId(1));
        assert!(matches!(
            wr.set_remote(1, Rkey(2)),
            Err(VerbsError::InvalidWorkRequest(_))
        ));
        assert!(matches!(
            wr.set_imm(1),
            Err(VerbsError::InvalidWorkRequest(_))
        ));
        assert!(matches!(
            wr.set_sge(0, 0, 1),
            Err(VerbsError::NoSuchSge { index: 0, count: 0 })
        ));
        let mut w = SendWr::new(SendOp::RdmaWriteWithImm, WrId(5));
        w.set_imm(0x0102_0304).unwrap();
        // SAFETY: reading the `u32` union member just written; any bits are valid.
        let wire = unsafe { w.raw.imm_data_invalidated_rkey_union.imm_data };
        assert_eq!(
            wire.to_ne_bytes(),
            [1, 2, 3, 4],
            "immediate is big-endian in memory"
        );
        assert_eq!(w.total_len(), 0);
        assert!(!w.would_inline(64), "zero-length WR is not sent inline");
    }
}
