//! `Endpoint` over shared memory on the host: receive from any peer with its identity, send by
//! peer id, a failing peer removed while the others carry on, counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{Manager, Token};
use rsmsg::endpoint::{Config, EndpointError, Listener, Transport};
use rsmsg::transport::{SendError, TransportError};
use rsmsg::{Endpoint, PeerId};

mod common;
use common::{payload, wakeups};

/// Guard against a hang, not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(60);

static NAMES: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    )
}

/// Message `seq` of client `k`: its index, its number, then checkable bytes.
fn message(k: u64, seq: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&k.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend(payload(
        k * 1_000_003 + seq,
        (seq as usize * 53 + k as usize * 11) % 3000,
    ));
    m
}

fn parse(m: &[u8]) -> (u64, u64) {
    (
        u64::from_le_bytes(m[..8].try_into().unwrap()),
        u64::from_le_bytes(m[8..16].try_into().unwrap()),
    )
}

/// Receives until every client in `expect` (index -> message count) has sent everything,
/// checking order and contents per peer, and acknowledges each finished client by peer id.
/// Returns the peer id of each client index, and the failures seen.
fn serve(
    ep: &mut Endpoint,
    expect: &BTreeMap<u64, u64>,
    on_failure: impl Fn(&EndpointError),
) -> (BTreeMap<u64, PeerId>, Vec<EndpointError>) {
    let mut by_peer: BTreeMap<PeerId, (u64, u64)> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut done = 0;
    let finishing = expect.values().filter(|&&n| n != u64::MAX).count();
    while done < finishing {
        let msg = match ep.recv_timeout(HANG_GUARD) {
            Ok(Some(m)) => m,
            Ok(None) => panic!("nothing received for {HANG_GUARD:?}"),
            Err(e @ EndpointError::PeerFailed { .. }) => {
                on_failure(&e);
                failures.push(e);
                continue;
            }
            Err(e) => panic!("endpoint failed: {e}"),
        };
        let (k, seq) = parse(&msg);
        let peer = msg.peer();
        assert_eq!(msg.peer_info().id, peer);
        let entry = by_peer.entry(peer).or_insert((k, 0));
        assert_eq!(entry.0, k, "{peer} sent as two clients");
        assert_eq!(entry.1, seq, "{peer}: out of order");
        assert_eq!(&*msg, &message(k, seq)[..], "{peer}: message {seq} corrupt");
        entry.1 += 1;
        let finished = entry.1 == expect[&k];
        drop(msg);
        if finished {
            ep.send(peer, b"done").unwrap();
            done += 1;
        }
    }
    let ids = by_peer.iter().map(|(p, (k, _))| (*k, *p)).collect();
    (ids, failures)
}

/// A client on its own thread: connects, sends `count` messages, waits for the acknowledgement
/// and closes (after `close_gate` opens, when given); `mid_gate` holds the second half.
fn client(
    config: Config,
    name: String,
    k: u64,
    count: u64,
    gate: Option<mpsc::Receiver<()>>,
    close_gate: Option<mpsc::Receiver<()>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let conn = rsmsg::connect(&config, &name).unwrap();
        for seq in 0..count {
            if seq == count / 2
                && let Some(g) = &gate
            {
                g.recv_timeout(HANG_GUARD).expect("gate");
            }
            conn.send(&message(k, seq)).unwrap();
        }
        let ack = conn.recv_timeout(HANG_GUARD).unwrap();
        assert_eq!(&*ack, b"done");
        drop(ack);
        if let Some(g) = close_gate {
            g.recv_timeout(HANG_GUARD).expect("close gate");
        }
        conn.close();
    })
}

