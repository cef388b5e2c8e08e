//! A hostile verbs peer. It performs the real four-round setup with an rsmsg verbs listener
//! through the bootstrap manager (built here from the public `bootstrap` and `verbs` wrappers,
//! as any program on the fabric could), so the victim sees a normal connect; then it writes
//! what an honest sender never would: out-of-range and reserved immediates, stale generations,
//! headers whose length exceeds the span, bad magic, kind or flags, garbage and unexpected
//! control messages, forged credits, forged rendezvous requests, and RDMA WRITEs beyond a
//! segment. Each time the victim answers with a clear error, fails that connection only, and
//! keeps its other connections (an honest peer exchanges a message after every attack). A peer
//! that never posts a receive (so the victim's writes are RNR-NAKed for ever) fails the victim's
//! sender at its stall limit instead of hanging it.
//!
//! It also probes what the victim exposes: target segments and the credit mailbox are not
//! remotely readable; a rendezvous buffer is readable only by the peer it was offered to and
//! only while its transfer is in flight; a peer cannot use another connection's keys.
//!
//! Runs in the Soft-RoCE guest (`ci/test`); on a host without a device every test prints
//! `skipped: no RDMA device` unless `RSMSG_REQUIRE_RDMA=1`, which makes that a failure.
//! A failed RDMA access moves the prober's queue pair to the error state (RC offers no way
//! around it), so each probe that expects a failure uses a fresh hostile connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rsmsg::bootstrap::{
    Descriptors, EndpointInfo, EndpointName, HostId, MailboxDescriptor, Manager, ManagerClient,
    ManagerHandle, QpInfo, RendezvousId, SegmentDescriptor, Side, Token, TransportSet,
};
use rsmsg::core::{
    ControlMessage, Generation, HEADER_LEN, Header, Immediate, Layout, MessageKind, PartitionIndex,
    ProtocolError, Receiver, SegmentId, Tables, refuse_reason,
};
use rsmsg::transport::verbs::{self, VerbsConnection, VerbsListener, VerbsOptions};
use rsmsg::transport::{PollMode, SendError, TransportError};
use rsmsg::verbs::{
    AccessFlags, CompletionQueue, Context, Gid, GidIndex, LinkLayer, MemoryRegion, Mtu,
    ProtectionDomain, Psn, QpConfig, QpEndpoint, QpNum, QueuePair, RecvWr, Rkey, SendOp, SendWr,
    VerbsError, WcStatus, WorkCompletion, WrId, test_context,
};

/// The layout of both directions: small, so that a few messages fill a segment.
const LAYOUT: &str = "256:16:4,4k:8:4";
/// Guard against a hang, not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(60);
const MAILBOX_SLOTS: usize = 257;
/// Local memory a hostile peer sends from and reads into.
const STAGE_BYTES: usize = 1 << 20;
/// A rendezvous message: above the switch point of `LAYOUT` (4 KiB * 4 - 16).
const BIG: usize = 64 * 1024;

static NAMES: AtomicU32 = AtomicU32::new(0);

fn token() -> Token {
    Token::new("verbs-hostile-test-token").expect("token")
}

fn layout() -> Layout {
    LAYOUT.parse().expect("layout")
}

fn opts(ctx: &Context) -> VerbsOptions {
    VerbsOptions {
        context: Some(ctx.clone()),
        setup_timeout: Duration::from_secs(60),
        ..VerbsOptions::from_env().expect("options from the environment")
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    )
}

