//! Event-loop integration over shared memory: the connection's event fd, polled with
//! `poll(2)`, becomes readable exactly when a message (or a credit) arrives after `arm`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use rsmsg::core::Layout;
use rsmsg::transport::PollMode;
use rsmsg::transport::SendError;
use rsmsg::transport::shm::{ShmConnection, ShmListener, connect_path};

mod common;
use common::payload;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn pair_with(layout: &str, mode: PollMode) -> (ShmConnection, ShmConnection) {
    let layout: Layout = layout.parse().expect("layout");
    let dir = std::env::temp_dir().join(format!("rsmsg-evfd-{}", std::process::id()));
    let path = dir.join(format!("ep{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let listener = ShmListener::bind_path(&path, layout.clone(), mode).expect("bind");
    let h = thread::spawn(move || listener.accept().expect("accept"));
    let b = connect_path(&path, layout, mode).expect("connect");
    let a = h.join().expect("listener thread");
    (a, b)
}

/// Whether `fd` is readable within `ms` milliseconds.
fn readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
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
fn busy_mode_has_no_event_fd() {
    let (a, b) = pair_with("256:16:1,4k:4:1", PollMode::Busy);
    assert!(a.event_fd().is_none() && b.event_fd().is_none());
    assert!(
        a.arm().unwrap(),
        "without an event fd arm never lets the caller wait"
    );
}

#[test]
fn event_fd_wakes_a_poll_loop_for_every_message() {
    let (a, b) = pair_with("256:16:1,4k:4:1", PollMode::Event);
    let fd = a.event_fd().expect("event mode has an event fd");
    assert!(a.try_recv().unwrap().is_none());
    assert!(!a.arm().unwrap(), "nothing there: the wait may begin");
    assert!(!readable(fd, 0), "armed and nothing sent: not readable");

    // Another thread sends while this one sleeps in poll(2).
    const N: u64 = 200;
    let sender = thread::spawn(move || {
        for i in 0..N {
            if i % 20 == 0 {
                thread::sleep(Duration::from_millis(2));
            }
            b.send(&payload(i, 40 + (i as usize % 100))).expect("send");
        }
        b
    });
    let mut got = 0u64;
    let mut waits = 0u64;
    while got < N {
        // Drain, then arm; wait only when arm says so.
        while let Some(m) = a.try_recv().unwrap() {
            assert_eq!(
                &*m,
                &payload(got, 40 + (got as usize % 100))[..],
                "message {got}"
            );
            got += 1;
        }
        if got == N {
            break;
        }
        if !a.arm().unwrap() {
            waits += 1;
            assert!(readable(fd, 10_000), "no wake-up after {got} messages");
        }
    }
    assert!(waits > 0, "the loop slept at least once");
    let b = sender.join().unwrap();
    // Drained and armed: not readable until the next message, then readable.
    assert!(!a.arm().unwrap());
    assert!(!readable(fd, 0), "arm reset the fd");
    b.send(b"late").unwrap();
    assert!(readable(fd, 10_000));
    assert!(a.arm().unwrap(), "a message is there: arm says so");
    assert_eq!(&*a.try_recv().unwrap().unwrap(), b"late");
}

#[test]
fn event_fd_reports_credits_to_a_sender_under_back_pressure() {
    // One partition per group: two messages fill everything.
    let (a, b) = pair_with("256:1:1,4k:1:1", PollMode::Event);
    let fd = b.event_fd().unwrap();
    b.try_send(b"one").unwrap();
    b.try_send(b"two").unwrap();
    assert!(matches!(b.try_send(b"three"), Err(SendError::WouldBlock)));
    let m1 = a.try_recv().unwrap().expect("first");
    let m2 = a.try_recv().unwrap().expect("second");
    assert!(!b.arm().unwrap(), "no credit yet");
    assert!(!readable(fd, 0));
    drop(m1);
    assert!(readable(fd, 10_000), "the credit notice wakes the sender");
    // The notice is consumed by the receive path, then the send goes through.
    assert!(b.try_recv().unwrap().is_none());
    b.try_send(b"three").unwrap();
    drop(m2);
    assert_eq!(&*a.try_recv().unwrap().unwrap(), b"three");
}
