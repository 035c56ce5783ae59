//! The process heap: the arena table over anonymous memory, CPU routing, and the entry
//! points that `GlobalAlloc` and the C interface call.
//!
//! What is the process heap's own sits here and in the files beside it: lazy
//! initialisation and the bootstrap buffer (`init.rs`), the per-CPU cache fast paths
//! (`fast.rs`) and their slower halves (`cached.rs`), the run slots of large blocks
//! (`runs.rs`), debug mode's glue, and fork and exit handling (`fork.rs`). Everything a
//! shared heap does the same way (routing a free, usable sizes, realloc policy, huge
//! blocks) is the front end's (`front/`), reached through the [`Backend`] view [`Ready`].

mod cached;
mod fast;
mod fork;
mod init;
mod runs;

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::arena::LARGE_ALIGN_MAX;
use crate::arena::{lookup, Arena, ArenaStats, Lookup};
use crate::cpucache::{Caches, PTR_BITS};
use crate::debug;
use crate::front::{self, report, Backend, HugeCounters};
use crate::os;
use crate::settings::Overrides;
use crate::size_class::{
    class_for, request_bound, LARGE_MAX, NUM_CLASSES, PAGE, SMALL_MAX, SMALL_MIN, TABLE_MAX,
};
use crate::source::{OsSource, PageSource};
use crate::stats::{self, Stats};
use init::BOOTSTRAP;

pub(crate) use fork::prepare_fork_early;

const UNINIT: u8 = 0;
const INITING: u8 = 1;
const READY: u8 = 2;
/// The arena table could not be mapped: every allocation fails (returns null).
const FAILED: u8 = 3;

/// An entry of `ProcessHeap::classes` while the fast path is off.
const NOT_FAST: u8 = u8::MAX;

/// The process heap's page source: anonymous memory, chunks recorded in the registry.
const SRC: OsSource = OsSource;

/// What initialisation computes; written once before `READY`, read-only after.
///
/// `repr(C)` with `caches` first, and first in [`ProcessHeap`] too: the fast paths hand the
/// critical sections `&HEAP.config.caches`, which is then `&HEAP` itself, no addition.
/// Invariants: `arenas` holds `count >= 1` initialised arenas; `cpu_map` holds
/// `cpu_map_len` arena indices below `count`.
#[repr(C)]
struct Config {
    /// The per-CPU caches of the rseq fast path (`enabled` false when it is off).
    caches: Caches,
    arenas: *mut CachePadded<Arena<OsSource>>,
    count: usize,
    /// CPU id -> arena index, for ids below `cpu_map_len`.
    cpu_map: *const u16,
    cpu_map_len: usize,
    /// The double-free mark: a per-process random word written into freed blocks.
    mark: usize,
    /// `COREHEAP_DEBUG=1`: guard bytes and fill patterns (`debug.rs`); the caches are off.
    debug: bool,
}

impl Config {
    /// The arena of CPU `cpu` (ids past the map, which `possible_cpus` did not foresee,
    /// wrap around).
    #[inline]
    fn arena_index(&self, cpu: usize) -> usize {
        if cpu < self.cpu_map_len {
            // SAFETY: `cpu` is below the map's length.
            unsafe { *self.cpu_map.add(cpu) as usize }
        } else {
            cpu % self.count
        }
    }

    #[inline]
    fn arena(&self, i: usize) -> &Arena<OsSource> {
        debug_assert!(i < self.count);
        // SAFETY: `i < count` and the table lives for the rest of the process.
        unsafe { &*self.arenas.add(i) }
    }
}

