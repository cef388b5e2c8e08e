//! End-to-end tests of the verbs transport: an embedded bootstrap manager on 127.0.0.1, a
//! listener and its connectors in this process, both ends of every connection on one RDMA device
//! (Soft-RoCE loops back through it).
//!
//! Without a device they print `skipped: no RDMA device` and return, unless
//! `RSMSG_REQUIRE_RDMA=1`, which makes a missing device a failure (see `verbs::test_context`).
//! Iteration counts stay modest: under TCG emulation a message costs tens of microseconds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{Manager, ManagerHandle, Token};
use rsmsg::core::Layout;
use rsmsg::transport::verbs::{self, VerbsConnection, VerbsListener, VerbsOptions};
use rsmsg::transport::{PollMode, SendError, TransportError};
use rsmsg::verbs::{Context, test_context};

mod common;
use common::payload;

/// Guard against a hang, not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(120);

static NAMES: AtomicU32 = AtomicU32::new(0);

fn token() -> Token {
    Token::new("verbs-transport-test-token").expect("token")
}

fn manager() -> ManagerHandle {
    Manager::bind("127.0.0.1:0", token()).expect("embedded manager")
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

fn layout(s: &str) -> Layout {
    s.parse().expect("layout")
}

/// A listener with layout `l_layout` and mode `l_mode`, one connector with `c_layout`/`c_mode`:
/// returns (listener side, connector side).
fn pair_with(
    ctx: &Context,
    addr: SocketAddr,
    l_layout: Layout,
    l_mode: PollMode,
    c_layout: Layout,
    c_mode: PollMode,
) -> (VerbsConnection, VerbsConnection) {
    let name = unique("pair");
    let mut listener =
        VerbsListener::bind(addr, token(), &name, l_layout, l_mode, opts(ctx)).expect("bind");
    let t = thread::spawn(move || listener.accept().expect("accept"));
    let c = verbs::connect(addr, &token(), &name, c_layout, c_mode, &opts(ctx)).expect("connect");
    (t.join().expect("listener thread"), c)
}

/// A busy-polling listener with the small layout, registered under `name`.
fn listen(ctx: &Context, addr: SocketAddr, name: &str) -> VerbsListener {
    VerbsListener::bind(
        addr,
        token(),
        name,
        layout(SMALL),
        PollMode::Busy,
        opts(ctx),
    )
    .expect("bind")
}

fn pair(
    ctx: &Context,
    addr: SocketAddr,
    l: &str,
    mode: PollMode,
) -> (VerbsConnection, VerbsConnection) {
    pair_with(ctx, addr, layout(l), mode, layout(l), mode)
}

/// A small deterministic random generator for sizes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn recv_checked(c: &VerbsConnection, seq: u64, len: usize) {
    let m = c.recv_timeout(HANG_GUARD).expect("recv");
    assert_eq!(m.len(), len, "length of message {seq}");
    assert!(
        *m == *payload(seq, len),
        "content of message {seq} ({len} bytes) differs"
    );
}

macro_rules! device_or_skip {
    ($name:expr) => {
        match test_context($name) {
            Some(ctx) => ctx,
            None => return,
        }
    };
}

const SMALL: &str = "256:16:4,4k:8:4,64k:4:2";

#[test]
fn ping_pong_both_directions() {
    let ctx = device_or_skip!("ping_pong_both_directions");
    let m = manager();
    let (a, b) = pair(&ctx, m.local_addr(), SMALL, PollMode::Busy);
    let t = thread::spawn(move || {
        for i in 0..200u64 {
            let msg = b.recv_timeout(HANG_GUARD).expect("server recv");
            let echo = msg.to_vec();
            drop(msg);
            assert_eq!(echo, payload(i, 1 + (i as usize * 37) % 900));
            b.send(&echo).expect("echo");
        }
        b
    });
    for i in 0..200u64 {
        let len = 1 + (i as usize * 37) % 900;
        a.send(&payload(i, len)).expect("send");
        recv_checked(&a, i, len);
    }
    let b = t.join().expect("server thread");
    assert_eq!(a.stats().sender.messages, 200);
    assert_eq!(b.stats().receiver.messages, 200);
}

