//! rsmsg: messaging over RDMA verbs and shared memory.
//!
//! A receiver exposes *target segments* cut into fixed-size *partitions*; a sender keeps a *source
//! image* of each, picks the *segment group* whose partition size and span factor fit a message,
//! copies the message into contiguous free partitions and sends them as one RDMA WRITE_WITH_IMM
//! (or, between processes of one host, one copy into shared memory plus a doorbell).
//!
//! Layers:
//! - [`core`]: the sans-I/O protocol (groups, directories, selection, credits, wire codecs).
//! - [`verbs`]: safe wrappers over libibverbs (`rdma-sys`).
//! - [`shm`]: shared-memory segments, doorbells and wake-ups.
//! - [`bootstrap`]: the manager where receivers register segment descriptors and senders obtain them.
//! - [`transport`]: drivers that join the core to verbs or shared memory.
//! - [`endpoint`]: listen and connect by name, with the transport chosen per peer.
//! - [`mesh`]: jobs of N ranks started by mpirun, srun or a PMI launcher: full mesh, barrier.
//! - [`capi`]: the C ABI (`include/rsmsg.h`).

pub mod bootstrap;
#[cfg(not(loom))]
#[allow(non_camel_case_types)]
pub mod capi;
pub mod core;
#[cfg(not(loom))]
pub mod endpoint;
#[cfg(not(loom))]
pub mod mesh;
pub mod shm;
pub mod transport;
pub mod verbs;
