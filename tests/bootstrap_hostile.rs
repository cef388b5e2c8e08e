//! Hostile and broken clients: wrong tokens, wrong versions, malformed, oversized and random
//! frames, slow and idle clients, too many clients, and a manager that cannot prove itself.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use rsmsg::bootstrap::wire::{self, FrameHeader, HEADER_LEN, MAX_PAYLOAD, Message};
use rsmsg::bootstrap::{
    BootstrapError, DecodeError, EndpointInfo, EndpointName, ErrorCode, HostId, Limits, Manager,
    ManagerClient, ManagerHandle, Token, TransportSet,
};

const T: Duration = Duration::from_secs(10);

fn token() -> Token {
    Token::new("hostile-test-token").unwrap()
}

fn info(n: &str) -> EndpointInfo {
    EndpointInfo {
        name: EndpointName::new(n).unwrap(),
        host_id: HostId::new("h").unwrap(),
        transports: TransportSet::VERBS,
        shm_socket: None,
    }
}

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// Reads one reply frame; `None` when the manager closed the connection.
fn read_reply(s: &mut TcpStream) -> Option<Message> {
    let mut head = [0u8; HEADER_LEN];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return None;
        }
        Err(e) => panic!("no reply and no close: {e}"),
    }
    let h = FrameHeader::decode(&head).expect("the manager sends valid headers");
    let mut payload = vec![0u8; h.len];
    s.read_exact(&mut payload).expect("complete payload");
    Some(Message::decode_payload(h.kind, &payload).expect("the manager sends valid frames"))
}

/// Whether the manager closes the connection (EOF or reset) within the read timeout, draining
/// any replies, each of which must be a valid frame.
fn closed_by_manager(s: &mut TcpStream) -> bool {
    loop {
        let mut head = [0u8; HEADER_LEN];
        match s.read_exact(&mut head) {
            Ok(()) => {
                let h = FrameHeader::decode(&head).expect("valid header from the manager");
                let mut payload = vec![0u8; h.len];
                s.read_exact(&mut payload).expect("complete payload");
                Message::decode_payload(h.kind, &payload).expect("valid frame from the manager");
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("unexpected read error {e}"),
        }
    }
}

fn send(s: &mut TcpStream, m: &Message) {
    s.write_all(&m.encode().unwrap()).unwrap();
}

fn authenticate(s: &mut TcpStream, token: &Token) {
    let cn = [7u8; 32];
    send(s, &Message::Hello { nonce: cn });
    let Some(Message::Challenge { nonce: sn }) = read_reply(s) else {
        panic!("no challenge");
    };
    send(
        s,
        &Message::Auth {
            mac: token.client_proof(&cn, &sn),
        },
    );
    let Some(Message::AuthOk { mac }) = read_reply(s) else {
        panic!("no auth-ok");
    };
    assert!(token.verify_server(&cn, &sn, &mac));
}

fn error_code(m: Option<Message>) -> ErrorCode {
    match m {
        Some(Message::Error { code, .. }) => code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn shared_manager() -> &'static ManagerHandle {
    static M: OnceLock<ManagerHandle> = OnceLock::new();
    M.get_or_init(|| Manager::bind("127.0.0.1:0", token()).unwrap())
}

#[test]
fn wrong_token_is_rejected() {
    let m = Manager::bind("127.0.0.1:0", token()).unwrap();
    let bad = Token::new("not-the-right-token").unwrap();
    let e = ManagerClient::connect(m.local_addr(), &bad, T).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e:?}");
    // Raw: a wrong proof gets an error and the connection is closed.
    let mut s = raw(m.local_addr());
    send(&mut s, &Message::Hello { nonce: [1; 32] });
    assert!(matches!(
        read_reply(&mut s),
        Some(Message::Challenge { .. })
    ));
    send(&mut s, &Message::Auth { mac: [0; 32] });
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::AuthFailed);
    assert!(closed_by_manager(&mut s));
    // The right token still works.
    ManagerClient::connect(m.local_addr(), &token(), T)
        .unwrap()
        .ping()
        .unwrap();
}

