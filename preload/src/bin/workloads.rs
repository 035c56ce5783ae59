//! `coreheap-workloads NAME [--threads N] [--scale F]`: allocator workloads for `coreheap bench`.
//!
//! Every workload block comes from `libc::malloc`/`realloc`/`free` (no `#[global_allocator]`),
//! so the allocator under test is whatever `LD_PRELOAD` puts in front of glibc. Each block gets
//! a pattern derived from its tag (a per-thread, seeded random number) when it is written, and
//! the pattern is checked before the block is freed. `--threads` (default: the number of CPUs)
//! sets the thread count; the work per thread is fixed, times `--scale` (default 1.0). At scale
//! 1.0 each workload takes 2-4 s under glibc with 2 threads on 2 cores.
//!
//! - `larson`: server churn after Larson and Krishnan: each thread replaces random blocks
//!   (16-512 B) in an array of 1000; after every round the arrays move on to the next thread,
//!   so many frees are remote.
//! - `prodcons`: half the threads malloc batches of 256 blocks (16-1024 B) and queue them; the
//!   other half verify and free them, so every free is remote.
//! - `larson-16`, `prodcons-16`: the same with 16 threads, however many cores there are, and
//!   the total work of two threads (each thread does an eighth).
//! - `batch`: one thread allocates N blocks of one size (16 or 64 B, alternately), N cycling
//!   25, 100, 400, 1600, then frees the first half in allocation order (FIFO) and the second
//!   half newest first (LIFO): batches larger than a per-CPU cache.
//! - `cache-thrash`: Hoard's active false sharing test: each thread mallocs an 8-64 B object,
//!   writes every byte 100 times, frees it.
//! - `cache-scratch`: Hoard's passive false sharing test: the main thread mallocs one 8 B object
//!   per thread back to back; each thread frees its own, then loops like `cache-thrash`.
//! - `mixed`: a ring of 2000 recent blocks plus 100 long-lived ones (one replaced every 64 steps
//!   on average) per thread, sizes log-distributed from 8 B to 1 MiB (mostly small); one word
//!   written per 64 B line, or per 4 KiB page from 4 KiB on.
//! - `fragment`: 300 live page-multiple blocks (4 KiB-1 MiB, mostly small) per thread, a random
//!   one replaced at each step, one word written per page.
//! - `realloc`: 256 buffers per thread grown by realloc to double (up to 256 KiB) or shrunk to
//!   half, sometimes restarted; the retained prefix is checked after every realloc.
//! - `huge`: one thread (whatever `--threads` says) keeps 20 buffers of 5-25 MiB, replaces a
//!   random one per step and fills every word of the new one, as a program building large
//!   arrays does.
//! - `large`: 64 live blocks of 9 KiB-256 KiB per thread, a random one replaced per step, one
//!   word written per page.
//!
//! Success prints one line, `NAME ok ops=<malloc+free+realloc calls> checksum=<u64>`, and exits 0;
//! both numbers depend only on the arguments. A failed content check prints
//! `NAME: content check failed ...` to stderr and exits 1; bad usage exits 2; a null from
//! malloc or realloc exits 3.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::{Barrier, Condvar, Mutex, OnceLock};
use std::thread;

type Workload = fn(&Params) -> Totals;

const WORKLOADS: &[(&str, Workload)] = &[
    ("larson", larson),
    ("prodcons", prodcons),
    ("larson-16", larson_16),
    ("prodcons-16", prodcons_16),
    ("batch", batch),
    ("cache-thrash", cache_thrash),
    ("cache-scratch", cache_scratch),
    ("mixed", mixed),
    ("fragment", fragment),
    ("realloc", realloc),
    ("huge", huge),
    ("large", large),
];

const USAGE: &str = "usage: coreheap-workloads NAME [--threads N] [--scale F]
       coreheap-workloads list

Runs one allocator workload with N threads (default: the number of CPUs), doing F times the
default work per thread (default 1.0), and prints `NAME ok ops=<count> checksum=<u64>`.";

/// The running workload's name, for messages from any thread.
static NAME: OnceLock<&'static str> = OnceLock::new();

