//! The registry of the chunks this process mapped from the OS: the cheap test, behind
//! [`OsSource`](super::OsSource)`::owns_chunk`, that tells a pointer coreheap returned from
//! one it never did. Only the OS source and the process heap's huge blocks (mapped outside
//! the arenas) write it; the engine reaches it only through `PageSource::owns_chunk`.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::size_class::CHUNK_SHIFT;

/// The set of chunks this process has mapped, one bit per possible chunk address: the
/// cheap test that tells a pointer coreheap returned from one it never did.
///
/// 2^47 bytes of user address space / 4 MiB chunks = 2^25 bits = 4 MiB of zeroed static
/// memory, of which only the pages for chunks in use are ever touched.
pub struct Registry {
    bits: [AtomicU64; REGISTRY_WORDS],
}

const ADDRESS_BITS: usize = 47;
const REGISTRY_WORDS: usize = (1 << (ADDRESS_BITS - CHUNK_SHIFT)) / 64;

impl Registry {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Self {
            bits: [ZERO; REGISTRY_WORDS],
        }
    }

    #[inline]
    fn slot(chunk: usize) -> Option<(usize, u64)> {
        let n = chunk >> CHUNK_SHIFT;
        if n / 64 >= REGISTRY_WORDS {
            None
        } else {
            Some((n / 64, 1 << (n % 64)))
        }
    }

    /// Whether `chunk` is a chunk of ours that is mapped now.
    #[inline]
    pub fn contains(&self, chunk: usize) -> bool {
        match Self::slot(chunk) {
            // Acquire: pairs with the Release in `insert`, so a reader that sees the bit also
            // sees the header written before it.
            Some((w, b)) => self.bits[w].load(Ordering::Acquire) & b != 0,
            None => false,
        }
    }

    /// Whether the chunk holding address `a` can be recorded.
    #[inline]
    pub fn covers(&self, a: usize) -> bool {
        Self::slot(a).is_some()
    }

    /// Records `chunk` as ours. Returns false if its address cannot be recorded.
    pub fn insert(&self, chunk: usize) -> bool {
        match Self::slot(chunk) {
            Some((w, b)) => {
                // Release: publishes the header written before registration.
                self.bits[w].fetch_or(b, Ordering::Release);
                true
            }
            None => false,
        }
    }

    pub fn remove(&self, chunk: usize) {
        if let Some((w, b)) = Self::slot(chunk) {
            self.bits[w].fetch_and(!b, Ordering::Relaxed);
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// The registry of chunks mapped by this process.
pub static REGISTRY: Registry = Registry::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size_class::CHUNK;

    #[test]
    fn registry_insert_contains_remove() {
        static R: Registry = Registry::new();
        let r = &R;
        let c = 0x5555_0000_0000usize;
        assert!(!r.contains(c));
        assert!(r.insert(c));
        assert!(r.contains(c));
        assert!(!r.contains(c + CHUNK));
        r.remove(c);
        assert!(!r.contains(c));
        assert!(!r.insert(1 << 60));
        assert!(!r.contains(1 << 60));
    }
}
