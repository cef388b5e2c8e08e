//! Micro-benchmarks of the core's hot paths (no bytes copied: protocol work only), and of one
//! message through a shared-memory connection in one thread (send, receive, release).
//!
//! For instruction counts: `RSMSG_PROFILE_LOOP=N target/release/deps/core-HASH` runs only the
//! shared-memory loop N times (run it under `valgrind --tool=callgrind` with two values of N:
//! the difference of the totals over the difference of N is the cost of one message).

use std::hint::black_box;

use criterion::{Criterion, criterion_group};
use rsmsg::core::{Generation, Header, Immediate, Layout, MessageKind, Receiver, Sender};
use rsmsg::transport::PollMode;
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect_path};

/// A shared-memory pair in this process (busy mode): (receiver, sender).
fn shm_pair() -> (ShmConnection, ShmConnection) {
    let dir = std::env::temp_dir().join(format!("rsmsg-bench-{}", std::process::id()));
    let path = dir.join("loop.sock");
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy).unwrap();
    let h = std::thread::spawn(move || listener.accept().unwrap());
    let b = connect_path(&path, Layout::default(), PollMode::Busy).unwrap();
    (h.join().unwrap(), b)
}

/// One 64-byte message: send, receive, release (the credit path included).
#[inline(never)]
fn shm_one(a: &ShmConnection, b: &ShmConnection, msg: &[u8]) -> usize {
    b.send(msg).unwrap();
    let m = a.try_recv().unwrap().unwrap();
    m.len()
}

fn shm_loop(c: &mut Criterion) {
    let (a, b) = shm_pair();
    let msg = [0x5au8; 64];
    c.bench_function("shm/send_recv_release/64B", |bch| {
        bch.iter(|| shm_one(&a, &b, black_box(&msg)))
    });
}

/// One message through the whole protocol: reserve, arrival, accept, release, credit.
fn round_trip(c: &mut Criterion) {
    for len in [8usize, 1000, 12_000] {
        let layout = Layout::default();
        let mut tx = Sender::new(layout.clone());
        let mut rx = Receiver::new(layout);
        c.bench_function(&format!("core/round_trip/{len}B"), |b| {
            b.iter(|| {
                let r = tx.reserve(black_box(len)).unwrap();
                let a = rx.on_immediate(r.immediate.get()).unwrap();
                let d = rx.accept(a, &r.header).unwrap();
                if let Some(cr) = rx.release(d.token).unwrap() {
                    tx.handle_credit(cr.segment, cr.freed).unwrap();
                }
                black_box(d.offset)
            })
        });
    }
}

/// Selection alone, with all groups empty and with the smallest group full.
fn select(c: &mut Criterion) {
    let mut tx = Sender::new(Layout::default());
    c.bench_function("core/select/empty", |b| {
        b.iter(|| tx.select(black_box(500)).unwrap())
    });
    while tx.reserve(500).is_ok_and(|r| r.group.0 == 0) {}
    c.bench_function("core/select/first_group_full", |b| {
        b.iter(|| tx.select(black_box(500)).unwrap())
    });
}

/// The codecs.
fn codecs(c: &mut Criterion) {
    let h = Header {
        kind: MessageKind::Data,
        len: 100,
        seq: 7,
        generation: Generation(3),
    }
    .encode();
    c.bench_function("core/header_decode", |b| {
        b.iter(|| Header::decode(black_box(&h)).unwrap())
    });
    let imm = Immediate(0x1234_5678);
    c.bench_function("core/immediate_decode", |b| {
        b.iter(|| black_box(imm).decode().unwrap())
    });
}

criterion_group!(benches, round_trip, select, codecs, shm_loop);

fn main() {
    if let Some(n) = std::env::var("RSMSG_PROFILE_LOOP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let (a, b) = shm_pair();
        let msg = [0x5au8; 64];
        let mut sum = 0;
        for _ in 0..n {
            sum += shm_one(&a, &b, black_box(&msg));
        }
        println!("{n} messages, {sum} bytes");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
