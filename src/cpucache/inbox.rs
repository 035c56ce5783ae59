//! An arena's inbox: a bounded ring of the addresses of its small blocks freed on other
//! arenas' CPUs, sent from their outboxes, that the arena's own CPUs sort by class into
//! chains when they refill.
//!
//! A sender reserves room for a whole outbox's blocks of this arena with one
//! compare-and-swap on `tail` and writes their addresses, each with its class (looked up by
//! the sender, so that the drainer need not look again); it never reads or writes the
//! blocks, nor the arena's transfer slots. A drainer (a refill on one of the arena's CPUs,
//! or a sweep or `trim` returning the blocks to their runs; one at a time, its thread id
//! in `head.1`) reads the addresses in order, clears each slot and moves `head`
//! past them. It then links the blocks into chains itself: the writes bring the blocks'
//! lines to the owner's CPU, where the pops that follow find them, and they do not wait on
//! each other as a walk of a linked list would.
//!
//! Invariants:
//! - `head <= tail`, `tail - head <= SLOTS` (counters that only grow, wrapping never in
//!   practice: 2^64 blocks); slot `i % SLOTS` for `head <= i < tail` is 0 (reserved, not
//!   yet written), [`SKIP`] (reserved by a thread that a fork left behind) or a block sent,
//!   its address packed with its class ([`pack`]); every other slot is 0 (but for the
//!   stray writes `repair_after_fork` describes);
//! - a block whose address is in a slot is a free, marked small block of the inbox's arena,
//!   of at most `INBOX_MAX_BLOCK` (1 KiB) bytes, counted in use by its run, owned by the
//!   inbox: no thread reads or writes it until a drainer takes its address (statistics and
//!   the double-free search only read the slots);
//! - `head` is written only by the thread whose id is in `head.1` (0: none), and a
//!   drainer takes no slot at or past the `tail` it read.

use core::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use super::{PTR_BITS, PTR_MASK};
use crate::os;

/// Slots per arena: eight full outboxes, at most 512 blocks of at most 1 KiB (512 KiB).
/// 1,024 slots measured no faster on the `prodcons` and `larson` workloads.
pub const INBOX_SLOTS: usize = 512;

/// How many slots ahead of the one it takes a drain asks for a block's line.
const PREFETCH_AHEAD: usize = 8;

/// What a slot that a forked child found reserved but never written holds: taken as
/// nothing.
const SKIP: usize = 1;

/// A slot's value for block `b` of class `class`: the address in the low 48 bits (the
/// caches' address space), the class above.
#[inline]
pub fn pack(b: usize, class: usize) -> usize {
    debug_assert!(b & !PTR_MASK == 0 && b > SKIP && class < 1 << (usize::BITS - PTR_BITS));
    b | class << PTR_BITS
}

/// The block and class a slot's value names.
#[inline]
pub fn unpack(v: usize) -> (usize, usize) {
    (v & PTR_MASK, v >> PTR_BITS)
}

/// One arena's inbox. All-zero is empty.
#[repr(C)]
pub struct Inbox {
    /// Slots reserved by senders so far.
    tail: CachePadded<AtomicUsize>,
    /// Slots drained so far; the drainer at work ([`os::thread_id`]; 0 for none); and, after
    /// a fork that interrupted the forking thread's own drain, 1 + the tail at the fork
    /// (0 otherwise), up to which that drain marks unwritten slots [`SKIP`] when it ends.
    head: CachePadded<(AtomicUsize, AtomicUsize, AtomicUsize)>,
    slots: [AtomicUsize; INBOX_SLOTS],
}

impl Inbox {
    /// Sends `blocks` (at most [`INBOX_SLOTS`] of them, each packed with its class by
    /// [`pack`]); false, nothing sent, when the ring has no room for them all.
    ///
    /// # Safety
    /// Each block is a free, marked small block of this inbox's arena of at most
    /// `INBOX_MAX_BLOCK` bytes, counted in use by its run, that the caller owns and gives
    /// up if this returns true.
    pub unsafe fn send(&self, blocks: &[usize]) -> bool {
        let k = blocks.len();
        let mut t = self.tail.load(Ordering::Relaxed);
        loop {
            // Acquire: the drainer cleared the slots below `head` before it moved it.
            let h = self.head.0.load(Ordering::Acquire);
            let used = t.wrapping_sub(h);
            if used > INBOX_SLOTS {
                // `t` is older than `head` (others sent and a drain passed them since).
                t = self.tail.load(Ordering::Relaxed);
                continue;
            }
            if used + k > INBOX_SLOTS {
                return false;
            }
            match self.tail.compare_exchange_weak(
                t,
                t.wrapping_add(k),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => t = now,
            }
        }
        for (i, &b) in blocks.iter().enumerate() {
            debug_assert!(b != 0);
            // Release: the drainer that reads the address sees the block's mark and that
            // the sender gave it up.
            self.slots[t.wrapping_add(i) % INBOX_SLOTS].store(b, Ordering::Release);
        }
        true
    }

