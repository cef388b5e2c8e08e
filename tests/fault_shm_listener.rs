//! A shared-memory listener facing connectors that stall: a client that connects and says
//! nothing, or trickles its hello, does not hold up the next client, and the number of
//! handshakes in progress is capped.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use rsmsg::core::Layout;
use rsmsg::transport::PollMode;
use rsmsg::transport::shm::{MAX_PENDING_HANDSHAKES, ShmListener, connect};

const GUARD: Duration = Duration::from_secs(60);

fn listener(tag: &str) -> ShmListener {
    let name = format!("fault-lsn-{tag}-{}", std::process::id());
    ShmListener::bind(&name, Layout::default(), PollMode::Busy).unwrap()
}

/// Whether the listener still holds `s` open (no EOF, no reset), without blocking.
fn still_open(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn silent_and_trickling_connectors_do_not_hold_up_an_honest_one() {
    let l = listener("stall");
    // One says nothing, one sends its hello one byte at a time.
    let mut silent = UnixStream::connect(l.path()).unwrap();
    let mut trickle = UnixStream::connect(l.path()).unwrap();
    let path = l.path().to_path_buf();
    let trickler = thread::spawn(move || {
        for _ in 0..20 {
            if trickle.write_all(b"R").is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        trickle
    });
    thread::sleep(Duration::from_millis(100));
    let honest = thread::spawn(move || {
        let c =
            rsmsg::transport::shm::connect_path(&path, Layout::default(), PollMode::Busy).unwrap();
        c.send(b"hello").unwrap();
        c
    });
    // The first connection accept hands out is the honest one, while the others still stall.
    let conn = l.accept().expect("the honest connector's handshake");
    assert_eq!(&conn.recv().unwrap()[..], b"hello");
    let _c = honest.join().unwrap();
    assert!(
        still_open(&mut silent),
        "the silent connector was served first"
    );
    let trickle = trickler.join().unwrap();
    // Both stallers are eventually refused with a clear error, and the listener goes on.
    drop(silent);
    trickle.shutdown(std::net::Shutdown::Write).unwrap();
    for _ in 0..2 {
        let e = l.accept().unwrap_err();
        assert!(e.to_string().contains("hello"), "{e}");
    }
    let name = l.path().file_stem().unwrap().to_str().unwrap().to_string();
    let t = thread::spawn(move || connect(&name, Layout::default(), PollMode::Busy).map(drop));
    l.accept().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn handshakes_in_progress_are_capped() {
    let l = listener("cap");
    let mut stalled: Vec<UnixStream> = (0..MAX_PENDING_HANDSHAKES)
        .map(|_| UnixStream::connect(l.path()).unwrap())
        .collect();
    // One more is closed at once: it reads EOF instead of waiting for a hello.
    let mut extra = UnixStream::connect(l.path()).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 1];
    let n = extra.read(&mut b);
    assert!(
        matches!(n, Ok(0)) || matches!(&n, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{n:?}"
    );
    assert!(stalled.iter_mut().all(still_open));
    // Once the stalled connectors go away, honest ones are served again.
    drop(stalled);
    for _ in 0..MAX_PENDING_HANDSHAKES {
        assert!(l.accept().is_err());
    }
    let path = l.path().to_path_buf();
    let t = thread::spawn(move || {
        rsmsg::transport::shm::connect_path(&path, Layout::default(), PollMode::Busy).map(drop)
    });
    l.accept().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn connections_waiting_to_be_accepted_count_against_the_cap() {
    let l = listener("unaccepted");
    let path = l.path().to_path_buf();
    let dial = || rsmsg::transport::shm::connect_path(&path, Layout::default(), PollMode::Busy);
    // Handshakes complete in the background while the application does not accept.
    // Each handshake runs on its own thread, so connections reach `accept` in any order: every
    // connector names itself with its first message.
    let waiting: Vec<_> = (0..MAX_PENDING_HANDSHAKES)
        .map(|i| {
            let c = dial().expect("within the cap");
            c.send(&[u8::try_from(i).unwrap()]).unwrap();
            c
        })
        .collect();
    let e = dial().expect_err("beyond the cap");
    assert!(e.to_string().contains("hello"), "{e}");
    // Accepting one makes room for one more.
    let first = l.accept().unwrap();
    let extra = dial().expect("room after an accept");
    let i = usize::from(first.recv_timeout(GUARD).unwrap()[0]);
    first.send(b"accepted").unwrap();
    assert_eq!(&*waiting[i].recv_timeout(GUARD).unwrap(), b"accepted");
    drop(extra);
}
