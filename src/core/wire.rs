//! Wire codecs: the 32-bit immediate and the message header.
//!
//! Layouts are in `docs/protocol.md`. Decoders validate every field they can check on their own;
//! checks that need connection state (segment exists, expected partition, generation) are done by
//! [`Receiver`](super::Receiver) and [`Sender`](super::Sender).

use super::error::ProtocolError;
use super::types::{Generation, MessageKind, PartitionIndex, SegmentId};

/// Bytes of the message header at the start of the first partition.
pub const HEADER_LEN: usize = 16;
/// Header magic (`"RS"`).
pub const MAGIC: u16 = 0x5253;
/// Bits of the credit notice's `freed` field.
pub const CREDIT_NOTICE_BITS: u32 = 22;
const CREDIT_MASK: u32 = (1 << CREDIT_NOTICE_BITS) - 1;

const TYPE_MESSAGE: u32 = 0;
const TYPE_CREDIT: u32 = 1;
const TYPE_BARE: u32 = 2;

/// A 32-bit immediate in host order. On the wire it is big-endian: use [`Immediate::to_be_bytes`]
/// / [`Immediate::to_be`] when posting and [`Immediate::from_be`] on a completion's raw field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Immediate(pub u32);

/// A decoded immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImmediateKind {
    /// A message landed: type 0 (with its header), or type 2 (bare: a data message without a
    /// header that fills exactly one partition).
    Message {
        /// Target segment.
        segment: SegmentId,
        /// First partition of the message.
        first: PartitionIndex,
        /// Generation modulo 64.
        generation_bits: u8,
        /// Type 2: no header; the payload is the whole partition.
        bare: bool,
    },
    /// A credit notice (wake-up for a blocked sender): type 1.
    Credit {
        /// Segment whose credit moved.
        segment: SegmentId,
        /// `freed` modulo 2^22.
        freed_low: u32,
    },
}

impl ImmediateKind {
    /// The type bits (31..30) of a message immediate.
    pub const MESSAGE_TYPE: u32 = TYPE_MESSAGE;
    /// The type bits (31..30) of a credit notice.
    pub const CREDIT_TYPE: u32 = TYPE_CREDIT;
    /// The type bits (31..30) of a bare message (no header, one whole partition).
    pub const BARE_TYPE: u32 = TYPE_BARE;
}

impl Immediate {
    /// The type bits (31..30), undecoded: [`ImmediateKind::MESSAGE_TYPE`],
    /// [`ImmediateKind::CREDIT_TYPE`], [`ImmediateKind::BARE_TYPE`], or 3 (which
    /// [`Immediate::decode`] rejects).
    #[inline]
    pub fn kind_bits(self) -> u32 {
        self.0 >> 30
    }

    /// Encodes a message immediate.
    #[inline]
    pub fn message(segment: SegmentId, first: PartitionIndex, generation: Generation) -> Self {
        Self::located(TYPE_MESSAGE, segment, first, generation)
    }

    /// Encodes the immediate of a bare message: a data message without a header whose payload
    /// is exactly one partition.
    #[inline]
    pub fn bare(segment: SegmentId, first: PartitionIndex, generation: Generation) -> Self {
        Self::located(TYPE_BARE, segment, first, generation)
    }

    #[inline(always)]
    fn located(ty: u32, segment: SegmentId, first: PartitionIndex, generation: Generation) -> Self {
        Immediate(
            (ty << 30)
                | (u32::from(segment.0) << 22)
                | (first.get() << 6)
                | u32::from(generation.imm_bits()),
        )
    }

    /// Encodes a credit notice carrying `freed` modulo 2^22.
    #[inline]
    pub fn credit(segment: SegmentId, freed: u64) -> Self {
        Immediate((TYPE_CREDIT << 30) | (u32::from(segment.0) << 22) | (freed as u32 & CREDIT_MASK))
    }

    /// Host-order value.
    #[inline]
    pub fn get(self) -> u32 {
        self.0
    }

    /// Bytes on the wire (big-endian).
    #[inline]
    pub fn to_be_bytes(self) -> [u8; 4] {
        self.0.to_be_bytes()
    }

    /// The value to store in a `__be32` field such as `ibv_send_wr.imm_data`.
    #[inline]
    pub fn to_be(self) -> u32 {
        self.0.to_be()
    }

    /// From a `__be32` field such as `ibv_wc.imm_data`.
    #[inline]
    pub fn from_be(raw: u32) -> Self {
        Immediate(u32::from_be(raw))
    }

    /// From big-endian wire bytes.
    #[inline]
    pub fn from_be_bytes(bytes: [u8; 4]) -> Self {
        Immediate(u32::from_be_bytes(bytes))
    }

