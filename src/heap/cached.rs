//! The process heap's per-CPU cache paths, beyond the one-section fast paths: refills and
//! flushes between a CPU cache and its arena, the outboxes of blocks freed on a CPU that does
//! not own them, and the double-free confirmation that searches the caches.
//!
//! Every function here runs with the caches on (`cfg.caches.enabled`) and keeps `errno`
//! where the C `free` path reaches it (see `ProcessHeap::free_small`).

use super::init::rseq_cpu;
use super::{Config, ProcessHeap, SRC};
use crate::arena::{lookup, Lookup};
use crate::chunk::Block;
use crate::cpucache::{
    batch, chain_max, for_each_block, inbox_unpack, limit, return_blocks, return_chain,
    split_chain, start_limit, take_batch, Chain, OutboxCopy, Push, BATCH_MAX, INBOX_MAX_BLOCK,
    LIMIT_MAX, OUTBOX_LIMIT, PTR_BITS,
};
use crate::diag::{block_error, invalid_pointer};
use crate::front::report::{self, DOUBLE_FREE};
use crate::os;
use crate::remote::Batch;
use crate::size_class::{class_size, NUM_CLASSES, TABLE_CLASSES};

use core::sync::atomic::{AtomicU32, Ordering};

/// How often parked chains of idle arenas are swept back to their runs (the page heap's
/// purge delay).
const SWEEP_MS: u32 = 1000;

/// A thread looks whether a sweep is due once per this many refills (a clock read each).
const SWEEP_EVERY: u32 = 32;

