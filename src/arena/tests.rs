//! Unit tests of the arena: lookups, large resizing, an arena in a file shared by two views.

use super::*;
use crate::chunk::{chunk_of, page_index, run_addr, ChunkHeader, CHUNK_HUGE, HEADER_PAGES, MAGIC};
use crate::size_class::{class_for, run_blocks, run_pages, CHUNK, NUM_CLASSES, SMALL_MIN};
use crate::test_support::{MemFile, TestSource, View};
use std::alloc::Layout;

const MARK: usize = 0x5a5a_1234_8765_a5a5 | 1;

/// An arena in zeroed memory of its own, as the heap builds them.
struct TestArena(*mut Arena<TestSource>);

impl TestArena {
    fn new(index: u32) -> Self {
        let layout = Layout::new::<Arena<TestSource>>();
        // SAFETY: `Arena` is not zero-sized.
        let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Arena<TestSource>>();
        assert!(!p.is_null());
        // SAFETY: `p` is zeroed, writable memory for an `Arena` that nothing else uses.
        unsafe { Arena::init_in_place(p, index, false) };
        Self(p)
    }
}

impl core::ops::Deref for TestArena {
    type Target = Arena<TestSource>;
    fn deref(&self) -> &Arena<TestSource> {
        // SAFETY: initialised in `new`, freed only in `drop`.
        unsafe { &*self.0 }
    }
}

impl Drop for TestArena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the arena holds no destructors
        // (its chunks belong to the source, which unmaps them).
        unsafe { std::alloc::dealloc(self.0.cast(), Layout::new::<Arena<TestSource>>()) };
    }
}

fn small_run(src: &TestSource, p: *const u8) -> *mut PageDesc {
    match lookup(src, p) {
        Lookup::Small { arena, run } => {
            assert_eq!(arena, 3);
            run
        }
        other => panic!("{p:?}: expected a small block, found {other:?}"),
    }
}

fn large_run(src: &TestSource, p: *const u8) -> *mut PageDesc {
    match lookup(src, p) {
        Lookup::Large { arena, run } => {
            assert_eq!(arena, 3);
            run
        }
        other => panic!("{p:?}: expected a large block, found {other:?}"),
    }
}

fn invalid(src: &TestSource, p: *const u8) {
    assert!(
        matches!(lookup(src, p), Lookup::Invalid),
        "{p:?}: expected Invalid, found {:?}",
        lookup(src, p)
    );
    assert_eq!(lookup_small(src, p), None, "{p:?}: lookup_small accepts it");
}

/// `lookup_small` agrees with `lookup` on small block `p` of class `c` of arena 3: the
/// arena and class (with `pow2-classes`, for classes of at most a page, none for larger
/// ones).
fn small_agrees(src: &TestSource, p: *const u8, c: usize) {
    let want = (!cfg!(feature = "pow2-classes") || class_size(c) <= PAGE).then_some((3, c));
    assert_eq!(lookup_small(src, p), want, "{p:?}, class {c}");
}

