//! Jobs of N ranks: rank and size from the launcher (Open MPI's `mpirun`, Slurm's `srun`, a PMI
//! launcher such as MPICH's Hydra), a connection to every other rank (the full mesh), point-to-point
//! messages by rank, and a barrier.
//!
//! # Setup
//! Every rank listens under the endpoint name `JOB.rRANK` ([`rank_name`]); for each pair the
//! higher rank connects to the lower one, in rank order, and then accepts the connections of
//! the ranks above it. A rank's connects only wait for lower ranks to finish theirs, so the
//! construction cannot deadlock; the first message on each connection names the connecting
//! rank.
//!
//! Names are found through the bootstrap manager when `RSMSG_MANAGER` is set (any host, and the
//! only way to use verbs), otherwise in the local socket directory (every rank on one host,
//! shared memory). With `RSMSG_EMBED_MANAGER=1`, rank 0 runs the manager itself, listening on
//! every interface at the port of `RSMSG_MANAGER`, which must then name rank 0's host
//! (`RSMSG_MANAGER=node0:7400`); other ranks retry until it answers.
//!
//! # Messages
//! Each mesh message carries an 8-byte header in front of the payload (data, barrier, or the
//! setup hello), so [`Mesh::max_message`] is 8 bytes less than a bare connection's. A barrier
//! token that arrives while the application receives is counted and dropped; a data message
//! that arrives while a barrier waits is copied aside (its partitions released at once, so the
//! sender is never starved) and delivered, in order, by the next receive from that rank.
//!
//! What is copied aside is bounded: past [`Mesh::set_barrier_backlog`] bytes (default
//! [`DEFAULT_BARRIER_BACKLOG`]; the bound may be passed by one message) the barrier returns
//! [`MeshError::BarrierBacklog`] instead of growing without limit. Nothing is lost: the copies
//! are received as usual, and the next [`Mesh::barrier`] resumes the unfinished one (it sends
//! no token twice).

#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::Deref;
use std::time::{Duration, Instant};

use crate::bootstrap::launcher::job_name_from_vars;
use crate::bootstrap::{
    BootstrapError, ErrorCode, LaunchError, LaunchInfo, Limits, Manager, ManagerHandle, Token,
};
use crate::endpoint::{self, Config, Conn, EndpointError, Listener, Msg};
use crate::transport::{SendError, TransportError};

/// Length of the header in front of every mesh message.
pub const HEADER_LEN: usize = 8;
const KIND_DATA: u8 = 0xD0;
const KIND_BARRIER: u8 = 0xB0;
const KIND_HELLO: u8 = 0x4E;
const DATA_HEADER: [u8; HEADER_LEN] = [KIND_DATA, 0, 0, 0, 0, 0, 0, 0];
const BARRIER_HEADER: [u8; HEADER_LEN] = [KIND_BARRIER, 0, 0, 0, 0, 0, 0, 0];
/// Longest job part of an endpoint name (names are at most 64 bytes, `.rNNNNNNNNNN` follows).
const MAX_JOB_LEN: usize = 48;
/// Default job name when neither `RSMSG_JOB` nor a launcher names the job.
const DEFAULT_JOB: &str = "rsmsg-mesh";
/// Default time the whole mesh setup may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on the bytes of data messages a barrier copies aside (all peers together).
pub const DEFAULT_BARRIER_BACKLOG: usize = 64 << 20;