#[test]
fn requests_before_authentication_are_refused() {
    let m = Manager::bind("127.0.0.1:0", token()).unwrap();
    let mut s = raw(m.local_addr());
    send(
        &mut s,
        &Message::Lookup {
            name: EndpointName::new("x").unwrap(),
        },
    );
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::NotAuthenticated);
    assert!(closed_by_manager(&mut s));
    // A proof sent before any hello is refused too.
    let mut s = raw(m.local_addr());
    send(&mut s, &Message::Auth { mac: [0; 32] });
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::NotAuthenticated);
}

#[test]
fn wrong_version_is_rejected() {
    let m = Manager::bind("127.0.0.1:0", token()).unwrap();
    let mut s = raw(m.local_addr());
    let mut f = Message::Hello { nonce: [1; 32] }.encode().unwrap();
    f[4] = wire::VERSION + 1;
    s.write_all(&f).unwrap();
    match read_reply(&mut s) {
        Some(Message::Error { code, message }) => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("version"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(closed_by_manager(&mut s));
}

#[test]
fn oversized_and_truncated_frames_close_only_their_connection() {
    let m = Manager::bind("127.0.0.1:0", token()).unwrap();
    let mut good = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    good.register(&info("steady")).unwrap();

    // Oversized header before authentication: refused without reading the payload.
    let mut s = raw(m.local_addr());
    let mut f = Message::Ping.encode().unwrap();
    f[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    s.write_all(&f).unwrap();
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::Malformed);
    assert!(closed_by_manager(&mut s));

    // Oversized after authentication.
    let mut s = raw(m.local_addr());
    authenticate(&mut s, &token());
    let mut f = Message::Ping.encode().unwrap();
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&f).unwrap();
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::Malformed);
    assert!(closed_by_manager(&mut s));

    // Truncated: half a frame, then the client half-closes.
    let mut s = raw(m.local_addr());
    authenticate(&mut s, &token());
    let f = Message::Register { info: info("half") }.encode().unwrap();
    s.write_all(&f[..f.len() / 2]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(closed_by_manager(&mut s));

    // A payload that lies about its contents (a name with a space).
    let mut s = raw(m.local_addr());
    authenticate(&mut s, &token());
    let mut f = Message::Lookup {
        name: EndpointName::new("ab").unwrap(),
    }
    .encode()
    .unwrap();
    let n = f.len();
    f[n - 1] = b' ';
    s.write_all(&f).unwrap();
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::Malformed);
    assert!(closed_by_manager(&mut s));

    // A reply kind sent as a request.
    let mut s = raw(m.local_addr());
    authenticate(&mut s, &token());
    send(&mut s, &Message::Pong);
    assert_eq!(error_code(read_reply(&mut s)), ErrorCode::Malformed);

    // None of this disturbed the well-behaved client or its registration.
    let mut other = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    assert_eq!(
        other.lookup(&EndpointName::new("steady").unwrap()).unwrap(),
        info("steady")
    );
    good.ping().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random bytes before authentication: the manager answers with valid frames or nothing,
    /// closes the connection, and keeps serving others.
    #[test]
    fn random_bytes_before_auth(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let m = shared_manager();
        let mut s = raw(m.local_addr());
        // The manager may close before everything is written: that is a valid outcome.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        prop_assert!(closed_by_manager(&mut s));
        let mut c = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
        c.ping().unwrap();
    }

    /// Random bytes after authentication, behind a valid frame header or not.
    #[test]
    fn random_bytes_after_auth(
        kind in any::<u8>(),
        with_header in any::<bool>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let m = shared_manager();
        let mut s = raw(m.local_addr());
        authenticate(&mut s, &token());
        if with_header {
            let mut f = Vec::from(wire::MAGIC);
            f.extend_from_slice(&[wire::VERSION, kind, 0, 0]);
            f.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            let _ = s.write_all(&f);
        }
        // The manager may close before everything is written: that is a valid outcome.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        prop_assert!(closed_by_manager(&mut s));
        let mut c = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
        c.ping().unwrap();
    }
}

fn quick_limits() -> Limits {
    let mut l = Limits::default();
    l.handshake_timeout = Duration::from_millis(500);
    l.frame_timeout = Duration::from_millis(300);
    l.idle_timeout = Duration::from_millis(800);
    l
}

