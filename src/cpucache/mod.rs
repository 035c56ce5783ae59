//! Per-CPU caches of free small blocks, used without locks or atomic instructions through
//! Linux restartable sequences (rseq).
//!
//! Each possible CPU id has a [`CpuCache`]: for every size class, a singly linked list of
//! free blocks that belong to the arena of that CPU. Only threads running on that CPU touch
//! it, and only inside an rseq critical section: a few instructions that read the CPU id from
//! the thread's rseq area, index the cache, and end in one store (the commit). If the kernel
//! preempts, migrates or signals the thread before the commit, it moves the thread to the
//! section's abort handler, which starts it over; so no two threads ever interleave inside a
//! section on one CPU, and a section that has run to its commit was never interrupted. This
//! is McKenney and Slingwine's per-CPU free list with the kernel's restart standing in for
//! disabled interrupts.
//!
//! A list head packs the first block's address (low 48 bits) and the list's length (high 16
//! bits), and each block's first word holds the packed head of the rest of the list, encoded
//! with the arena's secret and the block's address ([`encode_link`]). A pop is therefore
//! "load head, load and decode its link, check that the link's count is one less than the
//! head's, store the link as the new head"; the count costs nothing and doubles as the
//! check that the link was not overwritten. An empty list is the word 0. Heads and links
//! hold plain addresses: the caches serve only the process heap, whose page source has base
//! 0, where the engine's base-relative links (`chunk::Rel`) are plain addresses too. A heap
//! with another base must not use them (nor [`Chain`], nor the outbox's batches).
//!
//! Each cache also has an **outbox** ([`OUTBOX`]): small blocks of *other* arenas freed on
//! this CPU, of every class, kept in an array with the class and owner the free found for
//! each (so sending reads no block); the push section puts a block there when the arena
//! comparison finds it another arena's. They are never handed out from there; a full
//! outbox is sent, its blocks grouped by owner: those of up to 1 KiB into the owners'
//! inboxes (`inbox.rs`), whose CPUs sort them by class into chains when they refill, the
//! larger ones joined to chains parked in the owners' transfer slots (when there is no
//! room, onto the owners' pending stacks, or for the classes above 8 KiB back to their
//! runs under the owner's lock).
//!
//! Invariants:
//! - a block on a class list of cache `c` belongs to arena `caches[c].arena` (the arena the
//!   CPU map gives CPU `c`); a block in the outbox is of any arena (usually another: a
//!   thread that migrates between its two sections can put its own arena's block there,
//!   which is harmless, since sending routes each block by the owner its entry names);
//!   either way it is
//!   free, marked, and counted as in use by its run (the run only learns of it again when
//!   the block is flushed or sent back);
//! - the lists of `c` are written only inside the critical sections below, by threads on
//!   CPU `c` (a forked child inherits them as a consistent snapshot: a commit is one store);
//! - a class list never holds more than its limit (at most [`limit`]) blocks of its class,
//!   and a CPU's limits of the classes up to 8 KiB hold at most `CLASS_LISTS_BUDGET`
//!   bytes together (see `CpuCache::spare`); the outbox no more than [`OUTBOX_LIMIT`]
//!   blocks and [`OUTBOX_BYTES`] bytes as [`outbox_bytes`] counts them (blocks above
//!   16 KiB count as 16 KiB: at most [`OUTBOX_HELD_MAX`] in fact), so list counts fit 16
//!   bits, the outbox's 8, and a CPU holds at most [`CPU_CACHE_BYTES`];
//! - chains move whole between a cache and its arena's transfer slots (`transfer.rs`), but
//!   for the front of one longer than the refilling CPU's limit, which is parked again,
//!   which keep the lists' format.
//!
//! The locked path (the arena's bins) remains the way in whenever rseq is unavailable, and
//! refills and flushes the caches. The sections are x86_64 assembly; elsewhere
//! [`Caches::AVAILABLE`] is false and the operations are never called. A port needs the
//! same eight sections for its ISA, and its `RSEQ_SIG` placed before each abort handler as
//! the kernel's selftests (`tools/testing/selftests/rseq/rseq-*.h`) show.

use core::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use crate::chunk::{decode_link, Block};
use crate::size_class::{class_size, per_class, LARGE_MAX, NUM_CLASSES, TABLE_CLASSES, TABLE_MAX};

mod chain;
mod inbox;
#[cfg(coreheap_rseq)]
mod sections;
#[cfg(not(coreheap_rseq))]
#[path = "sections_none.rs"]
mod sections;
mod transfer;

pub use chain::{for_each_block, return_blocks, return_chain, split_chain, take_batch, Chain};
pub use inbox::{pack as inbox_pack, unpack as inbox_unpack, Inbox};
pub use transfer::{chain_max, Transfer, LARGE_CHAIN_MAX};

pub const PTR_BITS: u32 = 48;
/// The address bits of a packed head or link.
pub const PTR_MASK: usize = (1 << PTR_BITS) - 1;

/// log2 of the distance between two CPUs' caches: a [`CpuCache`] rounded up to a power of
/// two (1 KiB with ten classes, 2 KiB with the finer ones, most of it the outbox), so that
/// the sections index by a shift.
const STRIDE_SHIFT: usize = core::mem::size_of::<CpuCache>()
    .next_power_of_two()
    .trailing_zeros() as usize;

/// One CPU's cache, on cache lines of its own.
///
/// The fields are atomics only so that statistics read on another CPU get whole values; the
/// critical sections read and write them with plain loads and stores (aligned 8-byte
/// accesses, single-copy atomic on x86_64), so the fast path executes no atomic instruction.
#[repr(C, align(128))]
pub struct CpuCache {
    /// Packed list heads, one per size class, then the outbox's count ([`OUTBOX`]) and the
    /// page-run slots ([`RUNS`]).
    heads: [AtomicUsize; LISTS],
    /// Blocks popped by the fast path (statistics; may count a restarted pop twice).
    fast_allocs: AtomicU64,
    /// Blocks pushed by the fast path, outbox pushes included (statistics; as above).
    fast_frees: AtomicU64,
    /// The arena that every block in this cache belongs to. Written once at initialisation.
    arena: AtomicU32,
    /// The most blocks each list holds now: [`start_limit`] at first for a class, then
    /// grown ([`Caches::grow`]) up to [`list_limit`], and lowered back to the start only by
    /// a critical section on this CPU that finds the list no longer than that. A push (and
    /// an install) compares with it in memory, inside its section.
    limits: [AtomicU8; LISTS],
    /// That arena's secret for links ([`encode_link`]). Written once at initialisation.
    key: AtomicUsize,
    /// Bytes of [`CLASS_LISTS_BUDGET`] that no class list's limit holds yet.
    ///
    /// Invariant: this plus the sum over the classes up to 8 KiB of `limits[c]` times the
    /// class's size is at most `CLASS_LISTS_BUDGET` (exactly, but for a grow between its
    /// two steps, or one that a steal's section overwrote, which only leaves bytes out).
    spare: AtomicUsize,
    /// Whether a thread is taking room back from this CPU's lists ([`Caches::grow`]): one
    /// at a time, so that no two lower the same limit from the same old value.
    stealing: AtomicBool,
    /// The class the next steal looks at first.
    steal_at: AtomicU8,
    /// Grows the spare could not pay for since the last steal ([`STEAL_EVERY`]).
    misses: AtomicU32,
    /// Bit `c`: class `c` overflowed or was refilled through the middle tier since the last
    /// steal (or is the class that made it), so it is in use and the next steal leaves it
    /// alone. A heuristic, set by a load and a store: a grow racing with a steal on another
    /// thread may lose a bit, or put back one the steal had just cleared (the class is then
    /// spared one look more).
    busy: AtomicU64,
    /// The outbox ([`OUTBOX`]): as many entries as `heads[OUTBOX]` counts in its low 8 bits
    /// (at most [`OUTBOX_LIMIT`], whose blocks take at most [`OUTBOX_BYTES`], the rest of
    /// that word), each a block and its class packed as an inbox slot holds them
    /// ([`inbox_pack`]), its owning arena in `outbox_owner` at the same index. What the free
    /// found out about a block travels with it, so sending the outbox reads no block and
    /// looks none up. Written only by the outbox sections on this CPU, which store the entry
    /// first and commit with the count; entries at and past the count are garbage.
    outbox: [AtomicUsize; OUTBOX_LIMIT],
    /// The arena of each outbox entry.
    outbox_owner: [AtomicU16; OUTBOX_LIMIT],
}
const _: () = assert!(TABLE_CLASSES <= 64);
// An outbox entry's owner fits its `u16`.
const _: () = assert!(crate::settings::MAX_ARENAS <= u16::MAX as usize + 1);

