//! The C API called as C calls it: misuse (NULL pointers, zero and overflowing lengths, double
//! release, use after close, wrong and made-up handles, bad strings) is answered with error
//! codes, and the regular paths (copying and zero-copy receives, back-pressure, closed peers)
//! behave as the header says.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use rsmsg::capi::*;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> CString {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    CString::new(format!("{prefix}-{}-{n}", std::process::id())).unwrap()
}

fn last_error() -> String {
    // SAFETY: rsmsg_last_error returns a NUL-terminated string valid until the next failing
    // call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(rsmsg_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn config() -> rsmsg_config {
    let mut c = rsmsg_config { id: 0 };
    assert_eq!(rsmsg_config_new(&mut c), RSMSG_OK);
    assert_eq!(rsmsg_config_set_transport(c, c"shm".as_ptr()), RSMSG_OK);
    c
}

/// A connected pair over shared memory: (client side, server side).
fn pair(cfg: rsmsg_config) -> (rsmsg_conn, rsmsg_conn) {
    let name = unique("capi");
    let mut l = rsmsg_listener { id: 0 };
    assert_eq!(
        rsmsg_listen(cfg, name.as_ptr(), &mut l),
        RSMSG_OK,
        "{}",
        last_error()
    );
    let server = thread::spawn(move || {
        let mut c = rsmsg_conn { id: 0 };
        assert_eq!(rsmsg_accept(l, &mut c), RSMSG_OK, "{}", last_error());
        assert_eq!(rsmsg_listener_free(l), RSMSG_OK);
        c
    });
    let mut c = rsmsg_conn { id: 0 };
    assert_eq!(
        rsmsg_connect(cfg, name.as_ptr(), &mut c),
        RSMSG_OK,
        "{}",
        last_error()
    );
    (c, server.join().unwrap())
}

fn send(c: rsmsg_conn, bytes: &[u8]) -> i32 {
    rsmsg_send(c, bytes.as_ptr().cast(), bytes.len())
}

fn view_bytes(v: &rsmsg_view) -> Vec<u8> {
    assert!(!v.data.is_null());
    // SAFETY: a view handed out by rsmsg_recv_view stays valid until released; it is read
    // before release.
    unsafe { std::slice::from_raw_parts(v.data, v.len) }.to_vec()
}

