//! The cost of handing one cache line from one core to the other and back, right now: two
//! threads ping-pong a counter through two lines 2 KiB apart (so no prefetcher couples them),
//! and the program prints half the median round trip in nanoseconds (round trips are timed in
//! batches of 100; the median is over the batches' means).
//!
//! This is the floor under any one-way latency between two processes of this host (rsmsg's
//! shared-memory transport moves one such line per message, UCX's FIFO about two), and on a
//! virtual machine it moves from one moment to the next as the host places the virtual CPUs.
//! `benches/compare-shm` prints it beside each pair of runs so that each pair can be read
//! against the state of the machine it ran in.
//!
//! Usage: `cargo run --release --example line_pingpong -- [ROUND_TRIPS]` (default 200 000).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A counter alone on its own 2 KiB.
#[repr(align(2048))]
struct Line(AtomicU64);

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUND_TRIPS must be a number"))
        .unwrap_or(200_000)
        .max(1);
    let lines = Arc::new([Line(AtomicU64::new(0)), Line(AtomicU64::new(0))]);
    let peer = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for i in 1..=n {
                while lines[0].0.load(Ordering::Acquire) != i {
                    std::hint::spin_loop();
                }
                lines[1].0.store(i, Ordering::Release);
            }
        })
    };
    // Round trips timed in batches of 100 (a clock read costs about as much as a round trip).
    const BATCH: u64 = 100;
    let mut per_batch = Vec::with_capacity((n / BATCH) as usize + 1);
    let mut i = 0;
    while i < n {
        let t = Instant::now();
        let start = i;
        let end = (i + BATCH).min(n);
        while i < end {
            i += 1;
            lines[0].0.store(i, Ordering::Release);
            while lines[1].0.load(Ordering::Acquire) != i {
                std::hint::spin_loop();
            }
        }
        per_batch.push(t.elapsed().as_nanos() as f64 / (end - start) as f64);
    }
    peer.join().expect("peer thread");
    per_batch.sort_by(f64::total_cmp);
    let median = per_batch[per_batch.len() / 2];
    println!("{:.1}", median / 2.0);
}
