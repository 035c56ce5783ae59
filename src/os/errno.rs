//! The calling thread's `errno`.

/// The calling thread's `errno`.
#[inline]
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno` (the C interface's failures report through it).
#[inline]
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location always returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Runs `f` and puts the calling thread's errno back as it was: for the paths of `free` that
/// may make system calls (C's `free` must not change errno).
#[inline]
pub fn keeping_errno<R>(f: impl FnOnce() -> R) -> R {
    let e = errno();
    let r = f();
    set_errno(e);
    r
}
