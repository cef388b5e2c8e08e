//! The C ABI (`include/rsmsg.h`, generated from this module by cbindgen in `build.rs`).
//!
//! # Design
//! - Every object the C side holds is a *handle*: a small struct around a 64-bit id, never a
//!   pointer. The id carries the object's kind in its top byte and a counter that is never
//!   reused below it, and every call looks it up in a registry. A closed or freed handle, a
//!   handle of another kind, or a made-up value is answered with [`RSMSG_ERR_BAD_HANDLE`] or
//!   [`RSMSG_ERR_WRONG_KIND`], never with undefined behaviour.
//! - Every function returns an `int`: [`RSMSG_OK`] (0) or a negative `RSMSG_ERR_*` code;
//!   [`rsmsg_strerror`] names a code, [`rsmsg_last_error`] gives the detail of the calling
//!   thread's last failure.
//! - Every pointer and length is checked (null, zero where zero makes no sense, ranges that
//!   overflow the address space); strings are NUL-terminated UTF-8 of at most 4096 bytes.
//! - No panic crosses the boundary: every entry point runs under `catch_unwind` and a panic is
//!   answered with [`RSMSG_ERR_INTERNAL`].
//! - Each object is guarded by its own lock: calls on one object from several threads are
//!   serialized (a call blocked in a receive holds its connection until it returns); calls on
//!   different objects run in parallel.

mod conn;
mod mesh;

pub use conn::*;
pub use mesh::*;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;

use crate::endpoint::{Config, EndpointError, Listener};
use crate::mesh::{MeshError, Wait};
use crate::transport::{SendError, TransportError};

/// Success.
pub const RSMSG_OK: c_int = 0;
/// A pointer argument is NULL.
pub const RSMSG_ERR_NULL: c_int = -1;
/// An argument is invalid: a zero or overflowing length, a bad string, an out-of-range value.
pub const RSMSG_ERR_INVALID_ARG: c_int = -2;
/// The handle is not open: never issued, already closed or freed (stale).
pub const RSMSG_ERR_BAD_HANDLE: c_int = -3;
/// The handle is of another kind (a listener where a connection is expected, ...).
pub const RSMSG_ERR_WRONG_KIND: c_int = -4;
/// Nothing can be done without waiting: no free partitions (send), no message (receive).
pub const RSMSG_ERR_WOULD_BLOCK: c_int = -5;
/// Nothing arrived before the timeout.
pub const RSMSG_ERR_TIMEOUT: c_int = -6;
/// The message is larger than the largest one the connection carries.
pub const RSMSG_ERR_TOO_LARGE: c_int = -7;
/// The caller's buffer is too small: the message stays queued and its length is reported.
pub const RSMSG_ERR_BUFFER_TOO_SMALL: c_int = -8;
/// The connection is closed (by the peer, or by a failure earlier).
pub const RSMSG_ERR_CLOSED: c_int = -9;
/// A configuration value is invalid (environment variable or setter).
pub const RSMSG_ERR_CONFIG: c_int = -10;
/// The bootstrap manager could not be reached or refused.
pub const RSMSG_ERR_BOOTSTRAP: c_int = -11;
/// The transport failed (handshake, shared memory, verbs).
pub const RSMSG_ERR_TRANSPORT: c_int = -12;
/// The peer broke the protocol.
pub const RSMSG_ERR_PROTOCOL: c_int = -13;
/// No launcher environment (mpirun, srun, PMI) or a malformed one.
pub const RSMSG_ERR_LAUNCH: c_int = -14;
/// An internal error (a bug): the call was abandoned.
pub const RSMSG_ERR_INTERNAL: c_int = -15;
/// The receiver refused a large (rendezvous) message: longer than it accepts, or it cannot read
/// it; the connection stays usable.
pub const RSMSG_ERR_REFUSED: c_int = -16;

/// Timeout value for "wait as long as it takes".
pub const RSMSG_WAIT_FOREVER: i64 = -1;

/// Longest string argument accepted, NUL excluded.
const MAX_STR: usize = 4096;

/// A configuration: transport, segment groups, poll mode, bootstrap manager.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rsmsg_config {
    /// Opaque id; 0 is never a valid handle.
    pub id: u64,
}

