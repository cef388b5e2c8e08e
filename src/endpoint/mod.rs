//! Endpoints: listen under a name, connect to a peer by name, with the transport chosen for
//! each pair; receive from any peer.
//!
//! - [`Config`]: the settings, from a builder or the `RSMSG_*` environment.
//! - [`Listener`]: a name, accepting over shared memory (peers on this host) and RDMA verbs
//!   (peers anywhere) at once.
//! - [`connect`]: a [`Conn`] to a named peer: shared memory when both run on one host and the
//!   configuration allows it, verbs otherwise.
//! - [`Endpoint`]: many connections (accepted and connected) behind one receive call that
//!   reports who sent each message, sends by [`PeerId`], and drops peers that fail.
//!
//! Names are published through the bootstrap manager when one is configured (`RSMSG_MANAGER`,
//! `RSMSG_TOKEN`): a listener registers its host id, the transports it accepts and the Unix
//! socket of its shared-memory side; a connector looks the name up and picks the transport.
//! Without a manager, names live in the local socket directory
//! ([`crate::transport::shm::socket_dir`]) and only same-host peers can be
//! reached. See `docs/api.md` for the whole model.

#![forbid(unsafe_code)]

mod any;
mod config;
mod listener;
mod peers;

use std::time::{Duration, Instant};

pub use any::{AnyLink, AnyTarget, Conn, Msg, Transport};
pub use config::{Config, TransportChoice};
pub use listener::{Accepted, Listener};
pub use peers::{Endpoint, PeerId, PeerInfo, Received};

use crate::bootstrap::{
    BootstrapError, EndpointName, ErrorCode, HostId, ManagerClient, TransportSet,
};
use crate::core::ConfigError;
use crate::transport::shm;
use crate::transport::{SendError, TransportError, verbs};

