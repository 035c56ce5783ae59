//! A program that frees everything gets its memory back: after 1 GiB of small, large and huge
//! blocks is allocated, touched and freed, the resident set falls back close to where it
//! started, with no call to `trim` or anything else special, but for the freed huge spans
//! kept for reuse (at most `CAP`), which go back after their delay at the next large or huge
//! allocation, or at once with `trim()` / `malloc_trim(0)`.

mod common;

use common::Rng;
use std::alloc::{alloc, dealloc, Layout};

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

const MIB: usize = 1 << 20;
const TOTAL: usize = 1024 * MIB;
/// How far above its starting point the resident set may stay.
const SLACK: usize = 64 * MIB;
/// The most the process heap keeps of freed huge spans (`source::spans::CAP`).
const CAP: usize = 64 * MIB;
/// The delay after which unused memory goes back (`large::DECAY_MS`), with a margin.
const DECAY: std::time::Duration = std::time::Duration::from_millis(1300);

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Resident bytes (`/proc/self/statm`, second field), read without allocating through the
/// heap being measured more than a few bytes.
fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("read statm");
    let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * page_size()
}

/// Writes a byte in every page of the block and its last byte.
fn touch(p: *mut u8, size: usize, v: u8) {
    for off in (0..size).step_by(4096) {
        // SAFETY: `off < size`, inside the live block.
        unsafe { p.add(off).write(v) };
    }
    // SAFETY: as above.
    unsafe { p.add(size - 1).write(v) };
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// Sizes adding up to `total`: a quarter in small blocks, the rest split between large and
/// huge ones, in a random order.
fn mixed_sizes(rng: &mut Rng, total: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut budget = [total / 4, total * 3 / 8, total * 3 / 8];
    while budget.iter().any(|&b| b > 0) {
        let kind = rng.below(3);
        if budget[kind] == 0 {
            continue;
        }
        let size = match kind {
            0 => 1 + rng.below(8192),
            1 => 8193 + rng.below(2 * MIB - 8192),
            _ => 2 * MIB + 1 + rng.below(30 * MIB),
        }
        .min(budget[kind]);
        budget[kind] -= size;
        sizes.push(size);
    }
    sizes
}

/// A block handed to another thread.
struct Blk(*mut u8, Layout);
// SAFETY: the sole handle to its block; the allocator allows freeing from any thread.
unsafe impl Send for Blk {}

#[test]
fn rss_returns_after_freeing_everything() {
    // SAFETY: alarm has no preconditions; a hang kills the process instead of the CI job.
    unsafe { libc::alarm(120) };
    // The two phases run one after the other: tests in one binary run in parallel and would
    // disturb each other's measurements.
    one_thread();
    large_classes_go_back();
    run_slots_go_back();
    trim_empties_every_cache();
    other_threads_free();
    huge_spans_go_back();
    // The smallest class (16 bytes with either class scheme), which parks the most chains
    // (8 slots), so that more than a CPU list's worth (255) can wait in the slots; and 4 KiB
    // blocks, which a sent outbox parks in their owner's slots rather than its inbox (the
    // freeing CPU's outbox keeps at most 64 KiB of them, 16, until it is sent again).
    idle_arena_keeps_no_parked_chains(16, 4000, 255);
    idle_arena_keeps_no_parked_chains(4096, 200, 16);
    // A large class: four blocks fill an outbox and are parked as one chain (a large class
    // has one slot); of sixteen, the first four are parked and the others find the slot
    // taken and go back to their runs (the last four when the free of the vector that held
    // them sends the outbox), so that only the parked four are cached, until a sweep.
    if coreheap::SMALL_MAX >= 64 << 10 {
        idle_arena_keeps_no_parked_chains(64 << 10, 16, 0);
    }
}

/// Blocks of an arena freed on another core's CPU are parked in their arena's transfer
/// slots; when that arena's CPUs stop allocating, a sweep on another arena's locked path
/// returns them to their runs within about a second, rather than leaving them parked: of
/// `n` blocks of `size` bytes, more than `most_left` are cached at first, and at most
/// `most_left` after.
fn idle_arena_keeps_no_parked_chains(size: usize, n: usize, most_left: u64) {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() < 2 || !coreheap::fast_path() {
        eprintln!("rss: parked chains not tested (one core or no rseq)");
        return;
    }
    let (c0, c1) = (cores[0], cores[1]);
    let layout = Layout::from_size_align(size, 8).unwrap();
    let class = (0..coreheap::NUM_CLASSES)
        .find(|&c| coreheap::class_size(c) >= size)
        .unwrap();
    let churn = Layout::from_size_align(16, 8).unwrap();
    let (arena0, blocks) = std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c0));
        // SAFETY: non-zero size; freed once on the other core.
        let v: Vec<usize> = (0..n).map(|_| unsafe { alloc(layout) } as usize).collect();
        (coreheap::current_arena(), v)
    })
    .join()
    .unwrap();
    let parked = move |a: usize| coreheap::stats().arenas[a].cached[class];
    std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(c1));
        assert_ne!(
            coreheap::current_arena(),
            arena0,
            "cores 0 and 1 share an arena"
        );
        for &b in &blocks {
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { dealloc(b as *mut u8, layout) };
        }
        drop(blocks);
        let before = parked(arena0);
        assert!(
            before > most_left,
            "only {before} blocks of {size} B of arena {arena0} cached"
        );
        // This core keeps allocating (its own arena, through its locked path at times);
        // arena 0's CPUs do nothing.
        let start = std::time::Instant::now();
        let mut after = before;
        while start.elapsed() < std::time::Duration::from_secs(5) && after > most_left {
            // SAFETY: non-zero size; each block freed once below.
            let v: Vec<usize> = (0..5000)
                .map(|_| unsafe { alloc(churn) } as usize)
                .collect();
            for b in v {
                // SAFETY: as above.
                unsafe { dealloc(b as *mut u8, churn) };
            }
            after = parked(arena0);
        }
        eprintln!(
            "rss: arena {arena0} had {before} blocks of {size} B cached after remote frees, \
             {after} after {:?} of another core's work",
            start.elapsed()
        );
        // At most what a CPU list (16 B) or this core's outbox (4 KiB) holds stays.
        assert!(
            after <= most_left,
            "{after} blocks of {size} B stay parked in an idle arena"
        );
    })
    .join()
    .unwrap();
    coreheap::check_heap().unwrap();
}

