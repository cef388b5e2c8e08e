//! The doorbell: a single-producer single-consumer ring of 32-bit immediates in shared memory,
//! with a futex-based sleep/wake handshake for event mode.
//!
//! # Layout (offsets from the ring's start, which must be a multiple of [`RingLayout::ALIGN`])
//! | offset | size | written by | content |
//! |---|---|---|---|
//! | 0 | 8 (line of 128) | consumer | `tail`: absolute count of entries consumed (u64) |
//! | 128 | 4 (line of 128) | consumer sets, producer clears | `sleeping`: 1 while the consumer sleeps on the futex or is about to, 2 while it waits on its wake-up socket ([`DoorbellConsumer::arm`]) |
//! | 256 | 32 × capacity | producer | slots of 32 bytes: the word `tag << 32 \| value` (`tag = (position + 1) mod 2^32`), then 16 bytes of header (all zero: none), then 8 spare bytes |
//!
//! The memory starts zeroed (a fresh [`ShmRegion`](super::ShmRegion) is): tail 0, nobody
//! sleeping, and every slot tagged 0, which no position `< capacity` uses.
//!
//! # One cache-line hand-off per entry
//! The producer does not publish a head counter: each slot carries the position it was written
//! for, so the consumer polls the slot itself and a message costs the transfer of one line (the
//! slot's), as in UCX's shared-memory FIFO. The consumer publishes `tail` on its own line after
//! each entry; the producer reads it only when its cached copy says the ring is full, so that
//! line does not ping-pong. Both sides keep their own position locally and never trust the
//! shared copy of it.
//!
//! A slot also carries 16 bytes beside the value ([`DoorbellProducer::try_push_with`]): the
//! transport puts a copy of the message header there, so the consumer validates a message
//! from the line it polled and does not wait for a second line (the header in the partition)
//! to come over from the producer's core. The payload lines are read only when the
//! application reads them.
//!
//! # Memory ordering
//! - Publish: the producer stores the slot's 16 extra bytes (`Relaxed`), then the slot's word
//!   with `Release`; the consumer loads the word with `Acquire`, then the extra bytes, so
//!   whatever the producer wrote before (the message bytes in the partitions, the extra bytes)
//!   is visible once the immediate is.
//! - Release of a slot: the consumer stores `tail` with `Release` after reading the slot (word
//!   and extra bytes); the producer loads `tail` with `Acquire` before overwriting it, so the
//!   consumer's reads of the old entry happen before the overwrite.
//! - Sleep/wake (Dekker): the consumer sets `sleeping = 1` (a swap), issues a `SeqCst` fence and
//!   re-reads the slot before sleeping; the producer stores the slot, issues a `SeqCst` fence and
//!   reads `sleeping`. By the fences' total order at least one of them sees the other's store:
//!   either the consumer finds the entry and does not sleep, or the producer sees the flag and
//!   wakes it. The producer clears the flag before `FUTEX_WAKE`, and `FUTEX_WAIT` sleeps only
//!   while the word is still 1 (checked atomically with respect to wakers), which closes the
//!   window between the consumer's re-check and its sleep: a wake that lands in it has
//!   already changed the word, so the wait returns at once. (Without the clear, that wake is
//!   lost and the consumer sleeps until its timeout; the loom model finds this.)
//!
//! # A futex, and a wake-up socket for event loops
//! The wake-up word lives in the ring's own shared page: the producer pays a system call only
//! when the flag says the consumer really waits, and the busy path never makes one.
//! `FUTEX_WAIT` takes a timeout directly, and the shared (non-`PRIVATE`) futex ops key the word
//! by its page in the memfd, so the two processes meet on the same wait queue: that is how a
//! blocking receive sleeps. A futex cannot be polled, so a consumer driven by an event loop
//! (`poll`, `epoll`, an async reactor) instead *arms* ([`DoorbellConsumer::arm`]): it stores 2
//! in the same word, with the same fence and re-check, and waits on its end of a wake-up socket
//! pair whose other end the producer holds (passed with `SCM_RIGHTS` at connection setup,
//! [`DoorbellProducer::set_wake_socket`]; a socket, not an eventfd, so that neither process can
//! make the other's calls block, see [`WakeSocket`]). The producer's
//! [`notify`](DoorbellProducer::notify) sends on it when it finds 2 and wakes the futex when it
//! finds 1: one handshake, two ways to sleep.
//!
//! # A faulty or hostile peer
//! Indices are always computed from this side's local position, so no shared value can steer an
//! access out of bounds. The consumer accepts in the slot it polls only the tag of the position
//! it expects (an entry) or of that position minus the capacity (not written yet): any other
//! tag, such as one claiming a position further ahead, is [`ShmError::RingCorrupt`]. The
//! producer accepts a `tail` only between its cached value and its own head. Waits take a
//! timeout, so a peer that stops cannot hang the consumer beyond what its caller allows.

use std::time::{Duration, Instant};

#[cfg(loom)]
use loom::sync::Arc;
#[cfg(not(loom))]
use std::sync::Arc;

use super::ShmError;
#[cfg(not(loom))]
use super::ShmRegion;
#[cfg(not(loom))]
use super::WakeSocket;
#[cfg(loom)]
use super::sync::ModelFutex;
use super::sync::{AtomicU32, AtomicU64, Ordering, fence, spin_hint};

