//! Sizes: OS pages, chunks, small size classes and the large and huge thresholds.
//!
//! Glossary:
//! - **page**: 4 KiB, the unit of the page heap ([`PAGE`]).
//! - **chunk**: [`CHUNK`] bytes aligned to [`CHUNK`], mapped from the page source; its first
//!   [`HEADER_PAGES`] pages hold the chunk header, the rest are handed out as page runs.
//! - **page run**: consecutive pages of one chunk that are free, a large block, or a small
//!   run cut into blocks of one size class.
//! - **size class**: one of [`NUM_CLASSES`] block sizes from [`SMALL_MIN`] to [`SMALL_MAX`]:
//!   multiples of 16 up to 64, then [`STEPS_PER_DOUBLING`] evenly spaced sizes per doubling
//!   (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...), so a block is at most
//!   25% larger than the request above 64 bytes; every power of two is a class. With the
//!   `pow2-classes` feature the classes are the powers of two only (the older scheme, kept to
//!   be measured against).
//!
//! A class's blocks lie at multiples of its size from the start of a page-aligned run, so
//! they are aligned to the largest power of two dividing the size, at most a page
//! ([`class_align`]): 48 gives 16, 96 gives 32, 5120 gives 1024. [`class_for`] picks, for a
//! request with an alignment, the smallest class whose blocks have that alignment.
//!
//! [`HEADER_PAGES`]: crate::chunk::HEADER_PAGES

/// log2 of [`PAGE`].
pub const PAGE_SHIFT: usize = 12;
/// The page heap's unit. Equal to the OS page on x86_64 and most aarch64 kernels.
pub const PAGE: usize = 1 << PAGE_SHIFT;

/// log2 of [`CHUNK`].
pub const CHUNK_SHIFT: usize = 22;
/// 4 MiB: large enough that a chunk holds a 2 MiB large block beside others and that mapping
/// calls are rare; small enough that a wholly free chunk is common and can be unmapped.
pub const CHUNK: usize = 1 << CHUNK_SHIFT;
/// Pages in a chunk, header pages included.
pub const CHUNK_PAGES: usize = CHUNK / PAGE;

/// The smallest block: two words, room for the free-list link and a double-free marker.
pub const SMALL_MIN: usize = 16;
/// log2 of [`SMALL_MIN`].
pub const SMALL_MIN_SHIFT: usize = 4;
/// The largest size the fast paths classify by one load from `CLASS_TABLE` (8 KiB, 512
/// entries of one byte); larger classes are found by `class_for`'s formula, on a path just
/// outside the hottest one.
pub const TABLE_MAX: usize = 8192;

/// The largest block of a size class, served by runs and the per-CPU caches; larger requests
/// (up to [`LARGE_MAX`]) are page runs of their own. 256 KiB, as TCMalloc's classes reach:
/// the classes from 8 KiB up hold one or two blocks per run and keep the common large
/// allocation and free off the arena's lock (the CPU caches). A 9 KiB request takes 10 KiB
/// (page rounding: 12 KiB); above 16 KiB a class may waste up to a quarter where page
/// rounding wastes under a page, which the caches' bounds keep from adding up. With
/// `pow2-classes`, 8 KiB as before (that scheme is kept to be measured against).
#[cfg(not(feature = "pow2-classes"))]
pub const SMALL_MAX: usize = 256 * 1024;
/// The largest small block (`pow2-classes`): 8 KiB, as before the large classes.
#[cfg(feature = "pow2-classes")]
pub const SMALL_MAX: usize = TABLE_MAX;

/// Classes per doubling of the size above `SMALL_MIN * STEPS_PER_DOUBLING` (below it the
/// classes step by `SMALL_MIN`). A power of two, so that every power of two is a class and
/// each class's alignment is a power of two at least its step.
#[cfg(not(feature = "pow2-classes"))]
pub const STEPS_PER_DOUBLING: usize = 4;
/// Classes per doubling: one, the powers of two (`pow2-classes`).
#[cfg(feature = "pow2-classes")]
pub const STEPS_PER_DOUBLING: usize = 1;
const _: () = assert!(STEPS_PER_DOUBLING.is_power_of_two());

