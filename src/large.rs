//! The page heap of one arena: free page runs, best fit, coalescing, chunks to and from the
//! page source.
//!
//! Free runs are kept sorted by length in exact-length lists, one per possible length
//! (1 ..= `USABLE_PAGES` pages), with a bitmap of the non-empty lists. Best fit is the first
//! set bit at or above the wanted length: at most `BITMAP_WORDS` (16) word scans, however
//! many free runs there are. Within a length the most recently freed run is used first.
//!
//! Invariants (checked by [`PageHeap::check`]):
//! - a run is on list `n` iff it is free and `npages == n`, and bit `n` is set iff list `n` is
//!   non-empty;
//! - no two free runs are adjacent (a freed run merges with free neighbours at once);
//! - `dirty_pages` is the sum of `npages` over free runs marked dirty;
//! - a chunk's `free_pages` is the sum of `npages` over its free runs.

use core::ptr;

use crate::chunk::{
    header_of_desc, init_arena_chunk, ChunkHeader, Kind, PageDesc, CHUNK_ARENA, HEADER_PAGES,
    MAGIC, USABLE_PAGES,
};
use crate::size_class::{CHUNK, CHUNK_PAGES, PAGE};
use crate::source::PageSource;

const BITMAP_WORDS: usize = (USABLE_PAGES + 1).div_ceil(64);

/// A dirty free run at least this long is purged as soon as it forms.
pub const PURGE_RUN_PAGES: usize = 64; // 256 KiB
/// Dirty pages in shorter free runs past which all of them are purged.
pub const DIRTY_MAX_PAGES: usize = 1024; // 4 MiB

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
    /// Allocated page runs now (small and large).
    pub runs: usize,
}

/// See the module documentation.
pub struct PageHeap {
    lists: [*mut PageDesc; USABLE_PAGES + 1],
    bitmap: [u64; BITMAP_WORDS],
    /// The arena's chunks, linked through their headers.
    chunks: *mut ChunkHeader,
    /// Chunks that are entirely free (kept: at most [`Self::SPARE_CHUNKS`]).
    free_chunks: usize,
    pub dirty_pages: usize,
    pub counters: PageCounters,
    /// The index written into the headers of this heap's chunks.
    arena: u32,
}

impl PageHeap {
    /// Wholly free chunks kept mapped (purged) to avoid mapping churn.
    const SPARE_CHUNKS: usize = 1;

    pub const fn new(arena: u32) -> Self {
        Self {
            lists: [ptr::null_mut(); USABLE_PAGES + 1],
            bitmap: [0; BITMAP_WORDS],
            chunks: ptr::null_mut(),
            free_chunks: 0,
            dirty_pages: 0,
            counters: PageCounters {
                mapped: 0,
                chunks_mapped: 0,
                chunks_unmapped: 0,
                purged: 0,
                runs: 0,
            },
            arena,
        }
    }

