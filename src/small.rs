//! Small blocks: page runs cut into blocks of one size class.
//!
//! Each arena has one bin per class: a list of its runs that have a block to give (a free
//! block on the run's own list, or blocks never carved). A run is carved lazily: `bump`
//! counts the blocks handed out at least once, so a fresh run's blocks are touched only as
//! they are handed out (one by one, or a batch at a time for the CPU caches:
//! [`SmallBins::alloc_bulk`]) and its untouched blocks stay zero (which `calloc` uses).
//! Batches come back grouped by run ([`RunGroup`]), each run's descriptor updated once. A block in use carries no header: its
//! run's descriptor in the chunk header holds the class and counts.
//!
//! Invariants, per run `r` of class `c` (checked by [`SmallBins::check`]):
//! - `r.used + len(r.free) == r.bump <= run_blocks(c)`;
//! - `r.in_bin` iff `r` is on bin `c`'s list; a run off the list has no block to give;
//! - a run with `used == 0` is on its bin only while it is the bin's only run, and never for
//!   a class above 8 KiB (`TABLE_CLASSES` on).
//!
//! The bins' heads, the runs' links and free lists, and the encoded links in free blocks are
//! stored relative to the page source's base (`chunk::Rel`, `chunk::to_rel`); the functions
//! that follow them take `base` or the source.

use core::ptr;

use crate::chunk::{
    decode_link, encode_link, from_rel, header_of_desc, run_addr, to_rel, Block, Kind, PageDesc,
    Rel,
};
use crate::large::PageHeap;
use crate::size_class::{
    block_index, class_size, is_block_offset, marked_pages, run_blocks, run_pages, NUM_CLASSES,
    TABLE_CLASSES,
};
use crate::source::PageSource;

/// Counters per size class (guarded by the arena lock).
#[derive(Clone, Copy, Default, Debug)]
pub struct ClassCounters {
    pub allocs: u64,
    pub frees: u64,
    pub runs: u64,
}

/// The bins of one arena.
pub struct SmallBins {
    heads: [Rel<PageDesc>; NUM_CLASSES],
    pub counters: [ClassCounters; NUM_CLASSES],
    /// Bytes of the blocks handed out and not yet taken back, all classes:
    /// `sum over c of (counters[c].allocs - counters[c].frees) * class_size(c)`.
    pub bytes: usize,
    /// The arena's secret for free-list links ([`encode_link`]).
    key: usize,
    /// Debug mode: a run's memory is zeroed when it goes back to the page heap, so that no
    /// "freed" tag of one of its blocks outlives the run (see `debug.rs`).
    scrub: bool,
}

impl SmallBins {
    pub const fn new() -> Self {
        Self {
            heads: [Rel::NULL; NUM_CLASSES],
            counters: [ClassCounters {
                allocs: 0,
                frees: 0,
                runs: 0,
            }; NUM_CLASSES],
            bytes: 0,
            key: 0,
            scrub: false,
        }
    }

    /// Debug mode: zero runs that go back to the page heap.
    pub fn set_scrub(&mut self, on: bool) {
        self.scrub = on;
    }

    /// Sets the secret that encodes free-list links (before the first block is freed).
    pub fn set_key(&mut self, key: usize) {
        self.key = key;
    }

    /// The secret that encodes free-list links.
    pub fn key(&self) -> usize {
        self.key
    }

    /// The next block after `b` on the free list of run `r` (of class `class`), checked: null
    /// or a block boundary inside the run.
    ///
    /// # Safety
    /// `b` is on the free list of run `r` of this arena.
    #[inline(always)]
    unsafe fn next_of<S: PageSource>(
        &self,
        src: &S,
        r: *mut PageDesc,
        b: *mut Block,
        class: usize,
    ) -> *mut Block {
        // SAFETY: by the contract `b` is a free block whose first word is its link, and `r`
        // a live run head.
        let (next, start) = unsafe { (link_of(src, b, self.key), run_addr(r)) };
        let off = next.wrapping_sub(start as usize);
        let size = class_size(class);
        let bad = next != 0 && (off >= run_blocks(class) * size || !is_block_offset(off, class));
        if bad && !cfg!(feature = "unhardened") {
            let h = crate::chunk::chunk_of(b as *const u8) as *const crate::chunk::ChunkHeader;
            // SAFETY: `b` lies in a chunk of ours, whose header is readable.
            corrupt_link(b, unsafe { (*h).arena }, class_size(class));
        }
        next as *mut Block
    }

