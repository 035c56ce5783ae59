//! Lazy initialisation of the process heap, and the bootstrap buffer that serves the
//! initialising thread meanwhile.
//!
//! No constructor runs before `main`: the first allocation in any thread moves `state` from
//! `UNINIT` to `INITING`, maps the arena table, CPU map and per-CPU caches in one mapping,
//! then publishes `READY` (or `FAILED`). Other threads wait for `READY`; the initialising
//! thread itself, should anything it calls allocate, is served from [`BOOTSTRAP`], whose
//! blocks are never freed. The fork and exit handlers are registered once, after `READY`.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::{Backoff, CachePadded};

use super::{fork, Config, ProcessHeap, FAILED, INITING, READY, UNINIT};
use crate::arena::Arena;
use crate::cpucache::Caches;
use crate::os;
use crate::settings::{self, Overrides, Settings, MAX_ARENAS};
use crate::size_class::{CLASS_TABLE, PAGE};
use crate::source::OsSource;

/// A bump buffer for allocations made by the initialising thread during initialisation.
///
/// Invariant: `used` only grows, and `buf[..used]` is handed out in disjoint pieces.
pub(super) struct Bootstrap {
    buf: UnsafeCell<[u8; BOOTSTRAP_SIZE]>,
    used: AtomicUsize,
}
const BOOTSTRAP_SIZE: usize = 64 * 1024;
// SAFETY: `used` hands out disjoint ranges of `buf` by compare-and-swap; nothing reads a
// range before it is handed out.
unsafe impl Sync for Bootstrap {}
#[repr(align(4096))]
pub(super) struct BootstrapAligned(pub(super) Bootstrap);
pub(super) static BOOTSTRAP: BootstrapAligned = BootstrapAligned(Bootstrap {
    buf: UnsafeCell::new([0; BOOTSTRAP_SIZE]),
    used: AtomicUsize::new(0),
});

impl Bootstrap {
    /// `size` bytes aligned to `align`, or null when the buffer is used up.
    pub(super) fn alloc(&self, size: usize, align: usize) -> *mut u8 {
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
    pub(super) fn contains(&self, p: *const u8) -> bool {
        // One compare: below the buffer wraps around to a huge offset.
        (p as usize).wrapping_sub(self.buf.get() as usize) < BOOTSTRAP_SIZE
    }

    /// For a pointer into the buffer, the bytes from it to the buffer's end (bootstrap
    /// blocks record no size).
    pub(super) fn readable_from(&self, p: *const u8) -> Option<usize> {
        self.contains(p)
            .then(|| self.buf.get() as usize + BOOTSTRAP_SIZE - p as usize)
    }
}

impl ProcessHeap {
    /// Initialises the heap, or waits for the thread that does. Returns whether it is
    /// READY; false for the initialising thread itself (re-entry) and after a failure.
    /// `ov`: the builder's settings, used if this call initialises (later ones are ignored).
    #[cold]
    #[inline(never)]
    pub(super) fn init_slow(&self, ov: Option<&Overrides>) -> bool {
        let backoff = Backoff::new();
        loop {
            match self
                .state
                .compare_exchange(UNINIT, INITING, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => {
                    self.init_pid.store(os::pid(), Ordering::Relaxed);
                    return self.initialise(ov);
                }
                Err(READY) => return true,
                Err(FAILED) => return false,
                Err(_) => {
                    if self.init_thread.load(Ordering::Relaxed) == os::thread_id() {
                        return false;
                    }
                    if backoff.is_completed() {
                        // The initialiser may be a thread of the parent of a `fork` made
                        // meanwhile: none finishes here, so this process starts over (what
                        // the parent had mapped stays mapped, unused).
                        // The compare-and-swap on the pid makes one thread of this
                        // process the new initialiser; 0 is a pid not yet recorded.
                        let pid = os::pid();
                        let init_pid = self.init_pid.load(Ordering::Relaxed);
                        if init_pid != 0
                            && init_pid != pid
                            && self
                                .init_pid
                                .compare_exchange(
                                    init_pid,
                                    pid,
                                    Ordering::Relaxed,
                                    Ordering::Relaxed,
                                )
                                .is_ok()
                        {
                            return self.initialise(ov);
                        }
                        os::yield_now();
                    } else {
                        backoff.snooze();
                    }
                }
            }
        }
    }

