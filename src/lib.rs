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
//! - [`os`]: the only caller of the OS (memory, files, futex and pthread locks, rseq, the
//!   environment, time), with a written contract; `settings`: every `COREHEAP_*` variable.
//! - [`source`]: where an engine's memory comes from (`PageSource`): the seam for heaps in
//!   shared memory; `OsSource` and the chunk registry.
//! - The engine: `size_class`, `chunk` (headers, pointer -> header), `large` (page heap),
//!   `small` (size-class runs), `remote` (frees on their way back), `arena` (one arena, its
//!   lock chosen by the page source, lookup, recovery), `lock`.
//! - `cpucache`: the per-CPU caches and their rseq critical sections.
//! - `front`: what every heap does the same way (routing, usable size, realloc, huge
//!   blocks, misuse reports) over a `Backend`.
//! - `heap`: the process heap (init, fast paths, fork); [`shm`]: heaps in shared files.
//! - `global`: `GlobalAlloc`; [`c_api`]: the C interface; `stats`: counters and the report.
//!
//! See `docs/design.md` for the invariants and the lock order.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod arena;
#[doc(hidden)]
pub mod c_api;
mod chunk;
mod cpucache;
mod debug;
mod diag;
mod front;
mod global;
mod heap;
mod large;
mod lock;
mod os;
mod policy;
mod remote;
pub mod settings;
pub mod shm;
mod size_class;
mod small;
mod source;
mod stats;
#[cfg(test)]
mod test_support;

pub use arena::ArenaStats;
pub use cpucache::CPU_CACHE_BYTES;
pub use global::CoreHeap;
pub use size_class::{class_align, class_size, CHUNK, LARGE_MAX, NUM_CLASSES, PAGE, SMALL_MAX};
pub use stats::Stats;

use heap::HEAP;

/// A snapshot of every arena's counters and of the directly mapped blocks. Pending frees are
/// returned to their arenas first, so the counts are exact at the moment each arena is read.
pub fn stats() -> Stats {
    HEAP.stats()
}

/// Writes the human-readable statistics report to file descriptor `fd` (2 for stderr)
/// without allocating.
pub fn write_report(fd: i32) {
    HEAP.write_report(fd)
}

/// Writes the statistics as one JSON object (see `COREHEAP_STATS=json`) to file descriptor
/// `fd` without allocating.
pub fn write_json(fd: i32) {
    HEAP.write_json(fd)
}

/// The arena that owns the block at `p`, or `None` if `p` is not a live small or large block
/// of coreheap (directly mapped blocks belong to no arena).
pub fn owner_arena<T: ?Sized>(p: *const T) -> Option<usize> {
    HEAP.owner_arena(p.cast())
}

/// Whether `p` is the start of a live block of coreheap.
pub fn owns<T: ?Sized>(p: *const T) -> bool {
    HEAP.owns(p.cast())
}

/// The arena of the CPU the calling thread runs on now.
pub fn current_arena() -> usize {
    HEAP.current_arena()
}

/// The number of arenas (initialising the heap if needed).
pub fn arena_count() -> usize {
    HEAP.arena_count()
}

/// Verifies the invariants of every arena: run lists, counts, free page runs sorted into the
/// right lists, neither overlapping nor adjacent. Returns the first violation.
pub fn check_heap() -> Result<(), &'static str> {
    HEAP.check()
}

/// Whether small blocks go through the lock-free per-CPU caches (Linux rseq, x86_64).
/// Decided at the heap's first allocation; off when glibc registered no rseq area, or with
/// `COREHEAP_RSEQ=0`.
pub fn fast_path() -> bool {
    HEAP.fast_path()
}

/// Whether glibc registered an rseq area for the process (2.35 and later, on a kernel that
/// has rseq, unless `GLIBC_TUNABLES=glibc.pthread.rseq=0`): the condition for
/// [`fast_path`] besides `COREHEAP_RSEQ`.
pub fn rseq_registered() -> bool {
    os::rseq::area_offset().is_some()
}

/// Returns pending frees to their arenas and unused dirty pages to the OS.
pub fn trim() {
    HEAP.trim()
}

/// The number of usable bytes of the block at `p` (at least its requested size).
///
/// # Safety
/// `p` is null or a live block of coreheap; anything else aborts the process.
pub unsafe fn usable_size(p: *mut u8) -> usize {
    HEAP.usable_size(p)
}

/// Raw entry points for the C interface (the preload library). Same semantics as
/// `GlobalAlloc` without a `Layout`: `free` accepts null and aborts on pointers coreheap did
/// not return.
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
