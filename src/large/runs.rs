//! Taking, freeing, growing and shrinking page runs: best fit, splitting, coalescing with
//! the free neighbours, dirty or clean.

use core::ptr;

use super::{dirty, PageHeap};
use crate::chunk::{header_of_desc, ChunkHeader, Kind, PageDesc, USABLE_PAGES};
use crate::size_class::{CHUNK_PAGES, PAGE};
use crate::source::PageSource;

impl PageHeap {
    /// Allocates a run of `n` pages whose first page is aligned to `align_pages` pages.
    /// Returns its head descriptor (kind still `Free`: the caller sets it) and whether any of
    /// its pages may be dirty (if not, all of them read zero); null when the source has no
    /// memory.
    ///
    /// # Safety
    /// The caller holds the arena lock; `1 <= n` and `n + align_pages - 1 <= USABLE_PAGES`.
    pub(super) unsafe fn alloc_run_unmarked<S: PageSource>(
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
    pub(super) unsafe fn take_run<S: PageSource>(
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
            let stamp = (*d).bump;
            let had = (*d).used as usize;
            let addr = (*h).page_addr(first) as usize;
            let align = align_pages * PAGE;
            let mut skip = (((addr + align - 1) & !(align - 1)) - addr) / PAGE;
            // Dirty pages of the piece before the part taken; pages in use have no dirty bit.
            let mut before = None;
            // An unaligned part is carved from the run's first dirty page on (as far as the
            // run's end allows) rather than from its start: resident pages reused cost no
            // page fault, and the clean pages skipped stay free as a clean run.
            if align_pages == 1 && had > 0 && had < total {
                if let Some((s, _)) = dirty::next_span(&(*h).dirty, first, first + total) {
                    skip = (s - first).min(total - n);
                    before = Some(0);
                }
            }
            let start = first + skip;
            let (before, taken) = if had == 0 {
                (0, 0)
            } else {
                (
                    before.unwrap_or_else(|| dirty::count(&(*h).dirty, first, skip)),
                    dirty::clear(&mut (*h).dirty, start, n),
                )
            };
            self.dirty_pages -= taken;
            // Give back the pages before and after the part we take, each a run of the kind
            // its own pages make it. Neither piece touches another free run: `d` had none
            // beside it.
            if skip > 0 {
                self.make_free(h, first, skip, before, stamp);
                self.link(src, h, first);
            }
            let rest = total - skip - n;
            if rest > 0 {
                self.make_free(h, start + n, rest, had - before - taken, stamp);
                self.link(src, h, start + n);
            }
            let dirty = taken > 0;
            let r = &mut (*h).pages[start] as *mut PageDesc;
            // The run's last page may have been a free tail; it is an interior page now.
            if n > 1 {
                (*h).pages[start + n - 1].set_kind(Kind::Interior);
            }
            (*r).npages = n as u32;
            (*r).dirty = dirty;
            (*r).used = 0;
            if (*h).free_pages == USABLE_PAGES {
                self.free_chunks -= 1;
            }
            (*h).free_pages -= n;
            self.counters.runs += 1;
            (r, dirty)
        }
    }

    /// Returns the run with head `d` to the free runs, its pages dirty, merged with the free
    /// runs on either side; unmaps the chunk if it is wholly free and not needed as a spare, and
    /// purges if the dirty pages now exceed the limit.
    ///
    /// # Safety
    /// The caller holds the arena lock; `d` heads an allocated run of this heap with no live
    /// block in it; interior pages of a small run have already been reset to `Interior`.
    pub(super) unsafe fn free_run_unmarked<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) {
        // SAFETY: `d` is a run head of one of our chunks; the lock is held.
        unsafe {
            let h = header_of_desc(d);
            let freed = (*d).npages as usize;
            let first = (*h).desc_index(d);
            self.counters.runs -= 1;
            (*h).free_pages += freed;
            if (*h).free_pages == USABLE_PAGES {
                self.free_chunks += 1;
                if self.free_chunks > Self::spare_chunks::<S>() {
                    self.release_chunk(src, h, first);
                    return;
                }
            }
            self.insert_free(src, h, first, freed);
            if self.dirty_pages > self.dirty_limit() && self.purge_ok {
                self.purge_all(src);
            }
        }
    }

    /// Makes pages `first..first + n` of chunk `h` (whose descriptors hold no free run) a free
    /// run of dirty pages, merged with the free runs on either side whatever their kind, and
    /// links it, stamped with the time.
    ///
    /// # Safety
    /// The caller holds the lock and owns those pages; `(*h).free_pages` already counts them.
    pub(super) unsafe fn insert_free<S: PageSource>(
        &mut self,
        src: &S,
        h: *mut ChunkHeader,
        first: usize,
        n: usize,
    ) {
        // SAFETY: as the contract says; neighbours are read through our own descriptors.
        unsafe {
            let added = dirty::set(&mut (*h).dirty, first, n);
            debug_assert_eq!(added, n, "a dirty bit on a page in use");
            self.dirty_pages += added;
            let mut dirty = added;
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
                self.unlink(src, l);
                n += (*l).npages as usize;
                dirty += (*l).used as usize;
                (*h).pages[first - 1].set_kind(Kind::Interior);
                (*l).set_kind(Kind::Interior);
                first = lh;
            }
            // Merge with the run to the right.
            let right = first + n;
            if right < CHUNK_PAGES && (*h).pages[right].kind() == Kind::Free {
                let r = &mut (*h).pages[right] as *mut PageDesc;
                self.unlink(src, r);
                n += (*r).npages as usize;
                dirty += (*r).used as usize;
                (*r).set_kind(Kind::Interior);
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
    pub(super) unsafe fn grow_run_unmarked<S: PageSource>(
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
            let stamp = (*r).bump;
            let had = (*r).used as usize;
            self.unlink(src, r);
            (*r).set_kind(Kind::Interior);
            let taken = dirty::clear(&mut (*h).dirty, right, extra);
            self.dirty_pages -= taken;
            if rn > extra {
                self.make_free(h, right + extra, rn - extra, had - taken, stamp);
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
    pub(super) unsafe fn shrink_run_unmarked<S: PageSource>(
        &mut self,
        src: &S,
        d: *mut PageDesc,
        n: usize,
    ) {
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
}