#[test]
fn lookup_classifies_pointers() {
    let src = TestSource::new(32);
    let a = TestArena::new(3);

    // Small blocks of every class: the start is found, with its run; any pointer that is
    // not on a block boundary is not.
    let mut small = Vec::new();
    for c in 0..NUM_CLASSES {
        let cs = class_size(c);
        let (p, _) = a.alloc(&src, cs, 8);
        assert!(!p.is_null());
        let run = small_run(&src, p);
        // SAFETY: `run` heads a live small run.
        unsafe {
            assert_eq!((*run).kind(), Kind::Small);
            assert_eq!((*run).class(), c);
        }
        let start = run_addr(run) as usize;
        assert!((start..start + run_pages(c) * PAGE).contains(&(p as usize)));
        small_agrees(&src, p, c);
        invalid(&src, p.wrapping_add(1));
        invalid(&src, p.wrapping_add(cs / 2 + 1));
        if cs >= 32 {
            invalid(&src, p.wrapping_add(cs / 2));
        }
        small.push((p, c));
    }

    // Fill runs of classes whose blocks do and do not cross pages to their ends: the blocks
    // on the run's interior pages resolve to the run's head, every block start in the run is
    // found by both lookups, every other 16-byte step by neither.
    let mut classes: Vec<usize> = [48, 64, 80, 4096, 5120, 7168]
        .iter()
        .map(|&s| class_for(s, 1))
        .collect();
    classes.dedup();
    for c in classes {
        let cs = class_size(c);
        let first = a.alloc(&src, cs, 1).0;
        let run = small_run(&src, first);
        let mut last = first;
        // SAFETY: `run` heads a live small run of this arena.
        while unsafe { (*run).bump as usize } < run_blocks(c) {
            last = a.alloc(&src, cs, 1).0;
            assert_eq!(small_run(&src, last), run);
            small_agrees(&src, last, c);
        }
        let start = run_addr(run) as usize;
        let end = start + run_pages(c) * PAGE;
        assert_eq!(last as usize, start + (run_blocks(c) - 1) * cs, "class {c}");
        assert!(
            end - last as usize - cs < cs,
            "class {c}: a whole block left over"
        );
        for off in (0..run_blocks(c) * cs).step_by(SMALL_MIN) {
            let p = (start + off) as *const u8;
            if off % cs == 0 {
                assert_eq!(small_run(&src, p), run);
                small_agrees(&src, p, c);
            } else {
                invalid(&src, p);
            }
        }
        let tail_page = (end - PAGE) as *const u8;
        // SAFETY: the run's last page is one of its interior pages.
        unsafe {
            assert_eq!(
                (*crate::chunk::header_of_desc(run)).pages[page_index(tail_page)].kind(),
                Kind::SmallInterior
            );
        }
        invalid(&src, tail_page.wrapping_add(8));
    }

    // Large blocks: only the first byte is a block; interior pages are not.
    // (Above the largest class: smaller ones are blocks of a class.)
    let (l, _) = a.alloc(&src, SMALL_MAX + 5 * PAGE, 8);
    let run = large_run(&src, l);
    // SAFETY: `run` heads a live large run.
    assert_eq!(unsafe { (*run).npages } as usize, SMALL_MAX / PAGE + 5);
    assert_eq!(run_addr(run), l);
    for off in [1, 16, PAGE - 1, PAGE, 2 * PAGE + 16, 4 * PAGE, 5 * PAGE - 1] {
        invalid(&src, l.wrapping_add(off));
    }
    let (al, _) = a.alloc(&src, 3 * PAGE, LARGE_ALIGN_MAX);
    assert_eq!(al as usize % LARGE_ALIGN_MAX, 0);
    large_run(&src, al);
    invalid(&src, al.wrapping_add(PAGE));

    // The chunk header pages, the free tail of the chunk, and the chunk's very start
    // (which belongs to the chunk below).
    let chunk = chunk_of(l);
    for p in [
        chunk + 16,
        chunk + PAGE,
        chunk + (HEADER_PAGES - 1) * PAGE + 64,
        chunk + CHUNK - PAGE,
        chunk + CHUNK - 16,
        chunk,
    ] {
        invalid(&src, p as *const u8);
    }

    // Pointers outside every chunk of the source.
    let on_stack = 0u64;
    invalid(&src, &on_stack as *const u64 as *const u8);
    let boxed = Box::new([0u8; 64]);
    invalid(&src, boxed.as_ptr());
    invalid(&src, core::ptr::null());
    invalid(&src, usize::MAX as *const u8);
    invalid(&src, (chunk + CHUNK + HEADER_PAGES * PAGE) as *const u8);

    // A chunk of the source with a huge header: only its block pointer is the block.
    let hc = src.map_chunk();
    assert!(!hc.is_null());
    invalid(&src, hc.wrapping_add(PAGE)); // no magic yet
    let h = hc.cast::<ChunkHeader>();
    // SAFETY: `hc` is a fresh chunk of the source that nothing else uses.
    unsafe {
        (*h).kind = CHUNK_HUGE;
        (*h).map_base = hc as usize;
        (*h).map_len = CHUNK;
        (*h).huge_ptr = hc as usize + PAGE;
        (*h).magic = MAGIC;
    }
    assert!(matches!(lookup(&src, hc.wrapping_add(PAGE)), Lookup::Huge(x) if x == h));
    invalid(&src, hc.wrapping_add(2 * PAGE));
    invalid(&src, hc.wrapping_add(PAGE + 16));
    // SAFETY: nothing refers into `hc`.
    unsafe { src.unmap_chunk(hc) };
    invalid(&src, hc.wrapping_add(PAGE));

    assert_eq!(a.check(&src), Ok(()));

    // A freed large block is gone at once (large frees are drained immediately).
    let what = lookup(&src, l);
    // SAFETY: `l` is a live large block of `a`, given up here.
    unsafe { a.free(&src, l, what, MARK, true) };
    invalid(&src, l);
    // Freed small blocks keep their runs while others are live.
    for (i, &(p, _)) in small.iter().enumerate() {
        let what = lookup(&src, p);
        // SAFETY: a live small block of `a`, given up here.
        unsafe { a.free(&src, p, what, MARK, i % 2 == 0) };
    }
    assert_eq!(a.check(&src), Ok(()));
    let s = a.stats(&src);
    assert_eq!(s.large.in_use, 3 * PAGE);
    assert_eq!(s.index, 3);
}

