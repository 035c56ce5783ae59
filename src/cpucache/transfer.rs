//! The middle tier: per-arena, per-class transfer slots that hold whole chains of free
//! blocks between the CPU caches and their arena (the role of TCMalloc's transfer cache).
//!
//! A CPU whose list of a class overflows parks the whole list in a slot of its arena; a CPU
//! of that arena whose list runs empty takes a parked chain and installs it; with none, it
//! sorts the blocks other arenas' CPUs sent back to the arena's [`Inbox`] into chains, tops
//! up its own lists of the classes it uses with the first of each, and parks the others.
//! Outboxes park the blocks above 1 KiB they send back to an owner in front of a parked
//! chain that has room for them ([`Transfer::park_blocks`]). Each move is one atomic
//! instruction on the slot; the arena's lock is taken only when every slot is full (to
//! park) or empty (to take), and then moves a whole batch in one lock round.
//!
//! Invariants:
//! - a slot is 0 or the packed head of a chain in the CPU lists' format (see `mod.rs`): its
//!   blocks are free small blocks of the slot's class and arena, marked, counted as in use by
//!   their runs, linked with the arena's secret, at most [`chain_max`] of them;
//! - a chain is owned by its slot from the Release compare-and-swap that parks it until the
//!   Acquire swap that takes it: no thread reads or writes its blocks meanwhile (except the
//!   double-free search and statistics, which only read, validating every link); a chain
//!   parked in front of it only names its packed head;
//! - memory parked per arena is at most [`slots`]`(class)` chains of at most
//!   [`chain_max`]`(class)` blocks per class: up to 8 KiB at most [`PARKED_MAX`] per class
//!   and [`PARKED_BUDGET`] (3 MiB) in all; above, one chain of [`LARGE_CHAIN_MAX`]
//!   blocks per class, [`LARGE_PARKED_PER_ARENA`] (6,448 KiB) in all.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{limit, Chain, Inbox, PTR_BITS};
use crate::chunk::Block;
use crate::size_class::{class_size, per_class, NUM_CLASSES, TABLE_CLASSES};

/// The most chains one (arena, class) pair can park: a cache line of slots.
pub const SLOTS: usize = 8;

/// Bytes of blocks one arena may park over the classes up to 8 KiB, split evenly between
/// them ([`PARKED_MAX`]), so that more classes do not multiply it.
pub const PARKED_BUDGET: usize = 3 * 1024 * 1024;

/// Bytes of blocks one (arena, class) pair may park at most: 96 KiB over the 32 classes,
/// about 300 KiB over the ten power-of-two ones. (The `batch` workload measured 1.31 s with
/// a 640 KiB budget, 1.18 s with 2 MiB, in session 7; in session 9, 1.03 s with 1 MiB and
/// 0.93 s with 3 MiB, where the power-of-two build ran 0.90 s: `docs/bench-core.md`.)
pub const PARKED_MAX: usize = PARKED_BUDGET / TABLE_CLASSES;

/// The most blocks a parked chain of a class above 8 KiB holds (blocks of the arena freed on
/// other arenas' CPUs, which the arena's CPUs take as refills without the lock or the page
/// heap): at most 1 MiB.
pub const LARGE_CHAIN_MAX: usize = 4;

/// The most blocks a parked chain of `class` holds: the most a CPU list holds ([`limit`])
/// up to 8 KiB; above, [`LARGE_CHAIN_MAX`]. (Chains of at most 256 KiB, single blocks of
/// the 256 KiB class, measured slower than no parking for that class: `docs/bench-core.md`,
/// session 9.)
#[inline]
pub const fn chain_max(class: usize) -> usize {
    if class < TABLE_CLASSES {
        limit(class)
    } else {
        LARGE_CHAIN_MAX
    }
}

/// The slots class `class` uses: up to 8 KiB, as many full chains (`limit(class)` blocks,
/// the most a list grows to) as fit in [`PARKED_MAX`], at most [`SLOTS`], at least one (8
/// for the classes up to 48 bytes, 6 for 64, 4 for 80 and 96, 3 above). One for each large
/// class, taking a chain of up to [`chain_max`] blocks from outboxes (a full CPU list
/// of theirs goes back to the arena instead); an arena that stops allocating has them swept
/// back within about two seconds of another arena's refills, or by `trim`.
#[inline]
pub const fn slots(class: usize) -> usize {
    if class >= NUM_CLASSES {
        return 1;
    }
    SLOT_COUNTS[class] as usize
}

