//! How soon memory goes back to the OS: the delay after which unused dirty pages and cached
//! huge spans are returned, and the dirty bytes an arena (and the huge span cache) may
//! always keep. Set once by the process heap's initialisation from `COREHEAP_PURGE_MS` and
//! `COREHEAP_DIRTY_MAX`, else `CoreHeap::purge_delay_ms`/`dirty_max` (`settings::resolve`);
//! shared heaps and tests use the defaults.
//!
//! Invariant: the values only change before the first arena or span cache reads them (the
//! heap's initialisation runs before any chunk is mapped), so Relaxed loads suffice.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// The default delay: a dirty run or a cached huge span unused this long is returned.
pub const PURGE_MS: u32 = 1000;
/// The default dirty bytes always kept: 64 MiB.
pub const DIRTY_MAX: usize = 64 << 20;

static DELAY: AtomicU32 = AtomicU32::new(PURGE_MS);
static DIRTY: AtomicUsize = AtomicUsize::new(DIRTY_MAX);

/// Sets the policy (the process heap's initialisation, before any chunk is mapped).
pub fn set(purge_ms: u32, dirty_max: usize) {
    DELAY.store(purge_ms, Ordering::Relaxed);
    DIRTY.store(dirty_max, Ordering::Relaxed);
}

/// Milliseconds after which unused dirty pages and cached huge spans are returned.
#[inline]
pub fn purge_ms() -> u32 {
    DELAY.load(Ordering::Relaxed)
}

/// Dirty bytes an arena always may keep (beyond it, an eighth of what it maps), and the most
/// bytes of huge spans kept for reuse.
#[inline]
pub fn dirty_max() -> usize {
    DIRTY.load(Ordering::Relaxed)
}
