#![forbid(unsafe_code)]
//! The bootstrap manager: the seed's *remote shared memory manager* (claims 4, 13, 21, 23).
//!
//! A receiver registers its endpoint under a name; a sender looks the name up and asks for a
//! connection; the two sides then exchange their connection [`Descriptors`] (target segments,
//! credit mailbox, queue pair attributes, or an opaque blob for shared memory) through the
//! manager. The manager is a small TCP service speaking a versioned, length-prefixed binary
//! protocol ([`wire`]) with strict validation, size limits, timeouts and a challenge–response
//! handshake over a shared token ([`auth`]). It runs embedded ([`Manager::bind`]) or standalone
//! ([`run`], behind `rsmsg manager`). The full protocol is described in `docs/bootstrap.md`.
//!
//! # Quick start
//! ```no_run
//! use std::time::Duration;
//! use rsmsg::bootstrap::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let token = Token::new("a-long-shared-secret")?;
//! let manager = Manager::bind("127.0.0.1:0", token.clone())?;
//! let t = Duration::from_secs(5);
//!
//! // The listener registers and waits for requests.
//! let mut b = ManagerClient::connect(manager.local_addr(), &token, t)?;
//! let b_info = EndpointInfo {
//!     name: EndpointName::new("rank-1")?,
//!     host_id: HostId::local()?,
//!     transports: TransportSet::VERBS,
//!     shm_socket: None,
//! };
//! b.register(&b_info)?;
//!
//! // The initiator asks for a connection with its own descriptors...
//! let mut a = ManagerClient::connect(manager.local_addr(), &token, t)?;
//! let a_info = EndpointInfo { name: EndpointName::new("rank-0")?, ..b_info.clone() };
//! let id = a.connect_to(&a_info, &b_info.name, &Descriptors::default())?;
//!
//! // ...the listener takes it and answers with its descriptors...
//! let incoming = b.wait_connect(&b_info.name, t)?.expect("a request");
//! b.send(incoming.id, Side::Listener, &Descriptors::default())?;
//!
//! // ...and the initiator reads the answer.
//! let answer = a.recv(id, Side::Initiator, t)?.expect("an answer");
//! # let _ = answer;
//! # Ok(()) }
//! ```
//!
//! # Threads and lifetimes
//! [`ManagerClient`] serves one request at a time; a registration lives as long as the client
//! connection that made it. [`ManagerHandle`] stops the manager on drop, closing its clients;
//! connections already made between endpoints do not depend on the manager.

pub mod auth;
mod client;
mod error;
mod frame_io;
pub mod launcher;
mod registration;
mod server;
pub mod wire;

pub use auth::{Token, TokenError};
pub use client::{Incoming, ManagerClient};
pub use error::BootstrapError;
pub use launcher::{LaunchError, LaunchInfo, Launcher};
pub use registration::Registration;
pub use server::{
    DEFAULT_PORT, Limits, Manager, ManagerConfig, ManagerHandle, queued_footprint, run,
};
pub use wire::{
    DecodeError, Descriptors, EndpointInfo, EndpointName, ErrorCode, HostId, MailboxDescriptor,
    QpInfo, RendezvousId, SegmentDescriptor, Side, TransportSet,
};
