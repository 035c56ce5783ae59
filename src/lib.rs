//! coreheap: a memory allocator with one arena per CPU.
//!
//! A thread allocates from the arena of the CPU it runs on now (`sched_getcpu`), so threads
//! on different cores rarely share a lock or a written cache line. Small requests (up to
//! 8 KiB) are rounded to a power of two and served from page runs split into equal blocks;
//! large ones (up to 2 MiB) are whole pages, best fit from the arena's free page runs; larger
//! ones are mapped directly. A freed block goes back to the arena that owns it, found in O(1)
//! from the header of its chunk, through a lock-free stack that the owner drains.
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();
//! ```
//!
//! # Layout of the code
//! Layers, each importing only those below it (`docs/design.md` has the map and the arrows):
//! - `os`: the only caller of the OS (memory, files, futex and pthread locks, rseq, the
//!   environment, time), with a written contract; `settings`: every `COREHEAP_*` variable.
//! - `source`: where an engine's memory comes from (`PageSource`): the seam for heaps in
//!   shared memory; `OsSource` and the chunk registry.
//! - The engine: `size_class`, `chunk` (headers, pointer -> header), `large` (page heap),
//!   `small` (size-class runs), `remote` (frees on their way back), `arena` (one arena, its
//!   lock chosen by the page source, lookup, recovery), `lock`.
//! - `cpucache`: the per-CPU caches and their rseq critical sections.
//! - `front`: what every heap does the same way (routing, usable size, realloc, huge
//!   blocks, misuse reports) over a `Backend`.
//! - `heap`: the process heap (init, fast paths, fork); `shm`: heaps in shared files.
//! - `global`: `GlobalAlloc`; `c_api`: the C interface; `stats`: counters and the report.
//!
//! See `docs/design.md` for the invariants and the lock order.
//!
//! # Targets
//! The allocator (the *backend*) is built for Linux on x86_64 and aarch64, with glibc or
//! musl; its rseq fast path only on x86_64 with glibc, the locked path elsewhere (`build.rs`
//! decides, at compile time). On every other target [`CoreHeap`] forwards to
//! `std::alloc::System` (its builder's settings are ignored), [`BACKEND`] is false,
//! [`trim`] does nothing and [`fast_path`] and [`rseq_registered`] say false; the rest of
//! the API (statistics, heap checks, `usable_size`, `raw`, `shm`, `settings`, the size-class
//! constants) exists only with the backend. `COREHEAP_FORCE_FALLBACK=1` in the environment
//! of the build selects the fallback on Linux too (CI tests it that way).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(coreheap_backend)]
mod arena;
#[cfg(coreheap_backend)]
#[doc(hidden)]
pub mod c_api;
#[cfg(coreheap_backend)]
mod chunk;
#[cfg(coreheap_backend)]
mod cpucache;
#[cfg(coreheap_backend)]
mod debug;
#[cfg(coreheap_backend)]
mod diag;
#[cfg(coreheap_backend)]
mod front;
mod global;
#[cfg(coreheap_backend)]
mod heap;
#[cfg(coreheap_backend)]
mod large;
#[cfg(coreheap_backend)]
mod lock;
#[cfg(coreheap_backend)]
mod os;
mod overrides;
#[cfg(coreheap_backend)]
mod policy;
#[cfg(coreheap_backend)]
mod remote;
#[cfg(coreheap_backend)]
pub mod settings;
#[cfg(coreheap_backend)]
pub mod shm;
#[cfg(coreheap_backend)]
mod size_class;
#[cfg(coreheap_backend)]
mod small;
#[cfg(coreheap_backend)]
mod source;
#[cfg(coreheap_backend)]
mod stats;
#[cfg(all(test, coreheap_backend))]
mod test_support;

#[cfg(coreheap_backend)]
pub use arena::ArenaStats;
#[cfg(coreheap_backend)]
pub use cpucache::CPU_CACHE_BYTES;
pub use global::CoreHeap;

#[cfg(coreheap_backend)]
pub use size_class::{
    class_align, class_size, CHUNK, LARGE_MAX, NUM_CLASSES, PAGE, SMALL_MAX, TABLE_MAX,
};
#[cfg(coreheap_backend)]
pub use stats::Stats;

#[cfg(coreheap_backend)]
use heap::HEAP;

/// Whether this build has coreheap's allocator: Linux on x86_64 or aarch64, unless built
/// with `COREHEAP_FORCE_FALLBACK=1`. Without it [`CoreHeap`] forwards to
/// `std::alloc::System` (crate documentation, "Targets").
pub const BACKEND: bool = cfg!(coreheap_backend);