    /// Takes a block of class `class` from the first run of its bin, if that run has one.
    /// Returns the block and whether it is known to read zero.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    #[inline]
    pub unsafe fn alloc_fast<S: PageSource>(
        &mut self,
        src: &S,
        class: usize,
    ) -> Option<(*mut u8, bool)> {
        let base = src.base();
        let r = self.heads[class].get(base);
        if r.is_null() {
            return None;
        }
        // SAFETY: runs on a bin are live small runs of this arena; the lock is held.
        unsafe {
            let b = (*r).free.get(base);
            if !b.is_null() {
                (*r).free = Rel::new(self.next_of(src, r, b, class), base);
                // Handed out: neither the encoded link nor a stale mark may show.
                (*b).link = 0;
                // The block is in use now: a stale mark must not look like a double free.
                (*b).mark = 0;
                (*r).used += 1;
                self.counters[class].allocs += 1;
                self.bytes += class_size(class);
                return Some((b.cast(), false));
            }
            if ((*r).bump as usize) < run_blocks(class) {
                let p = run_addr(r).add((*r).bump as usize * class_size(class));
                if (*r).dirty {
                    // Reused pages may hold an old double-free mark here.
                    (*p.cast::<Block>()).mark = 0;
                }
                (*r).bump += 1;
                (*r).used += 1;
                self.counters[class].allocs += 1;
                self.bytes += class_size(class);
                return Some((p, !(*r).dirty));
            }
        }
        None
    }

    /// The slow path: drops exhausted runs from the bin, then carves a new run from `heap`.
    /// The caller drains pending frees before calling this.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    #[cold]
    #[inline(never)]
    pub unsafe fn alloc_refill<S: PageSource>(
        &mut self,
        heap: &mut PageHeap,
        src: &S,
        class: usize,
    ) -> Option<(*mut u8, bool)> {
        let base = src.base();
        // SAFETY: the lock is held; runs on the bin are ours.
        unsafe {
            loop {
                if let Some(r) = self.alloc_fast(src, class) {
                    return Some(r);
                }
                let r = self.heads[class].get(base);
                if r.is_null() {
                    break;
                }
                self.unlink(src, class, r);
            }
            // A run's birth, from the page heap's lists to the bin, is one page-run update
            // for a shared heap's recovery (`PageHeap::enter`).
            heap.enter::<S>();
            let (r, dirty) = heap.alloc_run(src, run_pages(class), 1);
            if r.is_null() {
                heap.leave::<S>();
                return None;
            }
            let h = header_of_desc(r);
            let first = (*h).desc_index(r);
            (*r).set_class(class);
            // Block starts are found from any page of the run by its distance back to the
            // first page (`small_block_start`): 0 here, whatever the page was before.
            (*r).set_lead(0);
            (*r).dirty = dirty;
            (*r).used = 0;
            (*r).bump = 0;
            (*r).free = Rel::NULL;
            // The first page's kind is set after its class, the other pages' after it: a
            // racing validator that sees Small (or SmallInterior, with `lookup_small`) sees
            // the class too, and sees no page of a run whose first page is not Small yet.
            (*r).set_kind(Kind::Small);
            // (Pages where no block starts, in runs of the large classes, stay `Interior`,
            // as the page heap hands them over.)
            for j in marked_pages(class) {
                let d = &(*h).pages[first + j];
                d.set_lead(j);
                d.set_class(class);
                d.set_kind(Kind::SmallInterior);
            }
            self.counters[class].runs += 1;
            self.link(src, class, r);
            heap.leave::<S>();
            self.alloc_fast(src, class)
        }
    }

    /// Returns block `b` to run `r`; gives the run back to `heap` when it is empty and not
    /// the bin's only run.
    ///
    /// # Safety
    /// The caller holds the arena lock; `r` is the small run of this arena holding `b`, and
    /// `b` is in use (counted in `used`).
    pub unsafe fn free<S: PageSource>(
        &mut self,
        heap: &mut PageHeap,
        src: &S,
        r: *mut PageDesc,
        b: *mut Block,
    ) {
        let base = src.base();
        // SAFETY: as the contract says; the index check below catches a caller that broke it
        // by freeing a stale pointer into a run that was recycled.
        unsafe {
            let class = (*r).class();
            // A multiplication, not a division, on every small free.
            let index = block_index(b as usize - run_addr(r) as usize, class);
            if index >= (*r).bump as usize || (*r).used == 0 {
                // Never handed out by this run: the pointer is stale, freed twice across a
                // recycling of its pages.
                crate::diag::block_error(
                    b"free(): double free detected",
                    b.cast(),
                    Some((*header_of_desc(r)).arena),
                    class_size(class),
                );
            }
            let rb = Rel::new(b, base);
            (*b).link = encode_link((*r).free.bits(), rb.bits(), self.key);
            (*r).free = rb;
            (*r).used -= 1;
            self.counters[class].frees += 1;
            self.bytes -= class_size(class);
            if !(*r).in_bin {
                self.link(src, class, r);
            }
            self.release_if_empty(heap, src, class, r);
        }
    }

    /// Gives run `r` of bin `class` back to `heap` if it is empty and not the bin's only
    /// run; a large class's empty run goes back even as its bin's only run: kept, up to
    /// 256 KiB per class and arena would stay resident past the page heap's decay.
    ///
    /// # Safety
    /// The caller holds the arena lock; `r` is a small run of bin `class`, on the bin.
    unsafe fn release_if_empty<S: PageSource>(
        &mut self,
        heap: &mut PageHeap,
        src: &S,
        class: usize,
        r: *mut PageDesc,
    ) {
        // SAFETY: as the contract says.
        unsafe {
            let only = (*r).next.is_null() && (*r).prev.is_null();
            if (*r).used == 0 && (!only || class >= TABLE_CLASSES) {
                self.release(heap, src, class, r);
            }
        }
    }

