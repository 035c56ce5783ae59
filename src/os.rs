//! The operating-system layer: the only module that calls `mmap`, `munmap`, `mremap`,
//! `madvise`, `futex`, `sched_getcpu`, `getenv` or `write`.
//!
//! # Contract
//! For every function here:
//! - it never allocates and never calls back into any allocator, so it may be called while an
//!   arena lock is held and from inside `malloc`;
//! - it never panics; failure is reported by a null pointer or `false`;
//! - addresses and lengths passed in are multiples of [`OS_PAGE`] unless a function says
//!   otherwise.
//!
//! The engine does not call this module directly for its memory: it goes through
//! [`crate::source::PageSource`], so that a shared file mapping can take the place of
//! anonymous memory.

use core::ptr;
use core::sync::atomic::AtomicU32;

/// The page size this build assumes. Checked against the kernel's at start-up by
/// [`page_size_ok`]; on a kernel with larger pages the purge calls become no-ops.
pub const OS_PAGE: usize = 4096;

/// Maps `len` bytes of fresh, zeroed, read-write anonymous memory aligned to `align` (a power
/// of two, at least [`OS_PAGE`]). Returns null on failure.
///
/// pre: `len` is a multiple of `OS_PAGE`.
pub fn map_aligned(len: usize, align: usize) -> *mut u8 {
    debug_assert!(align.is_power_of_two() && align >= OS_PAGE);
    let Some(over) = len.checked_add(align - OS_PAGE) else {
        return ptr::null_mut();
    };
    let raw = map_anon(over);
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

/// Maps `len` bytes of anonymous read-write memory anywhere. Returns null on failure.
pub fn map_anon(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
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

/// Reserves `len` bytes of address space with no access, aligned to `align`. Used as the
/// target of [`move_mapping`]. Returns null on failure.
pub fn reserve_aligned(len: usize, align: usize) -> *mut u8 {
    let Some(over) = len.checked_add(align - OS_PAGE) else {
        return ptr::null_mut();
    };
    // SAFETY: as in `map_anon`; PROT_NONE with MAP_NORESERVE commits nothing.
    let raw = unsafe {
        libc::mmap(
            ptr::null_mut(),
            over,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    let addr = raw as usize;
    let start = (addr + align - 1) & !(align - 1);
    let lead = start - addr;
    let trail = over - lead - len;
    if lead > 0 {
        unmap(raw.cast(), lead);
    }
    if trail > 0 {
        unmap((start + len) as *mut u8, trail);
    }
    start as *mut u8
}

/// Unmaps `[p, p + len)`.
///
/// pre: the range was mapped by this module and nothing refers to it any more.
pub fn unmap(p: *mut u8, len: usize) {
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
/// pre: the range lies in a private anonymous mapping of this module and holds no live data.
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
/// pre: `[p, p + old)` is one mapping of this module.
pub fn remap_in_place(p: *mut u8, old: usize, new: usize) -> bool {
    // SAFETY: without MREMAP_MAYMOVE the mapping stays at `p`; growing only takes address
    // space that was free.
    let r = unsafe { libc::mremap(p.cast(), old, new, 0) };
    r != libc::MAP_FAILED
}

/// Moves the pages of `[p, p + old)` to `target`, resized to `new` bytes, without copying.
/// On success `[p, p + old)` is unmapped; on failure nothing changed.
///
/// pre: `[p, p + old)` is one mapping of this module; `[target, target + new)` is a
/// reservation of [`reserve_aligned`], or a mapping of this process's (a shared heap's, see
/// `shm::sys::privatize`), that nothing else uses.
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
pub fn stdio_list_unlock() {
    // SAFETY: the calling thread took the lock in the prepare handler.
    #[cfg(target_env = "gnu")]
    unsafe {
        _IO_list_unlock()
    };
}

/// Re-initialises the stdio list lock (in the child after `fork`).
pub fn stdio_list_reset() {
    // SAFETY: the child has one thread; resetting the lock it inherited is what glibc's own
    // fork does.
    #[cfg(target_env = "gnu")]
    unsafe {
        _IO_list_resetlock()
    };
}

/// A coarse monotonic clock in milliseconds, wrapping (the vDSO's `CLOCK_MONOTONIC_COARSE`:
/// no system call, a few nanoseconds).
pub fn now_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
}

/// The CPU the calling thread runs on now, or 0 if the kernel cannot tell.
///
/// On x86_64 with glibc 2.35 or later this reads the `cpu_id` field of the thread's rseq area
/// (registered by glibc for every thread; the kernel keeps the field current on every return
/// to user space): two loads, no call. Otherwise, and for a thread whose registration failed
/// (`cpu_id` negative), it asks `sched_getcpu`.
#[inline]
pub fn current_cpu() -> usize {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    if let Some(c) = rseq::cpu_id() {
        return c;
    }
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    if c < 0 {
        0
    } else {
        c as usize
    }
}

/// The calling thread's rseq area, as glibc registered it (`<sys/rseq.h>`).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
pub mod rseq {
    extern "C" {
        /// Offset from the thread pointer to the rseq area (glibc 2.35+).
        static __rseq_offset: isize;
        /// Size of the registered area; 0 when glibc did not register one (old kernel,
        /// `glibc.pthread.rseq=0`, valgrind).
        static __rseq_size: u32;
    }

    /// Offset of `cpu_id` in `struct rseq` (after `cpu_id_start`).
    const CPU_ID: isize = 4;

    /// The thread pointer (`%fs:0` holds the TCB's own address on x86_64).
    #[inline]
    fn thread_pointer() -> usize {
        let tp: usize;
        // SAFETY: on x86_64 Linux, %fs:0 is the thread control block's self pointer, set up
        // by the loader before any code of ours runs; reading it has no side effects.
        unsafe {
            core::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp,
                options(nostack, readonly, preserves_flags));
        }
        tp
    }

    /// The offset from the thread pointer to every thread's rseq area, if glibc registered
    /// one for the process.
    pub fn area_offset() -> Option<isize> {
        // SAFETY: as in `cpu_id`.
        let (size, offset) = unsafe { (__rseq_size, __rseq_offset) };
        (size != 0).then_some(offset)
    }

    /// The kernel's idea of the calling thread's CPU, if the thread has an rseq area.
    #[inline]
    pub fn cpu_id() -> Option<usize> {
        // SAFETY: both variables are written once by the dynamic loader before any code of
        // the process runs, and never again.
        let (size, offset) = unsafe { (__rseq_size, __rseq_offset) };
        if size == 0 {
            return None;
        }
        let p = (thread_pointer() as isize + offset + CPU_ID) as *const u32;
        // SAFETY: with a registered area, `p` is the `cpu_id` field of the calling thread's
        // rseq area, in its static TLS block; the kernel writes it asynchronously, hence the
        // volatile read.
        let id = unsafe { core::ptr::read_volatile(p) } as i32;
        (id >= 0).then_some(id as usize)
    }
}

/// CPU ids the process may run on now, as a bit set, and the number of possible CPU ids.
pub fn cpu_affinity(set: &mut [u64; 16]) -> usize {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut cs: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cs` is a valid, writable cpu_set_t of the size we pass.
    let r = unsafe { libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut cs) };
    let mut count = 0;
    for cpu in 0..1024 {
        // SAFETY: `cpu` is below CPU_SETSIZE (1024).
        let on = r == 0 && unsafe { libc::CPU_ISSET(cpu, &cs) };
        if on {
            set[cpu / 64] |= 1 << (cpu % 64);
            count += 1;
        }
    }
    if count == 0 {
        set[0] = 1;
        count = 1;
    }
    count
}

/// The number of CPU ids the kernel may ever report: one more than the highest id in
/// `/sys/devices/system/cpu/possible` (hot-pluggable CPUs included), read without allocating.
/// Falls back to 1024 (`CPU_SETSIZE`) when the file cannot be read.
pub fn possible_cpus() -> usize {
    const FALLBACK: usize = 1024;
    let path = b"/sys/devices/system/cpu/possible\0";
    // SAFETY: `path` is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return FALLBACK;
    }
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; `fd` is ours and closed right after.
    let n = unsafe {
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return FALLBACK;
    }
    // The format is a list of ids and ranges: "0-3,8-11\n". The largest number wins.
    let mut max = None;
    let mut cur: Option<usize> = None;
    for &b in &buf[..n as usize] {
        if b.is_ascii_digit() {
            cur = Some(cur.unwrap_or(0) * 10 + (b - b'0') as usize);
        } else if let Some(v) = cur.take() {
            max = Some(max.map_or(v, |m: usize| m.max(v)));
        }
    }
    if let Some(v) = cur {
        max = Some(max.map_or(v, |m: usize| m.max(v)));
    }
    match max {
        Some(m) if m < 1 << 16 => m + 1,
        _ => FALLBACK,
    }
}

/// Word `half` (0 or 1) of the kernel's 16 `AT_RANDOM` bytes, or `fallback` without them.
fn at_random(half: usize, fallback: u64) -> u64 {
    debug_assert!(half < 2);
    // SAFETY: getauxval has no preconditions; AT_RANDOM points to 16 random bytes that live
    // as long as the process, and `half < 2` keeps the read inside them.
    unsafe {
        let p = libc::getauxval(libc::AT_RANDOM) as *const u8;
        if p.is_null() {
            return fallback;
        }
        core::ptr::read_unaligned(p.add(8 * half).cast::<u64>())
    }
}

/// A random word from the kernel (`AT_RANDOM`), fixed for the life of the process.
pub fn random_word() -> usize {
    at_random(0, 0x9e37_79b9_7f4a_7c15) as usize
}

/// A secret for arena `i`: the second half of the kernel's `AT_RANDOM` bytes, mixed with
/// `i` (splitmix64), so every arena's free-list key differs and none equals the free mark.
pub fn secret_key(i: usize) -> usize {
    let seed = at_random(1, 0x2545_f491_4f6c_dd1d);
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as usize
}

/// Reads an environment variable as an unsigned number, without allocating. `name` must end
/// with a NUL byte. Returns `None` if unset or not a number.
pub fn env_usize(name: &[u8]) -> Option<usize> {
    debug_assert_eq!(name.last(), Some(&0));
    // SAFETY: `name` is NUL-terminated; getenv returns null or a NUL-terminated string that
    // stays valid while nobody calls setenv, and we read it at once.
    let p = unsafe { libc::getenv(name.as_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let mut v: usize = 0;
    let mut i = 0;
    loop {
        // SAFETY: we stop at the terminating NUL.
        let b = unsafe { *p.add(i) } as u8;
        match b {
            0 if i > 0 => return Some(v),
            b'0'..=b'9' => v = v.checked_mul(10)?.checked_add((b - b'0') as usize)?,
            _ => return None,
        }
        i += 1;
    }
}

/// Runs `f` and puts the calling thread's errno back as it was: for the paths of `free` that
/// may make system calls (C's `free` must not change errno).
#[inline]
pub fn keeping_errno<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    let e = unsafe { *libc::__errno_location() };
    let r = f();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e };
    r
}

/// Writes all of `bytes` to file descriptor `fd`, ignoring errors. Never allocates.
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

/// Lets another thread run (`sched_yield`).
pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// A duplicate of `fd` numbered at least `min`, closed on exec; negative on failure.
pub fn dup_fd_high(fd: i32, min: i32) -> i32 {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor.
    unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) }
}

/// Runs `f` at normal process exit (`atexit`); handlers run in reverse order.
pub fn at_exit(f: extern "C" fn()) {
    // SAFETY: `f` is a plain function that lives for the whole program.
    unsafe { libc::atexit(f) };
}

/// Writes `msg` to stderr and aborts the process. Used for heap corruption and invalid frees.
#[cold]
pub fn fatal(msg: &[u8]) -> ! {
    write_all(2, msg);
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// Blocks while `*word == expected`, until a [`futex_wake`] on `word` (or spuriously).
/// `shared` selects a futex usable across processes (for shared-memory heaps).
pub fn futex_wait(word: &AtomicU32, expected: u32, shared: bool) {
    let op = if shared {
        libc::FUTEX_WAIT
    } else {
        libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG
    };
    // SAFETY: `word` is a valid aligned u32 for the duration of the call; no timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            expected,
            ptr::null::<libc::timespec>(),
        );
    }
}

/// Wakes one thread blocked in [`futex_wait`] on `word`.
pub fn futex_wake(word: &AtomicU32, shared: bool) {
    let op = if shared {
        libc::FUTEX_WAKE
    } else {
        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG
    };
    // SAFETY: `word` is a valid aligned u32; waking has no other effect on memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), op, 1);
    }
}

/// Registers the fork handlers. Returns whether glibc accepted them.
pub fn register_atfork(
    prepare: unsafe extern "C" fn(),
    parent: unsafe extern "C" fn(),
    child: unsafe extern "C" fn(),
) -> bool {
    // SAFETY: the handlers are `extern "C"` functions that live for the whole program.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) == 0 }
}

/// A thread id for the calling thread, unique among live threads, without a system call.
#[inline]
pub fn thread_id() -> usize {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as usize }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the calling thread to `cpu`; false if the process may not run there.
    fn pin(cpu: usize) -> bool {
        // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
        let mut cs: libc::cpu_set_t = unsafe { core::mem::zeroed() };
        // SAFETY: `cs` is a valid cpu_set_t and `cpu` below its capacity.
        unsafe { libc::CPU_SET(cpu, &mut cs) };
        // SAFETY: `cs` is a valid cpu_set_t of the size we pass.
        unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &cs) == 0 }
    }

    fn rseq_in_use() -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        return rseq::cpu_id().is_some();
        #[allow(unreachable_code)]
        false
    }

    #[test]
    fn current_cpu_follows_the_thread() {
        let mut allowed = [0u64; 16];
        cpu_affinity(&mut allowed);
        std::thread::spawn(move || {
            let mut seen = 0;
            for cpu in 0..1024 {
                if allowed[cpu / 64] & (1 << (cpu % 64)) == 0 || !pin(cpu) {
                    continue;
                }
                assert_eq!(current_cpu(), cpu);
                #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
                if let Some(c) = rseq::cpu_id() {
                    assert_eq!(c, cpu, "rseq cpu_id");
                }
                seen += 1;
            }
            assert!(seen >= 1);
            eprintln!("rseq area: {}", rseq_in_use());
        })
        .join()
        .unwrap();
    }
}
