//! The process heap: the arena table, CPU routing, lazy initialisation, huge blocks, and the
//! entry points that `GlobalAlloc` and the C interface call.
//!
//! Initialisation is lazy and needs no constructor: the first allocation in any thread moves
//! `state` from `UNINIT` to `INITING`, maps the arena table, then publishes `READY`. Other
//! threads wait for `READY`; the initialising thread itself, should anything it calls
//! allocate, is served from a small static bootstrap buffer (whose blocks are never freed).
//! The fork handlers are registered once, right after `READY`.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crossbeam_utils::{Backoff, CachePadded};

use crate::arena::{
    describe, lookup, lookup_small, small_block_start, Arena, ArenaStats, Lookup, LARGE_ALIGN_MAX,
};
use crate::chunk::{chunk_of, page_index, Block, ChunkHeader, CHUNK_ARENA, CHUNK_HUGE, MAGIC};
use crate::cpucache::{batch, return_chain, take_batch, Caches, Push, OUTBOX, OUTBOX_MAX_BLOCK};
use crate::debug;
use crate::diag::{block_error, invalid_pointer, Line};
use crate::os;
use crate::remote::Batch;
use crate::size_class::{
    class_of, class_size, pages_for, request_bound, CHUNK, CLASS_TABLE, LARGE_MAX, PAGE, SMALL_MAX,
    SMALL_MIN, SMALL_MIN_SHIFT,
};
use crate::source::registry::REGISTRY;
use crate::source::OsSource;

/// What a double free is reported as.
const DOUBLE_FREE: &[u8] = b"free(): double free detected";

const UNINIT: u8 = 0;
const INITING: u8 = 1;
const READY: u8 = 2;
/// The arena table could not be mapped: every allocation fails (returns null).
const FAILED: u8 = 3;

/// Upper bound on `COREHEAP_ARENAS`.
pub const MAX_ARENAS: usize = 4096;

/// What initialisation computes; written once before `READY`, read-only after.
///
/// `repr(C)` with `caches` first, and first in [`Heap`] too: the fast paths hand the
/// critical sections `&HEAP.config.caches`, which is then `&HEAP` itself, no addition.
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

/// Counters of directly mapped blocks.
struct HugeCounters {
    allocs: AtomicU64,
    frees: AtomicU64,
    in_use: AtomicUsize,
    mapped: AtomicUsize,
}

/// The process heap. There is one, [`HEAP`].
///
/// Invariant: `config` is written only by the thread that moved `state` to `INITING`, and
/// read only after `state == READY` (or a class in `classes`, stored after it) was observed
/// with Acquire ordering.
#[repr(C)]
pub struct Heap {
    /// First: see [`Config`].
    config: UnsafeCell<Config>,
    state: AtomicU8,
    init_thread: AtomicUsize,
    /// [`CLASS_TABLE`] once the fast path is on, [`NOT_FAST`] in every entry before (and
    /// for good when it stays off), so that the fast paths learn both the class and that
    /// they may run from one load (C `free` reads the first entry as the flag). Here so that
    /// they find it from `HEAP`'s address. Written
    /// only by the initialising thread, entry by entry with Release after `config` is
    /// complete (and READY stored); read with Acquire, so a class seen implies `config` is.
    classes: [AtomicU8; SMALL_MAX / SMALL_MIN],
    /// Last, off the cache lines the fast paths read: huge allocations write these.
    huge: HugeCounters,
}

// SAFETY: see the invariant on `Heap`; every other field is atomic.
unsafe impl Sync for Heap {}

/// The process heap.
pub static HEAP: Heap = Heap::new();

/// An entry of `Heap::classes` while the fast path is off.
const NOT_FAST: u8 = u8::MAX;

/// `r`, as a value the compiler must keep in a register. For `&HEAP`, whose address it
/// loads from the GOT: taking that address for a constant, it would rather load it again
/// after an `asm!` block than keep the register it had (one load more per operation).
#[inline(always)]
fn in_register<T>(r: &T) -> &T {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut p = r as *const T;
    // SAFETY: an empty instruction sequence: `p` comes out as it went in.
    // (The lint is for blocks that read through a pointer; this one only passes it on. Only
    // on x86_64, the one architecture with the fast paths: `asm!` is not stable on all.)
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::pointers_in_nomem_asm_block)]
    unsafe {
        core::arch::asm!(
            "/* {p} */",
            p = inout(reg) p,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    // SAFETY: `p` is `r`.
    unsafe { &*p }
}

const SRC: OsSource = OsSource;

/// A bump buffer for allocations made by the initialising thread during initialisation.
struct Bootstrap {
    buf: UnsafeCell<[u8; BOOTSTRAP_SIZE]>,
    used: AtomicUsize,
}
const BOOTSTRAP_SIZE: usize = 64 * 1024;
// SAFETY: `used` hands out disjoint ranges of `buf` by fetch_add; nothing reads a range
// before it is handed out.
unsafe impl Sync for Bootstrap {}
#[repr(align(4096))]
struct BootstrapAligned(Bootstrap);
static BOOTSTRAP: BootstrapAligned = BootstrapAligned(Bootstrap {
    buf: UnsafeCell::new([0; BOOTSTRAP_SIZE]),
    used: AtomicUsize::new(0),
});

impl Bootstrap {
    fn alloc(&self, size: usize, align: usize) -> *mut u8 {
        let base = self.buf.get() as usize;
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let start = (base + cur + align - 1) & !(align - 1);
            let end = start - base + size;
            if end > BOOTSTRAP_SIZE {
                return ptr::null_mut();
            }
            match self
                .used
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return start as *mut u8,
                Err(c) => cur = c,
            }
        }
    }

    #[inline]
    fn contains(&self, p: *const u8) -> bool {
        // One compare: below the buffer wraps around to a huge offset.
        (p as usize).wrapping_sub(self.buf.get() as usize) < BOOTSTRAP_SIZE
    }
}

