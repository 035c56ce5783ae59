//! `COREHEAP_SHM`: the process-wide heap's publisher claim and its fork handling (see
//! `process.rs`, which registers the handlers).

use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

use super::layout::{ShmHeader, MAX_ARENAS};
use super::SharedHeap;
use crate::arena::ArenaSet;
use crate::os::{self, file};

impl SharedHeap {
    /// `COREHEAP_SHM`: makes this process the heap's publisher unless another live process
    /// is. Returns whether it is now (children started with the variable inherited find
    /// their parent there, and keep their own heaps).
    pub(super) fn claim_publisher(&self) -> bool {
        let me = os::pid();
        let w = &self.view.header().publisher;
        loop {
            let cur = w.load(Ordering::Acquire);
            if cur == me {
                return true;
            }
            if cur != 0 && os::process_alive(cur) {
                return false;
            }
            if w.compare_exchange(cur, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Fork of a process whose own heap this is (`COREHEAP_SHM`), before `fork`: takes every
    /// arena lock and the chunk lock, so the child's copy is taken between operations, except
    /// a lock the forking thread holds itself (a `fork` from a signal handler that
    /// interrupted this thread inside the heap): that one stays with the interrupted code, in
    /// the parent and in the child, and the parent and child handlers leave it alone (which
    /// ones this `fork` took is recorded in [`SKIPPED`] and [`CHUNKS_SKIPPED`]).
    ///
    /// Unlike the process heap's, this takes the locks in a single-threaded process too:
    /// other processes may use the heap's locks (a process that opened it through the
    /// library), and only the skipped locks could be waited for in vain.
    ///
    /// pre: the handlers of two `fork`s do not run at once (the caller holds glibc's stdio
    /// list lock in a multithreaded process).
    pub(super) fn fork_prepare(&self) {
        os::sync::robust_fork_prepare();
        for (i, a) in self.view.arenas().enumerate() {
            SKIPPED.set(i, !a.fork_lock(&self.view.src));
        }
        let held = self.view.header().chunk_lock.held_by_caller();
        CHUNKS_SKIPPED.store(held, Ordering::Relaxed);
        if !held {
            self.view.src.lock_chunks();
        }
    }

    /// Fork, parent side (after the child has made its copy): releases the locks
    /// [`Self::fork_prepare`] took, and only those.
    pub(super) fn fork_parent(&self) {
        if !CHUNKS_SKIPPED.load(Ordering::Relaxed) {
            self.view.header().chunk_lock.unlock();
        }
        for (i, a) in self.view.arenas().enumerate() {
            if !SKIPPED.contains(i) {
                a.fork_unlock(&self.view.src);
            }
        }
    }

    /// Fork, child side: the child must not share its parent's heap (it would free and
    /// overwrite the parent's objects), so the mapping is replaced by a private copy at the
    /// same address, and the locks the prepare handler took (held by the parent's forking
    /// thread) are made anew. A lock it skipped, held by the interrupted code of the thread
    /// that forked, becomes this thread's (the child's copy of that code releases it when it
    /// resumes). Returns false if the copy could not be made: the child then shares the heap.
    pub(super) fn fork_child(&self) -> bool {
        let (base, len) = (self.view.src.base as *mut u8, self.view.src.len);
        if !file::privatize(base, len, self.fd) {
            return false;
        }
        // A take of a lock that the fork interrupted resumes here with the parent's id.
        os::sync::robust_fork_child();
        // SAFETY: the memory is this process's private copy now, and this thread the only
        // one; the locks in it belong to the parent's forking thread: those the prepare
        // handler took are unused from now on, and glibc emptied this thread's robust list at
        // the fork, so no list refers to them; the others (skipped) were held by that thread's
        // interrupted code, whose copy this thread is.
        unsafe {
            let h = self.view.header() as *const ShmHeader as *mut ShmHeader;
            let chunk_lock = ptr::addr_of_mut!((*h).chunk_lock);
            if CHUNKS_SKIPPED.load(Ordering::Relaxed) {
                (*chunk_lock).adopt_after_fork();
            } else {
                crate::lock::RobustLock::init_in_place(chunk_lock);
            }
            for (i, a) in self.view.arenas().enumerate() {
                if SKIPPED.contains(i) {
                    a.fork_adopt();
                } else {
                    a.fork_reinit();
                }
            }
        }
        true
    }
}

/// The arenas whose lock the last prepare handler skipped because the forking thread held
/// it; the handlers of two `fork`s do not overlap (see [`SharedHeap::fork_prepare`]).
static SKIPPED: ArenaSet<{ MAX_ARENAS as usize / 64 }> = ArenaSet::new();
const _: () = assert!(MAX_ARENAS.is_multiple_of(64));
/// The last prepare handler skipped the chunk lock: the forking thread held it.
static CHUNKS_SKIPPED: AtomicBool = AtomicBool::new(false);
