//! The calling thread's rseq area, as glibc registered it (`<sys/rseq.h>`). On the fast
//! paths: everything here is `#[inline]` and makes no call.

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
#[inline]
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
