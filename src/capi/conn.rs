//! Configurations, listeners and connections.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;

use parking_lot::Mutex;

use super::{
    Error, Kind, Object, RSMSG_ERR_BUFFER_TOO_SMALL, RSMSG_ERR_CONFIG, RSMSG_ERR_INVALID_ARG,
    RSMSG_ERR_WOULD_BLOCK, ffi, in_bytes, in_str, out, recv_out, register, rsmsg_config,
    rsmsg_conn, rsmsg_listener, rsmsg_view, unregister, wait_of,
};
use crate::bootstrap::Token;
use crate::endpoint::{self, Config, Conn, Listener, Msg, TransportChoice};
use crate::mesh::Wait;
use crate::transport::PollMode;

/// A connection and the messages the C side holds on it.
///
/// The connection lives on the heap at a fixed address (`conn`, from `Box::into_raw`) so that
/// the messages, which borrow it, can be kept between calls with their lifetime widened to
/// `'static`; every message is dropped before the connection (see `Drop`).
pub(crate) struct ConnState {
    views: HashMap<u64, Msg<'static>>,
    /// A message that did not fit the caller's buffer, handed out again by the next receive.
    pending: Option<Msg<'static>>,
    conn: NonNull<Conn>,
}

// SAFETY: the messages in `views`/`pending` borrow only the connection behind `conn`, which this
// state owns; the state is only ever accessed under its `Mutex` (see `Object::Conn`), so the
// connection and its messages move between threads together and are never used by two threads
// at once. `Conn` itself is `Send`.
unsafe impl Send for ConnState {}

impl ConnState {
    fn new(conn: Conn) -> ConnState {
        ConnState {
            views: HashMap::new(),
            pending: None,
            conn: NonNull::from(Box::leak(Box::new(conn))),
        }
    }

    /// The connection, borrowed for as long as the messages taken from it may be kept.
    fn conn(&self) -> &'static Conn {
        // SAFETY: `conn` came from `Box::leak`, is never moved and is freed only in `Drop`,
        // after every message (the only holders of this reference beyond a call) is dropped.
        unsafe { self.conn.as_ref() }
    }

    fn next(&mut self, wait: Wait) -> Result<Msg<'static>, Error> {
        if let Some(m) = self.pending.take() {
            return Ok(m);
        }
        let c = self.conn();
        Ok(match wait {
            Wait::No => c
                .try_recv()?
                .ok_or_else(|| Error::new(RSMSG_ERR_WOULD_BLOCK, "no message has arrived"))?,
            Wait::For(d) => c.recv_timeout(d)?,
            Wait::Forever => c.recv()?,
        })
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.views.clear();
        self.pending = None;
        // SAFETY: `conn` came from `Box::leak` in `ConnState::new`; every message borrowing it
        // was dropped just above and no other reference outlives a call holding the lock.
        drop(unsafe { Box::from_raw(self.conn.as_ptr()) });
    }
}

/// Copies `msg` into `buf` and reports its length; when it does not fit, keeps it in `pending`.
pub(crate) fn deliver<M: std::ops::Deref<Target = [u8]>>(
    msg: M,
    buf: &mut [u8],
    out_len: &mut usize,
    pending: &mut Option<M>,
) -> Result<(), Error> {
    let n = msg.len();
    *out_len = n;
    if n > buf.len() {
        *pending = Some(msg);
        return Err(Error::new(
            RSMSG_ERR_BUFFER_TOO_SMALL,
            format!(
                "message of {n} bytes does not fit a buffer of {}; it stays queued",
                buf.len()
            ),
        ));
    }
    crate::copy::copy(&mut buf[..n], &msg);
    Ok(())
}

/// `object!(x = id, Kind)` binds `x` to the lock of the open object `id` of that kind (or
/// returns the lookup's error).
macro_rules! object {
    ($obj:ident = $id:expr, $kind:ident) => {
        let $obj = $crate::capi::lookup($id, $crate::capi::Kind::$kind)?;
        let $crate::capi::Object::$kind($obj) = &*$obj else {
            unreachable!("the registry keys carry the kind")
        };
    };
}
pub(crate) use object;

fn config_err(name: &str, reason: impl std::fmt::Display) -> Error {
    Error::new(RSMSG_ERR_CONFIG, format!("{name}: {reason}"))
}

/// Creates a configuration with the defaults (transport auto, default segment groups, busy
/// polling, no manager: peers found in the local socket directory).
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_new(out_cfg: *mut rsmsg_config) -> c_int {
    ffi(|| {
        let o = out(out_cfg, "out_cfg")?;
        o.id = register(Object::Config(Mutex::new(Config::default())));
        Ok(())
    })
}

