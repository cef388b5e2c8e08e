//! Endpoint configuration: a builder, or the `RSMSG_*` environment.

use std::time::Duration;

use super::EndpointError;
use crate::bootstrap::Token;
use crate::core::{Layout, RndvConfig};
use crate::transport::PollMode;
use crate::transport::verbs::VerbsOptions;
use crate::verbs::{GidIndex, GidSelector};

/// Which transport connections may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum TransportChoice {
    /// Shared memory for peers on this host, verbs for the others (when a manager is configured
    /// and an RDMA device is present).
    #[default]
    Auto,
    /// Shared memory only: peers on this host.
    Shm,
    /// RDMA verbs only, even between processes of one host (needs a manager).
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

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Shm => "shm",
            TransportChoice::Verbs => "verbs",
        })
    }
}

/// Endpoint configuration: start from [`Config::default`] or [`Config::from_env`], then adjust
/// with the builder methods.
///
/// | Variable | Builder | Default | Meaning |
/// |---|---|---|---|
/// | `RSMSG_TRANSPORT` | [`transport`](Config::transport) | `auto` | `auto`, `shm` or `verbs` |
/// | `RSMSG_MANAGER` | [`manager`](Config::manager) | none | bootstrap manager, `host:port` |
/// | `RSMSG_TOKEN` | [`manager`](Config::manager) | none | shared secret (8-1024 bytes), required with a manager |
/// | `RSMSG_GROUPS` | [`layout`](Config::layout) | [`Layout::default`] | segment groups, `SIZE:COUNT:SPAN[:SEGMENTS],...` |
/// | `RSMSG_POLL` | [`poll`](Config::poll) | `busy` | `busy`, `event`, `adaptive[:SPINS]` |
/// | `RSMSG_DEVICE` | [`device`](Config::device) | first device | RDMA device name |
/// | `RSMSG_GID_INDEX` | [`gid_index`](Config::gid_index) | automatic | GID table index (0-255) |
/// | `RSMSG_PORT` | [`verbs_options`](Config::verbs_options) | 1 | RDMA port number |
/// | `RSMSG_QP_TIMEOUT` | [`verbs_options`](Config::verbs_options) | 17 | QP ACK timeout exponent (1-31) |
/// | `RSMSG_STALL_TIMEOUT` | [`verbs_options`](Config::verbs_options) | 10 | seconds without a send completion before a verbs connection fails as stalled (1-86400; see [`VerbsOptions::stall_limit`]) |
///
/// The rendezvous variables (`RSMSG_RNDV_THRESHOLD`, `RSMSG_RNDV_MAX`, `RSMSG_RNDV_CACHE`,
/// `RSMSG_RNDV_SEND_CACHE`, `RSMSG_RNDV_STREAM_ONLY`; see [`RndvConfig`]) are not settings of
/// a `Config`: every connection reads them from the process environment when it is set up, and
/// fails on a malformed value. [`Config::from_env`] and [`Config::validate`] (so
/// [`Listener::bind`](super::Listener::bind) and [`connect`](super::connect) too) check them
/// there, so that a malformed value is a configuration error up front.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub(super) transport: TransportChoice,
    pub(super) layout: Layout,
    pub(super) poll: PollMode,
    pub(super) manager: Option<String>,
    pub(super) token: Option<Token>,
    pub(super) verbs: VerbsOptions,
    pub(super) connect_retry: Duration,
}

fn config_err(name: &'static str, reason: impl Into<String>) -> EndpointError {
    EndpointError::Config {
        name,
        reason: reason.into(),
    }
}

impl Config {
    /// Environment variable: the transport choice.
    pub const ENV_TRANSPORT: &'static str = "RSMSG_TRANSPORT";
    /// Environment variable: the bootstrap manager's address.
    pub const ENV_MANAGER: &'static str = "RSMSG_MANAGER";
    /// Environment variable: the manager's shared secret.
    pub const ENV_TOKEN: &'static str = "RSMSG_TOKEN";
    /// Environment variable: the segment groups offered to senders.
    pub const ENV_GROUPS: &'static str = "RSMSG_GROUPS";
    /// Environment variable: the poll mode.
    pub const ENV_POLL: &'static str = "RSMSG_POLL";
    /// Environment variable: the RDMA device.
    pub const ENV_DEVICE: &'static str = "RSMSG_DEVICE";
    /// Environment variable: the GID index.
    pub const ENV_GID_INDEX: &'static str = "RSMSG_GID_INDEX";
    /// Environment variable: the RDMA port.
    pub const ENV_PORT: &'static str = "RSMSG_PORT";
    /// Environment variable: the QP ACK timeout exponent.
    pub const ENV_QP_TIMEOUT: &'static str = "RSMSG_QP_TIMEOUT";
    /// Environment variable: the verbs stall timeout in seconds.
    pub const ENV_STALL_TIMEOUT: &'static str = "RSMSG_STALL_TIMEOUT";

