//! Verbs integration tests: they need an RDMA device (Soft-RoCE is enough; both ends of each
//! connection live in this process and loop back through one device).
//!
//! Without a device they print `skipped: no RDMA device` and return, unless
//! `RSMSG_REQUIRE_RDMA=1`, which makes a missing device a failure (see `verbs::test_context`).
//! `RSMSG_DEVICE` picks the device (default: the first).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use rsmsg::verbs::{
    AccessFlags, CompletionChannel, CompletionQueue, ConnectParams, Context, GidSelector, GidType,
    LinkLayer, MemoryRegion, PortState, ProtectionDomain, Psn, QpConfig, QpState, QueuePair,
    RecvWr, Rkey, SendOp, SendWr, VerbsError, WcOpcode, WcStatus, WorkCompletion, WrId,
    test_context,
};

const PORT: u8 = 1;
/// Guard against a hang if a completion never comes; not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(120);

struct Side {
    qp: QueuePair,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
}

fn side(
    ctx: &Context,
    pd: &ProtectionDomain,
    channel: Option<&CompletionChannel>,
    cfg: &QpConfig,
) -> Side {
    let send_cq = CompletionQueue::new(ctx, 64, None).expect("send CQ");
    let recv_cq = CompletionQueue::new(ctx, 64, channel).expect("recv CQ");
    let qp = QueuePair::new(pd, &send_cq, &recv_cq, cfg).expect("QP");
    assert_eq!(qp.state().expect("query QP"), QpState::Reset);
    Side {
        qp,
        send_cq,
        recv_cq,
    }
}

/// Two RC QPs on one device connected to each other.
fn connected_pair(
    ctx: &Context,
    pd: &ProtectionDomain,
    channel: Option<&CompletionChannel>,
    cfg: &QpConfig,
) -> (Side, Side) {
    let mut a = side(ctx, pd, None, cfg);
    let mut b = side(ctx, pd, channel, cfg);
    let ea =
        a.qp.local_endpoint(PORT, GidSelector::Auto, Psn::random())
            .expect("endpoint a");
    let eb =
        b.qp.local_endpoint(PORT, GidSelector::Auto, Psn::random())
            .expect("endpoint b");
    // Exchange through the wire encoding, as a bootstrap would.
    let ea_remote = rsmsg::verbs::QpEndpoint::decode(&ea.encode()).expect("decode a");
    let eb_remote = rsmsg::verbs::QpEndpoint::decode(&eb.encode()).expect("decode b");
    a.qp.connect(&ea, &eb_remote, &ConnectParams::default())
        .expect("connect a");
    b.qp.connect(&eb, &ea_remote, &ConnectParams::default())
        .expect("connect b");
    assert_eq!(a.qp.state().unwrap(), QpState::Rts);
    assert_eq!(b.qp.state().unwrap(), QpState::Rts);
    (a, b)
}

