//! Verbs peers that die: a receiver process killed (SIGKILL) mid-stream. The survivor gets
//! `PeerClosed` once the QP's retries run out (`RSMSG_QP_TIMEOUT`), learns exactly which
//! messages were not confirmed delivered, keeps its other connection, and reconnects to the
//! restarted peer.
//!
//! Runs in the Soft-RoCE guest (`ci/test`); on a host without a device it prints
//! `skipped: no RDMA device` unless `RSMSG_REQUIRE_RDMA=1`. The killed peer is this test
//! executable re-run as a child (`child_receiver`, ignored unless `RSMSG_FAULT_VERBS_CHILD`
//! is set): it prints each message's sequence number before releasing it.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{Manager, Token};
use rsmsg::core::Layout;
use rsmsg::transport::verbs::{self, VerbsConnection, VerbsListener, VerbsOptions};
use rsmsg::transport::{PollMode, SendError, TransportError};
use rsmsg::verbs::{Context, test_context};

const CHILD_ENV: &str = "RSMSG_FAULT_VERBS_CHILD";
const SMALL: &str = "256:16:4,4k:8:4,64k:4:2";
/// Guard against a hang, not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn token() -> Token {
    Token::new("verbs-faults-test-token").expect("token")
}

fn opts(ctx: &Context) -> VerbsOptions {
    VerbsOptions {
        context: Some(ctx.clone()),
        setup_timeout: Duration::from_secs(60),
        ..VerbsOptions::from_env().expect("options from the environment")
    }
}

fn layout() -> Layout {
    SMALL.parse().unwrap()
}

/// The child: `$RSMSG_FAULT_VERBS_CHILD` is `MANAGER_ADDR,NAME`. Serves connections one at a
/// time, printing `got SEQ` before releasing each message, answering `ping` with `pong`, and
/// pausing 2 ms per message so that the sender runs into back-pressure.
#[test]
#[ignore = "child process of the other tests of this file"]
fn child_receiver() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (addr, name) = spec.split_once(',').unwrap();
    let ctx = test_context("child_receiver").expect("an RDMA device in the child");
    let mut listener =
        VerbsListener::bind(addr, token(), name, layout(), PollMode::Busy, opts(&ctx)).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening").unwrap();
    out.flush().unwrap();
    loop {
        let conn = listener.accept().unwrap();
        while let Ok(m) = conn.recv() {
            writeln!(out, "got {} {}", m.seq(), m.len()).unwrap();
            out.flush().unwrap();
            if &m[..] == b"ping" {
                drop(m);
                conn.send(b"pong").unwrap();
                continue;
            }
            drop(m);
            thread::sleep(Duration::from_millis(2));
        }
    }
}

struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
}

// The child is killed and waited for in `Peer::kill`; only a failing test leaves it behind.
#[allow(clippy::zombie_processes)]
fn spawn_peer(addr: SocketAddr, name: &str) -> Peer {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_receiver", "--nocapture"])
        .env(CHILD_ENV, format!("{addr},{name}"))
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
        let _ = self.child.kill();
        self.child.wait().unwrap();
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        rest.lines()
            .filter_map(|l| l.strip_prefix("got "))
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }
}

fn ping(conn: &VerbsConnection) {
    conn.send(b"ping").unwrap();
    let m = conn.recv_timeout(HANG_GUARD).unwrap();
    assert_eq!(&m[..], b"pong");
}

#[test]
fn killed_receiver_unconfirmed_messages_are_reported_and_others_keep_working() {
    let Some(ctx) = test_context("killed_receiver_unconfirmed_messages_are_reported") else {
        return;
    };
    let m = Manager::bind("127.0.0.1:0", token()).unwrap();
    let addr = m.local_addr();
    let pid = std::process::id();
    let (name_a, name_b) = (format!("vfault-a-{pid}"), format!("vfault-b-{pid}"));
    let a = spawn_peer(addr, &name_a);
    let b = spawn_peer(addr, &name_b);
    let conn_a = verbs::connect(
        addr,
        &token(),
        &name_a,
        layout(),
        PollMode::Busy,
        &opts(&ctx),
    )
    .unwrap();
    let conn_b = verbs::connect(
        addr,
        &token(),
        &name_b,
        layout(),
        PollMode::Busy,
        &opts(&ctx),
    )
    .unwrap();
    ping(&conn_a);
    ping(&conn_b);

    let a_pid = a.child.id();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(1500));
        Command::new("kill")
            .args(["-9", &a_pid.to_string()])
            .status()
            .unwrap();
    });
    // The ping was message 0 of this direction.
    let mut sent = 1u32;
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
    let received = a.kill();
    let unconfirmed = conn_a.unconfirmed();
    let confirmed = conn_a.confirmed();
    assert!(sent > 10, "the stream ran: {sent} messages");
    assert_eq!(confirmed + unconfirmed.len() as u64, u64::from(sent));
    let set: HashSet<u32> = unconfirmed.iter().copied().collect();
    assert_eq!(set.len(), unconfirmed.len(), "duplicates");
    assert!(unconfirmed.iter().all(|&s| s < sent));
    assert!(!unconfirmed.is_empty());
    for seq in (0..sent).filter(|s| !set.contains(s)) {
        assert!(
            received.contains(&seq),
            "message {seq} confirmed but never received"
        );
    }
    assert!(received.iter().all(|&s| s < sent));
    assert!(conn_a.try_send(b"x").is_err());

    // The other peer is unaffected; the restarted one accepts a new connection.
    ping(&conn_b);
    let a2 = spawn_peer(addr, &name_a);
    let conn_a2 = verbs::connect(
        addr,
        &token(),
        &name_a,
        layout(),
        PollMode::Busy,
        &opts(&ctx),
    )
    .unwrap();
    ping(&conn_a2);
    ping(&conn_b);
    drop((conn_a2, conn_b));
    a2.kill();
    b.kill();
}
