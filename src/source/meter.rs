//! [`Meter`]: the bytes in use of all the arenas and huge blocks on one page source, and
//! their high-water mark, kept without a lock and without slowing the CPU caches' paths.

use core::sync::atomic::{AtomicUsize, Ordering};

/// The bytes the arenas on a source (and its huge blocks) have handed out, as published to
/// it, and the most they ever were.
///
/// An arena publishes its bytes in use rounded up to [`GRAIN`], and only when they cross
/// what it published (`Arena::release`, at the end of every lock round), so the meter
/// moves on slow paths only: bin refills and flushes of the CPU caches, the locked path,
/// large blocks; huge blocks publish their exact sizes. Blocks that sit in a CPU cache, a
/// transfer slot or an outbox have left their arena and count as in use.
///
/// Invariant: `in_use` is the sum of what the arenas and huge blocks published, `peak` the
/// largest value `in_use` took (each adder raises `peak` to the value its own addition
/// produced, and only additions raise `in_use`).
pub struct Meter {
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

/// An arena publishes its bytes in use in steps of this many (1 MiB): it keeps between its
/// true bytes and that plus `2 * GRAIN` published, so an arena's published figure moves at
/// most once per `GRAIN` bytes allocated or freed, and the meter counts at most
/// `2 * GRAIN` per arena more than the arenas hold out. With 64 KiB steps, large blocks
/// published at nearly every allocation and free, and the counter's cache line, shared by
/// the CPUs, cost the `large` workload 10%.
pub const GRAIN: usize = 1 << 20;

impl Meter {
    pub const fn new() -> Self {
        Meter {
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Counts `n` more bytes in use.
    pub fn add(&self, n: usize) {
        // Relaxed: the two counters are statistics; a single atomic's modification order
        // is all the peak needs (every value `in_use` rises to is seen by its adder).
        let now = self.in_use.fetch_add(n, Ordering::Relaxed).wrapping_add(n);
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Counts `n` fewer bytes in use.
    pub fn sub(&self, n: usize) {
        self.in_use.fetch_sub(n, Ordering::Relaxed);
    }

    /// The bytes in use as published.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// The most bytes ever in use as published.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_the_highest_sum() {
        let m = Meter::new();
        m.add(100);
        m.add(50);
        m.sub(120);
        m.add(10);
        assert_eq!((m.in_use(), m.peak()), (40, 150));
        m.add(200);
        assert_eq!((m.in_use(), m.peak()), (240, 240));
    }
}
