//! A process that uses coreheap only through its C interface: `mallopt`'s parameters that
//! map onto coreheap's settings take effect (and the environment still wins), and the
//! statistics keep the peak of the bytes in use. One binary (`harness = false`) with no
//! global allocator: the test runs itself as a child per case, so that nothing but the case
//! touches the heap before it (`M_ARENA_MAX` only counts before the heap is initialised).

mod common;

use coreheap::c_api;
use std::ffi::c_void;

const CHILD_VAR: &str = "COREHEAP_MALLOPT_CHILD";
const M_TRIM_THRESHOLD: i32 = -1;
const M_MMAP_THRESHOLD: i32 = -3;
const M_PERTURB: i32 = -6;
const M_ARENA_MAX: i32 = -8;

/// Allocates 64 MiB of large blocks and frees every other one through `free` (32 MiB, in
/// runs that cannot merge, of chunks still in use); returns the dirty bytes the arenas keep
/// then (`mallinfo2().keepcost`), and frees the rest.
fn keepcost_after_freeing_32_mib() -> usize {
    let blocks: Vec<*mut c_void> = (0..256).map(|_| c_api::malloc(256 << 10)).collect();
    let free = |b: *mut c_void| {
        assert!(!b.is_null());
        // SAFETY: a live block of 256 KiB, written, then freed once.
        unsafe {
            std::ptr::write_bytes(b.cast::<u8>(), 1, 256 << 10);
            c_api::free(b);
        }
    };
    blocks.iter().step_by(2).for_each(|&b| free(b));
    let kept = c_api::mallinfo2().keepcost;
    blocks.iter().skip(1).step_by(2).for_each(|&b| free(b));
    kept
}

/// The children: each prints `key=value` words.
fn child(case: &str) {
    match case {
        "arena_max" => {
            let r = c_api::mallopt(M_ARENA_MAX, 3);
            let first = coreheap::arena_count();
            // Once the heap exists, accepted and without effect.
            let r2 = c_api::mallopt(M_ARENA_MAX, 5);
            println!(
                "r={r} arenas={first} r2={r2} later={}",
                coreheap::arena_count()
            );
        }
        "trim" => {
            // On one CPU: every block then belongs to this CPU's arena and is freed there,
            // so the dirty pages it reports are the ones the limit governs (a thread moved
            // between CPUs meanwhile would leave blocks to the other arena's pending frees).
            if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
                core_affinity::set_for_current(core);
            }
            let before = keepcost_after_freeing_32_mib();
            let r = c_api::mallopt(M_TRIM_THRESHOLD, 1 << 20);
            let after = keepcost_after_freeing_32_mib();
            // Negative: glibc's "never trim", the largest limit.
            let r2 = c_api::mallopt(M_TRIM_THRESHOLD, -1);
            let never = keepcost_after_freeing_32_mib();
            println!("r={r} r2={r2} before={before} after={after} never={never}");
        }
        "ignored" => {
            // Accepted, without effect: blocks above 2 MiB are still mapped apart, and
            // nothing fills a fresh block.
            let r = c_api::mallopt(M_MMAP_THRESHOLD, 64 << 10) + c_api::mallopt(M_PERTURB, 0x5a);
            let p = c_api::malloc(1 << 20);
            let huge = coreheap::stats().huge_allocs;
            // SAFETY: a live block of 1 MiB, freed once.
            unsafe { c_api::free(p) };
            println!("r={r} huge={huge}");
        }
        "peak" => peak_child(),
        _ => panic!("unknown case {case}"),
    }
}