    /// Takes up to `n` blocks of class `class` from the runs on its bin, in bulk: each run's
    /// free list is walked first, then its never-carved blocks are cut in one pass, and the
    /// run's counts are updated once. Each block gets `mark` in its second word (its first
    /// still holds a stale link, which the caller overwrites) and is handed to `sink` (at
    /// most `n` calls), in the order the bins hand blocks out (ascending addresses among
    /// fresh ones). Exhausted runs leave the bin. Returns the number of blocks; no run is
    /// carved from the page heap here.
    ///
    /// # Safety
    /// The caller holds the arena lock; the blocks handed to `sink` are the caller's,
    /// counted in use by their runs.
    pub unsafe fn alloc_bulk<S: PageSource>(
        &mut self,
        src: &S,
        class: usize,
        n: usize,
        mark: usize,
        mut sink: impl FnMut(*mut u8),
    ) -> usize {
        let base = src.base();
        let size = class_size(class);
        let cap = run_blocks(class);
        let mut k = 0;
        // SAFETY: runs on a bin are live small runs of this arena; the lock is held, so
        // their free blocks and uncarved blocks are ours to hand out.
        unsafe {
            while k < n {
                let r = self.heads[class].get(base);
                if r.is_null() {
                    break;
                }
                let mut got = 0;
                let mut f = (*r).free.get(base);
                while got < n - k && !f.is_null() {
                    let next = self.next_of(src, r, f, class);
                    (*f).mark = mark;
                    sink(f.cast());
                    f = next;
                    got += 1;
                }
                (*r).free = Rel::new(f, base);
                let bump = (*r).bump as usize;
                let fresh = (n - k - got).min(cap - bump);
                let mut p = run_addr(r).add(bump * size);
                for _ in 0..fresh {
                    (*p.cast::<Block>()).mark = mark;
                    sink(p);
                    p = p.add(size);
                }
                got += fresh;
                (*r).bump = (bump + fresh) as u32;
                (*r).used += got as u32;
                self.counters[class].allocs += got as u64;
                self.bytes += got * size;
                k += got;
                if f.is_null() && bump + fresh == cap {
                    // Nothing left to give: off the bin (as `alloc_refill` would on its way).
                    self.unlink(src, class, r);
                }
            }
        }
        k
    }

    /// Starts a group of blocks going back to run `r` (see [`RunGroup`]) with block `b`.
    /// Aborts, naming `b`, if `b` was never handed out by `r` or `r` has none in use (a stale
    /// pointer freed twice across a recycling of its pages, as [`SmallBins::free`] checks).
    ///
    /// # Safety
    /// The caller holds the arena lock; `g` is empty (ended); `r` is the small run of this
    /// arena that `lookup` found for `b`, a block boundary of it.
    #[inline]
    pub unsafe fn group_start(&self, g: &mut RunGroup, r: *mut PageDesc, b: *mut Block) {
        debug_assert!(g.run.is_null());
        // SAFETY: by the contract `r` is a live small run of ours, under the lock.
        unsafe {
            let class = (*r).class();
            *g = RunGroup {
                run: r,
                start: run_addr(r) as usize,
                span: (*r).bump as usize * class_size(class),
                class,
                head: (*r).free,
                used: (*r).used,
                k: 0,
            };
            if !g.holds(b) {
                crate::diag::block_error(
                    b"free(): double free detected",
                    b.cast(),
                    Some((*header_of_desc(r)).arena),
                    class_size(class),
                );
            }
        }
    }

    /// Adds `b`, which `g.holds(b)` said is a carved block of the group's run, in front of the
    /// group's list. Aborts, naming `b`, when the run would have more blocks back than it
    /// counts in use (a double free), as [`SmallBins::free`] does.
    ///
    /// # Safety
    /// The caller holds the arena lock; `g` was started by these bins; `b` is the caller's, a
    /// free block counted in use by the group's run, on no list, and `g.holds(b)`.
    #[inline(always)]
    pub unsafe fn group_push<S: PageSource>(&self, src: &S, g: &mut RunGroup, b: *mut Block) {
        if g.k >= g.used {
            // SAFETY: `g.run` is a live run of ours (contract).
            let arena = unsafe { (*header_of_desc(g.run)).arena };
            crate::diag::block_error(
                b"free(): double free detected",
                b.cast(),
                Some(arena),
                class_size(g.class),
            );
        }
        let rb = Rel::new(b, src.base());
        // SAFETY: the block is ours to write (contract).
        unsafe { (*b).link = encode_link(g.head.bits(), rb.bits(), self.key) };
        g.head = rb;
        g.k += 1;
    }