// The sections' memory operands (`sections.rs`): none without them.
#[cfg(coreheap_rseq)]
const OFF_ALLOCS: usize = core::mem::offset_of!(CpuCache, fast_allocs);
#[cfg(coreheap_rseq)]
const OFF_FREES: usize = core::mem::offset_of!(CpuCache, fast_frees);
#[cfg(coreheap_rseq)]
const OFF_ARENA: usize = core::mem::offset_of!(CpuCache, arena);
#[cfg(coreheap_rseq)]
const OFF_KEY: usize = core::mem::offset_of!(CpuCache, key);
#[cfg(coreheap_rseq)]
const OFF_LIMITS: usize = core::mem::offset_of!(CpuCache, limits);
#[cfg(coreheap_rseq)]
const OFF_OUTBOX: usize = core::mem::offset_of!(CpuCache, outbox);
#[cfg(coreheap_rseq)]
const OFF_OUTBOX_OWNER: usize = core::mem::offset_of!(CpuCache, outbox_owner);
#[cfg(coreheap_rseq)]
const OFF_CS_BASE: usize = core::mem::offset_of!(Caches, base);
#[cfg(coreheap_rseq)]
const OFF_CS_LEN: usize = core::mem::offset_of!(Caches, len);
#[cfg(coreheap_rseq)]
const OFF_CS_RSEQ: usize = core::mem::offset_of!(Caches, rseq_off);
const _: () = assert!(core::mem::size_of::<CpuCache>() <= 1 << STRIDE_SHIFT);
const _: () = assert!(core::mem::offset_of!(CpuCache, heads) == 0);
const _: () = assert!(batch(limit(0)) == BATCH_MAX);

/// The list index of a CPU's outbox: small blocks of other arenas freed on this CPU, of
/// any class, on their way back to their owners. They are never handed out from here: a
/// full outbox is grouped by owner and sent to the owners' inboxes, so a remote free costs
/// no atomic instruction of its own.
pub const OUTBOX: usize = NUM_CLASSES;

/// How many blocks an outbox holds before it is sent.
pub const OUTBOX_LIMIT: usize = 64;

/// The first of a CPU's [`RUN_LISTS`] page-run slots: lists of at most one large block (a
/// page run of more than `SMALL_MAX` and at most `LARGE_MAX` bytes) of the CPU's arena,
/// freed there and waiting to be handed out again without the arena's lock.
pub const RUNS: usize = OUTBOX + 1;

/// Page-run slots per CPU: two runs of at most `LARGE_MAX` (2 MiB) each, 4 MiB per CPU.
/// One serves a program that allocates and frees one size in turn; the second, two sizes
/// in turn (a buffer and its replacement).
pub const RUN_LISTS: usize = 2;

/// Lists per CPU: the classes, the outbox, the run slots.
pub const LISTS: usize = RUNS + RUN_LISTS;

/// The most blocks list `list` of a CPU ever holds: [`limit`] for a class, [`OUTBOX_LIMIT`],
/// one run per run slot.
#[inline]
pub const fn list_limit(list: usize) -> usize {
    if list < NUM_CLASSES {
        limit(list)
    } else if list == OUTBOX {
        OUTBOX_LIMIT
    } else {
        1
    }
}

/// The most bytes of blocks an outbox holds, as [`outbox_bytes`] counts them: it takes
/// blocks of every class, and is sent when the next one would not fit (or at
/// [`OUTBOX_LIMIT`] blocks).
pub const OUTBOX_BYTES: usize = 64 * 1024;

/// What a block counts at most against [`OUTBOX_BYTES`]: a quarter of it, so that an outbox
/// takes four blocks of any class above 16 KiB and is sent with a chain's worth of them
/// ([`LARGE_CHAIN_MAX`]), one compare-and-swap to park, rather than one each.
const OUTBOX_BLOCK_MAX: usize = OUTBOX_BYTES / LARGE_CHAIN_MAX;

/// What a block of class `class` counts against [`OUTBOX_BYTES`]: its size, at most
/// [`OUTBOX_BLOCK_MAX`] (16 KiB).
#[cfg_attr(not(coreheap_rseq), allow(dead_code))]
pub const fn outbox_bytes(class: usize) -> usize {
    let size = class_size(class);
    if size > OUTBOX_BLOCK_MAX {
        OUTBOX_BLOCK_MAX
    } else {
        size
    }
}

/// The most bytes an outbox's blocks take in fact: [`OUTBOX_BYTES`], or four blocks of the
/// largest class (1 MiB) when that is more.
pub const OUTBOX_HELD_MAX: usize = {
    let largest = class_size(NUM_CLASSES - 1);
    if largest > OUTBOX_BLOCK_MAX {
        OUTBOX_BYTES / OUTBOX_BLOCK_MAX * largest
    } else {
        OUTBOX_BYTES
    }
};

/// The largest blocks a sent outbox puts in the owners' inboxes, so that an inbox holds at
/// most `INBOX_SLOTS` x 1 KiB; an outbox's larger blocks (up to 256 KiB) join chains
/// parked in their owners' transfer slots of their classes instead.
pub const INBOX_MAX_BLOCK: usize = 1024;
const _: () = assert!(INBOX_MAX_BLOCK <= OUTBOX_BYTES && TABLE_MAX <= OUTBOX_BYTES);

/// An outbox's count word (`heads[OUTBOX]`): its blocks in the low 8 bits, their bytes
/// above ([`OUTBOX_BYTES`] at most), so that one store commits both.
const OUTBOX_COUNT_BITS: u32 = 8;
const OUTBOX_COUNT_MASK: usize = (1 << OUTBOX_COUNT_BITS) - 1;
const _: () = assert!(OUTBOX_LIMIT < 1 << OUTBOX_COUNT_BITS);
/// What a push of a block of class `c` adds to the outbox's count word: its bytes as
/// [`outbox_bytes`] counts them, above the count bits, and one (read by the push sections,
/// through its symbol).
#[cfg(coreheap_rseq)]
static OUTBOX_ADDS: [usize; NUM_CLASSES] =
    per_class!(usize, |c| (outbox_bytes(c) << OUTBOX_COUNT_BITS) | 1);

