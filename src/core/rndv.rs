//! Rendezvous state, sans I/O: configuration (the eager/rendezvous switch, the receive limit,
//! the registration cache cap), request validation, and the sender's table of transfers in
//! flight.
//!
//! A message longer than the switch point is not copied into partitions. The sender exposes its
//! buffer (verbs: a registration with remote-read access; shared memory: its address, read with
//! `process_vm_readv`), sends a [`ControlMessage::RendezvousRequest`] through the partitions, and
//! the receiver reads the buffer straight into its destination, then answers
//! [`ControlMessage::RendezvousDone`] (or [`ControlMessage::RendezvousRefused`]). See
//! `docs/rendezvous.md`.
//!
//! [`ControlMessage::RendezvousRequest`]: super::ControlMessage::RendezvousRequest
//! [`ControlMessage::RendezvousDone`]: super::ControlMessage::RendezvousDone
//! [`ControlMessage::RendezvousRefused`]: super::ControlMessage::RendezvousRefused

use std::collections::HashMap;

use super::control::refuse_reason;
use super::error::ProtocolError;

/// A malformed rendezvous setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RndvConfigError {
    /// A variable's value is not a byte count.
    #[error("cannot parse {var}={value:?}: expected a byte count such as 65536, 64k, 1m or 4g")]
    Parse {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// A switch variable's value is neither `0` nor `1`.
    #[error("cannot parse {var}={value:?}: expected 0 or 1")]
    Flag {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// A variable's value is not valid UTF-8.
    #[error("cannot parse {var}: not valid UTF-8")]
    NotUnicode {
        /// The variable.
        var: &'static str,
    },
}

impl RndvConfigError {
    /// The variable whose value is malformed.
    pub fn var(&self) -> &'static str {
        match self {
            RndvConfigError::Parse { var, .. }
            | RndvConfigError::Flag { var, .. }
            | RndvConfigError::NotUnicode { var } => var,
        }
    }
}

/// Rendezvous settings of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RndvConfig {
    /// Messages longer than this go by rendezvous; `None`: the longest eager payload of the
    /// peer's layout (every message that fits a group goes eagerly). Messages longer than the
    /// longest eager payload always go by rendezvous, whatever this says.
    pub threshold: Option<usize>,
    /// The longest message this side accepts by rendezvous; longer requests are refused (both
    /// ends get an error, the connection stays up).
    pub max_recv: u64,
    /// Registration cache cap in bytes for receive destinations given to `recv_into` (verbs);
    /// 0 disables the cache (every transfer registers and deregisters its destination).
    pub cache_bytes: usize,
    /// Registration cache cap in bytes for send buffers (verbs, on devices with memory
    /// windows): a cached buffer is registered once without remote access, and each transfer
    /// binds a memory window over it, invalidated when the transfer ends. 0 (the default)
    /// registers each buffer with remote read per transfer. Read the invalidation contract in
    /// `docs/rendezvous.md` before enabling it.
    pub send_cache_bytes: usize,
    /// Shared memory: never read the sender's memory (`process_vm_readv`); have every
    /// rendezvous message sent through the segments in chunks instead (two copies), as happens
    /// anyway when the kernel does not permit the read. Set by `RSMSG_RNDV_STREAM_ONLY=1` when a
    /// connection is made, it is also told to the peer in the shared-memory handshake (this side
    /// says it cannot read the peer), so both ends stream from the first transfer; set later
    /// with `Connection::set_rndv_config`, the peer learns it from the first transfer this side
    /// receives (the runtime fallback, `docs/rendezvous.md`). This side streams its own
    /// transfers either way.
    pub stream_only: bool,
}

impl Default for RndvConfig {
    fn default() -> Self {
        RndvConfig {
            threshold: None,
            max_recv: Self::DEFAULT_MAX_RECV,
            cache_bytes: 0,
            send_cache_bytes: 0,
            stream_only: false,
        }
    }
}