#[test]
fn one_way_stream_of_random_sizes_across_every_group_checks_every_byte() {
    let ctx = device_or_skip!("one_way_stream_of_random_sizes_across_every_group");
    let m = manager();
    let (rx, tx) = pair(&ctx, m.local_addr(), SMALL, PollMode::Busy);
    let max = tx.max_message();
    assert_eq!(max, 2 * 65536 - 16);
    // Sizes from every group's range, boundaries included.
    let bounds = [
        (0usize, 1024 - 16),
        (1024 - 15, 16384 - 16),
        (16384 - 15, max),
    ];
    let mut rng = Rng(0x5eed);
    let sizes: Vec<usize> = (0..300)
        .map(|i| {
            let (lo, hi) = bounds[i % 3];
            match i % 10 {
                0 => lo,
                1 => hi,
                _ => lo + rng.below((hi - lo + 1) as u64) as usize,
            }
        })
        .collect();
    let expect = sizes.clone();
    let t = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            tx.send(&payload(i as u64, len)).expect("send");
        }
        tx
    });
    for (i, &len) in expect.iter().enumerate() {
        recv_checked(&rx, i as u64, len);
    }
    let tx = t.join().expect("sender");
    let per_group = &rx.stats().receiver.per_group;
    assert_eq!(per_group.len(), 3);
    for (g, s) in per_group.iter().enumerate() {
        assert!(
            s.messages >= 30,
            "group {g} carried only {} messages",
            s.messages
        );
    }
    assert_eq!(tx.stats().sender.messages, 300);
    assert!(
        matches!(
            tx.send_with(max + 1, |_| ()),
            Err(SendError::TooLarge { .. })
        ),
        "a message above the largest group cannot be filled in place (rendezvous: verbs_rndv.rs)"
    );
}

#[test]
fn bidirectional_streams() {
    let ctx = device_or_skip!("bidirectional_streams");
    let m = manager();
    let (a, b) = pair(&ctx, m.local_addr(), SMALL, PollMode::Busy);
    const N: u64 = 400;
    // Each side interleaves non-blocking sends and receives, so neither can block the other.
    fn run(c: VerbsConnection, salt: u64) -> VerbsConnection {
        let (mut sent, mut got) = (0u64, 0u64);
        let deadline = std::time::Instant::now() + HANG_GUARD;
        while sent < N || got < N {
            assert!(
                std::time::Instant::now() < deadline,
                "stalled at sent {sent} got {got}"
            );
            if sent < N {
                let len = ((sent * 131 + salt) % 5000) as usize;
                match c.try_send(&payload(sent + salt * 1_000_000, len)) {
                    Ok(()) => sent += 1,
                    Err(SendError::WouldBlock) => {}
                    Err(e) => panic!("send: {e}"),
                }
            }
            if let Some(m) = c.try_recv().expect("recv") {
                let other = 1 - salt;
                let len = ((got * 131 + other) % 5000) as usize;
                assert!(
                    *m == *payload(got + other * 1_000_000, len),
                    "message {got}"
                );
                got += 1;
            }
        }
        c
    }
    let t = thread::spawn(move || run(b, 1));
    let a = run(a, 0);
    let b = t.join().expect("peer thread");
    assert_eq!(a.stats().receiver.messages, N);
    assert_eq!(b.stats().receiver.messages, N);
}

