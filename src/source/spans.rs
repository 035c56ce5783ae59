//! The process-wide cache of freed huge-block spans behind [`OsSource`](super::OsSource):
//! a freed span is kept mapped (its pages resident) so that the next huge block reuses it
//! instead of faulting fresh zeroed pages in; spans go back to the kernel after
//! [`DECAY_MS`] unused, beyond [`CAP`] bytes, and on [`SpanCache::release_all`] (trim).
//!
//! Reuse is best fit: the shortest cached span that holds the request; when the excess is
//! more than a quarter of the request, the part from the next chunk boundary stays cached as
//! a span of its own and the piece before it is unmapped; failing that, the longest shorter
//! span, grown in place (`mremap`) or moved with `mremap` to an aligned place with its tail
//! zero-filled by the kernel. Only when the cache is empty is a fresh span mapped.
//!
//! The cache's lock is a `RawLock` (`lock.rs`: a futex lock that never allocates), held only
//! to pick, split or insert spans: the system calls that unmap or move them run after it is
//! released. In the process heap's lock order it comes after every arena lock (the arenas'
//! tick takes it with `try_lock`; the fork handlers take it after the arenas', then the
//! retired chunks' lock, `retired.rs`). Spans given back have their head chunk retired.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::retired::RETIRED;
use crate::lock::RawLock;
use crate::os;
use crate::size_class::CHUNK;

/// Spans the cache holds at most.
const SLOTS: usize = 32;

/// Bytes of spans the cache holds at most (64 MiB): the page heap's floor of dirty pages per
/// arena (`policy::DIRTY_MAX`, which `COREHEAP_DIRTY_MAX` sets for both), so a process keeps at most that much more resident than
/// it uses for its huge blocks, and glibc's own bound on free memory kept at the top of its
/// heap after its mmap threshold has risen (twice the 32 MiB largest threshold). A span
/// larger than this alone is unmapped at once.
#[cfg_attr(not(test), allow(dead_code))]
pub const CAP: usize = crate::policy::DIRTY_MAX;

/// The cap in force: [`CAP`] unless `COREHEAP_DIRTY_MAX`, the builder or
/// `mallopt(M_TRIM_THRESHOLD)` set another (`policy.rs`).
fn cap() -> usize {
    crate::policy::dirty_max()
}

/// A span unused for this long goes back to the kernel by default (the page heap's purge
/// delay; `COREHEAP_PURGE_MS` sets both, `policy.rs`).
#[cfg_attr(not(test), allow(dead_code))]
pub const DECAY_MS: u32 = crate::policy::PURGE_MS;

/// A cached span: `len` bytes mapped at `addr`, of which the first `dirty` may hold old data
/// (the rest read zero); freed at `stamp` (ms, wrapping).
#[derive(Clone, Copy)]
struct Span {
    addr: usize,
    len: usize,
    dirty: usize,
    stamp: u32,
}

const NONE: Span = Span {
    addr: 0,
    len: 0,
    dirty: 0,
    stamp: 0,
};

/// The cached spans.
///
/// Invariant: `spans[..n]` are the cached spans, each a private anonymous mapping of this
/// process, `CHUNK`-aligned, unpublished in the registry, that nothing else uses, with
/// `dirty <= len`; `bytes` is the sum of their lengths and at most the cap in force at the
/// last `put` (`cap()`; a lowered cap applies from the next one); `n <= SLOTS`.
struct Slots {
    spans: [Span; SLOTS],
    n: usize,
}

/// Spans taken out of the cache under its lock, to be unmapped after it is released.
struct Doomed {
    spans: [(usize, usize); SLOTS],
    n: usize,
}

impl Doomed {
    const fn new() -> Self {
        Self {
            spans: [(0, 0); SLOTS],
            n: 0,
        }
    }

    fn push(&mut self, s: Span) {
        self.spans[self.n] = (s.addr, s.len);
        self.n += 1;
    }

    /// Gives the spans back: each one's head, where a huge block's header was, is retired
    /// (kept readable, `retired.rs`), the rest unmapped.
    fn unmap(&self) {
        for &(addr, len) in &self.spans[..self.n] {
            RETIRED.retire_span(addr as *mut u8, len);
        }
    }
}

