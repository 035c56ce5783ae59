//! Huge blocks: requests beyond an arena's page heap, each in a span of its own from the
//! page source ([`PageSource::map_span`]).
//!
//! Layout: the block starts `off = max(PAGE, align)` bytes into a span aligned to
//! `max(CHUNK, align)`; its chunk header is at `chunk_of(block)`, which is the span's start
//! when `off < CHUNK` and the chunk just below the block otherwise. Addresses in the header
//! are stored relative to the source's base (plain addresses for the process heap), so a
//! shared heap's other processes read them too.
//!
//! Invariant: a huge block's header has kind `CHUNK_HUGE` and, while the block is live, the
//! magic; the source publishes the header chunk (`owns_chunk` true) only after the header is
//! written, and a free takes the magic away (compare-and-swap) before anything else, so of
//! two frees of one block exactly one proceeds and the other aborts naming the block.

use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{report, Backend};
use crate::chunk::{chunk_of, from_rel, to_rel, ChunkHeader, CHUNK_HUGE, MAGIC};
use crate::size_class::{pages_for, CHUNK, PAGE};
use crate::source::PageSource;

/// Counters of huge blocks. `repr(C)`: a shared heap keeps them in its file.
#[repr(C)]
#[derive(Default)]
pub struct HugeCounters {
    pub allocs: AtomicU64,
    pub frees: AtomicU64,
    /// Bytes asked for by the live blocks.
    pub in_use: AtomicU64,
    /// Bytes of their spans.
    pub mapped: AtomicU64,
}

impl HugeCounters {
    pub const fn new() -> Self {
        Self {
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            in_use: AtomicU64::new(0),
            mapped: AtomicU64::new(0),
        }
    }

    /// (allocations, frees, bytes in use, bytes mapped).
    pub fn read(&self) -> (u64, u64, usize, usize) {
        (
            self.allocs.load(Ordering::Relaxed),
            self.frees.load(Ordering::Relaxed),
            self.in_use.load(Ordering::Relaxed) as usize,
            self.mapped.load(Ordering::Relaxed) as usize,
        )
    }

    fn resized(&self, old: (usize, usize), new: (usize, usize)) {
        self.in_use.fetch_add(new.0 as u64, Ordering::Relaxed);
        self.in_use.fetch_sub(old.0 as u64, Ordering::Relaxed);
        self.mapped.fetch_add(new.1 as u64, Ordering::Relaxed);
        self.mapped.fetch_sub(old.1 as u64, Ordering::Relaxed);
    }
}

/// The bytes from `off` to the end of a span for a block of `size` bytes.
fn span_len(off: usize, size: usize) -> usize {
    off + pages_for(size) * PAGE
}

/// Allocates a huge block of `size` bytes aligned to `align`; null when the source has no
/// span for it. Returns the block and whether it reads zero: with `zero` it is made to (only
/// the part of a reused span that may hold old data is cleared), else it does when its span
/// is fresh.
#[cold]
pub(crate) fn alloc<B: Backend>(b: &B, size: usize, align: usize, zero: bool) -> (*mut u8, bool) {
    let null = (ptr::null_mut(), false);
    if size > isize::MAX as usize - 2 * CHUNK || align > isize::MAX as usize / 4 {
        return null;
    }
    let src = b.source();
    let off = align.max(PAGE);
    let (span, len, dirty) = src.map_span(span_len(off, size), align.max(CHUNK));
    if span.is_null() {
        return null;
    }
    let p = (span as usize + off) as *mut u8;
    let h = chunk_of(p) as *mut ChunkHeader;
    // SAFETY: `h` lies in the span, at its start or a chunk below `p` (layout above), with
    // at least a page before `p`: room for the header's first fields.
    unsafe { write_header(src, h, span, len, p, size) };
    // SAFETY: `h` is the span's header chunk, its header written.
    if !unsafe { src.publish_span(h.cast()) } {
        // SAFETY: the span is ours, unpublished, and nothing refers into it.
        unsafe { src.unmap_span(span, len) };
        return null;
    }
    // The block's bytes that may hold old data.
    let stale = dirty.saturating_sub(off).min(size);
    if zero && stale > 0 {
        // SAFETY: the block is ours and `stale <= size` bytes long.
        unsafe { ptr::write_bytes(p, 0, stale) };
    }
    let c = b.huge_counters();
    c.allocs.fetch_add(1, Ordering::Relaxed);
    c.in_use.fetch_add(size as u64, Ordering::Relaxed);
    c.mapped.fetch_add(len as u64, Ordering::Relaxed);
    if let Some(m) = src.meter() {
        m.add(size);
    }
    (p, zero || stale == 0)
}

/// # Safety
/// `h` is writable for a header's first fields and lies in the span `span..+len`, which
/// holds the block `p`.
unsafe fn write_header<S: PageSource>(
    src: &S,
    h: *mut ChunkHeader,
    span: *mut u8,
    len: usize,
    p: *mut u8,
    size: usize,
) {
    let base = src.base();
    // SAFETY: by the contract. The magic goes last, with Release (`set_magic`).
    unsafe {
        (*h).kind = CHUNK_HUGE;
        (*h).arena = u32::MAX;
        (*h).map_base = to_rel(span as usize, base);
        (*h).map_len = len;
        (*h).huge_ptr = to_rel(p as usize, base);
        (*h).huge_size = size;
        (*h).set_magic(MAGIC);
    }
}

