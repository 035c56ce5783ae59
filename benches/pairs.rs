//! Allocation microbenchmarks: coreheap against glibc malloc (`System`) and mimalloc, all
//! three called through `GlobalAlloc` in one process (no `#[global_allocator]`), each behind
//! a [`Shim`] of functions that are never inlined. A program with `#[global_allocator]`
//! calls `__rust_alloc` and `__rust_dealloc`, out-of-line functions that call the
//! allocator's methods; the shim stands for them, so that coreheap's methods, which would
//! otherwise inline into the timed loop, cost the call a real program pays (mimalloc's and
//! glibc's then pay the shim's call and their own FFI call, as they do in a real program).
//!
//! ```text
//! cargo bench --bench pairs              # full run, well under a minute
//! cargo bench --bench pairs -- --quick   # a few seconds (or BENCH_QUICK=1)
//! BENCH_ONLY="pair 16 KiB,batch" cargo bench --bench pairs   # rows whose name contains one
//! ```
//!
//! The single-thread workloads run pinned to the last core. Every allocator is initialised
//! before that pinning: coreheap sizes its arena table from the affinity mask it sees at its
//! first allocation, and would otherwise make one arena for the whole process.
//!
//! Workloads (every time is the median of several runs; runs are interleaved across the
//! allocators, A B C A B C ..., so drift hits all three alike):
//! 1. `pair`: same-thread `alloc` + `dealloc` of one size, ns per pair. One byte of each
//!    block is written so the block is really handed out.
//! 2. `mt pair`: the same on every core at once, one pinned thread per core; reported as
//!    wall time / pairs per thread (so perfect scaling equals the single-thread figure).
//! 3. `prod/cons`: producer threads allocate blocks in batches of 1000 and send them to
//!    consumer threads on the other cores, which free them all; ns per block (wall time /
//!    blocks). Batch vectors are recycled through a return channel, so the channels
//!    themselves do not allocate while timed; both sides poll the channels rather than
//!    sleep on them (each thread has a core of its own).
//! 4. `batch`: 1000 blocks of random small sizes, then freed in random order, same thread;
//!    ns per block (one alloc + one free).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use coreheap::CoreHeap;
use mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Core,
    Sys,
    Mi,
}

const ALL: [Which; 3] = [Which::Core, Which::Sys, Which::Mi];

/// An allocator behind out-of-line functions, as `#[global_allocator]` puts it behind
/// `__rust_alloc` and friends (see the module documentation).
struct Shim<A>(A);

// SAFETY: every method forwards to the wrapped allocator with the same arguments.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Shim<A> {
    #[inline(never)]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { self.0.alloc(l) }
    }
    #[inline(never)]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded.
        unsafe { self.0.dealloc(p, l) }
    }
    #[inline(never)]
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { self.0.alloc_zeroed(l) }
    }
    #[inline(never)]
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { self.0.realloc(p, l, n) }
    }
}

/// Calls the generic function `$f` with the allocator `$w` stands for (behind its [`Shim`])
/// as first argument, so each allocator gets its own monomorphised (statically dispatched)
/// copy.
macro_rules! dispatch {
    ($w:expr, $f:ident ( $($arg:expr),* )) => {
        match $w {
            Which::Core => $f(&Shim(CoreHeap::new()), $($arg),*),
            Which::Sys => $f(&Shim(System), $($arg),*),
            Which::Mi => $f(&Shim(MiMalloc), $($arg),*),
        }
    };
}

/// Run lengths and repetition counts.
#[derive(Clone)]
struct Config {
    /// Target duration of one timed run.
    run: Duration,
    /// Timed runs per allocator and workload (the median is reported).
    reps: usize,
    quick: bool,
    /// Only rows whose name contains one of these comma-separated strings (env `BENCH_ONLY`),
    /// for profiling one workload.
    only: Option<String>,
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).expect("valid layout")
}

fn oom(size: usize) -> ! {
    eprintln!("allocation of {size} bytes failed");
    std::process::abort()
}

// ---------------------------------------------------------------------------------------
// Workload bodies (generic over the allocator).

/// `n` same-thread alloc+free pairs of `size` bytes.
#[inline(never)]
fn pairs<A: GlobalAlloc>(a: &A, size: usize, n: usize) -> Duration {
    let l = layout(size);
    let t = Instant::now();
    for i in 0..n {
        // SAFETY: `l` has a non-zero size.
        let p = unsafe { a.alloc(l) };
        if p.is_null() {
            oom(size);
        }
        // SAFETY: `p` is a fresh block of at least one byte, freed right after with the
        // layout it was allocated with.
        unsafe {
            p.write(i as u8);
            a.dealloc(black_box(p), l);
        }
    }
    t.elapsed()
}

