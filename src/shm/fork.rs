//! `COREHEAP_SHM`: the process-wide heap's publisher claim and its fork handling (see
//! `process.rs`, which registers the handlers).

use core::ptr;
use core::sync::atomic::Ordering;

use super::layout::ShmHeader;
use super::SharedHeap;
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
    /// arena lock and the chunk lock, so the child's copy is taken between operations.
    pub(super) fn fork_prepare(&self) {
        for a in self.view.arenas() {
            a.fork_lock(&self.view.src);
        }
        self.view.src.lock_chunks();
    }

    /// Fork, parent side (after the child has made its copy): releases the locks.
    pub(super) fn fork_parent(&self) {
        self.view.header().chunk_lock.unlock();
        for a in self.view.arenas() {
            a.fork_unlock(&self.view.src);
        }
    }

    /// Fork, child side: the child must not share its parent's heap (it would free and
    /// overwrite the parent's objects), so the mapping is replaced by a private copy at the
    /// same address, and the locks (held by the parent's forking thread) are made anew.
    /// Returns false if the copy could not be made: the child then shares the heap.
    pub(super) fn fork_child(&self) -> bool {
        let (base, len) = (self.view.src.base as *mut u8, self.view.src.len);
        if !file::privatize(base, len, self.fd) {
            return false;
        }
        // SAFETY: the memory is this process's private copy now; the locks in it belong to
        // a thread of the parent, and glibc emptied this thread's robust list at the fork, so
        // no list refers to them.
        unsafe {
            let h = self.view.header() as *const ShmHeader as *mut ShmHeader;
            crate::lock::RobustLock::init_in_place(ptr::addr_of_mut!((*h).chunk_lock));
            for a in self.view.arenas() {
                a.fork_reinit();
            }
        }
        true
    }
}
