//! Many connections behind one receive: [`Endpoint`].

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::time::{Duration, Instant};

use super::{Config, Conn, EndpointError, Listener, Msg, Transport, connect_any};
use crate::transport::{Counters, GroupCounters, PollMode, SendError, TransportError};

/// How often an idle [`Endpoint`] asks each connection whether its peer is still alive.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(50);
/// Longest nap of an idle endpoint that holds a busy-mode connection (no event descriptor).
const MAX_NAP: Duration = Duration::from_millis(1);
/// First sleep once spinning is over.
const FIRST_NAP: Duration = Duration::from_micros(20);

/// The identity of one peer of an [`Endpoint`]: unique for the endpoint's lifetime (never
/// reused, even after the peer is removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(u64);

impl PeerId {
    /// The number behind the id (1 for the first peer, then increasing).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// What an [`Endpoint`] knows about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The id.
    pub id: PeerId,
    /// For a peer we connected to, the name we connected to; for an accepted peer,
    /// `accepted-<transport>-<id>` (connectors are anonymous).
    pub name: String,
    /// The transport of the connection.
    pub transport: Transport,
    /// Whether the peer connected to us (through our listener).
    pub accepted: bool,
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.id, self.name, self.transport)
    }
}

#[derive(Debug)]
struct Peer {
    info: PeerInfo,
    conn: Conn,
    /// Failed and already reported: removed at the next `&mut self` call.
    dead: Cell<bool>,
}

/// How long a receive may wait.
#[derive(Debug, Clone, Copy)]
enum Wait {
    No,
    Until(Option<Instant>),
}

/// A set of connections, accepted through an optional [`Listener`] and made with
/// [`Endpoint::connect`], with one receive for all of them.
///
/// - [`Endpoint::recv`] returns the next message from any peer as a [`Received`] that says
///   who sent it (read in place; its partitions return to that peer when it is dropped). Peers
///   are served round-robin, so a busy peer cannot starve the others.
/// - New connections from the listener join the set while the endpoint receives.
/// - A peer that fails (closes, dies, breaks the protocol) is removed, and that receive returns
///   [`EndpointError::PeerFailed`] naming it; the other peers carry on.
/// - [`Endpoint::send`] and friends send to one peer by [`PeerId`].
///
/// # Waiting
/// Several connections are watched by polling each in turn without waiting
/// ([`Conn::poll_ready`](crate::transport::Connection::poll_ready)). What an idle endpoint does
/// follows the configured [`PollMode`]: `busy` spins (lowest latency, one core), `adaptive`
/// spins that many rounds then sleeps, `event` sleeps at once. It sleeps in `poll(2)` on the
/// event descriptors of all its connections and of its listener ([`Conn::event_fd`], after
/// arming each connection), so a message or a new connection wakes it at once. A connection
/// made in busy mode has no event descriptor; while the endpoint holds one, it naps instead
/// (20 µs doubling up to 1 ms). Every 50 ms an idle endpoint also checks that its peers are
/// alive.
///
/// # Thread safety
/// `Endpoint` is `Send` but not `Sync` (like [`Conn`]): own it from one thread at a time.
/// A [`Received`] message borrows the endpoint, so take the next message after dropping (or
/// copying) the current one; replies on the same connection work while it is held
/// ([`Received::reply`]).
#[derive(Debug)]
pub struct Endpoint {
    config: Config,
    listener: Option<Listener>,
    /// Ordered by id (ids grow and peers are appended): lookups are binary searches.
    peers: Vec<Peer>,
    next_id: u64,
    cursor: usize,
    accept_failures: u64,
    last_liveness: Instant,
}

impl Endpoint {
    /// An endpoint without a listener: it only connects.
    ///
    /// # Errors
    /// An invalid configuration.
    pub fn new(config: Config) -> Result<Endpoint, EndpointError> {
        config.validate()?;
        Ok(Endpoint {
            config,
            listener: None,
            peers: Vec::new(),
            next_id: 1,
            cursor: 0,
            accept_failures: 0,
            last_liveness: Instant::now(),
        })
    }