    /// Whether a sent address may be waiting (a snapshot).
    #[inline]
    pub fn seems_empty(&self) -> bool {
        self.tail.load(Ordering::Relaxed) == self.head.0.load(Ordering::Relaxed)
    }

    /// Takes the blocks sent so far, in order, up to the first slot reserved but not yet
    /// written, calling `f` on each packed value ([`unpack`]): the blocks are the caller's.
    /// False, nothing taken, when another thread is draining.
    pub fn drain(&self, mut f: impl FnMut(usize)) -> bool {
        if self.seems_empty() {
            return true;
        }
        let me = os::thread_id();
        if self
            .head
            .1
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let mut h = self.head.0.load(Ordering::Relaxed);
        let t = self.tail.load(Ordering::Acquire);
        while h != t {
            // The caller writes into each block, whose line another CPU freed it on: the
            // lines of the blocks a few slots on are asked for now, so that those misses
            // overlap (a slot not written yet reads 0, a harmless hint).
            let ahead =
                self.slots[h.wrapping_add(PREFETCH_AHEAD) % INBOX_SLOTS].load(Ordering::Relaxed);
            super::prefetch_write(unpack(ahead).0);
            let s = &self.slots[h % INBOX_SLOTS];
            // Acquire: pairs with the sender's Release store of the address.
            let b = s.load(Ordering::Acquire);
            if b == 0 {
                break;
            }
            s.store(0, Ordering::Relaxed);
            h = h.wrapping_add(1);
            if b != SKIP {
                f(b);
            }
        }
        let repair = self.head.2.load(Ordering::Relaxed);
        if repair != 0 {
            // This drain was interrupted by a fork (`repair_after_fork`): the slots that
            // vanished senders reserved before it are marked now that it knows its end.
            self.head.2.store(0, Ordering::Relaxed);
            Self::skip_unwritten(&self.slots, h, repair - 1);
        }
        // Release: the slots cleared above are seen cleared by senders that read `head`.
        self.head.0.store(h, Ordering::Release);
        self.head.1.store(0, Ordering::Release);
        true
    }

    /// Marks the unwritten slots from `from` up to `to` (counters) [`SKIP`]; nothing when
    /// `from` is at or past `to`.
    fn skip_unwritten(slots: &[AtomicUsize; INBOX_SLOTS], mut from: usize, to: usize) {
        if to.wrapping_sub(from) > INBOX_SLOTS {
            return;
        }
        while from != to {
            let s = &slots[from % INBOX_SLOTS];
            if s.load(Ordering::Relaxed) == 0 {
                s.store(SKIP, Ordering::Relaxed);
            }
            from = from.wrapping_add(1);
        }
    }

    /// Calls `f` on the address of each block in the ring now, while it returns true
    /// (statistics and the double-free search: a snapshot, read without the drainer's
    /// cooperation).
    pub fn peek(&self, mut f: impl FnMut(usize) -> bool) {
        for s in &self.slots {
            let v = s.load(Ordering::Relaxed);
            if v > SKIP && !f(unpack(v).0) {
                return;
            }
        }
    }

