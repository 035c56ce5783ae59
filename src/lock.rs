//! The locks of arenas and shared heaps, built on `os::sync`: [`RawLock`], a futex mutex
//! that never allocates (one `AtomicU32`), and [`RobustLock`], for memory several processes
//! share.
//!
//! States: 0 unlocked; otherwise the holder's thread tag, with a bit for possible sleepers.
//! Taking a free lock is one compare-and-swap; releasing it is one swap, and a system call
//! only if someone may sleep.
//! Contended takers spin briefly (crossbeam's `Backoff`) before sleeping on the futex.
//!
//! The fork child calls [`RawLock::reinit`] rather than unlocking: the thread that took the
//! lock in the parent does not exist in the child.
//!
//! A [`RawLock`] records its holder's thread ([`os::thread_id`]) so that a thread can tell
//! that it holds a lock itself: a signal handler that interrupted an allocation and
//! allocates, or forks, must not wait for a lock that only its own interrupted frame can
//! release ([`RawLock::held_by_caller`]; a take that would wait for such a lock aborts with
//! a message instead of hanging).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use crossbeam_utils::Backoff;

use crate::os;
use crate::os::sync::{MutexTake, RobustMutex};

const UNLOCKED: u32 = 0;
/// Set in `state` while someone may sleep on the futex.
const WAITERS: u32 = 1;

/// The calling thread's tag: bits 1..32 of a fold of its [`os::thread_id`], never zero.
/// Two live threads' tags differ unless their ids differ by a multiple of 2^35 in a way
/// the fold maps to the same bits; `owner` settles such a collision.
#[inline(always)]
fn my_tag() -> u32 {
    let id = os::thread_id() as u64;
    let folded = (id >> 4) ^ (id >> 35);
    ((folded as u32) << 1) | 2
}

/// A futex lock. `shared` selects process-shared futexes (for heaps in shared memory).
///
/// Invariant: `state` is 0 exactly while no thread holds the lock; otherwise its bits
/// `!WAITERS` are the holder's tag ([`my_tag`]), written by the very compare-and-swap that
/// took the lock (so a thread can tell from `state` alone that it holds the lock, with no
/// window after the take), and `WAITERS` says a taker may be asleep. `owner` is the holder's
/// [`os::thread_id`] from just after its take until just before its release, and 0
/// otherwise; only the holder writes a non-zero value into it.
pub struct RawLock {
    state: AtomicU32,
    /// How many times a taker found the lock held (statistics only).
    contended: AtomicU64,
    owner: AtomicUsize,
    shared: bool,
}

impl RawLock {
    #[allow(dead_code)] // arenas start from zeroed memory; shared heaps will build locks
    pub const fn new(shared: bool) -> Self {
        Self {
            state: AtomicU32::new(UNLOCKED),
            contended: AtomicU64::new(0),
            owner: AtomicUsize::new(0),
            shared,
        }
    }

