//! `trim()` and `malloc_trim(0)` empty every CPU's caches, not only the caller's: blocks a
//! thread pinned to one core left in that core's lists and outbox are back in their runs
//! after a trim called from a thread on another core, and the caller's affinity is as it was.

use std::alloc::{alloc, dealloc, Layout};

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

/// The class of blocks of `size` bytes.
fn class_of(size: usize) -> usize {
    (0..coreheap::NUM_CLASSES)
        .find(|&c| coreheap::class_size(c) >= size)
        .unwrap()
}

/// Blocks of arena `arena` in caches (CPU lists, outboxes, transfer slots), per class.
fn cached(arena: usize) -> Vec<u64> {
    coreheap::stats().arenas[arena].cached.to_vec()
}

/// The calling thread's affinity, as the list of CPUs it may run on.
fn affinity() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the call writes only `set`.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        set
    };
    // SAFETY: `cpu` is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// A block address handed between threads.
#[derive(Clone, Copy)]
struct Blk(usize);

#[test]
fn trim_empties_other_cpus_caches() {
    // SAFETY: alarm has no preconditions; a hang kills the process instead of the CI job.
    unsafe { libc::alarm(60) };
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() < 2 || !coreheap::fast_path() {
        eprintln!("trim: not tested (one core or no rseq caches)");
        return;
    }
    let (c0, c1) = (cores[0], cores[1]);
    let small = Layout::from_size_align(64, 8).unwrap();
    // A class above 8 KiB where there is one (its lists hold one block); a page run with
    // `pow2-classes`, which no cache holds.
    let big = Layout::from_size_align(20 * 1024, 8).unwrap();
    // Blocks of the other core's arena freed here go to this core's outbox (1 KiB or less).
    let remote = Layout::from_size_align(720, 8).unwrap();
    for round in 0..2 {
        // Blocks of core 1's arena, to be freed on core 0.
        let (arena1, foreign) = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(c1));
            // SAFETY: non-zero size; freed once, on core 0.
            let v: Vec<Blk> = (0..20)
                .map(|_| Blk(unsafe { alloc(remote) } as usize))
                .collect();
            (coreheap::current_arena(), v)
        })
        .join()
        .unwrap();
        let arena0 = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(c0));
            // SAFETY: non-zero sizes; each block freed once, here.
            unsafe {
                let v: Vec<*mut u8> = (0..100).map(|_| alloc(small)).collect();
                let b = alloc(big);
                for p in v {
                    dealloc(p, small);
                }
                dealloc(b, big);
                for Blk(p) in foreign {
                    dealloc(p as *mut u8, remote);
                }
            }
            coreheap::current_arena()
        })
        .join()
        .unwrap();
        assert_ne!(arena0, arena1, "cores 0 and 1 share an arena");
        let (cs, cr) = (class_of(64), class_of(720));
        let before = (cached(arena0)[cs], cached(arena1)[cr]);
        assert!(
            before.0 >= 100 && before.1 >= 20,
            "blocks not cached on core 0: {before:?}"
        );
        std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(c1));
            let mine = affinity();
            if round == 0 {
                coreheap::trim();
            } else {
                coreheap::c_api::malloc_trim(0);
            }
            assert_eq!(affinity(), mine, "trim left the caller's affinity changed");
            // Core 0's caches hold nothing of its arena, and its outbox nothing of core 1's
            // (whose own lists this thread may refill: only the outbox class is counted).
            let left = cached(arena0);
            assert!(
                left.iter().all(|&n| n == 0),
                "round {round}: core 0's arena keeps cached blocks after a trim from core 1: \
                 {left:?}"
            );
            assert_eq!(
                cached(arena1)[cr],
                0,
                "round {round}: core 0's outbox kept core 1's blocks"
            );
        })
        .join()
        .unwrap();
    }
    coreheap::check_heap().unwrap();
}
