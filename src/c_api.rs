//! The C allocation interface with glibc's semantics, testable in-process: the preload library
//! exports each function as a one-line forward.
//!
//! Rules kept here (glibc's, see its `malloc(3)`, `posix_memalign(3)`, `malloc_usable_size(3)`):
//! - every result is aligned to [`MIN_ALIGN`] (16 bytes on x86_64 and aarch64);
//! - `malloc(0)` returns a unique pointer that can be freed;
//! - a request above `PTRDIFF_MAX`, and an overflowing `calloc`/`reallocarray` product, return
//!   null with `errno = ENOMEM`; any other failure also sets `ENOMEM`;
//! - `free` and `free(NULL)` keep `errno` as it was;
//! - `realloc(p, 0)` frees `p` and returns null; a failed `realloc` leaves `p` intact;
//! - `posix_memalign` returns `EINVAL` for an alignment that is not a power of two multiple of
//!   `sizeof(void *)`, and does not touch `errno`;
//! - `memalign` rounds a non-power-of-two alignment up (as glibc does); `aligned_alloc` rejects
//!   it with `EINVAL` (as glibc 2.38 and later do);
//! - a pointer coreheap never returned aborts with a one-line message naming it.

use core::ffi::{c_int, c_void};

use crate::diag::Line;
use crate::heap::HEAP;
use crate::shm::process::heap as shm_heap;
use crate::size_class::PAGE;

/// The alignment of every block the C interface returns.
pub const MIN_ALIGN: usize = 16;
/// `PTRDIFF_MAX`: no object may be larger.
const MAX_SIZE: usize = isize::MAX as usize;

#[cfg(test)]
use crate::os::errno;
use crate::os::set_errno;

#[inline]
fn nomem() -> *mut c_void {
    set_errno(libc::ENOMEM);
    core::ptr::null_mut()
}

#[inline]
fn alloc_aligned(size: usize, align: usize) -> *mut c_void {
    if size > MAX_SIZE {
        return nomem();
    }
    let p = raw_alloc(size, align);
    if p.is_null() {
        nomem()
    } else {
        p.cast()
    }
}

/// A block from the shared heap of `COREHEAP_SHM`, or else from the process heap.
#[inline]
fn raw_alloc(size: usize, align: usize) -> *mut u8 {
    match shm_heap() {
        Some(h) => h.alloc_raw(size, align),
        None => HEAP.alloc(size, align).0,
    }
}

/// `malloc(3)`.
#[inline]
pub fn malloc(size: usize) -> *mut c_void {
    alloc_aligned(size, MIN_ALIGN)
}

/// `free(3)`.
///
/// # Safety
/// `p` is null or a live block of coreheap that the caller gives up.
#[inline]
pub unsafe fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: passed on from the caller. `free_small` keeps errno itself (its fast path
    // makes no system call), so it is saved here only on the other paths. It takes only
    // small blocks of chunks in the process heap's registry, which a shared heap's never
    // are, so it is asked first whether or not a shared heap serves `malloc`: a block the
    // process heap gave out before the shared one opened goes back to it either way.
    if unsafe { HEAP.free_small(p.cast()) } {
        return;
    }
    // SAFETY: as above.
    unsafe { free_slow(p) }
}

/// Every other `free`: out of line, so that the path above saves no registers.
///
/// # Safety
/// As for `free`, `p` not null.
#[inline(never)]
unsafe fn free_slow(p: *mut c_void) {
    crate::os::keeping_errno(|| match shm_heap() {
        // SAFETY: passed on from the caller; an invalid pointer aborts.
        Some(h) if h.contains(p.cast()) => unsafe { h.free(p.cast()) },
        // SAFETY: as above.
        _ => unsafe { HEAP.free(p.cast()) },
    })
}

/// `calloc(3)`.
pub fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        return nomem();
    };
    if total > MAX_SIZE {
        return nomem();
    }
    let p = match shm_heap() {
        Some(h) => h.alloc_zeroed_raw(total, MIN_ALIGN),
        None => HEAP.alloc_zeroed(total, MIN_ALIGN),
    };
    if p.is_null() {
        nomem()
    } else {
        p.cast()
    }
}

/// `realloc(3)`.
///
/// # Safety
/// `p` is null or a live block of coreheap that the caller owns.
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // SAFETY: passed on from the caller.
        unsafe { free(p) };
        return core::ptr::null_mut();
    }
    if size > MAX_SIZE {
        return nomem();
    }
    let q = match shm_heap() {
        // SAFETY: passed on from the caller.
        Some(h) if h.contains(p.cast()) => unsafe { h.realloc_aligned(p.cast(), size, MIN_ALIGN) },
        // SAFETY: passed on from the caller.
        _ => unsafe { HEAP.realloc(p.cast(), size, MIN_ALIGN, false) },
    };
    if q.is_null() {
        nomem()
    } else {
        q.cast()
    }
}