/// What the heap keeps resident on purpose right after a free: dirty pages beyond half the
/// slack (an arena per CPU may keep up to its limit until its next tick) and cached huge
/// spans.
fn kept(stats: &coreheap::Stats) -> usize {
    let dirty: usize = stats.arenas.iter().map(|a| a.dirty_bytes).sum();
    dirty.saturating_sub(SLACK / 2) + stats.huge_cached
}

/// A few large allocations and frees: the arena's slow path, where its decay clock ticks
/// (page runs above the largest class, which the CPU caches would serve).
fn large_round() {
    let layout = Layout::from_size_align(coreheap::SMALL_MAX + 64 * 1024, 8).unwrap();
    for _ in 0..256 {
        // SAFETY: non-zero size; freed at once. (`black_box`: a release build may remove an
        // allocation nobody reads, and with it the slow path this is for.)
        unsafe {
            let p = std::hint::black_box(alloc(layout));
            assert!(!p.is_null());
            dealloc(std::hint::black_box(p), layout);
        }
    }
}

/// Runs `f` on a thread pinned to each CPU this process may use in turn, so that every
/// arena takes its slow path.
fn on_every_cpu(f: fn()) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls write only `set`.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        set
    };
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE.
        if !unsafe { libc::CPU_ISSET(cpu, &set) } {
            continue;
        }
        std::thread::spawn(move || {
            // SAFETY: as above; pins the calling thread only.
            unsafe {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut one);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one);
            }
            f();
        })
        .join()
        .unwrap();
    }
}

/// After a decay delay and a few large allocations on every CPU, no freed huge span is kept
/// and the resident set is back within `SLACK` of `base`.
fn after_decay(base: usize, what: &str) {
    std::thread::sleep(DECAY);
    on_every_cpu(large_round);
    let now = rss();
    let stats = coreheap::stats();
    assert_eq!(
        stats.huge_cached, 0,
        "{what}: huge spans still cached after their delay:\n{stats}"
    );
    assert!(
        now <= base + SLACK,
        "{what}: resident set stays {} above its start after the decay delay:\n{stats}",
        mib(now.saturating_sub(base))
    );
}

