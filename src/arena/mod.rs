//! The per-CPU arena: small bins and a page heap behind one lock, and a lock-free stack of
//! frees on their way back.
//!
//! Lock order: an arena lock is never taken while another arena lock is held, except by the
//! fork handlers, which take all of them in index order. Nothing under an arena lock
//! allocates; the page source is called under it (mmap, munmap, madvise).
//!
//! An arena is generic over its page source, which chooses its lock ([`ArenaLock`]): the
//! process heap's arenas hold a private futex lock, a shared heap's a process-shared robust
//! lock, whose taker after a holder's death recovers the arena (`recover.rs`).
//!
//! An all-zero `Arena` is a valid empty arena (null lists, zero counts) except for its
//! index, its key and, for some locks, its lock, which [`Arena::init_in_place`] writes;
//! arenas live in memory mapped fresh from the OS and are never built on a stack.
//!
//! Files: `lookup.rs` (pointer -> what it is, without a lock), `lock.rs` (the lock trait),
//! `check.rs` (the invariants verified), `recover.rs` (shared heaps: a dead lock holder's arena), `stats.rs` (counters).
//! The engine imports nothing of the CPU caches, the front end or shared heaps: batches
//! for the caches go in and out through [`Arena::alloc_batch`] and [`Arena::free_blocks`],
//! whose callers keep their own list formats.

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ptr;

use crossbeam_utils::CachePadded;

use crate::chunk::{Block, Kind, PageDesc};
use crate::large::PageHeap;
use crate::lock::Taken;
use crate::remote::{Batch, Pending};
use crate::size_class::{
    class_for, class_size, pages_for, PAGE, PAGE_SHIFT, SMALL_MAX, TABLE_CLASSES,
};
use crate::small::{RunGroup, SmallBins};
use crate::source::{Meter, PageSource, GRAIN};

mod check;
mod lock;
mod lookup;
mod recover;
mod stats;
#[cfg(feature = "test-hooks")]
mod test_hooks;
#[cfg(test)]
mod tests;

pub use lock::{ArenaLock, ArenaSet};
pub use lookup::{describe, lookup, lookup_small, small_block_start, Lookup};
pub use recover::ORPHAN;
pub use stats::{ArenaStats, LargeCounters};

/// Largest alignment served from an arena's page heap; larger ones are mapped directly.
pub const LARGE_ALIGN_MAX: usize = 64 * 1024;

/// Everything guarded by the arena lock.
struct State {
    bins: SmallBins,
    pages: PageHeap,
    large: LargeCounters,
    /// Blocks that came back through the pending stack (counted at the drain, so the
    /// remote free itself pays no second atomic on the stack's line).
    pending_drained: u64,
    /// Shared heaps: times the lock was taken over from a dead holder, of those the ones
    /// repaired in place, and chunks given up because the dead holder left the arena damaged
    /// (see `recover.rs`). Zero in the process heap.
    recoveries: u64,
    repairs: u64,
    orphaned: u64,
    /// Slow-path operations (bin refills, large allocations) since the arena was made,
    /// wrapping: the decay clock is read every [`CLOCK_EVERY`] of them.
    clock_ops: u32,
    /// The bytes in use this arena counts in its source's meter (`PageSource::meter`):
    /// `bins.bytes + large.in_use` rounded up to `source::GRAIN` when last published, kept
    /// within `[in use, in use + 2 * GRAIN)` by [`Arena::release`]. Zero without a meter.
    published: usize,
}

/// Slow-path operations between two reads of the decay clock. The clock read had been a
/// visible part of every large allocation; stamps of runs freed between two reads carry the
/// earlier reading, so a busy arena sees its delay to within a few operations and an idle one
/// (whose reading is older) purges sooner, never later.
const CLOCK_EVERY: u32 = 16;

