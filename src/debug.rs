//! Debug mode (`COREHEAP_DEBUG=1`, read once when the heap starts): guard bytes after every
//! block, fill patterns for new and freed memory, and the checks that use them.
//!
//! A debug block asks the heap for [`EXTRA`] more bytes than requested. With `u` the usable
//! size of what the heap returned at `p`:
//!
//! ```text
//! p            p+size                 p+u-8      p+u
//! | user bytes | guard bytes (>= 8)    | trailer |
//! ```
//!
//! The trailer holds the requested size, encoded with the heap's secret and `p` so that a
//! stray write is unlikely to leave a plausible size; a freed small block's trailer holds a
//! tag instead (small runs are zeroed when they go back to the page heap, so a tag never
//! outlives its block's run). At free (and realloc) the guard must be intact: a one-byte overflow is reported
//! with the block's address and size. A freed block is filled with [`FREE_FILL`] from byte
//! 16 on (the first two words belong to the free lists) up to [`FILL_MAX`] bytes; when a block
//! with the freed tag is handed out again, the fill must be intact, else something wrote
//! after free. New memory (not from calloc) is filled with [`ALLOC_FILL`].
//!
//! Per-CPU caches are off in debug mode, so every block passes through these checks.

use crate::diag::{block_error, Line};

/// Bytes added to every request: at least 8 guard bytes, then the 8-byte trailer.
pub const EXTRA: usize = 16;

/// What to ask the heap for, for a request of `size` bytes: at least 32, so that the
/// trailer never overlaps the two words a free list writes into a freed block.
pub fn inner_size(size: usize) -> Option<usize> {
    size.checked_add(EXTRA).map(|n| n.max(32))
}
/// What new memory is filled with (reads of uninitialised memory stand out).
pub const ALLOC_FILL: u8 = 0xa5;
/// What freed memory is filled with.
pub const FREE_FILL: u8 = 0xdd;
/// What guard bytes hold.
pub const GUARD: u8 = 0xfb;
/// Freed blocks are filled and checked up to this many bytes (large blocks stay cheap).
pub const FILL_MAX: usize = 64 * 1024;

fn trailer(p: *mut u8, usable: usize) -> *mut usize {
    (p as usize + usable - 8) as *mut usize
}

fn encode(size: usize, p: *mut u8, key: usize) -> usize {
    size ^ key ^ (p as usize).rotate_left(29)
}

fn freed_tag(p: *mut u8, key: usize) -> usize {
    !key ^ (p as usize).rotate_left(13)
}

/// The first byte of `[from, to)` of `p` that is not `v`, if any.
///
/// # Safety
/// The range is readable.
unsafe fn first_not(p: *mut u8, from: usize, to: usize, v: u8) -> Option<usize> {
    // SAFETY: by the contract.
    let bytes = unsafe { core::slice::from_raw_parts(p.add(from), to.saturating_sub(from)) };
    bytes.iter().position(|&b| b != v).map(|i| from + i)
}

/// The block at `p` was just handed out by the heap with `usable` bytes for a request of
/// `size` (so `usable >= size + EXTRA`): checks the fill if it was freed in debug mode,
/// then writes the new fill, guard and trailer (`calloc` clears the fill afterwards).
///
/// # Safety
/// `p` is a block of `usable` bytes that the caller owns.
pub unsafe fn on_alloc(p: *mut u8, size: usize, usable: usize, key: usize) {
    debug_assert!(usable >= size + EXTRA);
    let t = trailer(p, usable);
    // SAFETY: the whole block is the caller's.
    unsafe {
        if t.read() == freed_tag(p, key) {
            let end = (usable - 8).min(FILL_MAX);
            if let Some(at) = first_not(p, 16, end, FREE_FILL) {
                let mut l = Line::new();
                l.str(b"coreheap: write after free: byte ")
                    .num(at as u64)
                    .str(b" of freed block ")
                    .hex(p as usize)
                    .str(b" was changed (found ")
                    .hex(*p.add(at) as usize)
                    .str(b", freed memory holds 0xdd)\n");
                crate::os::fatal(l.as_bytes());
            }
        }
        core::ptr::write_bytes(p, ALLOC_FILL, size);
        core::ptr::write_bytes(p.add(size), GUARD, usable - 8 - size);
        t.write(encode(size, p, key));
    }
}

/// The size a debug block at `p` (of `usable` bytes) was requested with, after checking its
/// trailer and guard bytes. `call` names the caller in a report (`free()`, `realloc()`).
///
/// # Safety
/// `p` is a live block of the heap (a debug block, if the program is correct) of `usable`
/// bytes.
pub unsafe fn check(p: *mut u8, usable: usize, key: usize, call: &[u8]) -> usize {
    // SAFETY: the block is readable for `usable` bytes.
    unsafe {
        let raw = trailer(p, usable).read();
        if raw == freed_tag(p, key) {
            let mut l = Line::new();
            l.str(call).str(b": double free detected (debug)");
            block_error(l.as_bytes(), p, None, usable);
        }
        let size = encode(raw, p, key);
        if size > usable - EXTRA {
            let mut l = Line::new();
            l.str(call)
                .str(b": heap overflow: the trailer after block ")
                .hex(p as usize)
                .str(b" (")
                .num(usable as u64 - EXTRA as u64)
                .str(b" bytes or less) was overwritten\n");
            crate::os::fatal(l.as_bytes());
        }
        if let Some(at) = first_not(p, size, usable - 8, GUARD) {
            let mut l = Line::new();
            l.str(call)
                .str(b": heap overflow: ")
                .num((at - size + 1) as u64)
                .str(b" byte(s) past the end of block ")
                .hex(p as usize)
                .str(b" of size ")
                .num(size as u64)
                .str(b" were written\n");
            crate::os::fatal(l.as_bytes());
        }
        size
    }
}

/// Checks the block at `p` and fills it as freed. Returns its requested size. `tag`: mark it
/// as freed, so that the fill is checked when the block is handed out again. Only small
/// blocks are tagged: a small block's memory comes back as the same block while its run
/// lives (and a run is zeroed when it dies), whereas a page run's memory may come back as
/// a block of another size that happens to share the tag's position.
///
/// # Safety
/// As for [`check`]; the caller frees the block right after.
pub unsafe fn on_free(p: *mut u8, usable: usize, key: usize, call: &[u8], tag: bool) -> usize {
    // SAFETY: by the contract.
    unsafe {
        let size = check(p, usable, key, call);
        let end = (usable - 8).min(FILL_MAX);
        if end > 16 {
            core::ptr::write_bytes(p.add(16), FREE_FILL, end - 16);
        }
        if tag {
            trailer(p, usable).write(freed_tag(p, key));
        }
        size
    }
}