#[test]
fn one_process_with_eight_peers() {
    let ctx = device_or_skip!("one_process_with_eight_peers");
    let m = manager();
    let addr = m.local_addr();
    let name = unique("hub");
    let mut listener = listen(&ctx, addr, &name);
    const PEERS: usize = 8;
    const ROUNDS: u64 = 40;
    let hub = thread::spawn(move || {
        let conns: Vec<VerbsConnection> = (0..PEERS)
            .map(|_| listener.accept().expect("accept"))
            .collect();
        // Echo every message back on the connection it came from, until each peer sent ROUNDS.
        let mut counts = vec![0u64; PEERS];
        let deadline = std::time::Instant::now() + HANG_GUARD;
        while counts.iter().any(|&n| n < ROUNDS) {
            assert!(
                std::time::Instant::now() < deadline,
                "hub stalled: {counts:?}"
            );
            for (i, c) in conns.iter().enumerate() {
                if let Some(msg) = c.try_recv().expect("hub recv") {
                    let echo = msg.to_vec();
                    drop(msg);
                    c.send(&echo).expect("hub echo");
                    counts[i] += 1;
                }
            }
        }
        counts
    });
    let peers: Vec<_> = (0..PEERS as u64)
        .map(|p| {
            let ctx = ctx.clone();
            let name = name.clone();
            thread::spawn(move || {
                let c = verbs::connect(
                    addr,
                    &token(),
                    &name,
                    layout(SMALL),
                    PollMode::Busy,
                    &opts(&ctx),
                )
                .expect("connect");
                for i in 0..ROUNDS {
                    let seq = p * 1000 + i;
                    let len = 8 + ((seq * 7) % 2000) as usize;
                    c.send(&payload(seq, len)).expect("send");
                    recv_checked(&c, seq, len);
                }
                c.stats().receiver.messages
            })
        })
        .collect();
    for p in peers {
        assert_eq!(p.join().expect("peer thread"), ROUNDS);
    }
    assert_eq!(hub.join().expect("hub thread"), vec![ROUNDS; PEERS]);
}

#[test]
fn many_more_messages_than_partitions_wrap_the_credits() {
    let ctx = device_or_skip!("many_more_messages_than_partitions");
    let m = manager();
    // 8 + 4 partitions: 1200 messages are 100 times the partitions.
    let l = "64:8:2,256:4:2";
    let (rx, tx) = pair(&ctx, m.local_addr(), l, PollMode::Busy);
    const N: u64 = 1200;
    let t = thread::spawn(move || {
        for i in 0..N {
            let len = ((i * 29) % 400) as usize;
            tx.send(&payload(i, len)).expect("send");
        }
        tx
    });
    for i in 0..N {
        recv_checked(&rx, i, ((i * 29) % 400) as usize);
    }
    let tx = t.join().expect("sender");
    let s = tx.stats().sender;
    assert_eq!(s.messages, N);
    assert!(s.credits > 0, "credits came back");
    let r = rx.stats().receiver;
    assert!(r.credits_emitted > 0);
    assert_eq!(r.releases, N);
}

#[test]
fn out_of_order_release_frees_everything() {
    let ctx = device_or_skip!("out_of_order_release_frees_everything");
    let m = manager();
    let (rx, tx) = pair(&ctx, m.local_addr(), "64:8:1,256:4:2", PollMode::Busy);
    let mut seq = 0u64;
    for round in 0..20u64 {
        // Fill the small group's 8 partitions (payloads up to 48 bytes).
        let mut lens = Vec::new();
        while let Ok(()) = tx.try_send(&payload(seq + lens.len() as u64, 40)) {
            lens.push(40);
            assert!(
                lens.len() <= 12,
                "more messages than partitions were accepted"
            );
        }
        assert!(!lens.is_empty(), "round {round}: nothing could be sent");
        let mut held = Vec::new();
        for (k, &len) in lens.iter().enumerate() {
            let m = rx.recv_timeout(HANG_GUARD).expect("recv");
            assert!(*m == *payload(seq + k as u64, len));
            held.push(m);
        }
        // Release in a scrambled order: odd positions first, then evens from the back.
        let mut order: Vec<usize> = (0..held.len()).filter(|i| i % 2 == 1).collect();
        order.extend((0..held.len()).filter(|i| i % 2 == 0).rev());
        let mut slots: Vec<Option<_>> = held.into_iter().map(Some).collect();
        for i in order {
            slots[i].take().expect("held").release();
        }
        seq += lens.len() as u64;
    }
    let r = rx.stats().receiver;
    assert!(
        r.out_of_order_releases > 0,
        "some releases were out of order"
    );
    assert_eq!(r.releases, seq);
    // Everything freed: a full round fits again.
    tx.send(b"after").expect("send after");
    assert_eq!(&*rx.recv_timeout(HANG_GUARD).expect("recv"), b"after");
}