/// Errors of the mesh layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// No launcher variables (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `SLURM_PROCID`, ...) are set.
    #[error(
        "no launcher found: set OMPI_COMM_WORLD_RANK/SIZE (mpirun), SLURM_PROCID/NTASKS (srun) or PMI_RANK/SIZE"
    )]
    NoLauncher,
    /// The launcher's variables are malformed.
    #[error("launcher environment: {0}")]
    Launch(#[from] LaunchError),
    /// A mesh setting is invalid.
    #[error("configuration {name}: {reason}")]
    Config {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Listening, connecting or accepting failed.
    #[error("{step}: {source}")]
    Endpoint {
        /// The step, with the peer rank when there is one.
        step: String,
        /// The cause.
        #[source]
        source: Box<EndpointError>,
    },
    /// The embedded manager could not start.
    #[error("starting the embedded manager: {0}")]
    Manager(#[source] BootstrapError),
    /// The mesh was not complete before the setup timeout.
    #[error("mesh setup timed out after {0:?} while {1}")]
    SetupTimeout(Duration, String),
    /// A peer sent something that is not a mesh message.
    #[error("rank {rank} broke the mesh protocol: {reason}")]
    Protocol {
        /// The peer.
        rank: u32,
        /// What was wrong.
        reason: String,
    },
    /// The rank is this rank's own or not below the job size.
    #[error("rank {rank} is not a peer in a job of {size} (this is rank {me})")]
    BadRank {
        /// The rank asked for.
        rank: u32,
        /// Job size.
        size: u32,
        /// This rank.
        me: u32,
    },
    /// Sending failed (back-pressure, too large, connection failure).
    #[error("send to rank {rank}: {source}")]
    Send {
        /// The peer.
        rank: u32,
        /// The cause.
        #[source]
        source: SendError,
    },
    /// While this rank waited in a barrier, the data messages it copied aside passed the
    /// barrier backlog bound: the barrier is unfinished. Receive from the ranks that sent them,
    /// then call [`Mesh::barrier`] again, which resumes it.
    #[error(
        "barrier unfinished (waiting for rank {rank}): {bytes} bytes of data messages were \
         copied aside while it waited, past the bound of {cap}: receive them, then call barrier \
         again, which resumes it"
    )]
    BarrierBacklog {
        /// The rank the barrier was waiting for.
        rank: u32,
        /// Bytes copied aside now, all peers together.
        bytes: usize,
        /// The bound ([`Mesh::set_barrier_backlog`]).
        cap: usize,
    },
    /// Receiving failed (timeout, peer closed, protocol violation).
    #[error("receive from rank {rank}: {source}")]
    Recv {
        /// The peer.
        rank: u32,
        /// The cause.
        #[source]
        source: TransportError,
    },
}

/// How a mesh is set up, besides the endpoint [`Config`].
#[derive(Debug, Clone)]
pub struct MeshSetup {
    /// Prefix of the endpoint names; ranks of one job must agree, concurrent jobs must differ.
    pub job: String,
    /// Rank 0 runs a bootstrap manager on this address (`0.0.0.0:PORT`) with this token.
    pub embed_manager: Option<(String, Token)>,
    /// How long the whole setup may take (waiting for peers to start included); at most
    /// [`MeshSetup::MAX_TIMEOUT`].
    pub timeout: Duration,
}

