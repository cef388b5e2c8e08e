//! Register / lookup / connect flows between clients of an embedded manager.

use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{
    BootstrapError, Descriptors, EndpointInfo, EndpointName, ErrorCode, HostId, MailboxDescriptor,
    Manager, ManagerClient, ManagerHandle, QpInfo, SegmentDescriptor, Side, Token, TransportSet,
};

const T: Duration = Duration::from_secs(10);

fn token() -> Token {
    Token::new("test-token-0123456789").unwrap()
}

fn manager() -> ManagerHandle {
    Manager::bind("127.0.0.1:0", token()).unwrap()
}

fn client(m: &ManagerHandle) -> ManagerClient {
    ManagerClient::connect(m.local_addr(), &token(), T).unwrap()
}

fn name(s: &str) -> EndpointName {
    EndpointName::new(s).unwrap()
}

fn info(n: &str) -> EndpointInfo {
    EndpointInfo {
        name: name(n),
        host_id: HostId::new("node-7").unwrap(),
        transports: TransportSet::VERBS.union(TransportSet::SHM),
        shm_socket: Some(format!("/run/rsmsg/{n}.sock")),
    }
}

fn verbs_descriptors(qpn: u32, base: u64) -> Descriptors {
    let seg = |id: u8, group: u8, p: u32| SegmentDescriptor {
        segment_id: id,
        group,
        addr: base + u64::from(id) * 0x100_0000,
        len: u64::from(p) * 128,
        rkey: 0x100 + u32::from(id),
        partition_size: p,
        partition_count: 128,
        span_factor: 16,
    };
    Descriptors {
        qp: Some(QpInfo {
            qpn,
            psn: 0x12_3456,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            lid: 0,
            mtu: 4096,
            port: 1,
            gid_index: 1,
        }),
        mailbox: Some(MailboxDescriptor {
            addr: base + 0x8000_0000,
            rkey: 0x77,
            len: 256 * 8,
        }),
        segments: vec![seg(0, 0, 256), seg(1, 1, 4096), seg(2, 1, 4096)],
        opaque: Vec::new(),
    }
}

fn code(r: Result<impl std::fmt::Debug, BootstrapError>) -> (ErrorCode, String) {
    match r {
        Err(e @ BootstrapError::Remote { .. }) => (e.code().unwrap(), e.to_string()),
        other => panic!("expected a manager error, got {other:?}"),
    }
}

#[test]
fn register_lookup_connect_exchange() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("b")).unwrap();
    assert_eq!(m.endpoint_count(), 1);

    let mut a = client(&m);
    let found = a.lookup(&name("b")).unwrap();
    assert_eq!(found, info("b"));

    let offer = verbs_descriptors(0x11, 0x7f00_0000_0000);
    let id = a.connect_to(&info("a"), &name("b"), &offer).unwrap();

    let incoming = b.wait_connect(&name("b"), T).unwrap().expect("a request");
    assert_eq!(incoming.id, id);
    assert_eq!(incoming.from, info("a"));
    assert_eq!(incoming.offer, offer);

    let answer = verbs_descriptors(0x22, 0x5500_0000_0000);
    b.send(id, Side::Listener, &answer).unwrap();
    assert_eq!(a.recv(id, Side::Initiator, T).unwrap(), Some(answer));

    // A third round: the initiator says it is ready.
    let ready = Descriptors {
        opaque: b"ready".to_vec(),
        ..Descriptors::default()
    };
    a.send(id, Side::Initiator, &ready).unwrap();
    assert_eq!(b.recv(id, Side::Listener, T).unwrap(), Some(ready));

    // Nothing more is queued: a short wait ends empty.
    assert_eq!(
        b.recv(id, Side::Listener, Duration::from_millis(50))
            .unwrap(),
        None
    );

    a.close(id, Side::Initiator, "").unwrap();
    b.close(id, Side::Listener, "").unwrap();
    let (c, _) = code(a.recv(id, Side::Initiator, Duration::from_millis(10)));
    assert_eq!(c, ErrorCode::UnknownRendezvous);
    // The clients remain usable after error replies.
    a.ping().unwrap();
    b.ping().unwrap();
}

#[test]
fn dial_from_another_thread() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("listener")).unwrap();
    let addr = m.local_addr();
    let initiator = thread::spawn(move || {
        let mut a = ManagerClient::connect(addr, &token(), T).unwrap();
        a.dial(
            &info("dialer"),
            &name("listener"),
            &verbs_descriptors(0x33, 0x1000),
            T,
        )
        .unwrap()
    });
    let inc = b.wait_connect(&name("listener"), T).unwrap().unwrap();
    assert_eq!(inc.offer.qp.unwrap().qpn, 0x33);
    b.send(inc.id, Side::Listener, &verbs_descriptors(0x44, 0x2000))
        .unwrap();
    let (id, answer) = initiator.join().unwrap();
    assert_eq!(id, inc.id);
    assert_eq!(answer.qp.unwrap().qpn, 0x44);
}

