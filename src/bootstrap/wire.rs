//! The manager's wire format: frames, messages and the connection descriptors they carry.
//!
//! Every frame is a 12-byte header followed by a payload of at most [`MAX_PAYLOAD`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `RSMB` |
//! | 4 | 1 | protocol version ([`VERSION`]) |
//! | 5 | 1 | message kind |
//! | 6 | 2 | flags, must be 0 |
//! | 8 | 4 | payload length (little-endian) |
//!
//! All integers are little-endian. Strings are a `u16` byte length followed by that many bytes, each
//! field with its own limit and character set. The decoder is strict: unknown kinds, non-zero
//! flags or reserved bits, out-of-range values, over-long strings, duplicate segment ids and
//! trailing bytes are all errors ([`DecodeError`]); it never panics on any input.

use std::fmt;

use thiserror::Error;

/// The four magic bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"RSMB";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest endpoint name in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest host identifier in bytes.
pub const MAX_HOST_ID_LEN: usize = 128;
/// Longest Unix socket path in bytes (the kernel's `sun_path` holds 108 including the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// Longest error message or close reason in bytes.
pub const MAX_TEXT_LEN: usize = 512;
/// Most target segment descriptors in one [`Descriptors`].
pub const MAX_SEGMENTS: usize = 256;
/// Largest opaque transport blob in one [`Descriptors`].
pub const MAX_OPAQUE_LEN: usize = 4096;
/// Longest wait one long-poll request may ask for, in milliseconds.
pub const MAX_WAIT_MS: u32 = 60_000;
/// Length of the authentication nonces and MACs.
pub const NONCE_LEN: usize = 32;
/// Largest partition size accepted in a segment descriptor (1 GiB).
pub const MAX_PARTITION_SIZE: u32 = 1 << 30;
/// Smallest partition size accepted in a segment descriptor.
pub const MIN_PARTITION_SIZE: u32 = 64;
/// Most partitions per segment (the immediate has 16 bits for the partition index).
pub const MAX_PARTITION_COUNT: u32 = 1 << 16;
/// Largest credit mailbox in bytes.
pub const MAX_MAILBOX_LEN: u32 = 64 * 1024;

/// Why a frame or a field could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame speaks another protocol version.
    #[error("unsupported protocol version {got} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u8,
    },
    /// The header's flags are not zero.
    #[error("non-zero frame flags {0:#06x}")]
    BadFlags(u16),
    /// The payload length exceeds [`MAX_PAYLOAD`].
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    Oversized {
        /// The announced length.
        len: u32,
    },
    /// The message kind is unknown.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// The payload ended before a field was complete.
    #[error("payload truncated while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes are left after the last field.
    #[error("{count} trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes are left.
        count: usize,
    },
    /// A field holds a value outside its range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message kind byte.
    pub kind: u8,
    /// The payload length, already checked against [`MAX_PAYLOAD`].
    pub len: usize,
}