/// Parses a byte count: decimal with an optional `k`/`m`/`g` suffix (powers of 1024).
fn parse_bytes(var: &'static str, s: &str) -> Result<u64, RndvConfigError> {
    let s = s.trim();
    let bad = || RndvConfigError::Parse {
        var,
        value: s.to_string(),
    };
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

impl RndvConfig {
    /// Default receive limit: 1 GiB.
    pub const DEFAULT_MAX_RECV: u64 = 1 << 30;
    /// Rendezvous transfers a receiver keeps queued for its application (requests not served
    /// yet, streamed messages coming in or complete, refusals to report): a request that arrives
    /// while this many are queued is refused at once with [`refuse_reason::BUSY`] (a streamed
    /// one's chunks are dropped as they come). 16-32 concurrent `send_start` transfers of a peer
    /// fit with room to spare; past this the sender is told to wait for the receiver.
    pub const MAX_QUEUED_TRANSFERS: usize = 64;
    /// Streamed transfers refused as busy ([`RndvConfig::MAX_QUEUED_TRANSFERS`]) whose chunks
    /// are still coming (the receiver drops them). A sender sends the chunks of a streamed
    /// transfer right after its request, so at most two are ever incomplete at once; more is a
    /// peer that sends requests without their chunks, and fails the connection.
    pub const MAX_DROPPING_STREAMS: usize = 16;
    /// Data messages copied out of their partitions while a streamed message comes in (its
    /// chunks need the partitions) are held up to this many times the receive layout's segment
    /// bytes (`Layout::segment_bytes`); beyond, the connection fails (a peer that sends data
    /// instead of the chunks it announced).
    pub const COPIED_OUT_FACTOR: u64 = 8;
    /// Environment variable for [`RndvConfig::threshold`].
    pub const ENV_THRESHOLD: &'static str = "RSMSG_RNDV_THRESHOLD";
    /// Environment variable for [`RndvConfig::max_recv`].
    pub const ENV_MAX_RECV: &'static str = "RSMSG_RNDV_MAX";
    /// Environment variable for [`RndvConfig::cache_bytes`].
    pub const ENV_CACHE: &'static str = "RSMSG_RNDV_CACHE";
    /// Environment variable for [`RndvConfig::send_cache_bytes`].
    pub const ENV_SEND_CACHE: &'static str = "RSMSG_RNDV_SEND_CACHE";
    /// Environment variable for [`RndvConfig::stream_only`] (`1` sets it).
    pub const ENV_STREAM_ONLY: &'static str = "RSMSG_RNDV_STREAM_ONLY";
    /// Every variable [`RndvConfig::from_env`] reads.
    pub const ENV_VARS: [&'static str; 5] = [
        Self::ENV_THRESHOLD,
        Self::ENV_MAX_RECV,
        Self::ENV_CACHE,
        Self::ENV_SEND_CACHE,
        Self::ENV_STREAM_ONLY,
    ];

    /// The default configuration with the variables `RSMSG_RNDV_THRESHOLD`, `RSMSG_RNDV_MAX`,
    /// `RSMSG_RNDV_CACHE` and `RSMSG_RNDV_SEND_CACHE` (byte counts, `k`/`m`/`g` suffixes) and
    /// `RSMSG_RNDV_STREAM_ONLY` (`0` or `1`) applied. Unset and empty variables keep the
    /// default.
    ///
    /// # Errors
    /// [`RndvConfigError`] naming the first variable with a malformed value (not UTF-8, not a
    /// byte count, not `0`/`1`).
    pub fn from_env() -> Result<RndvConfig, RndvConfigError> {
        for var in Self::ENV_VARS {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(var) {
                return Err(RndvConfigError::NotUnicode { var });
            }
        }
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`RndvConfig::from_env`], with variables looked up by `get`.
    ///
    /// # Errors
    /// As [`RndvConfig::from_env`].
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<RndvConfig, RndvConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut c = RndvConfig::default();
        if let Some(v) = get(Self::ENV_THRESHOLD) {
            let n = parse_bytes(Self::ENV_THRESHOLD, &v)?;
            c.threshold = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(v) = get(Self::ENV_MAX_RECV) {
            c.max_recv = parse_bytes(Self::ENV_MAX_RECV, &v)?;
        }
        if let Some(v) = get(Self::ENV_CACHE) {
            let n = parse_bytes(Self::ENV_CACHE, &v)?;
            c.cache_bytes = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(v) = get(Self::ENV_SEND_CACHE) {
            let n = parse_bytes(Self::ENV_SEND_CACHE, &v)?;
            c.send_cache_bytes = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(v) = get(Self::ENV_STREAM_ONLY) {
            c.stream_only = match v.trim() {
                "1" => true,
                "0" => false,
                _ => {
                    return Err(RndvConfigError::Flag {
                        var: Self::ENV_STREAM_ONLY,
                        value: v,
                    });
                }
            };
        }
        Ok(c)
    }

    /// Whether a message of `len` bytes goes by rendezvous when the peer's layout carries at
    /// most `max_eager` bytes eagerly.
    #[inline]
    pub fn use_rendezvous(&self, len: usize, max_eager: usize) -> bool {
        len > max_eager || self.threshold.is_some_and(|t| len > t)
    }

    /// The effective switch point: the longest message sent eagerly.
    pub fn switch_point(&self, max_eager: usize) -> usize {
        self.threshold.map_or(max_eager, |t| t.min(max_eager))
    }
}

/// A validated rendezvous request, as the receiver acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RndvRequest {
    /// The sender's identifier, echoed in the answer.
    pub id: u64,
    /// Address of the sender's buffer (in the sender's address space).
    pub addr: u64,
    /// Length in bytes (> 0, fits this machine's `usize`, within the receive limit).
    pub len: usize,
    /// Remote key (verbs) or 0 (shared memory).
    pub rkey: u32,
}

impl RndvRequest {
    /// Checks a decoded request against the receive limit: `Ok` to read it, or `Err` with the
    /// [`refuse_reason`] code to answer (the connection stays usable: the request was well
    /// formed, only unacceptable).
    ///
    /// # Errors
    /// [`refuse_reason::TOO_LARGE`] above `max_recv` or `usize`; [`refuse_reason::MALFORMED`]
    /// for a zero length or a wrapping range (the decoder refuses those already).
    pub fn validate(id: u64, addr: u64, len: u64, rkey: u32, max_recv: u64) -> Result<Self, u32> {
        if len == 0 || addr.checked_add(len).is_none() {
            return Err(refuse_reason::MALFORMED);
        }
        if len > max_recv {
            return Err(refuse_reason::TOO_LARGE);
        }
        let len = usize::try_from(len).map_err(|_| refuse_reason::TOO_LARGE)?;
        Ok(RndvRequest {
            id,
            addr,
            len,
            rkey,
        })
    }
}

/// Where one outgoing rendezvous stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RndvState {
    /// Requested; the receiver has not answered.
    Waiting,
    /// The receiver cannot read the buffer and asked for it through the segments: the sender
    /// is to send the chunks.
    Stream,
    /// The chunks were sent; the receiver has not answered yet.
    Streamed,
    /// The receiver read the buffer.
    Done,
    /// The receiver refused (a [`refuse_reason`] code).
    Refused(u32),
}

/// The sender's table of rendezvous transfers: identifiers, and answers matched to requests.
///
/// Identifiers count up from 0 and are never reused on a connection; an answer for an identifier
/// that is not waiting (unknown, already answered, or never issued) is a protocol error.
///
/// Delivery accounting: a transfer whose request was sent ([`RndvSends::requested`]) is
/// *unconfirmed* until the receiver answers done (then it counts as confirmed) or refused
/// (then it was not delivered, and its sender was told: it counts as neither). Unlike the
/// transfer's state, this record survives [`RndvSends::forget`], so after a failure
/// [`RndvSends::unconfirmed`] still names every transfer the peer did not confirm.
#[derive(Debug, Default)]
pub struct RndvSends {
    next_id: u64,
    states: HashMap<u64, RndvState>,
    /// id -> sequence number of the request, for transfers not yet answered.
    unconfirmed: HashMap<u64, u32>,
    confirmed: u64,
}

impl RndvSends {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocates the identifier of a new transfer, in state [`RndvState::Waiting`].
    pub fn start(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.states.insert(id, RndvState::Waiting);
        id
    }

    /// Records that the request of transfer `id` went out as the message with sequence number
    /// `seq` (the number the receiver's `Message::seq` shows): the transfer is unconfirmed until
    /// answered.
    pub fn requested(&mut self, id: u64, seq: u32) {
        if self.states.get(&id) == Some(&RndvState::Waiting) {
            self.unconfirmed.insert(id, seq);
        }
    }

    /// Sequence numbers of the transfers requested and not answered (in no particular order).
    pub fn unconfirmed(&self) -> impl Iterator<Item = u32> + '_ {
        self.unconfirmed.values().copied()
    }

    /// Transfers the receiver answered done.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Records the receiver's answer for `id` (`None` for done, `Some(reason)` for refused).
    ///
    /// # Errors
    /// [`ProtocolError::BadControl`] when `id` is not waiting.
    pub fn answer(&mut self, id: u64, refused: Option<u32>) -> Result<(), ProtocolError> {
        match self.states.get_mut(&id) {
            Some(s @ (RndvState::Waiting | RndvState::Streamed)) => {
                if self.unconfirmed.remove(&id).is_some() && refused.is_none() {
                    self.confirmed += 1;
                }
                *s = match refused {
                    None => RndvState::Done,
                    Some(r) => RndvState::Refused(r),
                };
                Ok(())
            }
            _ => Err(ProtocolError::BadControl {
                ty: if refused.is_some() { 4 } else { 2 },
                len: 0,
                reason: "rendezvous answer for an identifier that is not waiting",
            }),
        }
    }

    /// Records the receiver's request to stream transfer `id` through the segments.
    ///
    /// # Errors
    /// [`ProtocolError::BadControl`] when `id` is not waiting (unknown, answered, or already
    /// streamed).
    pub fn stream(&mut self, id: u64) -> Result<(), ProtocolError> {
        match self.states.get_mut(&id) {
            Some(s @ RndvState::Waiting) => {
                *s = RndvState::Stream;
                Ok(())
            }
            _ => Err(ProtocolError::BadControl {
                ty: 5,
                len: 12,
                reason: "rendezvous stream request for an identifier that is not waiting",
            }),
        }
    }

    /// Records that the chunks of `id` were sent, asked for or not (the transfer waits for done
    /// again; a stream request for it is now a protocol error).
    pub fn streamed(&mut self, id: u64) {
        if let Some(s @ (RndvState::Stream | RndvState::Waiting)) = self.states.get_mut(&id) {
            *s = RndvState::Streamed;
        }
    }

    /// The state of `id` (`None` once forgotten or never issued).
    pub fn state(&self, id: u64) -> Option<RndvState> {
        self.states.get(&id).copied()
    }

    /// Forgets a finished transfer (or one abandoned because the connection failed); its later
    /// answer, if any, is a protocol error.
    pub fn forget(&mut self, id: u64) {
        self.states.remove(&id);
    }

    /// Transfers still waiting for an answer (streamed or not).
    pub fn waiting(&self) -> usize {
        self.states
            .values()
            .filter(|s| {
                matches!(
                    s,
                    RndvState::Waiting | RndvState::Stream | RndvState::Streamed
                )
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_parse_and_bad_ones_are_named() {
        let c = RndvConfig::from_lookup(|k| match k {
            "RSMSG_RNDV_THRESHOLD" => Some("64k".into()),
            "RSMSG_RNDV_MAX" => Some("16m".into()),
            "RSMSG_RNDV_CACHE" => Some("1g".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.threshold, Some(65536));
        assert_eq!(c.max_recv, 16 << 20);
        assert_eq!(c.cache_bytes, 1 << 30);
        assert_eq!(c.send_cache_bytes, 0);
        let s = RndvConfig::from_lookup(|k| (k == "RSMSG_RNDV_SEND_CACHE").then(|| "8m".into()))
            .unwrap();
        assert_eq!(s.send_cache_bytes, 8 << 20);
        let s = RndvConfig::from_lookup(|k| (k == "RSMSG_RNDV_STREAM_ONLY").then(|| "1".into()))
            .unwrap();
        assert!(s.stream_only);
        assert!(
            RndvConfig::from_lookup(|k| (k == "RSMSG_RNDV_STREAM_ONLY").then(|| "yes".into()))
                .is_err()
        );
        assert_eq!(
            RndvConfig::from_lookup(|_| None).unwrap(),
            RndvConfig::default()
        );
        for bad in ["k", "12x", "-1", "1.5m", "512MB", "99999999999999999999g"] {
            let e = RndvConfig::from_lookup(|k| (k == "RSMSG_RNDV_MAX").then(|| bad.into()))
                .unwrap_err();
            assert_eq!(e.var(), "RSMSG_RNDV_MAX", "{bad}: {e}");
            assert!(e.to_string().contains("RSMSG_RNDV_MAX"), "{bad}: {e}");
        }
        // Empty values keep the default, as unset ones do, and leave the others in force.
        let c = RndvConfig::from_lookup(|k| match k {
            "RSMSG_RNDV_THRESHOLD" => Some(String::new()),
            "RSMSG_RNDV_MAX" => Some(" ".into()),
            "RSMSG_RNDV_STREAM_ONLY" => Some("1".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.threshold, None);
        assert_eq!(c.max_recv, RndvConfig::DEFAULT_MAX_RECV);
        assert!(c.stream_only);
    }

    #[test]
    fn switch_point() {
        let c = RndvConfig::default();
        assert!(!c.use_rendezvous(1000, 1000));
        assert!(c.use_rendezvous(1001, 1000));
        assert_eq!(c.switch_point(1000), 1000);
        let c = RndvConfig {
            threshold: Some(100),
            ..c
        };
        assert!(!c.use_rendezvous(100, 1000));
        assert!(c.use_rendezvous(101, 1000));
        assert_eq!(c.switch_point(1000), 100);
        let c = RndvConfig {
            threshold: Some(5000),
            ..c
        };
        assert!(
            c.use_rendezvous(1001, 1000),
            "above every group: rendezvous"
        );
        assert_eq!(c.switch_point(1000), 1000);
    }

    #[test]
    fn requests_are_checked_against_the_limit() {
        assert!(RndvRequest::validate(1, 4096, 100, 5, 100).is_ok());
        assert_eq!(
            RndvRequest::validate(1, 4096, 101, 5, 100),
            Err(refuse_reason::TOO_LARGE)
        );
        assert_eq!(
            RndvRequest::validate(1, 4096, 0, 5, 100),
            Err(refuse_reason::MALFORMED)
        );
        assert_eq!(
            RndvRequest::validate(1, u64::MAX, 2, 5, u64::MAX),
            Err(refuse_reason::MALFORMED)
        );
    }

    #[test]
    fn unconfirmed_until_done_and_kept_after_forget() {
        let mut t = RndvSends::new();
        let (a, b, c) = (t.start(), t.start(), t.start());
        t.requested(a, 10);
        t.requested(b, 11);
        t.requested(c, 12);
        let mut u: Vec<u32> = t.unconfirmed().collect();
        u.sort_unstable();
        assert_eq!(u, vec![10, 11, 12]);
        t.answer(a, None).unwrap();
        t.answer(b, Some(refuse_reason::NO_ROOM)).unwrap();
        assert_eq!(t.confirmed(), 1);
        // The connection fails: c is forgotten by its handle, but stays unconfirmed.
        t.forget(c);
        assert_eq!(t.unconfirmed().collect::<Vec<_>>(), vec![12]);
        assert_eq!(t.confirmed(), 1);
        t.forget(a);
        t.requested(a, 99);
        assert_eq!(
            t.unconfirmed().count(),
            1,
            "a finished transfer is not requested again"
        );
    }

    #[test]
    fn stream_then_done() {
        let mut t = RndvSends::new();
        let a = t.start();
        t.requested(a, 1);
        assert!(t.answer(99, None).is_err());
        t.stream(a).unwrap();
        assert_eq!(t.state(a), Some(RndvState::Stream));
        assert!(t.stream(a).is_err(), "second stream request");
        assert!(
            t.answer(a, None).is_err(),
            "done before the chunks were sent"
        );
        t.streamed(a);
        assert_eq!(t.state(a), Some(RndvState::Streamed));
        assert!(t.stream(a).is_err(), "stream after streaming");
        t.answer(a, None).unwrap();
        assert_eq!(t.state(a), Some(RndvState::Done));
        assert_eq!(t.confirmed(), 1);
        assert!(t.stream(7).is_err(), "never issued");
    }

    #[test]
    fn answers_match_waiting_ids_only() {
        let mut t = RndvSends::new();
        let a = t.start();
        let b = t.start();
        assert_ne!(a, b);
        assert_eq!(t.waiting(), 2);
        t.answer(b, Some(refuse_reason::TOO_LARGE)).unwrap();
        assert_eq!(
            t.state(b),
            Some(RndvState::Refused(refuse_reason::TOO_LARGE))
        );
        assert!(t.answer(b, None).is_err(), "second answer");
        assert!(t.answer(99, None).is_err(), "never issued");
        t.answer(a, None).unwrap();
        assert_eq!(t.state(a), Some(RndvState::Done));
        assert_eq!(t.confirmed(), 0, "never requested: not counted");
        t.forget(a);
        assert!(t.answer(a, None).is_err(), "forgotten");
        assert_eq!(t.state(a), None);
        assert_eq!(t.waiting(), 0);
    }
}
