//! CPU routing: a thread pinned to a core allocates from that core's arena, different cores
//! get different arenas when there are enough of them, and `COREHEAP_ARENAS` sets the count.

use std::alloc::{alloc, dealloc, Layout};
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

/// Set in the environment of a child run of this binary: the arena count it must see.
const CHILD_ENV: &str = "COREHEAP_ROUTING_EXPECT_ARENAS";

fn watchdog() {
    // SAFETY: alarm has no preconditions; a hang kills the process instead of the CI job.
    unsafe { libc::alarm(120) };
}

fn cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    assert!(c >= 0, "sched_getcpu failed");
    c as usize
}

/// On a thread pinned to each allowed core in turn: allocates small, large and huge blocks,
/// checks that the arena blocks belong to the current arena, and returns (core, arena) pairs.
fn arenas_by_core() -> Vec<(usize, usize)> {
    let cores = core_affinity::get_core_ids().expect("core ids");
    assert!(!cores.is_empty());
    let count = coreheap::arena_count();
    let mut seen = Vec::new();
    for core in cores {
        let got = std::thread::spawn(move || {
            assert!(
                core_affinity::set_for_current(core),
                "cannot pin to {core:?}"
            );
            assert_eq!(cpu(), core.id, "pinned thread runs elsewhere");
            let arena = coreheap::current_arena();
            assert!(arena < count, "arena {arena} of {count}");
            let mut blocks = Vec::new();
            let sizes = [
                1,
                16,
                100,
                1000,
                4096,
                8192,
                8193,
                100_000,
                1 << 20,
                2 << 20,
            ];
            for (i, &size) in sizes.iter().enumerate() {
                for align in [8, 4096, 65536] {
                    let layout = Layout::from_size_align(size, align).unwrap();
                    // SAFETY: size >= 1.
                    let p = unsafe { alloc(layout) };
                    assert!(!p.is_null());
                    // SAFETY: `p` is writable for `size` bytes.
                    unsafe { p.write_bytes(i as u8, size) };
                    assert_eq!(
                        coreheap::owner_arena(p),
                        Some(arena),
                        "{layout:?} on cpu {} not from arena {arena}",
                        core.id
                    );
                    blocks.push((p, layout));
                }
            }
            // Huge blocks belong to no arena.
            let huge = Layout::from_size_align(3 << 20, 8).unwrap();
            // SAFETY: non-zero size.
            let h = unsafe { alloc(huge) };
            assert!(!h.is_null());
            assert!(coreheap::owns(h));
            assert_eq!(coreheap::owner_arena(h), None);
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(h, huge) };
            // Still on the same core, still the same arena.
            assert_eq!(cpu(), core.id);
            assert_eq!(coreheap::current_arena(), arena);
            for (p, layout) in blocks {
                // SAFETY: allocated above with this layout.
                unsafe { dealloc(p, layout) };
            }
            arena
        })
        .join()
        .expect("pinned thread failed");
        seen.push((core.id, got));
    }
    let mut arenas: Vec<usize> = seen.iter().map(|&(_, a)| a).collect();
    arenas.sort_unstable();
    arenas.dedup();
    if count >= seen.len() {
        assert_eq!(
            arenas.len(),
            seen.len(),
            "cores share arenas although there are {count}: {seen:?}"
        );
    }
    seen
}

#[test]
fn each_core_allocates_from_its_own_arena() {
    watchdog();
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // a child run for another test
    }
    let seen = arenas_by_core();
    eprintln!(
        "routing: {} arenas, core -> arena {seen:?}",
        coreheap::arena_count()
    );
    coreheap::check_heap().unwrap();
}

