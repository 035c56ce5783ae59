//! Messages and aborts: `write(2)` without allocating, `abort`, and glibc's stdio list lock
//! for the fork handlers.

/// Writes all of `bytes` to file descriptor `fd`, ignoring errors. Never allocates;
/// async-signal-safe.
pub fn write_all(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid readable slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// Writes `msg` to stderr and aborts the process. Used for heap corruption and invalid frees.
/// Async-signal-safe.
#[cold]
pub fn fatal(msg: &[u8]) -> ! {
    write_all(2, msg);
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

#[cfg(target_env = "gnu")]
extern "C" {
    fn _IO_list_lock();
    fn _IO_list_unlock();
    fn _IO_list_resetlock();
}

/// Takes glibc's lock of the list of stdio streams. `fork` takes it after the prepare
/// handlers and then glibc's own malloc locks; an allocator that locks its arenas in a
/// prepare handler must take it first, or a thread in `fflush(NULL)` (holding the list lock,
/// waiting for a stream lock) and a thread in `getline` (holding the stream lock, waiting for
/// an arena) deadlock the fork. The lock is recursive, so fork's own take succeeds.
pub fn stdio_list_lock() {
    // SAFETY: exported by glibc (GLIBC_2.2.5) for exactly this use; no preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        _IO_list_lock()
    };
}

/// Releases what [`stdio_list_lock`] took (in the parent after `fork`).
///
/// pre: the calling thread took the lock with [`stdio_list_lock`].
pub fn stdio_list_unlock() {
    // SAFETY: the calling thread took the lock in the prepare handler.
    #[cfg(target_env = "gnu")]
    unsafe {
        _IO_list_unlock()
    };
}

/// Re-initialises the stdio list lock (in the child after `fork`).
///
/// pre: the process has one thread (a fork child, in its handler).
pub fn stdio_list_reset() {
    // SAFETY: the child has one thread; resetting the lock it inherited is what glibc's own
    // fork does.
    #[cfg(target_env = "gnu")]
    unsafe {
        _IO_list_resetlock()
    };
}

/// Writes `bytes` to the C stream `fp` (`fwrite`); false if the stream took less.
///
/// pre: `fp` is an open `FILE *` of this process. The C library may allocate a buffer for
/// the stream on its first use: callers hold no allocator lock.
pub fn write_stream(fp: *mut libc::FILE, bytes: &[u8]) -> bool {
    // SAFETY: `fp` is an open stream (precondition); `bytes` is readable for its length.
    unsafe { libc::fwrite(bytes.as_ptr().cast(), 1, bytes.len(), fp) == bytes.len() }
}