/// Allocates small, large and huge blocks, frees them, and prints the bytes in use before,
/// with all of them live and after, the peak with them live and after, and how many bytes
/// were asked for.
fn peak_child() {
    let before = coreheap::stats();
    let mut asked = 0;
    let mut blocks = Vec::new();
    for (size, n) in [(1000, 32 << 10), (512 << 10, 16), (8 << 20, 2)] {
        for _ in 0..n {
            let p = c_api::malloc(size);
            assert!(!p.is_null());
            // SAFETY: a live block of `size` bytes: written, so that it is resident.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, size) };
            blocks.push(p);
            asked += size;
        }
    }
    let during = coreheap::stats();
    for p in blocks {
        // SAFETY: each block is live and freed once.
        unsafe { c_api::free(p) };
    }
    let after = coreheap::stats();
    // The text report's peak line: `peak  : in use N KiB  resident now ...`.
    let report = after.to_string();
    let report_peak = report
        .lines()
        .find_map(|l| l.strip_prefix("peak  : in use"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no peak line in:\n{report}"));
    println!("report_peak_kib={report_peak}");
    println!(
        "asked={asked} before={} during={} after={} peak_during={} peak_after={} arenas={} \
         peak_resident={}",
        before.in_use(),
        during.in_use(),
        after.in_use(),
        during.peak_in_use,
        after.peak_in_use,
        after.arenas.len(),
        after.peak_resident.unwrap_or(0),
    );
}

/// Runs the child for `case` with `env` added to an environment without `COREHEAP_*`;
/// returns a lookup of the numbers it printed.
fn run(case: &str, env: &[(&str, &str)]) -> impl Fn(&str) -> i64 {
    let out = common::rerun_self()
        .env(CHILD_VAR, case)
        .envs(env.iter().copied())
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    move |name: &str| -> i64 {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in: {stdout}"))
    }
}

/// `mallopt(M_ARENA_MAX, 3)` before the first allocation: three arenas; later calls are
/// accepted and change nothing; `COREHEAP_ARENAS` wins.
fn arena_max_sets_the_arena_count() {
    let v = run("arena_max", &[]);
    assert_eq!((v("r"), v("arenas"), v("r2"), v("later")), (1, 3, 1, 3));
    let v = run("arena_max", &[("COREHEAP_ARENAS", "2")]);
    assert_eq!((v("r"), v("arenas")), (1, 2), "the environment wins");
}

/// `mallopt(M_TRIM_THRESHOLD, 1M)`: freed pages go back past 1 MiB (or an eighth of what is
/// mapped, 8 MiB here) instead of 64 MiB; -1 keeps them again; `COREHEAP_DIRTY_MAX` wins.
fn trim_threshold_sets_the_dirty_limit() {
    let v = run("trim", &[]);
    assert_eq!((v("r"), v("r2")), (1, 1));
    assert!(v("before") >= 16 << 20, "default: {} dirty", v("before"));
    assert!(
        v("after") <= 10 << 20,
        "M_TRIM_THRESHOLD=1M: {} dirty",
        v("after")
    );
    assert!(
        v("never") >= 16 << 20,
        "M_TRIM_THRESHOLD=-1: {} dirty",
        v("never")
    );
    let v = run("trim", &[("COREHEAP_DIRTY_MAX", "64M")]);
    assert!(
        v("after") >= 16 << 20,
        "the environment wins: {} dirty",
        v("after")
    );
}

/// `M_MMAP_THRESHOLD` and `M_PERTURB` are accepted and have no effect.
fn other_parameters_are_accepted_and_ignored() {
    let v = run("ignored", &[]);
    assert_eq!((v("r"), v("huge")), (2, 0));
}

/// The peak of bytes in use: at least every block live at once, still there once they are
/// freed while the bytes in use fall back, and above the largest in-use figure by no more
/// than what the CPU caches and the arenas' 1 MiB publishing steps account for.
fn peak_counts_what_was_live() {
    let v = run("peak", &[]);
    let (asked, during, after) = (v("asked"), v("during"), v("after"));
    assert!(during >= asked, "in use {during} < asked {asked}");
    assert!(
        v("peak_during") >= during,
        "peak {} < in use {during}",
        v("peak_during")
    );
    assert_eq!(
        v("peak_after"),
        v("peak_during"),
        "freeing lowered the peak"
    );
    assert!(
        after <= v("before") + (1 << 20),
        "in use did not fall back: {after}"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let slack = cpus * 2 * coreheap::CPU_CACHE_BYTES as i64 + v("arenas") * (2 << 20);
    assert!(
        v("peak_after") <= during + slack,
        "peak {} beyond in use {during} + {slack}",
        v("peak_after")
    );
    assert_eq!(v("report_peak_kib"), (v("peak_after") + 1023) / 1024);
    // Every block was written while all were live.
    assert!(
        v("peak_resident") >= asked,
        "peak resident {}",
        v("peak_resident")
    );
}

fn main() {
    if let Some(case) = std::env::var_os(CHILD_VAR) {
        child(&case.to_string_lossy());
        return;
    }
    let tests: [(&str, fn()); 4] = [
        (
            "arena_max_sets_the_arena_count",
            arena_max_sets_the_arena_count,
        ),
        (
            "trim_threshold_sets_the_dirty_limit",
            trim_threshold_sets_the_dirty_limit,
        ),
        (
            "other_parameters_are_accepted_and_ignored",
            other_parameters_are_accepted_and_ignored,
        ),
        ("peak_counts_what_was_live", peak_counts_what_was_live),
    ];
    common::run_tests(&tests);
}