/// The class after one of `size` bytes: `size` plus its step, a [`STEPS_PER_DOUBLING`]th of
/// the largest power of two not above `size`, and at least [`SMALL_MIN`].
const fn next_class_size(size: usize) -> usize {
    let floor_pow2 = 1 << (usize::BITS - 1 - size.leading_zeros());
    let step = floor_pow2 / STEPS_PER_DOUBLING;
    size + if step > SMALL_MIN { step } else { SMALL_MIN }
}

const fn count_classes() -> usize {
    let mut n = 0;
    let mut size = SMALL_MIN;
    while size <= SMALL_MAX {
        n += 1;
        size = next_class_size(size);
    }
    n
}

/// Number of size classes (52; 10 with `pow2-classes`).
pub const NUM_CLASSES: usize = count_classes();

/// Number of classes of at most [`TABLE_MAX`] bytes, the ones [`CLASS_TABLE`] gives (32; 10
/// with `pow2-classes`); classes from `TABLE_CLASSES` on are the large ones.
pub const TABLE_CLASSES: usize = smallest_class(TABLE_MAX, 1) + 1;
const _: () = assert!(CLASS_SIZES[TABLE_CLASSES - 1] as usize == TABLE_MAX);

/// A table with one entry per class, computed at build time: `per_class!(T, |c| e)` is the
/// array of `e as T` for each class `c`. (Slow paths read the tables instead of dividing
/// by a class's size on each call.)
macro_rules! per_class {
    ($t:ty, |$c:ident| $e:expr) => {{
        let mut t: [$t; crate::size_class::NUM_CLASSES] = [0; crate::size_class::NUM_CLASSES];
        let mut $c = 0;
        while $c < crate::size_class::NUM_CLASSES {
            let v = $e;
            assert!(v as $t as usize == v, "a class's entry does not fit the table's type");
            t[$c] = v as $t;
            $c += 1;
        }
        t
    }};
}
pub(crate) use per_class;

/// The block size of every class, ascending.
pub const CLASS_SIZES: [u32; NUM_CLASSES] = {
    let mut t = [0u32; NUM_CLASSES];
    let mut size = SMALL_MIN;
    let mut c = 0;
    while c < NUM_CLASSES {
        t[c] = size as u32;
        size = next_class_size(size);
        c += 1;
    }
    t
};

const _: () = assert!(CLASS_SIZES[NUM_CLASSES - 1] as usize == SMALL_MAX);
const _: () = assert!(SMALL_MIN == 1 << SMALL_MIN_SHIFT);
// A class number fits the low byte of a page descriptor's `kind_class`.
const _: () = assert!(NUM_CLASSES <= u8::MAX as usize);

/// Requests above this many bytes are mapped directly from the OS ("huge") and unmapped when
/// freed. Half a chunk: every large block fits a chunk beside its header with room to spare.
pub const LARGE_MAX: usize = CHUNK / 2;

/// The block size of class `class` (`class < NUM_CLASSES`; any other reads as the largest
/// class, never a panic).
#[inline]
pub const fn class_size(class: usize) -> usize {
    CLASS_SIZES[in_range(class)] as usize
}

/// `class`, or the largest class if `class` is out of range: table lookups by a class read
/// from memory need no bounds check that could panic.
#[inline(always)]
const fn in_range(class: usize) -> usize {
    if class < NUM_CLASSES {
        class
    } else {
        NUM_CLASSES - 1
    }
}

/// The alignment of every block of class `class`: the largest power of two dividing its
/// size, at most a page (runs start on a page).
#[inline]
pub const fn class_align(class: usize) -> usize {
    let low = 1 << class_size(class).trailing_zeros();
    if low < PAGE {
        low
    } else {
        PAGE
    }
}

/// The smallest class of at least `size` bytes whose size is a multiple of `multiple` (a
/// power of two); `NUM_CLASSES` if none. Used to build [`CLASS_TABLE`] and by tests.
pub const fn smallest_class(size: usize, multiple: usize) -> usize {
    let mut c = 0;
    while c < NUM_CLASSES {
        if class_size(c) >= size && class_size(c).is_multiple_of(multiple) {
            return c;
        }
        c += 1;
    }
    NUM_CLASSES
}

