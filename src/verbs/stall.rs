//! Watching a wait on send completions for progress.
//!
//! A queue pair's retry limits bound how long a work request to a dead peer takes to fail, but
//! only when the device runs them. A device can also leave a work request neither completed nor
//! failed. Soft-RoCE has done so here after its netdev went down under traffic (its requester
//! retries a packet the netdev refused through a path that, upstream notes, can deadlock the
//! queue pair's send side), and an infinite RNR retry count waits for good on a peer that never
//! posts a receive. A wait that sees no completion for its limit is then told so
//! ([`Stall::spin`], [`Stall::stalled`]), and its caller moves the queue pair to the error
//! state, which flushes what is outstanding.

use std::time::{Duration, Instant};

/// Spins between two looks at the clock in [`Stall::spin`].
const SPINS_PER_LOOK: u32 = 4096;

/// One wait on send completions: how long the count of completed work requests has not moved.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stall {
    limit: Option<Duration>,
    /// The count of completed work requests when last seen to move, and when.
    mark: Option<(u64, Instant)>,
    spins: u32,
}

impl Stall {
    /// A wait that is stalled once nothing completes for `limit` (never, with `None`).
    #[inline]
    pub(crate) const fn new(limit: Option<Duration>) -> Self {
        Stall {
            limit,
            mark: None,
            spins: 0,
        }
    }

    /// How long `completed` has not moved, once that is `limit` or longer at `now`; the first
    /// look, and every look that sees `completed` move, starts the count again.
    pub(crate) fn stalled(&mut self, completed: u64, now: Instant) -> Option<Duration> {
        let limit = self.limit?;
        match self.mark {
            Some((seen, since)) if seen == completed => {
                let waited = now.saturating_duration_since(since);
                (waited >= limit).then_some(waited)
            }
            _ => {
                self.mark = Some((completed, now));
                None
            }
        }
    }

    /// [`Stall::stalled`] for a spinning wait: looks at the clock once every 4096 calls.
    #[inline]
    pub(crate) fn spin(&mut self, completed: u64) -> Option<Duration> {
        self.limit?;
        self.spins = self.spins.wrapping_add(1);
        if !self.spins.is_multiple_of(SPINS_PER_LOOK) {
            return None;
        }
        self.stalled(completed, Instant::now())
    }
}

/// The longest a queue pair's own retries take to fail a work request whose peer never
/// answers: `retry_cnt + 1` tries of the local ACK timeout (4.096 us * 2^`timeout`). `None`
/// when `timeout` is 0, which the specification defines as waiting forever.
pub(crate) fn retry_bound(timeout: u8, retry_cnt: u8) -> Option<Duration> {
    if timeout == 0 {
        return None;
    }
    let per_try = Duration::from_nanos(4096).checked_mul(1u32.checked_shl(u32::from(timeout))?)?;
    per_try.checked_mul(u32::from(retry_cnt.min(7)) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_stalled_only_after_its_limit_without_progress() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = Stall::new(Some(10 * s));
        assert_eq!(
            w.stalled(5, t0 + 100 * s),
            None,
            "the first look sets the mark"
        );
        assert_eq!(w.stalled(5, t0 + 109 * s), None);
        assert_eq!(w.stalled(5, t0 + 110 * s), Some(10 * s));
        // Progress starts the count again.
        assert_eq!(w.stalled(6, t0 + 111 * s), None);
        assert_eq!(w.stalled(6, t0 + 120 * s), None);
        assert_eq!(w.stalled(6, t0 + 125 * s), Some(14 * s));
        // A clock read earlier than the mark is no time at all.
        let mut w = Stall::new(Some(s));
        assert_eq!(w.stalled(1, t0 + 5 * s), None);
        assert_eq!(w.stalled(1, t0), None);
    }

    #[test]
    fn no_limit_never_stalls() {
        let t0 = Instant::now();
        let mut w = Stall::new(None);
        assert_eq!(w.stalled(0, t0), None);
        assert_eq!(w.stalled(0, t0 + Duration::from_secs(1 << 30)), None);
        for _ in 0..3 * SPINS_PER_LOOK {
            assert_eq!(w.spin(0), None);
        }
    }

    #[test]
    fn a_spinning_wait_looks_at_the_clock_every_so_many_spins() {
        let mut w = Stall::new(Some(Duration::ZERO));
        // The first look sets the mark; with a zero limit the next look without progress is a
        // stall.
        for _ in 0..SPINS_PER_LOOK {
            assert_eq!(w.spin(3), None);
        }
        assert!(w.mark.is_some(), "the 4096th spin looked");
        for _ in 0..SPINS_PER_LOOK - 1 {
            assert_eq!(w.spin(3), None);
        }
        assert!(w.spin(3).is_some());
        // Progress at a look is not a stall.
        let mut w = Stall::new(Some(Duration::ZERO));
        for i in 0..4 * SPINS_PER_LOOK {
            assert_eq!(w.spin(u64::from(i)), None);
        }
    }

    #[test]
    fn the_retry_bound_follows_the_queue_pair_parameters() {
        // 4.096 us * 2^17 = 0.537 s per try, 7 tries.
        assert_eq!(
            retry_bound(17, 6),
            Some(Duration::from_nanos(4096 << 17) * 7)
        );
        assert_eq!(retry_bound(14, 0), Some(Duration::from_nanos(4096 << 14)));
        // 7 is the largest count the specification allows.
        assert_eq!(retry_bound(1, 200), retry_bound(1, 7));
        assert_eq!(
            retry_bound(31, 7),
            Some(Duration::from_nanos(4096 << 31) * 8)
        );
        assert_eq!(retry_bound(0, 7), None, "0 waits forever");
        // Out of range exponents do not overflow.
        assert_eq!(retry_bound(40, 7), None);
        assert!(retry_bound(255, 7).is_none());
    }
}
