//! A deterministic two-sided simulator: a `Sender` and a `Receiver` joined by an in-memory fabric.
//!
//! The fabric owns the bytes of every source image and target segment. A "transfer" copies the
//! message's bytes from the source image to the target segment when it is delivered (so a sender
//! that rewrote its image too early is caught too). Knobs: data delay (order kept, as on an RC
//! QP), credit delay, reordering, superseded drops and duplicates, credit notices instead of
//! mailbox values, application starvation and out-of-order release, random sizes across all
//! groups (and beyond, for the rendezvous outcome).
//!
//! Checked: every payload byte at delivery and again at release (nothing overwrote a held
//! message), the order of messages, that a transfer never lands on a partition the application
//! still holds, that every credit the sender applies describes only released partitions, that the
//! run makes progress within a bounded number of idle steps (no deadlock), and that at the end
//! every partition has come back to the sender.
//!
//! Scale: `RSMSG_SIM_SCALE` (a float, default 1) multiplies the message counts.

use std::collections::VecDeque;

use rsmsg::core::{
    CreditUpdate, GroupConfig, Layout, Receiver, ReleaseToken, Reservation, ReserveError,
    SegmentId, Sender,
};

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn pct(&mut self, p: u32) -> bool {
        self.below(100) < u64::from(p)
    }
}

fn pattern(seq: u32, i: usize) -> u8 {
    let x = (i as u32).wrapping_mul(0x9E37_79B1) ^ seq.wrapping_mul(0x85EB_CA6B);
    (x ^ (x >> 15) ^ (x >> 24)) as u8
}

#[derive(Clone, Copy, Debug)]
struct Knobs {
    /// Percent chance per step that the application offers a message.
    send_pct: u32,
    /// Most steps a data transfer is delayed (order is kept).
    data_delay: u64,
    /// Most steps a credit is delayed.
    credit_delay: u64,
    /// Deliver ready credits in random order.
    credit_reorder: bool,
    /// Percent chance a credit is dropped when a later one for its segment is queued.
    credit_drop_pct: u32,
    /// Percent chance a credit is duplicated.
    credit_dup_pct: u32,
    /// Percent of credits applied through the 22-bit notice instead of the mailbox value.
    notice_pct: u32,
    /// Percent chance per step that the application releases one held message.
    release_pct: u32,
    /// Release a random held message (out of order) rather than the oldest.
    release_random: bool,
    /// Percent chance per step of entering a starvation period (no release).
    starve_pct: u32,
    /// Most steps of one starvation period.
    starve_len: u64,
    /// Percent of messages above the largest eager payload (rendezvous outcome).
    oversize_pct: u32,
    /// Percent chance per step that the receiver flushes pending credits.
    flush_pct: u32,
}

const CALM: Knobs = Knobs {
    send_pct: 70,
    data_delay: 3,
    credit_delay: 3,
    credit_reorder: false,
    credit_drop_pct: 0,
    credit_dup_pct: 0,
    notice_pct: 0,
    release_pct: 70,
    release_random: false,
    starve_pct: 0,
    starve_len: 0,
    oversize_pct: 0,
    flush_pct: 0,
};

const HOSTILE: Knobs = Knobs {
    send_pct: 80,
    data_delay: 40,
    credit_delay: 60,
    credit_reorder: true,
    credit_drop_pct: 50,
    credit_dup_pct: 20,
    notice_pct: 50,
    release_pct: 45,
    release_random: true,
    starve_pct: 2,
    starve_len: 300,
    oversize_pct: 1,
    flush_pct: 1,
};

struct InFlight {
    at: u64,
    r: Reservation,
}

struct Held {
    token: ReleaseToken,
    seg: usize,
    first: u32,
    count: u32,
    header_offset: usize,
    /// No header in the partition: the payload starts at `header_offset`.
    bare: bool,
    len: usize,
    seq: u32,
}

struct Sim {
    rng: Rng,
    k: Knobs,
    tx: Sender,
    rx: Receiver,
    src: Vec<Vec<u8>>,
    dst: Vec<Vec<u8>>,
    /// The simulator's own view: partition held by the application (not released yet).
    owned: Vec<Vec<bool>>,
    partitions: Vec<u32>,
    data_q: VecDeque<InFlight>,
    credit_q: Vec<(u64, CreditUpdate)>,
    held: Vec<Held>,
    now: u64,
    starve_until: u64,
    sent: u64,
    delivered: u64,
    next_seq: u32,
    rendezvous: u64,
    stalls: u64,
    credits_applied: u64,
}

