//! The exact-length free lists, their bitmaps and the chunk list.

use super::{PageHeap, BITMAP_WORDS, CLEAN, DIRTY};
use crate::chunk::{ChunkHeader, Kind, PageDesc, Rel, USABLE_PAGES};
use crate::source::PageSource;

impl PageHeap {
    /// Writes the descriptors of a free run of `n` pages at page `first` of chunk `h`, of
    /// which `dirty` have their dirty bit set, stamped `stamp` (the time its newest dirty
    /// pages were freed).
    pub(super) unsafe fn make_free(
        &mut self,
        h: *mut ChunkHeader,
        first: usize,
        n: usize,
        dirty: usize,
        stamp: u32,
    ) {
        // SAFETY: the caller owns pages `first..first + n` of `h` under the lock.
        unsafe {
            let d = &mut (*h).pages[first];
            d.set_kind(Kind::Free);
            d.npages = n as u32;
            d.dirty = dirty > 0;
            d.used = dirty as u32;
            d.bump = stamp;
            if n > 1 {
                let t = &(*h).pages[first + n - 1];
                t.set_kind(Kind::FreeTail);
                t.set_lead(n - 1);
            }
        }
    }

    /// Puts the free run at page `first` of `h` on its list (by its length and kind).
    pub(super) unsafe fn link<S: PageSource>(
        &mut self,
        src: &S,
        h: *mut ChunkHeader,
        first: usize,
    ) {
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
        }
    }

    /// Takes the free run `d` off its list.
    pub(super) unsafe fn unlink<S: PageSource>(&mut self, src: &S, d: *mut PageDesc) {
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
        }
    }

    /// The head of the shortest free run of kind `k` of at least `n` pages.
    pub(super) fn first_of<S: PageSource>(
        &self,
        src: &S,
        k: usize,
        n: usize,
    ) -> Option<*mut PageDesc> {
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

    /// Best fit for `n` pages: the shortest run with dirty pages that fits, else the shortest
    /// clean one.
    pub(super) fn find_fit<S: PageSource>(&self, src: &S, n: usize) -> Option<*mut PageDesc> {
        self.first_of(src, DIRTY, n)
            .or_else(|| self.first_of(src, CLEAN, n))
    }
}