impl Heap {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(UNINIT),
            init_thread: AtomicUsize::new(0),
            classes: [const { AtomicU8::new(NOT_FAST) }; SMALL_MAX / SMALL_MIN],
            config: UnsafeCell::new(Config {
                arenas: ptr::null_mut(),
                count: 0,
                cpu_map: ptr::null(),
                cpu_map_len: 0,
                mark: 0,
                caches: Caches::disabled(),
                debug: false,
            }),
            huge: HugeCounters {
                allocs: AtomicU64::new(0),
                frees: AtomicU64::new(0),
                in_use: AtomicUsize::new(0),
                mapped: AtomicUsize::new(0),
            },
        }
    }

    /// The configuration, initialising first if needed. `None` while this very thread is
    /// initialising (re-entry) or if initialisation failed.
    #[inline]
    fn config(&self) -> Option<&Config> {
        // Acquire: pairs with the Release store of READY, making `config` visible.
        if self.state.load(Ordering::Acquire) != READY && !self.init_slow() {
            return None;
        }
        // SAFETY: READY was observed with Acquire (see the invariant on `Heap`).
        Some(unsafe { &*self.config.get() })
    }

    #[cold]
    #[inline(never)]
    fn init_slow(&self) -> bool {
        let backoff = Backoff::new();
        loop {
            match self
                .state
                .compare_exchange(UNINIT, INITING, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => {
                    self.init_thread.store(os::thread_id(), Ordering::Relaxed);
                    // SAFETY: we moved the state to INITING, so we are the only writer.
                    let ok = unsafe { self.init_config(&mut *self.config.get()) };
                    // Release: publishes `config`.
                    self.state
                        .store(if ok { READY } else { FAILED }, Ordering::Release);
                    if ok {
                        // SAFETY: `config` was just published by READY and is read-only.
                        if unsafe { (*self.config.get()).caches.enabled } {
                            // Release: publishes `config` (and READY) to `fast_class` and
                            // `fast_path_ready`.
                            for (e, &c) in self.classes.iter().zip(CLASS_TABLE.iter()) {
                                e.store(c, Ordering::Release);
                            }
                        }
                        register_handlers();
                    }
                    return ok;
                }
                Err(READY) => return true,
                Err(FAILED) => return false,
                Err(_) => {
                    if self.init_thread.load(Ordering::Relaxed) == os::thread_id() {
                        return false;
                    }
                    if backoff.is_completed() {
                        // SAFETY: sched_yield has no preconditions.
                        unsafe { libc::sched_yield() };
                    } else {
                        backoff.snooze();
                    }
                }
            }
        }
    }

    fn init_config(&self, cfg: &mut Config) -> bool {
        let mut allowed = [0u64; 16];
        let ncpu = os::cpu_affinity(&mut allowed);
        let count = match os::env_usize(b"COREHEAP_ARENAS\0") {
            Some(n) if n >= 1 => n.min(MAX_ARENAS),
            _ => ncpu,
        };
        let possible = os::possible_cpus();
        let table = count * core::mem::size_of::<CachePadded<Arena<OsSource>>>();
        let debug = os::env_usize(b"COREHEAP_DEBUG\0").unwrap_or(0) > 0;
        let fast = if debug { None } else { fast_path_wanted() };
        let caches_bytes = if fast.is_some() {
            Caches::table_bytes(possible)
        } else {
            0
        };
        let map_bytes = possible * 2;
        let len = (table + caches_bytes + map_bytes).div_ceil(PAGE) * PAGE;
        let mem = os::map_anon(len);
        if mem.is_null() {
            return false;
        }
        let arenas = mem.cast::<CachePadded<Arena<OsSource>>>();
        for i in 0..count {
            // SAFETY: slot `i` lies in the fresh zeroed mapping; CachePadded is
            // repr(align) around the arena, which sits at its start.
            unsafe {
                Arena::init_in_place(arenas.add(i).cast::<Arena<OsSource>>(), i as u32, debug)
            };
        }
        let map = (mem as usize + table + caches_bytes) as *mut u16;
        // Allowed CPUs take arenas in turn, so a process limited to CPUs 5 and 7 uses arenas
        // 0 and 1; other ids (allowed later, or never) fall back to id % count.
        let mut next = 0;
        for cpu in 0..possible {
            let is_allowed = cpu < 1024 && allowed[cpu / 64] & (1 << (cpu % 64)) != 0;
            let a = if is_allowed {
                next += 1;
                (next - 1) % count
            } else {
                cpu % count
            };
            // SAFETY: `cpu < possible`, inside the map's part of the mapping.
            unsafe { map.add(cpu).write(a as u16) };
        }
        cfg.arenas = arenas;
        cfg.count = count;
        cfg.cpu_map = map;
        cfg.cpu_map_len = possible;
        cfg.mark = os::random_word() | 1;
        cfg.debug = debug;
        if let Some(rseq_off) = fast {
            // SAFETY: the caches' part of the fresh mapping starts 128-byte aligned (the
            // arena slots are CachePadded) and is used by nothing else; `map` holds
            // `possible` arena indices below `count`; `rseq_off` came from glibc, which
            // registered an area.
            cfg.caches = unsafe {
                Caches::init(
                    (mem as usize + table) as *mut u8,
                    (0..possible).map(|c| {
                        let a = map.add(c).read() as usize;
                        (a as u32, (*arenas.add(a)).key())
                    }),
                    rseq_off,
                )
            };
        }
        true
    }

    /// Whether small blocks go through the per-CPU caches (rseq is in use).
    pub fn fast_path(&self) -> bool {
        self.config().is_some_and(|c| c.caches.enabled)
    }

    #[inline]
    fn arena_index(cfg: &Config, cpu: usize) -> usize {
        if cpu < cfg.cpu_map_len {
            // SAFETY: `cpu` is below the map's length.
            unsafe { *cfg.cpu_map.add(cpu) as usize }
        } else {
            cpu % cfg.count
        }
    }

    #[inline]
    fn arena(cfg: &Config, i: usize) -> &Arena<OsSource> {
        debug_assert!(i < cfg.count);
        // SAFETY: `i < count` and the table lives for the rest of the process.
        unsafe { &*cfg.arenas.add(i) }
    }

    /// The arena of the CPU the calling thread runs on now.
    pub fn current_arena(&self) -> usize {
        match self.config() {
            Some(cfg) => Self::arena_index(cfg, os::current_cpu()),
            None => 0,
        }
    }

    /// Number of arenas.
    pub fn arena_count(&self) -> usize {
        self.config().map_or(0, |c| c.count)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two). Returns the block, or
    /// null, and whether it is known to read zero.
    #[inline(always)]
    pub fn alloc(&self, size: usize, align: usize) -> (*mut u8, bool) {
        let this = in_register(self);
        let bound = request_bound(size, align);
        let class = if bound < SMALL_MAX && align <= PAGE {
            // SAFETY: `bound < SMALL_MAX`.
            unsafe { this.fast_class(bound) }
        } else {
            None
        };
        if let Some(class) = class {
            // SAFETY: `fast_class` saw the fast path on, so the config is READY.
            let cfg = unsafe { &*this.config.get() };
            let Ok(b) = cfg.caches.pop(class) else {
                return Self::refill(cfg, class);
            };
            // SAFETY: the popped block is ours and at least 16 bytes long. Neither its encoded
            // link (which would help guess the arena's secret) nor the free mark may
            // survive into a live block.
            unsafe {
                (*b).link = 0;
                (*b).mark = 0;
            }
            return (b.cast(), false);
        }
        self.alloc_slow(size, align)
    }

    /// Everything but a small block from the caches. Out of line, so that the fast path
    /// above needs no registers saved.
    #[inline(never)]
    fn alloc_slow(&self, size: usize, align: usize) -> (*mut u8, bool) {
        let Some(cfg) = self.config() else {
            return (self.alloc_bootstrap(size, align), true);
        };
        if cfg.debug {
            self.alloc_debug(cfg, size, align)
        } else if size == 0 && cfg.caches.enabled {
            // C's malloc(0): the fast path takes sizes from 1 (`request_bound`). Here, not
            // in `alloc`, so that no other allocation tests for it (debug mode, above, keeps
            // the size asked: its guard bytes start there).
            self.alloc(1, align)
        } else {
            self.alloc_locked(cfg, size, align)
        }
    }

    /// Allocation without the per-CPU caches: the arena of the current CPU, or the OS.
    #[inline]
    fn alloc_locked(&self, cfg: &Config, size: usize, align: usize) -> (*mut u8, bool) {
        if size <= LARGE_MAX && align <= LARGE_ALIGN_MAX {
            let a = Self::arena(cfg, Self::arena_index(cfg, os::current_cpu()));
            a.alloc(&SRC, size.max(1), align)
        } else {
            (self.alloc_huge(size, align), true)
        }
    }

    /// Debug mode: a block with room for guard bytes and a trailer (see `debug.rs`).
    #[cold]
    #[inline(never)]
    fn alloc_debug(&self, cfg: &Config, size: usize, align: usize) -> (*mut u8, bool) {
        let Some(n) = debug::inner_size(size) else {
            return (ptr::null_mut(), false);
        };
        let (p, _) = self.alloc_locked(cfg, n, align);
        if !p.is_null() {
            // SAFETY: `p` is a fresh block of `usable_inner(p) >= n` bytes.
            unsafe { debug::on_alloc(p, size, self.usable_inner(p), cfg.mark) };
        }
        (p, false)
    }

    /// The heap's configuration if debug mode is on.
    #[inline]
    fn debug_config(&self) -> Option<&Config> {
        self.config().filter(|c| c.debug)
    }

    /// Allocates `size` zeroed bytes aligned to `align`.
    #[inline]
    pub fn alloc_zeroed(&self, size: usize, align: usize) -> *mut u8 {
        let (p, zero) = self.alloc(size, align);
        if !p.is_null() && !zero {
            // SAFETY: `p` is a fresh block of at least `size` bytes.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
        p
    }

    /// The current CPU's cache has no block of `class`: takes a batch from the CPU's arena
    /// under its lock, returns one and puts the rest in the cache.
    #[cold]
    #[inline(never)]
    fn refill(cfg: &Config, class: usize) -> (*mut u8, bool) {
        let Some(cpu) = rseq_cpu() else {
            // A thread without an rseq area (one not started by glibc, or before glibc
            // registered it): no cache can be filled for it.
            let a = Self::arena(cfg, Self::arena_index(cfg, os::current_cpu()));
            return a.alloc(&SRC, class_size(class), 1);
        };
        let a = Self::arena(cfg, Self::arena_index(cfg, cpu));
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
    fn flush(cfg: &Config, class: usize) {
        if let Some((cpu, chain)) = cfg.caches.take_all(class) {
            let a = Self::arena(cfg, cfg.caches.arena_of(cpu));
            // SAFETY: a chain taken off cache `cpu` is ours, and its blocks belong to the
            // cache's arena and are counted in use by their runs (module invariants).
            unsafe { return_chain(a, &SRC, chain) };
        }
    }

    #[cold]
    fn alloc_bootstrap(&self, size: usize, align: usize) -> *mut u8 {
        if self.state.load(Ordering::Acquire) == FAILED {
            return ptr::null_mut();
        }
        BOOTSTRAP.0.alloc(size.max(1), align.max(16))
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
                unsafe { Self::free_small_fast(cfg, p, arena, (*run).class()) }
            }
            Lookup::Small { arena, .. } | Lookup::Large { arena, .. } => {
                // A registered chunk implies READY: chunks are only mapped after init.
                let Some(cfg) = self.config() else { return };
                if cfg.debug {
                    let small = matches!(what, Lookup::Small { .. });
                    let n = self.usable_inner(p);
                    // SAFETY: `p` is a live block of `n` bytes.
                    unsafe { debug::on_free(p, n, cfg.mark, b"free()", small) };
                }
                let a = Self::arena(cfg, arena as usize);
                let local = Self::arena_index(cfg, os::current_cpu()) == arena as usize;
                // SAFETY: `lookup` found a live block of arena `arena`; the caller gives it up.
                unsafe { a.free(&SRC, p, what, cfg.mark, local) }
            }
            Lookup::Huge(h) => {
                if let Some(cfg) = self.debug_config() {
                    // SAFETY: `p` is a live block of `usable_inner(p)` bytes.
                    unsafe { debug::on_free(p, self.usable_inner(p), cfg.mark, b"free()", false) };
                }
                // SAFETY: `h` is the header of the live huge block `p`.
                unsafe { self.free_huge(h) }
            }
            Lookup::Invalid => self.free_foreign(p, b"free(): invalid pointer"),
        }
    }

    /// The class of a request whose [`request_bound`] is `bound`, if the fast path is on
    /// (one load, from `classes`); then `config` may be read.
    ///
    /// # Safety
    /// `bound < SMALL_MAX` (the index is not checked).
    #[inline(always)]
    unsafe fn fast_class(&self, bound: usize) -> Option<usize> {
        // SAFETY: `bound < SMALL_MAX`, so the index is below the table's length.
        let e = unsafe { self.classes.get_unchecked(bound >> SMALL_MIN_SHIFT) };
        // Acquire: pairs with the Release stores that follow READY.
        let c = e.load(Ordering::Acquire);
        (c != NOT_FAST).then_some(c as usize)
    }

    /// Whether the heap is READY with the fast path on (one load: the first entry of
    /// `classes`). When true, `config` may be read.
    #[inline(always)]
    fn fast_path_ready(&self) -> bool {
        // Acquire: pairs with the Release stores that follow READY.
        self.classes[0].load(Ordering::Acquire) != NOT_FAST
    }

    /// Frees `p` if it is a small block of at most a page, found from the block's own page
    /// ([`lookup_small`]), through the current CPU's cache; returns whether it did (false:
    /// nothing was done, and [`Heap::free`] handles every other case). Keeps errno: the path
    /// through the cache makes no system call, and the slower ones keep it themselves.
    ///
    /// # Safety
    /// As for [`Heap::free`], `p` not null.
    #[inline]
    pub unsafe fn free_small(&self, p: *mut u8) -> bool {
        let this = in_register(self);
        if !this.fast_path_ready() {
            return false;
        }
        let Some((arena, class)) = lookup_small(&SRC, p) else {
            return false;
        };
        // SAFETY: the fast path is on, so the config is READY.
        let cfg = unsafe { &*this.config.get() };
        // SAFETY: `lookup_small` found a block start in a small run of `arena` and `class`;
        // by the contract it is a live block the caller gives up (or a double free, which
        // the mark shows and `free_small_fast` reports).
        unsafe { Self::free_small_fast(cfg, p, arena, class) };
        true
    }

    /// Frees `p`, which the caller allocated (or last resized) with `size` and `align`, the
    /// way `GlobalAlloc::dealloc` is called. A small block of at most a page skips most of
    /// [`lookup`]: its class comes from the size (which `realloc` keeps exact: a small block
    /// stays in place only within its class, a large one only while it stays large) and is
    /// checked, with the block's alignment, against the block's own page descriptor (one
    /// load); its arena comes from its chunk's header. The chunk registry is not asked: a
    /// Rust `dealloc` gets only pointers this heap handed out, whose chunks stay mapped while
    /// in use (a double `dealloc` after the chunk was unmapped faults reading the header).
    /// Anything else, including a pointer whose page no longer belongs to a small run of
    /// that class (a double free after the run was released, a wrong layout), takes
    /// [`Heap::free`], which validates it fully.
    ///
    /// # Safety
    /// `p` is a live block of this heap that the caller gives up, last allocated or resized
    /// by this heap with `size` and `align` (a power of two).
    #[inline(always)]
    pub unsafe fn free_sized(&self, p: *mut u8, size: usize, align: usize) {
        let this = in_register(self);
        let bound = request_bound(size, align);
        // Both `size` and `align` at most a page, `size` not 0; then whether the fast path
        // is on.
        let class = if bound < PAGE {
            // SAFETY: `bound < PAGE < SMALL_MAX`.
            unsafe { this.fast_class(bound) }
        } else {
            None
        };
        if let Some(class) = class {
            if cfg!(debug_assertions) && BOOTSTRAP.0.contains(p) {
                // Never seen (see below); a debug build checks rather than assume.
                // SAFETY: by the contract.
                return unsafe { this.free_outlined(p) };
            }
            // SAFETY: the fast path is on, so the config is READY.
            let cfg = unsafe { &*this.config.get() };
            // SAFETY: `bound < PAGE`, so `class` is at most `class_of(PAGE)` (the table is
            // `class_of`, checked size by size in a unit test); said here so the compiler
            // drops `small_block_start`'s range tests.
            unsafe { core::hint::assert_unchecked(class <= class_of(PAGE)) };
            // `p` rounded down: a block of at most a page never starts a chunk (the header
            // does), so `chunk_of`'s step back for huge blocks is not needed.
            let h = (p as usize & !(CHUNK - 1)) as *const ChunkHeader;
            // SAFETY: by the contract `p` came from this heap's `alloc` once, and is not a
            // bootstrap block (those are handed out only to the initialising thread while it
            // initialises, which in a Rust program allocates nothing), so it lies in one of
            // our chunks; arena chunks stay mapped while any of their pages are in use, and
            // a double free after the chunk was unmapped faults here (documented). Page
            // descriptors are read through atomics; a huge block's chunk has another kind.
            // `magic` is not read: every chunk has one, and `kind` is a tag of its own.
            unsafe {
                if (*h).kind == CHUNK_ARENA
                    && (*h).pages[page_index(p)].is_small_of(class)
                    && small_block_start(p, class)
                {
                    // A block start of a small run of `class` of the chunk's arena, as
                    // `lookup` would say, and the caller gives it up.
                    return Self::free_small_fast(cfg, p, (*h).arena_index(), class);
                }
            }
        }
        // SAFETY: by the contract.
        unsafe { this.free_outlined(p) }
    }

    /// [`Heap::free`], out of line: the fallback of `free_sized`, which then needs no
    /// registers saved.
    ///
    /// # Safety
    /// As for `free`.
    #[inline(never)]
    unsafe fn free_outlined(&self, p: *mut u8) {
        // SAFETY: passed on from the caller.
        unsafe { self.free(p) }
    }

    /// Frees small block `p` of arena `arena` through the current CPU's cache.
    ///
    /// # Safety
    /// `cfg.caches.enabled`; `p` is a live small block of `arena` of class `class`, which
    /// the caller gives up.
    #[inline(always)]
    unsafe fn free_small_fast(cfg: &Config, p: *mut u8, arena: u32, class: usize) {
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
            Self::invalid(p, DOUBLE_FREE);
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
                        _ => Self::free_small_foreign(cfg, p, what, arena),
                    }
                }
                Push::Remote | Push::NoCache => Self::free_small_foreign(cfg, p, what, arena),
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
    unsafe fn confirm_double_free(
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
        unsafe { Self::arena(cfg, arena as usize).confirm_double_free(&SRC, p, what, msg) };
    }

    /// The current CPU's cache of `class` is full: return it to its arena, then `p`.
    ///
    /// # Safety
    /// As for `free_small_fast`, with the mark written.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_full(cfg: &Config, p: *mut u8, what: Lookup, arena: u32, class: usize) {
        Self::flush(cfg, class);
        // SAFETY: by the contract.
        unsafe { Self::arena(cfg, arena as usize).free_marked(&SRC, p, what, true) };
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
            unsafe { Self::free_small_foreign(cfg, p, what, arena) };
        }
    }

    /// Sends the current CPU's outbox: each block back to its owning arena, with one push
    /// onto the owner's pending stack per owner (for up to `GROUPS` owners; blocks of
    /// further owners are pushed one by one).
    #[cold]
    #[inline(never)]
    fn send_outbox(cfg: &Config) {
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
                let owner = Self::arena(cfg, arena as usize);
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
            unsafe { Self::arena(cfg, *owner).push_remote_batch(&SRC, batch) };
        }
    }

    /// `p` belongs to another arena than the current CPU's (or the thread has no rseq CPU
    /// id): the locked path, or the owner's pending stack.
    ///
    /// # Safety
    /// As for `free_small_full`.
    #[cold]
    #[inline(never)]
    unsafe fn free_small_foreign(cfg: &Config, p: *mut u8, what: Lookup, arena: u32) {
        let a = Self::arena(cfg, arena as usize);
        let local = Self::arena_index(cfg, os::current_cpu()) == arena as usize;
        // SAFETY: by the contract.
        unsafe { a.free_marked(&SRC, p, what, local) };
    }

    #[cold]
    fn free_foreign(&self, p: *mut u8, what: &[u8]) {
        if BOOTSTRAP.0.contains(p) {
            return;
        }
        Self::invalid(p, what)
    }

    /// Aborts for `p`, which is not a block coreheap handed out: if it points into one of
    /// coreheap's blocks, the message says so and names the block's arena and size.
    #[cold]
    fn invalid(p: *mut u8, what: &[u8]) -> ! {
        if let Some(inside) = describe(&SRC, p) {
            let mut l = Line::new();
            l.str(what).str(b": ").hex(p as usize);
            if inside.block {
                l.str(b" (inside a ")
                    .num(inside.size as u64)
                    .str(b"-byte block");
                if let Some(a) = inside.arena {
                    l.str(b" of arena ").num(a as u64);
                }
                l.str(b", not its start)\n");
            } else {
                l.str(b" (in free memory of arena ")
                    .num(inside.arena.unwrap_or(0) as u64)
                    .str(b": freed already?)\n");
            }
            os::fatal(l.as_bytes());
        }
        invalid_pointer(what, p)
    }

    /// The usable size of block `p` (at least what was asked for; in debug mode exactly
    /// that, after checking the guard bytes). Aborts if `p` is not a block of this heap.
    pub fn usable_size(&self, p: *mut u8) -> usize {
        let n = self.usable_inner(p);
        match self.debug_config() {
            // SAFETY: `usable_inner` vouched for `p` (it aborts on anything else).
            Some(cfg) if n > 0 => unsafe { debug::check(p, n, cfg.mark, b"malloc_usable_size()") },
            _ => n,
        }
    }

    /// The bytes the heap gave block `p`, debug trailer included.
    fn usable_inner(&self, p: *mut u8) -> usize {
        if p.is_null() {
            return 0;
        }
        match lookup(&SRC, p) {
            // SAFETY: `lookup` returned live run heads.
            Lookup::Small { run, .. } => class_size(unsafe { (*run).class() }),
            // SAFETY: as above.
            Lookup::Large { run, .. } => unsafe { (*run).npages as usize * PAGE },
            // SAFETY: `h` is the live huge header of `p`.
            Lookup::Huge(h) => unsafe { (*h).map_base + (*h).map_len - p as usize },
            Lookup::Invalid => {
                if BOOTSTRAP.0.contains(p) {
                    return 0;
                }
                Self::invalid(p, b"malloc_usable_size(): invalid pointer")
            }
        }
    }

    /// Resizes `p` to `size` bytes aligned to `align`, in place when it can. Returns the
    /// block, or null (and `p` is untouched) when memory is exhausted.
    ///
    /// With `exact` (for callers that free with [`Heap::free_sized`]) the block left has
    /// the class `size` maps to: a small block stays in place only within its class, and a
    /// large block that shrinks to a small size moves. Without it (the C interface) a small
    /// block also shrinks in place while at least a quarter of it stays in use.
    ///
    /// # Safety
    /// `p` is null or a live block of this heap that the caller owns.
    pub unsafe fn realloc(&self, p: *mut u8, size: usize, align: usize, exact: bool) -> *mut u8 {
        if p.is_null() {
            return self.alloc(size, align).0;
        }
        let aligned = p as usize & (align - 1) == 0;
        let what = lookup(&SRC, p);
        if let Lookup::Small { arena, run } | Lookup::Large { arena, run } = what {
            // A registered chunk implies READY.
            if let Some(cfg) = self.config() {
                // SAFETY: a live block of at least 16 bytes: its mark word is readable.
                if unsafe { (*p.cast::<Block>()).mark } == cfg.mark {
                    // SAFETY: `what` is `lookup(p)`; `run` is a live run head.
                    unsafe { self.confirm_not_freed(cfg, p, what, arena, run) };
                }
                if cfg.debug {
                    // SAFETY: `p` is a live block that the caller owns.
                    return unsafe { self.realloc_debug(cfg, p, size, align) };
                }
            }
        } else if let (Lookup::Huge(_), Some(cfg)) = (what, self.debug_config()) {
            // SAFETY: as above.
            return unsafe { self.realloc_debug(cfg, p, size, align) };
        }
        let old = match what {
            Lookup::Small { run, .. } => {
                // SAFETY: a live small run head.
                let class = unsafe { (*run).class() };
                let cs = class_size(class);
                let in_place = if exact {
                    class_of(if size > align { size } else { align }) == class
                } else {
                    size <= cs && (size > cs / 4 || cs == class_size(0))
                };
                if aligned && in_place {
                    return p;
                }
                cs
            }
            Lookup::Large { arena, run } => {
                if aligned && size <= LARGE_MAX && (!exact || size > SMALL_MAX || align > PAGE) {
                    if let Some(cfg) = self.config() {
                        let a = Self::arena(cfg, arena as usize);
                        // SAFETY: `run` heads the live large block `p`, which the caller owns.
                        if unsafe { a.resize_large(&SRC, run, size) } {
                            return p;
                        }
                    }
                }
                // SAFETY: as above.
                unsafe { (*run).npages as usize * PAGE }
            }
            Lookup::Huge(h) => {
                if aligned && size > LARGE_MAX {
                    // SAFETY: `h` is the live header of `p`, which the caller owns.
                    let q = unsafe { self.realloc_huge(h, size) };
                    if !q.is_null() {
                        return q;
                    }
                }
                // SAFETY: as above.
                unsafe { (*h).map_base + (*h).map_len - p as usize }
            }
            Lookup::Invalid => {
                if BOOTSTRAP.0.contains(p) {
                    // Bootstrap blocks have no recorded size: copy what can be read.
                    let end = BOOTSTRAP.0.buf.get() as usize + BOOTSTRAP_SIZE;
                    end - p as usize
                } else {
                    Self::invalid(p, b"realloc(): invalid pointer")
                }
            }
        };
        let q = self.alloc(size, align).0;
        if q.is_null() {
            return q;
        }
        // SAFETY: both blocks are live and distinct; we copy no more than either holds.
        unsafe {
            ptr::copy_nonoverlapping(p, q, old.min(size));
            self.free(p);
        }
        q
    }

    /// `realloc` of a block that carries the free mark: abort if it is free.
    ///
    /// # Safety
    /// `what` is `lookup(p)`, a small or large block of `arena` in run `run`.
    #[cold]
    unsafe fn confirm_not_freed(
        &self,
        cfg: &Config,
        p: *mut u8,
        what: Lookup,
        arena: u32,
        run: *mut crate::chunk::PageDesc,
    ) {
        const MSG: &[u8] = b"realloc(): invalid pointer (block already freed)";
        // SAFETY: as the contract says.
        unsafe {
            match what {
                Lookup::Small { .. } => {
                    Self::confirm_double_free(cfg, p, what, arena, (*run).class(), MSG)
                }
                _ => Self::arena(cfg, arena as usize).confirm_double_free(&SRC, p, what, MSG),
            }
        }
    }

    /// Debug mode: checks the old block's guard, moves to a new block, frees the old one.
    ///
    /// # Safety
    /// `p` is a live block of this heap that the caller owns.
    #[cold]
    unsafe fn realloc_debug(&self, cfg: &Config, p: *mut u8, size: usize, align: usize) -> *mut u8 {
        // SAFETY: by the contract.
        let old = unsafe { debug::check(p, self.usable_inner(p), cfg.mark, b"realloc()") };
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

    /// Maps a block of `size` bytes aligned to `align` directly from the OS.
    ///
    /// Layout: the block starts `off = max(PAGE, align)` bytes into a mapping aligned to
    /// `max(CHUNK, align)`; its header is at `chunk_of(block)`, which is the mapping's start
    /// when `off < CHUNK` and the chunk just below the block otherwise.
    #[cold]
    fn alloc_huge(&self, size: usize, align: usize) -> *mut u8 {
        if size > isize::MAX as usize - 2 * CHUNK || align > isize::MAX as usize / 4 {
            return ptr::null_mut();
        }
        let off = align.max(PAGE);
        let map_align = align.max(CHUNK);
        let len = off + pages_for(size) * PAGE;
        let base = os::map_aligned(len, map_align);
        if base.is_null() {
            return base;
        }
        let p = (base as usize + off) as *mut u8;
        let h = chunk_of(p) as *mut ChunkHeader;
        // SAFETY: `h` lies in the fresh mapping, at least a header's size before `p` or at
        // its start with `p` at least a page after it.
        unsafe { self.write_huge_header(h, base, len, p, size) };
        if !REGISTRY.insert(h as usize) {
            os::unmap(base, len);
            return ptr::null_mut();
        }
        self.huge.allocs.fetch_add(1, Ordering::Relaxed);
        self.huge.in_use.fetch_add(size, Ordering::Relaxed);
        self.huge.mapped.fetch_add(len, Ordering::Relaxed);
        p
    }

    /// # Safety
    /// `h` is writable for a header's first fields and belongs to the mapping `base..+len`.
    unsafe fn write_huge_header(
        &self,
        h: *mut ChunkHeader,
        base: *mut u8,
        len: usize,
        p: *mut u8,
        size: usize,
    ) {
        // SAFETY: by the contract.
        unsafe {
            (*h).kind = CHUNK_HUGE;
            (*h).arena = 0;
            (*h).map_base = base as usize;
            (*h).map_len = len;
            (*h).huge_ptr = p as usize;
            (*h).huge_size = size;
            (*h).magic = MAGIC;
        }
    }

    /// # Safety
    /// `h` is the header of a live huge block that the caller gives up.
    unsafe fn free_huge(&self, h: *mut ChunkHeader) {
        // SAFETY: by the contract the mapping is ours to unmap.
        unsafe {
            let (base, len, size) = ((*h).map_base, (*h).map_len, (*h).huge_size);
            REGISTRY.remove(h as usize);
            os::unmap(base as *mut u8, len);
            self.huge.frees.fetch_add(1, Ordering::Relaxed);
            self.huge.in_use.fetch_sub(size, Ordering::Relaxed);
            self.huge.mapped.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Resizes a huge block with `mremap`: in place if the kernel can, else by moving its
    /// pages (no copy) to a fresh reservation with the same alignment. Null on failure, with
    /// the block untouched.
    ///
    /// # Safety
    /// `h` is the header of a live huge block that the caller owns.
    unsafe fn realloc_huge(&self, h: *mut ChunkHeader, size: usize) -> *mut u8 {
        if size > isize::MAX as usize - 2 * CHUNK {
            return ptr::null_mut();
        }
        // SAFETY: by the contract the header and mapping are ours.
        unsafe {
            let (base, len, p, old) = ((*h).map_base, (*h).map_len, (*h).huge_ptr, (*h).huge_size);
            let off = p - base;
            let new_len = off + pages_for(size) * PAGE;
            if new_len == len || os::remap_in_place(base as *mut u8, len, new_len) {
                (*h).map_len = new_len;
                (*h).huge_size = size;
            } else {
                let map_align = if off >= CHUNK { off } else { CHUNK };
                let target = os::reserve_aligned(new_len, map_align);
                if target.is_null() {
                    return ptr::null_mut();
                }
                if !os::move_mapping(base as *mut u8, len, new_len, target) {
                    os::unmap(target, new_len);
                    return ptr::null_mut();
                }
                REGISTRY.remove(h as usize);
                let q = target as usize + off;
                let nh = chunk_of(q as *const u8) as *mut ChunkHeader;
                self.write_huge_header(nh, target, new_len, q as *mut u8, size);
                REGISTRY.insert(nh as usize);
                self.huge.mapped.fetch_add(new_len, Ordering::Relaxed);
                self.huge.mapped.fetch_sub(len, Ordering::Relaxed);
                self.huge.in_use.fetch_add(size, Ordering::Relaxed);
                self.huge.in_use.fetch_sub(old, Ordering::Relaxed);
                return q as *mut u8;
            }
            self.huge.mapped.fetch_add(new_len, Ordering::Relaxed);
            self.huge.mapped.fetch_sub(len, Ordering::Relaxed);
            self.huge.in_use.fetch_add(size, Ordering::Relaxed);
            self.huge.in_use.fetch_sub(old, Ordering::Relaxed);
            p as *mut u8
        }
    }

    /// The arena that owns `p`, if `p` is a live arena block of this heap.
    pub fn owner_arena(&self, p: *const u8) -> Option<usize> {
        match lookup(&SRC, p) {
            Lookup::Small { arena, .. } | Lookup::Large { arena, .. } => Some(arena as usize),
            _ => None,
        }
    }

    /// Whether `p` is a live block of this heap (huge included).
    pub fn owns(&self, p: *const u8) -> bool {
        !matches!(lookup(&SRC, p), Lookup::Invalid)
    }

    /// Calls `f` with a snapshot of each arena's counters, one arena at a time (no lock is
    /// held while `f` runs, so `f` may allocate).
    pub fn for_each_arena(&self, mut f: impl FnMut(ArenaStats)) {
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                let mut st = Self::arena(cfg, i).stats(&SRC);
                if cfg.caches.enabled {
                    // Outbox blocks count against their owners, found by their headers.
                    let small = |q: usize, _: usize| {
                        matches!(lookup(&SRC, q as *const u8), Lookup::Small { .. })
                    };
                    for cpu in 0..cfg.caches.len() {
                        cfg.caches.walk(
                            cpu,
                            OUTBOX,
                            |q| {
                                if let Lookup::Small { arena, run } = lookup(&SRC, q as *const u8) {
                                    if arena as usize == i {
                                        // SAFETY: `lookup` returns live run heads.
                                        st.cached[unsafe { (*run).class() }] += 1;
                                    }
                                }
                                true
                            },
                            &small,
                        );
                    }
                    for cpu in (0..cfg.caches.len()).filter(|&c| cfg.caches.arena_of(c) == i) {
                        let (allocs, frees, cached) = cfg.caches.counters(cpu);
                        st.fast_allocs += allocs;
                        st.fast_frees += frees;
                        for (sum, n) in st.cached.iter_mut().zip(cached) {
                            *sum += n;
                        }
                    }
                }
                f(st);
            }
        }
    }

    /// Counters of directly mapped blocks: (allocs, frees, bytes in use, bytes mapped).
    pub fn huge_counters(&self) -> (u64, u64, usize, usize) {
        (
            self.huge.allocs.load(Ordering::Relaxed),
            self.huge.frees.load(Ordering::Relaxed),
            self.huge.in_use.load(Ordering::Relaxed),
            self.huge.mapped.load(Ordering::Relaxed),
        )
    }

    /// Verifies every arena's invariants.
    pub fn check(&self) -> Result<(), &'static str> {
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                Self::arena(cfg, i).check(&SRC)?;
            }
        }
        Ok(())
    }

    /// Returns pending frees to their runs and every unused dirty page to the OS.
    /// The calling CPU's caches go back to their arena and its outbox to the owners first
    /// (other CPUs' caches cannot be reached without their cooperation; they hold at most
    /// ~222 KiB each, and 32 KiB of outbox).
    pub fn trim(&self) {
        if let Some(cfg) = self.config() {
            if cfg.caches.enabled {
                for class in 0..crate::size_class::NUM_CLASSES {
                    Self::flush(cfg, class);
                }
                Self::send_outbox(cfg);
            }
            for i in 0..cfg.count {
                Self::arena(cfg, i).trim(&SRC);
            }
        }
    }

    /// Lock order at fork: glibc's stdio list lock, then the arenas in index order.
    fn fork_prepare(&self) {
        os::stdio_list_lock();
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                Self::arena(cfg, i).fork_lock(&SRC);
            }
        }
    }

    fn fork_parent(&self) {
        if let Some(cfg) = self.config() {
            for i in (0..cfg.count).rev() {
                Self::arena(cfg, i).fork_unlock(&SRC);
            }
        }
        os::stdio_list_unlock();
    }

    fn fork_child(&self) {
        // The initialising thread, if any was recorded, does not exist here.
        self.init_thread.store(0, Ordering::Relaxed);
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                // SAFETY: the child of fork: only this thread exists, and process arenas'
                // locks are on no robust list.
                unsafe { Self::arena(cfg, i).fork_reinit() };
            }
        }
        os::stdio_list_reset();
    }

    /// Writes the statistics report to `fd` without allocating.
    pub fn write_report(&self, fd: i32) {
        crate::stats::write_report(self, fd);
    }
}

