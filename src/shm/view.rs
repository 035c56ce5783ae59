//! [`View`]: one process's view of a mapped shared heap, and the front end's [`Backend`]
//! over it. The allocation, free, usable-size, realloc and huge-block rules are the front
//! end's (`front/`), the same as the process heap's; what is the shared heap's own is the
//! arena table in the file, the choice of arena (`cpu % arenas`: no per-CPU caches), the
//! read-only mode and the checks of the file's chunk maps.

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use super::layout::{ShmArena, ShmHeader};
use super::{ShmPtr, ShmSource, ShmStats};
use crate::arena::{lookup, ORPHAN};
use crate::chunk::{ChunkHeader, CHUNK_HUGE, MAGIC};
use crate::front::{self, Backend, HugeCounters};

/// The heap mapped at `src.base`, as this process sees it.
///
/// Invariant: `src` describes a ready heap (or one this process is building) mapped whole
/// at `src.base` for as long as the view is used; its layout was validated when the heap
/// was opened and is not read from the file again.
pub(super) struct View {
    pub(super) src: ShmSource,
}

impl Backend for View {
    type Source = ShmSource;

    #[inline]
    fn source(&self) -> &ShmSource {
        &self.src
    }
    #[inline]
    fn arena_count(&self) -> usize {
        self.src.narenas
    }
    fn arena(&self, i: usize) -> &ShmArena {
        assert!(i < self.src.narenas);
        // SAFETY: arena `i < narenas` lies in the table of the mapped meta area (layout
        // invariant), initialised by the creator.
        unsafe {
            &*((self.src.base + self.src.arenas_off + i * core::mem::size_of::<ShmArena>())
                as *const ShmArena)
        }
    }
    fn current_arena(&self) -> usize {
        crate::os::current_cpu() % self.src.narenas
    }
    fn mark(&self) -> usize {
        self.header().mark as usize
    }
    fn huge_counters(&self) -> &HugeCounters {
        &self.header().huge
    }
    fn writable(&self) -> bool {
        self.src.writable
    }
    fn alloc(&self, size: usize, align: usize) -> (*mut u8, bool) {
        if !align.is_power_of_two() {
            return (ptr::null_mut(), false);
        }
        front::alloc_locked(self, size, align)
    }
    unsafe fn free(&self, p: *mut u8) {
        if p.is_null() {
            return;
        }
        if !self.src.writable {
            crate::diag::invalid_pointer(b"coreheap: free() on a read-only shared heap", p);
        }
        // SAFETY: passed on from the caller; the lookup is `p`'s.
        unsafe { front::free_locked(self, p, lookup(&self.src, p), b"free(): invalid pointer") }
    }
}

impl View {
    /// The heap mapped at `base`.
    ///
    /// pre: a ready heap (or one being built by this process) is mapped at `base`, whole.
    pub(super) fn at(base: usize, writable: bool) -> View {
        // SAFETY: by the precondition the header is mapped at `base`.
        let h = unsafe { &*(base as *const ShmHeader) };
        View {
            src: ShmSource {
                base,
                len: h.size as usize,
                meta: h.meta as usize,
                nchunks: h.nchunks as usize,
                used_off: h.used_off as usize,
                heads_off: h.heads_off as usize,
                arenas_off: h.arenas_off as usize,
                narenas: h.narenas as usize,
                writable,
            },
        }
    }

    pub(super) fn header(&self) -> &ShmHeader {
        self.src.header()
    }

    pub(super) fn arenas(&self) -> impl Iterator<Item = &ShmArena> {
        (0..self.src.narenas).map(move |i| self.arena(i))
    }

    /// A block and whether it reads zero (null when the heap is full or read-only).
    pub(super) fn alloc_raw(&self, size: usize, align: usize) -> *mut u8 {
        Backend::alloc(self, size, align).0
    }

    /// `Allocator::allocate`.
    pub(super) fn allocate(
        &self,
        layout: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        NonNull::new(self.alloc_raw(layout.size(), layout.align()))
            .map(|p| NonNull::slice_from_raw_parts(p, layout.size()))
            .ok_or(allocator_api2::alloc::AllocError)
    }

    pub(super) fn alloc_zeroed(&self, size: usize, align: usize) -> *mut u8 {
        let (p, zeroed) = Backend::alloc(self, size, align);
        if !p.is_null() && !zeroed {
            // SAFETY: a fresh block of at least `size` bytes.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
        p
    }

    /// # Safety
    /// `p` is null or a live block of this heap that no process uses any more.
    pub(super) unsafe fn free(&self, p: *mut u8) {
        // SAFETY: passed on.
        unsafe { Backend::free(self, p) }
    }

    pub(super) fn usable_size(&self, p: *mut u8) -> usize {
        front::usable_size(self, p)
    }

    /// # Safety
    /// `p` is null or a live block of this heap that the caller owns.
    pub(super) unsafe fn realloc(&self, p: *mut u8, size: usize, align: usize) -> *mut u8 {
        if p.is_null() {
            return self.alloc_raw(size, align);
        }
        if !self.src.writable || !align.is_power_of_two() {
            return ptr::null_mut();
        }
        // SAFETY: passed on.
        unsafe { front::realloc(self, p, size, align, false) }
    }

    pub(super) fn ptr(&self, p: ShmPtr) -> *mut u8 {
        if p.is_null() || p.offset() >= self.src.len as u64 {
            ptr::null_mut()
        } else {
            (self.src.base + p.offset() as usize) as *mut u8
        }
    }

    pub(super) fn offset_of(&self, p: *const u8) -> ShmPtr {
        let off = (p as usize).wrapping_sub(self.src.base);
        if p.is_null() || off >= self.src.len {
            ShmPtr::NULL
        } else {
            ShmPtr::from_offset(off as u64)
        }
    }

    /// Every arena's invariants, then the chunk maps: every published chunk has a sound
    /// header naming an arena that exists.
    pub(super) fn check(&self) -> Result<(), &'static str> {
        if !self.src.writable {
            return Err("a read-only heap cannot be checked (it takes the arena locks)");
        }
        front::check(self)?;
        self.src.check_chunks()?;
        let narenas = self.src.narenas as u32;
        let mut r = Ok(());
        self.src.for_each_head(|c| {
            let h = c as *const ChunkHeader;
            // SAFETY: a chunk with a `heads` bit is mapped and starts with a header.
            let (magic, kind, arena) = unsafe { ((*h).magic(), (*h).kind, (*h).arena_index()) };
            let busy = magic & !0xffff_ffff == super::source::BUSY;
            if r.is_ok() && magic != MAGIC && magic != 0 && !busy {
                r = Err("a chunk header has a bad magic");
            } else if r.is_ok()
                && magic == MAGIC
                && kind != CHUNK_HUGE
                && arena >= narenas
                && arena != ORPHAN
            {
                r = Err("an arena chunk names an arena that does not exist");
            }
        });
        r
    }

    pub(super) fn stats(&self) -> ShmStats {
        let (allocs, frees, _, mapped) = self.header().huge.read();
        let mut arenas = Vec::new();
        if self.src.writable {
            front::for_each_arena(self, |a| arenas.push(a));
        }
        ShmStats {
            arenas,
            huge_blocks: allocs - frees,
            huge_bytes: mapped as u64,
            chunks_used: self.src.chunks_used(),
            chunks_total: self.src.nchunks,
        }
    }
}