/// A listening endpoint.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rsmsg_listener {
    /// Opaque id; 0 is never a valid handle.
    pub id: u64,
}

/// A connection to one peer.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rsmsg_conn {
    /// Opaque id; 0 is never a valid handle.
    pub id: u64,
}

/// A job's full mesh: a connection to every other rank.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rsmsg_mesh {
    /// Opaque id; 0 is never a valid handle.
    pub id: u64,
}

/// A received message read in place (zero-copy): `data[0..len]` stays valid and unchanged until
/// the view is released (or its connection or mesh closed); its partitions go back to the sender
/// only then.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rsmsg_view {
    /// First byte of the message.
    pub data: *const u8,
    /// Length in bytes.
    pub len: usize,
    /// Opaque id of the view; 0 once released.
    pub id: u64,
}

/// Kinds of handle, in the top byte of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Config = 1,
    Listener = 2,
    Conn = 3,
    Mesh = 4,
    View = 5,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Listener => "listener",
            Kind::Conn => "connection",
            Kind::Mesh => "mesh",
            Kind::View => "view",
        }
    }
    fn of(id: u64) -> Option<Kind> {
        Some(match id >> 56 {
            1 => Kind::Config,
            2 => Kind::Listener,
            3 => Kind::Conn,
            4 => Kind::Mesh,
            5 => Kind::View,
            _ => return None,
        })
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new id of `kind`; ids are never reused (2^56 of them).
fn new_id(kind: Kind) -> u64 {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed) & ((1 << 56) - 1);
    ((kind as u64) << 56) | n
}

/// The objects behind handles.
enum Object {
    Config(Mutex<Config>),
    Listener(Listener),
    Conn(Mutex<conn::ConnState>),
    Mesh(Mutex<mesh::MeshState>),
}

impl Object {
    fn kind(&self) -> Kind {
        match self {
            Object::Config(_) => Kind::Config,
            Object::Listener(_) => Kind::Listener,
            Object::Conn(_) => Kind::Conn,
            Object::Mesh(_) => Kind::Mesh,
        }
    }
}

static REGISTRY: LazyLock<Mutex<HashMap<u64, Arc<Object>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn register(obj: Object) -> u64 {
    let id = new_id(obj.kind());
    REGISTRY.lock().insert(id, Arc::new(obj));
    id
}

/// Hands out a zero-copy view of `msg`: a fresh view id, recorded in `views` until released.
fn publish_view<M: std::ops::Deref<Target = [u8]>>(
    views: &mut std::collections::HashMap<u64, M>,
    msg: M,
) -> rsmsg_view {
    let id = new_id(Kind::View);
    let v = rsmsg_view {
        data: msg.as_ptr(),
        len: msg.len(),
        id,
    };
    views.insert(id, msg);
    v
}

fn check_id(id: u64, want: Kind) -> Result<(), Error> {
    if id == 0 {
        return Err(Error::new(
            RSMSG_ERR_BAD_HANDLE,
            format!("{} handle is 0 (never opened)", want.name()),
        ));
    }
    match Kind::of(id) {
        Some(k) if k == want => Ok(()),
        Some(k) => Err(Error::new(
            RSMSG_ERR_WRONG_KIND,
            format!(
                "a {} handle was passed where a {} is expected",
                k.name(),
                want.name()
            ),
        )),
        None => Err(Error::new(
            RSMSG_ERR_BAD_HANDLE,
            format!("{id:#x} is not an rsmsg handle"),
        )),
    }
}

fn stale(id: u64, want: Kind) -> Error {
    let n = id & ((1 << 56) - 1);
    let detail = if n < NEXT_ID.load(Ordering::Relaxed) {
        format!("{} handle {id:#x} was closed or freed", want.name())
    } else {
        format!("{} handle {id:#x} was never opened", want.name())
    };
    Error::new(RSMSG_ERR_BAD_HANDLE, detail)
}

/// Looks a handle up.
fn lookup(id: u64, want: Kind) -> Result<Arc<Object>, Error> {
    check_id(id, want)?;
    REGISTRY
        .lock()
        .get(&id)
        .cloned()
        .ok_or_else(|| stale(id, want))
}

