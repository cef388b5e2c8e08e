//! Endpoints: listen under a name, connect to a peer by name, with the transport chosen for the
//! pair (shared memory when both ends are on one host).
//!
//! Names are published through the bootstrap manager when one is configured
//! (`RSMSG_MANAGER`, `RSMSG_TOKEN`): a listener registers its host id and the Unix socket of its
//! shared-memory endpoint; a connector looks the name up and, when the host ids match, connects
//! over shared memory. Without a manager, names live in the local socket directory
//! ([`shm::socket_dir`]) and only same-host peers can be reached.

#![forbid(unsafe_code)]

use std::time::Duration;

use crate::bootstrap::{
    BootstrapError, EndpointInfo, EndpointName, HostId, ManagerClient, Registration, Token,
    TransportSet,
};
use crate::core::{ConfigError, Layout};
use crate::transport::shm::{self, ShmLink, ShmListener, ShmTarget};
use crate::transport::{Connection, Link, PollMode, TargetMemory, TransportError};

/// How long manager operations may take.
const MANAGER_TIMEOUT: Duration = Duration::from_secs(10);

/// Which transport a connection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// Shared memory for peers on this host, verbs otherwise.
    #[default]
    Auto,
    /// Shared memory only.
    Shm,
    /// RDMA verbs only.
    Verbs,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(TransportChoice::Auto),
            "shm" => Ok(TransportChoice::Shm),
            "verbs" => Ok(TransportChoice::Verbs),
            other => Err(format!("unknown transport {other:?} (auto, shm, verbs)")),
        }
    }
}

/// Errors of endpoint setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// A configuration value is invalid.
    #[error("configuration {name}: {reason}")]
    Config {
        /// The setting (environment variable or builder method).
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
    /// The transport failed.
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
}

/// Endpoint configuration: a builder, or [`Config::from_env`].
#[derive(Debug, Clone, Default)]
pub struct Config {
    transport: TransportChoice,
    layout: Layout,
    poll: PollMode,
    manager: Option<String>,
    token: Option<Token>,
}

impl Config {
    /// Defaults overridden by the environment: `RSMSG_TRANSPORT` (auto, shm, verbs),
    /// `RSMSG_GROUPS` (segment groups, `SIZE:COUNT:SPAN[:SEGMENTS],...`), `RSMSG_POLL` (busy,
    /// event, `adaptive[:SPINS]`), `RSMSG_MANAGER` (host:port) and `RSMSG_TOKEN`.
    ///
    /// # Errors
    /// Any variable that does not parse.
    pub fn from_env() -> Result<Config, EndpointError> {
        let mut c = Config::default();
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        if let Some(v) = var("RSMSG_TRANSPORT") {
            c.transport = v.parse().map_err(|reason| EndpointError::Config {
                name: "RSMSG_TRANSPORT",
                reason,
            })?;
        }
        if let Some(v) = var("RSMSG_GROUPS") {
            c.layout = v.parse()?;
        }
        if let Some(v) = var("RSMSG_POLL") {
            c.poll = v.parse().map_err(|reason| EndpointError::Config {
                name: "RSMSG_POLL",
                reason,
            })?;
        }
        c.manager = var("RSMSG_MANAGER");
        if c.manager.is_some() {
            c.token = Some(Token::from_env().map_err(|e| EndpointError::Config {
                name: "RSMSG_TOKEN",
                reason: e.to_string(),
            })?);
        }
        Ok(c)
    }

    /// Sets the transport choice.
    pub fn transport(mut self, t: TransportChoice) -> Self {
        self.transport = t;
        self
    }

    /// Sets the segment groups offered for messages sent to this endpoint.
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the poll mode.
    pub fn poll(mut self, mode: PollMode) -> Self {
        self.poll = mode;
        self
    }

    /// Uses the bootstrap manager at `addr` with `token`.
    pub fn manager(mut self, addr: impl Into<String>, token: Token) -> Self {
        self.manager = Some(addr.into());
        self.token = Some(token);
        self
    }

    /// The segment groups.
    pub fn get_layout(&self) -> &Layout {
        &self.layout
    }

    fn manager_parts(&self) -> Option<(&str, &Token)> {
        Some((self.manager.as_deref()?, self.token.as_ref()?))
    }
}

/// The link of a connection on any transport.
#[derive(Debug)]
pub enum AnyLink {
    /// Shared memory.
    Shm(ShmLink),
}

/// The target memory of a connection on any transport.
#[derive(Debug)]
pub enum AnyTarget {
    /// Shared memory.
    Shm(ShmTarget),
}

impl From<ShmLink> for AnyLink {
    fn from(l: ShmLink) -> Self {
        AnyLink::Shm(l)
    }
}

impl From<ShmTarget> for AnyTarget {
    fn from(t: ShmTarget) -> Self {
        AnyTarget::Shm(t)
    }
}

macro_rules! each_link {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            AnyLink::Shm($l) => $e,
        }
    };
}