/// What the fast paths classify a request by: `(size - 1) | (align - 1)`, for `align` a power
/// of two. For `size >= 1`, `bound + 1` is `size` rounded up to a multiple of `align`, so
/// one comparison, `bound < limit` for a power of two `limit`, says that both `size` and
/// `align` are at most `limit`. A `size` of 0 wraps to a huge bound, which fails every such
/// comparison, so it takes the slow paths.
#[inline(always)]
pub const fn request_bound(size: usize, align: usize) -> usize {
    size.wrapping_sub(1) | align.wrapping_sub(1)
}

/// The classes of requests by [`request_bound`], in 16-byte steps: entry `i` is the smallest
/// class of at least `16 * (i + 1)` bytes whose size is a multiple of the largest power of
/// two dividing `16 * (i + 1)`. For a request `(size, align)` with `align >= 16`,
/// `16 * (i + 1)` for `i = bound >> 4` is `size` rounded up to a multiple of `align`, so
/// that class's blocks are aligned to `align`; for `align < 16` every class qualifies
/// (all sizes are multiples of 16). One load instead of a search. (The process heap keeps a
/// copy inside `HEAP`, whose address the fast paths load anyway: rustc reaches a static of
/// its own through the GOT, one load more.)
pub const CLASS_TABLE: [u8; TABLE_MAX / SMALL_MIN] = {
    let mut t = [0u8; TABLE_MAX / SMALL_MIN];
    let mut i = 0;
    while i < t.len() {
        let rounded = (i + 1) * SMALL_MIN;
        let low = 1 << rounded.trailing_zeros();
        let multiple = if low < PAGE { low } else { PAGE };
        let c = smallest_class(rounded, multiple);
        assert!(c < NUM_CLASSES);
        t[i] = c as u8;
        i += 1;
    }
    t
};

/// The class of a request of `size` bytes aligned to `align` (a power of two), for
/// `1 <= size <= SMALL_MAX` and `align <= PAGE`: the smallest class of at least `size`
/// bytes whose blocks are aligned to `align`. One table load up to [`TABLE_MAX`], else
/// [`large_class_for`].
#[inline]
pub const fn class_for(size: usize, align: usize) -> usize {
    let bound = request_bound(size, align);
    if bound < TABLE_MAX {
        // Masked: out-of-contract arguments give some class, never a panic.
        CLASS_TABLE[(bound >> SMALL_MIN_SHIFT) & (CLASS_TABLE.len() - 1)] as usize
    } else {
        large_class_for(bound)
    }
}

/// The class of a request whose [`request_bound`] is `bound` (`TABLE_MAX <= bound <
/// SMALL_MAX`, its alignment at most a page) by a formula: above [`TABLE_MAX`] the classes
/// are four per doubling, so for `2^e < s <= 2^(e+1)` (`s = bound + 1`, the size rounded up
/// to the alignment) the class is `2^e` plus as many quarters of `2^e` as reach `s`, the
/// quarter's number being bits `e - 2` and `e - 1` of `bound`. That class is a multiple of
/// the alignment too: every class above 8 KiB is a multiple of 2 KiB, and the multiples of a
/// page in (8, 16] KiB, 12 and 16 KiB, are classes themselves (the unit test checks every
/// size and alignment against [`smallest_class`]). Out of range: the largest class, never a
/// panic.
#[inline]
pub const fn large_class_for(bound: usize) -> usize {
    if bound >= SMALL_MAX || bound < TABLE_MAX {
        return NUM_CLASSES - 1;
    }
    let e = (usize::BITS - 1 - bound.leading_zeros()) as usize;
    let quarter = (bound >> (e - 2)) & (STEPS_PER_DOUBLING - 1);
    in_range(
        TABLE_CLASSES + (e - TABLE_MAX.trailing_zeros() as usize) * STEPS_PER_DOUBLING + quarter,
    )
}
const _: () = assert!(CLASS_TABLE.len().is_power_of_two());

