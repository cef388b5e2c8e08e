//! A shared-memory peer killed (SIGKILL) mid-stream: the survivor gets `PeerClosed` in bounded
//! time, learns exactly which messages were not confirmed delivered, keeps serving its other
//! peers, and reconnects to the restarted peer.
//!
//! The peers are this test executable re-run as a child (`child_receiver`, ignored unless
//! `RSMSG_FAULT_CHILD` names the endpoint to serve): it prints the sequence number of every
//! message it receives before it releases the message, so every message the sender sees
//! confirmed must appear in its output.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::Duration;

use rsmsg::core::Layout;
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect};
use rsmsg::transport::{PollMode, SendError, TransportError};

const CHILD_ENV: &str = "RSMSG_FAULT_CHILD";

/// The child side: serve one connection at a time under `$RSMSG_FAULT_CHILD`, print
/// `got SEQ LEN` for each message before releasing it, answer `ping` with `pong`, and pause
/// 200 µs per message so that a fast sender runs into back-pressure.
#[test]
#[ignore = "child process of the other tests of this file"]
fn child_receiver() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let listener = ShmListener::bind(&name, Layout::default(), PollMode::Busy).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening").unwrap();
    out.flush().unwrap();
    loop {
        let conn = listener.accept().unwrap();
        loop {
            let m = match conn.recv() {
                Ok(m) => m,
                Err(_) => break,
            };
            writeln!(out, "got {} {}", m.seq(), m.len()).unwrap();
            out.flush().unwrap();
            if &m[..] == b"ping" {
                drop(m);
                conn.send(b"pong").unwrap();
                continue;
            }
            drop(m);
            thread::sleep(Duration::from_micros(200));
        }
    }
}

struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
}

// The child is killed and waited for in `Peer::kill`; only a failing test leaves it behind.
#[allow(clippy::zombie_processes)]
fn spawn_peer(name: &str) -> Peer {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_receiver",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, name)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
        // libtest prints "test child_receiver ... " without a newline first.
        if line.trim_end().ends_with("listening") {
            return Peer { child, out };
        }
    }
}

impl Peer {
    fn kill(mut self) -> HashSet<u32> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        rest.lines()
            .filter_map(|l| l.strip_prefix("got "))
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }
}

fn ping(conn: &ShmConnection) {
    conn.send(b"ping").unwrap();
    let m = conn.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(&m[..], b"pong");
}

#[test]
fn killed_receiver_unconfirmed_messages_are_reported_and_others_keep_working() {
    let pid = std::process::id();
    let (name_a, name_b) = (format!("fault-peer-a-{pid}"), format!("fault-peer-b-{pid}"));
    let a = spawn_peer(&name_a);
    let b = spawn_peer(&name_b);
    let conn_a = connect(&name_a, Layout::default(), PollMode::Busy).unwrap();
    let conn_b = connect(&name_b, Layout::default(), PollMode::Busy).unwrap();
    ping(&conn_b);

    // Stream to A (sizes varying across the groups) and kill A while the stream runs.
    let a_pid = a.child.id();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        Command::new("kill")
            .args(["-9", &a_pid.to_string()])
            .status()
            .unwrap();
    });
    let mut sent = 0u32;
    let err = loop {
        let len = [8usize, 100, 1000, 5000][sent as usize % 4];
        match conn_a.send(&vec![sent as u8; len]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    killer.join().unwrap();
    assert!(
        matches!(err, SendError::Transport(TransportError::PeerClosed)),
        "{err:?}"
    );
    assert!(conn_a.failure().is_some());
    let received = a.kill();

    let unconfirmed = conn_a.unconfirmed();
    let confirmed = conn_a.confirmed();
    assert!(sent > 100, "the stream ran: {sent} messages");
    // Every message sent is either confirmed or reported, never both, never twice.
    assert_eq!(confirmed + unconfirmed.len() as u64, u64::from(sent));
    let unconfirmed_set: HashSet<u32> = unconfirmed.iter().copied().collect();
    assert_eq!(unconfirmed_set.len(), unconfirmed.len(), "duplicates");
    assert!(unconfirmed.iter().all(|&s| s < sent));
    assert!(unconfirmed.windows(2).all(|w| w[0] < w[1]), "oldest first");
    // The receiver was slower than the sender: messages were in flight when it died.
    assert!(!unconfirmed.is_empty());
    // Confirmed means received: the child printed it before releasing it.
    for seq in (0..sent).filter(|s| !unconfirmed_set.contains(s)) {
        assert!(
            received.contains(&seq),
            "message {seq} confirmed but never received"
        );
    }
    // And whatever the child received was sent.
    assert!(received.iter().all(|&s| s < sent));

    // The failed connection stays failed with a clear error.
    assert!(conn_a.try_send(b"x").is_err());
    // The other peer is unaffected.
    ping(&conn_b);
    // The restarted peer accepts a new connection.
    let a2 = spawn_peer(&name_a);
    let conn_a2 = connect(&name_a, Layout::default(), PollMode::Busy).unwrap();
    ping(&conn_a2);
    assert_eq!(conn_a2.unconfirmed(), Vec::<u32>::new());
    drop(conn_a2);
    drop(conn_b);
    a2.kill();
    b.kill();
}

#[test]
fn killed_receiver_is_noticed_by_a_blocked_receive_in_event_mode() {
    let name = format!("fault-peer-ev-{}", std::process::id());
    let a = spawn_peer(&name);
    let conn = connect(&name, Layout::default(), PollMode::Event).unwrap();
    ping(&conn);
    // Block in a receive that nothing will answer, and kill the peer meanwhile.
    let a_pid = a.child.id();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        Command::new("kill")
            .args(["-9", &a_pid.to_string()])
            .status()
            .unwrap();
    });
    let err = conn.recv().unwrap_err();
    killer.join().unwrap();
    assert!(matches!(err, TransportError::PeerClosed), "{err:?}");
    a.kill();
    // The ping and its pong were both confirmed.
    assert_eq!(conn.unconfirmed(), Vec::<u32>::new());
    assert_eq!(conn.confirmed(), 1);
}