/// The largest count word a push may leave: both bounds at once (a byte total past
/// `OUTBOX_BYTES` compares above it whatever the count bits hold).
#[cfg(coreheap_rseq)]
const OUTBOX_WORD_MAX: usize = (OUTBOX_BYTES << OUTBOX_COUNT_BITS) | OUTBOX_LIMIT;

/// What one CPU's lists of the classes up to 8 KiB may hold together, whatever the number
/// of classes: each list starts with a small limit ([`start_limit`]), and the lists a CPU
/// overflows or refills grow theirs ([`Caches::grow`]), out of what the others leave
/// unused, up to [`limit`]. The ten power-of-two classes had 32 KiB each before the finer
/// classes; split evenly over the 32 finer classes, the same budget gave each 10 KiB, and
/// the cross-thread workloads paid for the shorter chains (`docs/bench-core.md`, sessions
/// 9-10).
pub const CLASS_LISTS_BUDGET: usize = 320 * 1024;
/// A class list's limit at first: half of an even share of [`CLASS_LISTS_BUDGET`] (5 KiB
/// of each of the 32 finer classes, 16 KiB of the ten power-of-two ones), so that the
/// rest (about 40% with the finer classes, where the lists of 2 blocks of the largest
/// take more than 5 KiB) is left for the classes in use to grow into.
const START_BYTES: usize = CLASS_LISTS_BUDGET / TABLE_CLASSES / 2;
/// The most a list of a class up to 8 KiB grows to: 32 KiB, what each power-of-two class
/// had (ten of them fill the budget).
const LIST_MAX_BYTES: usize = 32 * 1024;
/// What a list of a class above 8 KiB holds: one block, what a program that allocates
/// and frees one size in turn needs; the bound per CPU is then the sum of those classes,
/// 1,612 KiB ([`CPU_CACHE_BYTES`]). Lists of 64 KiB (six blocks of 10 KiB, two of 32 KiB)
/// cost the `large` workload 11% more CPU time than one block (`docs/bench-core.md`,
/// session 8), and 300 KiB more per CPU.
const LARGE_LIMIT: usize = 1;
/// How many grows the spare budget cannot pay for a CPU takes before it looks for room
/// in lists that were not in use since its last look ([`Caches::steal`]). A look at every
/// such grow lowered, where a program uses twenty classes at once (`prodcons`), lists that
/// were short only for the moment, which grew back at their next overflow by lowering
/// others: the workload took 0.63 s against 0.57 s with no stealing at all
/// (`docs/bench-core.md`, session 12).
pub const STEAL_EVERY: u32 = 64;
/// The most blocks a class list holds: what a byte of `limits` holds (128 had been chosen
/// in issue 5, `docs/bench-core.md`; 255 took the `batch` workload from 1.25 to 1.16 s).
pub const LIMIT_MAX: usize = 255;
/// The fewest blocks a list of a class up to 8 KiB may hold, even where that is more than
/// its bytes allow (the largest classes); the large classes' lists hold one block at least.
const LIMIT_MIN: usize = 2;

/// `bytes` of class `class` in blocks, between [`LIMIT_MIN`] and [`LIMIT_MAX`].
const fn blocks_within(bytes: usize, class: usize) -> usize {
    let n = bytes / class_size(class);
    if n > LIMIT_MAX {
        LIMIT_MAX
    } else if n < LIMIT_MIN {
        LIMIT_MIN
    } else {
        n
    }
}

/// The most blocks a CPU's list of class `class` (`class < NUM_CLASSES`) ever holds: up to
/// 8 KiB, [`LIST_MAX_BYTES`] of the class, between [`LIMIT_MIN`] and [`LIMIT_MAX`] blocks
/// (its limit starts lower, [`start_limit`]); above, [`LARGE_LIMIT`].
#[inline]
pub const fn limit(class: usize) -> usize {
    if class >= NUM_CLASSES {
        return LARGE_LIMIT;
    }
    LIMITS[class] as usize
}

/// [`limit`] computed: a division by the class's size, which the slow paths (refill, grow,
/// park) would otherwise pay a few times per call; [`LIMITS`] holds the answers.
const fn compute_limit(class: usize) -> usize {
    if class >= TABLE_CLASSES {
        return LARGE_LIMIT;
    }
    blocks_within(LIST_MAX_BYTES, class)
}

/// [`limit`] of every class.
const LIMITS: [u8; NUM_CLASSES] = per_class!(u8, |c| compute_limit(c));

/// [`start_limit`] of every class.
const START_LIMITS: [u8; NUM_CLASSES] = per_class!(u8, |c| compute_start_limit(c));

/// The limit a CPU's list of class `class` starts with: up to 8 KiB, [`START_BYTES`] of
/// the class, between [`LIMIT_MIN`] and [`limit`] blocks; above, [`LARGE_LIMIT`].
#[inline]
pub const fn start_limit(class: usize) -> usize {
    if class >= NUM_CLASSES {
        return LARGE_LIMIT;
    }
    START_LIMITS[class] as usize
}

/// [`start_limit`] computed (see [`compute_limit`]).
const fn compute_start_limit(class: usize) -> usize {
    if class >= TABLE_CLASSES {
        return LARGE_LIMIT;
    }
    let n = blocks_within(START_BYTES, class);
    if n > compute_limit(class) {
        compute_limit(class)
    } else {
        n
    }
}

/// What the start limits of the classes up to 8 KiB take of [`CLASS_LISTS_BUDGET`]; the
/// rest is each CPU's room to grow lists into at first.
const START_TOTAL: usize = {
    let mut total = 0;
    let mut c = 0;
    while c < TABLE_CLASSES {
        total += start_limit(c) * class_size(c);
        c += 1;
    }
    total
};
const _: () = assert!(START_TOTAL <= CLASS_LISTS_BUDGET);

/// The most bytes of free blocks one CPU's cache holds: its class lists up to 8 KiB at
/// most `CLASS_LISTS_BUDGET` together, the large classes' lists at their limits, a full
/// outbox and full run slots: at most 7,052 KiB, of which 320 KiB in the classes up to
/// 8 KiB, 1,612 KiB in the large classes, 1,024 KiB in the outbox (four 256 KiB blocks)
/// and 4,096 KiB in the run slots (4,480 KiB with `pow2-classes`, whose largest class is
/// 8 KiB, so its outbox holds at most 64 KiB), as `docs/design.md` states.
pub const CPU_CACHE_BYTES: usize = {
    let mut total = OUTBOX_HELD_MAX + RUN_LISTS * LARGE_MAX + CLASS_LISTS_BUDGET;
    let mut c = TABLE_CLASSES;
    while c < NUM_CLASSES {
        total += limit(c) * class_size(c);
        c += 1;
    }
    total
};
const _: () = assert!(LIMIT_MAX <= u8::MAX as usize);

/// The largest [`batch`].
pub const BATCH_MAX: usize = 127;

/// How many blocks a refill takes from the arena under its lock for a list whose limit is
/// `limit`: half a full list (a full one measured no faster on the `batch` workload, and
/// holds twice the memory), at least one, at most [`BATCH_MAX`].
#[inline]
pub const fn batch(limit: usize) -> usize {
    let n = limit / 2;
    if n < 1 {
        1
    } else if n > BATCH_MAX {
        BATCH_MAX
    } else {
        n
    }
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// The block is on the current CPU's list.
    Done,
    /// The list is at its limit; nothing changed.
    Full,
    /// The current CPU's cache is for another arena than the block's, which is a run (a
    /// run slot's): it goes back to its owner; nothing changed.
    Remote,
    /// The current CPU's cache is for another arena than the block's, a small block, and
    /// the outbox has no room for it: it is to be sent first; nothing changed.
    OutboxFull,
    /// The thread has no CPU cache (no CPU id from rseq); nothing changed.
    NoCache,
}