#[test]
fn large_resize_in_place() {
    let src = TestSource::new(8);
    let a = TestArena::new(3);
    let (p, _) = a.alloc(&src, SMALL_MAX + 3 * PAGE, 8);
    let run = large_run(&src, p);
    // SAFETY: (for the calls below) `run` heads the live large block `p`, which we own.
    unsafe {
        assert!(a.resize_large(&src, run, SMALL_MAX + 10 * PAGE - 5));
        assert_eq!((*run).npages as usize, SMALL_MAX / PAGE + 10);
        assert!(a.resize_large(&src, run, PAGE + 1));
        assert_eq!((*run).npages, 2);
        assert_eq!(a.stats(&src).large.in_use, 2 * PAGE);
        assert_eq!(a.check(&src), Ok(()));
        // A request for zero bytes must leave a live block (of one page) behind.
        assert!(a.resize_large(&src, run, 0));
        assert_eq!((*run).kind(), Kind::Large);
        assert!((*run).npages >= 1, "the run was freed under a live block");
        assert_eq!(a.check(&src), Ok(()));
        large_run(&src, p);
    }
}

/// Where the arena lies in the shared test file (chunk 0, after the view's bookkeeping).
const ARENA_OFF: usize = PAGE;
const _: () = assert!(ARENA_OFF + core::mem::size_of::<Arena<View>>() <= CHUNK);

/// The arena in the shared test file, reached through a view.
trait ArenaAt: PageSource + Sized {
    fn arena(&self) -> &Arena<Self>;
}

impl ArenaAt for View<'_> {
    fn arena(&self) -> &Arena<Self> {
        // SAFETY: the test initialises the arena at `ARENA_OFF` before it calls this; chunk
        // 0 is never handed out as an arena chunk.
        unsafe { &*((self.base + ARENA_OFF) as *const Arena<Self>) }
    }
}

/// A live block of the shared heap: its offset in the file, its size, its fill byte.
type Shared = (usize, usize, u8);

/// Sizes and alignments of every kind: small classes, whole pages, aligned and
/// multi-chunk large.
const SIZES: [(usize, usize); 12] = [
    (16, 8),
    (40, 8),
    (100, 16),
    (256, 256),
    (700, 8),
    (3000, 8),
    (8192, 8),
    (3 * PAGE, 8),
    (20 * PAGE + 5, 8),
    (300 * 1024, 8),
    (5 * PAGE, LARGE_ALIGN_MAX),
    (1 << 20, 8),
];

/// Allocates through view `v` and fills the block with the next fill byte (never 0).
fn alloc_filled(v: &View, size: usize, align: usize, fill: &mut u8) -> Shared {
    *fill = fill.wrapping_add(1).max(1);
    let (p, _) = v.arena().alloc(v, size, align);
    assert!(!p.is_null(), "out of memory at {size} bytes");
    // SAFETY: `p` is a fresh block of at least `size` bytes.
    unsafe { ptr::write_bytes(p, *fill, size) };
    (p as usize - v.base, size, *fill)
}

/// One round through view `v`: frees every `nth` block of `blocks` (alternately
/// straight to its run and through the pending stack), then allocates `more` blocks of
/// every `stride`th size of [`SIZES`]. Returns the blocks live now.
fn churn(
    v: &View,
    blocks: Vec<Shared>,
    nth: usize,
    more: usize,
    stride: usize,
    fill: &mut u8,
) -> Vec<Shared> {
    let mut live = Vec::new();
    for (i, blk) in blocks.into_iter().enumerate() {
        if i % nth == 0 {
            free_via(v, blk, (i / nth).is_multiple_of(2));
        } else {
            live.push(blk);
        }
    }
    for i in 0..more {
        let (size, align) = SIZES[(i * stride) % SIZES.len()];
        live.push(alloc_filled(v, size, align, fill));
    }
    live
}