macro_rules! device_or_skip {
    ($name:expr) => {
        match test_context($name) {
            Some(ctx) => ctx,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The hostile peer

/// The setup hello of docs/verbs.md (magic, version 2, busy mode, link layer, layout), built by
/// hand.
fn hello(layout: &Layout, link: LinkLayer) -> Vec<u8> {
    let text = layout.to_string();
    let mut b = b"RSVB".to_vec();
    b.extend_from_slice(&2u16.to_le_bytes());
    b.push(0);
    b.push(match link {
        LinkLayer::InfiniBand => 1,
        LinkLayer::Ethernet => 2,
        LinkLayer::Unspecified => 0,
    });
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(text.len() as u16).to_le_bytes());
    b.extend_from_slice(text.as_bytes());
    b
}

/// The layout announced in a hello.
fn layout_of_hello(b: &[u8]) -> Layout {
    assert_eq!(&b[0..4], b"RSVB", "the victim's hello");
    let n = u16::from_le_bytes([b[12], b[13]]) as usize;
    std::str::from_utf8(&b[14..14 + n])
        .expect("UTF-8 layout")
        .parse()
        .expect("the victim's layout")
}

/// A peer that completed the setup and holds the victim's descriptors.
struct Hostile {
    qp: QueuePair,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    recv_wr: RecvWr,
    /// The victim's target segments for this connection, as its answer described them.
    segs: Vec<SegmentDescriptor>,
    /// The victim's credit mailbox for this connection.
    mailbox: MailboxDescriptor,
    /// Our own target segments (the victim's messages land here), remote write only.
    targets: Vec<MemoryRegion>,
    _mailbox: MemoryRegion,
    /// Local only: what we send from and read into.
    stage: MemoryRegion,
    /// Decodes what the victim sends us.
    rx: Receiver,
    next_wr: u64,
}

/// The first two rounds of a setup, as `verbs::connect` does them: our offer (real target
/// segments and mailbox) sent, the victim's answer (its descriptors and queue pair) received.
struct FirstRound {
    pd: ProtectionDomain,
    targets: Vec<MemoryRegion>,
    mailbox: MemoryRegion,
    client: ManagerClient,
    id: RendezvousId,
    answer: Descriptors,
}

impl FirstRound {
    fn dial(ctx: &Context, manager: SocketAddr, name: &str) -> FirstRound {
        let o = opts(ctx);
        let mine = layout();
        let pd = ProtectionDomain::new(ctx).expect("pd");
        let port = ctx.active_port(o.port).expect("active port");
        let tables = Tables::new(mine.clone());
        let targets: Vec<MemoryRegion> = tables
            .segments()
            .iter()
            .map(|s| {
                MemoryRegion::alloc(&pd, s.bytes() as usize, AccessFlags::remote_write())
                    .expect("target segment")
            })
            .collect();
        let mailbox = MemoryRegion::alloc(&pd, MAILBOX_SLOTS * 8, AccessFlags::remote_write())
            .expect("mailbox");
        let offer = Descriptors {
            qp: None,
            mailbox: Some(MailboxDescriptor {
                addr: mailbox.addr(),
                rkey: mailbox.rkey().0,
                len: (MAILBOX_SLOTS * 8) as u32,
            }),
            segments: tables
                .segments()
                .iter()
                .zip(&targets)
                .map(|(e, mr)| SegmentDescriptor {
                    segment_id: e.id.0,
                    group: e.group.0,
                    addr: mr.addr(),
                    len: mr.len() as u64,
                    rkey: mr.rkey().0,
                    partition_size: e.partition_size,
                    partition_count: e.partitions,
                    span_factor: e.span,
                })
                .collect(),
            opaque: hello(&mine, port.link_layer),
        };
        let mut client = ManagerClient::connect(manager, &token(), HANG_GUARD).expect("manager");
        let from = EndpointInfo {
            name: EndpointName::new(unique("hostile")).expect("name"),
            host_id: HostId::local().expect("host id"),
            transports: TransportSet::VERBS,
            shm_socket: None,
        };
        let to = EndpointName::new(name).expect("victim name");
        let (id, answer) = client
            .dial(&from, &to, &offer, HANG_GUARD)
            .expect("the victim's answer");
        FirstRound {
            pd,
            targets,
            mailbox,
            client,
            id,
            answer,
        }
    }
}

impl Hostile {
    /// Connects to the listener `name` like `verbs::connect` would, with its own PD. With
    /// `receives` false it posts no receive WQE, so its device answers every WRITE_WITH_IMM of
    /// the victim with an RNR NAK.
    fn connect_with(ctx: &Context, manager: SocketAddr, name: &str, receives: bool) -> Hostile {
        let o = opts(ctx);
        let mine = layout();
        let port = ctx.active_port(o.port).expect("active port");
        let FirstRound {
            pd,
            targets,
            mailbox,
            mut client,
            id,
            answer,
        } = FirstRound::dial(ctx, manager, name);
        let victim = layout_of_hello(&answer.opaque);
        let info = answer.qp.expect("the victim's queue pair");
        let rq = Layout::recv_wqe_bound_for(&mine, &victim);
        let send_cq = CompletionQueue::new(ctx, 256, None).expect("send cq");
        let recv_cq = CompletionQueue::new(ctx, rq, None).expect("recv cq");
        let cfg = QpConfig {
            max_send_wr: 64,
            max_recv_wr: rq,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
            sig_all: false,
        };
        let mut qp = QueuePair::new(&pd, &send_cq, &recv_cq, &cfg).expect("qp");
        let local = qp
            .local_endpoint(o.port, o.gid, Psn::random())
            .expect("local endpoint");
        let mtu = [
            Mtu::Mtu256,
            Mtu::Mtu512,
            Mtu::Mtu1024,
            Mtu::Mtu2048,
            Mtu::Mtu4096,
        ]
        .into_iter()
        .find(|m| m.bytes() == u32::from(info.mtu))
        .expect("the victim's MTU");
        let remote = QpEndpoint {
            qpn: QpNum(info.qpn),
            psn: Psn::new(info.psn).expect("psn"),
            gid: Gid(info.gid),
            gid_index: GidIndex(info.gid_index),
            lid: info.lid,
            mtu,
            port: info.port,
            link_layer: port.link_layer,
        };
        qp.connect(&local, &remote, &o.params)
            .expect("connect the qp");
        let mut recv_wr = RecvWr::new(WrId(0));
        for _ in 0..if receives { rq } else { 0 } {
            qp.post_recv(&mut recv_wr).expect("post recv");
        }
        let ours = Descriptors {
            qp: Some(QpInfo {
                qpn: local.qpn.0,
                psn: local.psn.get(),
                gid: local.gid.0,
                lid: local.lid,
                mtu: local.mtu.bytes() as u16,
                port: local.port,
                gid_index: local.gid_index.0,
            }),
            ..Descriptors::default()
        };
        client
            .send(id, Side::Initiator, &ours)
            .expect("third round");
        let ready = client
            .recv(id, Side::Initiator, HANG_GUARD)
            .expect("fourth round")
            .expect("ready in time");
        assert_eq!(ready.opaque, b"ready");
        client
            .close(id, Side::Initiator, "connected")
            .expect("close the rendezvous");
        Hostile {
            qp,
            send_cq,
            recv_cq,
            recv_wr,
            segs: answer.segments.clone(),
            mailbox: answer.mailbox.expect("the victim's mailbox"),
            targets,
            _mailbox: mailbox,
            stage: MemoryRegion::alloc(&pd, STAGE_BYTES, AccessFlags::local_only()).expect("stage"),
            rx: Receiver::new(mine),
            next_wr: 0,
        }
    }

    /// Posts `wr` signaled and waits for its completion: its status.
    fn complete(&mut self, mut wr: SendWr) -> WcStatus {
        let id = self.next_wr;
        self.next_wr += 1;
        wr.set_wr_id(WrId(id)).set_signaled(true);
        self.qp.post_send(&mut wr).expect("post send");
        let deadline = Instant::now() + HANG_GUARD;
        let mut wcs: [WorkCompletion; 4] = Default::default();
        loop {
            let n = self.send_cq.poll(&mut wcs).expect("poll the send cq");
            if let Some(wc) = wcs[..n].iter().find(|wc| wc.wr_id().0 == id) {
                return wc.status();
            }
            assert!(
                Instant::now() < deadline,
                "no completion for work request {id}"
            );
            thread::yield_now();
        }
    }

    /// RDMA WRITE_WITH_IMM of `bytes` (none: immediate only) to `offset` of the victim's
    /// segment `seg`.
    fn write_imm(&mut self, seg: usize, offset: usize, bytes: &[u8], imm: u32) -> WcStatus {
        let d = self.segs[seg];
        let mut wr = SendWr::new(SendOp::RdmaWriteWithImm, WrId(0));
        if !bytes.is_empty() {
            self.stage.write(0, bytes).expect("stage");
            wr.push_sge(&self.stage, 0, bytes.len()).expect("sge");
        }
        wr.set_remote(d.addr + offset as u64, Rkey(d.rkey))
            .expect("remote");
        wr.set_imm(imm).expect("imm");
        self.complete(wr)
    }

    /// Plain RDMA WRITE of `bytes` to `addr` with `rkey`.
    fn write(&mut self, addr: u64, rkey: u32, bytes: &[u8]) -> WcStatus {
        self.stage.write(0, bytes).expect("stage");
        let mut wr = SendWr::new(SendOp::RdmaWrite, WrId(0));
        wr.push_sge(&self.stage, 0, bytes.len()).expect("sge");
        wr.set_remote(addr, Rkey(rkey)).expect("remote");
        self.complete(wr)
    }

    /// RDMA READ of `len` bytes at `addr` with `rkey`: the status and the bytes read.
    fn read(&mut self, addr: u64, rkey: u32, len: usize) -> (WcStatus, Vec<u8>) {
        self.stage.fill(0, len, 0).expect("clear the stage");
        let wr = SendWr::read(WrId(0), &self.stage, 0, len, addr, Rkey(rkey)).expect("read wr");
        let st = self.complete(wr);
        let mut out = vec![0u8; len];
        self.stage.read(0, &mut out).expect("stage");
        (st, out)
    }

    /// An immediate alone (zero-length WRITE_WITH_IMM into segment 0).
    fn ring(&mut self, imm: u32) {
        let st = self.write_imm(0, 0, &[], imm);
        assert_eq!(st, WcStatus::SUCCESS, "ringing {imm:#010x}");
    }

    /// Header bytes then `body` at partition `partition` of segment 0, with immediate `imm`.
    fn message_raw(&mut self, partition: usize, header: [u8; HEADER_LEN], body: &[u8], imm: u32) {
        let mut b = header.to_vec();
        b.extend_from_slice(body);
        let off = partition * self.segs[0].partition_size as usize;
        let st = self.write_imm(0, off, &b, imm);
        assert_eq!(st, WcStatus::SUCCESS, "writing a message");
    }

    /// The first message of our direction (sequence 0, segment 0, partition 0, lap 0) with
    /// this header, as an honest sender would place it.
    fn first(&mut self, header: Header, body: &[u8]) {
        self.message_raw(0, header.encode(), body, first_imm(Generation::from_lap(0)));
    }

    /// A control message as our first message.
    fn first_control(&mut self, body: &[u8]) {
        self.first(
            header(
                MessageKind::Control,
                body.len() as u32,
                0,
                Generation::from_lap(0),
            ),
            body,
        );
    }

    /// Waits for the victim's next message: its kind and body.
    fn recv(&mut self) -> (MessageKind, Vec<u8>) {
        let deadline = Instant::now() + HANG_GUARD;
        let mut wcs: [WorkCompletion; 1] = Default::default();
        loop {
            if self.recv_cq.poll(&mut wcs).expect("poll the recv cq") == 1 {
                let wc = &wcs[0];
                assert!(wc.is_success(), "hostile receive: {wc:?}");
                self.qp.post_recv(&mut self.recv_wr).expect("post recv");
                let imm = wc.imm().expect("an immediate");
                let arrival = self.rx.on_immediate(imm).expect("a valid immediate");
                let seg = &self.targets[arrival.segment().index()];
                let mut h = [0u8; HEADER_LEN];
                seg.read(arrival.header_offset(), &mut h).expect("header");
                let d = self.rx.accept(arrival, &h).expect("a valid header");
                let mut body = vec![0u8; d.len];
                seg.read(d.offset, &mut body).expect("body");
                return (d.kind, body);
            }
            assert!(Instant::now() < deadline, "nothing from the victim");
            thread::yield_now();
        }
    }

    /// Waits for the victim's next message, which must be a control message.
    fn recv_control(&mut self) -> ControlMessage {
        let (kind, body) = self.recv();
        assert_eq!(kind, MessageKind::Control);
        ControlMessage::decode(&body).expect("a valid control message")
    }
}

fn first_imm(generation: Generation) -> u32 {
    Immediate::message(SegmentId(0), PartitionIndex::from_u16(0), generation).get()
}

fn header(kind: MessageKind, len: u32, seq: u32, generation: Generation) -> Header {
    Header {
        kind,
        len,
        seq,
        generation,
    }
}

fn data_header(len: u32, generation: Generation) -> Header {
    header(MessageKind::Data, len, 0, generation)
}

// ---------------------------------------------------------------------------------------------
// The victim

/// A verbs listener with an honest connection, checked after every attack.
struct Victim {
    _manager: ManagerHandle,
    ctx: Context,
    addr: SocketAddr,
    name: String,
    listener: VerbsListener,
    /// (the victim's side, the honest peer's side)
    honest: (VerbsConnection, VerbsConnection),
    round: u32,
}

impl Victim {
    fn new(ctx: Context) -> Victim {
        let o = opts(&ctx);
        Victim::with_options(ctx, o)
    }

    /// A victim whose listener (and so every connection it accepts) uses `o`.
    fn with_options(ctx: Context, o: VerbsOptions) -> Victim {
        let manager = Manager::bind("127.0.0.1:0", token()).expect("embedded manager");
        let addr = manager.local_addr();
        let name = unique("victim");
        let mut listener =
            VerbsListener::bind(addr, token(), &name, layout(), PollMode::Busy, o).expect("bind");
        let honest = honest_pair(&ctx, addr, &name, &mut listener);
        let mut v = Victim {
            _manager: manager,
            ctx,
            addr,
            name,
            listener,
            honest,
            round: 0,
        };
        v.check_honest("setup");
        v
    }

    /// A hostile peer connects: the victim's side of that connection, and the peer.
    fn hostile(&mut self) -> (VerbsConnection, Hostile) {
        self.hostile_with(true)
    }

    /// As [`Victim::hostile`], the peer posting receive WQEs or not ([`Hostile::connect_with`]).
    fn hostile_with(&mut self, receives: bool) -> (VerbsConnection, Hostile) {
        let (ctx, addr, name) = (&self.ctx, self.addr, self.name.as_str());
        let listener = &mut self.listener;
        thread::scope(|s| {
            let t = s.spawn(move || Hostile::connect_with(ctx, addr, name, receives));
            let v = listener
                .accept_timeout(HANG_GUARD)
                .expect("accept")
                .expect("a connection in time");
            (v, t.join().expect("hostile setup"))
        })
    }

    /// The honest connection exchanges a message each way.
    fn check_honest(&mut self, why: &str) {
        let msg = format!("round {} after {why}", self.round);
        let (v, p) = &self.honest;
        p.send(msg.as_bytes()).expect("honest send");
        assert_eq!(
            &*v.recv_timeout(HANG_GUARD).expect("honest message"),
            msg.as_bytes(),
            "after {why}"
        );
        v.send(b"ok").expect("victim send");
        assert_eq!(
            &*p.recv_timeout(HANG_GUARD).expect("victim's answer"),
            b"ok"
        );
        self.round += 1;
    }

    /// A new honest peer still connects to the listener and exchanges messages.
    fn check_new_peer(&mut self) {
        let (v, p) = honest_pair(&self.ctx, self.addr, &self.name, &mut self.listener);
        p.send(b"new peer").expect("send");
        assert_eq!(&*v.recv_timeout(HANG_GUARD).expect("recv"), b"new peer");
        v.send(b"welcome").expect("send");
        assert_eq!(&*p.recv_timeout(HANG_GUARD).expect("recv"), b"welcome");
    }
}

fn honest_pair(
    ctx: &Context,
    addr: SocketAddr,
    name: &str,
    listener: &mut VerbsListener,
) -> (VerbsConnection, VerbsConnection) {
    thread::scope(|s| {
        let t = s.spawn(|| {
            verbs::connect(addr, &token(), name, layout(), PollMode::Busy, &opts(ctx))
                .expect("honest connect")
        });
        let v = listener
            .accept_timeout(HANG_GUARD)
            .expect("accept")
            .expect("a connection in time");
        (v, t.join().expect("honest peer"))
    })
}

/// The victim's receive on an attacked connection: it must fail, not deliver, not hang.
fn victim_error(v: &VerbsConnection, what: &str) -> TransportError {
    match v.recv_timeout(HANG_GUARD) {
        Ok(m) => panic!("{what}: accepted a message of {} bytes", m.len()),
        Err(TransportError::Timeout(t)) => panic!("{what}: no error after {t:?}"),
        Err(e) => e,
    }
}

/// The connection is failed for good, with the reason kept.
fn assert_failed(v: &VerbsConnection, what: &str) {
    assert!(
        v.failure().is_some(),
        "{what}: connection not marked failed"
    );
    assert!(v.try_send(b"x").is_err(), "{what}: send after failure");
    assert!(v.try_recv().is_err(), "{what}: receive after failure");
}

fn protocol(e: &TransportError, f: impl Fn(&ProtocolError) -> bool) -> bool {
    matches!(e, TransportError::Protocol(p) if f(p))
}

fn read_refused(e: &TransportError) -> bool {
    matches!(e, TransportError::Verbs(VerbsError::ReadFailed { status, .. })
        if *status == WcStatus::REM_ACCESS_ERR)
}

/// The victim's device refused one of the peer's requests (an access outside what it
/// registered for this connection) and moved the victim's QP to the error state: the link tells
/// that apart from a peer that went away (`PeerClosed`).
fn refused_by_device(e: &TransportError) -> bool {
    matches!(e, TransportError::Failed(r) if r.contains("the device refused a request of the peer"))
}

/// The victim's next receive fails because its device refused a request of the peer.
fn assert_refused_by_device(v: &VerbsConnection, what: &str) {
    let e = victim_error(v, what);
    assert!(
        refused_by_device(&e),
        "{what}: expected the device's refusal of a peer request, got {e:?}"
    );
}

/// A receive completion in error naming the refused access.
fn recv_access_error(e: &TransportError) -> bool {
    matches!(e, TransportError::Failed(r) if r.contains("remote access error"))
}

// ---------------------------------------------------------------------------------------------
// Attacks that the victim's receive must reject

/// One attack: what the hostile peer does, and the error the victim's receive must return.
type Attack = (&'static str, fn(&mut Hostile), fn(&TransportError) -> bool);

fn control_attack(h: &mut Hostile, body: &[u8]) {
    h.first_control(body);
}

fn attacks() -> Vec<Attack> {
    vec![
        (
            "immediate naming a segment that does not exist",
            |h| {
                h.ring(
                    Immediate::message(SegmentId(200), PartitionIndex::from_u16(0), Generation(0))
                        .get(),
                )
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::UnknownSegment { .. })),
        ),
        (
            "immediate naming a partition beyond the segment",
            |h| {
                h.ring(
                    Immediate::message(SegmentId(0), PartitionIndex::from_u16(9999), Generation(0))
                        .get(),
                )
            },
            |e| {
                protocol(e, |p| {
                    matches!(p, ProtocolError::PartitionOutOfRange { .. })
                })
            },
        ),
        (
            "immediate naming a partition other than the ring's next",
            |h| {
                h.ring(
                    Immediate::message(SegmentId(0), PartitionIndex::from_u16(3), Generation(0))
                        .get(),
                )
            },
            |e| {
                protocol(e, |p| {
                    matches!(p, ProtocolError::UnexpectedPartition { .. })
                })
            },
        ),
        (
            "bare immediate naming a partition other than the ring's next",
            |h| {
                h.ring(
                    Immediate::bare(SegmentId(0), PartitionIndex::from_u16(3), Generation(0)).get(),
                )
            },
            |e| {
                protocol(e, |p| {
                    matches!(p, ProtocolError::UnexpectedPartition { .. })
                })
            },
        ),
        (
            "bare immediate of a stale generation",
            |h| {
                h.ring(
                    Immediate::bare(SegmentId(0), PartitionIndex::from_u16(0), Generation(5)).get(),
                )
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::StaleGeneration { .. })),
        ),
        (
            "immediate of reserved type 3",
            |h| h.ring(0xc000_0000),
            |e| {
                protocol(e, |p| {
                    matches!(p, ProtocolError::UnknownImmediateType { ty: 3, .. })
                })
            },
        ),
        (
            "stale generation",
            |h| {
                h.message_raw(0, data_header(10, Generation(5)).encode(), &[7; 10], {
                    first_imm(Generation(5))
                })
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::StaleGeneration { .. })),
        ),
        (
            "header generation other than the immediate's",
            |h| h.first(data_header(10, Generation(9)), &[7; 10]),
            |e| protocol(e, |p| matches!(p, ProtocolError::StaleGeneration { .. })),
        ),
        (
            "header length beyond the span",
            |h| h.first(data_header(4 * 256, Generation::from_lap(0)), &[]),
            |e| protocol(e, |p| matches!(p, ProtocolError::LengthBeyondSpan { .. })),
        ),
        (
            "header length of 4 GiB",
            |h| h.first(data_header(u32::MAX, Generation::from_lap(0)), &[]),
            |e| protocol(e, |p| matches!(p, ProtocolError::LengthBeyondSpan { .. })),
        ),
        (
            "bad header magic",
            |h| {
                h.message_raw(
                    0,
                    [0xff; HEADER_LEN],
                    &[],
                    first_imm(Generation::from_lap(0)),
                )
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::BadMagic { .. })),
        ),
        (
            "bad header kind",
            |h| {
                let mut b = data_header(10, Generation::from_lap(0)).encode();
                b[2] = 9;
                h.message_raw(0, b, &[7; 10], first_imm(Generation::from_lap(0)))
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::BadKind { got: 9 })),
        ),
        (
            "non-zero header flags",
            |h| {
                let mut b = data_header(10, Generation::from_lap(0)).encode();
                b[3] = 0x80;
                h.message_raw(0, b, &[7; 10], first_imm(Generation::from_lap(0)))
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::BadFlags { got: 0x80 })),
        ),
        (
            "out-of-sequence message",
            |h| {
                let mut hd = data_header(10, Generation::from_lap(0));
                hd.seq = 77;
                h.first(hd, &[7; 10])
            },
            |e| {
                protocol(e, |p| {
                    matches!(p, ProtocolError::OutOfSequence { got: 77, .. })
                })
            },
        ),
        (
            "garbage control message",
            |h| control_attack(h, &[9, 1, 2, 3, 4, 5, 6, 7]),
            |e| protocol(e, |p| matches!(p, ProtocolError::BadControl { ty: 9, .. })),
        ),
        (
            "control message of the wrong length (close with 12 bytes)",
            |h| control_attack(h, &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            |e| protocol(e, |p| matches!(p, ProtocolError::BadControl { ty: 3, .. })),
        ),
        (
            "control message with non-zero reserved bytes",
            |h| control_attack(h, &[3, 1, 0, 0, 0, 0, 0, 0]),
            |e| protocol(e, |p| matches!(p, ProtocolError::BadControl { ty: 3, .. })),
        ),
        (
            "rendezvous done for an identifier never issued",
            |h| {
                control_attack(
                    h,
                    ControlMessage::RendezvousDone { id: 41 }
                        .encode()
                        .as_slice(),
                )
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::BadControl { ty: 2, .. })),
        ),
        (
            "rendezvous refusal for an identifier never issued",
            |h| {
                control_attack(
                    h,
                    ControlMessage::RendezvousRefused { id: 41, reason: 1 }
                        .encode()
                        .as_slice(),
                )
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::BadControl { ty: 4, .. })),
        ),
        (
            "rendezvous request whose range wraps the address space",
            |h| {
                let mut b = vec![1, 0, 0, 0];
                b.extend_from_slice(&1u64.to_le_bytes());
                b.extend_from_slice(&(u64::MAX - 4).to_le_bytes());
                b.extend_from_slice(&10u64.to_le_bytes());
                b.extend_from_slice(&7u32.to_le_bytes());
                control_attack(h, &b)
            },
            |e| protocol(e, |p| matches!(p, ProtocolError::BadControl { ty: 1, .. })),
        ),
        (
            "credit notice for partitions never sent",
            |h| h.ring(Immediate::credit(SegmentId(0), 1000).get()),
            |e| protocol(e, |p| matches!(p, ProtocolError::CreditAboveHead { .. })),
        ),
        (
            "credit notice for a segment that does not exist",
            |h| h.ring(Immediate::credit(SegmentId(99), 0).get()),
            |e| protocol(e, |p| matches!(p, ProtocolError::UnknownSegment { .. })),
        ),
        (
            "forged rendezvous request: made-up address, rkey 0",
            |h| {
                control_attack(
                    h,
                    ControlMessage::RendezvousRequest {
                        id: 1,
                        addr: 0x1000,
                        len: BIG as u64,
                        rkey: 0,
                    }
                    .encode()
                    .as_slice(),
                )
            },
            read_refused,
        ),
        (
            "forged rendezvous request: the hostile's own write-only segment",
            |h| {
                let (addr, rkey) = (h.targets[0].addr(), h.targets[0].rkey().0);
                control_attack(
                    h,
                    ControlMessage::RendezvousRequest {
                        id: 1,
                        addr,
                        len: 4096,
                        rkey,
                    }
                    .encode()
                    .as_slice(),
                )
            },
            read_refused,
        ),
        (
            "WRITE_WITH_IMM running past the end of a segment",
            |h| {
                let end = h.segs[0].len as usize;
                let st = h.write_imm(0, end - 8, &[1; 64], first_imm(Generation::from_lap(0)));
                assert_eq!(st, WcStatus::REM_ACCESS_ERR, "the victim's MR bounds");
            },
            recv_access_error,
        ),
        (
            "RDMA WRITE running past the end of a segment",
            |h| {
                let d = h.segs[1];
                let st = h.write(d.addr + d.len - 8, d.rkey, &[1; 64]);
                assert_eq!(st, WcStatus::REM_ACCESS_ERR, "the victim's MR bounds");
            },
            refused_by_device,
        ),
        (
            "RDMA WRITE running past the end of the credit mailbox",
            |h| {
                let m = h.mailbox;
                let st = h.write(m.addr + u64::from(m.len) - 8, m.rkey, &[1; 16]);
                assert_eq!(st, WcStatus::REM_ACCESS_ERR, "the victim's MR bounds");
            },
            refused_by_device,
        ),
        (
            "RDMA WRITE just before a segment",
            |h| {
                let d = h.segs[0];
                let st = h.write(d.addr - 8, d.rkey, &[1; 8]);
                assert_eq!(st, WcStatus::REM_ACCESS_ERR, "the victim's MR bounds");
            },
            refused_by_device,
        ),
    ]
}