/// Creates a configuration from the environment: `RSMSG_TRANSPORT` (auto, shm, verbs),
/// `RSMSG_GROUPS` (`SIZE:COUNT:SPAN[:SEGMENTS],...`), `RSMSG_POLL` (busy, event,
/// `adaptive[:SPINS]`), `RSMSG_MANAGER` (HOST:PORT) with `RSMSG_TOKEN`, and the verbs settings.
/// The rendezvous variables (`RSMSG_RNDV_*`, read by every connection when it is made) are
/// checked too. `RSMSG_ERR_CONFIG` naming the first malformed variable.
///
/// Thread safety: any thread (reads the environment: do not change it concurrently).
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_from_env(out_cfg: *mut rsmsg_config) -> c_int {
    ffi(|| {
        let o = out(out_cfg, "out_cfg")?;
        let c = Config::from_env()?;
        o.id = register(Object::Config(Mutex::new(c)));
        Ok(())
    })
}

/// Sets the transport: "auto", "shm" or "verbs".
///
/// Thread safety: any thread; calls on one configuration are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_set_transport(cfg: rsmsg_config, name: *const c_char) -> c_int {
    ffi(|| {
        let t: TransportChoice = in_str(name, "transport")?
            .parse()
            .map_err(|e| config_err("transport", e))?;
        object!(m = cfg.id, Config);
        let mut c = m.lock();
        *c = c.clone().transport(t);
        Ok(())
    })
}

/// Sets the segment groups offered for messages sent to endpoints made with this
/// configuration: `SIZE:COUNT:SPAN[:SEGMENTS],...` (as `RSMSG_GROUPS`).
///
/// Thread safety: any thread; calls on one configuration are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_set_groups(cfg: rsmsg_config, spec: *const c_char) -> c_int {
    ffi(|| {
        let layout = in_str(spec, "groups")?
            .parse()
            .map_err(|e| config_err("groups", e))?;
        object!(m = cfg.id, Config);
        let mut c = m.lock();
        *c = c.clone().layout(layout);
        Ok(())
    })
}

/// Sets the poll mode: `"busy"`, `"event"` or `"adaptive[:SPINS]"`.
///
/// Thread safety: any thread; calls on one configuration are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_set_poll(cfg: rsmsg_config, mode: *const c_char) -> c_int {
    ffi(|| {
        let p: PollMode = in_str(mode, "poll mode")?
            .parse()
            .map_err(|e| config_err("poll mode", e))?;
        object!(m = cfg.id, Config);
        let mut c = m.lock();
        *c = c.clone().poll(p);
        Ok(())
    })
}

/// Uses the bootstrap manager at `addr` ("HOST:PORT", nothing around it) with the shared
/// secret `token`. `RSMSG_ERR_INVALID_ARG` for an empty address, `RSMSG_ERR_CONFIG` for one
/// that is not HOST:PORT (whitespace around it included) or a token of the wrong length.
///
/// Thread safety: any thread; calls on one configuration are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_set_manager(
    cfg: rsmsg_config,
    addr: *const c_char,
    token: *const c_char,
) -> c_int {
    ffi(|| {
        let addr = in_str(addr, "manager address")?;
        if addr.is_empty() {
            return Err(Error::new(
                RSMSG_ERR_INVALID_ARG,
                "manager address is empty",
            ));
        }
        Config::check_manager_addr(addr)?;
        let token = Token::new(in_str(token, "token")?.as_bytes().to_vec())
            .map_err(|e| config_err("token", e))?;
        object!(m = cfg.id, Config);
        let mut c = m.lock();
        *c = c.clone().manager(addr, token);
        Ok(())
    })
}

/// Frees a configuration. Listeners, connections and meshes made with it are not affected.
/// A second free answers `RSMSG_ERR_BAD_HANDLE`.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_config_free(cfg: rsmsg_config) -> c_int {
    ffi(|| unregister(cfg.id, Kind::Config).map(drop))
}

/// Listens under `name` (1-64 bytes of `[A-Za-z0-9._-]`): peers connect with
/// `rsmsg_connect(cfg, name, ...)`. With a manager configured the name is registered there.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_listen(
    cfg: rsmsg_config,
    name: *const c_char,
    out_listener: *mut rsmsg_listener,
) -> c_int {
    ffi(|| {
        let o = out(out_listener, "out_listener")?;
        let name = in_str(name, "name")?;
        object!(m = cfg.id, Config);
        let config = m.lock().clone();
        let l = Listener::bind(&config, name)?;
        o.id = register(Object::Listener(l));
        Ok(())
    })
}