impl FrameHeader {
    /// Decodes and validates a frame header.
    ///
    /// # Errors
    /// Bad magic, another version, non-zero flags or an oversized length.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if bytes[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion { got: bytes[4] });
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 {
            return Err(DecodeError::BadFlags(flags));
        }
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if len as usize > MAX_PAYLOAD {
            return Err(DecodeError::Oversized { len });
        }
        Ok(Self {
            kind: bytes[5],
            len: len as usize,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Validated field types
// ---------------------------------------------------------------------------------------------

fn check_name_chars(s: &str, field: &'static str, max: usize) -> Result<(), DecodeError> {
    if s.is_empty() {
        return Err(invalid(field, "empty"));
    }
    if s.len() > max {
        return Err(invalid(field, format!("{} bytes, limit {max}", s.len())));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        return Err(invalid(
            field,
            format!("character {c:?} outside [A-Za-z0-9._:@-]"),
        ));
    }
    Ok(())
}

/// An endpoint name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointName(String);

impl EndpointName {
    /// Validates a name.
    ///
    /// # Errors
    /// Empty, longer than [`MAX_NAME_LEN`] or with a character outside `[A-Za-z0-9._:@-]`.
    pub fn new(name: impl Into<String>) -> Result<Self, DecodeError> {
        let name = name.into();
        check_name_chars(&name, "endpoint name", MAX_NAME_LEN)?;
        Ok(Self(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for EndpointName {
    type Error = DecodeError;
    fn try_from(s: &str) -> Result<Self, DecodeError> {
        Self::new(s)
    }
}

/// A host identifier: 1 to [`MAX_HOST_ID_LEN`] bytes of `[A-Za-z0-9._:@-]`.
///
/// Two endpoints with equal host identifiers are on the same host and may use shared memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostId(String);

impl HostId {
    /// Validates a host identifier.
    ///
    /// # Errors
    /// Empty, longer than [`MAX_HOST_ID_LEN`] or with a character outside `[A-Za-z0-9._:@-]`.
    pub fn new(id: impl Into<String>) -> Result<Self, DecodeError> {
        let id = id.into();
        check_name_chars(&id, "host id", MAX_HOST_ID_LEN)?;
        Ok(Self(id))
    }

    /// This machine's identifier: `/etc/machine-id` (or the kernel's boot id when it is missing),
    /// which distinguishes hosts and containers with their own identity.
    ///
    /// # Errors
    /// Neither file can be read or holds a valid identifier.
    pub fn local() -> std::io::Result<Self> {
        let mut last = None;
        for path in ["/etc/machine-id", "/proc/sys/kernel/random/boot_id"] {
            match std::fs::read_to_string(path) {
                Ok(s) => match Self::new(s.trim()) {
                    Ok(id) => return Ok(id),
                    Err(e) => {
                        last = Some(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                    }
                },
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no host identifier")))
    }

    /// The identifier as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The set of transports an endpoint offers (a bit set on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransportSet(u8);

impl TransportSet {
    /// RDMA verbs (RC queue pairs).
    pub const VERBS: Self = Self(1);
    /// Shared memory between processes of one host.
    pub const SHM: Self = Self(2);
    const ALL: u8 = 3;

    /// Builds a set from its wire bits.
    ///
    /// # Errors
    /// Empty, or with a bit other than [`Self::VERBS`] and [`Self::SHM`].
    pub fn from_bits(bits: u8) -> Result<Self, DecodeError> {
        if bits == 0 {
            return Err(invalid("transports", "no transport offered"));
        }
        if bits & !Self::ALL != 0 {
            return Err(invalid("transports", format!("unknown bits {bits:#04x}")));
        }
        Ok(Self(bits))
    }

    /// The wire bits.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether every transport of `other` is in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two sets.
    #[must_use]
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// What an endpoint registers under its name, and what a sender learns by looking it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The endpoint's name.
    pub name: EndpointName,
    /// The host it runs on (equal ids: same host, shared memory possible).
    pub host_id: HostId,
    /// The transports it accepts.
    pub transports: TransportSet,
    /// The Unix socket path where it accepts shared-memory connections; present exactly when
    /// `transports` contains [`TransportSet::SHM`].
    pub shm_socket: Option<String>,
}

impl EndpointInfo {
    /// Checks the cross-field rules (the shared-memory socket is present exactly when shared
    /// memory is offered, and is a valid path).
    ///
    /// # Errors
    /// The rule that does not hold.
    pub fn validate(&self) -> Result<(), DecodeError> {
        match (
            &self.shm_socket,
            self.transports.contains(TransportSet::SHM),
        ) {
            (Some(path), true) => check_socket_path(path),
            (None, false) => Ok(()),
            (Some(_), false) => Err(invalid(
                "shm socket",
                "present but shared memory not offered",
            )),
            (None, true) => Err(invalid(
                "shm socket",
                "shared memory offered without a socket",
            )),
        }
    }
}

fn check_socket_path(path: &str) -> Result<(), DecodeError> {
    if path.is_empty() || path.len() > MAX_SOCKET_PATH_LEN {
        return Err(invalid(
            "shm socket",
            format!("{} bytes, expected 1..={MAX_SOCKET_PATH_LEN}", path.len()),
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(invalid("shm socket", "control character in path"));
    }
    Ok(())
}

/// One target segment of a receiver, as a sender needs it to form the source image (claim 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentDescriptor {
    /// Segment id, unique within one direction of a connection.
    pub segment_id: u8,
    /// The segment group this segment belongs to.
    pub group: u8,
    /// Remote virtual address of the segment's first byte.
    pub addr: u64,
    /// Length of the registered region in bytes (at least `partition_size * partition_count`).
    pub len: u64,
    /// Remote key of the memory region.
    pub rkey: u32,
    /// Partition size in bytes: a power of two in `64..=2^30`.
    pub partition_size: u32,
    /// Number of partitions: `1..=65536`.
    pub partition_count: u32,
    /// Span factor: the most partitions one message may occupy, `1..=partition_count`.
    pub span_factor: u32,
}

impl SegmentDescriptor {
    const WIRE_LEN: usize = 1 + 1 + 8 + 8 + 4 + 4 + 4 + 4;

    /// Checks every field's range.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let p = self.partition_size;
        if !p.is_power_of_two() || !(MIN_PARTITION_SIZE..=MAX_PARTITION_SIZE).contains(&p) {
            return Err(invalid(
                "partition size",
                format!(
                    "{p}, expected a power of two in {MIN_PARTITION_SIZE}..={MAX_PARTITION_SIZE}"
                ),
            ));
        }
        let n = self.partition_count;
        if !(1..=MAX_PARTITION_COUNT).contains(&n) {
            return Err(invalid(
                "partition count",
                format!("{n}, expected 1..={MAX_PARTITION_COUNT}"),
            ));
        }
        if !(1..=n).contains(&self.span_factor) {
            return Err(invalid(
                "span factor",
                format!("{}, expected 1..={n}", self.span_factor),
            ));
        }
        let need = u64::from(p) * u64::from(n);
        if self.len < need {
            return Err(invalid(
                "segment length",
                format!("{} bytes cannot hold {n} partitions of {p}", self.len),
            ));
        }
        if self.addr.checked_add(self.len).is_none() {
            return Err(invalid("segment address", "address + length overflows"));
        }
        Ok(())
    }
}

/// The sender-side credit mailbox the receiver writes `freed` counters into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxDescriptor {
    /// Remote virtual address, 8-byte aligned.
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Length in bytes: a multiple of 8 in `8..=65536`.
    pub len: u32,
}

impl MailboxDescriptor {
    const WIRE_LEN: usize = 8 + 4 + 4;

    /// Checks every field's range.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if !self.addr.is_multiple_of(8) {
            return Err(invalid("mailbox address", "not 8-byte aligned"));
        }
        if self.len == 0 || !self.len.is_multiple_of(8) || self.len > MAX_MAILBOX_LEN {
            return Err(invalid(
                "mailbox length",
                format!(
                    "{}, expected a multiple of 8 in 8..={MAX_MAILBOX_LEN}",
                    self.len
                ),
            ));
        }
        if self.addr.checked_add(u64::from(self.len)).is_none() {
            return Err(invalid("mailbox address", "address + length overflows"));
        }
        Ok(())
    }
}

/// What the peer's RC queue pair needs to reach this one (RTR attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number (24 bits, not 0 or 1).
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Port GID (RoCE, or IB across subnets).
    pub gid: [u8; 16],
    /// Port LID (IB; 0 on RoCE).
    pub lid: u16,
    /// Path MTU in bytes: 256, 512, 1024, 2048 or 4096.
    pub mtu: u16,
    /// Port number (>= 1).
    pub port: u8,
    /// GID table index used on this side.
    pub gid_index: u8,
}

impl QpInfo {
    const WIRE_LEN: usize = 4 + 4 + 16 + 2 + 2 + 1 + 1;

    /// Checks every field's range.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.qpn > 0x00ff_ffff || self.qpn < 2 {
            return Err(invalid(
                "qpn",
                format!("{:#x}, expected 2..=0xffffff", self.qpn),
            ));
        }
        if self.psn > 0x00ff_ffff {
            return Err(invalid("psn", format!("{:#x} exceeds 24 bits", self.psn)));
        }
        if !matches!(self.mtu, 256 | 512 | 1024 | 2048 | 4096) {
            return Err(invalid(
                "mtu",
                format!("{}, expected 256, 512, 1024, 2048 or 4096", self.mtu),
            ));
        }
        if self.port == 0 {
            return Err(invalid("port", "0, ports start at 1"));
        }
        Ok(())
    }
}

/// The descriptors one side of a connection hands to the other through the manager.
///
/// A verbs transport fills `qp`, `segments` (its target segments for this peer) and `mailbox`;
/// a shared-memory transport may leave them empty and use `opaque` (at most
/// [`MAX_OPAQUE_LEN`] bytes) for anything of its own. An empty value is a valid acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptors {
    /// The queue pair's connection attributes.
    pub qp: Option<QpInfo>,
    /// The credit mailbox the peer writes into.
    pub mailbox: Option<MailboxDescriptor>,
    /// The target segments the peer writes messages into (ids unique, at most [`MAX_SEGMENTS`];
    /// segments of one group share partition size, count and span factor).
    pub segments: Vec<SegmentDescriptor>,
    /// Transport-specific bytes, at most [`MAX_OPAQUE_LEN`].
    pub opaque: Vec<u8>,
}

impl Descriptors {
    /// Checks every descriptor and the cross-segment rules.
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if let Some(qp) = &self.qp {
            qp.validate()?;
        }
        if let Some(mb) = &self.mailbox {
            mb.validate()?;
        }
        if self.segments.len() > MAX_SEGMENTS {
            return Err(invalid(
                "segment count",
                format!("{}, limit {MAX_SEGMENTS}", self.segments.len()),
            ));
        }
        if self.opaque.len() > MAX_OPAQUE_LEN {
            return Err(invalid(
                "opaque blob",
                format!("{} bytes, limit {MAX_OPAQUE_LEN}", self.opaque.len()),
            ));
        }
        let mut seen = [false; 256];
        let mut groups: [Option<(u32, u32, u32)>; 256] = [None; 256];
        for s in &self.segments {
            s.validate()?;
            if std::mem::replace(&mut seen[usize::from(s.segment_id)], true) {
                return Err(invalid(
                    "segment id",
                    format!("{} appears twice", s.segment_id),
                ));
            }
            let shape = (s.partition_size, s.partition_count, s.span_factor);
            match groups[usize::from(s.group)] {
                None => groups[usize::from(s.group)] = Some(shape),
                Some(g) if g == shape => {}
                Some(_) => {
                    return Err(invalid(
                        "segment group",
                        format!("segments of group {} differ in shape", s.group),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Encodes the descriptors on their own (the same bytes as inside a frame).
    ///
    /// # Errors
    /// The value does not pass [`Self::validate`].
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        self.validate()?;
        let mut w = Writer::default();
        w.descriptors(self);
        Ok(w.buf)
    }

    /// Decodes descriptors encoded by [`Self::encode`], rejecting trailing bytes.
    ///
    /// # Errors
    /// Malformed or out-of-range input.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let d = r.descriptors()?;
        r.finish()?;
        Ok(d)
    }
}

/// Identifies one connection attempt (a rendezvous) at the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RendezvousId(pub u64);

impl fmt::Display for RendezvousId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The two roles in a rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The endpoint that asked to connect.
    Initiator,
    /// The registered endpoint that was asked.
    Listener,
}

impl Side {
    /// The other side.
    #[must_use]
    pub fn peer(self) -> Self {
        match self {
            Self::Initiator => Self::Listener,
            Self::Listener => Self::Initiator,
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            Self::Initiator => 0,
            Self::Listener => 1,
        }
    }

    fn from_wire(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(Self::Initiator),
            1 => Ok(Self::Listener),
            _ => Err(invalid("side", format!("{b}, expected 0 or 1"))),
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Initiator => "initiator",
            Self::Listener => "listener",
        })
    }
}

/// Error codes carried by [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request frame was malformed.
    Malformed,
    /// The request used another protocol version.
    UnsupportedVersion,
    /// The authentication proof was wrong.
    AuthFailed,
    /// A request arrived before authentication completed, or out of order in the handshake.
    NotAuthenticated,
    /// No endpoint is registered under the name.
    UnknownName,
    /// The name is registered by another client.
    NameTaken,
    /// The name was not registered by this client.
    NotRegistered,
    /// The rendezvous does not exist (never did, finished or expired).
    UnknownRendezvous,
    /// The peer closed or rejected the rendezvous.
    Closed,
    /// A manager limit (endpoints, rendezvous, queue depth) was reached.
    LimitExceeded,
    /// The manager serves its maximum number of clients.
    Busy,
    /// The manager is shutting down.
    ShuttingDown,
    /// A well-formed request that is not valid in this state (a reply kind sent as a request).
    InvalidRequest,
}

impl ErrorCode {
    /// Whether the manager closes the connection after replying with this code.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Self::Malformed
                | Self::UnsupportedVersion
                | Self::AuthFailed
                | Self::NotAuthenticated
                | Self::Busy
                | Self::ShuttingDown
        )
    }

    fn to_wire(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::UnsupportedVersion => 2,
            Self::AuthFailed => 3,
            Self::NotAuthenticated => 4,
            Self::UnknownName => 5,
            Self::NameTaken => 6,
            Self::NotRegistered => 7,
            Self::UnknownRendezvous => 8,
            Self::Closed => 9,
            Self::LimitExceeded => 10,
            Self::Busy => 11,
            Self::ShuttingDown => 12,
            Self::InvalidRequest => 13,
        }
    }