/// See the module documentation. Invariant: `slots` is reached only with `lock` held;
/// `bytes` mirrors the cached bytes (written under the lock, read without it).
pub struct SpanCache {
    lock: RawLock,
    slots: UnsafeCell<Slots>,
    bytes: AtomicUsize,
}

// SAFETY: `slots` is only reached with `lock` held (type invariant).
unsafe impl Sync for SpanCache {}

impl Default for SpanCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's span cache.
pub static SPANS: SpanCache = SpanCache::new();

/// What [`SpanCache::take`] found.
pub struct Taken {
    pub addr: *mut u8,
    pub len: usize,
    /// Bytes from `addr` that may hold old data.
    pub dirty: usize,
}

impl SpanCache {
    pub const fn new() -> Self {
        Self {
            lock: RawLock::new(false),
            slots: UnsafeCell::new(Slots {
                spans: [NONE; SLOTS],
                n: 0,
            }),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Bytes of spans cached now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Runs `f` on the slots with the lock held.
    fn with<R>(&self, f: impl FnOnce(&mut Slots, &AtomicUsize) -> R) -> R {
        self.lock.lock();
        // SAFETY: the lock is held until `unlock` below, after the last use.
        let r = f(unsafe { &mut *self.slots.get() }, &self.bytes);
        self.lock.unlock();
        r
    }

    /// A span of at least `len` bytes (a multiple of the page size) aligned to `align` (a
    /// power of two, at least `CHUNK`) made from a cached span, or None when the cache has
    /// none that can be made into one (the caller then maps a fresh span).
    pub fn take(&self, len: usize, align: usize) -> Option<Taken> {
        if self.bytes() == 0 {
            return None;
        }
        let now = os::now_ms();
        let mut doomed = Doomed::new();
        let found = self.with(|s, bytes| {
            s.expire(now, bytes, &mut doomed);
            let span = s.remove(s.pick(len, align)?, bytes);
            Some(s.split(span, len, bytes))
        });
        doomed.unmap();
        let span = found?;
        if span.len >= len {
            // A longer span: its tail (less than a chunk after `split`) goes when it is more
            // than a quarter of the request.
            let keep = if span.len - len > len / 4 {
                os::unmap((span.addr + len) as *mut u8, span.len - len);
                len
            } else {
                span.len
            };
            return Some(Taken {
                addr: span.addr as *mut u8,
                len: keep,
                dirty: span.dirty.min(keep),
            });
        }
        // A shorter span: grow it in place, else move its pages to an aligned reservation;
        // either way the new tail reads zero.
        let p = span.addr as *mut u8;
        if span.addr.is_multiple_of(align) && os::remap_in_place(p, span.len, len) {
            return Some(Taken {
                addr: p,
                len,
                dirty: span.dirty,
            });
        }
        let target = os::reserve_aligned(len, align);
        if !target.is_null() {
            if os::move_mapping(p, span.len, len, target) {
                return Some(Taken {
                    addr: target,
                    len,
                    dirty: span.dirty,
                });
            }
            os::unmap(target, len);
        }
        RETIRED.retire_span(p, span.len);
        None
    }

    /// Keeps the span `addr..+len` (of which the first `dirty` bytes may hold data) for
    /// reuse, or unmaps it if it is larger than the cap. Spans past their delay, and the
    /// oldest beyond the cap or the slots, are unmapped.
    ///
    /// pre: the span is a private anonymous `CHUNK`-aligned mapping of this process,
    /// unpublished, that nothing refers into any more.
    pub fn put(&self, addr: *mut u8, len: usize, dirty: usize) {
        debug_assert!((addr as usize).is_multiple_of(CHUNK) && dirty <= len);
        let cap = cap();
        if len > cap {
            RETIRED.retire_span(addr, len);
            return;
        }
        let now = os::now_ms();
        let mut doomed = Doomed::new();
        self.with(|s, bytes| {
            s.expire(now, bytes, &mut doomed);
            while s.n == SLOTS || bytes.load(Ordering::Relaxed) + len > cap {
                let i = s.oldest(now);
                doomed.push(s.remove(i, bytes));
            }
            s.spans[s.n] = Span {
                addr: addr as usize,
                len,
                dirty,
                stamp: now,
            };
            s.n += 1;
            bytes.fetch_add(len, Ordering::Relaxed);
        });
        doomed.unmap();
    }

    /// Unmaps the spans unused for [`DECAY_MS`] at time `now`, unless another thread holds
    /// the lock (it does the same soon).
    pub fn decay(&self, now: u32) {
        if self.bytes() == 0 || !self.lock.try_lock() {
            return;
        }
        let mut doomed = Doomed::new();
        // SAFETY: the lock is held until `unlock` below.
        unsafe { (*self.slots.get()).expire(now, &self.bytes, &mut doomed) };
        self.lock.unlock();
        doomed.unmap();
    }

    /// Unmaps every cached span.
    pub fn release_all(&self) {
        let mut doomed = Doomed::new();
        self.with(|s, bytes| {
            while s.n > 0 {
                doomed.push(s.remove(s.n - 1, bytes));
            }
        });
        doomed.unmap();
    }

    /// Fork: takes the lock before `fork` (after every arena lock).
    /// Returns whether it took the lock: not when the forking thread holds it already (a
    /// signal handler that interrupted a huge allocation or free).
    pub fn fork_lock(&self) -> bool {
        self.lock.lock_for_fork()
    }

    /// Fork, parent side: releases the lock taken by [`Self::fork_lock`].
    pub fn fork_unlock(&self) {
        self.lock.unlock();
    }

    /// Fork, child side: forgets the parent's holder (the child inherits the spans).
    ///
    /// pre: the child of `fork`, before any other use of the cache.
    pub fn fork_reinit(&self) {
        self.lock.reinit();
    }
}

impl Slots {
    /// The span to make into one of `len` bytes aligned to `align`: the shortest that holds
    /// it, else the longest shorter one.
    fn pick(&self, len: usize, align: usize) -> Option<usize> {
        let spans = &self.spans[..self.n];
        let fits = |s: &Span| s.len >= len && s.addr.is_multiple_of(align);
        let best = spans
            .iter()
            .enumerate()
            .filter(|(_, s)| fits(s))
            .min_by_key(|(_, s)| s.len);
        best.or_else(|| {
            spans
                .iter()
                .enumerate()
                .filter(|(_, s)| s.len < len)
                .max_by_key(|(_, s)| s.len)
        })
        .map(|(i, _)| i)
    }

    /// A span taken out for a request of `len` bytes: if it is longer by more than a quarter
    /// of the request, its part from the first chunk boundary at or after `len` stays cached
    /// as a span of its own (with its dirty bytes and its age) and the rest is returned.
    fn split(&mut self, span: Span, len: usize, bytes: &AtomicUsize) -> Span {
        let keep = len.next_multiple_of(CHUNK);
        if span.len <= len + len / 4 || keep >= span.len {
            return span;
        }
        // `remove` just freed a slot.
        self.spans[self.n] = Span {
            addr: span.addr + keep,
            len: span.len - keep,
            dirty: span.dirty.saturating_sub(keep),
            stamp: span.stamp,
        };
        self.n += 1;
        bytes.fetch_add(span.len - keep, Ordering::Relaxed);
        Span {
            len: keep,
            dirty: span.dirty.min(keep),
            ..span
        }
    }

    /// The span freed longest ago.
    fn oldest(&self, now: u32) -> usize {
        (0..self.n)
            .max_by_key(|&i| now.wrapping_sub(self.spans[i].stamp))
            .unwrap_or(0)
    }

    /// Takes span `i` (`< n`) out, keeping `spans[..n]` packed.
    fn remove(&mut self, i: usize, bytes: &AtomicUsize) -> Span {
        let s = self.spans[i];
        self.n -= 1;
        self.spans[i] = self.spans[self.n];
        bytes.fetch_sub(s.len, Ordering::Relaxed);
        s
    }

    /// Moves the spans unused for [`DECAY_MS`] to `doomed`.
    fn expire(&mut self, now: u32, bytes: &AtomicUsize, doomed: &mut Doomed) {
        let mut i = 0;
        while i < self.n {
            if now.wrapping_sub(self.spans[i].stamp) >= crate::policy::purge_ms() {
                doomed.push(self.remove(i, bytes));
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn span(len: usize, fill: u8) -> *mut u8 {
        let p = os::map_aligned(len, CHUNK);
        assert!(!p.is_null());
        // SAFETY: a fresh mapping of `len` bytes.
        unsafe { core::ptr::write_bytes(p, fill, len) };
        p
    }

    fn byte(p: *mut u8, i: usize) -> u8 {
        // SAFETY: the tests read inside spans they hold.
        unsafe { *p.add(i) }
    }

    #[test]
    fn a_freed_span_is_reused_whole_and_said_dirty() {
        let c = SpanCache::new();
        let p = span(8 * MIB, 7);
        c.put(p, 8 * MIB, 8 * MIB);
        assert_eq!(c.bytes(), 8 * MIB);
        let t = c.take(7 * MIB, CHUNK).expect("reused");
        assert_eq!((t.addr, t.len, t.dirty), (p, 8 * MIB, 8 * MIB));
        assert_eq!(byte(t.addr, 0), 7);
        assert_eq!(c.bytes(), 0);
        os::unmap(t.addr, t.len);
    }

    #[test]
    fn a_much_longer_span_is_split_at_a_chunk_and_its_tail_stays_cached() {
        let c = SpanCache::new();
        let p = span(24 * MIB, 1);
        c.put(p, 24 * MIB, 24 * MIB);
        let t = c.take(6 * MIB, CHUNK).expect("reused");
        assert_eq!((t.addr, t.len, t.dirty), (p, 6 * MIB, 6 * MIB));
        assert_eq!(c.bytes(), 16 * MIB, "the tail from 8 MiB on stays cached");
        let u = c.take(16 * MIB, CHUNK).expect("the tail reused");
        // SAFETY: `p + 8 MiB` is inside the span mapped above.
        assert_eq!(u.addr, unsafe { p.add(8 * MIB) });
        assert_eq!((u.len, u.dirty), (16 * MIB, 16 * MIB));
        os::unmap(t.addr, t.len);
        os::unmap(u.addr, u.len);
    }

    #[test]
    fn a_shorter_span_grows_and_its_new_tail_reads_zero() {
        let c = SpanCache::new();
        let p = span(8 * MIB, 3);
        c.put(p, 8 * MIB, 8 * MIB);
        let t = c.take(20 * MIB, CHUNK).expect("grown or moved");
        assert_eq!((t.len, t.dirty), (20 * MIB, 8 * MIB));
        assert_eq!(t.addr as usize % CHUNK, 0);
        assert_eq!(byte(t.addr, 8 * MIB - 1), 3, "old pages kept, not copied");
        assert_eq!(byte(t.addr, 8 * MIB), 0);
        assert_eq!(byte(t.addr, 20 * MIB - 1), 0);
        os::unmap(t.addr, t.len);
    }

    #[test]
    fn best_fit_takes_the_shortest_span_that_holds_the_request() {
        let c = SpanCache::new();
        let (a, b, d) = (span(16 * MIB, 1), span(9 * MIB, 2), span(12 * MIB, 3));
        c.put(a, 16 * MIB, 16 * MIB);
        c.put(b, 9 * MIB, 9 * MIB);
        c.put(d, 12 * MIB, 12 * MIB);
        let t = c.take(10 * MIB, CHUNK).expect("reused");
        assert_eq!(t.addr, d);
        os::unmap(t.addr, t.len);
        c.release_all();
        assert_eq!(c.bytes(), 0);
        assert!(c.take(MIB, CHUNK).is_none());
    }

    #[test]
    fn spans_go_back_after_the_delay_and_beyond_the_cap() {
        let c = SpanCache::new();
        let p = span(8 * MIB, 1);
        c.put(p, 8 * MIB, 8 * MIB);
        c.decay(os::now_ms().wrapping_add(DECAY_MS / 2));
        assert_eq!(c.bytes(), 8 * MIB, "kept before its delay");
        c.decay(os::now_ms().wrapping_add(DECAY_MS + 1));
        assert_eq!(c.bytes(), 0, "returned after its delay");
        for _ in 0..12 {
            let q = span(8 * MIB, 1);
            c.put(q, 8 * MIB, 8 * MIB);
            assert!(c.bytes() <= CAP);
        }
        assert_eq!(c.bytes(), CAP);
        let big = span(CAP + CHUNK, 1);
        c.put(big, CAP + CHUNK, CAP + CHUNK);
        assert_eq!(c.bytes(), CAP, "a span over the cap is not kept");
        c.release_all();
        assert_eq!(c.bytes(), 0);
    }
}
