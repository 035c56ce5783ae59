//! Files, descriptors and shared mappings: what shared heaps and the tests' file-backed page
//! sources need. Paths are NUL-terminated C strings; failures return the `errno` value.

use core::ffi::CStr;
use core::ptr;

use libc::c_char;

use super::errno::errno;
use super::mem::{reserve_aligned, unmap, Access};

/// `Err(errno)` if `r` is negative, else `Ok(r)`.
fn check(r: i32) -> Result<i32, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// Creates `path` exclusively (fails with `EEXIST` if it exists), read-write, with `mode`.
/// Returns the descriptor or `Err(errno)`.
///
/// pre: `path` is NUL-terminated.
pub fn create_excl(path: *const c_char, mode: u32) -> Result<i32, i32> {
    // SAFETY: `path` is a NUL-terminated string (precondition).
    check(unsafe {
        libc::open(
            path,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })
}

/// Creates an unnamed file (`O_TMPFILE`) in the directory of `path`, read-write, with
/// `mode`; it appears under a name only when [`link`]ed. `Err(errno)`, `EOPNOTSUPP` where the
/// file system cannot, `ENAMETOOLONG` for a directory name over 256 bytes.
///
/// pre: `path` ends with its NUL byte.
pub fn create_unnamed(path: &[u8], mode: u32) -> Result<i32, i32> {
    let mut dir = [0u8; 257];
    let name = &path[..path.len().saturating_sub(1)];
    match name.iter().rposition(|&c| c == b'/') {
        Some(0) => dir[0] = b'/',
        Some(i) if i < dir.len() - 1 => dir[..i].copy_from_slice(&name[..i]),
        Some(_) => return Err(libc::ENAMETOOLONG),
        None => dir[0] = b'.',
    }
    // SAFETY: `dir` is NUL-terminated (zero-filled past the copied bytes).
    check(unsafe {
        libc::open(
            dir.as_ptr().cast(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })
}

/// Creates an anonymous memory file (`memfd_create`, close-on-exec) of length 0; `name`
/// only shows in `/proc/PID/fd`.
#[cfg_attr(not(test), allow(dead_code))] // the tests' file-backed page sources
pub fn memfd(name: &CStr) -> Result<i32, i32> {
    // SAFETY: `name` is NUL-terminated by its type.
    check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })
}

/// `prefix`, `n` in decimal and `suffix` (which ends with its NUL byte) in `buf`; `None` if
/// they do not fit.
pub(super) fn path_with_number<'b>(
    buf: &'b mut [u8; 64],
    prefix: &[u8],
    n: u64,
    suffix: &[u8],
) -> Option<&'b [u8]> {
    let mut digits = [0u8; 20];
    let digits = crate::diag::decimal(n, &mut digits);
    let mut len = 0;
    for part in [prefix, digits, suffix] {
        buf.get_mut(len..len + part.len())?.copy_from_slice(part);
        len += part.len();
    }
    Some(&buf[..len])
}

/// Gives the unnamed file `fd` the name `path`; `Err(EEXIST)` if the name is taken.
///
/// pre: `path` is NUL-terminated.
pub fn link(fd: i32, path: *const c_char) -> Result<(), i32> {
    let mut buf = [0u8; 64];
    let from = path_with_number(&mut buf, b"/proc/self/fd/", fd as u64, b"\0")
        .ok_or(libc::ENAMETOOLONG)?;
    // SAFETY: both paths are NUL-terminated.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr().cast(),
            libc::AT_FDCWD,
            path,
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    check(r).map(drop)
}