#[test]
fn every_attack_fails_only_its_connection_with_a_clear_error() {
    let ctx = device_or_skip!("every_attack_fails_only_its_connection_with_a_clear_error");
    let mut victim = Victim::new(ctx);
    let mut n = 0;
    for (what, attack, expected) in attacks() {
        let (v, mut h) = victim.hostile();
        attack(&mut h);
        let err = victim_error(&v, what);
        eprintln!("attack {what:?}: {err}");
        assert!(expected(&err), "{what}: unexpected error {err:?}");
        assert!(!err.to_string().is_empty());
        assert_failed(&v, what);
        drop((v, h));
        victim.check_honest(what);
        n += 1;
    }
    victim.check_new_peer();
    eprintln!("{n} attacks rejected; the honest connection and the listener kept working");
}

#[test]
fn a_refused_rendezvous_request_leaves_the_connection_up() {
    let ctx = device_or_skip!("a_refused_rendezvous_request_leaves_the_connection_up");
    let mut victim = Victim::new(ctx);
    let (v, mut h) = victim.hostile();
    // Well-formed, but above the receiver's limit (1 GiB by default): refused, nothing read.
    let len = 2u64 << 30;
    h.first_control(
        ControlMessage::RendezvousRequest {
            id: 1,
            addr: 0x1000,
            len,
            rkey: 0,
        }
        .encode()
        .as_slice(),
    );
    match v.recv_timeout(HANG_GUARD) {
        Err(TransportError::RendezvousRefused { len: l, reason }) => {
            assert_eq!(l, len);
            assert_eq!(reason, refuse_reason::TOO_LARGE);
        }
        Ok(m) => panic!("accepted a forged rendezvous of {} bytes", m.len()),
        Err(e) => panic!("expected a refusal, got {e:?}"),
    }
    assert!(v.failure().is_none(), "a refusal keeps the connection");
    // The hostile side is told, and the connection still carries its next message.
    assert_eq!(
        h.recv_control(),
        ControlMessage::RendezvousRefused {
            id: 1,
            reason: refuse_reason::TOO_LARGE
        }
    );
    let body = b"still here";
    h.message_raw(
        1,
        header(
            MessageKind::Data,
            body.len() as u32,
            1,
            Generation::from_lap(0),
        )
        .encode(),
        body,
        Immediate::message(
            SegmentId(0),
            PartitionIndex::from_u16(1),
            Generation::from_lap(0),
        )
        .get(),
    );
    assert_eq!(&*v.recv_timeout(HANG_GUARD).expect("next message"), body);
    victim.check_honest("a refused rendezvous");
}

