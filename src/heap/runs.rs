//! The process heap's run slots: large blocks (page runs of more than `SMALL_MAX` and at
//! most `LARGE_MAX` bytes) freed on a CPU of their arena wait in one of that CPU's
//! [`RUN_LISTS`] slots, lists of one block in the caches' own format, and the next large
//! allocation on that CPU that they fit takes one back without the arena's lock: a pair of
//! one size costs two rseq sections instead of two lock rounds, a best fit, a split and a
//! coalesce.
//!
//! A run in a slot stays allocated in its page heap (kind `Large`, counted in
//! `large.in_use`), marked free with the double-free mark like a small block in a cache, and
//! counted as cached by the statistics. A slot holds runs of its CPU's arena only (the push
//! section compares arenas). A run goes back to the arena when a large request on the CPU
//! passes it over, when a refill of the CPU's cache is about to take the arena's lock
//! (which may carve pages the run could give), or when `trim` runs on the CPU; a CPU holds
//! at most `RUN_LISTS * LARGE_MAX` bytes in them (`docs/design.md`, "Run slots").

use super::{Config, ProcessHeap, Ready, SRC};
use crate::arena::{lookup, Lookup};
use crate::chunk::{page_index, Block, ChunkHeader};
use crate::cpucache::{Push, PTR_MASK, RUNS, RUN_LISTS};
use crate::diag::block_error;
use crate::front::{self, report::DOUBLE_FREE};
use crate::os;
use crate::size_class::{pages_for, CHUNK, PAGE, SMALL_MAX};

use core::ptr;

/// Runs handed out from the slots between two decay ticks of the arena, per thread.
const TICK_EVERY: u32 = 64;