/// An outbox taken whole ([`Caches::take_outbox`]): its entries and their arenas.
pub struct OutboxCopy {
    /// Blocks packed with their classes ([`inbox_pack`]).
    pub entries: [usize; OUTBOX_LIMIT],
    /// The arena of each entry.
    pub owners: [u16; OUTBOX_LIMIT],
}

impl OutboxCopy {
    pub const fn new() -> Self {
        Self {
            entries: [0; OUTBOX_LIMIT],
            owners: [0; OUTBOX_LIMIT],
        }
    }
}

/// The table of per-CPU caches, and what the critical sections need to find it.
///
/// Invariant: when `enabled`, `base` points to `len` initialised caches and `transfer` to
/// `arenas` transfer tables (one per arena, all-zero at first), which live for the rest of
/// the process, and `rseq_off` is the offset from the thread pointer to every thread's rseq
/// area, which glibc registered with the kernel.
#[derive(Clone, Copy)]
pub struct Caches {
    base: *mut CpuCache,
    len: usize,
    // Read by the critical sections alone.
    #[cfg_attr(not(coreheap_rseq), allow(dead_code))]
    rseq_off: isize,
    pub enabled: bool,
    transfer: *const Transfer,
    arenas: usize,
}

impl Caches {
    /// Whether this build has the critical sections.
    pub const AVAILABLE: bool = cfg!(coreheap_rseq);

    /// No caches: every operation takes the locked path.
    pub const fn disabled() -> Self {
        Self {
            base: core::ptr::null_mut(),
            len: 0,
            rseq_off: 0,
            enabled: false,
            transfer: core::ptr::null(),
            arenas: 0,
        }
    }

    /// Bytes of memory the tables of `len` caches and `arenas` transfer tables need (a
    /// multiple of 128).
    pub const fn table_bytes(len: usize, arenas: usize) -> usize {
        (len << STRIDE_SHIFT) + (arenas * core::mem::size_of::<Transfer>()).next_multiple_of(128)
    }

    /// Builds the tables in `mem`, one cache per item of `arena_of` (the cache of CPU `c`
    /// holds blocks of arena `arena_of[c].0`, whose link secret is `arena_of[c].1`), then
    /// `arenas` transfer tables.
    ///
    /// # Safety
    /// `mem` is zeroed, writable, 128-byte aligned memory of
    /// `table_bytes(arena_of.len(), arenas)` bytes that lives for the rest of the process
    /// and that nothing else uses; every arena index in `arena_of` is below `arenas`;
    /// `rseq_off` is glibc's `__rseq_offset` and glibc registered an rseq area.
    pub unsafe fn init(
        mem: *mut u8,
        arena_of: impl Iterator<Item = (u32, usize)>,
        arenas: usize,
        rseq_off: isize,
    ) -> Self {
        let base = mem.cast::<CpuCache>();
        let mut len = 0;
        for (a, key) in arena_of {
            // SAFETY: slot `len` is inside `mem` by the contract; zeroed memory is a valid
            // CpuCache (atomics), so a shared reference to it is sound.
            let c = unsafe { &*base.byte_add(len << STRIDE_SHIFT) };
            c.arena.store(a, Ordering::Relaxed);
            c.key.store(key, Ordering::Relaxed);
            for (list, l) in c.limits.iter().enumerate() {
                let n = if list < NUM_CLASSES {
                    start_limit(list)
                } else {
                    list_limit(list)
                };
                l.store(n as u8, Ordering::Relaxed);
            }
            c.spare
                .store(CLASS_LISTS_BUDGET - START_TOTAL, Ordering::Relaxed);
            len += 1;
        }
        Self {
            base,
            len,
            rseq_off,
            enabled: true,
            // The transfer tables follow the caches (`table_bytes`), 128-byte aligned.
            transfer: (mem as usize + (len << STRIDE_SHIFT)) as *const Transfer,
            arenas,
        }
    }

    /// Arena `arena`'s transfer slots.
    #[inline]
    pub fn transfer(&self, arena: usize) -> &Transfer {
        assert!(arena < self.arenas);
        // SAFETY: `arena < arenas` and by the invariant the tables are live; all-zero
        // memory is a valid (empty) table.
        unsafe { &*self.transfer.add(arena) }
    }

    /// Number of caches (possible CPU ids).
    pub fn len(&self) -> usize {
        self.len
    }

    fn cache(&self, cpu: usize) -> &CpuCache {
        assert!(cpu < self.len);
        // SAFETY: `cpu < len` and by the invariant the table is live.
        unsafe { &*self.base.byte_add(cpu << STRIDE_SHIFT) }
    }

    /// The current limit of CPU `cpu`'s list of class `class` (`class < NUM_CLASSES`).
    #[inline]
    pub fn limit_of(&self, cpu: usize, class: usize) -> usize {
        self.cache(cpu).limits[class].load(Ordering::Relaxed) as usize
    }

    /// CPU `cpu`'s list of class `class` overflowed, or ran empty with blocks of its class
    /// coming back through the middle tier: raises its limit by its start limit, up to
    /// [`limit`], out of the CPU's spare budget (as much of that as the spare allows). When
    /// the spare cannot pay for any of it, room is first taken back from lists that hold
    /// little ([`Caches::steal`], which works only from a thread on `cpu`). Returns the
    /// list's limit now. Any thread may call it for any CPU: the budget is reserved before
    /// the limit rises, and the limit rises by compare-and-swap, so the cache's invariant
    /// holds whatever runs at once.
    pub fn grow(&self, cpu: usize, class: usize) -> usize {
        let c = self.cache(cpu);
        let l = &c.limits[class];
        let cur = l.load(Ordering::Relaxed) as usize;
        if class >= TABLE_CLASSES {
            return cur;
        }
        // In use: the next steal leaves this list alone, full-grown or not.
        let bit = 1u64 << class;
        let busy = c.busy.load(Ordering::Relaxed);
        if busy & bit == 0 {
            c.busy.store(busy | bit, Ordering::Relaxed);
        }
        if cur >= limit(class) {
            return cur;
        }
        let size = class_size(class);
        let want = start_limit(class).min(limit(class) - cur);
        // Reserve the bytes first.
        let mut spare = c.spare.load(Ordering::Relaxed);
        let mut stole = false;
        let n = loop {
            // (A division only when the spare cannot pay for the whole step.)
            let n = if spare >= want * size {
                want
            } else {
                spare / size
            };
            if n == 0 {
                if stole || !self.steal(cpu, class, want * size) {
                    return cur;
                }
                stole = true;
                spare = c.spare.load(Ordering::Relaxed);
                continue;
            }
            match c.spare.compare_exchange_weak(
                spare,
                spare - n * size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break n,
                Err(now) => spare = now,
            }
        };
        // Then raise the limit, never past `limit(class)` (another grow may have raised it
        // meanwhile), and give back what it did not take.
        let mut old = l.load(Ordering::Relaxed) as usize;
        let new = loop {
            let new = (old + n).min(limit(class));
            match l.compare_exchange_weak(
                old as u8,
                new as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break new,
                Err(now) => old = now as usize,
            }
        };
        let unused = n - (new - old);
        if unused > 0 {
            c.spare.fetch_add(unused * size, Ordering::Relaxed);
        }
        new
    }

