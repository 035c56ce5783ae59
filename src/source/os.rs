//! [`OsSource`]: the process heap's page source.

use super::registry::{END, REGISTRY};
use super::retired::RETIRED;
use super::spans::SPANS;
use super::{Meter, PageSource};
use crate::lock::RawLock;
use crate::os;
use crate::size_class::CHUNK;

/// Anonymous private memory from `mmap`, recorded in the process-wide chunk registry. Freed
/// huge spans go to the process-wide span cache (`spans.rs`) and are reused from it.
pub struct OsSource;

/// The process heap's bytes in use and their peak (`coreheap::stats().peak_in_use`).
static METER: Meter = Meter::new();

impl OsSource {
    /// Bytes of freed huge spans kept mapped for reuse.
    pub fn cached_span_bytes(&self) -> usize {
        SPANS.bytes()
    }

    /// Fork: takes the span cache's lock, then the retired chunks' (after every arena
    /// lock). Returns which it took: bit 0 the span cache's, bit 1 the retired chunks' (not
    /// one the forking thread holds already, in a signal handler).
    pub fn fork_lock(&self) -> u8 {
        SPANS.fork_lock() as u8 | (RETIRED.fork_lock() as u8) << 1
    }

    /// Fork, parent side: releases the locks [`Self::fork_lock`] took (`taken`, as it said).
    pub fn fork_unlock(&self, taken: u8) {
        if taken & 2 != 0 {
            RETIRED.fork_unlock();
        }
        if taken & 1 != 0 {
            SPANS.fork_unlock();
        }
    }

    /// Fork, child side: forgets the parent's holder of the locks [`Self::fork_lock`] took
    /// (`taken`, as it said).
    ///
    /// pre: the child of `fork`, before any other use of the heap.
    pub fn fork_reinit(&self, taken: u8) {
        if taken & 1 != 0 {
            SPANS.fork_reinit();
        }
        if taken & 2 != 0 {
            RETIRED.fork_reinit();
        }
    }
}

// SAFETY: `os::map_aligned_below` returns zeroed, aligned, private memory, and so does the
// retired ring (purged chunks, which were mapped below the cover too); the registry bit is set
// before the chunk is returned and cleared before it is retired or unmapped; cached spans are
// unpublished and tell how much of them may be dirty; nothing here allocates.
unsafe impl PageSource for OsSource {
    type Lock = RawLock;

    fn map_chunk(&self) -> *mut u8 {
        // A retired chunk first; else a fresh one below the registry's cover, so that the
        // insert below succeeds (checked anyway).
        let p = match RETIRED.take() {
            Some(p) => p,
            None => os::map_aligned_below(CHUNK, CHUNK, END),
        };
        if !p.is_null() && !REGISTRY.insert(p as usize) {
            os::unmap(p, CHUNK);
            return core::ptr::null_mut();
        }
        p
    }

    unsafe fn unmap_chunk(&self, chunk: *mut u8) {
        REGISTRY.remove(chunk as usize);
        // Kept readable: a racing double free reads a header of zeros (`retired.rs`).
        RETIRED.retire(chunk);
    }

    unsafe fn purge(&self, p: *mut u8, len: usize) -> bool {
        os::purge(p, len)
    }

    #[inline]
    fn owns_chunk(&self, chunk: usize) -> bool {
        REGISTRY.contains(chunk)
    }

    #[inline(always)]
    fn owns_chunk_quick(&self, chunk: usize) -> bool {
        REGISTRY.contains_static(chunk)
    }

    fn map_span(&self, len: usize, align: usize) -> (*mut u8, usize, usize) {
        match SPANS.take(len, align) {
            Some(t) => (t.addr, t.len, t.dirty),
            // Below the registry's cover, so that its head can be published.
            None => (
                with_retired_released(|| os::map_aligned_below(len, align, END)),
                len,
                0,
            ),
        }
    }