#[test]
fn a_forged_credit_in_the_mailbox_fails_the_sender() {
    let ctx = device_or_skip!("a_forged_credit_in_the_mailbox_fails_the_sender");
    let mut victim = Victim::new(ctx);
    let (v, mut h) = victim.hostile();
    // Slot 0: the credit of segment 0 of the hostile's receive layout, which the victim fills.
    let m = h.mailbox;
    assert_eq!(
        h.write(m.addr, m.rkey, &1000u64.to_le_bytes()),
        WcStatus::SUCCESS
    );
    // The victim reads its mailbox when the segment's known credit runs out.
    let mut sent = 0;
    let err = loop {
        match v.try_send(b"x") {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent <= 64, "the forged credit was never read");
    };
    eprintln!("forged credit after {sent} messages: {err}");
    assert!(
        matches!(
            err,
            SendError::Transport(TransportError::Protocol(ProtocolError::CreditAboveHead {
                freed: 1000,
                ..
            }))
        ),
        "{err:?}"
    );
    assert_eq!(
        sent, 16,
        "segment 0 holds 16 messages before credit is needed"
    );
    assert_failed(&v, "forged credit");
    drop((v, h));
    victim.check_honest("a forged credit");
}

#[test]
fn a_peer_that_never_posts_a_receive_fails_the_sender_at_the_stall_limit() {
    let ctx =
        device_or_skip!("a_peer_that_never_posts_a_receive_fails_the_sender_at_the_stall_limit");
    // The victim retries RNR forever (`rnr_retry` 7), so its first message never completes and
    // never fails: only the stall limit ends the wait. With a 67 ms ACK timeout twice the QP's
    // retry bound is under a second, so the limit is the 2 s asked for.
    let mut o = opts(&ctx);
    o.params.timeout = 14;
    o.params.retry_cnt = 6;
    o.stall_timeout = Duration::from_secs(2);
    assert_eq!(o.stall_limit(), Some(Duration::from_secs(2)));
    let mut victim = Victim::with_options(ctx, o);
    let (v, h) = victim.hostile_with(false);
    // Blocking sends on a thread of their own, so that a hang fails the test instead of
    // stopping it.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let t0 = Instant::now();
        let mut sent = 0;
        let err = loop {
            match v.send(b"x") {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            if sent > 64 {
                break SendError::Transport(TransportError::Failed("no credit ever needed".into()));
            }
        };
        let _ = tx.send((v, sent, err, t0.elapsed()));
    });
    let (v, sent, err, waited) = rx
        .recv_timeout(HANG_GUARD)
        .expect("the sender hung on a peer that never takes a message");
    eprintln!("a peer that posts no receive: {sent} messages sent, then after {waited:?}: {err}");
    // Every partition of the layout takes one: the 16 of the 256 B group, then (its segment out
    // of credit) the 8 of the 4 KiB group; the 25th waits for credit.
    assert_eq!(
        sent, 24,
        "one message per partition before credit is needed"
    );
    assert!(
        matches!(&err, SendError::Transport(TransportError::Failed(r)) if r.contains("no send completion")),
        "{err:?}"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "failed after {waited:?}, before the stall limit"
    );
    assert_failed(&v, "a stalled send");
    drop((v, h));
    victim.check_honest("a peer that never posts a receive");
}