fn main() {
    use lexopt::Arg::{Long, Short, Value};
    let mut name = None;
    let mut threads = None;
    let mut scale = 1.0f64;
    let mut p = lexopt::Parser::from_env();
    let text = |p: &mut lexopt::Parser| -> String {
        p.value()
            .map_err(|e| e.to_string())
            .and_then(|v| v.into_string().map_err(|_| "not UTF-8".to_string()))
            .unwrap_or_else(|e| usage(&e))
    };
    loop {
        let arg = match p.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => usage(&e.to_string()),
        };
        match arg {
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return;
            }
            Long("threads") => {
                let v = text(&mut p);
                match v.parse::<usize>() {
                    Ok(n) if (1..=4096).contains(&n) => threads = Some(n),
                    _ => usage(&format!("bad thread count {v}")),
                }
            }
            Long("scale") => {
                let v = text(&mut p);
                match v.parse::<f64>() {
                    Ok(f) if f.is_finite() && f > 0.0 => scale = f,
                    _ => usage(&format!("bad scale {v}")),
                }
            }
            Value(v) if name.is_none() => name = Some(v.to_string_lossy().into_owned()),
            a => usage(&a.unexpected().to_string()),
        }
    }
    let name = name.unwrap_or_else(|| usage("no workload named"));
    if name == "list" {
        for (n, _) in WORKLOADS {
            println!("{n}");
        }
        return;
    }
    let Some(&(name, run)) = WORKLOADS.iter().find(|(n, _)| *n == name) else {
        usage(&format!(
            "unknown workload {name} (try `coreheap-workloads list`)"
        ))
    };
    NAME.set(name).expect("set once");
    let threads = threads.unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
    let t = run(&Params { threads, scale });
    println!("{name} ok ops={} checksum={}", t.ops, t.checksum);
}

fn usage(msg: &str) -> ! {
    eprintln!("coreheap-workloads: {msg}\n{USAGE}");
    std::process::exit(2)
}

fn name() -> &'static str {
    NAME.get().copied().unwrap_or("coreheap-workloads")
}

/// Ends the process at once, from any thread, without running exit handlers.
fn die(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it ends the process without touching other threads'
    // state (stderr is unbuffered, so every message is already written).
    unsafe { libc::_exit(code) }
}

fn content_failed(what: &str, tag: u64, size: usize, off: usize, found: u64, want: u64) -> ! {
    eprintln!(
        "{}: content check failed {what}: block tag {tag:#018x} size {size} offset {off}: \
         found {found:#x}, expected {want:#x}",
        name()
    );
    die(1)
}

fn out_of_memory(call: &str, size: usize) -> ! {
    eprintln!("{}: {call}({size}) returned null", name());
    die(3)
}

struct Params {
    threads: usize,
    scale: f64,
}

impl Params {
    /// `base` units of work per thread, times the scale, at least 1.
    fn work(&self, base: u64) -> u64 {
        ((base as f64 * self.scale).round() as u64).max(1)
    }
}

#[derive(Default, Clone, Copy)]
struct Totals {
    /// malloc, free and realloc calls made on workload blocks.
    ops: u64,
    /// A wrapping sum over the blocks checked, independent of thread interleaving.
    checksum: u64,
}

impl Totals {
    fn add(mut self, o: Totals) -> Totals {
        self.ops += o.ops;
        self.checksum = self.checksum.wrapping_add(o.checksum);
        self
    }
}

/// Runs `f(0)`..`f(n-1)` on `n` threads and sums their totals.
fn run_threads<F: Fn(usize) -> Totals + Sync>(n: usize, f: F) -> Totals {
    thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n)
            .map(|t| {
                thread::Builder::new()
                    .name(format!("worker-{t}"))
                    .spawn_scoped(s, move || f(t))
                    .expect("spawn thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .fold(Totals::default(), Totals::add)
    })
}

/// xorshift64*, seeded from the workload's name and the thread's index.
struct Rng(u64);