/// Waits for the next peer to connect and completes the handshake.
///
/// Thread safety: any thread; several threads may wait here on one listener (each connection
/// goes to one of them). `rsmsg_listener_free` on another thread makes a waiting call return
/// `RSMSG_ERR_CLOSED`.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_accept(listener: rsmsg_listener, out_conn: *mut rsmsg_conn) -> c_int {
    ffi(|| {
        let o = out(out_conn, "out_conn")?;
        object!(l = listener.id, Listener);
        let conn = l.accept()?;
        o.id = register(Object::Conn(Mutex::new(ConnState::new(conn))));
        Ok(())
    })
}

/// Stops listening and frees the listener; connections it accepted stay open. Returns once
/// the name is unregistered and the listener's threads have stopped (a bootstrap manager that
/// does not acknowledge the unregistration is given up on after 10 s); an `rsmsg_accept`
/// waiting on another thread returns `RSMSG_ERR_CLOSED`.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_listener_free(listener: rsmsg_listener) -> c_int {
    ffi(|| {
        let l = unregister(listener.id, Kind::Listener)?;
        if let Object::Listener(l) = &*l {
            // A concurrent accept may still hold the object: stop it now rather than when the
            // last holder lets go.
            l.close();
        }
        Ok(())
    })
}

/// Connects to the endpoint listening under `name`.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_connect(
    cfg: rsmsg_config,
    name: *const c_char,
    out_conn: *mut rsmsg_conn,
) -> c_int {
    ffi(|| {
        let o = out(out_conn, "out_conn")?;
        let name = in_str(name, "name")?;
        object!(m = cfg.id, Config);
        let config = m.lock().clone();
        let conn = endpoint::connect(&config, name)?;
        o.id = register(Object::Conn(Mutex::new(ConnState::new(conn))));
        Ok(())
    })
}

/// Sends `len` bytes (`len` > 0), waiting for free partitions while the receiver holds them all.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_send(conn: rsmsg_conn, buf: *const c_void, len: usize) -> c_int {
    ffi(|| {
        let bytes = in_bytes(buf, len)?;
        object!(m = conn.id, Conn);
        let st = m.lock();
        Ok(st.conn().send(bytes)?)
    })
}

/// Sends `len` bytes if partitions are free now; `RSMSG_ERR_WOULD_BLOCK` (nothing sent)
/// otherwise. A message above the switch point (`rsmsg_max_message`, or
/// `RSMSG_RNDV_THRESHOLD` when lower) goes by rendezvous: the receiver reads it from `buf`, so
/// the call returns only once it has (as `rsmsg_send` does).
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_try_send(conn: rsmsg_conn, buf: *const c_void, len: usize) -> c_int {
    ffi(|| {
        let bytes = in_bytes(buf, len)?;
        object!(m = conn.id, Conn);
        let st = m.lock();
        Ok(st.conn().try_send(bytes)?)
    })
}

fn recv_copy(
    conn: rsmsg_conn,
    buf: *mut c_void,
    cap: usize,
    out_len: *mut usize,
    wait: Result<Wait, Error>,
) -> c_int {
    ffi(|| {
        let (buf, len) = recv_out(buf, cap, out_len)?;
        let wait = wait?;
        object!(m = conn.id, Conn);
        let mut st = m.lock();
        let m = st.next(wait)?;
        deliver(m, buf, len, &mut st.pending)
    })
}

/// Waits for the next message and copies it into `buf` (`cap` bytes; `buf` may be NULL only
/// when `cap` is 0); `*out_len` gets its length. A message longer than `cap` is answered with
/// `RSMSG_ERR_BUFFER_TOO_SMALL`, its length in `*out_len`, and stays queued for the next
/// receive.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_recv(
    conn: rsmsg_conn,
    buf: *mut c_void,
    cap: usize,
    out_len: *mut usize,
) -> c_int {
    recv_copy(conn, buf, cap, out_len, Ok(Wait::Forever))
}

/// As `rsmsg_recv`, without waiting: `RSMSG_ERR_WOULD_BLOCK` when no message has arrived.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_try_recv(
    conn: rsmsg_conn,
    buf: *mut c_void,
    cap: usize,
    out_len: *mut usize,
) -> c_int {
    recv_copy(conn, buf, cap, out_len, Ok(Wait::No))
}

/// As `rsmsg_recv`, waiting at most `timeout_ms` milliseconds (> 0): `RSMSG_ERR_TIMEOUT` when
/// nothing came.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_recv_timeout(
    conn: rsmsg_conn,
    buf: *mut c_void,
    cap: usize,
    out_len: *mut usize,
    timeout_ms: u32,
) -> c_int {
    let wait = if timeout_ms == 0 {
        Err(Error::new(
            RSMSG_ERR_INVALID_ARG,
            "timeout of 0 ms (use rsmsg_try_recv)",
        ))
    } else {
        Ok(Wait::For(std::time::Duration::from_millis(
            timeout_ms.into(),
        )))
    };
    recv_copy(conn, buf, cap, out_len, wait)
}

