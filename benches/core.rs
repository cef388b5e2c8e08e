//! Micro-benchmarks of the core's hot paths (no bytes copied: protocol work only).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rsmsg::core::{Generation, Header, Immediate, Layout, MessageKind, Receiver, Sender};

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

criterion_group!(benches, round_trip, select, codecs);
criterion_main!(benches);
