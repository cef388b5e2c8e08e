//! The atomics the shared-memory primitives are written against.
//!
//! Normal builds use `std::sync::atomic`; `--cfg loom` builds swap in loom's model-checked types
//! so that the very same doorbell and mailbox code is explored by the loom models. Under loom the
//! memory cannot be a real mapping (loom atomics carry model state), so the loom builds back rings
//! and mailboxes with heap storage instead of a [`ShmRegion`](super::ShmRegion).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// One iteration of a spin-wait loop: a CPU pause hint, or a loom yield point (a spin loop
/// without one would make the model explore an unbounded schedule).
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// A futex stand-in for loom: loom cannot run a `futex(2)` system call, so the wait/wake pair is
/// modelled with a mutex and a condition variable that keep the futex contract: the waiter
/// re-checks the word and blocks atomically with respect to a waker, so a wake-up that races
/// with the decision to sleep is never lost. A lost wake-up therefore shows up in a model as a
/// deadlock, which loom reports.
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct ModelFutex {
    lock: loom::sync::Mutex<()>,
    cond: loom::sync::Condvar,
}

#[cfg(loom)]
impl ModelFutex {
    /// Blocks while `word == expected` until woken.
    pub(crate) fn wait(&self, word: &AtomicU32, expected: u32) {
        let guard = self.lock.lock().unwrap();
        if word.load(Ordering::SeqCst) != expected {
            return;
        }
        drop(self.cond.wait(guard).unwrap());
    }

    /// Wakes every waiter.
    pub(crate) fn wake(&self) {
        let _guard = self.lock.lock().unwrap();
        self.cond.notify_all();
    }
}
