//! rsmsg: messaging over RDMA verbs and shared memory.
//!
//! A receiver exposes *target segments* cut into fixed-size *partitions*; a sender keeps a *source
//! image* of each, picks the *segment group* whose partition size and span factor fit a message,
//! copies the message into contiguous free partitions and sends them as one RDMA WRITE_WITH_IMM
//! (or, between processes of one host, one copy into shared memory plus a doorbell). Messages
//! are received in place and their partitions return to the sender when the receiver drops
//! them: back-pressure is built in, nothing is copied on the receiving side.
//!
//! # Quick start
//!
//! A server listens under a name, a client connects by that name; the transport is chosen per
//! pair (shared memory on one host, verbs across hosts when a bootstrap manager is configured
//! with `RSMSG_MANAGER` and `RSMSG_TOKEN`). Everything else comes from the `RSMSG_*`
//! environment (see [`Config`]).
//!
//! ```no_run
//! use rsmsg::{Config, Endpoint, EndpointError};
//!
//! fn main() -> Result<(), EndpointError> {
//!     let config = Config::from_env()?;
//!
//!     // Server: receive from any client, answer each.
//!     let mut server = Endpoint::bind(config.clone(), "echo")?;
//!     std::thread::spawn(move || -> Result<(), EndpointError> {
//!         loop {
//!             let msg = server.recv()?; // read in place, released on drop
//!             println!("{} bytes from {}", msg.len(), msg.peer());
//!             msg.reply(&msg)?;
//!         }
//!     });
//!
//!     // Client: one connection, by name.
//!     let conn = rsmsg::connect(&config, "echo")?;
//!     conn.send(b"hello")?;
//!     let answer = conn.recv()?;
//!     assert_eq!(&*answer, b"hello");
//!     Ok(())
//! }
//! ```
//!
//! `docs/api.md` describes the model, the configuration variables, poll modes, zero-copy
//! sends and receives, back-pressure, errors, thread safety and statistics.
//!
//! # Layers
//! - [`endpoint`]: the public API: [`Config`], [`Listener`], [`connect`], [`Endpoint`].
//! - [`transport`]: [`Connection`](transport::Connection), the one protocol driver, and the
//!   shared-memory and verbs transports it runs over.
//! - [`core`]: the sans-I/O protocol (groups, directories, selection, credits, wire codecs).
//! - [`verbs`]: safe wrappers over libibverbs (`rdma-sys`).
//! - [`shm`]: shared-memory segments, doorbells and wake-ups.
//! - [`bootstrap`]: the manager where endpoints register and peers exchange descriptors.
//! - [`mesh`]: jobs of N ranks started by mpirun, srun or a PMI launcher: full mesh, barrier.
//! - [`capi`]: the C ABI (`include/rsmsg.h`).

#![deny(missing_docs)]

pub mod bootstrap;
#[cfg(not(loom))]
#[allow(non_camel_case_types)]
pub mod capi;
mod copy;
pub mod core;
#[cfg(not(loom))]
pub mod endpoint;
#[cfg(not(loom))]
pub mod mesh;
pub mod shm;
pub mod transport;
pub mod verbs;

pub use crate::bootstrap::Token;
pub use crate::copy::copy_piece_len;
pub use crate::core::Layout;
#[cfg(not(loom))]
pub use crate::endpoint::{
    Config, Conn, Endpoint, EndpointError, Listener, Msg, PeerId, PeerInfo, Received, Transport,
    TransportChoice, connect,
};
pub use crate::transport::{Counters, GroupCounters, PollMode, SendError, TransportError};