    /// Takes the lock, waiting for it if needed. Aborts with a one-line message if the
    /// calling thread holds it already (a signal handler that interrupted the holder):
    /// waiting would never end.
    #[inline]
    pub fn lock(&self) {
        // Acquire: the holder must see every write made under the lock by the previous holder.
        if self
            .state
            .compare_exchange(UNLOCKED, my_tag(), Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        self.owner.store(os::thread_id(), Ordering::Relaxed);
    }

    /// Takes the lock if it is free now. Returns whether it did.
    #[inline]
    pub fn try_lock(&self) -> bool {
        // Acquire: as in `lock`.
        let ok = self
            .state
            .compare_exchange(UNLOCKED, my_tag(), Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if ok {
            self.owner.store(os::thread_id(), Ordering::Relaxed);
        }
        ok
    }

    /// Whether the calling thread holds the lock (a signal handler on the thread whose
    /// interrupted code holds it). Never false when it does; true when it does not only if
    /// another thread with the same tag is within the few instructions between its take and
    /// the record of its id in `owner`.
    #[inline]
    pub fn held_by_caller(&self) -> bool {
        // Relaxed: a thread reads its own writes in program order; others' values only have
        // to differ from its own.
        if self.state.load(Ordering::Relaxed) & !WAITERS != my_tag() {
            return false;
        }
        let owner = self.owner.load(Ordering::Relaxed);
        owner == 0 || owner == os::thread_id()
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        if self.held_by_caller() {
            os::fatal(
                b"coreheap: malloc or free re-entered (from a signal handler?) on a thread that holds the arena lock it needs; aborting\n",
            );
        }
        self.contended.fetch_add(1, Ordering::Relaxed);
        let tag = my_tag();
        let backoff = Backoff::new();
        while !backoff.is_completed() {
            if self.state.load(Ordering::Relaxed) == UNLOCKED && self.try_lock() {
                return;
            }
            backoff.snooze();
        }
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s == UNLOCKED {
                // Taken with WAITERS set, since others may sleep: costs the next unlock one
                // spurious wake at most. Acquire: as in `lock`.
                if self
                    .state
                    .compare_exchange(
                        UNLOCKED,
                        tag | WAITERS,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            if s & WAITERS == 0
                && self
                    .state
                    .compare_exchange(s, s | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            os::futex_wait(&self.state, s | WAITERS, self.shared);
        }
    }

    /// Releases the lock.
    ///
    /// pre: the calling thread holds it.
    #[inline]
    pub fn unlock(&self) {
        self.owner.store(0, Ordering::Relaxed);
        // Release: publishes the writes made under the lock to the next holder.
        if self.state.swap(UNLOCKED, Ordering::Release) & WAITERS != 0 {
            os::futex_wake(&self.state, self.shared);
        }
    }

    /// Fork: takes the lock before `fork`. Returns false, without taking it, if the calling
    /// thread holds it already (a signal handler that interrupted its holder): the lock then
    /// stays with the interrupted code, in the parent and in the child.
    pub fn lock_for_fork(&self) -> bool {
        if self.held_by_caller() {
            return false;
        }
        self.lock();
        true
    }

    /// Forgets any holder: for the child of `fork`, where the holder does not exist.
    ///
    /// pre: only the calling thread exists in this process (or none other uses the lock).
    pub fn reinit(&self) {
        self.owner.store(0, Ordering::Relaxed);
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
/// A thread can tell that it holds the lock itself ([`RobustLock::held_by_caller`]) from the
/// mutex's word, which holds its holder's kernel thread id (the kernel's robust-futex ABI;
/// glibc's `pthread_mutex_t` keeps that word first): a signal handler that interrupted the
/// holder and allocates, or forks, must not wait for it. A take that would wait for a lock
/// the caller holds aborts with a message instead of hanging, as [`RawLock`]'s does.
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

    /// Takes the lock, waiting for it if needed. Aborts with a one-line message if the
    /// calling thread holds it already (a signal handler that interrupted the holder):
    /// waiting would never end.
    pub fn lock(&self) -> Taken {
        if let Some(t) = self.try_lock() {
            return t;
        }
        if self.held_by_caller() {
            os::fatal(
                b"coreheap: malloc or free re-entered (from a signal handler?) on a thread that holds the shared heap lock it needs; aborting\n",
            );
        }
        self.contended.fetch_add(1, Ordering::Relaxed);
        Self::taken(self.m.lock())
    }

    /// Whether the calling thread holds the lock (a signal handler on the thread whose
    /// interrupted code holds it): exact, see [`RobustMutex::held_by_caller`]. Costs a
    /// system call when the lock is held by anyone, nothing more when it is free. Always
    /// false with a C library other than glibc.
    #[inline]
    pub fn held_by_caller(&self) -> bool {
        self.m.held_by_caller()
    }

    /// Fork child: the lock, held in the parent by the forking thread's interrupted code
    /// (a `fork` from a signal handler; the fork handlers left it alone), becomes held by
    /// this thread, the child's copy of that thread, so that the interrupted code releases it
    /// when it resumes here ([`RobustMutex::adopt_after_fork`]).
    ///
    /// # Safety
    /// The child of `fork`, this thread the only one; the lock is in memory private to this
    /// process and was held by the forking thread when it forked.
    pub unsafe fn adopt_after_fork(&self) {
        // SAFETY: passed on from the caller.
        unsafe { self.m.adopt_after_fork() }
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

    #[test]
    fn knows_its_own_holder() {
        let l = RawLock::new(false);
        assert!(!l.held_by_caller());
        l.lock();
        assert!(l.held_by_caller());
        let other = std::thread::scope(|s| s.spawn(|| l.held_by_caller()).join().unwrap());
        assert!(!other);
        l.unlock();
        assert!(!l.held_by_caller());
        assert!(l.try_lock());
        assert!(l.held_by_caller());
        l.reinit();
        assert!(!l.held_by_caller());
    }
}
