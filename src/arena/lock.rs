//! The lock of an arena, chosen by its page source (`PageSource::Lock`): the private futex
//! lock ([`RawLock`]) for the process heap, the process-shared robust mutex
//! ([`RobustLock`]) for a shared heap.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::lock::{RawLock, RobustLock, Taken};

/// A set of arena indices below `64 * WORDS` (bit `i % 64` of word `i / 64`), for the fork
/// handlers' record of which arena locks a `fork`'s prepare handler took or skipped: written
/// by that handler and read by the parent and child handlers of the same `fork`, which glibc
/// runs on the forking thread (so Relaxed suffices).
pub struct ArenaSet<const WORDS: usize>([AtomicU64; WORDS]);

impl<const WORDS: usize> ArenaSet<WORDS> {
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; WORDS])
    }

    /// Puts `i` in the set, or takes it out.
    pub fn set(&self, i: usize, on: bool) {
        let bit = 1u64 << (i % 64);
        if on {
            self.0[i / 64].fetch_or(bit, Ordering::Relaxed);
        } else {
            self.0[i / 64].fetch_and(!bit, Ordering::Relaxed);
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        self.0[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }
}

/// A lock that guards an arena's state.
///
/// # Safety
/// Implementations exclude: from an `acquire` (or a `try_acquire` that returned `Some`) to
/// the matching `release`, no other thread (of any process that shares the lock) holds it;
/// taking it has Acquire and releasing it Release semantics. None of the methods allocates
/// or panics. `acquire` returns [`Taken::OwnerDied`] only if `ROBUST`.
pub unsafe trait ArenaLock: Sync {
    /// Whether a holder can die holding the lock (another process sharing the memory):
    /// taking it may then report [`Taken::OwnerDied`], after which the taker repairs the
    /// arena and calls [`ArenaLock::mark_consistent`].
    const ROBUST: bool;

    /// Makes the memory at `slot` an unlocked lock. Returns false if it could not.
    ///
    /// # Safety
    /// `slot` is zeroed, writable memory for a `Self` that no one uses yet.
    unsafe fn init_in_place(slot: *mut Self) -> bool;

    /// Takes the lock, waiting for it if needed.
    fn acquire(&self) -> Taken;

    /// Takes the lock if it is free now.
    fn try_acquire(&self) -> Option<Taken>;

    /// Releases the lock.
    ///
    /// pre: the calling thread holds it.
    fn release(&self);

    /// After [`Taken::OwnerDied`] and the repair: the guarded data is sound again.
    ///
    /// pre: the calling thread holds the lock.
    fn mark_consistent(&self);

    /// How many times a taker found the lock already held.
    fn contentions(&self) -> u64;

    /// Whether the calling thread holds the lock (a signal handler that interrupted its
    /// holder). Never false when it does. False for a lock that cannot tell (the default).
    fn held_by_caller(&self) -> bool {
        false
    }

    /// Makes the lock anew, unlocked: for the child of `fork`, where its holder does not
    /// exist. Returns false if it could not.
    ///
    /// # Safety
    /// No thread of this process holds or waits for the lock, and it is on no thread's
    /// robust list.
    unsafe fn reinit(&self) -> bool;

    /// Fork child: the lock was held by the forking thread's own interrupted code (a `fork`
    /// from a signal handler, whose handlers left the lock alone): makes it held by this
    /// thread, the child's copy of that thread, so that [`ArenaLock::held_by_caller`] says so
    /// and the interrupted code can release it when it resumes here. Nothing by default:
    /// a lock that names its holder by something the child's thread keeps (the thread
    /// pointer, [`RawLock`]) is the child's already.
    ///
    /// # Safety
    /// The child of `fork`, this thread the only one; the lock is in memory private to this
    /// process and was held by the forking thread when it forked.
    unsafe fn adopt_after_fork(&self) {}
}

// SAFETY: a futex lock excludes with Acquire/Release orderings (`lock.rs`), never
// allocates nor panics, and never reports a dead holder.
unsafe impl ArenaLock for RawLock {
    const ROBUST: bool = false;

    unsafe fn init_in_place(_slot: *mut Self) -> bool {
        // All-zero is an unlocked private lock.
        true
    }

    #[inline(always)]
    fn acquire(&self) -> Taken {
        self.lock();
        Taken::Clean
    }

    #[inline(always)]
    fn try_acquire(&self) -> Option<Taken> {
        self.try_lock().then_some(Taken::Clean)
    }

    #[inline(always)]
    fn release(&self) {
        self.unlock()
    }

    fn mark_consistent(&self) {}

    fn contentions(&self) -> u64 {
        RawLock::contentions(self)
    }

    #[inline(always)]
    fn held_by_caller(&self) -> bool {
        RawLock::held_by_caller(self)
    }

    unsafe fn reinit(&self) -> bool {
        RawLock::reinit(self);
        true
    }
}

// SAFETY: a process-shared robust pthread mutex excludes across processes with the orderings
// of a mutex; glibc's mutex functions neither allocate nor take other locks (`lock.rs`).
unsafe impl ArenaLock for RobustLock {
    const ROBUST: bool = true;

    unsafe fn init_in_place(slot: *mut Self) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { RobustLock::init_in_place(slot) }
    }

    #[inline]
    fn acquire(&self) -> Taken {
        self.lock()
    }

    #[inline]
    fn try_acquire(&self) -> Option<Taken> {
        self.try_lock()
    }

    #[inline]
    fn release(&self) {
        self.unlock()
    }

    fn mark_consistent(&self) {
        RobustLock::mark_consistent(self)
    }

    fn contentions(&self) -> u64 {
        RobustLock::contentions(self)
    }

    #[inline]
    fn held_by_caller(&self) -> bool {
        RobustLock::held_by_caller(self)
    }

    unsafe fn adopt_after_fork(&self) {
        // SAFETY: passed on from the caller.
        unsafe { RobustLock::adopt_after_fork(self) }
    }

    unsafe fn reinit(&self) -> bool {
        // SAFETY: every byte of a `RobustLock` lies in an `UnsafeCell` (the mutex) or an
        // atomic, so writing through a pointer made from `&self` is allowed; no one uses
        // the lock (contract).
        unsafe { RobustLock::init_in_place(self as *const Self as *mut Self) }
    }
}