#[test]
fn back_pressure_without_loss() {
    let ctx = device_or_skip!("back_pressure_without_loss");
    let m = manager();
    let (rx, tx) = pair(&ctx, m.local_addr(), "64:8:1,256:4:2", PollMode::Busy);
    // The receiver holds everything: try_send ends in WouldBlock, nothing is overwritten.
    let mut n = 0u64;
    loop {
        match tx.try_send(&payload(n, 30)) {
            Ok(()) => n += 1,
            Err(SendError::WouldBlock) => break,
            Err(e) => panic!("try_send: {e}"),
        }
        assert!(n <= 12, "more messages accepted than partitions exist");
    }
    assert_eq!(n, 12, "8 small partitions, then the 4 larger ones");
    assert!(tx.stats().sender.credit_stalls > 0);
    let held: Vec<_> = (0..n)
        .map(|i| {
            let m = rx.recv_timeout(HANG_GUARD).expect("recv");
            assert!(*m == *payload(i, 30), "held message {i}");
            m
        })
        .collect();
    assert!(matches!(tx.try_send(b"x"), Err(SendError::WouldBlock)));
    drop(held);
    // A blocking sender outpacing a slow receiver: every message arrives, in order.
    const N: u64 = 300;
    let t = thread::spawn(move || {
        for i in 0..N {
            tx.send(&payload(1000 + i, 30 + (i % 150) as usize))
                .expect("send");
        }
        tx
    });
    for i in 0..N {
        if i % 50 == 0 {
            thread::sleep(Duration::from_millis(20));
        }
        recv_checked(&rx, 1000 + i, 30 + (i % 150) as usize);
    }
    let tx = t.join().expect("sender");
    assert!(
        tx.stats().sender.credit_stalls > 1,
        "the sender had to wait"
    );
}

#[test]
fn manager_restart_between_connections() {
    let ctx = device_or_skip!("manager_restart_between_connections");
    let m = manager();
    let addr = m.local_addr();
    let name = unique("restart");
    let mut listener = listen(&ctx, addr, &name);
    let t = thread::spawn(move || {
        let first = listener.accept().expect("first accept");
        let second = listener.accept().expect("second accept after the restart");
        (first, second)
    });
    let c1 = verbs::connect(
        addr,
        &token(),
        &name,
        layout(SMALL),
        PollMode::Busy,
        &opts(&ctx),
    )
    .expect("first connect");
    m.shutdown();
    let m2 = Manager::bind(addr, token()).expect("a new manager on the same address");
    let c2 = verbs::connect(
        addr,
        &token(),
        &name,
        layout(SMALL),
        PollMode::Busy,
        &opts(&ctx),
    )
    .expect("connect through the restarted manager");
    let (s1, s2) = t.join().expect("listener thread");
    // Both connections work; the first never depended on the manager.
    for (i, (c, s)) in [(&c1, &s1), (&c2, &s2)].into_iter().enumerate() {
        c.send(&payload(i as u64, 100)).expect("send");
        recv_checked(s, i as u64, 100);
        s.send(&payload(10 + i as u64, 200)).expect("reply");
        recv_checked(c, 10 + i as u64, 200);
    }
    drop(m2);
}

#[test]
fn event_and_adaptive_modes_wake_sleepers() {
    let ctx = device_or_skip!("event_and_adaptive_modes_wake_sleepers");
    let m = manager();
    let (a, b) = pair_with(
        &ctx,
        m.local_addr(),
        layout("64:8:1,256:4:2"),
        PollMode::Event,
        layout("64:8:1,256:4:2"),
        PollMode::Adaptive { spins: 100 },
    );
    // The event-mode side sleeps in recv; the adaptive side echoes.
    let t = thread::spawn(move || {
        for i in 0..100u64 {
            let msg = b.recv_timeout(HANG_GUARD).expect("adaptive recv");
            let v = msg.to_vec();
            drop(msg);
            assert_eq!(v, payload(i, 20 + i as usize));
            if i % 10 == 0 {
                thread::sleep(Duration::from_millis(5));
            }
            b.send(&v).expect("adaptive send");
        }
        b
    });
    for i in 0..100u64 {
        a.send(&payload(i, 20 + i as usize)).expect("event send");
        recv_checked(&a, i, 20 + i as usize);
    }
    let b = t.join().expect("peer");
    // A sender in event mode sleeps for credits: the receiver is slow, the stream is 25 times
    // the partitions, and every credit comes with a notice that wakes it.
    let t = thread::spawn(move || {
        for i in 0..300u64 {
            a.send(&payload(500 + i, 40))
                .expect("event-mode blocking send");
        }
        a
    });
    for i in 0..300u64 {
        if i % 30 == 0 {
            thread::sleep(Duration::from_millis(10));
        }
        recv_checked(&b, 500 + i, 40);
    }
    let a = t.join().expect("event sender");
    assert!(
        a.stats().sender.credit_stalls > 0,
        "the event-mode sender waited for credits"
    );
}