    /// Ends group `g`: its blocks join their run's free list and the run's count, the run
    /// goes on its bin if it was off it, and back to `heap` if it is empty and not the bin's
    /// only run (as [`SmallBins::free`] does for one block). `g` is empty afterwards.
    ///
    /// # Safety
    /// The caller holds the arena lock; `g` is empty or was started by these bins and no
    /// block of its run was freed or handed out since, other than through `g`.
    #[inline]
    pub unsafe fn group_end<S: PageSource>(
        &mut self,
        heap: &mut PageHeap,
        src: &S,
        g: &mut RunGroup,
    ) {
        let r = g.run;
        if r.is_null() {
            return;
        }
        g.run = ptr::null_mut();
        g.span = 0;
        // SAFETY: by the contract `r` is a live small run of ours, unchanged since the group
        // started, and the group's list leads to its old free list.
        unsafe {
            (*r).free = g.head;
            (*r).used -= g.k;
            self.counters[g.class].frees += g.k as u64;
            self.bytes -= g.k as usize * class_size(g.class);
            if !(*r).in_bin {
                self.link(src, g.class, r);
            }
            self.release_if_empty(heap, src, g.class, r);
        }
    }

    /// Gives the empty run `r` of bin `class` back to `heap`.
    ///
    /// # Safety
    /// The caller holds the arena lock; `r` is an empty small run on bin `class`.
    unsafe fn release<S: PageSource>(
        &mut self,
        heap: &mut PageHeap,
        src: &S,
        class: usize,
        r: *mut PageDesc,
    ) {
        // SAFETY: by the contract.
        unsafe {
            {
                // A run's death, from the bin to the page heap's lists: one update.
                heap.enter::<S>();
                self.unlink(src, class, r);
                let h = header_of_desc(r);
                let first = (*h).desc_index(r);
                for j in marked_pages(class) {
                    (*h).pages[first + j].set_kind(Kind::Interior);
                }
                (*r).set_kind(Kind::Large);
                (*r).free = Rel::NULL;
                if self.scrub {
                    ptr::write_bytes(run_addr(r), 0, run_pages(class) * crate::size_class::PAGE);
                }
                heap.free_run(src, r);
                heap.leave::<S>();
            }
        }
    }

    #[cfg(feature = "test-hooks")]
    /// Tests: what a holder killed in `alloc_fast` between unlinking a block and counting
    /// it leaves: the first run with a free block loses that block from its list, its
    /// count unchanged.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    #[doc(hidden)]
    pub unsafe fn damage_for_test<S: PageSource>(&mut self, src: &S) {
        let base = src.base();
        for class in 0..NUM_CLASSES {
            let r = self.heads[class].get(base);
            // SAFETY: runs on the bins are ours; the lock is held.
            unsafe {
                if !r.is_null() && !(*r).free.is_null() {
                    let b = (*r).free.get(base);
                    (*r).free = Rel::new(self.next_of(src, r, b, class), base);
                    return;
                }
            }
        }
    }

    /// Shared heaps, after a lock holder died outside any page-run update
    /// ([`PageHeap::busy`] false): the page runs and free lists are sound, but a bin list,
    /// a run's free list or its counts may be half-updated. Rebuilds them from the runs:
    /// each small run's free list is walked (checked: inside the run, at block boundaries,
    /// no longer than the run); a sound list sets `used = bump - len`, a broken one is
    /// dropped (its blocks count as used: leaked, never handed out twice). The bins are
    /// linked anew, empty runs beyond one per class go back to `heap`, and the class
    /// counters are made to agree with the runs. Returns the number of small runs.
    ///
    /// # Safety
    /// The caller holds the arena lock; `heap` is this arena's page heap, sound.
    pub unsafe fn rebuild<S: PageSource>(&mut self, heap: &mut PageHeap, src: &S) -> usize {
        let base = src.base();
        let key = self.key;
        let mut in_use = [0u64; NUM_CLASSES];
        let mut runs = 0;
        self.heads = [Rel::NULL; NUM_CLASSES];
        // SAFETY: the lock is held; the chunks and their run partitions are sound.
        unsafe {
            heap.for_each_chunk(src, |c| {
                let mut i = crate::chunk::HEADER_PAGES;
                while i < crate::size_class::CHUNK_PAGES {
                    let r = &mut (*c).pages[i] as *mut PageDesc;
                    let n = ((*r).npages as usize).max(1);
                    if (*r).kind() == Kind::Small {
                        runs += 1;
                        let class = (*r).class();
                        let cap = run_blocks(class);
                        let start = run_addr(r) as usize;
                        let size = class_size(class);
                        let mut len = 0usize;
                        let mut f = (*r).free.get(base) as usize;
                        let mut sound = ((*r).bump as usize) <= cap;
                        while sound && f != 0 {
                            let off = f.wrapping_sub(start);
                            if off >= ((*r).bump as usize) * size
                                || !off.is_multiple_of(size)
                                || len >= cap
                            {
                                sound = false;
                                break;
                            }
                            len += 1;
                            f = from_rel(
                                decode_link((*(f as *mut Block)).link, to_rel(f, base), key),
                                base,
                            );
                        }
                        if !sound || len > (*r).bump as usize {
                            (*r).free = Rel::NULL;
                            (*r).bump = ((*r).bump as usize).min(cap) as u32;
                            len = 0;
                        }
                        (*r).used = (*r).bump - len as u32;
                        (*r).next = Rel::NULL;
                        (*r).prev = Rel::NULL;
                        (*r).in_bin = false;
                        in_use[class] += (*r).used as u64;
                        let gives = !(*r).free.is_null() || ((*r).bump as usize) < cap;
                        if gives {
                            self.link(src, class, r);
                        }
                    }
                    i += n;
                }
            });
            // An empty run stays on its bin only as the bin's only run of a class up to 8
            // KiB (the invariant of `free`): with other runs there, every empty one goes back.
            #[allow(clippy::needless_range_loop)] // `class` indexes the bins too
            for class in 0..NUM_CLASSES {
                let mut busy_runs = 0;
                let mut r = self.heads[class].get(base);
                while !r.is_null() {
                    busy_runs += ((*r).used != 0) as usize;
                    r = (*r).next.get(base);
                }
                let mut kept = busy_runs > 0 || class >= TABLE_CLASSES;
                let mut r = self.heads[class].get(base);
                while !r.is_null() {
                    let next = (*r).next.get(base);
                    if (*r).used == 0 {
                        if kept {
                            self.release(heap, src, class, r);
                            runs -= 1;
                        }
                        kept = true;
                    }
                    r = next;
                }
                let k = &mut self.counters[class];
                k.allocs = k.allocs.max(in_use[class]);
                k.frees = k.allocs - in_use[class];
            }
            self.bytes = (0..NUM_CLASSES)
                .map(|c| in_use[c] as usize * class_size(c))
                .sum();
        }
        runs
    }