    /// Allocates a run of `n` pages whose first page is aligned to `align_pages` pages.
    /// Returns its head descriptor (kind still `Free`: the caller sets it) and whether its
    /// pages may be dirty; null when the source has no memory.
    ///
    /// # Safety
    /// The caller holds the arena lock; `1 <= n` and `n + align_pages - 1 <= USABLE_PAGES`.
    pub unsafe fn alloc_run<S: PageSource>(
        &mut self,
        src: &S,
        n: usize,
        align_pages: usize,
    ) -> (*mut PageDesc, bool) {
        let want = n + align_pages - 1;
        let d = match self.find_fit(want) {
            Some(d) => d,
            None => {
                // SAFETY: the caller holds the lock.
                if !unsafe { self.grow(src) } {
                    return (ptr::null_mut(), false);
                }
                match self.find_fit(want) {
                    Some(d) => d,
                    None => return (ptr::null_mut(), false),
                }
            }
        };
        // SAFETY: `d` is a free run on our lists; the lock is held.
        unsafe {
            self.unlink(d);
            let h = header_of_desc(d);
            let first = (*h).desc_index(d);
            let total = (*d).npages as usize;
            let dirty = (*d).dirty;
            let addr = (*h).page_addr(first) as usize;
            let align = align_pages * PAGE;
            let skip = ((addr + align - 1) & !(align - 1)) - addr;
            let skip = skip / PAGE;
            // Give back the pages before and after the part we take. Neither piece touches
            // another free run: `d` had no free neighbours.
            if skip > 0 {
                self.make_free(h, first, skip, dirty);
                self.link(h, first);
            }
            let start = first + skip;
            let rest = total - skip - n;
            if rest > 0 {
                self.make_free(h, start + n, rest, dirty);
                self.link(h, start + n);
            }
            let r = &mut (*h).pages[start] as *mut PageDesc;
            // The run's last page may have been a free tail; it is an interior page now.
            if n > 1 {
                (*h).pages[start + n - 1].set_kind(Kind::Interior);
            }
            (*r).npages = n as u32;
            (*r).dirty = dirty;
            (*h).free_pages -= n;
            if (*h).free_pages + n == USABLE_PAGES {
                self.free_chunks -= 1;
            }
            self.counters.runs += 1;
            (r, dirty)
        }
    }

