//! Sizes: OS pages, chunks, small size classes and the large and huge thresholds.
//!
//! Glossary:
//! - **page**: 4 KiB, the unit of the page heap ([`PAGE`]).
//! - **chunk**: [`CHUNK`] bytes aligned to [`CHUNK`], mapped from the page source; its first
//!   [`HEADER_PAGES`] pages hold the chunk header, the rest are handed out as page runs.
//! - **page run**: consecutive pages of one chunk that are free, a large block, or a small
//!   run cut into blocks of one size class.
//! - **size class**: a power of two from [`SMALL_MIN`] to [`SMALL_MAX`].

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
/// The largest small block. Up to 8 KiB a power-of-two class never wastes more than rounding
/// to whole pages would (a 5 KiB request costs 8 KiB either way); above it, page rounding
/// wastes less (9 KiB -> 12 KiB against 16 KiB), so larger requests are page runs.
pub const SMALL_MAX: usize = 8192;
/// Number of small size classes: 16, 32, ..., 8192.
pub const NUM_CLASSES: usize = 10;

const _: () = assert!(SMALL_MIN << (NUM_CLASSES - 1) == SMALL_MAX);
const _: () = assert!(SMALL_MIN == 1 << SMALL_MIN_SHIFT);

/// Requests above this many bytes are mapped directly from the OS ("huge") and unmapped when
/// freed. Half a chunk: every large block fits a chunk beside its header with room to spare.
pub const LARGE_MAX: usize = CHUNK / 2;

/// The size class of a request of `size` bytes (`size <= SMALL_MAX`).
#[inline]
pub const fn class_of(size: usize) -> usize {
    if size <= SMALL_MIN {
        0
    } else {
        // ceil(log2(size)) - 4
        (usize::BITS - (size - 1).leading_zeros()) as usize - SMALL_MIN_SHIFT
    }
}

/// What the fast paths classify a request by: `(size - 1) | (align - 1)`, for `align` a power
/// of two. For `size >= 1` its bit length is that of `max(size, align) - 1` (the OR of two
/// numbers is as long as the longer), so `bound + 1` has the class of `max(size, align)`;
/// and one comparison, `bound < limit` for a power of two `limit`, says that both `size`
/// and `align` are at most `limit`. A `size` of 0 wraps to a huge bound, which fails every
/// such comparison, so it takes the slow paths.
#[inline(always)]
pub const fn request_bound(size: usize, align: usize) -> usize {
    size.wrapping_sub(1) | align.wrapping_sub(1)
}

/// The fast paths' classes of requests by [`request_bound`], in 16-byte steps: entry
/// `bound >> 4` is the class of sizes `16 * i + 1 ..= 16 * (i + 1)` for `i = bound >> 4`,
/// one load instead of a bit scan and its special case for the smallest sizes. (The process
/// heap keeps a copy inside `HEAP`, whose address the fast paths load anyway: rustc reaches
/// a static of its own through the GOT, one load more.)
pub const CLASS_TABLE: [u8; SMALL_MAX / SMALL_MIN] = {
    let mut t = [0u8; SMALL_MAX / SMALL_MIN];
    let mut i = 0;
    while i < t.len() {
        t[i] = class_of((i + 1) * SMALL_MIN) as u8;
        i += 1;
    }
    t
};

/// The block size of class `class`.
#[inline]
pub const fn class_size(class: usize) -> usize {
    SMALL_MIN << class
}

/// Pages in a small run of class `class`: 16 KiB, or eight blocks for the largest classes,
/// so a run always has at least eight blocks and one lock round refills many allocations.
#[inline]
pub const fn run_pages(class: usize) -> usize {
    let bytes = class_size(class) * 8;
    let bytes = if bytes < 16 * 1024 { 16 * 1024 } else { bytes };
    bytes / PAGE
}

/// Blocks in a small run of class `class`.
#[inline]
pub const fn run_blocks(class: usize) -> usize {
    run_pages(class) * PAGE / class_size(class)
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
    fn class_mapping_rounds_up_to_powers_of_two() {
        assert_eq!(class_of(0), 0);
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(16), 0);
        assert_eq!(class_of(17), 1);
        assert_eq!(class_of(32), 1);
        assert_eq!(class_of(33), 2);
        assert_eq!(class_of(4096), 8);
        assert_eq!(class_of(4097), 9);
        assert_eq!(class_of(SMALL_MAX), NUM_CLASSES - 1);
        assert!(request_bound(0, 16) >= SMALL_MAX);
        for size in 1..=SMALL_MAX {
            let c = class_of(size);
            for align in (0..=PAGE_SHIFT + 1).map(|s| 1 << s) {
                let bound = request_bound(size, align);
                assert_eq!(bound < SMALL_MAX, size.max(align) <= SMALL_MAX);
                assert_eq!(bound < PAGE, size.max(align) <= PAGE);
                if bound < SMALL_MAX {
                    let got = CLASS_TABLE[bound >> SMALL_MIN_SHIFT] as usize;
                    assert_eq!(got, class_of(size.max(align)), "size {size} align {align}");
                }
            }
            assert!(class_size(c) >= size, "size {size}");
            assert!(c == 0 || class_size(c - 1) < size, "size {size}");
        }
    }

    #[test]
    fn runs_hold_at_least_eight_blocks() {
        for c in 0..NUM_CLASSES {
            assert!(run_blocks(c) >= 8);
            assert_eq!(run_pages(c) * PAGE % class_size(c), 0);
        }
        assert_eq!(run_pages(0), 4);
        assert_eq!(run_pages(NUM_CLASSES - 1), 16);
    }
}