/// Runs this test binary again, filtered to `coreheap_arenas_env_sets_the_arena_count`, with
/// `COREHEAP_ARENAS` set to `value` (or unset); the child checks it sees `expect` arenas.
fn run_child(value: Option<&str>, expect: usize) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "coreheap_arenas_env_sets_the_arena_count",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, expect.to_string());
    match value {
        Some(v) => cmd.env("COREHEAP_ARENAS", v),
        None => cmd.env_remove("COREHEAP_ARENAS"),
    };
    let out_path = std::env::temp_dir().join(format!(
        "coreheap-routing-child-{}-{}.out",
        std::process::id(),
        value.unwrap_or("unset")
    ));
    let out = std::fs::File::create(&out_path).unwrap();
    cmd.stdout(out.try_clone().unwrap()).stderr(out);
    let mut child = cmd.spawn().expect("spawn child");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child with COREHEAP_ARENAS={value:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(
        status.success(),
        "child with COREHEAP_ARENAS={value:?} failed ({status}):\n{text}"
    );
    // A filter that matched nothing would pass too: make sure the test ran.
    assert!(
        text.contains("1 passed"),
        "child with COREHEAP_ARENAS={value:?} ran no test:\n{text}"
    );
}

#[test]
fn coreheap_arenas_env_sets_the_arena_count() {
    watchdog();
    if let Some(v) = std::env::var_os(CHILD_ENV) {
        // The child: the heap was set up before main, from the environment we were given.
        let expect: usize = v.to_str().unwrap().parse().unwrap();
        assert_eq!(coreheap::arena_count(), expect);
        let seen = arenas_by_core();
        assert!(seen.iter().all(|&(_, a)| a < expect));
        coreheap::check_heap().unwrap();
        return;
    }
    let ncpu = core_affinity::get_core_ids().unwrap().len();
    run_child(Some("7"), 7);
    run_child(Some("1"), 1);
    // Not numbers, or zero: the CPU count.
    run_child(Some("0"), ncpu);
    run_child(Some("lots"), ncpu);
    run_child(None, ncpu);
    // Capped at 4096.
    run_child(Some("100000"), 4096);
}

/// Blocks of the classes above 8 KiB (cached per CPU like small ones) and page runs above
/// them (the CPUs' run slots) freed on another core's CPU go back to their own arena (the
/// classes' through the freeing CPU's outbox): the freeing core's cache never hands
/// them out, so everything it allocates afterwards, many times over, is its own arena's.
#[test]
fn large_class_blocks_freed_on_another_core_go_home() {
    watchdog();
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // a child run for another test
    }
    let cores = core_affinity::get_core_ids().expect("core ids");
    if cores.len() < 2 || coreheap::arena_count() < 2 {
        eprintln!("routing: large classes across cores not tested (one core or arena)");
        return;
    }
    let (c0, c1) = (cores[0], cores[1]);
    // Large classes, then page runs above them (the CPUs' run slots).
    let sizes = [
        9000,
        12 << 10,
        40 << 10,
        100_000,
        256 << 10,
        300 << 10,
        1 << 20,
        2 << 20,
    ];
    let (arena0, blocks) = std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c0));
        let blocks: Vec<(usize, Layout)> = (0..40)
            .map(|i| {
                let layout = Layout::from_size_align(sizes[i % sizes.len()], 8).unwrap();
                // SAFETY: non-zero size.
                let p = unsafe { alloc(layout) };
                assert!(!p.is_null());
                // SAFETY: `p` has `layout.size()` bytes.
                unsafe { p.write_bytes(1, layout.size()) };
                (p as usize, layout)
            })
            .collect();
        (coreheap::current_arena(), blocks)
    })
    .join()
    .unwrap();
    std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c1));
        let arena1 = coreheap::current_arena();
        if arena1 == arena0 {
            eprintln!("routing: cores 0 and 1 share an arena; large classes not tested");
            return;
        }
        for &(p, layout) in &blocks {
            assert_eq!(coreheap::owner_arena(p as *const u8), Some(arena0));
            // SAFETY: allocated on the other core with this layout, freed once here.
            unsafe { dealloc(p as *mut u8, layout) };
        }
        for _ in 0..3 {
            let mine: Vec<(*mut u8, Layout)> = blocks
                .iter()
                .map(|&(_, layout)| {
                    // SAFETY: non-zero size.
                    let p = unsafe { alloc(layout) };
                    assert_eq!(
                        coreheap::owner_arena(p),
                        Some(arena1),
                        "{layout:?} freed on this core came back from another arena"
                    );
                    (p, layout)
                })
                .collect();
            for (p, layout) in mine {
                // SAFETY: allocated just above with this layout.
                unsafe { dealloc(p, layout) };
            }
        }
    })
    .join()
    .unwrap();
    coreheap::check_heap().unwrap();
}