/// Poll until `n` completions arrived (or the hang guard trips) and return them.
fn poll_n(cq: &CompletionQueue, n: usize) -> Vec<(WrId, WcStatus, WcOpcode, u32, Option<u32>)> {
    let mut out = Vec::new();
    let mut wcs: [WorkCompletion; 8] = Default::default();
    let start = Instant::now();
    while out.len() < n {
        let k = cq.poll(&mut wcs).expect("poll");
        for wc in &wcs[..k] {
            out.push((
                wc.wr_id(),
                wc.status(),
                wc.opcode(),
                wc.byte_len(),
                wc.imm(),
            ));
        }
        if k == 0 {
            assert!(
                start.elapsed() < HANG_GUARD,
                "only {} of {n} completions after {HANG_GUARD:?}: {out:?}",
                out.len()
            );
            std::thread::yield_now();
        }
    }
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn mr_bytes(mr: &MemoryRegion, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mr.read(off, &mut v).expect("read MR");
    v
}

#[test]
fn device_port_and_gid() {
    let Some(ctx) = test_context("device_port_and_gid") else {
        return;
    };
    let dev = ctx.query_device().expect("query device");
    assert!(dev.phys_port_cnt >= 1);
    assert!(dev.max_qp_wr > 0 && dev.max_cqe > 0);
    let port = ctx.query_port(PORT).expect("query port");
    assert_eq!(
        port.state,
        PortState::Active,
        "port {PORT} of {} is not active",
        ctx.device_name()
    );
    assert!(port.active_mtu.is_some());
    let table = ctx.gid_table(PORT).expect("gid table");
    assert!(!table.is_empty(), "empty GID table");
    let chosen = ctx.select_gid(PORT, GidSelector::Auto).expect("select gid");
    assert!(table.contains(&chosen));
    assert_eq!(ctx.query_gid(PORT, chosen.index).unwrap(), chosen.gid);
    if port.link_layer == LinkLayer::Ethernet {
        // The automatic choice prefers RoCE v2 with an IPv4-mapped address when one exists.
        if table
            .iter()
            .any(|e| e.gid_type == GidType::RoceV2 && e.gid.is_ipv4_mapped())
        {
            assert_eq!(chosen.gid_type, GidType::RoceV2);
            assert!(
                chosen.gid.is_ipv4_mapped(),
                "chose {chosen:?} from {table:?}"
            );
        }
    }
    // A configured index is honoured; an empty or absent index is a clear error.
    assert_eq!(
        ctx.select_gid(PORT, GidSelector::Index(chosen.index))
            .unwrap(),
        chosen
    );
    let empty = (0..=255u8)
        .find(|i| !table.iter().any(|e| e.index.0 == *i))
        .unwrap();
    assert!(matches!(
        ctx.select_gid(PORT, GidSelector::Index(rsmsg::verbs::GidIndex(empty))),
        Err(VerbsError::NoUsableGid { .. })
    ));
}

#[test]
fn write_with_imm_bytes_and_immediate() {
    let Some(ctx) = test_context("write_with_imm_bytes_and_immediate") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let (mut a, mut b) = connected_pair(&ctx, &pd, None, &QpConfig::default());
    let src = MemoryRegion::alloc(&pd, 1 << 17, AccessFlags::local_only()).unwrap();
    let dst = MemoryRegion::alloc(&pd, 1 << 17, AccessFlags::remote_write()).unwrap();

    // Three messages: one that fits inline, one of a few MTUs, one gathered from two SGEs.
    let small = pattern(40, 1);
    let big = pattern(70_000, 2);
    src.write(0, &small).unwrap();
    src.write(4096, &big).unwrap();
    for i in 0..3u32 {
        b.qp.post_recv(&mut RecvWr::new(WrId::from_parts(i, 9)))
            .unwrap();
    }

    let mut w1 = SendWr::write_with_imm(
        WrId(1),
        &src,
        0,
        small.len(),
        dst.addr() + 8,
        dst.rkey(),
        0xA1B2_C3D4,
    )
    .unwrap();
    assert!(w1.would_inline(a.qp.caps().max_inline_data) || a.qp.caps().max_inline_data < 40);
    let mut w2 = SendWr::write_with_imm(
        WrId(2),
        &src,
        4096,
        big.len(),
        dst.addr() + 1000,
        dst.rkey(),
        2,
    )
    .unwrap();
    let mut w3 = SendWr::new(SendOp::RdmaWriteWithImm, WrId(3));
    w3.push_sge(&src, 4096 + 100, 300).unwrap();
    w3.push_sge(&src, 0, 40).unwrap();
    w3.set_remote(dst.addr() + 100_000, dst.rkey())
        .unwrap()
        .set_imm(3)
        .unwrap();
    a.qp.post_send(&mut w1).unwrap();
    a.qp.post_send_batch(std::slice::from_mut(&mut w2)).unwrap();
    a.qp.post_send(&mut w3).unwrap();

    let sent = poll_n(&a.send_cq, 3);
    for (k, (id, st, op, _, _)) in sent.iter().enumerate() {
        assert_eq!(*st, WcStatus::SUCCESS, "send {k}: {sent:?}");
        assert_eq!(*op, WcOpcode::RdmaWrite);
        assert_eq!(id.0, k as u64 + 1, "send completions in order");
    }
    let got = poll_n(&b.recv_cq, 3);
    let expect = [(0xA1B2_C3D4u32, 40u32), (2, 70_000), (3, 340)];
    for (k, (id, st, op, len, imm)) in got.iter().enumerate() {
        assert_eq!(*st, WcStatus::SUCCESS, "recv {k}: {got:?}");
        assert_eq!(*op, WcOpcode::RecvRdmaWithImm);
        assert_eq!((id.index(), id.tag()), (k as u32, 9));
        assert_eq!(*imm, Some(expect[k].0), "immediate {k} in host order");
        assert_eq!(*len, expect[k].1, "byte_len {k}");
    }
    assert_eq!(mr_bytes(&dst, 8, 40), small);
    assert_eq!(mr_bytes(&dst, 1000, big.len()), big);
    let mut gathered = big[100..400].to_vec();
    gathered.extend_from_slice(&small);
    assert_eq!(mr_bytes(&dst, 100_000, 340), gathered);
    // Bytes around the written ranges are untouched.
    assert_eq!(mr_bytes(&dst, 0, 8), vec![0; 8]);
    assert_eq!(mr_bytes(&dst, 48, 952), vec![0; 952]);
    assert_eq!(mr_bytes(&dst, 100_340, 16), vec![0; 16]);

    // Hot path: re-post the same WR with only range, remote address and immediate patched.
    b.qp.post_recv(&mut RecvWr::new(WrId(77))).unwrap();
    w2.set_sge(0, 4096 + 10, 20).unwrap();
    w2.set_remote(dst.addr() + 50_000, dst.rkey())
        .unwrap()
        .set_imm(0xFFFF_0001)
        .unwrap()
        .set_wr_id(WrId(4));
    a.qp.post_send(&mut w2).unwrap();
    assert_eq!(poll_n(&a.send_cq, 1)[0].1, WcStatus::SUCCESS);
    let r = poll_n(&b.recv_cq, 1);
    assert_eq!((r[0].0, r[0].3, r[0].4), (WrId(77), 20, Some(0xFFFF_0001)));
    assert_eq!(mr_bytes(&dst, 50_000, 20), big[10..30].to_vec());
    // An out-of-range patch is refused before anything is posted.
    assert!(matches!(
        w2.set_sge(0, (1 << 17) - 10, 20),
        Err(VerbsError::OutOfBounds { .. })
    ));
}

#[test]
fn rdma_read_pulls_remote_bytes() {
    let Some(ctx) = test_context("rdma_read_pulls_remote_bytes") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let (mut a, b) = connected_pair(&ctx, &pd, None, &QpConfig::default());
    let exposed = MemoryRegion::alloc(&pd, 64 << 10, AccessFlags::remote_read()).unwrap();
    let data = pattern(50_000, 7);
    exposed.write(123, &data).unwrap();
    let local = MemoryRegion::alloc(&pd, 64 << 10, AccessFlags::local_only()).unwrap();
    // A READ into a region the device may not write is refused up front.
    assert!(matches!(
        SendWr::read(WrId(0), &exposed, 0, 8, exposed.addr(), exposed.rkey()),
        Err(VerbsError::InvalidWorkRequest(_))
    ));
    let mut wr = SendWr::read(
        WrId(5),
        &local,
        10,
        data.len(),
        exposed.addr() + 123,
        exposed.rkey(),
    )
    .unwrap();
    a.qp.post_send(&mut wr).unwrap();
    let c = poll_n(&a.send_cq, 1);
    assert_eq!(
        (c[0].0, c[0].1, c[0].2),
        (WrId(5), WcStatus::SUCCESS, WcOpcode::RdmaRead)
    );
    assert_eq!(mr_bytes(&local, 10, data.len()), data);
    drop(b);
}

#[test]
fn completion_channel_wakes_on_write_with_imm() {
    let Some(ctx) = test_context("completion_channel_wakes_on_write_with_imm") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let ch = CompletionChannel::new(&ctx).unwrap();
    ch.set_nonblocking(true).unwrap();
    let (mut a, mut b) = connected_pair(&ctx, &pd, Some(&ch), &QpConfig::default());
    let src = MemoryRegion::alloc(&pd, 4096, AccessFlags::local_only()).unwrap();
    let dst = MemoryRegion::alloc(&pd, 4096, AccessFlags::remote_write()).unwrap();
    src.write(0, b"event mode").unwrap();

    for round in 0..2u32 {
        b.qp.post_recv(&mut RecvWr::new(WrId(round.into())))
            .unwrap();
        b.recv_cq.req_notify(false).unwrap();
        // Nothing has completed yet: no event is pending and the CQ is empty.
        assert!(ch.get_event().unwrap().is_none());
        let mut wcs: [WorkCompletion; 2] = Default::default();
        assert_eq!(b.recv_cq.poll(&mut wcs).unwrap(), 0);

        let mut wr = SendWr::write_with_imm(
            WrId(100),
            &src,
            0,
            10,
            dst.addr() + 64,
            dst.rkey(),
            500 + round,
        )
        .unwrap();
        a.qp.post_send(&mut wr).unwrap();

        // Wait for the fd to become readable, as an event loop would.
        assert!(
            ch.wait_readable(Some(HANG_GUARD)).unwrap(),
            "completion channel fd not readable within {HANG_GUARD:?}"
        );
        let ev = ch.get_event().unwrap().expect("an event after POLLIN");
        assert!(ev.is_for(&b.recv_cq));
        assert_ne!(ev.cq_id(), a.send_cq.id());
        drop(ev); // acknowledged
        let got = poll_n(&b.recv_cq, 1);
        assert_eq!(
            (got[0].0, got[0].1, got[0].4),
            (WrId(round.into()), WcStatus::SUCCESS, Some(500 + round))
        );
        assert_eq!(poll_n(&a.send_cq, 1)[0].1, WcStatus::SUCCESS);
        assert_eq!(mr_bytes(&dst, 64, 10), b"event mode".to_vec());
    }
}

#[test]
fn bad_rkey_and_error_state_report_undelivered_work() {
    let Some(ctx) = test_context("bad_rkey_and_error_state_report_undelivered_work") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let (mut a, b) = connected_pair(&ctx, &pd, None, &QpConfig::default());
    let src = MemoryRegion::alloc(&pd, 4096, AccessFlags::local_only()).unwrap();
    let dst = MemoryRegion::alloc(&pd, 4096, AccessFlags::remote_write()).unwrap();
    // A key the peer never granted: the write fails at the responder and is reported, not lost.
    let mut wr = SendWr::new(SendOp::RdmaWrite, WrId(9));
    wr.push_sge(&src, 0, 64).unwrap();
    wr.set_remote(dst.addr(), Rkey(dst.rkey().0 ^ 0x5500))
        .unwrap();
    a.qp.post_send(&mut wr).unwrap();
    let c = poll_n(&a.send_cq, 1);
    assert_eq!(c[0].0, WrId(9));
    assert_eq!(c[0].1, WcStatus::REM_ACCESS_ERR, "{c:?}");
    assert_eq!(mr_bytes(&dst, 0, 64), vec![0; 64], "nothing written");
    drop((a, b));

    // Moving a QP to ERR flushes every receive WR, so the owner learns which were never used.
    let (_a, mut b) = connected_pair(&ctx, &pd, None, &QpConfig::default());
    let mut wrs: Vec<RecvWr> = (10..14).map(|i| RecvWr::new(WrId(i))).collect();
    b.qp.post_recv_batch(&mut wrs).unwrap();
    b.qp.set_error().unwrap();
    assert_eq!(b.qp.state().unwrap(), QpState::Err);
    let flushed = poll_n(&b.recv_cq, 4);
    let mut ids: Vec<u64> = flushed.iter().map(|f| f.0.0).collect();
    ids.sort_unstable();
    assert!(
        flushed.iter().all(|f| f.1 == WcStatus::WR_FLUSH_ERR),
        "{flushed:?}"
    );
    assert_eq!(ids, vec![10, 11, 12, 13]);
}

#[test]
fn silent_peer_send_queue_backpressure_then_flush() {
    let Some(ctx) = test_context("silent_peer_send_queue_backpressure_then_flush") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let cfg = QpConfig {
        max_send_wr: 4,
        ..QpConfig::default()
    };
    let mut a = side(&ctx, &pd, None, &cfg);
    // The peer QP exists but never leaves RESET: it drops every packet, like a dead process.
    let silent = side(&ctx, &pd, None, &cfg);
    let ea =
        a.qp.local_endpoint(PORT, GidSelector::Auto, Psn::random())
            .unwrap();
    let es = silent
        .qp
        .local_endpoint(PORT, GidSelector::Auto, Psn::random())
        .unwrap();
    // Long enough (4.096 us * 2^16 = 268 ms per try, 8 tries) that no retry gives up while
    // the queue is being filled.
    let params = ConnectParams {
        timeout: 16,
        retry_cnt: 7,
        ..ConnectParams::default()
    };
    a.qp.connect(&ea, &es, &params).unwrap();
    let src = MemoryRegion::alloc(&pd, 4096, AccessFlags::local_only()).unwrap();
    let granted = a.qp.caps().max_send_wr as usize;
    let mut wr = SendWr::new(SendOp::RdmaWrite, WrId(0));
    wr.push_sge(&src, 0, 8).unwrap();
    wr.set_remote(0x1000, Rkey(1)).unwrap();
    // No ACK can free a slot, so posting past the queue depth is back-pressure.
    let mut posted = 0usize;
    let full = loop {
        wr.set_wr_id(WrId(posted as u64));
        match a.qp.post_send(&mut wr) {
            Ok(()) => posted += 1,
            Err(VerbsError::SendQueueFull { index: 0 }) => break true,
            Err(e) => panic!("post {posted}: {e:?}"),
        }
        if posted > 4 * granted + 64 {
            break false;
        }
    };
    assert!(
        full,
        "no back-pressure after {posted} posts (granted max_send_wr {granted})"
    );
    assert!(
        posted >= granted,
        "queue full after {posted} < granted {granted}"
    );
    // The owner tears the connection down: every outstanding WR comes back flushed (or, for
    // the one in flight, possibly with the retry error), each with its id, in order.
    a.qp.set_error().unwrap();
    let c = poll_n(&a.send_cq, posted);
    assert!(
        c.iter()
            .all(|x| x.1 == WcStatus::WR_FLUSH_ERR || x.1 == WcStatus::RETRY_EXC_ERR),
        "{c:?}"
    );
    let ids: Vec<u64> = c.iter().map(|x| x.0.0).collect();
    assert_eq!(ids, (0..posted as u64).collect::<Vec<_>>());
    drop(silent);
}

#[test]
fn silent_peer_gives_retry_exceeded() {
    let Some(ctx) = test_context("silent_peer_gives_retry_exceeded") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let cfg = QpConfig::default();
    let mut a = side(&ctx, &pd, None, &cfg);
    // The peer QP never leaves RESET, so it drops every packet, like a dead process.
    let silent = side(&ctx, &pd, None, &cfg);
    let ea =
        a.qp.local_endpoint(PORT, GidSelector::Auto, Psn::random())
            .unwrap();
    let es = silent
        .qp
        .local_endpoint(PORT, GidSelector::Auto, Psn::random())
        .unwrap();
    let params = ConnectParams {
        timeout: 10,
        retry_cnt: 2,
        ..ConnectParams::default()
    };
    a.qp.connect(&ea, &es, &params).unwrap();
    let src = MemoryRegion::alloc(&pd, 4096, AccessFlags::local_only()).unwrap();
    let mut wr = SendWr::new(SendOp::RdmaWrite, WrId(1));
    wr.push_sge(&src, 0, 8).unwrap();
    wr.set_remote(0x1000, Rkey(1)).unwrap();
    a.qp.post_send(&mut wr).unwrap();
    let c = poll_n(&a.send_cq, 1);
    assert_eq!(
        (c[0].0, c[0].1),
        (WrId(1), WcStatus::RETRY_EXC_ERR),
        "{c:?}"
    );
    drop(silent);
}