impl MeshSetup {
    /// The longest setup timeout accepted (`RSMSG_MESH_TIMEOUT` 1 to 31536000 seconds, one
    /// year).
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 86400);

    /// Variables read besides the launcher's job id variables.
    const ENV_VARS: [&'static str; 5] = [
        "RSMSG_JOB",
        "RSMSG_MESH_TIMEOUT",
        "RSMSG_EMBED_MANAGER",
        "RSMSG_MANAGER",
        "RSMSG_TOKEN",
    ];

    /// From the environment: `RSMSG_JOB` or the launcher's job id for [`MeshSetup::job`],
    /// `RSMSG_EMBED_MANAGER=1` (with `RSMSG_MANAGER=HOST:PORT` and `RSMSG_TOKEN`) for an embedded
    /// manager on rank 0, `RSMSG_MESH_TIMEOUT` (whole seconds, 1 to 31536000, default 60).
    ///
    /// # Errors
    /// [`MeshError::Config`] naming a variable that is not valid UTF-8 or does not parse, a
    /// timeout out of range, an embedded manager without a port or a token.
    pub fn from_env() -> Result<MeshSetup, MeshError> {
        for name in Self::ENV_VARS
            .into_iter()
            .chain(crate::bootstrap::launcher::job_name_vars())
        {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(name) {
                return Err(MeshError::Config {
                    name,
                    reason: "not valid UTF-8".into(),
                });
            }
        }
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`MeshSetup::from_env`], reading variables through `get`.
    ///
    /// # Errors
    /// As [`MeshSetup::from_env`].
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<MeshSetup, MeshError> {
        let var = |n: &str| get(n).filter(|v| !v.trim().is_empty());
        let job = job_name_from_vars(var, MAX_JOB_LEN).unwrap_or_else(|| DEFAULT_JOB.to_string());
        let timeout = match var("RSMSG_MESH_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(s) if s > 0 && s <= Self::MAX_TIMEOUT.as_secs() => Duration::from_secs(s),
                _ => {
                    return Err(MeshError::Config {
                        name: "RSMSG_MESH_TIMEOUT",
                        reason: format!(
                            "{v:?} is not a number of seconds from 1 to {}",
                            Self::MAX_TIMEOUT.as_secs()
                        ),
                    });
                }
            },
        };
        let embed = match var("RSMSG_EMBED_MANAGER").as_deref().map(str::trim) {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(MeshError::Config {
                    name: "RSMSG_EMBED_MANAGER",
                    reason: format!("{other:?} is neither 0 nor 1"),
                });
            }
        };
        let embed_manager = if embed {
            let addr = var("RSMSG_MANAGER").ok_or(MeshError::Config {
                name: "RSMSG_EMBED_MANAGER",
                reason: "RSMSG_MANAGER=HOST:PORT must name rank 0's host and the port".into(),
            })?;
            let port = addr
                .trim()
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| MeshError::Config {
                    name: "RSMSG_MANAGER",
                    reason: format!("{addr:?} has no non-zero port for the embedded manager"),
                })?;
            let token = match var("RSMSG_TOKEN") {
                Some(t) => Token::new(t.into_bytes()),
                None => Token::from_env(),
            }
            .map_err(|e| MeshError::Config {
                name: "RSMSG_TOKEN",
                reason: e.to_string(),
            })?;
            Some((format!("0.0.0.0:{port}"), token))
        } else {
            None
        };
        Ok(MeshSetup {
            job,
            embed_manager,
            timeout,
        })
    }
}

/// The endpoint name rank `rank` of job `job` listens under.
pub fn rank_name(job: &str, rank: u32) -> String {
    format!("{job}.r{rank}")
}

struct Peer {
    conn: Conn,
    /// Data messages copied aside while a barrier waited, in arrival order.
    stash: RefCell<VecDeque<Vec<u8>>>,
    /// Barrier tokens received from this peer.
    barriers: Cell<u64>,
}

/// A job's full mesh: one connection to every other rank.
///
/// # Thread safety
/// `Send`, not `Sync`: use a mesh from one thread at a time (wrap it in a mutex to share it).
pub struct Mesh {
    rank: u32,
    size: u32,
    /// Indexed by rank (`None` for this rank); boxed so that a slot costs a pointer until its
    /// peer connects.
    peers: Vec<Option<Box<Peer>>>,
    epoch: Cell<u64>,
    /// The barrier of `epoch` when it returned an error before it finished: its tokens sent.
    unfinished: Cell<Option<u32>>,
    /// Bytes of data messages copied aside, all peers together, and their bound.
    stashed: Cell<usize>,
    backlog_cap: Cell<usize>,
    _listener: Listener,
    _manager: Option<ManagerHandle>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// A message received through a [`Mesh`]: in place in the target segment (released on drop),
/// or a copy taken while a barrier waited.
pub enum MeshMessage<'a> {
    /// Read in place.
    InPlace(Msg<'a>),
    /// Copied aside.
    Copied(Vec<u8>),
}

impl Deref for MeshMessage<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            MeshMessage::InPlace(m) => &m[HEADER_LEN..],
            MeshMessage::Copied(v) => v,
        }
    }
}

impl std::fmt::Debug for MeshMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshMessage")
            .field("len", &self.len())
            .finish()
    }
}

/// How long a receive may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Never wait.
    No,
    /// Wait at most this long.
    For(Duration),
    /// Wait until a message comes or the connection fails.
    Forever,
}

fn step(s: impl Into<String>) -> impl FnOnce(EndpointError) -> MeshError {
    let step = s.into();
    move |source| MeshError::Endpoint {
        step,
        source: Box::new(source),
    }
}