std::thread_local! {
    /// Refills by this thread (const-initialised, no destructor: safe inside `malloc`).
    static REFILLS: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

/// What a broken chain is reported as.
const LINK_OVERWRITTEN: &[u8] =
    b"coreheap: free list link overwritten (write after free or double free)";

impl ProcessHeap {
    /// The current CPU's cache has no block of `class`: takes a chain parked in the CPU's
    /// arena's transfer slots (one atomic swap), or one sorted out of the arena's inbox
    /// (`sort_inbox`), growing the list's limit; or else a batch from the arena under its
    /// lock; returns one block and puts the rest in the cache.
    #[cold]
    #[inline(never)]
    pub(super) fn refill(cfg: &Config, class: usize) -> (*mut u8, bool) {
        let Some(cpu) = rseq_cpu() else {
            // A thread without an rseq area (one not started by glibc, or before glibc
            // registered it): no cache can be filled for it.
            return Self::alloc_uncached(class);
        };
        let ai = cfg.arena_index(cpu);
        let a = cfg.arena(ai);
        if a.held_by_caller() {
            // A signal handler that interrupted this thread inside the arena.
            return Self::alloc_uncached(class);
        }
        REFILLS.with(|n| {
            n.set(n.get().wrapping_add(1));
            if n.get() % SWEEP_EVERY == 0 {
                Self::sweep_if_due(cfg);
            }
        });
        let mut parked = cfg.caches.transfer(ai).take(class);
        if parked == 0 && class < TABLE_CLASSES {
            // SAFETY: by the checks above, `ai` is the arena the map gives `cpu`, and the
            // thread does not hold its lock.
            parked = unsafe { Self::sort_inbox(cfg, cpu, ai, class) };
        }
        let has_cache = cpu < cfg.caches.len();
        if parked != 0 {
            if has_cache {
                // The list ran empty with blocks of its class going round through the
                // middle tier (not a first use, which the arena serves): it may hold more
                // from now on.
                cfg.caches.grow(cpu, class);
            }
            // SAFETY: a chain taken off a slot (or just sorted) is ours, of arena `ai` and
            // `class`, linked with the arena's key, not empty (the slots' invariant).
            return unsafe { Self::serve_chain(cfg, cpu, ai, class, parked) };
        }
        let lim = if has_cache {
            cfg.caches.limit_of(cpu, class)
        } else {
            limit(class)
        };
        if has_cache && cfg.caches.has_runs(cpu) {
            // The arena may carve pages for this refill: the CPU's cached runs go back first,
            // so that their pages can serve it (see `runs.rs`). Not for a refill that the
            // middle tier served (above), which carves nothing.
            Self::flush_runs(cfg);
        }
        let (first, chain) = take_batch(a, &SRC, class, batch(lim), cfg.mark);
        if first.0.is_null() {
            // The arena could get no memory from the OS (an address-space limit): the locked
            // path takes a block of another arena rather than fail while they have memory.
            return Self::alloc_uncached(class);
        }
        // SAFETY: the chain's blocks are free blocks of class `class` of arena `ai`, ours.
        unsafe { Self::install_or_return(cfg, cpu, ai, class, chain.head()) };
        first
    }

    /// Returns the first block of `chain` and installs the rest in CPU `cpu`'s list of
    /// `class` (or parks or returns it, see `install_or_return`).
    ///
    /// # Safety
    /// `chain` is the caller's: a packed chain of at least one and at most
    /// `chain_max(class)` free, marked blocks of class `class` of arena `ai` (the arena the
    /// map gives `cpu`), linked with its key, counted in use by their runs.
    unsafe fn serve_chain(
        cfg: &Config,
        cpu: usize,
        ai: usize,
        class: usize,
        chain: usize,
    ) -> (*mut u8, bool) {
        let mut first = [0usize; 1];
        // SAFETY: by the contract.
        match unsafe { split_chain(chain, cfg.arena(ai).key(), &mut first) } {
            Ok((1, rest)) => {
                // SAFETY: as above: `rest` is the rest of that chain, ours.
                unsafe { Self::install_or_return(cfg, cpu, ai, class, rest) };
                let b = first[0] as *mut Block;
                // SAFETY: the block is ours now; neither its link nor its free mark may
                // survive into a live block.
                unsafe {
                    (*b).link = 0;
                    (*b).mark = 0;
                }
                (b.cast(), false)
            }
            // The chain is never empty (the contract).
            Ok(_) => invalid_pointer(LINK_OVERWRITTEN, chain as *mut u8),
            Err(b) => invalid_pointer(LINK_OVERWRITTEN, b.cast()),
        }
    }

    /// The refill of `class` found no parked chain: drains arena `ai`'s inbox (the blocks
    /// other arenas' CPUs sent back from their outboxes) and sorts it by class into chains;
    /// returns a chain of `class` for the refill, or 0 when none came. The first chain of
    /// every other class this CPU uses tops up its list of that class (built in front of
    /// the list as it was when the drain began, and installed with it in one section, up to
    /// the list's limit), so that the next allocations of those classes find their blocks
    /// without a refill of their own; the other chains, and a top-up that finds its list
    /// changed (a thread that ran on this CPU meanwhile, or a migration), are parked in the
    /// arena's transfer slots (or, where those are full, returned to the runs under the
    /// lock). So a remote free costs its sender a share of one compare-and-swap per owner
    /// and outbox, whatever the number of classes; the slots' lines stay with the owner's
    /// CPUs, and the blocks' lines come to the owner's CPU with the links written here,
    /// before the pops that read them.
    ///
    /// # Safety
    /// `ai` is the arena the map gives `cpu` (or `cpu` is past the caches); the thread does
    /// not hold its lock.
    #[inline(never)]
    unsafe fn sort_inbox(cfg: &Config, cpu: usize, ai: usize, class: usize) -> usize {
        let transfer = cfg.caches.transfer(ai);
        if transfer.inbox.seems_empty() {
            return 0;
        }
        let key = cfg.arena(ai).key();
        let on_cpu = cpu < cfg.caches.len();
        let mut heads = [0usize; TABLE_CLASSES];
        // Per class: the head of this CPU's list that `heads` is being built in front of,
        // while `to_list` (the class's first chain; not the refill's own class, whose list
        // is empty and which gets `mine`). Only classes this CPU uses: a list that holds
        // blocks, or whose limit grew (an overflow or a refill through the middle tier);
        // the others' chains stay parked, where the arena's other CPUs and the sweep reach
        // them.
        let mut base = [0usize; TABLE_CLASSES];
        let mut to_list = [false; TABLE_CLASSES];
        if on_cpu {
            for c in (0..TABLE_CLASSES).filter(|&c| c != class) {
                let h = cfg.caches.head_of(cpu, c);
                let lim = cfg.caches.limit_of(cpu, c);
                if h >> PTR_BITS < lim && (h != 0 || lim > start_limit(c)) {
                    (base[c], heads[c], to_list[c]) = (h, h, true);
                }
            }
        }
        // What the refill gets: the first full chain of `class`, else its last partial one.
        let mut mine = 0;
        let mut sorted = 0u64;
        transfer.inbox.drain(|v| {
            // The free that put the block in an outbox found its class, sent along.
            let (b, c) = inbox_unpack(v);
            if c >= TABLE_CLASSES || b == 0 {
                // Only a write into the ring itself makes this.
                invalid_pointer(b"coreheap: corrupted inbox", b as *mut u8);
            }
            sorted += 1;
            // SAFETY: `heads[c]` is 0 or a chain of ours of class `c`, linked with `key`,
            // or, while `to_list[c]`, the blocks of ours pushed in front of the list head
            // `base[c]`, which this chain is only pushed onto and then topped up with;
            // `b` is a free, marked block of arena `ai` and class `c` that the inbox gave
            // up to us (its invariant).
            let mut chain = unsafe {
                if to_list[c] {
                    Chain::over_list(heads[c], key)
                } else {
                    Chain::from_head(heads[c], key)
                }
            };
            // SAFETY: as above.
            unsafe { chain.push(b as *mut Block) };
            heads[c] = chain.head();
            // Chains as long as this CPU's list of the class holds now, which a refill here
            // installs whole (at most `chain_max(c)`).
            let cap = if on_cpu {
                cfg.caches.limit_of(cpu, c)
            } else {
                chain_max(c)
            };
            if heads[c] >> PTR_BITS >= cap {
                if c == class && mine == 0 {
                    mine = heads[c];
                } else if to_list[c] {
                    to_list[c] = false;
                    // SAFETY: as above, built in front of `base[c]`, read from this
                    // CPU's list of `c`; the thread does not hold `ai`'s lock.
                    unsafe { Self::top_up_or_park(cfg, cpu, ai, c, heads[c], base[c]) };
                } else {
                    // SAFETY: a full chain of ours of arena `ai` and class `c`; the thread
                    // does not hold `ai`'s lock (the contract).
                    unsafe { Self::park_or_return(cfg, ai, c, heads[c]) };
                }
                heads[c] = 0;
            }
        });
        if sorted > 0 {
            transfer.note_taken();
            transfer.count_returned(sorted);
        }
        for c in 0..TABLE_CLASSES {
            let h = heads[c];
            if to_list[c] {
                if h != base[c] {
                    // SAFETY: as in the drain.
                    unsafe { Self::top_up_or_park(cfg, cpu, ai, c, h, base[c]) };
                }
            } else if h == 0 {
                continue;
            } else if c == class && mine == 0 {
                mine = h;
            } else {
                // SAFETY: a chain of ours of arena `ai` and class `c`; the thread does not
                // hold `ai`'s lock (the contract).
                unsafe { Self::park_or_return(cfg, ai, c, h) };
            }
        }
        mine
    }

    /// Tops up CPU `cpu`'s list of `class` with `chain`, built in front of `base`
    /// ([`Chain::over_list`]); when the list is no longer `base` (or the thread no longer
    /// on `cpu`), the blocks in front of `base` are parked instead.
    ///
    /// # Safety
    /// `cpu < len`; `base` was read from that list; `chain`'s blocks in front of `base`
    /// (at least one) are the caller's: free, marked blocks of class `class` of arena `ai`,
    /// the arena the map gives `cpu`, counted in use, linked with its key; the thread does
    /// not hold `ai`'s lock.
    unsafe fn top_up_or_park(
        cfg: &Config,
        cpu: usize,
        ai: usize,
        class: usize,
        chain: usize,
        base: usize,
    ) {
        // SAFETY: by the contract.
        if unsafe { cfg.caches.top_up(cpu, class, chain, base) } {
            return;
        }
        // SAFETY: by the contract.
        unsafe { Self::park_front_of(cfg, ai, class, chain, base) };
    }

    /// The top-up's list changed: takes the blocks in front of `base` off `chain` (reading
    /// no block of `base`'s) and parks them, or returns them under the lock.
    ///
    /// # Safety
    /// As for `top_up_or_park`.
    #[cold]
    #[inline(never)]
    unsafe fn park_front_of(cfg: &Config, ai: usize, class: usize, chain: usize, base: usize) {
        let k = ((chain >> PTR_BITS) - (base >> PTR_BITS)).min(LIMIT_MAX);
        let mut front = [0usize; LIMIT_MAX];
        // SAFETY: the first `k` blocks of the chain are ours, linked with the arena's key
        // (the contract); `split_chain` reads the links of those `k` alone.
        let got = match unsafe { split_chain(chain, cfg.arena(ai).key(), &mut front[..k]) } {
            Ok((got, _)) => got,
            Err(b) => invalid_pointer(LINK_OVERWRITTEN, b.cast()),
        };
        // SAFETY: at most `limit(class)` blocks of arena `ai` and `class`, ours, on no list
        // now; the thread does not hold the lock (the contract).
        unsafe { Self::park_blocks_or_return(cfg, ai, class, &front[..got]) };
    }

    /// Parks `chain` in arena `ai`'s transfer slots of `class`: in an empty slot, or else
    /// joined in front of a parked chain with room for it; returns it to its runs under the
    /// lock when neither is left.
    ///
    /// # Safety
    /// `chain` is the caller's: at most `chain_max(class)` free, marked blocks of arena `ai`
    /// and `class`, linked with its key, counted in use; the thread does not hold the lock.
    unsafe fn park_or_return(cfg: &Config, ai: usize, class: usize, chain: usize) {
        let transfer = cfg.caches.transfer(ai);
        // SAFETY: by the contract.
        if unsafe { transfer.park(class, chain) } {
            return;
        }
        // Every slot taken: the chain's blocks (whose links were just written, so their
        // lines are at hand) join a parked chain that has room.
        let mut blocks = [0usize; LIMIT_MAX];
        let mut n = 0;
        let key = cfg.arena(ai).key();
        // SAFETY: by the contract the chain is ours, linked with `key`.
        let r = unsafe {
            for_each_block(chain, key, |b| {
                if n < blocks.len() {
                    blocks[n] = b as usize;
                }
                n += 1;
            })
        };
        if let Err(b) = r {
            invalid_pointer(LINK_OVERWRITTEN, b.cast());
        }
        if n > LIMIT_MAX {
            // Longer than any chain may be (the contract): a link was overwritten.
            invalid_pointer(LINK_OVERWRITTEN, blocks[0] as *mut u8);
        }
        // SAFETY: the chain's blocks, ours, free and marked, of `ai` and `class`, at most
        // `chain_max(class)` of them (the contract); the lock is not held.
        unsafe { Self::park_blocks_or_return(cfg, ai, class, &blocks[..n]) };
    }

    /// Parks `blocks` (at least one) in arena `ai`'s transfer slots of `class`, joined in
    /// front of a parked chain with room for them or in an empty slot, or returns them to
    /// their runs under the lock.
    ///
    /// # Safety
    /// The blocks are the caller's: at most `chain_max(class)` free, marked blocks of arena
    /// `ai` and `class`, counted in use, on no list; the thread does not hold the lock.
    unsafe fn park_blocks_or_return(cfg: &Config, ai: usize, class: usize, blocks: &[usize]) {
        let a = cfg.arena(ai);
        // SAFETY: by the contract; refused, the blocks are still ours.
        if !unsafe { cfg.caches.transfer(ai).park_blocks(class, a.key(), blocks) } {
            // SAFETY: by the contract.
            unsafe { return_blocks(a, &SRC, blocks) };
        }
    }

    /// A block of `class` by the locked path: from the current CPU's arena, or from
    /// another one when that cannot get memory or the calling thread holds its lock (see
    /// `front::alloc_locked`); null only when no arena can serve it.
    #[cold]
    fn alloc_uncached(class: usize) -> (*mut u8, bool) {
        match super::HEAP.ready() {
            Some(r) => crate::front::alloc_locked(&r, class_size(class), 1),
            None => (core::ptr::null_mut(), false),
        }
    }

    /// Once per [`SWEEP_MS`] (looked at every [`SWEEP_EVERY`] refills): the blocks waiting in
    /// the inbox and the chains parked in the transfer slots of every arena whose CPUs took
    /// none (nor sorted an inbox) since the last sweep go back to their runs, so that an
    /// arena that stopped allocating does not keep them (and their pages) for good.
    fn sweep_if_due(cfg: &Config) {
        static LAST: AtomicU32 = AtomicU32::new(0);
        let now = os::now_ms();
        let last = LAST.load(Ordering::Relaxed);
        if now.wrapping_sub(last) < SWEEP_MS
            || LAST
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        for i in 0..cfg.count {
            // (An arena whose lock this thread holds - a signal handler that interrupted
            // it there - is left for the next sweep.)
            if !cfg.arena(i).held_by_caller() && cfg.caches.transfer(i).idle_since_last_look() {
                Self::return_parked(cfg, i);
                // The sweep's own takes do not make the arena look busy.
                let _ = cfg.caches.transfer(i).idle_since_last_look();
            }
        }
    }

    /// Returns every block waiting in arena `i`'s inbox, and then every chain parked in its
    /// transfer slots, to its runs. (A refill that is sorting the inbox at that moment
    /// parks what it took afterwards, or puts it on its CPU's lists; a send whose slots are
    /// reserved but not yet written is left for the next drain.)
    pub(super) fn return_parked(cfg: &Config, i: usize) {
        let a = cfg.arena(i);
        let transfer = cfg.caches.transfer(i);
        let mut held = [0usize; 64];
        let (mut n, mut all) = (0, 0);
        // (False when another thread drains it: that thread sorts what it takes.)
        let _ = transfer.inbox.drain(|v| {
            let b = inbox_unpack(v).0;
            if n == held.len() {
                // SAFETY: free, marked blocks of arena `i` that the inbox gave up to us.
                unsafe { return_blocks(a, &SRC, &held) };
                n = 0;
            }
            held[n] = b;
            n += 1;
            all += 1;
        });
        if n > 0 {
            // SAFETY: as above.
            unsafe { return_blocks(a, &SRC, &held[..n]) };
        }
        if all > 0 {
            transfer.count_returned(all);
        }
        for class in 0..NUM_CLASSES {
            loop {
                let h = transfer.take(class);
                if h == 0 {
                    break;
                }
                // SAFETY: a chain taken off arena `i`'s slot is ours: free blocks of arena
                // `i`, linked with its key, counted in use by their runs.
                unsafe { return_chain(cfg.arena(i), &SRC, h) };
            }
        }
    }

    /// Makes `chain` CPU `cpu`'s list of `class` if that list is still empty, the thread
    /// still runs there and the chain is no longer than the list's limit (for a class up to
    /// 8 KiB, the front of a longer chain is parked first and the rest installed);
    /// otherwise parks it in arena `ai`'s transfer slots, or returns it to the arena under
    /// its lock. (A large class's parked chain, from outboxes, may be longer than its list
    /// holds: it is parked again whole, one compare-and-swap, for the next refill.)
    ///
    /// # Safety
    /// `chain` (0 or a packed chain of at most `chain_max(class)` blocks) is the caller's:
    /// free blocks of class `class` of arena `ai`, the arena the map gives `cpu`, counted in
    /// use.
    unsafe fn install_or_return(cfg: &Config, cpu: usize, ai: usize, class: usize, chain: usize) {
        if chain == 0 {
            return;
        }
        let mut chain = chain;
        let lim = if cpu < cfg.caches.len() {
            cfg.caches.limit_of(cpu, class)
        } else {
            0
        };
        let n = chain >> PTR_BITS;
        if n > lim && lim > 0 && class < TABLE_CLASSES {
            // Longer than this CPU's list may hold now (a chain from a CPU whose list has
            // grown further, or sorted from the inbox): the front's excess is parked.
            // SAFETY: by the contract.
            chain = unsafe { Self::park_front(cfg, ai, class, chain, n - lim) };
        }
        let fits = (chain >> PTR_BITS) <= lim;
        // SAFETY: by the contract (cache `cpu` holds blocks of arena `ai`).
        let installed = fits && unsafe { cfg.caches.install(cpu, class, chain) };
        // Migrated meanwhile, or another thread on this CPU filled the list first.
        // SAFETY: by the contract.
        if !installed && !unsafe { cfg.caches.transfer(ai).park(class, chain) } {
            // SAFETY: by the contract.
            unsafe { return_chain(cfg.arena(ai), &SRC, chain) };
        }
    }

    /// Takes the first `k` blocks (`0 < k <` its length) off `chain` and parks them as a
    /// chain of their own (or returns them to the arena); returns the rest.
    ///
    /// # Safety
    /// As for `install_or_return`, `class < TABLE_CLASSES`; the thread does not hold
    /// `ai`'s lock.
    unsafe fn park_front(cfg: &Config, ai: usize, class: usize, chain: usize, k: usize) -> usize {
        let key = cfg.arena(ai).key();
        let mut front = [0usize; LIMIT_MAX];
        let k = k.min(front.len());
        // SAFETY: the chain is ours, linked with the arena's key (the contract).
        let (got, rest) = match unsafe { split_chain(chain, key, &mut front[..k]) } {
            Ok(r) => r,
            Err(b) => invalid_pointer(LINK_OVERWRITTEN, b.cast()),
        };
        // SAFETY: at most `k` < `chain_max(class)` blocks of arena `ai` and `class`, ours,
        // on no list now; the thread does not hold the lock (the contract).
        unsafe { Self::park_blocks_or_return(cfg, ai, class, &front[..got]) };
        rest
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

    /// The current CPU's list could not take `p` (`r` says why): the outbox to send, a
    /// flush, or the locked path. Keeps errno (see `free_small`).
    ///
    /// # Safety
    /// As for `free_small_fast`, with the mark written.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_slow(cfg: &Config, p: *mut u8, arena: u32, class: usize, r: Push) {
        if r == Push::OutboxFull {
            // SAFETY: by the contract; the push found another arena's cache and a small class.
            unsafe { Self::free_outbox_slow(cfg, p, arena, class) };
            return;
        }
        // SAFETY: by the contract.
        unsafe { Self::free_small_slower(cfg, p, arena, class, r) }
    }

    /// The outbox had no room for `p`: send it, then put `p` in. Keeps errno.
    ///
    /// # Safety
    /// As for `free_small_slow`, `p` of another arena.
    #[inline(never)]
    unsafe fn free_outbox_slow(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
        // SAFETY: by the contract.
        os::keeping_errno(|| unsafe { Self::free_outbox_full(cfg, p, arena, class) })
    }

    /// The ways of `free_small_slow` other than the outbox. Keeps errno.
    ///
    /// # Safety
    /// As for `free_small_slow`.
    #[inline(never)]
    unsafe fn free_small_slower(cfg: &Config, p: *mut u8, arena: u32, class: usize, r: Push) {
        let what = || lookup(&SRC, p);
        // SAFETY: by the contract.
        os::keeping_errno(|| unsafe {
            match r {
                Push::Done => {}
                Push::Full => Self::free_small_full(cfg, p, what(), arena, class),
                // (`OutboxFull` never comes here: `free_small_slow` sends the outbox; nor
                // `Remote`, which only a run slot's push returns.)
                Push::Remote | Push::NoCache | Push::OutboxFull => {
                    Self::free_small_remote(cfg, p, what(), arena)
                }
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
            Lookup::Small { run, .. } => (unsafe { (*run).class() }) == list,
            _ => false,
        };
        if cfg.caches.contains(class, p.cast())
            || cfg
                .caches
                .seen_anywhere(class, p.cast(), in_cache, |a| cfg.arena(a).key())
        {
            block_error(msg, p, Some(arena), class_size(class));
        }
        // SAFETY: as the contract says.
        unsafe {
            cfg.arena(arena as usize)
                .confirm_double_free(&SRC, p, what, msg)
        };
    }

    /// The current CPU's cache of `class` is full: the whole list moves to a transfer slot
    /// of its arena and `p` starts the list anew; when every slot is taken, the newer half
    /// goes back to the arena under its lock and `p` joins the older half in the cache. A
    /// block of a large class goes back to its run under the lock.
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
        if class >= TABLE_CLASSES {
            // A large class (no transfer slots, a list of a few blocks): `p` goes back to its
            // run under the lock and the list stays as it is, which saves the two sections
            // that would swap it in (the list's blocks are as good as `p` for the next
            // allocation).
            // SAFETY: by the contract.
            return unsafe { cfg.arena(arena as usize).free_marked(&SRC, p, what, true) };
        }
        let Some((cpu, chain)) = cfg.caches.take_all(class) else {
            // Emptied by another thread meanwhile, or no CPU id: the locked path.
            // SAFETY: by the contract.
            return unsafe { cfg.arena(arena as usize).free_marked(&SRC, p, what, true) };
        };
        let ai = cfg.caches.arena_of(cpu);
        let mine = ai == arena as usize;
        if !mine && cfg.arena(ai).held_by_caller() {
            // Migrated since the push into the cache of an arena whose lock this thread's
            // interrupted code holds (a signal handler): nothing here may wait for it.
            // SAFETY: the chain is ours (as below); `p` by the contract.
            unsafe {
                Self::send_chain(cfg, ai, class, chain);
                cfg.arena(arena as usize).free_marked(&SRC, p, what, false);
            }
            return;
        }
        if mine && (chain >> PTR_BITS) >= cfg.caches.limit_of(cpu, class) {
            // This CPU's list overflowed (not one the thread found on migrating to another
            // CPU of the arena): it may hold more from now on.
            cfg.caches.grow(cpu, class);
        }
        // The whole list to a slot: one compare-and-swap, no block touched; `p` then starts
        // the emptied list.
        // SAFETY: a chain taken off cache `cpu` is ours: blocks of arena `ai` and `class`,
        // linked with its key, at most `limit(class)` of them (`cpucache` invariants).
        if unsafe { cfg.caches.transfer(ai).park(class, chain) } {
            let r = if mine {
                // (A thread that moved meanwhile to another arena's CPU puts `p` in that
                // CPU's outbox, or is told it is full and frees it below.)
                // SAFETY: by the contract `p` is a free, marked block of `arena` and `class`.
                unsafe { cfg.caches.push(class, p.cast(), arena) }
            } else {
                Push::NoCache
            };
            if r != Push::Done {
                // SAFETY: by the contract.
                unsafe { cfg.arena(arena as usize).free_marked(&SRC, p, what, false) };
            }
            return;
        }
        // Every slot taken: the newer half goes back to the arena under its lock, the older
        // half stays, with `p` in front. Taking the newer blocks off the front reads their
        // links once; the older rest is still a well-formed chain (each link holds the count
        // of what follows it), so it stays as it is, and the newer ones go back from their
        // addresses without a second walk.
        let key = cfg.caches.key_of(cpu);
        let mut newer = [0usize; BATCH_MAX];
        let give = (chain >> PTR_BITS).div_ceil(2).min(BATCH_MAX);
        // SAFETY: a chain taken off cache `cpu` is ours: blocks of arena `ai` and `class`,
        // linked with its key (module invariants of `cpucache`).
        let (k, older) = match unsafe { split_chain(chain, key, &mut newer[..give]) } {
            Ok(r) => r,
            Err(b) => invalid_pointer(LINK_OVERWRITTEN, b.cast()),
        };
        // SAFETY: `older` is the rest of that chain, well formed, ours.
        let mut kept = unsafe { Chain::from_head(older, key) };
        if mine {
            // SAFETY: by the contract `p` is a free, marked block of `arena` and `class`.
            unsafe { kept.push(p.cast()) };
        }
        // SAFETY: the blocks of `newer[..k]` and the chain `kept` are ours, of arena `ai` and
        // `class`; `kept` has at most `n - min(ceil(n / 2), BATCH_MAX) + 1` blocks, no more
        // than the list held (for n >= 2 at least one block went back), and
        // `install_or_return` cuts it to the list's limit of now, which a steal may have
        // lowered.
        unsafe {
            return_blocks(cfg.arena(ai), &SRC, &newer[..k]);
            Self::install_or_return(cfg, cpu, ai, class, kept.head());
            if !mine {
                cfg.arena(arena as usize).free_marked(&SRC, p, what, false);
            }
        }
    }

    /// The current CPU's outbox is full: send it, then put `p` in the emptied outbox.
    ///
    /// # Safety
    /// As for `free_small_full`.
    #[cold]
    #[inline(never)]
    unsafe fn free_outbox_full(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
        Self::send_outbox(cfg);
        // SAFETY: by the contract.
        if unsafe { cfg.caches.push_outbox(p.cast(), class, arena) } != Push::Done {
            // SAFETY: by the contract.
            unsafe { Self::free_small_remote(cfg, p, lookup(&SRC, p), arena) };
        }
    }

    /// Sends the current CPU's outbox: its blocks, grouped by owner (which each entry names
    /// with the block's class, as the free found them: no block is looked up here), go to
    /// their owners (`send_to_owner`): those of up to 1 KiB into the owners' inboxes, one
    /// compare-and-swap per owner, which the owner's CPUs sort by class when they next
    /// refill (`sort_inbox`), so that for them the sender touches neither a block nor the
    /// owner's transfer slots, whose lines stay with the owner's CPUs.
    #[cold]
    #[inline(never)]
    pub(super) fn send_outbox(cfg: &Config) {
        let mut out = OutboxCopy::new();
        let n = cfg.caches.take_outbox(&mut out);
        if n == 0 {
            return;
        }
        by_owner(&out.entries[..n], &out.owners[..n], |owner, blocks| {
            Self::send_to_owner(cfg, owner, blocks)
        });
    }

    /// Gives `blocks` (outbox entries: blocks packed with their classes) to arena `owner`:
    /// those of up to [`INBOX_MAX_BLOCK`] bytes to its inbox, the larger ones joined to
    /// chains parked in its transfer slots of their classes (a compare-and-swap per class on
    /// the owner's slot line, which the inbox spares the many small blocks); what finds no
    /// room there goes onto its pending stack, one push for all, but for blocks above 8 KiB,
    /// which go back to their runs at once, under the owner's lock: none of those waits on
    /// the pending stack of an owner that may have stopped allocating.
    fn send_to_owner(cfg: &Config, owner: usize, blocks: &[usize]) {
        let corrupt = |v: usize| -> ! {
            invalid_pointer(b"coreheap: corrupted outbox", inbox_unpack(v).0 as *mut u8)
        };
        if owner >= cfg.count {
            // Only our own sections write outbox entries, with the arena the free found.
            corrupt(blocks[0]);
        }
        let a = cfg.arena(owner);
        let transfer = cfg.caches.transfer(owner);
        let mut pending = Batch::new(a.key());
        // The inbox's blocks from the front, the larger ones from the back.
        let mut buf = [0usize; OUTBOX_LIMIT];
        let (mut small, mut large) = (0, blocks.len());
        for &v in blocks {
            let class = inbox_unpack(v).1;
            if class >= NUM_CLASSES {
                corrupt(v);
            }
            if class_size(class) <= INBOX_MAX_BLOCK {
                buf[small] = v;
                small += 1;
            } else {
                large -= 1;
                buf[large] = v;
            }
        }
        // SAFETY: free, marked blocks of `owner` (the free looked them up) of classes up to
        // `INBOX_MAX_BLOCK`, counted in use by their runs, ours (taken off the outbox).
        if small > 0 && !unsafe { transfer.inbox.send(&buf[..small]) } {
            for &v in &buf[..small] {
                // SAFETY: as above; each block is re-linked for the owner's stack.
                unsafe { pending.add(inbox_unpack(v).0 as *mut Block) };
            }
        }
        // The larger ones by class (the class is the entry's high bits), then as addresses.
        let larger = &mut buf[large..blocks.len()];
        larger.sort_unstable();
        for group in larger.chunk_by_mut(|x, y| inbox_unpack(*x).1 == inbox_unpack(*y).1) {
            let class = inbox_unpack(group[0]).1;
            for v in group.iter_mut() {
                *v = inbox_unpack(*v).0;
            }
            for part in group.chunks(chain_max(class)) {
                // SAFETY: free, marked blocks of `owner` and `class` (the free looked them
                // up), counted in use by their runs, ours, at most `chain_max(class)` of
                // them; `a.key()` is the owner's link secret.
                if unsafe { transfer.park_blocks(class, a.key(), part) } {
                    transfer.count_returned(part.len() as u64);
                } else if class >= TABLE_CLASSES && !a.held_by_caller() {
                    // SAFETY: as above (a signal handler that interrupted this thread inside
                    // the owner takes the pending stack instead, which needs no lock).
                    unsafe { return_blocks(a, &SRC, part) };
                } else {
                    for &b in part {
                        // SAFETY: as above; each block is re-linked for the owner's stack.
                        unsafe { pending.add(b as *mut Block) };
                    }
                }
            }
        }
        // SAFETY: the batch holds free blocks of `owner`, built with its key.
        unsafe { a.push_remote_batch(&SRC, &pending) };
    }

    /// Gives `chain` (blocks freed on a CPU of another arena) back to arena `owner`: parked
    /// in its transfer slots when one is free, else onto its pending stack with one push.
    ///
    /// # Safety
    /// `chain` is the caller's: at most `limit(class)` free, marked blocks of `owner` and
    /// `class`, linked with `owner`'s key, counted in use by their runs.
    unsafe fn send_chain(cfg: &Config, owner: usize, class: usize, chain: usize) {
        let a = cfg.arena(owner);
        // SAFETY: by the contract.
        if unsafe { cfg.caches.transfer(owner).park(class, chain) } {
            return;
        }
        let mut pending = Batch::new(a.key());
        // SAFETY: by the contract the chain is ours; each block is re-linked for the stack.
        let r = unsafe { for_each_block(chain, a.key(), |b| pending.add(b)) };
        if let Err(b) = r {
            invalid_pointer(LINK_OVERWRITTEN, b.cast());
        }
        // SAFETY: the batch holds blocks of `owner`, built with its key.
        unsafe { a.push_remote_batch(&SRC, &pending) };
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

/// Calls `f(owner, entries)` once per owner named in `owners` with that owner's outbox
/// entries (at most [`OUTBOX_LIMIT`] of them; `owners[i]` is `entries[i]`'s).
fn by_owner(entries: &[usize], owners: &[u16], mut f: impl FnMut(usize, &[usize])) {
    debug_assert!(entries.len() == owners.len() && entries.len() <= OUTBOX_LIMIT);
    let Some(&first) = owners.first() else {
        return;
    };
    if owners.iter().all(|&o| o == first) {
        // One owner (every remote free of a two-arena process): no grouping.
        return f(first as usize, entries);
    }
    let mut groups = Grouped::new();
    for (&v, &o) in entries.iter().zip(owners) {
        // (At most `OUTBOX_LIMIT` entries: `add` takes every one.)
        let added = groups.add(o as usize, v);
        assert!(added);
    }
    groups.for_each(f);
}

/// Entries a [`Grouped`] holds: an outbox's; indices fit its `u8` links, `ENTRIES` itself
/// ending a group.
const ENTRIES: usize = OUTBOX_LIMIT;
const _: () = assert!(ENTRIES > 0 && ENTRIES < 256);

/// Up to an outbox's entries, grouped by owner as they are added, in one pass: an
/// open-addressed table of groups, each a list of indices into `addr`. (A sort of the 64
/// (owner, class, address) triples took an eighth of the `prodcons` workload's time.)
struct Grouped {
    addr: [usize; ENTRIES],
    /// The index of the next entry of the same group; `ENTRIES` ends a group.
    next: [u8; ENTRIES],
    /// The owner, or [`Self::FREE`], and the indices of the group's first and last entry.
    groups: [(usize, u8, u8); ENTRIES],
    n: usize,
}

impl Grouped {
    const FREE: usize = usize::MAX;

    fn new() -> Self {
        Self {
            addr: [0; ENTRIES],
            next: [ENTRIES as u8; ENTRIES],
            groups: [(Self::FREE, 0, 0); ENTRIES],
            n: 0,
        }
    }

    /// Adds entry `v` of owner `owner`; false, nothing added, when `ENTRIES` entries are in
    /// (which an outbox's limit never allows).
    #[must_use]
    fn add(&mut self, owner: usize, v: usize) -> bool {
        let i = self.n;
        if i == ENTRIES {
            return false;
        }
        self.addr[i] = v;
        self.n += 1;
        // At most `i` < `ENTRIES` entries are taken: the probe meets `owner` or a free one.
        let mut g = owner.wrapping_mul(31) % ENTRIES;
        loop {
            let e = &mut self.groups[g];
            if e.0 == Self::FREE {
                *e = (owner, i as u8, i as u8);
                return true;
            }
            if e.0 == owner {
                self.next[e.2 as usize] = i as u8;
                e.2 = i as u8;
                return true;
            }
            g = (g + 1) % ENTRIES;
        }
    }

    /// Calls `f(owner, entries)` once per group.
    fn for_each(&self, mut f: impl FnMut(usize, &[usize])) {
        for &(owner, first, _) in &self.groups {
            if owner == Self::FREE {
                continue;
            }
            let mut entries = [0usize; ENTRIES];
            let (mut k, mut i) = (0, first as usize);
            while i < ENTRIES {
                entries[k] = self.addr[i];
                k += 1;
                i = self.next[i] as usize;
            }
            f(owner, &entries[..k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpucache::PTR_MASK;

    /// An outbox's entries reach each owner once, all of them and no other's, whether one
    /// owner or many.
    #[test]
    fn outbox_entries_go_to_their_owners_in_one_group_each() {
        for owners in [
            vec![3u16; OUTBOX_LIMIT],
            (0..OUTBOX_LIMIT as u16).map(|i| i % 5).collect(),
            (0..OUTBOX_LIMIT as u16).map(|i| 4095 - i).collect(),
            vec![7, 0, 7, 7, 1, 0],
            vec![],
        ] {
            let entries: Vec<usize> = (0..owners.len()).map(|i| 0x1000 + 16 * i).collect();
            let mut got: Vec<(usize, Vec<usize>)> = Vec::new();
            by_owner(&entries, &owners, |o, b| got.push((o, b.to_vec())));
            let mut seen_owners: Vec<usize> = got.iter().map(|g| g.0).collect();
            seen_owners.sort_unstable();
            let n = seen_owners.len();
            seen_owners.dedup();
            assert_eq!(seen_owners.len(), n, "one group per owner");
            let mut all = Vec::new();
            for (o, blocks) in got {
                for b in blocks {
                    assert_eq!(owners[(b - 0x1000) / 16] as usize, o, "entry {b:#x}");
                    all.push(b);
                }
            }
            all.sort_unstable();
            assert_eq!(all, entries, "every entry once");
        }
    }

    /// An inbox drain gives the refill its class's chain, tops up this CPU's list of a class
    /// in use (blocks in it) with that class's blocks, in front of what it held, and parks
    /// the blocks of a class this CPU does not use (an empty list at its start limit).
    #[test]
    fn a_drain_tops_up_the_lists_in_use_and_parks_the_rest() {
        static H: ProcessHeap = ProcessHeap::new();
        let Some((cfg, cpu)) = H.pinned_for_test("drain top-up") else {
            return;
        };
        let ai = cfg.arena_index(cpu);
        let key = cfg.arena(ai).key();
        let class_of = |size| crate::size_class::class_for(size, 8);
        let (wanted, used, idle) = (class_of(64), class_of(128), class_of(256));
        let alloc = |size: usize| {
            let p = H.alloc(size, 8).0;
            assert!(!p.is_null());
            p as usize
        };
        let mine: Vec<usize> = (0..3).map(|_| alloc(64)).collect();
        let topped: Vec<usize> = (0..3).map(|_| alloc(128)).collect();
        let parked: Vec<usize> = (0..2).map(|_| alloc(256)).collect();
        let held = alloc(128);
        // Every list empty (the refills above put batches in them), no limit grown; then
        // one block of `used` in its list.
        for c in [wanted, used, idle] {
            ProcessHeap::flush(cfg, c);
            assert_eq!(cfg.caches.limit_of(cpu, c), start_limit(c));
        }
        // SAFETY: allocated above, freed once.
        unsafe { H.free(held as *mut u8) };
        assert_eq!(cfg.caches.head_of(cpu, used), held | 1 << PTR_BITS);
        let mut entries = Vec::new();
        for (blocks, c) in [(&mine, wanted), (&topped, used), (&parked, idle)] {
            for &b in blocks {
                // SAFETY: ours, allocated above; marked as a freed block is.
                unsafe { (*(b as *mut Block)).mark = cfg.mark };
                entries.push(crate::cpucache::inbox_pack(b, c));
            }
        }
        let transfer = cfg.caches.transfer(ai);
        // SAFETY: free (to the heap's eyes), marked small blocks of arena `ai`, counted in
        // use, given up.
        assert!(unsafe { transfer.inbox.send(&entries) });
        // SAFETY: `ai` is the arena of `cpu`, where the thread is pinned; no lock is held.
        let chain = unsafe { ProcessHeap::sort_inbox(cfg, cpu, ai, wanted) };
        let walk = |h: usize| {
            let mut v = Vec::new();
            // SAFETY: a chain of ours, linked with the arena's key.
            assert!(unsafe { for_each_block(h, key, |b| v.push(b as usize)) }.is_ok());
            v.sort_unstable();
            v
        };
        let sorted = |v: &[usize]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        assert_eq!(walk(chain), sorted(&mine), "the refill's chain");
        assert_eq!(cfg.caches.head_of(cpu, wanted), 0);
        assert_eq!(cfg.caches.head_of(cpu, used) >> PTR_BITS, 4, "topped up");
        let popped: Vec<usize> = (0..4).map(|_| alloc(128)).collect();
        assert_eq!(
            sorted(&popped[..3]),
            sorted(&topped),
            "the new blocks first"
        );
        assert_eq!(popped[3], held);
        assert_eq!(
            cfg.caches.head_of(cpu, idle),
            0,
            "no top-up of an unused class"
        );
        assert_eq!(walk(transfer.take(idle)), sorted(&parked), "parked");
        for b in mine.iter().chain(&popped).chain(&parked) {
            // SAFETY: each ours (handed out, or taken off the chain and slot above); the
            // link and mark cleared as a handed-out block's are, then freed once.
            unsafe {
                (*(*b as *mut Block)).link = 0;
                (*(*b as *mut Block)).mark = 0;
                H.free(*b as *mut u8);
            }
        }
    }

    /// A chain built in front of a CPU list tops it up in one section while the list is as
    /// it was read; once the list changed (here: a pop), the blocks in front go to the
    /// transfer slots instead, exactly those, and the list is left as it is.
    #[test]
    fn a_top_up_installs_only_over_the_list_it_was_built_on() {
        static H: ProcessHeap = ProcessHeap::new();
        let Some((cfg, cpu)) = H.pinned_for_test("top-up") else {
            return;
        };
        let ai = cfg.arena_index(cpu);
        let key = cfg.arena(ai).key();
        let class = crate::size_class::class_for(64, 8);
        let alloc = || {
            let p = H.alloc(64, 8).0;
            assert!(!p.is_null());
            p as usize
        };
        let ours = [alloc(), alloc()];
        // Our two blocks, free and marked as a list's are, in front of `base`.
        let chain_over = |base: usize| {
            // SAFETY: the blocks are ours (allocated above, not freed); the chain is only
            // pushed onto and given to `top_up_or_park` with `base`.
            let mut chain = unsafe { Chain::over_list(base, key) };
            for &b in &ours {
                // SAFETY: as above.
                unsafe {
                    (*(b as *mut Block)).mark = cfg.mark;
                    chain.push(b as *mut Block);
                }
            }
            chain.head()
        };
        // The list holds one block: `base` (the allocation's refill put a batch in the list,
        // which goes back first).
        let first = alloc();
        ProcessHeap::flush(cfg, class);
        // SAFETY: allocated above, freed once.
        unsafe { H.free(first as *mut u8) };
        let base = cfg.caches.head_of(cpu, class);
        assert_eq!((base & PTR_MASK, base >> PTR_BITS), (first, 1));

        // The list changes before the top-up: a pop takes `first`.
        let chain = chain_over(base);
        assert_eq!(alloc(), first);
        assert_eq!(cfg.caches.transfer(ai).take(class), 0, "no slot was taken");
        // SAFETY: our two blocks in front of `base`, read from this CPU's list of `class`;
        // the lock is not held.
        unsafe { ProcessHeap::top_up_or_park(cfg, cpu, ai, class, chain, base) };
        assert_eq!(
            cfg.caches.head_of(cpu, class),
            0,
            "the changed list is left alone"
        );
        let parked = cfg.caches.transfer(ai).take(class);
        let mut got = Vec::new();
        // SAFETY: a chain taken off a slot is ours.
        let r = unsafe { for_each_block(parked, key, |b| got.push(b as usize)) };
        assert!(r.is_ok());
        got.sort_unstable();
        let mut want = ours.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "exactly the blocks in front were parked");

        // The list as it was read: topped up, the new blocks popped first.
        // SAFETY: allocated above, freed once.
        unsafe { H.free(first as *mut u8) };
        let base = cfg.caches.head_of(cpu, class);
        let chain = chain_over(base);
        // SAFETY: as above.
        unsafe { ProcessHeap::top_up_or_park(cfg, cpu, ai, class, chain, base) };
        assert_eq!(cfg.caches.head_of(cpu, class), chain);
        assert_eq!([alloc(), alloc(), alloc()], [ours[1], ours[0], first]);
        for b in [ours[0], ours[1], first] {
            // SAFETY: each handed out above and freed once.
            unsafe { H.free(b as *mut u8) };
        }
    }
}
