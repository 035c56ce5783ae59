//! The page heap of one arena: free page runs, best fit, coalescing, chunks to and from the
//! page source.
//!
//! A free run is either *dirty* (some page may hold data and be resident) or *clean* (purged,
//! or never touched since the chunk was mapped: reads zero, costs no memory). The two kinds are
//! kept apart, so the heap always knows exactly which free pages are dirty: a freed run merges
//! only with dirty neighbours, a purged run only with clean ones.
//!
//! Free runs of each kind are kept sorted by length in exact-length lists, one per possible
//! length (1 ..= `USABLE_PAGES` pages), with a bitmap of the non-empty lists. Best fit is the
//! first set bit at or above the wanted length: at most `BITMAP_WORDS` (16) word scans,
//! however many free runs there are. Dirty runs are tried first (reusing resident pages
//! costs no page faults); within a length the most recently freed run is used first.
//!
//! Purging is deferred. Freeing never calls the page source except to unmap a wholly free
//! chunk beyond the spare. A dirty run records when it was freed (in `bump`, unused by free
//! runs); the arena's slow paths call [`PageHeap::decay`] with the time, and every
//! [`TICK_MS`] it purges the dirty runs nobody reused for [`DECAY_MS`]. Once the dirty pages
//! exceed [`PageHeap::dirty_limit`] (64 MiB, or 1/8 of what the heap has mapped if more),
//! every dirty run is purged at once. So a run freed and reallocated soon is never purged.
//! A purge the page source refuses (an `mlock`ed process, pages other than 4 KiB) leaves the
//! run dirty and stops further purging until an explicit trim.
//!
//! Invariants (checked by [`PageHeap::check`]):
//! - a run is on list `(k, n)` iff it is free, of kind `k` (dirty or clean) and
//!   `npages == n`; bit `n` of bitmap `k` is set iff that list is non-empty;
//! - no two free runs of the same kind are adjacent (a freed run merges with dirty
//!   neighbours at once, a purged one with clean neighbours);
//! - `dirty_pages` is the sum of `npages` over the dirty free runs;
//! - a chunk's `free_pages` is the sum of `npages` over its free runs; `free_chunks` counts
//!   the chunks with `free_pages == USABLE_PAGES`.
//!
//! The lists, the chunk list and the descriptors' links are [`Rel`]s: offsets from the page
//! source's base, which every method that follows them is given (`src.base()`, or `base`).
//! The heap lives wherever its arena does, possibly in memory that another process maps
//! elsewhere; the base never does.

use core::ptr;

use crate::chunk::{
    header_of_desc, init_arena_chunk, ChunkHeader, Kind, PageDesc, Rel, CHUNK_ARENA, HEADER_PAGES,
    MAGIC, USABLE_PAGES,
};
use crate::size_class::{CHUNK, CHUNK_PAGES, PAGE};
use crate::source::PageSource;

const BITMAP_WORDS: usize = (USABLE_PAGES + 1).div_ceil(64);

/// Dirty free pages an arena may always keep before it purges them all (64 MiB).
pub const DIRTY_MIN_PAGES: usize = 16384;
/// A heap that has mapped more keeps up to `mapped / DIRTY_RATIO` of it dirty.
pub const DIRTY_RATIO: usize = 8;
/// A dirty free run that has not been reused for this long is purged at the next tick.
pub const DECAY_MS: u32 = 1000;
/// How often, at most, the heap looks for dirty runs past [`DECAY_MS`].
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
    /// `lists[k][n]`: free runs of kind `k` (`CLEAN` or `DIRTY`) and length `n`.
    lists: [[Rel<PageDesc>; USABLE_PAGES + 1]; 2],
    bitmap: [[u64; BITMAP_WORDS]; 2],
    /// The arena's chunks, linked through their headers.
    chunks: Rel<ChunkHeader>,
    /// Chunks that are entirely free (kept: at most [`Self::SPARE_CHUNKS`]).
    free_chunks: usize,
    pub dirty_pages: usize,
    pub counters: PageCounters,
    /// The index written into the headers of this heap's chunks.
    arena: u32,
    /// The time (ms, wrapping) of the last [`Self::decay`] call, stamped on dirty runs.
    now: u32,
    /// When [`Self::decay`] last looked for old dirty runs.
    last_tick: u32,
    /// False once the page source refused a purge: purge only when asked ([`Self::trim`]).
    purge_ok: bool,
    /// Shared heaps: non-zero while an update of this page heap (or of page runs, see
    /// [`PageHeap::enter`]) is under way, so that the recovery after a lock holder's death
    /// knows whether the runs and free lists can be trusted. Never touched in the process
    /// heap.
    busy: u32,
}

