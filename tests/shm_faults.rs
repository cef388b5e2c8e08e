//! Shared-memory peers that die: the survivor gets a clear error, keeps its own state intact and
//! holds no segment of the dead connection once it drops it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use rsmsg::core::Layout;
use rsmsg::transport::shm::{ShmListener, connect};
use rsmsg::transport::{PollMode, SendError, TransportError};

/// Tests of this file count the process's open fds: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Starts `rsmsg perf --server --once` under `name` and waits until it listens.
fn server(name: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(["perf", "--server", "--once", "--name", name])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn rsmsg perf --server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening");
    child
}

#[test]
fn receiver_killed_mid_stream_sender_gets_peer_closed_and_leaks_nothing() {
    let _serial = serial();
    let name = format!("fault-recv-{}", std::process::id());
    let mut child = server(&name);
    let before = open_fds();
    {
        let conn = connect(&name, Layout::default(), PollMode::Busy).unwrap();
        // The server will count a long one-way stream; kill it while we send.
        conn.send(b"bw 64 100000000").unwrap();
        let pid = child.id();
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
        });
        let mut sent = 0u64;
        let err = loop {
            match conn.send(&[7u8; 64]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        killer.join().unwrap();
        assert!(sent > 0);
        match err {
            SendError::Transport(TransportError::PeerClosed) => {}
            other => panic!("expected PeerClosed, got {other:?}"),
        }
        // The connection stays failed, with a clear error, and does not hang.
        assert!(conn.try_send(b"x").is_err());
        assert!(conn.try_recv().is_err());
    }
    child.wait().unwrap();
    // Every region and socket of the dead connection is gone from this process.
    assert_eq!(open_fds(), before);
}

#[test]
fn sender_killed_mid_stream_receiver_keeps_what_arrived_and_gets_peer_closed() {
    let _serial = serial();
    let name = format!("fault-send-{}", std::process::id());
    let listener = ShmListener::bind(&name, Layout::default(), PollMode::Busy).unwrap();
    let before = open_fds();
    // The client side of `rsmsg perf` sends a plan then streams: kill it mid-stream.
    let mut client = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args([
            "perf",
            "--client",
            "--name",
            &name,
            "-t",
            "bw",
            "-s",
            "100",
            "-n",
            "100000000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        let conn = listener.accept().unwrap();
        let plan = conn.recv().unwrap();
        assert!(plan.starts_with(b"bw"), "warm-up plan first");
        drop(plan);
        // The client starts its clock when the server says it took the plan.
        conn.send(b"ready").unwrap();
        let mut got = 0u64;
        let err = loop {
            match conn.recv() {
                Ok(m) => {
                    // Plans are text (each answered `ready`); stream messages are 100 bytes
                    // of 0xa5.
                    if m.starts_with(b"bw ") {
                        drop(m);
                        conn.send(b"ready").unwrap();
                    } else if m.len() == 100 {
                        assert!(m.iter().all(|&b| b == 0xa5), "message {got} corrupted");
                        drop(m);
                        got += 1;
                        // The warm-up plan is 10 000 messages; the client waits for its ack.
                        if got == 10_000 {
                            conn.send(b"ack").unwrap();
                        }
                        if got == 20_000 {
                            client.kill().unwrap();
                        }
                    }
                }
                Err(e) => break e,
            }
        };
        assert!(got >= 20_000);
        assert!(matches!(err, TransportError::PeerClosed), "got {err:?}");
    }
    client.wait().unwrap();
    assert_eq!(open_fds(), before);
}

#[test]
fn a_second_listener_under_a_live_name_is_refused_and_a_stale_one_replaced() {
    let _serial = serial();
    let name = format!("fault-name-{}", std::process::id());
    let first = ShmListener::bind(&name, Layout::default(), PollMode::Busy).unwrap();
    assert!(ShmListener::bind(&name, Layout::default(), PollMode::Busy).is_err());
    // A socket file left behind by a dead process (nobody accepts on it) is replaced.
    let path = first.path().to_path_buf();
    drop(first);
    std::os::unix::net::UnixListener::bind(&path)
        .map(drop)
        .unwrap();
    assert!(
        path.exists(),
        "a dropped std listener leaves its socket file"
    );
    let second = ShmListener::bind(&name, Layout::default(), PollMode::Busy).unwrap();
    assert_eq!(second.path(), path);
}

#[test]
fn connecting_to_nobody_is_a_clear_error() {
    let _serial = serial();
    let err = connect("nobody-listens-here", Layout::default(), PollMode::Busy).unwrap_err();
    assert!(err.to_string().contains("connect"), "{err}");
    let err = connect("bad/name", Layout::default(), PollMode::Busy).unwrap_err();
    assert!(err.to_string().contains("names"), "{err}");
}
