//! `GlobalAlloc` for Rust programs: routing only, and the builder of the settings a program
//! chooses. Without the backend (`build.rs`), forwarding to the system allocator.

use core::alloc::{GlobalAlloc, Layout};

#[cfg(coreheap_backend)]
use crate::heap::HEAP;
use crate::overrides::Overrides;

/// The coreheap allocator. Every instance shares the one process heap.
///
/// On targets without coreheap's backend ([`BACKEND`](crate::BACKEND) false: anything but
/// Linux on x86_64 or aarch64) it forwards every call to `std::alloc::System`, and the
/// settings below are accepted and ignored.
///
/// ```no_run
/// #[global_allocator]
/// static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();
/// ```
///
/// # Settings
/// A program may choose settings with the `const` builder methods, each the counterpart of a
/// `COREHEAP_*` variable:
///
/// ```no_run
/// #[global_allocator]
/// static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new()
///     .arenas(4)
///     .purge_delay_ms(200)
///     .dirty_max(16 << 20);
/// ```
///
/// Precedence: **the environment wins over the builder, the builder over the defaults**, so
/// that an operator can still tune a shipped binary. A bad value in the environment is
/// reported on stderr as always, and then the builder's value, if it chose one, is used
/// instead of the default: the report names it (`using 7 (set by the program)`).
///
/// The values reach the heap through the allocation that initialises it: the first one made
/// through this `CoreHeap` (in a program whose global allocator it is, the program's first
/// allocation). Only that first initialisation uses them: the values of other `CoreHeap`
/// instances, or anything that initialises the heap otherwise (`coreheap::stats()` or
/// `arena_count()` called before any allocation, the C interface), do not change them
/// afterwards. They cost nothing on the fast paths: only the out-of-line slow path receives
/// a pointer to them.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreHeap {
    ov: Overrides,
}

impl CoreHeap {
    /// The allocator with every setting from the environment, else its default.
    pub const fn new() -> Self {
        CoreHeap {
            ov: Overrides::NONE,
        }
    }

    /// Uses `n` arenas instead of one per CPU the process may run on (`COREHEAP_ARENAS`;
    /// clamped to 1 to `settings::MAX_ARENAS`, 4096).
    pub const fn arenas(mut self, n: usize) -> Self {
        self.ov.arenas = Some(n);
        self
    }

    /// Returns unused dirty pages and cached huge spans to the OS after `ms` milliseconds
    /// (`COREHEAP_PURGE_MS`, default 1000; at most 3 600 000).
    pub const fn purge_delay_ms(mut self, ms: u32) -> Self {
        self.ov.purge_ms = Some(ms);
        self
    }

    /// The dirty bytes an arena may always keep, and the most bytes of huge spans kept for
    /// reuse (`COREHEAP_DIRTY_MAX`, default 64 MiB; at most 1 TiB).
    pub const fn dirty_max(mut self, bytes: usize) -> Self {
        self.ov.dirty_max = Some(bytes as u64);
        self
    }

    /// Debug mode: guard bytes and fill patterns, checked at free and realloc
    /// (`COREHEAP_DEBUG`; turns the per-CPU caches off).
    pub const fn debug(mut self, on: bool) -> Self {
        self.ov.debug = Some(on);
        self
    }

    /// Whether the lock-free per-CPU caches may be used where rseq is available
    /// (`COREHEAP_RSEQ`, default on).
    pub const fn rseq(mut self, on: bool) -> Self {
        self.ov.rseq = Some(on);
        self
    }

    /// Prints the statistics report to stderr at exit (`COREHEAP_STATS`, default off).
    pub const fn stats_at_exit(mut self, on: bool) -> Self {
        self.ov.stats = Some(on);
        self
    }
}

#[cfg(coreheap_backend)]
// SAFETY: blocks come from the process heap, which returns null or a block of at least
// `layout.size()` bytes aligned to `layout.align()`, valid until freed; realloc keeps the
// contents up to the smaller size; nothing here panics or allocates through another path.
unsafe impl GlobalAlloc for CoreHeap {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.alloc_with(layout.size(), layout.align(), Some(&self.ov))
            .0
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller hands back a block this allocator returned, with the layout
        // it was allocated or last reallocated with.
        unsafe { HEAP.free_sized(ptr, layout.size(), layout.align()) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        HEAP.alloc_zeroed_with(layout.size(), layout.align(), Some(&self.ov))
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller owns `ptr`, a block of this allocator, so the heap is
        // initialised already.
        unsafe { HEAP.realloc(ptr, new_size, layout.align(), true) }
    }
}

#[cfg(not(coreheap_backend))]
// SAFETY: every call goes to the system allocator with the same arguments, so its
// `GlobalAlloc` guarantees are this one's.
unsafe impl GlobalAlloc for CoreHeap {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees (a layout of non-zero size) passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` as the caller promises.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}