/// Takes a handle out of the registry (close or free); later lookups fail.
fn unregister(id: u64, want: Kind) -> Result<Arc<Object>, Error> {
    check_id(id, want)?;
    REGISTRY.lock().remove(&id).ok_or_else(|| stale(id, want))
}

/// A failure answered to C: a code and a detail for [`rsmsg_last_error`].
#[derive(Debug)]
pub(crate) struct Error {
    code: c_int,
    detail: String,
}

impl Error {
    fn new(code: c_int, detail: impl Into<String>) -> Error {
        Error {
            code,
            detail: detail.into(),
        }
    }
}

fn transport_code(e: &TransportError) -> c_int {
    match e {
        TransportError::Timeout(_) => RSMSG_ERR_TIMEOUT,
        TransportError::PeerClosed | TransportError::Failed(_) => RSMSG_ERR_CLOSED,
        TransportError::Protocol(_) => RSMSG_ERR_PROTOCOL,
        TransportError::Bootstrap(_) => RSMSG_ERR_BOOTSTRAP,
        TransportError::Config(_) => RSMSG_ERR_CONFIG,
        _ => RSMSG_ERR_TRANSPORT,
    }
}

fn send_code(e: &SendError) -> c_int {
    match e {
        SendError::WouldBlock => RSMSG_ERR_WOULD_BLOCK,
        SendError::TooLarge { .. } => RSMSG_ERR_TOO_LARGE,
        SendError::Refused { .. } => RSMSG_ERR_REFUSED,
        SendError::Transport(t) => transport_code(t),
    }
}

fn endpoint_code(e: &EndpointError) -> c_int {
    match e {
        EndpointError::Config { .. } | EndpointError::Layout(_) => RSMSG_ERR_CONFIG,
        EndpointError::Bootstrap(_) => RSMSG_ERR_BOOTSTRAP,
        EndpointError::Transport(t) | EndpointError::PeerFailed { source: t, .. } => {
            transport_code(t)
        }
        EndpointError::ConnSend(s) | EndpointError::Send { source: s, .. } => send_code(s),
        _ => RSMSG_ERR_TRANSPORT,
    }
}

fn mesh_code(e: &MeshError) -> c_int {
    match e {
        MeshError::NoLauncher | MeshError::Launch(_) => RSMSG_ERR_LAUNCH,
        MeshError::Config { .. } => RSMSG_ERR_CONFIG,
        MeshError::Endpoint { source, .. } => endpoint_code(source),
        MeshError::Manager(_) => RSMSG_ERR_BOOTSTRAP,
        MeshError::SetupTimeout(..) => RSMSG_ERR_TIMEOUT,
        MeshError::Protocol { .. } => RSMSG_ERR_PROTOCOL,
        MeshError::BadRank { .. } => RSMSG_ERR_INVALID_ARG,
        MeshError::Send { source, .. } => send_code(source),
        MeshError::Recv { source, .. } => transport_code(source),
        MeshError::BarrierBacklog { .. } => RSMSG_ERR_WOULD_BLOCK,
    }
}

/// Error detail with its causes, for [`rsmsg_last_error`].
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Error {
        Error::new(transport_code(&e), chain(&e))
    }
}
impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        Error::new(send_code(&e), chain(&e))
    }
}
impl From<EndpointError> for Error {
    fn from(e: EndpointError) -> Error {
        Error::new(endpoint_code(&e), chain(&e))
    }
}
impl From<MeshError> for Error {
    fn from(e: MeshError) -> Error {
        Error::new(mesh_code(&e), chain(&e))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Keeps `detail` for [`rsmsg_last_error`]. Outside any `catch_unwind`, so it must not panic:
/// a call that fails from a thread-exit destructor, after this thread's storage is gone, keeps
/// no detail (`try_with`) instead of aborting the process.
fn set_last_error(detail: &str) {
    let c = CString::new(detail.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = c);
}

/// Runs one entry point: its result as a code, its failure's detail kept for
/// [`rsmsg_last_error`], a panic caught and answered with [`RSMSG_ERR_INTERNAL`].
fn ffi(f: impl FnOnce() -> Result<(), Error>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => RSMSG_OK,
        Ok(Err(e)) => {
            set_last_error(&e.detail);
            e.code
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (please report): {msg}"));
            RSMSG_ERR_INTERNAL
        }
    }
}

/// Checks an output pointer.
fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Error> {
    if p.is_null() {
        return Err(Error::new(RSMSG_ERR_NULL, format!("{what} is NULL")));
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::new(
            RSMSG_ERR_INVALID_ARG,
            format!("{what} is misaligned"),
        ));
    }
    // SAFETY: non-null and aligned (checked above); the caller guarantees it points to a
    // writable `T` for the duration of the call (the header's contract for every out pointer).
    Ok(unsafe { &mut *p })
}