/// One arena on page source `S`. Lives in a [`CachePadded`] slot of the arena table; the
/// pending stack has a cache line of its own because other CPUs write it.
///
/// Invariant: `state` is reached only with `lock` held; `index` and `key` are fixed after
/// [`Arena::init_in_place`].
pub struct Arena<S: PageSource> {
    lock: S::Lock,
    index: u32,
    /// The secret that encodes this arena's free-list links; written once at initialisation,
    /// on a line that only the lock and bins share (never the pending stack's).
    key: usize,
    state: UnsafeCell<State>,
    pending: CachePadded<Pending>,
    _source: PhantomData<fn() -> S>,
}

// SAFETY: `state` is only reached with the arena's lock held (an `ArenaLock`, which
// excludes other threads and processes); `pending` is a lock-free structure; the other
// fields are fixed after initialisation.
unsafe impl<S: PageSource<Lock: ArenaLock>> Sync for Arena<S> {}

impl<S: PageSource> Arena<S> {
    /// Sizes and field offsets of an arena and of the state behind its lock (the types are
    /// not `repr(C)`, so two builds may order fields differently): part of the fingerprint
    /// of a shared heap's file (`shm::layout::LAYOUT_HASH`).
    pub const LAYOUT: [usize; 17] = {
        use core::mem::{offset_of, size_of};
        [
            size_of::<Self>(),
            offset_of!(Self, lock),
            offset_of!(Self, index),
            offset_of!(Self, key),
            offset_of!(Self, state),
            offset_of!(Self, pending),
            size_of::<State>(),
            offset_of!(State, bins),
            offset_of!(State, pages),
            offset_of!(State, large),
            offset_of!(State, pending_drained),
            offset_of!(State, recoveries),
            offset_of!(State, repairs),
            offset_of!(State, orphaned),
            offset_of!(State, clock_ops),
            size_of::<SmallBins>(),
            size_of::<PageHeap>(),
        ]
    };
}

impl<S: PageSource<Lock: ArenaLock>> Arena<S> {
    /// The source's lock and its `SHARED` flag agree: a source whose memory other processes
    /// share marks its page-heap updates exactly when its lock can report a dead holder.
    const LOCK_FITS: () = assert!(S::SHARED == <S::Lock as ArenaLock>::ROBUST);

    /// Makes the zeroed memory at `slot` arena number `index`, its lock included. Returns
    /// false if the lock could not be made.
    ///
    /// # Safety
    /// `slot` points to zeroed, writable memory for an `Arena` that nothing else uses.
    /// `debug`: debug mode's run scrubbing (see [`SmallBins::set_scrub`]).
    pub unsafe fn init_in_place(slot: *mut Self, index: u32, debug: bool) -> bool {
        #[allow(clippy::let_unit_value)]
        let () = Self::LOCK_FITS;
        let key = crate::os::secret_key(index as usize);
        // SAFETY: by the contract; all-zero is a valid arena but for the fields written here
        // (see the module documentation).
        unsafe {
            ptr::addr_of_mut!((*slot).index).write(index);
            ptr::addr_of_mut!((*slot).key).write(key);
            let st = &mut *(*slot).state.get();
            st.pages = PageHeap::new(index);
            st.bins.set_key(key);
            st.bins.set_scrub(debug);
            S::Lock::init_in_place(ptr::addr_of_mut!((*slot).lock))
        }
    }

    /// The secret that encodes this arena's free-list links. Fixed after initialisation.
    pub fn key(&self) -> usize {
        self.key
    }

    /// Takes the arena's lock, recovering the arena if its last holder died holding it
    /// (only a robust lock reports that).
    #[inline(always)]
    fn acquire(&self, src: &S) {
        if self.lock.acquire() == Taken::OwnerDied {
            self.recover(src);
        }
    }

    /// Takes the lock if it is free now (see [`Arena::acquire`]).
    #[inline(always)]
    fn try_acquire(&self, src: &S) -> bool {
        match self.lock.try_acquire() {
            None => false,
            Some(t) => {
                if t == Taken::OwnerDied {
                    self.recover(src);
                }
                true
            }
        }
    }