/// `pairs` on every core at once: one thread per core, pinned. Returns the wall time from
/// the common start until the last thread is done.
fn pairs_mt(w: Which, size: usize, n: usize, cores: &[core_affinity::CoreId]) -> Duration {
    let start = Arc::new(Barrier::new(cores.len() + 1));
    let handles: Vec<_> = cores
        .iter()
        .map(|&c| {
            let start = start.clone();
            thread::spawn(move || {
                core_affinity::set_for_current(c);
                start.wait();
                let t = Instant::now();
                dispatch!(w, pairs(size, n));
                (t, Instant::now())
            })
        })
        .collect();
    start.wait();
    wall(handles)
}

/// The wall time from the earliest start to the latest end reported by `handles`. Taken in
/// the workers, not in the (possibly descheduled) spawning thread.
fn wall(handles: Vec<thread::JoinHandle<(Instant, Instant)>>) -> Duration {
    let spans: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .collect();
    let first = spans.iter().map(|s| s.0).min().expect("a thread");
    let last = spans.iter().map(|s| s.1).max().expect("a thread");
    last - first
}

const BATCH: usize = 1000;

/// Receives without sleeping (the threads have a core each): a futex sleep and wake-up per
/// batch costs tens of microseconds on a virtual machine and would swamp the allocators.
/// `None` once the sender is gone and the channel is empty.
fn spin_recv<T>(rx: &Receiver<T>) -> Option<T> {
    let mut spins = 0u32;
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {
                spins += 1;
                if spins.is_multiple_of(1024) {
                    thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// Sends without sleeping; a send to a receiver that is gone is dropped (the producer may
/// have finished before the consumer returns its last batch).
fn spin_send<T>(tx: &SyncSender<T>, mut v: T) {
    let mut spins = 0u32;
    loop {
        match tx.try_send(v) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(back)) => {
                v = back;
                spins += 1;
                if spins.is_multiple_of(1024) {
                    thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// Producer side: `batches` batches of `BATCH` blocks of `size` bytes.
fn produce<A: GlobalAlloc>(
    a: &A,
    size: usize,
    batches: usize,
    tx: SyncSender<Vec<usize>>,
    empty: Receiver<Vec<usize>>,
) {
    let l = layout(size);
    for _ in 0..batches {
        let mut v = spin_recv(&empty).expect("recycled batch");
        for i in 0..BATCH {
            // SAFETY: `l` has a non-zero size.
            let p = unsafe { a.alloc(l) };
            if p.is_null() {
                oom(size);
            }
            // SAFETY: `p` is a fresh block of at least one byte.
            unsafe { p.write(i as u8) };
            v.push(p as usize);
        }
        spin_send(&tx, v);
    }
}

/// Consumer side: frees every block it receives until the producer hangs up.
fn consume<A: GlobalAlloc>(
    a: &A,
    size: usize,
    rx: Receiver<Vec<usize>>,
    back: SyncSender<Vec<usize>>,
) {
    let l = layout(size);
    while let Some(mut v) = spin_recv(&rx) {
        for &p in &v {
            // SAFETY: the producer allocated `p` from this allocator with layout `l` and
            // gave it up when it sent the batch.
            unsafe { a.dealloc(p as *mut u8, l) };
        }
        v.clear();
        spin_send(&back, v);
    }
}

/// Producer/consumer cross-thread frees. `pairs` producer threads on the first cores, as
/// many consumers on the others; each producer sends `batches` batches. Returns wall time.
fn prod_cons(
    w: Which,
    size: usize,
    batches: usize,
    producers: &[core_affinity::CoreId],
    consumers: &[core_affinity::CoreId],
) -> Duration {
    let start = Arc::new(Barrier::new(producers.len() + consumers.len() + 1));
    let mut handles = Vec::new();
    for (&pc, &cc) in producers.iter().zip(consumers) {
        let (tx, rx) = sync_channel::<Vec<usize>>(4);
        let (back_tx, back_rx) = sync_channel::<Vec<usize>>(8);
        for _ in 0..8 {
            back_tx
                .send(Vec::with_capacity(BATCH))
                .expect("fresh channel");
        }
        let s = start.clone();
        handles.push(thread::spawn(move || {
            core_affinity::set_for_current(pc);
            s.wait();
            let t = Instant::now();
            dispatch!(w, produce(size, batches, tx, back_rx));
            (t, Instant::now())
        }));
        let s = start.clone();
        handles.push(thread::spawn(move || {
            core_affinity::set_for_current(cc);
            s.wait();
            let t = Instant::now();
            dispatch!(w, consume(size, rx, back_tx));
            (t, Instant::now())
        }));
    }
    start.wait();
    wall(handles)
}

/// The random small-batch workload: per round, allocate `sizes.len()` blocks of the given
/// sizes, then free them in the order `perm`.
#[inline(never)]
fn small_batch<A: GlobalAlloc>(
    a: &A,
    sizes: &[usize],
    perm: &[usize],
    ptrs: &mut [*mut u8],
    rounds: usize,
) -> Duration {
    let t = Instant::now();
    for _ in 0..rounds {
        for (slot, &s) in ptrs.iter_mut().zip(sizes) {
            // SAFETY: every size is non-zero.
            let p = unsafe { a.alloc(layout(s)) };
            if p.is_null() {
                oom(s);
            }
            // SAFETY: `p` is a fresh block of at least one byte.
            unsafe { p.write(s as u8) };
            *slot = p;
        }
        for &i in perm {
            // SAFETY: `ptrs[i]` was allocated above with `layout(sizes[i])`; `perm` is a
            // permutation, so each block is freed once.
            unsafe { a.dealloc(black_box(ptrs[i]), layout(sizes[i])) };
        }
    }
    t.elapsed()
}

/// The batch shape of issue 14: one size (16 B, then 64 B), N cycling 25, 100, 400 and
/// 1600: allocate N blocks, free the older half in allocation order and the newer half
/// newest first. `cycles` full cycles (8 rounds each, 4250 operations).
#[inline(never)]
fn fifo_lifo_batch<A: GlobalAlloc>(a: &A, ptrs: &mut [*mut u8], cycles: usize) -> Duration {
    let t = Instant::now();
    for _ in 0..cycles {
        for &n in &[25usize, 100, 400, 1600] {
            for size in [16usize, 64] {
                let l = layout(size);
                for slot in ptrs[..n].iter_mut() {
                    // SAFETY: non-zero size.
                    let p = unsafe { a.alloc(l) };
                    if p.is_null() {
                        oom(size);
                    }
                    // SAFETY: a fresh block of at least one byte.
                    unsafe { p.write(n as u8) };
                    *slot = p;
                }
                let half = n / 2;
                for &p in ptrs[..half].iter().chain(ptrs[half..n].iter().rev()) {
                    // SAFETY: allocated above with `l`, each freed once.
                    unsafe { a.dealloc(black_box(p), l) };
                }
            }
        }
    }
    t.elapsed()
}

// ---------------------------------------------------------------------------------------
// Measurement driver.

/// xorshift64*: deterministic, allocation-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One row of the result table: median ns per operation for each allocator, plus the
/// spread (max - min) / median of the slowest-spread allocator, in percent.
struct Row {
    name: String,
    median: [f64; 3],
    spread: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Measures a workload. `run(w, ops)` performs `ops` operations with allocator `w` and returns
/// the time they took. A calibration run (also the warm-up) with `probe` operations per
/// allocator sets the operation count so the slowest allocator's run lasts about
/// `cfg.run`; then `cfg.reps` interleaved timed runs follow.
fn measure(
    cfg: &Config,
    name: String,
    probe: usize,
    unit: usize,
    mut run: impl FnMut(Which, usize) -> Duration,
) -> Option<Row> {
    if cfg
        .only
        .as_ref()
        .is_some_and(|o| !o.split(',').any(|o| name.contains(o)))
    {
        return None;
    }
    // Warm-up: twice per allocator (the first may map fresh memory), the second calibrates.
    let mut slowest = 0f64;
    for w in ALL {
        run(w, probe);
        let d = run(w, probe);
        slowest = slowest.max(d.as_secs_f64() / probe as f64);
    }
    let ops = ((cfg.run.as_secs_f64() / slowest.max(1e-12)) as usize)
        .clamp((probe / 10).max(unit), 1 << 30);
    let ops = ops.div_ceil(unit) * unit;
    let mut samples: [Vec<f64>; 3] = Default::default();
    for _ in 0..cfg.reps {
        for (k, w) in ALL.into_iter().enumerate() {
            let d = run(w, ops);
            samples[k].push(d.as_secs_f64() * 1e9 / ops as f64);
        }
    }
    let mut median3 = [0.0; 3];
    let mut spread = 0f64;
    for (k, s) in samples.iter_mut().enumerate() {
        let m = median(s);
        median3[k] = m;
        let (lo, hi) = (s[0], s[s.len() - 1]);
        spread = spread.max((hi - lo) / m * 100.0);
    }
    let row = Row {
        name,
        median: median3,
        spread,
    };
    print_row(&row);
    Some(row)
}

fn print_header() {
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7}",
        "workload (ns/op)", "coreheap", "System", "mimalloc", "core/sys", "core/mi", "spread"
    );
}

fn print_row(r: &Row) {
    println!(
        "{:<22} {:>10.2} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>6.0}%",
        r.name,
        r.median[0],
        r.median[1],
        r.median[2],
        r.median[0] / r.median[1],
        r.median[0] / r.median[2],
        r.spread
    );
}

fn size_name(s: usize) -> String {
    if s >= 1 << 20 {
        format!("{} MiB", s >> 20)
    } else if s >= 16 << 10 {
        format!("{} KiB", s >> 10)
    } else {
        format!("{s} B")
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let only = std::env::var("BENCH_ONLY").ok().filter(|o| !o.is_empty());
    let cfg = if quick {
        Config {
            run: Duration::from_millis(3),
            reps: 3,
            quick,
            only,
        }
    } else {
        Config {
            run: Duration::from_millis(40),
            reps: 11,
            quick,
            only,
        }
    };
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let ncores = cores.len().max(1);
    println!(
        "coreheap pairs bench: {} cores, {} mode ({} timed runs of ~{} ms per allocator and row)",
        ncores,
        if cfg.quick { "quick" } else { "full" },
        cfg.reps,
        cfg.run.as_millis()
    );
    println!("spread = (max - min) / median over the timed runs, worst of the three allocators");
    println!();

    // Initialise every allocator before narrowing this thread's affinity: coreheap sizes
    // its arena table from the affinity mask it sees at its first allocation.
    for w in ALL {
        dispatch!(w, pairs(64, 1));
    }

    // The single-thread workloads run pinned, so coreheap's CPU (arena) never changes under
    // them and no allocator pays for migrations.
    if let Some(&last) = cores.last() {
        core_affinity::set_for_current(last);
    }

    print_header();
    println!("-- 1. same-thread alloc+free pair");
    let mut rows = Vec::new();
    let mut sizes: Vec<usize> = (4..=13).map(|s| 1usize << s).collect();
    sizes.extend([16 << 10, 256 << 10, 1 << 20]);
    for &s in &sizes {
        rows.extend(measure(
            &cfg,
            format!("pair {}", size_name(s)),
            20_000,
            1,
            |w, n| dispatch!(w, pairs(s, n)),
        ));
    }

    println!("-- 2. pairs on all {ncores} cores (wall / pairs per thread)");
    if cores.is_empty() {
        println!("   (core ids unavailable: skipped)");
    } else {
        for s in [16, 64, 256, 1024] {
            rows.extend(measure(
                &cfg,
                format!("mt pair {}", size_name(s)),
                50_000,
                1,
                |w, n| pairs_mt(w, s, n, &cores),
            ));
        }
    }

    let np = (ncores / 2).max(1);
    println!("-- 3. producer/consumer, {np} -> {np} thread(s), batches of {BATCH} (ns per block)");
    if cores.len() < 2 {
        println!("   (needs two cores: skipped)");
    } else {
        let (prod, cons) = cores.split_at(np);
        // 4 KiB: a class above the inbox's 1 KiB; 64 KiB: a large class, whose remote frees
        // go through the outbox four at a time.
        for s in [64, 256, 4 << 10, 64 << 10] {
            rows.extend(measure(
                &cfg,
                format!("prod/cons {}", size_name(s)),
                20 * BATCH * np,
                BATCH * np,
                |w, n| prod_cons(w, s, n / (BATCH * np), prod, &cons[..np]),
            ));
        }
    }

    println!(
        "-- 4. 1000 random small sizes (8..4096 B, log-uniform), freed shuffled (ns per block)"
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let batch_sizes: Vec<usize> = (0..1000)
        .map(|_| {
            let shift = 3 + rng.below(9); // 8 .. 2^12
            (1usize << shift) + rng.below(1 << shift)
        })
        .collect();
    let mut perm: Vec<usize> = (0..batch_sizes.len()).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let mut ptrs = vec![std::ptr::null_mut::<u8>(); batch_sizes.len()];
    let nb = batch_sizes.len();
    rows.extend(measure(
        &cfg,
        "batch 1000 random".to_string(),
        20 * nb,
        nb,
        |w, n| dispatch!(w, small_batch(&batch_sizes, &perm, &mut ptrs, n / nb)),
    ));

    // One cycle: 2 sizes x (25 + 100 + 400 + 1600) blocks, each allocated and freed.
    const CYCLE_OPS: usize = 2 * 2 * (25 + 100 + 400 + 1600);
    let mut ptrs = vec![std::ptr::null_mut::<u8>(); 1600];
    rows.extend(measure(
        &cfg,
        "batch 25-1600 fifo/lifo".to_string(),
        20 * CYCLE_OPS,
        CYCLE_OPS,
        |w, n| dispatch!(w, fifo_lifo_batch(&mut ptrs, n / CYCLE_OPS)),
    ));

    println!();
    println!("summary (medians, ns per op)");
    print_header();
    for r in &rows {
        print_row(r);
    }
}