#[test]
fn a_peer_overrunning_its_credit_is_refused() {
    let ctx = device_or_skip!("a_peer_overrunning_its_credit_is_refused");
    let mut victim = Victim::new(ctx);
    let (v, mut h) = victim.hostile();
    let n = h.segs[0].partition_count;
    // Message `seq` of one partition, where the ring puts it on lap `lap`.
    let send = |h: &mut Hostile, seq: u32, lap: u64| {
        let part = (seq % n) as u16;
        h.message_raw(
            part.into(),
            header(MessageKind::Data, 4, seq, Generation::from_lap(lap)).encode(),
            &seq.to_le_bytes(),
            Immediate::message(
                SegmentId(0),
                PartitionIndex::from_u16(part),
                Generation::from_lap(lap),
            )
            .get(),
        );
    };
    for seq in 0..n {
        send(&mut h, seq, 0);
    }
    // The application holds every message: segment 0 is full and no credit went back.
    let held: Vec<_> = (0..n)
        .map(|seq| {
            let m = v.recv_timeout(HANG_GUARD).expect("an honest message");
            assert_eq!(&*m, &seq.to_le_bytes());
            m
        })
        .collect();
    // The next lap, over partitions still held.
    send(&mut h, n, 1);
    let err = victim_error(&v, "credit overrun");
    eprintln!("credit overrun: {err}");
    assert!(
        protocol(&err, |p| matches!(
            p,
            ProtocolError::PartitionNotFree { partition: 0, .. }
        )),
        "{err:?}"
    );
    // The held messages keep their bounds (the overrun rewrote partition 0's bytes in place,
    // which the trust model of docs/verbs.md allows, never a length) and release without harm.
    assert!(held.iter().all(|m| m.len() == 4));
    for (seq, m) in held.iter().enumerate().skip(1) {
        assert_eq!(&**m, &(seq as u32).to_le_bytes());
    }
    drop(held);
    assert_failed(&v, "credit overrun");
    drop((v, h));
    victim.check_honest("a credit overrun");
}

