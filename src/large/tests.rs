//! Unit tests of the page heap.

use super::*;
use crate::chunk::{run_addr, ChunkHeader, Kind, HEADER_PAGES};
use crate::size_class::CHUNK;
use crate::test_support::{Rng, TestSource, SLOTS};
use core::sync::atomic::Ordering;
use std::collections::BTreeMap;

// The helpers below stand in for the arena: a test owns its heap, which takes the place of
// holding the arena lock.

fn new_heap() -> Box<PageHeap> {
    Box::new(PageHeap::new(0))
}

fn try_take(heap: &mut PageHeap, src: &TestSource, n: usize, align: usize) -> *mut PageDesc {
    // SAFETY: the test owns the heap (the lock's role); n and align are within bounds.
    let (d, _) = unsafe { heap.alloc_run(src, n, align) };
    if !d.is_null() {
        // SAFETY: `d` heads the run just taken; the caller of alloc_run sets its kind.
        unsafe { (*d).set_kind(Kind::Large) };
    }
    d
}

fn take(heap: &mut PageHeap, src: &TestSource, n: usize, align: usize) -> *mut PageDesc {
    let d = try_take(heap, src, n, align);
    assert!(!d.is_null(), "alloc_run({n}, {align}) failed");
    // SAFETY: `d` heads a live run.
    assert_eq!(unsafe { (*d).npages } as usize, n);
    d
}

fn give(heap: &mut PageHeap, src: &TestSource, d: *mut PageDesc) {
    // SAFETY: `d` heads an allocated run of this heap with nothing live in it.
    unsafe { heap.free_run(src, d) }
}

fn check(heap: &PageHeap, src: &TestSource) {
    // SAFETY: the test owns the heap.
    if let Err(e) = unsafe { heap.check(src) } {
        panic!("page heap check failed: {e}");
    }
}

fn addr(d: *const PageDesc) -> usize {
    run_addr(d) as usize
}

fn npages(d: *mut PageDesc) -> usize {
    // SAFETY: the descriptor lies in a mapped chunk header.
    unsafe { (*d).npages as usize }
}

/// The descriptor of the page at `a` (which lies in a mapped chunk of the heap).
fn desc_at(a: usize) -> *mut PageDesc {
    let h = (a & !(CHUNK - 1)) as *mut ChunkHeader;
    let i = (a & (CHUNK - 1)) / PAGE;
    // SAFETY: `h` is a mapped chunk header and `i < CHUNK_PAGES`.
    unsafe { &mut (*h).pages[i] as *mut PageDesc }
}

/// Kind and length of the run headed at `a`.
fn run_at(a: usize) -> (Kind, usize) {
    let d = desc_at(a);
    // SAFETY: as in `desc_at`.
    unsafe { ((*d).kind(), (*d).npages as usize) }
}

/// Every free run on the lists as (address, length), sorted by address.
fn free_runs(heap: &PageHeap) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for k in [CLEAN, DIRTY] {
        for n in 1..=USABLE_PAGES {
            let mut d = heap.lists[k][n].get(0);
            while !d.is_null() {
                v.push((addr(d), n));
                // SAFETY: runs on the lists are free runs of mapped chunks.
                d = unsafe { (*d).next.get(0) };
            }
        }
    }
    v.sort_unstable();
    v
}

/// The reference best fit, as (kind, length): the shortest non-empty dirty list of at
/// least `n` pages, else the shortest clean one, by a linear scan of the lists rather
/// than the bitmaps.
fn slow_fit(heap: &PageHeap, n: usize) -> Option<(usize, usize)> {
    [DIRTY, CLEAN].into_iter().find_map(|k| {
        (n..=USABLE_PAGES)
            .find(|&len| !heap.lists[k][len].is_null())
            .map(|len| (k, len))
    })
}

