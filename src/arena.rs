//! The per-CPU arena: small bins and a page heap behind one lock, and a lock-free stack of
//! frees on their way back.
//!
//! Lock order: an arena lock is never taken while another arena lock is held, except by the
//! fork handler, which takes all of them in index order. Nothing under an arena lock
//! allocates; the page source is called under it (mmap, munmap, madvise).
//!
//! An all-zero `Arena` is a valid empty arena (null lists, zero counts, an unlocked lock)
//! except for its index, which [`Arena::init_in_place`] writes; arenas live in memory mapped
//! fresh from the OS and are never built on a stack.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::Ordering;

use crossbeam_utils::CachePadded;

use crate::chunk::{chunk_of, page_index, Block, ChunkHeader, Kind, PageDesc, CHUNK_ARENA, MAGIC};
use crate::large::{PageCounters, PageHeap};
use crate::lock::RawLock;
use crate::remote::Pending;
use crate::size_class::{
    class_of, class_size, pages_for, NUM_CLASSES, PAGE, PAGE_SHIFT, SMALL_MAX,
};
use crate::small::{ClassCounters, SmallBins};
use crate::source::PageSource;

/// Largest alignment served from an arena's page heap; larger ones are mapped directly.
pub const LARGE_ALIGN_MAX: usize = 64 * 1024;

/// Counters of large blocks (guarded by the arena lock).
#[derive(Clone, Copy, Default, Debug)]
pub struct LargeCounters {
    pub allocs: u64,
    pub frees: u64,
    /// Bytes of large runs in use (whole pages).
    pub in_use: usize,
}

/// Everything guarded by the arena lock.
struct State {
    bins: SmallBins,
    heap: PageHeap,
    large: LargeCounters,
}

/// One arena. Lives in a [`CachePadded`] slot of the arena table; the pending stack has a
/// cache line of its own because other CPUs write it.
pub struct Arena {
    lock: RawLock,
    index: u32,
    state: UnsafeCell<State>,
    pending: CachePadded<Pending>,
}

// SAFETY: `state` is only reached with `lock` held; `pending` is a lock-free structure.
unsafe impl Sync for Arena {}

/// A snapshot of one arena's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArenaStats {
    pub index: usize,
    pub classes: [ClassCounters; NUM_CLASSES],
    pub large: LargeCounters,
    pub pages: PageCounters,
    /// Free pages known to hold data (not yet purged).
    pub dirty_bytes: usize,
    /// Frees pushed by a thread on another CPU.
    pub remote_frees: u64,
    /// Times a thread found this arena's lock held.
    pub contentions: u64,
}

impl ArenaStats {
    /// Bytes of small blocks of class `c` in use.
    pub fn class_in_use(&self, c: usize) -> usize {
        let k = &self.classes[c];
        (k.allocs - k.frees) as usize * class_size(c)
    }
    /// Bytes of blocks in use, small and large.
    pub fn in_use(&self) -> usize {
        (0..NUM_CLASSES).map(|c| self.class_in_use(c)).sum::<usize>() + self.large.in_use
    }
}

/// What a pointer is, as far as its chunk header tells.
#[derive(Clone, Copy, Debug)]
pub enum Lookup {
    /// A block at a block boundary of a small run.
    Small {
        arena: u32,
        run: *mut PageDesc,
    },
    /// The first byte of a large run.
    Large {
        arena: u32,
        run: *mut PageDesc,
    },
    /// A block mapped directly; the header is its chunk header.
    Huge(*mut ChunkHeader),
    /// Not a block coreheap handed out (or one already freed).
    Invalid,
}

/// Finds what `p` is, in O(1), without any lock.
///
/// For a pointer to a live block the answer is exact. For any other pointer it is `Invalid`
/// unless it points at a block boundary of a small run (a freed small block is found by the
/// double-free mark, not here).
#[inline]
pub fn lookup<S: PageSource>(src: &S, p: *const u8) -> Lookup {
    let c = chunk_of(p);
    if !src.owns_chunk(c) {
        return Lookup::Invalid;
    }
    let h = c as *mut ChunkHeader;
    // SAFETY: the source says the chunk is mapped, so its header is readable; the fields read
    // here never change while it is mapped, and page descriptors are read through atomics.
    unsafe {
        if (*h).magic != MAGIC {
            return Lookup::Invalid;
        }
        if (*h).kind != CHUNK_ARENA {
            return if (*h).huge_ptr == p as usize {
                Lookup::Huge(h)
            } else {
                Lookup::Invalid
            };
        }
        let arena = (*h).arena;
        let mut i = page_index(p);
        let mut d = &(*h).pages[i];
        if d.kind() == Kind::SmallInterior {
            i -= d.lead();
            d = &(*h).pages[i];
        }
        let run = d as *const PageDesc as *mut PageDesc;
        let off = (p as usize) - (*h).page_addr(i) as usize;
        match d.kind() {
            Kind::Small if off % class_size(d.class()) == 0 => Lookup::Small { arena, run },
            Kind::Large if off == 0 => Lookup::Large { arena, run },
            _ => Lookup::Invalid,
        }
    }
}