/// Not an error, by design: a header longer than the bytes the peer wrote. Neither transport
/// carries the written length (a shared-memory doorbell carries only the immediate), so the
/// victim hands out the partitions the header names: bytes of the peer's own target segment
/// (zeros on a new connection, else its own earlier messages), never anything outside it.
#[test]
fn a_header_longer_than_the_bytes_written_reads_only_the_peers_own_segment() {
    let ctx =
        device_or_skip!("a_header_longer_than_the_bytes_written_reads_only_the_peers_own_segment");
    let mut victim = Victim::new(ctx);
    let (v, mut h) = victim.hostile();
    // 200 payload bytes announced, none written: one partition of 256.
    h.first(data_header(200, Generation::from_lap(0)), &[]);
    let m = v.recv_timeout(HANG_GUARD).expect("delivered");
    assert_eq!(m.len(), 200);
    assert!(
        m.iter().all(|&b| b == 0),
        "bytes other than the segment's own"
    );
    drop(m);
    assert!(v.failure().is_none());
    victim.check_honest("a header longer than the bytes written");
}

// ---------------------------------------------------------------------------------------------
// What the victim exposes

#[test]
fn target_segments_and_the_mailbox_are_not_remotely_readable() {
    let ctx = device_or_skip!("target_segments_and_the_mailbox_are_not_remotely_readable");
    let mut victim = Victim::new(ctx);

    // The keys and addresses are right: a WRITE through them lands.
    let (v, mut h) = victim.hostile();
    let d = h.segs[0];
    assert_eq!(h.write(d.addr + 64, d.rkey, &[0xab; 8]), WcStatus::SUCCESS);
    let m = h.mailbox;
    assert_eq!(
        h.write(m.addr + (MAILBOX_SLOTS as u64 - 1) * 8, m.rkey, &[0; 8]),
        WcStatus::SUCCESS
    );
    // A READ through the same key is refused by the device.
    let (st, got) = h.read(d.addr + 64, d.rkey, 8);
    assert_eq!(st, WcStatus::REM_ACCESS_ERR, "READ of a target segment");
    assert_eq!(got, [0; 8], "nothing read");
    let e = victim_error(&v, "READ of a target segment");
    eprintln!("READ of a target segment: the victim's connection ends with {e}");
    assert!(refused_by_device(&e), "{e:?}");
    drop((v, h));
    victim.check_honest("a READ of a target segment");

    // Every segment of every group, and the mailbox: each probe on a fresh connection.
    let segments = layout_segments();
    for i in 0..=segments {
        let (v, mut h) = victim.hostile();
        let (what, addr, rkey) = if i < segments {
            ("a target segment", h.segs[i].addr, h.segs[i].rkey)
        } else {
            ("the credit mailbox", h.mailbox.addr, h.mailbox.rkey)
        };
        let (st, _) = h.read(addr, rkey, 8);
        assert_eq!(st, WcStatus::REM_ACCESS_ERR, "READ of {what} {i}");
        assert_refused_by_device(&v, what);
        drop((v, h));
        victim.check_honest(what);
    }
}