#[cfg(not(loom))]
const TAIL_OFFSET: usize = 0;
#[cfg(not(loom))]
const SLEEP_OFFSET: usize = 128;
const SLOTS_OFFSET: usize = 256;

/// The geometry of a doorbell ring: its capacity (a power of two) and the bytes it occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    capacity: u32,
}

impl RingLayout {
    /// The largest supported capacity.
    pub const MAX_CAPACITY: u32 = 1 << 24;
    /// The alignment of a ring's offset inside its region (two cache lines, so the adjacent-line
    /// prefetcher does not couple the consumer's and the producer's lines).
    pub const ALIGN: usize = 128;

    /// A ring of `capacity` entries.
    ///
    /// # Errors
    /// [`ShmError::InvalidCapacity`] unless `capacity` is a power of two in
    /// `1..=MAX_CAPACITY`.
    pub fn new(capacity: u32) -> Result<Self, ShmError> {
        if !capacity.is_power_of_two() || capacity > Self::MAX_CAPACITY {
            return Err(ShmError::InvalidCapacity {
                capacity,
                max: Self::MAX_CAPACITY,
            });
        }
        Ok(Self { capacity })
    }

    /// The number of entries.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The bytes the ring occupies in its region.
    pub fn bytes(&self) -> usize {
        SLOTS_OFFSET + SLOT_BYTES * self.capacity as usize
    }
}

/// Bytes of one slot.
const SLOT_BYTES: usize = 32;

/// Bytes a slot carries beside its value ([`DoorbellProducer::try_push_with`]).
pub const SLOT_EXTRA: usize = 16;

/// One slot of the ring: the tagged value, then [`SLOT_EXTRA`] bytes as two words.
#[derive(Debug)]
#[repr(C, align(32))]
struct Slot {
    word: AtomicU64,
    extra: [AtomicU64; 2],
    _spare: AtomicU64,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_BYTES);

impl Slot {
    fn new() -> Self {
        Slot {
            word: AtomicU64::new(0),
            extra: [AtomicU64::new(0), AtomicU64::new(0)],
            _spare: AtomicU64::new(0),
        }
    }
}

/// The tag a slot carries when it holds the entry for `position`.
#[inline(always)]
fn tag(position: u64) -> u32 {
    (position as u32).wrapping_add(1)
}

/// The outcome of [`DoorbellProducer::try_push`].
#[must_use = "a full ring did not take the value"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The value is in the ring.
    Pushed,
    /// The ring is full: the consumer has not caught up; the value was not stored.
    Full,
}

/// How [`DoorbellConsumer::wait`] waits for an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Poll without sleeping (lowest latency, burns a core).
    Busy,
    /// Sleep on the futex until the producer wakes us (needs a producer that calls
    /// [`DoorbellProducer::notify`]).
    Event,
    /// Poll `spins` times, then sleep as in `Event`.
    Adaptive {
        /// Polls before sleeping.
        spins: u32,
    },
}

/// Who keeps the ring memory alive.
#[derive(Debug, Clone)]
enum Owner {
    /// A shared mapping (the cross-process case).
    #[cfg(not(loom))]
    Region(#[allow(dead_code)] Arc<ShmRegion>),
    /// Heap memory (threads of one process, and loom models).
    Heap(#[cfg_attr(not(loom), allow(dead_code))] Arc<HeapRing>),
}

/// A value alone on its two cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Line<T>(T);

/// Ring storage on the heap, with the same line separation as the shared layout.
#[derive(Debug)]
struct HeapRing {
    tail: Line<AtomicU64>,
    sleeping: Line<AtomicU32>,
    slots: Box<[Slot]>,
    #[cfg(loom)]
    futex: ModelFutex,
}

/// Pointers into the ring, valid while the owner lives.
#[derive(Debug, Clone, Copy)]
struct RingPtrs {
    tail: *const AtomicU64,
    sleeping: *const AtomicU32,
    slots: *const Slot,
    mask: u64,
}

impl RingPtrs {
    #[cfg(not(loom))]
    fn in_region(region: &ShmRegion, offset: usize, layout: RingLayout) -> Result<Self, ShmError> {
        let base = region.ptr_at(offset, layout.bytes(), RingLayout::ALIGN)?;
        // SAFETY: `base..base + layout.bytes()` is inside the mapping (checked) and the three
        // offsets plus their sizes stay within `layout.bytes()`; all are 32-byte aligned since
        // `base` is 128-aligned relative to a page-aligned mapping. `AtomicU64`/`AtomicU32`
        // have the size and alignment of `u64`/`u32`, `Slot` is four `AtomicU64` (`repr(C)`,
        // 32 bytes, align 32), and every byte pattern is a valid value.
        unsafe {
            Ok(Self {
                tail: base.add(TAIL_OFFSET).cast(),
                sleeping: base.add(SLEEP_OFFSET).cast(),
                slots: base.add(SLOTS_OFFSET).cast(),
                mask: u64::from(layout.capacity) - 1,
            })
        }
    }

    // The accessors below dereference pointers into memory that the owner keeps mapped (or
    // allocated) for as long as the producer/consumer holding these pointers lives, and that is
    // only ever accessed through atomics on this side. A peer process may store to it at any
    // time; atomics make such concurrent stores well defined.

    #[inline(always)]
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: see above; in bounds and aligned by construction.
        unsafe { &*self.tail }
    }

    #[inline(always)]
    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: see above; in bounds and aligned by construction.
        unsafe { &*self.sleeping }
    }

