//! [`ShmSource`]: the page source of a shared heap. Chunks come from the file's chunk area,
//! found in two bitmaps in the file: `used` (the chunk belongs to an arena or a huge block)
//! and `heads` (the chunk starts with a chunk header: an arena chunk, the first chunk of a
//! huge block, or a span on its way in or out). Bits are set and cleared under the header's
//! `chunk_lock`; `heads` is read without it.
//!
//! A process may be killed at any instruction, so every span's chunks are accounted for
//! from the moment they are taken until they are given back: under the chunk lock,
//! `take_span` writes a *busy* header into the span's first chunk (`magic` = [`BUSY`] with
//! the taker's pid, `map_len` = the span's length), sets its `heads` bit, then its `used`
//! bits; the user then writes its own header over it (the magic last). A free first claims
//! the span back the same way (the huge-block code swaps its magic for the freeing
//! process's busy magic, [`PageSource::free_claim`]; an arena chunk gets it in
//! `unmap_chunk`), punches the file, and only then, under the lock, clears the `used` bits
//! and the `heads` bit. So a span whose process died half-way has a head with a busy magic
//! and a dead pid: [`ShmSource::reclaim_dead`] gives it back (on the next chunk lock taken
//! from a dead holder, when no span is free, and in `check()`).

use core::sync::atomic::{AtomicU64, Ordering};

use super::layout::ShmHeader;
use crate::chunk::ChunkHeader;
use crate::lock::Taken;
use crate::os;
use crate::os::file;
use crate::size_class::{CHUNK, PAGE};
use crate::source::PageSource;

/// The high half of a busy span's magic (its low half is the pid of the process taking or
/// giving it back): "busy" in ASCII, never the high half of `chunk::MAGIC`.
pub const BUSY: u64 = (u32::from_le_bytes(*b"busy") as u64) << 32;

