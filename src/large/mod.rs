//! The page heap of one arena: free page runs, best fit, coalescing, chunks to and from the
//! page source.
//!
//! Every page of a chunk has a *dirty* bit (`ChunkHeader::dirty`): set while the page is free
//! and may hold data or be resident; clear for a page in use and for a free page that reads
//! zero and costs no memory (purged, or never touched since the chunk was mapped). Free runs
//! merge with their free neighbours whatever their pages' state, so two free runs are never
//! adjacent and fragmentation never makes the heap map a chunk for a run that adjacent
//! dirty and clean pages could give. A free run is *dirty* if it holds a dirty page,
//! *clean* otherwise; the kind only chooses its list.
//!
//! Free runs of each kind are kept sorted by length in exact-length lists, one per possible
//! length (1 ..= `USABLE_PAGES` pages), with a bitmap of the non-empty lists. Best fit is the
//! first set bit at or above the wanted length: at most `BITMAP_WORDS` (16) word scans,
//! however many free runs there are. Dirty runs are tried first (reusing resident pages
//! costs no page faults); within a length the most recently freed run is used first. A run
//! taken reads zero where its bits were clear; [`PageHeap::alloc_run`] says whether any was
//! set (then the caller must not count on zeros anywhere in it).
//!
//! Purging is deferred. Freeing never calls the page source except to unmap a wholly free
//! chunk beyond the spares. A run records when dirty pages were last freed into it (in
//! `bump`, unused by free runs; a merge stamps the merged run with the time); the arena's
//! slow paths call [`PageHeap::decay`] with the time, and every [`TICK_MS`] it purges the
//! dirty pages of the runs nobody reused for the purge delay (`policy::purge_ms`, 1 s by
//! default), one source call per span of dirty pages, and the run becomes clean. Once the
//! dirty pages exceed [`PageHeap::dirty_limit`] (64 MiB, or 1/8 of what the heap has mapped
//! if more), every dirty page is purged at once. So a run freed and reallocated soon is
//! never purged. A purge the page source refuses (an `mlock`ed process, pages other than
//! 4 KiB, any shared heap) leaves its pages dirty and stops further purging until an
//! explicit trim.
//!
//! Invariants (checked by [`PageHeap::check`]):
//! - a run is on list `(k, n)` iff it is free, `npages == n` and `k` is whether any of its
//!   pages' dirty bits is set (its head's `dirty`); bit `n` of bitmap `k` is set iff that
//!   list is non-empty;
//! - no two free runs are adjacent (a freed run merges with its free neighbours at once);
//! - a dirty bit is set only on a page of a free run;
//! - `dirty_pages` is the number of dirty bits set in the heap's chunks;
//! - a chunk's `free_pages` is the sum of `npages` over its free runs; `free_chunks` counts
//!   the chunks with `free_pages == USABLE_PAGES` (each one free run, then).
//!
//! The lists, the chunk list and the descriptors' links are [`Rel`]s: offsets from the page
//! source's base, which every method that follows them is given (`src.base()`, or `base`).
//! The heap lives wherever its arena does, possibly in memory that another process maps
//! elsewhere; the base never does.

use core::ptr;

use crate::chunk::{ChunkHeader, PageDesc, Rel, USABLE_PAGES};
use crate::size_class::PAGE;
use crate::source::PageSource;

mod check;
mod dirty;
mod lists;
mod purge;
mod runs;
#[cfg(test)]
mod tests;

const BITMAP_WORDS: usize = (USABLE_PAGES + 1).div_ceil(64);

/// A heap may keep `policy::dirty_max()` bytes dirty (64 MiB by default), and a heap that
/// has mapped more up to `mapped / DIRTY_RATIO` of it.
pub const DIRTY_RATIO: usize = 8;
/// How often, at most, the heap looks for dirty runs past the purge delay.
pub const TICK_MS: u32 = 100;

const CLEAN: usize = 0;
const DIRTY: usize = 1;

/// Counters of the page heap (guarded by the arena lock).
#[derive(Clone, Copy, Default, Debug)]
pub struct PageCounters {
    /// Bytes of chunks mapped from the page source now.
    pub mapped: usize,
    /// Chunks mapped and unmapped over the heap's life.
    pub chunks_mapped: u64,
    pub chunks_unmapped: u64,
    /// Bytes returned with purge calls over the heap's life.
    pub purged: u64,
    /// Purge rounds (dirty limit reached, or an explicit trim).
    pub purges: u64,
    /// Allocated page runs now (small and large).
    pub runs: usize,
}

/// See the module documentation.
pub struct PageHeap {
    /// `lists[k][n]`: free runs of kind `k` (`CLEAN`, or `DIRTY`: with a dirty page) and
    /// length `n`.
    lists: [[Rel<PageDesc>; USABLE_PAGES + 1]; 2],
    bitmap: [[u64; BITMAP_WORDS]; 2],
    /// The arena's chunks, linked through their headers.
    chunks: Rel<ChunkHeader>,
    /// Chunks that are entirely free (kept: at most [`Self::spare_chunks`]).
    free_chunks: usize,
    /// Dirty bits set in our chunks: free pages that may be resident.
    pub dirty_pages: usize,
    pub counters: PageCounters,
    /// The index written into the headers of this heap's chunks.
    arena: u32,
    /// The time (ms, wrapping) of the last [`Self::decay`] call, stamped on dirty runs.
    now: u32,
    /// When [`Self::decay`] last looked for old dirty runs.
    last_tick: u32,
    /// False once the page source refused a purge: purge only when asked ([`Self::purge_all`]).
    purge_ok: bool,
    /// Shared heaps: non-zero while an update of this page heap (or of page runs, see
    /// [`PageHeap::enter`]) is under way, so that the recovery after a lock holder's death
    /// knows whether the runs and free lists can be trusted. Never touched in the process
    /// heap.
    busy: u32,
}