    /// Whether `b` is on the free list of run `r` (for double-free confirmation).
    ///
    /// # Safety
    /// The caller holds the arena lock; `r` is a small run of this arena.
    pub unsafe fn run_has_free<S: PageSource>(
        &self,
        src: &S,
        r: *mut PageDesc,
        b: *mut Block,
    ) -> bool {
        // SAFETY: the run's free list holds blocks of the run, linked under the lock.
        unsafe {
            let mut f = (*r).free.get(src.base());
            // Bounded: a list longer than its run has a cycle (a corrupted link).
            for _ in 0..=run_blocks((*r).class()) {
                if f.is_null() {
                    return false;
                }
                if f == b {
                    return true;
                }
                f = self.next_of(src, r, f, (*r).class());
            }
        }
        crate::diag::invalid_pointer(b"coreheap: free list of a run has a cycle", b.cast())
    }

    /// Puts run `r` at the front of bin `class`.
    unsafe fn link<S: PageSource>(&mut self, src: &S, class: usize, r: *mut PageDesc) {
        let base = src.base();
        // SAFETY: `r` is a small run of this arena on no list.
        unsafe {
            let rr = Rel::new(r, base);
            (*r).prev = Rel::NULL;
            (*r).next = self.heads[class];
            if !(*r).next.is_null() {
                (*(*r).next.get(base)).prev = rr;
            }
            self.heads[class] = rr;
            (*r).in_bin = true;
        }
    }

    /// Takes run `r` off bin `class`.
    unsafe fn unlink<S: PageSource>(&mut self, src: &S, class: usize, r: *mut PageDesc) {
        let base = src.base();
        // SAFETY: `r` is on bin `class`.
        unsafe {
            if (*r).prev.is_null() {
                self.heads[class] = (*r).next;
            } else {
                (*(*r).prev.get(base)).next = (*r).next;
            }
            if !(*r).next.is_null() {
                (*(*r).next.get(base)).prev = (*r).prev;
            }
            (*r).next = Rel::NULL;
            (*r).prev = Rel::NULL;
            (*r).in_bin = false;
        }
    }

    /// Verifies the bin invariants for the runs on the bins, and `run`'s counts.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn check<S: PageSource>(&self, src: &S) -> Result<(), &'static str> {
        let base = src.base();
        for class in 0..NUM_CLASSES {
            let mut r = self.heads[class].get(base);
            while !r.is_null() {
                // SAFETY: runs on the bins are ours.
                unsafe {
                    if (*r).kind() != Kind::Small || (*r).class() != class || !(*r).in_bin {
                        return Err("bin holds a run of another class");
                    }
                    check_run(src, r, self.key)?;
                    // A small class may keep an empty run (its only one when it emptied);
                    // a large class never does.
                    if (*r).used == 0 && class >= TABLE_CLASSES {
                        return Err("bin of a large class keeps an empty run");
                    }
                    r = (*r).next.get(base);
                }
            }
        }
        Ok(())
    }
}

