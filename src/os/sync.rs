//! Waiting and waking: the futex, glibc's robust process-shared mutex, fork handlers and
//! yielding the CPU. `crate::lock` builds its lock types on these.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::AtomicU32;

/// The futex operation `op`, private to this process unless `shared` (usable across
/// processes, for shared-memory heaps).
fn futex_op(op: i32, shared: bool) -> i32 {
    if shared {
        op
    } else {
        op | libc::FUTEX_PRIVATE_FLAG
    }
}

/// Blocks while `*word == expected`, until a [`futex_wake`] on `word` (or spuriously, or on
/// a signal). `shared` selects a futex usable across processes (for shared-memory heaps).
/// Async-signal-safe.
pub fn futex_wait(word: &AtomicU32, expected: u32, shared: bool) {
    // SAFETY: `word` is a valid aligned u32 for the duration of the call; no timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            futex_op(libc::FUTEX_WAIT, shared),
            expected,
            ptr::null::<libc::timespec>(),
        );
    }
}

/// Like [`futex_wait`], for at most `ms` milliseconds. Returns false if the time ran out
/// (`ETIMEDOUT`), true otherwise (woken, the word differed, a signal). Async-signal-safe.
pub fn futex_wait_ms(word: &AtomicU32, expected: u32, shared: bool, ms: u32) -> bool {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) as i64 * 1_000_000) as _,
    };
    let op = futex_op(libc::FUTEX_WAIT, shared);
    // SAFETY: `word` is a valid aligned u32 and `ts` a valid relative timeout for the call.
    let r = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), op, expected, &ts) };
    r == 0 || super::errno::errno() != libc::ETIMEDOUT
}

/// Wakes up to `n` threads blocked in [`futex_wait`] on `word`.
fn wake(word: &AtomicU32, shared: bool, n: i32) {
    // SAFETY: `word` is a valid aligned u32; waking has no other effect on memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            futex_op(libc::FUTEX_WAKE, shared),
            n,
        );
    }
}

/// Wakes one thread blocked in [`futex_wait`] on `word`. Async-signal-safe.
pub fn futex_wake(word: &AtomicU32, shared: bool) {
    wake(word, shared, 1);
}

/// Wakes every thread blocked in [`futex_wait`] on `word`. Async-signal-safe.
pub fn futex_wake_all(word: &AtomicU32, shared: bool) {
    wake(word, shared, i32::MAX);
}

/// Gives the CPU to another runnable thread (`sched_yield`).
pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// Runs `f` with the calling thread's cancellation disabled (`pthread_setcancelstate`, not
/// itself a cancellation point), then restores the previous state: a pending or arriving
/// cancellation cannot act inside `f`'s cancellation points (`write`, `read`, `close`).
pub fn without_cancellation<R>(f: impl FnOnce() -> R) -> R {
    extern "C" {
        fn pthread_setcancelstate(state: libc::c_int, old: *mut libc::c_int) -> libc::c_int;
    }
    /// glibc's `PTHREAD_CANCEL_DISABLE` (not exported by the libc crate).
    const PTHREAD_CANCEL_DISABLE: libc::c_int = 1;
    let mut old: libc::c_int = 0;
    // SAFETY: `old` is writable; PTHREAD_CANCEL_DISABLE is a valid state.
    let set = unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old) } == 0;
    let r = f();
    if set {
        let mut ignored: libc::c_int = 0;
        // SAFETY: restores the state read above; `ignored` is writable.
        unsafe { pthread_setcancelstate(old, &mut ignored) };
    }
    r
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

/// What a take of a [`RobustMutex`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MutexTake {
    /// Taken from a holder that released it.
    Clean,
    /// Taken from a holder that died holding it (`EOWNERDEAD`).
    OwnerDied,
    /// Held by someone else (`try_lock` only).
    Busy,
    /// Not taken: `ENOTRECOVERABLE` (a taker after an owner's death released it without
    /// marking it consistent) or `EINVAL` (not initialised). The code is in the field.
    Unusable(i32),
}

// glibc's values (not exported by the libc crate for this target).
const PTHREAD_PROCESS_SHARED: i32 = 1;
const PTHREAD_MUTEX_ROBUST: i32 = 1;