#[test]
fn slow_loris_is_dropped_while_others_are_served() {
    // Only the frame limit is under test: client `d` below sits idle while the loris is cut
    // off, and must not be dropped for that on a slow machine.
    let mut l = quick_limits();
    l.handshake_timeout = Duration::from_secs(5);
    l.idle_timeout = Duration::from_secs(60);
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let addr = m.local_addr();
    // The loris authenticates, then trickles a frame one byte every 100 ms: each byte arrives
    // well within any per-read timeout, but the frame would take seconds.
    let loris = thread::spawn(move || {
        let mut s = raw(addr);
        authenticate(&mut s, &token());
        let f = Message::Register {
            info: info("loris"),
        }
        .encode()
        .unwrap();
        s.set_nonblocking(true).unwrap();
        for (sent, b) in f.iter().enumerate() {
            if s.write_all(&[*b]).is_err() {
                return Some(sent);
            }
            thread::sleep(Duration::from_millis(100));
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => return Some(sent + 1),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Ok(_) | Err(_) => return Some(sent + 1),
            }
        }
        None
    });
    // Meanwhile another client is served normally.
    let mut c = ManagerClient::connect(addr, &token(), T).unwrap();
    c.register(&info("honest")).unwrap();
    let mut d = ManagerClient::connect(addr, &token(), T).unwrap();
    assert_eq!(
        d.lookup(&EndpointName::new("honest").unwrap()).unwrap(),
        info("honest")
    );
    let frame_len = Message::Register {
        info: info("loris"),
    }
    .encode()
    .unwrap()
    .len();
    let cut_at = loris.join().unwrap();
    assert!(
        matches!(cut_at, Some(n) if n < frame_len),
        "the trickling client was not dropped: {cut_at:?} of {frame_len}"
    );
    let e = d.lookup(&EndpointName::new("loris").unwrap()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownName));
}

#[test]
fn silent_and_idle_clients_are_dropped() {
    let m = Manager::bind_with("127.0.0.1:0", token(), quick_limits()).unwrap();
    // Connects and never says hello.
    let mut s = raw(m.local_addr());
    assert!(closed_by_manager(&mut s));
    // Authenticates, then stays silent longer than the idle timeout.
    let mut c = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    c.register(&info("sleepy")).unwrap();
    // Wait (boundedly) until the manager has dropped both silent clients.
    for _ in 0..400 {
        if m.client_count() == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(m.client_count(), 0, "idle clients were not dropped");
    let e = c.ping().unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    // Its registration went with it.
    let mut d = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let e = d.lookup(&EndpointName::new("sleepy").unwrap()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownName));
    // A broken client refuses further use instead of guessing.
    assert!(matches!(c.ping(), Err(BootstrapError::Broken)));
}

#[test]
fn client_limit_answers_busy() {
    let mut l = Limits::default();
    l.max_clients = 2;
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let a = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let mut b = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let e = ManagerClient::connect(m.local_addr(), &token(), T).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e:?}");
    assert!(e.is_unreachable());
    b.ping().unwrap();
    drop(a);
    // Once the manager notices the departure a new client is admitted.
    let mut admitted = None;
    for _ in 0..200 {
        match ManagerClient::connect(m.local_addr(), &token(), T) {
            Ok(c) => {
                admitted = Some(c);
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::Busy) => thread::sleep(Duration::from_millis(25)),
            Err(e) => panic!("{e:?}"),
        }
    }
    admitted.expect("a slot frees up").ping().unwrap();
}

/// A fake manager that answers the handshake without knowing the token.
#[test]
fn impostor_manager_is_detected() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = vec![0u8; HEADER_LEN + 32];
        s.read_exact(&mut buf).unwrap();
        send(&mut s, &Message::Challenge { nonce: [9; 32] });
        s.read_exact(&mut buf).unwrap();
        send(&mut s, &Message::AuthOk { mac: [0x55; 32] });
        let _ = s.read(&mut buf);
    });
    let e = ManagerClient::connect(addr, &token(), T).unwrap_err();
    assert!(matches!(e, BootstrapError::ManagerNotAuthentic), "{e:?}");
    fake.join().unwrap();
}

