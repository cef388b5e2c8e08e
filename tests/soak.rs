//! Soak: 8 peers over shared memory for `RSMSG_SOAK_SECS` seconds (60 by default), messages of
//! random sizes across every segment group, every byte checked at both ends, and the process's
//! resident memory and open fds sampled over time: neither may grow once warmed up.
//!
//! The 10-minute run recorded in docs/reliability.md is
//! `RSMSG_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rsmsg::core::Layout;
use rsmsg::transport::PollMode;
use rsmsg::transport::shm::{ShmListener, connect};

const PEERS: usize = 8;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// xorshift64*: reproducible sizes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The content of message `seq` of `peer`: every byte depends on all three.
fn fill(buf: &mut [u8], peer: usize, seq: u64) {
    let mut x = (seq << 8 | peer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

#[test]
fn eight_peers_random_sizes_every_byte_checked_no_growth() {
    let secs: u64 = std::env::var("RSMSG_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let layout: Layout = "256:256:4,4k:64:4,64k:16:4".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let messages = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for peer in 0..PEERS {
        let name = format!("soak-{}-{peer}", std::process::id());
        let listener = ShmListener::bind(&name, layout.clone(), PollMode::Event).unwrap();
        // The echo side checks every byte and sends the message back.
        threads.push(thread::spawn(move || {
            let conn = listener.accept().unwrap();
            let mut expect = Vec::new();
            let mut seq = 0u64;
            loop {
                let m = match conn.recv() {
                    Ok(m) => m,
                    Err(_) => return seq,
                };
                expect.resize(m.len(), 0);
                fill(&mut expect, peer, seq);
                assert_eq!(&m[..], &expect[..], "peer {peer} message {seq} corrupted");
                conn.send(&m).unwrap();
                drop(m);
                seq += 1;
            }
        }));
        let (stop, messages, bytes, layout) = (
            stop.clone(),
            messages.clone(),
            bytes.clone(),
            layout.clone(),
        );
        threads.push(thread::spawn(move || {
            let conn = connect(&name, layout, PollMode::Event).unwrap();
            let max = conn.max_message() as u64;
            let mut rng = Rng(0x1234_5678 + peer as u64);
            let mut buf = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Mostly small, sometimes large: sizes spread over every group.
                let r = rng.next();
                let len = match r % 8 {
                    0..=4 => 1 + (r >> 8) % 240,
                    5 | 6 => 1 + (r >> 8) % 4000,
                    _ => 1 + (r >> 8) % max,
                } as usize;
                buf.resize(len, 0);
                fill(&mut buf, peer, seq);
                conn.send(&buf).unwrap();
                let back = conn.recv().unwrap();
                assert_eq!(&back[..], &buf[..], "peer {peer} echo {seq} corrupted");
                drop(back);
                seq += 1;
                messages.fetch_add(2, Ordering::Relaxed);
                bytes.fetch_add(2 * len as u64, Ordering::Relaxed);
            }
            // The echo side releases our last message just after it sent it back: every
            // message is confirmed shortly (the last release empties the segment, which
            // always returns credit).
            for _ in 0..500 {
                if conn.unconfirmed().is_empty() {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(conn.unconfirmed(), Vec::<u32>::new(), "peer {peer}");
            assert_eq!(conn.confirmed(), seq);
            conn.close();
            seq
        }));
    }

    // Sample memory and fds; the first sample after a warm-up is the baseline.
    let start = Instant::now();
    let warm = Duration::from_secs(secs.min(60) / 6);
    let mut samples = Vec::new();
    let mut baseline = None;
    while start.elapsed() < Duration::from_secs(secs) {
        thread::sleep(Duration::from_secs(1).min(Duration::from_secs(secs) / 10));
        let s = (
            start.elapsed().as_secs(),
            rss_kib(),
            open_fds(),
            messages.load(Ordering::Relaxed),
        );
        if baseline.is_none() && start.elapsed() >= warm {
            baseline = Some(s);
        }
        if samples.len() % 30 == 0 {
            eprintln!(
                "soak: t={:>4}s rss={} KiB fds={} messages={}",
                s.0, s.1, s.2, s.3
            );
        }
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    let per_thread: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (_, rss0, fds0, _) = baseline.expect("a sample after the warm-up");
    let (_, rss_max, _, _) = *samples.iter().max_by_key(|s| s.1).unwrap();
    let fds_max = samples.iter().map(|s| s.2).max().unwrap();
    eprintln!(
        "soak: {secs} s, {} messages, {} MiB, RSS {rss0}..{rss_max} KiB after warm-up, fds {fds0}..{fds_max}",
        messages.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) >> 20
    );
    // Every peer exchanged messages, and both sides of each agree on how many.
    for pair in per_thread.chunks(2) {
        assert!(pair[1] > 0);
        assert_eq!(pair[0], pair[1]);
    }
    assert!(
        rss_max <= rss0 + 8 * 1024,
        "RSS grew from {rss0} to {rss_max} KiB"
    );
    assert!(fds_max <= fds0, "fds grew from {fds0} to {fds_max}");
}
