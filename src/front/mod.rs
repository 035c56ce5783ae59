//! The front end: what every heap does the same way between its entry points and its arenas,
//! written once over a [`Backend`].
//!
//! A heap (the process heap in `heap/`, a shared heap in `shm/`) is a table of arenas over
//! one page source. The front end routes a request to an arena or to a huge block, routes a
//! free to the arena that owns the block (or the huge-block code), answers `usable_size`,
//! decides when `realloc` can stay in place, and reports misuse. What a heap adds on top is
//! its own: the process heap's per-CPU caches, bootstrap buffer and debug mode; the shared
//! heap's file and recovery.
//!
//! Contract shared by every function here: nothing allocates through a global allocator,
//! nothing panics, and a pointer that is not a block of the heap aborts with a one-line
//! message naming it (`report.rs`), never corrupts.

pub(crate) mod huge;
pub(crate) mod report;

use core::ptr;

use crate::arena::{lookup, Arena, ArenaLock, ArenaStats, Lookup, LARGE_ALIGN_MAX, ORPHAN};
use crate::chunk::Block;
use crate::size_class::{class_for, class_size, LARGE_MAX, PAGE, SMALL_MAX, TABLE_MAX};
use crate::source::PageSource;

pub(crate) use huge::HugeCounters;

/// What `realloc` reports for a block that carries the double-free mark and is free.
const REALLOC_FREED: &[u8] = b"realloc(): invalid pointer (block already freed)";

/// A heap as the front end sees it.
///
/// Invariants an implementation keeps: `arena(i)` is valid for every `i < arena_count()`
/// for as long as the backend is; every chunk header of the source names an arena below
/// `arena_count()`, or [`ORPHAN`] in a shared source; `mark` never changes.
pub(crate) trait Backend {
    type Source: PageSource<Lock: ArenaLock>;

    /// Where the heap's chunks and huge spans come from.
    fn source(&self) -> &Self::Source;
    /// The number of arenas (at least 1).
    fn arena_count(&self) -> usize;
    /// Arena `i`.
    ///
    /// pre: `i < arena_count()`.
    fn arena(&self, i: usize) -> &Arena<Self::Source>;
    /// The arena the calling thread allocates from now.
    fn current_arena(&self) -> usize;
    /// The double-free mark written into freed small blocks.
    fn mark(&self) -> usize;
    /// The counters of the heap's huge blocks.
    fn huge_counters(&self) -> &HugeCounters;
    /// Whether the heap may be written (a shared heap may be mapped read-only).
    fn writable(&self) -> bool {
        true
    }

    /// The heap's own allocation entry point (through its caches, if it has any):
    /// `realloc` takes its new block from here.
    fn alloc(&self, size: usize, align: usize) -> (*mut u8, bool);
    /// The heap's own free entry point: `realloc` gives the old block back through it.
    ///
    /// # Safety
    /// `p` is a live block of this heap that the caller gives up.
    unsafe fn free(&self, p: *mut u8);

    /// A block of `arena` carries the double-free mark: abort with `msg` if it is free (on
    /// any list the heap keeps); otherwise it is live data that happens to match. By
    /// default the arena's own lists are searched; a heap with caches searches them too.
    ///
    /// # Safety
    /// `what` is `lookup(p)`, a small or large block of `arena < arena_count()`.
    unsafe fn confirm_double_free(&self, p: *mut u8, what: Lookup, arena: u32, msg: &[u8]) {
        // SAFETY: by the contract.
        unsafe {
            self.arena(arena as usize)
                .confirm_double_free(self.source(), p, what, msg)
        }
    }

    /// For a pointer the page source does not know, the bytes readable from it if the heap
    /// handed it out anyway (the process heap's bootstrap blocks, which are never freed);
    /// `None` for anything else.
    fn unmanaged(&self, _p: *const u8) -> Option<usize> {
        None
    }
}

/// Allocates without per-CPU caches: from the calling thread's arena, from another arena
/// when that one cannot get memory, or as a huge block. Returns the block (null when no
/// arena can serve it) and whether it reads zero.
pub(crate) fn alloc_locked<B: Backend>(b: &B, size: usize, align: usize) -> (*mut u8, bool) {
    if !b.writable() {
        return (ptr::null_mut(), false);
    }
    if size <= LARGE_MAX && align <= LARGE_ALIGN_MAX {
        let size = size.max(1);
        let first = b.current_arena();
        let a = b.arena(first);
        if a.held_by_caller() {
            return alloc_elsewhere(b, first, size, align);
        }
        let r = a.alloc(b.source(), size, align);
        if r.0.is_null() && b.arena_count() > 1 {
            return alloc_elsewhere(b, first, size, align);
        }
        r
    } else {
        huge::alloc(b, size, align, false)
    }
}

/// A huge block (`size > LARGE_MAX` or `align > LARGE_ALIGN_MAX`) that reads zero, clearing
/// only what its span may hold of old data; null on failure.
#[cold]
pub(crate) fn alloc_huge_zeroed<B: Backend>(b: &B, size: usize, align: usize) -> *mut u8 {
    if !b.writable() {
        return ptr::null_mut();
    }
    huge::alloc(b, size, align, true).0
}