#[test]
fn best_fit_takes_the_shortest_fitting_run() {
    let src = TestSource::new(4);
    let mut heap = new_heap();
    let lens = [5, 1, 3, 1, 8, 1, 2, 1];
    let runs: Vec<_> = lens.iter().map(|&n| take(&mut heap, &src, n, 1)).collect();
    // A fresh chunk is handed out front to back.
    let base = addr(runs[0]);
    assert_eq!(base % CHUNK, HEADER_PAGES * PAGE);
    let mut off = 0;
    for (d, &n) in runs.iter().zip(&lens) {
        assert_eq!(addr(*d), base + off * PAGE);
        off += n;
    }
    check(&heap, &src);
    // Free the runs of 5, 3, 8 and 2 pages; the 1-page runs keep them apart.
    for i in [0, 2, 4, 6] {
        give(&mut heap, &src, runs[i]);
    }
    check(&heap, &src);
    let tail = USABLE_PAGES - off;
    let mut want_free = vec![
        (addr(runs[0]), 5),
        (addr(runs[2]), 3),
        (addr(runs[4]), 8),
        (addr(runs[6]), 2),
        (base + off * PAGE, tail),
    ];
    assert_eq!(free_runs(&heap), want_free);
    for n in 1..=USABLE_PAGES + 1 {
        let fast = heap.find_fit(&src, n).map(npages);
        assert_eq!(fast, slow_fit(&heap, n).map(|f| f.1), "find_fit({n})");
    }

    // Exact fits first, then the shortest longer run, never the long tail.
    assert_eq!(addr(take(&mut heap, &src, 3, 1)), addr(runs[2]));
    assert_eq!(addr(take(&mut heap, &src, 2, 1)), addr(runs[6]));
    assert_eq!(addr(take(&mut heap, &src, 4, 1)), addr(runs[0]));
    check(&heap, &src);
    // The 5-page run left one page behind; a 1-page request takes it, not the 8.
    assert_eq!(run_at(addr(runs[0]) + 4 * PAGE), (Kind::Free, 1));
    assert_eq!(addr(take(&mut heap, &src, 1, 1)), addr(runs[0]) + 4 * PAGE);
    assert_eq!(addr(take(&mut heap, &src, 6, 1)), addr(runs[4]));
    assert_eq!(run_at(addr(runs[4]) + 6 * PAGE), (Kind::Free, 2));
    assert_eq!(addr(take(&mut heap, &src, 9, 1)), base + off * PAGE);
    check(&heap, &src);
    want_free = vec![
        (addr(runs[4]) + 6 * PAGE, 2),
        (base + (off + 9) * PAGE, tail - 9),
    ];
    assert_eq!(free_runs(&heap), want_free);
    assert_eq!(src.maps.load(Ordering::Relaxed), 1);
}