    /// An endpoint listening under `name` (see [`Listener::bind`]); it can also connect.
    ///
    /// # Errors
    /// As [`Listener::bind`].
    pub fn bind(config: Config, name: &str) -> Result<Endpoint, EndpointError> {
        let listener = Listener::bind(&config, name)?;
        let mut ep = Endpoint::new(config)?;
        ep.listener = Some(listener);
        Ok(ep)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The listener, if the endpoint listens.
    pub fn listener(&self) -> Option<&Listener> {
        self.listener.as_ref()
    }

    /// Connects to the endpoint `name` (see [`connect`](super::connect)) and adds the
    /// connection.
    ///
    /// # Errors
    /// As [`connect`](super::connect).
    pub fn connect(&mut self, name: &str) -> Result<PeerId, EndpointError> {
        let (conn, transport) = connect_any(&self.config, name)?;
        Ok(self.add(conn, name, transport, false))
    }

    /// Adds a connection made elsewhere (e.g. with the transport modules directly) under
    /// `name`.
    pub fn add_conn(
        &mut self,
        conn: Conn,
        name: impl Into<String>,
        transport: Transport,
    ) -> PeerId {
        self.add(conn, name, transport, false)
    }

    fn add(
        &mut self,
        conn: Conn,
        name: impl Into<String>,
        transport: Transport,
        accepted: bool,
    ) -> PeerId {
        let id = PeerId(self.next_id);
        self.next_id += 1;
        self.peers.push(Peer {
            info: PeerInfo {
                id,
                name: name.into(),
                transport,
                accepted,
            },
            conn,
            dead: Cell::new(false),
        });
        id
    }

    /// Waits at most `timeout` for a peer to connect through the listener and returns its id
    /// (`None` if none came). Connections that arrive while receiving join by themselves; this
    /// is for waiting until some peers are there.
    ///
    /// # Errors
    /// No listener.
    pub fn accept(&mut self, timeout: Duration) -> Result<Option<PeerId>, EndpointError> {
        self.purge();
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let Some(l) = &self.listener else {
                return Err(EndpointError::Config {
                    name: "endpoint",
                    reason: "this endpoint has no listener".into(),
                });
            };
            let left = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match l.next(Some(left)) {
                Ok(Some(a)) => {
                    let name = format!("accepted-{}-{}", a.transport, self.next_id);
                    return Ok(Some(self.add(a.conn, name, a.transport, true)));
                }
                Ok(None) if deadline.is_some() => return Ok(None),
                Ok(None) => {}
                // Closed (through `listener()`): no connection will come.
                Err(e) if l.is_closed() => return Err(e),
                Err(e) => self.note_accept_failure(&e),
            }
        }
    }