    /// Decodes the type and fields.
    ///
    /// # Errors
    /// [`ProtocolError::UnknownImmediateType`] for type 3.
    #[inline]
    pub fn decode(self) -> Result<ImmediateKind, ProtocolError> {
        let v = self.0;
        let segment = SegmentId(((v >> 22) & 0xff) as u8);
        match v >> 30 {
            ty @ (TYPE_MESSAGE | TYPE_BARE) => Ok(ImmediateKind::Message {
                segment,
                first: PartitionIndex::from_u16(((v >> 6) & 0xffff) as u16),
                generation_bits: (v & 0x3f) as u8,
                bare: ty == TYPE_BARE,
            }),
            TYPE_CREDIT => Ok(ImmediateKind::Credit {
                segment,
                freed_low: v & CREDIT_MASK,
            }),
            ty => Err(ProtocolError::UnknownImmediateType {
                raw: v,
                ty: ty as u8,
            }),
        }
    }
}

/// The message header (16 bytes, little-endian) at the start of a message's first partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Data or control.
    pub kind: MessageKind,
    /// Payload length in bytes (the header not included).
    pub len: u32,
    /// Sequence number of the message in its direction.
    pub seq: u32,
    /// Generation (lap) of the first partition.
    pub generation: Generation,
}

impl Header {
    /// Encodes the header.
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = 0;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.generation.0.to_le_bytes());
        b
    }

    /// Decodes a header, checking length, magic, kind and flags. The length, sequence number
    /// and generation are checked against connection state by [`Receiver::accept`](super::Receiver::accept).
    ///
    /// # Errors
    /// [`ProtocolError::HeaderTooShort`], [`ProtocolError::BadMagic`], [`ProtocolError::BadKind`],
    /// [`ProtocolError::BadFlags`].
    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Header, ProtocolError> {
        let b: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(ProtocolError::HeaderTooShort {
                len: bytes.len(),
                need: HEADER_LEN,
            })?;
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { got: magic });
        }
        let kind = MessageKind::from_u8(b[2]).ok_or(ProtocolError::BadKind { got: b[2] })?;
        if b[3] != 0 {
            return Err(ProtocolError::BadFlags { got: b[3] });
        }
        Ok(Header {
            kind,
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            generation: Generation(u32::from_le_bytes([b[12], b[13], b[14], b[15]])),
        })
    }
}

/// Reconstructs an absolute `freed` from the 22 bits of a credit notice.
///
/// The result is the unique value `v <= head` with `v mod 2^22 == low` and `v > head - 2^22`. Any
/// true credit lies in that window, because a segment never has more than 65536 partitions out
/// (`head - freed <= partitions`); older duplicates land on their own (smaller) value and are
/// ignored by the sender's monotonic maximum. `None` when no such value exists (`low` above a
/// small `head`): the notice reports a credit never handed out.
#[inline]
pub fn reconstruct_freed(low: u32, head: u64) -> Option<u64> {
    let low = u64::from(low & CREDIT_MASK);
    let modulus = 1u64 << CREDIT_NOTICE_BITS;
    let back = (head.wrapping_sub(low)) & (modulus - 1);
    head.checked_sub(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_fields_use_their_bit_ranges() {
        let imm = Immediate::message(
            SegmentId(0xff),
            PartitionIndex::from_u16(0xffff),
            Generation(0x3f),
        );
        assert_eq!(imm.get(), 0x3fff_ffff);
        let imm = Immediate::message(SegmentId(1), PartitionIndex::from_u16(1), Generation(1));
        assert_eq!(imm.get(), (1 << 22) | (1 << 6) | 1);
        assert_eq!(
            Immediate::credit(SegmentId(2), u64::MAX).get(),
            (1 << 30) | (2 << 22) | 0x3f_ffff
        );
        let bare = Immediate::bare(SegmentId(3), PartitionIndex::from_u16(4), Generation(65));
        assert_eq!(bare.get(), (2 << 30) | (3 << 22) | (4 << 6) | 1);
        assert_eq!(bare.kind_bits(), ImmediateKind::BARE_TYPE);
        assert_eq!(
            bare.decode(),
            Ok(ImmediateKind::Message {
                segment: SegmentId(3),
                first: PartitionIndex::from_u16(4),
                generation_bits: 1,
                bare: true,
            })
        );
        assert!(matches!(
            Immediate(3 << 30).decode(),
            Err(ProtocolError::UnknownImmediateType { ty: 3, .. })
        ));
    }

    #[test]
    fn header_layout_is_little_endian() {
        let h = Header {
            kind: MessageKind::Control,
            len: 0x0102_0304,
            seq: 5,
            generation: Generation(6),
        };
        assert_eq!(
            h.encode(),
            [0x53, 0x52, 2, 0, 4, 3, 2, 1, 5, 0, 0, 0, 6, 0, 0, 0]
        );
    }

    #[test]
    fn reconstruct_at_small_heads() {
        assert_eq!(reconstruct_freed(0, 0), Some(0));
        assert_eq!(reconstruct_freed(3, 3), Some(3));
        assert_eq!(reconstruct_freed(4, 3), None);
    }
}