/// The span of the huge block whose header is `h`: (start, length), checked against the
/// layout above; a header that breaks it aborts naming `p` (another process may have
/// written over a shared heap's header).
///
/// # Safety
/// `h` is a mapped huge header (one that `lookup` returned for `p`).
unsafe fn span_of<S: PageSource>(src: &S, h: *mut ChunkHeader, p: *mut u8) -> (usize, usize) {
    // SAFETY: by the contract the header is mapped.
    let (span, len) = unsafe { (from_rel((*h).map_base, src.base()), (*h).map_len) };
    let off = (p as usize).wrapping_sub(span);
    if off < PAGE || off >= len || chunk_of(p) != h as usize || span % CHUNK != 0 {
        report::invalid(src, p, b"free(): corrupted huge block header");
    }
    (span, len)
}

/// The usable bytes of the huge block `p`: up to the end of its span.
///
/// # Safety
/// `h` is the live header of `p` (from `lookup`).
pub(crate) unsafe fn usable<S: PageSource>(src: &S, h: *mut ChunkHeader, p: *mut u8) -> usize {
    // SAFETY: by the contract.
    let (span, len) = unsafe { span_of(src, h, p) };
    span + len - p as usize
}

/// Frees the huge block `p`.
///
/// # Safety
/// `h` is the header of the huge block `p` (from `lookup`), which the caller gives up.
pub(crate) unsafe fn free<B: Backend>(b: &B, h: *mut ChunkHeader, p: *mut u8) {
    let src = b.source();
    // SAFETY: the header is mapped (lookup found it). Taking the magic away claims the
    // block: of two frees of it, in any threads or processes, one wins.
    let magic = unsafe { &*ptr::addr_of!((*h).magic).cast::<AtomicU64>() };
    if magic
        .compare_exchange(MAGIC, src.free_claim(), Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        report::invalid(src, p, b"free(): double free detected");
    }
    // SAFETY: as above; the block is ours alone now.
    let (span, len, size) = unsafe {
        let (span, len) = span_of(src, h, p);
        (span, len, (*h).huge_size)
    };
    let c = b.huge_counters();
    c.frees.fetch_add(1, Ordering::Relaxed);
    c.in_use.fetch_sub(size as u64, Ordering::Relaxed);
    c.mapped.fetch_sub(len as u64, Ordering::Relaxed);
    if let Some(m) = src.meter() {
        m.sub(size);
    }
    // SAFETY: the span is ours (claimed above) and holds nothing live.
    unsafe {
        src.unpublish_span(h.cast());
        src.unmap_span(span as *mut u8, len);
    }
}

/// Resizes the huge block `p` to `size` bytes (more than an arena serves) without copying:
/// in place if the source can resize its span, else by moving the span's pages to a new
/// one with the same alignment. A span that cannot shrink keeps the block while it stays at
/// least a quarter used. Null on failure, with the block untouched.
///
/// # Safety
/// `h` is the live header of `p` (from `lookup`), which the caller owns.
pub(crate) unsafe fn realloc<B: Backend>(
    b: &B,
    h: *mut ChunkHeader,
    p: *mut u8,
    size: usize,
) -> *mut u8 {
    if size > isize::MAX as usize - 2 * CHUNK {
        return ptr::null_mut();
    }
    let src = b.source();
    // SAFETY: by the contract the header is mapped and ours.
    let (span, len, old) = unsafe {
        let (span, len) = span_of(src, h, p);
        (span, len, (*h).huge_size)
    };
    let off = p as usize - span;
    let new_len = span_len(off, size);
    // SAFETY: the span is ours (contract); nothing else refers into it.
    let kept = if new_len == len || unsafe { src.resize_span(span as *mut u8, len, new_len) } {
        Some(new_len)
    } else if new_len < len && size > (len - off) / 4 {
        Some(len)
    } else {
        None
    };
    if let Some(kept) = kept {
        // SAFETY: the header is ours (contract).
        unsafe {
            (*h).map_len = kept;
            (*h).huge_size = size;
        }
        resized(b, (old, len), (size, kept));
        return p;
    }
    let map_align = if off >= CHUNK { off } else { CHUNK };
    // SAFETY: the span is ours, its header `h` published; the source hides `h` if it moves.
    let target = unsafe { src.move_span(h.cast(), span as *mut u8, len, new_len, map_align) };
    if target.is_null() {
        return target;
    }
    let q = (target as usize + off) as *mut u8;
    let nh = chunk_of(q) as *mut ChunkHeader;
    // SAFETY: the moved span is ours; its header chunk is where the layout puts it. A head
    // in a span from `move_span` can always be published (its contract).
    unsafe {
        write_header(src, nh, target, new_len, q, size);
        let published = src.publish_span(nh.cast());
        debug_assert!(published, "move_span returned a span it cannot publish");
    }
    resized(b, (old, len), (size, new_len));
    q
}

/// Counts a resized huge block: `(bytes asked for, span length)` before and after.
fn resized<B: Backend>(b: &B, old: (usize, usize), new: (usize, usize)) {
    b.huge_counters().resized(old, new);
    if let Some(m) = b.source().meter() {
        if new.0 >= old.0 {
            m.add(new.0 - old.0);
        } else {
            m.sub(old.0 - new.0);
        }
    }
}
