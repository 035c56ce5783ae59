//! Shared heap against the in-process heap: the same workloads, in one process and in
//! several processes at once.
//!
//! ```text
//! cargo bench --bench shm              # about half a minute
//! cargo bench --bench shm -- --quick
//! ```
//!
//! Workloads (ns per operation, median of the runs; each process runs the workload on its
//! own, all processes start together):
//! - `pair 64 B`: `alloc` + `free` of one 64-byte block, same thread;
//! - `batch`: 1000 blocks of random sizes (16 B - 2 KiB) allocated, then freed in random
//!   order; ns per block;
//! - `handoff`: processes (or threads) in pairs; one allocates 64-byte blocks and passes
//!   their offsets through a ring in the shared heap, the other frees them (every free is
//!   a free of another process's block); ns per block. In-process it is two threads.
//!
//! `process heap` is coreheap's in-process heap (`CoreHeap` called through `GlobalAlloc`,
//! with its per-CPU caches when rseq is available): in the multi-process rows each process
//! has its own; `(no rseq cache)` is the same with `COREHEAP_RSEQ=0` (every operation under
//! the arena's futex lock, as in the shared heap). `shared heap` is one `SharedHeap` that
//! all processes map. `ratio` is shared / process heap, `ratio2` shared / no rseq cache.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use coreheap::shm::SharedHeap;
use coreheap::CoreHeap;

const ROLE: &str = "COREHEAP_SHM_BENCH_ROLE";

/// One process's allocator for a run.
#[allow(clippy::large_enum_variant)] // one per process, never moved
enum Heap {
    Process(CoreHeap),
    Shared(SharedHeap),
}