    unsafe fn publish_span(&self, head: *mut u8) -> bool {
        REGISTRY.insert(head as usize)
    }

    unsafe fn unpublish_span(&self, head: *mut u8) {
        REGISTRY.remove(head as usize);
    }

    unsafe fn unmap_span(&self, span: *mut u8, len: usize) {
        // The block may have written anywhere up to the span's end.
        SPANS.put(span, len, len);
    }

    fn tick(&self, now_ms: u32) {
        SPANS.decay(now_ms);
    }

    fn release_cached(&self) {
        // The retired chunks stay: they hold no memory, only address space (and none under
        // an address-space limit), and they keep a double free after `trim` reportable.
        SPANS.release_all();
    }

    #[inline(always)]
    fn meter(&self) -> Option<&Meter> {
        Some(&METER)
    }

    unsafe fn resize_span(&self, span: *mut u8, len: usize, new_len: usize) -> bool {
        os::remap_in_place(span, len, new_len)
    }

    unsafe fn move_span(
        &self,
        head: *mut u8,
        span: *mut u8,
        len: usize,
        new_len: usize,
        align: usize,
    ) -> *mut u8 {
        let target = with_retired_released(|| os::reserve_aligned(new_len, align));
        if target.is_null() {
            return target;
        }
        // Every chunk of the new span must be recordable, so that its head can be published.
        if !REGISTRY.prepare(target as usize)
            || !REGISTRY.prepare(target as usize + new_len - 1)
            || !os::move_mapping(span, len, new_len, target)
        {
            os::unmap(target, new_len);
            return core::ptr::null_mut();
        }
        REGISTRY.remove(head as usize);
        target
    }
}

/// `map()`, tried again after unmapping the retired chunks if it failed (null) while there
/// were any: the process may be short of address space (`RLIMIT_AS`).
fn with_retired_released(map: impl Fn() -> *mut u8) -> *mut u8 {
    let p = map();
    if p.is_null() && RETIRED.release_all() {
        return map();
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal of a mapping above the cover and the request below it, with a cover
    /// lowered to 2^46 so that this machine's kernel (which hands out addresses just below
    /// 2^47) exercises it: the first mapping lands above and is given back, the second
    /// below. With the real cover (2^48) this happens only on kernels with 5-level paging or
    /// 52-bit addresses (below).
    #[test]
    fn a_mapping_above_the_cover_is_made_again_below() {
        let end = 1usize << 46;
        let p = os::map_aligned_below(CHUNK, CHUNK, end);
        assert!(!p.is_null());
        let a = p as usize;
        assert!(a.is_multiple_of(CHUNK) && a + CHUNK <= end, "{a:#x}");
        // SAFETY: a fresh read-write mapping of CHUNK bytes.
        unsafe {
            assert_eq!(*p.add(CHUNK - 1), 0);
            p.write_bytes(0x5a, CHUNK);
        }
        os::unmap(p, CHUNK);
    }

    /// Chunks from a process whose last mapping lies above the cover (as it would after a
    /// program's mapping with a high hint on a kernel with 5-level paging): the source still
    /// serves them, below the cover, registered. Needs a kernel that maps above 2^48.
    #[test]
    fn chunks_stay_below_the_cover_after_a_mapping_above_it() {
        let high = 1usize << 52;
        let Some(p) = os::mem::map_exact_for_test(high, CHUNK) else {
            eprintln!(
                "skipped: the kernel does not map at {high:#x} (no 5-level paging or 52-bit \
                 addresses)"
            );
            return;
        };
        // The source's next mapping is tried just below this one.
        os::mem::note_for_test(p);
        let c = OsSource.map_chunk();
        assert!(!c.is_null());
        assert!((c as usize) + CHUNK <= END, "{c:p}");
        assert!(OsSource.owns_chunk(c as usize));
        // SAFETY: the chunk came from map_chunk and nothing refers into it.
        unsafe { OsSource.unmap_chunk(c) };
        os::unmap(p, CHUNK);
    }
}