impl Arena {
    /// Makes the zeroed memory at `slot` arena number `index`.
    ///
    /// # Safety
    /// `slot` points to zeroed, writable memory for an `Arena` that nothing else uses.
    pub unsafe fn init_in_place(slot: *mut Arena, index: u32) {
        // SAFETY: by the contract; all-zero is a valid arena (see the module documentation),
        // and we write the two fields that hold the index.
        unsafe {
            ptr::addr_of_mut!((*slot).index).write(index);
            (*(*slot).state.get()).heap = PageHeap::new(index);
        }
    }

    /// Allocates `size` bytes aligned to `align` (`size <= LARGE_MAX`,
    /// `align <= LARGE_ALIGN_MAX`). Returns the block, or null, and whether it reads zero.
    #[inline]
    pub fn alloc<S: PageSource>(&self, src: &S, size: usize, align: usize) -> (*mut u8, bool) {
        if size <= SMALL_MAX && align <= PAGE {
            let class = class_of(if size > align { size } else { align });
            self.lock.lock();
            // SAFETY: the lock is held.
            let st = unsafe { &mut *self.state.get() };
            // SAFETY: the lock is held.
            let r = match unsafe { st.bins.alloc_fast(class) } {
                Some(r) => r,
                // SAFETY: the lock is held.
                None => unsafe { self.alloc_small_slow(src, st, class) },
            };
            self.lock.unlock();
            r
        } else {
            self.alloc_large(src, size, align)
        }
    }

    #[cold]
    #[inline(never)]
    unsafe fn alloc_small_slow<S: PageSource>(
        &self,
        src: &S,
        st: &mut State,
        class: usize,
    ) -> (*mut u8, bool) {
        // SAFETY: the caller holds the lock.
        unsafe {
            self.drain_locked(src, st);
            st.bins
                .alloc_refill(&mut st.heap, src, class)
                .unwrap_or((ptr::null_mut(), false))
        }
    }

    #[cold]
    #[inline(never)]
    fn alloc_large<S: PageSource>(&self, src: &S, size: usize, align: usize) -> (*mut u8, bool) {
        let n = pages_for(size);
        let align_pages = if align > PAGE { align >> PAGE_SHIFT } else { 1 };
        self.lock.lock();
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        // SAFETY: the lock is held; n and align_pages are within the page heap's bounds
        // because size <= LARGE_MAX and align <= LARGE_ALIGN_MAX.
        let (mut d, mut dirty) = unsafe { st.heap.alloc_run(src, n, align_pages) };
        if d.is_null() {
            // Pending frees may hold the pages we need.
            // SAFETY: the lock is held.
            unsafe {
                self.drain_locked(src, st);
                (d, dirty) = st.heap.alloc_run(src, n, align_pages);
            }
        }
        let p = if d.is_null() {
            ptr::null_mut()
        } else {
            // SAFETY: `d` heads the run we just took.
            unsafe {
                (*d).set_kind(Kind::Large);
                st.large.allocs += 1;
                st.large.in_use += n * PAGE;
                let p = crate::chunk::run_addr(d);
                if dirty {
                    // A stale double-free mark must not survive into a live block.
                    (*p.cast::<Block>()).mark = 0;
                }
                p
            }
        };
        self.lock.unlock();
        (p, !dirty)
    }

    /// Returns a block to this arena: pushes it on the pending stack and drains the stack if
    /// it overflowed (or the block is large) and the lock is free.
    ///
    /// # Safety
    /// `p` is a live block of this arena as `what` (from [`lookup`]) says, and the caller
    /// gives up all use of it.
    #[inline]
    pub unsafe fn free<S: PageSource>(&self, src: &S, p: *mut u8, what: Lookup, mark: usize) {
        let b = p.cast::<Block>();
        // SAFETY: the block is ours now and at least 16 bytes long.
        unsafe {
            if (*b).mark == mark {
                self.confirm_double_free(src, p, what);
            }
            (*b).mark = mark;
            let n = self.pending.push(b);
            if n >= Pending::FLUSH || matches!(what, Lookup::Large { .. }) {
                self.flush_pending(src);
            }
        }
    }

    /// Counts a free that came from another CPU.
    #[inline]
    pub fn note_remote_free(&self) {
        self.pending.remote_frees.fetch_add(1, Ordering::Relaxed);
    }

    #[cold]
    #[inline(never)]
    fn flush_pending<S: PageSource>(&self, src: &S) {
        if self.lock.try_lock() {
            // SAFETY: the lock is held.
            unsafe { self.drain_locked(src, &mut *self.state.get()) };
            self.lock.unlock();
        }
    }

