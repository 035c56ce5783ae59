//! Size classes through the whole heap: every class boundary and every alignment through
//! Rust's allocator interface (`alloc`, `realloc`, `dealloc` with the block's layout) and
//! the C one (`raw`), with `usable_size` and the heap's invariants checked after churn.

use std::alloc::{alloc, dealloc, realloc, Layout};

use coreheap::{class_size, NUM_CLASSES, PAGE, SMALL_MAX, TABLE_MAX};

mod common;

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

/// `front::SHRINK_MOVE_MAX`: above this class C's `realloc` keeps a block that shrinks to no
/// less than half of it.
const SHRINK_MOVE_MAX: usize = 1024;

/// The oracle's class (`common::class_bytes`) as a class number.
fn expected_class(size: usize, align: usize) -> Option<usize> {
    let bytes = common::class_bytes(size, align)?;
    (0..NUM_CLASSES).find(|&c| class_size(c) == bytes)
}

/// Sizes on both sides of every class boundary.
fn boundary_sizes() -> Vec<usize> {
    let mut v = vec![1];
    for c in 0..NUM_CLASSES {
        let cs = class_size(c);
        v.extend([cs - 1, cs, cs + 1]);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn fill_and_check(p: *mut u8, n: usize, seed: u8) {
    // SAFETY: the callers pass a live block of at least `n` bytes.
    unsafe {
        std::ptr::write_bytes(p, seed, n);
        assert!((0..n).step_by(61).all(|i| *p.add(i) == seed));
    }
}

#[test]
fn every_boundary_and_alignment_through_the_rust_interface() {
    for size in boundary_sizes() {
        for shift in 0..=13 {
            let align = 1usize << shift;
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { alloc(layout) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "size {size} align {align}");
            // SAFETY: `p` is live.
            let usable = unsafe { coreheap::usable_size(p) };
            assert!(usable >= size);
            if size <= SMALL_MAX && align <= PAGE {
                let c = expected_class(size, align).unwrap();
                assert_eq!(usable, class_size(c), "size {size} align {align}");
            }
            fill_and_check(p, usable, 0x5a);
            // Within the class (the smallest size that still maps to it): kept in place;
            // `dealloc` then finds the class from the new size.
            let (q, new_size) = if size <= SMALL_MAX && align <= PAGE {
                let c = expected_class(size, align).unwrap();
                // The classes grow with the size: a binary search for the first.
                let (mut lo, mut hi) = (1, class_size(c));
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if expected_class(mid, align).unwrap() < c {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                let low = lo;
                assert_eq!(expected_class(low, align), Some(c));
                // SAFETY: `p` is live with `layout`; `low` is not zero.
                let q = unsafe { realloc(p, layout, low) };
                assert_eq!(
                    q, p,
                    "size {size} -> {low}, align {align}: stays in its class"
                );
                (q, low)
            } else {
                (p, size)
            };
            // Out of the class upwards: a block of the next class, contents kept.
            let grown = new_size + usable + 1;
            let old = Layout::from_size_align(new_size, align).unwrap();
            // SAFETY: `q` is live with `old`; `grown` is not zero.
            let r = unsafe { realloc(q, old, grown) };
            assert!(!r.is_null());
            assert_eq!(r as usize % align, 0);
            // SAFETY: `r` is live, its first `new_size` bytes copied from `q`.
            unsafe {
                assert!((0..new_size).step_by(61).all(|i| *r.add(i) == 0x5a));
                assert!(coreheap::usable_size(r) >= grown);
                dealloc(r, Layout::from_size_align(grown, align).unwrap());
            }
        }
    }
    coreheap::check_heap().unwrap();
}

#[test]
fn every_boundary_through_the_c_interface() {
    for size in boundary_sizes() {
        for shift in 0..=12 {
            let align = 1usize << shift;
            let mut p = coreheap::raw::alloc(size, align);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            // SAFETY: `p` is live.
            let usable = unsafe { coreheap::usable_size(p) };
            if size <= SMALL_MAX {
                let c = expected_class(size, align).unwrap();
                assert_eq!(usable, class_size(c), "size {size} align {align}");
                fill_and_check(p, usable, 0xa5);
                // SAFETY: `p` is live and ours; each call keeps or moves it.
                unsafe {
                    // C keeps a small block while the size still needs its class (the
                    // fewest bytes that map to it) and moves it into a smaller class below,
                    // but for a class above 1 KiB that keeps at least half of it.
                    // The class grows with the size: the first size whose class is `c`
                    // by bisection (a linear search over 256 KiB of sizes took minutes).
                    let (mut least, mut hi) = (1, usable);
                    while least < hi {
                        let mid = least + (hi - least) / 2;
                        if expected_class(mid, align).is_none_or(|k| k < c) {
                            least = mid + 1;
                        } else {
                            hi = mid;
                        }
                    }
                    assert_eq!(expected_class(least, align), Some(c));
                    assert!(least == 1 || expected_class(least - 1, align) != Some(c));
                    let q = coreheap::raw::realloc(p, least, align);
                    assert_eq!(q, p, "size {size}: {least} of {usable} stays");
                    if least > 1 && usable > SHRINK_MOVE_MAX && least > usable / 2 {
                        let m = coreheap::raw::realloc(q, least - 1, align);
                        assert_eq!(m, p, "size {size}: {} of {usable} stays", least - 1);
                    } else if least > 1 {
                        let m = coreheap::raw::realloc(q, least - 1, align);
                        assert_ne!(m, p, "size {size}: {} of {usable} moves", least - 1);
                        let want = class_size(expected_class(least - 1, align).unwrap());
                        assert_eq!(coreheap::usable_size(m), want);
                        assert!((0..least - 1).step_by(61).all(|i| *m.add(i) == 0xa5));
                        coreheap::raw::free(m);
                        let again = coreheap::raw::alloc(size, align);
                        assert!(!again.is_null());
                        fill_and_check(again, usable, 0xa5);
                        p = again;
                    }
                    let q = coreheap::raw::realloc(p, usable, align);
                    assert_eq!(q, p);
                    let r = coreheap::raw::realloc(q, usable + 1, align);
                    assert_ne!(r, p, "size {size}: a byte more than the block moves");
                    assert!((0..usable).step_by(61).all(|i| *r.add(i) == 0xa5));
                    // A small block down to a quarter: a block of the smaller class. Grown
                    // past the class table, C's block took a page run (which can grow in
                    // place), and a page run shrinks in place.
                    let ur = coreheap::usable_size(r);
                    let s = coreheap::raw::realloc(r, ur / 4, align);
                    if usable + 1 > TABLE_MAX && align <= PAGE {
                        assert_eq!(ur, (usable + 1).next_multiple_of(PAGE), "{usable} + 1");
                        assert_eq!(s, r, "{ur} to a quarter stays in its run");
                        assert_eq!(coreheap::usable_size(s), (ur / 4).next_multiple_of(PAGE));
                    } else if ur <= SMALL_MAX && ur > 16 {
                        let want = class_size(expected_class(ur / 4, align).unwrap());
                        assert_eq!(coreheap::usable_size(s), want, "{ur} to a quarter");
                    }
                    coreheap::raw::free(s);
                }
            } else {
                // SAFETY: `p` is live and ours.
                unsafe { coreheap::raw::free(p) };
            }
        }
    }
    coreheap::check_heap().unwrap();
}

#[test]
fn churn_over_every_class_keeps_the_heap_sound() {
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut live: Vec<(usize, usize)> = Vec::new();
                for _ in 0..60_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if live.len() > 500 || (x & 3 == 0 && !live.is_empty()) {
                        let (p, n) = live.swap_remove((x >> 8) as usize % live.len());
                        // SAFETY: `p` is live with this layout.
                        unsafe { dealloc(p as *mut u8, Layout::from_size_align(n, 16).unwrap()) };
                    } else {
                        let n = 1 + (x >> 20) as usize % SMALL_MAX;
                        let layout = Layout::from_size_align(n, 16).unwrap();
                        // SAFETY: `n` is not zero.
                        let p = unsafe { alloc(layout) };
                        fill_and_check(p, n.min(64), t as u8);
                        live.push((p as usize, n));
                    }
                }
                live
            })
        })
        .collect();
    // Freed on this thread: other arenas' blocks take the remote paths.
    for h in threads {
        for (p, n) in h.join().unwrap() {
            // SAFETY: `p` is live with this layout, handed over by its thread.
            unsafe { dealloc(p as *mut u8, Layout::from_size_align(n, 16).unwrap()) };
        }
    }
    coreheap::trim();
    coreheap::check_heap().unwrap();
}
