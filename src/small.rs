//! Small blocks: page runs cut into blocks of one size class.
//!
//! Each arena has one bin per class: a list of its runs that have a block to give (a free
//! block on the run's own list, or blocks never carved). A run is carved lazily: `bump`
//! counts the blocks handed out at least once, so a fresh run touches one block at a time and
//! its untouched blocks stay zero (which `calloc` uses). A block in use carries no header: its
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
            if !(*r).in_bin {
                self.link(src, class, r);
            }
            // A large class's empty run goes back even as its bin's only run: kept, up to
            // 256 KiB per class and arena would stay resident past the page heap's decay.
            let only = (*r).next.is_null() && (*r).prev.is_null();
            if (*r).used == 0 && (!only || class >= TABLE_CLASSES) {
                self.release(heap, src, class, r);
            }
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
            let mut count = 0;
            while !r.is_null() {
                // SAFETY: runs on the bins are ours.
                unsafe {
                    if (*r).kind() != Kind::Small || (*r).class() != class || !(*r).in_bin {
                        return Err("bin holds a run of another class");
                    }
                    check_run(src, r, self.key)?;
                    r = (*r).next.get(base);
                }
                count += 1;
            }
            let _ = count;
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
}