    /// Initialises the configuration and publishes READY (or FAILED).
    ///
    /// pre: the calling thread is the only initialiser: it moved `state` to INITING, or took
    /// `init_pid` over from a parent process's initialiser that does not exist here.
    fn initialise(&self, ov: Option<&Overrides>) -> bool {
        self.init_thread.store(os::thread_id(), Ordering::Relaxed);
        // The environment over the builder's settings over the defaults.
        let settings = settings::resolve(ov);
        // SAFETY: by the precondition we are the only writer.
        let ok = unsafe { init_config(&mut *self.config.get(), &settings) };
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
            fork::register_handlers(&settings);
        }
        ok
    }

    /// A block for the initialising thread, or null if initialisation failed.
    #[cold]
    pub(super) fn alloc_bootstrap(&self, size: usize, align: usize) -> *mut u8 {
        if self.state.load(Ordering::Acquire) == FAILED {
            return ptr::null_mut();
        }
        BOOTSTRAP.0.alloc(size.max(1), align.max(16))
    }
}

/// Computes the configuration from `settings`: the arena count, the arenas, the CPU map and
/// the caches, in one fresh mapping. False if it cannot be mapped.
fn init_config(cfg: &mut Config, settings: &Settings) -> bool {
    // The rseq area is looked up now, whatever the settings, while the process most likely
    // has one thread (not later from a signal handler).
    #[cfg(coreheap_rseq)]
    let _ = os::rseq::area_offset();
    let mut allowed = [0u64; 16];
    let ncpu = os::cpu_affinity(&mut allowed);
    crate::policy::set(
        settings
            .purge_ms
            .map_or(crate::policy::PURGE_MS, |ms| ms as u32),
        settings
            .dirty_max
            .map_or(crate::policy::DIRTY_MAX, |b| b as usize),
    );
    let count = settings.arenas.unwrap_or(ncpu).clamp(1, MAX_ARENAS);
    let possible = os::possible_cpus();
    let table = count * core::mem::size_of::<CachePadded<Arena<OsSource>>>();
    let debug = settings.debug;
    let fast = if debug || !settings.rseq {
        None
    } else {
        fast_path_wanted()
    };
    let caches_bytes = if fast.is_some() {
        Caches::table_bytes(possible, count)
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
        // SAFETY: slot `i` lies in the fresh zeroed mapping; CachePadded is repr(align)
        // around the arena, which sits at its start.
        unsafe { Arena::init_in_place(arenas.add(i).cast::<Arena<OsSource>>(), i as u32, debug) };
    }
    let map = (mem as usize + table + caches_bytes) as *mut u16;
    // Allowed CPUs take arenas in turn, so a process limited to CPUs 5 and 7 uses arenas 0
    // and 1; other ids (allowed later, or never) fall back to id % count.
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
        // SAFETY: the caches' part of the fresh mapping starts 128-byte aligned (the arena
        // slots are CachePadded) and is used by nothing else; `map` holds `possible` arena
        // indices below `count`; `rseq_off` came from glibc, which registered an area.
        cfg.caches = unsafe {
            Caches::init(
                (mem as usize + table) as *mut u8,
                (0..possible).map(|c| {
                    let a = map.add(c).read() as usize;
                    (a as u32, (*arenas.add(a)).key())
                }),
                count,
                rseq_off,
            )
        };
    }
    true
}

/// The calling thread's CPU id from its rseq area, if it has one.
#[inline]
pub(super) fn rseq_cpu() -> Option<usize> {
    #[cfg(coreheap_rseq)]
    return os::rseq::cpu_id();
    #[cfg(not(coreheap_rseq))]
    None
}

