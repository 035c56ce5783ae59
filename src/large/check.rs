//! The page heap's invariants verified, and its chunks walked.

use super::{dirty, PageHeap, CLEAN, DIRTY};
use crate::chunk::{ChunkHeader, Kind, CHUNK_ARENA, HEADER_PAGES, MAGIC, USABLE_PAGES};
use crate::size_class::{run_page_marked, CHUNK_PAGES};
use crate::source::PageSource;

impl PageHeap {
    /// Verifies the invariants of the module documentation and of every chunk's page
    /// descriptors. Returns the first violation found.
    ///
    /// # Safety
    /// The caller holds the arena lock.
    pub unsafe fn check<S: PageSource>(&self, src: &S) -> Result<(), &'static str> {
        let base = src.base();
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
                        listed += 1;
                        if listed > CHUNK_PAGES * (self.counters.chunks_mapped as usize + 1) {
                            return Err("free list has a cycle");
                        }
                        d = (*d).next.get(base);
                    }
                }
            }
        }
        let mut free_chunks = 0;
        let mut dirty = 0;
        let mut c = self.chunks.get(base);
        while !c.is_null() {
            // SAFETY: the chunk list holds our mapped chunks.
            unsafe {
                if (*c).magic != MAGIC || (*c).kind != CHUNK_ARENA || (*c).arena != self.arena {
                    return Err("chunk header is not ours");
                }
                let bits = &(*c).dirty;
                if dirty::any(bits, 0, HEADER_PAGES) {
                    return Err("dirty bit on a header page");
                }
                dirty += dirty::count(bits, HEADER_PAGES, USABLE_PAGES);
                let mut i = HEADER_PAGES;
                let mut free = 0;
                // Whether the run just before page `i` is free.
                let mut prev_free = false;
                while i < CHUNK_PAGES {
                    let d = &(*c).pages[i];
                    let n = d.npages as usize;
                    if n == 0 || i + n > CHUNK_PAGES {
                        return Err("run length out of range");
                    }
                    match d.kind() {
                        Kind::Free => {
                            heads += 1;
                            if prev_free {
                                return Err("two free runs side by side");
                            }
                            let set = dirty::count(bits, i, n);
                            if d.dirty != (set > 0) || d.used as usize != set {
                                return Err(
                                    "free run's kind or count disagrees with its dirty bits",
                                );
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
                        Kind::Small | Kind::Large => {
                            if dirty::any(bits, i, n) {
                                return Err("dirty bit on a page in use");
                            }
                            prev_free = false;
                        }
                        _ => return Err("run head of an unexpected kind"),
                    }
                    let last = if d.kind() == Kind::Free { n - 1 } else { n };
                    for j in 1..last {
                        let e = &(*c).pages[i + j];
                        let k = e.kind();
                        let ok = match d.kind() {
                            Kind::Small if run_page_marked(d.class(), j) => {
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
        if dirty != self.dirty_pages {
            return Err("dirty page count disagrees with the dirty bits");
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