    /// Releases the lock, first publishing the arena's bytes in use to the source's meter
    /// if they left the band around what it published (see `State::published`): a compare
    /// per lock round, an atomic update only when the bytes moved by about `GRAIN`.
    #[inline(always)]
    fn release(&self, src: &S) {
        // SAFETY: the caller holds the lock (every `release` follows an `acquire` or a
        // successful `try_acquire`).
        Self::keep_published(src, unsafe { &mut *self.state.get() });
        self.lock.release()
    }

    /// Publishes the arena's bytes in use if they left the band around what it published.
    #[inline(always)]
    fn keep_published(src: &S, st: &mut State) {
        if let Some(m) = src.meter() {
            let now = st.bins.bytes + st.large.in_use;
            // One compare for the band `now <= published < now + 2 * GRAIN`: below it the
            // difference wraps around to a huge value.
            if st.published.wrapping_sub(now) >= 2 * GRAIN {
                Self::publish(m, st, now);
            }
        }
    }

    /// Publishes `now`, the arena's bytes in use, rounded up to `GRAIN`.
    #[cold]
    #[inline(never)]
    fn publish(m: &Meter, st: &mut State, now: usize) {
        let target = now.next_multiple_of(GRAIN);
        if target > st.published {
            m.add(target - st.published);
        } else {
            m.sub(st.published - target);
        }
        st.published = target;
    }