impl PageHeap {
    /// Wholly free chunks kept mapped to avoid mapping churn (their dirty pages decay and
    /// count against the dirty limit like any others, so they cost address space, not
    /// memory, once idle). One was too few: pinned to one CPU, `fragment` and `mixed`
    /// (a few hundred live blocks of up to 1 MiB) mapped 56 and 62 chunks to keep 8 live,
    /// and page faults on fresh chunks were most of their system time; with 4 they map 15
    /// and 29, with a third as many page faults. A shared heap keeps one: its chunks are a
    /// file's, which every arena of every process draws from.
    pub(super) const SPARE_CHUNKS: usize = 4;

    /// Wholly free chunks kept mapped on source `S`.
    pub(super) const fn spare_chunks<S: PageSource>() -> usize {
        if S::SHARED {
            1
        } else {
            Self::SPARE_CHUNKS
        }
    }

    pub const fn new(arena: u32) -> Self {
        Self {
            lists: [[Rel::NULL; USABLE_PAGES + 1]; 2],
            bitmap: [[0; BITMAP_WORDS]; 2],
            chunks: Rel::NULL,
            free_chunks: 0,
            dirty_pages: 0,
            counters: PageCounters {
                mapped: 0,
                chunks_mapped: 0,
                chunks_unmapped: 0,
                purged: 0,
                purges: 0,
                runs: 0,
            },
            arena,
            now: 0,
            last_tick: 0,
            purge_ok: true,
            busy: 0,
        }
    }

    /// Marks the start of an update of page runs (shared heaps only; nests). Every public
    /// mutator of this page heap is marked; callers that change run kinds around one (a
    /// small run's birth and death, `small.rs`) mark the whole section.
    #[inline(always)]
    pub fn enter<S: PageSource>(&mut self) {
        if S::SHARED {
            // SAFETY: a plain field of ours; volatile so that the store is not merged or
            // moved, and the fence keeps the update's stores after it.
            unsafe { ptr::write_volatile(&mut self.busy, self.busy + 1) };
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Marks the end of an update begun with [`PageHeap::enter`].
    #[inline(always)]
    pub fn leave<S: PageSource>(&mut self) {
        if S::SHARED {
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            // SAFETY: as in `enter`.
            unsafe { ptr::write_volatile(&mut self.busy, self.busy - 1) };
        }
    }

    /// Whether an update was under way (a dead lock holder left it unfinished).
    pub fn busy(&self) -> bool {
        self.busy != 0
    }

    /// Allocates a run of `n` pages whose first page is aligned to `align_pages` pages
    /// (see `alloc_run_unmarked`).
    ///
    /// # Safety
    /// As for `alloc_run_unmarked`.
    pub unsafe fn alloc_run<S: PageSource>(
        &mut self,
        src: &S,
        n: usize,
        align_pages: usize,
    ) -> (*mut PageDesc, bool) {
        self.enter::<S>();
        // SAFETY: passed on.
        let r = unsafe { self.alloc_run_unmarked(src, n, align_pages) };
        self.leave::<S>();
        r
    }

    /// Returns run `d` to the free runs (see `free_run_unmarked`).
    ///
    /// # Safety
    /// As for `free_run_unmarked`.
    pub unsafe fn free_run<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) {
        self.enter::<S>();
        // SAFETY: passed on.
        unsafe { self.free_run_unmarked(src, d) };
        self.leave::<S>();
    }

    /// Grows run `d` in place (see `grow_run_unmarked`).
    ///
    /// # Safety
    /// As for `grow_run_unmarked`.
    pub unsafe fn grow_run<S: PageSource>(&mut self, src: &S, d: *mut PageDesc, n: usize) -> bool {
        self.enter::<S>();
        // SAFETY: passed on.
        let r = unsafe { self.grow_run_unmarked(src, d, n) };
        self.leave::<S>();
        r
    }

    /// Shrinks run `d` in place (see `shrink_run_unmarked`).
    ///
    /// # Safety
    /// As for `shrink_run_unmarked`.
    pub unsafe fn shrink_run<S: PageSource>(&mut self, src: &S, d: *mut PageDesc, n: usize) {
        self.enter::<S>();
        // SAFETY: passed on.
        unsafe { self.shrink_run_unmarked(src, d, n) };
        self.leave::<S>();
    }

    /// Purges every dirty free page (see `purge_all_unmarked`).
    ///
    /// # Safety
    /// As for `purge_all_unmarked`.
    pub unsafe fn purge_all<S: PageSource>(&mut self, src: &S) -> bool {
        self.enter::<S>();
        // SAFETY: passed on.
        let r = unsafe { self.purge_all_unmarked(src) };
        self.leave::<S>();
        r
    }

    /// Purges old dirty runs (see `decay_unmarked`).
    ///
    /// # Safety
    /// As for `decay_unmarked`.
    pub unsafe fn decay<S: PageSource>(&mut self, src: &S, now_ms: u32) {
        self.enter::<S>();
        // SAFETY: passed on.
        unsafe { self.decay_unmarked(src, now_ms) };
        self.leave::<S>();
    }

    /// Dirty free pages past which the heap purges them all.
    pub fn dirty_limit(&self) -> usize {
        (crate::policy::dirty_max() / PAGE).max(self.counters.mapped / PAGE / DIRTY_RATIO)
    }
}