/// With no span cached, a zeroed huge block is a fresh mapping and is not cleared: the
/// resident set does not grow by its size.
fn calloc_of_a_fresh_span_touches_nothing() {
    let l = Layout::from_size_align(256 * MIB, 8).unwrap();
    let before = rss();
    // SAFETY: non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(l) };
    assert!(!p.is_null());
    let grew = rss().saturating_sub(before);
    // SAFETY: inside the live block.
    assert_eq!(unsafe { p.add(l.size() - 1).read() }, 0);
    // SAFETY: allocated above with this layout.
    unsafe { dealloc(p, l) };
    assert!(
        grew < 16 * MIB,
        "calloc of a fresh huge mapping made {} resident",
        mib(grew)
    );
}

/// Twenty huge blocks of 5-25 MiB, one replaced at random per step and written, then all
/// freed: the spans kept for reuse stay within the cap, `trim()` and `malloc_trim(0)` give
/// them all back, and so does the decay delay.
fn huge_spans_go_back() {
    let mut rng = Rng(0x51ed_270b_2718_2818);
    let base = rss();
    for round in 0..3 {
        let layout =
            |rng: &mut Rng| Layout::from_size_align(5 * MIB + rng.below(20 * MIB), 8).unwrap();
        let mut live: Vec<(*mut u8, Layout)> = (0..20)
            .map(|_| {
                let l = layout(&mut rng);
                // SAFETY: non-zero size.
                let p = unsafe { alloc(l) };
                assert!(!p.is_null());
                touch(p, l.size(), 1);
                (p, l)
            })
            .collect();
        for step in 0..100 {
            let i = rng.below(live.len());
            let (p, l) = live[i];
            // SAFETY: a live block of this layout, freed once.
            unsafe { dealloc(p, l) };
            let l = layout(&mut rng);
            let zeroed = step % 4 == 0;
            // SAFETY: non-zero size.
            let p = unsafe {
                if zeroed {
                    std::alloc::alloc_zeroed(l)
                } else {
                    alloc(l)
                }
            };
            assert!(!p.is_null());
            if zeroed {
                for off in (0..l.size()).step_by(4096).chain([l.size() - 1]) {
                    // SAFETY: inside the live block.
                    let b = unsafe { p.add(off).read() };
                    assert_eq!(b, 0, "calloc'd huge block not zero");
                }
            }
            touch(p, l.size(), step as u8);
            live[i] = (p, l);
        }
        for (p, l) in live {
            // SAFETY: live blocks of these layouts, freed once.
            unsafe { dealloc(p, l) };
        }
        let stats = coreheap::stats();
        assert!(
            stats.huge_cached <= CAP,
            "the span cache passed its cap:\n{stats}"
        );
        assert!(
            rss() <= base + SLACK + CAP,
            "resident set stays above its start by more than the slack and the span cache"
        );
        match round {
            0 => coreheap::trim(),
            1 => {
                coreheap::c_api::malloc_trim(0);
            }
            _ => {
                after_decay(base, "huge spans");
                continue;
            }
        }
        let now = rss();
        let stats = coreheap::stats();
        assert_eq!(
            stats.huge_cached, 0,
            "round {round}: trim left spans:\n{stats}"
        );
        assert!(
            now <= base + SLACK,
            "round {round}: resident set stays {} above its start after a trim:\n{stats}",
            mib(now.saturating_sub(base))
        );
        if round == 0 {
            calloc_of_a_fresh_span_touches_nothing();
        }
    }
    coreheap::check_heap().unwrap();
}

/// Blocks of the classes above 8 KiB, which the CPU caches keep: on every CPU in turn, 128
/// MiB of them (9 KiB to 256 KiB) allocated, touched and freed in a scrambled order. What
/// the caches keep afterwards is bounded (a few blocks per class and CPU), and the rest
/// leaves the resident set after the decay delay, as page runs do.
fn large_classes_go_back() {
    let base = rss();
    on_every_cpu(large_class_round);
    let cached = cached_large_classes(&coreheap::stats());
    let cpus = on_every_cpu_count();
    eprintln!(
        "rss, large classes on {cpus} CPUs: start {}, after freeing {}, {} cached",
        mib(base),
        mib(rss()),
        mib(cached)
    );
    // The caches' bound (`cpucache::CPU_CACHE_BYTES`: 1.6 MiB of large classes a CPU).
    assert!(
        cached <= cpus * 2 * MIB,
        "{} of large classes cached on {cpus} CPUs:\n{}",
        mib(cached),
        coreheap::stats()
    );
    after_decay(base, "large classes");
    coreheap::check_heap().unwrap();
}