#[test]
fn many_initiators_get_their_own_answers() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("hub")).unwrap();
    let addr = m.local_addr();
    let n = 8u32;
    let initiators: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let mut a = ManagerClient::connect(addr, &token(), T).unwrap();
                let offer = Descriptors {
                    opaque: i.to_le_bytes().to_vec(),
                    ..Descriptors::default()
                };
                let (_, answer) = a
                    .dial(&info(&format!("peer-{i}")), &name("hub"), &offer, T)
                    .unwrap();
                (i, answer.opaque)
            })
        })
        .collect();
    for _ in 0..n {
        let inc = b.wait_connect(&name("hub"), T).unwrap().unwrap();
        // Echo the initiator's own number and name back.
        let mut echo = inc.offer.opaque.clone();
        echo.extend_from_slice(inc.from.name.as_str().as_bytes());
        let reply = Descriptors {
            opaque: echo,
            ..Descriptors::default()
        };
        b.send(inc.id, Side::Listener, &reply).unwrap();
    }
    for t in initiators {
        let (i, got) = t.join().unwrap();
        let mut want = i.to_le_bytes().to_vec();
        want.extend_from_slice(format!("peer-{i}").as_bytes());
        assert_eq!(got, want);
    }
}

#[test]
fn unknown_names_and_ownership_errors_are_clear() {
    let m = manager();
    let mut a = client(&m);
    let (c, msg) = code(a.lookup(&name("nobody")));
    assert_eq!(c, ErrorCode::UnknownName);
    assert!(msg.contains("nobody"), "{msg}");
    let (c, _) = code(a.connect_to(&info("a"), &name("nobody"), &Descriptors::default()));
    assert_eq!(c, ErrorCode::UnknownName);

    a.register(&info("x")).unwrap();
    // Registering again from the same client updates the entry.
    let mut updated = info("x");
    updated.transports = TransportSet::VERBS;
    updated.shm_socket = None;
    a.register(&updated).unwrap();
    assert_eq!(a.lookup(&name("x")).unwrap(), updated);

    let mut other = client(&m);
    let (c, msg) = code(other.register(&info("x")));
    assert_eq!(c, ErrorCode::NameTaken);
    assert!(msg.contains('x'));
    let (c, _) = code(other.wait_connect(&name("x"), Duration::from_millis(10)));
    assert_eq!(c, ErrorCode::NotRegistered);
    let (c, _) = code(other.unregister(&name("x")));
    assert_eq!(c, ErrorCode::NotRegistered);

    a.unregister(&name("x")).unwrap();
    other.register(&info("x")).unwrap();
    let (c, _) = code(a.lookup(&name("y")));
    assert_eq!(c, ErrorCode::UnknownName);
}

#[test]
fn rejection_reaches_the_initiator() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("b")).unwrap();
    let mut a = client(&m);
    let id = a
        .connect_to(&info("a"), &name("b"), &Descriptors::default())
        .unwrap();
    let inc = b.wait_connect(&name("b"), T).unwrap().unwrap();
    b.close(inc.id, Side::Listener, "out of registered memory")
        .unwrap();
    let (c, msg) = code(a.recv(id, Side::Initiator, T));
    assert_eq!(c, ErrorCode::Closed);
    assert!(msg.contains("out of registered memory"), "{msg}");
    let (c, _) = code(a.send(id, Side::Initiator, &Descriptors::default()));
    assert_eq!(c, ErrorCode::Closed);
}

#[test]
fn registration_dies_with_its_client() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("b")).unwrap();
    let mut a = client(&m);
    let id = a
        .connect_to(&info("a"), &name("b"), &Descriptors::default())
        .unwrap();
    drop(b);
    // The initiator waiting for an answer learns that the listener is gone.
    let (c, msg) = code(a.recv(id, Side::Initiator, T));
    assert_eq!(c, ErrorCode::Closed);
    assert!(msg.contains("gone"), "{msg}");
    let (c, _) = code(a.lookup(&name("b")));
    assert_eq!(c, ErrorCode::UnknownName);
    // The name is free again.
    let mut b2 = client(&m);
    b2.register(&info("b")).unwrap();
}

