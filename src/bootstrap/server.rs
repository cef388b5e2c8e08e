//! The manager: a threaded TCP service, embedded ([`Manager::bind`]) or standalone ([`run`]).
//!
//! One thread accepts connections (non-blocking, polled, so that shutdown is prompt); each client
//! gets a thread of its own, up to [`Limits::max_clients`]. All state sits behind one mutex with
//! one condition variable that long polls wait on.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tracing::{debug, info, info_span, warn};

use super::auth::{Token, nonce};
use super::error::BootstrapError;
use super::frame_io::{ReadError, read_frame, write_frame};
use super::wire::{
    DecodeError, Descriptors, EndpointInfo, EndpointName, ErrorCode, MAX_PAYLOAD, MAX_TEXT_LEN,
    Message, RendezvousId, SegmentDescriptor, Side, VERSION,
};

/// The manager's resource limits and timeouts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Most clients served at once; more are answered `Busy` and closed.
    pub max_clients: usize,
    /// Most clients not yet authenticated at once (within `max_clients`); more are answered
    /// `Busy` and closed, so that silent or slow connections hold few threads and sockets.
    pub max_unauthenticated: usize,
    /// Most registered endpoints.
    pub max_endpoints: usize,
    /// Most names one client connection may register.
    pub max_names_per_client: usize,
    /// Most rendezvous alive at once.
    pub max_rendezvous: usize,
    /// Most connection requests waiting for one listener.
    pub max_pending_per_endpoint: usize,
    /// Most undelivered descriptor messages queued for one side of a rendezvous.
    pub max_queued_per_side: usize,
    /// Most bytes of descriptors (connection offers and sent messages) queued undelivered in
    /// all, each counted by its heap footprint ([`queued_footprint`]).
    pub max_queued_bytes: usize,
    /// Most of those bytes one client connection may have queued (counted against the sender
    /// until delivered or discarded), so that no one client takes the whole budget.
    pub max_queued_bytes_per_client: usize,
    /// Time a new client has to complete authentication.
    pub handshake_timeout: Duration,
    /// Time a frame has to arrive completely once its first byte arrived.
    pub frame_timeout: Duration,
    /// Longest silence between requests of an authenticated client.
    pub idle_timeout: Duration,
    /// Time a reply has to be written.
    pub write_timeout: Duration,
    /// A rendezvous without activity for this long is discarded.
    pub rendezvous_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clients: 256,
            max_unauthenticated: 32,
            max_endpoints: 4096,
            max_names_per_client: 64,
            max_rendezvous: 4096,
            max_pending_per_endpoint: 64,
            max_queued_per_side: 16,
            max_queued_bytes: 64 << 20,
            max_queued_bytes_per_client: 8 << 20,
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(5),
            rendezvous_ttl: Duration::from_secs(120),
        }
    }
}

/// Configuration of a standalone manager ([`run`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ManagerConfig {
    /// The address to listen on, e.g. `0.0.0.0:7470`.
    pub listen: String,
    /// The shared secret clients must prove they hold.
    pub token: Token,
    /// Limits and timeouts.
    pub limits: Limits,
}

impl ManagerConfig {
    /// A configuration with default limits.
    pub fn new(listen: impl Into<String>, token: Token) -> Self {
        Self {
            listen: listen.into(),
            token,
            limits: Limits::default(),
        }
    }

    /// The configuration `rsmsg manager --listen ADDR [--token T | --token-file F]` describes:
    /// the token comes from `token`, else `token_file`, else `RSMSG_TOKEN`
    /// ([`Token::resolve`]).
    ///
    /// # Errors
    /// [`BootstrapError::Token`] when no usable token is found.
    pub fn from_cli(
        listen: &str,
        token: Option<&str>,
        token_file: Option<&std::path::Path>,
    ) -> Result<Self, BootstrapError> {
        Ok(Self::new(listen, Token::resolve(token, token_file)?))
    }
}

/// The default TCP port of a standalone manager.
pub const DEFAULT_PORT: u16 = 7470;

/// Runs a manager in the calling thread until the process ends (`rsmsg manager`).
///
/// # Errors
/// The address cannot be bound or a thread cannot be started.
pub fn run(config: ManagerConfig) -> Result<(), BootstrapError> {
    let handle = Manager::bind_with(config.listen.as_str(), config.token, config.limits)?;
    handle.join();
    Ok(())
}

/// Entry points of an embedded manager.
#[derive(Debug)]
#[non_exhaustive]
pub struct Manager;

