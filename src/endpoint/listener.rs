//! The listener: one name, accepting over shared memory and verbs at once.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Config, Conn, EndpointError, MANAGER_TIMEOUT, Transport, TransportChoice, host_id};
use crate::bootstrap::{EndpointInfo, EndpointName, Registration, TransportSet};
use crate::shm::EventFd;
use crate::transport::TransportError;
use crate::transport::shm::ShmListener;
use crate::transport::verbs::VerbsListener;

/// How long the verbs accept thread waits on the manager before it looks at the stop flag.
const VERBS_ACCEPT_SLICE: Duration = Duration::from_millis(100);
/// How often a shared-memory-only listener checks its manager connection (and registers again
/// with a manager that restarted).
const KEEP_REGISTERED_EVERY: Duration = Duration::from_secs(1);
/// Connections accepted and not yet taken, per listener.
const BACKLOG: usize = 64;

/// A connection a [`Listener`] accepted, with the transport it came over.
#[derive(Debug)]
#[non_exhaustive]
pub struct Accepted {
    /// The connection.
    pub conn: Conn,
    /// Its transport.
    pub transport: Transport,
}

type Item = Result<Accepted, EndpointError>;

/// A listening endpoint: one name, published through the bootstrap manager when one is
/// configured, accepting over every transport the configuration allows.
///
/// - shared memory (unless `RSMSG_TRANSPORT=verbs`): a Unix socket in the socket directory
///   ([`crate::transport::shm::socket_dir`]) for peers on this host;
/// - verbs (unless `RSMSG_TRANSPORT=shm`, and only with a manager): connection requests through
///   the manager. Under `auto` a host without a usable RDMA device listens on shared memory
///   only; under `verbs` that is an error.
///
/// Both are registered under the one name (with the host id), so a connector picks shared memory
/// when it runs on the same host and verbs otherwise. Each transport accepts on a background
/// thread that completes the handshake, so a slow peer delays no one; [`Listener::accept`]
/// takes the next finished connection. Dropping the listener stops those threads and
/// unregisters the name.
///
/// `Listener` is `Send` and `Sync`: any thread may accept.
#[derive(Debug)]
pub struct Listener {
    name: String,
    shm: bool,
    verbs: bool,
    shm_path: Option<std::path::PathBuf>,
    rx: Mutex<Option<Receiver<Item>>>,
    /// Signaled by the accept threads after each hand-over (see [`Listener::event_fd`]).
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    /// The accept threads; emptied (and joined) by [`Listener::close`].
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Listener {
    /// Listens under `name` (1-64 bytes of `[A-Za-z0-9._-]`).
    ///
    /// # Errors
    /// An invalid configuration, a bad or taken name, a manager that cannot be reached or
    /// refuses the name, no usable RDMA device under `RSMSG_TRANSPORT=verbs`.
    pub fn bind(config: &Config, name: &str) -> Result<Listener, EndpointError> {
        config.validate()?;
        let ep_name = EndpointName::new(name).map_err(|e| EndpointError::Config {
            name: "endpoint name",
            reason: e.to_string(),
        })?;
        let want_shm = config.transport != TransportChoice::Verbs;
        let manager = config.manager_parts();
        // Verbs needs a manager (validated) and a device; under `auto` a missing device means
        // shared memory only.
        let mut verbs_opts = config.verbs.clone();
        let want_verbs = match (config.transport, manager) {
            (TransportChoice::Shm, _) | (_, None) => false,
            (choice, Some(_)) => match verbs_opts
                .context
                .clone()
                .map_or_else(
                    || crate::verbs::Context::open(verbs_opts.device.as_deref()),
                    Ok,
                )
                .and_then(|ctx| ctx.active_port(verbs_opts.port).map(|_| ctx))
            {
                Ok(ctx) => {
                    verbs_opts.context = Some(ctx);
                    true
                }
                Err(e) if choice == TransportChoice::Auto => {
                    tracing::info!(error = %e, "no usable RDMA device: listening on shared memory only");
                    false
                }
                Err(e) => return Err(EndpointError::Transport(TransportError::Verbs(e))),
            },
        };
        let shm = if want_shm {
            Some(ShmListener::bind(name, config.layout.clone(), config.poll)?)
        } else {
            None
        };
        let registration = match manager {
            Some((addr, token)) => {
                let transports = match (shm.is_some(), want_verbs) {
                    (true, true) => TransportSet::from_bits(
                        TransportSet::SHM.bits() | TransportSet::VERBS.bits(),
                    )
                    .map_err(|e| EndpointError::Config {
                        name: "transports",
                        reason: e.to_string(),
                    })?,
                    (false, true) => TransportSet::VERBS,
                    _ => TransportSet::SHM,
                };
                let info = EndpointInfo {
                    name: ep_name,
                    host_id: host_id()?,
                    transports,
                    shm_socket: shm
                        .as_ref()
                        .map(|s| s.path().to_string_lossy().into_owned()),
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
        let (tx, rx) = sync_channel(BACKLOG);
        let wake = Arc::new(EventFd::new().map_err(|e| {
            EndpointError::Transport(TransportError::Failed(format!(
                "create the listener's event descriptor: {e}"
            )))
        })?);
        let shm_path = shm.as_ref().map(|s| s.path().to_path_buf());
        // Built before its threads start, so that a failure to start one stops (on drop) those
        // already running.
        let mut l = Listener {
            name: name.to_string(),
            shm: shm_path.is_some(),
            verbs: false,
            shm_path,
            rx: Mutex::new(Some(rx)),
            wake,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        };
        let (stop, wake) = (l.stop.clone(), l.wake.clone());
        match (want_verbs, registration) {
            (true, Some(reg)) => {
                let vl = VerbsListener::with_registration(
                    reg,
                    config.layout.clone(),
                    config.poll,
                    verbs_opts,
                )?;
                l.started(spawn_verbs(vl, tx.clone(), stop.clone(), wake.clone())?);
                l.verbs = true;
            }
            (_, reg) => {
                // No verbs: nothing else talks to the manager, so a thread of its own keeps
                // the registration (registering again after a manager restart).
                if let Some(reg) = reg {
                    l.started(spawn_keeper(reg, stop.clone())?);
                }
            }
        }
        if let Some(s) = shm {
            l.started(spawn_shm(s, tx, stop, wake)?);
        }
        Ok(l)
    }

    fn started(&mut self, t: JoinHandle<()>) {
        self.threads
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .push(t);
    }

    /// Stops listening, from any thread: the accept threads stop, the name is unregistered and
    /// its socket removed, and an accept waiting on another thread returns an error (a
    /// connection already handed over may still be returned first). Returns once the threads
    /// have stopped; with a manager, once it acknowledged the unregistration (a manager that
    /// does not answer is given up on after the manager timeout, 10 s). Dropping the listener
    /// does the same.
    pub fn close(&self) {
        // Held until the threads are joined, so that a second close waits for the first.
        let mut held = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if !self.stop.swap(true, Ordering::SeqCst) {
            // Wake the shared-memory accept (blocked in accept(2)) with a connection of our
            // own: only the first time, when the socket is still ours (the name may be bound
            // again by now).
            if let Some(p) = &self.shm_path {
                let _ = UnixStream::connect(p);
            }
        }
        let threads = std::mem::take(&mut *held);
        // An accept thread blocked handing over a connection is unblocked when the receiver
        // goes; while an accept on another thread holds it, that accept is receiving, which
        // unblocks the thread as well. Once they have all stopped, a waiting accept sees the
        // channel closed.
        loop {
            match self.rx.try_lock() {
                Ok(mut rx) => {
                    rx.take();
                    break;
                }
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    p.into_inner().take();
                    break;
                }
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if threads.iter().all(JoinHandle::is_finished) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in threads {
            let _ = t.join();
        }
        drop(held);
        // An event loop watching `event_fd` looks again and finds the listener closed.
        let _ = self.wake.signal();
    }

    /// Whether [`Listener::close`] was called: accepts fail at once from then on.
    pub fn is_closed(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The name listened under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this listener accepts over `transport`.
    pub fn accepts(&self, transport: Transport) -> bool {
        match transport {
            Transport::Shm => self.shm,
            Transport::Verbs => self.verbs,
        }
    }

    /// Waits for the next connection.
    ///
    /// # Errors
    /// A peer whose handshake failed (the listener stays usable: call again).
    pub fn accept(&self) -> Result<Conn, EndpointError> {
        loop {
            if let Some(a) = self.next(Some(Duration::from_secs(3600)))? {
                return Ok(a.conn);
            }
        }
    }

    /// Waits at most `timeout` for the next connection; `Ok(None)` when none came.
    ///
    /// # Errors
    /// As [`Listener::accept`].
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Conn>, EndpointError> {
        Ok(self.next(Some(timeout))?.map(|a| a.conn))
    }

    /// The next connection if one is ready, never waiting.
    ///
    /// # Errors
    /// As [`Listener::accept`].
    pub fn try_accept(&self) -> Result<Option<Conn>, EndpointError> {
        Ok(self.next(None)?.map(|a| a.conn))
    }

    /// The next connection with its transport, waiting at most `timeout` (`None`: not at all).
    ///
    /// # Errors
    /// As [`Listener::accept`].
    pub fn next(&self, timeout: Option<Duration>) -> Result<Option<Accepted>, EndpointError> {
        let guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rx) = guard.as_ref() else {
            return Err(closed());
        };
        match timeout {
            None => {
                // Reset the event descriptor before looking: a connection handed over after
                // this look signals it again.
                let _ = self.wake.drain();
                match rx.try_recv() {
                    Ok(item) => item.map(Some),
                    Err(TryRecvError::Empty) => Ok(None),
                    Err(TryRecvError::Disconnected) => Err(closed()),
                }
            }
            Some(t) => match rx.recv_timeout(t) {
                Ok(item) => item.map(Some),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(closed()),
            },
        }
    }
}

impl Listener {
    /// A descriptor that becomes readable when an accepted connection may be waiting, for event
    /// loops (epoll, tokio's `AsyncFd`): after it turns readable, take connections with
    /// [`Listener::try_accept`] (or [`Listener::next`] with no timeout) until none is left;
    /// that also resets it.
    pub fn event_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.wake.fd()
    }
}

fn closed() -> EndpointError {
    EndpointError::Transport(TransportError::Failed(
        "the listener's accept threads have stopped".into(),
    ))
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, EndpointError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| {
            EndpointError::Transport(TransportError::Io {
                step: "start an accept thread",
                source,
            })
        })
}

/// Pings the manager every [`KEEP_REGISTERED_EVERY`] through `registration`, which reconnects
/// and registers again when the manager was lost; stops (unregistering) with the listener.
fn spawn_keeper(
    mut registration: Registration,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, EndpointError> {
    spawn("rsmsg-registration", move || {
        let slice = VERBS_ACCEPT_SLICE;
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(slice);
            waited += slice;
            if waited < KEEP_REGISTERED_EVERY {
                continue;
            }
            waited = Duration::ZERO;
            if let Err(e) = registration.with_client(|c| c.ping()) {
                tracing::debug!(error = %e, "manager unreachable; will register again");
            }
        }
    })
}

fn spawn_shm(
    listener: ShmListener,
    tx: SyncSender<Item>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
) -> Result<JoinHandle<()>, EndpointError> {
    spawn("rsmsg-accept-shm", move || {
        loop {
            let r = listener.accept();
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let item = match r {
                Ok(c) => Ok(Accepted {
                    conn: c.convert(),
                    transport: Transport::Shm,
                }),
                Err(e) => {
                    tracing::debug!(error = %e, "shared-memory accept failed");
                    // Do not spin on a persistent error (e.g. out of descriptors).
                    std::thread::sleep(Duration::from_millis(10));
                    Err(EndpointError::Transport(e))
                }
            };
            if tx.send(item).is_err() {
                break;
            }
            let _ = wake.signal();
        }
    })
}

fn spawn_verbs(
    mut listener: VerbsListener,
    tx: SyncSender<Item>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
) -> Result<JoinHandle<()>, EndpointError> {
    spawn("rsmsg-accept-verbs", move || {
        while !stop.load(Ordering::SeqCst) {
            let item = match listener.accept_timeout(VERBS_ACCEPT_SLICE) {
                Ok(None) => continue,
                Ok(Some(c)) => Ok(Accepted {
                    conn: c.convert(),
                    transport: Transport::Verbs,
                }),
                Err(TransportError::Bootstrap(e)) if e.is_unreachable() => {
                    // The registration comes back with the manager.
                    tracing::debug!(error = %e, "manager unreachable; retrying");
                    std::thread::sleep(VERBS_ACCEPT_SLICE);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "verbs accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    Err(EndpointError::Transport(e))
                }
            };
            if tx.send(item).is_err() {
                break;
            }
            let _ = wake.signal();
        }
    })
}