/// The shortest run, in pages, of any class.
const RUN_MIN_PAGES: usize = 4;
/// The fewest blocks a run holds, so that one lock round refills many allocations.
const RUN_MIN_BLOCKS: usize = 8;
/// A run's tail that holds no whole block is at most `1 / RUN_WASTE_DIV` of the run.
const RUN_WASTE_DIV: usize = 64;
/// The longest run, in pages, of a class of at most [`TABLE_MAX`]: where the search of
/// [`run_pages`] gives up.
const RUN_MAX_PAGES: usize = 16;
/// The longest run of any class, in pages: one block of the largest class.
// Read only by the constant assertions below (and a test), which Rust 1.87, the MSRV, does not
// count as a use.
#[allow(dead_code)]
const RUN_LONGEST_PAGES: usize = SMALL_MAX / PAGE;

/// Pages in a small run of class `class` (out of range: as the largest class): the fewest
/// pages, at least [`RUN_MIN_PAGES`], that hold [`RUN_MIN_BLOCKS`] blocks and leave at most
/// `1 / RUN_WASTE_DIV` of the run unused behind its last block. A size is an odd factor
/// times a power of two (`m * 2^j`, `m` in 1, 3, 5, 7), so `m` pages (or a multiple) leave
/// nothing over and the search always ends within [`RUN_MAX_PAGES`] (checked at compile
/// time). The powers of two get 16 KiB or 8 blocks, as before the finer classes.
///
/// A class above [`TABLE_MAX`] takes the fewest blocks that fill whole pages: one (from 12
/// KiB, a multiple of a page), two for 10 and 14 KiB (5 and 7 pages). Those runs exist to
/// feed the CPU caches; more blocks per run would keep more pages of a class that a program
/// stopped using, and a refill takes one or two blocks anyway ([`crate::cpucache::batch`]).
pub const fn run_pages(class: usize) -> usize {
    RUN_PAGES[in_range(class)] as usize
}

const fn choose_run_pages(size: usize) -> usize {
    if size > TABLE_MAX {
        let mut blocks = 1;
        while !(blocks * size).is_multiple_of(PAGE) {
            blocks += 1;
        }
        return blocks * size / PAGE;
    }
    let mut pages = RUN_MIN_PAGES;
    while pages <= RUN_MAX_PAGES {
        let bytes = pages * PAGE;
        if bytes / size >= RUN_MIN_BLOCKS && (bytes % size) * RUN_WASTE_DIV <= bytes {
            return pages;
        }
        pages += 1;
    }
    panic!("no run length fits the class")
}

const RUN_PAGES: [u8; NUM_CLASSES] = per_class!(u8, |c| choose_run_pages(class_size(c)));

/// Blocks in a small run of class `class`.
#[inline]
pub const fn run_blocks(class: usize) -> usize {
    RUN_BLOCKS[in_range(class)] as usize
}

/// [`run_blocks`] of every class, so that carving and returning blocks divide by no size.
const RUN_BLOCKS: [u16; NUM_CLASSES] = per_class!(u16, |c| run_pages(c) * PAGE / class_size(c));

/// The pages after the first of a run of class `class` that [`run_page_marked`] says need
/// the class and distance: every one up to 8 KiB, else one per block after the first (the
/// blocks being longer than a page, each starts on a page of its own). Without a division
/// per page: the runs of the largest classes have 64.
#[inline]
pub fn marked_pages(class: usize) -> impl Iterator<Item = usize> {
    let large = class >= TABLE_CLASSES;
    let size = class_size(class);
    let n = if large {
        run_blocks(class)
    } else {
        run_pages(class)
    };
    (1..n).map(move |k| if large { (k * size) >> PAGE_SHIFT } else { k })
}

/// Whether page `j` of a run of class `class` (`j < run_pages(class)`) needs the run's
/// class and its distance back to the first page (`SmallInterior`): up to 8 KiB every page
/// (any page may hold a block start); above, only a page where a block starts (the second
/// block of a 10 or 14 KiB run), so that carving and releasing a run of up to 64 pages
/// writes one or two page descriptors, not all of them; the others stay `Interior`, as in a
/// large run, and a pointer there is no block start either way.
#[inline]
pub const fn run_page_marked(class: usize, j: usize) -> bool {
    if class < TABLE_CLASSES {
        return true;
    }
    let size = class_size(class);
    // The first block starting at or after the page's start.
    let first = (j * PAGE).div_ceil(size);
    first < run_blocks(class) && first * size < (j + 1) * PAGE
}