#[test]
fn close_and_departure_are_reported() {
    let ctx = device_or_skip!("close_and_departure_are_reported");
    let m = manager();
    let (a, b) = pair(&ctx, m.local_addr(), SMALL, PollMode::Busy);
    a.close();
    assert!(matches!(
        b.recv_timeout(HANG_GUARD),
        Err(TransportError::PeerClosed)
    ));
    // A peer that disappears without a word: the probe finds out in bounded time.
    let (c, d) = pair(&ctx, m.local_addr(), SMALL, PollMode::Event);
    drop(c);
    match d.recv_timeout(HANG_GUARD) {
        Err(TransportError::PeerClosed) => {}
        other => panic!("expected PeerClosed after the peer vanished, got {other:?}"),
    }
    assert!(
        d.send(b"late").is_err(),
        "a failed connection refuses sends"
    );
}

#[test]
fn zero_copy_send_and_recv_into() {
    let ctx = device_or_skip!("zero_copy_send_and_recv_into");
    let m = manager();
    let (a, b) = pair(&ctx, m.local_addr(), SMALL, PollMode::Busy);
    a.send_with(3000, |buf| buf.copy_from_slice(&payload(7, 3000)))
        .expect("send_with");
    let mut out = vec![0u8; 4000];
    let n = b.recv_into(&mut out).expect("recv_into");
    assert_eq!(n, 3000);
    assert_eq!(&out[..n], &payload(7, 3000)[..]);
    assert!(a.try_recv().expect("try_recv").is_none());
}

#[test]
fn bad_offer_is_rejected_and_the_listener_stays_usable() {
    use rsmsg::bootstrap::{
        Descriptors, EndpointInfo, EndpointName, HostId, ManagerClient, TransportSet,
    };
    let ctx = device_or_skip!("bad_offer_is_rejected_and_the_listener_stays_usable");
    let m = manager();
    let addr = m.local_addr();
    let name = unique("strict");
    let mut listener = listen(&ctx, addr, &name);
    let t = thread::spawn(move || {
        let first = listener.accept();
        let second = listener
            .accept()
            .expect("a good connection after a bad one");
        (first.err().map(|e| e.to_string()), second)
    });
    // An offer whose hello is not an rsmsg verbs hello.
    let mut client =
        ManagerClient::connect(addr, &token(), Duration::from_secs(30)).expect("manager client");
    let from = EndpointInfo {
        name: EndpointName::new("hostile-initiator").unwrap(),
        host_id: HostId::local().unwrap(),
        transports: TransportSet::VERBS,
        shm_socket: None,
    };
    let offer = Descriptors {
        opaque: b"not a hello at all".to_vec(),
        ..Descriptors::default()
    };
    let to = EndpointName::new(name.as_str()).unwrap();
    let refused = client.dial(&from, &to, &offer, HANG_GUARD);
    let why = refused
        .expect_err("the listener must refuse a malformed offer")
        .to_string();
    assert!(
        why.contains("magic") || why.contains("short"),
        "reason: {why}"
    );
    let good = verbs::connect(
        addr,
        &token(),
        &name,
        layout(SMALL),
        PollMode::Busy,
        &opts(&ctx),
    )
    .expect("connect");
    let (first, server) = t.join().expect("listener thread");
    let first = first.expect("the first accept reports the bad offer");
    assert!(
        first.contains("magic") || first.contains("short"),
        "{first}"
    );
    good.send(b"still works").expect("send");
    assert_eq!(
        &*server.recv_timeout(HANG_GUARD).expect("recv"),
        b"still works"
    );
}