/// Receives the next message in place (zero-copy) into `*out_view`: `timeout_ms` -1 waits as
/// long as it takes, 0 does not wait (`RSMSG_ERR_WOULD_BLOCK`), > 0 waits that long
/// (`RSMSG_ERR_TIMEOUT`). Release the view with `rsmsg_view_release`; until then its bytes
/// stay valid and its partitions stay with this receiver (hold few views at once: the sender
/// waits for them). Closing the connection releases every view (their pointers then dangle).
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_recv_view(
    conn: rsmsg_conn,
    timeout_ms: i64,
    out_view: *mut rsmsg_view,
) -> c_int {
    ffi(|| {
        let v = out(out_view, "out_view")?;
        let wait = wait_of(timeout_ms)?;
        object!(m = conn.id, Conn);
        let mut st = m.lock();
        let m = st.next(wait)?;
        *v = super::publish_view(&mut st.views, m);
        Ok(())
    })
}

/// Releases a view taken from this connection and clears `*view` (data NULL, len 0, id 0).
/// Releasing twice, or on another connection, answers `RSMSG_ERR_BAD_HANDLE`.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_view_release(conn: rsmsg_conn, view: *mut rsmsg_view) -> c_int {
    ffi(|| {
        let v = out(view, "view")?;
        super::check_id(v.id, Kind::View)?;
        object!(m = conn.id, Conn);
        let mut st = m.lock();
        let m = st.views.remove(&v.id).ok_or_else(|| {
            Error::new(
                super::RSMSG_ERR_BAD_HANDLE,
                format!(
                    "view {:#x} was already released or is not from this connection",
                    v.id
                ),
            )
        })?;
        drop(m);
        *v = rsmsg_view {
            data: std::ptr::null(),
            len: 0,
            id: 0,
        };
        Ok(())
    })
}

/// The largest message the connection sends eagerly (copied into the peer's partitions in one
/// write), in bytes. Larger messages go by rendezvous: the receiver reads them from the sender's
/// buffer, and a blocking send returns once it has.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_max_message(conn: rsmsg_conn, out_len: *mut usize) -> c_int {
    ffi(|| {
        let o = out(out_len, "out_len")?;
        object!(m = conn.id, Conn);
        *o = m.lock().conn().max_message();
        Ok(())
    })
}

/// Counters of a connection.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct rsmsg_stats {
    /// Messages sent (data and control).
    pub sent_messages: u64,
    /// Payload bytes sent.
    pub sent_bytes: u64,
    /// Sends that found no free partition (back-pressure).
    pub send_stalls: u64,
    /// Messages received (data and control).
    pub received_messages: u64,
    /// Payload bytes received.
    pub received_bytes: u64,
    /// Messages released by this side.
    pub releases: u64,
    /// Received messages not yet released (views held, pending).
    pub held: u64,
}

impl rsmsg_stats {
    pub(crate) fn from(s: &crate::transport::ConnectionStats, held: usize) -> Self {
        rsmsg_stats {
            sent_messages: s.sender.messages,
            sent_bytes: s.sender.bytes,
            send_stalls: s.sender.credit_stalls,
            received_messages: s.receiver.messages,
            received_bytes: s.receiver.bytes,
            releases: s.receiver.releases,
            held: held as u64,
        }
    }
}

/// Fills `*out_stats` with the connection's counters.
///
/// Thread safety: any thread; calls on one connection are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_stats_get(conn: rsmsg_conn, out_stats: *mut rsmsg_stats) -> c_int {
    ffi(|| {
        let o = out(out_stats, "out_stats")?;
        object!(m = conn.id, Conn);
        let st = m.lock();
        let held = st.views.len() + usize::from(st.pending.is_some());
        *o = rsmsg_stats::from(&st.conn().stats(), held);
        Ok(())
    })
}

/// Closes the connection (the peer's receives then answer `RSMSG_ERR_CLOSED`), releases its
/// views and frees the handle: later calls with it answer `RSMSG_ERR_BAD_HANDLE`.
///
/// Thread safety: any thread; waits for a call in progress on the same connection.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_close(conn: rsmsg_conn) -> c_int {
    ffi(|| {
        let obj = unregister(conn.id, Kind::Conn)?;
        if let Object::Conn(m) = &*obj {
            let mut st = m.lock();
            st.views.clear();
            st.pending = None;
            st.conn().close();
        }
        Ok(())
    })
}
