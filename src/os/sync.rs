//! Waiting and waking: the futex, glibc's robust process-shared mutex, fork handlers and
//! yielding the CPU. `crate::lock` builds its lock types on these.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicU32, Ordering};

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
        if unsafe { libc::pthread_mutex_unlock(self.0.get()) } == libc::EPERM {
            self.unlock_stale();
        }
    }

    /// glibc refused the unlock: the word holds another thread's id. In a fork child, that
    /// is the parent's id of this very thread when a take was interrupted by the signal
    /// whose handler forked, after glibc had read the thread's id and before it stored it
    /// in the word: the take resumed in the child and stored the parent's id (see
    /// [`robust_fork_child`]). The mutex is this thread's: the word gets its own id, and the
    /// unlock is made again (the take linked the mutex into this thread's robust list, which
    /// that unlock leaves right). Nothing otherwise.
    #[cold]
    #[inline(never)]
    fn unlock_stale(&self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if self.held_by_caller() {
            let me = super::process::kernel_tid();
            // A compare-and-swap, so that a waiter's bit set meanwhile is kept.
            let _ = self
                .word()
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    Some((old & !FUTEX_TID_MASK) | me)
                });
            // SAFETY: initialised, and held by this thread (its id is in the word now).
            unsafe { libc::pthread_mutex_unlock(self.0.get()) };
        }
    }

    /// The mutex's futex word: glibc's `__data.__lock`, the first `int` of `pthread_mutex_t`
    /// on Linux (`bits/struct_mutex.h`, every port). glibc reads and writes it only with
    /// atomic operations, and so does the kernel.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn word(&self) -> &AtomicU32 {
        // SAFETY: the word is the first 4 bytes of the mutex (see above), 4-aligned (the
        // mutex is at least that: checked below), valid for as long as `self`, and inside the
        // `UnsafeCell`, so it may change under a shared reference; every access to it is
        // atomic.
        unsafe { &*(self.0.get() as *const AtomicU32) }
    }

    /// Whether the calling thread holds the mutex (a signal handler on the thread whose
    /// interrupted code holds it). Exact: the word of a held robust mutex is its holder's
    /// kernel thread id in the bits `FUTEX_TID_MASK` (the kernel's robust-futex ABI, which
    /// glibc follows: the kernel finds a dead holder's mutexes by it), and only the holder
    /// changes those bits while it holds it. A system call (`gettid`) only when the mutex is
    /// held by someone. With another C library: always false.
    ///
    /// Thread ids are those of the caller's pid namespace: processes in different namespaces
    /// that share the mutex could see each other's holders as their own (robust mutexes are
    /// not made for that either).
    pub fn held_by_caller(&self) -> bool {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // Relaxed: if this thread holds the mutex, the word's id bits are its own last
            // write to them; if not, whatever value is read holds another id or none.
            let holder = self.word().load(Ordering::Relaxed) & FUTEX_TID_MASK;
            holder != 0 && {
                let me = super::process::kernel_tid();
                holder == me
                    || (holder == STALE_TID.load(Ordering::Relaxed)
                        && me == CHILD_TID.load(Ordering::Relaxed)
                        && !super::process::own_thread(holder))
            }
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        false
    }

    /// Fork child: makes the mutex, which the forking thread held in the parent (its
    /// interrupted code: a fork from a signal handler), held by this thread, the child's
    /// copy of that thread, so that the interrupted code can release it when it resumes
    /// here. glibc's unlock refuses (`EPERM`) a mutex whose word holds another thread's id,
    /// and the parent's id is in the child's copy. No one waits for it in the child: the
    /// waiters bit is cleared. The mutex is also unlinked from the parent thread's list of
    /// robust mutexes (glibc emptied the child's list at the fork, and the unlock would
    /// otherwise relink the child's list to its neighbours there, which the child does not
    /// hold). Nothing with another C library (the mutex then stays held).
    ///
    /// # Safety
    /// The child of `fork`, this thread the only one; the mutex is in memory private to
    /// this process and held by the thread that forked, in the parent; no other thread uses it.
    pub unsafe fn adopt_after_fork(&self) {
        // Only where the robust-list layout is known (64-bit glibc): elsewhere the mutex
        // stays held, as before this existed, rather than be unlocked through a list that
        // does not hold it (32-bit glibc walks its list for the mutex, for ever).
        #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
        {
            let w = self.word();
            let old = w.load(Ordering::Relaxed);
            w.store(
                (old & !(FUTEX_TID_MASK | FUTEX_WAITERS)) | super::process::kernel_tid(),
                Ordering::Relaxed,
            );
            // SAFETY: no one else uses the mutex (contract); `__list` is where
            // `ROBUST_LIST_AT` says (checked by a test against the kernel's robust list).
            unsafe { self.unlink_robust() };
        }
    }

    /// Points the mutex's robust-list links at the mutex itself, so that glibc's unlock
    /// (which unlinks the mutex from its holder's list by rewriting its neighbours) rewrites
    /// only the mutex. glibc links `&mutex.__data.__list.__next` (64-bit `pthread_mutex_t`:
    /// `__list`, `{ __prev, __next }`, at [`ROBUST_LIST_AT`]) and finds a link's node by
    /// subtracting the offset of `__next`.
    ///
    /// # Safety
    /// As for [`Self::adopt_after_fork`].
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    unsafe fn unlink_robust(&self) {
        let list = self.0.get().cast::<u8>().wrapping_add(ROBUST_LIST_AT);
        let next = list.wrapping_add(core::mem::size_of::<usize>());
        // SAFETY: both words are inside the mutex (40 bytes, checked below), pointer-aligned,
        // and no one else uses it (contract).
        unsafe {
            list.cast::<usize>().write(next as usize);
            next.cast::<usize>().write(next as usize);
        }
    }
}