/// Whether `fd` is readable within `ms` milliseconds.
fn readable(fd: std::os::fd::BorrowedFd<'_>, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
    rc == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn event_fd_wakes_a_poll_loop() {
    let ctx = device_or_skip!("event_fd_wakes_a_poll_loop");
    let m = manager();
    let (a, b) = pair(&ctx, m.local_addr(), "64:8:1,256:4:2", PollMode::Event);
    let fd = a
        .event_fd()
        .expect("event mode has the completion channel's fd");
    assert!(a.try_recv().expect("try_recv").is_none());
    assert!(!a.arm().expect("arm"), "nothing there: the wait may begin");
    assert!(!readable(fd, 0), "armed and nothing sent: not readable");
    const N: u64 = 100;
    let sender = thread::spawn(move || {
        for i in 0..N {
            if i % 10 == 0 {
                thread::sleep(Duration::from_millis(5));
            }
            b.send(&payload(i, 20 + i as usize)).expect("send");
        }
        b
    });
    let (mut got, mut waits) = (0u64, 0u64);
    while got < N {
        while let Some(msg) = a.try_recv().expect("try_recv") {
            assert!(*msg == *payload(got, 20 + got as usize), "message {got}");
            got += 1;
        }
        if got < N && !a.arm().expect("arm") {
            waits += 1;
            assert!(readable(fd, 60_000), "no wake-up after {got} messages");
        }
    }
    assert!(waits > 0, "the loop slept at least once");
    let b = sender.join().expect("sender");
    assert!(!a.arm().expect("arm"));
    assert!(!readable(fd, 0), "arm reset the fd");
    b.send(b"late").expect("send");
    assert!(readable(fd, 60_000), "the last message wakes the loop");
    let late = a
        .try_recv()
        .expect("try_recv")
        .expect("the message that made the fd readable");
    assert_eq!(&*late, b"late");
    assert!(
        pair(&ctx, m.local_addr(), "64:8:1,256:4:2", PollMode::Busy)
            .0
            .event_fd()
            .is_none(),
        "busy mode lends no fd"
    );
}

/// A payload exactly one partition long goes bare (immediate type 2, no header): on a fresh
/// connection the 64 KiB group of [`SMALL`] (4 partitions) holds 4 such messages in flight,
/// where with a header it would hold 2. A stream of partition sizes and their neighbours, over
/// every send path and both receive paths, arrives byte for byte in order.
#[test]
fn a_payload_of_exactly_one_partition_goes_bare_and_takes_one_partition() {
    let ctx = device_or_skip!("a_payload_of_exactly_one_partition_goes_bare");
    let m = manager();
    let (rx, tx) = pair(&ctx, m.local_addr(), SMALL, PollMode::Busy);
    let mut sent = 0u64;
    while tx.try_send(&payload(sent, 65536)).is_ok() {
        sent += 1;
    }
    assert_eq!(sent, 4, "messages of 64 KiB in flight");
    for i in 0..sent {
        recv_checked(&rx, i, 65536);
    }
    let sizes: Vec<usize> = (0..300)
        .map(|i| [256, 255, 257, 4096, 4095, 4097, 65536, 65535, 65537, 1][i % 10])
        .collect();
    let expect = sizes.clone();
    let t = thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            let seq = sent + i as u64;
            let msg = payload(seq, len);
            match i % 3 {
                0 => tx.send(&msg).expect("send"),
                1 => tx
                    .send_with(len, |buf| buf.copy_from_slice(&msg))
                    .expect("send_with"),
                _ => {
                    let (x, y) = msg.split_at(len / 2);
                    tx.send_vectored(&[x, y]).expect("send_vectored")
                }
            }
        }
        tx
    });
    let mut buf = vec![0u8; 1 << 17];
    for (i, &len) in expect.iter().enumerate() {
        let seq = sent + i as u64;
        if i % 2 == 0 {
            recv_checked(&rx, seq, len);
        } else {
            let n = rx.recv_into(&mut buf).expect("recv_into");
            assert_eq!(
                &buf[..n],
                &payload(seq, len)[..],
                "message {seq} of {len} B"
            );
        }
    }
    let tx = t.join().expect("sender");
    assert_eq!(tx.stats().sender.messages, 304);
}