    #[inline(always)]
    fn slot(&self, position: u64) -> &Slot {
        // SAFETY: `position & mask < capacity`, and the slot array has `capacity` entries in
        // bounds (see above), whatever `position` is.
        unsafe { &*self.slots.add((position & self.mask) as usize) }
    }
}

/// Creates a connected producer/consumer pair over a ring in this process's heap, for threads
/// of one process. Under `--cfg loom` this is the storage the loom models check (loom's
/// atomics cannot live in a real mapping); the ring code is the same as over a [`ShmRegion`].
pub fn heap_pair(layout: RingLayout) -> (DoorbellProducer, DoorbellConsumer) {
    let ring = Arc::new(HeapRing {
        tail: Line(AtomicU64::new(0)),
        sleeping: Line(AtomicU32::new(0)),
        slots: (0..layout.capacity).map(|_| Slot::new()).collect(),
        #[cfg(loom)]
        futex: ModelFutex::default(),
    });
    let ptrs = RingPtrs {
        tail: &ring.tail.0,
        sleeping: &ring.sleeping.0,
        slots: ring.slots.as_ptr(),
        mask: u64::from(layout.capacity) - 1,
    };
    let cap = u64::from(layout.capacity);
    let owner = Owner::Heap(ring);
    (
        DoorbellProducer {
            owner: owner.clone(),
            ptrs,
            head: 0,
            tail_cache: 0,
            cap,
            #[cfg(not(loom))]
            event: None,
        },
        DoorbellConsumer {
            owner,
            ptrs,
            tail: 0,
            cap,
            sleeps: 0,
            extra: [0; 2],
        },
    )
}

/// The producer (sender) end of a doorbell ring.
#[derive(Debug)]
pub struct DoorbellProducer {
    /// Keeps the ring memory alive (and, under loom, holds the modelled futex).
    #[cfg_attr(not(loom), allow(dead_code))]
    owner: Owner,
    ptrs: RingPtrs,
    /// Entries published so far (the next position to write).
    head: u64,
    /// The consumer's `tail` as last read: entries below it are free to overwrite.
    tail_cache: u64,
    cap: u64,
    /// The consumer's wake-up socket, signaled when it has armed (see [`DoorbellConsumer::arm`]).
    #[cfg(not(loom))]
    event: Option<Arc<WakeSocket>>,
}

// SAFETY: the raw pointers point into memory owned by `owner` (an `Arc`, itself Send + Sync),
// which moves with the value; all accesses through them are atomic.
unsafe impl Send for DoorbellProducer {}
// SAFETY: `&self` methods (`notify`, getters) only perform atomic loads and a futex wake;
// every method that changes the local position takes `&mut self`.
unsafe impl Sync for DoorbellProducer {}

impl DoorbellProducer {
    /// Attaches the producer end to the ring at `offset` of `region` (usually a region received
    /// from the consumer's process). The ring memory must be zeroed and have one producer.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`] or [`ShmError::Misaligned`] if the ring does not fit at
    /// `offset` (which must be a multiple of [`RingLayout::ALIGN`]).
    #[cfg(not(loom))]
    pub fn new(
        region: Arc<ShmRegion>,
        offset: usize,
        layout: RingLayout,
    ) -> Result<Self, ShmError> {
        let ptrs = RingPtrs::in_region(&region, offset, layout)?;
        Ok(Self {
            owner: Owner::Region(region),
            ptrs,
            head: 0,
            tail_cache: 0,
            cap: u64::from(layout.capacity),
            event: None,
        })
    }

    /// Signals `event` (the consumer's wake-up socket, received from its process) whenever
    /// [`notify`](Self::notify) finds the consumer armed with [`DoorbellConsumer::arm`].
    #[cfg(not(loom))]
    pub fn set_wake_socket(&mut self, event: Arc<WakeSocket>) {
        self.event = Some(event);
    }

    /// Publishes `value` if the ring has room, with the slot's extra bytes zeroed. Allocation-free;
    /// one `Release` store to the slot, plus an `Acquire` load of the consumer's `tail` only
    /// when the cached copy says "full".
    ///
    /// Does not wake a sleeping consumer: follow with [`notify`](Self::notify), or use
    /// [`try_push_notify`](Self::try_push_notify), when the consumer may use event mode.
    ///
    /// # Errors
    /// [`ShmError::RingCorrupt`] if the consumer's `tail` went backwards or past what was
    /// published (a faulty peer); the ring is unusable then.
    #[inline]
    pub fn try_push(&mut self, value: u32) -> Result<PushOutcome, ShmError> {
        self.try_push_with(value, &[0; SLOT_EXTRA])
    }

