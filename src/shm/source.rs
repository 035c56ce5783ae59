//! [`ShmSource`]: the page source of a shared heap. Chunks come from the file's chunk area,
//! found in two bitmaps in the file: `used` (the chunk belongs to an arena or a huge block)
//! and `heads` (the chunk starts with a live chunk header: an arena chunk, or the first
//! chunk of a huge block). Bits are set and cleared under the header's `chunk_lock`; `heads`
//! is read without it.

use core::sync::atomic::{AtomicU64, Ordering};

use super::layout::ShmHeader;
use crate::lock::Taken;
use crate::os::file;
use crate::size_class::CHUNK;
use crate::source::PageSource;

/// One process's view of a shared heap's memory.
///
/// Invariant: `base` is the `CHUNK`-aligned address where this process mapped the whole
/// file (`len` bytes), whose header is ready; the other fields are the header's layout,
/// validated once when the heap was opened (`Plan`) and never read from the file again, so
/// a later write into the header cannot make this process index out of bounds.
pub struct ShmSource {
    pub base: usize,
    pub len: usize,
    pub meta: usize,
    pub nchunks: usize,
    pub used_off: usize,
    pub heads_off: usize,
    pub arenas_off: usize,
    pub narenas: usize,
    pub writable: bool,
}

impl ShmSource {
    pub fn header(&self) -> &ShmHeader {
        // SAFETY: the header is mapped at `base` for the life of the source (invariant).
        unsafe { &*(self.base as *const ShmHeader) }
    }

    fn bits(&self, off: usize) -> &[AtomicU64] {
        // SAFETY: the bitmap lies in the meta area of the mapping (layout invariant) and
        // holds `nchunks.div_ceil(64)` words.
        unsafe {
            core::slice::from_raw_parts(
                (self.base + off) as *const AtomicU64,
                self.nchunks.div_ceil(64),
            )
        }
    }

    fn used(&self) -> &[AtomicU64] {
        self.bits(self.used_off)
    }

    fn heads(&self) -> &[AtomicU64] {
        self.bits(self.heads_off)
    }

    fn test(bits: &[AtomicU64], i: usize) -> bool {
        bits[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    fn set(bits: &[AtomicU64], i: usize, on: bool) {
        // Release: a reader of `heads` that sees the bit sees the header written before it.
        if on {
            bits[i / 64].fetch_or(1 << (i % 64), Ordering::Release);
        } else {
            bits[i / 64].fetch_and(!(1 << (i % 64)), Ordering::Release);
        }
    }

    /// The address of chunk `i`.
    pub fn chunk_addr(&self, i: usize) -> *mut u8 {
        (self.base + self.meta + i * CHUNK) as *mut u8
    }

    /// The index of the chunk at `addr`, if `addr` is the start of one.
    pub fn chunk_index(&self, addr: usize) -> Option<usize> {
        let off = addr.wrapping_sub(self.base + self.meta);
        if off.is_multiple_of(CHUNK) && off / CHUNK < self.nchunks {
            Some(off / CHUNK)
        } else {
            None
        }
    }

    pub(super) fn lock_chunks(&self) {
        // A holder that died between two bit updates leaves at worst a chunk marked used
        // that nothing uses: leaked, never handed out twice. Nothing to repair.
        if self.header().chunk_lock.lock() == Taken::OwnerDied {
            self.header().chunk_lock.mark_consistent();
        }
    }

    /// Takes `n` consecutive free chunks; returns the first, or null. The caller writes a
    /// chunk header into it and then calls [`Self::publish`].
    pub fn take_span(&self, n: usize) -> *mut u8 {
        if !self.writable || n == 0 || n > self.nchunks {
            return core::ptr::null_mut();
        }
        self.lock_chunks();
        let used = self.used();
        let mut found = None;
        let mut run = 0;
        for i in 0..self.nchunks {
            if Self::test(used, i) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    found = Some(i + 1 - n);
                    break;
                }
            }
        }
        if let Some(first) = found {
            for i in first..first + n {
                Self::set(used, i, true);
            }
        }
        self.header().chunk_lock.unlock();
        let Some(first) = found else {
            return core::ptr::null_mut();
        };
        let c = self.chunk_addr(first);
        // The file is sparse: make sure its space exists now, so that a full file system
        // gives a null here rather than SIGBUS at the first touch.
        if !file::populate(c, n * CHUNK) {
            self.lock_chunks();
            for i in first..first + n {
                Self::set(self.used(), i, false);
            }
            self.header().chunk_lock.unlock();
            return core::ptr::null_mut();
        }
        c
    }

