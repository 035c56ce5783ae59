//! The rseq fast path (per-CPU caches): that it is taken exactly when rseq is usable, and
//! that threads migrated between CPUs while they allocate and free lose or duplicate no
//! block.
//!
//! A plain `main` (`harness = false`): the migration test compares the heap's bytes in use
//! before and after, which needs a process with no other threads allocating. A watchdog
//! fails the run if it hangs.

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use std::sync::Mutex;

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

const CHILD_VAR: &str = "COREHEAP_FASTPATH_CHILD";

fn main() {
    match std::env::var(CHILD_VAR).as_deref() {
        Ok("double") => double_dealloc_child(),
        Ok("double-released") => double_dealloc_released_child(),
        Ok("corrupt-link") => corrupt_link_child(),
        Ok("double-parked") => double_dealloc_parked_child(),
        Ok("double-unmapped") => double_dealloc_unmapped_child(),
        Ok("double-large") => double_dealloc_large_child(false),
        Ok("double-large-flushed") => double_dealloc_large_child(true),
        Ok("double-run") => double_dealloc_run_child(),
        Ok("double-remote-large") => double_dealloc_remote_large_child(),
        Ok("double-inbox") => double_dealloc_inbox_child(64, 200),
        Ok("double-outbox-4k") => double_dealloc_inbox_child(4096, 40),
        // Ten blocks: all still in the freeing CPU's outbox, unsent.
        Ok("double-outbox") => double_dealloc_inbox_child(64, 10),
        Ok(_) => {
            counter_child();
            return;
        }
        Err(_) => {}
    }
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(240));
        eprintln!("fastpath: hung for 240 s, failing");
        std::process::exit(1);
    });
    fast_path_taken_only_with_rseq();
    double_dealloc_aborts();
    corrupt_link_aborts();
    transfer_slots_move_whole_chains();
    large_classes_are_cached_counted_and_trimmed();
    run_slots_cache_count_and_trim();
    large_remote_frees_park_with_their_owner();
    realloc_keeps_the_class_that_dealloc_computes();
    c_free_takes_every_path();
    migrated_threads_lose_and_duplicate_nothing();
    eprintln!("fastpath: all tests passed");
}

/// The child: small pairs, then a report of what the heap saw.
fn counter_child() {
    let layout = Layout::from_size_align(64, 8).unwrap();
    for i in 0..10_000u32 {
        // SAFETY: non-zero size; the block is freed with its layout.
        // (`black_box`: the compiler may remove an allocation nobody reads, and with it
        // what this counts.)
        unsafe {
            let p = std::hint::black_box(alloc(layout));
            assert!(!p.is_null());
            p.write(i as u8);
            dealloc(std::hint::black_box(p), layout);
        }
    }
    let stats = coreheap::stats();
    let fast: u64 = stats.arenas.iter().map(|a| a.fast_allocs).sum();
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    let registered = coreheap::rseq_registered();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    let registered = false;
    println!(
        "registered={} fast_path={} fast_allocs={}",
        registered as u8,
        coreheap::fast_path() as u8,
        fast
    );
}

