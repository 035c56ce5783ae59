//! Process events: the `pthread_atfork` handlers and the exit report and check.
//!
//! Lock order at fork: (under `COREHEAP_SHM`, the preload library's `fork` gate first,
//! `shm::process::fork_gated`, taken before glibc's `fork` starts) glibc's stdio list lock,
//! then the arenas in index order, then the huge span cache's lock (`source/spans.rs`). The
//! child re-initialises every lock the prepare handler took rather than unlocking it (the
//! thread that took it in the parent does not exist in the child). The handlers are
//! registered once per process.
//!
//! A `fork` may come from a signal handler that interrupted this very thread inside an
//! arena (holding its lock):
//! - in a single-threaded process the handlers take no lock at all, as glibc's `fork` takes
//!   none of its malloc locks then: no other thread can hold one;
//! - otherwise the prepare handler skips a lock the forking thread holds itself
//!   ([`Arena::fork_lock`](crate::arena::Arena::fork_lock)) and takes the others.
//!
//! Either way a lock the interrupted code holds stays held, in the parent and in the child,
//! until that code resumes and releases it (the child's thread has the forking thread's
//! identity); meanwhile an allocation on that thread is served by another arena (see
//! `front::alloc_locked`). What the child may then do is in `docs/design.md` ("Fork").

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};

use super::{ProcessHeap, HEAP, SRC};
use crate::arena::ArenaSet;
use crate::diag::Line;
use crate::os;
use crate::settings::MAX_ARENAS;

/// The arenas whose lock the last prepare handler took.
static TAKEN: ArenaSet<{ MAX_ARENAS / 64 }> = ArenaSet::new();
/// The last prepare handler found the process single-threaded and took no lock.
static SINGLE: AtomicBool = AtomicBool::new(false);
/// The page source's locks (span cache, retired chunks) the last prepare handler took, as
/// [`OsSource::fork_lock`](crate::source::OsSource::fork_lock) says.
static SOURCE_TAKEN: AtomicU8 = AtomicU8::new(0);

impl ProcessHeap {
    fn fork_prepare(&self) {
        let single = os::single_threaded();
        SINGLE.store(single, Ordering::Relaxed);
        if single {
            return;
        }
        os::stdio_list_lock();
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                TAKEN.set(i, cfg.arena(i).fork_lock(&SRC));
            }
        }
        SOURCE_TAKEN.store(SRC.fork_lock(), Ordering::Relaxed);
    }

    fn fork_parent(&self) {
        if SINGLE.load(Ordering::Relaxed) {
            return;
        }
        SRC.fork_unlock(SOURCE_TAKEN.load(Ordering::Relaxed));
        if let Some(cfg) = self.config() {
            for i in (0..cfg.count).rev().filter(|&i| TAKEN.contains(i)) {
                cfg.arena(i).fork_unlock(&SRC);
            }
        }
        os::stdio_list_unlock();
    }

    fn fork_child(&self) {
        // The initialising thread, if any was recorded, does not exist here; nor does a
        // thread that was looking the rseq symbols up.
        self.init_thread.store(0, Ordering::Relaxed);
        #[cfg(coreheap_rseq)]
        os::rseq::reset_after_fork();
        if SINGLE.load(Ordering::Relaxed) {
            // No lock was taken; a held one belongs to this thread's interrupted code.
            return;
        }
        if let Some(cfg) = self.config() {
            if cfg.caches.enabled {
                // SAFETY: the child of fork: only this thread exists.
                unsafe { cfg.caches.recount_spare_after_fork() };
                for i in 0..cfg.count {
                    // SAFETY: the child of fork: only this thread exists.
                    unsafe { cfg.caches.transfer(i).inbox.repair_after_fork() };
                }
            }
            for i in (0..cfg.count).filter(|&i| TAKEN.contains(i)) {
                // SAFETY: the child of fork: only this thread exists, it took the lock in
                // the prepare handler and uses it no more; process arenas' locks are on no
                // robust list.
                unsafe { cfg.arena(i).fork_reinit() };
            }
        }
        SRC.fork_reinit(SOURCE_TAKEN.load(Ordering::Relaxed));
        os::stdio_list_reset();
    }
}