fn layout_segments() -> usize {
    Tables::new(layout()).segments().len()
}

#[test]
fn target_segments_and_mailboxes_are_per_connection() {
    let ctx = device_or_skip!("target_segments_and_mailboxes_are_per_connection");
    let mut victim = Victim::new(ctx);
    let (va, mut a) = victim.hostile();
    // Peer B knows A's keys (a leak, or a guess): through its own connection they are refused.
    for what in ["segment", "mailbox"] {
        let (vb, mut b) = victim.hostile();
        let (addr, rkey) = match what {
            "segment" => (a.segs[0].addr, a.segs[0].rkey),
            _ => (a.mailbox.addr, a.mailbox.rkey),
        };
        let st = b.write(addr, rkey, &[0xee; 8]);
        assert_eq!(
            st,
            WcStatus::REM_ACCESS_ERR,
            "peer B wrote into peer A's {what} with A's key"
        );
        assert_refused_by_device(&vb, "B");
        drop((vb, b));
    }
    // A's own connection is intact: its first message arrives as written.
    let body = b"from A, intact";
    a.first(
        data_header(body.len() as u32, Generation::from_lap(0)),
        body,
    );
    assert_eq!(&*va.recv_timeout(HANG_GUARD).expect("A's message"), body);
    va.send(b"to A").expect("send to A");
    let (kind, got) = a.recv();
    assert_eq!((kind, &got[..]), (MessageKind::Data, &b"to A"[..]));
    victim.check_honest("per-connection keys");
}

/// Fills a buffer with a pattern that differs per byte and per message.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_rendezvous_buffer_is_readable_by_its_peer_only_while_in_flight() {
    let ctx = device_or_skip!("a_rendezvous_buffer_is_readable_by_its_peer_only_while_in_flight");
    let mut victim = Victim::new(ctx);

    // Completed transfer: A reads it, answers done, and the key is dead after.
    let (va, mut a) = victim.hostile();
    let big = pattern(1, BIG);
    let sender = thread::spawn(move || {
        let r = va.send(&big);
        (va, r)
    });
    let (id, addr, len, rkey) = match a.recv_control() {
        ControlMessage::RendezvousRequest {
            id,
            addr,
            len,
            rkey,
        } => (id, addr, len as usize, rkey),
        other => panic!("expected a rendezvous request, got {other:?}"),
    };
    assert_eq!(len, BIG);
    // Another peer of the same listener, given A's key, is refused while the transfer is in
    // flight.
    {
        let (vb, mut b) = victim.hostile();
        let (st, got) = b.read(addr, rkey, 64);
        assert_eq!(st, WcStatus::REM_ACCESS_ERR, "B read A's rendezvous buffer");
        assert!(got.iter().all(|&x| x == 0));
        assert_refused_by_device(&vb, "B");
    }
    let (st, got) = a.read(addr, rkey, len);
    assert_eq!(st, WcStatus::SUCCESS, "the peer reads the offered buffer");
    assert_eq!(got, pattern(1, BIG));
    a.first_control(ControlMessage::RendezvousDone { id }.encode().as_slice());
    let (va, r) = sender.join().expect("sender thread");
    r.expect("the send completes once the receiver answered done");
    let (st, got) = a.read(addr, rkey, 64);
    assert_eq!(
        st,
        WcStatus::REM_ACCESS_ERR,
        "the buffer is still readable after the transfer"
    );
    assert!(got.iter().all(|&x| x == 0));
    assert_refused_by_device(&va, "READ after done");
    drop((va, a));
    victim.check_honest("a READ after the transfer");

    // Refused transfer: the key is dead once the refusal arrived.
    let (vc, mut c) = victim.hostile();
    let big = pattern(2, BIG);
    let sender = thread::spawn(move || {
        let r = vc.send(&big);
        (vc, r)
    });
    let (id, addr, rkey) = match c.recv_control() {
        ControlMessage::RendezvousRequest { id, addr, rkey, .. } => (id, addr, rkey),
        other => panic!("expected a rendezvous request, got {other:?}"),
    };
    c.first_control(
        ControlMessage::RendezvousRefused {
            id,
            reason: refuse_reason::NO_ROOM,
        }
        .encode()
        .as_slice(),
    );
    let (vc, r) = sender.join().expect("sender thread");
    assert!(
        matches!(r, Err(SendError::Refused { len: BIG, reason }) if reason == refuse_reason::NO_ROOM),
        "{r:?}"
    );
    let (st, _) = c.read(addr, rkey, 64);
    assert_eq!(
        st,
        WcStatus::REM_ACCESS_ERR,
        "the buffer is still readable after a refusal"
    );
    assert_refused_by_device(&vc, "READ after refusal");
    drop((vc, c));
    victim.check_honest("a READ after a refused transfer");
}