/// A manager of another version: the client reports the mismatch.
#[test]
fn client_reports_version_mismatch() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = vec![0u8; HEADER_LEN + 32];
        s.read_exact(&mut buf).unwrap();
        let mut f = Message::Challenge { nonce: [9; 32] }.encode().unwrap();
        f[4] = 9;
        s.write_all(&f).unwrap();
        let _ = s.read(&mut buf);
    });
    let e = ManagerClient::connect(addr, &token(), T).unwrap_err();
    assert!(
        matches!(
            e,
            BootstrapError::Protocol {
                source: DecodeError::UnsupportedVersion { got: 9 },
                ..
            }
        ),
        "{e:?}"
    );
    fake.join().unwrap();
}

#[test]
fn resource_limits_give_clear_errors() {
    use rsmsg::bootstrap::{Descriptors, Side};
    let mut l = Limits::default();
    l.max_endpoints = 3;
    l.max_names_per_client = 2;
    l.max_pending_per_endpoint = 2;
    l.max_queued_per_side = 2;
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let mut a = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    a.register(&info("a1")).unwrap();
    a.register(&info("a2")).unwrap();
    let e = a.register(&info("a3")).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    let mut b = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    b.register(&info("b1")).unwrap();
    let e = b.register(&info("b2")).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    assert!(e.to_string().contains("endpoints"), "{e}");

    // Pending requests per listener.
    let mut c = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let to = EndpointName::new("a1").unwrap();
    let d = Descriptors::default();
    let id = c.connect_to(&info("c"), &to, &d).unwrap();
    c.connect_to(&info("c"), &to, &d).unwrap();
    let e = c.connect_to(&info("c"), &to, &d).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");

    // The listener may not read a rendezvous it has not taken yet.
    let e = a.recv(id, Side::Listener, Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");

    // Messages queued unread for one side.
    c.send(id, Side::Initiator, &d).unwrap();
    let e = c.send(id, Side::Initiator, &d).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    // Taking the request frees room in the queue (the offer was one of the two).
    let inc = a.wait_connect(&to, T).unwrap().unwrap();
    assert_eq!(inc.id, id);
    c.send(id, Side::Initiator, &d).unwrap();
    assert_eq!(a.recv(id, Side::Listener, T).unwrap(), Some(d.clone()));
    assert_eq!(a.recv(id, Side::Listener, T).unwrap(), Some(d));
}

#[test]
fn idle_rendezvous_expire() {
    use rsmsg::bootstrap::{Descriptors, Side};
    let mut l = Limits::default();
    // The reaper runs once a second: a time to live of 1 s keeps a stall of the test thread
    // (or of the initiator between its request and its wait) from being taken for idleness.
    l.rendezvous_ttl = Duration::from_secs(1);
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let mut b = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    b.register(&info("b")).unwrap();
    let mut a = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let id = a
        .connect_to(
            &info("a"),
            &EndpointName::new("b").unwrap(),
            &Descriptors::default(),
        )
        .unwrap();
    assert_eq!(m.rendezvous_count(), 1);
    // Nobody takes the request and nobody waits on it: the manager discards it.
    for _ in 0..200 {
        if m.rendezvous_count() == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(m.rendezvous_count(), 0);
    let e = a.recv(id, Side::Initiator, Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownRendezvous), "{e}");
    // The expired request is not delivered to the listener.
    assert_eq!(
        b.wait_connect(&EndpointName::new("b").unwrap(), Duration::ZERO)
            .unwrap(),
        None
    );
}

#[test]
fn a_waiting_initiator_keeps_its_rendezvous_alive() {
    use rsmsg::bootstrap::{Descriptors, Side};
    let mut l = Limits::default();
    // The reaper runs once a second: a time to live of 1 s keeps a stall of the test thread
    // (or of the initiator between its request and its wait) from being taken for idleness.
    l.rendezvous_ttl = Duration::from_secs(1);
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let mut b = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let name = EndpointName::new("b").unwrap();
    b.register(&info("b")).unwrap();
    let addr = m.local_addr();
    let initiator = thread::spawn(move || {
        let mut a = ManagerClient::connect(addr, &token(), T).unwrap();
        // Waits far longer than the time to live; its waiting keeps the request alive.
        a.dial(
            &info("a"),
            &EndpointName::new("b").unwrap(),
            &Descriptors::default(),
            T,
        )
        .map(|(_, d)| d.opaque)
    });
    // Let several reaper passes run while the initiator waits.
    thread::sleep(Duration::from_millis(3500));
    let inc = b
        .wait_connect(&name, T)
        .unwrap()
        .expect("the request survived");
    let answer = Descriptors {
        opaque: vec![42],
        ..Descriptors::default()
    };
    b.send(inc.id, Side::Listener, &answer).unwrap();
    assert_eq!(initiator.join().unwrap().unwrap(), vec![42]);
}

#[test]
fn unauthenticated_connections_are_capped_and_expire() {
    let mut l = quick_limits();
    l.max_unauthenticated = 2;
    // Long enough that the silent connections are still there while the cap is checked below
    // on a loaded machine; the re-admission loop waits well past it.
    l.handshake_timeout = Duration::from_secs(3);
    l.idle_timeout = Duration::from_secs(60);
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let addr = m.local_addr();
    // An authenticated client, admitted before the flood.
    let mut honest = ManagerClient::connect(addr, &token(), T).unwrap();
    honest.register(&info("steady")).unwrap();
    // Two connections that never say hello fill the unauthenticated slots...
    let silent: Vec<TcpStream> = (0..2).map(|_| raw(addr)).collect();
    // ...(once the manager has admitted them)...
    for _ in 0..400 {
        if m.client_count() == 3 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(m.client_count(), 3);
    // ...so a third is answered Busy at once, and the authenticated client is unaffected.
    let e = ManagerClient::connect(addr, &token(), T).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e:?}");
    honest.ping().unwrap();
    // The silent ones are dropped at the handshake deadline; then clients are admitted again.
    let mut silent = silent;
    for s in &mut silent {
        assert!(closed_by_manager(s));
    }
    let mut admitted = None;
    for _ in 0..400 {
        match ManagerClient::connect(addr, &token(), T) {
            Ok(c) => {
                admitted = Some(c);
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::Busy) => thread::sleep(Duration::from_millis(25)),
            Err(e) => panic!("{e:?}"),
        }
    }
    let mut c = admitted.expect("a slot frees up");
    assert_eq!(
        c.lookup(&EndpointName::new("steady").unwrap()).unwrap(),
        info("steady")
    );
}

#[test]
fn rendezvous_sides_answer_only_their_own_connections() {
    use rsmsg::bootstrap::{Descriptors, RendezvousId, Side};
    let frame = |b: u8| Descriptors {
        opaque: vec![b],
        ..Descriptors::default()
    };
    let m = Manager::bind_with("127.0.0.1:0", token(), Limits::default()).unwrap();
    let name = EndpointName::new("b").unwrap();
    let mut b = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    b.register(&info("b")).unwrap();
    let mut a = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    let id = a.connect_to(&info("a"), &name, &frame(1)).unwrap();
    // Another token holder that knows (or guesses) the id.
    let mut x = ManagerClient::connect(m.local_addr(), &token(), T).unwrap();
    x.register(&info("x")).unwrap();
    let unknown = |r: Result<(), BootstrapError>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Some(ErrorCode::UnknownRendezvous), "{what}: {e}");
        e
    };
    let sides = [Side::Initiator, Side::Listener];

    // Before the listener took the request: the offer waits for the listener side; nobody else
    // reads it, and nobody else writes to the initiator in the listener's name.
    for side in sides {
        unknown(
            x.recv(id, side, Duration::ZERO).map(drop),
            "recv before accept",
        );
    }
    unknown(
        a.recv(id, Side::Listener, Duration::ZERO).map(drop),
        "initiator reads its offer",
    );
    unknown(x.send(id, Side::Listener, &frame(66)), "send before accept");

    let inc = b.wait_connect(&name, T).unwrap().expect("the request");
    assert_eq!(inc.id, id);
    assert_eq!(inc.offer, frame(1), "the offer reaches the listener intact");

    // A frame waits for each side, so that any wrong reader would take it.
    a.send(id, Side::Initiator, &frame(2)).unwrap();
    b.send(id, Side::Listener, &frame(3)).unwrap();
    for side in sides {
        unknown(x.recv(id, side, Duration::ZERO).map(drop), "recv");
        unknown(x.send(id, side, &frame(66)), "send");
        unknown(x.close(id, side, "hijacked"), "close");
    }
    // Nor may one side act as the other.
    unknown(
        a.recv(id, Side::Listener, Duration::ZERO).map(drop),
        "a as listener",
    );
    unknown(
        a.close(id, Side::Listener, "hijacked"),
        "a closes the listener",
    );
    unknown(
        b.recv(id, Side::Initiator, Duration::ZERO).map(drop),
        "b as initiator",
    );
    unknown(b.send(id, Side::Initiator, &frame(66)), "b as initiator");
    // The refusal reads exactly as for an id that does not exist.
    let other = RendezvousId(id.0 + 1000);
    let live = unknown(x.recv(id, Side::Listener, Duration::ZERO).map(drop), "live");
    let absent = unknown(
        x.recv(other, Side::Listener, Duration::ZERO).map(drop),
        "absent",
    );
    assert_eq!(
        live.to_string().replace(&id.to_string(), "#"),
        absent.to_string().replace(&other.to_string(), "#")
    );

    // The pair still exchanges its frames intact in both directions, with nothing taken away
    // or added.
    assert_eq!(b.recv(id, Side::Listener, T).unwrap(), Some(frame(2)));
    assert_eq!(a.recv(id, Side::Initiator, T).unwrap(), Some(frame(3)));
    let short = Duration::from_millis(50);
    assert_eq!(b.recv(id, Side::Listener, short).unwrap(), None);
    assert_eq!(a.recv(id, Side::Initiator, short).unwrap(), None);
    b.send(id, Side::Listener, &frame(4)).unwrap();
    assert_eq!(a.recv(id, Side::Initiator, T).unwrap(), Some(frame(4)));
    a.send(id, Side::Initiator, &frame(5)).unwrap();
    assert_eq!(b.recv(id, Side::Listener, T).unwrap(), Some(frame(5)));
    a.close(id, Side::Initiator, "done").unwrap();
    b.close(id, Side::Listener, "done").unwrap();
    assert_eq!(m.rendezvous_count(), 0);
}