    /// As [`try_push`](Self::try_push), with `extra` in the slot beside the value (the consumer
    /// reads it with [`DoorbellConsumer::extra`] after taking the value).
    ///
    /// # Errors
    /// As [`try_push`](Self::try_push).
    #[inline]
    pub fn try_push_with(
        &mut self,
        value: u32,
        extra: &[u8; SLOT_EXTRA],
    ) -> Result<PushOutcome, ShmError> {
        if self.head - self.tail_cache >= self.cap {
            let tail = self.ptrs.tail().load(Ordering::Acquire);
            if tail < self.tail_cache || tail > self.head {
                return Err(ShmError::RingCorrupt {
                    detail: "consumer tail moved backwards or beyond the published head",
                    position: self.head,
                    found: tail,
                });
            }
            self.tail_cache = tail;
            if self.head - tail >= self.cap {
                return Ok(PushOutcome::Full);
            }
        }
        let slot = self.ptrs.slot(self.head);
        let (lo, hi) = extra.split_at(8);
        let lo = u64::from_le_bytes(lo.try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(hi.try_into().expect("8 bytes"));
        slot.extra[0].store(lo, Ordering::Relaxed);
        slot.extra[1].store(hi, Ordering::Relaxed);
        let entry = (u64::from(tag(self.head)) << 32) | u64::from(value);
        slot.word.store(entry, Ordering::Release);
        self.head += 1;
        Ok(PushOutcome::Pushed)
    }

    /// Wakes the consumer if it sleeps (or is about to): a `SeqCst` fence and a load of the
    /// `sleeping` flag; only if it is set, the flag is cleared and `FUTEX_WAKE` issued. Returns
    /// whether a wake was issued.
    ///
    /// Clearing the flag before waking is what makes a wake-up that arrives between the
    /// consumer's last check and its `FUTEX_WAIT` count: the wait then finds the word changed
    /// and returns at once instead of sleeping through the (already spent) wake.
    ///
    /// # Errors
    /// [`ShmError::Futex`] if `futex(2)` fails.
    ///
    /// The flag's value says how the consumer waits: [`SLEEP_FUTEX`] on the futex, [`SLEEP_ARMED`]
    /// on its wake-up socket (through `poll`/`epoll`, after [`DoorbellConsumer::arm`]); the
    /// socket is signaled only in the second case, the futex woken otherwise.
    #[inline]
    pub fn notify(&self) -> Result<bool, ShmError> {
        fence(Ordering::SeqCst);
        let sleeping = self.ptrs.sleeping();
        if sleeping.load(Ordering::Relaxed) == 0 {
            return Ok(false);
        }
        let how = sleeping.swap(0, Ordering::Relaxed);
        if how == 0 {
            return Ok(false);
        }
        self.wake(how)?;
        Ok(true)
    }

    /// [`try_push`](Self::try_push) then, if pushed, [`notify`](Self::notify).
    ///
    /// # Errors
    /// As both.
    #[inline]
    pub fn try_push_notify(&mut self, value: u32) -> Result<PushOutcome, ShmError> {
        let outcome = self.try_push(value)?;
        if outcome == PushOutcome::Pushed {
            self.notify()?;
        }
        Ok(outcome)
    }

    /// Entries published so far.
    pub fn pushed(&self) -> u64 {
        self.head
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> u32 {
        self.cap as u32
    }

    #[cfg(not(loom))]
    fn wake(&self, how: u32) -> Result<(), ShmError> {
        match (&self.event, how == SLEEP_ARMED) {
            (Some(event), true) => event.signal(),
            _ => futex::wake(self.ptrs.sleeping()),
        }
    }

    #[cfg(loom)]
    fn wake(&self, _how: u32) -> Result<(), ShmError> {
        let Owner::Heap(ring) = &self.owner;
        ring.futex.wake();
        Ok(())
    }
}

/// The consumer (receiver) end of a doorbell ring.
#[derive(Debug)]
pub struct DoorbellConsumer {
    /// Keeps the ring memory alive (and, under loom, holds the modelled futex).
    #[cfg_attr(not(loom), allow(dead_code))]
    owner: Owner,
    ptrs: RingPtrs,
    /// Entries consumed so far (the next position to read).
    tail: u64,
    cap: u64,
    sleeps: u64,
    /// The extra bytes of the last entry taken, as two little-endian words.
    extra: [u64; 2],
}

// SAFETY: as for `DoorbellProducer`: pointers into `owner`'s memory, atomics only.
unsafe impl Send for DoorbellConsumer {}
// SAFETY: `&self` methods are plain getters of local fields; everything else takes `&mut self`.
unsafe impl Sync for DoorbellConsumer {}

/// How many polls pass between clock reads in busy waits with a timeout.
const POLLS_PER_CLOCK_CHECK: u32 = 256;

impl DoorbellConsumer {
    /// Attaches the consumer end to the ring at `offset` of `region` (usually a region this
    /// process created). The ring memory must be zeroed and have one consumer.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`] or [`ShmError::Misaligned`] as for
    /// [`DoorbellProducer::new`].
    #[cfg(not(loom))]
    pub fn new(
        region: Arc<ShmRegion>,
        offset: usize,
        layout: RingLayout,
    ) -> Result<Self, ShmError> {
        let ptrs = RingPtrs::in_region(&region, offset, layout)?;
        Ok(Self {
            owner: Owner::Region(region),
            ptrs,
            tail: 0,
            cap: u64::from(layout.capacity),
            sleeps: 0,
            extra: [0; 2],
        })
    }

    /// The extra bytes that came with the last entry taken ([`DoorbellProducer::try_push_with`];
    /// zeros after [`DoorbellProducer::try_push`]). Copied out of the slot when the entry was
    /// taken: the producer may reuse the slot since.
    #[inline]
    pub fn extra(&self) -> [u8; SLOT_EXTRA] {
        let mut b = [0u8; SLOT_EXTRA];
        b[..8].copy_from_slice(&self.extra[0].to_le_bytes());
        b[8..].copy_from_slice(&self.extra[1].to_le_bytes());
        b
    }

    /// Takes the next entry if there is one. Allocation-free: one `Acquire` load of the slot's
    /// word and, for an entry, two loads of its extra bytes and one `Release` store of `tail`.
    ///
    /// # Errors
    /// [`ShmError::RingCorrupt`] if the slot carries a tag that neither the expected entry nor
    /// the previous lap's can have (a faulty or hostile producer); the ring is unusable then.
    #[inline]
    pub fn try_pop(&mut self) -> Result<Option<u32>, ShmError> {
        let slot = self.ptrs.slot(self.tail);
        let raw = slot.word.load(Ordering::Acquire);
        let found = (raw >> 32) as u32;
        if found == tag(self.tail) {
            self.extra = [
                slot.extra[0].load(Ordering::Relaxed),
                slot.extra[1].load(Ordering::Relaxed),
            ];
            self.tail += 1;
            self.ptrs.tail().store(self.tail, Ordering::Release);
            return Ok(Some(raw as u32));
        }
        let not_yet = if self.tail < self.cap {
            0
        } else {
            tag(self.tail - self.cap)
        };
        if found == not_yet {
            Ok(None)
        } else {
            Err(ShmError::RingCorrupt {
                detail: "slot tag is neither the expected position nor the previous lap",
                position: self.tail,
                found: raw,
            })
        }
    }

    /// Waits for the next entry in `mode`, for at most `timeout`. Returns `Ok(None)` when the
    /// timeout passes with the ring still empty. With `timeout = None` the call waits as long as
    /// the producer stays silent, dead or alive: a transport passes a timeout and checks
    /// [peer liveness](super::socket_peer_status) between waits.
    ///
    /// In `Event` and `Adaptive` modes the producer must call
    /// [`notify`](DoorbellProducer::notify) after pushing; a spurious or missed futex return is
    /// harmless (the loop re-checks the ring).
    ///
    /// # Errors
    /// [`ShmError::RingCorrupt`] as for [`try_pop`](Self::try_pop), [`ShmError::Futex`].
    pub fn wait(
        &mut self,
        mode: WaitMode,
        timeout: Option<Duration>,
    ) -> Result<Option<u32>, ShmError> {
        if let Some(v) = self.try_pop()? {
            return Ok(Some(v));
        }
        // A timeout too large to represent means none.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let expired = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        let mut spins_left = match mode {
            WaitMode::Busy => u32::MAX,
            WaitMode::Event => 0,
            WaitMode::Adaptive { spins } => spins,
        };
        while spins_left > 0 {
            let burst = spins_left.min(POLLS_PER_CLOCK_CHECK);
            // Busy mode polls back to back: a pause between polls (up to ~140 cycles on recent
            // x86) would add to every message's latency. The other modes pause, sparing the
            // sibling hyper-thread while they spin before sleeping.
            let pause = mode != WaitMode::Busy;
            for _ in 0..burst {
                if let Some(v) = self.try_pop()? {
                    return Ok(Some(v));
                }
                if pause {
                    spin_hint();
                }
            }
            if expired(deadline) {
                return Ok(None);
            }
            if mode != WaitMode::Busy {
                spins_left -= burst;
            }
        }
        self.sleep_until(deadline)
    }

    fn sleep_until(&mut self, deadline: Option<Instant>) -> Result<Option<u32>, ShmError> {
        loop {
            // A swap rather than a store: the announcement is then ordered after any clear the
            // producer made (an RMW reads the latest value), which `notify` relies on when it
            // finds the flag set. loom, whose modification order is only partial, needs the
            // RMW to see this; a plain store is also correct under the C++ fence rules.
            self.ptrs.sleeping().swap(SLEEP_FUTEX, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let popped = self.try_pop();
            if !matches!(popped, Ok(None)) {
                self.ptrs.sleeping().store(0, Ordering::Relaxed);
                return popped;
            }
            let remaining = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => {
                        self.ptrs.sleeping().store(0, Ordering::Relaxed);
                        return Ok(None);
                    }
                },
            };
            self.sleeps += 1;
            let slept = self.futex_wait(remaining);
            self.ptrs.sleeping().store(0, Ordering::Relaxed);
            slept?;
            if let Some(v) = self.try_pop()? {
                return Ok(Some(v));
            }
        }
    }