#[test]
fn freeing_neighbours_coalesces() {
    let src = TestSource::new(PageHeap::SPARE_CHUNKS + 2);
    let mut heap = new_heap();
    let x = take(&mut heap, &src, 4, 1);
    let y = take(&mut heap, &src, 6, 1);
    let z = take(&mut heap, &src, 3, 1);
    let guard = take(&mut heap, &src, 1, 1);
    let (xa, ya, za) = (addr(x), addr(y), addr(z));
    assert_eq!(heap.counters.runs, 4);

    give(&mut heap, &src, x); // no free neighbour
    assert_eq!(run_at(xa), (Kind::Free, 4));
    give(&mut heap, &src, z); // no free neighbour (the guard is after it)
    assert_eq!(run_at(za), (Kind::Free, 3));
    check(&heap, &src);
    give(&mut heap, &src, y); // merges with both
    check(&heap, &src);
    assert_eq!(run_at(xa), (Kind::Free, 13));
    let tail = desc_at(xa + 12 * PAGE);
    // SAFETY: a descriptor in a mapped chunk header.
    unsafe {
        assert_eq!((*tail).kind(), Kind::FreeTail);
        assert_eq!((*tail).lead(), 12);
    }
    // The old heads and tails inside the merged run are interior pages now.
    for a in [ya, za, ya - PAGE, za - PAGE] {
        assert_eq!(run_at(a).0, Kind::Interior, "page {:#x}", a);
    }
    assert_eq!(free_runs(&heap)[0], (xa, 13));
    assert_eq!(heap.counters.runs, 1);

    // Right-only merge: a run freed just before a free run.
    let a = take(&mut heap, &src, 13, 1);
    assert_eq!(addr(a), xa);
    assert_eq!(heap.counters.runs, 2);
    // SAFETY: `a` heads a live run of 13 pages; nothing lives past page 5.
    unsafe { heap.shrink_run(&src, a, 5) };
    assert_eq!(run_at(xa + 5 * PAGE), (Kind::Free, 8));
    give(&mut heap, &src, a);
    assert_eq!(run_at(xa), (Kind::Free, 13));
    check(&heap, &src);

    // Freeing the guard leaves the chunk wholly free: one run, its first 14 pages dirty,
    // the clean remainder after them. It is the heap's spare, kept mapped, not purged.
    let purged_before = src.purged_bytes.load(Ordering::Relaxed);
    give(&mut heap, &src, guard);
    check(&heap, &src);
    assert_eq!(free_runs(&heap), vec![(xa, USABLE_PAGES)]);
    assert_eq!(heap.free_chunks, 1);
    assert_eq!(heap.dirty_pages, 14);
    assert_eq!(heap.counters.runs, 0);
    assert_eq!(src.purged_bytes.load(Ordering::Relaxed), purged_before);
    // Purging returns just the dirty pages, and the run becomes clean.
    // SAFETY: the test owns the heap.
    unsafe { heap.purge_all(&src) };
    check(&heap, &src);
    assert_eq!(free_runs(&heap), vec![(xa, USABLE_PAGES)]);
    // SAFETY: a descriptor in a mapped chunk header.
    assert!(!unsafe { (*desc_at(xa)).dirty });
    assert_eq!(heap.dirty_pages, 0);
    assert_eq!(
        src.purged_bytes.load(Ordering::Relaxed),
        purged_before + 14 * PAGE
    );
    assert_eq!(src.unmaps.load(Ordering::Relaxed), 0);
    assert_eq!(heap.counters.mapped, CHUNK);

    // Two more whole chunks than the spares: when all are free again, the spares are kept.
    let spares = PageHeap::SPARE_CHUNKS;
    let whole: Vec<_> = (0..spares + 2)
        .map(|_| take(&mut heap, &src, USABLE_PAGES, 1))
        .collect();
    assert_eq!(src.maps.load(Ordering::Relaxed), spares + 2);
    assert_eq!(heap.free_chunks, 0);
    check(&heap, &src);
    for c in whole {
        give(&mut heap, &src, c);
    }
    check(&heap, &src);
    assert_eq!(src.unmaps.load(Ordering::Relaxed), 2);
    assert_eq!(src.live(), spares);
    assert_eq!(heap.free_chunks, spares);
    assert_eq!(heap.counters.mapped, spares * CHUNK);
    assert_eq!(heap.counters.chunks_unmapped, 2);
    assert_eq!(free_runs(&heap).len(), spares);
}

#[test]
fn alloc_run_honours_alignment() {
    let src = TestSource::new(16);
    let mut heap = new_heap();
    let mut live = Vec::new();
    for align in [1, 2, 4, 8, 16, 32, 64, 128] {
        for misalign in 0..3 {
            for n in [1, 3, align, align + 1] {
                for _ in 0..misalign {
                    live.push(take(&mut heap, &src, 1, 1));
                }
                let d = take(&mut heap, &src, n, align);
                assert_eq!(addr(d) % (align * PAGE), 0, "n {n} align {align}");
                live.push(d);
                check(&heap, &src);
            }
        }
    }
    // No two runs overlap.
    let mut ranges: Vec<_> = live.iter().map(|&d| (addr(d), npages(d))).collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(
            w[0].0 + w[0].1 * PAGE <= w[1].0,
            "{:x?} overlaps {:x?}",
            w[0],
            w[1]
        );
    }
    // Free in a scrambled order; everything merges back.
    let mut rng = Rng(0x1234_5678_9abc_def1);
    while !live.is_empty() {
        let i = rng.below(live.len());
        let d = live.swap_remove(i);
        give(&mut heap, &src, d);
        check(&heap, &src);
    }
    assert_eq!(heap.counters.runs, 0);
    let spares = src.live();
    assert!((1..=PageHeap::SPARE_CHUNKS).contains(&spares));
    // SAFETY: the test owns the heap.
    unsafe { heap.purge_all(&src) };
    assert_eq!(free_runs(&heap).len(), spares);
    assert!(free_runs(&heap).iter().all(|r| r.1 == USABLE_PAGES));
}