/// [`slots`] of every class, computed at build time: the slow paths that park and take chains
/// would otherwise divide by the chain's bytes on each call.
const SLOT_COUNTS: [u8; NUM_CLASSES] = per_class!(u8, |c| compute_slots(c));

/// [`slots`] computed.
const fn compute_slots(class: usize) -> usize {
    if class >= TABLE_CLASSES {
        return 1;
    }
    let chain = limit(class) * class_size(class);
    let n = PARKED_MAX / chain;
    if n > SLOTS {
        SLOTS
    } else if n < 1 {
        1
    } else {
        n
    }
}
const _: () = assert!(slots(0) == SLOTS && slots(TABLE_CLASSES - 1) >= 1);

/// The most bytes one arena's slots of classes up to 8 KiB hold: every class's slots full
/// of full chains.
// Read only by the compile-time check below, which rustc 1.87 (the MSRV) does not count as a
// use.
#[allow(dead_code)]
pub const PARKED_PER_ARENA: usize = {
    let mut total = 0;
    let mut c = 0;
    while c < TABLE_CLASSES {
        total += slots(c) * chain_max(c) * class_size(c);
        c += 1;
    }
    total
};
const _: () = assert!(PARKED_PER_ARENA <= PARKED_BUDGET);

/// The most bytes one arena's slots of the large classes hold: 6,448 KiB (none with
/// `pow2-classes`), as `docs/design.md` states.
// Read only by a unit test.
#[allow(dead_code)]
pub const LARGE_PARKED_PER_ARENA: usize = {
    let mut total = 0;
    let mut c = TABLE_CLASSES;
    while c < NUM_CLASSES {
        total += slots(c) * chain_max(c) * class_size(c);
        c += 1;
    }
    total
};

/// One arena's transfer slots: a cache line of slots per class pair.
///
/// Invariant: see the module documentation. All-zero is empty.
#[repr(C, align(64))]
pub struct Transfer {
    slots: [[AtomicUsize; SLOTS]; NUM_CLASSES],
    /// What the arena's CPUs did, on a line of its own that only they write (and sweeps).
    use_: crossbeam_utils::CachePadded<Use>,
    /// Blocks of the arena freed on other arenas' CPUs, for its CPUs to sort.
    pub inbox: Inbox,
}

/// The arena's CPUs' use of the slots.
struct Use {
    /// Whether a chain was taken since the last sweep ([`Transfer::idle_since_last_look`]).
    taken: AtomicUsize,
    /// Blocks freed on other arenas' CPUs that came out of the inbox or were parked by their
    /// senders ([`Transfer::count_returned`]; statistics).
    returned: AtomicU64,
}

impl Transfer {
    /// Takes a parked chain of `class`: its packed head, or 0 when every slot is empty.
    #[inline]
    pub fn take(&self, class: usize) -> usize {
        for s in &self.slots[class][..slots(class)] {
            // A load first: an empty slot costs no write to a line other CPUs read.
            if s.load(Ordering::Relaxed) != 0 {
                // Acquire: pairs with the Release in `park`, so the chain's links are seen.
                let h = s.swap(0, Ordering::Acquire);
                if h != 0 {
                    // A store only when the period saw no take yet: a locked add on every
                    // take cost a refill a quarter of its time (a line the sweep writes).
                    self.note_taken();
                    return h;
                }
            }
        }
        0
    }

