//! Endpoints over verbs (in the Soft-RoCE guest): connect by name through a manager, receive
//! from any peer, one listener accepting shared memory and verbs at once, a failing verbs peer, a
//! mesh whose connects the manager refuses for its load until the listener takes them.
//!
//! Without a device they print `skipped: no RDMA device` and return, unless
//! `RSMSG_REQUIRE_RDMA=1`, which makes a missing device a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{Limits, Manager, ManagerHandle, Token};
use rsmsg::endpoint::{Config, EndpointError, Transport, TransportChoice};
use rsmsg::mesh::{Mesh, MeshSetup, Wait as MeshWait};
use rsmsg::transport::TransportError;
use rsmsg::transport::verbs::VerbsOptions;
use rsmsg::verbs::{Context, test_context};
use rsmsg::{Endpoint, PeerId};

mod common;
use common::{payload, wakeups};

/// Guard against a hang, not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(120);

static NAMES: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    )
}

fn token() -> Token {
    Token::new("verbs-endpoint-test-token").unwrap()
}

fn manager() -> ManagerHandle {
    Manager::bind("127.0.0.1:0", token()).expect("embedded manager")
}

/// A configuration for `choice` through `mgr`, on the test's device.
fn config(ctx: &Context, mgr: &ManagerHandle, choice: TransportChoice) -> Config {
    let opts = VerbsOptions {
        context: Some(ctx.clone()),
        setup_timeout: Duration::from_secs(60),
        ..VerbsOptions::from_env().expect("verbs options from the environment")
    };
    Config::default()
        .transport(choice)
        .manager(mgr.local_addr().to_string(), token())
        .verbs_options(opts)
        .connect_retry(Duration::from_secs(30))
}

fn message(k: u64, seq: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&k.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend(payload(
        k * 7919 + seq,
        (seq as usize * 97 + k as usize * 13) % 5000,
    ));
    m
}

fn parse(m: &[u8]) -> (u64, u64) {
    (
        u64::from_le_bytes(m[..8].try_into().unwrap()),
        u64::from_le_bytes(m[8..16].try_into().unwrap()),
    )
}

/// A client thread: connects with `config`, sends `count` messages, waits for "done", closes.
fn client(config: Config, name: String, k: u64, count: u64) -> thread::JoinHandle<Transport> {
    thread::spawn(move || {
        let mut ep = Endpoint::new(config).unwrap();
        let id = ep.connect(&name).unwrap();
        let transport = ep.peer(id).unwrap().transport;
        for seq in 0..count {
            let m = message(k, seq);
            ep.send_with(id, m.len(), |b| b.copy_from_slice(&m))
                .unwrap();
        }
        let ack = ep
            .recv_timeout(HANG_GUARD)
            .unwrap()
            .expect("acknowledgement");
        assert_eq!(&*ack, b"done");
        assert_eq!(ack.peer(), id);
        drop(ack);
        ep.remove(id).unwrap().close();
        transport
    })
}

