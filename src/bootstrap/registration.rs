//! A listener's registration that survives manager restarts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use tracing::{info, warn};

use super::auth::Token;
use super::client::{Incoming, ManagerClient};
use super::error::BootstrapError;
use super::wire::EndpointInfo;

/// Keeps an endpoint registered with a manager: when the manager connection is lost (the manager
/// restarted, the network failed), the next call reconnects and registers again.
///
/// Connections already established between endpoints never depend on this; only new connection
/// requests wait for the manager to come back.
#[derive(Debug)]
pub struct Registration {
    addrs: Vec<SocketAddr>,
    token: Token,
    info: EndpointInfo,
    timeout: Duration,
    client: Option<ManagerClient>,
}

impl Registration {
    /// Connects to the manager and registers `info`.
    ///
    /// # Errors
    /// The address does not resolve, or connecting or registering fails.
    pub fn new(
        addr: impl ToSocketAddrs,
        token: Token,
        info: EndpointInfo,
        timeout: Duration,
    ) -> Result<Self, BootstrapError> {
        let addrs = addr
            .to_socket_addrs()
            .map_err(|source| BootstrapError::Connect {
                addr: "(unresolvable)".into(),
                source,
            })?
            .collect();
        let mut r = Self {
            addrs,
            token,
            info,
            timeout,
            client: None,
        };
        r.client()?;
        Ok(r)
    }

    /// What is registered.
    pub fn info(&self) -> &EndpointInfo {
        &self.info
    }

    /// Whether a manager connection is up (as far as this side knows).
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// The manager connection holding the registration, reconnecting and registering again first
    /// if it was lost. Use it to answer an [`Incoming`] request.
    ///
    /// # Errors
    /// Connecting or registering fails; the next call tries again.
    pub fn client(&mut self) -> Result<&mut ManagerClient, BootstrapError> {
        if self.client.is_none() {
            let mut c = ManagerClient::connect(&self.addrs[..], &self.token, self.timeout)?;
            c.register(&self.info)?;
            info!(name = %self.info.name, manager = %c.manager_addr(), "registered with the manager");
            self.client = Some(c);
        }
        match self.client.as_mut() {
            Some(c) => Ok(c),
            None => Err(BootstrapError::Broken),
        }
    }

    /// Waits up to `timeout` for the next connection request (see
    /// [`ManagerClient::wait_connect`]), reconnecting first if needed.
    ///
    /// # Errors
    /// The manager is unreachable (the registration is restored on a later call) or refuses.
    pub fn accept(&mut self, timeout: Duration) -> Result<Option<Incoming>, BootstrapError> {
        let name = self.info.name.clone();
        let result = self.client()?.wait_connect(&name, timeout);
        self.check(result)
    }

    /// Runs `f` on the manager connection; a failure that leaves the connection unusable drops
    /// it so that the next call reconnects.
    ///
    /// # Errors
    /// As `f`, or as [`Self::client`].
    pub fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut ManagerClient) -> Result<T, BootstrapError>,
    ) -> Result<T, BootstrapError> {
        let result = f(self.client()?);
        self.check(result)
    }

    fn check<T>(&mut self, result: Result<T, BootstrapError>) -> Result<T, BootstrapError> {
        if let Err(e) = &result
            && e.is_unreachable()
        {
            warn!(name = %self.info.name, error = %e, "lost the manager; will register again");
            self.client = None;
        }
        result
    }
}

impl Drop for Registration {
    /// Unregisters, so that the name is unknown to the manager once the drop returns (closing
    /// the connection alone frees it only when the manager next notices, some time later, and a
    /// lookup in between finds a listener that is gone). Best effort, within the client's
    /// timeout: a manager that is gone or does not answer leaves the name to its own clean-up.
    fn drop(&mut self) {
        if let Some(c) = self.client.as_mut()
            && let Err(e) = c.unregister(&self.info.name)
        {
            tracing::debug!(name = %self.info.name, error = %e, "unregistering on drop failed");
        }
    }
}