#[test]
fn null_pointers_are_refused() {
    assert_eq!(rsmsg_config_new(null_mut()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_config_from_env(null_mut()), RSMSG_ERR_NULL);
    let cfg = config();
    assert_eq!(rsmsg_config_set_transport(cfg, null()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_config_set_groups(cfg, null()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_config_set_poll(cfg, null()), RSMSG_ERR_NULL);
    assert_eq!(
        rsmsg_config_set_manager(cfg, c"127.0.0.1:1".as_ptr(), null()),
        RSMSG_ERR_NULL
    );
    let mut l = rsmsg_listener { id: 0 };
    assert_eq!(rsmsg_listen(cfg, null(), &mut l), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_listen(cfg, c"x".as_ptr(), null_mut()), RSMSG_ERR_NULL);
    assert!(last_error().contains("out_listener"), "{}", last_error());
    assert_eq!(
        rsmsg_connect(cfg, null(), &mut rsmsg_conn { id: 0 }),
        RSMSG_ERR_NULL
    );
    assert_eq!(rsmsg_launch_info(null_mut(), null_mut()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_mesh_init(cfg, null_mut()), RSMSG_ERR_NULL);

    let (a, b) = pair(cfg);
    assert_eq!(rsmsg_send(a, null(), 4), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_try_send(a, null(), 4), RSMSG_ERR_NULL);
    let mut buf = [0u8; 16];
    let mut n = 0usize;
    assert_eq!(
        rsmsg_recv(b, buf.as_mut_ptr().cast(), 16, null_mut()),
        RSMSG_ERR_NULL
    );
    assert_eq!(rsmsg_try_recv(b, null_mut(), 16, &mut n), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_recv_view(b, 0, null_mut()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_view_release(b, null_mut()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_stats_get(b, null_mut()), RSMSG_ERR_NULL);
    assert_eq!(rsmsg_max_message(b, null_mut()), RSMSG_ERR_NULL);
    // Nothing was sent by the refused calls.
    assert_eq!(
        rsmsg_try_recv(b, buf.as_mut_ptr().cast(), 16, &mut n),
        RSMSG_ERR_WOULD_BLOCK
    );
    for c in [a, b] {
        assert_eq!(rsmsg_close(c), RSMSG_OK);
    }
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn zero_and_overflowing_lengths_are_refused() {
    let cfg = config();
    let (a, b) = pair(cfg);
    let x = [1u8; 8];
    assert_eq!(rsmsg_send(a, x.as_ptr().cast(), 0), RSMSG_ERR_INVALID_ARG);
    assert_eq!(
        rsmsg_try_send(a, x.as_ptr().cast(), 0),
        RSMSG_ERR_INVALID_ARG
    );
    // A range that wraps the address space, and one longer than any object can be.
    let near_end = (usize::MAX - 3) as *const c_void;
    assert_eq!(rsmsg_send(a, near_end, 16), RSMSG_ERR_INVALID_ARG);
    assert!(last_error().contains("overflows"), "{}", last_error());
    assert_eq!(
        rsmsg_send(a, x.as_ptr().cast(), usize::MAX),
        RSMSG_ERR_INVALID_ARG
    );
    let mut n = 0usize;
    let mut buf = [0u8; 8];
    assert_eq!(
        rsmsg_recv(b, buf.as_mut_ptr().cast(), usize::MAX, &mut n),
        RSMSG_ERR_INVALID_ARG
    );
    assert_eq!(
        rsmsg_recv_timeout(b, buf.as_mut_ptr().cast(), 8, &mut n, 0),
        RSMSG_ERR_INVALID_ARG
    );
    let mut v = rsmsg_view {
        data: null(),
        len: 0,
        id: 0,
    };
    assert_eq!(rsmsg_recv_view(b, -2, &mut v), RSMSG_ERR_INVALID_ARG);
    assert_eq!(rsmsg_recv_view(b, 0, &mut v), RSMSG_ERR_WOULD_BLOCK);

    // One byte over the largest eager message goes by rendezvous: the send returns once the
    // receiver has read it, so it runs on another thread while this one receives.
    let mut max = 0usize;
    assert_eq!(rsmsg_max_message(a, &mut max), RSMSG_OK);
    let big: Vec<u8> = (0..max + 1).map(|i| (i % 251) as u8).collect();
    let sender = {
        let big = big.clone();
        std::thread::spawn(move || send(a, &big))
    };
    let mut got = vec![0u8; max + 1];
    assert_eq!(
        rsmsg_recv(b, got.as_mut_ptr().cast(), max + 1, &mut n),
        RSMSG_OK
    );
    assert_eq!(sender.join().unwrap(), RSMSG_OK);
    assert_eq!((n, &got[..]), (max + 1, &big[..]));
    assert_eq!(send(a, &big[..max]), RSMSG_OK);
    let mut got = vec![0u8; max];
    assert_eq!(
        rsmsg_recv(b, got.as_mut_ptr().cast(), max, &mut n),
        RSMSG_OK
    );
    assert_eq!((n, &got[..]), (max, &big[..max]));

    // A buffer too small keeps the message queued and reports its length; NULL with capacity 0
    // asks for the length only.
    assert_eq!(send(a, b"twelve bytes"), RSMSG_OK);
    assert_eq!(
        rsmsg_recv(b, null_mut(), 0, &mut n),
        RSMSG_ERR_BUFFER_TOO_SMALL
    );
    assert_eq!(n, 12);
    assert_eq!(
        rsmsg_recv(b, buf.as_mut_ptr().cast(), 8, &mut n),
        RSMSG_ERR_BUFFER_TOO_SMALL
    );
    assert_eq!(n, 12);
    let mut big_enough = [0u8; 12];
    assert_eq!(
        rsmsg_try_recv(b, big_enough.as_mut_ptr().cast(), 12, &mut n),
        RSMSG_OK
    );
    assert_eq!(&big_enough, b"twelve bytes");
    for c in [a, b] {
        assert_eq!(rsmsg_close(c), RSMSG_OK);
    }
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn double_release_use_after_close_and_wrong_handles_are_errors() {
    let cfg = config();
    let (a, b) = pair(cfg);

    // Views: release twice, release on the other connection.
    assert_eq!(send(a, b"one"), RSMSG_OK);
    assert_eq!(send(a, b"two"), RSMSG_OK);
    let mut v1 = rsmsg_view {
        data: null(),
        len: 0,
        id: 0,
    };
    let mut v2 = v1;
    assert_eq!(rsmsg_recv_view(b, RSMSG_WAIT_FOREVER, &mut v1), RSMSG_OK);
    assert_eq!(rsmsg_recv_view(b, 1000, &mut v2), RSMSG_OK);
    assert_eq!(
        (view_bytes(&v1), view_bytes(&v2)),
        (b"one".to_vec(), b"two".to_vec())
    );
    let copy = v1;
    assert_eq!(rsmsg_view_release(a, &mut v1), RSMSG_ERR_BAD_HANDLE);
    // Out of order release is fine.
    assert_eq!(rsmsg_view_release(b, &mut v2), RSMSG_OK);
    assert_eq!(rsmsg_view_release(b, &mut v1), RSMSG_OK);
    assert!(v1.data.is_null() && v1.len == 0 && v1.id == 0);
    assert_eq!(rsmsg_view_release(b, &mut v1), RSMSG_ERR_BAD_HANDLE);
    let mut stale = copy;
    assert_eq!(rsmsg_view_release(b, &mut stale), RSMSG_ERR_BAD_HANDLE);
    assert!(
        last_error().contains("already released"),
        "{}",
        last_error()
    );
    let mut st = rsmsg_stats::default();
    assert_eq!(rsmsg_stats_get(b, &mut st), RSMSG_OK);
    assert_eq!((st.received_bytes, st.held), (6, 0));

    // Wrong kinds: a configuration where a connection is expected, and the other way round.
    let as_conn = rsmsg_conn { id: cfg.id };
    assert_eq!(send(as_conn, b"x"), RSMSG_ERR_WRONG_KIND);
    assert!(last_error().contains("config"), "{}", last_error());
    assert_eq!(
        rsmsg_listen(
            rsmsg_config { id: a.id },
            c"n".as_ptr(),
            &mut rsmsg_listener { id: 0 }
        ),
        RSMSG_ERR_WRONG_KIND
    );
    assert_eq!(
        rsmsg_mesh_barrier(rsmsg_mesh { id: b.id }),
        RSMSG_ERR_WRONG_KIND
    );
    assert_eq!(
        rsmsg_mesh_set_barrier_backlog(rsmsg_mesh { id: b.id }, 1 << 20),
        RSMSG_ERR_WRONG_KIND
    );
    let mut view_as_conn = rsmsg_view {
        data: null(),
        len: 0,
        id: a.id,
    };
    assert_eq!(
        rsmsg_view_release(b, &mut view_as_conn),
        RSMSG_ERR_WRONG_KIND
    );
    // Made-up handles: zero, a value of no kind, a value of a kind but never issued.
    assert_eq!(send(rsmsg_conn { id: 0 }, b"x"), RSMSG_ERR_BAD_HANDLE);
    assert_eq!(
        send(rsmsg_conn { id: 0xdead_beef }, b"x"),
        RSMSG_ERR_BAD_HANDLE
    );
    assert_eq!(
        send(
            rsmsg_conn {
                id: (3 << 56) | ((1 << 56) - 2)
            },
            b"x"
        ),
        RSMSG_ERR_BAD_HANDLE
    );
    assert!(last_error().contains("never opened"), "{}", last_error());

    // A view held at close is released by the close; the handle is gone afterwards.
    assert_eq!(send(a, b"held"), RSMSG_OK);
    let mut held = rsmsg_view {
        data: null(),
        len: 0,
        id: 0,
    };
    assert_eq!(rsmsg_recv_view(b, RSMSG_WAIT_FOREVER, &mut held), RSMSG_OK);
    assert_eq!(rsmsg_close(b), RSMSG_OK);
    assert_eq!(rsmsg_close(b), RSMSG_ERR_BAD_HANDLE);
    assert!(last_error().contains("closed or freed"), "{}", last_error());
    assert_eq!(send(b, b"x"), RSMSG_ERR_BAD_HANDLE);
    assert_eq!(rsmsg_view_release(b, &mut held), RSMSG_ERR_BAD_HANDLE);
    let mut n = 0usize;
    assert_eq!(
        rsmsg_try_recv(b, null_mut(), 0, &mut n),
        RSMSG_ERR_BAD_HANDLE
    );

    // The peer sees the close.
    let mut buf = [0u8; 8];
    assert_eq!(
        rsmsg_recv_timeout(a, buf.as_mut_ptr().cast(), 8, &mut n, 10_000),
        RSMSG_ERR_CLOSED
    );
    assert_eq!(rsmsg_close(a), RSMSG_OK);

    // Configurations and listeners: double free.
    let mut l = rsmsg_listener { id: 0 };
    let name = unique("capi-l");
    assert_eq!(rsmsg_listen(cfg, name.as_ptr(), &mut l), RSMSG_OK);
    assert_eq!(rsmsg_listener_free(l), RSMSG_OK);
    assert_eq!(rsmsg_listener_free(l), RSMSG_ERR_BAD_HANDLE);
    assert_eq!(
        rsmsg_accept(l, &mut rsmsg_conn { id: 0 }),
        RSMSG_ERR_BAD_HANDLE
    );
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
    assert_eq!(rsmsg_config_free(cfg), RSMSG_ERR_BAD_HANDLE);
    assert_eq!(
        rsmsg_config_set_poll(cfg, c"busy".as_ptr()),
        RSMSG_ERR_BAD_HANDLE
    );
}

#[test]
fn bad_strings_and_settings_are_refused() {
    let cfg = config();
    assert_eq!(
        rsmsg_config_set_transport(cfg, c"carrier-pigeon".as_ptr()),
        RSMSG_ERR_CONFIG
    );
    assert!(last_error().contains("carrier-pigeon"), "{}", last_error());
    assert_eq!(
        rsmsg_config_set_poll(cfg, c"adaptive:x".as_ptr()),
        RSMSG_ERR_CONFIG
    );
    assert_eq!(
        rsmsg_config_set_groups(cfg, c"0:0:0".as_ptr()),
        RSMSG_ERR_CONFIG
    );
    assert_eq!(
        rsmsg_config_set_groups(cfg, c"256:64:4,4096:16:4".as_ptr()),
        RSMSG_OK
    );
    assert_eq!(
        rsmsg_config_set_poll(cfg, c"adaptive:100".as_ptr()),
        RSMSG_OK
    );
    assert_eq!(
        rsmsg_config_set_manager(cfg, c"".as_ptr(), c"secret-secret".as_ptr()),
        RSMSG_ERR_INVALID_ARG
    );
    // An address that would be stored and later fail to resolve is refused at once.
    for addr in [
        c" 127.0.0.1:7000",
        c"127.0.0.1:7000 ",
        c"127.0.0.1:7000\n",
        c"no-port",
        c"host:0",
    ] {
        assert_eq!(
            rsmsg_config_set_manager(cfg, addr.as_ptr(), c"secret-secret".as_ptr()),
            RSMSG_ERR_CONFIG,
            "{addr:?}"
        );
        assert!(last_error().contains("RSMSG_MANAGER"), "{}", last_error());
    }
    let not_utf8: [u8; 3] = [0xff, 0xfe, 0];
    assert_eq!(
        rsmsg_config_set_transport(cfg, not_utf8.as_ptr().cast::<c_char>()),
        RSMSG_ERR_INVALID_ARG
    );
    // No NUL within the limit: refused without reading past it.
    let long = vec![b'a'; 5000];
    assert_eq!(
        rsmsg_config_set_transport(cfg, long.as_ptr().cast::<c_char>()),
        RSMSG_ERR_INVALID_ARG
    );
    let mut l = rsmsg_listener { id: 0 };
    assert_eq!(
        rsmsg_listen(cfg, c"bad/name".as_ptr(), &mut l),
        RSMSG_ERR_CONFIG
    );
    assert_eq!(l.id, 0, "no handle is written on failure");
    // Connecting to nobody.
    let nobody = unique("capi-nobody");
    assert_ne!(
        rsmsg_connect(cfg, nobody.as_ptr(), &mut rsmsg_conn { id: 0 }),
        RSMSG_OK
    );
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn error_names_cover_every_code() {
    let codes = [
        RSMSG_OK,
        RSMSG_ERR_NULL,
        RSMSG_ERR_INVALID_ARG,
        RSMSG_ERR_BAD_HANDLE,
        RSMSG_ERR_WRONG_KIND,
        RSMSG_ERR_WOULD_BLOCK,
        RSMSG_ERR_TIMEOUT,
        RSMSG_ERR_TOO_LARGE,
        RSMSG_ERR_BUFFER_TOO_SMALL,
        RSMSG_ERR_CLOSED,
        RSMSG_ERR_CONFIG,
        RSMSG_ERR_BOOTSTRAP,
        RSMSG_ERR_TRANSPORT,
        RSMSG_ERR_PROTOCOL,
        RSMSG_ERR_LAUNCH,
        RSMSG_ERR_INTERNAL,
        RSMSG_ERR_REFUSED,
    ];
    let unknown = unsafe_str(rsmsg_strerror(12345));
    let mut names = std::collections::HashSet::new();
    for c in codes {
        let s = unsafe_str(rsmsg_strerror(c));
        assert!(!s.is_empty() && s != unknown, "code {c}");
        assert!(names.insert(s), "code {c} shares its name");
    }
}

fn unsafe_str(p: *const c_char) -> String {
    // SAFETY: rsmsg_strerror returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn back_pressure_timeouts_and_threads() {
    let cfg = config();
    // One small group: 8 partitions of 256 bytes, so the receiver fills up quickly.
    assert_eq!(
        rsmsg_config_set_groups(cfg, c"256:8:1,1024:2:1".as_ptr()),
        RSMSG_OK
    );
    let (a, b) = pair(cfg);
    let msg = [3u8; 200];
    let mut sent = 0;
    let rc = loop {
        let rc = rsmsg_try_send(a, msg.as_ptr().cast(), msg.len());
        if rc != RSMSG_OK || sent > 1000 {
            break rc;
        }
        sent += 1;
    };
    assert_eq!(rc, RSMSG_ERR_WOULD_BLOCK, "{}", last_error());
    // 8 partitions of the small group, then 2 of the larger one.
    assert_eq!(sent, 10, "sends before back-pressure");
    let mut buf = [0u8; 256];
    let mut n = 0usize;
    for _ in 0..sent {
        assert_eq!(
            rsmsg_recv(b, buf.as_mut_ptr().cast(), 256, &mut n),
            RSMSG_OK
        );
        assert_eq!(&buf[..n], &msg[..]);
    }
    assert_eq!(
        rsmsg_recv_timeout(b, buf.as_mut_ptr().cast(), 256, &mut n, 20),
        RSMSG_ERR_TIMEOUT
    );
    assert_eq!(rsmsg_try_send(a, msg.as_ptr().cast(), msg.len()), RSMSG_OK);
    assert_eq!(
        rsmsg_recv(b, buf.as_mut_ptr().cast(), 256, &mut n),
        RSMSG_OK
    );

    // One connection used from two threads (serialized by the library): a sender thread
    // blocks under back-pressure while this thread receives on the other end.
    let sender = thread::spawn(move || {
        for i in 0..500u32 {
            let m = i.to_le_bytes();
            assert_eq!(
                rsmsg_send(a, m.as_ptr().cast(), 4),
                RSMSG_OK,
                "{}",
                last_error()
            );
        }
    });
    for i in 0..500u32 {
        assert_eq!(
            rsmsg_recv(b, buf.as_mut_ptr().cast(), 256, &mut n),
            RSMSG_OK
        );
        assert_eq!(&buf[..n], &i.to_le_bytes());
    }
    sender.join().unwrap();
    let mut st = rsmsg_stats::default();
    assert_eq!(rsmsg_stats_get(a, &mut st), RSMSG_OK);
    assert!(st.send_stalls > 0, "{st:?}");
    for c in [a, b] {
        assert_eq!(rsmsg_close(c), RSMSG_OK);
    }
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn launch_info_without_a_launcher_is_an_error_code() {
    // The test runner is not started by mpirun, srun or a PMI launcher.
    let launched = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let (mut r, mut s) = (7u32, 7u32);
    let rc = rsmsg_launch_info(&mut r, &mut s);
    if launched {
        assert_eq!(rc, RSMSG_OK);
        assert!(r < s);
    } else {
        assert_eq!(rc, RSMSG_ERR_LAUNCH);
        assert_eq!((r, s), (7, 7));
        assert!(last_error().contains("no launcher"), "{}", last_error());
    }
    let cfg = config();
    let mut m = rsmsg_mesh { id: 0 };
    assert_eq!(rsmsg_mesh_init_ranks(cfg, 3, 3, &mut m), RSMSG_ERR_LAUNCH);
    // A job size past the supported maximum is refused before anything is allocated for it.
    for size in [(1u32 << 20) + 1, u32::MAX] {
        assert_eq!(
            rsmsg_mesh_init_ranks(cfg, 0, size, &mut m),
            RSMSG_ERR_INVALID_ARG
        );
        assert!(last_error().contains("size"), "{}", last_error());
        assert_eq!(m.id, 0, "no handle is written on failure");
    }
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn a_call_failing_in_a_thread_exit_destructor_returns_its_code() {
    use std::sync::atomic::AtomicI32;
    static CODE: AtomicI32 = AtomicI32::new(1);
    struct CloseOnExit;
    impl Drop for CloseOnExit {
        fn drop(&mut self) {
            // A made-up handle: the call fails, and its detail has nowhere to go any more.
            CODE.store(rsmsg_close(rsmsg_conn { id: 0xdead }), Ordering::SeqCst);
        }
    }
    thread_local!(static LATE: CloseOnExit = const { CloseOnExit });
    thread::spawn(|| {
        // Registered before the library's last-error storage, so destroyed after it.
        LATE.with(|_| {});
        assert_ne!(rsmsg_close(rsmsg_conn { id: 0xbeef }), RSMSG_OK);
    })
    .join()
    .unwrap();
    let code = CODE.load(Ordering::SeqCst);
    assert!(code < 0, "{code}");
}

#[test]
fn freeing_a_listener_ends_an_accept_waiting_on_another_thread() {
    let cfg = config();
    let name = unique("capi-free-accept");
    let mut l = rsmsg_listener { id: 0 };
    assert_eq!(rsmsg_listen(cfg, name.as_ptr(), &mut l), RSMSG_OK);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = thread::spawn(move || {
        let _ = tx.send(());
        let mut c = rsmsg_conn { id: 0 };
        (rsmsg_accept(l, &mut c), last_error())
    });
    rx.recv().unwrap();
    // Give the accept time to begin waiting.
    thread::sleep(std::time::Duration::from_millis(200));
    // Freeing runs on a thread of its own, so that a free that waits for the accept (which
    // nobody will ever satisfy) fails the test instead of hanging it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(rsmsg_listener_free(l));
    });
    assert_eq!(
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("rsmsg_listener_free waited for an accept nobody would satisfy"),
        RSMSG_OK
    );
    let (rc, why) = waiting.join().unwrap();
    // Closed while it waited; on a machine so loaded that the accept began only after the
    // free, the handle is gone: either way it returned.
    assert!(
        rc == RSMSG_ERR_CLOSED || rc == RSMSG_ERR_BAD_HANDLE,
        "{rc}: {why}"
    );
    // The name is free again at once.
    let mut again = rsmsg_listener { id: 0 };
    assert_eq!(
        rsmsg_listen(cfg, name.as_ptr(), &mut again),
        RSMSG_OK,
        "{}",
        last_error()
    );
    assert_eq!(rsmsg_listener_free(again), RSMSG_OK);
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn out_pointers_that_overlap_a_buffer_or_each_other_are_refused() {
    let cfg = config();
    let (a, b) = pair(cfg);
    assert_eq!(rsmsg_send(a, b"kept".as_ptr().cast(), 4), RSMSG_OK);
    // `out_len` inside the receive buffer: both would be written through at once.
    let mut buf = [0usize; 4];
    let base = buf.as_mut_ptr();
    for i in 0..4 {
        // SAFETY: `i` < 4, inside `buf`.
        let inside = unsafe { base.add(i) };
        assert_eq!(
            rsmsg_recv(b, base.cast(), 4 * size_of::<usize>(), inside),
            RSMSG_ERR_INVALID_ARG
        );
        assert!(last_error().contains("out_len"), "{}", last_error());
    }
    // Just past the buffer is fine, and the message refused above was not lost.
    let mut bytes = [0u8; 8];
    let mut n = 0usize;
    assert_eq!(
        rsmsg_recv(b, bytes.as_mut_ptr().cast(), 8, &mut n),
        RSMSG_OK,
        "{}",
        last_error()
    );
    assert_eq!(&bytes[..n], b"kept");
    // The same pointer for the rank and the size.
    let mut x = 0u32;
    assert_eq!(rsmsg_launch_info(&mut x, &mut x), RSMSG_ERR_INVALID_ARG);
    for c in [a, b] {
        assert_eq!(rsmsg_close(c), RSMSG_OK);
    }
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}