/// With the rendezvous send cache on (a memory window bound per transfer over a cached
/// registration without remote access): the buffer is readable by its peer only while its
/// transfer is in flight, a key of an earlier transfer of the same buffer is dead even while a
/// later transfer has the window bound again, and the key is dead once the send returned.
#[test]
fn a_windowed_rendezvous_buffer_is_readable_by_its_peer_only_while_in_flight() {
    let ctx = device_or_skip!(
        "a_windowed_rendezvous_buffer_is_readable_by_its_peer_only_while_in_flight"
    );
    let mut victim = Victim::new(ctx);
    let cache = |v: &VerbsConnection| {
        v.set_rndv_config(rsmsg::core::RndvConfig {
            send_cache_bytes: 16 << 20,
            ..v.rndv_config()
        });
        v.rndv_send_cache_stats().is_some()
    };
    // One offered transfer of `buf`, read and answered done by the hostile peer; returns the key.
    fn one(va: VerbsConnection, a: &mut Hostile, buf: Vec<u8>) -> (VerbsConnection, Vec<u8>, u32) {
        let sender = thread::spawn(move || {
            let r = va.send(&buf);
            (va, buf, r)
        });
        let (id, addr, len, rkey) = match a.recv_control() {
            ControlMessage::RendezvousRequest {
                id,
                addr,
                len,
                rkey,
            } => (id, addr, len as usize, rkey),
            other => panic!("expected a rendezvous request, got {other:?}"),
        };
        let (st, got) = a.read(addr, rkey, len);
        assert_eq!(st, WcStatus::SUCCESS, "the peer reads the offered buffer");
        assert_eq!(got, pattern(3, BIG));
        a.first_control(ControlMessage::RendezvousDone { id }.encode().as_slice());
        let (va, buf, r) = sender.join().expect("sender thread");
        r.expect("the send completes once the receiver answered done");
        (va, buf, rkey)
    }

    // An earlier transfer's key, during a later transfer of the same (cached) buffer.
    let (va, mut a) = victim.hostile();
    if !cache(&va) {
        println!("memory windows not supported by this device: nothing to check");
        return;
    }
    let (va, buf, first) = one(va, &mut a, pattern(3, BIG));
    let addr = buf.as_ptr() as u64;
    let sender = thread::spawn(move || {
        let r = va.send(&buf);
        (va, r)
    });
    let second = match a.recv_control() {
        ControlMessage::RendezvousRequest { rkey, .. } => rkey,
        other => panic!("expected a rendezvous request, got {other:?}"),
    };
    assert_ne!(first, second, "each transfer binds a new key");
    let (st, got) = a.read(addr, first, 64);
    assert_eq!(
        st,
        WcStatus::REM_ACCESS_ERR,
        "an earlier transfer's key reads the buffer"
    );
    assert!(got.iter().all(|&x| x == 0));
    let (va, r) = sender.join().expect("sender thread");
    assert!(r.is_err(), "the refused READ fails the connection");
    assert_refused_by_device(&va, "READ with an old key");
    drop((va, a));
    victim.check_honest("a READ with an earlier window key");

    // The key once the send returned.
    let (vb, mut b) = victim.hostile();
    assert!(cache(&vb));
    let (vb, buf, key) = one(vb, &mut b, pattern(3, BIG));
    let (st, got) = b.read(buf.as_ptr() as u64, key, 64);
    assert_eq!(
        st,
        WcStatus::REM_ACCESS_ERR,
        "the buffer is still readable after the transfer"
    );
    assert!(got.iter().all(|&x| x == 0));
    assert_refused_by_device(&vb, "READ after done");
    assert_eq!(vb.rndv_send_cache_stats().map(|s| s.entries), Some(1));
    drop((vb, b, buf));
    victim.check_honest("a READ after a windowed transfer");
}

#[test]
fn an_initiator_that_stalls_mid_setup_delays_no_one() {
    let ctx = device_or_skip!("an_initiator_that_stalls_mid_setup_delays_no_one");
    let manager = Manager::bind("127.0.0.1:0", token()).expect("embedded manager");
    let addr = manager.local_addr();
    let name = unique("patient");
    // The listener gives each initiator 60 s for its queue pair (`opts`).
    let mut listener =
        VerbsListener::bind(addr, token(), &name, layout(), PollMode::Busy, opts(&ctx))
            .expect("bind");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::scope(|s| {
        let accepting = s.spawn(move || {
            let good = listener.accept_timeout(HANG_GUARD);
            tx.send(good).expect("hand over the connection");
            // The stalled handshake ends, reported by the next accept.
            listener.accept_timeout(HANG_GUARD).map(|c| c.is_some())
        });
        // An initiator takes the listener's answer (second round) and then never sends its
        // queue pair: it stalls, as one that died mid-setup would.
        let mut stalled = FirstRound::dial(&ctx, addr, &name);
        // An honest initiator that gives up after 10 s, well before the stalled one's limit:
        // it connects only if the listener does not wait on the stalled one first.
        let mut o = opts(&ctx);
        o.setup_timeout = Duration::from_secs(10);
        let p = verbs::connect(addr, &token(), &name, layout(), PollMode::Busy, &o)
            .expect("an honest connect while another initiator stalls");
        let v = rx
            .recv_timeout(HANG_GUARD)
            .expect("the listener's side")
            .expect("accept")
            .expect("the honest connection in time");
        p.send(b"not held up").expect("send");
        assert_eq!(&*v.recv_timeout(HANG_GUARD).expect("recv"), b"not held up");
        v.send(b"welcome").expect("send");
        assert_eq!(&*p.recv_timeout(HANG_GUARD).expect("recv"), b"welcome");
        // The stalled initiator gives up: its handshake, and only it, fails.
        stalled
            .client
            .close(
                stalled.id,
                Side::Initiator,
                "the stalled initiator gives up",
            )
            .expect("close");
        let e = accepting
            .join()
            .expect("listener thread")
            .expect_err("the stalled handshake fails");
        assert!(e.to_string().contains("gives up"), "{e}");
        p.send(b"still up").expect("send");
        assert_eq!(&*v.recv_timeout(HANG_GUARD).expect("recv"), b"still up");
    });
}
