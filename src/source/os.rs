//! [`OsSource`]: the process heap's page source.

use super::registry::REGISTRY;
use super::PageSource;
use crate::lock::RawLock;
use crate::os;
use crate::size_class::CHUNK;

/// Anonymous private memory from `mmap`, recorded in the process-wide chunk registry.
pub struct OsSource;

// SAFETY: `os::map_aligned` returns zeroed, aligned, private memory; the registry bit is set
// before the chunk is returned and cleared before it is unmapped; nothing here allocates.
unsafe impl PageSource for OsSource {
    type Lock = RawLock;

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
