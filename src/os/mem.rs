//! Anonymous memory: mapping, alignment, unmapping, purging, moving and resizing mappings,
//! access protection, and the page size the allocator assumes.

use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The page size this build assumes. Checked against the kernel's at start-up by
/// [`page_size_ok`]; on a kernel with larger pages the purge calls become no-ops.
pub const OS_PAGE: usize = 4096;

/// Maps `len` bytes of fresh, zeroed, read-write anonymous memory aligned to `align` (a power
/// of two, at least [`OS_PAGE`]). Returns null on failure.
///
/// Reserves no more address space than `len` whenever it can, so that a process near its
/// `RLIMIT_AS` can still use what the limit leaves: first exactly at an aligned address just
/// below the last such mapping, or where it was (the kernel hands out addresses top-down, so that range is
/// usually free), then exactly wherever the kernel puts it (if that happens to be aligned),
/// then `len + align` bytes trimmed to the aligned part, and last exactly at aligned
/// addresses next to where the kernel would put it. The exact tries use
/// `MAP_FIXED_NOREPLACE`, which never replaces a mapping.
///
/// pre: `len` is a multiple of `OS_PAGE`.
pub fn map_aligned(len: usize, align: usize) -> *mut u8 {
    debug_assert!(align.is_power_of_two() && align >= OS_PAGE);
    let below = LAST.load(Ordering::Relaxed);
    if below != usize::MAX && below > len {
        let p = map_exact_at((below - len) & !(align - 1), len);
        if !p.is_null() {
            return noted(p);
        }
    }
    let p = map_anon(len);
    if p.is_null() || p as usize & (align - 1) == 0 {
        return noted(p);
    }
    unmap(p, len);
    if let Some(over) = len.checked_add(align - OS_PAGE) {
        let q = trim_to_aligned(map_anon(over), over, len, align);
        if !q.is_null() {
            return noted(q);
        }
    }
    // Not room for the over-sized mapping: the aligned addresses around the free range the
    // kernel found for `len` bytes.
    let down = p as usize & !(align - 1);
    [down.wrapping_add(align), down, down.wrapping_sub(align)]
        .into_iter()
        .filter(|&a| a != 0 && a.checked_add(len).is_some())
        .map(|a| map_exact_at(a, len))
        .find(|q| !q.is_null())
        .map_or(ptr::null_mut(), noted)
}

/// [`map_aligned`], with the whole mapping below `end` (a multiple of `align`): the caller
/// can record only such addresses. Null on failure.
///
/// The kernel hands out addresses above 2^47 (x86_64 with 5-level paging) or 2^48 (arm64 with
/// 52-bit addresses) only to a caller whose hint lies above them, and `map_aligned`'s first
/// hint is just below its last mapping: so a mapping above `end` comes only after one above
/// it was kept, or from a kernel with another policy. It is unmapped, and the request made
/// again with a hint just below `end` (where the kernel's default window ends on both), and
/// taken only if it lies below `end`.
pub fn map_aligned_below(len: usize, align: usize, end: usize) -> *mut u8 {
    let p = map_aligned(len, align);
    if p.is_null() || below(p, len, end) {
        return p;
    }
    unmap(p, len);
    let Some(over) = len.checked_add(align - OS_PAGE) else {
        return ptr::null_mut();
    };
    let Some(hint) = end.checked_sub(over) else {
        return ptr::null_mut();
    };
    let raw = mmap_anon_at(hint, over, libc::PROT_READ | libc::PROT_WRITE, 0);
    if !raw.is_null() && !below(raw, over, end) {
        unmap(raw, over);
        return ptr::null_mut();
    }
    noted(trim_to_aligned(raw, over, len, align))
}

/// Whether `[p, p + len)` lies below `end`.
fn below(p: *mut u8, len: usize, end: usize) -> bool {
    (p as usize).checked_add(len).is_some_and(|e| e <= end)
}

/// The start of the last mapping of [`map_aligned`] (`usize::MAX`: none yet), or the end of
/// it once it was unmapped: the next one is tried just below it (so a span freed and asked
/// for again takes the same addresses instead of drifting down).
static LAST: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Records `p` (null: nothing) as a start of a [`map_aligned`] mapping and returns it.
fn noted(p: *mut u8) -> *mut u8 {
    if !p.is_null() {
        LAST.store(p as usize, Ordering::Relaxed);
    }
    p
}

/// Maps `len` bytes of anonymous read-write memory exactly at `addr` if nothing is mapped in
/// `[addr, addr + len)`; null otherwise.
fn map_exact_at(addr: usize, len: usize) -> *mut u8 {
    // SAFETY: MAP_FIXED_NOREPLACE fails rather than replace an existing mapping; a kernel
    // older than 4.17 takes it as a hint, and a mapping elsewhere is unmapped below.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    if p as usize != addr {
        unmap(p.cast(), len);
        return ptr::null_mut();
    }
    p.cast()
}

/// Tests: [`map_exact_at`], `None` where it fails.
#[cfg(test)]
pub fn map_exact_for_test(addr: usize, len: usize) -> Option<*mut u8> {
    let p = map_exact_at(addr, len);
    (!p.is_null()).then_some(p)
}

/// Tests: records `p` as [`map_aligned`]'s last mapping.
#[cfg(test)]
pub fn note_for_test(p: *mut u8) {
    noted(p);
}

/// Maps `len` bytes of anonymous read-write memory anywhere. Returns null on failure.
pub fn map_anon(len: usize) -> *mut u8 {
    mmap_anon(len, libc::PROT_READ | libc::PROT_WRITE, 0)
}

/// Maps `len` bytes of anonymous read-write memory anywhere without reserving swap for it
/// (`MAP_NORESERVE`): for a temporary copy that may be as large as a whole shared heap.
/// Returns null on failure.
pub fn map_anon_noreserve(len: usize) -> *mut u8 {
    mmap_anon(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_NORESERVE)
}

