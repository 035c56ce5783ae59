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
//! this CPU, of any class. They are never handed out from there; a full outbox is sent, each
//! owner getting its blocks back with one push onto its pending stack.
//!
//! Invariants:
//! - a block on a class list of cache `c` belongs to arena `caches[c].arena` (the arena the
//!   CPU map gives CPU `c`); a block in the outbox is of any arena (usually another: a
//!   thread that migrates between its two sections can put its own arena's block there,
//!   which is harmless, since sending routes each block by its header); either way it is
//!   free, marked, and counted as in use by its run (the run only learns of it again when
//!   the block is flushed or sent back);
//! - the lists of `c` are written only inside the critical sections below, by threads on
//!   CPU `c` (a forked child inherits them as a consistent snapshot: a commit is one store);
//! - a class list never holds more than [`limit`] blocks of its class, the outbox no more
//!   than [`OUTBOX_LIMIT`] blocks of 512 bytes or less, so counts fit 16 bits.
//!
//! The locked path (the arena's bins) remains the way in whenever rseq is unavailable, and
//! refills and flushes the caches. The sections are x86_64 assembly; elsewhere
//! [`Caches::AVAILABLE`] is false and the operations are never called. A port needs the
//! same five sections for its ISA, and its `RSEQ_SIG` placed before each abort handler as
//! the kernel's selftests (`tools/testing/selftests/rseq/rseq-*.h`) show.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::chunk::{decode_link, encode_link, Block};
use crate::size_class::{class_of as class_of_size, class_size, NUM_CLASSES};

const PTR_BITS: u32 = 48;
/// The address bits of a packed head or link.
pub const PTR_MASK: usize = (1 << PTR_BITS) - 1;

/// log2 of the distance between two CPUs' caches.
const STRIDE_SHIFT: usize = 7;

/// One CPU's cache, on cache lines of its own.
///
/// The fields are atomics only so that statistics read on another CPU get whole values; the
/// critical sections read and write them with plain loads and stores (aligned 8-byte
/// accesses, single-copy atomic on x86_64), so the fast path executes no atomic instruction.
#[repr(C, align(128))]
pub struct CpuCache {
    /// Packed list heads, one per size class, then the outbox ([`OUTBOX`]).
    heads: [AtomicUsize; NUM_CLASSES + 1],
    /// Blocks popped by the fast path (statistics; may count a restarted pop twice).
    fast_allocs: AtomicU64,
    /// Blocks pushed by the fast path, outbox pushes included (statistics; as above).
    fast_frees: AtomicU64,
    /// The arena that every block in this cache belongs to. Written once at initialisation.
    arena: AtomicU32,
    /// The most blocks each list holds: [`limit`] of its class, then [`OUTBOX_LIMIT`].
    /// Written once at initialisation; a push compares with it in memory.
    limits: [AtomicU8; NUM_CLASSES + 1],
    /// That arena's secret for links ([`encode_link`]). Written once at initialisation.
    key: AtomicUsize,
}

const OFF_ALLOCS: usize = core::mem::offset_of!(CpuCache, fast_allocs);
const OFF_FREES: usize = core::mem::offset_of!(CpuCache, fast_frees);
const OFF_ARENA: usize = core::mem::offset_of!(CpuCache, arena);
const OFF_KEY: usize = core::mem::offset_of!(CpuCache, key);
const OFF_LIMITS: usize = core::mem::offset_of!(CpuCache, limits);
const OFF_CS_BASE: usize = core::mem::offset_of!(Caches, base);
const OFF_CS_LEN: usize = core::mem::offset_of!(Caches, len);
const OFF_CS_RSEQ: usize = core::mem::offset_of!(Caches, rseq_off);
const _: () = assert!(core::mem::size_of::<CpuCache>() == 1 << STRIDE_SHIFT);
const _: () = assert!(core::mem::offset_of!(CpuCache, heads) == 0);
const _: () = assert!(batch(0) == BATCH_MAX);

