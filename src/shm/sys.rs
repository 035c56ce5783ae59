//! The system calls of shared heaps: files, shared mappings, hole punching. Nothing here
//! allocates, so the preload library can open a heap from inside `malloc`.

use core::ptr;

use libc::c_char;

/// The calling thread's `errno`.
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Creates `path` exclusively (fails with `EEXIST` if it exists), read-write, with `mode`.
/// Returns the descriptor or `Err(errno)`.
///
/// pre: `path` is NUL-terminated.
pub fn create_excl(path: *const c_char, mode: u32) -> Result<i32, i32> {
    // SAFETY: `path` is a NUL-terminated string (precondition).
    let fd = unsafe {
        libc::open(
            path,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

/// Creates an unnamed file (`O_TMPFILE`) in the directory of `path`, read-write, with
/// `mode`; it appears under a name only when [`link`]ed. `Err(errno)`, `EOPNOTSUPP` where the
/// file system cannot.
///
/// pre: `path` is NUL-terminated, at most `buf`'s length.
pub fn create_unnamed(path: &[u8], mode: u32) -> Result<i32, i32> {
    let mut dir = [0u8; 257];
    let name = &path[..path.len() - 1];
    match name.iter().rposition(|&c| c == b'/') {
        Some(0) => dir[0] = b'/',
        Some(i) if i < dir.len() - 1 => dir[..i].copy_from_slice(&name[..i]),
        Some(_) => return Err(libc::ENAMETOOLONG),
        None => dir[0] = b'.',
    }
    // SAFETY: `dir` is NUL-terminated (zero-filled past the copied bytes).
    let fd = unsafe {
        libc::open(
            dir.as_ptr().cast(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

/// Gives the unnamed file `fd` the name `path`; `Err(EEXIST)` if the name is taken.
///
/// pre: `path` is NUL-terminated.
pub fn link(fd: i32, path: *const c_char) -> Result<(), i32> {
    let mut proc_path = crate::diag::Line::new();
    proc_path.str(b"/proc/self/fd/").num(fd as u64).str(b"\0");
    // SAFETY: both paths are NUL-terminated.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_bytes().as_ptr().cast(),
            libc::AT_FDCWD,
            path,
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        Err(errno())
    } else {
        Ok(())
    }
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
        sleep_us(500);
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

/// Opens an existing `path` read-write or read-only.
///
/// pre: `path` is NUL-terminated.
pub fn open(path: *const c_char, writable: bool) -> Result<i32, i32> {
    let flags = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    // SAFETY: `path` is a NUL-terminated string (precondition).
    let fd = unsafe { libc::open(path, flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
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
    if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor we own.
    unsafe { libc::close(fd) };
}

/// pre: `path` is NUL-terminated.
pub fn unlink(path: *const c_char) -> Result<(), i32> {
    // SAFETY: `path` is a NUL-terminated string (precondition).
    if unsafe { libc::unlink(path) } != 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Linux's `MAP_FIXED_NOREPLACE` (4.17): map exactly there, or fail with `EEXIST`.
const MAP_FIXED_NOREPLACE: i32 = 0x10_0000;

/// Maps the first `len` bytes of the file at `fd` shared. With `at`, exactly at that address
/// (`Err(EEXIST)` if anything is mapped there); otherwise at an address aligned to `align`.
pub fn map_shared(
    fd: i32,
    len: usize,
    writable: bool,
    at: Option<usize>,
    align: usize,
) -> Result<*mut u8, i32> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    if let Some(addr) = at {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                prot,
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
    let start = crate::os::reserve_aligned(len, align);
    if start.is_null() {
        return Err(libc::ENOMEM);
    }
    // SAFETY: MAP_FIXED replaces only our own reservation at `start`.
    let p = unsafe {
        libc::mmap(
            start.cast(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = errno();
        unmap(start, len);
        return Err(e);
    }
    Ok(p.cast())
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

/// pre: `[p, p + len)` is a mapping of this module that nothing refers to any more.
pub fn unmap(p: *mut u8, len: usize) {
    crate::os::unmap(p, len)
}

/// Gives the pages of `[p, p + len)` back to the file system: they read zero afterwards, in
/// every process. Returns false (nothing changed) where the file system cannot punch holes.
///
/// pre: the range lies in a writable shared mapping of this module and holds no live data.
pub fn punch(p: *mut u8, len: usize) -> bool {
    // SAFETY: by the precondition nothing live is in the range; MADV_REMOVE frees the
    // backing store of a shared mapping (tmpfs, and file systems with hole punching).
    unsafe { libc::madvise(p.cast(), len, libc::MADV_REMOVE) == 0 }
}

/// Whether process `pid` may still run: it exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid as i32, 0) } != 0 && errno() == libc::ESRCH {
        return false;
    }
    // A killed process whose parent has not waited for it yet still answers kill(): look at
    // its state in /proc/PID/stat ("PID (comm) S ..."), without allocating.
    let mut path = crate::diag::Line::new();
    path.str(b"/proc/").num(pid as u64).str(b"/stat\0");
    let Ok(fd) = open(path.as_bytes().as_ptr().cast(), false) else {
        return true;
    };
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length.
    let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    close(fd);
    if got <= 0 {
        return true;
    }
    let s = &buf[..got as usize];
    match s.iter().rposition(|&c| c == b')') {
        Some(i) if i + 2 < s.len() => !matches!(s[i + 2], b'Z' | b'X'),
        _ => true,
    }
}

pub fn pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// Sleeps about `us` microseconds.
pub fn sleep_us(us: u64) {
    let ts = libc::timespec {
        tv_sec: (us / 1_000_000) as libc::time_t,
        tv_nsec: ((us % 1_000_000) * 1000) as libc::c_long,
    };
    // SAFETY: `ts` is valid; the remainder is not wanted.
    unsafe { libc::nanosleep(&ts, ptr::null_mut()) };
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
    // SAFETY: a fresh private anonymous mapping anywhere.
    let tmp = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if tmp == libc::MAP_FAILED {
        return false;
    }
    let tmp = tmp as *mut u8;
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
    if !crate::os::move_mapping(tmp, len, len, p) {
        unmap(tmp, len);
        return false;
    }
    true
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

/// Writes one byte to `fd` (ignoring errors).
pub fn signal(fd: i32) {
    // SAFETY: one byte from a live local.
    unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
}

/// Waits for one byte on `fd`, or its end (the writer closed or died).
pub fn await_signal(fd: i32) {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: `b` is writable for one byte.
        let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        if r >= 0 || errno() != libc::EINTR {
            return;
        }
    }
}

/// Allocates the file's space behind `[p, p + len)` now (`MADV_POPULATE_WRITE`, Linux 5.14).
/// Returns false if the file system has no room; true also where the kernel lacks the call
/// (the pages are then allocated at their first touch, as before).
///
/// pre: the range lies in a writable shared mapping of this module and holds no live data.
pub fn populate(p: *mut u8, len: usize) -> bool {
    const MADV_POPULATE_WRITE: i32 = 23;
    // SAFETY: populating pages of our own mapping writes nothing visible (they read zero).
    let r = unsafe { libc::madvise(p.cast(), len, MADV_POPULATE_WRITE) };
    r == 0 || errno() == libc::EINVAL
}