/// Per class, `ceil(2^64 / size)`: block indices and block starts from offsets in a run by
/// a multiplication, never a division (Lemire, Kaser and Kurz, "Faster remainder by direct
/// computation", 2019: for `n, d < 2^32` and `c = ceil(2^64 / d)`, `n / d` is the high
/// word of `n * c` and `d` divides `n` iff the low word of `n * c` is below `c`). Run
/// offsets are below `RUN_LONGEST_PAGES * PAGE`, far inside that range. Padded to a power of
/// two entries (the spare ones 0: no offset is a block start there), so that an index
/// masked by [`DIV_MASK`] needs no bounds check.
pub const DIV_MAGIC: [u64; DIV_SLOTS] = {
    let mut t = [0u64; DIV_SLOTS];
    let mut c = 0;
    while c < NUM_CLASSES {
        t[c] = u64::MAX / class_size(c) as u64 + 1;
        c += 1;
    }
    t
};
const DIV_SLOTS: usize = NUM_CLASSES.next_power_of_two();
/// Masks a class number into [`DIV_MAGIC`]'s range.
pub const DIV_MASK: usize = DIV_SLOTS - 1;
const _: () = assert!(RUN_LONGEST_PAGES * PAGE <= 1 << 32);
// A run's length fits `RUN_PAGES`' byte.
const _: () = assert!(RUN_LONGEST_PAGES <= u8::MAX as usize);

/// Whether a block of class `class` starts `off` bytes into its run (`off` below the run's
/// length; any `off < 2^32` answers correctly).
#[inline(always)]
pub fn is_block_offset(off: usize, class: usize) -> bool {
    let c = DIV_MAGIC[class & DIV_MASK];
    (off as u64).wrapping_mul(c) < c
}

/// The index of the block of class `class` that holds the byte `off` bytes into its run
/// (`off < 2^32`): `off / class_size(class)`.
#[inline(always)]
pub fn block_index(off: usize, class: usize) -> usize {
    let c = DIV_MAGIC[class & DIV_MASK];
    ((off as u128 * c as u128) >> 64) as usize
}

