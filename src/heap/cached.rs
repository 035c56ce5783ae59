//! The process heap's per-CPU cache paths, beyond the one-section fast paths: refills and
//! flushes between a CPU cache and its arena, the outbox of blocks freed on a CPU that does
//! not own them, and the double-free confirmation that searches the caches.
//!
//! Every function here runs with the caches on (`cfg.caches.enabled`) and keeps `errno`
//! where the C `free` path reaches it (see `ProcessHeap::free_small`).

use super::init::rseq_cpu;
use super::{Config, ProcessHeap, SRC};
use crate::arena::{lookup, Lookup};
use crate::chunk::Block;
use crate::cpucache::{batch, return_chain, take_batch, Push, OUTBOX, OUTBOX_MAX_BLOCK};
use crate::diag::{block_error, invalid_pointer};
use crate::front::report::{self, DOUBLE_FREE};
use crate::os;
use crate::remote::Batch;
use crate::size_class::class_size;

impl ProcessHeap {
    /// The current CPU's cache has no block of `class`: takes a batch from the CPU's arena
    /// under its lock, returns one and puts the rest in the cache.
    #[cold]
    #[inline(never)]
    pub(super) fn refill(cfg: &Config, class: usize) -> (*mut u8, bool) {
        let Some(cpu) = rseq_cpu() else {
            // A thread without an rseq area (one not started by glibc, or before glibc
            // registered it): no cache can be filled for it.
            let a = cfg.arena(cfg.arena_index(os::current_cpu()));
            return a.alloc(&SRC, class_size(class), 1);
        };
        let a = cfg.arena(cfg.arena_index(cpu));
        if a.held_by_caller() {
            // A signal handler that interrupted this thread inside the arena.
            return match super::HEAP.ready() {
                Some(r) => crate::front::alloc_locked(&r, class_size(class), 1),
                None => (core::ptr::null_mut(), false),
            };
        }
        let (first, chain) = take_batch(a, &SRC, class, batch(class), cfg.mark);
        let installed = chain.len() > 0
            && cpu < cfg.caches.len()
            // SAFETY: the chain's blocks are free blocks of class `class` of the arena the
            // map gives `cpu`, which is cache `cpu`'s arena; at most `batch < limit` of them.
            && unsafe { cfg.caches.install(cpu, class, chain.head()) };
        if chain.len() > 0 && !installed {
            // Migrated meanwhile, or another thread on this CPU filled the list first.
            // SAFETY: the chain is ours and its blocks are of arena `a`, counted in use.
            unsafe { return_chain(a, &SRC, chain.head()) };
        }
        first
    }

    /// Returns the current CPU's cache of `class` to the arena it belongs to.
    #[cold]
    #[inline(never)]
    pub(super) fn flush(cfg: &Config, class: usize) {
        if let Some((cpu, chain)) = cfg.caches.take_all(class) {
            let a = cfg.arena(cfg.caches.arena_of(cpu));
            // SAFETY: a chain taken off cache `cpu` is ours, and its blocks belong to the
            // cache's arena and are counted in use by their runs (module invariants).
            unsafe { return_chain(a, &SRC, chain) };
        }
    }

    /// Frees small block `p` of arena `arena` through the current CPU's cache.
    ///
    /// # Safety
    /// `cfg.caches.enabled`; `p` is a live small block of `arena` of class `class`, which
    /// the caller gives up.
    #[inline(always)]
    pub(super) unsafe fn free_small_fast(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
        // SAFETY: the block is ours (contract) and at least 16 bytes long.
        if unsafe { (*p.cast::<Block>()).mark } == cfg.mark {
            // SAFETY: by the contract.
            return unsafe { Self::free_small_suspect(cfg, p, arena, class) };
        }
        // SAFETY: by the contract.
        unsafe { Self::free_small_push(cfg, p, arena, class) }
    }

