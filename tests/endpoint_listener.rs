//! Listener lifecycle over shared memory: timeouts, a peer that fails its handshake, the name
//! freed on drop; an endpoint with nobody to receive from.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use rsmsg::Endpoint;
use rsmsg::endpoint::{Config, EndpointError, Listener, Transport};
use rsmsg::transport::shm::socket_path;

const HANG_GUARD: Duration = Duration::from_secs(60);

fn name(tag: &str) -> String {
    format!("ep-life-{tag}-{}", std::process::id())
}

#[test]
fn accept_times_out_survives_a_bad_handshake_and_frees_the_name_on_drop() {
    let n = name("a");
    let l = Listener::bind(&Config::default(), &n).unwrap();
    assert_eq!(l.name(), n);
    assert!(l.try_accept().unwrap().is_none());
    assert!(
        l.accept_timeout(Duration::from_millis(20))
            .unwrap()
            .is_none()
    );
    // The name is taken while the listener lives.
    assert!(Listener::bind(&Config::default(), &n).is_err());

    // A peer that connects and hangs up before its hello fails its handshake (so does the
    // probe of the second bind above, which checked that the name is live); the listener goes
    // on and the next real connector gets through. Each handshake runs on its own thread, so
    // the two failures and the accepted connection come out in any order.
    drop(UnixStream::connect(socket_path(&n).unwrap()).unwrap());
    let c = rsmsg::connect(&Config::default(), &n).unwrap();
    let mut failed = 0;
    let mut accepted = None;
    while accepted.is_none() || failed < 2 {
        match l.next(Some(HANG_GUARD)) {
            Ok(Some(a)) => {
                assert!(accepted.is_none(), "one connector, accepted twice");
                accepted = Some(a);
            }
            Ok(None) => panic!(
                "in {HANG_GUARD:?}: accepted {}, failed {failed} of the probe and the hang-up",
                accepted.is_some()
            ),
            Err(EndpointError::Transport(_)) => failed += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let a = accepted.unwrap();
    assert_eq!(failed, 2, "the probe and the hang-up");
    assert!(
        l.try_accept().unwrap().is_none(),
        "nothing else reached the listener"
    );
    assert_eq!(a.transport, Transport::Shm);
    c.send(b"after the bad one").unwrap();
    assert_eq!(
        &*a.conn.recv_timeout(HANG_GUARD).unwrap(),
        b"after the bad one"
    );

    drop(l);
    // Dropped: the name is free again at once.
    let again = Listener::bind(&Config::default(), &n).unwrap();
    drop(again);
}

#[test]
fn an_endpoint_counts_failed_setups_and_keeps_accepting() {
    let n = name("b");
    let mut ep = Endpoint::bind(Config::default(), &n).unwrap();
    // Connects and hangs up before its hello.
    drop(UnixStream::connect(socket_path(&n).unwrap()).unwrap());
    let c = rsmsg::connect(&Config::default(), &n).unwrap();
    c.send(b"x").unwrap();
    let m = ep.recv_timeout(HANG_GUARD).unwrap().expect("message");
    assert_eq!(&*m, b"x");
    assert!(m.peer_info().accepted);
    drop(m);
    // The hang-up's handshake ran on its own thread and may be reported after the message:
    // keep polling until it is, within the guard.
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while ep.accept_failures() == 0 && std::time::Instant::now() < deadline {
        assert!(ep.try_recv().unwrap().is_none(), "one message was sent");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ep.accept_failures(), 1);
    assert_eq!(ep.len(), 1);
}

#[test]
fn an_endpoint_without_peers_or_listener_says_so() {
    let mut ep = Endpoint::new(Config::default()).unwrap();
    assert!(matches!(ep.recv(), Err(EndpointError::NoPeers)));
    assert!(matches!(ep.try_recv(), Err(EndpointError::NoPeers)));
    assert!(matches!(
        ep.accept(Duration::from_millis(1)),
        Err(EndpointError::Config { .. })
    ));
    // With a listener and nobody there, a receive times out instead.
    let mut lonely = Endpoint::bind(Config::default(), &name("c")).unwrap();
    assert!(
        lonely
            .recv_timeout(Duration::from_millis(30))
            .unwrap()
            .is_none()
    );
    assert!(lonely.try_recv().unwrap().is_none());
}

#[test]
fn close_from_another_thread_ends_a_waiting_accept_and_frees_the_name() {
    let n = name("close");
    let l = std::sync::Arc::new(Listener::bind(&Config::default(), &n).unwrap());
    let waiting = {
        let l = l.clone();
        std::thread::spawn(move || l.accept().map(|_| ()))
    };
    std::thread::sleep(Duration::from_millis(100));
    l.close();
    // The accept returns (an error: no connection came) instead of waiting for good.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(waiting.join().unwrap());
    });
    let r = rx
        .recv_timeout(HANG_GUARD)
        .expect("the accept went on waiting after close");
    assert!(matches!(r, Err(EndpointError::Transport(_))), "{r:?}");
    // Closed: later accepts fail at once, and the name is free while the object lives.
    assert!(l.try_accept().is_err());
    let again = Listener::bind(&Config::default(), &n).unwrap();
    drop(again);
    drop(l);
}