/// Reserves `len` bytes of address space with no access, aligned to `align` (a power of two,
/// at least [`OS_PAGE`]). Used as the target of [`move_mapping`] and of
/// [`crate::os::file::map_shared_fixed`]. Returns null on failure.
pub fn reserve_aligned(len: usize, align: usize) -> *mut u8 {
    let Some(over) = len.checked_add(align - OS_PAGE) else {
        return ptr::null_mut();
    };
    // PROT_NONE with MAP_NORESERVE commits nothing.
    let raw = mmap_anon(over, libc::PROT_NONE, libc::MAP_NORESERVE);
    trim_to_aligned(raw, over, len, align)
}

/// A private anonymous mapping of `len` bytes anywhere, with `prot` and the extra `flags`;
/// null on failure.
fn mmap_anon(len: usize, prot: i32, flags: i32) -> *mut u8 {
    mmap_anon_at(0, len, prot, flags)
}

/// [`mmap_anon`] with the address hint `hint` (0: none), which the kernel follows if the
/// range is free and may ignore otherwise.
fn mmap_anon_at(hint: usize, len: usize, prot: i32, flags: i32) -> *mut u8 {
    // SAFETY: an anonymous private mapping without MAP_FIXED touches no existing memory,
    // whatever the hint.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p.cast()
    }
}

/// Unmaps the parts of the `over`-byte mapping at `raw` (null: none) before and after its
/// first `align`-aligned `len` bytes, and returns their start (null if `raw` is null).
fn trim_to_aligned(raw: *mut u8, over: usize, len: usize, align: usize) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    let addr = raw as usize;
    let start = (addr + align - 1) & !(align - 1);
    let lead = start - addr;
    let trail = over - lead - len;
    if lead > 0 {
        unmap(raw, lead);
    }
    if trail > 0 {
        unmap((start + len) as *mut u8, trail);
    }
    start as *mut u8
}

/// Unmaps `[p, p + len)`.
///
/// pre: the range was mapped by this layer and nothing refers to it any more.
pub fn unmap(p: *mut u8, len: usize) {
    let _ = LAST.compare_exchange(
        p as usize,
        p as usize + len,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    // SAFETY: by the precondition the range is ours and unused; munmap of a mapped range
    // cannot affect other memory.
    unsafe {
        libc::munmap(p.cast(), len);
    }
}

/// Tells the kernel that `[p, p + len)` is no longer needed: its pages are released and read
/// back as zero. Returns false, with nothing changed, when the kernel refuses or the page size
/// is not the one the allocator assumes.
///
/// pre: the range lies in a private anonymous mapping of this layer and holds no live data.
pub fn purge(p: *mut u8, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    if !page_size_ok() {
        return false;
    }
    // SAFETY: by the precondition no live object is in the range. On success MADV_DONTNEED
    // drops the pages of this private anonymous mapping, which then read back as zero; on
    // failure (EINVAL for mlock'ed pages, EPERM under a seccomp filter) nothing changes.
    unsafe { libc::madvise(p.cast(), len, libc::MADV_DONTNEED) == 0 }
}

/// Resizes the mapping `[p, p + old)` to `new` bytes without moving it. Returns whether the
/// kernel could do so.
///
/// pre: `[p, p + old)` is one mapping of this layer.
pub fn remap_in_place(p: *mut u8, old: usize, new: usize) -> bool {
    // SAFETY: without MREMAP_MAYMOVE the mapping stays at `p`; growing only takes address
    // space that was free.
    let r = unsafe { libc::mremap(p.cast(), old, new, 0) };
    r != libc::MAP_FAILED
}

/// Moves the pages of `[p, p + old)` to `target`, resized to `new` bytes, without copying.
/// On success `[p, p + old)` is unmapped; on failure nothing changed.
///
/// pre: `[p, p + old)` is one mapping of this layer; `[target, target + new)` is a
/// reservation of [`reserve_aligned`], or a mapping of this process's (a shared heap's, see
/// [`crate::os::file::privatize`]), that nothing else uses.
pub fn move_mapping(p: *mut u8, old: usize, new: usize, target: *mut u8) -> bool {
    // SAFETY: MREMAP_FIXED replaces only what is at `target`, which is ours and unused.
    let r = unsafe {
        libc::mremap(
            p.cast(),
            old,
            new,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.cast::<libc::c_void>(),
        )
    };
    r != libc::MAP_FAILED
}

/// What a mapping's pages may be used for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(test), allow(dead_code))] // the tests' file-backed page sources
pub enum Access {
    /// Any access faults.
    None,
    Read,
    ReadWrite,
}

impl Access {
    /// The `PROT_*` bits.
    pub(crate) fn prot(self) -> i32 {
        match self {
            Access::None => libc::PROT_NONE,
            Access::Read => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// Sets the access of the pages of `[p, p + len)` (`mprotect`). Returns whether the kernel
/// did.
///
/// pre: the range lies in mappings of this layer; with less access than now, nothing will
/// touch it in a way it forbids (the caller expects the fault otherwise).
#[cfg_attr(not(test), allow(dead_code))] // the tests' file-backed page sources
pub fn protect(p: *mut u8, len: usize, access: Access) -> bool {
    // SAFETY: the range is the caller's own mapping (precondition); changing its protection
    // affects no other memory.
    unsafe { libc::mprotect(p.cast(), len, access.prot()) == 0 }
}

/// Whether the kernel's page size is [`OS_PAGE`].
pub fn page_size_ok() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 ok, 2 other
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: sysconf has no preconditions.
            let ok = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } == OS_PAGE as libc::c_long;
            STATE.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
    }
}
