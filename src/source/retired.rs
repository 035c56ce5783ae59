//! Retired chunks: the address space of chunks the process heap gave back, kept mapped (its
//! pages returned to the kernel, so they read zero) instead of unmapped, and handed out
//! again before any fresh chunk is mapped.
//!
//! Why: `free` tests the chunk registry and then reads the chunk's header, with no lock
//! between (`arena::lookup`); the Rust sized `dealloc` reads the header without the registry
//! test. Had the chunk been unmapped in between (a double free racing the free that emptied
//! the chunk), or before (a double `dealloc` after its chunk went back), that read would
//! fault. A retired chunk stays readable: its header reads zero, which no lookup takes for
//! a chunk of ours, so the free reports the pointer instead (`docs/hardening.md`).
//!
//! Bounded: at most [`RING`] chunks (256 MiB of address space, no memory) wait here; beyond
//! that the one retired longest ago is unmapped (a free that had tested the registry before
//! that chunk was retired, and reads its header only after [`RING`] later retirements, would
//! still fault). Under an address-space limit (`RLIMIT_AS` set, as by `ulimit -v`) nothing is
//! retired: kept address space would count against the limit. When a mapping fails anyway,
//! the span paths unmap them all ([`Retired::release_all`]) and try again.
//!
//! The lock is a `RawLock` (`lock.rs`) and a leaf: nothing else is taken while it is held,
//! and no system call is made under it. It is only ever tried, never waited for (the ring is
//! reached under arena locks; a busy ring is passed over: a fresh mapping, or an unmap). The
//! fork handlers take it after the span cache's.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::lock::RawLock;
use crate::os;
use crate::size_class::CHUNK;

/// Retired chunks kept at most.
pub const RING: usize = 64;

/// The retired chunks, oldest first: `ring[(head + i) % RING]` for `i < n`.
///
/// Invariant: each is a `CHUNK`-aligned private anonymous mapping of `CHUNK` bytes of this
/// process, unpublished in the registry, whose pages read zero (purged with
/// `MADV_DONTNEED`), that nothing else uses; `n <= RING`. One exception, only after a
/// program's double free: a second free racing the chunk's release that read its header
/// before the purge may have written into it since (`docs/hardening.md`).
struct Ring {
    ring: [usize; RING],
    head: usize,
    n: usize,
}

/// See the module documentation. Invariant: `ring` is reached only with `lock` held;
/// `count` mirrors `ring.n` (written under the lock, read without it).
pub struct Retired {
    lock: RawLock,
    ring: UnsafeCell<Ring>,
    count: AtomicUsize,
}

// SAFETY: `ring` is only reached with `lock` held (type invariant).
unsafe impl Sync for Retired {}

/// The process's retired chunks.
pub static RETIRED: Retired = Retired::new();

impl Retired {
    pub const fn new() -> Self {
        Self {
            lock: RawLock::new(false),
            ring: UnsafeCell::new(Ring {
                ring: [0; RING],
                head: 0,
                n: 0,
            }),
            count: AtomicUsize::new(0),
        }
    }

    /// Chunks retired now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Runs `f` on the ring with the lock held, if the lock is free now; else None. Never
    /// waits: the ring is reached under an arena's lock (`map_chunk`, `unmap_chunk`), after
    /// which no lock may be waited for that a thread stopped in a signal handler, or a fork's
    /// prepare handler, could be holding; a busy ring is passed over instead.
    fn try_with<R>(&self, f: impl FnOnce(&mut Ring, &AtomicUsize) -> R) -> Option<R> {
        if !self.lock.try_lock() {
            return None;
        }
        // SAFETY: the lock is held until `unlock` below, after the last use.
        let r = f(unsafe { &mut *self.ring.get() }, &self.count);
        self.lock.unlock();
        Some(r)
    }

    /// Gives back the chunk `chunk`: its pages go to the kernel and its address space is
    /// kept here, or unmapped if the kernel would not purge it or the ring is busy. The
    /// oldest retired chunk is unmapped when the ring is full.
    ///
    /// pre: `chunk` is a `CHUNK`-aligned private anonymous mapping of `CHUNK` bytes from
    /// `os`, already unpublished in the registry, with no live data.
    pub fn retire(&self, chunk: *mut u8) {
        debug_assert!((chunk as usize).is_multiple_of(CHUNK));
        // Under an address-space limit the range goes back at once: kept, it would count
        // against the limit that the program's own mappings (thread stacks, files) need.
        if os::address_space_limited() || !os::purge(chunk, CHUNK) {
            os::unmap(chunk, CHUNK);
            return;
        }
        let Some(evicted) = self.try_with(|r, count| {
            let mut evicted = 0;
            if r.n == RING {
                evicted = r.ring[r.head];
                r.head = (r.head + 1) % RING;
                r.n -= 1;
            }
            r.ring[(r.head + r.n) % RING] = chunk as usize;
            r.n += 1;
            count.store(r.n, Ordering::Relaxed);
            evicted
        }) else {
            os::unmap(chunk, CHUNK);
            return;
        };
        if evicted != 0 {
            os::unmap(evicted as *mut u8, CHUNK);
        }
    }