std::thread_local! {
    /// Runs handed out from the slots by this thread (const-initialised, no destructor:
    /// safe inside `malloc`).
    static HITS: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

/// Whether a cached run of `have` pages serves a request of `want` pages: it holds them and
/// wastes at most a quarter of them (the large classes' bound), so that a slot does not hand
/// a 2 MiB run to a 260 KiB request.
#[inline]
const fn fits(want: usize, have: usize) -> bool {
    have >= want && have - want <= want / 4
}

/// The length in pages of the large run that `p` heads.
///
/// # Safety
/// `p` heads a large run of one of our chunks that the caller owns (so its length does not
/// change under the read).
#[inline]
unsafe fn run_pages(p: *mut Block) -> usize {
    // A large run starts after its chunk's header pages, never at the chunk's base.
    let h = (p as usize & !(CHUNK - 1)) as *const ChunkHeader;
    // SAFETY: by the contract the chunk is mapped and the descriptor is the run's head.
    unsafe { (*h).pages[page_index(p.cast())].npages as usize }
}

impl ProcessHeap {
    /// A large request (`SMALL_MAX < size <= LARGE_MAX`, `align <= PAGE`) with the caches
    /// on: a run from the current CPU's slots that fits, or the locked path. Popped runs
    /// that do not fit go back to their slots when another one fits, else to the arena in
    /// the lock round that serves the request ([`ProcessHeap::alloc_replacing`]).
    #[inline(never)]
    pub(super) fn alloc_run_cached(r: &Ready, size: usize, align: usize) -> (*mut u8, bool) {
        let cfg = r.cfg;
        let want = pages_for(size);
        // Popped runs that do not fit, with their slots.
        let mut misfits = [(0, ptr::null_mut::<Block>()); RUN_LISTS];
        let mut n = 0;
        for list in RUNS..RUNS + RUN_LISTS {
            let Ok(b) = cfg.caches.pop(list) else {
                continue;
            };
            // SAFETY: a block popped off a run slot is ours: a large run of the CPU's arena.
            if fits(want, unsafe { run_pages(b) }) {
                for &(l, m) in &misfits[..n] {
                    // SAFETY: a free, marked large run popped above, still ours.
                    unsafe { Self::put_back(cfg, l, m) };
                }
                // SAFETY: as above; neither its link nor the free mark may survive into a
                // live block.
                unsafe {
                    (*b).link = 0;
                    (*b).mark = 0;
                }
                Self::count_hit(cfg);
                return (b.cast(), false);
            }
            misfits[n] = (list, b);
            n += 1;
        }
        if n == 0 {
            return front::alloc_locked(r, size, align);
        }
        // SAFETY: the misfits are free, marked large runs popped above, ours.
        unsafe { Self::alloc_replacing(r, size, align, &misfits[..n]) }
    }

    /// No run in the slots fits the request: the ones popped (`old`) go back to their arena
    /// in the lock round that serves the request, which their pages may serve. So a slot
    /// does not keep a run that the CPU's requests keep passing over (a program of random
    /// sizes would otherwise hold up to 4 MiB per CPU there, out of the page heap's reach),
    /// and the miss costs one lock round, as before the slots.
    ///
    /// # Safety
    /// Every block of `old` is a free, marked large run that the caller popped off a run
    /// slot and gives up.
    #[cold]
    #[inline(never)]
    unsafe fn alloc_replacing(
        r: &Ready,
        size: usize,
        align: usize,
        old: &[(usize, *mut Block)],
    ) -> (*mut u8, bool) {
        let cfg = r.cfg;
        let arena_of = |b: *mut Block| {
            let h = (b as usize & !(CHUNK - 1)) as *const ChunkHeader;
            // SAFETY: `b` is a run of one of our chunks, which stays mapped while it lives.
            unsafe { (*h).arena_index() }
        };
        let ai = arena_of(old[0].1);
        let a = cfg.arena(ai as usize);
        if a.held_by_caller() || old.iter().any(|&(_, b)| arena_of(b) != ai) {
            // A signal handler inside the arena, or a migration between two pops: each run
            // back its own way.
            for &(_, b) in old {
                // SAFETY: by the contract.
                unsafe { Self::free_run_locked(cfg, b.cast()) };
            }
            return front::alloc_locked(r, size, align);
        }
        let mut blocks = [ptr::null_mut::<u8>(); RUN_LISTS];
        for (d, &(_, b)) in blocks.iter_mut().zip(old) {
            *d = b.cast();
        }
        // SAFETY: by the contract, large runs of arena `ai` with the mark written.
        let got = unsafe { a.alloc_large_freeing(&SRC, size, align, &blocks[..old.len()]) };
        if got.0.is_null() {
            // Out of memory in this arena: the others, as the locked path tries them.
            return front::alloc_locked(r, size, align);
        }
        got
    }

    /// Counts a run handed out from a slot; every [`TICK_EVERY`]th lets the CPU's arena
    /// decay (`Arena::tick`), which its locked path would otherwise do: a program whose
    /// large allocations all hit the slots still sees its dirty pages and the huge spans
    /// cached for reuse go back after their delay.
    #[inline]
    fn count_hit(cfg: &Config) {
        HITS.with(|n| {
            let k = n.get().wrapping_add(1);
            n.set(k);
            if k % TICK_EVERY == 0 {
                cfg.arena(cfg.arena_index(os::current_cpu())).tick(&SRC);
            }
        });
    }

    /// Returns `b`, popped off run slot `list` and not used, to that slot, or (another
    /// thread filled it meanwhile, or the thread migrated) to its arena.
    ///
    /// # Safety
    /// `b` is a free, marked large run of our chunks that the caller owns.
    #[cold]
    unsafe fn put_back(cfg: &Config, list: usize, b: *mut Block) {
        let h = (b as usize & !(CHUNK - 1)) as *const ChunkHeader;
        // SAFETY: by the contract `b`'s chunk is ours and mapped.
        let arena = unsafe { (*h).arena_index() };
        // SAFETY: by the contract.
        if unsafe { cfg.caches.push(list, b, arena) } != Push::Done {
            // SAFETY: by the contract.
            unsafe { Self::free_run_locked(cfg, b.cast()) };
        }
    }

    /// Frees the large block `p` (a run of `run`'s length, more than `SMALL_MAX`) of
    /// `arena` through the current CPU's run slots (C's `free` keeps errno around this path,
    /// which may make system calls under the lock): the first slot with room takes it; when
    /// both are taken, one of them (chosen by an address bit of `p`, so neither keeps an
    /// unwanted run for good) gives its run back to the arena and takes `p`. A block of
    /// another arena, or a thread without a CPU id, takes the locked path.
    ///
    /// # Safety
    /// `cfg.caches.enabled`; `p` is a live large block of `arena` whose run is longer than
    /// `SMALL_MAX`, which the caller gives up.
    pub(super) unsafe fn free_run_fast(cfg: &Config, p: *mut u8, arena: u32) {
        let b = p.cast::<Block>();
        // SAFETY: the block is ours (contract) and at least a page long.
        unsafe {
            if (*b).mark == cfg.mark {
                Self::confirm_run_double_free(cfg, p, arena, DOUBLE_FREE);
            }
            (*b).mark = cfg.mark;
        }
        for list in RUNS..RUNS + RUN_LISTS {
            // SAFETY: `b` is a free, marked large block of `arena`, ours until pushed.
            match unsafe { cfg.caches.push(list, b, arena) } {
                Push::Done => return,
                Push::Full => {}
                // Another arena's block, or no CPU id: the owner's lock.
                // SAFETY: by the contract, with the mark written.
                _ => return unsafe { Self::free_run_locked(cfg, p) },
            }
        }
        // SAFETY: by the contract, with the mark written.
        unsafe { Self::free_run_evicting(cfg, b, arena) };
    }

    /// Both run slots are taken: one gives its run back to the arena under its lock and
    /// takes `b` instead.
    ///
    /// # Safety
    /// As for `free_run_fast`, with the mark written.
    #[cold]
    #[inline(never)]
    unsafe fn free_run_evicting(cfg: &Config, b: *mut Block, arena: u32) {
        let list = RUNS + ((b as usize / PAGE) & 1) % RUN_LISTS;
        let old = cfg.caches.take_all(list).map(|(_, h)| h & PTR_MASK);
        // SAFETY: `b` is ours (contract).
        if unsafe { cfg.caches.push(list, b, arena) } != Push::Done {
            // SAFETY: by the contract.
            unsafe { Self::free_run_locked(cfg, b.cast()) };
        }
        if let Some(old) = old {
            // SAFETY: a run taken off a slot is ours: a free, marked large run.
            unsafe { Self::free_run_locked(cfg, old as *mut u8) };
        }
    }

    /// Returns the free, marked large block `p` to its arena under the lock.
    ///
    /// # Safety
    /// `p` is a live large block of ours with the mark written, which the caller gives up.
    unsafe fn free_run_locked(cfg: &Config, p: *mut u8) {
        let what = lookup(&SRC, p);
        let Lookup::Large { arena, .. } = what else {
            crate::diag::invalid_pointer(b"coreheap: corrupted run slot", p);
        };
        let local = cfg.arena_index(os::current_cpu()) == arena as usize;
        // SAFETY: by the contract; `what` is `lookup(p)`.
        unsafe { cfg.arena(arena as usize).free_marked(&SRC, p, what, local) };
    }

    /// Returns the calling CPU's run slots to their arena (for `trim`).
    pub(super) fn flush_runs(cfg: &Config) {
        for list in RUNS..RUNS + RUN_LISTS {
            if let Some((_, h)) = cfg.caches.take_all(list) {
                // SAFETY: a run taken off a slot is ours: a free, marked large run.
                unsafe { Self::free_run_locked(cfg, (h & PTR_MASK) as *mut u8) };
            }
        }
    }

    /// Whether `p` is in some CPU's run slot, looked for as [`Caches::walk`] walks.
    ///
    /// [`Caches::walk`]: crate::cpucache::Caches::walk
    pub(super) fn in_run_slot(cfg: &Config, p: *mut u8) -> bool {
        let is_run = |q: usize, _: usize| {
            matches!(lookup(&SRC, q as *const u8), Lookup::Large { run, .. }
                // SAFETY: `lookup` returns live run heads.
                if unsafe { (*run).npages } as usize * PAGE > SMALL_MAX)
        };
        let mut seen = false;
        for list in RUNS..RUNS + RUN_LISTS {
            seen |= cfg.caches.contains(list, p.cast());
            for cpu in 0..cfg.caches.len() {
                cfg.caches.walk(
                    cpu,
                    list,
                    |q| {
                        seen |= q == p as usize;
                        !seen
                    },
                    &is_run,
                );
            }
        }
        seen
    }

    /// The large block `p` of `arena` carries the double-free mark: abort with `msg` if it
    /// waits in a run slot or is no longer an allocated run; otherwise it is live data that
    /// happens to match.
    #[cold]
    #[inline(never)]
    pub(super) fn confirm_run_double_free(cfg: &Config, p: *mut u8, arena: u32, msg: &[u8]) {
        let what = lookup(&SRC, p);
        let Lookup::Large { run, .. } = what else {
            crate::front::report::invalid(&SRC, p, msg);
        };
        if Self::in_run_slot(cfg, p) {
            // SAFETY: `lookup` returns live run heads.
            block_error(
                msg,
                p,
                Some(arena),
                unsafe { (*run).npages } as usize * PAGE,
            );
        }
        // SAFETY: `what` is `lookup(p)`, a large block of `arena`.
        unsafe {
            cfg.arena(arena as usize)
                .confirm_double_free(&SRC, p, what, msg)
        };
    }

    /// Bytes of arena `i`'s runs waiting in its CPUs' run slots (a snapshot).
    pub(super) fn cached_run_bytes(cfg: &Config, i: usize) -> usize {
        let is_run =
            |q: usize, _: usize| matches!(lookup(&SRC, q as *const u8), Lookup::Large { .. });
        let mut bytes = 0;
        for cpu in (0..cfg.caches.len()).filter(|&c| cfg.caches.arena_of(c) == i) {
            for list in RUNS..RUNS + RUN_LISTS {
                let count = |q: usize| {
                    if let Lookup::Large { run, .. } = lookup(&SRC, q as *const u8) {
                        // SAFETY: `lookup` returns live run heads.
                        bytes += unsafe { (*run).npages } as usize * PAGE;
                    }
                    true
                };
                cfg.caches.walk(cpu, list, count, &is_run);
            }
        }
        bytes
    }
}