/// Pages needed for `size` bytes.
#[inline]
pub const fn pages_for(size: usize) -> usize {
    (size + PAGE - 1) >> PAGE_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_spaced_by_a_quarter_and_hold_the_powers_of_two() {
        for c in 1..NUM_CLASSES {
            let (a, b) = (class_size(c - 1), class_size(c));
            assert!(a < b && b % SMALL_MIN == 0);
            if a >= 64 {
                assert!((b - a) * STEPS_PER_DOUBLING <= a, "{a} -> {b}");
            }
        }
        let mut p = SMALL_MIN;
        while p <= SMALL_MAX {
            assert_eq!(class_size(smallest_class(p, 1)), p);
            p *= 2;
        }
        #[cfg(not(feature = "pow2-classes"))]
        assert_eq!(
            CLASS_SIZES[..12],
            [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
        );
        #[cfg(feature = "pow2-classes")]
        assert_eq!(NUM_CLASSES, 10);
    }

    #[test]
    fn every_size_and_alignment_gets_the_smallest_aligned_class() {
        assert!(request_bound(0, 16) >= SMALL_MAX);
        // Every size up to the table's end, then (a search per size being slow in a debug
        // build) every size next to a multiple of 512 bytes, which holds every class edge.
        let sizes = (1..=TABLE_MAX).chain(
            (TABLE_MAX / 512..SMALL_MAX / 512)
                .map(|k| (k + 1) * 512)
                .flat_map(|m| [m - 1, m, m + 1]),
        );
        for size in sizes {
            for align in (0..=PAGE_SHIFT + 1).map(|s| 1 << s) {
                let bound = request_bound(size, align);
                assert_eq!(bound < SMALL_MAX, size.max(align) <= SMALL_MAX);
                assert_eq!(bound < PAGE, size.max(align) <= PAGE);
                if bound >= SMALL_MAX || align > PAGE {
                    continue;
                }
                let c = class_for(size, align);
                let cs = class_size(c);
                // Big enough, and every block of the class (at `run + i * cs`, the run
                // page-aligned) aligned.
                assert!(cs >= size, "size {size} align {align}");
                assert_eq!(class_align(c) % align, 0, "size {size} align {align}");
                assert_eq!(cs % align.min(PAGE), 0, "size {size} align {align}");
                // The smallest such class.
                assert_eq!(c, smallest_class(size, align), "size {size} align {align}");
            }
            let c = class_for(size, 1);
            assert!(c == 0 || class_size(c - 1) < size, "size {size}");
        }
    }

    #[test]
    fn large_classes_follow_the_formula() {
        assert_eq!(class_size(TABLE_CLASSES - 1), TABLE_MAX);
        #[cfg(not(feature = "pow2-classes"))]
        {
            assert_eq!(NUM_CLASSES, 52);
            assert_eq!(
                CLASS_SIZES[TABLE_CLASSES..TABLE_CLASSES + 5],
                [10240, 12288, 14336, 16384, 20480]
            );
            assert_eq!(class_for(9 * 1024, 8), TABLE_CLASSES);
            assert_eq!(class_for(10 * 1024 + 1, 8), TABLE_CLASSES + 1);
            assert_eq!(class_for(9 * 1024, PAGE), TABLE_CLASSES + 1);
            assert_eq!(class_for(SMALL_MAX, 16), NUM_CLASSES - 1);
        }
        // Out of contract: some class, no panic.
        assert!(large_class_for(usize::MAX) < NUM_CLASSES);
        assert!(large_class_for(0) < NUM_CLASSES);
    }

    #[test]
    fn runs_hold_eight_blocks_and_waste_little() {
        // (None with `pow2-classes`.)
        for c in (0..NUM_CLASSES).filter(|&c| c >= TABLE_CLASSES) {
            // The large classes: whole pages, one or two blocks.
            let bytes = run_pages(c) * PAGE;
            assert_eq!(bytes % class_size(c), 0);
            assert!((1..=2).contains(&run_blocks(c)), "class {c}");
            assert!(run_pages(c) <= RUN_LONGEST_PAGES);
        }
        for c in 0..TABLE_CLASSES {
            let bytes = run_pages(c) * PAGE;
            assert!(run_blocks(c) >= RUN_MIN_BLOCKS);
            assert!(run_pages(c) >= RUN_MIN_PAGES && run_pages(c) <= RUN_MAX_PAGES);
            assert!((bytes - run_blocks(c) * class_size(c)) * RUN_WASTE_DIV <= bytes);
            if class_size(c).is_power_of_two() {
                // As before the finer classes: 16 KiB, or eight blocks.
                assert_eq!(bytes, (8 * class_size(c)).max(16 * 1024));
            }
        }
    }

    #[test]
    fn marked_pages_are_those_where_a_block_starts() {
        for c in 0..NUM_CLASSES {
            for j in 0..run_pages(c) {
                let starts = (0..run_blocks(c)).any(|i| i * class_size(c) / PAGE == j);
                if c < TABLE_CLASSES {
                    assert!(run_page_marked(c, j));
                } else {
                    assert_eq!(run_page_marked(c, j), starts, "class {c} page {j}");
                }
            }
            let listed: Vec<usize> = marked_pages(c).collect();
            let want: Vec<usize> = (1..run_pages(c))
                .filter(|&j| run_page_marked(c, j))
                .collect();
            assert_eq!(listed, want, "class {c}");
        }
    }

    #[test]
    fn reciprocals_agree_with_division_at_every_offset_of_every_run() {
        for c in 0..NUM_CLASSES {
            let size = class_size(c);
            for off in 0..run_pages(c) * PAGE + 2 * size {
                assert_eq!(block_index(off, c), off / size, "class {c} offset {off}");
                assert_eq!(
                    is_block_offset(off, c),
                    off % size == 0,
                    "class {c} offset {off}"
                );
            }
            // Offsets from a stale page descriptor: up to a whole chunk.
            for off in (0..CHUNK).step_by(4093) {
                assert_eq!(block_index(off, c), off / size);
                assert_eq!(is_block_offset(off, c), off % size == 0);
            }
        }
        // Spare entries: no offset is a block start.
        for c in (0..DIV_SLOTS).filter(|&c| c >= NUM_CLASSES) {
            assert!(!is_block_offset(0, c) && !is_block_offset(64, c));
        }
    }
}