/// The process heap. There is one, [`HEAP`].
///
/// Invariant: `config` is written only by the thread that moved `state` to `INITING`, and
/// read only after `state == READY` (or a class in `classes`, stored after it) was observed
/// with Acquire ordering.
#[repr(C)]
pub struct ProcessHeap {
    /// First: see [`Config`].
    config: UnsafeCell<Config>,
    state: AtomicU8,
    init_thread: AtomicUsize,
    /// The process that moved `state` to INITING: a fork child that inherits INITING from
    /// it (a `fork` on another thread during the first initialisation) starts over.
    init_pid: AtomicU32,
    /// [`CLASS_TABLE`](crate::size_class::CLASS_TABLE) once the fast path is on,
    /// [`NOT_FAST`] in every entry before (and for good when it stays off), so that the
    /// fast paths learn both the class and that they may run from one load (C `free` reads
    /// the first entry as the flag). Here so that they find it from `HEAP`'s address.
    /// Written only by the initialising thread, entry by entry with Release after `config`
    /// is complete (and READY stored); read with Acquire, so a class seen implies `config`
    /// is.
    classes: [AtomicU8; TABLE_MAX / SMALL_MIN],
    /// Last, off the cache lines the fast paths read: huge allocations write these.
    huge: HugeCounters,
}

// SAFETY: see the invariant on `ProcessHeap`; every other field is atomic.
unsafe impl Sync for ProcessHeap {}

/// The process heap.
pub static HEAP: ProcessHeap = ProcessHeap::new();

/// The process heap once READY, as the front end sees it.
struct Ready<'a> {
    heap: &'a ProcessHeap,
    cfg: &'a Config,
}

impl Backend for Ready<'_> {
    type Source = OsSource;

    #[inline]
    fn source(&self) -> &OsSource {
        &SRC
    }
    #[inline]
    fn arena_count(&self) -> usize {
        self.cfg.count
    }
    #[inline]
    fn arena(&self, i: usize) -> &Arena<OsSource> {
        self.cfg.arena(i)
    }
    #[inline]
    fn current_arena(&self) -> usize {
        self.cfg.arena_index(os::current_cpu())
    }
    #[inline]
    fn mark(&self) -> usize {
        self.cfg.mark
    }
    fn huge_counters(&self) -> &HugeCounters {
        &self.heap.huge
    }
    fn alloc(&self, size: usize, align: usize) -> (*mut u8, bool) {
        self.heap.alloc(size, align)
    }
    unsafe fn free(&self, p: *mut u8) {
        // SAFETY: passed on from the caller.
        unsafe { self.heap.free(p) }
    }
    unsafe fn confirm_double_free(&self, p: *mut u8, what: Lookup, arena: u32, msg: &[u8]) {
        // SAFETY: passed on from the caller.
        unsafe {
            match what {
                Lookup::Small { run, .. } => {
                    ProcessHeap::confirm_double_free(self.cfg, p, what, arena, (*run).class(), msg)
                }
                Lookup::Large { .. } if self.cfg.caches.enabled => {
                    ProcessHeap::confirm_run_double_free(self.cfg, p, arena, msg)
                }
                _ => self
                    .cfg
                    .arena(arena as usize)
                    .confirm_double_free(&SRC, p, what, msg),
            }
        }
    }
    fn unmanaged(&self, p: *const u8) -> Option<usize> {
        BOOTSTRAP.0.readable_from(p)
    }
}

