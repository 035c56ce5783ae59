//! Dirty pages back to the page source (the dirty limit, decay, trim), and chunks mapped
//! and given back.

use super::{dirty, PageHeap, BITMAP_WORDS, DIRTY, TICK_MS};
use crate::chunk::{
    header_of_desc, init_arena_chunk, ChunkHeader, PageDesc, Rel, HEADER_PAGES, USABLE_PAGES,
};
use crate::size_class::{CHUNK, CHUNK_PAGES, PAGE};
use crate::source::PageSource;

impl PageHeap {
    /// Purges every dirty free page: it goes back to the page source and its bit is cleared,
    /// and a run left with no dirty page becomes a clean run. Returns whether the source did
    /// every purge; a refused purge leaves its pages dirty.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub(super) unsafe fn purge_all_unmarked<S: PageSource>(&mut self, src: &S) -> bool {
        self.counters.purges += (self.dirty_pages > 0) as u64;
        // SAFETY: the caller holds the lock.
        unsafe { self.purge_where(src, |_| true) }
    }

    /// Tells the heap the time (a wrapping millisecond clock) and, at most every
    /// [`TICK_MS`], purges the dirty runs that nobody reused for the purge delay and passes the
    /// tick to the source (`PageSource::tick`: cached huge spans past their delay).
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub(super) unsafe fn decay_unmarked<S: PageSource>(&mut self, src: &S, now_ms: u32) {
        self.now = now_ms;
        if now_ms.wrapping_sub(self.last_tick) < TICK_MS {
            return;
        }
        self.last_tick = now_ms;
        src.tick(now_ms);
        if self.dirty_pages > 0 && self.purge_ok {
            let delay = crate::policy::purge_ms();
            // SAFETY: the caller holds the lock.
            unsafe { self.purge_where(src, |stamp| now_ms.wrapping_sub(stamp) >= delay) };
        }
    }

    /// Purges the dirty pages of the runs whose stamp satisfies `old`, one source call per
    /// span of dirty pages; stops at the first purge the source refuses (and then purges
    /// only when [`Self::purge_all`] is called).
    pub(super) unsafe fn purge_where<S: PageSource>(
        &mut self,
        src: &S,
        old: impl Fn(u32) -> bool,
    ) -> bool {
        let base = src.base();
        for w in 0..BITMAP_WORDS {
            let mut bits = self.bitmap[DIRTY][w];
            while bits != 0 {
                let n = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let mut d = self.lists[DIRTY][n].get(base);
                while !d.is_null() {
                    // SAFETY: runs on our lists are free runs of our chunks; the lock is held.
                    // Purging `d` moves only `d` (from the dirty lists to the clean ones, once
                    // it has no dirty page left), so `next`, read first, stays valid.
                    unsafe {
                        let next = (*d).next.get(base);
                        if old((*d).bump) && !self.purge_run(src, d) {
                            self.purge_ok = false;
                            return false;
                        }
                        d = next;
                    }
                }
            }
        }
        self.purge_ok = true;
        true
    }

    /// Purges the dirty pages of free run `d` (on a dirty list), span by span, clearing
    /// their bits; once none is left, `d` moves to the clean lists. Returns false at the
    /// first span the source refuses (the pages purged so far stay purged).
    ///
    /// # Safety
    /// The caller holds the lock; `d` heads a free run on a dirty list.
    unsafe fn purge_run<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) -> bool {
        // SAFETY: as the contract says.
        unsafe {
            let h = header_of_desc(d);
            let first = (*h).desc_index(d);
            let end = first + (*d).npages as usize;
            let mut at = first;
            while let Some((s, len)) = dirty::next_span(&(*h).dirty, at, end) {
                if !src.purge((*h).page_addr(s), len * PAGE) {
                    return false;
                }
                dirty::clear(&mut (*h).dirty, s, len);
                self.dirty_pages -= len;
                (*d).used -= len as u32;
                self.counters.purged += (len * PAGE) as u64;
                at = s + len;
            }
            self.unlink(src, d);
            (*d).dirty = false;
            self.link(src, h, first);
            true
        }
    }

    /// Maps a new chunk and adds its free run. Returns false when the source has no memory.
    pub(super) unsafe fn grow<S: PageSource>(&mut self, src: &S) -> bool {
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
    pub(super) unsafe fn release_chunk<S: PageSource>(
        &mut self,
        src: &S,
        h: *mut ChunkHeader,
        skip: usize,
    ) {
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
            self.dirty_pages -= dirty::clear(&mut (*h).dirty, HEADER_PAGES, USABLE_PAGES);
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
}
