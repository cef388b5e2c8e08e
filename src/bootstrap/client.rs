//! The manager client: one authenticated TCP connection, one request at a time.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tracing::debug;

use super::auth::{Token, nonce};
use super::error::BootstrapError;
use super::frame_io::{ReadError, read_frame, write_frame};
use super::wire::{
    Descriptors, EndpointInfo, EndpointName, MAX_TEXT_LEN, MAX_WAIT_MS, Message, RendezvousId, Side,
};

/// A connection request delivered to a listener by [`ManagerClient::wait_connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The rendezvous to answer on (as [`Side::Listener`]).
    pub id: RendezvousId,
    /// The initiator.
    pub from: EndpointInfo,
    /// The initiator's descriptors.
    pub offer: Descriptors,
}

/// An authenticated connection to a manager.
///
/// Requests are strictly one at a time (`&mut self`); use one client per thread. A registration
/// lives as long as the client that made it: when the client is dropped or its connection breaks,
/// the manager removes the registration. After an I/O error, a timeout or a malformed reply the
/// client refuses further requests ([`BootstrapError::Broken`]): connect a new one.
#[derive(Debug)]
pub struct ManagerClient {
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    broken: bool,
}

/// How long beyond a long poll's own wait a reply may take.
const POLL_MARGIN: Duration = Duration::from_secs(5);