impl ProcessHeap {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(UNINIT),
            init_thread: AtomicUsize::new(0),
            init_pid: AtomicU32::new(0),
            classes: [const { AtomicU8::new(NOT_FAST) }; TABLE_MAX / SMALL_MIN],
            config: UnsafeCell::new(Config {
                arenas: ptr::null_mut(),
                count: 0,
                cpu_map: ptr::null(),
                cpu_map_len: 0,
                mark: 0,
                caches: Caches::disabled(),
                debug: false,
            }),
            huge: HugeCounters::new(),
        }
    }

    /// The configuration, initialising first if needed. `None` while this very thread is
    /// initialising (re-entry) or if initialisation failed.
    #[inline]
    fn config(&self) -> Option<&Config> {
        self.config_with(None)
    }

    /// For unit tests of the CPU caches: `self`'s configuration, with the calling thread
    /// pinned to the first core, and that core's rseq CPU id; `None` (having said why,
    /// naming `what`) without the caches or pinning.
    #[cfg(test)]
    fn pinned_for_test(&self, what: &str) -> Option<(&Config, usize)> {
        let cfg = self.config()?;
        let core = core_affinity::get_core_ids().and_then(|c| c.first().copied())?;
        if !cfg.caches.enabled || !core_affinity::set_for_current(core) {
            eprintln!("{what}: not tested (no rseq, or no pinning)");
            return None;
        }
        Some((cfg, init::rseq_cpu().expect("an rseq CPU id")))
    }

    /// [`config`](Self::config); should this call initialise the heap, with the builder's
    /// settings `ov`.
    #[inline]
    fn config_with(&self, ov: Option<&Overrides>) -> Option<&Config> {
        // Acquire: pairs with the Release store of READY, making `config` visible.
        if self.state.load(Ordering::Acquire) != READY && !self.init_slow(ov) {
            return None;
        }
        // SAFETY: READY was observed with Acquire (see the invariant on `ProcessHeap`).
        Some(unsafe { &*self.config.get() })
    }

    /// The front end's view of the heap, initialising first if needed.
    #[inline]
    fn ready(&self) -> Option<Ready<'_>> {
        self.config().map(|cfg| Ready { heap: self, cfg })
    }

    /// Whether small blocks go through the per-CPU caches (rseq is in use).
    pub fn fast_path(&self) -> bool {
        self.config().is_some_and(|c| c.caches.enabled)
    }

    /// The arena of the CPU the calling thread runs on now.
    pub fn current_arena(&self) -> usize {
        self.ready().map_or(0, |r| r.current_arena())
    }

    /// Number of arenas.
    pub fn arena_count(&self) -> usize {
        self.config().map_or(0, |c| c.count)
    }

    /// Everything but a small block from the caches. Out of line, so that the fast path
    /// (`fast.rs`) needs no registers saved. `ov`: the builder's settings, should this call
    /// initialise the heap.
    #[inline(never)]
    fn alloc_slow(&self, size: usize, align: usize, ov: Option<&Overrides>) -> (*mut u8, bool) {
        let Some(r) = self.config_with(ov).map(|cfg| Ready { heap: self, cfg }) else {
            return (self.alloc_bootstrap(size, align), true);
        };
        if r.cfg.debug {
            self.alloc_debug(&r, size, align)
        } else if size == 0 && r.cfg.caches.enabled {
            // C's malloc(0): the fast path takes sizes from 1 (`request_bound`). Here, not
            // in `alloc`, so that no other allocation tests for it (debug mode, above, keeps
            // the size asked: its guard bytes start there).
            self.alloc(1, align)
        } else if r.cfg.caches.enabled && request_bound(size, align) < SMALL_MAX && align <= PAGE {
            Self::alloc_large_class(r.cfg, class_for(size, align))
        } else if r.cfg.caches.enabled && size <= LARGE_MAX && align <= PAGE {
            Self::alloc_run_cached(&r, size, align)
        } else {
            front::alloc_locked(&r, size, align)
        }
    }

    /// Debug mode: a block with room for guard bytes and a trailer (see `debug.rs`).
    #[cold]
    #[inline(never)]
    fn alloc_debug(&self, r: &Ready, size: usize, align: usize) -> (*mut u8, bool) {
        let Some(n) = debug::inner_size(size) else {
            return (ptr::null_mut(), false);
        };
        let (p, _) = front::alloc_locked(r, n, align);
        if !p.is_null() {
            // SAFETY: `p` is a fresh block of `usable_size(p) >= n` bytes.
            unsafe { debug::on_alloc(p, size, front::usable_size(r, p), r.cfg.mark) };
        }
        (p, false)
    }

    /// Allocates `size` zeroed bytes aligned to `align`. A huge block clears only what a
    /// reused span may hold of old data (a fresh mapping reads zero).
    #[inline]
    pub fn alloc_zeroed(&self, size: usize, align: usize) -> *mut u8 {
        self.alloc_zeroed_with(size, align, None)
    }

    /// [`alloc_zeroed`](Self::alloc_zeroed); should this call initialise the heap, with the
    /// builder's settings `ov`.
    #[inline]
    pub(crate) fn alloc_zeroed_with(
        &self,
        size: usize,
        align: usize,
        ov: Option<&Overrides>,
    ) -> *mut u8 {
        if size > LARGE_MAX || align > LARGE_ALIGN_MAX {
            if let Some(r) = self
                .config_with(ov)
                .map(|cfg| Ready { heap: self, cfg })
                .filter(|r| !r.cfg.debug)
            {
                return front::alloc_huge_zeroed(&r, size, align);
            }
        }
        let (p, zero) = self.alloc_with(size, align, ov);
        if !p.is_null() && !zero {
            // SAFETY: `p` is a fresh block of at least `size` bytes.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
        p
    }

    /// Frees `p`, a block from this heap (or null). Aborts with a message naming `p` if it is
    /// not one.
    ///
    /// # Safety
    /// If `p` is a block of this heap, the caller gives up all use of it.
    #[inline]
    pub unsafe fn free(&self, p: *mut u8) {
        if p.is_null() {
            return;
        }
        let what = lookup(&SRC, p);
        match what {
            Lookup::Small { arena, run } if self.fast_path_ready() => {
                // SAFETY: the fast path is on, so the config is READY.
                let cfg = unsafe { &*self.config.get() };
                // SAFETY: `lookup` found a live small block of arena `arena` in run `run`
                // (a live run head), which the caller gives up.
                return unsafe { Self::free_small_fast(cfg, p, arena, (*run).class()) };
            }
            Lookup::Large { arena, run } if self.fast_path_ready() => {
                // SAFETY: the fast path is on, so the config is READY; `lookup` returns live
                // run heads.
                let (cfg, pages) = unsafe { (&*self.config.get(), (*run).npages as usize) };
                if pages * PAGE > SMALL_MAX {
                    // SAFETY: `lookup` found a live large block of arena `arena` longer than
                    // `SMALL_MAX`, which the caller gives up.
                    return unsafe { Self::free_run_fast(cfg, p, arena) };
                }
            }
            _ => {}
        }
        // SAFETY: passed on from the caller; `what` is `lookup(p)`.
        unsafe { self.free_locked(p, what) }
    }

    /// [`ProcessHeap::free`] without the caches.
    ///
    /// # Safety
    /// As for `free`, and `what == lookup(p)`.
    unsafe fn free_locked(&self, p: *mut u8, what: Lookup) {
        if matches!(what, Lookup::Invalid) && BOOTSTRAP.0.contains(p) {
            return;
        }
        // A block of a registered chunk implies READY: chunks are mapped only after it.
        let Some(r) = self.ready() else {
            report::invalid(&SRC, p, b"free(): invalid pointer")
        };
        if r.cfg.debug && !matches!(what, Lookup::Invalid) {
            let small = matches!(what, Lookup::Small { .. });
            let n = front::usable_size(&r, p);
            // SAFETY: `p` is a live block of `n` bytes.
            unsafe { debug::on_free(p, n, r.cfg.mark, b"free()", small) };
        }
        // SAFETY: passed on from the caller.
        unsafe { front::free_locked(&r, p, what, b"free(): invalid pointer") }
    }

    /// The usable size of block `p` (at least what was asked for; in debug mode exactly
    /// that, after checking the guard bytes). Aborts if `p` is not a block of this heap.
    pub fn usable_size(&self, p: *mut u8) -> usize {
        if p.is_null() {
            return 0;
        }
        let Some(r) = self.ready() else {
            // Before READY no chunk exists: a bootstrap block, or not ours.
            return match BOOTSTRAP.0.contains(p) {
                true => 0,
                false => report::invalid(&SRC, p, b"malloc_usable_size(): invalid pointer"),
            };
        };
        let n = front::usable_size(&r, p);
        if r.cfg.debug && n > 0 {
            // SAFETY: `usable_size` vouched for `p` (it aborts on anything else).
            return unsafe { debug::check(p, n, r.cfg.mark, b"malloc_usable_size()") };
        }
        n
    }

    /// Resizes `p` to `size` bytes aligned to `align`, in place when it can. Returns the
    /// block, or null (and `p` is untouched) when memory is exhausted. `exact` as for
    /// [`front::realloc`]: set by callers that free with [`ProcessHeap::free_sized`].
    ///
    /// # Safety
    /// `p` is null or a live block of this heap that the caller owns.
    pub unsafe fn realloc(&self, p: *mut u8, size: usize, align: usize, exact: bool) -> *mut u8 {
        if p.is_null() {
            return self.alloc(size, align).0;
        }
        let Some(r) = self.ready() else {
            // The initialising thread itself: only bootstrap blocks exist for it.
            let Some(n) = BOOTSTRAP.0.readable_from(p) else {
                report::invalid(&SRC, p, b"realloc(): invalid pointer")
            };
            let q = self.alloc_bootstrap(size, align);
            if !q.is_null() {
                // SAFETY: both are bootstrap blocks; we copy what can be read of `p`.
                unsafe { ptr::copy_nonoverlapping(p, q, n.min(size)) };
            }
            return q;
        };
        if r.cfg.debug && self.owns(p) {
            // SAFETY: `p` is a live block that the caller owns.
            return unsafe { self.realloc_debug(&r, p, size, align) };
        }
        // SAFETY: passed on from the caller.
        unsafe { front::realloc(&r, p, size, align, exact) }
    }

    /// Debug mode: checks the old block's guard, moves to a new block, frees the old one.
    ///
    /// # Safety
    /// `p` is a live block of this heap that the caller owns.
    #[cold]
    unsafe fn realloc_debug(&self, r: &Ready, p: *mut u8, size: usize, align: usize) -> *mut u8 {
        // SAFETY: by the contract.
        unsafe { front::confirm_not_freed(r, p, lookup(&SRC, p)) };
        let n = front::usable_size(r, p);
        // SAFETY: by the contract.
        let old = unsafe { debug::check(p, n, r.cfg.mark, b"realloc()") };
        let q = self.alloc(size, align).0;
        if !q.is_null() {
            // SAFETY: both blocks are live and distinct; we copy no more than either holds.
            unsafe {
                ptr::copy_nonoverlapping(p, q, old.min(size));
                self.free(p);
            }
        }
        q
    }

    /// The arena that owns `p`, if `p` is a live arena block of this heap.
    pub fn owner_arena(&self, p: *const u8) -> Option<usize> {
        self.ready().and_then(|r| front::owner_arena(&r, p))
    }

    /// Whether `p` is a live block of this heap (huge included).
    pub fn owns(&self, p: *const u8) -> bool {
        !matches!(lookup(&SRC, p), Lookup::Invalid)
    }

    /// Calls `f` with a snapshot of each arena's counters, its CPU caches' included, one
    /// arena at a time (no lock is held while `f` runs, so `f` may allocate).
    pub fn for_each_arena(&self, mut f: impl FnMut(ArenaStats)) {
        let Some(r) = self.ready() else { return };
        let cfg = r.cfg;
        front::for_each_arena(&r, |mut st| {
            let i = st.index;
            if cfg.caches.enabled {
                // Outbox entries name their owners and classes.
                for cpu in 0..cfg.caches.len() {
                    cfg.caches.peek_outbox(cpu, |_, class, owner| {
                        if owner == i && class < NUM_CLASSES {
                            st.cached[class] += 1;
                        }
                        true
                    });
                }
                // Blocks waiting in the arena's inbox (every one is the arena's).
                let mut count_owned = |q: usize| {
                    if let Lookup::Small { arena, run } = lookup(&SRC, q as *const u8) {
                        if arena as usize == i {
                            // SAFETY: `lookup` returns live run heads.
                            st.cached[unsafe { (*run).class() }] += 1;
                        }
                    }
                    true
                };
                cfg.caches.transfer(i).inbox.peek(&mut count_owned);
                st.cached_runs = Self::cached_run_bytes(cfg, i);
                // Chains parked in the arena's transfer slots, and its inbox.
                let transfer = cfg.caches.transfer(i);
                for (class, n) in st.cached.iter_mut().enumerate() {
                    for h in transfer.peek(class) {
                        *n += (h >> PTR_BITS) as u64;
                    }
                }
                st.remote_frees += transfer.returned();
                for cpu in (0..cfg.caches.len()).filter(|&c| cfg.caches.arena_of(c) == i) {
                    let (allocs, frees, cached) = cfg.caches.counters(cpu);
                    st.fast_allocs += allocs;
                    st.fast_frees += frees;
                    for (sum, n) in st.cached.iter_mut().zip(cached) {
                        *sum += n;
                    }
                }
            }
            f(st)
        });
    }

    /// Counters of huge blocks: (allocs, frees, bytes in use, bytes mapped).
    pub fn huge_counters(&self) -> (u64, u64, usize, usize) {
        self.huge.read()
    }

    /// The huge counters with the bytes of freed spans kept for reuse.
    fn huge_totals(&self) -> stats::HugeTotals {
        let (allocs, frees, in_use, mapped) = self.huge.read();
        (allocs, frees, in_use, mapped, SRC.cached_span_bytes())
    }

    /// Verifies every arena's invariants.
    pub fn check(&self) -> Result<(), &'static str> {
        self.ready().map_or(Ok(()), |r| front::check(&r))
    }

    /// Returns every cached block to its arena, pending frees to their runs and every unused
    /// dirty page to the OS: each CPU's caches and outbox (the calling CPU's, then every
    /// other CPU's that holds a block, visited by moving the calling thread there, see
    /// [`Self::flush_other_cpus`]), then every chain parked in the transfer slots and every
    /// block in the inboxes, then the arenas.
    pub fn trim(&self) {
        if let Some(r) = self.ready() {
            let cfg = r.cfg;
            if cfg.caches.enabled {
                Self::flush_this_cpu(cfg);
                Self::flush_other_cpus(cfg);
                for i in 0..cfg.count {
                    Self::return_parked(cfg, i);
                }
            }
            front::trim(&r);
        }
    }

    /// Returns the current CPU's class lists to their arena and sends its outbox.
    fn flush_this_cpu(cfg: &Config) {
        for class in 0..NUM_CLASSES {
            Self::flush(cfg, class);
        }
        Self::flush_runs(cfg);
        Self::send_outbox(cfg);
    }

    /// Empties the caches of every other CPU that holds blocks. A CPU's lists can only be
    /// changed by code running on that CPU (their critical sections use plain stores), so
    /// the calling thread goes there: it pins itself to each such CPU in turn
    /// (`sched_setaffinity`, which migrates it before returning), empties that CPU's lists
    /// with the usual critical sections, and finally gets its own affinity back. A CPU the
    /// thread may not run on (outside its cpuset, offline) is skipped; so is everything
    /// if its affinity cannot be read. Correct wherever the thread actually runs: each
    /// critical section takes the lists of the CPU it runs on and says which.
    fn flush_other_cpus(cfg: &Config) {
        if init::rseq_cpu().is_none() {
            // No CPU id here (no rseq area): the sections would take nothing on any CPU.
            return;
        }
        let Some(saved) = os::cpu::thread_affinity() else {
            return;
        };
        let mut moved = false;
        for cpu in 0..cfg.caches.len() {
            if cfg.caches.holds_blocks(cpu) && os::cpu::move_to(cpu) {
                moved = true;
                Self::flush_this_cpu(cfg);
            }
        }
        if moved {
            os::cpu::restore_affinity(&saved);
        }
    }

    /// A snapshot of every arena's counters and of the huge blocks.
    pub fn stats(&self) -> Stats {
        let count = self.arena_count();
        // The peak after the walk, which returns pending frees (and publishes).
        let mut s = stats::collect(count, |f| self.for_each_arena(f), self.huge_totals(), 0);
        s.peak_in_use = self.peak_in_use();
        s
    }

    /// Writes the statistics as one JSON object to `fd` without allocating.
    pub fn write_json(&self, fd: i32) {
        let h = self.heading();
        stats::write_json(fd, h, |f| self.for_each_arena(f), self.huge_totals());
    }

    /// Writes the statistics report to `fd` without allocating.
    pub fn write_report(&self, fd: i32) {
        let h = self.heading();
        stats::write_report(fd, h, |f| self.for_each_arena(f), self.huge_totals());
    }

    /// The most bytes ever in use (see `Stats::peak_in_use`).
    pub fn peak_in_use(&self) -> usize {
        SRC.meter().map_or(0, |m| m.peak())
    }

    fn heading(&self) -> stats::Heading {
        stats::Heading {
            arenas: self.arena_count(),
            caches: self.fast_path(),
            peak_in_use: self.peak_in_use(),
        }
    }
}