    /// Parks the chain `head` (not 0) of `class` in an empty slot. Returns false, the chain
    /// still the caller's, when every slot is taken.
    ///
    /// # Safety
    /// `head` is a chain as the module's invariant says, of this arena and `class`, that the
    /// caller owns and gives up if this returns true.
    #[inline]
    pub unsafe fn park(&self, class: usize, head: usize) -> bool {
        debug_assert!(head != 0);
        self.slots[class][..slots(class)].iter().any(|s| {
            // Release: publishes the chain's links to the taker.
            s.load(Ordering::Relaxed) == 0
                && s.compare_exchange(0, head, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Parks the blocks `blocks` of `class` (at least one, at most [`chain_max`]) in front
    /// of a parked chain that has room for them all, the longest such, or else in an empty
    /// slot: one compare-and-swap, however short the chain was before. Outboxes send their
    /// blocks above 1 KiB this way, and chains sorted out of an inbox or cut at an install
    /// join here when every slot is taken; joined, they reach the owner's CPUs as refills of up
    /// to a whole list. Returns false when no slot has room: the blocks are still the caller's
    /// (their links may have been rewritten).
    ///
    /// The chain already parked is not read: the new blocks' links name its packed head,
    /// which is all its shape needs, and the swap succeeds only while the slot still holds
    /// that head, a chain of that address and length (whichever parked it), so the joined
    /// chain is well formed.
    ///
    /// # Safety
    /// Each block is a free, marked block of this arena and `class`, counted in use by its
    /// run, that the caller owns and gives up if this returns true; `key` is the arena's
    /// link secret.
    pub unsafe fn park_blocks(&self, class: usize, key: usize, blocks: &[usize]) -> bool {
        let max = chain_max(class);
        debug_assert!(!blocks.is_empty() && blocks.len() <= max);
        let slots = &self.slots[class][..slots(class)];
        loop {
            // The slot whose chain has room and is the longest (an empty one last).
            let mut best: Option<(&AtomicUsize, usize)> = None;
            for s in slots {
                let h = s.load(Ordering::Relaxed);
                let n = h >> PTR_BITS;
                if n + blocks.len() <= max && best.is_none_or(|(_, b)| n > b >> PTR_BITS) {
                    best = Some((s, h));
                }
            }
            let Some((s, h)) = best else {
                return false;
            };
            // SAFETY: `h` is 0 or the packed head of a chain of this arena and `class`,
            // linked with `key` (the slots' invariant); it is only named, not read, and the
            // blocks are the caller's.
            let mut chain = unsafe { Chain::from_head(h, key) };
            for &b in blocks {
                // SAFETY: by the contract each block is ours, free, on no list.
                unsafe { chain.push(b as *mut Block) };
            }
            // Release: publishes the new links (the chain below was published by its own
            // park, whose release sequence this read-modify-write continues).
            if s.compare_exchange(h, chain.head(), Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Marks the period busy: a CPU of the arena refilled (from a slot, or from the blocks
    /// other CPUs sent back).
    #[inline]
    pub fn note_taken(&self) {
        // A store only when the period saw no take yet: a locked add on every take cost a
        // refill a quarter of its time (a line the sweep writes).
        if self.use_.taken.load(Ordering::Relaxed) == 0 {
            self.use_.taken.store(1, Ordering::Relaxed);
        }
    }

    /// Whether no chain was taken since the last call (which starts a new period): the
    /// arena's CPUs have not refilled from the slots meanwhile, so what is parked may be
    /// stranded (see `heap::cached`'s sweep).
    pub fn idle_since_last_look(&self) -> bool {
        self.use_.taken.swap(0, Ordering::Relaxed) == 0
    }

    /// Counts `n` blocks sent back by other arenas' CPUs: sorted out of the inbox by a refill
    /// (or returned from it by a sweep), or parked here by the sender (an outbox's blocks
    /// above 1 KiB).
    pub fn count_returned(&self, n: u64) {
        self.use_.returned.fetch_add(n, Ordering::Relaxed);
    }

    /// Blocks counted by [`Transfer::count_returned`] so far.
    pub fn returned(&self) -> u64 {
        self.use_.returned.load(Ordering::Relaxed)
    }

    /// The slots of `class`, for tests that fill them.
    #[cfg(test)]
    pub(super) fn slots_for_test(&self, class: usize) -> &[AtomicUsize] {
        &self.slots[class][..slots(class)]
    }

    /// The packed heads parked for `class` now (a snapshot; for walks that validate every
    /// link, see `Caches::walk_chain`).
    pub fn peek(&self, class: usize) -> [usize; SLOTS] {
        let mut out = [0; SLOTS];
        for (o, s) in out.iter_mut().zip(&self.slots[class]) {
            *o = s.load(Ordering::Acquire);
        }
        out
    }
}
