//! The locks of arenas and shared heaps, built on `os::sync`: [`RawLock`], a futex mutex
//! that never allocates (one `AtomicU32`), and [`RobustLock`], for memory several processes
//! share.
//!
//! States: 0 unlocked, 1 locked, 2 locked with possible sleepers. Taking a free lock is one
//! compare-and-swap; releasing it is one swap, and a system call only if someone may sleep.
//! Contended takers spin briefly (crossbeam's `Backoff`) before sleeping on the futex.
//!
//! The fork child calls [`RawLock::reinit`] rather than unlocking: the thread that took the
//! lock in the parent does not exist in the child.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crossbeam_utils::Backoff;

use crate::os;
use crate::os::sync::{MutexTake, RobustMutex};

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
const CONTENDED: u32 = 2;

/// A futex lock. `shared` selects process-shared futexes (for heaps in shared memory).
///
/// Invariant: `state` is 0, 1 or 2; it is non-zero exactly while some thread holds the lock.
pub struct RawLock {
    state: AtomicU32,
    /// How many times a taker found the lock held (statistics only).
    contended: AtomicU64,
    shared: bool,
}

impl RawLock {
    #[allow(dead_code)] // arenas start from zeroed memory; shared heaps will build locks
    pub const fn new(shared: bool) -> Self {
        Self {
            state: AtomicU32::new(UNLOCKED),
            contended: AtomicU64::new(0),
            shared,
        }
    }

    #[inline]
    pub fn lock(&self) {
        // Acquire: the holder must see every write made under the lock by the previous holder.
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
    }

    /// Takes the lock if it is free now. Returns whether it did.
    #[inline]
    pub fn try_lock(&self) -> bool {
        // Acquire: as in `lock`.
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        self.contended.fetch_add(1, Ordering::Relaxed);
        let backoff = Backoff::new();
        while !backoff.is_completed() {
            if self.state.load(Ordering::Relaxed) == UNLOCKED && self.try_lock() {
                return;
            }
            backoff.snooze();
        }
        // Mark the lock as contended; if it was free meanwhile we own it (in state 2, which
        // costs the next unlock one spurious wake at most).
        // Acquire: as in `lock`.
        while self.state.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            os::futex_wait(&self.state, CONTENDED, self.shared);
        }
    }

    /// Releases the lock.
    ///
    /// pre: the calling thread holds it.
    #[inline]
    pub fn unlock(&self) {
        // Release: publishes the writes made under the lock to the next holder.
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            os::futex_wake(&self.state, self.shared);
        }
    }

    /// Forgets any holder: for the child of `fork`, where the holder does not exist.
    ///
    /// pre: only the calling thread exists in this process (or none other uses the lock).
    pub fn reinit(&self) {
        self.state.store(UNLOCKED, Ordering::Relaxed);
    }

    /// How many times a taker found this lock already held.
    pub fn contentions(&self) -> u64 {
        self.contended.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }
}

/// How a [`RobustLock`] was taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Taken {
    /// From a holder that released it.
    Clean,
    /// From a holder that died holding it: what it guards may be half-updated. The taker
    /// must check (and repair) it, then call [`RobustLock::mark_consistent`].
    OwnerDied,
}

/// A lock for memory that several processes share: a process-shared, robust pthread mutex
/// ([`os::sync::RobustMutex`]). When its holder dies, even by `SIGKILL`, the kernel marks the
/// mutex and the next taker gets [`Taken::OwnerDied`]. Never allocates, never takes other
/// locks.
///
/// Invariant: initialised once with [`RobustLock::init_in_place`] before any other use;
/// all-zero memory is *not* a valid robust lock (it is a private, non-robust mutex).
pub struct RobustLock {
    m: RobustMutex,
    /// How many times a taker found the lock held (statistics only).
    contended: AtomicU64,
}

impl RobustLock {
    /// Makes the memory at `slot` an unlocked process-shared robust mutex. Returns false if
    /// glibc refused.
    ///
    /// # Safety
    /// `slot` is writable memory for a `RobustLock` that no one uses yet.
    pub unsafe fn init_in_place(slot: *mut RobustLock) -> bool {
        // SAFETY: `slot` is ours by the contract, so are its fields.
        unsafe {
            let ok = RobustMutex::init_in_place(core::ptr::addr_of_mut!((*slot).m));
            core::ptr::addr_of_mut!((*slot).contended).write(AtomicU64::new(0));
            ok
        }
    }

    /// Takes the lock, waiting for it if needed.
    pub fn lock(&self) -> Taken {
        if let Some(t) = self.try_lock() {
            return t;
        }
        self.contended.fetch_add(1, Ordering::Relaxed);
        Self::taken(self.m.lock())
    }

    /// Takes the lock if it is free now.
    pub fn try_lock(&self) -> Option<Taken> {
        match self.m.try_lock() {
            MutexTake::Busy => None,
            t => Some(Self::taken(t)),
        }
    }

    fn taken(t: MutexTake) -> Taken {
        match t {
            MutexTake::Clean => Taken::Clean,
            MutexTake::OwnerDied => Taken::OwnerDied,
            // ENOTRECOVERABLE (a taker after an owner's death released the lock without
            // marking it consistent: coreheap never does) or EINVAL (not initialised: the
            // memory is not a heap's).
            MutexTake::Busy | MutexTake::Unusable(_) => os::fatal(
                b"coreheap: shared heap lock unusable (not initialised, or abandoned inconsistent)\n",
            ),
        }
    }

    /// After [`Taken::OwnerDied`] and the repair: the guarded data is sound again.
    ///
    /// pre: the calling thread holds the lock.
    pub fn mark_consistent(&self) {
        self.m.mark_consistent();
    }

    /// Releases the lock.
    ///
    /// pre: the calling thread holds it.
    pub fn unlock(&self) {
        self.m.unlock();
    }

    /// How many times a taker found this lock already held.
    pub fn contentions(&self) -> u64 {
        self.contended.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn excludes_and_counts_contention() {
        struct Shared {
            lock: RawLock,
            value: core::cell::UnsafeCell<u64>,
        }
        // SAFETY: `value` is only touched while `lock` is held.
        unsafe impl Sync for Shared {}
        let s = Arc::new(Shared {
            lock: RawLock::new(false),
            value: core::cell::UnsafeCell::new(0),
        });
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        s.lock.lock();
                        // SAFETY: the lock is held.
                        unsafe { *s.value.get() += 1 };
                        s.lock.unlock();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        s.lock.lock();
        // SAFETY: the lock is held.
        assert_eq!(unsafe { *s.value.get() }, 400_000);
        s.lock.unlock();
        assert!(!s.lock.is_locked());
    }

    #[test]
    fn try_lock_and_reinit() {
        let l = RawLock::new(false);
        assert!(l.try_lock());
        assert!(!l.try_lock());
        l.reinit();
        assert!(l.try_lock());
        l.unlock();
    }
}