impl Rng {
    fn new(thread: usize) -> Rng {
        let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a of the name, then splitmix64
        for b in name().bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let mut z = h.wrapping_add(
            (thread as u64)
                .wrapping_add(1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `2^(lo + (hi - lo) * u^skew)` for uniform `u`: log-distributed, more so to `lo` as
    /// `skew` grows.
    fn log_skewed(&mut self, lo: f64, hi: f64, skew: i32) -> f64 {
        (lo + (hi - lo) * self.unit().powi(skew)).exp2()
    }
}

/// The pattern word of block `tag` at byte offset `off`.
fn word(tag: u64, off: usize) -> u64 {
    tag ^ (off as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn malloc(size: usize) -> NonNull<u8> {
    // SAFETY: malloc has no preconditions.
    let p = unsafe { libc::malloc(size) };
    NonNull::new(p.cast()).unwrap_or_else(|| out_of_memory("malloc", size))
}

/// A live malloc'd block of `size` (at least 8) bytes, owned by this value.
struct Blk {
    p: NonNull<u8>,
    size: usize,
    tag: u64,
}

// SAFETY: a Blk is the only handle to its block, and malloc'd memory may be used and freed
// from any thread.
unsafe impl Send for Blk {}

impl Blk {
    /// Mallocs `size` bytes and writes the pattern of `tag` (see `offsets`).
    fn new(size: usize, tag: u64) -> Blk {
        assert!(size >= 8);
        let b = Blk {
            p: malloc(size),
            size,
            tag,
        };
        for off in b.offsets() {
            b.write(off, word(tag, off));
        }
        b
    }

    /// Where the pattern goes: one word per 64 B line (per 4 KiB page from 4 KiB on), and the
    /// last whole word (the last 8 bytes if the size is a multiple of 8).
    fn offsets(&self) -> impl Iterator<Item = usize> {
        let stride = if self.size < 4096 { 64 } else { 4096 };
        let last = (self.size - 8) & !7;
        (0..last).step_by(stride).chain(std::iter::once(last))
    }

    fn read(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.size);
        // SAFETY: the block is live and `size` bytes long, and off + 8 <= size.
        unsafe { self.p.as_ptr().add(off).cast::<u64>().read_unaligned() }
    }

    fn write(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.size);
        // SAFETY: as in `read`; nothing else refers to the block.
        unsafe { self.p.as_ptr().add(off).cast::<u64>().write_unaligned(v) }
    }

    /// Fails unless the word at `off` holds the pattern.
    fn expect(&self, off: usize, what: &str) -> u64 {
        let (found, want) = (self.read(off), word(self.tag, off));
        if found != want {
            content_failed(what, self.tag, self.size, off, found, want);
        }
        found
    }

    /// Checks the whole pattern and frees the block; returns its checksum contribution.
    fn free(self) -> u64 {
        let mut sum = self.size as u64;
        for off in self.offsets() {
            sum = sum.wrapping_add(self.expect(off, "before free"));
        }
        // SAFETY: the block came from malloc/realloc and is freed only here, consuming self.
        unsafe { libc::free(self.p.as_ptr().cast()) };
        sum
    }

    /// Reallocs to `size` bytes; the pattern must be filled in again by the caller.
    fn realloc(&mut self, size: usize) {
        // SAFETY: the block is live and came from malloc/realloc; on success the old pointer
        // is replaced, on failure the process exits.
        let p = unsafe { libc::realloc(self.p.as_ptr().cast(), size) };
        self.p = NonNull::new(p.cast()).unwrap_or_else(|| out_of_memory("realloc", size));
        self.size = size;
    }
}

/// Frees every block, returning the number of frees and the checksum.
fn free_all(blocks: impl IntoIterator<Item = Blk>) -> Totals {
    let mut t = Totals::default();
    for b in blocks {
        t.ops += 1;
        t.checksum = t.checksum.wrapping_add(b.free());
    }
    t
}

fn larson(p: &Params) -> Totals {
    const SLOTS: usize = 1000;
    const ROUND: u64 = 2000;
    let n = p.threads;
    let steps = p.work(24_000_000);
    let rounds = steps.div_ceil(ROUND) as usize;
    let arrays: Vec<Mutex<Vec<Blk>>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
    let barrier = Barrier::new(n);
    run_threads(n, |t| {
        let mut rng = Rng::new(t);
        let mut tot = Totals::default();
        *arrays[t].lock().unwrap() = (0..SLOTS)
            .map(|_| Blk::new(rng.range(16, 512), rng.next()))
            .collect();
        tot.ops += SLOTS as u64;
        barrier.wait();
        let mut left = steps;
        for r in 0..rounds {
            // Round r works on the array thread t + r had in round 0.
            let mut a = arrays[(t + r) % n].lock().unwrap();
            for _ in 0..left.min(ROUND) {
                let slot = &mut a[rng.below(SLOTS)];
                let (size, tag) = (rng.range(16, 512), rng.next());
                let old = std::mem::replace(slot, Blk::new(size, tag));
                tot.checksum = tot.checksum.wrapping_add(old.free());
                tot.ops += 2;
            }
            left -= left.min(ROUND);
            drop(a);
            barrier.wait();
        }
        let last = std::mem::take(&mut *arrays[(t + rounds) % n].lock().unwrap());
        tot.add(free_all(last))
    })
}

/// `larson` with 16 threads doing the work of two.
fn larson_16(p: &Params) -> Totals {
    larson(&Params {
        threads: 16,
        scale: p.scale / 8.0,
    })
}

/// `prodcons` with 16 threads doing the work of two.
fn prodcons_16(p: &Params) -> Totals {
    prodcons(&Params {
        threads: 16,
        scale: p.scale / 8.0,
    })
}

fn batch(p: &Params) -> Totals {
    const SIZES: [usize; 2] = [16, 64];
    const COUNTS: [usize; 4] = [25, 100, 400, 1600];
    let rounds = p.work(100_000) as usize;
    let mut rng = Rng::new(0);
    let mut tot = Totals::default();
    let mut live: Vec<Blk> = Vec::with_capacity(1600);
    for r in 0..rounds {
        let size = SIZES[r % 2];
        let n = COUNTS[(r / 2) % 4];
        live.extend((0..n).map(|_| Blk::new(size, rng.next())));
        let half = n / 2;
        // The older half in allocation order, then the newer half newest first.
        let newer = live.split_off(half);
        for b in live.drain(..) {
            tot.checksum = tot.checksum.wrapping_add(b.free());
        }
        for b in newer.into_iter().rev() {
            tot.checksum = tot.checksum.wrapping_add(b.free());
        }
        tot.ops += 2 * n as u64;
    }
    tot
}

struct Queue {
    batches: VecDeque<Vec<Blk>>,
    producing: usize,
}

fn prodcons(p: &Params) -> Totals {
    const BATCH: usize = 256;
    let producers = (p.threads / 2).max(1);
    let consumers = (p.threads - producers).max(1);
    let batches = p.work(30_000);
    let cap = 4 * consumers;
    let queue = Mutex::new(Queue {
        batches: VecDeque::new(),
        producing: producers,
    });
    let (not_empty, not_full) = (Condvar::new(), Condvar::new());
    run_threads(producers + consumers, |t| {
        let mut tot = Totals::default();
        if t < producers {
            let mut rng = Rng::new(t);
            for _ in 0..batches {
                let batch: Vec<Blk> = (0..BATCH)
                    .map(|_| Blk::new(rng.range(16, 1024), rng.next()))
                    .collect();
                tot.ops += BATCH as u64;
                let mut q = queue.lock().unwrap();
                while q.batches.len() >= cap {
                    q = not_full.wait(q).unwrap();
                }
                q.batches.push_back(batch);
                not_empty.notify_one();
            }
            let mut q = queue.lock().unwrap();
            q.producing -= 1;
            if q.producing == 0 {
                not_empty.notify_all();
            }
        } else {
            loop {
                let mut q = queue.lock().unwrap();
                while q.batches.is_empty() && q.producing > 0 {
                    q = not_empty.wait(q).unwrap();
                }
                let Some(batch) = q.batches.pop_front() else {
                    break;
                };
                not_full.notify_one();
                drop(q);
                tot = tot.add(free_all(batch));
            }
        }
        tot
    })
}

/// Mallocs `size` bytes, writes each byte `REPS` times, checks the last values and frees it.
fn scribble(size: usize, seed: u64) -> u64 {
    const REPS: usize = 100;
    let p = malloc(size).as_ptr();
    let v = |j: usize, r: usize| (seed as u8).wrapping_add(j as u8).wrapping_add(r as u8);
    for r in 0..REPS {
        for j in 0..size {
            // SAFETY: the object is live and j < size; volatile keeps every write.
            unsafe { p.add(j).write_volatile(v(j, r)) };
        }
    }
    let mut sum = 0u64;
    for j in 0..size {
        // SAFETY: as above.
        let found = unsafe { p.add(j).read_volatile() };
        if found != v(j, REPS - 1) {
            let want = v(j, REPS - 1);
            content_failed("in object", seed, size, j, found.into(), want.into());
        }
        sum += u64::from(found);
    }
    // SAFETY: p came from malloc above and is freed once.
    unsafe { libc::free(p.cast()) };
    sum
}

fn cache_thrash(p: &Params) -> Totals {
    let iters = p.work(2_200_000);
    run_threads(p.threads, |t| {
        let mut rng = Rng::new(t);
        let mut tot = Totals::default();
        for _ in 0..iters {
            let (size, seed) = (rng.range(8, 64), rng.next());
            tot.checksum = tot.checksum.wrapping_add(scribble(size, seed));
            tot.ops += 2;
        }
        tot
    })
}

fn cache_scratch(p: &Params) -> Totals {
    const SIZE: usize = 8;
    let iters = p.work(11_000_000);
    let mut rng = Rng::new(usize::MAX);
    let given: Vec<Mutex<Option<Blk>>> = (0..p.threads)
        .map(|_| Mutex::new(Some(Blk::new(SIZE, rng.next()))))
        .collect();
    let start = Totals {
        ops: p.threads as u64,
        checksum: 0,
    };
    start.add(run_threads(p.threads, |t| {
        let mut rng = Rng::new(t);
        let mine = given[t]
            .lock()
            .unwrap()
            .take()
            .expect("one object per thread");
        let mut tot = free_all([mine]);
        for _ in 0..iters {
            tot.checksum = tot.checksum.wrapping_add(scribble(SIZE, rng.next()));
            tot.ops += 2;
        }
        tot
    }))
}

fn mixed(p: &Params) -> Totals {
    const RING: usize = 2000;
    const LONG: usize = 100;
    let steps = p.work(2_000_000);
    run_threads(p.threads, |t| {
        let mut rng = Rng::new(t);
        // 8 B to 1 MiB, median about 35 B, a fifth from 4 KiB, mean about 32 KiB.
        let new = |rng: &mut Rng| {
            let size = rng.log_skewed(3.0, 20.0, 3) as usize;
            Blk::new(size, rng.next())
        };
        let mut long: Vec<Blk> = (0..LONG).map(|_| new(&mut rng)).collect();
        let mut ring: Vec<Blk> = (0..RING).map(|_| new(&mut rng)).collect();
        let mut tot = Totals {
            ops: (LONG + RING) as u64,
            checksum: 0,
        };
        for s in 0..steps as usize {
            let old = std::mem::replace(&mut ring[s % RING], new(&mut rng));
            tot.checksum = tot.checksum.wrapping_add(old.free());
            tot.ops += 2;
            if rng.below(64) == 0 {
                let i = rng.below(LONG);
                let old = std::mem::replace(&mut long[i], new(&mut rng));
                tot.checksum = tot.checksum.wrapping_add(old.free());
                tot.ops += 2;
            }
        }
        tot.add(free_all(ring)).add(free_all(long))
    })
}

fn fragment(p: &Params) -> Totals {
    const LIVE: usize = 300;
    let steps = p.work(1_200_000);
    run_threads(p.threads, |t| {
        let mut rng = Rng::new(t);
        // 1 to 256 pages, a quarter single pages, mean about 26 pages.
        let new = |rng: &mut Rng| {
            let pages = rng.log_skewed(0.0, 8.0, 2).round() as usize;
            Blk::new(pages * 4096, rng.next())
        };
        let mut live: Vec<Blk> = (0..LIVE).map(|_| new(&mut rng)).collect();
        let mut tot = Totals {
            ops: LIVE as u64,
            checksum: 0,
        };
        for _ in 0..steps {
            let i = rng.below(LIVE);
            // Free before malloc, so the new block can reuse the space.
            let old = std::mem::replace(&mut live[i], new(&mut rng));
            tot.checksum = tot.checksum.wrapping_add(old.free());
            tot.ops += 2;
        }
        tot.add(free_all(live))
    })
}

fn huge(p: &Params) -> Totals {
    const LIVE: usize = 20;
    const MIB: usize = 1 << 20;
    let steps = p.work(400);
    run_threads(1, |t| {
        let mut rng = Rng::new(t);
        let new = |rng: &mut Rng| {
            let b = Blk::new(rng.range(5 * MIB, 25 * MIB) & !7, rng.next());
            fill(&b, 0);
            b
        };
        replace_at_random(LIVE, steps, &mut rng, new)
    })
}

fn large(p: &Params) -> Totals {
    const LIVE: usize = 64;
    let steps = p.work(1_500_000);
    run_threads(p.threads, |t| {
        let mut rng = Rng::new(t);
        let new = |rng: &mut Rng| Blk::new(rng.range(9 << 10, 256 << 10) & !7, rng.next());
        replace_at_random(LIVE, steps, &mut rng, new)
    })
}

/// `live` blocks made by `new`, then `steps` times one at random freed and replaced (free
/// before malloc, as a program replacing a buffer does), then all freed.
fn replace_at_random(
    live: usize,
    steps: u64,
    rng: &mut Rng,
    new: impl Fn(&mut Rng) -> Blk,
) -> Totals {
    let mut blocks: Vec<Blk> = (0..live).map(|_| new(rng)).collect();
    let mut tot = Totals {
        ops: live as u64,
        checksum: 0,
    };
    for _ in 0..steps {
        let i = rng.below(live);
        tot.checksum = tot.checksum.wrapping_add(blocks.swap_remove(i).free());
        blocks.push(new(rng));
        tot.ops += 2;
    }
    tot.add(free_all(blocks))
}

/// A buffer whose every word holds the pattern, like a vector of u64.
fn fill(b: &Blk, from: usize) {
    for off in (from..b.size).step_by(8) {
        b.write(off, word(b.tag, off));
    }
}

fn realloc(p: &Params) -> Totals {
    const BUFS: usize = 256;
    const MAX: usize = 256 << 10;
    let steps = p.work(9_000_000);
    run_threads(p.threads, |t| {
        let mut rng = Rng::new(t);
        let new = |rng: &mut Rng| {
            let b = Blk::new(8 * rng.range(1, 8), rng.next());
            fill(&b, 0);
            b
        };
        let mut bufs: Vec<Blk> = (0..BUFS).map(|_| new(&mut rng)).collect();
        let mut tot = Totals {
            ops: BUFS as u64,
            checksum: 0,
        };
        for _ in 0..steps {
            let b = &mut bufs[rng.below(BUFS)];
            let old = b.size;
            let r = rng.below(100);
            let shrink = old >= 16 && old & 15 == 0 && (r >= 60 || old * 2 > MAX);
            if r < 8 {
                let fresh = new(&mut rng);
                tot.checksum = tot
                    .checksum
                    .wrapping_add(std::mem::replace(b, fresh).free());
                tot.ops += 2;
                continue;
            }
            let size = if shrink { old / 2 } else { old * 2 };
            b.realloc(size);
            tot.ops += 1;
            let last = size.min(old) - 8;
            let c = b.expect(0, "after realloc") ^ b.expect(last, "after realloc");
            tot.checksum = tot.checksum.wrapping_add(c);
            if !shrink {
                fill(b, old);
            }
        }
        tot.add(free_all(bufs))
    })
}