/// Whether an error means "the peer (or the manager) is not there yet": worth retrying until
/// the setup deadline.
fn not_there_yet(e: &EndpointError) -> bool {
    use std::io::ErrorKind;
    match e {
        // A manager not reachable yet, or busy (as many clients as it serves, or as many
        // handshakes at once as it takes, which every rank of a large job starting together
        // can meet), or a name not registered yet.
        EndpointError::Bootstrap(b) | EndpointError::Transport(TransportError::Bootstrap(b)) => {
            b.is_unreachable() || b.code() == Some(ErrorCode::UnknownName)
        }
        EndpointError::Transport(TransportError::Io { source, .. }) => matches!(
            source.kind(),
            ErrorKind::NotFound | ErrorKind::ConnectionRefused
        ),
        _ => false,
    }
}

/// A connect the manager refused for its load (`LimitExceeded`: as many connection requests
/// already wait for that rank as the manager queues, or its rendezvous or queued-bytes budget is
/// spent). Every rank above connects to the lower ones at once, so a job larger than the
/// manager's queue meets this while the mesh forms; the waiting requests drain as the lower
/// rank accepts them, so such a connect is tried again, like one to a rank not there yet.
fn refused_for_load(e: &EndpointError) -> bool {
    match e {
        EndpointError::Bootstrap(b) | EndpointError::Transport(TransportError::Bootstrap(b)) => {
            b.code() == Some(ErrorCode::LimitExceeded)
        }
        _ => false,
    }
}

/// The limits of the manager rank 0 embeds for a job of `size` ranks: the defaults, raised so
/// that the job fits. Each rank's listener stays registered (a client and an endpoint), and each
/// rank opens one more client for the connect it is setting up; their connection requests all
/// wait for the listener of one lower rank at worst.
fn embedded_limits(size: u32) -> Limits {
    let n = size as usize;
    let mut l = Limits::default();
    l.max_clients = l.max_clients.max(2 * n + 32);
    l.max_endpoints = l.max_endpoints.max(n + 32);
    l.max_rendezvous = l.max_rendezvous.max(2 * n + 32);
    l
}

/// Calls `f` until it succeeds, fails with an error `again` does not accept, or `deadline`
/// passes (then [`MeshError::SetupTimeout`] with the last error).
fn retry<T>(
    deadline: Instant,
    timeout: Duration,
    what: &str,
    again: fn(&EndpointError) -> bool,
    mut f: impl FnMut() -> Result<T, EndpointError>,
) -> Result<T, MeshError> {
    let mut pause = Duration::from_millis(2);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if again(&e) => {
                if Instant::now() >= deadline {
                    return Err(MeshError::SetupTimeout(timeout, format!("{what}: {e}")));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(step(what)(e)),
        }
    }
}

impl Mesh {
    /// Rank and size from the launcher, endpoint settings from [`Config::from_env`], setup from
    /// [`MeshSetup::from_env`]; then connects to every other rank.
    ///
    /// # Errors
    /// No launcher, bad variables, or a failed setup (see [`Mesh::connect`]).
    pub fn from_env() -> Result<Mesh, MeshError> {
        let info = LaunchInfo::from_env()?.ok_or(MeshError::NoLauncher)?;
        let config = Config::from_env().map_err(step("endpoint configuration"))?;
        Mesh::connect(&config, info.rank, info.size, &MeshSetup::from_env()?)
    }