    /// The peers, in the order they joined.
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.iter().filter(|p| !p.dead.get()).map(|p| &p.info)
    }

    /// The number of peers.
    pub fn len(&self) -> usize {
        self.peers().count()
    }

    /// Whether there is no peer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find(&self, id: PeerId) -> Option<&Peer> {
        let i = self.peers.binary_search_by_key(&id, |p| p.info.id).ok()?;
        Some(&self.peers[i]).filter(|p| !p.dead.get())
    }

    /// What is known about peer `id`.
    pub fn peer(&self, id: PeerId) -> Option<&PeerInfo> {
        self.find(id).map(|p| &p.info)
    }

    /// The connection to peer `id`, for everything [`Conn`] offers (zero-copy fills, vectored
    /// sends, its own receive).
    pub fn conn(&self, id: PeerId) -> Option<&Conn> {
        self.find(id).map(|p| &p.conn)
    }

    /// Removes peer `id` and returns its connection (close it, or drop it to disconnect).
    pub fn remove(&mut self, id: PeerId) -> Option<Conn> {
        self.purge();
        let i = self.peers.binary_search_by_key(&id, |p| p.info.id).ok()?;
        Some(self.peers.remove(i).conn)
    }

    fn target(&self, id: PeerId) -> Result<&Conn, EndpointError> {
        self.find(id)
            .map(|p| &p.conn)
            .ok_or(EndpointError::UnknownPeer(id))
    }

    /// Sends `msg` to peer `id`, waiting while that peer holds every partition (see
    /// [`Connection::send`](crate::transport::Connection::send); messages from other peers are
    /// not received meanwhile).
    ///
    /// # Errors
    /// [`EndpointError::UnknownPeer`], [`EndpointError::Send`].
    pub fn send(&self, id: PeerId, msg: &[u8]) -> Result<(), EndpointError> {
        self.target(id)?
            .send(msg)
            .map_err(|source| EndpointError::Send { peer: id, source })
    }

    /// Sends `msg` to peer `id` if partitions are free now; never waits.
    ///
    /// # Errors
    /// [`EndpointError::UnknownPeer`], [`EndpointError::Send`] (with
    /// [`SendError::WouldBlock`] under back-pressure: [`EndpointError::is_would_block`]).
    pub fn try_send(&self, id: PeerId, msg: &[u8]) -> Result<(), EndpointError> {
        self.target(id)?
            .try_send(msg)
            .map_err(|source| EndpointError::Send { peer: id, source })
    }

    /// Sends a message of `len` bytes to peer `id`, filled in place by `fill` (zero-copy; see
    /// [`Connection::send_with`](crate::transport::Connection::send_with)).
    ///
    /// # Errors
    /// As [`Endpoint::send`].
    pub fn send_with(
        &self,
        id: PeerId,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), EndpointError> {
        self.target(id)?
            .send_with(len, fill)
            .map_err(|source| EndpointError::Send { peer: id, source })
    }

    /// The counters of peer `id`'s connection (no allocation).
    pub fn counters(&self, id: PeerId) -> Option<Counters> {
        self.find(id).map(|p| p.conn.counters())
    }

    /// The counters of segment group `group` of peer `id`'s connection.
    pub fn group_counters(&self, id: PeerId, group: usize) -> Option<GroupCounters> {
        self.find(id).and_then(|p| p.conn.group_counters(group))
    }

    /// The counters summed over the current peers.
    pub fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for p in self.peers.iter().filter(|p| !p.dead.get()) {
            let c = p.conn.counters();
            t.messages_sent += c.messages_sent;
            t.bytes_sent += c.bytes_sent;
            t.messages_received += c.messages_received;
            t.bytes_received += c.bytes_received;
            t.credit_stalls += c.credit_stalls;
            t.partitions_in_flight += c.partitions_in_flight;
            t.partitions_held += c.partitions_held;
            t.rendezvous_needed += c.rendezvous_needed;
        }
        t
    }

    /// Connections the listener failed to set up (bad handshakes); they never became peers.
    pub fn accept_failures(&self) -> u64 {
        self.accept_failures
    }

    /// Waits for the next message from any peer.
    ///
    /// # Errors
    /// [`EndpointError::PeerFailed`] when a peer failed (it is removed; call again to go on),
    /// [`EndpointError::NoPeers`] when there is no peer and no listener.
    pub fn recv(&mut self) -> Result<Received<'_>, EndpointError> {
        match self.recv_until(Wait::Until(None))? {
            Some(r) => Ok(r),
            None => Err(EndpointError::Transport(TransportError::Failed(
                "receive ended without a message".into(),
            ))),
        }
    }

    /// The next message from any peer if one has arrived; never waits (but takes in new
    /// connections, and checks the peers' liveness at most every 50 ms).
    ///
    /// # Errors
    /// As [`Endpoint::recv`].
    pub fn try_recv(&mut self) -> Result<Option<Received<'_>>, EndpointError> {
        self.recv_until(Wait::No)
    }

    /// Waits at most `timeout` for a message from any peer; `Ok(None)` when none came.
    ///
    /// # Errors
    /// As [`Endpoint::recv`].
    pub fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Received<'_>>, EndpointError> {
        self.recv_until(Wait::Until(Instant::now().checked_add(timeout)))
    }

    fn recv_until(&mut self, wait: Wait) -> Result<Option<Received<'_>>, EndpointError> {
        let mut idle: u32 = 0;
        let mut nap = FIRST_NAP;
        let idx = loop {
            self.purge();
            self.absorb_accepts();
            if let Some(i) = self.scan_ready()? {
                break i;
            }
            if self.peers.is_empty() && self.listener.is_none() {
                return Err(EndpointError::NoPeers);
            }
            let now = Instant::now();
            if now.duration_since(self.last_liveness) >= LIVENESS_INTERVAL {
                self.last_liveness = now;
                self.check_liveness()?;
            }
            let deadline = match wait {
                Wait::No => return Ok(None),
                Wait::Until(d) => d,
            };
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            idle = idle.saturating_add(1);
            let spins = match self.config.poll {
                PollMode::Busy => u32::MAX,
                PollMode::Adaptive { spins } => spins,
                PollMode::Event => 0,
            };
            if idle < spins {
                std::hint::spin_loop();
            } else if !self.wait_events(deadline, now)? {
                // A connection without an event descriptor (created in busy mode): nap.
                let left = deadline.map_or(nap, |d| d.saturating_duration_since(now));
                std::thread::sleep(nap.min(left));
                nap = (nap * 2).min(MAX_NAP);
            }
        };
        self.cursor = idx + 1;
        let peer = &self.peers[idx];
        match peer.conn.try_recv() {
            Ok(Some(msg)) => Ok(Some(Received {
                peer: &peer.info,
                conn: &peer.conn,
                msg,
            })),
            // poll_ready said a message is next: not reached.
            Ok(None) => Ok(None),
            Err(source) => {
                peer.dead.set(true);
                Err(EndpointError::PeerFailed {
                    peer: peer.info.clone(),
                    source,
                })
            }
        }
    }

    /// Sleeps until a connection or the listener has news (their event descriptors, see
    /// [`Conn::event_fd`]), the deadline passes, or the next liveness check is due. Returns
    /// `false` without waiting when some connection has no event descriptor (busy mode).
    fn wait_events(&self, deadline: Option<Instant>, now: Instant) -> Result<bool, EndpointError> {
        let live = || self.peers.iter().filter(|p| !p.dead.get());
        let mut fds = Vec::with_capacity(self.peers.len() + 1);
        for p in live() {
            match p.conn.event_fd() {
                Some(fd) => fds.push(fd),
                None => return Ok(false),
            }
        }
        // Arm every connection (resets its descriptor and tells the peer we may sleep); one
        // that has something already, or failed, is handled by the next scan.
        for p in live() {
            if !matches!(p.conn.arm(), Ok(false)) {
                return Ok(true);
            }
        }
        if let Some(l) = &self.listener {
            fds.push(l.event_fd());
        }
        let liveness = (self.last_liveness + LIVENESS_INTERVAL).saturating_duration_since(now);
        let left = deadline.map_or(liveness, |d| d.saturating_duration_since(now).min(liveness));
        crate::shm::wait_readable_any(&fds, Some(left)).map_err(|e| {
            EndpointError::Transport(TransportError::Failed(format!(
                "wait on the connections' event descriptors: {e}"
            )))
        })?;
        Ok(true)
    }

    /// Drops peers that failed in an earlier call (already reported).
    fn purge(&mut self) {
        if self.peers.iter().any(|p| p.dead.get()) {
            self.peers.retain(|p| !p.dead.get());
        }
    }

    fn note_accept_failure(&mut self, e: &EndpointError) {
        self.accept_failures += 1;
        tracing::warn!(error = %e, "a connection to the listener failed during setup");
    }

    fn absorb_accepts(&mut self) {
        loop {
            let Some(l) = &self.listener else { return };
            match l.next(None) {
                Ok(Some(a)) => {
                    let name = format!("accepted-{}-{}", a.transport, self.next_id);
                    self.add(a.conn, name, a.transport, true);
                }
                Ok(None) => return,
                // Closed (through `listener()`): nothing more will come; the endpoint goes on
                // without it.
                Err(_) if l.is_closed() => {
                    self.listener = None;
                    return;
                }
                Err(e) => self.note_accept_failure(&e),
            }
        }
    }

    /// The index of a peer with a message ready, round-robin from the cursor.
    fn scan_ready(&mut self) -> Result<Option<usize>, EndpointError> {
        let n = self.peers.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            match self.peers[i].conn.poll_ready() {
                Ok(true) => return Ok(Some(i)),
                Ok(false) => {}
                Err(source) => return Err(self.fail(i, source)),
            }
        }
        Ok(None)
    }

    fn check_liveness(&mut self) -> Result<(), EndpointError> {
        for i in 0..self.peers.len() {
            if let Err(source) = self.peers[i].conn.check_peer() {
                return Err(self.fail(i, source));
            }
        }
        Ok(())
    }

    fn fail(&mut self, i: usize, source: TransportError) -> EndpointError {
        let peer = self.peers.remove(i).info;
        tracing::debug!(%peer, error = %source, "peer removed");
        EndpointError::PeerFailed { peer, source }
    }
}

