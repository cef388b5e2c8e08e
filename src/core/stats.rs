//! Counters, plain integers updated on the hot path and cheap to read.

/// Counters of one segment group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupStats {
    /// Messages placed in (sender) or accepted from (receiver) the group.
    pub messages: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
}

/// Counters of a [`Sender`](super::Sender).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SenderStats {
    /// Messages reserved (data and control).
    pub messages: u64,
    /// Payload bytes reserved.
    pub bytes: u64,
    /// Control messages reserved.
    pub control_messages: u64,
    /// Reservations refused for lack of free partitions (back-pressure).
    pub credit_stalls: u64,
    /// Reservations refused because no group can hold the length.
    pub rendezvous_needed: u64,
    /// Credits that moved a segment's freed position.
    pub credits: u64,
    /// Partitions skipped as padding at ring ends.
    pub padding_partitions: u64,
    /// Per group, indexed by group id.
    pub per_group: Vec<GroupStats>,
}

impl SenderStats {
    pub(crate) fn new(groups: usize) -> Self {
        SenderStats {
            per_group: vec![GroupStats::default(); groups],
            ..Default::default()
        }
    }
}

/// Counters of a [`Receiver`](super::Receiver).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceiverStats {
    /// Messages accepted (data and control).
    pub messages: u64,
    /// Payload bytes accepted.
    pub bytes: u64,
    /// Control messages accepted.
    pub control_messages: u64,
    /// Messages released by the application.
    pub releases: u64,
    /// Releases that could not advance the freed position (out of order).
    pub out_of_order_releases: u64,
    /// Credit updates emitted.
    pub credits_emitted: u64,
    /// Partitions skipped as padding at ring ends.
    pub padding_partitions: u64,
    /// Per group, indexed by group id.
    pub per_group: Vec<GroupStats>,
}

impl ReceiverStats {
    pub(crate) fn new(groups: usize) -> Self {
        ReceiverStats {
            per_group: vec![GroupStats::default(); groups],
            ..Default::default()
        }
    }
}