/// A snapshot of every arena's counters and of the directly mapped blocks. Pending frees are
/// returned to their arenas first, so the counts are exact at the moment each arena is read.
#[cfg(coreheap_backend)]
pub fn stats() -> Stats {
    HEAP.stats()
}

/// Writes the human-readable statistics report to file descriptor `fd` (2 for stderr)
/// without allocating.
#[cfg(coreheap_backend)]
pub fn write_report(fd: i32) {
    HEAP.write_report(fd)
}

/// Writes the statistics as one JSON object (see `COREHEAP_STATS=json`) to file descriptor
/// `fd` without allocating.
#[cfg(coreheap_backend)]
pub fn write_json(fd: i32) {
    HEAP.write_json(fd)
}

/// The arena that owns the block at `p`, or `None` if `p` is not a live small or large block
/// of coreheap (directly mapped blocks belong to no arena).
#[cfg(coreheap_backend)]
pub fn owner_arena<T: ?Sized>(p: *const T) -> Option<usize> {
    HEAP.owner_arena(p.cast())
}

/// Whether `p` is the start of a live block of coreheap.
#[cfg(coreheap_backend)]
pub fn owns<T: ?Sized>(p: *const T) -> bool {
    HEAP.owns(p.cast())
}

/// The arena of the CPU the calling thread runs on now.
#[cfg(coreheap_backend)]
pub fn current_arena() -> usize {
    HEAP.current_arena()
}

/// The number of arenas (initialising the heap if needed).
#[cfg(coreheap_backend)]
pub fn arena_count() -> usize {
    HEAP.arena_count()
}

/// Verifies the invariants of every arena: run lists, counts, free page runs sorted into the
/// right lists, neither overlapping nor adjacent. Returns the first violation.
#[cfg(coreheap_backend)]
pub fn check_heap() -> Result<(), &'static str> {
    HEAP.check()
}

/// Whether small blocks go through the lock-free per-CPU caches (Linux rseq, x86_64).
/// Decided at the heap's first allocation; off when glibc registered no rseq area, or with
/// `COREHEAP_RSEQ=0`; always off without the backend ([`BACKEND`]).
pub fn fast_path() -> bool {
    #[cfg(coreheap_backend)]
    return HEAP.fast_path();
    #[cfg(not(coreheap_backend))]
    false
}

/// Whether glibc registered an rseq area for the process (2.35 and later, on a kernel that
/// has rseq, unless `GLIBC_TUNABLES=glibc.pthread.rseq=0`) and this build can use it (x86_64
/// with glibc; false elsewhere): the condition for [`fast_path`] besides `COREHEAP_RSEQ`.
pub fn rseq_registered() -> bool {
    #[cfg(coreheap_rseq)]
    return os::rseq::area_offset().is_some();
    #[cfg(not(coreheap_rseq))]
    false
}

/// Returns the blocks every CPU's cache holds and the pending frees to their arenas, and
/// unused dirty pages to the OS. To reach another CPU's cache the calling thread runs there
/// for a moment (its affinity is changed and then put back; `docs/design.md`, "Per-CPU
/// caches"). Does nothing without the backend ([`BACKEND`]).
pub fn trim() {
    #[cfg(coreheap_backend)]
    HEAP.trim()
}

/// The number of usable bytes of the block at `p` (at least its requested size).
///
/// # Safety
/// `p` is null or a live block of coreheap; anything else aborts the process.
#[cfg(coreheap_backend)]
pub unsafe fn usable_size(p: *mut u8) -> usize {
    HEAP.usable_size(p)
}

/// Raw entry points for the C interface (the preload library). Same semantics as
/// `GlobalAlloc` without a `Layout`: `free` accepts null and aborts on pointers coreheap did
/// not return.
#[cfg(coreheap_backend)]
pub mod raw {
    use crate::heap::HEAP;

    /// `size` bytes aligned to `align` (a power of two); null on failure.
    #[inline]
    pub fn alloc(size: usize, align: usize) -> *mut u8 {
        HEAP.alloc(size, align).0
    }

    /// Zeroed `size` bytes aligned to `align`; null on failure.
    #[inline]
    pub fn alloc_zeroed(size: usize, align: usize) -> *mut u8 {
        HEAP.alloc_zeroed(size, align)
    }

    /// # Safety
    /// `p` is null or a live block of coreheap that the caller gives up.
    #[inline]
    pub unsafe fn free(p: *mut u8) {
        // SAFETY: passed on from the caller.
        unsafe { HEAP.free(p) }
    }

    /// # Safety
    /// `p` is null or a live block of coreheap that the caller owns.
    #[inline]
    pub unsafe fn realloc(p: *mut u8, size: usize, align: usize) -> *mut u8 {
        // SAFETY: passed on from the caller.
        unsafe { HEAP.realloc(p, size, align, false) }
    }
}