#[test]
fn grow_and_shrink_in_place() {
    let src = TestSource::new(4);
    let mut heap = new_heap();
    let a = take(&mut heap, &src, 4, 1);
    let b = take(&mut heap, &src, 4, 1);
    let guard = take(&mut heap, &src, 1, 1);
    let aa = addr(a);
    // SAFETY: (for all the calls below) the test owns the heap; `a` heads a live large run.
    unsafe {
        assert!(
            heap.grow_run(&src, a, 4),
            "growing to the same size is a no-op"
        );
        assert!(!heap.grow_run(&src, a, 5), "the next run is in use");
        give(&mut heap, &src, b);
        assert!(heap.grow_run(&src, a, 6));
        assert_eq!(npages(a), 6);
        assert_eq!(run_at(aa + 6 * PAGE), (Kind::Free, 2));
        check(&heap, &src);
        assert!(!heap.grow_run(&src, a, 9), "only two free pages follow");
        assert_eq!(npages(a), 6);
        assert!(heap.grow_run(&src, a, 8), "taking the whole free run");
        assert_eq!(npages(a), 8);
        assert_eq!(run_at(aa + 8 * PAGE).0, Kind::Large); // the guard
        check(&heap, &src);
        assert!(!heap.grow_run(&src, a, 9));

        heap.shrink_run(&src, a, 3);
        assert_eq!(npages(a), 3);
        assert_eq!(run_at(aa + 3 * PAGE), (Kind::Free, 5));
        check(&heap, &src);
        heap.shrink_run(&src, a, 3); // no-op
        heap.shrink_run(&src, a, 7); // no-op: it only shrinks
        assert_eq!(npages(a), 3);
        // Shrinking next to a free run merges the tail into it.
        heap.shrink_run(&src, a, 1);
        assert_eq!(npages(a), 1);
        assert_eq!(run_at(aa + PAGE), (Kind::Free, 7));
        check(&heap, &src);
        assert_eq!(heap.counters.runs, 2);
        // And growing over the merged run works again.
        assert!(heap.grow_run(&src, a, 8));
        check(&heap, &src);
    }
    give(&mut heap, &src, a);
    give(&mut heap, &src, guard);
    check(&heap, &src);
    assert_eq!(heap.counters.runs, 0);
}

#[test]
fn dirty_runs_are_preferred_and_merge_with_clean_ones() {
    let src = TestSource::new(4);
    let mut heap = new_heap();
    let a = take(&mut heap, &src, 10, 1);
    let _guard = take(&mut heap, &src, 1, 1);
    let b = take(&mut heap, &src, 300, 1);
    let guard2 = take(&mut heap, &src, 1, 1);
    assert_eq!(heap.dirty_pages, 0);
    give(&mut heap, &src, a);
    give(&mut heap, &src, b);
    assert_eq!(heap.dirty_pages, 310, "freed runs stay dirty, however long");
    assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 0);
    check(&heap, &src);
    // A dirty run is reused before any clean one, although the clean remainder of the
    // chunk would fit too; the part left over stays a dirty free run.
    // SAFETY: the test owns the heap.
    let (d, dirty) = unsafe { heap.alloc_run(&src, 4, 1) };
    assert!(dirty);
    assert_eq!(
        addr(d),
        run_addr(a) as usize,
        "best fit among the dirty runs"
    );
    // SAFETY: `d` heads the run just taken.
    unsafe { (*d).set_kind(Kind::Large) };
    assert_eq!(heap.dirty_pages, 306);
    check(&heap, &src);
    give(&mut heap, &src, d);
    assert_eq!(heap.dirty_pages, 310);
    // Freeing the guard merges it with the dirty run before it and the clean remainder
    // after it: one run, of which 301 pages are dirty.
    let (ba, tail) = (run_addr(b) as usize, USABLE_PAGES - 312);
    give(&mut heap, &src, guard2);
    assert_eq!(heap.dirty_pages, 311);
    assert_eq!(run_at(ba), (Kind::Free, 301 + tail));
    check(&heap, &src);
    // A request that fits the dirty pages of that run is served from them, at its start.
    // SAFETY: the test owns the heap.
    let (d, dirty) = unsafe { heap.alloc_run(&src, 301, 1) };
    assert!(dirty);
    assert_eq!(addr(d), ba);
    // SAFETY: `d` heads the run just taken.
    unsafe { (*d).set_kind(Kind::Large) };
    assert_eq!(heap.dirty_pages, 10);
    // What is left of it is clean, and a clean request reads zero.
    assert_eq!(run_at(ba + 301 * PAGE), (Kind::Free, tail));
    // SAFETY: as above.
    assert!(!unsafe { (*desc_at(ba + 301 * PAGE)).dirty });
    check(&heap, &src);
    give(&mut heap, &src, d);
    // SAFETY: the test owns the heap.
    unsafe { heap.purge_all(&src) };
    assert_eq!(heap.dirty_pages, 0);
    assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 311 * PAGE);
    check(&heap, &src);
    let runs = free_runs(&heap);
    assert_eq!(runs.len(), 2, "{runs:x?}");
    // SAFETY: the test owns the heap.
    let (d, dirty) = unsafe { heap.alloc_run(&src, 10, 1) };
    assert!(!dirty, "a purged run reads zero");
    assert_eq!(addr(d), run_addr(a) as usize);
}