/// The list index of a CPU's outbox: small blocks of other arenas freed on this CPU, of
/// any class, on their way back to their owners. They are never handed out from here: a
/// full outbox is sorted by owner and each owner gets its blocks with one push onto its
/// pending stack, so a remote free costs no atomic instruction of its own.
pub const OUTBOX: usize = NUM_CLASSES;

/// How many blocks an outbox holds before it is sent.
pub const OUTBOX_LIMIT: usize = 64;

/// The largest blocks an outbox takes (where a class list holds [`OUTBOX_LIMIT`] blocks
/// too, so an outbox holds at most 32 KiB); frees of larger blocks of other arenas take the
/// locked path or the owner's pending stack.
pub const OUTBOX_MAX_BLOCK: usize = 512;
const _: () = assert!(limit(class_of_size(OUTBOX_MAX_BLOCK)) == OUTBOX_LIMIT);

/// The most blocks a CPU keeps of class `class`: 128, and at most 32 KiB of the class.
/// Per CPU that bounds the caches to 128 * (16 + ... + 256) + 5 * 32 KiB, about 222 KiB.
/// (With 64 blocks the `batch` row of the pairs benchmark, 1000 blocks of random small
/// sizes allocated then freed, took 1.7x mimalloc's time, refilling and flushing under the
/// lock; with 128, 1.3x.)
#[inline]
pub const fn limit(class: usize) -> usize {
    // 32 KiB / class_size(class), as a shift (kept in range for any `class`).
    let shift = if class < NUM_CLASSES {
        class
    } else {
        NUM_CLASSES
    };
    let by_bytes = (32 * 1024 / class_size(0)) >> shift;
    if by_bytes < 128 {
        by_bytes
    } else {
        128
    }
}

/// The largest [`batch`].
pub const BATCH_MAX: usize = 64;

/// How many blocks a refill takes from the arena: half a full cache.
#[inline]
pub const fn batch(class: usize) -> usize {
    limit(class) / 2
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// The block is on the current CPU's list.
    Done,
    /// The list is at its limit; nothing changed.
    Full,
    /// The current CPU's cache is for another arena than the block's: it belongs in the
    /// outbox ([`Caches::push_outbox`]); nothing changed.
    Remote,
    /// The thread has no CPU id from rseq; nothing changed.
    Foreign,
}

/// The table of per-CPU caches, and what the critical sections need to find it.
///
/// Invariant: when `enabled`, `base` points to `len` initialised caches that live for the
/// rest of the process, and `rseq_off` is the offset from the thread pointer to every
/// thread's rseq area, which glibc registered with the kernel.
#[derive(Clone, Copy)]
pub struct Caches {
    base: *mut CpuCache,
    len: usize,
    rseq_off: isize,
    pub enabled: bool,
}

impl Caches {
    /// Whether this build has the critical sections.
    pub const AVAILABLE: bool = cfg!(all(target_arch = "x86_64", target_os = "linux"));

    /// No caches: every operation takes the locked path.
    pub const fn disabled() -> Self {
        Self {
            base: core::ptr::null_mut(),
            len: 0,
            rseq_off: 0,
            enabled: false,
        }
    }

    /// Bytes of memory the table of `len` caches needs.
    pub const fn table_bytes(len: usize) -> usize {
        len << STRIDE_SHIFT
    }