#[test]
fn unanswered_dial_times_out_and_closes() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("b")).unwrap();
    let mut a = client(&m);
    let r = a.dial(
        &info("a"),
        &name("b"),
        &Descriptors::default(),
        Duration::from_millis(100),
    );
    let Err(BootstrapError::NoAnswer { id, peer }) = r else {
        panic!("expected NoAnswer, got {r:?}");
    };
    assert_eq!(peer, "b");
    // The abandoned request is not handed to the listener.
    assert_eq!(
        b.wait_connect(&name("b"), Duration::from_millis(50))
            .unwrap()
            .map(|i| i.id),
        None,
        "closed rendezvous {id} was delivered"
    );
    a.ping().unwrap();
}

#[test]
fn manager_restart_serves_new_registrations() {
    let m = manager();
    let addr = m.local_addr();
    let mut b = client(&m);
    b.register(&info("b")).unwrap();
    let mut a = client(&m);
    a.lookup(&name("b")).unwrap();

    m.shutdown();
    // Existing clients get a clear error, not a hang.
    let e = a.lookup(&name("b")).unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    let e = b.wait_connect(&name("b"), T).unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    // New clients fail to connect while no manager runs.
    let e = ManagerClient::connect(addr, &token(), Duration::from_secs(2)).unwrap_err();
    assert!(matches!(e, BootstrapError::Connect { .. }), "{e:?}");

    // A new manager on the same address serves new registrations.
    let m2 = Manager::bind(addr, token()).unwrap();
    assert_eq!(m2.local_addr(), addr);
    let mut b = ManagerClient::connect(addr, &token(), T).unwrap();
    b.register(&info("b")).unwrap();
    let mut a = ManagerClient::connect(addr, &token(), T).unwrap();
    assert_eq!(a.lookup(&name("b")).unwrap(), info("b"));
}

#[test]
fn long_poll_wakes_on_request() {
    let m = manager();
    let mut b = client(&m);
    b.register(&info("b")).unwrap();
    let addr = m.local_addr();
    let waiter = thread::spawn(move || {
        // A wait longer than one long poll is split by the client.
        b.wait_connect(&name("b"), Duration::from_secs(120))
            .unwrap()
            .map(|i| i.from.name)
    });
    thread::sleep(Duration::from_millis(100));
    let mut a = ManagerClient::connect(addr, &token(), T).unwrap();
    a.connect_to(&info("a"), &name("b"), &Descriptors::default())
        .unwrap();
    assert_eq!(waiter.join().unwrap(), Some(name("a")));
}

#[test]
fn registration_survives_a_manager_restart() {
    use rsmsg::bootstrap::Registration;
    let m = manager();
    let addr = m.local_addr();
    let mut reg = Registration::new(addr, token(), info("durable"), T).unwrap();
    assert!(reg.is_connected());

    m.shutdown();
    let e = reg.accept(Duration::from_millis(50)).unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    assert!(!reg.is_connected());
    // While no manager runs, new connection requests fail clearly.
    let e = ManagerClient::connect(addr, &token(), Duration::from_secs(2)).unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    let e = reg.accept(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, BootstrapError::Connect { .. }), "{e:?}");

    // The manager comes back: the listener registers again on its next call...
    let _m2 = Manager::bind(addr, token()).unwrap();
    assert_eq!(reg.accept(Duration::from_millis(50)).unwrap(), None);
    assert!(reg.is_connected());
    // ...and new connections succeed.
    let mut a = ManagerClient::connect(addr, &token(), T).unwrap();
    let id = a
        .connect_to(&info("a"), &name("durable"), &Descriptors::default())
        .unwrap();
    let inc = reg.accept(T).unwrap().unwrap();
    assert_eq!(inc.id, id);
    reg.with_client(|c| c.send(inc.id, Side::Listener, &Descriptors::default()))
        .unwrap();
    assert_eq!(
        a.recv(id, Side::Initiator, T).unwrap(),
        Some(Descriptors::default())
    );
}

#[test]
fn a_dropped_registration_is_unknown_at_once() {
    use rsmsg::bootstrap::Registration;
    let m = manager();
    let mut look = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    // Closing the connection alone frees the name only once the manager notices, which a lookup
    // right after the drop can beat: the drop unregisters, so none ever finds it.
    for i in 0..50 {
        let n = format!("short-lived-{i}");
        let reg = Registration::new(m.local_addr(), token(), info(&n), T).unwrap();
        assert_eq!(look.lookup(&name(&n)).unwrap(), info(&n));
        drop(reg);
        let e = look.lookup(&name(&n)).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnknownName), "round {i}: {e:?}");
    }
}