impl Sim {
    fn new(layout: Layout, seed: u64, k: Knobs) -> Self {
        let tx = Sender::new(layout.clone());
        let rx = Receiver::new(layout);
        let segs = tx.tables().segments().to_vec();
        Sim {
            rng: Rng(seed),
            k,
            src: segs.iter().map(|s| vec![0u8; s.bytes() as usize]).collect(),
            dst: segs.iter().map(|s| vec![0u8; s.bytes() as usize]).collect(),
            owned: segs
                .iter()
                .map(|s| vec![false; s.partitions as usize])
                .collect(),
            partitions: segs.iter().map(|s| s.partitions).collect(),
            tx,
            rx,
            data_q: VecDeque::new(),
            credit_q: Vec::new(),
            held: Vec::new(),
            now: 0,
            starve_until: 0,
            sent: 0,
            delivered: 0,
            next_seq: 0,
            rendezvous: 0,
            stalls: 0,
            credits_applied: 0,
        }
    }

    fn pick_len(&mut self) -> usize {
        let max = self.tx.max_eager_payload();
        if self.rng.pct(self.k.oversize_pct) {
            return max + 1 + self.rng.below(4096) as usize;
        }
        // Choose a group with weights favouring small ones, then a length that needs it.
        let groups: Vec<u64> = self
            .tx
            .tables()
            .groups()
            .iter()
            .map(|g| u64::from(g.partition_size) * u64::from(g.span) - 16)
            .collect();
        let mut gi = 0;
        while gi + 1 < groups.len() && self.rng.pct(35) {
            gi += 1;
        }
        // One in eight: exactly a partition of the group, which goes bare (no header).
        let p = u64::from(self.tx.tables().groups()[gi].partition_size);
        if p <= max as u64 && self.rng.pct(12) {
            return p as usize;
        }
        let lo = if gi == 0 { 0 } else { groups[gi - 1] + 1 };
        let hi = groups[gi].max(lo);
        (lo + self.rng.below(hi - lo + 1)) as usize
    }

    fn try_send(&mut self) -> bool {
        let len = self.pick_len();
        match self.tx.reserve(len) {
            Ok(r) => {
                assert_eq!(
                    r.seq, self.sent as u32,
                    "sequence numbers follow reservations"
                );
                assert_eq!(r.len, len);
                let img = &mut self.src[r.segment.index()];
                img[r.offset..r.payload_offset()].copy_from_slice(r.wire_header());
                for (i, b) in img[r.payload_offset()..r.payload_offset() + len]
                    .iter_mut()
                    .enumerate()
                {
                    *b = pattern(r.seq, i);
                }
                let last = self.data_q.back().map_or(0, |f| f.at);
                let at = (self.now + self.rng.below(self.k.data_delay + 1)).max(last);
                self.data_q.push_back(InFlight { at, r });
                self.sent += 1;
                true
            }
            Err(ReserveError::WouldBlock { .. }) => {
                self.stalls += 1;
                false
            }
            Err(ReserveError::NeedsRendezvous { len: l, max }) => {
                assert_eq!(l, len);
                assert!(
                    len > max,
                    "rendezvous only beyond the largest eager payload"
                );
                assert!(len > self.tx.max_eager_payload());
                self.rendezvous += 1;
                true
            }
            Err(e) => panic!("unexpected reserve error {e}"),
        }
    }

    fn deliver_data(&mut self) -> bool {
        let mut progressed = false;
        while self.data_q.front().is_some_and(|f| f.at <= self.now) {
            let InFlight { r, .. } = self.data_q.pop_front().unwrap();
            let seg = r.segment.index();
            let first = r.first.get();
            // No transfer may land on (or pad over) partitions the application still holds.
            let n = self.partitions[seg];
            if r.padding > 0 {
                for p in n - r.padding..n {
                    assert!(
                        !self.owned[seg][p as usize],
                        "padding over held partition {p} of seg {seg}"
                    );
                }
            }
            for p in first..first + r.count {
                assert!(
                    !self.owned[seg][p as usize],
                    "transfer overwrites held partition {p} of seg {seg}"
                );
            }
            let span = r.offset..r.offset + r.wire_len();
            let (src, dst) = (&self.src[seg], &mut self.dst[seg]);
            dst[span.clone()].copy_from_slice(&src[span]);
            // The wire carries the immediate big-endian.
            let imm = rsmsg::core::Immediate::from_be_bytes(r.immediate.to_be_bytes()).get();
            let a = self.rx.on_immediate(imm).expect("valid immediate");
            assert_eq!(a.header_offset(), r.offset);
            assert_eq!(a.is_bare(), r.bare);
            let hdr = &self.dst[seg][a.header_offset()..a.header_offset() + a.header_len()];
            let d = self.rx.accept(a, hdr).expect("valid header");
            assert_eq!(d.seq, self.next_seq, "messages arrive in order");
            assert_eq!(d.len, r.len);
            assert_eq!(d.offset, r.payload_offset());
            self.next_seq = self.next_seq.wrapping_add(1);
            let body = &self.dst[seg][d.offset..d.offset + d.len];
            for (i, &b) in body.iter().enumerate() {
                assert_eq!(b, pattern(d.seq, i), "payload byte {i} of seq {}", d.seq);
            }
            for p in first..first + r.count {
                self.owned[seg][p as usize] = true;
            }
            self.held.push(Held {
                token: d.token,
                seg,
                first,
                count: r.count,
                header_offset: r.offset,
                bare: r.bare,
                len: d.len,
                seq: d.seq,
            });
            self.delivered += 1;
            progressed = true;
        }
        progressed
    }

