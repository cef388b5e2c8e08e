//! The hot path (patch a pre-built WRITE_WITH_IMM, post it, post a receive, poll both CQs)
//! performs no heap allocation. Needs an RDMA device (see `verbs::test_context`).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use rsmsg::verbs::{
    AccessFlags, CompletionQueue, ConnectParams, CountingAllocator, GidSelector, MemoryRegion,
    ProtectionDomain, Psn, QpConfig, QpEndpoint, QueuePair, RecvWr, SendWr, WcOpcode,
    WorkCompletion, WrId, count_allocations, test_context,
};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const HANG_GUARD: Duration = Duration::from_secs(120);

#[test]
fn counting_allocator_counts() {
    let (v, n) = count_allocations(|| vec![1u8; 100]);
    assert_eq!(v.len(), 100);
    assert!(n >= 1, "a Vec allocation was not counted");
}

#[test]
fn hot_path_does_not_allocate() {
    let Some(ctx) = test_context("hot_path_does_not_allocate") else {
        return;
    };
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let scq = CompletionQueue::new(&ctx, 64, None).unwrap();
    let rcq = CompletionQueue::new(&ctx, 64, None).unwrap();
    let cfg = QpConfig::default();
    let mut a = QueuePair::new(&pd, &scq, &scq, &cfg).unwrap();
    let mut b = QueuePair::new(&pd, &rcq, &rcq, &cfg).unwrap();
    let ea = a
        .local_endpoint(1, GidSelector::Auto, Psn::random())
        .unwrap();
    let eb = b
        .local_endpoint(1, GidSelector::Auto, Psn::random())
        .unwrap();
    a.connect(
        &ea,
        &QpEndpoint::decode(&eb.encode()).unwrap(),
        &ConnectParams::default(),
    )
    .unwrap();
    b.connect(
        &eb,
        &QpEndpoint::decode(&ea.encode()).unwrap(),
        &ConnectParams::default(),
    )
    .unwrap();
    let src = MemoryRegion::alloc(&pd, 8192, AccessFlags::local_only()).unwrap();
    let dst = MemoryRegion::alloc(&pd, 8192, AccessFlags::remote_write()).unwrap();
    for i in 0..8192 {
        src.write(i, &[(i % 251) as u8]).unwrap();
    }
    let mut wr = SendWr::write_with_imm(WrId(0), &src, 0, 1, dst.addr(), dst.rkey(), 0).unwrap();
    let mut rwr = RecvWr::new(WrId(0));
    let mut wcs: [WorkCompletion; 4] = Default::default();
    const ROUNDS: u32 = 20;
    let mut imms = [0u32; ROUNDS as usize];
    let mut lens = [0u32; ROUNDS as usize];

    let ((), allocations) = count_allocations(|| {
        let start = Instant::now();
        for round in 0..ROUNDS {
            let off = (round as usize * 97) % 4096;
            let len = 1 + (round as usize * 211) % 3000; // some inline, some not
            rwr.set_wr_id(WrId(round.into()));
            b.post_recv(&mut rwr).unwrap();
            wr.set_sge(0, off, len).unwrap();
            wr.set_remote(dst.addr() + off as u64, dst.rkey()).unwrap();
            wr.set_imm(0xC0DE_0000 | round).unwrap();
            wr.set_wr_id(WrId(round.into()));
            wr.set_signaled(round % 4 == 3 || round == ROUNDS - 1);
            a.post_send(&mut wr).unwrap();
            loop {
                let n = rcq.poll(&mut wcs).unwrap();
                if n == 1 {
                    assert!(wcs[0].is_success());
                    assert_eq!(wcs[0].opcode(), WcOpcode::RecvRdmaWithImm);
                    imms[round as usize] = wcs[0].imm().unwrap_or(0);
                    lens[round as usize] = wcs[0].byte_len();
                    break;
                }
                assert!(start.elapsed() < HANG_GUARD, "no receive completion");
            }
            if round % 4 == 3 || round == ROUNDS - 1 {
                while scq.poll(&mut wcs).unwrap() == 0 {
                    assert!(start.elapsed() < HANG_GUARD, "no send completion");
                }
                assert!(wcs[0].is_success());
            }
        }
    });
    assert_eq!(allocations, 0, "allocations on the hot path");
    for round in 0..ROUNDS {
        assert_eq!(imms[round as usize], 0xC0DE_0000 | round);
        assert_eq!(
            lens[round as usize] as usize,
            1 + (round as usize * 211) % 3000
        );
    }
    let mut got = vec![0u8; 1];
    let mut want = vec![0u8; 1];
    // The last write landed intact.
    let off = ((ROUNDS - 1) as usize * 97) % 4096;
    let len = 1 + ((ROUNDS - 1) as usize * 211) % 3000;
    got.resize(len, 0);
    want.resize(len, 0);
    dst.read(off, &mut got).unwrap();
    src.read(off, &mut want).unwrap();
    assert_eq!(got, want);
}
