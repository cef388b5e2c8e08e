//! Micro-benchmarks of the generic connection's per-message path (`transport::Connection`) over a
//! fake device: send, receive and release of one message, with no kernel, no NIC and no peer
//! process, so that regressions in the posting path show without a guest.
//!
//! The fake device is a loopback: one connection sends to itself. Its target segments are memfd
//! regions mapped twice (the link writes through one mapping, the target reads through the other,
//! as two processes would), `post` queues the immediate in memory, and credits go into an
//! in-memory mailbox. So the figures are the cost of the core plus the connection's plumbing and
//! the payload copy, the floor under every real transport.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rsmsg::core::{CreditUpdate, Layout, SegmentId};
use rsmsg::shm::ShmRegion;
use rsmsg::transport::{Connection, Link, PollMode, TargetMemory, TransportError};

/// The sending half of the fake device: the writer's mappings of the target segments, the
/// immediates in flight and the credit mailbox.
struct FakeLink {
    segments: Vec<ShmRegion>,
    immediates: VecDeque<u32>,
    mailbox: Vec<u64>,
}

/// The receiving half: the reader's mappings of the same segments.
struct FakeTarget {
    segments: Vec<ShmRegion>,
}

fn region_error(e: rsmsg::shm::ShmError) -> TransportError {
    TransportError::Failed(e.to_string())
}

fn segment(segs: &[ShmRegion], id: SegmentId) -> Result<&ShmRegion, TransportError> {
    segs.get(id.index())
        .ok_or_else(|| TransportError::Failed(format!("no segment {}", id.index())))
}

impl Link for FakeLink {
    fn write(&mut self, seg: SegmentId, offset: usize, bytes: &[u8]) -> Result<(), TransportError> {
        self.segments
            .get_mut(seg.index())
            .ok_or_else(|| TransportError::Failed("no segment".into()))?
            .copy_in(offset, bytes)
            .map_err(region_error)
    }

    fn fill(
        &mut self,
        seg: SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransportError> {
        self.segments
            .get_mut(seg.index())
            .ok_or_else(|| TransportError::Failed("no segment".into()))?
            .filling(offset, len)
            .map_err(region_error)
    }

    fn post(
        &mut self,
        _seg: SegmentId,
        _offset: usize,
        _len: usize,
        imm: u32,
    ) -> Result<(), TransportError> {
        self.immediates.push_back(imm);
        Ok(())
    }

    fn next_immediate(
        &mut self,
        _mode: PollMode,
        _timeout: Option<Duration>,
    ) -> Result<Option<u32>, TransportError> {
        Ok(self.immediates.pop_front())
    }

    fn publish_credit(&mut self, credit: CreditUpdate) -> Result<(), TransportError> {
        let slot = self
            .mailbox
            .get_mut(credit.segment.index())
            .ok_or_else(|| TransportError::Failed("no mailbox slot".into()))?;
        *slot = credit.freed;
        Ok(())
    }

    fn want_credit_notice(&mut self) {}

    fn credit(&self, seg: SegmentId) -> u64 {
        self.mailbox.get(seg.index()).copied().unwrap_or(0)
    }

    fn check_peer(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

impl TargetMemory for FakeTarget {
    fn bytes(&self, seg: SegmentId, offset: usize, len: usize) -> Result<&[u8], TransportError> {
        segment(&self.segments, seg)?
            .received(offset, len)
            .map_err(region_error)
    }
}

/// A connection to itself over the fake device, with `layout` in both directions.
fn loopback(layout: &Layout) -> Connection<FakeLink, FakeTarget> {
    let mut writer = Vec::new();
    let mut reader = Vec::new();
    for (gi, g) in layout.groups().iter().enumerate() {
        for si in 0..g.segments {
            let len = usize::try_from(g.segment_bytes()).expect("segment fits in memory");
            let r = ShmRegion::create(&format!("bench-{gi}-{si}"), len).expect("memfd");
            let fd = r.fd().try_clone_to_owned().expect("dup");
            reader.push(ShmRegion::from_fd(fd, len).expect("second mapping"));
            writer.push(r);
        }
    }
    let link = FakeLink {
        mailbox: vec![0; writer.len()],
        segments: writer,
        immediates: VecDeque::new(),
    };
    Connection::new(
        link,
        FakeTarget { segments: reader },
        layout.clone(),
        layout.clone(),
        PollMode::Busy,
    )
}

/// send + recv + release of one message, for 64 B and 4 KiB; and a burst of 16 sends before the
/// receives, which walks more of the ring per iteration.
fn per_message(c: &mut Criterion) {
    let layout = Layout::default();
    let conn = loopback(&layout);
    let mut g = c.benchmark_group("transport/loopback");
    for size in [64usize, 4096] {
        let msg = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("send_recv_release/{size}B"), |b| {
            b.iter(|| {
                conn.send(black_box(&msg)).expect("send");
                let m = conn.recv().expect("recv");
                assert_eq!(m.len(), size);
                m.release();
            })
        });
        g.bench_function(format!("send_with_recv_into/{size}B"), |b| {
            let mut buf = vec![0u8; size];
            b.iter(|| {
                conn.send_with(size, |dst| dst.fill(0x3c))
                    .expect("send_with");
                black_box(conn.recv_into(&mut buf).expect("recv_into"));
            })
        });
        g.throughput(Throughput::Bytes(16 * size as u64));
        g.bench_function(format!("burst16/{size}B"), |b| {
            b.iter(|| {
                for _ in 0..16 {
                    conn.send(black_box(&msg)).expect("send");
                }
                for _ in 0..16 {
                    conn.recv().expect("recv").release();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, per_message);
criterion_main!(benches);