/// The child: frees one small block twice through `GlobalAlloc::dealloc` (the sized path),
/// with other blocks of its class freed in between. Must not return.
fn double_dealloc_child() -> ! {
    let layout = Layout::from_size_align(48, 8).unwrap();
    // SAFETY: deliberately wrong: `p` is deallocated twice, which coreheap must detect.
    unsafe {
        let p = alloc(layout);
        let others: Vec<*mut u8> = (0..5).map(|_| alloc(layout)).collect();
        println!("block={p:p}");
        dealloc(p, layout);
        for q in others {
            dealloc(q, layout);
        }
        dealloc(p, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// The child: a thread pinned to one core allocates 1024 blocks of one class, frees them
/// all and trims (so their runs go back to the page heap, and their pages to the OS), then
/// frees the first block again. Must not return.
fn double_dealloc_released_child() -> ! {
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    // 64 bytes: 1024 blocks fill exactly four 16 KiB runs with either class scheme, so the
    // run kept on its bin when all are empty is not the first one's.
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: deliberately wrong: `blocks[0]` is deallocated twice, which coreheap must
    // detect although its run is gone.
    unsafe {
        let blocks: Vec<*mut u8> = (0..1024).map(|_| alloc(layout)).collect();
        for &q in &blocks {
            dealloc(q, layout);
        }
        coreheap::trim();
        let p = blocks[0];
        println!("block={p:p} released={}", !coreheap::owns(p) as u8);
        dealloc(p, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// The child: a thread pinned to one core allocates blocks of one class over more chunks
/// than an arena keeps as spares, frees them all in order and trims, so that the chunks
/// emptied after the spares go back to the OS (the last one may still hold its bin's kept
/// run); then frees a block of the chunk before the last again through
/// the sized path, which reads the chunk's header without the registry test. Must not
/// return (and must not fault: the chunk is gone, its address space retired).
fn double_dealloc_unmapped_child() -> ! {
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    let layout = Layout::from_size_align(64, 8).unwrap();
    // Eight chunks' worth of 64-byte blocks (4 MiB chunks): more than the four spares.
    let n = 8 * (coreheap::CHUNK / 64);
    // SAFETY: deliberately wrong: the last block is deallocated twice, which coreheap must
    // detect although its chunk was given back.
    unsafe {
        let blocks: Vec<*mut u8> = (0..n).map(|_| alloc(layout)).collect();
        assert!(blocks.iter().all(|p| !p.is_null()));
        for &q in &blocks {
            dealloc(q, layout);
        }
        coreheap::trim();
        let unmapped: u64 = coreheap::stats()
            .arenas
            .iter()
            .map(|a| a.pages.chunks_unmapped)
            .sum();
        // A chunk holds fewer than CHUNK / 64 blocks (its header, run tails): this one lies
        // in the chunk before the last, or the one before that.
        let p = blocks[n - coreheap::CHUNK / 64 - coreheap::CHUNK / 128];
        println!("block={p:p} chunks_unmapped={unmapped}");
        dealloc(p, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// The child: a thread pinned to one core frees 400 blocks of one class, so that its CPU
/// list overflows and the older halves are parked in the arena's transfer slots, then frees
/// the first block (parked by then) again. Must not return.
fn double_dealloc_parked_child() -> ! {
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: deliberately wrong: `blocks[0]` is deallocated twice, which coreheap must
    // detect while the block waits in a transfer slot.
    unsafe {
        let blocks: Vec<*mut u8> = (0..400).map(|_| alloc(layout)).collect();
        for &q in &blocks {
            dealloc(q, layout);
        }
        let p = blocks[0];
        println!("block={p:p}");
        dealloc(p, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// The child: a thread pinned to one core frees a block of a class above 8 KiB (100 KiB:
/// a CPU list holds one) and frees it again, found in the CPU's list; with `flushed`, it
/// first frees another block of that class, which finds the list full and goes back to its
/// run (and the run to the page heap), and frees that one again. Must not return.
fn double_dealloc_large_child(flushed: bool) -> ! {
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    let layout = Layout::from_size_align(100_000, 8).unwrap();
    // SAFETY: deliberately wrong: a block is deallocated twice, which coreheap must detect.
    unsafe {
        let p = alloc(layout);
        let q = alloc(layout);
        dealloc(p, layout);
        let twice = if flushed {
            dealloc(q, layout);
            q
        } else {
            p
        };
        println!("block={twice:p}");
        dealloc(twice, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// The child: a thread pinned to one core frees a 1 MiB block (a page run, which waits in
/// the CPU's run slot) and frees it again. Must not return.
fn double_dealloc_run_child() -> ! {
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    // SAFETY: deliberately wrong: a block is deallocated twice, which coreheap must detect.
    unsafe {
        let p = alloc(layout);
        dealloc(p, layout);
        println!("block={p:p}");
        dealloc(p, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// Runs `f` on a thread pinned to the first core, then pins the calling thread to the last
/// one, and returns what `f` returned (blocks allocated on one core, to free on another).
fn on_first_then_last_core<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (first, last) = (cores.first().copied(), cores.last().copied());
    let r = std::thread::spawn(move || {
        if let Some(c) = first {
            core_affinity::set_for_current(c);
        }
        f()
    })
    .join()
    .unwrap();
    if let Some(c) = last {
        core_affinity::set_for_current(c);
    }
    r
}

/// The child: a block of a large class (100 KiB) allocated on the first core is freed twice
/// on the last one, whose outbox holds it after the first free. Must not return.
fn double_dealloc_remote_large_child() -> ! {
    let layout = Layout::from_size_align(100_000, 8).unwrap();
    // SAFETY: non-zero size.
    let p = on_first_then_last_core(move || unsafe { alloc(layout) as usize });
    println!("block={:p}", p as *mut u8);
    // SAFETY: deliberately wrong: a block is deallocated twice, which coreheap must detect.
    unsafe {
        dealloc(p as *mut u8, layout);
        dealloc(p as *mut u8, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// The child: `n` blocks of `size` bytes allocated on the first core are freed on the last,
/// whose outbox sends them to their arena (64 B: to its inbox 64 at a time; 4 KiB: joined to
/// chains parked in its transfer slots, 16 at a time; fewer than a full outbox: not yet);
/// then the first block (waiting there, or still in the outbox, no core of its arena having
/// allocated since) is freed again. Must not return. (With one
/// core, or one arena, the blocks are in that CPU's own lists instead: a double free either
/// way.)
fn double_dealloc_inbox_child(size: usize, n: usize) -> ! {
    let layout = Layout::from_size_align(size, 8).unwrap();
    let blocks = on_first_then_last_core(move || {
        (0..n)
            // SAFETY: non-zero size.
            .map(|_| unsafe { alloc(layout) } as usize)
            .collect::<Vec<_>>()
    });
    let p = blocks[0] as *mut u8;
    // SAFETY: deliberately wrong: `p` is deallocated twice, which coreheap must detect.
    unsafe {
        for &b in &blocks {
            dealloc(b as *mut u8, layout);
        }
        println!("block={p:p}");
        dealloc(p, layout);
    }
    println!("second dealloc returned");
    std::process::exit(0);
}

/// Large blocks above the largest class (page runs of up to 2 MiB) go through the CPU's run
/// slots: freed and allocated again on one core they come back without the arena's lock
/// (counted as fast allocations), a run too short or too long for a request is not handed
/// out for it but goes back to the arena, the statistics count the runs waiting in the
/// slots as cached, not in use, and `trim` on that core empties the slots.
fn run_slots_cache_count_and_trim() {
    if !coreheap::fast_path() {
        eprintln!("fastpath: run slots not tested (no rseq)");
        return;
    }
    let Some(core) = core_affinity::get_core_ids().and_then(|c| c.last().copied()) else {
        return;
    };
    std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(core));
        let arena = coreheap::current_arena();
        let in_use = || coreheap::stats().arenas[arena].in_use();
        let cached = || coreheap::stats().arenas[arena].cached_runs;
        let fast = || coreheap::stats().arenas[arena].fast_allocs;
        let mib = Layout::from_size_align(1 << 20, 8).unwrap();
        let before = in_use();
        // SAFETY: non-zero sizes; every block freed once with its layout.
        // (`black_box`: in a release build the compiler may remove an allocation nobody
        // reads, and with it what this counts.)
        unsafe {
            let p = std::hint::black_box(alloc(mib));
            assert!(!p.is_null());
            p.write_bytes(1, mib.size());
            dealloc(std::hint::black_box(p), mib);
            assert_eq!(in_use(), before, "a run in a slot counted as in use");
            assert!(cached() >= 1 << 20, "nothing cached after the free");
            // Too long for 600 KiB (it would waste more than a quarter), too short for
            // 1.5 MiB: neither takes the cached run, which goes back to the arena (its pages
            // may serve the request) rather than stay where requests pass it over.
            for size in [600 << 10, 3 << 19] {
                let l = Layout::from_size_align(size, 8).unwrap();
                let q = alloc(l);
                assert!(!q.is_null());
                assert_eq!(
                    coreheap::usable_size(q),
                    size,
                    "a {size}-byte request was handed a cached run of another length"
                );
                assert_eq!(cached(), 0, "a run that did not fit stayed in its slot");
                dealloc(q, l);
            }
            coreheap::trim();
            assert_eq!(cached(), 0, "trim left runs in this CPU's slots");
            let p = alloc(mib);
            dealloc(p, mib);
            let fast_before = fast();
            let q = alloc(mib);
            assert_eq!(q, p, "the freed run did not come back from the slot");
            assert!(fast() > fast_before, "not counted as a fast allocation");
            // A slightly shorter request fits the same run.
            dealloc(q, mib);
            let l = Layout::from_size_align((1 << 20) - 100_000, 8).unwrap();
            let r = alloc(l);
            assert_eq!(
                r, p,
                "a request within a quarter did not take the cached run"
            );
            dealloc(r, l);
        }
        coreheap::trim();
        assert_eq!(cached(), 0, "trim left runs in this CPU's slots");
        assert_eq!(in_use(), before);
    })
    .join()
    .unwrap();
    coreheap::check_heap().unwrap();
    eprintln!("fastpath: page runs cached in run slots, counted, and emptied by trim");
}

/// Blocks of a class above 8 KiB freed on another arena's CPU wait in that CPU's outbox
/// (four of a class above 16 KiB fill it); a full one sends them to the owner's transfer
/// slot of the class as one chain, which
/// the owner's CPU takes back as refills, its blocks handed out again there and only there.
fn large_remote_frees_park_with_their_owner() {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if !coreheap::fast_path() || coreheap::SMALL_MAX <= 8192 || cores.len() < 2 {
        eprintln!(
            "fastpath: large remote frees not tested (no rseq, no large classes, or one core)"
        );
        return;
    }
    let (c0, c1) = (cores[0], cores[1]);
    let layout = Layout::from_size_align(64 << 10, 8).unwrap();
    let class = (0..coreheap::NUM_CLASSES)
        .find(|&c| coreheap::class_size(c) >= layout.size())
        .unwrap();
    let (arena0, blocks) = std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c0));
        // SAFETY: non-zero size; each block freed once, on the other core.
        let v: Vec<usize> = (0..8).map(|_| unsafe { alloc(layout) } as usize).collect();
        (coreheap::current_arena(), v)
    })
    .join()
    .unwrap();
    let first: Vec<usize> = blocks[..4].to_vec();
    let parked = std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c1));
        if coreheap::current_arena() == arena0 {
            return None;
        }
        for &b in &blocks {
            // SAFETY: allocated on the other core with `layout`, freed once here.
            unsafe { dealloc(b as *mut u8, layout) };
        }
        Some(coreheap::stats().arenas[arena0].cached[class])
    })
    .join()
    .unwrap();
    let Some(parked) = parked else {
        eprintln!("fastpath: cores 0 and 1 share an arena; large remote frees not tested");
        return;
    };
    // The first four went as one chain when the fifth found the outbox full; the others
    // wait in the outbox (counted against their owner too).
    assert!(parked >= 8, "only {parked} of 8 blocks counted as cached");
    std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c0));
        // SAFETY: non-zero size; freed right after.
        let again: Vec<usize> = (0..4).map(|_| unsafe { alloc(layout) } as usize).collect();
        for &b in &again {
            assert_eq!(coreheap::owner_arena(b as *const u8), Some(arena0));
            assert!(
                first.contains(&b),
                "a parked block was not handed out again"
            );
            // SAFETY: allocated above with `layout`.
            unsafe { dealloc(b as *mut u8, layout) };
        }
    })
    .join()
    .unwrap();
    std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c1));
        coreheap::trim();
    })
    .join()
    .unwrap();
    coreheap::check_heap().unwrap();
    eprintln!("fastpath: large remote frees parked with their owner and reused there");
}

/// Blocks of the classes above 8 KiB go through the CPU caches: freed and allocated again
/// on one core they come back without the arena's bins (counted as fast allocations), the
/// statistics count those waiting in the cache as cached, not in use, and `trim` on that
/// core empties its lists of them.
fn large_classes_are_cached_counted_and_trimmed() {
    if !coreheap::fast_path() || coreheap::SMALL_MAX <= 8192 {
        eprintln!("fastpath: large classes not tested (no rseq, or none with pow2-classes)");
        return;
    }
    let Some(core) = core_affinity::get_core_ids().and_then(|c| c.last().copied()) else {
        return;
    };
    std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(core));
        let arena = coreheap::current_arena();
        let sizes = [9000usize, 12 << 10, 50_000, 256 << 10];
        let classes: Vec<usize> = sizes
            .iter()
            .map(|&s| {
                (0..coreheap::NUM_CLASSES)
                    .find(|&c| coreheap::class_size(c) >= s)
                    .unwrap()
            })
            .collect();
        let in_use = || coreheap::stats().arenas[arena].in_use();
        let cached = |c: usize| coreheap::stats().arenas[arena].cached[c];
        let fast = || coreheap::stats().arenas[arena].fast_allocs;
        let layouts: Vec<Layout> = sizes
            .iter()
            .map(|&s| Layout::from_size_align(s, 8).unwrap())
            .collect();
        // The vectors exist before the count starts (they are in use too).
        let mut first: Vec<*mut u8> = Vec::with_capacity(sizes.len());
        let mut again: Vec<*mut u8> = Vec::with_capacity(sizes.len());
        let before = in_use();
        // SAFETY: non-zero sizes; every block freed once with its layout.
        first.extend(layouts.iter().map(|&l| unsafe { alloc(l) }));
        for (&p, &l) in first.iter().zip(&layouts) {
            // SAFETY: as above.
            unsafe { dealloc(p, l) };
        }
        assert_eq!(in_use(), before, "cached blocks counted as in use");
        for &c in &classes {
            assert!(cached(c) >= 1, "class {c}: nothing cached after a free");
        }
        let fast_before = fast();
        // SAFETY: as above.
        again.extend(layouts.iter().map(|&l| unsafe { alloc(l) }));
        assert_eq!(
            again, first,
            "the freed blocks did not come back from the cache"
        );
        assert!(
            fast() >= fast_before + sizes.len() as u64,
            "not counted as fast allocations"
        );
        for (&p, &l) in again.iter().zip(&layouts) {
            // SAFETY: as above.
            unsafe { dealloc(p, l) };
        }
        coreheap::trim();
        for &c in &classes {
            assert_eq!(
                cached(c),
                0,
                "class {c}: trim left blocks in this CPU's cache"
            );
        }
        assert_eq!(in_use(), before);
    })
    .join()
    .unwrap();
    coreheap::check_heap().unwrap();
    eprintln!("fastpath: large classes cached, counted, and emptied by trim");
}