unsafe extern "C" fn atfork_prepare() {
    HEAP.fork_prepare();
}
unsafe extern "C" fn atfork_parent() {
    HEAP.fork_parent();
}
unsafe extern "C" fn atfork_child() {
    HEAP.fork_child();
}

/// Where the exit report goes: a private copy of stderr, taken when the report was asked for,
/// because programs may close stderr in their own exit handlers (coreutils does) before ours
/// run.
static REPORT_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(2);

extern "C" fn report_at_exit() {
    HEAP.write_report(REPORT_FD.load(Ordering::Relaxed));
}

/// `COREHEAP_CHECK=1`: verifies every arena at exit; a violation aborts with its name.
extern "C" fn check_at_exit() {
    let mut l = Line::new();
    match HEAP.check() {
        Ok(()) => {
            l.str(b"coreheap: heap check at exit: ok (")
                .num(HEAP.arena_count() as u64)
                .str(b" arenas)\n");
            l.write(REPORT_FD.load(Ordering::Relaxed));
        }
        Err(e) => {
            l.str(b"coreheap: heap check at exit failed: ")
                .str(e.as_bytes())
                .str(b"\n");
            os::fatal(l.as_bytes());
        }
    }
}

/// Registers the fork handlers (and the exit report, if asked for) once per process.
fn register_handlers() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    if !os::register_atfork(atfork_prepare, atfork_parent, atfork_child) {
        let mut l = Line::new();
        l.str(b"coreheap: pthread_atfork failed; fork may deadlock\n");
        l.write(2);
    }
    let stats = os::env_usize(b"COREHEAP_STATS\0").unwrap_or(0) > 0;
    let check = os::env_usize(b"COREHEAP_CHECK\0").unwrap_or(0) > 0;
    if stats || check {
        // A high descriptor number keeps out of the way of programs that pick small ones.
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 500) };
        if fd >= 0 {
            REPORT_FD.store(fd, Ordering::Relaxed);
        }
        // SAFETY: both are plain functions that live for the whole program. atexit runs
        // them in reverse: the check first, then the report.
        unsafe {
            if stats {
                libc::atexit(report_at_exit);
            }
            if check {
                libc::atexit(check_at_exit);
            }
        }
    }
}

/// The calling thread's CPU id from its rseq area, if it has one.
#[inline]
fn rseq_cpu() -> Option<usize> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    return os::rseq::cpu_id();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    None
}

/// The rseq area offset if the per-CPU fast path can and may be used: a build with the
/// critical sections, an rseq area registered by glibc (none under `GLIBC_TUNABLES=
/// glibc.pthread.rseq=0`, on kernels before 4.18, or under valgrind), a CPU id in it for the
/// initialising thread, and no `COREHEAP_RSEQ=0` in the environment. Decided once.
fn fast_path_wanted() -> Option<isize> {
    if !Caches::AVAILABLE || os::env_usize(b"COREHEAP_RSEQ\0") == Some(0) {
        return None;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    if os::rseq::cpu_id().is_some() {
        return os::rseq::area_offset();
    }
    None
}