/// Receives until every client of `counts` has sent everything (checking order and contents
/// per peer), acknowledging each; peers that close after their acknowledgement are tolerated.
/// Returns client index -> (peer id, transport).
fn serve(ep: &mut Endpoint, counts: &BTreeMap<u64, u64>) -> BTreeMap<u64, (PeerId, Transport)> {
    let mut next: BTreeMap<PeerId, (u64, u64)> = BTreeMap::new();
    let mut out = BTreeMap::new();
    while out.len() < counts.len() {
        let m = match ep.recv_timeout(HANG_GUARD) {
            Ok(Some(m)) => m,
            Ok(None) => panic!("nothing for {HANG_GUARD:?}"),
            Err(EndpointError::PeerFailed { peer, source })
                if out.values().any(|(p, _)| *p == peer.id) =>
            {
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let (k, seq) = parse(&m);
        let e = next.entry(m.peer()).or_insert((k, 0));
        assert_eq!(e.0, k, "{} sent as two clients", m.peer());
        assert_eq!(e.1, seq, "{}: out of order", m.peer());
        assert_eq!(
            &*m,
            &message(k, seq)[..],
            "{}: message {seq} corrupt",
            m.peer()
        );
        e.1 += 1;
        if e.1 == counts[&k] {
            let (id, transport) = (m.peer(), m.peer_info().transport);
            drop(m);
            ep.send(id, b"done").unwrap();
            out.insert(k, (id, transport));
        }
    }
    out
}

#[test]
fn connect_by_name_over_verbs_and_ping_pong() {
    let Some(ctx) = test_context("connect_by_name_over_verbs_and_ping_pong") else {
        return;
    };
    let mgr = manager();
    let cfg = config(&ctx, &mgr, TransportChoice::Verbs);
    let name = unique("vep-pp");
    let mut server = Endpoint::bind(cfg.clone(), &name).unwrap();
    let l = server.listener().unwrap();
    assert!(l.accepts(Transport::Verbs) && !l.accepts(Transport::Shm));
    let c = thread::spawn(move || {
        let mut ep = Endpoint::new(cfg).unwrap();
        let id = ep.connect(&name).unwrap();
        assert_eq!(ep.peer(id).unwrap().transport, Transport::Verbs);
        for i in 0..60u64 {
            let m = message(1, i);
            ep.send(id, &m).unwrap();
            let back = ep.recv_timeout(HANG_GUARD).unwrap().expect("echo");
            assert_eq!(&*back, &m[..]);
        }
        let c = ep.counters(id).unwrap();
        assert_eq!((c.messages_sent, c.messages_received), (60, 60));
        ep.remove(id).unwrap().close();
    });
    let mut echoed = 0;
    loop {
        match server.recv_timeout(HANG_GUARD) {
            Ok(Some(m)) => {
                assert_eq!(m.peer_info().transport, Transport::Verbs);
                m.reply(&m).unwrap();
                echoed += 1;
            }
            Err(EndpointError::PeerFailed { source, .. }) => {
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(echoed, 60);
    c.join().unwrap();
}

#[test]
fn any_peer_receive_over_verbs() {
    let Some(ctx) = test_context("any_peer_receive_over_verbs") else {
        return;
    };
    let mgr = manager();
    let cfg = config(&ctx, &mgr, TransportChoice::Verbs);
    let name = unique("vep-any");
    let mut server = Endpoint::bind(cfg.clone(), &name).unwrap();
    let counts: BTreeMap<u64, u64> = [(0, 40), (1, 25), (2, 60)].into();
    let clients: Vec<_> = counts
        .iter()
        .map(|(&k, &n)| client(cfg.clone(), name.clone(), k, n))
        .collect();
    let got = serve(&mut server, &counts);
    let ids: BTreeSet<PeerId> = got.values().map(|(p, _)| *p).collect();
    assert_eq!(ids.len(), 3, "one peer per client");
    assert!(got.values().all(|(_, t)| *t == Transport::Verbs));
    for c in clients {
        assert_eq!(c.join().unwrap(), Transport::Verbs);
    }
}

#[test]
fn one_listener_accepts_shared_memory_and_verbs() {
    let Some(ctx) = test_context("one_listener_accepts_shared_memory_and_verbs") else {
        return;
    };
    let mgr = manager();
    let name = unique("vep-both");
    let mut server = Endpoint::bind(config(&ctx, &mgr, TransportChoice::Auto), &name).unwrap();
    let l = server.listener().unwrap();
    assert!(l.accepts(Transport::Verbs) && l.accepts(Transport::Shm));
    let counts: BTreeMap<u64, u64> = [(0, 30), (1, 30), (2, 30)].into();
    let shm = client(
        config(&ctx, &mgr, TransportChoice::Shm),
        name.clone(),
        0,
        30,
    );
    let verbs = client(
        config(&ctx, &mgr, TransportChoice::Verbs),
        name.clone(),
        1,
        30,
    );
    // Same host, auto: shared memory.
    let auto = client(
        config(&ctx, &mgr, TransportChoice::Auto),
        name.clone(),
        2,
        30,
    );
    let got = serve(&mut server, &counts);
    assert_eq!(got[&0].1, Transport::Shm);
    assert_eq!(got[&1].1, Transport::Verbs);
    assert_eq!(got[&2].1, Transport::Shm);
    assert_eq!(shm.join().unwrap(), Transport::Shm);
    assert_eq!(verbs.join().unwrap(), Transport::Verbs);
    assert_eq!(auto.join().unwrap(), Transport::Shm);
}

#[test]
fn a_verbs_peer_that_vanishes_is_removed_and_the_other_carries_on() {
    let Some(ctx) = test_context("a_verbs_peer_that_vanishes_is_removed_and_the_other_carries_on")
    else {
        return;
    };
    let mgr = manager();
    let cfg = config(&ctx, &mgr, TransportChoice::Verbs);
    let name = unique("vep-fail");
    let mut server = Endpoint::bind(cfg.clone(), &name).unwrap();
    // The vanishing peer: five messages, then its connection is dropped without a close.
    let mut gone = Endpoint::new(cfg.clone()).unwrap();
    let gid = gone.connect(&name).unwrap();
    for seq in 0..5 {
        gone.send(gid, &message(9, seq)).unwrap();
    }
    let mut from_gone = None;
    for _ in 0..5 {
        let m = server.recv_timeout(HANG_GUARD).unwrap().expect("message");
        assert_eq!(parse(&m).0, 9);
        from_gone = Some(m.peer());
    }
    drop(gone);
    let stayer = client(cfg, name, 1, 50);
    let mut failed = None;
    let mut got = 0;
    while got < 50 || failed.is_none() {
        match server.recv_timeout(HANG_GUARD) {
            Ok(Some(m)) => {
                let (k, seq) = parse(&m);
                assert_eq!((k, seq), (1, got));
                assert_eq!(&*m, &message(k, seq)[..]);
                got += 1;
                if got == 50 {
                    m.reply(b"done").unwrap();
                }
            }
            Err(EndpointError::PeerFailed { peer, source }) if Some(peer.id) == from_gone => {
                assert!(failed.is_none(), "reported once");
                failed = Some(source);
            }
            Err(EndpointError::PeerFailed { source, .. }) if got == 50 => {
                // The other client closes after its acknowledgement.
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(server.peer(from_gone.unwrap()).is_none());
    assert_eq!(stayer.join().unwrap(), Transport::Verbs);
}

#[test]
fn an_event_mode_endpoint_sleeps_on_completion_channels_over_verbs() {
    let Some(ctx) = test_context("an_event_mode_endpoint_sleeps_on_completion_channels_over_verbs")
    else {
        return;
    };
    let mgr = manager();
    let cfg = config(&ctx, &mgr, TransportChoice::Verbs).poll(rsmsg::transport::PollMode::Event);
    let name = unique("vep-event");
    let mut server = Endpoint::bind(cfg.clone(), &name).unwrap();
    let counts: BTreeMap<u64, u64> = [(0, 30), (1, 10)].into();
    let clients: Vec<_> = counts
        .iter()
        .map(|(&k, &n)| client(cfg.clone(), name.clone(), k, n))
        .collect();
    // Woken by the listener's descriptor for each connection, by the connections' completion
    // channels for each message.
    let got = serve(&mut server, &counts);
    assert_eq!(got.len(), 2);
    for c in clients {
        assert_eq!(c.join().unwrap(), Transport::Verbs);
    }
    // The clients closed after their acknowledgement (serve may have seen some of that): take
    // the remaining departures, then an idle wait sleeps, woken only by the liveness checks.
    loop {
        match server.recv_timeout(Duration::from_secs(5)) {
            Err(EndpointError::PeerFailed { source, .. }) => {
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
            }
            Ok(None) => break,
            other => panic!("expected the clients' close, got {other:?}"),
        }
    }
    assert!(server.is_empty());
    let before = wakeups();
    assert!(
        server
            .recv_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    let woke = wakeups() - before;
    assert!(woke < 60, "{woke} wake-ups in an idle 300 ms wait");
}

#[test]
fn a_mesh_forms_through_a_manager_that_queues_one_connection_request_per_rank() {
    let Some(ctx) =
        test_context("a_mesh_forms_through_a_manager_that_queues_one_connection_request_per_rank")
    else {
        return;
    };
    // Ranks 1 to 4 all connect to rank 0 first; the manager keeps at most one request waiting
    // for a listener and refuses the others (`LimitExceeded`) until rank 0 takes it. Rank 0
    // starts last, so the requests meet the limit as soon as it registers.
    let mut limits = Limits::default();
    limits.max_pending_per_endpoint = 1;
    let mgr = Manager::bind_with("127.0.0.1:0", token(), limits).expect("embedded manager");
    let cfg = config(&ctx, &mgr, TransportChoice::Verbs).connect_retry(Duration::ZERO);
    let setup = MeshSetup {
        job: unique("vep-mesh"),
        embed_manager: None,
        timeout: HANG_GUARD,
    };
    const SIZE: u32 = 5;
    let rank = |r: u32| {
        let (cfg, setup) = (cfg.clone(), setup.clone());
        move || {
            let m = Mesh::connect(&cfg, r, SIZE, &setup).unwrap();
            for to in (0..SIZE).filter(|&to| to != r) {
                m.send(to, &message(u64::from(r), u64::from(to))).unwrap();
            }
            for from in (0..SIZE).filter(|&f| f != r) {
                let got = m
                    .recv(from, MeshWait::For(HANG_GUARD))
                    .unwrap()
                    .expect("a message");
                assert_eq!(&*got, &message(u64::from(from), u64::from(r))[..]);
            }
            m.barrier().unwrap();
        }
    };
    let higher: Vec<_> = (1..SIZE).map(|r| thread::spawn(rank(r))).collect();
    thread::sleep(Duration::from_millis(500));
    rank(0)();
    for h in higher {
        h.join().unwrap();
    }
}