impl ManagerClient {
    /// Connects to the manager at `addr` and authenticates with `token`. `timeout` bounds the
    /// TCP connection, the handshake and, later, every request (long polls add their own wait).
    ///
    /// # Errors
    /// [`BootstrapError::Connect`] when no address answers; [`BootstrapError::Remote`] with
    /// `AuthFailed` for a wrong token (or `Busy`); [`BootstrapError::ManagerNotAuthentic`] when
    /// the manager cannot prove it holds the token; timeouts and protocol errors.
    pub fn connect(
        addr: impl ToSocketAddrs,
        token: &Token,
        timeout: Duration,
    ) -> Result<Self, BootstrapError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| BootstrapError::Connect {
                addr: "(unresolvable)".into(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some(stream) = stream else {
            return Err(BootstrapError::Connect {
                addr: addrs
                    .first()
                    .map_or_else(|| "(no address)".into(), ToString::to_string),
                source: last,
            });
        };
        let peer = stream.peer_addr().map_err(io_err("connecting"))?;
        stream.set_nodelay(true).map_err(io_err("connecting"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("connecting"))?;
        let mut client = Self {
            stream,
            peer,
            timeout,
            broken: false,
        };
        client.handshake(token)?;
        debug!(manager = %peer, "authenticated to the manager");
        Ok(client)
    }

    fn handshake(&mut self, token: &Token) -> Result<(), BootstrapError> {
        let step = "authenticating";
        let client_nonce = nonce().map_err(BootstrapError::Random)?;
        let hello = Message::Hello {
            nonce: client_nonce,
        };
        let server_nonce = match self.request(step, &hello)? {
            Message::Challenge { nonce } => nonce,
            other => return Err(self.unexpected(step, &other)),
        };
        let mac = token.client_proof(&client_nonce, &server_nonce);
        match self.request(step, &Message::Auth { mac })? {
            Message::AuthOk { mac } if token.verify_server(&client_nonce, &server_nonce, &mac) => {
                Ok(())
            }
            Message::AuthOk { .. } => {
                self.broken = true;
                Err(BootstrapError::ManagerNotAuthentic)
            }
            other => Err(self.unexpected(step, &other)),
        }
    }

    /// The manager's address.
    pub fn manager_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Registers an endpoint under its name for as long as this client stays connected
    /// (claims 4, 21, 23: the receiver registers with the remote shared memory manager).
    /// Registering the same name again from this client updates it.
    ///
    /// # Errors
    /// `NameTaken` when another client holds the name, `LimitExceeded`, or a transport error.
    pub fn register(&mut self, info: &EndpointInfo) -> Result<(), BootstrapError> {
        let step = "registering";
        self.expect_ok(step, &Message::Register { info: info.clone() })
    }

    /// Removes a registration this client made.
    ///
    /// # Errors
    /// `NotRegistered` when this client does not hold the name, or a transport error.
    pub fn unregister(&mut self, name: &EndpointName) -> Result<(), BootstrapError> {
        self.expect_ok("unregistering", &Message::Unregister { name: name.clone() })
    }

    /// Looks an endpoint up by name.
    ///
    /// # Errors
    /// `UnknownName` when nothing is registered under it, or a transport error.
    pub fn lookup(&mut self, name: &EndpointName) -> Result<EndpointInfo, BootstrapError> {
        let step = "looking up an endpoint";
        match self.request(step, &Message::Lookup { name: name.clone() })? {
            Message::Found { info } => Ok(info),
            other => Err(self.unexpected(step, &other)),
        }
    }

    /// Asks the listener `to` for a connection, handing it `offer` (the initiator's descriptors
    /// for this connection). The listener receives it through [`Self::wait_connect`]; read its
    /// answer with [`Self::recv`] as [`Side::Initiator`].
    ///
    /// # Errors
    /// `UnknownName` when `to` is not registered, `LimitExceeded`, invalid descriptors
    /// ([`BootstrapError::InvalidInput`]), or a transport error.
    pub fn connect_to(
        &mut self,
        from: &EndpointInfo,
        to: &EndpointName,
        offer: &Descriptors,
    ) -> Result<RendezvousId, BootstrapError> {
        let step = "requesting a connection";
        let msg = Message::Connect {
            from: from.clone(),
            to: to.clone(),
            offer: offer.clone(),
        };
        match self.request(step, &msg)? {
            Message::Queued { id } => Ok(id),
            other => Err(self.unexpected(step, &other)),
        }
    }

    /// Initiator's whole first round: requests the connection and waits up to `timeout` for the
    /// listener's answer. On timeout the rendezvous is closed and
    /// [`BootstrapError::NoAnswer`] returned. The rendezvous stays open on success so that a
    /// further round (e.g. a "ready" acknowledgement) can follow; close it with [`Self::close`].
    ///
    /// # Errors
    /// As [`Self::connect_to`] and [`Self::recv`]; `Closed` when the listener rejects.
    pub fn dial(
        &mut self,
        from: &EndpointInfo,
        to: &EndpointName,
        offer: &Descriptors,
        timeout: Duration,
    ) -> Result<(RendezvousId, Descriptors), BootstrapError> {
        let id = self.connect_to(from, to, offer)?;
        match self.recv(id, Side::Initiator, timeout)? {
            Some(answer) => Ok((id, answer)),
            None => {
                let _ = self.close(id, Side::Initiator, "no answer in time");
                Err(BootstrapError::NoAnswer {
                    id,
                    peer: to.to_string(),
                })
            }
        }
    }

    /// Waits up to `timeout` for the next connection request to `name`, which this client must
    /// have registered. `Ok(None)` when none came in time.
    ///
    /// # Errors
    /// `NotRegistered`, or a transport error.
    pub fn wait_connect(
        &mut self,
        name: &EndpointName,
        timeout: Duration,
    ) -> Result<Option<Incoming>, BootstrapError> {
        let step = "waiting for a connection request";
        self.poll(timeout, |this, ms| {
            let msg = Message::WaitConnect {
                name: name.clone(),
                timeout_ms: ms,
            };
            match this.long_request(step, &msg, Duration::from_millis(u64::from(ms)))? {
                Message::Incoming { id, from, offer } => Ok(Some(Incoming { id, from, offer })),
                Message::TimedOut => Ok(None),
                other => Err(this.unexpected(step, &other)),
            }
        })
    }

    /// Posts descriptors to the other side of a rendezvous. `side` is the caller's own side.
    ///
    /// # Errors
    /// `UnknownRendezvous`, `Closed` when the peer closed, `LimitExceeded` when too many messages
    /// wait unread, invalid descriptors, or a transport error.
    pub fn send(
        &mut self,
        id: RendezvousId,
        side: Side,
        payload: &Descriptors,
    ) -> Result<(), BootstrapError> {
        let msg = Message::Send {
            id,
            side,
            payload: payload.clone(),
        };
        self.expect_ok("posting descriptors", &msg)
    }

    /// Waits up to `timeout` for the next descriptors the other side posted. `side` is the
    /// caller's own side. `Ok(None)` when nothing came in time.
    ///
    /// # Errors
    /// `Closed` (with the peer's reason) when the peer closed or rejected, `UnknownRendezvous`,
    /// or a transport error.
    pub fn recv(
        &mut self,
        id: RendezvousId,
        side: Side,
        timeout: Duration,
    ) -> Result<Option<Descriptors>, BootstrapError> {
        let step = "waiting for the peer's descriptors";
        self.poll(timeout, |this, ms| {
            let msg = Message::Recv {
                id,
                side,
                timeout_ms: ms,
            };
            match this.long_request(step, &msg, Duration::from_millis(u64::from(ms)))? {
                Message::Delivered { payload } => Ok(Some(payload)),
                Message::TimedOut => Ok(None),
                other => Err(this.unexpected(step, &other)),
            }
        })
    }

    /// Closes the caller's side of a rendezvous: when done, or to reject a request (the reason,
    /// cut to 512 bytes, reaches the peer). The manager forgets the rendezvous once both sides
    /// closed (or after its time to live).
    ///
    /// # Errors
    /// `UnknownRendezvous`, or a transport error.
    pub fn close(
        &mut self,
        id: RendezvousId,
        side: Side,
        reason: &str,
    ) -> Result<(), BootstrapError> {
        let mut cut = reason.len().min(MAX_TEXT_LEN);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let msg = Message::Close {
            id,
            side,
            reason: reason[..cut].to_owned(),
        };
        self.expect_ok("closing a rendezvous", &msg)
    }

    /// Checks that the manager answers.
    ///
    /// # Errors
    /// A transport error.
    pub fn ping(&mut self) -> Result<(), BootstrapError> {
        let step = "pinging";
        match self.request(step, &Message::Ping)? {
            Message::Pong => Ok(()),
            other => Err(self.unexpected(step, &other)),
        }
    }

    // -----------------------------------------------------------------------------------------

    /// Splits a wait into long polls of at most [`MAX_WAIT_MS`] each.
    fn poll<T>(
        &mut self,
        timeout: Duration,
        mut once: impl FnMut(&mut Self, u32) -> Result<Option<T>, BootstrapError>,
    ) -> Result<Option<T>, BootstrapError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u32::try_from(left.as_millis())
                .unwrap_or(u32::MAX)
                .min(MAX_WAIT_MS);
            if let Some(v) = once(self, ms)? {
                return Ok(Some(v));
            }
            if Instant::now() >= deadline || ms == 0 {
                return Ok(None);
            }
        }
    }