/// A clean free run (purged) and a dirty one (freed since) side by side are one run: a
/// request for their sum is served from their pages, where keeping the kinds apart would
/// leave no run long enough and map a new chunk. The part taken is reported dirty; a part
/// of clean pages alone reads zero.
#[test]
fn clean_and_dirty_neighbours_serve_one_request() {
    let src = TestSource::new(4);
    let mut heap = new_heap();
    let guard = take(&mut heap, &src, 1, 1);
    let a = take(&mut heap, &src, 100, 1);
    let b = take(&mut heap, &src, 100, 1);
    let rest = take(&mut heap, &src, USABLE_PAGES - 201, 1);
    let (aa, ba) = (addr(a), addr(b));
    give(&mut heap, &src, a);
    // SAFETY: the test owns the heap.
    unsafe { heap.purge_all(&src) };
    assert_eq!(heap.dirty_pages, 0);
    give(&mut heap, &src, b);
    check(&heap, &src);
    assert_eq!(heap.dirty_pages, 100);
    assert_eq!(free_runs(&heap), vec![(aa, 200)]);
    // An unaligned request that the dirty half holds is served from it...
    // SAFETY: the test owns the heap.
    let (d, dirty) = unsafe { heap.alloc_run(&src, 100, 1) };
    assert!(dirty);
    assert_eq!(
        addr(d),
        ba,
        "the dirty pages, at the end of the run, are reused"
    );
    // SAFETY: `d` heads the run just taken.
    unsafe { (*d).set_kind(Kind::Large) };
    assert_eq!(heap.dirty_pages, 0);
    check(&heap, &src);
    // ...and the clean half alone reads zero.
    // SAFETY: the test owns the heap.
    let (c, dirty) = unsafe { heap.alloc_run(&src, 100, 1) };
    assert!(!dirty, "the purged pages read zero");
    assert_eq!(addr(c), aa);
    // SAFETY: `c` heads the run just taken.
    unsafe { (*c).set_kind(Kind::Large) };
    give(&mut heap, &src, c);
    // SAFETY: the test owns the heap.
    unsafe { heap.purge_all(&src) };
    give(&mut heap, &src, d);
    check(&heap, &src);
    // The sum of both: served from the chunk there is, with no new chunk.
    let e = take(&mut heap, &src, 200, 1);
    assert_eq!(addr(e), aa);
    assert_eq!(
        src.maps.load(Ordering::Relaxed),
        1,
        "a chunk was mapped for the request"
    );
    assert_eq!(heap.dirty_pages, 0);
    check(&heap, &src);
    for r in [e, rest, guard] {
        give(&mut heap, &src, r);
    }
    check(&heap, &src);
    assert_eq!(free_runs(&heap).len(), 1);
}

#[test]
fn freeing_past_the_dirty_limit_purges() {
    let src = TestSource::new(64);
    let mut heap = new_heap();
    let n = 500;
    let count = (crate::policy::DIRTY_MAX / PAGE) / n + 2;
    let runs: Vec<_> = (0..2 * count)
        .map(|_| take(&mut heap, &src, n, 1))
        .collect();
    // Free every other run, so none merge.
    for (i, &d) in runs.iter().enumerate().step_by(2) {
        give(&mut heap, &src, d);
        let freed = (i / 2 + 1) * n;
        if freed <= (crate::policy::DIRTY_MAX / PAGE) {
            assert_eq!(heap.dirty_pages, freed);
            assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 0);
        }
    }
    assert!(heap.counters.purges >= 1);
    assert!(heap.dirty_pages <= heap.dirty_limit());
    assert!(src.purged_bytes.load(Ordering::Relaxed) > (crate::policy::DIRTY_MAX / PAGE) * PAGE);
    check(&heap, &src);
}