#[test]
fn receives_from_any_peer_with_its_identity() {
    let name = unique("ep-any");
    let mut ep = Endpoint::bind(Config::default(), &name).unwrap();
    assert!(ep.listener().unwrap().accepts(Transport::Shm));
    assert!(!ep.listener().unwrap().accepts(Transport::Verbs));
    let counts: BTreeMap<u64, u64> = [(0, 150), (1, 40), (2, 300), (3, 1)].into();
    let mut closers = Vec::new();
    let clients: Vec<_> = counts
        .iter()
        .map(|(&k, &n)| {
            let (tx, rx) = mpsc::channel();
            closers.push(tx);
            client(Config::default(), name.clone(), k, n, None, Some(rx))
        })
        .collect();
    let (ids, failures) = serve(&mut ep, &counts, |_| {});
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(ids.len(), 4, "one peer per client");
    for (k, id) in &ids {
        let info = ep.peer(*id).expect("peer still there until it closes");
        assert!(info.accepted);
        assert_eq!(info.transport, Transport::Shm);
        let c = ep.counters(*id).unwrap();
        assert_eq!(c.messages_received, counts[k], "client {k}");
        let bytes: u64 = (0..counts[k]).map(|s| message(*k, s).len() as u64).sum();
        assert_eq!(c.bytes_received, bytes, "client {k}");
        assert_eq!(c.messages_sent, 1, "one acknowledgement");
        assert_eq!(c.partitions_held, 0, "everything released");
    }
    for c in closers {
        c.send(()).unwrap();
    }
    for c in clients {
        c.join().unwrap();
    }
    // The clients closed: each shows up once as a failed peer, then the endpoint is empty.
    let mut closed = Vec::new();
    while closed.len() < 4 {
        match ep.recv_timeout(HANG_GUARD) {
            Err(EndpointError::PeerFailed { peer, source }) => {
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
                closed.push(peer.id);
            }
            other => panic!("expected the clients' close, got {other:?}"),
        }
    }
    closed.sort();
    let mut all: Vec<_> = ids.values().copied().collect();
    all.sort();
    assert_eq!(closed, all);
    assert!(ep.is_empty());
    assert!(matches!(ep.send(all[0], b"x"), Err(EndpointError::UnknownPeer(p)) if p == all[0]));
}

