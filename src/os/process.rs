//! The process and its threads: ids, liveness of other processes, exit handlers.

use core::ffi::CStr;

/// A thread id for the calling thread, unique among live threads, without a system call:
/// the thread pointer, which is what glibc's `pthread_self` returns on x86_64 (read inline
/// there: the locked paths take it twice per lock round), `pthread_self` elsewhere.
#[inline(always)]
pub fn thread_id() -> usize {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    {
        let tp: usize;
        // SAFETY: on x86_64 Linux, %fs:0 is the thread control block's self pointer, set up
        // before any code of the thread runs; reading it has no side effects.
        unsafe {
            core::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp,
                options(nostack, readonly, preserves_flags));
        }
        tp
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    // SAFETY: pthread_self has no preconditions.
    unsafe {
        libc::pthread_self() as usize
    }
}

/// The calling thread's kernel thread id (`gettid`): what the kernel's robust-futex ABI
/// stores in a robust mutex's word (see [`super::sync::RobustMutex::held_by_caller`]). A
/// system call each time (glibc caches it in its thread descriptor, which is not ABI), so
/// not for fast paths. Async-signal-safe; in a fork child it is the child's own id.
pub fn kernel_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Whether `tid` is a thread of this process now (`tgkill` with no signal): for a fork
/// child's parent thread id, which a thread of the child may get again once the parent's
/// thread has ended and ids wrapped. (Only where robust locks can tell their holder.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn own_thread(tid: u32) -> bool {
    // SAFETY: signal 0 sends nothing; the call only checks that the thread exists.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid as libc::pid_t, 0) == 0 }
}

/// Whether the process has had only one thread so far (glibc's `__libc_single_threaded`,
/// which glibc 2.36 sets to false at the first `pthread_create` and never back). When true,
/// no other thread exists. Async-signal-safe. Always false with another C library (musl
/// exports no such flag): the caller then does what it does with threads.
#[inline]
pub fn single_threaded() -> bool {
    #[cfg(target_env = "gnu")]
    {
        extern "C" {
            static __libc_single_threaded: libc::c_char;
        }
        // SAFETY: glibc (2.32 and later) exports the flag as a `char`; a volatile read of it
        // has no other effect.
        unsafe { core::ptr::read_volatile(&raw const __libc_single_threaded) != 0 }
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

/// The calling process's id.
pub fn pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// The C library's `fork` (which runs the fork handlers): the next definition of `fork`
/// after the object that holds this code (`dlsym(RTLD_NEXT)`: the preload library exports a
/// `fork` of its own, [`crate::c_api::fork`], which calls this one's result). Looked up once:
/// by the preload library's constructor (`c_api::init`), so that no `fork`, from a signal
/// handler either, calls `dlsym`, which is not async-signal-safe; else at the first call.
/// Keeps `errno` across the look-up; aborts with a message if there is no such `fork`.
pub fn next_fork() -> unsafe extern "C" fn() -> libc::pid_t {
    use core::sync::atomic::{AtomicUsize, Ordering};
    /// The function's address, 0 until looked up. Relaxed: the address is the same for every
    /// thread that looks it up, and calling it needs nothing else published.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut f = NEXT.load(Ordering::Relaxed);
    if f == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only reads the loaded
        // objects' symbol tables (it may allocate, which re-enters this allocator; the callers
        // hold none of its locks, nor the shared heap's fork gate).
        f = super::errno::keeping_errno(|| unsafe {
            libc::dlsym(libc::RTLD_NEXT, c"fork".as_ptr()) as usize
        });
        if f == 0 {
            super::io::fatal(b"coreheap: no C library fork found behind the preload library's\n");
        }
        NEXT.store(f, Ordering::Relaxed);
    }
    // SAFETY: `f` is the address of the C library's `fork`, `pid_t fork(void)`.
    unsafe { core::mem::transmute::<usize, unsafe extern "C" fn() -> libc::pid_t>(f) }
}

/// Registers `f` to run at normal process exit (`atexit`: handlers run in reverse order of
/// registration). Returns whether the C library accepted it.
pub fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a plain function that lives for the whole program.
    unsafe { libc::atexit(f) == 0 }
}