/// Takes the `flock` lock of `fd` (shared or exclusive), waiting at most `limit_us`.
/// `Err(ETIMEDOUT)` after the wait, `Err(errno)` on any other failure. The kernel drops the
/// lock when the last descriptor of the open file is closed (its holder died).
pub fn flock(fd: i32, exclusive: bool, limit_us: u64) -> Result<(), i32> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    let mut waited = 0;
    loop {
        // SAFETY: flock on our descriptor.
        if unsafe { libc::flock(fd, op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = errno();
        if e != libc::EWOULDBLOCK && e != libc::EINTR {
            return Err(e);
        }
        if waited >= limit_us {
            return Err(libc::ETIMEDOUT);
        }
        super::time::sleep_us(500);
        waited += 500;
    }
}

/// Whether `fd` is still the file named `path` (not removed, nor replaced by another file
/// of that name).
///
/// pre: `path` is NUL-terminated.
pub fn still_named(fd: i32, path: *const c_char) -> bool {
    // SAFETY: `a` and `b` are plain data that the calls fill; `path` is NUL-terminated.
    unsafe {
        let mut a: libc::stat = core::mem::zeroed();
        let mut b: libc::stat = core::mem::zeroed();
        libc::fstat(fd, &mut a) == 0
            && libc::stat(path, &mut b) == 0
            && a.st_nlink > 0
            && a.st_dev == b.st_dev
            && a.st_ino == b.st_ino
    }
}

/// Releases the `flock` lock of `fd`.
pub fn unlock(fd: i32) {
    // SAFETY: flock on our descriptor.
    unsafe { libc::flock(fd, libc::LOCK_UN) };
}

/// Opens an existing `path` read-write or read-only (close-on-exec).
///
/// pre: `path` is NUL-terminated.
pub fn open(path: *const c_char, writable: bool) -> Result<i32, i32> {
    let flags = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    // SAFETY: `path` is a NUL-terminated string (precondition).
    check(unsafe { libc::open(path, flags | libc::O_CLOEXEC) })
}

/// Reads the start of the small file `path` (a `/proc` or `/sys` file) into `buf`; the
/// number of bytes read, `None` if it cannot be opened or read.
pub fn read_small(path: &CStr, buf: &mut [u8]) -> Option<usize> {
    let fd = open(path.as_ptr(), false).ok()?;
    // SAFETY: `buf` is writable for its length; `fd` is ours and closed right after.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    close(fd);
    (n > 0).then_some(n as usize)
}

/// The length of the file open at `fd`.
pub fn file_size(fd: i32) -> Result<u64, i32> {
    // SAFETY: `st` is plain data that fstat fills.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(errno());
        }
        Ok(st.st_size as u64)
    }
}

/// Sets the length of the file at `fd` (new bytes read zero and take no space).
pub fn set_size(fd: i32, len: u64) -> Result<(), i32> {
    // SAFETY: ftruncate on our own descriptor.
    check(unsafe { libc::ftruncate(fd, len as libc::off_t) }).map(drop)
}

/// Gives the file's space in `[off, off + len)` back to the file system
/// (`FALLOC_FL_PUNCH_HOLE`, keeping the length): it reads zero afterwards, through every
/// mapping. Returns false (nothing changed) where the file system cannot punch holes.
///
/// pre: no live data lies in that part of the file.
#[cfg_attr(not(test), allow(dead_code))] // the tests' file-backed page sources
pub fn punch_hole(fd: i32, off: u64, len: u64) -> bool {
    // SAFETY: a hole punched in the caller's own file, where nothing live lies (precondition).
    unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        ) == 0
    }
}

/// Closes a descriptor of the caller's.
pub fn close(fd: i32) {
    // SAFETY: closing a descriptor we own.
    unsafe { libc::close(fd) };
}

/// A duplicate of `fd` numbered `min` or above, close-on-exec (`F_DUPFD_CLOEXEC`): a high
/// number keeps out of the way of programs that pick small ones. -1 on failure (errno set).
pub fn dup_fd_high(fd: i32, min: i32) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor.
    unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) }
}

/// Removes the name `path`.
///
/// pre: `path` is NUL-terminated.
pub fn unlink(path: *const c_char) -> Result<(), i32> {
    // SAFETY: `path` is a NUL-terminated string (precondition).
    check(unsafe { libc::unlink(path) }).map(drop)
}

/// Linux's `MAP_FIXED_NOREPLACE` (4.17): map exactly there, or fail with `EEXIST`.
const MAP_FIXED_NOREPLACE: i32 = 0x10_0000;