/// The thread that ran the last `fork`'s prepare handler ([`robust_fork_prepare`]), by its
/// kernel id.
static PREPARE_TID: AtomicU32 = AtomicU32::new(0);
/// In a fork child: the forking thread's id in the parent ([`PREPARE_TID`] there), and this
/// thread's, the copy of that one. 0 in a process that is no fork child of a process that
/// called [`robust_fork_prepare`].
static STALE_TID: AtomicU32 = AtomicU32::new(0);
static CHILD_TID: AtomicU32 = AtomicU32::new(0);

/// A `fork`'s prepare handler, for [`robust_fork_child`]: records the forking thread's id.
pub fn robust_fork_prepare() {
    PREPARE_TID.store(super::process::kernel_tid(), Ordering::Relaxed);
}

/// A `fork`'s child handler, after [`robust_fork_prepare`] in the parent: from now on, for
/// this thread, a robust mutex whose word holds the forking thread's id in the parent is
/// held by this thread ([`RobustMutex::held_by_caller`]), and its unlock replaces that id by
/// this thread's first ([`RobustMutex::unlock`]). For a take of the mutex that the signal
/// whose handler forked interrupted: glibc reads the thread's id (from its thread
/// descriptor, into a register) before it stores it in the word with a compare-and-swap,
/// and the take resumes in the child, with the parent's id, when the handler returns;
/// glibc's unlock would then refuse it (`EPERM`), and the mutex would stay held for ever.
/// (Seen: `signal_events forkrun single 3 5000` under `COREHEAP_SHM`, release build, hung
/// in 6 of 6 runs with the child waiting for an arena lock that held its parent's id.) Only
/// this thread: another thread of the child that got the parent's id (reused after the
/// parent's thread ended) is not taken for it.
///
/// pre: the child of `fork`, this thread the only one.
pub fn robust_fork_child() {
    STALE_TID.store(PREPARE_TID.load(Ordering::Relaxed), Ordering::Relaxed);
    CHILD_TID.store(super::process::kernel_tid(), Ordering::Relaxed);
}

/// The kernel's robust-futex ABI (`linux/futex.h`): the holder's thread id in a robust
/// mutex's word, and the bit that says a taker may sleep on it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const FUTEX_WAITERS: u32 = 0x8000_0000;
/// Where glibc's 64-bit `pthread_mutex_t` keeps its robust-list links (`__data.__list`):
/// after `__lock`, `__count`, `__owner`, `__nusers`, `__kind` and two `short`s (x86_64) or
/// one `int` (the generic layout), 24 bytes in either.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
const ROBUST_LIST_AT: usize = 24;