    /// Returns the run with head `d` to the free runs, merging it with free neighbours;
    /// purges, or unmaps the chunk, as the policy says.
    ///
    /// # Safety
    /// The caller holds the arena lock; `d` heads an allocated run of this heap with no live
    /// block in it; interior pages of a small run have already been reset to `Interior`.
    pub unsafe fn free_run<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) {
        // SAFETY: `d` is a run head of one of our chunks; the lock is held.
        unsafe {
            let h = header_of_desc(d);
            let freed = (*d).npages as usize;
            let mut first = (*h).desc_index(d);
            let mut n = freed;
            let mut dirty = true;
            (*d).set_kind(Kind::Interior);
            // Merge with the run to the left.
            let left = &(*h).pages[first - 1];
            let left_head = match left.kind() {
                Kind::Free => Some(first - 1),
                Kind::FreeTail => Some(first - 1 - left.lead()),
                _ => None,
            };
            if let Some(lh) = left_head {
                let l = &mut (*h).pages[lh] as *mut PageDesc;
                self.unlink(l);
                dirty |= (*l).dirty;
                n += (*l).npages as usize;
                (*h).pages[first - 1].set_kind(Kind::Interior);
                (*l).set_kind(Kind::Interior);
                first = lh;
            }
            // Merge with the run to the right.
            let right = first + n;
            if right < CHUNK_PAGES && (*h).pages[right].kind() == Kind::Free {
                let r = &mut (*h).pages[right] as *mut PageDesc;
                self.unlink(r);
                dirty |= (*r).dirty;
                n += (*r).npages as usize;
                (*r).set_kind(Kind::Interior);
            }
            if (*h).free_pages == USABLE_PAGES - freed {
                self.free_chunks += 1;
            }
            (*h).free_pages += freed;
            self.counters.runs -= 1;
            if n == USABLE_PAGES && self.free_chunks > Self::SPARE_CHUNKS {
                self.release_chunk(src, h);
                return;
            }
            if dirty && (n >= PURGE_RUN_PAGES || n == USABLE_PAGES) {
                src.purge((*h).page_addr(first), n * PAGE);
                self.counters.purged += (n * PAGE) as u64;
                dirty = false;
            }
            self.make_free(h, first, n, dirty);
            self.link(h, first);
            if self.dirty_pages > DIRTY_MAX_PAGES {
                self.purge_all(src);
            }
        }
    }

    /// Grows the run with head `d` in place to `n` pages by taking pages from the free run
    /// right after it. Returns whether it could.
    ///
    /// # Safety
    /// The caller holds the arena lock; `d` heads an allocated large run of this heap.
    pub unsafe fn grow_run(&mut self, d: *mut PageDesc, n: usize) -> bool {
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
            self.unlink(r);
            (*r).set_kind(Kind::Interior);
            if rn > extra {
                self.make_free(h, right + extra, rn - extra, rdirty);
                self.link(h, right + extra);
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
    pub unsafe fn shrink_run<S: PageSource>(&mut self, src: &S, d: *mut PageDesc, n: usize) {
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

    /// Purges every dirty free run.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn purge_all<S: PageSource>(&mut self, src: &S) {
        for n in 1..=USABLE_PAGES {
            let mut d = self.lists[n];
            while !d.is_null() {
                // SAFETY: runs on our lists are free runs of our chunks.
                unsafe {
                    if (*d).dirty {
                        let h = header_of_desc(d);
                        src.purge((*h).page_addr((*h).desc_index(d)), n * PAGE);
                        self.counters.purged += (n * PAGE) as u64;
                        (*d).dirty = false;
                        self.dirty_pages -= n;
                    }
                    d = (*d).next;
                }
            }
        }
    }

    /// Maps a new chunk and adds its free run. Returns false when the source has no memory.
    unsafe fn grow<S: PageSource>(&mut self, src: &S) -> bool {
        let c = src.map_chunk();
        if c.is_null() {
            return false;
        }
        // SAFETY: the source hands us a fresh zeroed chunk; the lock is held.
        unsafe {
            let d = init_arena_chunk(c, self.arena);
            let h = c.cast::<ChunkHeader>();
            (*h).next = self.chunks;
            if !self.chunks.is_null() {
                (*self.chunks).prev = h;
            }
            self.chunks = h;
            self.free_chunks += 1;
            self.counters.mapped += CHUNK;
            self.counters.chunks_mapped += 1;
            self.link(h, (*h).desc_index(d));
        }
        true
    }

    /// Unmaps a wholly free chunk whose free run is not on any list.
    unsafe fn release_chunk<S: PageSource>(&mut self, src: &S, h: *mut ChunkHeader) {
        // SAFETY: `h` is one of our chunks, entirely free; the lock is held.
        unsafe {
            if (*h).prev.is_null() {
                self.chunks = (*h).next;
            } else {
                (*(*h).prev).next = (*h).next;
            }
            if !(*h).next.is_null() {
                (*(*h).next).prev = (*h).prev;
            }
            self.free_chunks -= 1;
            self.counters.mapped -= CHUNK;
            self.counters.chunks_unmapped += 1;
            src.unmap_chunk(h.cast());
        }
    }

    /// Writes the descriptors of a free run of `n` pages at page `first` of chunk `h`.
    unsafe fn make_free(&mut self, h: *mut ChunkHeader, first: usize, n: usize, dirty: bool) {
        // SAFETY: the caller owns pages `first..first + n` of `h` under the lock.
        unsafe {
            let d = &mut (*h).pages[first];
            d.set_kind(Kind::Free);
            d.npages = n as u32;
            d.dirty = dirty;
            if n > 1 {
                let t = &(*h).pages[first + n - 1];
                t.set_kind(Kind::FreeTail);
                t.set_lead(n - 1);
            }
        }
    }

    unsafe fn link(&mut self, h: *mut ChunkHeader, first: usize) {
        // SAFETY: page `first` of `h` heads a free run that is on no list.
        unsafe {
            let d = &mut (*h).pages[first] as *mut PageDesc;
            let n = (*d).npages as usize;
            (*d).prev = ptr::null_mut();
            (*d).next = self.lists[n];
            if !(*d).next.is_null() {
                (*(*d).next).prev = d;
            }
            self.lists[n] = d;
            self.bitmap[n / 64] |= 1 << (n % 64);
            if (*d).dirty {
                self.dirty_pages += n;
            }
        }
    }

    unsafe fn unlink(&mut self, d: *mut PageDesc) {
        // SAFETY: `d` heads a free run on list `npages`.
        unsafe {
            let n = (*d).npages as usize;
            if (*d).prev.is_null() {
                self.lists[n] = (*d).next;
                if self.lists[n].is_null() {
                    self.bitmap[n / 64] &= !(1 << (n % 64));
                }
            } else {
                (*(*d).prev).next = (*d).next;
            }
            if !(*d).next.is_null() {
                (*(*d).next).prev = (*d).prev;
            }
            (*d).next = ptr::null_mut();
            (*d).prev = ptr::null_mut();
            if (*d).dirty {
                self.dirty_pages -= n;
            }
        }
    }

    /// The head of the shortest free run of at least `n` pages.
    fn find_fit(&self, n: usize) -> Option<*mut PageDesc> {
        if n > USABLE_PAGES {
            return None;
        }
        let mut w = n / 64;
        let mut bits = self.bitmap[w] & (!0u64 << (n % 64));
        loop {
            if bits != 0 {
                let len = w * 64 + bits.trailing_zeros() as usize;
                return Some(self.lists[len]);
            }
            w += 1;
            if w == BITMAP_WORDS {
                return None;
            }
            bits = self.bitmap[w];
        }
    }

    /// Verifies the invariants of the module documentation and of every chunk's page
    /// descriptors. Returns the first violation found.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn check(&self) -> Result<(), &'static str> {
        let mut dirty = 0;
        for n in 1..=USABLE_PAGES {
            let has = self.bitmap[n / 64] & (1 << (n % 64)) != 0;
            if has == self.lists[n].is_null() {
                return Err("free-run bitmap disagrees with its lists");
            }
            let mut d = self.lists[n];
            while !d.is_null() {
                // SAFETY: runs on our lists live in our chunks.
                unsafe {
                    if (*d).kind() != Kind::Free || (*d).npages as usize != n {
                        return Err("free list holds a run of another length or kind");
                    }
                    if (*d).dirty {
                        dirty += n;
                    }
                    d = (*d).next;
                }
            }
        }
        if dirty != self.dirty_pages {
            return Err("dirty page count is off");
        }
        let mut c = self.chunks;
        while !c.is_null() {
            // SAFETY: the chunk list holds our mapped chunks.
            unsafe {
                if (*c).magic != MAGIC || (*c).kind != CHUNK_ARENA || (*c).arena != self.arena {
                    return Err("chunk header is not ours");
                }
                let mut i = HEADER_PAGES;
                let mut free = 0;
                let mut prev_free = false;
                while i < CHUNK_PAGES {
                    let d = &(*c).pages[i];
                    let n = d.npages as usize;
                    if n == 0 || i + n > CHUNK_PAGES {
                        return Err("run length out of range");
                    }
                    match d.kind() {
                        Kind::Free => {
                            if prev_free {
                                return Err("two free runs side by side");
                            }
                            free += n;
                            if n > 1 {
                                let t = &(*c).pages[i + n - 1];
                                if t.kind() != Kind::FreeTail || t.lead() != n - 1 {
                                    return Err("free run without its tail");
                                }
                            }
                            prev_free = true;
                        }
                        Kind::Small | Kind::Large => prev_free = false,
                        _ => return Err("run head of an unexpected kind"),
                    }
                    let last = if d.kind() == Kind::Free { n - 1 } else { n };
                    for j in 1..last {
                        let k = (*c).pages[i + j].kind();
                        let ok = match d.kind() {
                            Kind::Small => k == Kind::SmallInterior,
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
                c = (*c).next;
            }
        }
        Ok(())
    }

    /// Calls `f` with every chunk of this heap.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn for_each_chunk(&self, mut f: impl FnMut(*mut ChunkHeader)) {
        let mut c = self.chunks;
        while !c.is_null() {
            f(c);
            // SAFETY: chunks on our list are mapped.
            c = unsafe { (*c).next };
        }
    }
}