/// Verifies `used + len(free) == bump <= capacity`, that free blocks lie in the run at
/// block boundaries (links decoded with the arena's `key`) and that the head's `lead` is 0.
///
/// # Safety
/// The caller holds the arena lock; `r` heads a small run.
pub unsafe fn check_run<S: PageSource>(
    src: &S,
    r: *mut PageDesc,
    key: usize,
) -> Result<(), &'static str> {
    // SAFETY: as the contract says.
    unsafe {
        let class = (*r).class();
        let start = run_addr(r) as usize;
        let size = class_size(class);
        let cap = run_blocks(class);
        let mut n = 0usize;
        let mut f = (*r).free.get(src.base());
        while !f.is_null() {
            let a = f as usize;
            if a < start || a >= start + cap * size || !(a - start).is_multiple_of(size) {
                return Err("free list leaves its run");
            }
            n += 1;
            if n > cap {
                return Err("free list longer than its run (a cycle?)");
            }
            f = link_of(src, f, key) as *mut Block;
        }
        if (*r).used as usize + n != (*r).bump as usize || (*r).bump as usize > cap {
            return Err("small run counts do not add up");
        }
        if (*r).lead() != 0 {
            // Block starts would be found at the wrong offsets (`small_block_start`).
            return Err("small run head with a lead");
        }
    }
    Ok(())
}

/// The address (0 for none) that the link in free block `b` leads to, decoded with the
/// arena's `key`; nothing checked.
///
/// # Safety
/// `b` is a free block on a run's list (readable).
#[inline(always)]
unsafe fn link_of<S: PageSource>(src: &S, b: *mut Block, key: usize) -> usize {
    let base = src.base();
    // SAFETY: by the contract.
    let stored = unsafe { (*b).link };
    from_rel(decode_link(stored, to_rel(b as usize, base), key), base)
}

/// A free-list link that decodes to an impossible address: something wrote into the free
/// block `b` (an overflow from the block before it, or a write after free).
#[cold]
#[inline(never)]
pub fn corrupt_link(b: *mut Block, arena: u32, size: usize) -> ! {
    crate::diag::block_error(
        b"coreheap: corrupted free list (a write into a freed block)",
        b.cast(),
        Some(arena),
        size,
    )
}

/// Blocks on their way back to one run, linked in front of its free list as they come, so
/// that the run's descriptor (free list, count, bin) is updated once per group, not per block
/// ([`SmallBins::group_start`], [`SmallBins::group_push`], [`SmallBins::group_end`]). The
/// blocks of a returned chain mostly come from few runs, one after another.
///
/// Invariant: `run` is null (empty: `span == 0`, so no block is held), or a small run of the
/// arena whose bins started the group, whose lock is held from start to end; then `head` is
/// the run's free list at the start with the group's `k` blocks pushed in front, `used` its
/// count of blocks in use at the start (`k <= used`), and `span` the bytes of its carved
/// blocks (`bump * size`) from `start`.
pub struct RunGroup {
    run: *mut PageDesc,
    start: usize,
    span: usize,
    class: usize,
    head: Rel<Block>,
    used: u32,
    k: u32,
}

impl RunGroup {
    pub const fn new() -> Self {
        Self {
            run: ptr::null_mut(),
            start: 0,
            span: 0,
            class: 0,
            head: Rel::NULL,
            used: 0,
            k: 0,
        }
    }

    /// Whether `b` is a block boundary among the carved blocks of the group's run (never for
    /// an empty group). Reads nothing through `b`.
    #[inline(always)]
    pub fn holds(&self, b: *mut Block) -> bool {
        let off = (b as usize).wrapping_sub(self.start);
        off < self.span && is_block_offset(off, self.class)
    }
}

impl Default for RunGroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for SmallBins {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::{lookup, Lookup};
    use crate::size_class::PAGE;
    use crate::test_support::TestSource;

    fn alloc(
        bins: &mut SmallBins,
        heap: &mut PageHeap,
        src: &TestSource,
        class: usize,
    ) -> (*mut u8, bool) {
        // SAFETY: the test owns the bins and the heap (the arena lock's role).
        unsafe {
            bins.alloc_fast(src, class)
                .or_else(|| bins.alloc_refill(heap, src, class))
                .expect("small allocation failed")
        }
    }

    fn run_of(src: &TestSource, p: *mut u8) -> *mut PageDesc {
        match lookup(src, p) {
            Lookup::Small { run, .. } => run,
            other => panic!("{p:?} is not a small block: {other:?}"),
        }
    }

    fn check_all(bins: &SmallBins, heap: &PageHeap, src: &TestSource) {
        // SAFETY: the test owns the bins and the heap.
        unsafe {
            assert_eq!(bins.check(src), Ok(()));
            assert_eq!(heap.check(src), Ok(()));
        }
    }

