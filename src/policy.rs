//! How soon memory goes back to the OS: the delay after which unused dirty pages and cached
//! huge spans are returned, and the dirty bytes an arena (and the huge span cache) may
//! always keep. Set by the process heap's initialisation from `COREHEAP_PURGE_MS` and
//! `COREHEAP_DIRTY_MAX`, else `CoreHeap::purge_delay_ms`/`dirty_max` (`settings::resolve`),
//! and at run time by `mallopt(M_TRIM_THRESHOLD)` (the dirty bytes); shared heaps and tests
//! use the defaults.
//!
//! The values may change at any time: each is one atomic, read (Relaxed: it orders nothing
//! else) where it is used, on slow paths only (the decay tick, a page heap's or the span
//! cache's limit check), so a change applies from the next such check on.

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
    set_dirty_max(dirty_max);
}

/// Sets the dirty bytes always kept (`mallopt(M_TRIM_THRESHOLD)`); applies from the next
/// limit check of each page heap and of the span cache.
pub fn set_dirty_max(bytes: usize) {
    DIRTY.store(bytes, Ordering::Relaxed);
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