    /// Builds the full mesh for rank `rank` of `size`: listens, connects to every lower rank,
    /// accepts every higher one. Every rank of the job must call it with the same `size` and
    /// `setup.job`.
    ///
    /// # Errors
    /// [`MeshError::Config`] for a `size` above [`LaunchInfo::MAX_SIZE`] or a
    /// `setup.timeout` above [`MeshSetup::MAX_TIMEOUT`]; [`MeshError::BadRank`] for a rank not
    /// below `size`; a name already in use, a peer that does not come before `setup.timeout`,
    /// a failed handshake or a peer that sends something else than a hello.
    pub fn connect(
        config: &Config,
        rank: u32,
        size: u32,
        setup: &MeshSetup,
    ) -> Result<Mesh, MeshError> {
        if size > LaunchInfo::MAX_SIZE {
            return Err(MeshError::Config {
                name: "job size",
                reason: format!(
                    "{size} ranks is above the largest job size supported, {}",
                    LaunchInfo::MAX_SIZE
                ),
            });
        }
        if rank >= size {
            return Err(MeshError::BadRank {
                rank,
                size,
                me: rank,
            });
        }
        let too_long = || MeshError::Config {
            name: "RSMSG_MESH_TIMEOUT",
            reason: format!(
                "a setup timeout of {:?} is above the longest accepted, {} s",
                setup.timeout,
                MeshSetup::MAX_TIMEOUT.as_secs()
            ),
        };
        if setup.timeout > MeshSetup::MAX_TIMEOUT {
            return Err(too_long());
        }
        let deadline = Instant::now()
            .checked_add(setup.timeout)
            .ok_or_else(too_long)?;
        let manager = match (&setup.embed_manager, rank) {
            (Some((addr, token)), 0) => Some(
                Manager::bind_with(addr.as_str(), token.clone(), embedded_limits(size))
                    .map_err(MeshError::Manager)?,
            ),
            _ => None,
        };
        let me = rank_name(&setup.job, rank);
        let listener = retry(
            deadline,
            setup.timeout,
            &format!("listen as {me}"),
            not_there_yet,
            || Listener::bind(config, &me),
        )?;
        let mut peers: Vec<Option<Box<Peer>>> = (0..size).map(|_| None).collect();
        let mut hello = [0u8; HEADER_LEN];
        hello[0] = KIND_HELLO;
        hello[4..].copy_from_slice(&rank.to_le_bytes());
        for lower in 0..rank {
            let name = rank_name(&setup.job, lower);
            let what = format!("connect to rank {lower} ({name})");
            let conn = retry(
                deadline,
                setup.timeout,
                &what,
                |e| not_there_yet(e) || refused_for_load(e),
                || endpoint::connect(config, &name),
            )?;
            conn.send(&hello).map_err(|source| MeshError::Send {
                rank: lower,
                source,
            })?;
            peers[lower as usize] = Some(Box::new(Peer::new(conn)));
        }
        for _ in rank + 1..size {
            // A rank that never starts must not hang the others: accepting has the same deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            let conn = listener
                .accept_timeout(left)
                .map_err(step(format!("accept a higher rank as {me}")))?
                .ok_or_else(|| {
                    MeshError::SetupTimeout(
                        setup.timeout,
                        format!(
                            "rank {me} waited for the connections of ranks {} to {}; not all came",
                            rank + 1,
                            size - 1
                        ),
                    )
                })?;
            let left = deadline.saturating_duration_since(Instant::now());
            let from = {
                let m = conn.recv_timeout(left).map_err(|e| match e {
                    TransportError::Timeout(_) => MeshError::SetupTimeout(
                        setup.timeout,
                        "waiting for a connected rank's hello".into(),
                    ),
                    source => MeshError::Recv {
                        rank: u32::MAX,
                        source,
                    },
                })?;
                if m.len() != HEADER_LEN || m[0] != KIND_HELLO {
                    return Err(MeshError::Protocol {
                        rank: u32::MAX,
                        reason: "first message is not a mesh hello".into(),
                    });
                }
                u32::from_le_bytes([m[4], m[5], m[6], m[7]])
            };
            if from <= rank || from >= size || peers[from as usize].is_some() {
                return Err(MeshError::Protocol {
                    rank: from,
                    reason: format!(
                        "hello names rank {from}, not an expected higher rank of {size}"
                    ),
                });
            }
            peers[from as usize] = Some(Box::new(Peer::new(conn)));
        }
        Ok(Mesh {
            rank,
            size,
            peers,
            epoch: Cell::new(0),
            unfinished: Cell::new(None),
            stashed: Cell::new(0),
            backlog_cap: Cell::new(DEFAULT_BARRIER_BACKLOG),
            _listener: listener,
            _manager: manager,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The largest payload a message to `rank` can carry.
    ///
    /// # Errors
    /// [`MeshError::BadRank`].
    pub fn max_message(&self, rank: u32) -> Result<usize, MeshError> {
        Ok(self
            .peer(rank)?
            .conn
            .max_message()
            .saturating_sub(HEADER_LEN))
    }

    /// The connection's counters to `rank` (they include the mesh headers and barrier tokens).
    ///
    /// # Errors
    /// [`MeshError::BadRank`].
    pub fn stats(&self, rank: u32) -> Result<crate::transport::ConnectionStats, MeshError> {
        Ok(self.peer(rank)?.conn.stats())
    }

    fn peer(&self, rank: u32) -> Result<&Peer, MeshError> {
        self.peers
            .get(rank as usize)
            .and_then(Option::as_deref)
            .ok_or(MeshError::BadRank {
                rank,
                size: self.size,
                me: self.rank,
            })
    }

    /// Sends `msg` to `rank`, waiting for credits under back-pressure.
    ///
    /// # Errors
    /// [`MeshError::BadRank`], [`MeshError::Send`].
    pub fn send(&self, rank: u32, msg: &[u8]) -> Result<(), MeshError> {
        self.peer(rank)?
            .conn
            .send_vectored(&[&DATA_HEADER, msg])
            .map_err(|source| MeshError::Send { rank, source })
    }

    /// Sends `msg` to `rank` if partitions are free now ([`SendError::WouldBlock`] otherwise).
    ///
    /// # Errors
    /// As [`Mesh::send`].
    pub fn try_send(&self, rank: u32, msg: &[u8]) -> Result<(), MeshError> {
        self.peer(rank)?
            .conn
            .try_send_vectored(&[&DATA_HEADER, msg])
            .map_err(|source| MeshError::Send { rank, source })
    }

    /// Receives the next message from `rank`.
    ///
    /// # Errors
    /// [`MeshError::BadRank`]; [`MeshError::Recv`] with [`TransportError::Timeout`] when
    /// `wait` ran out (for [`Wait::No`], `Ok(None)` instead), a closed or failed connection.
    pub fn recv(&self, rank: u32, wait: Wait) -> Result<Option<MeshMessage<'_>>, MeshError> {
        let peer = self.peer(rank)?;
        if let Some(v) = peer.stash.borrow_mut().pop_front() {
            self.stashed.set(self.stashed.get() - v.len());
            return Ok(Some(MeshMessage::Copied(v)));
        }
        let deadline = match wait {
            Wait::For(d) => Some((Instant::now() + d, d)),
            _ => None,
        };
        let err = |source| MeshError::Recv { rank, source };
        loop {
            let m = match (wait, deadline) {
                (Wait::No, _) => match peer.conn.try_recv().map_err(err)? {
                    Some(m) => m,
                    None => return Ok(None),
                },
                (Wait::For(_), Some((at, d))) => {
                    let left = at.saturating_duration_since(Instant::now());
                    match peer.conn.recv_timeout(left) {
                        Ok(m) => m,
                        Err(TransportError::Timeout(_)) => {
                            return Err(err(TransportError::Timeout(d)));
                        }
                        Err(e) => return Err(err(e)),
                    }
                }
                _ => peer.conn.recv().map_err(err)?,
            };
            match kind(&m, rank)? {
                KIND_DATA => return Ok(Some(MeshMessage::InPlace(m))),
                _ => peer.barriers.set(peer.barriers.get() + 1),
            }
        }
    }

    /// Waits until every rank has entered the barrier (gather to rank 0, then release from it).
    /// After an error it has not finished: the next call resumes it rather than starting
    /// another.
    ///
    /// # Errors
    /// [`MeshError::BarrierBacklog`] (receive, then call again); a failed connection (a rank
    /// that died).
    pub fn barrier(&self) -> Result<(), MeshError> {
        let mut sent = match self.unfinished.take() {
            Some(sent) => sent,
            None => {
                self.epoch.set(self.epoch.get() + 1);
                0
            }
        };
        let r = self.run_barrier(&mut sent);
        if r.is_err() {
            self.unfinished.set(Some(sent));
        }
        r
    }

    /// The steps of a barrier not yet done; `sent` counts the tokens this rank has sent in it.
    fn run_barrier(&self, sent: &mut u32) -> Result<(), MeshError> {
        if self.size == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            for r in 1..self.size {
                self.wait_barrier(r)?;
            }
            while *sent < self.size - 1 {
                self.send_barrier(*sent + 1)?;
                *sent += 1;
            }
        } else {
            if *sent == 0 {
                self.send_barrier(0)?;
                *sent = 1;
            }
            self.wait_barrier(0)?;
        }
        Ok(())
    }

    /// Bounds the bytes of data messages a barrier copies aside, all peers together (default
    /// [`DEFAULT_BARRIER_BACKLOG`]); the bound may be passed by one message. Past it the barrier
    /// returns [`MeshError::BarrierBacklog`].
    pub fn set_barrier_backlog(&self, bytes: usize) {
        self.backlog_cap.set(bytes);
    }

    /// Bytes of data messages copied aside by barriers and not yet received.
    pub fn barrier_backlog(&self) -> usize {
        self.stashed.get()
    }

    fn send_barrier(&self, rank: u32) -> Result<(), MeshError> {
        self.peer(rank)?
            .conn
            .send(&BARRIER_HEADER)
            .map_err(|source| MeshError::Send { rank, source })
    }

    fn wait_barrier(&self, rank: u32) -> Result<(), MeshError> {
        let peer = self.peer(rank)?;
        while peer.barriers.get() < self.epoch.get() {
            let (bytes, cap) = (self.stashed.get(), self.backlog_cap.get());
            if bytes > cap {
                return Err(MeshError::BarrierBacklog { rank, bytes, cap });
            }
            let m = peer
                .conn
                .recv()
                .map_err(|source| MeshError::Recv { rank, source })?;
            match kind(&m, rank)? {
                KIND_DATA => {
                    let v = m[HEADER_LEN..].to_vec();
                    self.stashed.set(self.stashed.get() + v.len());
                    peer.stash.borrow_mut().push_back(v);
                }
                _ => peer.barriers.set(peer.barriers.get() + 1),
            }
        }
        Ok(())
    }

    /// Closes every connection (best effort; dropping the mesh does the same through the
    /// peers noticing the closed sockets).
    pub fn close(&self) {
        for p in self.peers.iter().flatten() {
            p.conn.close();
        }
    }
}

impl Peer {
    fn new(conn: Conn) -> Peer {
        Peer {
            conn,
            stash: RefCell::new(VecDeque::new()),
            barriers: Cell::new(0),
        }
    }
}

fn kind(m: &[u8], rank: u32) -> Result<u8, MeshError> {
    match m.first() {
        Some(&k @ (KIND_DATA | KIND_BARRIER)) if m.len() >= HEADER_LEN => {
            if k == KIND_BARRIER && m.len() != HEADER_LEN {
                return Err(MeshError::Protocol {
                    rank,
                    reason: "barrier token with a payload".into(),
                });
            }
            Ok(k)
        }
        _ => Err(MeshError::Protocol {
            rank,
            reason: format!("message of {} bytes without a mesh header", m.len()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| v.iter().find(|(n, _)| *n == k).map(|(_, x)| (*x).into())
    }

    fn refused(code: ErrorCode) -> EndpointError {
        EndpointError::Transport(TransportError::Bootstrap(BootstrapError::Remote {
            step: "connect",
            code,
            message: "refused".into(),
        }))
    }

    #[test]
    fn an_embedded_manager_has_room_for_the_whole_job() {
        let d = Limits::default();
        let small = embedded_limits(4);
        assert_eq!(
            (small.max_clients, small.max_endpoints, small.max_rendezvous),
            (d.max_clients, d.max_endpoints, d.max_rendezvous)
        );
        let big = embedded_limits(10_000);
        assert!(big.max_clients >= 20_000, "{}", big.max_clients);
        assert!(big.max_endpoints >= 10_000, "{}", big.max_endpoints);
        assert!(big.max_rendezvous >= 20_000, "{}", big.max_rendezvous);
        let max = embedded_limits(LaunchInfo::MAX_SIZE);
        assert!(max.max_clients >= 2 * LaunchInfo::MAX_SIZE as usize);
    }

    /// How many times `retry` calls a step that always fails with `code`, and whether it then
    /// gave up with that step's error.
    fn calls_until_given_up(again: fn(&EndpointError) -> bool, code: ErrorCode) -> (u32, bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut calls = 0;
        let r = retry(deadline, Duration::from_secs(60), "step", again, || {
            calls += 1;
            Err::<(), _>(refused(code))
        });
        (calls, matches!(r, Err(MeshError::Endpoint { .. })))
    }

    #[test]
    fn a_connect_refused_for_the_managers_load_is_tried_again_a_registration_is_not() {
        let connect_again = |e: &EndpointError| not_there_yet(e) || refused_for_load(e);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut calls = 0;
        let r = retry(
            deadline,
            Duration::from_secs(60),
            "connect",
            connect_again,
            || {
                calls += 1;
                if calls < 3 {
                    Err(refused(ErrorCode::LimitExceeded))
                } else {
                    Ok(calls)
                }
            },
        );
        assert_eq!(r.unwrap(), 3);
        // Other refusals end a connect at once, and listening (a registration the manager
        // refused for its limits) is not tried again either.
        assert_eq!(
            calls_until_given_up(connect_again, ErrorCode::InvalidRequest),
            (1, true)
        );
        assert_eq!(
            calls_until_given_up(not_there_yet, ErrorCode::LimitExceeded),
            (1, true)
        );
    }

    #[test]
    fn setup_from_vars() {
        let s = MeshSetup::from_vars(vars(&[])).unwrap();
        assert_eq!(s.job, DEFAULT_JOB);
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert!(s.embed_manager.is_none());
        let s = MeshSetup::from_vars(vars(&[
            ("RSMSG_EMBED_MANAGER", "1"),
            ("RSMSG_MANAGER", "node0:7400"),
            ("RSMSG_TOKEN", "a-long-enough-secret"),
            ("RSMSG_MESH_TIMEOUT", "5"),
            ("SLURM_JOB_ID", "12"),
            ("SLURM_STEP_ID", "0"),
        ]))
        .unwrap();
        assert_eq!(s.job, "12.0");
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.embed_manager.unwrap().0, "0.0.0.0:7400");
        let s = MeshSetup::from_vars(vars(&[("RSMSG_MESH_TIMEOUT", "31536000")])).unwrap();
        assert_eq!(s.timeout, MeshSetup::MAX_TIMEOUT);
        for bad in [
            &[("RSMSG_EMBED_MANAGER", "1")][..],
            &[("RSMSG_EMBED_MANAGER", "1"), ("RSMSG_MANAGER", "node0")][..],
            &[("RSMSG_EMBED_MANAGER", "1"), ("RSMSG_MANAGER", "node0:0")][..],
            &[("RSMSG_EMBED_MANAGER", "yes")][..],
            &[("RSMSG_MESH_TIMEOUT", "0")][..],
            &[("RSMSG_MESH_TIMEOUT", "31536001")][..],
            &[("RSMSG_MESH_TIMEOUT", "18446744073709551615")][..],
            &[("RSMSG_MESH_TIMEOUT", "18446744073709551616")][..],
        ] {
            let bad: &'static [(&'static str, &'static str)] = Box::leak(bad.to_vec().into());
            assert!(
                matches!(
                    MeshSetup::from_vars(vars(bad)),
                    Err(MeshError::Config { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn headers_are_checked() {
        assert_eq!(kind(&DATA_HEADER, 1).unwrap(), KIND_DATA);
        assert_eq!(
            kind(&[KIND_DATA, 0, 0, 0, 0, 0, 0, 0, 9], 1).unwrap(),
            KIND_DATA
        );
        assert_eq!(kind(&BARRIER_HEADER, 1).unwrap(), KIND_BARRIER);
        assert!(kind(&[KIND_BARRIER, 0, 0, 0, 0, 0, 0, 0, 1], 1).is_err());
        assert!(kind(&[KIND_DATA], 1).is_err());
        assert!(kind(&[], 1).is_err());
        assert!(kind(&[KIND_HELLO, 0, 0, 0, 0, 0, 0, 0], 1).is_err());
    }
}
