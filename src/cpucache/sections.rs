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
    Caches, NUM_CLASSES, OFF_ALLOCS, OFF_ARENA, OFF_CS_BASE, OFF_CS_LEN, OFF_CS_RSEQ, OFF_FREES,
    OFF_KEY, OFF_LIMITS, OFF_OUTBOX, OFF_OUTBOX_OWNER, OUTBOX, OUTBOX_ADDS, OUTBOX_LIMIT,
    OUTBOX_WORD_MAX, PTR_BITS, STRIDE_SHIFT,
};
use core::arch::asm;

/// glibc's `RSEQ_SIG` for x86.
const RSEQ_SIG: u32 = 0x5305_3053;

// The sections write 48 where they shift a count or a class above an address.
const _: () = assert!(PTR_BITS == 48);

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

/// Makes `{c}` point to CPU `{want}`'s cache, or leaves the section (to label 75) when the
/// thread does not run on that CPU. `{t}` is free afterwards.
macro_rules! cache_of_cpu {
    () => {
        concat!(
            "mov {c:e}, dword ptr fs:[{t} + 4]\n",
            "cmp {c}, {want}\n",
            "jne 75f\n",
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

/// The body of a push onto list `{cls}` of the cache at `{c}` (see `Caches::push_raw`),
/// up to its commit, `push_commit!`: leaves for `{full}` when the list is at its limit,
/// else writes block `{b}`'s link (the encoded old head) and counts the push, with the new
/// packed head in `{t}`.
macro_rules! list_push {
    () => {
        concat!(
            "mov {h}, qword ptr [{c} + {cls} * 8]\n",
            "mov {t}, {h}\n",
            "shr {t}, 48\n",
            "cmp {t:l}, byte ptr [{c} + {cls} + {limits}]\n",
            "jae {full}\n",
            "add {t}, 1\n",
            "shl {t}, 48\n",
            "or {t}, {b}\n",
            hardened!(
                "bswap {h}",
                "xor {h}, qword ptr [{c} + {key}]",
                "xor {h}, {b}",
            ),
            "mov qword ptr [{b}], {h}\n",
            "add qword ptr [{c} + {frees}], 1\n",
        )
    };
}

/// The commit of a push: the new head in `{t}` stored as list `{cls}`'s head of the cache
/// at `{c}`.
macro_rules! push_commit {
    () => {
        "mov qword ptr [{c} + {cls} * 8], {t}"
    };
}

/// The body of an append to the outbox of the cache at `{c}` of block `{b}` of class `{cls}`
/// (a small class) and arena `{arena}`, up to its commit: leaves for `{outbox_full}` when the
/// outbox holds `OUTBOX_LIMIT` blocks or the block's bytes (`outbox_bytes`) would take it
/// past `OUTBOX_BYTES`, else writes the entry and its owner at the count (past what is
/// committed) and counts the push, with the new count word in `{t}`. Uses `{h}` and `{k}`.
macro_rules! outbox_append {
    () => {
        concat!(
            "mov {t}, qword ptr [{c} + {count}]\n",
            "cmp {t:l}, {limit}\n",
            "jae {outbox_full}\n",
            "lea {h}, [rip + {adds}]\n",
            "mov {h}, qword ptr [{h} + {cls} * 8]\n",
            "add {h}, {t}\n",
            "cmp {h}, {word_max}\n",
            "ja {outbox_full}\n",
            "movzx {t:e}, {t:l}\n",
            "mov word ptr [{c} + {t} * 2 + {owners}], {arena:x}\n",
            // The entry, packed as `inbox::pack` does (PTR_BITS is 48).
            "mov {k}, {cls}\n",
            "shl {k}, 48\n",
            "or {k}, {b}\n",
            "mov qword ptr [{c} + {t} * 8 + {entries}], {k}\n",
            "add qword ptr [{c} + {frees}], 1\n",
            "mov {t}, {h}\n",
        )
    };
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
                    // k = the secret and the block's address, ready before the link
                    // arrives, so that one `xor` and the `bswap` follow its load (the
                    // pop's dependency from one head to the next)
                    hardened!("mov {k}, qword ptr [{c} + {key}]", "xor {k}, {b}",),
                    "mov {t}, qword ptr [{b}]",
                    // decode; the link's count must be the head's minus one, else the
                    // section leaves through 77 with no block
                    hardened!(
                        "xor {t}, {k}",
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
                k = out(reg) _,
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
    /// is for `arena` and the list holds fewer blocks than its limit; a small block of
    /// another arena goes into the outbox instead, in the same section (the arena
    /// comparison chooses the list), if the outbox has room for it. Returns 0 (done),
    /// 1 (no usable CPU id), 2 (full), 3 (the cache is another arena's, and `class` a run
    /// slot) or 4 (the cache is another arena's and its outbox full).
    ///
    /// # Safety
    /// `b` is a free block of class `class` of arena `arena` that the caller owns, marked
    /// if it is a small block.
    #[inline(always)]
    pub(super) unsafe fn push_raw(&self, class: usize, b: usize, arena: u32) -> u32 {
        // SAFETY: as in `pop_raw`; the section writes, on the current CPU's cache, either
        // (its arena's block) the first word of `b`, which the caller owns, and then the
        // list's head, the commit (a section restarted and then left by a way out leaves
        // that word written, and `b` still the caller's); or (another arena's block) the
        // outbox entry and its owner at the count, which is below `OUTBOX_LIMIT` (checked),
        // so past what is committed until the commit, and then the count word, with the same
        // commit instruction: the outbox branch points `{c}` at the cache's address less
        // `class` entries of the heads plus the count word's offset, so that
        // `[{c} + {cls} * 8]` is the count word, after its last use of `{c}`. Either way the
        // statistics counter is added to before the commit (twice if restarted). The table
        // of outbox increments is read RIP-relative: its symbol binds locally in the preload
        // library and in executables (a Rust `dylib` exporting it would fail to link, not
        // run wrong).
        unsafe {
            asm!(
                rseq_section!(
                    current_cache!("{foreign}"),
                    "cmp dword ptr [{c} + {arena_off}], {arena:e}",
                    "je 78f",
                    // Another arena's block: into the outbox, if a small block (not a
                    // run slot's) and the outbox has room for one more block of its bytes.
                    "cmp {cls}, {num_classes}",
                    "jae {remote}",
                    outbox_append!(),
                    "mov {k}, {cls}",
                    "neg {k}",
                    "lea {c}, [{c} + {k} * 8 + {count}]",
                    "jmp 79f",
                    "78:",
                    list_push!(),
                    "79:",
                    push_commit!(),
                ),
                cs = in(reg) self as *const Caches,
                cs_rseq = const OFF_CS_RSEQ,
                cs_len = const OFF_CS_LEN,
                cs_base = const OFF_CS_BASE,
                cls = in(reg) class,
                b = in(reg) b,
                arena = in(reg) arena,
                limits = const OFF_LIMITS,
                h = out(reg) _,
                c = out(reg) _,
                t = out(reg) _,
                k = out(reg) _,
                shift = const STRIDE_SHIFT,
                arena_off = const OFF_ARENA,
                frees = const OFF_FREES,
                key = const OFF_KEY,
                num_classes = const NUM_CLASSES,
                count = const OUTBOX * 8,
                limit = const OUTBOX_LIMIT,
                word_max = const OUTBOX_WORD_MAX,
                adds = sym OUTBOX_ADDS,
                entries = const OFF_OUTBOX,
                owners = const OFF_OUTBOX_OWNER,
                sig = const RSEQ_SIG,
                foreign = label { return 1 },
                full = label { return 2 },
                remote = label { return 3 },
                outbox_full = label { return 4 },
                options(nostack),
            );
        }
        0
    }

    /// Appends block `b` of class `class` and arena `arena` to the current CPU's outbox if
    /// that leaves it within both its bounds. Returns 0 (done), 1 (no usable CPU id) or 4
    /// (full).
    ///
    /// # Safety
    /// `b` is a free small block that the caller owns, marked, of class `class`
    /// (`class < NUM_CLASSES`), which it gives up on 0; `arena` is the block's arena.
    #[inline(always)]
    pub(super) unsafe fn push_outbox_raw(&self, class: usize, b: usize, arena: u32) -> u32 {
        // SAFETY: as in `pop_raw`; the section writes only the current CPU's cache: the
        // entry and its owner at the count, which is below `OUTBOX_LIMIT` (checked), so
        // inside the arrays and past what is committed, the statistics counter (counted
        // twice if restarted), and then the count word, the commit. The increments' table
        // is read as in `push_raw`.
        unsafe {
            asm!(
                rseq_section!(
                    current_cache!("{foreign}"),
                    outbox_append!(),
                    "mov qword ptr [{c} + {count}], {t}",
                ),
                cs = in(reg) self as *const Caches,
                cs_rseq = const OFF_CS_RSEQ,
                cs_len = const OFF_CS_LEN,
                cs_base = const OFF_CS_BASE,
                cls = in(reg) class,
                b = in(reg) b,
                arena = in(reg) arena,
                h = out(reg) _,
                c = out(reg) _,
                t = out(reg) _,
                k = out(reg) _,
                shift = const STRIDE_SHIFT,
                count = const OUTBOX * 8,
                limit = const OUTBOX_LIMIT,
                word_max = const OUTBOX_WORD_MAX,
                adds = sym OUTBOX_ADDS,
                entries = const OFF_OUTBOX,
                owners = const OFF_OUTBOX_OWNER,
                frees = const OFF_FREES,
                sig = const RSEQ_SIG,
                foreign = label { return 1 },
                outbox_full = label { return 4 },
                options(nostack),
            );
        }
        0
    }

    /// Copies the current CPU's outbox into `entries` and `owners` and empties it. Returns
    /// how many entries it took (0 if the thread has no usable CPU id).
    #[inline(never)]
    pub(super) fn take_outbox_raw(
        &self,
        entries: &mut [usize; OUTBOX_LIMIT],
        owners: &mut [u16; OUTBOX_LIMIT],
    ) -> usize {
        let n: usize;
        // SAFETY: as in `pop_raw`; the section reads the current CPU's outbox up to its
        // count, no more than `OUTBOX_LIMIT` (clamped, so a damaged count cannot take it
        // past the arrays), writes as many entries of the caller's arrays, and commits by
        // storing a count of 0, after which the copied blocks are ours. A restart copies
        // again from the first.
        unsafe {
            asm!(
                rseq_section!(
                    "xor {n:e}, {n:e}",
                    current_cache!(),
                    "movzx {n:e}, byte ptr [{c} + {count}]",
                    "mov {i:e}, {limit}",
                    "cmp {n}, {i}",
                    "cmova {n}, {i}",
                    "xor {i:e}, {i:e}",
                    "77:",
                    "cmp {i}, {n}",
                    "jae 78f",
                    "mov {t}, qword ptr [{c} + {i} * 8 + {entries}]",
                    "mov qword ptr [{eout} + {i} * 8], {t}",
                    "movzx {t:e}, word ptr [{c} + {i} * 2 + {owners}]",
                    "mov word ptr [{oout} + {i} * 2], {t:x}",
                    "add {i}, 1",
                    "jmp 77b",
                    "78:",
                    "mov qword ptr [{c} + {count}], 0",
                ),
                cs = in(reg) self as *const Caches,
                cs_rseq = const OFF_CS_RSEQ,
                cs_len = const OFF_CS_LEN,
                cs_base = const OFF_CS_BASE,
                eout = in(reg) entries.as_mut_ptr(),
                oout = in(reg) owners.as_mut_ptr(),
                n = out(reg) n,
                i = out(reg) _,
                c = out(reg) _,
                t = out(reg) _,
                shift = const STRIDE_SHIFT,
                count = const OUTBOX * 8,
                limit = const OUTBOX_LIMIT,
                entries = const OFF_OUTBOX,
                owners = const OFF_OUTBOX_OWNER,
                sig = const RSEQ_SIG,
                options(nostack),
            );
        }
        n
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

    /// Makes `chain` the list of class `class` if the thread runs on CPU `cpu`, that list's
    /// head is still `base` (0: empty) and its limit (read here, in the section: it may have
    /// been lowered since the caller looked) holds the chain. Returns whether it did.
    ///
    /// # Safety
    /// `cpu < len`; `chain` is a packed chain of free blocks of class `class` of arena
    /// `arena_of(cpu)`, owned by the caller down to `base`, its rest.
    #[inline]
    pub(super) unsafe fn install_raw(
        &self,
        cpu: usize,
        class: usize,
        chain: usize,
        base: usize,
    ) -> bool {
        let status: u32;
        // SAFETY: as in `pop_raw`; `cpu < len` by the contract.
        unsafe {
            asm!(
                rseq_section!(
                    "mov {st:e}, 1",
                    cache_of_cpu!(),
                    "cmp qword ptr [{c} + {cls} * 8], {base}",
                    "jne 75f",
                    "movzx {l:e}, byte ptr [{c} + {cls} + {limits}]",
                    "cmp {n}, {l}",
                    "ja 75f",
                    "xor {st:e}, {st:e}",
                    "mov qword ptr [{c} + {cls} * 8], {chain}",
                ),
                cs = in(reg) self as *const Caches,
                cs_rseq = const OFF_CS_RSEQ,
                cs_base = const OFF_CS_BASE,
                limits = const OFF_LIMITS,
                want = in(reg) cpu,
                cls = in(reg) class,
                chain = in(reg) chain,
                base = in(reg) base,
                n = in(reg) chain >> PTR_BITS,
                st = out(reg) status,
                l = out(reg) _,
                c = out(reg) _,
                t = out(reg) _,
                shift = const STRIDE_SHIFT,
                sig = const RSEQ_SIG,
                options(nostack),
            );
        }
        status == 0
    }

    /// Lowers the limit of CPU `cpu`'s list of class `class` from `old` to `new` if the
    /// thread runs on `cpu`, the limit is still `old` and the list holds at most `new`
    /// blocks. Returns whether it did. (The commit is the limit's byte: a push on this CPU
    /// either finished before, and was counted, or starts after and sees the new limit.)
    #[inline]
    pub(super) fn lower_limit_raw(&self, cpu: usize, class: usize, old: u8, new: u8) -> bool {
        if cpu >= self.len {
            // No cache (the section indexes by the CPU id without comparing it with the
            // table's length).
            return false;
        }
        let status: u32;
        // SAFETY: as in `pop_raw`; `cpu < len`, so the section writes only the limit byte
        // of a cache of ours.
        unsafe {
            asm!(
                rseq_section!(
                    "mov {st:e}, 1",
                    cache_of_cpu!(),
                    "cmp byte ptr [{c} + {cls} + {limits}], {old:l}",
                    "jne 75f",
                    "mov {h}, qword ptr [{c} + {cls} * 8]",
                    "shr {h}, 48",
                    "cmp {h}, {new}",
                    "ja 75f",
                    "xor {st:e}, {st:e}",
                    "mov byte ptr [{c} + {cls} + {limits}], {new:l}",
                ),
                cs = in(reg) self as *const Caches,
                cs_rseq = const OFF_CS_RSEQ,
                cs_base = const OFF_CS_BASE,
                limits = const OFF_LIMITS,
                want = in(reg) cpu,
                cls = in(reg) class,
                old = in(reg) old as usize,
                new = in(reg) new as usize,
                st = out(reg) status,
                h = out(reg) _,
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