/// `reallocarray(3)`.
///
/// # Safety
/// As for [`realloc`].
pub unsafe fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: passed on from the caller.
        Some(total) => unsafe { realloc(p, total) },
        None => nomem(),
    }
}

/// `posix_memalign(3)`.
///
/// # Safety
/// `out` is valid for writing a pointer.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    if size > MAX_SIZE {
        return libc::ENOMEM;
    }
    let p = raw_alloc(size, align.max(MIN_ALIGN));
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: by the contract.
    unsafe { *out = p.cast() };
    0
}

/// `aligned_alloc(3)`.
pub fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    alloc_aligned(size, align.max(MIN_ALIGN))
}

/// `memalign(3)`: a non-power-of-two alignment is rounded up.
pub fn memalign(align: usize, size: usize) -> *mut c_void {
    let Some(align) = align.max(MIN_ALIGN).checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    };
    if align > MAX_SIZE / 2 {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    alloc_aligned(size, align)
}

/// `valloc(3)`.
pub fn valloc(size: usize) -> *mut c_void {
    alloc_aligned(size, PAGE)
}

/// `pvalloc(3)`: page-aligned, rounded up to whole pages (one page for 0).
pub fn pvalloc(size: usize) -> *mut c_void {
    let Some(rounded) = size.max(1).checked_add(PAGE - 1) else {
        return nomem();
    };
    alloc_aligned(rounded & !(PAGE - 1), PAGE)
}

/// `malloc_usable_size(3)`.
///
/// # Safety
/// `p` is null or a live block of coreheap.
pub unsafe fn malloc_usable_size(p: *mut c_void) -> usize {
    match shm_heap() {
        Some(h) if h.contains(p.cast()) => h.usable_size(p.cast()),
        _ => HEAP.usable_size(p.cast()),
    }
}

/// `coreheap_shm_set_root(p)`: publishes `p` (a block of the `COREHEAP_SHM` heap, or null)
/// as the shared heap's root for other processes. Returns 0, or -1 without such a heap or
/// for a pointer outside it.
pub fn shm_set_root(p: *mut c_void) -> c_int {
    match shm_heap() {
        Some(h) if p.is_null() || h.contains(p.cast()) => {
            h.set_root(h.offset_of(p));
            0
        }
        _ => -1,
    }
}

/// `coreheap_shm_root()`: the `COREHEAP_SHM` heap's root, or null.
pub fn shm_root() -> *mut c_void {
    match shm_heap() {
        Some(h) => h.ptr(h.root()).cast(),
        None => core::ptr::null_mut(),
    }
}

/// `fork(2)`: the C library's `fork` (the next one after the preload library's), which runs
/// the fork handlers. While the `COREHEAP_SHM` heap is the shared file's, one thread at a
/// time gets into it (`shm::process::fork_gated`): its prepare handler stops the other
/// threads, and one stopped inside glibc's own `fork` could hold the lock glibc takes after
/// the handlers. (glibc's own callers of `fork`, `daemon` and `forkpty`, do not come here.)
pub fn fork() -> libc::pid_t {
    // Looked up (if the constructor has not) before the gate is taken.
    let next = crate::os::process::next_fork();
    // SAFETY: the C library's `fork`, which has no preconditions.
    crate::shm::process::fork_gated(|| unsafe { next() })
}

/// `malloc_trim(3)`: empties every CPU's cache and returns unused pages (as
/// [`crate::trim`]); returns 1 (memory may have been released).
pub fn malloc_trim(_pad: usize) -> c_int {
    HEAP.trim();
    1
}

/// Calls `f` with each arena's counters of the heap `malloc` serves (the `COREHEAP_SHM`
/// heap, or the process heap), without allocating; returns its huge blocks' counters
/// (allocs, frees, bytes in use, bytes mapped).
fn each_arena(f: impl FnMut(crate::arena::ArenaStats)) -> (u64, u64, usize, usize) {
    match shm_heap() {
        Some(h) => h.each_arena(f),
        None => {
            HEAP.for_each_arena(f);
            HEAP.huge_counters()
        }
    }
}

/// `mallopt(3)` parameters that map onto coreheap's settings.
const M_TRIM_THRESHOLD: c_int = -1;
const M_ARENA_MAX: c_int = -8;