/// The middle tier (`cpucache/transfer.rs`): a CPU list that overflows parks half of it in
/// its arena's transfer slots, where statistics count it and `trim` empties it; blocks
/// freed on another core's CPU come back to their arena through its slots, and are handed
/// out again only on its own core; bytes in use end where they started.
fn transfer_slots_move_whole_chains() {
    if !coreheap::fast_path() {
        eprintln!("fastpath: no rseq here, transfer slots not tested");
        return;
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() < 2 {
        eprintln!("fastpath: one core, transfer slots not tested");
        return;
    }
    let (c0, c1) = (cores[0], cores[1]);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let class_64 = (0..coreheap::NUM_CLASSES)
        .find(|&c| coreheap::class_size(c) == 64)
        .unwrap();
    let before = coreheap::stats().in_use();
    let on = |core: core_affinity::CoreId, f: Box<dyn FnOnce() -> Vec<usize> + Send>| {
        std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(core));
            f()
        })
        .join()
        .unwrap()
    };
    // Allocated and freed on core 0: the list overflows and parks.
    let (arena0, parked) = {
        let r = on(
            c0,
            Box::new(move || {
                // SAFETY: each block is allocated with `layout` and freed once with it.
                let blocks: Vec<usize> = (0..1000)
                    .map(|_| unsafe { alloc(layout) } as usize)
                    .collect();
                let a = coreheap::current_arena();
                for &b in &blocks {
                    assert_eq!(coreheap::owner_arena(b as *const u8), Some(a));
                    // SAFETY: as above.
                    unsafe { dealloc(b as *mut u8, layout) };
                }
                let st = coreheap::stats();
                vec![a, st.arenas[a].cached[class_64] as usize]
            }),
        );
        (r[0], r[1])
    };
    // A CPU list holds at most 160 blocks of 64 bytes (its byte budget); the rest of what is
    // cached is parked.
    assert!(
        parked >= 256,
        "only {parked} blocks cached after 1000 frees on one core"
    );
    // Allocated on core 0, freed on core 1: outbox chains go back to arena 0's slots, and
    // core 0 gets them again.
    let first = on(
        c0,
        Box::new(move || {
            // SAFETY: as above; freed on the other core below.
            (0..1000)
                .map(|_| unsafe { alloc(layout) } as usize)
                .collect()
        }),
    );
    let freed = first.clone();
    on(
        c1,
        Box::new(move || {
            assert_ne!(
                coreheap::current_arena(),
                arena0,
                "cores 0 and 1 share an arena"
            );
            for &b in &freed {
                // SAFETY: blocks of `layout`, each freed once.
                unsafe { dealloc(b as *mut u8, layout) };
            }
            coreheap::trim();
            Vec::new()
        }),
    );
    let again = on(
        c0,
        Box::new(move || {
            // SAFETY: as above.
            let v: Vec<usize> = (0..1000)
                .map(|_| unsafe { alloc(layout) } as usize)
                .collect();
            for &b in &v {
                assert_eq!(coreheap::owner_arena(b as *const u8), Some(arena0));
            }
            v
        }),
    );
    let set: std::collections::HashSet<usize> = first.iter().copied().collect();
    let reused = again.iter().filter(|b| set.contains(b)).count();
    drop((first, set));
    assert!(
        reused >= 500,
        "only {reused} of 1000 remotely freed blocks came back to core 0"
    );
    on(
        c0,
        Box::new(move || {
            for &b in &again {
                // SAFETY: as above.
                unsafe { dealloc(b as *mut u8, layout) };
            }
            coreheap::trim();
            let st = coreheap::stats();
            vec![st.arenas[arena0].cached.iter().sum::<u64>() as usize]
        }),
    );
    coreheap::check_heap().expect("heap check after the transfer test");
    assert_eq!(coreheap::stats().in_use(), before, "bytes in use changed");
    eprintln!("fastpath: transfer slots park overflowing halves and bring remote frees home ({reused}/1000 reused)");
}