    /// Gives back a span `span..+len` (`CHUNK`-aligned, at least a chunk): its first chunk,
    /// where a huge block's header was, is retired, the rest unmapped.
    ///
    /// pre: as for [`retire`](Self::retire), for the whole span.
    pub fn retire_span(&self, span: *mut u8, len: usize) {
        if len < CHUNK || !(span as usize).is_multiple_of(CHUNK) {
            os::unmap(span, len);
            return;
        }
        if len > CHUNK {
            // The rest of the span, from its second chunk.
            os::unmap(span.wrapping_add(CHUNK), len - CHUNK);
        }
        self.retire(span);
    }

    /// The chunk retired last, to be used again (its pages read zero), or None (also when
    /// the ring is busy).
    pub fn take(&self) -> Option<*mut u8> {
        if self.count() == 0 {
            return None;
        }
        self.try_with(|r, count| {
            if r.n == 0 {
                return None;
            }
            r.n -= 1;
            count.store(r.n, Ordering::Relaxed);
            Some(r.ring[(r.head + r.n) % RING] as *mut u8)
        })
        .flatten()
    }

    /// Unmaps every retired chunk (the process is short of address space, or trims).
    /// Returns whether there was any. Waits a bounded while for a busy ring (the callers
    /// hold no arena lock); a retirement that lands after it stays.
    pub fn release_all(&self) -> bool {
        let mut any = false;
        let mut busy = 0;
        while self.count() > 0 && busy < 100 {
            match self.take() {
                Some(c) => {
                    os::unmap(c, CHUNK);
                    any = true;
                }
                None => {
                    busy += 1;
                    os::yield_now();
                }
            }
        }
        any
    }

    /// Fork: takes the lock before `fork` (after the span cache's). Returns whether it took
    /// it: not when the forking thread holds it already (a signal handler that interrupted a
    /// retirement).
    pub fn fork_lock(&self) -> bool {
        self.lock.lock_for_fork()
    }

    /// Fork, parent side: releases the lock taken by [`Self::fork_lock`].
    pub fn fork_unlock(&self) {
        self.lock.unlock();
    }

    /// Fork, child side: forgets the parent's holder (the child inherits the ring).
    ///
    /// pre: the child of `fork`, before any other use.
    pub fn fork_reinit(&self) {
        self.lock.reinit();
    }
}

impl Default for Retired {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkHeader, MAGIC};

    fn chunk() -> *mut u8 {
        let p = os::map_aligned(CHUNK, CHUNK);
        assert!(!p.is_null());
        p
    }

    #[test]
    fn a_retired_chunk_reads_zero_and_is_used_again_last_in_first_out() {
        let r = Retired::new();
        let a = chunk();
        let b = chunk();
        // SAFETY: fresh mappings of a chunk each; a header's magic is written as an arena
        // would, then read back after retirement (what a racing free's lookup does).
        unsafe {
            (*a.cast::<ChunkHeader>()).magic = MAGIC;
            a.add(CHUNK - 1).write(7);
            r.retire(a);
            r.retire(b);
            assert_eq!(r.count(), 2);
            assert_ne!((*a.cast::<ChunkHeader>()).magic, MAGIC);
            assert_eq!(a.add(CHUNK - 1).read(), 0);
        }
        assert_eq!(r.take(), Some(b));
        assert_eq!(r.take(), Some(a));
        assert_eq!(r.take(), None);
        os::unmap(a, CHUNK);
        os::unmap(b, CHUNK);
    }

    #[test]
    fn the_ring_unmaps_the_oldest_beyond_its_bound_and_release_all_empties_it() {
        let r = Retired::new();
        let chunks: Vec<*mut u8> = (0..RING + 2).map(|_| chunk()).collect();
        for &c in &chunks {
            r.retire(c);
        }
        assert_eq!(r.count(), RING);
        // The two oldest were unmapped: the newest RING come back, newest first.
        for &c in chunks[2..].iter().rev().take(3) {
            assert_eq!(r.take(), Some(c));
        }
        assert!(r.release_all());
        assert_eq!(r.count(), 0);
        assert!(!r.release_all());
    }
}