impl Link for AnyLink {
    #[inline]
    fn write(
        &mut self,
        segment: crate::core::SegmentId,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransportError> {
        each_link!(self, l => l.write(segment, offset, bytes))
    }
    #[inline]
    fn fill(
        &mut self,
        segment: crate::core::SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransportError> {
        each_link!(self, l => l.fill(segment, offset, len))
    }
    #[inline]
    fn post(
        &mut self,
        segment: crate::core::SegmentId,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> Result<(), TransportError> {
        each_link!(self, l => l.post(segment, offset, len, imm))
    }
    #[inline]
    fn next_immediate(
        &mut self,
        mode: PollMode,
        timeout: Option<Duration>,
    ) -> Result<Option<u32>, TransportError> {
        each_link!(self, l => l.next_immediate(mode, timeout))
    }
    #[inline]
    fn publish_credit(&mut self, credit: crate::core::CreditUpdate) -> Result<(), TransportError> {
        each_link!(self, l => l.publish_credit(credit))
    }
    #[inline]
    fn want_credit_notice(&mut self) {
        each_link!(self, l => l.want_credit_notice())
    }
    #[inline]
    fn credit(&self, segment: crate::core::SegmentId) -> u64 {
        each_link!(self, l => l.credit(segment))
    }
    #[inline]
    fn check_peer(&self) -> Result<(), TransportError> {
        each_link!(self, l => l.check_peer())
    }
    // Rendezvous (transport/rndv.rs): forwarded.
    fn rndv_expose<'b>(
        &mut self,
        buf: &'b [u8],
    ) -> Result<Option<crate::transport::Exposure<'b>>, TransportError> {
        each_link!(self, l => l.rndv_expose(buf))
    }
    fn rndv_read(
        &mut self,
        req: &crate::core::RndvRequest,
        dst: &mut [u8],
        cacheable: bool,
    ) -> Result<Result<(), u32>, TransportError> {
        each_link!(self, l => l.rndv_read(req, dst, cacheable))
    }
    fn rndv_set_cache_cap(&mut self, bytes: usize) {
        each_link!(self, l => l.rndv_set_cache_cap(bytes))
    }
    fn rndv_cache_stats(&self) -> Option<crate::verbs::RegCacheStats> {
        each_link!(self, l => l.rndv_cache_stats())
    }
    fn rndv_invalidate(&mut self, addr: u64, len: usize) -> usize {
        each_link!(self, l => l.rndv_invalidate(addr, len))
    }
}

impl TargetMemory for AnyTarget {
    #[inline]
    fn bytes(
        &self,
        segment: crate::core::SegmentId,
        offset: usize,
        len: usize,
    ) -> Result<&[u8], TransportError> {
        match self {
            AnyTarget::Shm(t) => t.bytes(segment, offset, len),
        }
    }
}

/// A connection on whichever transport was chosen.
pub type Conn = Connection<AnyLink, AnyTarget>;

/// A message received on a [`Conn`].
pub type Msg<'a> = crate::transport::Message<'a, AnyLink, AnyTarget>;

/// A listening endpoint.
#[derive(Debug)]
pub struct Listener {
    name: String,
    shm: ShmListener,
    _registration: Option<Registration>,
}

impl Listener {
    /// Listens under `name`: binds the shared-memory socket and, with a manager configured,
    /// registers the name there.
    ///
    /// # Errors
    /// A bad or taken name, a manager that cannot be reached or refuses.
    pub fn bind(config: &Config, name: &str) -> Result<Listener, EndpointError> {
        if config.transport == TransportChoice::Verbs {
            return Err(EndpointError::Config {
                name: "RSMSG_TRANSPORT",
                reason: "verbs listeners are not available through endpoints yet".into(),
            });
        }
        let ep_name = EndpointName::new(name).map_err(|e| EndpointError::Config {
            name: "endpoint name",
            reason: e.to_string(),
        })?;
        let shm = ShmListener::bind(name, config.layout.clone(), config.poll)?;
        let registration = match config.manager_parts() {
            Some((addr, token)) => {
                let info = EndpointInfo {
                    name: ep_name,
                    host_id: host_id()?,
                    transports: TransportSet::SHM,
                    shm_socket: Some(shm.path().to_string_lossy().into_owned()),
                };
                Some(Registration::new(
                    addr,
                    token.clone(),
                    info,
                    MANAGER_TIMEOUT,
                )?)
            }
            None => None,
        };
        Ok(Listener {
            name: name.to_string(),
            shm,
            _registration: registration,
        })
    }

    /// The name listened under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Accepts the next connection.
    ///
    /// # Errors
    /// A failed handshake (the listener stays usable).
    pub fn accept(&self) -> Result<Conn, EndpointError> {
        Ok(self.shm.accept()?.convert())
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
/// # Errors
/// No such endpoint, no transport both can use, or a failed handshake.
pub fn connect(config: &Config, name: &str) -> Result<Conn, EndpointError> {
    let Some((addr, token)) = config.manager_parts() else {
        if config.transport == TransportChoice::Verbs {
            return Err(EndpointError::Config {
                name: "RSMSG_MANAGER",
                reason: "verbs connections need a bootstrap manager".into(),
            });
        }
        return Ok(shm::connect(name, config.layout.clone(), config.poll)?.convert());
    };
    let ep_name = EndpointName::new(name).map_err(|e| EndpointError::Config {
        name: "endpoint name",
        reason: e.to_string(),
    })?;
    let mut client = ManagerClient::connect(addr, token, MANAGER_TIMEOUT)?;
    let info = client.lookup(&ep_name)?;
    let same_host = info.host_id == host_id()?;
    match (config.transport, same_host, info.shm_socket.as_deref()) {
        (TransportChoice::Auto | TransportChoice::Shm, true, Some(path)) => {
            Ok(shm::connect_path(path.as_ref(), config.layout.clone(), config.poll)?.convert())
        }
        (TransportChoice::Shm, false, _) => Err(EndpointError::NoTransport {
            peer: name.into(),
            reason: "shared memory was asked for but the peer is on another host".into(),
        }),
        _ => Err(EndpointError::NoTransport {
            peer: name.into(),
            reason: "the peer offers no transport this endpoint can use".into(),
        }),
    }
}