/// The busy magic of the calling process.
fn busy_magic() -> u64 {
    BUSY | os::pid() as u64
}

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
        // A holder that died between two bit updates left a busy head (see the module
        // documentation): given back here, before anyone takes chunks.
        if self.header().chunk_lock.lock() == Taken::OwnerDied {
            self.reclaim_dead();
            self.header().chunk_lock.mark_consistent();
        }
    }

    pub(super) fn unlock_chunks(&self) {
        self.header().chunk_lock.unlock();
    }

    fn chunk_header(&self, i: usize) -> &ChunkHeader {
        // SAFETY: chunk `i < nchunks` is mapped for the life of the source; its header's
        // fields are read atomically where other processes write them (magic) or only
        // while its head is busy (map_len, written before the head bit).
        unsafe { &*(self.chunk_addr(i) as *const ChunkHeader) }
    }

    /// The chunks a busy head's `map_len` covers, clamped to the chunk area.
    fn busy_len(&self, i: usize) -> usize {
        let n = self.chunk_header(i).map_len / CHUNK;
        n.clamp(1, self.nchunks - i)
    }

    /// Gives back every busy span whose process is dead: its `used` bits and its `heads`
    /// bit. Returns how many chunks came back.
    ///
    /// pre: the chunk lock is held.
    pub(super) fn reclaim_dead(&self) -> usize {
        let mut back = 0;
        for i in 0..self.nchunks {
            if !Self::test(self.heads(), i) {
                continue;
            }
            let m = self.chunk_header(i).magic();
            if m & !0xffff_ffff != BUSY || os::process_alive(m as u32) {
                continue;
            }
            let n = self.busy_len(i);
            for k in i..i + n {
                Self::set(self.used(), k, false);
            }
            Self::set(self.heads(), i, false);
            back += n;
        }
        back
    }

    /// Takes `n` consecutive free chunks; returns the first, or null. The span comes busy
    /// (module documentation); the caller writes its chunk header into it, the magic last.
    pub fn take_span(&self, n: usize) -> *mut u8 {
        if !self.writable || n == 0 || n > self.nchunks {
            return core::ptr::null_mut();
        }
        self.lock_chunks();
        let mut found = self.find_free(n);
        if found.is_none() && self.reclaim_dead() > 0 {
            found = self.find_free(n);
        }
        let Some(first) = found else {
            self.unlock_chunks();
            return core::ptr::null_mut();
        };
        let c = self.chunk_addr(first);
        // The busy header needs its page in the file: populated first (a full file system
        // gives null here rather than SIGBUS at the write). The page may still hold the
        // busy header of the span's last user (`give_span`): cleared, the magic last.
        if !file::populate(c, PAGE) {
            self.unlock_chunks();
            return core::ptr::null_mut();
        }
        let h = self.chunk_header(first);
        // SAFETY: the chunk is free (its `used` bit is clear, under the lock): nobody else
        // reads or writes its first page.
        unsafe {
            core::ptr::write_bytes(c.add(8), 0, PAGE - 8);
            (*(h as *const ChunkHeader as *mut ChunkHeader)).map_len = n * CHUNK;
        }
        h.set_magic(busy_magic());
        Self::set(self.heads(), first, true);
        for i in first..first + n {
            Self::set(self.used(), i, true);
        }
        self.unlock_chunks();
        // The file is sparse: make sure its space exists now, so that a full file system
        // gives a null here rather than SIGBUS at the first touch.
        if !file::populate(c, n * CHUNK) {
            // SAFETY: the span is ours, busy, and nothing refers into it.
            unsafe { self.give_span(c, n) };
            return core::ptr::null_mut();
        }
        c
    }

    /// The first of `n` consecutive chunks whose `used` bits are clear.
    ///
    /// pre: the chunk lock is held.
    fn find_free(&self, n: usize) -> Option<usize> {
        let used = self.used();
        let mut run = 0;
        for i in 0..self.nchunks {
            if Self::test(used, i) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(i + 1 - n);
                }
            }
        }
        None
    }

    /// Returns the `n` chunks at `chunk` (taken with [`Self::take_span`], busy again:
    /// claimed by [`PageSource::free_claim`] or `claim`), zeroed for their next user.
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
        // All but the first page, which keeps the busy header until the bits are clear (so
        // a process killed before then leaves a span `reclaim_dead` finds); the next taker
        // clears that page.
        let (rest, rest_len) = (chunk.wrapping_add(PAGE), n * CHUNK - PAGE);
        if !file::punch(rest, rest_len) {
            // SAFETY: the span is ours and unused (contract).
            unsafe { core::ptr::write_bytes(rest, 0, rest_len) };
        }
        self.lock_chunks();
        for i in first..first + n {
            Self::set(self.used(), i, false);
        }
        Self::set(self.heads(), first, false);
        self.unlock_chunks();
    }

    /// Marks the `n`-chunk span at `chunk` busy for this process (before giving it back).
    ///
    /// # Safety
    /// The span is the caller's, and nothing else reads its header any more.
    unsafe fn claim(&self, chunk: *mut u8, n: usize) {
        let h = chunk as *mut ChunkHeader;
        // SAFETY: by the contract.
        unsafe {
            (*h).map_len = n * CHUNK;
            (*h).set_magic(busy_magic());
        }
    }

    /// Every used chunk belongs to a head (an arena chunk, a huge span, or a busy span of a
    /// live process) and every head is used; busy spans of dead processes are given back
    /// first.
    pub(super) fn check_chunks(&self) -> Result<(), &'static str> {
        self.lock_chunks();
        self.reclaim_dead();
        let mut covered = 0;
        let mut r = Ok(());
        for i in 0..self.nchunks {
            let used = Self::test(self.used(), i);
            if Self::test(self.heads(), i) {
                if !used {
                    r = Err("a chunk has a header but is not marked used");
                    break;
                }
                let h = self.chunk_header(i);
                let n = match h.magic() {
                    crate::chunk::MAGIC if h.kind == crate::chunk::CHUNK_HUGE => self.busy_len(i),
                    m if m & !0xffff_ffff == BUSY => self.busy_len(i),
                    _ => 1,
                };
                covered = covered.max(i + n);
            } else if used && i >= covered {
                r = Err(
                    "a chunk is marked used but belongs to no arena, huge block or live process",
                );
                break;
            }
        }
        self.unlock_chunks();
        r
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
        // Busy and with its head bit until the engine writes the arena header over it; a
        // lookup meanwhile finds no magic and says "invalid".
        self.take_span(1)
    }

    unsafe fn unmap_chunk(&self, chunk: *mut u8) {
        // SAFETY: passed on from the caller: the chunk is the engine's no more.
        unsafe {
            self.claim(chunk, 1);
            self.give_span(chunk, 1)
        }
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

    unsafe fn publish_span(&self, _head: *mut u8) -> bool {
        // The head bit was set when the span was taken; the header's magic publishes it.
        true
    }

    unsafe fn unpublish_span(&self, _head: *mut u8) {
        // The free's claim (`free_claim`) made the span busy; `give_span` clears the head
        // bit after the file is punched.
    }

    fn free_claim(&self) -> u64 {
        busy_magic()
    }

    unsafe fn unmap_span(&self, span: *mut u8, len: usize) {
        // SAFETY: passed on from the caller.
        unsafe { self.give_span(span, len / CHUNK) }
    }
}
