#![forbid(unsafe_code)]
#![deny(missing_docs)]
//! The sans-I/O protocol core: segment groups, directories, selection, allocation and release,
//! credits and wire codecs. It never calls verbs, never reads a clock and never allocates on the
//! hot path (`reserve`, `on_immediate`, `accept`, `release`); transports drive it.
//!
//! One direction of a connection is a [`Sender`] on one machine and a [`Receiver`] on the other,
//! built from the same [`Layout`]:
//!
//! ```
//! use rsmsg::core::{Layout, Receiver, Sender};
//!
//! let layout = Layout::default();
//! let mut tx = Sender::new(layout.clone());
//! let mut rx = Receiver::new(layout);
//! let mut source = vec![vec![0u8; 1 << 20]; tx.tables().segments().len()];
//! let mut target = source.clone();
//!
//! // Sender: reserve partitions, fill the source image, transfer (RDMA WRITE_WITH_IMM).
//! let r = tx.reserve(5).unwrap();
//! let img = &mut source[r.segment.index()];
//! img[r.offset..r.payload_offset()].copy_from_slice(&r.header);
//! img[r.payload_offset()..r.payload_offset() + 5].copy_from_slice(b"hello");
//! let span = r.offset..r.offset + r.wire_len();
//! target[r.segment.index()][span.clone()].copy_from_slice(&img[span]);
//!
//! // Receiver: validate immediate and header, read in place, release, publish the credit.
//! let a = rx.on_immediate(r.immediate.get()).unwrap();
//! let seg = &target[a.segment().index()];
//! let d = rx.accept(a, &seg[a.header_offset()..]).unwrap();
//! assert_eq!(&seg[d.offset..d.offset + d.len], b"hello");
//! let credit = rx.release(d.token).unwrap().expect("segment idle: credit emitted");
//! tx.handle_credit(credit.segment, credit.freed).unwrap();
//! assert_eq!(tx.total_partitions_in_use(), 0);
//! ```
//!
//! The seed's terms map to code as follows: *segment group* [`GroupEntry`]/[`GroupConfig`],
//! *segment group table* and *segment table* [`Tables`], *source segment* the sender's image
//! (`Sender`'s per-segment state), *target segment* the receiver's (`Receiver`'s), *partition*
//! [`PartitionIndex`], *span factor* [`GroupConfig::span`], *directory* [`Directory`] /
//! [`DirEntry`]. See `docs/claims.md`.

pub mod config;
pub mod control;
pub mod directory;
pub mod error;
pub mod receiver;
pub mod rndv;
pub mod sender;
pub mod stats;
pub mod tables;
pub mod types;
pub mod wire;

pub use config::{GroupConfig, Layout, MemoryReport, RECV_WQE_MARGIN};
pub use control::{ControlBuf, ControlMessage, MAX_CONTROL_LEN, close_reason, refuse_reason};
pub use directory::{DirEntry, Directory, EntryState, NO_NEXT};
pub use error::{ConfigError, ProtocolError, ReserveError};
pub use receiver::{Arrival, CreditUpdate, Delivery, Receiver, ReleaseToken};
pub use rndv::{RndvConfig, RndvConfigError, RndvRequest, RndvSends, RndvState};
pub use sender::{Reservation, Selection, Sender};
pub use stats::{GroupStats, ReceiverStats, SenderStats};
pub use tables::{GroupEntry, SegmentEntry, Tables};
pub use types::{Generation, GroupId, MessageKind, PartitionIndex, SegmentId};
pub use wire::{
    CREDIT_NOTICE_BITS, HEADER_LEN, Header, Immediate, ImmediateKind, MAGIC, reconstruct_freed,
};