    /// Allocates `size` bytes aligned to `align` (`size <= LARGE_MAX`,
    /// `align <= LARGE_ALIGN_MAX`). Returns the block, or null, and whether it reads zero.
    #[inline]
    pub fn alloc(&self, src: &S, size: usize, align: usize) -> (*mut u8, bool) {
        if size <= SMALL_MAX && align <= PAGE {
            let class = class_for(size.max(1), align);
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
    unsafe fn alloc_small_slow(&self, src: &S, st: &mut State, class: usize) -> (*mut u8, bool) {
        // SAFETY: the caller holds the lock.
        unsafe {
            self.drain_locked(src, st);
            Self::clock(src, st);
            st.bins
                .alloc_refill(&mut st.pages, src, class)
                .unwrap_or((ptr::null_mut(), false))
        }
    }

    /// Allocates a run of whole pages for `size` bytes (at most `LARGE_MAX`) aligned to
    /// `align`, whatever class `size` has: C `realloc` moves a block that grows past the
    /// class table into one, so that it can grow again in place (`resize_large`) instead of
    /// moving from class to class. Returns the block (null when out of memory) and whether
    /// it reads zero.
    pub fn alloc_run(&self, src: &S, size: usize, align: usize) -> (*mut u8, bool) {
        self.alloc_large(src, size, align)
    }

    #[cold]
    #[inline(never)]
    fn alloc_large(&self, src: &S, size: usize, align: usize) -> (*mut u8, bool) {
        // SAFETY: no block to free.
        unsafe { self.alloc_large_freeing(src, size, align, &[]) }
    }

    /// Allocates a large block as [`Arena::alloc_run`] does, after returning the large
    /// blocks `old` to the page heap in the same lock round (so their pages can serve it):
    /// the CPU caches' run slots give back the runs that did not fit a request this way.
    ///
    /// # Safety
    /// Every block of `old` is a live large block of this arena (`lookup` says
    /// `Lookup::Large` of it) that the caller gives up, its double-free mark written.
    pub unsafe fn alloc_large_freeing(
        &self,
        src: &S,
        size: usize,
        align: usize,
        old: &[*mut u8],
    ) -> (*mut u8, bool) {
        let n = pages_for(size);
        let align_pages = if align > PAGE { align >> PAGE_SHIFT } else { 1 };
        self.acquire(src);
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        for &p in old {
            match lookup(src, p) {
                Lookup::Large { arena, run } if arena == self.index && self.owns_run(run) => {
                    // SAFETY: the lock is held; `run` heads a large run of this arena whose
                    // block the caller gave up (contract).
                    unsafe { Self::free_large_locked(src, st, run) }
                }
                _ => crate::diag::invalid_pointer(b"coreheap: free of a foreign block", p),
            }
        }
        // Pending frees may hold the pages we need: return them before the page heap maps
        // more. The lock is held; n and align_pages are within the page heap's bounds
        // because size <= LARGE_MAX and align <= LARGE_ALIGN_MAX.
        // SAFETY: as just said.
        let (d, dirty) = unsafe {
            self.drain_locked(src, st);
            Self::clock(src, st);
            // Taking the run and marking it Large is one page-run update (see `recover`).
            st.pages.enter::<S>();
            st.pages.alloc_run(src, n, align_pages)
        };
        let p = if d.is_null() {
            st.pages.leave::<S>();
            ptr::null_mut()
        } else {
            // SAFETY: `d` heads the run we just took.
            unsafe {
                (*d).set_kind(Kind::Large);
                st.pages.leave::<S>();
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
    /// by the next allocation that needs memory. A large block, or a block of a class above
    /// 8 KiB, always takes the lock and goes straight back: held on the pending stack of an
    /// owner that no longer allocates, it would keep its pages (and often its whole chunk)
    /// resident indefinitely.
    ///
    /// # Safety
    /// `p` is a live block of this arena as `what` (from [`lookup`]) says, and the caller
    /// gives up all use of it. `local` says whether the calling thread runs on this arena's
    /// CPU.
    #[inline]
    pub unsafe fn free(&self, src: &S, p: *mut u8, what: Lookup, mark: usize, local: bool) {
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
    pub unsafe fn free_marked(&self, src: &S, p: *mut u8, what: Lookup, local: bool) {
        let b = p.cast::<Block>();
        // SAFETY: as the contract says.
        unsafe {
            match what {
                // A block of a class above 8 KiB: as a large block, below (up to 63 of them
                // on the pending stack of an idle owner would keep up to 16 MiB).
                Lookup::Small { run, .. }
                    if (*run).class() >= TABLE_CLASSES && !self.lock.held_by_caller() =>
                {
                    self.acquire(src);
                    let st = &mut *self.state.get();
                    if self.owns_run(run) {
                        st.bins.free(&mut st.pages, src, run, b);
                    }
                    self.drain_locked(src, st);
                    self.release(src);
                }
                Lookup::Small { run, .. } => {
                    if local && self.try_acquire(src) {
                        let st = &mut *self.state.get();
                        if self.owns_run(run) {
                            st.bins.free(&mut st.pages, src, run, b);
                        }
                        self.release(src);
                    } else if self.pending.push(b, self.key, src.base()) >= Pending::FLUSH {
                        self.flush_pending(src);
                    }
                }
                // A handler that interrupted this thread inside the arena: the interrupted
                // code drains the stack later.
                Lookup::Large { .. } if self.lock.held_by_caller() => {
                    self.pending.push(b, self.key, src.base());
                }
                Lookup::Large { run, .. } => {
                    self.acquire(src);
                    let st = &mut *self.state.get();
                    if self.owns_run(run) {
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
    /// whether it reads zero), and hands each of the others, marked with `mark` as freed
    /// blocks are, to `sink`, at most `n - 1` calls, in the order the bins hand them out
    /// (ascending addresses within a run). Null, with no call to `sink`, when memory is
    /// exhausted. The blocks handed to `sink` are the caller's, counted in use by their runs.
    ///
    /// Only for a source with base 0 in debug builds: the caller (the CPU caches) keeps plain
    /// addresses.
    #[inline]
    pub fn alloc_batch(
        &self,
        src: &S,
        class: usize,
        n: usize,
        mark: usize,
        mut sink: impl FnMut(*mut u8),
    ) -> (*mut u8, bool) {
        debug_assert_eq!(src.base(), 0, "batches hand out plain addresses");
        self.acquire(src);
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        // SAFETY: the lock is held.
        let first = match unsafe { st.bins.alloc_fast(src, class) } {
            Some(r) => r,
            // SAFETY: the lock is held.
            None => unsafe { self.alloc_small_slow(src, st, class) },
        };
        if !first.0.is_null() && n > 1 {
            // The rest in bulk: each run's counts updated once (the runs already on the bin;
            // no new run is carved for them).
            // SAFETY: the lock is held.
            unsafe { st.bins.alloc_bulk(src, class, n - 1, mark, &mut sink) };
        }
        self.release(src);
        first
    }

    /// Returns blocks of this arena to their runs under one lock round: `walk` is called
    /// once with the arena's bins, locked, and passes each block to
    /// [`LockedBins::free_small`].
    ///
    /// Only for a source with base 0 in debug builds (see [`Arena::alloc_batch`]).
    ///
    /// # Safety
    /// Every block `walk` passes on is the caller's, a free small block counted in use by
    /// its run, given up by the call.
    #[inline]
    pub unsafe fn free_blocks(&self, src: &S, walk: impl FnOnce(&mut LockedBins<'_, S>)) {
        debug_assert_eq!(src.base(), 0, "batches hold plain addresses");
        self.acquire(src);
        // SAFETY: the lock is held until `release` below, after the last use of `bins`.
        let st = unsafe { &mut *self.state.get() };
        let mut bins = LockedBins {
            st,
            src,
            index: self.index,
            group: RunGroup::new(),
        };
        walk(&mut bins);
        // SAFETY: the lock is held; the group was started by these bins.
        unsafe {
            bins.st
                .bins
                .group_end(&mut bins.st.pages, src, &mut bins.group)
        };
        self.release(src);
    }

    /// Pushes `batch` (blocks of this arena freed on another CPU) onto the pending stack with
    /// one compare-and-swap, and drains the stack if it overflows and the lock is free.
    ///
    /// # Safety
    /// As for [`Pending::push_batch`], with this arena's key (so `src` has base 0).
    pub unsafe fn push_remote_batch(&self, src: &S, batch: &Batch) {
        debug_assert_eq!(src.base(), 0, "outbox batches link plain addresses");
        // SAFETY: by the contract.
        if unsafe { self.pending.push_batch(batch) } >= Pending::FLUSH {
            self.flush_pending(src);
        }
    }

    #[cold]
    #[inline(never)]
    fn flush_pending(&self, src: &S) {
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
    pub unsafe fn confirm_double_free(&self, src: &S, p: *mut u8, what: Lookup, msg: &[u8]) {
        self.acquire(src);
        // SAFETY: the lock is held; a run found by `lookup` stays a run of ours while it has
        // a block in use or pending, and is re-examined here under the lock.
        let (dup, size) = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            match what {
                Lookup::Small { run, .. } | Lookup::Large { run, .. } if !self.owns_run(run) => {
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

    /// Counts a slow-path operation and, every [`CLOCK_EVERY`], reads the clock and lets the
    /// page heap decay.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state.
    #[inline(always)]
    unsafe fn clock(src: &S, st: &mut State) {
        st.clock_ops = st.clock_ops.wrapping_add(1);
        if st.clock_ops.is_multiple_of(CLOCK_EVERY) {
            // SAFETY: the caller holds the lock.
            unsafe { st.pages.decay(src, crate::os::now_ms()) };
        }
    }

    /// Returns every pending block to its run.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state.
    unsafe fn drain_locked(&self, src: &S, st: &mut State) {
        let base = src.base();
        let mut b = self.pending.take_all(base);
        let key = self.key;
        // The block whose link led to `b` (null for the head, which the stack itself holds).
        let mut from: *mut Block = ptr::null_mut();
        // Blocks of the run of the block before go back with it (one descriptor update per
        // run, see `RunGroup`).
        let mut group = RunGroup::new();
        let mut drained = 0;
        while !b.is_null() {
            drained += 1;
            if group.holds(b) {
                // A carved block of the group's run, known without a lookup.
                // SAFETY: `b` is a block of this arena's run (just checked) that was freed
                // onto the pending stack, ours now; its link is read before it is rewritten.
                unsafe {
                    let next = Pending::next_of(b, key, base);
                    st.bins.group_push(src, &mut group, b);
                    from = b;
                    b = next;
                }
                continue;
            }
            // SAFETY: the lock is held; the group was started by these bins.
            unsafe { st.bins.group_end(&mut st.pages, src, &mut group) };
            // Every block is looked up before anything is read through it: a link that does
            // not decode to a block of this arena was overwritten in `from`.
            let what = lookup(src, b as *const u8);
            let ok = matches!(what, Lookup::Small { arena, .. } | Lookup::Large { arena, .. }
                if arena == self.index);
            // A shared heap's block whose chunk a recovery orphaned: dropped.
            let orphan = Self::orphaned(what);
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
                let next = Pending::next_of(b, key, base);
                match what {
                    _ if orphan => {}
                    Lookup::Small { run, .. } => {
                        st.bins.group_start(&mut group, run, b);
                        st.bins.group_push(src, &mut group, b);
                    }
                    Lookup::Large { run, .. } => Self::free_large_locked(src, st, run),
                    _ => {}
                }
                from = b;
                b = next;
            }
        }
        // SAFETY: the lock is held; the group was started by these bins.
        unsafe { st.bins.group_end(&mut st.pages, src, &mut group) };
        st.pending_drained += drained;
    }

    /// Returns the large run `run` to the page heap.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state; `run` heads a large run of
    /// this arena whose block nobody uses any more.
    unsafe fn free_large_locked(src: &S, st: &mut State, run: *mut PageDesc) {
        // SAFETY: as the contract says.
        unsafe {
            st.large.frees += 1;
            st.large.in_use -= (*run).npages as usize * PAGE;
            st.pages.free_run(src, run);
        }
    }

    /// Resizes the large run `run` in place to hold `size` bytes. Returns whether it could.
    ///
    /// # Safety
    /// `run` heads a live large run of this arena whose block the caller owns.
    pub unsafe fn resize_large(&self, src: &S, run: *mut PageDesc, size: usize) -> bool {
        // At least one page: shrinking to zero pages would free the run under a live block.
        let n = pages_for(size).max(1);
        self.acquire(src);
        // SAFETY: the lock is held; `run` is ours.
        let ok = unsafe {
            let st = &mut *self.state.get();
            let have = (*run).npages as usize;
            if !self.owns_run(run) {
                false
            } else if n > have {
                let ok = st.pages.grow_run(src, run, n);
                if ok {
                    st.large.in_use += (n - have) * PAGE;
                }
                ok
            } else {
                if n < have {
                    st.pages.shrink_run(src, run, n);
                    st.large.in_use -= (have - n) * PAGE;
                }
                true
            }
        };
        self.release(src);
        ok
    }

    /// Lets the page heap decay now if the lock is free (never waits): for the CPU caches'
    /// run slots, whose allocations do not take the slow path where the decay clock ticks.
    pub fn tick(&self, src: &S) {
        if self.try_acquire(src) {
            // SAFETY: the lock is held.
            unsafe { (*self.state.get()).pages.decay(src, crate::os::now_ms()) };
            self.release(src);
        }
    }

    /// Drains pending frees and purges every dirty free page.
    pub fn trim(&self, src: &S) {
        self.acquire(src);
        // SAFETY: the lock is held.
        unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            st.pages.purge_all(src);
        }
        self.release(src);
    }

    /// A snapshot of the counters (drains pending frees first, so they are exact).
    pub fn stats(&self, src: &S) -> ArenaStats {
        self.acquire(src);
        // SAFETY: the lock is held.
        let s = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            ArenaStats {
                index: self.index as usize,
                classes: st.bins.counters,
                large: st.large,
                pages: st.pages.counters,
                dirty_bytes: st.pages.dirty_pages * PAGE,
                remote_frees: st.pending_drained,
                contentions: self.lock.contentions(),
                recoveries: st.recoveries,
                repairs: st.repairs,
                orphaned_chunks: st.orphaned,
                ..ArenaStats::default()
            }
        };
        self.release(src);
        s
    }

    /// Fork: takes the lock before `fork` (called for every arena in index order),
    /// recovering the arena as any taker does. Returns false, without taking it, if the
    /// calling thread holds it already: a `fork` from a signal handler that interrupted this
    /// thread inside the arena (the lock then stays with the interrupted code, in the
    /// parent and in the child).
    pub fn fork_lock(&self, src: &S) -> bool {
        if self.lock.held_by_caller() {
            return false;
        }
        self.acquire(src);
        true
    }

    /// Whether the calling thread holds this arena's lock: a signal handler that
    /// interrupted an allocation or free of this arena (see [`ArenaLock::held_by_caller`]).
    #[inline]
    pub fn held_by_caller(&self) -> bool {
        self.lock.held_by_caller()
    }

    /// Fork, parent side: releases the lock taken by [`Arena::fork_lock`].
    pub fn fork_unlock(&self, src: &S) {
        self.release(src);
    }

    /// Fork, child side: the lock's holder (the parent's forking thread) does not exist
    /// here; the lock is made anew, unlocked, rather than unlocked. Returns false if it could
    /// not be made.
    ///
    /// # Safety
    /// The child of `fork` before any other use of the arena: no thread of this process
    /// holds or waits for the lock, and it is on no thread's robust list.
    pub unsafe fn fork_reinit(&self) -> bool {
        // SAFETY: by the contract.
        unsafe { self.lock.reinit() }
    }

    /// Fork, child side, for an arena whose lock [`Arena::fork_lock`] did not take because
    /// the forking thread's interrupted code holds it: the lock stays held, now by this
    /// thread (the child's copy of the forking one), until that code resumes here and
    /// releases it ([`ArenaLock::adopt_after_fork`]).
    ///
    /// # Safety
    /// The child of `fork`, this thread the only one; the arena is in memory private to this
    /// process and its lock was held by the forking thread when it forked.
    pub unsafe fn fork_adopt(&self) {
        // SAFETY: by the contract.
        unsafe { self.lock.adopt_after_fork() }
    }
}

/// An arena's bins with its lock held, for [`Arena::free_blocks`].
///
/// Invariant: exists only inside `free_blocks`, while the lock is held; `st` is the arena's
/// state, `index` its number.
pub struct LockedBins<'a, S: PageSource> {
    st: &'a mut State,
    src: &'a S,
    index: u32,
    /// The blocks going back to the run of the last block (ended by `free_blocks`).
    group: RunGroup,
}

impl<S: PageSource> LockedBins<'_, S> {
    /// Returns `b` to its run if it is a small block of this arena; false, with nothing
    /// done, if it is not (a corrupted list: the caller reports it). A block of the same run
    /// as the one before it joins that run's group without a lookup; the run's descriptor is
    /// updated once per group, when `free_blocks` ends or a block of another run comes.
    ///
    /// # Safety
    /// As the contract of [`Arena::free_blocks`] says of `b`.
    #[inline(always)]
    pub unsafe fn free_small(&mut self, b: *mut u8) -> bool {
        let b = b.cast::<Block>();
        if !self.group.holds(b) {
            // SAFETY: as the contract says.
            return unsafe { self.free_small_new_run(b) };
        }
        // SAFETY: the lock is held (type invariant); `b` is a carved block of the group's
        // run, free and counted in use (contract).
        unsafe { self.st.bins.group_push(self.src, &mut self.group, b) };
        true
    }

    /// [`LockedBins::free_small`] for a block outside the current group's run: ends that
    /// group and starts one for `b`'s run, found by [`lookup`].
    ///
    /// # Safety
    /// As for [`LockedBins::free_small`].
    #[inline(never)]
    unsafe fn free_small_new_run(&mut self, b: *mut Block) -> bool {
        let st = &mut *self.st;
        // SAFETY: the lock is held (type invariant); the group was started by these bins.
        unsafe { st.bins.group_end(&mut st.pages, self.src, &mut self.group) };
        match lookup(self.src, b as *const u8) {
            Lookup::Small { run, arena } if arena == self.index => {
                // SAFETY: the lock is held; `run` is this arena's run holding `b` at a block
                // boundary, and `b` a free block of it counted in use (contract).
                unsafe {
                    st.bins.group_start(&mut self.group, run, b);
                    st.bins.group_push(self.src, &mut self.group, b);
                }
                true
            }
            _ => false,
        }
    }
}