    fn expect_ok(&mut self, step: &'static str, msg: &Message) -> Result<(), BootstrapError> {
        match self.request(step, msg)? {
            Message::Ok => Ok(()),
            other => Err(self.unexpected(step, &other)),
        }
    }

    fn request(&mut self, step: &'static str, msg: &Message) -> Result<Message, BootstrapError> {
        self.long_request(step, msg, Duration::ZERO)
    }

    fn long_request(
        &mut self,
        step: &'static str,
        msg: &Message,
        wait: Duration,
    ) -> Result<Message, BootstrapError> {
        let extra = if wait.is_zero() {
            Duration::ZERO
        } else {
            wait + POLL_MARGIN
        };
        match self.exchange(step, msg, extra)? {
            Message::Error { code, message } => Err(BootstrapError::Remote {
                step,
                code,
                message,
            }),
            reply => Ok(reply),
        }
    }

    /// Sends one frame and reads one reply within `timeout + extra`.
    fn exchange(
        &mut self,
        step: &'static str,
        msg: &Message,
        extra: Duration,
    ) -> Result<Message, BootstrapError> {
        if self.broken {
            return Err(BootstrapError::Broken);
        }
        let frame = msg
            .encode()
            .map_err(|source| BootstrapError::InvalidInput {
                what: "request",
                source,
            })?;
        let result = write_frame(&mut self.stream, &frame)
            .map_err(|e| map_io(step, e))
            .and_then(|()| {
                read_frame(
                    &mut self.stream,
                    Instant::now() + self.timeout + extra,
                    self.timeout,
                )
                .map_err(|e| match e {
                    ReadError::Closed | ReadError::ClosedMidFrame => {
                        BootstrapError::Disconnected { step }
                    }
                    ReadError::Idle | ReadError::Stalled => BootstrapError::Timeout { step },
                    ReadError::Io(e) => map_io(step, e),
                    ReadError::Decode(source) => BootstrapError::Protocol { step, source },
                })
            });
        match &result {
            Err(_) => self.broken = true,
            Ok(Message::Error { code, message }) if code.closes_connection() => {
                debug!(%code, message = message.as_str(), "manager closed the session");
                self.broken = true;
            }
            Ok(_) => {}
        }
        result
    }

    fn unexpected(&mut self, step: &'static str, got: &Message) -> BootstrapError {
        self.broken = true;
        BootstrapError::UnexpectedReply {
            step,
            got: got.name(),
        }
    }
}

fn map_io(step: &'static str, e: io::Error) -> BootstrapError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => BootstrapError::Timeout { step },
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => BootstrapError::Disconnected { step },
        _ => BootstrapError::Io { step, source: e },
    }
}

fn io_err(step: &'static str) -> impl Fn(io::Error) -> BootstrapError {
    move |source| BootstrapError::Io { step, source }
}