    /// Marks the span at `chunk` as holding a live header (after writing it).
    pub fn publish(&self, chunk: *mut u8) {
        if let Some(i) = self.chunk_index(chunk as usize) {
            Self::set(self.heads(), i, true);
        }
    }

    /// Marks the span at `chunk` as no longer holding a live header.
    pub fn unpublish(&self, chunk: *mut u8) {
        if let Some(i) = self.chunk_index(chunk as usize) {
            Self::set(self.heads(), i, false);
        }
    }

    /// Returns the `n` chunks at `chunk` (taken with [`Self::take_span`], unpublished),
    /// zeroed for their next user.
    ///
    /// # Safety
    /// Nothing refers into the span any more.
    pub unsafe fn give_span(&self, chunk: *mut u8, n: usize) {
        let Some(first) = self.chunk_index(chunk as usize) else {
            return;
        };
        if n == 0 || first + n > self.nchunks {
            return;
        }
        if !file::punch(chunk, n * CHUNK) {
            // SAFETY: the span is ours and unused (contract).
            unsafe { core::ptr::write_bytes(chunk, 0, n * CHUNK) };
        }
        self.lock_chunks();
        for i in first..first + n {
            Self::set(self.used(), i, false);
        }
        self.header().chunk_lock.unlock();
    }

    /// Calls `f` with every chunk that holds a live header.
    pub fn for_each_head(&self, mut f: impl FnMut(*mut u8)) {
        let heads = self.heads();
        for i in 0..self.nchunks {
            if Self::test(heads, i) {
                f(self.chunk_addr(i));
            }
        }
    }

    /// Chunks marked used (arena chunks, huge spans, and any leaked by a process that died
    /// while taking them).
    pub fn chunks_used(&self) -> usize {
        let used = self.used();
        (0..self.nchunks).filter(|&i| Self::test(used, i)).count()
    }
}

// SAFETY: chunks come from the file's chunk area, which is mapped for the life of the
// source, aligned (the base is CHUNK-aligned and `meta` a multiple of CHUNK, so every chunk
// lies above the base) and zero when handed out (fresh file space, or punched or cleared by
// `give_span`); the `used` bit keeps a chunk from being handed out twice, across processes.
// Nothing here allocates or panics.
unsafe impl PageSource for ShmSource {
    const SHARED: bool = true;
    type Lock = crate::lock::RobustLock;

    #[inline]
    fn base(&self) -> usize {
        self.base
    }

    fn for_each_chunk(&self, f: &mut dyn FnMut(*mut u8)) {
        self.for_each_head(f)
    }

    fn map_chunk(&self) -> *mut u8 {
        let c = self.take_span(1);
        if !c.is_null() {
            // The engine writes the arena header right after this returns, under its arena
            // lock; a lookup that sees the bit early finds a zero magic and says "invalid".
            self.publish(c);
        }
        c
    }

    unsafe fn unmap_chunk(&self, chunk: *mut u8) {
        self.unpublish(chunk);
        // SAFETY: passed on from the caller.
        unsafe { self.give_span(chunk, 1) }
    }

    unsafe fn purge(&self, _p: *mut u8, _len: usize) -> bool {
        // Never inside a live chunk: a punched page is allocated again at its next touch,
        // which raises SIGBUS when the file system is full. Wholly free chunks are punched
        // when they go back (`give_span`) and populated when taken again.
        false
    }

    #[inline]
    fn owns_chunk(&self, chunk: usize) -> bool {
        match self.chunk_index(chunk) {
            Some(i) => Self::test(self.heads(), i),
            None => false,
        }
    }

    /// Whole chunks of the file; alignments above a chunk cannot be had (the file's chunks
    /// are aligned to `CHUNK` only).
    fn map_span(&self, len: usize, align: usize) -> (*mut u8, usize, usize) {
        if align > CHUNK {
            return (core::ptr::null_mut(), 0, 0);
        }
        let n = len.div_ceil(CHUNK);
        (self.take_span(n), n * CHUNK, 0)
    }

    unsafe fn publish_span(&self, head: *mut u8) -> bool {
        self.publish(head);
        true
    }

    unsafe fn unpublish_span(&self, head: *mut u8) {
        self.unpublish(head);
    }

    unsafe fn unmap_span(&self, span: *mut u8, len: usize) {
        // SAFETY: passed on from the caller.
        unsafe { self.give_span(span, len / CHUNK) }
    }
}