    /// Builds the table in `mem`, one cache per item of `arena_of`: the cache of CPU `c`
    /// holds blocks of arena `arena_of[c].0`, whose link secret is `arena_of[c].1`.
    ///
    /// # Safety
    /// `mem` is zeroed, writable, 128-byte aligned memory of `table_bytes(arena_of.len())`
    /// bytes that lives for the rest of the process and that nothing else uses; `rseq_off`
    /// is glibc's `__rseq_offset` and glibc registered an rseq area.
    pub unsafe fn init(
        mem: *mut u8,
        arena_of: impl Iterator<Item = (u32, usize)>,
        rseq_off: isize,
    ) -> Self {
        let base = mem.cast::<CpuCache>();
        let mut len = 0;
        for (a, key) in arena_of {
            // SAFETY: slot `len` is inside `mem` by the contract; zeroed memory is a valid
            // CpuCache (atomics), so a shared reference to it is sound.
            let c = unsafe { &*base.add(len) };
            c.arena.store(a, Ordering::Relaxed);
            c.key.store(key, Ordering::Relaxed);
            for (list, l) in c.limits.iter().enumerate() {
                let n = if list == OUTBOX {
                    OUTBOX_LIMIT
                } else {
                    limit(list)
                };
                l.store(n as u8, Ordering::Relaxed);
            }
            len += 1;
        }
        Self {
            base,
            len,
            rseq_off,
            enabled: true,
        }
    }

    /// Number of caches (possible CPU ids).
    pub fn len(&self) -> usize {
        self.len
    }

    fn cache(&self, cpu: usize) -> &CpuCache {
        assert!(cpu < self.len);
        // SAFETY: `cpu < len` and by the invariant the table is live.
        unsafe { &*self.base.add(cpu) }
    }