    /// In a forked child of a process with other threads, where only the forking thread
    /// lives: a drainer that was another thread is gone, and so are senders that reserved
    /// slots and had not written them, which would stop every later drain there. Those
    /// slots get [`SKIP`], and the drainer mark is cleared. When the forking thread is the
    /// drainer itself (a signal handler that interrupted its drain forked), that drain
    /// resumes in the child: the slots it cleared but has not yet passed `head` over must
    /// not be marked, so the drain marks the rest itself when it ends, up to the tail of
    /// now.
    ///
    /// A send of the forking thread that the handler interrupted between its reservation
    /// and its writes resumes in the child too and writes over the `SKIP`s; one that a
    /// drain has passed by then leaves its addresses behind the head, and those blocks stay
    /// in use for good (a leak of at most one outbox, in a fork from a signal handler that
    /// interrupted a `free`).
    ///
    /// # Safety
    /// Called in the child of `fork`, by its one thread, before it uses the inbox.
    pub unsafe fn repair_after_fork(&self) {
        let t = self.tail.load(Ordering::Relaxed);
        if self.head.1.load(Ordering::Relaxed) == os::thread_id() {
            self.head.2.store(t.wrapping_add(1), Ordering::Relaxed);
            return;
        }
        Self::skip_unwritten(&self.slots, self.head.0.load(Ordering::Relaxed), t);
        self.head.1.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Box<Inbox> {
        // SAFETY: all-zero is an empty inbox.
        Box::new(unsafe { core::mem::zeroed() })
    }

    /// Addresses come out in the order they went in; a send that does not fit is refused
    /// whole; a drain makes room again.
    #[test]
    fn sends_drain_in_order_and_refuse_when_full() {
        let ib = empty();
        let blocks: Vec<usize> = (0..INBOX_SLOTS).map(|i| 16 * (i + 1)).collect();
        // SAFETY: the "blocks" are only numbers here: the inbox never dereferences them.
        unsafe {
            assert!(ib.send(&blocks[..INBOX_SLOTS - 10]));
            assert!(!ib.send(&blocks[..11]), "11 blocks fit in 10 slots");
            assert!(ib.send(&blocks[INBOX_SLOTS - 10..]));
            assert!(!ib.send(&blocks[..1]));
        }
        let mut got = Vec::new();
        assert!(ib.drain(|b| got.push(b)));
        assert_eq!(got, blocks);
        assert!(ib.seems_empty());
        // SAFETY: as above.
        unsafe { assert!(ib.send(&blocks[..64])) };
        let mut seen = 0;
        ib.peek(|_| {
            seen += 1;
            true
        });
        assert_eq!(seen, 64);
    }

    /// Many senders and one drainer at once: every address comes out once.
    #[test]
    fn concurrent_senders_lose_nothing() {
        let ib: &'static Inbox = Box::leak(empty());
        const PER: usize = 20_000;
        let senders: Vec<_> = (0..3)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut i = 0;
                    while i < PER {
                        let group: Vec<usize> = (i..(i + 7).min(PER))
                            .map(|k| 16 * (t * PER + k + 1))
                            .collect();
                        // SAFETY: numbers only, as above.
                        if unsafe { ib.send(&group) } {
                            i += group.len();
                        } else {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        while got.len() < 3 * PER {
            assert!(ib.drain(|b| got.push(b)), "the only drainer");
        }
        for s in senders {
            s.join().unwrap();
        }
        got.sort_unstable();
        let want: Vec<usize> = (0..3 * PER).map(|k| 16 * (k + 1)).collect();
        assert_eq!(got, want);
    }

    /// A slot reserved by a thread a fork left behind is skipped in the child, and the
    /// addresses after it come out.
    #[test]
    fn a_child_skips_slots_reserved_by_vanished_senders() {
        let ib = empty();
        // A sender of the parent reserved 3 slots and wrote none; another sent 2 after it.
        ib.tail.store(3, Ordering::Relaxed);
        // SAFETY: numbers only, as above.
        unsafe { assert!(ib.send(&[0x100, 0x200])) };
        let mut got = Vec::new();
        assert!(ib.drain(|b| got.push(b)));
        assert!(got.is_empty(), "stops at the unwritten slot");
        // SAFETY: no other thread uses this inbox.
        unsafe { ib.repair_after_fork() };
        assert!(ib.drain(|b| got.push(b)));
        assert_eq!(got, [0x100, 0x200]);
        assert!(ib.seems_empty());
        // A drainer mark left by a vanished thread is cleared.
        ib.head.1.store(12345, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { ib.repair_after_fork() };
        // SAFETY: numbers only, as above.
        unsafe { assert!(ib.send(&[0x300])) };
        assert!(ib.drain(|b| got.push(b)));
        assert_eq!(got.last(), Some(&0x300));
    }

    /// A fork that interrupted the forking thread's own drain: the unwritten slots are
    /// marked when that drain ends, not at the fork.
    #[test]
    fn a_drain_interrupted_by_a_fork_marks_the_gaps_when_it_ends() {
        let ib = empty();
        ib.tail.store(2, Ordering::Relaxed);
        // SAFETY: numbers only, as above.
        unsafe { assert!(ib.send(&[0x100])) };
        // The fork happens while this thread is the drainer.
        ib.head.1.store(os::thread_id(), Ordering::Relaxed);
        // SAFETY: no other thread uses this inbox.
        unsafe { ib.repair_after_fork() };
        assert_eq!(
            ib.slots[0].load(Ordering::Relaxed),
            0,
            "not marked at the fork"
        );
        // The interrupted drain resumes (here: a drain from the same place) and ends.
        ib.head.1.store(0, Ordering::Relaxed);
        let mut got = Vec::new();
        assert!(ib.drain(|b| got.push(b)));
        assert!(got.is_empty());
        assert!(ib.drain(|b| got.push(b)));
        assert_eq!(got, [0x100]);
        assert!(ib.seems_empty());
    }
}