    /// The spare budget of CPU `cpu` cannot pay for a step of `class`: every
    /// [`STEAL_EVERY`]th time, lowers other classes' limits back to their start, round the
    /// classes from where the last steal stopped, until `bytes` are freed, and returns
    /// whether any were. Only lists that hold no more than their start limit give room (a
    /// longer one is in use), and did not grow or try to since the last look (`busy`); and
    /// only from a thread running on `cpu` (the lowering is a critical section there, which a
    /// push on that CPU cannot interleave with).
    fn steal(&self, cpu: usize, class: usize, bytes: usize) -> bool {
        let c = self.cache(cpu);
        if !self.enabled {
            return false;
        }
        let misses = c.misses.load(Ordering::Relaxed) + 1;
        if misses < STEAL_EVERY {
            c.misses.store(misses, Ordering::Relaxed);
            return false;
        }
        if crate::os::current_cpu() != cpu {
            // Moved off `cpu` (every lowering would fail): the look is left to a thread there.
            return false;
        }
        if c.stealing.load(Ordering::Relaxed) || c.stealing.swap(true, Ordering::Acquire) {
            return false;
        }
        c.misses.store(0, Ordering::Relaxed);
        // The classes in use since the last steal keep their room; the thief is marked in use
        // for the next one.
        let busy = c.busy.swap(1 << class, Ordering::Relaxed);
        let first = c.steal_at.load(Ordering::Relaxed) as usize % TABLE_CLASSES;
        let mut freed = 0;
        for i in 0..TABLE_CLASSES {
            let v = (first + i) % TABLE_CLASSES;
            let (old, floor) = (self.limit_of(cpu, v), start_limit(v));
            if v == class || old <= floor || busy & (1 << v) != 0 {
                continue;
            }
            if self.lower_limit_raw(cpu, v, old as u8, floor as u8) {
                let b = (old - floor) * class_size(v);
                c.spare.fetch_add(b, Ordering::Relaxed);
                freed += b;
                if freed >= bytes {
                    c.steal_at
                        .store(((v + 1) % TABLE_CLASSES) as u8, Ordering::Relaxed);
                    break;
                }
            }
        }
        c.stealing.store(false, Ordering::Release);
        freed > 0
    }

    /// In a forked child: a grow that a vanished thread had reserved bytes for and not
    /// yet spent would keep them from the budget for good; each CPU's spare is counted
    /// anew from its limits.
    ///
    /// # Safety
    /// Called in the child of `fork`, by its one thread.
    pub unsafe fn recount_spare_after_fork(&self) {
        for cpu in 0..self.len {
            let held: usize = (0..TABLE_CLASSES)
                .map(|c| self.limit_of(cpu, c) * class_size(c))
                .sum();
            let c = self.cache(cpu);
            c.spare
                .store(CLASS_LISTS_BUDGET.saturating_sub(held), Ordering::Relaxed);
            c.stealing.store(false, Ordering::Relaxed);
            c.misses.store(0, Ordering::Relaxed);
            c.busy.store(0, Ordering::Relaxed);
        }
    }

    /// The arena CPU `cpu`'s cache holds blocks of.
    pub fn arena_of(&self, cpu: usize) -> usize {
        self.cache(cpu).arena.load(Ordering::Relaxed) as usize
    }

    /// Whether CPU `cpu`'s run slots seem to hold a run (a snapshot: another thread on that
    /// CPU may change them at any time).
    #[inline]
    pub fn has_runs(&self, cpu: usize) -> bool {
        let c = self.cache(cpu);
        c.heads[RUNS..RUNS + RUN_LISTS]
            .iter()
            .any(|h| h.load(Ordering::Relaxed) != 0)
    }

    /// Whether CPU `cpu`'s lists, outboxes or run slots held a block when looked at (read
    /// without that CPU's cooperation: a recent snapshot).
    pub fn holds_blocks(&self, cpu: usize) -> bool {
        self.cache(cpu)
            .heads
            .iter()
            .any(|h| h.load(Ordering::Relaxed) != 0)
    }

    /// CPU `cpu`'s statistics: blocks popped and pushed by the fast path, and blocks on its
    /// lists per class. Read while other threads run, the values are a recent snapshot.
    pub fn counters(&self, cpu: usize) -> (u64, u64, [u64; NUM_CLASSES]) {
        let c = self.cache(cpu);
        let mut cached = [0; NUM_CLASSES];
        for (n, h) in cached.iter_mut().zip(&c.heads) {
            *n = (h.load(Ordering::Relaxed) >> PTR_BITS) as u64;
        }
        (
            c.fast_allocs.load(Ordering::Relaxed),
            c.fast_frees.load(Ordering::Relaxed),
            cached,
        )
    }
}