#[test]
fn exhausted_source_gives_null_and_keeps_the_heap_sound() {
    let src = TestSource::new(1);
    let mut heap = new_heap();
    let a = take(&mut heap, &src, USABLE_PAGES - 8, 1);
    assert!(try_take(&mut heap, &src, 9, 1).is_null());
    // Aligned requests reserve `n + align - 1` pages, so this fails too.
    assert!(try_take(&mut heap, &src, 8, 2).is_null());
    check(&heap, &src);
    let b = take(&mut heap, &src, 8, 1);
    assert!(try_take(&mut heap, &src, 1, 1).is_null());
    check(&heap, &src);
    give(&mut heap, &src, a);
    let c = take(&mut heap, &src, 100, 1);
    check(&heap, &src);
    give(&mut heap, &src, b);
    give(&mut heap, &src, c);
    check(&heap, &src);
    assert_eq!(src.maps.load(Ordering::Relaxed), 1);
    assert_eq!(free_runs(&heap), vec![(addr(a), USABLE_PAGES)]);
}

/// Tens of thousands of free runs across many chunks: best fit still picks the shortest
/// fitting run (checked against a linear scan), runs never overlap, and the invariants
/// hold throughout.
#[test]
fn many_free_runs_stay_correct() {
    const CHUNKS: usize = 80;
    let src = TestSource::new(SLOTS);
    let mut heap = new_heap();
    let mut ones = Vec::with_capacity(CHUNKS * USABLE_PAGES);
    for _ in 0..CHUNKS * USABLE_PAGES {
        ones.push(take(&mut heap, &src, 1, 1));
    }
    assert_eq!(src.maps.load(Ordering::Relaxed), CHUNKS);
    check(&heap, &src);
    // Free every other page: ~40,000 one-page free runs, none adjacent.
    let mut live: BTreeMap<usize, *mut PageDesc> = BTreeMap::new();
    for (i, d) in ones.into_iter().enumerate() {
        if i % 2 == 0 {
            give(&mut heap, &src, d);
        } else {
            live.insert(addr(d), d);
        }
    }
    check(&heap, &src);
    let runs = free_runs(&heap);
    assert!(runs.len() >= 40_000, "{} free runs", runs.len());
    assert!(runs.iter().all(|&(_, n)| n == 1));

    // Random traffic over the fragmented heap.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for step in 0..6000 {
        if live.is_empty() || rng.below(100) < 55 {
            let n = match rng.below(10) {
                0..=5 => 1 + rng.below(4),
                6..=8 => 1 + rng.below(40),
                _ => 1 + rng.below(300),
            };
            let align = [1, 1, 1, 2, 4, 8, 16][rng.below(7)];
            let want = n + align - 1;
            let fit = slow_fit(&heap, want);
            let found = heap
                .find_fit(&src, want)
                // SAFETY: a run found on the lists is a free run of a mapped chunk.
                .map(|d| (unsafe { (*d).dirty } as usize, npages(d)));
            assert_eq!(found, fit, "find_fit({want})");
            let expect_in = fit.map(|(k, len)| (addr(heap.lists[k][len].get(0)), len));
            let d = take(&mut heap, &src, n, align);
            let a = addr(d);
            assert_eq!(a % (align * PAGE), 0);
            if let Some((start, len)) = expect_in {
                assert!(
                    a >= start && a + n * PAGE <= start + len * PAGE,
                    "run of {n} (align {align}) at {a:#x} not from the best fit \
                     {start:#x}+{len}"
                );
            }
            // No overlap with the neighbours by address.
            if let Some((&pa, &pd)) = live.range(..a).next_back() {
                assert!(pa + npages(pd) * PAGE <= a, "overlap below {a:#x}");
            }
            if let Some((&na, _)) = live.range(a..).next() {
                assert!(a + n * PAGE <= na, "overlap above {a:#x}");
            }
            live.insert(a, d);
        } else {
            // Free a random live run: pick near a random key.
            let key = {
                let probe = live.keys().next().copied().unwrap() + rng.below(CHUNKS * CHUNK);
                match live.range(probe..).next() {
                    Some((&k, _)) => k,
                    None => *live.keys().next().unwrap(),
                }
            };
            let d = live.remove(&key).unwrap();
            give(&mut heap, &src, d);
        }
        if step % 500 == 0 {
            check(&heap, &src);
        }
    }
    check(&heap, &src);
    let allocated: usize = live.values().map(|&d| npages(d)).sum();
    let mut free_total = 0;
    // SAFETY: the test owns the heap.
    unsafe {
        heap.for_each_chunk(&src, |c| free_total += (*c).free_pages);
    }
    let chunks = src.live();
    assert_eq!(free_total + allocated, chunks * USABLE_PAGES);
    assert_eq!(heap.counters.runs, live.len());
    assert_eq!(heap.counters.mapped, chunks * CHUNK);

    for (_, d) in std::mem::take(&mut live) {
        give(&mut heap, &src, d);
    }
    check(&heap, &src);
    assert_eq!(heap.counters.runs, 0);
    let spares = src.live();
    assert!(
        (1..=PageHeap::SPARE_CHUNKS).contains(&spares),
        "all but the spare chunks are unmapped"
    );
    // The spares are free runs of both kinds side by side; purged, each is one run.
    let runs = free_runs(&heap);
    assert_eq!(
        runs.iter().map(|r| r.1).sum::<usize>(),
        spares * USABLE_PAGES
    );
    // SAFETY: the test owns the heap.
    unsafe { heap.purge_all(&src) };
    check(&heap, &src);
    assert_eq!(free_runs(&heap).len(), spares);
}