/// `mallopt(3)`. glibc's parameters (`M_MXFAST` 1, `M_TRIM_THRESHOLD` -1, `M_TOP_PAD` -2,
/// `M_MMAP_THRESHOLD` -3, `M_MMAP_MAX` -4, `M_CHECK_ACTION` -5, `M_PERTURB` -6,
/// `M_ARENA_TEST` -7, `M_ARENA_MAX` -8) are accepted (1); any other is refused (0), as glibc
/// refuses it. Two take effect, as the program's own choice, under which the environment
/// still wins (as over `CoreHeap`'s builder: a `COREHEAP_*` variable that is set decides):
/// - `M_TRIM_THRESHOLD`: the dirty bytes an arena always may keep and the most bytes of
///   huge spans kept for reuse (`COREHEAP_DIRTY_MAX`), from the next free on; a negative
///   value (glibc: never trim) the largest, 1 TiB;
/// - `M_ARENA_MAX` (`value > 0`): the arena count (`COREHEAP_ARENAS`, at most 4096), if the
///   heap has not been initialised yet; afterwards it has no effect (the preload library
///   initialises the heap before `main`, so there it never has).
///
/// The others shape glibc's heap and have no counterpart: coreheap maps blocks above 2 MiB
/// directly whatever `M_MMAP_THRESHOLD` says (the threshold is its chunk layout), and its
/// debug mode's fill patterns are fixed and chosen at start (`COREHEAP_DEBUG`), so
/// `M_PERTURB` is ignored too.
pub fn mallopt(param: c_int, value: c_int) -> c_int {
    match param {
        M_TRIM_THRESHOLD => {
            // glibc reads a negative value as unsigned: never trim.
            crate::settings::set_dirty_max(if value < 0 { u64::MAX } else { value as u64 });
            1
        }
        M_ARENA_MAX => {
            if value > 0 {
                crate::settings::set_arena_max(value as usize);
            }
            1
        }
        _ => ((-8..=1).contains(&param) && param != 0) as c_int,
    }
}

/// `malloc_info(3)`: the heap as XML on `fp`, in glibc's layout (`<malloc version="1">`, a
/// `<heap nr="N">` per arena, then the totals), which tools that read glibc's parse:
/// per arena, `<sizes>` lists the free blocks waiting in the CPU caches, transfer slots and
/// outboxes by class (glibc's fastbins and tcache play that part there, so they are the
/// `fast` total), `rest` is the arena's free dirty pages, `system`/`aspace` its mapped
/// bytes; the totals add `mmap` (the huge blocks). `options` must be 0 (else `EINVAL`, -1).
/// Returns 0, or -1 if the stream failed.
///
/// # Safety
/// `fp` is an open `FILE *`.
pub unsafe fn malloc_info(options: c_int, fp: *mut libc::FILE) -> c_int {
    use crate::os::write_stream;
    if options != 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    let mut ok = write_stream(fp, b"<malloc version=\"1\">\n");
    let (mut fast_n, mut fast_b, mut rest_b, mut system) = (0u64, 0u64, 0u64, 0u64);
    let (_, _, huge_in_use, huge_mapped) = each_arena(|a| {
        let mut l = Line::new();
        l.str(b"<heap nr=\"")
            .num(a.index as u64)
            .str(b"\">\n<sizes>\n");
        ok &= write_stream(fp, l.as_bytes());
        let (mut n_all, mut b_all) = (0u64, 0u64);
        for (c, &n) in a.cached.iter().enumerate().filter(|(_, &n)| n > 0) {
            let size = crate::size_class::class_size(c) as u64;
            let mut l = Line::new();
            l.str(b"  <size from=\"")
                .num(size)
                .str(b"\" to=\"")
                .num(size)
                .str(b"\" total=\"")
                .num(n * size)
                .str(b"\" count=\"")
                .num(n)
                .str(b"\"/>\n");
            ok &= write_stream(fp, l.as_bytes());
            n_all += n;
            b_all += n * size;
        }
        let (dirty, mapped) = (a.dirty_bytes as u64, a.pages.mapped as u64);
        let mut l = Line::new();
        l.str(b"</sizes>\n<total type=\"fast\" count=\"")
            .num(n_all)
            .str(b"\" size=\"")
            .num(b_all)
            .str(b"\"/>\n<total type=\"rest\" count=\"")
            .num((dirty > 0) as u64)
            .str(b"\" size=\"")
            .num(dirty)
            .str(b"\"/>\n");
        ok &= write_stream(fp, l.as_bytes());
        ok &= write_system(fp, mapped, b"</heap>\n");
        fast_n += n_all;
        fast_b += b_all;
        rest_b += dirty;
        system += mapped;
    });
    let mut l = Line::new();
    l.str(b"<total type=\"fast\" count=\"")
        .num(fast_n)
        .str(b"\" size=\"")
        .num(fast_b)
        .str(b"\"/>\n<total type=\"rest\" count=\"")
        .num((rest_b > 0) as u64)
        .str(b"\" size=\"")
        .num(rest_b)
        .str(b"\"/>\n<total type=\"mmap\" count=\"")
        .num((huge_in_use > 0) as u64)
        .str(b"\" size=\"")
        .num(huge_mapped as u64)
        .str(b"\"/>\n");
    ok &= write_stream(fp, l.as_bytes());
    ok &= write_system(fp, system + huge_mapped as u64, b"</malloc>\n");
    if ok {
        0
    } else {
        -1
    }
}