/// `PROT_READ`, with `PROT_WRITE` if `writable`.
fn prot(writable: bool) -> i32 {
    if writable {
        Access::ReadWrite.prot()
    } else {
        Access::Read.prot()
    }
}

/// Maps the first `len` bytes of the file at `fd` shared. With `at`, exactly at that address
/// (`Err(EEXIST)` if anything is mapped there); otherwise at an address aligned to `align`
/// (a power of two, at least a page).
pub fn map_shared(
    fd: i32,
    len: usize,
    writable: bool,
    at: Option<usize>,
    align: usize,
) -> Result<*mut u8, i32> {
    if let Some(addr) = at {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                prot(writable),
                libc::MAP_SHARED | MAP_FIXED_NOREPLACE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        if p as usize != addr {
            // A kernel older than 4.17 takes the flag as a hint.
            unmap(p.cast(), len);
            return Err(libc::EEXIST);
        }
        return Ok(p.cast());
    }
    let start = reserve_aligned(len, align);
    if start.is_null() {
        return Err(libc::ENOMEM);
    }
    // SAFETY: `start` is our fresh reservation of `len` bytes.
    match unsafe { map_shared_fixed(fd, len, writable, start) } {
        Ok(p) => Ok(p),
        Err(e) => {
            unmap(start, len);
            Err(e)
        }
    }
}

/// Maps the first `len` bytes of the file at `fd` shared at `at`, replacing what is there
/// (`MAP_FIXED`).
///
/// # Safety
/// `[at, at + len)` is the caller's own mapping or reservation (see
/// [`reserve_aligned`]) that nothing refers to.
pub unsafe fn map_shared_fixed(
    fd: i32,
    len: usize,
    writable: bool,
    at: *mut u8,
) -> Result<*mut u8, i32> {
    // SAFETY: MAP_FIXED replaces only the caller's own unused range (contract).
    let p = unsafe {
        libc::mmap(
            at.cast(),
            len,
            prot(writable),
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(p.cast())
    }
}

/// Maps the first `len` bytes of `fd` read-only anywhere (to read a header).
pub fn map_peek(fd: i32, len: usize) -> Result<*const u8, i32> {
    // SAFETY: a new shared read-only mapping anywhere touches no existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(p as *const u8)
    }
}

/// Gives the pages of `[p, p + len)` back to the file system: they read zero afterwards, in
/// every process. Returns false (nothing changed) where the file system cannot punch holes.
///
/// pre: the range lies in a writable shared mapping of this layer and holds no live data.
pub fn punch(p: *mut u8, len: usize) -> bool {
    // SAFETY: by the precondition nothing live is in the range; MADV_REMOVE frees the
    // backing store of a shared mapping (tmpfs, and file systems with hole punching).
    unsafe { libc::madvise(p.cast(), len, libc::MADV_REMOVE) == 0 }
}

/// Replaces the shared mapping `[p, p + len)` of the file `fd` by a private copy of its
/// contents at the same address (for a fork child that must not share its parent's heap).
/// Copies the file's data ranges (`SEEK_DATA`/`SEEK_HOLE`: holes read zero and need no
/// copy; swapped-out pages are data, unlike what `mincore` would say); everything where the
/// file system cannot tell. Returns false, with the shared mapping in place, if memory for
/// the copy cannot be had.
///
/// pre: `[p, p + len)` maps `fd` from offset 0, page-aligned, and no other thread of this
/// process uses it.
pub fn privatize(p: *mut u8, len: usize, fd: i32) -> bool {
    let tmp = super::mem::map_anon_noreserve(len);
    if tmp.is_null() {
        return false;
    }
    let mut off = 0usize;
    while off < len {
        // SAFETY: lseek on our descriptor.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        let (start, end) = if data < 0 {
            if errno() == libc::ENXIO {
                break; // no data after `off`
            }
            (off, len) // SEEK_DATA unsupported: copy the rest
        } else {
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 {
                len
            } else {
                (hole as usize).min(len)
            };
            ((data as usize).min(len), end)
        };
        if start < end {
            // SAFETY: both ranges lie in mappings of `len` bytes and are distinct.
            unsafe { ptr::copy_nonoverlapping(p.add(start), tmp.add(start), end - start) };
        }
        off = end.max(off + 1);
    }
    // Moves our private copy over our shared mapping (MREMAP_FIXED unmaps it).
    if !super::mem::move_mapping(tmp, len, len, p) {
        unmap(tmp, len);
        return false;
    }
    true
}