/// A double `dealloc` aborts with a message naming the block, with the caches on and off:
/// while the block is free in a cache or run (glibc's `double free detected`), and after
/// its run was released and trimmed (then the block is no longer in a small run, so the
/// sized path must not take it: `invalid pointer ... freed already?`).
fn double_dealloc_aborts() {
    use std::os::unix::process::ExitStatusExt;
    for (mode, env) in [
        ("double", vec![]),
        ("double", vec![("COREHEAP_RSEQ", "0")]),
        ("double-released", vec![]),
        ("double-released", vec![("COREHEAP_RSEQ", "0")]),
        ("double-parked", vec![]),
        ("double-unmapped", vec![]),
        ("double-unmapped", vec![("COREHEAP_RSEQ", "0")]),
        ("double-large", vec![]),
        ("double-large", vec![("COREHEAP_RSEQ", "0")]),
        ("double-large-flushed", vec![]),
        ("double-run", vec![]),
        ("double-run", vec![("COREHEAP_RSEQ", "0")]),
        ("double-remote-large", vec![]),
        ("double-inbox", vec![]),
        ("double-outbox-4k", vec![]),
        ("double-outbox", vec![]),
    ] {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_VAR, mode)
            .env_remove("COREHEAP_RSEQ")
            .envs(env.iter().copied())
            .output()
            .expect("cannot run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let block = printed_block(&stdout);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "double dealloc ({mode}, {env:?}) did not abort: {stdout} {stderr}"
        );
        let named = stderr.contains(block.trim_start_matches("0x"));
        let said = match mode {
            "double" => stderr.contains("double free"),
            // The chunk went back: the block is no longer in any chunk of coreheap's.
            "double-unmapped" => {
                assert!(
                    !stdout.contains("chunks_unmapped=0"),
                    "no chunk went back to the OS: {stdout}"
                );
                stderr.contains("invalid pointer") && !stderr.contains("arena")
            }
            // In a CPU cache (the block's run goes back once its one block is free, so
            // without the caches the pointer is in free memory: the case below).
            "double-large"
                if coreheap::fast_path() && env.is_empty() && coreheap::SMALL_MAX > 8192 =>
            {
                stderr.contains("double free")
            }
            "double-parked" | "double-inbox" | "double-outbox-4k" | "double-outbox"
                if coreheap::fast_path() =>
            {
                stderr.contains("double free")
            }
            // In a run slot (without the caches the run went back to the page heap: the
            // case below).
            "double-run" if coreheap::fast_path() && env.is_empty() => {
                stderr.contains("double free")
            }
            // In the freeing CPU's outbox (with one core, or one arena, the block
            // is in that CPU's own list instead: a double free either way; without the
            // caches its run went back: the case below).
            "double-remote-large" if coreheap::fast_path() && coreheap::SMALL_MAX > 8192 => {
                stderr.contains("double free")
            }
            _ => {
                // The scenario must really be the released one (without the caches, the
                // parked one's blocks went back to their runs, which were released too).
                assert!(
                    mode != "double-released" || stdout.contains("released=1"),
                    "the run was not released: {stdout}"
                );
                stderr.contains("double free") || stderr.contains("freed already?")
            }
        };
        assert!(
            named && said,
            "double dealloc ({mode}, {env:?}): message does not name {block}: {stderr}"
        );
    }
    eprintln!(
        "fastpath: a double dealloc aborts, caches on and off, also after its run was released"
    );
}