/// The `<system>` and `<aspace>` lines of `malloc_info`, then `end`.
fn write_system(fp: *mut libc::FILE, bytes: u64, end: &[u8]) -> bool {
    let mut l = Line::new();
    for (tag, kind) in [
        (&b"system"[..], &b"current"[..]),
        (b"system", b"max"),
        (b"aspace", b"total"),
        (b"aspace", b"mprotect"),
    ] {
        l.str(b"<")
            .str(tag)
            .str(b" type=\"")
            .str(kind)
            .str(b"\" size=\"")
            .num(bytes)
            .str(b"\"/>\n");
    }
    l.str(end);
    crate::os::write_stream(fp, l.as_bytes())
}

/// `coreheap_stats_json(fd)`: coreheap's statistics as one JSON object on `fd` (the
/// process heap's; see `coreheap::write_json`), without allocating. Runs with thread
/// cancellation disabled.
pub fn stats_json(fd: c_int) {
    crate::os::without_cancellation(|| HEAP.write_json(fd));
}

/// `malloc_stats(3)` in glibc's format on stderr (tools parse it): per arena
/// `Arena N:` with its `system bytes` (mapped for the arena) and `in use bytes`, then
/// `Total (incl. mmap):` with both summed, huge blocks included, and the `max mmap regions`
/// / `max mmap bytes` lines (the huge blocks live now: no high-water mark of them is kept;
/// `coreheap::stats().peak_in_use` is the peak of all bytes in use).
/// coreheap's own report is `COREHEAP_STATS=1`'s and the runner's (`write_report`). Runs
/// with thread cancellation disabled: a pending cancellation does not cut the report short.
pub fn malloc_stats() {
    crate::os::without_cancellation(|| {
        let (mut system, mut in_use) = (0u64, 0u64);
        let (allocs, frees, huge_in_use, huge_mapped) = each_arena(|a| {
            let mut l = Line::new();
            let (sys, used) = (a.pages.mapped as u64, a.in_use() as u64);
            l.str(b"Arena ").num(a.index as u64).str(b":\n");
            l.str(b"system bytes     = ").num_w(sys, 10).str(b"\n");
            l.str(b"in use bytes     = ").num_w(used, 10).str(b"\n");
            l.write(2);
            system += sys;
            in_use += used;
        });
        let mut l = Line::new();
        l.str(b"Total (incl. mmap):\n");
        l.str(b"system bytes     = ")
            .num_w(system + huge_mapped as u64, 10)
            .str(b"\n");
        l.str(b"in use bytes     = ")
            .num_w(in_use + huge_in_use as u64, 10)
            .str(b"\n");
        l.str(b"max mmap regions = ")
            .num_w(allocs - frees, 10)
            .str(b"\n");
        l.str(b"max mmap bytes   = ")
            .num_w(huge_mapped as u64, 10)
            .str(b"\n");
        l.write(2);
    })
}

/// Initialises the heap now rather than at the first allocation. The preload library calls
/// this from its constructor so that `COREHEAP_STATS=1` reports even for a program that never
/// allocates; the allocator itself needs no constructor.
pub fn init() {
    HEAP.arena_count();
    shm_heap();
    // The C library's `fork`, looked up now rather than in a `fork` (`c_api::fork`).
    crate::os::process::next_fork();
}