    /// Every variable [`Config::from_env`] reads: the settings of the table above, then the
    /// rendezvous variables it checks ([`RndvConfig::ENV_VARS`]).
    pub const ENV_VARS: [&'static str; 15] = [
        Self::ENV_TRANSPORT,
        Self::ENV_MANAGER,
        Self::ENV_TOKEN,
        Self::ENV_GROUPS,
        Self::ENV_POLL,
        Self::ENV_DEVICE,
        Self::ENV_GID_INDEX,
        Self::ENV_PORT,
        Self::ENV_QP_TIMEOUT,
        Self::ENV_STALL_TIMEOUT,
        RndvConfig::ENV_THRESHOLD,
        RndvConfig::ENV_MAX_RECV,
        RndvConfig::ENV_CACHE,
        RndvConfig::ENV_SEND_CACHE,
        RndvConfig::ENV_STREAM_ONLY,
    ];

    /// The defaults overridden by the `RSMSG_*` environment variables (see the table above).
    /// Unset and empty variables keep the default.
    ///
    /// # Errors
    /// [`EndpointError::Config`] naming the first variable that is not valid (not UTF-8, does
    /// not parse, out of range, or inconsistent with another: `RSMSG_MANAGER` without
    /// `RSMSG_TOKEN`, `RSMSG_TRANSPORT=verbs` without `RSMSG_MANAGER`), the rendezvous
    /// variables included.
    pub fn from_env() -> Result<Config, EndpointError> {
        for name in Self::ENV_VARS {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(name) {
                return Err(config_err(name, "not valid UTF-8"));
            }
        }
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`Config::from_env`], reading the variables through `lookup` instead of the process
    /// environment (for configuration files, command lines and tests). The rendezvous
    /// variables are still checked in the process environment (see [`Config::validate`]), where
    /// connections read them.
    ///
    /// # Errors
    /// As [`Config::from_env`].
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, EndpointError> {
        let var = |n: &str| lookup(n).filter(|v| !v.trim().is_empty());
        let mut c = Config::default();
        if let Some(v) = var(Self::ENV_TRANSPORT) {
            c.transport = v
                .parse()
                .map_err(|reason: String| config_err(Self::ENV_TRANSPORT, reason))?;
        }
        if let Some(v) = var(Self::ENV_GROUPS) {
            c.layout = v.parse().map_err(|e: crate::core::ConfigError| {
                config_err(Self::ENV_GROUPS, e.to_string())
            })?;
        }
        if let Some(v) = var(Self::ENV_POLL) {
            c.poll = v
                .parse()
                .map_err(|reason: String| config_err(Self::ENV_POLL, reason))?;
        }
        if let Some(v) = var(Self::ENV_MANAGER) {
            let v = v.trim();
            check_manager_addr(v).map_err(|r| config_err(Self::ENV_MANAGER, r))?;
            c.manager = Some(v.to_string());
        }
        match var(Self::ENV_TOKEN) {
            Some(v) => {
                c.token =
                    Some(Token::new(v).map_err(|e| config_err(Self::ENV_TOKEN, e.to_string()))?)
            }
            None if c.manager.is_some() => {
                return Err(config_err(
                    Self::ENV_TOKEN,
                    "required with RSMSG_MANAGER (the manager's shared secret)",
                ));
            }
            None => {}
        }
        if let Some(v) = var(Self::ENV_DEVICE) {
            check_device(&v).map_err(|r| config_err(Self::ENV_DEVICE, r))?;
            c.verbs.device = Some(v.trim().to_string());
        }
        if let Some(v) = var(Self::ENV_GID_INDEX) {
            let i: u8 = v.trim().parse().map_err(|_| {
                config_err(
                    Self::ENV_GID_INDEX,
                    format!("{v:?} is not a GID index (0-255)"),
                )
            })?;
            c.verbs.gid = GidSelector::Index(GidIndex(i));
        }
        if let Some(v) = var(Self::ENV_PORT) {
            c.verbs.port = v
                .trim()
                .parse()
                .ok()
                .filter(|&p: &u8| p >= 1)
                .ok_or_else(|| {
                    config_err(Self::ENV_PORT, format!("{v:?} is not a port (1-255)"))
                })?;
        }
        if let Some(v) = var(Self::ENV_QP_TIMEOUT) {
            c.verbs.params.timeout = v
                .trim()
                .parse()
                .ok()
                .filter(|t: &u8| (1..=31).contains(t))
                .ok_or_else(|| {
                    config_err(
                        Self::ENV_QP_TIMEOUT,
                        format!("{v:?} is not a timeout exponent (1-31)"),
                    )
                })?;
        }
        if let Some(v) = var(Self::ENV_STALL_TIMEOUT) {
            c.verbs.stall_timeout = VerbsOptions::parse_stall_timeout(&v).ok_or_else(|| {
                config_err(
                    Self::ENV_STALL_TIMEOUT,
                    format!("{v:?} is not a stall timeout (whole seconds, 1-86400)"),
                )
            })?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks that the settings fit together: verbs needs a manager, a manager needs a token,
    /// the manager address is `host:port`; and that the rendezvous variables of the process
    /// environment (`RSMSG_RNDV_*`, read by every connection when it is set up) are valid.
    /// [`Listener::bind`](super::Listener::bind) and [`connect`](super::connect) call it.
    ///
    /// # Errors
    /// [`EndpointError::Config`] naming the setting by its environment variable.
    pub fn validate(&self) -> Result<(), EndpointError> {
        if let Some(addr) = &self.manager {
            check_manager_addr(addr).map_err(|r| config_err(Self::ENV_MANAGER, r))?;
            if self.token.is_none() {
                return Err(config_err(
                    Self::ENV_TOKEN,
                    "required with RSMSG_MANAGER (the manager's shared secret)",
                ));
            }
        } else if self.transport == TransportChoice::Verbs {
            return Err(config_err(
                Self::ENV_MANAGER,
                "RSMSG_TRANSPORT=verbs needs a bootstrap manager (host:port) to find peers",
            ));
        }
        if let Some(d) = &self.verbs.device {
            check_device(d).map_err(|r| config_err(Self::ENV_DEVICE, r))?;
        }
        RndvConfig::from_env().map_err(|e| config_err(e.var(), e.to_string()))?;
        Ok(())
    }

    /// Checks a bootstrap manager address as [`Config::manager`] takes it: `host:port`, a
    /// non-empty host without whitespace, a port 1-65535, nothing around them (surrounding
    /// whitespace is refused: the address is used as given).
    ///
    /// # Errors
    /// [`EndpointError::Config`] naming `RSMSG_MANAGER`.
    pub fn check_manager_addr(addr: &str) -> Result<(), EndpointError> {
        check_manager_addr(addr).map_err(|r| config_err(Self::ENV_MANAGER, r))
    }

    /// Sets the transport choice (`RSMSG_TRANSPORT`).
    pub fn transport(mut self, t: TransportChoice) -> Self {
        self.transport = t;
        self
    }

    /// Sets the segment groups offered for messages sent to this endpoint (`RSMSG_GROUPS`).
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the poll mode (`RSMSG_POLL`).
    pub fn poll(mut self, mode: PollMode) -> Self {
        self.poll = mode;
        self
    }

    /// Uses the bootstrap manager at `addr` (`host:port`, `RSMSG_MANAGER`) with `token`
    /// (`RSMSG_TOKEN`). The address is used as given: [`Config::validate`] refuses one that is
    /// not `host:port` (see [`Config::check_manager_addr`]).
    pub fn manager(mut self, addr: impl Into<String>, token: Token) -> Self {
        self.manager = Some(addr.into());
        self.token = Some(token);
        self
    }

    /// Uses the RDMA device `name` (`RSMSG_DEVICE`).
    pub fn device(mut self, name: impl Into<String>) -> Self {
        self.verbs.device = Some(name.into());
        self
    }

    /// Uses GID table entry `index` (`RSMSG_GID_INDEX`) instead of the automatic choice.
    pub fn gid_index(mut self, index: u8) -> Self {
        self.verbs.gid = GidSelector::Index(GidIndex(index));
        self
    }

    /// Replaces every verbs setting (device, port, GID, QP parameters, queue depths, setup
    /// timeout).
    pub fn verbs_options(mut self, opts: VerbsOptions) -> Self {
        self.verbs = opts;
        self
    }

    /// How long [`connect`](super::connect) keeps retrying while the manager is unreachable,
    /// the name is not registered yet, or the manager refuses the request for its load
    /// (`LimitExceeded`, say too many connection requests waiting for that listener) (default:
    /// no retry). Lets a client start before its server.
    pub fn connect_retry(mut self, patience: Duration) -> Self {
        self.connect_retry = patience;
        self
    }

    /// The transport choice.
    pub fn get_transport(&self) -> TransportChoice {
        self.transport
    }

    /// The segment groups.
    pub fn get_layout(&self) -> &Layout {
        &self.layout
    }

    /// The poll mode.
    pub fn get_poll(&self) -> PollMode {
        self.poll
    }

    /// The manager's address, if one is configured.
    pub fn get_manager(&self) -> Option<&str> {
        self.manager.as_deref()
    }

    /// The verbs settings.
    pub fn get_verbs_options(&self) -> &VerbsOptions {
        &self.verbs
    }

    /// How long connects retry.
    pub fn get_connect_retry(&self) -> Duration {
        self.connect_retry
    }

    pub(super) fn manager_parts(&self) -> Option<(&str, &Token)> {
        Some((self.manager.as_deref()?, self.token.as_ref()?))
    }
}

fn check_manager_addr(addr: &str) -> Result<(), String> {
    if addr.trim() != addr {
        return Err(format!(
            "{addr:?} has whitespace around it (expected host:port)"
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} is not host:port"));
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(format!("{addr:?} has no host before the port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{addr:?}: {port:?} is not a port (1-65535)")),
    }
}

fn check_device(name: &str) -> Result<(), String> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a device name (1-64 bytes of [A-Za-z0-9._-])"
        ))
    }
}