/// The child: a thread pinned to one core frees a block into its CPU's cache, overwrites
/// the block's link (a write after free), and allocates the same size again, which pops
/// that block. Must not return.
fn corrupt_link_child() -> ! {
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    let layout = Layout::from_size_align(64, 8).unwrap();
    println!("fast={}", coreheap::fast_path() as u8);
    // SAFETY: deliberately wrong: `p` is written after it was freed, which the pop must
    // detect before it hands out the block or follows the link.
    unsafe {
        let p = std::hint::black_box(alloc(layout));
        println!("block={p:p}");
        dealloc(std::hint::black_box(p), layout);
        std::ptr::write_volatile(p.cast::<u64>(), 0x4141_4141_4141_4141);
        let q = std::hint::black_box(alloc(layout));
        println!("allocated {q:p}");
    }
    println!("the damaged link was followed");
    std::process::exit(0);
}

/// A write into a freed block that sits in a CPU cache (its link overwritten) aborts the
/// next pop with a message naming the block (the pop section's bad-link way out).
fn corrupt_link_aborts() {
    use std::os::unix::process::ExitStatusExt;
    if cfg!(feature = "unhardened") {
        // That build leaves links unchecked on purpose (it measures what the checks cost).
        eprintln!("fastpath: unhardened build; the damaged-link check is not run");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_VAR, "corrupt-link")
        .env_remove("COREHEAP_RSEQ")
        .env_remove("GLIBC_TUNABLES")
        .output()
        .expect("cannot run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stdout.contains("fast=1") {
        eprintln!("fastpath: no fast path here; the damaged-link check is not run");
        return;
    }
    let block = printed_block(&stdout);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "a damaged link in a CPU cache did not abort: {stdout} {stderr}"
    );
    assert!(
        stderr.contains("corrupted free list") && stderr.contains(block.trim_start_matches("0x")),
        "the message does not name the damaged block {block}: {stderr}"
    );
    eprintln!("fastpath: a damaged link in a CPU cache aborts, naming the block");
}

