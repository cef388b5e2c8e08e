//! Control messages (header kind 2), carried in partitions like data.
//!
//! Body layout (little-endian): byte 0 the type, bytes 1..4 reserved (zero), then the fields of
//! the type. Every type has one exact length; the decoder refuses anything else.
//!
//! | type | message | fields after the 4-byte prefix | body length |
//! |---|---|---|---|
//! | 1 | rendezvous request | id u64, addr u64, len u64, rkey u32 | 32 |
//! | 2 | rendezvous done | id u64 | 12 |
//! | 3 | close | reason u32 | 8 |

use super::error::ProtocolError;

/// Longest control body.
pub const MAX_CONTROL_LEN: usize = 32;

const TYPE_RDV_REQUEST: u8 = 1;
const TYPE_RDV_DONE: u8 = 2;
const TYPE_CLOSE: u8 = 3;

/// Reason codes of [`ControlMessage::Close`].
pub mod close_reason {
    /// Orderly shutdown.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The application aborted.
    pub const ABORT: u32 = 2;
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
    /// Length of the encoded body.
    pub fn encoded_len(&self) -> usize {
        match self {
            ControlMessage::RendezvousRequest { .. } => 32,
            ControlMessage::RendezvousDone { .. } => 12,
            ControlMessage::Close { .. } => 8,
        }
    }

    /// Encodes the body.
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
        }
        ControlBuf {
            bytes: b,
            len: self.encoded_len(),
        }
    }

    /// Decodes a body: known type, exact length, zero reserved bytes; a rendezvous request with
    /// a zero length or an address range that wraps is refused.
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
            _ => return Err(bad("unknown control type")),
        };
        debug_assert_eq!(want, msg.encoded_len());
        Ok(msg)
    }
}