/// Bytes of blocks of the classes above 8 KiB in caches, all arenas.
fn cached_large_classes(stats: &coreheap::Stats) -> usize {
    stats
        .arenas
        .iter()
        .map(|a| {
            (0..coreheap::NUM_CLASSES)
                .filter(|&c| coreheap::class_size(c) > 8192)
                .map(|c| a.cached[c] as usize * coreheap::class_size(c))
                .sum::<usize>()
        })
        .sum()
}

/// What every CPU's caches keep goes back with one `trim()` from this thread, with no decay
/// delay: after the round of [`large_classes_go_back`] on every CPU, no block of a class
/// above 8 KiB stays cached anywhere (this thread's statistics allocate none) and the
/// resident set is back within the slack.
fn trim_empties_every_cache() {
    let base = rss();
    on_every_cpu(large_class_round);
    let before = cached_large_classes(&coreheap::stats());
    coreheap::trim();
    let now = rss();
    let stats = coreheap::stats();
    let after = cached_large_classes(&stats);
    eprintln!(
        "rss, trim: {} of large classes cached before, {} after; resident {} above the start",
        mib(before),
        mib(after),
        mib(now.saturating_sub(base))
    );
    assert_eq!(after, 0, "trim left blocks in some CPU's cache:\n{stats}");
    assert!(
        now <= base + SLACK,
        "resident set stays {} above its start after a trim:\n{stats}",
        mib(now.saturating_sub(base))
    );
    coreheap::check_heap().unwrap();
}

/// On the CPU it runs on: 128 MiB of blocks of the classes above 8 KiB (9 KiB to 256 KiB)
/// allocated, touched and freed in a scrambled order.
fn large_class_round() {
    // (Page runs with `pow2-classes`, whose classes end at 8 KiB.)
    scrambled_round(0x51_7cc1_b727_220a, 128 * MIB, 7, |rng| {
        9 * 1024 + rng.below(247 * 1024 + 1)
    });
}

/// Blocks of sizes from `size` adding up to `total`, allocated (every page written with
/// `fill`) and then freed in a scrambled order; the random sequence is `seed`'s, varied by
/// the calling CPU's arena.
fn scrambled_round(seed: u64, total: usize, fill: u8, size: impl Fn(&mut Rng) -> usize) {
    let mut rng = Rng(seed ^ coreheap::current_arena() as u64);
    let mut blocks = Vec::new();
    let mut sum = 0;
    while sum < total {
        let n = size(&mut rng);
        let layout = Layout::from_size_align(n, 8).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        touch(p, n, fill);
        blocks.push((p, layout));
        sum += n;
    }
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.below(i + 1));
    }
    for (p, layout) in blocks {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { dealloc(p, layout) };
    }
}

/// Page runs above the largest class, which the CPUs' run slots keep: on every CPU in turn,
/// 256 MiB of them (256 KiB to 2 MiB) allocated, touched and freed in a scrambled order.
/// What the slots keep afterwards is bounded (two runs per CPU), the rest leaves the
/// resident set after the decay delay, and `trim` empties every CPU's slots.
fn run_slots_go_back() {
    fn round() {
        scrambled_round(0x7a11_5107_5eed_0001, 256 * MIB, 9, |rng| {
            coreheap::SMALL_MAX + 1 + rng.below(2 * MIB - coreheap::SMALL_MAX)
        });
    }
    let cached = || -> usize { coreheap::stats().arenas.iter().map(|a| a.cached_runs).sum() };
    let base = rss();
    on_every_cpu(round);
    let cpus = on_every_cpu_count();
    let kept = cached();
    eprintln!(
        "rss, page runs on {cpus} CPUs: start {}, after freeing {}, {} in run slots",
        mib(base),
        mib(rss()),
        mib(kept)
    );
    // The slots' bound: two runs of at most 2 MiB per CPU.
    assert!(
        kept <= cpus * 4 * MIB,
        "{} of page runs in run slots on {cpus} CPUs:\n{}",
        mib(kept),
        coreheap::stats()
    );
    after_decay(base, "page runs");
    coreheap::trim();
    assert_eq!(cached(), 0, "trim left runs in some CPU's slots");
    coreheap::check_heap().unwrap();
}

/// How many CPUs [`on_every_cpu`] runs on.
fn on_every_cpu_count() -> usize {
    // SAFETY: as in `on_every_cpu`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        libc::CPU_COUNT(&set) as usize
    }
}