#[test]
fn old_dirty_runs_decay_and_refused_purges_keep_runs_dirty() {
    let src = TestSource::new(4);
    let mut heap = new_heap();
    // SAFETY: here and below, the test owns the heap.
    unsafe { heap.decay(&src, 10_000) };
    let a = take(&mut heap, &src, 10, 1);
    let _guard = take(&mut heap, &src, 1, 1);
    let b = take(&mut heap, &src, 20, 1);
    let _guard2 = take(&mut heap, &src, 1, 1);
    give(&mut heap, &src, a); // stamped 10_000
                              // SAFETY: the test owns the heap.
    unsafe { heap.decay(&src, 10_600) };
    give(&mut heap, &src, b); // stamped 10_600
    assert_eq!(heap.dirty_pages, 30);
    // Not yet a second old: nothing purged.
    // SAFETY: the test owns the heap.
    unsafe { heap.decay(&src, 10_900) };
    assert_eq!(heap.dirty_pages, 30);
    // `a` is past the decay time, `b` is not.
    // SAFETY: the test owns the heap.
    unsafe { heap.decay(&src, 11_050) };
    assert_eq!(heap.dirty_pages, 20);
    assert_eq!(src.purged_bytes.load(Ordering::Relaxed), 10 * PAGE);
    check(&heap, &src);
    // `b` goes once it is a second old.
    // SAFETY: the test owns the heap.
    unsafe { heap.decay(&src, 11_700) };
    assert_eq!(heap.dirty_pages, 0, "b decays at the next tick");
    check(&heap, &src);

    // A source that refuses to purge: the run stays dirty, and nothing reads as zero
    // that is not.
    let c = take(&mut heap, &src, 5, 1);
    give(&mut heap, &src, c);
    src.refuse_purge.store(true, Ordering::Relaxed);
    // SAFETY: the test owns the heap.
    assert!(!unsafe { heap.purge_all(&src) });
    assert_eq!(heap.dirty_pages, 5);
    check(&heap, &src);
    // SAFETY: the test owns the heap.
    let (d, dirty) = unsafe { heap.alloc_run(&src, 5, 1) };
    assert!(dirty, "a run whose purge failed is still dirty");
    // SAFETY: the test owns the heap; `d` heads the run just taken.
    unsafe { (*d).set_kind(Kind::Large) };
    give(&mut heap, &src, d);
    // Decay does not retry after a refusal; an explicit purge does.
    // SAFETY: the test owns the heap.
    unsafe { heap.decay(&src, 20_000) };
    assert_eq!(heap.dirty_pages, 5);
    src.refuse_purge.store(false, Ordering::Relaxed);
    // SAFETY: the test owns the heap.
    assert!(unsafe { heap.purge_all(&src) });
    assert_eq!(heap.dirty_pages, 0);
    check(&heap, &src);
}