#[test]
fn a_failing_peer_is_removed_and_the_others_carry_on() {
    let name = unique("ep-fail");
    let mut ep = Endpoint::bind(Config::default(), &name).unwrap();
    let (go_tx, go_rx) = mpsc::channel();
    let gates: Vec<_> = (0..2).map(|_| mpsc::channel()).collect();
    let mut gate_senders = Vec::new();
    let mut handles = Vec::new();
    for (k, (tx, rx)) in gates.into_iter().enumerate() {
        gate_senders.push(tx);
        handles.push(client(
            Config::default(),
            name.clone(),
            k as u64,
            200,
            Some(rx),
            None,
        ));
    }
    // Client 9 sends ten messages and vanishes without closing (as a crashed process would).
    let crash_name = name.clone();
    let crasher = thread::spawn(move || {
        let conn = rsmsg::connect(&Config::default(), &crash_name).unwrap();
        for seq in 0..10 {
            conn.send(&message(9, seq)).unwrap();
        }
        go_rx.recv_timeout(HANG_GUARD).unwrap();
        drop(conn);
    });
    let counts: BTreeMap<u64, u64> = [(0, 200), (1, 200), (9, u64::MAX)].into();
    // Everything sent before the gates: the crasher's ten, half of each other client's.
    let mut seen_first = 0;
    let mut crashed_peer = None;
    while seen_first < 10 + 100 + 100 {
        let m = ep.recv_timeout(HANG_GUARD).unwrap().expect("message");
        let (k, seq) = parse(&m);
        if k == 9 {
            crashed_peer = Some(m.peer());
        }
        assert_eq!(&*m, &message(k, seq)[..]);
        seen_first += 1;
    }
    let crashed_peer = crashed_peer.expect("the crashing client's messages arrived");
    assert_eq!(ep.len(), 3);
    go_tx.send(()).unwrap();
    crasher.join().unwrap();
    // The failure is reported once, naming the peer; it is gone afterwards.
    match ep.recv_timeout(HANG_GUARD) {
        Err(EndpointError::PeerFailed { peer, source }) => {
            assert_eq!(peer.id, crashed_peer);
            assert!(matches!(source, TransportError::PeerClosed), "{source}");
        }
        other => panic!("expected the crash to be reported, got {other:?}"),
    }
    assert_eq!(ep.len(), 2);
    assert!(ep.peer(crashed_peer).is_none());
    assert!(matches!(
        ep.try_send(crashed_peer, b"x"),
        Err(EndpointError::UnknownPeer(_))
    ));
    for g in gate_senders {
        g.send(()).unwrap();
    }
    // The two others finish their second halves (messages 100..200).
    let mut next: BTreeMap<PeerId, u64> = BTreeMap::new();
    let mut done = 0;
    while done < 2 {
        let m = match ep.recv_timeout(HANG_GUARD) {
            Ok(m) => m.expect("message"),
            // A client closes once acknowledged; the other may still be sending.
            Err(EndpointError::PeerFailed { peer, source }) if next.get(&peer.id) == Some(&200) => {
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let (k, seq) = parse(&m);
        assert_ne!(k, 9);
        let n = next.entry(m.peer()).or_insert(100);
        assert_eq!(*n, seq);
        assert_eq!(&*m, &message(k, seq)[..]);
        *n += 1;
        let p = m.peer();
        drop(m);
        if *next.get(&p).unwrap() == counts[&k] {
            ep.send(p, b"done").unwrap();
            done += 1;
        }
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn endpoints_connect_by_name_through_the_manager_and_reply() {
    let token = Token::new("endpoint-peers-secret").unwrap();
    let manager = Manager::bind("127.0.0.1:0", token.clone()).unwrap();
    let config = Config::default().manager(manager.local_addr().to_string(), token);
    let name = unique("ep-mgr");
    let mut server = Endpoint::bind(config.clone(), &name).unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Endpoint::new(config.clone()).unwrap();
        let id = c.connect(&name).unwrap();
        let info = c.peer(id).unwrap().clone();
        assert_eq!(info.name, name);
        assert_eq!(info.transport, Transport::Shm, "same host: shared memory");
        assert!(!info.accepted);
        clients.push((c, id));
    }
    // Wait until the server has taken in all three.
    while server.len() < 3 {
        server.accept(HANG_GUARD).unwrap().expect("a peer joins");
    }
    for (i, (c, id)) in clients.iter().enumerate() {
        c.send(*id, format!("hello from {i}").as_bytes()).unwrap();
    }
    let mut who = BTreeMap::new();
    for _ in 0..3 {
        let m = server.recv_timeout(HANG_GUARD).unwrap().expect("message");
        let text = String::from_utf8(m.to_vec()).unwrap();
        m.reply(format!("{text}, seen as {}", m.peer()).as_bytes())
            .unwrap();
        assert!(who.insert(m.peer(), text).is_none(), "one message per peer");
    }
    for (i, (c, id)) in clients.iter_mut().enumerate() {
        let m = c.recv_timeout(HANG_GUARD).unwrap().expect("reply");
        assert_eq!(m.peer(), *id);
        let text = String::from_utf8(m.to_vec()).unwrap();
        assert!(
            text.starts_with(&format!("hello from {i}, seen as peer#")),
            "{text}"
        );
        let server_id: u64 = text.rsplit('#').next().unwrap().parse().unwrap();
        assert_eq!(
            who[&server.peers().find(|p| p.id.get() == server_id).unwrap().id],
            format!("hello from {i}")
        );
    }
}

#[test]
fn counters_follow_messages_partitions_and_back_pressure() {
    // A small receive layout so that back-pressure comes quickly.
    let layout = "64:4:1,1k:4:2".parse().unwrap();
    let name = unique("ep-stats");
    let listener = Listener::bind(&Config::default().layout(layout), &name).unwrap();
    let client = rsmsg::connect(&Config::default(), &name).unwrap();
    let server = listener
        .accept_timeout(HANG_GUARD)
        .unwrap()
        .expect("accepted");
    let before = client.counters();
    assert_eq!(before.messages_sent, 0);
    assert_eq!(before.credit_stalls, 0);

    client.send(&[1; 10]).unwrap();
    client.send(&[2; 500]).unwrap();
    let a = server.recv_timeout(HANG_GUARD).unwrap();
    let b = server.recv_timeout(HANG_GUARD).unwrap();
    let held = server.counters();
    assert_eq!(held.messages_received, 2);
    assert_eq!(held.bytes_received, 510);
    assert!(held.partitions_held >= 2, "{held:?}");
    let g0 = server.group_counters(0).unwrap();
    let g1 = server.group_counters(1).unwrap();
    assert_eq!((g0.messages_received, g0.bytes_received), (1, 10));
    assert_eq!((g1.messages_received, g1.bytes_received), (1, 500));
    assert!(g0.partitions_held >= 1 && g1.partitions_held >= 1);
    // Group 2 exists only in the client's (default) receive layout: nothing received there.
    let g2 = server.group_counters(2).unwrap();
    assert_eq!((g2.messages_received, g2.partitions_held), (0, 0));
    assert!(server.group_counters(1000).is_none());
    let sent = client.counters();
    assert_eq!((sent.messages_sent, sent.bytes_sent), (2, 510));
    assert!(sent.partitions_in_flight >= 2, "{sent:?}");
    drop(a);
    drop(b);
    assert_eq!(server.counters().partitions_held, 0);

    // Fill the small group without receiving: back-pressure, counted as stalls.
    let mut sent_ok = 0;
    let mut blocked = 0;
    for _ in 0..20 {
        match client.try_send(&[3; 20]) {
            Ok(()) => sent_ok += 1,
            Err(SendError::WouldBlock) => blocked += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        blocked > 0 && sent_ok > 0,
        "{sent_ok} sent, {blocked} blocked"
    );
    let c = client.counters();
    assert!(c.credit_stalls >= blocked, "{c:?}");
    for _ in 0..sent_ok {
        server.recv_timeout(HANG_GUARD).unwrap();
    }
    assert_eq!(server.counters().messages_received, 2 + sent_ok);
    // Filled in place, a message must fit a group (copied from a buffer it goes by rendezvous).
    let too_big = client.send_with(1 << 20, |_| ());
    assert!(
        matches!(too_big, Err(SendError::TooLarge { .. })),
        "{too_big:?}"
    );
    assert!(client.counters().rendezvous_needed >= 1);
}

#[test]
fn an_event_mode_endpoint_sleeps_on_descriptors_and_wakes_for_messages_and_peers() {
    let name = unique("ep-event");
    let config = Config::default().poll(rsmsg::transport::PollMode::Event);
    let mut ep = Endpoint::bind(config.clone(), &name).unwrap();
    // Nobody there yet: an idle wait sleeps in the kernel, woken only by the 50 ms liveness
    // checks (napping 1 ms at a time, as an earlier version did, would wake ~300 times).
    let before = wakeups();
    assert!(
        ep.recv_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    let woke = wakeups() - before;
    assert!(woke < 60, "{woke} wake-ups in an idle 300 ms wait");

    // Peers that connect while the endpoint sleeps wake it (the listener's descriptor), and
    // so do their messages (the connections' descriptors, armed before each sleep).
    let counts: BTreeMap<u64, u64> = [(0, 50), (1, 20), (2, 1)].into();
    let mut closers = Vec::new();
    let clients: Vec<_> = counts
        .iter()
        .map(|(&k, &n)| {
            let (tx, rx) = mpsc::channel();
            closers.push(tx);
            client(config.clone(), name.clone(), k, n, None, Some(rx))
        })
        .collect();
    let (ids, failures) = serve(&mut ep, &counts, |_| {});
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(ids.len(), 3);
    // Connected peers with nothing to say: an idle wait still sleeps on their descriptors.
    let before = wakeups();
    assert!(
        ep.recv_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    let woke = wakeups() - before;
    assert!(
        woke < 60,
        "{woke} wake-ups in an idle 300 ms wait with 3 peers"
    );
    for c in closers {
        c.send(()).unwrap();
    }
    for c in clients {
        c.join().unwrap();
    }
    // Their departures wake it too.
    let mut closed = 0;
    while closed < 3 {
        match ep.recv_timeout(HANG_GUARD) {
            Err(EndpointError::PeerFailed { source, .. }) => {
                assert!(matches!(source, TransportError::PeerClosed), "{source}");
                closed += 1;
            }
            other => panic!("expected the clients' close, got {other:?}"),
        }
    }
}

#[test]
fn a_listener_event_fd_turns_readable_when_a_connection_waits() {
    let name = unique("ep-listen-fd");
    let listener = Listener::bind(&Config::default(), &name).unwrap();
    let fd = [listener.event_fd()];
    assert!(!rsmsg::shm::wait_readable_any(&fd, Some(Duration::ZERO)).unwrap());
    let n = name.clone();
    let peer = thread::spawn(move || {
        let c = rsmsg::connect(&Config::default(), &n).unwrap();
        c.send(b"hi").unwrap();
        c
    });
    assert!(
        rsmsg::shm::wait_readable_any(&fd, Some(HANG_GUARD)).unwrap(),
        "no wake-up for a connection"
    );
    let conn = listener.try_accept().unwrap().expect("a connection waits");
    assert_eq!(&*conn.recv().unwrap(), b"hi");
    // Taking it reset the descriptor.
    assert!(listener.try_accept().unwrap().is_none());
    assert!(!rsmsg::shm::wait_readable_any(&fd, Some(Duration::ZERO)).unwrap());
    drop(peer.join().unwrap());
}

#[test]
fn an_endpoint_whose_listener_is_closed_goes_on_without_it() {
    let name = unique("closed-listener");
    let mut ep = Endpoint::bind(Config::default(), &name).unwrap();
    let c = rsmsg::connect(&Config::default(), &name).unwrap();
    c.send(b"before").unwrap();
    assert_eq!(
        &*ep.recv_timeout(HANG_GUARD).unwrap().expect("message"),
        b"before"
    );
    ep.listener().expect("bound with a listener").close();
    // The connection already made carries on; the closed listener is neither waited on nor
    // counted as a stream of failed set-ups.
    c.send(b"after").unwrap();
    assert_eq!(
        &*ep.recv_timeout(HANG_GUARD).unwrap().expect("message"),
        b"after"
    );
    assert!(
        ep.recv_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none()
    );
    assert!(ep.listener().is_none(), "the closed listener was let go");
    assert_eq!(ep.accept_failures(), 0);
    assert!(matches!(
        ep.accept(Duration::from_millis(50)),
        Err(EndpointError::Config { .. })
    ));
    // The name is free again.
    drop(Listener::bind(&Config::default(), &name).unwrap());
    drop(c);
}