    #[test]
    fn runs_are_carved_lazily_reused_and_returned() {
        let src = TestSource::new(4);
        let mut heap = Box::new(PageHeap::new(0));
        let mut bins = SmallBins::new();
        let class = crate::size_class::class_for(128, 1);
        let cs = class_size(class);
        assert_eq!(cs, 128);
        let cap = run_blocks(class);

        // Three runs' worth and one more block: four runs, blocks handed out in address order
        // within a run, all reading zero (fresh memory).
        let mut blocks = Vec::new();
        for _ in 0..3 * cap + 1 {
            let (p, zero) = alloc(&mut bins, &mut heap, &src, class);
            assert!(zero, "a block never used reads zero");
            assert_eq!(p as usize % cs, 0);
            blocks.push(p);
        }
        assert_eq!(bins.counters[class].runs, 4);
        assert_eq!(bins.counters[class].allocs, 3 * cap as u64 + 1);
        assert_eq!(heap.counters.runs, 4);
        let first_run = run_of(&src, blocks[0]);
        for (i, &p) in blocks[..cap].iter().enumerate() {
            assert_eq!(p as usize, run_addr(first_run) as usize + i * cs);
            assert_eq!(run_of(&src, p), first_run);
        }
        // SAFETY: `first_run` heads a small run of these bins.
        unsafe {
            assert_eq!((*first_run).used as usize, cap);
            assert_eq!((*first_run).bump as usize, cap);
            assert_eq!(check_run(&src, first_run, 0), Ok(()));
            assert_eq!((*first_run).npages as usize, run_pages(class));
            assert_eq!(run_pages(class) * PAGE, cap * cs);
        }
        check_all(&bins, &heap, &src);

        // A freed block is reused first (and its double-free mark cleared).
        let p = blocks[5];
        // SAFETY: `p` is in use in `first_run`; it is freed once and then reallocated.
        unsafe {
            (*p.cast::<Block>()).mark = 0xdead;
            bins.free(&mut heap, &src, first_run, p.cast());
            assert!(bins.run_has_free(&src, first_run, p.cast()));
            assert_eq!(check_run(&src, first_run, 0), Ok(()));
        }
        check_all(&bins, &heap, &src);
        let (q, zero) = alloc(&mut bins, &mut heap, &src, class);
        assert_eq!(q, p);
        assert!(!zero, "a reused block may hold old data");
        // SAFETY: `q` is a live block of at least 16 bytes.
        unsafe {
            assert_eq!((*q.cast::<Block>()).mark, 0);
            assert!(!bins.run_has_free(&src, first_run, q.cast()));
        }

        // Emptying a run that is not the bin's only run gives its pages back.
        for &p in &blocks[..cap] {
            // SAFETY: each block is in use and freed once.
            unsafe { bins.free(&mut heap, &src, first_run, p.cast()) };
        }
        assert_eq!(heap.counters.runs, 3);
        assert!(matches!(lookup(&src, blocks[0]), Lookup::Invalid));
        check_all(&bins, &heap, &src);

        // Free the rest: the last empty run stays on its bin, the others are returned.
        for &p in &blocks[cap..] {
            let r = run_of(&src, p);
            // SAFETY: each block is in use and freed once.
            unsafe { bins.free(&mut heap, &src, r, p.cast()) };
        }
        check_all(&bins, &heap, &src);
        assert_eq!(heap.counters.runs, 1);
        assert_eq!(
            bins.counters[class].frees, bins.counters[class].allocs,
            "every allocation was freed"
        );
        // The kept run serves the next allocation without a new run.
        let (p, _) = alloc(&mut bins, &mut heap, &src, class);
        assert_eq!(heap.counters.runs, 1);
        assert_eq!(bins.counters[class].runs, 4);
        let r = run_of(&src, p);
        // SAFETY: `p` is in use in `r`.
        unsafe { bins.free(&mut heap, &src, r, p.cast()) };
        check_all(&bins, &heap, &src);
    }

    /// Returns `blocks` (in use) to their runs in groups, as `Arena::free_blocks` does.
    fn give_back(bins: &mut SmallBins, heap: &mut PageHeap, src: &TestSource, blocks: &[*mut u8]) {
        let mut g = RunGroup::new();
        for &p in blocks {
            let bp = p.cast::<Block>();
            if !g.holds(bp) {
                // SAFETY: the test owns the bins (the lock's role); `p` is a block in use of
                // its run, which `lookup` finds.
                unsafe {
                    bins.group_end(heap, src, &mut g);
                    bins.group_start(&mut g, run_of(src, p), bp);
                }
            }
            // SAFETY: as above; `g` holds `p`'s run.
            unsafe { bins.group_push(src, &mut g, bp) };
        }
        // SAFETY: as above.
        unsafe { bins.group_end(heap, src, &mut g) };
    }