/// `struct mallinfo2` of glibc 2.33 and later, with glibc's meanings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MallInfo2 {
    /// Bytes mapped for arenas (glibc: non-mmapped space from the system).
    pub arena: usize,
    /// Free chunks (glibc): coreheap counts no free runs, so one per arena with memory,
    /// like glibc's top chunk.
    pub ordblks: usize,
    /// Free fastbin blocks (glibc): 0.
    pub smblks: usize,
    /// Directly mapped blocks in use (huge blocks).
    pub hblks: usize,
    /// Bytes mapped for directly mapped blocks.
    pub hblkhd: usize,
    /// Always 0 (as in glibc).
    pub usmblks: usize,
    /// Bytes in free fastbin blocks (glibc): 0.
    pub fsmblks: usize,
    /// Bytes in use in arenas (glibc: huge blocks are in `hblkhd`, not here).
    pub uordblks: usize,
    /// Bytes free in arenas (`arena - uordblks`).
    pub fordblks: usize,
    /// Bytes that `malloc_trim` could release (dirty free pages).
    pub keepcost: usize,
}

/// `mallinfo2(3)`.
pub fn mallinfo2() -> MallInfo2 {
    let mut m = MallInfo2::default();
    let (allocs, frees, _, mapped) = each_arena(|a| {
        m.arena += a.pages.mapped;
        m.ordblks += (a.pages.mapped > 0) as usize;
        m.uordblks += a.in_use();
        m.keepcost += a.dirty_bytes;
    });
    m.hblks = (allocs - frees) as usize;
    m.hblkhd = mapped;
    m.fordblks = m.arena.saturating_sub(m.uordblks);
    m
}

/// The legacy `struct mallinfo`: [`MallInfo2`]'s fields as `int`, in the same order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MallInfo {
    pub arena: c_int,
    pub ordblks: c_int,
    pub smblks: c_int,
    pub hblks: c_int,
    pub hblkhd: c_int,
    pub usmblks: c_int,
    pub fsmblks: c_int,
    pub uordblks: c_int,
    pub fordblks: c_int,
    pub keepcost: c_int,
}

/// `mallinfo(3)`: [`mallinfo2`] with each field converted to `int` as glibc does (the low
/// 32 bits: values of 2 GiB and more wrap).
pub fn mallinfo() -> MallInfo {
    // SAFETY: `MallInfo2` is a `repr(C)` struct of ten `usize` fields, so it has the layout
    // of `[usize; 10]`; likewise `MallInfo` of `[c_int; 10]`, in the same field order.
    unsafe {
        let words: [usize; 10] = core::mem::transmute(mallinfo2());
        core::mem::transmute::<[c_int; 10], MallInfo>(words.map(|w| w as c_int))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_cases_follow_glibc() {
        let a = malloc(0);
        let b = malloc(0);
        assert!(!a.is_null() && !b.is_null() && a != b);
        assert_eq!(a as usize % MIN_ALIGN, 0);
        set_errno(0);
        assert!(malloc(usize::MAX).is_null());
        assert_eq!(errno(), libc::ENOMEM);
        set_errno(0);
        assert!(calloc(usize::MAX / 2, 3).is_null());
        assert_eq!(errno(), libc::ENOMEM);
        let mut out = core::ptr::null_mut();
        // SAFETY: `out` is a valid place for a pointer; blocks below are ours.
        unsafe {
            assert_eq!(posix_memalign(&mut out, 24, 8), libc::EINVAL);
            assert_eq!(posix_memalign(&mut out, 4, 8), libc::EINVAL);
            assert_eq!(posix_memalign(&mut out, 4096, 100), 0);
            assert_eq!(out as usize % 4096, 0);
            free(out);
            set_errno(1234);
            free(a);
            free(core::ptr::null_mut());
            assert_eq!(errno(), 1234);
            assert!(realloc(b, 0).is_null());
            let c = calloc(10, 100);
            assert!(core::slice::from_raw_parts(c.cast::<u8>(), 1000)
                .iter()
                .all(|&x| x == 0));
            assert!(malloc_usable_size(c) >= 1000);
            set_errno(0);
            assert!(realloc(c, usize::MAX).is_null());
            assert_eq!(errno(), libc::ENOMEM);
            free(c);
            assert!(aligned_alloc(24, 48).is_null());
            let m = memalign(24, 48);
            assert_eq!(m as usize % 32, 0);
            free(m);
            let v = pvalloc(0);
            assert_eq!(v as usize % PAGE, 0);
            assert!(malloc_usable_size(v) >= PAGE);
            free(v);
        }
        assert!(mallinfo2().uordblks > 0 || mallinfo2().arena > 0);
        let (m, m2) = (mallinfo(), mallinfo2());
        assert_eq!(m.arena as usize, m2.arena);
        assert_eq!(m.usmblks, 0);
    }
}