    fn queue_credit(&mut self, c: CreditUpdate) {
        let at = self.now + self.rng.below(self.k.credit_delay + 1);
        self.credit_q.push((at, c));
    }

    fn release_one(&mut self) -> bool {
        if self.held.is_empty() || self.now < self.starve_until || !self.rng.pct(self.k.release_pct)
        {
            return false;
        }
        let idx = if self.k.release_random {
            self.rng.below(self.held.len() as u64) as usize
        } else {
            0
        };
        let h = if self.k.release_random {
            self.held.swap_remove(idx)
        } else {
            self.held.remove(idx)
        };
        // Nothing overwrote the message while it was held.
        let seg = &self.dst[h.seg];
        let payload = if h.bare {
            h.header_offset
        } else {
            assert_eq!(
                &seg[h.header_offset..h.header_offset + 2],
                &[0x53, 0x52],
                "header intact"
            );
            h.header_offset + 16
        };
        let body = &seg[payload..payload + h.len];
        for (i, &b) in body.iter().enumerate() {
            assert_eq!(
                b,
                pattern(h.seq, i),
                "held payload byte {i} of seq {} changed",
                h.seq
            );
        }
        for p in h.first..h.first + h.count {
            self.owned[h.seg][p as usize] = false;
        }
        if let Some(c) = self.rx.release(h.token).expect("valid release") {
            self.queue_credit(c);
        }
        // A second release of the same token is refused, never a panic.
        assert!(self.rx.release(h.token).is_err());
        true
    }

    fn deliver_credit(&mut self) -> bool {
        // Reservoir-pick a random ready credit (reorder) or the earliest due one (FIFO).
        let mut pick = None;
        let mut seen = 0u64;
        for i in 0..self.credit_q.len() {
            let at = self.credit_q[i].0;
            if at > self.now {
                continue;
            }
            seen += 1;
            pick = match pick {
                None => Some(i),
                Some(p) if self.k.credit_reorder => {
                    if self.rng.below(seen) == 0 {
                        Some(i)
                    } else {
                        Some(p)
                    }
                }
                Some(p) if at < self.credit_q[p].0 => Some(i),
                keep => keep,
            };
        }
        let Some(pick) = pick else { return false };
        let (_, c) = self.credit_q.swap_remove(pick);
        let superseded = self
            .credit_q
            .iter()
            .any(|(_, o)| o.segment == c.segment && o.freed >= c.freed);
        if superseded && self.rng.pct(self.k.credit_drop_pct) {
            return true;
        }
        if self.rng.pct(self.k.credit_dup_pct) {
            self.queue_credit(c);
        }
        self.apply_credit(c);
        true
    }

    fn apply_credit(&mut self, c: CreditUpdate) {
        let seg = c.segment.index();
        let old = self.tx.credit(c.segment).unwrap();
        if c.freed > old {
            // Every partition the credit gives back was released by the application.
            let n = u64::from(self.partitions[seg]);
            for p in old..c.freed {
                assert!(
                    !self.owned[seg][(p % n) as usize],
                    "credit covers held partition {p} of seg {seg}"
                );
            }
        }
        if self.rng.pct(self.k.notice_pct) {
            let (s, v) = self
                .tx
                .handle_credit_notice(c.notice().get())
                .expect("valid notice");
            assert_eq!(
                (s, v),
                (c.segment, c.freed),
                "22-bit notice reconstructs the absolute value"
            );
        } else {
            self.tx
                .handle_credit(c.segment, c.freed)
                .expect("valid credit");
        }
        assert_eq!(
            self.tx.credit(c.segment).unwrap(),
            old.max(c.freed),
            "sender keeps the maximum"
        );
        self.credits_applied += 1;
    }