/// Checks that `[p, p + len)` is a plausible range: non-null, in the address space, within
/// `isize::MAX` (the limit of a Rust slice).
fn check_range(p: usize, len: usize, what: &str) -> Result<(), Error> {
    if len > isize::MAX as usize || p.checked_add(len).is_none() {
        return Err(Error::new(
            RSMSG_ERR_INVALID_ARG,
            format!("{what}: length {len} overflows the address space"),
        ));
    }
    Ok(())
}

/// Checks a message to send: non-null, non-empty, not overflowing.
fn in_bytes<'a>(p: *const c_void, len: usize) -> Result<&'a [u8], Error> {
    if p.is_null() {
        return Err(Error::new(RSMSG_ERR_NULL, "message buffer is NULL"));
    }
    if len == 0 {
        return Err(Error::new(
            RSMSG_ERR_INVALID_ARG,
            "message length is 0 (empty messages are not sent)",
        ));
    }
    check_range(p as usize, len, "message buffer")?;
    // SAFETY: non-null, `len` bytes that do not wrap the address space and fit a slice
    // (checked above); the caller guarantees they are readable and not written during the call.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// Checks a receive buffer: NULL only with capacity 0.
fn out_bytes<'a>(p: *mut c_void, cap: usize) -> Result<&'a mut [u8], Error> {
    if cap == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Error::new(
            RSMSG_ERR_NULL,
            format!("receive buffer is NULL with capacity {cap}"),
        ));
    }
    check_range(p as usize, cap, "receive buffer")?;
    // SAFETY: non-null, `cap` bytes that do not wrap and fit a slice (checked above); the caller
    // guarantees they are writable and not accessed otherwise during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), cap) })
}

/// Whether the byte ranges `[a, a + a_len)` and `[b, b + b_len)` overlap (each checked not to
/// wrap by its own check first).
fn overlap(a: usize, a_len: usize, b: usize, b_len: usize) -> bool {
    a_len != 0 && b_len != 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// The receive buffer and the length out pointer of a copying receive: checked as [`out_bytes`]
/// and [`out`] check them, and not overlapping (two `&mut` to one byte would be undefined
/// behaviour; C callers get `RSMSG_ERR_INVALID_ARG`).
fn recv_out<'a>(
    buf: *mut c_void,
    cap: usize,
    out_len: *mut usize,
) -> Result<(&'a mut [u8], &'a mut usize), Error> {
    if cap != 0
        && !out_len.is_null()
        && overlap(
            buf as usize,
            cap,
            out_len as usize,
            std::mem::size_of::<usize>(),
        )
    {
        return Err(Error::new(
            RSMSG_ERR_INVALID_ARG,
            "out_len points into the receive buffer",
        ));
    }
    let len = out(out_len, "out_len")?;
    let buf = out_bytes(buf, cap)?;
    Ok((buf, len))
}

/// Checks a string argument: non-null, NUL within [`MAX_STR`] bytes, UTF-8.
fn in_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(Error::new(RSMSG_ERR_NULL, format!("{what} is NULL")));
    }
    let mut n = 0usize;
    loop {
        if n > MAX_STR {
            return Err(Error::new(
                RSMSG_ERR_INVALID_ARG,
                format!("{what} is longer than {MAX_STR} bytes or not NUL-terminated"),
            ));
        }
        // SAFETY: the caller guarantees a NUL-terminated string; we read byte by byte and stop
        // at the first NUL, never past it.
        if unsafe { *p.add(n) } == 0 {
            break;
        }
        n += 1;
    }
    // SAFETY: the `n` bytes before the NUL were just read above and are readable.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) };
    std::str::from_utf8(bytes)
        .map_err(|_| Error::new(RSMSG_ERR_INVALID_ARG, format!("{what} is not UTF-8")))
}

