//! Where an engine's memory comes from: the seam between the arena engine and the OS.
//!
//! The arenas ask a [`PageSource`] for whole chunks and give them back; they never call the
//! OS themselves. [`OsSource`] maps anonymous memory; a heap in a shared file mapping will be
//! another implementation of the same trait.

use crate::chunk::REGISTRY;
use crate::os;
use crate::size_class::CHUNK;

/// A provider of chunks.
///
/// # Safety
/// Implementations must uphold, for every method:
/// - it never allocates through any global allocator and never panics (it runs inside
///   `malloc`, under an arena lock: printing or formatting may allocate and deadlock);
/// - `map_chunk` returns null or a `CHUNK`-aligned, readable, writable, zeroed region of
///   `CHUNK` bytes that nothing else uses, for which `owns_chunk` is true until
///   `unmap_chunk`;
/// - `base` returns the same value for the life of the source, and every chunk lies
///   strictly above it (`base < chunk`), so that no chunk address is stored as 0, the null
///   link.
pub unsafe trait PageSource: Sync {
    /// The address stored links are relative to: 0 for memory private to this process
    /// (links are then plain addresses), the mapping's address for a heap that several
    /// processes map at different addresses.
    #[inline(always)]
    fn base(&self) -> usize {
        0
    }

    /// Whether several processes share the memory: arenas then lock with their
    /// process-shared robust lock (`Arena::init_shared`) instead of the private futex lock,
    /// and recover an arena whose lock holder died.
    const SHARED: bool = false;

    /// Calls `f` with every chunk of this source that may belong to an arena (a superset
    /// is fine), for the recovery of an arena whose own chunk list may be damaged. Sources
    /// that are never shared need not implement it.
    fn for_each_chunk(&self, _f: &mut dyn FnMut(*mut u8)) {}

    /// A fresh zeroed chunk, or null when memory is exhausted.
    fn map_chunk(&self) -> *mut u8;
    /// Returns a chunk from `map_chunk`.
    ///
    /// # Safety
    /// `chunk` came from `map_chunk` of this source and nothing refers into it any more.
    unsafe fn unmap_chunk(&self, chunk: *mut u8);
    /// Releases the pages of `[p, p + len)`, which hold no live data: they become zero.
    /// Returns false, with the pages unchanged, if the source cannot.
    ///
    /// # Safety
    /// The range lies in one chunk of this source, is page-aligned and holds no live block.
    unsafe fn purge(&self, p: *mut u8, len: usize) -> bool;
    /// Whether `chunk` (a `CHUNK`-aligned address) is a live chunk of this source.
    fn owns_chunk(&self, chunk: usize) -> bool;
}

/// Anonymous private memory from `mmap`, recorded in the process-wide chunk registry.
pub struct OsSource;

// SAFETY: `os::map_aligned` returns zeroed, aligned, private memory; the registry bit is set
// before the chunk is returned and cleared before it is unmapped; nothing here allocates.
unsafe impl PageSource for OsSource {
    fn map_chunk(&self) -> *mut u8 {
        let p = os::map_aligned(CHUNK, CHUNK);
        if !p.is_null() && !REGISTRY.insert(p as usize) {
            os::unmap(p, CHUNK);
            return core::ptr::null_mut();
        }
        p
    }

    unsafe fn unmap_chunk(&self, chunk: *mut u8) {
        REGISTRY.remove(chunk as usize);
        os::unmap(chunk, CHUNK);
    }

    unsafe fn purge(&self, p: *mut u8, len: usize) -> bool {
        os::purge(p, len)
    }

    #[inline]
    fn owns_chunk(&self, chunk: usize) -> bool {
        REGISTRY.contains(chunk)
    }
}