    /// The arena CPU `cpu`'s cache holds blocks of.
    pub fn arena_of(&self, cpu: usize) -> usize {
        self.cache(cpu).arena.load(Ordering::Relaxed) as usize
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

/// Builds packed chains for [`Caches::install`]: push blocks one by one.
///
/// Invariant: `head` is 0 or the packed head of a chain whose count is its length, each
/// block's link encoded with `key` as a CPU cache list's is (see the module documentation).
pub struct Chain {
    head: usize,
    /// The link secret of the arena the blocks belong to.
    key: usize,
}

impl Chain {
    pub const fn new(key: usize) -> Self {
        Self { head: 0, key }
    }

    /// Adds `b` in front.
    ///
    /// # Safety
    /// `b` is a free block of at least 16 bytes that the caller owns, on no list.
    #[inline]
    pub unsafe fn push(&mut self, b: *mut Block) {
        // SAFETY: by the contract the block is ours to write.
        unsafe { (*b).link = encode_link(self.head, b as usize, self.key) };
        self.head = b as usize | (((self.head >> PTR_BITS) + 1) << PTR_BITS);
    }

    /// The packed head (0 when empty).
    pub fn head(&self) -> usize {
        self.head
    }

    pub fn len(&self) -> usize {
        self.head >> PTR_BITS
    }
}

/// Walks a packed chain taken off a cache or built with [`Chain`], calling `f` on each
/// block (after reading its link, so `f` may reuse the block's words). Returns the first
/// block whose link breaks the chain's shape (each link's count one less than the one
/// before it, ending at 0 with a null address), which only a write into a free block (or a
/// double free that put a block on two lists) can cause: the caller reports it.
///
/// # Safety
/// `head` is a packed chain of blocks of the arena whose link secret is `key`, which the
/// caller owns whole, as long as its shape holds.
pub unsafe fn for_each_block(
    head: usize,
    key: usize,
    mut f: impl FnMut(*mut Block),
) -> Result<(), *mut Block> {
    let mut h = head;
    while h & PTR_MASK != 0 {
        let b = (h & PTR_MASK) as *mut Block;
        // SAFETY: by the contract every block of the chain is ours and links the rest.
        let next = decode_link(unsafe { (*b).link }, b as usize, key);
        let n = h >> PTR_BITS;
        if n == 0 || next >> PTR_BITS != n - 1 || (next >> PTR_BITS == 0) != (next == 0) {
            return Err(b);
        }
        f(b);
        h = next;
    }
    Ok(())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod sections {
    //! The critical sections. Each is one `asm!` block laid out as the kernel requires:
    //! a `struct rseq_cs` descriptor (version 0, flags 0, start, length up to and excluding
    //! the instruction after the commit, abort address) in section `__rseq_cs`; the section
    //! proper, entered by storing the descriptor's address in the thread's `rseq->rseq_cs`;
    //! and an abort handler in `__rseq_failure`, preceded by the 4-byte signature glibc
    //! registered (`RSEQ_SIG`, encoded as the operand of a `ud1` so a disassembler stays in
    //! step), which jumps back to re-arm the descriptor (the kernel clears `rseq_cs` when it
    //! aborts) and start over. The commit, where there is one, is the last instruction
    //! before the end label. Labels are numeric (they may be duplicated by inlining) and
    //! avoid digits 0 and 1 only, which Intel syntax could read as binary.
    //!
    //! Registers given as `out` are not shared with inputs, so the sections may write them
    //! before reading every input; no section writes an input.
    //!
    //! `struct rseq` layout (uapi `linux/rseq.h`): `cpu_id_start` at 0, `cpu_id` at 4,
    //! `rseq_cs` at 8. An unregistered thread reads a negative `cpu_id`, which compares as a
    //! huge unsigned number and takes the way out.

    use super::{
        Caches, OFF_ALLOCS, OFF_ARENA, OFF_CS_BASE, OFF_CS_LEN, OFF_CS_RSEQ, OFF_FREES, OFF_KEY,
        OFF_LIMITS, OUTBOX, PTR_BITS, STRIDE_SHIFT,
    };
    use core::arch::asm;

    /// glibc's `RSEQ_SIG` for x86.
    const RSEQ_SIG: u32 = 0x5305_3053;

    /// Loads the CPU id into `{c}` (from the rseq area, whose offset `{t}` holds) and makes
    /// `{c}` point to that CPU's cache, or leaves the section (to label 75, or to `$exit`)
    /// when the id is not below the table's length. `{t}` is free afterwards.
    macro_rules! current_cache {
        () => {
            current_cache!("75f")
        };
        ($exit:literal) => {
            concat!(
                "mov {c:e}, dword ptr fs:[{t} + 4]\n",
                "cmp {c}, qword ptr [{cs} + {cs_len}]\n",
                "jae ",
                $exit,
                "\n",
                "shl {c}, {shift}\n",
                "add {c}, qword ptr [{cs} + {cs_base}]\n",
            )
        };
    }

    /// Instructions of the link encoding (see `chunk::encode_link`); in a build with the
    /// `unhardened` feature they become a comment, which still names their operands.
    #[cfg(not(feature = "unhardened"))]
    macro_rules! hardened {
        ($($line:expr),* $(,)?) => {
            concat!($($line, "\n"),*)
        };
    }
    #[cfg(feature = "unhardened")]
    macro_rules! hardened {
        ($($line:expr),* $(,)?) => {
            concat!("/* ", $($line, "; ",)* "*/\n")
        };
    }

    macro_rules! rseq_section {
        ($($body:expr,)*) => {
            concat!(
                ".pushsection __rseq_cs, \"aw\"\n",
                ".balign 32\n",
                "72:\n",
                ".long 0, 0\n",
                ".quad 74f, 75f - 74f, 76f\n",
                ".popsection\n",
                "73:\n",
                "mov {t}, qword ptr [{cs} + {cs_rseq}]\n",
                "lea {c}, [rip + 72b]\n",
                "mov qword ptr fs:[{t} + 8], {c}\n",
                "74:\n",
                $($body, "\n",)*
                "75:\n",
                ".pushsection __rseq_failure, \"ax\"\n",
                ".byte 0x0f, 0xb9, 0x3d\n",
                ".long {sig}\n",
                "76:\n",
                "jmp 73b\n",
                ".popsection\n",
            )
        };
    }

    /// The push section (see `Caches::push_raw`): `$check` holds the instructions that
    /// compare the cache's arena with the block's and jump to `{remote}` when they differ
    /// (none for the outbox). The section leaves by a jump to the answer, so that, inlined,
    /// no status is computed and tested.
    macro_rules! push_section {
        ($self:ident, $class:expr, $b:expr, $arena:expr, [$($check:expr,)*]) => {{
            // SAFETY: as in `pop_raw`; the section also writes the first word of `b`, which
            // the caller owns, before the commit publishes it (a section restarted and then
            // left by a way out leaves that word written, and `b` still the caller's).
            unsafe {
                asm!(
                    rseq_section!(
                        current_cache!("{foreign}"),
                        $($check,)*
                        "mov {h}, qword ptr [{c} + {cls} * 8]",
                        "mov {t}, {h}",
                        "shr {t}, 48",
                        "cmp {t:l}, byte ptr [{c} + {cls} + {limits}]",
                        "jae {full}",
                        "add {t}, 1",
                        "shl {t}, 48",
                        "or {t}, {b}",
                        hardened!(
                            "bswap {h}",
                            "xor {h}, qword ptr [{c} + {key}]",
                            "xor {h}, {b}",
                        ),
                        "mov qword ptr [{b}], {h}",
                        "add qword ptr [{c} + {frees}], 1",
                        "mov qword ptr [{c} + {cls} * 8], {t}",
                    ),
                    cs = in(reg) $self as *const Caches,
                    cs_rseq = const OFF_CS_RSEQ,
                    cs_len = const OFF_CS_LEN,
                    cs_base = const OFF_CS_BASE,
                    cls = in(reg) $class,
                    b = in(reg) $b,
                    arena = in(reg) $arena,
                    limits = const OFF_LIMITS,
                    h = out(reg) _,
                    c = out(reg) _,
                    t = out(reg) _,
                    shift = const STRIDE_SHIFT,
                    arena_off = const OFF_ARENA,
                    frees = const OFF_FREES,
                    key = const OFF_KEY,
                    sig = const RSEQ_SIG,
                    foreign = label { return 1 },
                    full = label { return 2 },
                    remote = label { return 3 },
                    options(nostack),
                );
            }
            0
        }};
    }

    impl Caches {
        /// Pops a block of class `class` from the current CPU's cache. Returns the block
        /// popped, or 0 and then the block at the list's head if its link failed its check
        /// (nothing was popped), or 0 and 0 if the list was empty or the thread has no
        /// usable CPU id.
        #[inline(always)]
        pub(super) fn pop_raw(&self, class: usize) -> (usize, usize) {
            let block: usize;
            let bad: usize;
            // SAFETY: by the `Caches` invariant (callers check `enabled`) the table and the
            // rseq area exist; the section touches only the current CPU's cache (index
            // checked against `len`) and the first word of the block at its head, which is
            // free and on that list while the section runs (see the module invariants).
            unsafe {
                asm!(
                    rseq_section!(
                        "xor {h:e}, {h:e}",
                        "xor {b:e}, {b:e}",
                        current_cache!(),
                        "mov {h}, qword ptr [{c} + {cls} * 8]",
                        "test {h}, {h}",
                        "jz 75f",
                        // b = the block, t = its decoded link
                        "mov {b}, {h}",
                        "and {b}, {mask}",
                        "mov {t}, qword ptr [{b}]",
                        // decode; the link's count must be the head's minus one, else the
                        // section leaves through 77 with no block
                        hardened!(
                            "xor {t}, qword ptr [{c} + {key}]",
                            "xor {t}, {b}",
                            "bswap {t}",
                            "sub {h}, {one}",
                            "xor {h}, {t}",
                            "shr {h}, 48",
                            "jnz 77f",
                        ),
                        "add qword ptr [{c} + {allocs}], 1",
                        "mov qword ptr [{c} + {cls} * 8], {t}",
                    ),
                    // Out of line, beside the abort handlers: a bad link. The block goes
                    // back in `{h}`, none in `{b}`.
                    ".pushsection __rseq_failure, \"ax\"",
                    "77:",
                    "mov {h}, {b}",
                    "xor {b:e}, {b:e}",
                    "jmp 75b",
                    ".popsection",
                    cs = in(reg) self as *const Caches,
                    cs_rseq = const OFF_CS_RSEQ,
                    cs_len = const OFF_CS_LEN,
                    cs_base = const OFF_CS_BASE,
                    cls = in(reg) class,
                    one = in(reg) 1usize << PTR_BITS,
                    mask = in(reg) super::PTR_MASK,
                    h = out(reg) bad,
                    b = out(reg) block,
                    c = out(reg) _,
                    t = out(reg) _,
                    shift = const STRIDE_SHIFT,
                    allocs = const OFF_ALLOCS,
                    key = const OFF_KEY,
                    sig = const RSEQ_SIG,
                    options(nostack),
                );
            }
            (block, bad)
        }

        /// Pushes block `b` of arena `arena` on the current CPU's list `class` if that cache
        /// is for `arena` and the list holds fewer blocks than its limit. Returns 0 (done),
        /// 1 (no usable CPU id), 2 (full) or 3 (the cache is another arena's).
        ///
        /// # Safety
        /// `b` is a free block of class `class` of arena `arena` that the caller owns.
        #[inline(always)]
        pub(super) unsafe fn push_raw(&self, class: usize, b: usize, arena: u32) -> u32 {
            push_section!(
                self,
                class,
                b,
                arena,
                [
                    "cmp dword ptr [{c} + {arena_off}], {arena:e}",
                    "jne {remote}",
                ]
            )
        }

        /// Pushes `b` on the current CPU's outbox, which takes blocks of any arena. Returns
        /// as `push_raw` (never 3).
        ///
        /// # Safety
        /// `b` is a free small block of at most `OUTBOX_MAX_BLOCK` bytes that the caller
        /// owns.
        #[inline(always)]
        pub(super) unsafe fn push_outbox_raw(&self, b: usize) -> u32 {
            // No arena check: `{arena}`, `{arena_off}` and `{remote}` are named in a comment
            // only.
            push_section!(
                self,
                OUTBOX,
                b,
                0u32,
                ["/* {arena:e} {arena_off} {remote} */",]
            )
        }

        /// Empties the current CPU's list of class `class`. Returns the CPU id read and the
        /// packed chain taken (0 if none, or if the id is out of range).
        #[inline]
        pub(super) fn take_all_raw(&self, class: usize) -> (usize, usize) {
            let head: usize;
            let cpu: usize;
            // SAFETY: as in `pop_raw`; the commit stores 0, after which the chain is ours.
            unsafe {
                asm!(
                    rseq_section!(
                        "xor {h:e}, {h:e}",
                        "mov {cpu:e}, dword ptr fs:[{t} + 4]",
                        current_cache!(),
                        "mov {h}, qword ptr [{c} + {cls} * 8]",
                        "mov qword ptr [{c} + {cls} * 8], 0",
                    ),
                    cs = in(reg) self as *const Caches,
                    cs_rseq = const OFF_CS_RSEQ,
                    cs_len = const OFF_CS_LEN,
                    cs_base = const OFF_CS_BASE,
                    cls = in(reg) class,
                    h = out(reg) head,
                    cpu = out(reg) cpu,
                    c = out(reg) _,
                    t = out(reg) _,
                    shift = const STRIDE_SHIFT,
                    sig = const RSEQ_SIG,
                    options(nostack),
                );
            }
            (cpu, head)
        }

        /// Makes `chain` the list of class `class` if the thread runs on CPU `cpu` and that
        /// list is empty. Returns whether it did.
        ///
        /// # Safety
        /// `cpu < len`; `chain` is a packed chain of at most `limit(class)` free blocks of
        /// class `class` of arena `arena_of(cpu)`, owned by the caller.
        #[inline]
        pub(super) unsafe fn install_raw(&self, cpu: usize, class: usize, chain: usize) -> bool {
            let status: u32;
            // SAFETY: as in `pop_raw`; `cpu < len` by the contract.
            unsafe {
                asm!(
                    rseq_section!(
                        "mov {st:e}, 1",
                        "mov {c:e}, dword ptr fs:[{t} + 4]",
                        "cmp {c}, {want}",
                        "jne 75f",
                        "shl {c}, {shift}",
                        "add {c}, qword ptr [{cs} + {cs_base}]",
                        "cmp qword ptr [{c} + {cls} * 8], 0",
                        "jne 75f",
                        "xor {st:e}, {st:e}",
                        "mov qword ptr [{c} + {cls} * 8], {chain}",
                    ),
                    cs = in(reg) self as *const Caches,
                    cs_rseq = const OFF_CS_RSEQ,
                    cs_base = const OFF_CS_BASE,
                    want = in(reg) cpu,
                    cls = in(reg) class,
                    chain = in(reg) chain,
                    st = out(reg) status,
                    c = out(reg) _,
                    t = out(reg) _,
                    shift = const STRIDE_SHIFT,
                    sig = const RSEQ_SIG,
                    options(nostack),
                );
            }
            status == 0
        }

        /// Whether block `b` is on the current CPU's list of class `class`. Looks at no more
        /// than `max` blocks.
        #[inline(never)]
        pub(super) fn contains_raw(&self, class: usize, b: usize, max: usize) -> bool {
            let found: u32;
            // SAFETY: as in `pop_raw`; the walk only reads links of blocks on the list,
            // and any interruption restarts it from the head.
            unsafe {
                asm!(
                    rseq_section!(
                        "xor {st:e}, {st:e}",
                        "mov {k}, {max}",
                        current_cache!(),
                        "mov {h}, qword ptr [{c} + {cls} * 8]",
                        "77:",
                        "shl {h}, 16",
                        "shr {h}, 16",
                        "test {h}, {h}",
                        "jz 75f",
                        "cmp {h}, {b}",
                        "je 78f",
                        "sub {k}, 1",
                        "jz 75f",
                        "mov {t}, qword ptr [{h}]",
                        hardened!(
                            "xor {t}, qword ptr [{c} + {key}]",
                            "xor {t}, {h}",
                            "bswap {t}",
                        ),
                        "mov {h}, {t}",
                        "jmp 77b",
                        "78:",
                        "mov {st:e}, 1",
                    ),
                    cs = in(reg) self as *const Caches,
                    cs_rseq = const OFF_CS_RSEQ,
                    cs_len = const OFF_CS_LEN,
                    cs_base = const OFF_CS_BASE,
                    cls = in(reg) class,
                    b = in(reg) b,
                    max = in(reg) max,
                    st = out(reg) found,
                    k = out(reg) _,
                    h = out(reg) _,
                    c = out(reg) _,
                    t = out(reg) _,
                    shift = const STRIDE_SHIFT,
                    key = const OFF_KEY,
                    sig = const RSEQ_SIG,
                    options(nostack),
                );
            }
            found != 0
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod sections {
    //! No critical sections on this architecture: `Caches::AVAILABLE` is false, so
    //! `enabled` is never set and these are never called.
    use super::Caches;

    impl Caches {
        pub(super) fn pop_raw(&self, _class: usize) -> (usize, usize) {
            (0, 0)
        }
        pub(super) unsafe fn push_raw(&self, _: usize, _: usize, _: u32) -> u32 {
            1
        }
        pub(super) unsafe fn push_outbox_raw(&self, _: usize) -> u32 {
            1
        }
        pub(super) fn take_all_raw(&self, _class: usize) -> (usize, usize) {
            (usize::MAX, 0)
        }
        pub(super) unsafe fn install_raw(&self, _: usize, _: usize, _: usize) -> bool {
            false
        }
        pub(super) fn contains_raw(&self, _: usize, _: usize, _: usize) -> bool {
            false
        }
    }
}

impl Caches {
    /// Pops a free block of class `class` from the current CPU's cache. The block's first
    /// word still holds a link; its second is untouched. `Err` when nothing was popped
    /// (the list is empty, or the thread has no usable CPU id); a block whose link fails its
    /// check is reported (the process aborts).
    ///
    /// Callers check `enabled` first.
    #[inline(always)]
    pub fn pop(&self, class: usize) -> Result<*mut Block, ()> {
        debug_assert!(self.enabled && class < NUM_CLASSES);
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

    /// Pushes `b`, a block of class `class` of arena `arena`, on the current CPU's cache.
    ///
    /// # Safety
    /// `enabled`; `b` is a free block of that class and arena, which the caller owns and
    /// gives up if the answer is [`Push::Done`].
    #[inline(always)]
    pub unsafe fn push(&self, class: usize, b: *mut Block, arena: u32) -> Push {
        debug_assert!(self.enabled && class < NUM_CLASSES);
        // SAFETY: by the contract.
        match unsafe { self.push_raw(class, b as usize, arena) } {
            0 => Push::Done,
            2 => Push::Full,
            3 => Push::Remote,
            _ => Push::Foreign,
        }
    }

    /// Pushes `b`, a free small block of another arena than the current CPU's, on the
    /// current CPU's outbox.
    ///
    /// # Safety
    /// `enabled`; `b` is a free small block, marked, which the caller owns and gives up if
    /// the answer is [`Push::Done`].
    #[inline(always)]
    pub unsafe fn push_outbox(&self, b: *mut Block) -> Push {
        // SAFETY: by the contract.
        match unsafe { self.push_outbox_raw(b as usize) } {
            0 => Push::Done,
            2 => Push::Full,
            _ => Push::Foreign,
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
    /// `enabled`, `cpu < len()`; `chain` holds at most `limit(class)` free blocks of class
    /// `class` of arena `arena_of(cpu)`, which the caller gives up if this returns true.
    pub unsafe fn install(&self, cpu: usize, class: usize, chain: usize) -> bool {
        debug_assert!(cpu < self.len && (chain >> PTR_BITS) <= limit(class));
        // SAFETY: by the contract.
        unsafe { self.install_raw(cpu, class, chain) }
    }

    /// Whether `b` is on the current CPU's list of class `class`.
    pub fn contains(&self, class: usize, b: *mut Block) -> bool {
        self.enabled && self.contains_raw(class, b as usize, limit(class) + 1)
    }

    /// Whether `b` seems to be on any CPU's list of class `class` or outbox, looked for
    /// without those CPUs' cooperation: their lists may change under the walk, so every link
    /// is read as one machine word and followed only if `is_block(link, list)` says it is a
    /// free-able small block fit for that list (of `class` for a class list, of any class
    /// for an outbox), which keeps the walk inside mapped memory; at most a list's limit + 1
    /// links per CPU. Used only to confirm a suspected double free, where `b` carries the
    /// free mark and is on no list of the current CPU or its arena: a hit means some CPU
    /// held `b` as free during the walk.
    #[cold]
    pub fn seen_anywhere(
        &self,
        class: usize,
        b: *mut Block,
        is_block: impl Fn(usize, usize) -> bool,
    ) -> bool {
        let mut seen = false;
        for list in [class, OUTBOX] {
            for cpu in 0..self.len {
                self.walk(
                    cpu,
                    list,
                    |p| {
                        seen |= p == b as usize;
                        !seen
                    },
                    &is_block,
                );
            }
        }
        seen
    }

    /// Calls `f` on each block of CPU `cpu`'s list `list` (a class or [`OUTBOX`]), walked
    /// without that CPU's cooperation as [`Caches::seen_anywhere`] explains, while `f`
    /// returns true. Exact only while no thread runs on `cpu`.
    pub fn walk(
        &self,
        cpu: usize,
        list: usize,
        mut f: impl FnMut(usize) -> bool,
        is_block: &impl Fn(usize, usize) -> bool,
    ) {
        if !self.enabled {
            return;
        }
        let max = if list == OUTBOX {
            OUTBOX_LIMIT
        } else {
            limit(list)
        };
        let mut h = self.cache(cpu).heads[list].load(Ordering::Relaxed);
        let key = self.key_of(cpu);
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
