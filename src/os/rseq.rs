//! The calling thread's rseq area, as glibc registered it (`<sys/rseq.h>`).
//!
//! glibc 2.35 and later register an area for every thread and publish where it is in
//! `__rseq_offset` and `__rseq_size`. Those symbols are looked up at run time
//! (`dlsym`), not linked, so that a program using coreheap also starts on an older glibc,
//! where it finds no area and takes the locked path. The lookup happens once, on the first
//! call; what it found is kept in statics of our own, so [`cpu_id`] stays a few loads.

use core::sync::atomic::{AtomicIsize, AtomicU8, Ordering};

/// Offset of `cpu_id` in `struct rseq` (after `cpu_id_start`).
const CPU_ID: isize = 4;

/// [`STATE`]: not looked up yet.
const UNKNOWN: u8 = 0;
/// [`STATE`]: a lookup is running (a `dlsym` that allocates re-enters here and is told
/// "no area").
const LOOKING: u8 = 1;
/// [`STATE`]: glibc registered an area at [`OFFSET`].
const REGISTERED: u8 = 2;
/// [`STATE`]: no area (glibc older than 2.35, `glibc.pthread.rseq=0`, an old kernel,
/// valgrind).
const NONE: u8 = 3;

/// What the lookup found. Invariant: [`OFFSET`] is written before `STATE` becomes
/// [`REGISTERED`] (Release), and read only after that was seen (Acquire).
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static OFFSET: AtomicIsize = AtomicIsize::new(0);

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

/// Looks the two symbols up (once per process; a concurrent or re-entrant caller sees
/// "no area" meanwhile). Returns the new state.
#[cold]
#[inline(never)]
fn look_up() -> u8 {
    if STATE
        .compare_exchange(UNKNOWN, LOOKING, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return STATE.load(Ordering::Acquire);
    }
    // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only reads the loaded
    // objects' symbol tables. The symbols, when present, are glibc's `unsigned int
    // __rseq_size` and `ptrdiff_t __rseq_offset`, written by the loader before any code of
    // the process runs and never again.
    let found = unsafe {
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        let offset = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        (!size.is_null() && !offset.is_null() && *size != 0).then(|| *offset)
    };
    let state = match found {
        Some(off) => {
            OFFSET.store(off, Ordering::Relaxed);
            REGISTERED
        }
        None => NONE,
    };
    // Release: publishes OFFSET.
    STATE.store(state, Ordering::Release);
    state
}

/// The offset from the thread pointer to every thread's rseq area, if glibc registered
/// one for the process.
#[inline]
pub fn area_offset() -> Option<isize> {
    // Acquire: pairs with the Release in `look_up`.
    let mut state = STATE.load(Ordering::Acquire);
    if state == UNKNOWN {
        state = look_up();
    }
    (state == REGISTERED).then(|| OFFSET.load(Ordering::Relaxed))
}

/// The kernel's idea of the calling thread's CPU, if the thread has an rseq area.
#[inline]
pub fn cpu_id() -> Option<usize> {
    let offset = area_offset()?;
    let p = (thread_pointer() as isize + offset + CPU_ID) as *const u32;
    // SAFETY: with a registered area, `p` is the `cpu_id` field of the calling thread's
    // rseq area, in its static TLS block; the kernel writes it asynchronously, hence the
    // volatile read.
    let id = unsafe { core::ptr::read_volatile(p) } as i32;
    (id >= 0).then_some(id as usize)
}
