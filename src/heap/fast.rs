//! The process heap's fast paths: a small allocation or free through the current CPU's
//! cache, one rseq section each (`cpucache`), with everything else out of line.
//!
//! Each path first learns from one load of `ProcessHeap::classes` both the request's class
//! and that the caches are on (which implies READY, so `config` may be read).

use core::sync::atomic::Ordering;

use super::init::BOOTSTRAP;
use super::{Config, ProcessHeap, NOT_FAST, SRC};
use crate::arena::{lookup_small, small_block_start};
use crate::chunk::{page_index, ChunkHeader, CHUNK_ARENA};
use crate::settings::Overrides;
use crate::size_class::{request_bound, CHUNK, NUM_CLASSES, PAGE, SMALL_MIN_SHIFT, TABLE_MAX};

/// `r`, as a value the compiler must keep in a register. For `&HEAP`, whose address it
/// loads from the GOT: taking that address for a constant, it would rather load it again
/// after an `asm!` block than keep the register it had (one load more per operation).
#[inline(always)]
fn in_register<T>(r: &T) -> &T {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut p = r as *const T;
    // SAFETY: an empty instruction sequence: `p` comes out as it went in.
    // (The lint is for blocks that read through a pointer; this one only passes it on. Only
    // on x86_64, the one architecture with the fast paths: `asm!` is not stable on all.)
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::pointers_in_nomem_asm_block)]
    unsafe {
        core::arch::asm!(
            "/* {p} */",
            p = inout(reg) p,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    // SAFETY: `p` is `r`.
    unsafe { &*p }
}

impl ProcessHeap {
    /// Allocates `size` bytes aligned to `align` (a power of two). Returns the block, or
    /// null, and whether it is known to read zero.
    #[inline(always)]
    pub fn alloc(&self, size: usize, align: usize) -> (*mut u8, bool) {
        self.alloc_with(size, align, None)
    }

    /// [`alloc`](Self::alloc); should this call initialise the heap, with the builder's
    /// settings `ov`, which only the out-of-line slow path receives (the fast path is the
    /// same code).
    #[inline(always)]
    pub(crate) fn alloc_with(
        &self,
        size: usize,
        align: usize,
        ov: Option<&Overrides>,
    ) -> (*mut u8, bool) {
        let this = in_register(self);
        let bound = request_bound(size, align);
        let class = if bound < TABLE_MAX && align <= PAGE {
            // SAFETY: `bound < TABLE_MAX`.
            unsafe { this.fast_class(bound) }
        } else {
            None
        };
        if let Some(class) = class {
            // SAFETY: `fast_class` saw the fast path on, so the config is READY.
            let cfg = unsafe { &*this.config.get() };
            let Ok(b) = cfg.caches.pop(class) else {
                return Self::refill(cfg, class);
            };
            // SAFETY: the popped block is ours and at least 16 bytes long. Neither its encoded
            // link (which would help guess the arena's secret) nor the free mark may
            // survive into a live block.
            unsafe {
                (*b).link = 0;
                (*b).mark = 0;
            }
            return (b.cast(), false);
        }
        self.alloc_slow(size, align, ov)
    }

    /// A request of a class above the table's (over 8 KiB, up to `SMALL_MAX`), with the
    /// caches on: the current CPU's list of `class`, as the fast path pops, or a refill. Out
    /// of the inlined path (reached from `alloc_slow`), which a formula then classifies.
    /// (Taking the next class's cached block when the own list is empty raised the hits of
    /// the `large` workload from 56% to 67% but its peak RSS by a quarter: `bench-core.md`,
    /// session 8.)
    #[inline]
    pub(super) fn alloc_large_class(cfg: &Config, class: usize) -> (*mut u8, bool) {
        let Ok(b) = cfg.caches.pop(class) else {
            return Self::refill(cfg, class);
        };
        // SAFETY: the popped block is ours and at least 16 bytes long; as in `alloc_with`,
        // neither its link nor the free mark may survive into a live block.
        unsafe {
            (*b).link = 0;
            (*b).mark = 0;
        }
        (b.cast(), false)
    }

    /// The class of a request whose [`request_bound`] is `bound`, if the fast path is on
    /// (one load, from `classes`); then `config` may be read.
    ///
    /// # Safety
    /// `bound < TABLE_MAX` (the index is not checked).
    #[inline(always)]
    unsafe fn fast_class(&self, bound: usize) -> Option<usize> {
        // SAFETY: `bound < TABLE_MAX`, so the index is below the table's length.
        let e = unsafe { self.classes.get_unchecked(bound >> SMALL_MIN_SHIFT) };
        // Acquire: pairs with the Release stores that follow READY.
        let c = e.load(Ordering::Acquire);
        (c != NOT_FAST).then_some(c as usize)
    }

    /// Whether the heap is READY with the fast path on (one load: the first entry of
    /// `classes`). When true, `config` may be read.
    #[inline(always)]
    pub(super) fn fast_path_ready(&self) -> bool {
        // Acquire: pairs with the Release stores that follow READY.
        self.classes[0].load(Ordering::Acquire) != NOT_FAST
    }

    /// Frees `p` if it is a small block (with `pow2-classes`, of at most a page), found from
    /// the block's own page ([`lookup_small`]), through the current CPU's cache; returns
    /// whether it did (false: nothing was done, and [`Heap::free`] handles every other
    /// case). Keeps errno: the path through the cache makes no system call, and the slower
    /// ones keep it themselves.
    ///
    /// # Safety
    /// As for [`Heap::free`], `p` not null.
    #[inline]
    pub unsafe fn free_small(&self, p: *mut u8) -> bool {
        let this = in_register(self);
        if !this.fast_path_ready() {
            return false;
        }
        let Some((arena, class)) = lookup_small(&SRC, p) else {
            return false;
        };
        // SAFETY: the fast path is on, so the config is READY.
        let cfg = unsafe { &*this.config.get() };
        // SAFETY: `lookup_small` found a block start in a small run of `arena` and `class`;
        // by the contract it is a live block the caller gives up (or a double free, which
        // the mark shows and `free_small_fast` reports).
        unsafe { Self::free_small_fast(cfg, p, arena, class) };
        true
    }

    /// Frees `p`, which the caller allocated (or last resized) with `size` and `align`, the
    /// way `GlobalAlloc::dealloc` is called. A small block of at most a page skips most of
    /// [`lookup`]: its class comes from the size (which `realloc` keeps exact: a small block
    /// stays in place only within its class, a large one only while it stays large) and is
    /// checked, with the block's alignment, against the block's own page descriptor (one
    /// load); its arena comes from its chunk's header. The chunk registry is not asked: a
    /// Rust `dealloc` gets only pointers this heap handed out, whose chunks stay mapped while
    /// in use (a double `dealloc` after the chunk went back reads the zeros of a retired
    /// chunk, `source/retired.rs`, and goes on to the full checks).
    /// Anything else, including a pointer whose page no longer belongs to a small run of
    /// that class (a double free after the run was released, a wrong layout), takes
    /// [`Heap::free`], which validates it fully.
    ///
    /// # Safety
    /// `p` is a live block of this heap that the caller gives up, last allocated or resized
    /// by this heap with `size` and `align` (a power of two).
    #[inline(always)]
    pub unsafe fn free_sized(&self, p: *mut u8, size: usize, align: usize) {
        let this = in_register(self);
        let bound = request_bound(size, align);
        // Both `size` and `align` at most a page, `size` not 0; then whether the fast path
        // is on.
        let class = if bound < PAGE {
            // SAFETY: `bound < PAGE < TABLE_MAX`.
            unsafe { this.fast_class(bound) }
        } else {
            None
        };
        if let Some(class) = class {
            if cfg!(debug_assertions) && BOOTSTRAP.0.contains(p) {
                // Never seen (see below); a debug build checks rather than assume.
                // SAFETY: by the contract.
                return unsafe { this.free_outlined(p) };
            }
            // SAFETY: the fast path is on, so the config is READY.
            let cfg = unsafe { &*this.config.get() };
            // SAFETY: `class` comes from `CLASS_TABLE`, whose entries are classes (checked
            // entry by entry in a unit test); said here so the compiler drops
            // `small_block_start`'s range tests.
            unsafe { core::hint::assert_unchecked(class < NUM_CLASSES) };
            // `p` rounded down: a block of at most a page never starts a chunk (the header
            // does), so `chunk_of`'s step back for huge blocks is not needed.
            let h = (p as usize & !(CHUNK - 1)) as *const ChunkHeader;
            // SAFETY: by the contract `p` came from this heap's `alloc` once, and is not a
            // bootstrap block (those are handed out only to the initialising thread while it
            // initialises, which in a Rust program allocates nothing), so it lies in one of
            // our chunks; arena chunks stay mapped while any of their pages are in use, and
            // one given back stays mapped, reading zero (`source/retired.rs`), so a double
            // free after that reads a `kind` that sends it to the full checks. Page
            // descriptors are read through atomics; a huge block's chunk has another kind.
            // `magic` is not read: every chunk has one, and `kind` is a tag of its own.
            unsafe {
                let d = &(*h).pages[page_index(p)];
                if (*h).kind == CHUNK_ARENA
                    && d.is_small_of(class)
                    && small_block_start(p, d, class)
                {
                    // A block start of a small run of `class` of the chunk's arena, as
                    // `lookup` would say, and the caller gives it up.
                    return Self::free_small_fast(cfg, p, (*h).arena_index(), class);
                }
            }
        }
        // SAFETY: by the contract.
        unsafe { this.free_outlined(p) }
    }

    /// [`Heap::free`], out of line: the fallback of `free_sized`, which then needs no
    /// registers saved.
    ///
    /// # Safety
    /// As for `free`.
    #[inline(never)]
    unsafe fn free_outlined(&self, p: *mut u8) {
        // SAFETY: passed on from the caller.
        unsafe { self.free(p) }
    }
}
