//! Taking, freeing, growing and shrinking page runs: best fit, splitting, coalescing with
//! neighbours of the same kind.

use core::ptr;

use super::PageHeap;
use crate::chunk::{header_of_desc, ChunkHeader, Kind, PageDesc, USABLE_PAGES};
use crate::size_class::{CHUNK_PAGES, PAGE};
use crate::source::PageSource;

impl PageHeap {
    /// Allocates a run of `n` pages whose first page is aligned to `align_pages` pages.
    /// Returns its head descriptor (kind still `Free`: the caller sets it) and whether its
    /// pages may be dirty; null when the source has no memory.
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
    /// neighbours; unmaps the chunk if it is wholly free and not needed as a spare, and
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
    pub(super) unsafe fn insert_free<S: PageSource>(
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
