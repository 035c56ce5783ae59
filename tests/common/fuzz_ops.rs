//! A small language of heap operations, run against coreheap and checked against a model.
//! Shared by the fuzz target (`fuzz_targets/heap_ops.rs`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), which includes this file by path.
//!
//! Input: the first byte picks 1-3 threads; the rest is a stream of operations, dealt to the
//! threads in turn. Each operation is a tag byte and up to three argument bytes:
//!
//! | tag & 7 | operation | arguments |
//! |---|---|---|
//! | 0 | allocate | size (2 bytes), alignment exponent |
//! | 1 | free one of this thread's blocks | index |
//! | 2 | realloc one of them | index, new size (2 bytes) |
//! | 3 | calloc | size (2 bytes) |
//! | 4 | hand a block to the shared pool | index |
//! | 5 | free a block from the shared pool (made by any thread) | index |
//! | 6 | check a block's usable size by writing all of it | index |
//! | 7 | allocate, aligned to 64 | size (2 bytes) |
//!
//! `(tag >> 3) & 3` scales sizes: up to 255 B, 8 KiB, 64 KiB, or 4 MiB (past the huge
//! threshold). Every block is filled with a pattern at both ends, which is checked when it
//! is freed or resized; every new block must be aligned and must not overlap a live one; at
//! the end everything is freed, `check_heap()` must pass and the heap must hold nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A live block: address, requested size, pattern seed.
#[derive(Clone, Copy)]
struct Live {
    p: usize,
    size: usize,
    seed: u8,
}

/// Live ranges of every thread, to catch two live blocks sharing a byte.
static RANGES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());
/// Serialises inputs: the final "heap holds nothing" check needs the heap to itself.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Bytes checked and filled at each end of a block.
const EDGE: usize = 64;

fn claim(b: Live, align: usize) {
    assert!(
        b.p.is_multiple_of(align),
        "block {:#x} not aligned to {align}",
        b.p
    );
    let end = b.p + b.size.max(1);
    let mut r = RANGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((&s, &e)) = r.range(..end).next_back() {
        assert!(
            e <= b.p || s >= end,
            "block {:#x}+{} overlaps live {s:#x}..{e:#x}",
            b.p,
            b.size
        );
    }
    r.insert(b.p, end);
}

fn release(b: Live) {
    let mut r = RANGES.lock().unwrap_or_else(|e| e.into_inner());
    assert!(r.remove(&b.p).is_some(), "block {:#x} was not live", b.p);
}

/// Where a block's two patterns go: the seed over `[0, head)`, its complement-ish over
/// `[tail, size)`; they never overlap.
fn regions(size: usize) -> (usize, usize) {
    let head = size.min(EDGE);
    (head, size.saturating_sub(EDGE).max(head))
}

fn fill(b: Live) {
    let p = b.p as *mut u8;
    let (head, tail) = regions(b.size);
    // SAFETY: the block has `size` writable bytes; both ranges are inside it.
    unsafe {
        core::ptr::write_bytes(p, b.seed, head);
        core::ptr::write_bytes(p.add(tail), b.seed ^ 0x5a, b.size - tail);
    }
}

/// Checks the head pattern over the first `upto` bytes, and the tail if `upto` covers it.
fn verify(b: Live, upto: usize) {
    let p = b.p as *const u8;
    let (head, tail) = regions(b.size);
    // SAFETY: the block is live with `size` readable bytes.
    unsafe {
        for i in 0..head.min(upto) {
            assert_eq!(*p.add(i), b.seed, "block {:#x}: byte {i} changed", b.p);
        }
        if upto >= b.size {
            for i in tail..b.size {
                assert_eq!(
                    *p.add(i),
                    b.seed ^ 0x5a,
                    "block {:#x}: byte {i} changed",
                    b.p
                );
            }
        }
    }
}

fn take(b: Live) -> *mut u8 {
    verify(b, b.size);
    release(b);
    b.p as *mut u8
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn size(&mut self, scale: u8) -> usize {
        let v = (self.byte() as usize) | (self.byte() as usize) << 8;
        match scale {
            0 => v & 0xff,
            1 => v & 0x1fff,
            2 => v,
            _ => v * 64,
        }
    }
}

