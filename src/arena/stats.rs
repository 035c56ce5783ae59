//! An arena's counters: [`LargeCounters`] (kept under its lock) and the snapshot
//! [`ArenaStats`] that `Arena::stats` returns.

use crate::large::PageCounters;
use crate::size_class::{class_size, NUM_CLASSES};
use crate::small::ClassCounters;

/// Counters of large blocks (guarded by the arena lock).
#[derive(Clone, Copy, Default, Debug)]
pub struct LargeCounters {
    pub allocs: u64,
    pub frees: u64,
    /// Bytes of large runs in use (whole pages).
    pub in_use: usize,
}

/// A snapshot of one arena's counters.
#[derive(Clone, Copy, Debug)]
pub struct ArenaStats {
    /// The arena's index.
    pub index: usize,
    /// Small blocks of each class handed out and taken back by the arena's bins.
    pub classes: [ClassCounters; NUM_CLASSES],
    /// Large blocks.
    pub large: LargeCounters,
    /// The page heap: pages mapped, purged, free runs.
    pub pages: PageCounters,
    /// Free pages known to hold data (not yet purged).
    pub dirty_bytes: usize,
    /// Frees that came back from a CPU of another arena (through the inbox, counted when a
    /// refill sorts them; parked in the transfer slots by the sender, counted then; or the
    /// pending stack), and local ones that found the lock held (through the pending stack,
    /// counted when drained).
    pub remote_frees: u64,
    /// Times a thread found this arena's lock held.
    pub contentions: u64,
    /// Shared heaps: times this arena's lock was taken over from a dead process, and chunks
    /// it gave up because that process left them half-updated.
    pub recoveries: u64,
    /// Of those, the take-overs after which the arena was repaired in place (the others
    /// orphaned its chunks).
    pub repairs: u64,
    /// Chunks given up by recoveries (their live blocks stay valid).
    pub orphaned_chunks: u64,
    /// Free blocks of each class sitting in the class lists of this arena's CPUs' caches,
    /// parked in its transfer slots, and this arena's blocks in any CPU's outbox (counted
    /// in use by their runs, so `classes` counts them as allocated).
    pub cached: [u64; NUM_CLASSES],
    /// Bytes of this arena's large blocks (page runs) waiting in its CPUs' run slots
    /// (counted in `large.in_use` by the page heap, not in use by the program).
    pub cached_runs: usize,
    /// Blocks handed out by the lock-free rseq fast path on this arena's CPUs.
    pub fast_allocs: u64,
    /// Blocks taken back by that fast path (outbox pushes included).
    pub fast_frees: u64,
}

// By hand: arrays of more than 32 items have no derived `Default`.
impl Default for ArenaStats {
    fn default() -> Self {
        Self {
            index: 0,
            classes: [ClassCounters::default(); NUM_CLASSES],
            large: LargeCounters::default(),
            pages: PageCounters::default(),
            dirty_bytes: 0,
            remote_frees: 0,
            contentions: 0,
            recoveries: 0,
            repairs: 0,
            orphaned_chunks: 0,
            cached: [0; NUM_CLASSES],
            cached_runs: 0,
            fast_allocs: 0,
            fast_frees: 0,
        }
    }
}

impl ArenaStats {
    /// Bytes of small blocks of class `c` in use.
    pub fn class_in_use(&self, c: usize) -> usize {
        let k = &self.classes[c];
        // The caches are read without their CPUs' cooperation: clamp a racy snapshot.
        (k.allocs - k.frees).saturating_sub(self.cached[c]) as usize * class_size(c)
    }
    /// Bytes of blocks in use, small and large.
    pub fn in_use(&self) -> usize {
        (0..NUM_CLASSES)
            .map(|c| self.class_in_use(c))
            .sum::<usize>()
            + self.large.in_use.saturating_sub(self.cached_runs)
    }
}