/// A process-shared, robust glibc mutex, in memory that several processes may map. The
/// mutex word holds the owner's thread id, and glibc lists every robust mutex a thread holds
/// with the kernel (`set_robust_list`); when the thread dies, even by `SIGKILL`, the kernel
/// marks the word "owner died" and wakes a waiter. glibc's mutex functions neither allocate
/// nor take other locks. Exactly the size and alignment of `pthread_mutex_t`.
///
/// Invariant: initialised with [`RobustMutex::init_in_place`] before any other use; all-zero
/// memory is a private, non-robust mutex, not this.
#[repr(transparent)]
pub struct RobustMutex(UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: a pthread mutex is made to be shared between threads (and, process-shared,
// between processes).
unsafe impl Sync for RobustMutex {}

impl RobustMutex {
    /// Makes the memory at `slot` an unlocked process-shared robust mutex. Returns false if
    /// glibc refused.
    ///
    /// # Safety
    /// `slot` is writable memory for a `RobustMutex` that no one uses yet.
    pub unsafe fn init_in_place(slot: *mut RobustMutex) -> bool {
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before use and destroyed
        // after; `slot` is ours by the contract, and `RobustMutex` is a transparent
        // `pthread_mutex_t`.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = core::mem::zeroed();
            if libc::pthread_mutexattr_init(&mut attr) != 0 {
                return false;
            }
            let ok = libc::pthread_mutexattr_setpshared(&mut attr, PTHREAD_PROCESS_SHARED) == 0
                && libc::pthread_mutexattr_setrobust(&mut attr, PTHREAD_MUTEX_ROBUST) == 0
                && libc::pthread_mutex_init(slot.cast::<libc::pthread_mutex_t>(), &attr) == 0;
            libc::pthread_mutexattr_destroy(&mut attr);
            ok
        }
    }

    fn take(r: i32) -> MutexTake {
        match r {
            0 => MutexTake::Clean,
            libc::EOWNERDEAD => MutexTake::OwnerDied,
            libc::EBUSY => MutexTake::Busy,
            e => MutexTake::Unusable(e),
        }
    }

    /// Takes the mutex, waiting for it if needed; never [`MutexTake::Busy`].
    pub fn lock(&self) -> MutexTake {
        // SAFETY: the mutex was initialised (type invariant).
        match Self::take(unsafe { libc::pthread_mutex_lock(self.0.get()) }) {
            MutexTake::Busy => MutexTake::Unusable(libc::EBUSY),
            t => t,
        }
    }

    /// Takes the mutex if it is free now.
    pub fn try_lock(&self) -> MutexTake {
        // SAFETY: the mutex was initialised (type invariant).
        Self::take(unsafe { libc::pthread_mutex_trylock(self.0.get()) })
    }

    /// After [`MutexTake::OwnerDied`] and the repair: the guarded data is sound again.
    ///
    /// pre: the calling thread holds the mutex.
    pub fn mark_consistent(&self) {
        // SAFETY: the mutex was initialised and is held by this thread (precondition).
        unsafe { libc::pthread_mutex_consistent(self.0.get()) };
    }

    /// Releases the mutex.
    ///
    /// pre: the calling thread holds it.
    pub fn unlock(&self) {
        // SAFETY: the mutex was initialised and is held by this thread (precondition).
        unsafe { libc::pthread_mutex_unlock(self.0.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_mutex_takes_and_reports_busy() {
        let mut slot = core::mem::MaybeUninit::<RobustMutex>::uninit();
        // SAFETY: `slot` is fresh memory of the right type.
        assert!(unsafe { RobustMutex::init_in_place(slot.as_mut_ptr()) });
        // SAFETY: initialised just above.
        let m = unsafe { slot.assume_init_ref() };
        assert_eq!(m.try_lock(), MutexTake::Clean);
        let busy = std::thread::scope(|s| s.spawn(|| m.try_lock()).join().unwrap());
        assert_eq!(busy, MutexTake::Busy);
        m.unlock();
        assert_eq!(m.lock(), MutexTake::Clean);
        m.unlock();
        yield_now();
    }
}
