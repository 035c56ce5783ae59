//! `GlobalAlloc` for Rust programs: routing only.

use core::alloc::{GlobalAlloc, Layout};

use crate::heap::HEAP;

/// The coreheap allocator. Every instance shares the one process heap.
///
/// ```no_run
/// #[global_allocator]
/// static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreHeap;

impl CoreHeap {
    /// The allocator (every value is the same process heap).
    pub const fn new() -> Self {
        CoreHeap
    }
}

// SAFETY: blocks come from the process heap, which returns null or a block of at least
// `layout.size()` bytes aligned to `layout.align()`, valid until freed; realloc keeps the
// contents up to the smaller size; nothing here panics or allocates through another path.
unsafe impl GlobalAlloc for CoreHeap {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.alloc(layout.size(), layout.align()).0
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller hands back a block this allocator returned, with the layout
        // it was allocated or last reallocated with.
        unsafe { HEAP.free_sized(ptr, layout.size(), layout.align()) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        HEAP.alloc_zeroed(layout.size(), layout.align())
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller owns `ptr`, a block of this allocator.
        unsafe { HEAP.realloc(ptr, new_size, layout.align(), true) }
    }
}