/// Descriptors as large as a frame allows: 256 segments and a 4 KiB opaque blob.
fn bulky(tag: u8) -> rsmsg::bootstrap::Descriptors {
    use rsmsg::bootstrap::{Descriptors, SegmentDescriptor};
    let segments = (0..=255u8)
        .map(|i| SegmentDescriptor {
            segment_id: i,
            group: 0,
            addr: u64::from(i) << 20,
            len: 64,
            rkey: 1,
            partition_size: 64,
            partition_count: 1,
            span_factor: 1,
        })
        .collect();
    Descriptors {
        segments,
        opaque: vec![tag; 4096],
        ..Descriptors::default()
    }
}

/// The text of a `LimitExceeded` refusal.
fn limited<T: std::fmt::Debug>(r: Result<T, BootstrapError>, what: &str) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{what}: {e}");
    e.to_string()
}

fn eventually(mut what: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if what() {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    false
}

#[test]
fn queued_descriptor_bytes_are_capped_per_client_and_in_all() {
    use rsmsg::bootstrap::{Side, queued_footprint};
    let unit = queued_footprint(&bulky(0));
    let mut l = Limits::default();
    l.max_queued_bytes = 1 << 20;
    l.max_queued_bytes_per_client = 256 << 10;
    let share = l.max_queued_bytes_per_client / unit;
    let m = Manager::bind_with("127.0.0.1:0", token(), l).unwrap();
    let addr = m.local_addr();
    let client = || ManagerClient::connect(addr, &token(), T).unwrap();
    let names: Vec<EndpointName> = (0..4)
        .map(|i| EndpointName::new(format!("l{i}")).unwrap())
        .collect();
    let mut lis = client();
    for n in &names {
        lis.register(&info(n.as_str())).unwrap();
    }

    // One client fills its share with connection requests, then with sent messages...
    let mut a = client();
    let mut queued = 0;
    while queued < share / 2 {
        a.connect_to(&info("a"), &names[0], &bulky(1)).unwrap();
        queued += 1;
    }
    let small = rsmsg::bootstrap::Descriptors::default();
    let id = a.connect_to(&info("a"), &names[1], &small).unwrap();
    let inc = lis.wait_connect(&names[1], T).unwrap().unwrap();
    assert_eq!(inc.id, id);
    while queued < share {
        a.send(id, Side::Initiator, &bulky(2)).unwrap();
        queued += 1;
    }
    assert_eq!(m.queued_bytes(), share * unit);
    // ...and the next either way is refused, with nothing queued; the connection stays usable.
    let why = limited(
        a.connect_to(&info("a"), &names[0], &bulky(1)),
        "offer over share",
    );
    assert!(why.contains("this client"), "{why}");
    limited(a.send(id, Side::Initiator, &bulky(2)), "send over share");
    assert_eq!(m.queued_bytes(), share * unit);
    assert_eq!(m.rendezvous_count(), share / 2 + 1);
    a.ping().unwrap();

    // Another client still queues: the share is per client.
    let mut b = client();
    b.connect_to(&info("b"), &names[2], &bulky(3)).unwrap();
    assert_eq!(m.queued_bytes(), (share + 1) * unit);

    // Clients, each within its share, fill the manager's budget; then nobody queues more.
    let mut others = Vec::new();
    let global = loop {
        let mut c = client();
        let refused = loop {
            match c.connect_to(&info("c"), &names[3], &bulky(4)) {
                Ok(_) => assert!(m.queued_bytes() <= 1 << 20),
                Err(e) => break e,
            }
        };
        assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
        others.push(c);
        if refused.to_string().contains("the manager holds") {
            break refused;
        }
        assert!(
            others.len() < 8,
            "the global limit never applied: {refused}"
        );
    };
    assert!(m.queued_bytes() + unit > 1 << 20, "{global}");
    let why = limited(
        client().connect_to(&info("d"), &names[2], &bulky(5)),
        "a fresh client over the global limit",
    );
    assert!(why.contains("the manager holds"), "{why}");
    limited(b.connect_to(&info("b"), &names[2], &bulky(3)), "b");

    // Delivering releases: the listener takes the requests for l0...
    let before = m.queued_bytes();
    let mut taken = Vec::new();
    while let Some(inc) = lis.wait_connect(&names[0], Duration::ZERO).unwrap() {
        assert_eq!(inc.offer, bulky(1));
        taken.push(inc.id);
    }
    assert_eq!(taken.len(), share / 2);
    assert_eq!(m.queued_bytes(), before - share / 2 * unit);
    // ...and reads the messages sent on the accepted rendezvous.
    for _ in share / 2..share {
        assert_eq!(lis.recv(id, Side::Listener, T).unwrap(), Some(bulky(2)));
    }
    assert_eq!(m.queued_bytes(), before - share * unit);
    a.send(id, Side::Initiator, &bulky(2)).unwrap();
    // Closing both sides discards what still waits.
    a.close(id, Side::Initiator, "done").unwrap();
    lis.close(id, Side::Listener, "done").unwrap();
    assert_eq!(m.queued_bytes(), before - share * unit);
    // Leaving discards what waits for a departed client and the requests nobody took yet.
    lis.send(taken[0], Side::Listener, &bulky(6)).unwrap();
    drop(a);
    assert!(eventually(|| m.queued_bytes() == before - share * unit));
    drop(others);
    assert!(
        eventually(|| m.queued_bytes() == unit),
        "{}",
        m.queued_bytes()
    );
    // A departed listener's requests go with it.
    drop(lis);
    assert!(eventually(|| m.queued_bytes() == 0), "{}", m.queued_bytes());
    assert!(eventually(|| m.rendezvous_count() == 1));
    // b's request, its listener gone, remains until b closes it; the budget is whole again.
    let mut lis = client();
    lis.register(&info("l0")).unwrap();
    for _ in 0..share {
        b.connect_to(&info("b"), &names[0], &bulky(7)).unwrap();
    }
    assert_eq!(m.queued_bytes(), share * unit);
    drop(b);
    assert!(eventually(|| m.queued_bytes() == 0), "{}", m.queued_bytes());
    assert!(eventually(|| m.rendezvous_count() == 0));
}