/// One thread allocates 1 GiB, touches it and frees it in a scrambled order.
fn one_thread() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let sizes = mixed_sizes(&mut rng, TOTAL);
    let mut blocks: Vec<(*mut u8, Layout)> = Vec::with_capacity(sizes.len());
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }

    let base = rss();
    for &size in &sizes {
        let align = [8, 8, 8, 16, 64, 4096][rng.below(6)];
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null(), "allocation of {layout:?} failed");
        touch(p, size, size as u8);
        blocks.push((p, layout));
    }
    let peak = rss();
    let in_use = coreheap::stats().in_use();
    // Free in a scrambled order.
    for &i in &order {
        let (p, layout) = blocks[i];
        // SAFETY: allocated above with this layout, freed once.
        unsafe { dealloc(p, layout) };
    }
    let after = rss();
    let stats = coreheap::stats();
    eprintln!(
        "rss, one thread: {} blocks; start {}, peak {} (in use {}), after freeing {}; heap still maps {}, \
         dirty {}",
        blocks.len(),
        mib(base),
        mib(peak),
        mib(in_use),
        mib(after),
        mib(stats.mapped()),
        mib(stats.arenas.iter().map(|a| a.dirty_bytes).sum()),
    );
    assert!(
        peak >= base + TOTAL * 9 / 10,
        "the blocks were not all resident: start {}, peak {}",
        mib(base),
        mib(peak)
    );
    assert!(
        after <= base + SLACK + kept(&stats),
        "resident set stays {} above its start after freeing everything (start {}, peak {}, \
         after {}):\n{stats}",
        mib(after.saturating_sub(base)),
        mib(base),
        mib(peak),
        mib(after)
    );
    after_decay(base, "one thread");
    coreheap::check_heap().unwrap();
}

/// Four threads allocate 256 MiB each and hand every block to the next thread, which checks
/// and frees it: every free is a cross-thread free, through the owner's pending stack.
fn other_threads_free() {
    const THREADS: usize = 4;
    let base = rss();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS)
        .map(|_| std::sync::mpsc::channel::<Vec<Blk>>())
        .unzip();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
    let mut handles = Vec::new();
    for (t, rx) in rxs.into_iter().enumerate() {
        let tx = txs[(t + 1) % THREADS].clone();
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9 + t as u64);
            let sizes = mixed_sizes(&mut rng, TOTAL / THREADS);
            let mut mine = Vec::with_capacity(sizes.len());
            for size in sizes {
                let layout = Layout::from_size_align(size, 8).unwrap();
                // SAFETY: non-zero size.
                let p = unsafe { alloc(layout) };
                assert!(!p.is_null(), "allocation of {layout:?} failed");
                touch(p, size, t as u8);
                mine.push(Blk(p, layout));
            }
            // All blocks are resident at once before any is freed.
            barrier.wait();
            barrier.wait();
            tx.send(mine).unwrap();
            drop(tx);
            let theirs = rx.recv().unwrap();
            let from = ((t + THREADS - 1) % THREADS) as u8;
            for Blk(p, layout) in theirs {
                // SAFETY: allocated by the previous thread with this layout, handed to us.
                unsafe {
                    assert_eq!(p.read(), from, "block damaged");
                    dealloc(p, layout);
                }
            }
        }));
    }
    drop(txs);
    barrier.wait();
    let peak = rss();
    barrier.wait();
    for h in handles {
        h.join().expect("thread failed");
    }
    let after = rss();
    let stats = coreheap::stats();
    eprintln!(
        "rss, cross-thread frees: start {}, peak {}, after freeing {}; heap still maps {}, \
         dirty {}, remote frees {}",
        mib(base),
        mib(peak),
        mib(after),
        mib(stats.mapped()),
        mib(stats.arenas.iter().map(|a| a.dirty_bytes).sum()),
        stats.remote_frees(),
    );
    assert!(
        peak >= base + TOTAL * 9 / 10,
        "the blocks were not all resident"
    );
    assert!(
        after <= base + SLACK + kept(&stats),
        "resident set stays {} above its start after other threads freed everything (start \
         {}, peak {}, after {}):\n{stats}",
        mib(after.saturating_sub(base)),
        mib(base),
        mib(peak),
        mib(after)
    );
    after_decay(base, "cross-thread frees");
    coreheap::check_heap().unwrap();
}