impl Manager {
    /// Binds `addr` and serves on a background thread with default [`Limits`].
    ///
    /// # Errors
    /// [`BootstrapError::Bind`] when the address cannot be bound.
    pub fn bind(addr: impl ToSocketAddrs, token: Token) -> Result<ManagerHandle, BootstrapError> {
        Self::bind_with(addr, token, Limits::default())
    }

    /// Binds `addr` and serves on a background thread with the given limits.
    ///
    /// # Errors
    /// [`BootstrapError::Bind`] when the address cannot be bound, [`BootstrapError::Thread`]
    /// when the thread cannot be started.
    pub fn bind_with(
        addr: impl ToSocketAddrs,
        token: Token,
        limits: Limits,
    ) -> Result<ManagerHandle, BootstrapError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| BootstrapError::Bind {
                addr: "(unresolvable)".into(),
                source,
            })?
            .collect();
        let shown = addrs
            .first()
            .map_or_else(|| "(no address)".to_string(), ToString::to_string);
        let bind_err = |source| BootstrapError::Bind {
            addr: shown.clone(),
            source,
        };
        let listener = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let shared = Arc::new(Shared {
            token,
            limits,
            budget: Arc::new(Budget::default()),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            clients: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("rsmsg-manager".into())
            .spawn(move || accept_loop(&s, &listener))
            .map_err(|source| BootstrapError::Thread {
                what: "manager accept",
                source,
            })?;
        info!(addr = %local_addr, version = VERSION, "bootstrap manager listening");
        Ok(ManagerHandle {
            local_addr,
            shared,
            thread: Some(thread),
        })
    }
}

/// A running manager. Dropping it shuts the manager down (as [`ManagerHandle::shutdown`]).
#[derive(Debug)]
pub struct ManagerHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ManagerHandle {
    /// The address the manager listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The number of clients connected now.
    pub fn client_count(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// The number of rendezvous (connection attempts) the manager holds.
    pub fn rendezvous_count(&self) -> usize {
        self.shared.state.lock().rendezvous.len()
    }

    /// The bytes of descriptors queued undelivered now (see [`Limits::max_queued_bytes`]).
    pub fn queued_bytes(&self) -> usize {
        self.shared.budget.total()
    }

    /// The number of registered endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.shared.state.lock().endpoints.len()
    }

    /// Stops accepting, closes every client connection (long polls are answered
    /// `ShuttingDown` where the socket still allows), and waits for all threads to end.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Serves until the process ends: nothing can shut the manager down once its handle is
    /// given to `join`. [`run`] uses this for the standalone manager.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.state.lock();
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            info!(addr = %self.local_addr, "bootstrap manager stopped");
        }
    }
}

impl Drop for ManagerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
struct Shared {
    token: Token,
    limits: Limits,
    /// Bytes of queued descriptors. Its lock is taken inside the state lock, never around it.
    budget: Arc<Budget>,
    state: Mutex<State>,
    changed: Condvar,
    shutdown: AtomicBool,
    /// Clones of every client socket, to unblock their threads on shutdown.
    clients: Mutex<HashMap<u64, TcpStream>>,
    active: AtomicUsize,
    /// Clients admitted whose handshake has not finished.
    unauthenticated: AtomicUsize,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<EndpointName, Registration>,
    rendezvous: HashMap<u64, Rendezvous>,
    next_id: u64,
}

#[derive(Debug)]
struct Registration {
    info: EndpointInfo,
    owner: u64,
    pending: VecDeque<u64>,
}

#[derive(Debug)]
struct Rendezvous {
    from: EndpointInfo,
    listener: EndpointName,
    /// The client connection holding each side, indexed by side: the one that sent the request
    /// and the listener's registration owner, the only connection `WaitConnect` hands the
    /// request to. Send, recv and close on a side come only from its connection.
    conns: [u64; 2],
    /// Messages waiting for each side, indexed by the receiving side.
    queues: [VecDeque<Queued>; 2],
    /// Close reason of each side, indexed by the closing side.
    closed: [Option<String>; 2],
    /// Whether the listener has taken the request.
    accepted: bool,
    /// Long polls waiting on this rendezvous now; it does not expire while one waits.
    waiters: u32,
    last_activity: Instant,
}

/// A message waiting at the manager, with the budget it holds until it is dropped.
#[derive(Debug)]
struct Queued {
    payload: Descriptors,
    _charge: Charge,
}

/// The bytes a queued [`Descriptors`] counts against [`Limits::max_queued_bytes`]: its heap
/// footprint, i.e. the queue entry itself plus the capacity of its vectors. This is at least
/// its encoded length (a 34-byte wire segment takes more in memory) and at most about 14.5 KiB
/// (256 segments and a 4 KiB opaque blob, the most a frame can carry).
pub fn queued_footprint(d: &Descriptors) -> usize {
    size_of::<Queued>()
        + d.segments.capacity() * size_of::<SegmentDescriptor>()
        + d.opaque.capacity()
}