fn thread(ops: Vec<[u8; 4]>, pool: &Mutex<Vec<Live>>, tid: u8) {
    let mut mine: Vec<Live> = Vec::new();
    let mut seed = tid.wrapping_mul(61);
    for op in ops {
        let mut r = Reader { data: &op[1..] };
        let scale = (op[0] >> 3) & 3;
        seed = seed.wrapping_add(1) | 1;
        let pick = |v: &Vec<Live>, i: u8| (!v.is_empty()).then(|| i as usize % v.len());
        match op[0] & 7 {
            t @ (0 | 3 | 7) => {
                let size = r.size(scale);
                let align = match t {
                    0 => 1usize << (r.byte() % 17),
                    7 => 64,
                    _ => 16,
                };
                let p = if t == 3 {
                    coreheap::raw::alloc_zeroed(size, align)
                } else {
                    coreheap::raw::alloc(size, align)
                };
                assert!(
                    !p.is_null(),
                    "allocation of {size} bytes aligned {align} failed"
                );
                let b = Live {
                    p: p as usize,
                    size,
                    seed,
                };
                if t == 3 {
                    // SAFETY: a live block of `size` bytes.
                    let z = unsafe { core::slice::from_raw_parts(p, size.min(4096)) };
                    assert!(z.iter().all(|&x| x == 0), "calloc block {p:?} not zero");
                }
                claim(b, align.max(1));
                fill(b);
                mine.push(b);
            }
            1 => {
                if let Some(i) = pick(&mine, r.byte()) {
                    let p = take(mine.swap_remove(i));
                    // SAFETY: a live block of ours, given up.
                    unsafe { coreheap::raw::free(p) };
                }
            }
            2 => {
                let i = r.byte();
                let size = r.size(scale);
                if let Some(i) = pick(&mine, i) {
                    let old = mine[i];
                    verify(old, old.size);
                    release(old);
                    // SAFETY: a live block of ours.
                    let q = unsafe { coreheap::raw::realloc(old.p as *mut u8, size, 16) };
                    assert!(!q.is_null(), "realloc to {size} failed");
                    let moved = Live {
                        p: q as usize,
                        size,
                        seed: old.seed,
                    };
                    claim(moved, 16);
                    // The kept prefix still holds the old head pattern.
                    let keep = old.size.min(size).min(EDGE);
                    verify(
                        Live {
                            size: keep,
                            ..moved
                        },
                        keep,
                    );
                    let b = Live { seed, ..moved };
                    fill(b);
                    mine[i] = b;
                }
            }
            4 => {
                if let Some(i) = pick(&mine, r.byte()) {
                    pool.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(mine.swap_remove(i));
                }
            }
            5 => {
                let got = {
                    let mut pl = pool.lock().unwrap_or_else(|e| e.into_inner());
                    let i = r.byte();
                    pick(&pl, i).map(|i| pl.swap_remove(i))
                };
                if let Some(b) = got {
                    let p = take(b);
                    // SAFETY: a live block handed over through the pool, given up.
                    unsafe { coreheap::raw::free(p) };
                }
            }
            _ => {
                if let Some(i) = pick(&mine, r.byte()) {
                    let b = mine[i];
                    // SAFETY: a live block of ours.
                    let n = unsafe { coreheap::usable_size(b.p as *mut u8) };
                    assert!(n >= b.size, "usable size {n} below the request {}", b.size);
                    // SAFETY: every usable byte is writable.
                    unsafe { core::ptr::write_bytes(b.p as *mut u8, b.seed, n) };
                    let b = Live { size: n, ..b };
                    release(mine[i]);
                    claim(b, 1);
                    fill(b);
                    mine[i] = b;
                }
            }
        }
    }
    for b in mine {
        let p = take(b);
        // SAFETY: a live block of ours, given up.
        unsafe { coreheap::raw::free(p) };
    }
}

/// Runs one input (see the module documentation). Panics on any disagreement.
pub fn run(data: &[u8]) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let threads = 1 + (first % 3) as usize;
    let mut progs: Vec<Vec<[u8; 4]>> = vec![Vec::new(); threads];
    for (i, op) in rest.chunks(4).enumerate().take(3000) {
        let mut o = [0u8; 4];
        o[..op.len()].copy_from_slice(op);
        progs[i % threads].push(o);
    }
    let pool = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (t, prog) in progs.into_iter().enumerate() {
            let pool = &pool;
            s.spawn(move || thread(prog, pool, t as u8));
        }
    });
    for b in pool.into_inner().unwrap_or_else(|e| e.into_inner()) {
        let p = take(b);
        // SAFETY: a live block left in the pool, given up.
        unsafe { coreheap::raw::free(p) };
    }
    coreheap::check_heap().expect("heap check after the input");
    let left = coreheap::stats().in_use();
    assert_eq!(left, 0, "bytes still in use after everything was freed");
}