/// Arena `first` could not serve the request: it had no memory, or the calling thread
/// holds its lock already (a signal handler that interrupted an allocation; waiting would
/// never end). The others in turn (their free runs and cached pages may serve what the OS
/// or the file will not), skipping any whose lock this thread holds. The block stays owned
/// by the arena it came from. Null (ENOMEM) when none can serve; a re-entered request that
/// no other arena serves aborts with a message naming the cause rather than fail silently.
#[cold]
#[inline(never)]
fn alloc_elsewhere<B: Backend>(b: &B, first: usize, size: usize, align: usize) -> (*mut u8, bool) {
    let n = b.arena_count();
    let r = (1..n)
        .map(|k| b.arena((first + k) % n))
        .filter(|a| !a.held_by_caller())
        .map(|a| a.alloc(b.source(), size, align))
        .find(|r| !r.0.is_null())
        .unwrap_or((ptr::null_mut(), false));
    if r.0.is_null() && b.arena(first).held_by_caller() {
        crate::os::fatal(
            b"coreheap: malloc re-entered (from a signal handler?) on a thread that holds its arena's lock, and no other arena could serve it; aborting\n",
        );
    }
    r
}

/// Frees `p`, which [`lookup`] found to be `what`, without per-CPU caches: to the arena that
/// owns it, or the huge-block code. Aborts naming `p` with `what` (e.g. `free(): invalid
/// pointer`) if it is no block of this heap.
///
/// # Safety
/// `found == lookup(p)`; if `p` is a block of this heap, the caller gives it up.
pub(crate) unsafe fn free_locked<B: Backend>(b: &B, p: *mut u8, found: Lookup, what: &[u8]) {
    match found {
        Lookup::Small { arena, .. } | Lookup::Large { arena, .. }
            if (arena as usize) < b.arena_count() =>
        {
            let local = arena as usize == b.current_arena();
            // SAFETY: `lookup` found a live block of arena `arena`, which the caller gives up.
            unsafe {
                b.arena(arena as usize)
                    .free(b.source(), p, found, b.mark(), local)
            }
        }
        // A block of a chunk that a shared heap's recovery gave up: dropped (see
        // `Arena::recover`).
        Lookup::Small { arena: ORPHAN, .. } | Lookup::Large { arena: ORPHAN, .. }
            if <B::Source as PageSource>::SHARED => {}
        // SAFETY: `h` is the live header of the huge block `p`, which the caller gives up.
        Lookup::Huge(h) => unsafe { huge::free(b, h, p) },
        _ => {
            if b.unmanaged(p).is_none() {
                report::invalid(b.source(), p, what)
            }
        }
    }
}

/// The bytes the heap gave block `p` (0 for null). Aborts if `p` is not a block of the heap.
pub(crate) fn usable_size<B: Backend>(b: &B, p: *mut u8) -> usize {
    if p.is_null() {
        return 0;
    }
    match lookup(b.source(), p) {
        // SAFETY: `lookup` returned a live run head.
        Lookup::Small { run, .. } => class_size(unsafe { (*run).class() }),
        // SAFETY: as above.
        Lookup::Large { run, .. } => unsafe { (*run).npages as usize * PAGE },
        // SAFETY: `h` is the live huge header of `p`.
        Lookup::Huge(h) => unsafe { huge::usable(b.source(), h, p) },
        Lookup::Invalid => match b.unmanaged(p) {
            Some(_) => 0,
            None => report::invalid(b.source(), p, b"malloc_usable_size(): invalid pointer"),
        },
    }
}

/// The largest class whose blocks C's `realloc` always moves when they shrink to fit a
/// smaller class. Above it a block that keeps at least half of its class stays: moving it
/// copies at least half a KiB, and a workload that halves its blocks (the `realloc`
/// workload) ran 3.6% longer moving every one, 1% with this exception, while python's peak
/// (objects and strings below it) was the same (`docs/size-classes.md`, session 8).
pub(crate) const SHRINK_MOVE_MAX: usize = 1024;