/// Each block reads its fill through view `v`, and `lookup` there finds it.
fn verify(v: &View, blocks: &[Shared]) {
    for &(off, size, fill) in blocks {
        let p = (v.base + off) as *mut u8;
        assert!(
            matches!(
                lookup(v, p),
                Lookup::Small { arena: 3, .. } | Lookup::Large { arena: 3, .. }
            ),
            "block at file offset {off:#x} not found through the view at {:#x}",
            v.base
        );
        // SAFETY: a live block of `size` bytes, reached through this view.
        let bytes = unsafe { core::slice::from_raw_parts(p, size) };
        assert!(
            bytes.iter().all(|&x| x == fill),
            "block at file offset {off:#x} ({size} B) lost its contents"
        );
    }
}

/// Frees the block through view `v`: from the "owner's CPU" (straight to its run) or
/// not (through the pending stack).
fn free_via(v: &View, block: Shared, local: bool) {
    let p = (v.base + block.0) as *mut u8;
    let what = lookup(v, p);
    // SAFETY: a live block of the arena, given up here.
    unsafe { v.arena().free(v, p, what, MARK, local) };
}

/// The arena engine keeps no address in memory: an arena built in a file that two
/// views map at different addresses works through either view, one after the other.
/// Each view is hidden (`PROT_NONE`) while the other is used, so a stored address of the
/// hidden view would fault when followed; links that decode to the wrong view's
/// addresses also make `check` report blocks outside their runs.
#[test]
fn arena_in_a_shared_file_works_through_views_at_different_addresses() {
    let file = MemFile::new();
    let a = View::map(&file);
    let b = View::map(&file);
    assert_ne!(a.base, b.base);
    assert_eq!(a.base % CHUNK, 0);
    assert_eq!(b.base % CHUNK, 0);
    // SAFETY: the file is fresh (zero) and chunk 0, which holds the arena, is never
    // handed out as an arena chunk.
    unsafe { Arena::init_in_place((a.base + ARENA_OFF) as *mut Arena<View>, 3, false) };

    // Through A: a mix of blocks, several of each size.
    let mut fill = 0u8;
    let live = churn(&a, Vec::new(), 1, 96, 1, &mut fill);
    verify(&a, &live);
    assert_eq!(a.arena().check(&a), Ok(()));

    // Through B alone: the same blocks, frees to the runs and to the pending stack,
    // new blocks, a trim (purges), checks.
    a.hide(true);
    assert_eq!(b.arena().check(&b), Ok(()));
    verify(&b, &live);
    let mut live = churn(&b, live, 2, 64, 5, &mut fill);
    verify(&b, &live);
    assert_eq!(b.arena().check(&b), Ok(()));
    b.arena().trim(&b);
    assert_eq!(b.arena().check(&b), Ok(()));
    verify(&b, &live);
    // Small blocks left on the pending stack, for A to drain.
    for _ in 0..5 {
        let i = live.iter().position(|blk| blk.1 <= SMALL_MAX).unwrap();
        free_via(&b, live.swap_remove(i), false);
    }

    // Through A alone: what B left, some freed, more blocks; then everything freed.
    b.hide(true);
    a.hide(false);
    assert_eq!(a.arena().check(&a), Ok(()));
    verify(&a, &live);
    let live = churn(&a, live, 3, 48, 7, &mut fill);
    verify(&a, &live);
    assert_eq!(a.arena().check(&a), Ok(()));
    assert!(churn(&a, live, 1, 0, 1, &mut fill).is_empty());
    assert_eq!(a.arena().check(&a), Ok(()));
    assert_eq!(a.arena().stats(&a).in_use(), 0);

    // Both views agree at the end.
    b.hide(false);
    assert_eq!(b.arena().check(&b), Ok(()));
    assert_eq!(b.arena().stats(&b).in_use(), 0);
    let (p, _) = b.arena().alloc(&b, 64, 8);
    assert!(!p.is_null());
    assert!(matches!(
        lookup(&a, (p as usize - b.base + a.base) as *const u8),
        Lookup::Small { arena: 3, .. }
    ));
}