/// A timeout in milliseconds: -1 forever, 0 no wait, > 0 that long.
fn wait_of(timeout_ms: i64) -> Result<Wait, Error> {
    match timeout_ms {
        RSMSG_WAIT_FOREVER => Ok(Wait::Forever),
        0 => Ok(Wait::No),
        t if t > 0 => Ok(Wait::For(Duration::from_millis(t as u64))),
        t => Err(Error::new(
            RSMSG_ERR_INVALID_ARG,
            format!("timeout {t} ms (use -1 for forever, 0 for no wait)"),
        )),
    }
}

/// The name of an error code (a static string; unknown codes get a generic text).
///
/// Thread safety: any thread, any time.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_strerror(code: c_int) -> *const c_char {
    let s: &'static std::ffi::CStr = match code {
        RSMSG_OK => c"success",
        RSMSG_ERR_NULL => c"a pointer argument is NULL",
        RSMSG_ERR_INVALID_ARG => c"invalid argument",
        RSMSG_ERR_BAD_HANDLE => c"handle not open (never opened, closed or freed)",
        RSMSG_ERR_WRONG_KIND => c"handle of the wrong kind",
        RSMSG_ERR_WOULD_BLOCK => c"operation would block",
        RSMSG_ERR_TIMEOUT => c"timed out",
        RSMSG_ERR_TOO_LARGE => c"message too large for the connection",
        RSMSG_ERR_BUFFER_TOO_SMALL => c"buffer too small (message kept; its length reported)",
        RSMSG_ERR_CLOSED => c"connection closed",
        RSMSG_ERR_CONFIG => c"invalid configuration",
        RSMSG_ERR_BOOTSTRAP => c"bootstrap manager error",
        RSMSG_ERR_TRANSPORT => c"transport error",
        RSMSG_ERR_PROTOCOL => c"peer broke the protocol",
        RSMSG_ERR_LAUNCH => c"no usable launcher environment (mpirun, srun, PMI)",
        RSMSG_ERR_INTERNAL => c"internal error",
        RSMSG_ERR_REFUSED => c"the receiver refused the message",
        _ => c"unknown rsmsg error code",
    };
    s.as_ptr()
}

/// The detail of the calling thread's last failed call (NUL-terminated, empty if none). The
/// string belongs to the library and stays valid until the next failing call on this thread;
/// successful calls leave it unchanged.
///
/// Thread safety: any thread; each thread has its own.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_last_error() -> *const c_char {
    // The pointer stays valid: the CString is only replaced by a later failing call on this
    // same thread (the thread-local lives as long as the thread).
    catch_unwind(|| LAST_ERROR.with(|l| l.borrow().as_ptr())).unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_kind_and_are_unique() {
        let a = new_id(Kind::Conn);
        let b = new_id(Kind::Conn);
        assert_ne!(a, b);
        assert_eq!(Kind::of(a), Some(Kind::Conn));
        assert!(check_id(a, Kind::Conn).is_ok());
        assert_eq!(
            check_id(a, Kind::Mesh).unwrap_err().code,
            RSMSG_ERR_WRONG_KIND
        );
        assert_eq!(
            check_id(0, Kind::Mesh).unwrap_err().code,
            RSMSG_ERR_BAD_HANDLE
        );
        assert_eq!(
            check_id(7, Kind::Mesh).unwrap_err().code,
            RSMSG_ERR_BAD_HANDLE
        );
    }

    #[test]
    fn timeouts() {
        assert_eq!(wait_of(-1).unwrap(), Wait::Forever);
        assert_eq!(wait_of(0).unwrap(), Wait::No);
        assert_eq!(wait_of(5).unwrap(), Wait::For(Duration::from_millis(5)));
        assert_eq!(wait_of(-2).unwrap_err().code, RSMSG_ERR_INVALID_ARG);
    }

    #[test]
    fn ranges() {
        assert!(check_range(usize::MAX - 1, 4, "x").is_err());
        assert!(check_range(16, isize::MAX as usize + 1, "x").is_err());
        assert!(check_range(16, 4, "x").is_ok());
    }
}