/// The rseq area offset if the per-CPU fast path can and may be used: a build with the
/// critical sections, an rseq area registered by glibc (none under `GLIBC_TUNABLES=
/// glibc.pthread.rseq=0`, on kernels before 4.18, or under valgrind), a CPU id in it for the
/// initialising thread (and no `COREHEAP_RSEQ=0`, which the caller tests). Decided once.
fn fast_path_wanted() -> Option<isize> {
    if !Caches::AVAILABLE {
        return None;
    }
    #[cfg(coreheap_rseq)]
    if os::rseq::cpu_id().is_some() {
        return os::rseq::area_offset();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A fork child inherits INITING from a parent whose initialiser does not exist in it:
    /// its first allocation must initialise afresh, not wait forever.
    #[test]
    fn a_fork_child_finishes_an_inherited_initialisation() {
        static H: ProcessHeap = ProcessHeap::new();
        // What the child of a fork made during the parent's initialisation sees.
        H.state.store(INITING, Ordering::Relaxed);
        H.init_thread.store(1, Ordering::Relaxed);
        H.init_pid
            .store(os::pid().wrapping_add(1), Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(H.init_slow(None)).unwrap());
        let ready = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("initialisation inherited from a fork hung");
        assert!(ready);
        assert_eq!(H.state.load(Ordering::Acquire), READY);
        assert_eq!(H.init_pid.load(Ordering::Relaxed), os::pid());
    }

    /// With a CPU's list budget spent, a list that must grow takes room back from lists
    /// that grew earlier and hold little now (lowered to their start limits by a critical
    /// section on that CPU), but not from one in use meanwhile, and the budget still holds.
    #[test]
    fn a_growing_list_takes_room_back_from_idle_ones() {
        use crate::cpucache::{limit, start_limit, CLASS_LISTS_BUDGET, STEAL_EVERY};
        use crate::size_class::{class_size, TABLE_CLASSES};
        static H: ProcessHeap = ProcessHeap::new();
        let Some((cfg, cpu)) = H.pinned_for_test("room taken back") else {
            return;
        };
        let all: usize = (0..TABLE_CLASSES).map(|c| limit(c) * class_size(c)).sum();
        if all <= CLASS_LISTS_BUDGET {
            // (`pow2-classes`: ten lists at their limits fit the budget, so none ever takes
            // room from another.)
            eprintln!("room taken back: not tested (every list fits the budget at its limit)");
            return;
        }
        let last = TABLE_CLASSES - 1;
        // Every other class grows until the budget is spent: rounds of grows over them all
        // until one changes no limit (all of them in use meanwhile, so no look for room
        // lowers any). Their lists stay empty.
        loop {
            let mut changed = false;
            for c in 0..last {
                let was = cfg.caches.limit_of(cpu, c);
                changed |= cfg.caches.grow(cpu, c) != was;
            }
            if !changed {
                break;
            }
        }
        let held = |c: usize| cfg.caches.limit_of(cpu, c) * class_size(c);
        let grown: Vec<usize> = (0..last)
            .filter(|&c| cfg.caches.limit_of(cpu, c) > start_limit(c))
            .collect();
        assert!(!grown.is_empty());
        let before = cfg.caches.limit_of(cpu, last);
        assert!(before < limit(last));
        // `last` keeps overflowing, and so does `kept`, one of the grown lists; the others sit
        // idle. A look for room comes every `STEAL_EVERY` grows the spare cannot pay for, and
        // leaves the lists in use since the one before alone: within two looks `last` grows.
        let kept = grown[0];
        let kept_limit = cfg.caches.limit_of(cpu, kept);
        let idle_limits: Vec<usize> = (0..last).map(|c| cfg.caches.limit_of(cpu, c)).collect();
        let mut after = before;
        for _ in 0..2 * STEAL_EVERY + 2 {
            cfg.caches.grow(cpu, kept);
            after = cfg.caches.grow(cpu, last);
            if after > before {
                break;
            }
        }
        assert!(after > before, "no room taken back ({before} -> {after})");
        assert!(
            cfg.caches.limit_of(cpu, kept) >= kept_limit,
            "a list in use was lowered"
        );
        assert!(
            (0..last).any(|c| c != kept && cfg.caches.limit_of(cpu, c) < idle_limits[c]),
            "no idle list was lowered"
        );
        let now: usize = (0..TABLE_CLASSES).map(held).sum();
        assert!(now <= CLASS_LISTS_BUDGET, "{now} bytes of limits");
    }
}
