//! Control messages (header kind 2), carried in partitions like data.
//!
//! Body layout (little-endian): byte 0 the type, bytes 1..4 reserved (zero), then the fields of
//! the type. Every type has one exact length, except the chunk, whose fixed part is followed by
//! at least one byte of data; the decoder refuses anything else.
//!
//! | type | message | fields after the 4-byte prefix | body length |
//! |---|---|---|---|
//! | 1 | rendezvous request | id u64, addr u64, len u64, rkey u32 | 32 |
//! | 2 | rendezvous done | id u64 | 12 |
//! | 3 | close | reason u32 | 8 |
//! | 4 | rendezvous refused | id u64, reason u32 | 16 |
//! | 5 | rendezvous stream (send it through the segments) | id u64 | 12 |
//! | 6 | rendezvous chunk | id u64, offset u64, then the data | 20 + data (> 0) |

use super::error::ProtocolError;

/// Longest control body.
pub const MAX_CONTROL_LEN: usize = 32;

const TYPE_RDV_REQUEST: u8 = 1;
const TYPE_RDV_DONE: u8 = 2;
const TYPE_CLOSE: u8 = 3;
const TYPE_RDV_REFUSED: u8 = 4;
const TYPE_RDV_STREAM: u8 = 5;
const TYPE_RDV_CHUNK: u8 = 6;

/// Length of a chunk's fixed part (its data follows in the same body).
pub const CHUNK_HEADER_LEN: usize = 20;

/// Reason codes of [`ControlMessage::Close`].
pub mod close_reason {
    /// Orderly shutdown.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The application aborted.
    pub const ABORT: u32 = 2;
}

/// Reason codes of [`ControlMessage::RendezvousRefused`].
pub mod refuse_reason {
    /// The message is longer than the receiver accepts (its configured limit).
    pub const TOO_LARGE: u32 = 1;
    /// The receiver cannot reach the sender's buffer (e.g. shared memory without permission to
    /// read the sender's address space).
    pub const NO_ACCESS: u32 = 2;
    /// The destination the receiving application offered is shorter than the message.
    pub const NO_ROOM: u32 = 3;
    /// The request is malformed (bad key or address for this transport).
    pub const MALFORMED: u32 = 4;
    /// The receiver already holds as many rendezvous transfers queued as it keeps
    /// (`RndvConfig::MAX_QUEUED_TRANSFERS`): its application has not received them yet.
    pub const BUSY: u32 = 5;

    /// A human-readable name of a reason code (`"unknown"` for codes this version does not know).
    pub fn describe(reason: u32) -> &'static str {
        match reason {
            TOO_LARGE => "longer than the receiver accepts",
            NO_ACCESS => "the receiver cannot read the sender's buffer",
            NO_ROOM => "the receiver's buffer is too short",
            MALFORMED => "malformed request",
            BUSY => "too many transfers in progress at the receiver",
            _ => "unknown reason",
        }
    }
}

/// A control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMessage {
    /// The sender offers a registered buffer for the receiver to RDMA READ (a message too long
    /// for any group).
    RendezvousRequest {
        /// Identifier chosen by the sender, echoed in [`ControlMessage::RendezvousDone`].
        id: u64,
        /// Address of the sender's buffer.
        addr: u64,
        /// Length of the message.
        len: u64,
        /// Remote key of the buffer's registration.
        rkey: u32,
    },
    /// The receiver has read the buffer of request `id`; the sender may reuse it.
    RendezvousDone {
        /// The request's identifier.
        id: u64,
    },
    /// The receiver will not read the buffer of request `id`; the sender may reuse it and
    /// reports the failure.
    RendezvousRefused {
        /// The request's identifier.
        id: u64,
        /// A [`refuse_reason`] code.
        reason: u32,
    },
    /// The receiver cannot read the buffer of request `id` (shared memory without permission
    /// to read the sender's memory): the sender sends it through the segments instead, as
    /// [`ControlMessage::RendezvousChunk`]s, and the receiver answers done once it has them all.
    RendezvousStream {
        /// The request's identifier.
        id: u64,
    },
    /// Bytes `offset..offset + len` of the message of request `id` (after a
    /// [`ControlMessage::RendezvousStream`]); the data follows the fixed part in the same body.
    RendezvousChunk {
        /// The request's identifier.
        id: u64,
        /// Where the data goes in the message.
        offset: u64,
        /// Length of the data (> 0).
        len: u32,
    },
    /// The peer closes the connection.
    Close {
        /// A [`close_reason`] code.
        reason: u32,
    },
}

/// An encoded control body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlBuf {
    bytes: [u8; MAX_CONTROL_LEN],
    len: usize,
}