    /// The block's mark says it may be free already: look for it under the lock and abort
    /// if it is. A live block whose data happens to equal the mark passes.
    #[cold]
    #[inline(never)]
    unsafe fn confirm_double_free<S: PageSource>(&self, src: &S, p: *mut u8, what: Lookup) {
        self.lock.lock();
        // SAFETY: the lock is held; a run found by `lookup` stays a run of ours while it has
        // a block in use or pending, and is re-examined here under the lock.
        let dup = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            match what {
                Lookup::Small { run, .. } => {
                    (*run).kind() != Kind::Small || st.bins.run_has_free(run, p.cast())
                }
                Lookup::Large { run, .. } => (*run).kind() != Kind::Large,
                _ => false,
            }
        };
        self.lock.unlock();
        if dup {
            crate::diag::invalid_pointer(b"free(): double free detected", p);
        }
    }

    /// Returns every pending block to its run.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state.
    unsafe fn drain_locked<S: PageSource>(&self, src: &S, st: &mut State) {
        let mut b = self.pending.take_all();
        while !b.is_null() {
            // SAFETY: blocks on the pending stack are blocks of this arena that were live
            // when freed; their runs stay allocated until they are returned here.
            unsafe {
                let next = (*b).next;
                match lookup(src, b as *const u8) {
                    Lookup::Small { run, .. } => st.bins.free(&mut st.heap, src, run, b),
                    Lookup::Large { run, .. } => {
                        st.large.frees += 1;
                        st.large.in_use -= (*run).npages as usize * PAGE;
                        st.heap.free_run(src, run);
                    }
                    _ => crate::diag::invalid_pointer(b"coreheap: corrupted pending free", b.cast()),
                }
                b = next;
            }
        }
    }

    /// Resizes the large run `run` in place to hold `size` bytes. Returns whether it could.
    ///
    /// # Safety
    /// `run` heads a live large run of this arena whose block the caller owns.
    pub unsafe fn resize_large<S: PageSource>(
        &self,
        src: &S,
        run: *mut PageDesc,
        size: usize,
    ) -> bool {
        let n = pages_for(size);
        self.lock.lock();
        // SAFETY: the lock is held; `run` is ours.
        let ok = unsafe {
            let st = &mut *self.state.get();
            let have = (*run).npages as usize;
            if n > have {
                let ok = st.heap.grow_run(run, n);
                if ok {
                    st.large.in_use += (n - have) * PAGE;
                }
                ok
            } else {
                if n < have {
                    st.heap.shrink_run(src, run, n);
                    st.large.in_use -= (have - n) * PAGE;
                }
                true
            }
        };
        self.lock.unlock();
        ok
    }

    /// Drains pending frees and purges every dirty free page.
    pub fn trim<S: PageSource>(&self, src: &S) {
        self.lock.lock();
        // SAFETY: the lock is held.
        unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            st.heap.purge_all(src);
        }
        self.lock.unlock();
    }

    /// A snapshot of the counters (drains pending frees first, so they are exact).
    pub fn stats<S: PageSource>(&self, src: &S) -> ArenaStats {
        self.lock.lock();
        // SAFETY: the lock is held.
        let s = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            ArenaStats {
                index: self.index as usize,
                classes: st.bins.counters,
                large: st.large,
                pages: st.heap.counters,
                dirty_bytes: st.heap.dirty_pages * PAGE,
                remote_frees: self.pending.remote_frees.load(Ordering::Relaxed),
                contentions: self.lock.contentions(),
            }
        };
        self.lock.unlock();
        s
    }

    /// Verifies this arena's invariants (see `small.rs`, `large.rs` and `chunk.rs`).
    pub fn check<S: PageSource>(&self, src: &S) -> Result<(), &'static str> {
        self.lock.lock();
        // SAFETY: the lock is held.
        let r = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            let mut r = st.heap.check().and_then(|_| st.bins.check());
            if r.is_ok() {
                let mut in_use = 0usize;
                let mut runs = 0usize;
                st.heap.for_each_chunk(|c| {
                    let mut i = crate::chunk::HEADER_PAGES;
                    while i < crate::size_class::CHUNK_PAGES {
                        let d = &mut (*c).pages[i] as *mut PageDesc;
                        match (*d).kind() {
                            Kind::Small => {
                                runs += 1;
                                if r.is_ok() {
                                    r = crate::small::check_run(d);
                                }
                            }
                            Kind::Large => {
                                runs += 1;
                                in_use += (*d).npages as usize * PAGE;
                            }
                            _ => {}
                        }
                        i += (*d).npages as usize;
                    }
                });
                if r.is_ok() && in_use != st.large.in_use {
                    r = Err("large bytes in use disagree with the large runs");
                }
                if r.is_ok() && runs != st.heap.counters.runs {
                    r = Err("run count disagrees with the chunks");
                }
            }
            r
        };
        self.lock.unlock();
        r
    }

    /// Fork: take the lock before `fork` (called for every arena in index order).
    pub fn fork_lock(&self) {
        self.lock.lock();
    }
    /// Fork, parent side: release the lock taken by [`Self::fork_lock`].
    pub fn fork_unlock(&self) {
        self.lock.unlock();
    }
    /// Fork, child side: the lock's holder (the forking thread) has a new identity here;
    /// start over with an unlocked lock rather than unlocking.
    pub fn fork_reinit(&self) {
        self.lock.reinit();
    }
}