/// The handlers are registered (set once `pthread_atfork` has accepted them).
static REGISTERED: AtomicBool = AtomicBool::new(false);
/// The thread ([`os::thread_id`]) whose `fork` under way has had the prepare handler's work
/// done, 0 when none: the `COREHEAP_SHM` prepare handler may do it early
/// ([`prepare_fork_early`]), and glibc's call on the same thread then does nothing.
///
/// Per thread, not a flag: recent glibc (2.36 here) holds its fork handler lock only while it
/// walks the list, not around a handler, so two threads that fork at once run their prepare
/// handlers at once; the second must wait for the locks (the stdio list lock first), not
/// skip them because the first is under way (it then forked without them and its parent
/// handler released the first's: `fork_concurrent.c` hung). Written only by a thread that
/// holds the fork locks (stored after they are taken, cleared before they are released), so
/// a thread that reads its own id took them for its own `fork`.
static PREPARED_BY: AtomicUsize = AtomicUsize::new(0);

/// Takes the fork locks unless the calling thread took them already for this `fork`.
fn prepare_once() {
    let me = os::thread_id();
    if PREPARED_BY.load(Ordering::Relaxed) != me {
        HEAP.fork_prepare();
        PREPARED_BY.store(me, Ordering::Relaxed);
    }
}

unsafe extern "C" fn atfork_prepare() {
    prepare_once();
}
unsafe extern "C" fn atfork_parent() {
    // Before the locks are released: another thread's prepare may take them next.
    PREPARED_BY.store(0, Ordering::Relaxed);
    HEAP.fork_parent();
}
unsafe extern "C" fn atfork_child() {
    HEAP.fork_child();
    PREPARED_BY.store(0, Ordering::Relaxed);
}

/// For the `COREHEAP_SHM` prepare handler, which stops the other threads (`os/stop.rs`):
/// takes this heap's fork locks now, before they are stopped, if its own prepare handler has
/// not run yet in this `fork` (it runs after the `COREHEAP_SHM` one when it was registered
/// first, and would then wait for ever for a lock a stopped thread holds). Nothing if the
/// handlers are not registered (the heap was never initialised: no lock to take).
///
/// pre: inside a prepare handler of a `fork` of a multithreaded process.
pub(crate) fn prepare_fork_early() {
    if REGISTERED.load(Ordering::Relaxed) {
        prepare_once();
    }
}

/// Where the exit report goes: a private copy of stderr, taken when the report was asked for,
/// because programs may close stderr in their own exit handlers (coreutils does) before ours
/// run.
static REPORT_FD: AtomicI32 = AtomicI32::new(2);

extern "C" fn report_at_exit() {
    let fd = REPORT_FD.load(Ordering::Relaxed);
    if crate::settings::get().stats_json {
        HEAP.write_json(fd);
    } else {
        HEAP.write_report(fd);
    }
}

/// `COREHEAP_CHECK=1`: verifies every arena at exit; a violation aborts with its name.
extern "C" fn check_at_exit() {
    let mut l = Line::new();
    match HEAP.check() {
        Ok(()) => {
            l.str(b"coreheap: heap check at exit: ok (")
                .num(HEAP.arena_count() as u64)
                .str(b" arenas)\n");
            l.write(REPORT_FD.load(Ordering::Relaxed));
        }
        Err(e) => {
            l.str(b"coreheap: heap check at exit failed: ")
                .str(e.as_bytes())
                .str(b"\n");
            os::fatal(l.as_bytes());
        }
    }
}

/// Registers the fork handlers (and the exit report and check, if asked for) once per
/// process.
pub(super) fn register_handlers(settings: &crate::settings::Settings) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    if os::register_atfork(atfork_prepare, atfork_parent, atfork_child) {
        REGISTERED.store(true, Ordering::Relaxed);
    } else {
        let mut l = Line::new();
        l.str(b"coreheap: pthread_atfork failed; fork may deadlock\n");
        l.write(2);
    }
    let (stats, check) = (settings.stats, settings.check);
    if stats || check {
        // A high descriptor number keeps out of the way of programs that pick small ones.
        let fd = os::dup_fd_high(2, 500);
        if fd >= 0 {
            REPORT_FD.store(fd, Ordering::Relaxed);
        }
        // atexit runs them in reverse: the check first, then the report.
        if stats {
            os::at_exit(report_at_exit);
        }
        if check {
            os::at_exit(check_at_exit);
        }
    }
}