    fn run(&mut self, messages: u64) {
        const IDLE_LIMIT: u64 = 20_000;
        let mut idle = 0u64;
        loop {
            self.now += 1;
            let mut progressed = false;
            if self.sent < messages && self.rng.pct(self.k.send_pct) {
                progressed |= self.try_send();
            }
            progressed |= self.deliver_data();
            if self.k.starve_pct > 0
                && self.now >= self.starve_until
                && self.rng.pct(self.k.starve_pct)
            {
                self.starve_until = self.now + 1 + self.rng.below(self.k.starve_len);
            }
            progressed |= self.release_one();
            progressed |= self.deliver_credit();
            if self.rng.pct(self.k.flush_pct) {
                self.rx.flush();
            }
            while let Some(c) = self.rx.poll_credit() {
                self.queue_credit(c);
            }
            let done = self.sent >= messages
                && self.data_q.is_empty()
                && self.held.is_empty()
                && self.credit_q.is_empty();
            if done {
                break;
            }
            idle = if progressed { 0 } else { idle + 1 };
            assert!(
                idle < IDLE_LIMIT,
                "no progress for {IDLE_LIMIT} steps: sent {} delivered {} held {} credits queued {} in use {}",
                self.sent,
                self.delivered,
                self.held.len(),
                self.credit_q.len(),
                self.tx.total_partitions_in_use()
            );
        }
        // Every partition came back: the last release of a segment always reports it.
        for s in 0..self.partitions.len() {
            let id = SegmentId(s as u8);
            assert_eq!(
                self.tx.credit(id),
                self.tx.head(id),
                "segment {s} fully credited"
            );
            assert_eq!(self.rx.freed(id), self.rx.head(id));
            assert_eq!(self.tx.head(id), self.rx.head(id));
            assert_eq!(self.rx.directory(id).unwrap().busy_count(), 0);
            assert_eq!(self.tx.directory(id).unwrap().busy_count(), 0);
        }
        assert_eq!(self.tx.total_partitions_in_use(), 0);
        assert_eq!(self.delivered, self.sent);
        assert_eq!(self.rx.stats().messages, self.delivered);
        assert_eq!(self.rx.stats().releases, self.delivered);
    }
}

fn scale(n: u64) -> u64 {
    let f: f64 = std::env::var("RSMSG_SIM_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * f) as u64).max(1)
}

/// Small segments with odd partition counts: many laps, padding at every ring end.
fn tiny_layout() -> Layout {
    Layout::new(vec![
        GroupConfig {
            partition_size: 64,
            partitions: 7,
            span: 3,
            segments: 2,
        },
        GroupConfig {
            partition_size: 128,
            partitions: 5,
            span: 5,
            segments: 1,
        },
        GroupConfig {
            partition_size: 1024,
            partitions: 3,
            span: 2,
            segments: 2,
        },
    ])
    .unwrap()
}

fn mid_layout() -> Layout {
    "64:64:4:3,256:33:8:2,1k:16:3,4k:4:4".parse().unwrap()
}

fn run(layout: Layout, seed: u64, k: Knobs, messages: u64) -> Sim {
    let mut sim = Sim::new(layout, seed, k);
    sim.run(messages);
    assert!(sim.delivered > 0);
    sim
}

#[test]
fn sim_calm_default_layout() {
    let sim = run(Layout::default(), 1, CALM, scale(60_000));
    // All three groups were used.
    assert!(sim.rx.stats().per_group.iter().all(|g| g.messages > 0));
}

#[test]
fn sim_hostile_default_layout() {
    let sim = run(Layout::default(), 2, HOSTILE, scale(60_000));
    assert!(
        sim.rendezvous > 0,
        "oversize messages got the rendezvous outcome"
    );
    assert!(sim.rx.stats().out_of_order_releases > 0);
}

#[test]
fn sim_hostile_tiny_layout_many_seeds() {
    let per = scale(100_000);
    for seed in 10..16 {
        let sim = run(tiny_layout(), seed, HOSTILE, per);
        assert!(sim.stalls > 0, "tiny segments must exert back-pressure");
        assert!(
            sim.rx.stats().padding_partitions > 0,
            "odd partition counts force padding"
        );
    }
}

#[test]
fn sim_calm_tiny_layout() {
    run(tiny_layout(), 20, CALM, scale(400_000));
}

#[test]
fn sim_starvation_mid_layout() {
    let k = Knobs {
        release_pct: 20,
        starve_pct: 5,
        starve_len: 2_000,
        send_pct: 95,
        ..HOSTILE
    };
    let sim = run(mid_layout(), 30, k, scale(150_000));
    assert!(sim.stalls > 0);
}

#[test]
fn sim_credit_chaos_mid_layout() {
    // Credits reordered, dropped whenever superseded, duplicated, half through 22-bit notices.
    let k = Knobs {
        credit_drop_pct: 100,
        credit_dup_pct: 40,
        credit_delay: 200,
        ..HOSTILE
    };
    let sim = run(mid_layout(), 40, k, scale(150_000));
    assert!(sim.credits_applied > 0);
}

#[test]
fn sim_in_order_release_fast_path() {
    let k = Knobs {
        release_random: false,
        release_pct: 100,
        ..CALM
    };
    let sim = run(mid_layout(), 50, k, scale(200_000));
    assert_eq!(sim.rx.stats().out_of_order_releases, 0);
}
