//! A counting global allocator for the examples that say what the agent's heap holds: live heap
//! bytes, and the highest live heap between two [`peak_kib`] calls.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live heap bytes, to say what each structure costs.
struct Counted;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        PEAK.fetch_max(live + layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counted = Counted;

/// The live heap, KiB.
pub fn live_kib() -> usize {
    LIVE.load(Ordering::Relaxed) / 1024
}

/// The highest live heap since the last call (then reset to the live heap), KiB.
#[allow(dead_code, reason = "not every example reads the peak")]
pub fn peak_kib() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.swap(live, Ordering::Relaxed) / 1024
}
