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

use crossbeam_utils::CachePadded;

use crate::chunk::{
    chunk_of, header_of_desc, page_index, Block, ChunkHeader, Kind, PageDesc, CHUNK_ARENA, MAGIC,
};
use crate::cpucache::{Chain, BATCH_MAX};
use crate::large::{PageCounters, PageHeap};
use crate::lock::{RawLock, RobustLock, Taken};
use crate::remote::{Batch, Pending};
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
    /// Blocks that came back through the pending stack (counted at the drain, so the
    /// remote free itself pays no second atomic on the stack's line).
    pending_drained: u64,
    /// Shared heaps: times the lock was taken over from a dead holder, and chunks given up
    /// because the dead holder left the arena damaged (see [`Arena::recover`]).
    recoveries: u64,
    repairs: u64,
    orphaned: u64,
}

/// One arena. Lives in a [`CachePadded`] slot of the arena table; the pending stack has a
/// cache line of its own because other CPUs write it.
pub struct Arena {
    lock: RawLock,
    index: u32,
    /// The secret that encodes this arena's free-list links; written once at initialisation,
    /// on a line that only the lock and bins share (never the pending stack's).
    key: usize,
    state: UnsafeCell<State>,
    pending: CachePadded<Pending>,
    /// The lock of an arena in a shared heap (`PageSource::SHARED`), used instead of `lock`;
    /// unused (and all zero) in the process heap.
    robust: RobustLock,
}