/// The bytes of queued descriptors, in all and per sending connection.
#[derive(Debug, Default)]
struct Budget {
    inner: Mutex<BudgetInner>,
}

#[derive(Debug, Default)]
struct BudgetInner {
    total: usize,
    per_client: HashMap<u64, usize>,
}

/// Bytes taken from the [`Budget`] for one queued message; dropping it gives them back, so
/// that every way a message leaves the manager (delivered, or discarded with its rendezvous
/// or registration) releases exactly what was taken, once.
#[derive(Debug)]
struct Charge {
    budget: Arc<Budget>,
    conn: u64,
    bytes: usize,
}

impl Budget {
    fn total(&self) -> usize {
        self.inner.lock().total
    }

    /// Takes `bytes` for a message `conn` queues, or says which limit refuses it (the text of
    /// a `LimitExceeded` reply).
    fn charge(
        self: &Arc<Self>,
        limits: &Limits,
        conn: u64,
        bytes: usize,
    ) -> Result<Charge, String> {
        let mut b = self.inner.lock();
        let mine = b.per_client.get(&conn).copied().unwrap_or(0);
        if mine.saturating_add(bytes) > limits.max_queued_bytes_per_client {
            return Err(format!(
                "this client has {mine} bytes of descriptors queued undelivered; {bytes} more \
                 would pass its limit of {}",
                limits.max_queued_bytes_per_client
            ));
        }
        if b.total.saturating_add(bytes) > limits.max_queued_bytes {
            return Err(format!(
                "the manager holds {} bytes of descriptors queued undelivered; {bytes} more \
                 would pass its limit of {}",
                b.total, limits.max_queued_bytes
            ));
        }
        b.total += bytes;
        *b.per_client.entry(conn).or_insert(0) += bytes;
        Ok(Charge {
            budget: Arc::clone(self),
            conn,
            bytes,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut b = self.budget.inner.lock();
        debug_assert!(b.total >= self.bytes, "queued byte count underflow");
        b.total = b.total.saturating_sub(self.bytes);
        if let Entry::Occupied(mut e) = b.per_client.entry(self.conn) {
            debug_assert!(
                *e.get() >= self.bytes,
                "per-client queued byte count underflow"
            );
            *e.get_mut() = e.get().saturating_sub(self.bytes);
            if *e.get() == 0 {
                e.remove();
            }
        } else {
            debug_assert!(false, "a charge without its client's count");
        }
    }
}

fn ix(side: Side) -> usize {
    match side {
        Side::Initiator => 0,
        Side::Listener => 1,
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> Message {
    let mut message = message.into();
    if message.len() > MAX_TEXT_LEN {
        let mut cut = MAX_TEXT_LEN;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Message::Error { code, message }
}

/// How long a connection closed after an error keeps draining its input.
const LINGER: Duration = Duration::from_millis(200);
const ACCEPT_POLL: Duration = Duration::from_millis(20);
const REAP_EVERY: Duration = Duration::from_secs(1);
/// How often a long poll checks that its client is still connected.
const LIVENESS_EVERY: Duration = Duration::from_millis(250);

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut next_conn = 0u64;
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut last_reap = Instant::now();
    while !shared.stopping() {
        match listener.accept() {
            Ok((stream, peer)) => {
                next_conn += 1;
                admit(shared, stream, peer, next_conn, &mut threads);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(error = %e, "accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
        if last_reap.elapsed() >= REAP_EVERY {
            last_reap = Instant::now();
            reap(shared);
            threads.retain(|t| !t.is_finished());
        }
    }
    for (_, s) in shared.clients.lock().drain() {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

fn admit(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    threads: &mut Vec<JoinHandle<()>>,
) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_write_timeout(Some(shared.limits.write_timeout)));
    if let Err(e) = setup {
        debug!(%peer, error = %e, "cannot set up client socket");
        return;
    }
    if shared.active.load(Ordering::Acquire) >= shared.limits.max_clients {
        warn!(%peer, max = shared.limits.max_clients, "refusing client: too many clients");
        return refuse(stream, "the manager serves its maximum number of clients");
    }
    if shared.unauthenticated.load(Ordering::Acquire) >= shared.limits.max_unauthenticated {
        warn!(
            %peer,
            max = shared.limits.max_unauthenticated,
            "refusing client: too many connections awaiting authentication"
        );
        return refuse(
            stream,
            "the manager has its maximum number of connections awaiting authentication",
        );
    }
    let clone = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            warn!(%peer, error = %e, "cannot clone client socket");
            return;
        }
    };
    shared.clients.lock().insert(conn, clone);
    shared.active.fetch_add(1, Ordering::AcqRel);
    shared.unauthenticated.fetch_add(1, Ordering::AcqRel);
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("rsmsg-mgr-{conn}"))
        .spawn(move || {
            let span = info_span!("manager_client", conn, %peer);
            let _enter = span.enter();
            let mut client = Client {
                shared: &s,
                stream,
                conn,
                owned: HashSet::new(),
                took_part: false,
            };
            client.serve();
            client.cleanup();
            s.clients.lock().remove(&conn);
            s.active.fetch_sub(1, Ordering::AcqRel);
        });
    match spawned {
        Ok(t) => threads.push(t),
        Err(e) => {
            warn!(%peer, error = %e, "cannot start client thread");
            if let Some(s) = shared.clients.lock().remove(&conn) {
                let _ = s.shutdown(Shutdown::Both);
            }
            shared.active.fetch_sub(1, Ordering::AcqRel);
            shared.unauthenticated.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Answers `Busy` and closes a connection the manager will not serve.
fn refuse(mut stream: TcpStream, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    // Discard input already received so that closing does not reset the connection and
    // destroy the reply (best effort, without blocking the accept loop).
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            if !matches!(io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = stream.set_nonblocking(false);
    }
    if let Ok(f) = err(ErrorCode::Busy, why).encode() {
        let _ = write_frame(&mut stream, &f);
    }
    let _ = stream.shutdown(Shutdown::Write);
}

fn reap(shared: &Shared) {
    let ttl = shared.limits.rendezvous_ttl;
    let mut st = shared.state.lock();
    let before = st.rendezvous.len();
    st.rendezvous.retain(|id, r| {
        let keep = r.waiters > 0 || r.last_activity.elapsed() < ttl;
        if !keep {
            debug!(rendezvous = id, listener = %r.listener, "rendezvous expired");
        }
        keep
    });
    if st.rendezvous.len() != before {
        let State {
            endpoints,
            rendezvous,
            ..
        } = &mut *st;
        for reg in endpoints.values_mut() {
            reg.pending.retain(|id| rendezvous.contains_key(id));
        }
        shared.changed.notify_all();
    }
}

/// What to do after replying.
enum After {
    Continue,
    Close,
}

struct Client<'a> {
    shared: &'a Shared,
    stream: TcpStream,
    conn: u64,
    owned: HashSet<EndpointName>,
    /// Whether this connection ever registered or requested a connection, i.e. may hold a
    /// rendezvous side.
    took_part: bool,
}

impl Client<'_> {
    fn send(&mut self, msg: &Message) -> bool {
        match msg.encode() {
            Ok(frame) => match write_frame(&mut self.stream, &frame) {
                Ok(()) => true,
                Err(e) => {
                    debug!(error = %e, reply = msg.name(), "cannot write reply");
                    false
                }
            },
            Err(e) => {
                // Only the manager's own values are encoded here; an encoding failure is a bug,
                // reported to the client rather than crashing the manager.
                warn!(error = %e, reply = msg.name(), "cannot encode reply");
                if let Ok(frame) = err(
                    ErrorCode::InvalidRequest,
                    format!("reply not encodable: {e}"),
                )
                .encode()
                {
                    let _ = write_frame(&mut self.stream, &frame);
                }
                false
            }
        }
    }

    /// Sends a final error and closes so that the reply is not lost: half-close, then discard
    /// what the client still sends for a moment (closing with unread input would reset the
    /// connection, and a reset may destroy the reply before the client reads it).
    fn fail(&mut self, reply: &Message) {
        if self.send(reply) {
            let _ = self.stream.shutdown(Shutdown::Write);
            let deadline = Instant::now() + LINGER;
            let mut buf = [0u8; 4096];
            let mut drained = 0usize;
            while drained < MAX_PAYLOAD && Instant::now() < deadline {
                let _ = self.stream.set_read_timeout(Some(LINGER));
                match io::Read::read(&mut self.stream, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        }
    }

    /// Replies to a read failure where a reply makes sense. Returns nothing: the connection
    /// closes after any read failure.
    fn read_failed(&mut self, e: ReadError, during: &'static str) {
        match e {
            ReadError::Closed => debug!(during, "client closed the connection"),
            ReadError::ClosedMidFrame => debug!(during, "client closed mid-frame"),
            ReadError::Idle => debug!(during, "dropping idle client"),
            ReadError::Stalled => warn!(during, "dropping client: frame not completed in time"),
            ReadError::Io(e) => debug!(during, error = %e, "client socket error"),
            ReadError::Decode(e) => {
                warn!(during, error = %e, "malformed frame from client");
                let code = match e {
                    DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                    _ => ErrorCode::Malformed,
                };
                self.fail(&err(code, e.to_string()));
            }
        }
    }

    fn serve(&mut self) {
        let authenticated = self.handshake();
        self.shared.unauthenticated.fetch_sub(1, Ordering::AcqRel);
        if !authenticated {
            return;
        }
        let limits = &self.shared.limits;
        loop {
            if self.shared.stopping() {
                return;
            }
            let msg = match read_frame(
                &mut self.stream,
                Instant::now() + limits.idle_timeout,
                limits.frame_timeout,
            ) {
                Ok(m) => m,
                Err(e) => return self.read_failed(e, "request"),
            };
            debug!(request = msg.name(), "request");
            let (reply, after) = self.handle(msg);
            if let Message::Error { code, message } = &reply {
                debug!(%code, message = message.as_str(), "request failed");
            }
            if let After::Close = after {
                return self.fail(&reply);
            }
            if !self.send(&reply) {
                return;
            }
        }
    }

    fn handshake(&mut self) -> bool {
        let limits = &self.shared.limits;
        let deadline = Instant::now() + limits.handshake_timeout;
        let client_nonce = match read_frame(&mut self.stream, deadline, limits.frame_timeout) {
            Ok(Message::Hello { nonce }) => nonce,
            Ok(other) => {
                warn!(got = other.name(), "request before authentication");
                self.send(&err(
                    ErrorCode::NotAuthenticated,
                    "authenticate first: expected hello",
                ));
                return false;
            }
            Err(e) => {
                self.read_failed(e, "hello");
                return false;
            }
        };
        let server_nonce = match nonce() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cannot read random bytes");
                return false;
            }
        };
        if !self.send(&Message::Challenge {
            nonce: server_nonce,
        }) {
            return false;
        }
        let proof = match read_frame(&mut self.stream, deadline, limits.frame_timeout) {
            Ok(Message::Auth { mac }) => mac,
            Ok(other) => {
                warn!(got = other.name(), "expected auth");
                self.fail(&err(ErrorCode::NotAuthenticated, "expected auth"));
                return false;
            }
            Err(e) => {
                self.read_failed(e, "auth");
                return false;
            }
        };
        if !self
            .shared
            .token
            .verify_client(&client_nonce, &server_nonce, &proof)
        {
            warn!("client failed authentication");
            self.fail(&err(ErrorCode::AuthFailed, "wrong token"));
            return false;
        }
        let mac = self.shared.token.server_proof(&client_nonce, &server_nonce);
        if !self.send(&Message::AuthOk { mac }) {
            return false;
        }
        debug!("client authenticated");
        true
    }

    fn handle(&mut self, msg: Message) -> (Message, After) {
        let limits = &self.shared.limits;
        let reply = match msg {
            Message::Register { info } => self.register(info),
            Message::Unregister { name } => {
                let mut st = self.shared.state.lock();
                match st.endpoints.get(&name) {
                    Some(r) if r.owner == self.conn => {
                        remove_registration(&mut st, &name);
                        self.owned.remove(&name);
                        self.shared.changed.notify_all();
                        info!(name = %name, "unregistered");
                        Message::Ok
                    }
                    _ => err(
                        ErrorCode::NotRegistered,
                        format!("{name} is not registered by this client"),
                    ),
                }
            }
            Message::Lookup { name } => match self.shared.state.lock().endpoints.get(&name) {
                Some(r) => Message::Found {
                    info: r.info.clone(),
                },
                None => unknown_name(&name),
            },
            Message::Connect { from, to, offer } => self.connect(from, &to, offer),
            Message::WaitConnect { name, timeout_ms } => {
                self.wait_connect(&name, Duration::from_millis(u64::from(timeout_ms)))
            }
            Message::Send { id, side, payload } => {
                let mut st = self.shared.state.lock();
                let Some(r) = st
                    .rendezvous
                    .get_mut(&id.0)
                    .filter(|r| self.holds(r, id, side))
                else {
                    return (unknown_rendezvous(id), After::Continue);
                };
                if r.closed[ix(side)].is_some() {
                    err(
                        ErrorCode::InvalidRequest,
                        format!("rendezvous {id}: the {side} side is closed"),
                    )
                } else if let Some(reason) = &r.closed[ix(side.peer())] {
                    closed_by(id, side.peer(), reason)
                } else if r.queues[ix(side.peer())].len() >= limits.max_queued_per_side {
                    err(
                        ErrorCode::LimitExceeded,
                        format!(
                            "rendezvous {id}: {} messages already wait for the {}",
                            limits.max_queued_per_side,
                            side.peer()
                        ),
                    )
                } else {
                    let bytes = queued_footprint(&payload);
                    match self.shared.budget.charge(limits, self.conn, bytes) {
                        Err(why) => err(ErrorCode::LimitExceeded, why),
                        Ok(charge) => {
                            r.queues[ix(side.peer())].push_back(Queued {
                                payload,
                                _charge: charge,
                            });
                            r.last_activity = Instant::now();
                            self.shared.changed.notify_all();
                            Message::Ok
                        }
                    }
                }
            }
            Message::Recv {
                id,
                side,
                timeout_ms,
            } => self.recv(id, side, Duration::from_millis(u64::from(timeout_ms))),
            Message::Close { id, side, reason } => {
                let mut st = self.shared.state.lock();
                match st
                    .rendezvous
                    .get_mut(&id.0)
                    .filter(|r| self.holds(r, id, side))
                {
                    None => unknown_rendezvous(id),
                    Some(r) => {
                        r.closed[ix(side)] = Some(reason);
                        r.last_activity = Instant::now();
                        if r.closed.iter().all(Option::is_some) {
                            st.rendezvous.remove(&id.0);
                        }
                        self.shared.changed.notify_all();
                        debug!(rendezvous = id.0, %side, "rendezvous side closed");
                        Message::Ok
                    }
                }
            }
            Message::Ping => Message::Pong,
            other => {
                return (
                    err(
                        ErrorCode::Malformed,
                        format!("{} is not a request", other.name()),
                    ),
                    After::Close,
                );
            }
        };
        (reply, After::Continue)
    }

    fn register(&mut self, info: EndpointInfo) -> Message {
        let limits = &self.shared.limits;
        let mut st = self.shared.state.lock();
        let total = st.endpoints.len();
        match st.endpoints.entry(info.name.clone()) {
            Entry::Occupied(mut e) => {
                if e.get().owner == self.conn {
                    e.get_mut().info = info;
                    Message::Ok
                } else {
                    err(
                        ErrorCode::NameTaken,
                        format!("{} is registered by another client", info.name),
                    )
                }
            }
            Entry::Vacant(v) => {
                if total >= limits.max_endpoints {
                    return err(
                        ErrorCode::LimitExceeded,
                        format!(
                            "the manager holds its maximum of {} endpoints",
                            limits.max_endpoints
                        ),
                    );
                }
                if self.owned.len() >= limits.max_names_per_client {
                    return err(
                        ErrorCode::LimitExceeded,
                        format!(
                            "a client may register at most {} names",
                            limits.max_names_per_client
                        ),
                    );
                }
                info!(name = %info.name, host = %info.host_id, transports = info.transports.bits(), "registered");
                self.took_part = true;
                self.owned.insert(info.name.clone());
                v.insert(Registration {
                    info,
                    owner: self.conn,
                    pending: VecDeque::new(),
                });
                Message::Ok
            }
        }
    }

    fn connect(&mut self, from: EndpointInfo, to: &EndpointName, offer: Descriptors) -> Message {
        let limits = &self.shared.limits;
        let mut st = self.shared.state.lock();
        let live = st.rendezvous.len();
        let State {
            endpoints,
            rendezvous,
            next_id,
        } = &mut *st;
        let Some(reg) = endpoints.get_mut(to) else {
            return unknown_name(to);
        };
        // The listener side belongs to the registration's owner: `wait_connect` hands the
        // request to no other connection, the owner of a registration never changes, and a
        // removed registration's requests are closed, never handed out again.
        let conns = [self.conn, reg.owner];
        if reg.pending.len() >= limits.max_pending_per_endpoint {
            return err(
                ErrorCode::LimitExceeded,
                format!("{to} has {} connection requests waiting", reg.pending.len()),
            );
        }
        if live >= limits.max_rendezvous {
            return err(
                ErrorCode::LimitExceeded,
                format!(
                    "the manager holds its maximum of {} rendezvous",
                    limits.max_rendezvous
                ),
            );
        }
        let charge = match self
            .shared
            .budget
            .charge(limits, self.conn, queued_footprint(&offer))
        {
            Ok(c) => c,
            Err(why) => return err(ErrorCode::LimitExceeded, why),
        };
        self.took_part = true;
        *next_id += 1;
        let id = *next_id;
        info!(rendezvous = id, from = %from.name, to = %to, "connection requested");
        rendezvous.insert(
            id,
            Rendezvous {
                from,
                listener: to.clone(),
                conns,
                queues: [
                    VecDeque::new(),
                    VecDeque::from([Queued {
                        payload: offer,
                        _charge: charge,
                    }]),
                ],
                closed: [None, None],
                accepted: false,
                waiters: 0,
                last_activity: Instant::now(),
            },
        );
        reg.pending.push_back(id);
        self.shared.changed.notify_all();
        Message::Queued {
            id: RendezvousId(id),
        }
    }

    fn wait_connect(&mut self, name: &EndpointName, timeout: Duration) -> Message {
        let deadline = Instant::now() + timeout;
        let shared = self.shared;
        let mut st = shared.state.lock();
        loop {
            let State {
                endpoints,
                rendezvous,
                ..
            } = &mut *st;
            let Some(reg) = endpoints.get_mut(name).filter(|r| r.owner == self.conn) else {
                return err(
                    ErrorCode::NotRegistered,
                    format!("{name} is not registered by this client"),
                );
            };
            while let Some(id) = reg.pending.pop_front() {
                let Some(r) = rendezvous.get_mut(&id) else {
                    continue;
                };
                if r.closed[ix(Side::Initiator)].is_some() {
                    rendezvous.remove(&id);
                    continue;
                }
                let offer = r.queues[ix(Side::Listener)]
                    .pop_front()
                    .map(|q| q.payload)
                    .unwrap_or_default();
                r.accepted = true;
                r.last_activity = Instant::now();
                debug!(rendezvous = id, from = %r.from.name, "connection request delivered");
                return Message::Incoming {
                    id: RendezvousId(id),
                    from: r.from.clone(),
                    offer,
                };
            }
            if let Some(reply) = self.park(&mut st, deadline) {
                return reply;
            }
        }
    }

    fn recv(&mut self, id: RendezvousId, side: Side, timeout: Duration) -> Message {
        let shared = self.shared;
        let mut st = shared.state.lock();
        // Someone waiting on a rendezvous keeps it alive; only abandoned ones expire.
        match st
            .rendezvous
            .get_mut(&id.0)
            .filter(|r| self.holds(r, id, side))
        {
            Some(r) => r.waiters += 1,
            None => return unknown_rendezvous(id),
        }
        let reply = self.recv_locked(&mut st, id, side, timeout);
        if let Some(r) = st.rendezvous.get_mut(&id.0) {
            r.waiters -= 1;
            r.last_activity = Instant::now();
        }
        reply
    }

    fn recv_locked(
        &self,
        st: &mut MutexGuard<'_, State>,
        id: RendezvousId,
        side: Side,
        timeout: Duration,
    ) -> Message {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(r) = st.rendezvous.get_mut(&id.0) else {
                return unknown_rendezvous(id);
            };
            if side == Side::Listener && !r.accepted {
                return err(
                    ErrorCode::InvalidRequest,
                    format!("rendezvous {id} has not been accepted yet: wait-connect first"),
                );
            }
            if let Some(q) = r.queues[ix(side)].pop_front() {
                return Message::Delivered { payload: q.payload };
            }
            if let Some(reason) = &r.closed[ix(side.peer())] {
                return closed_by(id, side.peer(), reason);
            }
            if let Some(reply) = self.park(st, deadline) {
                return reply;
            }
        }
    }

    /// Whether this connection holds `side` of `r`. Requests for a side held by another
    /// connection are answered as for an unknown rendezvous, so that they learn nothing.
    fn holds(&self, r: &Rendezvous, id: RendezvousId, side: Side) -> bool {
        let holder = r.conns[ix(side)];
        if holder != self.conn {
            debug!(
                rendezvous = id.0,
                %side,
                holder,
                "refused: the rendezvous side belongs to another client"
            );
        }
        holder == self.conn
    }

    /// Waits for a state change. `Some(reply)` ends the long poll: the deadline passed
    /// (`TimedOut`), the manager is stopping, or the client went away.
    fn park(&self, st: &mut MutexGuard<'_, State>, deadline: Instant) -> Option<Message> {
        if self.shared.stopping() {
            return Some(err(ErrorCode::ShuttingDown, "the manager is shutting down"));
        }
        let now = Instant::now();
        if now >= deadline {
            return Some(Message::TimedOut);
        }
        let slice = (deadline - now).min(LIVENESS_EVERY);
        let timed_out = self.shared.changed.wait_for(st, slice).timed_out();
        if timed_out && MutexGuard::unlocked(st, || self.client_gone()) {
            debug!("client went away during a long poll");
            return Some(err(ErrorCode::Closed, "client gone"));
        }
        None
    }

    /// Whether the client closed its end (checked without consuming data).
    fn client_gone(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut b = [0u8; 1];
        let gone = match self.stream.peek(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        };
        self.stream.set_nonblocking(false).is_err() || gone
    }

    /// Forgets what the departed connection held: its registrations (see
    /// [`remove_registration`]) and its rendezvous sides, which nobody else may use. Each such
    /// side is closed (its peer learns it once the messages already sent to it are read), and
    /// messages waiting for it are discarded, as they can no longer be delivered; a request it
    /// made that the listener has not taken yet goes entirely.
    fn cleanup(&mut self) {
        if !self.took_part {
            return;
        }
        let mut st = self.shared.state.lock();
        for name in self.owned.drain() {
            info!(name = %name, "registration removed: its client left");
            remove_registration(&mut st, &name);
        }
        let conn = self.conn;
        let State {
            endpoints,
            rendezvous,
            ..
        } = &mut *st;
        let before = rendezvous.len();
        rendezvous.retain(|id, r| {
            for side in [Side::Initiator, Side::Listener] {
                if r.conns[ix(side)] == conn {
                    r.queues[ix(side)].clear();
                    r.closed[ix(side)].get_or_insert_with(|| "its client left".into());
                    r.last_activity = Instant::now();
                }
            }
            let keep =
                !(r.closed.iter().all(Option::is_some) || (r.conns[0] == conn && !r.accepted));
            if !keep {
                debug!(rendezvous = id, "rendezvous discarded: its client left");
            }
            keep
        });
        if rendezvous.len() != before {
            for reg in endpoints.values_mut() {
                reg.pending.retain(|id| rendezvous.contains_key(id));
            }
        }
        self.shared.changed.notify_all();
    }
}

/// Removes a registration; requests still waiting for it are closed on the listener's behalf so
/// that their initiators learn it at once.
fn remove_registration(st: &mut State, name: &EndpointName) {
    if let Some(reg) = st.endpoints.remove(name) {
        for id in reg.pending {
            if let Some(r) = st.rendezvous.get_mut(&id) {
                r.closed[ix(Side::Listener)] = Some(format!("listener {name} is gone"));
                // The request was never handed out and never will be: its offer goes.
                r.queues[ix(Side::Listener)].clear();
                r.last_activity = Instant::now();
            }
        }
    }
}

fn unknown_name(name: &EndpointName) -> Message {
    err(
        ErrorCode::UnknownName,
        format!("no endpoint named {name} is registered"),
    )
}

fn unknown_rendezvous(id: RendezvousId) -> Message {
    err(
        ErrorCode::UnknownRendezvous,
        format!("rendezvous {id} is unknown, finished or expired"),
    )
}

fn closed_by(id: RendezvousId, side: Side, reason: &str) -> Message {
    if reason.is_empty() {
        err(
            ErrorCode::Closed,
            format!("rendezvous {id} closed by the {side}"),
        )
    } else {
        err(
            ErrorCode::Closed,
            format!("rendezvous {id} closed by the {side}: {reason}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_return_what_they_took_and_respect_both_limits() {
        let limits = Limits {
            max_queued_bytes: 100,
            max_queued_bytes_per_client: 60,
            ..Limits::default()
        };
        let budget = Arc::new(Budget::default());
        let a1 = budget.charge(&limits, 1, 40).unwrap();
        let refused = budget.charge(&limits, 1, 30).unwrap_err();
        assert!(refused.contains("this client"), "{refused}");
        let b1 = budget.charge(&limits, 2, 60).unwrap();
        assert_eq!(budget.total(), 100);
        // Within client 3's share, but not within the whole.
        let refused = budget.charge(&limits, 3, 1).unwrap_err();
        assert!(refused.contains("the manager holds"), "{refused}");
        drop(a1);
        let a2 = budget.charge(&limits, 1, 20).unwrap();
        assert_eq!(budget.total(), 80);
        drop((a2, b1));
        assert_eq!(budget.total(), 0);
        assert!(budget.inner.lock().per_client.is_empty());
    }

    #[test]
    fn footprint_covers_the_encoded_length() {
        let d = Descriptors {
            opaque: vec![1; 100],
            ..Descriptors::default()
        };
        assert!(queued_footprint(&d) >= d.encode().unwrap().len());
        assert!(queued_footprint(&Descriptors::default()) > 0);
    }
}