/// The address a child printed as `block=0x...`.
fn printed_block(stdout: &str) -> &str {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("block="))
        .unwrap_or_else(|| panic!("no block in {stdout:?}"))
}

fn run_child(env: &[(&str, &str)]) -> (bool, bool, u64) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CHILD_VAR, "1")
        .env_remove("GLIBC_TUNABLES")
        .env_remove("COREHEAP_RSEQ");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run the test binary");
    assert!(out.status.success(), "child failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
            .parse()
            .unwrap()
    };
    (
        field("registered") == 1,
        field("fast_path") == 1,
        field("fast_allocs"),
    )
}

fn fast_path_taken_only_with_rseq() {
    let (registered, on, fast) = run_child(&[]);
    eprintln!(
        "fastpath: default: rseq registered {registered}, fast path {on}, {fast} fast allocs"
    );
    if cfg!(target_arch = "x86_64") {
        assert_eq!(
            on, registered,
            "the fast path must be on exactly when rseq is"
        );
    } else {
        assert!(!on, "no fast path outside x86_64");
    }
    if on {
        // 10,000 pairs: all but the refills (one per 64 blocks at most) are fast.
        assert!(
            fast >= 9_000,
            "fast path on but only {fast} of 10000 allocs took it"
        );
    } else {
        eprintln!("fastpath: rseq unavailable here; only the off cases are checked");
        assert_eq!(fast, 0);
    }
    for env in [
        [("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
        [("COREHEAP_RSEQ", "0")],
    ] {
        let (_, on, fast) = run_child(&env);
        eprintln!(
            "fastpath: {}={}: fast path {on}, {fast} fast allocs",
            env[0].0, env[0].1
        );
        assert!(!on, "the fast path must be off with {env:?}");
        assert_eq!(fast, 0, "fast allocs counted with {env:?}");
    }
}

/// `dealloc` takes a small block's class from its layout (`Heap::free_sized`), so `realloc`
/// must leave every block with a usable size that its new layout maps back to: a small
/// block stays in place only within its class, and a size small blocks serve is never left
/// in a large or huge block. Every pair of sizes across the class edges, at three
/// alignments; contents are checked, and the heap must end where it started.
fn realloc_keeps_the_class_that_dealloc_computes() {
    // The class a (size, align) with align <= 4 KiB and size <= 8 KiB is served from.
    let class_bytes = |size, align| common::class_bytes(size, align).unwrap();
    let sizes = [
        1,
        8,
        16,
        17,
        24,
        32,
        33,
        48,
        64,
        65,
        100,
        127,
        128,
        129,
        250,
        256,
        257,
        600,
        1024,
        1500,
        2048,
        4000,
        4096,
        4097,
        8000,
        8192,
        8193,
        12_000,
        16_384,
        100_000,
        1 << 20,
        3 << 20,
    ];
    let before = coreheap::stats().in_use();
    let mut moved = 0;
    for align in [8, 64, 4096] {
        for &from in &sizes {
            for &to in &sizes {
                let old = Layout::from_size_align(from, align).unwrap();
                // SAFETY: non-zero size; the block is resized and freed with the layouts
                // it has at each step, and only the bytes it holds are touched.
                unsafe {
                    let p = alloc(old);
                    assert!(!p.is_null());
                    for i in 0..from.min(4096) {
                        p.add(i).write(i as u8 ^ 0x5a);
                    }
                    let q = std::alloc::realloc(p, old, to);
                    assert!(
                        !q.is_null(),
                        "realloc {from} -> {to} (align {align}) failed"
                    );
                    assert_eq!(q as usize % align, 0);
                    moved += (q != p) as usize;
                    for i in 0..from.min(to).min(4096) {
                        assert_eq!(q.add(i).read(), i as u8 ^ 0x5a, "byte {i}, {from} -> {to}");
                    }
                    let usable = coreheap::usable_size(q);
                    if to <= coreheap::SMALL_MAX && align <= coreheap::PAGE {
                        assert_eq!(
                            usable,
                            class_bytes(to, align),
                            "realloc {from} -> {to} (align {align}) left a block of {usable} B"
                        );
                    } else {
                        assert!(usable >= to);
                    }
                    dealloc(q, Layout::from_size_align(to, align).unwrap());
                }
            }
        }
    }
    let after = coreheap::stats().in_use();
    eprintln!("fastpath: realloc across class edges: {moved} moved, in use {before} -> {after}");
    assert_eq!(
        after, before,
        "realloc and dealloc lost or double-counted memory"
    );
    coreheap::check_heap().unwrap();
}

/// The C interface's `free` through each of its ways: a CPU cache taking the block, a full
/// cache (flush), a block of another arena (the outbox, and a full outbox sent: to the
/// owner's inbox up to 1 KiB, to its transfer slots above, up to 256 KiB), large and huge
/// blocks. Blocks
/// are allocated on a thread pinned to one core and freed, with contents checked, on a
/// thread pinned to another (and on the first); errno must come back unchanged from every
/// `free`, and the heap must end where it started.
fn c_free_takes_every_path() {
    use coreheap::c_api::{free, malloc};
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (home, away) = match cores.as_slice() {
        [a, b, ..] => (*a, *b),
        [a] => (*a, *a),
        [] => return,
    };
    let before = coreheap::stats().in_use();
    let sizes: Vec<usize> = (0..3000)
        .map(|i| {
            [
                16, 48, 100, 500, 512, 600, 2000, 4096, 8000, 20_000, 300_000,
            ][i % 11]
        })
        .chain([3 << 20])
        .collect();
    let blocks = std::thread::spawn(move || {
        core_affinity::set_for_current(home);
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = malloc(n).cast::<u8>();
                assert!(!p.is_null());
                // SAFETY: `p` has `n >= 16` bytes.
                unsafe {
                    p.write(i as u8);
                    p.add(n - 1).write(!(i as u8));
                }
                (p as usize, n)
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let (mine, theirs): (Vec<_>, Vec<_>) = blocks
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 3 == 0);
    for (core, list) in [(away, theirs), (home, mine)] {
        std::thread::spawn(move || {
            core_affinity::set_for_current(core);
            for (i, (p, n)) in list {
                let p = p as *mut u8;
                // SAFETY: a live block of `n` bytes from `malloc`, freed once here.
                unsafe {
                    assert!(
                        p.read() == i as u8 && p.add(n - 1).read() == !(i as u8),
                        "block {i} of {n} B changed"
                    );
                    *libc::__errno_location() = 4321;
                    free(p.cast());
                    assert_eq!(
                        *libc::__errno_location(),
                        4321,
                        "free of {n} B changed errno"
                    );
                }
            }
        })
        .join()
        .unwrap();
    }
    coreheap::trim();
    let after = coreheap::stats().in_use();
    eprintln!("fastpath: C free on every path: in use {before} -> {after}");
    assert_eq!(after, before, "C free lost or double-counted memory");
    coreheap::check_heap().unwrap();
}

/// A block in flight: address, layout, and the tag written at both ends.
struct Blk(*mut u8, Layout, u64);
// SAFETY: a Blk is a uniquely owned heap block, handed between threads whole.
unsafe impl Send for Blk {}

fn make(rng: &mut Rng, tag: u64) -> Blk {
    // Log-uniform over the classes, 16 B to 8 KiB, and one block in eight of the classes
    // above (up to 256 KiB, with `pow2-classes` page runs).
    let size = if rng.below(8) == 0 {
        8192usize << (1 + rng.below(5))
    } else {
        16usize << rng.below(10)
    };
    let size = size - rng.below(size / 2) / 8 * 8;
    let layout = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc(layout) };
    assert!(!p.is_null(), "allocation of {size} bytes failed");
    // SAFETY: `p` has `size >= 16` bytes, 8-aligned; both words are inside.
    unsafe {
        p.cast::<u64>().write(tag);
        p.add(size - 8).cast::<u64>().write(!tag);
    }
    Blk(p, layout, tag)
}

fn check_and_free(b: Blk) {
    let Blk(p, layout, tag) = b;
    // SAFETY: `p` is a live block of `layout` that we own; both tag words are inside it.
    unsafe {
        let head = p.cast::<u64>().read();
        let tail = p.add(layout.size() - 8).cast::<u64>().read();
        assert!(
            head == tag && tail == !tag,
            "block {p:?} ({} B) was changed while live: handed out twice?",
            layout.size()
        );
        dealloc(p, layout);
    }
}

fn migrated_threads_lose_and_duplicate_nothing() {
    // A short round first: the standard library sets up some state of its own (kept for the
    // process) the first time threads are spawned and joined.
    stress_round(1_000);
    let before = coreheap::stats().in_use();
    let (ncores, threads, a, elapsed, moved) = stress_round(60_000);
    let stats = coreheap::stats();
    let after = stats.in_use();
    let fast: u64 = stats.arenas.iter().map(|a| a.fast_allocs).sum();
    let cached: u64 = stats.arenas.iter().flat_map(|a| a.cached).sum();
    eprintln!(
        "fastpath: {threads} threads on {ncores} cores, {a} blocks in {elapsed:?}, {moved} \
         migrations, {fast} fast allocs in all, {cached} blocks in CPU caches; in use before \
         {before} B, after {after} B",
    );
    // Every block is back: none lost in a cache or list the counts do not see, none counted
    // twice. (Exact: no other thread allocates in this process now.)
    assert_eq!(
        after, before,
        "bytes in use differ after freeing everything:\n{stats}"
    );
    coreheap::check_heap().unwrap();
    if coreheap::fast_path() {
        assert!(
            fast > a / 2,
            "the fast path served only {fast} of {a} allocations"
        );
    }
}

/// Threads (three per core) allocate, check and free blocks, a quarter of them on another
/// thread, while moving themselves to a random core every 32 operations. Returns the
/// cores, threads, blocks allocated (all freed again), time taken and migrations.
/// Signals delivered to the stress threads: each one delivered inside a critical section
/// aborts and restarts it.
static SIGNALS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

fn install_handler() {
    // SAFETY: a zeroed sigaction is valid; the handler only does an atomic add, which is
    // async-signal-safe; SA_RESTART keeps the threads' blocking calls going.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

fn stress_round(ops_per_thread: usize) -> (usize, usize, u64, Duration, u64) {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let threads = 3 * cores.len().max(2);
    install_handler();
    // Threads report their pthread ids here, and stay alive (at `parked`) until the signal
    // storm has stopped, so no signal is sent to a thread that has exited.
    // Thread ids as numbers: musl's pthread_t is a pointer, which threads cannot share.
    let tids = Arc::new(Mutex::new(Vec::<usize>::new()));
    let finished = Arc::new(AtomicU64::new(0));
    let parked = Arc::new(std::sync::Barrier::new(threads + 1));
    let allocated = Arc::new(AtomicU64::new(0));
    let freed = Arc::new(AtomicU64::new(0));
    let migrations = Arc::new(AtomicU64::new(0));
    // Each thread's mailbox: blocks other threads hand it to free.
    let mailboxes: Arc<Vec<Mutex<Vec<Blk>>>> =
        Arc::new((0..threads).map(|_| Mutex::new(Vec::new())).collect());
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cores, allocated, freed, migrations, mailboxes) = (
                cores.clone(),
                allocated.clone(),
                freed.clone(),
                migrations.clone(),
                mailboxes.clone(),
            );
            let (tids, finished, parked) = (tids.clone(), finished.clone(), parked.clone());
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                tids.lock()
                    .unwrap()
                    .push(unsafe { libc::pthread_self() } as usize);
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((t as u64 + 1) * 0x9e37_79b9));
                let mut live: Vec<Blk> = Vec::with_capacity(600);
                let mut serial = 0u64;
                for op in 0..ops_per_thread {
                    if op % 32 == 0 && !cores.is_empty() {
                        core_affinity::set_for_current(cores[rng.below(cores.len())]);
                        migrations.fetch_add(1, Ordering::Relaxed);
                    }
                    if op % 512 == 0 {
                        let mail = std::mem::take(&mut *mailboxes[t].lock().unwrap());
                        for b in mail {
                            check_and_free(b);
                            freed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if live.len() < 512 && (live.is_empty() || rng.below(2) == 0) {
                        serial += 1;
                        live.push(make(&mut rng, ((t as u64) << 40) | serial));
                        allocated.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let b = live.swap_remove(rng.below(live.len()));
                        if rng.below(4) == 0 {
                            // A quarter of the frees happen on another thread.
                            mailboxes[rng.below(mailboxes.len())]
                                .lock()
                                .unwrap()
                                .push(b);
                        } else {
                            check_and_free(b);
                            freed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                for b in live {
                    check_and_free(b);
                    freed.fetch_add(1, Ordering::Relaxed);
                }
                finished.fetch_add(1, Ordering::Release);
                parked.wait();
            })
        })
        .collect();
    // The signal storm: SIGUSR1 to a random stress thread, as fast as one thread sends.
    let storm = {
        let (tids, finished, parked) = (tids.clone(), finished.clone(), parked.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x5851_f42d_4c95_7f2d);
            while finished.load(Ordering::Acquire) < threads as u64 {
                let t = {
                    let tids = tids.lock().unwrap();
                    (!tids.is_empty()).then(|| tids[rng.below(tids.len())])
                };
                if let Some(t) = t {
                    // SAFETY: `t` is a live thread: none exits before `parked` releases it.
                    unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
                }
                std::thread::yield_now();
            }
            parked.wait();
        })
    };
    storm.join().expect("the signal thread failed");
    for h in handles {
        h.join().expect("a stress thread failed");
    }
    for m in mailboxes.iter() {
        for b in std::mem::take(&mut *m.lock().unwrap()) {
            check_and_free(b);
            freed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let (a, f, moved) = (
        allocated.load(Ordering::Relaxed),
        freed.load(Ordering::Relaxed),
        migrations.load(Ordering::Relaxed),
    );
    let ncores = cores.len();
    // Everything this test allocated goes before the heap is measured again.
    drop((mailboxes, allocated, freed, migrations, cores));
    assert_eq!(a, f, "blocks allocated and freed differ");
    eprintln!(
        "fastpath: round of {ops_per_thread} ops per thread: {} signals handled",
        SIGNALS.load(Ordering::Relaxed)
    );
    (ncores, threads, a, start.elapsed(), moved)
}
