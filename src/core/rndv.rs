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
}

impl Default for RndvConfig {
    fn default() -> Self {
        RndvConfig {
            threshold: None,
            max_recv: Self::DEFAULT_MAX_RECV,
            cache_bytes: 0,
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
    /// Environment variable for [`RndvConfig::threshold`].
    pub const ENV_THRESHOLD: &'static str = "RSMSG_RNDV_THRESHOLD";
    /// Environment variable for [`RndvConfig::max_recv`].
    pub const ENV_MAX_RECV: &'static str = "RSMSG_RNDV_MAX";
    /// Environment variable for [`RndvConfig::cache_bytes`].
    pub const ENV_CACHE: &'static str = "RSMSG_RNDV_CACHE";

    /// The default configuration with the variables `RSMSG_RNDV_THRESHOLD`, `RSMSG_RNDV_MAX`
    /// and `RSMSG_RNDV_CACHE` applied (byte counts, `k`/`m`/`g` suffixes).
    ///
    /// # Errors
    /// [`RndvConfigError::Parse`] naming the variable with a malformed value.
    pub fn from_env() -> Result<RndvConfig, RndvConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`RndvConfig::from_env`], with variables looked up by `get`.
    ///
    /// # Errors
    /// As [`RndvConfig::from_env`].
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<RndvConfig, RndvConfigError> {
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
    /// The receiver read the buffer.
    Done,
    /// The receiver refused (a [`refuse_reason`] code).
    Refused(u32),
}

/// The sender's table of rendezvous transfers: identifiers, and answers matched to requests.
///
/// Identifiers count up from 0 and are never reused on a connection; an answer for an identifier
/// that is not waiting (unknown, already answered, or never issued) is a protocol error.
#[derive(Debug, Default)]
pub struct RndvSends {
    next_id: u64,
    states: HashMap<u64, RndvState>,
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

    /// Records the receiver's answer for `id` (`None` for done, `Some(reason)` for refused).
    ///
    /// # Errors
    /// [`ProtocolError::BadControl`] when `id` is not waiting.
    pub fn answer(&mut self, id: u64, refused: Option<u32>) -> Result<(), ProtocolError> {
        match self.states.get_mut(&id) {
            Some(s @ RndvState::Waiting) => {
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

    /// The state of `id` (`None` once forgotten or never issued).
    pub fn state(&self, id: u64) -> Option<RndvState> {
        self.states.get(&id).copied()
    }

    /// Forgets a finished transfer (or one abandoned because the connection failed); its later
    /// answer, if any, is a protocol error.
    pub fn forget(&mut self, id: u64) {
        self.states.remove(&id);
    }

    /// Transfers still waiting for an answer.
    pub fn waiting(&self) -> usize {
        self.states
            .values()
            .filter(|s| **s == RndvState::Waiting)
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
        assert_eq!(
            RndvConfig::from_lookup(|_| None).unwrap(),
            RndvConfig::default()
        );
        for bad in ["", "k", "12x", "-1", "1.5m", "99999999999999999999g"] {
            let e = RndvConfig::from_lookup(|k| (k == "RSMSG_RNDV_MAX").then(|| bad.into()))
                .unwrap_err();
            assert!(e.to_string().contains("RSMSG_RNDV_MAX"), "{bad}: {e}");
        }
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
        t.forget(a);
        assert!(t.answer(a, None).is_err(), "forgotten");
        assert_eq!(t.state(a), None);
        assert_eq!(t.waiting(), 0);
    }
}