impl ControlBuf {
    /// The encoded bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl ControlMessage {
    /// Length of the encoded body (for a chunk: its fixed part plus its data).
    pub fn encoded_len(&self) -> usize {
        match self {
            ControlMessage::RendezvousRequest { .. } => 32,
            ControlMessage::RendezvousDone { .. } => 12,
            ControlMessage::Close { .. } => 8,
            ControlMessage::RendezvousRefused { .. } => 16,
            ControlMessage::RendezvousStream { .. } => 12,
            ControlMessage::RendezvousChunk { len, .. } => CHUNK_HEADER_LEN + *len as usize,
        }
    }

    /// Encodes the body (for a chunk: its fixed part only; the data follows it).
    pub fn encode(&self) -> ControlBuf {
        let mut b = [0u8; MAX_CONTROL_LEN];
        match *self {
            ControlMessage::RendezvousRequest {
                id,
                addr,
                len,
                rkey,
            } => {
                b[0] = TYPE_RDV_REQUEST;
                b[4..12].copy_from_slice(&id.to_le_bytes());
                b[12..20].copy_from_slice(&addr.to_le_bytes());
                b[20..28].copy_from_slice(&len.to_le_bytes());
                b[28..32].copy_from_slice(&rkey.to_le_bytes());
            }
            ControlMessage::RendezvousDone { id } => {
                b[0] = TYPE_RDV_DONE;
                b[4..12].copy_from_slice(&id.to_le_bytes());
            }
            ControlMessage::Close { reason } => {
                b[0] = TYPE_CLOSE;
                b[4..8].copy_from_slice(&reason.to_le_bytes());
            }
            ControlMessage::RendezvousRefused { id, reason } => {
                b[0] = TYPE_RDV_REFUSED;
                b[4..12].copy_from_slice(&id.to_le_bytes());
                b[12..16].copy_from_slice(&reason.to_le_bytes());
            }
            ControlMessage::RendezvousStream { id } => {
                b[0] = TYPE_RDV_STREAM;
                b[4..12].copy_from_slice(&id.to_le_bytes());
            }
            ControlMessage::RendezvousChunk { id, offset, .. } => {
                b[0] = TYPE_RDV_CHUNK;
                b[4..12].copy_from_slice(&id.to_le_bytes());
                b[12..20].copy_from_slice(&offset.to_le_bytes());
            }
        }
        let len = match self {
            ControlMessage::RendezvousChunk { .. } => CHUNK_HEADER_LEN,
            m => m.encoded_len(),
        };
        ControlBuf { bytes: b, len }
    }