    /// `p` carries the double-free mark: abort if it is free; otherwise (live data that
    /// happens to match) free it as usual. Keeps errno (see `free_small`).
    ///
    /// # Safety
    /// As for `free_small_fast`.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_suspect(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
        os::keeping_errno(|| {
            // SAFETY: by the contract.
            unsafe { Self::free_small_suspect_inner(cfg, p, arena, class) }
        })
    }

    /// # Safety
    /// As for `free_small_suspect`.
    unsafe fn free_small_suspect_inner(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
        let what = lookup(&SRC, p);
        // SAFETY: `lookup` returns live run heads.
        let same = matches!(what, Lookup::Small { arena: a, run } if a == arena && unsafe { (*run).class() } == class);
        if !same {
            // The callers validated the block; anything else now is not a block to free.
            report::invalid(&SRC, p, DOUBLE_FREE);
        }
        // SAFETY: by the contract.
        unsafe {
            Self::confirm_double_free(cfg, p, what, arena, class, DOUBLE_FREE);
            Self::free_small_push(cfg, p, arena, class);
        }
    }

    /// Marks `p` free and pushes it on the current CPU's list (or, when that cannot take
    /// it, the slower ways).
    ///
    /// # Safety
    /// As for `free_small_fast`, and the block is not free.
    #[inline(always)]
    unsafe fn free_small_push(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
        let b = p.cast::<Block>();
        // SAFETY: the block is ours and at least 16 bytes long (contract).
        unsafe {
            (*b).mark = cfg.mark;
            match cfg.caches.push(class, b, arena) {
                Push::Done => {}
                r => Self::free_small_slow(cfg, p, arena, class, r),
            }
        }
    }

    /// The current CPU's list could not take `p` (`r` says why): the outbox, a flush, or
    /// the locked path. Keeps errno (see `free_small`).
    ///
    /// # Safety
    /// As for `free_small_fast`, with the mark written.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_slow(cfg: &Config, p: *mut u8, arena: u32, class: usize, r: Push) {
        let what = lookup(&SRC, p);
        // SAFETY: by the contract.
        os::keeping_errno(|| unsafe {
            match r {
                Push::Done => {}
                Push::Full => Self::free_small_full(cfg, p, what, arena, class),
                Push::Remote if class_size(class) <= OUTBOX_MAX_BLOCK => {
                    match cfg.caches.push_outbox(p.cast()) {
                        Push::Done => {}
                        Push::Full => Self::free_outbox_full(cfg, p, what, arena),
                        _ => Self::free_small_remote(cfg, p, what, arena),
                    }
                }
                Push::Remote | Push::NoCache => Self::free_small_remote(cfg, p, what, arena),
            }
        })
    }

    /// The block carries the double-free mark: abort with `msg` if it is on a CPU cache or
    /// (under its arena's lock) on its run's free list; otherwise it is live data that
    /// happens to match.
    ///
    /// # Safety
    /// `what` is `lookup(p)`, a small block of `arena` of class `class`.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn confirm_double_free(
        cfg: &Config,
        p: *mut u8,
        what: Lookup,
        arena: u32,
        class: usize,
        msg: &[u8],
    ) {
        let in_cache = |q: usize, list: usize| match lookup(&SRC, q as *const u8) {
            // SAFETY: `lookup` returns live run heads.
            Lookup::Small { run, .. } => list == OUTBOX || (unsafe { (*run).class() }) == list,
            _ => false,
        };
        if cfg.caches.contains(class, p.cast())
            || cfg.caches.seen_anywhere(class, p.cast(), in_cache)
        {
            block_error(msg, p, Some(arena), class_size(class));
        }
        // SAFETY: as the contract says.
        unsafe {
            cfg.arena(arena as usize)
                .confirm_double_free(&SRC, p, what, msg)
        };
    }

    /// The current CPU's cache of `class` is full: return it to its arena, then `p`.
    ///
    /// # Safety
    /// As for `free_small_fast`, with the mark written.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_full(cfg: &Config, p: *mut u8, what: Lookup, arena: u32, class: usize) {
        if cfg.arena(arena as usize).held_by_caller() {
            // A signal handler that interrupted this thread inside the arena: the block
            // takes the pending stack, which needs no lock.
            // SAFETY: by the contract.
            return unsafe { cfg.arena(arena as usize).free_marked(&SRC, p, what, false) };
        }
        Self::flush(cfg, class);
        // SAFETY: by the contract.
        unsafe { cfg.arena(arena as usize).free_marked(&SRC, p, what, true) };
    }

    /// The current CPU's outbox is full: send it, then put `p` in the emptied outbox.
    ///
    /// # Safety
    /// As for `free_small_full`.
    #[cold]
    #[inline(never)]
    unsafe fn free_outbox_full(cfg: &Config, p: *mut u8, what: Lookup, arena: u32) {
        Self::send_outbox(cfg);
        // SAFETY: by the contract.
        if unsafe { cfg.caches.push_outbox(p.cast()) } != Push::Done {
            // SAFETY: by the contract.
            unsafe { Self::free_small_remote(cfg, p, what, arena) };
        }
    }

    /// Sends the current CPU's outbox: each block back to its owning arena, with one push
    /// onto the owner's pending stack per owner (for up to `GROUPS` owners; blocks of
    /// further owners are pushed one by one).
    #[cold]
    #[inline(never)]
    pub(super) fn send_outbox(cfg: &Config) {
        const GROUPS: usize = 4;
        let Some((cpu, chain)) = cfg.caches.take_all(OUTBOX) else {
            return;
        };
        let mut groups = [(usize::MAX, Batch::new(0)); GROUPS];
        // SAFETY: a chain taken off an outbox is ours, its links encoded with the cache's
        // key; every block is a free, marked small block of some arena, counted in use by
        // its run, which only its owner's drain will change.
        let r = unsafe {
            crate::cpucache::for_each_block(chain, cfg.caches.key_of(cpu), |b| {
                let what = lookup(&SRC, b as *const u8);
                let Lookup::Small { arena, .. } = what else {
                    invalid_pointer(b"coreheap: corrupted outbox", b.cast());
                };
                let owner = cfg.arena(arena as usize);
                let slot = groups
                    .iter()
                    .position(|g| g.0 == arena as usize)
                    .or_else(|| groups.iter().position(|g| g.0 == usize::MAX));
                match slot {
                    Some(i) => {
                        if groups[i].0 == usize::MAX {
                            groups[i] = (arena as usize, Batch::new(owner.key()));
                        }
                        groups[i].1.add(b);
                    }
                    None => owner.free_marked(&SRC, b.cast(), what, false),
                }
            })
        };
        if let Err(b) = r {
            invalid_pointer(
                b"coreheap: free list link overwritten (write after free or double free)",
                b.cast(),
            );
        }
        for (owner, batch) in groups.iter().filter(|g| g.0 != usize::MAX) {
            // SAFETY: the batch holds blocks of `owner`, built with its key.
            unsafe { cfg.arena(*owner).push_remote_batch(&SRC, batch) };
        }
    }

    /// `p` belongs to another arena than the current CPU's (or the thread has no rseq CPU
    /// id): the locked path, or the owner's pending stack.
    ///
    /// # Safety
    /// As for `free_small_full`.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_remote(cfg: &Config, p: *mut u8, what: Lookup, arena: u32) {
        let a = cfg.arena(arena as usize);
        let local = cfg.arena_index(os::current_cpu()) == arena as usize;
        // SAFETY: by the contract.
        unsafe { a.free_marked(&SRC, p, what, local) };
    }
}