/// Allocates the file's space behind `[p, p + len)` now (`MADV_POPULATE_WRITE`, Linux 5.14).
/// Returns false if the file system has no room; true also where the kernel lacks the call
/// (the pages are then allocated at their first touch, as before).
///
/// pre: the range lies in a writable shared mapping of this layer and holds no live data.
pub fn populate(p: *mut u8, len: usize) -> bool {
    const MADV_POPULATE_WRITE: i32 = 23;
    // SAFETY: populating pages of our own mapping writes nothing visible (they read zero).
    let r = unsafe { libc::madvise(p.cast(), len, MADV_POPULATE_WRITE) };
    r == 0 || errno() == libc::EINVAL
}

/// A pipe whose ends are closed on exec: (read end, write end).
pub fn pipe() -> Option<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        Some((fds[0], fds[1]))
    } else {
        None
    }
}

/// Writes one byte to `fd` (ignoring errors). A raw system call: not a cancellation point
/// (it runs inside `fork`, which is none).
pub fn signal(fd: i32) {
    let b = [1u8];
    loop {
        // SAFETY: `b` is readable for one byte.
        let r = unsafe { libc::syscall(libc::SYS_write, fd, b.as_ptr(), 1usize) };
        if r >= 0 || errno() != libc::EINTR {
            return;
        }
    }
}

/// Waits for one byte on `fd`, or its end (the writer closed or died). A raw system call:
/// not a cancellation point (it runs inside `fork`, which is none).
pub fn await_signal(fd: i32) {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: `b` is writable for one byte.
        let r = unsafe { libc::syscall(libc::SYS_read, fd, b.as_mut_ptr(), 1usize) };
        if r >= 0 || errno() != libc::EINTR {
            return;
        }
    }
}

/// Closes `fd` with a raw system call: not a cancellation point, unlike `close`.
pub fn close_nocancel(fd: i32) {
    // SAFETY: closing a descriptor we own.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_paths() {
        let mut buf = [0u8; 64];
        assert_eq!(
            path_with_number(&mut buf, b"/proc/", 1234, b"/stat\0"),
            Some(&b"/proc/1234/stat\0"[..])
        );
        assert_eq!(
            path_with_number(&mut buf, b"/x/", 0, b"\0"),
            Some(&b"/x/0\0"[..])
        );
        assert_eq!(path_with_number(&mut buf, &[b'a'; 60], 12345, b"\0"), None);
    }

    #[test]
    fn memfd_maps_shared_and_punches() {
        let fd = memfd(c"coreheap-os-test").unwrap();
        let len = 4 * super::super::mem::OS_PAGE;
        set_size(fd, len as u64).unwrap();
        assert_eq!(file_size(fd), Ok(len as u64));
        let a = map_shared(fd, len, true, None, 2 * len).unwrap();
        assert_eq!(a as usize % (2 * len), 0);
        let r = reserve_aligned(len, super::super::mem::OS_PAGE);
        // SAFETY: `r` is our own fresh reservation.
        let b = unsafe { map_shared_fixed(fd, len, true, r) }.unwrap();
        assert_eq!(b, r);
        // SAFETY: both views map the file's `len` bytes.
        unsafe {
            a.add(100).write(7);
            assert_eq!(b.add(100).read(), 7);
        }
        assert!(punch_hole(fd, 0, len as u64));
        // SAFETY: as above.
        assert_eq!(unsafe { a.add(100).read() }, 0);
        assert!(super::super::mem::protect(b, len, Access::Read));
        unmap(a, len);
        unmap(b, len);
        close(fd);
    }
}