    /// Decodes a body: known type, exact length (a chunk: its fixed part and at least one byte
    /// of data, which stays in `body[CHUNK_HEADER_LEN..]`), zero reserved bytes; a rendezvous
    /// request with a zero length or an address range that wraps is refused, and so is a chunk
    /// whose range wraps.
    ///
    /// # Errors
    /// [`ProtocolError::BadControl`] naming the problem.
    pub fn decode(body: &[u8]) -> Result<ControlMessage, ProtocolError> {
        let ty = body.first().copied().unwrap_or(0);
        let bad = |reason| ProtocolError::BadControl {
            ty,
            len: body.len(),
            reason,
        };
        if body.len() < 4 {
            return Err(bad("body shorter than the 4-byte prefix"));
        }
        if body[1..4] != [0, 0, 0] {
            return Err(bad("reserved bytes are not zero"));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&body[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let (msg, want) = match ty {
            TYPE_RDV_REQUEST => {
                if body.len() != 32 {
                    return Err(bad("rendezvous request must be 32 bytes"));
                }
                let (id, addr, len, rkey) = (u64_at(4), u64_at(12), u64_at(20), u32_at(28));
                if len == 0 {
                    return Err(bad("rendezvous request of zero length"));
                }
                if addr.checked_add(len).is_none() {
                    return Err(bad("rendezvous buffer wraps the address space"));
                }
                (
                    ControlMessage::RendezvousRequest {
                        id,
                        addr,
                        len,
                        rkey,
                    },
                    32,
                )
            }
            TYPE_RDV_DONE => {
                if body.len() != 12 {
                    return Err(bad("rendezvous done must be 12 bytes"));
                }
                (ControlMessage::RendezvousDone { id: u64_at(4) }, 12)
            }
            TYPE_CLOSE => {
                if body.len() != 8 {
                    return Err(bad("close must be 8 bytes"));
                }
                (ControlMessage::Close { reason: u32_at(4) }, 8)
            }
            TYPE_RDV_REFUSED => {
                if body.len() != 16 {
                    return Err(bad("rendezvous refused must be 16 bytes"));
                }
                (
                    ControlMessage::RendezvousRefused {
                        id: u64_at(4),
                        reason: u32_at(12),
                    },
                    16,
                )
            }
            TYPE_RDV_STREAM => {
                if body.len() != 12 {
                    return Err(bad("rendezvous stream must be 12 bytes"));
                }
                (ControlMessage::RendezvousStream { id: u64_at(4) }, 12)
            }
            TYPE_RDV_CHUNK => {
                if body.len() <= CHUNK_HEADER_LEN {
                    return Err(bad("rendezvous chunk without data"));
                }
                let len = u32::try_from(body.len() - CHUNK_HEADER_LEN)
                    .map_err(|_| bad("rendezvous chunk longer than 4 GiB"))?;
                let offset = u64_at(12);
                if offset.checked_add(u64::from(len)).is_none() {
                    return Err(bad("rendezvous chunk range wraps"));
                }
                (
                    ControlMessage::RendezvousChunk {
                        id: u64_at(4),
                        offset,
                        len,
                    },
                    body.len(),
                )
            }
            _ => return Err(bad("unknown control type")),
        };
        debug_assert_eq!(want, msg.encoded_len());
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ControlMessage> {
        vec![
            ControlMessage::RendezvousRequest {
                id: 7,
                addr: 0x7f00_0000_1000,
                len: 1 << 26,
                rkey: 0xdead_beef,
            },
            ControlMessage::RendezvousDone { id: u64::MAX },
            ControlMessage::RendezvousRefused {
                id: 3,
                reason: refuse_reason::TOO_LARGE,
            },
            ControlMessage::Close {
                reason: close_reason::ABORT,
            },
            ControlMessage::RendezvousStream { id: 5 },
        ]
    }

    #[test]
    fn roundtrip_every_type() {
        for m in all() {
            let b = m.encode();
            assert_eq!(b.as_slice().len(), m.encoded_len());
            assert_eq!(ControlMessage::decode(b.as_slice()).unwrap(), m);
        }
    }

    #[test]
    fn every_other_length_is_refused() {
        for m in all() {
            let b = m.encode();
            let exact = b.as_slice().len();
            let mut long = [0u8; MAX_CONTROL_LEN + 8];
            long[..exact].copy_from_slice(b.as_slice());
            for n in 0..long.len() {
                if n == exact {
                    continue;
                }
                assert!(
                    ControlMessage::decode(&long[..n]).is_err(),
                    "{m:?} accepted with {n} bytes"
                );
            }
        }
    }

    #[test]
    fn reserved_bytes_and_unknown_types_are_refused() {
        for m in all() {
            for i in 1..4 {
                let mut b = m.encode().as_slice().to_vec();
                b[i] = 1;
                assert!(ControlMessage::decode(&b).is_err());
            }
        }
        for ty in [0u8, 7, 8, 0x80, 0xff] {
            let mut b = [0u8; 16];
            b[0] = ty;
            for n in [4, 8, 12, 16] {
                assert!(
                    ControlMessage::decode(&b[..n]).is_err(),
                    "type {ty} len {n}"
                );
            }
        }
    }

    #[test]
    fn request_with_zero_length_or_wrapping_range_is_refused() {
        let zero = ControlMessage::RendezvousRequest {
            id: 1,
            addr: 4096,
            len: 0,
            rkey: 1,
        };
        assert!(ControlMessage::decode(zero.encode().as_slice()).is_err());
        let wrap = ControlMessage::RendezvousRequest {
            id: 1,
            addr: u64::MAX - 10,
            len: 11,
            rkey: 1,
        };
        assert!(ControlMessage::decode(wrap.encode().as_slice()).is_err());
        let edge = ControlMessage::RendezvousRequest {
            id: 1,
            addr: u64::MAX - 10,
            len: 10,
            rkey: 1,
        };
        assert_eq!(
            ControlMessage::decode(edge.encode().as_slice()).unwrap(),
            edge
        );
    }

    #[test]
    fn chunk_carries_its_data_after_the_fixed_part() {
        let m = ControlMessage::RendezvousChunk {
            id: 3,
            offset: 1 << 20,
            len: 5,
        };
        let mut body = m.encode().as_slice().to_vec();
        assert_eq!(body.len(), CHUNK_HEADER_LEN);
        assert!(
            ControlMessage::decode(&body).is_err(),
            "a chunk without data"
        );
        body.extend_from_slice(b"hello");
        assert_eq!(ControlMessage::decode(&body).unwrap(), m);
        assert_eq!(m.encoded_len(), body.len());
        body[12..20].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        assert!(ControlMessage::decode(&body).is_err(), "wrapping range");
        body[12..20].copy_from_slice(&0u64.to_le_bytes());
        body[2] = 1;
        assert!(ControlMessage::decode(&body).is_err(), "reserved byte");
    }

    #[test]
    fn refuse_reasons_have_names() {
        for r in [
            refuse_reason::TOO_LARGE,
            refuse_reason::NO_ACCESS,
            refuse_reason::NO_ROOM,
            refuse_reason::MALFORMED,
            refuse_reason::BUSY,
        ] {
            assert_ne!(refuse_reason::describe(r), "unknown reason");
        }
        assert_eq!(refuse_reason::describe(99), "unknown reason");
    }
}