impl PageHeap {
    /// Wholly free chunks kept mapped to avoid mapping churn.
    const SPARE_CHUNKS: usize = 1;

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
        DIRTY_MIN_PAGES.max(self.counters.mapped / PAGE / DIRTY_RATIO)
    }

    /// Allocates a run of `n` pages whose first page is aligned to `align_pages` pages.
    /// Returns its head descriptor (kind still `Free`: the caller sets it) and whether its
    /// pages may be dirty; null when the source has no memory.
    ///
    /// # Safety
    /// The caller holds the arena lock; `1 <= n` and `n + align_pages - 1 <= USABLE_PAGES`.
    unsafe fn alloc_run_unmarked<S: PageSource>(
        &mut self,
        src: &S,
        n: usize,
        align_pages: usize,
    ) -> (*mut PageDesc, bool) {
        // Only an aligned request needs slack: a run of `want` pages holds an aligned run of
        // `n` pages wherever it starts.
        let want = n + align_pages - 1;
        let d = match self.find_fit(src, want) {
            Some(d) => d,
            None => {
                // A wholly free chunk split into dirty and clean runs is one run once purged:
                // use it rather than map another chunk.
                if self.free_chunks > 0 && self.dirty_pages > 0 {
                    // SAFETY: the caller holds the lock.
                    unsafe { self.purge_all(src) };
                    if let Some(d) = self.find_fit(src, want) {
                        // SAFETY: as below.
                        return unsafe { self.take_run(src, d, n, align_pages) };
                    }
                }
                // SAFETY: the caller holds the lock.
                if !unsafe { self.grow(src) } {
                    return (ptr::null_mut(), false);
                }
                match self.find_fit(src, want) {
                    Some(d) => d,
                    None => return (ptr::null_mut(), false),
                }
            }
        };
        // SAFETY: `d` is a free run on our lists that fits; the lock is held.
        unsafe { self.take_run(src, d, n, align_pages) }
    }

    /// Takes `n` pages aligned to `align_pages` out of the free run `d` (which holds them),
    /// giving back the pieces before and after.
    ///
    /// # Safety
    /// The caller holds the lock; `d` heads a free run on our lists of at least
    /// `n + align_pages - 1` pages.
    unsafe fn take_run<S: PageSource>(
        &mut self,
        src: &S,
        d: *mut PageDesc,
        n: usize,
        align_pages: usize,
    ) -> (*mut PageDesc, bool) {
        // SAFETY: as the contract says.
        unsafe {
            self.unlink(src, d);
            let h = header_of_desc(d);
            let first = (*h).desc_index(d);
            let total = (*d).npages as usize;
            let dirty = (*d).dirty;
            let stamp = (*d).bump;
            let addr = (*h).page_addr(first) as usize;
            let align = align_pages * PAGE;
            let skip = ((addr + align - 1) & !(align - 1)) - addr;
            let skip = skip / PAGE;
            // Give back the pages before and after the part we take, as runs of the same
            // kind. Neither piece touches another free run of that kind: `d` had none beside
            // it.
            if skip > 0 {
                self.make_free(h, first, skip, dirty, stamp);
                self.link(src, h, first);
            }
            let start = first + skip;
            let rest = total - skip - n;
            if rest > 0 {
                self.make_free(h, start + n, rest, dirty, stamp);
                self.link(src, h, start + n);
            }
            let r = &mut (*h).pages[start] as *mut PageDesc;
            // The run's last page may have been a free tail; it is an interior page now.
            if n > 1 {
                (*h).pages[start + n - 1].set_kind(Kind::Interior);
            }
            (*r).npages = n as u32;
            (*r).dirty = dirty;
            if (*h).free_pages == USABLE_PAGES {
                self.free_chunks -= 1;
            }
            (*h).free_pages -= n;
            self.counters.runs += 1;
            (r, dirty)
        }
    }

    /// Returns the run with head `d` to the free runs as a dirty run, merged with dirty
    /// neighbours; unmaps the chunk if it is wholly free and not needed as the spare, and
    /// purges if the dirty pages now exceed the limit.
    ///
    /// # Safety
    /// The caller holds the arena lock; `d` heads an allocated run of this heap with no live
    /// block in it; interior pages of a small run have already been reset to `Interior`.
    unsafe fn free_run_unmarked<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) {
        // SAFETY: `d` is a run head of one of our chunks; the lock is held.
        unsafe {
            let h = header_of_desc(d);
            let freed = (*d).npages as usize;
            let first = (*h).desc_index(d);
            self.counters.runs -= 1;
            (*h).free_pages += freed;
            if (*h).free_pages == USABLE_PAGES {
                self.free_chunks += 1;
                if self.free_chunks > Self::SPARE_CHUNKS {
                    self.release_chunk(src, h, first);
                    return;
                }
            }
            self.insert_free(src, h, first, freed, true);
            if self.dirty_pages > self.dirty_limit() && self.purge_ok {
                self.purge_all(src);
            }
        }
    }

    /// Makes pages `first..first + n` of chunk `h` (whose descriptors hold no free run) a free
    /// run of the given kind, merged with the free runs of that kind on either side, and
    /// links it.
    ///
    /// # Safety
    /// The caller holds the lock and owns those pages; `(*h).free_pages` already counts them.
    unsafe fn insert_free<S: PageSource>(
        &mut self,
        src: &S,
        h: *mut ChunkHeader,
        first: usize,
        n: usize,
        dirty: bool,
    ) {
        // SAFETY: as the contract says; neighbours are read through our own descriptors.
        unsafe {
            let mut first = first;
            let mut n = n;
            (*h).pages[first].set_kind(Kind::Interior);
            (*h).pages[first + n - 1].set_kind(Kind::Interior);
            // Merge with the run to the left.
            let left = &(*h).pages[first - 1];
            let left_head = match left.kind() {
                Kind::Free => Some(first - 1),
                Kind::FreeTail => Some(first - 1 - left.lead()),
                _ => None,
            };
            if let Some(lh) = left_head {
                let l = &mut (*h).pages[lh] as *mut PageDesc;
                if (*l).dirty == dirty {
                    self.unlink(src, l);
                    n += (*l).npages as usize;
                    (*h).pages[first - 1].set_kind(Kind::Interior);
                    (*l).set_kind(Kind::Interior);
                    first = lh;
                }
            }
            // Merge with the run to the right.
            let right = first + n;
            if right < CHUNK_PAGES && (*h).pages[right].kind() == Kind::Free {
                let r = &mut (*h).pages[right] as *mut PageDesc;
                if (*r).dirty == dirty {
                    self.unlink(src, r);
                    n += (*r).npages as usize;
                    (*r).set_kind(Kind::Interior);
                }
            }
            self.make_free(h, first, n, dirty, self.now);
            self.link(src, h, first);
        }
    }

    /// Grows the run with head `d` in place to `n` pages by taking pages from the free run
    /// right after it. Returns whether it could.
    ///
    /// # Safety
    /// The caller holds the arena lock; `d` heads an allocated large run of this heap.
    unsafe fn grow_run_unmarked<S: PageSource>(
        &mut self,
        src: &S,
        d: *mut PageDesc,
        n: usize,
    ) -> bool {
        // SAFETY: as in `free_run`.
        unsafe {
            let h = header_of_desc(d);
            let first = (*h).desc_index(d);
            let have = (*d).npages as usize;
            let right = first + have;
            if n <= have {
                return true;
            }
            if right >= CHUNK_PAGES || (*h).pages[right].kind() != Kind::Free {
                return false;
            }
            let r = &mut (*h).pages[right] as *mut PageDesc;
            let rn = (*r).npages as usize;
            let extra = n - have;
            if rn < extra {
                return false;
            }
            let rdirty = (*r).dirty;
            let stamp = (*r).bump;
            self.unlink(src, r);
            (*r).set_kind(Kind::Interior);
            if rn > extra {
                self.make_free(h, right + extra, rn - extra, rdirty, stamp);
                self.link(src, h, right + extra);
            } else {
                (*h).pages[right + rn - 1].set_kind(Kind::Interior);
            }
            (*d).npages = n as u32;
            (*h).free_pages -= extra;
            true
        }
    }

    /// Shrinks the run with head `d` in place to `n >= 1` pages, freeing its tail.
    ///
    /// # Safety
    /// As for [`Self::grow_run`]; no live data lies past page `n` of the run.
    unsafe fn shrink_run_unmarked<S: PageSource>(&mut self, src: &S, d: *mut PageDesc, n: usize) {
        // SAFETY: as in `free_run`; the tail becomes a run of its own and is then freed.
        unsafe {
            let h = header_of_desc(d);
            let first = (*h).desc_index(d);
            let have = (*d).npages as usize;
            if n >= have {
                return;
            }
            (*d).npages = n as u32;
            let t = &mut (*h).pages[first + n] as *mut PageDesc;
            (*t).set_kind(Kind::Large);
            (*t).npages = (have - n) as u32;
            self.counters.runs += 1;
            self.free_run(src, t);
        }
    }

    /// Purges every dirty free run: its pages go back to the page source and it becomes a
    /// clean run, merged with clean neighbours. Returns whether the source did every purge;
    /// a refused purge leaves its run dirty.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    unsafe fn purge_all_unmarked<S: PageSource>(&mut self, src: &S) -> bool {
        self.counters.purges += (self.dirty_pages > 0) as u64;
        // SAFETY: the caller holds the lock.
        unsafe { self.purge_where(src, |_| true) }
    }

    /// Tells the heap the time (a wrapping millisecond clock) and, at most every
    /// [`TICK_MS`], purges the dirty runs that nobody reused for [`DECAY_MS`].
    ///
    /// # Safety
    /// The caller holds the arena lock.
    unsafe fn decay_unmarked<S: PageSource>(&mut self, src: &S, now_ms: u32) {
        self.now = now_ms;
        if now_ms.wrapping_sub(self.last_tick) < TICK_MS {
            return;
        }
        self.last_tick = now_ms;
        if self.dirty_pages > 0 && self.purge_ok {
            // SAFETY: the caller holds the lock.
            unsafe { self.purge_where(src, |stamp| now_ms.wrapping_sub(stamp) >= DECAY_MS) };
        }
    }

    /// Purges the dirty runs whose stamp satisfies `old`; stops at the first purge the source
    /// refuses (and then purges only when [`Self::purge_all`] is called).
    unsafe fn purge_where<S: PageSource>(&mut self, src: &S, old: impl Fn(u32) -> bool) -> bool {
        let base = src.base();
        for w in 0..BITMAP_WORDS {
            let mut bits = self.bitmap[DIRTY][w];
            while bits != 0 {
                let n = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let mut d = self.lists[DIRTY][n].get(base);
                while !d.is_null() {
                    // SAFETY: runs on our lists are free runs of our chunks; the lock is held.
                    // Purging `d` unlinks only `d` from the dirty lists (its merges touch clean
                    // runs), so `next`, read first, stays valid.
                    unsafe {
                        let next = (*d).next.get(base);
                        if old((*d).bump) {
                            let h = header_of_desc(d);
                            let first = (*h).desc_index(d);
                            if !src.purge((*h).page_addr(first), n * PAGE) {
                                self.purge_ok = false;
                                return false;
                            }
                            self.unlink(src, d);
                            self.counters.purged += (n * PAGE) as u64;
                            self.insert_free(src, h, first, n, false);
                        }
                        d = next;
                    }
                }
            }
        }
        self.purge_ok = true;
        true
    }

    /// Maps a new chunk and adds its free run. Returns false when the source has no memory.
    unsafe fn grow<S: PageSource>(&mut self, src: &S) -> bool {
        let c = src.map_chunk();
        if c.is_null() {
            return false;
        }
        let base = src.base();
        // SAFETY: the source hands us a fresh zeroed chunk; the lock is held.
        unsafe {
            let d = init_arena_chunk(c, self.arena);
            let h = c.cast::<ChunkHeader>();
            (*h).next = self.chunks;
            if !self.chunks.is_null() {
                (*self.chunks.get(base)).prev = Rel::new(h, base);
            }
            self.chunks = Rel::new(h, base);
            self.free_chunks += 1;
            self.counters.mapped += CHUNK;
            self.counters.chunks_mapped += 1;
            self.link(src, h, (*h).desc_index(d));
        }
        true
    }

    /// Unmaps the wholly free chunk `h`, whose pages are free runs except the run at page
    /// `skip`, which is on no list (the run being freed).
    unsafe fn release_chunk<S: PageSource>(&mut self, src: &S, h: *mut ChunkHeader, skip: usize) {
        let base = src.base();
        // SAFETY: `h` is one of our chunks, entirely free; the lock is held. Its runs are
        // walked by length from the first usable page.
        unsafe {
            let mut i = HEADER_PAGES;
            while i < CHUNK_PAGES {
                let d = &mut (*h).pages[i] as *mut PageDesc;
                if i != skip {
                    self.unlink(src, d);
                }
                i += (*d).npages as usize;
            }
            if (*h).prev.is_null() {
                self.chunks = (*h).next;
            } else {
                (*(*h).prev.get(base)).next = (*h).next;
            }
            if !(*h).next.is_null() {
                (*(*h).next.get(base)).prev = (*h).prev;
            }
            self.free_chunks -= 1;
            self.counters.mapped -= CHUNK;
            self.counters.chunks_unmapped += 1;
            src.unmap_chunk(h.cast());
        }
    }

    /// Writes the descriptors of a free run of `n` pages at page `first` of chunk `h`; a
    /// dirty run is stamped with the time its pages were freed.
    unsafe fn make_free(
        &mut self,
        h: *mut ChunkHeader,
        first: usize,
        n: usize,
        dirty: bool,
        stamp: u32,
    ) {
        // SAFETY: the caller owns pages `first..first + n` of `h` under the lock.
        unsafe {
            let d = &mut (*h).pages[first];
            d.set_kind(Kind::Free);
            d.npages = n as u32;
            d.dirty = dirty;
            d.bump = stamp;
            if n > 1 {
                let t = &(*h).pages[first + n - 1];
                t.set_kind(Kind::FreeTail);
                t.set_lead(n - 1);
            }
        }
    }

    /// Puts the free run at page `first` of `h` on its list.
    unsafe fn link<S: PageSource>(&mut self, src: &S, h: *mut ChunkHeader, first: usize) {
        let base = src.base();
        // SAFETY: page `first` of `h` heads a free run that is on no list.
        unsafe {
            let d = &mut (*h).pages[first] as *mut PageDesc;
            let n = (*d).npages as usize;
            let k = (*d).dirty as usize;
            let rd = Rel::new(d, base);
            (*d).prev = Rel::NULL;
            (*d).next = self.lists[k][n];
            if !(*d).next.is_null() {
                (*(*d).next.get(base)).prev = rd;
            }
            self.lists[k][n] = rd;
            self.bitmap[k][n / 64] |= 1 << (n % 64);
            if k == DIRTY {
                self.dirty_pages += n;
            }
        }
    }

    /// Takes the free run `d` off its list.
    unsafe fn unlink<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) {
        let base = src.base();
        // SAFETY: `d` heads a free run on list `(dirty, npages)`.
        unsafe {
            let n = (*d).npages as usize;
            let k = (*d).dirty as usize;
            if (*d).prev.is_null() {
                self.lists[k][n] = (*d).next;
                if self.lists[k][n].is_null() {
                    self.bitmap[k][n / 64] &= !(1 << (n % 64));
                }
            } else {
                (*(*d).prev.get(base)).next = (*d).next;
            }
            if !(*d).next.is_null() {
                (*(*d).next.get(base)).prev = (*d).prev;
            }
            (*d).next = Rel::NULL;
            (*d).prev = Rel::NULL;
            if k == DIRTY {
                self.dirty_pages -= n;
            }
        }
    }

    /// The head of the shortest free run of kind `k` of at least `n` pages.
    fn first_of<S: PageSource>(&self, src: &S, k: usize, n: usize) -> Option<*mut PageDesc> {
        if n > USABLE_PAGES {
            return None;
        }
        let mut w = n / 64;
        let mut bits = self.bitmap[k][w] & (!0u64 << (n % 64));
        loop {
            if bits != 0 {
                let len = w * 64 + bits.trailing_zeros() as usize;
                return Some(self.lists[k][len].get(src.base()));
            }
            w += 1;
            if w == BITMAP_WORDS {
                return None;
            }
            bits = self.bitmap[k][w];
        }
    }

    /// Best fit for `n` pages: the shortest dirty run that fits, else the shortest clean one.
    fn find_fit<S: PageSource>(&self, src: &S, n: usize) -> Option<*mut PageDesc> {
        self.first_of(src, DIRTY, n)
            .or_else(|| self.first_of(src, CLEAN, n))
    }

    /// Verifies the invariants of the module documentation and of every chunk's page
    /// descriptors. Returns the first violation found.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn check<S: PageSource>(&self, src: &S) -> Result<(), &'static str> {
        let base = src.base();
        let mut dirty = 0;
        // Free runs on the lists, and free run heads in the chunks: every free run must be
        // listed (a run taken off its list by an update cut short is not free).
        let (mut listed, mut heads) = (0usize, 0usize);
        for k in [CLEAN, DIRTY] {
            for n in 1..=USABLE_PAGES {
                let has = self.bitmap[k][n / 64] & (1 << (n % 64)) != 0;
                if has == self.lists[k][n].is_null() {
                    return Err("free-run bitmap disagrees with its lists");
                }
                let mut d = self.lists[k][n].get(base);
                while !d.is_null() {
                    // SAFETY: runs on our lists live in our chunks.
                    unsafe {
                        if (*d).kind() != Kind::Free
                            || (*d).npages as usize != n
                            || (*d).dirty as usize != k
                        {
                            return Err("free list holds a run of another length or kind");
                        }
                        if k == DIRTY {
                            dirty += n;
                        }
                        listed += 1;
                        if listed > CHUNK_PAGES * (self.counters.chunks_mapped as usize + 1) {
                            return Err("free list has a cycle");
                        }
                        d = (*d).next.get(base);
                    }
                }
            }
        }
        if dirty != self.dirty_pages {
            return Err("dirty page count is off");
        }
        let mut free_chunks = 0;
        let mut c = self.chunks.get(base);
        while !c.is_null() {
            // SAFETY: the chunk list holds our mapped chunks.
            unsafe {
                if (*c).magic != MAGIC || (*c).kind != CHUNK_ARENA || (*c).arena != self.arena {
                    return Err("chunk header is not ours");
                }
                let mut i = HEADER_PAGES;
                let mut free = 0;
                // The kind of the free run just before page `i`, if there is one.
                let mut prev_free: Option<bool> = None;
                while i < CHUNK_PAGES {
                    let d = &(*c).pages[i];
                    let n = d.npages as usize;
                    if n == 0 || i + n > CHUNK_PAGES {
                        return Err("run length out of range");
                    }
                    match d.kind() {
                        Kind::Free => {
                            heads += 1;
                            if prev_free == Some(d.dirty) {
                                return Err("two free runs of one kind side by side");
                            }
                            free += n;
                            if n > 1 {
                                let t = &(*c).pages[i + n - 1];
                                if t.kind() != Kind::FreeTail || t.lead() != n - 1 {
                                    return Err("free run without its tail");
                                }
                            }
                            prev_free = Some(d.dirty);
                        }
                        Kind::Small | Kind::Large => prev_free = None,
                        _ => return Err("run head of an unexpected kind"),
                    }
                    let last = if d.kind() == Kind::Free { n - 1 } else { n };
                    for j in 1..last {
                        let e = &(*c).pages[i + j];
                        let k = e.kind();
                        let ok = match d.kind() {
                            Kind::Small => {
                                k == Kind::SmallInterior && e.lead() == j && e.class() == d.class()
                            }
                            _ => k == Kind::Interior,
                        };
                        if !ok {
                            return Err("interior page of the wrong kind");
                        }
                    }
                    i += n;
                }
                if free != (*c).free_pages {
                    return Err("chunk free page count is off");
                }
                if free == USABLE_PAGES {
                    free_chunks += 1;
                }
                c = (*c).next.get(base);
            }
        }
        if free_chunks != self.free_chunks {
            return Err("wholly free chunk count is off");
        }
        if listed != heads {
            return Err("a free run is missing from the free lists");
        }
        Ok(())
    }

    /// Calls `f` with every chunk of this heap.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn for_each_chunk<S: PageSource>(
        &self,
        src: &S,
        mut f: impl FnMut(*mut ChunkHeader),
    ) {
        let base = src.base();
        let mut c = self.chunks.get(base);
        while !c.is_null() {
            f(c);
            // SAFETY: chunks on our list are mapped.
            c = unsafe { (*c).next.get(base) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::run_addr;
    use crate::test_support::{Rng, TestSource, SLOTS};
    use core::sync::atomic::Ordering;
    use std::collections::BTreeMap;

    // The helpers below stand in for the arena: a test owns its heap, which takes the place of
    // holding the arena lock.

    fn new_heap() -> Box<PageHeap> {
        Box::new(PageHeap::new(0))
    }

    fn try_take(heap: &mut PageHeap, src: &TestSource, n: usize, align: usize) -> *mut PageDesc {
        // SAFETY: the test owns the heap (the lock's role); n and align are within bounds.
        let (d, _) = unsafe { heap.alloc_run(src, n, align) };
        if !d.is_null() {
            // SAFETY: `d` heads the run just taken; the caller of alloc_run sets its kind.
            unsafe { (*d).set_kind(Kind::Large) };
        }
        d
    }

    fn take(heap: &mut PageHeap, src: &TestSource, n: usize, align: usize) -> *mut PageDesc {
        let d = try_take(heap, src, n, align);
        assert!(!d.is_null(), "alloc_run({n}, {align}) failed");
        // SAFETY: `d` heads a live run.
        assert_eq!(unsafe { (*d).npages } as usize, n);
        d
    }

    fn give(heap: &mut PageHeap, src: &TestSource, d: *mut PageDesc) {
        // SAFETY: `d` heads an allocated run of this heap with nothing live in it.
        unsafe { heap.free_run(src, d) }
    }

    fn check(heap: &PageHeap, src: &TestSource) {
        // SAFETY: the test owns the heap.
        if let Err(e) = unsafe { heap.check(src) } {
            panic!("page heap check failed: {e}");
        }
    }

    fn addr(d: *const PageDesc) -> usize {
        run_addr(d) as usize
    }

    fn npages(d: *mut PageDesc) -> usize {
        // SAFETY: the descriptor lies in a mapped chunk header.
        unsafe { (*d).npages as usize }
    }

    /// The descriptor of the page at `a` (which lies in a mapped chunk of the heap).
    fn desc_at(a: usize) -> *mut PageDesc {
        let h = (a & !(CHUNK - 1)) as *mut ChunkHeader;
        let i = (a & (CHUNK - 1)) / PAGE;
        // SAFETY: `h` is a mapped chunk header and `i < CHUNK_PAGES`.
        unsafe { &mut (*h).pages[i] as *mut PageDesc }
    }

    /// Kind and length of the run headed at `a`.
    fn run_at(a: usize) -> (Kind, usize) {
        let d = desc_at(a);
        // SAFETY: as in `desc_at`.
        unsafe { ((*d).kind(), (*d).npages as usize) }
    }

    /// Every free run on the lists as (address, length), sorted by address.
    fn free_runs(heap: &PageHeap) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for k in [CLEAN, DIRTY] {
            for n in 1..=USABLE_PAGES {
                let mut d = heap.lists[k][n].get(0);
                while !d.is_null() {
                    v.push((addr(d), n));
                    // SAFETY: runs on the lists are free runs of mapped chunks.
                    d = unsafe { (*d).next.get(0) };
                }
            }
        }
        v.sort_unstable();
        v
    }

    /// The reference best fit, as (kind, length): the shortest non-empty dirty list of at
    /// least `n` pages, else the shortest clean one, by a linear scan of the lists rather
    /// than the bitmaps.
    fn slow_fit(heap: &PageHeap, n: usize) -> Option<(usize, usize)> {
        [DIRTY, CLEAN].into_iter().find_map(|k| {
            (n..=USABLE_PAGES)
                .find(|&len| !heap.lists[k][len].is_null())
                .map(|len| (k, len))
        })
    }

    #[test]
    fn best_fit_takes_the_shortest_fitting_run() {
        let src = TestSource::new(4);
        let mut heap = new_heap();
        let lens = [5, 1, 3, 1, 8, 1, 2, 1];
        let runs: Vec<_> = lens.iter().map(|&n| take(&mut heap, &src, n, 1)).collect();
        // A fresh chunk is handed out front to back.
        let base = addr(runs[0]);
        assert_eq!(base % CHUNK, HEADER_PAGES * PAGE);
        let mut off = 0;
        for (d, &n) in runs.iter().zip(&lens) {
            assert_eq!(addr(*d), base + off * PAGE);
            off += n;
        }
        check(&heap, &src);
        // Free the runs of 5, 3, 8 and 2 pages; the 1-page runs keep them apart.
        for i in [0, 2, 4, 6] {
            give(&mut heap, &src, runs[i]);
        }
        check(&heap, &src);
        let tail = USABLE_PAGES - off;
        let mut want_free = vec![
            (addr(runs[0]), 5),
            (addr(runs[2]), 3),
            (addr(runs[4]), 8),
            (addr(runs[6]), 2),
            (base + off * PAGE, tail),
        ];
        assert_eq!(free_runs(&heap), want_free);
        for n in 1..=USABLE_PAGES + 1 {
            let fast = heap.find_fit(&src, n).map(npages);
            assert_eq!(fast, slow_fit(&heap, n).map(|f| f.1), "find_fit({n})");
        }

        // Exact fits first, then the shortest longer run, never the long tail.
        assert_eq!(addr(take(&mut heap, &src, 3, 1)), addr(runs[2]));
        assert_eq!(addr(take(&mut heap, &src, 2, 1)), addr(runs[6]));
        assert_eq!(addr(take(&mut heap, &src, 4, 1)), addr(runs[0]));
        check(&heap, &src);
        // The 5-page run left one page behind; a 1-page request takes it, not the 8.
        assert_eq!(run_at(addr(runs[0]) + 4 * PAGE), (Kind::Free, 1));
        assert_eq!(addr(take(&mut heap, &src, 1, 1)), addr(runs[0]) + 4 * PAGE);
        assert_eq!(addr(take(&mut heap, &src, 6, 1)), addr(runs[4]));
        assert_eq!(run_at(addr(runs[4]) + 6 * PAGE), (Kind::Free, 2));
        assert_eq!(addr(take(&mut heap, &src, 9, 1)), base + off * PAGE);
        check(&heap, &src);
        want_free = vec![
            (addr(runs[4]) + 6 * PAGE, 2),
            (base + (off + 9) * PAGE, tail - 9),
        ];
        assert_eq!(free_runs(&heap), want_free);
        assert_eq!(src.maps.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn freeing_neighbours_coalesces() {
        let src = TestSource::new(4);
        let mut heap = new_heap();
        let x = take(&mut heap, &src, 4, 1);
        let y = take(&mut heap, &src, 6, 1);
        let z = take(&mut heap, &src, 3, 1);
        let guard = take(&mut heap, &src, 1, 1);
        let (xa, ya, za) = (addr(x), addr(y), addr(z));
        assert_eq!(heap.counters.runs, 4);

        give(&mut heap, &src, x); // no free neighbour
        assert_eq!(run_at(xa), (Kind::Free, 4));
        give(&mut heap, &src, z); // no free neighbour (the guard is after it)
        assert_eq!(run_at(za), (Kind::Free, 3));
        check(&heap, &src);
        give(&mut heap, &src, y); // merges with both
        check(&heap, &src);
        assert_eq!(run_at(xa), (Kind::Free, 13));
        let tail = desc_at(xa + 12 * PAGE);
        // SAFETY: a descriptor in a mapped chunk header.
        unsafe {
            assert_eq!((*tail).kind(), Kind::FreeTail);
            assert_eq!((*tail).lead(), 12);
        }
        // The old heads and tails inside the merged run are interior pages now.
        for a in [ya, za, ya - PAGE, za - PAGE] {
            assert_eq!(run_at(a).0, Kind::Interior, "page {:#x}", a);
        }
        assert_eq!(free_runs(&heap)[0], (xa, 13));
        assert_eq!(heap.counters.runs, 1);

        // Right-only merge: a run freed just before a free run.
        let a = take(&mut heap, &src, 13, 1);
        assert_eq!(addr(a), xa);
        assert_eq!(heap.counters.runs, 2);
        // SAFETY: `a` heads a live run of 13 pages; nothing lives past page 5.
        unsafe { heap.shrink_run(&src, a, 5) };
        assert_eq!(run_at(xa + 5 * PAGE), (Kind::Free, 8));
        give(&mut heap, &src, a);
        assert_eq!(run_at(xa), (Kind::Free, 13));
        check(&heap, &src);

        // Freeing the guard leaves the chunk wholly free: a dirty run of the 14 pages used so
        // far beside the clean remainder. It is the heap's spare, kept mapped, not purged.
        let purged_before = src.purged_bytes.load(Ordering::Relaxed);
        give(&mut heap, &src, guard);
        check(&heap, &src);
        assert_eq!(
            free_runs(&heap),
            vec![(xa, 14), (xa + 14 * PAGE, USABLE_PAGES - 14)]
        );
        assert_eq!(heap.free_chunks, 1);
        assert_eq!(heap.dirty_pages, 14);
        assert_eq!(heap.counters.runs, 0);
        assert_eq!(src.purged_bytes.load(Ordering::Relaxed), purged_before);
        // Purging turns the dirty run clean, and it merges with the remainder.
        // SAFETY: the test owns the heap.
        unsafe { heap.purge_all(&src) };
        check(&heap, &src);
        assert_eq!(free_runs(&heap), vec![(xa, USABLE_PAGES)]);
        assert_eq!(heap.dirty_pages, 0);
        assert_eq!(
            src.purged_bytes.load(Ordering::Relaxed),
            purged_before + 14 * PAGE
        );
        assert_eq!(src.unmaps.load(Ordering::Relaxed), 0);
        assert_eq!(heap.counters.mapped, CHUNK);

        // Two whole chunks: when both are free again only one is kept.
        let c1 = take(&mut heap, &src, USABLE_PAGES, 1);
        let c2 = take(&mut heap, &src, USABLE_PAGES, 1);
        assert_eq!(src.maps.load(Ordering::Relaxed), 2);
        assert_eq!(heap.free_chunks, 0);
        check(&heap, &src);
        give(&mut heap, &src, c1);
        give(&mut heap, &src, c2);
        check(&heap, &src);
        assert_eq!(src.unmaps.load(Ordering::Relaxed), 1);
        assert_eq!(src.live(), 1);
        assert_eq!(heap.free_chunks, 1);
        assert_eq!(heap.counters.mapped, CHUNK);
        assert_eq!(heap.counters.chunks_unmapped, 1);
        assert_eq!(free_runs(&heap).len(), 1);
    }

    #[test]
    fn alloc_run_honours_alignment() {
        let src = TestSource::new(16);
        let mut heap = new_heap();
        let mut live = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128] {
            for misalign in 0..3 {
                for n in [1, 3, align, align + 1] {
                    for _ in 0..misalign {
                        live.push(take(&mut heap, &src, 1, 1));
                    }
                    let d = take(&mut heap, &src, n, align);
                    assert_eq!(addr(d) % (align * PAGE), 0, "n {n} align {align}");
                    live.push(d);
                    check(&heap, &src);
                }
            }
        }
        // No two runs overlap.
        let mut ranges: Vec<_> = live.iter().map(|&d| (addr(d), npages(d))).collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(
                w[0].0 + w[0].1 * PAGE <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        // Free in a scrambled order; everything merges back.
        let mut rng = Rng(0x1234_5678_9abc_def1);
        while !live.is_empty() {
            let i = rng.below(live.len());
            let d = live.swap_remove(i);
            give(&mut heap, &src, d);
            check(&heap, &src);
        }
        assert_eq!(heap.counters.runs, 0);
        assert_eq!(src.live(), 1);
        // SAFETY: the test owns the heap.
        unsafe { heap.purge_all(&src) };
        assert_eq!(free_runs(&heap).len(), 1);
        assert_eq!(free_runs(&heap)[0].1, USABLE_PAGES);
    }

    #[test]
    fn grow_and_shrink_in_place() {
        let src = TestSource::new(4);
        let mut heap = new_heap();
        let a = take(&mut heap, &src, 4, 1);
        let b = take(&mut heap, &src, 4, 1);
        let guard = take(&mut heap, &src, 1, 1);
        let aa = addr(a);
        // SAFETY: (for all the calls below) the test owns the heap; `a` heads a live large run.
        unsafe {
            assert!(
                heap.grow_run(&src, a, 4),
                "growing to the same size is a no-op"
            );
            assert!(!heap.grow_run(&src, a, 5), "the next run is in use");
            give(&mut heap, &src, b);
            assert!(heap.grow_run(&src, a, 6));
            assert_eq!(npages(a), 6);
            assert_eq!(run_at(aa + 6 * PAGE), (Kind::Free, 2));
            check(&heap, &src);
            assert!(!heap.grow_run(&src, a, 9), "only two free pages follow");
            assert_eq!(npages(a), 6);
            assert!(heap.grow_run(&src, a, 8), "taking the whole free run");
            assert_eq!(npages(a), 8);
            assert_eq!(run_at(aa + 8 * PAGE).0, Kind::Large); // the guard
            check(&heap, &src);
            assert!(!heap.grow_run(&src, a, 9));

            heap.shrink_run(&src, a, 3);
            assert_eq!(npages(a), 3);
            assert_eq!(run_at(aa + 3 * PAGE), (Kind::Free, 5));
            check(&heap, &src);
            heap.shrink_run(&src, a, 3); // no-op
            heap.shrink_run(&src, a, 7); // no-op: it only shrinks
            assert_eq!(npages(a), 3);
            // Shrinking next to a free run merges the tail into it.
            heap.shrink_run(&src, a, 1);
            assert_eq!(npages(a), 1);
            assert_eq!(run_at(aa + PAGE), (Kind::Free, 7));
            check(&heap, &src);
            assert_eq!(heap.counters.runs, 2);
            // And growing over the merged run works again.
            assert!(heap.grow_run(&src, a, 8));
            check(&heap, &src);
        }
        give(&mut heap, &src, a);
        give(&mut heap, &src, guard);
        check(&heap, &src);
        assert_eq!(heap.counters.runs, 0);
    }

    #[test]
    fn dirty_runs_are_kept_apart_and_purged_past_the_limit() {
        let src = TestSource::new(4);
        let mut heap = new_heap();
        let a = take(&mut heap, &src, 10, 1);
        let _guard = take(&mut heap, &src, 1, 1);
        let b = take(&mut heap, &src, 300, 1);
        let _guard2 = take(&mut heap, &src, 1, 1);
        assert_eq!(heap.dirty_pages, 0);
        give(&mut heap, &src, a);
        give(&mut heap, &src, b);
        assert_eq!(heap.dirty_pages, 310, "freed runs stay dirty, however long");
        assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 0);
        check(&heap, &src);
        // A dirty run is reused before any clean one, although the clean remainder of the
        // chunk would fit too; the part left over stays a dirty free run.
        // SAFETY: the test owns the heap.
        let (d, dirty) = unsafe { heap.alloc_run(&src, 4, 1) };
        assert!(dirty);
        assert_eq!(
            addr(d),
            run_addr(a) as usize,
            "best fit among the dirty runs"
        );
        // SAFETY: `d` heads the run just taken.
        unsafe { (*d).set_kind(Kind::Large) };
        assert_eq!(heap.dirty_pages, 306);
        check(&heap, &src);
        give(&mut heap, &src, d);
        assert_eq!(heap.dirty_pages, 310);
        // Freeing the guard merges it with the dirty run before it, not with the clean
        // remainder after it.
        give(&mut heap, &src, _guard2);
        assert_eq!(heap.dirty_pages, 311);
        check(&heap, &src);
        // SAFETY: the test owns the heap.
        unsafe { heap.purge_all(&src) };
        assert_eq!(heap.dirty_pages, 0);
        assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 311 * PAGE);
        check(&heap, &src);
        // Purged runs merged with the clean remainder: one run from the guard to the end.
        let runs = free_runs(&heap);
        assert_eq!(runs.len(), 2, "{runs:x?}");
        // SAFETY: the test owns the heap.
        let (d, dirty) = unsafe { heap.alloc_run(&src, 10, 1) };
        assert!(!dirty, "a purged run reads zero");
        assert_eq!(addr(d), run_addr(a) as usize);
    }

    #[test]
    fn freeing_past_the_dirty_limit_purges() {
        let src = TestSource::new(64);
        let mut heap = new_heap();
        let n = 500;
        let count = DIRTY_MIN_PAGES / n + 2;
        let runs: Vec<_> = (0..2 * count)
            .map(|_| take(&mut heap, &src, n, 1))
            .collect();
        // Free every other run, so none merge.
        for (i, &d) in runs.iter().enumerate().step_by(2) {
            give(&mut heap, &src, d);
            let freed = (i / 2 + 1) * n;
            if freed <= DIRTY_MIN_PAGES {
                assert_eq!(heap.dirty_pages, freed);
                assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 0);
            }
        }
        assert!(heap.counters.purges >= 1);
        assert!(heap.dirty_pages <= heap.dirty_limit());
        assert!(src.purged_bytes.load(Ordering::Relaxed) > DIRTY_MIN_PAGES * PAGE);
        check(&heap, &src);
    }

    #[test]
    fn exhausted_source_gives_null_and_keeps_the_heap_sound() {
        let src = TestSource::new(1);
        let mut heap = new_heap();
        let a = take(&mut heap, &src, USABLE_PAGES - 8, 1);
        assert!(try_take(&mut heap, &src, 9, 1).is_null());
        // Aligned requests reserve `n + align - 1` pages, so this fails too.
        assert!(try_take(&mut heap, &src, 8, 2).is_null());
        check(&heap, &src);
        let b = take(&mut heap, &src, 8, 1);
        assert!(try_take(&mut heap, &src, 1, 1).is_null());
        check(&heap, &src);
        give(&mut heap, &src, a);
        let c = take(&mut heap, &src, 100, 1);
        check(&heap, &src);
        give(&mut heap, &src, b);
        give(&mut heap, &src, c);
        check(&heap, &src);
        assert_eq!(src.maps.load(Ordering::Relaxed), 1);
        assert_eq!(free_runs(&heap), vec![(addr(a), USABLE_PAGES)]);
    }

    /// Tens of thousands of free runs across many chunks: best fit still picks the shortest
    /// fitting run (checked against a linear scan), runs never overlap, and the invariants
    /// hold throughout.
    #[test]
    fn many_free_runs_stay_correct() {
        const CHUNKS: usize = 80;
        let src = TestSource::new(SLOTS);
        let mut heap = new_heap();
        let mut ones = Vec::with_capacity(CHUNKS * USABLE_PAGES);
        for _ in 0..CHUNKS * USABLE_PAGES {
            ones.push(take(&mut heap, &src, 1, 1));
        }
        assert_eq!(src.maps.load(Ordering::Relaxed), CHUNKS);
        check(&heap, &src);
        // Free every other page: ~40,000 one-page free runs, none adjacent.
        let mut live: BTreeMap<usize, *mut PageDesc> = BTreeMap::new();
        for (i, d) in ones.into_iter().enumerate() {
            if i % 2 == 0 {
                give(&mut heap, &src, d);
            } else {
                live.insert(addr(d), d);
            }
        }
        check(&heap, &src);
        let runs = free_runs(&heap);
        assert!(runs.len() >= 40_000, "{} free runs", runs.len());
        assert!(runs.iter().all(|&(_, n)| n == 1));

        // Random traffic over the fragmented heap.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for step in 0..6000 {
            if live.is_empty() || rng.below(100) < 55 {
                let n = match rng.below(10) {
                    0..=5 => 1 + rng.below(4),
                    6..=8 => 1 + rng.below(40),
                    _ => 1 + rng.below(300),
                };
                let align = [1, 1, 1, 2, 4, 8, 16][rng.below(7)];
                let want = n + align - 1;
                let fit = slow_fit(&heap, want);
                let found = heap
                    .find_fit(&src, want)
                    // SAFETY: a run found on the lists is a free run of a mapped chunk.
                    .map(|d| (unsafe { (*d).dirty } as usize, npages(d)));
                assert_eq!(found, fit, "find_fit({want})");
                let expect_in = fit.map(|(k, len)| (addr(heap.lists[k][len].get(0)), len));
                let d = take(&mut heap, &src, n, align);
                let a = addr(d);
                assert_eq!(a % (align * PAGE), 0);
                if let Some((start, len)) = expect_in {
                    assert!(
                        a >= start && a + n * PAGE <= start + len * PAGE,
                        "run of {n} (align {align}) at {a:#x} not from the best fit \
                         {start:#x}+{len}"
                    );
                }
                // No overlap with the neighbours by address.
                if let Some((&pa, &pd)) = live.range(..a).next_back() {
                    assert!(pa + npages(pd) * PAGE <= a, "overlap below {a:#x}");
                }
                if let Some((&na, _)) = live.range(a..).next() {
                    assert!(a + n * PAGE <= na, "overlap above {a:#x}");
                }
                live.insert(a, d);
            } else {
                // Free a random live run: pick near a random key.
                let key = {
                    let probe = live.keys().next().copied().unwrap() + rng.below(CHUNKS * CHUNK);
                    match live.range(probe..).next() {
                        Some((&k, _)) => k,
                        None => *live.keys().next().unwrap(),
                    }
                };
                let d = live.remove(&key).unwrap();
                give(&mut heap, &src, d);
            }
            if step % 500 == 0 {
                check(&heap, &src);
            }
        }
        check(&heap, &src);
        let allocated: usize = live.values().map(|&d| npages(d)).sum();
        let mut free_total = 0;
        // SAFETY: the test owns the heap.
        unsafe {
            heap.for_each_chunk(&src, |c| free_total += (*c).free_pages);
        }
        let chunks = src.live();
        assert_eq!(free_total + allocated, chunks * USABLE_PAGES);
        assert_eq!(heap.counters.runs, live.len());
        assert_eq!(heap.counters.mapped, chunks * CHUNK);

        for (_, d) in std::mem::take(&mut live) {
            give(&mut heap, &src, d);
        }
        check(&heap, &src);
        assert_eq!(heap.counters.runs, 0);
        assert_eq!(src.live(), 1, "all but the spare chunk are unmapped");
        // The spare is free runs of both kinds side by side; purged, it is one run.
        let runs = free_runs(&heap);
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), USABLE_PAGES);
        // SAFETY: the test owns the heap.
        unsafe { heap.purge_all(&src) };
        check(&heap, &src);
        assert_eq!(free_runs(&heap).len(), 1);
    }

    #[test]
    fn old_dirty_runs_decay_and_refused_purges_keep_runs_dirty() {
        let src = TestSource::new(4);
        let mut heap = new_heap();
        // SAFETY: here and below, the test owns the heap.
        unsafe { heap.decay(&src, 10_000) };
        let a = take(&mut heap, &src, 10, 1);
        let _guard = take(&mut heap, &src, 1, 1);
        let b = take(&mut heap, &src, 20, 1);
        let _guard2 = take(&mut heap, &src, 1, 1);
        give(&mut heap, &src, a); // stamped 10_000
                                  // SAFETY: the test owns the heap.
        unsafe { heap.decay(&src, 10_600) };
        give(&mut heap, &src, b); // stamped 10_600
        assert_eq!(heap.dirty_pages, 30);
        // Not yet a second old: nothing purged.
        // SAFETY: the test owns the heap.
        unsafe { heap.decay(&src, 10_900) };
        assert_eq!(heap.dirty_pages, 30);
        // `a` is past the decay time, `b` is not.
        // SAFETY: the test owns the heap.
        unsafe { heap.decay(&src, 11_050) };
        assert_eq!(heap.dirty_pages, 20);
        assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 10 * PAGE);
        check(&heap, &src);
        // `b` goes once it is a second old.
        // SAFETY: the test owns the heap.
        unsafe { heap.decay(&src, 11_700) };
        assert_eq!(heap.dirty_pages, 0, "b decays at the next tick");
        check(&heap, &src);

        // A source that refuses to purge: the run stays dirty, and nothing reads as zero
        // that is not.
        let c = take(&mut heap, &src, 5, 1);
        give(&mut heap, &src, c);
        src.refuse_purge.store(true, Ordering::Relaxed);
        // SAFETY: the test owns the heap.
        assert!(!unsafe { heap.purge_all(&src) });
        assert_eq!(heap.dirty_pages, 5);
        check(&heap, &src);
        // SAFETY: the test owns the heap.
        let (d, dirty) = unsafe { heap.alloc_run(&src, 5, 1) };
        assert!(dirty, "a run whose purge failed is still dirty");
        // SAFETY: the test owns the heap; `d` heads the run just taken.
        unsafe { (*d).set_kind(Kind::Large) };
        give(&mut heap, &src, d);
        // Decay does not retry after a refusal; an explicit purge does.
        // SAFETY: the test owns the heap.
        unsafe { heap.decay(&src, 20_000) };
        assert_eq!(heap.dirty_pages, 5);
        src.refuse_purge.store(false, Ordering::Relaxed);
        // SAFETY: the test owns the heap.
        assert!(unsafe { heap.purge_all(&src) });
        assert_eq!(heap.dirty_pages, 0);
        check(&heap, &src);
    }
}