    fn from_wire(v: u16) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Malformed,
            2 => Self::UnsupportedVersion,
            3 => Self::AuthFailed,
            4 => Self::NotAuthenticated,
            5 => Self::UnknownName,
            6 => Self::NameTaken,
            7 => Self::NotRegistered,
            8 => Self::UnknownRendezvous,
            9 => Self::Closed,
            10 => Self::LimitExceeded,
            11 => Self::Busy,
            12 => Self::ShuttingDown,
            13 => Self::InvalidRequest,
            _ => return Err(invalid("error code", format!("unknown code {v}"))),
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Malformed => "malformed request",
            Self::UnsupportedVersion => "unsupported version",
            Self::AuthFailed => "authentication failed",
            Self::NotAuthenticated => "not authenticated",
            Self::UnknownName => "unknown name",
            Self::NameTaken => "name taken",
            Self::NotRegistered => "not registered",
            Self::UnknownRendezvous => "unknown rendezvous",
            Self::Closed => "closed by peer",
            Self::LimitExceeded => "limit exceeded",
            Self::Busy => "manager busy",
            Self::ShuttingDown => "manager shutting down",
            Self::InvalidRequest => "invalid request",
        };
        f.write_str(s)
    }
}

/// Every message of the protocol. Requests flow client → manager, replies manager → client;
/// each request gets exactly one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 0x01, client: opens the handshake with the client's nonce.
    Hello {
        /// Fresh random client nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// 0x02, manager: the manager's nonce.
    Challenge {
        /// Fresh random manager nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// 0x03, client: proof that the client knows the token.
    Auth {
        /// HMAC-SHA256 over the client label and both nonces.
        mac: [u8; NONCE_LEN],
    },
    /// 0x04, manager: proof that the manager knows the token; the session is authenticated.
    AuthOk {
        /// HMAC-SHA256 over the manager label and both nonces.
        mac: [u8; NONCE_LEN],
    },
    /// 0x10: register an endpoint under its name, tied to this client connection.
    Register {
        /// What to register.
        info: EndpointInfo,
    },
    /// 0x11: remove a registration made by this connection.
    Unregister {
        /// The registered name.
        name: EndpointName,
    },
    /// 0x12: look an endpoint up by name.
    Lookup {
        /// The name.
        name: EndpointName,
    },
    /// 0x13: ask the listener `to` for a connection, with the initiator's first descriptors.
    Connect {
        /// Who connects (need not be registered).
        from: EndpointInfo,
        /// The registered listener.
        to: EndpointName,
        /// The initiator's descriptors for this connection.
        offer: Descriptors,
    },
    /// 0x14: wait (long poll) for the next connection request to a name this connection registered.
    WaitConnect {
        /// The registered name.
        name: EndpointName,
        /// Longest wait in milliseconds, at most [`MAX_WAIT_MS`].
        timeout_ms: u32,
    },
    /// 0x15: post descriptors to the other side of a rendezvous.
    Send {
        /// The rendezvous.
        id: RendezvousId,
        /// The sender's own side.
        side: Side,
        /// What to hand over.
        payload: Descriptors,
    },
    /// 0x16: wait (long poll) for the next descriptors posted by the other side.
    Recv {
        /// The rendezvous.
        id: RendezvousId,
        /// The receiver's own side.
        side: Side,
        /// Longest wait in milliseconds, at most [`MAX_WAIT_MS`].
        timeout_ms: u32,
    },
    /// 0x17: close one side of a rendezvous (done, or rejected with a reason).
    Close {
        /// The rendezvous.
        id: RendezvousId,
        /// The closing side.
        side: Side,
        /// Why (may be empty), at most [`MAX_TEXT_LEN`] bytes.
        reason: String,
    },
    /// 0x18: liveness check.
    Ping,
    /// 0x40: the request succeeded with nothing to return.
    Ok,
    /// 0x41: reply to [`Message::Lookup`].
    Found {
        /// The registration.
        info: EndpointInfo,
    },
    /// 0x42: reply to [`Message::Connect`]: the request is queued for the listener.
    Queued {
        /// The new rendezvous.
        id: RendezvousId,
    },
    /// 0x43: reply to [`Message::WaitConnect`]: a connection request.
    Incoming {
        /// The rendezvous.
        id: RendezvousId,
        /// The initiator.
        from: EndpointInfo,
        /// The initiator's descriptors.
        offer: Descriptors,
    },
    /// 0x44: reply to [`Message::Recv`].
    Delivered {
        /// The other side's descriptors.
        payload: Descriptors,
    },
    /// 0x45: reply to a long poll that ended without news.
    TimedOut,
    /// 0x46: reply to [`Message::Ping`].
    Pong,
    /// 0x7f: the request failed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail, at most [`MAX_TEXT_LEN`] bytes.
        message: String,
    },
}