impl Heap {
    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        let l = Layout::from_size_align(size, 8).unwrap();
        match self {
            // SAFETY: non-zero size.
            Heap::Process(h) => unsafe { h.alloc(l) },
            Heap::Shared(h) => h.alloc(l),
        }
    }
    /// # Safety
    /// `p` came from `alloc(size)` of this heap.
    #[inline]
    unsafe fn free(&self, p: *mut u8, size: usize) {
        let l = Layout::from_size_align(size, 8).unwrap();
        match self {
            // SAFETY: by the contract.
            Heap::Process(h) => unsafe { h.dealloc(p, l) },
            // SAFETY: by the contract.
            Heap::Shared(h) => unsafe { h.free(p) },
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn pair(h: &Heap, n: usize) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let p = h.alloc(64);
        // SAFETY: a live 64-byte block.
        unsafe {
            p.write(i as u8);
            h.free(black_box(p), 64);
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn batch(h: &Heap, rounds: usize) -> f64 {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut v: Vec<(*mut u8, usize)> = Vec::with_capacity(1000);
    let t = Instant::now();
    for _ in 0..rounds {
        for _ in 0..1000 {
            let s = 16 + (rng.next() % 2033) as usize;
            let p = h.alloc(s);
            // SAFETY: a live block.
            unsafe { p.write(1) };
            v.push((p, s));
        }
        for i in (1..v.len()).rev() {
            v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for (p, s) in v.drain(..) {
            // SAFETY: our block.
            unsafe { h.free(p, s) };
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * 1000) as f64
}

/// Rings in the shared heap: at most this many producer/consumer pairs.
const MAX_PAIRS: usize = 16;

/// A single-producer single-consumer ring of offsets (or addresses) in shared memory.
const RING: usize = 1024;
#[repr(C)]
struct Ring {
    head: AtomicU64,
    _pad: [u64; 15],
    tail: AtomicU64,
    _pad2: [u64; 15],
    slots: [AtomicU64; RING],
}

fn handoff(h: &Heap, ring: &Ring, producer: bool, n: usize, base: usize) -> f64 {
    let t = Instant::now();
    if producer {
        for i in 0..n as u64 {
            let p = h.alloc(64);
            // SAFETY: a live block.
            unsafe { p.write(1) };
            while i - ring.tail.load(Ordering::Acquire) >= RING as u64 {
                std::hint::spin_loop();
            }
            ring.slots[i as usize % RING].store(p as u64 - base as u64, Ordering::Relaxed);
            ring.head.store(i + 1, Ordering::Release);
        }
    } else {
        for i in 0..n as u64 {
            while ring.head.load(Ordering::Acquire) <= i {
                std::hint::spin_loop();
            }
            let p =
                (ring.slots[i as usize % RING].load(Ordering::Relaxed) + base as u64) as *mut u8;
            ring.tail.store(i + 1, Ordering::Release);
            // SAFETY: the producer gave the block up.
            unsafe { h.free(p, 64) };
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

#[derive(Clone, Copy)]
struct Sizes {
    pairs: usize,
    rounds: usize,
    handoffs: usize,
    runs: usize,
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("BENCH_QUICK").is_some();
    let z = if quick {
        Sizes {
            pairs: 200_000,
            rounds: 200,
            handoffs: 200_000,
            runs: 1,
        }
    } else {
        Sizes {
            pairs: 2_000_000,
            rounds: 2000,
            handoffs: 1_000_000,
            runs: 3,
        }
    };
    if let Ok(role) = std::env::var(ROLE) {
        child(&role, z);
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let path = PathBuf::from(format!("/dev/shm/coreheap-bench-{}", std::process::id()));
    let heap = SharedHeap::create(&path, 1 << 30).expect("create the shared heap");
    let rings = heap.alloc_zeroed(Layout::array::<Ring>(MAX_PAIRS).unwrap()) as *mut Ring;
    heap.set_root(heap.offset_of(rings));
    println!(
        "shared heap vs process heap: ns per operation (median of {}), {} cores, {} arenas",
        z.runs,
        cores,
        heap.arenas()
    );
    println!(
        "{:<12} {:>10} {:>14} {:>15} {:>13} {:>7} {:>7}",
        "workload",
        "processes",
        "process heap",
        "(no rseq cache)",
        "shared heap",
        "ratio",
        "ratio2"
    );
    for work in ["pair", "batch", "handoff"] {
        let counts: Vec<usize> = if work == "handoff" {
            vec![2, (2 * cores).min(2 * MAX_PAIRS)]
        } else {
            vec![1, cores, 2 * cores]
        };
        for procs in counts {
            let mut r = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..z.runs {
                for (k, kind) in ["process", "locked", "shared"].iter().enumerate() {
                    // SAFETY: no process uses the rings between runs.
                    unsafe { std::ptr::write_bytes(rings, 0, MAX_PAIRS) };
                    r[k].push(run(work, kind, procs, &path));
                }
            }
            let m = r.map(|mut v| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            });
            println!(
                "{:<12} {:>10} {:>14.1} {:>15.1} {:>13.1} {:>6.2}x {:>6.2}x",
                work,
                procs,
                m[0],
                m[1],
                m[2],
                m[2] / m[0],
                m[2] / m[1]
            );
        }
    }
    let st = heap.stats();
    println!(
        "shared heap after the runs: {} bytes in use, {} frees through pending stacks, {} lock contentions",
        st.in_use(),
        st.arenas.iter().map(|a| a.remote_frees).sum::<u64>(),
        st.arenas.iter().map(|a| a.contentions).sum::<u64>()
    );
    heap.check().expect("heap check");
    heap.destroy().unwrap();
}

/// Runs `procs` processes of `work` on `kind` at once; returns the mean ns per operation.
fn run(work: &str, kind: &str, procs: usize, path: &Path) -> f64 {
    let kids: Vec<_> = (0..procs)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .env(ROLE, format!("{work}:{kind}:{i}"))
                // `locked`: the process heap without its per-CPU caches.
                .env("COREHEAP_RSEQ", if kind == "locked" { "0" } else { "1" })
                .env("COREHEAP_SHM_BENCH_PATH", path)
                .args(std::env::args().skip(1))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut sum = 0.0;
    for k in kids {
        let out = k.wait_with_output().unwrap();
        assert!(out.status.success(), "a benchmark process failed");
        sum += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<f64>()
            .unwrap();
    }
    sum / procs as f64
}

fn child(role: &str, z: Sizes) {
    let mut it = role.split(':');
    let (work, kind, i) = (
        it.next().unwrap(),
        it.next().unwrap(),
        it.next().unwrap().parse::<usize>().unwrap(),
    );
    let shared = SharedHeap::open(std::env::var("COREHEAP_SHM_BENCH_PATH").unwrap()).unwrap();
    let ring = shared.ptr(shared.root()) as *const Ring;
    let base = shared.base() as usize;
    let h = if kind == "shared" {
        Heap::Shared(shared)
    } else {
        Heap::Process(CoreHeap::new())
    };
    let ns = match work {
        "pair" => pair(&h, z.pairs),
        "batch" => batch(&h, z.rounds),
        _ => {
            // Process pairs (0, 1), (2, 3), ...: in-process heaps cannot hand blocks to
            // another process, so there each pair is two threads of process 2k, and
            // process 2k+1 idles.
            if let Heap::Process(_) = h {
                if i % 2 == 1 {
                    println!("0");
                    return;
                }
                let local = Ring {
                    head: AtomicU64::new(0),
                    _pad: [0; 15],
                    tail: AtomicU64::new(0),
                    _pad2: [0; 15],
                    slots: [const { AtomicU64::new(0) }; RING],
                };
                let hr = &h;
                let r = &local;
                let ns = std::thread::scope(|s| {
                    let c = s.spawn(move || handoff(hr, r, false, z.handoffs, 0));
                    let p = handoff(hr, r, true, z.handoffs, 0);
                    c.join().unwrap().max(p)
                });
                // Reported per process of the pair, like the shared rows.
                println!("{}", ns * 2.0);
                return;
            }
            // SAFETY: the root is an array of MAX_PAIRS zeroed rings, pair i / 2 uses its
            // own, atomically.
            let ring = unsafe { &*ring.add(i / 2) };
            handoff(&h, ring, i % 2 == 0, z.handoffs, base)
        }
    };
    println!("{ns}");
}
