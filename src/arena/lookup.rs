//! From a pointer to what it is, in O(1) and without any lock: [`lookup`], its shortcut
//! for small blocks [`lookup_small`], and [`describe`] for messages about pointers that are
//! not block starts. The engine learns that an address is one of its chunks only through
//! `PageSource::owns_chunk`.

use crate::chunk::{chunk_of, page_index, to_rel, ChunkHeader, Kind, PageDesc, CHUNK_ARENA, MAGIC};
use crate::size_class::{class_size, is_block_offset, PAGE};
use crate::source::PageSource;

/// What a pointer is, as far as its chunk header tells.
#[derive(Clone, Copy, Debug)]
pub enum Lookup {
    /// A block at a block boundary of a small run.
    Small { arena: u32, run: *mut PageDesc },
    /// The first byte of a large run.
    Large { arena: u32, run: *mut PageDesc },
    /// A block mapped directly; the header is its chunk header.
    Huge(*mut ChunkHeader),
    /// Not a block coreheap handed out (or one already freed).
    Invalid,
}

/// Finds what `p` is, in O(1), without any lock.
///
/// For a pointer to a live block the answer is exact. For any other pointer it is `Invalid`
/// unless it points at a block boundary of a small run: a multiple of the class size from
/// the run's start, which includes blocks never carved and, in a run whose tail is shorter
/// than a block, the spot behind its last block (a freed small block is found by the
/// double-free mark, not here; a block beyond `bump` by the run's free).
#[inline]
pub fn lookup<S: PageSource>(src: &S, p: *const u8) -> Lookup {
    let c = chunk_of(p);
    if !src.owns_chunk(c) {
        return Lookup::Invalid;
    }
    let h = c as *mut ChunkHeader;
    // SAFETY: the source says the chunk is mapped, so its header is readable; the fields read
    // here never change while it is mapped, and page descriptors are read through atomics.
    unsafe {
        if (*h).magic != MAGIC {
            return Lookup::Invalid;
        }
        if (*h).kind != CHUNK_ARENA {
            return if (*h).huge_ptr == to_rel(p as usize, src.base()) {
                Lookup::Huge(h)
            } else {
                Lookup::Invalid
            };
        }
        let arena = (*h).arena_index();
        let mut i = page_index(p);
        let mut d = &(*h).pages[i];
        if d.kind() == Kind::SmallInterior {
            i -= d.lead();
            d = &(*h).pages[i];
        }
        let run = d as *const PageDesc as *mut PageDesc;
        let off = (p as usize) - (*h).page_addr(i) as usize;
        match d.kind() {
            Kind::Small if is_block_offset(off, d.class()) => Lookup::Small { arena, run },
            Kind::Large if off == 0 => Lookup::Large { arena, run },
            _ => Lookup::Invalid,
        }
    }
}

/// Whether `p`, on the page described by `d`, a page of a small run of class `class` (as
/// `d` said in a load with Acquire, which orders the `lead` read here after it), is the
/// start of one of its blocks. Blocks lie at multiples of the class size from the run's
/// first page, which is `d.lead()` pages back (0 on the first page itself); the offset is
/// tested by a multiplication ([`is_block_offset`]), not a division. For a stale pointer
/// whose page changed under the caller the answer is some boolean, never a fault.
#[cfg(not(feature = "pow2-classes"))]
#[inline(always)]
pub fn small_block_start(p: *const u8, d: &PageDesc, class: usize) -> bool {
    let off = (p as usize & (PAGE - 1)) + (d.lead() << crate::size_class::PAGE_SHIFT);
    is_block_offset(off, class)
}

/// Whether `p`, on the page described by `d`, a page of a small run of class `class`, is the
/// start of one of its blocks, for classes of at most a page (false for larger ones): with
/// power-of-two classes such blocks lie at multiples of their size from a page, so exactly
/// the addresses aligned to that size are block starts, and `d` is not needed.
#[cfg(feature = "pow2-classes")]
#[inline(always)]
pub fn small_block_start(p: *const u8, _d: &PageDesc, class: usize) -> bool {
    class < crate::size_class::NUM_CLASSES
        && class_size(class) <= PAGE
        && (p as usize) & (class_size(class) - 1) == 0
}

/// If `p` is a live small block, its arena and class: [`lookup`]'s answer
/// for such blocks, found from the block's own page descriptor (every page of a small run
/// records the class), without going to the run's first page. `None` for anything else,
/// which [`lookup`] then sorts out, and for blocks whose chunk only the source's slower test
/// finds (`PageSource::owns_chunk_quick`).
///
/// Only for the process heap's source (`OsSource`, whose chunks read zero once given back):
/// it does not compare the chunk's magic, which a shared heap's source changes, without
/// clearing `kind`, while it gives a chunk back.
#[inline]
pub fn lookup_small<S: PageSource>(src: &S, p: *const u8) -> Option<(u32, usize)> {
    let c = chunk_of(p);
    if !src.owns_chunk_quick(c) {
        return None;
    }
    let h = c as *const ChunkHeader;
    // SAFETY: as in `lookup`: the chunk is mapped, its header readable; page descriptors are
    // read through atomics. `magic` is not read: the process heap's source owns the chunk,
    // so it has one (a header that source gave back reads zero, `kind` too), and `kind` is a
    // tag of its own, which [`lookup`] checks again for anything this does not take.
    unsafe {
        if (*h).kind != CHUNK_ARENA {
            return None;
        }
        let d = &(*h).pages[page_index(p)];
        let class = d.small_class()?;
        small_block_start(p, d, class).then(|| ((*h).arena_index(), class))
    }
}

/// What a pointer that is not a block start points into (see [`describe`]).
pub struct Inside {
    /// The owning arena; none for a huge block.
    pub arena: Option<u32>,
    /// Bytes of the block or free run (0 when unknown).
    pub size: usize,
    /// Whether that is a block in use (a small or large block, or a huge one) rather than
    /// free memory or a chunk header.
    pub block: bool,
}

/// For a pointer into one of coreheap's chunks that is not a block start (an interior or
/// stale pointer): what it points into. `None` for memory coreheap does not manage. Read
/// without the arena's lock, for a message only.
pub fn describe<S: PageSource>(src: &S, p: *const u8) -> Option<Inside> {
    let c = chunk_of(p);
    if !src.owns_chunk(c) {
        return None;
    }
    let h = c as *mut ChunkHeader;
    // SAFETY: as in `lookup`: the chunk is mapped and its header readable.
    unsafe {
        if (*h).magic != MAGIC {
            return None;
        }
        if (*h).kind != CHUNK_ARENA {
            let block = to_rel(p as usize, src.base()) >= (*h).huge_ptr;
            return Some(Inside {
                arena: None,
                size: (*h).huge_size,
                block,
            });
        }
        let mut i = page_index(p);
        let mut d = &(*h).pages[i];
        if d.kind() == Kind::SmallInterior {
            i -= d.lead();
            d = &(*h).pages[i];
        }
        // Interior pages of a large run keep no distance to its head: walk back.
        while d.kind() == Kind::Interior && i > 0 {
            i -= 1;
            d = &(*h).pages[i];
        }
        let (size, block) = match d.kind() {
            Kind::Small => (class_size(d.class()), true),
            Kind::Large => (d.npages as usize * PAGE, true),
            _ => (0, false),
        };
        Some(Inside {
            arena: Some((*h).arena_index()),
            size,
            block,
        })
    }
}
