//! The one place that decides what a test does when no RDMA device is present.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use super::device::{Context, find_device};
use super::error::VerbsError;

/// Environment variable naming the device tests use (default: the first device).
pub const ENV_DEVICE: &str = "RSMSG_DEVICE";
/// Environment variable that, set to `1`, turns a missing RDMA device into a test failure.
pub const ENV_REQUIRE: &str = "RSMSG_REQUIRE_RDMA";

/// Open the device for a test that needs RDMA.
///
/// Returns `None` after printing `skipped: no RDMA device (...)` to stderr when the host has no
/// RDMA device and `RSMSG_REQUIRE_RDMA` is not `1`; the caller then returns without asserting
/// (an explicit skip). `test` names the test in the message.
///
/// # Panics
/// When `RSMSG_REQUIRE_RDMA=1` and no device is found; when `RSMSG_DEVICE` names a device that
/// is not among those present; when a present device cannot be opened.
pub fn test_context(test: &str) -> Option<Context> {
    let required = std::env::var(ENV_REQUIRE).is_ok_and(|v| v == "1");
    let name = std::env::var(ENV_DEVICE).ok().filter(|s| !s.is_empty());
    let chain = |e: &VerbsError| match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    };
    match find_device(name.as_deref()) {
        Ok(dev) => match dev.open() {
            Ok(ctx) => Some(ctx),
            Err(e) => panic!(
                "{test}: RDMA device present but cannot be opened: {}",
                chain(&e)
            ),
        },
        Err(e @ (VerbsError::GetDeviceList(_) | VerbsError::NoDevice)) => {
            let why = chain(&e);
            if required {
                panic!("{test}: {ENV_REQUIRE}=1 but no RDMA device: {why}");
            }
            eprintln!(
                "{test}: skipped: no RDMA device ({why}); set {ENV_REQUIRE}=1 to fail instead"
            );
            None
        }
        Err(e) => panic!("{test}: {ENV_DEVICE}: {}", chain(&e)),
    }
}

/// A global allocator for tests that counts the allocations made inside [`count_allocations`]
/// on the calling thread; otherwise it is the system allocator. Install it in a test binary with
/// `#[global_allocator] static A: CountingAllocator = CountingAllocator;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with`: during thread teardown the values may be gone; then nothing is counted.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; counting touches only const-initialised thread-local
// `Cell`s, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we forward.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded contract, as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded contract; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Run `f` and return its result with the number of heap allocations it made on this thread
/// (meaningful only when [`CountingAllocator`] is the global allocator; otherwise 0). Counting
/// is per thread, so tests running in parallel do not disturb each other; sections on one
/// thread must not nest.
pub fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCATIONS.with(Cell::get))
}