    #[test]
    fn bulk_carve_and_grouped_return_keep_the_counts() {
        let src = TestSource::new(4);
        let mut heap = Box::new(PageHeap::new(0));
        let mut bins = SmallBins::new();
        let class = crate::size_class::class_for(64, 1);
        let cap = run_blocks(class);
        let mark = 0x5a5a;

        // A first run, with a few blocks freed one by one: its free list, then fresh blocks.
        let mut single = Vec::new();
        for _ in 0..8 {
            single.push(alloc(&mut bins, &mut heap, &src, class).0);
        }
        let r0 = run_of(&src, single[0]);
        for &p in &single[2..5] {
            // SAFETY: each block is in use in `r0` and freed once.
            unsafe { bins.free(&mut heap, &src, r0, p.cast()) };
        }
        let mut got = Vec::new();
        // SAFETY: the test owns the bins (the lock's role); the blocks become ours.
        let n = unsafe { bins.alloc_bulk(&src, class, 10, mark, |b| got.push(b)) };
        assert_eq!(n, 10);
        assert_eq!(got.len(), 10);
        // The three freed blocks first (their list is LIFO), then fresh ones in address order.
        let mut freed: Vec<_> = single[2..5].to_vec();
        freed.reverse();
        assert_eq!(got[..3], freed[..]);
        for (i, &p) in got[3..].iter().enumerate() {
            assert_eq!(
                p as usize,
                run_addr(r0) as usize + (8 + i) * class_size(class)
            );
        }
        for &p in &got {
            // SAFETY: the block is ours and at least 16 bytes long.
            assert_eq!(unsafe { (*p.cast::<Block>()).mark }, mark);
        }
        // SAFETY: `r0` heads a small run of these bins.
        unsafe {
            assert_eq!((*r0).used as usize, 15);
            assert_eq!((*r0).bump as usize, 15);
        }
        assert_eq!(bins.counters[class].allocs, 18);
        check_all(&bins, &heap, &src);

        // Exhausting the run takes it off the bin; the bulk stops there (no new run).
        // SAFETY: as above.
        let n = unsafe { bins.alloc_bulk(&src, class, cap, mark, |b| got.push(b)) };
        assert_eq!(n, cap - 15);
        // SAFETY: as above.
        unsafe { assert!(!(*r0).in_bin) };
        check_all(&bins, &heap, &src);
        // A second run, all of it in bulk after its first block.
        let first = alloc(&mut bins, &mut heap, &src, class).0;
        let r1 = run_of(&src, first);
        assert_ne!(r1, r0);
        // SAFETY: as above.
        let n = unsafe { bins.alloc_bulk(&src, class, cap, mark, |b| got.push(b)) };
        assert_eq!(n, cap - 1);
        got.push(first);
        check_all(&bins, &heap, &src);

        // Return the blocks of both runs interleaved in stretches, in groups: each run's
        // counts come out as one-by-one frees would leave them.
        let (a, b): (Vec<*mut u8>, Vec<*mut u8>) =
            got.iter().copied().partition(|&p| run_of(&src, p) == r0);
        let mut order = Vec::new();
        for (ca, cb) in a.chunks(7).zip(b.chunks(5)).take(3) {
            order.extend_from_slice(ca);
            order.extend_from_slice(cb);
        }
        let back_a = order.iter().filter(|p| a.contains(p)).count();
        let back_b = order.len() - back_a;
        assert!(back_a > 0 && back_b > 0 && back_a < a.len());
        give_back(&mut bins, &mut heap, &src, &order);
        check_all(&bins, &heap, &src);
        // SAFETY: both runs are still live: each keeps blocks in use.
        unsafe {
            assert_eq!((*r0).used as usize, cap - back_a);
            assert_eq!((*r1).used as usize, cap - back_b);
            assert!(
                (*r1).in_bin && (*r0).in_bin,
                "runs with free blocks are on the bin"
            );
        }
        let back = order.len() as u64 + 3;
        assert_eq!(bins.counters[class].frees, back);
        // The rest comes back, in groups: the emptied runs but one go back to the page heap.
        let rest: Vec<_> = got
            .iter()
            .chain(single.iter().filter(|p| !single[2..5].contains(p)))
            .filter(|p| !order.contains(p))
            .copied()
            .collect();
        give_back(&mut bins, &mut heap, &src, &rest);
        check_all(&bins, &heap, &src);
        assert_eq!(bins.counters[class].frees, bins.counters[class].allocs);
        assert_eq!(
            heap.counters.runs, 1,
            "the empty runs but the bin's only one went back"
        );
    }

    #[test]
    #[cfg(not(feature = "pow2-classes"))]
    fn a_large_class_run_emptied_in_a_group_goes_back() {
        let src = TestSource::new(4);
        let mut heap = Box::new(PageHeap::new(0));
        let mut bins = SmallBins::new();
        let class = crate::size_class::class_for(16 << 10, 1);
        assert!(class >= TABLE_CLASSES);
        let p = alloc(&mut bins, &mut heap, &src, class).0;
        assert_eq!(heap.counters.runs, 1);
        // Returned as a group (a flush, a trim): its run, the bin's only one, goes back as
        // a one-by-one free would send it.
        give_back(&mut bins, &mut heap, &src, &[p]);
        check_all(&bins, &heap, &src);
        assert_eq!(
            heap.counters.runs, 0,
            "an empty large-class run stayed on its bin"
        );
    }
}