    /// Announces that the consumer is about to wait on its wake-up socket (in `poll`, `epoll` or
    /// an async reactor) rather than on the futex: the producer's next
    /// [`notify`](DoorbellProducer::notify) signals the socket. Returns `true` when an entry is
    /// already there (take it with [`try_pop`](Self::try_pop) and do not wait), `false` when the
    /// wait may begin: the entry that ends it signals the socket.
    ///
    /// The same Dekker handshake as the futex sleep: the flag is set, a `SeqCst` fence, then the
    /// slot is checked; the producer stores the slot, fences, then reads the flag.
    ///
    /// # Errors
    /// [`ShmError::RingCorrupt`] as for [`try_pop`](Self::try_pop).
    pub fn arm(&mut self) -> Result<bool, ShmError> {
        self.ptrs.sleeping().swap(SLEEP_ARMED, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let ready = self.peek()?;
        if ready {
            self.ptrs.sleeping().store(0, Ordering::Relaxed);
        }
        Ok(ready)
    }

    /// Whether the next entry is there, without taking it.
    fn peek(&self) -> Result<bool, ShmError> {
        let raw = self.ptrs.slot(self.tail).word.load(Ordering::Acquire);
        let found = (raw >> 32) as u32;
        if found == tag(self.tail) {
            return Ok(true);
        }
        let not_yet = if self.tail < self.cap {
            0
        } else {
            tag(self.tail - self.cap)
        };
        if found == not_yet {
            Ok(false)
        } else {
            Err(ShmError::RingCorrupt {
                detail: "slot tag is neither the expected position nor the previous lap",
                position: self.tail,
                found: raw,
            })
        }
    }

    #[cfg(not(loom))]
    fn futex_wait(&self, timeout: Option<Duration>) -> Result<(), ShmError> {
        futex::wait(self.ptrs.sleeping(), SLEEP_FUTEX, timeout)
    }

    #[cfg(loom)]
    fn futex_wait(&self, _timeout: Option<Duration>) -> Result<(), ShmError> {
        let Owner::Heap(ring) = &self.owner;
        ring.futex.wait(self.ptrs.sleeping(), 1);
        Ok(())
    }

    /// Entries consumed so far.
    pub fn popped(&self) -> u64 {
        self.tail
    }

    /// How many times this consumer went to sleep on the futex (event and adaptive modes).
    pub fn sleeps(&self) -> u64 {
        self.sleeps
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> u32 {
        self.cap as u32
    }
}

/// Value of the `sleeping` word while the consumer sleeps on the futex.
pub const SLEEP_FUTEX: u32 = 1;
/// Value of the `sleeping` word while the consumer waits on its wake-up socket ([`DoorbellConsumer::arm`]).
pub const SLEEP_ARMED: u32 = 2;

/// A non-blocking eventfd (`eventfd(2)`) for wake-ups within one process (a listener's threads).
/// Never pass one to another process: the open file description, and with it `O_NONBLOCK`, would
/// be shared, so the other process could make our reads and writes block. Across processes the
/// doorbell signals a [`WakeSocket`] instead.
#[cfg(not(loom))]
#[derive(Debug)]
pub struct EventFd {
    fd: std::os::fd::OwnedFd,
}

#[cfg(not(loom))]
impl EventFd {
    /// A new eventfd (`EFD_NONBLOCK | EFD_CLOEXEC`, counter 0).
    ///
    /// # Errors
    /// [`ShmError::EventFd`] if `eventfd(2)` fails.
    pub fn new() -> Result<Self, ShmError> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(ShmError::EventFd {
                op: "create",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        Ok(Self {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The fd, for `poll`/`epoll` (readable once signaled).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Adds 1 to the counter (the fd becomes readable). A counter at its maximum (`EAGAIN`)
    /// is readable already.
    ///
    /// # Errors
    /// [`ShmError::EventFd`] (`"signal"`).
    pub fn signal(&self) -> Result<(), ShmError> {
        use std::os::fd::AsRawFd;
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes the 8 bytes of `one`, alive for the call, to an fd we own.
        let rc = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(ShmError::EventFd {
                    op: "signal",
                    source: e,
                });
            }
        }
        Ok(())
    }

    /// Resets the counter; returns whether it was signaled.
    ///
    /// # Errors
    /// [`ShmError::EventFd`] (`"drain"`).
    pub fn drain(&self) -> Result<bool, ShmError> {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`, alive for the call, from an fd we own.
        let rc = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(false),
                _ => Err(ShmError::EventFd {
                    op: "drain",
                    source: e,
                }),
            };
        }
        Ok(true)
    }
}

/// Shared (not `PRIVATE`) futex operations on a word of a `MAP_SHARED` mapping, so that two
/// processes mapping the same memfd page meet on one wait queue. See `futex(2)`.
#[cfg(not(loom))]
mod futex {
    use std::io;
    use std::time::Duration;

    use super::{AtomicU32, ShmError};

    /// Sleeps while `*word == expected`, at most `timeout`. Returns on wake-up, on a value
    /// mismatch (`EAGAIN`), on a signal (`EINTR`) or on timeout: the caller re-checks.
    pub(super) fn wait(
        word: &AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> Result<(), ShmError> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `word` is a live, aligned 32-bit atomic (the kernel reads it atomically);
        // `ts_ptr` is NULL or points at `ts`, alive for the call. The other arguments are
        // unused by FUTEX_WAIT.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                ts_ptr,
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT) => Ok(()),
            _ => Err(ShmError::Futex {
                op: "wait",
                source: e,
            }),
        }
    }

    /// Wakes one waiter on `word` (there is one consumer per ring).
    pub(super) fn wake(word: &AtomicU32) -> Result<(), ShmError> {
        // SAFETY: `word` is a live, aligned 32-bit word; FUTEX_WAKE does not dereference
        // anything else.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE,
                1u32,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        if rc < 0 {
            return Err(ShmError::Futex {
                op: "wake",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::thread;

    struct Setup {
        producer: DoorbellProducer,
        consumer: DoorbellConsumer,
        /// A second mapping of the same memory, playing a faulty peer.
        peer: ShmRegion,
    }

    fn setup(capacity: u32) -> Setup {
        let layout = RingLayout::new(capacity).unwrap();
        let offset = 256;
        let len = offset + layout.bytes();
        let mine = Arc::new(ShmRegion::create("doorbell-test", len).unwrap());
        let theirs =
            Arc::new(ShmRegion::from_fd(mine.fd().try_clone_to_owned().unwrap(), len).unwrap());
        let peer = ShmRegion::from_fd(mine.fd().try_clone_to_owned().unwrap(), len).unwrap();
        Setup {
            producer: DoorbellProducer::new(theirs, offset, layout).unwrap(),
            consumer: DoorbellConsumer::new(mine, offset, layout).unwrap(),
            peer,
        }
    }

    fn write_u64(region: &mut ShmRegion, offset: usize, v: u64) {
        region.copy_in(256 + offset, &v.to_ne_bytes()).unwrap();
    }

    #[test]
    fn layout_validation() {
        for bad in [0, 3, 6, 1000, RingLayout::MAX_CAPACITY * 2, u32::MAX] {
            assert!(
                matches!(RingLayout::new(bad), Err(ShmError::InvalidCapacity { .. })),
                "{bad}"
            );
        }
        let l = RingLayout::new(16).unwrap();
        assert_eq!((l.capacity(), l.bytes()), (16, 256 + 16 * 32));
        let region = Arc::new(ShmRegion::create("layout", 4096).unwrap());
        assert!(matches!(
            DoorbellConsumer::new(region.clone(), 64, l),
            Err(ShmError::Misaligned {
                offset: 64,
                align: 128
            })
        ));
        assert!(matches!(
            DoorbellProducer::new(region.clone(), 4096 - 256, l),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(DoorbellProducer::new(region, 4096 - 768, l).is_ok());
    }

    #[test]
    fn fifo_order_full_and_many_laps() {
        let Setup {
            mut producer,
            mut consumer,
            ..
        } = setup(8);
        assert_eq!(consumer.try_pop().unwrap(), None);
        for lap in 0..1000u32 {
            for i in 0..8 {
                assert_eq!(producer.try_push(lap * 8 + i).unwrap(), PushOutcome::Pushed);
            }
            assert_eq!(producer.try_push(u32::MAX).unwrap(), PushOutcome::Full);
            for i in 0..8 {
                assert_eq!(consumer.try_pop().unwrap(), Some(lap * 8 + i));
            }
            assert_eq!(consumer.try_pop().unwrap(), None);
        }
        assert_eq!((producer.pushed(), consumer.popped()), (8000, 8000));
        // Interleaved, with the extreme values.
        for v in [0, u32::MAX, 1, 0x8000_0000] {
            assert_eq!(producer.try_push(v).unwrap(), PushOutcome::Pushed);
            assert_eq!(consumer.wait(WaitMode::Busy, None).unwrap(), Some(v));
        }
    }

    #[test]
    fn extra_bytes_travel_with_their_entry() {
        let Setup {
            mut producer,
            mut consumer,
            ..
        } = setup(2);
        for lap in 0..5u8 {
            let extra: [u8; SLOT_EXTRA] = std::array::from_fn(|i| lap * 16 + i as u8 + 1);
            assert_eq!(
                producer.try_push_with(u32::from(lap), &extra).unwrap(),
                PushOutcome::Pushed
            );
            // A plain push over the same slot a lap later must not leave the old bytes.
            assert_eq!(producer.try_push(99).unwrap(), PushOutcome::Pushed);
            assert_eq!(consumer.try_pop().unwrap(), Some(u32::from(lap)));
            assert_eq!(consumer.extra(), extra);
            assert_eq!(consumer.try_pop().unwrap(), Some(99));
            assert_eq!(consumer.extra(), [0; SLOT_EXTRA]);
        }
    }

    #[test]
    fn producer_tag_far_ahead_is_rejected() {
        let Setup {
            mut producer,
            mut consumer,
            mut peer,
        } = setup(8);
        assert_eq!(producer.try_push(1).unwrap(), PushOutcome::Pushed);
        assert_eq!(consumer.try_pop().unwrap(), Some(1));
        // Slot 1 claims position 1 + 1000 * 8: a producer running laps ahead.
        write_u64(
            &mut peer,
            SLOTS_OFFSET + SLOT_BYTES,
            (u64::from(tag(8001)) << 32) | 5,
        );
        match consumer.try_pop() {
            Err(ShmError::RingCorrupt { position: 1, .. }) => {}
            other => panic!("expected RingCorrupt, got {other:?}"),
        }
        // The waiting paths report it too instead of spinning or sleeping forever.
        assert!(matches!(
            consumer.wait(WaitMode::Busy, None),
            Err(ShmError::RingCorrupt { .. })
        ));
        assert!(matches!(
            consumer.wait(WaitMode::Event, None),
            Err(ShmError::RingCorrupt { .. })
        ));
        // A slot claiming the next position but one is also impossible.
        write_u64(
            &mut peer,
            SLOTS_OFFSET + SLOT_BYTES,
            u64::from(tag(2)) << 32,
        );
        assert!(matches!(
            consumer.try_pop(),
            Err(ShmError::RingCorrupt { .. })
        ));
    }

    #[test]
    fn hostile_consumer_tail_is_rejected() {
        let Setup {
            mut producer,
            mut consumer,
            mut peer,
        } = setup(4);
        for i in 0..4 {
            assert_eq!(producer.try_push(i).unwrap(), PushOutcome::Pushed);
        }
        // A tail beyond what was published would let the producer overwrite unread slots.
        write_u64(&mut peer, TAIL_OFFSET, 1 << 40);
        match producer.try_push(9) {
            Err(ShmError::RingCorrupt { found, .. }) => assert_eq!(found, 1 << 40),
            other => panic!("expected RingCorrupt, got {other:?}"),
        }
        // A tail that moves backwards is rejected too.
        write_u64(&mut peer, TAIL_OFFSET, 0);
        for i in 0..3 {
            assert_eq!(consumer.try_pop().unwrap(), Some(i));
        }
        assert_eq!(producer.try_push(4).unwrap(), PushOutcome::Pushed);
        assert_eq!(producer.try_push(5).unwrap(), PushOutcome::Pushed);
        assert_eq!(producer.try_push(6).unwrap(), PushOutcome::Pushed);
        write_u64(&mut peer, TAIL_OFFSET, 1);
        assert!(matches!(
            producer.try_push(7),
            Err(ShmError::RingCorrupt { found: 1, .. })
        ));
    }

    #[test]
    fn wait_times_out_on_an_empty_ring() {
        let Setup { mut consumer, .. } = setup(4);
        for mode in [
            WaitMode::Busy,
            WaitMode::Event,
            WaitMode::Adaptive { spins: 100 },
        ] {
            assert_eq!(
                consumer.wait(mode, Some(Duration::from_millis(5))).unwrap(),
                None
            );
        }
        assert_eq!(
            consumer
                .wait(WaitMode::Event, Some(Duration::ZERO))
                .unwrap(),
            None
        );
        assert!(
            consumer.sleeps() >= 1,
            "event mode must have slept on the futex"
        );
    }

    #[test]
    fn event_mode_wakes_across_threads() {
        let Setup {
            mut producer,
            mut consumer,
            ..
        } = setup(4);
        const N: u32 = 2_000;
        let t = thread::spawn(move || {
            let mut woken = 0u32;
            for i in 0..N {
                if i % 50 == 0 {
                    thread::sleep(Duration::from_micros(500));
                }
                loop {
                    let outcome = producer.try_push(i).unwrap();
                    if producer.notify().unwrap() {
                        woken += 1;
                    }
                    if outcome == PushOutcome::Pushed {
                        break;
                    }
                    thread::yield_now();
                }
            }
            woken
        });
        for i in 0..N {
            let mode = if i % 2 == 0 {
                WaitMode::Event
            } else {
                WaitMode::Adaptive { spins: 64 }
            };
            let got = consumer.wait(mode, Some(Duration::from_secs(20))).unwrap();
            assert_eq!(got, Some(i), "lost or reordered entry");
        }
        let woken = t.join().unwrap();
        assert!(consumer.sleeps() > 0, "the consumer never slept");
        assert!(woken > 0, "the producer never had to wake the consumer");
    }
}

/// Tests over heap storage: no memfd or mmap, so they also run under miri
/// (`cargo +nightly miri test --lib heap_tests`).
#[cfg(all(test, not(loom)))]
mod heap_tests {
    use super::*;
    use crate::shm::CreditMailbox;
    use std::thread;

    const N: u32 = if cfg!(miri) { 200 } else { 100_000 };

    fn extra_for(i: u32) -> [u8; SLOT_EXTRA] {
        let w = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut b = [0u8; SLOT_EXTRA];
        b[..8].copy_from_slice(&w.to_le_bytes());
        b[8..].copy_from_slice(&(!w).to_le_bytes());
        b
    }

    #[test]
    fn heap_ring_busy_across_threads() {
        let (mut producer, mut consumer) = heap_pair(RingLayout::new(8).unwrap());
        let t = thread::spawn(move || {
            for i in 0..N {
                let extra = extra_for(i);
                while producer
                    .try_push_with(i.wrapping_mul(0x9e37_79b1), &extra)
                    .unwrap()
                    == PushOutcome::Full
                {
                    thread::yield_now();
                }
            }
        });
        for i in 0..N {
            let v = consumer.wait(WaitMode::Busy, None).unwrap();
            assert_eq!(v, Some(i.wrapping_mul(0x9e37_79b1)));
            assert_eq!(consumer.extra(), extra_for(i));
        }
        t.join().unwrap();
        assert_eq!(consumer.try_pop().unwrap(), None);
    }

    #[test]
    fn heap_ring_event_mode_across_threads() {
        let (mut producer, mut consumer) = heap_pair(RingLayout::new(4).unwrap());
        let n = N / 10;
        let t = thread::spawn(move || {
            for i in 0..n {
                if i % 16 == 0 {
                    thread::yield_now();
                }
                while producer.try_push_notify(i).unwrap() == PushOutcome::Full {
                    thread::yield_now();
                }
            }
        });
        for i in 0..n {
            assert_eq!(consumer.wait(WaitMode::Event, None).unwrap(), Some(i));
        }
        t.join().unwrap();
    }

    #[test]
    fn heap_mailbox_across_threads() {
        let mailbox = CreditMailbox::heap(3);
        let writer = mailbox.clone();
        let t = thread::spawn(move || {
            for v in 1..=u64::from(N) {
                writer.store(2, v << 20).unwrap();
            }
        });
        let mut last = 0;
        while last != u64::from(N) << 20 {
            let v = mailbox.load(2).unwrap();
            assert!(
                v >= last && v.trailing_zeros() >= 20,
                "{v:#x} after {last:#x}"
            );
            last = v;
            thread::yield_now();
        }
        t.join().unwrap();
        assert!(mailbox.load(3).is_err());
    }
}
