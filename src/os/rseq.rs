//! The calling thread's rseq area, as glibc registered it (`<sys/rseq.h>`).
//!
//! glibc 2.35 and later register an area for every thread and publish where it is in
//! `__rseq_offset` and `__rseq_size`. Those symbols are looked up at run time
//! (`dlsym`), not linked, so that a program using coreheap also starts on an older glibc,
//! where it finds no area and takes the locked path. The lookup happens once, on the first
//! call (the heap's initialisation makes it, and the preload library's load-time
//! constructor, while the process has one thread); what it found is kept in statics of our
//! own, so [`cpu_id`] stays a few loads. Another thread that asks during the lookup waits
//! for it, a bounded while; the looking thread itself (a `dlsym` that allocates re-enters
//! the allocator) is told "no area" meanwhile; a fork child that inherits a lookup in flight
//! starts it anew.

use core::sync::atomic::{AtomicIsize, AtomicU32, AtomicUsize, Ordering};

/// Offset of `cpu_id` in `struct rseq` (after `cpu_id_start`).
const CPU_ID: isize = 4;

/// [`STATE`]: not looked up yet.
const UNKNOWN: usize = 0;
/// [`STATE`]: glibc registered an area at [`OFFSET`].
const REGISTERED: usize = 1;
/// [`STATE`]: no area (glibc older than 2.35, `glibc.pthread.rseq=0`, an old kernel,
/// valgrind).
const NONE: usize = 2;
// Any other STATE: a lookup is running, and this is the looking thread's id
// (`os::thread_id`, an address: never 0, 1 or 2), claimed with the one compare-and-swap
// that starts the lookup, so that a re-entry from that very thread is told at once.

/// How often a thread spins waiting for another's lookup before it answers "no area" for
/// this call (without caching it): the looker may be blocked on the loader's lock, which
/// the waiter may hold (`dlopen` allocates).
const WAIT_SPINS: u32 = 1 << 16;

/// What the lookup found. Invariant: [`OFFSET`] is written before `STATE` becomes
/// [`REGISTERED`] (Release), and read only after that was seen (Acquire).
static STATE: AtomicUsize = AtomicUsize::new(UNKNOWN);
static OFFSET: AtomicIsize = AtomicIsize::new(0);
/// The process that runs or ran the lookup: a fork child that inherits a lookup in flight
/// (its looking thread does not exist there) sees another pid and starts anew.
static LOOKER_PID: AtomicU32 = AtomicU32::new(0);

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

/// Looks the two symbols up (once per process). Returns [`REGISTERED`] or [`NONE`], or
/// [`UNKNOWN`] ("no area for now", not cached) to the looking thread itself on re-entry and
/// to a thread that waited [`WAIT_SPINS`] in vain.
#[cold]
#[inline(never)]
fn look_up() -> usize {
    let me = super::thread_id();
    let pid = super::pid();
    let mut spins = 0;
    loop {
        match STATE.load(Ordering::Acquire) {
            found @ (REGISTERED | NONE) => return found,
            UNKNOWN => {
                // Written before the claim; every thread of a process writes the same value.
                LOOKER_PID.store(pid, Ordering::Relaxed);
                if STATE
                    .compare_exchange(UNKNOWN, me, Ordering::Acquire, Ordering::Acquire)
                    .is_ok()
                {
                    break;
                }
            }
            // Re-entered from our own lookup: no area for now.
            looker if looker == me => return UNKNOWN,
            looker => {
                if LOOKER_PID.load(Ordering::Relaxed) != pid {
                    // Inherited from the parent of a fork: nobody here is looking.
                    let _ = STATE.compare_exchange(
                        looker,
                        UNKNOWN,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    continue;
                }
                spins += 1;
                if spins > WAIT_SPINS {
                    return UNKNOWN;
                }
                core::hint::spin_loop();
            }
        }
    }
    // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only reads the loaded
    // objects' symbol tables. The symbols, when present, are glibc's `unsigned int
    // __rseq_size` and `ptrdiff_t __rseq_offset`, written by the loader before any code of
    // the process runs and never again.
    let found = unsafe {
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        let offset = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        let found = (!size.is_null() && !offset.is_null() && *size != 0).then(|| *offset);
        if size.is_null() || offset.is_null() {
            // Leave no failed lookup's message for the program's next `dlerror`.
            libc::dlerror();
        }
        found
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

/// A fork child of a process that was looking the symbols up looks again (the looking
/// thread is not in the child; `look_up` also finds that out by the pid, for children that
/// run no fork handler).
pub fn reset_after_fork() {
    let s = STATE.load(Ordering::Relaxed);
    if s != REGISTERED && s != NONE {
        STATE.store(UNKNOWN, Ordering::Relaxed);
    }
}

/// The offset from the thread pointer to every thread's rseq area, if glibc registered
/// one for the process.
#[inline]
pub fn area_offset() -> Option<isize> {
    // Acquire: pairs with the Release in `look_up`.
    let mut state = STATE.load(Ordering::Acquire);
    if state != REGISTERED && state != NONE {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fork child inherits the parent's lookup in flight (its looking thread is not in
    /// the child): it starts the lookup anew instead of waiting; the looking thread itself,
    /// re-entered, is told "no area" at once.
    #[test]
    fn a_lookup_in_flight_is_waited_for_only_when_it_can_end() {
        let found = area_offset();
        let saved = (
            STATE.load(Ordering::Relaxed),
            LOOKER_PID.load(Ordering::Relaxed),
        );
        let start = std::time::Instant::now();
        // A looker of another process (the parent of a fork).
        STATE.store(0x1000, Ordering::Relaxed);
        LOOKER_PID.store(super::super::pid().wrapping_add(1), Ordering::Relaxed);
        assert_eq!(area_offset(), found);
        // Our own lookup, re-entered.
        STATE.store(super::super::thread_id(), Ordering::Relaxed);
        LOOKER_PID.store(super::super::pid(), Ordering::Relaxed);
        assert_eq!(area_offset(), None);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        STATE.store(saved.0, Ordering::Relaxed);
        LOOKER_PID.store(saved.1, Ordering::Relaxed);
    }
}
