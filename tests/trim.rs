//! `trim()` and `malloc_trim(0)` empty every CPU's caches, not only the caller's: blocks a
//! thread pinned to one core left in that core's lists and outbox are back in their runs
//! after a trim called from a thread on another core, and the caller's affinity is as it was.

use std::alloc::{alloc, dealloc, Layout};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::FromRawFd;

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

/// The class of blocks of `size` bytes.
fn class_of(size: usize) -> usize {
    (0..coreheap::NUM_CLASSES)
        .find(|&c| coreheap::class_size(c) >= size)
        .unwrap()
}

/// Blocks in caches (CPU lists, outboxes, transfer slots) per arena and class. The snapshot
/// is written (`write_json`, into a memfd) before anything allocates: the statistics' own
/// allocations would refill the calling CPU's lists, which count as cached too.
fn cached_now() -> Vec<Vec<u64>> {
    // SAFETY: a static C string; no other precondition.
    let fd = unsafe { libc::memfd_create(c"trim-stats".as_ptr(), 0) };
    assert!(fd >= 0);
    coreheap::write_json(fd);
    // SAFETY: `fd` is ours, and handed to the File, which closes it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    text.split("{\"index\": ")
        .skip(1)
        .map(|arena| {
            let classes = &arena[arena.find("\"classes\": [").unwrap()..];
            let classes = &classes[..classes.find(']').unwrap()];
            classes
                .split("\"cached\": ")
                .skip(1)
                .map(|v| {
                    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().unwrap()
                })
                .collect()
        })
        .collect()
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
    // Blocks of the other core's arena freed here go to this core's outbox (1 KiB and less
    // go on to the owner's inbox when sent, the larger ones to its transfer slots).
    let remote = Layout::from_size_align(720, 8).unwrap();
    let remote_4k = Layout::from_size_align(4096, 8).unwrap();
    for round in 0..2 {
        // Blocks of core 1's arena, to be freed on core 0.
        let (arena1, foreign) = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(c1));
            let v: Vec<(Blk, Layout)> = (0..24)
                .map(|i| {
                    let l = if i < 20 { remote } else { remote_4k };
                    // SAFETY: non-zero sizes; freed once, on core 0.
                    (Blk(unsafe { alloc(l) } as usize), l)
                })
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
                for (Blk(p), l) in foreign {
                    dealloc(p as *mut u8, l);
                }
            }
            coreheap::current_arena()
        })
        .join()
        .unwrap();
        assert_ne!(arena0, arena1, "cores 0 and 1 share an arena");
        let (cs, cr, c4) = (class_of(64), class_of(720), class_of(4096));
        let before = cached_now();
        assert!(
            before[arena0][cs] >= 100 && before[arena1][cr] >= 20 && before[arena1][c4] >= 4,
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
            // Nothing is cached anywhere: not in core 0's lists and outbox, which only a
            // thread running there could change, nor in this core's.
            let left = cached_now();
            assert!(
                left.iter().flatten().all(|&n| n == 0),
                "round {round}: blocks stay cached after a trim from core 1: {left:?}"
            );
            assert_eq!(affinity(), mine, "trim left the caller's affinity changed");
        })
        .join()
        .unwrap();
    }
    coreheap::check_heap().unwrap();
}
