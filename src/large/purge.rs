//! Dirty pages back to the page source (the dirty limit, decay, trim), and chunks mapped
//! and given back.

use super::lists::{count_dirty, find_page, mark_dirty};
use super::{PageHeap, BITMAP_WORDS, DECAY_MS, DIRTY, TICK_MS};
use crate::chunk::{header_of_desc, init_arena_chunk, ChunkHeader, PageDesc, Rel, HEADER_PAGES};
use crate::size_class::{CHUNK, CHUNK_PAGES, PAGE};
use crate::source::PageSource;

impl PageHeap {
    /// Purges every free run with dirty pages: those pages (and only those) go back to the
    /// page source and the run becomes clean. Returns whether the source did every purge; a
    /// refused purge leaves the pages it was refused dirty.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub(super) unsafe fn purge_all_unmarked<S: PageSource>(&mut self, src: &S) -> bool {
        self.counters.purges += (self.dirty_pages > 0) as u64;
        // SAFETY: the caller holds the lock.
        unsafe { self.purge_where(src, |_| true) }
    }

    /// Tells the heap the time (a wrapping millisecond clock) and, at most every
    /// [`TICK_MS`], purges the dirty runs that nobody reused for [`DECAY_MS`] and passes the
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
            // SAFETY: the caller holds the lock.
            unsafe { self.purge_where(src, |stamp| now_ms.wrapping_sub(stamp) >= DECAY_MS) };
        }
    }

    /// Purges the dirty pages of the free runs whose stamp satisfies `old`; stops at the
    /// first purge the source refuses (and then purges only when [`Self::purge_all`] is
    /// called).
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
                    // A purged run goes to the clean list (or, if a purge was refused, back
                    // to the head of this one, and the walk ends), so `next`, read first,
                    // stays valid.
                    unsafe {
                        let next = (*d).next.get(base);
                        if old((*d).bump) {
                            let h = header_of_desc(d);
                            let first = (*h).desc_index(d);
                            self.unlink(src, d);
                            let ok = self.purge_pages(src, h, first, n);
                            (*d).used = count_dirty(&(*h).dirty_map, first, n) as u32;
                            (*d).dirty = (*d).used > 0;
                            self.link(src, h, first);
                            if !ok {
                                self.purge_ok = false;
                                return false;
                            }
                        }
                        d = next;
                    }
                }
            }
        }
        self.purge_ok = true;
        true
    }

    /// Purges the dirty pages of pages `first..first + n` of chunk `h`, a range at a time,
    /// clearing their bits; false at the first range the source refuses.
    ///
    /// # Safety
    /// The caller holds the lock; the pages are free and on no list.
    unsafe fn purge_pages<S: PageSource>(
        &mut self,
        src: &S,
        h: *mut ChunkHeader,
        first: usize,
        n: usize,
    ) -> bool {
        let end = first + n;
        let mut i = first;
        // SAFETY: as the contract says.
        unsafe {
            loop {
                let s = find_page(&(*h).dirty_map, i, end, true);
                if s == end {
                    return true;
                }
                let e = find_page(&(*h).dirty_map, s, end, false);
                if !src.purge((*h).page_addr(s), (e - s) * PAGE) {
                    return false;
                }
                mark_dirty(&mut (*h).dirty_map, s, e - s, false);
                self.counters.purged += ((e - s) * PAGE) as u64;
                i = e;
            }
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
