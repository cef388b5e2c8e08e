//! Errors of the protocol core.
//!
//! Every value a peer or a user controls is validated; a violation is reported with the step that
//! failed and its context, never by a panic.

use super::types::{GroupId, SegmentId};

/// A configuration (group layout) that cannot be used, or a string form that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Fewer than two groups were configured (the method needs groups of unequal partition size).
    #[error("layout has {groups} segment group(s); at least 2 are required")]
    TooFewGroups {
        /// Number of groups given.
        groups: usize,
    },
    /// More groups than the 8-bit group id can number.
    #[error("layout has {groups} segment groups; at most 256 are allowed")]
    TooManyGroups {
        /// Number of groups given.
        groups: usize,
    },
    /// A partition size that is not a power of two or is below the header-bearing minimum.
    #[error("group {group}: partition size {size} must be a power of two >= 64")]
    BadPartitionSize {
        /// Position of the group in the layout.
        group: usize,
        /// The size given.
        size: u64,
    },
    /// Partition sizes must increase strictly from one group to the next.
    #[error(
        "group {group}: partition size {size} is not larger than the previous group's {previous}"
    )]
    NotIncreasing {
        /// Position of the group in the layout.
        group: usize,
        /// The size given.
        size: u64,
        /// The previous group's size.
        previous: u64,
    },
    /// Partition count outside `1..=65536`.
    #[error("group {group}: partition count {count} must be in 1..=65536")]
    BadPartitionCount {
        /// Position of the group in the layout.
        group: usize,
        /// The count given.
        count: u64,
    },
    /// Span factor outside `1..=partitions`.
    #[error("group {group}: span {span} must be in 1..={partitions}")]
    BadSpan {
        /// Position of the group in the layout.
        group: usize,
        /// The span given.
        span: u64,
        /// The group's partition count.
        partitions: u64,
    },
    /// A group without segments.
    #[error("group {group}: must have at least one segment")]
    NoSegments {
        /// Position of the group in the layout.
        group: usize,
    },
    /// More segments than the 8-bit segment id can number.
    #[error("layout has {segments} segments; at most 256 are allowed per direction")]
    TooManySegments {
        /// Number of segments.
        segments: u64,
    },
    /// A size computation overflowed.
    #[error("group {group}: segment size overflows")]
    Overflow {
        /// Position of the group in the layout.
        group: usize,
    },
    /// The layout needs more memory than the configured cap.
    #[error("layout needs {bytes} bytes of segments per direction, above the cap of {cap}")]
    OverMemoryCap {
        /// Bytes needed.
        bytes: u64,
        /// The cap.
        cap: u64,
    },
    /// The string form could not be parsed.
    #[error("cannot parse group list {input:?}: {reason}")]
    Parse {
        /// The offending text.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A segment was added to a group that does not exist.
    #[error("no segment group {group}")]
    UnknownGroup {
        /// The group asked for.
        group: GroupId,
    },
    /// The sender was told to add a segment under an id other than the next free one.
    #[error("segment id {got} given for a new segment, but the next id is {expected}")]
    UnexpectedSegmentId {
        /// The id given.
        got: SegmentId,
        /// The id both sides must use next.
        expected: u16,
    },
}