/// How long one manager operation may take.
const MANAGER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between connection attempts while the peer is not there yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Errors of the endpoint layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// A configuration value is invalid.
    #[error("configuration {name}: {reason}")]
    Config {
        /// The setting, by its environment variable (or "endpoint name").
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The segment group layout is invalid.
    #[error("segment groups: {0}")]
    Layout(#[from] ConfigError),
    /// The bootstrap manager failed or refused.
    #[error("bootstrap manager: {0}")]
    Bootstrap(#[from] BootstrapError),
    /// The transport failed (setup, or a connection used directly).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// No transport both ends can use.
    #[error("no usable transport to {peer}: {reason}")]
    NoTransport {
        /// The peer's name.
        peer: String,
        /// Why.
        reason: String,
    },
    /// [`Endpoint`] has no peer with this id (never had, or removed after a failure).
    #[error("no peer {0}")]
    UnknownPeer(PeerId),
    /// A send through an [`Endpoint`] did not happen. [`SendError::WouldBlock`] is
    /// back-pressure (see [`EndpointError::is_would_block`]); a transport failure also shows
    /// as [`EndpointError::PeerFailed`] at the next receive, which removes the peer.
    #[error("send to {peer}: {source}")]
    Send {
        /// The destination.
        peer: PeerId,
        /// Why.
        #[source]
        source: SendError,
    },
    /// A send on a [`Conn`] used directly did not happen (lets `?` carry a [`SendError`] in
    /// functions returning [`EndpointError`]).
    #[error(transparent)]
    ConnSend(#[from] SendError),
    /// A peer of an [`Endpoint`] failed (closed, died, broke the protocol) and was removed; the
    /// endpoint and its other peers carry on.
    #[error("peer {peer} failed and was removed: {source}")]
    PeerFailed {
        /// Who.
        peer: PeerInfo,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// An [`Endpoint`] without a listener has no peer left to receive from.
    #[error("no peers to receive from (and no listener to accept more)")]
    NoPeers,
}

impl EndpointError {
    /// Whether this is back-pressure on a non-blocking send (retry later).
    pub fn is_would_block(&self) -> bool {
        matches!(
            self,
            EndpointError::Send {
                source: SendError::WouldBlock,
                ..
            } | EndpointError::ConnSend(SendError::WouldBlock)
        )
    }

    /// The peer removed by this error, for [`EndpointError::PeerFailed`].
    pub fn failed_peer(&self) -> Option<&PeerInfo> {
        match self {
            EndpointError::PeerFailed { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// Whether the error concerns one peer only ([`EndpointError::PeerFailed`],
    /// [`EndpointError::Send`], [`EndpointError::UnknownPeer`]): the endpoint stays usable.
    pub fn is_peer_error(&self) -> bool {
        matches!(
            self,
            EndpointError::PeerFailed { .. }
                | EndpointError::Send { .. }
                | EndpointError::UnknownPeer(_)
        )
    }
}

fn host_id() -> Result<HostId, EndpointError> {
    HostId::local().map_err(|e| EndpointError::Config {
        name: "host id",
        reason: e.to_string(),
    })
}

/// Connects to the endpoint listening under `name`.
///
/// With a manager: looks the name up and connects over shared memory when the peer runs on this
/// host, offers shared memory, and the configuration allows it (`auto`, `shm`); over verbs
/// otherwise (`auto` across hosts, always under `verbs`). Without a manager: shared memory to a
/// listener of this host. While the manager is unreachable, the name not registered, or the
/// manager refuses the request for its load (`LimitExceeded`), retries for
/// [`Config::connect_retry`].
///
/// # Errors
/// An invalid configuration, no such endpoint, no transport both ends can use, a failed
/// handshake.
pub fn connect(config: &Config, name: &str) -> Result<Conn, EndpointError> {
    Ok(connect_any(config, name)?.0)
}

/// As [`connect`], also saying which transport was chosen.
pub(crate) fn connect_any(config: &Config, name: &str) -> Result<(Conn, Transport), EndpointError> {
    config.validate()?;
    let deadline = Instant::now().checked_add(config.connect_retry);
    loop {
        match connect_once(config, name) {
            Err(e) if retryable(&e) && deadline.is_some_and(|d| Instant::now() < d) => {
                tracing::debug!(error = %e, peer = name, "peer not there yet; retrying");
                std::thread::sleep(RETRY_PAUSE);
            }
            r => return r,
        }
    }
}

fn retryable(e: &EndpointError) -> bool {
    let boot = |b: &BootstrapError| {
        b.is_unreachable()
            || matches!(
                b.code(),
                Some(ErrorCode::UnknownName | ErrorCode::LimitExceeded)
            )
    };
    match e {
        EndpointError::Bootstrap(b) | EndpointError::Transport(TransportError::Bootstrap(b)) => {
            boot(b)
        }
        EndpointError::Transport(TransportError::Io { source, .. }) => matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
        _ => false,
    }
}

fn connect_once(config: &Config, name: &str) -> Result<(Conn, Transport), EndpointError> {
    let layout = config.layout.clone();
    let Some((addr, token)) = config.manager_parts() else {
        // validate(): no manager means not verbs.
        return Ok((
            shm::connect(name, layout, config.poll)?.convert(),
            Transport::Shm,
        ));
    };
    let ep_name = EndpointName::new(name).map_err(|e| EndpointError::Config {
        name: "endpoint name",
        reason: e.to_string(),
    })?;
    let mut client = ManagerClient::connect(addr, token, MANAGER_TIMEOUT)?;
    let info = client.lookup(&ep_name)?;
    let same_host = info.host_id == host_id()?;
    let shm_path = info
        .shm_socket
        .as_deref()
        .filter(|_| info.transports.contains(TransportSet::SHM));
    let has_verbs = info.transports.contains(TransportSet::VERBS);
    let no = |reason: &str| EndpointError::NoTransport {
        peer: name.into(),
        reason: reason.into(),
    };
    let use_shm = match config.transport {
        TransportChoice::Shm if !same_host => {
            return Err(no(
                "shared memory was asked for (RSMSG_TRANSPORT=shm) but the peer is on another host",
            ));
        }
        TransportChoice::Shm => {
            shm_path.ok_or_else(|| no("the peer does not accept shared memory"))?;
            true
        }
        TransportChoice::Verbs if !has_verbs => {
            return Err(no(
                "verbs was asked for (RSMSG_TRANSPORT=verbs) but the peer does not accept verbs",
            ));
        }
        TransportChoice::Verbs => false,
        TransportChoice::Auto => match (same_host, shm_path.is_some(), has_verbs) {
            (true, true, _) => true,
            (_, _, true) => false,
            (false, _, false) => {
                return Err(no(
                    "the peer is on another host and accepts shared memory only",
                ));
            }
            (true, false, false) => return Err(no("the peer offers no transport")),
        },
    };
    match shm_path {
        Some(path) if use_shm => Ok((
            shm::connect_path(path.as_ref(), layout, config.poll)?.convert(),
            Transport::Shm,
        )),
        _ => Ok((
            verbs::connect_with(&mut client, name, layout, config.poll, &config.verbs)?.convert(),
            Transport::Verbs,
        )),
    }
}

/// Compile-time proof of the thread-safety promises made in the documentation.
#[allow(dead_code)]
fn assert_thread_safety() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<Conn>();
    send::<Config>();
    sync::<Config>();
    send::<Listener>();
    sync::<Listener>();
    send::<Endpoint>();
    send::<EndpointError>();
    sync::<EndpointError>();
}