/// A message received by an [`Endpoint`], with its sender. Read in place (zero-copy); its
/// partitions return to the sender when it is dropped.
pub struct Received<'a> {
    peer: &'a PeerInfo,
    conn: &'a Conn,
    msg: Msg<'a>,
}

impl<'a> Received<'a> {
    /// The sender's id.
    pub fn peer(&self) -> PeerId {
        self.peer.id
    }

    /// What is known about the sender.
    pub fn peer_info(&self) -> &'a PeerInfo {
        self.peer
    }

    /// The message's sequence number on its connection.
    pub fn seq(&self) -> u32 {
        self.msg.seq()
    }

    /// The connection the message came on (e.g. to reply while holding it).
    pub fn conn(&self) -> &'a Conn {
        self.conn
    }

    /// Sends `msg` back to the sender, waiting for credits like
    /// [`Connection::send`](crate::transport::Connection::send).
    ///
    /// # Errors
    /// As [`Connection::send`](crate::transport::Connection::send).
    pub fn reply(&self, msg: &[u8]) -> Result<(), SendError> {
        self.conn.send(msg)
    }

    /// Returns the partitions to the sender now (same as dropping).
    pub fn release(self) {
        self.msg.release();
    }
}

impl Deref for Received<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.msg
    }
}

impl fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("peer", &self.peer.id)
            .field("seq", &self.msg.seq())
            .field("len", &self.msg.len())
            .finish()
    }
}