/// Resizes `p` (not null) to `size` bytes aligned to `align`, in place when it can. Returns
/// the block, or null (and `p` is untouched) when memory is exhausted.
///
/// A small block stays in place only while `size` still needs its class: one that shrinks
/// to fit a smaller class moves into it (a block shrunk in place would keep its class's
/// bytes for as long as it lives; python's strings, built in an over-allocated buffer and
/// then shrunk, kept 160-byte blocks for 60-100-byte strings). With `exact` (for callers
/// that free with the block's layout, as Rust's `dealloc` does) the block left has exactly
/// the class `size` maps to, and a large block that shrinks to a small size moves. Without
/// it (the C interface, shared heaps) a block whose class is not aligned to `align` but
/// whose address is stays too, and so does a block of a class above [`SHRINK_MOVE_MAX`]
/// that keeps at least half of it.
///
/// # Safety
/// `p` is a live block of this heap that the caller owns.
pub(crate) unsafe fn realloc<B: Backend>(
    b: &B,
    p: *mut u8,
    size: usize,
    align: usize,
    exact: bool,
) -> *mut u8 {
    let aligned = p as usize & (align - 1) == 0;
    let what = lookup(b.source(), p);
    // SAFETY: by the contract; `what` is `lookup(p)`.
    unsafe { confirm_not_freed(b, p, what) };
    let old = match what {
        Lookup::Small { run, .. } => {
            // SAFETY: a live small run head.
            let class = unsafe { (*run).class() };
            let cs = class_size(class);
            let in_place = if exact {
                size <= SMALL_MAX && align <= PAGE && class_for(size.max(1), align) == class
            } else {
                size <= cs
                    && ((cs > SHRINK_MOVE_MAX && size >= cs / 2)
                        || align > PAGE
                        || class_for(size.max(1), align) >= class)
            };
            if aligned && in_place {
                return p;
            }
            cs
        }
        Lookup::Large { arena, run } => {
            if aligned
                && size <= LARGE_MAX
                && (!exact || size > SMALL_MAX || align > PAGE)
                && (arena as usize) < b.arena_count()
                && b.writable()
            {
                // SAFETY: `run` heads the live large block `p`, which the caller owns.
                if unsafe { b.arena(arena as usize).resize_large(b.source(), run, size) } {
                    return p;
                }
            }
            // SAFETY: as above.
            unsafe { (*run).npages as usize * PAGE }
        }
        Lookup::Huge(h) => {
            if aligned && size > LARGE_MAX {
                // SAFETY: `h` is the live header of `p`, which the caller owns.
                let q = unsafe { huge::realloc(b, h, p, size) };
                if !q.is_null() {
                    return q;
                }
            }
            // SAFETY: as above.
            unsafe { huge::usable(b.source(), h, p) }
        }
        Lookup::Invalid => match b.unmanaged(p) {
            Some(n) => n,
            None => report::invalid(b.source(), p, b"realloc(): invalid pointer"),
        },
    };
    // A C block that must move to more than the class table's sizes takes a page run, which
    // a later growth can extend in place; in a large class it would move at every step (the
    // `realloc` workload's doublings took 11% longer so). Rust's `realloc` keeps the class
    // its `dealloc` computes from the layout.
    let mut q = ptr::null_mut();
    if !exact && size > TABLE_MAX && size <= LARGE_MAX && align <= PAGE && b.writable() {
        let a = b.arena(b.current_arena());
        if !a.held_by_caller() {
            q = a.alloc_run(b.source(), size, align).0;
        }
    }
    if q.is_null() {
        q = b.alloc(size, align).0;
    }
    if q.is_null() {
        return q;
    }
    // SAFETY: both blocks are live and distinct; we copy no more than either holds.
    unsafe {
        ptr::copy_nonoverlapping(p, q, old.min(size));
        b.free(p);
    }
    q
}

/// `realloc` of a block that carries the double-free mark: aborts if it is free (a live
/// block whose data happens to match passes).
///
/// # Safety
/// `what == lookup(p)`; if `p` is a block of this heap, the caller owns it.
pub(crate) unsafe fn confirm_not_freed<B: Backend>(b: &B, p: *mut u8, what: Lookup) {
    if let Lookup::Small { arena, .. } | Lookup::Large { arena, .. } = what {
        // SAFETY: a live block of at least 16 bytes: its mark word is readable.
        if (arena as usize) < b.arena_count() && unsafe { (*p.cast::<Block>()).mark } == b.mark() {
            // SAFETY: `what` is `lookup(p)`, a block of `arena`.
            unsafe { b.confirm_double_free(p, what, arena, REALLOC_FREED) };
        }
    }
}

/// Calls `f` with each arena's counters, one arena at a time (no lock is held while `f` runs).
pub(crate) fn for_each_arena<B: Backend>(b: &B, mut f: impl FnMut(ArenaStats)) {
    for i in 0..b.arena_count() {
        f(b.arena(i).stats(b.source()));
    }
}

/// Verifies every arena's invariants; the first violation.
pub(crate) fn check<B: Backend>(b: &B) -> Result<(), &'static str> {
    (0..b.arena_count()).try_for_each(|i| b.arena(i).check(b.source()))
}

/// Returns every arena's pending frees to their runs and unused dirty pages to the source,
/// then the spans the source keeps for reuse.
pub(crate) fn trim<B: Backend>(b: &B) {
    for i in 0..b.arena_count() {
        b.arena(i).trim(b.source());
    }
    b.source().release_cached();
}

/// The arena that owns `p`, if it is a live small or large block of the heap.
pub(crate) fn owner_arena<B: Backend>(b: &B, p: *const u8) -> Option<usize> {
    match lookup(b.source(), p) {
        Lookup::Small { arena, .. } | Lookup::Large { arena, .. } => Some(arena as usize),
        _ => None,
    }
}