/// Asks for the cache line at `addr` to be brought in, for writing where the CPU has the
/// instruction for it (`prefetchw`), else for reading (`prefetcht0`). A hint: no address
/// faults, 0 included. Nothing where there is no instruction for it here.
#[inline(always)]
pub(crate) fn prefetch_write(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_prefetchw() {
            // SAFETY: the CPU has `prefetchw` (CPUID, `has_prefetchw`); a prefetch reads
            // nothing the program sees and never faults, whatever the address. (The lint is
            // for blocks that read through a pointer; this one only hints.)
            #[allow(clippy::pointers_in_nomem_asm_block)]
            unsafe {
                core::arch::asm!(
                    "prefetchw byte ptr [{a}]",
                    a = in(reg) addr,
                    options(nostack, preserves_flags, nomem)
                );
            }
        } else {
            // SAFETY: `prefetcht0` (SSE, on every x86_64 CPU), as above.
            #[allow(clippy::pointers_in_nomem_asm_block)]
            unsafe {
                core::arch::asm!(
                    "prefetcht0 byte ptr [{a}]",
                    a = in(reg) addr,
                    options(nostack, preserves_flags, nomem)
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Whether the CPU has `prefetchw` (CPUID leaf 0x8000_0001, ECX bit 8: PRFCHW, AMD's
/// 3DNowPrefetch), which the x86_64 baseline does not promise (Intel's before Broadwell do
/// not report it). Asked once; 0 unknown, 1 no, 2 yes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_prefetchw() -> bool {
    static HAS: AtomicU8 = AtomicU8::new(0);
    match HAS.load(Ordering::Relaxed) {
        2 => true,
        1 => false,
        _ => {
            let yes = cpuid_prefetchw();
            HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

/// [`has_prefetchw`] asked of CPUID.
#[cfg(target_arch = "x86_64")]
#[cold]
fn cpuid_prefetchw() -> bool {
    // SAFETY: CPUID exists on every x86_64 CPU. (Newer Rust has made the intrinsic a safe
    // function; the MSRV's still needs the block.)
    #[allow(unused_unsafe)]
    let cpuid = |leaf| unsafe { core::arch::x86_64::__cpuid(leaf) };
    cpuid(0x8000_0000).eax >= 0x8000_0001 && cpuid(0x8000_0001).ecx & (1 << 8) != 0
}

impl Caches {
    /// Pops a free block of class `class` (or a run of run slot `class`, [`RUNS`]) from the
    /// current CPU's cache. The block's first
    /// word still holds a link; its second is untouched. `Err` when nothing was popped
    /// (the list is empty, or the thread has no usable CPU id); a block whose link fails its
    /// check is reported (the process aborts).
    ///
    /// Callers check `enabled` first.
    #[inline(always)]
    pub fn pop(&self, class: usize) -> Result<*mut Block, ()> {
        debug_assert!(
            self.enabled && (class < NUM_CLASSES || (RUNS..RUNS + RUN_LISTS).contains(&class))
        );
        let (block, bad) = self.pop_raw(class);
        if block == 0 {
            if bad != 0 {
                self.corrupt(bad as *mut Block, class);
            }
            return Err(());
        }
        Ok(block as *mut Block)
    }

    #[cold]
    #[inline(never)]
    fn corrupt(&self, b: *mut Block, class: usize) -> ! {
        let h = crate::chunk::chunk_of(b as *const u8) as *const crate::chunk::ChunkHeader;
        // SAFETY: `b` headed a cache list, so it is a block in a mapped chunk of ours (only
        // its link was damaged); the header's arena field never changes while mapped.
        let arena = Some(unsafe { (*h).arena });
        crate::diag::block_error(
            b"coreheap: corrupted free list (a write into a freed block)",
            b.cast(),
            arena,
            class_size(class),
        )
    }

    /// The link secret of CPU `cpu`'s cache.
    pub fn key_of(&self, cpu: usize) -> usize {
        self.cache(cpu).key.load(Ordering::Relaxed)
    }

    /// Pushes `b`, a block of class `class` of arena `arena`, on the current CPU's cache (or,
    /// for a run slot `class`, [`RUNS`], a large block of more than `SMALL_MAX` bytes); a
    /// small block of another arena goes into the current CPU's outbox, in the same critical
    /// section ([`Push::OutboxFull`] when that has no room).
    ///
    /// # Safety
    /// `enabled`; `b` is a free block of that class (or a large one) and arena, marked if
    /// small, which the caller owns and gives up if the answer is [`Push::Done`].
    #[inline(always)]
    pub unsafe fn push(&self, class: usize, b: *mut Block, arena: u32) -> Push {
        debug_assert!(
            self.enabled && (class < NUM_CLASSES || (RUNS..RUNS + RUN_LISTS).contains(&class))
        );
        // SAFETY: by the contract.
        match unsafe { self.push_raw(class, b as usize, arena) } {
            0 => Push::Done,
            2 => Push::Full,
            3 => Push::Remote,
            4 => Push::OutboxFull,
            _ => Push::NoCache,
        }
    }

    /// Puts `b`, a free small block of class `class` of arena `arena`, in the current CPU's
    /// outbox ([`OUTBOX`]), with its class and owner. [`Push::Full`] when the outbox holds
    /// [`OUTBOX_LIMIT`] blocks, or `b` would take it past [`OUTBOX_BYTES`]
    /// ([`outbox_bytes`]).
    ///
    /// # Safety
    /// `enabled`; `b` is a free small block of that class and arena, marked, which the
    /// caller owns and gives up if the answer is [`Push::Done`].
    #[inline(always)]
    pub unsafe fn push_outbox(&self, b: *mut Block, class: usize, arena: u32) -> Push {
        // The section packs the entry as `inbox_pack` does (the class above `PTR_BITS`),
        // which loses nothing for a block address and class that fit.
        debug_assert!(self.enabled && class < NUM_CLASSES);
        debug_assert_eq!(
            inbox_unpack(inbox_pack(b as usize, class)),
            (b as usize, class)
        );
        // SAFETY: by the contract.
        match unsafe { self.push_outbox_raw(class, b as usize, arena) } {
            0 => Push::Done,
            4 => Push::Full,
            _ => Push::NoCache,
        }
    }

    /// Empties the current CPU's outbox into `out` (each entry a block packed with its
    /// class, [`inbox_pack`], and the block's arena) and returns how many entries it took:
    /// 0 when the outbox was empty or the thread has no usable CPU id. The blocks are now
    /// the caller's.
    pub fn take_outbox(&self, out: &mut OutboxCopy) -> usize {
        let n = self.take_outbox_raw(&mut out.entries, &mut out.owners);
        debug_assert!(n <= OUTBOX_LIMIT);
        n
    }

    /// Calls `f(block, class, arena)` on each entry of CPU `cpu`'s outbox while `f` returns
    /// true, read without that CPU's cooperation: a recent snapshot, exact only while no
    /// thread runs on `cpu`. (An entry read as that CPU replaces it may name a block that
    /// was never in the outbox, or a stale one.)
    pub fn peek_outbox(&self, cpu: usize, mut f: impl FnMut(usize, usize, usize) -> bool) {
        if !self.enabled {
            return;
        }
        let c = self.cache(cpu);
        let n = (c.heads[OUTBOX].load(Ordering::Relaxed) & OUTBOX_COUNT_MASK).min(OUTBOX_LIMIT);
        for i in 0..n {
            let (b, class) = inbox_unpack(c.outbox[i].load(Ordering::Relaxed));
            let owner = c.outbox_owner[i].load(Ordering::Relaxed) as usize;
            if !f(b, class, owner) {
                return;
            }
        }
    }

    /// Empties the current CPU's list of class `class`: returns the CPU id and the chain,
    /// whose blocks belong to arena `arena_of(cpu)` and are now the caller's. `None` when the
    /// list was empty or the thread has no usable CPU id.
    pub fn take_all(&self, class: usize) -> Option<(usize, usize)> {
        let (cpu, head) = self.take_all_raw(class);
        (head != 0).then_some((cpu, head))
    }

    /// Makes `chain` (from [`Chain`]) CPU `cpu`'s list of class `class` if the thread runs on
    /// `cpu` and that list is empty; otherwise the chain stays the caller's.
    ///
    /// # Safety
    /// `enabled`, `cpu < len()`; `chain` holds at most `list_limit(class)` free blocks of
    /// class `class` of arena `arena_of(cpu)`, which the caller gives up if this returns
    /// true (only when the list's limit of now holds it).
    pub unsafe fn install(&self, cpu: usize, class: usize, chain: usize) -> bool {
        // (The list's limit of now is checked inside the section: a steal may lower it at
        // any time.)
        debug_assert!(cpu < self.len && (chain >> PTR_BITS) <= list_limit(class));
        // SAFETY: by the contract.
        unsafe { self.install_raw(cpu, class, chain, 0) }
    }

    /// The packed head of CPU `cpu`'s list of class `class` now (0 when the caches are
    /// off): a snapshot, which only code on that CPU changes, to build a chain on
    /// ([`Chain::over_list`]) that [`Caches::top_up`] then installs.
    pub fn head_of(&self, cpu: usize, class: usize) -> usize {
        if !self.enabled || cpu >= self.len {
            return 0;
        }
        self.cache(cpu).heads[class].load(Ordering::Relaxed)
    }

    /// Makes `chain`, built in front of `base` ([`Chain::over_list`]), CPU `cpu`'s list of
    /// class `class` if the thread runs on `cpu`, that list's head is still `base` (so the
    /// chain's rest is that list, unchanged) and the list's limit of now holds the whole
    /// chain: the list topped up with the caller's blocks in one section. Otherwise nothing
    /// changes, and the blocks in front of `base` are still the caller's (`split_chain`
    /// takes them off without reading `base`'s).
    ///
    /// # Safety
    /// `enabled`, `cpu < len()`; `base` was read from that list ([`Caches::head_of`]);
    /// `chain`'s blocks in front of `base` are free blocks of class `class` of arena
    /// `arena_of(cpu)` that the caller gives up if this returns true; its rest is `base`.
    pub unsafe fn top_up(&self, cpu: usize, class: usize, chain: usize, base: usize) -> bool {
        debug_assert!(cpu < self.len && (chain >> PTR_BITS) <= list_limit(class));
        debug_assert!(chain >> PTR_BITS > base >> PTR_BITS);
        // SAFETY: by the contract.
        unsafe { self.install_raw(cpu, class, chain, base) }
    }

    /// Whether `b` is on the current CPU's list of class `class`.
    pub fn contains(&self, class: usize, b: *mut Block) -> bool {
        self.enabled && self.contains_raw(class, b as usize, list_limit(class) + 1)
    }

    /// Whether `b` seems to be on any CPU's list of class `class` or outboxes, parked in
    /// any arena's transfer slots of `class` or waiting in its inbox, looked for without
    /// those CPUs' cooperation: their lists may change under the walk, so every link is
    /// read as one machine word and followed only if `is_block(link, list)` says it is a
    /// free-able small block of class `list`, which keeps the walk inside mapped memory; at
    /// most a list's limit + 1 links per list. `key_of_arena` gives an arena's link secret.
    /// Used only to confirm a suspected double free, where `b` carries the free mark and is
    /// on no list of the current CPU or its arena: a hit means some CPU held `b` as free
    /// during the walk.
    #[cold]
    pub fn seen_anywhere(
        &self,
        class: usize,
        b: *mut Block,
        is_block: impl Fn(usize, usize) -> bool,
        key_of_arena: impl Fn(usize) -> usize,
    ) -> bool {
        let mut seen = false;
        let mut look = |p: usize| {
            seen |= p == b as usize;
            !seen
        };
        // Slots, then lists, then slots again: a chain that moves between a slot and a list
        // once during the walk (a refill installing it, a flush parking it) is seen on one
        // side or the other; the inboxes in every pass, so that a block on its way from an
        // outbox (pass 1) to an inbox and on to a slot is seen too.
        for pass in 0..3 {
            for a in 0..self.arenas {
                self.transfer(a).inbox.peek(&mut look);
            }
            if pass == 1 {
                for cpu in 0..self.len {
                    self.walk(cpu, class, &mut look, &is_block);
                }
                for cpu in 0..self.len {
                    self.peek_outbox(cpu, |p, _, _| look(p));
                }
            } else {
                for a in 0..self.arenas {
                    self.walk_parked(a, class, key_of_arena(a), &mut look, &is_block);
                }
            }
        }
        seen
    }

    /// Calls `f` on each block of CPU `cpu`'s list `list` (a class), walked
    /// without that CPU's cooperation as [`Caches::seen_anywhere`] explains, while `f`
    /// returns true. Exact only while no thread runs on `cpu`.
    pub fn walk(
        &self,
        cpu: usize,
        list: usize,
        f: impl FnMut(usize) -> bool,
        is_block: &impl Fn(usize, usize) -> bool,
    ) {
        debug_assert!(list != OUTBOX, "the outbox is no list: peek_outbox");
        if !self.enabled {
            return;
        }
        let max = list_limit(list);
        let h = self.cache(cpu).heads[list].load(Ordering::Relaxed);
        Self::walk_from(h, self.key_of(cpu), max, list, f, is_block);
    }

    /// Calls `f` on each block parked in arena `arena`'s transfer slots of `class` (links
    /// encoded with `key`), walked as [`Caches::walk`] walks, while `f` returns true.
    pub fn walk_parked(
        &self,
        arena: usize,
        class: usize,
        key: usize,
        mut f: impl FnMut(usize) -> bool,
        is_block: &impl Fn(usize, usize) -> bool,
    ) {
        if !self.enabled {
            return;
        }
        for h in self.transfer(arena).peek(class) {
            let mut more = true;
            Self::walk_from(
                h,
                key,
                chain_max(class),
                class,
                |p| {
                    more = f(p);
                    more
                },
                is_block,
            );
            if !more {
                return;
            }
        }
    }

    fn walk_from(
        mut h: usize,
        key: usize,
        max: usize,
        list: usize,
        mut f: impl FnMut(usize) -> bool,
        is_block: &impl Fn(usize, usize) -> bool,
    ) {
        for _ in 0..=max {
            let p = h & PTR_MASK;
            if p == 0 || !is_block(p, list) || !f(p) {
                return;
            }
            // SAFETY: `is_block` vouched that `p` is a block in a mapped chunk of ours; its
            // first word is read as one volatile word and only used as a candidate.
            let raw = unsafe { core::ptr::read_volatile(p as *const usize) };
            h = decode_link(raw, p, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_parked_chains_are_bounded() {
        let kib = if cfg!(feature = "pow2-classes") {
            0
        } else {
            6448
        };
        assert_eq!(
            transfer::LARGE_PARKED_PER_ARENA.div_ceil(1024),
            kib,
            "docs/design.md states it"
        );
        for c in 0..NUM_CLASSES {
            let most = if c < TABLE_CLASSES {
                limit(c)
            } else {
                LARGE_CHAIN_MAX
            };
            assert_eq!(chain_max(c), most);
        }
    }

    /// Blocks parked a few at a time join the longest parked chain with room, into one
    /// well-formed chain; a group that fits nowhere is refused and stays the caller's.
    #[test]
    fn parked_blocks_join_chains_with_room() {
        // A class whose chains hold 20 blocks or more, and one slot's worth of blocks: 16
        // bytes each, in a buffer of our own (the transfer tier never reads their contents
        // but the links).
        let class = (0..TABLE_CLASSES).find(|&c| chain_max(c) >= 20).unwrap();
        let max = chain_max(class);
        let t: Box<Transfer> = Box::new(
            // SAFETY: all-zero is an empty `Transfer` (its invariant).
            unsafe { core::mem::zeroed() },
        );
        let mut mem = vec![[0usize; 2]; max + 8];
        let addrs: Vec<usize> = mem.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
        let key = 0x5eed_1234_5678_9abc;
        // SAFETY: blocks of ours, on no list, 16 bytes each, each parked once.
        unsafe {
            assert!(t.park_blocks(class, key, &addrs[0..3]));
            assert!(t.park_blocks(class, key, &addrs[3..5]));
        }
        let heads: Vec<usize> = t.peek(class).into_iter().filter(|&h| h != 0).collect();
        assert_eq!(heads.len(), 1, "the second group joined the first");
        let mut seen = Vec::new();
        // SAFETY: the chain is the test's; its links were written by `park_blocks`.
        let r = unsafe { for_each_block(heads[0], key, |b| seen.push(b as usize)) };
        assert!(r.is_ok());
        assert_eq!(seen.len(), 5);
        let mut want = addrs[0..5].to_vec();
        seen.sort_unstable();
        want.sort_unstable();
        assert_eq!(seen, want);
        // A group that would pass the chain's bound takes an empty slot instead.
        // SAFETY: as above.
        unsafe { assert!(t.park_blocks(class, key, &addrs[5..5 + max - 4])) };
        let n: Vec<usize> = t
            .peek(class)
            .iter()
            .map(|&h| h >> PTR_BITS)
            .filter(|&n| n > 0)
            .collect();
        assert_eq!(n.len(), 2);
        assert!(n.iter().all(|&n| n <= max));
        // Two chains with room for two more blocks (5 and `max - 4` blocks): the longer one
        // takes them.
        // SAFETY: as above.
        unsafe { assert!(t.park_blocks(class, key, &addrs[max + 1..max + 3])) };
        let mut n: Vec<usize> = t
            .peek(class)
            .iter()
            .map(|&h| h >> PTR_BITS)
            .filter(|&n| n > 0)
            .collect();
        n.sort_unstable();
        assert_eq!(n, [5, max - 2]);
        // Every slot full to the bound: refused (the block is not parked anywhere).
        for s in t.slots_for_test(class) {
            s.store(addrs[0] | (max << PTR_BITS), Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { assert!(!t.park_blocks(class, key, &addrs[max + 3..max + 4])) };
    }

    /// An outbox filled with blocks of any one class, as the push sections count them
    /// (`OUTBOX_LIMIT` blocks, `OUTBOX_BYTES` as `outbox_bytes` counts them), holds at most
    /// `OUTBOX_HELD_MAX` bytes, and a chain's worth (`LARGE_CHAIN_MAX`) of the largest
    /// class's blocks when that is above 16 KiB.
    #[test]
    fn outboxes_are_bounded_in_bytes() {
        let fits = |class: usize| {
            let (mut n, mut counted) = (0, 0);
            while n < OUTBOX_LIMIT && counted + outbox_bytes(class) <= OUTBOX_BYTES {
                n += 1;
                counted += outbox_bytes(class);
            }
            n
        };
        for c in 0..NUM_CLASSES {
            assert!(fits(c) >= 1, "a block of class {c} fits an empty outbox");
            assert!(fits(c) * class_size(c) <= OUTBOX_HELD_MAX);
        }
        let largest = NUM_CLASSES - 1;
        if class_size(largest) > OUTBOX_BLOCK_MAX {
            assert_eq!(fits(largest), LARGE_CHAIN_MAX);
            assert_eq!(OUTBOX_HELD_MAX, LARGE_CHAIN_MAX * class_size(largest));
        } else {
            assert_eq!(OUTBOX_HELD_MAX, OUTBOX_BYTES);
        }
        assert_eq!(
            OUTBOX_HELD_MAX.div_ceil(1024),
            if cfg!(feature = "pow2-classes") {
                64
            } else {
                1024
            },
            "docs/design.md states it"
        );
    }

    #[test]
    fn caches_are_bounded_in_bytes() {
        let stride = if cfg!(feature = "pow2-classes") {
            1024
        } else {
            2048
        };
        assert_eq!(
            1 << STRIDE_SHIFT,
            stride,
            "STRIDE_SHIFT's comment states it"
        );
        let kib = if cfg!(feature = "pow2-classes") {
            4480
        } else {
            7052
        };
        assert_eq!(
            CPU_CACHE_BYTES.div_ceil(1024),
            kib,
            "docs/design.md states it"
        );
        for c in 0..NUM_CLASSES {
            let least = if c < TABLE_CLASSES { LIMIT_MIN } else { 1 };
            assert!((least..=LIMIT_MAX).contains(&limit(c)));
            assert!((least..=limit(c)).contains(&start_limit(c)));
            if c < TABLE_CLASSES {
                assert!(limit(c) * class_size(c) <= LIST_MAX_BYTES.max(least * class_size(c)));
            } else {
                assert_eq!(limit(c), LARGE_LIMIT);
            }
            assert!(batch(limit(c)) >= 1 && batch(limit(c)) <= limit(c));
        }
    }

    /// A table of caches for `cpus` CPUs of one arena, in zeroed memory of its own, marked
    /// disabled so that no critical section ever runs on it (its rseq offset is not real):
    /// `grow` then never steals, and `limit_of` needs none.
    fn table(cpus: usize) -> Caches {
        let bytes = Caches::table_bytes(cpus, 1);
        let layout = std::alloc::Layout::from_size_align(bytes, 128).unwrap();
        // SAFETY: a non-zero size; the memory is leaked, so it lives for the process.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!mem.is_null());
        // SAFETY: zeroed, 128-byte aligned memory of `table_bytes`, used by nothing else;
        // arena 0 exists; the rseq offset is never used (disabled below).
        let mut cs = unsafe { Caches::init(mem, (0..cpus).map(|_| (0u32, 0x1234usize)), 1, 0) };
        cs.enabled = false;
        cs
    }

    /// What a CPU's class lists may hold, spare included: the budget exactly.
    fn held(cs: &Caches, cpu: usize) -> usize {
        let c = cs.cache(cpu);
        c.spare.load(Ordering::Relaxed)
            + (0..TABLE_CLASSES)
                .map(|k| cs.limit_of(cpu, k) * class_size(k))
                .sum::<usize>()
    }

    /// Lists grow from their start limits to their limits out of the CPU's budget, which
    /// they never pass, whatever order and concurrency they grow in.
    #[test]
    fn lists_grow_within_the_cpu_budget() {
        let cs = table(2);
        for c in 0..NUM_CLASSES {
            assert_eq!(cs.limit_of(0, c), start_limit(c));
        }
        assert_eq!(held(&cs, 0), CLASS_LISTS_BUDGET);
        // One class grows to its limit, and no further.
        let k = 3;
        let mut last = start_limit(k);
        for _ in 0..100 {
            let now = cs.grow(0, k);
            assert!(now >= last && now <= limit(k));
            last = now;
        }
        assert_eq!(last, limit(k));
        assert_eq!(held(&cs, 0), CLASS_LISTS_BUDGET);
        assert_eq!(
            cs.limit_of(1, k),
            start_limit(k),
            "another CPU's list is its own"
        );
        // Four threads grow every class at once on CPU 1 until the budget is spent.
        struct Shared(Caches);
        // SAFETY: the table lives for the rest of the process and `grow` changes it through
        // atomics only.
        unsafe impl Sync for Shared {}
        let shared = Shared(cs);
        std::thread::scope(|s| {
            for t in 0..4 {
                let shared = &shared;
                s.spawn(move || {
                    for i in 0..2000 {
                        shared.0.grow(1, (i * 7 + t) % NUM_CLASSES);
                    }
                });
            }
        });
        let cs = &shared.0;
        assert_eq!(held(cs, 1), CLASS_LISTS_BUDGET);
        let spare = cs.cache(1).spare.load(Ordering::Relaxed);
        for c in 0..TABLE_CLASSES {
            let l = cs.limit_of(1, c);
            assert!(l <= limit(c));
            // A list short of its limit could not take one more step out of the spare.
            assert!(
                l == limit(c) || spare < class_size(c),
                "class {c}: {l}, {spare} spare"
            );
        }
        // (None with `pow2-classes`.)
        for c in (0..NUM_CLASSES).filter(|&c| c >= TABLE_CLASSES) {
            assert_eq!(cs.limit_of(1, c), LARGE_LIMIT, "large classes do not grow");
        }
        // A grow that reserved bytes and vanished in a fork: the child counts them back.
        cs.cache(0).spare.store(0, Ordering::Relaxed);
        // SAFETY: no other thread uses these caches now.
        unsafe { cs.recount_spare_after_fork() };
        assert_eq!(held(cs, 0), CLASS_LISTS_BUDGET);
        assert_eq!(held(cs, 1), CLASS_LISTS_BUDGET);
    }
}