/// Whether process `pid` may still run: it exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid as i32, 0) } != 0 && super::errno::errno() == libc::ESRCH {
        return false;
    }
    // A killed process whose parent has not waited for it yet still answers kill(): look at
    // its state in /proc/PID/stat ("PID (comm) S ..."), without allocating.
    let mut path = [0u8; 64];
    let Some(path) = super::file::path_with_number(&mut path, b"/proc/", pid as u64, b"/stat\0")
    else {
        return true;
    };
    let Ok(path) = CStr::from_bytes_with_nul(path) else {
        return true;
    };
    let mut buf = [0u8; 256];
    let Some(got) = super::file::read_small(path, &mut buf) else {
        return true;
    };
    let s = &buf[..got];
    match s.iter().rposition(|&c| c == b')') {
        Some(i) if i + 2 < s.len() => !matches!(s[i + 2], b'Z' | b'X'),
        _ => true,
    }
}

/// The process's resident set in bytes (`/proc/self/statm`'s second field, in pages), or
/// `None` without `/proc`. Does not allocate.
pub fn resident_bytes() -> Option<usize> {
    let mut buf = [0u8; 128];
    let n = super::file::read_small(c"/proc/self/statm", &mut buf)?;
    let pages = buf[..n]
        .split(|&b| b == b' ')
        .nth(1)?
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .try_fold(0usize, |v, &d| {
            v.checked_mul(10)?.checked_add((d - b'0') as usize)
        })?;
    Some(pages * super::mem::OS_PAGE)
}

/// The largest resident set the process has had, in bytes: `getrusage`'s `ru_maxrss`
/// (which Linux counts in KiB). The kernel's per-thread counts reach it lazily, so it may be
/// a few pages below [`resident_bytes`] read just before. `None` if `getrusage` fails.
/// Does not allocate.
pub fn peak_resident_bytes() -> Option<usize> {
    let mut u = core::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `u` is a writable `rusage`; RUSAGE_SELF needs nothing else.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: zeroed is a valid `rusage` (plain integers), filled in on success.
    let u = unsafe { u.assume_init() };
    (r == 0).then(|| (u.ru_maxrss.max(0) as usize) * 1024)
}

/// Whether the process's address space is limited (`RLIMIT_AS` below infinity, as under
/// `ulimit -v`): then address space kept mapped without use is address space the program
/// cannot have.
pub fn address_space_limited() -> bool {
    let mut r = core::mem::MaybeUninit::<libc::rlimit>::zeroed();
    // SAFETY: `r` is a writable `rlimit`.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, r.as_mut_ptr()) } == 0;
    // SAFETY: zeroed is a valid `rlimit` (plain integers), filled in on success.
    ok && unsafe { r.assume_init() }.rlim_cur != libc::RLIM_INFINITY
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_id_is_pthread_self() {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        assert_eq!(super::thread_id(), me);
        let other = std::thread::spawn(super::thread_id).join().unwrap();
        assert_ne!(other, me);
    }

    use super::*;

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(pid()));
        assert_ne!(thread_id(), 0);
    }

    #[test]
    fn resident_set_is_read() {
        let r = super::resident_bytes().expect("/proc/self/statm");
        assert!(r > 0 && r.is_multiple_of(super::super::mem::OS_PAGE), "{r}");
        // The peak: at least the kernel's high-water mark, read before it (which only grows).
        // SAFETY: `u` is a writable `rusage`; all-zero is a valid one.
        let max_rss = unsafe {
            let mut u = core::mem::zeroed::<libc::rusage>();
            assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut u), 0);
            u.ru_maxrss as usize * 1024
        };
        let peak = super::peak_resident_bytes().expect("getrusage");
        assert!(peak >= max_rss && max_rss > 0, "{peak} {max_rss}");
    }
}