// The futex word is the mutex's first 4 bytes, and the links fit inside it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const _: () = assert!(
    core::mem::size_of::<libc::pthread_mutex_t>() >= 40
        && core::mem::align_of::<libc::pthread_mutex_t>() >= 4
);

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

    /// A fresh robust mutex in a box (its address must not move once used).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn boxed_mutex() -> Box<RobustMutex> {
        let mut b = Box::new(core::mem::MaybeUninit::<RobustMutex>::uninit());
        // SAFETY: fresh memory of the right type.
        assert!(unsafe { RobustMutex::init_in_place(b.as_mut_ptr()) });
        // SAFETY: initialised just above.
        unsafe { Box::from_raw(Box::into_raw(b).cast::<RobustMutex>()) }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn robust_mutex_knows_its_own_holder() {
        let m = boxed_mutex();
        assert!(!m.held_by_caller());
        assert_eq!(m.lock(), MutexTake::Clean);
        assert!(m.held_by_caller());
        let other = std::thread::scope(|s| s.spawn(|| m.held_by_caller()).join().unwrap());
        assert!(!other);
        m.unlock();
        assert!(!m.held_by_caller());
    }

    /// The layout `adopt_after_fork` relies on, checked against the kernel's view: a thread
    /// that takes a robust mutex with its robust list empty links it first, so the list head
    /// the kernel knows (`get_robust_list`) points at the mutex's `__list.__next`, whose two
    /// links point back at the head.
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    #[test]
    fn robust_list_links_are_where_adopt_expects() {
        let m = boxed_mutex();
        let m = &*m;
        std::thread::scope(|s| {
            s.spawn(|| {
                // Asked once the mutex is held: a C library may register the list lazily.
                assert_eq!(m.lock(), MutexTake::Clean);
                let mut head: *mut usize = core::ptr::null_mut();
                let mut len: usize = 0;
                // SAFETY: asks for this thread's list head (pid 0) into valid out-pointers.
                let r = unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &mut head, &mut len) };
                if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                    // qemu-user (CI's aarch64 run) does not implement the call.
                    m.unlock();
                    eprintln!("get_robust_list is not implemented here; layout not checked");
                    return;
                }
                assert_eq!(r, 0);
                assert!(!head.is_null());
                let base = m.0.get() as usize;
                let next_at = base + ROBUST_LIST_AT + 8;
                // SAFETY: the head is this thread's live robust list head (its first word
                // is the list), and the links are inside the mutex, which this thread holds.
                let (first, prev, next) = unsafe {
                    (
                        *head,
                        *((base + ROBUST_LIST_AT) as *const usize),
                        *(next_at as *const usize),
                    )
                };
                m.unlock();
                assert_eq!(first, next_at, "the head links the mutex's __list.__next");
                assert_eq!(prev, head as usize);
                assert_eq!(next, head as usize);
            })
            .join()
            .unwrap()
        });
    }

    /// A fork child takes over a mutex its parent's forking thread held, releases it (glibc
    /// refused that before: the word held the parent's thread id), and takes robust mutexes
    /// afterwards as usual; a take that resumed in the child and stored the parent's id (a
    /// take the fork interrupted) is the child's too, and its unlock succeeds.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn fork_child_adopts_its_parents_mutex() {
        let m = boxed_mutex();
        let n = boxed_mutex();
        assert_eq!(m.lock(), MutexTake::Clean);
        robust_fork_prepare();
        let parent_tid = super::super::process::kernel_tid();
        // SAFETY: the child makes no allocation and ends with `_exit`; the mutexes are in
        // its private copy of this memory.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                if m.held_by_caller() {
                    return 1; // the parent's id must not pass for the child's
                }
                robust_fork_child();
                if !m.held_by_caller() {
                    return 5; // ... except for the copy of the forking thread
                }
                // A take that resumed here: linked into this thread's list, the word
                // holding the parent's id.
                if n.lock() != MutexTake::Clean {
                    return 6;
                }
                let w = n.word();
                w.store(
                    (w.load(Ordering::Relaxed) & !FUTEX_TID_MASK) | parent_tid,
                    Ordering::Relaxed,
                );
                if !n.held_by_caller() {
                    return 7;
                }
                n.unlock();
                if n.held_by_caller() || n.try_lock() != MutexTake::Clean {
                    return 8;
                }
                n.unlock();
                // SAFETY: the child of fork (one thread), private memory; the forking thread
                // held `m`.
                unsafe { m.adopt_after_fork() };
                if !m.held_by_caller() {
                    return 2;
                }
                // SAFETY: a mutex this thread holds now.
                if unsafe { libc::pthread_mutex_unlock(m.0.get()) } != 0 {
                    return 3;
                }
                if m.try_lock() != MutexTake::Clean || n.try_lock() != MutexTake::Clean {
                    return 4;
                }
                n.unlock();
                m.unlock();
                0
            })();
            // SAFETY: ends the child at once, running nothing of the parent's.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0);
        // Not in the parent: the stale id is the child's only.
        let other = std::thread::scope(|s| s.spawn(|| m.held_by_caller()).join().unwrap());
        assert!(!other);
        m.unlock();
        let mut st = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        assert!(libc::WIFEXITED(st), "{st:#x}");
        assert_eq!(libc::WEXITSTATUS(st), 0);
    }
}