/// A fingerprint of how the structures a shared heap keeps in its file are laid out here:
/// sizes and field offsets (the types are not `repr(C)`, so two builds may order fields
/// differently) and the link encoding. A heap written by a build with another fingerprint
/// is refused.
pub const LAYOUT_HASH: u64 = {
    use core::mem::{offset_of, size_of};
    let parts = [
        size_of::<Arena>(),
        offset_of!(Arena, lock),
        offset_of!(Arena, index),
        offset_of!(Arena, key),
        offset_of!(Arena, state),
        offset_of!(Arena, pending),
        offset_of!(Arena, robust),
        size_of::<State>(),
        offset_of!(State, bins),
        offset_of!(State, heap),
        offset_of!(State, large),
        offset_of!(State, pending_drained),
        offset_of!(State, recoveries),
        offset_of!(State, repairs),
        offset_of!(State, orphaned),
        size_of::<SmallBins>(),
        size_of::<PageHeap>(),
        size_of::<PageDesc>(),
        size_of::<ChunkHeader>(),
        size_of::<RobustLock>(),
        cfg!(feature = "unhardened") as usize,
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < parts.len() {
        h = (h ^ parts[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
};

/// The arena index written into the chunks of a shared heap's arena that a dead process
/// left damaged: they stay mapped, their live blocks stay valid, but they belong to no arena
/// any more (frees of their blocks are dropped, see [`Arena::recover`]).
pub const ORPHAN: u32 = u32::MAX - 1;

// SAFETY: `state` is only reached with the arena's lock held (`lock`, or `robust` in a
// shared heap); `pending` is a lock-free structure.
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
    /// Frees that came back through the pending stack: every free from a CPU of another
    /// arena, and local ones that found the lock held (counted when drained).
    pub remote_frees: u64,
    /// Times a thread found this arena's lock held.
    pub contentions: u64,
    /// Shared heaps: times this arena's lock was taken over from a dead process, and chunks
    /// it gave up because that process left them half-updated.
    pub recoveries: u64,
    /// Of those, the take-overs after which the arena was repaired in place (the others
    /// orphaned its chunks).
    pub repairs: u64,
    pub orphaned_chunks: u64,
    /// Free blocks of each class sitting in the class lists of this arena's CPUs' caches,
    /// and this arena's blocks in any CPU's outbox (counted in use by their runs, so
    /// `classes` counts them as allocated).
    pub cached: [u64; NUM_CLASSES],
    /// Blocks handed out and taken back by the lock-free rseq fast path on this arena's
    /// CPUs.
    pub fast_allocs: u64,
    pub fast_frees: u64,
}

impl ArenaStats {
    /// Bytes of small blocks of class `c` in use.
    pub fn class_in_use(&self, c: usize) -> usize {
        let k = &self.classes[c];
        // The caches are read without their CPUs' cooperation: clamp a racy snapshot.
        (k.allocs - k.frees).saturating_sub(self.cached[c]) as usize * class_size(c)
    }
    /// Bytes of blocks in use, small and large.
    pub fn in_use(&self) -> usize {
        (0..NUM_CLASSES)
            .map(|c| self.class_in_use(c))
            .sum::<usize>()
            + self.large.in_use
    }
}

/// What a pointer is, as far as its chunk header tells.
#[derive(Clone, Copy, Debug)]
pub enum Lookup {
    /// A block at a block boundary of a small run.
    Small { arena: u32, run: *mut PageDesc },
    /// The first byte of a large run.
    Large { arena: u32, run: *mut PageDesc },
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
            return if (*h).huge_ptr == crate::chunk::to_rel(p as usize, src.base()) {
                Lookup::Huge(h)
            } else {
                Lookup::Invalid
            };
        }
        let arena = (*h).arena_index();
        let mut i = page_index(p);
        let mut d = &(*h).pages[i];
        if d.kind() == Kind::SmallInterior {
            i -= d.lead();
            d = &(*h).pages[i];
        }
        let run = d as *const PageDesc as *mut PageDesc;
        let off = (p as usize) - (*h).page_addr(i) as usize;
        match d.kind() {
            Kind::Small if off.is_multiple_of(class_size(d.class())) => {
                Lookup::Small { arena, run }
            }
            Kind::Large if off == 0 => Lookup::Large { arena, run },
            _ => Lookup::Invalid,
        }
    }
}

/// Whether `p`, on a page of a small run of class `class`, is the start of one of its
/// blocks, for classes of at most a page (false for larger ones): runs start on a page and
/// such blocks lie at multiples of their size from the start, so exactly the addresses
/// aligned to that size are block starts.
#[inline]
pub fn small_block_start(p: *const u8, class: usize) -> bool {
    class < NUM_CLASSES && class_size(class) <= PAGE && (p as usize) & (class_size(class) - 1) == 0
}

/// If `p` is a live small block of at most a page, its arena and class: [`lookup`]'s answer
/// for such blocks, found from the block's own page descriptor (every page of a small run
/// records the class), without going to the run's first page. `None` for anything else,
/// which [`lookup`] then sorts out.
#[inline]
pub fn lookup_small<S: PageSource>(src: &S, p: *const u8) -> Option<(u32, usize)> {
    let c = chunk_of(p);
    if !src.owns_chunk(c) {
        return None;
    }
    let h = c as *const ChunkHeader;
    // SAFETY: as in `lookup`: the chunk is mapped, its header readable; page descriptors are
    // read through atomics.
    unsafe {
        if (*h).magic != MAGIC || (*h).kind != CHUNK_ARENA {
            return None;
        }
        let class = (*h).pages[page_index(p)].small_class()?;
        small_block_start(p, class).then(|| ((*h).arena_index(), class))
    }
}

/// What a pointer that is not a block start points into (see [`describe`]).
pub struct Inside {
    /// The owning arena; none for a huge block.
    pub arena: Option<u32>,
    /// Bytes of the block or free run (0 when unknown).
    pub size: usize,
    /// Whether that is a block in use (a small or large block, or a huge one) rather than
    /// free memory or a chunk header.
    pub block: bool,
}

/// For a pointer into one of coreheap's chunks that is not a block start (an interior or
/// stale pointer): what it points into. `None` for memory coreheap does not manage. Read
/// without the arena's lock, for a message only.
pub fn describe<S: PageSource>(src: &S, p: *const u8) -> Option<Inside> {
    let c = chunk_of(p);
    if !src.owns_chunk(c) {
        return None;
    }
    let h = c as *mut ChunkHeader;
    // SAFETY: as in `lookup`: the chunk is mapped and its header readable.
    unsafe {
        if (*h).magic != MAGIC {
            return None;
        }
        if (*h).kind != CHUNK_ARENA {
            let block = crate::chunk::to_rel(p as usize, src.base()) >= (*h).huge_ptr;
            return Some(Inside {
                arena: None,
                size: (*h).huge_size,
                block,
            });
        }
        let mut i = page_index(p);
        let mut d = &(*h).pages[i];
        if d.kind() == Kind::SmallInterior {
            i -= d.lead();
            d = &(*h).pages[i];
        }
        // Interior pages of a large run keep no distance to its head: walk back.
        while d.kind() == Kind::Interior && i > 0 {
            i -= 1;
            d = &(*h).pages[i];
        }
        let (size, block) = match d.kind() {
            Kind::Small => (class_size(d.class()), true),
            Kind::Large => (d.npages as usize * PAGE, true),
            _ => (0, false),
        };
        Some(Inside {
            arena: Some((*h).arena_index()),
            size,
            block,
        })
    }
}

impl Arena {
    /// Makes the zeroed memory at `slot` arena number `index`.
    ///
    /// # Safety
    /// `slot` points to zeroed, writable memory for an `Arena` that nothing else uses.
    /// `debug`: debug mode's run scrubbing (see [`SmallBins::set_scrub`]).
    pub unsafe fn init_in_place(slot: *mut Arena, index: u32, debug: bool) {
        let key = crate::os::secret_key(index as usize);
        // SAFETY: by the contract; all-zero is a valid arena (see the module documentation),
        // and we write the fields that hold the index and the free-list key.
        unsafe {
            ptr::addr_of_mut!((*slot).index).write(index);
            ptr::addr_of_mut!((*slot).key).write(key);
            let st = &mut *(*slot).state.get();
            st.heap = PageHeap::new(index);
            st.bins.set_key(key);
            st.bins.set_scrub(debug);
        }
    }

    /// Makes the zeroed memory at `slot` arena number `index` of a shared heap, with a
    /// process-shared robust lock. Returns false if the lock could not be made.
    ///
    /// # Safety
    /// As for [`Arena::init_in_place`].
    pub unsafe fn init_shared(slot: *mut Arena, index: u32) -> bool {
        // SAFETY: by the contract.
        unsafe {
            Self::init_in_place(slot, index, false);
            RobustLock::init_in_place(ptr::addr_of_mut!((*slot).robust))
        }
    }

    /// The secret that encodes this arena's free-list links. Fixed after initialisation.
    pub fn key(&self) -> usize {
        self.key
    }

    /// Takes the arena's lock: the private futex lock, or in a shared heap the robust lock,
    /// recovering the arena if its last holder died holding it.
    #[inline(always)]
    fn acquire<S: PageSource>(&self, src: &S) {
        if S::SHARED {
            if self.robust.lock() == Taken::OwnerDied {
                self.recover(src);
            }
        } else {
            self.lock.lock();
        }
    }

    /// Takes the lock if it is free now (see [`Arena::acquire`]).
    #[inline(always)]
    fn try_acquire<S: PageSource>(&self, src: &S) -> bool {
        if S::SHARED {
            match self.robust.try_lock() {
                None => false,
                Some(t) => {
                    if t == Taken::OwnerDied {
                        self.recover(src);
                    }
                    true
                }
            }
        } else {
            self.lock.try_lock()
        }
    }

    #[inline(always)]
    fn release<S: PageSource>(&self, _src: &S) {
        if S::SHARED {
            self.robust.unlock()
        } else {
            self.lock.unlock()
        }
    }

    /// Shared heaps: whether the run `run` (found by a lookup made before the lock was
    /// taken) still belongs to this arena; a recovery may have orphaned its chunk since.
    /// Always true in the process heap.
    ///
    /// pre: the caller holds the lock; `run` is a descriptor in a mapped chunk.
    #[inline(always)]
    fn owns_run<S: PageSource>(&self, run: *mut PageDesc) -> bool {
        // SAFETY: by the precondition the header is mapped.
        !S::SHARED || unsafe { (*header_of_desc(run)).arena_index() } == self.index
    }

    /// The lock was taken from a holder that died in its critical section: repair the arena
    /// or, where that cannot be done safely, orphan its chunks and start it over empty.
    ///
    /// Repair, when the holder died outside every update of page runs (the page heap's
    /// `busy` mark, set around each of them in a shared heap): the page runs, the free-run
    /// lists and the chunk list are then as the last finished update left them, and what
    /// the holder may have half-done is confined to small runs and bins (a block half
    /// popped or pushed, a bin half-linked, counts not yet updated), which
    /// [`SmallBins::rebuild`] rebuilds from the runs themselves; the large counters are
    /// recounted from the runs; then the whole arena is checked.
    ///
    /// Orphan, when the mark was set or the check fails: every chunk whose header names
    /// this arena is rewritten to name [`ORPHAN`] and the arena starts over empty. Blocks in
    /// orphaned chunks stay valid for whoever holds them; their memory is lost to the heap.
    /// A page-run update cut short (a run split but not yet listed, a list half-linked)
    /// passes checks that follow `next` links, and the next unlink then hands a run out
    /// twice (a review reproduced exactly that); finishing or undoing it would need a
    /// journal of every operation, giving up the chunks cannot hand out a block twice.
    ///
    /// pre: the calling thread holds `robust`, just taken with `Taken::OwnerDied`.
    #[cold]
    #[inline(never)]
    fn recover<S: PageSource>(&self, src: &S) {
        // SAFETY: the lock is held (precondition).
        let st = unsafe { &mut *self.state.get() };
        st.recoveries += 1;
        let intact = !st.heap.busy();
        // The recovery is itself an update: if this process dies in it, the next taker
        // orphans (a repair half done is not trusted).
        st.heap.enter::<S>();
        // SAFETY: as above; with the mark clear the page heap is sound (see above), which
        // its check confirms before `rebuild` changes anything; the walks of `rebuild` are
        // bounded and checked.
        let repaired = intact
            && unsafe {
                st.heap.check(src).is_ok() && {
                    st.bins.rebuild(&mut st.heap, src);
                    let (mut large, mut runs) = (0usize, 0usize);
                    st.heap.for_each_chunk(src, |c| {
                        let mut i = crate::chunk::HEADER_PAGES;
                        while i < crate::size_class::CHUNK_PAGES {
                            let d = &(*c).pages[i];
                            match d.kind() {
                                Kind::Large => {
                                    large += d.npages as usize * PAGE;
                                    runs += 1;
                                }
                                Kind::Small => runs += 1,
                                _ => {}
                            }
                            i += (d.npages as usize).max(1);
                        }
                    });
                    st.large.in_use = large;
                    st.heap.counters.runs = runs;
                    self.check_locked(src, st).is_ok()
                }
            };
        if repaired {
            st.repairs += 1;
        } else {
            self.orphan_all(src, st);
        }
        st.heap.leave::<S>();
        self.robust.mark_consistent();
    }

    /// See [`Arena::recover`].
    #[cold]
    fn orphan_all<S: PageSource>(&self, src: &S, st: &mut State) {
        let index = self.index;
        let mut n = 0;
        // Through the source, not the arena's chunk list, which may be half-updated.
        src.for_each_chunk(&mut |c| {
            let h = c.cast::<ChunkHeader>();
            // SAFETY: the source lists mapped chunks, whose headers are readable; `magic`
            // is written last when a chunk is set up (`init_arena_chunk`), so a header
            // with it names its arena.
            unsafe {
                if (*h).magic() == MAGIC && (*h).kind == CHUNK_ARENA && (*h).arena_index() == index
                {
                    (*h).set_arena_index(ORPHAN);
                    n += 1;
                }
            }
        });
        let key = self.key;
        st.bins = SmallBins::new();
        st.bins.set_key(key);
        // The new page heap carries the caller's update mark (`recover` holds one): a
        // death while it is being written leaves a heap that is marked busy, whatever
        // order the copy writes its bytes in.
        let mut fresh = PageHeap::new(index);
        fresh.enter::<S>();
        st.heap = fresh;
        st.large = LargeCounters::default();
        st.orphaned += n;
    }

    /// Allocates `size` bytes aligned to `align` (`size <= LARGE_MAX`,
    /// `align <= LARGE_ALIGN_MAX`). Returns the block, or null, and whether it reads zero.
    #[inline]
    pub fn alloc<S: PageSource>(&self, src: &S, size: usize, align: usize) -> (*mut u8, bool) {
        if size <= SMALL_MAX && align <= PAGE {
            let class = class_of(if size > align { size } else { align });
            self.acquire(src);
            // SAFETY: the lock is held.
            let st = unsafe { &mut *self.state.get() };
            // SAFETY: the lock is held.
            let r = match unsafe { st.bins.alloc_fast(src, class) } {
                Some(r) => r,
                // SAFETY: the lock is held.
                None => unsafe { self.alloc_small_slow(src, st, class) },
            };
            self.release(src);
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
            st.heap.decay(src, crate::os::now_ms());
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
        self.acquire(src);
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        // Pending frees may hold the pages we need: return them before the page heap maps
        // more. The lock is held; n and align_pages are within the page heap's bounds
        // because size <= LARGE_MAX and align <= LARGE_ALIGN_MAX.
        // SAFETY: as just said.
        let (d, dirty) = unsafe {
            self.drain_locked(src, st);
            st.heap.decay(src, crate::os::now_ms());
            // Taking the run and marking it Large is one page-run update (see `recover`).
            st.heap.enter::<S>();
            st.heap.alloc_run(src, n, align_pages)
        };
        let p = if d.is_null() {
            st.heap.leave::<S>();
            ptr::null_mut()
        } else {
            // SAFETY: `d` heads the run we just took.
            unsafe {
                (*d).set_kind(Kind::Large);
                st.heap.leave::<S>();
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
        self.release(src);
        (p, !dirty)
    }

    /// Returns a block to this arena. A small block freed on the arena's own CPU goes
    /// straight back to its run if the lock is free; any other small block is pushed on the
    /// pending stack, which is drained when it overflows if the lock is free, and otherwise
    /// by the next allocation that needs memory. A large block always takes the lock and goes
    /// straight back: held on the pending stack of an owner that no longer allocates, it
    /// would keep its pages (and often its whole chunk) resident indefinitely.
    ///
    /// # Safety
    /// `p` is a live block of this arena as `what` (from [`lookup`]) says, and the caller
    /// gives up all use of it. `local` says whether the calling thread runs on this arena's
    /// CPU.
    #[inline]
    pub unsafe fn free<S: PageSource>(
        &self,
        src: &S,
        p: *mut u8,
        what: Lookup,
        mark: usize,
        local: bool,
    ) {
        let b = p.cast::<Block>();
        // SAFETY: the block is ours now and at least 16 bytes long.
        unsafe {
            if (*b).mark == mark {
                self.confirm_double_free(src, p, what, b"free(): double free detected");
            }
            (*b).mark = mark;
            self.free_marked(src, p, what, local);
        }
    }

    /// [`Arena::free`] after the double-free check, with the block's mark already written.
    ///
    /// # Safety
    /// As for [`Arena::free`].
    #[inline]
    pub unsafe fn free_marked<S: PageSource>(
        &self,
        src: &S,
        p: *mut u8,
        what: Lookup,
        local: bool,
    ) {
        let b = p.cast::<Block>();
        // SAFETY: as the contract says.
        unsafe {
            match what {
                Lookup::Small { run, .. } => {
                    if local && self.try_acquire(src) {
                        let st = &mut *self.state.get();
                        if self.owns_run::<S>(run) {
                            st.bins.free(&mut st.heap, src, run, b);
                        }
                        self.release(src);
                    } else if self.pending.push(b, self.key, src.base()) >= Pending::FLUSH {
                        self.flush_pending(src);
                    }
                }
                Lookup::Large { run, .. } => {
                    self.acquire(src);
                    let st = &mut *self.state.get();
                    if self.owns_run::<S>(run) {
                        Self::free_large_locked(src, st, run);
                    }
                    self.drain_locked(src, st);
                    self.release(src);
                }
                _ => crate::diag::invalid_pointer(b"coreheap: free of a foreign block", p),
            }
        }
    }

    /// Takes up to `n` blocks of class `class` under one lock round: returns the first (and
    /// whether it reads zero), with the others pushed on `chain`. Null when memory is
    /// exhausted.
    /// Every block put on the chain gets `mark`, as freed blocks do.
    ///
    /// Only for a source with base 0: a chain links plain addresses, as the CPU caches'
    /// assembly does (`cpucache.rs`), and only the process heap has CPU caches.
    pub fn alloc_batch<S: PageSource>(
        &self,
        src: &S,
        class: usize,
        n: usize,
        mark: usize,
        chain: &mut Chain,
    ) -> (*mut u8, bool) {
        debug_assert_eq!(src.base(), 0, "CPU-cache chains link plain addresses");
        self.acquire(src);
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        // SAFETY: the lock is held.
        let first = match unsafe { st.bins.alloc_fast(src, class) } {
            Some(r) => r,
            // SAFETY: the lock is held.
            None => unsafe { self.alloc_small_slow(src, st, class) },
        };
        if !first.0.is_null() {
            // Taken in address order (a run hands out ascending blocks), pushed in reverse,
            // so that pops go on in address order: objects allocated one after another stay
            // neighbours, as they are on the locked path (Python's GC walk measured 15%
            // slower with the batch reversed).
            let mut got = [ptr::null_mut::<u8>(); BATCH_MAX];
            let mut k = 0;
            while k < n.min(BATCH_MAX) - 1 {
                // SAFETY: the lock is held.
                let Some((b, _)) = (unsafe { st.bins.alloc_fast(src, class) }) else {
                    break;
                };
                got[k] = b;
                k += 1;
            }
            for &b in got[..k].iter().rev() {
                // SAFETY: the block was just taken from its run: free to us, on no list.
                unsafe {
                    (*b.cast::<Block>()).mark = mark;
                    chain.push(b.cast());
                }
            }
        }
        self.release(src);
        first
    }

    /// Returns every block of a packed chain (taken off a CPU cache, or built by
    /// [`Arena::alloc_batch`]) to its run, under one lock round.
    ///
    /// # Safety
    /// The chain is the caller's, and its blocks are free small blocks of this arena, each
    /// counted in use by its run. The source's base is 0 (chains link plain addresses; see
    /// [`Arena::alloc_batch`]).
    pub unsafe fn free_chain<S: PageSource>(&self, src: &S, chain: usize) {
        debug_assert_eq!(src.base(), 0, "CPU-cache chains link plain addresses");
        self.acquire(src);
        // SAFETY: the lock is held; the blocks are ours and of this arena (contract).
        unsafe {
            let st = &mut *self.state.get();
            let index = self.index;
            let r = crate::cpucache::for_each_block(chain, self.key(), |b| {
                match lookup(src, b as *const u8) {
                    Lookup::Small { run, arena } if arena == index => {
                        st.bins.free(&mut st.heap, src, run, b)
                    }
                    _ => crate::diag::invalid_pointer(b"coreheap: corrupted cpu cache", b.cast()),
                }
            });
            if let Err(b) = r {
                crate::diag::invalid_pointer(
                    b"coreheap: free list link overwritten (write after free or double free)",
                    b.cast(),
                );
            }
        }
        self.release(src);
    }

    /// Pushes `batch` (blocks of this arena freed on another CPU) onto the pending stack with
    /// one compare-and-swap, and drains the stack if it overflows and the lock is free.
    ///
    /// # Safety
    /// As for [`Pending::push_batch`], with this arena's key (so `src` has base 0).
    pub unsafe fn push_remote_batch<S: PageSource>(&self, src: &S, batch: &Batch) {
        debug_assert_eq!(src.base(), 0, "outbox batches link plain addresses");
        // SAFETY: by the contract.
        if unsafe { self.pending.push_batch(batch) } >= Pending::FLUSH {
            self.flush_pending(src);
        }
    }

    #[cold]
    #[inline(never)]
    fn flush_pending<S: PageSource>(&self, src: &S) {
        if self.try_acquire(src) {
            // SAFETY: the lock is held.
            unsafe { self.drain_locked(src, &mut *self.state.get()) };
            self.release(src);
        }
    }

    /// The block's mark says it may be free already: look for it under the lock and abort
    /// with `msg` if it is. A live block whose data happens to equal the mark passes.
    ///
    /// # Safety
    /// `what` is `lookup(p)`, a block of this arena.
    #[cold]
    #[inline(never)]
    pub unsafe fn confirm_double_free<S: PageSource>(
        &self,
        src: &S,
        p: *mut u8,
        what: Lookup,
        msg: &[u8],
    ) {
        self.acquire(src);
        // SAFETY: the lock is held; a run found by `lookup` stays a run of ours while it has
        // a block in use or pending, and is re-examined here under the lock.
        let (dup, size) = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            match what {
                Lookup::Small { run, .. } | Lookup::Large { run, .. }
                    if !self.owns_run::<S>(run) =>
                {
                    (false, 0)
                }
                Lookup::Small { run, .. } => (
                    (*run).kind() != Kind::Small || st.bins.run_has_free(src, run, p.cast()),
                    class_size((*run).class()),
                ),
                Lookup::Large { run, .. } => {
                    ((*run).kind() != Kind::Large, (*run).npages as usize * PAGE)
                }
                _ => (false, 0),
            }
        };
        self.release(src);
        if dup {
            crate::diag::block_error(msg, p, Some(self.index), size);
        }
    }

    /// Returns every pending block to its run.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state.
    unsafe fn drain_locked<S: PageSource>(&self, src: &S, st: &mut State) {
        let base = src.base();
        let mut b = self.pending.take_all(base);
        let key = self.key;
        // The block whose link led to `b` (null for the head, which the stack itself holds).
        let mut from: *mut Block = ptr::null_mut();
        while !b.is_null() {
            // Every block is looked up before anything is read through it: a link that does
            // not decode to a block of this arena was overwritten in `from`.
            let what = lookup(src, b as *const u8);
            let ok = matches!(what, Lookup::Small { arena, .. } | Lookup::Large { arena, .. }
                if arena == self.index);
            // A shared heap's block whose chunk a recovery orphaned: dropped.
            let orphan = S::SHARED
                && matches!(what, Lookup::Small { arena, .. } | Lookup::Large { arena, .. }
                    if arena == ORPHAN);
            if !ok && !orphan {
                let at = if from.is_null() { b } else { from };
                crate::diag::invalid_pointer(
                    b"coreheap: corrupted free list (a write into a freed block on a pending stack)",
                    at.cast(),
                );
            }
            // SAFETY: `b` is a block of this arena (just checked) that was freed onto the
            // pending stack; its run stays allocated until it is returned here.
            unsafe {
                st.pending_drained += 1;
                let next = Pending::next_of(b, key, base);
                match what {
                    _ if orphan => {}
                    Lookup::Small { run, .. } => st.bins.free(&mut st.heap, src, run, b),
                    Lookup::Large { run, .. } => Self::free_large_locked(src, st, run),
                    _ => {}
                }
                from = b;
                b = next;
            }
        }
    }

    /// Returns the large run `run` to the page heap.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state; `run` heads a large run of
    /// this arena whose block nobody uses any more.
    unsafe fn free_large_locked<S: PageSource>(src: &S, st: &mut State, run: *mut PageDesc) {
        // SAFETY: as the contract says.
        unsafe {
            st.large.frees += 1;
            st.large.in_use -= (*run).npages as usize * PAGE;
            st.heap.free_run(src, run);
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
        // At least one page: shrinking to zero pages would free the run under a live block.
        let n = pages_for(size).max(1);
        self.acquire(src);
        // SAFETY: the lock is held; `run` is ours.
        let ok = unsafe {
            let st = &mut *self.state.get();
            let have = (*run).npages as usize;
            if !self.owns_run::<S>(run) {
                false
            } else if n > have {
                let ok = st.heap.grow_run(src, run, n);
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
        self.release(src);
        ok
    }

    /// Drains pending frees and purges every dirty free page.
    pub fn trim<S: PageSource>(&self, src: &S) {
        self.acquire(src);
        // SAFETY: the lock is held.
        unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            st.heap.purge_all(src);
        }
        self.release(src);
    }

    /// A snapshot of the counters (drains pending frees first, so they are exact).
    pub fn stats<S: PageSource>(&self, src: &S) -> ArenaStats {
        self.acquire(src);
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
                remote_frees: st.pending_drained,
                contentions: if S::SHARED {
                    self.robust.contentions()
                } else {
                    self.lock.contentions()
                },
                recoveries: st.recoveries,
                repairs: st.repairs,
                orphaned_chunks: st.orphaned,
                ..ArenaStats::default()
            }
        };
        self.release(src);
        s
    }

    /// Verifies this arena's invariants (see `small.rs`, `large.rs` and `chunk.rs`).
    pub fn check<S: PageSource>(&self, src: &S) -> Result<(), &'static str> {
        self.acquire(src);
        // SAFETY: the lock is held.
        let r = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            self.check_locked(src, st)
        };
        self.release(src);
        r
    }

    /// [`Arena::check`] without draining the pending stack first.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state.
    unsafe fn check_locked<S: PageSource>(
        &self,
        src: &S,
        st: &mut State,
    ) -> Result<(), &'static str> {
        // SAFETY: by the contract.
        unsafe {
            let mut r = st.heap.check(src).and_then(|_| st.bins.check(src));
            if r.is_ok() {
                let mut in_use = 0usize;
                let mut runs = 0usize;
                let key = st.bins.key();
                st.heap.for_each_chunk(src, |c| {
                    let mut i = crate::chunk::HEADER_PAGES;
                    while i < crate::size_class::CHUNK_PAGES {
                        let d = &mut (*c).pages[i] as *mut PageDesc;
                        match (*d).kind() {
                            Kind::Small => {
                                runs += 1;
                                if r.is_ok() {
                                    r = crate::small::check_run(src, d, key);
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
        }
    }

    /// Takes the lock and keeps it: for tests of what happens when its holder dies. With
    /// `damage` 1 it then leaves what a holder killed half-way through a small allocation
    /// leaves (a run's count off, one of its free blocks gone from its list); with 2, a
    /// page-run update begun and not finished.
    #[doc(hidden)]
    pub fn acquire_and_keep<S: PageSource>(&self, src: &S, damage: u8) {
        self.acquire(src);
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        match damage {
            // SAFETY: the lock is held.
            1 => unsafe { st.bins.damage_for_test(src) },
            2 => st.heap.enter::<S>(),
            _ => {}
        }
    }

    /// Releases a lock taken with [`Arena::acquire_and_keep`].
    pub fn release_kept<S: PageSource>(&self, src: &S) {
        self.release(src);
    }

    /// Makes a shared arena's lock anew, unlocked: for a private copy of a shared heap
    /// made in a fork child, whose locks were held by the parent.
    ///
    /// # Safety
    /// `a` is an arena of a shared heap that no other thread uses, whose lock is on no
    /// thread's robust list.
    pub unsafe fn reinit_shared_lock(a: *mut Arena) {
        // SAFETY: by the contract.
        unsafe { RobustLock::init_in_place(ptr::addr_of_mut!((*a).robust)) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{run_addr, CHUNK_HUGE, HEADER_PAGES};
    use crate::large::tests::TestSource;
    use crate::size_class::{run_blocks, run_pages, CHUNK};
    use core::sync::atomic::Ordering;
    use std::alloc::Layout;

    const MARK: usize = 0x5a5a_1234_8765_a5a5 | 1;

    /// An arena in zeroed memory of its own, as the heap builds them.
    struct TestArena(*mut Arena);

    impl TestArena {
        fn new(index: u32) -> Self {
            let layout = Layout::new::<Arena>();
            // SAFETY: `Arena` is not zero-sized.
            let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Arena>();
            assert!(!p.is_null());
            // SAFETY: `p` is zeroed, writable memory for an `Arena` that nothing else uses.
            unsafe { Arena::init_in_place(p, index, false) };
            Self(p)
        }
    }

    impl core::ops::Deref for TestArena {
        type Target = Arena;
        fn deref(&self) -> &Arena {
            // SAFETY: initialised in `new`, freed only in `drop`.
            unsafe { &*self.0 }
        }
    }

    impl Drop for TestArena {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout; the arena holds no destructors
            // (its chunks belong to the source, which unmaps them).
            unsafe { std::alloc::dealloc(self.0.cast(), Layout::new::<Arena>()) };
        }
    }

    fn small_run(src: &TestSource, p: *const u8) -> *mut PageDesc {
        match lookup(src, p) {
            Lookup::Small { arena, run } => {
                assert_eq!(arena, 3);
                run
            }
            other => panic!("{p:?}: expected a small block, found {other:?}"),
        }
    }

    fn large_run(src: &TestSource, p: *const u8) -> *mut PageDesc {
        match lookup(src, p) {
            Lookup::Large { arena, run } => {
                assert_eq!(arena, 3);
                run
            }
            other => panic!("{p:?}: expected a large block, found {other:?}"),
        }
    }

    fn invalid(src: &TestSource, p: *const u8) {
        assert!(
            matches!(lookup(src, p), Lookup::Invalid),
            "{p:?}: expected Invalid, found {:?}",
            lookup(src, p)
        );
        assert_eq!(lookup_small(src, p), None, "{p:?}: lookup_small accepts it");
    }

    /// `lookup_small` agrees with `lookup` on small block `p` of class `c` of arena 3: the
    /// arena and class for classes of at most a page, none for larger ones.
    fn small_agrees(src: &TestSource, p: *const u8, c: usize) {
        let want = (class_size(c) <= PAGE).then_some((3, c));
        assert_eq!(lookup_small(src, p), want, "{p:?}, class {c}");
    }

    #[test]
    fn lookup_classifies_pointers() {
        let src = TestSource::new(32);
        let a = TestArena::new(3);

        // Small blocks of every class: the start is found, with its run; any pointer that is
        // not on a block boundary is not.
        let mut small = Vec::new();
        for c in 0..NUM_CLASSES {
            let cs = class_size(c);
            let (p, _) = a.alloc(&src, cs, 8);
            assert!(!p.is_null());
            let run = small_run(&src, p);
            // SAFETY: `run` heads a live small run.
            unsafe {
                assert_eq!((*run).kind(), Kind::Small);
                assert_eq!((*run).class(), c);
            }
            let start = run_addr(run) as usize;
            assert!((start..start + run_pages(c) * PAGE).contains(&(p as usize)));
            small_agrees(&src, p, c);
            invalid(&src, p.wrapping_add(1));
            invalid(&src, p.wrapping_add(cs / 2 + 1));
            if cs >= 32 {
                invalid(&src, p.wrapping_add(cs / 2));
            }
            small.push((p, c));
        }

        // Fill one run of the 64-byte class and one of the 4 KiB class to their ends: the
        // blocks on the run's interior pages resolve to the run's head.
        for c in [2, 8] {
            let first = a.alloc(&src, class_size(c), 1).0;
            let run = small_run(&src, first);
            let mut last = first;
            // SAFETY: `run` heads a live small run of this arena.
            while unsafe { (*run).bump as usize } < run_blocks(c) {
                last = a.alloc(&src, class_size(c), 1).0;
                assert_eq!(small_run(&src, last), run);
                small_agrees(&src, last, c);
            }
            let end = run_addr(run) as usize + run_pages(c) * PAGE;
            assert_eq!(last as usize, end - class_size(c), "class {c}");
            let tail_page = (end - PAGE) as *const u8;
            // SAFETY: the run's last page is one of its interior pages.
            unsafe {
                assert_eq!(
                    (*crate::chunk::header_of_desc(run)).pages[page_index(tail_page)].kind(),
                    Kind::SmallInterior
                );
            }
            assert_eq!(small_run(&src, tail_page), run);
            invalid(&src, tail_page.wrapping_add(8));
        }

        // Large blocks: only the first byte is a block; interior pages are not.
        let (l, _) = a.alloc(&src, 5 * PAGE, 8);
        let run = large_run(&src, l);
        // SAFETY: `run` heads a live large run.
        assert_eq!(unsafe { (*run).npages }, 5);
        assert_eq!(run_addr(run), l);
        for off in [1, 16, PAGE - 1, PAGE, 2 * PAGE + 16, 4 * PAGE, 5 * PAGE - 1] {
            invalid(&src, l.wrapping_add(off));
        }
        let (al, _) = a.alloc(&src, 3 * PAGE, LARGE_ALIGN_MAX);
        assert_eq!(al as usize % LARGE_ALIGN_MAX, 0);
        large_run(&src, al);
        invalid(&src, al.wrapping_add(PAGE));

        // The chunk header pages, the free tail of the chunk, and the chunk's very start
        // (which belongs to the chunk below).
        let chunk = chunk_of(l);
        for p in [
            chunk + 16,
            chunk + PAGE,
            chunk + (HEADER_PAGES - 1) * PAGE + 64,
            chunk + CHUNK - PAGE,
            chunk + CHUNK - 16,
            chunk,
        ] {
            invalid(&src, p as *const u8);
        }

        // Pointers outside every chunk of the source.
        let on_stack = 0u64;
        invalid(&src, &on_stack as *const u64 as *const u8);
        let boxed = Box::new([0u8; 64]);
        invalid(&src, boxed.as_ptr());
        invalid(&src, core::ptr::null());
        invalid(&src, usize::MAX as *const u8);
        invalid(&src, (chunk + CHUNK + HEADER_PAGES * PAGE) as *const u8);

        // A chunk of the source with a huge header: only its block pointer is the block.
        let hc = src.map_chunk();
        assert!(!hc.is_null());
        invalid(&src, hc.wrapping_add(PAGE)); // no magic yet
        let h = hc.cast::<ChunkHeader>();
        // SAFETY: `hc` is a fresh chunk of the source that nothing else uses.
        unsafe {
            (*h).kind = CHUNK_HUGE;
            (*h).map_base = hc as usize;
            (*h).map_len = CHUNK;
            (*h).huge_ptr = hc as usize + PAGE;
            (*h).magic = MAGIC;
        }
        assert!(matches!(lookup(&src, hc.wrapping_add(PAGE)), Lookup::Huge(x) if x == h));
        invalid(&src, hc.wrapping_add(2 * PAGE));
        invalid(&src, hc.wrapping_add(PAGE + 16));
        // SAFETY: nothing refers into `hc`.
        unsafe { src.unmap_chunk(hc) };
        invalid(&src, hc.wrapping_add(PAGE));

        assert_eq!(a.check(&src), Ok(()));

        // A freed large block is gone at once (large frees are drained immediately).
        let what = lookup(&src, l);
        // SAFETY: `l` is a live large block of `a`, given up here.
        unsafe { a.free(&src, l, what, MARK, true) };
        invalid(&src, l);
        // Freed small blocks keep their runs while others are live.
        for (i, &(p, _)) in small.iter().enumerate() {
            let what = lookup(&src, p);
            // SAFETY: a live small block of `a`, given up here.
            unsafe { a.free(&src, p, what, MARK, i % 2 == 0) };
        }
        assert_eq!(a.check(&src), Ok(()));
        let s = a.stats(&src);
        assert_eq!(s.large.in_use, 3 * PAGE);
        assert_eq!(s.index, 3);
    }

    #[test]
    fn large_resize_in_place() {
        let src = TestSource::new(8);
        let a = TestArena::new(3);
        let (p, _) = a.alloc(&src, 3 * PAGE, 8);
        let run = large_run(&src, p);
        // SAFETY: (for the calls below) `run` heads the live large block `p`, which we own.
        unsafe {
            assert!(a.resize_large(&src, run, 10 * PAGE - 5));
            assert_eq!((*run).npages, 10);
            assert!(a.resize_large(&src, run, PAGE + 1));
            assert_eq!((*run).npages, 2);
            assert_eq!(a.stats(&src).large.in_use, 2 * PAGE);
            assert_eq!(a.check(&src), Ok(()));
            // A request for zero bytes must leave a live block (of one page) behind.
            assert!(a.resize_large(&src, run, 0));
            assert_eq!((*run).kind(), Kind::Large);
            assert!((*run).npages >= 1, "the run was freed under a live block");
            assert_eq!(a.check(&src), Ok(()));
            large_run(&src, p);
        }
    }

    /// Chunks in the shared test file: chunk 0 holds the bookkeeping and the arena, the
    /// others are handed out as arena chunks.
    const FILE_CHUNKS: usize = 16;
    /// Where the arena lies in the file.
    const ARENA_OFF: usize = PAGE;
    const _: () = assert!(ARENA_OFF + core::mem::size_of::<Arena>() <= CHUNK);

    /// The start of the shared file, seen by every view: which chunks are handed out.
    #[repr(C)]
    struct FileMeta {
        used: [core::sync::atomic::AtomicBool; FILE_CHUNKS],
    }

    /// A memfd of `FILE_CHUNKS` chunks (sparse: it reads zero until written).
    struct MemFile(i32);

    impl MemFile {
        fn new() -> Self {
            // SAFETY: plain system calls on a descriptor of our own.
            unsafe {
                let fd = libc::memfd_create(c"coreheap-shared-test".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0, "memfd_create failed");
                assert_eq!(libc::ftruncate(fd, (FILE_CHUNKS * CHUNK) as libc::off_t), 0);
                Self(fd)
            }
        }
    }

    impl Drop for MemFile {
        fn drop(&mut self) {
            // SAFETY: the descriptor is ours; the views that map it are gone by now.
            unsafe { libc::close(self.0) };
        }
    }

    /// One process's view of the shared file, at an address of its own (`CHUNK`-aligned), and
    /// the page source for that view: its base is where the view starts.
    struct View<'f> {
        file: &'f MemFile,
        base: usize,
    }

    impl<'f> View<'f> {
        fn map(file: &'f MemFile) -> Self {
            let len = FILE_CHUNKS * CHUNK;
            let r = crate::os::reserve_aligned(len, CHUNK);
            assert!(!r.is_null());
            // SAFETY: MAP_FIXED replaces only our own reservation, `len` bytes at `r`.
            let p = unsafe {
                libc::mmap(
                    r.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.0,
                    0,
                )
            };
            assert_eq!(p, r.cast(), "mmap of the memfd failed");
            Self {
                file,
                base: r as usize,
            }
        }

        fn meta(&self) -> &FileMeta {
            // SAFETY: the file starts with a `FileMeta` (all-zero: no chunk handed out).
            unsafe { &*(self.base as *const FileMeta) }
        }

        fn arena(&self) -> &Arena {
            // SAFETY: the test initialises the arena at `ARENA_OFF` before it calls this.
            unsafe { &*((self.base + ARENA_OFF) as *const Arena) }
        }

        /// The index in the file of the chunk at `chunk` in this view, if it is an arena
        /// chunk's place.
        fn slot(&self, chunk: usize) -> Option<usize> {
            let off = chunk.wrapping_sub(self.base);
            let i = off / CHUNK;
            (off.is_multiple_of(CHUNK) && (1..FILE_CHUNKS).contains(&i)).then_some(i)
        }

        /// Makes the whole view inaccessible (or accessible again): a stored address of
        /// this view, followed through the other one, then faults.
        fn hide(&self, hidden: bool) {
            let prot = if hidden {
                libc::PROT_NONE
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            // SAFETY: the range is this view's own mapping.
            let r = unsafe { libc::mprotect(self.base as *mut _, FILE_CHUNKS * CHUNK, prot) };
            assert_eq!(r, 0);
        }

        /// Zeroes `len` bytes of the file at `off`, in every view.
        fn punch(&self, off: usize, len: usize) -> bool {
            // SAFETY: a hole punched in our own file; no live data lies there (the callers'
            // contracts).
            unsafe {
                libc::fallocate(
                    self.file.0,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                ) == 0
            }
        }
    }

    impl Drop for View<'_> {
        fn drop(&mut self) {
            crate::os::unmap(self.base as *mut u8, FILE_CHUNKS * CHUNK);
        }
    }

    // SAFETY: chunks are handed out once each (a compare-and-swap on the shared table) and
    // are zero when handed out (the file starts zero, a returned chunk is punched out);
    // they are `CHUNK`-aligned because the view is; the base is the view's start, below every
    // chunk (chunk 0 is never handed out); nothing allocates or panics.
    unsafe impl PageSource for View<'_> {
        type Lock = crate::lock::RawLock;

        fn base(&self) -> usize {
            self.base
        }

        fn map_chunk(&self) -> *mut u8 {
            for (i, used) in self.meta().used.iter().enumerate().skip(1) {
                if used
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return (self.base + i * CHUNK) as *mut u8;
                }
            }
            ptr::null_mut()
        }

        unsafe fn unmap_chunk(&self, chunk: *mut u8) {
            let Some(i) = self.slot(chunk as usize) else {
                crate::os::fatal(b"View: unmap of a chunk it does not own\n");
            };
            // Zero for the next user (in every view), then give the slot back.
            if !self.punch(i * CHUNK, CHUNK) {
                crate::os::fatal(b"View: fallocate failed\n");
            }
            self.meta().used[i].store(false, Ordering::Release);
        }

        unsafe fn purge(&self, p: *mut u8, len: usize) -> bool {
            self.punch(p as usize - self.base, len)
        }

        fn owns_chunk(&self, chunk: usize) -> bool {
            self.slot(chunk)
                .is_some_and(|i| self.meta().used[i].load(Ordering::Acquire))
        }
    }

    /// A live block of the shared heap: its offset in the file, its size, its fill byte.
    type Shared = (usize, usize, u8);

    /// Sizes and alignments of every kind: small classes, whole pages, aligned and
    /// multi-chunk large.
    const SIZES: [(usize, usize); 12] = [
        (16, 8),
        (40, 8),
        (100, 16),
        (256, 256),
        (700, 8),
        (3000, 8),
        (8192, 8),
        (3 * PAGE, 8),
        (20 * PAGE + 5, 8),
        (300 * 1024, 8),
        (5 * PAGE, LARGE_ALIGN_MAX),
        (1 << 20, 8),
    ];

    /// Allocates through view `v` and fills the block with the next fill byte (never 0).
    fn alloc_filled(v: &View, size: usize, align: usize, fill: &mut u8) -> Shared {
        *fill = fill.wrapping_add(1).max(1);
        let (p, _) = v.arena().alloc(v, size, align);
        assert!(!p.is_null(), "out of memory at {size} bytes");
        // SAFETY: `p` is a fresh block of at least `size` bytes.
        unsafe { ptr::write_bytes(p, *fill, size) };
        (p as usize - v.base, size, *fill)
    }

    /// One round through view `v`: frees every `nth` block of `blocks` (alternately
    /// straight to its run and through the pending stack), then allocates `more` blocks of
    /// every `stride`th size of [`SIZES`]. Returns the blocks live now.
    fn churn(
        v: &View,
        blocks: Vec<Shared>,
        nth: usize,
        more: usize,
        stride: usize,
        fill: &mut u8,
    ) -> Vec<Shared> {
        let mut live = Vec::new();
        for (i, blk) in blocks.into_iter().enumerate() {
            if i % nth == 0 {
                free_via(v, blk, (i / nth).is_multiple_of(2));
            } else {
                live.push(blk);
            }
        }
        for i in 0..more {
            let (size, align) = SIZES[(i * stride) % SIZES.len()];
            live.push(alloc_filled(v, size, align, fill));
        }
        live
    }

    /// Each block reads its fill through view `v`, and `lookup` there finds it.
    fn verify(v: &View, blocks: &[Shared]) {
        for &(off, size, fill) in blocks {
            let p = (v.base + off) as *mut u8;
            assert!(
                matches!(
                    lookup(v, p),
                    Lookup::Small { arena: 3, .. } | Lookup::Large { arena: 3, .. }
                ),
                "block at file offset {off:#x} not found through the view at {:#x}",
                v.base
            );
            // SAFETY: a live block of `size` bytes, reached through this view.
            let bytes = unsafe { core::slice::from_raw_parts(p, size) };
            assert!(
                bytes.iter().all(|&x| x == fill),
                "block at file offset {off:#x} ({size} B) lost its contents"
            );
        }
    }

    /// Frees the block through view `v`: from the "owner's CPU" (straight to its run) or
    /// not (through the pending stack).
    fn free_via(v: &View, block: Shared, local: bool) {
        let p = (v.base + block.0) as *mut u8;
        let what = lookup(v, p);
        // SAFETY: a live block of the arena, given up here.
        unsafe { v.arena().free(v, p, what, MARK, local) };
    }

    /// The arena engine keeps no address in memory: an arena built in a file that two
    /// views map at different addresses works through either view, one after the other.
    /// Each view is hidden (`PROT_NONE`) while the other is used, so a stored address of the
    /// hidden view would fault when followed; links that decode to the wrong view's
    /// addresses also make `check` report blocks outside their runs.
    #[test]
    fn arena_in_a_shared_file_works_through_views_at_different_addresses() {
        let file = MemFile::new();
        let a = View::map(&file);
        let b = View::map(&file);
        assert_ne!(a.base, b.base);
        assert_eq!(a.base % CHUNK, 0);
        assert_eq!(b.base % CHUNK, 0);
        // SAFETY: the file is fresh (zero) and chunk 0, which holds the arena, is never
        // handed out as an arena chunk.
        unsafe { Arena::init_in_place((a.base + ARENA_OFF) as *mut Arena, 3, false) };

        // Through A: a mix of blocks, several of each size.
        let mut fill = 0u8;
        let live = churn(&a, Vec::new(), 1, 96, 1, &mut fill);
        verify(&a, &live);
        assert_eq!(a.arena().check(&a), Ok(()));

        // Through B alone: the same blocks, frees to the runs and to the pending stack,
        // new blocks, a trim (purges), checks.
        a.hide(true);
        assert_eq!(b.arena().check(&b), Ok(()));
        verify(&b, &live);
        let mut live = churn(&b, live, 2, 64, 5, &mut fill);
        verify(&b, &live);
        assert_eq!(b.arena().check(&b), Ok(()));
        b.arena().trim(&b);
        assert_eq!(b.arena().check(&b), Ok(()));
        verify(&b, &live);
        // Small blocks left on the pending stack, for A to drain.
        for _ in 0..5 {
            let i = live.iter().position(|blk| blk.1 <= SMALL_MAX).unwrap();
            free_via(&b, live.swap_remove(i), false);
        }

        // Through A alone: what B left, some freed, more blocks; then everything freed.
        b.hide(true);
        a.hide(false);
        assert_eq!(a.arena().check(&a), Ok(()));
        verify(&a, &live);
        let live = churn(&a, live, 3, 48, 7, &mut fill);
        verify(&a, &live);
        assert_eq!(a.arena().check(&a), Ok(()));
        assert!(churn(&a, live, 1, 0, 1, &mut fill).is_empty());
        assert_eq!(a.arena().check(&a), Ok(()));
        assert_eq!(a.arena().stats(&a).in_use(), 0);

        // Both views agree at the end.
        b.hide(false);
        assert_eq!(b.arena().check(&b), Ok(()));
        assert_eq!(b.arena().stats(&b).in_use(), 0);
        let (p, _) = b.arena().alloc(&b, 64, 8);
        assert!(!p.is_null());
        assert!(matches!(
            lookup(&a, (p as usize - b.base + a.base) as *const u8),
            Lookup::Small { arena: 3, .. }
        ));
    }
}