impl Message {
    /// The kind byte of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => 0x01,
            Self::Challenge { .. } => 0x02,
            Self::Auth { .. } => 0x03,
            Self::AuthOk { .. } => 0x04,
            Self::Register { .. } => 0x10,
            Self::Unregister { .. } => 0x11,
            Self::Lookup { .. } => 0x12,
            Self::Connect { .. } => 0x13,
            Self::WaitConnect { .. } => 0x14,
            Self::Send { .. } => 0x15,
            Self::Recv { .. } => 0x16,
            Self::Close { .. } => 0x17,
            Self::Ping => 0x18,
            Self::Ok => 0x40,
            Self::Found { .. } => 0x41,
            Self::Queued { .. } => 0x42,
            Self::Incoming { .. } => 0x43,
            Self::Delivered { .. } => 0x44,
            Self::TimedOut => 0x45,
            Self::Pong => 0x46,
            Self::Error { .. } => 0x7f,
        }
    }

    /// A short name of the message kind, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Challenge { .. } => "challenge",
            Self::Auth { .. } => "auth",
            Self::AuthOk { .. } => "auth-ok",
            Self::Register { .. } => "register",
            Self::Unregister { .. } => "unregister",
            Self::Lookup { .. } => "lookup",
            Self::Connect { .. } => "connect",
            Self::WaitConnect { .. } => "wait-connect",
            Self::Send { .. } => "send",
            Self::Recv { .. } => "recv",
            Self::Close { .. } => "close",
            Self::Ping => "ping",
            Self::Ok => "ok",
            Self::Found { .. } => "found",
            Self::Queued { .. } => "queued",
            Self::Incoming { .. } => "incoming",
            Self::Delivered { .. } => "delivered",
            Self::TimedOut => "timed-out",
            Self::Pong => "pong",
            Self::Error { .. } => "error",
        }
    }

    /// Encodes the message as one complete frame (header and payload).
    ///
    /// # Errors
    /// A field fails validation (the same rules the decoder applies), so that nothing invalid is
    /// ever sent.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        self.validate()?;
        let mut w = Writer::default();
        w.buf.extend_from_slice(&MAGIC);
        w.u8(VERSION);
        w.u8(self.kind());
        w.u16(0);
        w.u32(0);
        match self {
            Self::Hello { nonce } | Self::Challenge { nonce } => w.buf.extend_from_slice(nonce),
            Self::Auth { mac } | Self::AuthOk { mac } => w.buf.extend_from_slice(mac),
            Self::Register { info } | Self::Found { info } => w.endpoint(info),
            Self::Unregister { name } | Self::Lookup { name } => w.str(name.as_str()),
            Self::Connect { from, to, offer } => {
                w.endpoint(from);
                w.str(to.as_str());
                w.descriptors(offer);
            }
            Self::WaitConnect { name, timeout_ms } => {
                w.str(name.as_str());
                w.u32(*timeout_ms);
            }
            Self::Send { id, side, payload } => {
                w.u64(id.0);
                w.u8(side.to_wire());
                w.descriptors(payload);
            }
            Self::Recv {
                id,
                side,
                timeout_ms,
            } => {
                w.u64(id.0);
                w.u8(side.to_wire());
                w.u32(*timeout_ms);
            }
            Self::Close { id, side, reason } => {
                w.u64(id.0);
                w.u8(side.to_wire());
                w.str(reason);
            }
            Self::Queued { id } => w.u64(id.0),
            Self::Incoming { id, from, offer } => {
                w.u64(id.0);
                w.endpoint(from);
                w.descriptors(offer);
            }
            Self::Delivered { payload } => w.descriptors(payload),
            Self::Ping | Self::Ok | Self::TimedOut | Self::Pong => {}
            Self::Error { code, message } => {
                w.u16(code.to_wire());
                w.str(message);
            }
        }
        let len = w.buf.len() - HEADER_LEN;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::Oversized {
                len: u32::try_from(len).unwrap_or(u32::MAX),
            });
        }
        let len = (len as u32).to_le_bytes();
        w.buf[8..12].copy_from_slice(&len);
        Ok(w.buf)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let text = |s: &str, field| {
            if s.len() > MAX_TEXT_LEN {
                Err(invalid(
                    field,
                    format!("{} bytes, limit {MAX_TEXT_LEN}", s.len()),
                ))
            } else {
                Ok(())
            }
        };
        let wait = |ms: u32| {
            if ms > MAX_WAIT_MS {
                Err(invalid("timeout", format!("{ms} ms, limit {MAX_WAIT_MS}")))
            } else {
                Ok(())
            }
        };
        match self {
            Self::Register { info } | Self::Found { info } => info.validate(),
            Self::Connect { from, offer, .. } | Self::Incoming { from, offer, .. } => {
                from.validate()?;
                offer.validate()
            }
            Self::Send { payload, .. } | Self::Delivered { payload } => payload.validate(),
            Self::WaitConnect { timeout_ms, .. } | Self::Recv { timeout_ms, .. } => {
                wait(*timeout_ms)
            }
            Self::Close { reason, .. } => text(reason, "close reason"),
            Self::Error { message, .. } => text(message, "error message"),
            _ => Ok(()),
        }
    }

    /// Decodes a payload of the given kind (the header was decoded by [`FrameHeader::decode`]).
    ///
    /// # Errors
    /// Unknown kind, malformed or out-of-range fields, trailing bytes.
    pub fn decode_payload(kind: u8, payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::Oversized {
                len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            });
        }
        let mut r = Reader::new(payload);
        let msg = match kind {
            0x01 => Self::Hello {
                nonce: r.array("nonce")?,
            },
            0x02 => Self::Challenge {
                nonce: r.array("nonce")?,
            },
            0x03 => Self::Auth {
                mac: r.array("mac")?,
            },
            0x04 => Self::AuthOk {
                mac: r.array("mac")?,
            },
            0x10 => Self::Register {
                info: r.endpoint()?,
            },
            0x11 => Self::Unregister { name: r.name()? },
            0x12 => Self::Lookup { name: r.name()? },
            0x13 => Self::Connect {
                from: r.endpoint()?,
                to: r.name()?,
                offer: r.descriptors()?,
            },
            0x14 => Self::WaitConnect {
                name: r.name()?,
                timeout_ms: r.wait_ms()?,
            },
            0x15 => Self::Send {
                id: RendezvousId(r.u64("rendezvous id")?),
                side: Side::from_wire(r.u8("side")?)?,
                payload: r.descriptors()?,
            },
            0x16 => Self::Recv {
                id: RendezvousId(r.u64("rendezvous id")?),
                side: Side::from_wire(r.u8("side")?)?,
                timeout_ms: r.wait_ms()?,
            },
            0x17 => Self::Close {
                id: RendezvousId(r.u64("rendezvous id")?),
                side: Side::from_wire(r.u8("side")?)?,
                reason: r.text("close reason")?,
            },
            0x18 => Self::Ping,
            0x40 => Self::Ok,
            0x41 => Self::Found {
                info: r.endpoint()?,
            },
            0x42 => Self::Queued {
                id: RendezvousId(r.u64("rendezvous id")?),
            },
            0x43 => Self::Incoming {
                id: RendezvousId(r.u64("rendezvous id")?),
                from: r.endpoint()?,
                offer: r.descriptors()?,
            },
            0x44 => Self::Delivered {
                payload: r.descriptors()?,
            },
            0x45 => Self::TimedOut,
            0x46 => Self::Pong,
            0x7f => Self::Error {
                code: ErrorCode::from_wire(r.u16("error code")?)?,
                message: r.text("error message")?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Decodes one complete frame from `bytes`, which must hold exactly one frame.
    ///
    /// # Errors
    /// Any header or payload error, a short buffer, or bytes after the frame.
    pub fn decode_frame(bytes: &[u8]) -> Result<Self, DecodeError> {
        let Some((head, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::Truncated {
                field: "frame header",
            });
        };
        let header = FrameHeader::decode(head)?;
        if rest.len() < header.len {
            return Err(DecodeError::Truncated {
                field: "frame payload",
            });
        }
        if rest.len() > header.len {
            return Err(DecodeError::TrailingBytes {
                count: rest.len() - header.len,
            });
        }
        Self::decode_payload(header.kind, rest)
    }
}

// ---------------------------------------------------------------------------------------------
// Codec helpers
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Strings are validated shorter than `u16::MAX` before encoding; the cast cannot truncate.
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
        self.u16(len);
        self.buf.extend_from_slice(&b[..usize::from(len)]);
    }
    fn endpoint(&mut self, info: &EndpointInfo) {
        self.str(info.name.as_str());
        self.str(info.host_id.as_str());
        self.u8(info.transports.bits());
        match &info.shm_socket {
            Some(p) => {
                self.u8(1);
                self.str(p);
            }
            None => self.u8(0),
        }
    }
    fn descriptors(&mut self, d: &Descriptors) {
        let flags = u8::from(d.qp.is_some()) | (u8::from(d.mailbox.is_some()) << 1);
        self.u8(flags);
        if let Some(qp) = &d.qp {
            self.u32(qp.qpn);
            self.u32(qp.psn);
            self.buf.extend_from_slice(&qp.gid);
            self.u16(qp.lid);
            self.u16(qp.mtu);
            self.u8(qp.port);
            self.u8(qp.gid_index);
        }
        if let Some(mb) = &d.mailbox {
            self.u64(mb.addr);
            self.u32(mb.rkey);
            self.u32(mb.len);
        }
        self.u16(u16::try_from(d.segments.len()).unwrap_or(u16::MAX));
        for s in &d.segments {
            self.u8(s.segment_id);
            self.u8(s.group);
            self.u64(s.addr);
            self.u64(s.len);
            self.u32(s.rkey);
            self.u32(s.partition_size);
            self.u32(s.partition_count);
            self.u32(s.span_factor);
        }
        self.bytes(&d.opaque);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(invalid(field, format!("{len} bytes, limit {max}")));
        }
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let b = self.bytes(field, max)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| invalid(field, "not UTF-8"))
    }

    fn text(&mut self, field: &'static str) -> Result<String, DecodeError> {
        self.string(field, MAX_TEXT_LEN)
    }

    fn name(&mut self) -> Result<EndpointName, DecodeError> {
        EndpointName::new(self.string("endpoint name", MAX_NAME_LEN)?)
    }

    fn wait_ms(&mut self) -> Result<u32, DecodeError> {
        let ms = self.u32("timeout")?;
        if ms > MAX_WAIT_MS {
            return Err(invalid("timeout", format!("{ms} ms, limit {MAX_WAIT_MS}")));
        }
        Ok(ms)
    }

    fn endpoint(&mut self) -> Result<EndpointInfo, DecodeError> {
        let name = self.name()?;
        let host_id = HostId::new(self.string("host id", MAX_HOST_ID_LEN)?)?;
        let transports = TransportSet::from_bits(self.u8("transports")?)?;
        let shm_socket = match self.u8("shm socket flag")? {
            0 => None,
            1 => Some(self.string("shm socket", MAX_SOCKET_PATH_LEN)?),
            b => return Err(invalid("shm socket flag", format!("{b}, expected 0 or 1"))),
        };
        let info = EndpointInfo {
            name,
            host_id,
            transports,
            shm_socket,
        };
        info.validate()?;
        Ok(info)
    }

    fn descriptors(&mut self) -> Result<Descriptors, DecodeError> {
        let flags = self.u8("descriptor flags")?;
        if flags & !0b11 != 0 {
            return Err(invalid(
                "descriptor flags",
                format!("unknown bits {flags:#04x}"),
            ));
        }
        let qp = if flags & 1 != 0 {
            let b = self.take(QpInfo::WIRE_LEN, "qp info")?;
            let mut r = Reader::new(b);
            Some(QpInfo {
                qpn: r.u32("qpn")?,
                psn: r.u32("psn")?,
                gid: r.array("gid")?,
                lid: r.u16("lid")?,
                mtu: r.u16("mtu")?,
                port: r.u8("port")?,
                gid_index: r.u8("gid index")?,
            })
        } else {
            None
        };
        let mailbox = if flags & 2 != 0 {
            let b = self.take(MailboxDescriptor::WIRE_LEN, "mailbox")?;
            let mut r = Reader::new(b);
            Some(MailboxDescriptor {
                addr: r.u64("mailbox address")?,
                rkey: r.u32("mailbox rkey")?,
                len: r.u32("mailbox length")?,
            })
        } else {
            None
        };
        let count = usize::from(self.u16("segment count")?);
        if count > MAX_SEGMENTS {
            return Err(invalid(
                "segment count",
                format!("{count}, limit {MAX_SEGMENTS}"),
            ));
        }
        // Check the bytes are there before allocating for them.
        if self.buf.len() < count * SegmentDescriptor::WIRE_LEN {
            return Err(DecodeError::Truncated {
                field: "segment descriptors",
            });
        }
        let mut segments = Vec::with_capacity(count);
        for _ in 0..count {
            segments.push(SegmentDescriptor {
                segment_id: self.u8("segment id")?,
                group: self.u8("segment group")?,
                addr: self.u64("segment address")?,
                len: self.u64("segment length")?,
                rkey: self.u32("segment rkey")?,
                partition_size: self.u32("partition size")?,
                partition_count: self.u32("partition count")?,
                span_factor: self.u32("span factor")?,
            });
        }
        let opaque = self.bytes("opaque blob", MAX_OPAQUE_LEN)?.to_vec();
        let d = Descriptors {
            qp,
            mailbox,
            segments,
            opaque,
        };
        d.validate()?;
        Ok(d)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                count: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(name: &str) -> EndpointInfo {
        EndpointInfo {
            name: EndpointName::new(name).unwrap(),
            host_id: HostId::new("host-1").unwrap(),
            transports: TransportSet::VERBS.union(TransportSet::SHM),
            shm_socket: Some("/tmp/rsmsg-a.sock".into()),
        }
    }

    fn seg(id: u8, group: u8, p: u32) -> SegmentDescriptor {
        SegmentDescriptor {
            segment_id: id,
            group,
            addr: 0x7f00_0000_0000 + u64::from(id) * 0x10_0000,
            len: u64::from(p) * 64,
            rkey: 0x1234 + u32::from(id),
            partition_size: p,
            partition_count: 64,
            span_factor: 8,
        }
    }

    fn sample_descriptors() -> Descriptors {
        Descriptors {
            qp: Some(QpInfo {
                qpn: 0x11,
                psn: 0xabcdef,
                gid: [0xfe; 16],
                lid: 7,
                mtu: 1024,
                port: 1,
                gid_index: 1,
            }),
            mailbox: Some(MailboxDescriptor {
                addr: 0x1000,
                rkey: 99,
                len: 2048,
            }),
            segments: vec![seg(0, 0, 256), seg(1, 0, 256), seg(2, 1, 4096)],
            opaque: vec![1, 2, 3],
        }
    }

    fn all_messages() -> Vec<Message> {
        let id = RendezvousId(42);
        vec![
            Message::Hello { nonce: [1; 32] },
            Message::Challenge { nonce: [2; 32] },
            Message::Auth { mac: [3; 32] },
            Message::AuthOk { mac: [4; 32] },
            Message::Register { info: info("a") },
            Message::Unregister {
                name: EndpointName::new("a").unwrap(),
            },
            Message::Lookup {
                name: EndpointName::new("rank-3").unwrap(),
            },
            Message::Connect {
                from: info("b"),
                to: EndpointName::new("a").unwrap(),
                offer: sample_descriptors(),
            },
            Message::WaitConnect {
                name: EndpointName::new("a").unwrap(),
                timeout_ms: 500,
            },
            Message::Send {
                id,
                side: Side::Listener,
                payload: sample_descriptors(),
            },
            Message::Recv {
                id,
                side: Side::Initiator,
                timeout_ms: MAX_WAIT_MS,
            },
            Message::Close {
                id,
                side: Side::Listener,
                reason: "no resources".into(),
            },
            Message::Ping,
            Message::Ok,
            Message::Found { info: info("a") },
            Message::Queued { id },
            Message::Incoming {
                id,
                from: info("b"),
                offer: Descriptors::default(),
            },
            Message::Delivered {
                payload: sample_descriptors(),
            },
            Message::TimedOut,
            Message::Pong,
            Message::Error {
                code: ErrorCode::UnknownName,
                message: "no endpoint named x".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let bytes = m.encode().unwrap();
            assert_eq!(Message::decode_frame(&bytes).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in all_messages() {
            let bytes = m.encode().unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    Message::decode_frame(&bytes[..cut]).is_err(),
                    "{} cut at {cut}",
                    m.name()
                );
                // A payload cut short but with a header that matches the short length.
                if cut >= HEADER_LEN {
                    let mut b = bytes[..cut].to_vec();
                    let len = ((cut - HEADER_LEN) as u32).to_le_bytes();
                    b[8..12].copy_from_slice(&len);
                    if cut < bytes.len() {
                        assert!(
                            Message::decode_frame(&b).is_err(),
                            "{} relabelled at {cut}",
                            m.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut b = Message::Ping.encode().unwrap();
        b.push(0);
        b[8] = 1;
        assert_eq!(
            Message::decode_frame(&b),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn header_checks() {
        let good = Message::Ping.encode().unwrap();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            Message::decode_frame(&b),
            Err(DecodeError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(
            Message::decode_frame(&b),
            Err(DecodeError::UnsupportedVersion { got: 2 })
        );
        let mut b = good.clone();
        b[6] = 1;
        assert_eq!(Message::decode_frame(&b), Err(DecodeError::BadFlags(1)));
        let mut b = good.clone();
        b[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(
            Message::decode_frame(&b),
            Err(DecodeError::Oversized { .. })
        ));
        let mut b = good;
        b[5] = 0x33;
        assert_eq!(
            Message::decode_frame(&b),
            Err(DecodeError::UnknownKind(0x33))
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(EndpointName::new("rank-0.job_7:x@y").is_ok());
        assert!(EndpointName::new("").is_err());
        assert!(EndpointName::new("a b").is_err());
        assert!(EndpointName::new("a/b").is_err());
        assert!(EndpointName::new("é").is_err());
        assert!(EndpointName::new("x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(EndpointName::new("x".repeat(MAX_NAME_LEN + 1)).is_err());
        // A name with a bad character smuggled onto the wire is rejected by the decoder.
        let mut b = Message::Lookup {
            name: EndpointName::new("ab").unwrap(),
        }
        .encode()
        .unwrap();
        let last = b.len() - 1;
        b[last] = b' ';
        assert!(matches!(
            Message::decode_frame(&b),
            Err(DecodeError::Invalid {
                field: "endpoint name",
                ..
            })
        ));
    }

    #[test]
    fn descriptor_rules() {
        let ok = sample_descriptors();
        assert!(ok.validate().is_ok());
        let bad = |f: &dyn Fn(&mut Descriptors)| {
            let mut d = sample_descriptors();
            f(&mut d);
            assert!(d.validate().is_err(), "{d:?}");
            assert!(d.encode().is_err());
        };
        bad(&|d| d.segments[0].partition_size = 100);
        bad(&|d| d.segments[0].partition_size = 32);
        bad(&|d| d.segments[0].partition_count = 0);
        bad(&|d| d.segments[0].partition_count = MAX_PARTITION_COUNT + 1);
        bad(&|d| d.segments[0].span_factor = 0);
        bad(&|d| d.segments[0].span_factor = 65);
        bad(&|d| d.segments[0].len = 255 * 64);
        bad(&|d| d.segments[0].addr = u64::MAX - 10);
        bad(&|d| d.segments[1].segment_id = 0);
        bad(&|d| d.segments[1].span_factor = 4);
        bad(&|d| d.qp.as_mut().unwrap().qpn = 1 << 24);
        bad(&|d| d.qp.as_mut().unwrap().qpn = 1);
        bad(&|d| d.qp.as_mut().unwrap().psn = 1 << 24);
        bad(&|d| d.qp.as_mut().unwrap().mtu = 1500);
        bad(&|d| d.qp.as_mut().unwrap().port = 0);
        bad(&|d| d.mailbox.as_mut().unwrap().addr = 4);
        bad(&|d| d.mailbox.as_mut().unwrap().len = 12);
        bad(&|d| d.mailbox.as_mut().unwrap().len = 0);
        bad(&|d| d.opaque = vec![0; MAX_OPAQUE_LEN + 1]);
        bad(&|d| {
            d.segments = (0..=255u8).map(|i| seg(i, 0, 64)).collect();
            d.segments.push(seg(0, 0, 64));
        });
        let full = Descriptors {
            segments: (0..=255u8).map(|i| seg(i, 0, 64)).collect(),
            opaque: vec![7; MAX_OPAQUE_LEN],
            ..sample_descriptors()
        };
        let bytes = full.encode().unwrap();
        assert_eq!(Descriptors::decode(&bytes).unwrap(), full);
        // The largest descriptors still fit in a frame.
        let m = Message::Incoming {
            id: RendezvousId(1),
            from: info("a"),
            offer: full,
        };
        assert!(m.encode().is_ok());
    }

    #[test]
    fn endpoint_rules() {
        let mut i = info("a");
        i.shm_socket = None;
        assert!(i.validate().is_err());
        i.transports = TransportSet::VERBS;
        assert!(i.validate().is_ok());
        i.shm_socket = Some("/x".into());
        assert!(i.validate().is_err());
        assert!(TransportSet::from_bits(0).is_err());
        assert!(TransportSet::from_bits(4).is_err());
        let mut i = info("a");
        i.shm_socket = Some("x".repeat(MAX_SOCKET_PATH_LEN + 1));
        assert!(i.validate().is_err());
        i.shm_socket = Some("a\0b".into());
        assert!(i.validate().is_err());
    }

    #[test]
    fn wait_limit_enforced() {
        let m = Message::WaitConnect {
            name: EndpointName::new("a").unwrap(),
            timeout_ms: MAX_WAIT_MS + 1,
        };
        assert!(m.encode().is_err());
        let mut b = Message::WaitConnect {
            name: EndpointName::new("a").unwrap(),
            timeout_ms: 1,
        }
        .encode()
        .unwrap();
        let n = b.len();
        b[n - 4..].copy_from_slice(&(MAX_WAIT_MS + 1).to_le_bytes());
        assert!(Message::decode_frame(&b).is_err());
    }

    fn arb_segment() -> impl Strategy<Value = SegmentDescriptor> {
        (
            any::<u8>(),
            6u32..=12,
            1u32..=1024,
            any::<u32>(),
            any::<u32>(),
        )
            .prop_flat_map(|(id, shift, count, rkey, addr)| {
                let p = 1u32 << shift;
                (1..=count, 0u64..4096).prop_map(move |(span, extra)| SegmentDescriptor {
                    segment_id: id,
                    // One group per partition size keeps group shapes consistent.
                    group: shift as u8,
                    addr: u64::from(addr) << 12,
                    len: u64::from(p) * u64::from(count) + extra,
                    rkey,
                    partition_size: p,
                    partition_count: count,
                    span_factor: span,
                })
            })
    }

    fn arb_descriptors() -> impl Strategy<Value = Descriptors> {
        let qp = (
            2u32..=0xff_ffff,
            0u32..=0xff_ffff,
            any::<[u8; 16]>(),
            any::<u16>(),
            0usize..5,
            1u8..=2,
            any::<u8>(),
        )
            .prop_map(|(qpn, psn, gid, lid, m, port, gid_index)| QpInfo {
                qpn,
                psn,
                gid,
                lid,
                mtu: 256 << m,
                port,
                gid_index,
            });
        let mb =
            (any::<u32>(), any::<u32>(), 1u32..=8192).prop_map(|(a, rkey, n)| MailboxDescriptor {
                addr: u64::from(a) * 8,
                rkey,
                len: n * 8,
            });
        let segs = proptest::collection::vec(arb_segment(), 0..40).prop_map(|mut v| {
            // Unique ids and one shape per group.
            let mut seen = std::collections::HashSet::new();
            v.retain(|s| seen.insert(s.segment_id));
            let mut shape = std::collections::HashMap::new();
            v.retain(|s| {
                *shape
                    .entry(s.group)
                    .or_insert((s.partition_count, s.span_factor))
                    == (s.partition_count, s.span_factor)
            });
            v
        });
        (
            proptest::option::of(qp),
            proptest::option::of(mb),
            segs,
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(qp, mailbox, segments, opaque)| Descriptors {
                qp,
                mailbox,
                segments,
                opaque,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn valid_descriptors_round_trip(d in arb_descriptors(), id in any::<u64>()) {
            prop_assert!(d.validate().is_ok(), "{:?}", d.validate());
            prop_assert_eq!(Descriptors::decode(&d.encode().unwrap()).unwrap(), d.clone());
            let m = Message::Send { id: RendezvousId(id), side: Side::Initiator, payload: d };
            prop_assert_eq!(Message::decode_frame(&m.encode().unwrap()).unwrap(), m);
        }

        #[test]
        fn decoder_never_panics_on_random_frames(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode_frame(&bytes);
            let _ = Descriptors::decode(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_random_payloads(kind in any::<u8>(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = Message::decode_payload(kind, &bytes) {
                // Whatever decodes re-encodes to the same bytes: the format has one encoding.
                let frame = m.encode().unwrap();
                prop_assert_eq!(&frame[HEADER_LEN..], &bytes[..]);
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(idx in 0usize..21, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let msgs = all_messages();
            let mut b = msgs[idx % msgs.len()].encode().unwrap();
            let i = pos.index(b.len());
            b[i] = byte;
            if let Ok(m) = Message::decode_frame(&b) {
                prop_assert_eq!(m.encode().unwrap(), b);
            }
        }
    }
}