/// A peer sent something the protocol forbids, or the application handed back an invalid token.
///
/// A protocol error from a peer closes the connection; one from a token is the caller's mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The immediate's type field is not a known type.
    #[error("immediate {raw:#010x}: unknown type {ty}")]
    UnknownImmediateType {
        /// The immediate (host order).
        raw: u32,
        /// The type field.
        ty: u8,
    },
    /// A known immediate type delivered to the wrong side (a credit notice to the receiver, or a
    /// message immediate to the sender).
    #[error("immediate {raw:#010x}: {expected} immediate expected")]
    UnexpectedImmediateType {
        /// The immediate (host order).
        raw: u32,
        /// What was expected.
        expected: &'static str,
    },
    /// More message immediates arrived, unprocessed, than the receive queue's bound (the
    /// partitions of both directions plus the link's margin): no peer can have that many
    /// messages in flight, since each takes one of our partitions.
    #[error("more than {limit} message immediates pending, more than the partitions allow")]
    TooManyImmediates {
        /// [`Layout::recv_wqe_bound_for`](crate::core::Layout::recv_wqe_bound_for) of the two
        /// layouts.
        limit: usize,
    },
    /// The segment id names no segment of this direction.
    #[error("{step}: unknown segment {segment}")]
    UnknownSegment {
        /// The step that found it.
        step: &'static str,
        /// The segment id.
        segment: SegmentId,
    },
    /// A partition index beyond the segment's partition count.
    #[error("{step}: partition {partition} out of range for {segment} ({partitions} partitions)")]
    PartitionOutOfRange {
        /// The step that found it.
        step: &'static str,
        /// The segment.
        segment: SegmentId,
        /// The partition index.
        partition: u32,
        /// The segment's partition count.
        partitions: u32,
    },
    /// The message does not start where the segment ring says the next one must.
    #[error(
        "immediate for {segment}: first partition {got}, expected {expected} (or 0 after padding)"
    )]
    UnexpectedPartition {
        /// The segment.
        segment: SegmentId,
        /// First partition given.
        got: u32,
        /// First partition expected.
        expected: u32,
    },
    /// The generation (lap) does not match the expected one: stale or forged.
    #[error("{step} for {segment}: generation {got} (masked), expected {expected}")]
    StaleGeneration {
        /// The step that found it.
        step: &'static str,
        /// The segment.
        segment: SegmentId,
        /// Generation given (as carried, possibly masked).
        got: u32,
        /// Generation expected (masked the same way).
        expected: u32,
    },
    /// The header slice is shorter than a header.
    #[error("header of {len} bytes, {need} needed")]
    HeaderTooShort {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The header magic is wrong.
    #[error("header magic {got:#06x}, expected 0x5253")]
    BadMagic {
        /// Magic found.
        got: u16,
    },
    /// The header kind is unknown.
    #[error("header kind {got} unknown")]
    BadKind {
        /// Kind found.
        got: u8,
    },
    /// The header flags are not zero.
    #[error("header flags {got:#04x}, expected 0")]
    BadFlags {
        /// Flags found.
        got: u8,
    },
    /// A bare message (immediate type 2) in a segment whose partitions are longer than the
    /// largest eager payload: a sender never sends one there (such a payload goes by rendezvous).
    #[error("{segment}: bare message of {len} bytes, above the largest eager payload ({max})")]
    BareBeyondEager {
        /// The segment.
        segment: SegmentId,
        /// The segment's partition size, the bare message's length.
        len: u32,
        /// The largest eager payload of the layout.
        max: usize,
    },
    /// The message length does not fit the group's span.
    #[error("{segment}: message of {len} bytes needs {count} partitions, span is {span}")]
    LengthBeyondSpan {
        /// The segment.
        segment: SegmentId,
        /// Payload length.
        len: u32,
        /// Partitions the message would need.
        count: u64,
        /// The group's span factor.
        span: u32,
    },
    /// The message would run past the end of the segment.
    #[error(
        "{segment}: {count} partitions from {first} run past the end ({partitions} partitions)"
    )]
    LengthBeyondSegmentEnd {
        /// The segment.
        segment: SegmentId,
        /// First partition.
        first: u32,
        /// Partitions of the message.
        count: u32,
        /// Partitions of the segment.
        partitions: u32,
    },
    /// The sender wrapped to partition 0 although the message fitted before the segment end.
    #[error(
        "{segment}: message wrapped to partition 0 though {count} partitions fitted at {expected}"
    )]
    NeedlessPadding {
        /// The segment.
        segment: SegmentId,
        /// Partition where the message was expected.
        expected: u32,
        /// Partitions of the message.
        count: u32,
    },
    /// The message's sequence number is not the next one of the direction.
    #[error("sequence number {got}, expected {expected}")]
    OutOfSequence {
        /// Number given.
        got: u32,
        /// Number expected.
        expected: u32,
    },
    /// A message landed on partitions that are not free (the peer overran its credit).
    #[error("{step}: {segment} partition {partition} is not free")]
    PartitionNotFree {
        /// The step that found it.
        step: &'static str,
        /// The segment.
        segment: SegmentId,
        /// The first busy partition.
        partition: u32,
    },
    /// An arrival was accepted after the segment's ring moved (arrivals must be accepted in order,
    /// one at a time).
    #[error("arrival for {segment} is stale: the segment ring moved since on_immediate")]
    StaleArrival {
        /// The segment.
        segment: SegmentId,
    },
    /// A release token that does not name a message held by the application.
    #[error("release of {segment} partition {partition}: {reason}")]
    InvalidToken {
        /// The segment.
        segment: SegmentId,
        /// The token's first partition.
        partition: u32,
        /// Why the token is refused.
        reason: &'static str,
    },
    /// A credit above what the sender has handed out.
    #[error("credit for {segment}: freed {freed} above head {head}")]
    CreditAboveHead {
        /// The segment.
        segment: SegmentId,
        /// Credit given.
        freed: u64,
        /// The sender's head.
        head: u64,
    },
    /// A credit that stops inside a message (the receiver only ever frees whole messages).
    #[error("credit for {segment}: freed {freed} is not at a message boundary")]
    CreditNotOnBoundary {
        /// The segment.
        segment: SegmentId,
        /// Credit given.
        freed: u64,
    },
    /// The peer made this side hold more than one of its receive-side limits allows (see
    /// "Limits on the receiving side" in `docs/rendezvous.md`).
    #[error("{what}: more than the limit of {limit}")]
    LimitExceeded {
        /// What was held.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A control message body that does not decode.
    #[error("control message: {reason} (type {ty}, {len} bytes)")]
    BadControl {
        /// Type byte (0 when absent).
        ty: u8,
        /// Body length.
        len: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Why [`Sender::reserve`](super::Sender::reserve) could not place a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// Some group can hold a message of this length, but none has enough free contiguous
    /// partitions now: back-pressure. Retry after credits arrive.
    #[error("no free partitions for a message of {len} bytes (from {group}); wait for credits")]
    WouldBlock {
        /// Payload length.
        len: usize,
        /// The smallest group that can hold the message.
        group: GroupId,
    },
    /// No group can ever hold a message of this length: use the rendezvous path.
    #[error("message of {len} bytes exceeds the largest eager payload of {max} bytes")]
    NeedsRendezvous {
        /// Payload length.
        len: usize,
        /// Largest payload any group can carry.
        max: usize,
    },
}
